//! The etcd writes of operators' requests (API handlers and CLI verbs):
//! switchover/failover requests, compare-and-swap edits of the dynamic
//! config, and cancelling a pending request. Every write is one etcd
//! transaction, so a refused or conflicting request changes nothing.

use super::etcd::{decode, with_timeout, Dcs, DcsError, LeaderOutcome};
use super::FailoverRequest;
use crate::config::DynamicConfig;
use etcd_client::{Compare, CompareOp, Txn, TxnOp};

/// The stored dynamic config as written (raw JSON, so that a merge patch
/// applies to what is really there) and its etcd revision.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredConfig {
    /// None: no `config` key yet (the cluster is not bootstrapped), or one
    /// that is not JSON (`unreadable` says so).
    pub value: Option<serde_json::Value>,
    /// etcd mod_revision of `config`; 0 when absent.
    pub revision: i64,
    /// The key holds something that is not JSON, and why. Its revision is
    /// still known, so a whole new config can replace it by compare-and-swap.
    pub unreadable: Option<String>,
}

impl Dcs {
    /// Creates `failover` if no request is pending. `Lost`: one is.
    pub async fn create_failover(
        &mut self,
        request: &FailoverRequest,
    ) -> Result<LeaderOutcome, DcsError> {
        let key = self.keys.failover();
        let value = serde_json::to_vec(request).map_err(|source| DcsError::Decode {
            key: key.clone(),
            source,
        })?;
        let txn = Txn::new()
            .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(key, value, None)]);
        self.run_txn(txn).await
    }

    /// The pending request, if any (None also for an unreadable one, which
    /// the agents ignore too).
    pub async fn read_failover(&mut self) -> Result<Option<FailoverRequest>, DcsError> {
        let key = self.keys.failover();
        let resp = with_timeout(self.timeout, self.client.get(key, None)).await?;
        Ok(resp
            .kvs()
            .first()
            .and_then(|kv| serde_json::from_slice(kv.value()).ok()))
    }

    /// Deletes the pending request, in one request, and says what it was.
    pub async fn cancel_failover(&mut self) -> Result<CancelOutcome, DcsError> {
        let key = self.keys.failover();
        let resp = with_timeout(
            self.timeout,
            self.client
                .delete(key, Some(etcd_client::DeleteOptions::new().with_prev_key())),
        )
        .await?;
        Ok(match resp.prev_kvs().first() {
            None => CancelOutcome::NothingPending,
            Some(kv) => match serde_json::from_slice(kv.value()) {
                Ok(req) => CancelOutcome::Cancelled(req),
                Err(_) => CancelOutcome::CancelledUnreadable,
            },
        })
    }

    /// The stored `config` key as raw JSON with its revision.
    pub async fn read_config(&mut self) -> Result<StoredConfig, DcsError> {
        let key = self.keys.config();
        let resp = with_timeout(self.timeout, self.client.get(key.clone(), None)).await?;
        Ok(match resp.kvs().first() {
            None => StoredConfig {
                value: None,
                revision: 0,
                unreadable: None,
            },
            Some(kv) => match decode::<serde_json::Value>(&key, kv.value()) {
                Ok(value) => StoredConfig {
                    value: Some(value),
                    revision: kv.mod_revision(),
                    unreadable: None,
                },
                // Not an etcd failure: the caller decides whether it can
                // do without the old content (a whole new config can).
                Err(e) => StoredConfig {
                    value: None,
                    revision: kv.mod_revision(),
                    unreadable: Some(crate::config::escape_control(&e.to_string())),
                },
            },
        })
    }

    /// Writes `config` if its revision is still `revision` (0: if it does
    /// not exist). Returns the new revision, or None when someone else
    /// changed it first.
    pub async fn write_config_cas(
        &mut self,
        config: &DynamicConfig,
        revision: i64,
    ) -> Result<Option<i64>, DcsError> {
        let key = self.keys.config();
        let value = serde_json::to_vec(config).map_err(|source| DcsError::Decode {
            key: key.clone(),
            source,
        })?;
        let compare = if revision == 0 {
            Compare::create_revision(key.clone(), CompareOp::Equal, 0)
        } else {
            Compare::mod_revision(key.clone(), CompareOp::Equal, revision)
        };
        let txn = Txn::new()
            .when([compare])
            .and_then([TxnOp::put(key, value, None)]);
        let resp = with_timeout(self.timeout, self.client.txn(txn)).await?;
        if !resp.succeeded() {
            return Ok(None);
        }
        // The transaction's own revision is the one its put got.
        Ok(Some(resp.header().map_or(revision + 1, |h| h.revision())))
    }
}

/// What [`Dcs::cancel_failover`] found.
#[derive(Debug, Clone, PartialEq)]
pub enum CancelOutcome {
    NothingPending,
    Cancelled(FailoverRequest),
    /// A request was there but not readable; it is gone now.
    CancelledUnreadable,
}
