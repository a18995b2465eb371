//! etcd down for 45 s under a healthy 3-member cluster. With
//! `failsafe_mode` the primary stays writable through HAProxy because every
//! member confirms over its API that it cannot reach etcd either; without
//! it the primary stops writes, as it must. Either way, when etcd returns
//! the same primary takes the leader key again on the same timeline — no
//! election, no timeline switch, no second writer at any moment, no row
//! lost. Both at the test default timings and at Patroni's (30/10/10).

mod support;

use std::time::{Duration, Instant};
use support::faults::Writer;
use support::{eventually, http_json, Cluster, ClusterOptions};

const LONG: Duration = Duration::from_secs(120);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_failsafe_mode_the_primary_keeps_writing_through_an_etcd_outage() {
    failsafe_outage(ClusterOptions::new(3)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_failsafe_mode_at_patroni_timings_the_primary_keeps_writing() {
    failsafe_outage(patroni_timings()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_failsafe_mode_the_same_primary_returns_on_its_timeline() {
    plain_outage(ClusterOptions::new(3)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_failsafe_mode_at_patroni_timings_the_same_primary_returns() {
    plain_outage(patroni_timings()).await;
}

/// etcd itself stays up but the agents cannot reach it (a partition): the
/// leases expire there, so when the link returns there is no leader key at
/// all. The cleanly stopped primary must take it back, replicas standing
/// back for it, rather than an election promoting a replica.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_failsafe_mode_a_partition_from_etcd_elects_no_replica() {
    let mut opts = ClusterOptions::new(3);
    opts.etcd_relay = true;
    outage(opts, Outage::Partition).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_failsafe_mode_at_patroni_timings_a_partition_elects_no_replica() {
    let mut opts = patroni_timings();
    opts.etcd_relay = true;
    outage(opts, Outage::Partition).await;
}

fn patroni_timings() -> ClusterOptions {
    let mut opts = ClusterOptions::new(3);
    (opts.ttl, opts.loop_wait, opts.retry_timeout) = (30, 10, 10);
    opts
}

/// Without failsafe mode the primary stops writes once it cannot renew:
/// writes fail for the outage. What must not happen is what the issue saw:
/// another member elected when etcd returns, a timeline switch, a row lost.
async fn plain_outage(opts: ClusterOptions) {
    outage(opts, Outage::EtcdKilled).await;
}

enum Outage {
    /// etcd killed, restarted after 45 s: its leases survive.
    EtcdKilled,
    /// The agents cut from a running etcd for 2 x ttl + 10 s: every lease
    /// expires.
    Partition,
}

async fn outage(opts: ClusterOptions, how: Outage) {
    let mut c = Cluster::start(&opts);
    let primary = c.ready_with_haproxy().await;
    let leader = c.members[primary].name.clone();
    let tl = c.timeline(primary).await.expect("timeline");
    both_replicas_streaming(&c, primary).await;
    let writer = Writer::start(c.rw_port, "w", Duration::from_millis(100)).await;
    eventually("a first write", LONG, || async {
        (!writer.acked_ids().is_empty()).then_some(())
    })
    .await;
    let monitor = c.monitor();

    // The outage itself is the fault being tested, not a wait for a
    // condition: 45 s of etcd down, as the issue describes.
    match how {
        Outage::EtcdKilled => {
            c.etcd.kill9();
            tokio::time::sleep(Duration::from_secs(45)).await;
            c.etcd.start_again();
        }
        Outage::Partition => {
            let relay = c.relay.as_ref().expect("the cluster's etcd relay");
            relay.block();
            let key = format!("/service/{}/leader", c.scope);
            eventually("the leader key expired in etcd", LONG, || async {
                c.dcs_get(&key).await.is_none().then_some(())
            })
            .await;
            tokio::time::sleep(Duration::from_secs(5)).await;
            relay.unblock();
        }
    }
    let up = Instant::now();

    let now_primary = c.wait_single_primary(LONG).await;
    assert_eq!(
        c.members[now_primary].name, leader,
        "another member was elected after etcd returned"
    );
    // pg_control's timeline moves at the checkpoint after a promotion.
    if let Ok(client) = c.sql(now_primary).await {
        let _ = client.batch_execute("CHECKPOINT").await;
    }
    assert_eq!(
        c.timeline(now_primary).await,
        Some(tl),
        "a timeline switch after etcd returned"
    );
    eventually("writes after etcd returned", LONG, || async {
        (writer.acked_after(up) > 0).then_some(())
    })
    .await;
    let acked = writer.stop().await;
    monitor.finish().await;
    let rows = c.count(now_primary, "w").await.expect("count rows");
    let missing = acked.len() as i64 - rows;
    assert!(
        rows >= acked.len() as i64,
        "{missing} acknowledged rows missing on the primary"
    );
}

async fn both_replicas_streaming(c: &Cluster, primary: usize) {
    eventually("both replicas streaming", LONG, || async {
        let mut streaming = 0;
        for i in (0..3).filter(|&i| i != primary) {
            let st = http_json(&c.members[i].api("/status")).await?;
            if st["state"] == "streaming" {
                streaming += 1;
            }
        }
        (streaming == 2).then_some(())
    })
    .await;
}

async fn failsafe_outage(mut opts: ClusterOptions) {
    opts.dcs_extra = "failsafe_mode = true".into();
    let mut c = Cluster::start(&opts);
    let primary = c.ready_with_haproxy().await;
    let leader = c.members[primary].name.clone();
    let tl = c.timeline(primary).await.expect("timeline");
    // The leader records the members it will ask.
    let key = format!("/service/{}/failsafe", c.scope);
    eventually("the failsafe topology recorded", LONG, || async {
        let v = c.dcs_get(&key).await?;
        (0..3)
            .all(|i| v.contains(&format!("\"{}\"", c.members[i].name)))
            .then_some(())
    })
    .await;
    // Every replica streaming, so that all three answer.
    both_replicas_streaming(&c, primary).await;
    let writer = Writer::start(c.rw_port, "w", Duration::from_millis(100)).await;
    eventually("a first write", LONG, || async {
        (!writer.acked_ids().is_empty()).then_some(())
    })
    .await;
    let monitor = c.monitor();

    c.etcd.kill9();
    let down = Instant::now();
    // The outage itself is the fault being tested, not a wait for a
    // condition: 45 s of etcd down, as the issue describes.
    tokio::time::sleep(Duration::from_secs(45)).await;
    let acked_during = writer.acked_after(down);
    // Past three leases without etcd: still writable.
    let acked_late = writer.acked_after(down + Duration::from_secs(35));
    let failed_during = writer.failures_after(down);
    // Each replica's confirmation is on disk, where a restarted agent
    // finds it.
    for i in (0..3).filter(|&i| i != primary) {
        let mut path = c.members[i].data_dir().into_os_string();
        path.push(".pgwarden-failsafe");
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("{}: no failsafe promise: {e}", c.members[i].name));
        assert!(
            text.contains(&format!("\"leader\":\"{leader}\"")),
            "{}: {text}",
            c.members[i].name
        );
    }
    c.etcd.start_again();
    let up = Instant::now();

    eventually(
        "the same primary holding the leader key again",
        LONG,
        || async {
            let st = http_json(&c.members[primary].api("/status")).await?;
            (st["role"] == "leader" && st["primary"] == true).then_some(())
        },
    )
    .await;
    let leader_key = c.dcs_get(&format!("/service/{}/leader", c.scope)).await;
    assert_eq!(leader_key.as_deref(), Some(leader.as_str()));
    assert_eq!(
        c.timeline(primary).await,
        Some(tl),
        "a timeline switch: another member was promoted"
    );
    eventually("writes after etcd returned", LONG, || async {
        (writer.acked_after(up) > 0).then_some(())
    })
    .await;
    writer.stop().await;
    monitor.finish().await;
    eprintln!(
        "failsafe: etcd down 45 s: {acked_during} writes acknowledged, {failed_during} failed through HAProxy"
    );
    // Writing every 100 ms: a few seconds of failures at most.
    assert!(
        failed_during <= 30,
        "{failed_during} writes failed during the outage ({acked_during} acknowledged)"
    );
    assert!(
        acked_late > 0,
        "no write acknowledged in the last 10 s of the outage ({acked_during} in all)"
    );
    let log = c.agent_log(primary);
    assert!(
        !log.contains("stopping PostgreSQL"),
        "the primary stopped PostgreSQL:\n{log}"
    );
}
