use crate::config::ParamValue;
use std::collections::BTreeMap;
use std::net::SocketAddr;

/// Name of the file pgwarden owns inside the data directory; postgresql.conf
/// includes it, so an operator's own postgresql.conf edits stay theirs.
pub const MANAGED_CONF: &str = "pgwarden.conf";
pub const INCLUDE_LINE: &str = "include_if_exists = 'pgwarden.conf'  # added by pgwarden";
/// The leader's `synchronous_standby_names` in synchronous mode, included
/// last by pgwarden.conf: rewritten on its own, without re-rendering the
/// rest (`Instance::set_sync_standbys`).
pub const SYNC_CONF: &str = "pgwarden-sync.conf";

/// Everything that decides the content of PostgreSQL's config files.
#[derive(Debug, Clone)]
pub struct ConfInputs {
    /// Major version (10, 11, 12, …): recovery settings moved into
    /// postgresql.conf with standby.signal in 12.
    pub major: u32,
    pub listen: SocketAddr,
    /// Dynamic (cluster-wide) parameters, then this member's own: the
    /// member's win where both set one.
    pub cluster_parameters: BTreeMap<String, ParamValue>,
    pub local_parameters: BTreeMap<String, ParamValue>,
    pub pg_hba: Vec<String>,
    /// None: run as primary.
    pub replica: Option<ReplicaSettings>,
    /// Synchronous mode: until the leader names its standbys in SYNC_CONF,
    /// commits wait (`ha::NOBODY`): a freshly promoted primary must not
    /// acknowledge what no listed standby has.
    pub synchronous_mode: bool,
}

#[derive(Clone, PartialEq, Eq)]
pub struct ReplicaSettings {
    /// host:port of the upstream; None: in recovery with no upstream yet.
    pub upstream: Option<String>,
    pub user: String,
    pub password: String,
    pub application_name: String,
    pub slot: Option<String>,
}

// By hand: the replication password must not reach a log line.
impl std::fmt::Debug for ReplicaSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplicaSettings")
            .field("upstream", &self.upstream)
            .field("user", &self.user)
            .field("password", &crate::config::REDACTED)
            .field("application_name", &self.application_name)
            .field("slot", &self.slot)
            .finish()
    }
}

/// File contents to write into the data directory, and which recovery
/// marker files must exist or be removed.
#[derive(Clone, PartialEq)]
pub struct ConfFiles {
    pub managed_conf: String,
    pub pg_hba: String,
    /// PostgreSQL 12+: create standby.signal (true) or remove it.
    pub standby_signal: bool,
    /// PostgreSQL 10/11: recovery.conf content, or None to remove it.
    pub recovery_conf: Option<String>,
    /// SYNC_CONF reset to the default (a replica in synchronous mode: a
    /// list left from when it led must not apply when it is promoted);
    /// None: leave it to the leader's policy.
    pub sync_conf: Option<String>,
}

// By hand: primary_conninfo in the rendered files carries the replication
// password.
impl std::fmt::Debug for ConfFiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConfFiles")
            .field(
                "managed_conf",
                &format_args!("<{} bytes>", self.managed_conf.len()),
            )
            .field("pg_hba", &self.pg_hba)
            .field("standby_signal", &self.standby_signal)
            .field(
                "recovery_conf",
                &self
                    .recovery_conf
                    .as_ref()
                    .map(|r| format!("<{} bytes>", r.len())),
            )
            .finish()
    }
}

/// Defaults a replicated cluster needs; the operator may override each.
fn base_parameters(major: u32) -> BTreeMap<String, ParamValue> {
    let mut p = BTreeMap::new();
    let mut set = |k: &str, v: ParamValue| {
        p.insert(k.to_string(), v);
    };
    set("wal_level", ParamValue::Text("replica".into()));
    set("hot_standby", ParamValue::Bool(true));
    set("max_wal_senders", ParamValue::Int(10));
    set("max_replication_slots", ParamValue::Int(10));
    // pg_rewind needs hint bits WAL-logged unless checksums are on; cheap
    // insurance for data directories initialised without checksums.
    set("wal_log_hints", ParamValue::Bool(true));
    set("hot_standby_feedback", ParamValue::Bool(true));
    if major >= 13 {
        set("wal_keep_size", ParamValue::Text("128MB".into()));
    } else {
        set("wal_keep_segments", ParamValue::Int(8));
    }
    set("logging_collector", ParamValue::Bool(true));
    set("log_directory", ParamValue::Text("log".into()));
    set("log_filename", ParamValue::Text("postgresql-%a.log".into()));
    set("log_truncate_on_rotation", ParamValue::Bool(true));
    set("log_rotation_age", ParamValue::Text("1d".into()));
    p
}

pub fn render_conf(inp: &ConfInputs) -> ConfFiles {
    let mut params = base_parameters(inp.major);
    params.extend(inp.cluster_parameters.clone());
    params.extend(inp.local_parameters.clone());
    params.insert(
        "listen_addresses".into(),
        ParamValue::Text(inp.listen.ip().to_string()),
    );
    params.insert("port".into(), ParamValue::Int(i64::from(inp.listen.port())));
    let default_sync = crate::ha::NOBODY;
    if inp.synchronous_mode {
        params.insert(
            "synchronous_standby_names".into(),
            ParamValue::Text(default_sync.into()),
        );
    }
    let recovery = inp
        .replica
        .as_ref()
        .map(recovery_parameters)
        .unwrap_or_default();
    let mut conf = String::from(
        "# Written by pgwarden; changes are overwritten. Set parameters in pgwarden's config.\n",
    );
    for (k, v) in &params {
        conf.push_str(&format!("{k} = {}\n", v.render()));
    }
    if inp.synchronous_mode {
        conf.push_str(&format!("include_if_exists = '{SYNC_CONF}'\n"));
    }
    let mut recovery_conf = None;
    if inp.major >= 12 {
        for (k, v) in &recovery {
            conf.push_str(&format!("{k} = {}\n", v.render()));
        }
    } else if inp.replica.is_some() {
        let mut rc = String::from("# Written by pgwarden\nstandby_mode = 'on'\n");
        for (k, v) in &recovery {
            rc.push_str(&format!("{k} = {}\n", v.render()));
        }
        recovery_conf = Some(rc);
    }
    let mut hba =
        String::from("# Written by pgwarden; set [postgresql] pg_hba in pgwarden's config.\n");
    for line in &inp.pg_hba {
        hba.push_str(line);
        hba.push('\n');
    }
    ConfFiles {
        managed_conf: conf,
        pg_hba: hba,
        standby_signal: inp.major >= 12 && inp.replica.is_some(),
        recovery_conf,
        sync_conf: (inp.synchronous_mode && inp.replica.is_some())
            .then(|| sync_conf_text(default_sync)),
    }
}

/// SYNC_CONF's content for one `synchronous_standby_names` value.
pub fn sync_conf_text(value: &str) -> String {
    format!(
        "# Written by pgwarden (synchronous_mode).\nsynchronous_standby_names = {}\n",
        ParamValue::Text(value.to_string()).render()
    )
}

fn recovery_parameters(r: &ReplicaSettings) -> Vec<(String, ParamValue)> {
    let mut out = Vec::new();
    let conninfo = match &r.upstream {
        Some(addr) => {
            let (host, port) = addr.rsplit_once(':').unwrap_or((addr.as_str(), "5432"));
            format!(
                "host={} port={} user={} password={} application_name={} connect_timeout=3",
                conninfo_quote(host),
                conninfo_quote(port),
                conninfo_quote(&r.user),
                conninfo_quote(&r.password),
                conninfo_quote(&r.application_name)
            )
        }
        None => String::new(),
    };
    out.push(("primary_conninfo".into(), ParamValue::Text(conninfo)));
    if let (Some(slot), Some(_)) = (&r.slot, &r.upstream) {
        out.push(("primary_slot_name".into(), ParamValue::Text(slot.clone())));
    } else {
        out.push(("primary_slot_name".into(), ParamValue::Text(String::new())));
    }
    out.push((
        "recovery_target_timeline".into(),
        ParamValue::Text("latest".into()),
    ));
    out
}

/// libpq conninfo value quoting: single quotes around, backslash-escape
/// quotes and backslashes.
fn conninfo_quote(v: &str) -> String {
    format!("'{}'", v.replace('\\', "\\\\").replace('\'', "\\'"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_output_carries_no_password() {
        for major in [11, 15] {
            let inp = inputs(major, true);
            let files = render_conf(&inp);
            for text in [format!("{inp:?}"), format!("{files:?}")] {
                assert!(!text.contains("it's"), "password in {text}");
            }
        }
    }

    fn inputs(major: u32, replica: bool) -> ConfInputs {
        ConfInputs {
            major,
            listen: "127.0.0.1:5433".parse().expect("addr"),
            cluster_parameters: BTreeMap::from([("max_connections".into(), ParamValue::Int(50))]),
            local_parameters: BTreeMap::from([("max_connections".into(), ParamValue::Int(70))]),
            pg_hba: vec!["host all all 0.0.0.0/0 scram-sha-256".into()],
            replica: replica.then(|| ReplicaSettings {
                upstream: Some("10.0.0.1:5432".into()),
                user: "replicator".into(),
                password: "it's".into(),
                application_name: "node2".into(),
                slot: Some("node2".into()),
            }),
            synchronous_mode: false,
        }
    }

    #[test]
    fn synchronous_mode_acknowledges_nothing_until_the_leader_names_standbys() {
        let mut inp = inputs(15, false);
        let off = render_conf(&inp).managed_conf;
        assert!(!off.contains("synchronous_standby_names"), "{off}");
        assert!(!off.contains(SYNC_CONF), "{off}");
        inp.synchronous_mode = true;
        let on = render_conf(&inp).managed_conf;
        let default = on
            .find("synchronous_standby_names = 'FIRST 1 (\"pgwarden: no synchronous standby\")'")
            .expect("default");
        let include = on
            .find(&format!("include_if_exists = '{SYNC_CONF}'"))
            .expect("include");
        assert!(
            default < include,
            "the leader's choice must come last: {on}"
        );
    }

    #[test]
    fn primary_on_15_has_no_recovery_settings_in_effect() {
        let f = render_conf(&inputs(15, false));
        assert!(!f.standby_signal);
        assert_eq!(f.recovery_conf, None);
        assert!(f.managed_conf.contains("port = 5433\n"));
        assert!(f.managed_conf.contains("listen_addresses = '127.0.0.1'\n"));
        assert!(
            f.managed_conf.contains("max_connections = 70\n"),
            "local parameters win"
        );
        assert!(f.managed_conf.contains("wal_keep_size = '128MB'\n"));
        assert!(!f.managed_conf.contains("primary_conninfo"));
        assert!(f.pg_hba.contains("host all all 0.0.0.0/0 scram-sha-256\n"));
    }

    #[test]
    fn replica_on_12_plus_uses_standby_signal_and_conf() {
        let f = render_conf(&inputs(12, true));
        assert!(f.standby_signal);
        assert_eq!(f.recovery_conf, None);
        assert!(f.managed_conf.contains(
            "primary_conninfo = 'host=''10.0.0.1'' port=''5432'' user=''replicator'' password=''it\\\\''s'' application_name=''node2'' connect_timeout=3'\n"
        ), "{}", f.managed_conf);
        assert!(f.managed_conf.contains("primary_slot_name = 'node2'\n"));
        assert!(f
            .managed_conf
            .contains("recovery_target_timeline = 'latest'\n"));
    }

    #[test]
    fn replica_on_10_and_11_uses_recovery_conf() {
        for major in [10, 11] {
            let f = render_conf(&inputs(major, true));
            assert!(!f.standby_signal);
            let rc = f.recovery_conf.expect("recovery.conf for a replica");
            assert!(rc.contains("standby_mode = 'on'\n"));
            assert!(rc.contains("primary_slot_name = 'node2'\n"));
            assert!(rc.contains("primary_conninfo = 'host=''10.0.0.1''"));
            assert!(rc.contains("recovery_target_timeline = 'latest'\n"));
            assert!(!f.managed_conf.contains("primary_conninfo"));
            assert!(f.managed_conf.contains("wal_keep_segments = 8\n"));
        }
        let primary = render_conf(&inputs(10, false));
        assert_eq!(primary.recovery_conf, None);
    }

    #[test]
    fn replica_without_upstream_waits_without_slot() {
        let mut i = inputs(15, true);
        if let Some(r) = i.replica.as_mut() {
            r.upstream = None;
        }
        let f = render_conf(&i);
        assert!(f.standby_signal);
        assert!(f.managed_conf.contains("primary_conninfo = ''\n"));
        assert!(f.managed_conf.contains("primary_slot_name = ''\n"));
    }

    #[test]
    fn replica_settings_debug_hides_the_password() {
        let shown = format!("{:?}", inputs(15, true));
        assert!(!shown.contains("it's"), "{shown}");
        assert!(shown.contains("password: \"<redacted>\""), "{shown}");
        assert!(shown.contains("replicator"), "{shown}");
    }
}
