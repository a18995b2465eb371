use anyhow::Context;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

/// A process the demo started and must stop.
pub struct Child {
    name: String,
    child: tokio::process::Child,
}

impl Child {
    pub fn spawn(name: &str, program: &Path, args: &[&str], log: &Path) -> anyhow::Result<Child> {
        // Appended to: a child's own children (the fence keeper) may keep
        // the file open after it was killed and restarted; a truncating
        // open would have them write over the new lines.
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("cannot create {}", log.display()))?;
        let err_file = log_file.try_clone()?;
        let child = tokio::process::Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(log_file)
            .stderr(err_file)
            // Our own process group: a terminal's Ctrl-C reaches only the
            // demo, which then stops its children in order.
            .process_group(0)
            .spawn()
            .with_context(|| format!("cannot start {}", program.display()))?;
        Ok(Child {
            name: name.to_string(),
            child,
        })
    }
}

#[derive(Default)]
pub struct Children(Vec<Child>);

impl Children {
    pub fn push(&mut self, c: Child) {
        self.0.push(c);
    }

    /// Agents first (they stop their PostgreSQL, all at once), then
    /// HAProxy and etcd.
    pub async fn stop_all(&mut self) {
        let (agents, infra): (Vec<Child>, Vec<Child>) =
            self.0.drain(..).partition(|c| c.name.starts_with("node"));
        for c in &agents {
            c.terminate();
        }
        for c in agents {
            c.wait_or_kill(Duration::from_secs(90)).await;
        }
        for c in infra.into_iter().rev() {
            c.terminate();
            c.wait_or_kill(Duration::from_secs(10)).await;
        }
    }
}

impl Child {
    fn terminate(&self) {
        if let Some(pid) = self.child.id() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
    }

    async fn wait_or_kill(mut self, grace: Duration) {
        if tokio::time::timeout(grace, self.child.wait())
            .await
            .is_err()
        {
            eprintln!("demo: {} did not stop in {grace:?}; killing it", self.name);
            let _ = self.child.kill().await;
        }
    }
}

pub async fn wait_for_port(port: u16, within: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + within;
    loop {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            anyhow::bail!("nothing listens on port {port} after {within:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Polls until a write through HAProxy's read-write port commits.
pub async fn wait_for_write(port: u16, password: &str, within: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + within;
    let conninfo = format!("host=127.0.0.1 port={port} user=postgres password={password} dbname=postgres connect_timeout=2");
    let mut last_err = String::new();
    while Instant::now() < deadline {
        match try_write(&conninfo).await {
            Ok(()) => return Ok(()),
            Err(e) => last_err = format!("{e:#}"),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    anyhow::bail!("no write accepted within {within:?}: {last_err}")
}

async fn try_write(conninfo: &str) -> anyhow::Result<()> {
    let (client, conn) = tokio_postgres::connect(conninfo, tokio_postgres::NoTls).await?;
    let task = tokio::spawn(conn);
    let r = client
        .batch_execute(
            "CREATE TABLE IF NOT EXISTS pgwarden_demo (id serial PRIMARY KEY, at timestamptz DEFAULT now());
             INSERT INTO pgwarden_demo DEFAULT VALUES",
        )
        .await;
    drop(client);
    let _ = task.await;
    Ok(r?)
}
