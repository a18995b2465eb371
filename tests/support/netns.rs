//! Members in network namespaces, so a host can be cut off for real.
//!
//! `Net` is a bridge in the root namespace (10.203.0.1/24) and, per member,
//! a namespace joined to it by a veth pair (10.203.0.1X/24 inside). Cutting
//! a member takes the bridge-side end of its veth down: nothing gets in or
//! out of that namespace, while loopback and its own address still work
//! inside it. `NetCluster` runs etcd in the root namespace on the bridge
//! address and one agent (and so its PostgreSQL) inside each namespace.
//!
//! The subnet 10.203.0.0/24 is reserved for these tests: a lock file in /tmp
//! serialises every `Net` on the machine, and everything is torn down on
//! drop, on panic too.

use super::cluster::{as_postgres, pg_bin_dir, set_mode, SUPERUSER_PASSWORD};
use super::{free_port, pgwarden_bin, temp_dir};
use nix::fcntl::{Flock, FlockArg};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use std::fs::File;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The bridge's address in the root namespace; members get `.11`, `.12`, …
pub const BRIDGE_IP: &str = "10.203.0.1";
const SUBNET: &str = "10.203.0.0/24";
/// Held for as long as a `Net` lives: two tests never share the subnet.
const LOCK_PATH: &str = "/tmp/pgwarden-netns-10.203.0.0.lock";
/// The agent's API and PostgreSQL ports, the same in every namespace (each
/// has its own network stack).
pub const API_PORT: u16 = 8008;
pub const PG_PORT: u16 = 5432;

/// Runs `ip ARGS`; stdout, or the error with stderr.
fn ip(args: &[&str]) -> Result<String, String> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run ip: {e} (is iproute2 installed?)"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).to_string())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn ip_ok(args: &[&str]) {
    if let Err(e) = ip(args) {
        panic!("{e}");
    }
}

/// Names of the links in the root namespace (without the `@peer` suffix).
fn root_links() -> Vec<String> {
    ip(&["-o", "link", "show"])
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|n| n.split('@').next().unwrap_or(n).to_string())
        .collect()
}

fn namespaces() -> Vec<String> {
    ip(&["netns", "list"])
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect()
}

/// PIDs of the processes running in namespace `ns`.
fn ns_pids(ns: &str) -> Vec<i32> {
    ip(&["netns", "pids", ns])
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// SIGKILLs whatever still runs in `ns` until nothing does (or 10 s).
fn kill_ns_processes(ns: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let pids = ns_pids(ns);
        if pids.is_empty() || Instant::now() > deadline {
            return;
        }
        for p in pids {
            let _ = kill(Pid::from_raw(p), Signal::SIGKILL);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `pgw` + 4 hex digits + `suffix` + a number: names this harness creates.
fn is_ours(name: &str, suffix: &str) -> bool {
    let Some(rest) = name.strip_prefix("pgw") else {
        return false;
    };
    if rest.len() < 5 || !rest.is_char_boundary(4) {
        return false;
    }
    let (tag, rest) = rest.split_at(4);
    tag.chars().all(|c| c.is_ascii_hexdigit())
        && rest
            .strip_prefix(suffix)
            .is_some_and(|n| !n.is_empty() && n.chars().all(|c| c.is_ascii_digit()))
}

/// etcd processes listening on the bridge address: only a `NetCluster`
/// starts those.
fn stale_etcds() -> Vec<i32> {
    let client_url = format!("http://{BRIDGE_IP}:");
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse().ok()) else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        let is_etcd = args
            .first()
            .is_some_and(|a| *a == b"etcd" || a.ends_with(b"/etcd"));
        let ours = args
            .windows(2)
            .any(|w| w[0] == b"--listen-client-urls" && w[1].starts_with(client_url.as_bytes()));
        if is_etcd && ours {
            out.push(pid);
        }
    }
    out
}

/// What a run killed outright (SIGKILL on the test process) left behind.
/// Called with the lock held, so none of it belongs to a live test.
fn sweep_stale() {
    for pid in stale_etcds() {
        eprintln!("netns harness: killing stale etcd (pid {pid}) on {BRIDGE_IP}");
        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
    }
    for ns in namespaces().into_iter().filter(|n| is_ours(n, "-n")) {
        eprintln!("netns harness: removing stale namespace {ns}");
        kill_ns_processes(&ns);
        let _ = ip(&["netns", "del", &ns]);
    }
    for link in root_links() {
        let bridge = link
            .strip_prefix("pgwbr")
            .is_some_and(|t| t.len() == 4 && t.chars().all(|c| c.is_ascii_hexdigit()));
        if bridge || is_ours(&link, "h") {
            eprintln!("netns harness: removing stale link {link}");
            let _ = ip(&["link", "del", &link]);
        }
    }
}

/// One member's namespace and its veth pair.
pub struct NsLink {
    pub ns: String,
    /// The end attached to the bridge, in the root namespace.
    pub host_veth: String,
    /// The end inside the namespace.
    pub ns_veth: String,
    pub addr: String,
}

pub struct Net {
    pub bridge: String,
    pub links: Vec<NsLink>,
    // Last: released once everything above is gone.
    _lock: Flock<File>,
}

impl Net {
    /// A bridge and `n` (at most 9) namespaces joined to it.
    pub fn new(n: usize) -> Net {
        assert!((1..=9).contains(&n), "1 to 9 members (10.203.0.11-19)");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(LOCK_PATH)
            .unwrap_or_else(|e| panic!("open {LOCK_PATH}: {e}"));
        let lock = Flock::lock(file, FlockArg::LockExclusive)
            .unwrap_or_else(|(_, e)| panic!("lock {LOCK_PATH}: {e}"));
        sweep_stale();
        let taken = ip(&["-o", "addr", "show", "to", SUBNET]).unwrap_or_default();
        assert!(
            taken.trim().is_empty(),
            "{SUBNET} is reserved for the netns tests but is in use:\n{taken}"
        );
        let tag = loop {
            let t = format!("{:04x}", rand::random::<u16>());
            if !root_links().contains(&format!("pgwbr{t}")) {
                break t;
            }
        };
        // Built step by step inside the value, so a failure half-way still
        // tears down what exists.
        let mut net = Net {
            bridge: format!("pgwbr{tag}"),
            links: Vec::new(),
            _lock: lock,
        };
        ip_ok(&["link", "add", &net.bridge, "type", "bridge"]);
        ip_ok(&[
            "addr",
            "add",
            &format!("{BRIDGE_IP}/24"),
            "dev",
            &net.bridge,
        ]);
        ip_ok(&["link", "set", &net.bridge, "up"]);
        for i in 1..=n {
            net.links.push(NsLink {
                ns: format!("pgw{tag}-n{i}"),
                host_veth: format!("pgw{tag}h{i}"),
                ns_veth: format!("pgw{tag}c{i}"),
                addr: format!("10.203.0.1{i}"),
            });
            let l = net.links.last().expect("just pushed");
            ip_ok(&["netns", "add", &l.ns]);
            ip_ok(&[
                "link",
                "add",
                &l.host_veth,
                "type",
                "veth",
                "peer",
                "name",
                &l.ns_veth,
            ]);
            ip_ok(&["link", "set", &l.ns_veth, "netns", &l.ns]);
            ip_ok(&[
                "-n",
                &l.ns,
                "addr",
                "add",
                &format!("{}/24", l.addr),
                "dev",
                &l.ns_veth,
            ]);
            ip_ok(&["-n", &l.ns, "link", "set", "lo", "up"]);
            ip_ok(&["-n", &l.ns, "link", "set", &l.ns_veth, "up"]);
            ip_ok(&["link", "set", &l.host_veth, "master", &net.bridge]);
            ip_ok(&["link", "set", &l.host_veth, "up"]);
        }
        net
    }

    /// Member i's address (0-based index).
    pub fn addr(&self, i: usize) -> &str {
        &self.links[i].addr
    }

    pub fn ns(&self, i: usize) -> &str {
        &self.links[i].ns
    }

    /// Cuts member i off: nothing reaches it and nothing leaves it.
    pub fn cut(&self, i: usize) {
        ip_ok(&["link", "set", &self.links[i].host_veth, "down"]);
    }

    pub fn heal(&self, i: usize) {
        ip_ok(&["link", "set", &self.links[i].host_veth, "up"]);
    }

    /// `program` run inside member i's namespace.
    pub fn command(&self, i: usize, program: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.links[i].ns, program]);
        cmd
    }

    /// The same, for async code (killed if the future is dropped).
    pub fn async_command(&self, i: usize, program: &str) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new("ip");
        cmd.args(["netns", "exec", &self.links[i].ns, program])
            .stdin(Stdio::null())
            .kill_on_drop(true);
        cmd
    }

    /// Runs `sql` on member i's PostgreSQL with psql from inside its
    /// namespace (so it works while the member is cut off). The trimmed
    /// output, or None if psql failed (not running, refusing, timed out).
    pub async fn psql(&self, i: usize, sql: &str) -> Option<String> {
        let conninfo = format!(
            "host={} port={PG_PORT} user=postgres password={SUPERUSER_PASSWORD} dbname=postgres connect_timeout=2",
            self.addr(i)
        );
        let run = self
            .async_command(i, "/usr/bin/psql")
            .args([conninfo.as_str(), "-X", "-Atc", sql])
            .output();
        let out = tokio::time::timeout(Duration::from_secs(3), run)
            .await
            .ok()?
            .ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// Whether member i's PostgreSQL takes writes (runs, not in recovery),
    /// asked from inside its namespace.
    pub async fn accepts_writes_inside(&self, i: usize) -> bool {
        self.psql(i, "SELECT pg_is_in_recovery()").await.as_deref() == Some("f")
    }

    /// HTTP status of `GET path` on member i's API, asked from inside its
    /// namespace with bash's /dev/tcp (0 when it did not answer).
    pub async fn http_status_inside(&self, i: usize, path: &str) -> u16 {
        let script = format!(
            "exec 3<>/dev/tcp/{}/{API_PORT} && printf 'GET {path} HTTP/1.0\\r\\n\\r\\n' >&3 && head -1 <&3",
            self.addr(i)
        );
        let run = self
            .async_command(i, "timeout")
            .args(["2", "bash", "-c", &script])
            .output();
        let Ok(Ok(out)) = tokio::time::timeout(Duration::from_secs(3), run).await else {
            return 0;
        };
        // "HTTP/1.1 503 Service Unavailable"
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0)
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for l in &self.links {
            kill_ns_processes(&l.ns);
            // Deleting one end deletes the pair, even if the namespace
            // lingers.
            let _ = ip(&["link", "del", &l.host_veth]);
            if let Err(e) = ip(&["netns", "del", &l.ns]) {
                eprintln!("netns harness: {e}");
            }
        }
        if let Err(e) = ip(&["link", "del", &self.bridge]) {
            eprintln!("netns harness: {e}");
        }
    }
}

/// A TCP connection to `addr` succeeds within `within`.
pub fn wait_tcp(addr: &str, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    let addr: std::net::SocketAddr = addr.parse().expect("socket address");
    while Instant::now() < deadline {
        if std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(500)).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

pub struct NetMember {
    pub name: String,
    pub dir: PathBuf,
    pub config: PathBuf,
    /// Its address on the bridge, the same inside its namespace.
    pub ip: String,
    agent: Option<Child>,
}

impl NetMember {
    pub fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }

    /// URL of `path` on its API, over the bridge.
    pub fn api(&self, path: &str) -> String {
        format!("http://{}:{API_PORT}{path}", self.ip)
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.join("agent.log")
    }
}

/// etcd in the root namespace and one agent per namespace.
pub struct NetCluster {
    pub members: Vec<NetMember>,
    etcd: Option<Child>,
    pub etcd_url: String,
    pub ttl: u64,
    pub net: Net,
    // Last: removed once every process is gone.
    pub root: tempfile::TempDir,
}

impl NetCluster {
    /// Starts etcd and `n` agents, each in its namespace.
    pub fn start(n: usize, ttl: u64, loop_wait: u64, retry_timeout: u64) -> NetCluster {
        let net = Net::new(n);
        let root = temp_dir("pgwarden-netns-");
        let port = free_port();
        let peer = free_port();
        let url = format!("http://{BRIDGE_IP}:{port}");
        let peer_url = format!("http://{BRIDGE_IP}:{peer}");
        let log = File::create(root.path().join("etcd.log")).expect("etcd log");
        let err = log.try_clone().expect("etcd log clone");
        let etcd = Command::new("etcd")
            .args(["--name", "t", "--data-dir"])
            .arg(root.path().join("etcd"))
            .args(["--listen-client-urls", &url])
            .args(["--advertise-client-urls", &url])
            .args(["--listen-peer-urls", &peer_url])
            .args(["--initial-advertise-peer-urls", &peer_url])
            .args(["--initial-cluster", &format!("t={peer_url}")])
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start etcd: {e}"));
        let mut c = NetCluster {
            members: Vec::new(),
            etcd: Some(etcd),
            etcd_url: url,
            ttl,
            net,
            root,
        };
        assert!(
            wait_tcp(&format!("{BRIDGE_IP}:{port}"), Duration::from_secs(20)),
            "etcd did not listen on {BRIDGE_IP}:{port}"
        );
        for i in 0..n {
            let name = format!("node{}", i + 1);
            let dir = c.root.path().join(&name);
            std::fs::create_dir_all(&dir).expect("member dir");
            set_mode(&dir, 0o755);
            let ip = c.net.addr(i).to_string();
            let config = dir.join("pgwarden.toml");
            // Namespaces share the filesystem: with every member on port
            // 5432, their Unix sockets would clash. Nothing needs them.
            let text = format!(
                r#"scope = "it"
name = "{name}"

[etcd]
endpoints = ["{etcd}"]

[api]
listen = "{ip}:{API_PORT}"

[postgresql]
data_dir = "{data}"
listen = "{ip}:{PG_PORT}"
parameters = {{ unix_socket_directories = "" }}

[postgresql.authentication.superuser]
username = "postgres"
password = "{SUPERUSER_PASSWORD}"

[postgresql.authentication.replication]
username = "replicator"
password = "repl-pw"

[bootstrap.dcs]
ttl = {ttl}
loop_wait = {loop_wait}
retry_timeout = {retry_timeout}
"#,
                etcd = c.etcd_url,
                data = dir.join("data").display(),
            );
            std::fs::write(&config, text).expect("write config");
            c.members.push(NetMember {
                name,
                dir,
                config,
                ip,
                agent: None,
            });
        }
        for i in 0..n {
            c.start_agent(i);
        }
        c
    }

    /// `ip netns exec <ns> pgwarden agent -c <config>`; `ip` execs the agent
    /// in place, so the child's PID is the agent's.
    pub fn start_agent(&mut self, i: usize) {
        let m = &self.members[i];
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(m.log_path())
            .expect("agent log");
        let err = log.try_clone().expect("log clone");
        let child = self
            .net
            .command(i, pgwarden_bin())
            .args(["agent", "-c"])
            .arg(&m.config)
            .arg("--log-level=debug")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .spawn()
            .expect("start agent");
        self.members[i].agent = Some(child);
        let api = format!("{}:{API_PORT}", self.members[i].ip);
        assert!(
            wait_tcp(&api, Duration::from_secs(20)),
            "agent {} did not open its API; log:\n{}",
            self.members[i].name,
            self.agent_log(i)
        );
    }

    pub fn agent_log(&self, i: usize) -> String {
        std::fs::read_to_string(self.members[i].log_path()).unwrap_or_default()
    }

    /// The last `n` lines of member i's log without DEBUG entries (nor
    /// their continuation lines, e.g. multi-line SQL); a message repeated
    /// on consecutive lines is shown once with its count.
    pub fn log_tail(&self, i: usize, n: usize) -> String {
        let log = self.agent_log(i);
        let mut debug = false;
        let mut lines: Vec<(String, usize)> = Vec::new();
        for l in log.lines() {
            if l.starts_with(|c: char| c.is_ascii_digit()) {
                debug = l.contains(" DEBUG ");
            }
            if debug {
                continue;
            }
            // "2026-01-01T00:00:00.000000Z  WARN text": compare the text.
            let text = |l: &str| l.split_once(' ').map_or(l, |(_, t)| t).to_string();
            match lines.last_mut() {
                Some((last, count)) if text(last) == text(l) => *count += 1,
                _ => lines.push((l.to_string(), 1)),
            }
        }
        lines[lines.len().saturating_sub(n)..]
            .iter()
            .map(|(l, count)| match count {
                1 => l.clone(),
                _ => format!("{l}   [and {} more times]", count - 1),
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// The last `n` lines of member i's newest PostgreSQL log file.
    pub fn pg_log_tail(&self, i: usize, n: usize) -> String {
        let dir = self.members[i].data_dir().join("log");
        let newest = std::fs::read_dir(&dir)
            .into_iter()
            .flatten()
            .flatten()
            .max_by_key(|e| e.metadata().and_then(|m| m.modified()).ok());
        let Some(text) = newest.and_then(|e| std::fs::read_to_string(e.path()).ok()) else {
            return String::new();
        };
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    pub fn postmaster_pid(&self, i: usize) -> Option<i32> {
        let text =
            std::fs::read_to_string(self.members[i].data_dir().join("postmaster.pid")).ok()?;
        let pid: i32 = text.lines().next()?.trim().parse().ok()?;
        kill(Pid::from_raw(pid), None).ok()?;
        Some(pid)
    }

    fn stop_agents(&mut self) {
        for m in &self.members {
            if let Some(c) = &m.agent {
                let _ = kill(Pid::from_raw(c.id() as i32), Signal::SIGTERM);
            }
        }
        for m in &mut self.members {
            if let Some(mut c) = m.agent.take() {
                let deadline = Instant::now() + Duration::from_secs(30);
                while Instant::now() < deadline {
                    if let Ok(Some(_)) = c.try_wait() {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

impl Drop for NetCluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for i in 0..self.members.len() {
                eprintln!(
                    "--- {} ({}) agent log (last lines) ---\n{}\n--- {} PostgreSQL log (last lines) ---\n{}",
                    self.members[i].name,
                    self.members[i].ip,
                    self.log_tail(i, 40),
                    self.members[i].name,
                    self.pg_log_tail(i, 8)
                );
            }
            // The whole logs outlive the temporary directory.
            let keep =
                std::env::temp_dir().join(format!("pgwarden-netns-failed-{}", self.net.bridge));
            if std::fs::create_dir_all(&keep).is_ok() {
                for m in &self.members {
                    let _ = std::fs::copy(m.log_path(), keep.join(format!("{}.log", m.name)));
                }
                let _ = std::fs::copy(self.root.path().join("etcd.log"), keep.join("etcd.log"));
                eprintln!("full logs kept in {}", keep.display());
            }
        }
        // Whole links let every agent shut down cleanly with etcd.
        for i in 0..self.net.links.len() {
            let _ = ip(&["link", "set", &self.net.links[i].host_veth, "up"]);
        }
        self.stop_agents();
        for i in 0..self.members.len() {
            if self.postmaster_pid(i).is_some() {
                let mut cmd = Command::new(pg_bin_dir().join("pg_ctl"));
                cmd.args(["stop", "-m", "immediate", "-w", "-D"])
                    .arg(self.members[i].data_dir())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null());
                as_postgres(&mut cmd);
                let _ = cmd.status();
            }
        }
        if let Some(mut e) = self.etcd.take() {
            let _ = e.kill();
            let _ = e.wait();
        }
        // `net` drops next: it kills anything still inside the namespaces
        // and removes them, the veths and the bridge.
    }
}
