//! `pgwarden switchover` and `pgwarden failover`: checked against etcd here
//! (so an impossible request is refused before the question is asked),
//! then sent to a member's API, which checks again and stores it; then the
//! command follows etcd until the new leader holds the lease.

use super::operator::{confirm, connect, member, read_view, Answer, ApiClient};
use crate::api::requests::{
    check_failover, check_switchover, format_time, now_unix, FailoverBody, SwitchoverBody,
};
use crate::config::Config;
use crate::dcs::{CancelOutcome, ClusterView, Dcs, FailoverKind, FailoverRequest, MemberStatus};
use anyhow::{anyhow, bail};
use std::time::{Duration, Instant};

/// How long the commands follow a hand-over before giving up waiting (the
/// request stays; the agents carry it out or drop it).
const WAIT: Duration = Duration::from_secs(120);

#[derive(clap::Args, Debug, Clone)]
pub struct SwitchoverArgs {
    /// The member to hand the primary role to (default: the healthiest
    /// replica, chosen by the leader).
    #[arg(long, value_name = "NAME")]
    pub candidate: Option<String>,
    /// Only switch over if NAME is still the leader.
    #[arg(long, value_name = "NAME")]
    pub leader: Option<String>,
    /// Schedule it: an RFC 3339 time such as 2030-01-02T03:04:05Z.
    #[arg(long, value_name = "TIME")]
    pub at: Option<String>,
    /// Do not ask for confirmation.
    #[arg(long)]
    pub force: bool,
    /// Show the pending (or scheduled) switchover, if any.
    #[arg(long, conflicts_with_all = ["candidate", "leader", "at", "cancel"])]
    pub list: bool,
    /// Cancel the pending (or scheduled) switchover.
    #[arg(long, conflicts_with_all = ["candidate", "leader", "at"])]
    pub cancel: bool,
}

#[derive(clap::Args, Debug, Clone)]
pub struct FailoverArgs {
    /// The member to promote.
    #[arg(long, value_name = "NAME", required = true)]
    pub candidate: String,
    /// Do not ask for confirmation; in synchronous_mode, also fail over to
    /// a member not listed in `sync` (with a warning: it may lack
    /// acknowledged commits).
    #[arg(long)]
    pub force: bool,
}

pub async fn switchover(cfg: &Config, args: &SwitchoverArgs) -> anyhow::Result<()> {
    let mut dcs = connect(cfg).await?;
    if args.list {
        let view = read_view(cfg, &mut dcs).await?;
        match &view.failover {
            None => println!("no switchover or failover pending"),
            Some(f) => println!("{}", describe(f)),
        }
        return Ok(());
    }
    if args.cancel {
        if !args.force {
            let view = read_view(cfg, &mut dcs).await?;
            let Some(f) = &view.failover else {
                bail!("no switchover or failover pending");
            };
            confirm(&format!("Cancel the {}?", describe(f))).await?;
        }
        return match dcs.cancel_failover().await? {
            CancelOutcome::NothingPending => bail!("no switchover or failover pending"),
            CancelOutcome::Cancelled(f) => {
                println!("cancelled: {}", describe(&f));
                Ok(())
            }
            CancelOutcome::CancelledUnreadable => {
                println!("cancelled an unreadable request");
                Ok(())
            }
        };
    }

    let view = read_view(cfg, &mut dcs).await?;
    let body = SwitchoverBody {
        leader: args.leader.clone(),
        candidate: args.candidate.clone(),
        scheduled_at: args.at.clone(),
    };
    let req = check_switchover(&view, &body, now_unix(), &cfg.scope)
        .map_err(|r| anyhow!("switchover refused: {r}"))?;
    let leader = req.leader.clone().unwrap_or_default();
    if !args.force {
        let to = args
            .candidate
            .as_deref()
            .unwrap_or("the healthiest replica");
        let when = req
            .scheduled_at
            .as_deref()
            .map(|t| format!(" at {t}"))
            .unwrap_or_default();
        confirm(&format!("Switch over from {leader} to {to}{when}?")).await?;
    }
    let api = ApiClient::new(cfg)?;
    let answer = post_first(
        &api,
        &view,
        &leader,
        "/switchover",
        &serde_json::to_value(&body)?,
    )
    .await?;
    if !answer.ok() {
        bail!("switchover refused: {}", answer.reason());
    }
    let stored: FailoverRequest = serde_json::from_value(answer.body.clone()).unwrap_or(req);
    if stored.scheduled_at.is_some() {
        println!("{}", describe(&stored));
        return Ok(());
    }
    println!("{}", describe(&stored));
    let new = follow(cfg, &mut dcs, &leader, stored.candidate.as_deref()).await?;
    println!("switched over: {new} is the leader now");
    Ok(())
}

pub async fn failover(cfg: &Config, args: &FailoverArgs) -> anyhow::Result<()> {
    let mut dcs = connect(cfg).await?;
    let view = read_view(cfg, &mut dcs).await?;
    let body = FailoverBody {
        candidate: Some(args.candidate.clone()),
        force: args.force,
    };
    let req = check_failover(&view, &body, now_unix(), &cfg.scope)
        .map_err(|r| anyhow!("failover refused: {r}"))?;
    if req.force {
        eprintln!(
            "warning: {} is not a synchronous standby: commits the old primary acknowledged may be lost",
            args.candidate
        );
    }
    if !args.force {
        let question = match view.leader.as_deref() {
            Some(l) => format!(
                "{l} holds the leader lease: fail over to {} anyway (a switchover would be cleaner)?",
                args.candidate
            ),
            None => format!("There is no leader. Fail over to {}?", args.candidate),
        };
        confirm(&question).await?;
    }
    member(cfg, &view, &args.candidate)?;
    let api = ApiClient::new(cfg)?;
    let answer = post_first(
        &api,
        &view,
        &args.candidate,
        "/failover",
        &serde_json::to_value(&body)?,
    )
    .await?;
    if !answer.ok() {
        bail!("failover refused: {}", answer.reason());
    }
    println!("{}", describe(&req));
    let old = view.leader.clone().unwrap_or_default();
    let new = follow(cfg, &mut dcs, &old, Some(&args.candidate)).await?;
    println!("failed over: {new} is the leader now");
    Ok(())
}

/// POSTs to `first`'s API, or, when it cannot be reached, to the other
/// members' in turn: any member's API checks and stores the request.
async fn post_first(
    api: &ApiClient,
    view: &ClusterView,
    first: &str,
    path: &str,
    body: &serde_json::Value,
) -> anyhow::Result<Answer> {
    let mut order: Vec<&MemberStatus> = view.members.iter().collect();
    order.sort_by_key(|m| m.name != first);
    let mut last_error = None;
    for m in order {
        let url = api.url(m, path);
        match api.send(reqwest::Method::POST, &url, Some(body)).await {
            Ok(answer) => return Ok(answer),
            Err(e) => {
                tracing::debug!("{e:#}");
                last_error = Some(e);
            }
        }
    }
    Err(last_error.unwrap_or_else(|| anyhow!("no member's API to send the request to")))
}

/// Waits until someone other than `old` (the `candidate`, when named) holds
/// the leader key. Gives up when the request is gone without that
/// happening, or after [`WAIT`].
async fn follow(
    cfg: &Config,
    dcs: &mut Dcs,
    old: &str,
    candidate: Option<&str>,
) -> anyhow::Result<String> {
    let start = Instant::now();
    let mut gone_since: Option<Instant> = None;
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let view: ClusterView = match read_view(cfg, dcs).await {
            Ok(v) => v,
            Err(e) if start.elapsed() < WAIT => {
                tracing::debug!("reading etcd: {e:#}");
                continue;
            }
            Err(e) => return Err(e),
        };
        if let Some(l) = view.leader.as_deref() {
            if l != old && candidate.is_none_or(|c| c == l) {
                return Ok(l.to_string());
            }
        }
        // The agents delete the request when done or refused; give the
        // leader key a moment to follow before calling it refused.
        match (&view.failover, gone_since) {
            (Some(_), _) => gone_since = None,
            (None, None) => gone_since = Some(Instant::now()),
            (None, Some(t)) if t.elapsed() > Duration::from_secs(10) => {
                let now = view.leader.as_deref().unwrap_or("nobody");
                bail!("the request was withdrawn without a hand-over: the leader is {now} (see the leader's agent log)");
            }
            _ => {}
        }
        if start.elapsed() > WAIT {
            let now = view.leader.as_deref().unwrap_or("nobody");
            bail!(
                "requested, but the leader is still {now} after {}s; follow it with `pgwarden list`",
                WAIT.as_secs()
            );
        }
    }
}

/// One line about a request.
pub(crate) fn describe(f: &FailoverRequest) -> String {
    let kind = match f.kind {
        FailoverKind::Switchover => "switchover",
        FailoverKind::Failover => "failover",
    };
    let from = f
        .leader
        .as_deref()
        .map(|l| format!(" from {l}"))
        .unwrap_or_default();
    let to = f
        .candidate
        .as_deref()
        .map(|c| format!(" to {c}"))
        .unwrap_or_else(|| " to the healthiest replica".into());
    let when = match (&f.scheduled_at, f.scheduled_unix) {
        (Some(t), _) => format!(", scheduled at {t}"),
        (None, Some(u)) => format!(", scheduled at {}", format_time(u)),
        (None, None) => String::new(),
    };
    format!("{kind}{from}{to}{when} (requested at {})", f.requested_at)
}
