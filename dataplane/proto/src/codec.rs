//! The two wire encodings of frames.

use crate::frames::{ClientFrame, Event, ServerFrame};
use crate::pb;
use prost::Message;

/// A frame that could not be decoded. The message is meant for the client's developer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("malformed frame: {0}")]
    Malformed(String),
    #[error("invalid frame: {0}")]
    Invalid(String),
    #[error("this subprotocol takes {expected} frames")]
    WrongFrameType { expected: &'static str },
}

/// One encoded frame: text for JSON, binary for protobuf.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Payload {
    Text(String),
    Binary(Vec<u8>),
}

/// A WebSocket subprotocol of Courier v1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Encoding {
    /// `courier.v1.json`: one JSON object per text frame (the default).
    #[default]
    Json,
    /// `courier.v1.proto`: one protobuf message per binary frame.
    Proto,
}

impl Encoding {
    /// The subprotocol name negotiated in `Sec-WebSocket-Protocol`.
    pub fn subprotocol(self) -> &'static str {
        match self {
            Encoding::Json => crate::SUBPROTOCOL_JSON,
            Encoding::Proto => crate::SUBPROTOCOL_PROTO,
        }
    }

    /// The encoding named by a subprotocol, if it is one of ours.
    pub fn from_subprotocol(name: &str) -> Option<Encoding> {
        match name.trim() {
            crate::SUBPROTOCOL_JSON => Some(Encoding::Json),
            crate::SUBPROTOCOL_PROTO => Some(Encoding::Proto),
            _ => None,
        }
    }

    pub fn encode_server(self, frame: &ServerFrame) -> Payload {
        match self {
            Encoding::Json => Payload::Text(to_json(frame)),
            Encoding::Proto => Self::proto_server(frame.clone()),
        }
    }

    /// `frame` in protobuf, moved into the generated types.
    fn proto_server(frame: ServerFrame) -> Payload {
        Payload::Binary(pb::ServerFrame::from(frame).encode_to_vec())
    }

    /// The `event` frame of `event`: [`Encoding::encode_server`] of `ServerFrame::Event`,
    /// without a copy of the event to make that frame of in JSON, and with one in protobuf.
    pub fn encode_event(self, event: &Event) -> Payload {
        /// The `event` variant of [`ServerFrame`], borrowing its event.
        #[derive(serde::Serialize)]
        #[serde(tag = "type", rename_all = "snake_case")]
        enum EventFrame<'a> {
            Event(&'a Event),
        }
        match self {
            Encoding::Json => Payload::Text(to_json(&EventFrame::Event(event))),
            Encoding::Proto => Self::proto_server(ServerFrame::Event(event.clone())),
        }
    }

    pub fn encode_client(self, frame: &ClientFrame) -> Payload {
        match self {
            Encoding::Json => Payload::Text(to_json(frame)),
            Encoding::Proto => {
                Payload::Binary(pb::ClientFrame::from(frame.clone()).encode_to_vec())
            }
        }
    }

    /// Decodes a client frame from the payload of a text (JSON) or binary (protobuf) message.
    pub fn decode_client(self, data: &[u8]) -> Result<ClientFrame, DecodeError> {
        match self {
            Encoding::Json => from_json(data),
            Encoding::Proto => pb::ClientFrame::decode(data)
                .map_err(|e| DecodeError::Malformed(e.to_string()))?
                .try_into(),
        }
    }

    pub fn decode_server(self, data: &[u8]) -> Result<ServerFrame, DecodeError> {
        match self {
            Encoding::Json => from_json(data),
            Encoding::Proto => pb::ServerFrame::decode(data)
                .map_err(|e| DecodeError::Malformed(e.to_string()))?
                .try_into(),
        }
    }

    /// Whether `data` is a server frame of a type this version does not know: a JSON object
    /// whose `"type"` names no [`ServerFrame`], or a protobuf frame with none of the frames
    /// of this version's schema (prost reads a oneof field it has not as none). PROTOCOL.md
    /// welcomes new frame types, so a client passes such a frame over where
    /// [`Encoding::decode_server`] refuses it.
    pub fn is_unknown_server_frame(self, data: &[u8]) -> bool {
        match self {
            Encoding::Json => {
                #[derive(serde::Deserialize)]
                struct Tagged {
                    #[serde(rename = "type")]
                    kind: String,
                }
                from_json::<Tagged>(data).is_ok_and(|tagged| !ServerFrame::knows_type(&tagged.kind))
            }
            Encoding::Proto => {
                matches!(
                    pb::ServerFrame::decode(data),
                    Ok(pb::ServerFrame { frame: None, .. })
                )
            }
        }
    }

    /// The `ref` of a frame that failed to decode, and the `client_msg_id` of a `send`, when
    /// they can still be read, so that the `error` reply echoes them (PROTOCOL.md: an error in
    /// reply to a send carries its `client_msg_id`). A field that is itself malformed is left
    /// out, the other kept.
    pub fn salvage_ids(self, data: &[u8]) -> (Option<i64>, Option<String>) {
        match self {
            Encoding::Json => {
                let Ok(serde_json::Value::Object(frame)) = from_json(data) else {
                    return (None, None);
                };
                let reference = frame.get("ref").and_then(serde_json::Value::as_i64);
                let client_msg_id = (frame.get("type").and_then(|t| t.as_str()) == Some("send"))
                    .then(|| frame.get("client_msg_id")?.as_str().map(str::to_owned))
                    .flatten();
                (reference, client_msg_id)
            }
            Encoding::Proto => match pb::ClientFrame::decode(data) {
                Ok(frame) => {
                    let client_msg_id = match frame.frame {
                        Some(pb::client_frame::Frame::Send(send)) => Some(send.client_msg_id),
                        _ => None,
                    };
                    (frame.r#ref, client_msg_id)
                }
                Err(_) => (None, None),
            },
        }
    }
}

/// Bytes a JSON frame is written into at first: an event with a short text, a `sent` frame
/// or a receipt fits, where serde_json's 128 grew twice for an event (~3.8 reallocations per
/// message end to end; ~1.3k fewer instructions per message net of the UTF-8 check below).
const JSON_FRAME_BYTES: usize = 512;

fn to_json<T: serde::Serialize>(frame: &T) -> String {
    let mut json = Vec::with_capacity(JSON_FRAME_BYTES);
    // Frames are plain data with string keys: serialising them cannot fail.
    if serde_json::to_writer(&mut json, frame).is_err() {
        return String::from("{}");
    }
    // serde_json writes UTF-8 only.
    String::from_utf8(json).unwrap_or_else(|_| String::from("{}"))
}

/// `T` read from the JSON in `data`, checked as UTF-8 once and whole: read from bytes,
/// serde_json checks each string it meets on its own, which cost more than the whole frame
/// (the load generator's frames: ~6 % of its CPU at the 1:1 peak).
fn from_json<T: serde::de::DeserializeOwned>(data: &[u8]) -> Result<T, DecodeError> {
    let text =
        std::str::from_utf8(data).map_err(|e| DecodeError::Malformed(format!("not UTF-8: {e}")))?;
    serde_json::from_str(text).map_err(json_error)
}

fn json_error(e: serde_json::Error) -> DecodeError {
    match e.classify() {
        serde_json::error::Category::Data => DecodeError::Invalid(e.to_string()),
        _ => DecodeError::Malformed(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frames::*;

    fn samples() -> Vec<ServerFrame> {
        let event = Event {
            conversation_id: "d:abc".into(),
            seq: 3,
            server_msg_id: "m1".into(),
            sender: Sender {
                user: "alice".into(),
                device: "phone".into(),
            },
            ts_ms: 17,
            payload: EventPayload::Message {
                body: Some(Body::Text("hi".into())),
                client_msg_id: "c1".into(),
                reply_to: Some(2),
                deleted: false,
            },
        };
        vec![
            ServerFrame::Event(event.clone()),
            ServerFrame::Messages(Messages {
                reference: Some(4),
                conversation_id: "d:abc".into(),
                events: vec![event],
                head_seq: 3,
            }),
            ServerFrame::Error(ErrorFrame {
                reference: Some(-1),
                code: ErrorCode::RateLimited,
                message: "slow down".into(),
                client_msg_id: Some("c2".into()),
                retry_after_ms: Some(250),
            }),
            ServerFrame::SyncDone(SyncDone {}),
            ServerFrame::Pong(Pong { reference: Some(9) }),
        ]
    }

    #[test]
    fn server_frames_round_trip_in_both_encodings() {
        for encoding in [Encoding::Json, Encoding::Proto] {
            for frame in samples() {
                let bytes = match encoding.encode_server(&frame) {
                    Payload::Text(t) => t.into_bytes(),
                    Payload::Binary(b) => b,
                };
                assert_eq!(encoding.decode_server(&bytes).unwrap(), frame);
            }
        }
    }

    /// An event of a kind a later server adds reads from a server's frame, in either encoding,
    /// as [`EventPayload::Unknown`] with its seq (a client keeps seqs dense and acknowledges
    /// past it), in an `event` as in `messages`, and is written with its kind; an event the
    /// server stores or passes between its nodes (`pb::Event`) of that kind is refused, as
    /// damage.
    #[test]
    fn an_event_of_an_unknown_kind_is_kept_from_a_server_frame_only() {
        let json = br#"{"type":"event","conversation_id":"g:1","seq":2,"server_msg_id":"m","sender":{"user":"a","device":"p"},"ts_ms":1,"kind":"sent_by_owl","owl":{"name":"hedwig"}}"#;
        let frame = Encoding::Json.decode_server(json).unwrap();
        let ServerFrame::Event(event) = &frame else {
            panic!("{frame:?}")
        };
        assert_eq!(event.seq, 2);
        let unknown = EventPayload::Unknown {
            kind: "sent_by_owl".into(),
        };
        assert_eq!(event.payload, unknown);
        assert_eq!(event.payload.kind(), "sent_by_owl");
        let messages = ServerFrame::Messages(Messages {
            reference: Some(1),
            conversation_id: "g:1".into(),
            events: vec![event.clone()],
            head_seq: 2,
        });
        for encoding in [Encoding::Json, Encoding::Proto] {
            for frame in [&frame, &messages] {
                let bytes = match encoding.encode_server(frame) {
                    Payload::Text(t) => t.into_bytes(),
                    Payload::Binary(b) => b,
                };
                assert_eq!(&encoding.decode_server(&bytes).unwrap(), frame);
            }
        }
        let Payload::Text(written) = Encoding::Json.encode_server(&frame) else {
            unreachable!()
        };
        let written: serde_json::Value = serde_json::from_str(&written).unwrap();
        assert_eq!(written["kind"], "sent_by_owl");
        match Event::try_from(pb::Event::from(event.clone())) {
            Err(DecodeError::Invalid(message)) => assert!(message.contains("sent_by_owl")),
            other => panic!("{other:?}"),
        }
    }

    /// An error code a newer server adds reads as `internal` in both encodings: the error
    /// frame, with its `client_msg_id`, still reaches the client.
    #[test]
    fn an_unknown_error_code_reads_as_internal() {
        let json =
            br#"{"type":"error","code":"quota_exceeded","message":"m","client_msg_id":"c1"}"#;
        let frame = pb::ServerFrame::from(ServerFrame::Error(ErrorFrame {
            reference: None,
            code: ErrorCode::BadRequest,
            message: "m".into(),
            client_msg_id: Some("c1".into()),
            retry_after_ms: None,
        }));
        let mut proto = frame.encode_to_vec();
        let known = b"bad_request";
        let at = proto
            .windows(known.len())
            .position(|w| w == known)
            .expect("the code is in the frame");
        proto.splice(at..at + known.len(), *b"quota_excee");
        for (encoding, bytes) in [(Encoding::Json, &json[..]), (Encoding::Proto, &proto)] {
            let Ok(ServerFrame::Error(error)) = encoding.decode_server(bytes) else {
                panic!("{encoding:?}: not an error frame");
            };
            assert_eq!(error.code, ErrorCode::Internal, "{encoding:?}");
            assert_eq!(error.client_msg_id.as_deref(), Some("c1"));
        }
    }

    #[test]
    fn an_event_encodes_as_its_server_frame() {
        let events = samples()
            .into_iter()
            .chain(more_server_samples())
            .filter_map(|frame| match frame {
                ServerFrame::Event(event) => Some(event),
                _ => None,
            });
        for event in events {
            for encoding in [Encoding::Json, Encoding::Proto] {
                assert_eq!(
                    encoding.encode_event(&event),
                    encoding.encode_server(&ServerFrame::Event(event.clone()))
                );
            }
        }
    }

    #[test]
    fn json_event_is_flat_with_kind_and_type() {
        let Payload::Text(json) = Encoding::Json.encode_server(&samples()[0]) else {
            panic!("json is text")
        };
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(v["type"], "event");
        assert_eq!(v["kind"], "message");
        assert_eq!(v["body"]["text"], "hi");
        assert_eq!(v["sender"]["device"], "phone");
    }

    fn membership_event(payload: EventPayload) -> ServerFrame {
        ServerFrame::Event(Event {
            conversation_id: "g:1".into(),
            seq: 2,
            server_msg_id: "m2".into(),
            sender: Sender {
                user: "alice".into(),
                device: "phone".into(),
            },
            ts_ms: 18,
            payload,
        })
    }

    #[test]
    fn membership_events_carry_users_and_the_single_user() {
        let change =
            |users: &[&str]| MembershipChange::new(users.iter().map(|u| u.to_string()).collect());
        for (payload, users, user) in [
            (
                EventPayload::MemberAdded(change(&["bob"])),
                vec!["bob"],
                Some("bob"),
            ),
            (
                EventPayload::MemberAdded(change(&["bob", "carol"])),
                vec!["bob", "carol"],
                None,
            ),
            (
                EventPayload::MemberRemoved(change(&["dan"])),
                vec!["dan"],
                Some("dan"),
            ),
        ] {
            let frame = membership_event(payload);
            let Payload::Text(json) = Encoding::Json.encode_server(&frame) else {
                panic!("json is text")
            };
            let v: serde_json::Value = serde_json::from_str(&json).unwrap();
            assert_eq!(v["users"], serde_json::json!(users));
            assert_eq!(v["user"].as_str(), user, "`user` only when single: {json}");
            for encoding in [Encoding::Json, Encoding::Proto] {
                let bytes = match encoding.encode_server(&frame) {
                    Payload::Text(t) => t.into_bytes(),
                    Payload::Binary(b) => b,
                };
                assert_eq!(encoding.decode_server(&bytes).unwrap(), frame);
            }
        }
        // Events stored before `users` existed name only `user`.
        let legacy = crate::pb::Event {
            kind: "member_removed".into(),
            user: Some("bob".into()),
            sender: Some(crate::pb::Sender::default()),
            ..Default::default()
        };
        assert_eq!(
            Event::try_from(legacy).unwrap().payload,
            EventPayload::MemberRemoved(change(&["bob"]))
        );
        let json = br#"{"type":"event","conversation_id":"g:1","seq":2,"server_msg_id":"m","sender":{"user":"a","device":"p"},"ts_ms":1,"kind":"member_added","user":"bob"}"#;
        assert!(matches!(
            Encoding::Json.decode_server(json).unwrap(),
            ServerFrame::Event(Event { payload: EventPayload::MemberAdded(c), .. }) if c.users == ["bob"]
        ));
    }

    #[test]
    fn json_client_frames_decode_and_errors_are_classified() {
        let send = Encoding::Json
            .decode_client(br#"{"type":"send","ref":1,"client_msg_id":"a","to_user":"bob","body":{"text":"x"}}"#)
            .unwrap();
        assert!(matches!(send, ClientFrame::Send(ref s) if s.to_user.as_deref() == Some("bob")));
        assert!(matches!(
            Encoding::Json.decode_client(b"{not json"),
            Err(DecodeError::Malformed(_))
        ));
        assert!(matches!(
            Encoding::Json.decode_client(br#"{"type":"nope"}"#),
            Err(DecodeError::Invalid(_))
        ));
        assert!(matches!(
            Encoding::Json
                .decode_client(br#"{"type":"ack","conversation_id":"c","seq":"1","kind":"read"}"#),
            Err(DecodeError::Invalid(_))
        ));
        assert_eq!(
            Encoding::Json.salvage_ids(br#"{"type":"nope","ref":5}"#),
            (Some(5), None)
        );
        // A send's id is echoed whatever else is wrong with it, even a malformed `ref`.
        assert_eq!(
            Encoding::Json.salvage_ids(
                br#"{"type":"send","ref":7,"client_msg_id":"c1","to_user":"bob","body":{"text":5}}"#
            ),
            (Some(7), Some("c1".to_owned()))
        );
        assert_eq!(
            Encoding::Json.salvage_ids(br#"{"type":"send","ref":"x","client_msg_id":"c2"}"#),
            (None, Some("c2".to_owned()))
        );
        assert_eq!(
            Encoding::Json.salvage_ids(br#"{"type":"ack","client_msg_id":"c3"}"#),
            (None, None),
            "only a send's"
        );
        let send = pb::ClientFrame {
            r#ref: Some(9),
            frame: Some(pb::client_frame::Frame::Send(pb::Send {
                client_msg_id: "c4".into(),
                ..Default::default()
            })),
        };
        assert_eq!(
            Encoding::Proto.salvage_ids(&send.encode_to_vec()),
            (Some(9), Some("c4".to_owned()))
        );
    }

    fn client_samples() -> Vec<ClientFrame> {
        vec![
            ClientFrame::Send(Send {
                reference: Some(1),
                client_msg_id: "c1".into(),
                conversation_id: None,
                to_user: Some("bob".into()),
                body: Body::Text("say \"hi\"".into()),
                reply_to: Some(4),
            }),
            ClientFrame::Ack(Ack {
                reference: None,
                conversation_id: "d:abc".into(),
                seq: 3,
                kind: AckKind::Delivered,
            }),
            ClientFrame::Sync(Sync {
                reference: Some(2),
                cursors: [("g:1".to_string(), 7)].into(),
            }),
            ClientFrame::Fetch(Fetch {
                reference: Some(3),
                conversation_id: "g:1".into(),
                after_seq: Some(5),
                limit: Some(10),
            }),
            ClientFrame::Delete(Delete {
                reference: None,
                conversation_id: "g:1".into(),
                seq: 2,
            }),
            ClientFrame::Typing(Typing {
                reference: None,
                conversation_id: "g:1".into(),
                active: true,
            }),
            ClientFrame::Ping(Ping { reference: Some(8) }),
        ]
    }

    fn more_server_samples() -> Vec<ServerFrame> {
        let sender = Sender {
            user: "alice".into(),
            device: "phone".into(),
        };
        let event = |payload| {
            ServerFrame::Event(Event {
                conversation_id: "g:1".into(),
                seq: 1,
                server_msg_id: "m0".into(),
                sender: sender.clone(),
                ts_ms: 16,
                payload,
            })
        };
        vec![
            ServerFrame::Hello(Hello {
                user: "alice".into(),
                device: "phone".into(),
                server_time_ms: 5,
            }),
            ServerFrame::Sent(Sent {
                reference: Some(1),
                client_msg_id: "c1".into(),
                conversation_id: "d:abc".into(),
                seq: 3,
                server_msg_id: "m1".into(),
                ts_ms: 17,
                duplicate: false,
            }),
            ServerFrame::Receipt(Receipt {
                conversation_id: "d:abc".into(),
                user: "bob".into(),
                delivered_seq: 3,
                read_seq: 2,
            }),
            ServerFrame::Trimmed(Trimmed {
                conversation_id: "d:abc".into(),
                floor_seq: 9,
            }),
            ServerFrame::Typing(TypingNotice {
                conversation_id: "g:1".into(),
                user: "bob".into(),
                active: false,
            }),
            ServerFrame::Reconnect(Reconnect { after_ms: 100 }),
            event(EventPayload::GroupCreated {
                name: "team".into(),
                members: vec!["alice".into(), "bob".into()],
            }),
            event(EventPayload::Delete { target_seq: 1 }),
            event(EventPayload::MemberAdded(MembershipChange::new(vec![
                "bob".into(),
                "carol".into(),
            ]))),
            event(EventPayload::Message {
                body: None,
                client_msg_id: "c0".into(),
                reply_to: None,
                deleted: true,
            }),
        ]
    }

    /// `json` (an encoded frame, `"type"` first) with its `"type"` moved to the end.
    fn type_last(json: &str) -> String {
        let rest = json
            .strip_prefix(r#"{"type":""#)
            .expect("`type` is written first");
        let (tag, fields) = rest
            .split_once("\",")
            .expect("a frame has fields after `type`");
        let fields = fields.strip_suffix('}').expect("an object");
        format!(r#"{{{fields},"type":"{tag}"}}"#)
    }

    #[test]
    fn json_frames_read_the_same_whatever_the_place_of_type() {
        fn check<F: PartialEq + std::fmt::Debug>(json: String, decode: impl Fn(&[u8]) -> F) {
            let frame = decode(json.as_bytes());
            if json.starts_with(r#"{"type":"sync_done"}"#) {
                return;
            }
            let last = type_last(&json);
            assert_eq!(decode(last.as_bytes()), frame, "{last}");
            // Keys sorted by name: `type` among the others.
            let sorted: serde_json::Value = serde_json::from_str(&json).unwrap();
            let sorted = sorted.to_string();
            assert_eq!(decode(sorted.as_bytes()), frame, "{sorted}");
        }
        for frame in samples().into_iter().chain(more_server_samples()) {
            let Payload::Text(json) = Encoding::Json.encode_server(&frame) else {
                panic!("json is text")
            };
            assert_eq!(
                Encoding::Json.decode_server(json.as_bytes()).unwrap(),
                frame
            );
            check(json, |bytes| Encoding::Json.decode_server(bytes).unwrap());
        }
        for frame in client_samples() {
            let Payload::Text(json) = Encoding::Json.encode_client(&frame) else {
                panic!("json is text")
            };
            assert_eq!(
                Encoding::Json.decode_client(json.as_bytes()).unwrap(),
                frame
            );
            check(json, |bytes| Encoding::Json.decode_client(bytes).unwrap());
        }
    }

    #[test]
    fn json_frames_with_a_missing_repeated_or_unknown_type_or_field_are_refused() {
        let invalid = |json: &str, says: &str| match Encoding::Json.decode_client(json.as_bytes()) {
            Err(DecodeError::Invalid(message)) => {
                assert!(message.contains(says), "{json}: {message}")
            }
            other => panic!("{json}: {other:?}"),
        };
        invalid(r#"{"conversation_id":"c","seq":1}"#, "missing field `type`");
        invalid(r#"{}"#, "missing field `type`");
        invalid(r#"{"type":"nope","ref":1}"#, "unknown variant `nope`");
        invalid(r#"{"ref":1,"type":"nope"}"#, "unknown variant `nope`");
        invalid(
            r#"{"ref":1,"type":"ping","type":"ping"}"#,
            "duplicate field `type`",
        );
        invalid(
            r#"{"seq":1,"seq":2,"type":"delete","conversation_id":"c"}"#,
            "duplicate field `seq`",
        );
        invalid(
            r#"{"type":"delete","conversation_id":"c"}"#,
            "missing field `seq`",
        );
        invalid(
            r#"{"conversation_id":"c","type":"delete"}"#,
            "missing field `seq`",
        );
        invalid(r#"["ping"]"#, "a client frame");
        invalid(r#""ping""#, "a client frame");
        // Fields a frame does not have are ignored, wherever `type` is: even repeated, or
        // holding what a parsed JSON value cannot (a lone surrogate, a number beyond f64).
        for json in [
            r#"{"type":"ping","ref":3,"extra":{"a":[1]}}"#,
            r#"{"extra":{"a":[1]},"ref":3,"type":"ping"}"#,
            r#"{"type":"ping","ref":3,"extra":1,"extra":2}"#,
            r#"{"extra":1,"extra":2,"ref":3,"type":"ping"}"#,
            r#"{"type":"ping","ref":3,"extra":["\ud800",1e400]}"#,
            r#"{"extra":["\ud800",1e400],"ref":3,"type":"ping"}"#,
        ] {
            assert_eq!(
                Encoding::Json.decode_client(json.as_bytes()).unwrap(),
                ClientFrame::Ping(Ping { reference: Some(3) })
            );
        }

        let event = |fields: &str| {
            format!(
                r#"{{"type":"event","conversation_id":"g:1","seq":2,"server_msg_id":"m","sender":{{"user":"a","device":"p"}},"ts_ms":1,{fields}}}"#
            )
        };
        for (fields, says) in [
            (
                r#""kind":"message","body":{"text":"x"}"#,
                "missing field `client_msg_id`",
            ),
            (r#""kind":"delete""#, "missing field `target_seq`"),
            (
                r#""kind":"group_created","name":"g""#,
                "missing field `members`",
            ),
            (r#""kind":"member_added""#, "names its `users`"),
            (r#""client_msg_id":"c""#, "missing field `kind`"),
        ] {
            match Encoding::Json.decode_server(event(fields).as_bytes()) {
                Err(DecodeError::Invalid(message)) => {
                    assert!(message.contains(says), "{fields}: {message}")
                }
                other => panic!("{fields}: {other:?}"),
            }
        }
    }

    /// A frame of a type a later version adds is told apart from a broken frame of a known
    /// type, which a client must not pass over in silence.
    #[test]
    fn a_server_frame_of_an_unknown_type_is_told_apart_from_a_broken_one() {
        let json = |text: &str| Encoding::Json.is_unknown_server_frame(text.as_bytes());
        assert!(json(r#"{"type":"reaction","ref":1}"#));
        assert!(json(r#"{"ref":1,"type":"reaction"}"#));
        assert!(!json(r#"{"type":"sent","ref":1}"#));
        assert!(!json(r#"{"ref":1}"#));
        assert!(!json(r#"{"type":7}"#));
        assert!(!json("not json"));
        let proto = |frame: pb::ServerFrame| {
            Encoding::Proto.is_unknown_server_frame(&frame.encode_to_vec())
        };
        assert!(proto(pb::ServerFrame {
            r#ref: Some(1),
            frame: None
        }));
        assert!(!proto(pb::ServerFrame {
            r#ref: None,
            frame: Some(pb::server_frame::Frame::SyncDone(pb::SyncDone {}))
        }));
        assert!(!Encoding::Proto.is_unknown_server_frame(&[0xff, 0xff]));
    }

    #[test]
    fn json_frames_are_utf8_and_keep_text_beyond_ascii() {
        // Bytes that are not UTF-8 (a lone continuation byte in a string) are refused as
        // malformed, and no `ref` is salvaged from them.
        let mut bytes = br#"{"type":"ping","ref":4,"x":"#.to_vec();
        bytes.extend_from_slice(b"\"\x80\"}");
        match Encoding::Json.decode_client(&bytes) {
            Err(DecodeError::Malformed(message)) => assert!(message.contains("UTF-8"), "{message}"),
            other => panic!("{other:?}"),
        }
        assert_eq!(Encoding::Json.salvage_ids(&bytes), (None, None));
        // Text beyond ASCII, raw and escaped, reads as written.
        let json = r#"{"type":"send","client_msg_id":"é1","conversation_id":"g:1","body":{"text":"héllo \u00e9 ✓"}}"#;
        match Encoding::Json.decode_client(json.as_bytes()).unwrap() {
            ClientFrame::Send(send) => {
                assert_eq!(send.client_msg_id, "é1");
                assert_eq!(send.body, Body::Text("héllo é ✓".into()));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn proto_client_frames_round_trip() {
        let frame = ClientFrame::Ack(Ack {
            reference: Some(2),
            conversation_id: "g:1".into(),
            seq: 10,
            kind: AckKind::Read,
        });
        let Payload::Binary(bytes) = Encoding::Proto.encode_client(&frame) else {
            panic!("proto is binary")
        };
        assert_eq!(Encoding::Proto.decode_client(&bytes).unwrap(), frame);
    }
}
