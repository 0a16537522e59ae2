//! The message-store logic, written once over [`KvEngine`]: shards and their epochs, appends
//! (dense per-conversation seq, idempotency, outbox), reads, cursors and receipts.

use crate::keys::{Keys, ReceiptKind};
use crate::kv::{Batch, KvEngine, StoreError, decode_u64};
use courier_proto::{Event, EventPayload, Sender, pb};
use prost::Message;
use std::collections::HashMap;
use std::sync::Arc;

/// Attempts for a batch whose commit outcome was unknown before giving up.
const MAX_COMMIT_ATTEMPTS: usize = 5;

/// Sanity bound on stored counts read back from the store.
const MAX_SHARDS: u32 = 1 << 20;

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

/// The first outcome of a `(conversation, device, client_msg_id)`, returned to retries.
#[derive(Clone, PartialEq, prost::Message)]
struct IdempotencyRecord {
    #[prost(uint64, tag = "1")]
    seq: u64,
    #[prost(string, tag = "2")]
    server_msg_id: String,
    #[prost(uint64, tag = "3")]
    ts_ms: u64,
}

/// Ownership of one sequencer shard: appends are refused once another owner bumps the epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShardLease {
    pub shard: u32,
    pub epoch: u64,
}

/// A new direct conversation's record and members, written with its first event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewConversation {
    pub kind: &'static str,
    pub name: String,
    pub members: Vec<String>,
}

/// One event to sequence.
#[derive(Debug, Clone, PartialEq)]
pub struct Append {
    pub conversation_id: String,
    pub sender: Sender,
    /// Idempotency key of client sends; `None` for server-made events.
    pub client_msg_id: Option<String>,
    pub payload: EventPayload,
    /// Set when the conversation may not exist yet (first message of a direct conversation).
    pub create: Option<NewConversation>,
}

impl Append {
    /// Bytes this append adds to a batch, roughly: what group commit bounds.
    pub fn approximate_size(&self) -> usize {
        let body = match &self.payload {
            EventPayload::Message { body, .. } => body.as_ref().map_or(0, |b| match b {
                courier_proto::Body::Text(t) => t.len(),
                courier_proto::Body::Media(m) => 64 + m.media_id.len() + m.mime.len(),
            }),
            _ => 64,
        };
        256 + body
    }
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

/// Heads of the conversations a shard owner has touched. Authoritative while the owner holds
/// its lease, so appends need not read heads back.
#[derive(Debug, Default)]
pub struct HeadCache {
    heads: HashMap<String, u64>,
}

/// The message store over one engine.
#[derive(Clone)]
pub struct MessageStore {
    kv: Arc<dyn KvEngine>,
    keys: Keys,
    shard_count: u32,
}

fn corrupt(key: &[u8], reason: impl ToString) -> StoreError {
    StoreError::Corrupt {
        key: key.to_vec(),
        reason: reason.to_string(),
    }
}

/// FNV-1a: a stable hash, so a conversation maps to the same shard in every process and version.
fn stable_hash(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn new_server_msg_id(ts_ms: u64) -> String {
    format!("{ts_ms:011x}{:016x}", rand::random::<u64>())
}

impl MessageStore {
    /// Opens the store in `kv` under `root`, creating it with `shard_count` shards if empty.
    /// The shard count of an existing store is kept; asking for another one is an error.
    pub async fn open(
        kv: Arc<dyn KvEngine>,
        root: &[u8],
        shard_count: u32,
    ) -> Result<Self, StoreError> {
        let keys = Keys::new(root);
        let key = keys.shard_count();
        let stored = kv.get(&key).await?.map(|v| decode_u64(&v) as u32);
        let shard_count = match stored {
            Some(n) if n == shard_count => n,
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
                    .set(key, u64::from(shard_count).to_le_bytes().to_vec());
                kv.commit(batch).await?;
                shard_count
            }
        };
        Ok(Self {
            kv,
            keys: Keys::new(root),
            shard_count,
        })
    }

    pub fn shard_count(&self) -> u32 {
        self.shard_count
    }

    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    pub fn engine(&self) -> &Arc<dyn KvEngine> {
        &self.kv
    }

    /// The shard that orders `conversation_id`.
    pub fn shard_of(&self, conversation_id: &str) -> u32 {
        (stable_hash(conversation_id.as_bytes()) % u64::from(self.shard_count)) as u32
    }

    /// Takes ownership of `shards` in one commit, each with its epoch bumped, so that any
    /// previous owner's appends are refused from now on.
    pub async fn acquire_shards(&self, shards: &[u32]) -> Result<Vec<ShardLease>, StoreError> {
        let mut batch = Batch::new();
        let mut leases = Vec::with_capacity(shards.len());
        for &shard in shards {
            let key = self.keys.shard_epoch(shard);
            let current = self.kv.get(&key).await?;
            let epoch = current.as_deref().map_or(0, decode_u64) + 1;
            batch
                .fence(key.clone(), current)
                .set(key, epoch.to_le_bytes().to_vec());
            leases.push(ShardLease { shard, epoch });
        }
        self.kv.commit(batch).await?;
        Ok(leases)
    }

    /// Sequences `appends` (all of `lease.shard`) in one durable commit, fenced by the lease.
    /// Outcomes are in the order of `appends`. Retries of earlier appends (same conversation,
    /// device and `client_msg_id`) get the earlier outcome with `duplicate` set.
    pub async fn append(
        &self,
        lease: ShardLease,
        heads: &mut HeadCache,
        appends: &[Append],
    ) -> Result<Vec<AppendOutcome>, StoreError> {
        let ts_ms = now_ms();
        let ids: Vec<String> = appends.iter().map(|_| new_server_msg_id(ts_ms)).collect();
        let mut attempt = 0;
        loop {
            attempt += 1;
            match self.try_append(lease, heads, appends, &ids, ts_ms).await {
                Err(StoreError::MaybeCommitted) if attempt < MAX_COMMIT_ATTEMPTS => {
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
                    return Err(e);
                }
                ok => return ok,
            }
        }
    }

    async fn try_append(
        &self,
        lease: ShardLease,
        heads: &mut HeadCache,
        appends: &[Append],
        server_msg_ids: &[String],
        ts_ms: u64,
    ) -> Result<Vec<AppendOutcome>, StoreError> {
        let mut batch = Batch::new();
        batch.fence(
            self.keys.shard_epoch(lease.shard),
            Some(lease.epoch.to_le_bytes().to_vec()),
        );
        let mut outcomes: Vec<Option<AppendOutcome>> = vec![None; appends.len()];
        let mut new_heads: HashMap<&str, u64> = HashMap::new();
        let mut in_batch: HashMap<Vec<u8>, usize> = HashMap::new();
        let mut outbox_order: u16 = 0;

        for (i, append) in appends.iter().enumerate() {
            let conv = append.conversation_id.as_str();
            let idem_key = append.client_msg_id.as_deref().map(|id| {
                self.keys
                    .idempotency(conv, &append.sender.user, &append.sender.device, id)
            });
            if let Some(key) = &idem_key {
                if let Some(&first) = in_batch.get(key) {
                    let mut outcome = outcomes[first]
                        .clone()
                        .ok_or_else(|| corrupt(key, "batch order"))?;
                    outcome.duplicate = true;
                    outcomes[i] = Some(outcome);
                    continue;
                }
                if let Some(stored) = self.kv.get(key).await? {
                    let record = IdempotencyRecord::decode(stored.as_slice())
                        .map_err(|e| corrupt(key, e))?;
                    outcomes[i] = Some(AppendOutcome {
                        seq: record.seq,
                        // A retried commit that had in fact landed is ours, not a duplicate.
                        duplicate: record.server_msg_id != server_msg_ids[i],
                        server_msg_id: record.server_msg_id,
                        ts_ms: record.ts_ms,
                    });
                    continue;
                }
            }
            let head = match new_heads.get(conv) {
                Some(&h) => h,
                None => self.cached_head(heads, conv).await?,
            };
            let seq = head + 1;
            new_heads.insert(conv, seq);
            if head == 0
                && let Some(create) = &append.create
            {
                self.write_new_conversation(&mut batch, conv, create, ts_ms);
            }
            let event = Event {
                conversation_id: conv.to_owned(),
                seq,
                server_msg_id: server_msg_ids[i].clone(),
                sender: append.sender.clone(),
                ts_ms,
                payload: append.payload.clone(),
            };
            let encoded = pb::Event::from(event).encode_to_vec();
            batch.set(self.keys.event(conv, seq), encoded.clone());
            batch
                .set_versionstamped_key(self.keys.outbox_entry(lease.shard, outbox_order), encoded);
            outbox_order = outbox_order.wrapping_add(1);
            if let Some(key) = idem_key {
                let record = IdempotencyRecord {
                    seq,
                    server_msg_id: server_msg_ids[i].clone(),
                    ts_ms,
                };
                batch.set(key.clone(), record.encode_to_vec());
                in_batch.insert(key, i);
            }
            outcomes[i] = Some(AppendOutcome {
                seq,
                server_msg_id: server_msg_ids[i].clone(),
                ts_ms,
                duplicate: false,
            });
        }
        for (conv, head) in &new_heads {
            batch.set(self.keys.head(conv), head.to_le_bytes().to_vec());
        }
        if !batch.is_empty() {
            self.kv.commit(batch).await?;
        }
        for (conv, head) in new_heads {
            heads.heads.insert(conv.to_owned(), head);
        }
        outcomes
            .into_iter()
            .map(|o| o.ok_or_else(|| StoreError::Engine("append without outcome".into())))
            .collect()
    }

    fn write_new_conversation(
        &self,
        batch: &mut Batch,
        conv: &str,
        create: &NewConversation,
        ts_ms: u64,
    ) {
        let record = ConversationRecord {
            kind: create.kind.to_owned(),
            name: create.name.clone(),
            created_ms: ts_ms,
        };
        batch.set(self.keys.conversation(conv), record.encode_to_vec());
        for user in &create.members {
            batch.set(self.keys.member(conv, user), Vec::new());
            batch.set(self.keys.user_conversation(user, conv), Vec::new());
        }
    }

    async fn cached_head(&self, heads: &mut HeadCache, conv: &str) -> Result<u64, StoreError> {
        if let Some(&h) = heads.heads.get(conv) {
            return Ok(h);
        }
        let head = self.head(conv).await?;
        heads.heads.insert(conv.to_owned(), head);
        Ok(head)
    }

    /// The highest seq of `conv` (0 when it has no event).
    pub async fn head(&self, conv: &str) -> Result<u64, StoreError> {
        Ok(self
            .kv
            .get(&self.keys.head(conv))
            .await?
            .as_deref()
            .map_or(0, decode_u64))
    }

    /// Up to `limit` events of `conv` with `seq > after_seq`, in order.
    pub async fn events(
        &self,
        conv: &str,
        after_seq: u64,
        limit: usize,
    ) -> Result<Vec<Event>, StoreError> {
        let range = self
            .keys
            .events(conv, after_seq.saturating_add(1), u64::MAX);
        self.kv
            .range(range, limit, false)
            .await?
            .into_iter()
            .map(|(key, value)| decode_event(&key, &value))
            .collect()
    }

    /// The stored record of `conv`, if it exists.
    pub async fn conversation(&self, conv: &str) -> Result<Option<ConversationRecord>, StoreError> {
        let key = self.keys.conversation(conv);
        match self.kv.get(&key).await? {
            Some(v) => Ok(Some(
                ConversationRecord::decode(v.as_slice()).map_err(|e| corrupt(&key, e))?,
            )),
            None => Ok(None),
        }
    }

    pub async fn is_member(&self, conv: &str, user: &str) -> Result<bool, StoreError> {
        Ok(self.kv.get(&self.keys.member(conv, user)).await?.is_some())
    }

    /// The members of `conv`, in id order.
    pub async fn members(&self, conv: &str) -> Result<Vec<String>, StoreError> {
        let rows = self
            .kv
            .range(self.keys.members(conv), usize::MAX, false)
            .await?;
        rows.iter()
            .map(|(k, _)| {
                self.keys
                    .member_user(k)
                    .ok_or_else(|| corrupt(k, "member key"))
            })
            .collect()
    }

    /// The ids of the conversations `user` belongs to, in id order.
    pub async fn conversations_of(&self, user: &str) -> Result<Vec<String>, StoreError> {
        let rows = self
            .kv
            .range(self.keys.user_conversations(user), usize::MAX, false)
            .await?;
        rows.iter()
            .map(|(k, _)| {
                self.keys
                    .user_conversation_id(k)
                    .ok_or_else(|| corrupt(k, "conversation key"))
            })
            .collect()
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
        rows.iter()
            .map(|(k, v)| {
                let conv = self
                    .keys
                    .cursor_conversation(k)
                    .ok_or_else(|| corrupt(k, "cursor key"))?;
                Ok((conv, decode_u64(v)))
            })
            .collect()
    }

    /// Records a device's cumulative acknowledgement, durably: the device's delivered cursor
    /// and the user's receipt cursors move up (atomic MAX; a read implies delivery).
    pub async fn acknowledge(
        &self,
        user: &str,
        device: &str,
        conv: &str,
        seq: u64,
        kind: ReceiptKind,
    ) -> Result<(), StoreError> {
        let mut batch = Batch::new();
        batch
            .max(self.keys.cursor(user, device, conv), seq)
            .max(self.keys.receipt(conv, user, ReceiptKind::Delivered), seq);
        if kind == ReceiptKind::Read {
            batch.max(self.keys.receipt(conv, user, ReceiptKind::Read), seq);
        }
        self.kv.commit(batch).await.map(drop)
    }

    /// A user's `(delivered_seq, read_seq)` in `conv`.
    pub async fn receipt(&self, conv: &str, user: &str) -> Result<(u64, u64), StoreError> {
        let cursor = |kind| async move {
            let value = self.kv.get(&self.keys.receipt(conv, user, kind)).await?;
            Ok::<_, StoreError>(value.as_deref().map_or(0, decode_u64))
        };
        Ok((
            cursor(ReceiptKind::Delivered).await?,
            cursor(ReceiptKind::Read).await?,
        ))
    }

    /// The oldest outbox entries of `shard`: events committed and not yet fanned out.
    pub async fn outbox(
        &self,
        shard: u32,
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, Event)>, StoreError> {
        let rows = self.kv.range(self.keys.outbox(shard), limit, false).await?;
        rows.into_iter()
            .map(|(key, value)| {
                let event = decode_event(&key, &value)?;
                Ok((key, event))
            })
            .collect()
    }

    /// Removes the outbox entries of `shard` up to and including `last`, once fanned out.
    pub async fn clear_outbox(&self, shard: u32, last: &[u8]) -> Result<(), StoreError> {
        let mut end = last.to_vec();
        end.push(0);
        let mut batch = Batch::new();
        batch.clear_range(self.keys.outbox(shard).start..end);
        self.kv.commit(batch).await.map(drop)
    }
}

fn decode_event(key: &[u8], value: &[u8]) -> Result<Event, StoreError> {
    let event = pb::Event::decode(value).map_err(|e| corrupt(key, e))?;
    Event::try_from(event).map_err(|e| corrupt(key, e))
}
