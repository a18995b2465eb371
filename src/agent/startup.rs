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
    // Before the API's connection budget is computed from it.
    crate::fdlimit::raise_nofile();
    let path = cfg.source.clone();
    let user = OsUser::resolve(&cfg.postgresql.os_user)
        .map_err(|m| ConfigError::key(&path, "postgresql.os_user", m))?;
    let probe = Instance::from_config(
        &cfg,
        cfg.postgresql.bin_dir.clone().unwrap_or_default(),
        user,
    );
    let pg_running = probe.postmaster_pid().is_some();
    let bin_dir = config::validate(&cfg, pg_running)?;
    let mut pg = Instance::from_config(&cfg, bin_dir.clone(), user);
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
    // One name, one member: a live agent elsewhere with our name keeps it.
    // Nothing is written before this check.
    if let Some(d) = dcs.as_mut() {
        let (host, port) = super::publish::split_host_port(&cfg.pg_connect_address());
        match d
            .claim_name(&cfg.name, &cfg.api_url(), &format!("{host}:{port}"))
            .await
        {
            Ok(()) => {}
            Err(e @ crate::dcs::DcsError::NameTaken { .. }) => {
                return Err(ConfigError::key(&path, "name", e.to_string()).into())
            }
            Err(e) => tracing::warn!("cannot check that our member name is free: {e}"),
        }
    }
    // The other config check that needs etcd: data of another cluster must
    // never be started under this cluster's name.
    if let Some(d) = dcs.as_mut() {
        if pg.has_data() {
            if let Ok(view) = d.read_cluster(&cfg.bootstrap.dcs).await {
                if let Initialize::SystemId(cluster_id) = &view.initialize {
                    // Unreadable is not foreign: start, and let the loop
                    // (which does nothing destructive on unknown data)
                    // check again once it can read it.
                    let ours = match pg.system_identifier().await {
                        Ok(id) => id,
                        Err(e) => {
                            tracing::warn!(
                                "cannot read the data directory's system identifier: {e:#}"
                            );
                            cluster_id.clone()
                        }
                    };
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

    // A failsafe confirmation from before this start may still bind us;
    // one we cannot read might, so we do not start without it.
    let promise_path = crate::failsafe_promise::path_for(&cfg.postgresql.data_dir);
    let promise = crate::failsafe_promise::load(&promise_path).map_err(|e| {
        anyhow::anyhow!(
            "{e:#} (a confirmation given there binds this member for a ttl; remove the file only if no primary ran in failsafe mode within the last ttl)"
        )
    })?;

    let listener = crate::api::bind(cfg.api.listen).map_err(|e| {
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
    let epoch = Instant::now();
    let core = ha::Core::new(
        ha::Identity {
            name: cfg.name.clone(),
            tags: cfg.tags.clone(),
            reclone_on_rewind_failure: cfg.postgresql.remove_data_directory_on_rewind_failure,
            bootstrap: cfg.bootstrap.dcs.clone(),
        },
        Duration::ZERO,
    );

    let mut agent = Agent {
        core,
        dcs: dcs.take(),
        fence: super::fence::FenceTimer::spawn(pg.detached()),
        keeper: crate::fence_keeper::KeeperFeed::spawn(
            cfg.source.clone(),
            &cfg.postgresql.data_dir,
        ),
        pg,
        api,
        epoch,
        job: None,
        lease_kept_at: None,
        system_id: None,
        last_published: None,
        published_on: None,
        fatal: None,
        last_read_failure: None,
        last_status_written: None,
        last_steps: Vec::new(),
        this_pass: Vec::new(),
        last_waiting: None,
        last_problem: None,
        major,
        last_leader_seen: None,
        pending_promotion: None,
        http: crate::api::client_builder(&cfg)?
            .timeout(crate::ha::PEER_ASK_TIMEOUT)
            .build()
            .context("cannot build the HTTP client")?,
        cfg,
    };

    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("cannot install the SIGTERM handler")?;
    let mut sigint = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
        .context("cannot install the SIGINT handler")?;
    if let Some(p) = promise {
        let remaining = p.remaining(std::time::SystemTime::now());
        if !remaining.is_zero() {
            tracing::info!(
                "failsafe: we confirmed {} as the primary before this start; taking no lease for another {:.0}s",
                p.leader,
                remaining.as_secs_f64().ceil()
            );
            agent.handle(ha::Event::FailsafeRestored {
                leader: p.leader,
                remaining,
            });
        }
    }
    agent.handle(ha::Event::Tick);
    loop {
        while let Some(step) = agent.core.poll_action() {
            agent.perform(step).await;
        }
        if let Some(e) = agent.fatal.take() {
            tracing::error!("{e}");
            watcher.abort();
            agent.fence.abort();
            agent.shutdown().await;
            shutdown.notify_waiters();
            let _ = api_task.await;
            return Err(ConfigError::key(&path, "name", e).into());
        }
        let deadline = agent
            .core
            .poll_timeout()
            .map(|d| agent.epoch + d)
            .unwrap_or_else(|| Instant::now() + Duration::from_secs(1));
        let woke = {
            let job_done = async {
                match agent.job.as_mut() {
                    Some(job) => Some(job.wait().await),
                    None => std::future::pending().await,
                }
            };
            // Facts before deadlines: a job that ended is reported before a
            // timer that fell due at the same moment acts on stale state.
            tokio::select! {
                biased;
                _ = sigterm.recv() => break,
                _ = sigint.recv() => break,
                result = job_done => match result {
                    Some(r) => Woke::JobDone(r),
                    None => Woke::Timer,
                },
                _ = wake.notified() => Woke::LeaderChanged,
                Some(cmd) = commands_rx.recv() => Woke::Request(cmd),
                _ = tokio::time::sleep_until(deadline.into()) => Woke::Timer,
            }
        };
        match woke {
            Woke::Timer => agent.handle(ha::Event::Tick),
            Woke::LeaderChanged => {
                tracing::debug!("leader key changed");
                agent.handle(ha::Event::Wake)
            }
            Woke::JobDone(result) => agent.job_finished(result).await,
            Woke::Request(cmd) => agent.handle(match cmd {
                crate::api::MemberCommand::Restart => {
                    ha::Event::Request(ha::OperatorRequest::Restart)
                }
                crate::api::MemberCommand::Reinit => {
                    ha::Event::Request(ha::OperatorRequest::Reinit)
                }
                crate::api::MemberCommand::Reload => {
                    ha::Event::Request(ha::OperatorRequest::Reload)
                }
                crate::api::MemberCommand::Failsafe { leader, ttl } => {
                    tracing::info!(
                        "failsafe: confirmed {leader} as the primary while etcd is unreachable"
                    );
                    ha::Event::FailsafeGranted { leader, ttl }
                }
            }),
        }
    }
    watcher.abort();
    agent.fence.abort();
    agent.shutdown().await;
    shutdown.notify_waiters();
    let _ = api_task.await;
    Ok(())
}

enum Woke {
    Timer,
    LeaderChanged,
    JobDone(Result<(), String>),
    Request(crate::api::MemberCommand),
}

impl Agent {
    /// Logs what the pass decided (waiting, problem) once per change.
    pub(super) fn report(&mut self) {
        let decision = self.core.decision();
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
    }

    /// SIGTERM: stop PostgreSQL cleanly, then give up the leader key at once
    /// so a replica need not wait for the lease to expire.
    async fn shutdown(&mut self) {
        tracing::info!("shutting down: stopping PostgreSQL");
        let aborted = self.job.take().map(|job| job.abort()).is_some();
        // Out of HAProxy's read-write pool before PostgreSQL starts refusing
        // connections, not after.
        let mut snap = (*self.api.get()).clone();
        snap.holds_leader_key = false;
        snap.lease_valid_until = None;
        self.api.set(snap);
        if let Err(e) = self.pg.stop().await {
            tracing::error!("stopping PostgreSQL failed: {e:#}");
        }
        if aborted {
            // A start the aborted job had launched (pg_ctl runs on without
            // it) may bring a postmaster up after that stop: wait it out.
            for _ in 0..25 {
                tokio::time::sleep(Duration::from_millis(200)).await;
                if self.pg.postmaster_pid().is_some() {
                    if let Err(e) = self.pg.stop().await {
                        tracing::error!("stopping PostgreSQL failed: {e:#}");
                    }
                }
            }
        }
        // Only a postmaster known gone lets the keeper go: an unreadable
        // postmaster.pid may hide a running primary.
        if matches!(self.pg.postmaster(), Ok(crate::postgres::Postmaster::None)) {
            self.keeper.exit().await;
        } else {
            tracing::warn!("PostgreSQL still runs: the fence keeper keeps our last deadline");
            self.keeper.abort();
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
        system_id: None,
        dcs_ok: false,
        data_dir_free_bytes: None,
        wal_dir_free_bytes: None,
        failover_candidate: false,
        resumes_on: None,
    }
}
