//! The FoundationDB engine (feature `fdb`): the [`KvEngine`] contract on a FoundationDB
//! cluster, through the `foundationdb` crate (API 7.3). Thin by design: the message-store logic
//! above it is the same for every engine.
//!
//! - Every key is prefixed with the engine's root (one cluster can hold several stores, and
//!   each contract-test run its own).
//! - `commit` is one transaction: fences are serializable reads (a concurrent change to a
//!   fenced key makes the commit conflict and retry, and the retry sees the change and refuses
//!   with [`StoreError::FenceChanged`]); `MAX`/`ADD` are atomic operations (no conflicts);
//!   versionstamped keys use `SetVersionstampedKey` and the returned stamp is the transaction's.
//! - Retryable errors are retried with FoundationDB's own backoff (`on_error`), but a commit whose
//!   outcome is unknown (`commit_unknown_result`, the maybe-committed flag) is never blindly
//!   retried: it is reported as [`StoreError::MaybeCommitted`] and the message store resolves it
//!   through its idempotency keys.
//! - Batches are bounded under FoundationDB's limits: at most [`MAX_BATCH_BYTES`] per
//!   transaction (FoundationDB's hard limit is 10 MB) and values of at most [`MAX_VALUE_BYTES`]
//!   (100 kB); the message store never writes larger values (events are bounded by the frame
//!   limit), so nothing is chunked here.
//! - Range reads are snapshot reads (queue tails and catch-up need no conflicts), paged until
//!   the limit or the end.
//! - The network thread is booted once per process and runs until it exits.

use crate::kv::{Batch, BatchLimits, CommitStamp, KeyValue, KvEngine, Mutation, StoreError};
use async_trait::async_trait;
use foundationdb::options::MutationType;
use foundationdb::{Database, FdbError, RangeOption, Transaction};
use std::ops::Range;
use std::path::Path;
use std::sync::OnceLock;

/// Largest batch, in bytes of keys and values, well under FoundationDB's 10 MB.
pub const MAX_BATCH_BYTES: usize = 8 << 20;
/// Largest value (FoundationDB refuses values above 100 kB).
pub const MAX_VALUE_BYTES: usize = 100_000;

fn fdb_error(e: FdbError) -> StoreError {
    StoreError::Engine(format!("FoundationDB error {}: {e}", e.code()))
}

/// Boots the FoundationDB network thread the first time it is called, in this process.
fn boot_network() -> Result<(), StoreError> {
    static NETWORK: OnceLock<Result<(), String>> = OnceLock::new();
    NETWORK
        .get_or_init(|| {
            // SAFETY: called once per process (guarded by the OnceLock), before any other use
            // of the FoundationDB API; the network is never stopped, so no API call can
            // outlive it.
            let network = unsafe {
                foundationdb::api::FdbApiBuilder::default()
                    .build()
                    .and_then(|builder| builder.boot())
            };
            match network {
                Ok(network) => {
                    // The network thread must run for the whole process.
                    std::mem::forget(network);
                    Ok(())
                }
                Err(e) => Err(format!("cannot start the FoundationDB client: {e}")),
            }
        })
        .clone()
        .map_err(StoreError::Engine)
}

/// A FoundationDB cluster as a [`KvEngine`], under a root prefix.
pub struct FdbEngine {
    db: Database,
    root: Vec<u8>,
}

impl FdbEngine {
    /// Connects to the cluster named by `cluster_file`; every key is stored under `root`.
    pub fn open(cluster_file: &Path, root: &[u8]) -> Result<Self, StoreError> {
        boot_network()?;
        let path = cluster_file.to_str().ok_or_else(|| {
            StoreError::Engine(format!(
                "cluster file path is not UTF-8: {}",
                cluster_file.display()
            ))
        })?;
        let db = Database::new(Some(path)).map_err(fdb_error)?;
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

    /// A versionstamped key of ours (offset relative to our key) as FoundationDB wants it
    /// (offset relative to the prefixed key).
    fn versionstamped_key(&self, key: &[u8]) -> Result<Vec<u8>, StoreError> {
        let invalid = || StoreError::TooLarge("versionstamped key without a valid offset".into());
        let split = key.len().checked_sub(4).ok_or_else(invalid)?;
        let (body, offset) = key.split_at(split);
        let offset = u32::from_le_bytes(offset.try_into().map_err(|_| invalid())?);
        let mut out = self.key(body);
        out.extend_from_slice(&(offset + self.root.len() as u32).to_le_bytes());
        Ok(out)
    }

    fn apply(&self, trx: &Transaction, batch: &Batch) -> Result<(), StoreError> {
        for m in &batch.mutations {
            match m {
                Mutation::Set { key, value } => trx.set(&self.key(key), value),
                Mutation::Clear { key } => trx.clear(&self.key(key)),
                Mutation::ClearRange { begin, end } => {
                    trx.clear_range(&self.key(begin), &self.key(end))
                }
                Mutation::Max { key, value } => {
                    trx.atomic_op(&self.key(key), &value.to_le_bytes(), MutationType::Max)
                }
                Mutation::Add { key, delta } => {
                    trx.atomic_op(&self.key(key), &delta.to_le_bytes(), MutationType::Add)
                }
                Mutation::SetVersionstampedKey { key, value } => trx.atomic_op(
                    &self.versionstamped_key(key)?,
                    value,
                    MutationType::SetVersionstampedKey,
                ),
            }
        }
        Ok(())
    }

    /// The first fence that does not hold, read serializably in `trx`.
    async fn violated_fence(
        &self,
        trx: &Transaction,
        batch: &Batch,
    ) -> Result<Option<Vec<u8>>, FdbError> {
        for fence in &batch.fences {
            let current = trx.get(&self.key(&fence.key), false).await?;
            if current.as_deref() != fence.expected.as_deref() {
                return Ok(Some(fence.key.clone()));
            }
        }
        Ok(None)
    }
}

/// What one transaction may hold, well under FoundationDB's own limits.
pub const LIMITS: BatchLimits = BatchLimits {
    max_key_bytes: 10_000,
    max_value_bytes: MAX_VALUE_BYTES,
    max_batch_bytes: MAX_BATCH_BYTES,
};

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
                out.extend(
                    page.iter()
                        .map(|kv| (kv.key()[self.root.len()..].to_vec(), kv.value().to_vec())),
                );
                if out.len() >= limit {
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
        batch.check(&LIMITS)?;
        let mut trx = self.db.create_trx().map_err(fdb_error)?;
        loop {
            match self.violated_fence(&trx, &batch).await {
                Ok(Some(key)) => return Err(StoreError::FenceChanged { key }),
                Ok(None) => {}
                Err(e) => {
                    trx = trx.on_error(e).await.map_err(fdb_error)?;
                    continue;
                }
            }
            self.apply(&trx, &batch)?;
            let stamp = trx.get_versionstamp();
            match trx.commit().await {
                Ok(_) => {
                    let stamp = stamp.await.map_err(fdb_error)?;
                    let mut out = [0u8; 10];
                    let n = stamp.len().min(10);
                    out[..n].copy_from_slice(&stamp[..n]);
                    return Ok(out);
                }
                Err(e) if e.is_maybe_committed() => return Err(StoreError::MaybeCommitted),
                // Retryable and surely not committed (conflict, too old...): FoundationDB's
                // backoff, then again with the fences read anew. Other errors end here.
                Err(e) => trx = e.on_error().await.map_err(fdb_error)?,
            }
        }
    }
}
