//! `pgwarden demo`: a whole cluster on this machine (etcd, N agents each
//! with its PostgreSQL, HAProxy) for a first look. Every process it starts is
//! its child and is stopped when the demo ends.

mod processes;

use crate::haproxy::{self, Backend, RenderOptions};
use anyhow::{bail, Context};
use processes::{Child, Children};
use rand::distributions::Alphanumeric;
use rand::Rng;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

#[derive(clap::Args, Debug, Clone)]
pub struct DemoArgs {
    /// Directory for every member's config and data (default: a new
    /// temporary directory).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Number of members.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u16).range(1..=9))]
    pub members: u16,
    /// HAProxy read-write port.
    #[arg(long, default_value_t = 5000)]
    pub rw_port: u16,
    /// HAProxy read-only port.
    #[arg(long, default_value_t = 5001)]
    pub ro_port: u16,
    /// HAProxy stats page port.
    #[arg(long, default_value_t = 7000)]
    pub stats_port: u16,
    /// First PostgreSQL port; member i gets this + i.
    #[arg(long, default_value_t = 15432)]
    pub pg_base_port: u16,
    /// First agent API port; member i gets this + i.
    #[arg(long, default_value_t = 18008)]
    pub api_base_port: u16,
    /// etcd client port (the peer port is this + 1).
    #[arg(long, default_value_t = 12379)]
    pub etcd_port: u16,
    /// Cluster name.
    #[arg(long, default_value = "demo")]
    pub scope: String,
}

struct Tools {
    etcd: PathBuf,
    haproxy: PathBuf,
}

fn find_tools() -> anyhow::Result<Tools> {
    let find = |prog: &str, package: &str| -> anyhow::Result<PathBuf> {
        let path = std::env::var_os("PATH").unwrap_or_default();
        std::env::split_paths(&path)
            .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/usr/bin")])
            .map(|d| d.join(prog))
            .find(|p| p.is_file())
            .with_context(|| format!("`{prog}` not found: install the Debian package {package} (apt-get install {package})"))
    };
    let tools = Tools {
        etcd: find("etcd", "etcd-server")?,
        haproxy: find("haproxy", "haproxy")?,
    };
    if crate::config::find_bin_dir().is_none() {
        bail!("PostgreSQL not found: install the Debian package postgresql (apt-get install postgresql)");
    }
    Ok(tools)
}

pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    let tools = find_tools()?;
    let dir = match &args.dir {
        Some(d) => {
            std::fs::create_dir_all(d).with_context(|| format!("cannot create {}", d.display()))?;
            std::fs::canonicalize(d)?
        }
        None => tempfile::Builder::new()
            .prefix("pgwarden-demo-")
            .tempdir()?
            .keep(),
    };
    // PostgreSQL runs as another OS user when we are root: it must be able
    // to reach its data directory.
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))?;
    let mut children = Children::default();
    let result = run_cluster(&args, &tools, &dir, &mut children, started).await;
    eprintln!("demo: stopping everything it started…");
    children.stop_all().await;
    result
}

async fn run_cluster(
    args: &DemoArgs,
    tools: &Tools,
    dir: &Path,
    children: &mut Children,
    started: Instant,
) -> anyhow::Result<()> {
    let exe = std::env::current_exe().context("cannot find the pgwarden executable")?;
    let etcd_url = format!("http://127.0.0.1:{}", args.etcd_port);
    let peer_url = format!("http://127.0.0.1:{}", args.etcd_port + 1);
    children.push(Child::spawn(
        "etcd",
        &tools.etcd,
        &[
            "--name",
            "demo",
            "--data-dir",
            &dir.join("etcd").to_string_lossy(),
            "--listen-client-urls",
            &etcd_url,
            "--advertise-client-urls",
            &etcd_url,
            "--listen-peer-urls",
            &peer_url,
            "--initial-advertise-peer-urls",
            &peer_url,
            "--initial-cluster",
            &format!("demo={peer_url}"),
        ],
        &dir.join("etcd.log"),
    )?);
    processes::wait_for_port(args.etcd_port, Duration::from_secs(20))
        .await
        .context("etcd did not start; see etcd.log in the demo directory")?;

    let superuser_pw = random_secret();
    let replication_pw = random_secret();
    // One API password for the whole cluster: the operator verbs read it
    // from whichever member's config they are given.
    let api_pw = random_secret();
    let mut backends = Vec::new();
    let mut first_config = None;
    for i in 1..=args.members {
        let name = format!("node{i}");
        let member_dir = dir.join(&name);
        std::fs::create_dir_all(&member_dir)?;
        std::fs::set_permissions(&member_dir, std::fs::Permissions::from_mode(0o755))?;
        let pg_port = args.pg_base_port + i;
        let api_port = args.api_base_port + i;
        let config = member_config(
            args,
            &name,
            &member_dir,
            &etcd_url,
            pg_port,
            api_port,
            &superuser_pw,
            &replication_pw,
            &api_pw,
        );
        let config_path = member_dir.join("pgwarden.toml");
        std::fs::write(&config_path, config)?;
        std::fs::set_permissions(&config_path, std::fs::Permissions::from_mode(0o600))?;
        first_config.get_or_insert(config_path.clone());
        children.push(Child::spawn(
            &name,
            &exe,
            &["agent", "-c", &config_path.to_string_lossy()],
            &member_dir.join("agent.log"),
        )?);
        backends.push(Backend {
            name,
            pg_host: "127.0.0.1".into(),
            pg_port,
            api_host: "127.0.0.1".into(),
            api_port,
        });
    }

    let opts = RenderOptions {
        rw_port: args.rw_port,
        ro_port: args.ro_port,
        stats_port: args.stats_port,
        ..RenderOptions::default()
    };
    let haproxy_cfg = dir.join("haproxy.cfg");
    std::fs::write(&haproxy_cfg, haproxy::render(&args.scope, &backends, &opts))?;
    children.push(Child::spawn(
        "haproxy",
        &tools.haproxy,
        &["-db", "-f", &haproxy_cfg.to_string_lossy()],
        &dir.join("haproxy.log"),
    )?);

    let cfg_path = first_config.unwrap_or_default();
    println!(
        "pgwarden demo: cluster `{}` with {} members in {}",
        args.scope,
        args.members,
        dir.display()
    );
    println!(
        "  read-write:  psql 'postgres://postgres:{superuser_pw}@127.0.0.1:{}/postgres'",
        args.rw_port
    );
    println!(
        "  read-only:   psql 'postgres://postgres:{superuser_pw}@127.0.0.1:{}/postgres'",
        args.ro_port
    );
    println!("  HAProxy stats: http://127.0.0.1:{}/", args.stats_port);
    println!("  members:     pgwarden -c {} list", cfg_path.display());
    println!(
        "  operate:     pgwarden -c {} switchover | pause | resume | edit-config --set ttl=20 | restart node2 ...",
        cfg_path.display()
    );
    println!(
        "  logs:        {}/<member>/agent.log, etcd.log, haproxy.log",
        dir.display()
    );
    println!("Ctrl-C stops everything.");

    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut sigint = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    let ready = processes::wait_for_write(args.rw_port, &superuser_pw, Duration::from_secs(300));
    tokio::select! {
        r = ready => match r {
            Ok(()) => println!(
                "cluster ready: first write accepted through HAProxy port {} after {:.1}s",
                args.rw_port,
                started.elapsed().as_secs_f64()
            ),
            Err(e) => eprintln!("demo: the cluster did not accept a write: {e:#}"),
        },
        _ = sigterm.recv() => return Ok(()),
        _ = sigint.recv() => return Ok(()),
    }
    tokio::select! {
        _ = sigterm.recv() => {}
        _ = sigint.recv() => {}
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn member_config(
    args: &DemoArgs,
    name: &str,
    member_dir: &Path,
    etcd_url: &str,
    pg_port: u16,
    api_port: u16,
    superuser_pw: &str,
    replication_pw: &str,
    api_pw: &str,
) -> String {
    format!(
        r#"# Generated by `pgwarden demo`.
scope = "{scope}"
name = "{name}"

[etcd]
endpoints = ["{etcd_url}"]

[api]
listen = "127.0.0.1:{api_port}"
username = "pgwarden"
password = "{api_pw}"

[postgresql]
data_dir = "{data}"
listen = "127.0.0.1:{pg_port}"
parameters = {{ max_connections = 100, shared_buffers = "32MB" }}

[postgresql.authentication.superuser]
username = "postgres"
password = "{superuser_pw}"

[postgresql.authentication.replication]
username = "replicator"
password = "{replication_pw}"
"#,
        scope = args.scope,
        data = member_dir.join("data").display(),
    )
}

fn random_secret() -> String {
    rand::thread_rng()
        .sample_iter(&Alphanumeric)
        .take(24)
        .map(char::from)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Wrap {
        #[command(flatten)]
        demo: DemoArgs,
    }

    /// Every generated member config is valid and carries the API
    /// credentials the operator verbs need.
    #[test]
    fn member_configs_carry_api_credentials() {
        let args = Wrap::parse_from(["demo"]).demo;
        let dir = Path::new("/tmp/pgwarden-demo-test/node1");
        let text = member_config(
            &args,
            "node1",
            dir,
            "http://127.0.0.1:12379",
            15433,
            18009,
            "su-pw",
            "repl-pw",
            "api-pw",
        );
        let cfg = crate::config::parse(Path::new("pgwarden.toml"), &text).unwrap();
        assert_eq!(cfg.api.credentials(), Some(("pgwarden", "api-pw")));
        assert!(!cfg.api.tls());
        assert_eq!(random_secret().len(), 24);
        assert_ne!(random_secret(), random_secret());
    }
}
