//! A group commit's writes, read through before the store and committed as one fjall write
//! batch.
//!
//! **Why not fjall's write transaction.** The transaction keeps a group's writes in a memtable
//! of its own (a concurrent skiplist, created per group), so that the group reads what its
//! earlier batches wrote, and at commit copies every entry of it into a write batch: each key
//! is a skiplist insert twice, and the first with its own node allocations. When a group holds
//! one or two appends, as when every conversation has one message in flight, that was ~19k of
//! the ~228k instructions a message cost the server under `tools/profile.sh callgrind`, of
//! which this module saves ~12k (`docs/benchmarks.md`, "A group's writes without fjall's
//! write transaction"). Here the writes wait in a sorted map per keyspace, read before a
//! snapshot of the store taken at the group's first read (most groups read nothing: the
//! writer knows the counters and fences they touch); the writer thread is the store's only
//! writer, so that snapshot is the store as the group found it.

use crate::embedded::engine_error;
use crate::kv::StoreError;
use fjall::{PersistMode, Readable, SingleWriterTxDatabase, SingleWriterTxKeyspace, UserKey};
use std::cell::OnceCell;
use std::collections::BTreeMap;
use std::ops::{Bound, Range};

/// A key's write in the group: its new value, or `None` once removed.
type Write = Option<fjall::UserValue>;

/// The writes of one group, per keyspace (a store has three), over the store as the group
/// found it.
pub(crate) struct GroupWrites<'a> {
    db: &'a SingleWriterTxDatabase,
    snapshot: OnceCell<fjall::Snapshot>,
    writes: Vec<(&'a SingleWriterTxKeyspace, BTreeMap<UserKey, Write>)>,
}

impl<'a> GroupWrites<'a> {
    /// A group over the store as it is now.
    pub fn begin(db: &'a SingleWriterTxDatabase) -> Self {
        Self {
            db,
            snapshot: OnceCell::new(),
            writes: Vec::new(),
        }
    }

    /// The store as the group found it (the writer wrote nothing since the group began).
    fn snapshot(&self) -> &fjall::Snapshot {
        self.snapshot.get_or_init(|| self.db.read_tx())
    }

    /// Where the writes to `keyspace` are (the same handle of the store every time, so
    /// compared by address).
    fn position(&self, keyspace: &SingleWriterTxKeyspace) -> Option<usize> {
        self.writes
            .iter()
            .position(|(k, _)| std::ptr::eq(*k, keyspace))
    }

    fn of(&self, keyspace: &SingleWriterTxKeyspace) -> Option<&BTreeMap<UserKey, Write>> {
        self.position(keyspace).map(|at| &self.writes[at].1)
    }

    fn of_mut(&mut self, keyspace: &'a SingleWriterTxKeyspace) -> &mut BTreeMap<UserKey, Write> {
        let at = self.position(keyspace).unwrap_or_else(|| {
            self.writes.push((keyspace, BTreeMap::new()));
            self.writes.len() - 1
        });
        &mut self.writes[at].1
    }

    /// The value of `key`: as the group left it, else as the store holds it.
    pub fn get(
        &self,
        keyspace: &SingleWriterTxKeyspace,
        key: &[u8],
    ) -> Result<Option<fjall::UserValue>, StoreError> {
        if let Some(write) = self.of(keyspace).and_then(|writes| writes.get(key)) {
            return Ok(write.clone());
        }
        self.snapshot().get(keyspace, key).map_err(engine_error)
    }

    /// The keys of `range` that hold a value once the group's writes so far apply, in key
    /// order.
    pub fn keys_in(
        &self,
        keyspace: &SingleWriterTxKeyspace,
        range: Range<Vec<u8>>,
    ) -> Result<Vec<UserKey>, StoreError> {
        let stored: Vec<UserKey> = self
            .snapshot()
            .range(keyspace, range.clone())
            .map(|guard| guard.key())
            .collect::<Result<_, _>>()
            .map_err(engine_error)?;
        let Some(writes) = self.of(keyspace) else {
            return Ok(stored);
        };
        let bounds = (
            Bound::Included(range.start.as_slice()),
            Bound::Excluded(range.end.as_slice()),
        );
        // Merged in key order: a key the group wrote counts as the group left it.
        let mut keys = Vec::with_capacity(stored.len());
        let mut stored = stored.into_iter().peekable();
        for (key, write) in writes.range::<[u8], _>(bounds) {
            while let Some(below) = stored.next_if(|s| s.as_ref() < key.as_ref()) {
                keys.push(below);
            }
            stored.next_if(|s| s == key);
            if write.is_some() {
                keys.push(key.clone());
            }
        }
        keys.extend(stored);
        Ok(keys)
    }

    pub fn insert(
        &mut self,
        keyspace: &'a SingleWriterTxKeyspace,
        key: impl Into<UserKey>,
        value: impl Into<fjall::UserValue>,
    ) {
        self.of_mut(keyspace).insert(key.into(), Some(value.into()));
    }

    pub fn remove(&mut self, keyspace: &'a SingleWriterTxKeyspace, key: impl Into<UserKey>) {
        self.of_mut(keyspace).insert(key.into(), None);
    }

    /// Writes the group's last write of each key in one batch, persisted as `persist` says.
    pub fn commit(self, persist: PersistMode) -> fjall::Result<()> {
        let mut batch = self.db.inner().batch().durability(Some(persist));
        for (keyspace, writes) in self.writes {
            for (key, write) in writes {
                match write {
                    Some(value) => batch.insert(keyspace.inner(), key, value),
                    None => batch.remove(keyspace.inner(), key),
                }
            }
        }
        batch.commit()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fjall::KeyspaceCreateOptions;

    fn open(dir: &tempfile::TempDir) -> (SingleWriterTxDatabase, SingleWriterTxKeyspace) {
        let db = SingleWriterTxDatabase::builder(dir.path()).open().unwrap();
        let keyspace = db.keyspace("data", KeyspaceCreateOptions::default).unwrap();
        (db, keyspace)
    }

    fn keys(keys: Vec<UserKey>) -> Vec<Vec<u8>> {
        keys.into_iter().map(|k| k.to_vec()).collect()
    }

    #[test]
    fn a_group_reads_its_own_writes_before_the_store() {
        let dir = tempfile::tempdir().unwrap();
        let (db, data) = open(&dir);
        let mut setup = GroupWrites::begin(&db);
        for key in ["a", "b", "d"] {
            setup.insert(&data, key.as_bytes(), key.as_bytes());
        }
        setup.commit(PersistMode::Buffer).unwrap();

        let mut group = GroupWrites::begin(&db);
        group.insert(&data, &b"b"[..], &b"new"[..]);
        group.insert(&data, &b"c"[..], &b"c"[..]);
        group.remove(&data, &b"d"[..]);
        group.insert(&data, &b"e"[..], &b"e"[..]);
        group.remove(&data, &b"e"[..]);
        assert_eq!(group.get(&data, b"a").unwrap().as_deref(), Some(&b"a"[..]));
        assert_eq!(
            group.get(&data, b"b").unwrap().as_deref(),
            Some(&b"new"[..])
        );
        assert_eq!(group.get(&data, b"d").unwrap(), None);
        assert_eq!(
            keys(group.keys_in(&data, b"a".to_vec()..b"z".to_vec()).unwrap()),
            [b"a".to_vec(), b"b".to_vec(), b"c".to_vec()],
        );
        assert_eq!(
            keys(group.keys_in(&data, b"b".to_vec()..b"c".to_vec()).unwrap()),
            [b"b".to_vec()],
        );
        // Nothing is in the store before the commit, and all of it after.
        assert_eq!(db.read_tx().get(&data, b"c").unwrap(), None);
        group.commit(PersistMode::Buffer).unwrap();
        let snapshot = db.read_tx();
        let stored: Vec<Vec<u8>> = snapshot
            .range(&data, b"a".to_vec()..b"z".to_vec())
            .map(|guard| guard.key().unwrap().to_vec())
            .collect();
        assert_eq!(stored, [b"a".to_vec(), b"b".to_vec(), b"c".to_vec()]);
        assert_eq!(
            snapshot.get(&data, b"b").unwrap().as_deref(),
            Some(&b"new"[..])
        );
    }
}
