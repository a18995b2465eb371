//! The operator's side on real processes: the authenticated API requests
//! (switchover, failover, config edits, member commands) and the CLI verbs.
//! Every refused request is checked to have left etcd's `failover` and
//! `config` keys exactly as they were.

mod support;

use serde_json::{json, Value};
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use support::{eventually, http_json, http_status, pgwarden_bin, Cluster, ClusterOptions};

const LONG: Duration = Duration::from_secs(120);
const USER: &str = "admin";
const PASSWORD: &str = "op-secret";

const AUTH_REQUIRED: &str =
    "authentication required: send the [api] username and password as HTTP basic credentials";
const WRONG: &str = "wrong username or password";
const NO_CREDENTIALS: &str =
    "mutating requests are disabled: no API credentials configured (set [api] username and password)";

fn api_credentials() -> String {
    format!("username = \"{USER}\"\npassword = \"{PASSWORD}\"\n")
}

/// node1 and node2 with API credentials; node3 tagged nofailover and
/// without credentials (its API refuses every mutation with 403). node1
/// starts alone, so it is the one that bootstraps and leads.
fn options() -> ClusterOptions {
    let mut opts = ClusterOptions::new(3);
    opts.members[0].api_extra = api_credentials();
    opts.members[1].api_extra = api_credentials();
    opts.members[2].extra = "\n[tags]\nnofailover = true\n".into();
    opts.autostart = 1;
    opts
}

/// Starts `opts`' members one after the other and waits until node1 is
/// primary and every other member streams.
async fn start(opts: &ClusterOptions) -> Cluster {
    let mut c = Cluster::start(opts);
    let first = c.wait_single_primary(LONG).await;
    assert_eq!(c.members[first].name, "node1");
    for i in 1..c.members.len() {
        c.start_agent(i);
    }
    for i in 1..c.members.len() {
        let url = c.members[i].api("/replica");
        eventually(&format!("{} streaming", c.members[i].name), LONG, || {
            let url = url.clone();
            async move { (http_status("GET", &url).await == 200).then_some(()) }
        })
        .await;
    }
    // Every member's key in etcd says streaming, as the API's checks read
    // it (the member key trails /replica by up to a loop).
    eventually("every replica published as streaming", LONG, || async {
        let v = http_json(&c.members[0].api("/cluster")).await?;
        let members = v["members"].as_array()?;
        (members.len() == c.members.len()
            && members
                .iter()
                .filter(|m| m["name"] != "node1")
                .all(|m| m["state"] == "streaming"))
        .then_some(())
    })
    .await;
    c
}

fn key(c: &Cluster, name: &str) -> String {
    format!("/service/{}/{name}", c.scope)
}

/// `failover` and `config` as stored in etcd.
async fn operator_keys(c: &Cluster) -> (Option<String>, Option<String>) {
    (
        c.dcs_get(&key(c, "failover")).await,
        c.dcs_get(&key(c, "config")).await,
    )
}

/// etcd's mod_revision of a key (0: absent).
async fn revision(c: &Cluster, name: &str) -> i64 {
    let mut client = etcd_client::Client::connect(c.etcd_endpoints(), None)
        .await
        .expect("etcd");
    let resp = client.get(key(c, name), None).await.expect("etcd get");
    resp.kvs().first().map_or(0, |kv| kv.mod_revision())
}

struct Call {
    status: u16,
    body: Value,
}

async fn call(
    url: &str,
    method: &str,
    auth: Option<(&str, &str)>,
    headers: &[(&str, &str)],
    body: &str,
) -> Call {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("client");
    let mut req = client
        .request(
            reqwest::Method::from_bytes(method.as_bytes()).expect("method"),
            url,
        )
        .body(body.to_string());
    if let Some((u, p)) = auth {
        req = req.basic_auth(u, Some(p));
    }
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = req.send().await.expect("API answered");
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap_or_default();
    Call {
        status,
        body: serde_json::from_str(&text).unwrap_or(Value::Null),
    }
}

/// `pgwarden -c <member i's config> args...` with `input` on stdin.
fn cli_with_input(c: &Cluster, i: usize, args: &[&str], input: &str) -> std::process::Output {
    let mut child = Command::new(pgwarden_bin())
        .arg("-c")
        .arg(&c.members[i].config)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run pgwarden");
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(input.as_bytes());
    }
    child.wait_with_output().expect("pgwarden output")
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).to_string()
}

fn stdout(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// `pid` is a live process (not gone, not a zombie).
fn running_process(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            let (_, rest) = stat.rsplit_once(')')?;
            rest.split_whitespace().next().map(|s| s != "Z" && s != "X")
        })
        .unwrap_or(false)
}

/// A time an hour from now, RFC 3339.
fn in_an_hour() -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now() + Duration::from_secs(3600))
        .to_string()
}

type ApiRow<'a> = (
    usize,
    &'a str,
    &'a str,
    Option<(&'a str, &'a str)>,
    &'a str,
    u16,
    &'a str,
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_requests_change_nothing() {
    let c = start(&options()).await;
    let (leader, replica, nofail) = (0usize, 1usize, 2usize);
    let base = operator_keys(&c).await;
    assert!(base.0.is_none(), "no request pending at the start");
    assert!(base.1.is_some(), "config stored at bootstrap");
    let big = format!("{{\"candidate\": \"{}\"}}", "x".repeat(70_000));
    let ok = Some((USER, PASSWORD));
    let past = "{\"candidate\":\"node2\",\"scheduled_at\":\"2001-01-01T00:00:00Z\"}";

    // (member, method, path, credentials, body, status, error)
    #[rustfmt::skip]
    let table: Vec<ApiRow> = vec![
        // Credentials, for every mutating endpoint.
        (leader, "POST", "/switchover", Some((USER, "nope")), "{}", 401, WRONG),
        (leader, "POST", "/switchover", None, "{}", 401, AUTH_REQUIRED),
        (nofail, "POST", "/switchover", ok, "{}", 403, NO_CREDENTIALS),
        (leader, "DELETE", "/switchover", Some(("root", PASSWORD)), "", 401, WRONG),
        (leader, "DELETE", "/switchover", None, "", 401, AUTH_REQUIRED),
        (nofail, "DELETE", "/switchover", ok, "", 403, NO_CREDENTIALS),
        (replica, "POST", "/failover", Some((USER, "nope")), "{\"candidate\":\"node2\"}", 401, WRONG),
        (replica, "POST", "/failover", None, "{\"candidate\":\"node2\"}", 401, AUTH_REQUIRED),
        (nofail, "POST", "/failover", ok, "{\"candidate\":\"node2\"}", 403, NO_CREDENTIALS),
        (leader, "PATCH", "/config", Some((USER, "nope")), "{\"ttl\":30}", 401, WRONG),
        (leader, "PATCH", "/config", None, "{\"ttl\":30}", 401, AUTH_REQUIRED),
        (nofail, "PATCH", "/config", ok, "{\"ttl\":30}", 403, NO_CREDENTIALS),
        (replica, "POST", "/restart", Some((USER, "nope")), "", 401, WRONG),
        (replica, "POST", "/restart", None, "", 401, AUTH_REQUIRED),
        (nofail, "POST", "/restart", ok, "", 403, NO_CREDENTIALS),
        (replica, "POST", "/reinitialize", Some((USER, "nope")), "", 401, WRONG),
        (replica, "POST", "/reinitialize", None, "", 401, AUTH_REQUIRED),
        (nofail, "POST", "/reinitialize", ok, "", 403, NO_CREDENTIALS),
        (replica, "POST", "/reload", Some((USER, "nope")), "", 401, WRONG),
        (replica, "POST", "/reload", None, "", 401, AUTH_REQUIRED),
        (nofail, "POST", "/reload", ok, "", 403, NO_CREDENTIALS),
        // Bodies.
        (leader, "POST", "/switchover", ok, "{\"candidate\":", 400, "malformed JSON body: EOF while parsing a value at line 1 column 13"),
        (leader, "POST", "/switchover", ok, "{\"canidate\":\"node2\"}", 400, "invalid request body: unknown field `canidate`, expected one of `leader`, `candidate`, `scheduled_at` at line 1 column 11"),
        (leader, "POST", "/switchover", ok, &big, 413, "request body too large: the limit is 65536 bytes"),
        (leader, "POST", "/switchover", ok, "{\"scheduled_at\":\"next week\"}", 400, "scheduled_at \"next week\" is not an RFC 3339 time such as 2030-01-02T03:04:05Z: expected digits for the year"),
        (leader, "POST", "/failover", ok, "{\"candidate\":", 400, "malformed JSON body: EOF while parsing a value at line 1 column 13"),
        (leader, "POST", "/failover", ok, "{}", 400, "candidate is required"),
        (leader, "POST", "/failover", ok, &big, 413, "request body too large: the limit is 65536 bytes"),
        (leader, "PATCH", "/config", ok, "{\"ttl\":", 400, "malformed JSON body: EOF while parsing a value at line 1 column 7"),
        (leader, "PATCH", "/config", ok, &big, 413, "request body too large: the limit is 65536 bytes"),
        (replica, "POST", "/restart", ok, "{\"at\":\"now\"}", 400, "invalid request body: unknown field `at`, there are no fields at line 1 column 5"),
        (replica, "POST", "/reload", ok, &big, 413, "request body too large: the limit is 65536 bytes"),
        // The cluster.
        (leader, "POST", "/switchover", ok, "{\"candidate\":\"node9\"}", 412, "candidate node9 is not a member of cluster it"),
        (leader, "POST", "/switchover", ok, "{\"candidate\":\"node3\"}", 412, "candidate node3 is tagged nofailover"),
        (leader, "POST", "/switchover", ok, "{\"candidate\":\"node1\"}", 412, "candidate node1 is already the leader"),
        (leader, "POST", "/switchover", ok, "{\"leader\":\"node2\"}", 412, "node2 is not the leader (the leader is node1)"),
        (replica, "POST", "/failover", ok, "{\"candidate\":\"node9\"}", 412, "candidate node9 is not a member of cluster it"),
        (replica, "POST", "/failover", ok, "{\"candidate\":\"node3\"}", 412, "candidate node3 is tagged nofailover"),
        (leader, "POST", "/reinitialize", ok, "", 409, "refusing to reinitialize the leader: switch over first"),
        (leader, "DELETE", "/switchover", ok, "", 404, "no switchover or failover is pending"),
        // The config.
        (leader, "PATCH", "/config", ok, "{\"ttl\": 5}", 400, "invalid config: key `ttl`: ttl (5) must be >= loop_wait + 2 * retry_timeout (1 + 2 * 4 = 9)"),
        (replica, "PATCH", "/config", ok, "{\"retry_timeout\": 10}", 400, "invalid config: key `ttl`: ttl (10) must be >= loop_wait + 2 * retry_timeout (1 + 2 * 10 = 21)"),
        (leader, "PATCH", "/config", ok, "{\"tll\": 30}", 400, "invalid config: key `tll`: unknown field `tll`, expected one of `ttl`, `loop_wait`, `retry_timeout`, `maximum_lag_on_failover`, `use_slots`, `use_pg_rewind`, `member_slots_ttl`, `primary_start_timeout`, `synchronous_mode`, `synchronous_mode_strict`, `synchronous_node_count`, `failsafe_mode`, `pause`, `postgresql`"),
        (leader, "PATCH", "/config", ok, "{\"postgresql\": {\"parameters\": {\"port\": 5433}}}", 400, "invalid config: key `postgresql.parameters.port`: is managed by pgwarden and cannot be set here"),
        (leader, "PATCH", "/config", ok, "{\"loop_wait\": \"fast\"}", 400, "invalid config: key `loop_wait`: invalid type: string \"fast\", expected u64"),
        (leader, "PATCH", "/config", ok, "[\"ttl\"]", 400, "the config patch must be a JSON object (RFC 7386 merge patch)"),
        (leader, "PUT", "/config", ok, "{\"ttl\": 5}", 400, "invalid config: key `ttl`: ttl (5) must be >= loop_wait + 2 * retry_timeout (1 + 2 * 4 = 9)"),
    ];
    for (i, method, path, auth, body, want, reason) in &table {
        let url = c.members[*i].api(path);
        let got = call(&url, method, *auth, &[], body).await;
        let row = format!("{method} {path} on {} with {body:.60}", c.members[*i].name);
        assert_eq!(got.status, *want, "{row}: {}", got.body);
        assert_eq!(got.body["error"], *reason, "{row}");
        assert_eq!(operator_keys(&c).await, base, "{row} changed etcd");
    }
    // A time in the past names the time (and now, which varies).
    let got = call(&c.members[leader].api("/switchover"), "POST", ok, &[], past).await;
    assert_eq!(got.status, 400);
    let reason = got.body["error"].as_str().unwrap_or_default();
    assert!(
        reason.starts_with("scheduled_at 2001-01-01T00:00:00Z is in the past (now is "),
        "{reason}"
    );
    assert_eq!(operator_keys(&c).await, base);

    // A stale If-Match is a conflict, and changes nothing either.
    let rev = revision(&c, "config").await;
    let stale = (rev - 1).to_string();
    let got = call(
        &c.members[leader].api("/config"),
        "PATCH",
        ok,
        &[("If-Match", &stale)],
        "{\"ttl\": 30}",
    )
    .await;
    assert_eq!(got.status, 409, "{}", got.body);
    assert_eq!(got.body["error"], "config changed concurrently, retry");
    assert_eq!(operator_keys(&c).await, base);

    // A scheduled switchover is stored once; a second is a conflict; the
    // first is then cancelled through the API.
    let at = in_an_hour();
    let body = format!("{{\"candidate\":\"node2\",\"scheduled_at\":\"{at}\"}}");
    let got = call(
        &c.members[replica].api("/switchover"),
        "POST",
        ok,
        &[],
        &body,
    )
    .await;
    assert_eq!(got.status, 202, "{}", got.body);
    assert_eq!(got.body["kind"], "switchover");
    assert_eq!(got.body["leader"], "node1");
    assert_eq!(got.body["candidate"], "node2");
    assert_eq!(got.body["scheduled_at"], at.as_str());
    let stored: Value =
        serde_json::from_str(&c.dcs_get(&key(&c, "failover")).await.expect("stored")).unwrap();
    assert_eq!(stored, got.body);
    let pending = operator_keys(&c).await;
    let got = call(
        &c.members[leader].api("/switchover"),
        "POST",
        ok,
        &[],
        "{\"candidate\":\"node2\"}",
    )
    .await;
    assert_eq!(got.status, 409);
    assert_eq!(
        got.body["error"],
        format!("a switchover to node2 scheduled at {at} is already pending: cancel it first (DELETE /switchover or `pgwarden switchover --cancel`)")
    );
    assert_eq!(operator_keys(&c).await, pending);
    // /cluster shows it.
    eventually("the pending switchover in /cluster", LONG, || async {
        let v = http_json(&c.members[nofail].api("/cluster")).await?;
        (v["failover"]["candidate"] == "node2").then_some(())
    })
    .await;
    let got = call(&c.members[leader].api("/switchover"), "DELETE", ok, &[], "").await;
    assert_eq!(got.status, 200, "{}", got.body);
    assert_eq!(got.body["scheduled_at"], at.as_str());
    assert_eq!(operator_keys(&c).await, base);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_refusals_are_one_line_and_change_nothing() {
    let c = start(&options()).await;
    let base = operator_keys(&c).await;
    let reload_refused = format!("pgwarden: reload of node2 refused: {AUTH_REQUIRED}");
    let restart_refused = format!("pgwarden: restart of node3 refused: {NO_CREDENTIALS}");
    // (member whose config is used, args, stdin, stderr's last line); the
    // exit code is 1 for all.
    #[rustfmt::skip]
    let table: Vec<(usize, Vec<&str>, &str, &str)> = vec![
        (0, vec!["restart", "node9"], "", "pgwarden: no member named node9 in cluster it"),
        (0, vec!["reload", "node2", "node9"], "", "pgwarden: no member named node9 in cluster it"),
        (0, vec!["reinit", "node9", "--force"], "", "pgwarden: no member named node9 in cluster it"),
        (0, vec!["reinit", "node1", "--force"], "", "pgwarden: refusing to reinitialize the leader: switch over first"),
        (0, vec!["switchover", "--candidate", "node9", "--force"], "", "pgwarden: switchover refused: candidate node9 is not a member of cluster it"),
        (0, vec!["switchover", "--candidate", "node3", "--force"], "", "pgwarden: switchover refused: candidate node3 is tagged nofailover"),
        (0, vec!["switchover", "--leader", "node2", "--force"], "", "pgwarden: switchover refused: node2 is not the leader (the leader is node1)"),
        (0, vec!["switchover", "--at", "yesterday", "--force"], "", "pgwarden: switchover refused: scheduled_at \"yesterday\" is not an RFC 3339 time such as 2030-01-02T03:04:05Z: expected digits for the year"),
        (0, vec!["switchover", "--candidate", "node2"], "", "pgwarden: aborted: not confirmed (use --force to skip the question)"),
        (0, vec!["switchover", "--candidate", "node2"], "n\n", "pgwarden: aborted: not confirmed (use --force to skip the question)"),
        (0, vec!["switchover", "--cancel", "--force"], "", "pgwarden: no switchover or failover pending"),
        (0, vec!["failover", "--candidate", "node3", "--force"], "", "pgwarden: failover refused: candidate node3 is tagged nofailover"),
        (0, vec!["failover", "--candidate", "node1", "--force"], "", "pgwarden: failover refused: candidate node1 is already the leader"),
        (0, vec!["edit-config", "--set", "ttl=5"], "", "pgwarden: invalid config: key `ttl`: ttl (5) must be >= loop_wait + 2 * retry_timeout (1 + 2 * 4 = 9)"),
        (0, vec!["edit-config", "--set", "tll=30"], "", "pgwarden: invalid config: key `tll`: unknown field `tll`, expected one of `ttl`, `loop_wait`, `retry_timeout`, `maximum_lag_on_failover`, `use_slots`, `use_pg_rewind`, `member_slots_ttl`, `primary_start_timeout`, `synchronous_mode`, `synchronous_mode_strict`, `synchronous_node_count`, `failsafe_mode`, `pause`, `postgresql`"),
        (0, vec!["edit-config", "--set", "postgresql.parameters.port=5433"], "", "pgwarden: invalid config: key `postgresql.parameters.port`: is managed by pgwarden and cannot be set here"),
        (0, vec!["edit-config", "--set", "ttl"], "", "pgwarden: --set \"ttl\": expected KEY=VALUE"),
        (0, vec!["remove", "other"], "", "pgwarden: other is not the cluster of this config file (its scope is it)"),
        (0, vec!["remove", "it"], "nope\n", "pgwarden: the name typed does not match it: nothing removed"),
        // node3's config has no API credentials: its members' APIs say so.
        (2, vec!["reload", "node2"], "", &reload_refused),
        (2, vec!["restart", "node3"], "", &restart_refused),
    ];
    for (i, args, input, want) in &table {
        let out = cli_with_input(&c, *i, args, input);
        let err = stderr(&out);
        let last = err.lines().last().unwrap_or_default();
        assert_eq!(last, *want, "{args:?}: stderr {err:?}");
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        // One line, after the question when one was asked.
        let lines = err.lines().count();
        let asked = err.contains("[y/N]") || err.contains("Type the cluster name");
        assert!(
            lines == 1 || (asked && lines <= 4),
            "{args:?}: more than one line: {err:?}"
        );
        assert_eq!(operator_keys(&c).await, base, "{args:?} changed etcd");
    }
    // `remove` refused: every key is still there.
    assert!(c.dcs_get(&key(&c, "initialize")).await.is_some());
    assert!(c.dcs_get(&key(&c, "leader")).await.is_some());
    // A bad config line is a config error naming the key.
    let bad = c.root.path().join("bad.toml");
    let text = std::fs::read_to_string(&c.members[0].config)
        .unwrap()
        .replace(&format!("password = \"{PASSWORD}\"\n"), "");
    std::fs::write(&bad, text).unwrap();
    let out = Command::new(pgwarden_bin())
        .arg("-c")
        .arg(&bad)
        .arg("pause")
        .output()
        .unwrap();
    assert_eq!(
        stderr(&out).trim_end(),
        format!(
            "pgwarden: config error: {}: key `api.password`: required key is missing",
            bad.display()
        )
    );
    assert_eq!(out.status.code(), Some(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_config_verbs_and_scheduled_switchover() {
    let c = start(&options()).await;
    let stored_config = || async {
        serde_json::from_str::<Value>(&c.dcs_get(&key(&c, "config")).await.expect("config"))
            .expect("config JSON")
    };

    // pause / resume, idempotent.
    let out = c.cli(0, &["pause"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), "cluster paused\n");
    assert_eq!(stored_config().await["pause"], true);
    assert_eq!(stdout(&c.cli(1, &["pause"])), "cluster is already paused\n");
    eventually("/cluster and /metrics report the pause", LONG, || async {
        let v = http_json(&c.members[2].api("/cluster")).await?;
        let metrics = reqwest::get(c.members[2].api("/metrics"))
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        (v["paused"] == true
            && metrics
                .lines()
                .any(|l| l.starts_with("pgwarden_cluster_paused{") && l.ends_with(" 1")))
        .then_some(())
    })
    .await;
    let out = c.cli(0, &["resume"]);
    assert_eq!(stdout(&out), "cluster resumed\n", "{}", stderr(&out));
    assert_eq!(stored_config().await["pause"], false);
    assert_eq!(
        stdout(&c.cli(0, &["resume"])),
        "cluster is not paused; nothing to resume\n"
    );

    // edit-config and show-config.
    let out = c.cli(
        0,
        &[
            "edit-config",
            "--set",
            "postgresql.parameters.work_mem=8MB",
            "--set",
            "ttl=30",
            "--set",
            "maximum_lag_on_failover=2097152",
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).starts_with("config updated\n"),
        "{}",
        stdout(&out)
    );
    let cfg = stored_config().await;
    assert_eq!(cfg["ttl"], 30);
    assert_eq!(cfg["maximum_lag_on_failover"], 2_097_152);
    assert_eq!(cfg["postgresql"]["parameters"]["work_mem"], "8MB");
    let out = c.cli(1, &["show-config", "--format", "json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let shown: Value = serde_json::from_str(&stdout(&out)).expect("JSON");
    assert_eq!(shown, cfg);
    let out = c.cli(1, &["show-config"]);
    assert!(stdout(&out).contains("ttl = 30"), "{}", stdout(&out));
    assert!(
        stdout(&out).contains("work_mem = \"8MB\""),
        "{}",
        stdout(&out)
    );
    assert_eq!(
        stdout(&c.cli(0, &["edit-config", "--set", "ttl=30"])),
        "config unchanged\n"
    );
    let out = c.cli(0, &["edit-config", "--set", "ttl=null"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        stored_config().await["ttl"],
        10,
        "removing a key restores its default"
    );

    // A scheduled switchover: stored, listed, shown in /cluster, cancelled.
    let at = in_an_hour();
    let out = c.cli(
        0,
        &["switchover", "--candidate", "node2", "--at", &at, "--force"],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).starts_with(&format!(
            "switchover from node1 to node2, scheduled at {at} (requested at "
        )),
        "{}",
        stdout(&out)
    );
    let out = c.cli(2, &["switchover", "--list"]);
    assert!(
        stdout(&out).starts_with(&format!(
            "switchover from node1 to node2, scheduled at {at}"
        )),
        "{}",
        stdout(&out)
    );
    let out = c.cli(0, &["switchover", "--candidate", "node2", "--force"]);
    assert_eq!(
        stderr(&out).trim_end(),
        format!("pgwarden: switchover refused: a switchover to node2 scheduled at {at} is already pending: cancel it first (DELETE /switchover or `pgwarden switchover --cancel`)")
    );
    let out = c.cli(0, &["switchover", "--cancel", "--force"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).starts_with("cancelled: switchover from node1 to node2"));
    assert_eq!(c.dcs_get(&key(&c, "failover")).await, None);
    assert_eq!(
        stdout(&c.cli(0, &["switchover", "--list"])),
        "no switchover or failover pending\n"
    );
}

/// Two PATCHes made against the same revision: exactly one is applied, the
/// other is told to retry, and etcd holds the winner's value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_config_edits_conflict() {
    let c = start(&options()).await;
    let ok = Some((USER, PASSWORD));
    let rev = revision(&c, "config").await;
    assert!(rev > 0);
    let tag = format!("\"{rev}\"");
    let (url_a, url_b) = (c.members[0].api("/config"), c.members[1].api("/config"));
    let if_match = [("If-Match", tag.as_str())];
    let (a, b) = tokio::join!(
        call(
            &url_a,
            "PATCH",
            ok,
            &if_match,
            "{\"maximum_lag_on_failover\": 2097152}",
        ),
        call(
            &url_b,
            "PATCH",
            ok,
            &if_match,
            "{\"maximum_lag_on_failover\": 3145728}",
        ),
    );
    let mut codes = [a.status, b.status];
    codes.sort();
    assert_eq!(codes, [200, 409], "a: {} b: {}", a.body, b.body);
    let (winner, loser) = if a.status == 200 { (a, b) } else { (b, a) };
    assert_eq!(loser.body["error"], "config changed concurrently, retry");
    let stored: Value =
        serde_json::from_str(&c.dcs_get(&key(&c, "config")).await.unwrap()).unwrap();
    assert_eq!(stored, winner.body);
    assert!(revision(&c, "config").await > rev);

    // The winner's revision is the new ETag: a PATCH with it succeeds.
    let now = revision(&c, "config").await.to_string();
    let got = call(
        &c.members[0].api("/config"),
        "PATCH",
        ok,
        &[("If-Match", &now)],
        "{\"maximum_lag_on_failover\": null}",
    )
    .await;
    assert_eq!(got.status, 200, "{}", got.body);
    assert_eq!(got.body["maximum_lag_on_failover"], 1_048_576);
}

// ---- Behaviour that needs the agents' policy for operator requests ----

/// `pgwarden switchover`: the primary role moves to the candidate, the old
/// primary shuts down cleanly and follows it without pg_rewind, and no
/// acknowledged write is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switchover_moves_the_primary_without_rewind() {
    let mut c = start(&options()).await;
    c.start_haproxy();
    let writer = support::faults::Writer::start(c.rw_port, "so", Duration::from_millis(50)).await;
    eventually("some writes before the switchover", LONG, || async {
        (writer.acked_ids().len() > 10).then_some(())
    })
    .await;
    let log_before = c.agent_log(0).len();
    let t0 = Instant::now();
    let out = c.cli(0, &["switchover", "--candidate", "node2", "--force"]);
    assert!(
        out.status.success(),
        "switchover failed: {}{}",
        stdout(&out),
        stderr(&out)
    );
    assert!(
        stdout(&out).ends_with("switched over: node2 is the leader now\n"),
        "{}",
        stdout(&out)
    );
    let primary = c.wait_single_primary(LONG).await;
    assert_eq!(c.members[primary].name, "node2");
    eprintln!("switchover took {:.1}s", t0.elapsed().as_secs_f64());
    // The old primary follows the new one.
    eventually("node1 streaming from node2", LONG, || async {
        (http_status("GET", &c.members[0].api("/replica")).await == 200).then_some(())
    })
    .await;
    let t_after = Instant::now();
    eventually(
        "writes through HAProxy after the switchover",
        LONG,
        || async {
            (writer
                .acked
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .any(|(_, t)| *t > t_after))
            .then_some(())
        },
    )
    .await;
    let acked = writer.stop().await;
    // Without pg_rewind: a clean shutdown leaves nothing to rewind (no
    // rewind job ran, none was decided).
    let log = c.agent_log(0);
    let since = &log[log_before.min(log.len())..];
    let rewinds: Vec<&str> = since
        .lines()
        .filter(|l| l.contains("pg_rewind") || l.contains("rewind from"))
        .collect();
    assert!(
        rewinds.is_empty(),
        "node1 ran pg_rewind after a clean switchover:\n{}",
        rewinds.join("\n")
    );
    // Every acknowledged row is on the new primary.
    let client = c.sql(primary).await.expect("sql to node2");
    let rows = client
        .query("SELECT id FROM so", &[])
        .await
        .expect("select");
    let have: std::collections::HashSet<i64> = rows.iter().map(|r| r.get(0)).collect();
    let missing: Vec<&i64> = acked.iter().filter(|id| !have.contains(id)).collect();
    assert!(missing.is_empty(), "acknowledged rows lost: {missing:?}");
    // The request is gone once done.
    assert_eq!(c.dcs_get(&key(&c, "failover")).await, None);
    let history = http_json(&c.members[1].api("/history"))
        .await
        .unwrap_or(json!([]));
    assert!(
        history
            .as_array()
            .is_some_and(|h| h.iter().any(|e| e["leader"] == "node2")),
        "history records node2's promotion: {history}"
    );
}

/// Paused, a primary whose PostgreSQL dies stays down: no restart, no
/// promotion, until `resume`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_stops_automatic_failover() {
    let c = start(&options()).await;
    let out = c.cli(0, &["pause"]);
    assert_eq!(stdout(&out), "cluster paused\n", "{}", stderr(&out));
    // Every agent has seen the pause before the fault.
    eventually("every member reports the pause", LONG, || async {
        for m in &c.members {
            let v = http_json(&m.api("/status")).await?;
            if v["paused"] != true {
                return None;
            }
        }
        Some(())
    })
    .await;
    let killed = c.postmaster_pid(0).expect("node1's postmaster");
    c.kill9_postgres(0);
    eventually(
        "the killed postmaster gone",
        Duration::from_secs(10),
        || async { (!running_process(killed)).then_some(()) },
    )
    .await;
    // Three leases' worth of time: long enough for a restart in place
    // (primary_start_timeout) or a failover (ttl) had the cluster not been
    // paused.
    let watch_until = Instant::now() + Duration::from_secs(30);
    while Instant::now() < watch_until {
        // The killed postmaster may linger as a zombie until its parent
        // (init, in a container maybe never) reaps it.
        match c.postmaster_pid(0) {
            None => {}
            Some(pid) if pid == killed && !running_process(pid) => {}
            Some(pid) => {
                panic!("PostgreSQL restarted while paused (postmaster {pid}, killed {killed})")
            }
        }
        for i in 1..c.members.len() {
            assert_ne!(
                http_status("GET", &c.members[i].api("/primary")).await,
                200,
                "{} promoted while paused",
                c.members[i].name
            );
            let v = http_json(&c.members[i].api("/status")).await;
            if let Some(v) = v {
                assert_eq!(
                    v["in_recovery"], true,
                    "{} left recovery",
                    c.members[i].name
                );
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let out = c.cli(0, &["resume"]);
    assert_eq!(stdout(&out), "cluster resumed\n", "{}", stderr(&out));
    // After resume the cluster heals by itself: one primary again.
    let primary = c.wait_single_primary(LONG).await;
    eprintln!("after resume: {} is primary", c.members[primary].name);
}

/// `pgwarden restart` is rolling: each member restarts (a new postmaster)
/// and runs again before the next; `reload` reaches the agent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_restart_and_reload() {
    let c = start(&options()).await;
    let before: Vec<Option<i32>> = (0..2).map(|i| c.postmaster_pid(i)).collect();
    let out = c.cli(0, &["restart", "node1", "node2"]);
    assert!(
        out.status.success(),
        "restart failed: {}{}",
        stdout(&out),
        stderr(&out)
    );
    let text = stdout(&out);
    let order: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("restart requested"))
        .collect();
    assert_eq!(
        order,
        ["node2: restart requested", "node1: restart requested"],
        "replicas first, the leader last"
    );
    for (i, pid) in before.iter().enumerate() {
        assert_ne!(c.postmaster_pid(i), *pid, "{} restarted", c.members[i].name);
    }
    let primary = c.wait_single_primary(LONG).await;
    assert_eq!(
        c.members[primary].name, "node1",
        "a restart is not a failover"
    );
    let out = c.cli(0, &["reload", "node1", "node2"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        stdout(&out),
        "node1: reload requested\nnode2: reload requested\n"
    );
}

/// Paused, with the leader's whole server gone: nobody takes over by
/// themselves; `pgwarden failover --candidate` promotes the named member.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manual_failover_while_paused_without_a_leader() {
    let mut c = start(&options()).await;
    let out = c.cli(1, &["pause"]);
    assert_eq!(stdout(&out), "cluster paused\n", "{}", stderr(&out));
    eventually("every member reports the pause", LONG, || async {
        for m in &c.members {
            if http_json(&m.api("/status")).await?["paused"] != true {
                return None;
            }
        }
        Some(())
    })
    .await;
    c.kill9_server(0);
    // node1's lease runs out; paused, nobody takes the leader key.
    eventually("the leader key gone with node1's lease", LONG, || async {
        c.dcs_get(&key(&c, "leader")).await.is_none().then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(
        c.dcs_get(&key(&c, "leader")).await,
        None,
        "nobody took over while paused"
    );
    for i in 1..3 {
        assert_ne!(http_status("GET", &c.members[i].api("/primary")).await, 200);
    }
    let out = c.cli(1, &["failover", "--candidate", "node3", "--force"]);
    assert_eq!(
        stderr(&out).trim_end(),
        "pgwarden: failover refused: candidate node3 is tagged nofailover"
    );
    let out = c.cli(1, &["failover", "--candidate", "node2", "--force"]);
    assert!(
        out.status.success(),
        "failover failed: {}{}",
        stdout(&out),
        stderr(&out)
    );
    assert!(
        stdout(&out).ends_with("failed over: node2 is the leader now\n"),
        "{}",
        stdout(&out)
    );
    let primary = c.wait_single_primary(LONG).await;
    assert_eq!(c.members[primary].name, "node2");
    assert_eq!(
        c.dcs_get(&key(&c, "failover")).await,
        None,
        "request cleared"
    );
    // Still paused: the operator's request was the only action.
    let cfg: Value = serde_json::from_str(&c.dcs_get(&key(&c, "config")).await.unwrap()).unwrap();
    assert_eq!(cfg["pause"], true);
}

/// Live postmaster processes serving `data_dir`.
fn postmasters_of(data_dir: &std::path::Path) -> Vec<i32> {
    let needle = format!("-D {}", data_dir.display());
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(cmd) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        if cmd.contains("postgres") && cmd.contains(&needle) && running_process(pid) {
            out.push(pid);
        }
    }
    out
}

/// `pgwarden reinit`: the replica's PostgreSQL is stopped, its data wiped
/// and cloned again from the leader; it streams again with one postmaster.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reinit_reclones_a_replica() {
    let c = start(&options()).await;
    let primary = c.sql(0).await.expect("sql to node1");
    primary
        .batch_execute("CREATE TABLE reinit_marker (id int); INSERT INTO reinit_marker VALUES (1)")
        .await
        .expect("marker");
    let before = c.postmaster_pid(1).expect("node2's postmaster");
    let log_before = c.agent_log(1).len();
    let out = c.cli(0, &["reinit", "node2", "--force"]);
    assert_eq!(
        stdout(&out),
        "node2: reinitialize requested\n",
        "{}",
        stderr(&out)
    );
    eventually(
        "node2 streaming again on a new postmaster",
        LONG,
        || async {
            let pid = c.postmaster_pid(1)?;
            (pid != before && http_status("GET", &c.members[1].api("/replica")).await == 200)
                .then_some(())
        },
    )
    .await;
    assert_eq!(
        postmasters_of(&c.members[1].data_dir()).len(),
        1,
        "exactly one postmaster on node2's data directory"
    );
    assert!(!running_process(before), "the old postmaster was stopped");
    // Stopped *before* its data directory was removed: no clone or start
    // failed on a postmaster still holding the old shared memory.
    let log = c.agent_log(1);
    let errors: Vec<&str> = log[log_before.min(log.len())..]
        .lines()
        .filter(|l| l.contains("ERROR"))
        .collect();
    assert!(
        errors.is_empty(),
        "reinitialize went wrong on node2:\n{}",
        errors.join("\n")
    );
    let rows = support::cluster::sql_at(
        "127.0.0.1",
        c.members[1].pg_port,
        support::cluster::SUPERUSER_PASSWORD,
    )
    .await
    .expect("sql to node2")
    .query("SELECT id FROM reinit_marker", &[])
    .await
    .expect("marker on node2");
    assert_eq!(rows.len(), 1);
}
