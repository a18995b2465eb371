//! Unknown is not absent: a primary whose pg_control cannot be read (a
//! permission error) is never taken for "no data directory" — its data is
//! neither wiped nor re-cloned, nothing starts on it, and it rejoins by
//! itself once the file is readable again.

mod support;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::time::{Duration, Instant};
use support::faults::Writer;
use support::{eventually, http_json, http_status, Cluster, ClusterOptions};

const LONG: Duration = Duration::from_secs(120);

/// The data directory's identity: a re-clone or a wipe-and-recreate gives
/// it (or PG_VERSION) a new inode.
fn inodes(c: &Cluster, i: usize) -> (u64, u64) {
    let dir = c.members[i].data_dir();
    let ino = |p: std::path::PathBuf| std::fs::metadata(p).map(|m| m.ino()).unwrap_or(0);
    (ino(dir.clone()), ino(dir.join("PG_VERSION")))
}

fn chmod(path: &std::path::Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_pg_control_never_wipes_or_reclones_the_primary() {
    let mut c = Cluster::start(&ClusterOptions::new(3));
    let old = c.ready_with_haproxy().await;
    let writer = Writer::start(c.rw_port, "w", Duration::from_millis(100)).await;
    eventually("a first write", LONG, || async {
        (!writer.acked_ids().is_empty()).then_some(())
    })
    .await;
    let monitor = c.monitor();
    let before = inodes(&c, old);
    let control = c.members[old].data_dir().join("global/pg_control");

    // pg_control unreadable, and an agent that has to read it again (a
    // restart forgets the cached system identifier).
    chmod(&control, 0o000);
    let log_before = c.agent_log(old).len();
    c.kill9_agent(old);
    c.start_agent(old);
    eventually(
        "the restarted agent reports the unreadable pg_control",
        LONG,
        || async {
            let st = http_json(&c.members[old].api("/status")).await?;
            (st["role"] == "leader").then_some(())
        },
    )
    .await;
    // PostgreSQL itself still answers as primary: business as usual.
    assert_eq!(c.wait_single_primary(LONG).await, old);

    // Now PostgreSQL dies: the agent cannot tell what its data last ran as,
    // so it starts nothing; the lease goes to a replica.
    let fault = Instant::now();
    c.kill9_postgres(old);
    let new = eventually("a replica promoted", LONG, || async {
        for (i, m) in c.members.iter().enumerate() {
            if i != old && http_status("GET", &m.api("/primary")).await == 200 {
                return Some(i);
            }
        }
        None
    })
    .await;
    assert_ne!(new, old);
    eventually("writes resume on the new primary", LONG, || async {
        (writer.acked_after(fault) > 0).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert_eq!(
        inodes(&c, old),
        before,
        "the old primary's data directory was replaced"
    );
    assert!(
        c.postmaster_pid(old).is_none(),
        "something started on unknown data"
    );
    let st = http_json(&c.members[old].api("/status"))
        .await
        .expect("status");
    let error = st["error"].as_str().unwrap_or_default().to_string();
    assert!(
        error.contains("cannot read the data directory"),
        "status error: {error}"
    );
    let log = c.agent_log(old);
    let log = log.get(log_before..).unwrap_or_default();
    for forbidden in [
        "cloning from",
        "removing the data directory",
        "running initdb",
    ] {
        assert!(!log.contains(forbidden), "the agent logged {forbidden:?}");
    }

    // Readable again: it rejoins as a replica (by rewind) on its own data.
    chmod(&control, 0o600);
    eventually("the old primary streams from the new one", LONG, || async {
        (http_status("GET", &c.members[old].api("/replica")).await == 200).then_some(())
    })
    .await;
    assert_eq!(
        inodes(&c, old),
        before,
        "the old primary's data directory was replaced"
    );
    writer.stop().await;
    monitor.finish().await;
}
