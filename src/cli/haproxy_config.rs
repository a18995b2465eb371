//! `pgwarden haproxy-config`: renders HAProxy's config from the members in
//! etcd, once or (with `--watch`) whenever the membership changes.
//!
//! Only membership drives the file; which member is primary is decided by
//! HAProxy's health checks against the agents, so a failover never needs a
//! rewrite or a reload.

use crate::atomic_file::write_atomic;
use crate::config::Config;
use crate::dcs::{Dcs, Keys};
use crate::haproxy::{self, Backend, RenderOptions};
use anyhow::{anyhow, bail, Context};
use std::future::Future;
use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use tokio::signal::unix::{signal, SignalKind};

/// A reload command that hangs must not stop the watcher from following the
/// cluster.
const RELOAD_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest wait between retries of a failing reload command.
const MAX_RELOAD_BACKOFF: Duration = Duration::from_secs(60);

#[derive(clap::Args, Debug, Clone)]
pub struct HaproxyConfigArgs {
    /// Port of the read-write frontend (routes to the primary).
    #[arg(long, value_name = "PORT", default_value_t = 5000)]
    pub rw_port: u16,
    /// Port of the read-only frontend (replicas; the primary when none is up).
    #[arg(long, value_name = "PORT", default_value_t = 5001)]
    pub ro_port: u16,
    /// Port of the HAProxy stats page.
    #[arg(long, value_name = "PORT", default_value_t = 7000)]
    pub stats_port: u16,
    /// Address the frontends and stats page bind to (`*`: all IPv4).
    #[arg(long, value_name = "ADDR", default_value = "*")]
    pub bind: String,
    /// Health-check interval (HAProxy time: 1s, 500ms...).
    #[arg(long, value_name = "TIME", default_value = "1s")]
    pub inter: String,
    /// Failed checks before a server is marked down.
    #[arg(long, value_name = "N", default_value_t = 2)]
    pub fall: u32,
    /// Passed checks before a server is marked up.
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub rise: u32,
    /// HAProxy's global connection limit.
    #[arg(long, value_name = "N", default_value_t = 1000)]
    pub maxconn: u32,
    /// Write a `pidfile` line into the global section.
    #[arg(long, value_name = "FILE")]
    pub pidfile: Option<PathBuf>,
    /// Write an admin-level `stats socket` line into the global section.
    #[arg(long, value_name = "PATH")]
    pub stats_socket: Option<PathBuf>,
    /// Write the config here (atomically) instead of to stdout.
    #[arg(long, value_name = "FILE")]
    pub output: Option<PathBuf>,
    /// Keep running; rewrite the file whenever the member list changes.
    #[arg(long, requires = "output")]
    pub watch: bool,
    /// Shell command run after each rewrite, e.g.
    /// `haproxy -c -f /etc/haproxy/haproxy.cfg && systemctl reload haproxy`.
    #[arg(long, value_name = "CMD", requires = "output")]
    pub reload_cmd: Option<String>,
    /// Seconds between reads of etcd in --watch mode.
    #[arg(long, value_name = "SECS", default_value_t = 2,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub interval: u64,
}

impl HaproxyConfigArgs {
    pub fn render_options(&self) -> RenderOptions {
        RenderOptions {
            bind_address: self.bind.clone(),
            rw_port: self.rw_port,
            ro_port: self.ro_port,
            stats_port: self.stats_port,
            inter: self.inter.clone(),
            fall: self.fall,
            rise: self.rise,
            maxconn: self.maxconn,
            pidfile: self.pidfile.clone(),
            stats_socket: self.stats_socket.clone(),
            check_ssl: false,
        }
    }
}

pub async fn run(cfg: &Config, args: &HaproxyConfigArgs) -> anyhow::Result<()> {
    // Registered before anything else so a signal during the first etcd read
    // is not lost.
    let mut sigint = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut sigterm = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let shutdown = async move {
        tokio::select! {
            _ = sigint.recv() => tracing::info!("SIGINT received, stopping"),
            _ = sigterm.recv() => tracing::info!("SIGTERM received, stopping"),
        }
    };
    run_until(cfg, args, shutdown).await
}

/// `run` with the stop condition supplied by the caller (tests stop it
/// without signals).
pub async fn run_until(
    cfg: &Config,
    args: &HaproxyConfigArgs,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let mut opts = args.render_options();
    opts.check_ssl = cfg.api.tls();
    opts.validate()
        .map_err(|e| anyhow!("haproxy-config: {e}"))?;
    if args.interval == 0 {
        bail!("haproxy-config: --interval must be at least 1 second");
    }
    let mut source = MemberSource::new(cfg);

    let Some(output) = args.output.as_deref() else {
        if args.watch || args.reload_cmd.is_some() {
            bail!("haproxy-config: --watch and --reload-cmd need --output FILE");
        }
        let backends = source.read().await?;
        let text = haproxy::render(&cfg.scope, &backends, &opts);
        let mut stdout = std::io::stdout().lock();
        stdout
            .write_all(text.as_bytes())
            .context("writing to stdout")?;
        stdout.flush().context("writing to stdout")?;
        return Ok(());
    };

    if !args.watch {
        let backends = source.read().await?;
        let text = haproxy::render(&cfg.scope, &backends, &opts);
        write_atomic(output, text.as_bytes())?;
        if let Some(cmd) = &args.reload_cmd {
            run_reload(cmd).await?;
        }
        return Ok(());
    }

    tokio::pin!(shutdown);
    let mut publisher = Publisher::new(output.to_path_buf(), args.reload_cmd.clone());
    let mut last_backends: Option<Vec<Backend>> = None;
    let mut ticker = tokio::time::interval(Duration::from_secs(args.interval));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tracing::info!(output = %output.display(), interval = args.interval, "watching cluster members");
    loop {
        tokio::select! {
            _ = &mut shutdown => return Ok(()),
            _ = ticker.tick() => {}
        }
        let read = tokio::select! {
            _ = &mut shutdown => return Ok(()),
            read = source.read() => read,
        };
        let backends = match read {
            Ok(b) => b,
            Err(e) => {
                // Keep serving the last file: HAProxy's checks still route
                // correctly while etcd is away.
                tracing::warn!(
                    "reading members from etcd failed, keeping the current config: {e:#}"
                );
                continue;
            }
        };
        if let Some(last) = &last_backends {
            if backends.is_empty() && !last.is_empty() {
                // An emptied member list is far more likely an etcd mishap
                // than a cluster without members; stale servers only fail
                // their checks, while dropping all of them cuts every client.
                tracing::warn!("etcd lists no members; keeping the previous servers");
                continue;
            }
            if *last != backends {
                tracing::info!(
                    before = %names(last),
                    after = %names(&backends),
                    "cluster membership changed"
                );
            }
        }
        let text = haproxy::render(&cfg.scope, &backends, &opts);
        last_backends = Some(backends);
        if let Err(e) = publisher.publish(&text).await {
            tracing::warn!("updating {} failed: {e:#}", output.display());
        }
    }
}

fn names(backends: &[Backend]) -> String {
    let names: Vec<&str> = backends.iter().map(|b| b.name.as_str()).collect();
    names.join(",")
}

/// Reads members from etcd, reconnecting after a failure so a connection
/// that went bad is not reused forever.
struct MemberSource<'a> {
    cfg: &'a Config,
    dcs: Option<Dcs>,
}

impl<'a> MemberSource<'a> {
    fn new(cfg: &'a Config) -> Self {
        MemberSource { cfg, dcs: None }
    }

    async fn read(&mut self) -> anyhow::Result<Vec<Backend>> {
        let mut dcs = match self.dcs.take() {
            Some(dcs) => dcs,
            None => Dcs::connect(
                &self.cfg.etcd.endpoints,
                Keys::new(self.cfg.key_prefix()),
                Duration::from_secs(self.cfg.etcd.dial_timeout),
            )
            .await
            .with_context(|| {
                format!(
                    "connecting to etcd at {}",
                    self.cfg.etcd.endpoints.join(",")
                )
            })?,
        };
        let view = dcs
            .read_cluster(&self.cfg.bootstrap.dcs)
            .await
            .context("reading the cluster from etcd")?;
        self.dcs = Some(dcs);
        Ok(haproxy::backends_from_members(&view.members))
    }
}

/// Writes the file when its text changes and runs the reload command after
/// each write, retrying (with backoff) a reload that failed so HAProxy does
/// not stay on an old file until the next membership change.
struct Publisher {
    path: PathBuf,
    reload_cmd: Option<String>,
    /// What the file holds; starts from disk so a restart of the watcher
    /// does not reload HAProxy for nothing.
    current: Option<String>,
    reload_pending: bool,
    next_retry: Option<Instant>,
    backoff: Duration,
}

impl Publisher {
    fn new(path: PathBuf, reload_cmd: Option<String>) -> Self {
        let current = std::fs::read_to_string(&path).ok();
        Publisher {
            path,
            reload_cmd,
            current,
            reload_pending: false,
            next_retry: None,
            backoff: Duration::from_secs(1),
        }
    }

    async fn publish(&mut self, text: &str) -> anyhow::Result<()> {
        if self.current.as_deref() != Some(text) {
            write_atomic(&self.path, text.as_bytes())?;
            tracing::info!(path = %self.path.display(), "wrote HAProxy config");
            self.current = Some(text.to_string());
            self.reload_pending = self.reload_cmd.is_some();
            self.next_retry = None;
            self.backoff = Duration::from_secs(1);
        }
        if !self.reload_pending {
            return Ok(());
        }
        if self.next_retry.is_some_and(|t| Instant::now() < t) {
            return Ok(());
        }
        let Some(cmd) = &self.reload_cmd else {
            self.reload_pending = false;
            return Ok(());
        };
        match run_reload(cmd).await {
            Ok(()) => {
                tracing::info!("reload command succeeded");
                self.reload_pending = false;
                self.next_retry = None;
            }
            Err(e) => {
                tracing::warn!("{e:#}; retrying in {:?}", self.backoff);
                self.next_retry = Some(Instant::now() + self.backoff);
                self.backoff = (self.backoff * 2).min(MAX_RELOAD_BACKOFF);
            }
        }
        Ok(())
    }
}

async fn run_reload(cmd: &str) -> anyhow::Result<()> {
    let child = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(RELOAD_TIMEOUT, child)
        .await
        .map_err(|_| anyhow!("reload command `{cmd}` did not finish within {RELOAD_TIMEOUT:?}"))?
        .with_context(|| format!("starting reload command `{cmd}`"))?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        bail!(
            "reload command `{cmd}` failed ({}): {}",
            out.status,
            stderr.trim()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    /// The reload command runs just after the file is renamed into place:
    /// poll for its effect rather than racing it.
    async fn wait_for_reloads(path: &std::path::Path, want: usize) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        loop {
            let n = std::fs::read_to_string(path)
                .map(|t| t.lines().count())
                .unwrap_or(0);
            if n == want {
                return;
            }
            assert!(
                n < want && std::time::Instant::now() < deadline,
                "expected {want} reloads, saw {n}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }

    use super::*;
    use clap::Parser;
    use std::path::Path;
    use std::process::{Child, Command, Stdio};

    #[derive(Parser, Debug)]
    struct TestCli {
        #[command(flatten)]
        args: HaproxyConfigArgs,
    }

    fn parse(argv: &[&str]) -> Result<HaproxyConfigArgs, clap::Error> {
        TestCli::try_parse_from(std::iter::once("t").chain(argv.iter().copied())).map(|c| c.args)
    }

    #[test]
    fn haproxy_args_default_to_render_defaults() {
        let args = parse(&[]).unwrap();
        assert_eq!(args.render_options(), RenderOptions::default());
        assert_eq!(args.interval, 2);
        assert!(!args.watch);
        assert!(args.output.is_none());
    }

    #[test]
    fn haproxy_args_parse() {
        let args = parse(&[
            "--rw-port",
            "6000",
            "--ro-port",
            "6001",
            "--stats-port",
            "6002",
            "--bind",
            "127.0.0.1",
            "--inter",
            "500ms",
            "--fall",
            "3",
            "--rise",
            "2",
            "--output",
            "/tmp/x.cfg",
            "--watch",
            "--reload-cmd",
            "true",
            "--interval",
            "5",
        ])
        .unwrap();
        let o = args.render_options();
        assert_eq!((o.rw_port, o.ro_port, o.stats_port), (6000, 6001, 6002));
        assert_eq!(o.bind_address, "127.0.0.1");
        assert_eq!((o.inter.as_str(), o.fall, o.rise), ("500ms", 3, 2));
        assert_eq!(args.output.as_deref(), Some(Path::new("/tmp/x.cfg")));
        assert!(args.watch);
        assert_eq!(args.reload_cmd.as_deref(), Some("true"));
        assert_eq!(args.interval, 5);
    }

    #[test]
    fn haproxy_args_reject_watch_without_output() {
        assert!(parse(&["--watch"]).is_err());
        assert!(parse(&["--reload-cmd", "true"]).is_err());
        assert!(parse(&["--output", "x", "--interval", "0"]).is_err());
    }

    fn count_lines(path: &Path) -> usize {
        std::fs::read_to_string(path)
            .map(|s| s.lines().count())
            .unwrap_or(0)
    }

    #[tokio::test]
    async fn haproxy_publisher_reloads_only_on_change_and_retries() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("haproxy.cfg");
        let calls = dir.path().join("calls");
        let fail = dir.path().join("fail");
        let cmd = format!(
            "echo x >> '{}'; test ! -e '{}'",
            calls.display(),
            fail.display()
        );
        std::fs::write(&path, "same\n").unwrap();
        let mut p = Publisher::new(path.clone(), Some(cmd));

        p.publish("same\n").await.unwrap();
        assert_eq!(
            count_lines(&calls),
            0,
            "unchanged file on disk must not reload"
        );

        p.publish("new\n").await.unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "new\n");
        assert_eq!(count_lines(&calls), 1);
        p.publish("new\n").await.unwrap();
        assert_eq!(count_lines(&calls), 1);

        std::fs::write(&fail, "").unwrap();
        p.publish("newer\n").await.unwrap();
        assert_eq!(count_lines(&calls), 2);
        // Within the backoff nothing is retried.
        p.publish("newer\n").await.unwrap();
        assert_eq!(count_lines(&calls), 2);
        std::fs::remove_file(&fail).unwrap();
        p.next_retry = Some(Instant::now());
        p.publish("newer\n").await.unwrap();
        assert_eq!(count_lines(&calls), 3);
        p.publish("newer\n").await.unwrap();
        assert_eq!(
            count_lines(&calls),
            3,
            "a successful retry ends the retries"
        );
    }

    // ---- against a real etcd ---------------------------------------------

    struct Etcd {
        child: Child,
        endpoint: String,
        _dir: tempfile::TempDir,
    }

    impl Drop for Etcd {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    fn free_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }

    /// Fails (never skips) without etcd: CI must have it.
    async fn start_etcd() -> Etcd {
        let dir = tempfile::tempdir().unwrap();
        let (client, peer) = (free_port(), free_port());
        let endpoint = format!("http://127.0.0.1:{client}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let bin = std::env::var("ETCD").unwrap_or_else(|_| "etcd".to_string());
        let child = Command::new(&bin)
            .arg("--name=t")
            .arg(format!("--data-dir={}", dir.path().join("data").display()))
            .arg(format!("--listen-client-urls={endpoint}"))
            .arg(format!("--advertise-client-urls={endpoint}"))
            .arg(format!("--listen-peer-urls={peer_url}"))
            .arg(format!("--initial-advertise-peer-urls={peer_url}"))
            .arg(format!("--initial-cluster=t={peer_url}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {bin} (install etcd or set ETCD): {e}"));
        let etcd = Etcd {
            child,
            endpoint,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(mut c) = etcd_client::Client::connect([&etcd.endpoint], None).await {
                if c.get("probe", None).await.is_ok() {
                    return etcd;
                }
            }
            assert!(Instant::now() < deadline, "etcd did not start");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn test_config(endpoint: &str) -> Config {
        let text = format!(
            r#"
scope = "hx"
name = "pg1"
[etcd]
endpoints = ["{endpoint}"]
[api]
listen = "127.0.0.1:8008"
[postgresql]
data_dir = "/nonexistent/pg1"
listen = "127.0.0.1:5432"
[postgresql.authentication.superuser]
username = "postgres"
password = "secret"
[postgresql.authentication.replication]
username = "replicator"
password = "rep-secret"
"#
        );
        crate::config::parse(Path::new("test.toml"), &text).unwrap()
    }

    fn member_json(name: &str, pg_port: u16, api_port: u16) -> String {
        let m = crate::dcs::MemberStatus {
            name: name.to_string(),
            role: crate::dcs::Role::Replica,
            state: crate::dcs::PgState::Streaming,
            host: "127.0.0.1".to_string(),
            port: pg_port,
            api_url: format!("http://127.0.0.1:{api_port}"),
            conn_url: String::new(),
            timeline: None,
            wal_lsn: None,
            receive_lsn: None,
            upstream: None,
            tags: Default::default(),
            version: "test".to_string(),
            error: None,
            pending_restart: false,
        };
        serde_json::to_string(&m).unwrap()
    }

    async fn wait_for_file(path: &Path, pred: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let text = std::fs::read_to_string(path).unwrap_or_default();
            if pred(&text) {
                return text;
            }
            assert!(
                Instant::now() < deadline,
                "file never matched; last:\n{text}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    #[tokio::test]
    async fn haproxy_config_follows_etcd_members() {
        let etcd = start_etcd().await;
        let cfg = test_config(&etcd.endpoint);
        let keys = Keys::new(cfg.key_prefix());
        let mut client = etcd_client::Client::connect([&etcd.endpoint], None)
            .await
            .unwrap();
        client
            .put(keys.member("a"), member_json("a", 5432, 8008), None)
            .await
            .unwrap();
        client
            .put(keys.member("b c"), member_json("b c", 5433, 8009), None)
            .await
            .unwrap();

        let dir = tempfile::tempdir().unwrap();
        let output = dir.path().join("haproxy.cfg");
        let reloads = dir.path().join("reloads");
        let mut args = parse(&["--bind", "127.0.0.1", "--output", "x"]).unwrap();
        args.output = Some(output.clone());

        // One shot.
        run_until(&cfg, &args, std::future::pending())
            .await
            .unwrap();
        let text = std::fs::read_to_string(&output).unwrap();
        assert_eq!(
            text.matches("server a 127.0.0.1:5432 check port 8008")
                .count(),
            3,
            "{text}"
        );
        assert_eq!(
            text.matches("server b_c 127.0.0.1:5433 check port 8009")
                .count(),
            3,
            "{text}"
        );

        // Watch: a new member is added, with one reload.
        args.watch = true;
        args.interval = 1;
        args.reload_cmd = Some(format!("echo reload >> '{}'", reloads.display()));
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let watcher = {
            let cfg = cfg.clone();
            let args = args.clone();
            tokio::spawn(async move {
                run_until(&cfg, &args, async {
                    let _ = stop_rx.await;
                })
                .await
            })
        };
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert_eq!(
            count_lines(&reloads),
            0,
            "unchanged membership must not reload"
        );

        client
            .put(keys.member("d"), member_json("d", 5434, 8010), None)
            .await
            .unwrap();
        wait_for_file(&output, |t| t.contains("server d 127.0.0.1:5434")).await;
        wait_for_reloads(&reloads, 1).await;

        // A departed member is removed...
        client.delete(keys.member("a"), None).await.unwrap();
        wait_for_file(&output, |t| !t.contains("server a ")).await;
        wait_for_reloads(&reloads, 2).await;

        // ...but an empty member list keeps the last servers.
        client.delete(keys.member("b c"), None).await.unwrap();
        client.delete(keys.member("d"), None).await.unwrap();
        tokio::time::sleep(Duration::from_millis(2500)).await;
        let text = std::fs::read_to_string(&output).unwrap();
        assert!(text.contains("server d "), "{text}");

        // etcd gone: the watcher keeps running and the file stays.
        drop(client);
        drop(etcd);
        tokio::time::sleep(Duration::from_millis(2500)).await;
        assert!(!watcher.is_finished());
        assert_eq!(std::fs::read_to_string(&output).unwrap(), text);

        let _ = stop_tx.send(());
        tokio::time::timeout(Duration::from_secs(10), watcher)
            .await
            .expect("watcher did not stop")
            .unwrap()
            .unwrap();
    }
}
