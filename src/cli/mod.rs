//! The `pgwarden` command line: argument definitions and the operator
//! commands that talk to etcd (the agent and the demo live in their own
//! modules).

mod dynamic;
pub mod haproxy_config;
mod history;
mod list;
mod logging;
mod member;
mod operator;
mod switchover;

pub use dynamic::{
    edit_config, patch_from_sets, remove, set_pause, show_config, ConfigFormat, EditConfigArgs,
};
pub use history::history;
pub use list::{list, ListFormat};
pub use logging::{init_logging, LogFormat};
pub use member::{reinit, reload, restart, ReinitArgs, ReloadArgs, RestartArgs};
pub use switchover::{failover, switchover, FailoverArgs, SwitchoverArgs};

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
    /// Planned, clean hand-over of the primary role (now or at --at).
    Switchover(SwitchoverArgs),
    /// Manual promotion of a member, for when there is no healthy primary.
    Failover(FailoverArgs),
    /// Rolling restart of PostgreSQL on members, one at a time.
    Restart(RestartArgs),
    /// Wipe a replica's data directory and clone it again from the leader.
    Reinit(ReinitArgs),
    /// Reload PostgreSQL's configuration on members.
    Reload(ReloadArgs),
    /// Maintenance mode: agents observe but take no automatic action.
    Pause,
    /// Leave maintenance mode.
    Resume,
    /// Print the dynamic cluster config stored in etcd.
    ShowConfig {
        #[arg(long, value_enum, default_value_t = ConfigFormat::Toml)]
        format: ConfigFormat,
    },
    /// Change the dynamic cluster config in etcd (validated, compare-and-swap).
    EditConfig(EditConfigArgs),
    /// Delete every key of a cluster from etcd (asks for the cluster name).
    Remove {
        /// The cluster (scope) to remove; must be this config's scope.
        scope: String,
    },
    /// Render an HAProxy config from the members in etcd.
    HaproxyConfig(haproxy_config::HaproxyConfigArgs),
    /// Run a whole local cluster (etcd, agents, HAProxy) for a first look.
    Demo(crate::demo::DemoArgs),
    /// Hold the agent's fencing deadline in a process of its own (started
    /// by the agent; stops PostgreSQL if the agent is killed or hangs).
    FenceKeeper,
}
