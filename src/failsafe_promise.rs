//! Failsafe mode's promise, kept on disk.
//!
//! A member that confirms a primary over `POST /failsafe` promises to take
//! no lease for the primary's ttl: the primary stays writable without the
//! leader key for that long. The promise must outlive the agent: an agent
//! restarted (or a host rebooted) in the meantime must not read etcd, see
//! the key expired and take the lease while that primary still writes. So
//! the API writes the promise here (atomically, fsynced) before it answers
//! yes, and the agent hands it back to the core at start.
//!
//! Time is the wall clock, the only one that survives a restart. A clock
//! stepped backwards only lengthens the wait; one stepped forwards by more
//! than a ttl during an etcd outage shortens it (as it would any lease).

use anyhow::Context;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Promise {
    /// The member we confirmed as the primary.
    pub leader: String,
    /// When we confirmed it, milliseconds since the Unix epoch.
    pub granted_at_ms: u64,
    /// For how long, in seconds.
    pub ttl: u64,
}

impl Promise {
    pub fn new(leader: &str, ttl: u64, now: SystemTime) -> Promise {
        Promise {
            leader: leader.to_string(),
            granted_at_ms: unix_ms(now),
            ttl,
        }
    }

    /// What is left of the promise at `now`. A `now` before the grant (the
    /// clock was stepped back) leaves the whole ttl.
    pub fn remaining(&self, now: SystemTime) -> Duration {
        let elapsed = Duration::from_millis(unix_ms(now).saturating_sub(self.granted_at_ms));
        Duration::from_secs(self.ttl).saturating_sub(elapsed)
    }
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Beside the data directory (like the clone's staging directory), so that
/// a re-clone or a wiped data directory does not take it along.
pub fn path_for(data_dir: &Path) -> PathBuf {
    let mut name = data_dir.as_os_str().to_os_string();
    name.push(".pgwarden-failsafe");
    PathBuf::from(name)
}

pub fn save(path: &Path, promise: &Promise) -> anyhow::Result<()> {
    let json = serde_json::to_vec(promise).context("encoding the failsafe promise")?;
    crate::atomic_file::write_atomic(path, &json)
        .with_context(|| format!("cannot record the failsafe promise in {}", path.display()))
}

/// None when no promise was ever made here. Any other failure is an error:
/// a promise we cannot read may still bind us.
pub fn load(path: &Path) -> anyhow::Result<Option<Promise>> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(e)
                .with_context(|| format!("cannot read the failsafe promise {}", path.display()))
        }
    };
    serde_json::from_slice(&bytes)
        .map(Some)
        .with_context(|| format!("{} is not a failsafe promise", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failsafe_promise_round_trips_and_counts_down() {
        let dir = tempfile::tempdir().unwrap();
        let path = path_for(&dir.path().join("data"));
        assert_eq!(
            path.file_name().unwrap().to_str(),
            Some("data.pgwarden-failsafe")
        );
        assert_eq!(load(&path).unwrap(), None);
        let t0 = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let p = Promise::new("n1", 23, t0);
        save(&path, &p).unwrap();
        let back = load(&path).unwrap().unwrap();
        assert_eq!(back, p);
        assert_eq!(back.remaining(t0), Duration::from_secs(23));
        assert_eq!(
            back.remaining(t0 + Duration::from_millis(22_500)),
            Duration::from_millis(500)
        );
        assert_eq!(back.remaining(t0 + Duration::from_secs(30)), Duration::ZERO);
        // A clock stepped back keeps the whole promise.
        assert_eq!(
            back.remaining(t0 - Duration::from_secs(60)),
            Duration::from_secs(23)
        );
    }

    #[test]
    fn failsafe_promise_unreadable_is_an_error_not_absent() {
        let dir = tempfile::tempdir().unwrap();
        let path = path_for(&dir.path().join("data"));
        std::fs::write(&path, b"{\"leader\":").unwrap();
        let e = format!("{:#}", load(&path).unwrap_err());
        assert!(e.contains("is not a failsafe promise"), "{e}");
        // A directory where the file should be: reading fails, not "none".
        std::fs::remove_file(&path).unwrap();
        std::fs::create_dir(&path).unwrap();
        let e = format!("{:#}", load(&path).unwrap_err());
        assert!(e.contains("cannot read the failsafe promise"), "{e}");
    }
}
