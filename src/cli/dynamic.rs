//! The dynamic cluster config in etcd: `pause`, `resume`, `show-config`,
//! `edit-config`, and `remove`. These talk to etcd directly; every change
//! is validated like `PATCH /config` and written with compare-and-swap.

use super::operator::{ask, connect, read_view};
use crate::api::requests::{patch_config, Refusal, CONFIG_CONFLICT};
use crate::config::{Config, DynamicConfig};
use crate::dcs::{Dcs, StoredConfig};
use anyhow::{anyhow, bail};
use serde_json::{Map, Value};

/// Attempts of a merge patch against concurrent writers.
const CAS_ATTEMPTS: usize = 5;

#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConfigFormat {
    Toml,
    Json,
}

#[derive(clap::Args, Debug, Clone)]
pub struct EditConfigArgs {
    /// KEY=VALUE with a dotted key (`ttl=30`,
    /// `postgresql.parameters.work_mem=8MB`); VALUE is read as JSON when it
    /// parses (30, true, "x", null removes the key), else as a string.
    #[arg(long = "set", value_name = "KEY=VALUE", required = true)]
    pub set: Vec<String>,
}

async fn stored(cfg: &Config, dcs: &mut Dcs) -> anyhow::Result<(StoredConfig, Value)> {
    let s = dcs.read_config().await?;
    if let Some(problem) = &s.unreadable {
        bail!(
            "{problem}; replace it whole: PUT /config on a member's API, or etcdctl put {} with a valid JSON config",
            dcs.keys().config()
        );
    }
    let Some(value) = s.value.clone() else {
        bail!(
            "cluster {} has no dynamic config in etcd yet (is it bootstrapped?)",
            cfg.scope
        );
    };
    Ok((s, value))
}

/// Applies `patch` to the stored config with compare-and-swap, re-reading
/// and re-applying it when another writer got in first. Returns the new
/// config, or None when it changed nothing.
async fn apply(
    cfg: &Config,
    dcs: &mut Dcs,
    patch: &Value,
) -> anyhow::Result<Option<DynamicConfig>> {
    for _ in 0..CAS_ATTEMPTS {
        let (s, value) = stored(cfg, dcs).await?;
        let new = patch_config(Some(&value), &cfg.bootstrap.dcs, patch)
            .map_err(|r: Refusal| anyhow!("{r}"))?;
        if serde_json::from_value::<DynamicConfig>(value).is_ok_and(|old| old == new) {
            return Ok(None);
        }
        if dcs.write_config_cas(&new, s.revision).await?.is_some() {
            return Ok(Some(new));
        }
    }
    bail!("{CONFIG_CONFLICT}")
}

pub async fn set_pause(cfg: &Config, pause: bool) -> anyhow::Result<()> {
    let mut dcs = connect(cfg).await?;
    let patch = serde_json::json!({ "pause": pause });
    match apply(cfg, &mut dcs, &patch).await? {
        Some(_) if pause => println!("cluster paused"),
        Some(_) => println!("cluster resumed"),
        None if pause => println!("cluster is already paused"),
        None => println!("cluster is not paused; nothing to resume"),
    }
    Ok(())
}

pub async fn show_config(cfg: &Config, format: ConfigFormat) -> anyhow::Result<()> {
    let mut dcs = connect(cfg).await?;
    let (_, value) = stored(cfg, &mut dcs).await?;
    let config: DynamicConfig = serde_json::from_value(value)
        .map_err(|e| anyhow!("the stored config is not valid: {e}"))?;
    match format {
        ConfigFormat::Json => println!("{}", serde_json::to_string_pretty(&config)?),
        ConfigFormat::Toml => print!("{}", toml::to_string_pretty(&config)?),
    }
    Ok(())
}

/// `--set` items → one merge patch.
pub fn patch_from_sets(sets: &[String]) -> anyhow::Result<Value> {
    let mut patch = Value::Object(Map::new());
    for item in sets {
        let Some((key, raw)) = item.split_once('=') else {
            bail!("--set {item:?}: expected KEY=VALUE");
        };
        let path = key_path(key).map_err(|e| anyhow!("--set {item:?}: {e}"))?;
        let value =
            serde_json::from_str::<Value>(raw).unwrap_or_else(|_| Value::String(raw.to_string()));
        let mut node = &mut patch;
        for (i, part) in path.iter().enumerate() {
            let Value::Object(map) = node else {
                bail!(
                    "--set {item:?}: {} is set to a value above",
                    path[..i].join(".")
                );
            };
            if i + 1 == path.len() {
                map.insert(part.clone(), value.clone());
                break;
            }
            node = map
                .entry(part.clone())
                .or_insert_with(|| Value::Object(Map::new()));
        }
    }
    Ok(patch)
}

/// A dotted key as a path. PostgreSQL parameter names may hold dots
/// (`auto_explain.log_min_duration`): after `postgresql.parameters.` the rest
/// is one name.
fn key_path(key: &str) -> Result<Vec<String>, String> {
    let key = key.trim();
    if key.is_empty() {
        return Err("empty key".into());
    }
    if let Some(param) = key.strip_prefix("postgresql.parameters.") {
        if param.is_empty() {
            return Err("no parameter name after postgresql.parameters.".into());
        }
        return Ok(vec!["postgresql".into(), "parameters".into(), param.into()]);
    }
    let parts: Vec<String> = key.split('.').map(str::to_string).collect();
    if parts.iter().any(String::is_empty) {
        return Err(format!("bad dotted key {key:?}"));
    }
    Ok(parts)
}

pub async fn edit_config(cfg: &Config, args: &EditConfigArgs) -> anyhow::Result<()> {
    let patch = patch_from_sets(&args.set)?;
    let mut dcs = connect(cfg).await?;
    match apply(cfg, &mut dcs, &patch).await? {
        None => println!("config unchanged"),
        Some(new) => {
            println!("config updated");
            print!("{}", toml::to_string_pretty(&new)?);
        }
    }
    Ok(())
}

pub async fn remove(cfg: &Config, scope: &str) -> anyhow::Result<()> {
    if scope != cfg.scope {
        bail!(
            "{scope} is not the cluster of this config file (its scope is {})",
            cfg.scope
        );
    }
    let mut dcs = connect(cfg).await?;
    let view = read_view(cfg, &mut dcs).await?;
    if let Some(l) = view.leader.as_deref() {
        eprintln!("warning: {l} holds the leader key: the cluster's agents are running; stop them all first");
    }
    let answer = ask(&format!(
        "This deletes every key of cluster {scope} from etcd ({}): members, leader, config, history.\nType the cluster name to confirm: ",
        cfg.key_prefix()
    ))
    .await?;
    if answer.trim() != scope {
        bail!("the name typed does not match {scope}: nothing removed");
    }
    let deleted = dcs.delete_cluster().await?;
    println!("removed cluster {scope}: {deleted} keys deleted from etcd");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn sets_become_a_merge_patch() {
        let p = patch_from_sets(&[
            "ttl=30".into(),
            "postgresql.parameters.work_mem=8MB".into(),
            "postgresql.parameters.auto_explain.log_min_duration=100".into(),
            "synchronous_mode=true".into(),
            "maximum_lag_on_failover=null".into(),
            "postgresql.parameters.application_name=\"x=y\"".into(),
        ])
        .unwrap();
        assert_eq!(
            p,
            json!({
                "ttl": 30,
                "synchronous_mode": true,
                "maximum_lag_on_failover": null,
                "postgresql": {"parameters": {
                    "work_mem": "8MB",
                    "auto_explain.log_min_duration": 100,
                    "application_name": "x=y",
                }}
            })
        );
        for bad in ["ttl", "=3", "a..b=1", "postgresql.parameters.=1"] {
            assert!(patch_from_sets(&[bad.into()]).is_err(), "{bad}");
        }
        assert!(patch_from_sets(&["ttl=3".into(), "ttl.x=1".into()]).is_err());
    }

    #[test]
    fn toml_rendering_of_a_config() {
        let mut c = DynamicConfig::default();
        c.postgresql.parameters.insert(
            "work_mem".into(),
            crate::config::ParamValue::Text("8MB".into()),
        );
        let text = toml::to_string_pretty(&c).unwrap();
        assert!(text.contains("ttl = 10"), "{text}");
        assert!(text.contains("[postgresql.parameters]"), "{text}");
        let back: DynamicConfig = toml::from_str(&text).unwrap();
        assert_eq!(back, c);
    }
}
