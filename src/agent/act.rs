use super::jobs::RunningJob;
use super::Agent;
use crate::dcs::{slot_name, ClusterStatus, ClusterView, HistoryEntry, LeaderOutcome};
use crate::ha::{self, Action, Event, JobKind, LeaseOutcome, LocalView, Step, Upstream};
use crate::postgres::{ConfInputs, ReplicaSettings};
use std::time::Instant;

impl Agent {
    /// Carries out one step the core handed out and reports its result.
    pub(super) async fn perform(&mut self, step: Step) {
        match &step.action {
            Action::Observe => {
                let obs = self.observe().await;
                self.handle(Event::Observed(Box::new(obs)));
                return;
            }
            Action::AskPeers(query) => {
                let answers = self.ask_peers(query).await;
                self.handle(Event::Peers(answers));
                return;
            }
            Action::Publish => {
                self.publish_pass().await;
                return;
            }
            Action::AskFailsafe(members) => {
                self.log_step(&step);
                let started = self.now();
                let confirmed = self.ask_failsafe(members).await;
                self.handle(Event::Failsafe { started, confirmed });
                return;
            }
            Action::Fence if self.pg.postmaster_pid().is_none() => {
                tracing::debug!("fence deadline passed; PostgreSQL is already stopped");
                return;
            }
            _ => {}
        }
        self.log_step(&step);
        self.this_pass.push(step.clone());
        let cluster = self.core.cluster().clone();
        if step.action.is_lease_op() {
            let attempt = self.now();
            let outcome = match self.lease_op(&step.action, cluster.config.ttl).await {
                Ok(o) => o,
                Err(e) => {
                    tracing::error!("{}: {e:#}", step.reason);
                    LeaseOutcome::Failed(format!("{e:#}"))
                }
            };
            // The lease cannot expire before the keep-alive that preceded
            // the transaction started (+ ttl).
            let started = match (&outcome, self.lease_kept_at) {
                (LeaseOutcome::Held, Some(t)) => self.since_epoch(t).min(attempt),
                _ => attempt,
            };
            self.handle(Event::Lease { started, outcome });
            return;
        }
        let local = self.core.local_view();
        if let Err(e) = self.act_one(&cluster, &local, &step.action).await {
            tracing::error!("{}: {e:#}", step.reason);
            self.handle(Event::ActionFailed {
                error: format!("{e:#}"),
            });
        }
    }

    fn log_step(&self, step: &Step) {
        let quiet = matches!(step.action, Action::RenewLeader | Action::WriteStatus);
        if quiet || self.last_steps.contains(step) {
            tracing::debug!("{}", step.reason);
        } else if matches!(&step.action, Action::WriteSync(l) if l.is_empty()) {
            tracing::warn!("{}", step.reason);
        } else {
            tracing::info!("{}", step.reason);
        }
    }

    /// A finished background job: runtime bookkeeping, then the event.
    pub(super) async fn job_finished(&mut self, result: Result<(), String>) {
        let Some(job) = self.job.take() else { return };
        let kind = job.kind;
        // A job may have replaced the data directory.
        self.system_id = None;
        self.pg.disconnect();
        match &result {
            Ok(()) => {
                tracing::info!("{} finished", super::observe::describe(&kind));
                if kind == JobKind::Promote {
                    tracing::info!("promoted: now the primary");
                    if let Some(p) = self.pending_promotion.take() {
                        self.record_promotion(p).await;
                    }
                }
            }
            Err(message) => {
                tracing::error!("{} failed: {message}", super::observe::describe(&kind))
            }
        }
        self.handle(Event::JobFinished { kind, result });
    }

    /// Operations on the leader key: whether we hold it afterwards.
    async fn lease_op(&mut self, action: &Action, ttl: u64) -> anyhow::Result<LeaseOutcome> {
        let name = self.cfg.name.clone();
        let held = |o: LeaderOutcome| match o {
            LeaderOutcome::Won => LeaseOutcome::Held,
            LeaderOutcome::Lost => LeaseOutcome::NotHeld,
        };
        Ok(match action {
            Action::ClaimBootstrap => {
                self.keep_alive(ttl).await?;
                let o = self.dcs_mut()?.claim_initialize(&name, ttl).await?;
                match o {
                    LeaderOutcome::Won => tracing::info!("won the bootstrap race"),
                    LeaderOutcome::Lost => {
                        tracing::info!("another member claimed the bootstrap first")
                    }
                }
                held(o)
            }
            Action::AcquireLeader => {
                self.keep_alive(ttl).await?;
                let o = self.dcs_mut()?.acquire_leader(&name, ttl).await?;
                match o {
                    LeaderOutcome::Won => tracing::info!("acquired the leader lease"),
                    LeaderOutcome::Lost => {
                        tracing::info!("another member took the leader lease first")
                    }
                }
                held(o)
            }
            Action::RenewLeader => {
                let mut outcome = self.renew(&name, ttl).await;
                if outcome.is_err() {
                    // One dead etcd endpoint must not cost a renewal: retry
                    // at once on another.
                    let dcs = self.dcs_mut()?;
                    if dcs.has_alternatives() && dcs.switch_endpoint().await.is_ok() {
                        outcome = self.renew(&name, ttl).await;
                    }
                }
                let o = outcome?;
                if o == LeaderOutcome::Lost {
                    tracing::warn!("the leader key no longer names us");
                }
                held(o)
            }
            Action::ReleaseLeader => {
                self.dcs_mut()?.release_leader(&name).await?;
                LeaseOutcome::NotHeld
            }
            Action::AbandonBootstrap => {
                self.dcs_mut()?.abandon_bootstrap(&name).await?;
                LeaseOutcome::NotHeld
            }
            _ => anyhow::bail!("not a lease operation: {action:?}"),
        })
    }

    async fn act_one(
        &mut self,
        cluster: &ClusterView,
        local: &LocalView,
        action: &Action,
    ) -> anyhow::Result<()> {
        let name = self.cfg.name.clone();
        match action {
            Action::Observe
            | Action::AskPeers(_)
            | Action::AskFailsafe(_)
            | Action::Publish
            | Action::ClaimBootstrap
            | Action::AcquireLeader
            | Action::RenewLeader
            | Action::ReleaseLeader
            | Action::AbandonBootstrap => {}
            Action::Fence => {
                if self.pg.postmaster_pid().is_some() {
                    self.pg.stop_immediate().await?;
                }
            }
            Action::PublishSystemId(id) => {
                self.dcs_mut()?.set_initialize(id).await?;
            }
            Action::InitConfig => {
                let defaults = self.cfg.bootstrap.dcs.clone();
                self.dcs_mut()?.init_config(&defaults).await?;
            }
            Action::WriteStatus => {
                if let Some(pg) = local.pg.running() {
                    let key = (pg.wal_lsn.unwrap_or(0), pg.timeline.unwrap_or(0));
                    if self.last_status_written != Some(key) {
                        let status = ClusterStatus {
                            leader: name.clone(),
                            wal_lsn: key.0,
                            timeline: key.1,
                            slots: Default::default(),
                        };
                        self.dcs_mut()?.write_status(&status).await?;
                        self.last_status_written = Some(key);
                    }
                }
            }
            Action::Bootstrap => {
                let mut pg = self.pg.detached();
                let inputs = self.conf_inputs(cluster, None);
                let gate = self.fence.gate();
                self.spawn_job(JobKind::Bootstrap, async move {
                    // initdb cleans up after itself when it fails; what it
                    // made is ours to remove if a later step fails — never
                    // what was in the directory before.
                    pg.initdb().await?;
                    let result = async {
                        pg.write_conf(&inputs)?;
                        gate.check()?;
                        pg.start().await?;
                        pg.create_replication_user().await?;
                        anyhow::Ok(())
                    }
                    .await;
                    if result.is_err() {
                        // Leave no half-initialised cluster behind: the next
                        // attempt (ours or another member's) starts clean.
                        let _ = pg.stop().await;
                        let _ = pg.remove_data_in_background().await;
                    }
                    result
                });
            }
            Action::Clone { from, conn } => {
                let mut pg = self.pg.detached();
                let upstream = Upstream {
                    name: from.clone(),
                    address: conn.clone(),
                };
                let inputs = self.conf_inputs(cluster, Some(Some(upstream)));
                let source = conn.clone();
                self.spawn_job(JobKind::Clone { from: from.clone() }, async move {
                    pg.basebackup(&source).await?;
                    pg.write_conf(&inputs)?;
                    pg.start().await
                });
            }
            Action::StartPrimary => {
                let mut pg = self.pg.detached();
                let inputs = self.conf_inputs(cluster, None);
                let gate = self.fence.gate();
                self.spawn_job(JobKind::Start, async move {
                    pg.write_conf(&inputs)?;
                    gate.check()?;
                    pg.start().await
                });
            }
            Action::StartReplica { upstream } => {
                let mut pg = self.pg.detached();
                let inputs = self.conf_inputs(cluster, Some(upstream.clone()));
                self.spawn_job(JobKind::Start, async move {
                    pg.write_conf(&inputs)?;
                    pg.start().await
                });
            }
            Action::Stop => {
                let mut pg = self.pg.detached();
                self.spawn_job(JobKind::Stop, async move { pg.stop().await });
            }
            Action::Rewind { upstream } => {
                let mut pg = self.pg.detached();
                let inputs = self.conf_inputs(cluster, Some(Some(upstream.clone())));
                let source = upstream.address.clone();
                self.spawn_job(
                    JobKind::Rewind {
                        from: upstream.name.clone(),
                    },
                    async move {
                        pg.rewind(&source).await?;
                        pg.write_conf(&inputs)?;
                        pg.start().await
                    },
                );
            }
            Action::RemoveData => {
                let mut pg = self.pg.detached();
                self.spawn_job(JobKind::RemoveData, async move {
                    // Never pull the data directory from under a running
                    // postmaster.
                    pg.stop().await?;
                    pg.remove_data_in_background().await
                });
            }
            Action::Promote => {
                // standby.signal must stay until PostgreSQL removes it
                // itself at promotion; the primary's config follows after.
                // In the background: a promotion that hangs must not stop
                // the loop from renewing the lease.
                let before = local
                    .pg
                    .running()
                    .and_then(|p| p.receive_lsn.max(p.wal_lsn));
                self.pending_promotion = Some(super::Promotion {
                    switch_lsn: before,
                    reason: promotion_reason(cluster, &name, self.last_leader_seen.as_deref()),
                });
                let mut pg = self.pg.detached();
                let inputs = self.conf_inputs(cluster, None);
                let gate = self.fence.gate();
                self.spawn_job(JobKind::Promote, async move {
                    gate.check()?;
                    pg.promote().await?;
                    pg.write_conf(&inputs)?;
                    Ok(())
                });
            }
            Action::Follow { upstream } => {
                let inputs = self.conf_inputs(cluster, Some(Some(upstream.clone())));
                self.pg.write_conf(&inputs)?;
                if self.major >= 13 {
                    self.pg.reload().await?;
                } else {
                    let mut pg = self.pg.detached();
                    self.spawn_job(JobKind::Start, async move {
                        pg.stop().await?;
                        pg.start().await
                    });
                }
            }
            Action::BeginSwitchover { candidate } => {
                self.dcs_mut()?
                    .set_failover_candidate(&name, candidate)
                    .await?;
                let mut pg = self.pg.detached();
                // Keep the lease: it is handed over only once the candidate
                // has the shutdown checkpoint.
                self.spawn_job(JobKind::Stop, async move { pg.stop().await });
            }
            Action::WriteFailsafe(names) => {
                self.dcs_mut()?.write_failsafe(names).await?;
            }
            Action::WriteSync(standbys) => {
                let sync = crate::dcs::SyncState {
                    leader: name.clone(),
                    sync_standby: standbys.clone(),
                };
                if self.dcs_mut()?.write_sync(&sync).await? == LeaderOutcome::Lost {
                    anyhow::bail!("not written: the leader key does not name us on our lease");
                }
            }
            Action::SetSyncStandbys(value) => {
                self.pg.set_sync_standbys(value)?;
                self.pg.reload().await?;
            }
            Action::ClearFailover => {
                self.dcs_mut()?.clear_failover().await?;
            }
            Action::Restart => {
                let mut pg = self.pg.detached();
                let gate = self.fence.gate();
                self.spawn_job(JobKind::Restart, async move {
                    pg.stop().await?;
                    gate.check()?;
                    pg.start().await
                });
            }
            Action::Reload => {
                if let Some(running) = local.pg.running() {
                    let role = ha::conf_role(cluster, &name, running);
                    let inputs = self.conf_inputs(cluster, role);
                    self.pg.write_conf(&inputs)?;
                }
                self.pg.reload().await?;
            }
            Action::AckRequest => {}
            Action::CreateSlots(slots) => self.pg.create_slots(slots).await?,
            Action::DropSlots(slots) => self.pg.drop_slots(slots).await?,
        }
        Ok(())
    }

    /// Appends the promotion to `history`: the new timeline and the WAL
    /// position where it forked.
    pub(super) async fn record_promotion(&mut self, promotion: super::Promotion) {
        let mut obs = None;
        for _ in 0..20 {
            match self.pg.observe().await {
                Ok(o) if !o.state.in_recovery => {
                    obs = Some(o);
                    break;
                }
                _ => tokio::time::sleep(std::time::Duration::from_millis(100)).await,
            }
        }
        let Some(obs) = obs else {
            tracing::warn!("promoted, but cannot read the new timeline to record it in history");
            return;
        };
        let entry = HistoryEntry {
            timeline: obs.state.timeline.unwrap_or(0),
            lsn: promotion.switch_lsn.or(obs.state.wal_lsn).unwrap_or(0),
            reason: promotion.reason,
            time: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
            leader: self.cfg.name.clone(),
        };
        if let Ok(dcs) = self.dcs_mut() {
            if let Err(e) = dcs.append_history(entry).await {
                tracing::warn!("cannot record the promotion in history: {e}");
            }
        }
    }

    fn spawn_job<F>(&mut self, kind: JobKind, fut: F)
    where
        F: std::future::Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        if let Some(job) = &self.job {
            tracing::warn!("not starting {kind:?}: {:?} is still running", job.kind);
            return;
        }
        self.job = Some(RunningJob::spawn(kind, fut));
    }

    /// The end of a pass: log what it decided, publish our member key and
    /// hand the API a fresh snapshot.
    async fn publish_pass(&mut self) {
        self.report();
        self.last_steps = std::mem::take(&mut self.this_pass);
        let cluster = self.core.cluster().clone();
        let local = self.core.local_view();
        let status = self.member_status(&cluster, &local);
        if self.core.dcs_ok() {
            self.publish(&cluster, &status).await;
        }
        let snap = self.snapshot(&cluster, &local, status);
        self.api.set(snap);
    }

    async fn renew(&mut self, name: &str, ttl: u64) -> anyhow::Result<LeaderOutcome> {
        self.keep_alive(ttl).await?;
        Ok(self.dcs_mut()?.renew_leader(name, ttl).await?)
    }

    pub(super) async fn keep_alive(&mut self, ttl: u64) -> anyhow::Result<()> {
        if self
            .lease_kept_at
            .is_some_and(|t| t.elapsed().as_secs_f64() < 0.2)
        {
            return Ok(());
        }
        let start = Instant::now();
        self.dcs_mut()?.keep_alive(ttl).await?;
        self.lease_kept_at = Some(start);
        Ok(())
    }

    fn dcs_mut(&mut self) -> anyhow::Result<&mut crate::dcs::Dcs> {
        self.dcs
            .as_mut()
            .ok_or_else(|| anyhow::anyhow!("not connected to etcd"))
    }

    /// Config file inputs for the role we are about to run in.
    /// `replica`: None for primary, Some(upstream) for a replica.
    pub(super) fn conf_inputs(
        &self,
        cluster: &ClusterView,
        replica: Option<Option<Upstream>>,
    ) -> ConfInputs {
        let pgc = &self.cfg.postgresql;
        let use_slots = cluster.config.use_slots;
        ConfInputs {
            major: self.major,
            listen: pgc.listen,
            cluster_parameters: cluster.config.postgresql.parameters.clone(),
            local_parameters: pgc.parameters.clone(),
            pg_hba: pgc.pg_hba.clone(),
            replica: replica.map(|up| ReplicaSettings {
                upstream: up.map(|u| u.address),
                user: pgc.authentication.replication.username.clone(),
                password: pgc.authentication.replication.password.clone(),
                application_name: self.cfg.name.clone(),
                slot: use_slots.then(|| slot_name(&self.cfg.name)),
            }),
            synchronous_mode: cluster.config.synchronous_mode,
        }
    }
}

/// Why we are being promoted, in the words `history` records.
fn promotion_reason(cluster: &ClusterView, name: &str, previous: Option<&str>) -> String {
    use crate::dcs::FailoverKind;
    match &cluster.failover {
        Some(f) if f.candidate.as_deref() == Some(name) => match f.kind {
            FailoverKind::Switchover => format!(
                "switchover from {}",
                previous.unwrap_or("the previous leader")
            ),
            FailoverKind::Failover => "manual failover".to_string(),
        },
        _ => match previous {
            Some(prev) => format!("automatic failover: {prev} lost the leader lease"),
            None => "automatic failover: no leader".to_string(),
        },
    }
}
