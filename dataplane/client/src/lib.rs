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

mod connection;
mod http;

pub use connection::{Client, Target, websocket_config};
pub use courier_proto as proto;
pub use http::HttpApi;

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
}
