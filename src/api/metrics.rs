//! `/metrics` in the Prometheus text exposition format (version 0.0.4).

use super::views::leader_lease_valid;
use super::ApiSnapshot;
use axum::http::header::CONTENT_TYPE;
use axum::response::{IntoResponse, Response};
use std::fmt::{Display, Write};
use std::time::Instant;

pub(crate) const CONTENT_TYPE_TEXT: &str = "text/plain; version=0.0.4";

pub(crate) fn metrics(snap: &ApiSnapshot, now: Instant) -> Response {
    ([(CONTENT_TYPE, CONTENT_TYPE_TEXT)], render(snap, now)).into_response()
}

pub(crate) fn render(snap: &ApiSnapshot, now: Instant) -> String {
    let m = &snap.member;
    let mut out = String::with_capacity(3072);
    let labels = format!("name=\"{}\"", escape(&m.name));
    let flag = |b: bool| u8::from(b);

    sample(
        &mut out,
        "pgwarden_info",
        "Constant 1; labels carry the member's published role, state and version.",
        &format!(
            "{labels},role=\"{}\",state=\"{}\",version=\"{}\"",
            m.role.as_str(),
            m.state.as_str(),
            escape(&m.version)
        ),
        Some(1),
    );
    let gauges: [(&str, &str, Option<u64>); 15] = [
        (
            "pgwarden_primary",
            "1 if this member holds an unexpired leader lease and PostgreSQL is writable.",
            Some(flag(snap.is_primary(now)).into()),
        ),
        (
            "pgwarden_replica",
            "1 if PostgreSQL runs in recovery.",
            Some(flag(snap.pg_running && snap.in_recovery).into()),
        ),
        (
            "pgwarden_sync_standby",
            "1 if this member is listed as a synchronous standby.",
            Some(flag(snap.is_sync).into()),
        ),
        (
            "pgwarden_sync_fallback",
            "1 if this member leads in synchronous_mode with no synchronous standby and commits run unprotected (not strict).",
            Some(
                flag(
                    snap.holds_leader_key
                        && snap.cluster.as_ref().is_some_and(|c| {
                            crate::ha::replication_mode(c) == crate::ha::ReplicationMode::Fallback
                        }),
                )
                .into(),
            ),
        ),
        (
            "pgwarden_postgres_running",
            "1 if PostgreSQL accepts connections.",
            Some(flag(snap.pg_running).into()),
        ),
        (
            "pgwarden_postgres_streaming",
            "1 if the WAL receiver is streaming from an upstream.",
            Some(flag(snap.streaming).into()),
        ),
        (
            "pgwarden_timeline",
            "PostgreSQL timeline.",
            m.timeline.map(u64::from),
        ),
        (
            "pgwarden_wal_lsn_bytes",
            "Primary: current write position; replica: last replayed position.",
            m.wal_lsn,
        ),
        (
            "pgwarden_receive_lsn_bytes",
            "Replica: last WAL position received.",
            m.receive_lsn,
        ),
        (
            "pgwarden_replication_lag_bytes",
            "Bytes this member is behind the leader's last published position.",
            snap.lag_bytes,
        ),
        (
            "pgwarden_holds_leader_key",
            "1 if the etcd leader key names this member.",
            Some(flag(snap.holds_leader_key).into()),
        ),
        (
            "pgwarden_leader_lease_valid",
            "1 if this member holds the leader key and its lease cannot have expired.",
            Some(flag(leader_lease_valid(snap, now)).into()),
        ),
        (
            "pgwarden_cluster_paused",
            "1 if the cluster is in maintenance mode.",
            Some(flag(snap.is_paused()).into()),
        ),
        (
            "pgwarden_cluster_unlocked",
            "1 if no member holds the leader key.",
            snap.cluster
                .as_ref()
                .map(|c| flag(c.leader.is_none()).into()),
        ),
        (
            "pgwarden_nofailover",
            "1 if this member is tagged nofailover.",
            Some(flag(m.tags.nofailover).into()),
        ),
    ];
    for (name, help, value) in gauges {
        sample(&mut out, name, help, &labels, value);
    }
    sample(
        &mut out,
        "pgwarden_cluster_members",
        "Members registered in etcd.",
        &labels,
        snap.cluster.as_ref().map(|c| c.members.len()),
    );
    sample(
        &mut out,
        "pgwarden_dcs_problems",
        "etcd keys the last cluster read could not decode (see /status dcs_problems).",
        &labels,
        snap.cluster.as_ref().map(|c| c.problems.len()),
    );
    sample(
        &mut out,
        "pgwarden_data_dir_free_bytes",
        "Bytes available to PostgreSQL on the data directory's file system (absent: unknown).",
        &labels,
        snap.data_dir_free_bytes,
    );
    sample(
        &mut out,
        "pgwarden_wal_dir_free_bytes",
        "Bytes available to PostgreSQL on the WAL directory's file system (absent: unknown).",
        &labels,
        snap.wal_dir_free_bytes,
    );
    sample(
        &mut out,
        "pgwarden_failover_candidate",
        "1 if this member would take the leader lease in an election now (not nofailover, disk not full, no recent failed promotion).",
        &labels,
        Some(flag(snap.failover_candidate)),
    );
    sample(
        &mut out,
        "pgwarden_loop_age_seconds",
        "Seconds since the agent's loop last completed.",
        &labels,
        Some(now.saturating_duration_since(snap.last_loop).as_secs_f64()),
    );
    out
}

/// HELP and TYPE are written even when the value is unknown, so dashboards
/// see a gap rather than a metric that vanishes from the catalogue.
fn sample(out: &mut String, name: &str, help: &str, labels: &str, value: Option<impl Display>) {
    // Writing into a String cannot fail; the fmt::Result carries nothing.
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} gauge");
    if let Some(value) = value {
        let _ = writeln!(out, "{name}{{{labels}}} {value}");
    }
}

fn escape(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
        assert_eq!(escape("pg-1"), "pg-1");
    }
}
