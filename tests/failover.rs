//! The recipe's failure table on real processes: automatic failover,
//! self-fencing and failback with pg_rewind, with the safety invariants
//! checked while each fault runs.

mod support;

use std::time::{Duration, Instant};
use support::faults::Writer;
use support::{eventually, http_json, http_status, Cluster, ClusterOptions};

const LONG: Duration = Duration::from_secs(120);

/// Waits until a write through HAProxy's read-write port commits after `t`.
async fn writes_resume(w: &Writer, t: Instant) {
    eventually(
        "a write accepted through HAProxy after the fault",
        LONG,
        || async { (w.acked_after(t) > 0).then_some(()) },
    )
    .await;
}

async fn rows_on(c: &Cluster, i: usize, table: &str, want: &[i64]) {
    let port = c.members[i].pg_port;
    let want_len = want.len();
    eventually(
        &format!("{} has every acknowledged row", c.members[i].name),
        LONG,
        || async {
            let client = support::sql(port, support::cluster::SUPERUSER_PASSWORD)
                .await
                .ok()?;
            let rows = client
                .query(&format!("SELECT id FROM {table}"), &[])
                .await
                .ok()?;
            let have: std::collections::HashSet<i64> = rows.iter().map(|r| r.get(0)).collect();
            let missing = want.iter().filter(|id| !have.contains(id)).count();
            (missing == 0 && have.len() >= want_len).then_some(())
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn primary_postgres_killed_is_restarted_in_place_and_loses_nothing() {
    let mut c = Cluster::start(&ClusterOptions::new(3));
    let primary = c.ready_with_haproxy().await;
    let writer = Writer::start(c.rw_port, "w", Duration::from_millis(50)).await;
    eventually("some writes before the fault", LONG, || async {
        (writer.acked_ids().len() > 10).then_some(())
    })
    .await;
    let monitor = c.monitor();

    let before = c.postmaster_pid(primary).expect("postmaster");
    let fault = Instant::now();
    c.kill9_postgres(primary);
    writes_resume(&writer, fault).await;
    let acked = writer.stop().await;
    monitor.finish().await;

    // The agent restarted PostgreSQL in place (within primary_start_timeout)
    // and kept the lease: same leader, new postmaster.
    let now_primary = c.wait_single_primary(LONG).await;
    assert_eq!(now_primary, primary, "restarted in place, no failover");
    assert_ne!(c.postmaster_pid(primary), Some(before), "a new postmaster");
    // Crash recovery keeps every committed row: none lost.
    rows_on(&c, primary, "w", &acked).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn primary_server_down_fails_over_and_the_old_primary_rejoins_by_rewind() {
    let mut c = Cluster::start(&ClusterOptions::new(3));
    let old = c.ready_with_haproxy().await;
    let writer = Writer::start(c.rw_port, "w", Duration::from_millis(50)).await;
    eventually("some writes before the fault", LONG, || async {
        (writer.acked_ids().len() > 10).then_some(())
    })
    .await;
    let monitor = c.monitor();

    let fault = Instant::now();
    c.kill9_server(old);
    let new = c.wait_single_primary(LONG).await;
    assert_ne!(new, old);
    let elapsed = fault.elapsed();
    // The lease (ttl 10 s) had to expire first: nobody may promote before.
    assert!(
        elapsed >= Duration::from_secs(5),
        "promoted after {elapsed:?}, before the lease could expire"
    );
    writes_resume(&writer, fault).await;
    // Ids with the moment each was acknowledged: an insert in flight when
    // the server died may be acknowledged by the old primary a moment
    // after `fault` and still be lost.
    let acked_at: Vec<(i64, Instant)> = writer
        .acked
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    let acked = writer.stop().await;

    // The other replica follows the new primary.
    let other = (0..3)
        .find(|i| *i != old && *i != new)
        .expect("a third member");
    eventually(
        "the other replica streams from the new primary",
        LONG,
        || async {
            let st = http_json(&c.members[other].api("/status")).await?;
            (st["upstream"] == c.members[new].name.as_str()
                && http_status("GET", &c.members[other].api("/replica")).await == 200)
                .then_some(())
        },
    )
    .await;

    // history records the promotion, on a new timeline.
    let out = c.cli(new, &["history", "--format", "json"]);
    let hist: serde_json::Value = serde_json::from_slice(&out.stdout).expect("history JSON");
    let last = hist
        .as_array()
        .and_then(|a| a.last())
        .expect("a history entry")
        .clone();
    assert_eq!(last["leader"], c.members[new].name.as_str());
    assert_eq!(last["timeline"], 2);

    // The new leader saw the old primary in etcd lately: its slot is
    // ready before it comes back, so its first connection does not fail
    // and sit out wal_retrieve_retry_interval.
    let slot = c.members[old].name.to_lowercase();
    eventually("the old primary's slot on the new leader", LONG, || async {
        let client = c.sql(new).await.ok()?;
        let row = client
            .query_one(
                "SELECT count(*) FROM pg_replication_slots WHERE slot_name = $1",
                &[&slot],
            )
            .await
            .ok()?;
        (row.get::<_, i64>(0) == 1).then_some(())
    })
    .await;

    // The old primary comes back: it rewinds and streams from the new one.
    let back = Instant::now();
    c.start_agent(old);
    eventually(
        "the old primary streams again as a replica",
        LONG,
        || async {
            (http_status("GET", &c.members[old].api("/replica")).await == 200).then_some(())
        },
    )
    .await;
    eprintln!(
        "old primary: agent started to /replica 200 in {:.1}s",
        back.elapsed().as_secs_f64()
    );
    monitor.finish().await;
    let log = c.agent_log(old);
    assert!(
        log.contains("rewinding with pg_rewind"),
        "old primary rejoined without rewind:\n{log}"
    );

    // Asynchronous replication may lose what the dead primary had not yet
    // shipped: only rows acknowledged around the fault (the last second
    // before it, or in flight at it), and no more than a second's worth.
    let lost: Vec<(i64, Instant)> = {
        let client = support::sql(c.members[new].pg_port, support::cluster::SUPERUSER_PASSWORD)
            .await
            .expect("connect");
        let rows = client.query("SELECT id FROM w", &[]).await.expect("select");
        let have: std::collections::HashSet<i64> = rows.iter().map(|r| r.get(0)).collect();
        acked_at
            .iter()
            .filter(|(id, _)| !have.contains(id))
            .copied()
            .collect()
    };
    assert!(
        lost.len() <= 20,
        "lost {} acknowledged rows (more than one second of writes)",
        lost.len()
    );
    for (id, at) in &lost {
        let around = *at + Duration::from_secs(1) >= fault && *at <= fault + Duration::from_secs(2);
        assert!(
            around,
            "row {id} acknowledged well away from the fault was lost"
        );
    }
    let kept: Vec<i64> = acked
        .iter()
        .filter(|id| !lost.iter().any(|(l, _)| l == *id))
        .copied()
        .collect();
    for i in 0..3 {
        rows_on(&c, i, "w", &kept).await;
    }
    let counts: Vec<Option<i64>> = futures_counts(&c, "w").await;
    assert!(
        counts.windows(2).all(|w| w[0] == w[1]),
        "row counts differ: {counts:?}"
    );
}

async fn futures_counts(c: &Cluster, table: &str) -> Vec<Option<i64>> {
    let mut out = Vec::new();
    for i in 0..c.members.len() {
        out.push(c.count(i, table).await);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_on_the_primary_agent_fails_over_without_waiting_for_the_lease() {
    let mut c = Cluster::start(&ClusterOptions::new(3));
    let old = c.ready_with_haproxy().await;
    let writer = Writer::start(c.rw_port, "w", Duration::from_millis(50)).await;
    eventually("some writes before the fault", LONG, || async {
        (writer.acked_ids().len() > 10).then_some(())
    })
    .await;
    let monitor = c.monitor();

    let fault = Instant::now();
    let status = c.sigterm_agent(old).expect("agent exit");
    assert!(status.success());
    let new = c.wait_single_primary(LONG).await;
    let took = fault.elapsed();
    assert_ne!(new, old);
    // ttl is 10 s: a failover well inside it did not wait for the lease.
    assert!(
        took < Duration::from_secs(8),
        "failover took {took:?}: it waited for the lease"
    );
    writes_resume(&writer, fault).await;
    let acked = writer.stop().await;
    monitor.finish().await;
    // A clean shutdown ships all WAL to the replicas: nothing lost.
    rows_on(&c, new, "w", &acked).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_server_down_does_not_interrupt_writes() {
    let mut c = Cluster::start(&ClusterOptions::new(3));
    let primary = c.ready_with_haproxy().await;
    let replica = (0..3).find(|i| *i != primary).expect("a replica");
    let writer = Writer::start(c.rw_port, "w", Duration::from_millis(50)).await;
    eventually("some writes before the fault", LONG, || async {
        (writer.acked_ids().len() > 10).then_some(())
    })
    .await;
    let monitor = c.monitor();

    let fault = Instant::now();
    c.kill9_server(replica);
    // Watch writes across more than a lease's lifetime.
    eventually(
        "writes keep flowing for 12 s after the replica died",
        LONG,
        || async { (fault.elapsed() > Duration::from_secs(12)).then_some(()) },
    )
    .await;
    let failures = writer.failures_after(fault);
    let during = writer.acked_after(fault);
    let acked = writer.stop().await;
    monitor.finish().await;
    assert_eq!(failures, 0, "writes failed while only a replica was down");
    assert!(during >= 12, "only {during} writes in 12 s");
    assert_eq!(c.wait_single_primary(LONG).await, primary, "nothing moved");
    rows_on(&c, primary, "w", &acked).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nofailover_and_lagging_replicas_are_never_promoted() {
    let mut opts = ClusterOptions::new(3);
    // node2 may never lead; node3 will lag.
    opts.members[1].extra = "\n[tags]\nnofailover = true\n".into();
    opts.autostart = 1;
    let mut c = Cluster::start(&opts);
    // node1 bootstraps alone, so the members under test are replicas.
    let primary = c.wait_single_primary(LONG).await;
    assert_eq!(primary, 0);
    c.start_agent(1);
    c.start_agent(2);
    c.ready_with_haproxy().await;
    let lagging = 2;
    // Freeze the lagging replica's WAL receiver, then write more than
    // maximum_lag_on_failover (1 MB) on the primary.
    let pid = c.postmaster_pid(lagging).expect("postmaster");
    let receivers: Vec<i32> = support::cluster::children_of(pid)
        .into_iter()
        .filter(|p| {
            std::fs::read_to_string(format!("/proc/{p}/cmdline"))
                .is_ok_and(|s| s.contains("walreceiver"))
        })
        .collect();
    assert_eq!(receivers.len(), 1, "one walreceiver on the lagging replica");
    /// Resumes the frozen WAL receiver however the test ends.
    struct Thaw(Vec<i32>);
    impl Drop for Thaw {
        fn drop(&mut self) {
            for r in &self.0 {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(*r),
                    nix::sys::signal::Signal::SIGCONT,
                );
            }
        }
    }
    for r in &receivers {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(*r),
            nix::sys::signal::Signal::SIGSTOP,
        );
    }
    let thaw = Thaw(receivers.clone());
    // Right after HAProxy starts, servers count as up until their first
    // check: insist on a connection that really reached the primary.
    let client = eventually(
        "a connection through HAProxy's read-write port to the primary",
        LONG,
        || async {
            let c = support::sql(c.rw_port, support::cluster::SUPERUSER_PASSWORD)
                .await
                .ok()?;
            let row = c.query_one("SELECT pg_is_in_recovery()", &[]).await.ok()?;
            (!row.get::<_, bool>(0)).then_some(c)
        },
    )
    .await;
    client
        .batch_execute("CREATE TABLE big AS SELECT g, repeat('x', 500) AS pad FROM generate_series(1, 20000) g")
        .await
        .expect("write 10 MB");
    // The leader publishes its position in `status`: wait until it is
    // more than maximum_lag_on_failover (1 MB) past what the frozen replica
    // received.
    let frozen_at = {
        let r = support::sql(
            c.members[lagging].pg_port,
            support::cluster::SUPERUSER_PASSWORD,
        )
        .await
        .expect("connect to the lagging replica");
        let row = r
            .query_one("SELECT (pg_last_wal_receive_lsn() - '0/0')::bigint", &[])
            .await
            .expect("receive position");
        row.get::<_, i64>(0) as u64
    };
    eventually(
        "the leader publishes a position 1 MB past the lagging replica",
        LONG,
        || async {
            let st = c.etcd.get("/service/it/status").await?;
            let v: serde_json::Value = serde_json::from_str(&st).ok()?;
            (v["wal_lsn"].as_u64()? > frozen_at + 2 * 1024 * 1024).then_some(())
        },
    )
    .await;

    let monitor = c.monitor();
    c.kill9_server(primary);
    let candidates: Vec<usize> = (0..3).filter(|i| *i != primary).collect();
    // Each remaining member explains why it does not run for leader.
    for i in &candidates {
        let want = if *i == lagging {
            "bytes behind"
        } else {
            "nofailover"
        };
        eventually(
            &format!("{} explains it is no candidate", c.members[*i].name),
            LONG,
            || async { c.agent_log(*i).contains(want).then_some(()) },
        )
        .await;
    }
    // And keeps to it across several loops after the lease is gone.
    let since = Instant::now();
    eventually("several seconds without a leader", LONG, || async {
        (since.elapsed() > Duration::from_secs(5)).then_some(())
    })
    .await;
    assert_eq!(
        c.etcd.get("/service/it/leader").await,
        None,
        "nobody took the lease"
    );
    for i in &candidates {
        assert_ne!(
            http_status("GET", &c.members[*i].api("/primary")).await,
            200
        );
    }
    drop(thaw);
    monitor.finish().await;
}
