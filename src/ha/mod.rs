//! The HA policy: one pure function from what the agent observed to what it
//! should do. No I/O, no clock, no randomness: `now` is passed in, so tests
//! can tabulate situations and a simulator can replay fault schedules.

mod decide;
mod operator;
mod view;

pub use decide::decide;
pub use view::*;

#[cfg(test)]
mod tests;
