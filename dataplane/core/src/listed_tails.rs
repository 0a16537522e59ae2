//! What a reader of the outboxes keeps of the entries this process's sequencer lists after each
//! commit ([`crate::sequencing::CommitListener::committed_entries`]), shard by shard, so that
//! it need not read them back from the store: fanout keeps the entries, the push notifier
//! their headers.
//!
//! A shard's entries are kept from the moment its reader starts reading the outbox (entries
//! committed before that read are in it, those committed after are listed here), and used once
//! a read reached the outbox's end. Entries below the reader's bound were read from the outbox
//! and are skipped. Anything else drops them (an unlisted commit, a failed or partial use of
//! what was taken, a restarted reader, the bound on the bytes kept), and the next read is from
//! the outbox again. This only holds where every commit to the outboxes read is either listed
//! or told of unlisted: in one process (`courier serve`), not on a cluster's nodes, which
//! keep nothing.

use foldhash::{HashMap, HashMapExt};
use std::collections::VecDeque;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

/// An entry kept: its outbox key, and the bytes it stands for in the bound.
pub trait Listed {
    fn key(&self) -> &[u8];
    fn bytes(&self) -> usize;
}

impl Listed for courier_store::ListedEntry {
    fn key(&self) -> &[u8] {
        &self.key
    }

    fn bytes(&self) -> usize {
        self.bytes
    }
}

/// One shard's entries.
enum Tail<T> {
    /// Kept since a read of the outbox began, which has not reached its end yet.
    Filling(VecDeque<T>),
    /// With the outbox read to its end since they were kept: every entry from the bound on.
    Complete(VecDeque<T>),
}

impl<T: Listed> Tail<T> {
    fn entries(&mut self) -> &mut VecDeque<T> {
        match self {
            Tail::Filling(entries) | Tail::Complete(entries) => entries,
        }
    }

    fn bytes(&self) -> usize {
        match self {
            Tail::Filling(entries) | Tail::Complete(entries) => {
                entries.iter().map(Listed::bytes).sum()
            }
        }
    }
}

/// The entries kept of every shard, at most `max_bytes` of them in all.
pub struct Tails<T> {
    shards: Mutex<HashMap<u32, Tail<T>>>,
    /// What `shards` holds (changed under its lock).
    bytes: AtomicUsize,
    max_bytes: usize,
    keeps: AtomicBool,
}

impl<T: Listed> Tails<T> {
    /// Tails that keep at most `max_bytes` of entries, and nothing until
    /// [`Tails::set_keeping`] says so.
    pub fn new(max_bytes: usize) -> Self {
        Self {
            shards: Mutex::new(HashMap::new()),
            bytes: AtomicUsize::new(0),
            max_bytes,
            keeps: AtomicBool::new(false),
        }
    }

    /// Whether entries are kept from now on: not on a cluster's node, whose outboxes other
    /// nodes write too, nor where a reader is not told of every commit.
    pub fn set_keeping(&self, keeps: bool) {
        self.keeps.store(keeps, Ordering::Relaxed);
        if !keeps {
            self.drop_all();
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u32, Tail<T>>> {
        self.shards.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The next entries of `shard` from `from` on (those below it were read from the outbox),
    /// at most `page`, and whether more are kept; `None` when the outbox must be read, and the
    /// shard's entries are kept from now on.
    pub fn take(&self, shard: u32, from: Option<&[u8]>, page: usize) -> Option<(Vec<T>, bool)> {
        let mut shards = self.lock();
        match shards.get_mut(&shard) {
            Some(Tail::Complete(entries)) => {
                let read = entries
                    .iter()
                    .take_while(|entry| from.is_some_and(|from| entry.key() < from))
                    .count();
                let mut freed: usize = entries.drain(..read).map(|entry| entry.bytes()).sum();
                let taken: Vec<T> = entries.drain(..entries.len().min(page)).collect();
                freed += taken.iter().map(Listed::bytes).sum::<usize>();
                self.bytes.fetch_sub(freed, Ordering::Relaxed);
                Some((taken, !entries.is_empty()))
            }
            Some(Tail::Filling(_)) => None,
            None => {
                if self.keeps.load(Ordering::Relaxed) {
                    shards.insert(shard, Tail::Filling(VecDeque::new()));
                }
                None
            }
        }
    }

    /// `shard`'s outbox was read to its end since its entries were kept: they are complete.
    pub fn complete(&self, shard: u32) {
        let mut shards = self.lock();
        if let Some(tail) = shards.get_mut(&shard)
            && let Tail::Filling(entries) = tail
        {
            *tail = Tail::Complete(std::mem::take(entries));
        }
    }

    /// Keeps `entries`, listed after a commit to `shard`, if the shard's entries are kept;
    /// past the bound on bytes, drops the shard's entries instead.
    pub fn listed(&self, shard: u32, entries: impl IntoIterator<Item = T>) {
        let mut shards = self.lock();
        let Some(tail) = shards.get_mut(&shard) else {
            return;
        };
        let kept = tail.entries();
        let before = kept.len();
        let mut added = 0;
        for entry in entries {
            added += entry.bytes();
            kept.push_back(entry);
        }
        if self.bytes.load(Ordering::Relaxed) + added > self.max_bytes {
            kept.truncate(before);
            self.drop_locked(&mut shards, shard);
        } else {
            self.bytes.fetch_add(added, Ordering::Relaxed);
        }
    }

    /// Drops what is kept of `shard`: its next read is from the outbox.
    pub fn drop_shard(&self, shard: u32) {
        self.drop_locked(&mut self.lock(), shard);
    }

    fn drop_locked(&self, shards: &mut HashMap<u32, Tail<T>>, shard: u32) {
        if let Some(tail) = shards.remove(&shard) {
            self.bytes.fetch_sub(tail.bytes(), Ordering::Relaxed);
        }
    }

    /// Drops what is kept of every shard.
    pub fn drop_all(&self) {
        let mut shards = self.lock();
        shards.clear();
        self.bytes.store(0, Ordering::Relaxed);
    }

    /// The bytes kept.
    pub fn bytes(&self) -> usize {
        self.bytes.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq)]
    struct Entry(u8);

    impl Listed for Entry {
        fn key(&self) -> &[u8] {
            std::slice::from_ref(&self.0)
        }

        fn bytes(&self) -> usize {
            10
        }
    }

    fn keys(taken: Option<(Vec<Entry>, bool)>) -> Option<(Vec<u8>, bool)> {
        taken.map(|(entries, more)| (entries.into_iter().map(|e| e.0).collect(), more))
    }

    #[test]
    fn entries_are_used_once_a_read_reached_the_end_and_those_read_are_skipped() {
        let tails = Tails::new(1_000);
        tails.set_keeping(true);
        // Nothing kept: read the outbox, keeping what is listed from now on.
        assert!(tails.take(1, None, 10).is_none());
        tails.listed(1, [Entry(3), Entry(4)]);
        tails.listed(2, [Entry(9)]);
        assert_eq!(tails.bytes(), 20, "shard 2 keeps nothing: no read began");
        // The read has not reached the end: read again.
        assert!(tails.take(1, Some(&[2]), 10).is_none());
        tails.complete(1);
        tails.listed(1, [Entry(5), Entry(6), Entry(7)]);
        // Entry 3 was in the read (the bound is past it); a page of two.
        assert_eq!(keys(tails.take(1, Some(&[4]), 2)), Some((vec![4, 5], true)));
        assert_eq!(
            keys(tails.take(1, Some(&[6]), 2)),
            Some((vec![6, 7], false))
        );
        assert_eq!(keys(tails.take(1, Some(&[8]), 2)), Some((vec![], false)));
        assert_eq!(tails.bytes(), 0);
    }

    #[test]
    fn an_unlisted_commit_the_bound_or_keeping_nothing_drops_what_is_kept() {
        let tails = Tails::new(25);
        assert!(tails.take(1, None, 10).is_none());
        tails.complete(1);
        tails.listed(1, [Entry(1)]);
        assert!(
            tails.take(1, None, 10).is_none(),
            "nothing kept before it is asked"
        );
        tails.set_keeping(true);
        assert!(tails.take(1, None, 10).is_none());
        tails.complete(1);
        tails.listed(1, [Entry(1), Entry(2)]);
        tails.drop_shard(1);
        assert_eq!(tails.bytes(), 0);
        assert!(tails.take(1, None, 10).is_none(), "read again");
        tails.complete(1);
        tails.listed(1, [Entry(1), Entry(2)]);
        tails.listed(1, [Entry(3)]);
        assert_eq!(tails.bytes(), 0, "30 bytes are past the bound of 25");
        assert!(tails.take(1, None, 10).is_none());
        tails.set_keeping(false);
        tails.complete(1);
        tails.listed(1, [Entry(1)]);
        assert!(tails.take(1, None, 10).is_none());
        assert!(tails.take(1, None, 10).is_none(), "no longer kept");
        assert_eq!(tails.bytes(), 0);
        tails.set_keeping(true);
        assert!(tails.take(1, None, 10).is_none());
        tails.complete(1);
        tails.listed(1, [Entry(1)]);
        assert_eq!(keys(tails.take(1, None, 10)), Some((vec![1], false)));
    }
}
