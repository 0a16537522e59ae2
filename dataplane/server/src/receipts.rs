//! Receipts: when a user's delivered/read cursors in a conversation advance, other members'
//! connected devices get a `receipt`.
//!
//! - In groups of at most `coalesce_above` members, every other member's devices get it at once.
//! - In larger groups, receipts are coalesced: at most one per (conversation, user) per
//!   interval, carrying the latest cursors, and it goes only to the devices of the users who
//!   sent the events it newly covers (the last [`SENDER_SCAN_EVENTS`] of them), the ones whose
//!   "delivered to / read by" it changes. Sending every receipt to every member would be
//!   members x devices frames per interval: at 10,000 members that is 10^8 frames a second.
//!   A coalesced receipt never closes a connection: when a device's queue has no room it stays
//!   pending and is tried again after [`RETRY_AFTER`] (receipts are cumulative, so a repeat is
//!   harmless and a newer one replaces it).

use crate::membership::MembershipCache;
use crate::routes::{Delivery, Routes};
use courier_proto::{Receipt, ServerFrame};
use courier_store::{MessageStore, StoreError};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Newest events of a coalesced receipt's range whose senders get it.
pub const SENDER_SCAN_EVENTS: u64 = 1000;
/// Wait before trying again receipts that found a device's queue full.
const RETRY_AFTER: Duration = Duration::from_millis(50);

/// A receipt waiting for the next flush, and where the advance it reports began.
struct Pending {
    receipt: Receipt,
    /// The events after this seq (through the receipt's cursors) are newly covered.
    covered_after: u64,
}

impl Pending {
    fn covered_through(&self) -> u64 {
        self.receipt.delivered_seq.max(self.receipt.read_seq)
    }

    /// Folds an older pending receipt of the same user in: the newest cursors, the widest range.
    fn merge(&mut self, older: Pending) {
        self.covered_after = self.covered_after.min(older.covered_after);
        self.receipt.delivered_seq = self.receipt.delivered_seq.max(older.receipt.delivered_seq);
        self.receipt.read_seq = self.receipt.read_seq.max(older.receipt.read_seq);
    }
}

/// Pending receipts by conversation, then by user.
type PendingReceipts = HashMap<String, HashMap<String, Pending>>;

pub struct ReceiptRelay {
    store: MessageStore,
    routes: Arc<Routes>,
    membership: Arc<MembershipCache>,
    coalesce_above: usize,
    pending: Mutex<PendingReceipts>,
}

impl ReceiptRelay {
    pub fn new(
        store: MessageStore,
        routes: Arc<Routes>,
        membership: Arc<MembershipCache>,
        coalesce_above: usize,
    ) -> Arc<Self> {
        Arc::new(Self {
            store,
            routes,
            membership,
            coalesce_above,
            pending: Mutex::new(HashMap::new()),
        })
    }

    /// Sends `receipt` now, or at the next flush in a large group. `covered_after` is the
    /// lowest of the user's cursors that moved, before they moved.
    pub async fn publish(&self, receipt: Receipt, covered_after: u64) -> Result<(), StoreError> {
        let members = self.membership.current(&receipt.conversation_id).await?;
        if members.len() > self.coalesce_above {
            self.hold(Pending {
                receipt,
                covered_after,
            });
            return Ok(());
        }
        let user = receipt.user.clone();
        let frame = Arc::new(ServerFrame::Receipt(receipt));
        for member in members.iter().filter(|m| **m != user) {
            for connection in self.routes.connections(member) {
                connection.deliver(Delivery::Frame(frame.clone()));
            }
        }
        Ok(())
    }

    fn hold(&self, mut pending: Pending) {
        let mut all = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        let users = all
            .entry(pending.receipt.conversation_id.clone())
            .or_default();
        if let Some(older) = users.remove(&pending.receipt.user) {
            pending.merge(older);
        }
        users.insert(pending.receipt.user.clone(), pending);
    }

    /// Flushes coalesced receipts every `interval`, and sooner while some wait for room.
    pub fn start(self: &Arc<Self>, interval: Duration) {
        let relay = self.clone();
        tokio::spawn(async move {
            loop {
                let due =
                    std::mem::take(&mut *relay.pending.lock().unwrap_or_else(|e| e.into_inner()));
                let mut waiting = false;
                for (conv, receipts) in due {
                    match relay.flush(&conv, receipts).await {
                        Ok(w) => waiting |= w,
                        Err(e) => tracing::warn!(error = %e, conv, "receipt flush failed"),
                    }
                }
                tokio::time::sleep(if waiting { RETRY_AFTER } else { interval }).await;
            }
        });
    }

    /// Delivers one conversation's coalesced receipts to the senders of the events each
    /// newly covers; returns whether some were held back for want of room.
    async fn flush(
        &self,
        conv: &str,
        receipts: HashMap<String, Pending>,
    ) -> Result<bool, StoreError> {
        let members = self.membership.current(conv).await?;
        let through = receipts.values().map(Pending::covered_through).max();
        let after = receipts.values().map(|p| p.covered_after).min();
        let (Some(through), Some(after)) = (through, after) else {
            return Ok(false);
        };
        let from = after.max(through.saturating_sub(SENDER_SCAN_EVENTS));
        let events = self
            .store
            .events(conv, from, (through - from) as usize)
            .await?;
        // (seq, sender) of the scanned events whose sender is still a member.
        let mut is_member: HashMap<&str, bool> = HashMap::new();
        let senders: Vec<(u64, &str)> = events
            .iter()
            .map(|e| (e.seq, e.sender.user.as_str()))
            .filter(|(_, sender)| {
                *is_member
                    .entry(sender)
                    .or_insert_with(|| members.iter().any(|m| m == sender))
            })
            .collect();
        let mut waiting = false;
        for (user, pending) in receipts {
            let first = senders.partition_point(|(seq, _)| *seq <= pending.covered_after);
            let last = senders.partition_point(|(seq, _)| *seq <= pending.covered_through());
            let mut targets: Vec<&str> = senders[first..last]
                .iter()
                .map(|(_, sender)| *sender)
                .filter(|sender| *sender != user)
                .collect();
            targets.sort_unstable();
            targets.dedup();
            let frame = Arc::new(ServerFrame::Receipt(pending.receipt.clone()));
            let refused = targets
                .iter()
                .flat_map(|target| self.routes.connections(target))
                .filter(|connection| !connection.deliver_droppable(Delivery::Frame(frame.clone())))
                .count();
            if refused > 0 {
                waiting = true;
                self.hold(pending);
            }
        }
        Ok(waiting)
    }
}
