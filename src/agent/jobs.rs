//! Long actions (initdb, clone, start, stop) run as background tasks so the
//! loop keeps renewing leases and publishing state meanwhile.

use crate::ha::JobKind;
use tokio::task::JoinHandle;

pub struct RunningJob {
    pub kind: JobKind,
    handle: JoinHandle<anyhow::Result<()>>,
}

impl RunningJob {
    pub fn spawn<F>(kind: JobKind, fut: F) -> Self
    where
        F: std::future::Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        RunningJob {
            kind,
            handle: tokio::spawn(fut),
        }
    }

    pub fn is_finished(&self) -> bool {
        self.handle.is_finished()
    }

    /// The job's outcome; only call once `is_finished`.
    pub async fn outcome(self) -> (JobKind, anyhow::Result<()>) {
        let result = match self.handle.await {
            Ok(r) => r,
            Err(e) => Err(anyhow::anyhow!("job task ended abnormally: {e}")),
        };
        (self.kind, result)
    }

    pub fn abort(&self) {
        self.handle.abort();
    }
}
