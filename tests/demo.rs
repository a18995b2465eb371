//! `pgwarden demo` brings up a whole cluster a newcomer can write to through
//! HAProxy, and SIGTERM leaves no process behind.

mod support;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use support::{free_port, pgwarden_bin, temp_dir};

/// Processes whose command line mentions `needle`.
fn processes_mentioning(needle: &str) -> Vec<String> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        if entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
            .is_none()
        {
            continue;
        }
        if let Ok(cmd) = std::fs::read(entry.path().join("cmdline")) {
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            if cmd.contains(needle) {
                out.push(cmd);
            }
        }
    }
    out
}

/// A base port b such that b..b+n are all free now, in 21000..32000.
fn free_block(n: u16) -> u16 {
    let mut b = 21000 + (std::process::id() % 500) as u16 * 20;
    loop {
        if (b..b + n).all(|p| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok()) {
            return b;
        }
        b = if b + 2 * n > 32000 { 21000 } else { b + n };
    }
}

#[test]
fn demo_serves_writes_through_haproxy_and_stops_everything_on_sigterm() {
    let root = temp_dir("pgwarden-demo-test-");
    let dir = root.path().join("cluster");
    let ports: Vec<String> = (0..3).map(|_| free_port().to_string()).collect();
    // The demo numbers member ports from a base: find a free block below
    // the kernel's ephemeral range.
    let base = free_block(50);
    let mut child = Command::new(pgwarden_bin())
        .args(["demo", "--dir"])
        .arg(&dir)
        .args([
            "--rw-port",
            &ports[0],
            "--ro-port",
            &ports[1],
            "--stats-port",
            &ports[2],
        ])
        .args(["--pg-base-port", &base.to_string()])
        .args(["--api-base-port", &(base + 20).to_string()])
        .args(["--etcd-port", &(base + 40).to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start demo");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(180);
    let mut printed = Vec::new();
    let ready = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => {
                let done = line.starts_with("cluster ready");
                printed.push(line);
                if done {
                    break true;
                }
            }
            Err(_) => break false,
        }
    };
    let result = std::panic::catch_unwind(|| {
        assert!(
            ready,
            "the demo never accepted a write:\n{}",
            printed.join("\n")
        );
        let text = printed.join("\n");
        assert!(
            text.contains(&format!("127.0.0.1:{}/postgres", ports[0])),
            "{text}"
        );
        assert!(text.contains("list"), "prints the list command:\n{text}");
        // Each member's config is where the docs say, and `list` works on it.
        let cfg = dir.join("node1/pgwarden.toml");
        let out = Command::new(pgwarden_bin())
            .arg("-c")
            .arg(&cfg)
            .args(["list", "--format", "json"])
            .output()
            .expect("list");
        let rows: serde_json::Value = serde_json::from_slice(&out.stdout).expect("list JSON");
        assert_eq!(rows.as_array().map(|a| a.len()), Some(3), "{rows}");
        // Data directories where the docs say; replicas may still be cloning
        // when the first write is accepted.
        let deadline = Instant::now() + Duration::from_secs(120);
        while !(1..=3).all(|i| dir.join(format!("node{i}/data/PG_VERSION")).exists()) {
            assert!(
                Instant::now() < deadline,
                "members' data directories never appeared under {}",
                dir.display()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    });

    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let stop_deadline = Instant::now() + Duration::from_secs(120);
    let status = loop {
        if let Ok(Some(s)) = child.try_wait() {
            break Some(s);
        }
        if Instant::now() > stop_deadline {
            let _ = child.kill();
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let leftovers = processes_mentioning(&dir.to_string_lossy());
    if let Err(e) = result {
        std::panic::resume_unwind(e);
    }
    assert!(
        status.is_some_and(|s| s.success()),
        "demo did not exit cleanly on SIGTERM: {status:?}"
    );
    assert!(leftovers.is_empty(), "processes left behind: {leftovers:?}");
}
