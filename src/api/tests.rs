//! The API driven over real HTTP: a listener on 127.0.0.1:0, `serve`, reqwest.

use super::*;
use crate::config::{DynamicConfig, Tags};
use crate::dcs::{ClusterView, HistoryEntry, Initialize, MemberStatus, PgState, Role};
use reqwest::{Method, StatusCode};
use serde_json::Value;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::oneshot;

const MB: u64 = 1 << 20;

fn member(name: &str, role: Role, state: PgState, wal_lsn: Option<u64>) -> MemberStatus {
    MemberStatus {
        name: name.to_string(),
        role,
        state,
        host: "127.0.0.1".into(),
        port: 5432,
        api_url: format!("http://127.0.0.1:8008/{name}"),
        conn_url: "postgres://127.0.0.1:5432/postgres".into(),
        timeline: Some(2),
        wal_lsn,
        receive_lsn: wal_lsn,
        upstream: None,
        tags: Tags::default(),
        version: "0.1.0".into(),
        pending_restart: false,
        error: None,
    }
}

fn view(leader: Option<&str>) -> ClusterView {
    ClusterView {
        initialize: Initialize::SystemId("7312345678901234567".into()),
        leader: leader.map(str::to_string),
        members: vec![
            member("pg1", Role::Leader, PgState::Running, Some(1000 * MB)),
            member(
                "pg2",
                Role::Replica,
                PgState::Streaming,
                Some(1000 * MB - 100),
            ),
            member("pg3", Role::Replica, PgState::Stopped, None),
        ],
        config: DynamicConfig::default(),
        config_stored: true,
        status: None,
        history: vec![HistoryEntry {
            timeline: 1,
            lsn: 0x3000060,
            reason: "no recovery target specified".into(),
            time: "2024-01-01T00:00:00Z".into(),
            leader: "pg1".into(),
        }],
        failover: None,
        failsafe: None,
        sync: None,
        sync_unreadable: false,
        config_revision: 1,
        problems: vec![],
    }
}

fn ago(d: Duration) -> Instant {
    Instant::now()
        .checked_sub(d)
        .expect("monotonic clock older than test offset")
}

fn primary() -> ApiSnapshot {
    ApiSnapshot {
        member: member("pg1", Role::Leader, PgState::Running, Some(1000 * MB)),
        cluster: Some(view(Some("pg1"))),
        holds_leader_key: true,
        lease_valid_until: Some(Instant::now() + Duration::from_secs(30)),
        pg_running: true,
        in_recovery: false,
        streaming: false,
        lag_bytes: None,
        is_sync: false,
        last_loop: Instant::now(),
        ttl: Duration::from_secs(30),
        paused: false,
        postmaster_start: Some("120".into()),
        system_id: Some("7300000000000000001".into()),
        dcs_ok: true,
        data_dir_free_bytes: Some(10 * 1024 * MB),
        wal_dir_free_bytes: Some(10 * 1024 * MB),
        failover_candidate: false,
        resumes_on: None,
    }
}

fn replica() -> ApiSnapshot {
    ApiSnapshot {
        member: member(
            "pg2",
            Role::Replica,
            PgState::Streaming,
            Some(1000 * MB - 100),
        ),
        holds_leader_key: false,
        lease_valid_until: Some(Instant::now() + Duration::from_secs(30)),
        in_recovery: true,
        streaming: true,
        lag_bytes: Some(100),
        ..primary()
    }
}

fn sync_replica() -> ApiSnapshot {
    ApiSnapshot {
        is_sync: true,
        ..replica()
    }
}

fn noloadbalance_replica() -> ApiSnapshot {
    let mut s = replica();
    s.member.tags.noloadbalance = true;
    s
}

fn lagging_replica() -> ApiSnapshot {
    ApiSnapshot {
        lag_bytes: Some(100 * MB),
        ..replica()
    }
}

fn stopped() -> ApiSnapshot {
    ApiSnapshot {
        member: member("pg3", Role::Replica, PgState::Stopped, None),
        pg_running: false,
        in_recovery: false,
        streaming: false,
        lag_bytes: None,
        ..replica()
    }
}

fn expired_leader() -> ApiSnapshot {
    ApiSnapshot {
        lease_valid_until: Some(ago(Duration::from_secs(1))),
        ..primary()
    }
}

fn stale_loop_replica() -> ApiSnapshot {
    ApiSnapshot {
        last_loop: ago(Duration::from_secs(60)),
        ..replica()
    }
}

struct Server {
    base: String,
    client: reqwest::Client,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
    addr: std::net::SocketAddr,
}

impl Server {
    async fn start(snap: ApiSnapshot) -> Server {
        Server::start_with(snap, options(None)).await.0
    }

    /// A server with these options; the receiving end of its member
    /// commands comes back with it.
    async fn start_with(
        snap: ApiSnapshot,
        options: ApiOptions,
    ) -> (Server, tokio::sync::mpsc::Receiver<MemberCommand>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = oneshot::channel::<()>();
        let (commands, commands_rx) = tokio::sync::mpsc::channel(8);
        let task = tokio::spawn(serve(
            listener,
            SharedState::new(snap),
            options,
            commands,
            async move {
                let _ = rx.await;
            },
        ));
        (
            Server {
                base: format!("http://{addr}"),
                client: reqwest::Client::new(),
                stop: Some(tx),
                task,
                addr,
            },
            commands_rx,
        )
    }

    /// A request with a body and optional basic credentials.
    async fn send(
        &self,
        method: Method,
        path: &str,
        auth: Option<(&str, &str)>,
        body: &str,
    ) -> (StatusCode, Value, reqwest::header::HeaderMap) {
        let mut req = self
            .client
            .request(method, format!("{}{path}", self.base))
            .body(body.to_string());
        if let Some((u, p)) = auth {
            req = req.basic_auth(u, Some(p));
        }
        let resp = req.send().await.unwrap();
        let code = resp.status();
        let headers = resp.headers().clone();
        let text = resp.text().await.unwrap();
        let v = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}: {text}"));
        (code, v, headers)
    }

    async fn call(
        &self,
        method: Method,
        path: &str,
    ) -> (StatusCode, String, reqwest::header::HeaderMap) {
        let resp = self
            .client
            .request(method, format!("{}{path}", self.base))
            .send()
            .await
            .unwrap();
        let code = resp.status();
        let headers = resp.headers().clone();
        (code, resp.text().await.unwrap(), headers)
    }

    async fn json(&self, path: &str) -> (StatusCode, Value) {
        let (code, body, headers) = self.call(Method::GET, path).await;
        assert_eq!(
            headers.get("content-type").unwrap(),
            "application/json",
            "{path}"
        );
        (code, serde_json::from_str(&body).unwrap())
    }

    async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        tokio::time::timeout(Duration::from_secs(5), self.task)
            .await
            .expect("server did not shut down")
            .unwrap()
            .unwrap();
    }
}

const PATHS: [&str; 16] = [
    "/",
    "/primary",
    "/leader",
    "/read-write",
    "/replica",
    "/read-only",
    "/sync",
    "/async",
    "/health",
    "/liveness",
    "/readiness",
    "/status",
    "/cluster",
    "/history",
    "/config",
    "/metrics",
];

/// Expected codes in `PATHS` order; the last five (status, cluster, history,
/// config, metrics) are always 200 when the cluster view is known.
#[rustfmt::skip]
fn table() -> Vec<(&'static str, ApiSnapshot, [u16; 16])> {
    vec![
        //                                      /    pri  lead rw   repl ro   sync asyn hlth live rdy  stat clus hist conf metr
        ("primary",          primary(),         [200, 200, 200, 200, 503, 200, 503, 503, 200, 200, 200, 200, 200, 200, 200, 200]),
        ("replica",          replica(),         [503, 503, 503, 503, 200, 200, 503, 200, 200, 200, 200, 200, 200, 200, 200, 200]),
        ("sync replica",     sync_replica(),    [503, 503, 503, 503, 200, 200, 200, 503, 200, 200, 200, 200, 200, 200, 200, 200]),
        ("noloadbalance",    noloadbalance_replica(), [503, 503, 503, 503, 503, 503, 503, 503, 200, 200, 200, 200, 200, 200, 200, 200]),
        ("lagging replica",  lagging_replica(), [503, 503, 503, 503, 200, 200, 503, 200, 200, 200, 503, 200, 200, 200, 200, 200]),
        ("stopped",          stopped(),         [503, 503, 503, 503, 503, 503, 503, 503, 503, 200, 503, 200, 200, 200, 200, 200]),
        ("expired lease",    expired_leader(),  [503, 503, 503, 503, 503, 503, 503, 503, 200, 200, 503, 200, 200, 200, 200, 200]),
        ("stale loop",       stale_loop_replica(), [503, 503, 503, 503, 200, 200, 503, 200, 200, 503, 200, 200, 200, 200, 200, 200]),
    ]
}

#[tokio::test]
async fn every_path_and_method_answers_per_table() {
    for (scenario, snap, codes) in table() {
        let server = Server::start(snap).await;
        for (path, want) in PATHS.iter().zip(codes) {
            for method in [Method::GET, Method::HEAD, Method::OPTIONS] {
                let (code, body, headers) = server.call(method.clone(), path).await;
                assert_eq!(code.as_u16(), want, "{scenario}: {method} {path}");
                if method == Method::HEAD {
                    assert!(body.is_empty(), "{scenario}: HEAD {path} has a body");
                } else if *path == "/metrics" {
                    assert_eq!(
                        headers.get("content-type").unwrap(),
                        metrics::CONTENT_TYPE_TEXT
                    );
                } else {
                    let v: Value = serde_json::from_str(&body)
                        .unwrap_or_else(|e| panic!("{scenario}: {method} {path}: {e}: {body}"));
                    if health::ROUTES.iter().any(|(p, _)| p == path) || *path == "/status" {
                        assert_eq!(v["name"], server_name(scenario), "{scenario} {path}");
                        assert!(v["role"].is_string() && v["state"].is_string());
                    }
                }
            }
        }
        server.stop().await;
    }
}

fn server_name(scenario: &str) -> &'static str {
    match scenario {
        "primary" | "expired lease" => "pg1",
        "stopped" => "pg3",
        _ => "pg2",
    }
}

#[tokio::test]
async fn lag_query() {
    let lagging = Server::start(lagging_replica()).await;
    let table: &[(&str, u16)] = &[
        ("/replica?lag=16MB", 503),
        ("/replica?lag=100MB", 200),
        ("/replica?lag=104857600", 200),
        ("/replica?lag=104857599", 503),
        ("/replica?lag=1GB", 200),
        ("/replica?lag=200mb", 200),
        ("/replica?lag=1GB&lag=1MB", 503),
        ("/read-only?lag=16MB", 503),
        ("/read-only?lag=1GB", 200),
        ("/async?lag=16MB", 503),
        ("/async?lag=1GB", 200),
        ("/readiness", 503),
        ("/readiness?lag=1GB", 200),
        ("/health?lag=16MB", 200),
    ];
    for (path, want) in table {
        for method in [Method::GET, Method::HEAD, Method::OPTIONS] {
            let (code, _, _) = lagging.call(method.clone(), path).await;
            assert_eq!(code.as_u16(), *want, "lagging: {method} {path}");
        }
    }
    lagging.stop().await;

    let unknown = Server::start(ApiSnapshot {
        lag_bytes: None,
        ..replica()
    })
    .await;
    for (path, want) in [
        ("/replica", 200),
        ("/replica?lag=1GB", 503),
        ("/readiness", 503),
    ] {
        assert_eq!(
            unknown.call(Method::GET, path).await.0.as_u16(),
            want,
            "unknown lag: {path}"
        );
    }
    unknown.stop().await;

    // The primary is always fresh: a lag limit never takes it out of /read-only.
    let primary = Server::start(primary()).await;
    assert_eq!(
        primary.call(Method::GET, "/read-only?lag=1B").await.0,
        StatusCode::OK
    );
    primary.stop().await;
}

#[tokio::test]
async fn malformed_lag_is_400_with_reason() {
    let server = Server::start(replica()).await;
    for path in [
        "/replica?lag=abc",
        "/replica?lag=",
        "/replica?lag=-1",
        "/replica?lag=16XB",
        "/replica?lag=1.5MB",
        "/replica?lag=99999999999999GB",
        "/read-only?lag=fast",
        "/sync?lag=fast",
        "/async?lag=fast",
        "/readiness?lag=fast",
    ] {
        for method in [Method::GET, Method::OPTIONS] {
            let (code, body, _) = server.call(method.clone(), path).await;
            assert_eq!(code, StatusCode::BAD_REQUEST, "{method} {path}");
            let v: Value = serde_json::from_str(&body).unwrap();
            assert!(
                v["error"].as_str().unwrap().contains("lag"),
                "{path}: {body}"
            );
        }
        assert_eq!(
            server.call(Method::HEAD, path).await.0,
            StatusCode::BAD_REQUEST
        );
    }
    // Checks without parameters ignore the query.
    assert_eq!(
        server.call(Method::GET, "/health?lag=fast").await.0,
        StatusCode::OK
    );
    server.stop().await;

    let primary = Server::start(primary()).await;
    assert_eq!(
        primary.call(Method::GET, "/primary?lag=fast").await.0,
        StatusCode::OK
    );
    primary.stop().await;
}

#[tokio::test]
async fn tag_query() {
    let mut snap = replica();
    snap.member.tags.failover_priority = 3;
    snap.member.tags.custom.insert("dc".into(), "east".into());
    snap.member
        .tags
        .custom
        .insert("zone".into(), "eu west".into());
    let server = Server::start(snap).await;
    let table: &[(&str, u16)] = &[
        ("/replica?tag_dc=east", 200),
        ("/replica?tag_dc=west", 503),
        ("/replica?tag_rack=1", 503),
        ("/replica?tag_zone=eu%20west", 200),
        ("/replica?tag_zone=eu+west", 200),
        ("/replica?tag_nofailover=false", 200),
        ("/replica?tag_nofailover=true", 503),
        ("/replica?tag_noloadbalance=false", 200),
        ("/replica?tag_failover_priority=3", 200),
        ("/replica?tag_failover_priority=1", 503),
        ("/replica?tag_dc=east&tag_failover_priority=3&lag=1kB", 200),
        ("/replica?tag_dc=east&lag=1B", 503),
        ("/read-only?tag_dc=west", 503),
        ("/read-only?tag_dc=east", 200),
        ("/async?tag_dc=east", 200),
        ("/async?tag_dc=west", 503),
        ("/replica?unrelated=1", 200),
    ];
    for (path, want) in table {
        for method in [Method::GET, Method::HEAD, Method::OPTIONS] {
            let (code, _, _) = server.call(method.clone(), path).await;
            assert_eq!(code.as_u16(), *want, "{method} {path}");
        }
    }
    server.stop().await;
}

#[tokio::test]
async fn status_body() {
    let server = Server::start(lagging_replica()).await;
    let (code, v) = server.json("/status").await;
    assert_eq!(code, StatusCode::OK);
    assert_eq!(v["name"], "pg2");
    assert_eq!(v["role"], "replica");
    assert_eq!(v["state"], "streaming");
    assert_eq!(v["lag_bytes"], 100 * MB);
    assert_eq!(v["holds_leader_key"], false);
    assert_eq!(v["primary"], false);
    assert_eq!(v["paused"], false);
    assert_eq!(v["pg_running"], true);
    assert_eq!(v["in_recovery"], true);
    assert_eq!(v["streaming"], true);
    assert_eq!(v["is_sync"], false);
    assert!(v["loop_age_seconds"].as_f64().unwrap() >= 0.0);
    assert_eq!(v["tags"]["nofailover"], false);
    server.stop().await;

    let server = Server::start(expired_leader()).await;
    let (code, v) = server.json("/primary").await;
    assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(v["holds_leader_key"], true);
    assert_eq!(v["leader_lease_valid"], false);
    assert_eq!(v["primary"], false);
    assert_eq!(v["lag_bytes"], Value::Null);
    server.stop().await;
}

#[tokio::test]
async fn cluster_history_config() {
    let server = Server::start(replica()).await;
    let (code, v) = server.json("/cluster").await;
    assert_eq!(code, StatusCode::OK);
    assert_eq!(v["leader"], "pg1");
    assert_eq!(v["paused"], false);
    assert_eq!(v["initialize"], "7312345678901234567");
    assert_eq!(v["config"]["ttl"], 10);
    let members = v["members"].as_array().unwrap();
    let lags: Vec<(&str, &Value)> = members
        .iter()
        .map(|m| (m["name"].as_str().unwrap(), &m["lag_bytes"]))
        .collect();
    assert_eq!(
        lags,
        vec![
            ("pg1", &Value::from(0)),
            ("pg2", &Value::from(100)),
            ("pg3", &Value::Null)
        ]
    );
    assert_eq!(members[1]["state"], "streaming");

    let (code, v) = server.json("/history").await;
    assert_eq!(code, StatusCode::OK);
    assert_eq!(v[0]["timeline"], 1);
    assert_eq!(v[0]["leader"], "pg1");

    let (code, v) = server.json("/config").await;
    assert_eq!(code, StatusCode::OK);
    assert_eq!(v["maximum_lag_on_failover"], MB);
    server.stop().await;

    // No leader: nobody's lag is known.
    let mut leaderless = replica();
    if let Some(c) = leaderless.cluster.as_mut() {
        c.leader = None;
        c.history.clear();
        c.initialize = Initialize::Claimed;
    }
    let server = Server::start(leaderless).await;
    let (_, v) = server.json("/cluster").await;
    assert_eq!(v["leader"], Value::Null);
    assert_eq!(v["initialize"], "");
    assert!(v["members"]
        .as_array()
        .unwrap()
        .iter()
        .all(|m| m["lag_bytes"].is_null()));
    assert_eq!(server.json("/history").await.1, serde_json::json!([]));
    server.stop().await;
}

#[tokio::test]
async fn before_the_first_cluster_read() {
    let server = Server::start(ApiSnapshot {
        cluster: None,
        paused: true,
        ..lagging_replica()
    })
    .await;
    let (code, v) = server.json("/cluster").await;
    assert_eq!(code, StatusCode::OK);
    assert_eq!(v["members"], serde_json::json!([]));
    assert_eq!(v["leader"], Value::Null);
    assert_eq!(v["config"], Value::Null);
    assert_eq!(v["paused"], true);
    assert_eq!(
        server.json("/history").await,
        (StatusCode::OK, serde_json::json!([]))
    );
    let (code, v) = server.json("/config").await;
    assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);
    assert!(v["error"].is_string());
    // No configured limit yet: a streaming replica is ready whatever its lag.
    assert_eq!(
        server.call(Method::GET, "/readiness").await.0,
        StatusCode::OK
    );
    server.stop().await;
}

/// Every sample line is `name{labels} value` with a float value, and every
/// metric has HELP and TYPE lines before its samples.
fn parse_metrics(text: &str) -> Vec<(String, String, f64)> {
    let mut declared = std::collections::HashSet::new();
    let mut samples = Vec::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            declared.insert(rest.split(' ').next().unwrap().to_string());
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split(' ');
            let name = parts.next().unwrap();
            assert!(declared.contains(name), "TYPE before HELP: {line}");
            assert_eq!(parts.next(), Some("gauge"));
        } else {
            let (series, value) = line.rsplit_once(' ').unwrap();
            let (name, labels) = series.split_once('{').unwrap();
            assert!(labels.ends_with('}'), "{line}");
            assert!(declared.contains(name), "sample without HELP: {line}");
            assert!(name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'));
            samples.push((
                name.to_string(),
                labels.trim_end_matches('}').to_string(),
                value
                    .parse::<f64>()
                    .unwrap_or_else(|e| panic!("{line}: {e}")),
            ));
        }
    }
    samples
}

fn metric(samples: &[(String, String, f64)], name: &str) -> Option<f64> {
    samples
        .iter()
        .find(|(n, _, _)| n == name)
        .map(|(_, _, v)| *v)
}

#[tokio::test]
async fn metrics_parse() {
    let table: &[(&str, ApiSnapshot, f64, f64, f64)] = &[
        // scenario, snapshot, primary, replica, lease valid
        ("primary", primary(), 1.0, 0.0, 1.0),
        ("replica", replica(), 0.0, 1.0, 0.0),
        ("expired lease", expired_leader(), 0.0, 0.0, 0.0),
        ("stopped", stopped(), 0.0, 0.0, 0.0),
    ];
    for (scenario, snap, primary, replica, lease) in table {
        let name = snap.member.name.clone();
        let server = Server::start(snap.clone()).await;
        let (code, body, headers) = server.call(Method::GET, "/metrics").await;
        assert_eq!(code, StatusCode::OK);
        assert_eq!(
            headers.get("content-type").unwrap(),
            "text/plain; version=0.0.4"
        );
        let samples = parse_metrics(&body);
        assert!(samples
            .iter()
            .all(|(_, l, _)| l.starts_with(&format!("name=\"{name}\""))));
        assert_eq!(
            metric(&samples, "pgwarden_primary"),
            Some(*primary),
            "{scenario}"
        );
        assert_eq!(
            metric(&samples, "pgwarden_replica"),
            Some(*replica),
            "{scenario}"
        );
        assert_eq!(
            metric(&samples, "pgwarden_leader_lease_valid"),
            Some(*lease),
            "{scenario}"
        );
        for always in [
            "pgwarden_info",
            "pgwarden_postgres_running",
            "pgwarden_cluster_paused",
            "pgwarden_loop_age_seconds",
            "pgwarden_timeline",
        ] {
            assert!(metric(&samples, always).is_some(), "{scenario}: {always}");
        }
        let lag = metric(&samples, "pgwarden_replication_lag_bytes");
        assert_eq!(lag, snap.lag_bytes.map(|l| l as f64), "{scenario}");
        assert_eq!(
            metric(&samples, "pgwarden_wal_lsn_bytes"),
            snap.member.wal_lsn.map(|l| l as f64)
        );
        server.stop().await;
    }
}

#[tokio::test]
async fn free_space_is_a_gauge_and_unknown_is_no_sample() {
    let full = ApiSnapshot {
        member: member("pg3", Role::Replica, PgState::DiskFull, None),
        data_dir_free_bytes: Some(4096),
        wal_dir_free_bytes: None,
        ..stopped()
    };
    let server = Server::start(full).await;
    let (_, body, _) = server.call(Method::GET, "/metrics").await;
    let samples = parse_metrics(&body);
    assert_eq!(
        metric(&samples, "pgwarden_data_dir_free_bytes"),
        Some(4096.0)
    );
    // Unknown is not 0: the sample is left out, the metric stays declared.
    assert_eq!(metric(&samples, "pgwarden_wal_dir_free_bytes"), None);
    assert!(body.contains("# TYPE pgwarden_wal_dir_free_bytes gauge"));
    assert_eq!(metric(&samples, "pgwarden_failover_candidate"), Some(0.0));
    assert!(body.contains("state=\"disk full\""), "{body}");
    let (_, v) = server.json("/status").await;
    assert_eq!(v["state"], "disk full");
    assert_eq!(v["data_dir_free_bytes"], 4096);
    assert_eq!(v["wal_dir_free_bytes"], Value::Null);
    assert_eq!(v["failover_candidate"], false);
    server.stop().await;
}

#[tokio::test]
async fn unknown_paths_and_methods() {
    let server = Server::start(primary()).await;
    let (code, v) = server.json("/nope").await;
    assert_eq!(code, StatusCode::NOT_FOUND);
    assert!(v["error"].as_str().unwrap().contains("/nope"));
    assert_eq!(
        server.call(Method::GET, "/primary/").await.0,
        StatusCode::NOT_FOUND
    );

    let (code, body, headers) = server.call(Method::POST, "/primary").await;
    assert_eq!(code, StatusCode::METHOD_NOT_ALLOWED);
    assert!(serde_json::from_str::<Value>(&body).unwrap()["error"].is_string());
    assert!(headers
        .get("allow")
        .unwrap()
        .to_str()
        .unwrap()
        .contains("GET"));
    assert_eq!(
        server.call(Method::GET, "/switchover").await.0,
        StatusCode::METHOD_NOT_ALLOWED
    );
    server.stop().await;
}

#[tokio::test]
async fn mutations_are_refused() {
    let server = Server::start(primary()).await;
    for (method, path) in [
        (Method::POST, "/switchover"),
        (Method::DELETE, "/switchover"),
        (Method::POST, "/failover"),
        (Method::POST, "/restart"),
        (Method::DELETE, "/restart"),
        (Method::POST, "/reinitialize"),
        (Method::POST, "/reload"),
        (Method::PATCH, "/config"),
        (Method::PUT, "/config"),
    ] {
        let (code, body, _) = server.call(method.clone(), path).await;
        assert_eq!(code, StatusCode::FORBIDDEN, "{method} {path}");
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(
            v["error"],
            "mutating requests are disabled: no API credentials configured (set [api] username and password)"
        );
    }
    server.stop().await;
}

async fn raw(addr: std::net::SocketAddr, request: &str) -> String {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut out))
        .await
        .unwrap()
        .unwrap();
    String::from_utf8(out).unwrap()
}

/// What HAProxy actually sends: `option httpchk` alone is `OPTIONS /
/// HTTP/1.0`; with a path it is usually GET or HEAD.
#[tokio::test]
async fn haproxy_style_probes() {
    let server = Server::start(primary()).await;
    let resp = raw(server.addr, "OPTIONS / HTTP/1.0\r\n\r\n").await;
    assert!(resp.starts_with("HTTP/1.0 200"), "{resp}");
    assert!(resp.contains("\"name\":\"pg1\""), "{resp}");

    let resp = raw(
        server.addr,
        "HEAD /replica HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(resp.starts_with("HTTP/1.1 503"), "{resp}");
    let (_, body) = resp.split_once("\r\n\r\n").unwrap();
    assert!(body.is_empty(), "HEAD sent a body: {body:?}");

    let resp = raw(
        server.addr,
        "GET /primary HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    server.stop().await;
}

#[tokio::test]
async fn answers_follow_the_snapshot() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let state = SharedState::new(replica());
    let (tx, rx) = oneshot::channel::<()>();
    let (commands, _commands_rx) = tokio::sync::mpsc::channel(8);
    let task = tokio::spawn(serve(
        listener,
        state.clone(),
        options(None),
        commands,
        async move {
            let _ = rx.await;
        },
    ));
    let client = reqwest::Client::new();
    let get = |p: &str| client.get(format!("{base}{p}")).send();
    assert_eq!(
        get("/primary").await.unwrap().status(),
        StatusCode::SERVICE_UNAVAILABLE
    );
    state.set(primary());
    assert_eq!(get("/primary").await.unwrap().status(), StatusCode::OK);
    state.set(expired_leader());
    assert_eq!(
        get("/primary").await.unwrap().status(),
        StatusCode::SERVICE_UNAVAILABLE
    );
    let _ = tx.send(());
    task.await.unwrap().unwrap();
}

/// Options whose etcd nobody listens on: handlers that get past their
/// checks answer 503, so these tests see exactly what is refused before
/// etcd is asked.
fn options(credentials: Option<(&str, &str)>) -> ApiOptions {
    ApiOptions::new(
        "c",
        "/service/c/".into(),
        vec!["http://127.0.0.1:1".into()],
        credentials,
    )
}

const CREDS: (&str, &str) = ("admin", "pw:1");

const MUTATIONS: [(&str, &str); 9] = [
    ("POST", "/switchover"),
    ("DELETE", "/switchover"),
    ("POST", "/failover"),
    ("POST", "/restart"),
    ("DELETE", "/restart"),
    ("POST", "/reinitialize"),
    ("POST", "/reload"),
    ("PATCH", "/config"),
    ("PUT", "/config"),
];

fn method(m: &str) -> Method {
    Method::from_bytes(m.as_bytes()).unwrap()
}

#[tokio::test]
async fn mutations_need_the_right_credentials() {
    let (server, _rx) = Server::start_with(replica(), options(Some(CREDS))).await;
    for (m, path) in MUTATIONS {
        for (auth, reason) in [
            (
                None,
                "authentication required: send the [api] username and password as HTTP basic credentials",
            ),
            (Some(("admin", "pw:2")), "wrong username or password"),
            (Some(("root", "pw:1")), "wrong username or password"),
            (Some(("admin", "")), "wrong username or password"),
        ] {
            let (code, v, headers) = server.send(method(m), path, auth, "{}").await;
            assert_eq!(code, StatusCode::UNAUTHORIZED, "{m} {path} {auth:?}");
            assert_eq!(v["error"], reason, "{m} {path}");
            assert_eq!(
                headers.get("www-authenticate").unwrap(),
                "Basic realm=\"pgwarden\""
            );
        }
        // Wrong credentials are refused before the body is even looked at.
        let (code, _, _) = server
            .send(method(m), path, Some(("admin", "nope")), "{not json")
            .await;
        assert_eq!(code, StatusCode::UNAUTHORIZED, "{m} {path}");
    }
    // Read-only paths stay open.
    assert_eq!(server.call(Method::GET, "/status").await.0, StatusCode::OK);
    assert_eq!(server.call(Method::GET, "/config").await.0, StatusCode::OK);
    server.stop().await;
}

#[tokio::test]
async fn bad_bodies_are_400_or_413_with_a_reason() {
    let (server, _rx) = Server::start_with(primary(), options(Some(CREDS))).await;
    let big = format!("{{\"candidate\": \"{}\"}}", "x".repeat(BODY_LIMIT));
    #[rustfmt::skip]
    let table: &[(&str, &str, &str, u16, &str)] = &[
        ("POST", "/switchover", "{\"candidate\":", 400, "malformed JSON body: EOF while parsing a value at line 1 column 13"),
        ("POST", "/switchover", "{\"canidate\":\"pg2\"}", 400, "invalid request body: unknown field `canidate`, expected one of `leader`, `candidate`, `scheduled_at` at line 1 column 11"),
        ("POST", "/switchover", "{\"scheduled_at\":\"2001-01-01T00:00:00Z\"}", 400, "scheduled_at 2001-01-01T00:00:00Z is in the past"),
        ("POST", "/switchover", "{\"scheduled_at\":\"tomorrow\"}", 400, "scheduled_at \"tomorrow\" is not an RFC 3339 time such as 2030-01-02T03:04:05Z: expected digits for the year"),
        ("POST", "/switchover", &big, 413, "request body too large: the limit is 65536 bytes"),
        ("POST", "/failover", "{}", 400, "candidate is required"),
        ("POST", "/failover", "", 400, "candidate is required"),
        ("POST", "/failover", "\"pg2\"", 400, "invalid request body: invalid type: string \"pg2\", expected struct FailoverBody at line 1 column 5"),
        ("POST", "/failover", &big, 413, "request body too large: the limit is 65536 bytes"),
        ("PATCH", "/config", "{\"ttl\":", 400, "malformed JSON body: EOF while parsing a value at line 1 column 7"),
        ("PATCH", "/config", &big, 413, "request body too large: the limit is 65536 bytes"),
        ("PUT", "/config", "{\"ttl\": 5}", 400, "invalid config: key `ttl`: ttl (5) must be >= loop_wait + 2 * retry_timeout (1 + 2 * 4 = 9)"),
        ("PUT", "/config", "{\"tll\": 5}", 400, "invalid config: key `tll`: unknown field `tll`, expected one of `ttl`, `loop_wait`, `retry_timeout`, `maximum_lag_on_failover`, `use_slots`, `use_pg_rewind`, `member_slots_ttl`, `primary_start_timeout`, `synchronous_mode`, `synchronous_mode_strict`, `synchronous_node_count`, `failsafe_mode`, `pause`, `postgresql`"),
        ("POST", "/restart", "{\"schedule\": \"now\"}", 400, "invalid request body: unknown field `schedule`, there are no fields at line 1 column 11"),
        ("POST", "/reload", &big, 413, "request body too large: the limit is 65536 bytes"),
    ];
    for (m, path, body, want, reason) in table {
        let (code, v, _) = server.send(method(m), path, Some(CREDS), body).await;
        assert_eq!(code.as_u16(), *want, "{m} {path} {body:.40}: {v}");
        let got = v["error"].as_str().unwrap();
        if reason.contains("is in the past") {
            assert!(got.starts_with(reason), "{m} {path}: {got}");
        } else {
            assert_eq!(got, *reason, "{m} {path}");
        }
    }
    // A good body gets as far as etcd, which is down here.
    for (m, path, body) in [
        ("POST", "/switchover", "{\"candidate\":\"pg2\"}"),
        ("POST", "/failover", "{\"candidate\":\"pg2\"}"),
        ("PATCH", "/config", "{\"ttl\": 30}"),
        ("DELETE", "/switchover", ""),
    ] {
        let (code, v, _) = server.send(method(m), path, Some(CREDS), body).await;
        assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE, "{m} {path}");
        assert!(
            v["error"]
                .as_str()
                .unwrap()
                .starts_with("etcd unavailable, nothing changed: "),
            "{v}"
        );
    }
    server.stop().await;
}

/// A failsafe confirmation is on disk before the yes leaves: an agent
/// restarted within the primary's ttl must still keep it. When it cannot
/// be recorded, the answer is no, and the loop hears nothing.
#[tokio::test]
async fn a_failsafe_confirmation_is_recorded_before_it_is_given() {
    let dir = tempfile::tempdir().unwrap();
    let mut snap = replica();
    let cluster = snap.cluster.as_mut().unwrap();
    cluster.config.failsafe_mode = true;
    cluster.config.ttl = 10;
    snap.dcs_ok = false;
    let path = crate::failsafe_promise::path_for(&dir.path().join("data"));
    let mut opts = options(None);
    opts.failsafe_promise = Some(path.clone());
    let (server, mut rx) = Server::start_with(snap.clone(), opts).await;
    let body = "{\"leader\":\"pg1\",\"ttl\":23}";
    let (code, v, _) = server.send(Method::POST, "/failsafe", None, body).await;
    assert_eq!(code, StatusCode::OK, "{v}");
    let promise = crate::failsafe_promise::load(&path).unwrap().unwrap();
    assert_eq!((promise.leader.as_str(), promise.ttl), ("pg1", 23));
    assert!(promise.remaining(std::time::SystemTime::now()) > Duration::from_secs(20));
    assert_eq!(
        rx.try_recv().unwrap(),
        MemberCommand::Failsafe {
            leader: "pg1".into(),
            ttl: 23
        }
    );
    server.stop().await;

    let mut opts = options(None);
    opts.failsafe_promise = Some(dir.path().join("missing").join("promise"));
    let (server, mut rx) = Server::start_with(snap, opts).await;
    let (code, v, _) = server.send(Method::POST, "/failsafe", None, body).await;
    assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE, "{v}");
    let e = v["error"].as_str().unwrap();
    assert!(
        e.starts_with("not confirming pg1: cannot record the failsafe promise in "),
        "{e}"
    );
    assert!(
        rx.try_recv().is_err(),
        "the loop heard of a refused confirmation"
    );
    server.stop().await;
}

#[tokio::test]
async fn member_commands_reach_the_agent() {
    let (server, mut rx) = Server::start_with(replica(), options(Some(CREDS))).await;
    for (path, command, text) in [
        ("/restart", MemberCommand::Restart, "restart requested"),
        ("/reload", MemberCommand::Reload, "reload requested"),
        (
            "/reinitialize",
            MemberCommand::Reinit,
            "reinitialize requested",
        ),
    ] {
        let (code, v, _) = server.send(Method::POST, path, Some(CREDS), "").await;
        assert_eq!(code, StatusCode::ACCEPTED, "{path}");
        assert_eq!(v["message"], text);
        assert_eq!(rx.try_recv().unwrap(), command);
    }
    // Nobody drains the queue: the ninth request finds it full.
    for _ in 0..8 {
        let (code, _, _) = server
            .send(Method::POST, "/reload", Some(CREDS), "{}")
            .await;
        assert_eq!(code, StatusCode::ACCEPTED);
    }
    let (code, v, _) = server.send(Method::POST, "/restart", Some(CREDS), "").await;
    assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);
    assert!(v["error"].as_str().unwrap().starts_with("busy"), "{v}");
    server.stop().await;

    let (server, mut rx) = Server::start_with(primary(), options(Some(CREDS))).await;
    let (code, v, _) = server
        .send(Method::POST, "/reinitialize", Some(CREDS), "")
        .await;
    assert_eq!(code, StatusCode::CONFLICT);
    assert_eq!(
        v["error"],
        "refusing to reinitialize the leader: switch over first"
    );
    assert!(rx.try_recv().is_err(), "nothing sent to the agent");
    server.stop().await;
}

#[tokio::test]
async fn cluster_view_shows_pause_and_pending_request() {
    let mut snap = replica();
    let view = snap.cluster.as_mut().unwrap();
    view.config.pause = true;
    view.config_revision = 42;
    view.failover = Some(crate::dcs::FailoverRequest {
        kind: crate::dcs::FailoverKind::Switchover,
        leader: Some("pg1".into()),
        candidate: Some("pg2".into()),
        scheduled_at: Some("2030-01-01T00:00:00Z".into()),
        scheduled_unix: Some(1_893_456_000),
        requested_at: "2029-12-31T00:00:00Z".into(),
        requested_unix: 1_893_369_600,
        force: false,
    });
    let server = Server::start(snap).await;
    let (_, v) = server.json("/cluster").await;
    assert_eq!(v["paused"], true);
    assert_eq!(v["failover"]["kind"], "switchover");
    assert_eq!(v["failover"]["candidate"], "pg2");
    assert_eq!(v["failover"]["scheduled_at"], "2030-01-01T00:00:00Z");
    let (_, v) = server.json("/status").await;
    assert_eq!(v["paused"], true);
    let (_, body, _) = server.call(Method::GET, "/metrics").await;
    assert_eq!(
        metric(&parse_metrics(&body), "pgwarden_cluster_paused"),
        Some(1.0)
    );
    let (_, _, headers) = server.call(Method::GET, "/config").await;
    assert_eq!(headers.get("etag").unwrap(), "\"42\"");
    server.stop().await;

    let server = Server::start(replica()).await;
    let (_, v) = server.json("/cluster").await;
    assert_eq!(v["paused"], false);
    assert!(v["failover"].is_null());
    server.stop().await;
}

#[tokio::test]
async fn dcs_problems_are_reported() {
    const PROBLEM: &str = "etcd key /service/c/config cannot be decoded (expected ident at line 1 column 2); using the last config read from it";
    let mut snap = primary();
    snap.cluster.as_mut().unwrap().problems = vec![PROBLEM.into()];
    let server = Server::start(snap).await;
    let (_, v) = server.json("/status").await;
    assert_eq!(v["dcs_problems"], serde_json::json!([PROBLEM]));
    let (_, v) = server.json("/cluster").await;
    assert_eq!(v["dcs_problems"], serde_json::json!([PROBLEM]));
    let (_, body, _) = server.call(Method::GET, "/metrics").await;
    assert_eq!(
        metric(&parse_metrics(&body), "pgwarden_dcs_problems"),
        Some(1.0)
    );
    // A bad key changes no health answer: the primary stays primary.
    assert_eq!(server.call(Method::GET, "/primary").await.0, StatusCode::OK);
    server.stop().await;

    let server = Server::start(primary()).await;
    let (_, v) = server.json("/status").await;
    assert_eq!(v["dcs_problems"], serde_json::json!([]));
    let (_, v) = server.json("/cluster").await;
    assert_eq!(v["dcs_problems"], serde_json::json!([]));
    let (_, body, _) = server.call(Method::GET, "/metrics").await;
    assert_eq!(
        metric(&parse_metrics(&body), "pgwarden_dcs_problems"),
        Some(0.0)
    );
    server.stop().await;
}

/// A self-signed certificate for 127.0.0.1 and localhost, written as PEM.
fn self_signed(dir: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let cert =
        rcgen::generate_simple_self_signed(vec!["127.0.0.1".into(), "localhost".into()]).unwrap();
    let (c, k) = (dir.join("api.crt"), dir.join("api.key"));
    std::fs::write(&c, cert.cert.pem()).unwrap();
    std::fs::write(&k, cert.signing_key.serialize_pem()).unwrap();
    (c, k)
}

#[tokio::test]
async fn https_with_the_configured_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = self_signed(dir.path());
    let cfg_path = dir.path().join("pgwarden.toml");
    let mut opts = options(Some(CREDS));
    opts.tls = Some(tls::server_config(&cfg_path, &cert, &key).unwrap());

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let (commands, mut commands_rx) = tokio::sync::mpsc::channel(8);
    let task = tokio::spawn(serve(
        listener,
        SharedState::new(replica()),
        opts,
        commands,
        async move {
            let _ = stopped.await;
        },
    ));
    let root = reqwest::Certificate::from_pem(&std::fs::read(&cert).unwrap()).unwrap();
    let client = reqwest::Client::builder()
        .add_root_certificate(root)
        .build()
        .unwrap();
    let base = format!("https://127.0.0.1:{}", addr.port());
    let resp = client.get(format!("{base}/replica")).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let resp = client
        .post(format!("{base}/reload"))
        .basic_auth(CREDS.0, Some(CREDS.1))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::ACCEPTED);
    assert_eq!(commands_rx.try_recv().unwrap(), MemberCommand::Reload);
    // Plain HTTP gets no answer from a TLS listener.
    let plain = reqwest::Client::new()
        .get(format!("http://127.0.0.1:{}/replica", addr.port()))
        .timeout(Duration::from_secs(3))
        .send()
        .await;
    assert!(plain.is_err() || !plain.unwrap().status().is_success());
    // A client that does not trust the certificate is refused.
    assert!(reqwest::Client::new()
        .get(format!("{base}/replica"))
        .send()
        .await
        .is_err());
    let _ = stop.send(());
    tokio::time::timeout(Duration::from_secs(15), task)
        .await
        .expect("TLS server did not shut down")
        .unwrap()
        .unwrap();
}

#[test]
fn tls_file_problems_name_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = self_signed(dir.path());
    let (other_cert, other_key) = {
        let sub = dir.path().join("other");
        std::fs::create_dir(&sub).unwrap();
        self_signed(&sub)
    };
    let garbage = dir.path().join("garbage.pem");
    std::fs::write(&garbage, "not a pem file\n").unwrap();
    let missing = dir.path().join("missing.pem");
    let cfg = std::path::Path::new("/etc/pgwarden.toml");
    let cases: &[(&std::path::Path, &std::path::Path, &str, &str)] = &[
        (&missing, &key, "api.certfile", "cannot read"),
        (&garbage, &key, "api.certfile", "holds no PEM certificate"),
        (&cert, &missing, "api.keyfile", "cannot read"),
        (
            &cert,
            &garbage,
            "api.keyfile",
            "holds no usable PEM private key",
        ),
        (
            &cert,
            &other_key,
            "api.keyfile",
            "does not go with the certificate",
        ),
        (&key, &key, "api.certfile", "holds no PEM certificate"),
    ];
    for (c, k, want_key, want) in cases {
        let err = tls::server_config(cfg, c, k).unwrap_err();
        assert_eq!(err.key_name(), Some(*want_key), "{err}");
        assert!(err.to_string().contains(want), "{err}");
    }
    assert!(tls::server_config(cfg, &other_cert, &other_key).is_ok());
}

// --- connection limits and timeouts (server.rs) ---

/// Reads until the server closes the connection (EOF or reset) or
/// `within` passes: what was read and when it ended (None: still open).
async fn read_until_closed(
    stream: &mut tokio::net::TcpStream,
    within: Duration,
) -> (Vec<u8>, Option<Duration>) {
    let start = Instant::now();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let left = within.saturating_sub(start.elapsed());
        match tokio::time::timeout(left, stream.read(&mut buf)).await {
            Err(_) => return (out, None),
            Ok(Ok(0)) | Ok(Err(_)) => return (out, Some(start.elapsed())),
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
        }
    }
}

async fn limited_server(snap: ApiSnapshot, max_connections: usize) -> Server {
    let mut opts = options(None);
    opts.max_connections = max_connections;
    Server::start_with(snap, opts).await.0
}

/// One HAProxy-style check on a fresh connection; its status line and how
/// long it took.
async fn probe(addr: std::net::SocketAddr, path: &str) -> (String, Duration) {
    let start = Instant::now();
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let (out, _) = read_until_closed(&mut s, Duration::from_secs(5)).await;
    let text = String::from_utf8_lossy(&out);
    (
        text.lines().next().unwrap_or("").to_string(),
        start.elapsed(),
    )
}

#[tokio::test]
async fn an_idle_flood_neither_piles_up_nor_locks_checks_out() {
    let server = limited_server(primary(), 8).await;
    let mut flood = Vec::new();
    for _ in 0..200 {
        flood.push(tokio::net::TcpStream::connect(server.addr).await.unwrap());
    }
    // Every check still answers at once: idle connections make room.
    for _ in 0..20 {
        let (status, took) = probe(server.addr, "/primary").await;
        assert_eq!(status, "HTTP/1.0 200 OK");
        assert!(took < Duration::from_secs(1), "check took {took:?}");
    }
    // All but at most 8 of the flood were closed by the server, and not
    // after a wait: at once (refused or made room for a later one).
    let mut closed = 0;
    for s in &mut flood {
        let (bytes, ended) = read_until_closed(s, Duration::from_millis(50)).await;
        assert!(bytes.is_empty(), "an idle connection got an answer");
        closed += usize::from(ended.is_some());
    }
    assert!(closed >= 200 - 8, "only {closed} of 200 closed");
    server.stop().await;
}

#[tokio::test]
async fn silent_and_slow_header_clients_are_dropped() {
    let server = limited_server(primary(), 8).await;
    let mut silent = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let mut slow = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let addr = server.addr;
    let trickle = tokio::spawn(async move {
        // One header byte a second, like a slowloris client.
        let mut ended = None;
        let start = Instant::now();
        for b in b"GET /primary HTTP/1.1\r\nHost: x\r\nX-Slow: yes\r\n\r\n" {
            if slow.write_all(&[*b]).await.is_err() {
                break;
            }
            let mut buf = [0u8; 64];
            match tokio::time::timeout(Duration::from_secs(1), slow.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => {
                    ended = Some(start.elapsed());
                    break;
                }
                Ok(Ok(_)) => panic!("a slow header was answered"),
                Err(_) => {}
            }
        }
        ended
    });
    let (bytes, ended) = read_until_closed(&mut silent, HEADER_TIMEOUT * 2).await;
    let ended = ended.expect("a silent connection stays open");
    assert!(
        !bytes.starts_with(b"HTTP/1.1 200"),
        "a silent client got an answer"
    );
    assert!(
        ended >= HEADER_TIMEOUT - Duration::from_millis(500) && ended < HEADER_TIMEOUT * 2,
        "silent connection closed after {ended:?}"
    );
    let slow_ended = trickle
        .await
        .unwrap()
        .expect("the slow header was never cut");
    assert!(
        slow_ended < HEADER_TIMEOUT + Duration::from_secs(2),
        "slow header cut after {slow_ended:?}"
    );
    // Meanwhile checks were unaffected.
    assert_eq!(probe(addr, "/primary").await.0, "HTTP/1.0 200 OK");
    server.stop().await;
}

#[tokio::test]
async fn an_idle_keep_alive_connection_is_closed() {
    let server = limited_server(primary(), 8).await;
    let mut s = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    s.write_all(b"GET /primary HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 4096];
    let n = s.read(&mut buf).await.unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
    let (_, ended) = read_until_closed(&mut s, HEADER_TIMEOUT * 2).await;
    let ended = ended.expect("an idle keep-alive connection stays open");
    assert!(ended < HEADER_TIMEOUT + Duration::from_secs(2), "{ended:?}");
    server.stop().await;
}

#[tokio::test]
async fn a_trickled_body_gets_408_after_the_body_timeout() {
    let (server, _rx) = Server::start_with(primary(), options(Some(CREDS))).await;
    let mut s = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    use base64::Engine;
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("{}:{}", CREDS.0, CREDS.1));
    let head = format!(
        "POST /switchover HTTP/1.1\r\nHost: x\r\nAuthorization: Basic {auth}\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{{"
    );
    s.write_all(head.as_bytes()).await.unwrap();
    let start = Instant::now();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    // A byte every second: each arrives well within any per-read timeout.
    while start.elapsed() < BODY_TIMEOUT * 2 {
        match tokio::time::timeout(Duration::from_secs(1), s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => {
                out.extend_from_slice(&buf[..n]);
                break;
            }
            Err(_) => {
                let _ = s.write_all(b" ").await;
            }
        }
    }
    let took = start.elapsed();
    let text = String::from_utf8_lossy(&out);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(
        took >= BODY_TIMEOUT - Duration::from_millis(500)
            && took < BODY_TIMEOUT + Duration::from_secs(3),
        "{took:?}"
    );
    server.stop().await;
}

#[tokio::test]
async fn the_tls_listener_has_the_same_limits() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = self_signed(dir.path());
    let mut opts = options(None);
    opts.tls = Some(tls::server_config(&dir.path().join("p.toml"), &cert, &key).unwrap());
    opts.max_connections = 4;
    let (server, _rx) = Server::start_with(replica(), opts).await;
    // Connections that never start their handshake.
    let mut flood = Vec::new();
    for _ in 0..50 {
        flood.push(tokio::net::TcpStream::connect(server.addr).await.unwrap());
    }
    let root = reqwest::Certificate::from_pem(&std::fs::read(&cert).unwrap()).unwrap();
    let client = reqwest::Client::builder()
        .add_root_certificate(root)
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(1))
        .build()
        .unwrap();
    for _ in 0..10 {
        let resp = client
            .get(format!("https://127.0.0.1:{}/replica", server.addr.port()))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
    }
    let mut closed = 0;
    for s in &mut flood {
        closed += usize::from(
            read_until_closed(s, Duration::from_millis(50))
                .await
                .1
                .is_some(),
        );
    }
    assert!(closed >= 50 - 4, "only {closed} of 50 closed");
    // A lone silent client is cut after the handshake timeout.
    let mut silent = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let (_, ended) = read_until_closed(&mut silent, TLS_HANDSHAKE_TIMEOUT * 2).await;
    let ended = ended.expect("a silent TLS client stays connected");
    assert!(
        ended < TLS_HANDSHAKE_TIMEOUT + Duration::from_secs(2),
        "{ended:?}"
    );
    server.stop().await;
}
