//! Everything pgwarden keeps in etcd: the key layout, the JSON documents
//! stored there, and the client that reads and writes them.

mod etcd;
mod model;
mod requests;

pub use etcd::{Dcs, DcsError, LeaderOutcome};
pub use model::*;
pub use requests::{CancelOutcome, StoredConfig};

/// `<namespace>/<scope>/` with exactly one slash between parts.
pub fn cluster_prefix(namespace: &str, scope: &str) -> String {
    format!(
        "{}/{}/",
        namespace.trim_end_matches('/'),
        scope.trim_matches('/')
    )
}

/// The keys of one cluster, so that no other module spells a key by hand.
#[derive(Debug, Clone)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    pub fn new(prefix: String) -> Self {
        Keys { prefix }
    }
    pub fn prefix(&self) -> &str {
        &self.prefix
    }
    pub fn leader(&self) -> String {
        format!("{}leader", self.prefix)
    }
    pub fn members_prefix(&self) -> String {
        format!("{}members/", self.prefix)
    }
    pub fn member(&self, name: &str) -> String {
        format!("{}members/{name}", self.prefix)
    }
    pub fn initialize(&self) -> String {
        format!("{}initialize", self.prefix)
    }
    pub fn config(&self) -> String {
        format!("{}config", self.prefix)
    }
    pub fn status(&self) -> String {
        format!("{}status", self.prefix)
    }
    pub fn history(&self) -> String {
        format!("{}history", self.prefix)
    }
    /// Failsafe mode: the members the leader asks while etcd is away.
    pub fn failsafe(&self) -> String {
        format!("{}failsafe", self.prefix)
    }
    pub fn failover(&self) -> String {
        format!("{}failover", self.prefix)
    }
    pub fn sync(&self) -> String {
        format!("{}sync", self.prefix)
    }
}
