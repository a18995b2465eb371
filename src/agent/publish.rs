use super::Agent;
use crate::api::ApiSnapshot;
use crate::dcs::{ClusterView, MemberStatus};
use crate::ha::{DataDir, LocalView};
use std::time::{Duration, Instant};

impl Agent {
    pub(super) fn member_status(&self, cluster: &ClusterView, local: &LocalView) -> MemberStatus {
        let running = local.pg.running();
        let (role, state) = crate::ha::published_role_state(
            local,
            cluster.leader.as_deref() == Some(self.cfg.name.as_str()),
            cluster.is_sync_standby(&self.cfg.name),
        );
        let error = self
            .core
            .decision()
            .problem
            .clone()
            .or_else(|| local.last_failure.as_ref().map(|f| f.message.clone()));
        let (host, port) = split_host_port(&self.cfg.pg_connect_address());
        let upstream = running.and_then(|pg| pg.upstream.clone()).and_then(|addr| {
            cluster
                .members
                .iter()
                .find(|m| format!("{}:{}", m.host, m.port) == addr)
                .map(|m| m.name.clone())
        });
        MemberStatus {
            name: self.cfg.name.clone(),
            role,
            state,
            host,
            port,
            api_url: self.cfg.api_url(),
            conn_url: format!("postgres://{}/postgres", self.cfg.pg_connect_address()),
            timeline: running.and_then(|pg| pg.timeline),
            wal_lsn: running.and_then(|pg| pg.wal_lsn),
            receive_lsn: running.and_then(|pg| pg.receive_lsn),
            upstream,
            tags: self.cfg.tags.clone(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            error,
            pending_restart: running.is_some_and(|pg| pg.pending_restart),
        }
    }

    /// Writes our member key when it changed, and keeps our lease alive.
    pub(super) async fn publish(&mut self, cluster: &ClusterView, status: &MemberStatus) {
        let ttl = cluster.config.ttl;
        if let Err(e) = self.keep_alive(ttl).await {
            tracing::warn!("cannot renew our etcd lease: {e:#}");
            if let Some(dcs) = self.dcs.as_mut() {
                if dcs.has_alternatives() {
                    let _ = dcs.switch_endpoint().await;
                }
            }
            self.dcs_lease_lost();
            return;
        }
        let Some(dcs) = self.dcs.as_mut() else { return };
        // Also when our lease changed (a new ttl): the key on the old lease
        // would vanish with it.
        let lease = dcs.current_lease();
        if self.last_published.as_ref() == Some(status) && self.published_on == lease {
            return;
        }
        match dcs.publish_member(status, ttl).await {
            Ok(()) => {
                self.last_published = Some(status.clone());
                self.published_on = dcs.current_lease();
            }
            Err(e @ crate::dcs::DcsError::NameTaken { .. }) => self.fatal = Some(e.to_string()),
            Err(e) => tracing::warn!("cannot publish our member key: {e}"),
        }
    }

    /// After a failed keep-alive the lease (and keys on it) may be gone;
    /// make sure the next loop republishes.
    fn dcs_lease_lost(&mut self) {
        self.last_published = None;
    }

    pub(super) fn snapshot(
        &self,
        cluster: &ClusterView,
        local: &LocalView,
        status: MemberStatus,
    ) -> ApiSnapshot {
        let ttl = Duration::from_secs(cluster.config.ttl);
        let running = local.pg.running();
        let lag_bytes = match (cluster.status.as_ref(), running) {
            (_, Some(pg)) if !pg.in_recovery => Some(0),
            (Some(st), Some(pg)) => pg
                .wal_lsn
                .or(pg.receive_lsn)
                .map(|l| st.wal_lsn.saturating_sub(l)),
            _ => None,
        };
        ApiSnapshot {
            holds_leader_key: cluster.leader.as_deref() == Some(self.cfg.name.as_str())
                && self.core.serving(),
            lease_valid_until: self.core.lease_valid_until().map(|d| self.epoch + d),
            pg_running: running.is_some(),
            in_recovery: running.is_some_and(|pg| pg.in_recovery),
            streaming: running.is_some_and(|pg| pg.streaming),
            lag_bytes,
            is_sync: cluster.is_sync_standby(&self.cfg.name),
            last_loop: Instant::now(),
            ttl,
            paused: cluster.config.pause,
            postmaster_start: running.map(|pg| pg.postmaster_start.clone()),
            dcs_ok: local.dcs_ok,
            system_id: match &local.data {
                DataDir::Initialized { system_id } => Some(system_id.clone()),
                DataDir::Empty | DataDir::Unknown(_) => None,
            },
            data_dir_free_bytes: local.disk.data_free,
            wal_dir_free_bytes: local.disk.wal_free,
            failover_candidate: !local.tags.nofailover
                && crate::ha::not_a_candidate(cluster, local, self.now()).is_none(),
            resumes_on: crate::ha::resumable_primary(cluster, local, self.now()),
            cluster: Some(cluster.clone()),
            member: status,
        }
    }
}

pub(super) fn split_host_port(addr: &str) -> (String, u16) {
    match addr.rsplit_once(':') {
        Some((h, p)) => (
            h.trim_matches(['[', ']']).to_string(),
            p.parse().unwrap_or(5432),
        ),
        None => (addr.to_string(), 5432),
    }
}
