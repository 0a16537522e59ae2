//! The embedded engine: one file on local disk (redb: copy-on-write B-trees, MVCC readers,
//! one writer), fsync on every commit, no set-up. Chosen by measurement, see
//! `docs/decisions/0001-embedded-engine.md`.
//!
//! **Group commit.** Commits queue for one writer thread, which takes every waiting batch (up to
//! [`GROUP_MAX_BATCHES`] or [`GROUP_MAX_BYTES`]) into one redb transaction and one fsync. Each
//! batch keeps its own fences and outcome: a refused batch writes nothing and does not affect the
//! others. The queue holds [`QUEUE_CAPACITY`] batches; when full, `commit` waits (backpressure
//! reaches the caller as a slower commit, never as a lost write).
//!
//! **Versionstamps.** A persistent commit counter, bumped once per group and stored in the same
//! transaction, plus the batch's position in its group: the same 10-byte layout as
//! FoundationDB's, and increasing across restarts.

use crate::kv::{Batch, CommitStamp, KeyValue, KvEngine, Mutation, StoreError, decode_u64};
use async_trait::async_trait;
use redb::{Durability, ReadableDatabase, ReadableTable, TableDefinition};
use std::ops::Range;
use std::path::Path;
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot};

const DATA: TableDefinition<&[u8], &[u8]> = TableDefinition::new("data");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const COMMIT_VERSION: &str = "commit_version";

/// Batches waiting for the writer before `commit` callers wait for room.
pub const QUEUE_CAPACITY: usize = 4096;
/// Most batches in one group commit (one fsync); also the range of a stamp's batch order.
pub const GROUP_MAX_BATCHES: usize = 1024;
/// Most bytes of keys and values in one group commit.
pub const GROUP_MAX_BYTES: usize = 16 << 20;
/// Largest value accepted, as in FoundationDB (100 kB); larger ones are the caller's to chunk.
pub const MAX_VALUE_BYTES: usize = 100_000;
/// Largest key accepted, as in FoundationDB.
pub const MAX_KEY_BYTES: usize = 10_000;

struct CommitRequest {
    batch: Batch,
    reply: oneshot::Sender<Result<CommitStamp, StoreError>>,
}

/// The embedded engine. Cheap to share behind an `Arc`; dropping the last handle stops the
/// writer after the queued commits.
pub struct EmbeddedEngine {
    db: Arc<redb::Database>,
    queue: mpsc::Sender<CommitRequest>,
}

fn engine_error(e: impl std::fmt::Display) -> StoreError {
    StoreError::Engine(e.to_string())
}

impl EmbeddedEngine {
    /// Opens (or creates) the database file at `path`. After a crash, redb repairs the file on
    /// open; every commit that returned `Ok` is kept.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let db = redb::Database::create(path).map_err(|e| {
            StoreError::Engine(format!("cannot open the store at {}: {e}", path.display()))
        })?;
        let txn = db.begin_write().map_err(engine_error)?;
        let version = {
            txn.open_table(DATA).map_err(engine_error)?;
            let meta = txn.open_table(META).map_err(engine_error)?;
            meta.get(COMMIT_VERSION)
                .map_err(engine_error)?
                .map_or(0, |v| v.value())
        };
        txn.commit().map_err(engine_error)?;

        let db = Arc::new(db);
        let (queue, requests) = mpsc::channel(QUEUE_CAPACITY);
        let writer_db = db.clone();
        std::thread::Builder::new()
            .name("courier-store-writer".into())
            .spawn(move || write_loop(&writer_db, requests, version))
            .map_err(engine_error)?;
        Ok(Self { db, queue })
    }

    fn read_txn(&self) -> Result<redb::ReadTransaction, StoreError> {
        self.db.begin_read().map_err(engine_error)
    }
}

#[async_trait]
impl KvEngine for EmbeddedEngine {
    // Reads run on the caller's thread: they are served from redb's page cache and take
    // microseconds; they never wait for the writer.
    async fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        let txn = self.read_txn()?;
        let table = txn.open_table(DATA).map_err(engine_error)?;
        let value = table.get(key).map_err(engine_error)?;
        Ok(value.map(|v| v.value().to_vec()))
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
        let txn = self.read_txn()?;
        let table = txn.open_table(DATA).map_err(engine_error)?;
        let iter = table
            .range::<&[u8]>(range.start.as_slice()..range.end.as_slice())
            .map_err(engine_error)?;
        let pair = |item: Result<
            (redb::AccessGuard<&[u8]>, redb::AccessGuard<&[u8]>),
            redb::StorageError,
        >| {
            item.map(|(k, v)| (k.value().to_vec(), v.value().to_vec()))
                .map_err(engine_error)
        };
        if reverse {
            iter.rev().take(limit).map(pair).collect()
        } else {
            iter.take(limit).map(pair).collect()
        }
    }

    async fn commit(&self, batch: Batch) -> Result<CommitStamp, StoreError> {
        check_limits(&batch)?;
        let (reply, outcome) = oneshot::channel();
        self.queue
            .send(CommitRequest { batch, reply })
            .await
            .map_err(|_| StoreError::Engine("the store writer has stopped".into()))?;
        outcome
            .await
            .map_err(|_| StoreError::Engine("the store writer has stopped".into()))?
    }
}

fn check_limits(batch: &Batch) -> Result<(), StoreError> {
    for m in &batch.mutations {
        let (key, value) = match m {
            Mutation::Set { key, value } | Mutation::SetVersionstampedKey { key, value } => {
                (key, value.len())
            }
            Mutation::Clear { key } | Mutation::Max { key, .. } | Mutation::Add { key, .. } => {
                (key, 0)
            }
            Mutation::ClearRange { begin, .. } => (begin, 0),
        };
        if key.len() > MAX_KEY_BYTES || value > MAX_VALUE_BYTES {
            return Err(StoreError::TooLarge(format!(
                "keys are limited to {MAX_KEY_BYTES} bytes and values to {MAX_VALUE_BYTES}"
            )));
        }
    }
    if batch.approximate_size() > GROUP_MAX_BYTES {
        return Err(StoreError::TooLarge(format!(
            "a batch is limited to {GROUP_MAX_BYTES} bytes"
        )));
    }
    Ok(())
}

/// The writer: takes what is queued, commits it as one transaction, answers each batch.
fn write_loop(db: &redb::Database, mut requests: mpsc::Receiver<CommitRequest>, mut version: u64) {
    let mut group = Vec::with_capacity(GROUP_MAX_BATCHES);
    while let Some(first) = requests.blocking_recv() {
        let mut bytes = first.batch.approximate_size();
        group.push(first);
        while group.len() < GROUP_MAX_BATCHES && bytes < GROUP_MAX_BYTES {
            match requests.try_recv() {
                Ok(next) => {
                    bytes += next.batch.approximate_size();
                    group.push(next);
                }
                Err(_) => break,
            }
        }
        version += 1;
        match commit_group(db, &group, version) {
            Ok(outcomes) => {
                for (request, outcome) in group.drain(..).zip(outcomes) {
                    let _ = request.reply.send(outcome);
                }
            }
            Err(e) => {
                version -= 1;
                tracing::error!(error = %e, "group commit failed");
                for request in group.drain(..) {
                    let _ = request.reply.send(Err(engine_error(&e)));
                }
            }
        }
    }
}

fn stamp(version: u64, order: usize) -> CommitStamp {
    let mut s = [0u8; 10];
    s[..8].copy_from_slice(&version.to_be_bytes());
    s[8..].copy_from_slice(&(order as u16).to_be_bytes());
    s
}

/// One transaction for a group: per batch, check fences then apply; one durable commit.
/// Returns each batch's outcome; `Err` when the transaction itself failed (nothing written).
fn commit_group(
    db: &redb::Database,
    group: &[CommitRequest],
    version: u64,
) -> Result<Vec<Result<CommitStamp, StoreError>>, StoreError> {
    let mut txn = db.begin_write().map_err(engine_error)?;
    txn.set_durability(Durability::Immediate)
        .map_err(engine_error)?;
    let mut outcomes = Vec::with_capacity(group.len());
    {
        let mut data = txn.open_table(DATA).map_err(engine_error)?;
        for (order, request) in group.iter().enumerate() {
            let stamp = stamp(version, order);
            outcomes.push(match fence_violation(&data, &request.batch)? {
                Some(key) => Err(StoreError::FenceChanged { key }),
                None => {
                    apply(&mut data, &request.batch, &stamp)?;
                    Ok(stamp)
                }
            });
        }
        let mut meta = txn.open_table(META).map_err(engine_error)?;
        meta.insert(COMMIT_VERSION, version).map_err(engine_error)?;
    }
    txn.commit().map_err(engine_error)?;
    Ok(outcomes)
}

type DataTable<'t> = redb::Table<'t, &'static [u8], &'static [u8]>;

fn fence_violation(data: &DataTable<'_>, batch: &Batch) -> Result<Option<Vec<u8>>, StoreError> {
    for fence in &batch.fences {
        let current = data.get(fence.key.as_slice()).map_err(engine_error)?;
        if current.as_ref().map(|v| v.value()) != fence.expected.as_deref() {
            return Ok(Some(fence.key.clone()));
        }
    }
    Ok(None)
}

fn apply(data: &mut DataTable<'_>, batch: &Batch, stamp: &CommitStamp) -> Result<(), StoreError> {
    for m in &batch.mutations {
        match m {
            Mutation::Set { key, value } => {
                data.insert(key.as_slice(), value.as_slice())
                    .map_err(engine_error)?;
            }
            Mutation::Clear { key } => {
                data.remove(key.as_slice()).map_err(engine_error)?;
            }
            Mutation::ClearRange { begin, end } => {
                if begin < end {
                    data.retain_in::<&[u8], _>(begin.as_slice()..end.as_slice(), |_, _| false)
                        .map_err(engine_error)?;
                }
            }
            Mutation::Max { key, value } => {
                let current = data
                    .get(key.as_slice())
                    .map_err(engine_error)?
                    .map(|v| decode_u64(v.value()));
                if current.is_none_or(|c| c < *value) {
                    data.insert(key.as_slice(), value.to_le_bytes().as_slice())
                        .map_err(engine_error)?;
                }
            }
            Mutation::Add { key, delta } => {
                let current = data
                    .get(key.as_slice())
                    .map_err(engine_error)?
                    .map_or(0, |v| decode_u64(v.value()));
                let sum = current.wrapping_add(*delta as u64);
                data.insert(key.as_slice(), sum.to_le_bytes().as_slice())
                    .map_err(engine_error)?;
            }
            Mutation::SetVersionstampedKey { key, value } => {
                let key = complete_versionstamped_key(key, stamp)?;
                data.insert(key.as_slice(), value.as_slice())
                    .map_err(engine_error)?;
            }
        }
    }
    Ok(())
}

/// Writes `stamp` at the offset named by the key's last four bytes, and drops those bytes.
fn complete_versionstamped_key(key: &[u8], stamp: &CommitStamp) -> Result<Vec<u8>, StoreError> {
    let invalid = || StoreError::TooLarge("versionstamped key without a valid offset".into());
    let split = key.len().checked_sub(4).ok_or_else(invalid)?;
    let (body, offset) = key.split_at(split);
    let offset = u32::from_le_bytes(offset.try_into().map_err(|_| invalid())?) as usize;
    if offset + stamp.len() > body.len() {
        return Err(invalid());
    }
    let mut out = body.to_vec();
    out[offset..offset + stamp.len()].copy_from_slice(stamp);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::contract::{self, EngineHarness};

    struct Harness {
        dir: tempfile::TempDir,
    }

    #[async_trait]
    impl EngineHarness for Harness {
        async fn open(&mut self) -> Arc<dyn KvEngine> {
            Arc::new(EmbeddedEngine::open(&self.dir.path().join("store.redb")).unwrap())
        }
        async fn reopen_after_crash(&mut self, engine: Arc<dyn KvEngine>) -> Arc<dyn KvEngine> {
            // Dropping the handle without any shutdown call is what a crash leaves behind as
            // far as committed data goes; the writer thread exits when its queue closes.
            drop(engine);
            loop {
                match EmbeddedEngine::open(&self.dir.path().join("store.redb")) {
                    Ok(e) => return Arc::new(e),
                    // The old writer thread may still hold the file for a moment.
                    Err(_) => tokio::task::yield_now().await,
                }
            }
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn embedded_engine_passes_the_contract() {
        let mut harness = Harness {
            dir: tempfile::tempdir().unwrap(),
        };
        contract::run_all(&mut harness).await;
    }

    #[tokio::test]
    async fn oversized_values_are_refused_with_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let kv = EmbeddedEngine::open(&dir.path().join("s.redb")).unwrap();
        let mut batch = Batch::new();
        batch.set(b"k".to_vec(), vec![0; MAX_VALUE_BYTES + 1]);
        assert!(matches!(
            kv.commit(batch).await,
            Err(StoreError::TooLarge(_))
        ));
    }
}
