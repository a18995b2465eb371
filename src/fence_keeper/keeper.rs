//! The keeper process (`pgwarden fence-keeper`).

use super::{lock_path, ns_to_instant, socket_path, Feed, Line, Reply};
use crate::config::Config;
use crate::postgres::{Instance, OsUser};
use anyhow::{anyhow, Context};
use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};
use nix::sys::signal::Signal;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::mpsc;

/// With nothing armed and no agent connected for this long, the keeper
/// has nothing to do: it exits (a restarted agent starts a new one).
const IDLE_EXIT: Duration = Duration::from_secs(60);
const CHECK_EVERY: Duration = Duration::from_secs(1);
/// SIGQUIT (immediate shutdown) first; a postmaster that has not exited
/// after this (hung, SIGSTOPped) gets SIGKILL: its backends then see it
/// gone and exit, and nothing new is accepted.
const QUIT_WAIT: Duration = Duration::from_secs(3);
const KILL_WAIT: Duration = Duration::from_secs(5);
/// A line longer than this is not from an agent.
const MAX_LINE: usize = 1024;

/// Runs the keeper for the member of `cfg` until the agent says exit, or
/// until it has been idle for `IDLE_EXIT`. Exits at once (Ok) when another
/// keeper already runs for this data directory.
pub async fn run(cfg: Config) -> anyhow::Result<()> {
    let data_dir = cfg.postgresql.data_dir.clone();
    let lock = lock_path(&data_dir);
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock)
        .with_context(|| format!("cannot open {}", lock.display()))?;
    let _held = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(l) => l,
        Err((_, Errno::EWOULDBLOCK)) => {
            tracing::info!(
                "a fence keeper already runs for {}: leaving it to that one",
                data_dir.display()
            );
            return Ok(());
        }
        Err((_, e)) => return Err(anyhow!("cannot lock {}: {e}", lock.display())),
    };
    let sock = socket_path(&data_dir);
    // We hold the lock: a socket left there is a dead keeper's.
    match std::fs::remove_file(&sock) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("cannot remove {}", sock.display())),
    }
    let listener = UnixListener::bind(&sock)
        .with_context(|| format!("cannot listen on {}", sock.display()))?;
    // Whoever can write here can disarm the fence: the agent's user only.
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("cannot restrict {}", sock.display()))?;
    let user = OsUser::resolve(&cfg.postgresql.os_user).map_err(|m| anyhow!(m))?;
    let pg = Instance::from_config(
        &cfg,
        cfg.postgresql.bin_dir.clone().unwrap_or_default(),
        user,
    );
    // The postmaster's PID, read now while descriptors are plenty: the
    // fence works from it even if postmaster.pid cannot be read later.
    let _ = pg.postmaster_pid();
    tracing::info!(
        "fence keeper for {} (member {}) listening on {}",
        data_dir.display(),
        cfg.name,
        sock.display()
    );

    // None: a line this keeper cannot read.
    let (tx, mut rx) = mpsc::channel::<Option<Line>>(16);
    let mut applied: Option<(u64, u64)> = None;
    let connections = Arc::new(AtomicUsize::new(0));
    // The deadline held, as CLOCK_MONOTONIC nanoseconds.
    let mut held: Option<u64> = None;
    let mut last_contact = Instant::now();
    let mut check = tokio::time::interval(CHECK_EVERY);
    loop {
        let deadline = held.map(ns_to_instant);
        let fire = async {
            match deadline {
                Some(d) => tokio::time::sleep_until(d.into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            biased;
            Some(line) = rx.recv() => {
                last_contact = Instant::now();
                // Most likely an upgraded agent speaking a newer protocol:
                // holding on would fence at a deadline that agent can no
                // longer move. It starts a keeper of its own version as
                // soon as this one is gone.
                let Some(line) = line else {
                    tracing::warn!("fence keeper: a line it cannot read (a newer agent?): exiting so the agent starts its own");
                    break;
                };
                if !line.newer_than(applied) {
                    tracing::debug!("fence keeper: ignoring a stale line {line:?}");
                    continue;
                }
                applied = Some((line.agent, line.seq));
                if line.feed == Feed::Exit {
                    tracing::info!("the agent stopped PostgreSQL and shuts down: fence keeper exiting");
                    break;
                }
                let next = line.apply(held);
                match (held, next) {
                    (None, Some(_)) => tracing::info!("fence armed by the agent"),
                    (Some(_), None) => {
                        tracing::info!("fence disarmed by the agent: nothing writable to protect")
                    }
                    _ => {}
                }
                held = next;
            }
            _ = fire => {
                held = None;
                fence(&pg).await;
            }
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    tokio::spawn(serve(stream, tx.clone(), connections.clone()));
                }
                Err(e) => {
                    // Out of descriptors, say: the fence itself needs none.
                    tracing::warn!("fence keeper cannot accept a connection: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            _ = check.tick() => {
                if !parent_exists(&data_dir) {
                    tracing::info!("{} is gone: fence keeper exiting", data_dir.display());
                    break;
                }
                if held.is_none()
                    && connections.load(Ordering::Relaxed) == 0
                    && last_contact.elapsed() > IDLE_EXIT
                {
                    tracing::info!("nothing armed and no agent for {IDLE_EXIT:?}: fence keeper exiting");
                    break;
                }
            }
        }
    }
    let _ = std::fs::remove_file(&sock);
    Ok(())
}

fn parent_exists(data_dir: &Path) -> bool {
    data_dir.parent().is_none_or(|p| p.exists())
}

/// The deadline passed with no newer one from the agent: the lease may
/// expire any moment and a replica may take over.
async fn fence(pg: &Instance) {
    let Some(pid) = pg.postmaster_pid() else {
        tracing::warn!(
            "fence deadline passed without a renewal from the agent; no postmaster runs"
        );
        return;
    };
    tracing::error!(
        "the agent did not confirm the leader lease before the fence deadline (killed, hung or stuck): stopping PostgreSQL (postmaster PID {pid}) immediately"
    );
    if let Err(e) = pg.signal_postmaster(Signal::SIGQUIT, QUIT_WAIT).await {
        tracing::error!("{e:#}; sending SIGKILL");
        if let Err(e) = pg.signal_postmaster(Signal::SIGKILL, KILL_WAIT).await {
            tracing::error!("the fence failed: {e:#}");
        }
    }
}

/// One agent connection: a line in, a line out.
async fn serve(stream: UnixStream, tx: mpsc::Sender<Option<Line>>, connections: Arc<AtomicUsize>) {
    connections.fetch_add(1, Ordering::Relaxed);
    let _count = Decrement(connections);
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read);
    let mut line = String::new();
    loop {
        line.clear();
        match lines.read_line(&mut line).await {
            Ok(0) | Err(_) => return,
            Ok(n) if n > MAX_LINE => return,
            Ok(_) => {}
        }
        let ok = match serde_json::from_str::<Line>(line.trim_end()) {
            Ok(feed) => tx.send(Some(feed)).await.is_ok(),
            Err(e) => {
                tracing::warn!(
                    "fence keeper: not a feed line ({e}): {:.80}",
                    line.trim_end()
                );
                let _ = tx.send(None).await;
                false
            }
        };
        let Ok(mut reply) = serde_json::to_string(&Reply { ok }) else {
            return;
        };
        reply.push('\n');
        if write.write_all(reply.as_bytes()).await.is_err() || !ok {
            return;
        }
    }
}

struct Decrement(Arc<AtomicUsize>);

impl Drop for Decrement {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}
