//! The local PostgreSQL instance: running its programs (as the configured OS
//! user when we are root), rendering its configuration files, and observing
//! its state over SQL.

mod command;
mod conf;
mod control;
mod observe;

pub use command::{OsUser, PgCommandError};
pub use conf::{render_conf, ConfFiles, ConfInputs, ReplicaSettings};
pub use control::{ControlData, Instance, Postmaster};
pub use observe::{parse_conninfo_address, Observed};
