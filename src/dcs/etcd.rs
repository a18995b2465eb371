use super::{ClusterStatus, ClusterView, HistoryEntry, Initialize, Keys, MemberStatus, SyncState};
use crate::config::DynamicConfig;
use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, GetOptions, LeaseKeepAliveStream, LeaseKeeper,
    PutOptions, Txn, TxnOp, WatchOptions,
};
use std::collections::HashSet;
use std::future::Future;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum DcsError {
    // Not marked as the source: the message already carries it, and a
    // source would print it twice in `{:#}` chains.
    #[error("etcd: {0}")]
    Etcd(Box<etcd_client::Error>),
    #[error("etcd did not answer within {0:?}")]
    Timeout(Duration),
    #[error("etcd key {key} holds invalid JSON: {source}")]
    Decode {
        key: String,
        source: serde_json::Error,
    },
    #[error("etcd key {0} kept changing under concurrent writers")]
    Conflict(String),
    #[error("our etcd lease expired")]
    LeaseLost,
    /// Another live agent holds our member name (on its own lease).
    #[error("member name `{name}` is already used by a live member (API {api_url}, PostgreSQL {address}) on another etcd lease: give this agent another `name`")]
    NameTaken {
        name: String,
        api_url: String,
        address: String,
    },
}

impl From<etcd_client::Error> for DcsError {
    fn from(e: etcd_client::Error) -> Self {
        DcsError::Etcd(Box::new(e))
    }
}

/// Result of a leader-key transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaderOutcome {
    Won,
    Lost,
}

/// A connection to etcd scoped to one cluster, holding this agent's lease
/// (the member key and, while leader, the leader key live on it).
pub struct Dcs {
    pub(super) client: Client,
    pub(super) keys: Keys,
    pub(super) timeout: Duration,
    lease: Option<i64>,
    /// The TTL `lease` was granted with: etcd keeps it for the lease's
    /// lifetime, whatever the dynamic config says later.
    lease_ttl: u64,
    /// Leases of our own that keys may still be on: our previous life (an
    /// agent restarted on the same instance, recognised at start by its
    /// member key) or the lease before a ttl change. Keys on them are ours
    /// to move; a key on any other lease is not ours, whatever name it
    /// holds. Several: a previous life killed between moving its member
    /// key and its leader key onto a new lease left them on two leases.
    previous_leases: Vec<i64>,
    /// A write on `lease` found it gone; `keep_alive` reports that before
    /// granting a new one (see [`Dcs::on_lease`]).
    lease_gone: bool,
    keeper: Option<(LeaseKeeper, LeaseKeepAliveStream)>,
    endpoints: Vec<String>,
    current: usize,
    /// The last `config` that decoded, used while the stored one does not.
    last_config: Option<DynamicConfig>,
    /// Problems of `read_cluster` already logged.
    warned: Warned,
    /// Log problems of `read_cluster` (off for callers that show them).
    log_problems: bool,
}

/// The agent reads the cluster every loop: a problem that persists would
/// otherwise fill the log with the same line every `loop_wait`.
#[derive(Debug, Default)]
pub(super) struct Warned(HashSet<String>);

impl Warned {
    /// Problem texts carry parts of what is stored: a writer that keeps
    /// storing new garbage must not grow the set forever.
    const MAX: usize = 256;

    /// The problems not reported before, remembered as reported now.
    pub(super) fn first_seen<'a>(&mut self, problems: &'a [String]) -> Vec<&'a String> {
        let mut fresh = Vec::new();
        for problem in problems {
            if self.0.contains(problem) {
                continue;
            }
            if self.0.len() >= Self::MAX {
                self.0.clear();
            }
            self.0.insert(problem.clone());
            fresh.push(problem);
        }
        fresh
    }
}

impl Dcs {
    /// Connects to the first endpoint that answers. One client talks to one
    /// endpoint at a time: the client library's own balancing keeps sending
    /// requests to a dead member, which would make a healthy leader miss
    /// its renewals while etcd still has quorum.
    pub async fn connect(
        endpoints: &[String],
        keys: Keys,
        timeout: Duration,
    ) -> Result<Self, DcsError> {
        let mut last = DcsError::Timeout(timeout);
        for (i, endpoint) in endpoints.iter().enumerate() {
            match probe_endpoint(endpoint, timeout).await {
                Ok(client) => {
                    return Ok(Dcs {
                        client,
                        keys,
                        timeout,
                        lease: None,
                        lease_gone: false,
                        lease_ttl: 0,
                        previous_leases: Vec::new(),
                        keeper: None,
                        endpoints: endpoints.to_vec(),
                        current: i,
                        last_config: None,
                        warned: Warned::default(),
                        log_problems: true,
                    })
                }
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    /// Moves to the next endpoint that answers, after a request failed.
    /// The lease lives in the etcd cluster, not in the endpoint: it stays.
    pub async fn switch_endpoint(&mut self) -> Result<(), DcsError> {
        let n = self.endpoints.len();
        let mut last = DcsError::Timeout(self.timeout);
        for step in 1..=n {
            let i = (self.current + step) % n;
            match probe_endpoint(&self.endpoints[i], self.timeout).await {
                Ok(client) => {
                    if i != self.current {
                        tracing::info!(
                            "etcd: switching from {} to {}",
                            self.endpoints[self.current],
                            self.endpoints[i]
                        );
                    }
                    self.client = client;
                    self.current = i;
                    self.keeper = None;
                    return Ok(());
                }
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    /// The lease our keys live on, if one was granted.
    pub fn lease(&self) -> Option<i64> {
        self.lease
    }

    pub fn has_alternatives(&self) -> bool {
        self.endpoints.len() > 1
    }

    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    /// The etcd lease our keys live on, once granted (None after it was
    /// found lost: the next keep-alive grants a new one).
    pub fn current_lease(&self) -> Option<i64> {
        self.lease
    }

    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    /// Reads every key of the cluster in one range request. A key that
    /// cannot be decoded does not fail the read (that would look like etcd
    /// being down to every member, and every primary would step down): it
    /// is replaced as [`decode_cluster`] describes and reported in
    /// `problems`, and logged once per distinct problem.
    pub async fn read_cluster(
        &mut self,
        defaults: &DynamicConfig,
    ) -> Result<ClusterView, DcsError> {
        let prefix = self.keys.prefix().to_string();
        let resp = with_timeout(
            self.timeout,
            self.client
                .get(prefix.as_bytes(), Some(GetOptions::new().with_prefix())),
        )
        .await?;
        let kvs = resp.kvs().iter().map(|kv| RawKv {
            key: kv.key(),
            value: kv.value(),
            mod_revision: kv.mod_revision(),
        });
        let decoded = decode_cluster(&prefix, kvs, defaults, self.last_config.as_ref());
        if decoded.config_decoded {
            self.last_config = Some(decoded.view.config.clone());
        }
        self.warn_once(&decoded.view.problems);
        Ok(decoded.view)
    }

    /// Whether `read_cluster` logs its problems; a command that prints
    /// them itself turns this off so they are not printed twice.
    pub fn set_log_problems(&mut self, on: bool) {
        self.log_problems = on;
    }

    fn warn_once(&mut self, problems: &[String]) {
        if !self.log_problems {
            return;
        }
        for problem in self.warned.first_seen(problems) {
            tracing::warn!("{problem}");
        }
    }

    async fn lease_id(&mut self, ttl: u64) -> Result<i64, DcsError> {
        if let Some(id) = self.lease {
            // A keep-alive extends a lease by the TTL it was granted with,
            // not by the ttl of the config now. After ttl shrank the longer
            // lease stays: the policy counts the shorter ttl, and moving the
            // leader key onto a shorter lease would let it expire before a
            // fence deadline armed with the longer one.
            if self.lease_ttl >= ttl {
                return Ok(id);
            }
            // After ttl grew the old lease would expire before the policy
            // counts: a new lease takes the new ttl, the keys move onto it
            // as they are renewed (leader) and republished (member), and the
            // old one runs out empty.
            tracing::info!(
                "ttl grew from {}s to {ttl}s: taking a new etcd lease",
                self.lease_ttl
            );
            self.remember_lease(id);
        }
        let resp = with_timeout(self.timeout, self.client.lease_grant(ttl as i64, None)).await?;
        self.lease_ttl = ttl;
        self.lease = Some(resp.id());
        self.keeper = None;
        Ok(resp.id())
    }

    /// Extends our lease by its TTL. On `LeaseLost` the next call grants a
    /// new lease; keys on the old one are gone.
    pub async fn keep_alive(&mut self, ttl: u64) -> Result<(), DcsError> {
        if self.lease_gone {
            return Err(self.lease_lost());
        }
        let id = self.lease_id(ttl).await?;
        // One request's budget for the whole call, reopening included: the
        // agent's renewal and fencing deadlines count on that bound.
        let deadline = tokio::time::Instant::now() + self.timeout;
        if let Some((keeper, stream)) = self.keeper.as_mut() {
            let result = match tokio::time::timeout_at(deadline, renew(keeper, stream)).await {
                Ok(r) => r,
                // A late answer would be read as the next call's: start over.
                Err(_) => Renewal::Failed(DcsError::Timeout(self.timeout)),
            };
            match result {
                Renewal::Renewed => return Ok(()),
                Renewal::Expired => return Err(self.lease_lost()),
                Renewal::Failed(e) => {
                    self.keeper = None;
                    return Err(e);
                }
                // etcd or a proxy closed the stream (GOAWAY, restart): that
                // says nothing about the lease, so ask again on a new one.
                Renewal::StreamClosed(e) => {
                    self.keeper = None;
                    tracing::debug!("etcd keep-alive stream closed ({e}); opening a new one");
                }
            }
        }
        self.open_keeper(id, deadline).await
    }

    /// Opens a keep-alive stream; etcd-client sends the first keep-alive
    /// itself, so this also renews the lease.
    async fn open_keeper(
        &mut self,
        id: i64,
        deadline: tokio::time::Instant,
    ) -> Result<(), DcsError> {
        let opened = match tokio::time::timeout_at(deadline, self.client.lease_keep_alive(id)).await
        {
            Ok(r) => r,
            Err(_) => return Err(DcsError::Timeout(self.timeout)),
        };
        let e = match opened {
            Ok(pair) => {
                self.keeper = Some(pair);
                return Ok(());
            }
            Err(e) => e,
        };
        if is_not_found(&e) {
            return Err(self.lease_lost());
        }
        // etcd-client answers a zero TTL ("lease not found") and a closed
        // request channel with the same error: only etcd can tell which.
        if matches!(e, etcd_client::Error::LeaseKeepAliveError(_)) {
            let ttl =
                tokio::time::timeout_at(deadline, self.client.lease_time_to_live(id, None)).await;
            let lost = match &ttl {
                Ok(Ok(resp)) => resp.ttl() <= 0,
                Ok(Err(e)) => is_not_found(e),
                Err(_) => false,
            };
            if lost {
                return Err(self.lease_lost());
            }
        }
        Err(e.into())
    }

    /// Forgets a lease etcd no longer has, so the next call grants a new one.
    fn lease_lost(&mut self) -> DcsError {
        self.lease = None;
        self.lease_gone = false;
        self.keeper = None;
        DcsError::LeaseLost
    }

    pub async fn publish_member(
        &mut self,
        status: &MemberStatus,
        ttl: u64,
    ) -> Result<(), DcsError> {
        let id = self.lease_id(ttl).await?;
        let key = self.keys.member(&status.name);
        let value = serde_json::to_vec(status).map_err(|source| DcsError::Decode {
            key: key.clone(),
            source,
        })?;
        let put = TxnOp::put(key.clone(), value, Some(PutOptions::new().with_lease(id)));
        // Ours already (the usual case, one round trip), free, or on our own
        // previous lease: anything else is another agent with our name.
        let mut owners = vec![
            Compare::lease(key.clone(), CompareOp::Equal, id),
            Compare::create_revision(key.clone(), CompareOp::Equal, 0),
        ];
        for prev in &self.previous_leases {
            owners.push(Compare::lease(key.clone(), CompareOp::Equal, *prev));
        }
        for owner in owners {
            let txn = Txn::new().when([owner]).and_then([put.clone()]);
            if self.run_lease_txn(txn).await? == LeaderOutcome::Won {
                return Ok(());
            }
        }
        // Our own previous life, not seen at start (etcd was unreachable
        // then): adopt its lease and try once more.
        let (holder, lease) = self.member_key(&status.name).await?;
        if holder.as_ref().is_some_and(|m| same_instance(m, status)) && lease != 0 {
            self.remember_lease(lease);
            let txn = Txn::new()
                .when([Compare::lease(key, CompareOp::Equal, lease)])
                .and_then([put]);
            if self.run_lease_txn(txn).await? == LeaderOutcome::Won {
                return Ok(());
            }
        }
        Err(name_taken_by(&status.name, holder.as_ref()))
    }

    /// A member key as stored, and the lease it is on (0: none, or absent).
    async fn member_key(&mut self, name: &str) -> Result<(Option<MemberStatus>, i64), DcsError> {
        let key = self.keys.member(name);
        let resp = with_timeout(self.timeout, self.client.get(key, None)).await?;
        Ok(match resp.kvs().first() {
            Some(kv) => (serde_json::from_slice(kv.value()).ok(), kv.lease()),
            None => (None, 0),
        })
    }

    /// Checks at start that no other live agent uses our member name. A
    /// member key for our name whose addresses are ours is our own previous
    /// life (an agent restarted on this instance): its lease is remembered,
    /// so that the keys on it can be moved onto the new one.
    pub async fn claim_name(
        &mut self,
        name: &str,
        api_url: &str,
        address: &str,
    ) -> Result<(), DcsError> {
        let (holder, lease) = self.member_key(name).await?;
        let Some(holder) = holder else {
            return Ok(());
        };
        let same =
            holder.api_url == api_url && format!("{}:{}", holder.host, holder.port) == address;
        if same && lease != 0 {
            self.remember_lease(lease);
            // With our own member key alive, a leader key naming us is our
            // previous life's too: no other agent could have claimed the
            // name while that key existed.
            let resp =
                with_timeout(self.timeout, self.client.get(self.keys.leader(), None)).await?;
            if let Some(kv) = resp.kvs().first() {
                if kv.value() == name.as_bytes() && kv.lease() != 0 {
                    self.remember_lease(kv.lease());
                }
            }
            return Ok(());
        }
        Err(name_taken_by(name, Some(&holder)))
    }

    fn remember_lease(&mut self, id: i64) {
        if !self.previous_leases.contains(&id) {
            self.previous_leases.push(id);
        }
        // Only the latest few can still hold keys: older ones expired.
        if self.previous_leases.len() > 4 {
            self.previous_leases.remove(0);
        }
    }

    /// Bootstrap claim: atomically creates `initialize` (empty: bootstrap
    /// in progress) and `leader`, both on our lease so that a bootstrapper
    /// that dies lets another member try.
    pub async fn claim_initialize(
        &mut self,
        name: &str,
        ttl: u64,
    ) -> Result<LeaderOutcome, DcsError> {
        let id = self.lease_id(ttl).await?;
        let (init, leader) = (self.keys.initialize(), self.keys.leader());
        let txn = Txn::new()
            .when([
                Compare::create_revision(init.clone(), CompareOp::Equal, 0),
                Compare::create_revision(leader.clone(), CompareOp::Equal, 0),
            ])
            .and_then([
                TxnOp::put(init, "", Some(PutOptions::new().with_lease(id))),
                TxnOp::put(leader, name, Some(PutOptions::new().with_lease(id))),
            ]);
        self.run_lease_txn(txn).await
    }

    /// Withdraws a bootstrap claim that did not complete.
    pub async fn abandon_bootstrap(&mut self, name: &str) -> Result<LeaderOutcome, DcsError> {
        let (init, leader) = (self.keys.initialize(), self.keys.leader());
        let txn = Txn::new()
            .when([
                Compare::value(init.clone(), CompareOp::Equal, ""),
                Compare::value(leader.clone(), CompareOp::Equal, name),
            ])
            .and_then([TxnOp::delete(init, None), TxnOp::delete(leader, None)]);
        self.run_txn(txn).await
    }

    /// Makes `initialize` permanent with the cluster's system identifier.
    pub async fn set_initialize(&mut self, sysid: &str) -> Result<(), DcsError> {
        with_timeout(
            self.timeout,
            self.client.put(self.keys.initialize(), sysid, None),
        )
        .await?;
        Ok(())
    }

    /// Stores the bootstrap defaults of the dynamic config unless some are
    /// stored already.
    pub async fn init_config(&mut self, config: &DynamicConfig) -> Result<(), DcsError> {
        let key = self.keys.config();
        let value = serde_json::to_vec(config).map_err(|source| DcsError::Decode {
            key: key.clone(),
            source,
        })?;
        let txn = Txn::new()
            .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(key, value, None)]);
        self.run_txn(txn).await?;
        Ok(())
    }

    pub async fn acquire_leader(
        &mut self,
        name: &str,
        ttl: u64,
    ) -> Result<LeaderOutcome, DcsError> {
        let id = self.lease_id(ttl).await?;
        let key = self.keys.leader();
        let txn = Txn::new()
            .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(
                key,
                name,
                Some(PutOptions::new().with_lease(id)),
            )]);
        self.run_lease_txn(txn).await
    }

    /// Confirms `leader` still names us and moves it onto our current lease
    /// (a restarted agent has a new lease but may still own the key).
    pub async fn renew_leader(&mut self, name: &str, ttl: u64) -> Result<LeaderOutcome, DcsError> {
        let id = self.lease_id(ttl).await?;
        let key = self.keys.leader();
        // Usually the key is already on our lease and the keep-alive renewed
        // it: confirm without writing, so that watchers see no event.
        let confirm = Txn::new().when([
            Compare::value(key.clone(), CompareOp::Equal, name),
            Compare::lease(key.clone(), CompareOp::Equal, id),
        ]);
        if self.run_txn(confirm).await? == LeaderOutcome::Won {
            return Ok(LeaderOutcome::Won);
        }
        // Move the key onto our lease only from a lease of our own (a
        // restarted agent, a ttl change): a key that merely holds our name
        // on another agent's lease is that agent's.
        for prev in self.previous_leases.clone() {
            let txn = Txn::new()
                .when([
                    Compare::value(key.clone(), CompareOp::Equal, name),
                    Compare::lease(key.clone(), CompareOp::Equal, prev),
                ])
                .and_then([TxnOp::put(
                    key.clone(),
                    name,
                    Some(PutOptions::new().with_lease(id)),
                )]);
            if self.run_lease_txn(txn).await? == LeaderOutcome::Won {
                self.move_bootstrap_claim(prev, id).await?;
                return Ok(LeaderOutcome::Won);
            }
        }
        Ok(LeaderOutcome::Lost)
    }

    /// A bootstrap claim lives on the lease its leader key lived on: moved
    /// after the key (never before), so that a stop in between leaves the
    /// key without a claim, which the policy releases, rather than a claim
    /// on our live lease with no key, which nobody would ever withdraw.
    async fn move_bootstrap_claim(&mut self, prev: i64, id: i64) -> Result<(), DcsError> {
        let init = self.keys.initialize();
        let txn = Txn::new()
            .when([
                Compare::value(init.clone(), CompareOp::Equal, ""),
                Compare::lease(init.clone(), CompareOp::Equal, prev),
            ])
            .and_then([TxnOp::put(init, "", Some(PutOptions::new().with_lease(id)))]);
        self.run_lease_txn(txn).await?;
        Ok(())
    }

    /// Deletes `leader` if it is ours: our name on one of our leases. A
    /// bootstrap claim (`initialize` = "") on the same lease goes with it,
    /// in the same transaction: left alone on our live lease it would keep
    /// every member, us included, from ever claiming again.
    pub async fn release_leader(&mut self, name: &str) -> Result<LeaderOutcome, DcsError> {
        let (key, init) = (self.keys.leader(), self.keys.initialize());
        let ours: Vec<i64> = self
            .lease
            .into_iter()
            .chain(self.previous_leases.iter().copied())
            .collect();
        for lease in ours {
            let is_ours = [
                Compare::value(key.clone(), CompareOp::Equal, name),
                Compare::lease(key.clone(), CompareOp::Equal, lease),
            ];
            let with_claim = Txn::new()
                .when(
                    is_ours
                        .iter()
                        .cloned()
                        .chain([
                            Compare::value(init.clone(), CompareOp::Equal, ""),
                            Compare::lease(init.clone(), CompareOp::Equal, lease),
                        ])
                        .collect::<Vec<_>>(),
                )
                .and_then([
                    TxnOp::delete(init.clone(), None),
                    TxnOp::delete(key.clone(), None),
                ]);
            if self.run_txn(with_claim).await? == LeaderOutcome::Won {
                return Ok(LeaderOutcome::Won);
            }
            let txn = Txn::new()
                .when(is_ours)
                .and_then([TxnOp::delete(key.clone(), None)]);
            if self.run_txn(txn).await? == LeaderOutcome::Won {
                return Ok(LeaderOutcome::Won);
            }
        }
        Ok(LeaderOutcome::Lost)
    }

    /// Failsafe mode: records the members the leader will ask.
    pub async fn write_failsafe(&mut self, names: &[String]) -> Result<(), DcsError> {
        let key = self.keys.failsafe();
        let value = serde_json::to_vec(names).map_err(|source| DcsError::Decode {
            key: key.clone(),
            source,
        })?;
        with_timeout(self.timeout, self.client.put(key, value, None)).await?;
        Ok(())
    }

    /// Rule 4's `sync` key, written only while `leader` names us on our
    /// lease: a deposed leader's late write must not name standbys that
    /// lack the new leader's commits. Lost: we are not the leader.
    pub async fn write_sync(&mut self, sync: &SyncState) -> Result<LeaderOutcome, DcsError> {
        let (key, leader) = (self.keys.sync(), self.keys.leader());
        let value = serde_json::to_vec(sync).map_err(|source| DcsError::Decode {
            key: key.clone(),
            source,
        })?;
        let Some(lease) = self.lease else {
            return Ok(LeaderOutcome::Lost);
        };
        let txn = Txn::new()
            .when([
                Compare::value(leader.clone(), CompareOp::Equal, sync.leader.as_str()),
                Compare::lease(leader, CompareOp::Equal, lease),
            ])
            .and_then([TxnOp::put(key, value, None)]);
        self.run_txn(txn).await
    }

    pub async fn write_status(&mut self, status: &ClusterStatus) -> Result<(), DcsError> {
        let key = self.keys.status();
        let value = serde_json::to_vec(status).map_err(|source| DcsError::Decode {
            key: key.clone(),
            source,
        })?;
        with_timeout(self.timeout, self.client.put(key, value, None)).await?;
        Ok(())
    }

    /// Appends to `history` with compare-and-swap on the key's revision, so
    /// that concurrent writers cannot lose an entry.
    pub async fn append_history(&mut self, entry: HistoryEntry) -> Result<(), DcsError> {
        let key = self.keys.history();
        for _ in 0..5 {
            let resp = with_timeout(self.timeout, self.client.get(key.clone(), None)).await?;
            let (mut list, revision) = match resp.kvs().first() {
                Some(kv) => (
                    decode::<Vec<HistoryEntry>>(&key, kv.value())?,
                    kv.mod_revision(),
                ),
                None => (Vec::new(), 0),
            };
            list.push(entry.clone());
            let value = serde_json::to_vec(&list).map_err(|source| DcsError::Decode {
                key: key.clone(),
                source,
            })?;
            let txn = Txn::new()
                .when([Compare::mod_revision(
                    key.clone(),
                    CompareOp::Equal,
                    revision,
                )])
                .and_then([TxnOp::put(key.clone(), value, None)]);
            if self.run_txn(txn).await? == LeaderOutcome::Won {
                return Ok(());
            }
        }
        Err(DcsError::Conflict(key))
    }

    /// Records the candidate a leader chose for a switchover, so that every
    /// member knows who takes over.
    pub async fn set_failover_candidate(
        &mut self,
        leader: &str,
        candidate: &str,
    ) -> Result<(), DcsError> {
        let key = self.keys.failover();
        let resp = with_timeout(self.timeout, self.client.get(key.clone(), None)).await?;
        let Some(kv) = resp.kvs().first() else {
            return Err(DcsError::Conflict(key));
        };
        let mut req: super::FailoverRequest = decode(&key, kv.value())?;
        req.leader = Some(leader.to_string());
        req.candidate = Some(candidate.to_string());
        let value = serde_json::to_vec(&req).map_err(|source| DcsError::Decode {
            key: key.clone(),
            source,
        })?;
        let txn = Txn::new()
            .when([Compare::mod_revision(
                key.clone(),
                CompareOp::Equal,
                kv.mod_revision(),
            )])
            .and_then([TxnOp::put(key.clone(), value, None)]);
        match self.run_txn(txn).await? {
            LeaderOutcome::Won => Ok(()),
            LeaderOutcome::Lost => Err(DcsError::Conflict(key)),
        }
    }

    pub async fn clear_failover(&mut self) -> Result<(), DcsError> {
        with_timeout(self.timeout, self.client.delete(self.keys.failover(), None)).await?;
        Ok(())
    }

    /// Drops our lease and with it our member key (and leader key if held).
    pub async fn revoke_lease(&mut self) -> Result<(), DcsError> {
        self.keeper = None;
        self.lease_gone = false;
        if let Some(id) = self.lease.take() {
            let revoked = with_timeout(self.timeout, self.client.lease_revoke(id)).await;
            // A lease etcd no longer has is as revoked as can be.
            if !matches!(&revoked, Err(DcsError::Etcd(e)) if is_not_found(e)) {
                revoked?;
            }
        }
        Ok(())
    }

    /// A stream of change notifications on the leader key.
    pub async fn watch_leader(
        &mut self,
    ) -> Result<(etcd_client::Watcher, etcd_client::WatchStream), DcsError> {
        let key = self.keys.leader();
        let pair = with_timeout(
            self.timeout,
            self.client.watch(key, Some(WatchOptions::new())),
        )
        .await?;
        Ok(pair)
    }

    /// Deletes every key of the cluster.
    pub async fn delete_cluster(&mut self) -> Result<i64, DcsError> {
        let prefix = self.keys.prefix().to_string();
        let resp = with_timeout(
            self.timeout,
            self.client.delete(
                prefix,
                Some(etcd_client::DeleteOptions::new().with_prefix()),
            ),
        )
        .await?;
        Ok(resp.deleted())
    }

    /// A transaction that writes on our lease.
    async fn run_lease_txn(&mut self, txn: Txn) -> Result<LeaderOutcome, DcsError> {
        let r = self.run_txn(txn).await;
        self.on_lease(r)
    }

    /// A write on our lease that etcd refuses with NotFound found the lease
    /// gone, as an expired keep-alive would have. The lease is not replaced
    /// here: callers learn from `keep_alive`'s LeaseLost that the keys on it
    /// are gone and must be written again, so the next keep-alive reports
    /// it rather than quietly granting a new lease.
    fn on_lease<T>(&mut self, result: Result<T, DcsError>) -> Result<T, DcsError> {
        match result {
            Err(DcsError::Etcd(e)) if is_not_found(&e) => {
                self.lease_gone = true;
                self.keeper = None;
                Err(DcsError::LeaseLost)
            }
            r => r,
        }
    }

    pub(super) async fn run_txn(&mut self, txn: Txn) -> Result<LeaderOutcome, DcsError> {
        let resp = with_timeout(self.timeout, self.client.txn(txn)).await?;
        Ok(if resp.succeeded() {
            LeaderOutcome::Won
        } else {
            LeaderOutcome::Lost
        })
    }
}

/// How one keep-alive on an open stream went.
enum Renewal {
    Renewed,
    /// etcd answered TTL 0: the lease is gone.
    Expired,
    /// The stream is closed; the lease may well be alive.
    StreamClosed(etcd_client::Error),
    Failed(DcsError),
}

async fn renew(keeper: &mut LeaseKeeper, stream: &mut LeaseKeepAliveStream) -> Renewal {
    // On an open keeper this error only comes from the request channel,
    // which closes with the stream.
    if let Err(e) = keeper.keep_alive().await {
        return Renewal::StreamClosed(e);
    }
    match stream.message().await {
        Ok(Some(resp)) if resp.ttl() > 0 => Renewal::Renewed,
        Ok(Some(_)) => Renewal::Expired,
        Ok(None) => Renewal::StreamClosed(etcd_client::Error::LeaseKeepAliveError(
            "keep-alive stream ended".into(),
        )),
        Err(e) if is_not_found(&e) => Renewal::Expired,
        // A status on the stream (GOAWAY, reset) ends this stream only.
        Err(e @ etcd_client::Error::GRpcStatus(_)) => Renewal::StreamClosed(e),
        Err(e) => Renewal::Failed(e.into()),
    }
}

/// etcd answers a request on a lease it does not have (expired, revoked)
/// with gRPC NotFound ("requested lease not found").
fn is_not_found(e: &etcd_client::Error) -> bool {
    matches!(e, etcd_client::Error::GRpcStatus(s) if s.code() == tonic::Code::NotFound)
}

/// Twice etcd's default minimum ping interval, so that a late timer does
/// not make a ping look early.
const KEEP_ALIVE_PING_INTERVAL: Duration = Duration::from_secs(10);

/// A client bound to one endpoint, checked with a status request.
async fn probe_endpoint(endpoint: &str, timeout: Duration) -> Result<Client, DcsError> {
    // No per-call deadline in the channel: it would also cut the long-lived
    // watch and keep-alive streams. Every unary call is bounded by
    // `with_timeout` instead.
    //
    // HTTP/2 pings find a dead connection under the long-lived streams. etcd
    // counts a ping sooner than --grpc-keepalive-min-time (5 s by default)
    // after the previous one (without open streams: any second ping within
    // two hours) as a strike unless it sent data in between, and closes the
    // connection with GOAWAY at the third. With 2 s pings that closed the
    // keep-alive and watch streams whenever the agent sat idle between two
    // renewals (loop_wait 10 s). So ping well apart, and only while a stream
    // is open; unary calls have their own timeout.
    let opts = ConnectOptions::new()
        .with_connect_timeout(timeout)
        .with_keep_alive(KEEP_ALIVE_PING_INTERVAL, timeout)
        .with_keep_alive_while_idle(false);
    let mut client = with_timeout(timeout, Client::connect([endpoint], Some(opts))).await?;
    with_timeout(timeout, client.status()).await?;
    Ok(client)
}

/// One key of a range read, as [`decode_cluster`] needs it.
#[derive(Debug, Clone, Copy)]
pub(super) struct RawKv<'a> {
    pub key: &'a [u8],
    pub value: &'a [u8],
    pub mod_revision: i64,
}

/// What [`decode_cluster`] made of the keys.
#[derive(Debug)]
pub(super) struct Decoded {
    pub view: ClusterView,
    /// `config` was present and decoded (it may serve as a fallback later).
    pub config_decoded: bool,
}

/// The cluster view from the keys under `prefix`. Pure, so that what an
/// undecodable key turns into can be tested without etcd:
///
/// - `config`: `last_config` (the last one that decoded), else `defaults`;
///   `config_stored` and `config_revision` still describe the stored key so
///   that compare-and-swap edits can replace it;
/// - `status`: None; `history`: empty;
/// - a member key: the member is left out; `failover`: no request.
///
/// Each such key adds one line to `problems` naming it and the error.
pub(super) fn decode_cluster<'a>(
    prefix: &str,
    kvs: impl IntoIterator<Item = RawKv<'a>>,
    defaults: &DynamicConfig,
    last_config: Option<&DynamicConfig>,
) -> Decoded {
    let mut view = ClusterView::empty(defaults.clone());
    let mut config_decoded = false;
    for kv in kvs {
        let key = String::from_utf8_lossy(kv.key).to_string();
        let rel = key.strip_prefix(prefix).unwrap_or(&key);
        let value = kv.value;
        let failed: Option<(serde_json::Error, &str)> = match rel {
            "leader" => {
                view.leader = Some(String::from_utf8_lossy(value).to_string());
                None
            }
            "initialize" => {
                let v = String::from_utf8_lossy(value).to_string();
                view.initialize = if v.is_empty() {
                    Initialize::Claimed
                } else {
                    Initialize::SystemId(v)
                };
                None
            }
            "config" => {
                view.config_stored = true;
                view.config_revision = kv.mod_revision;
                match serde_json::from_slice::<DynamicConfig>(value) {
                    Ok(config) => {
                        view.config = config;
                        config_decoded = true;
                        None
                    }
                    Err(e) => match last_config {
                        Some(last) => {
                            view.config = last.clone();
                            Some((e, "using the last config read from it"))
                        }
                        None => Some((e, "using the bootstrap defaults of the config file")),
                    },
                }
            }
            "failsafe" => match serde_json::from_slice::<Vec<String>>(value) {
                Ok(names) => {
                    view.failsafe = Some(names);
                    None
                }
                Err(e) => Some((e, "no failsafe topology is seen")),
            },
            "sync" => match serde_json::from_slice::<SyncState>(value) {
                Ok(sync) => {
                    view.sync = Some(sync);
                    None
                }
                Err(e) => {
                    view.sync_unreadable = true;
                    Some((
                        e,
                        "in synchronous_mode nobody is elected until the leader rewrites it",
                    ))
                }
            },
            "failover" => match serde_json::from_slice(value) {
                Ok(request) => {
                    view.failover = Some(request);
                    None
                }
                Err(e) => Some((e, "no switchover or failover request is seen")),
            },
            "status" => match serde_json::from_slice::<ClusterStatus>(value) {
                Ok(status) => {
                    view.status = Some(status);
                    None
                }
                Err(e) => Some((e, "the last primary position is unknown")),
            },
            "history" => match serde_json::from_slice::<Vec<HistoryEntry>>(value) {
                Ok(history) => {
                    view.history = history;
                    None
                }
                Err(e) => Some((e, "the timeline history reads as empty")),
            },
            r if r.starts_with("members/") => match serde_json::from_slice::<MemberStatus>(value) {
                Ok(m) => {
                    view.members.push(m);
                    None
                }
                Err(e) => Some((e, "the member is left out")),
            },
            _ => None,
        };
        if let Some((error, instead)) = failed {
            // Key names and stored text may hold newlines: one line each.
            view.problems.push(crate::config::escape_control(&format!(
                "etcd key {key} cannot be decoded ({error}); {instead}"
            )));
        }
    }
    view.members.sort_by(|a, b| a.name.cmp(&b.name));
    Decoded {
        view,
        config_decoded,
    }
}

pub(super) fn decode<T: serde::de::DeserializeOwned>(
    key: &str,
    value: &[u8],
) -> Result<T, DcsError> {
    serde_json::from_slice(value).map_err(|source| DcsError::Decode {
        key: key.to_string(),
        source,
    })
}

pub(super) async fn with_timeout<T>(
    timeout: Duration,
    fut: impl Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, DcsError> {
    match tokio::time::timeout(timeout, fut).await {
        Ok(r) => r.map_err(|e| DcsError::Etcd(Box::new(e))),
        Err(_) => Err(DcsError::Timeout(timeout)),
    }
}

fn name_taken_by(name: &str, holder: Option<&MemberStatus>) -> DcsError {
    DcsError::NameTaken {
        name: name.to_string(),
        api_url: holder.map_or_else(|| "unknown".into(), |m| m.api_url.clone()),
        address: holder.map_or_else(|| "unknown".into(), |m| format!("{}:{}", m.host, m.port)),
    }
}

/// Two member statuses describe the same instance: same API, same
/// PostgreSQL address.
fn same_instance(a: &MemberStatus, b: &MemberStatus) -> bool {
    a.api_url == b.api_url && a.host == b.host && a.port == b.port
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Tags;
    use crate::dcs::{PgState, Role};

    const PREFIX: &str = "/service/c/";

    fn kv<'a>(key: &'a str, value: &'a str, mod_revision: i64) -> RawKv<'a> {
        RawKv {
            key: key.as_bytes(),
            value: value.as_bytes(),
            mod_revision,
        }
    }

    fn member_json(name: &str) -> String {
        serde_json::to_string(&MemberStatus {
            name: name.into(),
            role: Role::Replica,
            state: PgState::Streaming,
            host: "127.0.0.1".into(),
            port: 5432,
            api_url: "http://127.0.0.1:8008".into(),
            conn_url: String::new(),
            timeline: Some(1),
            wal_lsn: Some(10),
            receive_lsn: Some(10),
            upstream: None,
            tags: Tags::default(),
            version: "0".into(),
            pending_restart: false,
            error: None,
        })
        .unwrap()
    }

    fn defaults() -> DynamicConfig {
        DynamicConfig {
            ttl: 31,
            ..DynamicConfig::default()
        }
    }

    #[test]
    fn readable_keys_make_no_problems() {
        let config = serde_json::to_string(&DynamicConfig {
            ttl: 20,
            ..DynamicConfig::default()
        })
        .unwrap();
        let status = r#"{"leader":"a","wal_lsn":5,"timeline":2}"#;
        let history = r#"[{"timeline":1,"lsn":3,"reason":"r","time":"t","leader":"a"}]"#;
        let (a, b) = (member_json("a"), member_json("b"));
        let d = decode_cluster(
            PREFIX,
            [
                kv("/service/c/leader", "a", 2),
                kv("/service/c/initialize", "42", 1),
                kv("/service/c/config", &config, 7),
                kv("/service/c/status", status, 8),
                kv("/service/c/history", history, 9),
                kv("/service/c/members/b", &b, 10),
                kv("/service/c/members/a", &a, 11),
            ],
            &defaults(),
            None,
        );
        assert!(d.config_decoded);
        let v = d.view;
        assert_eq!(v.problems, Vec::<String>::new());
        assert_eq!(v.config.ttl, 20);
        assert!(v.config_stored);
        assert_eq!(v.config_revision, 7);
        assert_eq!(v.status.map(|s| s.wal_lsn), Some(5));
        assert_eq!(v.history.len(), 1);
        assert_eq!(v.leader.as_deref(), Some("a"));
        assert_eq!(v.initialize, Initialize::SystemId("42".into()));
        let names: Vec<&str> = v.members.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(names, ["a", "b"]);
    }

    #[test]
    fn garbage_config_falls_back_to_defaults_and_keeps_its_revision() {
        let d = decode_cluster(
            PREFIX,
            [
                kv("/service/c/leader", "a", 2),
                kv("/service/c/config", "not json{", 7),
            ],
            &defaults(),
            None,
        );
        assert!(!d.config_decoded);
        let v = d.view;
        assert_eq!(v.config, defaults());
        // Still stored, at its revision: an edit can replace it by CAS.
        assert!(v.config_stored);
        assert_eq!(v.config_revision, 7);
        assert_eq!(v.leader.as_deref(), Some("a"));
        assert_eq!(v.problems.len(), 1);
        let p = &v.problems[0];
        assert!(
            p.starts_with("etcd key /service/c/config cannot be decoded ("),
            "{p}"
        );
        assert!(p.contains("line 1 column"), "{p}");
        assert!(
            p.ends_with("using the bootstrap defaults of the config file"),
            "{p}"
        );
    }

    #[test]
    fn unreadable_config_uses_the_last_one_that_decoded() {
        let last = DynamicConfig {
            ttl: 45,
            loop_wait: 10,
            ..DynamicConfig::default()
        };
        // A newer agent's field during a rolling upgrade.
        let newer = r#"{"ttl":30,"loop_wait":10,"retry_timeout":10,"check_timeline":true}"#;
        let d = decode_cluster(
            PREFIX,
            [kv("/service/c/config", newer, 9)],
            &defaults(),
            Some(&last),
        );
        assert!(!d.config_decoded);
        assert_eq!(d.view.config, last);
        assert_eq!(d.view.config_revision, 9);
        assert_eq!(d.view.problems.len(), 1);
        let p = &d.view.problems[0];
        assert!(p.contains("/service/c/config"), "{p}");
        assert!(p.contains("unknown field `check_timeline`"), "{p}");
        assert!(p.ends_with("using the last config read from it"), "{p}");
    }

    #[test]
    fn garbage_status_history_members_and_failover_are_dropped_and_reported() {
        let a = member_json("a");
        let d = decode_cluster(
            PREFIX,
            [
                kv("/service/c/status", "{\"leader\":", 3),
                kv("/service/c/history", "[{}]", 4),
                kv("/service/c/members/a", &a, 5),
                kv("/service/c/members/b", "\u{1}", 6),
                kv("/service/c/failover", "{}", 7),
            ],
            &defaults(),
            None,
        );
        let v = d.view;
        assert_eq!(v.status, None);
        assert!(v.history.is_empty());
        assert_eq!(v.members.len(), 1);
        assert_eq!(v.failover, None);
        // Absent `config` is not a problem: the bootstrap has not stored it.
        assert!(!v.config_stored);
        assert_eq!(v.config, defaults());
        let keys = ["status", "history", "members/b", "failover"];
        assert_eq!(v.problems.len(), keys.len(), "{:?}", v.problems);
        for (p, k) in v.problems.iter().zip(keys) {
            assert!(
                p.starts_with(&format!("etcd key /service/c/{k} cannot be decoded (")),
                "{p}"
            );
        }
    }

    #[test]
    fn a_problem_is_one_line() {
        let d = decode_cluster(
            PREFIX,
            [kv("/service/c/members/x\ny", "nope", 1)],
            &defaults(),
            None,
        );
        assert_eq!(d.view.problems.len(), 1);
        assert!(!d.view.problems[0].contains('\n'), "{:?}", d.view.problems);
        assert!(d.view.problems[0].contains("members/x\\ny"));
    }

    #[test]
    fn each_problem_is_reported_once() {
        let mut w = Warned::default();
        let first = vec!["a".to_string(), "b".to_string()];
        assert_eq!(w.first_seen(&first), [&first[0], &first[1]]);
        assert!(w.first_seen(&first).is_empty());
        let second = vec!["b".to_string(), "c".to_string()];
        assert_eq!(w.first_seen(&second), [&second[1]]);
        let many: Vec<String> = (0..Warned::MAX + 10).map(|i| i.to_string()).collect();
        w.first_seen(&many);
        assert!(w.0.len() <= Warned::MAX);
    }
}
