//! pgwarden: a high-availability manager for PostgreSQL. See ARCHITECTURE.md
//! for the map of modules.

pub mod agent;
pub mod api;
pub mod atomic_file;
pub mod cli;
pub mod config;
pub mod dcs;
pub mod demo;
pub mod failsafe_promise;
pub mod fdlimit;
pub mod fence_keeper;
pub mod ha;
pub mod haproxy;
pub mod postgres;
#[cfg(test)]
mod sim;
