//! Raw, pipelined WebSocket connections for the bench: the socket is split so that a task can
//! write frames without waiting for replies, and the local address can be chosen (to spread
//! connections over 127.0.0.1..127.0.0.K past the ephemeral-port limit).

use anyhow::Context;
use courier_client::{HttpApi, websocket_config};
use courier_proto::{ClientFrame, Encoding, Hello, Payload, ServerFrame};
use futures::stream::{SplitSink, SplitStream};
use futures::{SinkExt, StreamExt};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::{self, Message};

pub type Socket = WebSocketStream<TcpStream>;
pub type Writer = SplitSink<Socket, Message>;
pub type Reader = SplitStream<Socket>;

/// Leaves the choice of a socket's source port to `connect` (Linux: `IP_BIND_ADDRESS_NO_PORT`),
/// where the kernel picks one unique for the 4-tuple. A `bind` to an address with port 0
/// otherwise reserves a port at once, searching every port bound to any address, those in
/// TIME_WAIT from the previous run included: a reconnect storm started soon after another
/// spent seconds of the load generator's CPU there (`docs/benchmarks.md`, "The load
/// generator's port search").
#[cfg(target_os = "linux")]
fn port_chosen_at_connect(socket: &TcpSocket) -> std::io::Result<()> {
    nix::sys::socket::setsockopt(
        socket,
        nix::sys::socket::sockopt::IpBindAddressNoPort,
        &true,
    )
    .map_err(std::io::Error::from)
}

#[cfg(not(target_os = "linux"))]
fn port_chosen_at_connect(_: &TcpSocket) -> std::io::Result<()> {
    Ok(())
}

/// A connection's read buffer: the SDK's 16 KiB, allocated for each of the thousands of
/// connections a scenario holds, was a quarter of the load generator's CPU in a reconnect
/// storm (the pages of fresh buffers faulted in). The bench's frames are small; a larger frame
/// only takes several reads (`docs/benchmarks.md`, "The load generator's share of a storm").
const READ_BUFFER_BYTES: usize = 4 * 1024;

/// How long a connection may take to reach `hello`.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(60);

/// Where the server is: its address, and the host and port for URLs.
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub addr: SocketAddr,
    authority: String,
    pub encoding: Encoding,
}

impl Endpoint {
    /// Resolves a `ws://host:port` base URL.
    pub async fn resolve(url: &str, encoding: Encoding) -> anyhow::Result<Endpoint> {
        let Some(rest) = url.strip_prefix("ws://") else {
            anyhow::bail!("--url must be ws://HOST:PORT (the bench does not speak TLS), got {url}");
        };
        let authority = rest
            .trim_end_matches('/')
            .split('/')
            .next()
            .unwrap_or_default();
        let with_port = if authority.contains(':') {
            authority.to_owned()
        } else {
            format!("{authority}:80")
        };
        let addr = tokio::net::lookup_host(&with_port)
            .await
            .with_context(|| format!("cannot resolve {with_port}"))?
            .next()
            .with_context(|| format!("{with_port} resolves to no address"))?;
        Ok(Endpoint {
            addr,
            authority: authority.to_owned(),
            encoding,
        })
    }

    /// `http://host:port`, for the HTTP API and `/metrics`.
    pub fn http_base(&self) -> String {
        format!("http://{}", self.authority)
    }

    /// `127.0.0.{1 + index % count}` as the local address of connection `index` (loopback
    /// servers only; `None` otherwise or when `count` is 0 or 1).
    pub fn source_addr(&self, index: usize, count: usize) -> Option<IpAddr> {
        if count <= 1 || !self.addr.ip().is_loopback() || !self.addr.is_ipv4() {
            return None;
        }
        let last = 1 + (index % count.min(254)) as u8;
        Some(IpAddr::V4(Ipv4Addr::new(127, 0, 0, last)))
    }

    /// Connects with a bearer token, optionally from `local` address, and waits for `hello`.
    pub async fn connect(
        &self,
        token: &str,
        local: Option<IpAddr>,
    ) -> anyhow::Result<(Socket, Hello)> {
        tokio::time::timeout(CONNECT_TIMEOUT, self.connect_inner(token, local))
            .await
            .map_err(|_| anyhow::anyhow!("no hello within {CONNECT_TIMEOUT:?}"))?
    }

    async fn connect_inner(
        &self,
        token: &str,
        local: Option<IpAddr>,
    ) -> anyhow::Result<(Socket, Hello)> {
        let socket = if self.addr.is_ipv4() {
            TcpSocket::new_v4()
        } else {
            TcpSocket::new_v6()
        }
        .context("cannot create a socket (out of file descriptors?)")?;
        if let Some(ip) = local {
            port_chosen_at_connect(&socket).context("cannot set IP_BIND_ADDRESS_NO_PORT")?;
            socket
                .bind(SocketAddr::new(ip, 0))
                .with_context(|| format!("cannot bind to {ip}"))?;
        }
        let stream = socket
            .connect(self.addr)
            .await
            .with_context(|| format!("cannot connect to {}", self.addr))?;
        stream.set_nodelay(true)?;
        let mut request = format!("ws://{}/v1/ws", self.authority).into_client_request()?;
        let headers = request.headers_mut();
        headers.insert(
            "authorization",
            HeaderValue::from_str(&format!("Bearer {token}"))?,
        );
        headers.insert(
            "sec-websocket-protocol",
            HeaderValue::from_static(self.encoding.subprotocol()),
        );
        let config = websocket_config().read_buffer_size(READ_BUFFER_BYTES);
        let (mut socket, _) =
            tokio_tungstenite::client_async_with_config(request, stream, Some(config))
                .await
                .map_err(|e| match e {
                    tungstenite::Error::Http(response) => anyhow::anyhow!(
                        "the server refused the upgrade with HTTP {}",
                        response.status()
                    ),
                    other => anyhow::anyhow!("websocket handshake: {other}"),
                })?;
        match next_frame(&mut socket, self.encoding).await? {
            ServerFrame::Hello(hello) => Ok((socket, hello)),
            other => anyhow::bail!("expected hello first, got {other:?}"),
        }
    }
}

/// The gateways a scenario spreads its connections over (`--url` once per gateway).
#[derive(Debug, Clone)]
pub struct Gateways(Vec<Endpoint>);

impl Gateways {
    /// Resolves every URL.
    pub async fn resolve(urls: &[String], encoding: Encoding) -> anyhow::Result<Gateways> {
        anyhow::ensure!(!urls.is_empty(), "--url: give at least one gateway");
        let mut gateways = Vec::with_capacity(urls.len());
        for url in urls {
            gateways.push(Endpoint::resolve(url, encoding).await?);
        }
        Ok(Gateways(gateways))
    }

    /// The gateway of connection `index`: round robin.
    pub fn of(&self, index: usize) -> &Endpoint {
        &self.0[index % self.0.len()]
    }

    pub fn all(&self) -> &[Endpoint] {
        &self.0
    }

    /// The first gateway: the HTTP API (group set-up) goes there.
    pub fn first(&self) -> &Endpoint {
        &self.0[0]
    }

    pub fn encoding(&self) -> Encoding {
        self.0[0].encoding
    }
}

/// One encoded client frame.
pub fn encode(encoding: Encoding, frame: &ClientFrame) -> Message {
    match encoding.encode_client(frame) {
        Payload::Text(text) => Message::text(text),
        Payload::Binary(bytes) => Message::binary(bytes),
    }
}

/// What a WebSocket message carried. Returned and matched at once, never stored: the
/// size of the frame variant does not matter.
#[allow(clippy::large_enum_variant)]
pub enum Incoming {
    Frame(ServerFrame),
    /// Ping, pong or another control message: nothing for the bench.
    Control,
    /// The connection ended (close frame, error or end of stream), with a reason.
    Closed(String),
}

/// Decodes one item read from the socket.
pub fn decode(encoding: Encoding, item: Option<Result<Message, tungstenite::Error>>) -> Incoming {
    match item {
        None => Incoming::Closed("end of stream".into()),
        Some(Err(e)) => Incoming::Closed(e.to_string()),
        Some(Ok(Message::Text(text))) => match encoding.decode_server(text.as_bytes()) {
            Ok(frame) => Incoming::Frame(frame),
            Err(e) => Incoming::Closed(format!("undecodable frame: {e}")),
        },
        Some(Ok(Message::Binary(bytes))) => match encoding.decode_server(&bytes) {
            Ok(frame) => Incoming::Frame(frame),
            Err(e) => Incoming::Closed(format!("undecodable frame: {e}")),
        },
        Some(Ok(Message::Close(frame))) => Incoming::Closed(match frame {
            Some(f) => format!("closed with {}: {}", u16::from(f.code), f.reason),
            None => "closed".into(),
        }),
        Some(Ok(_)) => Incoming::Control,
    }
}

/// The next frame of an unsplit socket (control messages skipped).
pub async fn next_frame(socket: &mut Socket, encoding: Encoding) -> anyhow::Result<ServerFrame> {
    loop {
        match decode(encoding, socket.next().await) {
            Incoming::Frame(frame) => return Ok(frame),
            Incoming::Control => continue,
            Incoming::Closed(why) => anyhow::bail!("connection lost: {why}"),
        }
    }
}

/// Writes one frame and flushes.
pub async fn send(
    writer: &mut Writer,
    encoding: Encoding,
    frame: &ClientFrame,
) -> anyhow::Result<()> {
    writer
        .send(encode(encoding, frame))
        .await
        .context("write to the server")
}

/// Per conversation, the highest seq a device has read.
pub type Cursors = foldhash::HashMap<String, u64>;

/// Connects a device and reads its catch-up up to `sync_done`, then splits the socket. The
/// events of the catch-up are dropped; where they left each conversation is returned, the
/// cursors a receiver on this connection checks seqs from.
pub async fn connect_synced(
    endpoint: &Endpoint,
    token: &str,
    local: Option<IpAddr>,
) -> anyhow::Result<(Writer, Reader, Cursors)> {
    let (mut socket, _) = endpoint.connect(token, local).await?;
    let mut cursors = Cursors::default();
    let wait = async {
        loop {
            match next_frame(&mut socket, endpoint.encoding).await? {
                ServerFrame::SyncDone(_) => return anyhow::Ok(()),
                ServerFrame::Event(event) => {
                    let cursor = cursors.entry(event.conversation_id).or_default();
                    *cursor = event.seq.max(*cursor);
                }
                _ => {}
            }
        }
    };
    tokio::time::timeout(CONNECT_TIMEOUT, wait)
        .await
        .map_err(|_| anyhow::anyhow!("no sync_done within {CONNECT_TIMEOUT:?}"))??;
    let (writer, reader) = socket.split();
    Ok((writer, reader, cursors))
}

/// How a scenario's devices register for push before they connect (`--push-provider`).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct PushOption {
    /// Every device of the run registers a push token with this provider (`fcm`, `apns` or
    /// `webhook`: `PUT /v1/devices/me/push`) before it connects, as a mobile app does, so that
    /// the push notifier looks up whether each recipient is connected. The server must have
    /// the provider (e.g. `serve --push-webhook-url`); connected devices are never notified.
    #[arg(long, value_name = "PROVIDER")]
    pub push_provider: Option<String>,
}

impl PushOption {
    /// Registers the device of `token` for push if asked to (with `http`, the run's one
    /// client), then connects it as [`connect_synced`] does.
    pub async fn connect(
        &self,
        http: &reqwest::Client,
        endpoint: &Endpoint,
        token: &str,
        local: Option<IpAddr>,
    ) -> anyhow::Result<(Writer, Reader, Cursors)> {
        if let Some(provider) = &self.push_provider {
            let api = HttpApi::with_client(http.clone(), &endpoint.http_base(), token);
            // A token of its own, as each app instance has (the server gives a token to the
            // device that registered it last): one per device's token.
            let device = std::hash::BuildHasher::hash_one(
                &std::hash::BuildHasherDefault::<std::hash::DefaultHasher>::default(),
                token,
            );
            let push_token = format!("courier-bench-{device:016x}");
            let body = serde_json::json!({ "provider": provider, "token": push_token });
            match api
                .request(reqwest::Method::PUT, "/v1/devices/me/push", Some(&body))
                .await?
            {
                (204, _) => {}
                (status, body) => {
                    anyhow::bail!("PUT /v1/devices/me/push answered {status}: {body}")
                }
            }
        }
        connect_synced(endpoint, token, local).await
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_socket_from_a_source_address_gets_its_port_at_connect_not_at_bind() {
        let server = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let source: IpAddr = Ipv4Addr::new(127, 0, 0, 2).into();
        let socket = TcpSocket::new_v4().unwrap();
        port_chosen_at_connect(&socket).unwrap();
        socket.bind(SocketAddr::new(source, 0)).unwrap();
        assert_eq!(
            socket.local_addr().unwrap().port(),
            0,
            "a port was reserved at bind"
        );
        let stream = socket.connect(server.local_addr().unwrap()).await.unwrap();
        let local = stream.local_addr().unwrap();
        assert_eq!(local.ip(), source);
        assert_ne!(local.port(), 0);
    }
}
