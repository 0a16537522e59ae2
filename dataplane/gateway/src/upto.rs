//! Where a connection is in each conversation: the highest seq written to it, or known to its
//! device, which live delivery uses to skip events already written and to notice gaps.
//!
//! **Bound.** A place the device's delivered cursor covers (the connection wrote nothing
//! there past the cursor it read: the catch-up's conversations with nothing to send, one it
//! read the cursor of) is only a copy of that cursor, and may be forgotten: the next event or
//! `sent` there reads the cursor again, which never moved back. Of those, at most
//! [`MAX_CONVERSATIONS`] are kept alongside the rest: when a new place would pass the bound,
//! the [`FORGOTTEN_AT_ONCE`] least recently advanced are forgotten together (one scan makes
//! room for many), so a connection of a user in many conversations (its catch-up adds every
//! one) holds a place for those it wrote in, not for all. A place the connection wrote past
//! the cursor is kept while the connection lives: forgotten, the events written there and not
//! yet acknowledged would be written again on the same connection, out of the strictly
//! increasing order PROTOCOL.md promises within a conversation. Those are at most the user's
//! conversations (`--max-groups-per-user` and `--max-direct-conversations-per-user`).

use foldhash::HashMap;
use std::borrow::Borrow;

/// Places a connection keeps, past which those its device's cursor covers are forgotten.
pub const MAX_CONVERSATIONS: usize = 1024;

/// Places forgotten at once when a new conversation would pass [`MAX_CONVERSATIONS`].
pub const FORGOTTEN_AT_ONCE: usize = MAX_CONVERSATIONS / 4;

/// What [`Upto::caught_up`] raises the count of advances to, so that a place advanced since
/// counts more: far above the advances of any catch-up (one per event or cursor), and far
/// below where the count would wrap.
const CAUGHT_UP: u64 = 1 << 48;

/// A connection's place in each conversation (module documentation).
#[derive(Default)]
pub struct Upto {
    places: HashMap<String, Place>,
    /// Counts advances: a place's `advanced` orders them, the least recent first forgotten.
    advances: u64,
}

struct Place {
    /// The highest seq written to the connection, or known to its device.
    seq: u64,
    /// The device's delivered cursor as last read: the place may be forgotten while it
    /// covers `seq`.
    cursor: u64,
    advanced: u64,
}

impl Upto {
    /// The connection's place in `conv`, if it keeps one.
    pub fn get(&self, conv: &str) -> Option<u64> {
        self.places.get(conv).map(|place| place.seq)
    }

    /// Raises the place in `conv` to `seq`, written to the connection (never lowers it).
    pub fn wrote<C: Borrow<str> + Into<String>>(&mut self, conv: C, seq: u64) {
        self.advance(conv, seq, 0);
    }

    /// Raises the place in `conv` to the device's delivered `cursor`, read from the store.
    pub fn read_cursor<C: Borrow<str> + Into<String>>(&mut self, conv: C, cursor: u64) {
        self.advance(conv, cursor, cursor);
    }

    /// The connection's first catch-up is written: the places advanced from now on are told
    /// apart from those it advanced ([`Upto::unacknowledged`]), at the cost of no memory.
    pub fn caught_up(&mut self) {
        self.advances = self.advances.max(CAUGHT_UP);
    }

    /// The places written past the device's cursor as last read and advanced since the first
    /// catch-up ([`Upto::caught_up`]), the most recently advanced first, at most `limit` of
    /// them: where the connection took events "live" that its device may not have
    /// acknowledged (the cursor may have moved since it was read). What only the catch-up
    /// wrote was committed before the connection, while the device was offline.
    pub fn unacknowledged(&self, limit: usize) -> Vec<(String, u64)> {
        let mut written: Vec<(&String, &Place)> = self
            .places
            .iter()
            .filter(|(_, place)| place.advanced > CAUGHT_UP && place.seq > place.cursor)
            .collect();
        if written.len() > limit {
            written
                .select_nth_unstable_by_key(limit, |(_, place)| std::cmp::Reverse(place.advanced));
            written.truncate(limit);
        }
        written.sort_unstable_by_key(|(_, place)| std::cmp::Reverse(place.advanced));
        written
            .into_iter()
            .map(|(conv, place)| (conv.clone(), place.seq))
            .collect()
    }

    fn advance<C: Borrow<str> + Into<String>>(&mut self, conv: C, seq: u64, cursor: u64) {
        self.advances += 1;
        let advanced = self.advances;
        if let Some(place) = self.places.get_mut(conv.borrow()) {
            place.seq = place.seq.max(seq);
            place.cursor = place.cursor.max(cursor);
            place.advanced = advanced;
            return;
        }
        if self.places.len() >= MAX_CONVERSATIONS {
            self.forget_least_recent();
        }
        let place = Place {
            seq,
            cursor,
            advanced,
        };
        self.places.insert(conv.into(), place);
    }

    /// Forgets the [`FORGOTTEN_AT_ONCE`] places least recently advanced of those the device's
    /// cursor covers (all of them if fewer).
    fn forget_least_recent(&mut self) {
        let covered = |place: &Place| place.cursor >= place.seq;
        let mut advanced: Vec<u64> = self
            .places
            .values()
            .filter(|place| covered(place))
            .map(|place| place.advanced)
            .collect();
        let Some(nth) = FORGOTTEN_AT_ONCE.min(advanced.len()).checked_sub(1) else {
            return;
        };
        // Each advance has its own count: exactly the least recent are at or below it.
        let (_, &mut last_forgotten, _) = advanced.select_nth_unstable(nth);
        self.places
            .retain(|_, place| !covered(place) || place.advanced > last_forgotten);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connection_keeps_at_most_max_places_its_devices_cursor_covers_the_least_recent_forgotten()
    {
        let mut upto = Upto::default();
        for i in 0..MAX_CONVERSATIONS {
            upto.read_cursor(format!("c{i}"), 7);
        }
        // The first conversation was advanced since: it is now among the most recent.
        upto.read_cursor("c0", 9);
        upto.read_cursor("c0", 8);
        assert_eq!(upto.get("c0"), Some(9), "a place is never lowered");
        upto.read_cursor("new", 1);
        assert_eq!(upto.places.len(), MAX_CONVERSATIONS - FORGOTTEN_AT_ONCE + 1);
        assert_eq!(upto.get("c0"), Some(9));
        assert_eq!(upto.get("new"), Some(1));
        let forgotten: Vec<usize> = (1..MAX_CONVERSATIONS)
            .filter(|i| upto.get(&format!("c{i}")).is_none())
            .collect();
        assert_eq!(forgotten, (1..=FORGOTTEN_AT_ONCE).collect::<Vec<_>>());

        // However many conversations pass through it, it stays within the bound.
        for i in 0..10 * MAX_CONVERSATIONS {
            upto.read_cursor(format!("more{i}"), 1);
            assert!(upto.places.len() <= MAX_CONVERSATIONS);
        }
    }

    /// A place written past the device's cursor is never forgotten: the events written there
    /// would come again on the same connection, out of order.
    #[test]
    fn a_place_written_past_the_devices_cursor_is_kept() {
        let mut upto = Upto::default();
        upto.read_cursor("written", 3);
        upto.wrote("written", 5);
        for i in 0..2 * MAX_CONVERSATIONS {
            upto.read_cursor(format!("c{i}"), 1);
        }
        assert_eq!(upto.get("written"), Some(5));
        assert!(upto.places.len() <= MAX_CONVERSATIONS);

        // Once the cursor read covers it again, it may go.
        upto.read_cursor("written", 5);
        for i in 0..2 * MAX_CONVERSATIONS {
            upto.read_cursor(format!("d{i}"), 1);
        }
        assert_eq!(upto.get("written"), None);

        // Written places alone pass the bound: none of them is forgotten.
        let mut upto = Upto::default();
        for i in 0..MAX_CONVERSATIONS + 10 {
            upto.wrote(format!("w{i}"), 1);
        }
        assert_eq!(upto.places.len(), MAX_CONVERSATIONS + 10);
    }

    /// A silent close names the places written past the cursor since the first catch-up, the
    /// most recent first: what only the catch-up wrote was committed while the device was
    /// offline, and notified then.
    #[test]
    fn the_places_written_past_the_cursor_are_listed_most_recent_first() {
        let mut upto = Upto::default();
        upto.read_cursor("caught up", 1);
        upto.wrote("caught up", 6);
        upto.caught_up();
        upto.read_cursor("covered", 4);
        upto.read_cursor("old", 2);
        upto.wrote("old", 3);
        upto.wrote("recent", 7);
        upto.wrote("middle", 1);
        upto.wrote("recent", 8);
        assert_eq!(
            upto.unacknowledged(10),
            [
                ("recent".to_owned(), 8),
                ("middle".to_owned(), 1),
                ("old".to_owned(), 3)
            ]
        );
        assert_eq!(
            upto.unacknowledged(2),
            [("recent".to_owned(), 8), ("middle".to_owned(), 1)]
        );
        assert!(upto.unacknowledged(0).is_empty());

        // Written to live after the catch-up, a conversation of the catch-up is named.
        upto.wrote("caught up", 9);
        assert_eq!(upto.unacknowledged(1), [("caught up".to_owned(), 9)]);
    }
}
