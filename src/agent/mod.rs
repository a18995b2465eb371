//! The agent's runtime: observe → decide → act → publish, every loop_wait
//! and at once when the leader key changes. All HA policy is in `crate::ha`;
//! this module only gathers facts and carries out decisions.

mod act;
mod jobs;
mod observe;
mod publish;
mod startup;

pub use startup::run;

use crate::api::SharedState;
use crate::config::Config;
use crate::dcs::{ClusterView, Dcs, MemberStatus};
use crate::ha::{JobFailure, Step};
use crate::postgres::Instance;
use std::collections::BTreeMap;

use std::time::{Duration, Instant};

/// The agent's memory between loops: facts the pure decision function
/// cannot derive from etcd or PostgreSQL alone.
struct Agent {
    cfg: Config,
    dcs: Option<Dcs>,
    pg: Instance,
    api: SharedState,
    /// Zero point of the monotonic clock handed to `ha::decide`.
    epoch: Instant,
    last_cluster: Option<ClusterView>,
    job: Option<jobs::RunningJob>,
    last_failure: Option<JobFailure>,
    /// Start of the last successful lease keep-alive.
    lease_kept_at: Option<Instant>,
    /// Start of the keep-alive that preceded our last confirmed hold of the
    /// leader key: the lease cannot expire before this + ttl.
    last_renew: Option<Instant>,
    system_id: Option<String>,
    slot_last_seen: BTreeMap<String, Duration>,
    last_published: Option<MemberStatus>,
    last_status_written: Option<(u64, u32)>,
    /// Steps of the previous loop, to log each action once, not every loop.
    last_steps: Vec<Step>,
    last_waiting: Option<String>,
    last_problem: Option<String>,
    problem: Option<String>,
    major: u32,
    /// pg_control as last read while PostgreSQL was stopped; kept while it
    /// runs so the policy knows what the running instance started from.
    last_control: Option<crate::ha::ControlInfo>,
    /// An operator request from the API not yet acknowledged by the policy.
    pending_request: Option<crate::ha::OperatorRequest>,
    /// A promotion running as a job, to record in `history` once done.
    pending_promotion: Option<Promotion>,
    /// The last leader seen in etcd, for the history of a failover.
    last_leader_seen: Option<String>,
    /// See `ha::LocalView::primary_down_since`.
    primary_down_since: Option<Duration>,
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
}

/// What `history` will say about a promotion in progress.
struct Promotion {
    switch_lsn: Option<u64>,
    reason: String,
}
