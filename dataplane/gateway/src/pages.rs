//! Room for the pages of history a node holds while their clients read them: the `messages`
//! reply to a `fetch` and the body of `GET /v1/conversations/{id}/messages`.
//!
//! A page is up to 1,000 events of up to a client message each (64 KiB by default), so one
//! may be tens of megabytes once encoded, and it stays in memory until its client has taken the
//! last byte: a client that reads slowly holds it for as long as the write timeout lets it.
//! Many connections (32 devices of a user, 16 connections each) asking for such pages at once
//! could take the node's memory. Each page reserves room from one budget of the node
//! (`--max-page-bytes-in-flight`) before its events are read: the most it can take, its
//! `limit` of events of the largest size ([`PageBudget::reserve_page`]), lowered to its
//! encoded size once it is encoded ([`PageReservation::settle`]), and gives it back once its
//! client has taken it (or its connection ended). A page that finds no room is refused
//! `unavailable` with a `retry_after_ms` having read nothing, and the client asks again
//! (`PROTOCOL.md`); pages are never cut short, as a page shorter than its `limit` tells the
//! client it reached the head. A page larger than the whole budget takes all of it, so it is
//! served once the others are read.
//!
//! The cost: a page asks for room at its most, so a node holding its budget nearly full of
//! pages refuses even a page that turns out small, and pages being read hold their most for
//! the time of the read (a default page, 100 events, 6.3 MiB by default; by default a page of
//! more than 504 events is larger than a user's share, served while that user holds no other
//! page).
//!
//! **A user's share.** The pages of one user, all devices and connections together, hold at
//! most an eighth of the budget ([`SHARE_OF_BUDGET`]): one user who asks for pages and reads
//! none of them holds that much until the write timeout cuts the connections, while the other
//! users' pages are served from the rest. A page larger than the share is served when its user
//! holds nothing. Users are counted by a keyed hash of their id, an entry only while they hold
//! a page: the entries are at most the pages in flight.

use courier_chat::{DEFAULT_FETCH_LIMIT, MAX_FETCH_LIMIT};
use courier_core::error::ApiError;
use foldhash::HashMap;
use prometheus_client::metrics::gauge::Gauge;
use std::hash::BuildHasher;
use std::sync::{Arc, Mutex};

/// What a client refused for want of room waits before it asks again.
pub const PAGE_RETRY_AFTER_MS: u64 = 500;

/// The budget's unit: a page reserves its size rounded up to it.
const UNIT: usize = 1024;

/// One user's pages hold at most the budget divided by this.
pub const SHARE_OF_BUDGET: u32 = 8;

/// What an event of a page may take beyond its client message: its ids, sender, seq, time and
/// kind, encoded.
const EVENT_ENVELOPE_BYTES: usize = 1024;

/// The node's budget of page bytes in flight. Cheap to clone: clones share the budget.
#[derive(Clone)]
pub struct PageBudget {
    /// `None`: no budget (`--max-page-bytes-in-flight 0`).
    room: Option<Arc<Room>>,
    /// The most one event of a page takes encoded.
    event_bytes: usize,
}

/// A budget of page bytes and what its pages hold of it.
struct Room {
    /// The whole budget, in [`UNIT`]s.
    units: u32,
    /// The most one user's pages hold, in [`UNIT`]s.
    share: u32,
    held: Mutex<Held>,
    /// Keys each user's entry in [`Held::users`].
    users: foldhash::fast::RandomState,
    /// `courier_gateway_page_bytes_in_flight`.
    in_flight: Gauge,
}

/// What the pages in flight hold, in [`UNIT`]s.
#[derive(Default)]
struct Held {
    all: u32,
    /// By user (the hash of its id); no entry for a user who holds nothing.
    users: HashMap<u64, u32>,
}

impl PageBudget {
    /// A budget of `bytes` (0: none, every page is written at once) for pages of events whose
    /// client messages are at most `message_bytes` (`--max-frame-bytes`), whose pages in
    /// flight `in_flight` counts.
    pub fn new(bytes: u64, message_bytes: usize, in_flight: Gauge) -> Self {
        let units = u32::try_from(bytes.div_ceil(UNIT as u64)).unwrap_or(u32::MAX);
        let room = (units > 0).then(|| {
            Arc::new(Room {
                units,
                share: (units / SHARE_OF_BUDGET).max(1),
                held: Mutex::default(),
                users: Default::default(),
                in_flight,
            })
        });
        Self {
            room,
            event_bytes: message_bytes.saturating_add(EVENT_ENVELOPE_BYTES),
        }
    }

    /// Reserves room for a page of up to `limit` events (as a `fetch` asks for it: `None`
    /// for the default, lowered to the most) before they are read, at the most they can take;
    /// [`PageReservation::settle`] lowers it to the page's size once encoded. Refused as
    /// [`reserve`](Self::reserve) refuses.
    pub fn reserve_page(
        &self,
        user: &str,
        limit: Option<u32>,
    ) -> Result<PageReservation, ApiError> {
        let events = limit.unwrap_or(DEFAULT_FETCH_LIMIT).min(MAX_FETCH_LIMIT);
        self.reserve(user, (events as usize).saturating_mul(self.event_bytes))
    }

    /// Reserves room for a page of `bytes` for `user` until the returned reservation is
    /// dropped, or refuses it `unavailable` when the user's pages in flight fill its share or
    /// all pages in flight fill the budget.
    fn reserve(&self, user: &str, bytes: usize) -> Result<PageReservation, ApiError> {
        let Some(room) = &self.room else {
            return Ok(PageReservation { room: None });
        };
        let units = room.units_of(bytes);
        let user = room.users.hash_one(user);
        let mut held = room.held.lock().unwrap_or_else(|e| e.into_inner());
        let mine = held.users.get(&user).copied().unwrap_or(0);
        if mine > 0 && u64::from(mine) + u64::from(units) > u64::from(room.share) {
            return Err(ApiError::unavailable(
                "your devices are being sent as many pages of history as one user may hold on \
                 this node at once; read them, or ask again shortly",
                PAGE_RETRY_AFTER_MS,
            ));
        }
        if u64::from(held.all) + u64::from(units) > u64::from(room.units) {
            return Err(ApiError::unavailable(
                "this node is sending as many pages of history as it holds at once; ask again \
                 shortly",
                PAGE_RETRY_AFTER_MS,
            ));
        }
        held.all += units;
        *held.users.entry(user).or_default() += units;
        drop(held);
        room.in_flight.inc_by(i64::from(units) * UNIT as i64);
        Ok(PageReservation {
            room: Some((room.clone(), user, units)),
        })
    }
}

impl Room {
    /// What a page of `bytes` holds: whole units, at most the budget.
    fn units_of(&self, bytes: usize) -> u32 {
        u32::try_from(bytes.div_ceil(UNIT))
            .unwrap_or(u32::MAX)
            .min(self.units)
    }
}

/// A page's room in the budget, given back when dropped.
#[must_use = "the room is given back as soon as this is dropped"]
pub struct PageReservation {
    /// The budget, the user's entry in it and the units held; `None` without a budget.
    room: Option<(Arc<Room>, u64, u32)>,
}

impl PageReservation {
    /// Holds what the page, read and encoded, takes: `bytes`. Taken whatever the room, as the
    /// page is already in memory (an event larger than its client message, a group's
    /// `group_created` naming many members, may take more than the page reserved).
    pub fn settle(&mut self, bytes: usize) {
        let Some((room, user, units)) = &mut self.room else {
            return;
        };
        let settled = room.units_of(bytes);
        let mut held = room.held.lock().unwrap_or_else(|e| e.into_inner());
        held.all = held.all - *units + settled;
        if let Some(mine) = held.users.get_mut(user) {
            *mine = *mine - *units + settled;
        }
        drop(held);
        room.in_flight
            .inc_by((i64::from(settled) - i64::from(*units)) * UNIT as i64);
        *units = settled;
    }
}

impl Drop for PageReservation {
    fn drop(&mut self) {
        let Some((room, user, units)) = &self.room else {
            return;
        };
        let mut held = room.held.lock().unwrap_or_else(|e| e.into_inner());
        held.all -= units;
        if let Some(mine) = held.users.get_mut(user) {
            *mine -= units;
            if *mine == 0 {
                held.users.remove(user);
            }
        }
        drop(held);
        room.in_flight.dec_by(i64::from(*units) * UNIT as i64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use courier_proto::ErrorCode;

    fn refused(reserved: Result<PageReservation, ApiError>) -> ApiError {
        let refused = reserved.err().unwrap();
        assert_eq!(refused.code, ErrorCode::Unavailable);
        assert_eq!(refused.retry_after_ms, Some(PAGE_RETRY_AFTER_MS));
        refused
    }

    #[test]
    fn pages_past_the_budget_wait_for_the_room_the_others_give_back() {
        let in_flight = Gauge::default();
        let budget = PageBudget::new(10 * 1024, 0, in_flight.clone());
        let first = budget.reserve("u1", 6 * 1024).unwrap();
        assert_eq!(in_flight.get(), 6 * 1024);
        refused(budget.reserve("u2", 5 * 1024));
        // A byte over a unit takes the next unit.
        let second = budget.reserve("u3", 3 * 1024 + 1).unwrap();
        assert_eq!(in_flight.get(), 10 * 1024);
        drop((first, second));
        assert_eq!(in_flight.get(), 0);
        // A page larger than the whole budget takes all of it, once it is free.
        let whole = budget.reserve("u1", 64 << 20).unwrap();
        assert!(budget.reserve("u2", 1).is_err());
        drop(whole);
        assert!(budget.reserve("u2", 1).is_ok());
    }

    #[test]
    fn a_users_pages_past_its_share_wait_while_the_others_are_served() {
        let in_flight = Gauge::default();
        let budget = PageBudget::new(64 * 1024, 0, in_flight.clone());
        // An eighth: 8 KiB. A page larger than it goes through when the user holds nothing.
        let large = budget.reserve("bob", 20 * 1024).unwrap();
        refused(budget.reserve("bob", 1));
        drop(large);
        let first = budget.reserve("bob", 5 * 1024).unwrap();
        let second = budget.reserve("bob", 3 * 1024).unwrap();
        let message = refused(budget.reserve("bob", 1)).message;
        assert!(message.contains("one user"), "{message}");
        let alices = budget.reserve("alice", 8 * 1024).unwrap();
        assert_eq!(in_flight.get(), 16 * 1024);
        drop(first);
        let third = budget.reserve("bob", 5 * 1024).unwrap();
        // A user holding nothing keeps no entry.
        let users = |budget: &PageBudget| {
            budget
                .room
                .as_ref()
                .unwrap()
                .held
                .lock()
                .unwrap()
                .users
                .len()
        };
        assert_eq!(users(&budget), 2);
        drop((second, third));
        assert_eq!(users(&budget), 1);
        drop(alices);
        assert_eq!((users(&budget), in_flight.get()), (0, 0));
    }

    #[test]
    fn a_page_holds_its_most_while_it_is_read_then_its_encoded_size() {
        let in_flight = Gauge::default();
        // Events of 1 KiB of message at most: 2 KiB each with their envelope.
        let budget = PageBudget::new(64 * 1024, 1024, in_flight.clone());
        let mut page = budget.reserve_page("bob", Some(3)).unwrap();
        assert_eq!(in_flight.get(), 6 * 1024);
        // A default page (100 events) may take more than the budget: all of it, once free.
        refused(budget.reserve_page("alice", None));
        page.settle(1000);
        assert_eq!(in_flight.get(), 1024);
        // Lowered, the page leaves its user's share (8 KiB) and the budget to other pages.
        let second = budget.reserve_page("bob", Some(3)).unwrap();
        refused(budget.reserve_page("bob", Some(1)));
        // An event larger than its message makes the page hold more than it reserved.
        page.settle(7 * 1024);
        assert_eq!(in_flight.get(), 13 * 1024);
        drop((page, second));
        assert_eq!(in_flight.get(), 0);
        // Limits past the most are lowered to it: 1,000 events, 2 MiB, the whole budget.
        let whole = budget.reserve_page("alice", Some(u32::MAX)).unwrap();
        assert_eq!(in_flight.get(), 64 * 1024);
        drop(whole);
    }

    #[test]
    fn no_budget_holds_nothing_back() {
        let in_flight = Gauge::default();
        let budget = PageBudget::new(0, 0, in_flight.clone());
        let pages: Vec<_> = (0..100)
            .map(|_| budget.reserve("bob", 64 << 20).unwrap())
            .collect();
        assert_eq!((pages.len(), in_flight.get()), (100, 0));
    }
}
