use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;

/// The whole config file. Unknown keys are errors: a typo must never be
/// silently ignored in an HA manager.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Cluster name; all members of one cluster share it.
    pub scope: String,
    /// This member's name, unique in the cluster.
    pub name: String,
    #[serde(default = "default_namespace")]
    pub namespace: String,
    pub etcd: EtcdConfig,
    pub api: ApiConfig,
    pub postgresql: PostgresConfig,
    #[serde(default)]
    pub tags: Tags,
    #[serde(default)]
    pub bootstrap: BootstrapConfig,
    /// Where the file was read from; not part of the file.
    #[serde(skip)]
    pub source: PathBuf,
}

fn default_namespace() -> String {
    "/service".to_string()
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct EtcdConfig {
    pub endpoints: Vec<String>,
    /// Seconds to wait for a connection to etcd.
    #[serde(default = "default_dial_timeout")]
    pub dial_timeout: u64,
}

fn default_dial_timeout() -> u64 {
    2
}

/// `[api]`. Credentials and TLS files come in pairs: one without the other
/// is reported as the missing key (checked while parsing, see
/// [`RawApiConfig`]); whether the TLS files can be read and used is checked
/// when the agent starts its API. Debug output hides the password.
#[derive(Clone, Deserialize, Serialize)]
#[serde(try_from = "RawApiConfig")]
pub struct ApiConfig {
    pub listen: SocketAddr,
    /// host:port other members, HAProxy and the CLI use to reach this API.
    pub connect_address: Option<String>,
    /// HTTP basic credentials that mutating requests (switchover, restart,
    /// PATCH /config...) must carry. Without them such requests are refused.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
    /// PEM certificate (chain) and private key: the API serves HTTPS.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub certfile: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub keyfile: Option<PathBuf>,
    /// PEM CA certificate(s) the CLI trusts for members' HTTPS APIs
    /// (default: `certfile` itself, right for a shared or self-signed one).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cafile: Option<PathBuf>,
    /// Connections the API holds open at once; the agent lowers it at start
    /// when the open-file limit leaves less room (see `crate::fdlimit`).
    pub max_connections: usize,
}

/// `[api]` as written in the file, before the pairs are checked.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawApiConfig {
    listen: SocketAddr,
    connect_address: Option<String>,
    #[serde(default, deserialize_with = "non_empty")]
    username: Option<String>,
    #[serde(default, deserialize_with = "non_empty")]
    password: Option<String>,
    #[serde(default, deserialize_with = "non_empty_path")]
    certfile: Option<PathBuf>,
    #[serde(default, deserialize_with = "non_empty_path")]
    keyfile: Option<PathBuf>,
    #[serde(default, deserialize_with = "non_empty_path")]
    cafile: Option<PathBuf>,
    #[serde(default = "default_max_connections")]
    max_connections: usize,
}

/// Well below systemd's default soft limit of 1,024 descriptors, and far
/// above what HAProxy's checks, peers and operators need at once.
pub const DEFAULT_API_MAX_CONNECTIONS: usize = 256;

fn default_max_connections() -> usize {
    DEFAULT_API_MAX_CONNECTIONS
}

impl TryFrom<RawApiConfig> for ApiConfig {
    type Error = String;
    /// A pair with one half missing reads like serde's own "missing field"
    /// error, which the loader reports against the missing key itself
    /// (`api.password: required key is missing`).
    fn try_from(raw: RawApiConfig) -> Result<Self, String> {
        let missing = |key: &str| Err(format!("missing field `{key}`"));
        match (&raw.username, &raw.password) {
            (Some(_), None) => return missing("password"),
            (None, Some(_)) => return missing("username"),
            _ => {}
        }
        match (&raw.certfile, &raw.keyfile) {
            (Some(_), None) => return missing("keyfile"),
            (None, Some(_)) => return missing("certfile"),
            _ => {}
        }
        Ok(ApiConfig {
            listen: raw.listen,
            connect_address: raw.connect_address,
            username: raw.username,
            password: raw.password,
            certfile: raw.certfile,
            keyfile: raw.keyfile,
            cafile: raw.cafile,
            max_connections: raw.max_connections,
        })
    }
}

/// What Debug prints instead of a secret: configs end up in logs, panics
/// and test output, passwords must not.
pub(crate) const REDACTED: &str = "<redacted>";

impl std::fmt::Debug for ApiConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiConfig")
            .field("listen", &self.listen)
            .field("connect_address", &self.connect_address)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| REDACTED))
            .field("certfile", &self.certfile)
            .field("keyfile", &self.keyfile)
            .field("cafile", &self.cafile)
            .field("max_connections", &self.max_connections)
            .finish()
    }
}

impl std::fmt::Debug for RawApiConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RawApiConfig")
            .field("listen", &self.listen)
            .field("connect_address", &self.connect_address)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| REDACTED))
            .field("certfile", &self.certfile)
            .field("keyfile", &self.keyfile)
            .field("cafile", &self.cafile)
            .field("max_connections", &self.max_connections)
            .finish()
    }
}

fn non_empty<'de, D: serde::Deserializer<'de>>(de: D) -> Result<Option<String>, D::Error> {
    let s = String::deserialize(de)?;
    if s.is_empty() {
        return Err(serde::de::Error::custom("must not be empty"));
    }
    Ok(Some(s))
}

fn non_empty_path<'de, D: serde::Deserializer<'de>>(de: D) -> Result<Option<PathBuf>, D::Error> {
    let s = String::deserialize(de)?;
    if s.trim().is_empty() {
        return Err(serde::de::Error::custom("must not be empty"));
    }
    Ok(Some(PathBuf::from(s)))
}

impl ApiConfig {
    /// The configured basic credentials, when both are set.
    pub fn credentials(&self) -> Option<(&str, &str)> {
        self.username.as_deref().zip(self.password.as_deref())
    }

    /// The API serves HTTPS.
    pub fn tls(&self) -> bool {
        self.certfile.is_some() && self.keyfile.is_some()
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresConfig {
    pub data_dir: PathBuf,
    pub bin_dir: Option<PathBuf>,
    pub listen: SocketAddr,
    /// host:port clients and replicas use to reach this instance.
    pub connect_address: Option<String>,
    #[serde(default = "default_os_user")]
    pub os_user: String,
    #[serde(default)]
    pub parameters: BTreeMap<String, ParamValue>,
    #[serde(default = "default_pg_hba")]
    pub pg_hba: Vec<String>,
    pub authentication: Authentication,
    /// Seconds to wait for PostgreSQL to start before calling it failed.
    #[serde(default = "default_start_timeout")]
    pub start_timeout: u64,
    /// When pg_rewind fails, wipe the data directory and clone again
    /// (otherwise the member reports the failure and stays out of routing).
    #[serde(default)]
    pub remove_data_directory_on_rewind_failure: bool,
}

fn default_os_user() -> String {
    "postgres".to_string()
}

fn default_start_timeout() -> u64 {
    60
}

pub fn default_pg_hba() -> Vec<String> {
    [
        "local all all trust",
        "host all all 127.0.0.1/32 scram-sha-256",
        "host replication all 127.0.0.1/32 scram-sha-256",
        "host all all 0.0.0.0/0 scram-sha-256",
        "host replication all 0.0.0.0/0 scram-sha-256",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// A PostgreSQL parameter value as TOML can spell it.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum ParamValue {
    Bool(bool),
    Int(i64),
    Float(f64),
    Text(String),
}

/// Written by hand rather than derived (untagged) so that a wrong value, an
/// array say, is reported as "expected a string, integer, float or boolean"
/// rather than "data did not match any variant of untagged enum".
impl<'de> Deserialize<'de> for ParamValue {
    fn deserialize<D: serde::Deserializer<'de>>(de: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = ParamValue;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a string, integer, float or boolean")
            }
            fn visit_bool<E>(self, v: bool) -> Result<ParamValue, E> {
                Ok(ParamValue::Bool(v))
            }
            fn visit_i64<E>(self, v: i64) -> Result<ParamValue, E> {
                Ok(ParamValue::Int(v))
            }
            fn visit_u64<E>(self, v: u64) -> Result<ParamValue, E> {
                Ok(i64::try_from(v)
                    .map(ParamValue::Int)
                    .unwrap_or(ParamValue::Float(v as f64)))
            }
            fn visit_f64<E>(self, v: f64) -> Result<ParamValue, E> {
                Ok(ParamValue::Float(v))
            }
            fn visit_str<E>(self, v: &str) -> Result<ParamValue, E> {
                Ok(ParamValue::Text(v.to_string()))
            }
            fn visit_string<E>(self, v: String) -> Result<ParamValue, E> {
                Ok(ParamValue::Text(v))
            }
        }
        de.deserialize_any(Visitor)
    }
}

impl ParamValue {
    /// The value as it goes into postgresql.conf.
    pub fn render(&self) -> String {
        match self {
            ParamValue::Bool(b) => if *b { "on" } else { "off" }.to_string(),
            ParamValue::Int(i) => i.to_string(),
            ParamValue::Float(f) => f.to_string(),
            ParamValue::Text(s) => format!("'{}'", s.replace('\\', "\\\\").replace('\'', "''")),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Authentication {
    pub superuser: Credentials,
    pub replication: Credentials,
}

/// Debug output hides the password.
#[derive(Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Tags {
    #[serde(default)]
    pub nofailover: bool,
    #[serde(default)]
    pub noloadbalance: bool,
    /// Never chosen as a synchronous standby. Written only when set, so that
    /// agents that do not know the tag still read the member key.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub nosync: bool,
    /// Higher wins a tie between equally advanced failover candidates.
    #[serde(default = "default_failover_priority")]
    pub failover_priority: u32,
    /// Free-form tags, matched by `/replica?tag_KEY=VALUE`.
    #[serde(default)]
    pub custom: BTreeMap<String, String>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .field("password", &REDACTED)
            .finish()
    }
}

fn default_failover_priority() -> u32 {
    1
}

/// By hand, not derived: a file without a `[tags]` table must get the same
/// failover_priority (1) as one with an empty `[tags]` table.
impl Default for Tags {
    fn default() -> Self {
        Tags {
            nofailover: false,
            noloadbalance: false,
            nosync: false,
            failover_priority: default_failover_priority(),
            custom: BTreeMap::new(),
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BootstrapConfig {
    /// Initial value of the dynamic cluster config stored in etcd `config`.
    #[serde(default)]
    pub dcs: DynamicConfig,
}

/// The cluster-wide settings that live in etcd `config`. The file only seeds
/// them at bootstrap; afterwards etcd is the source of truth.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DynamicConfig {
    #[serde(default = "default_ttl")]
    pub ttl: u64,
    #[serde(default = "default_loop_wait")]
    pub loop_wait: u64,
    #[serde(default = "default_retry_timeout")]
    pub retry_timeout: u64,
    #[serde(default = "default_max_lag")]
    pub maximum_lag_on_failover: u64,
    #[serde(default = "default_true")]
    pub use_slots: bool,
    #[serde(default = "default_true")]
    pub use_pg_rewind: bool,
    /// Seconds a member may be gone before the leader drops its slot.
    #[serde(default = "default_member_slots_ttl")]
    pub member_slots_ttl: u64,
    /// Seconds a leader whose PostgreSQL went down may spend restarting it
    /// before it releases the lease to a replica.
    #[serde(default = "default_primary_start_timeout")]
    pub primary_start_timeout: u64,
    /// Rule 4: the leader names synchronous standbys in PostgreSQL's
    /// `synchronous_standby_names` and in `sync`; after a failure only a
    /// member listed there may take the lease.
    #[serde(default)]
    pub synchronous_mode: bool,
    /// With no synchronous standby available, commits wait (`'*'`) rather
    /// than run unprotected.
    #[serde(default)]
    pub synchronous_mode_strict: bool,
    /// How many synchronous standbys every commit waits for.
    #[serde(default = "default_synchronous_node_count")]
    pub synchronous_node_count: u32,
    /// While etcd is unreachable, a primary whose every last-known member
    /// confirms over its API that it cannot reach etcd either keeps
    /// running (Patroni's `failsafe_mode`); otherwise it stops as usual.
    #[serde(default)]
    pub failsafe_mode: bool,
    /// Maintenance mode: agents observe but act only on operator requests.
    #[serde(default)]
    pub pause: bool,
    #[serde(default)]
    pub postgresql: DynamicPostgres,
}

fn default_synchronous_node_count() -> u32 {
    1
}

fn default_primary_start_timeout() -> u64 {
    10
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DynamicPostgres {
    #[serde(default)]
    pub parameters: BTreeMap<String, ParamValue>,
}

fn default_ttl() -> u64 {
    10
}
fn default_loop_wait() -> u64 {
    1
}
fn default_retry_timeout() -> u64 {
    4
}
fn default_max_lag() -> u64 {
    1024 * 1024
}
fn default_true() -> bool {
    true
}
fn default_member_slots_ttl() -> u64 {
    1800
}

impl Default for DynamicConfig {
    fn default() -> Self {
        DynamicConfig {
            ttl: default_ttl(),
            loop_wait: default_loop_wait(),
            retry_timeout: default_retry_timeout(),
            maximum_lag_on_failover: default_max_lag(),
            use_slots: true,
            use_pg_rewind: true,
            member_slots_ttl: default_member_slots_ttl(),
            primary_start_timeout: default_primary_start_timeout(),
            synchronous_mode: false,
            synchronous_mode_strict: false,
            synchronous_node_count: default_synchronous_node_count(),
            failsafe_mode: false,
            pause: false,
            postgresql: DynamicPostgres::default(),
        }
    }
}

impl DynamicConfig {
    /// The lease rule of DESIGN.md: a leader must be able to miss renewals
    /// for `retry_timeout` twice and still step down before its lease ends.
    pub fn check_timing(&self) -> Result<(), (&'static str, String)> {
        if self.loop_wait == 0 {
            return Err(("loop_wait", "must be at least 1 second".into()));
        }
        if self.synchronous_node_count == 0 {
            return Err((
                "synchronous_node_count",
                "must be at least 1 (turn synchronous_mode off for asynchronous replication)"
                    .into(),
            ));
        }
        if self.retry_timeout == 0 {
            return Err(("retry_timeout", "must be at least 1 second".into()));
        }
        // In u128: absurd values must be rejected, not overflow.
        let min = u128::from(self.loop_wait) + 2 * u128::from(self.retry_timeout);
        if u128::from(self.ttl) < min {
            return Err((
                "ttl",
                format!(
                    "ttl ({}) must be >= loop_wait + 2 * retry_timeout ({} + 2 * {} = {min})",
                    self.ttl, self.loop_wait, self.retry_timeout
                ),
            ));
        }
        Ok(())
    }
}

impl Config {
    /// The URL this member's API is reached at (`https://` with TLS).
    pub fn api_url(&self) -> String {
        let scheme = if self.api.tls() { "https" } else { "http" };
        format!("{scheme}://{}", self.api_connect_address())
    }

    pub fn api_connect_address(&self) -> String {
        self.api
            .connect_address
            .clone()
            .unwrap_or_else(|| connectable(self.api.listen))
    }

    pub fn pg_connect_address(&self) -> String {
        self.postgresql
            .connect_address
            .clone()
            .unwrap_or_else(|| connectable(self.postgresql.listen))
    }

    /// Prefix of every key of this cluster in etcd, with a trailing slash.
    pub fn key_prefix(&self) -> String {
        crate::dcs::cluster_prefix(&self.namespace, &self.scope)
    }
}

/// A listen address turned into one peers can dial: a wildcard listen becomes
/// loopback, which is only right for single-host setups; multi-host setups set
/// connect_address. IPv6 addresses come out bracketed (`[::1]:8008`).
fn connectable(addr: SocketAddr) -> String {
    if addr.ip().is_unspecified() {
        format!("127.0.0.1:{}", addr.port())
    } else {
        addr.to_string()
    }
}
