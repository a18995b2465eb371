//! The agent's side: tells the keeper every new fence deadline, starting
//! the keeper when there is a deadline to hold and none runs.

use super::{instant_to_ns, monotonic_ns, socket_path, Feed, Line, Reply};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::sync::watch;

/// A line and its answer; a keeper that takes longer is treated as gone.
const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(2);
const RETRY_EVERY: Duration = Duration::from_millis(500);
/// A keeper that was started but does not listen is started again no
/// sooner than this.
const SPAWN_EVERY: Duration = Duration::from_secs(5);
/// How long a keeper just started has to open its socket.
const LISTEN_WAIT: Duration = Duration::from_secs(3);

type Said = (Option<Instant>, bool);

pub struct KeeperFeed {
    /// None: nothing said yet. Some((deadline, confirmed)): the core's
    /// deadline (None: nothing writable), and whether etcd has answered a
    /// lease operation of this agent (`Line::confirmed`).
    tx: watch::Sender<Option<Said>>,
    task: tokio::task::JoinHandle<()>,
    sock: PathBuf,
    /// `Line::agent`: when this agent started.
    agent: u64,
}

impl KeeperFeed {
    /// `config` is the agent's config file: the keeper reads the same.
    pub fn spawn(config: PathBuf, data_dir: &Path) -> KeeperFeed {
        let (tx, rx) = watch::channel(None);
        let sock = socket_path(data_dir);
        let agent = monotonic_ns();
        let task = tokio::spawn(run(config, sock.clone(), agent, rx));
        KeeperFeed {
            tx,
            task,
            sock,
            agent,
        }
    }

    /// The core's current fence deadline (None: nothing writable), and
    /// whether etcd has answered one of this agent's lease operations.
    pub fn arm(&self, deadline: Option<Instant>, confirmed: bool) {
        let said = Some((deadline, confirmed));
        self.tx.send_if_modified(|v| {
            let changed = *v != said;
            *v = said;
            changed
        });
    }

    /// Clean shutdown with PostgreSQL stopped: the keeper exits.
    pub async fn exit(&self) {
        self.task.abort();
        let Ok(Ok(stream)) =
            tokio::time::timeout(EXCHANGE_TIMEOUT, UnixStream::connect(&self.sock)).await
        else {
            return;
        };
        let mut conn = BufReader::new(stream);
        let last = Line {
            agent: self.agent,
            seq: u64::MAX,
            confirmed: true,
            feed: Feed::Exit,
        };
        if let Err(e) = exchange(&mut conn, &last).await {
            tracing::warn!("cannot tell the fence keeper to exit: {e}");
        }
    }

    /// Shutdown with PostgreSQL possibly still running: the keeper keeps
    /// the last deadline and fences at it.
    pub fn abort(&self) {
        self.task.abort();
    }
}

async fn run(config: PathBuf, sock: PathBuf, agent: u64, mut rx: watch::Receiver<Option<Said>>) {
    let mut seq = 0u64;
    let mut conn: Option<BufReader<UnixStream>> = None;
    let mut last_spawn: Option<Instant> = None;
    let mut failing = false;
    loop {
        let (value, confirmed) = loop {
            if let Some(v) = *rx.borrow_and_update() {
                break v;
            }
            if rx.changed().await.is_err() {
                return;
            }
        };
        seq += 1;
        let line = Line {
            agent,
            seq,
            confirmed,
            feed: match value {
                Some(d) => Feed::Arm {
                    deadline_ns: instant_to_ns(d),
                },
                None => Feed::Disarm,
            },
        };
        if conn.is_none() {
            // A disarm needs no keeper: start one only to hold a deadline.
            let start = matches!(line.feed, Feed::Arm { .. });
            match connect(&sock, &config, start, &mut last_spawn).await {
                Ok(Some(s)) => conn = Some(BufReader::new(s)),
                Ok(None) => {
                    if rx.changed().await.is_err() {
                        return;
                    }
                    continue;
                }
                Err(e) => {
                    if !failing {
                        tracing::warn!("cannot reach the fence keeper at {}: {e}", sock.display());
                        failing = true;
                    }
                    tokio::time::sleep(RETRY_EVERY).await;
                    continue;
                }
            }
        }
        let Some(c) = conn.as_mut() else { continue };
        match exchange(c, &line).await {
            Ok(()) => {
                if failing {
                    tracing::info!("the fence keeper holds our deadline again");
                    failing = false;
                }
                if rx.changed().await.is_err() {
                    return;
                }
            }
            Err(e) => {
                if !failing {
                    tracing::warn!("the fence keeper did not take our deadline: {e}");
                    failing = true;
                }
                conn = None;
                tokio::time::sleep(RETRY_EVERY).await;
            }
        }
    }
}

/// Ok(None): no keeper runs and `start` is false.
async fn connect(
    sock: &Path,
    config: &Path,
    start: bool,
    last_spawn: &mut Option<Instant>,
) -> std::io::Result<Option<UnixStream>> {
    match UnixStream::connect(sock).await {
        Ok(s) => return Ok(Some(s)),
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) => {}
        Err(e) => return Err(e),
    }
    if !start {
        return Ok(None);
    }
    if last_spawn.is_none_or(|t| t.elapsed() >= SPAWN_EVERY) {
        *last_spawn = Some(Instant::now());
        spawn_keeper(config)?;
    }
    let until = Instant::now() + LISTEN_WAIT;
    loop {
        tokio::time::sleep(Duration::from_millis(50)).await;
        match UnixStream::connect(sock).await {
            Ok(s) => return Ok(Some(s)),
            Err(e) if Instant::now() >= until => return Err(e),
            Err(_) => {}
        }
    }
}

fn spawn_keeper(config: &Path) -> std::io::Result<()> {
    let exe = std::env::current_exe()?;
    tracing::info!("starting the fence keeper");
    // Its own process group: a signal meant for the agent's group (a
    // terminal's Ctrl-C, a supervisor killing the agent) must not take the
    // keeper with it. Its log lines go where the agent's go.
    tokio::process::Command::new(exe)
        .arg("--config")
        .arg(config)
        .arg("fence-keeper")
        .stdin(std::process::Stdio::null())
        .process_group(0)
        .spawn()
        .map(drop)
}

async fn exchange(conn: &mut BufReader<UnixStream>, line: &Line) -> std::io::Result<()> {
    let mut text = serde_json::to_string(line).map_err(std::io::Error::other)?;
    text.push('\n');
    let round = async {
        conn.get_mut().write_all(text.as_bytes()).await?;
        let mut answer = String::new();
        if conn.read_line(&mut answer).await? == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the keeper closed the connection",
            ));
        }
        match serde_json::from_str::<Reply>(answer.trim_end()) {
            Ok(Reply { ok: true }) => Ok(()),
            _ => Err(std::io::Error::other(format!(
                "the keeper refused the line: {}",
                answer.trim_end()
            ))),
        }
    };
    tokio::time::timeout(EXCHANGE_TIMEOUT, round)
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no answer in 2 s"))?
}
