//! A test engine: the embedded engine behind switchable faults (of commits, before or after
//! they apply, and of reads), a switchable batch limit and hooks run before the next commit or
//! after the next read, so that tests reach the error paths of the roles above the store
//! (unknown commit outcomes, an answer lost after its commit landed, an overloaded engine, one
//! shard's writes failing, a failed read, batches over the engine's limit) and interleave a
//! concurrent writer deterministically. It also counts the read calls made of it, as a store
//! node would receive them, keeps the ranges read and counts the rows they returned.

use crate::embedded::EmbeddedEngine;
use crate::kv::{Batch, BatchLimits, CommitStamp, KeyValue};
use crate::{KvEngine, MessageStore, StoreError};
use async_trait::async_trait;
use std::future::Future;
use std::ops::Range;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// Decides, per batch, whether its commit fails (and with what); the batch is then not applied.
pub type Fault = Box<dyn Fn(&Batch) -> Option<StoreError> + Send + Sync>;

/// Decides, per read call, by the first key it reads (or the start of its first range), whether
/// it fails (and with what).
pub type ReadFault = Box<dyn Fn(&[u8]) -> Option<StoreError> + Send + Sync>;

pub struct FaultyEngine {
    inner: EmbeddedEngine,
    fault: Mutex<Option<Fault>>,
    landed_fault: Mutex<Option<Fault>>,
    read_fault: Mutex<Option<ReadFault>>,
    max_batch_bytes: Mutex<Option<usize>>,
    before_next_commit: Mutex<Option<BoxFuture<()>>>,
    after_next_read: Mutex<Option<BoxFuture<()>>>,
    read_calls: AtomicU64,
    rows_read: AtomicU64,
    ranges_read: Mutex<Vec<Range<Vec<u8>>>>,
    _dir: tempfile::TempDir,
}

impl FaultyEngine {
    /// A fresh engine in a temporary directory, without faults.
    pub fn new() -> Arc<Self> {
        let dir = tempfile::tempdir().expect("temporary directory");
        let inner = EmbeddedEngine::open(&dir.path().join("store")).expect("embedded engine");
        Arc::new(Self {
            inner,
            fault: Mutex::new(None),
            landed_fault: Mutex::new(None),
            read_fault: Mutex::new(None),
            max_batch_bytes: Mutex::new(None),
            before_next_commit: Mutex::new(None),
            after_next_read: Mutex::new(None),
            read_calls: AtomicU64::new(0),
            rows_read: AtomicU64::new(0),
            ranges_read: Mutex::new(Vec::new()),
            _dir: dir,
        })
    }

    /// A message store over this engine.
    pub async fn store(self: &Arc<Self>, shards: u32) -> MessageStore {
        MessageStore::open(self.clone(), b"", shards)
            .await
            .expect("message store")
    }

    /// Fails the commits `fault` picks from now on (`None`: none).
    pub fn set_fault(&self, fault: Option<Fault>) {
        *self.fault.lock().unwrap() = fault;
    }

    /// Fails the commits `fault` picks from now on after applying them (`None`: none): the
    /// batch is durable, its answer lost (a store node's reply that never arrived).
    pub fn set_landed_fault(&self, fault: Option<Fault>) {
        *self.landed_fault.lock().unwrap() = fault;
    }

    /// Fails the read calls `fault` picks from now on (`None`: none).
    pub fn set_read_fault(&self, fault: Option<ReadFault>) {
        *self.read_fault.lock().unwrap() = fault;
    }

    /// The error of a read call of `key` (its first key, or its first range's start), if the
    /// read fault picks it.
    fn read_fault(&self, key: &[u8]) -> Result<(), StoreError> {
        match self
            .read_fault
            .lock()
            .unwrap()
            .as_ref()
            .and_then(|f| f(key))
        {
            Some(error) => Err(error),
            None => Ok(()),
        }
    }

    /// Runs `race` (once) just before the next commit, which then sees what it wrote: a
    /// concurrent writer between a read and the commit that depends on it.
    pub fn before_next_commit(&self, race: BoxFuture<()>) {
        *self.before_next_commit.lock().unwrap() = Some(race);
    }

    /// Runs `race` (once) just after the next read call returns, before its caller goes on: a
    /// concurrent writer between two reads of one operation.
    pub fn after_next_read(&self, race: BoxFuture<()>) {
        *self.after_next_read.lock().unwrap() = Some(race);
    }

    /// Counts a read call, then runs the race set by [`FaultyEngine::after_next_read`], if any.
    async fn read_done(&self) {
        self.read_calls.fetch_add(1, Ordering::Relaxed);
        let race = self.after_next_read.lock().unwrap().take();
        if let Some(race) = race {
            race.await;
        }
    }

    /// How many read calls (`get`, `get_many`, `range`, `ranges`) were made so far: each is
    /// one round trip to a store node.
    pub fn read_calls(&self) -> u64 {
        self.read_calls.load(Ordering::Relaxed)
    }

    /// How many rows the range reads (`range`, `ranges`) returned so far.
    pub fn rows_read(&self) -> u64 {
        self.rows_read.load(Ordering::Relaxed)
    }

    /// The ranges read (`range`, `ranges`) since the last call, in the order asked.
    pub fn take_ranges_read(&self) -> Vec<Range<Vec<u8>>> {
        std::mem::take(&mut *self.ranges_read.lock().unwrap())
    }

    /// How many of the ranges read since the last call (of this or
    /// [`FaultyEngine::take_ranges_read`]) began within `within`.
    pub fn take_reads_within(&self, within: &Range<Vec<u8>>) -> usize {
        self.take_ranges_read()
            .into_iter()
            .filter(|read| within.contains(&read.start))
            .count()
    }

    /// Refuses batches above `bytes` from now on, and says so in [`KvEngine::limits`].
    pub fn set_max_batch_bytes(&self, bytes: usize) {
        *self.max_batch_bytes.lock().unwrap() = Some(bytes);
    }
}

/// Whether `batch` writes or clears a key in `range`.
pub fn touches(batch: &Batch, range: &Range<Vec<u8>>) -> bool {
    use crate::kv::Mutation;
    batch.mutations.iter().any(|m| match m {
        Mutation::Set { key, .. }
        | Mutation::Clear { key }
        | Mutation::Max { key, .. }
        | Mutation::Add { key, .. }
        | Mutation::SetVersionstampedKey { key, .. } => range.contains(key),
        Mutation::ClearRange { begin, end } => *begin < range.end && range.start < *end,
    })
}

#[async_trait]
impl KvEngine for FaultyEngine {
    async fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        self.read_fault(key)?;
        let value = self.inner.get(key).await;
        self.read_done().await;
        value
    }

    async fn get_many(&self, keys: Vec<Vec<u8>>) -> Result<Vec<Option<Vec<u8>>>, StoreError> {
        self.read_fault(keys.first().map_or(&[], Vec::as_slice))?;
        let values = self.inner.get_many(keys).await;
        self.read_done().await;
        values
    }

    async fn range(
        &self,
        range: Range<Vec<u8>>,
        limit: usize,
        reverse: bool,
    ) -> Result<Vec<KeyValue>, StoreError> {
        self.read_fault(&range.start)?;
        self.ranges_read.lock().unwrap().push(range.clone());
        let rows = self.inner.range(range, limit, reverse).await;
        self.read_done().await;
        let rows = rows?;
        self.rows_read
            .fetch_add(rows.len() as u64, Ordering::Relaxed);
        Ok(rows)
    }

    async fn ranges(
        &self,
        ranges: Vec<Range<Vec<u8>>>,
        limit: usize,
    ) -> Result<Vec<Vec<KeyValue>>, StoreError> {
        self.read_fault(ranges.first().map_or(&[], |range| range.start.as_slice()))?;
        self.ranges_read
            .lock()
            .unwrap()
            .extend(ranges.iter().cloned());
        let rows = self.inner.ranges(ranges, limit).await;
        self.read_done().await;
        let rows = rows?;
        let count = rows.iter().map(Vec::len).sum::<usize>();
        self.rows_read.fetch_add(count as u64, Ordering::Relaxed);
        Ok(rows)
    }

    async fn commit(&self, batch: Batch) -> Result<CommitStamp, StoreError> {
        let race = self.before_next_commit.lock().unwrap().take();
        if let Some(race) = race {
            race.await;
        }
        batch.check(&self.limits())?;
        if let Some(error) = self.fault.lock().unwrap().as_ref().and_then(|f| f(&batch)) {
            return Err(error);
        }
        let landed = self
            .landed_fault
            .lock()
            .unwrap()
            .as_ref()
            .and_then(|f| f(&batch));
        let stamp = self.inner.commit(batch).await?;
        match landed {
            Some(error) => Err(error),
            None => Ok(stamp),
        }
    }

    async fn drop_expired(&self, range: Range<Vec<u8>>) -> Result<(), StoreError> {
        self.inner.drop_expired(range).await
    }

    fn limits(&self) -> BatchLimits {
        let inner = self.inner.limits();
        BatchLimits {
            max_batch_bytes: self
                .max_batch_bytes
                .lock()
                .unwrap()
                .unwrap_or(inner.max_batch_bytes),
            ..inner
        }
    }
}
