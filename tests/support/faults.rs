//! What fault tests watch while the fault runs: a writer through HAProxy
//! recording every acknowledged row, and a monitor asserting that never two
//! members answer 200 on /primary nor two PostgreSQL instances accept writes.

use super::cluster::SUPERUSER_PASSWORD;
use super::{http_status, sql};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Inserts one row every `every` through a port (HAProxy's read-write port),
/// each on a fresh short-timeout connection, like a probe.
pub struct Writer {
    stop: Arc<AtomicBool>,
    pub acked: Arc<Mutex<Vec<(i64, Instant)>>>,
    pub failures: Arc<Mutex<Vec<Instant>>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Writer {
    pub async fn start(port: u16, table: &str, every: Duration) -> Writer {
        // HAProxy marks the primary up only after its first check: retry
        // until the table exists.
        let create = format!("CREATE TABLE IF NOT EXISTS {table} (id bigint PRIMARY KEY, at timestamptz DEFAULT now())");
        super::eventually(
            "the writer's table created through HAProxy",
            Duration::from_secs(60),
            || async {
                let c = sql(port, SUPERUSER_PASSWORD).await.ok()?;
                c.batch_execute(&create).await.ok()
            },
        )
        .await;
        let stop = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(Mutex::new(Vec::new()));
        let failures = Arc::new(Mutex::new(Vec::new()));
        let (s, a, f) = (stop.clone(), acked.clone(), failures.clone());
        let table = table.to_string();
        let task = tokio::spawn(async move {
            let mut id: i64 = 0;
            while !s.load(Ordering::Relaxed) {
                id += 1;
                let ok = tokio::time::timeout(Duration::from_secs(1), async {
                    let c = sql(port, SUPERUSER_PASSWORD).await.ok()?;
                    c.execute(&format!("INSERT INTO {table} (id) VALUES ($1)"), &[&id])
                        .await
                        .ok()
                })
                .await
                .ok()
                .flatten()
                .is_some();
                if ok {
                    a.lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push((id, Instant::now()));
                } else {
                    f.lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push(Instant::now());
                }
                tokio::time::sleep(every).await;
            }
        });
        Writer {
            stop,
            acked,
            failures,
            task: Some(task),
        }
    }

    pub fn acked_ids(&self) -> Vec<i64> {
        self.acked
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(id, _)| *id)
            .collect()
    }

    pub fn acked_after(&self, t: Instant) -> usize {
        self.acked
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|(_, at)| *at > t)
            .count()
    }

    pub fn failures_after(&self, t: Instant) -> usize {
        self.failures
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|at| **at > t)
            .count()
    }

    pub async fn stop(mut self) -> Vec<i64> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
        self.acked_ids()
    }
}

/// Polls every member's /primary and `pg_is_in_recovery()` and records any
/// moment when two answer as primaries.
pub struct Monitor {
    stop: Arc<AtomicBool>,
    pub violations: Arc<Mutex<Vec<String>>>,
    pub polls: Arc<Mutex<u64>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Monitor {
    /// `members`: (name, api /primary URL, PostgreSQL host, PostgreSQL port).
    pub fn start(members: Vec<(String, String, String, u16)>) -> Monitor {
        let stop = Arc::new(AtomicBool::new(false));
        let violations = Arc::new(Mutex::new(Vec::new()));
        let polls = Arc::new(Mutex::new(0));
        let (s, v, p) = (stop.clone(), violations.clone(), polls.clone());
        let task = tokio::spawn(async move {
            while !s.load(Ordering::Relaxed) {
                let mut api_primaries = Vec::new();
                let mut writable = Vec::new();
                for (name, url, host, port) in &members {
                    if http_status("GET", url).await == 200 {
                        api_primaries.push(name.clone());
                    }
                    if accepts_writes(host, *port).await {
                        writable.push(name.clone());
                    }
                }
                if api_primaries.len() > 1 {
                    v.lock().unwrap_or_else(|p| p.into_inner()).push(format!(
                        "two members answer 200 on /primary: {api_primaries:?}"
                    ));
                }
                if writable.len() > 1 {
                    v.lock().unwrap_or_else(|p| p.into_inner()).push(format!(
                        "two PostgreSQL instances accept writes: {writable:?}"
                    ));
                }
                *p.lock().unwrap_or_else(|p| p.into_inner()) += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        Monitor {
            stop,
            violations,
            polls,
            task: Some(task),
        }
    }

    /// Stops and asserts no violation was seen (and that it really polled).
    pub async fn finish(mut self) {
        // A fast fault can end before a loaded machine polled much: make
        // sure the monitor looked a few times at the final state too.
        let polls = self.polls.clone();
        let start = *polls.lock().unwrap_or_else(|p| p.into_inner());
        super::eventually(
            "the invariant monitor polling the final state",
            Duration::from_secs(60),
            || {
                let polls = polls.clone();
                async move {
                    (*polls.lock().unwrap_or_else(|p| p.into_inner()) >= start + 3).then_some(())
                }
            },
        )
        .await;
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
        let polls = *self.polls.lock().unwrap_or_else(|p| p.into_inner());
        assert!(
            polls >= 5,
            "the invariant monitor polled only {polls} times"
        );
        let v = self.violations.lock().unwrap_or_else(|p| p.into_inner());
        assert!(v.is_empty(), "safety violated: {v:?}");
    }
}

/// A PostgreSQL instance on `host:port` is up and not in recovery.
async fn accepts_writes(host: &str, port: u16) -> bool {
    let Ok(Ok(c)) = tokio::time::timeout(
        Duration::from_millis(800),
        super::cluster::sql_at(host, port, SUPERUSER_PASSWORD),
    )
    .await
    else {
        return false;
    };
    matches!(
        tokio::time::timeout(Duration::from_millis(800), c.query_one("SELECT NOT pg_is_in_recovery()", &[])).await,
        Ok(Ok(row)) if row.get::<_, bool>(0)
    )
}
