//! The HTTP API: health checks for HAProxy, status and cluster views, and
//! Prometheus metrics, all answered from the loop's last snapshot.
//!
//! Handlers do no I/O: they clone the snapshot's Arc and render it, so a hung
//! PostgreSQL or etcd can never hang a health probe.

mod health;
mod metrics;
mod state;
mod views;

#[cfg(test)]
mod tests;

pub use state::{ApiSnapshot, SharedState};

use axum::extract::State;
use axum::http::Uri;
use axum::response::Response;
use axum::routing::{get, post, MethodRouter};
use axum::serve::ListenerExt;
use axum::Router;
use std::future::Future;
use std::time::Instant;

/// Every route of the DESIGN.md "HTTP API" contract. Unknown paths get a JSON
/// 404, known paths with a wrong method a JSON 405 (with `Allow`).
pub fn router(state: SharedState) -> Router {
    let mut router = Router::new();
    for &(path, check) in health::ROUTES {
        router = router.route(path, health_route(check));
    }
    router
        .route("/status", view_route(views::status))
        .route("/cluster", view_route(views::cluster))
        .route("/history", view_route(views::history))
        .route("/metrics", view_route(metrics::metrics))
        .route(
            "/config",
            view_route(views::config)
                .patch(views::refuse_mutation)
                .put(views::refuse_mutation),
        )
        .route(
            "/switchover",
            post(views::refuse_mutation)
                .delete(views::refuse_mutation)
                .fallback(views::method_not_allowed),
        )
        .route("/failover", refused_post())
        .route(
            "/restart",
            post(views::refuse_mutation)
                .delete(views::refuse_mutation)
                .fallback(views::method_not_allowed),
        )
        .route("/reinitialize", refused_post())
        .route("/reload", refused_post())
        .fallback(views::not_found)
        .with_state(state)
}

/// Serves `router(state)` until `shutdown` completes, then lets in-flight
/// requests finish.
///
/// # Errors
///
/// Only what axum's accept loop reports; transient accept errors (too many
/// open files, aborted connections) are retried inside it, not returned.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: SharedState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    // Responses are one small write; Nagle would only add latency to probes.
    let listener = listener.tap_io(|tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "could not set TCP_NODELAY on API connection");
        }
    });
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown)
        .await
}

/// GET (and so HEAD, whose body axum strips) and OPTIONS, which HAProxy's
/// plain `option httpchk` sends.
fn health_route(check: health::Check) -> MethodRouter<SharedState> {
    let handler = move |State(state): State<SharedState>, uri: Uri| async move {
        health::respond(&state.get(), check, &uri, Instant::now())
    };
    get(handler)
        .options(handler)
        .fallback(views::method_not_allowed)
}

fn view_route(render: fn(&ApiSnapshot, Instant) -> Response) -> MethodRouter<SharedState> {
    let handler =
        move |State(state): State<SharedState>| async move { render(&state.get(), Instant::now()) };
    get(handler)
        .options(handler)
        .fallback(views::method_not_allowed)
}

fn refused_post() -> MethodRouter<SharedState> {
    post(views::refuse_mutation).fallback(views::method_not_allowed)
}
