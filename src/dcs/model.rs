use crate::config::{DynamicConfig, Tags};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// What a member publishes about itself under `members/<name>`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MemberStatus {
    pub name: String,
    pub role: Role,
    pub state: PgState,
    /// PostgreSQL host and port as clients reach it.
    pub host: String,
    pub port: u16,
    pub api_url: String,
    pub conn_url: String,
    pub timeline: Option<u32>,
    /// Primary: current write position; replica: last replayed position.
    pub wal_lsn: Option<u64>,
    /// Replica: last position received from the primary.
    pub receive_lsn: Option<u64>,
    /// Replica: name of the member it streams from.
    pub upstream: Option<String>,
    pub tags: Tags,
    pub version: String,
    /// A changed PostgreSQL setting waits for a restart.
    #[serde(default)]
    pub pending_restart: bool,
    /// A problem the operator must look at (failed clone, foreign data...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Leader,
    Replica,
    SyncStandby,
    Uninitialized,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Leader => "leader",
            Role::Replica => "replica",
            Role::SyncStandby => "sync_standby",
            Role::Uninitialized => "uninitialized",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PgState {
    Running,
    Streaming,
    /// In recovery but not (yet) receiving WAL from a primary.
    InRecovery,
    Stopped,
    Starting,
    Stopping,
    Initializing,
    #[serde(rename = "creating replica")]
    CreatingReplica,
    #[serde(rename = "bootstrap failed")]
    BootstrapFailed,
    #[serde(rename = "clone failed")]
    CloneFailed,
    #[serde(rename = "start failed")]
    StartFailed,
    Rewinding,
    Promoting,
    Restarting,
    #[serde(rename = "rewind failed")]
    RewindFailed,
    Crashed,
    /// The agent cannot tell (an observation failed).
    Unknown,
    /// Stopped, and its data or WAL file system has too little space left
    /// to start: nothing is started until space is freed.
    #[serde(rename = "disk full")]
    DiskFull,
}

impl PgState {
    pub fn as_str(self) -> &'static str {
        match self {
            PgState::Running => "running",
            PgState::Streaming => "streaming",
            PgState::InRecovery => "in recovery",
            PgState::Stopped => "stopped",
            PgState::Starting => "starting",
            PgState::Stopping => "stopping",
            PgState::Initializing => "initializing",
            PgState::CreatingReplica => "creating replica",
            PgState::BootstrapFailed => "bootstrap failed",
            PgState::CloneFailed => "clone failed",
            PgState::StartFailed => "start failed",
            PgState::Rewinding => "rewinding",
            PgState::Promoting => "promoting",
            PgState::Restarting => "restarting",
            PgState::RewindFailed => "rewind failed",
            PgState::Crashed => "crashed",
            PgState::Unknown => "unknown",
            PgState::DiskFull => "disk full",
        }
    }
}

/// The leader's record of the cluster's WAL position (`status` key), used by
/// failover candidates to judge how far behind they are.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ClusterStatus {
    pub leader: String,
    pub wal_lsn: u64,
    pub timeline: u32,
    #[serde(default)]
    pub slots: BTreeMap<String, u64>,
}

/// The `sync` key (rule 4): every member in `sync_standby` has every
/// commit `leader` acknowledged. Written by the leader only while it holds
/// the leader key; an empty list means its commits are not protected
/// (asynchronous, or a non-strict fallback).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncState {
    pub leader: String,
    #[serde(default)]
    pub sync_standby: Vec<String>,
}

impl SyncState {
    /// May `name` take the lease after a failure in synchronous mode? A
    /// listed standby, or the leader the list is about (a new leader writes
    /// the key before it acknowledges anything, so until then the old one
    /// has every acknowledged commit); anyone when the list is empty
    /// (nothing was protected).
    pub fn allows(&self, name: &str) -> bool {
        self.sync_standby.is_empty()
            || self.leader == name
            || self.sync_standby.iter().any(|s| s == name)
    }
}

/// One timeline switch, appended to `history` on promotion.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HistoryEntry {
    pub timeline: u32,
    pub lsn: u64,
    pub reason: String,
    pub time: String,
    pub leader: String,
}

/// An operator's request to move the primary role (`failover` key). The
/// leader carries out a switchover; a failover names the member that must
/// take over when there is no healthy leader. Deleted when done.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailoverRequest {
    pub kind: FailoverKind,
    /// The leader the switchover moves away from (None: whoever leads).
    #[serde(default)]
    pub leader: Option<String>,
    /// The member to promote (None: the healthiest, switchover only).
    #[serde(default)]
    pub candidate: Option<String>,
    /// RFC 3339 time before which the switchover must not happen.
    #[serde(default)]
    pub scheduled_at: Option<String>,
    /// Unix seconds of `scheduled_at`, for comparisons without parsing.
    #[serde(default)]
    pub scheduled_unix: Option<u64>,
    pub requested_at: String,
    /// Unix seconds of `requested_at`: an unscheduled request nobody acted
    /// on for a while no longer holds elections back.
    #[serde(default)]
    pub requested_unix: u64,
    /// A failover an operator forced onto a member synchronous_mode would
    /// not elect (not listed in `sync`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub force: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailoverKind {
    Switchover,
    Failover,
}

/// State of the `initialize` key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Initialize {
    /// Nobody has claimed the bootstrap yet.
    Absent,
    /// A member claimed it and is running initdb.
    Claimed,
    /// Bootstrap done; the cluster's system identifier.
    SystemId(String),
}

/// Everything read from etcd in one observe step.
#[derive(Debug, Clone, PartialEq)]
pub struct ClusterView {
    pub initialize: Initialize,
    pub leader: Option<String>,
    pub members: Vec<MemberStatus>,
    pub config: DynamicConfig,
    /// Whether `config` exists in etcd (false: the file's bootstrap defaults).
    pub config_stored: bool,
    pub status: Option<ClusterStatus>,
    pub history: Vec<HistoryEntry>,
    /// A pending switchover or failover request.
    pub failover: Option<FailoverRequest>,
    /// Failsafe mode: the member names the leader recorded as those it asks
    /// to confirm it while etcd is unreachable (None: not recorded).
    pub failsafe: Option<Vec<String>>,
    /// Synchronous mode: the leader's synchronous standbys (None: no key).
    pub sync: Option<SyncState>,
    /// `sync` exists but does not decode: who may take over is unknown, so
    /// in synchronous mode nobody is elected until the leader rewrites it.
    pub sync_unreadable: bool,
    /// etcd revision of `config` (0: absent), for compare-and-swap edits.
    pub config_revision: i64,
    /// Keys that held something this agent cannot decode, one line each
    /// naming the key, the error and what was used instead. A bad key must
    /// not read as "etcd down": that would demote every primary.
    pub problems: Vec<String>,
}

impl ClusterView {
    /// Nothing in etcd: no keys, `config` the given defaults.
    pub fn empty(config: DynamicConfig) -> Self {
        ClusterView {
            initialize: Initialize::Absent,
            leader: None,
            members: Vec::new(),
            config,
            config_stored: false,
            status: None,
            history: Vec::new(),
            failover: None,
            failsafe: None,
            sync: None,
            sync_unreadable: false,
            config_revision: 0,
            problems: Vec::new(),
        }
    }
    pub fn member(&self, name: &str) -> Option<&MemberStatus> {
        self.members.iter().find(|m| m.name == name)
    }
    /// Synchronous mode is on and `sync` keeps `name` from taking the lease
    /// after a failure.
    pub fn sync_excludes(&self, name: &str) -> bool {
        self.config.synchronous_mode
            && (self.sync_unreadable || self.sync.as_ref().is_some_and(|s| !s.allows(name)))
    }
    /// `name` is listed as a synchronous standby of the current leader.
    pub fn is_sync_standby(&self, name: &str) -> bool {
        self.config.synchronous_mode
            && self.sync.as_ref().is_some_and(|s| {
                self.leader.as_deref() == Some(s.leader.as_str())
                    && s.sync_standby.iter().any(|x| x == name)
            })
    }
    pub fn leader_member(&self) -> Option<&MemberStatus> {
        self.leader.as_deref().and_then(|l| self.member(l))
    }
}

/// The replication slot name PostgreSQL accepts for a member name.
pub fn slot_name(member: &str) -> String {
    member
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .collect()
}

/// `0/3000060` ⇄ bytes.
pub fn format_lsn(lsn: u64) -> String {
    format!("{:X}/{:X}", lsn >> 32, lsn & 0xFFFF_FFFF)
}

pub fn parse_lsn(s: &str) -> Option<u64> {
    let (hi, lo) = s.split_once('/')?;
    Some((u64::from_str_radix(hi, 16).ok()? << 32) | u64::from_str_radix(lo, 16).ok()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn lsn_round_trip() {
        assert_eq!(parse_lsn("0/3000060"), Some(0x3000060));
        assert_eq!(parse_lsn("1A/FF"), Some((0x1A << 32) | 0xFF));
        assert_eq!(format_lsn(0x1A_0000_00FF), "1A/FF");
        assert_eq!(parse_lsn("zz"), None);
    }
    #[test]
    fn slot_names_are_safe() {
        assert_eq!(slot_name("DB-01.a"), "db_01_a");
    }
}
