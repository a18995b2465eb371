use super::Agent;
use crate::dcs::{ClusterView, Dcs, Keys};
use crate::ha::{
    self, ControlInfo, DataDir, DiskSpace, Observation, PeerAddress, PeerPosition, PeerQuery, PgRun,
};
use crate::postgres::Postmaster;
use std::time::Duration;

impl Agent {
    /// `Action::Observe`: etcd's view of the cluster (None if the read
    /// failed) and the local instance.
    pub(super) async fn observe(&mut self) -> Observation {
        let cluster = self.read_cluster().await;
        if let Some(view) = &cluster {
            if view.leader.as_ref().is_some_and(|l| *l != self.cfg.name) {
                self.last_leader_seen = view.leader.clone();
            }
        }
        let job_running = self.job.is_some();
        // Every read below can fail (permissions, no descriptors left): a
        // failure is "unknown", never "stopped" or "empty".
        let postmaster = if job_running {
            Ok(Postmaster::None)
        } else {
            self.pg.postmaster()
        };
        let mut control = None;
        let data = match self.pg.data_present() {
            Ok(false) => DataDir::Empty,
            Err(e) => DataDir::Unknown(format!(
                "cannot read {}: {e}",
                self.cfg.postgresql.data_dir.display()
            )),
            Ok(true) => {
                // pg_control of a stopped instance tells whether it last ran
                // as a primary and on which timeline: what a rejoin depends
                // on. While a job rewrites the data directory, what is on
                // disk is not a finished state: keep what we knew.
                let stopped = matches!(postmaster, Ok(Postmaster::None));
                let mut failure = None;
                if !job_running && (stopped || self.system_id.is_none()) {
                    match self.pg.control_data().await {
                        Ok(cd) => {
                            if stopped {
                                control = Some(ControlInfo {
                                    timeline: cd.timeline,
                                    was_primary: cd.was_primary(),
                                    checkpoint_lsn: cd.checkpoint_lsn,
                                    clean_shutdown: cd.state == "shut down",
                                });
                            }
                            self.system_id = Some(cd.system_id);
                        }
                        Err(e) => {
                            let why = format!("cannot read pg_control: {e:#}");
                            // Once per distinct failure, not every pass.
                            if failure_is_new(&mut self.last_read_failure, &why) {
                                tracing::warn!("{why}");
                            }
                            failure = Some(why);
                        }
                    }
                }
                match (&self.system_id, failure) {
                    // A stopped instance whose pg_control cannot be read:
                    // what it last ran as is unknown too.
                    (Some(_), Some(why)) if stopped => DataDir::Unknown(why),
                    (Some(id), _) => DataDir::Initialized {
                        system_id: id.clone(),
                    },
                    (None, Some(why)) => DataDir::Unknown(why),
                    (None, None) => DataDir::Unknown("system identifier not read yet".into()),
                }
            }
        };
        let pg = match postmaster {
            _ if job_running => PgRun::Unresponsive,
            Err(e) => PgRun::Unknown(format!("cannot read postmaster.pid: {e}")),
            Ok(Postmaster::None) => PgRun::Stopped,
            // It may still answer queries, from a directory that is gone:
            // nothing it says is worth acting on.
            Ok(Postmaster::Orphaned(_)) => PgRun::Orphaned,
            Ok(Postmaster::Running(_)) => match self.pg.observe().await {
                Ok(obs) => {
                    self.major = obs.major;
                    PgRun::Running(obs.state)
                }
                Err(e) => {
                    tracing::debug!("PostgreSQL does not answer: {e:#}");
                    PgRun::Unresponsive
                }
            },
        };
        let conf_outdated = {
            let view = cluster.as_ref().unwrap_or(self.core.cluster());
            match pg.running() {
                Some(running) => {
                    let role = ha::conf_role(view, &self.cfg.name, running);
                    self.pg.conf_differs(&self.conf_inputs(view, role))
                }
                None => false,
            }
        };
        let (data_free, wal_free) = self.pg.free_space();
        Observation {
            cluster,
            data,
            pg,
            control,
            conf_outdated,
            disk: DiskSpace {
                data_free,
                wal_free,
            },
            major: self.major,
            wall_clock: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
        }
    }

    /// Reads the cluster from etcd, on another endpoint if the first fails.
    async fn read_cluster(&mut self) -> Option<ClusterView> {
        if self.dcs.is_none() {
            let keys = Keys::new(self.cfg.key_prefix());
            match Dcs::connect(&self.cfg.etcd.endpoints, keys, self.dcs_timeout()).await {
                Ok(d) => self.dcs = Some(d),
                Err(e) => tracing::debug!("etcd connection failed: {e}"),
            }
        }
        // An undecodable config key falls back to what this agent last ran
        // with, not to the file's bootstrap defaults.
        let defaults = self.core.cluster().config.clone();
        let dcs = self.dcs.as_mut()?;
        let mut result = dcs.read_cluster(&defaults).await;
        if result.is_err() && dcs.has_alternatives() && dcs.switch_endpoint().await.is_ok() {
            result = dcs.read_cluster(&defaults).await;
        }
        match result {
            Ok(view) => {
                dcs.set_timeout(request_timeout(view.config.retry_timeout));
                Some(view)
            }
            Err(e) => {
                tracing::warn!("cannot read the cluster from etcd: {e}");
                None
            }
        }
    }

    pub(super) fn dcs_timeout(&self) -> Duration {
        request_timeout(self.core.cluster().config.retry_timeout)
    }

    /// `Action::AskPeers`: what the policy asked to know about others.
    pub(super) async fn ask_peers(&self, query: &PeerQuery) -> Vec<PeerPosition> {
        match query {
            PeerQuery::Received(m) => {
                // A hand-over waits for the candidate to have the shutdown
                // checkpoint: ask its PostgreSQL directly, for a fresh
                // answer rather than one a loop old.
                vec![m.answered(self.pg.remote_receive_lsn(&m.address).await)]
            }
            PeerQuery::Positions(members) => self.ask_positions(members).await,
        }
    }

    /// Every member's API at once, with a short timeout: an unreachable
    /// member answers "no position" and does not block.
    async fn ask_positions(&self, members: &[PeerAddress]) -> Vec<PeerPosition> {
        let mut set = tokio::task::JoinSet::new();
        for m in members.iter().cloned() {
            let client = self.http.clone();
            set.spawn(async move {
                let url = format!("{}/status", m.api_url.trim_end_matches('/'));
                let answer = async {
                    let v: serde_json::Value =
                        client.get(&url).send().await.ok()?.json().await.ok()?;
                    let flag = |k: &str| v.get(k).and_then(|x| x.as_bool());
                    let running = flag("pg_running").unwrap_or(false);
                    let primary = running && flag("in_recovery") == Some(false);
                    let lsn = |k: &str| v.get(k).and_then(|x| x.as_u64());
                    let position = running
                        .then(|| lsn("receive_lsn").max(lsn("wal_lsn")))
                        .flatten();
                    let system_id = v
                        .get("database_system_identifier")
                        .and_then(|x| x.as_str())
                        .map(str::to_string);
                    let number = |k: &str| {
                        v.get(k)
                            .and_then(|x| x.as_u64())
                            .and_then(|x| u32::try_from(x).ok())
                    };
                    Some(PeerPosition {
                        running_primary: primary,
                        resumes_on: number("resumes_primary_on_timeline"),
                        timeline: number("timeline"),
                        // Older agents do not say: a candidate as before.
                        candidate: flag("failover_candidate").unwrap_or(true),
                        ..m.answered_with_data(position, system_id)
                    })
                }
                .await;
                answer.unwrap_or_else(|| m.unanswered())
            });
        }
        let mut out = Vec::new();
        while let Some(r) = set.join_next().await {
            if let Ok(p) = r {
                out.push(p);
            }
        }
        // A task that panicked still counts as asked and unanswered.
        for m in members {
            if !out.iter().any(|p| p.name == m.name) {
                out.push(m.unanswered());
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }
}

impl Agent {
    /// `Action::AskFailsafe`: POST /failsafe to every member at once; true
    /// when every one confirmed. A member that does not answer in time has
    /// not confirmed.
    pub(super) async fn ask_failsafe(&self, members: &[PeerAddress]) -> bool {
        let mut set = tokio::task::JoinSet::new();
        let body = serde_json::json!({
            "leader": self.cfg.name,
            "ttl": self.core.cluster().config.ttl,
        });
        let timeout = crate::ha::FAILSAFE_ASK_TIMEOUT;
        for m in members.iter().cloned() {
            let mut req = self
                .http
                .post(format!("{}/failsafe", m.api_url.trim_end_matches('/')))
                .json(&body)
                .timeout(timeout);
            if let (Some(u), Some(p)) = (&self.cfg.api.username, &self.cfg.api.password) {
                req = req.basic_auth(u, Some(p));
            }
            set.spawn(async move {
                let answer = req.send().await;
                match answer {
                    Ok(r) if r.status().is_success() => None,
                    Ok(r) => Some(format!("{}: {}", m.name, r.status())),
                    Err(e) => Some(format!("{}: {e}", m.name)),
                }
            });
        }
        let mut refused = Vec::new();
        let mut answered = 0;
        while let Some(r) = set.join_next().await {
            answered += 1;
            match r {
                Ok(None) => {}
                Ok(Some(why)) => refused.push(why),
                Err(e) => refused.push(format!("a request task failed: {e}")),
            }
        }
        if answered < members.len() {
            refused.push("not every member was asked".into());
        }
        if refused.is_empty() {
            tracing::debug!(
                "failsafe: all {} members confirm they cannot reach etcd either: staying primary",
                members.len()
            );
            true
        } else {
            tracing::warn!("failsafe: not confirmed ({})", refused.join("; "));
            false
        }
    }
}

/// Remembers `why` as the last failed read; true when it differs from
/// the one before.
fn failure_is_new(last: &mut Option<String>, why: &str) -> bool {
    let new = last.as_deref() != Some(why);
    *last = Some(why.to_string());
    new
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
