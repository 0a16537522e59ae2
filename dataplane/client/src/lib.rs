//! A typed Rust client for the Courier protocol (`PROTOCOL.md`): connect over WebSocket with
//! either subprotocol, send with retry on `unavailable`, acknowledge, sync, fetch; and the
//! HTTP API. Used by the tests, the load generator (`courier-bench`) and `courier chat`.
//!
//! ```no_run
//! # async fn demo() -> Result<(), courier_client::ClientError> {
//! use courier_client::{Client, Target};
//! let mut alice = Client::connect("ws://127.0.0.1:8080", "<jwt>", Default::default()).await?;
//! let sent = alice.send_text(Target::User("bob".into()), "m1", "hello").await?;
//! println!("stored as seq {} of {}", sent.seq, sent.conversation_id);
//! # Ok(()) }
//! ```
//!
//! Frames that arrive while a call waits for its reply (events of a catch-up, receipts,
//! typing) are kept for [`Client::next_frame`] and [`Client::next_event`], up to
//! [`MAX_BUFFERED_BYTES`] of them as they came on the wire; a call that would keep more fails
//! with [`ClientError::Overflow`] and closes the connection, rather than holding ever more
//! memory (a server flooding, a caller that never reads them). Nothing is lost: reconnect, and
//! the events not acknowledged come again.
//!
//! A catch-up (the events a connection is sent before its `sync_done`, or a sync's) comes
//! whole: PROTOCOL.md has no paging of it (`fetch` pages one conversation's history).
//! [`Client::events_until_sync_done`] and [`Client::sync`] hold it at once, so up to
//! [`MAX_BUFFERED_BYTES`]; read a larger one one event at a time with
//! [`Client::next_event_until_sync_done`], acknowledging as you go.
//!
//! A frame of a type this version does not know is passed over; an event of a kind it does not
//! know (one a later server adds) is given, in its place, as
//! [`EventPayload::Unknown`](courier_proto::EventPayload::Unknown) with its seq: it takes its
//! seq in the conversation like any other, so acknowledge past it.

mod connection;
mod http;

pub use connection::{
    Client, MAX_BUFFERED_BYTES, MAX_RETRY_WAIT, SEND_ATTEMPTS, Target, websocket_config,
};
pub use courier_proto as proto;
pub use http::{HttpApi, MAX_ANSWER_BYTES};

use courier_proto::{DecodeError, ErrorFrame};

/// Why a client call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("the server refused the connection with HTTP {0}")]
    Rejected(u16),
    #[error("connection closed{}", .0.as_ref().map(|(c, r)| format!(" with code {c}: {r}")).unwrap_or_default())]
    Closed(Option<(u16, String)>),
    #[error("server error {}: {}", .0.code.as_str(), .0.message)]
    Server(ErrorFrame),
    #[error("undecodable frame from the server: {0}")]
    Decode(#[from] DecodeError),
    #[error("no answer within {0:?}")]
    Timeout(std::time::Duration),
    #[error("websocket: {0}")]
    WebSocket(String),
    #[error("http: {0}")]
    Http(String),
    /// Frames came faster than the caller read them: see [`MAX_BUFFERED_BYTES`].
    #[error(
        "more than {0} bytes of frames came unread, so the connection was closed (events not \
         acknowledged come again on the next connection)"
    )]
    Overflow(usize),
    /// An id given to a call is not one PROTOCOL.md allows: refused before any request.
    #[error("{0}")]
    InvalidId(#[from] courier_proto::ids::InvalidId),
}
