//! The safety rules of DESIGN.md as facts about the model, checked after
//! every step, and the liveness check once faults have stopped.

use super::etcd::{self, Value};
use super::World;
use crate::ha::{Action, Step};

impl World {
    pub fn fail(&mut self, what: String) {
        if self.failure.is_none() {
            self.trace(None, || format!("VIOLATION: {what}"));
            self.failure = Some(what);
        }
    }

    /// Rules 1 and 2: at most one PostgreSQL accepts writes, and only the
    /// member named by the leader key — which exists only while the lease
    /// holding it has not expired on etcd's clock, so a leader cut from
    /// etcd must have stopped taking writes by then.
    pub fn check_safety(&mut self) {
        let writable: Vec<usize> = (0..self.members.len())
            .filter(|&i| self.members[i].pg.writable())
            .collect();
        if writable.len() > 1 {
            let names: Vec<&str> = writable
                .iter()
                .map(|&i| self.members[i].name.as_str())
                .collect();
            self.fail(format!(
                "split brain: {} are all writable",
                names.join(", ")
            ));
            return;
        }
        for &i in &writable {
            self.check_no_loss(i);
            let name = &self.members[i].name;
            match self.etcd.leader() {
                Some(l) if l == name => {}
                Some(l) => {
                    let l = l.to_string();
                    self.fail(format!("{name} is writable but {l} holds the leader key"));
                }
                None if self.failsafe_covers(i) => {}
                None => self.fail(format!(
                    "{name} is writable but no leader key exists (its lease expired or was never taken)"
                )),
            }
        }
    }

    /// Synchronous mode: how far the writable primary's commits are
    /// acknowledged, by its synchronous_standby_names as PostgreSQL applies
    /// them (`FIRST n (…)`: every listed standby has flushed it; empty:
    /// at once, unprotected).
    pub fn acknowledge(&mut self) {
        if self.plan.sync.is_none() {
            return;
        }
        let Some(p) = (0..self.members.len()).find(|&i| self.members[i].pg.writable()) else {
            return;
        };
        let Some(d) = self.members[p].pg.data.clone() else {
            return;
        };
        let names = self.members[p].pg.standby_names.trim().to_string();
        let has = |m: &super::member::Member| {
            m.pg.data
                .as_ref()
                .filter(|x| x.can_follow(&d))
                .map_or(0, |x| x.lsn)
        };
        let point = if names.is_empty() {
            if d.lsn > self.acked.as_ref().map_or(0, |a| a.1) && self.plan.sync == Some(false) {
                self.unprotected = true;
            }
            d.lsn
        } else {
            match crate::ha::parse_standby_names(&names) {
                Some(set) if set.is_empty() => 0,
                Some(set) => set
                    .iter()
                    .map(|n| self.members.iter().find(|m| &m.name == n).map_or(0, has))
                    .min()
                    .unwrap_or(0),
                // Not a value pgwarden writes.
                None => 0,
            }
        }
        .min(d.lsn);
        if point > self.acked.as_ref().map_or(0, |a| a.1) || self.acked.is_none() && point > 0 {
            self.acked = Some((d.history.clone(), point));
        }
    }

    /// Synchronous mode: a writable primary has every acknowledged commit.
    fn check_no_loss(&mut self, i: usize) {
        let Some((history, lsn)) = self.acked.clone() else {
            return;
        };
        if self.unprotected {
            return;
        }
        let timeline_at = |h: &[(u32, u64)]| {
            h.iter()
                .take_while(|(_, start)| *start < lsn)
                .last()
                .map_or(1, |(t, _)| *t)
        };
        let has = self.members[i]
            .pg
            .data
            .as_ref()
            .is_some_and(|d| d.lsn >= lsn && timeline_at(&d.history) == timeline_at(&history));
        if !has {
            let name = self.members[i].name.clone();
            self.fail(format!(
                "{name} is writable without the acknowledged commit ending at {lsn:#x} on timeline {}: synchronous mode lost it",
                timeline_at(&history)
            ));
        }
    }

    /// Failsafe mode: a primary may stay writable without the key while no
    /// other member could take the lease: each running agent has confirmed
    /// a primary less than its ttl ago (an agent that is down takes none;
    /// a restarted one keeps the promise it recorded on disk, and waits a
    /// ttl after its first read of etcd in any case).
    fn failsafe_covers(&self, i: usize) -> bool {
        if !self.plan.failsafe {
            return false;
        }
        (0..self.members.len()).filter(|&j| j != i).all(|j| {
            let Some(a) = self.members[j].agent.as_ref() else {
                return true;
            };
            // Its first view starts a ttl without lease (restarted agent).
            if !a.core.cluster_seen() {
                return true;
            }
            // Left out of the recorded topology: never a candidate (it
            // must read etcd, and so the topology, to take the lease; and
            // with no leader key nobody rewrites the topology).
            let name = &self.members[j].name;
            if let Some(Value::Names(t)) = self.etcd.get(etcd::FAILSAFE) {
                if !t.contains(name) {
                    return true;
                }
            }
            a.core
                .local_view()
                .failsafe_granted
                .is_some_and(|(_, until)| self.local_now(j) < until)
        })
    }

    /// Rule 3: nobody promotes beyond maximum_lag_on_failover of the last
    /// primary position published in `status`, unless an operator named
    /// it (a switchover or manual failover checks lag its own way).
    pub fn check_promotion_lag(&mut self, i: usize) {
        let name = self.members[i].name.clone();
        if let Some(Value::Failover(f)) = self.etcd.get(etcd::FAILOVER) {
            if f.candidate.as_deref() == Some(name.as_str()) {
                return;
            }
        }
        // Synchronous mode: a listed standby has every acknowledged commit
        // (checked by `check_no_loss`); its replay lag does not matter.
        if self.plan.sync.is_some() {
            if let Some(Value::Sync(s)) = self.etcd.get(etcd::SYNC) {
                if s.sync_standby.contains(&name) {
                    return;
                }
            }
        }
        let Some(Value::Status(status)) = self.etcd.get(etcd::STATUS) else {
            return;
        };
        let status_lsn = status.wal_lsn;
        let Some(ours) = self.members[i].pg.data.as_ref().map(|d| d.lsn) else {
            return;
        };
        let max = self.config().maximum_lag_on_failover;
        if status_lsn > ours.saturating_add(max) {
            self.fail(format!(
                "{name} promotes {} bytes behind the last primary position {status_lsn} (maximum_lag_on_failover {max})",
                status_lsn - ours
            ));
        }
    }

    /// Rule 6: while the member's view says paused, no automatic start,
    /// stop, promotion, rewind, clone or removal — only what an operator
    /// asked for and fencing.
    pub fn check_paused_action(&mut self, i: usize, step: &Step) {
        let Some(a) = self.members[i].agent.as_ref() else {
            return;
        };
        let cluster = a.core.cluster();
        if !cluster.config.pause {
            return;
        }
        let name = self.members[i].name.as_str();
        let i_lead = cluster.leader.as_deref() == Some(name);
        let requested = a.acked_request;
        let justified = match &step.action {
            Action::StartPrimary
            | Action::StartReplica { .. }
            | Action::Rewind { .. }
            | Action::Clone { .. }
            | Action::Bootstrap => false,
            Action::RemoveData | Action::Restart => requested,
            Action::Stop => {
                requested
                    || !a.core.dcs_ok()
                    || step
                        .reason
                        .starts_with("renewing the leader lease has failed")
            }
            Action::Promote => i_lead || cluster.failover.is_some(),
            _ => true,
        };
        if !justified {
            let what = format!(
                "{name} does {:?} while paused: {}",
                step.action, step.reason
            );
            self.fail(what);
        }
    }

    /// Unknown is not absent: a pass that could not read PostgreSQL's state
    /// or the data directory starts, clones, rewinds, bootstraps or removes
    /// nothing (fencing and renewing are what it may do). An operator's
    /// reinit is the exception: it is how an unreadable data directory is
    /// replaced (the policy still refuses it with PostgreSQL's state
    /// unknown).
    pub fn check_unknown_action(&mut self, i: usize, step: &Step) {
        let Some(a) = self.members[i].agent.as_ref() else {
            return;
        };
        if !a.observed_unknown {
            return;
        }
        let destructive = match step.action {
            Action::StartPrimary
            | Action::StartReplica { .. }
            | Action::Rewind { .. }
            | Action::Clone { .. }
            | Action::Bootstrap
            | Action::ClaimBootstrap => true,
            Action::RemoveData => !a.acked_request,
            _ => false,
        };
        if destructive {
            let what = format!(
                "{} does {:?} on an observation it could not read: {}",
                self.members[i].name, step.action, step.reason
            );
            self.fail(what);
        }
    }

    /// Once faults have stopped: exactly one leader, running as primary,
    /// and every other member streaming from it.
    pub fn check_liveness(&mut self) {
        let Some(leader) = self.etcd.leader().map(str::to_string) else {
            if self.no_candidate_sync_allows() {
                // Rule 4 working as designed: only a forced failover may
                // elect a member that may lack acknowledged commits.
                self.trace(None, || {
                    "EXPECTED: no member `sync` allows can take over".into()
                });
                self.known
                    .push("synchronous mode: no member `sync` allows can take over".into());
                return;
            }
            if self.no_candidate_within_lag() {
                // Rule 3 working as designed: nobody may take over
                // automatically; an operator's manual failover must.
                self.trace(None, || {
                    "EXPECTED: no member within maximum_lag_on_failover".into()
                });
                self.known
                    .push("no candidate within maximum_lag_on_failover".into());
                return;
            }
            let states: Vec<String> = self
                .members
                .iter()
                .map(|m| {
                    format!(
                        "{}: {:?} data {} waiting {:?} problem {:?}",
                        m.name,
                        m.pg.run,
                        m.pg.data.as_ref().map_or("none".to_string(), |d| format!(
                            "tl {} lsn {}",
                            d.timeline(),
                            d.lsn
                        )),
                        m.agent
                            .as_ref()
                            .and_then(|a| a.core.decision().waiting.clone()),
                        m.agent
                            .as_ref()
                            .and_then(|a| a.core.decision().problem.clone()),
                    )
                })
                .collect();
            self.fail(format!(
                "liveness: no leader once faults stopped ({})",
                states.join("; ")
            ));
            return;
        };
        let Some(l) = self.member_by_name(&leader) else {
            self.fail(format!("liveness: leader key names unknown {leader}"));
            return;
        };
        if !self.members[l].pg.writable() {
            self.fail(format!(
                "liveness: leader {leader} is not running as primary"
            ));
            return;
        }
        let address = self.members[l].address.clone();
        for i in 0..self.members.len() {
            if i == l {
                continue;
            }
            let m = &self.members[i];
            let ok = m.pg.replica()
                && m.pg.streaming
                && m.pg.upstream.as_deref() == Some(address.as_str());
            let foreign = m
                .agent
                .as_ref()
                .and_then(|a| a.core.decision().problem.as_deref())
                .is_some_and(|p| p.contains("belongs to another cluster"));
            if !ok && foreign {
                // As designed (rules 7 and 8): a bootstrapper cut off from
                // etcd before it published its system identifier lost its
                // claim with its lease; another member bootstrapped anew
                // and the first one's data is left to an operator.
                let name = m.name.clone();
                self.trace(None, || {
                    format!("EXPECTED: {name} holds another cluster's data")
                });
                self.known.push(format!("{name}: data of a lost bootstrap"));
                continue;
            }
            if !ok && self.diverged_replica(i, l) {
                // Known limitation of src/ha, reported rather than fixed
                // (see docs/reliability.md): a member whose WAL ran past
                // the point where the leader's timeline forked, without
                // having last run as a primary (a replica that received
                // more than the winner but could not answer during the
                // election, or an old primary started read-only before
                // the election), is never rewound and stays a replica that
                // cannot stream.
                let name = m.name.clone();
                self.trace(None, || {
                    format!("KNOWN: {name} ran past the leader's fork point and is not rewound")
                });
                self.known
                    .push(format!("{name}: replica past the fork point"));
                continue;
            }
            if !ok {
                let ld = self.members[l].pg.data.as_ref();
                let why = match (m.pg.data.as_ref(), ld) {
                    (Some(d), Some(up)) => format!(
                        "slot on leader {}, can follow {} (ours tl {} lsn {} history {:?}; leader's lsn {} history {:?})",
                        up.slots.contains(&crate::dcs::slot_name(&m.name)),
                        d.can_follow(up),
                        d.timeline(),
                        d.lsn,
                        d.history,
                        up.lsn,
                        up.history
                    ),
                    _ => "no data".into(),
                };
                let what = format!(
                    "liveness: {} is not streaming from leader {leader} ({why}; {:?}, upstream {:?}, streaming {}, job {:?}, problem {:?}, waiting {:?})",
                    m.name,
                    m.pg.run,
                    m.pg.upstream,
                    m.pg.streaming,
                    m.agent.as_ref().and_then(|a| a.core.job().cloned()),
                    m.agent.as_ref().and_then(|a| a.core.decision().problem.clone()),
                    m.agent.as_ref().and_then(|a| a.core.decision().waiting.clone()),
                );
                self.fail(what);
                return;
            }
        }
    }

    /// `i`'s data is on the leader's history up to a timeline the leader
    /// left, but `i` went on past the fork point.
    fn diverged_replica(&self, i: usize, l: usize) -> bool {
        let (Some(d), Some(up)) = (
            self.members[i].pg.data.as_ref(),
            self.members[l].pg.data.as_ref(),
        ) else {
            return false;
        };
        let k = d.history.len();
        if !self.members[i].pg.replica() || d.system_id != up.system_id {
            return false;
        }
        if k <= up.history.len() && up.history[..k] == d.history[..] {
            return k < up.history.len() && d.lsn > up.history[k].1;
        }
        // A fork onto a timeline number the leader's history also has
        // (two promotions from the same timeline): compared by number,
        // it looks like the leader's own timeline.
        true
    }

    /// No leader, and no member with data within maximum_lag_on_failover
    /// of the last primary position in `status`.
    /// Synchronous mode: every member `sync` lets take over lost its data
    /// (a reinit, a clone that never finished) or, the old leader, is
    /// beyond maximum_lag_on_failover of a later primary.
    fn no_candidate_sync_allows(&self) -> bool {
        if self.plan.sync.is_none() {
            return false;
        }
        let Some(Value::Sync(s)) = self.etcd.get(etcd::SYNC) else {
            return false;
        };
        if s.sync_standby.is_empty() {
            return false;
        }
        let status = match self.etcd.get(etcd::STATUS) {
            Some(Value::Status(st)) => st.wal_lsn,
            _ => 0,
        };
        let max = self.config().maximum_lag_on_failover;
        self.members
            .iter()
            .filter(|m| s.allows(&m.name))
            .all(|m| match m.pg.data.as_ref() {
                None => true,
                Some(d) => !s.sync_standby.contains(&m.name) && status > d.lsn.saturating_add(max),
            })
    }

    fn no_candidate_within_lag(&self) -> bool {
        let Some(Value::Status(st)) = self.etcd.get(etcd::STATUS) else {
            return false;
        };
        let max = self.config().maximum_lag_on_failover;
        self.members.iter().all(|m| {
            m.pg.data
                .as_ref()
                .is_none_or(|d| st.wal_lsn > d.lsn.saturating_add(max))
        })
    }

    /// A run without faults: the first leader keeps the key throughout.
    pub fn check_no_leader_change(&mut self) {
        let log = &self.etcd.leader_log;
        if log.len() > 1 {
            let changes: Vec<String> = log
                .iter()
                .take(6)
                .map(|(t, l)| {
                    format!(
                        "{:.3}s {}",
                        t.as_secs_f64(),
                        l.as_deref().unwrap_or("(none)")
                    )
                })
                .collect();
            self.fail(format!(
                "the leader changed without any fault: {}",
                changes.join(", ")
            ));
        }
    }
}
