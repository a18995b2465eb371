//! Test harness: real etcd, pgwarden agents (each with its real PostgreSQL)
//! and HAProxy as processes on loopback, in temporary directories, on free
//! ports. Everything started is stopped on drop, on failure too.
#![allow(dead_code, unused_imports)]

pub mod cluster;
pub mod faults;
pub mod netns;
pub mod procs;
pub mod relay;

use std::future::Future;
use std::net::TcpListener;
use std::sync::Mutex;
use std::time::{Duration, Instant};

pub use cluster::{Cluster, ClusterOptions, MemberOptions};

static TAKEN: Mutex<Vec<u16>> = Mutex::new(Vec::new());

/// A port nothing listens on now and that this test process has not handed
/// out before.
pub fn free_port() -> u16 {
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .unwrap_or(0);
        if port == 0 {
            continue;
        }
        let mut taken = TAKEN.lock().unwrap_or_else(|p| p.into_inner());
        if !taken.contains(&port) {
            taken.push(port);
            return port;
        }
    }
}

/// A temporary directory the postgres OS user can traverse.
pub fn temp_dir(prefix: &str) -> tempfile::TempDir {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::Builder::new()
        .prefix(prefix)
        .tempdir()
        .expect("create temp dir");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
        .expect("chmod temp dir");
    dir
}

/// Polls `check` until it returns Some, or panics with `what` after `within`.
pub async fn eventually<T, F, Fut>(what: &str, within: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        if Instant::now() > deadline {
            panic!("timed out after {within:?} waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

pub fn pgwarden_bin() -> &'static str {
    env!("CARGO_BIN_EXE_pgwarden")
}

pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// One SQL connection (no TLS) with a short timeout.
pub async fn sql(
    port: u16,
    password: &str,
) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let conninfo = format!(
        "host=127.0.0.1 port={port} user=postgres password={password} dbname=postgres connect_timeout=3"
    );
    let (client, conn) = tokio_postgres::connect(&conninfo, tokio_postgres::NoTls).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}

/// HTTP status of a request to an agent's API (0 when it did not answer).
pub async fn http_status(method: &str, url: &str) -> u16 {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(3))
        .build()
        .expect("http client");
    let method = reqwest::Method::from_bytes(method.as_bytes()).expect("method");
    match client.request(method, url).send().await {
        Ok(r) => r.status().as_u16(),
        Err(_) => 0,
    }
}

pub async fn http_json(url: &str) -> Option<serde_json::Value> {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(3))
        .build()
        .ok()?;
    client.get(url).send().await.ok()?.json().await.ok()
}

/// Runs `etcdctl` (API v3) against `endpoints` (comma-separated). None when
/// etcdctl is not installed; callers then do the same through the client
/// library.
pub fn etcdctl(endpoints: &str, args: &[&str]) -> Option<std::process::Output> {
    let out = std::process::Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .arg(format!("--endpoints={endpoints}"))
        .args(args)
        .output();
    match out {
        Ok(out) => Some(out),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => panic!("cannot run etcdctl: {e}"),
    }
}
