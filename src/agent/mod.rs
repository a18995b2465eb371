//! The agent's runtime around `ha::Core`: it performs the I/O the core asks
//! for (observe etcd and PostgreSQL, lease transactions, PostgreSQL
//! commands, background jobs, publishing) and reports the results as
//! events. It decides nothing: every "whether" and "when" is the core's.

mod act;
mod fence;
mod jobs;
mod observe;
mod publish;
mod startup;

pub use startup::run;

use crate::api::SharedState;
use crate::config::Config;
use crate::dcs::{Dcs, MemberStatus};
use crate::ha::{Core, Event, Step};
use crate::postgres::Instance;

use std::time::{Duration, Instant};

/// The runtime's own memory: connections, caches and what was last logged
/// or published. Policy state lives in `core`.
struct Agent {
    cfg: Config,
    core: Core,
    dcs: Option<Dcs>,
    pg: Instance,
    api: SharedState,
    /// Zero point of the monotonic clock handed to the core.
    epoch: Instant,
    job: Option<jobs::RunningJob>,
    fence: fence::FenceTimer,
    /// The same deadline, held by a process that outlives this one.
    keeper: crate::fence_keeper::KeeperFeed,
    /// Start of the last successful lease keep-alive.
    lease_kept_at: Option<Instant>,
    /// Cached system identifier of the data directory (pg_controldata).
    system_id: Option<String>,
    last_published: Option<MemberStatus>,
    /// The etcd lease `last_published` was written on.
    published_on: Option<i64>,
    /// The last failed read of pg_control, logged once.
    last_read_failure: Option<String>,
    /// A reason the agent must stop (another live agent has our name).
    fatal: Option<String>,
    last_status_written: Option<(u64, u32)>,
    /// Steps of the previous pass, to log each action once, not every pass.
    last_steps: Vec<Step>,
    this_pass: Vec<Step>,
    last_waiting: Option<String>,
    last_problem: Option<String>,
    major: u32,
    /// A promotion running as a job, to record in `history` once done.
    pending_promotion: Option<Promotion>,
    /// The last other leader seen in etcd, for the history of a failover.
    last_leader_seen: Option<String>,
    /// For asking other members' APIs (rule 3), with a short timeout.
    http: reqwest::Client,
}

impl Agent {
    fn now(&self) -> Duration {
        self.epoch.elapsed()
    }

    fn since_epoch(&self, t: Instant) -> Duration {
        t.saturating_duration_since(self.epoch)
    }

    /// Reports an event to the core and re-arms the fence timer with the
    /// deadline the core now holds.
    fn handle(&mut self, event: Event) {
        let now = self.now();
        self.core.handle(event, now);
        let deadline = self.core.fence_deadline().map(|d| self.epoch + d);
        self.fence.arm(deadline);
        // Until etcd answers this agent's first lease operation the keeper
        // only lets its deadline come forward (`Line::apply`).
        self.keeper.arm(deadline, self.core.lease_answered());
    }
}

/// What `history` will say about a promotion in progress.
struct Promotion {
    switch_lsn: Option<u64>,
    reason: String,
}
