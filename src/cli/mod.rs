//! The `pgwarden` command line: argument definitions and the operator
//! commands that talk to etcd (the agent and the demo live in their own
//! modules).

pub mod haproxy_config;
mod history;
mod list;
mod logging;

pub use history::history;
pub use list::{list, ListFormat};
pub use logging::{init_logging, LogFormat};

use clap::{Parser, Subcommand};
use std::path::PathBuf;

#[derive(Parser, Debug)]
#[command(
    name = "pgwarden",
    version,
    about = "High-availability manager for PostgreSQL"
)]
pub struct Cli {
    /// Agent config file (TOML); also read by operator commands to find etcd.
    #[arg(short = 'c', long = "config", global = true, env = "PGWARDEN_CONFIG")]
    pub config: Option<PathBuf>,
    /// Log line format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Log filter (error, warn, info, debug, or a tracing directive).
    #[arg(long, global = true, default_value = "info", env = "PGWARDEN_LOG")]
    pub log_level: String,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the agent for one PostgreSQL instance.
    Agent,
    /// Show the cluster's members.
    List {
        #[arg(long, value_enum, default_value_t = ListFormat::Table)]
        format: ListFormat,
    },
    /// Show the timeline switches (promotions) recorded in etcd.
    History {
        #[arg(long, value_enum, default_value_t = ListFormat::Table)]
        format: ListFormat,
    },
    /// Render an HAProxy config from the members in etcd.
    HaproxyConfig(haproxy_config::HaproxyConfigArgs),
    /// Run a whole local cluster (etcd, agents, HAProxy) for a first look.
    Demo(crate::demo::DemoArgs),
}
