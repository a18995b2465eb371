use crate::config::Config;
use crate::dcs::{ClusterView, Dcs, Keys};
use serde::Serialize;
use std::time::Duration;

#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListFormat {
    Table,
    Json,
}

/// One row of `pgwarden list`; the JSON form is a stable interface for
/// scripts.
#[derive(Debug, Serialize, PartialEq)]
pub struct ListRow {
    pub name: String,
    pub host: String,
    pub port: u16,
    pub role: String,
    pub state: String,
    pub timeline: Option<u32>,
    pub lag_bytes: Option<u64>,
    pub api_url: String,
    pub upstream: Option<String>,
    pub tags: crate::config::Tags,
    /// A changed setting waits for a restart (`pgwarden restart --pending`).
    pub pending_restart: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

pub fn rows(view: &ClusterView) -> Vec<ListRow> {
    let leader_lsn = view.leader_member().and_then(|l| l.wal_lsn);
    view.members
        .iter()
        .map(|m| {
            let is_leader = view.leader.as_deref() == Some(m.name.as_str());
            ListRow {
                name: m.name.clone(),
                host: m.host.clone(),
                port: m.port,
                role: m.role.as_str().to_string(),
                state: m.state.as_str().to_string(),
                timeline: m.timeline,
                lag_bytes: if is_leader {
                    m.wal_lsn.map(|_| 0)
                } else {
                    match (leader_lsn, m.wal_lsn) {
                        (Some(l), Some(x)) => Some(l.saturating_sub(x)),
                        _ => None,
                    }
                },
                api_url: m.api_url.clone(),
                upstream: m.upstream.clone(),
                tags: m.tags.clone(),
                pending_restart: m.pending_restart,
                error: m.error.clone(),
            }
        })
        .collect()
}

pub fn render_table(scope: &str, view: &ClusterView) -> String {
    let rows = rows(view);
    let header = [
        "Member",
        "Host",
        "Role",
        "State",
        "TL",
        "Lag in MB",
        "Pending restart",
    ];
    let cells: Vec<[String; 7]> = rows
        .iter()
        .map(|r| {
            [
                r.name.clone(),
                format!("{}:{}", r.host, r.port),
                r.role.clone(),
                r.state.clone(),
                r.timeline.map(|t| t.to_string()).unwrap_or_default(),
                r.lag_bytes
                    .map(|b| format!("{}", (b as f64 / 1_048_576.0).round() as u64))
                    .unwrap_or_else(|| "unknown".into()),
                if r.pending_restart {
                    "*".into()
                } else {
                    String::new()
                },
            ]
        })
        .collect();
    let mut widths = header.map(|h| h.len());
    for row in &cells {
        for (w, c) in widths.iter_mut().zip(row) {
            *w = (*w).max(c.len());
        }
    }
    let line = |cols: &[String]| -> String {
        let parts: Vec<String> = cols
            .iter()
            .zip(widths)
            .map(|(c, w)| format!(" {c:<w$} "))
            .collect();
        format!("|{}|\n", parts.join("|"))
    };
    let sep = format!(
        "+{}+\n",
        widths
            .iter()
            .map(|w| "-".repeat(w + 2))
            .collect::<Vec<_>>()
            .join("+")
    );
    let mut out = format!("+ Cluster: {scope} ");
    out.push_str(&"-".repeat(sep.len().saturating_sub(out.len() + 2)));
    out.push_str("+\n");
    out.push_str(&line(&header.map(String::from)));
    out.push_str(&sep);
    for row in &cells {
        out.push_str(&line(row));
    }
    out.push_str(&sep);
    if view.config.pause {
        out.push_str(" Maintenance mode: on (pgwarden resume ends it)\n");
    }
    if view.config.synchronous_mode {
        out.push_str(&format!(
            " Replication: {}\n",
            crate::ha::replication_mode(view)
        ));
    }
    if let Some(f) = &view.failover {
        out.push_str(&format!(
            " Pending {:?}: {} -> {}{}\n",
            f.kind,
            f.leader.as_deref().unwrap_or("leader"),
            f.candidate.as_deref().unwrap_or("healthiest replica"),
            f.scheduled_at
                .as_deref()
                .map(|t| format!(" at {t}"))
                .unwrap_or_default()
        ));
    }
    for problem in &view.problems {
        out.push_str(&format!(" Warning: {problem}\n"));
    }
    out
}

pub async fn list(cfg: &Config, format: ListFormat) -> anyhow::Result<()> {
    let mut dcs = Dcs::connect(
        &cfg.etcd.endpoints,
        Keys::new(cfg.key_prefix()),
        Duration::from_secs(cfg.etcd.dial_timeout.max(1)),
    )
    .await?;
    dcs.set_log_problems(false);
    let view = dcs.read_cluster(&cfg.bootstrap.dcs).await?;
    match format {
        ListFormat::Json => {
            // stdout keeps the array scripts parse; the warnings go beside it.
            for problem in &view.problems {
                eprintln!("warning: {problem}");
            }
            println!("{}", serde_json::to_string_pretty(&rows(&view))?);
        }
        ListFormat::Table => print!("{}", render_table(&cfg.scope, &view)),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::DynamicConfig;
    use crate::dcs::Initialize;

    fn view(problems: Vec<String>) -> ClusterView {
        ClusterView {
            initialize: Initialize::SystemId("1".into()),
            leader: None,
            members: Vec::new(),
            config: DynamicConfig::default(),
            config_stored: true,
            status: None,
            history: Vec::new(),
            failover: None,
            failsafe: None,
            sync: None,
            sync_unreadable: false,
            config_revision: 3,
            problems,
        }
    }

    #[test]
    fn problems_follow_the_table() {
        let problem = "etcd key /service/c/config cannot be decoded (expected value at line 1 column 1); using the last config read from it";
        let text = render_table("c", &view(vec![problem.into()]));
        let last = text.lines().last().unwrap();
        assert_eq!(last, format!(" Warning: {problem}"));
        assert!(!render_table("c", &view(Vec::new())).contains("Warning"));
    }
}
