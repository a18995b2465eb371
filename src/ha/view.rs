use crate::config::Tags;
use std::collections::BTreeMap;
use std::time::Duration;

/// What the agent knows about its own instance and itself, as of one
/// observe step. Times are durations on the agent's monotonic clock.
#[derive(Debug, Clone, PartialEq)]
pub struct LocalView {
    pub name: String,
    pub tags: Tags,
    pub data: DataDir,
    pub pg: PgRun,
    /// A long action running in the background (the loop keeps going).
    pub job: Option<JobKind>,
    /// The last background action that failed, and when.
    pub last_failure: Option<JobFailure>,
    /// The etcd read of this loop succeeded (otherwise the cluster view is
    /// the last one seen).
    pub dcs_ok: bool,
    /// Start of the last successful renewal of our lease, the earliest
    /// moment from which its TTL is counted.
    pub last_renew: Option<Duration>,
    /// Per existing replication slot: when a member using it was last seen
    /// in etcd (leader only; used to drop slots of departed members).
    pub slot_last_seen: BTreeMap<String, Duration>,
    /// Where the data directory stood when PostgreSQL last stopped (read
    /// from pg_control while it is not running).
    pub control: Option<ControlInfo>,
    /// Other members' positions, as asked this pass because the policy
    /// needed them (`Decision::need`); None: not asked.
    pub peers: Option<Vec<PeerPosition>>,
    /// The other members as last seen in etcd while it held any: after a
    /// wipe, who may still hold this cluster's data.
    pub known_members: Vec<crate::dcs::MemberStatus>,
    /// When each other member was last seen in etcd: a new leader keeps a
    /// slot ready for one gone less than member_slots_ttl (the old primary
    /// of a failover rejoins onto it without waiting for a retry).
    pub members_seen: BTreeMap<String, Duration>,
    /// Synchronous mode, leader only: per standby in the applied
    /// `synchronous_standby_names`, the WAL position it must have flushed
    /// before `sync` may name it (`sync::track_applied`).
    pub sync_applied_at: BTreeMap<String, u64>,
    /// Since when etcd holds no `initialize` key, as observed.
    pub no_cluster_since: Option<Duration>,
    /// Our last lease operation found the leader key naming us on a lease
    /// that is not ours: nobody renews it, it will expire.
    pub leader_key_not_ours: bool,
    /// Failsafe: the primary we confirmed (over the API) while etcd was
    /// unreachable, and until when we take no lease (its ttl from then).
    pub failsafe_granted: Option<(String, Duration)>,
    /// Since when we hold the leader key without a running primary.
    pub primary_down_since: Option<Duration>,
    /// Wipe and re-clone when pg_rewind fails.
    pub reclone_on_rewind_failure: bool,
    /// Wall-clock time (Unix seconds), only for scheduled switchovers and
    /// the age of operator requests; never for lease arithmetic.
    pub wall_clock: u64,
    /// The config files on disk differ from what the current cluster and
    /// member config render (a dynamic config edit, say).
    pub conf_outdated: bool,
    /// An operator request made to this member's API (restart, reinit,
    /// reload), not yet carried out.
    pub request: Option<OperatorRequest>,
    /// Free space where PostgreSQL writes, as of this observation.
    pub disk: DiskSpace,
    /// A deliberately broken policy, for the simulator's mutation checks.
    #[cfg(test)]
    pub mutation: Option<super::Mutation>,
}

/// Bytes available to PostgreSQL (statvfs: blocks free to unprivileged
/// users) on the file systems of the data directory and of its WAL
/// (`pg_wal`, which may be a link elsewhere). None: could not be read (the
/// directory is gone, a permission error): unknown, never "full".
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DiskSpace {
    pub data_free: Option<u64>,
    pub wal_free: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OperatorRequest {
    Restart,
    Reinit,
    Reload,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControlInfo {
    pub timeline: u32,
    /// Start of the last checkpoint record (for a clean shutdown, the end
    /// of this instance's WAL).
    pub checkpoint_lsn: u64,
    /// Cluster state "shut down": all WAL was written and, with streaming
    /// replicas connected, sent.
    pub clean_shutdown: bool,
    /// Last ran as a primary (cluster state "in production" or "shut down").
    pub was_primary: bool,
}

/// Another member's answer to "how far are you?".
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerPosition {
    pub name: String,
    /// None: it did not answer in time (unreachable) or runs no replica.
    pub wal_lsn: Option<u64>,
    pub nofailover: bool,
    pub failover_priority: u32,
    /// It runs as a primary already (etcd lost its keys, say): it takes
    /// the lease without a promotion, so it beats any replica.
    pub running_primary: bool,
    /// It answered at all (false: unreachable, timed out, garbled).
    pub answered: bool,
    /// The system identifier of its data directory, as it answered (None:
    /// not answered or not readable there). A member holding another
    /// cluster's data cannot lead this one, however far ahead it is.
    pub system_id: Option<String>,
    /// It answered that it would not take the lease now (its disk is full,
    /// its last promotion failed): however far ahead, nobody stands back
    /// for it. True when it did not say (an older agent).
    pub candidate: bool,
    /// It stopped cleanly as the primary of this timeline (etcd went away,
    /// say) and would take the lease to start as primary again, without a
    /// promotion: no member can be ahead of it on that timeline.
    pub resumes_on: Option<u32>,
    /// The timeline it runs or last ran on, as it answered.
    pub timeline: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DataDir {
    /// Missing or empty: needs initdb or a clone.
    Empty,
    /// A PostgreSQL data directory with this system identifier.
    Initialized { system_id: String },
    /// Could not be told (a read failed: permissions, no descriptors
    /// left...). Never "empty": nothing destructive happens on it.
    Unknown(String),
}

#[derive(Debug, Clone, PartialEq)]
pub enum PgRun {
    Stopped,
    Running(PgRunning),
    /// A postmaster is alive but does not answer queries (starting up,
    /// crash recovery, hung).
    Unresponsive,
    /// Whether a postmaster runs could not be told (postmaster.pid
    /// unreadable). Never "stopped": it may run as a primary.
    Unknown(String),
    /// The postmaster last seen on our data directory still runs, but the
    /// directory's postmaster.pid is gone: the data directory was deleted
    /// (or replaced) under it. It may still take writes into files it
    /// holds open; nothing it writes survives.
    Orphaned,
}

#[derive(Debug, Clone, PartialEq)]
pub struct PgRunning {
    pub in_recovery: bool,
    pub timeline: Option<u32>,
    pub wal_lsn: Option<u64>,
    pub receive_lsn: Option<u64>,
    /// The WAL receiver is connected and streaming.
    pub streaming: bool,
    /// host:port in the running primary_conninfo, if any.
    pub upstream: Option<String>,
    /// Physical replication slots present on this instance.
    pub slots: Vec<String>,
    /// Some changed setting takes effect only after a restart.
    pub pending_restart: bool,
    /// `pg_postmaster_start_time()`: a new value proves a restart.
    pub postmaster_start: String,
    /// The `synchronous_standby_names` in force (as the probe's session
    /// sees it).
    pub synchronous_standby_names: String,
    /// `pg_stat_replication`: who streams from this instance.
    pub replication: Vec<Standby>,
}

/// One row of `pg_stat_replication`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Standby {
    /// application_name: the member name pgwarden puts in primary_conninfo.
    pub name: String,
    /// state = 'streaming' (caught up once, not in catch-up or backup).
    pub streaming: bool,
    pub flush_lsn: Option<u64>,
}

impl PgRun {
    pub fn running(&self) -> Option<&PgRunning> {
        match self {
            PgRun::Running(r) => Some(r),
            PgRun::Stopped | PgRun::Unresponsive | PgRun::Unknown(_) | PgRun::Orphaned => None,
        }
    }
    pub fn is_primary(&self) -> bool {
        matches!(self, PgRun::Running(r) if !r.in_recovery)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobKind {
    Bootstrap,
    Clone { from: String },
    Start,
    Stop,
    Rewind { from: String },
    RemoveData,
    Promote,
    Restart,
}

#[derive(Debug, Clone, PartialEq)]
pub struct JobFailure {
    pub kind: JobKind,
    pub message: String,
    pub at: Duration,
}

/// One thing to do, and why, in words for the operator's log.
#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    pub action: Action,
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Read the cluster from etcd and the local instance, and report them
    /// as `Event::Observed`.
    Observe,
    /// Ask other members how far their WAL is, and report the answers as
    /// `Event::Peers`.
    AskPeers(PeerQuery),
    /// Publish this member's status (member key, API snapshot): the end of
    /// a pass.
    Publish,
    /// Stop PostgreSQL in immediate mode now, whatever else runs: the
    /// leader lease may expire before a clean stop would finish.
    Fence,
    /// Create `initialize` (claimed) and `leader` atomically, both on our lease.
    ClaimBootstrap,
    /// Delete our bootstrap claim (`initialize` and `leader`) after a
    /// failed bootstrap.
    AbandonBootstrap,
    /// initdb, start, create the replication user (background job).
    Bootstrap,
    /// pg_basebackup from this member (background job).
    Clone {
        from: String,
        conn: String,
    },
    /// Make `initialize` permanent with our system identifier.
    PublishSystemId(String),
    /// Store the bootstrap defaults of the dynamic config.
    InitConfig,
    AcquireLeader,
    RenewLeader,
    ReleaseLeader,
    /// Start PostgreSQL writable (we hold the lease).
    StartPrimary,
    /// Start PostgreSQL in recovery, streaming from `upstream` if known.
    StartReplica {
        upstream: Option<Upstream>,
    },
    Promote,
    /// Stop PostgreSQL (a primary that finds another leader stops first,
    /// then rejoins by rewind or as a plain replica).
    Stop,
    /// pg_rewind from the upstream, then start as its replica (background).
    Rewind {
        upstream: Upstream,
    },
    /// Wipe the data directory so that the member clones afresh.
    RemoveData,
    /// Planned hand-over: record the chosen candidate in the request, then
    /// shut PostgreSQL down cleanly while keeping the lease.
    BeginSwitchover {
        candidate: String,
    },
    /// Delete the `failover` request (done, stale or refused).
    ClearFailover,
    /// Operator restart: stop and start PostgreSQL in its current role.
    Restart,
    /// Rewrite the config files and reload PostgreSQL.
    Reload,
    /// The operator's request has been handled (or refused).
    AckRequest,
    /// Point a running replica's primary_conninfo at another primary.
    Follow {
        upstream: Upstream,
    },
    CreateSlots(Vec<String>),
    DropSlots(Vec<String>),
    /// Publish the leader's WAL position in `status`.
    WriteStatus,
    /// Failsafe mode, etcd unreachable: ask every last-known member to
    /// confirm that it cannot reach etcd either and accepts us as the
    /// primary; report `Event::Failsafe`.
    AskFailsafe(Vec<PeerAddress>),
    /// Failsafe mode: record in etcd the members we would ask (us included).
    WriteFailsafe(Vec<String>),
    /// Synchronous mode: write `sync` naming these standbys (only while we
    /// hold the leader key).
    WriteSync(Vec<String>),
    /// Synchronous mode: set synchronous_standby_names to this value
    /// (`sync::render_standby_names`, or `NOBODY`), then reload.
    SetSyncStandbys(String),
}

/// What the policy needs to know about other members before it can decide.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerQuery {
    /// Rule 3: every other member's WAL position, over its API.
    Positions(Vec<PeerAddress>),
    /// A hand-over: how far the candidate's PostgreSQL has received.
    Received(PeerAddress),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerAddress {
    pub name: String,
    pub api_url: String,
    /// host:port of its PostgreSQL.
    pub address: String,
    pub nofailover: bool,
    pub failover_priority: u32,
}

impl PeerAddress {
    /// The answer recorded when the member did not answer.
    pub fn unanswered(&self) -> PeerPosition {
        PeerPosition {
            answered: false,
            ..self.answered(None)
        }
    }
    pub fn answered(&self, wal_lsn: Option<u64>) -> PeerPosition {
        PeerPosition {
            name: self.name.clone(),
            wal_lsn,
            nofailover: self.nofailover,
            failover_priority: self.failover_priority,
            running_primary: false,
            answered: true,
            system_id: None,
            candidate: true,
            resumes_on: None,
            timeline: None,
        }
    }
    /// Its answer naming its data directory's system identifier.
    pub fn answered_with_data(
        &self,
        wal_lsn: Option<u64>,
        system_id: Option<String>,
    ) -> PeerPosition {
        PeerPosition {
            system_id,
            ..self.answered(wal_lsn)
        }
    }
}

impl Action {
    /// The background job this action starts, if it runs as one. `major`
    /// matters for Follow: before PostgreSQL 13 re-pointing needs a restart.
    pub fn job(&self, major: u32) -> Option<JobKind> {
        match self {
            Action::Bootstrap => Some(JobKind::Bootstrap),
            Action::Clone { from, .. } => Some(JobKind::Clone { from: from.clone() }),
            Action::StartPrimary | Action::StartReplica { .. } => Some(JobKind::Start),
            Action::Stop | Action::BeginSwitchover { .. } => Some(JobKind::Stop),
            Action::Rewind { upstream } => Some(JobKind::Rewind {
                from: upstream.name.clone(),
            }),
            Action::RemoveData => Some(JobKind::RemoveData),
            Action::Promote => Some(JobKind::Promote),
            Action::Restart => Some(JobKind::Restart),
            Action::Follow { .. } if major < 13 => Some(JobKind::Start),
            _ => None,
        }
    }

    /// Operations on the leader key whose outcome the core must hear
    /// (`Event::Lease`) before anything after them may run.
    pub fn is_lease_op(&self) -> bool {
        matches!(
            self,
            Action::ClaimBootstrap
                | Action::AcquireLeader
                | Action::RenewLeader
                | Action::ReleaseLeader
                | Action::AbandonBootstrap
        )
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upstream {
    pub name: String,
    /// host:port of the upstream PostgreSQL.
    pub address: String,
}

/// The outcome of one decision: steps to take, and a problem to report in
/// the member's status when nothing can be done about it automatically.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Decision {
    pub steps: Vec<Step>,
    pub problem: Option<String>,
    /// What the agent is waiting for, when it does nothing.
    pub waiting: Option<String>,
    /// Facts the policy must have before it can decide (asked, then the
    /// decision is taken again with the answers).
    pub need: Option<PeerQuery>,
}

/// The role and state a member publishes (member key, `/status`, `list`)
/// for what it observed: one mapping for the agent and the simulator.
/// Failsafe mode, the member side: whether to confirm a primary that asks
/// (`POST /failsafe`), from this member's last pass. Only a member that
/// cannot reach etcd either may: one that can would see the lease expire
/// and could elect another primary. None: confirm; Some: why not.
pub fn failsafe_refusal(
    failsafe_mode: bool,
    dcs_ok: bool,
    runs_primary: bool,
    holds_leader_key: bool,
) -> Option<String> {
    if !failsafe_mode {
        Some("failsafe_mode is off".into())
    } else if dcs_ok {
        Some("this member reaches etcd: it follows the leader key, not the failsafe".into())
    } else if runs_primary {
        Some("this member runs as a primary itself".into())
    } else if holds_leader_key {
        // It won the lease and may be promoting right now.
        Some("this member holds the leader key".into())
    } else {
        None
    }
}

pub fn published_role_state(
    local: &LocalView,
    i_lead: bool,
    sync_standby: bool,
) -> (crate::dcs::Role, crate::dcs::PgState) {
    use crate::dcs::{PgState, Role};
    let role = match &local.data {
        DataDir::Empty if local.job != Some(JobKind::Bootstrap) => Role::Uninitialized,
        _ if i_lead => Role::Leader,
        _ if sync_standby => Role::SyncStandby,
        _ => Role::Replica,
    };
    let state = match (&local.job, &local.pg) {
        (Some(JobKind::Bootstrap), _) => PgState::Initializing,
        (Some(JobKind::Clone { .. }), _) => PgState::CreatingReplica,
        (Some(JobKind::Start), _) => PgState::Starting,
        (Some(JobKind::Stop), _) => PgState::Stopping,
        (Some(JobKind::Restart), _) => PgState::Restarting,
        (Some(JobKind::Rewind { .. }), _) => PgState::Rewinding,
        (Some(JobKind::RemoveData), _) => PgState::Stopped,
        (Some(JobKind::Promote), _) => PgState::Promoting,
        (None, PgRun::Running(pg)) if !pg.in_recovery => PgState::Running,
        (None, PgRun::Running(pg)) if pg.streaming => PgState::Streaming,
        (None, PgRun::Running(_)) => PgState::InRecovery,
        (None, PgRun::Unresponsive) => PgState::Starting,
        (None, PgRun::Unknown(_)) => PgState::Unknown,
        (None, PgRun::Orphaned) => PgState::Stopping,
        (None, PgRun::Stopped) if super::decide::disk_full(local).is_some() => PgState::DiskFull,
        (None, PgRun::Stopped) => match &local.last_failure {
            Some(f) => match f.kind {
                JobKind::Bootstrap => PgState::BootstrapFailed,
                JobKind::Clone { .. } => PgState::CloneFailed,
                JobKind::Rewind { .. } => PgState::RewindFailed,
                _ => PgState::StartFailed,
            },
            None => PgState::Stopped,
        },
    };
    (role, state)
}
