//! The API cannot hurt the HA loop: thousands of idle connections and a
//! slow-header client on the leader's API port, on a real 3-member cluster.
//! While they are held, every member's /primary answers HAProxy-style
//! checks within a second, the leader stays the leader, no two members are
//! ever writable, and the leader's agent never runs out of descriptors;
//! afterwards its memory is back near its idle size.
//!
//! Run with `--nocapture` to see the figures (descriptors, RSS, latency).

mod support;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use support::{eventually, http_status, Cluster, ClusterOptions, MemberOptions};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::task::JoinHandle;

const LONG: Duration = Duration::from_secs(120);
/// Idle connections the flood holds open (reopening each one a while
/// after the server closes it, as an attacker would).
const FLOOD: usize = 2000;
/// A flood connection the server closed is reopened after 3-7 s: enough
/// to keep the pressure on without exhausting loopback's ephemeral ports
/// (the server side keeps each closed 4-tuple in TIME_WAIT for 60 s).
const REOPEN_AFTER_MS: std::ops::RangeInclusive<u64> = 3000..=7000;
const HOLD: Duration = Duration::from_secs(20);
/// What a health check may take, flood or not.
const CHECK_WITHIN: Duration = Duration::from_secs(1);

/// One flood at a time: two would measure how this machine copes with two
/// clusters and two floods, not how an agent copes with one.
static ONE_FLOOD: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn stop_channel() -> (watch::Sender<bool>, watch::Receiver<bool>) {
    watch::channel(false)
}

async fn stopped(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}

/// Idle connections: connect and send nothing.
struct Flood {
    stop: watch::Sender<bool>,
    opened: Arc<AtomicU64>,
    closed_by_server: Arc<AtomicU64>,
    answered: Arc<AtomicU64>,
    tasks: Vec<JoinHandle<()>>,
}

impl Flood {
    fn start(addr: std::net::SocketAddr, n: usize) -> Flood {
        let (stop, rx) = stop_channel();
        let opened = Arc::new(AtomicU64::new(0));
        let closed_by_server = Arc::new(AtomicU64::new(0));
        let answered = Arc::new(AtomicU64::new(0));
        let tasks = (0..n)
            .map(|_| {
                let mut rx = rx.clone();
                let (o, c, a) = (opened.clone(), closed_by_server.clone(), answered.clone());
                tokio::spawn(async move {
                    while !*rx.borrow() {
                        let connect =
                            tokio::time::timeout(Duration::from_secs(3), TcpStream::connect(addr));
                        let mut s = tokio::select! {
                            r = connect => match r {
                                Ok(Ok(s)) => s,
                                _ => continue,
                            },
                            _ = stopped(&mut rx) => return,
                        };
                        o.fetch_add(1, Ordering::Relaxed);
                        let mut buf = [0u8; 256];
                        tokio::select! {
                            r = s.read(&mut buf) => {
                                if matches!(r, Ok(n) if n > 0) {
                                    a.fetch_add(1, Ordering::Relaxed);
                                }
                                c.fetch_add(1, Ordering::Relaxed);
                            }
                            _ = stopped(&mut rx) => return,
                        }
                        drop(s);
                        let pause = {
                            use rand::Rng;
                            rand::thread_rng().gen_range(REOPEN_AFTER_MS)
                        };
                        tokio::select! {
                            _ = tokio::time::sleep(Duration::from_millis(pause)) => {}
                            _ = stopped(&mut rx) => return,
                        }
                    }
                })
            })
            .collect();
        Flood {
            stop,
            opened,
            closed_by_server,
            answered,
            tasks,
        }
    }

    /// Closes every connection; returns (opened, closed by the server,
    /// answered).
    async fn stop(self) -> (u64, u64, u64) {
        let _ = self.stop.send(true);
        for t in self.tasks {
            let _ = t.await;
        }
        (
            self.opened.load(Ordering::Relaxed),
            self.closed_by_server.load(Ordering::Relaxed),
            self.answered.load(Ordering::Relaxed),
        )
    }
}

/// A slowloris client: one header byte a second, reconnecting whenever the
/// server cuts it. Records how long each connection lasted and whether
/// any was answered.
struct SlowHeader {
    stop: watch::Sender<bool>,
    cuts: Arc<Mutex<Vec<Duration>>>,
    answered: Arc<AtomicU64>,
    task: JoinHandle<()>,
}

impl SlowHeader {
    fn start(addr: std::net::SocketAddr) -> SlowHeader {
        let (stop, mut rx) = stop_channel();
        let cuts = Arc::new(Mutex::new(Vec::new()));
        let answered = Arc::new(AtomicU64::new(0));
        let (c, a) = (cuts.clone(), answered.clone());
        let task = tokio::spawn(async move {
            let request = b"GET /primary HTTP/1.1\r\nHost: pgwarden\r\nUser-Agent: slowloris\r\nX-Padding: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n\r\n";
            while !*rx.borrow() {
                let Ok(mut s) = TcpStream::connect(addr).await else {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                };
                let start = Instant::now();
                for b in request {
                    if s.write_all(&[*b]).await.is_err() {
                        break;
                    }
                    let mut buf = [0u8; 256];
                    tokio::select! {
                        r = s.read(&mut buf) => {
                            if matches!(r, Ok(n) if n > 0) {
                                a.fetch_add(1, Ordering::Relaxed);
                            }
                            break;
                        }
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                        _ = stopped(&mut rx) => return,
                    }
                }
                c.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(start.elapsed());
            }
        });
        SlowHeader {
            stop,
            cuts,
            answered,
            task,
        }
    }

    async fn stop(self) -> (Vec<Duration>, u64) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
        let cuts = self.cuts.lock().unwrap_or_else(|p| p.into_inner()).clone();
        (cuts, self.answered.load(Ordering::Relaxed))
    }
}

/// One HAProxy-style check (`GET /primary HTTP/1.0` on a fresh
/// connection, the request sent at once): its status code (None: no
/// answer within CHECK_WITHIN). Blocking I/O on its own thread, as from
/// another process: the flood's tasks in this process must not delay the
/// check's request, or it would look idle to the server, like the flood.
fn check(addr: std::net::SocketAddr) -> Option<u16> {
    use std::io::{Read, Write};
    let deadline = Instant::now() + CHECK_WITHIN;
    let mut s = std::net::TcpStream::connect_timeout(&addr, CHECK_WITHIN).ok()?;
    s.write_all(b"GET /primary HTTP/1.0\r\n\r\n").ok()?;
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let left = deadline.checked_duration_since(Instant::now())?;
        s.set_read_timeout(Some(left.max(Duration::from_millis(1))))
            .ok()?;
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(_) => return None,
        }
    }
    let text = String::from_utf8_lossy(&out);
    text.split_whitespace().nth(1)?.parse().ok()
}

/// A check's status (None: no answer in time) and how long it took.
type CheckResult = (Option<u16>, Duration);

/// Checks one member four times a second, from a thread of its own.
struct Checker {
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<Vec<CheckResult>>,
}

impl Checker {
    fn start(addr: std::net::SocketAddr) -> Checker {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut results = Vec::new();
            while !s.load(Ordering::Relaxed) {
                let start = Instant::now();
                let status = check(addr);
                results.push((status, start.elapsed()));
                std::thread::sleep(Duration::from_millis(250));
            }
            results
        });
        Checker { stop, thread }
    }

    fn stop(self) -> Vec<CheckResult> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap_or_default()
    }
}

/// Open descriptors of a process.
fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Resident memory of a process, in KiB.
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// The (soft, hard) "Max open files" of a process.
fn nofile_of(pid: u32) -> (String, String) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap_or_default();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap_or("");
    let mut f = line
        .trim_start_matches("Max open files")
        .split_whitespace()
        .map(str::to_string);
    (f.next().unwrap_or_default(), f.next().unwrap_or_default())
}

/// Samples the agent's descriptors and memory twice a second.
struct Sampler {
    stop: watch::Sender<bool>,
    max_fds: Arc<AtomicU64>,
    max_rss: Arc<AtomicU64>,
    task: JoinHandle<()>,
}

impl Sampler {
    fn start(pid: u32) -> Sampler {
        let (stop, rx) = stop_channel();
        let max_fds = Arc::new(AtomicU64::new(0));
        let max_rss = Arc::new(AtomicU64::new(0));
        let (f, r) = (max_fds.clone(), max_rss.clone());
        let task = tokio::spawn(async move {
            while !*rx.borrow() {
                f.fetch_max(fd_count(pid) as u64, Ordering::Relaxed);
                r.fetch_max(rss_kib(pid), Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        });
        Sampler {
            stop,
            max_fds,
            max_rss,
            task,
        }
    }

    async fn stop(self) -> (u64, u64) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
        (
            self.max_fds.load(Ordering::Relaxed),
            self.max_rss.load(Ordering::Relaxed),
        )
    }
}

async fn system_identifier(c: &Cluster, i: usize) -> String {
    let client = c.sql(i).await.expect("SQL connection");
    let row = client
        .query_one(
            "SELECT system_identifier::text FROM pg_control_system()",
            &[],
        )
        .await
        .expect("system identifier");
    row.get(0)
}

/// A cluster of three whose agents run under `nofile`, with one primary
/// and two streaming replicas. Returns it and the primary's index.
async fn cluster_under(nofile: (u64, u64)) -> (Cluster, usize) {
    let mut opts = ClusterOptions::new(3);
    opts.members = vec![
        MemberOptions {
            nofile: Some(nofile),
            ..MemberOptions::default()
        };
        3
    ];
    let c = Cluster::start(&opts);
    let leader = c.wait_single_primary(LONG).await;
    for i in (0..3).filter(|i| *i != leader) {
        let url = c.members[i].api("/replica");
        eventually(&format!("{} streaming", c.members[i].name), LONG, || {
            let url = url.clone();
            async move { (http_status("GET", &url).await == 200).then_some(()) }
        })
        .await;
    }
    (c, leader)
}

/// The leader agent's open descriptors before and at most during the flood.
struct Figures {
    fds_before: usize,
    fds_max: u64,
}

/// Floods the leader's API for HOLD with FLOOD idle connections and a
/// slow-header client while every member is checked HAProxy-style and the
/// invariant monitor runs; asserts the leader, its PostgreSQL and every
/// check came through, and returns the figures.
async fn flood_the_leader(c: &Cluster, leader: usize) -> Figures {
    let pid = c.agent_pid(leader).expect("leader's agent runs");
    let name = c.members[leader].name.clone();
    let postmaster = c.postmaster_pid(leader).expect("leader's postmaster");
    let sysid = system_identifier(c, leader).await;
    // Idle size: after a few quiet loops.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let rss_before = rss_kib(pid);
    let fds_before = fd_count(pid);

    let monitor = c.monitor();
    let checkers: Vec<Checker> = c
        .members
        .iter()
        .map(|m| Checker::start(format!("{}:{}", m.host, m.api_port).parse().expect("addr")))
        .collect();
    let sampler = Sampler::start(pid);
    let api: std::net::SocketAddr =
        format!("{}:{}", c.members[leader].host, c.members[leader].api_port)
            .parse()
            .expect("addr");
    let flood = Flood::start(api, FLOOD);
    let slow = SlowHeader::start(api);
    tokio::time::sleep(HOLD).await;
    let (opened, closed, flood_answered) = flood.stop().await;
    let (cuts, slow_answered) = slow.stop().await;
    let (fds_max, rss_max) = sampler.stop().await;
    let mut results = Vec::new();
    for ch in checkers {
        results.push(ch.stop());
    }
    monitor.finish().await;

    // Every check of every member answered within a second, and said the
    // same as before the flood: the leader 200, the replicas 503.
    let mut latency_max = Duration::ZERO;
    let mut checks = 0;
    for (i, r) in results.iter().enumerate() {
        let want = if i == leader { 200 } else { 503 };
        assert!(
            r.len() >= (HOLD.as_secs() * 2) as usize,
            "{}: only {} checks",
            c.members[i].name,
            r.len()
        );
        for (status, took) in r {
            assert_eq!(
                *status,
                Some(want),
                "{}: a check during the flood got {status:?} after {took:?}",
                c.members[i].name
            );
            latency_max = latency_max.max(*took);
        }
        checks += r.len();
        let slowest = r.iter().enumerate().max_by_key(|(_, (_, t))| *t);
        if let Some((k, (_, t))) = slowest {
            eprintln!(
                "{}: {} checks, slowest {t:?} (check #{k}, ~{} ms into the flood)",
                c.members[i].name,
                r.len(),
                k * 250
            );
        }
    }
    // The flood was real: the server closed its connections, the slow
    // client was cut (by its header timeout or to make room), and none
    // of them got an answer.
    assert!(
        opened >= FLOOD as u64,
        "the flood opened only {opened} connections"
    );
    assert!(
        closed >= FLOOD as u64 / 2,
        "the server closed only {closed} flood connections"
    );
    assert_eq!(flood_answered, 0, "idle connections were answered");
    assert_eq!(slow_answered, 0, "the slow header was answered");
    assert!(!cuts.is_empty(), "the slow-header client was never cut");
    for cut in &cuts {
        assert!(
            *cut <= pgwarden::api::HEADER_TIMEOUT + Duration::from_secs(2),
            "a slow header was held for {cut:?}"
        );
    }

    // The leader is unchanged, its PostgreSQL untouched.
    assert_eq!(
        c.wait_single_primary(LONG).await,
        leader,
        "the leader changed"
    );
    assert_eq!(
        c.postmaster_pid(leader),
        Some(postmaster),
        "the leader's postmaster changed"
    );
    assert_eq!(system_identifier(c, leader).await, sysid);
    let log = c.agent_log(leader);
    assert!(
        !log.contains("Too many open files"),
        "{name} ran out of descriptors:\n{log}"
    );

    // Descriptors and memory come back.
    let fds_after = eventually(
        "the leader's descriptors back near idle",
        Duration::from_secs(30),
        || async {
            let n = fd_count(pid);
            (n <= fds_before + 8).then_some(n)
        },
    )
    .await;
    let rss_after = eventually(
        "the leader's memory back within 2x of idle",
        Duration::from_secs(30),
        || async {
            let r = rss_kib(pid);
            (r <= rss_before * 2).then_some(r)
        },
    )
    .await;
    eprintln!(
        "{name} (agent PID {pid}, open-file limit {:?}): flood opened {opened} connections, the server closed {closed}; slow header cut {} times (longest {:?}); {checks} checks, slowest {latency_max:?}; descriptors {fds_before} before, {fds_max} max, {fds_after} after; RSS {rss_before} KiB before, {rss_max} KiB max, {rss_after} KiB after",
        nofile_of(pid),
        cuts.len(),
        cuts.iter().max().copied().unwrap_or_default(),
    );
    Figures {
        fds_before,
        fds_max,
    }
}

fn hard_nofile() -> u64 {
    nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .map(|(_, hard)| hard)
        .unwrap_or(4096)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_flood_on_the_leaders_api_hurts_neither_checks_nor_the_leader() {
    let _one = ONE_FLOOD.lock().await;
    // systemd's default for services: 1,024 soft, a high hard limit. The
    // agent raises its soft limit to the hard one.
    let hard = hard_nofile().min(1 << 20);
    let (c, leader) = cluster_under((1024, hard)).await;
    let pid = c.agent_pid(leader).expect("agent");
    assert_eq!(nofile_of(pid), (hard.to_string(), hard.to_string()));
    assert!(c
        .agent_log(leader)
        .contains("raised the open-file soft limit"));
    let f = flood_the_leader(&c, leader).await;
    // At most api.max_connections (256) of the flood's connections at once.
    assert!(
        f.fds_max <= (f.fds_before + 256 + 16) as u64,
        "{} descriptors open during the flood ({} before)",
        f.fds_max,
        f.fds_before
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_leader_under_a_low_open_file_limit_survives_a_flood() {
    let _one = ONE_FLOOD.lock().await;
    // A hard limit of 256 cannot be raised: the API gets 256 - 64.
    let (c, leader) = cluster_under((256, 256)).await;
    let pid = c.agent_pid(leader).expect("agent");
    assert_eq!(nofile_of(pid), ("256".to_string(), "256".to_string()));
    let log = c.agent_log(leader);
    assert!(
        log.contains("api.max_connections = 256 lowered to 192"),
        "no warning about the lowered limit:\n{log}"
    );
    let f = flood_the_leader(&c, leader).await;
    assert!(f.fds_max < 256, "{} descriptors open", f.fds_max);
}
