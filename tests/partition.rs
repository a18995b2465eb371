//! A real network partition: every member runs in its own network namespace
//! and the primary's link to the bridge (to etcd and to its peers) goes
//! down. Safety rules 2 and 5 of DESIGN.md on real processes: the cut-off
//! primary stops taking writes before its lease may expire, a replica takes
//! over only after that, and when the link comes back the old primary
//! rejoins as a replica (rewinding what diverged) with every row the new
//! primary took.
//!
//! Needs root (network namespaces); skipped otherwise.

mod support;

use std::time::{Duration, Instant};
use support::cluster::SUPERUSER_PASSWORD;
use support::eventually;
use support::netns::{NetCluster, PG_PORT};

const TTL: u64 = 10;
const LOOP_WAIT: u64 = 1;
const RETRY_TIMEOUT: u64 = 4;
const LONG: Duration = Duration::from_secs(120);

/// HTTP status of `GET url` over the bridge (0 when nothing answered).
async fn http_status(url: &str) -> u16 {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .no_proxy()
        .build()
        .expect("http client");
    match client.get(url).send().await {
        Ok(r) => r.status().as_u16(),
        Err(_) => 0,
    }
}

/// A connection to the PostgreSQL at `host` over the bridge.
async fn sql_at(host: &str) -> Option<tokio_postgres::Client> {
    let conninfo = format!(
        "host={host} port={PG_PORT} user=postgres password={SUPERUSER_PASSWORD} dbname=postgres connect_timeout=3"
    );
    let (client, conn) = tokio::time::timeout(
        Duration::from_secs(4),
        tokio_postgres::connect(&conninfo, tokio_postgres::NoTls),
    )
    .await
    .ok()?
    .ok()?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Some(client)
}

/// Every id in table t on the member at `host`, sorted.
async fn ids_at(host: &str) -> Option<Vec<i64>> {
    let c = sql_at(host).await?;
    let rows = tokio::time::timeout(
        Duration::from_secs(4),
        c.query("SELECT id FROM t ORDER BY id", &[]),
    )
    .await
    .ok()?
    .ok()?;
    Some(rows.iter().map(|r| r.get(0)).collect())
}

async fn insert_range(host: &str, from: i64, to: i64) {
    let c = sql_at(host)
        .await
        .unwrap_or_else(|| panic!("connect to the primary at {host}"));
    c.execute(
        "INSERT INTO t (id) SELECT generate_series($1::bigint, $2::bigint)",
        &[&from, &to],
    )
    .await
    .unwrap_or_else(|e| panic!("insert {from}..={to} on {host}: {e}"));
}

/// One look at a member: does its PostgreSQL take writes (asked from inside
/// its namespace, so it works while cut off), and its /primary status (over
/// the bridge, or from inside the namespace for the member that is cut).
#[derive(Debug, Clone, Copy)]
struct Probe {
    writable: bool,
    primary_api: u16,
}

async fn probe(c: &NetCluster, i: usize, cut: Option<usize>) -> Probe {
    let api = async {
        if cut == Some(i) {
            c.net.http_status_inside(i, "/primary").await
        } else {
            http_status(&c.members[i].api("/primary")).await
        }
    };
    let (writable, primary_api) = tokio::join!(c.net.accepts_writes_inside(i), api);
    Probe {
        writable,
        primary_api,
    }
}

/// All three members at (nearly) the same moment.
async fn probe_all(c: &NetCluster, cut: Option<usize>) -> [Probe; 3] {
    let (a, b, d) = tokio::join!(probe(c, 0, cut), probe(c, 1, cut), probe(c, 2, cut));
    [a, b, d]
}

/// The safety invariant: never two writable instances nor two members
/// answering 200 on /primary in the same look.
fn check_single_writer(at: Duration, p: &[Probe; 3], violations: &mut Vec<String>) {
    let writable: Vec<usize> = (0..3).filter(|i| p[*i].writable).collect();
    let api: Vec<usize> = (0..3).filter(|i| p[*i].primary_api == 200).collect();
    if writable.len() > 1 {
        violations.push(format!(
            "at {at:?}: members {writable:?} (0-based) both accept writes"
        ));
    }
    if api.len() > 1 {
        violations.push(format!(
            "at {at:?}: members {api:?} (0-based) both answer 200 on /primary"
        ));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn partitioned_primary_fences_itself_and_rejoins_by_rewind() {
    if !support::is_root() {
        eprintln!("skipped: network namespaces need root");
        return;
    }
    let c = NetCluster::start(3, TTL, LOOP_WAIT, RETRY_TIMEOUT);

    // One primary and two streaming replicas.
    let old = eventually(
        "exactly one member answering 200 on /primary",
        LONG,
        || async {
            let mut primaries = Vec::new();
            for (i, m) in c.members.iter().enumerate() {
                if http_status(&m.api("/primary")).await == 200 {
                    primaries.push(i);
                }
            }
            (primaries.len() == 1).then(|| primaries[0])
        },
    )
    .await;
    let replicas: Vec<usize> = (0..3).filter(|i| *i != old).collect();
    for &r in &replicas {
        let url = c.members[r].api("/replica");
        eventually(&format!("{} streaming", c.members[r].name), LONG, || {
            let url = url.clone();
            async move { (http_status(&url).await == 200).then_some(()) }
        })
        .await;
    }

    // Rows every member has before the fault.
    let old_ip = c.members[old].ip.clone();
    sql_at(&old_ip)
        .await
        .expect("connect to the primary")
        .batch_execute("CREATE TABLE t (id bigint PRIMARY KEY)")
        .await
        .expect("create table");
    insert_range(&old_ip, 1, 100).await;
    let before: Vec<i64> = (1..=100).collect();
    for &r in &replicas {
        let ip = c.members[r].ip.clone();
        eventually(
            &format!("{} has the first 100 rows", c.members[r].name),
            LONG,
            || async { (ids_at(&ip).await? == before).then_some(()) },
        )
        .await;
    }

    // The partition.
    let t0 = Instant::now();
    c.net.cut(old);
    eprintln!(
        "cut {} ({}) off at {}",
        c.members[old].name,
        c.members[old].ip,
        humantime::format_rfc3339_micros(std::time::SystemTime::now())
    );
    // A write the isolated primary may still take (asynchronous replication,
    // not yet fenced): the rest of the cluster never sees it, so the old
    // primary's data diverges for certain and must be rewound.
    let isolated_write = c
        .net
        .psql(old, "INSERT INTO t (id) VALUES (100001) RETURNING id")
        .await;
    let isolated_at = t0.elapsed();
    eprintln!("write on the isolated primary at {isolated_at:?}: {isolated_write:?}");

    // Watch both sides of the partition in one loop until a replica has
    // taken over and the old primary is fenced.
    let mut violations = Vec::new();
    let mut old_last_writable: Option<Duration> = None;
    let mut old_last_api200: Option<Duration> = None;
    let mut old_fenced_at: Option<Duration> = None;
    let mut promoted: Option<(usize, Duration)> = None;
    let mut looks = 0u32;
    let deadline = Duration::from_secs(90);
    loop {
        let p = probe_all(&c, Some(old)).await;
        let at = t0.elapsed();
        looks += 1;
        check_single_writer(at, &p, &mut violations);
        if p[old].writable {
            old_last_writable = Some(at);
            old_fenced_at = None;
        } else if old_fenced_at.is_none() {
            old_fenced_at = Some(at);
        }
        if p[old].primary_api == 200 {
            old_last_api200 = Some(at);
        }
        let new: Vec<usize> = replicas
            .iter()
            .copied()
            .filter(|r| p[*r].writable || p[*r].primary_api == 200)
            .collect();
        if promoted.is_none() && !new.is_empty() {
            promoted = Some((new[0], at));
        }
        // Stop once exactly one replica is a full primary (writable and 200
        // on /primary), the old one is fenced, and a whole ttl has passed.
        let settled = new.len() == 1 && p[new[0]].writable && p[new[0]].primary_api == 200;
        if settled && !p[old].writable && at > Duration::from_secs(TTL + 2) {
            break;
        }
        assert!(
            at < deadline,
            "no settled failover {deadline:?} after the cut: last look {p:?}, violations {violations:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        violations.is_empty(),
        "split brain during the partition: {violations:?}"
    );
    let ttl = Duration::from_secs(TTL);
    let fenced = old_fenced_at.expect("the old primary stopped taking writes");
    eprintln!(
        "looks: {looks}; old primary: last writable {old_last_writable:?}, fenced at {fenced:?}, last 200 on /primary {old_last_api200:?}"
    );
    assert!(
        old_last_writable.is_some(),
        "the old primary was never seen writable after the cut: the probe is blind"
    );
    assert!(
        fenced <= ttl,
        "the cut-off primary still took writes {fenced:?} after the cut (ttl {ttl:?})"
    );
    if let Some(t) = old_last_api200 {
        assert!(
            t < ttl,
            "the cut-off primary answered 200 on /primary {t:?} after the cut (ttl {ttl:?})"
        );
    }
    let (new, promoted_at) = promoted.expect("a replica promoted");
    eprintln!(
        "promotion of {} first seen at {promoted_at:?} after the cut",
        c.members[new].name
    );
    assert!(
        promoted_at > fenced,
        "{} was promoted ({promoted_at:?}) before the old primary was fenced ({fenced:?})",
        c.members[new].name
    );
    // Nobody may take over before the old lease could have expired.
    assert!(
        promoted_at >= Duration::from_secs(5),
        "promoted {promoted_at:?} after the cut, before the lease (ttl {ttl:?}) could expire"
    );

    // The new primary takes writes; the other replica follows it.
    let new_ip = c.members[new].ip.clone();
    insert_range(&new_ip, 1001, 1100).await;
    let want: Vec<i64> = (1..=100).chain(1001..=1100).collect();
    let other = replicas
        .iter()
        .copied()
        .find(|r| *r != new)
        .expect("a third member");
    let other_ip = c.members[other].ip.clone();
    let other_replica = c.members[other].api("/replica");
    eventually(
        "the other replica streams from the new primary",
        LONG,
        || async {
            (http_status(&other_replica).await == 200 && ids_at(&other_ip).await? == want)
                .then_some(())
        },
    )
    .await;

    // Heal; the old primary rejoins as a replica. Keep checking safety.
    let healed = Instant::now();
    c.net.heal(old);
    eprintln!(
        "healed {} at {}",
        c.members[old].name,
        humantime::format_rfc3339_micros(std::time::SystemTime::now())
    );
    let old_replica = c.members[old].api("/replica");
    let mut violations = Vec::new();
    loop {
        let p = probe_all(&c, None).await;
        check_single_writer(healed.elapsed(), &p, &mut violations);
        assert!(
            !p[old].writable,
            "the old primary came back writable after the heal: {p:?}"
        );
        if http_status(&old_replica).await == 200 {
            break;
        }
        if healed.elapsed() > LONG {
            let status = support::http_json(&c.members[old].api("/status")).await;
            panic!(
                "{} did not rejoin as a replica within {LONG:?} of the heal; its /status: {}",
                c.members[old].name,
                status.map(|s| s.to_string()).unwrap_or_default()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let rejoined = healed.elapsed();
    assert!(
        violations.is_empty(),
        "split brain after the heal: {violations:?}"
    );
    let log = c.agent_log(old);
    let rewound = log.contains("rewinding with pg_rewind");
    eprintln!(
        "{} rejoined as a replica {rejoined:?} after the heal, {}",
        c.members[old].name,
        if rewound {
            "by pg_rewind"
        } else {
            "as a plain replica (no divergence)"
        }
    );
    if isolated_write.is_some() {
        assert!(
            rewound,
            "the old primary took a write the others never saw, yet rejoined without pg_rewind"
        );
    }

    // Every member has exactly the rows the new primary took (the isolated
    // write, never replicated, is gone from the rewound old primary).
    for i in 0..3 {
        let ip = c.members[i].ip.clone();
        eventually(
            &format!("{} has exactly the new primary's rows", c.members[i].name),
            LONG,
            || async { (ids_at(&ip).await? == want).then_some(()) },
        )
        .await;
    }
    let mut counts = Vec::new();
    for m in &c.members {
        counts.push(
            sql_at(&m.ip)
                .await
                .expect("connect")
                .query_one("SELECT count(*) FROM t", &[])
                .await
                .expect("count")
                .get::<_, i64>(0),
        );
    }
    assert!(
        counts.iter().all(|n| *n == want.len() as i64),
        "row counts differ: {counts:?}"
    );
    assert_eq!(
        http_status(&c.members[new].api("/primary")).await,
        200,
        "the new primary still leads"
    );
}
