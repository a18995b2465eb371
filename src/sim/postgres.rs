//! A model PostgreSQL: a data directory (system identifier, timeline
//! history, WAL position, what pg_control says), a postmaster that starts
//! (crash recovery takes longer), runs as primary or as a replica
//! streaming from an upstream, promotes onto a new timeline and stops
//! cleanly or immediately. Transitions that take time carry the moment they
//! end; `advance` applies those that are due.

use std::time::Duration;

/// Bytes of the shutdown checkpoint record a clean stop of a primary writes.
pub const SHUTDOWN_RECORD: u64 = 0x68;

#[derive(Debug, Clone, PartialEq)]
pub struct Data {
    pub system_id: String,
    /// Timeline switches: (timeline, the LSN where it begins), oldest first.
    pub history: Vec<(u32, u64)>,
    /// End of WAL written (primary) or received and replayed (replica).
    pub lsn: u64,
    /// pg_control: the cluster state says it last ran as a primary.
    pub was_primary: bool,
    pub clean_shutdown: bool,
    pub checkpoint_lsn: u64,
    /// Physical replication slots.
    pub slots: Vec<String>,
}

impl Data {
    pub fn timeline(&self) -> u32 {
        self.history.last().map_or(1, |h| h.0)
    }

    /// Whether a replica on this data can stream from `up`: our history is
    /// a prefix of its history and we are not past the point where it left
    /// our timeline (or past its end of WAL).
    pub fn can_follow(&self, up: &Data) -> bool {
        if self.system_id != up.system_id || self.history.len() > up.history.len() {
            return false;
        }
        if up.history[..self.history.len()] != self.history[..] {
            return false;
        }
        let end = up
            .history
            .get(self.history.len())
            .map_or(up.lsn, |next| next.1);
        self.lsn <= end
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Run {
    Stopped,
    /// The postmaster is alive but not accepting connections yet.
    Starting {
        primary: bool,
        ready_at: Duration,
    },
    Running {
        primary: bool,
    },
    /// Still in recovery, answering queries, about to be writable.
    Promoting {
        done_at: Duration,
    },
    /// A clean shutdown in progress: no new writes.
    Stopping {
        done_at: Duration,
    },
}

#[derive(Debug, Clone)]
pub struct Pg {
    pub data: Option<Data>,
    pub run: Run,
    /// host:port in primary_conninfo (replica).
    pub upstream: Option<String>,
    /// The WAL receiver streams (replica).
    pub streaming: bool,
    /// Bumped by every start, stop and crash: a job notices that the
    /// instance it worked on is gone.
    pub generation: u64,
    /// Counter standing for pg_postmaster_start_time().
    pub starts: u64,
    /// synchronous_standby_names as last reloaded (kept in the data
    /// directory's pgwarden-sync.conf in the real thing).
    pub standby_names: String,
}

impl Pg {
    pub fn new() -> Self {
        Pg {
            data: None,
            run: Run::Stopped,
            upstream: None,
            streaming: false,
            generation: 0,
            starts: 0,
            standby_names: String::new(),
        }
    }

    pub fn postmaster_alive(&self) -> bool {
        self.run != Run::Stopped
    }

    /// Running as a primary and accepting writes.
    pub fn writable(&self) -> bool {
        self.run == Run::Running { primary: true }
    }

    /// Running in recovery and answering queries.
    pub fn replica(&self) -> bool {
        matches!(
            self.run,
            Run::Running { primary: false } | Run::Promoting { .. }
        )
    }

    /// The next moment a transition is due.
    pub fn next_transition(&self) -> Option<Duration> {
        match self.run {
            Run::Starting { ready_at, .. } => Some(ready_at),
            Run::Promoting { done_at } | Run::Stopping { done_at } => Some(done_at),
            Run::Stopped | Run::Running { .. } => None,
        }
    }

    /// Applies a due transition; returns a word for the trace if one was.
    pub fn advance(&mut self, now: Duration) -> Option<&'static str> {
        match self.run {
            Run::Starting { primary, ready_at } if now >= ready_at => {
                self.run = Run::Running { primary };
                if let Some(d) = self.data.as_mut() {
                    d.was_primary = primary;
                    d.clean_shutdown = false;
                }
                Some(if primary {
                    "running as primary"
                } else {
                    "running as replica"
                })
            }
            Run::Promoting { done_at } if now >= done_at => {
                self.run = Run::Running { primary: true };
                self.upstream = None;
                self.streaming = false;
                if let Some(d) = self.data.as_mut() {
                    let tl = d.timeline() + 1;
                    d.history.push((tl, d.lsn));
                    d.was_primary = true;
                    d.checkpoint_lsn = d.lsn;
                }
                Some("promoted")
            }
            Run::Stopping { done_at } if now >= done_at => {
                self.run = Run::Stopped;
                self.streaming = false;
                self.generation += 1;
                if let Some(d) = self.data.as_mut() {
                    d.clean_shutdown = true;
                    d.checkpoint_lsn = d.lsn;
                    if d.was_primary {
                        d.lsn += SHUTDOWN_RECORD;
                    }
                }
                Some("stopped cleanly")
            }
            _ => None,
        }
    }

    pub fn start(&mut self, primary: bool, upstream: Option<String>, ready_at: Duration) {
        self.generation += 1;
        self.starts += 1;
        self.run = Run::Starting { primary, ready_at };
        self.upstream = if primary { None } else { upstream };
        self.streaming = false;
    }

    /// A clean (fast) shutdown.
    pub fn stop(&mut self, done_at: Duration) {
        if matches!(self.run, Run::Stopped | Run::Stopping { .. }) {
            return;
        }
        self.generation += 1;
        self.run = Run::Stopping { done_at };
    }

    /// Immediate stop or crash: no shutdown checkpoint.
    pub fn kill(&mut self) {
        if self.run == Run::Stopped {
            return;
        }
        self.generation += 1;
        self.run = Run::Stopped;
        self.streaming = false;
        if let Some(d) = self.data.as_mut() {
            d.clean_shutdown = false;
        }
    }

    pub fn promote(&mut self, done_at: Duration) -> bool {
        if self.run != (Run::Running { primary: false }) {
            return false;
        }
        self.run = Run::Promoting { done_at };
        true
    }
}
