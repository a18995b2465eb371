//! The seeded plan of one schedule (members, timings, writer) and the fault
//! scheduler that injects crashes, partitions, delays, hangs, lagging
//! replicas and operator requests while the fault phase lasts.

use super::etcd::{self, Value};
use super::rng::Rng;
use super::{Ev, World};
use crate::api::requests::{check_failover, check_switchover, FailoverBody, SwitchoverBody};
use crate::config::DynamicConfig;
use crate::ha::OperatorRequest;
use std::time::Duration;

/// Timings every run draws from, besides random ones: Patroni's defaults
/// and the short ones pgwarden's own tests use.
pub const NAMED_TIMINGS: [(u64, u64, u64); 4] = [(30, 10, 10), (4, 1, 1), (5, 1, 2), (10, 1, 4)];

/// Longest ttl a run or an edit uses. Each member's clock may run up to
/// `MAX_PPM` fast or slow, and the core fences 1 s (FENCE_MARGIN) before
/// the lease may expire on its own clock: ttl * MAX_PPM must stay well
/// below that second, or drift alone would let a lease expire before the
/// fence fires. The design states no drift bound; this is ours.
pub const MAX_TTL: u64 = 60;
pub const MAX_PPM: i64 = 10_000;

#[derive(Debug, Clone)]
pub struct Plan {
    pub n: usize,
    /// (ttl, loop_wait, retry_timeout) stored at bootstrap.
    pub timing: (u64, u64, u64),
    pub max_lag: u64,
    pub primary_start_timeout: u64,
    /// `failsafe_mode` in the bootstrap config.
    pub failsafe: bool,
    /// Synchronous mode (Some(strict)) and synchronous_node_count.
    pub sync: Option<bool>,
    pub sync_count: u32,
    /// Whether faults are injected at all (a quiet run checks that no
    /// leader ever changes).
    pub faults: bool,
    pub fault_from: Duration,
    pub fault_until: Duration,
    /// When the run ends (set once faults stop, from the config then).
    pub end: Duration,
    pub write_every: Duration,
}

impl Plan {
    pub fn random(rng: &mut Rng) -> Plan {
        let n = *rng.pick(&[3, 3, 3, 3, 2, 4, 5]);
        let timing = if rng.chance(60) {
            *rng.pick(&NAMED_TIMINGS)
        } else {
            random_timing(rng)
        };
        let faults = !rng.chance(6);
        let ttl = timing.0;
        let fault_from = rng.millis(0, 20_000);
        let span = Duration::from_secs((4 * ttl).max(40)) + rng.millis(0, 4 * ttl * 1000);
        let mut plan = Plan {
            n,
            timing,
            max_lag: *rng.pick(&[64 << 10, 256 << 10, 1 << 20]),
            primary_start_timeout: *rng.pick(&[10, 10, 30]),
            failsafe: false,
            sync: None,
            sync_count: 1,
            faults,
            fault_from,
            fault_until: fault_from + span,
            end: Duration::ZERO,
            write_every: rng.millis(50, 200),
        };
        if !faults {
            // Quiet: long enough for several renewals at any timing.
            plan.fault_from = Duration::from_secs(10 * ttl);
            plan.fault_until = plan.fault_from;
        }
        plan.end = plan.fault_until + plan.liveness_bound(&plan.bootstrap_config());
        plan
    }

    /// A fault-free run of `length` with the given timings.
    pub fn quiet(n: usize, timing: (u64, u64, u64), length: Duration) -> Plan {
        Plan {
            n,
            timing,
            max_lag: 1 << 20,
            primary_start_timeout: 10,
            failsafe: false,
            sync: None,
            sync_count: 1,
            faults: false,
            fault_from: length,
            fault_until: length,
            end: length,
            write_every: Duration::from_millis(100),
        }
    }

    pub fn bootstrap_config(&self) -> DynamicConfig {
        DynamicConfig {
            ttl: self.timing.0,
            loop_wait: self.timing.1,
            retry_timeout: self.timing.2,
            maximum_lag_on_failover: self.max_lag,
            primary_start_timeout: self.primary_start_timeout,
            failsafe_mode: self.failsafe,
            synchronous_mode: self.sync.is_some(),
            synchronous_mode_strict: self.sync == Some(true),
            synchronous_node_count: self.sync_count,
            ..DynamicConfig::default()
        }
    }

    /// How long after the last fault the cluster may take to have one
    /// leader and every other member streaming from it: the old lease runs
    /// out, a few passes elect and promote, a start may wait out
    /// primary_start_timeout, a failed job backs off five loop_waits, an
    /// unanswered operator request holds elections back for a minute, and
    /// a rejoin may stop, rewind (or clone) and start.
    pub fn liveness_bound(&self, c: &DynamicConfig) -> Duration {
        let secs =
            2 * c.ttl + 12 * c.loop_wait + 4 * c.retry_timeout + c.primary_start_timeout + 60 + 40;
        Duration::from_secs(secs)
    }
}

fn random_timing(rng: &mut Rng) -> (u64, u64, u64) {
    loop {
        let loop_wait = rng.range(1, 10);
        let retry = rng.range(1, 10);
        let min = loop_wait + 2 * retry;
        let ttl = rng.range(min, min + 15);
        if ttl <= MAX_TTL {
            return (ttl, loop_wait, retry);
        }
    }
}

impl World {
    /// The scheduler's tick: inject one fault, then schedule the next.
    pub fn fault_tick(&mut self) {
        if self.now >= self.plan.fault_until {
            return;
        }
        self.inject();
        let lw = self.plan.timing.1.max(1) * 1000;
        let gap = self
            .rng
            .millis(lw / 5, lw * 2)
            .max(Duration::from_millis(100));
        self.schedule(self.now + gap, Ev::Fault);
    }

    /// A fault that lasts `lo..hi` seconds (times ttl when `by_ttl`), ending
    /// at the latest when the fault phase does.
    fn until(&mut self, lo_ms: u64, hi_ms: u64) -> Duration {
        (self.now + self.rng.millis(lo_ms, hi_ms)).min(self.plan.fault_until)
    }

    fn inject(&mut self) {
        let n = self.members.len();
        let i = self.rng.range(0, n as u64 - 1) as usize;
        let ttl_ms = self.config().ttl * 1000;
        let protected = self.now < self.members[i].protected_until;
        let roll = self.rng.range(0, 99);
        match roll {
            0..=7 => self.kill_agent_fault(i),
            8..=13 => {
                if !self.members[i].server_up {
                    return;
                }
                let back = self.until(1000, 3 * ttl_ms);
                self.trace(Some(i), || {
                    format!("FAULT server crash, back at {:.3}", back.as_secs_f64())
                });
                self.kill_agent(i);
                self.members[i].keeper = None;
                self.members[i].pg.kill();
                self.members[i].server_up = false;
                self.schedule(back, Ev::ServerUp { m: i });
            }
            14..=19 if self.members[i].pg.postmaster_alive() => {
                self.trace(Some(i), || "FAULT PostgreSQL crashes".into());
                self.members[i].pg.kill();
            }
            20..=23 if !protected && self.members[i].agent.is_some() => {
                // SIGSTOP of the whole agent: its fence timer and API stop
                // too; only the fence keeper is left to fence.
                let until = self.until(100, 3 * ttl_ms);
                self.trace(Some(i), || {
                    format!(
                        "FAULT agent process frozen until {:.3}",
                        until.as_secs_f64()
                    )
                });
                let m = &mut self.members[i];
                m.frozen_until = m.frozen_until.max(until);
                m.hung_until = m.hung_until.max(until);
            }
            24..=27 if !protected => {
                let until = self.until(100, 2 * ttl_ms);
                self.trace(Some(i), || {
                    format!("FAULT agent loop hangs until {:.3}", until.as_secs_f64())
                });
                self.members[i].hung_until = self.members[i].hung_until.max(until);
            }
            28..=39 if !protected => {
                let until = self.until(500, 3 * ttl_ms);
                self.trace(Some(i), || {
                    format!("FAULT cut from etcd until {:.3}", until.as_secs_f64())
                });
                self.members[i].etcd_cut_until = self.members[i].etcd_cut_until.max(until);
            }
            40..=45 => {
                let j = self.rng.range(0, n as u64 - 1) as usize;
                if i == j {
                    return;
                }
                let until = self.until(1000, 3 * ttl_ms);
                let names = (self.members[i].name.clone(), self.members[j].name.clone());
                self.trace(None, || {
                    format!(
                        "FAULT {} and {} cut from each other until {:.3}",
                        names.0,
                        names.1,
                        until.as_secs_f64()
                    )
                });
                let key = (i.min(j), i.max(j));
                let e = self.pair_cut.entry(key).or_insert(Duration::ZERO);
                *e = (*e).max(until);
            }
            46..=50 if !protected => {
                let until = self.until(1000, 2 * ttl_ms);
                self.trace(Some(i), || {
                    format!("FAULT slow etcd requests until {:.3}", until.as_secs_f64())
                });
                self.members[i].etcd_slow_until = self.members[i].etcd_slow_until.max(until);
            }
            51..=58 => {
                let max_lag = self.config().maximum_lag_on_failover;
                let bytes = self.rng.range(max_lag / 2, max_lag * 4);
                let until = self.until(2000, 4 * ttl_ms);
                self.trace(Some(i), || {
                    format!(
                        "FAULT replication trails by {bytes} bytes until {:.3}",
                        until.as_secs_f64()
                    )
                });
                self.members[i].lag_bytes = bytes;
                self.members[i].lag_until = until;
            }
            59..=66 => self.switchover(i),
            67..=71 => self.failover(i),
            72..=79 => {
                let req = *self.rng.pick(&[
                    OperatorRequest::Restart,
                    OperatorRequest::Reload,
                    OperatorRequest::Reinit,
                ]);
                // An operator reinitializes a replica only while another
                // member leads and runs (reinit of the best data when
                // nobody leads is an operator's mistake, not a fault).
                let leader = self.etcd.leader().and_then(|l| self.member_by_name(l));
                let sane = leader.is_some_and(|l| l != i && self.members[l].pg.writable());
                if req == OperatorRequest::Reinit && !sane {
                    return;
                }
                if let Some(a) = self.members[i].agent.as_mut() {
                    a.requests.push_back(req);
                    self.trace(Some(i), || format!("OPERATOR {req:?}"));
                    self.poke(i);
                }
            }
            80..=84 if !self.config().pause => {
                self.set_pause(true);
                let until = self.until(1000, 3 * ttl_ms);
                self.schedule(until, Ev::Resume);
            }
            85..=92 => self.edit_timings(),
            93..=98 => {
                let until = self.until(500, 2 * ttl_ms);
                let what = *self.rng.pick(&[
                    super::member::BLIND_PG,
                    super::member::BLIND_DATA,
                    super::member::BLIND_PG | super::member::BLIND_DATA,
                ]);
                self.trace(Some(i), || {
                    format!(
                        "FAULT reads of {} fail until {:.3}",
                        match what {
                            super::member::BLIND_PG => "postmaster.pid",
                            super::member::BLIND_DATA => "the data directory",
                            _ => "postmaster.pid and the data directory",
                        },
                        until.as_secs_f64()
                    )
                });
                self.members[i].blind = what;
                self.members[i].blind_until = until;
            }
            _ => {}
        }
    }

    /// An agent killed and restarted. Half the time a member that holds the
    /// leader key or could be writable comes back well within the lease
    /// (protected from other faults on its etcd link or loop until the
    /// lease would have expired): the new agent takes the lease and the
    /// fence keeper over. Otherwise it stays away up to three leases and
    /// only the fence keeper stands between its primary and a second one.
    fn kill_agent_fault(&mut self, i: usize) {
        if self.members[i].agent.is_none() || !self.members[i].server_up {
            return;
        }
        let name = self.members[i].name.clone();
        let pg = &self.members[i].pg;
        let risky = self.etcd.leader() == Some(name.as_str())
            || pg.writable()
            || matches!(
                pg.run,
                super::postgres::Run::Promoting { .. }
                    | super::postgres::Run::Starting { primary: true, .. }
            );
        let mut delay = self.rng.millis(50, 1000);
        if risky && self.rng.chance(50) {
            delay = self.rng.millis(1000, 3 * self.config().ttl * 1000);
        } else if risky {
            let expiry = self.etcd.key_expiry(etcd::LEADER);
            let remaining = match expiry {
                Some(e) if self.etcd.leader() == Some(name.as_str()) => e.saturating_sub(self.now),
                _ => Duration::ZERO,
            };
            let m = &self.members[i];
            let link_ok =
                !self.etcd_cut(i) && self.now >= m.etcd_slow_until && self.now >= m.hung_until;
            if !link_ok || remaining < Duration::from_secs(2) {
                return;
            }
            delay = delay.min(remaining / 3);
            self.members[i].protected_until = self.now + remaining;
        }
        self.trace(Some(i), || {
            format!(
                "FAULT agent killed, restarts in {:.3}s",
                delay.as_secs_f64()
            )
        });
        self.kill_agent(i);
        self.schedule(self.now + delay, Ev::AgentStart { m: i });
    }

    fn switchover(&mut self, i: usize) {
        let view = self.etcd.read_cluster(&self.plan.bootstrap_config());
        let candidate = self.rng.chance(50).then(|| self.members[i].name.clone());
        let leader = if self.rng.chance(50) {
            view.leader.clone()
        } else {
            None
        };
        let body = SwitchoverBody {
            leader,
            candidate,
            scheduled_at: None,
        };
        match check_switchover(&view, &body, self.wall_clock(), "sim") {
            Ok(req) => {
                let stored = self.etcd.create_failover(req, self.now);
                self.trace(None, || {
                    format!("OPERATOR switchover {body:?}: stored {stored}")
                });
            }
            Err(r) => self.trace(None, || {
                format!("OPERATOR switchover {body:?} refused: {r}")
            }),
        }
    }

    fn failover(&mut self, i: usize) {
        let view = self.etcd.read_cluster(&self.plan.bootstrap_config());
        let body = FailoverBody {
            candidate: Some(self.members[i].name.clone()),
            force: false,
        };
        match check_failover(&view, &body, self.wall_clock(), "sim") {
            Ok(req) => {
                let stored = self.etcd.create_failover(req, self.now);
                self.trace(None, || {
                    format!("OPERATOR failover to {:?}: stored {stored}", body.candidate)
                });
            }
            Err(r) => self.trace(None, || format!("OPERATOR failover refused: {r}")),
        }
    }

    /// The config as stored in etcd (the bootstrap config before that).
    pub fn config(&self) -> DynamicConfig {
        match self.etcd.get(etcd::CONFIG) {
            Some(Value::Config(c)) => (**c).clone(),
            _ => self.plan.bootstrap_config(),
        }
    }

    pub fn set_pause(&mut self, pause: bool) {
        let view = self.etcd.read_cluster(&self.plan.bootstrap_config());
        if !view.config_stored {
            return;
        }
        let mut c = view.config.clone();
        c.pause = pause;
        let ok = self.etcd.cas_config(c, view.config_revision, self.now);
        self.trace(None, || {
            format!("OPERATOR {}: {ok}", if pause { "pause" } else { "resume" })
        });
    }

    /// edit-config of the timings to any values the validation accepts.
    fn edit_timings(&mut self) {
        let view = self.etcd.read_cluster(&self.plan.bootstrap_config());
        if !view.config_stored {
            return;
        }
        let (ttl, loop_wait, retry) = if self.rng.chance(50) {
            *self.rng.pick(&NAMED_TIMINGS)
        } else {
            random_timing(&mut self.rng)
        };
        let mut c = view.config.clone();
        c.ttl = ttl;
        c.loop_wait = loop_wait;
        c.retry_timeout = retry;
        if c.check_timing().is_err() {
            return;
        }
        let ok = self.etcd.cas_config(c, view.config_revision, self.now);
        self.trace(None, || {
            format!(
                "OPERATOR edit-config ttl={ttl} loop_wait={loop_wait} retry_timeout={retry}: {ok}"
            )
        });
    }
}
