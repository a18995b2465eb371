use super::command::{run, OsUser, PgCommandError};
use super::conf::{render_conf, ConfInputs, INCLUDE_LINE, MANAGED_CONF};
use super::observe::{self, Observed};
use crate::config::Credentials;
use anyhow::{bail, Context};
use nix::errno::Errno;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use std::net::SocketAddr;
use std::os::unix::fs::MetadataExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio_postgres::Client;

/// One local PostgreSQL instance and the means to drive it.
pub struct Instance {
    pub bin_dir: PathBuf,
    pub data_dir: PathBuf,
    pub listen: SocketAddr,
    pub user: Option<OsUser>,
    pub superuser: Credentials,
    pub replication: Credentials,
    pub start_timeout: Duration,
    client: Option<Client>,
    /// The postmaster as last read from postmaster.pid, shared by every
    /// `detached` handle: the fence timer's handle must know it when the
    /// file can no longer be read (no descriptor left), and the loop when
    /// the file is gone with the data directory.
    postmaster: Arc<Mutex<Seen>>,
}

/// The postmaster last seen alive in postmaster.pid.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Seen {
    /// 0: none.
    pid: i32,
    /// (device, inode) of its working directory when that was our data
    /// directory (PostgreSQL works in its data directory): the same
    /// process under the same PID can be recognised after the directory
    /// is deleted. None where /proc could not tell.
    cwd: Option<(u64, u64)>,
}

/// Whether a postmaster runs on our data directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Postmaster {
    None,
    Running(i32),
    /// The postmaster last seen still runs, but postmaster.pid is gone:
    /// its data directory was deleted (or replaced) under it.
    Orphaned(i32),
}

impl Postmaster {
    pub fn pid(self) -> Option<i32> {
        match self {
            Postmaster::None => None,
            Postmaster::Running(pid) | Postmaster::Orphaned(pid) => Some(pid),
        }
    }
}

const SHORT: Duration = Duration::from_secs(30);
/// How long an immediate shutdown sent directly (SIGQUIT) may take: what
/// `pg_ctl stop -m immediate -t 10` allows.
const IMMEDIATE_STOP_WAIT: Duration = Duration::from_secs(10);
/// How long a fast shutdown sent directly (SIGINT) may take, as pg_ctl's.
const FAST_STOP_WAIT: Duration = Duration::from_secs(60);

impl Instance {
    /// The instance a config describes, with `bin_dir` as resolved by
    /// validation (the agent, its start-up probe, the fence keeper).
    pub fn from_config(
        cfg: &crate::config::Config,
        bin_dir: PathBuf,
        user: Option<OsUser>,
    ) -> Instance {
        Instance::new(
            bin_dir,
            cfg.postgresql.data_dir.clone(),
            cfg.postgresql.listen,
            user,
            cfg.postgresql.authentication.superuser.clone(),
            cfg.postgresql.authentication.replication.clone(),
            Duration::from_secs(cfg.postgresql.start_timeout),
        )
    }

    pub fn new(
        bin_dir: PathBuf,
        data_dir: PathBuf,
        listen: SocketAddr,
        user: Option<OsUser>,
        superuser: Credentials,
        replication: Credentials,
        start_timeout: Duration,
    ) -> Self {
        Instance {
            bin_dir,
            data_dir,
            listen,
            user,
            superuser,
            replication,
            start_timeout,
            client: None,
            postmaster: Arc::new(Mutex::new(Seen::default())),
        }
    }

    fn seen(&self) -> Seen {
        *self.postmaster.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn remember(&self, seen: Seen) {
        *self.postmaster.lock().unwrap_or_else(|p| p.into_inner()) = seen;
    }

    /// A data directory PostgreSQL can start from.
    pub fn has_data(&self) -> bool {
        self.data_dir.join("PG_VERSION").is_file()
            && self.data_dir.join("global/pg_control").is_file()
    }

    /// Whether a data directory PostgreSQL can start from is there: Err
    /// when that cannot be told (a permission error, no descriptors left),
    /// which must never be read as "empty".
    pub fn data_present(&self) -> std::io::Result<bool> {
        for file in ["PG_VERSION", "global/pg_control"] {
            match std::fs::metadata(self.data_dir.join(file)) {
                Ok(m) if m.is_file() => {}
                Ok(_) => return Ok(false),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
                Err(e) => return Err(e),
            }
        }
        Ok(true)
    }

    /// Whether a postmaster runs on this data directory, per postmaster.pid
    /// (remembered for when the file cannot be read). Err when that cannot
    /// be told: "unknown", never "stopped".
    pub fn postmaster(&self) -> std::io::Result<Postmaster> {
        let text = match std::fs::read_to_string(self.data_dir.join("postmaster.pid")) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return self.orphan(),
            Err(e) => return Err(e),
        };
        let Some(pid) = parse_postmaster_pid(&text) else {
            // Being written by a starting postmaster, or damaged.
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "postmaster.pid has no PID on its first line",
            ));
        };
        let live = match kill(Pid::from_raw(pid), None) {
            Ok(()) | Err(Errno::EPERM) => true,
            Err(Errno::ESRCH) => false,
            Err(e) => return Err(std::io::Error::from(e)),
        };
        if !live {
            self.remember(Seen::default());
            return Ok(Postmaster::None);
        }
        // Best effort: without /proc the deletion of the data directory
        // under this postmaster goes unnoticed until PostgreSQL's own
        // lock-file check stops it.
        let ours = identity(&self.data_dir).ok();
        let cwd = cwd_identity(pid).ok().filter(|cwd| Some(*cwd) == ours);
        self.remember(Seen { pid, cwd });
        Ok(Postmaster::Running(pid))
    }

    /// postmaster.pid is gone: no postmaster runs — unless the one last
    /// seen still does, in the working directory it had then (the same
    /// process, not another under a reused PID): then the data directory
    /// was deleted or replaced under it, and it must be stopped by its PID.
    fn orphan(&self) -> std::io::Result<Postmaster> {
        let seen = self.seen();
        let forget = || {
            self.remember(Seen::default());
            Ok(Postmaster::None)
        };
        let Some(cwd) = seen.cwd.filter(|_| seen.pid > 0) else {
            return forget();
        };
        match cwd_identity(seen.pid) {
            Ok(now) if now == cwd => Ok(Postmaster::Orphaned(seen.pid)),
            Ok(_) => forget(),
            // /proc/<pid> is gone with the process.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => forget(),
            Err(e) => Err(std::io::Error::new(
                e.kind(),
                format!(
                    "it is gone, and whether postmaster {} still runs cannot be told: {e}",
                    seen.pid
                ),
            )),
        }
    }

    /// PID of a live postmaster for stopping it (an orphaned one too): when
    /// postmaster.pid cannot be read (no descriptor left, say), the PID
    /// last read answers if that process still lives — fencing needs it
    /// exactly then.
    pub fn postmaster_pid(&self) -> Option<i32> {
        match self.postmaster() {
            Ok(p) => p.pid(),
            Err(e) => {
                let pid = self.seen().pid;
                let live = pid > 0 && alive(pid);
                tracing::debug!(
                    "cannot read postmaster.pid ({e}); the postmaster last read, PID {pid}, is {}",
                    if live { "alive" } else { "gone" }
                );
                live.then_some(pid)
            }
        }
    }

    /// Bytes available to PostgreSQL (an unprivileged user) on the file
    /// systems of the data directory — of its parent while it does not
    /// exist, where a clone is made — and of its WAL (`pg_wal`, which may
    /// link elsewhere). None where statvfs fails.
    pub fn free_space(&self) -> (Option<u64>, Option<u64>) {
        let data = available(&self.data_dir).or_else(|e| match (e, self.data_dir.parent()) {
            (Errno::ENOENT, Some(parent)) => available(parent),
            (e, _) => Err(e),
        });
        (data.ok(), available(&self.data_dir.join("pg_wal")).ok())
    }

    /// A postmaster whose data directory is gone has nothing to shut down
    /// cleanly and no postmaster.pid for pg_ctl to find: it gets the
    /// SIGQUIT of an immediate shutdown directly. Ok(false): not orphaned.
    async fn stop_orphan(&self) -> anyhow::Result<bool> {
        let Ok(Postmaster::Orphaned(pid)) = self.postmaster() else {
            return Ok(false);
        };
        tracing::warn!(
            "the data directory {} is gone under postmaster PID {pid}: sending it SIGQUIT (immediate shutdown)",
            self.data_dir.display()
        );
        self.signal_postmaster(Signal::SIGQUIT, IMMEDIATE_STOP_WAIT)
            .await?;
        Ok(true)
    }

    /// Sends `signal` to the postmaster itself and waits up to `wait` for
    /// it to exit: no descriptor, no process, so it works when spawning
    /// pg_ctl does not (EMFILE). Ok when no postmaster is alive.
    pub async fn signal_postmaster(&self, signal: Signal, wait: Duration) -> anyhow::Result<()> {
        let Some(pid) = self.postmaster_pid() else {
            return Ok(());
        };
        match kill(Pid::from_raw(pid), signal) {
            Ok(()) => {}
            Err(Errno::ESRCH) => return Ok(()),
            Err(e) => bail!("cannot send {signal} to the postmaster (PID {pid}): {e}"),
        }
        let deadline = tokio::time::Instant::now() + wait;
        while alive(pid) {
            if tokio::time::Instant::now() >= deadline {
                bail!("the postmaster (PID {pid}) still runs {wait:?} after {signal}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(())
    }

    /// Major version of the installed binaries.
    pub async fn binary_major(&self) -> anyhow::Result<u32> {
        let out = run(
            &self.bin_dir,
            "postgres",
            ["--version"],
            self.user,
            &[],
            SHORT,
        )
        .await?;
        // "postgres (PostgreSQL) 15.18 (Debian ...)"
        out.split_whitespace()
            .nth(2)
            .and_then(|v| v.split('.').next())
            .and_then(|m| m.parse().ok())
            .with_context(|| format!("cannot read the version from `postgres --version`: {out}"))
    }

    pub async fn system_identifier(&self) -> anyhow::Result<String> {
        Ok(self.control_data().await?.system_id)
    }

    /// What pg_controldata says about a (typically stopped) data directory.
    pub async fn control_data(&self) -> anyhow::Result<ControlData> {
        let dir = self.data_dir.to_string_lossy().to_string();
        let out = run(
            &self.bin_dir,
            "pg_controldata",
            ["-D", dir.as_str()],
            self.user,
            &[],
            SHORT,
        )
        .await?;
        ControlData::parse(&out).context("cannot understand pg_controldata's output")
    }

    /// Creates the data directory (and its parent) owned by the OS user.
    fn prepare_data_dir(&self) -> anyhow::Result<()> {
        std::fs::create_dir_all(&self.data_dir)
            .with_context(|| format!("cannot create {}", self.data_dir.display()))?;
        std::fs::set_permissions(&self.data_dir, std::fs::Permissions::from_mode(0o700))
            .with_context(|| format!("cannot set permissions of {}", self.data_dir.display()))?;
        if let Some(u) = self.user {
            nix::unistd::chown(
                &self.data_dir,
                Some(nix::unistd::Uid::from_raw(u.uid)),
                Some(nix::unistd::Gid::from_raw(u.gid)),
            )
            .with_context(|| {
                format!(
                    "cannot give {} to the PostgreSQL OS user",
                    self.data_dir.display()
                )
            })?;
        }
        Ok(())
    }

    /// Removes a half-made data directory so the next attempt starts clean.
    /// `remove_data` off the async runtime: a large data directory takes
    /// long enough to delete to stall the loop (and its renewals).
    pub async fn remove_data_in_background(&self) -> anyhow::Result<()> {
        let me = self.detached();
        tokio::task::spawn_blocking(move || me.remove_data()).await?
    }

    pub fn remove_data(&self) -> anyhow::Result<()> {
        if self.data_dir.exists() {
            for entry in std::fs::read_dir(&self.data_dir)? {
                let path = entry?.path();
                if path.is_dir() {
                    std::fs::remove_dir_all(&path)?;
                } else {
                    std::fs::remove_file(&path)?;
                }
            }
        }
        Ok(())
    }

    pub async fn initdb(&self) -> anyhow::Result<()> {
        self.prepare_data_dir()?;
        let pwfile =
            tempfile::NamedTempFile::new().context("cannot create a password file for initdb")?;
        std::fs::write(pwfile.path(), format!("{}\n", self.superuser.password))?;
        if let Some(u) = self.user {
            nix::unistd::chown(pwfile.path(), Some(nix::unistd::Uid::from_raw(u.uid)), None)?;
        }
        let dir = self.data_dir.to_string_lossy().to_string();
        let pw = format!("--pwfile={}", pwfile.path().display());
        let user = format!("--username={}", self.superuser.username);
        run(
            &self.bin_dir,
            "initdb",
            [
                "-D",
                dir.as_str(),
                "--data-checksums",
                "--auth=scram-sha-256",
                "--auth-local=trust",
                &user,
                &pw,
            ],
            self.user,
            &[],
            Duration::from_secs(300),
        )
        .await?;
        self.ensure_include()?;
        Ok(())
    }

    /// Clones `from` into a directory of our own beside the data
    /// directory and moves it into place only when complete: a failure
    /// removes only what the clone itself created, never a data directory
    /// that was there before.
    pub async fn basebackup(&self, from: &str) -> anyhow::Result<()> {
        let staging = self.clone_staging_dir();
        let into = Instance {
            data_dir: staging.clone(),
            ..self.detached()
        };
        // A staging directory left by an earlier attempt is ours.
        if staging.exists() {
            into.remove_data_in_background().await?;
        }
        into.prepare_data_dir()?;
        if let Err(e) = into.run_basebackup(from).await {
            let _ = into.remove_data_in_background().await;
            let _ = std::fs::remove_dir(&staging);
            return Err(e);
        }
        // Into place: only over a missing or empty data directory.
        if self.data_dir.exists() {
            std::fs::remove_dir(&self.data_dir).with_context(|| {
                format!(
                    "refusing to replace {}: it is not empty (the clone stays in {})",
                    self.data_dir.display(),
                    staging.display()
                )
            })?;
        }
        std::fs::rename(&staging, &self.data_dir).with_context(|| {
            format!(
                "cannot move the clone from {} to {}",
                staging.display(),
                self.data_dir.display()
            )
        })?;
        self.ensure_include()?;
        Ok(())
    }

    /// Where a clone is made before it is moved into place.
    fn clone_staging_dir(&self) -> PathBuf {
        let mut name = self.data_dir.as_os_str().to_os_string();
        name.push(".pgwarden-clone");
        PathBuf::from(name)
    }

    async fn run_basebackup(&self, from: &str) -> anyhow::Result<()> {
        let (host, port) = from.rsplit_once(':').unwrap_or((from, "5432"));
        let dir = self.data_dir.to_string_lossy().to_string();
        let result = run(
            &self.bin_dir,
            "pg_basebackup",
            [
                "-D",
                dir.as_str(),
                "-h",
                host,
                "-p",
                port,
                "-U",
                self.replication.username.as_str(),
                "-X",
                "stream",
                "-c",
                "fast",
                "--no-password",
            ],
            self.user,
            &[
                ("PGPASSWORD", self.replication.password.as_str()),
                ("PGCONNECT_TIMEOUT", "5"),
            ],
            Duration::from_secs(3600),
        )
        .await;
        result?;
        Ok(())
    }

    /// postgresql.conf must include pgwarden's file; a clone inherits the
    /// line from its source, so only add it once.
    fn ensure_include(&self) -> anyhow::Result<()> {
        let path = self.data_dir.join("postgresql.conf");
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        if !text.contains(INCLUDE_LINE) {
            let mut text = text;
            if !text.ends_with('\n') {
                text.push('\n');
            }
            text.push_str(INCLUDE_LINE);
            text.push('\n');
            self.write_owned(&path, &text)?;
        }
        Ok(())
    }

    /// Whether the managed config file differs from what `inputs` render.
    pub fn conf_differs(&self, inputs: &ConfInputs) -> bool {
        let files = render_conf(inputs);
        std::fs::read_to_string(self.data_dir.join(MANAGED_CONF))
            .ok()
            .as_deref()
            != Some(files.managed_conf.as_str())
            || std::fs::read_to_string(self.data_dir.join("pg_hba.conf"))
                .ok()
                .as_deref()
                != Some(files.pg_hba.as_str())
    }

    /// Writes the managed config files for the role in `inputs`. Returns
    /// whether anything changed.
    pub fn write_conf(&self, inputs: &ConfInputs) -> anyhow::Result<bool> {
        let files = render_conf(inputs);
        let mut changed = false;
        changed |= self.write_if_changed(&self.data_dir.join(MANAGED_CONF), &files.managed_conf)?;
        changed |= self.write_if_changed(&self.data_dir.join("pg_hba.conf"), &files.pg_hba)?;
        let signal = self.data_dir.join("standby.signal");
        if files.standby_signal {
            changed |= self.write_if_changed(&signal, "")?;
        } else if signal.exists() {
            std::fs::remove_file(&signal)?;
            changed = true;
        }
        if let Some(text) = &files.sync_conf {
            changed |= self.write_if_changed(&self.data_dir.join(super::conf::SYNC_CONF), text)?;
        }
        let recovery = self.data_dir.join("recovery.conf");
        match &files.recovery_conf {
            Some(text) => changed |= self.write_if_changed(&recovery, text)?,
            None if recovery.exists() => {
                std::fs::remove_file(&recovery)?;
                changed = true;
            }
            None => {}
        }
        Ok(changed)
    }

    /// Synchronous mode: the leader's `synchronous_standby_names`, in the
    /// file pgwarden.conf includes last (a reload applies it).
    pub fn set_sync_standbys(&self, value: &str) -> anyhow::Result<()> {
        let text = super::conf::sync_conf_text(value);
        self.write_if_changed(&self.data_dir.join(super::conf::SYNC_CONF), &text)?;
        Ok(())
    }

    fn write_if_changed(&self, path: &Path, text: &str) -> anyhow::Result<bool> {
        if std::fs::read_to_string(path).ok().as_deref() == Some(text) {
            return Ok(false);
        }
        self.write_owned(path, text)?;
        Ok(true)
    }

    fn write_owned(&self, path: &Path, text: &str) -> anyhow::Result<()> {
        let tmp = path.with_extension("pgwarden-tmp");
        std::fs::write(&tmp, text).with_context(|| format!("cannot write {}", tmp.display()))?;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))?;
        if let Some(u) = self.user {
            nix::unistd::chown(
                &tmp,
                Some(nix::unistd::Uid::from_raw(u.uid)),
                Some(nix::unistd::Gid::from_raw(u.gid)),
            )?;
        }
        std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))?;
        Ok(())
    }

    pub async fn start(&mut self) -> anyhow::Result<()> {
        self.client = None;
        let dir = self.data_dir.to_string_lossy().to_string();
        let log = self
            .data_dir
            .join("pg_ctl.log")
            .to_string_lossy()
            .to_string();
        let secs = self.start_timeout.as_secs().max(1).to_string();
        let mark = self.server_log_end();
        run(
            &self.bin_dir,
            "pg_ctl",
            [
                "start",
                "-D",
                dir.as_str(),
                "-w",
                "-t",
                secs.as_str(),
                "-l",
                log.as_str(),
            ],
            self.user,
            &[],
            self.start_timeout + Duration::from_secs(5),
        )
        .await
        .map_err(|e| self.with_log_tail(e, mark))?;
        // Remembered now, for a fence that may come when the file can no
        // longer be read.
        let _ = self.postmaster_pid();
        Ok(())
    }

    /// pg_ctl's own log holds what the postmaster said before its logging
    /// collector took over (a port in use); the server log the rest (a
    /// PANIC in recovery).
    fn with_log_tail(&self, e: PgCommandError, mark: Option<(PathBuf, u64)>) -> anyhow::Error {
        let log = std::fs::read_to_string(self.data_dir.join("pg_ctl.log")).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(3).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        match self.server_log_problems(mark).as_slice() {
            [] => anyhow::anyhow!("{e}; log: {}", tail.join(" | ")),
            lines => anyhow::anyhow!(
                "{e}; log: {}; server log: {}",
                tail.join(" | "),
                lines.join(" | ")
            ),
        }
    }

    /// Fast shutdown: disconnects clients, writes a shutdown checkpoint.
    pub async fn stop(&mut self) -> anyhow::Result<()> {
        self.client = None;
        if self.postmaster_pid().is_none() || self.stop_orphan().await? {
            return Ok(());
        }
        let dir = self.data_dir.to_string_lossy().to_string();
        let stopped = run(
            &self.bin_dir,
            "pg_ctl",
            ["stop", "-D", dir.as_str(), "-m", "fast", "-w", "-t", "60"],
            self.user,
            &[],
            FAST_STOP_WAIT + Duration::from_secs(5),
        )
        .await;
        match stopped {
            Ok(_) => Ok(()),
            Err(e) if signal_instead(&e) => {
                tracing::warn!("{e}: sending SIGINT (fast shutdown) to the postmaster itself");
                self.signal_postmaster(Signal::SIGINT, FAST_STOP_WAIT)
                    .await
                    .with_context(|| e.to_string())
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Rewinds this (stopped) data directory to the source's timeline. On
    /// PostgreSQL 13+ pg_rewind first runs crash recovery itself when the
    /// target was not shut down cleanly.
    pub async fn rewind(&self, source: &str) -> anyhow::Result<()> {
        let (host, port) = source.rsplit_once(':').unwrap_or((source, "5432"));
        // A just-promoted source records its new timeline in pg_control
        // only at its next checkpoint; before that pg_rewind sees one
        // timeline and wrongly concludes no rewind is required.
        let remote = format!(
            "host='{}' port={} user='{}' password='{}' dbname=postgres connect_timeout=5 application_name=pgwarden-rewind",
            host,
            port,
            conninfo_escape(&self.superuser.username),
            conninfo_escape(&self.superuser.password),
        );
        let client = tokio::time::timeout(Duration::from_secs(10), observe::connect(&remote))
            .await
            .context("connecting to the rewind source timed out")?
            .context("cannot connect to the rewind source")?;
        tokio::time::timeout(Duration::from_secs(300), client.batch_execute("CHECKPOINT"))
            .await
            .context("CHECKPOINT on the rewind source timed out")?
            .context("CHECKPOINT on the rewind source failed")?;
        drop(client);
        let dir = self.data_dir.to_string_lossy().to_string();
        let conninfo = format!(
            "host='{}' port={} user='{}' dbname=postgres connect_timeout=5",
            host,
            port,
            self.superuser
                .username
                .replace('\\', "\\\\")
                .replace('\'', "\\'"),
        );
        let target = format!("--target-pgdata={dir}");
        let src = format!("--source-server={conninfo}");
        run(
            &self.bin_dir,
            "pg_rewind",
            [target.as_str(), src.as_str()],
            self.user,
            &[("PGPASSWORD", self.superuser.password.as_str())],
            Duration::from_secs(3600),
        )
        .await?;
        Ok(())
    }

    /// How far another instance (a switchover candidate) has received WAL,
    /// asked over SQL so the answer is fresh rather than a loop old.
    pub async fn remote_receive_lsn(&self, address: &str) -> Option<u64> {
        let (host, port) = address.rsplit_once(':')?;
        let conninfo = format!(
            "host='{}' port={} user='{}' password='{}' dbname=postgres connect_timeout=2 application_name=pgwarden",
            host,
            port,
            conninfo_escape(&self.superuser.username),
            conninfo_escape(&self.superuser.password),
        );
        let ask = async {
            let client = observe::connect(&conninfo).await.ok()?;
            let row = client
                .query_one("SELECT pg_last_wal_receive_lsn()::text", &[])
                .await
                .ok()?;
            let lsn: Option<String> = row.try_get(0).ok()?;
            lsn.as_deref().and_then(crate::dcs::parse_lsn)
        };
        tokio::time::timeout(Duration::from_secs(2), ask)
            .await
            .ok()
            .flatten()
    }

    /// Immediate shutdown: no checkpoint, clients cut at once (fencing).
    /// When pg_ctl cannot be run (no descriptor or process left), the
    /// postmaster gets the SIGQUIT pg_ctl would have sent it.
    pub async fn stop_immediate(&mut self) -> anyhow::Result<()> {
        self.client = None;
        if self.stop_orphan().await? {
            return Ok(());
        }
        let dir = self.data_dir.to_string_lossy().to_string();
        let stopped = run(
            &self.bin_dir,
            "pg_ctl",
            [
                "stop",
                "-D",
                dir.as_str(),
                "-m",
                "immediate",
                "-w",
                "-t",
                "10",
            ],
            self.user,
            &[],
            IMMEDIATE_STOP_WAIT + Duration::from_secs(5),
        )
        .await;
        match stopped {
            Ok(_) => Ok(()),
            Err(e) if signal_instead(&e) => {
                tracing::warn!(
                    "{e}: sending SIGQUIT (immediate shutdown) to the postmaster itself"
                );
                self.signal_postmaster(Signal::SIGQUIT, IMMEDIATE_STOP_WAIT)
                    .await
                    .with_context(|| e.to_string())
            }
            Err(e) => Err(e.into()),
        }
    }

    /// pg_ctl promote. When it fails ("server did not promote in time"
    /// says little), what PostgreSQL logged meanwhile names the cause (a
    /// PANIC writing WAL, say).
    pub async fn promote(&mut self) -> anyhow::Result<()> {
        let dir = self.data_dir.to_string_lossy().to_string();
        let mark = self.server_log_end();
        let promoted = run(
            &self.bin_dir,
            "pg_ctl",
            ["promote", "-D", dir.as_str(), "-w", "-t", "60"],
            self.user,
            &[],
            Duration::from_secs(65),
        )
        .await;
        match promoted {
            Ok(_) => Ok(()),
            Err(e) => match self.server_log_problems(mark).as_slice() {
                [] => Err(e.into()),
                lines => Err(anyhow::anyhow!("{e}; server log: {}", lines.join(" | "))),
            },
        }
    }

    /// The newest file of the server log (`log_directory` "log" in the
    /// data directory, as pgwarden configures it) and its length now.
    fn server_log_end(&self) -> Option<(PathBuf, u64)> {
        let newest = std::fs::read_dir(self.data_dir.join("log"))
            .ok()?
            .flatten()
            .filter_map(|e| Some((e.metadata().ok()?, e.path())))
            .filter(|(m, _)| m.is_file())
            .max_by_key(|(m, _)| m.modified().ok())?;
        Some((newest.1, newest.0.len()))
    }

    /// The last PANIC, FATAL or ERROR lines the server logged since `mark`
    /// (at most 3; read from the last 64 KiB at most). Best effort: on a
    /// full disk the log may not have been written at all.
    fn server_log_problems(&self, mark: Option<(PathBuf, u64)>) -> Vec<String> {
        use std::io::{Read, Seek, SeekFrom};
        const NOISE: [&str; 3] = [
            "the database system is starting up",
            "the database system is in recovery mode",
            "the database system is shutting down",
        ];
        let Some((path, len)) = self.server_log_end() else {
            return Vec::new();
        };
        let from = match mark {
            Some((p, at)) if p == path && at <= len => at,
            // Rotated (or no log before): the new file is all new.
            _ => 0,
        };
        let from = from.max(len.saturating_sub(64 * 1024));
        let mut bytes = Vec::new();
        let read = std::fs::File::open(&path).and_then(|mut f| {
            f.seek(SeekFrom::Start(from))?;
            f.take(64 * 1024).read_to_end(&mut bytes)
        });
        if read.is_err() {
            return Vec::new();
        }
        // A start in the middle of a character is no reason to say nothing.
        let text = String::from_utf8_lossy(&bytes);
        let mut lines: Vec<String> = text
            .lines()
            .filter(|l| ["PANIC:", "FATAL:", "ERROR:"].iter().any(|s| l.contains(s)))
            .filter(|l| !NOISE.iter().any(|n| l.contains(n)))
            .map(|l| l.trim().to_string())
            .collect();
        lines.drain(..lines.len().saturating_sub(3));
        lines
    }

    pub async fn reload(&mut self) -> anyhow::Result<()> {
        let dir = self.data_dir.to_string_lossy().to_string();
        run(
            &self.bin_dir,
            "pg_ctl",
            ["reload", "-D", dir.as_str()],
            self.user,
            &[],
            SHORT,
        )
        .await?;
        Ok(())
    }

    fn conninfo(&self) -> String {
        let host = if self.listen.ip().is_unspecified() {
            "127.0.0.1".to_string()
        } else {
            self.listen.ip().to_string()
        };
        format!(
            "host='{}' port={} user='{}' password='{}' dbname=postgres connect_timeout=2 application_name=pgwarden",
            host,
            self.listen.port(),
            self.superuser.username.replace('\\', "\\\\").replace('\'', "\\'"),
            self.superuser.password.replace('\\', "\\\\").replace('\'', "\\'"),
        )
    }

    async fn client(&mut self) -> anyhow::Result<&Client> {
        if self.client.as_ref().is_some_and(|c| c.is_closed()) {
            self.client = None;
        }
        if self.client.is_none() {
            let c =
                tokio::time::timeout(Duration::from_secs(3), observe::connect(&self.conninfo()))
                    .await
                    .context("connecting to PostgreSQL timed out")??;
            self.client = Some(c);
        }
        match self.client.as_ref() {
            Some(c) => Ok(c),
            None => bail!("no PostgreSQL connection"),
        }
    }

    /// One SQL probe of the running instance.
    pub async fn observe(&mut self) -> anyhow::Result<Observed> {
        let result = async {
            let client = self.client().await?;
            let obs = tokio::time::timeout(Duration::from_secs(3), observe::probe(client))
                .await
                .context("PostgreSQL did not answer the status query in time")??;
            anyhow::Ok(obs)
        }
        .await;
        if result.is_err() {
            self.client = None;
        }
        result
    }

    pub async fn execute(&mut self, sql: &str) -> anyhow::Result<()> {
        let client = self.client().await?;
        tokio::time::timeout(Duration::from_secs(10), client.batch_execute(sql))
            .await
            .context("PostgreSQL did not answer in time")??;
        Ok(())
    }

    pub async fn create_replication_user(&mut self) -> anyhow::Result<()> {
        // At bootstrap no standby exists yet: in synchronous mode a commit
        // waiting for one would never return (nothing is acknowledged to
        // clients here; replicas get the role with their base backup).
        let sql = format!(
            "DO $pgw$ BEGIN
               PERFORM set_config('synchronous_commit', 'local', true);
               IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = {name_lit}) THEN
                 CREATE ROLE {name_ident} WITH REPLICATION LOGIN PASSWORD {pw};
               ELSE
                 ALTER ROLE {name_ident} WITH REPLICATION LOGIN PASSWORD {pw};
               END IF;
             END $pgw$",
            name_lit = quote_literal(&self.replication.username),
            name_ident = quote_ident(&self.replication.username),
            pw = quote_literal(&self.replication.password),
        );
        self.execute(&sql).await
    }

    pub async fn create_slots(&mut self, slots: &[String]) -> anyhow::Result<()> {
        for s in slots {
            let sql = format!(
                "SELECT pg_create_physical_replication_slot({lit}) WHERE NOT EXISTS (SELECT FROM pg_replication_slots WHERE slot_name = {lit})",
                lit = quote_literal(s)
            );
            self.execute(&sql)
                .await
                .with_context(|| format!("creating slot {s}"))?;
        }
        Ok(())
    }

    pub async fn drop_slots(&mut self, slots: &[String]) -> anyhow::Result<()> {
        for s in slots {
            let sql = format!(
                "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = {} AND NOT active",
                quote_literal(s)
            );
            self.execute(&sql)
                .await
                .with_context(|| format!("dropping slot {s}"))?;
        }
        Ok(())
    }
}

/// The parts of pg_controldata's output pgwarden decides on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControlData {
    pub system_id: String,
    /// "in production", "shut down", "shut down in recovery", …
    pub state: String,
    pub timeline: u32,
    pub checkpoint_lsn: u64,
}

impl ControlData {
    pub fn parse(out: &str) -> Option<ControlData> {
        let field = |name: &str| {
            out.lines()
                .find_map(|l| l.strip_prefix(name))
                .map(|v| v.trim().to_string())
        };
        Some(ControlData {
            system_id: field("Database system identifier:")?,
            state: field("Database cluster state:")?,
            timeline: field("Latest checkpoint's TimeLineID:")?.parse().ok()?,
            checkpoint_lsn: crate::dcs::parse_lsn(&field("Latest checkpoint location:")?)?,
        })
    }

    /// The data directory was last a primary (not a standby in recovery).
    /// A primary that crashed and whose crash recovery failed too (a full
    /// disk) says "in crash recovery": a standby in recovery says "in
    /// archive recovery", or "shut down in recovery" once stopped.
    pub fn was_primary(&self) -> bool {
        matches!(
            self.state.as_str(),
            "in production" | "shut down" | "shutting down" | "in crash recovery"
        )
    }
}

/// The PID on postmaster.pid's first line. A standalone backend writes
/// its PID negated; 0, 1 and our own PID are never a postmaster's, and
/// signalling them would hit the wrong processes (0: our process group).
fn parse_postmaster_pid(text: &str) -> Option<i32> {
    let pid: i32 = text.lines().next()?.trim().parse().ok()?;
    let ours = i32::try_from(std::process::id()).ok();
    (pid > 1 && Some(pid) != ours).then_some(pid)
}

fn alive(pid: i32) -> bool {
    kill(Pid::from_raw(pid), None).is_ok()
}

// fsblkcnt_t and c_ulong are u64 on 64-bit targets only.
#[allow(clippy::useless_conversion)]
fn available(path: &Path) -> nix::Result<u64> {
    let st = nix::sys::statvfs::statvfs(path)?;
    Ok(u64::from(st.blocks_available()).saturating_mul(u64::from(st.fragment_size())))
}

fn identity(path: &Path) -> std::io::Result<(u64, u64)> {
    std::fs::metadata(path).map(|m| (m.dev(), m.ino()))
}

/// (device, inode) of a process's working directory; /proc resolves it
/// even after the directory was deleted.
fn cwd_identity(pid: i32) -> std::io::Result<(u64, u64)> {
    identity(Path::new(&format!("/proc/{pid}/cwd")))
}

/// Whether a failed pg_ctl stop leaves signalling the postmaster to us:
/// when pg_ctl could not be started (EMFILE, EAGAIN, ENOMEM) or hung, it
/// may never have sent its signal; when it ran and reported a failure, it
/// did, and sending the same signal again would change nothing.
fn signal_instead(e: &PgCommandError) -> bool {
    match e {
        PgCommandError::Spawn { .. } | PgCommandError::Timeout { .. } => true,
        PgCommandError::Failed { .. } => false,
    }
}

fn conninfo_escape(s: &str) -> String {
    s.replace('\\', "\\\\").replace('\'', "\\'")
}

fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

impl Instance {
    /// A handle for a background job: same instance, its own connection.
    pub fn detached(&self) -> Instance {
        Instance {
            bin_dir: self.bin_dir.clone(),
            data_dir: self.data_dir.clone(),
            listen: self.listen,
            user: self.user,
            superuser: self.superuser.clone(),
            replication: self.replication.clone(),
            start_timeout: self.start_timeout,
            client: None,
            postmaster: self.postmaster.clone(),
        }
    }

    /// Forget the cached connection (after a restart, say).
    pub fn disconnect(&mut self) {
        self.client = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::{Child, Command};

    fn instance(data_dir: &Path, bin_dir: &Path) -> Instance {
        let creds = Credentials {
            username: "postgres".into(),
            password: "pw".into(),
        };
        Instance::new(
            bin_dir.to_path_buf(),
            data_dir.to_path_buf(),
            "127.0.0.1:5432".parse().expect("address"),
            None,
            creds.clone(),
            creds,
            Duration::from_secs(5),
        )
    }

    /// `sleep 60` with SIGINT and SIGQUIT at their defaults: a test run in
    /// the background of a non-interactive shell (`cmd &`) inherits them
    /// ignored, and the stand-in would then outlive the signals under test.
    fn sleeper() -> Command {
        use std::os::unix::process::CommandExt;
        let mut cmd = Command::new("sleep");
        cmd.arg("60");
        // SAFETY: only async-signal-safe calls (sigaction) between fork and
        // exec.
        unsafe {
            cmd.pre_exec(|| {
                use nix::sys::signal::{signal, SigHandler, Signal};
                for sig in [Signal::SIGINT, Signal::SIGQUIT] {
                    signal(sig, SigHandler::SigDfl).map_err(std::io::Error::from)?;
                }
                Ok(())
            });
        }
        cmd
    }

    /// A process standing in for the postmaster, and a thread that reaps
    /// it when it dies (it is our child: unreaped, it would look alive).
    fn stand_in() -> (i32, std::thread::JoinHandle<std::process::ExitStatus>) {
        let mut child: Child = sleeper().spawn().expect("sleep");
        let pid = i32::try_from(child.id()).expect("pid");
        (pid, std::thread::spawn(move || child.wait().expect("wait")))
    }

    #[test]
    fn the_pid_is_the_first_line_and_never_a_dangerous_one() {
        assert_eq!(
            parse_postmaster_pid("4242\n/var/lib/pg\n1700000000\n5432\n"),
            Some(4242)
        );
        assert_eq!(parse_postmaster_pid("  4242  \n"), Some(4242));
        assert_eq!(parse_postmaster_pid("4242"), Some(4242));
        // A standalone backend, nothing, garbage.
        assert_eq!(parse_postmaster_pid("-4242\n"), None);
        assert_eq!(parse_postmaster_pid(""), None);
        assert_eq!(parse_postmaster_pid("\n4242\n"), None);
        assert_eq!(parse_postmaster_pid("pid\n"), None);
        assert_eq!(parse_postmaster_pid("99999999999\n"), None);
        // kill(0) is our process group, kill(1) init, and we are not it.
        assert_eq!(parse_postmaster_pid("0\n"), None);
        assert_eq!(parse_postmaster_pid("1\n"), None);
        let ours = std::process::id().to_string();
        assert_eq!(parse_postmaster_pid(&ours), None);
    }

    #[test]
    fn a_primary_whose_crash_recovery_failed_was_a_primary() {
        let state = |s: &str| ControlData {
            system_id: "1".into(),
            state: s.to_string(),
            timeline: 1,
            checkpoint_lsn: 0,
        };
        for primary in [
            "in production",
            "shut down",
            "shutting down",
            "in crash recovery",
        ] {
            assert!(state(primary).was_primary(), "{primary}");
        }
        for standby in ["in archive recovery", "shut down in recovery"] {
            assert!(!state(standby).was_primary(), "{standby}");
        }
    }

    #[test]
    fn only_a_pg_ctl_that_never_ran_or_hung_is_replaced_by_a_signal() {
        let emfile = PgCommandError::Spawn {
            program: "pg_ctl".into(),
            error: std::io::Error::from_raw_os_error(libc::EMFILE),
        };
        assert!(signal_instead(&emfile));
        assert!(signal_instead(&PgCommandError::Timeout {
            program: "pg_ctl".into(),
            timeout: Duration::from_secs(15),
        }));
        assert!(!signal_instead(&PgCommandError::Failed {
            program: "pg_ctl".into(),
            status: "exit status: 1".into(),
            output: "pg_ctl: server does not shut down".into(),
        }));
    }

    #[test]
    fn the_pid_is_remembered_for_when_the_file_cannot_be_read() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pg = instance(dir.path(), Path::new("/nonexistent"));
        let fence = pg.detached();
        let file = dir.path().join("postmaster.pid");
        let (pid, reaper) = stand_in();
        std::fs::write(&file, format!("{pid}\n{}\n", dir.path().display())).expect("write");
        assert_eq!(pg.postmaster_pid(), Some(pid));
        // Unreadable (a directory in its place reads as EISDIR, as EMFILE
        // would fail the open): the PID read before answers, in every
        // handle.
        std::fs::remove_file(&file).expect("rm");
        std::fs::create_dir(&file).expect("mkdir");
        assert_eq!(fence.postmaster_pid(), Some(pid));
        assert_eq!(pg.postmaster_pid(), Some(pid));
        // Gone: absent is absent, and forgotten.
        std::fs::remove_dir(&file).expect("rmdir");
        assert_eq!(pg.postmaster_pid(), None);
        std::fs::create_dir(&file).expect("mkdir");
        assert_eq!(fence.postmaster_pid(), None);
        // A dead process is not remembered as alive either.
        std::fs::remove_dir(&file).expect("rmdir");
        std::fs::write(&file, format!("{pid}\n")).expect("write");
        assert_eq!(pg.postmaster_pid(), Some(pid));
        kill(Pid::from_raw(pid), Signal::SIGKILL).expect("kill");
        reaper.join().expect("reaped");
        std::fs::remove_file(&file).expect("rm");
        std::fs::create_dir(&file).expect("mkdir");
        assert_eq!(fence.postmaster_pid(), None);
    }

    #[tokio::test]
    async fn stop_immediate_sends_sigquit_itself_when_pg_ctl_cannot_run() {
        let dir = tempfile::tempdir().expect("tempdir");
        // No pg_ctl there: spawning it fails, as it does with EMFILE.
        let pg = instance(dir.path(), Path::new("/nonexistent"));
        let mut fence = pg.detached();
        let file = dir.path().join("postmaster.pid");
        let (pid, reaper) = stand_in();
        std::fs::write(&file, format!("{pid}\n")).expect("write");
        assert_eq!(pg.postmaster_pid(), Some(pid));
        std::fs::remove_file(&file).expect("rm");
        std::fs::create_dir(&file).expect("mkdir");
        fence.stop_immediate().await.expect("stopped by signal");
        let status = reaper.join().expect("reaped");
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(status.signal(), Some(libc::SIGQUIT));
        // Nothing left to stop: still Ok.
        fence.stop_immediate().await.expect("nothing to stop");
    }

    #[tokio::test]
    async fn a_postmaster_whose_data_directory_is_deleted_is_orphaned_and_stopped_by_signal() {
        let parent = tempfile::tempdir().expect("tempdir");
        let data = parent.path().join("data");
        std::fs::create_dir(&data).expect("mkdir");
        let pg = instance(&data, Path::new("/nonexistent"));
        // A stand-in working in the data directory, as a postmaster does.
        let mut child = sleeper().current_dir(&data).spawn().expect("sleep");
        let pid = i32::try_from(child.id()).expect("pid");
        let reaper = std::thread::spawn(move || child.wait().expect("wait"));
        std::fs::write(data.join("postmaster.pid"), format!("{pid}\n")).expect("write");
        assert_eq!(pg.postmaster().expect("read"), Postmaster::Running(pid));

        std::fs::remove_dir_all(&data).expect("rm -r");
        assert_eq!(pg.postmaster().expect("read"), Postmaster::Orphaned(pid));
        // A new directory in its place (a clone moved in) changes nothing.
        std::fs::create_dir(&data).expect("mkdir");
        assert_eq!(pg.postmaster().expect("read"), Postmaster::Orphaned(pid));
        assert_eq!(pg.detached().postmaster_pid(), Some(pid));

        // No postmaster.pid for pg_ctl: the signal goes to the PID itself.
        pg.detached()
            .stop_immediate()
            .await
            .expect("stopped by signal");
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(reaper.join().expect("reaped").signal(), Some(libc::SIGQUIT));
        assert_eq!(pg.postmaster().expect("read"), Postmaster::None);
    }

    #[test]
    fn the_cause_is_what_the_server_logged_since_the_mark() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pg = instance(dir.path(), Path::new("/nonexistent"));
        assert_eq!(pg.server_log_end(), None);
        std::fs::create_dir(dir.path().join("log")).expect("mkdir");
        let log = dir.path().join("log/postgresql-Mon.log");
        std::fs::write(&log, "[1] PANIC:  an old one\n").expect("write");
        let mark = pg.server_log_end();
        assert!(pg.server_log_problems(mark.clone()).is_empty());
        let mut text = std::fs::read_to_string(&log).expect("read");
        text.push_str("[2] LOG:  starting\n[3] FATAL:  the database system is starting up\n");
        text.push_str(
            "[4] PANIC:  could not write to file \"pg_wal/xlogtemp.4\": No space left on device\n",
        );
        std::fs::write(&log, text).expect("write");
        assert_eq!(
            pg.server_log_problems(mark),
            vec!["[4] PANIC:  could not write to file \"pg_wal/xlogtemp.4\": No space left on device"]
        );
    }

    #[test]
    fn a_process_elsewhere_is_no_orphan_when_postmaster_pid_goes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pg = instance(dir.path(), Path::new("/nonexistent"));
        // Working in another directory: not a postmaster of this one.
        let (pid, reaper) = stand_in();
        let file = dir.path().join("postmaster.pid");
        std::fs::write(&file, format!("{pid}\n")).expect("write");
        assert_eq!(pg.postmaster().expect("read"), Postmaster::Running(pid));
        std::fs::remove_file(&file).expect("rm");
        assert_eq!(pg.postmaster().expect("read"), Postmaster::None);
        kill(Pid::from_raw(pid), Signal::SIGKILL).expect("kill");
        reaper.join().expect("reaped");
    }

    #[tokio::test]
    async fn stop_falls_back_to_sigint() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut pg = instance(dir.path(), Path::new("/nonexistent"));
        let (pid, reaper) = stand_in();
        std::fs::write(dir.path().join("postmaster.pid"), format!("{pid}\n")).expect("write");
        pg.stop().await.expect("stopped by signal");
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(reaper.join().expect("reaped").signal(), Some(libc::SIGINT));
    }
}
