//! The HA policy. `decide` is one pure function from what the agent
//! observed to what it should do; `Core` is the sans-IO state machine around
//! it that owns every piece of state a decision depends on (renewals,
//! fencing deadlines, jobs, failures, requests). No I/O, no clock, no
//! randomness: time is passed in, so tests can tabulate situations and the
//! simulator (`crate::sim`, tests only) can replay fault schedules.

mod core;
mod decide;

use std::time::Duration;

/// How long the runtime waits for a peer's API when asking positions: an
/// unreachable member must not hold an election back by more than this.
pub const PEER_ASK_TIMEOUT: Duration = Duration::from_millis(1500);

/// How long a failsafe confirmation may take per member: a round must end
/// within a renewal interval, before the next retry.
pub const FAILSAFE_ASK_TIMEOUT: Duration = Duration::from_millis(800);

mod operator;
mod sync;
mod view;

pub use self::core::{Core, Event, Identity, LeaseOutcome, Observation};
pub use decide::{
    conf_role, decide, disk_full, not_a_candidate, resumable_primary, MIN_FREE_BYTES,
};
pub use operator::switchover_candidate_problem;
pub use sync::{
    parse_standby_names, render_standby_names, replication_mode, ReplicationMode, NOBODY,
};
pub use view::*;

/// Deliberately broken policies, each caught by the simulator.
#[cfg(test)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mutation {
    /// Promote a replica when there is no leader, without taking the lease.
    PromoteWithoutLease,
    /// Never demote or fence a leader whose renewals fail.
    NoDemotion,
    /// Let a replica beyond maximum_lag_on_failover take over.
    IgnoreMaximumLag,
    /// The old rule: demote when the last renewal is retry_timeout old,
    /// which a healthy leader with loop_wait >= retry_timeout reaches.
    OldFreshnessRule,
    /// A read that failed taken for a fact: PostgreSQL "stopped", the data
    /// directory "empty" (the open-file exhaustion of issue 9).
    UnknownIsAbsent,
    /// The runtime never feeds a fence keeper (simulator only: the core is
    /// untouched): a killed or frozen leader agent leaves its primary
    /// writable past the lease.
    NoFenceKeeper,
    /// Synchronous mode: publish a chosen standby in `sync` before it has
    /// caught up (rule 4's order broken).
    SyncPublishUncaught,
    /// Synchronous mode: elections ignore `sync`.
    SyncElectAnyone,
}

#[cfg(test)]
mod tests;
