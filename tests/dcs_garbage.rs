//! An unreadable `config` key on a running 3-member cluster. It used to
//! fail every member's read of etcd, which they took for etcd being down:
//! the primary fenced itself. Now it is a reported problem (API, metrics,
//! `pgwarden list`, the log) while the cluster runs on the last config it
//! read, and an operator can replace the key through the API.

mod support;

use serde_json::Value;
use std::time::{Duration, Instant};
use support::cluster::SUPERUSER_PASSWORD;
use support::{eventually, http_json, Cluster, ClusterOptions};

const LONG: Duration = Duration::from_secs(120);
const USER: &str = "admin";
const PASSWORD: &str = "op-secret";
const GARBAGE: &str = "not json{";

fn options() -> ClusterOptions {
    let mut opts = ClusterOptions::new(3);
    for m in &mut opts.members {
        m.api_extra = format!("username = \"{USER}\"\npassword = \"{PASSWORD}\"\n");
    }
    opts
}

fn config_key(c: &Cluster) -> String {
    format!("/service/{}/config", c.scope)
}

/// `etcdctl put`, or the same request through the client library where
/// etcdctl is not installed.
async fn put(c: &Cluster, key: &str, value: &str) {
    let endpoints = c.etcd_endpoints().join(",");
    match support::etcdctl(&endpoints, &["put", key, value]) {
        Some(out) => assert!(
            out.status.success(),
            "etcdctl put {key}: {}",
            String::from_utf8_lossy(&out.stderr)
        ),
        None => c.etcd.put(key, value).await,
    }
}

async fn problems(c: &Cluster, i: usize) -> Option<Vec<String>> {
    let v = http_json(&c.members[i].api("/status")).await?;
    let list = v["dcs_problems"].as_array()?;
    Some(
        list.iter()
            .filter_map(|p| p.as_str().map(str::to_string))
            .collect(),
    )
}

/// One row through HAProxy's read-write port on a fresh connection.
async fn write_through_haproxy(c: &Cluster, id: i64) -> Result<(), String> {
    let client = support::sql(c.rw_port, SUPERUSER_PASSWORD)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    client
        .execute("INSERT INTO garbage_probe VALUES ($1)", &[&id])
        .await
        .map_err(|e| format!("insert: {e}"))?;
    Ok(())
}

fn list_table(c: &Cluster) -> String {
    let out = c.cli(0, &["list"]);
    assert!(
        out.status.success(),
        "pgwarden list failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// Lines of member i's agent log that report an undecodable `config`.
fn config_warnings(c: &Cluster, i: usize, key: &str) -> usize {
    let needle = format!("etcd key {key} cannot be decoded");
    c.agent_log(i)
        .lines()
        .filter(|l| l.contains("WARN") && l.contains(&needle))
        .count()
}

async fn http(
    method: reqwest::Method,
    url: &str,
    headers: &[(&str, String)],
    body: Option<String>,
) -> (u16, reqwest::header::HeaderMap, Value) {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("http client");
    let mut req = client.request(method, url).basic_auth(USER, Some(PASSWORD));
    for (k, v) in headers {
        req = req.header(*k, v.as_str());
    }
    if let Some(body) = body {
        req = req.body(body);
    }
    let resp = req.send().await.expect("API answered");
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let text = resp.text().await.unwrap_or_default();
    (
        status,
        headers,
        serde_json::from_str(&text).unwrap_or(Value::Null),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_in_config_is_reported_and_changes_nothing() {
    let mut c = Cluster::start(&options());
    let primary = c.ready_with_haproxy().await;
    let leader_name = c.members[primary].name.clone();
    let leader_key = format!("/service/{}/leader", c.scope);
    let key = config_key(&c);
    let original = c.dcs_get(&key).await.expect("config stored by bootstrap");
    let ttl = serde_json::from_str::<Value>(&original).expect("stored config is JSON")["ttl"]
        .as_u64()
        .expect("ttl in the stored config");
    eventually("the probe table created through HAProxy", LONG, || async {
        let client = support::sql(c.rw_port, SUPERUSER_PASSWORD).await.ok()?;
        client
            .batch_execute("CREATE TABLE IF NOT EXISTS garbage_probe (id bigint PRIMARY KEY)")
            .await
            .ok()
    })
    .await;
    for i in 0..c.members.len() {
        assert_eq!(problems(&c, i).await, Some(Vec::new()), "before the fault");
    }
    let monitor = c.monitor();

    put(&c, &key, GARBAGE).await;
    let fault = Instant::now();
    eventually(
        "every member reports the config key in dcs_problems",
        Duration::from_secs(20),
        || async {
            for i in 0..c.members.len() {
                let p = problems(&c, i).await?;
                if !p.iter().any(|p| p.contains(&key)) {
                    return None;
                }
            }
            Some(())
        },
    )
    .await;

    // The primary keeps its lease and takes writes for well over a TTL.
    let mut id = 0;
    while fault.elapsed() < Duration::from_secs(3 * ttl + 5) {
        id += 1;
        if let Err(e) = write_through_haproxy(&c, id).await {
            panic!(
                "write {id} through HAProxy {:?} after the garbage: {e}",
                fault.elapsed()
            );
        }
        assert_eq!(
            c.dcs_get(&leader_key).await.as_deref(),
            Some(leader_name.as_str()),
            "the leader changed {:?} after the garbage",
            fault.elapsed()
        );
        let table = list_table(&c);
        let warning = table
            .lines()
            .find(|l| l.starts_with(" Warning: ") && l.contains(&key));
        assert!(warning.is_some(), "no warning about {key} in:\n{table}");
        let p = problems(&c, primary).await.expect("leader's /status");
        assert!(
            p.iter()
                .any(|p| p.contains(&key) && p.contains("cannot be decoded")),
            "{p:?}"
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    assert!(id >= 10, "only {id} polls");

    // JSON output: the array as always on stdout, the warning on stderr.
    let out = c.cli(0, &["list", "--format", "json"]);
    assert!(out.status.success());
    let rows: Value = serde_json::from_slice(&out.stdout).expect("list --format json is JSON");
    assert_eq!(rows.as_array().map(Vec::len), Some(c.members.len()));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("warning: ") && stderr.contains(&key),
        "{stderr}"
    );

    // The metric counts it.
    let metrics = reqwest::get(c.members[primary].api("/metrics"))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("metrics body");
    let line = metrics
        .lines()
        .find(|l| l.starts_with("pgwarden_dcs_problems{"))
        .unwrap_or_else(|| panic!("no pgwarden_dcs_problems in:\n{metrics}"));
    assert!(line.ends_with(" 1"), "{line}");

    // Each agent logged it once, not every loop.
    for i in 0..c.members.len() {
        assert_eq!(
            config_warnings(&c, i, &key),
            1,
            "{} logged the problem {} times",
            c.members[i].name,
            config_warnings(&c, i, &key)
        );
    }

    // A merge patch has nothing to merge into; a whole config replaces the
    // garbage by compare-and-swap on the revision GET /config reports.
    let api = |path: &str| c.members[primary].api(path);
    let (code, _, body) = http(
        reqwest::Method::PATCH,
        &api("/config"),
        &[],
        Some(r#"{"pause": true}"#.into()),
    )
    .await;
    assert_eq!(code, 409, "{body}");
    assert_eq!(
        c.dcs_get(&key).await.as_deref(),
        Some(GARBAGE),
        "a refused PATCH wrote nothing"
    );
    let (code, headers, served) = http(reqwest::Method::GET, &api("/config"), &[], None).await;
    assert_eq!(code, 200);
    assert_eq!(served["ttl"], ttl, "the last config read is served");
    let etag = headers
        .get("etag")
        .and_then(|v| v.to_str().ok())
        .expect("ETag on GET /config")
        .to_string();
    let (code, _, body) = http(
        reqwest::Method::PUT,
        &api("/config"),
        &[("if-match", etag)],
        Some(original.clone()),
    )
    .await;
    assert_eq!(code, 200, "{body}");
    eventually(
        "no member reports a problem once the config is valid again",
        Duration::from_secs(20),
        || async {
            for i in 0..c.members.len() {
                if !problems(&c, i).await?.is_empty() {
                    return None;
                }
            }
            Some(())
        },
    )
    .await;
    assert!(!list_table(&c).contains("Warning"));

    // A newer agent's field during a rolling upgrade: reported the same way;
    // `edit-config` can remove it.
    let mut newer: Value = serde_json::from_str(&original).expect("JSON");
    newer["newer_setting"] = Value::Bool(true);
    put(&c, &key, &newer.to_string()).await;
    eventually(
        "the unknown field reported",
        Duration::from_secs(20),
        || async {
            let p = problems(&c, primary).await?;
            p.iter()
                .any(|p| p.contains(&key) && p.contains("newer_setting"))
                .then_some(())
        },
    )
    .await;
    id += 1;
    write_through_haproxy(&c, id)
        .await
        .expect("write with an unknown config field stored");
    let out = c.cli(0, &["edit-config", "--set", "newer_setting=null"]);
    assert!(
        out.status.success(),
        "edit-config: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    eventually(
        "no problem after edit-config removed the field",
        Duration::from_secs(20),
        || async { problems(&c, primary).await?.is_empty().then_some(()) },
    )
    .await;

    assert_eq!(
        c.dcs_get(&leader_key).await.as_deref(),
        Some(leader_name.as_str())
    );
    monitor.finish().await;
}
