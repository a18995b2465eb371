use super::operator::{self, ReplicaVerdict};
use super::view::*;
use crate::dcs::{slot_name, ClusterView, Initialize, PgState, Role};
use std::time::Duration;

/// Seconds between retries of a failed background job, in loop_waits.
const RETRY_LOOPS: u64 = 5;

/// Below this many free bytes on the data or WAL file system PostgreSQL
/// cannot create its next WAL segment (16 MiB by default): a primary
/// PANICs at its next segment switch, and crash recovery and promotion
/// (which copies a segment onto the new timeline) fail the same way. Such
/// a member is not started into that failure, nor put up for leader.
pub const MIN_FREE_BYTES: u64 = 16 * 1024 * 1024;

/// "disk full: …" when the data or WAL file system has less than
/// `MIN_FREE_BYTES` available; None when there is room or it is unknown.
pub fn disk_full(local: &LocalView) -> Option<String> {
    let low = |free: Option<u64>| free.filter(|f| *f < MIN_FREE_BYTES);
    let (what, free) = match (low(local.disk.data_free), low(local.disk.wal_free)) {
        (Some(free), _) => ("data directory", free),
        (None, Some(free)) => ("WAL directory", free),
        (None, None) => return None,
    };
    Some(format!(
        "disk full: {free} bytes free for the {what}, fewer than the {} MiB PostgreSQL needs to write its next WAL segment",
        MIN_FREE_BYTES >> 20
    ))
}

/// Why this member would not take the leader lease in an election now,
/// however far ahead it is (None: it would, if it is the best). Its
/// `/status` says so, so that peers do not stand back for it.
pub fn not_a_candidate(cluster: &ClusterView, local: &LocalView, now: Duration) -> Option<String> {
    if let Some(full) = disk_full(local) {
        return Some(full);
    }
    // Whose data it is cannot be told: promoting it could make another
    // cluster's data (a lost bootstrap's) the leader, whose `status` then
    // judges every real candidate too far behind (simulator seed
    // 1099511724981).
    if let DataDir::Unknown(why) = &local.data {
        return Some(format!(
            "cannot tell whose data our data directory holds ({why})"
        ));
    }
    #[cfg(test)]
    let ignore_sync = local.mutation == Some(super::Mutation::SyncElectAnyone);
    #[cfg(not(test))]
    let ignore_sync = false;
    if !ignore_sync && cluster.sync_excludes(&local.name) {
        let listed = cluster
            .sync
            .as_ref()
            .map(|s| s.sync_standby.join(", "))
            .unwrap_or_default();
        return Some(format!(
            "synchronous_mode: only a member listed in `sync` ({listed}) may take over: it alone has every acknowledged commit"
        ));
    }
    let failed = local
        .last_failure
        .as_ref()
        .filter(|_| backing_off(local, &JobKind::Promote, cluster.config.loop_wait, now))?;
    Some(format!(
        "our promotion failed {}s ago ({})",
        now.saturating_sub(failed.at).as_secs(),
        failed.message
    ))
}

/// The HA policy. Pure: the same inputs give the same decision.
pub fn decide(cluster: &ClusterView, local: &LocalView, now: Duration) -> Decision {
    let mut d = Decision::default();
    let cfg = &cluster.config;
    let leader = cluster.leader.as_deref();
    let i_lead = leader == Some(local.name.as_str());

    // Maintenance mode (as last seen in etcd) overrides even fencing: the
    // operator took the controls.
    if cfg.pause {
        decide_paused(cluster, local, now, &mut d);
        return d;
    }

    // Whatever else holds, a postmaster whose data directory is gone has
    // nothing left worth keeping: stop it now, rather than wait up to a
    // minute for its own lock-file check, so the member can clone afresh
    // (its port and shared memory are free again).
    if local.pg == PgRun::Orphaned {
        d.problem = Some(
            "the data directory is gone under a running PostgreSQL: stopping it to clone afresh"
                .into(),
        );
        d.push(
            Action::Fence,
            "the data directory is gone under a running PostgreSQL: stopping it immediately",
        );
        if i_lead || local.last_renew.is_some() {
            d.push(
                Action::RenewLeader,
                "keeping the leader lease until PostgreSQL is down",
            );
        }
        return d;
    }

    if !local.dcs_ok {
        decide_without_dcs(cluster, local, &mut d);
        return d;
    }

    // Unknown is not absent: with PostgreSQL's state unknown nothing
    // destructive happens, and a leader fences first, keeping its lease.
    if let PgRun::Unknown(why) = &local.pg {
        d.problem = Some(format!(
            "cannot tell whether PostgreSQL runs ({why}): starting, cloning or removing nothing until it can"
        ));
        if i_lead {
            d.push(
                Action::Fence,
                "cannot tell whether PostgreSQL runs as primary: stopping it immediately, keeping the leader lease",
            );
            d.push(Action::RenewLeader, "keeping the leader lease");
        }
        return d;
    }

    // Not while a job runs: a start (or promotion) in flight may still make
    // PostgreSQL writable, which must not happen after the key is gone. The
    // job ends (pg_ctl has its own timeout) and the next pass decides.
    // Not without data either: a bootstrap claim is retried or withdrawn
    // with the `initialize` key by `decide_empty`; releasing only the
    // leader key would leave the claim on our live lease for good.
    let has_data = !matches!(local.data, DataDir::Empty);
    if i_lead && has_data && !local.pg.is_primary() && local.job.is_none() {
        if let Some(since) = local.primary_down_since {
            if now.saturating_sub(since) >= Duration::from_secs(cfg.primary_start_timeout) {
                // Rule 7: a postmaster that does not answer may still take
                // writes: `release_leader` stops it before the key goes.
                release_leader(
                    local,
                    &mut d,
                    format!(
                        "PostgreSQL has not been a running primary for {}s (primary_start_timeout): releasing the leader lease so a replica can take over",
                        cfg.primary_start_timeout
                    ),
                );
                return d;
            }
        }
    }

    // A promotion that failed is not retried under the lease (a WAL write
    // that PANICs fails the same way every time): the lease goes at once
    // to whoever else can take it. An operator's named candidate keeps
    // trying, as asked.
    if i_lead && !local.pg.is_primary() && local.job.is_none() && !named_candidate(cluster, local) {
        let failed = local
            .last_failure
            .as_ref()
            .filter(|_| backing_off(local, &JobKind::Promote, cfg.loop_wait, now));
        if let Some(f) = failed {
            let why = format!("promotion failed: {}", f.message);
            d.problem = Some(match disk_full(local) {
                Some(full) => format!("{why}; {full}"),
                None => why.clone(),
            });
            if local.pg == PgRun::Stopped {
                d.push(
                    Action::ReleaseLeader,
                    format!("{why}: releasing the leader lease so another member can take over"),
                );
            } else {
                // The promotion pg_ctl gave up on stays requested: PostgreSQL
                // may still finish it, so it stops before the key goes
                // (simulator seed 5545).
                d.push(
                    Action::Fence,
                    format!("{why}: stopping PostgreSQL before releasing the leader lease"),
                );
                d.push(
                    Action::RenewLeader,
                    "keeping the leader lease until PostgreSQL is down",
                );
            }
            return d;
        }
    }

    if let Some(job) = &local.job {
        if i_lead {
            d.push(
                Action::RenewLeader,
                "holding the leader lease while a job runs",
            );
        }
        d.waiting = Some(match local.request {
            Some(_) => format!(
                "an operator request waits for the running {}",
                job_name(job)
            ),
            None => format!("{} in progress", job_name(job)),
        });
        return d;
    }

    // After the job check and with the renewal first: a request never
    // costs a leader its renewal.
    if operator::member_request(cluster, local, &mut d) {
        return d;
    }

    if let Some(full) = disk_full(local) {
        if decide_disk_full(cluster, local, &full, &mut d) {
            return d;
        }
    }

    match &local.data {
        DataDir::Empty => decide_empty(cluster, local, now, &mut d),
        DataDir::Unknown(why) => match &local.pg {
            // PostgreSQL runs, so its data is there: act on what it says,
            // only the system identifier checks wait.
            PgRun::Running(pg) if !pg.in_recovery => {
                decide_primary(cluster, local, pg, None, now, &mut d)
            }
            PgRun::Running(pg) => decide_replica(cluster, local, pg, now, &mut d),
            _ => {
                d.problem = Some(format!(
                    "cannot read the data directory ({why}): starting, cloning or removing nothing until it can"
                ));
                if i_lead {
                    d.push(Action::RenewLeader, "keeping the leader lease");
                }
            }
        },
        DataDir::Initialized { system_id } => {
            if let Some(problem) = foreign_data(cluster, local) {
                d.problem = Some(problem);
                if i_lead {
                    release_leader(local, &mut d, "our data is not this cluster's");
                }
                return d;
            }
            match &local.pg {
                PgRun::Stopped => decide_stopped(cluster, local, now, &mut d),
                PgRun::Unresponsive => {
                    if i_lead {
                        d.push(
                            Action::RenewLeader,
                            "holding the leader lease while PostgreSQL starts",
                        );
                    }
                    d.waiting = Some("PostgreSQL is running but not answering queries yet".into());
                }
                PgRun::Running(pg) if !pg.in_recovery => {
                    decide_primary(cluster, local, pg, Some(system_id), now, &mut d)
                }
                PgRun::Running(pg) => decide_replica(cluster, local, pg, now, &mut d),
                // Handled before the job check.
                PgRun::Unknown(_) | PgRun::Orphaned => {}
            }
        }
    }
    d
}

/// Our data directory holds another cluster's data (its system identifier
/// is not the one in `initialize`): what to report, or None.
fn foreign_data(cluster: &ClusterView, local: &LocalView) -> Option<String> {
    let (DataDir::Initialized { system_id }, Initialize::SystemId(cluster_id)) =
        (&local.data, &cluster.initialize)
    else {
        return None;
    };
    (cluster_id != system_id).then(|| format!(
        "data directory belongs to another cluster (system identifier {system_id}, cluster's is {cluster_id}): not starting it"
    ))
}

/// The data or WAL file system is full. Whatever is not running is not
/// started, rewound, cloned or bootstrapped into it: each would fail the
/// same way (a primary restarted in a PANIC loop). A leader whose
/// PostgreSQL is down or stuck in recovery hands the lease to a healthy
/// replica at once. A running instance carries on (a primary recycling WAL
/// segments may write for long on a nearly full disk); the shortage is
/// reported. Returns true when the decision is complete.
fn decide_disk_full(
    cluster: &ClusterView,
    local: &LocalView,
    full: &str,
    d: &mut Decision,
) -> bool {
    let i_lead = cluster.leader.as_deref() == Some(local.name.as_str());
    d.problem = Some(full.to_string());
    if local.pg.running().is_some() {
        return false;
    }
    d.waiting = Some(format!("{full}: starting nothing until space is freed"));
    if !i_lead {
        return true;
    }
    // A key held without data would otherwise be held for good:
    // primary_start_timeout counts only over a data directory.
    if local.data == DataDir::Empty {
        match cluster.initialize {
            Initialize::Claimed => d.push(
                Action::AbandonBootstrap,
                format!("{full}: withdrawing our bootstrap claim so another member can bootstrap"),
            ),
            Initialize::SystemId(_) | Initialize::Absent => release_leader(
                local,
                d,
                format!("{full}: we hold the leader key without a data directory"),
            ),
        }
        return true;
    }
    match healthy_replica(cluster, &local.name) {
        Some(r) => release_leader(
            local,
            d,
            format!("{full}: releasing the leader lease so a healthy replica ({r}) takes over rather than restarting into the same failure"),
        ),
        // Nobody to hand over to: keep the lease (primary_start_timeout
        // still gives it up in time).
        None => d.push(
            Action::RenewLeader,
            "holding the leader lease: no healthy replica to hand it to",
        ),
    }
    true
}

/// Another member running as a replica that could take over (streaming,
/// or in recovery after losing its upstream), not tagged nofailover.
fn healthy_replica<'a>(cluster: &'a ClusterView, me: &str) -> Option<&'a str> {
    cluster
        .members
        .iter()
        .find(|m| {
            m.name != me
                && !m.tags.nofailover
                && matches!(m.role, Role::Replica | Role::SyncStandby)
                && matches!(m.state, PgState::Streaming | PgState::InRecovery)
        })
        .map(|m| m.name.as_str())
}

/// We are the candidate a live switchover or failover request names.
fn named_candidate(cluster: &ClusterView, local: &LocalView) -> bool {
    cluster
        .failover
        .as_ref()
        .is_some_and(|f| f.candidate.as_deref() == Some(local.name.as_str()))
}

/// etcd could not be read: the view is the last one seen. A leader keeps
/// trying to renew (the core demotes it once renewals have failed for
/// retry_timeout); a primary with no confirmed lease stops at once, since
/// it cannot know whether another member leads now.
fn decide_without_dcs(cluster: &ClusterView, local: &LocalView, d: &mut Decision) {
    let i_lead = cluster.leader.as_deref() == Some(local.name.as_str());
    if i_lead || local.last_renew.is_some() {
        if let Some(members) = failsafe_members(cluster, local).filter(|_| local.pg.is_primary()) {
            d.push(
                Action::AskFailsafe(members),
                "failsafe mode: asking every member to confirm that it cannot reach etcd either",
            );
        }
        d.push(
            Action::RenewLeader,
            "cannot read the cluster from etcd: trying to renew the leader lease anyway",
        );
        d.waiting = Some("etcd is unreachable".into());
    } else if matches!(local.pg, PgRun::Unknown(_)) {
        d.push(
            Action::Fence,
            "cannot tell whether PostgreSQL runs, nor reach etcd: stopping it immediately",
        );
    } else if local.pg.is_primary() && local.job.is_none() {
        d.push(
            Action::Stop,
            "running as primary without a confirmed leader lease while etcd is unreachable: stopping PostgreSQL so that no write lands on a possibly deposed primary",
        );
    } else {
        d.waiting = Some("etcd is unreachable".into());
    }
}

/// Failsafe mode: the members to ask are exactly those recorded in etcd
/// (`failsafe`), which is what keeps every other member from running for
/// leader. Nothing recorded (or a member whose address we never saw):
/// no failsafe, the usual demotion.
fn failsafe_members(cluster: &ClusterView, local: &LocalView) -> Option<Vec<PeerAddress>> {
    if !cluster.config.failsafe_mode {
        return None;
    }
    let names = cluster.failsafe.as_ref()?;
    if !names.contains(&local.name) {
        return None;
    }
    let mut out = Vec::new();
    for name in names.iter().filter(|n| **n != local.name) {
        let m = members_known(cluster, local).find(|m| &m.name == name)?;
        out.push(peer_address(m));
    }
    Some(out)
}

/// Failsafe mode, what the leader records: every member it sees, and
/// itself, by name in order.
fn failsafe_topology(cluster: &ClusterView, local: &LocalView) -> Vec<String> {
    let mut names: Vec<String> = cluster.members.iter().map(|m| m.name.clone()).collect();
    names.push(local.name.clone());
    names.sort();
    names.dedup();
    names
}

/// Failsafe mode: a member the last leader did not record would not be
/// asked by it, so that leader may still run as primary unaware of us.
fn outside_failsafe_topology(cluster: &ClusterView, local: &LocalView) -> Option<String> {
    let names = cluster
        .failsafe
        .as_ref()
        .filter(|_| cluster.config.failsafe_mode)?;
    (!names.contains(&local.name)).then(|| {
        "failsafe: the last leader did not record us among the members it asks while etcd is away, so it may still run as primary without our consent: not a candidate".to_string()
    })
}

/// Failsafe mode: why we may not take the lease now, if so.
fn failsafe_keeps_us_out(
    cluster: &ClusterView,
    local: &LocalView,
    now: Duration,
) -> Option<String> {
    failsafe_holds_us(local, now).or_else(|| outside_failsafe_topology(cluster, local))
}

/// We confirmed another primary in failsafe mode less than ttl ago: it may
/// still run, writable, counting on us not to take the lease.
fn failsafe_holds_us(local: &LocalView, now: Duration) -> Option<String> {
    let (leader, until) = local.failsafe_granted.as_ref()?;
    let until = *until;
    (leader != &local.name && now < until).then(|| {
        format!(
            "failsafe: we confirmed {leader} as the primary while etcd was unreachable; not taking the lease for another {:.0}s",
            (until - now).as_secs_f64().ceil()
        )
    })
}

fn decide_empty(cluster: &ClusterView, local: &LocalView, now: Duration, d: &mut Decision) {
    let leader = cluster.leader.as_deref();
    let i_lead = leader == Some(local.name.as_str());
    match (&cluster.initialize, leader) {
        (Initialize::Absent, None) => {
            if backing_off(local, &JobKind::Bootstrap, cluster.config.loop_wait, now) {
                d.waiting = Some(
                    "our bootstrap failed: leaving the next attempt to another member for now"
                        .into(),
                );
            } else if let Some(why) = failsafe_keeps_us_out(cluster, local, now) {
                // A primary may be running on its failsafe confirmations
                // (data this etcd does not know of): a bootstrap claim is
                // a lease like any other.
                d.waiting = Some(why);
            } else if nobody_holds_data(cluster, local, now, d) {
                d.push(
                    Action::ClaimBootstrap,
                    "no cluster in etcd yet and no data directory: claiming the bootstrap",
                );
            }
        }
        (Initialize::Claimed, Some(_)) if i_lead => {
            if backing_off(local, &JobKind::Bootstrap, cluster.config.loop_wait, now) {
                d.push(
                    Action::AbandonBootstrap,
                    "bootstrap failed: withdrawing our claim so another member can bootstrap",
                );
            } else {
                d.push(Action::RenewLeader, "holding the bootstrap lease");
                d.push(
                    Action::Bootstrap,
                    "we won the bootstrap race: running initdb",
                );
            }
        }
        (Initialize::SystemId(_), Some(_)) if i_lead => release_leader(
            local,
            d,
            "we hold the leader key but have no data directory",
        ),
        (Initialize::SystemId(_), Some(name)) => match cluster.member(name) {
            Some(m) if m.role == Role::Leader && m.state == PgState::Running => {
                let from = name.to_string();
                if backing_off(
                    local,
                    &JobKind::Clone { from: from.clone() },
                    cluster.config.loop_wait,
                    now,
                ) {
                    d.waiting = Some(format!("waiting to retry the clone from {name}"));
                } else {
                    d.push(
                        Action::Clone {
                            from: from.clone(),
                            conn: format!("{}:{}", m.host, m.port),
                        },
                        format!("cloning from {name}: no data directory"),
                    );
                }
            }
            _ => {
                d.waiting = Some(format!(
                    "waiting for leader {name} to be running before cloning"
                ))
            }
        },
        (Initialize::SystemId(_), None) => {
            d.waiting = Some("waiting for a leader to clone from".into())
        }
        (Initialize::Claimed, _) => {
            d.waiting = Some(match leader {
                Some(l) => format!("waiting for {l} to bootstrap the cluster"),
                None => "waiting for the bootstrap in progress".into(),
            })
        }
        // Our claim expired on a lease of ours while the key moved on to
        // the next (a restart between claim and initdb): the key alone would
        // keep every member, us included, waiting for a bootstrap for good.
        (Initialize::Absent, Some(_)) if i_lead => release_leader(
            local,
            d,
            "we hold the leader key but etcd holds neither a cluster nor our bootstrap claim: releasing it so the bootstrap can be claimed again",
        ),
        (Initialize::Absent, Some(l)) => {
            d.waiting = Some(format!("waiting for {l} to initialize the cluster"))
        }
    }
}

/// How long an empty etcd is watched before initdb: after a wipe, members
/// re-publish their keys at their next pass or the one after (their
/// keep-alive finds the lease gone first), plus 2 s for the requests.
fn bootstrap_grace(loop_wait: u64) -> Duration {
    Duration::from_secs(2 * loop_wait + 2)
}

/// Before initdb under an empty etcd: no other member may hold data. An
/// etcd wiped (or restored empty) under a running cluster looks exactly like
/// a new one; initdb there would start a new, empty cluster over it.
fn nobody_holds_data(
    cluster: &ClusterView,
    local: &LocalView,
    now: Duration,
    d: &mut Decision,
) -> bool {
    let others = || cluster.members.iter().filter(|m| m.name != local.name);
    if let Some(m) = others().find(|m| m.role != Role::Uninitialized) {
        d.waiting = Some(format!(
            "etcd holds no cluster, but {} has a data directory: leaving the cluster to it, not running initdb",
            m.name
        ));
        return false;
    }
    let grace = bootstrap_grace(cluster.config.loop_wait);
    let since = local.no_cluster_since.unwrap_or(now);
    if now < since + grace {
        d.waiting = Some(format!(
            "etcd holds no cluster: waiting {}s for members with data to announce themselves before running initdb",
            (since + grace - now).as_secs_f64().ceil()
        ));
        return false;
    }
    // Members seen before etcd emptied may hold data and not be back yet.
    let mut known: Vec<&crate::dcs::MemberStatus> = others().collect();
    for m in local.known_members.iter().filter(|m| m.name != local.name) {
        if !known.iter().any(|k| k.name == m.name) {
            known.push(m);
        }
    }
    if known.is_empty() {
        return true;
    }
    let Some(peers) = local.peers.as_ref() else {
        d.need = Some(PeerQuery::Positions(
            known.iter().map(|m| peer_address(m)).collect(),
        ));
        d.waiting =
            Some("asking the other members whether any holds data before running initdb".into());
        return false;
    };
    for m in known {
        let answer = peers.iter().find(|p| p.name == m.name);
        match answer {
            Some(p) if p.system_id.is_some() => {
                d.waiting = Some(format!(
                    "etcd holds no cluster, but {} has a data directory (system identifier {}): not running initdb",
                    m.name,
                    p.system_id.as_deref().unwrap_or_default()
                ));
                return false;
            }
            Some(p) if p.answered => {}
            // Unknown is not absent: a member that had data and does not
            // answer may still have it.
            _ if m.role != Role::Uninitialized => {
                d.waiting = Some(format!(
                    "etcd holds no cluster and {}, which had a data directory, does not answer: not running initdb while it may hold the cluster's data",
                    m.name
                ));
                return false;
            }
            _ => {}
        }
    }
    true
}

fn decide_stopped(cluster: &ClusterView, local: &LocalView, now: Duration, d: &mut Decision) {
    let leader = cluster.leader.as_deref();
    if backing_off(local, &JobKind::Start, cluster.config.loop_wait, now) {
        d.waiting = Some("waiting to retry starting PostgreSQL".into());
        if leader == Some(local.name.as_str()) {
            release_leader(
                local,
                d,
                "PostgreSQL failed to start: letting a replica take over",
            );
        }
        return;
    }
    match leader {
        Some(l) if l == local.name => {
            if operator::leader_hands_over(cluster, local, d) {
                return;
            }
            // Everything after the renewal runs only once it confirmed the
            // lease (the core drops the rest of a pass whose renewal failed).
            d.push(Action::RenewLeader, "holding the leader lease");
            if local.control.as_ref().is_none_or(|c| c.was_primary) {
                d.push(
                    Action::StartPrimary,
                    "PostgreSQL is stopped and we hold the leader lease: starting it as primary",
                );
            } else {
                // A standby's data becomes primary only through promotion,
                // which opens a new timeline: starting it writable directly
                // would hide a fork from every rejoin check.
                d.push(
                    Action::StartReplica { upstream: None },
                    "we hold the leader lease over a standby's data: starting it to promote",
                );
            }
        }
        Some(l) => rejoin(cluster, local, l, d),
        None => {
            if let Some(timeline) = resumable_primary(cluster, local, now) {
                let Some(peers) = local.peers.as_ref() else {
                    d.need = Some(PeerQuery::Positions(peer_addresses(cluster, local)));
                    d.waiting = Some(format!(
                        "no leader; we stopped cleanly as the primary of timeline {timeline}: asking the other members whether any is further"
                    ));
                    return;
                };
                match ahead_of_resuming(cluster, local, peers, timeline) {
                    None => {
                        d.push(
                            Action::AcquireLeader,
                            format!("no leader, and we stopped cleanly as the primary of timeline {timeline} with no member ahead: taking the lease to start as primary again, without a promotion"),
                        );
                        return;
                    }
                    Some(why) => d.push(
                        Action::StartReplica { upstream: None },
                        format!("PostgreSQL is stopped and there is no leader ({why}): starting it read-only"),
                    ),
                }
                return;
            }
            // With `initialize` missing too (etcd wiped), the same: the
            // most advanced member is found by the election among running
            // replicas, and the winner publishes its system identifier.
            d.push(
                Action::StartReplica { upstream: None },
                "PostgreSQL is stopped and there is no leader: starting it read-only",
            )
        }
    }
}

/// The timeline this member would start on as primary again, without a
/// promotion, if it may now: its PostgreSQL stopped cleanly as the primary
/// of the cluster's latest known timeline (its renewals failed while etcd
/// was away, say). Nobody can be further on that timeline than its
/// shutdown checkpoint, so taking the lease back spares every member a
/// timeline switch and the rewinds that follow. Its `/status` says so, and
/// replicas stand back for it.
pub fn resumable_primary(cluster: &ClusterView, local: &LocalView, now: Duration) -> Option<u32> {
    if local.pg != PgRun::Stopped || local.tags.nofailover || cluster.failover.is_some() {
        return None;
    }
    let control = local
        .control
        .as_ref()
        .filter(|c| c.clean_shutdown && c.was_primary)?;
    let DataDir::Initialized { system_id } = &local.data else {
        return None;
    };
    // An etcd wiped or restored: the election among running members
    // decides (`nobody_holds_data`), not a stopped one's say-so.
    if cluster.initialize != Initialize::SystemId(system_id.clone()) {
        return None;
    }
    let later = |timeline: u32, lsn: u64| {
        timeline > control.timeline
            || (timeline == control.timeline && lsn > control.checkpoint_lsn)
    };
    if cluster
        .status
        .as_ref()
        .is_some_and(|s| later(s.timeline, s.wal_lsn))
        || cluster
            .history
            .iter()
            .any(|h| h.timeline > control.timeline)
    {
        return None;
    }
    if not_a_candidate(cluster, local, now).is_some()
        || failsafe_keeps_us_out(cluster, local, now).is_some()
    {
        return None;
    }
    Some(control.timeline)
}

/// Why a cleanly stopped primary may not take the lease back (None: it
/// may): a member of this cluster already runs as primary, runs on a later
/// timeline (someone was promoted), or resumes the same timeline too and
/// wins the tie by name.
fn ahead_of_resuming(
    cluster: &ClusterView,
    local: &LocalView,
    peers: &[PeerPosition],
    timeline: u32,
) -> Option<String> {
    let others = || {
        peers
            .iter()
            .filter(|p| p.name != local.name && p.answered)
            .filter(|p| of_this_cluster(cluster, p))
    };
    if let Some(p) = others().find(|p| p.running_primary) {
        return Some(format!("{} runs as primary", p.name));
    }
    if let Some(p) = others().find(|p| p.timeline.is_some_and(|t| t > timeline)) {
        return Some(format!("{} is on a later timeline", p.name));
    }
    others()
        .find(|p| p.resumes_on == Some(timeline) && p.name < local.name)
        .map(|p| format!("{} resumes timeline {timeline} too", p.name))
}

fn decide_primary(
    cluster: &ClusterView,
    local: &LocalView,
    pg: &PgRunning,
    system_id: Option<&str>,
    now: Duration,
    d: &mut Decision,
) {
    #[cfg(test)]
    let cfg = &cluster.config;
    match cluster.leader.as_deref() {
        Some(l) if l == local.name => {
            if local.last_renew.is_none() {
                if local.leader_key_not_ours {
                    // Nobody renews that key: when it expires another member
                    // is elected while we would still accept writes.
                    d.push(
                        Action::Fence,
                        "the leader key names us but is on a lease we cannot renew (another agent's with our name, or one we no longer know): stopping PostgreSQL immediately",
                    );
                    return;
                }
                // A restarted agent adopting its running primary: confirm the
                // key is ours before treating the lease as held.
                d.push(
                    Action::RenewLeader,
                    "confirming our leader lease after agent start",
                );
                return;
            }
            #[cfg(test)]
            if local.mutation == Some(super::Mutation::OldFreshnessRule)
                && local
                    .last_renew
                    .is_some_and(|t| now.saturating_sub(t) >= Duration::from_secs(cfg.retry_timeout))
            {
                d.push(Action::Stop, "mutant: lease not renewed within retry_timeout");
                d.push(Action::ReleaseLeader, "mutant: giving up the leader key");
                return;
            }
            d.push(Action::RenewLeader, "renewing the leader lease");
            if let Some(id) = system_id.filter(|id| cluster.initialize != Initialize::SystemId(id.to_string())) {
                d.push(
                    Action::PublishSystemId(id.to_string()),
                    format!("bootstrap complete: publishing system identifier {id}"),
                );
            }
            if !cluster.config_stored {
                d.push(
                    Action::InitConfig,
                    "storing the bootstrap dynamic configuration in etcd",
                );
            }
            manage_slots(cluster, local, pg, now, d);
            d.push(Action::WriteStatus, "publishing the primary's WAL position");
            super::sync::manage_sync(cluster, local, pg, d);
            if cluster.config.failsafe_mode {
                let topology = failsafe_topology(cluster, local);
                if cluster.failsafe.as_ref() != Some(&topology) {
                    d.push(
                        Action::WriteFailsafe(topology),
                        "failsafe mode: recording the members we would ask while etcd is away",
                    );
                }
            }
            reload_if_outdated(local, d);
            operator::leader_handles_request(cluster, local, pg, d);
        }
        Some(l) => d.push(
            Action::Stop,
            format!("{l} holds the leader lease but we run as primary: stopping to rejoin as its replica"),
        ),
        None => d.push(
            Action::AcquireLeader,
            "running as primary and nobody holds the leader lease: taking it",
        ),
    }
}

fn decide_replica(
    cluster: &ClusterView,
    local: &LocalView,
    pg: &PgRunning,
    now: Duration,
    d: &mut Decision,
) {
    match cluster.leader.as_deref() {
        Some(l) if l == local.name => {
            // An election won in the instant we confirmed another primary
            // in failsafe mode: that primary may still be writable.
            // Holding the key is safe, promoting is not; releasing could
            // leave a promotion already signalled (by this agent before a
            // restart) to finish without the key.
            if let Some(reason) = failsafe_holds_us(local, now) {
                d.push(Action::RenewLeader, "holding the leader lease");
                d.waiting = Some(format!("not promoting yet: {reason}"));
                return;
            }
            if let Some(reason) = outside_failsafe_topology(cluster, local) {
                d.push(Action::ReleaseLeader, format!("not promoting: {reason}"));
                return;
            }
            // Rule 3 again, on this pass's `status`: the election may have
            // judged an older one (another leader came and went while we
            // asked our peers). An operator's named candidate is exempt.
            if !named_candidate(cluster, local) {
                if let Some(reason) = lag_too_big(cluster, local, pg) {
                    d.push(Action::ReleaseLeader, format!("not promoting: {reason}"));
                    return;
                }
                // Promotion copies a WAL segment onto the new timeline: on
                // a full disk it PANICs.
                if let Some(full) = disk_full(local) {
                    d.push(Action::ReleaseLeader, format!("not promoting: {full}"));
                    return;
                }
            }
            d.push(Action::RenewLeader, "holding the leader lease");
            // Slots first (a standby can hold physical slots): replicas
            // re-point at us as soon as they see the new leader key, and
            // a missing slot would make each wait out a 5 s retry.
            manage_slots(cluster, local, pg, now, d);
            d.push(Action::Promote, "we hold the leader lease: promoting");
        }
        Some(l) if diverged_from(cluster, local, l) => d.push(
            Action::Stop,
            format!("our data last ran as a primary on an older timeline than leader {l}'s: stopping to rewind before following it"),
        ),
        Some(l) => match upstream_of(cluster, l) {
            Some(up) if pg.upstream.as_deref() != Some(up.address.as_str()) => d.push(
                Action::Follow { upstream: up },
                format!("re-pointing replication at the leader {l}"),
            ),
            Some(_) => reload_if_outdated(local, d),
            None => d.waiting = Some(format!("leader {l} has not published its address")),
        },
        None => {
            if let Some(reason) = failsafe_keeps_us_out(cluster, local, now) {
                d.waiting = Some(reason);
                return;
            }
            match operator::replica_verdict(cluster, local) {
                Some(ReplicaVerdict::TakeLease(reason)) => {
                    d.push(Action::AcquireLeader, reason);
                    return;
                }
                Some(ReplicaVerdict::LeaveTo(reason)) => {
                    d.waiting = Some(reason);
                    return;
                }
                None => {}
            }
            if local.tags.nofailover {
                d.waiting = Some("no leader; tagged nofailover, so not a candidate".into());
                return;
            }
            if let Some(why) = not_a_candidate(cluster, local, now) {
                d.waiting = Some(format!("no leader, but not a candidate: {why}"));
                return;
            }
            if let Some(reason) = lag_too_big(cluster, local, pg) {
                d.waiting = Some(reason);
                return;
            }
            let Some(peers) = local.peers.as_ref() else {
                d.need = Some(PeerQuery::Positions(peer_addresses(cluster, local)));
                d.waiting = Some("no leader: asking the other members how far they are".into());
                return;
            };
            if let Some(better) = better_candidate(cluster, local, peers, pg) {
                d.waiting = Some(format!(
                    "no leader, but {better} is a better failover candidate: leaving the lease to it"
                ));
                return;
            }
            #[cfg(test)]
            if local.mutation == Some(super::Mutation::PromoteWithoutLease) {
                d.push(Action::Promote, "mutant: promoting without the lease");
                return;
            }
            d.push(
                Action::AcquireLeader,
                "no leader and we are a healthy candidate: taking the lease",
            );
        }
    }
}

/// Every other member, to ask for its position: those in etcd and those
/// seen there before. After an outage longer than ttl every member key has
/// expired, and members re-publish one by one; asking only the keys present
/// would find nobody ahead and elect whoever asks first (observed: a
/// replica promoted over the clean primary that was about to resume).
/// The members in etcd, then those seen before whose keys expired since.
fn members_known<'a>(
    cluster: &'a ClusterView,
    local: &'a LocalView,
) -> impl Iterator<Item = &'a crate::dcs::MemberStatus> {
    cluster.members.iter().chain(&local.known_members)
}

fn peer_addresses(cluster: &ClusterView, local: &LocalView) -> Vec<PeerAddress> {
    let mut out: Vec<PeerAddress> = Vec::new();
    for m in members_known(cluster, local) {
        if m.name != local.name && !out.iter().any(|p| p.name == m.name) {
            out.push(peer_address(m));
        }
    }
    out
}

fn peer_address(m: &crate::dcs::MemberStatus) -> PeerAddress {
    PeerAddress {
        name: m.name.clone(),
        api_url: m.api_url.clone(),
        address: format!("{}:{}", m.host, m.port),
        nofailover: m.tags.nofailover,
        failover_priority: m.tags.failover_priority,
    }
}

/// A stopped member rejoins a cluster led by `leader`: as a plain replica
/// when its data is on the leader's history, by pg_rewind when it was a
/// primary on another timeline.
fn rejoin(cluster: &ClusterView, local: &LocalView, leader: &str, d: &mut Decision) {
    let Some(m) = cluster.member(leader) else {
        d.waiting = Some(format!(
            "waiting for leader {leader} to publish its address"
        ));
        return;
    };
    let upstream = Upstream {
        name: leader.to_string(),
        address: format!("{}:{}", m.host, m.port),
    };
    let diverged = local.control.as_ref().filter(|c| c.was_primary);
    let Some(ours) = diverged else {
        d.push(
            Action::StartReplica {
                upstream: Some(upstream),
            },
            format!("PostgreSQL is stopped: starting it as a replica of {leader}"),
        );
        return;
    };
    if m.role != Role::Leader || m.state != PgState::Running {
        d.waiting = Some(format!(
            "waiting for leader {leader} to run as primary before rejoining"
        ));
        return;
    }
    // A clean shutdown whose checkpoint lies before the point where the
    // leader's timeline forked (a switchover): nothing to rewind.
    if forked_after(cluster, ours, m.timeline) {
        d.push(
            Action::StartReplica { upstream: Some(upstream) },
            format!("we shut down cleanly before {leader}'s timeline forked: starting as its replica without rewind"),
        );
        return;
    }
    match m.timeline {
        Some(tl) if tl == ours.timeline => d.push(
            Action::StartReplica { upstream: Some(upstream) },
            format!("PostgreSQL is stopped and on the leader's timeline {tl}: starting it as a replica of {leader}"),
        ),
        Some(tl) => {
            let failed = local.last_failure.as_ref().filter(|f| matches!(f.kind, JobKind::Rewind { .. }));
            if let Some(f) = failed {
                if local.reclone_on_rewind_failure {
                    d.push(
                        Action::RemoveData,
                        format!("pg_rewind failed ({}): removing the data directory to clone {leader} afresh", f.message),
                    );
                } else {
                    d.problem = Some(format!(
                        "pg_rewind from {leader} failed: {}; not starting (set postgresql.remove_data_directory_on_rewind_failure to re-clone automatically)",
                        f.message
                    ));
                }
            } else if !cluster.config.use_pg_rewind {
                if local.reclone_on_rewind_failure {
                    d.push(
                        Action::RemoveData,
                        format!("our data diverged from {leader} and use_pg_rewind is off: removing it to clone afresh"),
                    );
                } else {
                    d.problem = Some(format!(
                        "our data diverged from {leader} (timeline {} vs {tl}) and use_pg_rewind is off: not starting",
                        ours.timeline
                    ));
                }
            } else {
                d.push(
                    Action::Rewind { upstream },
                    format!(
                        "we were a primary on timeline {} and {leader} now leads on timeline {tl}: rewinding with pg_rewind before rejoining",
                        ours.timeline
                    ),
                );
            }
        }
        None => d.waiting = Some(format!("waiting for leader {leader} to publish its timeline")),
    }
}

/// Gives up the leader key — but only once PostgreSQL is known not to run:
/// a key released over a primary that may still take writes lets a
/// replica be promoted beside it. Otherwise it is stopped first (fenced),
/// and the key goes on a later pass.
fn release_leader(local: &LocalView, d: &mut Decision, reason: impl Into<String>) {
    let cannot_write = match &local.pg {
        PgRun::Stopped => true,
        PgRun::Running(pg) => pg.in_recovery,
        PgRun::Unresponsive | PgRun::Unknown(_) | PgRun::Orphaned => false,
    };
    if cannot_write {
        d.push(Action::ReleaseLeader, reason);
    } else {
        d.push(
            Action::Fence,
            format!(
                "{}; PostgreSQL may still run: stopping it first",
                reason.into()
            ),
        );
        d.push(
            Action::RenewLeader,
            "keeping the leader lease until PostgreSQL is down",
        );
    }
}

fn reload_if_outdated(local: &LocalView, d: &mut Decision) {
    if local.conf_outdated {
        d.push(
            Action::Reload,
            "configuration changed: rewriting PostgreSQL's config files and reloading",
        );
    }
}

/// Maintenance mode: observe, keep the leader key of a running primary,
/// and act only on explicit operator requests.
fn decide_paused(cluster: &ClusterView, local: &LocalView, now: Duration, d: &mut Decision) {
    let i_lead = cluster.leader.as_deref() == Some(local.name.as_str());
    if !local.dcs_ok {
        // Fencing is not an automatic action to hold back: a paused leader
        // that cannot renew still stops before its lease may expire.
        decide_without_dcs(cluster, local, d);
        d.waiting = Some("paused; etcd is unreachable".into());
        return;
    }
    if local.job.is_some() {
        if i_lead {
            d.push(
                Action::RenewLeader,
                "holding the leader lease while a job runs",
            );
        }
        d.waiting = Some("paused; a job is running".into());
        return;
    }
    if operator::member_request(cluster, local, d) {
        return;
    }
    // Hands off, but an operator's failover must not make another cluster's
    // data the leader: its `status` would then judge every real candidate.
    if let Some(problem) = foreign_data(cluster, local) {
        d.problem = Some(problem);
        if !i_lead {
            return;
        }
    }
    match &local.pg {
        PgRun::Running(pg) if !pg.in_recovery => match cluster.leader.as_deref() {
            Some(l) if l == local.name => {
                d.push(Action::RenewLeader, "renewing the leader lease");
                manage_slots(cluster, local, pg, now, d);
                d.push(Action::WriteStatus, "publishing the primary's WAL position");
                // Not a lifecycle action: commits would otherwise wait (or
                // run unprotected) for the whole maintenance.
                super::sync::manage_sync(cluster, local, pg, d);
                operator::leader_handles_request(cluster, local, pg, d);
            }
            Some(l) => {
                d.problem = Some(format!(
                    "paused: we run as primary while {l} holds the leader lease"
                ))
            }
            None => d.push(
                Action::AcquireLeader,
                "paused, running as primary without a leader: taking the lease",
            ),
        },
        PgRun::Running(pg) => match cluster.leader.as_deref() {
            Some(l) if l == local.name => {
                d.push(Action::RenewLeader, "holding the leader lease");
                d.push(
                    Action::Promote,
                    "operator's failover gave us the leader lease: promoting",
                );
            }
            Some(l) => {
                if let Some(up) = upstream_of(cluster, l) {
                    if pg.upstream.as_deref() != Some(up.address.as_str()) {
                        d.push(
                            Action::Follow { upstream: up },
                            format!("re-pointing replication at the leader {l}"),
                        );
                    }
                }
            }
            None => match operator::replica_verdict(cluster, local) {
                Some(ReplicaVerdict::TakeLease(reason)) => {
                    match failsafe_keeps_us_out(cluster, local, now) {
                        Some(why) => d.waiting = Some(why),
                        None => d.push(Action::AcquireLeader, reason),
                    }
                }
                _ => {
                    d.waiting = Some(
                        "paused: no leader, and no automatic failover in maintenance mode".into(),
                    )
                }
            },
        },
        PgRun::Stopped | PgRun::Unresponsive | PgRun::Unknown(_) | PgRun::Orphaned => {
            if local.pg == PgRun::Orphaned {
                d.problem =
                    Some("paused: the data directory is gone under a running PostgreSQL".into());
            }
            if i_lead && !operator::leader_hands_over(cluster, local, d) {
                d.push(Action::RenewLeader, "paused: keeping the leader lease");
            }
            if d.waiting.is_none() {
                d.waiting = Some("paused: not starting PostgreSQL".into());
            }
        }
    }
}

/// We run as a replica over data that was a primary on an older timeline
/// than the leader's: following it would fail or, worse, hide a fork.
fn diverged_from(cluster: &ClusterView, local: &LocalView, leader: &str) -> bool {
    let Some(ours) = local.control.as_ref().filter(|c| c.was_primary) else {
        return false;
    };
    let leader_tl = cluster.member(leader).and_then(|m| m.timeline);
    leader_tl.is_some_and(|tl| tl != ours.timeline) && !forked_after(cluster, ours, leader_tl)
}

/// We shut down cleanly before the point where the leader's timeline forked
/// (a switchover): our WAL is a prefix of the leader's, nothing to rewind.
fn forked_after(cluster: &ClusterView, ours: &ControlInfo, leader_timeline: Option<u32>) -> bool {
    cluster
        .history
        .iter()
        .rev()
        .find(|h| Some(h.timeline) == leader_timeline)
        .is_some_and(|h| ours.clean_shutdown && h.lsn > ours.checkpoint_lsn)
}

/// Rule 3: another reachable candidate further ahead (ties: higher
/// failover_priority, then the smaller name) gets the lease instead.
/// A peer whose system identifier (when it reported one) is the cluster's.
fn of_this_cluster(cluster: &ClusterView, peer: &PeerPosition) -> bool {
    match (&cluster.initialize, &peer.system_id) {
        (Initialize::SystemId(c), Some(id)) => c == id,
        _ => true,
    }
}

fn better_candidate(
    cluster: &ClusterView,
    local: &LocalView,
    peers: &[PeerPosition],
    pg: &PgRunning,
) -> Option<String> {
    let ours = pg.receive_lsn.max(pg.wal_lsn).unwrap_or(0);
    let our_prio = local.tags.failover_priority;
    // A member holding another cluster's data refuses to lead; standing
    // back for it would leave the lease to nobody, for good.
    // Nor for one that failsafe mode keeps from running.
    let in_topology = |p: &&PeerPosition| match &cluster.failsafe {
        Some(names) if cluster.config.failsafe_mode => names.contains(&p.name),
        _ => true,
    };
    let others = || {
        peers
            .iter()
            .filter(|p| p.name != local.name)
            .filter(|p| of_this_cluster(cluster, p))
            .filter(in_topology)
            .filter(|p| {
                #[cfg(test)]
                if local.mutation == Some(super::Mutation::SyncElectAnyone) {
                    return true;
                }
                !cluster.sync_excludes(&p.name)
            })
    };
    // A peer already running as primary takes the lease without a new
    // timeline: electing a replica instead would rewind a healthy primary.
    if let Some(p) = others().find(|p| p.running_primary) {
        return Some(p.name.clone());
    }
    // Nor a clean primary of our timeline (or a later one): it has all of
    // it and takes the lease back without a promotion.
    let our_timeline = pg.timeline.unwrap_or(0);
    if let Some(p) = others().find(|p| p.resumes_on.is_some_and(|t| t >= our_timeline)) {
        return Some(p.name.clone());
    }
    others()
        .filter(|p| !p.nofailover && p.candidate)
        .find(|p| match p.wal_lsn {
            Some(lsn) if lsn > ours => true,
            Some(lsn) if lsn == ours => {
                p.failover_priority > our_prio
                    || (p.failover_priority == our_prio && p.name < local.name)
            }
            _ => false,
        })
        .map(|p| p.name.clone())
}

fn lag_too_big(cluster: &ClusterView, local: &LocalView, pg: &PgRunning) -> Option<String> {
    #[cfg(test)]
    if local.mutation == Some(super::Mutation::IgnoreMaximumLag) {
        return None;
    }
    // A synchronous standby has every acknowledged commit; how far it
    // replayed does not matter.
    if cluster.config.synchronous_mode
        && cluster
            .sync
            .as_ref()
            .is_some_and(|s| s.sync_standby.contains(&local.name))
    {
        return None;
    }
    let status = cluster.status.as_ref()?;
    let ours = pg.receive_lsn.max(pg.wal_lsn).unwrap_or(0);
    let lag = status.wal_lsn.saturating_sub(ours);
    (lag > cluster.config.maximum_lag_on_failover).then(|| {
        format!(
            "no leader, but we are {lag} bytes behind the last primary position (maximum_lag_on_failover {}): not a candidate",
            cluster.config.maximum_lag_on_failover
        )
    })
}

/// The leader creates a slot for every other member, also for one seen in
/// etcd less than member_slots_ttl ago, and drops slots of members gone
/// longer than that.
fn manage_slots(
    cluster: &ClusterView,
    local: &LocalView,
    pg: &PgRunning,
    now: Duration,
    d: &mut Decision,
) {
    let cfg = &cluster.config;
    if !cfg.use_slots {
        return;
    }
    let mut wanted: Vec<String> = cluster
        .members
        .iter()
        .filter(|m| m.name != local.name)
        .map(|m| slot_name(&m.name))
        .collect();
    // Members seen lately whose keys expired (the old primary of a
    // failover, a server that crashed): their slot is there when they
    // rejoin, so their first connection does not fail and wait out
    // wal_retrieve_retry_interval.
    for name in local.members_seen.keys().filter(|n| **n != local.name) {
        let slot = slot_name(name);
        if !wanted.contains(&slot) {
            wanted.push(slot);
        }
    }
    let missing: Vec<String> = wanted
        .iter()
        .filter(|s| !pg.slots.contains(s))
        .cloned()
        .collect();
    if !missing.is_empty() {
        d.push(
            Action::CreateSlots(missing.clone()),
            format!("creating replication slots for {}", missing.join(", ")),
        );
    }
    let ttl = Duration::from_secs(cfg.member_slots_ttl);
    let stale: Vec<String> = pg
        .slots
        .iter()
        .filter(|s| !wanted.contains(s))
        .filter(|s| {
            local
                .slot_last_seen
                .get(*s)
                .is_some_and(|seen| now.saturating_sub(*seen) >= ttl)
        })
        .cloned()
        .collect();
    if !stale.is_empty() {
        d.push(
            Action::DropSlots(stale.clone()),
            format!(
                "dropping replication slots of members gone for over {}s: {}",
                cfg.member_slots_ttl,
                stale.join(", ")
            ),
        );
    }
}

/// The role PostgreSQL's config files should describe for a running
/// instance: None for a primary; for a replica, Some(the upstream): the
/// leader, or the one it streams from when no other member leads. One
/// function for both the "outdated?" check and the rewrite on reload, so
/// the two cannot disagree.
pub fn conf_role(cluster: &ClusterView, me: &str, pg: &PgRunning) -> Option<Option<Upstream>> {
    if !pg.in_recovery {
        return None;
    }
    let leader = cluster.leader.as_deref().filter(|l| *l != me);
    Some(leader.and_then(|l| upstream_of(cluster, l)).or_else(|| {
        pg.upstream.clone().map(|address| Upstream {
            name: String::new(),
            address,
        })
    }))
}

fn upstream_of(cluster: &ClusterView, name: &str) -> Option<Upstream> {
    cluster.member(name).map(|m| Upstream {
        name: name.to_string(),
        address: format!("{}:{}", m.host, m.port),
    })
}

fn backing_off(local: &LocalView, kind: &JobKind, loop_wait: u64, now: Duration) -> bool {
    local.last_failure.as_ref().is_some_and(|f| {
        &f.kind == kind
            && now.saturating_sub(f.at) < Duration::from_secs(loop_wait.max(1) * RETRY_LOOPS)
    })
}

fn job_name(job: &JobKind) -> String {
    match job {
        JobKind::Bootstrap => "bootstrap".into(),
        JobKind::Clone { from } => format!("clone from {from}"),
        JobKind::Start => "start".into(),
        JobKind::Stop => "stop".into(),
        JobKind::Rewind { from } => format!("rewind from {from}"),
        JobKind::RemoveData => "removal of the data directory".into(),
        JobKind::Promote => "promotion".into(),
        JobKind::Restart => "restart".into(),
    }
}

impl Decision {
    pub(super) fn push(&mut self, action: Action, reason: impl Into<String>) {
        // One renewal per pass, however many branches ask for it.
        if action == Action::RenewLeader && self.steps.iter().any(|s| s.action == action) {
            return;
        }
        self.steps.push(Step {
            action,
            reason: reason.into(),
        });
    }

    pub fn actions(&self) -> Vec<&Action> {
        self.steps.iter().map(|s| &s.action).collect()
    }
}
