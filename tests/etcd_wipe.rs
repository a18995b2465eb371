//! etcd's data lost under a running cluster (restored empty, or wiped),
//! with one member's data directory empty at that moment: an empty etcd
//! looks exactly like a new cluster, and the empty member must not run
//! initdb and start a new, empty cluster over the real one. The running
//! primary leads again on its own timeline, no initdb runs anywhere, the
//! empty member is cloned from it, and every acknowledged row is there.

mod support;

use std::time::Duration;
use support::faults::Writer;
use support::{eventually, http_json, Cluster, ClusterOptions};

const LONG: Duration = Duration::from_secs(120);

async fn system_id(c: &Cluster, i: usize) -> Option<String> {
    let client = c.sql(i).await.ok()?;
    let row = client
        .query_one(
            "SELECT system_identifier::text FROM pg_control_system()",
            &[],
        )
        .await
        .ok()?;
    Some(row.get(0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wiped_etcd_with_an_empty_member_never_starts_a_new_cluster() {
    wiped_etcd(ClusterOptions::new(3)).await;
}

/// Patroni's defaults (ttl 30, loop_wait 10, retry_timeout 10): the grace
/// before a bootstrap and the primary's return both scale with loop_wait.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_patroni_timings_a_wiped_etcd_never_starts_a_new_cluster() {
    let mut opts = ClusterOptions::new(3);
    (opts.ttl, opts.loop_wait, opts.retry_timeout) = (30, 10, 10);
    wiped_etcd(opts).await;
}

async fn wiped_etcd(opts: ClusterOptions) {
    let mut c = Cluster::start(&opts);
    let primary = c.ready_with_haproxy().await;
    let sysid = system_id(&c, primary).await.expect("system identifier");
    let tl = c.timeline(primary).await.expect("timeline");
    let writer = Writer::start(c.rw_port, "w", Duration::from_millis(100)).await;
    eventually("a first write", LONG, || async {
        (!writer.acked_ids().is_empty()).then_some(())
    })
    .await;
    let monitor = c.monitor();

    // One replica loses its data directory and its agent is down...
    let empty = (0..3).find(|&i| i != primary).expect("a replica");
    c.sigterm_agent(empty);
    let out = c.pg_ctl(empty, &["stop", "-m", "fast"]);
    assert!(out.status.success() || c.postmaster_pid(empty).is_none());
    let data = c.members[empty].data_dir();
    std::fs::remove_dir_all(&data).expect("remove the replica's data directory");
    let logs_before: Vec<usize> = (0..3).map(|i| c.agent_log(i).len()).collect();

    // ...when etcd comes back empty; the empty member's agent starts then.
    c.etcd.restart_empty();
    c.start_agent(empty);

    // The running primary takes the leader key again and republishes the
    // cluster's system identifier; the empty member clones from it.
    eventually("the old primary leading again", LONG, || async {
        let st = http_json(&c.members[primary].api("/status")).await?;
        (st["role"] == "leader" && st["primary"] == true).then_some(())
    })
    .await;
    let key = format!("/service/{}/initialize", c.scope);
    let init = eventually("initialize republished", LONG, || async {
        c.dcs_get(&key).await
    })
    .await;
    assert_eq!(
        init, sysid,
        "initialize republished with another identifier"
    );
    eventually("the emptied member streaming again", LONG, || async {
        let st = http_json(&c.members[empty].api("/status")).await?;
        (st["state"] == "streaming").then_some(())
    })
    .await;
    for i in 0..3 {
        let id = eventually("every member answering", LONG, || system_id(&c, i)).await;
        assert_eq!(id, sysid, "member {i} runs another cluster");
    }
    assert_eq!(
        c.timeline(primary).await,
        Some(tl),
        "the healthy primary was replaced (a needless election)"
    );
    for (i, before) in logs_before.iter().enumerate() {
        let log = c.agent_log(i);
        // The restarted agent writes a new log.
        let new = if i == empty {
            log.as_str()
        } else {
            log.get(*before..).unwrap_or_default()
        };
        assert!(
            !new.contains("bootstrap race: running initdb")
                && !new.contains("claiming the bootstrap"),
            "member {i} ran initdb after etcd was wiped:\n{new}"
        );
    }

    // Every acknowledged row is there, on the primary and on the clone.
    let acked = writer.stop().await;
    assert!(!acked.is_empty(), "acknowledged writes");
    for i in [primary, empty] {
        eventually("every acknowledged row", LONG, || async {
            let client = c.sql(i).await.ok()?;
            let rows = client
                .query("SELECT id FROM w WHERE id = ANY($1)", &[&acked])
                .await
                .ok()?;
            (rows.len() == acked.len()).then_some(())
        })
        .await;
    }
    monitor.finish().await;
}
