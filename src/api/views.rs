//! JSON views of the snapshot: the member status every health check returns,
//! `/status`, `/cluster`, `/history`, `/config`, and the error bodies.

use super::ApiSnapshot;
use crate::config::DynamicConfig;
use crate::dcs::{FailoverRequest, Initialize, MemberStatus};
use axum::http::header::ETAG;
use axum::http::{HeaderValue, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;
use std::time::Instant;

/// This member as the API reports it: the published status plus what only
/// the local agent knows, so a 503 can be understood from its own body.
#[derive(Debug, Serialize)]
pub(crate) struct StatusBody<'a> {
    #[serde(flatten)]
    member: &'a MemberStatus,
    /// What `/primary` answers right now (lease held, unexpired, writable).
    primary: bool,
    holds_leader_key: bool,
    /// The leader key is ours and our lease cannot have expired yet.
    leader_lease_valid: bool,
    paused: bool,
    pg_running: bool,
    in_recovery: bool,
    streaming: bool,
    is_sync: bool,
    /// How the leader's commits are protected (`ha::replication_mode`):
    /// "asynchronous", "synchronous (m2)", or a fallback or strict wait.
    #[serde(skip_serializing_if = "Option::is_none")]
    replication_mode: Option<String>,
    lag_bytes: Option<u64>,
    loop_age_seconds: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    postmaster_start: Option<&'a str>,
    /// Named as in Patroni's `/patroni`.
    #[serde(skip_serializing_if = "Option::is_none")]
    database_system_identifier: Option<&'a str>,
    /// etcd keys the last cluster read could not decode (see
    /// `ClusterView::problems`); empty when all is well.
    dcs_problems: &'a [String],
    /// Free space for the data and WAL directories (null: unknown).
    data_dir_free_bytes: Option<u64>,
    wal_dir_free_bytes: Option<u64>,
    /// This member would take the leader lease in an election now
    /// (`ApiSnapshot::failover_candidate`).
    failover_candidate: bool,
    /// `ApiSnapshot::resumes_on`.
    #[serde(skip_serializing_if = "Option::is_none")]
    resumes_primary_on_timeline: Option<u32>,
}

impl<'a> StatusBody<'a> {
    pub(crate) fn new(snap: &'a ApiSnapshot, now: Instant) -> Self {
        StatusBody {
            member: &snap.member,
            primary: snap.is_primary(now),
            holds_leader_key: snap.holds_leader_key,
            leader_lease_valid: leader_lease_valid(snap, now),
            paused: snap.is_paused(),
            pg_running: snap.pg_running,
            in_recovery: snap.in_recovery,
            streaming: snap.streaming,
            is_sync: snap.is_sync,
            replication_mode: snap
                .cluster
                .as_ref()
                .map(|c| crate::ha::replication_mode(c).to_string()),
            lag_bytes: snap.lag_bytes,
            loop_age_seconds: now.saturating_duration_since(snap.last_loop).as_secs_f64(),
            postmaster_start: snap.postmaster_start.as_deref(),
            database_system_identifier: snap.system_id.as_deref(),
            dcs_problems: dcs_problems(snap),
            data_dir_free_bytes: snap.data_dir_free_bytes,
            wal_dir_free_bytes: snap.wal_dir_free_bytes,
            failover_candidate: snap.failover_candidate,
            resumes_primary_on_timeline: snap.resumes_on,
        }
    }
}

pub(crate) fn dcs_problems(snap: &ApiSnapshot) -> &[String] {
    snap.cluster.as_ref().map_or(&[], |c| c.problems.as_slice())
}

pub(crate) fn leader_lease_valid(snap: &ApiSnapshot, now: Instant) -> bool {
    snap.holds_leader_key && snap.lease_valid_until.is_some_and(|t| now < t)
}

#[derive(Debug, Serialize)]
struct ErrorBody<'a> {
    error: &'a str,
}

pub(crate) fn error_response(code: StatusCode, reason: impl AsRef<str>) -> Response {
    (
        code,
        Json(ErrorBody {
            error: reason.as_ref(),
        }),
    )
        .into_response()
}

pub(crate) fn status(snap: &ApiSnapshot, now: Instant) -> Response {
    Json(StatusBody::new(snap, now)).into_response()
}

#[derive(Debug, Serialize)]
struct ClusterMember<'a> {
    #[serde(flatten)]
    member: &'a MemberStatus,
    /// Bytes behind the leader's published position; null without a leader
    /// or without positions.
    lag_bytes: Option<u64>,
}

#[derive(Debug, Serialize)]
struct ClusterBody<'a> {
    members: Vec<ClusterMember<'a>>,
    leader: Option<&'a str>,
    config: Option<&'a DynamicConfig>,
    paused: bool,
    /// A pending switchover or failover request (null: none).
    failover: Option<&'a FailoverRequest>,
    /// The cluster's system identifier; "" while a bootstrap is claimed but
    /// unfinished; null before anyone claimed it (or before the first read).
    initialize: Option<&'a str>,
    /// etcd keys the last cluster read could not decode.
    dcs_problems: &'a [String],
}

pub(crate) fn cluster(snap: &ApiSnapshot, _now: Instant) -> Response {
    let body = match &snap.cluster {
        None => ClusterBody {
            members: Vec::new(),
            leader: None,
            config: None,
            paused: snap.is_paused(),
            failover: None,
            initialize: None,
            dcs_problems: &[],
        },
        Some(view) => {
            let leader_lsn = view.leader_member().and_then(|m| m.wal_lsn);
            ClusterBody {
                members: view
                    .members
                    .iter()
                    .map(|m| ClusterMember {
                        member: m,
                        // A member ahead of the leader has diverged, not
                        // caught up; saturating keeps it from wrapping.
                        lag_bytes: leader_lsn
                            .zip(m.wal_lsn)
                            .map(|(l, own)| l.saturating_sub(own)),
                    })
                    .collect(),
                leader: view.leader.as_deref(),
                config: Some(&view.config),
                paused: snap.is_paused(),
                failover: view.failover.as_ref(),
                initialize: match &view.initialize {
                    Initialize::Absent => None,
                    Initialize::Claimed => Some(""),
                    Initialize::SystemId(id) => Some(id.as_str()),
                },
                dcs_problems: &view.problems,
            }
        }
    };
    Json(body).into_response()
}

pub(crate) fn history(snap: &ApiSnapshot, _now: Instant) -> Response {
    match &snap.cluster {
        Some(view) => Json(&view.history).into_response(),
        None => Json([(); 0]).into_response(),
    }
}

/// The dynamic config, with its etcd revision as the ETag (send it back in
/// `If-Match` to PATCH only that revision).
pub(crate) fn config(snap: &ApiSnapshot, _now: Instant) -> Response {
    match &snap.cluster {
        Some(view) => {
            let mut resp = Json(&view.config).into_response();
            if let Ok(tag) = HeaderValue::from_str(&format!("\"{}\"", view.config_revision)) {
                resp.headers_mut().insert(ETAG, tag);
            }
            resp
        }
        // Every DynamicConfig field has a default, so an empty object would
        // read as a valid all-defaults config; refuse rather than mislead.
        None => error_response(
            StatusCode::SERVICE_UNAVAILABLE,
            "cluster config not read from etcd yet",
        ),
    }
}

pub(crate) async fn not_found(uri: Uri) -> Response {
    error_response(
        StatusCode::NOT_FOUND,
        format!("no such endpoint: {}", uri.path()),
    )
}

pub(crate) async fn method_not_allowed() -> Response {
    error_response(
        StatusCode::METHOD_NOT_ALLOWED,
        "method not allowed on this endpoint",
    )
}
