//! The origin recipe's own layout and failure table, on real processes.
//!
//! Two "servers", each with a read-write and a read-only PostgreSQL instance
//! (DB01+DB02 on server 1, DB03+DB04 on server 2), a third host for HAProxy,
//! and one etcd member on each of the three hosts. Every host is a loopback
//! address of its own and every process binds its host's address:
//!
//! | host          | address   | processes                          |
//! |---------------|-----------|------------------------------------|
//! | server 1      | 127.0.1.1 | db01, db02 (agents + PostgreSQL), etcd e1 |
//! | server 2      | 127.0.1.2 | db03, db04 (agents + PostgreSQL), etcd e2 |
//! | HAProxy host  | 127.0.1.3 | HAProxy, etcd e3                   |
//!
//! Tags give the recipe's roles: only DB01 and DB03 may hold the write role
//! (DB02 and DB04 are `nofailover`), DB03 is the preferred failover target
//! (highest `failover_priority`), and reads go to DB02/DB04 (DB01 and DB03
//! are `noloadbalance`, so their /replica answers 503).
//!
//! The recipe's failure table:
//! - server 1 down: HAProxy sends everything to server 2 and DB03 becomes
//!   the primary;
//! - server 2 down: HAProxy stays on server 1, nothing moves.

mod support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use support::cluster::{sql_at, SUPERUSER_PASSWORD};
use support::{eventually, http_json, http_status, Cluster, ClusterOptions, MemberOptions};

const SERVER1: &str = "127.0.1.1";
const SERVER2: &str = "127.0.1.2";
const HAPROXY_HOST: &str = "127.0.1.3";

const DB01: usize = 0;
const DB02: usize = 1;
const DB03: usize = 2;
const DB04: usize = 3;

const LONG: Duration = Duration::from_secs(120);

fn member(name: &str, host: &str, tags: &str) -> MemberOptions {
    MemberOptions {
        name: Some(name.to_string()),
        host: Some(host.to_string()),
        extra: format!("\n[tags]\n{tags}\n"),
        ..MemberOptions::default()
    }
}

fn recipe_options() -> ClusterOptions {
    let mut opts = ClusterOptions::new(4);
    opts.members = vec![
        // Server 1: DB01 read-write, DB02 read-only.
        member(
            "db01",
            SERVER1,
            "noloadbalance = true\nfailover_priority = 2",
        ),
        member("db02", SERVER1, "nofailover = true"),
        // Server 2: DB03 read-write (the failover target), DB04 read-only.
        member(
            "db03",
            SERVER2,
            "noloadbalance = true\nfailover_priority = 3",
        ),
        member("db04", SERVER2, "nofailover = true"),
    ];
    opts.ttl = 10;
    opts.loop_wait = 1;
    opts.retry_timeout = 4;
    // db01 bootstraps alone, so the initial state is the recipe's.
    opts.autostart = 1;
    opts.etcd_hosts = vec![
        SERVER1.to_string(),
        SERVER2.to_string(),
        HAPROXY_HOST.to_string(),
    ];
    opts.haproxy_host = Some(HAPROXY_HOST.to_string());
    opts
}

/// The recipe's initial state: DB01 primary, DB02..DB04 streaming from it,
/// HAProxy on the third host routing to them.
async fn recipe_cluster() -> Cluster {
    let mut c = Cluster::start(&recipe_options());
    assert_eq!(c.etcd_members().len(), 3, "a three-member etcd");
    let first = c.wait_single_primary(LONG).await;
    assert_eq!(first, DB01, "db01 bootstrapped alone");
    for i in [DB02, DB03, DB04] {
        c.start_agent(i);
    }
    for i in [DB02, DB03, DB04] {
        let status = c.members[i].api("/status");
        let name = c.members[i].name.clone();
        eventually(&format!("{name} streaming from db01"), LONG, || {
            let status = status.clone();
            async move {
                let st = http_json(&status).await?;
                (st["upstream"] == "db01" && st["in_recovery"] == true && st["streaming"] == true)
                    .then_some(())
            }
        })
        .await;
    }
    // The read-only instances serve /replica; the read-write ones do not
    // (noloadbalance), whatever their role.
    for (i, want) in [(DB01, 503), (DB02, 200), (DB03, 503), (DB04, 200)] {
        let url = c.members[i].api("/replica");
        eventually(
            &format!("{} answering {want} on /replica", c.members[i].name),
            LONG,
            || {
                let url = url.clone();
                async move { (http_status("GET", &url).await == want).then_some(()) }
            },
        )
        .await;
    }
    assert_eq!(c.wait_single_primary(LONG).await, DB01);
    c.start_haproxy();
    c
}

/// `inet_server_port()` and `pg_is_in_recovery()` of whatever instance
/// answers on `host:port` (HAProxy's frontends).
async fn served_by(host: &str, port: u16) -> Option<(u16, bool)> {
    let q = async {
        let c = sql_at(host, port, SUPERUSER_PASSWORD).await.ok()?;
        let row = c
            .query_one("SELECT inet_server_port(), pg_is_in_recovery()", &[])
            .await
            .ok()?;
        let port: i32 = row.get(0);
        Some((u16::try_from(port).ok()?, row.get::<_, bool>(1)))
    };
    tokio::time::timeout(Duration::from_secs(2), q)
        .await
        .ok()
        .flatten()
}

/// Waits until `n` reads in a row through HAProxy's read-only port are
/// served by the replica listening on `pg_port`.
async fn reads_served_by(c: &Cluster, pg_port: u16, who: &str) {
    let (host, ro) = (c.haproxy_host.clone(), c.ro_port);
    let streak = Arc::new(Mutex::new(0u32));
    eventually(
        &format!("5 reads in a row through the read-only port served by {who}"),
        LONG,
        || {
            let (host, streak) = (host.clone(), streak.clone());
            async move {
                let got = served_by(&host, ro).await;
                let mut s = streak.lock().unwrap_or_else(|p| p.into_inner());
                if got == Some((pg_port, true)) {
                    *s += 1;
                } else {
                    *s = 0;
                }
                (*s >= 5).then_some(())
            }
        },
    )
    .await;
}

/// One write attempt through HAProxy's read-write port.
#[derive(Clone, Debug)]
struct Attempt {
    id: i64,
    started: Instant,
    done: Instant,
    /// Port of the instance that committed it; None if it failed.
    server_port: Option<u16>,
}

/// Like support::faults::Writer (one insert every `every`, each on a fresh
/// connection with a 1 s limit), but to an address other than 127.0.0.1,
/// and recording which instance committed each row.
struct HostWriter {
    stop: Arc<AtomicBool>,
    attempts: Arc<Mutex<Vec<Attempt>>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl HostWriter {
    async fn start(host: &str, port: u16, table: &str, every: Duration) -> HostWriter {
        let create = format!(
            "CREATE TABLE IF NOT EXISTS {table} (id bigint PRIMARY KEY, at timestamptz DEFAULT now())"
        );
        eventually(
            "the writer's table created through HAProxy",
            Duration::from_secs(60),
            || async {
                let c = sql_at(host, port, SUPERUSER_PASSWORD).await.ok()?;
                c.batch_execute(&create).await.ok()
            },
        )
        .await;
        let stop = Arc::new(AtomicBool::new(false));
        let attempts = Arc::new(Mutex::new(Vec::new()));
        let (s, a) = (stop.clone(), attempts.clone());
        let (host, table) = (host.to_string(), table.to_string());
        let task = tokio::spawn(async move {
            let mut id: i64 = 0;
            while !s.load(Ordering::Relaxed) {
                id += 1;
                let started = Instant::now();
                let server_port = tokio::time::timeout(Duration::from_secs(1), async {
                    let c = sql_at(&host, port, SUPERUSER_PASSWORD).await.ok()?;
                    let row = c
                        .query_one(
                            &format!(
                                "INSERT INTO {table} (id) VALUES ($1) RETURNING inet_server_port()"
                            ),
                            &[&id],
                        )
                        .await
                        .ok()?;
                    u16::try_from(row.get::<_, i32>(0)).ok()
                })
                .await
                .ok()
                .flatten();
                a.lock().unwrap_or_else(|p| p.into_inner()).push(Attempt {
                    id,
                    started,
                    done: Instant::now(),
                    server_port,
                });
                tokio::time::sleep(every).await;
            }
        });
        HostWriter {
            stop,
            attempts,
            task: Some(task),
        }
    }

    fn attempts(&self) -> Vec<Attempt> {
        self.attempts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn acked(&self) -> usize {
        self.attempts()
            .iter()
            .filter(|a| a.server_port.is_some())
            .count()
    }

    /// The first write that started after `t` and committed.
    fn first_ack_started_after(&self, t: Instant) -> Option<Attempt> {
        self.attempts()
            .into_iter()
            .find(|a| a.started > t && a.server_port.is_some())
    }

    async fn stop(mut self) -> Vec<Attempt> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
        self.attempts()
    }
}

impl Drop for HostWriter {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

/// Name of the etcd member leading the raft group (diagnostics only).
async fn etcd_raft_leader(c: &Cluster) -> Option<String> {
    let mut client = etcd_client::Client::connect(c.etcd_endpoints(), None)
        .await
        .ok()?;
    let leader = client.status().await.ok()?.leader();
    let list = client.member_list().await.ok()?;
    list.members()
        .iter()
        .find(|m| m.id() == leader)
        .map(|m| m.name().to_string())
}

/// With PGWARDEN_IT_LOGS=DIR set, copies the cluster's logs (agents, etcd
/// members, HAProxy) to DIR/<test>/ for reading after the run.
fn save_logs(c: &Cluster, test: &str) {
    let Some(dir) = std::env::var_os("PGWARDEN_IT_LOGS") else {
        return;
    };
    let to = std::path::Path::new(&dir).join(test);
    let _ = std::fs::create_dir_all(&to);
    let root = c.root.path();
    let mut files: Vec<std::path::PathBuf> = Vec::new();
    for entry in std::fs::read_dir(root).into_iter().flatten().flatten() {
        let p = entry.path();
        if p.is_dir() {
            files.push(p.join("agent.log"));
        } else if p.extension().is_some_and(|e| e == "log") {
            files.push(p);
        }
    }
    for f in files {
        let name = f
            .strip_prefix(root)
            .map(|r| r.to_string_lossy().replace('/', "-"))
            .unwrap_or_default();
        let _ = std::fs::copy(&f, to.join(name));
    }
}

/// Every running etcd member reports a healthy cluster (it has a quorum).
async fn etcd_healthy(c: &Cluster) {
    for url in c.etcd_endpoints() {
        eventually(&format!("etcd at {url} healthy"), LONG, || {
            let url = format!("{url}/health");
            async move {
                let v = http_json(&url).await?;
                (v["health"] == "true").then_some(())
            }
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_server_1_promotes_db03_and_haproxy_routes_writes_there() {
    let mut c = recipe_cluster().await;
    let (hap, rw) = (c.haproxy_host.clone(), c.rw_port);
    let writer = HostWriter::start(&hap, rw, "w", Duration::from_millis(50)).await;
    eventually("some writes before the fault", LONG, || async {
        (writer.acked() > 10).then_some(())
    })
    .await;
    // Before the fault, writes land on DB01.
    let before = writer.attempts();
    let last = before.iter().rev().find(|a| a.server_port.is_some());
    assert_eq!(
        last.and_then(|a| a.server_port),
        Some(c.members[DB01].pg_port),
        "writes through HAProxy land on db01 before the fault"
    );
    let monitor = c.monitor();
    let etcd_leader = etcd_raft_leader(&c).await;

    let fault = Instant::now();
    c.kill9_host(SERVER1);

    let new = c.wait_single_primary(LONG).await;
    let to_primary = fault.elapsed();
    assert_eq!(
        c.members[new].name, "db03",
        "db03, the preferred failover target, took over (not db04)"
    );
    // The lease (ttl 10 s) had to expire first: nobody may promote before.
    assert!(
        to_primary >= Duration::from_secs(5),
        "db03 promoted after {to_primary:?}, before the lease could expire"
    );

    // Writes through HAProxy resume, on DB03.
    let first = eventually(
        "a write accepted through HAProxy after the fault",
        LONG,
        || async { writer.first_ack_started_after(fault) },
    )
    .await;
    let to_write = first.done.duration_since(fault);
    assert_eq!(
        first.server_port,
        Some(c.members[DB03].pg_port),
        "the first write after the fault landed on db03"
    );
    let db03_port = c.members[DB03].pg_port;
    let (hap2, rw2) = (hap.clone(), rw);
    eventually(
        "HAProxy's read-write port serving db03 as a primary",
        LONG,
        || {
            let hap2 = hap2.clone();
            async move { (served_by(&hap2, rw2).await == Some((db03_port, false))).then_some(()) }
        },
    )
    .await;

    // Reads through the read-only port are served by DB04, a replica (of
    // DB03 now).
    let db04 = &c.members[DB04];
    let db04_status = db04.api("/status");
    eventually("db04 streaming from db03", LONG, || {
        let url = db04_status.clone();
        async move {
            let st = http_json(&url).await?;
            (st["upstream"] == "db03" && st["streaming"] == true).then_some(())
        }
    })
    .await;
    reads_served_by(&c, db04.pg_port, "db04").await;

    // The two surviving etcd members keep a quorum and hold the new leader.
    assert_eq!(c.etcd_endpoints().len(), 2, "etcd e1 died with server 1");
    etcd_healthy(&c).await;
    eventually(
        "the leader key naming db03, read through the surviving etcd members",
        LONG,
        || async {
            (c.dcs_get("/service/it/leader").await.as_deref() == Some("db03")).then_some(())
        },
    )
    .await;

    let attempts = writer.stop().await;
    monitor.finish().await;
    assert_eq!(c.wait_single_primary(LONG).await, DB03);
    // Every write started after the fault that committed, committed on DB03.
    let elsewhere: Vec<&Attempt> = attempts
        .iter()
        .filter(|a| a.started > fault)
        .filter(|a| a.server_port.is_some_and(|p| p != db03_port))
        .collect();
    assert!(
        elsewhere.is_empty(),
        "writes after the fault committed elsewhere than db03: {elsewhere:?}"
    );
    let committed_after = attempts
        .iter()
        .filter(|a| a.started > fault && a.server_port.is_some())
        .count();
    // Every committed id is on DB03 (one table, ids unique: no lost rows
    // among those written after the fault).
    let ids_after: Vec<i64> = attempts
        .iter()
        .filter(|a| a.started > fault && a.server_port.is_some())
        .map(|a| a.id)
        .collect();
    let client = c.sql(DB03).await.expect("connect to db03");
    let rows = client
        .query("SELECT id FROM w WHERE id = ANY($1)", &[&ids_after])
        .await
        .expect("select");
    assert_eq!(
        rows.len(),
        ids_after.len(),
        "every write acknowledged after the fault is on db03"
    );
    eprintln!(
        "recipe layout, server 1 lost (etcd raft leader was {}): db03 answered /primary after {:.1} s, first write through HAProxy after {:.1} s ({committed_after} writes committed after the fault)",
        etcd_leader.as_deref().unwrap_or("?"),
        to_primary.as_secs_f64(),
        to_write.as_secs_f64()
    );
    save_logs(&c, "losing_server_1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_server_2_moves_nothing() {
    let mut c = recipe_cluster().await;
    let (hap, rw) = (c.haproxy_host.clone(), c.rw_port);
    let writer = HostWriter::start(&hap, rw, "w", Duration::from_millis(50)).await;
    eventually("some writes before the fault", LONG, || async {
        (writer.acked() > 10).then_some(())
    })
    .await;
    let monitor = c.monitor();
    let etcd_leader = etcd_raft_leader(&c).await;

    let fault = Instant::now();
    c.kill9_host(SERVER2);
    // Watch writes across more than a lease's lifetime (ttl 10 s).
    eventually(
        "writes keep flowing for 12 s after server 2 died",
        LONG,
        || async { (fault.elapsed() > Duration::from_secs(12)).then_some(()) },
    )
    .await;
    let attempts = writer.stop().await;
    let failed: Vec<&Attempt> = attempts
        .iter()
        .filter(|a| a.done > fault && a.server_port.is_none())
        .collect();
    assert!(
        failed.is_empty(),
        "{} writes through HAProxy failed while only server 2 was down, first at +{:.1} s: {:?}",
        failed.len(),
        failed[0]
            .started
            .saturating_duration_since(fault)
            .as_secs_f64(),
        failed.iter().take(5).collect::<Vec<_>>()
    );
    let db01_port = c.members[DB01].pg_port;
    let during: Vec<&Attempt> = attempts.iter().filter(|a| a.started > fault).collect();
    assert!(during.len() >= 12, "only {} writes in 12 s", during.len());
    assert!(
        during.iter().all(|a| a.server_port == Some(db01_port)),
        "every write after the fault committed on db01"
    );

    // DB01 stays the only primary; the leader key never moved.
    assert_eq!(c.wait_single_primary(LONG).await, DB01, "nothing moved");
    eventually(
        "the leader key naming db01, read through the surviving etcd members",
        LONG,
        || async {
            (c.dcs_get("/service/it/leader").await.as_deref() == Some("db01")).then_some(())
        },
    )
    .await;
    // Reads through the read-only port are served by DB02 alone now.
    reads_served_by(&c, c.members[DB02].pg_port, "db02").await;
    assert_eq!(c.etcd_endpoints().len(), 2, "etcd e2 died with server 2");
    etcd_healthy(&c).await;
    monitor.finish().await;
    eprintln!(
        "recipe layout, server 2 lost (etcd raft leader was {}): {} writes through HAProxy in {:.1} s after the fault, none failed",
        etcd_leader.as_deref().unwrap_or("?"),
        during.len(),
        fault.elapsed().as_secs_f64()
    );
    save_logs(&c, "losing_server_2");
}
