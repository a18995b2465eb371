use super::Agent;
use crate::dcs::{slot_name, ClusterView, Dcs, Initialize, Keys};
use crate::ha::{ControlInfo, DataDir, JobFailure, JobKind, LocalView, PeerPosition, PgRun};
use std::time::Duration;

impl Agent {
    /// Reads the cluster from etcd; on failure returns the last view seen
    /// (flagged by `dcs_ok == false` in the local view).
    pub(super) async fn observe_cluster(&mut self) -> (ClusterView, bool) {
        if self.dcs.is_none() {
            let keys = Keys::new(self.cfg.key_prefix());
            match Dcs::connect(&self.cfg.etcd.endpoints, keys, self.dcs_timeout()).await {
                Ok(d) => self.dcs = Some(d),
                Err(e) => tracing::debug!("etcd connection failed: {e}"),
            }
        }
        let defaults = self.cfg.bootstrap.dcs.clone();
        if let Some(dcs) = self.dcs.as_mut() {
            let mut result = dcs.read_cluster(&defaults).await;
            if result.is_err() && dcs.has_alternatives() && dcs.switch_endpoint().await.is_ok() {
                result = dcs.read_cluster(&defaults).await;
            }
            match result {
                Ok(view) => {
                    dcs.set_timeout(request_timeout(view.config.retry_timeout));
                    if view.leader.as_ref().is_some_and(|l| *l != self.cfg.name) {
                        self.last_leader_seen = view.leader.clone();
                    }
                    self.last_cluster = Some(view.clone());
                    return (view, true);
                }
                Err(e) => tracing::warn!("cannot read the cluster from etcd: {e}"),
            }
        }
        let view = self.last_cluster.clone().unwrap_or_else(|| ClusterView {
            initialize: Initialize::Absent,
            leader: None,
            members: Vec::new(),
            config: defaults,
            config_stored: false,
            status: None,
            history: Vec::new(),
            failover: None,
            config_revision: 0,
            problems: Vec::new(),
        });
        (view, false)
    }

    pub(super) fn dcs_timeout(&self) -> Duration {
        let retry = self
            .last_cluster
            .as_ref()
            .map(|c| c.config.retry_timeout)
            .unwrap_or(self.cfg.bootstrap.dcs.retry_timeout);
        request_timeout(retry)
    }

    /// Collects finished background jobs, recording failures.
    pub(super) async fn reap_job(&mut self) {
        if !self.job.as_ref().is_some_and(|j| j.is_finished()) {
            return;
        }
        let Some(job) = self.job.take() else { return };
        let (kind, result) = job.outcome().await;
        // A job may have replaced the data directory.
        self.system_id = None;
        if !matches!(kind, JobKind::Start | JobKind::Stop) {
            self.last_control = None;
        }
        self.pg.disconnect();
        match result {
            Ok(()) => {
                tracing::info!("{} finished", describe(&kind));
                if kind == JobKind::Promote {
                    tracing::info!("promoted: now the primary");
                    if let Some(p) = self.pending_promotion.take() {
                        self.record_promotion(p).await;
                    }
                }
                if self.last_failure.as_ref().is_some_and(|f| f.kind == kind) {
                    self.last_failure = None;
                }
            }
            Err(e) => {
                let message = format!("{:#}", e);
                tracing::error!("{} failed: {message}", describe(&kind));
                self.last_failure = Some(JobFailure {
                    kind,
                    message,
                    at: self.now(),
                });
            }
        }
    }

    pub(super) async fn observe_local(&mut self, cluster: &ClusterView, dcs_ok: bool) -> LocalView {
        let postmaster = self.job.is_none() && self.pg.postmaster_pid().is_some();
        let data = if !self.pg.has_data() {
            DataDir::Empty
        } else if self.job.is_some() {
            // While a job rewrites the data directory, what is on disk is not
            // a finished state; the job itself is in the view.
            match &self.system_id {
                Some(id) => DataDir::Initialized {
                    system_id: id.clone(),
                },
                None => DataDir::Empty,
            }
        } else {
            // pg_control of a stopped instance tells whether it last ran as
            // a primary and on which timeline: what a rejoin depends on.
            if !postmaster || self.system_id.is_none() {
                match self.pg.control_data().await {
                    Ok(cd) => {
                        if !postmaster {
                            self.last_control = Some(ControlInfo {
                                timeline: cd.timeline,
                                was_primary: cd.was_primary(),
                                checkpoint_lsn: cd.checkpoint_lsn,
                                clean_shutdown: cd.state == "shut down",
                            });
                        }
                        self.system_id = Some(cd.system_id);
                    }
                    Err(e) => tracing::warn!("cannot read pg_control: {e:#}"),
                }
            }
            match &self.system_id {
                Some(id) => DataDir::Initialized {
                    system_id: id.clone(),
                },
                None => DataDir::Empty,
            }
        };
        let pg = if self.job.is_some() {
            PgRun::Unresponsive
        } else if !postmaster {
            PgRun::Stopped
        } else {
            match self.pg.observe().await {
                Ok(obs) => {
                    self.major = obs.major;
                    PgRun::Running(obs.state)
                }
                Err(e) => {
                    tracing::debug!("PostgreSQL does not answer: {e:#}");
                    PgRun::Unresponsive
                }
            }
        };
        self.track_slots(cluster, &pg);
        self.track_primary_down(cluster, &pg);
        // Rule 3 needs the candidates' positions when there is no leader; a
        // leader handing over needs its candidate's.
        let i_lead = cluster.leader.as_deref() == Some(self.cfg.name.as_str());
        let electing = cluster.leader.is_none() && pg.running().is_some_and(|p| p.in_recovery);
        let handing_over = i_lead && cluster.failover.is_some() && pg.running().is_none();
        let peers = if dcs_ok && electing {
            self.ask_peers(cluster).await
        } else if dcs_ok && handing_over {
            self.ask_candidate(cluster).await
        } else {
            Vec::new()
        };
        let conf_outdated = self.conf_outdated(cluster, &pg);
        LocalView {
            name: self.cfg.name.clone(),
            tags: self.cfg.tags.clone(),
            data,
            pg,
            job: self.job.as_ref().map(|j| j.kind.clone()),
            last_failure: self.last_failure.clone(),
            dcs_ok,
            last_renew: self.last_renew.map(|t| self.since_epoch(t)),
            slot_last_seen: self.slot_last_seen.clone(),
            control: self.last_control.clone(),
            peers,
            primary_down_since: self.primary_down_since,
            reclone_on_rewind_failure: self.cfg.postgresql.remove_data_directory_on_rewind_failure,
            wall_clock: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            request: self.pending_request,
            conf_outdated,
        }
    }

    /// The running instance's config files lag behind what the cluster's
    /// dynamic config and our own file render now.
    fn conf_outdated(&self, cluster: &ClusterView, pg: &PgRun) -> bool {
        let Some(running) = pg.running() else {
            return false;
        };
        let role = running.in_recovery.then(|| {
            running.upstream.clone().map(|address| crate::ha::Upstream {
                name: String::new(),
                address,
            })
        });
        self.pg.conf_differs(&self.conf_inputs(cluster, role))
    }

    /// Starts the primary_start_timeout clock when we hold the leader key
    /// without a running primary (a bootstrap in progress does not count).
    fn track_primary_down(&mut self, cluster: &ClusterView, pg: &PgRun) {
        let i_lead = cluster.leader.as_deref() == Some(self.cfg.name.as_str());
        let bootstrapping = matches!(self.job.as_ref().map(|j| &j.kind), Some(JobKind::Bootstrap));
        if !i_lead || pg.is_primary() || bootstrapping {
            self.primary_down_since = None;
        } else if self.primary_down_since.is_none() {
            self.primary_down_since = Some(self.now());
        }
    }

    /// A leader handing over waits for its candidate to have the shutdown
    /// checkpoint: ask the candidate's PostgreSQL directly, for a fresh
    /// answer rather than one a loop old.
    async fn ask_candidate(&self, cluster: &ClusterView) -> Vec<PeerPosition> {
        let Some(m) = cluster
            .failover
            .as_ref()
            .and_then(|f| f.candidate.as_deref())
            .and_then(|c| cluster.member(c))
        else {
            return Vec::new();
        };
        let lsn = self
            .pg
            .remote_receive_lsn(&format!("{}:{}", m.host, m.port))
            .await;
        vec![PeerPosition {
            name: m.name.clone(),
            wal_lsn: lsn,
            nofailover: m.tags.nofailover,
            failover_priority: m.tags.failover_priority,
        }]
    }

    /// Rule 3 needs the other candidates' positions: ask their APIs, all at
    /// once, with a short timeout (an unreachable member does not block).
    async fn ask_peers(&self, cluster: &ClusterView) -> Vec<PeerPosition> {
        let others: Vec<_> = cluster
            .members
            .iter()
            .filter(|m| m.name != self.cfg.name)
            .cloned()
            .collect();
        let asks = others.into_iter().map(|m| {
            let client = self.http.clone();
            async move {
                let url = format!("{}/status", m.api_url.trim_end_matches('/'));
                let answer = async {
                    let v: serde_json::Value =
                        client.get(&url).send().await.ok()?.json().await.ok()?;
                    let running = v
                        .get("pg_running")
                        .and_then(|x| x.as_bool())
                        .unwrap_or(false);
                    let lsn = |k: &str| v.get(k).and_then(|x| x.as_u64());
                    running
                        .then(|| lsn("receive_lsn").max(lsn("wal_lsn")))
                        .flatten()
                }
                .await;
                PeerPosition {
                    name: m.name.clone(),
                    wal_lsn: answer,
                    nofailover: m.tags.nofailover,
                    failover_priority: m.tags.failover_priority,
                }
            }
        });
        let mut set = tokio::task::JoinSet::new();
        for a in asks {
            set.spawn(a);
        }
        let mut out = Vec::new();
        while let Some(r) = set.join_next().await {
            if let Ok(p) = r {
                out.push(p);
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    /// Remembers when each slot's member was last present, so the policy
    /// can drop slots only for members gone longer than member_slots_ttl.
    fn track_slots(&mut self, cluster: &ClusterView, pg: &PgRun) {
        let Some(running) = pg.running() else { return };
        let now = self.now();
        let present: Vec<String> = cluster.members.iter().map(|m| slot_name(&m.name)).collect();
        self.slot_last_seen.retain(|s, _| running.slots.contains(s));
        for slot in &running.slots {
            let seen = self.slot_last_seen.entry(slot.clone()).or_insert(now);
            if present.contains(slot) {
                *seen = now;
            }
        }
    }
}

pub(super) fn describe(kind: &crate::ha::JobKind) -> String {
    use crate::ha::JobKind::*;
    match kind {
        Bootstrap => "bootstrap (initdb)".into(),
        Clone { from } => format!("clone from {from}"),
        Start => "start of PostgreSQL".into(),
        Stop => "stop of PostgreSQL".into(),
        Rewind { from } => format!("rewind from {from}"),
        Promote => "promotion".into(),
        Restart => "restart".into(),
        RemoveData => "removal of the data directory".into(),
    }
}

/// One etcd request may take half of retry_timeout: a pass can then make
/// a failed request and its retry on another endpoint and still act (stop
/// a primary) before the lease may have run out.
fn request_timeout(retry_timeout: u64) -> Duration {
    Duration::from_millis((retry_timeout.max(1) * 1000 / 2).max(500))
}
