//! The trace of a run: what each member did, heard and suffered, with the
//! simulated time. Off while schedules run (formatting costs more than the
//! simulation); a failing seed is replayed with it on, which the
//! determinism of the run makes exact.

use super::World;
use std::collections::VecDeque;

#[derive(Debug, Default)]
pub struct Trace {
    pub on: bool,
    /// Lines kept (oldest dropped first); 0: all.
    pub keep: usize,
    pub lines: VecDeque<String>,
}

impl World {
    pub fn tracing(&self) -> bool {
        self.trace.on
    }

    pub fn trace(&mut self, m: Option<usize>, text: impl FnOnce() -> String) {
        if !self.trace.on {
            return;
        }
        let who = m.map_or("--", |i| self.members[i].name.as_str());
        let line = format!("{:>10.3}s {:<3} {}", self.now.as_secs_f64(), who, text());
        self.trace.lines.push_back(line);
        if self.trace.keep > 0 && self.trace.lines.len() > self.trace.keep {
            self.trace.lines.pop_front();
        }
    }
}
