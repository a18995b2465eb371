//! The HA core: a sans-IO state machine around the policy (`decide`).
//!
//! The runtime feeds it events with the time (`handle`), takes out what to
//! do (`poll_action`) and sleeps until `poll_timeout`. The core owns every
//! piece of state a decision depends on — when the lease was last renewed,
//! since when renewals fail, the fencing deadline, the running job, the last
//! failure, slots last seen, the pending operator request — so the runtime
//! never decides anything and a simulator can drive the same core through
//! time without a clock.
//!
//! One pass: `Observe` → `Event::Observed` → (maybe `AskPeers` →
//! `Event::Peers`) → the decided steps, each reported back when it is a
//! lease operation (`Event::Lease`) → `Publish`. A failed or lost lease
//! operation drops the rest of the pass: whatever followed it was decided on
//! the premise that we hold the lease.

use super::decide::decide;
use super::view::*;
use crate::config::{DynamicConfig, Tags};
use crate::dcs::{slot_name, ClusterView};
use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

/// Time between renewal retries after a failed one (capped by loop_wait),
/// so a transient etcd error costs one retry, not a whole loop_wait.
const RETRY_INTERVAL: Duration = Duration::from_secs(1);
/// The fence fires this long before the lease may expire, so that an
/// immediate stop finishes in time.
const FENCE_MARGIN: Duration = Duration::from_secs(1);
/// Passes repeated at once after a lease change (a won election promotes
/// without waiting for loop_wait), at most this many in a row.
const MAX_QUICK_ROUNDS: u32 = 3;

/// Everything the runtime reports.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// The deadline of `poll_timeout` passed (or the runtime woke anyway).
    Tick,
    /// Something worth a fresh look happened (the leader key changed in
    /// etcd): observe at once.
    Wake,
    Observed(Box<Observation>),
    /// Answers to `Action::AskPeers` (an unreachable member has no position).
    Peers(Vec<PeerPosition>),
    /// Answers to `Action::AskFailsafe`: `confirmed` when every member
    /// asked confirmed us. `started`: when the asking began (members
    /// confirmed after it, so none takes the lease before `started + ttl`).
    Failsafe {
        started: Duration,
        confirmed: bool,
    },
    /// Failsafe mode, member side: we confirmed `leader` as the primary
    /// over the API (`ha::failsafe_refusal` said yes).
    FailsafeGranted {
        leader: String,
        /// The asking primary's ttl: its fence stands at its own ttl, which
        /// an edit it could not see may have made longer than ours.
        ttl: u64,
    },
    /// At agent start: a confirmation given before the agent (or the host)
    /// restarted still binds us for `remaining` (`failsafe_promise`).
    FailsafeRestored {
        leader: String,
        remaining: Duration,
    },
    /// Outcome of a lease operation (`Action::is_lease_op`). `started` is
    /// when the keep-alive that preceded it started: the lease cannot
    /// expire before `started + ttl`.
    Lease {
        started: Duration,
        outcome: LeaseOutcome,
    },
    /// A background job (`Action::job`) ended.
    JobFinished {
        kind: JobKind,
        result: Result<(), String>,
    },
    /// A quick action failed (nothing to retry at once: the next pass
    /// decides again from what it observes).
    ActionFailed {
        error: String,
    },
    /// An operator request to this member's API.
    Request(OperatorRequest),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaseOutcome {
    /// The leader key is ours, on our lease.
    Held,
    /// The leader key is not (or no longer) ours.
    NotHeld,
    /// etcd did not answer: we do not know.
    Failed(String),
}

/// One observation of the world, as `Action::Observe` asks for.
#[derive(Debug, Clone, PartialEq)]
pub struct Observation {
    /// None: the etcd read failed (the core keeps the last view).
    pub cluster: Option<ClusterView>,
    pub data: DataDir,
    pub pg: PgRun,
    /// pg_control, read while PostgreSQL is stopped.
    pub control: Option<ControlInfo>,
    /// The config files on disk differ from what `conf_role` renders.
    pub conf_outdated: bool,
    /// PostgreSQL major version of the binaries.
    pub major: u32,
    /// Wall clock (Unix seconds), for scheduled requests only.
    pub wall_clock: u64,
    /// Free space on the data and WAL file systems.
    pub disk: DiskSpace,
}

/// The member's fixed identity and settings, from its config file.
#[derive(Debug, Clone, PartialEq)]
pub struct Identity {
    pub name: String,
    pub tags: Tags,
    pub reclone_on_rewind_failure: bool,
    /// The dynamic config until etcd's has been read.
    pub bootstrap: DynamicConfig,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Between passes; the next starts at `next_pass`.
    Idle,
    /// `Observe` handed out (or about to be), waiting for `Observed`.
    Observing,
    /// `AskPeers` handed out, waiting for `Peers`.
    AskingPeers,
    /// Handing out the pass's steps.
    Acting,
}

pub struct Core {
    id: Identity,
    phase: Phase,
    queue: VecDeque<Step>,
    /// Fencing steps: handed out before anything else, even while a lease
    /// operation is outstanding (`poll_urgent`).
    urgent: VecDeque<Step>,
    /// A lease operation handed out whose outcome has not been reported.
    lease_op_pending: bool,
    pass_started: Duration,
    next_pass: Duration,
    /// Repeat the pass at once (a lease changed hands).
    again: bool,
    /// Retry soon (a renewal or etcd read failed).
    retry_soon: bool,
    quick_rounds: u32,

    cluster: ClusterView,
    dcs_ok: bool,
    data: DataDir,
    pg: PgRun,
    control: Option<ControlInfo>,
    conf_outdated: bool,
    major: u32,
    wall_clock: u64,
    disk: DiskSpace,
    observed: bool,

    job: Option<JobKind>,
    last_failure: Option<JobFailure>,
    request: Option<OperatorRequest>,
    slot_last_seen: BTreeMap<String, Duration>,
    primary_down_since: Option<Duration>,
    peers: Option<Vec<PeerPosition>>,
    /// The other members as last seen in etcd, kept while etcd holds none
    /// (wiped, or every lease expired): who may hold data.
    known_members: Vec<crate::dcs::MemberStatus>,
    /// etcd has answered one of this agent's lease operations (held or
    /// not). Before that, a restarted agent's fence deadline may be later
    /// than the lease its predecessor kept, and "no deadline" means "not
    /// known yet": the fence keeper trusts it only afterwards.
    lease_answered: bool,
    /// `LocalView::members_seen`.
    members_seen: BTreeMap<String, Duration>,
    /// `LocalView::sync_applied_at`.
    sync_applied_at: BTreeMap<String, u64>,
    /// Since when etcd holds no `initialize` key (as observed).
    no_cluster_since: Option<Duration>,
    /// The last lease operation found the leader key naming us on a lease
    /// that is not ours to renew: it will run out unrenewed.
    leader_key_not_ours: bool,
    /// Failsafe mode: start of the last round of confirmations from every
    /// member while etcd was unreachable. It counts as a renewal for
    /// fencing, demotion and `/primary`.
    failsafe_at: Option<Duration>,
    /// Failsafe mode, member side: the primary we confirmed, and until
    /// when we take no lease.
    failsafe_granted: Option<(String, Duration)>,
    /// An etcd read has succeeded since this agent started.
    cluster_seen: bool,

    /// Start of the last successful renewal (or acquisition) of the lease.
    last_renew: Option<Duration>,
    /// The ttl that renewal was made with (the runtime takes a new lease
    /// when the dynamic config's ttl changes): what the lease lasts, not
    /// what the config says now.
    renewed_ttl: Duration,
    /// We present ourselves as the writable leader (API, member key).
    serving: bool,
    /// Since when renewal attempts fail (the first failed or unanswered
    /// attempt since the last success).
    renew_failing_since: Option<Duration>,
    /// When the lease taken with `last_renew` may expire, minus a margin:
    /// PostgreSQL is stopped immediately by then unless renewed. Cleared
    /// only once PostgreSQL is seen not to run as primary.
    fence_at: Option<Duration>,
    /// The fence deadline that passed, until a renewal or a pass that sees
    /// PostgreSQL not writable with no job running: the runtime keeps it
    /// armed (already due), so a job still running cannot make PostgreSQL
    /// writable after the fence (simulator seed 353493).
    fenced_at: Option<Duration>,
    /// A demotion for failed renewals was started and not yet resolved.
    demoting: bool,
    /// The step handed out last starts a background job: if it fails
    /// (`Event::ActionFailed`), the job never started.
    starts_job: bool,

    decision: Decision,
    #[cfg(test)]
    pub(crate) mutation: Option<super::Mutation>,
}

impl Core {
    /// A core that starts its first pass at `now`.
    pub fn new(id: Identity, now: Duration) -> Self {
        let cluster = ClusterView::empty(id.bootstrap.clone());
        Core {
            id,
            phase: Phase::Idle,
            queue: VecDeque::new(),
            urgent: VecDeque::new(),
            lease_op_pending: false,
            pass_started: now,
            next_pass: now,
            again: false,
            retry_soon: false,
            quick_rounds: 0,
            cluster,
            dcs_ok: false,
            data: DataDir::Empty,
            pg: PgRun::Stopped,
            control: None,
            conf_outdated: false,
            major: 0,
            wall_clock: 0,
            disk: DiskSpace::default(),
            observed: false,
            job: None,
            last_failure: None,
            request: None,
            slot_last_seen: BTreeMap::new(),
            primary_down_since: None,
            peers: None,
            known_members: Vec::new(),
            members_seen: BTreeMap::new(),
            sync_applied_at: BTreeMap::new(),
            lease_answered: false,
            no_cluster_since: None,
            leader_key_not_ours: false,
            failsafe_at: None,
            failsafe_granted: None,
            cluster_seen: false,
            last_renew: None,
            renewed_ttl: Duration::ZERO,
            serving: false,
            renew_failing_since: None,
            fence_at: None,
            fenced_at: None,
            demoting: false,
            starts_job: false,
            decision: Decision::default(),
            #[cfg(test)]
            mutation: None,
        }
    }

    // ------------------------------------------------------------ events

    pub fn handle(&mut self, event: Event, now: Duration) {
        match event {
            Event::Tick => {}
            Event::Wake => self.wake(now),
            Event::Observed(obs) => self.on_observed(*obs, now),
            Event::Peers(peers) => {
                if self.phase == Phase::AskingPeers {
                    self.peers = Some(peers);
                    self.run_policy(now);
                }
            }
            Event::Lease { started, outcome } => self.on_lease(started, outcome, now),
            Event::Failsafe { started, confirmed } => self.on_failsafe(started, confirmed),
            Event::FailsafeGranted { leader, ttl } => {
                let ttl = ttl.max(self.cluster.config.ttl);
                self.hold_failsafe(leader, now + Duration::from_secs(ttl));
            }
            Event::FailsafeRestored { leader, remaining } => {
                self.hold_failsafe(leader, now + remaining);
            }
            Event::JobFinished { kind, result } => {
                self.job = None;
                if !matches!(kind, JobKind::Start | JobKind::Stop) {
                    // The data directory may have been replaced.
                    self.control = None;
                }
                match result {
                    Ok(()) => {
                        if self.last_failure.as_ref().is_some_and(|f| f.kind == kind) {
                            self.last_failure = None;
                        }
                    }
                    Err(message) => {
                        self.last_failure = Some(JobFailure {
                            kind,
                            message,
                            at: now,
                        })
                    }
                }
                self.wake(now);
            }
            Event::ActionFailed { .. } => {
                // A job whose action failed before it began (a hand-over
                // whose etcd write failed, say) is not running: the core
                // must not wait for it to finish.
                if std::mem::take(&mut self.starts_job) {
                    self.job = None;
                }
            }
            Event::Request(r) => {
                self.request = Some(r);
                self.wake(now);
            }
        }
        self.check_fence(now);
        if self.phase == Phase::Idle && now >= self.next_pass {
            self.start_pass(now);
        }
    }

    /// The next thing to do. Lease operations must be reported
    /// (`Event::Lease`) before the next action is handed out.
    pub fn poll_action(&mut self) -> Option<Step> {
        if let Some(step) = self.poll_urgent() {
            return Some(step);
        }
        if self.lease_op_pending {
            return None;
        }
        let step = self.queue.pop_front()?;
        match &step.action {
            a if a.is_lease_op() => {
                self.lease_op_pending = true;
                if matches!(a, Action::ReleaseLeader | Action::AbandonBootstrap) {
                    self.serving = false;
                }
            }
            Action::Stop | Action::BeginSwitchover { .. } => {
                // Out of the write pool before the slow part begins.
                self.serving = false;
            }
            Action::AckRequest => self.request = None,
            Action::Publish => self.end_pass(),
            Action::WriteFailsafe(names) => {
                // From now on etcd may hold either list (the write's outcome
                // may never be known): whoever either names must be asked.
                let mut all = self.cluster.failsafe.clone().unwrap_or_default();
                all.extend(names.iter().cloned());
                all.sort();
                all.dedup();
                self.cluster.failsafe = Some(all);
            }
            _ => {}
        }
        self.starts_job = step.action.job(self.major).is_some();
        if let Some(kind) = step.action.job(self.major) {
            self.job = Some(kind);
        }
        Some(step)
    }

    /// Fencing steps only: what the runtime must do at once even in the
    /// middle of another action (a renewal stuck in an etcd timeout, say).
    pub fn poll_urgent(&mut self) -> Option<Step> {
        let step = self.urgent.pop_front()?;
        self.starts_job = step.action.job(self.major).is_some();
        if let Some(kind) = step.action.job(self.major) {
            self.job = Some(kind);
        }
        Some(step)
    }

    /// When to call `handle(Event::Tick, …)` at the latest.
    pub fn poll_timeout(&self) -> Option<Duration> {
        let mut t = (self.phase == Phase::Idle).then_some(self.next_pass);
        let mut earliest = |x: Option<Duration>| {
            if let Some(x) = x {
                t = Some(t.map_or(x, |t| t.min(x)));
            }
        };
        earliest(self.fence_at);
        if !self.demoting && self.fence_at.is_some() {
            earliest(self.renew_failing_since.map(|s| s + self.retry_timeout()));
        }
        t
    }

    // ------------------------------------------------------ what it shows

    /// An etcd read has succeeded since this agent started.
    pub fn cluster_seen(&self) -> bool {
        self.cluster_seen
    }

    /// The cluster as last read (or the bootstrap defaults before that).
    pub fn cluster(&self) -> &ClusterView {
        &self.cluster
    }

    /// The view the policy decided on last.
    pub fn local_view(&self) -> LocalView {
        LocalView {
            name: self.id.name.clone(),
            tags: self.id.tags.clone(),
            data: self.data.clone(),
            pg: self.pg.clone(),
            job: self.job.clone(),
            last_failure: self.last_failure.clone(),
            dcs_ok: self.dcs_ok,
            last_renew: self.last_renew,
            slot_last_seen: self.slot_last_seen.clone(),
            control: self.control.clone(),
            peers: self.peers.clone(),
            known_members: self.known_members.clone(),
            members_seen: self.members_seen.clone(),
            sync_applied_at: self.sync_applied_at.clone(),
            no_cluster_since: self.no_cluster_since,
            leader_key_not_ours: self.leader_key_not_ours,
            failsafe_granted: self.failsafe_granted.clone(),
            primary_down_since: self.primary_down_since,
            reclone_on_rewind_failure: self.id.reclone_on_rewind_failure,
            wall_clock: self.wall_clock,
            conf_outdated: self.conf_outdated,
            request: self.request,
            disk: self.disk,
            #[cfg(test)]
            mutation: self.mutation,
        }
    }

    /// Until when `/primary` may answer 200: the lease cannot have expired
    /// before. None while we do not serve as the leader.
    pub fn lease_valid_until(&self) -> Option<Duration> {
        let from = match (self.last_renew, self.failsafe_at) {
            (Some(r), Some(f)) => Some(r.max(f)),
            (r, f) => r.or(f),
        };
        self.serving
            .then_some(from)
            .flatten()
            .map(|t| t + self.renewed_ttl)
    }

    /// When PostgreSQL must be stopped in immediate mode unless a renewal
    /// moves it: the runtime arms a timer with it that fires even while the
    /// loop is stuck in I/O.
    pub fn fence_deadline(&self) -> Option<Duration> {
        #[cfg(test)]
        if self.mutation == Some(super::Mutation::NoDemotion) {
            return None;
        }
        // A deadline that passed stays until a renewal clears it: a later
        // provisional one (a pass retrying the lease after the fence fired)
        // must not reopen the jobs' fence gate (simulator seed 455374).
        match (self.fence_at, self.fenced_at) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// See the field: what `fence_keeper::Line::confirmed` reports.
    pub fn lease_answered(&self) -> bool {
        self.lease_answered
    }

    /// Holds the leader key as far as we know and means to serve writes.
    pub fn serving(&self) -> bool {
        self.serving
    }

    /// The last decision (its `waiting` and `problem` for the status).
    pub fn decision(&self) -> &Decision {
        &self.decision
    }

    pub fn job(&self) -> Option<&JobKind> {
        self.job.as_ref()
    }

    pub fn last_failure(&self) -> Option<&JobFailure> {
        self.last_failure.as_ref()
    }

    pub fn dcs_ok(&self) -> bool {
        self.dcs_ok
    }

    // ------------------------------------------------------------ passes

    fn wake(&mut self, now: Duration) {
        if self.phase == Phase::Idle {
            self.next_pass = self.next_pass.min(now);
        } else {
            // The pass under way may have read etcd before the change: look
            // again as soon as it ends rather than a loop_wait later.
            self.again = true;
        }
    }

    fn start_pass(&mut self, now: Duration) {
        self.phase = Phase::Observing;
        self.pass_started = now;
        self.again = false;
        self.retry_soon = false;
        self.peers = None;
        self.queue.push_back(Step {
            action: Action::Observe,
            reason: "observing etcd and PostgreSQL".into(),
        });
    }

    fn end_pass(&mut self) {
        self.phase = Phase::Idle;
        let loop_wait = Duration::from_secs(self.cluster.config.loop_wait.max(1));
        self.next_pass = if self.again && self.quick_rounds < MAX_QUICK_ROUNDS {
            self.quick_rounds += 1;
            self.pass_started
        } else if self.retry_soon {
            self.quick_rounds = 0;
            self.pass_started + loop_wait.min(RETRY_INTERVAL)
        } else {
            self.quick_rounds = 0;
            self.pass_started + loop_wait
        };
    }

    /// A confirmation never shortens one given before: the primary that
    /// got the earlier one may count on it until its own fence.
    fn hold_failsafe(&mut self, leader: String, until: Duration) {
        match &self.failsafe_granted {
            Some((_, held)) if *held >= until => {}
            _ => self.failsafe_granted = Some((leader, until)),
        }
    }

    fn on_observed(&mut self, obs: Observation, now: Duration) {
        if self.phase != Phase::Observing {
            return;
        }
        self.dcs_ok = obs.cluster.is_some();
        if let Some(c) = obs.cluster {
            // A restarted agent cannot know whether it confirmed a primary
            // in failsafe mode before: it takes no lease for a ttl.
            if !self.cluster_seen && c.config.failsafe_mode {
                self.hold_failsafe(
                    "a primary confirmed before this agent restarted".into(),
                    now + Duration::from_secs(c.config.ttl),
                );
            }
            self.cluster = c;
            self.cluster_seen = true;
            if !self.i_lead() {
                self.leader_key_not_ours = false;
            }
            self.track_membership(now);
        } else if self.i_lead() || self.last_renew.is_some() {
            // A failed read is a failed renewal as far as fencing goes.
            self.renew_failing_since.get_or_insert(self.pass_started);
            self.retry_soon = true;
        }
        self.data = obs.data;
        self.pg = obs.pg;
        #[cfg(test)]
        if self.mutation == Some(super::Mutation::UnknownIsAbsent) {
            if matches!(self.pg, PgRun::Unknown(_)) {
                self.pg = PgRun::Stopped;
            }
            if matches!(self.data, DataDir::Unknown(_)) {
                self.data = DataDir::Empty;
            }
        }
        // pg_control is read while PostgreSQL is stopped; while it runs, the
        // last one read tells what it started from.
        if obs.control.is_some() {
            self.control = obs.control;
        }
        self.conf_outdated = obs.conf_outdated;
        self.major = obs.major;
        self.wall_clock = obs.wall_clock;
        self.disk = obs.disk;
        self.observed = true;
        let not_writable = match &self.pg {
            PgRun::Stopped => true,
            PgRun::Running(r) => r.in_recovery,
            PgRun::Unresponsive | PgRun::Unknown(_) | PgRun::Orphaned => false,
        };
        if self.job.is_none() && not_writable {
            // PostgreSQL is seen not to be writable: nothing to fence.
            self.fence_at = None;
            self.fenced_at = None;
            self.demoting = false;
        }
        self.track_slots(now);
        super::sync::track_applied(&mut self.sync_applied_at, self.pg.running());
        self.track_primary_down(now);
        self.run_policy(now);
    }

    fn track_membership(&mut self, now: Duration) {
        let others: Vec<_> = self
            .cluster
            .members
            .iter()
            .filter(|m| m.name != self.id.name)
            .cloned()
            .collect();
        for m in &others {
            self.members_seen.insert(m.name.clone(), now);
        }
        let keep = Duration::from_secs(self.cluster.config.member_slots_ttl);
        self.members_seen
            .retain(|_, seen| now.saturating_sub(*seen) < keep);
        if !others.is_empty() {
            self.known_members = others;
        }
        if self.cluster.initialize == crate::dcs::Initialize::Absent {
            self.no_cluster_since.get_or_insert(now);
        } else {
            self.no_cluster_since = None;
        }
    }

    fn run_policy(&mut self, now: Duration) {
        let local = self.local_view();
        let mut d = decide(&self.cluster, &local, now);
        if let Some(q) = d.need.take() {
            self.phase = Phase::AskingPeers;
            self.queue.push_back(Step {
                action: Action::AskPeers(q),
                reason: d.waiting.clone().unwrap_or_default(),
            });
            return;
        }
        self.phase = Phase::Acting;
        let takes_lease = d.steps.iter().any(|s| {
            s.action.is_lease_op()
                && !matches!(s.action, Action::ReleaseLeader | Action::AbandonBootstrap)
        });
        if takes_lease && self.may_write() {
            // The operation may put the leader key on a lease etcd grants
            // now with the current ttl, and its answer may never come (a
            // hung loop, a timeout after the write applied): that lease can
            // expire from `pass_started + ttl` on. A restarted agent
            // adopting its primary has no deadline at all before this. Set
            // here, in `handle`, so the runtime arms it before it acts.
            let provisional = (self.pass_started + self.ttl()).saturating_sub(FENCE_MARGIN);
            self.fence_at = Some(self.fence_at.map_or(provisional, |f| f.min(provisional)));
        }
        if d.steps
            .iter()
            .any(|s| matches!(s.action, Action::WriteSync(_)))
        {
            // `synchronous_standby_names` follows the key on the next pass
            // (after a promotion, commits wait until it does): at once, not
            // a loop_wait later.
            self.again = true;
        }
        self.queue.extend(d.steps.iter().cloned());
        self.queue.push_back(Step {
            action: Action::Publish,
            reason: "publishing our status".into(),
        });
        self.decision = d;
    }

    fn on_lease(&mut self, started: Duration, outcome: LeaseOutcome, now: Duration) {
        if !self.lease_op_pending {
            return;
        }
        self.lease_op_pending = false;
        if !matches!(outcome, LeaseOutcome::Failed(_)) {
            self.lease_answered = true;
        }
        match outcome {
            LeaseOutcome::Held => {
                if self.last_renew.is_none() || !self.serving {
                    self.again = true;
                }
                self.last_renew = Some(started);
                self.renewed_ttl = self.ttl();
                self.renew_failing_since = None;
                self.fence_at = Some((started + self.ttl()).saturating_sub(FENCE_MARGIN));
                self.fenced_at = None;
                self.demoting = false;
                self.serving = true;
                self.leader_key_not_ours = false;
                self.failsafe_at = None;
            }
            LeaseOutcome::NotHeld => {
                self.leader_key_not_ours = self.i_lead();
                // A key naming us that we cannot renew expires on its own:
                // the next pass fences at once, not a loop_wait later.
                if self.last_renew.is_some() || self.serving || self.leader_key_not_ours {
                    self.again = true;
                }
                // fence_at stays: PostgreSQL may still run as primary under
                // the lease we just lost, until a pass stops it.
                self.last_renew = None;
                self.renew_failing_since = None;
                self.serving = false;
                self.failsafe_at = None;
                self.drop_rest_of_pass();
            }
            LeaseOutcome::Failed(_) => {
                self.renew_failing_since.get_or_insert(started.min(now));
                self.retry_soon = true;
                self.drop_rest_of_pass();
            }
        }
    }

    /// Every member confirmed us while etcd was unreachable: none takes the
    /// lease before `started + ttl`, so until shortly before then we may
    /// stay writable, as if renewed at `started`.
    fn on_failsafe(&mut self, started: Duration, confirmed: bool) {
        if !confirmed {
            // A round refused after we relied on the failsafe: demote now,
            // the fence still stands at the last confirmed round's ttl.
            if self.failsafe_at.take().is_some() {
                self.renew_failing_since = Some(Duration::ZERO);
            }
            return;
        }
        if self.demoting || !self.serving {
            return;
        }
        let Some(fence_at) = self.fence_at else {
            return;
        };
        self.failsafe_at = Some(self.failsafe_at.map_or(started, |t| t.max(started)));
        self.renew_failing_since = None;
        self.fence_at = Some(fence_at.max((started + self.ttl()).saturating_sub(FENCE_MARGIN)));
    }

    /// The rest of the pass was decided on the premise of a lease we do not
    /// hold: drop it, but still publish.
    fn drop_rest_of_pass(&mut self) {
        self.queue
            .retain(|s| matches!(s.action, Action::Publish | Action::AskFailsafe(_)));
        if self.phase == Phase::Acting && self.queue.is_empty() {
            self.queue.push_back(Step {
                action: Action::Publish,
                reason: "publishing our status".into(),
            });
        }
    }

    // ----------------------------------------------------------- fencing

    /// Rule 2. Once renewals have failed for retry_timeout, demote (a clean
    /// stop, or an immediate one if a job runs); once the lease may expire
    /// within the margin, stop immediately whatever runs.
    fn check_fence(&mut self, now: Duration) {
        #[cfg(test)]
        if self.mutation == Some(super::Mutation::NoDemotion) {
            return;
        }
        let Some(fence_at) = self.fence_at else {
            return;
        };
        if now >= fence_at {
            self.fence_at = None;
            self.fenced_at = Some(fence_at);
            self.demoting = false;
            self.serving = false;
            self.failsafe_at = None;
            // The rest of the pass was decided on a lease that may be gone
            // (a renewal answered after a stall, say): starting or
            // promoting PostgreSQL would undo the fence, and writing
            // `status`, slots or the system identifier as leader would speak
            // for a lease we may no longer hold (simulator seeds 2888,
            // 371801, 637709).
            self.queue.retain(|s| {
                matches!(
                    s.action,
                    Action::Publish | Action::Observe | Action::AskPeers(_)
                )
            });
            self.push_urgent(
                Action::Fence,
                "the leader lease may expire within a second and has not been renewed: stopping PostgreSQL immediately",
            );
            return;
        }
        let failing_for = self.renew_failing_since.map(|s| now.saturating_sub(s));
        // Confirmed by every member: a refused round demotes (above), the
        // fence stands at the last round's ttl; a round takes as long as
        // two etcd timeouts, longer than retry_timeout.
        if self.demoting
            || self.failsafe_at.is_some()
            || failing_for.is_none_or(|f| f < self.retry_timeout())
        {
            return;
        }
        self.demoting = true;
        self.serving = false;
        let reason = format!(
            "renewing the leader lease has failed for {}s (retry_timeout): stopping PostgreSQL before the lease may expire",
            self.cluster.config.retry_timeout
        );
        if self.job.is_some() {
            self.push_urgent(Action::Fence, reason);
        } else {
            // The stop is a job: the rest of the current pass must not start
            // another one.
            self.queue.retain(|s| {
                matches!(
                    s.action,
                    Action::Publish | Action::Observe | Action::AskPeers(_)
                )
            });
            self.push_urgent(Action::Stop, reason);
        }
    }

    fn push_urgent(&mut self, action: Action, reason: impl Into<String>) {
        self.urgent.push_back(Step {
            action,
            reason: reason.into(),
        });
    }

    // ------------------------------------------------------------ trackers

    /// Remembers when each slot's member was last present, so the policy
    /// drops slots only for members gone longer than member_slots_ttl.
    fn track_slots(&mut self, now: Duration) {
        let Some(running) = self.pg.running() else {
            return;
        };
        let present: Vec<String> = self
            .cluster
            .members
            .iter()
            .map(|m| slot_name(&m.name))
            .collect();
        self.slot_last_seen.retain(|s, _| running.slots.contains(s));
        for slot in &running.slots {
            let seen = self.slot_last_seen.entry(slot.clone()).or_insert(now);
            if present.contains(slot) {
                *seen = now;
            }
        }
    }

    /// The primary_start_timeout clock: we hold the leader key without a
    /// running primary (a bootstrap in progress does not count).
    fn track_primary_down(&mut self, now: Duration) {
        let bootstrapping = self.job == Some(JobKind::Bootstrap);
        if !self.i_lead() || self.pg.is_primary() || bootstrapping {
            self.primary_down_since = None;
        } else if self.primary_down_since.is_none() && self.dcs_ok {
            // Not from a key last seen before etcd went away: PostgreSQL was
            // stopped then on purpose (the renewals failed), and counting
            // that time would hand the lease to a replica the moment etcd
            // returns, a needless timeline switch.
            self.primary_down_since = Some(now);
        }
    }

    fn i_lead(&self) -> bool {
        self.cluster.leader.as_deref() == Some(self.id.name.as_str())
    }

    /// PostgreSQL is, or may be (unknown, starting, promoting), writable.
    fn may_write(&self) -> bool {
        may_write(&self.job, &self.pg)
    }

    fn ttl(&self) -> Duration {
        Duration::from_secs(self.cluster.config.ttl)
    }

    fn retry_timeout(&self) -> Duration {
        Duration::from_secs(self.cluster.config.retry_timeout)
    }
}

#[cfg(test)]
impl Core {
    /// A core in the state a decision-table row describes, due to start a
    /// pass at `now`.
    pub(crate) fn restore(local: &LocalView, cluster: &ClusterView, now: Duration) -> Core {
        let mut core = Core::new(
            Identity {
                name: local.name.clone(),
                tags: local.tags.clone(),
                reclone_on_rewind_failure: local.reclone_on_rewind_failure,
                bootstrap: cluster.config.clone(),
            },
            now,
        );
        core.cluster = cluster.clone();
        core.job = local.job.clone();
        core.last_failure = local.last_failure.clone();
        core.last_renew = local.last_renew;
        core.renewed_ttl = core.ttl();
        core.serving = local.last_renew.is_some();
        let may_write = may_write(&local.job, &local.pg);
        core.fence_at = local
            .last_renew
            .filter(|_| may_write)
            .map(|t| (t + core.ttl()).saturating_sub(FENCE_MARGIN));
        core.slot_last_seen = local.slot_last_seen.clone();
        core.control = local.control.clone();
        core.primary_down_since = local.primary_down_since;
        core.known_members = local.known_members.clone();
        core.members_seen = local.members_seen.clone();
        core.sync_applied_at = local.sync_applied_at.clone();
        core.no_cluster_since = local.no_cluster_since;
        core.leader_key_not_ours = local.leader_key_not_ours;
        core.failsafe_granted = local.failsafe_granted.clone();
        core.cluster_seen = true;
        core.request = local.request;
        core.disk = local.disk;
        core.mutation = local.mutation;
        core
    }

    /// The observation that gives the core `local`'s facts.
    pub(crate) fn observation(local: &LocalView, cluster: &ClusterView) -> Observation {
        Observation {
            cluster: local.dcs_ok.then(|| cluster.clone()),
            data: local.data.clone(),
            pg: local.pg.clone(),
            control: local.control.clone(),
            conf_outdated: local.conf_outdated,
            major: 15,
            wall_clock: local.wall_clock,
            disk: local.disk,
        }
    }
}

fn may_write(job: &Option<JobKind>, pg: &PgRun) -> bool {
    job.is_some() || !matches!(pg, PgRun::Stopped) && pg.running().is_none_or(|p| !p.in_recovery)
}
