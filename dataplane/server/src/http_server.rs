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
//! - Every write to the connection must be taken by the socket within `--http-write-timeout`
//!   ([`StallBound`]): a write still waiting then fails, and hyper ends the connection (its
//!   response cut, its file closed). A client that reads, however slowly, is never cut, as
//!   long as it takes some bytes within the timeout. The bound is on the socket, so it holds
//!   for HTTP/2 and for upgraded WebSockets too (where the gateway's own `write_timeout`,
//!   30 s, comes first unless the flag is shorter).
//!
//! Request bodies are read by their handlers, each bounded there: media uploads end after
//! 60 s without bytes (`courier_media`), and so do JSON bodies (`http::BODY_IDLE_TIMEOUT`).

use axum::Router;
use axum::serve::Listener;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::service::TowerToHyperService;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::watch;

/// How long a client has to send a request's head (HTTP/1), from the connection's start or the
/// end of its previous response: hyper's default, which `axum::serve` left unarmed.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

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
        .header_read_timeout(limits.header_read_timeout);
    // HTTP/2 WebSockets (RFC 8441) need the extended CONNECT, as in `axum::serve`.
    builder
        .http2()
        .timer(TokioTimer::new())
        .enable_connect_protocol();
    loop {
        let (io, _address) = tokio::select! {
            accepted = listener.accept() => accepted,
            () = stop_tx.closed() => break,
        };
        // The write bound below needs it: a client reading slowly is not cut.
        if let Err(e) = bound_unsent(&io) {
            tracing::warn!(error = %e, "could not set TCP_NOTSENT_LOWAT on a connection");
        }
        let io = TokioIo::new(StallBound::new(
            io,
            limits.header_read_timeout,
            limits.write_timeout,
        ));
        let service = TowerToHyperService::new(app.clone());
        let (stop_tx, closed_rx, builder) = (stop_tx.clone(), closed_rx.clone(), builder.clone());
        tokio::spawn(async move {
            let connection = builder.serve_connection_with_upgrades(io, service);
            tokio::pin!(connection);
            let mut stopping = std::pin::pin!(stop_tx.closed());
            let mut told = false;
            loop {
                tokio::select! {
                    served = connection.as_mut() => {
                        if let Err(e) = served {
                            tracing::debug!(error = %e, "HTTP connection ended");
                        }
                        break;
                    }
                    () = &mut stopping, if !told => {
                        told = true;
                        connection.as_mut().graceful_shutdown();
                    }
                }
            }
            drop(closed_rx);
        });
    }
    drop(closed_rx);
    drop(listener);
    closed_tx.closed().await;
}

/// A connection's socket whose writes fail once one has waited `limit` for the socket to take
/// any byte (`io::ErrorKind::TimedOut`): the peer stopped reading (module documentation).
/// Reads are left as they are: a client may think between requests, and a WebSocket may stay
/// idle (the gateway pings it).
pub struct StallBound<T> {
    io: T,
    limit: Duration,
    /// Until the connection's first byte: how long it may take (the header read timeout).
    /// hyper arms its own only once it has read enough to tell HTTP/1 from HTTP/2: a client
    /// that connected and sent nothing was held for good.
    first_byte: Option<Duration>,
    /// When the write waiting now times out (before the first byte, when the wait for it
    /// does). Boxed, made on the connection's first wait only: a connection that never waits
    /// on a write stays as small as before.
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
    waiting: bool,
}

impl<T> StallBound<T> {
    /// `io`, whose first byte must come within `first_byte` and whose writes may wait at most
    /// `limit`.
    pub fn new(io: T, first_byte: Duration, limit: Duration) -> Self {
        Self {
            io,
            limit,
            first_byte: Some(first_byte),
            deadline: None,
            waiting: false,
        }
    }

    /// `polled`, or `TimedOut` once writes have been pending for `limit` without a byte taken.
    fn bound<R>(
        &mut self,
        cx: &mut Context<'_>,
        polled: Poll<io::Result<R>>,
    ) -> Poll<io::Result<R>> {
        if polled.is_ready() {
            self.waiting = false;
            return polled;
        }
        let until = tokio::time::Instant::now() + self.limit;
        let deadline = match &mut self.deadline {
            Some(deadline) => {
                if !self.waiting {
                    deadline.as_mut().reset(until);
                }
                deadline
            }
            None => self
                .deadline
                .insert(Box::pin(tokio::time::sleep_until(until))),
        };
        self.waiting = true;
        ready!(deadline.as_mut().poll(cx));
        Poll::Ready(Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!(
                "the client took no byte of the response for {} (--http-write-timeout)",
                humantime::format_duration(self.limit)
            ),
        )))
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for StallBound<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let Some(first_byte) = self.first_byte else {
            return Pin::new(&mut self.io).poll_read(cx, buf);
        };
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.io).poll_read(cx, buf);
        if polled.is_ready() {
            if buf.filled().len() > before {
                // Its timer is dropped with it: most connections (an idle WebSocket) never
                // wait on a write, and keep no timer.
                self.first_byte = None;
                self.deadline = None;
            }
            return polled;
        }
        // No write waits before the first request: the write deadline is free to use.
        let until = tokio::time::Instant::now() + first_byte;
        let deadline = self
            .deadline
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(until)));
        ready!(deadline.as_mut().poll(cx));
        Poll::Ready(Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "the client sent nothing in time after connecting",
        )))
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for StallBound<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write(cx, buf);
        self.bound(cx, polled)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.bound(cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let polled = Pin::new(&mut self.io).poll_flush(cx);
        self.bound(cx, polled)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let polled = Pin::new(&mut self.io).poll_shutdown(cx);
        self.bound(cx, polled)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn limits(header: u64, write: u64) -> ConnectionLimits {
        ConnectionLimits {
            header_read_timeout: Duration::from_millis(header),
            write_timeout: Duration::from_millis(write),
        }
    }

    async fn served(limits: ConnectionLimits) -> std::net::SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let app = Router::new().route("/", axum::routing::get(|| async { "hello" }));
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

    #[tokio::test(start_paused = true)]
    async fn a_write_the_peer_takes_nothing_of_fails_after_the_limit() {
        let (ours, theirs) = tokio::io::duplex(16);
        let mut ours = StallBound::new(ours, Duration::from_secs(30), Duration::from_millis(100));
        // The peer reads nothing: the first 16 bytes fill the pipe, the next wait and fail.
        let written = ours.write_all(&[7u8; 64]).await.unwrap_err();
        assert_eq!(written.kind(), io::ErrorKind::TimedOut);
        drop(theirs);
    }

    #[tokio::test(start_paused = true)]
    async fn a_peer_reading_slowly_is_not_cut() {
        let (ours, mut theirs) = tokio::io::duplex(16);
        let mut ours = StallBound::new(ours, Duration::from_secs(30), Duration::from_millis(500));
        let reader = tokio::spawn(async move {
            let mut read = Vec::new();
            let mut buf = [0u8; 8];
            loop {
                // Less than the limit between reads, more than it in all.
                tokio::time::sleep(Duration::from_millis(50)).await;
                match theirs.read(&mut buf).await.unwrap() {
                    0 => break read,
                    n => read.extend_from_slice(&buf[..n]),
                }
            }
        });
        ours.write_all(&[7u8; 256]).await.unwrap();
        ours.shutdown().await.unwrap();
        assert_eq!(reader.await.unwrap().len(), 256);
    }
}
