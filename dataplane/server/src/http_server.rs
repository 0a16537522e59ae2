//! The HTTP server of the client port (`--listen`) and of `--metrics-listen`: axum's router on
//! hyper, as `axum::serve` runs it, with bounds on the clients that stop reading or never
//! finish a request.
//!
//! `axum::serve` gives hyper no timer and no way to configure it, and so no timeout at all:
//! a client that opened a connection and sent its request head a byte at a time, or nothing,
//! and one that asked for a large response (a media download, a long page) and then read
//! nothing while its kernel kept acknowledging (TCP keepalive and `TCP_USER_TIMEOUT` see a
//! live peer), each held a connection, its task and, for a download, an open file, for good:
//! enough of them exhausted the process's file descriptors. Here:
//!
//! - A request head (HTTP/1) must arrive whole within [`HEADER_READ_TIMEOUT`] of the
//!   connection's start or of the previous response (hyper's `header_read_timeout`, which
//!   needs a timer): an idle keep-alive connection is closed after it too. A connection's
//!   first byte must come within it too, HTTP/2 included ([`StallBound`]).
//! - A request head (HTTP/1) larger than [`MAX_HEAD_BYTES`] is refused 431 before it is read
//!   whole.
//! - A connection with no request in flight for as long is closed, gracefully ([`InFlight`]):
//!   hyper bounds no HTTP/2 connection's idleness (its pings, were they on, are answered by
//!   any client's stack), nor a connection that stopped partway through the HTTP/2 preface
//!   (too little to tell HTTP/1 from HTTP/2, so no bound of hyper's was armed): a client that
//!   sent the preface, or a request, and then nothing was held for good. A request is in
//!   flight until its response's last byte is sent (or its stream reset): a slow response,
//!   an upload, a download is never cut by it. An HTTP/2 WebSocket (extended CONNECT,
//!   accepted) is in flight for as long as its task runs ([`WebSocketInFlight`], which its
//!   handler moves into that task): its connection is never idle under it (the gateway pings
//!   it), and is idle again, and closed, once it has ended.
//! - Every write to the connection must be taken by the socket within `--http-write-timeout`
//!   ([`StallBound`]): a write still waiting then fails, and hyper ends the connection (its
//!   response cut, its file closed). A client that reads, however slowly, is never cut, as
//!   long as it takes some bytes within the timeout. The bound is on the socket, so it holds
//!   for HTTP/2 and for upgraded WebSockets too (where the gateway's own `write_timeout`,
//!   30 s, comes first unless the flag is shorter).
//! - An HTTP/2 response's data must be taken by its client within `--http-write-timeout` too
//!   ([`Unsent`]): an HTTP/2 client takes nothing of a response by opening no flow-control
//!   window for its stream, and then nothing waits on the socket for the bound above to see.
//!   A response body's chunk that hyper holds unsent for as long ends the connection (a large
//!   one is handed to hyper a piece at a time, [`UNSENT_PIECE`], so that what its client does
//!   not take stays with the response, not in the connection's send buffer). Such a
//!   client held the response in flight for good, and its connection, task and body with it
//!   (an open file, for a media download; a page of messages of up to tens of megabytes), a
//!   few hundred streams to a connection.
//!
//! - A port holds at most as many connections as the process's open-file limit allows, less
//!   what it keeps for everything else ([`most_connections`]): a connection past it closes the
//!   oldest of those with no request in flight ([`Connections`]), or is closed itself if every
//!   one is busy. A client that opened connections and sent nothing on them (or the HTTP/2
//!   preface only, held a minute each) took every file descriptor of the process: no device
//!   could connect, no probe was answered, and the process's own files could not be opened.
//!
//! Request bodies are read by their handlers, each bounded there: media uploads end after
//! 60 s without bytes (`courier_media`), and so do JSON bodies (`http::BODY_IDLE_TIMEOUT`).

use axum::Router;
use axum::body::{Body, Bytes, HttpBody};
use axum::http::{Method, Request, Response, Version};
use axum::serve::Listener;
use courier_rpc::stall::StallBound;
use hyper::body::{Frame, Incoming, SizeHint};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::service::TowerToHyperService;
use std::collections::BTreeMap;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::sync::{Notify, watch};

/// How long a client has to send a request's head (HTTP/1), from the connection's start or the
/// end of its previous response: hyper's default, which `axum::serve` left unarmed.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// Most bytes of a request's head (HTTP/1: its request line and headers), past which it is
/// refused 431 before it is read whole: hyper's default, ~400 KiB, let a client that needs no
/// token hold that much memory per connection for [`HEADER_READ_TIMEOUT`]. A token, in a
/// header or the URL, takes a few KiB at most. HTTP/2's bound is hyper's, 16 KiB of headers.
/// hyper reads a request's body into buffers of at most this size too.
const MAX_HEAD_BYTES: usize = 64 * 1024;

/// The bounds [`serve`] puts on each connection.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    /// [`HEADER_READ_TIMEOUT`] outside tests.
    pub header_read_timeout: Duration,
    /// `--http-write-timeout`: longest a write may wait for the socket to take any byte.
    pub write_timeout: Duration,
}

impl ConnectionLimits {
    /// The limits of `--http-write-timeout` `write_timeout`.
    pub fn new(write_timeout: Duration) -> Self {
        Self {
            header_read_timeout: HEADER_READ_TIMEOUT,
            write_timeout,
        }
    }
}

/// Most bytes a client connection's socket holds not yet sent (Linux's `TCP_NOTSENT_LOWAT`):
/// a write waits until the client has taken what came before, rather than until half of a send
/// buffer the kernel grows to megabytes has drained. So a write waits for `--http-write-timeout`
/// only when the client took next to nothing meanwhile (~2 KB a second at the default 60 s),
/// not when it reads steadily over a slow link; and a client that stopped reading holds this
/// much of the kernel's memory, not megabytes. Data in flight is not bounded by it.
#[cfg(target_os = "linux")]
const UNSENT_LIMIT: u32 = 128 * 1024;

/// Bounds what `tcp` holds not yet sent ([`UNSENT_LIMIT`]), on Linux.
fn bound_unsent(tcp: &tokio::net::TcpStream) -> std::io::Result<()> {
    #[cfg(target_os = "linux")]
    socket2::SockRef::from(tcp).set_tcp_notsent_lowat(UNSENT_LIMIT)?;
    #[cfg(not(target_os = "linux"))]
    let _ = tcp;
    Ok(())
}

/// File descriptors of the process a port leaves to everything else, at most: the store's
/// files (it keeps up to 900 open), media files, connections to other nodes, the other ports
/// ([`most_connections`]).
const FILES_KEPT: u64 = 1024;

/// Most connections a port holds at once: the process's open-file limit (`ulimit -n`) less
/// [`FILES_KEPT`], or less half of it if it is low (512 of the 1,024 of many systems). Read at
/// each connection, so a limit raised with `prlimit` counts at once.
fn most_connections() -> usize {
    let limit = rustix::process::getrlimit(rustix::process::Resource::Nofile).current;
    let Some(limit) = limit else {
        return usize::MAX;
    };
    let most = limit - FILES_KEPT.min(limit / 2);
    usize::try_from(most).unwrap_or(usize::MAX)
}

/// The connections of a port: how many sockets are open, upgraded WebSockets included
/// ([`CountedSocket`]), and those served as HTTP by the port's tasks, in the order they were
/// accepted, with their requests in flight ([`InFlight`]), to close the oldest with none when
/// the port is full ([`Connections::close_oldest_idle`]).
#[derive(Default)]
struct Connections {
    open: Arc<AtomicUsize>,
    served: Mutex<BTreeMap<u64, ServedConnection>>,
}

/// A connection served as HTTP ([`Connections`]).
struct ServedConnection {
    in_flight: watch::Receiver<usize>,
    /// Told when the connection is to close.
    close: Arc<Notify>,
}

impl Connections {
    /// Tells the oldest connection with no request in flight to close; false if every one has
    /// a request in flight (an HTTP/2 WebSocket counts as one).
    fn close_oldest_idle(&self) -> bool {
        let mut served = self.served.lock().unwrap_or_else(|e| e.into_inner());
        let oldest = served
            .iter()
            .find(|(_, connection)| *connection.in_flight.borrow() == 0)
            .map(|(id, _)| *id);
        let Some(connection) = oldest.and_then(|id| served.remove(&id)) else {
            return false;
        };
        connection.close.notify_one();
        true
    }

    fn forget(&self, id: u64) {
        let mut served = self.served.lock().unwrap_or_else(|e| e.into_inner());
        served.remove(&id);
    }
}

/// A client's socket, counted among its port's open ones ([`Connections`]) until it is dropped,
/// with its connection or, once upgraded, its WebSocket.
struct CountedSocket {
    io: tokio::net::TcpStream,
    open: Arc<AtomicUsize>,
}

impl CountedSocket {
    fn new(io: tokio::net::TcpStream, open: &Arc<AtomicUsize>) -> Self {
        open.fetch_add(1, Ordering::Relaxed);
        Self {
            io,
            open: open.clone(),
        }
    }
}

impl Drop for CountedSocket {
    fn drop(&mut self) {
        self.open.fetch_sub(1, Ordering::Relaxed);
    }
}

impl tokio::io::AsyncRead for CountedSocket {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for CountedSocket {
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

/// Serves `app` on `listener` as `axum::serve(listener, app).with_graceful_shutdown(signal)`
/// does, with `limits` on every connection (module documentation): once `signal` completes,
/// no connection is accepted, each open one finishes its request in flight and closes, and
/// this returns when the last has closed.
pub async fn serve<L>(
    mut listener: L,
    app: Router,
    limits: ConnectionLimits,
    signal: impl Future<Output = ()> + Send + 'static,
) where
    L: Listener<Io = tokio::net::TcpStream>,
{
    // As `axum::serve`: the connections wait for `stop_rx` to be dropped, and this for every
    // connection's clone of `closed_rx` to be.
    let (stop_tx, stop_rx) = watch::channel(());
    let (closed_tx, closed_rx) = watch::channel(());
    tokio::spawn(async move {
        signal.await;
        drop(stop_rx);
    });
    // `Router::with_state` builds the route table once; each connection clones it (an `Arc`).
    let app: Router = app.with_state(());
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(MAX_HEAD_BYTES);
    // HTTP/2 WebSockets (RFC 8441) need the extended CONNECT, as in `axum::serve`.
    builder
        .http2()
        .timer(TokioTimer::new())
        .enable_connect_protocol();
    let connections = Arc::new(Connections::default());
    for id in 0u64.. {
        let (io, _address) = tokio::select! {
            accepted = listener.accept() => accepted,
            () = stop_tx.closed() => break,
        };
        if connections.open.load(Ordering::Relaxed) >= most_connections()
            && !connections.close_oldest_idle()
        {
            tracing::debug!("HTTP connection refused: the port holds all it may, each busy");
            continue;
        }
        // The write bound below needs it: a client reading slowly is not cut.
        if let Err(e) = bound_unsent(&io) {
            tracing::warn!(error = %e, "could not set TCP_NOTSENT_LOWAT on a connection");
        }
        let io = TokioIo::new(StallBound::new(
            CountedSocket::new(io, &connections.open),
            limits.header_read_timeout,
            limits.write_timeout,
        ));
        let (in_flight, idle) = InFlight::new();
        let close = Arc::new(Notify::new());
        let served = ServedConnection {
            in_flight: idle.clone(),
            close: close.clone(),
        };
        connections
            .served
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, served);
        let unsent = Arc::new(Unsent::new());
        let service = Counted {
            app: TowerToHyperService::new(app.clone()),
            in_flight,
            unsent: unsent.clone(),
        };
        let (stop_tx, closed_rx, builder) = (stop_tx.clone(), closed_rx.clone(), builder.clone());
        let connections = connections.clone();
        tokio::spawn(async move {
            let connection = builder.serve_connection_with_upgrades(io, service);
            tokio::pin!(connection);
            let mut stopping = std::pin::pin!(stop_tx.closed());
            let mut idle = std::pin::pin!(idle_for(idle, limits.header_read_timeout));
            let mut not_taken = std::pin::pin!(unsent_for(unsent, limits.write_timeout));
            let mut told = false;
            loop {
                tokio::select! {
                    served = connection.as_mut() => {
                        if let Err(e) = served {
                            tracing::debug!(error = %e, "HTTP connection ended");
                        }
                        break;
                    }
                    () = &mut not_taken => {
                        tracing::debug!("HTTP connection ended: a response was not taken in time");
                        break;
                    }
                    () = close.notified() => {
                        tracing::debug!("HTTP connection closed: the port is full, and it was the oldest idle");
                        break;
                    }
                    () = &mut stopping, if !told => {
                        told = true;
                        connection.as_mut().graceful_shutdown();
                    }
                    () = &mut idle, if !told => {
                        tracing::debug!("HTTP connection closed: no request in flight in time");
                        connection.as_mut().graceful_shutdown();
                        // HTTP/2's graceful close waits for the client to answer a ping: one
                        // that answers nothing is dropped after as long again.
                        let limit = limits.header_read_timeout;
                        if let Ok(Err(e)) = tokio::time::timeout(limit, connection.as_mut()).await {
                            tracing::debug!(error = %e, "HTTP connection ended");
                        }
                        break;
                    }
                }
            }
            connections.forget(id);
            drop(closed_rx);
        });
    }
    drop(closed_rx);
    drop(listener);
    closed_tx.closed().await;
}

/// The requests of one connection in flight: from their call until their response's body is
/// dropped (sent whole, or its stream reset), and an HTTP/2 WebSocket's until its task ends
/// ([`WebSocketInFlight`]). Its receiver is the connection's [`idle_for`].
#[derive(Clone)]
struct InFlight(Arc<watch::Sender<usize>>);

impl InFlight {
    fn new() -> (Self, watch::Receiver<usize>) {
        let (sender, receiver) = watch::channel(0);
        (Self(Arc::new(sender)), receiver)
    }

    /// One more request in flight, until the guard is dropped.
    fn open(&self) -> Open {
        self.0.send_modify(|n| *n += 1);
        Open(self.0.clone())
    }
}

/// A request in flight ([`InFlight`]), counted until dropped.
struct Open(Arc<watch::Sender<usize>>);

impl Drop for Open {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n = n.saturating_sub(1));
    }
}

/// An HTTP/2 WebSocket's place among its connection's requests in flight ([`InFlight`]):
/// in an extended CONNECT request's extensions (HTTP/2, RFC 8441), counted until its last
/// clone is dropped. Its stream outlives its response, whose body hyper drops once the head
/// is sent: the handler that accepts the WebSocket moves a clone into the socket's task, so
/// that the connection is not idle while the WebSocket is open and is again once its task has
/// ended. A CONNECT refused, or taken by another route, drops it with the request.
#[derive(Clone)]
pub struct WebSocketInFlight {
    _open: Arc<Open>,
}

/// Resolves once `in_flight` has stayed at 0 for `limit`.
async fn idle_for(mut in_flight: watch::Receiver<usize>, limit: Duration) {
    loop {
        // The sender lives as long as the connection's service: never dropped before this.
        if in_flight.wait_for(|n| *n == 0).await.is_err() {
            return std::future::pending().await;
        }
        tokio::select! {
            () = tokio::time::sleep(limit) => return,
            changed = in_flight.changed() => {
                if changed.is_err() {
                    return std::future::pending().await;
                }
            }
        }
    }
}

/// The response data of one HTTP/2 connection that hyper holds unsent: a response body that
/// gave it a chunk is not asked for the next until the chunk is on its way to the client, so
/// the time since is how long the client has taken nothing of that response. Over HTTP/1 the
/// client's socket takes the data or not ([`StallBound`] bounds that), and hyper asks a body
/// for chunks ahead of what the socket took: not tracked.
struct Unsent {
    /// When the connection started: the clock of `bodies`.
    epoch: Instant,
    /// Each response body's time of the chunk hyper holds from it (ms since `epoch`, plus
    /// one), 0 if none; a body's entry goes when the body does.
    bodies: Mutex<Vec<Weak<AtomicU64>>>,
}

impl Unsent {
    fn new() -> Self {
        Self {
            epoch: Instant::now(),
            bodies: Mutex::default(),
        }
    }

    /// A new response body's entry.
    fn track(self: &Arc<Self>) -> UnsentBody {
        let held = Arc::new(AtomicU64::new(0));
        let mut bodies = self.bodies.lock().unwrap_or_else(|e| e.into_inner());
        // The bodies that went: the list holds those of the requests in flight, and a few.
        bodies.retain(|body| body.strong_count() > 0);
        bodies.push(Arc::downgrade(&held));
        UnsentBody {
            held,
            epoch: self.epoch,
            rest: Bytes::new(),
        }
    }

    /// Whether a body's chunk has been held unsent for `limit` or more.
    fn held_for(&self, limit: Duration) -> bool {
        let now = since(self.epoch);
        let limit = u64::try_from(limit.as_millis()).unwrap_or(u64::MAX);
        let bodies = self.bodies.lock().unwrap_or_else(|e| e.into_inner());
        bodies.iter().filter_map(Weak::upgrade).any(|body| {
            let held = body.load(Ordering::Relaxed);
            held != 0 && now.saturating_sub(held) >= limit
        })
    }
}

/// Milliseconds since `epoch`, plus one (never 0: [`Unsent`]'s "none").
fn since(epoch: Instant) -> u64 {
    u64::try_from(epoch.elapsed().as_millis())
        .unwrap_or(u64::MAX - 1)
        .saturating_add(1)
}

/// One response body's entry in [`Unsent`], with what it has read from the body and not yet
/// handed to hyper.
struct UnsentBody {
    held: Arc<AtomicU64>,
    epoch: Instant,
    /// The rest of a chunk larger than [`UNSENT_PIECE`].
    rest: Bytes,
}

/// Most bytes an HTTP/2 response hands hyper at once ([`Unsent`]): hyper hands a chunk whole
/// to the connection's send buffer at the first byte of flow-control window its client opens,
/// and the response is then done, whatever the client takes of it. A page of messages is one
/// chunk of up to tens of megabytes: handed whole, what its client did not take stayed in the
/// send buffer for as long as anything else kept the connection busy (an HTTP/2 WebSocket:
/// for good). A piece at a time, it stays with the response, which [`Unsent`] bounds: what a
/// client that opens no window leaves in the connection's send buffers is at most a piece a
/// stream, a few MiB for the few hundred streams a connection may have (hyper's own bound,
/// 400 KiB a stream, is on what waits for the socket, which [`StallBound`] bounds).
const UNSENT_PIECE: usize = 16 * 1024;

/// Resolves once a response of the connection has held a chunk unsent for `limit`: looked at
/// four times a limit, so such a response ends its connection between one limit and a
/// quarter more after its client last took from it.
async fn unsent_for(unsent: Arc<Unsent>, limit: Duration) {
    let period = (limit / 4).max(Duration::from_millis(1));
    let mut checks = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    checks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        checks.tick().await;
        if unsent.held_for(limit) {
            return;
        }
    }
}

/// The router, as hyper calls it, counting the requests in flight on its connection.
struct Counted {
    app: TowerToHyperService<Router>,
    in_flight: InFlight,
    unsent: Arc<Unsent>,
}

impl hyper::service::Service<Request<Incoming>> for Counted {
    type Response = Response<CountedBody>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn call(&self, mut request: Request<Incoming>) -> Self::Future {
        let open = self.in_flight.open();
        let unsent = (request.version() == Version::HTTP_2).then(|| self.unsent.track());
        if request.method() == Method::CONNECT {
            // Kept only by a WebSocket accepted: a refused CONNECT is a request like any
            // other (else any client could keep its connection from ever being idle with one).
            let websocket = WebSocketInFlight {
                _open: Arc::new(self.in_flight.open()),
            };
            request.extensions_mut().insert(websocket);
        }
        let answered = self.app.call(request);
        Box::pin(async move {
            let response = answered.await?;
            Ok(response.map(|body| CountedBody {
                body,
                _open: open,
                unsent,
            }))
        })
    }
}

/// A response's body, its request counted in flight until it is dropped, and over HTTP/2 the
/// time of the chunk hyper holds from it noted ([`Unsent`]).
struct CountedBody {
    body: Body,
    _open: Open,
    unsent: Option<UnsentBody>,
}

impl HttpBody for CountedBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let this = &mut *self;
        let Some(unsent) = &mut this.unsent else {
            return Pin::new(&mut this.body).poll_frame(cx);
        };
        let polled = if unsent.rest.is_empty() {
            Pin::new(&mut this.body).poll_frame(cx)
        } else {
            Poll::Ready(Some(Ok(Frame::data(std::mem::take(&mut unsent.rest)))))
        };
        // A piece at a time ([`UNSENT_PIECE`]).
        let polled = polled.map_ok(|frame| match frame.into_data() {
            Ok(mut data) => {
                if data.len() > UNSENT_PIECE {
                    unsent.rest = data.split_off(UNSENT_PIECE);
                }
                Frame::data(data)
            }
            Err(frame) => frame,
        });
        // Data handed to hyper: until it asks for more, the client has taken nothing of it.
        // Otherwise (the body waits, or ended) hyper holds nothing of this body.
        let held = match &polled {
            Poll::Ready(Some(Ok(frame))) if frame.is_data() => since(unsent.epoch),
            _ => 0,
        };
        unsent.held.store(held, Ordering::Relaxed);
        polled
    }

    fn is_end_stream(&self) -> bool {
        let rest = self.unsent.as_ref().map_or(0, |unsent| unsent.rest.len());
        rest == 0 && self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let rest = self.unsent.as_ref().map_or(0, |unsent| unsent.rest.len()) as u64;
        let inner = self.body.size_hint();
        let mut hint = SizeHint::new();
        hint.set_lower(inner.lower().saturating_add(rest));
        if let Some(upper) = inner.upper() {
            hint.set_upper(upper.saturating_add(rest));
        }
        hint
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::Extension;
    use axum::extract::ws::{Message, WebSocketUpgrade};
    use futures::StreamExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn limits(header: u64, write: u64) -> ConnectionLimits {
        ConnectionLimits {
            header_read_timeout: Duration::from_millis(header),
            write_timeout: Duration::from_millis(write),
        }
    }

    /// An HTTP/2 client of `address`, its streams opened with a flow-control window of
    /// `window` bytes (hyper's default: `None`), and its connection's task.
    async fn http2_client(
        address: std::net::SocketAddr,
        window: Option<u32>,
    ) -> (
        hyper::client::conn::http2::SendRequest<axum::body::Body>,
        tokio::task::JoinHandle<Result<(), hyper::Error>>,
    ) {
        let socket = tokio::net::TcpStream::connect(address).await.unwrap();
        let (sender, connection) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .initial_stream_window_size(window)
            .handshake(TokioIo::new(socket))
            .await
            .unwrap();
        (sender, tokio::spawn(connection))
    }

    /// A GET of `path` on `address`.
    fn get(address: std::net::SocketAddr, path: &str) -> Request<axum::body::Body> {
        axum::http::Request::get(format!("http://{address}{path}"))
            .body(axum::body::Body::empty())
            .unwrap()
    }

    /// An extended CONNECT (RFC 8441) for a WebSocket on `address`'s `/ws`.
    fn websocket_connect(address: std::net::SocketAddr) -> Request<axum::body::Body> {
        let mut request = axum::http::Request::connect(format!("http://{address}/ws"))
            .header("sec-websocket-version", "13")
            .body(axum::body::Body::empty())
            .unwrap();
        request
            .extensions_mut()
            .insert(hyper::ext::Protocol::from_static("websocket"));
        request
    }

    async fn served(limits: ConnectionLimits) -> std::net::SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let app = Router::new()
            .route("/", axum::routing::get(|| async { "hello" }))
            // A response that takes several idle bounds to come.
            .route(
                "/slow",
                axum::routing::get(move || async move {
                    tokio::time::sleep(limits.header_read_timeout * 3).await;
                    "slow"
                }),
            )
            // A megabyte at once.
            .route("/big", axum::routing::get(|| async { vec![b'x'; 1 << 20] }))
            // A response without end, a kilobyte at a time.
            .route(
                "/endless",
                axum::routing::get(|| async {
                    let kilobyte = Bytes::from_static(&[b'x'; 1024]);
                    let chunks = futures::stream::repeat(Ok::<_, Infallible>(kilobyte));
                    Body::from_stream(chunks)
                }),
            )
            // A WebSocket that says nothing for several idle bounds, then "late", then reads
            // until its client closes it.
            .route(
                "/ws",
                axum::routing::any(
                    move |in_flight: Option<Extension<WebSocketInFlight>>,
                          upgrade: WebSocketUpgrade| async move {
                        upgrade.on_upgrade(move |mut socket| async move {
                            tokio::time::sleep(limits.header_read_timeout * 3).await;
                            if socket.send(Message::Text("late".into())).await.is_ok() {
                                while let Some(Ok(_)) = socket.recv().await {}
                            }
                            drop(in_flight);
                        })
                    },
                ),
            );
        tokio::spawn(serve(listener, app, limits, std::future::pending()));
        address
    }

    /// Reads until the server closes the connection (EOF or reset), within a deadline.
    async fn closed_by_server(socket: &mut tokio::net::TcpStream) -> Vec<u8> {
        let mut read = Vec::new();
        let closing = async {
            let mut buf = [0u8; 4096];
            loop {
                match socket.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => read.extend_from_slice(&buf[..n]),
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(30), closing)
            .await
            .expect("the server closed the connection");
        read
    }

    #[tokio::test]
    async fn a_request_head_not_sent_in_time_ends_the_connection() {
        let address = served(limits(200, 60_000)).await;
        let mut socket = tokio::net::TcpStream::connect(address).await.unwrap();
        socket
            .write_all(b"GET / HTTP/1.1\r\nhost: x\r\n")
            .await
            .unwrap();
        // The head never ends: the server closes the connection, answering 408 or nothing.
        let read = closed_by_server(&mut socket).await;
        assert!(!String::from_utf8_lossy(&read).contains("hello"));
    }

    #[tokio::test]
    async fn a_connection_that_sends_nothing_is_closed() {
        let address = served(limits(200, 60_000)).await;
        let mut socket = tokio::net::TcpStream::connect(address).await.unwrap();
        assert!(closed_by_server(&mut socket).await.is_empty());
    }

    #[tokio::test]
    async fn a_whole_request_is_answered() {
        let address = served(limits(200, 60_000)).await;
        let mut socket = tokio::net::TcpStream::connect(address).await.unwrap();
        socket
            .write_all(b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            .await
            .unwrap();
        let read = closed_by_server(&mut socket).await;
        assert!(String::from_utf8_lossy(&read).ends_with("hello"));
    }

    /// The HTTP/2 connection preface, then an empty SETTINGS frame.
    const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0";

    /// An HTTP/2 client (prior knowledge, on the plain port) that sends its preface and then
    /// nothing, opening no stream, is closed after the idle bound: hyper's HTTP/2 server has
    /// no such bound, and its pings (were they on) are answered by any client's stack, so the
    /// connection was held for good.
    #[tokio::test]
    async fn an_http2_connection_that_opens_no_stream_is_closed() {
        let address = served(limits(200, 60_000)).await;
        let mut socket = tokio::net::TcpStream::connect(address).await.unwrap();
        socket.write_all(H2_PREFACE).await.unwrap();
        closed_by_server(&mut socket).await;
    }

    /// A client that sends part of the HTTP/2 preface and stops is closed too: too little to
    /// tell HTTP/1 from HTTP/2, so no bound of hyper's was armed.
    #[tokio::test]
    async fn a_connection_that_stops_within_the_http2_preface_is_closed() {
        let address = served(limits(200, 60_000)).await;
        let mut socket = tokio::net::TcpStream::connect(address).await.unwrap();
        socket.write_all(&H2_PREFACE[..16]).await.unwrap();
        closed_by_server(&mut socket).await;
    }

    /// An HTTP/2 connection is idle only while no request is in flight: a response slower than
    /// the idle bound comes whole, and the connection is closed once idle that long after it.
    #[tokio::test]
    async fn an_http2_connection_is_closed_once_idle_never_under_a_request() {
        let address = served(limits(200, 60_000)).await;
        let (mut sender, connection) = http2_client(address, None).await;
        let request = get(address, "/slow");
        let response = sender.send_request(request).await.unwrap();
        assert_eq!(response.status(), 200);
        let body = axum::body::to_bytes(axum::body::Body::new(response.into_body()), 1024)
            .await
            .unwrap();
        assert_eq!(&body[..], b"slow");
        tokio::time::timeout(Duration::from_secs(30), connection)
            .await
            .expect("the server closed the idle connection")
            .unwrap()
            .unwrap();
    }

    /// An HTTP/2 WebSocket (extended CONNECT, RFC 8441) keeps its connection from being idle
    /// while it is open, however long it says nothing; once it has ended, the connection is
    /// idle again and closed after the idle bound, as any other. It was counted in flight for
    /// good: the connection stayed open, with its task and its socket, for as long as the
    /// client kept it.
    #[tokio::test]
    async fn an_http2_connection_is_idle_again_once_its_websocket_ended() {
        let address = served(limits(200, 60_000)).await;
        let (mut sender, mut connection) = http2_client(address, None).await;
        // A request answered first: the server's settings, which allow the extended CONNECT,
        // have come.
        let request = get(address, "/");
        let response = sender.send_request(request).await.unwrap();
        assert_eq!(response.status(), 200);
        let response = sender
            .send_request(websocket_connect(address))
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        let upgraded = hyper::upgrade::on(response).await.unwrap();
        let mut websocket = tokio_tungstenite::WebSocketStream::from_raw_socket(
            TokioIo::new(upgraded),
            tokio_tungstenite::tungstenite::protocol::Role::Client,
            None,
        )
        .await;
        // Open for several idle bounds, the connection is not closed under it.
        let said = tokio::time::timeout(Duration::from_secs(30), websocket.next())
            .await
            .expect("the server's message")
            .expect("the WebSocket open")
            .unwrap();
        assert_eq!(said.into_text().unwrap().as_str(), "late");
        websocket.close(None).await.unwrap();
        while let Some(Ok(_)) = websocket.next().await {}
        drop(websocket);
        // The WebSocket ended: the connection is idle, and closed.
        tokio::time::timeout(Duration::from_secs(30), &mut connection)
            .await
            .expect("the server closed the idle connection")
            .unwrap()
            .unwrap();
    }

    /// An HTTP/2 client that takes nothing of a response (it opens no flow-control window for
    /// it, here none from the start) has its connection closed after the write timeout, as one
    /// that reads nothing from its socket has. Nothing waited on the socket, so no bound
    /// held: the request stayed in flight for good, its connection, its task and its body (an
    /// open file, for a media download; a page of messages, up to tens of megabytes) with it,
    /// a few hundred such streams to a connection.
    #[tokio::test]
    async fn an_http2_response_its_client_takes_nothing_of_ends_the_connection() {
        let address = served(limits(200, 300)).await;
        let (mut sender, mut connection) = http2_client(address, Some(0)).await;
        let request = get(address, "/endless");
        let response = sender.send_request(request).await.unwrap();
        assert_eq!(response.status(), 200);
        // The connection ends, an error or not.
        tokio::time::timeout(Duration::from_secs(30), &mut connection)
            .await
            .expect("the server closed the connection")
            .unwrap()
            .ok();
        drop(response);
    }

    /// An HTTP/2 client that takes a response slowly, a chunk now and then, is never cut
    /// however long the response takes: only a client that takes nothing of it for the whole
    /// write timeout is.
    #[tokio::test]
    async fn an_http2_response_taken_slowly_is_not_cut() {
        let address = served(limits(200, 300)).await;
        let (mut sender, _connection) = http2_client(address, Some(4096)).await;
        let request = get(address, "/endless");
        let response = sender.send_request(request).await.unwrap();
        let mut body = axum::body::Body::new(response.into_body()).into_data_stream();
        let started = std::time::Instant::now();
        let mut taken = 0;
        // Four write timeouts, a kilobyte every 20 ms.
        while started.elapsed() < Duration::from_millis(1200) {
            let chunk = tokio::time::timeout(Duration::from_secs(30), body.next())
                .await
                .expect("a chunk in time")
                .expect("the response goes on")
                .expect("the response is not cut");
            taken += chunk.len();
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(taken > 0);
    }

    /// A response handed to hyper whole (a page of messages is one chunk) is handed to it a
    /// piece at a time over HTTP/2, so that what the client does not take stays with the
    /// response and is bounded as such. Handed whole, it went into the connection's send
    /// buffer at the first byte of window the client opened, the response was done, and its
    /// megabytes stayed there for as long as anything else kept the connection busy (an
    /// HTTP/2 WebSocket: for good).
    #[tokio::test]
    async fn an_http2_response_its_client_takes_a_byte_of_ends_the_connection_under_a_websocket() {
        let address = served(limits(200, 300)).await;
        let (mut sender, mut connection) = http2_client(address, Some(1)).await;
        let request = get(address, "/");
        assert_eq!(sender.send_request(request).await.unwrap().status(), 200);
        // A WebSocket open, and never closed: the connection is never idle.
        let websocket = sender
            .send_request(websocket_connect(address))
            .await
            .unwrap();
        assert_eq!(websocket.status(), 200);
        let request = get(address, "/big");
        let response = sender.send_request(request).await.unwrap();
        assert_eq!(response.status(), 200);
        tokio::time::timeout(Duration::from_secs(30), &mut connection)
            .await
            .expect("the server closed the connection")
            .unwrap()
            .ok();
        drop((websocket, response));
    }

    /// A response handed to hyper in pieces over HTTP/2 comes whole, its length as stated.
    #[tokio::test]
    async fn an_http2_response_handed_in_pieces_comes_whole() {
        let address = served(limits(200, 60_000)).await;
        let (mut sender, _connection) = http2_client(address, None).await;
        let request = get(address, "/big");
        let response = sender.send_request(request).await.unwrap();
        assert_eq!(response.headers()["content-length"], "1048576");
        let body = axum::body::to_bytes(axum::body::Body::new(response.into_body()), 2 << 20)
            .await
            .unwrap();
        assert_eq!(body.len(), 1 << 20);
        assert!(body.iter().all(|&b| b == b'x'));
    }
}
