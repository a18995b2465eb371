use crate::dcs::parse_lsn;
use crate::ha::{PgRunning, Standby};
use tokio_postgres::{Client, NoTls};

/// The result of one SQL probe of a running instance.
#[derive(Debug, Clone, PartialEq)]
pub struct Observed {
    pub state: PgRunning,
    pub major: u32,
}

const PROBE: &str = "
SELECT pg_is_in_recovery(),
       CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn()::text
            ELSE pg_current_wal_lsn()::text END,
       pg_last_wal_receive_lsn()::text,
       CASE WHEN pg_is_in_recovery()
            THEN coalesce((SELECT received_tli FROM pg_stat_wal_receiver),
                          (pg_control_checkpoint()).timeline_id)::bigint
            ELSE ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::bigint END,
       coalesce((SELECT status = 'streaming' FROM pg_stat_wal_receiver), false),
       current_setting('primary_conninfo', true),
       current_setting('server_version_num')::int,
       coalesce((SELECT array_agg(slot_name::text ORDER BY slot_name)
                 FROM pg_replication_slots WHERE slot_type = 'physical'), '{}'),
       EXISTS (SELECT FROM pg_settings WHERE pending_restart),
       pg_postmaster_start_time()::text,
       current_setting('synchronous_standby_names'),
       (SELECT coalesce(json_agg(json_build_object('name', application_name, 'state', state,
                                                   'flush', flush_lsn::text)), '[]'::json)
        FROM pg_stat_replication)::text";

/// One `pg_stat_replication` row as the probe returns it.
#[derive(serde::Deserialize)]
struct ReplicationRow {
    name: Option<String>,
    state: Option<String>,
    flush: Option<String>,
}

pub async fn probe(client: &Client) -> Result<Observed, tokio_postgres::Error> {
    let row = client.query_one(PROBE, &[]).await?;
    let in_recovery: bool = row.try_get(0)?;
    let wal: Option<String> = row.try_get(1)?;
    let receive: Option<String> = row.try_get(2)?;
    let timeline: Option<i64> = row.try_get(3)?;
    let streaming: bool = row.try_get(4)?;
    let conninfo: Option<String> = row.try_get(5)?;
    let version: i32 = row.try_get(6)?;
    let slots: Vec<String> = row.try_get(7)?;
    let pending_restart: bool = row.try_get(8)?;
    let postmaster_start: String = row.try_get(9)?;
    let synchronous_standby_names: String = row.try_get(10)?;
    let replication: String = row.try_get(11)?;
    // Our own query's JSON: a row that does not decode is left out (it
    // names no standby pgwarden could list).
    let replication = serde_json::from_str::<Vec<ReplicationRow>>(&replication)
        .unwrap_or_default()
        .into_iter()
        .filter_map(|r| {
            Some(Standby {
                name: r.name?,
                streaming: r.state.as_deref() == Some("streaming"),
                flush_lsn: r.flush.as_deref().and_then(parse_lsn),
            })
        })
        .collect();
    Ok(Observed {
        state: PgRunning {
            in_recovery,
            timeline: timeline.and_then(|t| u32::try_from(t).ok()),
            wal_lsn: wal.as_deref().and_then(parse_lsn),
            receive_lsn: receive.as_deref().and_then(parse_lsn),
            streaming,
            upstream: if in_recovery {
                conninfo.as_deref().and_then(parse_conninfo_address)
            } else {
                None
            },
            slots,
            pending_restart,
            postmaster_start,
            synchronous_standby_names,
            replication,
        },
        major: (version / 10000) as u32,
    })
}

pub async fn connect(conninfo: &str) -> Result<Client, tokio_postgres::Error> {
    let (client, connection) = tokio_postgres::connect(conninfo, NoTls).await?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!("PostgreSQL connection closed: {e}");
        }
    });
    Ok(client)
}

/// `host:port` out of a libpq conninfo string such as the one pgwarden
/// writes into primary_conninfo.
pub fn parse_conninfo_address(conninfo: &str) -> Option<String> {
    let mut host = None;
    let mut port = None;
    let mut rest = conninfo.trim();
    while !rest.is_empty() {
        let (key, after) = rest.split_once('=')?;
        let key = key.trim();
        let after = after.trim_start();
        let (value, remaining) = if let Some(quoted) = after.strip_prefix('\'') {
            let mut value = String::new();
            let mut chars = quoted.char_indices();
            let mut end = quoted.len();
            while let Some((i, c)) = chars.next() {
                match c {
                    '\\' => {
                        if let Some((_, n)) = chars.next() {
                            value.push(n);
                        }
                    }
                    '\'' => {
                        end = i + 1;
                        break;
                    }
                    c => value.push(c),
                }
            }
            (value, &quoted[end.min(quoted.len())..])
        } else {
            let end = after.find(char::is_whitespace).unwrap_or(after.len());
            (after[..end].to_string(), &after[end..])
        };
        match key {
            "host" => host = Some(value),
            "port" => port = Some(value),
            _ => {}
        }
        rest = remaining.trim_start();
    }
    Some(format!(
        "{}:{}",
        host?,
        port.unwrap_or_else(|| "5432".into())
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn conninfo_address() {
        assert_eq!(
            parse_conninfo_address("host='10.0.0.1' port='5433' user='r' password='a\\'b c'"),
            Some("10.0.0.1:5433".into())
        );
        assert_eq!(
            parse_conninfo_address("host=h1 user=x"),
            Some("h1:5432".into())
        );
        assert_eq!(parse_conninfo_address(""), None);
    }
}
