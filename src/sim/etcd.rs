//! An in-memory etcd: keys with create/mod revisions, leases whose TTL runs
//! on the simulation's global clock, and the transactions of
//! `src/dcs/etcd.rs` with the same comparisons (a comparison on a missing
//! key is false, as in etcd). Values are typed instead of JSON: the client
//! decodes exactly these documents.

use crate::config::DynamicConfig;
use crate::dcs::{
    ClusterStatus, ClusterView, FailoverRequest, HistoryEntry, Initialize, MemberStatus,
};
use std::collections::BTreeMap;
use std::time::Duration;

#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Text(String),
    Member(Box<MemberStatus>),
    Config(Box<DynamicConfig>),
    Status(ClusterStatus),
    History(Vec<HistoryEntry>),
    Failover(FailoverRequest),
    Names(Vec<String>),
    Sync(crate::dcs::SyncState),
}

#[derive(Debug, Clone)]
struct Kv {
    value: Value,
    create_rev: i64,
    mod_rev: i64,
    /// 0: no lease.
    lease: i64,
}

#[derive(Debug, Clone)]
struct Lease {
    ttl: Duration,
    expires: Duration,
}

/// What etcd answers a failed request with (the client maps each to an
/// error, as the real one does).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EtcdError {
    LeaseNotFound,
    Conflict,
}

pub const LEADER: &str = "leader";
pub const INITIALIZE: &str = "initialize";
pub const CONFIG: &str = "config";
pub const STATUS: &str = "status";
pub const HISTORY: &str = "history";
pub const FAILOVER: &str = "failover";
pub const FAILSAFE: &str = "failsafe";
pub const SYNC: &str = "sync";

pub fn member_key(name: &str) -> String {
    format!("members/{name}")
}

#[derive(Debug, Default)]
pub struct Etcd {
    revision: i64,
    kv: BTreeMap<String, Kv>,
    leases: BTreeMap<i64, Lease>,
    next_lease: i64,
    /// Every value the leader key took, with when (None: deleted).
    pub leader_log: Vec<(Duration, Option<String>)>,
    /// The leader key changed since the last `take_leader_event` (what the
    /// agents' watch reports).
    leader_event: bool,
}

impl Etcd {
    pub fn new() -> Self {
        Etcd {
            next_lease: 0x1000,
            ..Default::default()
        }
    }

    /// Drops expired leases and the keys on them.
    pub fn expire(&mut self, now: Duration) {
        let dead: Vec<i64> = self
            .leases
            .iter()
            .filter(|(_, l)| l.expires <= now)
            .map(|(id, _)| *id)
            .collect();
        for id in dead {
            self.leases.remove(&id);
            let keys: Vec<String> = self
                .kv
                .iter()
                .filter(|(_, kv)| kv.lease == id)
                .map(|(k, _)| k.clone())
                .collect();
            for k in keys {
                self.delete(&k, now);
            }
        }
    }

    /// The earliest lease expiry, for the scheduler to wake at.
    pub fn next_expiry(&self) -> Option<Duration> {
        self.leases.values().map(|l| l.expires).min()
    }

    pub fn take_leader_event(&mut self) -> bool {
        std::mem::take(&mut self.leader_event)
    }

    pub fn grant(&mut self, ttl_secs: u64, now: Duration) -> i64 {
        self.next_lease += 1;
        let ttl = Duration::from_secs(ttl_secs);
        self.leases.insert(
            self.next_lease,
            Lease {
                ttl,
                expires: now + ttl,
            },
        );
        self.next_lease
    }

    pub fn keep_alive(&mut self, id: i64, now: Duration) -> Result<(), EtcdError> {
        let lease = self.leases.get_mut(&id).ok_or(EtcdError::LeaseNotFound)?;
        lease.expires = now + lease.ttl;
        Ok(())
    }

    /// When the lease holding `key` expires (None: no such key, or a key
    /// without a lease).
    pub fn key_expiry(&self, key: &str) -> Option<Duration> {
        let kv = self.kv.get(key)?;
        self.leases.get(&kv.lease).map(|l| l.expires)
    }

    pub fn leader(&self) -> Option<&str> {
        match self.kv.get(LEADER).map(|kv| &kv.value) {
            Some(Value::Text(s)) => Some(s.as_str()),
            _ => None,
        }
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.kv.get(key).map(|kv| &kv.value)
    }

    fn text_is(&self, key: &str, want: &str) -> bool {
        matches!(self.kv.get(key).map(|kv| &kv.value), Some(Value::Text(s)) if s == want)
    }

    fn absent(&self, key: &str) -> bool {
        !self.kv.contains_key(key)
    }

    fn mod_rev(&self, key: &str) -> i64 {
        self.kv.get(key).map_or(0, |kv| kv.mod_rev)
    }

    fn check_lease(&self, lease: i64) -> Result<(), EtcdError> {
        if lease != 0 && !self.leases.contains_key(&lease) {
            return Err(EtcdError::LeaseNotFound);
        }
        Ok(())
    }

    pub fn put(
        &mut self,
        key: &str,
        value: Value,
        lease: i64,
        now: Duration,
    ) -> Result<(), EtcdError> {
        self.check_lease(lease)?;
        self.revision += 1;
        let rev = self.revision;
        let old_leader = (key == LEADER)
            .then(|| self.leader().map(str::to_string))
            .flatten();
        let create_rev = self.kv.get(key).map_or(rev, |kv| kv.create_rev);
        self.kv.insert(
            key.to_string(),
            Kv {
                value,
                create_rev,
                mod_rev: rev,
                lease,
            },
        );
        if key == LEADER {
            let new = self.leader().map(str::to_string);
            if new != old_leader {
                self.leader_event = true;
                self.leader_log.push((now, new));
            }
        }
        Ok(())
    }

    pub fn delete(&mut self, key: &str, now: Duration) {
        if self.kv.remove(key).is_some() {
            self.revision += 1;
            if key == LEADER {
                self.leader_event = true;
                self.leader_log.push((now, None));
            }
        }
    }

    // ------------------------------------------- the client's operations

    pub fn read_cluster(&self, defaults: &DynamicConfig) -> ClusterView {
        let mut view = ClusterView::empty(defaults.clone());
        for (key, kv) in &self.kv {
            match (key.as_str(), &kv.value) {
                (LEADER, Value::Text(s)) => view.leader = Some(s.clone()),
                (INITIALIZE, Value::Text(s)) => {
                    view.initialize = if s.is_empty() {
                        Initialize::Claimed
                    } else {
                        Initialize::SystemId(s.clone())
                    }
                }
                (CONFIG, Value::Config(c)) => {
                    view.config = (**c).clone();
                    view.config_stored = true;
                    view.config_revision = kv.mod_rev;
                }
                (FAILOVER, Value::Failover(f)) => view.failover = Some(f.clone()),
                (FAILSAFE, Value::Names(n)) => view.failsafe = Some(n.clone()),
                (SYNC, Value::Sync(s)) => view.sync = Some(s.clone()),
                (STATUS, Value::Status(s)) => view.status = Some(s.clone()),
                (HISTORY, Value::History(h)) => view.history = h.clone(),
                (_, Value::Member(m)) => view.members.push((**m).clone()),
                _ => {}
            }
        }
        view.members.sort_by(|a, b| a.name.cmp(&b.name));
        view
    }

    pub fn claim_initialize(
        &mut self,
        name: &str,
        lease: i64,
        now: Duration,
    ) -> Result<bool, EtcdError> {
        self.check_lease(lease)?;
        if !(self.absent(INITIALIZE) && self.absent(LEADER)) {
            return Ok(false);
        }
        self.put(INITIALIZE, Value::Text(String::new()), lease, now)?;
        self.put(LEADER, Value::Text(name.to_string()), lease, now)?;
        Ok(true)
    }

    pub fn abandon_bootstrap(&mut self, name: &str, now: Duration) -> bool {
        if !(self.text_is(INITIALIZE, "") && self.text_is(LEADER, name)) {
            return false;
        }
        self.delete(INITIALIZE, now);
        self.delete(LEADER, now);
        true
    }

    pub fn set_initialize(&mut self, sysid: &str, now: Duration) {
        // A plain put: the key leaves the bootstrapper's lease for good.
        let _ = self.put(INITIALIZE, Value::Text(sysid.to_string()), 0, now);
    }

    pub fn init_config(&mut self, config: &DynamicConfig, now: Duration) {
        if self.absent(CONFIG) {
            let _ = self.put(CONFIG, Value::Config(Box::new(config.clone())), 0, now);
        }
    }

    pub fn acquire_leader(
        &mut self,
        name: &str,
        lease: i64,
        now: Duration,
    ) -> Result<bool, EtcdError> {
        self.check_lease(lease)?;
        if !self.absent(LEADER) {
            return Ok(false);
        }
        self.put(LEADER, Value::Text(name.to_string()), lease, now)?;
        Ok(true)
    }

    /// `Dcs::renew_leader`: confirm on our lease, or move the key from our
    /// own previous lease; a key with our name on any other lease is not
    /// ours.
    pub fn renew_leader(
        &mut self,
        name: &str,
        lease: i64,
        previous: &[i64],
        now: Duration,
    ) -> Result<bool, EtcdError> {
        let on = |l: Option<i64>| self.kv.get(LEADER).is_some_and(|kv| Some(kv.lease) == l);
        if !self.text_is(LEADER, name) {
            return Ok(false);
        }
        if on(Some(lease)) {
            return Ok(true);
        }
        if !previous.iter().any(|p| on(Some(*p))) {
            return Ok(false);
        }
        let claim_on = self.kv.get(LEADER).map(|kv| kv.lease);
        self.put(LEADER, Value::Text(name.to_string()), lease, now)?;
        // The bootstrap claim follows its key (see `Dcs::renew_leader`).
        if self.text_is(INITIALIZE, "") && self.lease_of(INITIALIZE) == claim_on {
            self.put(INITIALIZE, Value::Text(String::new()), lease, now)?;
        }
        Ok(true)
    }

    /// `Dcs::release_leader`: only our name on one of our leases.
    pub fn release_leader(&mut self, name: &str, ours: &[i64], now: Duration) -> bool {
        let mine = self
            .kv
            .get(LEADER)
            .is_some_and(|kv| ours.contains(&kv.lease));
        if !self.text_is(LEADER, name) || !mine {
            return false;
        }
        // A bootstrap claim on the key's lease goes with it (see
        // `Dcs::release_leader`).
        if self.text_is(INITIALIZE, "") && self.lease_of(INITIALIZE) == self.lease_of(LEADER) {
            self.delete(INITIALIZE, now);
        }
        self.delete(LEADER, now);
        true
    }

    /// The lease a key lives on (None: absent or on none).
    pub fn lease_of(&self, key: &str) -> Option<i64> {
        self.kv.get(key).map(|kv| kv.lease).filter(|l| *l != 0)
    }

    pub fn write_status(&mut self, status: ClusterStatus, now: Duration) {
        let _ = self.put(STATUS, Value::Status(status), 0, now);
    }

    /// `Dcs::write_sync`: only while `leader` names the writer on its lease.
    pub fn write_sync(
        &mut self,
        sync: crate::dcs::SyncState,
        lease: Option<i64>,
        now: Duration,
    ) -> bool {
        let Some(lease) = lease else { return false };
        let ours = self.text_is(LEADER, &sync.leader)
            && self.kv.get(LEADER).is_some_and(|kv| kv.lease == lease);
        if ours {
            let _ = self.put(SYNC, Value::Sync(sync), 0, now);
        }
        ours
    }

    pub fn append_history(&mut self, entry: HistoryEntry, now: Duration) {
        let mut list = match self.get(HISTORY) {
            Some(Value::History(h)) => h.clone(),
            _ => Vec::new(),
        };
        list.push(entry);
        let _ = self.put(HISTORY, Value::History(list), 0, now);
    }

    pub fn set_failover_candidate(
        &mut self,
        leader: &str,
        candidate: &str,
        now: Duration,
    ) -> Result<(), EtcdError> {
        let Some(Value::Failover(f)) = self.get(FAILOVER) else {
            return Err(EtcdError::Conflict);
        };
        let mut req = f.clone();
        req.leader = Some(leader.to_string());
        req.candidate = Some(candidate.to_string());
        self.put(FAILOVER, Value::Failover(req), 0, now)
    }

    pub fn clear_failover(&mut self, now: Duration) {
        self.delete(FAILOVER, now);
    }

    /// An operator's request: created only if none is pending (the API's
    /// create-if-absent).
    pub fn create_failover(&mut self, req: FailoverRequest, now: Duration) -> bool {
        if !self.absent(FAILOVER) {
            return false;
        }
        let _ = self.put(FAILOVER, Value::Failover(req), 0, now);
        true
    }

    /// An operator's config edit, compare-and-swap on the revision read.
    pub fn cas_config(&mut self, config: DynamicConfig, revision: i64, now: Duration) -> bool {
        if self.mod_rev(CONFIG) != revision {
            return false;
        }
        let _ = self.put(CONFIG, Value::Config(Box::new(config)), 0, now);
        true
    }
}
