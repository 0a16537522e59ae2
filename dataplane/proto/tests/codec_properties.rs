//! Properties of the two wire encodings (PROTOCOL.md, "WebSocket"): whatever bytes arrive,
//! decoding answers a frame or a `DecodeError` and never panics; what decodes re-encodes to
//! the same frame in either encoding; and every valid frame, client or server, comes back
//! unchanged from JSON and from protobuf.

use courier_proto::*;
use proptest::prelude::*;
use proptest::{collection, option};
use prost::Message;

const BOTH: [Encoding; 2] = [Encoding::Json, Encoding::Proto];

fn bytes_of(payload: Payload) -> Vec<u8> {
    match payload {
        Payload::Text(text) => text.into_bytes(),
        Payload::Binary(bytes) => bytes,
    }
}

// ---------------------------------------------------------------- valid frames

/// A user or device id: 1 to 64 characters of `A-Z a-z 0-9 . _ - @`.
fn user_id() -> impl Strategy<Value = String> {
    "[A-Za-z0-9._@-]{1,64}"
}

/// A conversation id: a direct or group one as the server makes them, or any id of the
/// alphabet, up to the 128 characters allowed.
fn conversation_id() -> impl Strategy<Value = String> {
    prop_oneof!["[dg]:[A-Za-z0-9._:-]{1,40}", "[A-Za-z0-9._:-]{1,128}",]
}

/// A media id: the alphabet of conversation ids.
fn media_id() -> impl Strategy<Value = String> {
    "[A-Za-z0-9._:-]{1,128}"
}

/// A `client_msg_id`: 1 to 64 characters of any kind (controls, quotes, beyond ASCII).
fn client_msg_id() -> impl Strategy<Value = String> {
    collection::vec(any::<char>(), 1..=64).prop_map(String::from_iter)
}

/// Free text (a message, a group name, an error message): any characters, now and then many.
fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => any::<String>(),
        1 => collection::vec(any::<char>(), 0..4000).prop_map(String::from_iter),
    ]
}

fn seq() -> impl Strategy<Value = u64> {
    prop_oneof![1u64..1000, 1u64..=u64::MAX]
}

fn reference() -> impl Strategy<Value = Option<i64>> {
    option::of(any::<i64>())
}

fn body() -> impl Strategy<Value = Body> {
    let media = (
        media_id(),
        "[a-z]{1,12}/[a-z0-9.+-]{1,20}",
        any::<u64>(),
        "[0-9a-f]{64}",
        option::of(text()),
        option::of(text()),
    )
        .prop_map(|(media_id, mime, size, sha256, name, caption)| {
            Body::Media(Box::new(Media {
                media_id,
                mime,
                size,
                sha256,
                name,
                caption,
            }))
        });
    prop_oneof![3 => text().prop_map(Body::Text), 1 => media]
}

fn client_frame() -> impl Strategy<Value = ClientFrame> {
    let send = (
        reference(),
        client_msg_id(),
        // Either a conversation or a user to write to directly.
        prop_oneof![
            conversation_id().prop_map(|c| (Some(c), None)),
            user_id().prop_map(|u| (None, Some(u))),
        ],
        body(),
        option::of(seq()),
    )
        .prop_map(
            |(reference, client_msg_id, (conversation_id, to_user), body, reply_to)| {
                ClientFrame::Send(Send {
                    reference,
                    client_msg_id,
                    conversation_id,
                    to_user,
                    body,
                    reply_to,
                })
            },
        );
    let ack = (
        reference(),
        conversation_id(),
        seq(),
        prop_oneof![Just(AckKind::Delivered), Just(AckKind::Read)],
    )
        .prop_map(|(reference, conversation_id, seq, kind)| {
            ClientFrame::Ack(Ack {
                reference,
                conversation_id,
                seq,
                kind,
            })
        });
    let sync = (
        reference(),
        collection::btree_map(conversation_id(), any::<u64>(), 0..6),
    )
        .prop_map(|(reference, cursors)| ClientFrame::Sync(Sync { reference, cursors }));
    let fetch = (
        reference(),
        conversation_id(),
        option::of(any::<u64>()),
        option::of(1u32..=1000),
    )
        .prop_map(|(reference, conversation_id, after_seq, limit)| {
            ClientFrame::Fetch(Fetch {
                reference,
                conversation_id,
                after_seq,
                limit,
            })
        });
    let delete =
        (reference(), conversation_id(), seq()).prop_map(|(reference, conversation_id, seq)| {
            ClientFrame::Delete(Delete {
                reference,
                conversation_id,
                seq,
            })
        });
    let typing = (reference(), conversation_id(), any::<bool>()).prop_map(
        |(reference, conversation_id, active)| {
            ClientFrame::Typing(Typing {
                reference,
                conversation_id,
                active,
            })
        },
    );
    let ping = reference().prop_map(|reference| ClientFrame::Ping(Ping { reference }));
    prop_oneof![send, ack, sync, fetch, delete, typing, ping]
}

fn sender() -> impl Strategy<Value = Sender> {
    (user_id(), user_id()).prop_map(|(user, device)| Sender { user, device })
}

fn event_payload() -> impl Strategy<Value = EventPayload> {
    let message = (
        // A message deleted for everyone has no body.
        prop_oneof![
            3 => body().prop_map(|b| (Some(b), false)),
            1 => Just((None, true)),
        ],
        client_msg_id(),
        option::of(seq()),
    )
        .prop_map(
            |((body, deleted), client_msg_id, reply_to)| EventPayload::Message {
                body,
                client_msg_id,
                reply_to,
                deleted,
            },
        );
    let users = || collection::vec(user_id(), 1..5).prop_map(MembershipChange::new);
    prop_oneof![
        4 => message,
        1 => seq().prop_map(|target_seq| EventPayload::Delete { target_seq }),
        1 => (text(), collection::vec(user_id(), 0..5))
            .prop_map(|(name, members)| EventPayload::GroupCreated { name, members }),
        1 => users().prop_map(EventPayload::MemberAdded),
        1 => users().prop_map(EventPayload::MemberRemoved),
    ]
}

fn event() -> impl Strategy<Value = Event> {
    (
        conversation_id(),
        seq(),
        "[A-Za-z0-9._:-]{1,64}",
        sender(),
        any::<u64>(),
        event_payload(),
    )
        .prop_map(
            |(conversation_id, seq, server_msg_id, sender, ts_ms, payload)| Event {
                conversation_id,
                seq,
                server_msg_id,
                sender,
                ts_ms,
                payload,
            },
        )
}

fn server_frame() -> impl Strategy<Value = ServerFrame> {
    let hello = (user_id(), user_id(), any::<u64>()).prop_map(|(user, device, server_time_ms)| {
        ServerFrame::Hello(Hello {
            user,
            device,
            server_time_ms,
        })
    });
    let sent = (
        reference(),
        client_msg_id(),
        conversation_id(),
        seq(),
        "[A-Za-z0-9._:-]{1,64}",
        any::<u64>(),
        any::<bool>(),
    )
        .prop_map(
            |(reference, client_msg_id, conversation_id, seq, server_msg_id, ts_ms, duplicate)| {
                ServerFrame::Sent(Sent {
                    reference,
                    client_msg_id,
                    conversation_id,
                    seq,
                    server_msg_id,
                    ts_ms,
                    duplicate,
                })
            },
        );
    let messages = (
        reference(),
        conversation_id(),
        collection::vec(event(), 0..4),
        any::<u64>(),
    )
        .prop_map(|(reference, conversation_id, events, head_seq)| {
            ServerFrame::Messages(Messages {
                reference,
                conversation_id,
                events,
                head_seq,
            })
        });
    let receipt = (conversation_id(), user_id(), any::<u64>(), any::<u64>()).prop_map(
        |(conversation_id, user, delivered_seq, read_seq)| {
            ServerFrame::Receipt(Receipt {
                conversation_id,
                user,
                delivered_seq,
                read_seq,
            })
        },
    );
    let trimmed = (conversation_id(), seq()).prop_map(|(conversation_id, floor_seq)| {
        ServerFrame::Trimmed(Trimmed {
            conversation_id,
            floor_seq,
        })
    });
    let typing = (conversation_id(), user_id(), any::<bool>()).prop_map(
        |(conversation_id, user, active)| {
            ServerFrame::Typing(TypingNotice {
                conversation_id,
                user,
                active,
            })
        },
    );
    let error = (
        reference(),
        proptest::sample::select(ErrorCode::ALL.to_vec()),
        text(),
        option::of(client_msg_id()),
        option::of(any::<u64>()),
    )
        .prop_map(
            |(reference, code, message, client_msg_id, retry_after_ms)| {
                ServerFrame::Error(ErrorFrame {
                    reference,
                    code,
                    message,
                    client_msg_id,
                    retry_after_ms,
                })
            },
        );
    prop_oneof![
        1 => hello,
        1 => sent,
        4 => event().prop_map(ServerFrame::Event),
        1 => messages,
        1 => receipt,
        1 => Just(ServerFrame::SyncDone(SyncDone {})),
        1 => trimmed,
        1 => typing,
        1 => error,
        1 => any::<u64>().prop_map(|after_ms| ServerFrame::Reconnect(Reconnect { after_ms })),
        1 => reference().prop_map(|reference| ServerFrame::Pong(Pong { reference })),
    ]
}

/// Every id of `frame` follows the rules of `ids`, so that the frames above are valid ones.
fn client_ids_are_valid(frame: &ClientFrame) -> bool {
    let conv = |c: &str| ids::conversation_id(c).is_ok();
    match frame {
        ClientFrame::Send(s) => {
            ids::client_msg_id(&s.client_msg_id).is_ok()
                && s.conversation_id.as_deref().is_none_or(conv)
                && s.to_user.as_deref().is_none_or(|u| ids::user_id(u).is_ok())
                && s.conversation_id.is_some() != s.to_user.is_some()
                && match &s.body {
                    Body::Media(m) => ids::media_id(&m.media_id).is_ok(),
                    Body::Text(_) => true,
                }
        }
        ClientFrame::Ack(a) => conv(&a.conversation_id),
        ClientFrame::Sync(s) => s.cursors.keys().all(|c| conv(c)),
        ClientFrame::Fetch(f) => conv(&f.conversation_id),
        ClientFrame::Delete(d) => conv(&d.conversation_id),
        ClientFrame::Typing(t) => conv(&t.conversation_id),
        ClientFrame::Ping(_) => true,
    }
}

/// `json` (one encoded frame) with `"type"` moved after every other field, so that it is read
/// through the buffered path of the decoder rather than the one-pass one.
fn type_last(json: &str) -> String {
    let serde_json::Value::Object(mut fields) = serde_json::from_str(json).unwrap() else {
        panic!("a frame is an object: {json}")
    };
    let tag = fields.remove("type").expect("a frame has a type");
    let rest = serde_json::Value::Object(fields).to_string();
    let tag = format!(r#""type":{tag}}}"#);
    match rest.as_str() {
        "{}" => format!("{{{tag}"),
        _ => format!("{},{tag}", rest.strip_suffix('}').unwrap()),
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn valid_client_frames_round_trip_in_both_encodings(frame in client_frame()) {
        prop_assert!(client_ids_are_valid(&frame), "{frame:?}");
        for encoding in BOTH {
            let bytes = bytes_of(encoding.encode_client(&frame));
            prop_assert_eq!(encoding.decode_client(&bytes), Ok(frame.clone()), "{:?}", encoding);
            prop_assert_eq!(encoding.salvage_ids(&bytes).0, frame.reference());
        }
        let Payload::Text(json) = Encoding::Json.encode_client(&frame) else {
            panic!("json is text")
        };
        prop_assert!(json.starts_with(r#"{"type":""#), "{}", json);
        let last = type_last(&json);
        prop_assert_eq!(Encoding::Json.decode_client(last.as_bytes()), Ok(frame), "{}", last);
    }

    #[test]
    fn valid_server_frames_round_trip_in_both_encodings(frame in server_frame()) {
        for encoding in BOTH {
            let bytes = bytes_of(encoding.encode_server(&frame));
            prop_assert_eq!(encoding.decode_server(&bytes), Ok(frame.clone()), "{:?}", encoding);
            if let ServerFrame::Event(event) = &frame {
                prop_assert_eq!(
                    encoding.encode_event(event),
                    encoding.encode_server(&frame)
                );
            }
        }
        let Payload::Text(json) = Encoding::Json.encode_server(&frame) else {
            panic!("json is text")
        };
        let last = type_last(&json);
        prop_assert_eq!(Encoding::Json.decode_server(last.as_bytes()), Ok(frame), "{}", last);
    }
}

// ---------------------------------------------------------------- arbitrary input

/// What decoding `data` must do whatever it is: answer a frame or an error that says what is
/// wrong (no panic), salvage ids without panicking, and, when a frame comes out, write it so
/// that it reads back the same in both encodings.
fn decodes_or_refuses(encoding: Encoding, data: &[u8]) -> Result<(), TestCaseError> {
    match encoding.decode_client(data) {
        Ok(frame) => {
            for other in BOTH {
                let bytes = bytes_of(other.encode_client(&frame));
                prop_assert_eq!(
                    other.decode_client(&bytes),
                    Ok(frame.clone()),
                    "read from {:?}, written in {:?}",
                    encoding,
                    other
                );
            }
        }
        Err(error) => prop_assert!(!error.to_string().is_empty()),
    }
    match encoding.decode_server(data) {
        Ok(frame) => {
            for other in BOTH {
                let bytes = bytes_of(other.encode_server(&frame));
                prop_assert_eq!(
                    other.decode_server(&bytes),
                    Ok(frame.clone()),
                    "read from {:?}, written in {:?}",
                    encoding,
                    other
                );
            }
        }
        Err(error) => prop_assert!(!error.to_string().is_empty()),
    }
    let _ = encoding.salvage_ids(data);
    Ok(())
}

/// The `type`s of real frames, client and server, and a few that are not.
const TYPES: &[&str] = &[
    "send",
    "ack",
    "sync",
    "fetch",
    "delete",
    "typing",
    "ping",
    "hello",
    "sent",
    "event",
    "messages",
    "receipt",
    "sync_done",
    "trimmed",
    "error",
    "reconnect",
    "pong",
    "",
    "Send",
    "PING",
    "nope",
];

/// Every field name of PROTOCOL.md's frames and bodies.
const FIELDS: &[&str] = &[
    "ref",
    "client_msg_id",
    "conversation_id",
    "to_user",
    "body",
    "reply_to",
    "seq",
    "kind",
    "cursors",
    "after_seq",
    "limit",
    "active",
    "text",
    "media",
    "media_id",
    "mime",
    "size",
    "sha256",
    "name",
    "caption",
    "user",
    "device",
    "sender",
    "events",
    "head_seq",
    "ts_ms",
    "server_msg_id",
    "target_seq",
    "members",
    "users",
    "deleted",
    "code",
    "message",
    "retry_after_ms",
    "after_ms",
    "delivered_seq",
    "read_seq",
    "floor_seq",
    "duplicate",
    "server_time_ms",
    "type",
];

fn quoted(text: &str) -> Vec<u8> {
    serde_json::to_string(text).unwrap().into_bytes()
}

/// A JSON number as text: in and out of the ranges of u32, u64 and i64, negative, huge,
/// fractional, with exponents beyond f64.
fn json_number() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        any::<u64>().prop_map(|n| n.to_string()),
        any::<i64>().prop_map(|n| n.to_string()),
        any::<u32>().prop_map(|n| n.to_string()),
        prop_oneof![
            Just(u64::MAX.to_string()),
            Just("18446744073709551616".to_owned()),
            Just(i64::MIN.to_string()),
            Just("-9223372036854775809".to_owned()),
            Just("4294967296".to_owned()),
            Just("-1".to_owned()),
            Just("-0".to_owned()),
            Just("1e400".to_owned()),
            Just("-1e400".to_owned()),
            Just("1.0".to_owned()),
        ],
        "-?[1-9][0-9]{19,400}",
        "-?[0-9]{1,5}\\.[0-9]{1,5}([eE][+-]?[0-9]{1,4})?",
    ]
    .prop_map(String::into_bytes)
}

/// A JSON string as bytes: any text, a very long one, bad or lone-surrogate escapes, raw bytes
/// that are not UTF-8.
fn json_string() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        20 => any::<String>().prop_map(|s| quoted(&s)),
        6 => proptest::sample::select(TYPES).prop_map(quoted),
        1 => (0usize..200_000).prop_map(|n| quoted(&"é".repeat(n))),
        2 => "\"(\\\\u[0-9a-fA-F]{0,4}|\\\\[a-z\"]|[a-z]){0,8}\"".prop_map(String::into_bytes),
        1 => Just(br#""\ud800""#.to_vec()),
        1 => Just(br#""\udc00\ud800x""#.to_vec()),
        1 => collection::vec(any::<u8>(), 0..16).prop_map(|raw| {
            let mut s = b"\"".to_vec();
            s.extend(raw.into_iter().map(|b| if b == b'"' || b == b'\\' { 0x80 } else { b }));
            s.push(b'"');
            s
        }),
    ]
}

fn json_object(fields: Vec<(Vec<u8>, Vec<u8>)>) -> Vec<u8> {
    let mut out = b"{".to_vec();
    for (i, (key, value)) in fields.into_iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend(key);
        out.push(b':');
        out.extend(value);
    }
    out.push(b'}');
    out
}

fn json_array(items: Vec<Vec<u8>>) -> Vec<u8> {
    let mut out = b"[".to_vec();
    out.extend(items.join(&b","[..]));
    out.push(b']');
    out
}

fn field_name() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        6 => proptest::sample::select(FIELDS).prop_map(quoted),
        1 => "[a-z_]{0,8}".prop_map(|k| quoted(&k)),
    ]
}

/// Any JSON value, as bytes: scalars of every type, arrays, and objects with the fields of
/// frames (so bodies, media and senders of random shapes), nested a few levels.
fn json_value() -> impl Strategy<Value = Vec<u8>> {
    let leaf = prop_oneof![
        1 => Just(b"null".to_vec()),
        1 => Just(b"true".to_vec()),
        1 => Just(b"false".to_vec()),
        2 => json_number(),
        2 => json_string(),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            1 => collection::vec(inner.clone(), 0..6).prop_map(json_array),
            3 => collection::vec((field_name(), inner), 0..6).prop_map(json_object),
        ]
    })
}

/// A value of the type the field `name` has in some frame, of a shape near it, or of any
/// other type.
fn json_value_for(name: &'static str) -> BoxedStrategy<Vec<u8>> {
    let string = || {
        prop_oneof![
            4 => any::<String>().prop_map(|s| quoted(&s)),
            1 => json_string(),
        ]
    };
    let plausible: BoxedStrategy<Vec<u8>> = match name {
        "ref" | "reply_to" | "seq" | "after_seq" | "limit" | "size" | "head_seq" | "ts_ms"
        | "target_seq" | "retry_after_ms" | "after_ms" | "delivered_seq" | "read_seq"
        | "floor_seq" | "server_time_ms" => json_number().boxed(),
        "active" | "deleted" | "duplicate" => any::<bool>()
            .prop_map(|b| b.to_string().into_bytes())
            .boxed(),
        "kind" => proptest::sample::select(
            &[
                "delivered",
                "read",
                "message",
                "delete",
                "group_created",
                "member_added",
                "member_removed",
                "Read",
            ][..],
        )
        .prop_map(quoted)
        .boxed(),
        "code" => proptest::sample::select(ErrorCode::ALL.to_vec())
            .prop_map(|c| quoted(c.as_str()))
            .boxed(),
        "cursors" => collection::vec((string(), json_number()), 0..4)
            .prop_map(json_object)
            .boxed(),
        "members" | "users" => collection::vec(string(), 0..4).prop_map(json_array).boxed(),
        "sender" => (string(), string())
            .prop_map(|(user, device)| {
                json_object(vec![(quoted("user"), user), (quoted("device"), device)])
            })
            .boxed(),
        "body" => prop_oneof![
            string().prop_map(|text| json_object(vec![(quoted("text"), text)])),
            collection::vec(
                proptest::sample::select(
                    &["media_id", "mime", "size", "sha256", "name", "caption"][..]
                )
                .prop_flat_map(|field| (Just(quoted(field)), json_value_for(field))),
                0..7
            )
            .prop_map(|media| json_object(vec![(quoted("media"), json_object(media))])),
            collection::vec((field_name(), json_value()), 0..3).prop_map(json_object),
        ]
        .boxed(),
        "events" => collection::vec(
            collection::vec(
                proptest::sample::select(FIELDS)
                    .prop_flat_map(|field| (Just(quoted(field)), json_value_for(field))),
                0..12,
            )
            .prop_map(json_object),
            0..3,
        )
        .prop_map(json_array)
        .boxed(),
        _ => string().boxed(),
    };
    prop_oneof![3 => plausible, 1 => json_value()].boxed()
}

/// A field of a frame: a name frames have (now and then another), and a value of its type or
/// of any other.
fn json_field() -> impl Strategy<Value = (Vec<u8>, Vec<u8>)> {
    prop_oneof![
        6 => proptest::sample::select(FIELDS)
            .prop_flat_map(|field| (Just(quoted(field)), json_value_for(field))),
        1 => (field_name(), json_value()),
    ]
}

/// Where a frame's `type` goes among its fields.
#[derive(Debug, Clone)]
enum TagAt {
    Nowhere,
    At(usize),
    Twice(usize, usize),
}

/// An object shaped like a frame: a `type` (usually a real one; first, further on, missing or
/// twice, sometimes not a string) among random fields of random types.
fn frame_shaped_json() -> impl Strategy<Value = Vec<u8>> {
    let tag = prop_oneof![
        6 => proptest::sample::select(TYPES).prop_map(quoted),
        1 => json_value(),
    ];
    let at = prop_oneof![
        4 => Just(TagAt::At(0)),
        2 => (0usize..8).prop_map(TagAt::At),
        1 => Just(TagAt::Nowhere),
        1 => (0usize..8, 0usize..8).prop_map(|(a, b)| TagAt::Twice(a, b)),
    ];
    (tag, at, collection::vec(json_field(), 0..8)).prop_map(|(tag, at, mut fields)| {
        let entry = || (b"\"type\"".to_vec(), tag.clone());
        match at {
            TagAt::Nowhere => {}
            TagAt::At(i) => fields.insert(i.min(fields.len()), entry()),
            TagAt::Twice(a, b) => {
                fields.insert(a.min(fields.len()), entry());
                fields.insert(b.min(fields.len()), entry());
            }
        }
        json_object(fields)
    })
}

/// A valid client frame in JSON with one field replaced by, or added as, a random value (or
/// removed).
fn mutated_client_json() -> impl Strategy<Value = Vec<u8>> {
    let names: Vec<&'static str> = FIELDS.iter().copied().filter(|f| *f != "type").collect();
    (
        client_frame(),
        proptest::sample::select(names)
            .prop_flat_map(|name| (Just(name), option::of(json_value_for(name)))),
        any::<bool>(),
    )
        .prop_map(|(frame, (name, value), type_last)| {
            let Payload::Text(json) = Encoding::Json.encode_client(&frame) else {
                unreachable!("json is text")
            };
            let serde_json::Value::Object(map) = serde_json::from_str(&json).unwrap() else {
                unreachable!("a frame is an object")
            };
            let mut fields: Vec<(Vec<u8>, Vec<u8>)> = map
                .into_iter()
                .map(|(k, v)| (quoted(&k), v.to_string().into_bytes()))
                .collect();
            let tag = fields.iter().position(|(k, _)| k == b"\"type\"").unwrap();
            let tag = fields.remove(tag);
            let name = quoted(name);
            fields.retain(|(k, _)| *k != name);
            if let Some(value) = value {
                fields.push((name, value));
            }
            if type_last {
                fields.push(tag);
            } else {
                fields.insert(0, tag);
            }
            json_object(fields)
        })
}

/// One field of a protobuf message, in any wire type, nested or not: strings that are not
/// UTF-8, messages where strings belong, varints beyond the field's range, unknown fields.
#[derive(Debug, Clone)]
enum PbValue {
    Varint(u64),
    Fixed64(u64),
    Fixed32(u32),
    Bytes(Vec<u8>),
    Message(Vec<(u32, PbValue)>),
    /// A key of any wire type (groups and the invalid 6 and 7 too) followed by raw bytes.
    Raw(u8, Vec<u8>),
}

fn varint(mut n: u64, out: &mut Vec<u8>) {
    while n >= 0x80 {
        out.push(n as u8 | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

fn pb_message(fields: &[(u32, PbValue)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (number, value) in fields {
        let key = |wire: u64, out: &mut Vec<u8>| varint((u64::from(*number) << 3) | wire, out);
        match value {
            PbValue::Varint(n) => {
                key(0, &mut out);
                varint(*n, &mut out);
            }
            PbValue::Fixed64(n) => {
                key(1, &mut out);
                out.extend(n.to_le_bytes());
            }
            PbValue::Fixed32(n) => {
                key(5, &mut out);
                out.extend(n.to_le_bytes());
            }
            PbValue::Bytes(bytes) => {
                key(2, &mut out);
                varint(bytes.len() as u64, &mut out);
                out.extend(bytes);
            }
            PbValue::Message(inner) => {
                let inner = pb_message(inner);
                key(2, &mut out);
                varint(inner.len() as u64, &mut out);
                out.extend(inner);
            }
            PbValue::Raw(wire, bytes) => {
                key(u64::from(*wire), &mut out);
                out.extend(bytes);
            }
        }
    }
    out
}

fn pb_value() -> impl Strategy<Value = PbValue> {
    let leaf = prop_oneof![
        2 => prop_oneof![any::<u64>(), 0u64..3, Just(u64::MAX), Just(u64::from(u32::MAX) + 1)]
            .prop_map(PbValue::Varint),
        1 => any::<u64>().prop_map(PbValue::Fixed64),
        1 => any::<u32>().prop_map(PbValue::Fixed32),
        // Text, and bytes that are not UTF-8 (a lone continuation byte, a truncated sequence).
        3 => prop_oneof![
            any::<String>().prop_map(String::into_bytes),
            collection::vec(any::<u8>(), 0..24),
            Just(b"ok\x80".to_vec()),
            Just(b"\xe2\x82".to_vec()),
            Just(b"\xff\xfe".to_vec()),
        ]
        .prop_map(PbValue::Bytes),
        1 => (0u8..8, collection::vec(any::<u8>(), 0..12)).prop_map(|(w, b)| PbValue::Raw(w, b)),
    ];
    leaf.prop_recursive(4, 40, 6, |inner| {
        collection::vec((pb_field_number(), inner), 0..6).prop_map(PbValue::Message)
    })
}

fn pb_field_number() -> impl Strategy<Value = u32> {
    prop_oneof![8 => 1u32..16, 1 => Just(0u32), 1 => 16u32..(1 << 29)]
}

/// A protobuf `ClientFrame` or `ServerFrame` of random fields: the frame's `oneof` cases are
/// the field numbers 2 to 12, so nested messages land in real frames' fields.
fn frame_shaped_proto() -> impl Strategy<Value = Vec<u8>> {
    collection::vec((pb_field_number(), pb_value()), 0..5).prop_map(|fields| pb_message(&fields))
}

/// A valid client frame in protobuf with one byte changed, inserted or removed, or cut short.
fn mutated_client_proto() -> impl Strategy<Value = Vec<u8>> {
    (
        client_frame(),
        any::<proptest::sample::Index>(),
        any::<u8>(),
        0u8..4,
    )
        .prop_map(|(frame, index, byte, how)| {
            let mut bytes = pb::ClientFrame::from(frame).encode_to_vec();
            let at = index.index(bytes.len() + 1);
            match how {
                0 if at < bytes.len() => bytes[at] = byte,
                1 => bytes.insert(at, byte),
                2 if at < bytes.len() => drop(bytes.remove(at)),
                _ => bytes.truncate(at),
            }
            bytes
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn arbitrary_bytes_decode_or_are_refused(data in collection::vec(any::<u8>(), 0..512)) {
        for encoding in BOTH {
            decodes_or_refuses(encoding, &data)?;
        }
    }

    #[test]
    fn frame_shaped_json_decodes_or_is_refused(data in frame_shaped_json()) {
        decodes_or_refuses(Encoding::Json, &data)?;
    }

    #[test]
    fn mutated_json_frames_decode_or_are_refused(data in mutated_client_json()) {
        decodes_or_refuses(Encoding::Json, &data)?;
    }

    #[test]
    fn frame_shaped_protobuf_decodes_or_is_refused(data in frame_shaped_proto()) {
        decodes_or_refuses(Encoding::Proto, &data)?;
    }

    #[test]
    fn mutated_protobuf_frames_decode_or_are_refused(data in mutated_client_proto()) {
        decodes_or_refuses(Encoding::Proto, &data)?;
    }

    /// Nesting deeper than the decoders' recursion limits, inside a field that the frame has
    /// not (skipped in the one-pass read, buffered in the other) or in place of a body.
    #[test]
    fn deep_nesting_is_refused_not_a_stack_overflow(
        depth in 0usize..20_000,
        field in prop_oneof![Just("extra"), Just("body"), Just("cursors")],
        tag_first in any::<bool>(),
    ) {
        let nested = format!("{}{}", "[".repeat(depth), "]".repeat(depth));
        let json = if tag_first {
            format!(r#"{{"type":"send","{field}":{nested}}}"#)
        } else {
            format!(r#"{{"{field}":{nested},"type":"sync"}}"#)
        };
        decodes_or_refuses(Encoding::Json, json.as_bytes())?;
        let mut proto = Vec::new();
        for _ in 0..depth.min(2_000) {
            // A `send` whose body is a message holding a message, and so on.
            let mut outer = Vec::new();
            varint((2 << 3) | 2, &mut outer);
            varint(proto.len() as u64, &mut outer);
            outer.extend(proto);
            proto = outer;
        }
        decodes_or_refuses(Encoding::Proto, &proto)?;
    }
}

/// The same frame-shaped object twice: with `type` first (read in one pass) and with `type`
/// after every other field (buffered first).
fn json_with_type_first_and_last() -> impl Strategy<Value = (Vec<u8>, Vec<u8>)> {
    (
        proptest::sample::select(TYPES).prop_map(quoted),
        collection::vec(json_field(), 0..8),
    )
        .prop_map(|(tag, mut fields)| {
            fields.retain(|(k, _)| k != b"\"type\"");
            let tag = (b"\"type\"".to_vec(), tag);
            let mut first = vec![tag.clone()];
            first.extend(fields.iter().cloned());
            fields.push(tag);
            (json_object(first), json_object(fields))
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// tagged.rs: a frame with its `type` further on "is buffered as serde does, and reads
    /// the same".
    #[test]
    fn json_frames_read_the_same_wherever_type_is(
        (first, last) in json_with_type_first_and_last()
    ) {
        let text = |json: &[u8]| String::from_utf8_lossy(json).into_owned();
        let ok = |r: Result<ClientFrame, DecodeError>| r.ok();
        prop_assert_eq!(
            ok(Encoding::Json.decode_client(&first)),
            ok(Encoding::Json.decode_client(&last)),
            "{} / {}",
            text(&first),
            text(&last)
        );
        let ok = |r: Result<ServerFrame, DecodeError>| r.ok();
        prop_assert_eq!(
            ok(Encoding::Json.decode_server(&first)),
            ok(Encoding::Json.decode_server(&last)),
            "{} / {}",
            text(&first),
            text(&last)
        );
    }
}
