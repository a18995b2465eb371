//! The agent's open-file budget. Every observation (postmaster.pid,
//! pg_controldata, a SQL probe), every etcd request and every PostgreSQL
//! program it spawns needs a descriptor; when the API's clients have taken
//! them all, the agent is blind and cannot fence. So the agent takes all the
//! descriptors the hard limit allows, and the API may only use what is left
//! after a reserve for the HA loop.

use nix::sys::resource::{getrlimit, setrlimit, Resource, RLIM_INFINITY};

/// Descriptors kept out of the API's reach: the etcd connections (loop,
/// leader watch, the API's own), the PostgreSQL connection, postmaster.pid
/// and pg_control reads, the pipes of a spawned pg_ctl or pg_basebackup,
/// the peers' HTTP clients, logs, and the runtime's own (epoll, signals).
/// About 30 are in use on a busy agent; the rest is headroom.
pub const RESERVED: u64 = 64;

/// Linux's default `fs.nr_open`: the most a soft limit can be raised to
/// when the hard limit is "unlimited" and /proc cannot tell.
const NR_OPEN_DEFAULT: u64 = 1 << 20;

/// Raises the soft RLIMIT_NOFILE to the hard limit (systemd gives services
/// 1,024 soft, 524,288 hard and expects programs that need more to raise
/// it themselves). Returns the soft limit in force afterwards, None if it
/// cannot be read.
pub fn raise_nofile() -> Option<u64> {
    let (soft, hard) = match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!("cannot read the open-file limit (RLIMIT_NOFILE): {e}");
            return None;
        }
    };
    let target = raise_target(soft, hard, nr_open);
    if target <= soft {
        tracing::debug!(soft, hard, "open-file limit (RLIMIT_NOFILE) left as it is");
        return Some(soft);
    }
    match setrlimit(Resource::RLIMIT_NOFILE, target, hard) {
        Ok(()) => {
            tracing::debug!(
                before = soft,
                after = target,
                hard,
                "raised the open-file soft limit (RLIMIT_NOFILE)"
            );
            Some(target)
        }
        Err(e) => {
            tracing::warn!(
                "cannot raise the open-file soft limit from {soft} to {target}: {e}; keeping {soft}"
            );
            Some(soft)
        }
    }
}

/// The current soft RLIMIT_NOFILE (None: unlimited or unreadable).
pub fn soft_nofile() -> Option<u64> {
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, _)) if soft != RLIM_INFINITY => Some(soft),
        _ => None,
    }
}

/// What the soft limit can be raised to: the hard limit, except that an
/// "unlimited" hard limit is refused by the kernel for open files and
/// really means `fs.nr_open`.
fn raise_target(soft: u64, hard: u64, nr_open: impl FnOnce() -> u64) -> u64 {
    let target = if hard == RLIM_INFINITY {
        nr_open()
    } else {
        hard
    };
    target.max(soft)
}

fn nr_open() -> u64 {
    std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(NR_OPEN_DEFAULT)
}

/// How many connections the API may hold open: the configured number,
/// lowered so that it plus [`RESERVED`] fits in the soft limit `soft`
/// (None: no limit known), and at least one so the API still answers.
pub fn api_connections(configured: usize, soft: Option<u64>) -> usize {
    let Some(soft) = soft else {
        return configured;
    };
    let room = usize::try_from(soft.saturating_sub(RESERVED)).unwrap_or(usize::MAX);
    configured.min(room).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_api_gets_what_the_reserve_leaves() {
        assert_eq!(api_connections(256, None), 256);
        assert_eq!(api_connections(256, Some(524_288)), 256);
        assert_eq!(api_connections(256, Some(1024)), 256);
        // `prlimit --nofile=256:256`: 256 - 64.
        assert_eq!(api_connections(256, Some(256)), 192);
        assert_eq!(api_connections(1000, Some(320)), 256);
        assert_eq!(api_connections(256, Some(64)), 1);
        assert_eq!(api_connections(256, Some(0)), 1);
    }

    #[test]
    fn the_soft_limit_goes_to_the_hard_limit() {
        let no_proc = || panic!("nr_open is only needed for an unlimited hard limit");
        assert_eq!(raise_target(1024, 524_288, no_proc), 524_288);
        assert_eq!(raise_target(256, 256, no_proc), 256);
        assert_eq!(raise_target(1024, RLIM_INFINITY, || 1 << 20), 1 << 20);
        // Never lowered.
        assert_eq!(raise_target(4096, RLIM_INFINITY, || 1024), 4096);
    }

    #[test]
    fn raising_twice_changes_nothing() {
        let first = raise_nofile();
        assert!(first.is_some());
        assert_eq!(raise_nofile(), first);
        assert_eq!(soft_nofile(), first);
    }
}
