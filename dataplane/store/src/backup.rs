//! A copy of the embedded store as of one moment, and a new store written from such a copy:
//! what `courier backup` reads and `courier restore` writes (`docs/operations.md`, "Backups").
//!
//! **One moment.** A copy ([`StoreSnapshot`]) reads one fjall snapshot of every keyspace: each
//! commit is in it whole or not at all, and the commits that land while it is read are not.
//! Its pairs are the store's contents, whichever keyspace held them (`crate::keyspaces`): a new
//! store ([`StoreImport`]) puts each key where a store of this version keeps such keys.
//!
//! **Commit versions.** A copy carries the ceiling of the store's commit versions, read from
//! the same snapshot: every versionstamp in its keys (the outbox's) is below it. A store
//! written from the copy holds that ceiling, so its next commits are stamped above every stamp
//! it holds, as after a restart (`crate::embedded`, "Versionstamps").
//!
//! **What a long copy costs.** The snapshot keeps every version it reads from compaction's
//! clean-up for as long as it is held: while a large store is copied, what is overwritten or
//! deleted meanwhile stays on disk, and goes at the compactions after the copy.

use crate::embedded::{COMMIT_VERSION, MAX_KEY_BYTES, MAX_VALUE_BYTES, MEMTABLE_BYTES};
use crate::embedded::{engine_error, open_meta};
use crate::keyspaces::Keyspaces;
use crate::kv::{StoreError, decode_u64};
use fjall::{PersistMode, Readable, SingleWriterTxDatabase, SingleWriterTxKeyspace};
use std::ops::Range;
use std::path::Path;

/// The bytes of pairs a new store takes in one write batch.
const IMPORT_BATCH_BYTES: usize = 4 << 20;

/// The largest commit versions' ceiling a new store takes. A store's ceiling rises by
/// `VERSIONS_RESERVED` (65,536) once per as many groups: at a million groups a second it would
/// pass this after ~290,000 years. A copy that holds a larger one is damaged, and a store
/// holding it would stamp its commits past `u64::MAX`, below the stamps it holds.
pub const COMMIT_VERSION_CEILING_MAX: u64 = 1 << 63;

/// A key and its value, as a copy gives them.
pub type Pair = (fjall::UserKey, fjall::UserValue);

/// The store as of one moment (module documentation). Holding it keeps what it reads on disk.
pub struct StoreSnapshot {
    snapshot: fjall::Snapshot,
    data: Keyspaces,
    ceiling: u64,
}

impl StoreSnapshot {
    /// The snapshot `snapshot` of the keyspaces `data`, the ceiling read from `meta`.
    pub(crate) fn new(
        snapshot: fjall::Snapshot,
        data: Keyspaces,
        meta: &SingleWriterTxKeyspace,
    ) -> Result<Self, StoreError> {
        let ceiling = snapshot
            .get(meta, COMMIT_VERSION)
            .map_err(engine_error)?
            .map_or(0, |v| decode_u64(&v));
        Ok(Self {
            snapshot,
            data,
            ceiling,
        })
    }

    /// The ceiling of the store's commit versions (module documentation).
    pub fn commit_version_ceiling(&self) -> u64 {
        self.ceiling
    }

    /// Every pair of the store: each keyspace's in key order, one keyspace after the other.
    pub fn pairs(&self) -> impl Iterator<Item = Result<Pair, StoreError>> + '_ {
        self.data
            .all()
            .into_iter()
            .flat_map(|keyspace| self.snapshot.iter(keyspace).map(pair))
    }

    /// The pairs of `range`, in key order.
    pub fn range(
        &self,
        range: Range<Vec<u8>>,
    ) -> impl Iterator<Item = Result<Pair, StoreError>> + '_ {
        self.data
            .pieces(range.start.as_slice()..range.end.as_slice())
            .into_iter()
            .flat_map(|(keyspace, piece)| self.snapshot.range(keyspace, piece).map(pair))
    }
}

fn pair(guard: fjall::Guard) -> Result<Pair, StoreError> {
    guard.into_inner().map_err(engine_error)
}

/// A new store, written pair by pair from a copy ([`StoreSnapshot`]) and made durable by
/// [`StoreImport::finish`]. What it wrote before `finish` is not a store to open: the caller
/// writes into a directory of its own and moves it into place after `finish`.
pub struct StoreImport {
    db: SingleWriterTxDatabase,
    data: Keyspaces,
    meta: SingleWriterTxKeyspace,
    batch: Vec<Pair>,
    batch_bytes: usize,
    pairs: u64,
}

/// Whether `path` holds a store (the embedded engine's version file is there).
pub fn holds_store(path: &Path) -> bool {
    path.join("version").exists()
}

impl StoreImport {
    /// A new store in `path`, which must not hold one.
    pub fn create(path: &Path) -> Result<Self, StoreError> {
        if holds_store(path) {
            return Err(StoreError::Engine(format!(
                "{} already holds a store",
                path.display()
            )));
        }
        let db = SingleWriterTxDatabase::builder(path)
            .open()
            .map_err(engine_error)?;
        let data = Keyspaces::open(&db, MEMTABLE_BYTES)?;
        let meta = open_meta(&db)?;
        Ok(Self {
            db,
            data,
            meta,
            batch: Vec::new(),
            batch_bytes: 0,
            pairs: 0,
        })
    }

    /// Adds a pair; refused when it breaks the store's limits (a damaged copy).
    pub fn insert(&mut self, key: &[u8], value: &[u8]) -> Result<(), StoreError> {
        if key.is_empty() || key.len() > MAX_KEY_BYTES || value.len() > MAX_VALUE_BYTES {
            return Err(StoreError::TooLarge(format!(
                "a pair of {} key bytes and {} value bytes is outside the store's limits \
                 (keys of 1 to {MAX_KEY_BYTES} bytes, values up to {MAX_VALUE_BYTES})",
                key.len(),
                value.len()
            )));
        }
        self.batch_bytes += key.len() + value.len();
        self.batch.push((key.into(), value.into()));
        self.pairs += 1;
        if self.batch_bytes >= IMPORT_BATCH_BYTES {
            self.write_batch()?;
        }
        Ok(())
    }

    /// The pairs added so far.
    pub fn pairs(&self) -> u64 {
        self.pairs
    }

    /// Writes what is left, the commit versions' `ceiling`, and syncs the store to disk.
    /// Returns how many pairs it holds. A ceiling past [`COMMIT_VERSION_CEILING_MAX`] is
    /// refused.
    pub fn finish(mut self, ceiling: u64) -> Result<u64, StoreError> {
        check_ceiling(ceiling)?;
        self.write_batch()?;
        let mut batch = self
            .db
            .inner()
            .batch()
            .durability(Some(PersistMode::SyncAll));
        batch.insert(
            self.meta.inner(),
            COMMIT_VERSION,
            ceiling.to_le_bytes().as_slice(),
        );
        batch.commit().map_err(engine_error)?;
        self.db
            .persist(PersistMode::SyncAll)
            .map_err(engine_error)?;
        Ok(self.pairs)
    }

    fn write_batch(&mut self) -> Result<(), StoreError> {
        if self.batch.is_empty() {
            return Ok(());
        }
        // Written to the journal for the operating system to sync at `finish`.
        let mut batch = self
            .db
            .inner()
            .batch()
            .durability(Some(PersistMode::Buffer));
        for (key, value) in self.batch.drain(..) {
            batch.insert(self.data.of(&key).inner(), key, value);
        }
        self.batch_bytes = 0;
        batch.commit().map_err(engine_error)
    }
}

/// Refuses a commit versions' ceiling past [`COMMIT_VERSION_CEILING_MAX`] (a damaged copy).
pub fn check_ceiling(ceiling: u64) -> Result<(), StoreError> {
    if ceiling > COMMIT_VERSION_CEILING_MAX {
        return Err(StoreError::Engine(format!(
            "a commit versions' ceiling of {ceiling} is past any a store reaches \
             ({COMMIT_VERSION_CEILING_MAX}): the copy is damaged"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Keys;
    use crate::embedded::EmbeddedEngine;
    use crate::kv::{Batch, KvEngine};

    async fn stamp_of(kv: &EmbeddedEngine, key: &[u8]) -> u64 {
        let mut batch = Batch::new();
        batch.set(key.to_vec(), b"v".to_vec());
        let stamp = kv.commit(batch).await.unwrap();
        u64::from_be_bytes(stamp[..8].try_into().unwrap())
    }

    /// A copy holds the store as of its snapshot, the idempotency records with the rest, and a
    /// store written from it reads the same and stamps its commits above the copy's.
    #[tokio::test]
    async fn a_store_written_from_a_copy_reads_as_the_original_did_and_stamps_above_it() {
        let dir = tempfile::tempdir().unwrap();
        let original = EmbeddedEngine::open(&dir.path().join("original")).unwrap();
        let record = Keys::new(&[])
            .idempotency(&[7], "d:a", "u", "d", "m")
            .remove(0);
        let mut batch = Batch::new();
        batch
            .set(record.clone(), b"record".to_vec())
            .set(Keys::new(&[]).head("d:a"), b"head".to_vec());
        original.commit(batch).await.unwrap();
        let last = stamp_of(&original, b"last").await;
        let snapshot = original.snapshot().unwrap();
        stamp_of(&original, b"after the snapshot").await;

        let mut import = StoreImport::create(&dir.path().join("copy")).unwrap();
        for pair in snapshot.pairs() {
            let (key, value) = pair.unwrap();
            import.insert(&key, &value).unwrap();
        }
        assert_eq!(import.finish(snapshot.commit_version_ceiling()).unwrap(), 3);
        drop(snapshot);
        let copy = EmbeddedEngine::open(&dir.path().join("copy")).unwrap();
        let everything = vec![0]..vec![0xff];
        let mut expected = original
            .range(everything.clone(), usize::MAX, false)
            .await
            .unwrap();
        expected.retain(|(key, _)| key != b"after the snapshot");
        assert_eq!(
            copy.range(everything, usize::MAX, false).await.unwrap(),
            expected
        );
        assert_eq!(copy.get(&record).await.unwrap(), Some(b"record".to_vec()));
        assert!(
            copy.db_holds_apart(&record),
            "the record is where a store of this version keeps them"
        );
        assert!(stamp_of(&copy, b"next").await > last);
    }

    #[test]
    fn a_pair_outside_the_stores_limits_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut import = StoreImport::create(dir.path()).unwrap();
        assert!(import.insert(b"", b"v").is_err());
        assert!(import.insert(&[1; MAX_KEY_BYTES + 1], b"v").is_err());
        assert!(import.insert(b"k", &vec![0; MAX_VALUE_BYTES + 1]).is_err());
        import.insert(b"k", b"v").unwrap();
        assert_eq!(import.pairs(), 1);
    }

    /// A ceiling past any a store reaches would have the new store's next stamps wrap past
    /// `u64::MAX` (and its writer panic on the overflow in a build that checks it).
    #[test]
    fn a_ceiling_past_any_a_store_reaches_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut import = StoreImport::create(&dir.path().join("refused")).unwrap();
        import.insert(b"k", b"v").unwrap();
        assert!(import.finish(u64::MAX).is_err());
        let import = StoreImport::create(&dir.path().join("taken")).unwrap();
        assert_eq!(import.finish(COMMIT_VERSION_CEILING_MAX).unwrap(), 0);
    }

    #[test]
    fn a_directory_that_holds_a_store_is_not_written_over() {
        let dir = tempfile::tempdir().unwrap();
        drop(EmbeddedEngine::open(dir.path()).unwrap());
        assert!(StoreImport::create(dir.path()).is_err());
    }
}
