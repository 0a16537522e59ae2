//! The FoundationDB engine (feature `fdb`): the [`KvEngine`] contract on a FoundationDB
//! cluster, through the `foundationdb` crate (API 7.3). Thin by design: the message-store logic
//! above it is the same for every engine. See `docs/foundationdb.md` for the key layout and
//! how to run the contract suite against a cluster.
//!
//! - **Root prefix.** Every key is prefixed with the engine's root (one cluster can hold several
//!   stores, and each contract-test run its own). The root is not empty and does not start with
//!   `0xff` (FoundationDB's system keys).
//! - **Commit** is one transaction: fences are serializable reads compared with their expected
//!   values (a mismatch refuses the batch with [`StoreError::FenceChanged`] and nothing is
//!   committed; a concurrent change after the read makes the commit conflict, and the retry
//!   reads the fence anew); `MAX`/`ADD` are atomic operations with 8-byte little-endian
//!   parameters (no read, no conflict); versionstamped keys use `SetVersionstampedKey` and the
//!   returned stamp is the transaction's own versionstamp.
//! - **Retries.** Retryable errors (`not_committed`, `transaction_too_old`, `future_version`,
//!   throttling...) are retried with FoundationDB's own backoff (`on_error`), fences re-read
//!   each time, within [`TRANSACTION_TIMEOUT_MS`] and [`TRANSACTION_RETRY_LIMIT`]. A commit
//!   whose outcome is unknown (`commit_unknown_result` and the other maybe-committed errors, or
//!   a timeout while the commit was in flight) is never retried here: it is reported as
//!   [`StoreError::MaybeCommitted`] and the message store resolves it through its idempotency
//!   keys. `Database::run` is not used, because it would retry those blindly.
//! - **Unknown outcomes, settled.** The message store resolves `MaybeCommitted` by reading
//!   what landed and writing again, which is sound only if the attempt in doubt can no longer
//!   land afterwards (landing late, it would set a conversation's head back under a message
//!   already acknowledged). So every attempt also reads a key of its own, a conflict range with
//!   nothing stored (`commit_marker`), and before `MaybeCommitted` is returned a transaction
//!   writes that key: the attempt then either landed before it or conflicts, for good
//!   (FoundationDB does the same with a dummy transaction for `commit_unknown_result`, but
//!   not for a timeout that strikes while the commit is in flight).
//! - **Limits.** A batch is at most [`MAX_BATCH_BYTES`] of keys and values (FoundationDB's hard
//!   limit is 10 MB per transaction), a value at most [`MAX_VALUE_BYTES`] (FoundationDB's
//!   100 kB) and a key at most [`MAX_KEY_BYTES`]; larger batches are refused with
//!   [`StoreError::TooLarge`] before any network round trip. The message store never writes
//!   larger values (events are bounded by the 64 KiB frame limit); anything bigger would be
//!   chunked above this engine, never here.
//! - **Reads.** `get` reads the latest committed value, `get_many` its keys in one transaction
//!   (one read version: callers pair the values, a member's record with a head). `range` uses
//!   snapshot reads (a read-only
//!   transaction has nothing to conflict with, and snapshot reads skip the read-conflict
//!   bookkeeping), paged through `get_range` until the limit or the end of the range, all at
//!   one read version: one consistent snapshot, as the contract asks. A range must be read
//!   within FoundationDB's 5-second transaction lifetime; callers read bounded pages.
//! - **Network.** The client network thread is booted once per process, by the first
//!   [`FdbEngine::open`], and runs until [`stop_network`] (or the end of the process).

use crate::kv::{Batch, BatchLimits, CommitStamp, KeyValue, KvEngine, Mutation, StoreError};
use async_trait::async_trait;
use foundationdb::api::NetworkAutoStop;
use foundationdb::options::{ConflictRangeType, DatabaseOption, MutationType};
use foundationdb::{Database, FdbError, RangeOption, Transaction};
use std::ops::Range;
use std::path::Path;
use std::sync::{Mutex, OnceLock};

/// Largest batch, in bytes of keys and values, well under FoundationDB's 10 MB.
pub const MAX_BATCH_BYTES: usize = 8 << 20;
/// Largest value (FoundationDB refuses values above 100 kB).
pub const MAX_VALUE_BYTES: usize = 100_000;
/// Largest key (FoundationDB refuses keys above 10 kB), root prefix included.
pub const MAX_KEY_BYTES: usize = 10_000;
/// How long one operation may take, retries included, before it fails with
/// `transaction_timed_out` (1031), for example when the cluster is unreachable. Without it a
/// read on an unreachable cluster waits forever.
pub const TRANSACTION_TIMEOUT_MS: i32 = 10_000;
/// How many times one operation is retried on retryable errors before the error is returned.
pub const TRANSACTION_RETRY_LIMIT: i32 = 100;

/// What one transaction may hold, under FoundationDB's own limits (the root prefix is counted
/// against [`MAX_KEY_BYTES`] by [`FdbEngine::commit`]).
pub const LIMITS: BatchLimits = BatchLimits {
    max_key_bytes: MAX_KEY_BYTES,
    max_value_bytes: MAX_VALUE_BYTES,
    max_batch_bytes: MAX_BATCH_BYTES,
};

// FoundationDB error codes given a meaning of their own here
// (https://apple.github.io/foundationdb/api-error-codes.html).
const PROCESS_BEHIND: i32 = 1037;
const PROXY_MEMORY_LIMIT_EXCEEDED: i32 = 1042;
const BATCH_TRANSACTION_THROTTLED: i32 = 1051;
const GRV_PROXY_MEMORY_LIMIT_EXCEEDED: i32 = 1078;
const TAG_THROTTLED: i32 = 1213;
const TRANSACTION_TIMED_OUT: i32 = 1031;
const TRANSACTION_CANCELLED: i32 = 1025;
const TRANSACTION_TOO_LARGE: i32 = 2101;
const KEY_TOO_LARGE: i32 = 2102;
const VALUE_TOO_LARGE: i32 = 2103;

/// Maps a FoundationDB error to a [`StoreError`]: limits to `TooLarge`, throttling and memory
/// pressure to `Overloaded`, everything else to `Engine`, always with the code and message.
fn fdb_error(e: FdbError) -> StoreError {
    let code = e.code();
    let text = format!("FoundationDB error {code}: {}", e.message());
    match code {
        TRANSACTION_TOO_LARGE | KEY_TOO_LARGE | VALUE_TOO_LARGE => StoreError::TooLarge(text),
        PROCESS_BEHIND
        | PROXY_MEMORY_LIMIT_EXCEEDED
        | BATCH_TRANSACTION_THROTTLED
        | GRV_PROXY_MEMORY_LIMIT_EXCEEDED
        | TAG_THROTTLED => StoreError::Overloaded(text),
        TRANSACTION_TIMED_OUT => StoreError::Engine(format!(
            "{text} (no answer within {TRANSACTION_TIMEOUT_MS} ms: is the cluster up, and does \
             the cluster file name its coordinators?)"
        )),
        _ => StoreError::Engine(text),
    }
}

/// Whether a failed commit may have been applied: FoundationDB's maybe-committed errors, and a
/// timeout or cancellation that struck while the commit was in flight.
fn commit_outcome_unknown(e: FdbError) -> bool {
    e.is_maybe_committed() || matches!(e.code(), TRANSACTION_TIMED_OUT | TRANSACTION_CANCELLED)
}

/// The network thread's handle, kept for the whole process (or until [`stop_network`]).
/// `Err` holds why it could not start; the API can be selected only once per process, so a
/// failure is final.
static NETWORK: OnceLock<Result<Mutex<Option<NetworkAutoStop>>, String>> = OnceLock::new();

/// Boots the FoundationDB network thread the first time it is called, in this process.
fn boot_network() -> Result<(), StoreError> {
    let network = NETWORK.get_or_init(|| {
        // SAFETY: `boot` asks that the returned handle be dropped before the process exits.
        // It lives in this static, so it is dropped by `stop_network` (called by processes that
        // shut down cleanly) or never, which FoundationDB tolerates at process exit the same
        // way as an abort. The OnceLock makes this the only selection of the API version and
        // the only network start in the process.
        let booted = unsafe {
            foundationdb::api::FdbApiBuilder::default()
                .build()
                .and_then(|builder| builder.boot())
        };
        booted.map(|stop| Mutex::new(Some(stop))).map_err(|e| {
            format!(
                "cannot start the FoundationDB client (error {}: {}); is libfdb_c 7.3 installed?",
                e.code(),
                e.message()
            )
        })
    });
    match network {
        Ok(handle) => {
            let running = handle.lock().map(|h| h.is_some()).unwrap_or(false);
            if running {
                Ok(())
            } else {
                Err(StoreError::Engine(
                    "the FoundationDB network was stopped and cannot be restarted in this process"
                        .into(),
                ))
            }
        }
        Err(reason) => Err(StoreError::Engine(reason.clone())),
    }
}

/// Stops the FoundationDB network thread and waits for it, for a clean process exit. Call it
/// once every engine is dropped and no operation is in flight: operations still pending never
/// complete. The network cannot be started again in this process. Does nothing if it never
/// started.
pub fn stop_network() {
    if let Some(Ok(handle)) = NETWORK.get() {
        let stop = match handle.lock() {
            Ok(mut h) => h.take(),
            Err(poisoned) => poisoned.into_inner().take(),
        };
        // Dropping the handle stops the run loop and joins its thread.
        drop(stop);
    }
}

/// A FoundationDB cluster as a [`KvEngine`], under a root prefix.
///
/// ```no_run
/// # async fn demo() -> Result<(), courier_store::StoreError> {
/// use courier_store::{Batch, KvEngine, fdb::FdbEngine};
/// let kv = FdbEngine::open("/etc/foundationdb/fdb.cluster".as_ref(), b"courier")?;
/// let mut batch = Batch::new();
/// batch.set(b"hello".to_vec(), b"world".to_vec());
/// let stamp = kv.commit(batch).await?;
/// # let _ = stamp; Ok(()) }
/// ```
pub struct FdbEngine {
    db: Database,
    root: Vec<u8>,
}

impl FdbEngine {
    /// Connects to the cluster named by `cluster_file`; every key is stored under `root`.
    /// Boots the client network on first use in the process. Connecting is lazy: an
    /// unreachable cluster shows up as a timeout on the first operation.
    pub fn open(cluster_file: &Path, root: &[u8]) -> Result<Self, StoreError> {
        if root.is_empty() || root[0] == 0xff {
            return Err(StoreError::Engine(
                "the FoundationDB root prefix must be non-empty and must not start with 0xff \
                 (the system keyspace)"
                    .into(),
            ));
        }
        let path = cluster_file
            .to_str()
            .filter(|p| !p.contains('\0'))
            .ok_or_else(|| {
                StoreError::Engine(format!(
                    "the cluster file path must be UTF-8 without NUL: {}",
                    cluster_file.display()
                ))
            })?;
        if !cluster_file.is_file() {
            return Err(StoreError::Engine(format!(
                "no FoundationDB cluster file at {path}; pass the file written by the cluster \
                 (for example /etc/foundationdb/fdb.cluster)"
            )));
        }
        boot_network()?;
        let db = Database::new(Some(path)).map_err(|e| {
            StoreError::Engine(format!(
                "cannot open the FoundationDB cluster file {path}: error {}: {}",
                e.code(),
                e.message()
            ))
        })?;
        db.set_option(DatabaseOption::TransactionTimeout(TRANSACTION_TIMEOUT_MS))
            .map_err(fdb_error)?;
        db.set_option(DatabaseOption::TransactionRetryLimit(
            TRANSACTION_RETRY_LIMIT,
        ))
        .map_err(fdb_error)?;
        Ok(Self {
            db,
            root: root.to_vec(),
        })
    }

    fn key(&self, key: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.root.len() + key.len());
        out.extend_from_slice(&self.root);
        out.extend_from_slice(key);
        out
    }

    /// Refuses what FoundationDB would refuse, before any round trip.
    fn check(&self, batch: &Batch) -> Result<(), StoreError> {
        batch.check(&self.limits())
    }

    /// Settles the outcome of a commit in doubt whose attempts read `marker`: once a
    /// transaction that writes it has committed, an attempt that has not landed never will. If
    /// that transaction cannot commit either (the cluster unreachable for its whole timeout),
    /// the attempt is past FoundationDB's five-second transaction lifetime by then and cannot
    /// land after the cluster is back; that is logged.
    async fn settle(&self, marker: &[u8]) {
        if let Err(e) = self.write_marker(marker).await {
            tracing::error!(
                code = e.code(),
                "could not settle a commit in doubt (its transaction's lifetime ends it): {e}"
            );
        }
    }

    async fn write_marker(&self, marker: &[u8]) -> Result<(), FdbError> {
        let mut trx = self.db.create_trx()?;
        loop {
            trx.clear(marker);
            match trx.commit().await {
                Ok(_) => return Ok(()),
                Err(e) => trx = e.on_error().await?,
            }
        }
    }

    /// Writes the batch's mutations into `trx` (buffered client-side until commit).
    fn apply(&self, trx: &Transaction, batch: &Batch) -> Result<(), StoreError> {
        for m in &batch.mutations {
            match m {
                Mutation::Set { key, value } => trx.set(&self.key(key), value),
                Mutation::Clear { key } => trx.clear(&self.key(key)),
                Mutation::ClearRange { begin, end } => {
                    if begin < end {
                        trx.clear_range(&self.key(begin), &self.key(end))
                    }
                }
                Mutation::Max { key, value } => {
                    trx.atomic_op(&self.key(key), &value.to_le_bytes(), MutationType::Max)
                }
                Mutation::Add { key, delta } => {
                    trx.atomic_op(&self.key(key), &delta.to_le_bytes(), MutationType::Add)
                }
                Mutation::SetVersionstampedKey { key, value } => trx.atomic_op(
                    &prefixed_versionstamped_key(&self.root, key)?,
                    value,
                    MutationType::SetVersionstampedKey,
                ),
            }
        }
        Ok(())
    }

    /// The first fence that does not hold, read serializably in `trx` (so a change after the
    /// read makes the commit conflict). The fences are read at once: a retention pass's page
    /// fences each of its hundreds of moves.
    async fn violated_fence(
        &self,
        trx: &Transaction,
        batch: &Batch,
    ) -> Result<Option<Vec<u8>>, FdbError> {
        let reads = batch
            .fences
            .iter()
            .map(|fence| trx.get(&self.key(&fence.key), false));
        let current = futures::future::try_join_all(reads).await?;
        Ok(batch
            .fences
            .iter()
            .zip(current)
            .find(|(fence, current)| current.as_deref() != fence.expected.as_deref())
            .map(|(fence, _)| fence.key.clone()))
    }
}

/// A versionstamped key of ours (its last 4 bytes: the little-endian offset of the 10-byte
/// stamp in the key) under `root`, as FoundationDB wants it: prefixed, and with the offset
/// moved by the prefix's length.
fn prefixed_versionstamped_key(root: &[u8], key: &[u8]) -> Result<Vec<u8>, StoreError> {
    let invalid = || {
        StoreError::TooLarge(
            "a versionstamped key must end with the 4-byte offset of 10 bytes inside the key"
                .into(),
        )
    };
    let split = key.len().checked_sub(4).ok_or_else(invalid)?;
    let (body, offset) = key.split_at(split);
    let offset = u32::from_le_bytes(offset.try_into().map_err(|_| invalid())?);
    if (offset as usize).saturating_add(10) > body.len() {
        return Err(invalid());
    }
    let shifted = u32::try_from(root.len())
        .ok()
        .and_then(|r| offset.checked_add(r))
        .ok_or_else(invalid)?;
    let mut out = Vec::with_capacity(root.len() + key.len());
    out.extend_from_slice(root);
    out.extend_from_slice(body);
    out.extend_from_slice(&shifted.to_le_bytes());
    Ok(out)
}

/// A key of the engine's root that no data key is (tuple-encoded keys never start with
/// `0xfe`), drawn for one commit: its attempts read it, and the transaction that settles an
/// unknown outcome writes it (module documentation).
fn commit_marker(root: &[u8]) -> Vec<u8> {
    let mut marker = Vec::with_capacity(root.len() + 17);
    marker.extend_from_slice(root);
    marker.push(0xfe);
    marker.extend_from_slice(&rand::random::<u128>().to_be_bytes());
    marker
}

/// The key right after `key`: with it, the range of `key` alone.
fn key_after(key: &[u8]) -> Vec<u8> {
    let mut after = Vec::with_capacity(key.len() + 1);
    after.extend_from_slice(key);
    after.push(0);
    after
}

/// The stamp of a batch without mutations: FoundationDB commits nothing for it and gives it no
/// versionstamp, so it gets its read version followed by `0xffff`: above every commit it saw,
/// below every commit after it (those get larger versions).
fn read_only_stamp(read_version: i64) -> CommitStamp {
    let mut out = [0xffu8; 10];
    out[..8].copy_from_slice(&read_version.to_be_bytes());
    out
}

#[async_trait]
impl KvEngine for FdbEngine {
    async fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        let mut trx = self.db.create_trx().map_err(fdb_error)?;
        loop {
            match trx.get(&self.key(key), false).await {
                Ok(value) => return Ok(value.map(|v| v.to_vec())),
                Err(e) => trx = trx.on_error(e).await.map_err(fdb_error)?,
            }
        }
    }

    async fn get_many(&self, keys: Vec<Vec<u8>>) -> Result<Vec<Option<Vec<u8>>>, StoreError> {
        let keys: Vec<Vec<u8>> = keys.iter().map(|key| self.key(key)).collect();
        let mut trx = self.db.create_trx().map_err(fdb_error)?;
        loop {
            let reads = keys.iter().map(|key| trx.get(key, true));
            match futures::future::try_join_all(reads).await {
                Ok(values) => {
                    return Ok(values
                        .into_iter()
                        .map(|value| value.map(|v| v.to_vec()))
                        .collect());
                }
                Err(e) => trx = trx.on_error(e).await.map_err(fdb_error)?,
            }
        }
    }

    async fn range(
        &self,
        range: Range<Vec<u8>>,
        limit: usize,
        reverse: bool,
    ) -> Result<Vec<KeyValue>, StoreError> {
        if range.start >= range.end || limit == 0 {
            return Ok(Vec::new());
        }
        let mut trx = self.db.create_trx().map_err(fdb_error)?;
        // Each attempt reads the whole range at one read version; an error (for example
        // `transaction_too_old` on a long read) restarts it from the beginning.
        'attempt: loop {
            let mut out: Vec<KeyValue> = Vec::new();
            let mut option = RangeOption::from(self.key(&range.start)..self.key(&range.end));
            option.reverse = reverse;
            let mut iteration = 1;
            loop {
                option.limit = Some(limit - out.len());
                let page = match trx.get_range(&option, iteration, true).await {
                    Ok(page) => page,
                    Err(e) => {
                        trx = trx.on_error(e).await.map_err(fdb_error)?;
                        continue 'attempt;
                    }
                };
                for kv in page.iter() {
                    let key = kv.key().strip_prefix(self.root.as_slice()).ok_or_else(|| {
                        StoreError::Corrupt {
                            key: kv.key().to_vec(),
                            reason: "a range read returned a key outside the engine's root".into(),
                        }
                    })?;
                    out.push((key.to_vec(), kv.value().to_vec()));
                }
                if out.len() >= limit {
                    out.truncate(limit);
                    return Ok(out);
                }
                match option.next_range(&page) {
                    Some(next) => option = next,
                    None => return Ok(out),
                }
                iteration += 1;
            }
        }
    }

    async fn commit(&self, batch: Batch) -> Result<CommitStamp, StoreError> {
        self.check(&batch)?;
        let marker = commit_marker(&self.root);
        let mut trx = self.db.create_trx().map_err(fdb_error)?;
        loop {
            trx.add_conflict_range(&marker, &key_after(&marker), ConflictRangeType::Read)
                .map_err(fdb_error)?;
            match self.violated_fence(&trx, &batch).await {
                Ok(Some(key)) => return Err(StoreError::FenceChanged { key }),
                Ok(None) => {}
                Err(e) => {
                    trx = trx.on_error(e).await.map_err(fdb_error)?;
                    continue;
                }
            }
            if batch.mutations.is_empty() {
                // Nothing to write: the fences held at this read version, which is the stamp.
                match trx.get_read_version().await {
                    Ok(version) => return Ok(read_only_stamp(version)),
                    Err(e) => {
                        trx = trx.on_error(e).await.map_err(fdb_error)?;
                        continue;
                    }
                }
            }
            self.apply(&trx, &batch)?;
            // Asked for before the commit, ready once it succeeded.
            let stamp = trx.get_versionstamp();
            match trx.commit().await {
                Ok(_) => {
                    let stamp = stamp.await.map_err(|e| {
                        // Committed, but the stamp is lost: the caller must resolve it as an
                        // unknown outcome (its writes are there).
                        tracing::error!(
                            code = e.code(),
                            "committed, but FoundationDB gave no versionstamp: {e}"
                        );
                        StoreError::MaybeCommitted
                    })?;
                    let stamp: CommitStamp = stamp[..].try_into().map_err(|_| {
                        tracing::error!(
                            len = stamp.len(),
                            "committed, but the versionstamp is not 10 bytes"
                        );
                        StoreError::MaybeCommitted
                    })?;
                    return Ok(stamp);
                }
                Err(e) if commit_outcome_unknown(*e) => {
                    tracing::warn!(code = e.code(), "FoundationDB commit outcome unknown: {e}");
                    self.settle(&marker).await;
                    return Err(StoreError::MaybeCommitted);
                }
                // Surely not committed (conflict, transaction too old...): FoundationDB's
                // backoff, then again with the fences read anew. Other errors end here.
                Err(e) => trx = e.on_error().await.map_err(fdb_error)?,
            }
        }
    }

    /// The whole range, in one commit: a range clear is one mutation, whatever it holds.
    async fn drop_expired(&self, range: Range<Vec<u8>>) -> Result<(), StoreError> {
        let mut batch = Batch::new();
        batch.clear_range(range);
        self.commit(batch).await.map(drop)
    }

    /// [`LIMITS`], with the root prefix counted against the key limit.
    fn limits(&self) -> BatchLimits {
        BatchLimits {
            max_key_bytes: MAX_KEY_BYTES.saturating_sub(self.root.len()),
            ..LIMITS
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_only_stamps_sit_between_commit_versions() {
        let stamp = read_only_stamp(42);
        let mut before = [0u8; 10];
        before[..8].copy_from_slice(&42i64.to_be_bytes());
        before[8..].copy_from_slice(&7u16.to_be_bytes());
        let mut after = [0u8; 10];
        after[..8].copy_from_slice(&43i64.to_be_bytes());
        assert!(before < stamp, "above every commit at its read version");
        assert!(stamp < after, "below every later commit");
    }

    #[test]
    fn versionstamped_keys_move_their_offset_past_the_root() {
        let keys = crate::Keys::new(b"");
        let ours = keys.outbox_entry(3, 1);
        let theirs = prefixed_versionstamped_key(b"courier", &ours).unwrap();
        let offset = u32::from_le_bytes(ours[ours.len() - 4..].try_into().unwrap()) as usize;
        let shifted = u32::from_le_bytes(theirs[theirs.len() - 4..].try_into().unwrap()) as usize;
        assert_eq!(shifted, offset + b"courier".len());
        assert_eq!(&theirs[..7], b"courier");
        assert_eq!(&theirs[shifted..shifted + 10], &ours[offset..offset + 10]);
        assert_eq!(theirs.len(), ours.len() + 7);
    }

    #[test]
    fn versionstamped_keys_without_room_for_the_stamp_are_refused() {
        let mut key = b"short".to_vec();
        key.extend_from_slice(&0u32.to_le_bytes());
        assert!(matches!(
            prefixed_versionstamped_key(b"r", &key),
            Err(StoreError::TooLarge(_))
        ));
        assert!(prefixed_versionstamped_key(b"r", b"abc").is_err());
    }

    #[test]
    fn fdb_limits_map_to_too_large_and_throttling_to_overloaded() {
        assert!(matches!(
            fdb_error(FdbError::from_code(TRANSACTION_TOO_LARGE)),
            StoreError::TooLarge(_)
        ));
        assert!(matches!(
            fdb_error(FdbError::from_code(TAG_THROTTLED)),
            StoreError::Overloaded(_)
        ));
        let StoreError::Engine(text) = fdb_error(FdbError::from_code(TRANSACTION_TIMED_OUT)) else {
            panic!("a timeout is an engine error");
        };
        assert!(text.contains("1031"), "{text}");
    }
}
