//! The API's accept loop: HTTP/1 through hyper, plain or over rustls, with
//! the limits that keep anyone who can reach the port from taking the
//! descriptors the HA loop needs (see `crate::fdlimit`).
//!
//! - At most `max_connections` connections at once, decided at accept
//!   time. When all are taken, the connection idle the longest (no request
//!   in progress: it never sent one, it waits between keep-alive requests,
//!   or it is still in its TLS handshake) is closed to make room; if every
//!   one is busy with a request, the new connection is closed at once.
//!   Nothing waits in a queue holding a descriptor, and a flood of idle
//!   connections cannot lock HAProxy's checks out.
//! - A request head must arrive within [`HEADER_TIMEOUT`] of the connection
//!   opening or of the previous response: hyper's `header_read_timeout`,
//!   which so doubles as the idle keep-alive timeout. A body must arrive
//!   within [`BODY_TIMEOUT`] (operator.rs), a TLS handshake within
//!   [`TLS_HANDSHAKE_TIMEOUT`].
//! - HTTP/1 only: HAProxy's checks and the CLI speak it, and HTTP/2 would
//!   let one connection carry many slow streams past the limits above.

use axum::Router;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, OwnedSemaphorePermit, Semaphore};
use tower::ServiceExt;

/// A request head (all of it) within this of the connection opening or of
/// the previous response; also how long an idle keep-alive connection
/// stays open. HAProxy sends its check in the first packet.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// A request body (all of it, at most `BODY_LIMIT`) within this.
pub const BODY_TIMEOUT: Duration = Duration::from_secs(10);
/// A TLS handshake within this of the connection opening.
pub const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// hyper's smallest read buffer ceiling is 8 KiB; requests here are a few
/// hundred bytes, so a connection never needs more than its first buffer.
const MAX_BUF: usize = 16 * 1024;
/// How long in-flight requests may finish after shutdown.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// How long a new connection may wait for the one closed to make room
/// for it to give back its place (microseconds, unless the runtime is
/// starved).
const EVICTION_WAIT: Duration = Duration::from_millis(100);
/// Pause after an accept error such as EMFILE, so as not to spin while
/// descriptors are short.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);
/// At most one warning per this about the limit or accept errors: a flood
/// must not turn into a flood of log lines.
const WARN_EVERY: Duration = Duration::from_secs(10);

/// Serves `app` on `listener` until `shutdown` completes, then lets
/// in-flight requests finish for up to [`SHUTDOWN_GRACE`].
pub(crate) async fn run(
    listener: TcpListener,
    app: Router,
    tls: Option<Arc<rustls::ServerConfig>>,
    max_connections: usize,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let conns = Connections::new(max_connections);
    let tls = tls.map(tokio_rustls::TlsAcceptor::from);
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .max_buf_size(MAX_BUF);
    let graceful = GracefulShutdown::new();
    let mut pressure = Pressure::new(max_connections);
    let mut accept_warned: Option<Instant> = None;
    tokio::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    accept_failed(&e, &mut accept_warned).await;
                    continue;
                }
            },
        };
        let (slot, closed) = match conns.admit().await {
            Admission::Open(slot, closed) => (slot, closed),
            Admission::MadeRoom(slot, closed) => {
                pressure.evicted();
                (slot, closed)
            }
            Admission::Refused => {
                pressure.refused();
                // Dropping the stream closes it: no descriptor stays taken.
                continue;
            }
        };
        // Responses are one small write; Nagle would only add latency.
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(error = %e, "could not set TCP_NODELAY on API connection");
        }
        let conn = Conn {
            app: app.clone(),
            http: http.clone(),
            watcher: graceful.watcher(),
            slot,
            closed,
        };
        tokio::spawn(conn.serve(stream, tls.clone()));
    }
    drop(listener);
    if tokio::time::timeout(SHUTDOWN_GRACE, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::debug!(
            "API connections still open {SHUTDOWN_GRACE:?} after shutdown were dropped"
        );
    }
    Ok(())
}

/// Errors of one connection (ECONNABORTED, a reset) are the client's
/// business; anything else (EMFILE, ENFILE, ENOBUFS) is ours and worth a
/// warning, and a pause so the loop does not spin until it clears.
async fn accept_failed(e: &std::io::Error, warned: &mut Option<Instant>) {
    use std::io::ErrorKind::*;
    if matches!(
        e.kind(),
        ConnectionAborted | ConnectionReset | ConnectionRefused | Interrupted
    ) {
        return;
    }
    if warned.is_none_or(|at| at.elapsed() >= WARN_EVERY) {
        tracing::warn!("the HTTP API cannot accept connections: {e}");
        *warned = Some(Instant::now());
    }
    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
}

/// Counts what the limit did and says so at most every [`WARN_EVERY`].
struct Pressure {
    max: usize,
    evicted: u64,
    refused: u64,
    since: Instant,
    warned: Option<Instant>,
}

impl Pressure {
    fn new(max: usize) -> Self {
        Pressure {
            max,
            evicted: 0,
            refused: 0,
            since: Instant::now(),
            warned: None,
        }
    }

    fn evicted(&mut self) {
        self.evicted += 1;
        self.report();
    }

    fn refused(&mut self) {
        self.refused += 1;
        self.report();
    }

    fn report(&mut self) {
        if self.warned.is_some_and(|at| at.elapsed() < WARN_EVERY) {
            return;
        }
        tracing::warn!(
            "the HTTP API is at its limit of {} connections (api.max_connections): in the last {:.0?} it closed {} idle connections to make room and refused {} while every connection had a request in progress",
            self.max,
            self.since.elapsed(),
            self.evicted,
            self.refused
        );
        let now = Instant::now();
        self.warned = Some(now);
        self.since = now;
        self.evicted = 0;
        self.refused = 0;
    }
}

/// The open connections: a semaphore with one permit per allowed
/// connection, and what each is doing, to find the one idle the longest.
struct Connections {
    permits: Arc<Semaphore>,
    table: Arc<Mutex<Table>>,
}

#[derive(Default)]
struct Table {
    next_id: u64,
    open: HashMap<u64, Entry>,
}

struct Entry {
    /// Since when no request is in progress (None: one is).
    idle_since: Option<Instant>,
    /// Dropping it (removing the entry) tells the connection to close.
    _close: oneshot::Sender<()>,
}

enum Admission {
    Open(Slot, oneshot::Receiver<()>),
    /// Admitted after closing the connection idle the longest.
    MadeRoom(Slot, oneshot::Receiver<()>),
    Refused,
}

impl Connections {
    fn new(max: usize) -> Self {
        Connections {
            permits: Arc::new(Semaphore::new(max.clamp(1, Semaphore::MAX_PERMITS))),
            table: Arc::new(Mutex::new(Table::default())),
        }
    }

    async fn admit(&self) -> Admission {
        if let Ok(permit) = self.permits.clone().try_acquire_owned() {
            let (slot, closed) = self.register(permit);
            return Admission::Open(slot, closed);
        }
        if !self.close_oldest_idle() {
            return Admission::Refused;
        }
        match tokio::time::timeout(EVICTION_WAIT, self.permits.clone().acquire_owned()).await {
            Ok(Ok(permit)) => {
                let (slot, closed) = self.register(permit);
                Admission::MadeRoom(slot, closed)
            }
            _ => Admission::Refused,
        }
    }

    fn register(&self, permit: OwnedSemaphorePermit) -> (Slot, oneshot::Receiver<()>) {
        let (close, closed) = oneshot::channel();
        let mut table = lock(&self.table);
        let id = table.next_id;
        table.next_id += 1;
        table.open.insert(
            id,
            Entry {
                idle_since: Some(Instant::now()),
                _close: close,
            },
        );
        let slot = Slot {
            tracker: Tracker {
                id,
                table: self.table.clone(),
            },
            _permit: permit,
        };
        (slot, closed)
    }

    /// Tells the connection idle the longest to close; false if every
    /// connection has a request in progress.
    fn close_oldest_idle(&self) -> bool {
        let mut table = lock(&self.table);
        let oldest = table
            .open
            .iter()
            .filter_map(|(id, e)| e.idle_since.map(|since| (since, *id)))
            .min();
        match oldest {
            Some((_, id)) => {
                table.open.remove(&id);
                true
            }
            None => false,
        }
    }

    #[cfg(test)]
    fn open(&self) -> usize {
        lock(&self.table).open.len()
    }
}

fn lock(table: &Mutex<Table>) -> MutexGuard<'_, Table> {
    table.lock().unwrap_or_else(|p| p.into_inner())
}

/// One connection's place: its permit and its entry, given back when the
/// connection ends (the permit after the socket is closed, as the slot is
/// dropped after the connection).
struct Slot {
    tracker: Tracker,
    _permit: OwnedSemaphorePermit,
}

impl Drop for Slot {
    fn drop(&mut self) {
        lock(&self.tracker.table).open.remove(&self.tracker.id);
    }
}

/// Marks a connection busy while a request is in progress.
#[derive(Clone)]
struct Tracker {
    id: u64,
    table: Arc<Mutex<Table>>,
}

impl Tracker {
    fn busy(&self) -> Busy {
        if let Some(e) = lock(&self.table).open.get_mut(&self.id) {
            e.idle_since = None;
        }
        Busy(self.clone())
    }
}

struct Busy(Tracker);

impl Drop for Busy {
    fn drop(&mut self) {
        if let Some(e) = lock(&self.0.table).open.get_mut(&self.0.id) {
            e.idle_since = Some(Instant::now());
        }
    }
}

/// One accepted connection and what serving it needs.
struct Conn {
    app: Router,
    http: http1::Builder,
    watcher: Watcher,
    slot: Slot,
    closed: oneshot::Receiver<()>,
}

impl Conn {
    async fn serve(mut self, stream: TcpStream, tls: Option<tokio_rustls::TlsAcceptor>) {
        let Some(acceptor) = tls else {
            return self.http1(stream).await;
        };
        let handshake = tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(stream));
        let stream = tokio::select! {
            done = handshake => match done {
                Ok(Ok(stream)) => stream,
                Ok(Err(e)) => {
                    tracing::debug!("API TLS handshake failed: {e}");
                    return;
                }
                Err(_) => {
                    tracing::debug!("API TLS handshake not done within {TLS_HANDSHAKE_TIMEOUT:?}");
                    return;
                }
            },
            _ = &mut self.closed => return,
        };
        self.http1(stream).await
    }

    async fn http1<I>(self, io: I)
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let Conn {
            app,
            http,
            watcher,
            slot,
            closed,
        } = self;
        let tracker = slot.tracker.clone();
        let service = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
            let busy = tracker.busy();
            let app = app.clone();
            async move {
                let response = app.oneshot(req).await;
                drop(busy);
                response
            }
        });
        let conn = watcher.watch(http.serve_connection(TokioIo::new(io), service));
        tokio::select! {
            done = conn => {
                if let Err(e) = done {
                    tracing::debug!("API connection ended: {e}");
                }
            }
            _ = closed => {}
        }
        // The socket is closed (the connection dropped) before the slot
        // gives its permit back.
        drop(slot);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_full_table_makes_room_by_closing_the_longest_idle() {
        let conns = Connections::new(2);
        let Admission::Open(a, mut a_closed) = conns.admit().await else {
            panic!("room for the first");
        };
        let Admission::Open(b, b_closed) = conns.admit().await else {
            panic!("room for the second");
        };
        // `a` is busy with a request: `b` is the one to go, though newer.
        let busy = a.tracker.busy();
        // What `b`'s task does once told: end, giving its place back.
        let admitted = tokio::spawn(async move {
            b_closed.await.ok();
            drop(b);
        });
        let Admission::MadeRoom(c, _c_closed) = conns.admit().await else {
            panic!("room made for the third");
        };
        admitted.await.unwrap();
        assert!(a_closed.try_recv().is_err(), "the busy one stays");
        assert_eq!(conns.open(), 2);
        // Everything busy: a newcomer is refused at once.
        let busy_c = c.tracker.busy();
        assert!(matches!(conns.admit().await, Admission::Refused));
        drop(busy);
        drop(busy_c);
        // `a` finished its request before `c` did: idle the longest, it goes.
        let spare = tokio::spawn(async move {
            a_closed.await.ok();
            drop(a);
        });
        assert!(matches!(conns.admit().await, Admission::MadeRoom(..)));
        spare.await.unwrap();
        drop(c);
    }

    #[tokio::test]
    async fn a_closed_connection_gives_its_place_back() {
        let conns = Connections::new(1);
        let Admission::Open(a, _closed) = conns.admit().await else {
            panic!("room for the first");
        };
        drop(a);
        assert_eq!(conns.open(), 0);
        assert!(matches!(conns.admit().await, Admission::Open(..)));
    }
}
