//! Where the embedded engine keeps each key: one fjall keyspace for most keys, and one of its
//! own for the idempotency records (those of the store at the database's root, as `courier
//! serve` opens it; a store kept under another root keeps them with its other keys).
//!
//! **Why apart.** Every append looks up its idempotency record in two buckets, and both look-ups
//! almost always find nothing. In the keyspace every other key shares, such a miss searched the
//! large memtable and then probed the bloom filter of every table whose key range held the key,
//! which is each of them, as every table spans every subspace: at the 1:1 peak those probes and
//! searches were ~7 % of the server's samples, on the one ordering thread that sequences every
//! conversation. In a keyspace of their own, the records' memtable holds one key per message
//! instead of all of them, and the look-up of the previous bucket sorts below every recent
//! table, which its key range then skips unread (`docs/decisions/0011-idempotency-keyspace.md`).
//!
//! **Which keys, in a store that held them with the others.** A store written by an earlier
//! version holds its idempotency records in the shared keyspace, and they must stay readable
//! there until they expire. So when the store opens, the part of each idempotency subspace kept
//! apart is what sorts after the last key the shared keyspace holds in it (the whole subspace
//! when it holds none). The split is sound at every open: the shared keyspace is only given
//! keys at or below its last one, so it never holds one above; the other keyspace is only given
//! keys above the split, and a later split is never higher than an earlier one (the shared
//! keyspace's last key can only go down). A key is in the keyspace the current split names.
//! Once the records written before the change have expired (new buckets sort after old ones),
//! the whole subspace is kept apart.
//!
//! **Values apart from their keys.** The shared keyspace of a store created by this version keeps
//! each value of [`SEPARATED_VALUE_BYTES`] or more in fjall's blob files, written in the order
//! memtables are flushed, and only the key with a pointer in the LSM tree (fjall's key-value
//! separation). Each memtable's flush spans every conversation, so a compaction of the first
//! level rewrote every table it overlapped, which held most of the events ever written: under a
//! steady load those rewrites, and the journal's fsyncs waiting behind them, set the send-ACK
//! tail. Kept apart, an event is written once at its flush and compactions rewrite only keys
//! and pointers; fjall rewrites a blob file once a quarter of it is stale (retention, deletes,
//! outbox rows cleared after a flush). A read of a value kept apart is one more read, from the
//! block cache or a blob file (`docs/decisions/0012-values-apart-from-keys.md`). fjall records
//! the choice when it creates the keyspace: a store created by an earlier version keeps its
//! values with their keys.
//!
//! **Tables of 16 MiB.** The shared keyspace of a store created by this version compacts into
//! tables of [`TABLE_TARGET_BYTES`] (fjall's default is 64 MiB). Its flushed tables span every
//! conversation, so each merge into the first level rewrites all of that level, which fjall
//! sizes at four tables: with 64 MiB tables the merges grew to 256 MiB, 5-8 s each by the tenth
//! minute at 10,000 msgs/s, and every table written held up the journal's fsyncs until it was
//! synced (~1 ms per MB on the test machine). With 16 MiB tables a merge into the first level
//! rewrites at most ~64 MiB, the level spills into the next one sooner, and each table written
//! is a quarter as long a wait. Over ten minutes at that rate: send-ACK p99 77 -> 53 ms, p99.9
//! 235 -> 134 ms, 6 % fewer bytes written, 14 % less CPU for fjall's workers; the peak and a
//! reconnect storm the same (`docs/benchmarks.md`, "Journals kept by a keyspace written once a
//! minute"). fjall records the size when it creates the keyspace: a store created by an earlier
//! version keeps 64 MiB.
//!
//! **Ranges across the split.** A range read or a range clear is cut where it enters or leaves
//! a part kept apart, and each piece is read from its keyspace in key order: no key of a piece
//! lives in the other keyspace, so the pieces together are the range.

use crate::embedded::engine_error;
use crate::keys::Keys;
use crate::kv::StoreError;
use fjall::compaction::Leveled;
use fjall::{
    AbstractTree, KeyspaceCreateOptions, KvSeparationOptions, Readable, SingleWriterTxDatabase,
    SingleWriterTxKeyspace,
};
use std::ops::Range;
use std::sync::Arc;

/// The size from which a value of the shared keyspace is kept apart from its key, in fjall's
/// blob files (module documentation): an event (~200 bytes with a short text) is, a cursor, a
/// head or a membership record is not.
pub(crate) const SEPARATED_VALUE_BYTES: u32 = 128;

/// The size of the tables the shared keyspace compacts into (module documentation).
pub(crate) const TABLE_TARGET_BYTES: u64 = 16 << 20;

/// The engine's keyspaces for data, and which keys each holds.
#[derive(Clone)]
pub(crate) struct Keyspaces {
    /// Every key but those `apart` names.
    pub shared: SingleWriterTxKeyspace,
    /// The idempotency records (module documentation).
    pub idempotency: SingleWriterTxKeyspace,
    /// The key ranges kept in `idempotency`, disjoint and in key order (that of
    /// `Keys::idempotency_subspaces`).
    apart: Vec<Range<Vec<u8>>>,
}

impl Keyspaces {
    /// Opens (or creates) both keyspaces, each with memtables of `memtable_bytes`, and splits
    /// the idempotency subspaces between them (module documentation). A new shared keyspace
    /// keeps its values of [`SEPARATED_VALUE_BYTES`] or more apart from their keys and compacts
    /// into tables of [`TABLE_TARGET_BYTES`].
    pub fn open(db: &SingleWriterTxDatabase, memtable_bytes: u64) -> Result<Self, StoreError> {
        let options = || KeyspaceCreateOptions::default().max_memtable_size(memtable_bytes);
        let shared_options = || {
            options()
                .with_kv_separation(Some(
                    KvSeparationOptions::default().separation_threshold(SEPARATED_VALUE_BYTES),
                ))
                .compaction_strategy(Arc::new(
                    Leveled::default().with_table_target_size(TABLE_TARGET_BYTES),
                ))
        };
        let shared = db.keyspace("data", shared_options).map_err(engine_error)?;
        let idempotency = db.keyspace("idempotency", options).map_err(engine_error)?;
        let snapshot = db.read_tx();
        let mut apart = Vec::new();
        for subspace in Keys::new(&[]).idempotency_subspaces() {
            let last = match snapshot.range(&shared, subspace.clone()).next_back() {
                Some(guard) => Some(guard.key().map_err(engine_error)?),
                None => None,
            };
            let from = match last {
                Some(last) => [last.as_ref(), &[0]].concat(),
                None => subspace.start,
            };
            apart.push(from..subspace.end);
        }
        Ok(Self {
            shared,
            idempotency,
            apart,
        })
    }

    /// The keyspace that holds `key`.
    pub fn of(&self, key: &[u8]) -> &SingleWriterTxKeyspace {
        if self.is_apart(key) {
            &self.idempotency
        } else {
            &self.shared
        }
    }

    /// Whether `key` is an idempotency record kept apart.
    pub fn is_apart(&self, key: &[u8]) -> bool {
        self.apart
            .iter()
            .any(|range| range.start.as_slice() <= key && key < range.end.as_slice())
    }

    /// `range` cut where it enters or leaves a part kept apart: its pieces in key order, each
    /// with the keyspace that holds it.
    pub fn pieces(&self, range: Range<&[u8]>) -> Vec<(&SingleWriterTxKeyspace, Range<Vec<u8>>)> {
        let mut pieces = Vec::new();
        let mut from = range.start;
        for apart in &self.apart {
            if from >= range.end {
                break;
            }
            let (start, end) = (apart.start.as_slice(), apart.end.as_slice());
            if end <= from || range.end <= start {
                continue;
            }
            if from < start {
                pieces.push((&self.shared, from.to_vec()..start.to_vec()));
                from = start;
            }
            let until = end.min(range.end);
            pieces.push((&self.idempotency, from.to_vec()..until.to_vec()));
            from = until;
        }
        if from < range.end {
            pieces.push((&self.shared, from.to_vec()..range.end.to_vec()));
        }
        pieces
    }

    /// Drops the tables of the idempotency keyspace that lie wholly inside `range`, a range
    /// of expired records (fjall's `drop_range`, which first waits for a running compaction of
    /// the keyspace to end): their records go without a read or a tombstone each. Only that
    /// keyspace's: no cache of the engine holds its keys (`crate::row_cache` leaves them out,
    /// `crate::event_cache` holds events), so the caches stay exact. What is left of `range`
    /// (records in memtables, in a table that reaches past `range`, or in the shared keyspace)
    /// the caller clears key by key. fjall deletes a dropped table's file when the keyspace
    /// next flushes or compacts.
    pub fn drop_idempotency_tables(&self, range: Range<Vec<u8>>) -> Result<(), StoreError> {
        for apart in &self.apart {
            let start = (&range.start).max(&apart.start);
            let end = (&range.end).min(&apart.end);
            if start < end {
                let tree = &self.idempotency.inner().tree;
                tree.drop_range(start.as_slice()..end.as_slice())
                    .map_err(engine_error)?;
            }
        }
        Ok(())
    }

    /// Both keyspaces, the shared one first.
    pub fn all(&self) -> [&SingleWriterTxKeyspace; 2] {
        [&self.shared, &self.idempotency]
    }
}
