//! How a shard's outbox is stored: a commit writes its events in as few rows as fit
//! ([`RowWriter`]), not one row per event.
//!
//! An outbox **entry** is one event, and its key is what one row per event would have had:
//! the shard's subspace, the commit's versionstamp, and the entry's order within the commit
//! in the versionstamp's last two bytes (`Keys::outbox_entry`). A **row** holds consecutive
//! entries of one commit under the key of its first entry, so entry `j` of a row is the row's
//! key with `j` added to that order. Readers see entries ([`entries`]); positions (fanout's
//! and the notifier's bounds) stay entry keys or `bound_after` one. Every row of a commit sorts
//! after every entry of an earlier commit, so a read from a position starts at its commit's
//! first row ([`commit_start`]) and passes over the entries below the position.
//!
//! Why: a message used to write its outbox entry and, once read, that entry's tombstone: two
//! of the ~4 keys a message writes at the peak, each an insert into the store's memtable, a
//! journal record and flush and compaction work. A row per commit writes them once per
//! commit (`docs/benchmarks.md`, "The outbox, a row per commit").
//!
//! A row's value is [`ROW_MARKER`] and then `OutboxRow` (protobuf: `message OutboxRow {
//! repeated courier.v1.Event events = 1; }`, the events as stored
//! under their `ev` keys). A value without the marker is a row of one entry, the bare event (a
//! `courier.v1.Event`, whose encoding never starts with a zero byte): as a version before rows
//! wrote every entry, so an outbox left by an upgrade is read as it was, and as an event too
//! large for the row's framing within the engine's value limit is written.

use crate::kv::StoreError;
use crate::message_store::corrupt;
use courier_proto::Event;
use prost::Message;
use std::ops::Range;

/// The first byte of a row's value (a field number 0 no protobuf message starts with).
pub const ROW_MARKER: u8 = 0;

/// The bytes of a versionstamp at the end of an entry's key: the code of the tuple element,
/// the commit's 10 bytes and the entry's order (2 bytes, big-endian).
const VERSIONSTAMP_BYTES: usize = 13;

/// The key of `OutboxRow`'s field 1, length-delimited: `(1 << 3) | 2`.
const EVENTS_FIELD_KEY: u8 = 0x0a;

/// What the push notifier reads of an outbox entry: the event's conversation, seq, sender,
/// time and kind, decoded from the stored `courier.v1.Event` (same field numbers) with every
/// other field, the body first, skipped rather than decoded.
#[derive(Clone, PartialEq, prost::Message)]
pub struct EventHeader {
    #[prost(string, tag = "1")]
    pub conversation_id: String,
    #[prost(uint64, tag = "2")]
    pub seq: u64,
    #[prost(message, optional, tag = "4")]
    sender: Option<SenderUser>,
    #[prost(uint64, tag = "5")]
    pub ts_ms: u64,
    /// `courier.v1.Event.kind`: "message", "delete", "group_created", ...
    #[prost(string, tag = "6")]
    kind: String,
}

/// `courier.v1.Sender` without its device.
#[derive(Clone, PartialEq, prost::Message)]
struct SenderUser {
    #[prost(string, tag = "1")]
    user: String,
}

impl EventHeader {
    /// The header of `event`: what [`EventHeader::decode_stored`] reads of its stored bytes.
    pub fn of(event: &Event) -> Self {
        Self {
            conversation_id: event.conversation_id.clone(),
            seq: event.seq,
            sender: Some(SenderUser {
                user: event.sender.user.clone(),
            }),
            ts_ms: event.ts_ms,
            kind: event.payload.kind().into(),
        }
    }

    /// The header of the event stored under `key` as `value`.
    pub fn decode_stored(key: &[u8], value: &[u8]) -> Result<Self, StoreError> {
        Self::decode(value).map_err(|e| corrupt(key, e))
    }

    /// The user who sent the event.
    pub fn sender(&self) -> &str {
        self.sender.as_ref().map_or("", |sender| &sender.user)
    }

    /// Whether the event is a message (not a deletion or a membership change).
    pub fn is_message(&self) -> bool {
        self.kind == "message"
    }
}

/// The rows of one commit's entries, each row under the (incomplete) key of its first entry
/// and at most `max_value_bytes` long. An event too large for a row of its own with the
/// row's framing is stored alone and bare, as versions before rows stored every entry.
pub struct RowWriter {
    max_value_bytes: usize,
    /// Rows no entry is added to any more, in key order.
    rows: Vec<(Vec<u8>, Vec<u8>)>,
    /// The row entries are added to, after every row of `rows`.
    open: Option<(Vec<u8>, Vec<u8>)>,
}

impl RowWriter {
    pub fn new(max_value_bytes: usize) -> Self {
        Self {
            max_value_bytes,
            rows: Vec::new(),
            open: None,
        }
    }

    /// Adds the entry keyed `key` (the commit's next): to the open row when it fits, else to
    /// a new row under `key`.
    pub fn push(&mut self, key: &[u8], encoded_event: &[u8]) -> Result<(), StoreError> {
        let field = 1 + prost::length_delimiter_len(encoded_event.len()) + encoded_event.len();
        let fits = self
            .open
            .as_ref()
            .is_some_and(|(_, value)| value.len() + field <= self.max_value_bytes);
        if !fits {
            self.rows.extend(self.open.take());
            if 1 + field > self.max_value_bytes {
                self.rows.push((key.to_vec(), encoded_event.to_vec()));
                return Ok(());
            }
        }
        let (_, value) = self
            .open
            .get_or_insert_with(|| (key.to_vec(), vec![ROW_MARKER]));
        // Field 1 of `OutboxRow` (number 1, length-delimited), the event's bytes as they are.
        value.push(EVENTS_FIELD_KEY);
        prost::encode_length_delimiter(encoded_event.len(), value)
            .map_err(|e| StoreError::Engine(format!("an outbox row: {e}")))?;
        value.extend_from_slice(encoded_event);
        Ok(())
    }

    /// The rows, keys incomplete (to be completed by the commit's versionstamp).
    pub fn finish(mut self) -> Vec<(Vec<u8>, Vec<u8>)> {
        self.rows.extend(self.open);
        self.rows
    }
}

/// An outbox entry's key and its event as stored (a `courier.v1.Event`), not decoded.
pub type StoredEntry<'a> = (Vec<u8>, &'a [u8]);

/// The entries of the outbox row `key` holding `value`, in key order, each with its event as
/// stored (a `courier.v1.Event`): a reader decodes only the entries, and the fields, it needs.
pub fn stored_entries<'a>(key: &[u8], value: &'a [u8]) -> Result<Vec<StoredEntry<'a>>, StoreError> {
    stored_events(key, value)?
        .into_iter()
        .enumerate()
        .map(|(j, event)| Ok((entry_key(key, j)?, event)))
        .collect()
}

/// The key of the last entry of the row `key` holding `value`.
pub fn last_entry_key(key: &[u8], value: &[u8]) -> Result<Vec<u8>, StoreError> {
    let count = stored_events(key, value)?.len();
    entry_key(key, count.saturating_sub(1))
}

/// The stored events of the row `key` holding `value`, in order, not decoded.
fn stored_events<'a>(key: &[u8], value: &'a [u8]) -> Result<Vec<&'a [u8]>, StoreError> {
    let Some(mut row) = value.strip_prefix(&[ROW_MARKER]) else {
        return Ok(vec![value]);
    };
    // `OutboxRow`'s fields as [`RowWriter::push`] frames them: its field key, the event's
    // length, the event.
    let mut events = Vec::new();
    while let Some((&field, rest)) = row.split_first() {
        if field != EVENTS_FIELD_KEY {
            return Err(corrupt(key, format!("outbox row: field key {field:#x}")));
        }
        row = rest;
        let len = prost::decode_length_delimiter(&mut row).map_err(|e| corrupt(key, e))?;
        if len > row.len() {
            return Err(corrupt(key, "outbox row: an event cut short"));
        }
        let (event, rest) = row.split_at(len);
        events.push(event);
        row = rest;
    }
    Ok(events)
}

/// The `j`-th entry's key of the row `row`.
fn entry_key(row: &[u8], j: usize) -> Result<Vec<u8>, StoreError> {
    let split = row
        .len()
        .checked_sub(2)
        .ok_or_else(|| corrupt(row, "outbox key too short"))?;
    let first = u16::from_be_bytes([row[split], row[split + 1]]);
    let order = u16::try_from(j)
        .ok()
        .and_then(|j| first.checked_add(j))
        .ok_or_else(|| corrupt(row, "outbox row longer than its commit"))?;
    let mut key = Vec::with_capacity(row.len());
    key.extend_from_slice(&row[..split]);
    key.extend_from_slice(&order.to_be_bytes());
    Ok(key)
}

/// Where a read of the outbox `outbox` (a shard's range) from `position` starts: the first
/// row of the commit `position` falls in (its versionstamp with order 0). A position that is
/// not within an entry (the range's start) is returned as it is.
pub fn commit_start(outbox: &Range<Vec<u8>>, position: &[u8]) -> Vec<u8> {
    // The range of a subspace starts with its prefix and a zero byte.
    let prefix = &outbox.start[..outbox.start.len().saturating_sub(1)];
    let entry = prefix.len() + VERSIONSTAMP_BYTES;
    if position.len() < entry || !position.starts_with(prefix) {
        return position.to_vec();
    }
    let mut start = position[..entry].to_vec();
    start[entry - 2..].fill(0);
    start
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Keys;
    use crate::kv::complete_versionstamped_key;
    use crate::message_store::{OutboxEntry, decode_event};
    use courier_proto::{Body, Event, EventPayload, Sender, pb};

    fn entries(key: &[u8], value: &[u8]) -> Result<Vec<OutboxEntry>, StoreError> {
        stored_entries(key, value)?
            .into_iter()
            .map(|(key, event)| Ok((key.clone(), decode_event(&key, event)?)))
            .collect()
    }

    fn event(seq: u64, text: &str) -> Event {
        Event {
            conversation_id: "d:1".into(),
            seq,
            server_msg_id: format!("m-{seq}"),
            sender: Sender {
                user: "alice".into(),
                device: "p".into(),
            },
            ts_ms: 5,
            payload: EventPayload::Message {
                body: Some(Body::Text(text.into())),
                client_msg_id: format!("c-{seq}"),
                reply_to: None,
                deleted: false,
            },
        }
    }

    #[test]
    fn a_commit_too_large_for_one_value_takes_several_rows_with_consecutive_entries() {
        let keys = Keys::new(b"");
        let events: Vec<Event> = (1..=5).map(|seq| event(seq, &"x".repeat(100))).collect();
        let encoded: Vec<Vec<u8>> = events
            .iter()
            .map(|e| pb::Event::from(e.clone()).encode_to_vec())
            .collect();
        // Room for two events per row.
        let mut writer = RowWriter::new(2 * (encoded[0].len() + 3) + 1);
        for (order, bytes) in encoded.iter().enumerate() {
            writer
                .push(&keys.outbox_entry(3, order as u16), bytes)
                .unwrap();
        }
        let stamp = [9; 10];
        let rows: Vec<(Vec<u8>, Vec<u8>)> = writer
            .finish()
            .into_iter()
            .map(|(key, value)| (complete_versionstamped_key(&key, &stamp).unwrap(), value))
            .collect();
        assert_eq!(rows.len(), 3, "2 + 2 + 1 entries");
        assert!(
            rows.iter()
                .all(|(_, value)| value.len() <= 2 * (encoded[0].len() + 3) + 1)
        );

        let read: Vec<OutboxEntry> = rows
            .iter()
            .flat_map(|(key, value)| entries(key, value).unwrap())
            .collect();
        let expected: Vec<Vec<u8>> = (0..5)
            .map(|order| complete_versionstamped_key(&keys.outbox_entry(3, order), &stamp).unwrap())
            .collect();
        assert_eq!(
            read.iter().map(|(k, _)| k.clone()).collect::<Vec<_>>(),
            expected
        );
        assert_eq!(
            read.iter().map(|(_, e)| e.clone()).collect::<Vec<_>>(),
            events
        );
        assert_eq!(last_entry_key(&rows[1].0, &rows[1].1).unwrap(), expected[3]);

        // Every position of the commit reads from its first row; other keys stay.
        let outbox = keys.outbox(3);
        for key in &expected {
            assert_eq!(commit_start(&outbox, key), rows[0].0);
            assert_eq!(commit_start(&outbox, &crate::bound_after(key)), rows[0].0);
        }
        assert_eq!(commit_start(&outbox, &outbox.start), outbox.start);
    }

    #[test]
    fn an_event_as_large_as_a_value_may_be_is_stored_bare_between_rows() {
        let keys = Keys::new(b"");
        let small = pb::Event::from(event(1, "a")).encode_to_vec();
        let large = pb::Event::from(event(2, &"x".repeat(200))).encode_to_vec();
        let mut writer = RowWriter::new(large.len());
        for (order, bytes) in [&small, &large, &small].into_iter().enumerate() {
            writer
                .push(&keys.outbox_entry(3, order as u16), bytes)
                .unwrap();
        }
        let rows = writer.finish();
        assert_eq!(rows.len(), 3);
        assert_eq!(rows[1].1, large, "the large event alone, bare");
        assert!(rows.iter().all(|(_, value)| value.len() <= large.len()));
        let stamp = [1; 10];
        let seqs: Vec<u64> = rows
            .iter()
            .flat_map(|(key, value)| {
                let key = complete_versionstamped_key(key, &stamp).unwrap();
                entries(&key, value).unwrap()
            })
            .map(|(_, e)| e.seq)
            .collect();
        assert_eq!(seqs, [1, 2, 1]);
    }

    #[test]
    fn an_event_header_has_the_stored_events_fields_and_tells_messages_from_other_events_alike_from_memory()
     {
        let message = event(7, "hello");
        let others = [
            EventPayload::Delete { target_seq: 3 },
            EventPayload::GroupCreated {
                name: "g".into(),
                members: vec!["alice".into(), "bob".into()],
            },
            EventPayload::MemberAdded(courier_proto::MembershipChange::new(vec!["carol".into()])),
        ];
        let events =
            std::iter::once(message.clone()).chain(others.into_iter().map(|payload| Event {
                payload,
                ..message.clone()
            }));
        for (j, event) in events.enumerate() {
            let stored = pb::Event::from(event.clone()).encode_to_vec();
            let header = EventHeader::decode_stored(b"k", &stored).unwrap();
            assert_eq!(header.conversation_id, event.conversation_id);
            assert_eq!(header.seq, event.seq);
            assert_eq!(header.sender(), event.sender.user);
            assert_eq!(header.ts_ms, event.ts_ms);
            assert_eq!(header.is_message(), j == 0, "{:?}", event.payload);
            // Built from the event in memory, it is what the stored bytes give.
            assert_eq!(EventHeader::of(&event), header);
        }
    }

    #[test]
    fn a_damaged_row_is_an_error_not_a_panic() {
        let keys = Keys::new(b"");
        let key = complete_versionstamped_key(&keys.outbox_entry(1, 0), &[1; 10]).unwrap();
        for value in [
            vec![ROW_MARKER, 0x0a, 200],
            vec![ROW_MARKER, 0xff],
            vec![0x0a, 3, 1],
        ] {
            assert!(matches!(
                entries(&key, &value),
                Err(StoreError::Corrupt { .. })
            ));
            if value[0] == ROW_MARKER {
                assert!(matches!(
                    last_entry_key(&key, &value),
                    Err(StoreError::Corrupt { .. })
                ));
            }
        }
        assert!(entries(&[1], &[ROW_MARKER]).is_ok_and(|e| e.is_empty()));
    }
}
