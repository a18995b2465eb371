//! A cluster bootstraps itself and serves HAProxy: real etcd, PostgreSQL
//! and HAProxy processes on loopback.

mod support;

use std::time::Duration;
use support::cluster::SUPERUSER_PASSWORD;
use support::{eventually, http_json, http_status, sql, Cluster, ClusterOptions};

const BOOT: Duration = Duration::from_secs(120);

/// Health paths and what each member must answer (GET, HEAD and OPTIONS).
const PRIMARY_PATHS: &[(&str, u16)] = &[
    ("/", 200),
    ("/primary", 200),
    ("/leader", 200),
    ("/read-write", 200),
    ("/replica", 503),
    ("/read-only", 200),
    ("/sync", 503),
    ("/async", 503),
    ("/health", 200),
    ("/liveness", 200),
    ("/readiness", 200),
    ("/status", 200),
    ("/cluster", 200),
    ("/history", 200),
    ("/config", 200),
    ("/metrics", 200),
];
const REPLICA_PATHS: &[(&str, u16)] = &[
    ("/", 503),
    ("/primary", 503),
    ("/leader", 503),
    ("/read-write", 503),
    ("/replica", 200),
    ("/replica?lag=16MB", 200),
    ("/replica?tag_zone=b", 200),
    ("/replica?tag_zone=a", 503),
    ("/read-only", 200),
    ("/sync", 503),
    ("/async", 200),
    ("/health", 200),
    ("/liveness", 200),
    ("/readiness", 200),
    ("/status", 200),
    ("/cluster", 200),
    ("/metrics", 200),
];
const STOPPED_PATHS: &[(&str, u16)] = &[
    ("/", 503),
    ("/primary", 503),
    ("/replica", 503),
    ("/read-only", 503),
    ("/sync", 503),
    ("/async", 503),
    ("/health", 503),
    ("/liveness", 200),
    ("/readiness", 503),
    ("/status", 200),
    ("/cluster", 200),
    ("/metrics", 200),
];

async fn check_paths(c: &Cluster, i: usize, table: &[(&str, u16)]) {
    for (path, want) in table {
        for method in ["GET", "HEAD", "OPTIONS"] {
            let got = http_status(method, &c.members[i].api(path)).await;
            assert_eq!(got, *want, "{method} {path} on {}", c.members[i].name);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_bootstraps_streams_and_routes_through_haproxy() {
    let mut opts = ClusterOptions::new(4);
    // Every member carries a custom tag the /replica filter can match.
    for m in &mut opts.members {
        m.extra = "\n[tags.custom]\nzone = \"b\"\n".into();
    }
    // node4's PostgreSQL can never start (a library that does not exist):
    // it is the "member whose PostgreSQL is stopped".
    opts.members[3].pg_extra =
        "parameters = { shared_preload_libraries = \"no_such_library\" }\n".into();
    let mut c = Cluster::start(&opts);

    let primary = c.wait_single_primary(BOOT).await;
    let leader_name = c.members[primary].name.clone();
    let replicas: Vec<usize> = (0..3).filter(|i| *i != primary).collect();
    assert!(
        primary < 3,
        "the member that cannot start PostgreSQL must not lead"
    );

    // Exactly one member ran initdb: initialize holds one system identifier
    // and every running member has it.
    let sysid = c
        .etcd
        .get("/service/it/initialize")
        .await
        .expect("initialize key");
    assert!(
        sysid.parse::<u64>().is_ok(),
        "initialize holds a system identifier: {sysid}"
    );

    // Both replicas stream through their slots.
    let pg = sql(c.members[primary].pg_port, SUPERUSER_PASSWORD)
        .await
        .expect("connect to primary");
    let want: Vec<String> = replicas
        .iter()
        .map(|i| c.members[*i].name.clone())
        .collect();
    eventually("both replicas streaming on their slots", BOOT, || async {
        let streaming: Vec<String> = pg
            .query("SELECT application_name FROM pg_stat_replication WHERE state = 'streaming' ORDER BY 1", &[])
            .await
            .ok()?
            .iter()
            .map(|r| r.get(0))
            .collect();
        let active: Vec<String> = pg
            .query("SELECT slot_name::text FROM pg_replication_slots WHERE active ORDER BY 1", &[])
            .await
            .ok()?
            .iter()
            .map(|r| r.get(0))
            .collect();
        (streaming == want && active == want).then_some(())
    })
    .await;
    for i in &replicas {
        let r = sql(c.members[*i].pg_port, SUPERUSER_PASSWORD)
            .await
            .expect("connect to replica");
        let row = r
            .query_one(
                "SELECT system_identifier::text FROM pg_control_system()",
                &[],
            )
            .await
            .expect("sysid");
        assert_eq!(
            row.get::<_, String>(0),
            sysid,
            "replica {} is a clone of the cluster",
            c.members[*i].name
        );
        let row = r
            .query_one("SELECT pg_is_in_recovery()", &[])
            .await
            .expect("recovery");
        assert!(row.get::<_, bool>(0), "replica is in recovery");
    }

    // The data was initialised with checksums (needed by pg_rewind later).
    let row = pg
        .query_one("SHOW data_checksums", &[])
        .await
        .expect("checksums");
    assert_eq!(row.get::<_, String>(0), "on");

    // node4 cloned but cannot start: its PostgreSQL stays down.
    eventually("node4 reports its failure", BOOT, || async {
        let st = http_json(&c.members[3].api("/status")).await?;
        (st["state"] != "creating replica"
            && st["state"] != "streaming"
            && st.get("error").is_some_and(|e| !e.is_null()))
        .then_some(())
    })
    .await;

    // Health contract on a primary, a replica and a stopped member.
    check_paths(&c, primary, PRIMARY_PATHS).await;
    // Just after cloning, a replica may still be catching up (readiness
    // is 503 beyond maximum_lag_on_failover): wait until it is caught up.
    eventually("replica caught up (lag known and small)", BOOT, || async {
        let lagless =
            http_status("GET", &c.members[replicas[0]].api("/replica?lag=16MB")).await == 200;
        (lagless && http_status("GET", &c.members[replicas[0]].api("/readiness")).await == 200)
            .then_some(())
    })
    .await;
    check_paths(&c, replicas[0], REPLICA_PATHS).await;
    check_paths(&c, 3, STOPPED_PATHS).await;

    // `pgwarden list --format json` is parseable and complete.
    let out = c.cli(0, &["list", "--format", "json"]);
    assert!(
        out.status.success(),
        "list failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: serde_json::Value = serde_json::from_slice(&out.stdout).expect("list JSON");
    let rows = rows.as_array().expect("array");
    assert_eq!(rows.len(), 4);
    let leaders: Vec<&serde_json::Value> = rows.iter().filter(|r| r["role"] == "leader").collect();
    assert_eq!(leaders.len(), 1);
    assert_eq!(leaders[0]["name"], leader_name.as_str());
    assert_eq!(leaders[0]["state"], "running");
    for r in rows {
        for key in [
            "name",
            "role",
            "state",
            "host",
            "port",
            "api_url",
            "timeline",
            "lag_bytes",
        ] {
            assert!(r.get(key).is_some(), "list row lacks {key}: {r}");
        }
    }
    let table = c.cli(0, &["list"]);
    let table = String::from_utf8_lossy(&table.stdout).to_string();
    assert!(
        table.contains("Member") && table.contains("Lag in MB"),
        "{table}"
    );
    for i in 0..4 {
        assert!(table.contains(&c.members[i].name), "{table}");
    }

    // HAProxy: a row written through the read-write port reaches every
    // replica and the read-only port.
    c.start_haproxy();
    let rw = eventually(
        "a connection through HAProxy's read-write port",
        BOOT,
        || async {
            let client = sql(c.rw_port, SUPERUSER_PASSWORD).await.ok()?;
            let row = client
                .query_one("SELECT pg_is_in_recovery()", &[])
                .await
                .ok()?;
            (!row.get::<_, bool>(0)).then_some(client)
        },
    )
    .await;
    rw.batch_execute(
        "CREATE TABLE t (id int PRIMARY KEY, v text); INSERT INTO t VALUES (1, 'through haproxy')",
    )
    .await
    .expect("write through HAProxy");
    for i in &replicas {
        let port = c.members[*i].pg_port;
        eventually("the row replicated", BOOT, || async {
            let r = sql(port, SUPERUSER_PASSWORD).await.ok()?;
            let row = r
                .query_opt("SELECT v FROM t WHERE id = 1", &[])
                .await
                .ok()??;
            (row.get::<_, String>(0) == "through haproxy").then_some(())
        })
        .await;
    }
    eventually(
        "the row readable through the read-only port from a replica",
        BOOT,
        || async {
            let r = sql(c.ro_port, SUPERUSER_PASSWORD).await.ok()?;
            let row = r
                .query_opt("SELECT v, pg_is_in_recovery() FROM t WHERE id = 1", &[])
                .await
                .ok()??;
            (row.get::<_, String>(0) == "through haproxy" && row.get::<_, bool>(1)).then_some(())
        },
    )
    .await;

    // kill -9 of the leader's agent leaves PostgreSQL running; the restarted
    // agent adopts it (same postmaster) and keeps the leadership.
    let pid_before = c.postmaster_pid(primary).expect("postmaster running");
    c.kill9_agent(primary);
    assert_eq!(
        http_status("GET", &c.members[primary].api("/primary")).await,
        0,
        "agent is gone"
    );
    let still = sql(c.members[primary].pg_port, SUPERUSER_PASSWORD)
        .await
        .expect("PostgreSQL still up");
    still
        .batch_execute("INSERT INTO t VALUES (2, 'agent down')")
        .await
        .expect("PostgreSQL still writable");
    c.start_agent(primary);
    let again = c.wait_single_primary(BOOT).await;
    assert_eq!(again, primary, "the adopted primary keeps the lease");
    assert_eq!(
        c.postmaster_pid(primary),
        Some(pid_before),
        "adopted without a restart"
    );
    let log = c.agent_log(primary);
    assert!(log.contains("adopting the running PostgreSQL"), "{log}");

    // Same for a replica.
    let r = replicas[0];
    let rpid = c.postmaster_pid(r).expect("replica postmaster");
    c.kill9_agent(r);
    c.start_agent(r);
    eventually(
        "restarted replica agent reports streaming",
        BOOT,
        || async { (http_status("GET", &c.members[r].api("/replica")).await == 200).then_some(()) },
    )
    .await;
    assert_eq!(
        c.postmaster_pid(r),
        Some(rpid),
        "replica adopted without a restart"
    );

    // SIGTERM on the leader's agent stops PostgreSQL cleanly and removes
    // the leader key at once.
    let status = c.sigterm_agent(primary).expect("agent exit status");
    assert!(
        status.success(),
        "agent exits cleanly on SIGTERM: {status:?}"
    );
    assert_eq!(
        c.postmaster_pid(primary),
        None,
        "PostgreSQL stopped with the agent"
    );
    let leader = c.etcd.get("/service/it/leader").await;
    assert_ne!(
        leader.as_deref(),
        Some(leader_name.as_str()),
        "leader key released on SIGTERM"
    );
}
