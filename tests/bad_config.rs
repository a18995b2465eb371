//! A bad config file makes the real `pgwarden agent` binary exit non-zero
//! with exactly one stderr line naming the key, before it writes anything to
//! disk or etcd (docs/configuration.md, "Errors" and "Rules checked at
//! startup"). Every row runs against a real etcd; one positive control row
//! proves the harness would notice a binary that rejects everything.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::net::TcpListener;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime};
use support::cluster::{as_postgres, pg_bin_dir, set_mode};
use support::procs::{wait_port, Etcd};
use support::{free_port, is_root, pgwarden_bin, temp_dir};

/// A rejected config must make the agent exit within this time.
const EXIT_WITHIN: Duration = Duration::from_secs(15);
/// The positive control's API must answer within this time.
const API_WITHIN: Duration = Duration::from_secs(20);
/// The system identifier the test puts into etcd for the foreign data dir.
const FOREIGN_ID: &str = "1234567890";

/// Everything one row's config and expected line are made from. Each row has
/// its own directory, scope and ports.
struct Ctx {
    /// The row's directory; also the agent's working directory.
    dir: PathBuf,
    /// The config file the agent is started with.
    config: PathBuf,
    scope: String,
    etcd: String,
    api_port: u16,
    pg_port: u16,
    /// The configured data directory (`<dir>/data`).
    data_dir: PathBuf,
    bin_dir: PathBuf,
    /// The real system identifier of a data directory made by the setup.
    system_id: Option<String>,
}

impl Ctx {
    /// The one line a `key` error prints.
    fn line(&self, key: &str, message: &str) -> String {
        format!(
            "pgwarden: config error: {}: key `{key}`: {message}",
            self.config.display()
        )
    }

    /// The one line a TOML syntax error prints.
    fn syntax_line(&self, line: usize, column: usize, message: &str) -> String {
        format!(
            "pgwarden: config error: {}: line {line}, column {column}: {message}",
            self.config.display()
        )
    }

    /// A valid config: the positive control starts with it.
    fn base(&self) -> String {
        format!(
            r#"scope = "{scope}"
name = "pg1"

[etcd]
endpoints = ["{etcd}"]

[api]
listen = "127.0.0.1:{api_port}"

[postgresql]
data_dir = "{data_dir}"
bin_dir = "{bin_dir}"
listen = "127.0.0.1:{pg_port}"

[postgresql.authentication.superuser]
username = "postgres"
password = "super-pw"

[postgresql.authentication.replication]
username = "replicator"
password = "repl-pw"

[tags]
nofailover = false

[bootstrap.dcs]
ttl = 10
loop_wait = 1
retry_timeout = 4
"#,
            scope = self.scope,
            etcd = self.etcd,
            api_port = self.api_port,
            data_dir = self.data_dir.display(),
            bin_dir = self.bin_dir.display(),
            pg_port = self.pg_port,
        )
    }

    /// The base config with `from` (which must occur exactly once) replaced.
    fn edit(&self, from: &str, to: &str) -> String {
        let base = self.base();
        assert_eq!(
            base.matches(from).count(),
            1,
            "row edit: `{from}` must occur exactly once in the base config"
        );
        base.replacen(from, to, 1)
    }

    fn prefix(&self) -> String {
        format!("/service/{}/", self.scope)
    }
}

/// What a row needs in place before the agent runs.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Setup {
    Nothing,
    /// Hold 127.0.0.1:<api_port> for the whole row.
    HoldApiPort,
    /// Hold 127.0.0.1:<pg_port> for the whole row.
    HoldPgPort,
    /// An empty directory `<dir>/emptybin`.
    EmptyDir,
    /// A regular file `<dir>/notadir`.
    PlainFile,
    /// A real data directory made by initdb at `<dir>/data`, and a different
    /// system identifier in etcd's `initialize` key.
    ForeignDataDir,
}

struct Row {
    name: &'static str,
    setup: Setup,
    toml: fn(&Ctx) -> String,
    expected: fn(&Ctx) -> String,
}

fn rows() -> Vec<Row> {
    vec![
        Row {
            name: "unknown top-level key",
            setup: Setup::Nothing,
            toml: |c| format!("colour = \"blue\"\n{}", c.base()),
            expected: |c| {
                c.line(
                    "colour",
                    "unknown field `colour`, expected one of `scope`, `name`, `namespace`, \
                     `etcd`, `api`, `postgresql`, `tags`, `bootstrap`",
                )
            },
        },
        Row {
            name: "unknown nested key (typo tags.nofailovr)",
            setup: Setup::Nothing,
            toml: |c| c.edit("nofailover = false", "nofailovr = true"),
            expected: |c| {
                c.line(
                    "tags.nofailovr",
                    "unknown field `nofailovr`, expected one of `nofailover`, `noloadbalance`, \
                     `nosync`, `failover_priority`, `custom`",
                )
            },
        },
        Row {
            name: "unknown nested key (typo postgresql.datadir)",
            setup: Setup::Nothing,
            toml: |c| c.edit("\ndata_dir = ", "\ndatadir = "),
            expected: |c| {
                c.line(
                    "postgresql.datadir",
                    "unknown field `datadir`, expected one of `data_dir`, `bin_dir`, `listen`, \
                     `connect_address`, `os_user`, `parameters`, `pg_hba`, `authentication`, \
                     `start_timeout`, `remove_data_directory_on_rewind_failure`",
                )
            },
        },
        Row {
            name: "unknown key two levels down (bootstrap.dcs.loop_wiat)",
            setup: Setup::Nothing,
            toml: |c| c.edit("loop_wait = 1", "loop_wiat = 1"),
            expected: |c| {
                c.line(
                    "bootstrap.dcs.loop_wiat",
                    "unknown field `loop_wiat`, expected one of `ttl`, `loop_wait`, \
                     `retry_timeout`, `maximum_lag_on_failover`, `use_slots`, `use_pg_rewind`, \
                     `member_slots_ttl`, `primary_start_timeout`, `synchronous_mode`, \
                     `synchronous_mode_strict`, `synchronous_node_count`, `failsafe_mode`, `pause`, \
                     `postgresql`",
                )
            },
        },
        Row {
            name: "wrong type (ttl as a string)",
            setup: Setup::Nothing,
            toml: |c| c.edit("ttl = 10", "ttl = \"30\""),
            expected: |c| {
                c.line(
                    "bootstrap.dcs.ttl",
                    "invalid type: string \"30\", expected u64",
                )
            },
        },
        Row {
            name: "wrong type (etcd.endpoints as a string)",
            setup: Setup::Nothing,
            toml: |c| {
                c.edit(
                    &format!("endpoints = [\"{}\"]", c.etcd),
                    &format!("endpoints = \"{}\"", c.etcd),
                )
            },
            expected: |c| {
                c.line(
                    "etcd.endpoints",
                    &format!("invalid type: string \"{}\", expected a sequence", c.etcd),
                )
            },
        },
        Row {
            name: "missing required key (api.listen)",
            setup: Setup::Nothing,
            toml: |c| c.edit(&format!("listen = \"127.0.0.1:{}\"\n", c.api_port), ""),
            expected: |c| c.line("api.listen", "required key is missing"),
        },
        Row {
            name: "missing superuser password (key absent)",
            setup: Setup::Nothing,
            toml: |c| c.edit("password = \"super-pw\"\n", ""),
            expected: |c| {
                c.line(
                    "postgresql.authentication.superuser.password",
                    "required key is missing",
                )
            },
        },
        Row {
            name: "empty superuser password",
            setup: Setup::Nothing,
            toml: |c| c.edit("password = \"super-pw\"", "password = \"\""),
            expected: |c| {
                c.line(
                    "postgresql.authentication.superuser.password",
                    "must not be empty",
                )
            },
        },
        Row {
            name: "ttl < loop_wait + 2 * retry_timeout",
            setup: Setup::Nothing,
            toml: |c| {
                c.edit(
                    "ttl = 10\nloop_wait = 1\nretry_timeout = 4",
                    "ttl = 20\nloop_wait = 5\nretry_timeout = 10",
                )
            },
            expected: |c| {
                c.line(
                    "bootstrap.dcs.ttl",
                    "ttl (20) must be >= loop_wait + 2 * retry_timeout (5 + 2 * 10 = 25)",
                )
            },
        },
        Row {
            name: "nonexistent bin_dir",
            setup: Setup::Nothing,
            toml: |c| {
                c.edit(
                    &format!("bin_dir = \"{}\"", c.bin_dir.display()),
                    &format!("bin_dir = \"{}\"", c.dir.join("no-such-bin").display()),
                )
            },
            expected: |c| {
                c.line(
                    "postgresql.bin_dir",
                    &format!(
                        "cannot read {}: No such file or directory (os error 2)",
                        c.dir.join("no-such-bin").display()
                    ),
                )
            },
        },
        Row {
            name: "unreadable bin_dir (a regular file)",
            setup: Setup::PlainFile,
            toml: |c| {
                c.edit(
                    &format!("bin_dir = \"{}\"", c.bin_dir.display()),
                    &format!("bin_dir = \"{}\"", c.dir.join("notadir").display()),
                )
            },
            expected: |c| {
                c.line(
                    "postgresql.bin_dir",
                    &format!(
                        "cannot read {}: Not a directory (os error 20)",
                        c.dir.join("notadir").display()
                    ),
                )
            },
        },
        Row {
            name: "bin_dir without the PostgreSQL programs",
            setup: Setup::EmptyDir,
            toml: |c| {
                c.edit(
                    &format!("bin_dir = \"{}\"", c.bin_dir.display()),
                    &format!("bin_dir = \"{}\"", c.dir.join("emptybin").display()),
                )
            },
            expected: |c| {
                c.line(
                    "postgresql.bin_dir",
                    &format!(
                        "{} has no executable `postgres`",
                        c.dir.join("emptybin").display()
                    ),
                )
            },
        },
        Row {
            name: "api port already in use",
            setup: Setup::HoldApiPort,
            toml: |c| c.base(),
            expected: |c| {
                c.line(
                    "api.listen",
                    &format!("127.0.0.1:{} is already in use", c.api_port),
                )
            },
        },
        Row {
            name: "postgresql port already in use",
            setup: Setup::HoldPgPort,
            toml: |c| c.base(),
            expected: |c| {
                c.line(
                    "postgresql.listen",
                    &format!("127.0.0.1:{} is already in use", c.pg_port),
                )
            },
        },
        Row {
            name: "nonexistent os_user",
            setup: Setup::Nothing,
            toml: |c| {
                let bin = format!("bin_dir = \"{}\"", c.bin_dir.display());
                c.edit(&bin, &format!("{bin}\nos_user = \"pgwarden-no-such-user\""))
            },
            expected: |c| {
                c.line(
                    "postgresql.os_user",
                    "OS user `pgwarden-no-such-user` does not exist",
                )
            },
        },
        Row {
            name: "relative data_dir",
            setup: Setup::Nothing,
            // Relative to the agent's working directory, the row's directory:
            // the same place as the other rows' data_dir, checked the same way.
            toml: |c| {
                c.edit(
                    &format!("data_dir = \"{}\"", c.data_dir.display()),
                    "data_dir = \"data\"",
                )
            },
            expected: |c| c.line("postgresql.data_dir", "must be an absolute path"),
        },
        Row {
            name: "bad etcd endpoint scheme",
            setup: Setup::Nothing,
            toml: |c| {
                let bad = c.etcd.replacen("http://", "etcd://", 1);
                c.edit(&c.etcd, &bad)
            },
            expected: |c| {
                c.line(
                    "etcd.endpoints",
                    &format!(
                        "`{}` must start with http:// or https://",
                        c.etcd.replacen("http://", "etcd://", 1)
                    ),
                )
            },
        },
        Row {
            name: "api.listen with a host name",
            setup: Setup::Nothing,
            toml: |c| {
                c.edit(
                    &format!("listen = \"127.0.0.1:{}\"", c.api_port),
                    &format!("listen = \"localhost:{}\"", c.api_port),
                )
            },
            expected: |c| {
                c.line(
                    "api.listen",
                    "invalid socket address syntax, expected IP:port such as 127.0.0.1:5432 \
                     or [::1]:5432 (not a host name)",
                )
            },
        },
        Row {
            name: "managed PostgreSQL parameter",
            setup: Setup::Nothing,
            toml: |c| format!("{}\n[postgresql.parameters]\nport = 5433\n", c.base()),
            expected: |c| {
                c.line(
                    "postgresql.parameters.port",
                    "is managed by pgwarden and cannot be set here",
                )
            },
        },
        Row {
            name: "not TOML (key defined twice)",
            setup: Setup::Nothing,
            toml: |c| c.edit("name = \"pg1\"\n", "name = \"pg1\"\nscope = \"again\"\n"),
            expected: |c| c.syntax_line(3, 1, "duplicate key `scope` in document root"),
        },
        Row {
            name: "data directory of another cluster",
            setup: Setup::ForeignDataDir,
            toml: |c| c.base(),
            expected: |c| {
                c.line(
                    "postgresql.data_dir",
                    &format!(
                        "{} belongs to another cluster: its system identifier is {}, \
                         cluster `{}` in etcd has {FOREIGN_ID}",
                        c.data_dir.display(),
                        c.system_id.as_deref().expect("system id from the setup"),
                        c.scope
                    ),
                )
            },
        },
    ]
}

/// Kills (and reaps) an agent that is still running when dropped, so no
/// process outlives a failing test.
struct Agent(Child);

impl Drop for Agent {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
        }
        let _ = self.0.wait();
    }
}

/// Starts `pgwarden agent -c <config>` in `cwd`, stdout and stderr to files.
fn spawn_agent(config: &Path, cwd: &Path, out: &Path, err: &Path) -> Agent {
    let child = Command::new(pgwarden_bin())
        .arg("agent")
        .arg("-c")
        .arg(config)
        .current_dir(cwd)
        .env_remove("PGWARDEN_CONFIG")
        .env_remove("PGWARDEN_LOG")
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(out).expect("stdout file"))
        .stderr(std::fs::File::create(err).expect("stderr file"))
        .spawn()
        .expect("start pgwarden agent");
    Agent(child)
}

/// Waits for the agent to exit; kills it after `within`. None on timeout.
async fn wait_exit(agent: &mut Agent, within: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + within;
    loop {
        if let Some(status) = agent.0.try_wait().expect("try_wait") {
            return Some(status);
        }
        if Instant::now() > deadline {
            let _ = agent.0.kill();
            let _ = agent.0.wait();
            return None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Every entry under `dir`: relative path → (kind and mode, size, mtime).
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, (u32, u64, SystemTime)> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<PathBuf, (u32, u64, SystemTime)>) {
        for entry in std::fs::read_dir(dir).expect("read_dir").flatten() {
            let path = entry.path();
            let meta = std::fs::symlink_metadata(&path).expect("metadata");
            let rel = path.strip_prefix(root).expect("under root").to_path_buf();
            out.insert(
                rel,
                (meta.mode(), meta.len(), meta.modified().expect("mtime")),
            );
            if meta.is_dir() {
                walk(root, &path, out);
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

fn postgres_user() -> nix::unistd::User {
    nix::unistd::User::from_name("postgres")
        .ok()
        .flatten()
        .expect("the postgres OS user exists")
}

/// `initdb` into `data_dir` (owned by postgres); returns the new cluster's
/// system identifier as `pg_controldata` prints it.
fn make_data_dir(data_dir: &Path) -> String {
    std::fs::create_dir(data_dir).expect("create data dir");
    let pg = postgres_user();
    nix::unistd::chown(data_dir, Some(pg.uid), Some(pg.gid)).expect("chown data dir");
    set_mode(data_dir, 0o700);
    let mut initdb = Command::new(pg_bin_dir().join("initdb"));
    initdb
        .arg("-D")
        .arg(data_dir)
        .args(["-U", "postgres", "-A", "trust", "--no-sync", "--locale=C"])
        .env("LC_ALL", "C");
    as_postgres(&mut initdb);
    let out = initdb.output().expect("run initdb");
    assert!(
        out.status.success(),
        "initdb failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let mut controldata = Command::new(pg_bin_dir().join("pg_controldata"));
    controldata.arg("-D").arg(data_dir).env("LC_ALL", "C");
    as_postgres(&mut controldata);
    let out = controldata.output().expect("run pg_controldata");
    assert!(out.status.success(), "pg_controldata failed");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("Database system identifier:"))
        .map(|v| v.trim().to_string())
        .expect("pg_controldata prints the system identifier")
}

fn new_ctx(root: &Path, label: &str, etcd: &Etcd) -> Ctx {
    let dir = root.join(label);
    std::fs::create_dir(&dir).expect("row dir");
    set_mode(&dir, 0o755);
    Ctx {
        config: dir.join("pgwarden.toml"),
        data_dir: dir.join("data"),
        scope: label.to_string(),
        etcd: etcd.endpoint(),
        api_port: free_port(),
        pg_port: free_port(),
        bin_dir: pg_bin_dir(),
        system_id: None,
        dir,
    }
}

/// Runs one bad-config row; returns its failures (empty when it passed).
async fn run_row(row: &Row, ctx: &mut Ctx, etcd: &Etcd, logs: &Path) -> Vec<String> {
    let mut failures = Vec::new();
    let mut held: Option<TcpListener> = None;
    let mut put_keys: BTreeMap<String, String> = BTreeMap::new();
    match row.setup {
        Setup::Nothing => {}
        Setup::HoldApiPort => {
            held = Some(TcpListener::bind(("127.0.0.1", ctx.api_port)).expect("hold api port"))
        }
        Setup::HoldPgPort => {
            held = Some(TcpListener::bind(("127.0.0.1", ctx.pg_port)).expect("hold pg port"))
        }
        Setup::EmptyDir => std::fs::create_dir(ctx.dir.join("emptybin")).expect("empty dir"),
        Setup::PlainFile => std::fs::write(ctx.dir.join("notadir"), "x").expect("plain file"),
        Setup::ForeignDataDir => {
            ctx.system_id = Some(make_data_dir(&ctx.data_dir));
            let key = format!("{}initialize", ctx.prefix());
            etcd.put(&key, FOREIGN_ID).await;
            put_keys.insert(key, FOREIGN_ID.to_string());
        }
    }
    let premade = row.setup == Setup::ForeignDataDir;
    let data_before = premade.then(|| snapshot(&ctx.data_dir));
    if let Some(before) = &data_before {
        for f in ["pgwarden.conf", "postmaster.pid"] {
            assert!(
                !before.contains_key(Path::new(f)),
                "setup: initdb made {f}?"
            );
        }
    }

    std::fs::write(&ctx.config, (row.toml)(ctx)).expect("write config");
    let expected = (row.expected)(ctx);
    let dir_before = snapshot(&ctx.dir);

    let out = logs.join(format!("{}.stdout", ctx.scope));
    let err = logs.join(format!("{}.stderr", ctx.scope));
    let started = Instant::now();
    let mut agent = spawn_agent(&ctx.config, &ctx.dir, &out, &err);
    let status = wait_exit(&mut agent, EXIT_WITHIN).await;
    let took = started.elapsed();
    drop(agent);
    drop(held);
    let stderr = std::fs::read_to_string(&err).unwrap_or_default();
    let stdout = std::fs::read_to_string(&out).unwrap_or_default();

    match status {
        None => failures.push(format!("did not exit within {EXIT_WITHIN:?} (killed)")),
        Some(s) if s.success() => failures.push(format!("exited successfully ({s})")),
        Some(_) => {}
    }
    if stderr.trim() != expected {
        failures.push(format!(
            "stderr is not the expected line\n    expected: {expected}\n    stderr:   {}",
            stderr.trim().replace('\n', "\n              ")
        ));
    }
    // Nothing on disk: the row's directory is as the test left it, and in
    // particular the configured data directory was not created (or, when
    // the test made one, is unchanged).
    let dir_after = snapshot(&ctx.dir);
    match &data_before {
        None => {
            if ctx.data_dir.exists() {
                failures.push(format!(
                    "the data directory {} was created",
                    ctx.data_dir.display()
                ));
            }
            if dir_after != dir_before {
                failures.push(format!(
                    "the row directory changed: before {:?}, after {:?}",
                    dir_before.keys().collect::<Vec<_>>(),
                    dir_after.keys().collect::<Vec<_>>()
                ));
            }
        }
        Some(before) => {
            let after = snapshot(&ctx.data_dir);
            for f in ["pgwarden.conf", "postmaster.pid"] {
                if after.contains_key(Path::new(f)) {
                    failures.push(format!("{f} was written into the pre-made data directory"));
                }
            }
            if &after != before {
                let b: BTreeSet<_> = before.iter().collect();
                let a: BTreeSet<_> = after.iter().collect();
                failures.push(format!(
                    "the pre-made data directory changed: gone/changed {:?}, new/changed {:?}",
                    b.difference(&a).collect::<Vec<_>>(),
                    a.difference(&b).collect::<Vec<_>>()
                ));
            }
        }
    }
    // Nothing in etcd but what the test put there.
    let keys: BTreeSet<String> = etcd.keys(&ctx.prefix()).await.into_iter().collect();
    let ours: BTreeSet<String> = put_keys.keys().cloned().collect();
    if keys != ours {
        failures.push(format!(
            "etcd keys under {}: expected {ours:?}, found {keys:?}",
            ctx.prefix()
        ));
    }
    for (k, v) in &put_keys {
        let now = etcd.get(k).await;
        if now.as_deref() != Some(v.as_str()) {
            failures.push(format!("etcd key {k} changed from {v:?} to {now:?}"));
        }
    }
    if !failures.is_empty() && !stdout.trim().is_empty() {
        failures.push(format!("(stdout: {})", stdout.trim()));
    }
    println!(
        "{:<55} {} in {took:.1?}",
        row.name,
        if failures.is_empty() { "ok" } else { "FAILED" }
    );
    failures
}

/// The valid base config starts an agent: its API answers, it writes to etcd
/// and creates its data directory (the things the bad rows check are absent),
/// and it exits cleanly on SIGTERM.
async fn positive_control(ctx: &Ctx, etcd: &Etcd, logs: &Path) -> Vec<String> {
    let mut failures = Vec::new();
    std::fs::write(&ctx.config, ctx.base()).expect("write config");
    let out = logs.join(format!("{}.stdout", ctx.scope));
    let err = logs.join(format!("{}.stderr", ctx.scope));
    let mut agent = spawn_agent(&ctx.config, &ctx.dir, &out, &err);

    let api_up = wait_port(ctx.api_port, API_WITHIN);
    if !api_up {
        failures.push(format!("the API did not answer within {API_WITHIN:?}"));
    }
    if let Ok(Some(s)) = agent.0.try_wait() {
        failures.push(format!("the agent exited early ({s})"));
    }
    if api_up {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let wrote_etcd = !etcd.keys(&ctx.prefix()).await.is_empty();
            if wrote_etcd && ctx.data_dir.exists() {
                break;
            }
            if Instant::now() > deadline {
                failures.push(format!(
                    "within 30 s: etcd keys under {} written: {wrote_etcd}, data dir created: {}",
                    ctx.prefix(),
                    ctx.data_dir.exists()
                ));
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(agent.0.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    match wait_exit(&mut agent, Duration::from_secs(60)).await {
        None => failures.push("did not exit within 60 s of SIGTERM".to_string()),
        Some(s) if !s.success() => failures.push(format!("exited with {s} after SIGTERM")),
        Some(_) => {}
    }
    drop(agent);
    // Whatever PostgreSQL the agent left behind is stopped here.
    let pid = std::fs::read_to_string(ctx.data_dir.join("postmaster.pid"))
        .ok()
        .and_then(|t| t.lines().next()?.trim().parse::<i32>().ok())
        .filter(|p| nix::sys::signal::kill(nix::unistd::Pid::from_raw(*p), None).is_ok());
    if let Some(pid) = pid {
        failures.push(format!(
            "PostgreSQL (PID {pid}) still runs after the agent stopped"
        ));
        let mut stop = Command::new(pg_bin_dir().join("pg_ctl"));
        stop.args(["stop", "-m", "immediate", "-w", "-D"])
            .arg(&ctx.data_dir);
        as_postgres(&mut stop);
        let _ = stop.output();
    }
    let stderr = std::fs::read_to_string(&err).unwrap_or_default();
    if stderr.contains("config error") {
        failures.push("stderr holds a config error".to_string());
    }
    if !failures.is_empty() {
        failures.push(format!("(stderr:\n{stderr})"));
    }
    println!(
        "{:<55} {}",
        "positive control (valid base config starts)",
        if failures.is_empty() { "ok" } else { "FAILED" }
    );
    failures
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_configs_are_rejected_before_anything_is_written() {
    assert!(
        is_root(),
        "this test runs as root: it runs PostgreSQL programs as the postgres user \
         and checks os_user lookup, which pgwarden only does as root"
    );
    let root = temp_dir("pgwarden-badcfg-");
    let logs = root.path().join("logs");
    std::fs::create_dir(&logs).expect("logs dir");
    let etcd = Etcd::start(root.path());

    let mut failures: Vec<String> = Vec::new();
    let control = new_ctx(root.path(), "control", &etcd);
    for f in positive_control(&control, &etcd, &logs).await {
        failures.push(format!("[positive control] {f}"));
    }

    let rows = rows();
    assert!(rows.len() >= 12);
    let mut allowed_keys: BTreeSet<String> = BTreeSet::new();
    for (i, row) in rows.iter().enumerate() {
        let mut ctx = new_ctx(root.path(), &format!("row{i:02}"), &etcd);
        for f in run_row(row, &mut ctx, &etcd, &logs).await {
            failures.push(format!("[{}] {f}", row.name));
        }
        if row.setup == Setup::ForeignDataDir {
            allowed_keys.insert(format!("{}initialize", ctx.prefix()));
        }
    }

    // Nothing anywhere in etcd but the positive control's cluster and what
    // the test itself put there.
    let stray: Vec<String> = etcd
        .keys("/")
        .await
        .into_iter()
        .filter(|k| !k.starts_with(&control.prefix()) && !allowed_keys.contains(k))
        .collect();
    if !stray.is_empty() {
        failures.push(format!(
            "etcd holds keys no row may have written: {stray:?}"
        ));
    }

    assert!(
        failures.is_empty(),
        "{} failure(s):\n{}",
        failures.len(),
        failures.join("\n")
    );
    // `root` (and etcd's data) is removed after etcd has stopped.
    drop(etcd);
    drop(root);
}
