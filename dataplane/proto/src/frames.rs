//! The frames of the protocol, serialised as JSON objects tagged by `"type"`.

use crate::tagged::{self, TaggedFrame};
use serde::{Deserialize, Deserializer, Serialize};
use std::collections::BTreeMap;

/// `(user, device)`: the identity of one connection.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Sender {
    pub user: String,
    pub device: String,
}

/// A reference to uploaded media, carried by a message body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Media {
    pub media_id: String,
    pub mime: String,
    pub size: u64,
    pub sha256: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub caption: Option<String>,
}

/// A message body: `{"text": "..."}` or `{"media": {...}}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Body {
    Text(String),
    /// Boxed: a media reference is ~100 bytes, and every message, text or not, is as large as
    /// its largest body while it moves between the roles.
    Media(Box<Media>),
}

/// Which cursor an `ack` moves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AckKind {
    Delivered,
    Read,
}

/// A frame from client to server.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ClientFrame {
    Send(Send),
    Ack(Ack),
    Sync(Sync),
    Fetch(Fetch),
    Delete(Delete),
    Typing(Typing),
    Ping(Ping),
}

/// The `type` of a client frame.
#[derive(Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum ClientFrameType {
    Send,
    Ack,
    Sync,
    Fetch,
    Delete,
    Typing,
    Ping,
}

impl<'de> TaggedFrame<'de> for ClientFrame {
    type Tag = ClientFrameType;
    const EXPECTING: &'static str = "a client frame (an object with a \"type\")";

    fn variant<D: Deserializer<'de>>(tag: ClientFrameType, fields: D) -> Result<Self, D::Error> {
        Ok(match tag {
            ClientFrameType::Send => Self::Send(Send::deserialize(fields)?),
            ClientFrameType::Ack => Self::Ack(Ack::deserialize(fields)?),
            ClientFrameType::Sync => Self::Sync(Sync::deserialize(fields)?),
            ClientFrameType::Fetch => Self::Fetch(Fetch::deserialize(fields)?),
            ClientFrameType::Delete => Self::Delete(Delete::deserialize(fields)?),
            ClientFrameType::Typing => Self::Typing(Typing::deserialize(fields)?),
            ClientFrameType::Ping => Self::Ping(Ping::deserialize(fields)?),
        })
    }
}

impl<'de> Deserialize<'de> for ClientFrame {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        tagged::deserialize(deserializer)
    }
}

impl ClientFrame {
    /// The client-chosen `ref`, echoed in the direct reply.
    pub fn reference(&self) -> Option<i64> {
        match self {
            ClientFrame::Send(f) => f.reference,
            ClientFrame::Ack(f) => f.reference,
            ClientFrame::Sync(f) => f.reference,
            ClientFrame::Fetch(f) => f.reference,
            ClientFrame::Delete(f) => f.reference,
            ClientFrame::Typing(f) => f.reference,
            ClientFrame::Ping(f) => f.reference,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Send {
    #[serde(rename = "ref", default, skip_serializing_if = "Option::is_none")]
    pub reference: Option<i64>,
    pub client_msg_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conversation_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to_user: Option<String>,
    pub body: Body,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply_to: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Ack {
    #[serde(rename = "ref", default, skip_serializing_if = "Option::is_none")]
    pub reference: Option<i64>,
    pub conversation_id: String,
    pub seq: u64,
    pub kind: AckKind,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Sync {
    #[serde(rename = "ref", default, skip_serializing_if = "Option::is_none")]
    pub reference: Option<i64>,
    /// Overrides of the server's delivered cursors, by conversation.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub cursors: BTreeMap<String, u64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Fetch {
    #[serde(rename = "ref", default, skip_serializing_if = "Option::is_none")]
    pub reference: Option<i64>,
    pub conversation_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after_seq: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Delete {
    #[serde(rename = "ref", default, skip_serializing_if = "Option::is_none")]
    pub reference: Option<i64>,
    pub conversation_id: String,
    pub seq: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Typing {
    #[serde(rename = "ref", default, skip_serializing_if = "Option::is_none")]
    pub reference: Option<i64>,
    pub conversation_id: String,
    pub active: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Ping {
    #[serde(rename = "ref", default, skip_serializing_if = "Option::is_none")]
    pub reference: Option<i64>,
}

/// A frame from server to client.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerFrame {
    Hello(Hello),
    Sent(Sent),
    Event(Event),
    Messages(Messages),
    Receipt(Receipt),
    SyncDone(SyncDone),
    Trimmed(Trimmed),
    Typing(TypingNotice),
    Error(ErrorFrame),
    Reconnect(Reconnect),
    Pong(Pong),
}

/// The `type` of a server frame.
#[derive(Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum ServerFrameType {
    Hello,
    Sent,
    Event,
    Messages,
    Receipt,
    SyncDone,
    Trimmed,
    Typing,
    Error,
    Reconnect,
    Pong,
}

impl ServerFrame {
    /// Whether `name` is the `"type"` of a server frame of this version.
    pub fn knows_type(name: &str) -> bool {
        use serde::de::IntoDeserializer;
        let name: serde::de::value::StrDeserializer<'_, serde::de::value::Error> =
            name.into_deserializer();
        ServerFrameType::deserialize(name).is_ok()
    }
}

impl<'de> TaggedFrame<'de> for ServerFrame {
    type Tag = ServerFrameType;
    const EXPECTING: &'static str = "a server frame (an object with a \"type\")";

    fn variant<D: Deserializer<'de>>(tag: ServerFrameType, fields: D) -> Result<Self, D::Error> {
        Ok(match tag {
            ServerFrameType::Hello => Self::Hello(Hello::deserialize(fields)?),
            ServerFrameType::Sent => Self::Sent(Sent::deserialize(fields)?),
            ServerFrameType::Event => Self::Event(Event::deserialize(fields)?),
            ServerFrameType::Messages => Self::Messages(Messages::deserialize(fields)?),
            ServerFrameType::Receipt => Self::Receipt(Receipt::deserialize(fields)?),
            ServerFrameType::SyncDone => Self::SyncDone(SyncDone::deserialize(fields)?),
            ServerFrameType::Trimmed => Self::Trimmed(Trimmed::deserialize(fields)?),
            ServerFrameType::Typing => Self::Typing(TypingNotice::deserialize(fields)?),
            ServerFrameType::Error => Self::Error(ErrorFrame::deserialize(fields)?),
            ServerFrameType::Reconnect => Self::Reconnect(Reconnect::deserialize(fields)?),
            ServerFrameType::Pong => Self::Pong(Pong::deserialize(fields)?),
        })
    }
}

impl<'de> Deserialize<'de> for ServerFrame {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        tagged::deserialize(deserializer)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Hello {
    pub user: String,
    pub device: String,
    pub server_time_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sent {
    #[serde(rename = "ref", default, skip_serializing_if = "Option::is_none")]
    pub reference: Option<i64>,
    pub client_msg_id: String,
    pub conversation_id: String,
    pub seq: u64,
    pub server_msg_id: String,
    pub ts_ms: u64,
    pub duplicate: bool,
}

/// One event of a conversation, as delivered and as returned by `fetch`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "EventWire")]
pub struct Event {
    pub conversation_id: String,
    pub seq: u64,
    pub server_msg_id: String,
    pub sender: Sender,
    pub ts_ms: u64,
    #[serde(flatten)]
    pub payload: EventPayload,
}

/// An event as the wire has it: its payload's fields beside its own, `kind` telling which
/// payload they make. Read as one struct, in one pass: serde's `flatten` (how [`Event`] is
/// written) would buffer every field of every event first.
#[derive(Deserialize)]
struct EventWire {
    conversation_id: String,
    seq: u64,
    server_msg_id: String,
    sender: Sender,
    ts_ms: u64,
    kind: EventKind,
    #[serde(default)]
    body: Option<Body>,
    #[serde(default)]
    client_msg_id: Option<String>,
    #[serde(default)]
    reply_to: Option<u64>,
    #[serde(default)]
    deleted: bool,
    #[serde(default)]
    target_seq: Option<u64>,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    members: Option<Vec<String>>,
    #[serde(default)]
    users: Vec<String>,
    #[serde(default)]
    user: Option<String>,
}

/// The `kind` of an event.
#[derive(Deserialize)]
#[serde(rename_all = "snake_case")]
enum EventKind {
    Message,
    Delete,
    GroupCreated,
    MemberAdded,
    MemberRemoved,
    /// One this version does not know: [`EventPayload::Unknown`].
    #[serde(untagged)]
    Unknown(String),
}

impl TryFrom<EventWire> for Event {
    type Error = String;

    fn try_from(wire: EventWire) -> Result<Self, String> {
        fn required<T>(field: Option<T>, name: &str) -> Result<T, String> {
            field.ok_or_else(|| format!("missing field `{name}`"))
        }
        let EventWire {
            conversation_id,
            seq,
            server_msg_id,
            sender,
            ts_ms,
            kind,
            body,
            client_msg_id,
            reply_to,
            deleted,
            target_seq,
            name,
            members,
            users,
            user,
        } = wire;
        let membership = MembershipChangeWire { users, user };
        let payload = match kind {
            EventKind::Message => EventPayload::Message {
                body,
                client_msg_id: required(client_msg_id, "client_msg_id")?,
                reply_to,
                deleted,
            },
            EventKind::Delete => EventPayload::Delete {
                target_seq: required(target_seq, "target_seq")?,
            },
            EventKind::GroupCreated => EventPayload::GroupCreated {
                name: required(name, "name")?,
                members: required(members, "members")?,
            },
            EventKind::MemberAdded => EventPayload::MemberAdded(membership.try_into()?),
            EventKind::MemberRemoved => EventPayload::MemberRemoved(membership.try_into()?),
            EventKind::Unknown(kind) => EventPayload::Unknown { kind },
        };
        Ok(Event {
            conversation_id,
            seq,
            server_msg_id,
            sender,
            ts_ms,
            payload,
        })
    }
}

/// What an event is, tagged by `"kind"` (read through `EventWire`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum EventPayload {
    Message {
        /// Absent once the message was deleted for everyone.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        body: Option<Body>,
        client_msg_id: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reply_to: Option<u64>,
        #[serde(default)]
        deleted: bool,
    },
    Delete {
        target_seq: u64,
    },
    GroupCreated {
        name: String,
        members: Vec<String>,
    },
    MemberAdded(MembershipChange),
    MemberRemoved(MembershipChange),
    /// An event of a kind this version does not know, which a later server may send
    /// (PROTOCOL.md welcomes additions), read from a server's frames: it takes its seq in the
    /// conversation like any other, so a client keeps it, for seqs to stay dense, and
    /// acknowledges past it. The fields of its kind are not read. The server never makes one,
    /// and what it stores or passes between its nodes (`pb::Event` read with `TryFrom`)
    /// refuses an unknown kind as damage.
    #[serde(untagged)]
    Unknown {
        /// Its `kind` on the wire.
        kind: String,
    },
}

impl EventPayload {
    /// What kind of event it is, as `kind` names it on the wire.
    pub fn kind(&self) -> &str {
        match self {
            EventPayload::Message { .. } => "message",
            EventPayload::Delete { .. } => "delete",
            EventPayload::GroupCreated { .. } => "group_created",
            EventPayload::MemberAdded(_) => "member_added",
            EventPayload::MemberRemoved(_) => "member_removed",
            EventPayload::Unknown { kind } => kind,
        }
    }

    /// Whether the sending device is answered with `sent` instead of this event: a message or
    /// a delete, sent over its WebSocket. A group's creation and membership changes are made
    /// over HTTP, which answers no seq, so they reach the acting device as events.
    pub fn answered_with_sent(&self) -> bool {
        matches!(
            self,
            EventPayload::Message { .. } | EventPayload::Delete { .. }
        )
    }
}

/// The users one `member_added` or `member_removed` event names: everyone added or removed by
/// one request. On the wire it is `users`, plus `user` when that is a single user (what
/// clients of the first protocol version read).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(into = "MembershipChangeWire", try_from = "MembershipChangeWire")]
pub struct MembershipChange {
    pub users: Vec<String>,
}

impl MembershipChange {
    pub fn new(users: Vec<String>) -> Self {
        Self { users }
    }

    /// From `users`, or else the single `user` of events written before `users` existed.
    pub fn from_parts(users: Vec<String>, user: Option<String>) -> Option<Self> {
        match (users.is_empty(), user) {
            (false, _) => Some(Self::new(users)),
            (true, Some(user)) => Some(Self::new(vec![user])),
            (true, None) => None,
        }
    }

    /// The one user of a change that names exactly one.
    pub fn single(&self) -> Option<&str> {
        match self.users.as_slice() {
            [user] => Some(user),
            _ => None,
        }
    }
}

#[derive(Serialize, Deserialize)]
struct MembershipChangeWire {
    #[serde(default)]
    users: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    user: Option<String>,
}

impl From<MembershipChange> for MembershipChangeWire {
    fn from(change: MembershipChange) -> Self {
        let user = change.single().map(str::to_owned);
        Self {
            users: change.users,
            user,
        }
    }
}

impl TryFrom<MembershipChangeWire> for MembershipChange {
    type Error = String;
    fn try_from(wire: MembershipChangeWire) -> Result<Self, String> {
        Self::from_parts(wire.users, wire.user)
            .ok_or_else(|| "a membership event names its `users`".into())
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Messages {
    #[serde(rename = "ref", default, skip_serializing_if = "Option::is_none")]
    pub reference: Option<i64>,
    pub conversation_id: String,
    pub events: Vec<Event>,
    pub head_seq: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Receipt {
    pub conversation_id: String,
    pub user: String,
    pub delivered_seq: u64,
    pub read_seq: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SyncDone {}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Trimmed {
    pub conversation_id: String,
    pub floor_seq: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TypingNotice {
    pub conversation_id: String,
    pub user: String,
    pub active: bool,
}

/// The error codes of the protocol, shared by WebSocket `error` frames and HTTP error bodies.
/// A code this version does not know (a newer server's) reads as `internal`, in JSON as in
/// protobuf, so that the frame around it is not lost.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    BadRequest,
    Unauthorized,
    Forbidden,
    NotFound,
    TooLarge,
    RateLimited,
    Unavailable,
    #[serde(other)]
    Internal,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::NotFound => "not_found",
            ErrorCode::TooLarge => "too_large",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::Internal => "internal",
        }
    }

    /// Every code, in the order of PROTOCOL.md.
    pub const ALL: [ErrorCode; 8] = [
        ErrorCode::BadRequest,
        ErrorCode::Unauthorized,
        ErrorCode::Forbidden,
        ErrorCode::NotFound,
        ErrorCode::TooLarge,
        ErrorCode::RateLimited,
        ErrorCode::Unavailable,
        ErrorCode::Internal,
    ];

    /// Parses a wire code; `None` for a code this version does not know.
    pub fn parse(code: &str) -> Option<ErrorCode> {
        Self::ALL.into_iter().find(|c| c.as_str() == code)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorFrame {
    #[serde(rename = "ref", default, skip_serializing_if = "Option::is_none")]
    pub reference: Option<i64>,
    pub code: ErrorCode,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_msg_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after_ms: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reconnect {
    pub after_ms: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Pong {
    #[serde(rename = "ref", default, skip_serializing_if = "Option::is_none")]
    pub reference: Option<i64>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::size_of;

    /// An event moves by value from the sequencer through the outbox's lists and fanout's
    /// tails to the connections, several copies a message: a media body is boxed, so a text
    /// message is not as large as a media reference (`docs/benchmarks.md`, "A text message
    /// the size of a media one").
    #[test]
    fn a_text_message_is_not_as_large_as_a_media_reference() {
        assert_eq!(size_of::<Body>(), size_of::<String>());
        assert!(size_of::<Media>() > 4 * size_of::<String>());
        assert!(size_of::<Event>() <= 184, "{}", size_of::<Event>());
    }
}
