//! Room for the pages of history a node holds while their clients read them: the `messages`
//! reply to a `fetch` and the body of `GET /v1/conversations/{id}/messages`.
//!
//! A page is up to 1,000 events of up to a client message each (64 KiB by default), so one
//! may be tens of megabytes once encoded, and it stays in memory until its client has taken the
//! last byte: a client that reads slowly holds it for as long as the write timeout lets it.
//! Many connections (32 devices of a user, 16 connections each) asking for such pages at once
//! could take the node's memory. Each page reserves its encoded size from one budget of the
//! node (`--max-page-bytes-in-flight`) before it is written, and gives it back once its client
//! has taken it (or its connection ended); a page that finds no room is refused `unavailable`
//! with a `retry_after_ms`, and the client asks again (`PROTOCOL.md`). A page larger than the
//! whole budget takes all of it, so it is served once the others are read.

use courier_core::error::ApiError;
use prometheus_client::metrics::gauge::Gauge;
use std::sync::Arc;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// What a client refused for want of room waits before it asks again.
pub const PAGE_RETRY_AFTER_MS: u64 = 500;

/// The budget's unit: a page reserves its size rounded up to it.
const UNIT: usize = 1024;

/// The node's budget of page bytes in flight. Cheap to clone: clones share the budget.
#[derive(Clone)]
pub struct PageBudget {
    /// `None`: no budget (`--max-page-bytes-in-flight 0`).
    room: Option<Arc<Semaphore>>,
    /// The whole budget, in [`UNIT`]s.
    units: u32,
    /// `courier_gateway_page_bytes_in_flight`.
    in_flight: Gauge,
}

impl PageBudget {
    /// A budget of `bytes` (0: none, every page is written at once), whose pages in flight
    /// `in_flight` counts.
    pub fn new(bytes: u64, in_flight: Gauge) -> Self {
        let most = u32::try_from(Semaphore::MAX_PERMITS).unwrap_or(u32::MAX);
        let units = u32::try_from(bytes.div_ceil(UNIT as u64)).map_or(most, |u| u.min(most));
        Self {
            room: (units > 0).then(|| Arc::new(Semaphore::new(units as usize))),
            units,
            in_flight,
        }
    }

    /// Reserves room for a page of `bytes` until the returned reservation is dropped, or
    /// refuses it `unavailable` when the pages in flight fill the budget.
    pub fn reserve(&self, bytes: usize) -> Result<PageReservation, ApiError> {
        let Some(room) = &self.room else {
            return Ok(PageReservation { room: None });
        };
        let units = u32::try_from(bytes.div_ceil(UNIT))
            .unwrap_or(u32::MAX)
            .min(self.units);
        match room.clone().try_acquire_many_owned(units) {
            Ok(permit) => {
                let bytes = i64::from(units) * UNIT as i64;
                self.in_flight.inc_by(bytes);
                Ok(PageReservation {
                    room: Some((permit, self.in_flight.clone(), bytes)),
                })
            }
            Err(_) => Err(ApiError::unavailable(
                "this node is sending as many pages of history as it holds at once; ask again \
                 shortly",
                PAGE_RETRY_AFTER_MS,
            )),
        }
    }
}

/// A page's room in the budget, given back when dropped.
#[must_use = "the room is given back as soon as this is dropped"]
pub struct PageReservation {
    /// The room, and the gauge counting it with its bytes; `None` without a budget.
    room: Option<(OwnedSemaphorePermit, Gauge, i64)>,
}

impl Drop for PageReservation {
    fn drop(&mut self) {
        if let Some((_, in_flight, bytes)) = &self.room {
            in_flight.dec_by(*bytes);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use courier_proto::ErrorCode;

    #[test]
    fn pages_past_the_budget_wait_for_the_room_the_others_give_back() {
        let in_flight = Gauge::default();
        let budget = PageBudget::new(10 * 1024, in_flight.clone());
        let first = budget.reserve(6 * 1024).unwrap();
        assert_eq!(in_flight.get(), 6 * 1024);
        let refused = budget.reserve(5 * 1024).err().unwrap();
        assert_eq!(refused.code, ErrorCode::Unavailable);
        assert_eq!(refused.retry_after_ms, Some(PAGE_RETRY_AFTER_MS));
        // A byte over a unit takes the next unit.
        let second = budget.reserve(3 * 1024 + 1).unwrap();
        assert_eq!(in_flight.get(), 10 * 1024);
        drop((first, second));
        assert_eq!(in_flight.get(), 0);
        // A page larger than the whole budget takes all of it, once it is free.
        let whole = budget.reserve(64 << 20).unwrap();
        assert!(budget.reserve(1).is_err());
        drop(whole);
        assert!(budget.reserve(1).is_ok());
    }

    #[test]
    fn no_budget_holds_nothing_back() {
        let in_flight = Gauge::default();
        let budget = PageBudget::new(0, in_flight.clone());
        let pages: Vec<_> = (0..100)
            .map(|_| budget.reserve(64 << 20).unwrap())
            .collect();
        assert_eq!((pages.len(), in_flight.get()), (100, 0));
    }
}
