use crate::config::Config;
use crate::dcs::{format_lsn, Dcs, HistoryEntry, Keys};
use std::time::Duration;

/// `pgwarden history`: the timeline switches recorded in etcd.
pub async fn history(cfg: &Config, json: bool) -> anyhow::Result<()> {
    let mut dcs = Dcs::connect(
        &cfg.etcd.endpoints,
        Keys::new(cfg.key_prefix()),
        Duration::from_secs(cfg.etcd.dial_timeout.max(1)),
    )
    .await?;
    let view = dcs.read_cluster(&cfg.bootstrap.dcs).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&view.history)?);
    } else {
        print!("{}", render(&view.history));
    }
    Ok(())
}

pub fn render(entries: &[HistoryEntry]) -> String {
    let mut out = format!(
        "{:>3}  {:<18}  {:<25}  {:<12}  {}\n",
        "TL", "LSN", "Time", "New leader", "Reason"
    );
    for e in entries {
        out.push_str(&format!(
            "{:>3}  {:<18}  {:<25}  {:<12}  {}\n",
            e.timeline,
            format_lsn(e.lsn),
            e.time,
            e.leader,
            e.reason
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn renders_one_line_per_switch() {
        let text = render(&[HistoryEntry {
            timeline: 2,
            lsn: 0x3000060,
            reason: "automatic failover: node1 lost the leader lease".into(),
            time: "2026-11-25T19:00:00Z".into(),
            leader: "node2".into(),
        }]);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2);
        assert!(lines[1].contains("0/3000060"));
        assert!(lines[1].contains("node2"));
        assert!(lines[1].starts_with("  2"));
    }
}
