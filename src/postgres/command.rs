use std::ffi::OsStr;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;
use tokio::process::Command;

/// The OS account PostgreSQL programs run under. PostgreSQL refuses to run
/// as root, and its data directory must belong to the account running it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OsUser {
    pub uid: u32,
    pub gid: u32,
}

impl OsUser {
    /// When we run as root, the configured user; otherwise ourselves.
    pub fn resolve(name: &str) -> Result<Option<OsUser>, String> {
        if !nix::unistd::geteuid().is_root() {
            return Ok(None);
        }
        match nix::unistd::User::from_name(name) {
            Ok(Some(u)) => Ok(Some(OsUser {
                uid: u.uid.as_raw(),
                gid: u.gid.as_raw(),
            })),
            Ok(None) => Err(format!("OS user `{name}` does not exist")),
            Err(e) => Err(format!("cannot look up OS user `{name}`: {e}")),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PgCommandError {
    #[error("cannot run {program}: {error}")]
    Spawn {
        program: String,
        error: std::io::Error,
    },
    #[error("{program} did not finish within {timeout:?}")]
    Timeout { program: String, timeout: Duration },
    #[error("{program} failed ({status}): {output}")]
    Failed {
        program: String,
        status: String,
        output: String,
    },
}

/// Runs a PostgreSQL program to completion and returns its stdout.
pub async fn run<I, S>(
    bin_dir: &Path,
    program: &str,
    args: I,
    user: Option<OsUser>,
    env: &[(&str, &str)],
    timeout: Duration,
) -> Result<String, PgCommandError>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut cmd = Command::new(bin_dir.join(program));
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .current_dir("/")
        .env("LC_ALL", "C")
        .kill_on_drop(true)
        // Keep the postmaster out of our process group so a signal meant for
        // the agent (or a terminal's Ctrl-C) does not reach PostgreSQL.
        .process_group(0);
    for (k, v) in env {
        cmd.env(k, v);
    }
    if let Some(u) = user {
        cmd.uid(u.uid).gid(u.gid);
    }
    let child = cmd.spawn().map_err(|error| PgCommandError::Spawn {
        program: program.to_string(),
        error,
    })?;
    let out = match tokio::time::timeout(timeout, child.wait_with_output()).await {
        Ok(Ok(out)) => out,
        Ok(Err(error)) => {
            return Err(PgCommandError::Spawn {
                program: program.to_string(),
                error,
            })
        }
        Err(_) => {
            return Err(PgCommandError::Timeout {
                program: program.to_string(),
                timeout,
            })
        }
    };
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).to_string())
    } else {
        let mut output = String::from_utf8_lossy(&out.stderr).trim().to_string();
        if output.is_empty() {
            output = String::from_utf8_lossy(&out.stdout).trim().to_string();
        }
        Err(PgCommandError::Failed {
            program: program.to_string(),
            status: out.status.to_string(),
            output: output.replace('\n', " | "),
        })
    }
}
