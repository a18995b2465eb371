//! The agent's configuration file: its shape (serde structs), loading, and
//! validation. Nothing here writes to disk or etcd: a config is either valid
//! as a whole or rejected with one line naming the key.

mod file;
mod validate;

pub use file::*;
pub use validate::{check_parameters, find_bin_dir, validate, validate_static, MANAGED_PARAMETERS};

use std::path::{Path, PathBuf};

/// A config problem, always tied to the key it is about (or, for a file that
/// is not valid TOML, to the line) so the operator can find the line to fix.
/// Every variant displays as a single line.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: key `{key}`: {message}")]
    Key {
        path: PathBuf,
        key: String,
        message: String,
    },
    /// The file is not valid TOML (bad syntax, a key defined twice…).
    #[error("{path}: line {line}, column {column}: {message}")]
    Syntax {
        path: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },
}

impl ConfigError {
    pub fn key(path: &Path, key: &str, message: impl Into<String>) -> Self {
        ConfigError::Key {
            path: path.to_path_buf(),
            key: escape_control(key),
            message: one_line(&message.into()),
        }
    }

    /// The key the error is about, if any (`.` for the whole file).
    pub fn key_name(&self) -> Option<&str> {
        match self {
            ConfigError::Key { key, .. } => Some(key),
            _ => None,
        }
    }
}

/// Joins a multi-line message (toml's syntax errors have several lines) into
/// one line: the product promises one line per config error.
fn one_line(message: &str) -> String {
    let parts: Vec<&str> = message
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    escape_control(&parts.join("; "))
}

/// Escapes control characters (a quoted TOML key or a value may hold a
/// newline) so they cannot break the line.
pub(crate) fn escape_control(s: &str) -> String {
    if !s.chars().any(char::is_control) {
        return s.to_string();
    }
    s.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

/// Parses a config file without looking at the outside world (bin_dir, ports,
/// etcd); see [`validate`] for those checks.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    parse(path, &text)
}

pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
    let de = toml::Deserializer::new(text);
    let mut cfg: Config = serde_path_to_error::deserialize(de).map_err(|err| {
        let at_root = err.path().iter().next().is_none();
        let last = err.path().iter().next_back().map(|seg| seg.to_string());
        let key = err.path().to_string();
        let inner = err.into_inner();
        let mut message = inner.message().to_string();
        if message == "invalid socket address syntax" {
            // std's SocketAddr takes no host names; say what it does take.
            message.push_str(
                ", expected IP:port such as 127.0.0.1:5432 or [::1]:5432 (not a host name)",
            );
        }
        let child = |field: &str| {
            if at_root {
                field.to_string()
            } else {
                format!("{key}.{field}")
            }
        };
        // serde reports an unknown key with the key itself as the last path
        // segment, and a missing key against its parent table: name the
        // offending key in both cases so the operator sees what to fix.
        if let Some(field) = quoted_field(&message, "unknown field `") {
            let full = if last.as_deref() == Some(field) {
                key.clone()
            } else {
                child(field)
            };
            let message = message.replacen(field, &escape_control(field), 1);
            return ConfigError::key(path, &full, message);
        }
        if let Some(field) = quoted_field(&message, "missing field `") {
            return ConfigError::key(path, &child(field), "required key is missing");
        }
        match inner.span() {
            // Errors of the TOML syntax itself come before any key is read.
            Some(span) if at_root => {
                let (line, column) = line_column(text, span.start);
                ConfigError::Syntax {
                    path: path.to_path_buf(),
                    line,
                    column,
                    message: one_line(&message),
                }
            }
            _ => ConfigError::key(path, &key, message),
        }
    })?;
    cfg.source = path.to_path_buf();
    validate_static(&cfg)?;
    Ok(cfg)
}

fn quoted_field<'a>(message: &'a str, prefix: &str) -> Option<&'a str> {
    let rest = message.strip_prefix(prefix)?;
    rest.split('`').next()
}

/// 1-based line and column (in characters) of a byte offset.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().unwrap_or("").chars().count() + 1;
    (line, column)
}

#[cfg(test)]
mod tests;
