//! The embedded engine's cache of rows read by key: the values of keys that point reads found,
//! kept in a hash map so that the next read of the same key does not search the memtable.
//!
//! Point reads of a 64 MiB memtable were ~10 % of the server's CPU at 5,000 msgs/s, nine tenths
//! of it in the memtable's skiplist, for keys read again and again: an ack's membership
//! record, head and receipt cursors, an append's membership record (`docs/benchmarks.md`,
//! "Hot rows read from memory").
//!
//! **Exact, never stale.** Every write of the store goes through its one writer, which keeps
//! the cache in step with each group commit:
//! 1. before the commit it drops the rows of every key the group writes ([`RowCache::begin_write`]),
//!    so that while the commit is under way those keys are read from the store (which shows
//!    the new values as soon as the commit is applied, as it always did);
//! 2. after it, the rows it dropped come back with the group's values ([`RowCache::end_write`]).
//!
//! A read that missed fills the cache from its snapshot only if no group began to commit since
//! just before the snapshot was taken, and none was under way then ([`RowCache::fill`]): the
//! snapshot then holds the latest value of every key. So a held row always equals the store's
//! value. A key found absent is held too (an ack reads its user's read cursor, absent until
//! the user's first read receipt), until a write creates it. Rows up to [`ROW_BYTES_MAX`]
//! only, and only of the keys the engine asks for ([`RowCache::look_up`]): it leaves out the
//! idempotency records, read about once each.
//!
//! **Bounded.** At most [`ROWS_MAX`] rows; a fill that finds the cache full empties it first
//! (hot rows come back with their next read), and frees the old rows after it lets go of the
//! cache's lock.

use foldhash::HashMap;
use std::sync::Mutex;

/// Most rows held (~100-150 bytes each with 50-byte keys and small values: ~10 MB).
pub const ROWS_MAX: usize = 1 << 16;
/// Largest row (key and value) held.
pub const ROW_BYTES_MAX: usize = 512;

/// Where a read stood when it looked the cache up: fills are accepted only if nothing was
/// committed since.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Generation(u64);

#[derive(Default)]
pub struct RowCache {
    state: Mutex<Rows>,
}

#[derive(Default)]
struct Rows {
    /// Bumped when a group begins to commit and when it ends: odd while one is under way.
    generation: u64,
    rows: HashMap<Vec<u8>, Held>,
}

/// What a held row says of its key: its value, or `None` when it is absent.
pub type Held = Option<Vec<u8>>;

/// What a write left a key: a value, a counter's value, nothing, or something not known here.
#[derive(Debug, Clone, Copy)]
pub enum Written<'a> {
    Value(&'a [u8]),
    Counter(u64),
    Removed,
    Unknown,
}

impl Written<'_> {
    fn held(self) -> Option<Held> {
        match self {
            Written::Value(value) => Some(Some(value.to_vec())),
            Written::Counter(value) => Some(Some(value.to_le_bytes().to_vec())),
            Written::Removed => Some(None),
            Written::Unknown => None,
        }
    }
}

/// The rows of a group about to commit, being dropped ([`RowCache::begin_write`]).
pub struct Writing<'a> {
    state: std::sync::MutexGuard<'a, Rows>,
    held: Vec<(Vec<u8>, Option<Held>)>,
}

impl Writing<'_> {
    /// The group writes `key`, last (an earlier write of it is named after, and ignored). A
    /// row that held a value is held again; one that held the key absent is not.
    pub fn wrote(&mut self, key: &[u8], written: Written<'_>) {
        if let Some((key, Some(_))) = self.state.rows.remove_entry(key) {
            self.held.push((key, written.held()));
        }
    }

    /// The rows dropped that were held, with what the group leaves them.
    pub fn finish(self) -> Vec<(Vec<u8>, Option<Held>)> {
        self.held
    }
}

fn row_bytes(key: &[u8], value: Option<&[u8]>) -> usize {
    key.len() + value.map_or(0, <[u8]>::len)
}

impl RowCache {
    fn state(&self) -> std::sync::MutexGuard<'_, Rows> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// What the cache holds for each of `keys` (`None`: nothing, read it from the store,
    /// taking the snapshot only after this call), and the generation to [`fill`](Self::fill)
    /// with. Keys that `holds` rejects, which the caller never fills, are not looked for.
    pub fn look_up(
        &self,
        keys: &[impl AsRef<[u8]>],
        holds: impl Fn(&[u8]) -> bool,
    ) -> (Generation, Vec<Option<Held>>) {
        let state = self.state();
        let values = keys
            .iter()
            .map(|key| key.as_ref())
            .map(|key| holds(key).then(|| state.rows.get(key).cloned()).flatten())
            .collect();
        (Generation(state.generation), values)
    }

    /// Where the cache stands now, to tell whether a commit began since a look-up.
    pub fn generation(&self) -> Generation {
        Generation(self.state().generation)
    }

    /// Holds `rows` (a key and its value, `None` if absent), read from a snapshot taken after
    /// the [`look_up`](Self::look_up) that gave `generation`, unless a group commit was under
    /// way then or has begun since.
    pub fn fill<'a>(
        &self,
        generation: Generation,
        rows: impl IntoIterator<Item = (&'a [u8], Option<&'a [u8]>)>,
    ) {
        let mut state = self.state();
        if state.generation != generation.0 || generation.0 % 2 == 1 {
            return;
        }
        let mut emptied = None;
        for (key, value) in rows {
            if row_bytes(key, value) > ROW_BYTES_MAX {
                continue;
            }
            if state.rows.len() >= ROWS_MAX && !state.rows.contains_key(key) {
                let room = HashMap::with_capacity_and_hasher(ROWS_MAX, Default::default());
                emptied = Some(std::mem::replace(&mut state.rows, room));
            }
            state.rows.insert(key.to_vec(), value.map(<[u8]>::to_vec));
        }
        // Freed once the lock is let go: a full cache's rows take 1-5 ms to free, and every
        // point read and the writer's commits take this lock.
        drop(state);
        drop(emptied);
    }

    /// A group is about to commit: the rows of the keys it writes are dropped as it names them
    /// ([`Writing::wrote`]), last write first, and those that were held are kept with what the
    /// group leaves them, for [`end_write`](Self::end_write) to hold again.
    pub fn begin_write(&self) -> Writing<'_> {
        let mut state = self.state();
        state.generation += 1;
        Writing {
            state,
            held: Vec::new(),
        }
    }

    /// The group has committed (or failed): `rows` are held again as it left them (`None`:
    /// not known; the key is read from the store next).
    pub fn end_write(&self, rows: impl IntoIterator<Item = (Vec<u8>, Option<Held>)>) {
        let mut state = self.state();
        for (key, held) in rows {
            if let Some(value) = held
                && row_bytes(&key, value.as_deref()) <= ROW_BYTES_MAX
            {
                state.rows.insert(key, value);
            }
        }
        state.generation += 1;
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.state().rows.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn every(_: &[u8]) -> bool {
        true
    }

    fn key(s: &str) -> Vec<u8> {
        s.as_bytes().to_vec()
    }

    #[test]
    fn a_filled_row_is_held_whether_the_key_has_a_value_or_is_absent() {
        let cache = RowCache::default();
        let (generation, values) = cache.look_up(&[key("a"), key("b"), key("c")], every);
        assert_eq!(values, [None, None, None]);
        cache.fill(
            generation,
            [(&b"a"[..], Some(&b"1"[..])), (&b"b"[..], None)],
        );
        assert_eq!(
            cache.look_up(&[key("a"), key("b"), key("c")], every).1,
            [Some(Some(key("1"))), Some(None), None]
        );
    }

    #[test]
    fn a_fill_is_refused_once_a_commit_began_since_the_look_up() {
        let cache = RowCache::default();
        let (before, _) = cache.look_up(&[key("a")], every);
        let held = cache.begin_write().finish();
        // Taken while the commit is under way: refused too.
        let (during, _) = cache.look_up(&[key("a")], every);
        cache.fill(before, [(&b"a"[..], Some(&b"old"[..]))]);
        cache.fill(during, [(&b"a"[..], Some(&b"old"[..]))]);
        cache.end_write(held);
        cache.fill(during, [(&b"a"[..], Some(&b"old"[..]))]);
        assert_eq!(cache.len(), 0);
        let (after, _) = cache.look_up(&[key("a")], every);
        cache.fill(after, [(&b"a"[..], Some(&b"new"[..]))]);
        assert_eq!(
            cache.look_up(&[key("a")], every).1,
            [Some(Some(key("new")))]
        );
    }

    #[test]
    fn a_written_row_is_not_held_during_its_commit_and_comes_back_as_the_commit_left_it() {
        let cache = RowCache::default();
        let (generation, _) = cache.look_up(&[key("a")], every);
        let one = Some(&b"1"[..]);
        let filled = ["a", "b", "c", "f"].map(|k| (k.as_bytes(), one));
        cache.fill(generation, filled.into_iter().chain([(&b"d"[..], None)]));
        let mut writing = cache.begin_write();
        // Last write first: `a`'s earlier value is ignored.
        writing.wrote(b"a", Written::Value(b"2"));
        writing.wrote(b"a", Written::Value(b"stale"));
        writing.wrote(b"c", Written::Removed);
        // `d` was absent: the write that creates it drops its row for good.
        writing.wrote(b"d", Written::Value(b"new"));
        writing.wrote(b"e", Written::Counter(7));
        writing.wrote(b"f", Written::Unknown);
        assert_eq!(cache_rows(&writing), 1);
        let held = writing.finish();
        let all = ["a", "b", "c", "d", "e", "f"].map(key);
        let one = Some(Some(key("1")));
        assert_eq!(
            cache.look_up(&all, every).1,
            [None, one.clone(), None, None, None, None]
        );
        cache.end_write(held);
        assert_eq!(
            cache.look_up(&all, every).1,
            [Some(Some(key("2"))), one, Some(None), None, None, None]
        );
    }

    fn cache_rows(writing: &Writing<'_>) -> usize {
        writing.state.rows.len()
    }

    #[test]
    fn large_rows_are_not_held_and_a_full_cache_is_emptied() {
        let cache = RowCache::default();
        let (generation, _) = cache.look_up(&[key("a")], every);
        let large = vec![0; ROW_BYTES_MAX];
        cache.fill(generation, [(&b"a"[..], Some(&large[..]))]);
        assert_eq!(cache.len(), 0);
        let keys: Vec<Vec<u8>> = (0..ROWS_MAX).map(|i| i.to_be_bytes().to_vec()).collect();
        cache.fill(generation, keys.iter().map(|k| (&k[..], None)));
        assert_eq!(cache.len(), ROWS_MAX);
        cache.fill(generation, [(&b"one more"[..], None)]);
        assert_eq!(cache.len(), 1);
    }
}
