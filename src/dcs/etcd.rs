use super::{ClusterStatus, ClusterView, HistoryEntry, Initialize, Keys, MemberStatus};
use crate::config::DynamicConfig;
use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, GetOptions, LeaseKeepAliveStream, LeaseKeeper,
    PutOptions, Txn, TxnOp, WatchOptions,
};
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
    /// The TTL `lease` was granted with.
    lease_ttl: u64,
    keeper: Option<(LeaseKeeper, LeaseKeepAliveStream)>,
    endpoints: Vec<String>,
    current: usize,
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
                        lease_ttl: 0,
                        keeper: None,
                        endpoints: endpoints.to_vec(),
                        current: i,
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

    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    /// Reads every key of the cluster in one range request.
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
        let mut view = ClusterView {
            initialize: Initialize::Absent,
            leader: None,
            members: Vec::new(),
            config: defaults.clone(),
            config_stored: false,
            status: None,
            history: Vec::new(),
            failover: None,
            config_revision: 0,
        };
        for kv in resp.kvs() {
            let key = String::from_utf8_lossy(kv.key()).to_string();
            let rel = key.strip_prefix(&prefix).unwrap_or(&key);
            let value = kv.value();
            match rel {
                "leader" => view.leader = Some(String::from_utf8_lossy(value).to_string()),
                "initialize" => {
                    let v = String::from_utf8_lossy(value).to_string();
                    view.initialize = if v.is_empty() {
                        Initialize::Claimed
                    } else {
                        Initialize::SystemId(v)
                    };
                }
                "config" => {
                    view.config = decode(&key, value)?;
                    view.config_stored = true;
                    view.config_revision = kv.mod_revision();
                }
                // A malformed request is ignored rather than blocking the
                // loop; the API and CLI validate what they write.
                "failover" => view.failover = serde_json::from_slice(value).ok(),
                "status" => view.status = Some(decode::<ClusterStatus>(&key, value)?),
                "history" => view.history = decode::<Vec<HistoryEntry>>(&key, value)?,
                r if r.starts_with("members/") => {
                    // A member key another version wrote badly must not stop
                    // this agent from seeing the rest of the cluster.
                    if let Ok(m) = serde_json::from_slice::<MemberStatus>(value) {
                        view.members.push(m);
                    }
                }
                _ => {}
            }
        }
        view.members.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(view)
    }

    async fn lease_id(&mut self, ttl: u64) -> Result<i64, DcsError> {
        // A keep-alive extends a lease by the TTL it was granted with, not
        // by the ttl of the config now. After ttl grew, that lease would
        // expire before the policy counts: a new lease takes the new ttl,
        // the keys move onto it as they are renewed (leader) and
        // republished (member), and the old one runs out. After ttl shrank
        // the longer lease stays: the policy counts the shorter ttl, and
        // moving the leader key onto a shorter lease would let it expire
        // before a fence deadline armed with the longer one.
        if let Some(id) = self.lease.filter(|_| self.lease_ttl >= ttl) {
            return Ok(id);
        }
        let resp = with_timeout(self.timeout, self.client.lease_grant(ttl as i64, None)).await?;
        self.lease = Some(resp.id());
        self.lease_ttl = ttl;
        self.keeper = None;
        Ok(resp.id())
    }

    /// Extends our lease by its TTL. On `LeaseLost` the next call grants a
    /// new lease; keys on the old one are gone.
    pub async fn keep_alive(&mut self, ttl: u64) -> Result<(), DcsError> {
        let id = self.lease_id(ttl).await?;
        if self.keeper.is_none() {
            // etcd-client reads the first response itself and reports an
            // expired lease as "lease not found": start a new lease then.
            match with_timeout(self.timeout, self.client.lease_keep_alive(id)).await {
                Ok(pair) => self.keeper = Some(pair),
                Err(DcsError::Etcd(e)) if e.to_string().contains("lease not found") => {
                    self.lease = None;
                    return Err(DcsError::LeaseLost);
                }
                Err(e) => return Err(e),
            }
        }
        let timeout = self.timeout;
        let Some((keeper, stream)) = self.keeper.as_mut() else {
            return Err(DcsError::LeaseLost);
        };
        let result = async {
            keeper.keep_alive().await?;
            match stream.message().await? {
                Some(resp) if resp.ttl() > 0 => Ok(()),
                _ => Err(DcsError::LeaseLost),
            }
        };
        let result = match tokio::time::timeout(timeout, result).await {
            Ok(r) => r,
            Err(_) => Err(DcsError::Timeout(timeout)),
        };
        if result.is_err() {
            self.keeper = None;
        }
        // etcd reports an expired lease as an error on the keep-alive
        // stream rather than as a zero TTL: either way, start a new lease.
        let expired = match &result {
            Err(DcsError::LeaseLost) => true,
            Err(DcsError::Etcd(e)) => e.to_string().contains("lease not found"),
            _ => false,
        };
        if expired {
            self.lease = None;
            return Err(DcsError::LeaseLost);
        }
        result
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
        with_timeout(
            self.timeout,
            self.client
                .put(key, value, Some(PutOptions::new().with_lease(id))),
        )
        .await?;
        Ok(())
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
        self.run_txn(txn).await
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
        self.run_txn(txn).await
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
        let txn = Txn::new()
            .when([Compare::value(key.clone(), CompareOp::Equal, name)])
            .and_then([TxnOp::put(
                key,
                name,
                Some(PutOptions::new().with_lease(id)),
            )]);
        self.run_txn(txn).await
    }

    pub async fn release_leader(&mut self, name: &str) -> Result<LeaderOutcome, DcsError> {
        let key = self.keys.leader();
        let txn = Txn::new()
            .when([Compare::value(key.clone(), CompareOp::Equal, name)])
            .and_then([TxnOp::delete(key, None)]);
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
        if let Some(id) = self.lease.take() {
            with_timeout(self.timeout, self.client.lease_revoke(id)).await?;
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

    pub(super) async fn run_txn(&mut self, txn: Txn) -> Result<LeaderOutcome, DcsError> {
        let resp = with_timeout(self.timeout, self.client.txn(txn)).await?;
        Ok(if resp.succeeded() {
            LeaderOutcome::Won
        } else {
            LeaderOutcome::Lost
        })
    }
}

/// A client bound to one endpoint, checked with a status request.
async fn probe_endpoint(endpoint: &str, timeout: Duration) -> Result<Client, DcsError> {
    // No per-call deadline in the channel: it would also cut the long-lived
    // watch and keep-alive streams. Every unary call is bounded by
    // `with_timeout` instead.
    let opts = ConnectOptions::new()
        .with_connect_timeout(timeout)
        .with_keep_alive(Duration::from_secs(2), timeout);
    let mut client = with_timeout(timeout, Client::connect([endpoint], Some(opts))).await?;
    with_timeout(timeout, client.status()).await?;
    Ok(client)
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
