//! The fence keeper: a process per member that holds the leader's fencing
//! deadline and outlives the agent. A leader agent that hangs (SIGSTOP) or
//! is killed and stays away must not leave its PostgreSQL writable once the
//! lease may have expired and a replica may have been promoted: the keeper
//! stops it before the lease ends, and a monitor checking every member
//! directly never sees two writable. An agent killed and restarted within
//! the lease takes the keeper over: PostgreSQL keeps running, same PID.

mod support;

use nix::sys::signal::Signal;
use std::time::{Duration, Instant};
use support::faults::Writer;
use support::{eventually, http_json, Cluster, ClusterOptions};

const LONG: Duration = Duration::from_secs(120);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_leader_agent_is_fenced_before_its_lease_expires() {
    lost_leader_agent(ClusterOptions::new(3), Loss::Hung).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_patroni_timings_a_hung_leader_agent_is_fenced() {
    let mut opts = ClusterOptions::new(3);
    (opts.ttl, opts.loop_wait, opts.retry_timeout) = (30, 10, 10);
    lost_leader_agent(opts, Loss::Hung).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_leader_agent_that_stays_away_is_fenced() {
    lost_leader_agent(ClusterOptions::new(3), Loss::Killed).await;
}

enum Loss {
    /// SIGSTOP: the process and its connections stay, nothing runs.
    Hung,
    /// kill -9, restarted only after a replica took over.
    Killed,
}

async fn lost_leader_agent(opts: ClusterOptions, loss: Loss) {
    let ttl = Duration::from_secs(opts.ttl);
    let mut c = Cluster::start(&opts);
    let old = c.ready_with_haproxy().await;
    let writer = Writer::start(c.rw_port, "w", Duration::from_millis(100)).await;
    eventually("a first write", LONG, || async {
        (!writer.acked_ids().is_empty()).then_some(())
    })
    .await;
    // The leader's agent has handed its deadline to a keeper.
    let log = c.agent_log(old);
    assert!(log.contains("fence armed by the agent"), "{log}");
    let monitor = c.monitor();

    let lost = Instant::now();
    match loss {
        Loss::Hung => c.signal_agent(old, Signal::SIGSTOP),
        Loss::Killed => c.kill9_agent(old),
    }
    // The last renewal started before the fault: its lease ends before
    // lost + ttl, and the keeper fences a margin before that.
    let fenced = eventually("the old primary's PostgreSQL stopped", LONG, || async {
        c.postmaster_pid(old).is_none().then(Instant::now)
    })
    .await;
    assert!(
        fenced < lost + ttl,
        "fenced {:?} after the agent was lost, the lease is {ttl:?}",
        fenced - lost
    );
    let new = c.wait_single_primary(LONG).await;
    assert_ne!(new, old, "a replica takes over");
    eventually("writes on the new primary", LONG, || async {
        (writer.acked_after(fenced) > 0).then_some(())
    })
    .await;

    match loss {
        Loss::Hung => c.signal_agent(old, Signal::SIGCONT),
        Loss::Killed => c.start_agent(old),
    }
    eventually("the old primary back as a replica", LONG, || async {
        let st = http_json(&c.members[old].api("/status")).await?;
        (st["state"] == "streaming").then_some(())
    })
    .await;
    assert_eq!(c.wait_single_primary(LONG).await, new);
    writer.stop().await;
    monitor.finish().await;
    let log = c.agent_log(old);
    assert!(
        log.contains("did not confirm the leader lease before the fence deadline"),
        "the keeper did not say why it stopped PostgreSQL:\n{log}"
    );
}

/// kill -9 of the leader's agent and a restart a moment later: the new
/// agent takes the running keeper over, which therefore never fires, and
/// PostgreSQL runs on under the same postmaster for well past the old
/// deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_agent_takes_the_keeper_over_without_a_restart() {
    let opts = ClusterOptions::new(3);
    let ttl = Duration::from_secs(opts.ttl);
    let mut c = Cluster::start(&opts);
    let old = c.ready_with_haproxy().await;
    eventually("the fence keeper armed", LONG, || async {
        c.agent_log(old)
            .contains("fence armed by the agent")
            .then_some(())
    })
    .await;
    let pid = c.postmaster_pid(old).expect("postmaster");
    let monitor = c.monitor();
    c.kill9_agent(old);
    c.start_agent(old);
    let back = Instant::now();
    // Well past the deadline the killed agent left with the keeper, the
    // same postmaster runs the whole time.
    while back.elapsed() < 2 * ttl {
        assert_eq!(
            c.postmaster_pid(old),
            Some(pid),
            "PostgreSQL stopped or restarted {:?} after the agent came back",
            back.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(c.wait_single_primary(LONG).await, old);
    assert_eq!(c.postmaster_pid(old), Some(pid), "PostgreSQL was restarted");
    monitor.finish().await;
    let log = c.agent_log(old);
    assert!(
        !log.contains("before the fence deadline"),
        "the keeper fired:\n{log}"
    );
    assert_eq!(
        log.matches("fence keeper for").count(),
        1,
        "one keeper, taken over, not a second one:\n{log}"
    );
}
