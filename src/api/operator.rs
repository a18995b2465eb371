//! The mutating endpoints: switchover and failover requests, PATCH/PUT
//! /config, and requests to this member's agent (restart, reinitialize,
//! reload). Each checks credentials first, then the body, then the cluster,
//! and writes at most one etcd transaction: a refused request changes
//! nothing.
//!
//! Unlike the health checks these handlers may do etcd I/O, through one
//! connection the API opens lazily and drops on error (reopened by the next
//! request).

// A Response is the natural error of a handler step; it is built once per
// request, so its size does not matter.
#![allow(clippy::result_large_err)]

use super::auth::{self, Credentials};
use super::requests::{
    self, check_failover, check_switchover, parse_body, patch_config, validate_config, EmptyBody,
    FailoverBody, Refusal, SwitchoverBody, CONFIG_CONFLICT,
};
use super::views::error_response;
use super::SharedState;
use crate::config::{Config, ConfigError, DynamicConfig};
use crate::dcs::{CancelOutcome, Dcs, DcsError, Keys, LeaderOutcome};
use axum::body::{Body, Bytes};
use axum::extract::{FromRef, State};
use axum::http::header::{CONTENT_LENGTH, ETAG, IF_MATCH};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

/// Largest request body accepted (413 above).
pub const BODY_LIMIT: usize = 64 * 1024;

/// An operator's request to this member's agent, carried from the API to
/// the agent's loop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MemberCommand {
    /// Restart PostgreSQL (in place, same role).
    Restart,
    /// Wipe the data directory and clone it again from the leader.
    Reinit,
    /// Reload PostgreSQL's configuration (SIGHUP).
    Reload,
    /// Failsafe mode: we confirmed `leader` as the primary while neither of
    /// us reaches etcd (`POST /failsafe`, sent by that primary's agent).
    Failsafe { leader: String, ttl: u64 },
}

impl MemberCommand {
    pub fn as_str(&self) -> &'static str {
        match self {
            MemberCommand::Restart => "restart",
            MemberCommand::Reinit => "reinitialize",
            MemberCommand::Reload => "reload",
            MemberCommand::Failsafe { .. } => "failsafe",
        }
    }
}

/// What the API needs beyond the snapshot: who may mutate, HTTPS, and how
/// to reach etcd. Built from the config file when the agent starts.
#[derive(Debug, Clone)]
pub struct ApiOptions {
    pub(crate) scope: String,
    pub(crate) credentials: Option<Credentials>,
    pub(crate) tls: Option<Arc<rustls::ServerConfig>>,
    pub(crate) etcd_endpoints: Vec<String>,
    pub(crate) keys: Keys,
    pub(crate) etcd_timeout: Duration,
    /// The member's bootstrap config: the base of a PATCH before the
    /// cluster stored one.
    pub(crate) defaults: DynamicConfig,
    /// Connections the API holds open at once (`api.max_connections`,
    /// lowered to what the open-file limit leaves).
    pub(crate) max_connections: usize,
    /// Where a failsafe confirmation is recorded before it is given
    /// (`failsafe_promise`); None: kept in memory only (tests).
    pub(crate) failsafe_promise: Option<std::path::PathBuf>,
}

impl ApiOptions {
    /// Reads and checks the TLS files: every problem is a config error
    /// naming `api.certfile` or `api.keyfile`.
    pub fn from_config(cfg: &Config) -> Result<ApiOptions, ConfigError> {
        let tls = match (&cfg.api.certfile, &cfg.api.keyfile) {
            (Some(cert), Some(key)) => Some(super::tls::server_config(&cfg.source, cert, key)?),
            _ => None,
        };
        Ok(ApiOptions {
            scope: cfg.scope.clone(),
            credentials: cfg.api.credentials().map(|(u, p)| Credentials::new(u, p)),
            tls,
            etcd_endpoints: cfg.etcd.endpoints.clone(),
            keys: Keys::new(cfg.key_prefix()),
            etcd_timeout: Duration::from_secs(cfg.etcd.dial_timeout.max(1)),
            defaults: cfg.bootstrap.dcs.clone(),
            max_connections: connection_budget(cfg.api.max_connections),
            failsafe_promise: Some(crate::failsafe_promise::path_for(&cfg.postgresql.data_dir)),
        })
    }

    /// Options for a cluster reached at `etcd_endpoints`, without TLS.
    pub fn new(
        scope: &str,
        prefix: String,
        etcd_endpoints: Vec<String>,
        credentials: Option<(&str, &str)>,
    ) -> ApiOptions {
        ApiOptions {
            scope: scope.to_string(),
            credentials: credentials.map(|(u, p)| Credentials::new(u, p)),
            tls: None,
            etcd_endpoints,
            keys: Keys::new(prefix),
            etcd_timeout: Duration::from_secs(2),
            defaults: DynamicConfig::default(),
            max_connections: crate::config::DEFAULT_API_MAX_CONNECTIONS,
            failsafe_promise: None,
        }
    }
}

/// `api.max_connections`, lowered (with a warning) so that the API's
/// connections and the HA loop's reserve fit in the open-file limit.
fn connection_budget(configured: usize) -> usize {
    let soft = crate::fdlimit::soft_nofile();
    let allowed = crate::fdlimit::api_connections(configured, soft);
    if allowed < configured {
        tracing::warn!(
            "api.max_connections = {configured} lowered to {allowed}: the open-file limit is {} and {} descriptors are kept for etcd, PostgreSQL and the programs the agent runs (raise the hard limit, e.g. LimitNOFILE= in the systemd unit, to allow more)",
            soft.unwrap_or(0),
            crate::fdlimit::RESERVED
        );
    }
    allowed
}

/// The router's state: the loop's snapshot plus the operator side.
#[derive(Clone)]
pub(crate) struct AppState {
    pub(crate) snapshot: SharedState,
    pub(crate) ops: Arc<Ops>,
}

impl FromRef<AppState> for SharedState {
    fn from_ref(state: &AppState) -> SharedState {
        state.snapshot.clone()
    }
}

pub(crate) struct Ops {
    pub(crate) options: ApiOptions,
    commands: mpsc::Sender<MemberCommand>,
    dcs: tokio::sync::Mutex<Option<Dcs>>,
}

impl Ops {
    pub(crate) fn new(options: ApiOptions, commands: mpsc::Sender<MemberCommand>) -> Self {
        Ops {
            options,
            commands,
            dcs: tokio::sync::Mutex::new(None),
        }
    }

    /// Runs `f` on the API's etcd connection (opened if needed). On an etcd
    /// error the connection is dropped so the next request reconnects.
    /// Requests are serialized on the connection, which also keeps two
    /// operators' requests to this member from interleaving.
    async fn with_dcs<T>(
        &self,
        f: impl AsyncFnOnce(&mut Dcs) -> Result<T, DcsError>,
    ) -> Result<T, Response> {
        let mut guard = self.dcs.lock().await;
        if guard.is_none() {
            let o = &self.options;
            match Dcs::connect(&o.etcd_endpoints, o.keys.clone(), o.etcd_timeout).await {
                Ok(d) => *guard = Some(d),
                Err(e) => return Err(etcd_unavailable(&e)),
            }
        }
        let Some(dcs) = guard.as_mut() else {
            return Err(error_response(
                StatusCode::SERVICE_UNAVAILABLE,
                "etcd unavailable",
            ));
        };
        match f(dcs).await {
            Ok(v) => Ok(v),
            Err(e) => {
                *guard = None;
                Err(etcd_unavailable(&e))
            }
        }
    }
}

fn etcd_unavailable(e: &DcsError) -> Response {
    error_response(
        StatusCode::SERVICE_UNAVAILABLE,
        format!("etcd unavailable, nothing changed: {e}"),
    )
}

fn refuse(r: Refusal) -> Response {
    error_response(r.status, r.message)
}

/// Credentials, then the body (at most [`BODY_LIMIT`] bytes).
async fn admit(ops: &Ops, headers: &HeaderMap, body: Body) -> Result<Bytes, Response> {
    auth::authorize(ops.options.credentials.as_ref(), headers)?;
    read_body(headers, body).await
}

/// The request body, within BODY_LIMIT and BODY_TIMEOUT.
async fn read_body(headers: &HeaderMap, body: Body) -> Result<Bytes, Response> {
    let too_large = || {
        error_response(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("request body too large: the limit is {BODY_LIMIT} bytes"),
        )
    };
    let declared = headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > BODY_LIMIT as u64) {
        return Err(too_large());
    }
    // Without a Content-Length (chunked) the limit applies while reading;
    // a client that vanishes mid-body gets this answer too, unseen. A
    // client that trickles its body holds a connection the limit counts as
    // busy: it gets BODY_TIMEOUT in all, not per byte.
    match tokio::time::timeout(super::BODY_TIMEOUT, axum::body::to_bytes(body, BODY_LIMIT)).await {
        Ok(Ok(bytes)) => Ok(bytes),
        Ok(Err(_)) => Err(too_large()),
        Err(_) => Err(error_response(
            StatusCode::REQUEST_TIMEOUT,
            format!(
                "request body not received within {} s",
                super::BODY_TIMEOUT.as_secs()
            ),
        )),
    }
}

#[derive(Serialize)]
struct Message<'a> {
    message: &'a str,
}

fn message(code: StatusCode, text: &str) -> Response {
    (code, Json(Message { message: text })).into_response()
}

pub(crate) async fn post_switchover(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let ops = &state.ops;
    let bytes = match admit(ops, &headers, body).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    let body: SwitchoverBody = match parse_body(&bytes) {
        Ok(b) => b,
        Err(r) => return refuse(r),
    };
    let now = requests::now_unix();
    if let Some(at) = body.scheduled_at.as_deref() {
        // Checked before etcd is asked anything: a bad time is the
        // request's fault whatever the cluster looks like.
        if let Err(r) = requests::parse_schedule(at, now) {
            return refuse(r);
        }
    }
    let scope = ops.options.scope.clone();
    let defaults = ops.options.defaults.clone();
    let result = ops
        .with_dcs(async move |dcs: &mut Dcs| {
            let view = dcs.read_cluster(&defaults).await?;
            let req = match check_switchover(&view, &body, now, &scope) {
                Ok(req) => req,
                Err(r) => return Ok(Err(r)),
            };
            Ok(match dcs.create_failover(&req).await? {
                LeaderOutcome::Won => Ok(req),
                LeaderOutcome::Lost => Err(requests::lost_race()),
            })
        })
        .await;
    match result {
        Err(resp) => resp,
        Ok(Err(r)) => refuse(r),
        Ok(Ok(req)) => {
            let code = if req.scheduled_at.is_some() {
                StatusCode::ACCEPTED
            } else {
                StatusCode::OK
            };
            (code, Json(req)).into_response()
        }
    }
}

pub(crate) async fn delete_switchover(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let ops = &state.ops;
    let bytes = match admit(ops, &headers, body).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    if let Err(r) = parse_body::<EmptyBody>(&bytes) {
        return refuse(r);
    }
    match ops
        .with_dcs(async |dcs: &mut Dcs| dcs.cancel_failover().await)
        .await
    {
        Err(resp) => resp,
        Ok(CancelOutcome::NothingPending) => error_response(
            StatusCode::NOT_FOUND,
            "no switchover or failover is pending",
        ),
        Ok(CancelOutcome::Cancelled(req)) => (StatusCode::OK, Json(req)).into_response(),
        Ok(CancelOutcome::CancelledUnreadable) => message(
            StatusCode::OK,
            "an unreadable switchover request was cancelled",
        ),
    }
}

pub(crate) async fn post_failover(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let ops = &state.ops;
    let bytes = match admit(ops, &headers, body).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    let body: FailoverBody = match parse_body(&bytes) {
        Ok(b) => b,
        Err(r) => return refuse(r),
    };
    if body.candidate.is_none() {
        return refuse(Refusal::new(
            StatusCode::BAD_REQUEST,
            "candidate is required",
        ));
    }
    let now = requests::now_unix();
    let scope = ops.options.scope.clone();
    let defaults = ops.options.defaults.clone();
    let result = ops
        .with_dcs(async move |dcs: &mut Dcs| {
            let view = dcs.read_cluster(&defaults).await?;
            let req = match check_failover(&view, &body, now, &scope) {
                Ok(req) => req,
                Err(r) => return Ok(Err(r)),
            };
            Ok(match dcs.create_failover(&req).await? {
                LeaderOutcome::Won => Ok(req),
                LeaderOutcome::Lost => Err(requests::lost_race()),
            })
        })
        .await;
    match result {
        Err(resp) => resp,
        Ok(Err(r)) => refuse(r),
        Ok(Ok(req)) => (StatusCode::OK, Json(req)).into_response(),
    }
}

/// `If-Match: <revision>` (quoted or not; `*` matches any).
fn if_match(headers: &HeaderMap) -> Result<Option<i64>, Refusal> {
    let Some(value) = headers.get(IF_MATCH) else {
        return Ok(None);
    };
    let text = value.to_str().unwrap_or("").trim();
    if text == "*" {
        return Ok(None);
    }
    let text = text.strip_prefix("W/").unwrap_or(text).trim_matches('"');
    text.parse::<i64>().map(Some).map_err(|_| {
        Refusal::new(
            StatusCode::BAD_REQUEST,
            format!("If-Match must be the config revision (the ETag of GET /config), not {text:?}"),
        )
    })
}

fn etag(revision: i64) -> HeaderValue {
    // Digits and quotes only: always a valid header value.
    HeaderValue::from_str(&format!("\"{revision}\"")).unwrap_or(HeaderValue::from_static("\"0\""))
}

/// PATCH (`replace` false: RFC 7386 merge patch) or PUT (`replace` true:
/// the whole config) of the stored dynamic config, with compare-and-swap on
/// its etcd revision.
async fn change_config(state: AppState, headers: HeaderMap, body: Body, replace: bool) -> Response {
    let ops = &state.ops;
    let bytes = match admit(ops, &headers, body).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    let patch: serde_json::Value = match serde_json::from_slice(&bytes) {
        Ok(v) => v,
        Err(e) => {
            return refuse(Refusal::new(
                StatusCode::BAD_REQUEST,
                format!("malformed JSON body: {e}"),
            ))
        }
    };
    let expected = match if_match(&headers) {
        Ok(r) => r,
        Err(r) => return refuse(r),
    };
    if replace {
        if !patch.is_object() {
            return refuse(Refusal::new(
                StatusCode::BAD_REQUEST,
                "the config must be a JSON object",
            ));
        }
        // Validate before asking etcd: a bad document is a bad request
        // whatever is stored.
        if let Err(r) = validate_config(patch.clone()) {
            return refuse(r);
        }
    }
    let defaults = ops.options.defaults.clone();
    let result = ops
        .with_dcs(async move |dcs: &mut Dcs| {
            let stored = dcs.read_config().await?;
            if expected.is_some_and(|rev| rev != stored.revision) {
                return Ok(Err(Refusal::new(StatusCode::CONFLICT, CONFIG_CONFLICT)));
            }
            if let (Some(problem), false) = (&stored.unreadable, replace) {
                return Ok(Err(Refusal::new(
                    StatusCode::CONFLICT,
                    format!("{problem}: a merge patch needs a readable config; replace it whole with PUT /config"),
                )));
            }
            let new = if replace {
                validate_config(patch)
            } else {
                patch_config(stored.value.as_ref(), &defaults, &patch)
            };
            let new = match new {
                Ok(c) => c,
                Err(r) => return Ok(Err(r)),
            };
            let unchanged = stored
                .value
                .as_ref()
                .and_then(|v| serde_json::from_value::<DynamicConfig>(v.clone()).ok())
                .is_some_and(|old| old == new);
            if unchanged {
                return Ok(Ok((new, stored.revision)));
            }
            Ok(match dcs.write_config_cas(&new, stored.revision).await? {
                Some(revision) => Ok((new, revision)),
                None => Err(Refusal::new(StatusCode::CONFLICT, CONFIG_CONFLICT)),
            })
        })
        .await;
    match result {
        Err(resp) => resp,
        Ok(Err(r)) => refuse(r),
        Ok(Ok((config, revision))) => {
            let mut resp = Json(config).into_response();
            resp.headers_mut().insert(ETAG, etag(revision));
            resp
        }
    }
}

pub(crate) async fn patch_config_handler(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    change_config(state, headers, body, false).await
}

pub(crate) async fn put_config_handler(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    change_config(state, headers, body, true).await
}

async fn member_command(
    state: AppState,
    headers: HeaderMap,
    body: Body,
    command: MemberCommand,
) -> Response {
    let ops = &state.ops;
    let bytes = match admit(ops, &headers, body).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    if let Err(r) = parse_body::<EmptyBody>(&bytes) {
        return refuse(r);
    }
    if command == MemberCommand::Reinit && state.snapshot.get().holds_leader_key {
        return error_response(
            StatusCode::CONFLICT,
            "refusing to reinitialize the leader: switch over first",
        );
    }
    let what = command.as_str();
    match ops.commands.try_send(command) {
        Ok(()) => message(StatusCode::ACCEPTED, &format!("{what} requested")),
        Err(mpsc::error::TrySendError::Full(_)) => error_response(
            StatusCode::SERVICE_UNAVAILABLE,
            "busy: earlier requests to this member are still queued, retry later",
        ),
        Err(mpsc::error::TrySendError::Closed(_)) => error_response(
            StatusCode::SERVICE_UNAVAILABLE,
            "the agent is not taking requests (shutting down)",
        ),
    }
}

pub(crate) async fn post_restart(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    member_command(state, headers, body, MemberCommand::Restart).await
}

pub(crate) async fn post_reinitialize(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    member_command(state, headers, body, MemberCommand::Reinit).await
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct FailsafeBody {
    leader: String,
    /// The asking primary's ttl (its fence stands at that).
    ttl: u64,
}

/// `POST /failsafe` (failsafe mode): a primary that cannot reach etcd asks
/// whether we cannot either and accept it. Answered from the snapshot by
/// `ha::failsafe_refusal`; a yes is also handed to the loop, which then
/// takes no lease for ttl. Credentials are required only where configured:
/// agents send theirs, and a yes only holds back an election that this
/// member could not run anyway (it has no etcd).
pub(crate) async fn post_failsafe(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let ops = &state.ops;
    let bytes = if ops.options.credentials.is_some() {
        match admit(ops, &headers, body).await {
            Ok(b) => b,
            Err(r) => return r,
        }
    } else {
        match read_body(&headers, body).await {
            Ok(b) => b,
            Err(r) => return r,
        }
    };
    let req = match parse_body::<FailsafeBody>(&bytes) {
        Ok(b) => b,
        Err(r) => return refuse(r),
    };
    let snap = state.snapshot.get();
    let failsafe_mode = snap
        .cluster
        .as_ref()
        .is_some_and(|c| c.config.failsafe_mode);
    let runs_primary = snap.pg_running && !snap.in_recovery;
    let leads = snap.member.role == crate::dcs::Role::Leader;
    if let Some(why) = crate::ha::failsafe_refusal(failsafe_mode, snap.dcs_ok, runs_primary, leads)
    {
        return error_response(
            StatusCode::CONFLICT,
            format!("not confirming {}: {why}", req.leader),
        );
    }
    // On disk before we say yes: a restarted agent must still keep it.
    let ttl = req
        .ttl
        .max(snap.cluster.as_ref().map_or(0, |c| c.config.ttl));
    if let Some(path) = ops.options.failsafe_promise.clone() {
        let promise =
            crate::failsafe_promise::Promise::new(&req.leader, ttl, std::time::SystemTime::now());
        let saved =
            tokio::task::spawn_blocking(move || crate::failsafe_promise::save(&path, &promise))
                .await;
        let error = match saved {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(format!("{e:#}")),
            Err(e) => Some(format!("recording the failsafe promise failed: {e}")),
        };
        if let Some(e) = error {
            tracing::error!("failsafe: not confirming {}: {e}", req.leader);
            return error_response(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not confirming {}: {e}", req.leader),
            );
        }
    }
    // Queued before we say yes; the loop takes requests before its next
    // pass, and the policy never promotes while a confirmation holds (an
    // election won in the same instant is released, not promoted).
    let cmd = MemberCommand::Failsafe {
        leader: req.leader.clone(),
        ttl: req.ttl,
    };
    match ops.commands.try_send(cmd) {
        Ok(()) => message(
            StatusCode::OK,
            &format!("{} confirmed as the primary", req.leader),
        ),
        Err(_) => error_response(
            StatusCode::SERVICE_UNAVAILABLE,
            "the agent cannot take the confirmation now (requests queued, or shutting down)",
        ),
    }
}

pub(crate) async fn post_reload(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    member_command(state, headers, body, MemberCommand::Reload).await
}

/// `DELETE /restart` (Patroni: cancel a scheduled restart). Restarts are
/// not scheduled here, so there is never one to cancel.
pub(crate) async fn delete_restart(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    if let Err(r) = admit(&state.ops, &headers, body).await {
        return r;
    }
    error_response(StatusCode::NOT_FOUND, "no scheduled restart to cancel")
}
