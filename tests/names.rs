//! One name, one member: a second agent started with a live member's name
//! (a config copied to another instance and not edited) refuses to start,
//! and nothing changes on the cluster.

mod support;

use std::time::Duration;
use support::{free_port, pgwarden_bin, Cluster, ClusterOptions};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_agent_with_a_live_members_name_refuses_to_start() {
    let mut c = Cluster::start(&ClusterOptions::new(2));
    let primary = c.ready_with_haproxy().await;
    let leader = c.members[primary].name.clone();
    let leader_key = format!("/service/{}/leader", c.scope);
    let postmaster = c.postmaster_pid(primary);

    // The leader's config, copied to a new instance: own ports and data
    // directory, same name.
    let copy_dir = c.root.path().join("copy");
    std::fs::create_dir_all(&copy_dir).expect("copy dir");
    support::cluster::set_mode(&copy_dir, 0o755);
    let m = &c.members[primary];
    let text = std::fs::read_to_string(&m.config).expect("read config");
    let (api_port, pg_port) = (free_port(), free_port());
    let data = copy_dir.join("data");
    let text = text
        .replace(&format!(":{}\"", m.api_port), &format!(":{api_port}\""))
        .replace(&format!(":{}\"", m.pg_port), &format!(":{pg_port}\""))
        .replace(
            &m.data_dir().display().to_string(),
            &data.display().to_string(),
        );
    assert!(text.contains(&api_port.to_string()) && text.contains(&pg_port.to_string()));
    let config = copy_dir.join("pgwarden.toml");
    std::fs::write(&config, text).expect("write copy");

    let out = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::new(pgwarden_bin())
            .args(["agent", "-c"])
            .arg(&config)
            .output(),
    )
    .await
    .expect("the second agent exits by itself")
    .expect("run the second agent");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "it refused: {stderr}");
    let expected = format!(
        "key `name`: member name `{leader}` is already used by a live member (API http://127.0.0.1:{}, PostgreSQL 127.0.0.1:{})",
        c.members[primary].api_port, c.members[primary].pg_port
    );
    assert!(stderr.contains(&expected), "stderr: {stderr}");

    // Nothing changed: same leader on the same postmaster, no data written
    // for the copy, the copy's ports closed.
    assert_eq!(
        c.dcs_get(&leader_key).await.as_deref(),
        Some(leader.as_str())
    );
    assert_eq!(c.postmaster_pid(primary), postmaster);
    assert_eq!(
        c.wait_single_primary(Duration::from_secs(10)).await,
        primary
    );
    assert!(!data.exists(), "the copy created its data directory");
    assert!(std::net::TcpStream::connect(("127.0.0.1", pg_port)).is_err());
}
