//! Resource faults are detected and reported, not looped: a data directory
//! deleted under a running PostgreSQL, and a primary's disk filling up.

mod support;

use std::time::{Duration, Instant};
use support::faults::Writer;
use support::{eventually, http_json, http_status, Cluster, ClusterOptions};

const LONG: Duration = Duration::from_secs(120);

fn alive(pid: i32) -> bool {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok()
}

/// The WAL receiver's status on member i (None: no answer or no receiver).
async fn receiver_status(c: &Cluster, i: usize) -> Option<String> {
    let client = c.sql(i).await.ok()?;
    let row = client
        .query_opt("SELECT status FROM pg_stat_wal_receiver", &[])
        .await
        .ok()??;
    row.try_get(0).ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_data_directory_is_noticed_and_the_replica_streams_again_within_15s() {
    let mut c = Cluster::start(&ClusterOptions::new(3));
    let primary = c.ready_with_haproxy().await;
    let victim = (primary + 1) % c.members.len();
    let orphan = c.postmaster_pid(victim).expect("the replica's postmaster");
    let log_before = c.agent_log(victim).len();

    std::fs::remove_dir_all(c.members[victim].data_dir()).expect("delete the data directory");
    let fault = Instant::now();

    // Streaming again means a new postmaster on a new data directory whose
    // WAL receiver streams, and a row written now reaches it.
    let primary_sql = c.sql(primary).await.expect("primary");
    primary_sql
        .batch_execute("CREATE TABLE after_delete (id int); INSERT INTO after_delete VALUES (1)")
        .await
        .expect("write on the primary");
    eventually(
        "the member streams again from a new data directory",
        Duration::from_secs(15),
        || async {
            let pid = c.postmaster_pid(victim)?;
            if pid == orphan {
                return None;
            }
            (receiver_status(&c, victim).await.as_deref() == Some("streaming")).then_some(())
        },
    )
    .await;
    let took = fault.elapsed();
    eventually(
        "the row written after the fault reached it",
        LONG,
        || async { (c.count(victim, "after_delete").await == Some(1)).then_some(()) },
    )
    .await;
    assert!(
        !alive(orphan),
        "the postmaster left on the deleted data directory still runs"
    );
    eventually("/replica answers 200 again", LONG, || async {
        (http_status("GET", &c.members[victim].api("/replica")).await == 200).then_some(())
    })
    .await;
    let log = c.agent_log(victim);
    let log = log.get(log_before..).unwrap_or_default();
    assert!(
        log.contains("data directory is gone"),
        "the agent did not say why it stopped PostgreSQL:\n{log}"
    );
    // The primary and its lease were never touched.
    assert_eq!(c.wait_single_primary(LONG).await, primary);
    eprintln!("streaming again {took:?} after the data directory was deleted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_whose_data_directory_is_deleted_fails_over_and_rejoins_as_a_clone() {
    let mut c = Cluster::start(&ClusterOptions::new(3));
    let old = c.ready_with_haproxy().await;
    let writer = Writer::start(c.rw_port, "w", Duration::from_millis(100)).await;
    eventually("a first write", LONG, || async {
        (!writer.acked_ids().is_empty()).then_some(())
    })
    .await;
    let monitor = c.monitor();
    let orphan = c.postmaster_pid(old).expect("the primary's postmaster");

    std::fs::remove_dir_all(c.members[old].data_dir()).expect("delete the data directory");
    let fault = Instant::now();
    let new = eventually("a replica promoted", LONG, || async {
        for (i, m) in c.members.iter().enumerate() {
            if i != old && http_status("GET", &m.api("/primary")).await == 200 {
                return Some(i);
            }
        }
        None
    })
    .await;
    let failover = fault.elapsed();
    assert!(
        !alive(orphan),
        "the old primary's postmaster still runs on its deleted data directory"
    );
    eventually("writes resume through HAProxy", LONG, || async {
        (writer.acked_after(fault) > 0).then_some(())
    })
    .await;
    eventually("the old primary streams from the new one", LONG, || async {
        (receiver_status(&c, old).await.as_deref() == Some("streaming")
            && http_status("GET", &c.members[old].api("/replica")).await == 200)
            .then_some(())
    })
    .await;
    let rejoin = fault.elapsed();
    assert_eq!(c.wait_single_primary(LONG).await, new);
    writer.stop().await;
    monitor.finish().await;
    eprintln!(
        "failover {failover:?}, streaming again {rejoin:?} after the data directory was deleted"
    );
}

/// The starts of PostgreSQL the agent's log reports (each start job ends
/// with "start of PostgreSQL finished" or "... failed").
fn start_attempts(log: &str) -> usize {
    log.lines()
        .filter(|l| {
            l.contains("start of PostgreSQL finished") || l.contains("start of PostgreSQL failed")
        })
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_on_a_full_disk_fails_over_reports_it_and_rejoins_once_space_is_freed() {
    if !support::is_root() {
        eprintln!("skipped: mounting a tmpfs needs root");
        return;
    }
    let mut opts = ClusterOptions::new(3);
    opts.members[0].tmpfs_mib = Some(160);
    // node1 bootstraps, so the primary is the member on the small disk.
    opts.autostart = 1;
    let mut c = Cluster::start(&opts);
    assert_eq!(c.wait_single_primary(LONG).await, 0);
    c.start_agent(1);
    c.start_agent(2);
    assert_eq!(c.ready_with_haproxy().await, 0);
    let metrics = |i: usize| {
        let url = c.members[i].api("/metrics");
        async move { reqwest::get(url).await.ok()?.text().await.ok() }
    };
    let gauge = |text: &str, name: &str| -> Option<u64> {
        text.lines()
            .find(|l| l.starts_with(&format!("{name}{{")))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<f64>().ok())
            .map(|v| v as u64)
    };
    let free_before = eventually("the free-space gauges", LONG, || async {
        let text = metrics(0).await?;
        Some((
            gauge(&text, "pgwarden_data_dir_free_bytes")?,
            gauge(&text, "pgwarden_wal_dir_free_bytes")?,
        ))
    })
    .await;
    assert!(
        free_before.0 > 32 << 20 && free_before.1 > 32 << 20,
        "{free_before:?}"
    );
    let writer = Writer::start(c.rw_port, "w", Duration::from_millis(100)).await;
    eventually("a first write", LONG, || async {
        (!writer.acked_ids().is_empty()).then_some(())
    })
    .await;

    let fs = c.members[0].tmpfs.as_ref().expect("node1's tmpfs");
    let filler = fs.fill("filler");
    let log_before = c.agent_log(0).len();
    let fault = Instant::now();
    // The next WAL segment cannot be created: PostgreSQL PANICs.
    if let Ok(client) = c.sql(0).await {
        let _ = client
            .batch_execute("SELECT pg_switch_wal(); INSERT INTO w (id) VALUES (-1)")
            .await;
    }

    let new = eventually("a healthy replica promoted", LONG, || async {
        for i in 1..c.members.len() {
            if http_status("GET", &c.members[i].api("/primary")).await == 200 {
                return Some(i);
            }
        }
        None
    })
    .await;
    let failover = fault.elapsed();
    eventually("writes resume through HAProxy", LONG, || async {
        (writer.acked_after(fault) > 0).then_some(())
    })
    .await;

    // The full member says so: /status, /metrics, `pgwarden list`.
    eventually("node1 reports its full disk", LONG, || async {
        let st = http_json(&c.members[0].api("/status")).await?;
        let error = st["error"].as_str()?;
        (st["state"] == "disk full" && error.contains("disk full")).then_some(())
    })
    .await;
    let text = metrics(0).await.expect("metrics");
    let free = gauge(&text, "pgwarden_data_dir_free_bytes").expect("data dir gauge");
    assert!(free < 16 << 20, "free bytes {free}");
    assert!(
        text.contains("state=\"disk full\""),
        "pgwarden_info: {text}"
    );
    let out = c.cli(1, &["list", "--format", "json"]);
    let rows: serde_json::Value = serde_json::from_slice(&out.stdout).expect("list json");
    let row = rows
        .as_array()
        .and_then(|r| r.iter().find(|m| m["name"] == "node1"))
        .expect("node1 in list");
    assert_eq!(row["state"], "disk full", "{row}");

    // No restart loop: while the disk stays full nothing is started on it,
    // neither by the agent nor behind its back.
    let until = Instant::now() + Duration::from_secs(10);
    while Instant::now() < until {
        assert_eq!(
            c.postmaster_pid(0),
            None,
            "PostgreSQL runs again on the full disk"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let log = c.agent_log(0);
    let attempts = start_attempts(log.get(log_before..).unwrap_or_default());
    assert_eq!(
        attempts, 0,
        "PostgreSQL was started {attempts} times on a full disk"
    );
    assert_eq!(c.wait_single_primary(LONG).await, new);

    // Space freed: it rejoins as a replica of the new primary by itself.
    std::fs::remove_file(&filler).expect("remove the filler");
    let freed = Instant::now();
    eventually("node1 streams from the new primary", LONG, || async {
        (http_status("GET", &c.members[0].api("/replica")).await == 200).then_some(())
    })
    .await;
    let rejoin = freed.elapsed();
    let st = http_json(&c.members[0].api("/status"))
        .await
        .expect("status");
    assert!(st.get("error").is_none_or(|e| e.is_null()), "{st}");
    writer.stop().await;
    eprintln!(
        "failover {failover:?} after the disk filled; rejoined {rejoin:?} after space was freed"
    );
}
