//! The parts of the policy that carry out operators' wishes: switchover and
//! manual failover requests, maintenance mode, and requests made to one
//! member (restart, reinit, reload).

use super::view::*;
use crate::dcs::{ClusterView, FailoverKind, FailoverRequest, PgState, Role};

/// An unscheduled request nobody acted on for this long stops holding
/// elections back.
const REQUEST_MAX_AGE_SECS: u64 = 60;

/// A request that should still be obeyed.
pub(super) fn live_request<'a>(
    cluster: &'a ClusterView,
    local: &LocalView,
) -> Option<&'a FailoverRequest> {
    let f = cluster.failover.as_ref()?;
    let since = f.scheduled_unix.unwrap_or(f.requested_unix);
    (f.requested_unix == 0 || local.wall_clock <= since.saturating_add(REQUEST_MAX_AGE_SECS))
        .then_some(f)
}

/// The leader, running as primary with a fresh lease, looks at a pending
/// request. Returns true when it started a hand-over (nothing else to do).
pub(super) fn leader_handles_request(
    cluster: &ClusterView,
    local: &LocalView,
    pg: &PgRunning,
    d: &mut Decision,
) -> bool {
    let Some(f) = cluster.failover.as_ref() else {
        return false;
    };
    if f.candidate.as_deref() == Some(local.name.as_str()) {
        d.push(
            Action::ClearFailover,
            format!("{} to us complete", kind_word(f.kind)),
        );
        return false;
    }
    if let Some(l) = f.leader.as_deref() {
        if l != local.name {
            d.push(
                Action::ClearFailover,
                format!(
                    "dropping a {} request from leader {l}: we lead now",
                    kind_word(f.kind)
                ),
            );
            return false;
        }
    }
    if let Some(at) = f.scheduled_unix {
        if at > local.wall_clock {
            d.waiting = Some(format!(
                "switchover scheduled at {}",
                f.scheduled_at.as_deref().unwrap_or("a later time")
            ));
            return false;
        }
    }
    match pick_candidate(cluster, local, pg, f.candidate.as_deref()) {
        Ok(candidate) => {
            d.push(
                Action::BeginSwitchover {
                    candidate: candidate.clone(),
                },
                format!(
                    "{} to {candidate} requested: shutting PostgreSQL down cleanly to hand over",
                    kind_word(f.kind)
                ),
            );
            true
        }
        Err(why) => {
            d.push(
                Action::ClearFailover,
                format!("{} refused: {why}", kind_word(f.kind)),
            );
            d.problem = Some(format!("{} aborted: {why}", kind_word(f.kind)));
            false
        }
    }
}

/// The leader has shut down for a hand-over: it gives up the lease once the
/// candidate has received everything up to the shutdown checkpoint.
/// Returns true when a hand-over is in progress.
pub(super) fn leader_hands_over(
    cluster: &ClusterView,
    local: &LocalView,
    d: &mut Decision,
) -> bool {
    let Some(f) = cluster.failover.as_ref() else {
        return false;
    };
    let Some(candidate) = f.candidate.as_deref() else {
        return false;
    };
    if f.leader.as_deref() != Some(local.name.as_str()) || candidate == local.name {
        return false;
    }
    // pg_control is the one read before PostgreSQL last started: it proves
    // a clean shutdown only while PostgreSQL is known to be stopped, not
    // while its state cannot be read (simulator seed 28568: a paused leader
    // with postmaster.pid unreadable handed over with its primary running).
    if local.pg != PgRun::Stopped {
        return false;
    }
    let Some(control) = local.control.as_ref().filter(|c| c.clean_shutdown) else {
        return false;
    };
    let Some(peers) = local.peers.as_ref() else {
        let Some(m) = cluster.member(candidate) else {
            d.push(
                Action::RenewLeader,
                "holding the lease while the candidate publishes itself",
            );
            d.waiting = Some(format!("waiting for {candidate} to publish its address"));
            return true;
        };
        d.need = Some(PeerQuery::Received(PeerAddress {
            name: m.name.clone(),
            api_url: m.api_url.clone(),
            address: format!("{}:{}", m.host, m.port),
            nofailover: m.tags.nofailover,
            failover_priority: m.tags.failover_priority,
        }));
        d.waiting = Some(format!("asking {candidate} how far it has received"));
        return true;
    };
    let received = peers
        .iter()
        .find(|p| p.name == candidate)
        .and_then(|p| p.wal_lsn);
    match received {
        Some(lsn) if lsn > control.checkpoint_lsn => {
            d.push(
                Action::ReleaseLeader,
                format!("{candidate} has received our shutdown checkpoint: handing the leader lease over"),
            );
        }
        _ => {
            d.push(
                Action::RenewLeader,
                "holding the lease until the candidate catches up",
            );
            d.waiting = Some(format!(
                "waiting for {candidate} to receive our shutdown checkpoint"
            ));
        }
    }
    true
}

/// What a replica does about a request when there is no leader: take the
/// lease (it is the named candidate), leave it to the candidate, or follow
/// the normal election (None).
pub(super) enum ReplicaVerdict {
    TakeLease(String),
    LeaveTo(String),
}

pub(super) fn replica_verdict(cluster: &ClusterView, local: &LocalView) -> Option<ReplicaVerdict> {
    let f = live_request(cluster, local)?;
    let candidate = f.candidate.as_deref()?;
    if candidate == local.name {
        // Also a switchover: its leader may have died before the hand-over
        // proved we have its shutdown checkpoint.
        if cluster.sync_excludes(&local.name) {
            if !f.force {
                return Some(ReplicaVerdict::LeaveTo(format!(
                    "{} names us, but synchronous_mode elects only a member listed in `sync` and it was not forced",
                    kind_word(f.kind)
                )));
            }
            return Some(ReplicaVerdict::TakeLease(format!(
                "forced {} names us although we are not a synchronous standby: taking the leader lease; commits acknowledged by the old primary may be lost",
                kind_word(f.kind)
            )));
        }
        Some(ReplicaVerdict::TakeLease(format!(
            "{} names us: taking the leader lease",
            kind_word(f.kind)
        )))
    } else {
        Some(ReplicaVerdict::LeaveTo(format!(
            "{} to {candidate} in progress: not running for leader",
            kind_word(f.kind)
        )))
    }
}

/// Why `name` cannot take over from `leader` by switchover now, or its WAL
/// position if it can. The one rule for the API and CLI (refusing a request
/// up front) and the leader (checking it before it hands over), so the two
/// cannot disagree. `leader_lsn`: the leader's position as the caller knows
/// it (None: unknown, lag not checked); `scope` names the cluster in the
/// message when the caller knows it.
pub fn switchover_candidate_problem(
    cluster: &ClusterView,
    leader: &str,
    leader_lsn: Option<u64>,
    name: &str,
    scope: Option<&str>,
) -> Result<u64, String> {
    let Some(m) = cluster.member(name) else {
        let of = scope
            .map(|s| format!(" of cluster {s}"))
            .unwrap_or_default();
        return Err(format!("candidate {name} is not a member{of}"));
    };
    if name == leader {
        return Err(format!("candidate {name} is already the leader"));
    }
    if m.tags.nofailover {
        return Err(format!("candidate {name} is tagged nofailover"));
    }
    if cluster.sync_excludes(name) {
        let listed = cluster
            .sync
            .as_ref()
            .map(|s| s.sync_standby.join(", "))
            .unwrap_or_default();
        return Err(format!(
            "candidate {name} is not a synchronous standby (sync: {listed})"
        ));
    }
    if !matches!(m.role, Role::Replica | Role::SyncStandby) || m.state != PgState::Streaming {
        return Err(format!(
            "candidate {name} is not streaming from the leader (state: {})",
            m.state.as_str()
        ));
    }
    let Some(lsn) = m.receive_lsn.max(m.wal_lsn) else {
        return Err(format!("candidate {name} has not published a WAL position"));
    };
    if let Some(l) = leader_lsn {
        let lag = l.saturating_sub(lsn);
        let max = cluster.config.maximum_lag_on_failover;
        if lag > max {
            return Err(format!(
                "candidate {name} lags {lag} bytes behind the leader (maximum_lag_on_failover is {max})"
            ));
        }
    }
    Ok(lsn)
}

/// Who takes over in a switchover: the named member if it qualifies, or the
/// most advanced qualifying replica (ties: failover_priority, then name).
fn pick_candidate(
    cluster: &ClusterView,
    local: &LocalView,
    pg: &PgRunning,
    named: Option<&str>,
) -> Result<String, String> {
    let ours = pg.wal_lsn;
    let check = |name: &str| switchover_candidate_problem(cluster, &local.name, ours, name, None);
    if let Some(name) = named {
        return check(name).map(|_| name.to_string());
    }
    cluster
        .members
        .iter()
        .filter(|m| m.name != local.name)
        .filter_map(|m| {
            check(&m.name)
                .ok()
                .map(|lsn| (lsn, m.tags.failover_priority, m.name.clone()))
        })
        .max_by(|a, b| a.0.cmp(&b.0).then(a.1.cmp(&b.1)).then(b.2.cmp(&a.2)))
        .map(|(_, _, name)| name)
        .ok_or_else(|| "no healthy replica to hand over to".to_string())
}

/// A request made to this member's own API.
pub(super) fn member_request(cluster: &ClusterView, local: &LocalView, d: &mut Decision) -> bool {
    let Some(req) = local.request else {
        return false;
    };
    let i_lead = cluster.leader.as_deref() == Some(local.name.as_str());
    if i_lead {
        d.push(Action::RenewLeader, "renewing the leader lease");
    }
    d.push(Action::AckRequest, "operator request received");
    match req {
        OperatorRequest::Reload => d.push(Action::Reload, "operator asked for a reload"),
        // Restarting "in its current role" would bring a deposed primary
        // back writable: without the lease it stops and rejoins instead.
        OperatorRequest::Restart if local.pg.is_primary() && !i_lead => d.push(
            Action::Stop,
            "operator asked for a restart, but we run as primary without the leader lease: stopping to rejoin as a replica",
        ),
        OperatorRequest::Restart => d.push(Action::Restart, "operator asked for a restart"),
        OperatorRequest::Reinit if i_lead => {
            d.problem = Some("refusing to reinitialize the leader: switch over first".into());
        }
        OperatorRequest::Reinit => d.push(
            Action::RemoveData,
            "operator asked to reinitialize: removing the data directory to clone afresh",
        ),
    }
    true
}

fn kind_word(k: FailoverKind) -> &'static str {
    match k {
        FailoverKind::Switchover => "switchover",
        FailoverKind::Failover => "manual failover",
    }
}
