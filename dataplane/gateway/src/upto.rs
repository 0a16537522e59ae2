//! Where a connection is in each conversation: the highest seq written to it, or known to its
//! device, which live delivery uses to skip events already written and to notice gaps.
//!
//! **Bound.** At most [`MAX_CONVERSATIONS`] conversations are kept (some 100 KB per
//! connection with ids of a few dozen characters): when a new one would pass it, the [`FORGOTTEN_AT_ONCE`] least recently
//! advanced are forgotten together, so that a long-lived connection of a user in many
//! conversations (its catch-up alone adds every one) holds no more, and one scan makes room for
//! many. Correctness never depends on a place being kept: a conversation the connection has no
//! place in is handled as one it has not seen yet, from the device's delivered cursor, read
//! from the store at its next event or `sent`. The cursor moves only on the device's acks, so it
//! is never past what the device had: at worst, events written and not yet acknowledged are
//! written again, which clients drop (delivery is at-least-once, PROTOCOL.md).

use foldhash::HashMap;
use std::borrow::Borrow;

/// Most conversations a connection keeps its place in.
pub const MAX_CONVERSATIONS: usize = 1024;

/// Places forgotten at once when a new conversation would pass [`MAX_CONVERSATIONS`].
pub const FORGOTTEN_AT_ONCE: usize = MAX_CONVERSATIONS / 4;

/// A connection's place in each conversation (module documentation).
#[derive(Default)]
pub struct Upto {
    places: HashMap<String, Place>,
    /// Counts advances: a place's `advanced` orders them, the least recent first forgotten.
    advances: u64,
}

struct Place {
    seq: u64,
    advanced: u64,
}

impl Upto {
    /// The connection's place in `conv`, if it keeps one.
    pub fn get(&self, conv: &str) -> Option<u64> {
        self.places.get(conv).map(|place| place.seq)
    }

    /// Raises the place in `conv` to `seq` (never lowers it), keeping one if there was none.
    pub fn raise<C: Borrow<str> + Into<String>>(&mut self, conv: C, seq: u64) {
        self.advances += 1;
        let advanced = self.advances;
        if let Some(place) = self.places.get_mut(conv.borrow()) {
            place.seq = place.seq.max(seq);
            place.advanced = advanced;
            return;
        }
        if self.places.len() >= MAX_CONVERSATIONS {
            self.forget_least_recent();
        }
        self.places.insert(conv.into(), Place { seq, advanced });
    }

    /// Forgets the [`FORGOTTEN_AT_ONCE`] places least recently advanced.
    fn forget_least_recent(&mut self) {
        let mut advanced: Vec<u64> = self.places.values().map(|place| place.advanced).collect();
        // Each advance has its own count: exactly the least recent are at or below it.
        let (_, &mut last_forgotten, _) = advanced.select_nth_unstable(FORGOTTEN_AT_ONCE - 1);
        self.places
            .retain(|_, place| place.advanced > last_forgotten);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connection_keeps_its_place_in_at_most_max_conversations_the_least_recent_forgotten() {
        let mut upto = Upto::default();
        for i in 0..MAX_CONVERSATIONS {
            upto.raise(format!("c{i}"), 7);
        }
        // The first conversation was advanced since: it is now among the most recent.
        upto.raise("c0", 9);
        upto.raise("c0", 8);
        assert_eq!(upto.get("c0"), Some(9), "a place is never lowered");
        upto.raise("new", 1);
        assert_eq!(upto.places.len(), MAX_CONVERSATIONS - FORGOTTEN_AT_ONCE + 1);
        assert_eq!(upto.get("c0"), Some(9));
        assert_eq!(upto.get("new"), Some(1));
        let forgotten: Vec<usize> = (1..MAX_CONVERSATIONS)
            .filter(|i| upto.get(&format!("c{i}")).is_none())
            .collect();
        assert_eq!(forgotten, (1..=FORGOTTEN_AT_ONCE).collect::<Vec<_>>());

        // However many conversations pass through it, it stays within the bound.
        for i in 0..10 * MAX_CONVERSATIONS {
            upto.raise(format!("more{i}"), 1);
            assert!(upto.places.len() <= MAX_CONVERSATIONS);
        }
    }
}
