use super::free_port;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn spawn_logged(program: &str, args: &[String], log: &Path) -> Child {
    let out = std::fs::File::create(log).expect("create log file");
    let err = out.try_clone().expect("clone log file");
    Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .unwrap_or_else(|e| {
            panic!("cannot start {program}: {e} (is it installed? .ci/run installs it)")
        })
}

/// Waits until something accepts TCP connections on `host:port`.
pub fn wait_addr(host: &str, port: u16, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if std::net::TcpStream::connect((host, port)).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

/// Body of a plain HTTP/1.0 GET (no client library: usable from sync code),
/// None when nothing answered or the status was not 200.
pub fn http_get_blocking(host: &str, port: u16, path: &str) -> Option<String> {
    use std::io::{Read, Write};
    let addr: std::net::SocketAddr = format!("{host}:{port}").parse().ok()?;
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n").ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let (head, body) = text.split_once("\r\n\r\n")?;
    (head.split_whitespace().nth(1) == Some("200")).then(|| body.to_string())
}

pub fn wait_port(port: u16, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

/// A single-node etcd on loopback.
pub struct Etcd {
    child: Child,
    pub port: u16,
    pub dir: PathBuf,
    /// Address its client and peer URLs bind to (127.0.0.1 unless started
    /// by `start_cluster`).
    pub host: String,
    /// `--name` of this member.
    pub name: String,
    pub peer_port: u16,
    /// False once `kill9` ran.
    pub running: bool,
}

/// A single-member etcd on 127.0.0.1 named `t`.
fn single_args(data: &Path, port: u16, peer: u16) -> Vec<String> {
    let url = format!("http://127.0.0.1:{port}");
    let peer_url = format!("http://127.0.0.1:{peer}");
    [
        "--name",
        "t",
        "--data-dir",
        &data.to_string_lossy(),
        "--listen-client-urls",
        &url,
        "--advertise-client-urls",
        &url,
        "--listen-peer-urls",
        &peer_url,
        "--initial-advertise-peer-urls",
        &peer_url,
        "--initial-cluster",
        &format!("t={peer_url}"),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

impl Etcd {
    pub fn start(dir: &Path) -> Etcd {
        let port = free_port();
        let peer = free_port();
        let data = dir.join("etcd");
        let child = spawn_logged(
            "etcd",
            &single_args(&data, port, peer),
            &dir.join("etcd.log"),
        );
        assert!(
            wait_port(port, Duration::from_secs(20)),
            "etcd did not listen on {port}"
        );
        Etcd {
            child,
            port,
            dir: data,
            host: "127.0.0.1".to_string(),
            name: "t".to_string(),
            peer_port: peer,
            running: true,
        }
    }

    /// A real etcd cluster: one member per address in `hosts`, named e1,
    /// e2..., each with its client and peer URLs on its host's address, one
    /// `--initial-cluster` listing all, `--initial-cluster-state new` and a
    /// shared `--initial-cluster-token`. Returns once every member answers
    /// /health (the cluster has a quorum and a raft leader).
    pub fn start_cluster(dir: &Path, hosts: &[String]) -> Vec<Etcd> {
        assert!(!hosts.is_empty(), "an etcd cluster needs a host");
        let ports: Vec<(u16, u16)> = hosts.iter().map(|_| (free_port(), free_port())).collect();
        let names: Vec<String> = (1..=hosts.len()).map(|i| format!("e{i}")).collect();
        let initial_cluster = names
            .iter()
            .zip(hosts)
            .zip(&ports)
            .map(|((n, h), (_, peer))| format!("{n}=http://{h}:{peer}"))
            .collect::<Vec<_>>()
            .join(",");
        // Unique per cluster so members of two test clusters never join.
        let token = format!(
            "pgwarden-it-{}-{}",
            std::process::id(),
            dir.file_name()
                .map(|n| n.to_string_lossy().to_string())
                .unwrap_or_default()
        );
        // Every member is spawned before any is waited for (none can serve
        // before a quorum is up); each is owned by the Vec at once, so a
        // panic below stops those already started.
        let mut out: Vec<Etcd> = Vec::new();
        for ((name, host), (port, peer)) in names.iter().zip(hosts).zip(&ports) {
            let url = format!("http://{host}:{port}");
            let peer_url = format!("http://{host}:{peer}");
            let data = dir.join(format!("etcd-{name}"));
            let args: Vec<String> = [
                "--name",
                name,
                "--data-dir",
                &data.to_string_lossy(),
                "--listen-client-urls",
                &url,
                "--advertise-client-urls",
                &url,
                "--listen-peer-urls",
                &peer_url,
                "--initial-advertise-peer-urls",
                &peer_url,
                "--initial-cluster",
                &initial_cluster,
                "--initial-cluster-state",
                "new",
                "--initial-cluster-token",
                &token,
            ]
            .iter()
            .map(|s| s.to_string())
            .collect();
            let child = spawn_logged("etcd", &args, &dir.join(format!("etcd-{name}.log")));
            out.push(Etcd {
                child,
                port: *port,
                dir: data,
                host: host.clone(),
                name: name.clone(),
                peer_port: *peer,
                running: true,
            });
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        for e in &out {
            loop {
                let healthy = http_get_blocking(&e.host, e.port, "/health")
                    .is_some_and(|b| b.contains("\"health\":\"true\""));
                if healthy {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "etcd member {} ({}) not healthy within 30 s; log:\n{}",
                    e.name,
                    e.endpoint(),
                    std::fs::read_to_string(dir.join(format!("etcd-{}.log", e.name)))
                        .unwrap_or_default()
                );
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        out
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}:{}", self.host, self.port)
    }

    /// The etcd process's PID while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.running.then(|| self.child.id())
    }

    /// etcd's data lost: kill -9, its data directory removed, started again
    /// empty on the same ports (single etcd from `start` only).
    pub fn restart_empty(&mut self) {
        self.kill9();
        std::fs::remove_dir_all(&self.dir).expect("remove etcd's data");
        self.start_again();
    }

    /// Started again on the same ports and data (after `kill9`).
    pub fn start_again(&mut self) {
        assert_eq!(self.name, "t", "start_again is for the single test etcd");
        let args = single_args(&self.dir, self.port, self.peer_port);
        let log = self.dir.with_file_name("etcd-restarted.log");
        self.child = spawn_logged("etcd", &args, &log);
        self.running = true;
        assert!(
            wait_port(self.port, Duration::from_secs(20)),
            "etcd did not listen again on {}",
            self.port
        );
    }

    /// kill -9 this member (and reap it).
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.running = false;
    }

    /// Keys under a prefix, via etcdctl-free gRPC (the crate's client).
    pub async fn keys(&self, prefix: &str) -> Vec<String> {
        let mut c = etcd_client::Client::connect([self.endpoint()], None)
            .await
            .expect("etcd connect");
        let resp = c
            .get(
                prefix,
                Some(
                    etcd_client::GetOptions::new()
                        .with_prefix()
                        .with_keys_only(),
                ),
            )
            .await
            .expect("etcd get");
        resp.kvs()
            .iter()
            .map(|kv| String::from_utf8_lossy(kv.key()).to_string())
            .collect()
    }

    pub async fn put(&self, key: &str, value: &str) {
        let mut c = etcd_client::Client::connect([self.endpoint()], None)
            .await
            .expect("etcd connect");
        c.put(key, value, None).await.expect("etcd put");
    }

    pub async fn get(&self, key: &str) -> Option<String> {
        let mut c = etcd_client::Client::connect([self.endpoint()], None)
            .await
            .expect("etcd connect");
        let resp = c.get(key, None).await.expect("etcd get");
        resp.kvs()
            .first()
            .map(|kv| String::from_utf8_lossy(kv.value()).to_string())
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub struct Haproxy {
    child: Child,
}

impl Haproxy {
    pub fn start(cfg: &Path, log: &Path, port: u16) -> Haproxy {
        Haproxy::start_at(cfg, log, "127.0.0.1", port)
    }

    /// HAProxy on a config whose frontends bind `host`; returns once `port`
    /// accepts connections there.
    pub fn start_at(cfg: &Path, log: &Path, host: &str, port: u16) -> Haproxy {
        let args = vec![
            "-db".to_string(),
            "-f".to_string(),
            cfg.to_string_lossy().to_string(),
        ];
        let child = spawn_logged("haproxy", &args, log);
        assert!(
            wait_addr(host, port, Duration::from_secs(10)),
            "haproxy did not listen on {host}:{port}"
        );
        Haproxy { child }
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
