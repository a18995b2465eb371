use super::procs::{wait_addr, wait_port, Etcd, Haproxy};
use super::relay::Relay;
use super::{eventually, free_port, http_status, pgwarden_bin, temp_dir};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub const SUPERUSER_PASSWORD: &str = "test-super-pw";

#[derive(Clone, Default)]
pub struct MemberOptions {
    /// Extra TOML lines appended to the member's config.
    pub extra: String,
    /// Extra lines inside [postgresql] (e.g. parameters).
    pub pg_extra: String,
    /// The member's name (default `node<N>`, N from 1).
    pub name: Option<String>,
    /// Address its PostgreSQL and API bind to (default 127.0.0.1). Members
    /// given the same address model instances on one host.
    pub host: Option<String>,
    /// Extra lines inside [api] (e.g. `username = "..."` and `password`).
    pub api_extra: String,
    /// The agent's open-file limit (soft, hard), as systemd's
    /// `LimitNOFILE=` would set it; None: the test process's.
    pub nofile: Option<(u64, u64)>,
    /// Put the data directory on a tmpfs of this many MiB of its own
    /// (mounted at `<member dir>/fs`, the data directory and the clone's
    /// staging directory inside it), to fill it up. Needs root; unmounted
    /// when the cluster is dropped, on failure too.
    pub tmpfs_mib: Option<u64>,
}

#[derive(Clone)]
pub struct ClusterOptions {
    pub members: Vec<MemberOptions>,
    pub ttl: u64,
    pub loop_wait: u64,
    pub retry_timeout: u64,
    /// More lines for `[bootstrap.dcs]` (e.g. `failsafe_mode = true`).
    pub dcs_extra: String,
    /// How many agents `Cluster::start` starts (the rest are started by the
    /// test, e.g. after the first has bootstrapped).
    pub autostart: usize,
    /// One etcd member per address (a real cluster: e1, e2... with their
    /// URLs on these addresses). Empty: one etcd on 127.0.0.1.
    pub etcd_hosts: Vec<String>,
    /// Address HAProxy's frontends bind to (default 127.0.0.1).
    pub haproxy_host: Option<String>,
    /// Agents reach the (single) etcd through a relay the test can block
    /// (`Cluster::relay`).
    pub etcd_relay: bool,
}

impl ClusterOptions {
    pub fn new(n: usize) -> Self {
        ClusterOptions {
            members: vec![MemberOptions::default(); n],
            ttl: 10,
            loop_wait: 1,
            retry_timeout: 4,
            dcs_extra: String::new(),
            autostart: n,
            etcd_hosts: Vec::new(),
            haproxy_host: None,
            etcd_relay: false,
        }
    }
}

pub struct Member {
    pub name: String,
    pub dir: PathBuf,
    pub config: PathBuf,
    pub pg_port: u16,
    pub api_port: u16,
    /// Address PostgreSQL and the API listen on.
    pub host: String,
    /// The agent's open-file limit (soft, hard), when set.
    pub nofile: Option<(u64, u64)>,
    /// The tmpfs the data directory lives on, if it has its own.
    pub tmpfs: Option<Tmpfs>,
    agent: Option<Child>,
}

impl Member {
    pub fn data_dir(&self) -> PathBuf {
        match &self.tmpfs {
            Some(fs) => fs.path.join("data"),
            None => self.dir.join("data"),
        }
    }
    pub fn api(&self, path: &str) -> String {
        format!("http://{}:{}{path}", self.host, self.api_port)
    }
}

pub struct Cluster {
    pub etcd: Etcd,
    /// The other members of a multi-member etcd (`etcd` is e1); empty
    /// with the default single etcd.
    pub etcd_peers: Vec<Etcd>,
    /// Address HAProxy's frontends bind to.
    pub haproxy_host: String,
    pub members: Vec<Member>,
    pub scope: String,
    pub haproxy: Option<Haproxy>,
    pub rw_port: u16,
    pub ro_port: u16,
    pub stats_port: u16,
    /// The relay the agents reach etcd through (`etcd_relay`).
    pub relay: Option<Relay>,
    // Last so it is removed after every process is gone.
    pub root: tempfile::TempDir,
}

impl Cluster {
    /// Starts etcd and one agent per member (agents bootstrap PostgreSQL).
    pub fn start(opts: &ClusterOptions) -> Cluster {
        let root = temp_dir("pgwarden-it-");
        let (etcd, etcd_peers) = if opts.etcd_hosts.is_empty() {
            (Etcd::start(root.path()), Vec::new())
        } else {
            let mut all = Etcd::start_cluster(root.path(), &opts.etcd_hosts);
            let first = all.remove(0);
            (first, all)
        };
        let relay = opts
            .etcd_relay
            .then(|| Relay::start(format!("{}:{}", etcd.host, etcd.port)));
        let endpoints = match &relay {
            Some(r) => format!("\"{}\"", r.endpoint()),
            None => std::iter::once(&etcd)
                .chain(&etcd_peers)
                .map(|e| format!("\"{}\"", e.endpoint()))
                .collect::<Vec<_>>()
                .join(", "),
        };
        let scope = "it".to_string();
        let mut members = Vec::new();
        for (i, m) in opts.members.iter().enumerate() {
            let name = m.name.clone().unwrap_or_else(|| format!("node{}", i + 1));
            let host = m.host.clone().unwrap_or_else(|| "127.0.0.1".to_string());
            let dir = root.path().join(&name);
            std::fs::create_dir_all(&dir).expect("member dir");
            set_mode(&dir, 0o755);
            let tmpfs = m.tmpfs_mib.map(|mib| Tmpfs::mount(&dir.join("fs"), mib));
            let data = match &tmpfs {
                Some(fs) => fs.path.join("data"),
                None => dir.join("data"),
            };
            let pg_port = free_port();
            let api_port = free_port();
            let config = dir.join("pgwarden.toml");
            let text = format!(
                r#"scope = "{scope}"
name = "{name}"
{extra}
[etcd]
endpoints = [{endpoints}]

[api]
listen = "{host}:{api_port}"
{api_extra}

[postgresql]
data_dir = "{data}"
listen = "{host}:{pg_port}"
{pg_extra}
[postgresql.authentication.superuser]
username = "postgres"
password = "{SUPERUSER_PASSWORD}"

[postgresql.authentication.replication]
username = "replicator"
password = "repl-pw"

[bootstrap.dcs]
ttl = {ttl}
loop_wait = {loop_wait}
retry_timeout = {retry}
{dcs_extra}
"#,
                extra = m.extra,
                api_extra = m.api_extra,
                pg_extra = m.pg_extra,
                data = data.display(),
                ttl = opts.ttl,
                loop_wait = opts.loop_wait,
                retry = opts.retry_timeout,
                dcs_extra = opts.dcs_extra,
            );
            std::fs::write(&config, text).expect("write config");
            members.push(Member {
                name,
                dir,
                config,
                pg_port,
                api_port,
                host,
                nofile: m.nofile,
                tmpfs,
                agent: None,
            });
        }
        let mut c = Cluster {
            etcd,
            etcd_peers,
            haproxy_host: opts
                .haproxy_host
                .clone()
                .unwrap_or_else(|| "127.0.0.1".to_string()),
            members,
            scope,
            haproxy: None,
            rw_port: free_port(),
            ro_port: free_port(),
            stats_port: free_port(),
            relay,
            root,
        };
        for i in 0..opts.autostart.min(c.members.len()) {
            c.start_agent(i);
        }
        c
    }

    pub fn start_agent(&mut self, i: usize) {
        let m = &self.members[i];
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(m.dir.join("agent.log"))
            .expect("agent log");
        let err = log.try_clone().expect("log clone");
        // prlimit(1) sets the limits and execs the agent: same PID.
        let mut cmd = match m.nofile {
            Some((soft, hard)) => {
                let mut c = Command::new("prlimit");
                c.arg(format!("--nofile={soft}:{hard}"))
                    .arg("--")
                    .arg(pgwarden_bin());
                c
            }
            None => Command::new(pgwarden_bin()),
        };
        let m = &mut self.members[i];
        let child = cmd
            .args(["agent", "-c"])
            .arg(&m.config)
            .arg("--log-level=info,pgwarden=debug")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .spawn()
            .expect("start agent");
        m.agent = Some(child);
        let port = m.api_port;
        let host = m.host.clone();
        assert!(
            wait_addr(&host, port, Duration::from_secs(20)),
            "agent {} did not open its API; log:\n{}",
            self.members[i].name,
            self.agent_log(i)
        );
    }

    pub fn agent_log(&self, i: usize) -> String {
        std::fs::read_to_string(self.members[i].dir.join("agent.log")).unwrap_or_default()
    }

    pub fn agent_pid(&self, i: usize) -> Option<u32> {
        self.members[i].agent.as_ref().map(|c| c.id())
    }

    pub fn kill9_agent(&mut self, i: usize) {
        if let Some(mut c) = self.members[i].agent.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Sends `signal` to the agent process (SIGSTOP: a hung agent).
    pub fn signal_agent(&self, i: usize, signal: nix::sys::signal::Signal) {
        let pid = self.agent_pid(i).expect("agent running");
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), signal)
            .expect("signal the agent");
    }

    /// SIGTERM and wait for the agent to exit; returns its exit status.
    pub fn sigterm_agent(&mut self, i: usize) -> Option<std::process::ExitStatus> {
        let mut c = self.members[i].agent.take()?;
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(c.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        c.wait().ok()
    }

    pub fn postmaster_pid(&self, i: usize) -> Option<i32> {
        let text =
            std::fs::read_to_string(self.members[i].data_dir().join("postmaster.pid")).ok()?;
        let pid: i32 = text.lines().next()?.trim().parse().ok()?;
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).ok()?;
        Some(pid)
    }

    pub fn index_of(&self, name: &str) -> usize {
        self.members
            .iter()
            .position(|m| m.name == name)
            .expect("member name")
    }

    /// The member answering 200 on /primary, once exactly one does.
    pub async fn wait_single_primary(&self, within: Duration) -> usize {
        eventually(
            "exactly one member answering 200 on /primary",
            within,
            || async {
                let mut primaries = Vec::new();
                for (i, m) in self.members.iter().enumerate() {
                    if http_status("GET", &m.api("/primary")).await == 200 {
                        primaries.push(i);
                    }
                }
                (primaries.len() == 1).then(|| primaries[0])
            },
        )
        .await
    }

    /// Waits for one primary and every other member answering 200 on
    /// /replica, then starts HAProxy. Returns the primary's index.
    pub async fn ready_with_haproxy(&mut self) -> usize {
        let primary = self.wait_single_primary(Duration::from_secs(120)).await;
        for i in 0..self.members.len() {
            if i == primary {
                continue;
            }
            let url = self.members[i].api("/replica");
            eventually(
                &format!("{} streaming", self.members[i].name),
                Duration::from_secs(120),
                || {
                    let url = url.clone();
                    async move { (http_status("GET", &url).await == 200).then_some(()) }
                },
            )
            .await;
        }
        self.start_haproxy();
        primary
    }

    /// The invariant monitor over every member. Its writability probe
    /// connects to 127.0.0.1, so with members on other addresses only the
    /// /primary half of the check is effective.
    pub fn monitor(&self) -> super::faults::Monitor {
        super::faults::Monitor::start(
            self.members
                .iter()
                .map(|m| (m.name.clone(), m.api("/primary"), m.host.clone(), m.pg_port))
                .collect(),
        )
    }

    pub fn kill9_postgres(&self, i: usize) {
        if let Some(pid) = self.postmaster_pid(i) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }

    /// The whole "server" of member i dies: agent and PostgreSQL, kill -9.
    pub fn kill9_server(&mut self, i: usize) {
        let pid = self.postmaster_pid(i);
        self.kill9_agent(i);
        if let Some(pid) = pid {
            // The postmaster's children die with it, as on a host crash.
            let children = children_of(pid);
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
            for c in children {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(c),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }

    /// Every etcd member: `etcd` first, then `etcd_peers`.
    pub fn etcd_members(&self) -> Vec<&Etcd> {
        std::iter::once(&self.etcd)
            .chain(&self.etcd_peers)
            .collect()
    }

    /// Client URLs of the etcd members still running.
    pub fn etcd_endpoints(&self) -> Vec<String> {
        self.etcd_members()
            .into_iter()
            .filter(|e| e.running)
            .map(|e| e.endpoint())
            .collect()
    }

    /// A key's value read through any running etcd member (None: absent or
    /// etcd did not answer).
    pub async fn dcs_get(&self, key: &str) -> Option<String> {
        let opts = etcd_client::ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(2))
            .with_timeout(Duration::from_secs(3));
        let mut c = etcd_client::Client::connect(self.etcd_endpoints(), Some(opts))
            .await
            .ok()?;
        let resp = c.get(key, None).await.ok()?;
        resp.kvs()
            .first()
            .map(|kv| String::from_utf8_lossy(kv.value()).to_string())
    }

    /// Indexes of the members whose address is `host`.
    pub fn members_on(&self, host: &str) -> Vec<usize> {
        (0..self.members.len())
            .filter(|i| self.members[*i].host == host)
            .collect()
    }

    /// A whole host dies at one instant: every agent and PostgreSQL instance
    /// (postmaster and all its children) of the members on `host`, and the
    /// etcd member on that address, kill -9. Everything is SIGSTOPped first
    /// so no process forks or acts while the others are being killed, then
    /// all are SIGKILLed in one sweep.
    pub fn kill9_host(&mut self, host: &str) {
        use nix::sys::signal::{kill, Signal};
        use nix::unistd::Pid;
        let on_host = self.members_on(host);
        let mut roots: Vec<i32> = Vec::new();
        for i in &on_host {
            if let Some(pid) = self.agent_pid(*i) {
                roots.push(pid as i32);
            }
            if let Some(pid) = self.postmaster_pid(*i) {
                roots.push(pid);
            }
        }
        for e in std::iter::once(&self.etcd).chain(&self.etcd_peers) {
            if e.host == host {
                if let Some(pid) = e.pid() {
                    roots.push(pid as i32);
                }
            }
        }
        for pid in &roots {
            let _ = kill(Pid::from_raw(*pid), Signal::SIGSTOP);
        }
        // Stopped parents fork no more: their children are a fixed set now
        // (the agents' too: pg_ctl, pg_basebackup, pg_rewind in flight).
        let mut all = roots.clone();
        let mut i = 0;
        while i < all.len() {
            for c in children_of(all[i]) {
                if !all.contains(&c) {
                    all.push(c);
                }
            }
            i += 1;
        }
        for pid in &all {
            let _ = kill(Pid::from_raw(*pid), Signal::SIGKILL);
        }
        // Reap what we own.
        for i in on_host {
            self.kill9_agent(i);
        }
        for e in std::iter::once(&mut self.etcd).chain(self.etcd_peers.iter_mut()) {
            if e.host == host && e.running {
                e.kill9();
            }
        }
    }

    /// One SQL connection to member i's PostgreSQL, on its own address.
    pub async fn sql(&self, i: usize) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
        sql_at(
            &self.members[i].host,
            self.members[i].pg_port,
            SUPERUSER_PASSWORD,
        )
        .await
    }

    /// The timeline member i's PostgreSQL runs on (None: no answer).
    pub async fn timeline(&self, i: usize) -> Option<i32> {
        let client = self.sql(i).await.ok()?;
        let row = client
            .query_one("SELECT timeline_id FROM pg_control_checkpoint()", &[])
            .await
            .ok()?;
        Some(row.get(0))
    }

    /// Row count of `table` on member i.
    pub async fn count(&self, i: usize, table: &str) -> Option<i64> {
        let c = self.sql(i).await.ok()?;
        let row = c
            .query_one(&format!("SELECT count(*) FROM {table}"), &[])
            .await
            .ok()?;
        Some(row.get(0))
    }

    /// Runs `pgwarden <args>` with this member's config; returns stdout.
    pub fn cli(&self, i: usize, args: &[&str]) -> std::process::Output {
        Command::new(pgwarden_bin())
            .arg("-c")
            .arg(&self.members[i].config)
            .args(args)
            .output()
            .expect("run pgwarden")
    }

    /// Renders the HAProxy config with `pgwarden haproxy-config`, checks it
    /// with `haproxy -c`, and starts HAProxy on it.
    pub fn start_haproxy(&mut self) -> PathBuf {
        let cfg = self.root.path().join("haproxy.cfg");
        let out = self.cli(
            0,
            &[
                "haproxy-config",
                "--bind",
                &self.haproxy_host,
                "--rw-port",
                &self.rw_port.to_string(),
                "--ro-port",
                &self.ro_port.to_string(),
                "--stats-port",
                &self.stats_port.to_string(),
                "--output",
                &cfg.to_string_lossy(),
            ],
        );
        assert!(
            out.status.success(),
            "haproxy-config failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let check = Command::new("haproxy")
            .arg("-c")
            .arg("-f")
            .arg(&cfg)
            .output()
            .expect("haproxy -c");
        assert!(
            check.status.success(),
            "haproxy -c rejected the rendered config: {}{}",
            String::from_utf8_lossy(&check.stdout),
            String::from_utf8_lossy(&check.stderr)
        );
        self.haproxy = Some(Haproxy::start_at(
            &cfg,
            &self.root.path().join("haproxy.log"),
            &self.haproxy_host,
            self.rw_port,
        ));
        cfg
    }

    /// Stops a member's PostgreSQL behind its agent's back (the agent is
    /// expected to be gone or to react).
    pub fn pg_ctl(&self, i: usize, args: &[&str]) -> std::process::Output {
        let mut cmd = Command::new(pg_bin_dir().join("pg_ctl"));
        cmd.args(args).arg("-D").arg(self.members[i].data_dir());
        as_postgres(&mut cmd);
        cmd.output().expect("pg_ctl")
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // The agents' own words are the best clue to a failed test.
            for (i, m) in self.members.iter().enumerate() {
                let log = self.agent_log(i);
                let tail: Vec<&str> = log.lines().filter(|l| !l.contains("DEBUG")).collect();
                let from = tail.len().saturating_sub(25);
                eprintln!(
                    "--- {} agent log (last lines) ---\n{}",
                    m.name,
                    tail[from..].join("\n")
                );
            }
            // A multi-member etcd logs to etcd-<name>.log under the root.
            if !self.etcd_peers.is_empty() {
                for e in std::iter::once(&self.etcd).chain(&self.etcd_peers) {
                    let log = std::fs::read_to_string(
                        self.root.path().join(format!("etcd-{}.log", e.name)),
                    )
                    .unwrap_or_default();
                    let lines: Vec<&str> = log.lines().collect();
                    let from = lines.len().saturating_sub(8);
                    eprintln!(
                        "--- etcd {} ({}) log (last lines) ---\n{}",
                        e.name,
                        e.host,
                        lines[from..].join("\n")
                    );
                }
            }
        }
        for m in &self.members {
            if let Some(c) = &m.agent {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(c.id() as i32),
                    nix::sys::signal::Signal::SIGTERM,
                );
            }
        }
        for m in &mut self.members {
            if let Some(mut c) = m.agent.take() {
                let deadline = std::time::Instant::now() + Duration::from_secs(30);
                while std::time::Instant::now() < deadline {
                    if let Ok(Some(_)) = c.try_wait() {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        // Whatever PostgreSQL is still up (an agent was killed -9 in the
        // test) is stopped here, so no process outlives the test.
        for i in 0..self.members.len() {
            if self.postmaster_pid(i).is_some() {
                let _ = self.pg_ctl(i, &["stop", "-m", "immediate", "-w"]);
            }
        }
    }
}

/// A tmpfs mounted for one member's data directory, unmounted on drop (the
/// cluster drops its members after stopping every process).
pub struct Tmpfs {
    pub path: PathBuf,
}

impl Tmpfs {
    fn mount(path: &Path, mib: u64) -> Tmpfs {
        assert!(super::is_root(), "mounting a tmpfs needs root");
        std::fs::create_dir_all(path).expect("tmpfs mount point");
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o"])
            .arg(format!("size={mib}m,mode=0755"))
            .arg("pgwarden-test")
            .arg(path)
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "mount tmpfs on {}: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs {
            path: path.to_path_buf(),
        }
    }

    /// Fills the file system to the last byte with a file `name` (root
    /// writes past any reserve; a tmpfs has none) and returns its path.
    pub fn fill(&self, name: &str) -> PathBuf {
        use std::io::Write;
        let path = self.path.join(name);
        let mut f = std::fs::File::create(&path).expect("create filler");
        let chunk = vec![0u8; 1 << 20];
        loop {
            match f.write(&chunk) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
                Err(e) => panic!("filling {}: {e}", path.display()),
            }
        }
        // What is left is smaller than a chunk: fill that too.
        loop {
            match f.write(&[0u8; 512]) {
                Ok(n) if n > 0 => {}
                _ => break,
            }
        }
        path
    }

    /// Bytes available to an unprivileged user (what PostgreSQL gets).
    pub fn available(&self) -> u64 {
        let st = nix::sys::statvfs::statvfs(&self.path).expect("statvfs");
        st.blocks_available() as u64 * st.fragment_size() as u64
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let plain = Command::new("umount").arg(&self.path).output();
        if !plain.is_ok_and(|o| o.status.success()) {
            // Something still has a file or its working directory there (a
            // postmaster a failed test left behind): detach it anyway so no
            // mount outlives the test.
            let _ = Command::new("umount").arg("-l").arg(&self.path).output();
        }
    }
}

/// One SQL connection (no TLS, short timeout) to `host:port` as postgres.
pub async fn sql_at(
    host: &str,
    port: u16,
    password: &str,
) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let conninfo = format!(
        "host={host} port={port} user=postgres password={password} dbname=postgres connect_timeout=3"
    );
    let (client, conn) = tokio_postgres::connect(&conninfo, tokio_postgres::NoTls).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}

pub fn pg_bin_dir() -> PathBuf {
    let mut versions: Vec<u32> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL installed under /usr/lib/postgresql")
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect();
    versions.sort();
    PathBuf::from(format!(
        "/usr/lib/postgresql/{}/bin",
        versions.last().expect("a PostgreSQL version")
    ))
}

/// PostgreSQL refuses to run as root: run its programs as `postgres`.
pub fn as_postgres(cmd: &mut Command) {
    if super::is_root() {
        let user = nix::unistd::User::from_name("postgres")
            .ok()
            .flatten()
            .expect("postgres OS user");
        cmd.uid(user.uid.as_raw()).gid(user.gid.as_raw());
    }
}

pub fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

/// PIDs whose parent is `pid` (from /proc).
pub fn children_of(pid: i32) -> Vec<i32> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(child) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // "pid (comm) state ppid ...": comm may contain spaces; split after ')'.
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<i32>().ok());
        if ppid == Some(pid) {
            out.push(child);
        }
    }
    out
}
