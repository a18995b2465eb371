//! The fence timer: the one part of rule 2 that must work even while the
//! loop is stuck (an etcd request hanging until its timeout, a slow SQL
//! call). The core computes the deadline; this task only carries it out,
//! stopping PostgreSQL in immediate mode when the deadline passes without
//! being moved by a renewal.

use crate::postgres::Instance;
use std::time::Instant;
use tokio::sync::watch;

pub struct FenceTimer {
    tx: watch::Sender<Option<Instant>>,
    task: tokio::task::JoinHandle<()>,
}

impl FenceTimer {
    pub fn spawn(pg: Instance) -> Self {
        let (tx, rx) = watch::channel(None);
        let task = tokio::spawn(run(pg, rx));
        FenceTimer { tx, task }
    }

    /// Sets the deadline (None: nothing to fence).
    pub fn arm(&self, deadline: Option<Instant>) {
        self.tx.send_if_modified(|d| {
            let changed = *d != deadline;
            *d = deadline;
            changed
        });
    }

    pub fn abort(&self) {
        self.task.abort();
    }
}

async fn run(mut pg: Instance, mut rx: watch::Receiver<Option<Instant>>) {
    loop {
        let deadline = *rx.borrow_and_update();
        let expired = async {
            match deadline {
                Some(d) => tokio::time::sleep_until(d.into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            changed = rx.changed() => {
                if changed.is_err() {
                    return;
                }
            }
            _ = expired => {
                if pg.postmaster_pid().is_some() {
                    tracing::error!(
                        "the leader lease may expire within a second and was not renewed: stopping PostgreSQL immediately"
                    );
                    if let Err(e) = pg.stop_immediate().await {
                        tracing::error!("emergency stop failed: {e:#}");
                    }
                }
                // Fired once per deadline; wait for the next one.
                if rx.changed().await.is_err() {
                    return;
                }
            }
        }
    }
}
