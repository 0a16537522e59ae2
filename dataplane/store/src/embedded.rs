//! The embedded engine: a directory on local disk (fjall: an LSM tree with a write-ahead
//! journal and snapshot readers), one writer thread, fsync on every synced commit, no set-up.
//! Chosen by measurement, see `docs/decisions/0001-embedded-engine.md`.
//!
//! **Group commit.** Commits queue for one writer thread, which takes every waiting batch (up to
//! [`GROUP_MAX_BATCHES`] or [`GROUP_MAX_BYTES`]) into one fjall write batch (reads see the
//! group's earlier writes, `crate::group_writes`) and one journal fsync. Each batch keeps its
//! own fences and outcome: a refused batch writes nothing and does not affect the others. A
//! group of [`Durability::Deferred`] batches only is written to the journal and handed to the
//! operating system without an fsync; the next synced group (one fsync of the same journal)
//! makes it durable too. The queue holds [`QUEUE_CAPACITY`] batches; when full, `commit` waits
//! (backpressure reaches the caller as a slower commit, never as a lost write). The writer
//! counts its work ([`KvEngine::writer_totals`]): the time it spends on groups against the time
//! that passes is how busy it is, and at one second a second commits queue for it.
//!
//! **A failed write halts the engine.** When fjall cannot write or sync its journal (disk full,
//! I/O error) it poisons the database: no later write is accepted, as what is on disk is in
//! doubt. The engine then answers every commit [`StoreError::Halted`] (retry elsewhere or after
//! a restart) and reports it through [`KvEngine::halted`], so the process fails its health
//! checks and is restarted; reopening replays the journal and keeps every commit that returned
//! `Ok`.
//!
//! **Memtables freed by the store.** Once a full memtable is flushed, fjall's version GC
//! drops its last reference while it holds the lock every write takes to find the active
//! memtable, so every commit waited for that memory to be freed: ~250 ms for a 64 MiB memtable
//! (about 200,000 entries) on the test machine, 60-140 ms for 16 MiB. So a thread of the store
//! keeps a reference to each memtable and frees it once it is the last holder
//! ([`upkeep_loop`]). The data's keyspaces have fjall's default [`MEMTABLE_BYTES`]
//! again: a 16 MiB memtable had bounded the stall at 9-14 % of peak throughput
//! (`docs/benchmarks.md`, "The light-load tail, found", and "Memtables freed off the write
//! lock"). fjall stores the size when it creates the keyspace: a store created with 16 MiB
//! keeps it.
//!
//! **Three background workers at least.** fjall flushes and compacts on a pool of workers (one
//! per core, up to four). After each flush it asks every worker to compact, and worker 0 puts
//! that request back for another worker so as to stay free for flushes: with two workers (two
//! cores), worker 0 takes it straight back and spins on the channel for as long as worker 1
//! compacts, ~22 % of the server's CPU at the peak on the test machine. A third worker takes
//! the request and ends the spin (`docs/benchmarks.md`, "fjall's compaction keeps a second
//! worker spinning"). One worker would not spin, but it runs rotations and flushes behind a
//! compaction, and fjall halts writes once four sealed memtables wait (commits of 100-200 ms).
//!
//! **Background workers at the lowest CPU priority.** Under a steady load a memtable fills every
//! few seconds, and its flush and the compactions after it take ~0.2-0.5 s of a core at once;
//! meanwhile the journal's fsyncs wait behind the table's writes. At 10,000 msgs/s with 100
//! pairs on the 2-core test machine most slow send-ACKs of a run fell in those windows, and
//! they set its p99. With fjall's workers at nice [`BACKGROUND_NICE`] they leave the cores to
//! the connections, the sequencer and the writer: send-ACK p99 median 16.5 -> 14.1 ms in 13
//! alternated rounds (14.9 -> 13.2 in 6 more), the peak unchanged, and a minute at the peak with
//! every core busy still flushed each memtable with no write halted (`docs/benchmarks.md`,
//! "Flushes set the tail at 10,000 msgs/s"). Should they fall behind, fjall's own backpressure (a
//! halt once four sealed memtables wait) slows the writes until they catch up. On Linux, where a
//! thread's nice value is its own; elsewhere they keep the process's priority.
//!
//! **Counters and fences read from the writer.** A `Max` or `Add` mutation (a device's
//! cursor, a user's receipts, usage counters) reads the key's current value, and so does each
//! fence of a batch (a shard's epoch, on every append and every record of fanout's bounds).
//! The writer keeps the values it last wrote or read for such keys ([`Known`]), up to
//! [`KNOWN_MAX`] keys, and reads the store only for the others: every write of the store goes
//! through the writer, so they stay exact. A point read of a 64 MiB memtable was ~10 % of the
//! server's CPU while 1,000 group members acknowledged every event (`docs/benchmarks.md`,
//! "Receipts offered at once"); the fences' reads were 2 % at 5,000 msgs/s ("Acks committed
//! together").
//!
//! **Rows read by key, from memory.** A point read leaves what it found (a value, or the key
//! absent) in the store's row cache (`crate::row_cache`), and the next read of that key takes
//! it from there instead of searching the memtable (~2-3 us each for a 64 MiB memtable; an ack
//! reads four keys). Idempotency records are not held: an append looks its record up in two
//! buckets and almost always finds nothing, then writes one of them, so they were filled to be
//! dropped or never read again, and past [`crate::row_cache::ROWS_MAX`] rows a fill empties
//! the cache, the hot rows with it (at 40,000 msgs/s the previous bucket's misses alone could
//! fill it in under two seconds). The writer keeps the cache exact: it drops the rows of a
//! group's keys before the commit and puts them back with the group's values after it.
//! `get_many` still reads one state of the store: a row held while a commit is under way is
//! one that commit does not write, and a read whose look-up a commit followed reads every key
//! from its snapshot.
//!
//! **Recent events from memory.** The writer also keeps the events it committed last, per
//! conversation (`crate::event_cache`), and a range read of one conversation's events that it
//! holds whole (a device's catch-up, a gap fill, a `fetch`) is answered from them instead of
//! merging fjall's memtables and tables and reading its blob files: in a reconnect storm those
//! reads were ~22 % of the server's CPU (`docs/benchmarks.md`, "Recent events from memory"). It
//! is kept exact like the row cache: an event a group writes or clears is a hole while the group
//! commits, and the group's writes are applied once it has. After a restart the writer reads the
//! events of the conversations it held back into it while it has nothing to commit
//! (`crate::warm_up`).
//!
//! **Idempotency records apart.** The data lives in two keyspaces: the idempotency records,
//! looked up on every append and almost never found, in one of their own, every other key in
//! the other ([`crate::keyspaces`]). Reads, writes and range clears go to the keyspace that
//! holds each key; a range that spans both is read piece by piece, in key order.
//!
//! **Versionstamps.** A commit counter, bumped once per group, plus the batch's position in its
//! group: the same 10-byte layout as FoundationDB's, and increasing across restarts. The store
//! holds a ceiling on the counter, not its value: the group that passes the ceiling raises it by
//! [`VERSIONS_RESERVED`] in its own batch, synced whatever its batches ask, so that every later
//! group's version is below a durable ceiling, and the other groups write no version at all.
//!
//! **The ceiling flushed at once.** fjall deletes a journal file once every keyspace has flushed
//! what the file holds of it. The ceiling's keyspace is written once per [`VERSIONS_RESERVED`]
//! groups (every ~45 s at 10,000 msgs/s), so its memtable never filled and kept every journal
//! since the store opened, until fjall's limit on journals (512 MiB) forced its flush and they
//! went all at once: at 10,000 msgs/s, six files of ~100 MB every ~75 s, whose deletion held up
//! the journal's fsyncs on a volume mounted with `discard` (`crate::volume`). So the writer has
//! that keyspace flushed after each group that raises the ceiling ([`flush_ceiling`]), and the
//! journals go as the data's keyspaces flush: two or three at a time at that rate, when the
//! idempotency records' memtable fills, four at most on disk instead of six (`docs/benchmarks.md`,
//! "Journals kept by a keyspace written once a minute; deletes on a volume mounted with
//! discard").

use crate::backup::StoreSnapshot;
use crate::event_cache::{EventCache, RUN_EVENTS_MAX};
use crate::group_writes::GroupWrites;
use crate::keyspaces::Keyspaces;
use crate::kv::{
    Batch, BatchLimits, CommitStamp, Durability, EventCacheTotals, KeyValue, KvEngine, Mutation,
    StoreError, WriterTotals, complete_versionstamped_key, decode_u64,
};
use crate::row_cache::{RowCache, Writing, Written};
use crate::warm_up::{Note, WarmUp};
use async_trait::async_trait;
use fjall::{
    AbstractTree, KeyspaceCreateOptions, PersistMode, Readable, SingleWriterTxDatabase,
    SingleWriterTxKeyspace,
};
use foldhash::HashMap;
use std::ops::Range;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

/// The engine's own bookkeeping, apart from the data.
pub(crate) const COMMIT_VERSION: &[u8] = b"commit_version";
/// Commit versions reserved by one write of [`COMMIT_VERSION`] (module documentation): a
/// restart skips what is left of them, a few seconds of groups at most.
const VERSIONS_RESERVED: u64 = 1 << 16;

/// Batches waiting for the writer before `commit` callers wait for room.
pub const QUEUE_CAPACITY: usize = 4096;
/// Most batches in one group commit (one fsync); also the range of a stamp's batch order.
pub const GROUP_MAX_BATCHES: usize = 1024;
/// Most bytes of keys and values in one group commit.
pub const GROUP_MAX_BYTES: usize = 16 << 20;
/// Most counter and fence keys whose values the writer keeps ([`Known`]); past it they are
/// all forgotten at once (~100 bytes each with a 50-byte key).
pub const KNOWN_MAX: usize = 1 << 18;

/// fjall's background workers (flushes and compactions): fjall's default, one per core up to
/// four, but three at least (module documentation).
fn flush_and_compaction_workers() -> usize {
    std::thread::available_parallelism()
        .map_or(1, usize::from)
        .clamp(3, 4)
}

/// The nice value of fjall's flush and compaction workers: the lowest priority (module
/// documentation).
pub const BACKGROUND_NICE: i32 = 19;

/// The name fjall gives its workers' threads.
#[cfg(target_os = "linux")]
const WORKER_THREAD_NAME: &str = "fjall:worker";

/// How long an open waits for fjall's new workers to name themselves (they do as they start).
#[cfg(target_os = "linux")]
const WORKERS_NAMED_WITHIN: Duration = Duration::from_secs(1);

/// Puts the `workers` fjall workers an open just started at [`BACKGROUND_NICE`] (Linux, where
/// `setpriority` with a thread's id sets that thread's nice value alone; elsewhere nothing).
/// They are found by name, once they have named themselves; any other fjall worker of the
/// process is put there too. Raising a nice value needs no privilege; where it fails (a sandbox
/// that forbids it) the workers keep their priority and a warning says so.
#[cfg_attr(not(target_os = "linux"), expect(unused_variables))]
fn lower_background_priority(workers: usize) {
    #[cfg(target_os = "linux")]
    {
        use rustix::process::{Pid, getpriority_process, setpriority_process};
        if getpriority_process(None).is_ok_and(|nice| nice >= BACKGROUND_NICE) {
            // The workers inherited the opening thread's priority, already the lowest.
            return;
        }
        let deadline = std::time::Instant::now() + WORKERS_NAMED_WITHIN;
        let mut lowered = 0;
        loop {
            for pid in threads_named(WORKER_THREAD_NAME)
                .into_iter()
                .filter_map(Pid::from_raw)
            {
                if getpriority_process(Some(pid)).is_ok_and(|nice| nice == BACKGROUND_NICE) {
                    continue;
                }
                if let Err(e) = setpriority_process(Some(pid), BACKGROUND_NICE) {
                    tracing::warn!(error = %e, "could not lower the priority of the store's flushes");
                    return;
                }
                lowered += 1;
            }
            if lowered >= workers || std::time::Instant::now() >= deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        if lowered < workers {
            tracing::warn!(
                lowered,
                workers,
                "not every flush worker of the store was found to lower its priority"
            );
        }
    }
}

/// The ids of this process's threads named `name` (Linux).
#[cfg(target_os = "linux")]
fn threads_named(name: &str) -> Vec<i32> {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return Vec::new();
    };
    tasks
        .flatten()
        .filter(|task| {
            std::fs::read_to_string(task.path().join("comm"))
                .is_ok_and(|comm| comm.trim_end() == name)
        })
        .filter_map(|task| task.file_name().to_str()?.parse().ok())
        .collect()
}

/// The data's keyspaces' memtable size, fjall's default (module documentation).
pub const MEMTABLE_BYTES: u64 = 64 << 20;
/// The block cache's size unless the operator gives one, fjall's default: decompressed blocks
/// of the tables, read again from memory (`--store-cache`).
pub const DEFAULT_CACHE_BYTES: u64 = 32 << 20;
/// The recent events' cache's size unless the operator gives one (`--store-event-cache`,
/// `crate::event_cache`).
pub const DEFAULT_EVENT_CACHE_BYTES: u64 = 32 << 20;
/// Largest value accepted, as in FoundationDB (100 kB); larger ones are the caller's to chunk.
pub const MAX_VALUE_BYTES: usize = 100_000;
/// Largest key accepted, as in FoundationDB.
pub const MAX_KEY_BYTES: usize = 10_000;
/// How far every group commit is persisted before its batches are answered: the journal is
/// written and fsynced (data and metadata), so an `Ok` survives a power loss, not only a crash
/// of the process.
const COMMIT_PERSIST: PersistMode = PersistMode::SyncAll;

/// The sizes of the engine's caches, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caches {
    /// fjall's block cache.
    pub blocks: u64,
    /// The recent events (0: none kept).
    pub events: u64,
}

impl Default for Caches {
    fn default() -> Self {
        Self {
            blocks: DEFAULT_CACHE_BYTES,
            events: DEFAULT_EVENT_CACHE_BYTES,
        }
    }
}

struct CommitRequest {
    batch: Batch,
    reply: oneshot::Sender<Result<CommitStamp, StoreError>>,
}

/// The embedded engine. Cheap to share behind an `Arc`; dropping the last handle stops the
/// writer after the queued commits.
pub struct EmbeddedEngine {
    db: Arc<Store>,
    queue: mpsc::Sender<CommitRequest>,
    /// Set, with the reason, by the writer when a commit fails; never cleared.
    halted: Arc<OnceLock<String>>,
    /// What the writer has done ([`KvEngine::writer_totals`]).
    work: Arc<WriterWork>,
}

/// The writer's totals, added to after each group it commits, before it answers the group.
#[derive(Default)]
struct WriterWork {
    busy_nanos: AtomicU64,
    groups: AtomicU64,
    batches: AtomicU64,
}

impl WriterWork {
    fn record(&self, busy: Duration, batches: usize) {
        let nanos = u64::try_from(busy.as_nanos()).unwrap_or(u64::MAX);
        self.busy_nanos.fetch_add(nanos, Ordering::Relaxed);
        self.groups.fetch_add(1, Ordering::Relaxed);
        self.batches.fetch_add(batches as u64, Ordering::Relaxed);
    }

    fn totals(&self) -> WriterTotals {
        WriterTotals {
            busy: Duration::from_nanos(self.busy_nanos.load(Ordering::Relaxed)),
            groups: self.groups.load(Ordering::Relaxed),
            batches: self.batches.load(Ordering::Relaxed),
        }
    }
}

/// The database, its keyspaces for data and the one for its own bookkeeping.
struct Store {
    db: SingleWriterTxDatabase,
    data: Keyspaces,
    meta: SingleWriterTxKeyspace,
    /// Rows of `data` read by key, kept in step by the writer (module documentation).
    rows: RowCache,
    /// The events the writer committed last, kept in step by it (`crate::event_cache`).
    events: EventCache,
    /// Which conversations `events` holds, for the next start (`crate::warm_up`).
    note: Note,
    /// Memtables of `data` freed by [`upkeep_loop`].
    memtables_freed: AtomicU64,
}

/// Opens (or creates) the keyspace of the engine's own bookkeeping.
pub(crate) fn open_meta(db: &SingleWriterTxDatabase) -> Result<SingleWriterTxKeyspace, StoreError> {
    db.keyspace("meta", KeyspaceCreateOptions::default)
        .map_err(engine_error)
}

pub(crate) fn engine_error(e: impl std::fmt::Display) -> StoreError {
    StoreError::Engine(e.to_string())
}

impl EmbeddedEngine {
    /// Opens (or creates) the database directory at `path`. After a crash, fjall replays its
    /// journal on open; every commit that returned `Ok` is kept.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        Self::open_with_caches(path, Caches::default())
    }

    /// [`open`](Self::open), with caches of the sizes given.
    pub fn open_with_caches(path: &Path, caches: Caches) -> Result<Self, StoreError> {
        let workers = flush_and_compaction_workers();
        let db = SingleWriterTxDatabase::builder(path)
            .cache_size(caches.blocks)
            .worker_threads(workers)
            .open()
            .map_err(|e| match e {
                // fjall's lock file: one process writes a store, or commits it acknowledged
                // could be lost.
                fjall::Error::Locked => StoreError::Engine(format!(
                    "the store at {} is open in another process (a `courier serve` or \
                     `courier store-node` on the same data directory): stop that one, or give \
                     this one another --data-dir",
                    path.display()
                )),
                e => {
                    StoreError::Engine(format!("cannot open the store at {}: {e}", path.display()))
                }
            })?;
        lower_background_priority(workers);
        crate::volume::warn_of_online_discard(path);
        let data = Keyspaces::open(&db, MEMTABLE_BYTES)?;
        let meta = open_meta(&db)?;
        let ceiling = db
            .read_tx()
            .get(&meta, COMMIT_VERSION)
            .map_err(engine_error)?
            .map_or(0, |v| decode_u64(&v));
        let versions = Versions::after(ceiling);
        let events = EventCache::new(caches.events);
        let store = Arc::new(Store {
            db,
            data,
            meta,
            rows: RowCache::default(),
            note: Note::new(path, &events),
            events,
            memtables_freed: AtomicU64::new(0),
        });
        let warm_up = WarmUp::new(&store.note, &store.events);
        let (queue, requests) = mpsc::channel(QUEUE_CAPACITY);
        let writer = store.clone();
        let halted = Arc::new(OnceLock::new());
        let work = Arc::new(WriterWork::default());
        let (writer_halted, writer_work) = (halted.clone(), work.clone());
        std::thread::Builder::new()
            .name("courier-store-writer".into())
            .spawn(move || {
                let inbox = Inbox { requests, warm_up };
                write_loop(&writer, &writer_halted, &writer_work, inbox, versions);
            })
            .map_err(engine_error)?;
        let upkept = Arc::downgrade(&store);
        std::thread::Builder::new()
            .name("courier-store-upkeep".into())
            .spawn(move || upkeep_loop(&upkept))
            .map_err(engine_error)?;
        Ok(Self {
            db: store,
            queue,
            halted,
            work,
        })
    }
}

impl EmbeddedEngine {
    /// The store as of now, for a copy of it (`crate::backup`).
    pub fn snapshot(&self) -> Result<StoreSnapshot, StoreError> {
        StoreSnapshot::new(self.db.db.read_tx(), self.db.data.clone(), &self.db.meta)
    }

    /// Whether `key` is in the keyspace of the idempotency records.
    #[cfg(test)]
    pub(crate) fn db_holds_apart(&self, key: &[u8]) -> bool {
        self.db
            .data
            .idempotency
            .inner()
            .get(key)
            .is_ok_and(|v| v.is_some())
    }
}

#[async_trait]
impl KvEngine for EmbeddedEngine {
    // Reads run on the caller's thread: they are served from the row cache, memory and the
    // block cache and take microseconds; they never wait for the writer.
    async fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        let mut values = self.db.read_values(&[key])?;
        Ok(values.pop().flatten())
    }

    async fn get_many(&self, keys: Vec<Vec<u8>>) -> Result<Vec<Option<Vec<u8>>>, StoreError> {
        self.db.read_values(&keys)
    }

    async fn range(
        &self,
        range: Range<Vec<u8>>,
        limit: usize,
        reverse: bool,
    ) -> Result<Vec<KeyValue>, StoreError> {
        if !reverse && let Some(events) = self.db.events.read(&range, limit) {
            return Ok(events);
        }
        let snapshot = self.db.db.read_tx();
        read_range(&snapshot, &self.db.data, range, limit, reverse)
    }

    /// One snapshot for every range, read in turn.
    async fn ranges(
        &self,
        ranges: Vec<Range<Vec<u8>>>,
        limit: usize,
    ) -> Result<Vec<Vec<KeyValue>>, StoreError> {
        let snapshot = self.db.db.read_tx();
        ranges
            .into_iter()
            .map(|range| read_range(&snapshot, &self.db.data, range, limit, false))
            .collect()
    }

    async fn commit(&self, batch: Batch) -> Result<CommitStamp, StoreError> {
        batch.check(&LIMITS)?;
        let (reply, outcome) = oneshot::channel();
        self.queue
            .send(CommitRequest { batch, reply })
            .await
            .map_err(|_| StoreError::Engine("the store writer has stopped".into()))?;
        outcome
            .await
            .map_err(|_| StoreError::Engine("the store writer has stopped".into()))?
    }

    /// Drops the idempotency keyspace's tables wholly inside `range`
    /// (`Keyspaces::drop_idempotency_tables`), on a thread that may block: fjall lets a
    /// running compaction of the keyspace end first.
    async fn drop_expired(&self, range: Range<Vec<u8>>) -> Result<(), StoreError> {
        let db = Arc::clone(&self.db);
        tokio::task::spawn_blocking(move || db.data.drop_idempotency_tables(range))
            .await
            .map_err(engine_error)?
    }

    fn limits(&self) -> BatchLimits {
        LIMITS
    }

    fn halted(&self) -> Option<String> {
        self.halted.get().cloned()
    }

    fn writer_totals(&self) -> Option<WriterTotals> {
        Some(self.work.totals())
    }

    fn event_cache_totals(&self) -> Option<EventCacheTotals> {
        Some(self.db.events.totals())
    }

    /// Notes which conversations the recent events' cache holds (`crate::warm_up`).
    fn closing(&self) {
        self.db.note.write(&self.db.events, false);
    }
}

impl Store {
    /// The values of `keys`: what the row cache holds, the rest from one snapshot (read in
    /// turn: no future, no snapshot of its own per key), which then fills the cache.
    fn read_values(&self, keys: &[impl AsRef<[u8]>]) -> Result<Vec<Option<Vec<u8>>>, StoreError> {
        let holds = |key: &[u8]| !self.data.is_apart(key);
        let (generation, held) = self.rows.look_up(keys, holds);
        if held.iter().all(Option::is_some) {
            return Ok(held.into_iter().flatten().collect());
        }
        let snapshot = self.db.read_tx();
        // A commit that began since the look-up may have written keys held then: the held
        // values and the snapshot would then be of two states, so all are read from it.
        let held = if self.rows.generation() == generation {
            held
        } else {
            vec![None; keys.len()]
        };
        let missed: Vec<bool> = held.iter().map(Option::is_none).collect();
        let values = keys
            .iter()
            .zip(held)
            .map(|(key, held)| match held {
                Some(value) => Ok(value),
                None => read_value(&snapshot, self.data.of(key.as_ref()), key.as_ref()),
            })
            .collect::<Result<Vec<_>, _>>()?;
        let read = keys.iter().zip(&values).zip(missed);
        self.rows.fill(
            generation,
            read.filter(|((key, _), missed)| *missed && holds(key.as_ref()))
                .map(|((key, value), _)| (key.as_ref(), value.as_deref())),
        );
        Ok(values)
    }
}

/// The value of `key` in `snapshot`.
fn read_value(
    snapshot: &impl Readable,
    data: &SingleWriterTxKeyspace,
    key: &[u8],
) -> Result<Option<Vec<u8>>, StoreError> {
    let value = snapshot.get(data, key).map_err(engine_error)?;
    Ok(value.map(|v| v.to_vec()))
}

/// Up to `limit` pairs of `range` in `snapshot`, in key order (descending when `reverse`),
/// read piece by piece from the keyspaces that hold them (`crate::keyspaces`).
fn read_range(
    snapshot: &impl Readable,
    data: &Keyspaces,
    range: Range<Vec<u8>>,
    limit: usize,
    reverse: bool,
) -> Result<Vec<KeyValue>, StoreError> {
    if range.start >= range.end || limit == 0 {
        return Ok(Vec::new());
    }
    let mut pieces = data.pieces(range.start.as_slice()..range.end.as_slice());
    if reverse {
        pieces.reverse();
    }
    let pair = |guard: fjall::Guard| {
        guard
            .into_inner()
            .map(|(k, v)| (k.to_vec(), v.to_vec()))
            .map_err(engine_error)
    };
    let mut pairs = Vec::new();
    for (keyspace, piece) in pieces {
        let (iter, left) = (snapshot.range(keyspace, piece), limit - pairs.len());
        let read: Result<Vec<_>, _> = if reverse {
            iter.rev().take(left).map(pair).collect()
        } else {
            iter.take(left).map(pair).collect()
        };
        pairs.extend(read?);
        if pairs.len() == limit {
            break;
        }
    }
    Ok(pairs)
}

/// What one commit may hold: FoundationDB's key and value limits, so that both engines accept
/// the same batches.
pub const LIMITS: BatchLimits = BatchLimits {
    max_key_bytes: MAX_KEY_BYTES,
    max_value_bytes: MAX_VALUE_BYTES,
    max_batch_bytes: GROUP_MAX_BYTES,
};

/// What the writer takes its work from: the commits queued, and, while none is, the recent
/// events' cache's warm-up (`crate::warm_up`).
struct Inbox {
    requests: mpsc::Receiver<CommitRequest>,
    warm_up: WarmUp,
}

impl Inbox {
    /// The next commit: one queued, else the first to come, the warm-up's work done while
    /// none comes. `None` once the engine is dropped and the queue is empty.
    fn next(&mut self, store: &Store) -> Option<CommitRequest> {
        loop {
            match self.requests.try_recv() {
                Ok(request) => return Some(request),
                Err(mpsc::error::TryRecvError::Disconnected) => return None,
                Err(mpsc::error::TryRecvError::Empty) => {}
            }
            // Forwards (cheaper in fjall) unless there are more than a run holds.
            let read = |range: Range<Vec<u8>>| {
                let snapshot = store.db.read_tx();
                let first =
                    read_range(&snapshot, &store.data, range.clone(), RUN_EVENTS_MAX, false)?;
                if first.len() < RUN_EVENTS_MAX {
                    return Ok(first);
                }
                let mut last = read_range(&snapshot, &store.data, range, RUN_EVENTS_MAX, true)?;
                last.reverse();
                Ok(last)
            };
            if !self.warm_up.step(&store.events, read) {
                return self.requests.blocking_recv();
            }
        }
    }
}

/// The writer: takes what is queued, commits it as one batch, answers each batch.
/// Once a commit has failed (`halted` set), it answers every batch `Halted` without writing.
fn write_loop(
    store: &Store,
    halted: &OnceLock<String>,
    work: &WriterWork,
    mut inbox: Inbox,
    mut versions: Versions,
) {
    let mut group = Vec::with_capacity(GROUP_MAX_BATCHES);
    let mut known = Known::default();
    while let Some(first) = inbox.next(store) {
        let started = std::time::Instant::now();
        let mut bytes = first.batch.approximate_size();
        group.push(first);
        while group.len() < GROUP_MAX_BATCHES && bytes < GROUP_MAX_BYTES {
            match inbox.requests.try_recv() {
                Ok(next) => {
                    bytes += next.batch.approximate_size();
                    group.push(next);
                }
                Err(_) => break,
            }
        }
        if let Some(reason) = halted.get() {
            for request in group.drain(..) {
                let _ = request.reply.send(Err(StoreError::Halted(reason.clone())));
            }
            continue;
        }
        let version = versions.next();
        let batches = group.len();
        let committed = commit_group(store, &group, version, &mut known);
        known.settle(committed.is_ok());
        if committed.is_ok() {
            versions.committed(version);
        }
        // Before the answers: a caller that has its answer sees the group counted.
        work.record(started.elapsed(), batches);
        match committed {
            Ok(outcomes) => {
                let mut applied = Vec::with_capacity(batches);
                for (request, outcome) in group.drain(..).zip(outcomes) {
                    if outcome.is_ok() {
                        applied.push(request.batch.mutations);
                    }
                    let _ = request.reply.send(outcome);
                }
                // After the answers: a caller reads the events it wrote from fjall until then.
                store.events.hold(applied.into_iter().flatten());
                if version.reserve.is_some() {
                    flush_ceiling(store);
                }
            }
            Err(GroupError::Commit(e)) => {
                tracing::error!(
                    error = %e,
                    "the store could not write its journal (disk full or I/O error) and accepts \
                     no more writes; restart the process once the cause is fixed"
                );
                let reason = halted.get_or_init(|| e.to_string());
                for request in group.drain(..) {
                    let _ = request.reply.send(Err(StoreError::Halted(reason.clone())));
                }
            }
            Err(GroupError::Prepare(e)) => {
                tracing::error!(error = %e, "group commit failed");
                for request in group.drain(..) {
                    let _ = request.reply.send(Err(engine_error(&e)));
                }
            }
        }
    }
    store.note.write(&store.events, false);
}

/// Has fjall flush the keyspace of the commit versions' ceiling, which a group just wrote, so
/// that it keeps no journal (module documentation). The flush runs on fjall's workers; should it
/// not start, the journals are kept until fjall's limit on them forces it, as before.
fn flush_ceiling(store: &Store) {
    if let Err(e) = store.meta.inner().rotate_memtable() {
        tracing::warn!(error = %e, "could not flush the store's commit version ceiling");
    }
}

/// The writer's commit versions (module documentation): the last one a committed group took,
/// and the ceiling the store holds.
struct Versions {
    last: u64,
    ceiling: u64,
}

/// A group's commit version, and the ceiling it stores when it passes the stored one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct GroupVersion {
    version: u64,
    reserve: Option<u64>,
}

impl Versions {
    /// Those of a store that holds `ceiling`: every version up to it may have been taken.
    fn after(ceiling: u64) -> Self {
        Self {
            last: ceiling,
            ceiling,
        }
    }

    /// The next group's version; a group that fails leaves it to the next one.
    fn next(&self) -> GroupVersion {
        let version = self.last + 1;
        GroupVersion {
            version,
            reserve: (version > self.ceiling).then(|| version + VERSIONS_RESERVED - 1),
        }
    }

    /// The group that took `version` committed.
    fn committed(&mut self, version: GroupVersion) {
        self.last = version.version;
        if let Some(ceiling) = version.reserve {
            self.ceiling = ceiling;
        }
    }
}

/// How often the store's upkeep ([`upkeep_loop`]) runs: far shorter than a memtable's life
/// (seconds, even at peak load). A memtable that lives less is freed by fjall as before.
const UPKEEP_PERIOD: Duration = Duration::from_millis(50);

/// The store's upkeep, on a thread of its own until the store is dropped, every
/// [`UPKEEP_PERIOD`]:
/// - It keeps a reference to each memtable of the data's keyspaces and frees a memtable on
///   this thread once no one else holds it, so that fjall's version GC, which runs under the
///   lock every write takes, drops a reference instead of freeing the memtable (module
///   documentation). It reads the active memtable through lsm-tree's
///   `get_version_history_lock` and `active_memtable`, which are public but hidden from its
///   documentation: a fjall upgrade that changes them fails to build here, or fails
///   `a_flushed_memtable_is_freed_by_the_store_not_under_fjalls_lock`.
/// - It writes the recent events' note when it is due (`crate::warm_up`), off the writer's
///   path.
fn upkeep_loop(store: &Weak<Store>) {
    let mut held = Vec::new();
    loop {
        std::thread::sleep(UPKEEP_PERIOD);
        let Some(store) = store.upgrade() else {
            return;
        };
        let before = held.len();
        held.retain(|memtable| Arc::strong_count(memtable) > 1);
        let freed = (before - held.len()) as u64;
        store.memtables_freed.fetch_add(freed, Ordering::Relaxed);
        for keyspace in store.data.all() {
            let active = keyspace
                .inner()
                .tree
                .get_version_history_lock()
                .latest_version()
                .active_memtable;
            if !held.iter().any(|memtable| Arc::ptr_eq(memtable, &active)) {
                held.push(active);
            }
        }
        store.note.write(&store.events, true);
    }
}

fn stamp(version: u64, order: usize) -> CommitStamp {
    let mut s = [0u8; 10];
    s[..8].copy_from_slice(&version.to_be_bytes());
    s[8..].copy_from_slice(&(order as u16).to_be_bytes());
    s
}

/// Why a group commit failed.
#[derive(Debug, thiserror::Error)]
enum GroupError {
    /// Reading the store for the group failed: nothing was written, the engine goes on.
    #[error(transparent)]
    Prepare(#[from] StoreError),
    /// Writing or syncing the journal failed: fjall has poisoned the database, and whether
    /// the group reached the disk is unknown.
    #[error(transparent)]
    Commit(fjall::Error),
}

/// One commit for a group: per batch, check fences then apply; one durable commit, with the
/// row cache kept in step around it (module documentation). A group that raises the ceiling of
/// commit versions is synced. Returns each batch's outcome; `Err` when the commit itself failed.
fn commit_group(
    store: &Store,
    group: &[CommitRequest],
    version: GroupVersion,
    known: &mut Known,
) -> Result<Vec<Result<CommitStamp, StoreError>>, GroupError> {
    let persist = match version.reserve {
        Some(_) => COMMIT_PERSIST,
        None => persist_mode(group.iter().map(|request| request.batch.durability)),
    };
    let mut writes = GroupWrites::begin(&store.db);
    let mut outcomes = Vec::with_capacity(group.len());
    let mut found = Found::default();
    for (order, request) in group.iter().enumerate() {
        let stamp = stamp(version.version, order);
        outcomes.push(
            match fence_violation(&writes, &store.data, &request.batch, known)? {
                Some(key) => Err(StoreError::FenceChanged { key }),
                None => {
                    apply(
                        &mut writes,
                        &store.data,
                        &request.batch,
                        &stamp,
                        known,
                        &mut found,
                    )?;
                    Ok(stamp)
                }
            },
        );
    }
    if let Some(ceiling) = version.reserve {
        writes.insert(&store.meta, COMMIT_VERSION, ceiling.to_le_bytes().to_vec());
    }
    let applied = || {
        group
            .iter()
            .zip(&outcomes)
            .filter(|(_, outcome)| outcome.is_ok())
            .flat_map(|(request, _)| &request.batch.mutations)
    };
    // The group's events are held once it has committed, in `write_loop`.
    store.events.forget(applied());
    let mut writing = store.rows.begin_write();
    drop_written_rows(&mut writing, applied(), &found, known);
    let held = writing.finish();
    match writes.commit(persist) {
        Ok(()) => {
            store.rows.end_write(held);
            Ok(outcomes)
        }
        Err(e) => {
            store.rows.end_write([]);
            Err(GroupError::Commit(e))
        }
    }
}

/// Keys a group's writes found as the writer applied them, in order: those of each range
/// clear (how many, per range), and each new versionstamped key.
#[derive(Default)]
struct Found {
    keys: Vec<fjall::UserKey>,
    per_range: Vec<usize>,
}

/// Names every key the group writes to the row cache, last write first, with what that write
/// left it. `mutations` are the group's applied ones, in order; `known` holds the group's
/// last value of each counter.
fn drop_written_rows<'a>(
    writing: &mut Writing<'_>,
    mutations: impl DoubleEndedIterator<Item = &'a Mutation>,
    found: &Found,
    known: &Known,
) {
    let mut keys = found.keys.iter().rev();
    let mut per_range = found.per_range.iter().rev();
    for m in mutations.rev() {
        match m {
            Mutation::Set { key, value } => writing.wrote(key, Written::Value(value)),
            Mutation::Clear { key } => writing.wrote(key, Written::Removed),
            Mutation::Max { key, .. } | Mutation::Add { key, .. } => {
                let value = known.in_group(key);
                writing.wrote(key, value.map_or(Written::Unknown, Written::Counter));
            }
            Mutation::ClearRange { .. } => {
                let cleared = per_range.next().copied().unwrap_or(0);
                for key in keys.by_ref().take(cleared) {
                    writing.wrote(key, Written::Removed);
                }
            }
            Mutation::SetVersionstampedKey { .. } => {
                if let Some(key) = keys.next() {
                    writing.wrote(key, Written::Unknown);
                }
            }
        }
    }
}

/// How far a group is persisted: synced if any of its batches must be, else handed to the
/// operating system only (a deferred batch survives a crash of the process).
fn persist_mode(durabilities: impl IntoIterator<Item = Durability>) -> PersistMode {
    if durabilities.into_iter().any(|d| d == Durability::Synced) {
        COMMIT_PERSIST
    } else {
        PersistMode::Buffer
    }
}

/// The first fence of `batch` whose key no longer holds the expected value, if any.
fn fence_violation(
    writes: &GroupWrites<'_>,
    data: &Keyspaces,
    batch: &Batch,
    known: &mut Known,
) -> Result<Option<Vec<u8>>, StoreError> {
    for fence in &batch.fences {
        if !known.holds(
            writes,
            data.of(&fence.key),
            &fence.key,
            fence.expected.as_deref(),
        )? {
            return Ok(Some(fence.key.clone()));
        }
    }
    Ok(None)
}

fn apply<'a>(
    writes: &mut GroupWrites<'a>,
    data: &'a Keyspaces,
    batch: &Batch,
    stamp: &CommitStamp,
    known: &mut Known,
    found: &mut Found,
) -> Result<(), StoreError> {
    for m in &batch.mutations {
        match m {
            Mutation::Set { key, value } => {
                known.forget(key);
                writes.insert(data.of(key), key.as_slice(), value.as_slice());
            }
            Mutation::Clear { key } => {
                known.forget(key);
                writes.remove(data.of(key), key.as_slice());
            }
            Mutation::ClearRange { begin, end } => {
                let mut cleared = 0;
                for (keyspace, piece) in data.pieces(begin.as_slice()..end.as_slice()) {
                    for key in writes.keys_in(keyspace, piece)? {
                        known.forget(&key);
                        writes.remove(keyspace, key.clone());
                        found.keys.push(key);
                        cleared += 1;
                    }
                }
                found.per_range.push(cleared);
            }
            Mutation::Max { key, value } => {
                let keyspace = data.of(key);
                let current = known.counter(writes, keyspace, key)?;
                if current.is_none_or(|c| c < *value) {
                    writes.insert(keyspace, key.as_slice(), value.to_le_bytes().as_slice());
                    known.wrote(key, *value);
                } else if let Some(current) = current {
                    known.wrote(key, current);
                }
            }
            Mutation::Add { key, delta } => {
                let keyspace = data.of(key);
                let current = known.counter(writes, keyspace, key)?.unwrap_or(0);
                let sum = current.wrapping_add(*delta as u64);
                writes.insert(keyspace, key.as_slice(), sum.to_le_bytes().as_slice());
                known.wrote(key, sum);
            }
            Mutation::SetVersionstampedKey { key, value } => {
                let key = fjall::UserKey::from(complete_versionstamped_key(key, stamp)?);
                known.forget(&key);
                writes.insert(data.of(&key), key.clone(), value.as_slice());
                found.keys.push(key);
            }
        }
    }
    Ok(())
}

/// Keys of one group's changes [`Known`] keeps room for between groups.
const GROUP_KEYS_KEPT: usize = 64;

/// The values of counter keys (those of `Max` and `Add` mutations) and of fenced keys as the
/// writer last wrote or read them (module documentation). Those of the group being prepared
/// are kept apart until it commits, and dropped if it does not.
#[derive(Default)]
struct Known {
    committed: HashMap<Vec<u8>, Value>,
    /// The group's changes: a value written or read by it, or `None` for a key it wrote
    /// otherwise (read from the group's writes, `GroupWrites`).
    group: HashMap<Vec<u8>, Option<Value>>,
}

/// A key's value as the writer knows it.
#[derive(Clone)]
enum Value {
    /// Written or read by a counter mutation.
    Counter(u64),
    /// Read by a fence: the stored bytes, or `None` for an absent key.
    Fenced(Option<Vec<u8>>),
}

impl Known {
    fn get(&self, key: &[u8]) -> Option<&Value> {
        match self.group.get(key) {
            Some(changed) => changed.as_ref(),
            None => self.committed.get(key),
        }
    }

    /// The value of counter `key`, as last written, or else read from `writes`.
    fn counter(
        &self,
        writes: &GroupWrites<'_>,
        data: &SingleWriterTxKeyspace,
        key: &[u8],
    ) -> Result<Option<u64>, StoreError> {
        match self.get(key) {
            Some(Value::Counter(value)) => Ok(Some(*value)),
            Some(Value::Fenced(stored)) => Ok(stored.as_deref().map(decode_u64)),
            None => Ok(writes.get(data, key)?.map(|v| decode_u64(&v))),
        }
    }

    /// Whether `key` holds `expected` (`None`: absent), from what the writer knows, or else
    /// read from `writes` and kept.
    fn holds(
        &mut self,
        writes: &GroupWrites<'_>,
        data: &SingleWriterTxKeyspace,
        key: &[u8],
        expected: Option<&[u8]>,
    ) -> Result<bool, StoreError> {
        match self.get(key) {
            Some(Value::Counter(value)) => Ok(expected == Some(value.to_le_bytes().as_slice())),
            Some(Value::Fenced(stored)) => Ok(stored.as_deref() == expected),
            None => {
                let stored = writes.get(data, key)?;
                let holds = stored.as_deref() == expected;
                let value = Value::Fenced(stored.map(|v| v.to_vec()));
                self.group.insert(key.to_vec(), Some(value));
                Ok(holds)
            }
        }
    }

    /// The value the group being prepared left to counter `key` (`None`: not written as a
    /// counter by it, or written otherwise since).
    fn in_group(&self, key: &[u8]) -> Option<u64> {
        match self.group.get(key) {
            Some(Some(Value::Counter(value))) => Some(*value),
            _ => None,
        }
    }

    fn wrote(&mut self, key: &[u8], value: u64) {
        match self.group.get_mut(key) {
            Some(slot) => *slot = Some(Value::Counter(value)),
            None => {
                self.group.insert(key.to_vec(), Some(Value::Counter(value)));
            }
        }
    }

    /// `key` was written otherwise than as a counter, or removed.
    fn forget(&mut self, key: &[u8]) {
        if let Some(slot) = self.group.get_mut(key) {
            *slot = None;
        } else if self.committed.contains_key(key) {
            self.group.insert(key.to_vec(), None);
        }
    }

    /// Keeps the group's changes if it committed, else drops them.
    fn settle(&mut self, committed: bool) {
        if committed {
            if self.committed.len() + self.group.len() > KNOWN_MAX {
                self.committed.clear();
            }
            for (key, value) in self.group.drain() {
                match value {
                    Some(value) => self.committed.insert(key, value),
                    None => self.committed.remove(&key),
                };
            }
        } else {
            self.group.clear();
        }
        // Emptying a map resets a byte per slot: a group of many keys (a node taking the
        // leases of every shard) would otherwise leave each later group to reset thousands.
        self.group.shrink_to(GROUP_KEYS_KEPT);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::contract::{self, EngineHarness};
    use crate::keys::Keys;
    use crate::keyspaces::{SEPARATED_VALUE_BYTES, TABLE_TARGET_BYTES};
    use crate::message_store::MessageStore;

    struct Harness {
        dir: tempfile::TempDir,
    }

    #[async_trait]
    impl EngineHarness for Harness {
        async fn open(&mut self) -> Arc<dyn KvEngine> {
            Arc::new(EmbeddedEngine::open(&self.dir.path().join("store")).unwrap())
        }
        async fn reopen_after_crash(&mut self, engine: Arc<dyn KvEngine>) -> Arc<dyn KvEngine> {
            // A dropped handle: fjall syncs its journal on drop, so this checks the contract
            // across a reopen, not a crash (`tests/embedded_crash.rs` kills a process).
            drop(engine);
            Arc::new(reopen(&self.dir.path().join("store"), Caches::default()))
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn embedded_engine_passes_the_contract() {
        let mut harness = Harness {
            dir: tempfile::tempdir().unwrap(),
        };
        contract::run_all(&mut harness).await;
    }

    /// `tests/embedded_crash.rs` kills a process after its commits: that catches a commit
    /// answered before its journal write left the process, but not one answered before the
    /// fsync (the operating system still holds the write). This pins the fsync.
    #[test]
    fn commits_wait_for_fsync() {
        assert!(
            matches!(COMMIT_PERSIST, PersistMode::SyncAll | PersistMode::SyncData),
            "commits must be answered only after an fsync, not {COMMIT_PERSIST:?}"
        );
    }

    #[test]
    fn a_group_is_synced_when_any_of_its_batches_must_be() {
        use Durability::{Deferred, Synced};
        assert_eq!(persist_mode([Synced]), COMMIT_PERSIST);
        assert_eq!(persist_mode([Deferred, Synced, Deferred]), COMMIT_PERSIST);
        assert_eq!(persist_mode([Deferred, Deferred]), PersistMode::Buffer);
    }

    /// Writes `memtables` times a little more than [`MEMTABLE_BYTES`], in 1 MB batches.
    async fn fill_memtables(kv: &EmbeddedEngine, memtables: usize) -> usize {
        let value = vec![7; MAX_VALUE_BYTES];
        let batches = memtables * (MEMTABLE_BYTES as usize / (10 * MAX_VALUE_BYTES) + 2);
        for i in 0..batches {
            let mut batch = Batch::new();
            for j in 0..10 {
                batch.set(format!("k{i:05}-{j}").into_bytes(), value.clone());
            }
            batch.deferred();
            kv.commit(batch).await.unwrap();
        }
        batches
    }

    /// An idempotency record of bucket `bucket` for a send to `conv`.
    fn idempotency_key(bucket: u64, conv: &str) -> Vec<u8> {
        Keys::new(&[])
            .idempotency(&[bucket], conv, "u", "d", "m")
            .remove(0)
    }

    /// The same record as the versions before the conversation's hash keyed it.
    fn named_idempotency_key(bucket: u64, conv: &str) -> Vec<u8> {
        Keys::new(&[])
            .named_idempotency(&[bucket], conv, "u", "d", "m")
            .remove(0)
    }

    fn held_by(keyspace: &SingleWriterTxKeyspace, key: &[u8]) -> bool {
        keyspace.inner().get(key).unwrap().is_some()
    }

    /// A new store keeps every idempotency record in a keyspace of its own, and finds them
    /// there by key and by range (`crate::keyspaces`).
    #[tokio::test]
    async fn idempotency_records_are_kept_apart_from_the_other_keys() {
        let dir = tempfile::tempdir().unwrap();
        let kv = EmbeddedEngine::open(&dir.path().join("s")).unwrap();
        let record = idempotency_key(7, "d:a");
        let server_made = Keys::new(&[])
            .server_idempotency(&[7], "d:a", "k")
            .remove(0);
        let head = Keys::new(&[]).head("d:a");
        let mut batch = Batch::new();
        batch
            .set(record.clone(), b"r".to_vec())
            .set(server_made.clone(), b"s".to_vec())
            .set(head.clone(), b"h".to_vec());
        kv.commit(batch).await.unwrap();

        let spaces = &kv.db.data;
        assert!(held_by(&spaces.idempotency, &record));
        assert!(held_by(&spaces.idempotency, &server_made));
        assert!(!held_by(&spaces.shared, &record));
        assert!(held_by(&spaces.shared, &head));
        assert!(!held_by(&spaces.idempotency, &head));
        assert_eq!(kv.get(&record).await.unwrap(), Some(b"r".to_vec()));
        // One range across the whole database reads both keyspaces, in key order.
        let all = kv
            .range(vec![0]..vec![0xff], usize::MAX, false)
            .await
            .unwrap();
        let mut keys: Vec<Vec<u8>> = [record, server_made, head].into();
        keys.sort();
        assert_eq!(all.into_iter().map(|(k, _)| k).collect::<Vec<_>>(), keys);
    }

    /// The writer counts its group commits, the batches they held and the time they took.
    #[tokio::test]
    async fn the_writer_counts_its_work() {
        let dir = tempfile::tempdir().unwrap();
        let kv = EmbeddedEngine::open(&dir.path().join("s")).unwrap();
        assert_eq!(kv.writer_totals(), Some(WriterTotals::default()));
        let batch = |i: u8| {
            let mut batch = Batch::new();
            batch.set(vec![i], vec![i]);
            batch
        };
        kv.commit(batch(0)).await.unwrap();
        let alone = kv.writer_totals().unwrap();
        assert_eq!((alone.groups, alone.batches), (1, 1));
        assert!(alone.busy > Duration::ZERO);

        futures::future::try_join_all((1..=20).map(|i| kv.commit(batch(i))))
            .await
            .unwrap();
        let after = kv.writer_totals().unwrap();
        assert_eq!(after.batches, 21);
        assert!((2..=21).contains(&after.groups), "{after:?}");
        assert!(after.busy >= alone.busy);
    }

    #[test]
    fn the_block_cache_has_the_size_asked_for() {
        let dir = tempfile::tempdir().unwrap();
        let default = EmbeddedEngine::open(&dir.path().join("a")).unwrap();
        assert_eq!(default.db.db.inner().cache_capacity(), DEFAULT_CACHE_BYTES);
        let caches = Caches {
            blocks: 256 << 20,
            ..Caches::default()
        };
        let large = EmbeddedEngine::open_with_caches(&dir.path().join("b"), caches).unwrap();
        assert_eq!(large.db.db.inner().cache_capacity(), 256 << 20);
    }

    /// Idempotency records are read about once each (an append's look-ups, which miss): the
    /// row cache never holds them, so they do not crowd out the rows read again and again.
    #[tokio::test]
    async fn idempotency_records_are_not_held_in_the_row_cache() {
        let dir = tempfile::tempdir().unwrap();
        let kv = EmbeddedEngine::open(&dir.path().join("s")).unwrap();
        let (written, missing) = (idempotency_key(7, "d:a"), idempotency_key(7, "d:b"));
        let head = Keys::new(&[]).head("d:a");
        let mut batch = Batch::new();
        batch
            .set(written.clone(), b"r".to_vec())
            .set(head.clone(), b"h".to_vec());
        kv.commit(batch).await.unwrap();

        let keys = vec![written.clone(), missing.clone(), head.clone()];
        let read = kv.get_many(keys.clone()).await.unwrap();
        assert_eq!(read, [Some(b"r".to_vec()), None, Some(b"h".to_vec())]);
        assert_eq!(kv.db.rows.len(), 1, "only the head is held");
        // Read again, the records come from the store, the head from the cache: same values.
        assert_eq!(kv.get_many(keys).await.unwrap(), read);
        assert_eq!(kv.db.rows.len(), 1);
    }

    /// A store written before idempotency records were kept apart still finds those it holds
    /// with the other keys; records sorting after them go apart; ranges and range clears see
    /// both keyspaces as one, in key order, forwards and backwards, and a reopened store splits
    /// them the same way.
    #[tokio::test]
    async fn idempotency_records_of_an_earlier_version_stay_where_they_are() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        let (old_a, old_m) = (
            named_idempotency_key(10, "d:a"),
            named_idempotency_key(10, "d:m"),
        );
        {
            let db = SingleWriterTxDatabase::builder(&path).open().unwrap();
            let data = db.keyspace("data", KeyspaceCreateOptions::default).unwrap();
            data.insert(old_a.as_slice(), b"a".as_slice()).unwrap();
            data.insert(old_m.as_slice(), b"m".as_slice()).unwrap();
            db.persist(PersistMode::SyncAll).unwrap();
        }
        let (below, above) = (
            named_idempotency_key(10, "d:c"),
            named_idempotency_key(11, "d:b"),
        );
        let subspace = Keys::new(&[]).idempotency_subspaces()[1].clone();
        for reopened in [false, true] {
            let kv = reopen(&path, Caches::default());
            if !reopened {
                let mut batch = Batch::new();
                batch
                    .set(below.clone(), b"c".to_vec())
                    .set(above.clone(), b"b".to_vec());
                kv.commit(batch).await.unwrap();
            }
            let spaces = &kv.db.data;
            for key in [&old_a, &old_m, &below] {
                assert!(held_by(&spaces.shared, key), "reopened: {reopened}");
            }
            assert!(held_by(&spaces.idempotency, &above), "reopened: {reopened}");
            let in_order = [&old_a, &below, &old_m, &above].map(|k| k.clone());
            let forwards = kv.range(subspace.clone(), 10, false).await.unwrap();
            let keys = |pairs: Vec<KeyValue>| pairs.into_iter().map(|(k, _)| k).collect::<Vec<_>>();
            assert_eq!(keys(forwards), in_order.to_vec());
            let last_two = kv.range(subspace.clone(), 2, true).await.unwrap();
            assert_eq!(keys(last_two), vec![above.clone(), old_m.clone()]);
            let first_three = kv.range(subspace.clone(), 3, false).await.unwrap();
            assert_eq!(keys(first_three), in_order[..3].to_vec());
        }
        let kv = reopen(&path, Caches::default());
        let mut batch = Batch::new();
        batch.clear_range(subspace.clone());
        kv.commit(batch).await.unwrap();
        assert!(kv.range(subspace, 10, false).await.unwrap().is_empty());
        for key in [&old_a, &old_m, &below, &above] {
            assert_eq!(kv.get(key).await.unwrap(), None);
        }
    }

    /// A little more than [`MEMTABLE_BYTES`] written is flushed to a table.
    #[tokio::test]
    async fn the_data_memtable_is_flushed_once_it_holds_memtable_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let kv = EmbeddedEngine::open(&dir.path().join("s")).unwrap();
        let batches = fill_memtables(&kv, 1).await;
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while kv.db.data.shared.inner().table_count() == 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "{batches} MB written, no memtable flushed"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// A new store keeps the values of its shared keyspace from [`SEPARATED_VALUE_BYTES`] on in
    /// blob files, the smaller ones with their keys, and reads both back after a flush, by key
    /// and by range, after a clear and a major compaction, and after a reopen
    /// (`crate::keyspaces`).
    #[tokio::test]
    async fn a_new_store_keeps_its_larger_values_apart_from_their_keys() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        let event = vec![1; SEPARATED_VALUE_BYTES as usize];
        let head = vec![2; 8];
        let written = [
            (b"ev-1".to_vec(), event.clone()),
            (b"ev-2".to_vec(), event.clone()),
            (b"head".to_vec(), head.clone()),
        ];
        {
            let kv = reopen(&path, Caches::default());
            let shared = kv.db.data.shared.inner();
            assert!(shared.is_kv_separated());
            let mut batch = Batch::new();
            for (key, value) in &written {
                batch.set(key.clone(), value.clone());
            }
            kv.commit(batch).await.unwrap();
            shared.rotate_memtable_and_wait().unwrap();
            assert_eq!((shared.table_count(), shared.blob_file_count()), (1, 1));
            let everything = kv.range(b"a".to_vec()..b"z".to_vec(), 10, false);
            assert_eq!(everything.await.unwrap(), written.to_vec());
            let mut batch = Batch::new();
            batch.clear(b"ev-1".to_vec());
            kv.commit(batch).await.unwrap();
            shared.rotate_memtable_and_wait().unwrap();
            shared.major_compact().unwrap();
            assert_eq!(kv.get(b"ev-1").await.unwrap(), None);
            assert_eq!(kv.get(b"ev-2").await.unwrap(), Some(event.clone()));
        }
        let kv = reopen(&path, Caches::default());
        let everything = kv.range(b"a".to_vec()..b"z".to_vec(), 10, false);
        assert_eq!(everything.await.unwrap(), written[1..].to_vec());
    }

    /// The size of the tables a keyspace compacts into, as fjall recorded it when it created
    /// the keyspace.
    fn table_target_bytes(keyspace: &SingleWriterTxKeyspace) -> u64 {
        let config = keyspace.inner().config.compaction_strategy.get_config();
        let (_, size) = config
            .iter()
            .find(|(name, _)| name.as_ref() == b"leveled_target_size")
            .expect("a leveled compaction");
        u64::from_le_bytes(size.as_ref().try_into().unwrap())
    }

    /// A new store's shared keyspace compacts into tables of [`TABLE_TARGET_BYTES`], and keeps
    /// that size when it is opened again (`crate::keyspaces`).
    #[tokio::test]
    async fn a_new_store_compacts_its_events_into_smaller_tables() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        {
            let kv = reopen(&path, Caches::default());
            assert_eq!(table_target_bytes(&kv.db.data.shared), TABLE_TARGET_BYTES);
        }
        let kv = reopen(&path, Caches::default());
        assert_eq!(table_target_bytes(&kv.db.data.shared), TABLE_TARGET_BYTES);
        assert_eq!(table_target_bytes(&kv.db.data.idempotency), 64 << 20);
    }

    /// The keyspace of the commit versions' ceiling keeps no journal: once the data's keyspaces
    /// have flushed what a sealed journal holds, fjall deletes it, though the ceiling the first
    /// group wrote is in it (module documentation). fjall seals a journal past 64 MB.
    #[tokio::test]
    async fn a_journal_goes_once_the_data_in_it_is_flushed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        let kv = reopen(&path, Caches::default());
        // Random bytes, which the journal's compression (each value on its own) leaves their size.
        let value: Vec<u8> = (0..MAX_VALUE_BYTES).map(|_| rand::random()).collect();
        for batch_number in 0..80 {
            let mut batch = Batch::new();
            for key in 0..10 {
                batch.set(
                    format!("ev-{batch_number}-{key}").into_bytes(),
                    value.clone(),
                );
            }
            kv.commit(batch).await.unwrap();
        }
        for keyspace in kv.db.data.all() {
            keyspace.inner().rotate_memtable_and_wait().unwrap();
        }
        let first_journal = path.join("0.jnl");
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while first_journal.exists() && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(!first_journal.exists(), "the first journal was kept");
        assert_eq!(kv.db.db.journal_count(), 1);
    }

    /// An expired idempotency bucket's tables are dropped whole: their records go without a
    /// read or a tombstone each. A record of the bucket still in the memtable is cleared key by
    /// key, and a bucket that has not expired keeps every record.
    #[tokio::test]
    async fn an_expired_buckets_tables_are_dropped_whole() {
        let dir = tempfile::tempdir().unwrap();
        let kv = Arc::new(EmbeddedEngine::open(&dir.path().join("s")).unwrap());
        let store = MessageStore::open(kv.clone(), b"", 8).await.unwrap();
        let keys = Keys::new(b"");
        let records = |bucket: u64, conversations: Range<usize>| -> Vec<Vec<u8>> {
            conversations
                .flat_map(|i| keys.idempotency(&[bucket], &format!("d:{i}"), "alice", "p", "m"))
                .collect()
        };
        let write = |keys: Vec<Vec<u8>>| {
            let mut batch = Batch::new();
            for key in keys {
                batch.set(key, b"record".to_vec());
            }
            kv.commit(batch)
        };
        let idempotency = kv.db.data.idempotency.inner();
        for bucket in [1_000, 2_000] {
            write(records(bucket, 0..100)).await.unwrap();
            idempotency.rotate_memtable_and_wait().unwrap();
        }
        write(records(1_000, 100..101)).await.unwrap();
        assert_eq!(idempotency.table_count(), 2);

        let cleared = store.expire_idempotency_records(1_000).await.unwrap();
        assert_eq!(
            cleared, 1,
            "only the record in the memtable was cleared key by key"
        );
        assert_eq!(
            idempotency.table_count(),
            1,
            "the expired bucket's table was dropped"
        );
        for key in records(1_000, 0..101) {
            assert_eq!(kv.get(&key).await.unwrap(), None);
        }
        for key in records(2_000, 0..100) {
            assert_eq!(kv.get(&key).await.unwrap(), Some(b"record".to_vec()));
        }
        // fjall deletes a dropped table's file when the keyspace next flushes (or compacts).
        write(records(3_000, 0..1)).await.unwrap();
        idempotency.rotate_memtable_and_wait().unwrap();
        let files = std::fs::read_dir(idempotency.path().join("tables"))
            .unwrap()
            .count();
        assert_eq!((idempotency.table_count(), files), (2, 2));
    }

    /// A store created before values were kept apart keeps them with their keys: fjall
    /// recorded that choice when it created the keyspace, and the store reads and writes as
    /// before.
    #[tokio::test]
    async fn a_store_of_an_earlier_version_keeps_its_values_with_their_keys() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        let event = vec![1; SEPARATED_VALUE_BYTES as usize];
        {
            let db = SingleWriterTxDatabase::builder(&path).open().unwrap();
            let data = db.keyspace("data", KeyspaceCreateOptions::default).unwrap();
            data.insert(b"ev-1".as_slice(), event.as_slice()).unwrap();
            db.persist(PersistMode::SyncAll).unwrap();
        }
        let kv = reopen(&path, Caches::default());
        assert_eq!(table_target_bytes(&kv.db.data.shared), 64 << 20);
        let shared = kv.db.data.shared.inner();
        assert!(!shared.is_kv_separated());
        let mut batch = Batch::new();
        batch.set(b"ev-2".to_vec(), event.clone());
        kv.commit(batch).await.unwrap();
        shared.rotate_memtable_and_wait().unwrap();
        assert_eq!(shared.blob_file_count(), 0);
        for key in [b"ev-1", b"ev-2"] {
            assert_eq!(kv.get(key).await.unwrap(), Some(event.clone()));
        }
    }

    /// A flushed memtable is freed by the store's own thread, which was its last holder, not
    /// by fjall's version GC under the lock every write takes (module documentation).
    #[tokio::test]
    async fn a_flushed_memtable_is_freed_by_the_store_not_under_fjalls_lock() {
        let dir = tempfile::tempdir().unwrap();
        let kv = EmbeddedEngine::open(&dir.path().join("s")).unwrap();
        let mut batches = fill_memtables(&kv, 3).await;
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        let mut refill_at = std::time::Instant::now() + Duration::from_secs(2);
        while kv.db.memtables_freed.load(Ordering::Relaxed) == 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "{batches} MB written, no memtable freed by the store"
            );
            // fjall lets its version GC go past a memtable once enough reads have ended (every
            // 10,000th read moves its watermark), as they do on a serving node.
            for _ in 0..1000 {
                kv.get(b"k00000-0").await.unwrap();
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
            // The release loop holds the memtables it saw active; on a busy machine it can
            // miss every memtable of a fast fill (those fjall frees as before): fill another.
            if std::time::Instant::now() > refill_at {
                batches += fill_memtables(&kv, 1).await;
                refill_at = std::time::Instant::now() + Duration::from_secs(2);
            }
        }
    }

    #[tokio::test]
    async fn a_counter_written_by_a_group_that_failed_is_read_from_the_store_again() {
        let dir = tempfile::tempdir().unwrap();
        let kv = EmbeddedEngine::open(&dir.path().join("s")).unwrap();
        let value = async || decode_u64(&kv.get(b"counter").await.unwrap().unwrap());
        let mut batch = Batch::new();
        batch.max(b"counter".to_vec(), 5);
        kv.commit(batch).await.unwrap();
        // The MAX is applied, then the group fails on a versionstamped key without an offset:
        // nothing of it is written, and the writer forgets the 70 it had seen.
        let mut failing = Batch::new();
        failing
            .max(b"counter".to_vec(), 70)
            .set_versionstamped_key(b"x".to_vec(), b"v".to_vec());
        assert!(kv.commit(failing).await.is_err());
        assert_eq!(value().await, 5);
        let mut batch = Batch::new();
        batch.max(b"counter".to_vec(), 60);
        kv.commit(batch).await.unwrap();
        assert_eq!(value().await, 60);
    }

    /// The writer keeps what each fence read: every kind of write to the key changes what
    /// the next fence on it finds.
    #[tokio::test]
    async fn a_fence_finds_what_each_kind_of_write_left_its_key() {
        type Write = fn(&mut Batch);
        let dir = tempfile::tempdir().unwrap();
        let kv = EmbeddedEngine::open(&dir.path().join("s")).unwrap();
        let holds = async |expected: Option<u64>| {
            let mut batch = Batch::new();
            let expected = expected.map(|v| v.to_le_bytes().to_vec());
            batch
                .fence(b"k".to_vec(), expected)
                .set(b"w".to_vec(), b"x".to_vec());
            kv.commit(batch).await.is_ok()
        };
        let write = async |f: Write| {
            let mut batch = Batch::new();
            f(&mut batch);
            kv.commit(batch).await.unwrap();
        };
        assert!(holds(None).await, "absent at first");
        let steps: [(Write, Option<u64>); 6] = [
            (
                |b| _ = b.set(b"k".to_vec(), 1u64.to_le_bytes().to_vec()),
                Some(1),
            ),
            (|b| _ = b.max(b"k".to_vec(), 9), Some(9)),
            (|b| _ = b.add(b"k".to_vec(), 2), Some(11)),
            (|b| _ = b.clear(b"k".to_vec()), None),
            (
                |b| _ = b.set(b"k".to_vec(), 5u64.to_le_bytes().to_vec()),
                Some(5),
            ),
            (|b| _ = b.clear_range(b"j".to_vec()..b"l".to_vec()), None),
        ];
        let mut before = None;
        for (i, (change, after)) in steps.into_iter().enumerate() {
            assert!(
                holds(before).await,
                "step {i}: the fence read the key before the write"
            );
            write(change).await;
            assert!(
                !holds(before).await,
                "step {i}: the old value no longer holds"
            );
            assert!(holds(after).await, "step {i}: the new value holds");
            before = after;
        }
    }

    /// The batches of one group read what the earlier ones wrote: a range clear takes the keys
    /// an earlier batch set, a counter starts from an earlier batch's value, a fence sees an
    /// earlier batch's write, and a refused batch leaves nothing for the later ones.
    #[tokio::test]
    async fn later_batches_of_a_group_read_what_earlier_ones_wrote() {
        let dir = tempfile::tempdir().unwrap();
        let kv = EmbeddedEngine::open(&dir.path().join("s")).unwrap();
        let mut stored = Batch::new();
        stored
            .set(b"r/2".to_vec(), b"stored".to_vec())
            .max(b"c".to_vec(), 4);
        kv.commit(stored).await.unwrap();

        let batches = {
            let (mut first, mut refused, mut clear, mut after) =
                (Batch::new(), Batch::new(), Batch::new(), Batch::new());
            first
                .set(b"r/1".to_vec(), b"1".to_vec())
                .set(b"r/3".to_vec(), b"3".to_vec())
                .max(b"c".to_vec(), 7);
            refused
                .fence(b"r/1".to_vec(), None)
                .set(b"r/4".to_vec(), b"4".to_vec());
            clear
                .fence(b"r/1".to_vec(), Some(b"1".to_vec()))
                .clear_range(b"r/".to_vec()..b"r0".to_vec())
                .add(b"c".to_vec(), 1);
            after
                .fence(b"r/3".to_vec(), None)
                .set(b"r/5".to_vec(), b"5".to_vec())
                .max(b"c".to_vec(), 2);
            [first, refused, clear, after]
        };
        let group: Vec<CommitRequest> = batches
            .into_iter()
            .map(|batch| CommitRequest {
                batch,
                reply: oneshot::channel().0,
            })
            .collect();
        let mut known = Known::default();
        let version = Versions::after(1_000).next();
        let outcomes = commit_group(&kv.db, &group, version, &mut known).unwrap();
        known.settle(true);
        let refused: Vec<bool> = outcomes.iter().map(Result::is_err).collect();
        assert_eq!(refused, [false, true, false, false]);

        let rows = kv
            .range(b"r/".to_vec()..b"r0".to_vec(), 10, false)
            .await
            .unwrap();
        assert_eq!(rows, [(b"r/5".to_vec(), b"5".to_vec())]);
        let counter = kv.get(b"c").await.unwrap().map(|v| decode_u64(&v));
        assert_eq!(counter, Some(8), "max(4, 7), then + 1, then max(8, 2)");
    }

    #[test]
    fn a_group_past_the_ceiling_reserves_the_versions_after_it() {
        let mut versions = Versions::after(10);
        let first = versions.next();
        let reserved = Some(10 + VERSIONS_RESERVED);
        assert_eq!(
            first,
            GroupVersion {
                version: 11,
                reserve: reserved
            }
        );
        assert_eq!(
            versions.next(),
            first,
            "a failed group leaves its version to the next"
        );
        versions.committed(first);
        let mut taken = vec![];
        while taken.len() < VERSIONS_RESERVED as usize {
            let next = versions.next();
            versions.committed(next);
            taken.push(next);
        }
        let (under, past) = taken.split_at(taken.len() - 1);
        assert!(under.iter().all(|v| v.reserve.is_none()));
        assert_eq!(
            past[0],
            GroupVersion {
                version: 11 + VERSIONS_RESERVED,
                reserve: Some(10 + 2 * VERSIONS_RESERVED)
            }
        );
    }

    /// The store holds a ceiling above every stamp, written by the first group only, and the
    /// stamps of the store reopened are above it.
    #[tokio::test]
    async fn stamps_stay_under_the_stored_ceiling_and_pass_it_after_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        let stored = |kv: &EmbeddedEngine| {
            let value = kv.db.db.read_tx().get(&kv.db.meta, COMMIT_VERSION).unwrap();
            value.map(|v| decode_u64(&v))
        };
        async fn commit(kv: &EmbeddedEngine, key: u8) -> u64 {
            let mut batch = Batch::new();
            batch.set(vec![key], Vec::new());
            let stamp = kv.commit(batch).await.unwrap();
            u64::from_be_bytes(stamp[..8].try_into().unwrap())
        }
        let kv = reopen(&path, Caches::default());
        assert_eq!(stored(&kv), None);
        let mut versions = vec![];
        for key in 0..5 {
            versions.push(commit(&kv, key).await);
        }
        assert_eq!(versions, [1, 2, 3, 4, 5]);
        assert_eq!(
            stored(&kv),
            Some(VERSIONS_RESERVED),
            "reserved by the first group"
        );
        drop(kv);
        let kv = reopen(&path, Caches::default());
        assert_eq!(commit(&kv, 5).await, VERSIONS_RESERVED + 1);
        assert_eq!(stored(&kv), Some(2 * VERSIONS_RESERVED));
    }

    /// A group of many keys leaves no large map behind for later groups to empty.
    #[test]
    fn the_writer_keeps_little_room_after_a_large_group() {
        let mut known = Known::default();
        for i in 0..10_000u64 {
            known.wrote(&i.to_be_bytes(), i);
        }
        known.settle(true);
        assert!(known.group.capacity() < 2 * GROUP_KEYS_KEPT);
        assert!(known.get(&9_999u64.to_be_bytes()).is_some());
    }

    /// Every kind of write reaches a row the cache holds: each key is read (and so held)
    /// before the commit that changes it, and read again after.
    #[tokio::test]
    async fn a_held_row_reads_as_each_kind_of_write_left_it() {
        let dir = tempfile::tempdir().unwrap();
        let kv = EmbeddedEngine::open(&dir.path().join("s")).unwrap();
        let key = |k: &str| k.as_bytes().to_vec();
        let mut batch = Batch::new();
        for k in [
            "set", "clear", "range-a", "range-b", "max", "add", "refused",
        ] {
            batch.set(key(k), 1u64.to_le_bytes().to_vec());
        }
        kv.commit(batch).await.unwrap();
        // `created` is read absent, and held so, until the write that creates it.
        let all = [
            "set", "clear", "range-a", "range-b", "max", "add", "refused", "created",
        ]
        .map(key);
        kv.get_many(all.to_vec()).await.unwrap();
        assert_eq!(kv.db.rows.len(), all.len());

        let mut changes = Batch::new();
        changes
            .set(key("set"), b"new".to_vec())
            .clear(key("clear"))
            .clear_range(key("range-")..key("range-z"))
            .max(key("max"), 9)
            .add(key("add"), 2)
            .set(key("created"), b"new".to_vec());
        // A batch of the same group refused on its fence writes nothing.
        let mut refused = Batch::new();
        refused
            .fence(key("set"), Some(b"never".to_vec()))
            .set(key("refused"), b"new".to_vec());
        let (a, b) = tokio::join!(kv.commit(changes), kv.commit(refused));
        a.unwrap();
        assert!(matches!(b, Err(StoreError::FenceChanged { .. })));

        let values = kv.get_many(all.to_vec()).await.unwrap();
        let le = |v: u64| Some(v.to_le_bytes().to_vec());
        assert_eq!(
            values,
            [
                Some(b"new".to_vec()),
                None,
                None,
                None,
                le(9),
                le(3),
                le(1),
                Some(b"new".to_vec())
            ]
        );
        assert_eq!(kv.get(b"max").await.unwrap(), le(9));
    }

    /// Readers of a key the writer keeps raising never see it go back, and each sees at least
    /// what a commit that returned wrote: held rows are never stale.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn reads_racing_commits_never_see_a_stale_row() {
        let dir = tempfile::tempdir().unwrap();
        let kv = Arc::new(EmbeddedEngine::open(&dir.path().join("s")).unwrap());
        let committed = Arc::new(AtomicU64::new(0));
        let value = |v: Option<Vec<u8>>| v.as_deref().map_or(0, decode_u64);
        let readers: Vec<_> = (0..3)
            .map(|_| {
                let (kv, committed) = (kv.clone(), committed.clone());
                tokio::spawn(async move {
                    let mut last = 0;
                    while committed.load(Ordering::Acquire) < 2000 {
                        let floor = committed.load(Ordering::Acquire);
                        let seen = value(kv.get(b"counter").await.unwrap());
                        assert!(seen >= last, "read {seen} after {last}");
                        assert!(seen >= floor, "read {seen} after {floor} was committed");
                        last = seen;
                        tokio::task::yield_now().await;
                    }
                })
            })
            .collect();
        for i in 1..=2000u64 {
            let mut batch = Batch::new();
            batch.max(b"counter".to_vec(), i);
            if i % 2 == 0 {
                batch.deferred();
            }
            kv.commit(batch).await.unwrap();
            committed.store(i, Ordering::Release);
        }
        for reader in readers {
            reader.await.unwrap();
        }
        assert_eq!(value(kv.get(b"counter").await.unwrap()), 2000);
    }

    /// `get_many` reads one state of the store when some keys are held and others not: two
    /// keys that every commit sets together, one held and one too large to be, always agree.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_read_of_held_and_unheld_keys_sees_one_state() {
        let dir = tempfile::tempdir().unwrap();
        let kv = Arc::new(EmbeddedEngine::open(&dir.path().join("s")).unwrap());
        let large = |i: u64| {
            let mut value = vec![0; crate::row_cache::ROW_BYTES_MAX];
            value[..8].copy_from_slice(&i.to_le_bytes());
            value
        };
        let keys = vec![b"small".to_vec(), b"large".to_vec()];
        let done = Arc::new(AtomicU64::new(0));
        let readers: Vec<_> = (0..3)
            .map(|_| {
                let (kv, done, keys) = (kv.clone(), done.clone(), keys.clone());
                tokio::spawn(async move {
                    while done.load(Ordering::Acquire) == 0 {
                        let values = kv.get_many(keys.clone()).await.unwrap();
                        let [small, large] = values.as_slice() else {
                            panic!("two keys asked")
                        };
                        let small = small.as_deref().map_or(0, decode_u64);
                        let large = large.as_deref().map_or(0, |v| decode_u64(&v[..8]));
                        assert_eq!(small, large, "one read saw two states");
                        tokio::task::yield_now().await;
                    }
                })
            })
            .collect();
        for i in 1..=5000u64 {
            let mut batch = Batch::new();
            batch
                .set(b"small".to_vec(), i.to_le_bytes().to_vec())
                .set(b"large".to_vec(), large(i));
            kv.commit(batch).await.unwrap();
        }
        done.store(1, Ordering::Release);
        for reader in readers {
            reader.await.unwrap();
        }
    }

    #[tokio::test]
    async fn oversized_values_are_refused_with_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let kv = EmbeddedEngine::open(&dir.path().join("s")).unwrap();
        let mut batch = Batch::new();
        batch.set(b"k".to_vec(), vec![0; MAX_VALUE_BYTES + 1]);
        assert!(matches!(
            kv.commit(batch).await,
            Err(StoreError::TooLarge(_))
        ));
    }

    /// What a test batch does to the events of conversations `a` and `b`.
    #[derive(Debug, Clone)]
    enum EventWrite {
        /// Appends `n` events, and rewrites the last one in the same batch when `rewrite`.
        Append {
            conv: bool,
            n: u64,
            rewrite: bool,
        },
        /// Rewrites (a delete for everyone) or clears the event `pick` of the conversation's.
        Rewrite {
            conv: bool,
            pick: usize,
        },
        Clear {
            conv: bool,
            pick: usize,
        },
        /// Clears the events below `pick` (retention), or every event of both conversations.
        Trim {
            conv: bool,
            pick: usize,
        },
        ClearBoth,
        /// Closes the engine and opens it again: the cache warms from its note while the
        /// reads go on (`crate::warm_up`).
        Reopen,
    }

    fn event_write() -> impl proptest::strategy::Strategy<Value = EventWrite> {
        use proptest::prelude::*;
        prop_oneof![
            4 => (any::<bool>(), 1u64..5, any::<bool>())
                .prop_map(|(conv, n, rewrite)| EventWrite::Append { conv, n, rewrite }),
            1 => (any::<bool>(), any::<usize>()).prop_map(|(conv, pick)| EventWrite::Rewrite { conv, pick }),
            1 => (any::<bool>(), any::<usize>()).prop_map(|(conv, pick)| EventWrite::Clear { conv, pick }),
            1 => (any::<bool>(), any::<usize>()).prop_map(|(conv, pick)| EventWrite::Trim { conv, pick }),
            1 => Just(EventWrite::ClearBoth),
            1 => Just(EventWrite::Reopen),
        ]
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(24))]

        /// Whatever the writes, every range read of a conversation's events gives what the
        /// store holds, whether the recent events' cache answers it or fjall does, with a
        /// cache large enough for all or so small that it keeps dropping conversations.
        #[test]
        fn range_reads_of_events_match_the_store_whatever_is_written(
            writes in proptest::collection::vec(event_write(), 1..24),
            small in proptest::prelude::any::<bool>(),
        ) {
            let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
            runtime.block_on(check_event_reads(writes, small));
        }
    }

    /// The engine at `path`, opened once one dropped just before has let its files go (its
    /// writer thread holds fjall's lock for a moment after the drop).
    fn reopen(path: &Path, caches: Caches) -> EmbeddedEngine {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            match EmbeddedEngine::open_with_caches(path, caches) {
                Ok(kv) => return kv,
                Err(e) if std::time::Instant::now() > deadline => panic!("reopen: {e}"),
                // The old writer thread holds the files until it has ended.
                Err(_) => std::thread::sleep(Duration::from_millis(1)),
            }
        }
    }

    /// Once a reopened engine has warmed its cache, the events a store held are read from
    /// memory again, as the store has them; without a budget it neither notes nor warms.
    #[tokio::test]
    async fn the_recent_events_are_read_from_memory_again_after_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        let keys = Keys::new(&[]);
        let kv = reopen(&path, Caches::default());
        for (conv, n) in [("a", 5), ("b", 3)] {
            let mut batch = Batch::new();
            for seq in 1..=n {
                batch.set(keys.event(conv, seq), format!("{conv}:{seq}").into_bytes());
            }
            kv.commit(batch).await.unwrap();
        }
        let mut batch = Batch::new();
        batch.clear(keys.event("a", 2));
        kv.commit(batch).await.unwrap();
        // The process stops: the note is written then, whatever still holds the engine.
        let note = path.join(crate::warm_up::NOTE_FILE);
        assert!(!note.exists());
        kv.closing();
        assert!(note.exists());
        drop(kv);
        let kv = reopen(&path, Caches::default());
        let values = |events: Vec<KeyValue>| -> Vec<String> {
            events
                .into_iter()
                .map(|(_, v)| String::from_utf8(v).unwrap())
                .collect()
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let read = kv.range(keys.events("a", 3, 6), 10, false).await.unwrap();
            assert_eq!(values(read), ["a:3", "a:4", "a:5"]);
            if kv.event_cache_totals().unwrap().held > 0 {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "never warmed");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let held = kv.event_cache_totals().unwrap().held;
        let read = kv.range(keys.events("b", 1, 4), 10, false).await.unwrap();
        assert_eq!(values(read), ["b:1", "b:2", "b:3"]);
        // The cleared event is a hole: a range across it is read from fjall.
        let read = kv.range(keys.events("a", 1, 4), 10, false).await.unwrap();
        assert_eq!(values(read), ["a:1", "a:3"]);
        assert_eq!(kv.event_cache_totals().unwrap().held, held + 1);
        drop(kv);

        let none = Caches {
            events: 0,
            ..Caches::default()
        };
        std::fs::remove_file(&note).unwrap();
        let kv = reopen(&path, none);
        let mut batch = Batch::new();
        batch.set(keys.event("a", 6), b"a:6".to_vec());
        kv.commit(batch).await.unwrap();
        kv.closing();
        drop(kv);
        let kv = reopen(&path, none);
        assert!(!note.exists());
        kv.range(keys.events("a", 3, 7), 10, false).await.unwrap();
        assert_eq!(kv.event_cache_totals().unwrap().held, 0);
    }

    async fn check_event_reads(writes: Vec<EventWrite>, small: bool) {
        let dir = tempfile::tempdir().unwrap();
        let caches = Caches {
            events: if small { 600 } else { 1 << 20 },
            ..Caches::default()
        };
        let mut kv = EmbeddedEngine::open_with_caches(&dir.path().join("s"), caches).unwrap();
        let keys = Keys::new(&[]);
        let mut model: [std::collections::BTreeMap<u64, Vec<u8>>; 2] = Default::default();
        let mut heads = [0u64; 2];
        let name = |conv: bool| if conv { "b" } else { "a" };
        for (i, write) in writes.into_iter().enumerate() {
            let mut batch = Batch::new();
            match write {
                EventWrite::Append { conv, n, rewrite } => {
                    let c = usize::from(conv);
                    for _ in 0..n {
                        heads[c] += 1;
                        let value = format!("{i}:{}", heads[c]).into_bytes();
                        batch.set(keys.event(name(conv), heads[c]), value.clone());
                        model[c].insert(heads[c], value);
                    }
                    if rewrite {
                        let value = format!("{i}:rewritten").into_bytes();
                        batch.set(keys.event(name(conv), heads[c]), value.clone());
                        model[c].insert(heads[c], value);
                    }
                }
                EventWrite::Rewrite { conv, pick } | EventWrite::Clear { conv, pick } => {
                    let c = usize::from(conv);
                    let Some(&seq) = model[c].keys().nth(pick % model[c].len().max(1)) else {
                        continue;
                    };
                    let key = keys.event(name(conv), seq);
                    if matches!(write, EventWrite::Clear { .. }) {
                        batch.clear(key);
                        model[c].remove(&seq);
                    } else {
                        batch.set(key, format!("{i}:deleted").into_bytes());
                        model[c].insert(seq, format!("{i}:deleted").into_bytes());
                    }
                }
                EventWrite::Trim { conv, pick } => {
                    let c = usize::from(conv);
                    let floor = (pick as u64) % (heads[c] + 2);
                    batch.clear_range(keys.events(name(conv), 0, floor));
                    model[c].retain(|&seq, _| seq >= floor);
                }
                EventWrite::ClearBoth => {
                    batch.clear_range(keys.all_events());
                    model = Default::default();
                }
                EventWrite::Reopen => {
                    drop(kv);
                    kv = reopen(&dir.path().join("s"), caches);
                }
            }
            kv.commit(batch).await.unwrap();
            for conv in [false, true] {
                let c = usize::from(conv);
                for after in 0..=heads[c] + 1 {
                    for through in [after + 1, after + 3, heads[c], u64::MAX] {
                        if through <= after {
                            continue;
                        }
                        for limit in [1, 2, 256] {
                            let range =
                                keys.events(name(conv), after + 1, through.saturating_add(1));
                            let read = kv.range(range, limit, false).await.unwrap();
                            let want: Vec<_> = model[c]
                                .range(after + 1..through.saturating_add(1))
                                .take(limit)
                                .map(|(&seq, v)| (keys.event(name(conv), seq), v.clone()))
                                .collect();
                            assert_eq!(
                                read,
                                want,
                                "{} after {after} through {through} limit {limit}",
                                name(conv)
                            );
                        }
                    }
                }
            }
        }
    }
}
