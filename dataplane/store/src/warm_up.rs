//! The recent events' cache (`crate::event_cache`) across a restart: the engine notes in a
//! file of its directory which conversations the cache holds, and an engine opened on that
//! directory reads their last events back into the cache while its writer has nothing to
//! commit.
//!
//! A reconnect storm is likeliest right after a restart (a deploy, a crash), when the cache
//! would otherwise be empty and every catch-up would merge fjall's sources and read its blob
//! files again (`docs/benchmarks.md`, "Recent events after a restart").
//!
//! **The note** ([`NOTE_FILE`]) names each conversation by the key of the first event its run
//! held, the one written to last first, at most [`NOTE_CONVERSATIONS_MAX`]. The store's upkeep
//! thread writes it every [`NOTE_PERIOD`] if the cache has changed, off the writer's path; the
//! process writes it once more as it stops ([`crate::KvEngine::closing`]), and the writer when
//! the engine is dropped. It goes to a temporary file renamed over the
//! old one, without an fsync: it only says what to read, so a note lost or torn by a crash (or
//! in an unknown format) is ignored with a warning, and the cache fills as it would have.
//!
//! **Exact.** The writer reads each conversation's events from the store between two group
//! commits, when none is under way and the cache holds every group committed: what it holds
//! is what the store has (`EventCache::warm`).
//!
//! **Bounded.** A step of the warm-up reads [`WARM_STEP`] conversations or [`WARM_STEP_EVENTS`]
//! events, whichever comes first, after which the writer takes the commits that came
//! meanwhile. The conversations are read in key order, neighbours in fjall's tables and blob
//! files; the warm-up ends at the first that does not fit in the cache's budget, which only a
//! budget smaller than the one the note was written with comes to.

use crate::event_cache::EventCache;
use crate::kv::{KeyValue, StoreError};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The note's name in the store's directory.
pub const NOTE_FILE: &str = "recent-events";

/// How often, at most, the note is written while the engine runs.
pub const NOTE_PERIOD: Duration = Duration::from_secs(30);

/// Most conversations the note names (~3 MB).
pub const NOTE_CONVERSATIONS_MAX: usize = 65_536;

/// Most conversations read per step of the warm-up.
const WARM_STEP: usize = 16;

/// A step of the warm-up ends once it has read this many events (~1 ms of the writer), even
/// before [`WARM_STEP`] conversations: a commit that comes waits for the step.
const WARM_STEP_EVENTS: usize = 1024;

/// The note's first bytes: its format.
const MAGIC: &[u8] = b"courier recent events 1\n";

/// The note of a store's directory: which conversations the recent events' cache holds
/// (module documentation). Written by the store's upkeep thread, [`crate::KvEngine::closing`]
/// and the writer as it ends, one at a time.
pub struct Note {
    path: PathBuf,
    /// The cache's [`EventCache::holds`] when the note was last written or read, and when.
    noted: Mutex<(u64, Instant)>,
}

impl Note {
    /// The note of the store in `dir`, taken as up to date with `cache`.
    pub fn new(dir: &Path, cache: &EventCache) -> Self {
        Self {
            path: dir.join(NOTE_FILE),
            noted: Mutex::new((cache.holds(), Instant::now())),
        }
    }

    /// The conversations it names (by the key of their first event held, the latest first),
    /// if the cache has a budget.
    pub fn read(&self, cache: &EventCache) -> Vec<Vec<u8>> {
        if cache.budget() == 0 {
            return Vec::new();
        }
        read_note(&self.path)
    }

    /// Writes the note if the cache has changed since it was last written, and, when
    /// `periodic`, [`NOTE_PERIOD`] has passed. True if it was written.
    pub fn write(&self, cache: &EventCache, periodic: bool) -> bool {
        if cache.budget() == 0 {
            return false;
        }
        let mut noted = self.noted.lock().unwrap_or_else(|e| e.into_inner());
        // The clock first: the upkeep thread asks many times a second.
        if periodic && noted.1.elapsed() < NOTE_PERIOD {
            return false;
        }
        let holds = cache.holds();
        if holds == noted.0 {
            return false;
        }
        *noted = (holds, Instant::now());
        let keys = cache.recent(NOTE_CONVERSATIONS_MAX);
        let temporary = self.path.with_extension("new");
        let written = std::fs::write(&temporary, encode(&keys))
            .and_then(|()| std::fs::rename(&temporary, &self.path));
        if let Err(e) = written {
            tracing::warn!(
                error = %e,
                path = %self.path.display(),
                "could not note which conversations the recent events' cache holds; \
                 after a restart it fills as events are written"
            );
        }
        true
    }
}

/// What the store's writer does for the recent events' cache with the time it has nothing to
/// commit (module documentation).
pub struct WarmUp {
    /// Conversations still to read, by the key of their first event, in key order.
    pending: std::vec::IntoIter<Vec<u8>>,
    began: Instant,
    warmed: usize,
}

impl WarmUp {
    /// A warm-up of the cache with the conversations `note` names.
    pub fn new(note: &Note, cache: &EventCache) -> Self {
        let mut pending = note.read(cache);
        pending.sort_unstable();
        if !pending.is_empty() {
            tracing::info!(
                conversations = pending.len(),
                "warming the recent events' cache with the conversations it held before the restart"
            );
        }
        Self {
            pending: pending.into_iter(),
            began: Instant::now(),
            warmed: 0,
        }
    }

    /// A step of the warm-up, in the writer's idle time. `read` reads up to
    /// [`crate::event_cache::RUN_EVENTS_MAX`] pairs of a range, the last ones, in key order.
    /// False once the warm-up is over.
    pub fn step(
        &mut self,
        cache: &EventCache,
        mut read: impl FnMut(Range<Vec<u8>>) -> Result<Vec<KeyValue>, StoreError>,
    ) -> bool {
        if self.pending.as_slice().is_empty() {
            return false;
        }
        let mut read_events = 0;
        for key in self.pending.by_ref().take(WARM_STEP) {
            let Some(range) = cache.events_from(&key) else {
                continue;
            };
            let events = match read(range) {
                Ok(events) => events,
                Err(e) => {
                    tracing::warn!(error = %e, "warming the recent events' cache stopped");
                    self.pending = Vec::new().into_iter();
                    return true;
                }
            };
            read_events += events.len();
            if !cache.warm(events) {
                self.pending = Vec::new().into_iter();
                break;
            }
            self.warmed += 1;
            if read_events >= WARM_STEP_EVENTS {
                break;
            }
        }
        if self.pending.as_slice().is_empty() {
            tracing::info!(
                conversations = self.warmed,
                took_ms = self.began.elapsed().as_millis() as u64,
                "the recent events' cache is warm"
            );
        }
        true
    }
}

/// The conversations a note names; none, with a warning, if it cannot be read.
fn read_note(path: &Path) -> Vec<Vec<u8>> {
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Vec::new(),
        Err(e) => {
            tracing::warn!(error = %e, path = %path.display(), "could not read the recent events' note");
            return Vec::new();
        }
    };
    decode(&bytes).unwrap_or_else(|| {
        tracing::warn!(
            path = %path.display(),
            "the recent events' note is torn or of another format; the cache starts empty"
        );
        Vec::new()
    })
}

/// [`MAGIC`], then each key as its length (u32 LE) and its bytes.
fn encode(keys: &[Vec<u8>]) -> Vec<u8> {
    let length: usize = keys.iter().map(|key| key.len() + 4).sum();
    let mut bytes = Vec::with_capacity(MAGIC.len() + length);
    bytes.extend_from_slice(MAGIC);
    for key in keys {
        // Keys are at most `MAX_KEY_BYTES`.
        let Ok(length) = u32::try_from(key.len()) else {
            continue;
        };
        bytes.extend_from_slice(&length.to_le_bytes());
        bytes.extend_from_slice(key);
    }
    bytes
}

/// The keys of a note; `None` unless it is whole and of this format.
fn decode(bytes: &[u8]) -> Option<Vec<Vec<u8>>> {
    let mut rest = bytes.strip_prefix(MAGIC)?;
    let mut keys = Vec::new();
    while !rest.is_empty() {
        let (length, after) = rest.split_first_chunk::<4>()?;
        let length = usize::try_from(u32::from_le_bytes(*length)).ok()?;
        if length > after.len() {
            return None;
        }
        let (key, after) = after.split_at(length);
        keys.push(key.to_vec());
        rest = after;
    }
    Some(keys)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::Keys;

    #[test]
    fn a_note_reads_back_as_written_and_a_torn_one_not_at_all() {
        let keys = vec![Keys::new(&[]).event("a", 3), Vec::new(), vec![7; 300]];
        let bytes = encode(&keys);
        assert_eq!(decode(&bytes), Some(keys));
        for torn in [1, MAGIC.len() + 2, bytes.len() - 1] {
            assert_eq!(decode(&bytes[..torn]), None, "{torn} bytes");
        }
        assert_eq!(decode(b"courier recent events 2\n"), None);
        assert_eq!(decode(MAGIC), Some(Vec::new()));
    }

    /// Appends seqs `1..=n` of `conv` to `cache` as one committed group.
    fn append(cache: &EventCache, conv: &str, n: u64) {
        let writes: Vec<_> = (1..=n)
            .map(|seq| crate::kv::Mutation::Set {
                key: Keys::new(&[]).event(conv, seq),
                value: format!("{conv}:{seq}").into_bytes(),
            })
            .collect();
        cache.forget(&writes);
        cache.hold(writes);
    }

    #[test]
    fn the_note_is_written_when_the_cache_changed_and_periodically_once_due() {
        let dir = tempfile::tempdir().unwrap();
        let cache = EventCache::new(1 << 20);
        let note = Note::new(dir.path(), &cache);
        // Unchanged: nothing to write, and a missing note names nothing.
        assert!(!note.write(&cache, false));
        assert_eq!(note.read(&cache), Vec::<Vec<u8>>::new());
        append(&cache, "a", 2);
        append(&cache, "b", 1);
        // Changed, but not due: only the stop writes it.
        assert!(!note.write(&cache, true));
        assert!(note.write(&cache, false));
        let keys = Keys::new(&[]);
        assert_eq!(note.read(&cache), [keys.event("b", 1), keys.event("a", 1)]);
        assert!(!note.write(&cache, false));
        // A torn note names nothing; nor does one for a cache without a budget.
        std::fs::write(
            dir.path().join(NOTE_FILE),
            &encode(&[keys.event("a", 1)])[..30],
        )
        .unwrap();
        assert_eq!(note.read(&cache), Vec::<Vec<u8>>::new());
        let none = EventCache::new(0);
        append(&none, "a", 1);
        let unused = Note::new(dir.path(), &none);
        assert!(!unused.write(&none, false));
    }

    #[test]
    fn a_warm_up_reads_in_steps_and_stops_at_an_error_or_a_full_cache() {
        let dir = tempfile::tempdir().unwrap();
        let keys = Keys::new(&[]);
        let written = EventCache::new(1 << 20);
        let note = Note::new(dir.path(), &written);
        for i in 0..40 {
            append(&written, &format!("c{i:02}"), 3);
        }
        assert!(note.write(&written, false));
        // The store's events: three for each conversation, read by range.
        let store = |range: Range<Vec<u8>>| -> Result<Vec<KeyValue>, StoreError> {
            let (conversation, from) = keys.event_parts(&range.start).unwrap();
            Ok((from..=3)
                .map(|seq| (Keys::event_from_parts(conversation, seq), b"x".to_vec()))
                .collect())
        };
        let cache = EventCache::new(1 << 20);
        let mut warm_up = WarmUp::new(&note, &cache);
        let mut steps = 0;
        while warm_up.step(&cache, store) {
            steps += 1;
        }
        assert_eq!((steps, warm_up.warmed), (40usize.div_ceil(WARM_STEP), 40));
        assert_eq!(cache.recent(100).len(), 40);

        // Conversations of many events: a step ends once it has read enough of them.
        let long = |range: Range<Vec<u8>>| -> Result<Vec<KeyValue>, StoreError> {
            let (conversation, _) = keys.event_parts(&range.start).unwrap();
            Ok((1..=600)
                .map(|seq| (Keys::event_from_parts(conversation, seq), b"x".to_vec()))
                .collect())
        };
        let cache = EventCache::new(1 << 30);
        let mut warm_up = WarmUp::new(&note, &cache);
        assert!(warm_up.step(&cache, long));
        assert_eq!(warm_up.warmed, 2);

        // A read that fails ends the warm-up.
        let cache = EventCache::new(1 << 20);
        let mut warm_up = WarmUp::new(&note, &cache);
        assert!(warm_up.step(&cache, |_| Err(StoreError::Engine("gone".into()))));
        assert!(warm_up.pending.as_slice().is_empty());
        assert!(cache.recent(100).is_empty());
        // So does a conversation that does not fit: here the second.
        let tiny = EventCache::new(700);
        let mut warm_up = WarmUp::new(&note, &tiny);
        assert!(warm_up.step(&tiny, store));
        assert!(warm_up.pending.as_slice().is_empty());
        assert_eq!(warm_up.warmed, 1);
        assert_eq!(tiny.recent(100), [keys.event("c00", 1)]);
    }
}
