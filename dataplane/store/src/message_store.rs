//! The message-store logic, written once over [`KvEngine`]: shards and their epochs, appends
//! (dense per-conversation seq, idempotency, outbox), reads, cursors and receipts.

use crate::idempotency::{EarlierIdempotency, IdempotencyWindow};
use crate::keys::{
    Keys, PUSH_REGISTRATION_SLOTS, ReceiptKind, push_registration_slot, stable_hash,
};
use crate::kv::{
    Batch, BatchLimits, Durability, EventCacheTotals, KeyValue, KvEngine, Mutation, StoreError,
    WriterTotals, complete_versionstamped_key, decode_u64,
};
use crate::membership::{MemberRecord, UserConversation, encode_left_seq};
use crate::outbox_rows::{self, EventHeader, RowWriter};
use crate::ownership::Duty;
use crate::partitions::{PartitionTable, PartitionedEngine};
use courier_proto::{Event, EventPayload, MembershipChange, Receipt, Sender, pb};
use foldhash::{HashMap, HashMapExt};
use prost::Message;
use std::collections::{BTreeMap, BTreeSet};
use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// Attempts for a batch whose commit outcome was unknown before giving up.
const MAX_COMMIT_ATTEMPTS: usize = 5;
/// Bytes of the key media ids are made with ([`MessageStore::media_id_key`]).
const MEDIA_ID_KEY_BYTES: usize = 32;

/// Rounds of a fenced device-record update before a concurrent writer's change is returned
/// as `FenceChanged` (each round is one read and one commit of a single small key).
const DEVICE_UPDATE_ATTEMPTS: usize = 5;

/// Sanity bound on stored counts read back from the store.
const MAX_SHARDS: u32 = 1 << 20;

/// Keys read and cleared per commit of a background clean-up ([`MessageStore::clear_where`],
/// retention's trims).
pub const CLEAR_PAGE: usize = 1024;

/// A background clean-up works at most one part in this many of the time, resting between
/// pages: an expired idempotency bucket holds a window of sends, and clearing it at once would
/// take the store's writer from appends for as long.
const CLEAR_PACE: u32 = 4;

/// Rests after a page of a background clean-up that began at `started`, so that the clean-up
/// works at most one part in [`CLEAR_PACE`] of the time.
pub async fn rest_after_clear_page(started: Instant) {
    tokio::time::sleep(started.elapsed() * (CLEAR_PACE - 1)).await;
}

/// Most bytes of pending notifications written in one commit while expanding an outbox
/// (lowered to the engine's batch limit): small commits, however many devices a group has.
pub const PUSH_EXPANSION_BYTES: usize = 1 << 20;

/// A conversation as stored.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ConversationRecord {
    /// `"direct"` or `"group"`.
    #[prost(string, tag = "1")]
    pub kind: String,
    #[prost(string, tag = "2")]
    pub name: String,
    #[prost(uint64, tag = "3")]
    pub created_ms: u64,
}

/// What kind of change of a device record `update_device_clearing` makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DeviceChange {
    /// Any change, synced.
    Update,
    /// The device's activity, deferred (`MessageStore::record_device_activity`).
    Activity,
    /// An app's registration of its push token, indexed even when unchanged.
    PushRegistration,
}

/// A device of a user. It is linked until it is unlinked, and linked again by signing in with
/// a token issued after its last unlink.
#[derive(Clone, PartialEq, prost::Message)]
pub struct DeviceRecord {
    #[prost(uint64, tag = "1")]
    pub last_seen_ms: u64,
    /// Tokens issued (`iat`) at or before this time are refused (0: never unlinked). An unlink
    /// sets it to its time and `issuer_lead_ms` after, or to `token_issued_ms` if later (an
    /// issuer's clock running ahead).
    #[prost(uint64, tag = "2")]
    pub unlinked_ms: u64,
    /// `"fcm"`, `"apns"` or `"webhook"`; empty without push.
    #[prost(string, tag = "3")]
    pub push_provider: String,
    #[prost(string, tag = "4")]
    pub push_token: String,
    /// The `iat` of the newest token the device has signed in with (0: none had one).
    #[prost(uint64, tag = "5")]
    pub token_issued_ms: u64,
    /// How far ahead of this server's clock the `iat` of the device's tokens has been, at
    /// most, when each was first used (0: never ahead). An issuer whose clock runs ahead
    /// dates a token it signs just before an unlink after it: the unlink refuses tokens
    /// issued up to this long after it, so that such a token is refused too, though the
    /// device had not used it yet.
    #[prost(uint64, tag = "6")]
    pub issuer_lead_ms: u64,
}

impl DeviceRecord {
    /// Whether the device is linked: never unlinked, or signed in since with a newer token.
    pub fn is_linked(&self) -> bool {
        self.unlinked_ms == 0 || self.token_issued_ms > self.unlinked_ms
    }

    /// Whether a token issued at `issued_at_ms` is honoured: only tokens issued after the last
    /// unlink are.
    pub fn accepts(&self, issued_at_ms: u64) -> bool {
        self.unlinked_ms == 0 || issued_at_ms > self.unlinked_ms
    }

    /// Whether the push notifier may notify the device: linked, with a push registration.
    pub fn takes_push(&self) -> bool {
        self.is_linked() && !self.push_token.is_empty()
    }
}

/// A change that would link a device (new, or linked again) refused: its user has `max`
/// linked devices already ([`MessageStore::record_device_link`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TooManyDevices {
    pub max: u64,
    /// The user's linked device seen least recently (one never connected first), the one to
    /// unlink if any.
    pub least_recent: String,
}

/// What [`MessageStore::conversation_rows`] reads of one conversation for one user.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ConversationRow {
    /// The default record for a conversation with none.
    pub record: ConversationRecord,
    pub head: u64,
    /// The user's receipt cursors.
    pub delivered: u64,
    pub read: u64,
    /// The user's membership record (none for a user who never belonged to it).
    pub member: Option<MemberRecord>,
}

/// The users of `records` who are members now, in the records' order.
fn current_members(records: Vec<(String, MemberRecord)>) -> Vec<String> {
    records
        .into_iter()
        .filter(|(_, record)| record.is_member())
        .map(|(user, _)| user)
        .collect()
}

/// What [`MessageStore::read_bounds`] reads of one conversation for one user.
#[derive(Debug, Clone, PartialEq)]
pub struct ReadBounds {
    /// The user's membership record, current or former; `None` if it never belonged.
    pub member: Option<MemberRecord>,
    /// The lowest retained seq ([`MessageStore::floor`]).
    pub floor: u64,
    /// The highest seq ([`MessageStore::head`]).
    pub head: u64,
}

/// What [`MessageStore::ack_bounds`] reads for one user's ack in one conversation.
#[derive(Debug, Clone, PartialEq)]
pub struct AckBounds {
    /// The user's membership record, current or former; `None` if it never belonged.
    pub member: Option<MemberRecord>,
    /// The highest seq ([`MessageStore::head`]).
    pub head: u64,
    /// The user's receipt cursors ([`MessageStore::receipt`]).
    pub delivered: u64,
    pub read: u64,
}

/// One user's upload (the bytes live in object storage under their sha256, shared by every
/// record of the same bytes). A record never changes but for its times (`created_ms`,
/// `shared_ms`), so the type served for an id is the one its uploader gave.
#[derive(Clone, PartialEq, prost::Message)]
pub struct MediaRecord {
    #[prost(string, tag = "1")]
    pub mime: String,
    #[prost(uint64, tag = "2")]
    pub size: u64,
    #[prost(string, tag = "3")]
    pub sha256: String,
    /// The latest upload of this record.
    #[prost(uint64, tag = "4")]
    pub created_ms: u64,
    #[prost(string, tag = "5")]
    pub owner: String,
    /// When a send last marked the record shared ([`MessageStore::share_media`]; 0: never).
    #[prost(uint64, tag = "6")]
    pub shared_ms: u64,
}

impl MediaRecord {
    /// The latest upload or share of this record: the sweeper's TTL counts from it.
    pub fn latest_use_ms(&self) -> u64 {
        self.created_ms.max(self.shared_ms)
    }
}

/// A message of a conversation that shares media (its `("mref", media_id, conv, seq)` key):
/// what a trim of the message clears with it ([`MessageStore::trim`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MediaReference {
    pub media_id: String,
    pub seq: u64,
}

/// What became of a media record put with [`MessageStore::put_media`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MediaAdmission {
    /// Recorded (new, or the same upload again: then only its time moved, at no cost).
    Recorded,
    /// Refused: the owner's records already hold `used` bytes, and this one would pass the quota.
    OverQuota { used: u64 },
}

/// A notification waiting for one device, collapsed per conversation.
#[derive(Clone, PartialEq, prost::Message)]
pub struct PendingPush {
    /// Messages it stands for.
    #[prost(uint32, tag = "1")]
    pub count: u32,
    /// The latest message counted; a message at or below it was counted already (by an
    /// expansion that failed before moving the notifier's bound).
    #[prost(uint64, tag = "2")]
    pub last_seq: u64,
    #[prost(string, tag = "3")]
    pub sender: String,
    /// Not sent before (collapse window, backoff).
    #[prost(uint64, tag = "4")]
    pub due_ms: u64,
    #[prost(uint32, tag = "5")]
    pub attempts: u32,
    /// A large group's notification: silent.
    #[prost(bool, tag = "6")]
    pub quiet: bool,
}

/// Where a connection closed for silence left its device in one conversation
/// ([`MessageStore::owe_pushes`]), as read by the push notifier.
#[derive(Debug, Clone)]
pub struct OwedPush {
    pub key: Vec<u8>,
    /// The value read, which settling it is fenced on.
    stored: Vec<u8>,
    /// The user, device and conversation (`None`: a key that does not decode, to be cleared).
    pub device: Option<(String, String, String)>,
    /// The highest seq the connection wrote there.
    pub through: u64,
}

/// The first outcome of a `(conversation, device, client_msg_id)`, returned to retries.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct IdempotencyRecord {
    #[prost(uint64, tag = "1")]
    pub(crate) seq: u64,
    /// The server id as text, as versions before `server_msg_random` wrote it; empty since.
    #[prost(string, tag = "2")]
    pub(crate) server_msg_id: String,
    #[prost(uint64, tag = "3")]
    pub(crate) ts_ms: u64,
    /// The random part of the server id ([`ServerMsgId`]), whose time is `ts_ms`: 9 bytes
    /// written instead of the id's ~29.
    #[prost(fixed64, tag = "4")]
    pub(crate) server_msg_random: u64,
}

impl IdempotencyRecord {
    fn new(seq: u64, id: ServerMsgId) -> Self {
        Self {
            seq,
            server_msg_id: String::new(),
            ts_ms: id.ts_ms,
            server_msg_random: id.random,
        }
    }

    /// The message's server id, as written or made again from its two numbers.
    pub(crate) fn server_msg_id(&self) -> String {
        if self.server_msg_id.is_empty() {
            ServerMsgId {
                ts_ms: self.ts_ms,
                random: self.server_msg_random,
            }
            .text()
        } else {
            self.server_msg_id.clone()
        }
    }
}

/// Ownership of one shard for one [`Duty`]: the owner's commits (appends, outbox clears) are
/// refused once another owner bumps the epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShardLease {
    pub shard: u32,
    pub epoch: u64,
}

/// Fanout's progress in the outbox of `lease.shard`: every entry below `bound` was handed to
/// the gateways by the consumer holding `lease`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliveredBound {
    pub lease: ShardLease,
    pub bound: Vec<u8>,
}

/// The push notifier's progress in the outbox of `shard`: every message below `bound` is
/// expanded by the commit that writes it, which also clears `clear` (entries below both
/// consumers' bounds; the rows of the commits of its two ends are kept whole).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PushedBound {
    pub shard: u32,
    pub bound: Vec<u8>,
    pub clear: Option<Range<Vec<u8>>>,
}

/// The key just after `key`: the bound below which `key` and everything before it lie.
pub fn bound_after(key: &[u8]) -> Vec<u8> {
    let mut bound = Vec::with_capacity(key.len() + 1);
    bound.extend_from_slice(key);
    bound.push(0);
    bound
}

/// A new direct conversation's record and members, written with its first event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewConversation {
    pub kind: &'static str,
    pub name: String,
    pub members: Vec<String>,
    /// For a direct conversation: the most direct conversations its sender may have started
    /// ([`AppendRefused::TooManyConversations`] past it); 0, no limit.
    pub started_limit: u64,
}

impl NewConversation {
    /// The direct conversation of two users (one, for a user writing to itself).
    pub fn direct(a: &str, b: &str) -> Self {
        let mut members = vec![a.to_owned(), b.to_owned()];
        members.dedup();
        Self {
            kind: "direct",
            name: String::new(),
            members,
            started_limit: 0,
        }
    }

    /// This conversation, created only while its sender has started fewer than `limit`
    /// direct conversations (0: no limit).
    pub fn started_at_most(self, limit: u64) -> Self {
        Self {
            started_limit: limit,
            ..self
        }
    }
}

/// What makes an append idempotent: a retry with the same key gets the first outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AppendKey {
    /// A client's `client_msg_id`, unique per sending device.
    Client(String),
    /// A key the server made (a delete's target, a membership request's id), kept in a
    /// subspace of its own so that no client id can collide with it.
    Server(String),
}

/// One event to sequence.
#[derive(Debug, Clone, PartialEq)]
pub struct Append {
    pub conversation_id: String,
    pub sender: Sender,
    /// Every append has one, so that a commit whose outcome was unknown is retried safely.
    pub key: AppendKey,
    pub payload: EventPayload,
    /// Set when the conversation may not exist yet (first message of a direct conversation).
    pub create: Option<NewConversation>,
}

impl Append {
    /// A client's message, keyed by its `client_msg_id` (which the event carries too), in a
    /// conversation that exists (set `create` for the first message of a direct one).
    pub fn message(
        conversation_id: String,
        sender: Sender,
        client_msg_id: String,
        body: courier_proto::Body,
        reply_to: Option<u64>,
    ) -> Self {
        Self {
            conversation_id,
            sender,
            key: AppendKey::Client(client_msg_id.clone()),
            payload: EventPayload::Message {
                body: Some(body),
                client_msg_id,
                reply_to,
                deleted: false,
            },
            create: None,
        }
    }

    /// Bytes of keys and values this append writes, roughly: the encoded event twice (the
    /// event and its outbox entry), a small record (key and value, with the append's ids) for
    /// its idempotency record, head and media reference, and three keys per
    /// membership it changes. Group commit keeps the sum of a batch under the engine's limit by
    /// it; a batch that is too large all the same is split by the sequencer.
    pub fn approximate_size(&self) -> usize {
        /// Tuple framing and subspace name of a key, with a small value (u64, short record).
        const RECORD: usize = 64;
        let conv = self.conversation_id.len();
        // Membership, the user's conversation list and group count.
        let member = |user: &String| 2 * conv + 3 * user.len() + RECORD;
        let (payload, records, members) = match &self.payload {
            EventPayload::Message {
                body,
                client_msg_id,
                ..
            } => {
                let body = match body {
                    Some(courier_proto::Body::Text(text)) => text.len(),
                    Some(courier_proto::Body::Media(m)) => {
                        m.media_id.len()
                            + m.mime.len()
                            + m.sha256.len()
                            + m.name.as_ref().map_or(0, String::len)
                            + m.caption.as_ref().map_or(0, String::len)
                    }
                    None => 0,
                };
                // Idempotency record, head, media reference.
                (client_msg_id.len() + body, 3, 0)
            }
            // Head, and the target rewritten without its body.
            EventPayload::Delete { .. } => (0, 2, 0),
            // Head.
            EventPayload::Unknown { kind } => (kind.len(), 1, 0),
            // Head, conversation record, retention queue entry.
            EventPayload::GroupCreated { name, members } => (
                name.len() + members.iter().map(String::len).sum::<usize>(),
                3,
                members.iter().map(member).sum(),
            ),
            // Head; the users named twice (`users` and, for one, `user`).
            EventPayload::MemberAdded(change) | EventPayload::MemberRemoved(change) => (
                2 * change.users.iter().map(String::len).sum::<usize>(),
                1,
                change.users.iter().map(member).sum(),
            ),
        };
        let created = self.create.as_ref().map_or(0, |c| {
            RECORD + c.name.len() + c.members.iter().map(member).sum::<usize>()
        });
        let record = RECORD + self.sender.user.len() + self.sender.device.len() + conv;
        2 * (record + payload) + records * record + members + created
    }
}

/// Why the sequencer refused an append: membership is decided inside the sequenced commit, so
/// these reflect the conversation at the append's place in its order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AppendRefused {
    #[error("the sender is not a member of the conversation")]
    NotMember,
    #[error("only group admins may do this")]
    NotAdmin,
    #[error("nothing to change: the users named already are (or are not) members")]
    NoChange,
    #[error(
        "you have started as many direct conversations as a user may \
         (--max-direct-conversations-per-user); write in those you have"
    )]
    TooManyConversations,
    /// A record the append is decided on does not decode or holds an impossible value (its
    /// conversation's head at its maximum, of the wrong length or below the events held, its
    /// sender's member record, its earlier idempotency record, a delete's target): damage, or
    /// a bug, logged at error with its key by the store. Only the appends that need it are
    /// refused; the others of their batch commit. Retrying changes nothing until the record is
    /// repaired.
    #[error(
        "a stored record of this conversation is damaged (its head, your membership, an \
         earlier send's record or the message deleted); retrying will not help"
    )]
    Damaged,
}

/// Per append: its outcome, or why it was refused.
pub type AppendResult = Result<AppendOutcome, AppendRefused>;

/// An entry of a shard's outbox: its key and its event.
pub type OutboxEntry = (Vec<u8>, Event);

/// A stored event of a conversation that does not decode (damage, or a kind only a node of
/// a newer version knows): its seq, and why.
#[derive(Debug, Clone)]
pub struct UndecodableEvent {
    pub seq: u64,
    pub error: StoreError,
}

/// A page of a shard's outbox as read from the store: its entries' keys, each with its event
/// as `T` reads it or why it does not decode ([`StoreError::Corrupt`], see
/// [`MessageStore::outbox_page`]), and whether the outbox holds more after them.
pub type OutboxPage<T> = (Vec<(Vec<u8>, Result<T, StoreError>)>, bool);

/// A page of a shard's outbox as [`MessageStore::outbox_headers`] reads it.
pub type OutboxHeaders = OutboxPage<EventHeader>;

/// An entry a commit added to a shard's outbox, as the committer lists it.
#[derive(Debug, Clone)]
pub struct ListedEntry {
    pub key: Vec<u8>,
    pub event: Event,
    /// The bytes of its stored value (the encoded event).
    pub bytes: usize,
}

/// What [`MessageStore::append_listed`] committed.
#[derive(Debug)]
pub struct Appended {
    /// One result per append, in their order.
    pub results: Vec<AppendResult>,
    /// The entries the commit added to the shard's outbox, in key order; `None` when an
    /// attempt whose outcome was unknown had landed, so that entries it wrote are not listed.
    pub outbox: Option<Vec<ListedEntry>>,
}

/// What became of one append.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppendOutcome {
    pub seq: u64,
    pub server_msg_id: String,
    pub ts_ms: u64,
    /// The append matched an earlier one with the same idempotency key.
    pub duplicate: bool,
}

/// Heads of the conversations a shard owner has touched, at most `capacity` of them: when
/// full, the cache is emptied, and heads are read from the store again as their conversations
/// are next appended to. Authoritative while the owner holds its lease, so appends need not
/// read heads back.
#[derive(Debug)]
pub struct HeadCache {
    heads: HashMap<String, u64>,
    capacity: usize,
}

/// Heads a [`HeadCache`] holds by default.
const DEFAULT_CACHED_HEADS: usize = 1 << 16;

/// How many times a head found below an event above it is read again before it is answered
/// as moving ([`MessageStore::checked_heads`]): each read again follows a commit that landed
/// between two reads, which only an append of unknown outcome makes.
const HEAD_CHECKS: usize = 3;

impl Default for HeadCache {
    fn default() -> Self {
        Self::with_capacity(DEFAULT_CACHED_HEADS)
    }
}

impl HeadCache {
    /// A cache of at most `capacity` heads (at least one).
    pub fn with_capacity(capacity: usize) -> Self {
        Self {
            heads: HashMap::new(),
            capacity: capacity.max(1),
        }
    }

    fn insert(&mut self, conv: &str, head: u64) {
        if self.heads.len() >= self.capacity && !self.heads.contains_key(conv) {
            self.heads.clear();
        }
        self.heads.insert(conv.to_owned(), head);
    }
}

/// Membership records read or written by the batch being built, by (conversation, user):
/// later appends of the batch decide on what earlier ones changed.
#[derive(Default)]
struct BatchMembers {
    records: HashMap<MemberKey, Option<MemberRecord>>,
    /// What the writes of the append being sequenced replaced, in their order (`None`: no
    /// record was there), so that an append refused as damaged part-way is undone.
    replaced: Vec<(MemberKey, Option<Option<MemberRecord>>)>,
}

/// A membership record's (conversation, user).
type MemberKey = (String, String);

impl BatchMembers {
    /// The next append's writes start here.
    fn begin_append(&mut self) {
        self.replaced.clear();
    }

    /// Writes `record` as the next append's (see [`BatchMembers::undo_append`]).
    fn write(&mut self, key: MemberKey, record: Option<MemberRecord>) {
        let before = self.records.insert(key.clone(), record);
        self.replaced.push((key, before));
    }

    /// Undoes the writes since [`BatchMembers::begin_append`].
    fn undo_append(&mut self) {
        while let Some((key, before)) = self.replaced.pop() {
            match before {
                Some(record) => self.records.insert(key, record),
                None => self.records.remove(&key),
            };
        }
    }
}

/// How a membership event changes the users it names.
#[derive(Clone, Copy)]
enum MembershipStep<'a> {
    /// They join; `creator` (the founder of a group) joins as its admin.
    Join {
        creator: Option<&'a str>,
    },
    Leave,
}

/// The message store over one engine, or over the partitions of a table
/// ([`MessageStore::open_partitioned`]).
#[derive(Clone)]
pub struct MessageStore {
    kv: Arc<dyn KvEngine>,
    keys: Keys,
    shard_count: u32,
    /// The partitions, when there are several (`kv` is then this same engine): the few
    /// operations that span partitions are split by it (decision 0005).
    partitions: Option<Arc<PartitionedEngine>>,
    /// How long appends' idempotency records are kept (`crate::idempotency`).
    pub(crate) idempotency: IdempotencyWindow,
    /// The layouts of earlier versions' idempotency records the store may still hold.
    pub(crate) earlier_idempotency: Arc<EarlierIdempotency>,
}

/// The shard of a conversation whose id has the [`stable_hash`] `hash`.
pub(crate) fn shard_of_hash(hash: u64, shard_count: u32) -> u32 {
    (hash % u64::from(shard_count.max(1))) as u32
}

pub(crate) fn corrupt(key: &[u8], reason: impl ToString) -> StoreError {
    StoreError::Corrupt {
        key: key.to_vec(),
        reason: reason.to_string(),
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// How many times push registrations began or ended ([`MessageStore::push_registration_counts`]):
/// in all, and for the users of each slot ([`push_registration_slot`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PushRegistrationCounts {
    pub total: u64,
    pub slots: Vec<u64>,
}

impl PushRegistrationCounts {
    /// The slots whose count moved since `before`, in increasing order; `None` when the total
    /// moved by more than the slots together (a node of a version that counts in all only changed one) or went
    /// back (another store).
    pub fn slots_moved_since(&self, before: &Self) -> Option<Vec<u16>> {
        let total = self.total.checked_sub(before.total)?;
        if self.slots.len() != before.slots.len() {
            return None;
        }
        let mut moved = Vec::new();
        let mut counted = 0u64;
        for (slot, (now, then)) in (0u16..).zip(self.slots.iter().zip(&before.slots)) {
            let delta = now.checked_sub(*then)?;
            if delta > 0 {
                moved.push(slot);
                counted = counted.saturating_add(delta);
            }
        }
        (counted == total).then_some(moved)
    }
}

/// A message's server id: its commit time in milliseconds, then a random number; as text
/// ([`ServerMsgId::text`]) the time in at least 11 hex digits, then 16 hex digits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ServerMsgId {
    ts_ms: u64,
    random: u64,
}

impl ServerMsgId {
    fn new(ts_ms: u64) -> Self {
        Self {
            ts_ms,
            random: rand::random(),
        }
    }

    /// Written digit by digit: `format!` with widths cost ~1,100 instructions per message, more
    /// than the rest of the id.
    fn text(&self) -> String {
        let mut id = String::with_capacity(27);
        let time_digits = (u64::BITS - self.ts_ms.leading_zeros()).div_ceil(4).max(11);
        push_hex(&mut id, self.ts_ms, time_digits);
        push_hex(&mut id, self.random, 16);
        id
    }
}

/// The `digits` lowest hex digits of `value`, most significant first.
fn push_hex(out: &mut String, value: u64, digits: u32) {
    for digit in (0..digits).rev() {
        let nibble = (value >> (4 * digit)) & 0xf;
        out.push(char::from_digit(nibble as u32, 16).unwrap_or('0'));
    }
}

impl MessageStore {
    /// Opens the store in `kv` under `root`, creating it with `shard_count` shards if empty.
    /// The shard count of an existing store is kept; asking for another one is an error, and
    /// so is a store (or a partition of one) created with storage partitions.
    pub async fn open(
        kv: Arc<dyn KvEngine>,
        root: &[u8],
        shard_count: u32,
    ) -> Result<Self, StoreError> {
        let keys = Keys::new(root);
        if let Some(ranges) = kv.get(&keys.partition_table()).await? {
            return Err(StoreError::Engine(format!(
                "this store was created with storage partitions (shards {}): start with \
                 --storage-partitions and the same table",
                String::from_utf8_lossy(&ranges)
            )));
        }
        if let Some(index) = kv.get(&keys.partition_index()).await? {
            return Err(StoreError::Engine(format!(
                "this store is partition {} of a store with storage partitions: start with \
                 --storage-partitions and its table",
                decode_u64(&index)
            )));
        }
        Self::open_on(kv, keys, shard_count, None).await
    }

    /// Opens the store split by `table` over `engines` (one per partition, in the table's
    /// order), creating it if empty. The table's shard ranges are recorded in the directory
    /// (partition 0) and each partition records its index when the store is created; a start
    /// with other ranges, with the partitions in another order, or with a store created
    /// without partitions, is refused.
    pub async fn open_partitioned(
        engines: Vec<Arc<dyn KvEngine>>,
        table: &PartitionTable,
        root: &[u8],
        shard_count: u32,
    ) -> Result<Self, StoreError> {
        let keys = Keys::new(root);
        let partitions = table.partitions().len();
        if engines.len() != partitions {
            return Err(StoreError::Engine(format!(
                "{} engines for a table of {partitions} partitions",
                engines.len()
            )));
        }
        if table.shard_count() != shard_count {
            return Err(StoreError::Engine(format!(
                "the partition table covers {} shards, not {shard_count}",
                table.shard_count()
            )));
        }
        let directory = &engines[0];
        let ranges = table.ranges();
        let recorded = directory.get(&keys.partition_table()).await?;
        let created = directory.get(&keys.shard_count()).await?.is_some();
        match &recorded {
            Some(recorded) if *recorded != ranges.as_bytes() => {
                return Err(StoreError::Engine(format!(
                    "this store was created with the storage partitions {}, not {ranges}: the \
                     table's shard ranges are fixed when the store is created",
                    String::from_utf8_lossy(recorded)
                )));
            }
            None if created => {
                return Err(StoreError::Engine(
                    "this store was created without storage partitions; adding partitions to \
                     an existing store is not supported: start without --storage-partitions"
                        .into(),
                ));
            }
            _ => {}
        }
        for (index, engine) in engines.iter().enumerate() {
            claim_partition(engine.as_ref(), &keys, index as u64, recorded.is_none()).await?;
        }
        if recorded.is_none() {
            let key = keys.partition_table();
            let mut batch = Batch::new();
            batch.fence(key.clone(), None).set(key, ranges.into_bytes());
            match directory.commit(batch).await {
                Ok(_) | Err(StoreError::FenceChanged { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        let router = Arc::new(PartitionedEngine::new(engines, table, keys.clone()));
        Self::open_on(router.clone(), keys, shard_count, Some(router)).await
    }

    async fn open_on(
        kv: Arc<dyn KvEngine>,
        keys: Keys,
        shard_count: u32,
        partitions: Option<Arc<PartitionedEngine>>,
    ) -> Result<Self, StoreError> {
        let key = keys.shard_count();
        // Nodes of a new cluster starting at once all find the store empty and race to create
        // it: the losers' fenced commits are refused, and they read what the winner wrote.
        let shard_count = loop {
            let stored = kv.get(&key).await?.map(|v| decode_u64(&v) as u32);
            match stored {
                Some(n) if n == shard_count => break n,
                Some(n) => {
                    return Err(StoreError::Engine(format!(
                        "this store was created with {n} shards and cannot be reopened with {shard_count}; \
                         the shard count is fixed when the data directory is created"
                    )));
                }
                None => {
                    if !(1..=MAX_SHARDS).contains(&shard_count) {
                        return Err(StoreError::Engine(format!(
                            "shard count must be between 1 and {MAX_SHARDS}, not {shard_count}"
                        )));
                    }
                    let mut batch = Batch::new();
                    batch
                        .fence(key.clone(), None)
                        .set(key.clone(), u64::from(shard_count).to_le_bytes().to_vec());
                    match kv.commit(batch).await {
                        Ok(_) => break shard_count,
                        Err(StoreError::FenceChanged { .. }) => continue,
                        Err(e) => return Err(e),
                    }
                }
            }
        };
        let store = Self {
            kv,
            keys,
            shard_count,
            partitions,
            idempotency: IdempotencyWindow::default(),
            earlier_idempotency: Arc::new(EarlierIdempotency::default()),
        };
        store.recheck_earlier_idempotency().await?;
        Ok(store)
    }

    /// The store with appends' idempotency records kept for `window` (7 days by default):
    /// a retry within it gets the first outcome (`crate::idempotency`).
    pub fn with_idempotency_window(mut self, window: Duration) -> Self {
        self.idempotency = IdempotencyWindow::new(window);
        self
    }

    /// The partition of `shard` (0 without partitions).
    pub fn partition_of_shard(&self, shard: u32) -> usize {
        self.partitions
            .as_ref()
            .map_or(0, |p| p.partition_of_shard(shard))
    }

    /// Commits `first`, then `then`: in one commit without partitions; with them, `first`
    /// (which lies in one partition), and once it committed, the independent mutations of
    /// `then` in each partition they lie in. For operations whose second step is idempotent
    /// and which stay correct when it is missing (decision 0005).
    async fn commit_then(&self, mut first: Batch, then: Batch) -> Result<(), StoreError> {
        match &self.partitions {
            None => {
                first.mutations.extend(then.mutations);
                self.kv.commit(first).await.map(drop)
            }
            Some(partitions) => {
                self.kv.commit(first).await?;
                partitions.commit_per_partition(then).await
            }
        }
    }

    /// Commits independent mutations (no fences): one commit, or one per partition.
    pub(crate) async fn commit_independent(&self, batch: Batch) -> Result<(), StoreError> {
        match &self.partitions {
            None => self.kv.commit(batch).await.map(drop),
            Some(partitions) => partitions.commit_per_partition(batch).await,
        }
    }

    /// Clears the records of `records` that `expired` (given key and value) lets go, a page per
    /// commit, key by key (the embedded engine would read a cleared range again to write its
    /// tombstones), at the [`CLEAR_PACE`]; returns how many.
    pub(crate) async fn clear_where(
        &self,
        mut records: Range<Vec<u8>>,
        expired: impl Fn(&[u8], &[u8]) -> bool,
    ) -> Result<u64, StoreError> {
        let mut cleared = 0;
        loop {
            let started = Instant::now();
            let page = self.kv.range(records.clone(), CLEAR_PAGE, false).await?;
            let mut batch = Batch::new();
            for (key, value) in &page {
                if expired(key, value) {
                    batch.clear(key.clone());
                }
            }
            if !batch.is_empty() {
                cleared += batch.mutations.len() as u64;
                self.commit_independent(batch).await?;
            }
            match page.last() {
                Some((last, _)) if page.len() == CLEAR_PAGE => {
                    records.start = bound_after(last);
                }
                _ => return Ok(cleared),
            }
            rest_after_clear_page(started).await;
        }
    }

    /// `items` cut into runs of consecutive items whose partition (by `partition`) is the
    /// same, in order: one run of all without partitions.
    pub(crate) fn runs_by_partition<'a, T>(
        &self,
        items: &'a [T],
        partition: impl Fn(&T) -> usize,
    ) -> Vec<&'a [T]> {
        if self.partitions.is_none() {
            return vec![items];
        }
        items
            .chunk_by(|a, b| partition(a) == partition(b))
            .collect()
    }

    pub fn shard_count(&self) -> u32 {
        self.shard_count
    }

    /// Why the engine accepts no more writes, if it has halted ([`KvEngine::halted`]).
    pub fn halted(&self) -> Option<String> {
        self.kv.halted()
    }

    /// What the engine's writer has done, if it has one ([`KvEngine::writer_totals`]).
    pub fn writer_totals(&self) -> Option<WriterTotals> {
        self.kv.writer_totals()
    }

    /// What the engine's cache of recent events has answered, if it keeps one
    /// ([`KvEngine::event_cache_totals`]).
    pub fn event_cache_totals(&self) -> Option<EventCacheTotals> {
        self.kv.event_cache_totals()
    }

    /// The process is about to stop ([`KvEngine::closing`]).
    pub fn closing(&self) {
        self.kv.closing();
    }

    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    pub(crate) fn kv(&self) -> &dyn KvEngine {
        self.kv.as_ref()
    }

    /// What one commit of the engine may hold.
    pub fn batch_limits(&self) -> BatchLimits {
        self.kv.limits()
    }

    /// The shard that orders `conversation_id`.
    pub fn shard_of(&self, conversation_id: &str) -> u32 {
        shard_of_hash(stable_hash(conversation_id.bytes()), self.shard_count)
    }

    /// Sequences `appends` (all of `lease.shard`) in one durable commit, fenced by the lease.
    /// Results are in the order of `appends`. Retries of earlier appends (same key) get the
    /// earlier outcome with `duplicate` set. Membership is decided here, at each append's place
    /// in its conversation's order: a sender who is not a member (any more) is refused, an add
    /// of users who already are members adds only the others (or is refused as no change).
    /// An append whose records are damaged is refused alone ([`AppendRefused::Damaged`]).
    /// A commit of unknown outcome is tried again; if no attempt is known to have landed or
    /// not, the error is [`StoreError::MaybeCommitted`] (or `FenceChanged`), whatever stopped
    /// the last attempt.
    pub async fn append(
        &self,
        lease: ShardLease,
        heads: &mut HeadCache,
        appends: &[Append],
    ) -> Result<Vec<AppendResult>, StoreError> {
        Ok(self.append_listed(lease, heads, appends).await?.results)
    }

    /// [`MessageStore::append`], listing the entries its commit added to the shard's outbox
    /// (for a fanout in the same process, which then need not read them back).
    pub async fn append_listed(
        &self,
        lease: ShardLease,
        heads: &mut HeadCache,
        appends: &[Append],
    ) -> Result<Appended, StoreError> {
        let ts_ms = now_ms();
        let ids: Vec<ServerMsgId> = appends.iter().map(|_| ServerMsgId::new(ts_ms)).collect();
        let mut attempt = 0;
        let mut unknown_outcome = false;
        loop {
            attempt += 1;
            match self.try_append(lease, heads, appends, &ids, ts_ms).await {
                Err(StoreError::MaybeCommitted) if attempt < MAX_COMMIT_ATTEMPTS => {
                    unknown_outcome = true;
                    // The heads may or may not have moved: read them again, and let the
                    // idempotency keys tell which appends landed.
                    for a in appends {
                        heads.heads.remove(&a.conversation_id);
                    }
                    tracing::warn!(
                        shard = lease.shard,
                        attempt,
                        "append outcome unknown, retrying"
                    );
                }
                Err(e) => {
                    for a in appends {
                        heads.heads.remove(&a.conversation_id);
                    }
                    // An earlier attempt may have landed: whatever stopped the retry (a read
                    // that failed, an overloaded engine), the outcome is still unknown, and
                    // said so its callers tell the readers of the outbox of entries no one
                    // lists and the client to retry. A fence that moved stays itself: the
                    // shard is lost either way.
                    if unknown_outcome && !matches!(e, StoreError::FenceChanged { .. }) {
                        tracing::warn!(
                            shard = lease.shard,
                            attempt,
                            error = %e,
                            "retrying an append of unknown outcome failed; its outcome stays unknown"
                        );
                        return Err(StoreError::MaybeCommitted);
                    }
                    return Err(e);
                }
                Ok((results, outbox)) => {
                    return Ok(Appended {
                        results,
                        // An attempt that landed unknown to us wrote entries not listed here.
                        outbox: (!unknown_outcome).then_some(outbox),
                    });
                }
            }
        }
    }

    /// Every key an earlier idempotency record of `append` in a batch at `ts_ms` may be
    /// under, where its record goes first (`crate::idempotency`).
    fn idempotency_keys(&self, append: &Append, ts_ms: u64) -> Vec<Vec<u8>> {
        let conv = append.conversation_id.as_str();
        let sender = &append.sender;
        let buckets = self.idempotency.lookups(ts_ms);
        let earlier = &self.earlier_idempotency;
        let legacy = earlier.before_buckets.load(Ordering::Relaxed);
        match &append.key {
            AppendKey::Client(id) => {
                let (user, device) = (&sender.user, &sender.device);
                let mut keys = self.keys.idempotency(&buckets, conv, user, device, id);
                if earlier.named.load(Ordering::Relaxed) {
                    let named = self
                        .keys
                        .named_idempotency(&buckets, conv, user, device, id);
                    keys.extend(named);
                }
                if legacy {
                    keys.push(self.keys.legacy_idempotency(conv, user, device, id));
                }
                keys
            }
            AppendKey::Server(key) => {
                let mut keys = self.keys.server_idempotency(&buckets, conv, key);
                if legacy {
                    keys.push(self.keys.legacy_server_idempotency(conv, key));
                }
                keys
            }
        }
    }

    /// The outcome of the append sequenced earlier with `append`'s key, if there is one (its
    /// idempotency record, looked up as an append batch now would): a retry the chat role
    /// answers without sequencing it (a former member's, `courier_chat`).
    pub async fn earlier_outcome(
        &self,
        append: &Append,
    ) -> Result<Option<AppendOutcome>, StoreError> {
        let keys = self.idempotency_keys(append, now_ms());
        let values = self.get_each(keys.clone()).await?;
        keys.iter()
            .zip(values)
            .find_map(|(key, value)| Some(earlier_outcome(key, &value?)))
            .transpose()
    }

    async fn try_append(
        &self,
        lease: ShardLease,
        heads: &mut HeadCache,
        appends: &[Append],
        server_msg_ids: &[ServerMsgId],
        ts_ms: u64,
    ) -> Result<(Vec<AppendResult>, Vec<ListedEntry>), StoreError> {
        let mut batch = Batch::new();
        // The outbox entries written, each under its key before the commit's stamp.
        let mut outbox = Vec::new();
        batch.fence(
            self.keys.shard_epoch(Duty::Sequencing, lease.shard),
            Some(lease.epoch.to_le_bytes().to_vec()),
        );
        let mut results: Vec<Option<AppendResult>> = vec![None; appends.len()];
        let mut new_heads: HashMap<&str, u64> = HashMap::new();
        let mut in_batch: HashMap<Vec<u8>, usize> = HashMap::new();
        // Direct conversations each sender has started, read once and counted on through the
        // batch's own creations (for `NewConversation::started_limit`).
        let mut started: HashMap<&str, u64> = HashMap::new();
        let mut members = BatchMembers::default();
        let mut outbox_rows = RowWriter::new(self.kv.limits().max_value_bytes);
        let lookups: Vec<Vec<Vec<u8>>> = appends
            .iter()
            .map(|a| self.idempotency_keys(a, ts_ms))
            .collect();
        // Where each record goes: the first of its lookups.
        let idempotency_keys: Vec<Vec<u8>> = lookups
            .iter()
            .map(|keys| keys.first().cloned())
            .collect::<Option<_>>()
            .ok_or_else(|| StoreError::Engine("an append without an idempotency bucket".into()))?;
        let mut earlier = self.prefetch(heads, &mut members, appends, lookups).await?;

        for (i, (append, idem_key)) in appends.iter().zip(idempotency_keys).enumerate() {
            let conv = append.conversation_id.as_str();
            if let Some(&first) = in_batch.get(&idem_key) {
                let mut outcome = results[first]
                    .clone()
                    .and_then(Result::ok)
                    .ok_or_else(|| corrupt(&idem_key, "batch order"))?;
                outcome.duplicate = true;
                results[i] = Some(Ok(outcome));
                continue;
            }
            if let Some(stored) = earlier[i].take() {
                match earlier_outcome(&idem_key, &stored) {
                    Ok(mut outcome) => {
                        // A retried commit that had in fact landed is ours, not a duplicate.
                        outcome.duplicate = outcome.server_msg_id != server_msg_ids[i].text();
                        results[i] = Some(Ok(outcome));
                    }
                    Err(error) => results[i] = Some(Err(damaged(lease, append, error)?)),
                }
                continue;
            }
            // What the append is decided on may be damaged (`StoreError::Corrupt`): then it
            // alone is refused, what it wrote into the batch undone, and the batch goes on.
            // Any other error fails the batch: a read that failed says nothing of one append.
            let mark = batch.mutations.len();
            members.begin_append();
            let starter = append.sender.user.as_str();
            let sequenced = async {
                let head = match new_heads.get(conv) {
                    Some(&h) => h,
                    None => self.cached_head(heads, conv).await?,
                };
                // A head is read from the store: at `u64::MAX` it is damage, with no seq after
                // it (refused, never wrapped round to 0).
                let seq = head.checked_add(1).ok_or_else(|| {
                    corrupt(
                        &self.keys.head(conv),
                        "the conversation's head is at its maximum",
                    )
                })?;
                let create = append.create.as_ref().filter(|_| head == 0);
                let mut counted = None;
                if let Some(create) = create
                    && create.started_limit > 0
                {
                    let count = match started.get(starter) {
                        Some(&count) => count,
                        None => self.direct_count(starter).await?,
                    };
                    if count >= create.started_limit {
                        return Ok(Err(AppendRefused::TooManyConversations));
                    }
                    counted = Some(count + 1);
                }
                let payload = match self.decide(&mut members, append, head, create).await? {
                    Ok(payload) => payload,
                    Err(refused) => return Ok(Err(refused)),
                };
                if let Some(create) = create {
                    self.write_new_conversation(
                        &mut batch,
                        &mut members,
                        conv,
                        create,
                        starter,
                        ts_ms,
                    );
                }
                self.write_effects(&mut batch, &mut members, append, &payload, seq, ts_ms)
                    .await?;
                Ok(Ok((seq, payload, counted)))
            }
            .await;
            let (seq, payload) = match sequenced {
                Ok(Ok((seq, payload, counted))) => {
                    if let Some(count) = counted {
                        started.insert(starter, count);
                    }
                    (seq, payload)
                }
                Ok(Err(refused)) => {
                    results[i] = Some(Err(refused));
                    continue;
                }
                Err(error) => {
                    let refused = damaged(lease, append, error)?;
                    batch.mutations.truncate(mark);
                    members.undo_append();
                    results[i] = Some(Err(refused));
                    continue;
                }
            };
            new_heads.insert(conv, seq);
            let server_msg_id = server_msg_ids[i].text();
            let event = Event {
                conversation_id: conv.to_owned(),
                seq,
                server_msg_id: server_msg_id.clone(),
                sender: append.sender.clone(),
                ts_ms,
                payload,
            };
            // Encoded without a copy of its strings: moved into the protobuf type and back.
            let stored = pb::Event::from(event);
            let encoded = stored.encode_to_vec();
            let event = Event::try_from(stored).map_err(|e| StoreError::Engine(e.to_string()))?;
            // The entry's order in the commit: a versionstamp has two bytes for it.
            let order = u16::try_from(outbox.len())
                .map_err(|_| StoreError::TooLarge("more than 65,536 appends in a batch".into()))?;
            let key = self.keys.outbox_entry(lease.shard, order);
            outbox_rows.push(&key, &encoded)?;
            outbox.push(ListedEntry {
                key,
                event,
                bytes: encoded.len(),
            });
            batch.set(self.keys.event(conv, seq), encoded);
            let record = IdempotencyRecord::new(seq, server_msg_ids[i]);
            batch.set(idem_key.clone(), record.encode_to_vec());
            in_batch.insert(idem_key, i);
            results[i] = Some(Ok(AppendOutcome {
                seq,
                server_msg_id,
                ts_ms,
                duplicate: false,
            }));
        }
        for (conv, head) in &new_heads {
            batch.set(self.keys.head(conv), head.to_le_bytes().to_vec());
        }
        for (key, row) in outbox_rows.finish() {
            batch.set_versionstamped_key(key, row);
        }
        if !batch.is_empty() {
            let stamp = self.kv.commit(batch).await?;
            for entry in &mut outbox {
                entry.key = complete_versionstamped_key(&entry.key, &stamp)?;
            }
        }
        for (conv, head) in new_heads {
            heads.insert(conv, head);
        }
        let results = results
            .into_iter()
            .map(|o| o.ok_or_else(|| StoreError::Engine("append without outcome".into())))
            .collect::<Result<_, _>>()?;
        Ok((results, outbox))
    }

    /// Reads at once what a batch of appends decides on (one call to a store node): each
    /// append's earlier idempotency record, the first found of its `lookups` (returned, in
    /// the order of `appends`), each sender's membership record (into `members`) and the
    /// heads `heads` does not hold (into `heads`).
    async fn prefetch(
        &self,
        heads: &mut HeadCache,
        members: &mut BatchMembers,
        appends: &[Append],
        lookups: Vec<Vec<Vec<u8>>>,
    ) -> Result<Vec<Option<Vec<u8>>>, StoreError> {
        let senders: BTreeSet<(&str, &str)> = appends
            .iter()
            .map(|a| (a.conversation_id.as_str(), a.sender.user.as_str()))
            .collect();
        let uncached: BTreeSet<&str> = appends
            .iter()
            .map(|a| a.conversation_id.as_str())
            .filter(|conv| !heads.heads.contains_key(*conv))
            .collect();
        let counts: Vec<usize> = lookups.iter().map(Vec::len).collect();
        let keys: Vec<Vec<u8>> = lookups
            .into_iter()
            .flatten()
            .chain(
                senders
                    .iter()
                    .map(|(conv, user)| self.keys.member(conv, user)),
            )
            .chain(uncached.iter().map(|conv| self.keys.head(conv)))
            .collect();
        let mut values = self.get_each(keys).await?.into_iter();
        let earlier = counts
            .into_iter()
            .map(|count| {
                values
                    .by_ref()
                    .take(count)
                    .fold(None, |found, value| found.or(value))
            })
            .collect();
        for ((conv, user), value) in senders.into_iter().zip(values.by_ref()) {
            // A record that does not decode is left out: read again by the appends that need
            // it, those alone are refused as damaged (`try_append`).
            if let Ok(record) = self.decode_member(conv, user, &value) {
                members
                    .records
                    .insert((conv.to_owned(), user.to_owned()), record);
            }
        }
        // A head that does not decode, or lies below the events held, is left out, as a
        // member record is: read again by the appends of its conversation, which alone are
        // refused as damaged.
        let stored = uncached.into_iter().zip(values).collect();
        for (conv, head) in self.checked_heads(stored).await? {
            if let Ok(head) = head {
                heads.insert(conv, head);
            }
        }
        Ok(earlier)
    }

    /// Whether `append` may be sequenced after `head`, decided on the membership of its
    /// conversation as of this point of the batch (or as `create` makes it); the payload to
    /// store (a membership change keeps only the users it changes).
    async fn decide(
        &self,
        members: &mut BatchMembers,
        append: &Append,
        head: u64,
        create: Option<&NewConversation>,
    ) -> Result<Result<EventPayload, AppendRefused>, StoreError> {
        let conv = append.conversation_id.as_str();
        let sender = match create {
            Some(create) => create
                .members
                .contains(&append.sender.user)
                .then(|| MemberRecord::joined_at(1, false)),
            None => self
                .batch_member(members, conv, &append.sender.user)
                .await?
                .filter(MemberRecord::is_member),
        };
        let admin = sender.as_ref().is_some_and(|s| s.admin);
        let decision = match &append.payload {
            EventPayload::GroupCreated { .. } if head > 0 => Err(AppendRefused::NoChange),
            EventPayload::GroupCreated { .. } => Ok(append.payload.clone()),
            _ if sender.is_none() => Err(AppendRefused::NotMember),
            // An unknown kind only a client reads (its nodes refuse one as damage): a
            // member's, were it ever appended, as a message is.
            EventPayload::Message { .. }
            | EventPayload::Delete { .. }
            | EventPayload::Unknown { .. } => Ok(append.payload.clone()),
            EventPayload::MemberAdded(_) if !admin => Err(AppendRefused::NotAdmin),
            EventPayload::MemberRemoved(change)
                if !admin && change.users.iter().any(|u| *u != append.sender.user) =>
            {
                Err(AppendRefused::NotAdmin)
            }
            EventPayload::MemberAdded(change) | EventPayload::MemberRemoved(change) => {
                let adding = matches!(append.payload, EventPayload::MemberAdded(_));
                let mut users = Vec::with_capacity(change.users.len());
                for user in &change.users {
                    let is_member = self
                        .batch_member(members, conv, user)
                        .await?
                        .is_some_and(|m| m.is_member());
                    if is_member != adding {
                        users.push(user.clone());
                    }
                }
                let change = MembershipChange::new(users);
                match (change.users.is_empty(), adding) {
                    (true, _) => Err(AppendRefused::NoChange),
                    (false, true) => Ok(EventPayload::MemberAdded(change)),
                    (false, false) => Ok(EventPayload::MemberRemoved(change)),
                }
            }
        };
        Ok(decision)
    }

    /// The membership record of `user` in `conv` as this batch has left it.
    async fn batch_member(
        &self,
        members: &mut BatchMembers,
        conv: &str,
        user: &str,
    ) -> Result<Option<MemberRecord>, StoreError> {
        let key = (conv.to_owned(), user.to_owned());
        if let Some(record) = members.records.get(&key) {
            return Ok(record.clone());
        }
        let record = self.member(conv, user).await?;
        members.records.insert(key, record.clone());
        Ok(record)
    }

    fn write_new_conversation(
        &self,
        batch: &mut Batch,
        members: &mut BatchMembers,
        conv: &str,
        create: &NewConversation,
        starter: &str,
        ts_ms: u64,
    ) {
        if create.kind == "direct" {
            batch.add(self.keys.direct_counter(starter, self.shard_of(conv)), 1);
        }
        let record = ConversationRecord {
            kind: create.kind.to_owned(),
            name: create.name.clone(),
            created_ms: ts_ms,
        };
        batch.set(self.keys.conversation(conv), record.encode_to_vec());
        // A retention pass looks at it from now on (`crate::trim_queue`).
        batch.set(self.keys.trim_due(ts_ms, conv), Vec::new());
        for user in &create.members {
            self.write_member(
                batch,
                members,
                conv,
                user,
                MemberRecord::joined_at(1, false),
            );
        }
    }

    /// Writes a member's record and its entry in the user's conversations, in this batch.
    fn write_member(
        &self,
        batch: &mut Batch,
        members: &mut BatchMembers,
        conv: &str,
        user: &str,
        record: MemberRecord,
    ) {
        let left_seq = (!record.is_member()).then(|| record.past.last().map_or(0, |p| p.through));
        batch.set(self.keys.member(conv, user), record.encode_to_vec());
        batch.set(
            self.keys.user_conversation(user, conv),
            encode_left_seq(left_seq),
        );
        members.write((conv.to_owned(), user.to_owned()), Some(record));
    }

    /// Users join (at `seq`) or leave (at `seq`, their `member_removed`) a group.
    async fn change_membership(
        &self,
        batch: &mut Batch,
        members: &mut BatchMembers,
        conv: &str,
        users: &[String],
        step: MembershipStep<'_>,
        seq: u64,
    ) -> Result<(), StoreError> {
        for user in users {
            let mut record = self
                .batch_member(members, conv, user)
                .await?
                .unwrap_or_default();
            match step {
                MembershipStep::Join { creator } => {
                    record.join(seq, creator == Some(user.as_str()));
                    batch.add(self.keys.group_counter(user, self.shard_of(conv)), 1);
                }
                MembershipStep::Leave => {
                    record.leave(seq);
                    batch.add(self.keys.group_counter(user, self.shard_of(conv)), -1);
                }
            }
            self.write_member(batch, members, conv, user, record);
        }
        Ok(())
    }

    /// What an event changes besides itself, in the same commit: membership follows its
    /// events, so membership and messages share one order; a delete tombstones its target.
    async fn write_effects(
        &self,
        batch: &mut Batch,
        members: &mut BatchMembers,
        append: &Append,
        payload: &EventPayload,
        seq: u64,
        ts_ms: u64,
    ) -> Result<(), StoreError> {
        let conv = append.conversation_id.as_str();
        match payload {
            EventPayload::Message {
                body: Some(courier_proto::Body::Media(media)),
                ..
            } => {
                // Members of the conversation may now download it, for as long as this
                // message is retained and not deleted (each message holds its own reference).
                batch.set(
                    self.keys.media_reference(&media.media_id, conv, seq),
                    Vec::new(),
                );
            }
            EventPayload::Message { .. } | EventPayload::Unknown { .. } => {}
            EventPayload::GroupCreated {
                name,
                members: founders,
            } => {
                let record = ConversationRecord {
                    kind: "group".into(),
                    name: name.clone(),
                    created_ms: ts_ms,
                };
                batch.set(self.keys.conversation(conv), record.encode_to_vec());
                // A retention pass looks at it from now on, as at a direct conversation's
                // creation (`crate::trim_queue`): else only the queue's next build, up to a
                // window later, would name it.
                batch.set(self.keys.trim_due(ts_ms, conv), Vec::new());
                let step = MembershipStep::Join {
                    creator: Some(&append.sender.user),
                };
                self.change_membership(batch, members, conv, founders, step, seq)
                    .await?;
            }
            EventPayload::MemberAdded(change) => {
                let step = MembershipStep::Join { creator: None };
                self.change_membership(batch, members, conv, &change.users, step, seq)
                    .await?;
            }
            EventPayload::MemberRemoved(change) => {
                let step = MembershipStep::Leave;
                self.change_membership(batch, members, conv, &change.users, step, seq)
                    .await?;
            }
            EventPayload::Delete { target_seq } => {
                let key = self.keys.event(conv, *target_seq);
                // The target may be in this very batch, not yet committed.
                let pending = batch.mutations.iter().rev().find_map(|m| match m {
                    Mutation::Set { key: k, value } if *k == key => Some(value.clone()),
                    _ => None,
                });
                let stored = match pending {
                    Some(value) => Some(value),
                    None => self.kv.get(&key).await?,
                };
                if let Some(value) = stored {
                    let mut target = self.held_at(&key, conv, decode_event(&key, &value)?)?;
                    if let EventPayload::Message { body, deleted, .. } = &mut target.payload {
                        if let Some(courier_proto::Body::Media(media)) = body.take() {
                            // Deleted for everyone: this message no longer shares it.
                            batch.clear(self.keys.media_reference(
                                &media.media_id,
                                conv,
                                *target_seq,
                            ));
                        }
                        *deleted = true;
                    }
                    batch.set(key, pb::Event::from(target).encode_to_vec());
                }
            }
        }
        Ok(())
    }

    /// One event of `conv`, if retained.
    pub async fn event(&self, conv: &str, seq: u64) -> Result<Option<Event>, StoreError> {
        let key = self.keys.event(conv, seq);
        match self.kv.get(&key).await? {
            Some(value) => Ok(Some(self.held_at(
                &key,
                conv,
                decode_event(&key, &value)?,
            )?)),
            None => Ok(None),
        }
    }

    /// `event`, read under `key` among `conv`'s events, if it is the event that key holds:
    /// one of another seq or conversation there is damage ([`StoreError::Corrupt`], which says
    /// neither, so that a client told of it learns nothing of another conversation). Taken as
    /// it was, a seq below its key's set a reader back in the conversation: a connection's
    /// catch-up and a retention pass read the same events again and again, for ever; an event
    /// of another conversation went to this one's members.
    fn held_at(&self, key: &[u8], conv: &str, event: Event) -> Result<Event, StoreError> {
        let seq = self.keys.event_parts(key).map(|(_, seq)| seq);
        if event.conversation_id != conv || seq != Some(event.seq) {
            return Err(corrupt(
                key,
                "the event stored there is not the one its key names (another seq or conversation)",
            ));
        }
        Ok(event)
    }

    /// The membership record of `user` in `conv`: current or former (see
    /// [`MemberRecord::is_member`]); `None` if the user never belonged to it.
    pub async fn member(&self, conv: &str, user: &str) -> Result<Option<MemberRecord>, StoreError> {
        self.record(self.keys.member(conv, user)).await
    }

    /// Every current and former member of `conv` with its record, in id order: who may read
    /// which seqs (see [`MemberRecord::sees`]).
    pub async fn member_records(
        &self,
        conv: &str,
    ) -> Result<Vec<(String, MemberRecord)>, StoreError> {
        self.member_rows(conv)
            .await?
            .iter()
            .map(|row| self.decode_member_row(row))
            .collect()
    }

    /// [`MessageStore::member_records`] without the records that do not decode (damage, or a
    /// bug), each logged at error: what the delivery roles (fanout, the push notifier) load,
    /// so that one damaged record costs its user the conversation's live delivery and push,
    /// not the whole shard. Failing on it, they retried its events for good: the shard
    /// delivered and pushed nothing more, and its sends were refused once its outbox passed
    /// `--outbox-lag-limit`. Leaving a user out gives no one anything to read.
    pub async fn readable_member_records(
        &self,
        conv: &str,
    ) -> Result<Vec<(String, MemberRecord)>, StoreError> {
        let rows = self.member_rows(conv).await?;
        let mut records = Vec::with_capacity(rows.len());
        for row in &rows {
            match self.decode_member_row(row) {
                Ok(decoded) => records.push(decoded),
                Err(error) => tracing::error!(
                    conversation = conv,
                    %error,
                    "a member record that does not decode: its user is left out of deliveries"
                ),
            }
        }
        Ok(records)
    }

    /// The rows of `conv`'s member records, in id order.
    async fn member_rows(&self, conv: &str) -> Result<Vec<KeyValue>, StoreError> {
        self.kv
            .range(self.keys.members(conv), usize::MAX, false)
            .await
    }

    fn decode_member_row(&self, (k, v): &KeyValue) -> Result<(String, MemberRecord), StoreError> {
        let user = self
            .keys
            .member_user(k)
            .ok_or_else(|| corrupt(k, "member key"))?;
        let record = MemberRecord::decode(v.as_slice()).map_err(|e| corrupt(k, e))?;
        Ok((user, record))
    }

    /// The current members of each of `convs`, in the order asked, with one read (one call on
    /// a store node, whatever the number of conversations).
    pub async fn members_of(&self, convs: &[&str]) -> Result<Vec<Vec<String>>, StoreError> {
        let ranges = convs.iter().map(|conv| self.keys.members(conv)).collect();
        self.ranges_each(ranges, usize::MAX, "conversations' members")
            .await?
            .iter()
            .map(|rows| {
                let records = rows.iter().map(|row| self.decode_member_row(row));
                Ok(current_members(records.collect::<Result<_, _>>()?))
            })
            .collect()
    }

    /// The number of groups `user` belongs to: the sum of its counters (one per shard, in
    /// the shard's partition) and of its count kept before them.
    pub async fn group_count(&self, user: &str) -> Result<u64, StoreError> {
        let (former, counters) = futures::future::try_join(
            self.kv.get(&self.keys.former_group_count(user)),
            self.counters_total(self.keys.group_counters(user)),
        )
        .await?;
        let former = former.as_deref().map_or(0, |v| decode_u64(v) as i64);
        Ok(former.saturating_add(counters).max(0) as u64)
    }

    /// The number of direct conversations `user` started (created by its first message): the
    /// sum of its counters, one per shard. Read only when a direct conversation is created, so
    /// creations that race in several shards may pass the limit by a few.
    pub async fn direct_count(&self, user: &str) -> Result<u64, StoreError> {
        let total = self.counters_total(self.keys.direct_counters(user)).await?;
        Ok(total.max(0) as u64)
    }

    /// The sum of the signed counters (i64 LE, atomic ADD) in `range`: a user's, one per shard.
    /// Saturating: a counter near its type's bounds is damage (or a hostile write), which
    /// costs its user a count at the bound, never a panic of the shard actor that reads it
    /// (a debug build's, failing every append queued on the shard) or a wrap to a count of 0
    /// that lifted the user's limit.
    async fn counters_total(&self, range: Range<Vec<u8>>) -> Result<i64, StoreError> {
        let counters = self.kv.range(range, usize::MAX, false).await?;
        Ok(counters
            .iter()
            .fold(0i64, |sum, (_, v)| sum.saturating_add(decode_u64(v) as i64)))
    }

    /// The lowest retained seq of `conv` (1 until retention clears events); a floor of the
    /// wrong length is damage ([`StoreError::Corrupt`], [`stored_seq`]).
    pub async fn floor(&self, conv: &str) -> Result<u64, StoreError> {
        let value = self.kv.get(&self.keys.floor(conv)).await?;
        self.decode_floor(conv, value.as_deref())
    }

    /// Clears the events of `conv` below `new_floor`, and the references of those of its
    /// messages that share media (`media`, read by the caller with the events), fenced by the
    /// shard's lease like every other shard write. Returns how many seqs were cleared.
    ///
    /// The references go in the commit that moves the floor (they live in the conversation's
    /// partition, decision 0005): a later trim starts above the floor and never sees those
    /// messages again, so a reference left behind would keep its media from the sweeper for
    /// good.
    pub async fn trim(
        &self,
        lease: ShardLease,
        conv: &str,
        new_floor: u64,
        media: &[MediaReference],
    ) -> Result<u64, StoreError> {
        let floor = self.floor(conv).await?;
        if new_floor <= floor {
            return Ok(0);
        }
        let mut batch = Batch::new();
        batch
            .fence(
                self.keys.shard_epoch(Duty::Sequencing, lease.shard),
                Some(lease.epoch.to_le_bytes().to_vec()),
            )
            .clear_range(self.keys.events(conv, floor, new_floor))
            .set(self.keys.floor(conv), new_floor.to_le_bytes().to_vec());
        for reference in media {
            batch.clear(
                self.keys
                    .media_reference(&reference.media_id, conv, reference.seq),
            );
        }
        self.kv.commit(batch).await?;
        Ok(new_floor - floor)
    }

    /// A page of every conversation's id, in id order (for background jobs): up to `limit`
    /// keys read from the first, or after `after`, the key the page before ended on
    /// ([`ConversationIds::last_key`]). A key that does not parse (damage, or a bug) is passed
    /// over, logged at error, and the pages go on past it: failing on it, every pass of a job
    /// that lists them all (retention's queue) failed, and retention stopped for good.
    pub async fn conversation_ids(
        &self,
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<ConversationIds, StoreError> {
        let mut range = self.keys.conversations();
        if let Some(after) = after {
            range.start = [after, &[0]].concat();
        }
        let rows = self.kv.range(range, limit, false).await?;
        let ids = parsed_keys(&rows, "conversation", |k| self.keys.conversation_id(k));
        Ok(ConversationIds {
            ids: ids.map(|(id, _)| id).collect(),
            last_key: rows.last().map(|(k, _)| k.clone()),
        })
    }

    /// A device of `user`.
    pub async fn device(
        &self,
        user: &str,
        device: &str,
    ) -> Result<Option<DeviceRecord>, StoreError> {
        self.record(self.keys.device(user, device)).await
    }

    /// Every device of `user`, in id order.
    pub async fn devices(&self, user: &str) -> Result<Vec<(String, DeviceRecord)>, StoreError> {
        let rows = self
            .kv
            .range(self.keys.devices(user), usize::MAX, false)
            .await?;
        Ok(self.decode_devices(&rows))
    }

    /// The devices of each of `users`, in the order asked, with one read (one call on a store
    /// node).
    pub async fn devices_of(
        &self,
        users: &[&str],
    ) -> Result<Vec<Vec<(String, DeviceRecord)>>, StoreError> {
        let ranges = users.iter().map(|user| self.keys.devices(user)).collect();
        Ok(self
            .ranges_each(ranges, usize::MAX, "users' devices")
            .await?
            .iter()
            .map(|rows| self.decode_devices(rows))
            .collect())
    }

    /// The device records of `rows`, each with its id. A record that does not decode (damage,
    /// or a bug) is passed over, logged at error with its key, as a key that does not parse is
    /// ([`parsed_keys`]): failing on it, every read of the user's devices failed (their list,
    /// a new link's count of them, retention's wait for them in each of the user's
    /// conversations, the push notifier's look-up of them). That device cannot connect (its
    /// own record is read whole), so it is not waited for, listed or pushed to.
    fn decode_devices(&self, rows: &[KeyValue]) -> Vec<(String, DeviceRecord)> {
        parsed_keys(rows, "device", |k| self.keys.device_id(k))
            .filter_map(|(device, (key, v))| match DeviceRecord::decode(v.as_slice()) {
                Ok(record) => Some((device, record)),
                Err(error) => {
                    tracing::error!(
                        key = ?key,
                        %error,
                        "a device record that does not decode is passed over: the user's other devices are read"
                    );
                    None
                }
            })
            .collect()
    }

    /// Changes a device record by a read-modify-write fenced on the value read, so that no
    /// concurrent change is lost (a reconnect's last-seen cannot undo an unlink). `change` gets
    /// the current record (`None`: there is none) and returns the new one, or `None` to leave it;
    /// after a concurrent change it runs again on the new value. Returns the record `change` was
    /// last given. An unknown commit outcome is returned as is.
    pub async fn update_device(
        &self,
        user: &str,
        device: &str,
        change: impl Fn(Option<&DeviceRecord>) -> Option<DeviceRecord>,
    ) -> Result<Option<DeviceRecord>, StoreError> {
        self.update_device_clearing(user, device, change, &[], DeviceChange::Update)
            .await
    }

    /// [`Self::update_device`] for an app's registration of its push token, which indexes the
    /// token even when the device had it already (a registration made before the index of
    /// tokens, `crate::push_tokens`, joins it when its app registers again).
    pub async fn register_push_token(
        &self,
        user: &str,
        device: &str,
        change: impl Fn(Option<&DeviceRecord>) -> Option<DeviceRecord>,
    ) -> Result<Option<DeviceRecord>, StoreError> {
        self.update_device_clearing(user, device, change, &[], DeviceChange::PushRegistration)
            .await
    }

    /// [`Self::update_device`] for a change whose loss only repeats work: the device's
    /// activity (last seen, newest token), which its next connection records again. The commit
    /// is [`Durability::Deferred`], so that the records of a reconnect storm share the fsync
    /// of the next synced commit instead of paying for their own.
    pub async fn record_device_activity(
        &self,
        user: &str,
        device: &str,
        change: impl Fn(Option<&DeviceRecord>) -> Option<DeviceRecord>,
    ) -> Result<Option<DeviceRecord>, StoreError> {
        self.update_device_clearing(user, device, change, &[], DeviceChange::Activity)
            .await
    }

    /// [`Self::record_device_activity`] for a change that may link the device (a token's
    /// admission, a connection's record): one that would link it (new, or linked again) while
    /// its user has `max_devices` linked devices already (0: no limit) is refused, nothing
    /// written. A device already linked is never refused, whatever the limit. Race-safe once
    /// the user has a device ([`Self::link_guard`]): of two new devices at once at the limit
    /// one is refused.
    pub async fn record_device_link(
        &self,
        user: &str,
        device: &str,
        change: impl Fn(Option<&DeviceRecord>) -> Option<DeviceRecord>,
        max_devices: u64,
    ) -> Result<Result<Option<DeviceRecord>, TooManyDevices>, StoreError> {
        let (current, refused) = self
            .update_device_limited(
                user,
                device,
                change,
                &[],
                DeviceChange::Activity,
                max_devices,
            )
            .await?;
        Ok(match refused {
            Some(refused) => Err(refused),
            None => Ok(current),
        })
    }

    /// The linked devices of `user` other than `device`, with their records.
    async fn linked_devices(
        &self,
        user: &str,
        device: &str,
    ) -> Result<Vec<(String, DeviceRecord)>, StoreError> {
        Ok(self
            .devices(user)
            .await?
            .into_iter()
            .filter(|(id, record)| id != device && record.is_linked())
            .collect())
    }

    /// Whether linking `device` (not linked now) would pass `max_devices` (0: no limit): the
    /// user's other linked devices are that many already. Reads every device record of the
    /// user, as only a new link does.
    pub async fn device_limit_reached(
        &self,
        user: &str,
        device: &str,
        max_devices: u64,
    ) -> Result<Option<TooManyDevices>, StoreError> {
        if max_devices == 0 {
            return Ok(None);
        }
        let linked = self.linked_devices(user, device).await?;
        if (linked.len() as u64) < max_devices {
            return Ok(None);
        }
        let least_recent = linked
            .iter()
            .min_by_key(|(_, record)| record.last_seen_ms)
            .map(|(id, _)| id.clone())
            .unwrap_or_default();
        Ok(Some(TooManyDevices {
            max: max_devices,
            least_recent,
        }))
    }

    /// What a link of `device` under a limit of `max_devices` (0: none) takes: refused when
    /// the user has that many other linked devices; else the count of the user's links
    /// ([`Keys::device_links`]) to fence on and add to, read before the devices are counted
    /// (a link committed after the read changes it, and fails this one's fence). None for a
    /// user with no linked device under a limit above one: its first device, most users' only
    /// one, takes no counter, which would be one more key in memory for every new user until
    /// the memtable's flush (`docs/benchmarks.md`, "Idle connection memory"). So the count is
    /// exact once a user has a device; devices of a user with none, linking in the same
    /// instant, may pass a limit below their number.
    async fn link_guard(
        &self,
        user: &str,
        device: &str,
        max_devices: u64,
    ) -> Result<Result<Option<Option<Vec<u8>>>, TooManyDevices>, StoreError> {
        if max_devices == 0 {
            return Ok(Ok(None));
        }
        if max_devices > 1 && self.linked_devices(user, device).await?.is_empty() {
            return Ok(Ok(None));
        }
        let links_made = self.kv.get(&self.keys.device_links(user)).await?;
        match self.device_limit_reached(user, device, max_devices).await? {
            Some(refused) => Ok(Err(refused)),
            None => Ok(Ok(Some(links_made))),
        }
    }

    /// [`Self::update_device`], also clearing the keys `clear` in the same commit when it
    /// writes, and the device's delivered cursors when the change links it again. A change
    /// that begins or ends the device's push registration is counted in the same commit
    /// ([`Self::push_registration_changes`]), and one of its push token keeps the index of
    /// tokens in step ([`Self::index_push_token`]).
    async fn update_device_clearing(
        &self,
        user: &str,
        device: &str,
        change: impl Fn(Option<&DeviceRecord>) -> Option<DeviceRecord>,
        clear: &[Vec<u8>],
        change_kind: DeviceChange,
    ) -> Result<Option<DeviceRecord>, StoreError> {
        let (current, _) = self
            .update_device_limited(user, device, change, clear, change_kind, 0)
            .await?;
        Ok(current)
    }

    /// [`Self::update_device_clearing`], refusing a change that links the device while its
    /// user has `max_devices` linked devices (0: no limit): then nothing is written and the
    /// refusal is returned with the record read. A limited link of a user with a device
    /// fences on the user's count of links ([`Keys::device_links`]) as read before counting
    /// the devices, and adds to it in its commit ([`Self::link_guard`]): a link committed
    /// meanwhile changed it, and this one runs again and counts that device too.
    async fn update_device_limited(
        &self,
        user: &str,
        device: &str,
        change: impl Fn(Option<&DeviceRecord>) -> Option<DeviceRecord>,
        clear: &[Vec<u8>],
        change_kind: DeviceChange,
        max_devices: u64,
    ) -> Result<(Option<DeviceRecord>, Option<TooManyDevices>), StoreError> {
        let durability = match change_kind {
            DeviceChange::Activity => Durability::Deferred,
            DeviceChange::Update | DeviceChange::PushRegistration => Durability::Synced,
        };
        let key = self.keys.device(user, device);
        let mut attempt = 1;
        loop {
            let stored = self.kv.get(&key).await?;
            let current = stored
                .as_deref()
                .map(DeviceRecord::decode)
                .transpose()
                .map_err(|e| corrupt(&key, e))?;
            let Some(next) = change(current.as_ref()) else {
                return Ok((current, None));
            };
            let links = !current.as_ref().is_some_and(DeviceRecord::is_linked) && next.is_linked();
            let links_made = match links {
                true => match self.link_guard(user, device, max_devices).await? {
                    Ok(fence) => fence,
                    Err(refused) => return Ok((current, Some(refused))),
                },
                false => None,
            };
            // A device linked again starts from the beginning of retained history, as one
            // never seen: an ack that raced its unlink (a connection not closed yet, or on a
            // gateway the unlink did not reach) may have left cursors the unlink did not read,
            // which would make it skip what the old link acknowledged.
            let relinked = current.as_ref().is_some_and(|r| !r.is_linked()) && next.is_linked();
            let left = if relinked {
                self.cursors_left(user, device).await?
            } else {
                Vec::new()
            };
            let mut batch = Batch::new();
            batch.durability = durability;
            batch
                .fence(key.clone(), stored)
                .set(key.clone(), next.encode_to_vec());
            if let Some(links_made) = links_made {
                batch
                    .fence(self.keys.device_links(user), links_made)
                    .add(self.keys.device_links(user), 1);
            }
            if current.as_ref().is_some_and(DeviceRecord::takes_push) != next.takes_push() {
                let slot = push_registration_slot(user);
                batch
                    .add(self.keys.push_registration_changes(), 1)
                    .add(self.keys.push_registration_changes_in(slot), 1);
            }
            let registering = change_kind == DeviceChange::PushRegistration;
            self.index_push_token(
                &mut batch,
                (user, device),
                current.as_ref(),
                &next,
                registering,
            )
            .await?;
            for key in clear.iter().chain(&left) {
                batch.clear(key.clone());
            }
            match self.kv.commit(batch).await {
                Ok(_) => return Ok((current, None)),
                Err(StoreError::FenceChanged { .. }) if attempt < DEVICE_UPDATE_ATTEMPTS => {
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// How many times a device's push registration began or ended (the device became one
    /// the notifier may notify, [`DeviceRecord::takes_push`], or stopped being one), in all
    /// and per slot of users, with one read: while a slot's count stays put, the devices of
    /// its users that take push are those read before. Given counts read `since`, the total
    /// is read first, and while it stays put (every change counts in it) those are returned
    /// without reading the slots.
    pub async fn push_registration_counts(
        &self,
        since: Option<&PushRegistrationCounts>,
    ) -> Result<PushRegistrationCounts, StoreError> {
        if let Some(since) = since {
            let total = self.kv.get(&self.keys.push_registration_changes()).await?;
            if total.as_deref().map_or(0, decode_u64) == since.total {
                return Ok(since.clone());
            }
        }
        let keys = std::iter::once(self.keys.push_registration_changes())
            .chain(
                (0..PUSH_REGISTRATION_SLOTS)
                    .map(|slot| self.keys.push_registration_changes_in(slot)),
            )
            .collect();
        let counts = self.kv.get_many(keys).await?;
        let mut counts = counts
            .iter()
            .map(|value| value.as_deref().map_or(0, decode_u64));
        Ok(PushRegistrationCounts {
            total: counts.next().unwrap_or(0),
            slots: counts.collect(),
        })
    }

    /// Unlinks a linked device: tokens issued until now (and any it has used) are refused,
    /// its push registration and its delivered cursors are dropped. Returns whether it was
    /// linked (otherwise nothing changes).
    ///
    /// A device has a cursor per conversation it was delivered in, so a user in many
    /// conversations would hold the store's writer in one commit clearing them all (the
    /// embedded engine reads each key of a cleared range to write its tombstone): they go a
    /// page per commit at the clean-up's pace ([`Self::clear_where`]) while the device stays
    /// linked, then the unlink commits with those acknowledged meanwhile, read again. An
    /// unlink cut midway leaves the device linked with fewer cursors (its next connection
    /// catches those conversations up again) and is retried whole.
    pub async fn unlink_device(
        &self,
        user: &str,
        device: &str,
        now_ms: u64,
    ) -> Result<bool, StoreError> {
        if !self
            .device(user, device)
            .await?
            .is_some_and(|r| r.is_linked())
        {
            return Ok(false);
        }
        let left = self.cursors_left(user, device).await?;
        let unlink = |record: Option<&DeviceRecord>| {
            let record = record.filter(|r| r.is_linked())?;
            Some(DeviceRecord {
                unlinked_ms: (now_ms.saturating_add(record.issuer_lead_ms))
                    .max(record.token_issued_ms)
                    .max(record.unlinked_ms),
                push_provider: String::new(),
                push_token: String::new(),
                ..record.clone()
            })
        };
        let before = self
            .update_device_clearing(user, device, unlink, &left, DeviceChange::Update)
            .await?;
        Ok(before.is_some_and(|r| r.is_linked()))
    }

    /// The keys of the device's delivered cursors, for a commit that clears them with a change
    /// of its record: past a page of them, pages are cleared first, one per commit at the
    /// clean-up's pace ([`Self::clear_where`]), and the keys of the last page returned.
    async fn cursors_left(&self, user: &str, device: &str) -> Result<Vec<Vec<u8>>, StoreError> {
        let cursors = self.keys.cursors(user, device);
        loop {
            let left = self.kv.range(cursors.clone(), CLEAR_PAGE, false).await?;
            if left.len() < CLEAR_PAGE {
                return Ok(left.into_iter().map(|(key, _)| key).collect());
            }
            self.clear_where(cursors.clone(), |_, _| true).await?;
        }
    }

    /// The key media ids are made with (`courier_media`), made once for the whole store at its
    /// first use: random, [`MEDIA_ID_KEY_BYTES`] long, the same for every node that shares the
    /// store and kept by its backups. The first of several nodes making it at once keeps it.
    pub async fn media_id_key(&self) -> Result<[u8; MEDIA_ID_KEY_BYTES], StoreError> {
        let key = self.keys.media_id_key();
        for _ in 0..MAX_COMMIT_ATTEMPTS {
            if let Some(stored) = self.kv.get(&key).await? {
                return <[u8; MEDIA_ID_KEY_BYTES]>::try_from(stored.as_slice())
                    .map_err(|_| corrupt(&key, "media id key is not 32 bytes"));
            }
            let made: [u8; MEDIA_ID_KEY_BYTES] = rand::random();
            let mut batch = Batch::new();
            batch
                .fence(key.clone(), None)
                .set(key.clone(), made.to_vec());
            match self.kv.commit(batch).await {
                // Made by another node meanwhile, or perhaps by this one: read again.
                Err(StoreError::FenceChanged { .. } | StoreError::MaybeCommitted) => continue,
                other => return other.map(|_| made),
            }
        }
        Err(StoreError::Overloaded(
            "the media id key kept changing; retry".into(),
        ))
    }

    /// Records an upload (its bytes are already stored) and charges its size to its owner,
    /// unless that would pass `quota` bytes (0: no quota). The same record again only moves its
    /// time. Fenced on the record and the owner's usage, so concurrent uploads cannot pass the
    /// quota together.
    pub async fn put_media(
        &self,
        id: &str,
        record: &MediaRecord,
        quota: u64,
    ) -> Result<MediaAdmission, StoreError> {
        let key = self.keys.media(id);
        let usage_key = self.keys.media_usage(&record.owner);
        for _ in 0..MAX_COMMIT_ATTEMPTS {
            let stored = self.kv.get(&key).await?;
            let mut batch = Batch::new();
            batch
                .fence(key.clone(), stored.clone())
                .set(key.clone(), record.encode_to_vec());
            if stored.is_none() {
                let usage = self.kv.get(&usage_key).await?;
                let used = usage.as_deref().map_or(0, decode_usage);
                let total = used.saturating_add(record.size);
                if quota > 0 && total > quota {
                    return Ok(MediaAdmission::OverQuota { used });
                }
                batch
                    .fence(usage_key.clone(), usage)
                    .set(usage_key.clone(), total.to_le_bytes().to_vec())
                    .set(self.keys.blob_user(&record.sha256, id), Vec::new());
            }
            match self.kv.commit(batch).await {
                Err(StoreError::FenceChanged { .. }) => continue,
                other => return other.map(|_| MediaAdmission::Recorded),
            }
        }
        Err(StoreError::Overloaded(format!(
            "media record {id} kept changing; retry"
        )))
    }

    pub async fn media(&self, id: &str) -> Result<Option<MediaRecord>, StoreError> {
        self.record(self.keys.media(id)).await
    }

    /// Bytes of the media records `user` owns (what the upload quota counts).
    pub async fn media_usage(&self, user: &str) -> Result<u64, StoreError> {
        let value = self.kv.get(&self.keys.media_usage(user)).await?;
        Ok(value.as_deref().map_or(0, decode_usage))
    }

    /// Whether `range` holds a key (one row read).
    pub(crate) async fn holds_any(&self, range: Range<Vec<u8>>) -> Result<bool, StoreError> {
        Ok(!self.kv.range(range, 1, false).await?.is_empty())
    }

    /// Whether any media record keeps the bytes `sha256`.
    pub async fn blob_in_use(&self, sha256: &str) -> Result<bool, StoreError> {
        self.holds_any(self.keys.blob_users(sha256)).await
    }

    /// The retained, undeleted messages referencing media `id`, as `(conv, seq)` in order.
    pub async fn media_references(&self, id: &str) -> Result<Vec<(String, u64)>, StoreError> {
        let rows = self
            .kv
            .range(self.keys.media_references(id), usize::MAX, false)
            .await?;
        rows.iter()
            .map(|(k, _)| {
                self.keys
                    .media_reference_parts(k)
                    .ok_or_else(|| corrupt(k, "reference key"))
            })
            .collect()
    }

    /// Whether a retained, undeleted message references media `id`: each reference is read
    /// with its message (two rows while the first one holds). A reference whose message is
    /// gone, or no longer shares the media, was left behind: by a trim of a version that
    /// cleared references in a commit of its own after the floor's (a failed one was never
    /// retried), or by a sequencer node of that version during an upgrade (it ignores the
    /// references a newer retention sends with a trim). It is cleared as it is found, so that
    /// it keeps the media from the sweeper no longer; no commit can make it a message's again
    /// (a seq is never sequenced twice, nor a deletion undone).
    pub async fn is_media_referenced(&self, id: &str) -> Result<bool, StoreError> {
        let references = self.keys.media_references(id);
        let mut from = references.start;
        loop {
            let range = from..references.end.clone();
            let Some((key, _)) = self.kv.range(range, 1, false).await?.pop() else {
                return Ok(false);
            };
            let (conv, seq) = self
                .keys
                .media_reference_parts(&key)
                .ok_or_else(|| corrupt(&key, "reference key"))?;
            let shares = self.event(&conv, seq).await?.is_some_and(|event| {
                matches!(
                    event.payload,
                    EventPayload::Message {
                        body: Some(courier_proto::Body::Media(media)),
                        ..
                    } if media.media_id == id
                )
            });
            if shares {
                return Ok(true);
            }
            let mut left = Batch::new();
            left.clear(key.clone());
            self.kv.commit(left).await?;
            from = bound_after(&key);
        }
    }

    /// The references to media `id` from conversations `user` is or was a member of, as
    /// `(conv, seq)` in order. A leapfrog over the media's references and the user's list of
    /// conversations, both in conversation order, a row a read: it reads about twice the
    /// shorter of the two, so media sent to 100,000 conversations is checked for a member of
    /// a few in a few reads, and for a stranger in as many as the stranger has conversations.
    pub async fn media_references_for(
        &self,
        id: &str,
        user: &str,
    ) -> Result<Vec<(String, u64)>, StoreError> {
        let references = self.keys.media_references(id);
        let conversations = self.keys.user_conversations(user);
        let first = |rows: Vec<KeyValue>| rows.into_iter().next().map(|(key, _)| key);
        let mut found = Vec::new();
        let mut from = references.start;
        loop {
            let range = from..references.end.clone();
            let Some(key) = first(self.kv.range(range, 1, false).await?) else {
                return Ok(found);
            };
            let (conv, _) = self
                .keys
                .media_reference_parts(&key)
                .ok_or_else(|| corrupt(&key, "reference key"))?;
            let range = self.keys.user_conversation(user, &conv)..conversations.end.clone();
            let Some(key) = first(self.kv.range(range, 1, false).await?) else {
                return Ok(found);
            };
            let theirs = self
                .keys
                .user_conversation_id(&key)
                .ok_or_else(|| corrupt(&key, "user conversation key"))?;
            let next = self.keys.media_references_in(id, &theirs);
            if theirs != conv {
                from = next.start;
                continue;
            }
            for (key, _) in self.kv.range(next.clone(), usize::MAX, false).await? {
                found.push(
                    self.keys
                        .media_reference_parts(&key)
                        .ok_or_else(|| corrupt(&key, "reference key"))?,
                );
            }
            from = next.end;
        }
    }

    /// Marks media record `id`, as a send read it (`record`), shared at `now_ms`, fenced on that
    /// record: `FenceChanged` when it changed meanwhile (uploaded or shared again, or forgotten
    /// by the sweeper: then it stays forgotten). The sweeper forgets only a record it read as
    /// unused for its TTL and unreferenced, fenced on what it read: a sweeper that read the
    /// record before this commit fails to forget it, and one that reads it after leaves it for
    /// a TTL, long enough for the send's reference to commit.
    pub async fn share_media(
        &self,
        id: &str,
        record: &MediaRecord,
        now_ms: u64,
    ) -> Result<(), StoreError> {
        let key = self.keys.media(id);
        let shared = MediaRecord {
            shared_ms: now_ms,
            ..record.clone()
        };
        let mut batch = Batch::new();
        batch
            .fence(key.clone(), Some(record.encode_to_vec()))
            .set(key, shared.encode_to_vec());
        self.kv.commit(batch).await.map(drop)
    }

    /// Forgets media record `id`, as it was read (`record`), and gives its size back to its
    /// owner's quota, and clears its references. `FenceChanged` when it was uploaded or shared
    /// again meanwhile (nothing changed). The record is noted as forgotten in the same commit
    /// ([`MessageStore::forgotten_media`]): the caller deletes the bytes once no record keeps
    /// them ([`MessageStore::blob_in_use`]), then clears the note
    /// ([`MessageStore::settled_forgotten_media`]), so that bytes a failure or a crash left
    /// after the record went are still found.
    pub async fn forget_media(&self, id: &str, record: &MediaRecord) -> Result<(), StoreError> {
        let key = self.keys.media(id);
        let mut batch = Batch::new();
        batch
            .fence(key.clone(), Some(record.encode_to_vec()))
            .clear(key)
            .set(self.keys.forgotten_media(id), record.encode_to_vec())
            .clear(self.keys.blob_user(&record.sha256, id))
            .add(
                self.keys.media_usage(&record.owner),
                -(record.size.min(i64::MAX as u64) as i64),
            );
        // The references live with their conversations: with partitions they are cleared
        // once the record is gone (which alone decides access), and any a crash leaves point
        // at retained messages of this very media (decision 0005).
        let mut references = Batch::new();
        references.clear_range(self.keys.media_references(id));
        self.commit_then(batch, references).await
    }

    /// Media records forgotten ([`MessageStore::forget_media`]) whose bytes are not settled
    /// yet, as `(id, record)` in id order, a page of `limit` after `after`.
    pub async fn forgotten_media(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(String, MediaRecord)>, StoreError> {
        let mut range = self.keys.all_forgotten_media();
        if let Some(after) = after {
            range.start = bound_after(&self.keys.forgotten_media(after));
        }
        let rows = self.kv.range(range, limit, false).await?;
        rows.into_iter()
            .map(|(k, v)| {
                let id = self
                    .keys
                    .media_id(&k)
                    .ok_or_else(|| corrupt(&k, "media key"))?;
                let record = MediaRecord::decode(v.as_slice()).map_err(|e| corrupt(&k, e))?;
                Ok((id, record))
            })
            .collect()
    }

    /// Clears the note that media record `id` was forgotten as `record`, once its bytes are
    /// settled; a note of a later forget of the same id stays.
    pub async fn settled_forgotten_media(
        &self,
        id: &str,
        record: &MediaRecord,
    ) -> Result<(), StoreError> {
        let key = self.keys.forgotten_media(id);
        let mut batch = Batch::new();
        batch
            .fence(key.clone(), Some(record.encode_to_vec()))
            .clear(key);
        match self.kv.commit(batch).await {
            Ok(_) | Err(StoreError::FenceChanged { .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Media ids in order, a page of `limit` after `after` (for the sweeper).
    pub async fn media_ids(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<String>, StoreError> {
        let mut range = self.keys.all_media();
        if let Some(after) = after {
            let mut start = self.keys.media(after);
            start.push(0);
            range.start = start;
        }
        let rows = self.kv.range(range, limit, false).await?;
        rows.iter()
            .map(|(k, _)| self.keys.media_id(k).ok_or_else(|| corrupt(k, "media key")))
            .collect()
    }

    /// Pending notifications, in key order, a page of `limit` after `after`. One that does not
    /// decode is returned as its error, in its place, so that the caller can pass over it
    /// ([`Self::clear_undecodable_pending_push`]) and read on: failing the page held back every
    /// notification after it for good.
    pub async fn pending_pushes(
        &self,
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, Result<PendingPush, StoreError>)>, StoreError> {
        let mut range = self.keys.pending_pushes();
        if let Some(after) = after {
            let mut start = after.to_vec();
            start.push(0);
            range.start = start;
        }
        let rows = self.kv.range(range, limit, false).await?;
        Ok(rows
            .into_iter()
            .map(|(k, v)| {
                let pending = PendingPush::decode(v.as_slice()).map_err(|e| corrupt(&k, e));
                (k, pending)
            })
            .collect())
    }

    /// Clears the pending notification at `key` if it still does not decode (one written since
    /// stays), fenced on what was read.
    pub async fn clear_undecodable_pending_push(&self, key: &[u8]) -> Result<(), StoreError> {
        let Some(stored) = self.kv.get(key).await? else {
            return Ok(());
        };
        if PendingPush::decode(stored.as_slice()).is_ok() {
            return Ok(());
        }
        let mut batch = Batch::new();
        batch.fence(key.to_vec(), Some(stored)).clear(key.to_vec());
        match self.kv.commit(batch).await {
            Ok(_) | Err(StoreError::FenceChanged { .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }

    pub async fn pending_push(
        &self,
        user: &str,
        device: &str,
        conv: &str,
    ) -> Result<Option<PendingPush>, StoreError> {
        self.record(self.keys.pending_push(user, device, conv))
            .await
    }

    /// For each of `devices` (user, device, conversation): its delivered cursor in the
    /// conversation (0 when it has none) and its pending notification, both keys of every
    /// device in one read.
    pub async fn push_states(
        &self,
        devices: &[(String, String, String)],
    ) -> Result<Vec<(u64, Option<PendingPush>)>, StoreError> {
        let keys: Vec<Vec<u8>> = devices
            .iter()
            .flat_map(|(user, device, conv)| {
                [
                    self.keys.cursor(user, device, conv),
                    self.keys.pending_push(user, device, conv),
                ]
            })
            .collect();
        let values = self.get_each(keys).await?;
        values
            .chunks(2)
            .zip(devices)
            .map(|(pair, (user, device, conv))| {
                let cursor = pair[0].as_deref().map_or(0, decode_u64);
                let pending = pair[1]
                    .as_deref()
                    .map(PendingPush::decode)
                    .transpose()
                    .map_err(|e| corrupt(&self.keys.pending_push(user, device, conv), e))?;
                Ok((cursor, pending))
            })
            .collect()
    }

    /// Records what the push notifier read of each shard's outbox: the pending
    /// notifications of those messages, then each shard's new bound with its outbox cleared
    /// below both consumers' bounds ([`PushedBound`]). The notifications are written in
    /// commits of at most [`PUSH_EXPANSION_BYTES`] (and the engine's batch limit); the last
    /// commit writes the bounds, so a bound moves only once all the notifications below it are
    /// written. A failure or crash midway leaves the messages to be expanded again, over
    /// notifications already written: the caller counts a message once per notification (by
    /// its seq, see [`PendingPush::last_seq`]). With storage partitions all this holds per
    /// partition: a partition that fails keeps its bounds; the others go on.
    pub async fn expand_outbox(
        &self,
        bounds: &[PushedBound],
        pending: &[((String, String, String), PendingPush)],
    ) -> Result<(), StoreError> {
        if self.partitions.is_none() {
            return self.expand_in_partition(bounds, pending).await;
        }
        // A conversation's notifications and its shard's outbox share a partition.
        let mut by_partition: BTreeMap<usize, (Vec<_>, Vec<_>)> = BTreeMap::new();
        for bound in bounds {
            let partition = self.partition_of_shard(bound.shard);
            by_partition
                .entry(partition)
                .or_default()
                .0
                .push(bound.clone());
        }
        for push in pending {
            let partition = self.partition_of_shard(self.shard_of(&push.0.2));
            by_partition
                .entry(partition)
                .or_default()
                .1
                .push(push.clone());
        }
        let mut failed = Ok(());
        for (bounds, pending) in by_partition.values() {
            let expanded = self.expand_in_partition(bounds, pending).await;
            failed = failed.and(expanded);
        }
        failed
    }

    /// [`Self::expand_outbox`] of the shards and notifications of one partition.
    async fn expand_in_partition(
        &self,
        bounds: &[PushedBound],
        pending: &[((String, String, String), PendingPush)],
    ) -> Result<(), StoreError> {
        let mut clears = Vec::new();
        for bound in bounds {
            if let Some(clear) = &bound.clear {
                clears.extend(self.outbox_rows_below(bound.shard, clear).await?);
            }
        }
        let last_bytes: usize = bounds
            .iter()
            .map(|b| b.bound.len() + self.keys.pushed_bound(b.shard).len())
            .chain(clears.iter().map(|c| c.start.len() + c.end.len()))
            .sum();
        let room = PUSH_EXPANSION_BYTES
            .min(self.kv.limits().max_batch_bytes)
            .saturating_sub(last_bytes);
        // Deferred: a power loss that takes these back also takes back the bounds, and the
        // messages are expanded again.
        let deferred = || {
            let mut batch = Batch::new();
            batch.deferred();
            batch
        };
        let (mut batch, mut bytes) = (deferred(), 0);
        for ((user, device, conv), push) in pending {
            let key = self.keys.pending_push(user, device, conv);
            let value = push.encode_to_vec();
            if bytes + key.len() + value.len() > room && !batch.is_empty() {
                self.kv
                    .commit(std::mem::replace(&mut batch, deferred()))
                    .await?;
                bytes = 0;
            }
            bytes += key.len() + value.len();
            batch.set(key, value);
        }
        for bound in bounds {
            batch.set(self.keys.pushed_bound(bound.shard), bound.bound.clone());
        }
        for clear in clears {
            batch.clear_range(clear);
        }
        self.kv.commit(batch).await.map(drop)
    }

    /// The ranges of `shard`'s outbox rows whose every entry lies in `entries`: the rows of
    /// the commits from `entries.start`'s to the one before `entries.end`'s, and those of
    /// `entries.end`'s commit that end below it, read to tell (a row keeps the entries of
    /// one commit, `outbox_rows`).
    async fn outbox_rows_below(
        &self,
        shard: u32,
        entries: &Range<Vec<u8>>,
    ) -> Result<Vec<Range<Vec<u8>>>, StoreError> {
        let outbox = self.keys.outbox(shard);
        let start = outbox_rows::commit_start(&outbox, &entries.start);
        let last_commit = outbox_rows::commit_start(&outbox, &entries.end);
        let mut rows = Vec::new();
        if start < last_commit {
            rows.push(start.clone()..last_commit.clone());
        }
        let first = start.max(last_commit);
        if first < entries.end {
            for (key, value) in self
                .kv
                .range(first..entries.end.clone(), usize::MAX, false)
                .await?
            {
                if bound_after(&outbox_rows::last_entry_key(&key, &value)?) <= entries.end {
                    rows.push(key.clone()..bound_after(&key));
                }
            }
        }
        Ok(rows)
    }

    /// Replaces a pending notification, unless it changed since it was read as `seen`
    /// (`FenceChanged`: more messages were collapsed into it meanwhile). `None` clears it.
    pub async fn settle_pending_push(
        &self,
        key: &[u8],
        seen: &PendingPush,
        next: Option<&PendingPush>,
    ) -> Result<(), StoreError> {
        let mut batch = Batch::new();
        batch.fence(key.to_vec(), Some(seen.encode_to_vec()));
        match next {
            Some(next) => batch.set(key.to_vec(), next.encode_to_vec()),
            None => batch.clear(key.to_vec()),
        };
        self.kv.commit(batch).await.map(drop)
    }

    /// Records where a connection of `user`'s `device` closed for silence left it in each of
    /// `places` (conversation, the highest seq it wrote there past the device's cursor): the
    /// push notifier notifies the device of what of it the device did not acknowledge
    /// ([`Self::owed_pushes`]). Atomic MAX, so two closes before the notifier reads them need
    /// no read and lower nothing; one commit per partition the conversations lie in.
    pub async fn owe_pushes(
        &self,
        user: &str,
        device: &str,
        places: &[(String, u64)],
    ) -> Result<(), StoreError> {
        if places.is_empty() {
            return Ok(());
        }
        let mut batch = Batch::new();
        for (conv, seq) in places {
            batch.max(self.keys.owed_push(user, device, conv), *seq);
        }
        self.commit_independent(batch).await
    }

    /// Up to `limit` of the places silent closes left ([`Self::owe_pushes`]), in key order. The
    /// caller settles each it read ([`Self::settle_owed_pushes`]), which clears it.
    pub async fn owed_pushes(&self, limit: usize) -> Result<Vec<OwedPush>, StoreError> {
        let rows = self.kv.range(self.keys.owed_pushes(), limit, false).await?;
        Ok(rows
            .into_iter()
            .map(|(key, stored)| OwedPush {
                device: self.keys.owed_push_parts(&key),
                through: decode_u64(&stored),
                key,
                stored,
            })
            .collect())
    }

    /// Writes `pending`, the notifications made of `owed`, and clears `owed`, each fenced on
    /// the value read: a silent close that raised one meanwhile fails the commit
    /// (`FenceChanged`), and they are read again. A conversation's notification and its place
    /// share a partition; with storage partitions each partition commits alone (the first
    /// failure is returned, the others committed).
    pub async fn settle_owed_pushes(
        &self,
        owed: &[OwedPush],
        pending: &[((String, String, String), PendingPush)],
    ) -> Result<(), StoreError> {
        let mut by_partition: BTreeMap<usize, Batch> = BTreeMap::new();
        let partition_of = |key: &[u8]| match &self.partitions {
            None => Some(0),
            Some(partitions) => partitions.partition_of_key(key),
        };
        for row in owed {
            // A key of no known placement cannot have been written to a partitioned store.
            let Some(partition) = partition_of(&row.key) else {
                continue;
            };
            by_partition
                .entry(partition)
                .or_default()
                .fence(row.key.clone(), Some(row.stored.clone()))
                .clear(row.key.clone());
        }
        for ((user, device, conv), push) in pending {
            let key = self.keys.pending_push(user, device, conv);
            let Some(partition) = partition_of(&key) else {
                continue;
            };
            by_partition
                .entry(partition)
                .or_default()
                .set(key, push.encode_to_vec());
        }
        let mut outcome = Ok(());
        for batch in by_partition.into_values() {
            outcome = outcome.and(self.kv.commit(batch).await.map(drop));
        }
        outcome
    }

    /// The delivered cursor of one device in one conversation (0 when it has none).
    pub async fn device_cursor(
        &self,
        user: &str,
        device: &str,
        conv: &str,
    ) -> Result<u64, StoreError> {
        let value = self.kv.get(&self.keys.cursor(user, device, conv)).await?;
        Ok(value.as_deref().map_or(0, decode_u64))
    }

    async fn cached_head(&self, heads: &mut HeadCache, conv: &str) -> Result<u64, StoreError> {
        if let Some(&h) = heads.heads.get(conv) {
            return Ok(h);
        }
        let value = self.kv.get(&self.keys.head(conv)).await?;
        let (_, head) = self
            .checked_heads(vec![(conv, value)])
            .await?
            .pop()
            .ok_or_else(|| StoreError::Engine("a head asked, none answered".into()))?;
        let head = head?;
        heads.insert(conv, head);
        Ok(head)
    }

    /// The heads of conversations as stored (each conversation with its head's value), as
    /// the sequencer appends after them: decoded ([`MessageStore::decode_head`]), and checked
    /// against the events their conversations hold, with one read of the first event above
    /// each. One above it is damage ([`StoreError::Corrupt`]): a head lower than the events
    /// held (or none beside them) put the next seq among them, which that append and the ones
    /// after it overwrote. Checked as a head is read into a [`HeadCache`], not at each append:
    /// a read per conversation the cache takes, not per batch.
    ///
    /// The head and the events are two reads, which no engine answers from one state: a
    /// commit landing between them (an append whose outcome was unknown, landing late) puts an
    /// event above the head read before it. So a head found below an event is read again
    /// after the events: damage only if it has not moved, else checked again as it is now
    /// (at most [`HEAD_CHECKS`] times; a head that keeps moving is answered
    /// [`StoreError::Overloaded`], which clients retry). Refused as damage, such a good
    /// conversation's send was answered `internal`, which clients do not retry. The reads
    /// again are made only when an event lies above a head: none on the message path.
    async fn checked_heads<'c>(
        &self,
        mut stored: Vec<(&'c str, Option<Vec<u8>>)>,
    ) -> Result<Vec<(&'c str, Result<u64, StoreError>)>, StoreError> {
        let mut checked = Vec::with_capacity(stored.len());
        for check in 1..=HEAD_CHECKS {
            let decoded: Vec<_> = stored
                .into_iter()
                .map(|(conv, value)| {
                    let head = self.decode_head(conv, value.as_deref());
                    (conv, value, head)
                })
                .collect();
            let above: Vec<_> = decoded
                .iter()
                .filter_map(|(conv, _, head)| {
                    Some(self.keys.events_after(conv, *head.as_ref().ok()?))
                })
                .collect();
            let mut above = match above.is_empty() {
                true => Vec::new(),
                false => self.ranges_each(above, 1, "events above heads").await?,
            }
            .into_iter();
            // The heads found below an event, with the value read and that event's seq.
            let mut below = Vec::new();
            for (conv, value, head) in decoded {
                let head = match head {
                    Ok(head) => head,
                    Err(error) => {
                        checked.push((conv, Err(error)));
                        continue;
                    }
                };
                let found = above.next().unwrap_or_default();
                match found
                    .first()
                    .and_then(|(key, _)| self.keys.event_parts(key))
                {
                    Some((_, seq)) if seq > head => below.push((conv, value, head, seq)),
                    _ => checked.push((conv, Ok(head))),
                }
            }
            if below.is_empty() {
                break;
            }
            let keys = below
                .iter()
                .map(|(conv, ..)| self.keys.head(conv))
                .collect();
            let again = self.get_each(keys).await?;
            stored = Vec::new();
            for ((conv, value, head, seq), now) in below.into_iter().zip(again) {
                if now == value {
                    let reason = format!("a head at {head}, below the event held at {seq}");
                    checked.push((conv, Err(corrupt(&self.keys.head(conv), reason))));
                } else if check < HEAD_CHECKS {
                    stored.push((conv, now));
                } else {
                    let moving = format!("the head of {conv} kept moving as it was read; retry");
                    checked.push((conv, Err(StoreError::Overloaded(moving))));
                }
            }
            if stored.is_empty() {
                break;
            }
        }
        Ok(checked)
    }

    /// `conv`'s head as stored (`value`; 0 when absent), as every reader takes it
    /// ([`stored_seq`]): the sequencer to append, a catch-up, an ack, a list of conversations,
    /// retention.
    fn decode_head(&self, conv: &str, value: Option<&[u8]>) -> Result<u64, StoreError> {
        stored_seq(value, 0, || self.keys.head(conv))
    }

    /// `conv`'s lowest retained seq as stored (`value`; 1 when absent, and never below),
    /// as every reader takes it ([`stored_seq`]).
    fn decode_floor(&self, conv: &str, value: Option<&[u8]>) -> Result<u64, StoreError> {
        Ok(stored_seq(value, 1, || self.keys.floor(conv))?.max(1))
    }

    /// The highest seq of `conv` (0 when it has no event); a head of the wrong length is
    /// damage ([`StoreError::Corrupt`], [`stored_seq`]).
    pub async fn head(&self, conv: &str) -> Result<u64, StoreError> {
        let value = self.kv.get(&self.keys.head(conv)).await?;
        self.decode_head(conv, value.as_deref())
    }

    /// Up to `limit` events of `conv` with `after_seq < seq <= through`, in order (`through`
    /// `u64::MAX`: every one after `after_seq`). The embedded engine answers from its recent
    /// events when it holds every event asked for (`crate::event_cache`), so a caller that
    /// knows the last seq it wants gives it.
    pub async fn events(
        &self,
        conv: &str,
        after_seq: u64,
        through: u64,
        limit: usize,
    ) -> Result<Vec<Event>, StoreError> {
        self.events_within(conv, after_seq, through, limit, usize::MAX)
            .await
    }

    /// [`MessageStore::events`], but no more of them than `max_bytes` as stored (one at
    /// least): a step of a connection's catch-up, which holds what it read until the client
    /// has read it, whatever the size of the conversation's messages. The rows past the budget
    /// are read, and dropped before this returns.
    pub async fn events_within(
        &self,
        conv: &str,
        after_seq: u64,
        through: u64,
        limit: usize,
        max_bytes: usize,
    ) -> Result<Vec<Event>, StoreError> {
        let step = self.events_within_until_undecodable(conv, after_seq, through, limit, max_bytes);
        match step.await? {
            (events, None) => Ok(events),
            (_, Some(undecodable)) => Err(undecodable.error),
        }
    }

    /// [`MessageStore::events_within`] for a reader that sends on what it read before an
    /// event that does not decode (a connection's catch-up): the events before it, and that
    /// event, if one was met. The events after it are not decoded: a reader that passed over
    /// it would lose its place in the conversation's order.
    pub async fn events_within_until_undecodable(
        &self,
        conv: &str,
        after_seq: u64,
        through: u64,
        limit: usize,
        max_bytes: usize,
    ) -> Result<(Vec<Event>, Option<UndecodableEvent>), StoreError> {
        let range = self
            .keys
            .events(conv, after_seq.saturating_add(1), through.saturating_add(1));
        let mut bytes = 0usize;
        let rows = self.kv.range(range, limit, false).await?;
        let mut events = Vec::with_capacity(rows.len());
        for (i, (key, value)) in rows.into_iter().enumerate() {
            bytes = bytes.saturating_add(value.len());
            if i > 0 && bytes > max_bytes {
                break;
            }
            match decode_event(&key, &value).and_then(|event| self.held_at(&key, conv, event)) {
                Ok(event) => events.push(event),
                Err(error) => {
                    let next = events.last().map_or(after_seq, |e: &Event| e.seq) + 1;
                    let seq = self.keys.event_parts(&key).map_or(next, |(_, seq)| seq);
                    return Ok((events, Some(UndecodableEvent { seq, error })));
                }
            }
        }
        Ok((events, None))
    }

    /// The stored record of `conv`, if it exists.
    pub async fn conversation(&self, conv: &str) -> Result<Option<ConversationRecord>, StoreError> {
        self.record(self.keys.conversation(conv)).await
    }

    /// Whether `user` is a member of `conv` now.
    pub async fn is_member(&self, conv: &str, user: &str) -> Result<bool, StoreError> {
        Ok(self
            .member(conv, user)
            .await?
            .is_some_and(|m| m.is_member()))
    }

    /// The current members of `conv`, in id order.
    pub async fn members(&self, conv: &str) -> Result<Vec<String>, StoreError> {
        Ok(current_members(self.member_records(conv).await?))
    }

    /// For each of `convs`, what a list of `user`'s conversations shows of it: its record, its
    /// head, the user's receipt cursors and membership record (what it may read of it), with
    /// one read of every key (one call on a store node, whatever the number of conversations).
    /// A conversation whose record, head or membership record is damaged is answered with
    /// its [`StoreError::Corrupt`] alone, the others read.
    pub async fn conversation_rows(
        &self,
        user: &str,
        convs: &[&str],
    ) -> Result<Vec<Result<ConversationRow, StoreError>>, StoreError> {
        let keys = convs
            .iter()
            .flat_map(|conv| {
                [
                    self.keys.conversation(conv),
                    self.keys.head(conv),
                    self.keys.receipt(conv, user, ReceiptKind::Delivered),
                    self.keys.receipt(conv, user, ReceiptKind::Read),
                    self.keys.member(conv, user),
                ]
            })
            .collect::<Vec<_>>();
        let values = self.get_each(keys).await?;
        let cursor = |value: &Option<Vec<u8>>| value.as_deref().map_or(0, decode_u64);
        Ok(convs
            .iter()
            .zip(values.chunks(5))
            .map(|(conv, values)| {
                let record = match &values[0] {
                    Some(value) => ConversationRecord::decode(value.as_slice())
                        .map_err(|e| corrupt(&self.keys.conversation(conv), e))?,
                    None => ConversationRecord::default(),
                };
                Ok(ConversationRow {
                    record,
                    head: self.decode_head(conv, values[1].as_deref())?,
                    delivered: cursor(&values[2]),
                    read: cursor(&values[3]),
                    member: self.decode_member(conv, user, &values[4])?,
                })
            })
            .collect())
    }

    /// For each of `convs`: `user`'s membership record, the lowest retained seq and the head,
    /// with one read of every key (one call on a store node, whatever the number of
    /// conversations), for a device's catch-up. A conversation whose membership record, floor
    /// or head is damaged is answered with its [`StoreError::Corrupt`] alone, the others read.
    pub async fn read_bounds(
        &self,
        user: &str,
        convs: &[&str],
    ) -> Result<Vec<Result<ReadBounds, StoreError>>, StoreError> {
        let keys = convs
            .iter()
            .flat_map(|conv| {
                [
                    self.keys.member(conv, user),
                    self.keys.floor(conv),
                    self.keys.head(conv),
                ]
            })
            .collect::<Vec<_>>();
        let values = self.get_each(keys).await?;
        Ok(convs
            .iter()
            .zip(values.chunks(3))
            .map(|(conv, values)| {
                Ok(ReadBounds {
                    member: self.decode_member(conv, user, &values[0])?,
                    floor: self.decode_floor(conv, values[1].as_deref())?,
                    head: self.decode_head(conv, values[2].as_deref())?,
                })
            })
            .collect())
    }

    /// `user`'s membership record in `conv`, its head and the user's receipt cursors, for an
    /// ack: one read of the four keys (one call on a store node), each a point read (see
    /// [`MessageStore::receipt`]).
    pub async fn ack_bounds(&self, conv: &str, user: &str) -> Result<AckBounds, StoreError> {
        let keys = vec![
            self.keys.member(conv, user),
            self.keys.head(conv),
            self.keys.receipt(conv, user, ReceiptKind::Delivered),
            self.keys.receipt(conv, user, ReceiptKind::Read),
        ];
        let cursor = |value: &Option<Vec<u8>>| value.as_deref().map_or(0, decode_u64);
        match self.kv.get_many(keys).await?.as_slice() {
            [member, head, delivered, read] => Ok(AckBounds {
                member: self.decode_member(conv, user, member)?,
                head: self.decode_head(conv, head.as_deref())?,
                delivered: cursor(delivered),
                read: cursor(read),
            }),
            other => Err(StoreError::Engine(format!(
                "four keys asked, {} answered",
                other.len()
            ))),
        }
    }

    fn decode_member(
        &self,
        conv: &str,
        user: &str,
        value: &Option<Vec<u8>>,
    ) -> Result<Option<MemberRecord>, StoreError> {
        value
            .as_deref()
            .map(MemberRecord::decode)
            .transpose()
            .map_err(|e| corrupt(&self.keys.member(conv, user), e))
    }

    /// The conversations `user` belongs to or has left, in id order.
    pub async fn conversations_of(&self, user: &str) -> Result<Vec<UserConversation>, StoreError> {
        let rows = self
            .kv
            .range(self.keys.user_conversations(user), usize::MAX, false)
            .await?;
        let parsed = parsed_keys(&rows, "user conversation", |k| {
            self.keys.user_conversation_id(k)
        });
        Ok(parsed
            .map(|(conversation_id, (_, v))| UserConversation {
                conversation_id,
                left_seq: (!v.is_empty()).then(|| decode_u64(v)),
            })
            .collect())
    }

    /// The delivered cursors of one device, by conversation.
    pub async fn device_cursors(
        &self,
        user: &str,
        device: &str,
    ) -> Result<HashMap<String, u64>, StoreError> {
        let rows = self
            .kv
            .range(self.keys.cursors(user, device), usize::MAX, false)
            .await?;
        let parsed = parsed_keys(&rows, "cursor", |k| self.keys.cursor_conversation(k));
        Ok(parsed.map(|(conv, (_, v))| (conv, decode_u64(v))).collect())
    }

    /// Records a device's cumulative acknowledgement: the device's delivered cursor and the
    /// user's receipt cursors move up (atomic MAX; a read implies delivery), in one commit, or
    /// with storage partitions the receipts first and then the cursor. The commit is
    /// [deferred](crate::kv::Durability::Deferred): it survives a crash of the process, and
    /// only a power loss in the next moments can take it back, which delivers its events
    /// again (at-least-once) and lowers the receipt cursors, which clients keep at their
    /// highest.
    pub async fn acknowledge(
        &self,
        user: &str,
        device: &str,
        conv: &str,
        seq: u64,
        kind: ReceiptKind,
    ) -> Result<(), StoreError> {
        let mut receipts = Batch::new();
        receipts
            .deferred()
            .max(self.keys.receipt(conv, user, ReceiptKind::Delivered), seq);
        if kind == ReceiptKind::Read {
            receipts.max(self.keys.receipt(conv, user, ReceiptKind::Read), seq);
        }
        // With partitions the receipts (the conversation's) commit first and the cursor (in
        // the directory) after: a crash between leaves the cursor behind, so the events come
        // again and their ack moves it (decision 0005).
        let mut cursor = Batch::new();
        cursor
            .deferred()
            .max(self.keys.cursor(user, device, conv), seq);
        self.commit_then(receipts, cursor).await
    }

    /// A user's `(delivered_seq, read_seq)` in `conv`: both cursors with one read of two keys
    /// (one call on a store node). Not one range read: every ack writes a new version of these
    /// keys, and a range read steps over every version still in the memtable (thousands on a
    /// busy conversation), where a point read seeks to the newest (`docs/benchmarks.md`, "Hot
    /// keys are read one by one").
    pub async fn receipt(&self, conv: &str, user: &str) -> Result<(u64, u64), StoreError> {
        let keys = [ReceiptKind::Delivered, ReceiptKind::Read]
            .map(|kind| self.keys.receipt(conv, user, kind))
            .to_vec();
        let cursor = |value: &Option<Vec<u8>>| value.as_deref().map_or(0, decode_u64);
        match self.kv.get_many(keys).await?.as_slice() {
            [delivered, read] => Ok((cursor(delivered), cursor(read))),
            other => Err(StoreError::Engine(format!(
                "two receipt cursors asked, {} answered",
                other.len()
            ))),
        }
    }

    /// The receipt cursors of each of `users` in `conv`, in their order: one point read of
    /// each cursor, for the reason [`MessageStore::receipt`] gives (one call on a store node,
    /// whatever the users).
    pub async fn receipts_of(
        &self,
        conv: &str,
        users: Vec<String>,
    ) -> Result<Vec<Receipt>, StoreError> {
        let keys = users
            .iter()
            .flat_map(|user| {
                [ReceiptKind::Delivered, ReceiptKind::Read]
                    .map(|kind| self.keys.receipt(conv, user, kind))
            })
            .collect();
        let cursors = self.get_each(keys).await?;
        let cursor = |value: &Option<Vec<u8>>| value.as_deref().map_or(0, decode_u64);
        Ok(users
            .into_iter()
            .zip(cursors.chunks(2))
            .map(|(user, cursors)| Receipt {
                conversation_id: conv.to_owned(),
                user,
                delivered_seq: cursor(&cursors[0]),
                read_seq: cursor(&cursors[1]),
            })
            .collect())
    }

    /// The oldest outbox entries of `shard` from `from` on (a bound: the key of an entry, or
    /// [`bound_after`] the last one taken), at most `limit`. An entry that does not decode
    /// fails the read; a row that does not decode below `from` is passed over, as the readers
    /// of pages pass it over ([`MessageStore::outbox_page`]).
    pub async fn outbox(
        &self,
        shard: u32,
        from: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<OutboxEntry>, StoreError> {
        self.read_outbox(shard, from, limit, decode_event)
            .await?
            .into_iter()
            .map(|(key, event)| Ok((key, event?)))
            .collect()
    }

    /// [`MessageStore::outbox`], with each entry's event or why it does not decode (a row that
    /// does not decode is one entry under its own key), for a reader that counts what waits.
    pub async fn outbox_entries(
        &self,
        shard: u32,
        from: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, Result<Event, StoreError>)>, StoreError> {
        self.read_outbox(shard, from, limit, decode_event).await
    }

    /// A page of `shard`'s outbox from `from` on, of at most `rows` rows (a commit's entries
    /// each) and `entries` entries, with whether the outbox holds more after it: for a reader
    /// that reads its pages from the store (fanout on a cluster's node). A commit under load
    /// lists many entries in its row, so a page bounded by its entries alone reads many more
    /// than it takes, and the next page reads the same rows again. A page of one row may make no
    /// progress: the row of `from`'s commit may hold only entries before it.
    ///
    /// An entry whose event does not decode (damage, or a writer of another version) is in the
    /// page with its error, and so is a row that does not decode, as one entry under the
    /// row's key: the reader passes it over, reporting it, and its bound moves past it
    /// ([`bound_after`] its key) as past any entry, so the shard is not held for good by one
    /// value. A row that does not decode below `from` (a reader's bound past its key) was
    /// passed over already and is not in the page again.
    pub async fn outbox_page(
        &self,
        shard: u32,
        from: Option<&[u8]>,
        rows: usize,
        entries: usize,
    ) -> Result<OutboxPage<Event>, StoreError> {
        let position = [(shard, from.map(<[u8]>::to_vec))];
        let mut pages = self
            .outbox_pages(&position, (rows, entries), decode_event)
            .await?;
        pages
            .pop()
            .ok_or_else(|| StoreError::Engine("an outbox read answered no page".into()))
    }

    /// [`MessageStore::outbox_page`] of each of `positions` (a shard and where to read it
    /// from), each entry's event read as its [`EventHeader`] only, for readers that never look
    /// at bodies (the push notifier): every shard's page with one read (one call on a store
    /// node). An entry or row that does not decode is in its shard's page with its error, as
    /// in [`MessageStore::outbox_page`].
    pub async fn outbox_headers(
        &self,
        positions: &[(u32, Option<Vec<u8>>)],
        rows: usize,
        entries: usize,
    ) -> Result<Vec<OutboxHeaders>, StoreError> {
        self.outbox_pages(positions, (rows, entries), EventHeader::decode_stored)
            .await
    }

    async fn outbox_pages<T>(
        &self,
        positions: &[(u32, Option<Vec<u8>>)],
        (rows, entries): (usize, usize),
        decode: impl Fn(&[u8], &[u8]) -> Result<T, StoreError>,
    ) -> Result<Vec<OutboxPage<T>>, StoreError> {
        let ranges = positions
            .iter()
            .map(|(shard, from)| self.outbox_rows_from(*shard, from.as_deref()))
            .collect();
        let pages = self.kv.ranges(ranges, rows).await?;
        let taken = positions.iter().zip(pages).map(|((_, from), page)| {
            let mut taken = Vec::new();
            let rows_after =
                take_entries(&page, from.as_deref(), (rows, entries), &decode, &mut taken);
            let more = rows_after || taken.len() == entries;
            (taken, more)
        });
        Ok(taken.collect())
    }

    /// The rows of `shard`'s outbox that hold its entries from `from` on: from the first row
    /// of `from`'s commit (`outbox_rows`).
    fn outbox_rows_from(&self, shard: u32, from: Option<&[u8]>) -> Range<Vec<u8>> {
        let outbox = self.keys.outbox(shard);
        let start = from.map(|from| outbox_rows::commit_start(&outbox, from));
        queue_from(outbox, start.as_deref())
    }

    /// The oldest outbox entries of `shard` from `from` on, at most `limit`, each event
    /// decoded by `decode` (from its entry's key and its stored bytes). Reads from the first
    /// row of `from`'s commit and passes over its entries below `from`, undecoded
    /// (`outbox_rows`).
    async fn read_outbox<T>(
        &self,
        shard: u32,
        from: Option<&[u8]>,
        limit: usize,
        decode: impl Fn(&[u8], &[u8]) -> Result<T, StoreError>,
    ) -> Result<Vec<(Vec<u8>, Result<T, StoreError>)>, StoreError> {
        let mut rows = self.outbox_rows_from(shard, from);
        let mut entries = Vec::new();
        loop {
            let page = self.kv.range(rows.clone(), limit, false).await?;
            let read_on = take_entries(&page, from, (limit, limit), &decode, &mut entries);
            match page.last() {
                Some((last, _)) if read_on => rows.start = bound_after(last),
                _ => return Ok(entries),
            }
        }
    }

    /// The newest outbox key of `shard`, if its outbox holds any entry: of a last row that
    /// does not decode, the row's own key (its entries cannot be counted; the readers pass
    /// it over as one entry under that key, see [`MessageStore::outbox_page`]).
    pub async fn last_outbox_key(&self, shard: u32) -> Result<Option<Vec<u8>>, StoreError> {
        let rows = self.kv.range(self.keys.outbox(shard), 1, true).await?;
        Ok(rows
            .into_iter()
            .next()
            .map(|(key, value)| outbox_rows::last_entry_key(&key, &value).unwrap_or(key)))
    }

    /// Records fanout's progress in each shard's outbox (`bound` only moves up), in one
    /// commit per partition fenced on the delivery epoch of each lease: a consumer that lost a
    /// shard ([`Duty::Delivery`]) moves nothing of it, and the commit fails with
    /// [`StoreError::FenceChanged`] (naming the epoch key) so that the caller drops that
    /// shard's bound and records the others again. The entries stay until the push notifier
    /// has read them too ([`MessageStore::expand_outbox`] clears them).
    pub async fn advance_delivered(&self, bounds: &[DeliveredBound]) -> Result<(), StoreError> {
        for run in self.runs_by_partition(bounds, |b| self.partition_of_shard(b.lease.shard)) {
            let mut batch = Batch::new();
            // A bound a power loss takes back only fans those entries out again.
            batch.deferred();
            for bound in run {
                batch.fence(
                    self.keys.shard_epoch(Duty::Delivery, bound.lease.shard),
                    Some(bound.lease.epoch.to_le_bytes().to_vec()),
                );
                batch.set(
                    self.keys.delivered_bound(bound.lease.shard),
                    bound.bound.clone(),
                );
            }
            self.kv.commit(batch).await?;
        }
        Ok(())
    }

    /// Fanout's bound in the outbox of each of `shards` (`None`: nothing recorded yet).
    pub async fn delivered_bounds(
        &self,
        shards: &[u32],
    ) -> Result<Vec<Option<Vec<u8>>>, StoreError> {
        self.get_each(
            shards
                .iter()
                .map(|&s| self.keys.delivered_bound(s))
                .collect(),
        )
        .await
    }

    /// The push notifier's bound in the outbox of each of `shards`.
    pub async fn pushed_bounds(&self, shards: &[u32]) -> Result<Vec<Option<Vec<u8>>>, StoreError> {
        self.get_each(shards.iter().map(|&s| self.keys.pushed_bound(s)).collect())
            .await
    }

    /// The shard whose delivery epoch is `key`, if it is one (to read a failed
    /// [`MessageStore::clear_outbox`]).
    pub fn delivery_fence_shard(&self, key: &[u8]) -> Option<u32> {
        (0..self.shard_count).find(|&shard| self.keys.shard_epoch(Duty::Delivery, shard) == key)
    }
}

/// Adds to `entries` those of the outbox rows of `page` (a read of at most `rows` rows) from
/// `from` on, each decoded by `decode` (or with why it does not), until `entries` holds
/// `limit`. A row that does not decode is one entry under its key, with its error; below `from`
/// it is passed over (a reader's bound passes a row's key only once it read that row: it
/// reported it then). Returns whether the rows after the page must be read too: the page was
/// full (of `rows` rows) and `entries` is not.
fn take_entries<T>(
    page: &[KeyValue],
    from: Option<&[u8]>,
    (rows, limit): (usize, usize),
    decode: &impl Fn(&[u8], &[u8]) -> Result<T, StoreError>,
    entries: &mut Vec<(Vec<u8>, Result<T, StoreError>)>,
) -> bool {
    for (key, value) in page {
        match outbox_rows::stored_entries(key, value) {
            Ok(stored) => {
                let from_here = stored
                    .into_iter()
                    .filter(|(entry, _)| from.is_none_or(|from| entry.as_slice() >= from))
                    .take(limit - entries.len());
                for (entry, event) in from_here {
                    let event = decode(&entry, event);
                    entries.push((entry, event));
                }
            }
            Err(_) if from.is_some_and(|from| key.as_slice() < from) => {}
            Err(e) => entries.push((key.clone(), Err(e))),
        }
        if entries.len() == limit {
            return false;
        }
    }
    !page.is_empty() && page.len() == rows
}

/// The part of a queue of versionstamped keys from `bound` on (the consumer's bound: new
/// entries always sort after it, and starting there, reads do not walk over the entries
/// already cleared, which an LSM keeps as tombstones until compaction).
fn queue_from(queue: Range<Vec<u8>>, bound: Option<&[u8]>) -> Range<Vec<u8>> {
    match bound {
        Some(bound) => bound.to_vec().max(queue.start)..queue.end,
        None => queue,
    }
}

impl MessageStore {
    /// The values of `keys` with one read, one per key in the order asked (an engine that
    /// answers another count is an error, never a shifted answer).
    async fn get_each(&self, keys: Vec<Vec<u8>>) -> Result<Vec<Option<Vec<u8>>>, StoreError> {
        let asked = keys.len();
        let values = self.kv.get_many(keys).await?;
        if values.len() != asked {
            return Err(StoreError::Engine(format!(
                "{asked} keys asked, {} answered",
                values.len()
            )));
        }
        Ok(values)
    }

    /// Up to `limit` rows of each of `ranges` (`what` they are, for the error), with one
    /// read.
    async fn ranges_each(
        &self,
        ranges: Vec<Range<Vec<u8>>>,
        limit: usize,
        what: &str,
    ) -> Result<Vec<Vec<KeyValue>>, StoreError> {
        let asked = ranges.len();
        let answers = self.kv.ranges(ranges, limit).await?;
        if answers.len() != asked {
            return Err(StoreError::Engine(format!(
                "{asked} {what} asked, {} answered",
                answers.len()
            )));
        }
        Ok(answers)
    }

    /// The protobuf record stored at `key`, if any.
    async fn record<T: Message + Default>(&self, key: Vec<u8>) -> Result<Option<T>, StoreError> {
        match self.kv.get(&key).await? {
            Some(value) => Ok(Some(
                T::decode(value.as_slice()).map_err(|e| corrupt(&key, e))?,
            )),
            None => Ok(None),
        }
    }
}

/// Checks that `engine` is partition `index` of the store, and records it there while the
/// store is being created (`creating`): a table that lists its stores in another order, or
/// names one store twice (under two addresses), is refused rather than mixing partitions.
async fn claim_partition(
    engine: &dyn KvEngine,
    keys: &Keys,
    index: u64,
    creating: bool,
) -> Result<(), StoreError> {
    let key = keys.partition_index();
    let mut stored = engine.get(&key).await?;
    if stored.is_none() && creating {
        if index > 0 && engine.get(&keys.shard_count()).await?.is_some() {
            return Err(StoreError::Engine(format!(
                "the store given for partition {index} already holds a Courier store of its own"
            )));
        }
        let mut batch = Batch::new();
        batch
            .fence(key.clone(), None)
            .set(key.clone(), index.to_le_bytes().to_vec());
        match engine.commit(batch).await {
            Ok(_) => return Ok(()),
            // Another node creating the store at the same moment: read what it wrote.
            Err(StoreError::FenceChanged { .. }) => stored = engine.get(&key).await?,
            Err(e) => return Err(e),
        }
    }
    match stored.as_deref().map(decode_u64) {
        Some(found) if found == index => Ok(()),
        Some(found) => Err(StoreError::Engine(format!(
            "the store given for partition {index} holds partition {found} of this store: the \
             table lists the partitions in another order, or names one store twice"
        ))),
        None => Err(StoreError::Engine(format!(
            "the store given for partition {index} holds no partition of this store: check the \
             table's stores"
        ))),
    }
}

/// A page of [`MessageStore::conversation_ids`].
#[derive(Debug)]
pub struct ConversationIds {
    /// The ids of the conversations the page read, in id order.
    pub ids: Vec<String>,
    /// The last key the page read (where the next page starts after), a key that does not
    /// parse included; `None` when it read none: the pages have ended.
    pub last_key: Option<Vec<u8>>,
}

/// The rows of a list of one user's (their conversations, a device's cursors, their devices),
/// each with the id `parse` reads from its key (`what` key it is, for the log). A key it cannot
/// read (damage, or a bug) is passed over, logged at error with the key: failing on it, the
/// user's whole list failed, and with their conversations or cursors every catch-up of theirs.
fn parsed_keys<'r, T>(
    rows: &'r [KeyValue],
    what: &'static str,
    parse: impl Fn(&[u8]) -> Option<T>,
) -> impl Iterator<Item = (T, &'r KeyValue)> {
    rows.iter().filter_map(move |row| {
        let parsed = parse(&row.0);
        if parsed.is_none() {
            tracing::error!(
                key = ?row.0,
                "a {what} key that does not parse is passed over: the rest of the list is read"
            );
        }
        Some((parsed?, row))
    })
}

/// The refusal of `append` for `error` met while sequencing it: damage of what it is decided
/// on ([`StoreError::Corrupt`]) refuses it alone ([`AppendRefused::Damaged`]), logged at error
/// with the record's key; any other error fails its batch, returned as it is.
fn damaged(
    lease: ShardLease,
    append: &Append,
    error: StoreError,
) -> Result<AppendRefused, StoreError> {
    match error {
        StoreError::Corrupt { key, reason } => {
            tracing::error!(
                shard = lease.shard,
                conversation = append.conversation_id.as_str(),
                key = ?key,
                %reason,
                "an append is refused: a record it is decided on is damaged; the other appends of its batch go on"
            );
            Ok(AppendRefused::Damaged)
        }
        other => Err(other),
    }
}

/// The outcome an idempotency record `stored` under `key` holds, as answered to a retry
/// (`duplicate`).
fn earlier_outcome(key: &[u8], stored: &[u8]) -> Result<AppendOutcome, StoreError> {
    let record = IdempotencyRecord::decode(stored).map_err(|e| corrupt(key, e))?;
    Ok(AppendOutcome {
        seq: record.seq,
        server_msg_id: record.server_msg_id(),
        ts_ms: record.ts_ms,
        duplicate: true,
    })
}

/// A seq bound of a conversation as stored (`value`; `absent` when there is none) under the
/// key `key` makes: its head or its floor, which their writers set to 8 bytes (little-endian).
/// Of another length it is damage ([`StoreError::Corrupt`]), which every reader refuses: read
/// as a number (shorter values zero-extended, longer ones cut), a head put the sequencer's next
/// seq among the events held, which that append and the ones after it overwrote, and took a
/// catch-up, a list of conversations or an ack past the events that exist or short of them; a
/// floor hid retained events from every reader.
fn stored_seq(
    value: Option<&[u8]>,
    absent: u64,
    key: impl FnOnce() -> Vec<u8>,
) -> Result<u64, StoreError> {
    let Some(value) = value else {
        return Ok(absent);
    };
    <[u8; 8]>::try_from(value)
        .map(u64::from_le_bytes)
        .map_err(|_| corrupt(&key(), format!("{} bytes, not 8", value.len())))
}

/// A user's media usage, written as u64 and lowered with signed ADDs: never below zero.
fn decode_usage(value: &[u8]) -> u64 {
    (decode_u64(value) as i64).max(0) as u64
}

pub(crate) fn decode_event(key: &[u8], value: &[u8]) -> Result<Event, StoreError> {
    let event = pb::Event::decode(value).map_err(|e| corrupt(key, e))?;
    Event::try_from(event).map_err(|e| corrupt(key, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A server id is the time padded to 11 hex digits, then 16 random ones, as `format!`
    /// wrote it before.
    #[test]
    fn server_msg_ids_are_the_time_then_sixteen_random_hex_digits() {
        for ts_ms in [0, 0xabc, 1_764_000_000_000, 0xfff_ffff_ffff, u64::MAX] {
            let id = ServerMsgId::new(ts_ms).text();
            let time = format!("{ts_ms:011x}");
            assert_eq!(id.len(), time.len() + 16, "{id}");
            assert!(id.starts_with(&time), "{id} for {time}");
            assert!(
                id.bytes()
                    .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
            );
        }
        assert_ne!(ServerMsgId::new(7).text(), ServerMsgId::new(7).text());
    }
    use crate::testing::{owner, temp_store};
    use courier_proto::Body;

    /// The nodes of a new cluster start at once on an empty store (`docs/distributed.md`): one
    /// creates it, and the others open what it created instead of failing on the fence, or
    /// are refused when they ask for another shard count.
    #[tokio::test]
    async fn nodes_opening_an_empty_store_at_once_all_open_it() {
        use crate::faulty_engine::FaultyEngine;
        for (theirs, opens) in [(8, true), (16, false)] {
            let engine = FaultyEngine::new();
            let other = engine.clone();
            engine.before_next_commit(Box::pin(async move {
                MessageStore::open(other, b"", theirs).await.unwrap();
            }));
            match MessageStore::open(engine.clone(), b"", 8).await {
                Ok(store) => {
                    assert!(opens);
                    assert_eq!(store.shard_count(), 8);
                }
                Err(e) => {
                    assert!(!opens);
                    assert!(e.to_string().contains("created with 16 shards"), "{e}");
                }
            }
        }
    }

    fn message(conv: &str, device: &str, id: &str) -> Append {
        let sender = Sender {
            user: "alice".into(),
            device: device.into(),
        };
        Append {
            create: Some(NewConversation::direct("alice", "bob")),
            ..Append::message(conv.into(), sender, id.into(), Body::Text(id.into()), None)
        }
    }

    /// A stored head at `u64::MAX` (damage, or a hostile write) has no next seq: an append to
    /// its conversation is refused as damage, nothing written for it. It added one to it: a
    /// debug build's shard actor panicked, failing every append queued on the shard, at every
    /// send to that conversation; a build without overflow checks sequenced the message at 0
    /// and set the head back to 0, so that the next one overwrote the conversation's first
    /// event.
    #[tokio::test]
    async fn a_head_at_its_maximum_refuses_the_append_as_damage() {
        let dir = tempfile::tempdir().unwrap();
        let store = temp_store(&dir, 8).await;
        let lease = owner(&store, "d:1").await;
        let mut damage = Batch::new();
        damage.set(store.keys.head("d:1"), u64::MAX.to_le_bytes().to_vec());
        store.kv.commit(damage).await.unwrap();
        let results = store
            .append(
                lease,
                &mut HeadCache::default(),
                &[message("d:1", "p", "m1")],
            )
            .await
            .unwrap();
        assert_eq!(results, [Err(AppendRefused::Damaged)]);
        assert_eq!(store.head("d:1").await.unwrap(), u64::MAX);
        assert!(
            store
                .events("d:1", 0, u64::MAX, 10)
                .await
                .unwrap()
                .is_empty()
        );
    }

    /// Damage in one conversation (a head at its maximum, a sender's member record that does
    /// not decode) refuses only the appends that need it: the other appends of the same group
    /// commit are sequenced and committed. It failed the whole batch with `internal`, which
    /// clients do not retry: senders in other conversations whose messages happened to share
    /// the batch were refused for nothing.
    #[tokio::test]
    async fn damage_in_one_conversation_refuses_only_its_appends_in_a_batch() {
        let dir = tempfile::tempdir().unwrap();
        // One shard: every conversation in the same batch.
        let store = temp_store(&dir, 1).await;
        let lease = owner(&store, "d:1").await;
        let mut heads = HeadCache::default();
        // d:3 exists (alice's record is read, not made by the creation), then is damaged.
        let first = store
            .append(lease, &mut heads, &[message("d:3", "p", "c1")])
            .await
            .unwrap();
        assert_eq!(first[0].as_ref().unwrap().seq, 1);
        let mut damage = Batch::new();
        damage
            .set(store.keys.head("d:1"), u64::MAX.to_le_bytes().to_vec())
            .set(store.keys.member("d:3", "alice"), vec![0xff; 3]);
        store.kv.commit(damage).await.unwrap();
        let batch = [
            message("d:1", "p", "a1"),
            message("d:2", "p", "b1"),
            message("d:3", "p", "c2"),
            message("d:2", "p", "b2"),
        ];
        let results = store
            .append(lease, &mut HeadCache::default(), &batch)
            .await
            .unwrap();
        let seqs: Vec<_> = results
            .iter()
            .map(|r| r.as_ref().map(|o| o.seq).map_err(Clone::clone))
            .collect();
        assert_eq!(
            seqs,
            [
                Err(AppendRefused::Damaged),
                Ok(1),
                Err(AppendRefused::Damaged),
                Ok(2)
            ]
        );
        let texts = |events: Vec<Event>| -> Vec<u64> { events.iter().map(|e| e.seq).collect() };
        assert_eq!(
            texts(store.events("d:2", 0, u64::MAX, 10).await.unwrap()),
            [1, 2]
        );
        assert_eq!(store.head("d:2").await.unwrap(), 2);
        // Nothing written for the damaged ones: heads and events as they were.
        assert_eq!(store.head("d:1").await.unwrap(), u64::MAX);
        assert_eq!(store.head("d:3").await.unwrap(), 1);
        assert_eq!(
            texts(store.events("d:3", 0, u64::MAX, 10).await.unwrap()),
            [1]
        );
        // The outbox holds the healthy conversation's entries only.
        let outbox = store.outbox(lease.shard, None, 100).await.unwrap();
        let listed: Vec<_> = outbox
            .iter()
            .map(|(_, e)| (e.conversation_id.as_str(), e.seq))
            .collect();
        assert_eq!(listed, [("d:3", 1), ("d:2", 1), ("d:2", 2)]);
    }

    /// A head of another length than the 8 bytes the sequencer writes (damage) refuses the
    /// appends of its conversation as damaged, the others of the batch going on. Read as a
    /// number (zero-extended, or cut), it put the next seq among the events held: the append
    /// overwrote one, and every one after it the next.
    #[tokio::test]
    async fn a_head_of_the_wrong_length_refuses_its_appends_as_damage() {
        let dir = tempfile::tempdir().unwrap();
        let store = temp_store(&dir, 1).await;
        let lease = owner(&store, "d:1").await;
        let batch = [message("d:1", "p", "m1"), message("d:1", "p", "m2")];
        store
            .append(lease, &mut HeadCache::default(), &batch)
            .await
            .unwrap();
        for damaged in [vec![1], Vec::new(), vec![2; 9]] {
            let mut damage = Batch::new();
            damage.set(store.keys.head("d:1"), damaged.clone());
            store.kv.commit(damage).await.unwrap();
            let id = format!("m{}", damaged.len() + 3);
            let results = store
                .append(
                    lease,
                    &mut HeadCache::default(),
                    &[message("d:1", "p", &id), message("d:2", "p", &id)],
                )
                .await
                .unwrap();
            assert_eq!(results[0], Err(AppendRefused::Damaged), "{damaged:?}");
            assert!(results[1].is_ok(), "{results:?}");
            assert_eq!(client_ids(&store, "d:1").await, ["m1", "m2"], "{damaged:?}");
        }
    }

    /// A head or a floor of another length than the 8 bytes their writers write (damage) is
    /// refused as damage by every reader of it, one conversation at a time: a catch-up's and a
    /// list's reads answer it alone so, the other conversations read. Read as a number
    /// (zero-extended, or cut), it took a catch-up, an ack or a list past the events that
    /// exist or short of them, and a floor hid retained events from every reader.
    #[tokio::test]
    async fn a_head_or_floor_of_the_wrong_length_is_damage_to_every_reader() {
        let dir = tempfile::tempdir().unwrap();
        let store = temp_store(&dir, 1).await;
        let lease = owner(&store, "d:1").await;
        let batch = [message("d:1", "p", "m1"), message("d:2", "p", "m1")];
        store
            .append(lease, &mut HeadCache::default(), &batch)
            .await
            .unwrap();
        let corrupt = |r: Result<u64, StoreError>| matches!(r, Err(StoreError::Corrupt { .. }));
        for damaged in [vec![1], Vec::new(), vec![2; 9]] {
            for key in [store.keys.head("d:1"), store.keys.floor("d:1")] {
                let mut damage = Batch::new();
                damage.set(key.clone(), damaged.clone());
                store.kv.commit(damage).await.unwrap();
                let head = key == store.keys.head("d:1");
                let both = ["d:1", "d:2"];
                let bounds = store.read_bounds("bob", &both).await.unwrap();
                assert!(corrupt(
                    bounds[0].as_ref().map(|b| b.head).map_err(Clone::clone)
                ));
                assert_eq!(bounds[1].as_ref().unwrap().head, 1, "{damaged:?} {head}");
                let rows = store.conversation_rows("bob", &both).await.unwrap();
                assert_eq!(rows[0].is_err(), head, "{damaged:?}");
                assert_eq!(rows[1].as_ref().unwrap().head, 1);
                if head {
                    assert!(corrupt(store.head("d:1").await), "{damaged:?}");
                    assert!(corrupt(
                        store.ack_bounds("d:1", "bob").await.map(|b| b.head)
                    ));
                } else {
                    assert!(corrupt(store.floor("d:1").await), "{damaged:?}");
                }
                let mut repair = Batch::new();
                match head {
                    true => repair.set(key, 1u64.to_le_bytes().to_vec()),
                    false => repair.clear(key),
                };
                store.kv.commit(repair).await.unwrap();
            }
        }
    }

    /// A head read, then its check against the event above it, with an append landing
    /// between the two (one of unknown outcome that lands late): the head is read again and
    /// the append goes on after the event that landed. Refused as damage, a good
    /// conversation's send was answered `internal`, which clients do not retry. Here one
    /// append lands after the batch's first read (its heads) and another two reads later: the
    /// append that read its head alone again after the first one met the second.
    #[tokio::test]
    async fn a_head_that_moved_between_its_two_reads_is_read_again_not_refused() {
        use crate::faulty_engine::FaultyEngine;
        use std::future::Future;
        use std::pin::Pin;
        type Race = Pin<Box<dyn Future<Output = ()> + Send>>;
        /// Runs `race` after the `n`th read call of `engine` from now.
        fn after_read(engine: &Arc<FaultyEngine>, n: usize, race: Race) {
            match n {
                1 => engine.after_next_read(race),
                _ => {
                    let again = engine.clone();
                    engine.after_next_read(Box::pin(async move { after_read(&again, n - 1, race) }))
                }
            }
        }
        let engine = FaultyEngine::new();
        let store = engine.store(1).await;
        let lease = owner(&store, "d:1").await;
        let land = |id: &'static str| {
            let store = store.clone();
            async move {
                let batch = [message("d:1", "p", id)];
                let landed = store.append(lease, &mut HeadCache::default(), &batch).await;
                assert!(landed.unwrap()[0].is_ok());
            }
        };
        land("m1").await;
        let (second, third) = (land("m2"), land("m3"));
        let again = engine.clone();
        after_read(
            &engine,
            1,
            Box::pin(async move {
                second.await;
                after_read(&again, 2, Box::pin(third));
            }),
        );
        let batch = [message("d:1", "p", "m4")];
        let results = store
            .append(lease, &mut HeadCache::default(), &batch)
            .await
            .unwrap();
        assert_eq!(results[0].as_ref().map(|o| o.seq), Ok(4), "{results:?}");
        assert_eq!(client_ids(&store, "d:1").await, ["m1", "m2", "m3", "m4"]);
    }

    /// The client ids of `conv`'s stored messages, in their order.
    async fn client_ids(store: &MessageStore, conv: &str) -> Vec<String> {
        let events = store.events(conv, 0, u64::MAX, 10).await.unwrap();
        events
            .into_iter()
            .map(|e| match e.payload {
                EventPayload::Message { client_msg_id, .. } => client_msg_id,
                _ => String::new(),
            })
            .collect()
    }

    /// A head of 8 bytes below the events its conversation holds, or none at all beside them
    /// (damage), refuses the appends of its conversation as damaged once it is read (by a
    /// new owner of the shard, or after a restart), the others of the batch going on. Taken as
    /// it was, the next seq fell among the events held: that append overwrote one, and every
    /// one after it the next.
    #[tokio::test]
    async fn a_head_below_the_events_held_refuses_its_appends_as_damage() {
        let dir = tempfile::tempdir().unwrap();
        let store = temp_store(&dir, 1).await;
        let lease = owner(&store, "d:1").await;
        let batch = ["m1", "m2", "m3"].map(|id| message("d:1", "p", id));
        store
            .append(lease, &mut HeadCache::default(), &batch)
            .await
            .unwrap();
        for (i, damaged) in [Some(2u64), Some(0), None].into_iter().enumerate() {
            let mut damage = Batch::new();
            match damaged {
                Some(head) => damage.set(store.keys.head("d:1"), head.to_le_bytes().to_vec()),
                None => damage.clear(store.keys.head("d:1")),
            };
            store.kv.commit(damage).await.unwrap();
            let id = format!("n{i}");
            let results = store
                .append(
                    lease,
                    &mut HeadCache::default(),
                    &[message("d:1", "p", &id), message("d:2", "p", &id)],
                )
                .await
                .unwrap();
            assert_eq!(results[0], Err(AppendRefused::Damaged), "{damaged:?}");
            assert!(results[1].is_ok(), "{results:?}");
            assert_eq!(
                client_ids(&store, "d:1").await,
                ["m1", "m2", "m3"],
                "{damaged:?}"
            );
        }
    }

    /// An event stored under a key of another seq or conversation (damage) is read as an event
    /// that does not decode: the reader's place stays at its key. Taken as it was, a catch-up
    /// or a retention pass that read it went back to its seq and read the same events again,
    /// for ever, and an event of another conversation went to this one's members.
    #[tokio::test]
    async fn an_event_stored_under_another_seqs_key_is_damage() {
        let dir = tempfile::tempdir().unwrap();
        let store = temp_store(&dir, 8).await;
        let lease = owner(&store, "d:1").await;
        let batch = [
            message("d:1", "p", "m1"),
            message("d:1", "p", "m2"),
            message("d:1", "p", "m3"),
        ];
        store
            .append(lease, &mut HeadCache::default(), &batch)
            .await
            .unwrap();
        let first = store.event("d:1", 1).await.unwrap().unwrap();
        let other = Event {
            conversation_id: "d:9".into(),
            ..first.clone()
        };
        for (seq, stored) in [(3, first), (2, other)] {
            let mut damage = Batch::new();
            damage.set(
                store.keys.event("d:1", seq),
                pb::Event::from(stored).encode_to_vec(),
            );
            store.kv.commit(damage).await.unwrap();
        }
        let (events, undecodable) = store
            .events_within_until_undecodable("d:1", 0, u64::MAX, 10, usize::MAX)
            .await
            .unwrap();
        assert_eq!(events.len(), 1);
        assert_eq!(undecodable.map(|u| u.seq), Some(2));
        assert!(store.events("d:1", 2, u64::MAX, 10).await.is_err());
        assert!(store.event("d:1", 3).await.is_err());
        assert!(store.event("d:1", 2).await.is_err());
    }

    /// An append refused as damaged part-way through its writes leaves nothing of them, in the
    /// commit or for the appends after it in the batch: a group whose founder's record does
    /// not decode is not created, and its founder's next message in the batch is not a
    /// member's.
    #[tokio::test]
    async fn an_append_refused_as_damaged_part_way_leaves_nothing_of_its_writes() {
        let dir = tempfile::tempdir().unwrap();
        let store = temp_store(&dir, 1).await;
        let lease = owner(&store, "g:1").await;
        let mut damage = Batch::new();
        damage.set(store.keys.member("g:1", "carol"), vec![0xff; 3]);
        store.kv.commit(damage).await.unwrap();
        let created = EventPayload::GroupCreated {
            name: "g".into(),
            members: vec!["alice".into(), "bob".into(), "carol".into()],
        };
        let text = EventPayload::Message {
            body: Some(Body::Text("hi".into())),
            client_msg_id: "t".into(),
            reply_to: None,
            deleted: false,
        };
        let batch = [
            by("alice", "c", created),
            by("alice", "t", text),
            message("d:2", "p", "b1"),
        ];
        let results = store
            .append(lease, &mut HeadCache::default(), &batch)
            .await
            .unwrap();
        let seqs: Vec<_> = results
            .iter()
            .map(|r| r.as_ref().map(|o| o.seq).map_err(Clone::clone))
            .collect();
        assert_eq!(
            seqs,
            [
                Err(AppendRefused::Damaged),
                Err(AppendRefused::NotMember),
                Ok(1)
            ]
        );
        assert_eq!(store.head("g:1").await.unwrap(), 0);
        assert_eq!(store.member("g:1", "alice").await.unwrap(), None);
        assert!(store.conversation("g:1").await.unwrap().is_none());
        assert_eq!(store.head("d:2").await.unwrap(), 1);
    }

    /// A budgeted read stops before the event that would pass its budget, but returns one
    /// event at least; unbudgeted it reads every event asked for.
    #[tokio::test]
    async fn a_budgeted_read_of_events_stops_at_its_budget_and_returns_one_at_least() {
        let dir = tempfile::tempdir().unwrap();
        let store = temp_store(&dir, 8).await;
        let lease = owner(&store, "d:1").await;
        let mut heads = HeadCache::default();
        let appends: Vec<Append> = (0..300)
            .map(|i| message("d:1", "phone", &format!("m{i:03}")))
            .collect();
        for result in store.append(lease, &mut heads, &appends).await.unwrap() {
            result.unwrap();
        }
        let seqs = |events: Vec<Event>| events.iter().map(|e| e.seq).collect::<Vec<_>>();
        let all = store.events("d:1", 0, u64::MAX, 300).await.unwrap();
        assert_eq!(seqs(all), (1..=300).collect::<Vec<_>>());
        // Every event is stored in as many bytes: its ids have the same lengths.
        let each = store
            .kv
            .range(store.keys.events("d:1", 1, 2), 1, false)
            .await
            .unwrap()[0]
            .1
            .len();
        let page = store
            .events_within("d:1", 0, u64::MAX, 300, 42 * each + each / 2)
            .await
            .unwrap();
        assert_eq!(seqs(page), (1..=42).collect::<Vec<_>>());
        let one = store
            .events_within("d:1", 42, u64::MAX, 300, 0)
            .await
            .unwrap();
        assert_eq!(seqs(one), [43]);
    }

    /// A user's counters near their type's maximum (damage) count as many conversations as
    /// there can be: its creations are refused, the other appends of the batch go on. Summed
    /// with overflow, a debug build's shard actor panicked (failing every append queued on the
    /// shard), and a build without overflow checks wrapped the count below 0, read as none.
    #[tokio::test]
    async fn counters_at_their_maximum_count_as_many_as_there_can_be() {
        let dir = tempfile::tempdir().unwrap();
        let store = temp_store(&dir, 1).await;
        let mut damage = Batch::new();
        for shard in [0, 1] {
            damage
                .add(store.keys.direct_counter("alice", shard), i64::MAX)
                .add(store.keys.group_counter("alice", shard), i64::MAX);
        }
        store.kv.commit(damage).await.unwrap();
        assert_eq!(store.direct_count("alice").await.unwrap(), i64::MAX as u64);
        assert_eq!(store.group_count("alice").await.unwrap(), i64::MAX as u64);
        let lease = owner(&store, "d:1").await;
        let limited = Append {
            create: Some(NewConversation::direct("alice", "bob").started_at_most(2)),
            ..message("d:1", "p", "m1")
        };
        let results = store
            .append(
                lease,
                &mut HeadCache::default(),
                &[limited, message("d:2", "p", "m2")],
            )
            .await
            .unwrap();
        assert_eq!(results[0], Err(AppendRefused::TooManyConversations));
        assert_eq!(results[1].as_ref().unwrap().seq, 1);
    }

    /// A user starts direct conversations up to its limit; it writes on in those, and others
    /// may still start conversations with it (they count for them).
    #[tokio::test]
    async fn a_user_starts_direct_conversations_up_to_its_limit() {
        let dir = tempfile::tempdir().unwrap();
        let store = temp_store(&dir, 8).await;
        let first = |from: &str, to: &str, id: &str| {
            let sender = Sender {
                user: from.into(),
                device: "phone".into(),
            };
            let conv = format!("d:{from}-{to}");
            Append {
                create: Some(NewConversation::direct(from, to).started_at_most(2)),
                ..Append::message(conv, sender, id.into(), Body::Text(id.into()), None)
            }
        };
        let send = |append: Append| {
            let store = &store;
            async move {
                let lease = owner(store, &append.conversation_id).await;
                let mut heads = HeadCache::default();
                store
                    .append(lease, &mut heads, &[append])
                    .await
                    .unwrap()
                    .remove(0)
            }
        };
        assert!(send(first("alice", "bob", "1")).await.is_ok());
        assert!(send(first("alice", "carol", "2")).await.is_ok());
        assert_eq!(
            send(first("alice", "dave", "3")).await,
            Err(AppendRefused::TooManyConversations)
        );
        assert_eq!(store.direct_count("alice").await.unwrap(), 2);
        assert_eq!(send(first("alice", "bob", "4")).await.unwrap().seq, 2);
        assert!(send(first("dave", "alice", "5")).await.is_ok());
        assert_eq!(store.direct_count("dave").await.unwrap(), 1);
        let unlimited = Append {
            create: Some(NewConversation::direct("alice", "erin")),
            ..first("alice", "erin", "6")
        };
        assert!(send(unlimited).await.is_ok(), "0 is no limit");

        // Creations in one batch (one shard's) count each other.
        let shard = store.shard_of("d:frank-p0");
        let peers: Vec<String> = (0..100)
            .map(|i| format!("p{i}"))
            .filter(|peer| store.shard_of(&format!("d:frank-{peer}")) == shard)
            .take(3)
            .collect();
        assert_eq!(peers.len(), 3);
        let batch: Vec<Append> = peers
            .iter()
            .map(|peer| first("frank", peer, &format!("f{peer}")))
            .collect();
        let lease = owner(&store, "d:frank-p0").await;
        let results = store
            .append(lease, &mut HeadCache::default(), &batch)
            .await
            .unwrap();
        assert!(results[0].is_ok() && results[1].is_ok());
        assert_eq!(results[2], Err(AppendRefused::TooManyConversations));
        assert_eq!(store.direct_count("frank").await.unwrap(), 2);
    }

    /// A user's two cursors are its own keys: nobody else's acks move them, even a user's
    /// whose id begins with this one's.
    #[tokio::test]
    async fn a_users_receipt_cursors_are_read_from_its_own_keys_only() {
        let dir = tempfile::tempdir().unwrap();
        let store = temp_store(&dir, 8).await;
        assert_eq!(store.receipt("g:1", "bob").await.unwrap(), (0, 0));
        store
            .acknowledge("bobby", "phone", "g:1", 9, ReceiptKind::Read)
            .await
            .unwrap();
        store
            .acknowledge("bo", "phone", "g:1", 8, ReceiptKind::Read)
            .await
            .unwrap();
        assert_eq!(store.receipt("g:1", "bob").await.unwrap(), (0, 0));
        store
            .acknowledge("bob", "phone", "g:1", 5, ReceiptKind::Delivered)
            .await
            .unwrap();
        assert_eq!(store.receipt("g:1", "bob").await.unwrap(), (5, 0));
        store
            .acknowledge("bob", "laptop", "g:1", 3, ReceiptKind::Read)
            .await
            .unwrap();
        assert_eq!(store.receipt("g:1", "bob").await.unwrap(), (5, 3));
        assert_eq!(store.receipt("g:1", "bobby").await.unwrap(), (9, 9));
        assert_eq!(store.receipt("g:2", "bob").await.unwrap(), (0, 0));
    }

    #[tokio::test]
    async fn seqs_are_dense_per_conversation_and_retries_are_duplicates() {
        let dir = tempfile::tempdir().unwrap();
        let store = temp_store(&dir, 8).await;
        let shard = store.shard_of("d:1");
        let lease = store
            .acquire_shards(Duty::Sequencing, "test", &[shard], usize::MAX, 0, u64::MAX)
            .await
            .unwrap()[0];
        let mut heads = HeadCache::default();
        let batch = [
            message("d:1", "p", "a"),
            message("d:1", "p", "b"),
            message("d:1", "p", "a"),
        ];
        let out = store.append(lease, &mut heads, &batch).await.unwrap();
        let out: Vec<AppendOutcome> = out.into_iter().map(Result::unwrap).collect();
        assert_eq!(
            out.iter().map(|o| (o.seq, o.duplicate)).collect::<Vec<_>>(),
            [(1, false), (2, false), (1, true)]
        );
        let again = store
            .append(
                lease,
                &mut heads,
                &[message("d:1", "p", "b"), message("d:1", "q", "b")],
            )
            .await
            .unwrap();
        let again: Vec<AppendOutcome> = again.into_iter().map(Result::unwrap).collect();
        assert_eq!((again[0].seq, again[0].duplicate), (2, true));
        assert_eq!(
            (again[1].seq, again[1].duplicate),
            (3, false),
            "idempotency is per device"
        );
        assert_eq!(store.head("d:1").await.unwrap(), 3);
        assert_eq!(store.members("d:1").await.unwrap(), ["alice", "bob"]);
        assert_eq!(
            store.outbox(shard, None, 10).await.unwrap().len(),
            3,
            "one outbox entry per new event"
        );
    }

    #[tokio::test]
    async fn a_deposed_owner_cannot_append_or_trim() {
        let dir = tempfile::tempdir().unwrap();
        let store = temp_store(&dir, 8).await;
        let shard = store.shard_of("d:1");
        let old = store
            .acquire_shards(Duty::Sequencing, "test", &[shard], usize::MAX, 0, u64::MAX)
            .await
            .unwrap()[0];
        let new = store
            .acquire_shards(Duty::Sequencing, "test", &[shard], usize::MAX, 0, u64::MAX)
            .await
            .unwrap()[0];
        assert_eq!(new.epoch, old.epoch + 1);
        let refused = store
            .append(old, &mut HeadCache::default(), &[message("d:1", "p", "a")])
            .await;
        assert!(matches!(refused, Err(StoreError::FenceChanged { .. })));
        assert_eq!(
            store.head("d:1").await.unwrap(),
            0,
            "nothing of the refused batch landed"
        );
        store
            .append(new, &mut HeadCache::default(), &[message("d:1", "p", "a")])
            .await
            .unwrap();
        assert!(matches!(
            store.trim(old, "d:1", 2, &[]).await,
            Err(StoreError::FenceChanged { .. })
        ));
        assert_eq!(store.trim(new, "d:1", 2, &[]).await.unwrap(), 1);
        assert_eq!(store.floor("d:1").await.unwrap(), 2);
        assert!(
            store
                .events("d:1", 0, u64::MAX, 10)
                .await
                .unwrap()
                .is_empty()
        );
    }

    /// The outcome of the first append of a batch that must succeed.
    fn first(results: Result<Vec<AppendResult>, StoreError>) -> AppendOutcome {
        results.unwrap().into_iter().next().unwrap().unwrap()
    }

    fn appended(results: Vec<AppendResult>) -> Vec<u64> {
        results.into_iter().map(|r| r.unwrap().seq).collect()
    }

    fn by(user: &str, key: &str, payload: EventPayload) -> Append {
        Append {
            conversation_id: "g:1".into(),
            sender: Sender {
                user: user.into(),
                device: "p".into(),
            },
            key: AppendKey::Server(key.into()),
            payload,
            create: None,
        }
    }

    fn change(users: &[&str]) -> MembershipChange {
        MembershipChange::new(users.iter().map(|u| u.to_string()).collect())
    }

    /// `g:1` created by alice with bob (seq 1), then `then` by alice (seq 2).
    async fn alice_and_bobs_group(store: &MessageStore, then: EventPayload) -> HeadCache {
        let lease = owner(store, "g:1").await;
        let mut heads = HeadCache::default();
        let created = EventPayload::GroupCreated {
            name: "g".into(),
            members: vec!["alice".into(), "bob".into()],
        };
        let appends = [by("alice", "c", created), by("alice", "then", then)];
        let results = store.append(lease, &mut heads, &appends).await.unwrap();
        assert!(results.iter().all(Result::is_ok), "{results:?}");
        heads
    }

    /// The references a download checks are those of the user's conversations, found by a
    /// leapfrog over the media's references and the user's list: media sent to 300
    /// conversations costs a user in three of them, or a stranger, a few rows, not 300.
    #[tokio::test]
    async fn a_users_references_to_media_are_read_without_the_others() {
        let engine = crate::faulty_engine::FaultyEngine::new();
        let store = engine.store(8).await;
        let keys = store.keys();
        let mut batch = Batch::new();
        for i in 0..300 {
            batch.set(keys.media_reference("m1", &format!("d:{i}"), 5), Vec::new());
        }
        // Two messages in "d:12", which sorts after "d:1" and before "d:120".
        batch.set(keys.media_reference("m1", "d:12", 9), Vec::new());
        batch.set(keys.media_reference("m2", "d:7", 1), Vec::new());
        for (conv, left) in [
            ("d:12", None),
            ("d:7", None),
            ("g:x", None),
            ("d:299", Some(6)),
        ] {
            batch.set(keys.user_conversation("carol", conv), encode_left_seq(left));
        }
        batch.set(
            keys.user_conversation("mallory", "g:y"),
            encode_left_seq(None),
        );
        engine.commit(batch).await.unwrap();

        let before = engine.rows_read();
        let carols = store.media_references_for("m1", "carol").await.unwrap();
        let rows = engine.rows_read() - before;
        let expected = [("d:12", 5), ("d:12", 9), ("d:299", 5), ("d:7", 5)];
        assert_eq!(carols, expected.map(|(conv, seq)| (conv.to_owned(), seq)));
        assert!(rows <= 20, "{rows} rows read");

        let before = engine.rows_read();
        assert!(
            store
                .media_references_for("m1", "mallory")
                .await
                .unwrap()
                .is_empty()
        );
        assert!(
            store
                .media_references_for("m1", "nobody")
                .await
                .unwrap()
                .is_empty()
        );
        assert!(
            store
                .media_references_for("m3", "carol")
                .await
                .unwrap()
                .is_empty()
        );
        assert!(engine.rows_read() - before <= 3);
    }

    /// A batch reads what it decides on in one call (one round trip to a store node): its
    /// idempotency records, its senders' membership and the heads not cached; and the heads it
    /// read are checked against the events above them in one more, once, as the cache takes
    /// them.
    #[tokio::test]
    async fn an_append_batch_reads_the_store_in_one_call() {
        let engine = crate::faulty_engine::FaultyEngine::new();
        let store = engine.store(8).await;
        alice_and_bobs_group(&store, EventPayload::MemberAdded(change(&["carol"]))).await;
        let lease = owner(&store, "g:1").await;
        let text = |user: &str, id: &str| {
            let sender = Sender {
                user: user.into(),
                device: "p".into(),
            };
            Append::message("g:1".into(), sender, id.into(), Body::Text(id.into()), None)
        };
        let mut heads = HeadCache::default();
        let before = engine.read_calls();
        let batch = [
            text("bob", "b1"),
            text("carol", "c1"),
            text("mallory", "m1"),
            text("bob", "b1"),
        ];
        let results = store.append(lease, &mut heads, &batch).await.unwrap();
        assert_eq!(
            engine.read_calls() - before,
            2,
            "one call for the batch, one for the events above the head it read"
        );
        let seqs: Vec<_> = results
            .iter()
            .map(|r| r.as_ref().map(|o| o.seq).map_err(Clone::clone))
            .collect();
        assert_eq!(
            seqs,
            [Ok(3), Ok(4), Err(AppendRefused::NotMember), Ok(3)],
            "the head (2) was read, bob and carol are members, mallory is not"
        );
        assert!(results[3].as_ref().unwrap().duplicate);
        // A retry in a later batch finds the idempotency record read with the batch, in one
        // call: the head is cached.
        let before = engine.read_calls();
        let again = store.append(lease, &mut heads, &batch[..1]).await.unwrap();
        assert_eq!(engine.read_calls() - before, 1, "one call for the batch");
        assert!(again[0].as_ref().unwrap().duplicate);
        assert_eq!(again[0].as_ref().unwrap().seq, 3);
    }

    #[tokio::test]
    async fn read_bounds_reads_every_conversation_in_one_call() {
        let engine = crate::faulty_engine::FaultyEngine::new();
        let store = engine.store(8).await;
        let removed = EventPayload::MemberRemoved(change(&["bob"]));
        let mut heads = alice_and_bobs_group(&store, removed).await;
        let lease = owner(&store, "d:1").await;
        let sent = store
            .append(lease, &mut heads, &[message("d:1", "p", "m")])
            .await
            .unwrap();
        assert!(sent[0].is_ok());
        let before = engine.read_calls();
        let bounds = store
            .read_bounds("bob", &["g:1", "d:1", "g:9"])
            .await
            .unwrap()
            .into_iter()
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        assert_eq!(engine.read_calls() - before, 1, "one call for all");
        let expected = [
            ("g:1", store.member("g:1", "bob").await.unwrap(), 2),
            ("d:1", store.member("d:1", "bob").await.unwrap(), 1),
            ("g:9", None, 0),
        ];
        for (bounds, (conv, member, head)) in bounds.iter().zip(expected) {
            assert_eq!(bounds.member, member, "{conv}");
            assert_eq!(bounds.head, head, "{conv}");
            assert_eq!(bounds.floor, 1, "{conv}");
        }
        assert!(
            !bounds[0].member.as_ref().unwrap().is_member(),
            "bob left g:1"
        );
        assert!(bounds[1].member.as_ref().unwrap().is_member());
    }

    #[tokio::test]
    async fn ack_bounds_reads_membership_head_and_receipts_in_one_call() {
        let engine = crate::faulty_engine::FaultyEngine::new();
        let store = engine.store(8).await;
        alice_and_bobs_group(&store, EventPayload::MemberAdded(change(&["carol"]))).await;
        store
            .acknowledge("bob", "phone", "g:1", 2, ReceiptKind::Delivered)
            .await
            .unwrap();
        let before = engine.read_calls();
        let bob = store.ack_bounds("g:1", "bob").await.unwrap();
        assert_eq!(
            engine.read_calls() - before,
            1,
            "one call for the four keys"
        );
        assert_eq!(bob.member, store.member("g:1", "bob").await.unwrap());
        assert!(bob.member.unwrap().is_member());
        assert_eq!((bob.head, bob.delivered, bob.read), (2, 2, 0));
        let stranger = store.ack_bounds("g:1", "mallory").await.unwrap();
        assert_eq!(stranger.member, None);
        assert_eq!((stranger.delivered, stranger.read), (0, 0));
    }

    #[tokio::test]
    async fn membership_follows_its_events_and_deletes_tombstone_the_target() {
        let dir = tempfile::tempdir().unwrap();
        let store = temp_store(&dir, 8).await;
        let lease = owner(&store, "g:1").await;
        let mut heads = HeadCache::default();
        let mut hello = message("g:1", "p", "m");
        hello.create = None;
        let results = store
            .append(
                lease,
                &mut heads,
                &[
                    by(
                        "alice",
                        "create",
                        EventPayload::GroupCreated {
                            name: "g".into(),
                            members: vec!["alice".into(), "bob".into()],
                        },
                    ),
                    hello,
                    by(
                        "alice",
                        "add",
                        EventPayload::MemberAdded(change(&["carol"])),
                    ),
                    by("alice", "rm", EventPayload::MemberRemoved(change(&["bob"]))),
                    by("alice", "del", EventPayload::Delete { target_seq: 2 }),
                ],
            )
            .await
            .unwrap();
        assert_eq!(appended(results), [1, 2, 3, 4, 5]);
        let members = store.member_records("g:1").await.unwrap();
        assert_eq!(
            members
                .iter()
                .map(|(u, m)| (u.as_str(), m.admin, m.joined_seq, m.sees(4), m.sees(5)))
                .collect::<Vec<_>>(),
            [
                ("alice", true, 1, true, true),
                ("bob", false, 0, true, false),
                ("carol", false, 3, true, true)
            ],
            "bob is a former member who saw his own removal and nothing after"
        );
        assert_eq!(store.members("g:1").await.unwrap(), ["alice", "carol"]);
        assert_eq!(
            store.conversations_of("bob").await.unwrap(),
            [UserConversation {
                conversation_id: "g:1".into(),
                left_seq: Some(4)
            }]
        );
        assert_eq!(store.group_count("bob").await.unwrap(), 0);
        assert_eq!(store.group_count("carol").await.unwrap(), 1);
        let target = store.event("g:1", 2).await.unwrap().unwrap();
        assert!(matches!(
            target.payload,
            EventPayload::Message {
                body: None,
                deleted: true,
                ..
            }
        ));
    }

    #[tokio::test]
    async fn membership_is_decided_in_the_sequenced_commit() {
        let dir = tempfile::tempdir().unwrap();
        let store = temp_store(&dir, 8).await;
        let lease = owner(&store, "g:1").await;
        let mut heads = HeadCache::default();
        let created = EventPayload::GroupCreated {
            name: "g".into(),
            members: vec!["alice".into(), "bob".into()],
        };
        let mut from_bob = message("g:1", "p", "late");
        from_bob.create = None;
        from_bob.sender.user = "bob".into();
        let results = store
            .append(
                lease,
                &mut heads,
                &[
                    by("alice", "c", created.clone()),
                    // Two racing adds of one user: one event, one count.
                    by(
                        "alice",
                        "a1",
                        EventPayload::MemberAdded(change(&["carol", "dan"])),
                    ),
                    by("alice", "a2", EventPayload::MemberAdded(change(&["carol"]))),
                    // A member who is not an admin adds no one and removes only itself.
                    by("bob", "a3", EventPayload::MemberAdded(change(&["eve"]))),
                    by("bob", "r1", EventPayload::MemberRemoved(change(&["carol"]))),
                    by("bob", "r2", EventPayload::MemberRemoved(change(&["bob"]))),
                    // Removed twice: the second changes nothing (the count cannot drift).
                    by("alice", "r3", EventPayload::MemberRemoved(change(&["bob"]))),
                    // A send that passed a check before the removal is refused after it.
                    from_bob,
                    by("mallory", "x", EventPayload::Delete { target_seq: 1 }),
                    by("alice", "c2", created),
                ],
            )
            .await
            .unwrap();
        use AppendRefused::*;
        let summary: Vec<Result<u64, AppendRefused>> =
            results.into_iter().map(|r| r.map(|o| o.seq)).collect();
        assert_eq!(
            summary,
            [
                Ok(1),
                Ok(2),
                Err(NoChange),
                Err(NotAdmin),
                Err(NotAdmin),
                Ok(3),
                Err(NoChange),
                Err(NotMember),
                Err(NotMember),
                Err(NoChange)
            ]
        );
        assert_eq!(store.head("g:1").await.unwrap(), 3, "seqs stay dense");
        let added = store.event("g:1", 2).await.unwrap().unwrap();
        assert_eq!(
            added.payload,
            EventPayload::MemberAdded(change(&["carol", "dan"]))
        );
        assert_eq!(store.group_count("carol").await.unwrap(), 1);
        assert_eq!(store.group_count("bob").await.unwrap(), 0);
    }

    #[tokio::test]
    async fn the_head_cache_stays_bounded_and_heads_are_read_again_after_eviction() {
        let dir = tempfile::tempdir().unwrap();
        let store = temp_store(&dir, 8).await;
        let lease = store
            .acquire_shards(Duty::Sequencing, "test", &[0], usize::MAX, 0, u64::MAX)
            .await
            .unwrap()[0];
        let convs: Vec<String> = (0..)
            .map(|i| format!("d:{i}"))
            .filter(|c| store.shard_of(c) == 0)
            .take(5)
            .collect();
        let mut heads = HeadCache::with_capacity(2);
        for round in 1..=2 {
            for conv in &convs {
                let out = first(
                    store
                        .append(
                            lease,
                            &mut heads,
                            &[message(conv, "p", &format!("m{round}"))],
                        )
                        .await,
                );
                assert_eq!(out.seq, round, "{conv}");
                assert!(heads.heads.len() <= 2, "{} heads cached", heads.heads.len());
            }
        }
    }

    #[tokio::test]
    async fn server_keys_and_client_ids_never_collide() {
        let dir = tempfile::tempdir().unwrap();
        let store = temp_store(&dir, 8).await;
        let lease = owner(&store, "d:1").await;
        let mut heads = HeadCache::default();
        let mut delete = message("d:1", "p", "x");
        delete.key = AppendKey::Server("delete:1".into());
        delete.payload = EventPayload::Delete { target_seq: 1 };
        let results = store
            .append(
                lease,
                &mut heads,
                &[
                    message("d:1", "p", "first"),
                    message("d:1", "p", "delete:1"),
                    delete,
                ],
            )
            .await
            .unwrap();
        let outcomes: Vec<(u64, bool)> = results
            .into_iter()
            .map(|r| r.map(|o| (o.seq, o.duplicate)).unwrap())
            .collect();
        assert_eq!(outcomes, [(1, false), (2, false), (3, false)]);
        assert!(matches!(
            store.event("d:1", 1).await.unwrap().unwrap().payload,
            EventPayload::Message { deleted: true, .. }
        ));
    }

    #[tokio::test]
    async fn media_records_are_charged_to_their_owner_once_and_given_back_when_forgotten() {
        let dir = tempfile::tempdir().unwrap();
        let store = temp_store(&dir, 8).await;
        let record = |owner: &str, mime: &str| MediaRecord {
            mime: mime.into(),
            size: 600,
            sha256: "ab".into(),
            created_ms: 1,
            owner: owner.into(),
            shared_ms: 0,
        };
        let png = record("alice", "image/png");
        assert_eq!(
            store.put_media("m1", &png, 1000).await.unwrap(),
            MediaAdmission::Recorded
        );
        let mut later = png.clone();
        later.created_ms = 2;
        assert_eq!(
            store.put_media("m1", &later, 1000).await.unwrap(),
            MediaAdmission::Recorded,
            "the same upload again is free"
        );
        assert_eq!(store.media_usage("alice").await.unwrap(), 600);
        assert_eq!(
            store
                .put_media("m2", &record("alice", "text/html"), 1000)
                .await
                .unwrap(),
            MediaAdmission::OverQuota { used: 600 }
        );
        let bobs = record("bob", "image/png");
        store.put_media("m3", &bobs, 1000).await.unwrap();
        assert!(
            matches!(
                store.forget_media("m1", &png).await,
                Err(StoreError::FenceChanged { .. })
            ),
            "a record uploaded again since it was read is kept"
        );
        store.forget_media("m1", &later).await.unwrap();
        assert_eq!(store.media_usage("alice").await.unwrap(), 0);
        assert!(
            store.blob_in_use("ab").await.unwrap(),
            "bob's record keeps the bytes"
        );
        store.forget_media("m3", &bobs).await.unwrap();
        assert!(!store.blob_in_use("ab").await.unwrap());
    }

    /// An unreferenced image alice uploaded long ago, and a direct message of hers sharing
    /// it in `d:1`.
    async fn an_old_upload_and_a_message_sharing_it(store: &MessageStore) -> Append {
        let record = MediaRecord {
            mime: "image/png".into(),
            size: 1,
            sha256: "00".into(),
            created_ms: 1,
            owner: "alice".into(),
            shared_ms: 0,
        };
        store.put_media("m1", &record, 0).await.unwrap();
        let sender = Sender {
            user: "alice".into(),
            device: "p".into(),
        };
        let picture = courier_proto::Media {
            media_id: "m1".into(),
            mime: "image/png".into(),
            size: 1,
            sha256: "00".into(),
            name: None,
            caption: None,
        };
        Append {
            create: Some(NewConversation::direct("alice", "bob")),
            ..Append::message(
                "d:1".into(),
                sender,
                "x".into(),
                Body::Media(Box::new(picture)),
                None,
            )
        }
    }

    /// The media sweeper's steps (`courier_media::MediaService::sweep`) are: the record is
    /// old, `is_media_referenced` says no, then `forget_media` fenced on the record read. A
    /// send that shares the media between the check and the forget marks it shared first
    /// (`courier_chat`), so the forget fails and the message keeps its media.
    #[tokio::test]
    async fn a_send_between_the_sweepers_check_and_forget_keeps_its_media() {
        let dir = tempfile::tempdir().unwrap();
        let store = temp_store(&dir, 8).await;
        let append = an_old_upload_and_a_message_sharing_it(&store).await;
        // The sweeper: old and unreferenced.
        let swept = store.media("m1").await.unwrap().unwrap();
        assert!(!store.is_media_referenced("m1").await.unwrap());
        // Meanwhile alice sends it: the record as the send read it is marked shared, then the
        // message commits its reference.
        let read = store.media("m1").await.unwrap().unwrap();
        store.share_media("m1", &read, 5_000).await.unwrap();
        let lease = owner(&store, "d:1").await;
        let mut heads = HeadCache::default();
        let sent = store
            .append(lease, &mut heads, &[append])
            .await
            .unwrap()
            .remove(0)
            .unwrap();
        // The sweeper forgets what it read as unreferenced.
        assert!(matches!(
            store.forget_media("m1", &swept).await,
            Err(StoreError::FenceChanged { .. })
        ));
        let kept = store.media("m1").await.unwrap().unwrap();
        assert_eq!(
            (kept.latest_use_ms(), kept.owner.as_str()),
            (5_000, "alice")
        );
        assert_eq!(
            store.media_references("m1").await.unwrap(),
            [("d:1".to_owned(), sent.seq)]
        );
    }

    /// A send that read the record before the sweeper forgot it cannot mark it shared: the
    /// record stays forgotten, and the send is refused before its message commits.
    #[tokio::test]
    async fn media_the_sweeper_forgot_cannot_be_marked_shared_by_a_send_that_read_it_before() {
        let dir = tempfile::tempdir().unwrap();
        let store = temp_store(&dir, 8).await;
        an_old_upload_and_a_message_sharing_it(&store).await;
        let read = store.media("m1").await.unwrap().unwrap();
        store.forget_media("m1", &read).await.unwrap();
        assert!(matches!(
            store.share_media("m1", &read, 5_000).await,
            Err(StoreError::FenceChanged { .. })
        ));
        assert_eq!(store.media("m1").await.unwrap(), None);
    }

    /// The outbox's raw rows of `shard` (each a commit's entries, `outbox_rows`).
    async fn outbox_rows(store: &MessageStore, shard: u32) -> usize {
        store
            .kv
            .range(store.keys.outbox(shard), usize::MAX, false)
            .await
            .unwrap()
            .len()
    }

    #[tokio::test]
    async fn a_commits_outbox_entries_are_one_row_read_back_entry_by_entry() {
        let dir = tempfile::tempdir().unwrap();
        let store = temp_store(&dir, 8).await;
        let shard = store.shard_of("d:1");
        let lease = owner(&store, "d:1").await;
        let mut heads = HeadCache::default();
        let batch = [
            message("d:1", "p", "a"),
            message("d:1", "p", "b"),
            message("d:1", "p", "c"),
        ];
        let listed = store
            .append_listed(lease, &mut heads, &batch)
            .await
            .unwrap()
            .outbox
            .unwrap();
        assert_eq!(
            outbox_rows(&store, shard).await,
            1,
            "one row for the commit"
        );

        let read = store.outbox(shard, None, 10).await.unwrap();
        let keys: Vec<&[u8]> = read.iter().map(|(k, _)| k.as_slice()).collect();
        let listed_keys: Vec<&[u8]> = listed.iter().map(|e| e.key.as_slice()).collect();
        assert_eq!(
            keys, listed_keys,
            "the entries keep the keys the commit listed"
        );
        assert_eq!(
            read.iter().map(|(_, e)| e.seq).collect::<Vec<_>>(),
            [1, 2, 3]
        );
        // Positions inside the row: a bound after an entry, an entry's own key, a short page.
        let seqs =
            |entries: Vec<OutboxEntry>| entries.iter().map(|(_, e)| e.seq).collect::<Vec<_>>();
        let after_first = bound_after(&read[0].0);
        assert_eq!(
            seqs(store.outbox(shard, Some(&after_first), 10).await.unwrap()),
            [2, 3]
        );
        assert_eq!(
            seqs(store.outbox(shard, Some(&read[2].0), 10).await.unwrap()),
            [3]
        );
        assert_eq!(
            seqs(store.outbox(shard, Some(&after_first), 1).await.unwrap()),
            [2]
        );
        // The headers of the same entries, from the same positions.
        let position = (shard, Some(after_first.clone()));
        let (headers, more) = store
            .outbox_headers(&[position], 10, 10)
            .await
            .unwrap()
            .remove(0);
        assert!(!more);
        assert_eq!(
            headers
                .iter()
                .map(|(k, h)| (k.as_slice(), h.as_ref().unwrap()))
                .map(|(k, h)| (k, h.seq, h.is_message()))
                .collect::<Vec<_>>(),
            [
                (read[1].0.as_slice(), 2, true),
                (read[2].0.as_slice(), 3, true)
            ]
        );
        // A page counts its rows and its entries apart: one row gives every entry asked for.
        let page = |rows: usize, entries: usize| {
            let store = &store;
            async move {
                let (headers, more) = store
                    .outbox_headers(&[(shard, None)], rows, entries)
                    .await
                    .unwrap()
                    .remove(0);
                let seqs = headers.iter().map(|(_, h)| h.as_ref().unwrap().seq);
                (seqs.collect::<Vec<_>>(), more)
            }
        };
        assert_eq!(page(2, 10).await, (vec![1, 2, 3], false));
        assert_eq!(page(2, 2).await, (vec![1, 2], true));
        assert_eq!(
            page(1, 10).await,
            (vec![1, 2, 3], true),
            "rows full: read on"
        );
        let after_last = bound_after(&read[2].0);
        assert!(
            store
                .outbox(shard, Some(&after_last), 10)
                .await
                .unwrap()
                .is_empty()
        );
        assert_eq!(
            store.last_outbox_key(shard).await.unwrap(),
            Some(read[2].0.clone())
        );
    }

    #[tokio::test]
    async fn the_outbox_is_cleared_row_by_row_and_a_row_a_bound_splits_stays() {
        let dir = tempfile::tempdir().unwrap();
        let store = temp_store(&dir, 8).await;
        let shard = store.shard_of("d:1");
        let lease = owner(&store, "d:1").await;
        let mut heads = HeadCache::default();
        let first = [message("d:1", "p", "a"), message("d:1", "p", "b")];
        store.append(lease, &mut heads, &first).await.unwrap();
        store
            .append(lease, &mut heads, &[message("d:1", "p", "c")])
            .await
            .unwrap();
        let read = store.outbox(shard, None, 10).await.unwrap();
        assert_eq!((read.len(), outbox_rows(&store, shard).await), (3, 2));
        let start = store.keys.outbox(shard).start;
        let clear_to = |end: Vec<u8>| PushedBound {
            shard,
            bound: end.clone(),
            clear: Some(start.clone()..end),
        };

        // A bound inside the first commit's row: the row holds an entry not passed, it stays.
        let inside = bound_after(&read[0].0);
        store
            .expand_outbox(&[clear_to(inside.clone())], &[])
            .await
            .unwrap();
        assert_eq!(outbox_rows(&store, shard).await, 2);
        assert_eq!(
            store.outbox(shard, Some(&inside), 10).await.unwrap(),
            read[1..]
        );

        // A bound at the end of that row: the row goes, even though it is the bound's commit.
        let end_of_row = bound_after(&read[1].0);
        store
            .expand_outbox(&[clear_to(end_of_row)], &[])
            .await
            .unwrap();
        assert_eq!(outbox_rows(&store, shard).await, 1);
        assert_eq!(store.outbox(shard, None, 10).await.unwrap(), read[2..]);

        // Past every entry: nothing is left.
        store
            .expand_outbox(&[clear_to(bound_after(&read[2].0))], &[])
            .await
            .unwrap();
        assert_eq!(outbox_rows(&store, shard).await, 0);
    }

    #[tokio::test]
    async fn an_outbox_entry_left_by_a_version_before_rows_is_read_as_one_entry() {
        let dir = tempfile::tempdir().unwrap();
        let store = temp_store(&dir, 8).await;
        let shard = store.shard_of("d:1");
        let lease = owner(&store, "d:1").await;
        let mut heads = HeadCache::default();
        // As the previous version wrote it: one row per event, its value the event alone.
        let event = courier_proto::Event {
            conversation_id: "d:1".into(),
            seq: 7,
            server_msg_id: "m-7".into(),
            sender: Sender {
                user: "alice".into(),
                device: "p".into(),
            },
            ts_ms: 1,
            payload: EventPayload::Message {
                body: Some(Body::Text("old".into())),
                client_msg_id: "old".into(),
                reply_to: None,
                deleted: false,
            },
        };
        let mut old = Batch::new();
        for order in 0..2 {
            old.set_versionstamped_key(
                store.keys.outbox_entry(shard, order),
                pb::Event::from(event.clone()).encode_to_vec(),
            );
        }
        store.kv.commit(old).await.unwrap();
        store
            .append(lease, &mut heads, &[message("d:1", "p", "new")])
            .await
            .unwrap();

        let read = store.outbox(shard, None, 10).await.unwrap();
        assert_eq!(
            read.iter().map(|(_, e)| e.seq).collect::<Vec<_>>(),
            [7, 7, 1]
        );
        // A bound after the first old entry passes it and keeps its commit's second one.
        let after = bound_after(&read[0].0);
        assert_eq!(
            store.outbox(shard, Some(&after), 10).await.unwrap(),
            read[1..]
        );
        store
            .expand_outbox(
                &[PushedBound {
                    shard,
                    bound: after.clone(),
                    clear: Some(store.keys.outbox(shard).start..after),
                }],
                &[],
            )
            .await
            .unwrap();
        assert_eq!(store.outbox(shard, None, 10).await.unwrap(), read[1..]);
    }

    /// An outbox row that does not decode counts as one waiting entry in the shard's lag, whose
    /// oldest age is then that of the oldest entry that decodes: the shard map (the admin API,
    /// the rebalancer) still lists every shard. It failed the whole map.
    #[tokio::test]
    async fn a_damaged_outbox_row_counts_in_the_lag_and_fails_no_shard_map() {
        let engine = crate::faulty_engine::FaultyEngine::new();
        let store = engine.store(4).await;
        let conv = "d:1";
        let shard = store.shard_of(conv);
        let mut row = Batch::new();
        row.set_versionstamped_key(store.keys.outbox_entry(shard, 0), vec![0, 0xff, 0xff]);
        store.kv.commit(row).await.unwrap();
        let lease = owner(&store, conv).await;
        store
            .append(
                lease,
                &mut HeadCache::default(),
                &[message(conv, "p", "hello")],
            )
            .await
            .unwrap();
        let entries = store.outbox_entries(shard, None, 10).await.unwrap();
        assert_eq!(entries.len(), 2);
        let ts_ms = entries[1].1.as_ref().unwrap().ts_ms;

        let lag = store.outbox_lag(shard, 10).await.unwrap();
        assert_eq!((lag.entries, lag.oldest_ts_ms), (2, Some(ts_ms)));
        let map = store.shard_map(10).await.unwrap();
        assert_eq!(map[shard as usize].outbox, lag);
    }

    /// The headers of several shards' outboxes come with one read; a row that cannot be read
    /// is one entry of its shard's page, with its error, after the entries before it; read
    /// from past its key, it is passed over.
    #[tokio::test]
    async fn the_outbox_headers_of_several_shards_are_one_read_and_a_damaged_row_is_an_entry_in_error()
     {
        let engine = crate::faulty_engine::FaultyEngine::new();
        let store = engine.store(64).await;
        let mut convs: Vec<String> = Vec::new();
        for i in 0.. {
            let conv = format!("d:{i}");
            if convs
                .iter()
                .all(|c| store.shard_of(c) != store.shard_of(&conv))
            {
                convs.push(conv);
            }
            if convs.len() == 3 {
                break;
            }
        }
        for conv in &convs {
            let lease = owner(&store, conv).await;
            let append = message(conv, "p", "hello");
            store
                .append(lease, &mut HeadCache::default(), &[append])
                .await
                .unwrap();
        }
        let damaged = store.shard_of(&convs[2]);
        let mut row = Batch::new();
        row.set_versionstamped_key(store.keys.outbox_entry(damaged, 0), vec![0, 0xff, 0xff]);
        store.kv.commit(row).await.unwrap();

        let positions: Vec<(u32, Option<Vec<u8>>)> =
            convs.iter().map(|c| (store.shard_of(c), None)).collect();
        let before = engine.read_calls();
        let read = store.outbox_headers(&positions, 10, 10).await.unwrap();
        assert_eq!(
            engine.read_calls() - before,
            1,
            "one read for the three shards"
        );
        for (conv, (headers, _)) in convs.iter().zip(&read) {
            let decoded: Vec<(&str, u64)> = headers
                .iter()
                .filter_map(|(_, h)| h.as_ref().ok())
                .map(|h| (h.conversation_id.as_str(), h.seq))
                .collect();
            assert_eq!(decoded, [(conv.as_str(), 1)]);
        }
        let (damaged_page, _) = &read[2];
        assert_eq!(damaged_page.len(), 2, "{damaged_page:?}");
        let (row_key, error) = &damaged_page[1];
        assert!(
            matches!(error, Err(StoreError::Corrupt { key, .. }) if key == row_key),
            "{error:?}"
        );
        let past = vec![(damaged, Some(bound_after(row_key)))];
        let (after, more) = store.outbox_headers(&past, 10, 10).await.unwrap().remove(0);
        assert!(after.is_empty() && !more, "{after:?}");
        assert_eq!(
            store.last_outbox_key(damaged).await.unwrap().as_ref(),
            Some(row_key)
        );
    }

    /// Ann's device `device` seen (linked if new), at most `max` of hers linked.
    async fn link(
        store: &MessageStore,
        device: &str,
        max: u64,
    ) -> Result<Option<DeviceRecord>, TooManyDevices> {
        let seen = |record: Option<&DeviceRecord>| {
            Some(DeviceRecord {
                last_seen_ms: 1_000,
                ..record.cloned().unwrap_or_default()
            })
        };
        store
            .record_device_link("ann", device, seen, max)
            .await
            .unwrap()
    }

    /// A user's first device takes no count of links (one more key in memory for every new
    /// user); its second does, and the limit is exact from there on.
    #[tokio::test]
    async fn a_users_first_device_writes_no_count_of_links_and_its_second_does() {
        let engine = crate::faulty_engine::FaultyEngine::new();
        let store = engine.store(8).await;
        let links = store.keys.device_links("ann");
        link(&store, "phone", 32).await.unwrap();
        assert_eq!(store.kv.get(&links).await.unwrap(), None);
        link(&store, "laptop", 32).await.unwrap();
        assert!(store.kv.get(&links).await.unwrap().is_some());
    }

    /// A new device of a user at `--max-devices-per-user` is refused, naming the device seen
    /// least recently; a device already linked is not, and one unlinked frees its place.
    #[tokio::test]
    async fn a_new_device_past_the_limit_is_refused_and_a_linked_one_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let store = &temp_store(&dir, 8).await;
        link(store, "phone", 2).await.unwrap();
        let laptop = |_: Option<&DeviceRecord>| Some(DeviceRecord::default());
        store.update_device("ann", "laptop", laptop).await.unwrap();
        let refused = link(store, "tablet", 2).await.unwrap_err();
        assert_eq!(
            refused,
            TooManyDevices {
                max: 2,
                least_recent: "laptop".into()
            },
            "the laptop never connected"
        );
        assert_eq!(store.device("ann", "tablet").await.unwrap(), None);
        assert!(link(store, "phone", 2).await.is_ok(), "linked already");
        assert!(
            link(store, "phone", 1).await.is_ok(),
            "past a lowered limit"
        );
        assert!(link(store, "tablet", 0).await.is_ok(), "no limit");
        assert!(store.unlink_device("ann", "laptop", 5_000).await.unwrap());
        assert!(store.unlink_device("ann", "tablet", 5_000).await.unwrap());
        assert!(link(store, "watch", 2).await.is_ok(), "the laptop's place");
    }

    /// A key of a user's own lists (their conversations, a device's cursors, their devices)
    /// that does not parse (damage, or a bug) is passed over, and the rest of the list is
    /// read. Failing on it, the whole list failed, and with the conversations or the cursors
    /// every catch-up of the user's devices: none of them could connect.
    #[tokio::test]
    async fn a_key_of_a_users_lists_that_does_not_parse_is_passed_over() {
        let dir = tempfile::tempdir().unwrap();
        let store = temp_store(&dir, 8).await;
        link(&store, "phone", 0).await.unwrap();
        let mut batch = Batch::new();
        batch
            .set(store.keys.user_conversation("ann", "d:1"), Vec::new())
            .max(store.keys.cursor("ann", "phone", "d:1"), 3);
        let lists = [
            store.keys.user_conversations("ann"),
            store.keys.cursors("ann", "phone"),
            store.keys.devices("ann"),
        ];
        for list in lists {
            // An integer where the list's id goes, inside the list's range.
            let mut damaged = list.start;
            damaged.pop();
            damaged.extend([0x15, 7]);
            assert!(damaged < list.end);
            batch.set(damaged, Vec::new());
        }
        store.kv.commit(batch).await.unwrap();
        let convs = store.conversations_of("ann").await.unwrap();
        let ids: Vec<_> = convs.iter().map(|c| c.conversation_id.as_str()).collect();
        assert_eq!(ids, ["d:1"]);
        let cursors = store.device_cursors("ann", "phone").await.unwrap();
        let cursors: Vec<_> = cursors.iter().map(|(c, seq)| (c.as_str(), *seq)).collect();
        assert_eq!(cursors, [("d:1", 3)]);
        for devices in [
            store.devices("ann").await.unwrap(),
            store.devices_of(&["ann"]).await.unwrap().remove(0),
        ] {
            let ids: Vec<_> = devices.iter().map(|(id, _)| id.as_str()).collect();
            assert_eq!(ids, ["phone"]);
        }
    }

    /// A device record that does not decode (damage, or a bug) is passed over by the readers
    /// of the user's devices, logged at error, and the user's other devices are read. Failing
    /// on it, every read of the user's devices failed: their list, a new link's count of
    /// their devices, and retention's wait for their devices, which then trimmed none of the
    /// user's conversations.
    #[tokio::test]
    async fn a_device_record_that_does_not_decode_is_passed_over() {
        let dir = tempfile::tempdir().unwrap();
        let store = temp_store(&dir, 8).await;
        for device in ["laptop", "phone", "tablet"] {
            link(&store, device, 0).await.unwrap();
        }
        let mut damage = Batch::new();
        damage.set(store.keys.device("ann", "phone"), vec![0xff; 3]);
        store.kv.commit(damage).await.unwrap();
        for devices in [
            store.devices("ann").await.unwrap(),
            store.devices_of(&["ann"]).await.unwrap().remove(0),
        ] {
            let ids: Vec<_> = devices.iter().map(|(id, _)| id.as_str()).collect();
            assert_eq!(ids, ["laptop", "tablet"]);
        }
        assert!(
            link(&store, "watch", 3).await.is_ok(),
            "two others readable"
        );
    }

    /// Two new devices at once, at the limit: the one whose commit comes second counts the
    /// first (their links fence on the user's count of links), so only one is linked.
    #[tokio::test]
    async fn of_two_new_devices_at_once_at_the_limit_one_is_refused() {
        let engine = crate::faulty_engine::FaultyEngine::new();
        let store = engine.store(8).await;
        link(&store, "phone", 2).await.unwrap();
        let racing = store.clone();
        engine.before_next_commit(Box::pin(async move {
            link(&racing, "laptop", 2).await.unwrap();
        }));
        let refused = link(&store, "tablet", 2).await;
        assert!(refused.is_err(), "{refused:?}");
        let linked: Vec<_> = store.devices("ann").await.unwrap();
        let ids: Vec<_> = linked.iter().map(|(id, _)| id.as_str()).collect();
        assert_eq!(ids, ["laptop", "phone"]);
    }

    /// The counts of push registrations move with every change that begins or ends one (in
    /// all, and in the slot of its user only), and with nothing else a device's record goes
    /// through.
    #[tokio::test]
    async fn push_registrations_are_counted_as_they_begin_and_end() {
        let dir = tempfile::tempdir().unwrap();
        let store = &temp_store(&dir, 8).await;
        let ann = usize::from(push_registration_slot("ann"));
        // Ann's count, and the others' in all.
        let changes = || async {
            let counts = store.push_registration_counts(None).await.unwrap();
            assert_eq!(counts.slots.len(), usize::from(PUSH_REGISTRATION_SLOTS));
            let others: u64 = counts.total - counts.slots[ann];
            assert_eq!(others, counts.slots.iter().sum::<u64>() - counts.slots[ann]);
            (counts.slots[ann], others)
        };
        // Ann's phone seen at `seen_ms`, with `token` (none if empty).
        let update = |seen_ms: u64, token: &'static str| async move {
            let set = move |record: Option<&DeviceRecord>| {
                Some(DeviceRecord {
                    last_seen_ms: seen_ms,
                    push_provider: if token.is_empty() { "" } else { "fcm" }.into(),
                    push_token: token.into(),
                    ..record.cloned().unwrap_or_default()
                })
            };
            store.update_device("ann", "phone", set).await.unwrap();
        };
        assert_eq!(changes().await, (0, 0));
        update(1, "").await;
        assert_eq!(changes().await, (0, 0), "a device without push");
        update(2, "t1").await;
        assert_eq!(changes().await, (1, 0), "registered");
        update(3, "t2").await;
        store
            .record_device_activity("ann", "phone", |record| {
                Some(DeviceRecord {
                    last_seen_ms: 4,
                    ..record.cloned().unwrap_or_default()
                })
            })
            .await
            .unwrap();
        assert_eq!(
            changes().await,
            (1, 0),
            "a new token, and activity, end nothing"
        );
        update(5, "").await;
        assert_eq!(changes().await, (2, 0), "the token dropped");
        update(6, "t3").await;
        assert!(store.unlink_device("ann", "phone", 7).await.unwrap());
        assert_eq!(changes().await, (4, 0), "registered again, then unlinked");
        assert!(store.unlink_device("ben", "tablet", 7).await.is_ok());
        assert_eq!(changes().await, (4, 0), "nothing to unlink");
    }

    /// A device with `cursors` delivered cursors (conversations `d:0`, `d:1`, ...), linked.
    async fn device_in_conversations(store: &MessageStore, cursors: usize) {
        let linked = |_: Option<&DeviceRecord>| Some(DeviceRecord::default());
        store.update_device("ann", "phone", linked).await.unwrap();
        for first in (0..cursors).step_by(CLEAR_PAGE) {
            let mut batch = Batch::new();
            for conv in first..cursors.min(first + CLEAR_PAGE) {
                let key = store.keys.cursor("ann", "phone", &format!("d:{conv}"));
                batch.max(key, 1);
            }
            store.kv.commit(batch).await.unwrap();
        }
    }

    /// A user in many conversations: the cursors go a page per commit, none a range the
    /// writer would walk, the unlink last, with a cursor acknowledged meanwhile where the
    /// first page was.
    #[tokio::test]
    async fn a_device_in_many_conversations_is_unlinked_a_page_of_cursors_per_commit() {
        let engine = crate::faulty_engine::FaultyEngine::new();
        let store = engine.store(8).await;
        let cursors = 2 * CLEAR_PAGE + 10;
        device_in_conversations(&store, cursors).await;
        let commits = Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = commits.clone();
        engine.set_fault(Some(Box::new(move |batch| {
            let count =
                |kind: fn(&Mutation) -> bool| batch.mutations.iter().filter(|m| kind(m)).count();
            let clears = count(|m| matches!(m, Mutation::Clear { .. }));
            let ranges = count(|m| matches!(m, Mutation::ClearRange { .. }));
            let size = (batch.mutations.len(), clears, ranges, batch.fences.len());
            seen.lock().unwrap().push(size);
            None
        })));
        let acker = store.clone();
        engine.before_next_commit(Box::pin(async move {
            let key = acker.keys.cursor("ann", "phone", "d:0a");
            acker
                .kv
                .commit(Batch::new().max(key, 1).clone())
                .await
                .unwrap();
        }));
        assert!(store.unlink_device("ann", "phone", 7).await.unwrap());
        assert!(
            store
                .device_cursors("ann", "phone")
                .await
                .unwrap()
                .is_empty()
        );
        let record = store.device("ann", "phone").await.unwrap().unwrap();
        assert!(!record.is_linked());
        let commits = commits.lock().unwrap().clone();
        assert!(commits.iter().all(|c| c.0 <= CLEAR_PAGE), "{commits:?}");
        assert!(
            commits.iter().all(|c| c.2 == 0),
            "no range cleared: {commits:?}"
        );
        let cleared: usize = commits.iter().map(|c| c.1).sum();
        assert_eq!(
            cleared,
            cursors + 1,
            "each cursor once, and the one acked meanwhile"
        );
        assert_eq!(
            commits.last().unwrap().3,
            1,
            "the unlink, fenced, commits last"
        );
    }

    /// An unlink cut between its pages leaves the device linked, and the next one clears
    /// what is left.
    #[tokio::test]
    async fn an_unlink_cut_midway_leaves_the_device_linked_and_is_done_again() {
        let engine = crate::faulty_engine::FaultyEngine::new();
        let store = engine.store(8).await;
        device_in_conversations(&store, 2 * CLEAR_PAGE).await;
        let pages = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = pages.clone();
        engine.set_fault(Some(Box::new(move |_| {
            (counted.fetch_add(1, std::sync::atomic::Ordering::Relaxed) == 1)
                .then(|| StoreError::Engine("cut".into()))
        })));
        assert!(store.unlink_device("ann", "phone", 7).await.is_err());
        let record = store.device("ann", "phone").await.unwrap().unwrap();
        assert!(record.is_linked(), "not unlinked");
        let left = store.device_cursors("ann", "phone").await.unwrap().len();
        assert_eq!(left, CLEAR_PAGE, "the first page went");
        engine.set_fault(None);
        assert!(store.unlink_device("ann", "phone", 8).await.unwrap());
        assert!(
            store
                .device_cursors("ann", "phone")
                .await
                .unwrap()
                .is_empty()
        );
        assert!(!store.unlink_device("ann", "phone", 9).await.unwrap());
    }

    /// Counts read before are kept while the total stays put; once it moves, every slot is
    /// read again.
    #[tokio::test]
    async fn push_registration_slots_are_read_again_once_the_total_moves() {
        let dir = tempfile::tempdir().unwrap();
        let store = &temp_store(&dir, 8).await;
        let ann = usize::from(push_registration_slot("ann"));
        let slots = usize::from(PUSH_REGISTRATION_SLOTS);
        // Slots that no read of the store gives: returned as they are, they were not read.
        let kept = PushRegistrationCounts {
            total: 0,
            slots: vec![7; slots],
        };
        let counts = store.push_registration_counts(Some(&kept)).await.unwrap();
        assert_eq!(counts, kept, "the total did not move");
        let register = |record: Option<&DeviceRecord>| {
            Some(DeviceRecord {
                push_provider: "fcm".into(),
                push_token: "t".into(),
                ..record.cloned().unwrap_or_default()
            })
        };
        store.update_device("ann", "phone", register).await.unwrap();
        let counts = store.push_registration_counts(Some(&kept)).await.unwrap();
        let mut expected = vec![0; slots];
        expected[ann] = 1;
        assert_eq!(
            counts,
            PushRegistrationCounts {
                total: 1,
                slots: expected
            }
        );
    }

    /// The slots whose counts moved are told apart, unless the total moved by more than they
    /// did (a node that counts in all only) or went back.
    #[test]
    fn moved_slots_are_those_whose_counts_moved_unless_the_total_says_otherwise() {
        let counts = |total, slots: &[u64]| PushRegistrationCounts {
            total,
            slots: slots.to_vec(),
        };
        let before = counts(5, &[2, 3, 0]);
        assert_eq!(before.slots_moved_since(&before), Some(vec![]));
        assert_eq!(
            counts(8, &[4, 3, 1]).slots_moved_since(&before),
            Some(vec![0, 2])
        );
        assert_eq!(
            counts(9, &[4, 3, 1]).slots_moved_since(&before),
            None,
            "counted in all only"
        );
        assert_eq!(
            counts(4, &[2, 3, 0]).slots_moved_since(&before),
            None,
            "went back"
        );
        assert_eq!(
            counts(5, &[2, 3]).slots_moved_since(&before),
            None,
            "other slots"
        );
    }
}
