//! Conversions between the frame types and their protobuf form (`pb`). Decoding checks what
//! protobuf cannot: a present `oneof`, a known `kind`.

use crate::codec::DecodeError;
use crate::frames::*;
use crate::pb;

fn missing(what: &str) -> DecodeError {
    DecodeError::Invalid(format!("missing field `{what}`"))
}

impl From<Body> for pb::Body {
    fn from(body: Body) -> Self {
        let content = match body {
            Body::Text(text) => pb::body::Content::Text(text),
            Body::Media(m) => pb::body::Content::Media(pb::Media {
                media_id: m.media_id,
                mime: m.mime,
                size: m.size,
                sha256: m.sha256,
                name: m.name,
                caption: m.caption,
            }),
        };
        pb::Body {
            content: Some(content),
        }
    }
}

impl TryFrom<pb::Body> for Body {
    type Error = DecodeError;
    fn try_from(body: pb::Body) -> Result<Self, DecodeError> {
        match body.content.ok_or_else(|| missing("body"))? {
            pb::body::Content::Text(text) => Ok(Body::Text(text)),
            pb::body::Content::Media(m) => Ok(Body::Media(Box::new(Media {
                media_id: m.media_id,
                mime: m.mime,
                size: m.size,
                sha256: m.sha256,
                name: m.name,
                caption: m.caption,
            }))),
        }
    }
}

impl From<Event> for pb::Event {
    fn from(e: Event) -> Self {
        let mut out = pb::Event {
            conversation_id: e.conversation_id,
            seq: e.seq,
            server_msg_id: e.server_msg_id,
            sender: Some(pb::Sender {
                user: e.sender.user,
                device: e.sender.device,
            }),
            ts_ms: e.ts_ms,
            kind: e.payload.kind().into(),
            ..Default::default()
        };
        match e.payload {
            EventPayload::Message {
                body,
                client_msg_id,
                reply_to,
                deleted,
            } => {
                out.body = body.map(Into::into);
                out.client_msg_id = Some(client_msg_id);
                out.reply_to = reply_to;
                out.deleted = deleted;
            }
            EventPayload::Delete { target_seq } => {
                out.target_seq = Some(target_seq);
            }
            EventPayload::GroupCreated { name, members } => {
                out.name = Some(name);
                out.members = members;
            }
            EventPayload::MemberAdded(change) => {
                out.user = change.single().map(str::to_owned);
                out.users = change.users;
            }
            EventPayload::MemberRemoved(change) => {
                out.user = change.single().map(str::to_owned);
                out.users = change.users;
            }
            EventPayload::Unknown { .. } => {}
        }
        out
    }
}

/// What reading an event does with a `kind` this version does not know.
#[derive(Clone, Copy)]
enum UnknownKind {
    /// Refuses it: what the server stores and passes between its nodes is its own.
    Refused,
    /// Keeps it as [`EventPayload::Unknown`]: a client reading a later server's frames.
    Kept,
}

impl TryFrom<pb::Event> for Event {
    type Error = DecodeError;
    fn try_from(e: pb::Event) -> Result<Self, DecodeError> {
        event_of(e, UnknownKind::Refused)
    }
}

/// The event `e`, its kind read as `unknown` says when this version does not know it.
fn event_of(e: pb::Event, unknown: UnknownKind) -> Result<Event, DecodeError> {
    let payload = match e.kind.as_str() {
        "message" => EventPayload::Message {
            body: e.body.map(Body::try_from).transpose()?,
            client_msg_id: e.client_msg_id.unwrap_or_default(),
            reply_to: e.reply_to,
            deleted: e.deleted,
        },
        "delete" => EventPayload::Delete {
            target_seq: e.target_seq.ok_or_else(|| missing("target_seq"))?,
        },
        "group_created" => EventPayload::GroupCreated {
            name: e.name.unwrap_or_default(),
            members: e.members,
        },
        "member_added" => EventPayload::MemberAdded(
            MembershipChange::from_parts(e.users, e.user).ok_or_else(|| missing("users"))?,
        ),
        "member_removed" => EventPayload::MemberRemoved(
            MembershipChange::from_parts(e.users, e.user).ok_or_else(|| missing("users"))?,
        ),
        other => match unknown {
            UnknownKind::Kept => EventPayload::Unknown {
                kind: other.to_owned(),
            },
            UnknownKind::Refused => {
                return Err(DecodeError::Invalid(format!(
                    "unknown event kind `{other}`"
                )));
            }
        },
    };
    let sender = e.sender.ok_or_else(|| missing("sender"))?;
    Ok(Event {
        conversation_id: e.conversation_id,
        seq: e.seq,
        server_msg_id: e.server_msg_id,
        sender: Sender {
            user: sender.user,
            device: sender.device,
        },
        ts_ms: e.ts_ms,
        payload,
    })
}

fn ack_kind_name(kind: AckKind) -> &'static str {
    match kind {
        AckKind::Delivered => "delivered",
        AckKind::Read => "read",
    }
}

impl From<ClientFrame> for pb::ClientFrame {
    fn from(frame: ClientFrame) -> Self {
        use pb::client_frame::Frame;
        let reference = frame.reference();
        let frame = match frame {
            ClientFrame::Send(f) => Frame::Send(pb::Send {
                client_msg_id: f.client_msg_id,
                conversation_id: f.conversation_id,
                to_user: f.to_user,
                body: Some(f.body.into()),
                reply_to: f.reply_to,
            }),
            ClientFrame::Ack(f) => Frame::Ack(pb::Ack {
                conversation_id: f.conversation_id,
                seq: f.seq,
                kind: ack_kind_name(f.kind).into(),
            }),
            ClientFrame::Sync(f) => Frame::Sync(pb::Sync {
                cursors: f.cursors.into_iter().collect(),
            }),
            ClientFrame::Fetch(f) => Frame::Fetch(pb::Fetch {
                conversation_id: f.conversation_id,
                after_seq: f.after_seq,
                limit: f.limit,
            }),
            ClientFrame::Delete(f) => Frame::Delete(pb::Delete {
                conversation_id: f.conversation_id,
                seq: f.seq,
            }),
            ClientFrame::Typing(f) => Frame::Typing(pb::Typing {
                conversation_id: f.conversation_id,
                active: f.active,
            }),
            ClientFrame::Ping(_) => Frame::Ping(pb::Ping {}),
        };
        pb::ClientFrame {
            r#ref: reference,
            frame: Some(frame),
        }
    }
}

impl TryFrom<pb::ClientFrame> for ClientFrame {
    type Error = DecodeError;
    fn try_from(frame: pb::ClientFrame) -> Result<Self, DecodeError> {
        use pb::client_frame::Frame;
        let reference = frame.r#ref;
        Ok(match frame.frame.ok_or_else(|| missing("frame"))? {
            Frame::Send(f) => ClientFrame::Send(Send {
                reference,
                client_msg_id: f.client_msg_id,
                conversation_id: f.conversation_id,
                to_user: f.to_user,
                body: f.body.ok_or_else(|| missing("body"))?.try_into()?,
                reply_to: f.reply_to,
            }),
            Frame::Ack(f) => ClientFrame::Ack(Ack {
                reference,
                conversation_id: f.conversation_id,
                seq: f.seq,
                kind: match f.kind.as_str() {
                    "delivered" => AckKind::Delivered,
                    "read" => AckKind::Read,
                    other => {
                        return Err(DecodeError::Invalid(format!(
                            "ack kind must be \"delivered\" or \"read\", not {other:?}"
                        )));
                    }
                },
            }),
            Frame::Sync(f) => ClientFrame::Sync(Sync {
                reference,
                cursors: f.cursors.into_iter().collect(),
            }),
            Frame::Fetch(f) => ClientFrame::Fetch(Fetch {
                reference,
                conversation_id: f.conversation_id,
                after_seq: f.after_seq,
                limit: f.limit,
            }),
            Frame::Delete(f) => ClientFrame::Delete(Delete {
                reference,
                conversation_id: f.conversation_id,
                seq: f.seq,
            }),
            Frame::Typing(f) => ClientFrame::Typing(Typing {
                reference,
                conversation_id: f.conversation_id,
                active: f.active,
            }),
            Frame::Ping(_) => ClientFrame::Ping(Ping { reference }),
        })
    }
}

impl From<ServerFrame> for pb::ServerFrame {
    fn from(frame: ServerFrame) -> Self {
        use pb::server_frame::Frame;
        let (reference, frame) = match frame {
            ServerFrame::Hello(f) => (
                None,
                Frame::Hello(pb::Hello {
                    user: f.user,
                    device: f.device,
                    server_time_ms: f.server_time_ms,
                }),
            ),
            ServerFrame::Sent(f) => (
                f.reference,
                Frame::Sent(pb::Sent {
                    client_msg_id: f.client_msg_id,
                    conversation_id: f.conversation_id,
                    seq: f.seq,
                    server_msg_id: f.server_msg_id,
                    ts_ms: f.ts_ms,
                    duplicate: f.duplicate,
                }),
            ),
            ServerFrame::Event(e) => (None, Frame::Event(e.into())),
            ServerFrame::Messages(f) => (
                f.reference,
                Frame::Messages(pb::Messages {
                    conversation_id: f.conversation_id,
                    events: f.events.into_iter().map(Into::into).collect(),
                    head_seq: f.head_seq,
                }),
            ),
            ServerFrame::Receipt(f) => (
                None,
                Frame::Receipt(pb::Receipt {
                    conversation_id: f.conversation_id,
                    user: f.user,
                    delivered_seq: f.delivered_seq,
                    read_seq: f.read_seq,
                }),
            ),
            ServerFrame::SyncDone(_) => (None, Frame::SyncDone(pb::SyncDone {})),
            ServerFrame::Trimmed(f) => (
                None,
                Frame::Trimmed(pb::Trimmed {
                    conversation_id: f.conversation_id,
                    floor_seq: f.floor_seq,
                }),
            ),
            ServerFrame::Typing(f) => (
                None,
                Frame::Typing(pb::TypingNotice {
                    conversation_id: f.conversation_id,
                    user: f.user,
                    active: f.active,
                }),
            ),
            ServerFrame::Error(f) => (
                f.reference,
                Frame::Error(pb::Error {
                    code: f.code.as_str().into(),
                    message: f.message,
                    client_msg_id: f.client_msg_id,
                    retry_after_ms: f.retry_after_ms,
                }),
            ),
            ServerFrame::Reconnect(f) => (
                None,
                Frame::Reconnect(pb::Reconnect {
                    after_ms: f.after_ms,
                }),
            ),
            ServerFrame::Pong(f) => (f.reference, Frame::Pong(pb::Pong {})),
        };
        pb::ServerFrame {
            r#ref: reference,
            frame: Some(frame),
        }
    }
}

impl TryFrom<pb::ServerFrame> for ServerFrame {
    type Error = DecodeError;
    fn try_from(frame: pb::ServerFrame) -> Result<Self, DecodeError> {
        use pb::server_frame::Frame;
        let reference = frame.r#ref;
        Ok(match frame.frame.ok_or_else(|| missing("frame"))? {
            Frame::Hello(f) => ServerFrame::Hello(Hello {
                user: f.user,
                device: f.device,
                server_time_ms: f.server_time_ms,
            }),
            Frame::Sent(f) => ServerFrame::Sent(Sent {
                reference,
                client_msg_id: f.client_msg_id,
                conversation_id: f.conversation_id,
                seq: f.seq,
                server_msg_id: f.server_msg_id,
                ts_ms: f.ts_ms,
                duplicate: f.duplicate,
            }),
            Frame::Event(e) => ServerFrame::Event(event_of(e, UnknownKind::Kept)?),
            Frame::Messages(f) => ServerFrame::Messages(Messages {
                reference,
                conversation_id: f.conversation_id,
                events: f
                    .events
                    .into_iter()
                    .map(|e| event_of(e, UnknownKind::Kept))
                    .collect::<Result<_, _>>()?,
                head_seq: f.head_seq,
            }),
            Frame::Receipt(f) => ServerFrame::Receipt(Receipt {
                conversation_id: f.conversation_id,
                user: f.user,
                delivered_seq: f.delivered_seq,
                read_seq: f.read_seq,
            }),
            Frame::SyncDone(_) => ServerFrame::SyncDone(SyncDone {}),
            Frame::Trimmed(f) => ServerFrame::Trimmed(Trimmed {
                conversation_id: f.conversation_id,
                floor_seq: f.floor_seq,
            }),
            Frame::Typing(f) => ServerFrame::Typing(TypingNotice {
                conversation_id: f.conversation_id,
                user: f.user,
                active: f.active,
            }),
            Frame::Error(f) => ServerFrame::Error(ErrorFrame {
                reference,
                code: ErrorCode::parse(&f.code).unwrap_or(ErrorCode::Internal),
                message: f.message,
                client_msg_id: f.client_msg_id,
                retry_after_ms: f.retry_after_ms,
            }),
            Frame::Reconnect(f) => ServerFrame::Reconnect(Reconnect {
                after_ms: f.after_ms,
            }),
            Frame::Pong(_) => ServerFrame::Pong(Pong { reference }),
        })
    }
}
