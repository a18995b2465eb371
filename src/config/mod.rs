//! The agent's configuration file: its shape (serde structs), loading, and
//! validation. Nothing here writes to disk or etcd: a config is either valid
//! as a whole or rejected with one line naming the key.

mod file;
mod validate;

pub use file::*;
pub use validate::{validate, validate_static};

use std::path::{Path, PathBuf};

/// A config problem, always tied to the key it is about so the operator can
/// find the line to fix.
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
}

impl ConfigError {
    pub fn key(path: &Path, key: &str, message: impl Into<String>) -> Self {
        ConfigError::Key {
            path: path.to_path_buf(),
            key: key.to_string(),
            message: message.into(),
        }
    }
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
        let key = err.path().to_string();
        let inner = err.into_inner();
        let message = inner.message().to_string();
        // An unknown key is reported against its parent table by serde; name
        // the offending key itself so the operator sees what to delete.
        let (key, message) = match unknown_field(&message) {
            Some(field) if key == "." => (field.to_string(), message),
            Some(field) => (format!("{key}.{field}"), message),
            None => (key, message),
        };
        ConfigError::key(path, if key.is_empty() { "." } else { &key }, message)
    })?;
    cfg.source = path.to_path_buf();
    validate_static(&cfg)?;
    Ok(cfg)
}

fn unknown_field(message: &str) -> Option<&str> {
    let rest = message.strip_prefix("unknown field `")?;
    rest.split('`').next()
}
