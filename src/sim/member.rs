//! One member's simulated runtime around a real `ha::Core`, doing what
//! `src/agent` does: the loop (perform each step, then sleep until
//! `poll_timeout`, a leader-key wake, a finished job or an operator
//! request), lease operations reported as `Event::Lease` with the start of
//! the keep-alive before them, background jobs, publishing on the member's
//! own lease, and the fence timer, which fires even while the loop hangs.
//!
//! Every I/O takes simulated time. Its effect happens when it is issued;
//! the loop hears the result when the I/O's time has passed (later still if
//! the loop is hung, which is how a member resumes with a stale view).

use super::etcd::{self, Etcd, EtcdError};
use super::postgres::{Data, Pg, Run};
use super::World;
use crate::config::Tags;
use crate::dcs::{ClusterStatus, ClusterView, HistoryEntry, MemberStatus};
use crate::ha::{
    Action, ControlInfo, Core, DataDir, Event, Identity, JobKind, LeaseOutcome, LocalView,
    Observation, OperatorRequest, PeerQuery, PgRun, PgRunning, Step,
};
use std::collections::VecDeque;
use std::time::Duration;

/// The PostgreSQL major version the members run (Follow is a reload).
pub const MAJOR: u32 = 15;
/// How long asking an unreachable peer's API takes (the agent's HTTP
/// client timeout).
const PEER_TIMEOUT: Duration = crate::ha::PEER_ASK_TIMEOUT;
/// `Agent::ask_failsafe`'s per-request timeout.
const FAILSAFE_TIMEOUT: Duration = crate::ha::FAILSAFE_ASK_TIMEOUT;
/// `remote_receive_lsn`'s timeout.
const SQL_TIMEOUT: Duration = Duration::from_secs(2);
/// The runtime skips a keep-alive when the last one is this recent.
const KEEP_ALIVE_REUSE: Duration = Duration::from_millis(200);

/// What a member's API answers `/status` with, from its last snapshot.
#[derive(Debug, Clone, Default)]
pub struct ApiAnswer {
    pub pg_running: bool,
    /// Its last pass read etcd.
    pub dcs_ok: bool,
    /// `failsafe_mode` as it last saw the config.
    pub failsafe_mode: bool,
    /// Its member key says leader (it holds the key in its last view).
    pub leads: bool,
    /// Running and not in recovery.
    pub primary: bool,
    pub system_id: Option<String>,
    pub wal_lsn: Option<u64>,
    pub receive_lsn: Option<u64>,
    /// `failover_candidate`, `resumes_primary_on_timeline` and `timeline`.
    pub candidate: bool,
    pub resumes_on: Option<u32>,
    pub timeline: Option<u32>,
}

pub struct Member {
    pub name: String,
    /// host:port of its PostgreSQL.
    pub address: String,
    /// Clock-rate error of this member's monotonic clock, parts per million.
    pub ppm: i64,
    pub pg: Pg,
    pub server_up: bool,
    pub agent: Option<Agent>,
    /// Bumped at every agent start, so events of a dead agent are dropped.
    pub incarnation: u64,
    /// The API's snapshot; None while the agent is down.
    pub api: Option<ApiAnswer>,
    /// The loop takes no step before this (a hung agent loop).
    pub hung_until: Duration,
    /// The link to etcd is cut until then.
    pub etcd_cut_until: Duration,
    /// etcd requests are slow until then, some beyond the client's timeout.
    pub etcd_slow_until: Duration,
    /// Replication to this member trails its upstream by `lag_bytes` until
    /// `lag_until`.
    pub lag_bytes: u64,
    pub lag_until: Duration,
    /// No fault may hit this member's etcd link or loop before this (an
    /// agent restart that must finish within the lease, see faults.rs).
    pub protected_until: Duration,
    /// Until then the agent's reads of PostgreSQL's state (`BLIND_PG`) or
    /// of the data directory (`BLIND_DATA`) fail, as with the open-file
    /// limit exhausted or pg_control unreadable: "unknown", never absent.
    pub blind_until: Duration,
    pub blind: u8,
    /// The agent process is frozen (SIGSTOP) until then: no loop, no fence
    /// timer, no API answers.
    pub frozen_until: Duration,
    /// `fence_keeper`: the process that outlives the agent (not the server).
    pub keeper: Option<Keeper>,
    /// Identifies the keeper's timer events. Kept across keepers: a timer
    /// of a keeper that died with its server must not match its successor
    /// (seed 231435 was the simulator disarming a live keeper so).
    pub keeper_token: u64,
    /// The failsafe promise on disk (`failsafe_promise`): the member
    /// confirmed this primary until this global time. Survives the agent.
    pub failsafe_promise: Option<(String, Duration)>,
}

/// `fence_keeper`'s process: the last deadline an agent handed it.
pub struct Keeper {
    /// Global time at which it stops PostgreSQL; None: disarmed.
    pub deadline: Option<Duration>,
}

pub const BLIND_PG: u8 = 1;
pub const BLIND_DATA: u8 = 2;

pub struct Agent {
    pub core: Core,
    /// Global time at which this agent's monotonic clock read zero.
    pub epoch: Duration,
    /// Identifies the currently scheduled loop event; older ones are stale.
    pub token: u64,
    /// Results of the I/O in flight, delivered when its time has passed.
    pub busy: Option<Vec<Event>>,
    pub job: Option<SimJob>,
    pub job_done: Option<(JobKind, Result<(), String>)>,
    pub wake: bool,
    pub requests: VecDeque<OperatorRequest>,
    pub lease: Option<i64>,
    /// The TTL `lease` was granted with (`Dcs::lease_id` re-grants when
    /// the config's ttl grew beyond it).
    pub lease_ttl: u64,
    /// `Dcs::previous_leases`: our own earlier leases (a restarted agent's
    /// member key found at start and a leader key naming us, or the lease
    /// before ttl grew); keys on them are ours to move.
    pub previous_leases: Vec<i64>,
    /// Local time the last successful keep-alive started.
    pub lease_kept_at: Option<Duration>,
    pub last_published: Option<(MemberStatus, Option<i64>)>,
    pub last_status_written: Option<(u64, u32)>,
    /// Cached system identifier (dropped after every job, as the agent does).
    pub system_id: Option<String>,
    /// The fence timer: the local deadline armed, and its event's token.
    pub fence_armed: Option<Duration>,
    pub fence_token: u64,
    pub pending_promotion: Option<(Option<u64>, String)>,
    pub last_leader_seen: Option<String>,
    /// An operator request was acknowledged in the current pass.
    pub acked_request: bool,
    /// The current pass's observation could not read PostgreSQL's state or
    /// the data directory.
    pub observed_unknown: bool,
}

#[derive(Debug, Clone)]
pub struct SimJob {
    pub id: u64,
    pub kind: JobKind,
    pub phase: u8,
    /// PostgreSQL's generation the job's current phase expects.
    pub generation: u64,
    pub source: Option<usize>,
    pub upstream: Option<String>,
    pub primary: bool,
}

impl Member {
    pub fn new(i: usize, ppm: i64) -> Self {
        Member {
            name: format!("m{}", i + 1),
            address: format!("m{}:5432", i + 1),
            ppm,
            pg: Pg::new(),
            server_up: true,
            agent: None,
            incarnation: 0,
            api: None,
            hung_until: Duration::ZERO,
            etcd_cut_until: Duration::ZERO,
            etcd_slow_until: Duration::ZERO,
            lag_bytes: 0,
            lag_until: Duration::ZERO,
            protected_until: Duration::ZERO,
            blind_until: Duration::ZERO,
            blind: 0,
            failsafe_promise: None,
            frozen_until: Duration::ZERO,
            keeper: None,
            keeper_token: 0,
        }
    }
}

/// `agent::observe::request_timeout`.
pub fn request_timeout(retry_timeout: u64) -> Duration {
    Duration::from_millis((retry_timeout.max(1) * 1000 / 2).max(500))
}

impl World {
    // ------------------------------------------------------------ clocks

    /// The member's monotonic clock (its agent's epoch is zero), running at
    /// its own rate.
    pub fn local_now(&self, i: usize) -> Duration {
        let m = &self.members[i];
        let epoch = m.agent.as_ref().map_or(Duration::ZERO, |a| a.epoch);
        let elapsed = self.now.saturating_sub(epoch).as_nanos();
        let scaled = elapsed * (1_000_000 + m.ppm) as u128 / 1_000_000;
        Duration::from_nanos(scaled as u64)
    }

    /// The global time at which member `i`'s clock reads `local`.
    pub fn global_of(&self, i: usize, local: Duration) -> Duration {
        let m = &self.members[i];
        let epoch = m.agent.as_ref().map_or(Duration::ZERO, |a| a.epoch);
        let n = local.as_nanos() * 1_000_000;
        let d = (1_000_000 + m.ppm) as u128;
        epoch + Duration::from_nanos(n.div_ceil(d) as u64)
    }

    // --------------------------------------------------------- lifecycle

    pub fn start_agent(&mut self, i: usize) {
        let bootstrap = self.plan.bootstrap_config();
        self.members[i].incarnation += 1;
        let mut core = Core::new(
            Identity {
                name: self.members[i].name.clone(),
                tags: Tags::default(),
                reclone_on_rewind_failure: true,
                bootstrap,
            },
            Duration::ZERO,
        );
        core.mutation = self.mutation;
        // `Dcs::claim_name`: our member key from a previous life (same
        // instance, so same addresses) gives the lease we may move keys from.
        let name = &self.members[i].name;
        let mut previous_leases: Vec<i64> = self
            .etcd
            .lease_of(&super::etcd::member_key(name))
            .into_iter()
            .collect();
        // ...and a leader key naming us, while that member key lives.
        if !previous_leases.is_empty() && self.etcd.leader() == Some(name.as_str()) {
            previous_leases.extend(self.etcd.lease_of(super::etcd::LEADER));
        }
        self.members[i].agent = Some(Agent {
            previous_leases,
            core,
            epoch: self.now,
            token: 0,
            busy: None,
            job: None,
            job_done: None,
            wake: false,
            requests: VecDeque::new(),
            lease: None,
            lease_ttl: 0,
            lease_kept_at: None,
            last_published: None,
            last_status_written: None,
            system_id: None,
            fence_armed: None,
            fence_token: 0,
            pending_promotion: None,
            last_leader_seen: None,
            acked_request: false,
            observed_unknown: false,
        });
        self.members[i].api = Some(ApiAnswer::default());
        self.trace(Some(i), || "agent started".into());
        // `failsafe_promise::load` at start.
        if let Some((leader, until)) = self.members[i].failsafe_promise.clone() {
            if until > self.now {
                let remaining = until - self.now;
                self.handle(i, Event::FailsafeRestored { leader, remaining });
            }
        }
        self.handle(i, Event::Tick);
        self.schedule_loop(i, self.now);
    }

    /// The agent process dies: its loop, jobs and fence timer with it.
    /// PostgreSQL and whatever a job already told it to do go on.
    pub fn kill_agent(&mut self, i: usize) {
        self.members[i].agent = None;
        self.members[i].api = None;
        self.members[i].hung_until = Duration::ZERO;
        self.members[i].frozen_until = Duration::ZERO;
    }

    // -------------------------------------------------- events into core

    /// `Agent::handle`: report an event, then re-arm the fence timer.
    pub fn handle(&mut self, i: usize, event: Event) {
        let now = self.local_now(i);
        if self.tracing() {
            let text = describe_event(&event);
            self.trace(Some(i), || text);
        }
        let Some(a) = self.members[i].agent.as_mut() else {
            return;
        };
        a.core.handle(event, now);
        let deadline = a.core.fence_deadline();
        // `KeeperFeed::arm`, as `Agent::handle` calls it.
        let confirmed = a.core.lease_answered();
        let at = deadline.map(|d| self.global_of(i, d).max(self.now));
        self.feed_keeper(i, at, confirmed);
        let Some(a) = self.members[i].agent.as_mut() else {
            return;
        };
        if deadline != a.fence_armed {
            a.fence_armed = deadline;
            a.fence_token += 1;
            let token = a.fence_token;
            if let Some(d) = deadline {
                let at = self.global_of(i, d).max(self.now);
                let inc = self.members[i].incarnation;
                self.schedule(at, super::Ev::Fence { m: i, inc, token });
            }
        }
    }

    /// The keeper is started for a deadline to hold, never for a disarm;
    /// what it holds next is `fence_keeper::Line::apply`'s rule itself.
    fn feed_keeper(&mut self, i: usize, deadline: Option<Duration>, confirmed: bool) {
        if self.mutation == Some(crate::ha::Mutation::NoFenceKeeper) {
            return;
        }
        if deadline.is_none() && self.members[i].keeper.is_none() {
            return;
        }
        let keeper = self.members[i]
            .keeper
            .get_or_insert(Keeper { deadline: None });
        let ns = |d: Duration| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        let line = crate::fence_keeper::Line {
            agent: 0,
            seq: 0,
            confirmed,
            feed: match deadline {
                Some(d) => crate::fence_keeper::Feed::Arm { deadline_ns: ns(d) },
                None => crate::fence_keeper::Feed::Disarm,
            },
        };
        let next = line
            .apply(keeper.deadline.map(ns))
            .map(Duration::from_nanos);
        if keeper.deadline == next {
            return;
        }
        keeper.deadline = next;
        self.members[i].keeper_token += 1;
        let token = self.members[i].keeper_token;
        if let Some(at) = next {
            self.schedule(at, super::Ev::Keeper { m: i, token });
        }
    }

    /// `fence_keeper::keeper::fence`: once per deadline.
    pub fn keeper_fires(&mut self, i: usize, token: u64) {
        let current = self.members[i].keeper_token;
        let Some(k) = self.members[i].keeper.as_mut() else {
            return;
        };
        if current != token || k.deadline.is_none() {
            return;
        }
        k.deadline = None;
        if self.members[i].pg.postmaster_alive() {
            self.trace(Some(i), || {
                "fence keeper: deadline passed, stopping PostgreSQL immediately".into()
            });
            self.members[i].pg.kill();
        }
    }

    pub fn fence_fires(&mut self, i: usize, inc: u64, token: u64) {
        let m = &self.members[i];
        let Some(a) = m.agent.as_ref() else { return };
        if m.incarnation != inc || a.fence_token != token {
            return;
        }
        // A frozen process's timer fires when it runs again.
        if self.now < m.frozen_until {
            let at = m.frozen_until;
            self.schedule(at, super::Ev::Fence { m: i, inc, token });
            return;
        }
        if self.members[i].pg.postmaster_alive() {
            self.trace(Some(i), || {
                "fence timer: stopping PostgreSQL immediately".into()
            });
            self.members[i].pg.kill();
        }
        // `fence::KEEP_DOWN_EVERY`: until the deadline moves, PostgreSQL
        // stays down.
        self.schedule(
            self.now + Duration::from_millis(200),
            super::Ev::Fence { m: i, inc, token },
        );
    }

    /// Something for the loop (wake, job done, request): run it now if idle.
    pub fn poke(&mut self, i: usize) {
        let Some(a) = self.members[i].agent.as_ref() else {
            return;
        };
        if a.busy.is_none() {
            self.schedule_loop(i, self.now.max(self.members[i].hung_until));
        }
    }

    pub fn schedule_loop(&mut self, i: usize, at: Duration) {
        let inc = self.members[i].incarnation;
        let Some(a) = self.members[i].agent.as_mut() else {
            return;
        };
        a.token += 1;
        let token = a.token;
        self.schedule(at, super::Ev::Agent { m: i, inc, token });
    }

    /// The agent's loop: deliver the I/O that just completed, hand out and
    /// perform steps until one takes time, then wait for the next wake-up.
    pub fn agent_runs(&mut self, i: usize, inc: u64, token: u64) {
        {
            let m = &self.members[i];
            let Some(a) = m.agent.as_ref() else { return };
            if m.incarnation != inc || a.token != token {
                return;
            }
        }
        if self.now < self.members[i].hung_until {
            let until = self.members[i].hung_until;
            self.schedule_loop(i, until);
            return;
        }
        if let Some(events) = self.agent_mut(i).busy.take() {
            for e in events {
                self.handle(i, e);
            }
        }
        // Guards against a timeout the core keeps in the past.
        let mut idle_rounds = 0;
        loop {
            if self.members[i].agent.is_none() {
                return;
            }
            let next = {
                let a = self.agent_mut(i);
                a.core.poll_action()
            };
            if let Some(step) = next {
                let (took, events) = self.perform(i, step);
                if took.is_zero() {
                    for e in events {
                        self.handle(i, e);
                    }
                    continue;
                }
                self.agent_mut(i).busy = Some(events);
                self.schedule_loop(i, self.now + took);
                return;
            }
            // Idle: what the real loop's select would pick.
            if let Some((kind, result)) = self.agent_mut(i).job_done.take() {
                let (took, events) = self.job_finished(i, kind, result);
                self.agent_mut(i).busy = Some(events);
                self.schedule_loop(i, self.now + took);
                return;
            }
            if std::mem::take(&mut self.agent_mut(i).wake) {
                self.handle(i, Event::Wake);
                continue;
            }
            if let Some(r) = self.agent_mut(i).requests.pop_front() {
                self.handle(i, Event::Request(r));
                continue;
            }
            let timeout = self.agent_mut(i).core.poll_timeout();
            let at = match timeout {
                Some(t) => self.global_of(i, t),
                None => self.now + Duration::from_secs(1),
            };
            if at <= self.now && idle_rounds < 3 {
                idle_rounds += 1;
                self.handle(i, Event::Tick);
                continue;
            }
            let at = at.max(self.now + Duration::from_millis(1));
            self.schedule_loop(i, at);
            return;
        }
    }

    pub fn agent_mut(&mut self, i: usize) -> &mut Agent {
        self.members[i]
            .agent
            .as_mut()
            .unwrap_or_else(|| panic!("sim: member {i} has no agent"))
    }

    fn agent(&self, i: usize) -> &Agent {
        self.members[i]
            .agent
            .as_ref()
            .unwrap_or_else(|| panic!("sim: member {i} has no agent"))
    }

    // ------------------------------------------------------------ etcd

    /// One etcd request from member `i`, issued `elapsed` into the current
    /// step. A cut link times out; a slow one may time out after etcd
    /// applied the request anyway.
    fn etcd_call<T>(
        &mut self,
        i: usize,
        elapsed: &mut Duration,
        f: impl FnOnce(&mut Etcd, Duration) -> T,
    ) -> Result<T, String> {
        let timeout = request_timeout(self.agent(i).core.cluster().config.retry_timeout);
        if self.etcd_cut(i) {
            *elapsed += timeout;
            return Err(format!("etcd did not answer within {timeout:?}"));
        }
        let slow = self.now < self.members[i].etcd_slow_until;
        let latency = if slow {
            let max = timeout.as_millis() as u64 * 3 / 2;
            self.rng.millis(5, max)
        } else {
            self.rng.millis(1, 4)
        };
        let now = self.now;
        if latency > timeout {
            *elapsed += timeout;
            if self.rng.chance(50) {
                f(&mut self.etcd, now);
            }
            return Err(format!("etcd did not answer within {timeout:?}"));
        }
        *elapsed += latency;
        Ok(f(&mut self.etcd, now))
    }

    /// `Dcs::lease_id`: grant a lease once, with the ttl of that moment.
    fn lease_id(&mut self, i: usize, elapsed: &mut Duration, ttl: u64) -> Result<i64, String> {
        let a = self.agent(i);
        if let Some(id) = a.lease.filter(|_| a.lease_ttl >= ttl) {
            return Ok(id);
        }
        let old = a.lease;
        let id = self.etcd_call(i, elapsed, |e, now| e.grant(ttl, now))?;
        if let Some(old) = old {
            self.agent_mut(i).previous_leases.push(old);
        }
        self.agent_mut(i).lease = Some(id);
        self.agent_mut(i).lease_ttl = ttl;
        Ok(id)
    }

    /// `Agent::keep_alive`.
    fn keep_alive(&mut self, i: usize, elapsed: &mut Duration, ttl: u64) -> Result<(), String> {
        let start = self.local_now(i) + *elapsed;
        if self
            .agent(i)
            .lease_kept_at
            .is_some_and(|t| start.saturating_sub(t) < KEEP_ALIVE_REUSE)
        {
            return Ok(());
        }
        let id = self.lease_id(i, elapsed, ttl)?;
        match self.etcd_call(i, elapsed, |e, now| e.keep_alive(id, now))? {
            Ok(()) => {
                self.agent_mut(i).lease_kept_at = Some(start);
                Ok(())
            }
            Err(_) => {
                self.agent_mut(i).lease = None;
                Err("our etcd lease expired".into())
            }
        }
    }

    fn lease_op(
        &mut self,
        i: usize,
        action: &Action,
        elapsed: &mut Duration,
    ) -> Result<LeaseOutcome, String> {
        let ttl = self.agent(i).core.cluster().config.ttl;
        let name = self.members[i].name.clone();
        let held = |won: bool| {
            if won {
                LeaseOutcome::Held
            } else {
                LeaseOutcome::NotHeld
            }
        };
        let lease_err = |e: EtcdError| format!("etcd: {e:?}");
        match action {
            Action::ClaimBootstrap => {
                self.keep_alive(i, elapsed, ttl)?;
                let id = self.lease_id(i, elapsed, ttl)?;
                let r = self.etcd_call(i, elapsed, |e, now| e.claim_initialize(&name, id, now))?;
                r.map(held).map_err(lease_err)
            }
            Action::AcquireLeader => {
                self.keep_alive(i, elapsed, ttl)?;
                let id = self.lease_id(i, elapsed, ttl)?;
                let r = self.etcd_call(i, elapsed, |e, now| e.acquire_leader(&name, id, now))?;
                r.map(held).map_err(lease_err)
            }
            Action::RenewLeader => {
                self.keep_alive(i, elapsed, ttl)?;
                let id = self.lease_id(i, elapsed, ttl)?;
                let prev = self.agent(i).previous_leases.clone();
                let r =
                    self.etcd_call(i, elapsed, |e, now| e.renew_leader(&name, id, &prev, now))?;
                r.map(held).map_err(lease_err)
            }
            Action::ReleaseLeader => {
                let a = self.agent(i);
                let ours: Vec<i64> = a
                    .lease
                    .into_iter()
                    .chain(a.previous_leases.iter().copied())
                    .collect();
                self.etcd_call(i, elapsed, |e, now| e.release_leader(&name, &ours, now))?;
                Ok(LeaseOutcome::NotHeld)
            }
            Action::AbandonBootstrap => {
                self.etcd_call(i, elapsed, |e, now| e.abandon_bootstrap(&name, now))?;
                Ok(LeaseOutcome::NotHeld)
            }
            other => panic!("sim: not a lease operation: {other:?}"),
        }
    }

    // ---------------------------------------------------------- perform

    /// `Agent::perform`: carry out one step; returns how long it took and
    /// the events to report when it is done.
    fn perform(&mut self, i: usize, step: Step) -> (Duration, Vec<Event>) {
        if self.tracing() && !matches!(step.action, Action::Publish | Action::Observe) {
            let text = format!("step {:?}: {}", step.action, step.reason);
            self.trace(Some(i), || text);
        }
        self.check_paused_action(i, &step);
        self.check_unknown_action(i, &step);
        let mut elapsed = Duration::ZERO;
        match &step.action {
            Action::Observe => {
                self.agent_mut(i).acked_request = false;
                let obs = self.observe(i, &mut elapsed);
                return (elapsed, vec![Event::Observed(Box::new(obs))]);
            }
            Action::AskPeers(q) => {
                let answers = self.ask_peers(i, q, &mut elapsed);
                return (elapsed, vec![Event::Peers(answers)]);
            }
            Action::Publish => {
                self.publish(i, &mut elapsed);
                return (elapsed, Vec::new());
            }
            Action::AskFailsafe(list) => {
                let started = self.local_now(i);
                let confirmed = self.ask_failsafe(i, list, &mut elapsed);
                return (elapsed, vec![Event::Failsafe { started, confirmed }]);
            }
            _ => {}
        }
        if step.action.is_lease_op() {
            let attempt = self.local_now(i);
            let outcome = match self.lease_op(i, &step.action, &mut elapsed) {
                Ok(o) => o,
                Err(e) => LeaseOutcome::Failed(e),
            };
            let started = match (&outcome, self.agent(i).lease_kept_at) {
                (LeaseOutcome::Held, Some(t)) => t.min(attempt),
                _ => attempt,
            };
            return (elapsed, vec![Event::Lease { started, outcome }]);
        }
        if step.action == Action::AckRequest {
            self.agent_mut(i).acked_request = true;
        }
        match self.act_one(i, &step.action, &mut elapsed) {
            Ok(()) => (elapsed, Vec::new()),
            Err(error) => {
                self.trace(Some(i), || format!("action failed: {error}"));
                (
                    elapsed.max(Duration::from_millis(1)),
                    vec![Event::ActionFailed { error }],
                )
            }
        }
    }

    fn act_one(&mut self, i: usize, action: &Action, elapsed: &mut Duration) -> Result<(), String> {
        let name = self.members[i].name.clone();
        *elapsed += Duration::from_millis(1);
        match action {
            Action::Observe
            | Action::AskPeers(_)
            | Action::AskFailsafe(_)
            | Action::Publish
            | Action::ClaimBootstrap
            | Action::AcquireLeader
            | Action::RenewLeader
            | Action::ReleaseLeader
            | Action::AbandonBootstrap
            | Action::AckRequest => {}
            Action::Fence => {
                if self.members[i].pg.postmaster_alive() {
                    self.members[i].pg.kill();
                }
            }
            Action::PublishSystemId(id) => {
                let id = id.clone();
                self.etcd_call(i, elapsed, |e, now| e.set_initialize(&id, now))?;
            }
            Action::WriteFailsafe(names) => {
                let v = etcd::Value::Names(names.clone());
                self.etcd_call(i, elapsed, |e, now| e.put(etcd::FAILSAFE, v, 0, now))?
                    .map_err(|e| format!("etcd: {e:?}"))?;
            }
            Action::WriteSync(standbys) => {
                let sync = crate::dcs::SyncState {
                    leader: name.clone(),
                    sync_standby: standbys.clone(),
                };
                let lease = self.agent(i).lease;
                let won = self.etcd_call(i, elapsed, |e, now| e.write_sync(sync, lease, now))?;
                if !won {
                    return Err("not written: the leader key does not name us on our lease".into());
                }
            }
            Action::SetSyncStandbys(value) => {
                if !self.members[i].pg.postmaster_alive() {
                    return Err("pg_ctl reload: no server running".into());
                }
                self.members[i].pg.standby_names = value.clone();
            }
            Action::InitConfig => {
                let defaults = self.plan.bootstrap_config();
                self.etcd_call(i, elapsed, |e, now| e.init_config(&defaults, now))?;
            }
            Action::WriteStatus => {
                let local = self.agent(i).core.local_view();
                if let Some(pg) = local.pg.running() {
                    let key = (pg.wal_lsn.unwrap_or(0), pg.timeline.unwrap_or(0));
                    if self.agent(i).last_status_written != Some(key) {
                        let status = ClusterStatus {
                            leader: name.clone(),
                            wal_lsn: key.0,
                            timeline: key.1,
                            slots: Default::default(),
                        };
                        self.etcd_call(i, elapsed, |e, now| e.write_status(status, now))?;
                        self.agent_mut(i).last_status_written = Some(key);
                    }
                }
            }
            Action::Follow { upstream } => {
                if !self.members[i].pg.postmaster_alive() {
                    return Err("pg_ctl reload: no server running".into());
                }
                self.members[i].pg.upstream = Some(upstream.address.clone());
                if self.plan.sync.is_some() {
                    self.members[i].pg.standby_names = crate::ha::NOBODY.into();
                }
            }
            Action::Reload => {
                if !self.members[i].pg.postmaster_alive() {
                    return Err("pg_ctl reload: no server running".into());
                }
            }
            Action::CreateSlots(slots) | Action::DropSlots(slots) => {
                let pg = &mut self.members[i].pg;
                if !(pg.writable() || pg.replica()) {
                    return Err("cannot connect to PostgreSQL".into());
                }
                let create = matches!(action, Action::CreateSlots(_));
                if let Some(d) = pg.data.as_mut() {
                    for s in slots {
                        if create && !d.slots.contains(s) {
                            d.slots.push(s.clone());
                        } else if !create {
                            d.slots.retain(|x| x != s);
                        }
                    }
                }
            }
            Action::ClearFailover => {
                self.etcd_call(i, elapsed, |e, now| e.clear_failover(now))?;
            }
            Action::BeginSwitchover { candidate } => {
                let candidate = candidate.clone();
                let r = self.etcd_call(i, elapsed, |e, now| {
                    e.set_failover_candidate(&name, &candidate, now)
                })?;
                r.map_err(|e| format!("etcd: {e:?}"))?;
                self.spawn_job(i, action);
            }
            Action::Promote => {
                let local = self.agent(i).core.local_view();
                let before = local
                    .pg
                    .running()
                    .and_then(|p| p.receive_lsn.max(p.wal_lsn));
                let reason = self.promotion_reason(i);
                self.agent_mut(i).pending_promotion = Some((before, reason));
                self.check_promotion_lag(i);
                self.spawn_job(i, action);
            }
            Action::Bootstrap
            | Action::Clone { .. }
            | Action::StartPrimary
            | Action::StartReplica { .. }
            | Action::Stop
            | Action::Rewind { .. }
            | Action::RemoveData
            | Action::Restart => self.spawn_job(i, action),
        }
        Ok(())
    }

    fn promotion_reason(&self, i: usize) -> String {
        let a = self.agent(i);
        let cluster = a.core.cluster();
        match &cluster.failover {
            Some(f) if f.candidate.as_deref() == Some(self.members[i].name.as_str()) => {
                "requested".into()
            }
            _ => match &a.last_leader_seen {
                Some(prev) => format!("automatic failover: {prev} lost the leader lease"),
                None => "automatic failover: no leader".into(),
            },
        }
    }

    // -------------------------------------------------------------- jobs

    fn spawn_job(&mut self, i: usize, action: &Action) {
        let Some(kind) = action.job(MAJOR) else {
            return;
        };
        if self.agent(i).job.is_some() {
            // The agent refuses to start a job on top of another.
            return;
        }
        self.job_seq += 1;
        let mut job = SimJob {
            id: self.job_seq,
            kind: kind.clone(),
            phase: 0,
            generation: self.members[i].pg.generation,
            source: None,
            upstream: None,
            primary: false,
        };
        let pg_up = self.members[i].pg.postmaster_alive();
        let mut fail_fast = false;
        let took = match action {
            Action::Bootstrap => self.rng.millis(500, 3000),
            Action::Clone { from, conn } => {
                job.source = self.member_by_name(from);
                job.upstream = Some(conn.clone());
                self.rng.millis(1000, 5000)
            }
            Action::StartPrimary | Action::StartReplica { .. } => {
                job.primary = matches!(action, Action::StartPrimary);
                if let Action::StartReplica { upstream } = action {
                    job.upstream = upstream.as_ref().map(|u| u.address.clone());
                }
                if pg_up || self.members[i].pg.data.is_none() {
                    fail_fast = true;
                    Duration::from_millis(20)
                } else {
                    let crashed = self.members[i]
                        .pg
                        .data
                        .as_ref()
                        .is_some_and(|d| !d.clean_shutdown);
                    let pg_time = if crashed {
                        self.rng.millis(1000, 6000)
                    } else {
                        self.rng.millis(200, 1000)
                    };
                    let ready = self.now + pg_time;
                    self.members[i]
                        .pg
                        .start(job.primary, job.upstream.clone(), ready);
                    self.schedule_pg(i);
                    job.generation = self.members[i].pg.generation;
                    pg_time
                }
            }
            Action::Stop | Action::BeginSwitchover { .. } | Action::RemoveData => {
                let took = if pg_up {
                    self.rng.millis(100, 1500)
                } else {
                    Duration::from_millis(10)
                };
                if pg_up {
                    self.members[i].pg.stop(self.now + took);
                    self.schedule_pg(i);
                    job.generation = self.members[i].pg.generation;
                }
                took
            }
            Action::Rewind { upstream } => {
                job.source = self.member_by_name(&upstream.name);
                job.upstream = Some(upstream.address.clone());
                if pg_up {
                    fail_fast = true;
                    Duration::from_millis(20)
                } else {
                    self.rng.millis(300, 3000)
                }
            }
            Action::Promote => {
                let took = self.rng.millis(100, 1000);
                if self.members[i].pg.promote(self.now + took) {
                    self.schedule_pg(i);
                } else {
                    fail_fast = true;
                }
                took
            }
            Action::Restart => {
                job.primary = self.members[i].pg.writable();
                job.upstream = self.members[i].pg.upstream.clone();
                if pg_up {
                    let took = self.rng.millis(100, 1000);
                    self.members[i].pg.stop(self.now + took);
                    self.schedule_pg(i);
                    job.generation = self.members[i].pg.generation;
                    took
                } else {
                    fail_fast = true;
                    Duration::from_millis(10)
                }
            }
            _ => Duration::from_millis(10),
        };
        if fail_fast {
            job.phase = 99;
        }
        let inc = self.members[i].incarnation;
        let id = job.id;
        self.agent_mut(i).job = Some(job);
        self.schedule(self.now + took, super::Ev::JobStep { m: i, inc, job: id });
    }

    /// A job's phase ended: move PostgreSQL on, start the next phase, or
    /// finish with a result.
    pub fn job_step(&mut self, i: usize, inc: u64, id: u64) {
        if self.members[i].incarnation != inc {
            return;
        }
        let Some(mut job) = self.members[i].agent.as_ref().and_then(|a| a.job.clone()) else {
            return;
        };
        if job.id != id {
            return;
        }
        self.pg_advance(i);
        let result = self.job_phase(i, &mut job);
        match result {
            None => {
                // Next phase scheduled by job_phase.
                self.agent_mut(i).job = Some(job);
            }
            Some(result) => {
                let a = self.agent_mut(i);
                a.job = None;
                a.job_done = Some((job.kind.clone(), result));
                self.poke(i);
            }
        }
    }

    /// Returns Some(result) when the job is over.
    fn job_phase(&mut self, i: usize, job: &mut SimJob) -> Option<Result<(), String>> {
        if job.phase == 99 {
            return Some(Err(format!("{:?} could not start", job.kind)));
        }
        let same = self.members[i].pg.generation == job.generation;
        match (&job.kind, job.phase) {
            (JobKind::Bootstrap, 0) => {
                if self.members[i].pg.data.is_some() || self.members[i].pg.postmaster_alive() {
                    return Some(Err("initdb: directory not empty".into()));
                }
                self.bootstrap_seq += 1;
                self.members[i].pg.standby_names = if self.plan.sync.is_some() {
                    crate::ha::NOBODY.into()
                } else {
                    String::new()
                };
                self.members[i].pg.data = Some(Data {
                    system_id: format!("7{:018}", self.bootstrap_seq),
                    history: vec![(1, 0)],
                    lsn: 0x0100_0000,
                    was_primary: true,
                    clean_shutdown: true,
                    checkpoint_lsn: 0x0100_0000,
                    slots: Vec::new(),
                });
                self.start_phase(i, job, true, None)
            }
            (JobKind::Clone { .. }, 0) => {
                let Some(src) = self.clone_source(i, job.source) else {
                    return Some(Err("pg_basebackup: could not connect to the source".into()));
                };
                let d = &src;
                self.members[i].pg.data = Some(Data {
                    system_id: d.system_id.clone(),
                    history: d.history.clone(),
                    lsn: d.lsn,
                    was_primary: false,
                    clean_shutdown: false,
                    checkpoint_lsn: d.lsn,
                    slots: Vec::new(),
                });
                let up = job.upstream.clone();
                self.start_phase(i, job, false, up)
            }
            (JobKind::Rewind { .. }, 0) => {
                if self.members[i].pg.postmaster_alive() {
                    return Some(Err("pg_rewind: the target server must be shut down".into()));
                }
                let Some(src) = self.clone_source(i, job.source) else {
                    return Some(Err("pg_rewind: could not connect to the source".into()));
                };
                if self.rng.chance(3) {
                    return Some(Err("pg_rewind: could not find common ancestor".into()));
                }
                if let Some(d) = self.members[i].pg.data.as_mut() {
                    d.history = src.history.clone();
                    d.lsn = src.lsn;
                    d.was_primary = false;
                    d.clean_shutdown = false;
                    d.checkpoint_lsn = src.lsn;
                }
                let up = job.upstream.clone();
                self.start_phase(i, job, false, up)
            }
            (JobKind::RemoveData, 0) => {
                if self.members[i].pg.postmaster_alive() {
                    return Some(Err("PostgreSQL still running".into()));
                }
                self.members[i].pg.data = None;
                Some(Ok(()))
            }
            (JobKind::Restart, 0) => {
                if !same || self.members[i].pg.postmaster_alive() {
                    return Some(Err("stop failed".into()));
                }
                let up = job.upstream.clone();
                let primary = job.primary;
                self.start_phase(i, job, primary, up)
            }
            (JobKind::Stop, 0) => {
                if self.members[i].pg.postmaster_alive() && same {
                    Some(Err("pg_ctl stop: server does not shut down".into()))
                } else {
                    Some(Ok(()))
                }
            }
            (JobKind::Promote, 0) => {
                if self.members[i].pg.writable() && self.members[i].pg.generation == job.generation
                {
                    Some(Ok(()))
                } else {
                    Some(Err("pg_ctl promote: server is not in standby mode".into()))
                }
            }
            (JobKind::Start, 0) | (_, 1) => {
                if same && matches!(self.members[i].pg.run, Run::Running { .. }) {
                    Some(Ok(()))
                } else {
                    Some(Err("pg_ctl start: could not start server".into()))
                }
            }
            (kind, phase) => panic!("sim: job {kind:?} has no phase {phase}"),
        }
    }

    /// The phase that starts PostgreSQL; the job ends when it is up.
    fn start_phase(
        &mut self,
        i: usize,
        job: &mut SimJob,
        primary: bool,
        upstream: Option<String>,
    ) -> Option<Result<(), String>> {
        // `FenceGate::check`: a job that outlived the fence deadline does
        // not start PostgreSQL writable.
        let fenced = self
            .agent(i)
            .core
            .fence_deadline()
            .is_some_and(|d| self.local_now(i) >= d);
        if primary && fenced {
            return Some(Err("the fence deadline passed while this job ran".into()));
        }
        let crashed = self.members[i]
            .pg
            .data
            .as_ref()
            .is_some_and(|d| !d.clean_shutdown);
        let took = if crashed {
            self.rng.millis(500, 4000)
        } else {
            self.rng.millis(200, 1000)
        };
        // pgwarden.conf's default (`ha::NOBODY`); a replica's
        // pgwarden-sync.conf is reset with its config files, a primary's
        // keeps the leader's list.
        if !primary && self.plan.sync.is_some() {
            self.members[i].pg.standby_names = crate::ha::NOBODY.into();
        }
        self.members[i].pg.start(primary, upstream, self.now + took);
        self.schedule_pg(i);
        job.generation = self.members[i].pg.generation;
        job.phase = 1;
        let inc = self.members[i].incarnation;
        self.schedule(
            self.now + took,
            super::Ev::JobStep {
                m: i,
                inc,
                job: job.id,
            },
        );
        None
    }

    /// The data a clone or rewind copies from `source`, if reachable and
    /// running.
    fn clone_source(&self, i: usize, source: Option<usize>) -> Option<Data> {
        let s = source?;
        let pg = &self.members[s].pg;
        if !self.reachable(i, s) || !(pg.writable() || pg.replica()) {
            return None;
        }
        pg.data.clone()
    }

    /// `Agent::job_finished`: bookkeeping, recording a promotion in
    /// history, then the event.
    fn job_finished(
        &mut self,
        i: usize,
        kind: JobKind,
        result: Result<(), String>,
    ) -> (Duration, Vec<Event>) {
        let mut elapsed = Duration::from_millis(1);
        self.agent_mut(i).system_id = None;
        if result.is_ok() && kind == JobKind::Promote {
            if let Some((switch, reason)) = self.agent_mut(i).pending_promotion.take() {
                let pg = &self.members[i].pg;
                if pg.writable() {
                    let d = pg.data.as_ref().map(|d| (d.timeline(), d.lsn));
                    let (tl, lsn) = d.unwrap_or((0, 0));
                    let entry = HistoryEntry {
                        timeline: tl,
                        lsn: switch.unwrap_or(lsn),
                        reason,
                        time: String::new(),
                        leader: self.members[i].name.clone(),
                    };
                    let _ = self.etcd_call(i, &mut elapsed, |e, now| e.append_history(entry, now));
                }
            }
        }
        (elapsed, vec![Event::JobFinished { kind, result }])
    }

    // ----------------------------------------------------------- observe

    fn observe(&mut self, i: usize, elapsed: &mut Duration) -> Observation {
        let defaults = self.plan.bootstrap_config();
        let cluster = self
            .etcd_call(i, elapsed, |e, _| e.read_cluster(&defaults))
            .ok();
        let name = self.members[i].name.clone();
        if let Some(l) = cluster.as_ref().and_then(|c| c.leader.clone()) {
            if l != name {
                self.agent_mut(i).last_leader_seen = Some(l);
            }
        }
        *elapsed += self.rng.millis(1, 3);
        let job_running = self.agent(i).job.is_some();
        let pg = &self.members[i].pg;
        let postmaster = !job_running && pg.postmaster_alive();
        let mut control = None;
        let data = match &pg.data {
            None => DataDir::Empty,
            Some(d) => {
                if !job_running && (!postmaster || self.agent(i).system_id.is_none()) {
                    if !postmaster {
                        control = Some(ControlInfo {
                            timeline: d.timeline(),
                            checkpoint_lsn: d.checkpoint_lsn,
                            clean_shutdown: d.clean_shutdown,
                            was_primary: d.was_primary,
                        });
                    }
                    let id = d.system_id.clone();
                    self.agent_mut(i).system_id = Some(id);
                }
                match &self.agent(i).system_id {
                    Some(id) => DataDir::Initialized {
                        system_id: id.clone(),
                    },
                    None => DataDir::Empty,
                }
            }
        };
        let pg = &self.members[i].pg;
        let run = if job_running {
            PgRun::Unresponsive
        } else if !postmaster {
            PgRun::Stopped
        } else {
            match pg.run {
                Run::Running { .. } | Run::Promoting { .. } => {
                    let mut r = running_of(pg);
                    if !r.in_recovery {
                        r.replication = self.replication_of(i);
                    }
                    PgRun::Running(r)
                }
                _ => PgRun::Unresponsive,
            }
        };
        let (mut data, mut run, mut control) = (data, run, control);
        let m = &self.members[i];
        let blind = if self.now < m.blind_until { m.blind } else { 0 };
        const EMFILE: &str = "Too many open files (os error 24)";
        if blind & BLIND_PG != 0 {
            run = PgRun::Unknown(format!("cannot read postmaster.pid: {EMFILE}"));
            control = None;
        }
        if blind & BLIND_DATA != 0 {
            data = DataDir::Unknown(format!("cannot read pg_control: {EMFILE}"));
            control = None;
        }
        self.agent_mut(i).observed_unknown = blind != 0;
        Observation {
            cluster,
            data,
            pg: run,
            control,
            conf_outdated: false,
            major: MAJOR,
            wall_clock: self.wall_clock(),
            // The model's disks never fill: unknown, as statvfs failing.
            disk: crate::ha::DiskSpace::default(),
        }
    }

    fn ask_peers(
        &mut self,
        i: usize,
        q: &PeerQuery,
        elapsed: &mut Duration,
    ) -> Vec<crate::ha::PeerPosition> {
        match q {
            PeerQuery::Received(p) => {
                let j = self.member_by_name(&p.name);
                let answer = match j {
                    Some(j) if self.reachable(i, j) => {
                        *elapsed += self.rng.millis(1, 5);
                        let pg = &self.members[j].pg;
                        pg.replica()
                            .then(|| pg.data.as_ref().map(|d| d.lsn))
                            .flatten()
                    }
                    _ => {
                        *elapsed += SQL_TIMEOUT;
                        None
                    }
                };
                vec![p.answered(answer)]
            }
            PeerQuery::Positions(list) => {
                let mut longest = self.rng.millis(1, 5);
                let mut out = Vec::new();
                for p in list {
                    let answer = match self.member_by_name(&p.name) {
                        Some(j)
                            if self.reachable(i, j) && self.now >= self.members[j].frozen_until =>
                        {
                            match &self.members[j].api {
                                Some(api) => crate::ha::PeerPosition {
                                    running_primary: api.pg_running && api.primary,
                                    candidate: api.candidate,
                                    resumes_on: api.resumes_on,
                                    timeline: api.timeline,
                                    ..p.answered_with_data(
                                        api.pg_running
                                            .then(|| api.receive_lsn.max(api.wal_lsn))
                                            .flatten(),
                                        api.system_id.clone(),
                                    )
                                },
                                None => p.unanswered(),
                            }
                        }
                        _ => {
                            longest = longest.max(PEER_TIMEOUT);
                            p.unanswered()
                        }
                    };
                    out.push(answer);
                }
                out.sort_by(|a, b| a.name.cmp(&b.name));
                *elapsed += longest;
                out
            }
        }
    }

    /// `Agent::ask_failsafe` and each member's `POST /failsafe`: a member
    /// confirms from its last snapshot (`ha::failsafe_refusal`) and its loop
    /// records the confirmation at once.
    fn ask_failsafe(
        &mut self,
        i: usize,
        list: &[crate::ha::PeerAddress],
        elapsed: &mut Duration,
    ) -> bool {
        let mut longest = self.rng.millis(1, 5);
        let mut all = true;
        let leader = self.members[i].name.clone();
        let ttl = self.agent(i).core.cluster().config.ttl;
        for p in list {
            let j = self.member_by_name(&p.name);
            let yes = match j {
                Some(j) if self.reachable(i, j) && self.now >= self.members[j].frozen_until => {
                    match &self.members[j].api {
                        Some(api) if self.members[j].agent.is_some() => {
                            crate::ha::failsafe_refusal(
                                api.failsafe_mode,
                                api.dcs_ok,
                                api.pg_running && api.primary,
                                api.leads,
                            )
                            .is_none()
                        }
                        _ => false,
                    }
                }
                _ => {
                    longest = longest.max(FAILSAFE_TIMEOUT);
                    false
                }
            };
            if let (true, Some(j)) = (yes, j) {
                // `failsafe_promise::save`, before the yes leaves the API.
                let own = self.agent(j).core.cluster().config.ttl;
                let until = self.now + Duration::from_secs(ttl.max(own));
                self.members[j].failsafe_promise = Some((leader.clone(), until));
                self.handle(
                    j,
                    Event::FailsafeGranted {
                        leader: leader.clone(),
                        ttl,
                    },
                );
            }
            all &= yes;
        }
        *elapsed += longest;
        all
    }

    // ----------------------------------------------------------- publish

    fn publish(&mut self, i: usize, elapsed: &mut Duration) {
        let (cluster, local, dcs_ok) = {
            let a = self.agent(i);
            (
                a.core.cluster().clone(),
                a.core.local_view(),
                a.core.dcs_ok(),
            )
        };
        let status = self.member_status(i, &cluster, &local);
        let now = self.local_now(i);
        self.members[i].api = Some(ApiAnswer {
            candidate: !local.tags.nofailover
                && crate::ha::not_a_candidate(&cluster, &local, now).is_none(),
            resumes_on: crate::ha::resumable_primary(&cluster, &local, now),
            timeline: status.timeline,
            pg_running: local.pg.running().is_some(),
            dcs_ok,
            failsafe_mode: cluster.config.failsafe_mode,
            leads: status.role == crate::dcs::Role::Leader,
            primary: local.pg.is_primary(),
            system_id: match &local.data {
                crate::ha::DataDir::Initialized { system_id } => Some(system_id.clone()),
                _ => None,
            },
            wal_lsn: status.wal_lsn,
            receive_lsn: status.receive_lsn,
        });
        if !dcs_ok {
            return;
        }
        let ttl = cluster.config.ttl;
        if self.keep_alive(i, elapsed, ttl).is_err() {
            self.agent_mut(i).last_published = None;
            return;
        }
        let lease = self.agent(i).lease;
        if self
            .agent(i)
            .last_published
            .as_ref()
            .is_some_and(|(s, l)| *s == status && *l == lease)
        {
            return;
        }
        let Ok(id) = self.lease_id(i, elapsed, ttl) else {
            return;
        };
        let key = etcd::member_key(&status.name);
        let value = etcd::Value::Member(Box::new(status.clone()));
        if let Ok(Ok(())) = self.etcd_call(i, elapsed, |e, now| e.put(&key, value, id, now)) {
            self.agent_mut(i).last_published = Some((status, Some(id)));
        }
    }

    /// `Agent::member_status`.
    fn member_status(&self, i: usize, cluster: &ClusterView, local: &LocalView) -> MemberStatus {
        let m = &self.members[i];
        let running = local.pg.running();
        let (role, state) = crate::ha::published_role_state(
            local,
            cluster.leader.as_deref() == Some(m.name.as_str()),
            cluster.is_sync_standby(&m.name),
        );
        let upstream = running.and_then(|pg| pg.upstream.clone()).and_then(|addr| {
            cluster
                .members
                .iter()
                .find(|x| format!("{}:{}", x.host, x.port) == addr)
                .map(|x| x.name.clone())
        });
        let (host, port) = m
            .address
            .split_once(':')
            .unwrap_or((m.address.as_str(), "5432"));
        MemberStatus {
            name: m.name.clone(),
            role,
            state,
            host: host.to_string(),
            port: port.parse().unwrap_or(5432),
            api_url: format!("http://{host}:8008"),
            conn_url: format!("postgres://{}/postgres", m.address),
            timeline: running.and_then(|pg| pg.timeline),
            wal_lsn: running.and_then(|pg| pg.wal_lsn),
            receive_lsn: running.and_then(|pg| pg.receive_lsn),
            upstream,
            tags: Tags::default(),
            version: String::new(),
            pending_restart: false,
            error: None,
        }
    }

    pub fn member_by_name(&self, name: &str) -> Option<usize> {
        self.members.iter().position(|m| m.name == name)
    }

    /// `pg_stat_replication` of member `i`: the replicas streaming from it.
    fn replication_of(&self, i: usize) -> Vec<crate::ha::Standby> {
        let address = &self.members[i].address;
        self.members
            .iter()
            .filter(|m| m.pg.replica() && m.pg.upstream.as_ref() == Some(address))
            .map(|m| crate::ha::Standby {
                name: m.name.clone(),
                streaming: m.pg.streaming,
                flush_lsn: m.pg.data.as_ref().map(|d| d.lsn),
            })
            .collect()
    }

    pub fn wall_clock(&self) -> u64 {
        1_700_000_000 + self.now.as_secs()
    }
}

/// What the SQL probe reads from a running instance.
fn running_of(pg: &Pg) -> PgRunning {
    let primary = pg.writable();
    let d = pg.data.as_ref();
    PgRunning {
        in_recovery: !primary,
        timeline: d.map(Data::timeline),
        wal_lsn: d.map(|d| d.lsn),
        receive_lsn: if primary { None } else { d.map(|d| d.lsn) },
        streaming: pg.streaming,
        upstream: if primary { None } else { pg.upstream.clone() },
        slots: d.map(|d| d.slots.clone()).unwrap_or_default(),
        pending_restart: false,
        postmaster_start: pg.starts.to_string(),
        synchronous_standby_names: pg.standby_names.clone(),
        replication: Vec::new(),
    }
}

fn describe_event(e: &Event) -> String {
    match e {
        Event::Observed(o) => format!(
            "observed: etcd {}, leader {:?}, pg {}",
            if o.cluster.is_some() { "ok" } else { "FAILED" },
            o.cluster.as_ref().and_then(|c| c.leader.clone()),
            match &o.pg {
                PgRun::Stopped => "stopped".to_string(),
                PgRun::Unresponsive => "unresponsive".to_string(),
                PgRun::Unknown(why) => format!("unknown ({why})"),
                PgRun::Orphaned => "orphaned".to_string(),
                PgRun::Running(r) => format!(
                    "{} tl {:?} lsn {:?}{}",
                    if r.in_recovery { "replica" } else { "primary" },
                    r.timeline,
                    r.wal_lsn,
                    if r.streaming { " streaming" } else { "" }
                ),
            }
        ),
        other => format!("event {other:?}"),
    }
}
