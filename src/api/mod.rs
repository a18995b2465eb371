//! The HTTP API: health checks for HAProxy, status and cluster views, and
//! Prometheus metrics, all answered from the loop's last snapshot; and the
//! operator's authenticated requests (switchover, failover, config edits,
//! restart/reinitialize/reload of this member).
//!
//! Read-only handlers do no I/O: they clone the snapshot's Arc and render
//! it, so a hung PostgreSQL or etcd can never hang a health probe. Only the
//! mutating handlers (`operator.rs`) talk to etcd.

mod auth;
mod health;
mod metrics;
mod operator;
pub mod requests;
mod server;
mod state;
pub mod tls;
mod views;

#[cfg(test)]
mod tests;

pub use auth::Credentials;
pub use operator::{ApiOptions, MemberCommand, BODY_LIMIT};
pub use server::{bind, BODY_TIMEOUT, HEADER_TIMEOUT, TLS_HANDSHAKE_TIMEOUT};
pub use state::{ApiSnapshot, SharedState};
pub use tls::client_builder;

use axum::extract::State;
use axum::http::Uri;
use axum::response::Response;
use axum::routing::{get, post, MethodRouter};
use axum::Router;
use operator::{AppState, Ops};
use std::future::Future;
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::mpsc;

/// Every route of the DESIGN.md "HTTP API" contract. Unknown paths get a JSON
/// 404, known paths with a wrong method a JSON 405 (with `Allow`).
///
/// Mutating routes need `options`' credentials (403 when none are
/// configured); requests to this member's agent go into `commands`.
pub fn router(
    state: SharedState,
    options: ApiOptions,
    commands: mpsc::Sender<MemberCommand>,
) -> Router {
    let app = AppState {
        snapshot: state,
        ops: Arc::new(Ops::new(options, commands)),
    };
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
                .patch(operator::patch_config_handler)
                .put(operator::put_config_handler),
        )
        .route(
            "/switchover",
            post(operator::post_switchover)
                .delete(operator::delete_switchover)
                .fallback(views::method_not_allowed),
        )
        .route("/failover", mutating_post(operator::post_failover))
        .route(
            "/restart",
            post(operator::post_restart)
                .delete(operator::delete_restart)
                .fallback(views::method_not_allowed),
        )
        .route("/reinitialize", mutating_post(operator::post_reinitialize))
        .route("/reload", mutating_post(operator::post_reload))
        .route("/failsafe", mutating_post(operator::post_failsafe))
        .fallback(views::not_found)
        .with_state(app)
}

/// Serves `router(state, options, commands)` (over HTTPS when `options`
/// carry a TLS config) until `shutdown` completes, then lets in-flight
/// requests finish. At most `options.max_connections` connections are open
/// at once, and slow or silent clients are dropped (`server.rs`).
///
/// # Errors
///
/// None so far: accept errors (too many open files, aborted connections)
/// are handled inside the loop, not returned.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: SharedState,
    options: ApiOptions,
    commands: mpsc::Sender<MemberCommand>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let tls = options.tls.clone();
    let max_connections = options.max_connections;
    let app = router(state, options, commands);
    server::run(listener, app, tls, max_connections, shutdown).await
}

/// GET (and so HEAD, whose body axum strips) and OPTIONS, which HAProxy's
/// plain `option httpchk` sends.
fn health_route(check: health::Check) -> MethodRouter<AppState> {
    let handler = move |State(state): State<SharedState>, uri: Uri| async move {
        health::respond(&state.get(), check, &uri, Instant::now())
    };
    get(handler)
        .options(handler)
        .fallback(views::method_not_allowed)
}

fn view_route(render: fn(&ApiSnapshot, Instant) -> Response) -> MethodRouter<AppState> {
    let handler =
        move |State(state): State<SharedState>| async move { render(&state.get(), Instant::now()) };
    get(handler)
        .options(handler)
        .fallback(views::method_not_allowed)
}

fn mutating_post<H, T>(handler: H) -> MethodRouter<AppState>
where
    H: axum::handler::Handler<T, AppState>,
    T: 'static,
{
    post(handler).fallback(views::method_not_allowed)
}
