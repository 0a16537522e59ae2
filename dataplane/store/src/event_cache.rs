//! The embedded engine's cache of recent events: the values of the `ev` keys its writer
//! committed last, per conversation, so that a range read of a conversation's recent events (a
//! device's catch-up after a short absence, a gap fill, a `fetch` of the last page) is answered
//! from memory instead of merging fjall's memtables and tables and reading its blob files.
//!
//! In a reconnect storm (15,000 devices, ten events each) those range reads were ~22 % of the
//! server's CPU, ~4 us per event: a merge of fjall's sources per read, and a blob file read per
//! event flushed (`docs/benchmarks.md`, "Recent events from memory").
//!
//! **What it holds.** For each conversation written to since the process started, a run of
//! consecutive events (seqs `first`, `first + 1`, ...), as the writer committed them: every
//! append is the run's next event. A slot may be a hole (an event rewritten or cleared while
//! its group commits). Only event keys of the database's root, `("ev", conv, seq)`, which
//! `courier serve` and a store node write; other roots are read from fjall as before.
//!
//! **Exact, never stale.** Only the writer changes the cache, in step with each group commit:
//! 1. before the commit, every held event the group writes or clears becomes a hole
//!    ([`EventCache::forget`]), so that while the commit is under way those events are read from
//!    fjall, which shows the new values as soon as the commit is applied;
//! 2. after it, once its callers have their answers, the group's writes are applied to the
//!    cache in order ([`EventCache::hold`]): appends and rewrites held (their bytes moved from
//!    the batches, not copied), clears made holes or trimmed away.
//!
//! A read is answered from the cache only when it asks for a range of one conversation with
//! both ends given and the cache holds every event of it ([`EventCache::read`]); otherwise
//! fjall answers, as before. A held event always equals the store's value, so either answer is
//! the same.
//!
//! **Bounded.** At most the budget it is given (`--store-event-cache`), counted as the events'
//! bytes plus an estimate of what holding each costs; over it, the conversation written to
//! least recently is dropped whole (an old conversation's events go before a live one's). A
//! run keeps at most [`RUN_EVENTS_MAX`] events, its oldest dropped first.

use crate::keys::Keys;
use crate::kv::{EventCacheTotals, KeyValue, Mutation};
use foldhash::HashMap;
use std::collections::VecDeque;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

/// Most events a conversation's run holds: a device that missed more in one conversation
/// reads the older ones from fjall.
pub const RUN_EVENTS_MAX: usize = 1024;

/// What holding one event costs beyond its bytes (its slot, its allocation): an estimate,
/// for the budget.
const EVENT_OVERHEAD_BYTES: usize = 64;

/// What a conversation's run costs beyond its events (its map entry, its key part).
const RUN_OVERHEAD_BYTES: usize = 128;

/// What an entry of the order of writes costs.
const WRITE_BYTES: usize = 32;

pub struct EventCache {
    /// Event keys are those of the database's root.
    keys: Keys,
    budget: usize,
    state: Mutex<Held>,
    /// Reads of one conversation's events answered here, and those that were not.
    held: AtomicU64,
    missed: AtomicU64,
}

#[derive(Default)]
struct Held {
    /// By the conversation's part of its event keys ([`Keys::event_parts`]).
    runs: HashMap<Arc<[u8]>, Run>,
    /// The conversations in the order they were written to, an entry per conversation and
    /// group commit: an entry older than its run's last write is passed over when evicting.
    writes: VecDeque<(Arc<[u8]>, u64)>,
    /// Counts the groups held ([`EventCache::hold`]), to tell an entry of `writes` from its
    /// run's last one.
    holds: u64,
    /// What the runs and `writes` cost, as the budget counts it.
    bytes: usize,
}

/// Consecutive events of one conversation: `values[i]` is seq `first + i`, `None` a hole.
struct Run {
    conversation: Arc<[u8]>,
    first: u64,
    values: VecDeque<Option<Vec<u8>>>,
    /// The group commit that wrote to it last (`Held::holds`).
    last_write: u64,
}

/// What the budget counts for a slot of a run.
fn slot_bytes(value: &Option<Vec<u8>>) -> usize {
    EVENT_OVERHEAD_BYTES + value.as_ref().map_or(0, Vec::len)
}

impl Run {
    fn end(&self) -> u64 {
        self.first + self.values.len() as u64
    }

    fn slot(&mut self, seq: u64) -> Option<&mut Option<Vec<u8>>> {
        let index = usize::try_from(seq.checked_sub(self.first)?).ok()?;
        self.values.get_mut(index)
    }

    /// Drops its oldest event; what the budget counted for it.
    fn pop_front(&mut self) -> usize {
        let popped = self.values.pop_front().map_or(0, |v| slot_bytes(&v));
        self.first += 1;
        popped
    }

    fn bytes(&self) -> usize {
        RUN_OVERHEAD_BYTES + self.values.iter().map(slot_bytes).sum::<usize>()
    }
}

impl EventCache {
    /// An empty cache that holds at most `budget` bytes (0: holds nothing).
    pub fn new(budget: u64) -> Self {
        Self {
            keys: Keys::new(&[]),
            budget: usize::try_from(budget).unwrap_or(usize::MAX),
            state: Mutex::default(),
            held: AtomicU64::new(0),
            missed: AtomicU64::new(0),
        }
    }

    /// What the cache has answered so far.
    pub fn totals(&self) -> EventCacheTotals {
        EventCacheTotals {
            held: self.held.load(Ordering::Relaxed),
            missed: self.missed.load(Ordering::Relaxed),
        }
    }

    fn state(&self) -> MutexGuard<'_, Held> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The events of `range` (at most `limit`), if it is a range of one conversation's events
    /// with both ends given and the cache holds every one of them; `None` otherwise.
    pub fn read(&self, range: &Range<Vec<u8>>, limit: usize) -> Option<Vec<KeyValue>> {
        let (conversation, from) = self.keys.event_parts(&range.start)?;
        let (end_conversation, to) = self.keys.event_parts(&range.end)?;
        if conversation != end_conversation || to <= from || limit == 0 {
            return None;
        }
        let wanted = usize::try_from(to - from).map_or(limit, |n| n.min(limit));
        let events = self.held_events(conversation, from, wanted);
        let answered = if events.is_some() {
            &self.held
        } else {
            &self.missed
        };
        answered.fetch_add(1, Ordering::Relaxed);
        events
    }

    /// The `wanted` events of the conversation from seq `from`, if every one is held.
    fn held_events(&self, conversation: &[u8], from: u64, wanted: usize) -> Option<Vec<KeyValue>> {
        let state = self.state();
        let run = state.runs.get(conversation)?;
        let skip = usize::try_from(from.checked_sub(run.first)?).ok()?;
        if skip + wanted > run.values.len() {
            return None;
        }
        run.values
            .range(skip..skip + wanted)
            .zip(from..)
            .map(|(value, seq)| {
                let value = value.as_ref()?.clone();
                Some((Keys::event_from_parts(conversation, seq), value))
            })
            .collect()
    }

    /// The most it holds, in bytes.
    pub fn budget(&self) -> usize {
        self.budget
    }

    /// How many groups it has held: it changes with what it holds.
    pub fn holds(&self) -> u64 {
        self.state().holds
    }

    /// The conversations held, at most `max`, the one written to last first (those warmed
    /// after a restart and not written to since last), each named by the key of the first
    /// event its run holds: what a restarted engine warms the cache from (`crate::warm_up`).
    /// The lock is held only to copy what names them.
    pub fn recent(&self, max: usize) -> Vec<Vec<u8>> {
        let mut runs: Vec<(u64, Arc<[u8]>, u64)> = {
            let state = self.state();
            let runs = state.runs.values();
            runs.map(|run| (run.last_write, run.conversation.clone(), run.first))
                .collect()
        };
        runs.sort_unstable_by_key(|run| std::cmp::Reverse(run.0));
        runs.into_iter()
            .take(max)
            .map(|(_, conversation, first)| Keys::event_from_parts(&conversation, first))
            .collect()
    }

    /// The keys of the events of `key`'s conversation from `key`'s on, if `key` is one of the
    /// event keys the cache holds (as [`EventCache::recent`] names them).
    pub fn events_from(&self, key: &[u8]) -> Option<Range<Vec<u8>>> {
        let (conversation, _) = self.keys.event_parts(key)?;
        Some(key.to_vec()..Keys::event_from_parts(conversation, u64::MAX))
    }

    /// Holds `events`, one conversation's events in seq order as the store has them now (its
    /// last [`RUN_EVENTS_MAX`] seqs kept, a seq missing among them a hole). The writer calls it
    /// between two group commits, when no event is being written. A conversation written to
    /// since the engine opened keeps its place in the order of writes; another is taken as
    /// written to before every one held. Returns false, holding nothing, when they do not fit
    /// in what is left of the budget.
    pub fn warm(&self, events: Vec<KeyValue>) -> bool {
        let parsed: Vec<_> = events
            .into_iter()
            .filter_map(|(key, value)| {
                let (conversation, seq) = self.keys.event_parts(&key)?;
                Some((conversation.len(), seq, key, value))
            })
            .collect();
        let Some((length, last, key, _)) = parsed.last() else {
            return true;
        };
        let conversation: Arc<[u8]> = Arc::from(&key[..*length]);
        let floor = last.saturating_sub(RUN_EVENTS_MAX as u64 - 1);
        let mut run = Run {
            conversation: conversation.clone(),
            first: 0,
            values: VecDeque::new(),
            last_write: 0,
        };
        for (length, seq, key, value) in parsed {
            if seq < floor || key[..length] != *conversation {
                continue;
            }
            if run.values.is_empty() {
                run.first = seq;
            }
            while run.end() < seq {
                run.values.push_back(None);
            }
            if run.end() == seq {
                run.values.push_back(Some(value));
            }
        }
        let mut state = self.state();
        let (replaced, order) = match state.runs.get(&conversation) {
            Some(held) => (
                held.bytes(),
                Some((held.conversation.clone(), held.last_write)),
            ),
            None => (0, None),
        };
        let added = run.bytes() + if order.is_some() { 0 } else { WRITE_BYTES };
        let bytes = state.bytes - replaced + added;
        if bytes > self.budget {
            return false;
        }
        state.bytes = bytes;
        match order {
            Some((conversation, last_write)) => {
                run.conversation = conversation;
                run.last_write = last_write;
            }
            None => state.writes.push_front((run.conversation.clone(), 0)),
        }
        state.runs.insert(run.conversation.clone(), run);
        true
    }

    /// Before a group commits: every held event that `mutations` write or clear becomes a
    /// hole (or is dropped), so that none is read from here while the commit is under way.
    pub fn forget<'a>(&self, mutations: impl IntoIterator<Item = &'a Mutation>) {
        if self.budget == 0 {
            return;
        }
        let mut state = None;
        for mutation in mutations {
            let state = state.get_or_insert_with(|| self.state());
            match mutation {
                Mutation::ClearRange { begin, end } => self.clear_range(state, begin, end),
                Mutation::Set { key, .. }
                | Mutation::Clear { key }
                | Mutation::Max { key, .. }
                | Mutation::Add { key, .. } => self.clear(state, key),
                // Versionstamped keys are outbox entries, never events.
                Mutation::SetVersionstampedKey { .. } => {}
            }
        }
    }

    /// After a group committed: its applied batches' `mutations`, in order, change the cache
    /// as they changed the store. The events they set are held (moved, not copied).
    pub fn hold(&self, mutations: impl IntoIterator<Item = Mutation>) {
        if self.budget == 0 {
            return;
        }
        let mut state = self.state();
        state.holds += 1;
        let hold = state.holds;
        for mutation in mutations {
            match mutation {
                Mutation::Set { key, value } => self.set(&mut state, &key, value, hold),
                Mutation::ClearRange { begin, end } => self.clear_range(&mut state, &begin, &end),
                Mutation::Clear { key } | Mutation::Max { key, .. } | Mutation::Add { key, .. } => {
                    self.clear(&mut state, &key)
                }
                Mutation::SetVersionstampedKey { .. } => {}
            }
        }
        let evicted = Self::evict(&mut state, self.budget);
        // Freed once the lock is let go: reads wait on it.
        drop(state);
        drop(evicted);
    }

    /// `key` was set to `value`: the run's next event, or a held one rewritten. `hold` numbers
    /// the call that applies it, the run's last write.
    fn set(&self, state: &mut Held, key: &[u8], value: Vec<u8>, hold: u64) {
        let Some((conversation, seq)) = self.keys.event_parts(key) else {
            return;
        };
        let value = Some(value);
        let run = match state.runs.get_mut(conversation) {
            Some(run) => run,
            None => {
                let conversation: Arc<[u8]> = Arc::from(conversation);
                let run = Run {
                    conversation: conversation.clone(),
                    first: seq,
                    values: VecDeque::new(),
                    last_write: 0,
                };
                state.bytes += RUN_OVERHEAD_BYTES;
                state.runs.entry(conversation).or_insert(run)
            }
        };
        if seq == run.end() {
            state.bytes += slot_bytes(&value);
            run.values.push_back(value);
            if run.values.len() > RUN_EVENTS_MAX {
                state.bytes -= run.pop_front();
            }
        } else if let Some(slot) = run.slot(seq) {
            state.bytes = state.bytes + slot_bytes(&value) - slot_bytes(slot);
            *slot = value;
        } else if seq > run.end() {
            // The events between were not written here: the run begins again at `seq`.
            state.bytes = state.bytes + slot_bytes(&value) + RUN_OVERHEAD_BYTES - run.bytes();
            run.first = seq;
            run.values.clear();
            run.values.push_back(value);
        } else {
            // An event older than the run, rewritten: not held.
            return;
        }
        if run.last_write != hold {
            run.last_write = hold;
            state.writes.push_back((run.conversation.clone(), hold));
            state.bytes += WRITE_BYTES;
        }
    }

    /// `key` was cleared, or is about to be written: a held event becomes a hole.
    fn clear(&self, state: &mut Held, key: &[u8]) {
        let Some((conversation, seq)) = self.keys.event_parts(key) else {
            return;
        };
        if let Some(slot) = state.runs.get_mut(conversation).and_then(|r| r.slot(seq)) {
            state.bytes = state.bytes + slot_bytes(&None) - slot_bytes(slot);
            *slot = None;
        }
    }

    /// Keys in `[begin, end)` were cleared, or are about to be: the events held among them
    /// are trimmed from their run's front, or dropped with every later one of the run; a
    /// range across conversations empties the cache.
    fn clear_range(&self, state: &mut Held, begin: &[u8], end: &[u8]) {
        let events = self.keys.all_events();
        if end <= events.start.as_slice() || events.end.as_slice() <= begin {
            return;
        }
        let one = match (self.keys.event_parts(begin), self.keys.event_parts(end)) {
            (Some((c, from)), Some((c2, to))) if c == c2 => Some((c, from, to)),
            _ => None,
        };
        let Some((conversation, from, to)) = one else {
            let runs = std::mem::take(&mut state.runs);
            state.bytes -= runs.values().map(Run::bytes).sum::<usize>();
            return;
        };
        let Some(run) = state.runs.get_mut(conversation) else {
            return;
        };
        if from <= run.first {
            while run.first < to && !run.values.is_empty() {
                state.bytes -= run.pop_front();
            }
        } else if from < run.end()
            && let Ok(kept) = usize::try_from(from - run.first)
        {
            state.bytes -= run.values.range(kept..).map(slot_bytes).sum::<usize>();
            run.values.truncate(kept);
        }
        if run.values.is_empty() {
            state.runs.remove(conversation);
            state.bytes -= RUN_OVERHEAD_BYTES;
        }
    }

    /// Drops the conversations written to least recently until the cache is within `budget`,
    /// and returns them, to be freed outside the lock.
    fn evict(state: &mut Held, budget: usize) -> Vec<Run> {
        let mut evicted = Vec::new();
        while state.bytes > budget {
            let Some((conversation, write)) = state.writes.pop_front() else {
                break;
            };
            state.bytes -= WRITE_BYTES;
            let last = state.runs.get(&conversation).map(|run| run.last_write);
            if last == Some(write)
                && let Some(run) = state.runs.remove(&conversation)
            {
                state.bytes -= run.bytes();
                evicted.push(run);
            }
        }
        evicted
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys() -> Keys {
        Keys::new(&[])
    }

    fn set(conv: &str, seq: u64, value: &str) -> Mutation {
        Mutation::Set {
            key: keys().event(conv, seq),
            value: value.as_bytes().to_vec(),
        }
    }

    /// Appends `seqs` of `conv` (each value `conv:seq`) as one group.
    fn append(cache: &EventCache, conv: &str, seqs: Range<u64>) {
        let writes: Vec<Mutation> = seqs.map(|s| set(conv, s, &format!("{conv}:{s}"))).collect();
        cache.forget(&writes);
        cache.hold(writes);
    }

    /// Reads `(after, through]` of `conv` as the store asks: both ends given.
    fn read(cache: &EventCache, conv: &str, after: u64, through: u64) -> Option<Vec<String>> {
        let range = keys().events(conv, after + 1, through + 1);
        let events = cache.read(&range, usize::MAX)?;
        for (seq, (key, _)) in (after + 1..).zip(&events) {
            assert_eq!(key, &keys().event(conv, seq));
        }
        Some(
            events
                .into_iter()
                .map(|(_, v)| String::from_utf8(v).unwrap())
                .collect(),
        )
    }

    #[test]
    fn a_range_is_answered_only_when_every_event_of_it_is_held() {
        let cache = EventCache::new(1 << 20);
        append(&cache, "a", 5..9);
        assert_eq!(read(&cache, "a", 5, 7).unwrap(), ["a:6", "a:7"]);
        assert_eq!(read(&cache, "a", 4, 8).unwrap().len(), 4);
        // Below the run, beyond it, another conversation: from fjall.
        assert_eq!(read(&cache, "a", 3, 6), None);
        assert_eq!(read(&cache, "a", 7, 9), None);
        assert_eq!(read(&cache, "b", 4, 6), None);
        // An open end: the first events, if held (seqs are dense), else from fjall.
        let open = keys().events("a", 6, u64::MAX);
        assert_eq!(cache.read(&open, 3).unwrap().len(), 3);
        assert_eq!(cache.read(&open, 4), None);
        // A limit shorter than the range reads its first events.
        let range = keys().events("a", 6, 9);
        assert_eq!(cache.read(&range, 2).unwrap().len(), 2);
        // Keys of another root or subspace are never held.
        let other = Keys::new(b"t");
        cache.hold([Mutation::Set {
            key: other.event("c", 1),
            value: b"x".to_vec(),
        }]);
        assert_eq!(cache.read(&other.events("c", 1, 2), 1), None);
        assert_eq!(cache.read(&keys().events("c", 1, 2), 1), None);
    }

    #[test]
    fn a_write_under_way_is_never_read_from_the_cache_and_is_held_once_committed() {
        let cache = EventCache::new(1 << 20);
        append(&cache, "a", 1..4);
        // A delete for everyone rewrites event 2: a hole while its group commits.
        let rewrite = vec![set("a", 2, "deleted")];
        cache.forget(&rewrite);
        assert_eq!(read(&cache, "a", 0, 3), None);
        assert_eq!(read(&cache, "a", 2, 3).unwrap(), ["a:3"]);
        cache.hold(rewrite);
        assert_eq!(read(&cache, "a", 0, 3).unwrap(), ["a:1", "deleted", "a:3"]);
        // A cleared event stays a hole.
        let clear = vec![Mutation::Clear {
            key: keys().event("a", 1),
        }];
        cache.forget(&clear);
        cache.hold(clear);
        assert_eq!(read(&cache, "a", 0, 1), None);
        assert_eq!(read(&cache, "a", 1, 3).unwrap().len(), 2);
    }

    #[test]
    fn appends_extend_a_run_and_a_gap_begins_it_again() {
        let cache = EventCache::new(1 << 20);
        append(&cache, "a", 1..3);
        append(&cache, "a", 3..4);
        assert_eq!(read(&cache, "a", 0, 3).unwrap().len(), 3);
        // An event older than the run, rewritten, is not held; nor is the run changed.
        cache.hold([set("a", 0, "old")]);
        assert_eq!(read(&cache, "a", 0, 3).unwrap()[0], "a:1");
        // Events 4-9 were written elsewhere (before a restart): the run restarts at 10.
        append(&cache, "a", 10..12);
        assert_eq!(read(&cache, "a", 0, 1), None);
        assert_eq!(read(&cache, "a", 9, 11).unwrap(), ["a:10", "a:11"]);
    }

    #[test]
    fn a_cleared_range_trims_its_run_and_a_range_across_conversations_empties_the_cache() {
        let cache = EventCache::new(1 << 20);
        append(&cache, "a", 1..11);
        append(&cache, "b", 1..3);
        // Retention: events below the new floor 4.
        let trim = keys().events("a", 0, 4);
        let clear = |range: Range<Vec<u8>>| Mutation::ClearRange {
            begin: range.start,
            end: range.end,
        };
        cache.hold([clear(trim)]);
        assert_eq!(read(&cache, "a", 2, 4), None);
        assert_eq!(read(&cache, "a", 3, 10).unwrap().len(), 7);
        // A range inside the run drops it from there on.
        cache.hold([clear(keys().events("a", 8, 9))]);
        assert_eq!(read(&cache, "a", 3, 7).unwrap().len(), 4);
        assert_eq!(read(&cache, "a", 7, 9), None);
        // A range that is not a conversation's events, but overlaps them: all go.
        cache.hold([clear(vec![0x02]..keys().event("a", 5))]);
        assert_eq!(read(&cache, "a", 3, 4), None);
        assert_eq!(read(&cache, "b", 0, 2), None);
        // One that does not overlap them changes nothing.
        append(&cache, "b", 1..3);
        cache.hold([clear(keys().all_events().end..vec![0xff])]);
        assert_eq!(read(&cache, "b", 0, 2).unwrap().len(), 2);
    }

    #[test]
    fn over_its_budget_the_conversation_written_to_least_recently_goes_first() {
        let event = EVENT_OVERHEAD_BYTES + "a:1".len();
        let run = RUN_OVERHEAD_BYTES + WRITE_BYTES + 3 * event;
        let cache = EventCache::new((3 * run) as u64);
        for conv in ["a", "b", "c"] {
            append(&cache, conv, 1..4);
        }
        assert_eq!(cache.state().bytes, 3 * run);
        // `a` written again: `b` is now the least recent, and goes when `d` comes.
        append(&cache, "a", 4..5);
        append(&cache, "d", 1..2);
        assert_eq!(read(&cache, "b", 0, 3), None);
        assert_eq!(read(&cache, "a", 0, 4).unwrap().len(), 4);
        assert_eq!(read(&cache, "c", 0, 3).unwrap().len(), 3);
        assert!(cache.state().bytes <= 3 * run);
        // Nothing is held without a budget.
        let none = EventCache::new(0);
        append(&none, "a", 1..2);
        assert_eq!(read(&none, "a", 0, 1), None);
    }

    #[test]
    fn a_run_keeps_its_last_events_only() {
        let cache = EventCache::new(1 << 30);
        append(&cache, "a", 1..RUN_EVENTS_MAX as u64 + 11);
        assert_eq!(read(&cache, "a", 0, 11), None);
        let last = RUN_EVENTS_MAX as u64 + 10;
        assert_eq!(read(&cache, "a", 10, last).unwrap().len(), RUN_EVENTS_MAX);
        let state = cache.state();
        let held: usize = state.runs.values().map(Run::bytes).sum();
        assert_eq!(state.bytes, held + state.writes.len() * WRITE_BYTES);
    }

    /// Warms `cache` with `conv`'s events `seqs` as the store would give them.
    fn warm(cache: &EventCache, conv: &str, seqs: impl IntoIterator<Item = u64>) -> bool {
        let events = seqs
            .into_iter()
            .map(|s| (keys().event(conv, s), format!("{conv}:{s}").into_bytes()))
            .collect();
        cache.warm(events)
    }

    #[test]
    fn the_conversations_held_are_named_the_latest_first_by_their_first_event() {
        let cache = EventCache::new(1 << 20);
        append(&cache, "a", 1..4);
        append(&cache, "b", 7..9);
        append(&cache, "a", 4..5);
        append(&cache, "c", 2..3);
        let first = |conv, seq| keys().event(conv, seq);
        assert_eq!(
            cache.recent(10),
            [first("c", 2), first("a", 1), first("b", 7)]
        );
        assert_eq!(cache.recent(2), [first("c", 2), first("a", 1)]);
        assert_eq!(
            cache.events_from(&first("a", 2)),
            Some(first("a", 2)..first("a", u64::MAX))
        );
        assert_eq!(cache.events_from(b"not an event"), None);
    }

    #[test]
    fn a_warmed_run_is_read_with_its_holes_and_goes_before_the_runs_written_since() {
        let event = EVENT_OVERHEAD_BYTES + "a:1".len();
        let run = RUN_OVERHEAD_BYTES + WRITE_BYTES + 3 * event;
        let cache = EventCache::new((3 * run) as u64);
        // Written since the engine opened: `c`.
        append(&cache, "c", 1..4);
        // The note's conversations, the latest first; `a` lacks seq 3 (cleared).
        assert!(warm(&cache, "b", 1..4));
        assert!(warm(&cache, "a", [2, 4]));
        assert_eq!(read(&cache, "a", 1, 2).unwrap(), ["a:2"]);
        assert_eq!(read(&cache, "a", 1, 4), None);
        assert_eq!(read(&cache, "a", 3, 4).unwrap(), ["a:4"]);
        assert_eq!(read(&cache, "b", 0, 3).unwrap().len(), 3);
        // Warmed runs are taken as written to before `c`.
        let mut order = cache.recent(10);
        assert_eq!(order.remove(0), keys().event("c", 1));
        order.sort();
        assert_eq!(order, [keys().event("a", 2), keys().event("b", 1)]);
        // The budget is full: a conversation that does not fit is not held.
        assert!(!warm(&cache, "d", 1..4));
        assert_eq!(read(&cache, "d", 0, 3), None);
        // `e` written comes in and the oldest warmed run, `a`, leaves first.
        append(&cache, "e", 1..3);
        assert_eq!(read(&cache, "a", 1, 2), None);
        assert_eq!(read(&cache, "b", 0, 3).unwrap().len(), 3);
        assert_eq!(read(&cache, "c", 0, 3).unwrap().len(), 3);
        let state = cache.state();
        let held: usize = state.runs.values().map(Run::bytes).sum();
        assert_eq!(state.bytes, held + state.writes.len() * WRITE_BYTES);
    }

    #[test]
    fn a_conversation_written_since_the_open_is_warmed_whole_and_keeps_its_place() {
        let cache = EventCache::new(1 << 20);
        append(&cache, "a", 9..11);
        append(&cache, "b", 1..2);
        assert_eq!(read(&cache, "a", 5, 10), None);
        // The store's events 6-10 of `a`, read between two commits, include those held.
        assert!(warm(&cache, "a", 6..11));
        assert_eq!(read(&cache, "a", 5, 10).unwrap().len(), 5);
        assert_eq!(
            cache.recent(10),
            [keys().event("b", 1), keys().event("a", 6)]
        );
        // Only the last `RUN_EVENTS_MAX` seqs are held, and an empty read holds nothing.
        assert!(warm(&cache, "c", 1..RUN_EVENTS_MAX as u64 + 6));
        assert_eq!(read(&cache, "c", 4, 5), None);
        assert_eq!(read(&cache, "c", 5, 6).unwrap(), ["c:6"]);
        assert!(cache.warm(Vec::new()));
        let state = cache.state();
        let held: usize = state.runs.values().map(Run::bytes).sum();
        assert_eq!(state.bytes, held + state.writes.len() * WRITE_BYTES);
    }
}
