use super::{escape_control, Config, ConfigError, ParamValue};
use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};

/// Checks that need nothing but the parsed file.
pub fn validate_static(cfg: &Config) -> Result<(), ConfigError> {
    let p = cfg.source.as_path();
    if cfg.scope.trim().is_empty() {
        return Err(ConfigError::key(p, "scope", "must not be empty"));
    }
    if !valid_name(&cfg.name) {
        return Err(ConfigError::key(
            p,
            "name",
            "must be 1-63 characters of letters, digits, '-', '_' or '.'",
        ));
    }
    if !cfg.namespace.starts_with('/') {
        return Err(ConfigError::key(p, "namespace", "must start with '/'"));
    }
    if cfg.etcd.endpoints.is_empty() {
        return Err(ConfigError::key(
            p,
            "etcd.endpoints",
            "needs at least one endpoint",
        ));
    }
    for e in &cfg.etcd.endpoints {
        let host = e
            .strip_prefix("http://")
            .or_else(|| e.strip_prefix("https://"));
        match host {
            None => {
                return Err(ConfigError::key(
                    p,
                    "etcd.endpoints",
                    format!(
                        "`{}` must start with http:// or https://",
                        escape_control(e)
                    ),
                ))
            }
            Some(h) if h.trim_end_matches('/').is_empty() => {
                return Err(ConfigError::key(
                    p,
                    "etcd.endpoints",
                    format!("`{}` has no host after the scheme", escape_control(e)),
                ))
            }
            Some(_) => {}
        }
    }
    if cfg.etcd.dial_timeout == 0 {
        return Err(ConfigError::key(
            p,
            "etcd.dial_timeout",
            "must be at least 1 second",
        ));
    }
    check_listen(p, "api.listen", cfg.api.listen)?;
    if cfg.api.max_connections == 0 {
        return Err(ConfigError::key(
            p,
            "api.max_connections",
            "must be at least 1",
        ));
    }
    check_listen(p, "postgresql.listen", cfg.postgresql.listen)?;
    if cfg.api.listen == cfg.postgresql.listen {
        return Err(ConfigError::key(
            p,
            "api.listen",
            "is the same address as postgresql.listen",
        ));
    }
    if cfg.api.listen.port() == cfg.postgresql.listen.port()
        && (cfg.api.listen.ip().is_unspecified() || cfg.postgresql.listen.ip().is_unspecified())
    {
        return Err(ConfigError::key(
            p,
            "api.listen",
            format!(
                "{} overlaps postgresql.listen {} (same port, one of them on all addresses)",
                cfg.api.listen, cfg.postgresql.listen
            ),
        ));
    }
    for (key, creds) in [
        (
            "postgresql.authentication.superuser",
            &cfg.postgresql.authentication.superuser,
        ),
        (
            "postgresql.authentication.replication",
            &cfg.postgresql.authentication.replication,
        ),
    ] {
        if creds.username.trim().is_empty() {
            return Err(ConfigError::key(
                p,
                &format!("{key}.username"),
                "must not be empty",
            ));
        }
        if creds.password.is_empty() {
            return Err(ConfigError::key(
                p,
                &format!("{key}.password"),
                "must not be empty",
            ));
        }
    }
    if cfg.postgresql.data_dir.as_os_str().is_empty() || !cfg.postgresql.data_dir.is_absolute() {
        return Err(ConfigError::key(
            p,
            "postgresql.data_dir",
            "must be an absolute path",
        ));
    }
    if cfg.postgresql.os_user.trim().is_empty() {
        return Err(ConfigError::key(
            p,
            "postgresql.os_user",
            "must not be empty",
        ));
    }
    if cfg.postgresql.start_timeout == 0 {
        return Err(ConfigError::key(
            p,
            "postgresql.start_timeout",
            "must be at least 1 second",
        ));
    }
    check_parameters(&cfg.postgresql.parameters).map_err(|(name, msg)| {
        ConfigError::key(p, &format!("postgresql.parameters.{name}"), msg)
    })?;
    check_parameters(&cfg.bootstrap.dcs.postgresql.parameters).map_err(|(name, msg)| {
        ConfigError::key(
            p,
            &format!("bootstrap.dcs.postgresql.parameters.{name}"),
            msg,
        )
    })?;
    if let Err((key, msg)) = cfg.bootstrap.dcs.check_timing() {
        return Err(ConfigError::key(p, &format!("bootstrap.dcs.{key}"), msg));
    }
    Ok(())
}

fn check_listen(p: &Path, key: &str, addr: SocketAddr) -> Result<(), ConfigError> {
    if addr.port() == 0 {
        return Err(ConfigError::key(p, key, "port must be between 1 and 65535"));
    }
    Ok(())
}

/// Checks PostgreSQL parameters set in a config (the member's own or the
/// cluster-wide ones): each name must be a valid parameter name and not one
/// pgwarden manages itself. Returns the offending name and the problem.
pub fn check_parameters(params: &BTreeMap<String, ParamValue>) -> Result<(), (String, String)> {
    for (name, value) in params {
        if !valid_parameter_name(name) {
            return Err((
                escape_control(name),
                "is not a valid PostgreSQL parameter name (letters, digits, '_', '.')".into(),
            ));
        }
        // PostgreSQL parameter names are case-insensitive: `Port` is `port`.
        if MANAGED_PARAMETERS.contains(&name.to_ascii_lowercase().as_str()) {
            return Err((
                name.clone(),
                "is managed by pgwarden and cannot be set here".into(),
            ));
        }
        if let ParamValue::Text(text) = value {
            if text.contains(['\n', '\r', '\0']) {
                return Err((name.clone(), "value must be a single line".into()));
            }
        }
    }
    Ok(())
}

fn valid_parameter_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.')
}

/// Parameters pgwarden derives from other keys or from the member's role.
pub const MANAGED_PARAMETERS: &[&str] = &[
    "listen_addresses",
    "port",
    "hba_file",
    "primary_conninfo",
    "primary_slot_name",
    "recovery_target_timeline",
    "data_directory",
];

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
}

/// Checks against this host: PostgreSQL binaries and free ports. The etcd
/// check (data directory of another cluster) needs the network and lives in
/// the agent's startup. `pg_running` says our own postmaster already holds the
/// PostgreSQL port, which is then expected, not a conflict.
pub fn validate(cfg: &Config, pg_running: bool) -> Result<PathBuf, ConfigError> {
    let p = cfg.source.as_path();
    let bin_dir = match &cfg.postgresql.bin_dir {
        Some(dir) => {
            check_bin_dir(dir).map_err(|m| ConfigError::key(p, "postgresql.bin_dir", m))?;
            dir.clone()
        }
        None => find_bin_dir().ok_or_else(|| {
            ConfigError::key(
                p,
                "postgresql.bin_dir",
                "not set and no PostgreSQL found in /usr/lib/postgresql/*/bin, pg_config or PATH (install postgresql)",
            )
        })?,
    };
    check_port_free(cfg.api.listen).map_err(|m| ConfigError::key(p, "api.listen", m))?;
    if !pg_running {
        check_port_free(cfg.postgresql.listen)
            .map_err(|m| ConfigError::key(p, "postgresql.listen", m))?;
    }
    Ok(bin_dir)
}

const REQUIRED_PROGRAMS: &[&str] = &[
    "postgres",
    "pg_ctl",
    "initdb",
    "pg_basebackup",
    "pg_controldata",
    "pg_rewind",
];

fn check_bin_dir(dir: &Path) -> Result<(), String> {
    // PostgreSQL programs run from `/` as another user: a relative path
    // would name a different directory than the one checked here.
    if !dir.is_absolute() {
        return Err(format!("`{}` must be an absolute path", dir.display()));
    }
    let entries =
        std::fs::read_dir(dir).map_err(|e| format!("cannot read {}: {e}", dir.display()))?;
    drop(entries);
    for prog in REQUIRED_PROGRAMS {
        if !is_executable(&dir.join(prog)) {
            return Err(format!("{} has no executable `{prog}`", dir.display()));
        }
    }
    Ok(())
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// The highest /usr/lib/postgresql/N/bin, then `pg_config --bindir`, then the
/// directory of `postgres` on PATH.
pub fn find_bin_dir() -> Option<PathBuf> {
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v: u32 = e.file_name().to_str()?.parse().ok()?;
            Some((v, e.path().join("bin")))
        })
        .filter(|(_, bin)| check_bin_dir(bin).is_ok())
        .collect();
    versions.sort();
    if let Some((_, bin)) = versions.pop() {
        return Some(bin);
    }
    if let Ok(out) = std::process::Command::new("pg_config")
        .arg("--bindir")
        .output()
    {
        if out.status.success() {
            let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
            if check_bin_dir(&dir).is_ok() {
                return Some(dir);
            }
        }
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).find(|dir| check_bin_dir(dir).is_ok())
}

fn check_port_free(addr: SocketAddr) -> Result<(), String> {
    match TcpListener::bind(addr) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
            Err(format!("{addr} is already in use"))
        }
        Err(e) => Err(format!("cannot listen on {addr}: {e}")),
    }
}
