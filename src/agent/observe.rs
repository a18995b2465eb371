use super::Agent;
use crate::dcs::{slot_name, ClusterView, Dcs, Initialize, Keys};
use crate::ha::{DataDir, JobFailure, LocalView, PgRun};
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
            match dcs.read_cluster(&defaults).await {
                Ok(view) => {
                    dcs.set_timeout(Duration::from_secs(view.config.retry_timeout.max(1)));
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
        });
        (view, false)
    }

    pub(super) fn dcs_timeout(&self) -> Duration {
        let retry = self
            .last_cluster
            .as_ref()
            .map(|c| c.config.retry_timeout)
            .unwrap_or(self.cfg.bootstrap.dcs.retry_timeout);
        Duration::from_secs(retry.max(1))
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
        self.pg.disconnect();
        match result {
            Ok(()) => {
                tracing::info!("{} finished", describe(&kind));
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
        let data = if self.job.is_some() || !self.pg.has_data() {
            // While a job rewrites the data directory, what is on disk is not
            // a finished state; the job itself is in the view.
            if self.job.is_some() && self.pg.has_data() {
                match &self.system_id {
                    Some(id) => DataDir::Initialized {
                        system_id: id.clone(),
                    },
                    None => DataDir::Empty,
                }
            } else {
                DataDir::Empty
            }
        } else {
            if self.system_id.is_none() {
                match self.pg.system_identifier().await {
                    Ok(id) => self.system_id = Some(id),
                    Err(e) => tracing::warn!("cannot read the system identifier: {e:#}"),
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
        } else if self.pg.postmaster_pid().is_none() {
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
        }
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
        Demote => "demotion".into(),
    }
}
