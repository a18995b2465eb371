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
}

impl Etcd {
    pub fn start(dir: &Path) -> Etcd {
        let port = free_port();
        let peer = free_port();
        let url = format!("http://127.0.0.1:{port}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let data = dir.join("etcd");
        let args: Vec<String> = [
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
        .collect();
        let child = spawn_logged("etcd", &args, &dir.join("etcd.log"));
        assert!(
            wait_port(port, Duration::from_secs(20)),
            "etcd did not listen on {port}"
        );
        Etcd {
            child,
            port,
            dir: data,
        }
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
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
        let args = vec![
            "-db".to_string(),
            "-f".to_string(),
            cfg.to_string_lossy().to_string(),
        ];
        let child = spawn_logged("haproxy", &args, log);
        assert!(
            wait_port(port, Duration::from_secs(10)),
            "haproxy did not listen on {port}"
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
