//! One WebSocket connection of a device.

use crate::ClientError;
use courier_proto::*;
use futures::{SinkExt, StreamExt};
use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// How long a call waits for its reply before [`ClientError::Timeout`].
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(30);
/// Attempts of [`Client::send_with_retry`] before giving up.
pub const SEND_ATTEMPTS: u32 = 8;
/// The longest [`Client::send_with_retry`] waits between two attempts, whatever
/// `retry_after_ms` the server asks for: well above the waits Courier asks for with its
/// default limits (500 ms at most, a shard whose delivery is behind), and short enough that a
/// broken or hostile server's wait of a day does not hold the caller. With
/// [`SEND_ATTEMPTS`], a send waits at most 35 s in all between its attempts.
pub const MAX_RETRY_WAIT: Duration = Duration::from_secs(5);
/// The most bytes (as they came on the wire) of frames a [`Client`] holds unread: those that
/// arrived while a call waited for its reply, and the events a sync gathers. Past it the call
/// fails with [`ClientError::Overflow`] and the connection is closed, rather than memory
/// growing for as long as a server floods or the caller leaves the frames unread; nothing is
/// lost, as the events not acknowledged come again on the next connection (PROTOCOL.md). The
/// largest message the SDK takes fits, and so does a catch-up of hundreds of thousands of
/// small events.
pub const MAX_BUFFERED_BYTES: usize = 64 << 20;

/// Whom a message goes to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// The direct conversation with this user (created on first message).
    User(String),
    /// An existing conversation.
    Conversation(String),
}

/// The WebSocket settings of the SDK's connections: messages up to 64 MiB (a catch-up event
/// can be large) and a 16 KiB read buffer (tungstenite's default 128 KiB per connection adds up
/// when one process holds thousands, as `courier bench` does).
pub fn websocket_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .max_message_size(Some(64 << 20))
        .read_buffer_size(16 * 1024)
}

/// A connected device. Frames that arrive while a call waits for its reply are kept, in
/// order, for [`Client::next_frame`], up to [`MAX_BUFFERED_BYTES`].
pub struct Client {
    socket: WebSocketStream<MaybeTlsStream<TcpStream>>,
    encoding: Encoding,
    next_ref: i64,
    buffered: Buffered,
    hello: Hello,
}

/// Frames read and not yet given to the caller, in order, each with its size on the wire.
#[derive(Default)]
struct Buffered {
    frames: VecDeque<(ServerFrame, usize)>,
    /// The sum of the sizes of `frames`.
    bytes: usize,
}

impl Buffered {
    fn push_back(&mut self, frame: ServerFrame, size: usize) {
        self.bytes += size;
        self.frames.push_back((frame, size));
    }

    fn pop_front(&mut self) -> Option<(ServerFrame, usize)> {
        let (frame, size) = self.frames.pop_front()?;
        self.bytes -= size;
        Some((frame, size))
    }

    /// The first frame `wanted` picks, taken out; the other frames stay in order.
    fn take_first(&mut self, wanted: impl Fn(&ServerFrame) -> bool) -> Option<ServerFrame> {
        let i = self.frames.iter().position(|(f, _)| wanted(f))?;
        let (frame, size) = self.frames.remove(i)?;
        self.bytes -= size;
        Some(frame)
    }

    /// `later`'s frames after these.
    fn append(&mut self, later: Buffered) {
        self.bytes += later.bytes;
        self.frames.extend(later.frames);
    }
}

impl Client {
    /// Connects to `base_url` (`ws://host:port`) with a bearer token and waits for `hello`,
    /// all within [`REPLY_TIMEOUT`]: a server that takes the connection and never answers (a
    /// process stopped mid-start, a proxy whose backend hangs) fails with
    /// [`ClientError::Timeout`] rather than holding the caller for ever.
    pub async fn connect(
        base_url: &str,
        token: &str,
        encoding: Encoding,
    ) -> Result<Self, ClientError> {
        tokio::time::timeout(REPLY_TIMEOUT, Self::connect_now(base_url, token, encoding))
            .await
            .map_err(|_| ClientError::Timeout(REPLY_TIMEOUT))?
    }

    async fn connect_now(
        base_url: &str,
        token: &str,
        encoding: Encoding,
    ) -> Result<Self, ClientError> {
        let url = format!("{}/v1/ws", base_url.trim_end_matches('/'));
        let mut request = url
            .into_client_request()
            .map_err(|e| ClientError::WebSocket(e.to_string()))?;
        let headers = request.headers_mut();
        let bearer = HeaderValue::from_str(&format!("Bearer {token}"))
            .map_err(|e| ClientError::WebSocket(e.to_string()))?;
        headers.insert("authorization", bearer);
        headers.insert(
            "sec-websocket-protocol",
            HeaderValue::from_static(encoding.subprotocol()),
        );
        let config = websocket_config();
        let (socket, _) = tokio_tungstenite::connect_async_with_config(request, Some(config), true)
            .await
            .map_err(|e| match e {
                tungstenite::Error::Http(response) => {
                    ClientError::Rejected(response.status().as_u16())
                }
                other => ClientError::WebSocket(other.to_string()),
            })?;
        let mut client = Self {
            socket,
            encoding,
            next_ref: 1,
            buffered: Buffered::default(),
            hello: Hello {
                user: String::new(),
                device: String::new(),
                server_time_ms: 0,
            },
        };
        match client.read().await? {
            ServerFrame::Hello(hello) => client.hello = hello,
            other => {
                return Err(ClientError::WebSocket(format!(
                    "expected hello first, got {other:?}"
                )));
            }
        }
        Ok(client)
    }

    /// The server's `hello`.
    pub fn hello(&self) -> &Hello {
        &self.hello
    }

    pub fn encoding(&self) -> Encoding {
        self.encoding
    }

    fn take_ref(&mut self) -> i64 {
        self.next_ref += 1;
        self.next_ref
    }

    /// Sends one frame as is.
    pub async fn send_frame(&mut self, frame: &ClientFrame) -> Result<(), ClientError> {
        let message = self.message_of(frame);
        self.send_raw(message).await
    }

    /// Sends `frames` in one write, as a client that batches what it has to say.
    pub async fn send_frames(&mut self, frames: &[ClientFrame]) -> Result<(), ClientError> {
        let written = |e: tungstenite::Error| ClientError::WebSocket(e.to_string());
        for frame in frames {
            let message = self.message_of(frame);
            self.socket.feed(message).await.map_err(written)?;
        }
        self.socket.flush().await.map_err(written)
    }

    fn message_of(&self, frame: &ClientFrame) -> Message {
        match self.encoding.encode_client(frame) {
            Payload::Text(text) => Message::text(text),
            Payload::Binary(bytes) => Message::binary(bytes),
        }
    }

    /// Sends a raw WebSocket message (for tests of bad input).
    pub async fn send_raw(&mut self, message: Message) -> Result<(), ClientError> {
        self.socket
            .send(message)
            .await
            .map_err(|e| ClientError::WebSocket(e.to_string()))
    }

    /// Reads the next frame from the socket (not the buffer).
    async fn read(&mut self) -> Result<ServerFrame, ClientError> {
        Ok(self.read_sized().await?.0)
    }

    /// Reads the next frame from the socket (not the buffer), with its size on the wire.
    async fn read_sized(&mut self) -> Result<(ServerFrame, usize), ClientError> {
        loop {
            let message = match self.socket.next().await {
                Some(Ok(message)) => message,
                Some(Err(tungstenite::Error::ConnectionClosed)) | None => {
                    return Err(ClientError::Closed(None));
                }
                Some(Err(e)) => return Err(ClientError::WebSocket(e.to_string())),
            };
            match message {
                Message::Text(text) => match self.decode(text.as_bytes())? {
                    Some(frame) => return Ok((frame, text.len())),
                    None => continue,
                },
                Message::Binary(bytes) => match self.decode(&bytes)? {
                    Some(frame) => return Ok((frame, bytes.len())),
                    None => continue,
                },
                Message::Close(frame) => {
                    // Completes the close handshake: the server waits for this reply.
                    let _ = self.socket.flush().await;
                    return Err(ClientError::Closed(
                        frame.map(|f| (u16::from(f.code), f.reason.to_string())),
                    ));
                }
                _ => continue,
            }
        }
    }

    /// The frame in `data`; `None` for a frame of a type this version does not know, which
    /// PROTOCOL.md allows the server to add: it is passed over, where an error would fail the
    /// call waiting for its reply (and end `courier chat`) at the first frame a newer server
    /// adds.
    fn decode(&self, data: &[u8]) -> Result<Option<ServerFrame>, ClientError> {
        match self.encoding.decode_server(data) {
            Ok(frame) => Ok(Some(frame)),
            Err(_) if self.encoding.is_unknown_server_frame(data) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// The next frame: buffered ones first.
    pub async fn next_frame(&mut self) -> Result<ServerFrame, ClientError> {
        Ok(self.next_sized().await?.0)
    }

    /// The next frame, buffered ones first, with its size on the wire.
    async fn next_sized(&mut self) -> Result<(ServerFrame, usize), ClientError> {
        match self.buffered.pop_front() {
            Some(sized) => Ok(sized),
            None => self.read_sized().await,
        }
    }

    /// Whether `more` bytes of frames, beside those buffered and `gathered`, pass
    /// [`MAX_BUFFERED_BYTES`].
    fn overflows(&self, gathered: usize, more: usize) -> bool {
        self.buffered
            .bytes
            .saturating_add(gathered)
            .saturating_add(more)
            > MAX_BUFFERED_BYTES
    }

    /// Drops the frames held and closes the connection, for a call that would have held more
    /// than [`MAX_BUFFERED_BYTES`]: the events not acknowledged come again on the next
    /// connection. The close is waited for up to [`REPLY_TIMEOUT`] (a server that reads nothing
    /// may leave no room to write it).
    async fn overflowed(&mut self) -> ClientError {
        self.buffered = Buffered::default();
        let _ = tokio::time::timeout(REPLY_TIMEOUT, self.socket.close(None)).await;
        ClientError::Overflow(MAX_BUFFERED_BYTES)
    }

    /// The next frame within `timeout`.
    pub async fn next_frame_within(
        &mut self,
        timeout: Duration,
    ) -> Result<ServerFrame, ClientError> {
        tokio::time::timeout(timeout, self.next_frame())
            .await
            .map_err(|_| ClientError::Timeout(timeout))?
    }

    /// Reads until `pick` accepts a frame; other frames are kept for later, in order, up to
    /// [`MAX_BUFFERED_BYTES`].
    async fn wait_for<T>(
        &mut self,
        mut pick: impl FnMut(&ServerFrame) -> Option<Result<T, ClientError>>,
    ) -> Result<T, ClientError> {
        let wait = async {
            loop {
                let (frame, size) = self.read_sized().await?;
                match pick(&frame) {
                    Some(result) => return result,
                    None if self.overflows(0, size) => return Err(self.overflowed().await),
                    None => self.buffered.push_back(frame, size),
                }
            }
        };
        tokio::time::timeout(REPLY_TIMEOUT, wait)
            .await
            .map_err(|_| ClientError::Timeout(REPLY_TIMEOUT))?
    }

    /// Sends a message and waits for its `sent` (or `error`).
    pub async fn send(
        &mut self,
        target: Target,
        client_msg_id: &str,
        body: Body,
    ) -> Result<Sent, ClientError> {
        let reference = self.take_ref();
        let (conversation_id, to_user) = match target {
            Target::User(user) => (None, Some(user)),
            Target::Conversation(conv) => (Some(conv), None),
        };
        self.send_frame(&ClientFrame::Send(Send {
            reference: Some(reference),
            client_msg_id: client_msg_id.to_owned(),
            conversation_id,
            to_user,
            body,
            reply_to: None,
        }))
        .await?;
        self.reply_to_send(reference, Some(client_msg_id)).await
    }

    /// Sends a text message and waits for its `sent`.
    pub async fn send_text(
        &mut self,
        target: Target,
        client_msg_id: &str,
        text: &str,
    ) -> Result<Sent, ClientError> {
        self.send(target, client_msg_id, Body::Text(text.to_owned()))
            .await
    }

    /// Like [`Client::send`], retrying with the same `client_msg_id` while the server answers
    /// `unavailable` or `rate_limited`, up to [`SEND_ATTEMPTS`] attempts in all: waiting as it
    /// says, with exponential backoff, but never more than [`MAX_RETRY_WAIT`] between two (a
    /// broken or hostile server's `retry_after_ms` of a day held the caller for a week).
    pub async fn send_with_retry(
        &mut self,
        target: Target,
        client_msg_id: &str,
        body: Body,
    ) -> Result<Sent, ClientError> {
        let mut backoff = Duration::from_millis(20);
        let mut attempt = 1;
        loop {
            match self.send(target.clone(), client_msg_id, body.clone()).await {
                Err(ClientError::Server(e))
                    if attempt < SEND_ATTEMPTS
                        && matches!(e.code, ErrorCode::Unavailable | ErrorCode::RateLimited) =>
                {
                    let wait = e
                        .retry_after_ms
                        .map_or(backoff, Duration::from_millis)
                        .max(backoff)
                        .min(MAX_RETRY_WAIT);
                    tokio::time::sleep(wait).await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                    attempt += 1;
                }
                other => return other,
            }
        }
    }

    /// Acknowledges everything up to `seq` in a conversation.
    pub async fn ack(
        &mut self,
        conversation_id: &str,
        seq: u64,
        kind: AckKind,
    ) -> Result<(), ClientError> {
        self.send_frame(&ClientFrame::Ack(Ack {
            reference: None,
            conversation_id: conversation_id.to_owned(),
            seq,
            kind,
        }))
        .await
    }

    /// Deletes a message for everyone and waits for the `sent` of the delete event.
    pub async fn delete(&mut self, conversation_id: &str, seq: u64) -> Result<Sent, ClientError> {
        let reference = self.take_ref();
        self.send_frame(&ClientFrame::Delete(Delete {
            reference: Some(reference),
            conversation_id: conversation_id.to_owned(),
            seq,
        }))
        .await?;
        self.reply_to_send(reference, None).await
    }

    /// Tells the other members' devices that this user is typing (or stopped).
    pub async fn typing(&mut self, conversation_id: &str, active: bool) -> Result<(), ClientError> {
        self.send_frame(&ClientFrame::Typing(Typing {
            reference: None,
            conversation_id: conversation_id.to_owned(),
            active,
        }))
        .await
    }

    /// The `sent` or `error` answering the frame of `ref` `reference`, a `send` of
    /// `client_msg_id` or a `delete` (`None`).
    async fn reply_to_send(
        &mut self,
        reference: i64,
        client_msg_id: Option<&str>,
    ) -> Result<Sent, ClientError> {
        let answers = |replied: Option<i64>, replied_id: Option<&str>| {
            answers_send(replied, replied_id, reference, client_msg_id)
        };
        self.wait_for(|frame| match frame {
            ServerFrame::Sent(sent) if answers(sent.reference, Some(&sent.client_msg_id)) => {
                Some(Ok(sent.clone()))
            }
            ServerFrame::Error(e) if answers(e.reference, e.client_msg_id.as_deref()) => {
                Some(Err(ClientError::Server(e.clone())))
            }
            _ => None,
        })
        .await
    }

    /// Fetches events after `after_seq`.
    pub async fn fetch(
        &mut self,
        conversation_id: &str,
        after_seq: u64,
        limit: Option<u32>,
    ) -> Result<Messages, ClientError> {
        let reference = self.take_ref();
        self.send_frame(&ClientFrame::Fetch(Fetch {
            reference: Some(reference),
            conversation_id: conversation_id.to_owned(),
            after_seq: Some(after_seq),
            limit,
        }))
        .await?;
        self.wait_for(|frame| match frame {
            ServerFrame::Messages(m) if m.reference == Some(reference) => Some(Ok(m.clone())),
            ServerFrame::Error(e) if e.reference == Some(reference) => {
                Some(Err(ClientError::Server(e.clone())))
            }
            _ => None,
        })
        .await
    }

    /// Asks for a sync and returns the events it brought, up to `sync_done`; an `error` the
    /// server answers it with (a cursor naming no conversation id) ends it with that error.
    /// The events are held at once, as by [`Client::events_until_sync_done`], up to
    /// [`MAX_BUFFERED_BYTES`].
    pub async fn sync(
        &mut self,
        cursors: BTreeMap<String, u64>,
    ) -> Result<Vec<Event>, ClientError> {
        let reference = self.take_ref();
        self.send_frame(&ClientFrame::Sync(Sync {
            reference: Some(reference),
            cursors,
        }))
        .await?;
        self.events_until_sync_done_or_error(Some(reference)).await
    }

    /// Reads events up to the next `sync_done` (other frames stay buffered), all held at once:
    /// a catch-up larger than [`MAX_BUFFERED_BYTES`] fails with [`ClientError::Overflow`].
    /// Read such a one with [`Client::next_event_until_sync_done`].
    pub async fn events_until_sync_done(&mut self) -> Result<Vec<Event>, ClientError> {
        self.events_until_sync_done_or_error(None).await
    }

    /// Reads events up to the next `sync_done`, or to an `error` whose `ref` is `refused`,
    /// failing with [`ClientError::Timeout`] when [`REPLY_TIMEOUT`] passes with no event: each
    /// event moves the deadline on (a large catch-up takes long to read), a frame of no part
    /// in it does not (typing and receipts, which came every few seconds on a busy
    /// connection, kept a catch-up that never ended waiting for ever).
    /// Frames other than events stay buffered, and when it fails (that error, a timeout, a
    /// closed connection) every frame it read is kept, in order, for later calls: they were
    /// dropped, so an event read before the failure never reached the caller while the
    /// connection lived on. What it gathers counts toward [`MAX_BUFFERED_BYTES`].
    async fn events_until_sync_done_or_error(
        &mut self,
        refused: Option<i64>,
    ) -> Result<Vec<Event>, ClientError> {
        let mut read = Buffered::default();
        let mut deadline = tokio::time::Instant::now() + REPLY_TIMEOUT;
        let failed = loop {
            let next = tokio::time::timeout_at(deadline, self.next_sized()).await;
            match next.unwrap_or(Err(ClientError::Timeout(REPLY_TIMEOUT))) {
                Ok((ServerFrame::SyncDone(_), _)) => break None,
                Ok((ServerFrame::Error(e), _)) if refused.is_some() && e.reference == refused => {
                    break Some(ClientError::Server(e));
                }
                Ok((_, size)) if self.overflows(read.bytes, size) => {
                    return Err(self.overflowed().await);
                }
                Ok((frame, size)) => {
                    if matches!(frame, ServerFrame::Event(_)) {
                        deadline = tokio::time::Instant::now() + REPLY_TIMEOUT;
                    }
                    read.push_back(frame, size);
                }
                Err(e) => break Some(e),
            }
        };
        let later = std::mem::take(&mut self.buffered);
        if let Some(error) = failed {
            read.append(later);
            self.buffered = read;
            return Err(error);
        }
        let mut events = Vec::new();
        for (frame, size) in read.frames {
            match frame {
                ServerFrame::Event(event) => events.push(event),
                other => self.buffered.push_back(other, size),
            }
        }
        self.buffered.append(later);
        Ok(events)
    }

    /// The next `event` frame (other frames stay buffered).
    pub async fn next_event(&mut self) -> Result<Event, ClientError> {
        let is_event = |f: &ServerFrame| matches!(f, ServerFrame::Event(_));
        if let Some(ServerFrame::Event(event)) = self.buffered.take_first(is_event) {
            return Ok(event);
        }
        self.wait_for(|frame| match frame {
            ServerFrame::Event(event) => Some(Ok(event.clone())),
            _ => None,
        })
        .await
    }

    /// The next event of a catch-up (the connection's first, or a sync's), or `None` at its
    /// `sync_done`; other frames stay buffered. A catch-up read so, one event at a time and
    /// acknowledged as it goes, is held by nobody, however large: PROTOCOL.md has the server
    /// send it whole, with no paging, so [`Client::events_until_sync_done`], which holds it
    /// all, fails past [`MAX_BUFFERED_BYTES`] (the events of a device long offline in busy
    /// groups, of large media references).
    pub async fn next_event_until_sync_done(&mut self) -> Result<Option<Event>, ClientError> {
        let ends = |f: &ServerFrame| matches!(f, ServerFrame::Event(_) | ServerFrame::SyncDone(_));
        match self.buffered.take_first(ends) {
            Some(ServerFrame::Event(event)) => Ok(Some(event)),
            Some(_) => Ok(None),
            None => {
                self.wait_for(|frame| match frame {
                    ServerFrame::Event(event) => Some(Ok(Some(event.clone()))),
                    ServerFrame::SyncDone(_) => Some(Ok(None)),
                    _ => None,
                })
                .await
            }
        }
    }

    /// Sends `ping` and waits for its `pong`.
    pub async fn ping(&mut self) -> Result<(), ClientError> {
        let reference = self.take_ref();
        self.send_frame(&ClientFrame::Ping(Ping {
            reference: Some(reference),
        }))
        .await?;
        self.wait_for(|frame| match frame {
            ServerFrame::Pong(p) if p.reference == Some(reference) => Some(Ok(())),
            _ => None,
        })
        .await
    }

    /// Closes the connection politely.
    pub async fn close(mut self) {
        let _ = self.socket.close(None).await;
    }
}

/// Whether a reply of `ref` `replied` naming `replied_id` answers the frame of `ref`
/// `reference`, a `send` of `client_msg_id` or (`None`) another: by its `ref`, which
/// PROTOCOL.md has the server echo; without one, by the `client_msg_id` it promises an answer
/// to a `send` carries (an `error` of only a `client_msg_id` was taken for someone else's, and
/// the send waited [`REPLY_TIMEOUT`] to end with a timeout, the server's reason lost).
fn answers_send(
    replied: Option<i64>,
    replied_id: Option<&str>,
    reference: i64,
    client_msg_id: Option<&str>,
) -> bool {
    match replied {
        Some(replied) => replied == reference,
        None => client_msg_id.is_some() && replied_id == client_msg_id,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message as _;
    use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};

    /// A server of one connection in `encoding`: says `hello`, then answers each client frame
    /// with the messages `answer` gives. Returns its ws:// base URL.
    async fn scripted_server(
        encoding: Encoding,
        answer: impl Fn(ClientFrame) -> Vec<Message> + std::marker::Send + 'static,
    ) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let mut ws = greeted(&listener, encoding).await;
            while let Some(Ok(received)) = ws.next().await {
                let frame = match &received {
                    Message::Text(text) => encoding.decode_client(text.as_bytes()),
                    Message::Binary(bytes) => encoding.decode_client(bytes),
                    _ => continue,
                };
                for reply in answer(frame.unwrap()) {
                    // The client may have closed the connection (a test of its bounds).
                    if ws.send(reply).await.is_err() {
                        return;
                    }
                }
            }
        });
        format!("ws://{addr}")
    }

    /// The WebSocket of the next connection to `listener`, upgraded in `encoding`.
    async fn upgraded(
        listener: &tokio::net::TcpListener,
        encoding: Encoding,
    ) -> WebSocketStream<TcpStream> {
        let (tcp, _) = listener.accept().await.unwrap();
        #[allow(clippy::result_large_err)]
        let echo = move |_: &Request, mut response: Response| {
            let protocol = HeaderValue::from_static(encoding.subprotocol());
            response
                .headers_mut()
                .insert("sec-websocket-protocol", protocol);
            Ok(response)
        };
        tokio_tungstenite::accept_hdr_async(tcp, echo)
            .await
            .unwrap()
    }

    /// [`upgraded`], the server's `hello` said.
    async fn greeted(
        listener: &tokio::net::TcpListener,
        encoding: Encoding,
    ) -> WebSocketStream<TcpStream> {
        let mut ws = upgraded(listener, encoding).await;
        let hello = ServerFrame::Hello(Hello {
            user: "u".into(),
            device: "d".into(),
            server_time_ms: 0,
        });
        ws.send(message(encoding, &hello)).await.unwrap();
        ws
    }

    fn message(encoding: Encoding, frame: &ServerFrame) -> Message {
        match encoding.encode_server(frame) {
            Payload::Text(text) => Message::text(text),
            Payload::Binary(bytes) => Message::binary(bytes),
        }
    }

    fn sent_for(send: &Send) -> ServerFrame {
        ServerFrame::Sent(Sent {
            reference: send.reference,
            client_msg_id: send.client_msg_id.clone(),
            conversation_id: "d:1".into(),
            seq: 1,
            server_msg_id: "m1".into(),
            ts_ms: 1,
            duplicate: false,
        })
    }

    /// A server that takes the connection and never answers (a process stopped mid-start, a
    /// proxy whose backend hangs) fails the connect with a timeout: `courier chat` says so and
    /// exits, where it waited for ever.
    #[tokio::test(start_paused = true)]
    async fn a_server_that_never_answers_fails_the_connect_with_a_timeout() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("ws://{}", listener.local_addr().unwrap());
        let silent = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            std::future::pending::<()>().await;
            drop(tcp);
        });
        match Client::connect(&url, "t", Encoding::Json).await {
            Err(ClientError::Timeout(waited)) => assert_eq!(waited, REPLY_TIMEOUT),
            Err(other) => panic!("{other}"),
            Ok(_) => panic!("connected"),
        }
        // One that upgrades and never says hello, too.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("ws://{}", listener.local_addr().unwrap());
        let mute = tokio::spawn(async move {
            let _ws = upgraded(&listener, Encoding::Json).await;
            std::future::pending::<()>().await;
        });
        match Client::connect(&url, "t", Encoding::Json).await {
            Err(ClientError::Timeout(waited)) => assert_eq!(waited, REPLY_TIMEOUT),
            Err(other) => panic!("{other}"),
            Ok(_) => panic!("connected"),
        }
        silent.abort();
        mute.abort();
    }

    /// A `sync` the server refuses (a cursor naming no conversation id) ends with the server's
    /// error, not after [`REPLY_TIMEOUT`] with a timeout, and the frames read meanwhile are
    /// kept for later calls: an event that came before the refusal is not lost.
    #[tokio::test]
    async fn a_refused_sync_ends_with_its_error_and_loses_no_frame() {
        let url = scripted_server(Encoding::Json, |frame| {
            let ClientFrame::Sync(sync) = frame else {
                return Vec::new();
            };
            let event = ServerFrame::Event(Event {
                conversation_id: "d:1".into(),
                seq: 1,
                server_msg_id: "m1".into(),
                sender: Sender {
                    user: "bob".into(),
                    device: "p".into(),
                },
                ts_ms: 1,
                payload: EventPayload::Message {
                    body: Some(Body::Text("hi".into())),
                    client_msg_id: "c1".into(),
                    reply_to: None,
                    deleted: false,
                },
            });
            let refused = ServerFrame::Error(ErrorFrame {
                reference: sync.reference,
                code: ErrorCode::BadRequest,
                message: "conversation id must be ...".into(),
                client_msg_id: None,
                retry_after_ms: None,
            });
            vec![
                message(Encoding::Json, &event),
                message(Encoding::Json, &refused),
            ]
        })
        .await;
        let mut client = Client::connect(&url, "t", Encoding::Json).await.unwrap();
        let cursors = BTreeMap::from([("not an id".to_owned(), 0)]);
        match client.sync(cursors).await {
            Err(ClientError::Server(e)) => assert_eq!(e.code, ErrorCode::BadRequest),
            other => panic!("{other:?}"),
        }
        let event = client.next_event().await.unwrap();
        assert_eq!((event.conversation_id.as_str(), event.seq), ("d:1", 1));
    }

    /// An event of `text` in conversation `d:1`.
    fn event_of(seq: u64, text: String) -> ServerFrame {
        ServerFrame::Event(Event {
            conversation_id: "d:1".into(),
            seq,
            server_msg_id: format!("m{seq}"),
            sender: Sender {
                user: "bob".into(),
                device: "p".into(),
            },
            ts_ms: 1,
            payload: EventPayload::Message {
                body: Some(Body::Text(text)),
                client_msg_id: format!("c{seq}"),
                reply_to: None,
                deleted: false,
            },
        })
    }

    /// Frames that come while a call waits are kept up to [`MAX_BUFFERED_BYTES`], a catch-up
    /// of nearly that much given whole to the caller; past it the call fails with
    /// [`ClientError::Overflow`] and the connection is closed. They were kept without bound: a
    /// server flooding while a call waited, or a caller that never read them, grew memory for
    /// ever.
    #[tokio::test]
    async fn frames_kept_while_a_call_waits_are_bounded() {
        const MIB: usize = 1 << 20;
        let url = scripted_server(Encoding::Proto, |frame| {
            let ClientFrame::Send(send) = frame else {
                return Vec::new();
            };
            // The first send: events of nearly the bound, then its `sent`. The second: more
            // than the bound, and no `sent`.
            let (events, answered) = match send.client_msg_id.as_str() {
                "c1" => (MAX_BUFFERED_BYTES / MIB - 1, true),
                _ => (MAX_BUFFERED_BYTES / MIB + 1, false),
            };
            let mut replies: Vec<Message> = (1..=events as u64)
                .map(|seq| message(Encoding::Proto, &event_of(seq, "x".repeat(MIB - 256))))
                .collect();
            if answered {
                replies.push(message(Encoding::Proto, &sent_for(&send)));
            }
            replies
        })
        .await;
        let mut client = Client::connect(&url, "t", Encoding::Proto).await.unwrap();
        client
            .send_text(Target::User("bob".into()), "c1", "hi")
            .await
            .unwrap();
        for seq in 1..MAX_BUFFERED_BYTES / MIB {
            let event = client.next_event().await.unwrap();
            assert_eq!(event.seq, seq as u64);
        }
        match client
            .send_text(Target::User("bob".into()), "c2", "hi")
            .await
        {
            Err(ClientError::Overflow(bound)) => assert_eq!(bound, MAX_BUFFERED_BYTES),
            other => panic!("{other:?}"),
        }
        // Closed: nothing more is sent, and nothing is held.
        assert!(
            client
                .send_text(Target::User("bob".into()), "c3", "hi")
                .await
                .is_err()
        );
        assert_eq!(client.buffered.bytes, 0);
    }

    /// An event of a kind this SDK does not know (one a newer server adds), in the frame
    /// `encoding` writes: seq 2 of `d:1`, alone, or between seqs 1 and 3 in a `messages`
    /// frame answering the `fetch` of `ref` when `listed` is `Some(ref)`.
    fn unknown_kind(encoding: Encoding, listed: Option<i64>) -> Message {
        let event = pb::Event {
            conversation_id: "d:1".into(),
            seq: 2,
            server_msg_id: "m2".into(),
            sender: Some(pb::Sender {
                user: "bob".into(),
                device: "p".into(),
            }),
            ts_ms: 1,
            kind: "reaction".into(),
            ..Default::default()
        };
        match (encoding, listed) {
            (Encoding::Json, None) => Message::text(
                r#"{"type":"event","conversation_id":"d:1","seq":2,"server_msg_id":"m2","sender":{"user":"bob","device":"p"},"ts_ms":1,"kind":"reaction","emoji":"+1","target_seq":1}"#,
            ),
            (Encoding::Json, Some(reference)) => Message::text(
                r#"{"type":"messages","ref":REF,"conversation_id":"d:1","head_seq":3,"events":[{"conversation_id":"d:1","seq":1,"server_msg_id":"m1","sender":{"user":"bob","device":"p"},"ts_ms":1,"kind":"message","client_msg_id":"c1","body":{"text":"a"}},{"conversation_id":"d:1","seq":2,"server_msg_id":"m2","sender":{"user":"bob","device":"p"},"ts_ms":1,"kind":"reaction","emoji":"+1"},{"conversation_id":"d:1","seq":3,"server_msg_id":"m3","sender":{"user":"bob","device":"p"},"ts_ms":1,"kind":"message","client_msg_id":"c3","body":{"text":"c"}}]}"#
                    .replace("REF", &reference.to_string()),
            ),
            (Encoding::Proto, None) => Message::binary(
                pb::ServerFrame {
                    r#ref: None,
                    frame: Some(pb::server_frame::Frame::Event(event)),
                }
                .encode_to_vec(),
            ),
            (Encoding::Proto, Some(reference)) => {
                let known = |seq: u64| match event_of(seq, "x".into()) {
                    ServerFrame::Event(e) => pb::Event::from(e),
                    _ => unreachable!(),
                };
                let messages = pb::Messages {
                    conversation_id: "d:1".into(),
                    events: vec![known(1), event, known(3)],
                    head_seq: 3,
                };
                Message::binary(
                    pb::ServerFrame {
                        r#ref: Some(reference),
                        frame: Some(pb::server_frame::Frame::Messages(messages)),
                    }
                    .encode_to_vec(),
                )
            }
        }
    }

    /// An event of a kind this SDK does not know takes its seq in the conversation like any
    /// other: it is given to the caller as such, with its kind and seq, in order between its
    /// neighbours, so that seqs stay dense and the caller acknowledges past it. It failed the
    /// call waiting for its reply as undecodable (a `send`, a `fetch`, the catch-up of
    /// `courier chat`, which then ended).
    #[tokio::test]
    async fn an_event_of_an_unknown_kind_is_given_with_its_seq() {
        for encoding in [Encoding::Json, Encoding::Proto] {
            let url = scripted_server(encoding, move |frame| match frame {
                ClientFrame::Send(send) => vec![
                    message(encoding, &event_of(1, "a".into())),
                    unknown_kind(encoding, None),
                    message(encoding, &event_of(3, "c".into())),
                    message(encoding, &sent_for(&send)),
                ],
                ClientFrame::Fetch(fetch) => vec![unknown_kind(encoding, fetch.reference)],
                _ => Vec::new(),
            })
            .await;
            let mut client = Client::connect(&url, "t", encoding).await.unwrap();
            client
                .send_text(Target::User("bob".into()), "c9", "hi")
                .await
                .unwrap_or_else(|e| panic!("{encoding:?}: {e}"));
            let mut kinds = Vec::new();
            for seq in 1..=3 {
                let event = client.next_event().await.unwrap();
                assert_eq!(event.seq, seq, "{encoding:?}");
                kinds.push(event.payload.kind().to_owned());
            }
            assert_eq!(kinds, ["message", "reaction", "message"], "{encoding:?}");
            let messages = client
                .fetch("d:1", 0, None)
                .await
                .unwrap_or_else(|e| panic!("{encoding:?}: {e}"));
            let listed: Vec<_> = messages
                .events
                .iter()
                .map(|e| (e.seq, e.payload.kind()))
                .collect();
            assert_eq!(
                listed,
                [(1, "message"), (2, "reaction"), (3, "message")],
                "{encoding:?}"
            );
        }
    }

    /// A server that answers every send `rate_limited` with a wait of a day (broken, or
    /// hostile) is tried [`SEND_ATTEMPTS`] times, waiting at most [`MAX_RETRY_WAIT`] between
    /// two, and `send_with_retry` ends with its error: it waited the day each time, holding its
    /// caller (a `courier chat` session) for a week.
    #[tokio::test(start_paused = true)]
    async fn send_with_retry_caps_each_wait_and_gives_up() {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicU32, Ordering};
        let attempts = Arc::new(AtomicU32::new(0));
        let counted = attempts.clone();
        let url = scripted_server(Encoding::Json, move |frame| {
            let ClientFrame::Send(send) = frame else {
                return Vec::new();
            };
            counted.fetch_add(1, Ordering::Relaxed);
            let refused = ServerFrame::Error(ErrorFrame {
                reference: send.reference,
                code: ErrorCode::RateLimited,
                message: "slow down".into(),
                client_msg_id: Some(send.client_msg_id),
                retry_after_ms: Some(24 * 3600 * 1000),
            });
            vec![message(Encoding::Json, &refused)]
        })
        .await;
        let mut client = Client::connect(&url, "t", Encoding::Json).await.unwrap();
        let started = tokio::time::Instant::now();
        let body = Body::Text("hi".into());
        match client
            .send_with_retry(Target::User("bob".into()), "c1", body)
            .await
        {
            Err(ClientError::Server(e)) => assert_eq!(e.code, ErrorCode::RateLimited),
            other => panic!("{other:?}"),
        }
        assert_eq!(attempts.load(Ordering::Relaxed), SEND_ATTEMPTS);
        let waited = started.elapsed();
        assert!(waited <= MAX_RETRY_WAIT * (SEND_ATTEMPTS - 1), "{waited:?}");
    }

    /// A catch-up larger than [`MAX_BUFFERED_BYTES`], which `sync` and
    /// `events_until_sync_done` cannot hold, is read whole one event at a time, in order, up
    /// to its `sync_done`, with nothing held; a receipt among its events stays for later.
    #[tokio::test]
    async fn a_catch_up_larger_than_the_bound_is_read_one_event_at_a_time() {
        const MIB: usize = 1 << 20;
        let events = (MAX_BUFFERED_BYTES / MIB + 2) as u64;
        let url = scripted_server(Encoding::Proto, move |frame| {
            let ClientFrame::Sync(_) = frame else {
                return Vec::new();
            };
            let receipt = ServerFrame::Receipt(Receipt {
                conversation_id: "d:1".into(),
                user: "bob".into(),
                delivered_seq: 1,
                read_seq: 0,
            });
            let mut replies: Vec<Message> = (1..=events)
                .map(|seq| message(Encoding::Proto, &event_of(seq, "x".repeat(MIB - 256))))
                .collect();
            replies.insert(1, message(Encoding::Proto, &receipt));
            replies.push(message(
                Encoding::Proto,
                &ServerFrame::SyncDone(SyncDone {}),
            ));
            replies
        })
        .await;
        let mut client = Client::connect(&url, "t", Encoding::Proto).await.unwrap();
        client
            .send_frame(&ClientFrame::Sync(Sync::default()))
            .await
            .unwrap();
        let mut read = 0;
        while let Some(event) = client.next_event_until_sync_done().await.unwrap() {
            read += 1;
            assert_eq!(event.seq, read);
            client
                .ack("d:1", event.seq, AckKind::Delivered)
                .await
                .unwrap();
        }
        assert_eq!(read, events);
        match client.next_frame().await.unwrap() {
            ServerFrame::Receipt(receipt) => assert_eq!(receipt.delivered_seq, 1),
            other => panic!("{other:?}"),
        }
        assert_eq!(client.buffered.bytes, 0);
    }

    /// PROTOCOL.md welcomes new frame types: a frame of a type this SDK does not know, in
    /// either encoding, is passed over, and the call waiting for its reply gets it.
    #[tokio::test]
    async fn a_frame_of_an_unknown_type_is_passed_over() {
        for encoding in [Encoding::Json, Encoding::Proto] {
            let url = scripted_server(encoding, move |frame| {
                let ClientFrame::Send(send) = frame else {
                    return Vec::new();
                };
                let unknown = match encoding {
                    Encoding::Json => Message::text(format!(
                        r#"{{"type":"reaction","ref":{},"emoji":"👍"}}"#,
                        send.reference.unwrap()
                    )),
                    // A frame of a oneof field this version has not: prost reads no frame.
                    Encoding::Proto => Message::binary(
                        pb::ServerFrame {
                            r#ref: send.reference,
                            frame: None,
                        }
                        .encode_to_vec(),
                    ),
                };
                vec![unknown, message(encoding, &sent_for(&send))]
            })
            .await;
            let mut client = Client::connect(&url, "t", encoding).await.unwrap();
            let sent = client
                .send_text(Target::User("bob".into()), "c1", "hi")
                .await
                .unwrap_or_else(|e| panic!("{encoding:?}: {e}"));
            assert_eq!(sent.client_msg_id, "c1");
        }
    }

    /// A `sync` whose `sync_done` never comes, and the connection's first catch-up, fail after
    /// [`REPLY_TIMEOUT`] with a timeout, however many frames of no part in them (typing,
    /// receipts of a busy group) come meanwhile; those frames are kept for later. Each such
    /// frame gave the call [`REPLY_TIMEOUT`] more: on a connection that carried one every
    /// 10 s, the call waited for ever.
    #[tokio::test(start_paused = true)]
    async fn a_catch_up_never_ended_times_out_whatever_other_frames_come() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("ws://{}", listener.local_addr().unwrap());
        let chatty = tokio::spawn(async move {
            let mut ws = greeted(&listener, Encoding::Json).await;
            loop {
                tokio::time::sleep(REPLY_TIMEOUT / 3).await;
                let typing = ServerFrame::Typing(TypingNotice {
                    conversation_id: "d:1".into(),
                    user: "bob".into(),
                    active: true,
                });
                if ws.send(message(Encoding::Json, &typing)).await.is_err() {
                    return;
                }
            }
        });
        let mut client = Client::connect(&url, "t", Encoding::Json).await.unwrap();
        for sync in [false, true] {
            let caught_up = async {
                match sync {
                    true => client.sync(BTreeMap::new()).await,
                    false => client.events_until_sync_done().await,
                }
            };
            match tokio::time::timeout(REPLY_TIMEOUT * 4, caught_up).await {
                Ok(Err(ClientError::Timeout(waited))) => assert_eq!(waited, REPLY_TIMEOUT),
                Ok(other) => panic!("sync {sync}: {other:?}"),
                Err(_) => panic!("sync {sync}: still waiting"),
            }
        }
        assert!(matches!(
            client.next_frame().await.unwrap(),
            ServerFrame::Typing(_)
        ));
        chatty.abort();
    }

    /// An `error` answering a `send` that carries its `client_msg_id` and no `ref` (PROTOCOL.md
    /// promises the former) ends the send with that error; one naming another `client_msg_id`
    /// does not. The send waited for a `ref` that never came and ended after [`REPLY_TIMEOUT`]
    /// with a timeout, the server's reason (forbidden, too large) lost.
    #[tokio::test]
    async fn an_error_with_a_send_s_client_msg_id_and_no_ref_answers_it() {
        let url = scripted_server(Encoding::Json, |frame| {
            let ClientFrame::Send(send) = frame else {
                return Vec::new();
            };
            let error = |client_msg_id: &str, code| {
                let error = ServerFrame::Error(ErrorFrame {
                    reference: None,
                    code,
                    message: "no".into(),
                    client_msg_id: Some(client_msg_id.into()),
                    retry_after_ms: None,
                });
                message(Encoding::Json, &error)
            };
            vec![
                error("another", ErrorCode::TooLarge),
                error(&send.client_msg_id, ErrorCode::Forbidden),
            ]
        })
        .await;
        let mut client = Client::connect(&url, "t", Encoding::Json).await.unwrap();
        match client
            .send_text(Target::User("bob".into()), "c1", "hi")
            .await
        {
            Err(ClientError::Server(e)) => {
                assert_eq!(e.code, ErrorCode::Forbidden);
                assert_eq!(e.client_msg_id.as_deref(), Some("c1"));
            }
            other => panic!("{other:?}"),
        }
        match client.next_frame().await.unwrap() {
            ServerFrame::Error(e) => assert_eq!(e.client_msg_id.as_deref(), Some("another")),
            other => panic!("{other:?}"),
        }
    }
}
