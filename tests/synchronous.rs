//! Synchronous mode (rule 4) on real processes: the leader names a standby
//! in `synchronous_standby_names` and in the etcd key `sync`; a commit is
//! acknowledged only once that standby has it, so killing the primary loses
//! nothing and only the listed standby may take over. Strict mode keeps
//! commits waiting while no standby is there; otherwise the leader falls
//! back to asynchronous replication and says so (`sync`, /status, /metrics,
//! the log) until a standby returns.

mod support;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use support::{eventually, http_json, http_status, Cluster, ClusterOptions};

const LONG: Duration = Duration::from_secs(120);

fn sync_opts(members: usize, strict: bool) -> ClusterOptions {
    let mut opts = ClusterOptions::new(members);
    opts.dcs_extra = format!("synchronous_mode = true\nsynchronous_mode_strict = {strict}");
    opts
}

/// The `sync` key: (leader, sync_standby), None while absent or unreadable.
async fn sync_key(c: &Cluster) -> Option<(String, Vec<String>)> {
    let text = c.dcs_get(&format!("/service/{}/sync", c.scope)).await?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    let leader = v["leader"].as_str()?.to_string();
    let standbys = v["sync_standby"]
        .as_array()?
        .iter()
        .filter_map(|s| s.as_str().map(String::from))
        .collect();
    Some((leader, standbys))
}

/// `SHOW synchronous_standby_names` on member i.
async fn standby_names(c: &Cluster, i: usize) -> Option<String> {
    let client = c.sql(i).await.ok()?;
    let row = client
        .query_one("SHOW synchronous_standby_names", &[])
        .await
        .ok()?;
    Some(row.get(0))
}

/// Waits until the leader `primary` publishes exactly one synchronous
/// standby in `sync`, that standby answers 200 on /sync, and the primary's
/// PostgreSQL waits for it by name; returns its index.
async fn wait_sync_published(c: &Cluster, primary: usize) -> usize {
    let leader = c.members[primary].name.clone();
    eventually(
        &format!("{leader} publishes a synchronous standby that answers /sync"),
        LONG,
        || async {
            let (l, standbys) = sync_key(c).await?;
            if l != leader || standbys.len() != 1 {
                return None;
            }
            let i = c.index_of(&standbys[0]);
            if http_status("GET", &c.members[i].api("/sync")).await != 200 {
                return None;
            }
            let names = standby_names(c, primary).await?;
            names.contains(&format!("\"{}\"", standbys[0])).then_some(i)
        },
    )
    .await
}

/// The value of gauge `name` in member i's /metrics (its labels ignored).
async fn gauge(c: &Cluster, i: usize, name: &str) -> Option<String> {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(3))
        .build()
        .ok()?;
    let text = client
        .get(c.members[i].api("/metrics"))
        .send()
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find(|l| l.split(['{', ' ']).next() == Some(name))
        .and_then(|l| l.rsplit(' ').next())
        .map(String::from)
}

async fn replication_mode(c: &Cluster, i: usize) -> Option<String> {
    let st = http_json(&c.members[i].api("/status")).await?;
    st["replication_mode"].as_str().map(String::from)
}

/// One INSERT on a fresh connection to member i, given `within` to be
/// acknowledged.
async fn insert(c: &Cluster, i: usize, id: i64, within: Duration) -> bool {
    tokio::time::timeout(within, async {
        let client = c.sql(i).await.ok()?;
        client
            .execute("INSERT INTO s (id) VALUES ($1)", &[&id])
            .await
            .ok()
    })
    .await
    .ok()
    .flatten()
    .is_some()
}

async fn create_table(c: &Cluster, i: usize) {
    eventually("the test table created on the primary", LONG, || async {
        let client = c.sql(i).await.ok()?;
        client
            .batch_execute("CREATE TABLE IF NOT EXISTS s (id bigint PRIMARY KEY)")
            .await
            .ok()
    })
    .await;
}

/// Ids of the rows in `s` on member i.
async fn ids_on(c: &Cluster, i: usize) -> std::collections::HashSet<i64> {
    eventually(
        &format!("reading the test table on {}", c.members[i].name),
        LONG,
        || async {
            let client = c.sql(i).await.ok()?;
            let rows = client.query("SELECT id FROM s", &[]).await.ok()?;
            Some(rows.iter().map(|r| r.get(0)).collect())
        },
    )
    .await
}

/// Bytes in member i's agent log now.
fn log_len(c: &Cluster, i: usize) -> usize {
    std::fs::metadata(c.members[i].dir.join("agent.log")).map_or(0, |m| m.len() as usize)
}

/// What member i's agent logged past the first `from` bytes.
fn log_since(c: &Cluster, i: usize, from: usize) -> String {
    let log = std::fs::read(c.members[i].dir.join("agent.log")).unwrap_or_default();
    String::from_utf8_lossy(log.get(from..).unwrap_or_default()).into_owned()
}

/// The primary's whole server dies in the middle of a burst of commits:
/// the standby listed in `sync` takes over, not the other replica that
/// would win the election on failover_priority, and it has every commit
/// the old primary acknowledged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn synchronous_mode_loses_no_acknowledged_commit_when_the_primary_dies() {
    // node1 bootstraps; node3 may never be a synchronous standby (nosync)
    // but would win a tie with node2 on failover_priority: only `sync`
    // keeps it from taking over.
    let mut opts = sync_opts(3, false);
    opts.members[2].extra = "\n[tags]\nnosync = true\nfailover_priority = 10\n".into();
    opts.autostart = 1;
    let mut c = Cluster::start(&opts);
    let old = c.wait_single_primary(LONG).await;
    assert_eq!(old, 0, "the only agent started bootstraps");
    c.start_agent(1);
    c.start_agent(2);
    let (sync, other) = (1, 2);
    assert_eq!(
        wait_sync_published(&c, old).await,
        sync,
        "the standby not tagged nosync is the synchronous one"
    );
    let sync_name = c.members[sync].name.clone();
    let other_name = c.members[other].name.clone();
    // What an operator sees: `list` names the synchronous standby, the
    // other replica is an ordinary one and answers /async.
    eventually("pgwarden list shows the sync_standby", LONG, || async {
        let out = c.cli(old, &["list", "--format", "json"]);
        let rows: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        let role = |name: &str| {
            rows.as_array()?
                .iter()
                .find(|r| r["name"] == name)
                .and_then(|r| r["role"].as_str().map(String::from))
        };
        (role(&sync_name)?.as_str() == "sync_standby" && role(&other_name)?.as_str() == "replica")
            .then_some(())
    })
    .await;
    eventually("the other replica answers /async", LONG, || async {
        (http_status("GET", &c.members[other].api("/async")).await == 200).then_some(())
    })
    .await;
    assert_ne!(
        http_status("GET", &c.members[other].api("/sync")).await,
        200,
        "{other_name} is not listed in sync but answers /sync"
    );
    create_table(&c, old).await;

    // A burst of single-row commits over one connection; the server dies
    // in the middle of it.
    let client = c.sql(old).await.expect("connect to the primary");
    let acked = Arc::new(Mutex::new(Vec::<i64>::new()));
    let writer = {
        let acked = acked.clone();
        tokio::spawn(async move {
            for id in 1..=100_000i64 {
                let r = tokio::time::timeout(
                    Duration::from_secs(10),
                    client.execute("INSERT INTO s (id) VALUES ($1)", &[&id]),
                )
                .await;
                match r {
                    Ok(Ok(_)) => acked.lock().unwrap_or_else(|p| p.into_inner()).push(id),
                    _ => break,
                }
            }
        })
    };
    eventually("200 commits acknowledged", LONG, || async {
        (acked.lock().unwrap_or_else(|p| p.into_inner()).len() >= 200).then_some(())
    })
    .await;
    c.kill9_server(old);
    tokio::time::timeout(Duration::from_secs(30), writer)
        .await
        .expect("the writer stops once the server is gone")
        .expect("writer task");
    let acked = acked.lock().unwrap_or_else(|p| p.into_inner()).clone();
    eprintln!("{} commits acknowledged before the kill", acked.len());

    let new = c.wait_single_primary(LONG).await;
    assert_ne!(new, old, "the dead primary cannot be the leader");
    assert_eq!(
        c.members[new].name, sync_name,
        "the member listed in sync ({sync_name}) is the one promoted, not {}",
        c.members[new].name
    );
    let have = ids_on(&c, new).await;
    let missing: Vec<i64> = acked
        .iter()
        .filter(|id| !have.contains(id))
        .copied()
        .collect();
    assert!(
        missing.is_empty(),
        "{} of {} acknowledged commits missing on the new primary: {:?}",
        missing.len(),
        acked.len(),
        &missing[..missing.len().min(20)]
    );
}

/// Strict mode, the only standby's server dies: commits wait (reads do
/// not), `sync` keeps naming the standby, nothing falls back; once its
/// agent is back, commits are acknowledged again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strict_mode_blocks_writes_without_a_standby_and_resumes_when_it_returns() {
    let mut c = Cluster::start(&sync_opts(2, true));
    let primary = c.wait_single_primary(LONG).await;
    let replica = 1 - primary;
    assert_eq!(wait_sync_published(&c, primary).await, replica);
    create_table(&c, primary).await;
    assert!(
        insert(&c, primary, 1, Duration::from_secs(10)).await,
        "a write with the synchronous standby up"
    );

    let log_before = log_len(&c, primary);
    c.kill9_server(replica);
    // The primary has noticed: no WAL sender left.
    eventually("the primary sees no standby", LONG, || async {
        let client = c.sql(primary).await.ok()?;
        let row = client
            .query_one("SELECT count(*) FROM pg_stat_replication", &[])
            .await
            .ok()?;
        (row.get::<_, i64>(0) == 0).then_some(())
    })
    .await;
    let blocked = c.sql(primary).await.expect("connect to the primary");
    let write = tokio::time::timeout(
        Duration::from_secs(4),
        blocked.execute("INSERT INTO s (id) VALUES (2)", &[]),
    )
    .await;
    assert!(
        write.is_err(),
        "strict mode acknowledged a commit with no synchronous standby: {write:?}"
    );
    // Reads still work, and nothing claims commits run unprotected.
    let read = tokio::time::timeout(Duration::from_secs(3), async {
        c.sql(primary)
            .await
            .ok()?
            .query_one("SELECT 1", &[])
            .await
            .ok()
    })
    .await
    .ok()
    .flatten();
    assert!(read.is_some(), "a read on the primary while writes wait");
    assert_eq!(
        sync_key(&c).await,
        Some((
            c.members[primary].name.clone(),
            vec![c.members[replica].name.clone()]
        )),
        "strict mode keeps the standby in sync"
    );
    assert_eq!(
        gauge(&c, primary, "pgwarden_sync_fallback")
            .await
            .as_deref(),
        Some("0")
    );
    let mode = replication_mode(&c, primary).await.unwrap_or_default();
    assert!(
        mode.starts_with("synchronous") && !mode.contains("fallback"),
        "/status replication_mode while commits wait: {mode}"
    );
    let log = log_since(&c, primary, log_before);
    assert!(
        !log.contains("falling back to asynchronous"),
        "strict mode fell back:\n{log}"
    );

    c.start_agent(replica);
    let back = Instant::now();
    let mut id = 100;
    eventually(
        "a write acknowledged once the standby is back",
        Duration::from_secs(30),
        || {
            id += 1;
            let id = id;
            let c = &c;
            async move {
                insert(c, primary, id, Duration::from_secs(5))
                    .await
                    .then_some(())
            }
        },
    )
    .await;
    eprintln!(
        "writes resumed {:.1}s after the standby's agent was started",
        back.elapsed().as_secs_f64()
    );
    assert_eq!(c.wait_single_primary(LONG).await, primary);
    assert_eq!(wait_sync_published(&c, primary).await, replica);
    drop(blocked);
}

/// Not strict, the only standby's server dies: the leader empties `sync`,
/// commits are acknowledged again, and /status, /metrics and a WARN line
/// say they are unprotected; the standby back, it is published again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_strict_the_primary_falls_back_to_asynchronous_and_says_so() {
    let mut c = Cluster::start(&sync_opts(2, false));
    let primary = c.wait_single_primary(LONG).await;
    let replica = 1 - primary;
    let leader = c.members[primary].name.clone();
    assert_eq!(wait_sync_published(&c, primary).await, replica);
    create_table(&c, primary).await;
    // The API answers from the loop's last view: a pass after the key.
    eventually(
        "/status and /metrics say synchronous",
        Duration::from_secs(30),
        || async {
            let mode = replication_mode(&c, primary).await?;
            let gauge = gauge(&c, primary, "pgwarden_sync_fallback").await?;
            (mode.starts_with("synchronous") && gauge == "0").then_some(())
        },
    )
    .await;

    // The leader already fell back once at bootstrap, before its first
    // standby: only what it logs from here on counts.
    let log_before = log_len(&c, primary);
    c.kill9_server(replica);
    let fault = Instant::now();
    let mut id = 0;
    eventually(
        "writes on the primary acknowledged again",
        Duration::from_secs(30),
        || {
            id += 1;
            let id = id;
            let c = &c;
            async move {
                insert(c, primary, id, Duration::from_secs(2))
                    .await
                    .then_some(())
            }
        },
    )
    .await;
    eprintln!(
        "writes resumed {:.1}s after the standby died",
        fault.elapsed().as_secs_f64()
    );
    eventually("sync lists no standby", Duration::from_secs(30), || async {
        let (l, standbys) = sync_key(&c).await?;
        (l == leader && standbys.is_empty()).then_some(())
    })
    .await;
    eventually(
        "/status says asynchronous fallback",
        Duration::from_secs(30),
        || async {
            replication_mode(&c, primary)
                .await?
                .contains("asynchronous fallback")
                .then_some(())
        },
    )
    .await;
    eventually(
        "pgwarden_sync_fallback 1",
        Duration::from_secs(30),
        || async { (gauge(&c, primary, "pgwarden_sync_fallback").await? == "1").then_some(()) },
    )
    .await;
    let log = log_since(&c, primary, log_before);
    assert!(
        log.lines()
            .any(|l| l.contains("WARN") && l.contains("falling back to asynchronous")),
        "no WARN line about the fallback:\n{log}"
    );

    c.start_agent(replica);
    assert_eq!(wait_sync_published(&c, primary).await, replica);
    eventually(
        "pgwarden_sync_fallback 0",
        Duration::from_secs(30),
        || async { (gauge(&c, primary, "pgwarden_sync_fallback").await? == "0").then_some(()) },
    )
    .await;
    let mode = replication_mode(&c, primary).await.unwrap_or_default();
    assert!(
        mode.starts_with("synchronous") && mode.contains(&c.members[replica].name),
        "/status replication_mode once the standby is back: {mode}"
    );
}
