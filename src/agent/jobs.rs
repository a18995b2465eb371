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

    /// Waits for the job to end. Cancel-safe: the loop selects on it with
    /// other wake-ups and calls it again.
    pub async fn wait(&mut self) -> Result<(), String> {
        match (&mut self.handle).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(format!("{e:#}")),
            Err(e) => Err(format!("job task ended abnormally: {e}")),
        }
    }

    pub fn abort(&self) {
        self.handle.abort();
    }
}
