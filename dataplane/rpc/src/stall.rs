//! A bound on the connections a server accepts, for the client port (`http_server` of the
//! `courier` crate), the metrics port and the internal gRPC ports (a node's, the store
//! node's): a peer that connects and sends nothing, or stops reading what it is sent, is not
//! held for good. Neither hyper nor tonic bounds it: hyper arms its HTTP/1 header timeout only
//! once it has read enough to tell HTTP/1 from HTTP/2, and an HTTP/2 server (tonic's) waits
//! for the client's preface with no bound at all; TCP keepalive sees a live peer. Each such
//! connection held its socket, its task and its buffers: enough of them, opened by anyone who
//! reaches the port, ran the process out of file descriptors.

use futures::{Stream, StreamExt};
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tonic::transport::server::{Connected, TcpConnectInfo, TcpIncoming};

/// How long a peer of an internal port has to send its first byte (a gRPC client sends its
/// preface at once), and the longest a write to it may wait for its socket to take any byte
/// (a node that answers the port's pings, [`crate::KEEPALIVE`], reads far more often).
pub const INTERNAL: ConnectionBounds = ConnectionBounds {
    first_byte: Duration::from_secs(30),
    write: Duration::from_secs(60),
};

/// The bounds [`StallBound`] puts on a connection.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionBounds {
    /// Longest wait for the connection's first byte.
    pub first_byte: Duration,
    /// Longest a write may wait for the socket to take any byte.
    pub write: Duration,
}

/// The connections `listener` accepts (`TCP_NODELAY`, as tonic's own), each under `bounds`:
/// what a tonic server of an internal port serves (`serve_with_incoming`).
pub fn bounded_incoming(
    listener: TcpListener,
    bounds: ConnectionBounds,
) -> impl Stream<Item = io::Result<StallBound<TcpStream>>> + Send + 'static {
    TcpIncoming::from(listener)
        .with_nodelay(Some(true))
        .map(move |accepted| {
            accepted.map(|tcp| StallBound::new(tcp, bounds.first_byte, bounds.write))
        })
}

impl Connected for StallBound<TcpStream> {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}

/// A connection's socket whose writes fail once one has waited `limit` for the socket to take
/// any byte (`io::ErrorKind::TimedOut`): the peer stopped reading (module documentation).
/// Reads are left as they are: a client may think between requests, and a WebSocket may stay
/// idle (the gateway pings it).
pub struct StallBound<T> {
    io: T,
    limit: Duration,
    /// Until the connection's first byte: how long it may take.
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
                "the peer took no byte of what it was sent for {}",
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
            "the peer sent nothing in time after connecting",
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
