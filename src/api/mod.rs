//! The HTTP API: health checks for HAProxy, status and cluster views, and
//! Prometheus metrics, all answered from the loop's last snapshot.

mod state;

pub use state::{ApiSnapshot, SharedState};
