//! Every valid timing is a tested timing: Patroni's defaults (ttl 30,
//! loop_wait 10, retry_timeout 10) and a long loop_wait with operator
//! requests, on real etcd, PostgreSQL and HAProxy. A leader that demoted
//! itself while healthy shows up here as a leader change or a new entry in
//! `history`.

mod support;

use std::time::{Duration, Instant};
use support::faults::Writer;
use support::{eventually, http_json, Cluster, ClusterOptions};

const LONG: Duration = Duration::from_secs(180);

fn timings(n: usize, ttl: u64, loop_wait: u64, retry_timeout: u64) -> ClusterOptions {
    let mut opts = ClusterOptions::new(n);
    opts.ttl = ttl;
    opts.loop_wait = loop_wait;
    opts.retry_timeout = retry_timeout;
    for m in &mut opts.members {
        m.api_extra = "username = \"admin\"\npassword = \"op-secret\"\n".into();
    }
    opts
}

fn key(c: &Cluster, k: &str) -> String {
    format!("/service/{}/{k}", c.scope)
}

/// Timelines recorded in `history` (one per promotion).
async fn history_len(c: &Cluster) -> usize {
    match c.dcs_get(&key(c, "history")).await {
        Some(text) => serde_json::from_str::<Vec<serde_json::Value>>(&text)
            .map(|v| v.len())
            .unwrap_or(usize::MAX),
        None => 0,
    }
}

/// Watches for `run`: the leader key names `leader` at every poll, no
/// promotion is recorded and every write through HAProxy succeeds.
async fn steady_for(c: &Cluster, leader: &str, writer: &Writer, run: Duration) {
    let start = Instant::now();
    let history = history_len(c).await;
    while start.elapsed() < run {
        let now = c.dcs_get(&key(c, "leader")).await;
        assert_eq!(
            now.as_deref(),
            Some(leader),
            "leader changed after {:?} of a fault-free run",
            start.elapsed()
        );
        assert_eq!(history_len(c).await, history, "a promotion was recorded");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_eq!(
        writer.failures_after(start),
        0,
        "writes failed during a fault-free run"
    );
    assert!(writer.acked_after(start) > 0, "the writer made progress");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn patroni_timings_hold_steady_then_fail_over_within_ttl_plus_loop_wait() {
    let (ttl, loop_wait) = (30, 10);
    let mut c = Cluster::start(&timings(3, ttl, loop_wait, 10));
    let old = c.ready_with_haproxy().await;
    let leader = c.members[old].name.clone();
    let writer = Writer::start(c.rw_port, "w", Duration::from_millis(200)).await;
    eventually("a first write through HAProxy", LONG, || async {
        (!writer.acked_ids().is_empty()).then_some(())
    })
    .await;

    steady_for(&c, &leader, &writer, Duration::from_secs(120)).await;

    let monitor = c.monitor();
    let fault = Instant::now();
    c.kill9_server(old);
    let new = c.wait_single_primary(LONG).await;
    let elapsed = fault.elapsed();
    eprintln!("ttl {ttl} / loop_wait {loop_wait}: new primary after {elapsed:?}");
    assert_ne!(new, old);
    assert!(
        elapsed <= Duration::from_secs(ttl + loop_wait + 2),
        "failover took {elapsed:?} (ttl {ttl} + loop_wait {loop_wait} + 2 s allowed)"
    );
    // The lease was renewed at most loop_wait before the crash: nobody may
    // have promoted before ttl - loop_wait.
    assert!(
        elapsed >= Duration::from_secs(ttl - loop_wait),
        "promoted after {elapsed:?}, before the lease could expire"
    );
    eventually("writes resume through HAProxy", LONG, || async {
        (writer.acked_after(fault) > 0).then_some(())
    })
    .await;
    writer.stop().await;
    monitor.finish().await;
}

/// A reload and a restart sent to the leader with loop_wait 5 (>=
/// retry_timeout) cost it no renewal: no leader change over a minute.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_and_restart_of_the_leader_with_a_long_loop_wait_change_no_leader() {
    let mut c = Cluster::start(&timings(3, 20, 5, 5));
    let primary = c.ready_with_haproxy().await;
    let leader = c.members[primary].name.clone();
    let writer = Writer::start(c.rw_port, "w", Duration::from_millis(200)).await;
    eventually("a first write through HAProxy", LONG, || async {
        (!writer.acked_ids().is_empty()).then_some(())
    })
    .await;
    let history = history_len(&c).await;
    let start = Instant::now();
    let before = c.postmaster_pid(primary);

    let out = c.cli(primary, &["reload", &leader]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    tokio::time::sleep(Duration::from_secs(7)).await;
    let out = c.cli(primary, &["restart", &leader]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_ne!(c.postmaster_pid(primary), before, "the leader restarted");

    while start.elapsed() < Duration::from_secs(60) {
        assert_eq!(
            c.dcs_get(&key(&c, "leader")).await.as_deref(),
            Some(leader.as_str()),
            "leader changed {:?} into the run",
            start.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_eq!(history_len(&c).await, history, "a promotion was recorded");
    let st = http_json(&c.members[primary].api("/status")).await;
    assert_eq!(
        st.as_ref().map(|s| s["role"].clone()),
        Some(serde_json::json!("leader"))
    );
    eventually(
        "writes go on through HAProxy after the restart",
        LONG,
        || async { (writer.acked_after(start + Duration::from_secs(30)) > 0).then_some(()) },
    )
    .await;
    writer.stop().await;
}

fn signal(pid: u32, sig: &str) {
    let ok = std::process::Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(ok, "kill {sig} {pid}");
}

/// The leader's agent frozen for 6 s (SIGSTOP) under a 10 s lease with
/// etcd healthy: when it wakes, renewing the still-valid lease is right;
/// stopping PostgreSQL and handing over is not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_agent_frozen_under_its_lease_keeps_the_lead() {
    let mut c = Cluster::start(&timings(3, 10, 1, 4));
    let primary = c.ready_with_haproxy().await;
    let leader = c.members[primary].name.clone();
    let writer = Writer::start(c.rw_port, "w", Duration::from_millis(100)).await;
    eventually("a first write through HAProxy", LONG, || async {
        (!writer.acked_ids().is_empty()).then_some(())
    })
    .await;
    let postmaster = c.postmaster_pid(primary);
    let pid = c.agent_pid(primary).expect("the leader's agent runs");
    signal(pid, "-STOP");
    tokio::time::sleep(Duration::from_secs(6)).await;
    signal(pid, "-CONT");
    let woke = Instant::now();
    steady_for(&c, &leader, &writer, Duration::from_secs(20)).await;
    assert_eq!(
        c.postmaster_pid(primary),
        postmaster,
        "PostgreSQL kept running"
    );
    assert!(writer.acked_after(woke) > 0);
    writer.stop().await;
}

/// The shortest profile validation accepts (ttl 4, loop_wait 1,
/// retry_timeout 1) holds its leader with no fault.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shortest_valid_timing_holds_steady() {
    let mut c = Cluster::start(&timings(3, 4, 1, 1));
    let primary = c.ready_with_haproxy().await;
    let leader = c.members[primary].name.clone();
    let writer = Writer::start(c.rw_port, "w", Duration::from_millis(200)).await;
    eventually("a first write through HAProxy", LONG, || async {
        (!writer.acked_ids().is_empty()).then_some(())
    })
    .await;
    steady_for(&c, &leader, &writer, Duration::from_secs(60)).await;
    writer.stop().await;
}
