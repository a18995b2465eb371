use clap::Parser;
use pgwarden::cli::{self, Cli, Command};
use pgwarden::config::{self, ConfigError};
use std::process::ExitCode;

fn main() -> ExitCode {
    let args = Cli::parse();
    cli::init_logging(args.log_format, &args.log_level);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("pgwarden: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            match e.downcast_ref::<ConfigError>() {
                Some(ce) => eprintln!("pgwarden: config error: {ce}"),
                None => eprintln!("pgwarden: {e:#}"),
            }
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Cli) -> anyhow::Result<()> {
    let load = || -> anyhow::Result<config::Config> {
        let path = args.config.as_ref().ok_or_else(|| {
            anyhow::anyhow!("this command needs a config file: pass -c FILE or set PGWARDEN_CONFIG")
        })?;
        Ok(config::load(path)?)
    };
    match &args.command {
        Command::Agent => pgwarden::agent::run(load()?).await,
        Command::FenceKeeper => pgwarden::fence_keeper::run(load()?).await,
        Command::List { format } => cli::list(&load()?, *format).await,
        Command::History { format } => {
            cli::history(&load()?, *format == cli::ListFormat::Json).await
        }
        Command::Switchover(a) => cli::switchover(&load()?, a).await,
        Command::Failover(a) => cli::failover(&load()?, a).await,
        Command::Restart(a) => cli::restart(&load()?, a).await,
        Command::Reinit(a) => cli::reinit(&load()?, a).await,
        Command::Reload(a) => cli::reload(&load()?, a).await,
        Command::Pause => cli::set_pause(&load()?, true).await,
        Command::Resume => cli::set_pause(&load()?, false).await,
        Command::ShowConfig { format } => cli::show_config(&load()?, *format).await,
        Command::EditConfig(a) => cli::edit_config(&load()?, a).await,
        Command::Remove { scope } => cli::remove(&load()?, scope).await,
        Command::HaproxyConfig(h) => cli::haproxy_config::run(&load()?, h).await,
        Command::Demo(d) => pgwarden::demo::run(d.clone()).await,
    }
}
