//! `pgwarden restart`, `reinit` and `reload`: requests to one member's
//! agent through its API. `restart` is rolling: one member at a time, the
//! next only once the previous runs again.

use super::operator::{confirm, connect, member, read_view, ApiClient};
use crate::config::Config;
use crate::dcs::{ClusterView, MemberStatus};
use anyhow::{bail, Context};
use serde_json::Value;
use std::time::{Duration, Instant};

/// How long a member may take to show that it began restarting.
const BEGIN_WAIT: Duration = Duration::from_secs(30);

#[derive(clap::Args, Debug, Clone)]
pub struct RestartArgs {
    /// Members to restart, one at a time (the leader last).
    #[arg(value_name = "NAME")]
    pub members: Vec<String>,
    /// Restart the members whose PostgreSQL waits for a restart to apply a
    /// setting (only those among NAMEs, when given).
    #[arg(long)]
    pub pending: bool,
}

#[derive(clap::Args, Debug, Clone)]
pub struct ReinitArgs {
    /// The replica to re-clone from the leader.
    #[arg(value_name = "NAME")]
    pub member: String,
    /// Do not ask for confirmation.
    #[arg(long)]
    pub force: bool,
}

#[derive(clap::Args, Debug, Clone)]
pub struct ReloadArgs {
    /// Members whose PostgreSQL reloads its configuration.
    #[arg(value_name = "NAME", required = true)]
    pub members: Vec<String>,
}

/// The members named (each must exist), in the order given, deduplicated.
fn named<'a>(
    cfg: &Config,
    view: &'a ClusterView,
    names: &[String],
) -> anyhow::Result<Vec<&'a MemberStatus>> {
    let mut out: Vec<&MemberStatus> = Vec::new();
    for n in names {
        let m = member(cfg, view, n)?;
        if !out.iter().any(|o| o.name == m.name) {
            out.push(m);
        }
    }
    Ok(out)
}

pub async fn restart(cfg: &Config, args: &RestartArgs) -> anyhow::Result<()> {
    if args.members.is_empty() && !args.pending {
        bail!("name the members to restart, or pass --pending");
    }
    let mut dcs = connect(cfg).await?;
    let view = read_view(cfg, &mut dcs).await?;
    let mut targets = if args.members.is_empty() {
        view.members.iter().collect()
    } else {
        named(cfg, &view, &args.members)?
    };
    if args.pending {
        targets.retain(|m| m.pending_restart);
        if targets.is_empty() {
            println!("no member has a restart pending");
            return Ok(());
        }
    }
    // Replicas first: the primary restarts once, last.
    targets.sort_by_key(|m| view.leader.as_deref() == Some(m.name.as_str()));
    let api = ApiClient::new(cfg)?;
    for m in targets {
        restart_one(&api, m).await?;
    }
    Ok(())
}

fn state_of(status: &Value) -> &str {
    status.get("state").and_then(Value::as_str).unwrap_or("")
}

fn running(status: &Value) -> bool {
    matches!(state_of(status), "running" | "streaming")
}

/// Restarts one member and waits until it runs again on a new postmaster.
async fn restart_one(api: &ApiClient, m: &MemberStatus) -> anyhow::Result<()> {
    let before = api.status(m).await?;
    let reported = before
        .get("postmaster_start")
        .filter(|v| !v.is_null())
        .cloned();
    let url = api.url(m, "/restart");
    let answer = api.send(reqwest::Method::POST, &url, None).await?;
    if !answer.ok() {
        bail!("restart of {} refused: {}", m.name, answer.reason());
    }
    println!("{}: restart requested", m.name);
    let t0 = Instant::now();
    // The restart has begun once the member reports a state other than
    // running or a new postmaster: only then does "running" mean "again".
    let mut begun = false;
    let deadline = Duration::from_secs(180);
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let now = match api.status(m).await {
            Ok(v) => v,
            Err(e) if t0.elapsed() > deadline => {
                bail!("{} did not answer on its API: {e:#}", m.name)
            }
            // Busy restarting: keep asking until the deadline.
            Err(_) => continue,
        };
        if !running(&now)
            || reported
                .as_ref()
                .is_some_and(|r| now.get("postmaster_start") != Some(r))
        {
            begun = true;
        }
        if begun && running(&now) {
            println!(
                "{}: {} again after {:.1}s",
                m.name,
                state_of(&now),
                t0.elapsed().as_secs_f64()
            );
            return Ok(());
        }
        if !begun && t0.elapsed() > BEGIN_WAIT {
            bail!(
                "{} did not restart within {}s (state: {}); is its agent handling requests?",
                m.name,
                BEGIN_WAIT.as_secs(),
                state_of(&now)
            );
        }
        if t0.elapsed() > deadline {
            bail!(
                "{} is not running again after {}s (state: {}); stopping the rolling restart",
                m.name,
                deadline.as_secs(),
                state_of(&now)
            );
        }
    }
}

pub async fn reinit(cfg: &Config, args: &ReinitArgs) -> anyhow::Result<()> {
    let mut dcs = connect(cfg).await?;
    let view = read_view(cfg, &mut dcs).await?;
    let m = member(cfg, &view, &args.member)?;
    if view.leader.as_deref() == Some(m.name.as_str()) {
        bail!("refusing to reinitialize the leader: switch over first");
    }
    if !args.force {
        confirm(&format!(
            "Reinitialize {}? Its data directory is wiped and cloned again from the leader.",
            m.name
        ))
        .await?;
    }
    let api = ApiClient::new(cfg)?;
    let url = api.url(m, "/reinitialize");
    let answer = api.send(reqwest::Method::POST, &url, None).await?;
    if !answer.ok() {
        bail!("reinitialize of {} refused: {}", m.name, answer.reason());
    }
    println!("{}: reinitialize requested", m.name);
    Ok(())
}

pub async fn reload(cfg: &Config, args: &ReloadArgs) -> anyhow::Result<()> {
    let mut dcs = connect(cfg).await?;
    let view = read_view(cfg, &mut dcs).await?;
    let targets = named(cfg, &view, &args.members)?;
    let api = ApiClient::new(cfg)?;
    for m in targets {
        let url = api.url(m, "/reload");
        let answer = api
            .send(reqwest::Method::POST, &url, None)
            .await
            .with_context(|| format!("reload of {}", m.name))?;
        if !answer.ok() {
            bail!("reload of {} refused: {}", m.name, answer.reason());
        }
        println!("{}: reload requested", m.name);
    }
    Ok(())
}
