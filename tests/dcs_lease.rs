//! The etcd lease as the agent keeps it, against a real etcd: keep-alives
//! with long gaps between them (a long `loop_wait`) must neither fail nor
//! lose the connection, and a revoked or expired lease must read as
//! `DcsError::LeaseLost`, whichever request finds out.

mod support;

use pgwarden::config::{DynamicConfig, Tags};
use pgwarden::dcs::{Dcs, DcsError, Keys, MemberStatus, PgState, Role};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use support::procs::Etcd;

async fn connect(etcd: &Etcd, scope: &str) -> Dcs {
    Dcs::connect(
        &[etcd.endpoint()],
        Keys::new(format!("/service/{scope}/")),
        Duration::from_secs(2),
    )
    .await
    .expect("connect to etcd")
}

/// Agent n1 restarted on the same instance (same addresses, a new lease):
/// its previous life's keys are its own.
async fn restarted_n1(etcd: &Etcd, scope: &str) -> Dcs {
    let mut again = connect(etcd, scope).await;
    again
        .claim_name("n1", "http://127.0.0.1:8008", "127.0.0.1:5432")
        .await
        .expect("our own previous life");
    again.keep_alive(30).await.expect("keep-alive");
    again
}

fn member(name: &str) -> MemberStatus {
    MemberStatus {
        name: name.into(),
        role: Role::Replica,
        state: PgState::Streaming,
        host: "127.0.0.1".into(),
        port: 5432,
        api_url: "http://127.0.0.1:8008".into(),
        conn_url: "postgres://127.0.0.1:5432/postgres".into(),
        timeline: Some(1),
        wal_lsn: None,
        receive_lsn: None,
        upstream: None,
        tags: Tags::default(),
        version: "test".into(),
        pending_restart: false,
        error: None,
    }
}

/// `etcdctl lease revoke`, or the same request through the client library
/// where etcdctl is not installed.
async fn revoke(etcd: &Etcd, lease: i64) {
    let hex = format!("{lease:x}");
    match support::etcdctl(&etcd.endpoint(), &["lease", "revoke", &hex]) {
        Some(out) => assert!(
            out.status.success(),
            "etcdctl lease revoke {hex}: {}",
            String::from_utf8_lossy(&out.stderr)
        ),
        None => {
            let mut c = etcd_client::Client::connect([etcd.endpoint()], None)
                .await
                .expect("etcd connect");
            c.lease_revoke(lease).await.expect("lease revoke");
        }
    }
}

fn assert_lease_lost(result: Result<(), DcsError>, what: &str) {
    match result {
        Err(DcsError::LeaseLost) => {}
        other => panic!("{what}: expected LeaseLost, got {other:?}"),
    }
}

/// etcd refuses HTTP/2 pings more frequent than --grpc-keepalive-min-time
/// (5 s) with GOAWAY once the connection is otherwise idle, which used to
/// close the keep-alive stream between two renewals 10 s apart. The watch
/// opened at the start must survive too: nothing reopens it.
#[tokio::test]
async fn lease_survives_eleven_second_gaps() {
    let root = support::temp_dir("pgwarden-lease-");
    let etcd = Etcd::start(root.path());
    let mut dcs = connect(&etcd, "gaps").await;
    dcs.keep_alive(30).await.expect("first keep-alive");
    let lease = dcs.current_lease().expect("a lease after keep-alive");
    dcs.publish_member(&member("n1"), 30)
        .await
        .expect("publish member key");
    let (_watcher, mut watch) = dcs.watch_leader().await.expect("watch leader");

    let start = Instant::now();
    let mut renewals = 0;
    while start.elapsed() < Duration::from_secs(35) {
        tokio::time::sleep(Duration::from_secs(11)).await;
        if let Err(e) = dcs.keep_alive(30).await {
            panic!("keep-alive {:?} after the start: {e}", start.elapsed());
        }
        assert_eq!(dcs.current_lease(), Some(lease), "the same lease is kept");
        renewals += 1;
    }
    assert!(renewals >= 3, "{renewals} renewals");

    let view = dcs
        .read_cluster(&DynamicConfig::default())
        .await
        .expect("read after the idle gaps");
    assert_eq!(
        view.members.len(),
        1,
        "member key on the lease is still there"
    );

    etcd.put("/service/gaps/leader", "n1").await;
    let event = tokio::time::timeout(Duration::from_secs(5), watch.message()).await;
    match event {
        Ok(Ok(Some(resp))) => assert!(!resp.events().is_empty(), "watch response without events"),
        other => panic!("the watch opened before the gaps did not deliver: {other:?}"),
    }
}

/// A TCP relay to etcd whose connections can be cut, as a restarting proxy
/// or a GOAWAY would close them, while new ones still get through.
struct Relay {
    port: u16,
    conns: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>>,
    accept: tokio::task::JoinHandle<()>,
}

impl Relay {
    async fn start(target: u16) -> Relay {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind relay");
        let port = listener.local_addr().expect("relay address").port();
        let conns = Arc::new(Mutex::new(Vec::new()));
        let tasks = conns.clone();
        let accept = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let task = tokio::spawn(async move {
                    if let Ok(mut out) = tokio::net::TcpStream::connect(("127.0.0.1", target)).await
                    {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut out).await;
                    }
                });
                tasks.lock().unwrap_or_else(|p| p.into_inner()).push(task);
            }
        });
        Relay {
            port,
            conns,
            accept,
        }
    }

    /// Drops every open connection (both sockets close).
    fn cut(&self) {
        for task in self
            .conns
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
        {
            task.abort();
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.cut();
        self.accept.abort();
    }
}

/// When the keep-alive stream was closed under an idle client, one call
/// reopens it and renews: reporting the closed channel instead would make
/// a healthy leader miss a renewal.
#[tokio::test]
async fn keep_alive_reopens_a_closed_stream_at_once() {
    let root = support::temp_dir("pgwarden-lease-");
    let etcd = Etcd::start(root.path());
    let relay = Relay::start(etcd.port).await;
    let mut dcs = Dcs::connect(
        &[format!("http://127.0.0.1:{}", relay.port)],
        Keys::new("/service/reopen/".into()),
        Duration::from_secs(2),
    )
    .await
    .expect("connect through the relay");
    dcs.keep_alive(30).await.expect("first keep-alive");
    let lease = dcs.current_lease().expect("a lease");
    for round in 0..3 {
        relay.cut();
        // Let the client see the connection go, as it would between loops.
        tokio::time::sleep(Duration::from_millis(300)).await;
        if let Err(e) = dcs.keep_alive(30).await {
            panic!("round {round}: keep-alive after the stream closed: {e}");
        }
        assert_eq!(dcs.current_lease(), Some(lease), "the same lease is kept");
    }
}

#[tokio::test]
async fn revoked_lease_is_lease_lost() {
    let root = support::temp_dir("pgwarden-lease-");
    let etcd = Etcd::start(root.path());
    let mut dcs = connect(&etcd, "revoke").await;
    dcs.keep_alive(30).await.expect("first keep-alive");
    let lease = dcs.current_lease().expect("a lease");

    // With the keep-alive stream open.
    revoke(&etcd, lease).await;
    assert_lease_lost(dcs.keep_alive(30).await, "keep-alive after revoke");
    assert_eq!(dcs.current_lease(), None, "a lost lease is forgotten");

    // The next keep-alive starts a new lease.
    dcs.keep_alive(30).await.expect("keep-alive on a new lease");
    let second = dcs.current_lease().expect("a new lease");
    assert_ne!(second, lease);

    // With no stream open: opening one finds the lease gone.
    dcs.switch_endpoint().await.expect("reconnect");
    revoke(&etcd, second).await;
    assert_lease_lost(
        dcs.keep_alive(30).await,
        "new keep-alive stream after revoke",
    );
}

#[tokio::test]
async fn expired_lease_is_lease_lost() {
    let root = support::temp_dir("pgwarden-lease-");
    let etcd = Etcd::start(root.path());
    let ttl = 2;
    let expire = Duration::from_secs(ttl + 2);

    // The open keep-alive stream answers TTL 0.
    let mut dcs = connect(&etcd, "expire").await;
    dcs.keep_alive(ttl).await.expect("first keep-alive");
    tokio::time::sleep(expire).await;
    assert_lease_lost(dcs.keep_alive(ttl).await, "keep-alive on the open stream");

    // A new stream for an expired lease: etcd-client reports it as a
    // keep-alive error, the lease's TTL says what it is.
    dcs.keep_alive(ttl)
        .await
        .expect("keep-alive on a new lease");
    dcs.switch_endpoint().await.expect("reconnect");
    tokio::time::sleep(expire).await;
    assert_lease_lost(dcs.keep_alive(ttl).await, "keep-alive on a new stream");

    // A put on an expired lease: gRPC NotFound.
    dcs.keep_alive(ttl)
        .await
        .expect("keep-alive on a new lease");
    tokio::time::sleep(expire).await;
    let expired = dcs.current_lease();
    assert_lease_lost(
        dcs.publish_member(&member("n1"), ttl).await,
        "put on the expired lease",
    );
    // The keep-alive that follows says so too (its caller must rewrite the
    // keys that were on the lease), then the next one starts a new lease.
    assert_lease_lost(dcs.keep_alive(ttl).await, "keep-alive after the put");
    assert_eq!(dcs.current_lease(), None, "a lost lease is forgotten");
    dcs.keep_alive(ttl)
        .await
        .expect("keep-alive on a new lease");
    assert_ne!(dcs.current_lease(), expired);
    dcs.publish_member(&member("n1"), ttl)
        .await
        .expect("publish on the new lease");
}

/// etcd keeps a lease's TTL for its lifetime. When the dynamic config's ttl
/// grows, the agent must hold its keys on a lease of the new ttl — a
/// shorter real lease than the agent counts with would let a replica take
/// over while the old primary still believes it leads. When it shrinks,
/// the longer lease stays (the agent counts with the shorter ttl: safe).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_longer_ttl_moves_the_leader_key_onto_a_lease_of_that_ttl() {
    let root = support::temp_dir("pgwarden-lease-");
    let etcd = Etcd::start(root.path());
    let mut dcs = connect(&etcd, "ttl").await;
    let defaults = DynamicConfig::default();
    dcs.keep_alive(3).await.expect("keep-alive");
    let short = dcs.current_lease();
    assert_eq!(
        dcs.acquire_leader("n1", 3).await.expect("acquire"),
        pgwarden::dcs::LeaderOutcome::Won
    );

    // ttl edited up to 30 s: the renewal moves the key onto a 30 s lease.
    dcs.keep_alive(30)
        .await
        .expect("keep-alive with the new ttl");
    let long = dcs.current_lease();
    assert_ne!(long, short, "a new lease for the longer ttl");
    assert_eq!(
        dcs.renew_leader("n1", 30).await.expect("renew"),
        pgwarden::dcs::LeaderOutcome::Won
    );
    // Without renewals the key now outlives the old 3 s lease.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let view = dcs.read_cluster(&defaults).await.expect("read");
    assert_eq!(
        view.leader.as_deref(),
        Some("n1"),
        "the key went with the 3 s lease"
    );

    // ttl edited back down: the longer lease stays.
    dcs.keep_alive(3)
        .await
        .expect("keep-alive with a shorter ttl");
    assert_eq!(dcs.current_lease(), long);
}

/// A key holding our name on another agent's lease is not ours: a second
/// agent with the same name can neither renew (move), release nor publish
/// over it; the same agent restarted on the same instance can.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_on_another_agents_lease_are_not_ours_whatever_the_name() {
    use pgwarden::dcs::LeaderOutcome::{Lost, Won};
    let root = support::temp_dir("pgwarden-lease-");
    let etcd = Etcd::start(root.path());
    let mut a = connect(&etcd, "names").await;
    a.keep_alive(30).await.expect("keep-alive");
    a.publish_member(&member("n1"), 30).await.expect("publish");
    assert_eq!(a.acquire_leader("n1", 30).await.expect("acquire"), Won);

    let mut other = member("n1");
    other.api_url = "http://127.0.0.2:8008".into();
    let mut b = connect(&etcd, "names").await;
    b.keep_alive(30).await.expect("keep-alive");
    match b.claim_name("n1", &other.api_url, "127.0.0.2:5432").await {
        Err(DcsError::NameTaken { api_url, .. }) => assert_eq!(api_url, "http://127.0.0.1:8008"),
        r => panic!("claim_name: {r:?}"),
    }
    assert_eq!(b.renew_leader("n1", 30).await.expect("renew"), Lost);
    assert_eq!(b.release_leader("n1").await.expect("release"), Lost);
    assert!(matches!(
        b.publish_member(&other, 30).await,
        Err(DcsError::NameTaken { .. })
    ));
    let view = b
        .read_cluster(&DynamicConfig::default())
        .await
        .expect("read");
    assert_eq!(view.leader.as_deref(), Some("n1"));
    assert_eq!(view.members[0].api_url, "http://127.0.0.1:8008");

    // The first agent restarted (a new lease) on the same instance: its
    // previous life's keys are its own.
    let mut again = restarted_n1(&etcd, "names").await;
    assert_eq!(again.renew_leader("n1", 30).await.expect("renew"), Won);
    again
        .publish_member(&member("n1"), 30)
        .await
        .expect("publish");
}

/// An agent killed after ttl grew, between republishing its member key on
/// the new lease and moving the leader key there: its two keys are on two
/// leases of its own. Restarted, it must own both (found by the simulator,
/// seeds 4725 and 15203: it could neither renew nor fence, and its primary
/// stayed writable after the key expired).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_agent_owns_its_keys_left_on_two_leases() {
    use pgwarden::dcs::LeaderOutcome::Won;
    let root = support::temp_dir("pgwarden-lease-");
    let etcd = Etcd::start(root.path());
    let mut a = connect(&etcd, "split").await;
    a.keep_alive(5).await.expect("keep-alive");
    assert_eq!(a.acquire_leader("n1", 5).await.expect("acquire"), Won);
    let leader_lease = a.current_lease();
    // ttl grew: a new lease, the member key published on it first.
    a.keep_alive(30).await.expect("keep-alive with the new ttl");
    assert_ne!(a.current_lease(), leader_lease);
    a.publish_member(&member("n1"), 30).await.expect("publish");
    drop(a); // killed here: the leader key never moved

    let mut again = restarted_n1(&etcd, "split").await;
    assert_eq!(
        again.renew_leader("n1", 30).await.expect("renew"),
        Won,
        "the leader key on our previous life's other lease is ours"
    );
    // Moved onto the new lease: it outlives the old 5 s one.
    tokio::time::sleep(Duration::from_secs(7)).await;
    again.keep_alive(30).await.expect("keep-alive");
    let view = again
        .read_cluster(&DynamicConfig::default())
        .await
        .expect("read");
    assert_eq!(view.leader.as_deref(), Some("n1"));
}

/// A server that crashed between its bootstrap claim and initdb: the
/// restarted agent moves the leader key onto its new lease, and the claim
/// (`initialize` = "") must follow it, or it expires with the old lease and
/// leaves a leader key that no member ever bootstraps under (found by the
/// simulator, seed 607077).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bootstrap_claim_follows_its_leader_key_to_the_new_lease() {
    use pgwarden::dcs::{Initialize, LeaderOutcome::Won};
    let root = support::temp_dir("pgwarden-lease-");
    let etcd = Etcd::start(root.path());
    let mut a = connect(&etcd, "claim").await;
    a.keep_alive(5).await.expect("keep-alive");
    a.publish_member(&member("n1"), 5).await.expect("publish");
    assert_eq!(a.claim_initialize("n1", 5).await.expect("claim"), Won);
    drop(a); // the server crashed before initdb

    let mut again = restarted_n1(&etcd, "claim").await;
    assert_eq!(again.renew_leader("n1", 30).await.expect("renew"), Won);
    // Past the old 5 s lease: both keys must have moved with the renewal.
    tokio::time::sleep(Duration::from_secs(7)).await;
    again.keep_alive(30).await.expect("keep-alive");
    let view = again
        .read_cluster(&DynamicConfig::default())
        .await
        .expect("read");
    assert_eq!(view.leader.as_deref(), Some("n1"));
    assert_eq!(
        view.initialize,
        Initialize::Claimed,
        "the bootstrap claim expired with the previous lease"
    );

    // Releasing the key withdraws the claim with it: left on our live
    // lease, it would keep everyone from claiming again (simulator seed
    // 21808).
    assert_eq!(again.release_leader("n1").await.expect("release"), Won);
    let view = again
        .read_cluster(&DynamicConfig::default())
        .await
        .expect("read");
    assert_eq!(view.leader, None);
    assert_eq!(view.initialize, Initialize::Absent);
}
