//! The fence keeper: a small process per member, the same binary
//! (`pgwarden fence-keeper`), that outlives the agent. It holds the last
//! fencing deadline the agent confirmed (the core's `fence_deadline`: the
//! lease's end minus a margin) and stops PostgreSQL in immediate mode
//! (SIGQUIT to the postmaster) when that deadline passes without a newer
//! one. The agent's own fence timer covers a loop that is stuck; the keeper
//! covers an agent that is not there at all — killed, hung (SIGSTOP, a
//! stalled process), or crashed — so that its primary never stays writable
//! after the lease may have expired and a replica may have been promoted.
//!
//! The agent feeds it over a Unix socket beside the data directory
//! (`feed.rs`); a restarted agent connects to the running keeper and takes
//! it over without restarting PostgreSQL. The keeper exits when the agent
//! tells it to (clean shutdown with PostgreSQL stopped), or when nothing is
//! armed and no agent has spoken to it for a while.
//!
//! Deadlines cross the socket as absolute CLOCK_MONOTONIC times (the clock
//! behind `Instant` on Linux, shared by every process of the host), never as
//! durations: an agent stalled between reading its clock and sending must
//! not push the deadline later.

mod feed;
mod keeper;

pub use feed::KeeperFeed;
pub use keeper::run;

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// One line from the agent: what it says, and its place in the order of
/// everything agents have said. A keeper that was stopped (SIGSTOP) finds
/// lines from abandoned connections queued beside fresh ones and reads them
/// in any order; a dead agent's last words may come after its successor's
/// first. The newest line wins: a later agent (started later on this host),
/// or a later line of the same agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Line {
    /// CLOCK_MONOTONIC time the agent started, in nanoseconds.
    pub agent: u64,
    /// Counts the agent's lines.
    pub seq: u64,
    /// etcd has answered one of this agent's lease operations. Until then
    /// (an agent restarted over a running primary) its deadlines may only
    /// bring the held one forward: the lease the previous agent kept may
    /// expire first, and "no deadline" means "not known yet".
    pub confirmed: bool,
    #[serde(flatten)]
    pub feed: Feed,
}

impl Line {
    /// The deadline after this line, from the one held before it.
    pub fn apply(&self, held: Option<u64>) -> Option<u64> {
        match (&self.feed, self.confirmed) {
            (Feed::Arm { deadline_ns }, true) => Some(*deadline_ns),
            (Feed::Arm { deadline_ns }, false) => {
                Some(held.map_or(*deadline_ns, |h| h.min(*deadline_ns)))
            }
            (Feed::Disarm, true) => None,
            (Feed::Disarm, false) | (Feed::Exit, _) => held,
        }
    }

    /// Whether this line is newer than the newest applied so far.
    pub fn newer_than(&self, applied: Option<(u64, u64)>) -> bool {
        applied.is_none_or(|last| (self.agent, self.seq) > last)
    }
}

/// What a line says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Feed {
    /// Stop PostgreSQL at this CLOCK_MONOTONIC time (nanoseconds) unless a
    /// newer line moves it.
    Arm { deadline_ns: u64 },
    /// Nothing writable to protect (a replica, or PostgreSQL stopped).
    Disarm,
    /// The agent stopped PostgreSQL and shuts down: exit.
    Exit,
}

/// The keeper's answer to each line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Reply {
    pub ok: bool,
}

/// Beside the data directory, like the clone's staging directory.
pub fn socket_path(data_dir: &Path) -> PathBuf {
    let mut name = data_dir.as_os_str().to_os_string();
    name.push(".pgwarden-fence.sock");
    PathBuf::from(name)
}

/// Held (flock) by the running keeper: one keeper per data directory.
fn lock_path(data_dir: &Path) -> PathBuf {
    let mut name = data_dir.as_os_str().to_os_string();
    name.push(".pgwarden-fence.lock");
    PathBuf::from(name)
}

pub fn monotonic_ns() -> u64 {
    match nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC) {
        Ok(t) => {
            let ns = i128::from(t.tv_sec()) * 1_000_000_000 + i128::from(t.tv_nsec());
            u64::try_from(ns).unwrap_or(0)
        }
        // Cannot happen for CLOCK_MONOTONIC on Linux; 0 makes every
        // deadline look far off on the agent's side and already passed on
        // the keeper's side, both of which err towards fencing.
        Err(_) => 0,
    }
}

/// `deadline` on CLOCK_MONOTONIC, in nanoseconds.
pub fn instant_to_ns(deadline: Instant) -> u64 {
    let now = Instant::now();
    let mono = monotonic_ns();
    if deadline >= now {
        let ahead = u64::try_from((deadline - now).as_nanos()).unwrap_or(u64::MAX);
        mono.saturating_add(ahead)
    } else {
        let behind = u64::try_from((now - deadline).as_nanos()).unwrap_or(u64::MAX);
        mono.saturating_sub(behind)
    }
}

/// The `Instant` of a CLOCK_MONOTONIC time (now, when it has passed).
pub fn ns_to_instant(ns: u64) -> Instant {
    let now = Instant::now();
    let mono = monotonic_ns();
    now + Duration::from_nanos(ns.saturating_sub(mono))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Stale lines never move the deadline: an older line of the same
    /// agent, or any line of an agent started before the one that spoke.
    #[test]
    fn fence_keeper_applies_only_newer_lines() {
        let line = |agent, seq| Line {
            agent,
            seq,
            confirmed: true,
            feed: Feed::Disarm,
        };
        assert!(line(5, 1).newer_than(None));
        assert!(line(5, 2).newer_than(Some((5, 1))));
        assert!(!line(5, 1).newer_than(Some((5, 2))));
        assert!(!line(5, 2).newer_than(Some((5, 2))));
        assert!(
            line(6, 1).newer_than(Some((5, 900))),
            "a new agent takes over"
        );
        assert!(
            !line(5, u64::MAX).newer_than(Some((6, 1))),
            "the old agent's last word"
        );
    }

    /// An agent that etcd has not answered yet only brings the deadline
    /// forward; once answered, its deadline is the deadline.
    #[test]
    fn fence_keeper_trusts_an_agent_only_once_etcd_answered_it() {
        let line = |confirmed, feed| Line {
            agent: 1,
            seq: 1,
            confirmed,
            feed,
        };
        let arm = |d| Feed::Arm { deadline_ns: d };
        assert_eq!(line(false, arm(50)).apply(Some(40)), Some(40));
        assert_eq!(line(false, arm(30)).apply(Some(40)), Some(30));
        assert_eq!(line(false, arm(30)).apply(None), Some(30));
        assert_eq!(line(false, Feed::Disarm).apply(Some(40)), Some(40));
        assert_eq!(line(true, arm(50)).apply(Some(40)), Some(50));
        assert_eq!(line(true, Feed::Disarm).apply(Some(40)), None);
    }

    #[test]
    fn fence_keeper_deadlines_cross_as_absolute_times() {
        let d = Instant::now() + Duration::from_secs(7);
        let back = ns_to_instant(instant_to_ns(d));
        let diff = if back > d { back - d } else { d - back };
        assert!(diff < Duration::from_millis(50), "{diff:?}");
        // A deadline already passed comes back as now, not later.
        let past = Instant::now() - Duration::from_secs(3);
        assert!(ns_to_instant(instant_to_ns(past)) <= Instant::now());
    }

    #[test]
    fn fence_keeper_lines_are_tagged_json() {
        let line = Line {
            agent: 7,
            seq: 2,
            confirmed: true,
            feed: Feed::Arm { deadline_ns: 5 },
        };
        let text = serde_json::to_string(&line).unwrap();
        assert_eq!(
            text,
            r#"{"agent":7,"seq":2,"confirmed":true,"op":"arm","deadline_ns":5}"#
        );
        assert_eq!(serde_json::from_str::<Line>(&text).unwrap(), line);
        assert_eq!(
            serde_json::from_str::<Line>(r#"{"agent":1,"seq":1,"confirmed":true,"op":"disarm"}"#)
                .unwrap()
                .feed,
            Feed::Disarm
        );
        assert!(
            serde_json::from_str::<Line>(r#"{"agent":1,"seq":1,"confirmed":true,"op":"arm"}"#)
                .is_err()
        );
        assert!(serde_json::from_str::<Line>(r#"{"op":"disarm"}"#).is_err());
        assert_eq!(
            socket_path(Path::new("/var/lib/pg/main")),
            Path::new("/var/lib/pg/main.pgwarden-fence.sock")
        );
    }
}
