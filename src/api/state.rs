use crate::dcs::{ClusterView, MemberStatus};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

/// What the loop last observed, as the HTTP API sees it. Handlers read this
/// and nothing else, so a hung PostgreSQL or etcd cannot hang a health check.
#[derive(Debug, Clone)]
pub struct ApiSnapshot {
    /// This member's status as last published.
    pub member: MemberStatus,
    /// The cluster as last read from etcd (None before the first read).
    pub cluster: Option<ClusterView>,
    /// etcd `leader` names this member in the last view.
    pub holds_leader_key: bool,
    /// Moment our lease may expire: start of the last successful renewal
    /// plus ttl. `/primary` is 503 from then on.
    pub lease_valid_until: Option<Instant>,
    /// PostgreSQL accepts connections (any role).
    pub pg_running: bool,
    /// PostgreSQL is running in recovery.
    pub in_recovery: bool,
    /// The WAL receiver is streaming from an upstream.
    pub streaming: bool,
    /// Bytes this replica is behind the leader's last published position.
    pub lag_bytes: Option<u64>,
    /// This member is listed in `sync` (synchronous standby).
    pub is_sync: bool,
    /// When the agent's loop last completed.
    pub last_loop: Instant,
    pub ttl: Duration,
    pub paused: bool,
    /// `pg_postmaster_start_time()` as last observed, when running.
    pub postmaster_start: Option<String>,
    /// The data directory's system identifier, when it could be read.
    /// Peers use it to tell a member holding another cluster's data from
    /// a candidate.
    pub system_id: Option<String>,
    /// The last pass read etcd.
    pub dcs_ok: bool,
    /// Bytes available to PostgreSQL on the data directory's file system
    /// (None: unknown).
    pub data_dir_free_bytes: Option<u64>,
    /// Bytes available on the WAL directory's file system (None: unknown).
    pub wal_dir_free_bytes: Option<u64>,
    /// Whether this member would take the leader lease in an election now,
    /// whatever its position: false when tagged nofailover, when its disk
    /// is full, or when its last promotion failed. Peers asking for
    /// positions do not stand back for a member that would not stand.
    pub failover_candidate: bool,
    /// The timeline this member would start on as primary again without a
    /// promotion (`ha::resumable_primary`): peers stand back for it.
    pub resumes_on: Option<u32>,
}

/// Shared between the loop (writer) and the HTTP handlers (readers).
#[derive(Debug, Clone)]
pub struct SharedState(Arc<RwLock<Arc<ApiSnapshot>>>);

impl SharedState {
    pub fn new(initial: ApiSnapshot) -> Self {
        SharedState(Arc::new(RwLock::new(Arc::new(initial))))
    }

    pub fn get(&self) -> Arc<ApiSnapshot> {
        match self.0.read() {
            Ok(g) => g.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    pub fn set(&self, snap: ApiSnapshot) {
        let snap = Arc::new(snap);
        match self.0.write() {
            Ok(mut g) => *g = snap,
            Err(poisoned) => *poisoned.into_inner() = snap,
        }
    }
}

impl ApiSnapshot {
    /// Maintenance mode, as the agent reports it or as the stored dynamic
    /// config says (the snapshot's cluster view is the source of truth).
    pub fn is_paused(&self) -> bool {
        self.paused || self.cluster.as_ref().is_some_and(|c| c.config.pause)
    }

    /// This member holds the lease and runs as a writable primary, and the
    /// lease cannot have expired yet.
    pub fn is_primary(&self, now: Instant) -> bool {
        self.holds_leader_key
            && self.pg_running
            && !self.in_recovery
            && self.lease_valid_until.is_some_and(|t| now < t)
    }
}
