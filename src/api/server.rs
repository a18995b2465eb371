//! The API's accept loop: HTTP/1 through hyper, plain or over rustls, with
//! the limits that keep anyone who can reach the port from taking the
//! descriptors the HA loop needs (see `crate::fdlimit`).
//!
//! - At most `max_connections` connections at once, decided at accept
//!   time. When all are taken, the connections idle the longest (no
//!   request in progress: they never sent one, wait between keep-alive
//!   requests, or are still in their TLS handshake) are closed to make
//!   room, a few at a time; if every one is busy with a request, the new
//!   connection is closed at once.
//!   Nothing waits in a queue holding a descriptor, and a flood of idle
//!   connections cannot lock HAProxy's checks out. A connection whose
//!   bytes wait unread is spared (for [`UNREAD_GRACE`]): in a burst its
//!   task may not have run yet, and a health check's request is there
//!   from the start.
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
use std::os::fd::{AsRawFd, RawFd};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
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
/// How long an idle connection with unread bytes is spared when room is
/// needed: plenty for its task to get to them, too short for a client
/// that stops reading its answers to squat on its place.
const UNREAD_GRACE: Duration = Duration::from_secs(1);
/// Connections the kernel may hold for us before we accept them (capped by
/// net.core.somaxconn). They cost no descriptor of ours; tokio's default
/// of 128 would drop the SYN of a health check caught in a burst of a few
/// hundred connections, and the client only retries a second later.
const BACKLOG: u32 = 4096;

/// The API's listener on `addr`, with a backlog of [`BACKLOG`].
pub fn bind(addr: std::net::SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    // As std and tokio do: a restarted agent can listen again at once.
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(BACKLOG)
}

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
        let (io, closed) = match conns.admit(stream).await {
            Admission::Open(io, closed) => (io, closed),
            Admission::MadeRoom(io, closed) => {
                pressure.evicted();
                (io, closed)
            }
            Admission::Refused => {
                // The stream is dropped, so closed: no descriptor stays taken.
                pressure.refused();
                tokio::task::yield_now().await;
                continue;
            }
        };
        // Responses are one small write; Nagle would only add latency.
        if let Err(e) = io.io.set_nodelay(true) {
            tracing::debug!(error = %e, "could not set TCP_NODELAY on API connection");
        }
        let conn = Conn {
            app: app.clone(),
            http: http.clone(),
            watcher: graceful.watcher(),
            closed,
        };
        tokio::spawn(conn.serve(io, tls.clone()));
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
            "the HTTP API is at its limit of {} connections (api.max_connections): in the last {:.0?} it closed idle connections to make room for {} new ones, and refused {} while every connection was busy",
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
/// connection, and what each is doing, to find the one to close.
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
    /// The connection's socket, to look for unread bytes. Open as long as
    /// the entry exists: [`Tracked`] removes the entry before closing it.
    fd: RawFd,
    /// Dropping it (removing the entry) tells the connection to close.
    _close: oneshot::Sender<()>,
}

enum Admission {
    Open(Tracked<TcpStream>, oneshot::Receiver<()>),
    /// Admitted after closing the connection idle the longest.
    MadeRoom(Tracked<TcpStream>, oneshot::Receiver<()>),
    Refused,
}

impl Connections {
    fn new(max: usize) -> Self {
        Connections {
            permits: Arc::new(Semaphore::new(max.clamp(1, Semaphore::MAX_PERMITS))),
            table: Arc::new(Mutex::new(Table::default())),
        }
    }

    /// A place for `stream`, made by closing the connection idle the
    /// longest if need be.
    async fn admit(&self, stream: TcpStream) -> Admission {
        if let Ok(permit) = self.permits.clone().try_acquire_owned() {
            let (io, closed) = self.register(stream, permit);
            return Admission::Open(io, closed);
        }
        if self.close_oldest_idle() == 0 {
            return Admission::Refused;
        }
        match tokio::time::timeout(EVICTION_WAIT, self.permits.clone().acquire_owned()).await {
            Ok(Ok(permit)) => {
                let (io, closed) = self.register(stream, permit);
                Admission::MadeRoom(io, closed)
            }
            _ => Admission::Refused,
        }
    }

    fn register(
        &self,
        stream: TcpStream,
        permit: OwnedSemaphorePermit,
    ) -> (Tracked<TcpStream>, oneshot::Receiver<()>) {
        let (close, closed) = oneshot::channel();
        let mut table = lock(&self.table);
        let id = table.next_id;
        table.next_id += 1;
        table.open.insert(
            id,
            Entry {
                idle_since: Some(Instant::now()),
                fd: stream.as_raw_fd(),
                _close: close,
            },
        );
        let io = Tracked {
            entry: Tracker {
                id,
                table: self.table.clone(),
                owner: true,
            },
            io: stream,
            _permit: permit,
        };
        (io, closed)
    }

    /// Tells the connections idle the longest to close, passing over those
    /// with bytes waiting to be read: a few at once, so that in a flood
    /// the next arrivals find room without a search and a wait each.
    /// Returns how many were told.
    fn close_oldest_idle(&self) -> usize {
        let mut table = lock(&self.table);
        let batch = (table.open.len() / 16).clamp(1, 64);
        let mut idle: Vec<(Instant, u64, RawFd)> = table
            .open
            .iter()
            .filter_map(|(id, e)| e.idle_since.map(|since| (since, *id, e.fd)))
            .collect();
        idle.sort_unstable();
        let victims: Vec<u64> = idle
            .into_iter()
            .filter(|(since, _, fd)| since.elapsed() >= UNREAD_GRACE || !has_unread(*fd))
            .take(batch)
            .map(|(_, id, _)| id)
            .collect();
        for id in &victims {
            table.open.remove(id);
        }
        victims.len()
    }

    #[cfg(test)]
    fn open(&self) -> usize {
        lock(&self.table).open.len()
    }
}

/// Whether bytes wait unread on a socket: a non-blocking peek, which
/// takes no time and reads nothing away.
fn has_unread(fd: RawFd) -> bool {
    use nix::sys::socket::{recv, MsgFlags};
    let mut byte = [0u8; 1];
    matches!(
        recv(fd, &mut byte, MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT),
        Ok(n) if n > 0
    )
}

fn lock(table: &Mutex<Table>) -> MutexGuard<'_, Table> {
    table.lock().unwrap_or_else(|p| p.into_inner())
}

/// A connection's socket with its place in the table: dropped, it leaves
/// the table first (so its descriptor is never looked at once closed),
/// then closes the socket, then gives its permit back (so the permits
/// count open descriptors).
struct Tracked<S> {
    entry: Tracker,
    io: S,
    _permit: OwnedSemaphorePermit,
}

impl Drop for Tracker {
    fn drop(&mut self) {
        if self.owner {
            lock(&self.table).open.remove(&self.id);
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Tracked<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Tracked<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// Marks a connection busy while a request is in progress. The one in
/// [`Tracked`] (the owner) removes the entry when dropped.
struct Tracker {
    id: u64,
    table: Arc<Mutex<Table>>,
    owner: bool,
}

impl Tracker {
    fn handle(&self) -> Tracker {
        Tracker {
            id: self.id,
            table: self.table.clone(),
            owner: false,
        }
    }

    fn busy(&self) -> Busy {
        if let Some(e) = lock(&self.table).open.get_mut(&self.id) {
            e.idle_since = None;
        }
        Busy(self.handle())
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
    closed: oneshot::Receiver<()>,
}

impl Conn {
    async fn serve(mut self, io: Tracked<TcpStream>, tls: Option<tokio_rustls::TlsAcceptor>) {
        let tracker = io.entry.handle();
        let Some(acceptor) = tls else {
            return self.http1(io, tracker).await;
        };
        let handshake = tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(io));
        let io = tokio::select! {
            done = handshake => match done {
                Ok(Ok(io)) => io,
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
        self.http1(io, tracker).await
    }

    async fn http1<I>(self, io: I, tracker: Tracker)
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let Conn {
            app,
            http,
            watcher,
            closed,
        } = self;
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
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A connection to `listener`: the client's end and the server's.
    async fn pair(listener: &TcpListener) -> (TcpStream, TcpStream) {
        let addr = listener.local_addr().expect("addr");
        let client = TcpStream::connect(addr).await.expect("connect");
        let (server, _) = listener.accept().await.expect("accept");
        (client, server)
    }

    async fn listener() -> TcpListener {
        TcpListener::bind("127.0.0.1:0").await.expect("bind")
    }

    #[tokio::test]
    async fn a_full_table_makes_room_by_closing_the_longest_idle() {
        let l = listener().await;
        let conns = Connections::new(2);
        let (_ca, a) = pair(&l).await;
        let Admission::Open(a, mut a_closed) = conns.admit(a).await else {
            panic!("room for the first");
        };
        let (_cb, b) = pair(&l).await;
        let Admission::Open(b, b_closed) = conns.admit(b).await else {
            panic!("room for the second");
        };
        // `a` is busy with a request: `b` is the one to go, though newer.
        let busy = a.entry.busy();
        // What `b`'s task does once told: end, giving its place back.
        let gone = tokio::spawn(async move {
            b_closed.await.ok();
            drop(b);
        });
        let (_cc, c) = pair(&l).await;
        let Admission::MadeRoom(c, _c_closed) = conns.admit(c).await else {
            panic!("room made for the third");
        };
        gone.await.expect("b ended");
        assert!(a_closed.try_recv().is_err(), "the busy one stays");
        assert_eq!(conns.open(), 2);
        // Everything busy: a newcomer is refused at once.
        let busy_c = c.entry.busy();
        let (_cd, d) = pair(&l).await;
        assert!(matches!(conns.admit(d).await, Admission::Refused));
        drop(busy);
        drop(busy_c);
        // `a` finished its request before `c` did: idle the longest, it goes.
        let gone = tokio::spawn(async move {
            a_closed.await.ok();
            drop(a);
        });
        let (_ce, e) = pair(&l).await;
        assert!(matches!(conns.admit(e).await, Admission::MadeRoom(..)));
        gone.await.expect("a ended");
        drop(c);
    }

    #[tokio::test]
    async fn a_connection_with_unread_bytes_is_spared() {
        let l = listener().await;
        let conns = Connections::new(1);
        let (mut client, a) = pair(&l).await;
        client
            .write_all(b"GET /primary HTTP/1.0\r\n\r\n")
            .await
            .expect("write");
        let Admission::Open(mut a, a_closed) = conns.admit(a).await else {
            panic!("room for the first");
        };
        // Its request waits to be read: the newcomer goes instead.
        while !has_unread(a.io.as_raw_fd()) {
            tokio::task::yield_now().await;
        }
        let (_cb, b) = pair(&l).await;
        assert!(matches!(conns.admit(b).await, Admission::Refused));
        assert_eq!(conns.open(), 1);
        // Read (and idle): now it can make room.
        let mut buf = [0u8; 64];
        let n = a.io.read(&mut buf).await.expect("read");
        assert!(n > 0);
        let gone = tokio::spawn(async move {
            a_closed.await.ok();
            drop(a);
        });
        let (_cc, c) = pair(&l).await;
        assert!(matches!(conns.admit(c).await, Admission::MadeRoom(..)));
        gone.await.expect("a ended");
    }

    #[tokio::test]
    async fn a_closed_connection_gives_its_place_back() {
        let l = listener().await;
        let conns = Connections::new(1);
        let (_ca, a) = pair(&l).await;
        let Admission::Open(a, _closed) = conns.admit(a).await else {
            panic!("room for the first");
        };
        drop(a);
        assert_eq!(conns.open(), 0);
        let (_cb, b) = pair(&l).await;
        assert!(matches!(conns.admit(b).await, Admission::Open(..)));
    }
}
