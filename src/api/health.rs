//! Health checks probed by HAProxy and orchestrators. Each answers 200 or 503
//! (400 for a malformed query) with this member's status JSON, decided from
//! the snapshot alone.

use super::views::{error_response, StatusBody};
use super::ApiSnapshot;
use crate::config::Tags;
use axum::extract::Query;
use axum::http::{StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Json;
use std::time::Instant;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Check {
    Primary,
    Replica,
    ReadOnly,
    Sync,
    Async,
    Health,
    Liveness,
    Readiness,
}

/// Every health path of the DESIGN.md contract and the check behind it.
pub(crate) const ROUTES: &[(&str, Check)] = &[
    ("/", Check::Primary),
    ("/primary", Check::Primary),
    ("/leader", Check::Primary),
    ("/read-write", Check::Primary),
    ("/replica", Check::Replica),
    ("/read-only", Check::ReadOnly),
    ("/sync", Check::Sync),
    ("/async", Check::Async),
    ("/health", Check::Health),
    ("/liveness", Check::Liveness),
    ("/readiness", Check::Readiness),
];

/// The query parameters a replica-style check honours.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Filters {
    /// `?lag=`: the most a replica may be behind (the smallest if repeated).
    pub max_lag: Option<u64>,
    /// `?tag_KEY=VALUE`: every pair must match this member's tags.
    pub tags: Vec<(String, String)>,
}

impl Filters {
    pub(crate) fn from_uri(uri: &Uri) -> Result<Filters, String> {
        if uri.query().is_none() {
            return Ok(Filters::default());
        }
        let Query(pairs) = Query::<Vec<(String, String)>>::try_from_uri(uri)
            .map_err(|e| format!("malformed query string: {}", e.body_text()))?;
        let mut filters = Filters::default();
        for (key, value) in pairs {
            if key == "lag" {
                let lag = parse_size(&value).map_err(|e| format!("invalid lag {value:?}: {e}"))?;
                filters.max_lag = Some(filters.max_lag.map_or(lag, |m| m.min(lag)));
            } else if let Some(tag) = key.strip_prefix("tag_") {
                filters.tags.push((tag.to_string(), value));
            }
            // Other parameters are ignored, as Patroni does, so that a
            // load balancer adding its own cannot turn checks into 400s.
        }
        Ok(filters)
    }
}

/// A byte count as PostgreSQL spells memory sizes: `16MB`, `1 GB`, `512kB`,
/// `100B` or plain bytes. Units are powers of 1024 and case-insensitive.
pub(crate) fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    if digits.is_empty() {
        return Err(
            "expected a whole number of bytes, optionally followed by B, kB, MB, GB or TB".into(),
        );
    }
    let number: u64 = digits.parse().map_err(|_| "number too large".to_string())?;
    let unit = unit.trim();
    let multiplier: u64 = if unit.is_empty() || unit.eq_ignore_ascii_case("b") {
        1
    } else if unit.eq_ignore_ascii_case("kb") {
        1 << 10
    } else if unit.eq_ignore_ascii_case("mb") {
        1 << 20
    } else if unit.eq_ignore_ascii_case("gb") {
        1 << 30
    } else if unit.eq_ignore_ascii_case("tb") {
        1 << 40
    } else {
        return Err(format!("unknown unit {unit:?} (use B, kB, MB, GB or TB)"));
    };
    number
        .checked_mul(multiplier)
        .ok_or_else(|| "number too large".to_string())
}

impl Check {
    fn uses_filters(self) -> bool {
        matches!(
            self,
            Check::Replica | Check::ReadOnly | Check::Sync | Check::Async | Check::Readiness
        )
    }

    pub(crate) fn passes(self, snap: &ApiSnapshot, filters: &Filters, now: Instant) -> bool {
        match self {
            Check::Primary => snap.is_primary(now),
            Check::Replica => replica(snap, filters),
            Check::ReadOnly => snap.is_primary(now) || replica(snap, filters),
            Check::Sync => replica(snap, filters) && snap.is_sync,
            Check::Async => replica(snap, filters) && !snap.is_sync,
            Check::Health => snap.pg_running,
            // A loop stuck longer than ttl can no longer be holding a valid
            // lease, so the agent is as good as dead.
            Check::Liveness => now.saturating_duration_since(snap.last_loop) <= snap.ttl,
            Check::Readiness => {
                let limit = filters.max_lag.or_else(|| {
                    snap.cluster
                        .as_ref()
                        .map(|c| c.config.maximum_lag_on_failover)
                });
                snap.is_primary(now) || (replicating(snap) && within(snap.lag_bytes, limit))
            }
        }
    }
}

fn replicating(snap: &ApiSnapshot) -> bool {
    snap.pg_running && snap.in_recovery && snap.streaming
}

fn replica(snap: &ApiSnapshot, filters: &Filters) -> bool {
    replicating(snap)
        && !snap.member.tags.noloadbalance
        && within(snap.lag_bytes, filters.max_lag)
        && filters
            .tags
            .iter()
            .all(|(k, v)| tag_matches(&snap.member.tags, k, v))
}

/// An unknown lag never satisfies a limit: a replica that cannot tell how far
/// behind it is must not be trusted with reads that asked for freshness.
fn within(lag: Option<u64>, limit: Option<u64>) -> bool {
    match limit {
        None => true,
        Some(limit) => lag.is_some_and(|lag| lag <= limit),
    }
}

fn tag_matches(tags: &Tags, key: &str, want: &str) -> bool {
    let bool_str = |b: bool| if b { "true" } else { "false" };
    match key {
        "nofailover" => want == bool_str(tags.nofailover),
        "noloadbalance" => want == bool_str(tags.noloadbalance),
        "failover_priority" => want
            .parse::<u32>()
            .is_ok_and(|p| p == tags.failover_priority),
        _ => tags.custom.get(key).is_some_and(|v| v == want),
    }
}

pub(crate) fn respond(snap: &ApiSnapshot, check: Check, uri: &Uri, now: Instant) -> Response {
    // Checks that take no parameters ignore the query, so a stray parameter
    // can never take the primary out of HAProxy's rotation.
    let filters = if check.uses_filters() {
        match Filters::from_uri(uri) {
            Ok(f) => f,
            Err(reason) => return error_response(StatusCode::BAD_REQUEST, reason),
        }
    } else {
        Filters::default()
    };
    let code = if check.passes(snap, &filters, now) {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(StatusBody::new(snap, now))).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        let ok: &[(&str, u64)] = &[
            ("0", 0),
            ("1024", 1024),
            ("100B", 100),
            ("100b", 100),
            ("1kB", 1024),
            ("1KB", 1024),
            ("16MB", 16 << 20),
            ("16 MB", 16 << 20),
            ("16mb", 16 << 20),
            (" 2GB ", 2 << 30),
            ("1TB", 1 << 40),
        ];
        for (text, want) in ok {
            assert_eq!(parse_size(text), Ok(*want), "{text}");
        }
        for bad in [
            "",
            "MB",
            "-1",
            "1.5MB",
            "16XB",
            "abc",
            "16 M B",
            "99999999999999999999",
            "17179869184GB",
        ] {
            assert!(parse_size(bad).is_err(), "{bad:?} should be rejected");
        }
    }

    #[test]
    fn filters_from_query() {
        let uri: Uri = "/replica?lag=1MB&tag_dc=eu%20west&lag=2kB&other=x&tag_nofailover=false"
            .parse()
            .unwrap();
        let f = Filters::from_uri(&uri).unwrap();
        assert_eq!(f.max_lag, Some(2048));
        assert_eq!(
            f.tags,
            vec![
                ("dc".to_string(), "eu west".to_string()),
                ("nofailover".to_string(), "false".to_string())
            ]
        );
        let none: Uri = "/replica".parse().unwrap();
        assert_eq!(Filters::from_uri(&none).unwrap(), Filters::default());
        let bad: Uri = "/replica?lag=lots".parse().unwrap();
        assert!(Filters::from_uri(&bad).unwrap_err().contains("lots"));
    }

    #[test]
    fn tags() {
        let mut tags = Tags {
            failover_priority: 3,
            ..Tags::default()
        };
        tags.custom.insert("dc".into(), "east".into());
        let table: &[(&str, &str, bool)] = &[
            ("dc", "east", true),
            ("dc", "west", false),
            ("rack", "1", false),
            ("nofailover", "false", true),
            ("nofailover", "true", false),
            ("noloadbalance", "false", true),
            ("failover_priority", "3", true),
            ("failover_priority", "1", false),
            ("failover_priority", "x", false),
        ];
        for (k, v, want) in table {
            assert_eq!(tag_matches(&tags, k, v), *want, "{k}={v}");
        }
    }
}
