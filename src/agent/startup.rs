use super::Agent;
use crate::api::{ApiSnapshot, SharedState};
use crate::config::{self, Config, ConfigError};
use crate::dcs::{Dcs, Initialize, Keys, MemberStatus, PgState, Role};
use crate::ha;
use crate::postgres::{Instance, OsUser};
use anyhow::Context;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Notify;

/// Runs the agent until SIGTERM or SIGINT. Config problems are returned as
/// `ConfigError` before anything is written to disk or etcd.
pub async fn run(cfg: Config) -> anyhow::Result<()> {
    let path = cfg.source.clone();
    let user = OsUser::resolve(&cfg.postgresql.os_user)
        .map_err(|m| ConfigError::key(&path, "postgresql.os_user", m))?;
    let probe = Instance::new(
        cfg.postgresql.bin_dir.clone().unwrap_or_default(),
        cfg.postgresql.data_dir.clone(),
        cfg.postgresql.listen,
        user,
        cfg.postgresql.authentication.superuser.clone(),
        cfg.postgresql.authentication.replication.clone(),
        Duration::from_secs(cfg.postgresql.start_timeout),
    );
    let pg_running = probe.postmaster_pid().is_some();
    let bin_dir = config::validate(&cfg, pg_running)?;
    let mut pg = Instance::new(
        bin_dir.clone(),
        cfg.postgresql.data_dir.clone(),
        cfg.postgresql.listen,
        user,
        cfg.postgresql.authentication.superuser.clone(),
        cfg.postgresql.authentication.replication.clone(),
        Duration::from_secs(cfg.postgresql.start_timeout),
    );
    let major = pg
        .binary_major()
        .await
        .map_err(|e| ConfigError::key(&path, "postgresql.bin_dir", format!("{e:#}")))?;

    let keys = Keys::new(cfg.key_prefix());
    let timeout = Duration::from_secs(cfg.etcd.dial_timeout.max(1));
    let mut dcs = match Dcs::connect(&cfg.etcd.endpoints, keys.clone(), timeout).await {
        Ok(d) => Some(d),
        Err(e) => {
            tracing::warn!("etcd is not reachable yet ({e}); will keep trying");
            None
        }
    };
    // The one config check that needs etcd: data of another cluster must
    // never be started under this cluster's name.
    if let Some(d) = dcs.as_mut() {
        if pg.has_data() {
            if let Ok(view) = d.read_cluster(&cfg.bootstrap.dcs).await {
                if let Initialize::SystemId(cluster_id) = &view.initialize {
                    let ours = pg.system_identifier().await.map_err(|e| {
                        ConfigError::key(&path, "postgresql.data_dir", format!("{e:#}"))
                    })?;
                    if &ours != cluster_id {
                        return Err(ConfigError::key(
                            &path,
                            "postgresql.data_dir",
                            format!(
                                "{} belongs to another cluster: its system identifier is {ours}, cluster `{}` in etcd has {cluster_id}",
                                cfg.postgresql.data_dir.display(),
                                cfg.scope
                            ),
                        )
                        .into());
                    }
                }
            }
        }
    }

    let listener = tokio::net::TcpListener::bind(cfg.api.listen)
        .await
        .map_err(|e| {
            ConfigError::key(
                &path,
                "api.listen",
                format!("cannot listen on {}: {e}", cfg.api.listen),
            )
        })?;
    tracing::info!(
        "pgwarden agent {} for member {} of cluster {} (PostgreSQL {major} in {}, API on {})",
        env!("CARGO_PKG_VERSION"),
        cfg.name,
        cfg.scope,
        cfg.postgresql.data_dir.display(),
        cfg.api.listen
    );
    if pg_running {
        tracing::info!(
            "adopting the running PostgreSQL (postmaster PID {:?})",
            pg.postmaster_pid()
        );
    }
    pg.disconnect();

    let api = SharedState::new(initial_snapshot(&cfg));
    let shutdown = Arc::new(Notify::new());
    let api_shutdown = shutdown.clone();
    let api_state = api.clone();
    let api_options = crate::api::ApiOptions::from_config(&cfg)?;
    // Operator requests to this member (restart, reinit, reload) reach the
    // loop here; the policy decides what to do with them.
    let (commands_tx, mut commands_rx) = tokio::sync::mpsc::channel::<crate::api::MemberCommand>(8);
    let api_task = tokio::spawn(async move {
        let stop = async move { api_shutdown.notified().await };
        if let Err(e) = crate::api::serve(listener, api_state, api_options, commands_tx, stop).await
        {
            tracing::error!("the HTTP API stopped: {e}");
        }
    });

    let wake = Arc::new(Notify::new());
    let watcher = tokio::spawn(watch_leader(cfg.etcd.endpoints.clone(), keys, wake.clone()));
    let guard = tokio::spawn(fence_guard(api.clone(), pg.detached()));

    let mut agent = Agent {
        dcs: dcs.take(),
        pg,
        api,
        epoch: Instant::now(),
        last_cluster: None,
        job: None,
        last_failure: None,
        lease_kept_at: None,
        last_renew: None,
        system_id: None,
        slot_last_seen: Default::default(),
        last_published: None,
        last_status_written: None,
        last_steps: Vec::new(),
        last_waiting: None,
        last_problem: None,
        problem: None,
        major,
        primary_down_since: None,
        last_leader_seen: None,
        last_control: None,
        pending_promotion: None,
        pending_request: None,
        http: crate::api::client_builder(&cfg)?
            .timeout(Duration::from_millis(1500))
            .build()
            .context("cannot build the HTTP client")?,
        cfg,
    };

    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("cannot install the SIGTERM handler")?;
    let mut sigint = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
        .context("cannot install the SIGINT handler")?;
    loop {
        let loop_wait = agent.run_once().await;
        let job_done = async {
            loop {
                tokio::time::sleep(Duration::from_millis(100)).await;
                if agent.job.as_ref().is_none_or(|j| j.is_finished()) {
                    break;
                }
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(loop_wait) => {}
            _ = wake.notified() => tracing::debug!("leader key changed"),
            _ = job_done, if agent.job.is_some() => {}
            Some(cmd) = commands_rx.recv() => {
                agent.pending_request = Some(match cmd {
                    crate::api::MemberCommand::Restart => crate::ha::OperatorRequest::Restart,
                    crate::api::MemberCommand::Reinit => crate::ha::OperatorRequest::Reinit,
                    crate::api::MemberCommand::Reload => crate::ha::OperatorRequest::Reload,
                });
            }
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
        }
    }
    watcher.abort();
    guard.abort();
    agent.shutdown().await;
    shutdown.notify_waiters();
    let _ = api_task.await;
    Ok(())
}

impl Agent {
    /// One observe → decide → act → publish pass (repeated at once, a
    /// bounded number of times, when acting changed etcd). Returns how long
    /// to wait before the next.
    async fn run_once(&mut self) -> Duration {
        let mut rounds = 0;
        loop {
            rounds += 1;
            self.reap_job().await;
            let (cluster, dcs_ok) = self.observe_cluster().await;
            let local = self.observe_local(&cluster, dcs_ok).await;
            let decision = ha::decide(&cluster, &local, self.now());
            self.report(&decision);
            let outcome = self.act(&cluster, &local, &decision.steps).await;
            let status = self.member_status(&cluster, &local);
            if dcs_ok {
                self.publish(&cluster, &status).await;
            }
            let snap = self.snapshot(&cluster, &local, status);
            self.api.set(snap);
            if !outcome.dcs_changed || rounds >= 3 {
                return Duration::from_secs(cluster.config.loop_wait.max(1));
            }
        }
    }

    fn report(&mut self, decision: &ha::Decision) {
        if decision.waiting != self.last_waiting {
            if let Some(w) = &decision.waiting {
                tracing::info!("{w}");
            }
            self.last_waiting = decision.waiting.clone();
        }
        if decision.problem != self.last_problem {
            if let Some(p) = &decision.problem {
                tracing::error!("{p}");
            }
            self.last_problem = decision.problem.clone();
        }
        self.problem = decision.problem.clone();
    }

    /// SIGTERM: stop PostgreSQL cleanly, then give up the leader key at once
    /// so a replica need not wait for the lease to expire.
    async fn shutdown(&mut self) {
        tracing::info!("shutting down: stopping PostgreSQL");
        if let Some(job) = self.job.take() {
            job.abort();
        }
        // Out of HAProxy's read-write pool before PostgreSQL starts refusing
        // connections, not after.
        self.last_renew = None;
        let mut snap = (*self.api.get()).clone();
        snap.holds_leader_key = false;
        snap.lease_valid_until = None;
        self.api.set(snap);
        if let Err(e) = self.pg.stop().await {
            tracing::error!("stopping PostgreSQL failed: {e:#}");
        }
        if let Some(dcs) = self.dcs.as_mut() {
            let _ = dcs.release_leader(&self.cfg.name).await;
            if let Err(e) = dcs.revoke_lease().await {
                tracing::warn!("cannot revoke our etcd lease: {e}");
            }
        }
        tracing::info!("stopped");
    }
}

/// The last line of rule 2. The policy stops a primary whose lease went
/// unrenewed for retry_timeout, but only when a loop pass gets that far; a
/// pass stuck in etcd timeouts could reach it too late. This guard watches
/// the published lease deadline on its own and stops PostgreSQL at once
/// (immediate mode) when the deadline is about to pass with no renewal.
async fn fence_guard(api: SharedState, mut pg: Instance) {
    const MARGIN: Duration = Duration::from_millis(1500);
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let snap = api.get();
        let writable =
            snap.holds_leader_key && snap.pg_running && !snap.in_recovery && !snap.paused;
        let at_risk = snap
            .lease_valid_until
            .is_some_and(|until| Instant::now() + MARGIN >= until);
        if writable && at_risk && pg.postmaster_pid().is_some() {
            tracing::error!(
                "the leader lease may expire within {MARGIN:?} and the loop has not renewed it: stopping PostgreSQL immediately"
            );
            if let Err(e) = pg.stop_immediate().await {
                tracing::error!("emergency stop failed: {e:#}");
            }
        }
    }
}

/// Wakes the loop whenever the leader key changes, so replicas react to a
/// leader's departure at once rather than at the next tick.
async fn watch_leader(endpoints: Vec<String>, keys: Keys, wake: Arc<Notify>) {
    loop {
        if let Ok(mut dcs) = Dcs::connect(&endpoints, keys.clone(), Duration::from_secs(2)).await {
            if let Ok((_watcher, mut stream)) = dcs.watch_leader().await {
                // Wake only when the leader changes or goes away: a write
                // of the same value (a lease move) is not news.
                let mut last: Option<Vec<u8>> = None;
                while let Ok(Some(resp)) = stream.message().await {
                    for ev in resp.events() {
                        let value = match ev.event_type() {
                            etcd_client::EventType::Put => ev.kv().map(|kv| kv.value().to_vec()),
                            etcd_client::EventType::Delete => None,
                        };
                        if value.is_none() || value != last {
                            wake.notify_one();
                        }
                        last = value;
                    }
                }
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

fn initial_snapshot(cfg: &Config) -> ApiSnapshot {
    ApiSnapshot {
        member: MemberStatus {
            name: cfg.name.clone(),
            role: Role::Uninitialized,
            state: PgState::Stopped,
            host: String::new(),
            port: 0,
            api_url: cfg.api_url(),
            conn_url: String::new(),
            timeline: None,
            wal_lsn: None,
            receive_lsn: None,
            upstream: None,
            tags: cfg.tags.clone(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            error: None,
            pending_restart: false,
        },
        cluster: None,
        holds_leader_key: false,
        lease_valid_until: None,
        pg_running: false,
        in_recovery: false,
        streaming: false,
        lag_bytes: None,
        is_sync: false,
        last_loop: Instant::now(),
        ttl: Duration::from_secs(cfg.bootstrap.dcs.ttl),
        paused: false,
        postmaster_start: None,
    }
}
