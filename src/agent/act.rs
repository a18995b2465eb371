use super::jobs::RunningJob;
use super::Agent;
use crate::dcs::{slot_name, ClusterStatus, ClusterView, HistoryEntry, LeaderOutcome};
use crate::ha::{Action, JobKind, LocalView, Step, Upstream};
use crate::postgres::{ConfInputs, ReplicaSettings};
use std::time::Instant;

/// What carrying out one decision changed, for the loop to know whether to
/// decide again at once (a won election should promote without waiting).
#[derive(Default)]
pub(super) struct ActOutcome {
    pub dcs_changed: bool,
}

impl Agent {
    pub(super) async fn act(
        &mut self,
        cluster: &ClusterView,
        local: &LocalView,
        steps: &[Step],
    ) -> ActOutcome {
        let mut out = ActOutcome::default();
        for step in steps {
            self.log_step(step);
            let result = self.act_one(cluster, local, &step.action, &mut out).await;
            if let Err(e) = &result {
                tracing::error!("{}: {e:#}", step.reason);
            }
            // Whatever follows a renewal (promote, start as primary) was
            // decided on the premise that we hold the lease: if the renewal
            // did not confirm it, do none of it.
            if step.action == Action::RenewLeader && (result.is_err() || self.last_renew.is_none())
            {
                break;
            }
        }
        self.last_steps = steps.to_vec();
        out
    }

    fn log_step(&self, step: &Step) {
        let quiet = matches!(step.action, Action::RenewLeader | Action::WriteStatus);
        if quiet || self.last_steps.contains(step) {
            tracing::debug!("{}", step.reason);
        } else {
            tracing::info!("{}", step.reason);
        }
    }

    async fn act_one(
        &mut self,
        cluster: &ClusterView,
        local: &LocalView,
        action: &Action,
        out: &mut ActOutcome,
    ) -> anyhow::Result<()> {
        let ttl = cluster.config.ttl;
        let name = self.cfg.name.clone();
        match action {
            Action::ClaimBootstrap => {
                self.keep_alive(ttl).await?;
                let dcs = self.dcs_mut()?;
                if dcs.claim_initialize(&name, ttl).await? == LeaderOutcome::Won {
                    tracing::info!("won the bootstrap race");
                    self.last_renew = self.lease_kept_at;
                    out.dcs_changed = true;
                } else {
                    tracing::info!("another member claimed the bootstrap first");
                }
            }
            Action::AcquireLeader => {
                self.keep_alive(ttl).await?;
                if self.dcs_mut()?.acquire_leader(&name, ttl).await? == LeaderOutcome::Won {
                    tracing::info!("acquired the leader lease");
                    self.last_renew = self.lease_kept_at;
                    out.dcs_changed = true;
                } else {
                    tracing::info!("another member took the leader lease first");
                }
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
                match outcome? {
                    LeaderOutcome::Won => {
                        if self.last_renew.is_none() {
                            out.dcs_changed = true;
                        }
                        self.last_renew = self.lease_kept_at;
                    }
                    LeaderOutcome::Lost => {
                        tracing::warn!("the leader key no longer names us");
                        self.last_renew = None;
                        out.dcs_changed = true;
                    }
                }
            }
            Action::ReleaseLeader => {
                self.last_renew = None;
                self.dcs_mut()?.release_leader(&name).await?;
                out.dcs_changed = true;
            }
            Action::AbandonBootstrap => {
                self.last_renew = None;
                self.dcs_mut()?.abandon_bootstrap(&name).await?;
                out.dcs_changed = true;
            }
            Action::PublishSystemId(id) => {
                self.dcs_mut()?.set_initialize(id).await?;
                out.dcs_changed = true;
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
                self.spawn_job(JobKind::Bootstrap, async move {
                    let result = async {
                        pg.initdb().await?;
                        pg.write_conf(&inputs)?;
                        pg.start().await?;
                        pg.create_replication_user().await?;
                        anyhow::Ok(())
                    }
                    .await;
                    if result.is_err() {
                        // Leave no half-initialised cluster behind: the next
                        // attempt (ours or another member's) starts clean.
                        let _ = pg.stop().await;
                        let _ = pg.remove_data();
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
                self.spawn_job(JobKind::Start, async move {
                    pg.write_conf(&inputs)?;
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
                // Stop answering as primary before the slow part begins.
                self.last_renew = None;
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
                    tokio::task::spawn_blocking(move || pg.remove_data()).await?
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
                self.spawn_job(JobKind::Promote, async move {
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
            Action::ClearFailover => {
                self.dcs_mut()?.clear_failover().await?;
                out.dcs_changed = true;
            }
            Action::Restart => {
                let mut pg = self.pg.detached();
                self.spawn_job(JobKind::Restart, async move {
                    pg.stop().await?;
                    pg.start().await
                });
            }
            Action::Reload => {
                let replica = local.pg.running().is_some_and(|p| p.in_recovery);
                let upstream = cluster
                    .leader
                    .as_deref()
                    .filter(|l| *l != name)
                    .and_then(|l| cluster.member(l))
                    .map(|m| Upstream {
                        name: m.name.clone(),
                        address: format!("{}:{}", m.host, m.port),
                    });
                let inputs = self.conf_inputs(cluster, replica.then_some(upstream));
                self.pg.write_conf(&inputs)?;
                self.pg.reload().await?;
            }
            Action::AckRequest => self.pending_request = None,
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
