//! The fence timer: the one part of rule 2 that must work even while the
//! loop is stuck (an etcd request hanging until its timeout, a slow SQL
//! call). The core computes the deadline; this task only carries it out,
//! stopping PostgreSQL in immediate mode when the deadline passes without
//! being moved by a renewal.

use crate::postgres::Instance;
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// After the deadline, how often the timer looks for a postmaster that a
/// job started anyway (the job checks the gate first; this is the net for
/// a start already under way when the deadline passed).
const KEEP_DOWN_EVERY: Duration = Duration::from_millis(200);

/// What a job asks right before it makes PostgreSQL writable (a start as
/// primary, a promotion): a job that outlived the fence deadline must not
/// undo the fence.
#[derive(Clone)]
pub struct FenceGate(watch::Receiver<Option<Instant>>);

impl FenceGate {
    pub fn check(&self) -> anyhow::Result<()> {
        match *self.0.borrow() {
            Some(d) if Instant::now() >= d => anyhow::bail!(
                "the leader lease may have expired (the fence deadline passed while this job ran): not making PostgreSQL writable"
            ),
            _ => Ok(()),
        }
    }
}

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

    pub fn gate(&self) -> FenceGate {
        FenceGate(self.tx.subscribe())
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
                // Until the deadline moves, PostgreSQL stays down: a start
                // under way when it passed is stopped as soon as it shows.
                loop {
                    tokio::select! {
                        changed = rx.changed() => {
                            if changed.is_err() {
                                return;
                            }
                            break;
                        }
                        _ = tokio::time::sleep(KEEP_DOWN_EVERY) => {
                            if pg.postmaster_pid().is_some() {
                                tracing::error!(
                                    "PostgreSQL came up after the fence deadline without a renewal: stopping it immediately"
                                );
                                if let Err(e) = pg.stop_immediate().await {
                                    tracing::error!("emergency stop failed: {e:#}");
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}
