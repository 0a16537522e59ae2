//! The ordered key-value interface every engine implements, with FoundationDB's semantics:
//! ordered keys and range reads, atomic multi-key commits, fences (a read whose change refuses
//! the commit), atomic `MAX`/`ADD`, and commit-ordered versionstamps.

use async_trait::async_trait;
use std::ops::Range;

/// Ten bytes that order commits: 8 bytes of commit version and 2 of batch order, big-endian,
/// exactly as FoundationDB's transaction versionstamp.
pub type CommitStamp = [u8; 10];

/// The key a [`Mutation::SetVersionstampedKey`] of `key` is stored under once committed with
/// `stamp`: the stamp written at the offset named by the key's last four bytes, and those
/// bytes dropped.
pub fn complete_versionstamped_key(key: &[u8], stamp: &CommitStamp) -> Result<Vec<u8>, StoreError> {
    let (body, offset) = versionstamp_offset(key)?;
    let mut out = body.to_vec();
    out[offset..offset + stamp.len()].copy_from_slice(stamp);
    Ok(out)
}

/// A versionstamped key's body and the offset its stamp goes to, or why it has none.
fn versionstamp_offset(key: &[u8]) -> Result<(&[u8], usize), StoreError> {
    let invalid = || StoreError::TooLarge("versionstamped key without a valid offset".into());
    let split = key.len().checked_sub(4).ok_or_else(invalid)?;
    let (body, offset) = key.split_at(split);
    let offset = u32::from_le_bytes(offset.try_into().map_err(|_| invalid())?) as usize;
    if offset.saturating_add(size_of::<CommitStamp>()) > body.len() {
        return Err(invalid());
    }
    Ok((body, offset))
}

/// A key and its value.
pub type KeyValue = (Vec<u8>, Vec<u8>);

/// One write in a batch. Integers of `Max` and `Add` are little-endian, as in FoundationDB.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mutation {
    Set {
        key: Vec<u8>,
        value: Vec<u8>,
    },
    Clear {
        key: Vec<u8>,
    },
    /// Clears `[begin, end)`. The embedded engine clears it key by key inside its group
    /// commit, which every other commit waits for: keep the ranges short (retention trims a
    /// page at a time); on FoundationDB it is one mutation whatever it spans.
    ClearRange {
        begin: Vec<u8>,
        end: Vec<u8>,
    },
    /// Stores the larger of the stored and the given unsigned 64-bit values.
    Max {
        key: Vec<u8>,
        value: u64,
    },
    /// Adds to the stored signed 64-bit value (absent = 0).
    Add {
        key: Vec<u8>,
        delta: i64,
    },
    /// `key` ends with a 4-byte little-endian offset at which the engine writes the commit's
    /// 10-byte stamp (the format of `foundationdb_tuple::pack_with_versionstamp`).
    SetVersionstampedKey {
        key: Vec<u8>,
        value: Vec<u8>,
    },
}

/// A condition for a commit: the key holds `expected` (`None`: the key is absent) when the
/// batch is applied. FoundationDB reads it serializably inside the transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fence {
    pub key: Vec<u8>,
    pub expected: Option<Vec<u8>>,
}

/// How far a commit is persisted when `commit` returns `Ok`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Durability {
    /// On disk: the commit survives a power loss.
    #[default]
    Synced,
    /// Applied and visible to every read, and handed to the operating system: it survives a
    /// crash of the process, and reaches the disk with the next synced commit (or the
    /// kernel's writeback, within 30 s by Linux's defaults). A power loss or kernel crash
    /// before then may lose it, never a later synced commit without it. Only for writes
    /// whose loss repeats idempotent work: an outbox entry fanned out again, a page of messages
    /// counted again, an acknowledgement whose events come again (delivery is
    /// at-least-once), a device's activity recorded again at its next connection. An engine
    /// may sync every commit (FoundationDB does).
    Deferred,
}

/// Writes committed atomically: all or nothing, persisted as its [`Durability`] says once
/// `commit` returns `Ok` (synced to disk unless marked deferred).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Batch {
    pub fences: Vec<Fence>,
    pub mutations: Vec<Mutation>,
    pub durability: Durability,
}

impl Batch {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn fence(&mut self, key: Vec<u8>, expected: Option<Vec<u8>>) -> &mut Self {
        self.fences.push(Fence { key, expected });
        self
    }
    pub fn set(&mut self, key: Vec<u8>, value: Vec<u8>) -> &mut Self {
        self.mutations.push(Mutation::Set { key, value });
        self
    }
    pub fn clear(&mut self, key: Vec<u8>) -> &mut Self {
        self.mutations.push(Mutation::Clear { key });
        self
    }
    pub fn clear_range(&mut self, range: Range<Vec<u8>>) -> &mut Self {
        self.mutations.push(Mutation::ClearRange {
            begin: range.start,
            end: range.end,
        });
        self
    }
    pub fn max(&mut self, key: Vec<u8>, value: u64) -> &mut Self {
        self.mutations.push(Mutation::Max { key, value });
        self
    }
    pub fn add(&mut self, key: Vec<u8>, delta: i64) -> &mut Self {
        self.mutations.push(Mutation::Add { key, delta });
        self
    }
    pub fn set_versionstamped_key(&mut self, key: Vec<u8>, value: Vec<u8>) -> &mut Self {
        self.mutations
            .push(Mutation::SetVersionstampedKey { key, value });
        self
    }
    /// Marks the batch [`Durability::Deferred`].
    pub fn deferred(&mut self) -> &mut Self {
        self.durability = Durability::Deferred;
        self
    }
    pub fn is_empty(&self) -> bool {
        self.mutations.is_empty()
    }
    /// Bytes of keys and values, to bound a batch under an engine's transaction limit.
    pub fn approximate_size(&self) -> usize {
        self.mutations
            .iter()
            .map(|m| match m {
                Mutation::Set { key, value } | Mutation::SetVersionstampedKey { key, value } => {
                    key.len() + value.len()
                }
                Mutation::Clear { key } | Mutation::Max { key, .. } | Mutation::Add { key, .. } => {
                    key.len() + 8
                }
                Mutation::ClearRange { begin, end } => begin.len() + end.len(),
            })
            .sum()
    }
}

/// What an engine accepts in one batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchLimits {
    pub max_key_bytes: usize,
    pub max_value_bytes: usize,
    /// Bytes of keys and values in the whole batch.
    pub max_batch_bytes: usize,
}

impl Batch {
    /// Refuses a batch beyond `limits` with a [`StoreError::TooLarge`] that names the limit, or
    /// one with a versionstamped key that says nowhere valid where its stamp goes.
    pub fn check(&self, limits: &BatchLimits) -> Result<(), StoreError> {
        for m in &self.mutations {
            let (key, value) = match m {
                Mutation::Set { key, value } | Mutation::SetVersionstampedKey { key, value } => {
                    (key, value.len())
                }
                Mutation::Clear { key } | Mutation::Max { key, .. } | Mutation::Add { key, .. } => {
                    (key, 0)
                }
                Mutation::ClearRange { begin, .. } => (begin, 0),
            };
            if key.len() > limits.max_key_bytes || value > limits.max_value_bytes {
                return Err(StoreError::TooLarge(format!(
                    "keys are limited to {} bytes and values to {}",
                    limits.max_key_bytes, limits.max_value_bytes
                )));
            }
            // Refused here rather than by the engine as it writes: an engine that commits
            // batches in groups would otherwise fail the whole group with it.
            if let Mutation::SetVersionstampedKey { key, .. } = m {
                versionstamp_offset(key)?;
            }
        }
        if self.approximate_size() > limits.max_batch_bytes {
            return Err(StoreError::TooLarge(format!(
                "a batch is limited to {} bytes",
                limits.max_batch_bytes
            )));
        }
        Ok(())
    }
}

/// Why a store operation failed. `Clone`, so that one failed group commit can answer each of
/// its waiters with the error itself.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// A fence did not hold: someone else wrote the key (for a shard epoch: the shard moved).
    #[error("commit refused: the fence on {key:?} changed")]
    FenceChanged { key: Vec<u8> },
    /// The commit may or may not have happened (FoundationDB's `commit_unknown_result`).
    /// Callers resolve it by re-reading idempotency keys, never by assuming either way.
    #[error("commit outcome unknown")]
    MaybeCommitted,
    /// The engine cannot take more work right now; retry later.
    #[error("store overloaded: {0}")]
    Overloaded(String),
    /// The batch breaks an engine limit (size, key length).
    #[error("batch refused: {0}")]
    TooLarge(String),
    /// Stored data that does not decode: a bug or corruption, never a client's fault.
    #[error("corrupt stored value at {key:?}: {reason}")]
    Corrupt { key: Vec<u8>, reason: String },
    /// The engine failed (I/O, closed database, cluster unreachable).
    #[error("storage engine: {0}")]
    Engine(String),
    /// The engine accepts no more writes until the process restarts: a write failed in a way
    /// that leaves its state in doubt (the embedded engine on a full disk or an I/O error).
    /// The failed commit's outcome is unknown; a retry with the same idempotency key after the
    /// restart finds it if it landed.
    #[error("the store accepts no writes until the process restarts: {0}")]
    Halted(String),
    /// A request the receiving node could not decode (a node of another version during a
    /// rolling upgrade, or damage in transit): nothing was done, and the same request is
    /// refused the same way every time. No one may retry it: clients are told `internal`,
    /// never `unavailable` (which they retry with the same `client_msg_id`). The text says
    /// what did not decode, never the request's keys, values or message bodies.
    #[error("request not decodable: {0}")]
    Invalid(String),
}

/// What an engine's one writer has done since the engine opened: how long it worked, and the
/// group commits it made with the batches they held. Its work over time is how busy it is; at
/// one second a second, commits queue for it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WriterTotals {
    pub busy: std::time::Duration,
    pub groups: u64,
    pub batches: u64,
}

/// What an engine's cache of recent events has answered since the engine opened: range reads
/// of one conversation's events it held whole, and those it did not (read from the tables).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EventCacheTotals {
    pub held: u64,
    pub missed: u64,
}

/// An ordered key-value engine with FoundationDB's semantics. Implementations: the embedded
/// engine (default) and FoundationDB (feature `fdb`); both pass [`crate::contract`].
#[async_trait]
pub trait KvEngine: Send + Sync + 'static {
    /// Why the engine has halted ([`StoreError::Halted`] on every commit), `None` while it
    /// accepts writes. Cheap: health checks call it on every probe.
    fn halted(&self) -> Option<String> {
        None
    }

    /// What the engine's writer has done, for an engine whose commits all go through one
    /// writer in this process (the embedded engine); `None` for the others. Cheap.
    fn writer_totals(&self) -> Option<WriterTotals> {
        None
    }

    /// What the engine's cache of recent events has answered, for an engine that keeps one
    /// (the embedded engine); `None` for the others. Cheap.
    fn event_cache_totals(&self) -> Option<EventCacheTotals> {
        None
    }

    /// The process is about to stop: the engine keeps what helps its next start (the
    /// embedded engine notes which conversations its recent events' cache holds). Reads and
    /// commits still work after it; nothing is lost without it.
    fn closing(&self) {}

    /// The value of `key` in the latest committed state.
    async fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError>;

    /// Up to `limit` pairs with keys in `range`, in key order (descending when `reverse`),
    /// from one consistent snapshot.
    async fn range(
        &self,
        range: Range<Vec<u8>>,
        limit: usize,
        reverse: bool,
    ) -> Result<Vec<KeyValue>, StoreError>;

    /// The values of `keys`, answered in the order asked, all from one committed state:
    /// callers pair them (a member's record with a conversation's head), which values read
    /// apart could take from two states, one before a commit and one after it. The default
    /// reads them one by one, which is one state only for an engine whose commits cannot land
    /// between its reads (a test double): an engine that serves the message store overrides
    /// it, and the contract checks it (`contract::get_many_reads_one_state`).
    async fn get_many(&self, keys: Vec<Vec<u8>>) -> Result<Vec<Option<Vec<u8>>>, StoreError> {
        futures::future::try_join_all(keys.iter().map(|key| self.get(key))).await
    }

    /// Up to `limit` pairs of each of `ranges`, forward, answered in the order asked. Each
    /// range is read from one consistent snapshot, not necessarily the others' snapshot. The
    /// default reads them concurrently; an engine behind a network call answers them with one.
    async fn ranges(
        &self,
        ranges: Vec<Range<Vec<u8>>>,
        limit: usize,
    ) -> Result<Vec<Vec<KeyValue>>, StoreError> {
        futures::future::try_join_all(
            ranges
                .into_iter()
                .map(|range| self.range(range, limit, false)),
        )
        .await
    }

    /// Applies `batch` atomically and durably after checking its fences. Returns the commit's
    /// stamp; later commits have larger stamps (of one engine: with storage partitions, of one
    /// partition, which is what the outbox keys of a shard need).
    async fn commit(&self, batch: Batch) -> Result<CommitStamp, StoreError>;

    /// Removes what the engine can remove of `range` without reading it, for a range whose
    /// keys have all expired (idempotency buckets): no one reads them again, and the caller
    /// clears what is left key by key. The embedded engine drops the tables of its
    /// idempotency keyspace that lie wholly inside `range`; FoundationDB clears the whole range
    /// in one commit. The default removes nothing.
    async fn drop_expired(&self, range: Range<Vec<u8>>) -> Result<(), StoreError> {
        let _ = range;
        Ok(())
    }

    /// What one batch may hold: `commit` refuses larger batches with [`StoreError::TooLarge`],
    /// so writers that may produce large batches split their work by it.
    fn limits(&self) -> BatchLimits;
}

/// Reads a little-endian `u64` as written by [`Mutation::Max`]/[`Mutation::Add`]; shorter
/// values are zero-extended as FoundationDB does.
pub fn decode_u64(value: &[u8]) -> u64 {
    let mut bytes = [0u8; 8];
    let n = value.len().min(8);
    bytes[..n].copy_from_slice(&value[..n]);
    u64::from_le_bytes(bytes)
}
