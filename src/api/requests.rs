//! Operators' requests checked against the cluster, as pure functions of
//! (request, cluster view, wall clock): the API handlers and the CLI verbs
//! share them, so both refuse the same things with the same words.

use crate::config::{self, DynamicConfig};
use crate::dcs::{ClusterView, FailoverKind, FailoverRequest};
use axum::http::StatusCode;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::Value;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Why a request is refused: the HTTP status and one line for the operator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub status: StatusCode,
    pub message: String,
}

impl Refusal {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Refusal {
            status,
            message: message.into(),
        }
    }
    fn bad(message: impl Into<String>) -> Self {
        Refusal::new(StatusCode::BAD_REQUEST, message)
    }
    fn precondition(message: impl Into<String>) -> Self {
        Refusal::new(StatusCode::PRECONDITION_FAILED, message)
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Refusal {}

pub const CONFIG_CONFLICT: &str = "config changed concurrently, retry";

/// `POST /switchover`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct SwitchoverBody {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leader: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub candidate: Option<String>,
    /// RFC 3339; absent: now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheduled_at: Option<String>,
}

/// `POST /failover`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct FailoverBody {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub candidate: Option<String>,
    /// synchronous_mode: fail over to a member not listed in `sync`, which
    /// may lack acknowledged commits.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub force: bool,
}

/// `POST /restart`, `/reinitialize`, `/reload`: no fields yet, but a body
/// that asks for something (a schedule, say) must not be silently ignored.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmptyBody {}

/// A JSON body; an empty body reads as `{}`.
pub fn parse_body<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, Refusal> {
    let bytes: &[u8] = if bytes.iter().all(u8::is_ascii_whitespace) {
        b"{}"
    } else {
        bytes
    };
    serde_json::from_slice(bytes).map_err(|e| match e.classify() {
        serde_json::error::Category::Data => Refusal::bad(format!("invalid request body: {e}")),
        _ => Refusal::bad(format!("malformed JSON body: {e}")),
    })
}

pub fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

pub fn format_time(unix: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(unix)).to_string()
}

/// A request stamped now.
fn request(
    kind: FailoverKind,
    leader: Option<String>,
    candidate: Option<String>,
    now: u64,
) -> FailoverRequest {
    FailoverRequest {
        kind,
        leader,
        candidate,
        scheduled_at: None,
        scheduled_unix: None,
        requested_at: format_time(now),
        requested_unix: now,
        force: false,
    }
}

/// `scheduled_at` → (normalized RFC 3339 in UTC, unix seconds); 400 when
/// unparsable or not in the future.
pub fn parse_schedule(text: &str, now: u64) -> Result<(String, u64), Refusal> {
    let at = parse_rfc3339(text).map_err(|why| {
        Refusal::bad(format!(
            "scheduled_at {text:?} is not an RFC 3339 time such as 2030-01-02T03:04:05Z: {why}"
        ))
    })?;
    if at <= now {
        return Err(Refusal::bad(format!(
            "scheduled_at {text} is in the past (now is {})",
            format_time(now)
        )));
    }
    Ok((format_time(at), at))
}

/// `YYYY-MM-DDTHH:MM:SS[.fraction](Z|±HH:MM)` → unix seconds (the fraction
/// is dropped). `t`, `z` and a space for `T` are accepted, as RFC 3339
/// allows.
pub fn parse_rfc3339(text: &str) -> Result<u64, String> {
    let s = text.trim().as_bytes();
    let num = |range: std::ops::Range<usize>, what: &str| -> Result<i64, String> {
        let part = s
            .get(range)
            .ok_or_else(|| format!("too short: no {what}"))?;
        if part.is_empty() || !part.iter().all(u8::is_ascii_digit) {
            return Err(format!("expected digits for the {what}"));
        }
        Ok(part.iter().fold(0i64, |n, d| n * 10 + i64::from(d - b'0')))
    };
    let expect = |i: usize, chars: &[u8], what: &str| -> Result<(), String> {
        match s.get(i) {
            Some(c) if chars.contains(c) => Ok(()),
            _ => Err(format!("expected {what} at position {}", i + 1)),
        }
    };
    let year = num(0..4, "year")?;
    expect(4, b"-", "'-'")?;
    let month = num(5..7, "month")?;
    expect(7, b"-", "'-'")?;
    let day = num(8..10, "day")?;
    expect(10, b"Tt ", "'T'")?;
    let hour = num(11..13, "hour")?;
    expect(13, b":", "':'")?;
    let minute = num(14..16, "minute")?;
    expect(16, b":", "':'")?;
    let second = num(17..19, "second")?;
    let mut i = 19;
    if s.get(i) == Some(&b'.') {
        i += 1;
        let start = i;
        while s.get(i).is_some_and(u8::is_ascii_digit) {
            i += 1;
        }
        if i == start {
            return Err("expected digits after '.'".into());
        }
    }
    let offset = match s.get(i) {
        Some(b'Z' | b'z') if i + 1 == s.len() => 0,
        Some(sign @ (b'+' | b'-')) if i + 6 == s.len() => {
            let h = num(i + 1..i + 3, "offset hours")?;
            expect(i + 3, b":", "':' in the offset")?;
            let m = num(i + 4..i + 6, "offset minutes")?;
            if h > 23 || m > 59 {
                return Err("offset out of range".into());
            }
            let secs = h * 3600 + m * 60;
            if *sign == b'+' {
                secs
            } else {
                -secs
            }
        }
        None => return Err("missing time zone: end with Z or an offset such as +02:00".into()),
        _ => return Err("expected Z or an offset such as +02:00 at the end".into()),
    };
    if !(1..=12).contains(&month) {
        return Err("month out of range".into());
    }
    let leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
    let days_in_month = [
        31,
        if leap { 29 } else { 28 },
        31,
        30,
        31,
        30,
        31,
        31,
        30,
        31,
        30,
        31,
    ];
    if day < 1 || day > days_in_month[(month - 1) as usize] {
        return Err("day out of range".into());
    }
    // 60 is a leap second: RFC 3339 allows it; it reads as the next second.
    if hour > 23 || minute > 59 || second > 60 {
        return Err("time of day out of range".into());
    }
    let days = days_from_civil(year, month, day);
    let unix = days * 86_400 + hour * 3600 + minute * 60 + second - offset;
    u64::try_from(unix).map_err(|_| "before 1970".to_string())
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's
/// algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn pending_refusal(pending: &FailoverRequest) -> Refusal {
    let what = match pending.kind {
        FailoverKind::Switchover => "switchover",
        FailoverKind::Failover => "failover",
    };
    let to = pending
        .candidate
        .as_deref()
        .map(|c| format!(" to {c}"))
        .unwrap_or_default();
    let when = pending
        .scheduled_at
        .as_deref()
        .map(|t| format!(" scheduled at {t}"))
        .unwrap_or_default();
    Refusal::new(
        StatusCode::CONFLICT,
        format!(
            "a {what}{to}{when} is already pending: cancel it first (DELETE /switchover or `pgwarden switchover --cancel`)"
        ),
    )
}

/// The refusal when a request lost the create-if-absent race.
pub fn lost_race() -> Refusal {
    Refusal::new(
        StatusCode::CONFLICT,
        "another switchover or failover request was stored first: cancel it first (DELETE /switchover or `pgwarden switchover --cancel`)",
    )
}

/// Why `name` cannot take over by switchover now, if it cannot: the
/// policy's own rule (`ha::switchover_candidate_problem`), against the
/// leader's last published position.
fn switchover_candidate_problem(
    view: &ClusterView,
    leader: &str,
    name: &str,
    scope: &str,
) -> Option<String> {
    let leader_lsn = view
        .leader_member()
        .and_then(|l| l.wal_lsn)
        .or(view.status.as_ref().map(|s| s.wal_lsn));
    crate::ha::switchover_candidate_problem(view, leader, leader_lsn, name, Some(scope)).err()
}

/// A switchover request checked against the cluster: the request to store,
/// or why not.
pub fn check_switchover(
    view: &ClusterView,
    body: &SwitchoverBody,
    now: u64,
    scope: &str,
) -> Result<FailoverRequest, Refusal> {
    let schedule = match body.scheduled_at.as_deref() {
        Some(text) => Some(parse_schedule(text, now)?),
        None => None,
    };
    if body.leader.as_deref() == Some("") || body.candidate.as_deref() == Some("") {
        return Err(Refusal::bad("leader and candidate must not be empty"));
    }
    let Some(leader) = view.leader.as_deref() else {
        return Err(Refusal::precondition("no leader: use failover"));
    };
    if let Some(named) = body.leader.as_deref() {
        if named != leader {
            return Err(Refusal::precondition(format!(
                "{named} is not the leader (the leader is {leader})"
            )));
        }
    }
    match body.candidate.as_deref() {
        Some(c) => {
            if let Some(why) = switchover_candidate_problem(view, leader, c, scope) {
                return Err(Refusal::precondition(why));
            }
        }
        None => {
            let any = view
                .members
                .iter()
                .any(|m| switchover_candidate_problem(view, leader, &m.name, scope).is_none());
            if !any {
                return Err(Refusal::precondition(
                    "no candidate to switch over to: no other member is streaming, within maximum_lag_on_failover, not tagged nofailover and (in synchronous_mode) listed in `sync`",
                ));
            }
        }
    }
    if let Some(pending) = &view.failover {
        return Err(pending_refusal(pending));
    }
    let mut req = request(
        FailoverKind::Switchover,
        Some(leader.to_string()),
        body.candidate.clone(),
        now,
    );
    if let Some((at, unix)) = schedule {
        req.scheduled_at = Some(at);
        req.scheduled_unix = Some(unix);
    }
    Ok(req)
}

/// A manual failover request: the named candidate takes over, with or
/// without a leader, paused or not.
pub fn check_failover(
    view: &ClusterView,
    body: &FailoverBody,
    now: u64,
    scope: &str,
) -> Result<FailoverRequest, Refusal> {
    let Some(name) = body.candidate.as_deref() else {
        return Err(Refusal::bad("candidate is required"));
    };
    if name.is_empty() {
        return Err(Refusal::bad("candidate must not be empty"));
    }
    let Some(m) = view.member(name) else {
        return Err(Refusal::precondition(format!(
            "candidate {name} is not a member of cluster {scope}"
        )));
    };
    if m.tags.nofailover {
        return Err(Refusal::precondition(format!(
            "candidate {name} is tagged nofailover"
        )));
    }
    if view.leader.as_deref() == Some(name) {
        return Err(Refusal::precondition(format!(
            "candidate {name} is already the leader"
        )));
    }
    if view.sync_excludes(name) && !body.force {
        let listed = view
            .sync
            .as_ref()
            .map(|s| s.sync_standby.join(", "))
            .unwrap_or_default();
        return Err(Refusal::precondition(format!(
            "candidate {name} is not a synchronous standby (sync: {listed}): it may lack acknowledged commits; force to fail over anyway"
        )));
    }
    if let Some(pending) = &view.failover {
        return Err(pending_refusal(pending));
    }
    let mut req = request(
        FailoverKind::Failover,
        view.leader.clone(),
        Some(name.to_string()),
        now,
    );
    req.force = body.force && view.sync_excludes(name);
    Ok(req)
}

/// RFC 7386 JSON merge patch: objects merge key by key, `null` removes a
/// key, anything else replaces.
pub fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(patch) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(serde_json::Map::new());
    }
    if let Value::Object(map) = target {
        for (key, value) in patch {
            if value.is_null() {
                map.remove(key);
            } else {
                merge_patch(map.entry(key.clone()).or_insert(Value::Null), value);
            }
        }
    }
}

/// A whole dynamic config as JSON, validated as the agents will read it:
/// known keys only, values of the right type, the lease timing rule, and
/// PostgreSQL parameter names. Errors name the key.
pub fn validate_config(value: Value) -> Result<DynamicConfig, Refusal> {
    let invalid =
        |key: &str, message: &str| Refusal::bad(format!("invalid config: key `{key}`: {message}"));
    let cfg: DynamicConfig = serde_path_to_error::deserialize(value).map_err(|err| {
        let path = err.path().to_string();
        let message = err.inner().to_string();
        let key = match unknown_field(&message) {
            Some(field) if !path.ends_with(field) => {
                if path == "." {
                    field.to_string()
                } else {
                    format!("{path}.{field}")
                }
            }
            _ => path,
        };
        invalid(&key, &message)
    })?;
    cfg.check_timing()
        .map_err(|(key, msg)| invalid(key, &msg))?;
    config::check_parameters(&cfg.postgresql.parameters)
        .map_err(|(name, msg)| invalid(&format!("postgresql.parameters.{name}"), &msg))?;
    Ok(cfg)
}

fn unknown_field(message: &str) -> Option<&str> {
    message.strip_prefix("unknown field `")?.split('`').next()
}

/// The stored config (or, before bootstrap, `defaults`) with `patch`
/// merged in, validated.
pub fn patch_config(
    stored: Option<&Value>,
    defaults: &DynamicConfig,
    patch: &Value,
) -> Result<DynamicConfig, Refusal> {
    if !patch.is_object() {
        return Err(Refusal::bad(
            "the config patch must be a JSON object (RFC 7386 merge patch)",
        ));
    }
    let mut doc = match stored {
        Some(v) => v.clone(),
        None => serde_json::to_value(defaults)
            .map_err(|e| Refusal::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?,
    };
    merge_patch(&mut doc, patch);
    validate_config(doc)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Tags;
    use crate::dcs::{Initialize, MemberStatus, PgState, Role};
    use serde_json::json;

    const NOW: u64 = 1_800_000_000;

    fn member(name: &str, state: PgState, lsn: Option<u64>) -> MemberStatus {
        MemberStatus {
            name: name.into(),
            role: if state == PgState::Running {
                Role::Leader
            } else {
                Role::Replica
            },
            state,
            host: "127.0.0.1".into(),
            port: 5432,
            api_url: "http://127.0.0.1:8008".into(),
            conn_url: String::new(),
            timeline: Some(1),
            wal_lsn: lsn,
            receive_lsn: lsn,
            upstream: None,
            tags: Tags::default(),
            version: String::new(),
            pending_restart: false,
            error: None,
        }
    }

    fn view() -> ClusterView {
        let mut nofail = member("n4", PgState::Streaming, Some(10_000_000));
        nofail.tags.nofailover = true;
        ClusterView {
            initialize: Initialize::SystemId("1".into()),
            leader: Some("n1".into()),
            members: vec![
                member("n1", PgState::Running, Some(10_000_000)),
                member("n2", PgState::Streaming, Some(9_999_000)),
                member("n3", PgState::Streaming, Some(1_000)),
                nofail,
                member("n5", PgState::Stopped, None),
            ],
            config: DynamicConfig::default(),
            config_stored: true,
            status: None,
            history: Vec::new(),
            failover: None,
            failsafe: None,
            sync: None,
            sync_unreadable: false,
            config_revision: 5,
            problems: vec![],
        }
    }

    fn so(leader: Option<&str>, candidate: Option<&str>, at: Option<&str>) -> SwitchoverBody {
        SwitchoverBody {
            leader: leader.map(Into::into),
            candidate: candidate.map(Into::into),
            scheduled_at: at.map(Into::into),
        }
    }

    type Row = (
        &'static str,
        ClusterView,
        SwitchoverBody,
        Result<(), (u16, &'static str)>,
    );

    #[test]
    fn switchover_table() {
        let later = format_time(NOW + 3600);
        let earlier = format_time(NOW - 1);
        let pending = {
            let mut v = view();
            v.failover = Some(request(
                FailoverKind::Switchover,
                Some("n1".into()),
                Some("n2".into()),
                NOW,
            ));
            v
        };
        let leaderless = ClusterView {
            leader: None,
            ..view()
        };
        let all_bad = {
            let mut v = view();
            v.members.retain(|m| m.name != "n2");
            v
        };
        #[rustfmt::skip]
        let table: Vec<Row> = vec![
            ("to a healthy replica", view(), so(None, Some("n2"), None), Ok(())),
            ("to whoever is healthiest", view(), so(None, None, None), Ok(())),
            ("naming the right leader", view(), so(Some("n1"), Some("n2"), None), Ok(())),
            ("scheduled", view(), so(None, Some("n2"), Some(&later)), Ok(())),
            ("no leader", leaderless, so(None, Some("n2"), None), Err((412, "no leader: use failover"))),
            ("wrong leader", view(), so(Some("n2"), None, None), Err((412, "n2 is not the leader (the leader is n1)"))),
            ("unknown candidate", view(), so(None, Some("n9"), None), Err((412, "candidate n9 is not a member of cluster c"))),
            ("candidate is the leader", view(), so(None, Some("n1"), None), Err((412, "candidate n1 is already the leader"))),
            ("nofailover", view(), so(None, Some("n4"), None), Err((412, "candidate n4 is tagged nofailover"))),
            ("lagging", view(), so(None, Some("n3"), None), Err((412, "candidate n3 lags 9999000 bytes behind the leader (maximum_lag_on_failover is 1048576)"))),
            ("stopped", view(), so(None, Some("n5"), None), Err((412, "candidate n5 is not streaming from the leader (state: stopped)"))),
            ("nobody healthy", all_bad, so(None, None, None), Err((412, "no candidate to switch over to: no other member is streaming, within maximum_lag_on_failover, not tagged nofailover and (in synchronous_mode) listed in `sync`"))),
            ("pending", pending, so(None, Some("n2"), None), Err((409, "a switchover to n2 is already pending: cancel it first (DELETE /switchover or `pgwarden switchover --cancel`)"))),
            ("past", view(), so(None, Some("n2"), Some(&earlier)), Err((400, "scheduled_at 2027-01-15T08:00:00Z is in the past (now is 2027-01-15T08:00:00Z)"))),
        ];
        for (what, v, body, want) in table {
            let got = check_switchover(&v, &body, NOW, "c");
            match (got, want) {
                (Ok(req), Ok(())) => {
                    assert_eq!(req.kind, FailoverKind::Switchover, "{what}");
                    assert_eq!(req.leader.as_deref(), Some("n1"), "{what}");
                    assert_eq!(req.candidate, body.candidate, "{what}");
                    assert_eq!(req.requested_unix, NOW, "{what}");
                    if body.scheduled_at.is_some() {
                        assert_eq!(req.scheduled_unix, Some(NOW + 3600), "{what}");
                    }
                }
                (Err(r), Err((code, msg))) => {
                    assert_eq!(r.status.as_u16(), code, "{what}");
                    if what != "past" {
                        assert_eq!(r.message, msg, "{what}");
                    } else {
                        assert!(
                            r.message.contains("is in the past"),
                            "{what}: {}",
                            r.message
                        );
                    }
                }
                (got, want) => panic!("{what}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn failover_table() {
        let fo = |c: Option<&str>| FailoverBody {
            candidate: c.map(Into::into),
            force: false,
        };
        let leaderless = ClusterView {
            leader: None,
            ..view()
        };
        let req = check_failover(&leaderless, &fo(Some("n3")), NOW, "c").unwrap();
        assert_eq!(req.kind, FailoverKind::Failover);
        assert_eq!(req.candidate.as_deref(), Some("n3"));
        assert_eq!(req.leader, None);
        let bad = |v: &ClusterView, c| check_failover(v, &fo(c), NOW, "c").unwrap_err();
        assert_eq!(bad(&leaderless, None).status, StatusCode::BAD_REQUEST);
        assert_eq!(bad(&leaderless, None).message, "candidate is required");
        assert_eq!(
            bad(&leaderless, Some("n9")).message,
            "candidate n9 is not a member of cluster c"
        );
        assert_eq!(bad(&leaderless, Some("n9")).status.as_u16(), 412);
        assert_eq!(
            bad(&leaderless, Some("n4")).message,
            "candidate n4 is tagged nofailover"
        );
        assert_eq!(bad(&view(), Some("n1")).status.as_u16(), 412);

        // synchronous_mode: only a listed standby, unless forced.
        let mut sync = leaderless.clone();
        sync.config.synchronous_mode = true;
        sync.sync = Some(crate::dcs::SyncState {
            leader: "n1".into(),
            sync_standby: vec!["n2".into()],
        });
        let refused = bad(&sync, Some("n3"));
        assert_eq!(refused.status.as_u16(), 412);
        assert_eq!(
            refused.message,
            "candidate n3 is not a synchronous standby (sync: n2): it may lack acknowledged commits; force to fail over anyway"
        );
        let listed = check_failover(&sync, &fo(Some("n2")), NOW, "c").unwrap();
        assert!(!listed.force);
        let forced = FailoverBody {
            force: true,
            ..fo(Some("n3"))
        };
        assert!(check_failover(&sync, &forced, NOW, "c").unwrap().force);
    }

    #[test]
    fn bodies() {
        assert_eq!(
            parse_body::<SwitchoverBody>(b"").unwrap(),
            SwitchoverBody::default()
        );
        assert_eq!(
            parse_body::<SwitchoverBody>(b"  \n").unwrap(),
            SwitchoverBody::default()
        );
        let e = parse_body::<SwitchoverBody>(b"{\"candidate\":").unwrap_err();
        assert!(e.message.starts_with("malformed JSON body: "), "{e}");
        let e = parse_body::<SwitchoverBody>(b"{\"canidate\":\"x\"}").unwrap_err();
        assert!(
            e.message.starts_with("invalid request body: unknown field `canidate`, expected one of `leader`, `candidate`, `scheduled_at`"),
            "{e}"
        );
        let e = parse_body::<SwitchoverBody>(b"{\"candidate\":3}").unwrap_err();
        assert!(
            e.message.starts_with("invalid request body: invalid type"),
            "{e}"
        );
        assert!(parse_body::<EmptyBody>(b"{}").is_ok());
        assert!(parse_body::<EmptyBody>(b"{\"schedule\":1}").is_err());
    }

    #[test]
    fn rfc3339() {
        let ok: &[(&str, u64)] = &[
            ("1970-01-01T00:00:00Z", 0),
            ("2000-02-29T12:00:00Z", 951_825_600),
            ("2000-02-29t12:00:00z", 951_825_600),
            ("2000-02-29 12:00:00Z", 951_825_600),
            ("2000-02-29T14:30:00+02:30", 951_825_600),
            ("2000-02-29T11:00:00-01:00", 951_825_600),
            ("2000-02-29T12:00:00.123456Z", 951_825_600),
            ("2027-01-15T08:00:00Z", NOW),
        ];
        for (text, want) in ok {
            assert_eq!(parse_rfc3339(text), Ok(*want), "{text}");
            assert_eq!(parse_rfc3339(&format_time(*want)), Ok(*want));
        }
        for bad in [
            "",
            "tomorrow",
            "2000-02-29",
            "2000-02-29T12:00:00",
            "2001-02-29T12:00:00Z",
            "2000-13-01T12:00:00Z",
            "2000-02-29T24:00:00Z",
            "2000-02-29T12:00:00+2:00",
            "2000-02-29T12:00:00Zjunk",
            "1969-12-31T23:59:59Z",
            "2000-02-29T12:00:00.Z",
        ] {
            assert!(parse_rfc3339(bad).is_err(), "{bad:?} should be rejected");
        }
        assert!(parse_schedule("2027-01-15T08:00:01Z", NOW).is_ok());
        assert_eq!(
            parse_schedule("2027-01-15T08:00:00Z", NOW)
                .unwrap_err()
                .status,
            400
        );
        assert!(parse_schedule("soon", NOW)
            .unwrap_err()
            .message
            .starts_with("scheduled_at \"soon\" is not an RFC 3339 time"));
    }

    #[test]
    fn merge_patch_rfc7386_examples() {
        // The examples of RFC 7386, appendix A.
        let cases = [
            (json!({"a":"b"}), json!({"a":"c"}), json!({"a":"c"})),
            (json!({"a":"b"}), json!({"b":"c"}), json!({"a":"b","b":"c"})),
            (json!({"a":"b"}), json!({"a":null}), json!({})),
            (
                json!({"a":"b","b":"c"}),
                json!({"a":null}),
                json!({"b":"c"}),
            ),
            (json!({"a":["b"]}), json!({"a":"c"}), json!({"a":"c"})),
            (json!({"a":"c"}), json!({"a":["b"]}), json!({"a":["b"]})),
            (
                json!({"a":{"b":"c"}}),
                json!({"a":{"b":"d","c":null}}),
                json!({"a":{"b":"d"}}),
            ),
            (json!({"a":[{"b":"c"}]}), json!({"a":[1]}), json!({"a":[1]})),
            (json!(["a", "b"]), json!(["c", "d"]), json!(["c", "d"])),
            (json!({"a":"b"}), json!(["c"]), json!(["c"])),
            (json!({"a":"foo"}), json!(null), json!(null)),
            (json!({"a":"foo"}), json!("bar"), json!("bar")),
            (json!({"e":null}), json!({"a":1}), json!({"e":null,"a":1})),
            (json!([1, 2]), json!({"a":"b","c":null}), json!({"a":"b"})),
            (
                json!({}),
                json!({"a":{"bb":{"ccc":null}}}),
                json!({"a":{"bb":{}}}),
            ),
        ];
        for (target, patch, want) in cases {
            let mut t = target.clone();
            merge_patch(&mut t, &patch);
            assert_eq!(t, want, "{target} + {patch}");
        }
    }

    #[test]
    fn config_patches() {
        let stored = serde_json::to_value(DynamicConfig::default()).unwrap();
        let ok = patch_config(
            Some(&stored),
            &DynamicConfig::default(),
            &json!({"ttl": 30, "postgresql": {"parameters": {"work_mem": "8MB"}}}),
        )
        .unwrap();
        assert_eq!(ok.ttl, 30);
        assert_eq!(
            ok.postgresql.parameters.get("work_mem"),
            Some(&crate::config::ParamValue::Text("8MB".into()))
        );
        // Removing a key brings back its default.
        let back = patch_config(
            Some(&serde_json::to_value(&ok).unwrap()),
            &DynamicConfig::default(),
            &json!({"ttl": null}),
        )
        .unwrap();
        assert_eq!(back.ttl, DynamicConfig::default().ttl);
        let err = |patch: Value| {
            patch_config(Some(&stored), &DynamicConfig::default(), &patch)
                .unwrap_err()
                .message
        };
        assert_eq!(
            err(json!({"ttl": 5})),
            "invalid config: key `ttl`: ttl (5) must be >= loop_wait + 2 * retry_timeout (1 + 2 * 4 = 9)"
        );
        assert!(
            err(json!({"tll": 5})).starts_with("invalid config: key `tll`: unknown field `tll`"),
            "{}",
            err(json!({"tll": 5}))
        );
        assert!(err(json!({"postgresql": {"parameter": {}}}))
            .starts_with("invalid config: key `postgresql.parameter`: unknown field `parameter`"));
        assert!(
            err(json!({"ttl": "long"})).starts_with("invalid config: key `ttl`: invalid type"),
            "{}",
            err(json!({"ttl": "long"}))
        );
        assert_eq!(
            err(json!({"postgresql": {"parameters": {"port": 5433}}})),
            "invalid config: key `postgresql.parameters.port`: is managed by pgwarden and cannot be set here"
        );
        assert!(
            err(json!({"postgresql": {"parameters": {"work_mem": [1]}}}))
                .starts_with("invalid config: key `postgresql.parameters.work_mem`")
        );
        assert!(err(json!([1])).contains("must be a JSON object"));
        // Before bootstrap the member's defaults are the base.
        let pre = patch_config(
            None,
            &DynamicConfig {
                ttl: 20,
                ..DynamicConfig::default()
            },
            &json!({"pause": true}),
        )
        .unwrap();
        assert!(pre.pause);
        assert_eq!(pre.ttl, 20);
    }
}
