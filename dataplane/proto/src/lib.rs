//! The Courier client protocol v1 (see `PROTOCOL.md`): frames as Rust types, their two wire
//! encodings (`courier.v1.json` and `courier.v1.proto`) and the validation of ids.
//!
//! This crate is the contract shared by the server, the client SDK and the tests. It holds no
//! behaviour beyond encoding: what a frame *does* is the server's business.
//!
//! ```
//! use courier_proto::{ClientFrame, Encoding};
//! let frame = Encoding::Json
//!     .decode_client(br#"{"type":"ping","ref":7}"#)
//!     .unwrap();
//! assert_eq!(frame.reference(), Some(7));
//! ```

mod codec;
mod convert;
mod frames;
pub mod ids;
mod tagged;

pub use codec::{DecodeError, Encoding, Payload};
pub use frames::*;

/// The protobuf types generated from `proto/courier/v1/client.proto`.
#[allow(clippy::large_enum_variant)]
pub mod pb {
    include!(concat!(env!("OUT_DIR"), "/courier.v1.rs"));
}

/// WebSocket subprotocol names.
pub const SUBPROTOCOL_JSON: &str = "courier.v1.json";
/// WebSocket subprotocol for protobuf frames.
pub const SUBPROTOCOL_PROTO: &str = "courier.v1.proto";
