//! Receipts: when a user's delivered/read cursors in a conversation advance, other members'
//! connected devices get a `receipt`.
//!
//! - In groups of at most `coalesce_above` members (and direct conversations), every other
//!   member's devices get it at once.
//! - In larger groups, receipts are coalesced: at most one per (conversation, user) per
//!   interval, carrying the latest cursors, and it goes only to the devices of the users who
//!   sent the events it newly covers (the last [`SENDER_SCAN_EVENTS`] of them), the ones whose
//!   "delivered to / read by" it changes. Sending every receipt to every member would be
//!   members x devices frames per interval: at 10,000 members that is 10^8 frames a second.
//!
//! **A receipt never closes a connection.** Receipts are cumulative: a newer one replaces an
//! older one, so a device whose queue has no room loses nothing by waiting. Such a receipt is
//! held, for the users whose devices refused it only, and tried again at the next flush, then
//! every [`RETRY_AFTER`] while some wait; a newer receipt of the same user absorbs the held one
//! (the latest cursors, the widest range, everyone again), so the held one never goes out after
//! it from `publish`. A repeat, or an older receipt overtaken by a flush in progress, is harmless:
//! clients keep the highest cursors.

use courier_core::context::Context;
use courier_core::gateways::{Gateways, Offer};
use courier_core::loops::BackgroundLoops;
use courier_core::membership::{Members, MembershipCache};
use courier_proto::{Receipt, ServerFrame};
use courier_store::{MessageStore, StoreError};
use foldhash::{HashMap, HashMapExt};
use std::collections::BTreeSet;
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
    /// The users still to be sent it (`None`: everyone it is for), once some had it.
    only: Option<BTreeSet<String>>,
}

impl Pending {
    fn covered_through(&self) -> u64 {
        self.receipt.delivered_seq.max(self.receipt.read_seq)
    }

    /// Folds an older pending receipt of the same user in: the newest cursors, the widest range,
    /// everyone either was still for.
    fn merge(&mut self, older: Pending) {
        self.covered_after = self.covered_after.min(older.covered_after);
        self.receipt.delivered_seq = self.receipt.delivered_seq.max(older.receipt.delivered_seq);
        self.receipt.read_seq = self.receipt.read_seq.max(older.receipt.read_seq);
        self.only = match (self.only.take(), older.only) {
            (Some(mut only), Some(older)) => {
                only.extend(older);
                Some(only)
            }
            _ => None,
        };
    }
}

/// Pending receipts by conversation, then by user.
type PendingReceipts = HashMap<String, HashMap<String, Pending>>;

pub struct ReceiptRelay {
    store: MessageStore,
    gateways: Arc<dyn Gateways>,
    membership: Arc<MembershipCache>,
    coalesce_above: usize,
    pending: Mutex<PendingReceipts>,
}

impl ReceiptRelay {
    /// Whether receipts in a conversation of `members` go to every other member's devices
    /// (else, coalesced, to the senders of the events they cover).
    pub fn go_to_everyone(&self, members: usize) -> bool {
        members <= self.coalesce_above
    }

    pub fn new(context: &Context, coalesce_above: usize) -> Arc<Self> {
        Arc::new(Self {
            store: context.store.clone(),
            gateways: context.gateways.clone(),
            membership: context.membership.clone(),
            coalesce_above,
            pending: Mutex::new(HashMap::new()),
        })
    }

    /// Sends `receipt` now (devices without room get it at a later flush), or at the next
    /// flush in a large group. `covered_after` is the lowest of the user's cursors that moved,
    /// before they moved. Called once the cursors' commit is done: the members are those of
    /// then (on a cluster node, through the head read now), so a user removed before that
    /// commit, on any node, is not sent it.
    pub async fn publish(&self, receipt: Receipt, covered_after: u64) -> Result<(), StoreError> {
        let members = self.membership.current(&receipt.conversation_id).await?;
        let mut pending = Pending {
            receipt,
            covered_after,
            only: None,
        };
        if !self.go_to_everyone(members.len()) {
            self.hold(pending);
            return Ok(());
        }
        if let Some(older) = self.take_held(&pending.receipt) {
            pending.merge(older);
        }
        let targets = others(&members, &pending.receipt.user);
        self.offer(vec![(pending, targets)]);
        Ok(())
    }

    /// Keeps `pending` for the next flush, folding in the held receipt of the same user.
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

    /// Takes the held receipt of the same conversation and user, if any.
    fn take_held(&self, receipt: &Receipt) -> Option<Pending> {
        let mut all = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        let users = all.get_mut(&receipt.conversation_id)?;
        let held = users.remove(&receipt.user);
        if users.is_empty() {
            all.remove(&receipt.conversation_id);
        }
        held
    }

    /// Queues each pending receipt on the connections of its targets (those it is still for),
    /// all in one offer (a device gets every receipt for it as one delivery), without ever
    /// closing one; holds each for the users one of whose devices had no room. Returns whether
    /// some were held.
    fn offer(&self, batch: Vec<(Pending, Vec<&str>)>) -> bool {
        let (pendings, offers): (Vec<Pending>, Vec<Offer>) = batch
            .into_iter()
            .map(|(pending, targets)| {
                let users = targets
                    .into_iter()
                    .filter(|target| {
                        pending
                            .only
                            .as_ref()
                            .is_none_or(|only| only.contains(*target))
                    })
                    .collect();
                let frame = Arc::new(ServerFrame::Receipt(pending.receipt.clone()));
                (pending, Offer { users, frame })
            })
            .unzip();
        let refused = self.gateways.offer(&offers);
        if refused.is_empty() {
            return false;
        }
        for (mut pending, offer) in pendings.into_iter().zip(&offers) {
            let held: BTreeSet<String> = offer
                .users
                .iter()
                .filter(|user| refused.contains_key(*user))
                .map(|user| user.to_string())
                .collect();
            if !held.is_empty() {
                pending.only = Some(held);
                self.hold(pending);
            }
        }
        true
    }

    /// Flushes held receipts every `interval`, and sooner while some wait for room, until
    /// `loops` shuts down. The node stops it only once its connections have drained: until then
    /// their receipts still go out.
    ///
    /// On a panic the loop is restarted (by `loops`); the receipts of the round it was flushing
    /// are lost, which receipts allow: they are cumulative, and the user's next one carries the
    /// newer cursors.
    pub fn start(self: &Arc<Self>, loops: &BackgroundLoops, interval: Duration) {
        let relay = self.clone();
        loops.spawn("receipt relay", move |cancel| {
            let relay = relay.clone();
            async move {
                cancel
                    .run_until_cancelled(relay.flush_every(interval))
                    .await;
            }
        });
    }

    async fn flush_every(&self, interval: Duration) {
        loop {
            let due = std::mem::take(&mut *self.pending.lock().unwrap_or_else(|e| e.into_inner()));
            let mut waiting = false;
            for (conv, receipts) in due {
                match self.flush(&conv, receipts).await {
                    Ok(w) => waiting |= w,
                    Err(e) => tracing::warn!(error = %e, conv, "receipt flush failed"),
                }
            }
            tokio::time::sleep(if waiting { RETRY_AFTER } else { interval }).await;
        }
    }

    /// Delivers one conversation's held receipts: in a small group to every other member, in
    /// a large one to the senders of the events each newly covers. Returns whether some were
    /// held again for want of room.
    async fn flush(
        &self,
        conv: &str,
        receipts: HashMap<String, Pending>,
    ) -> Result<bool, StoreError> {
        let members = self.membership.current(conv).await?;
        if self.go_to_everyone(members.len()) {
            let batch = receipts
                .into_values()
                .map(|pending| {
                    let targets = others(&members, &pending.receipt.user);
                    (pending, targets)
                })
                .collect();
            return Ok(self.offer(batch));
        }
        let through = receipts.values().map(Pending::covered_through).max();
        let after = receipts.values().map(|p| p.covered_after).min();
        let (Some(through), Some(after)) = (through, after) else {
            return Ok(false);
        };
        let from = after.max(through.saturating_sub(SENDER_SCAN_EVENTS));
        let events = self
            .store
            .events(conv, from, through, (through - from) as usize)
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
        let batch = receipts
            .into_iter()
            .map(|(user, pending)| {
                let first = senders.partition_point(|(seq, _)| *seq <= pending.covered_after);
                let last = senders.partition_point(|(seq, _)| *seq <= pending.covered_through());
                let mut targets: Vec<&str> = senders[first..last]
                    .iter()
                    .map(|(_, sender)| *sender)
                    .filter(|sender| *sender != user)
                    .collect();
                targets.sort_unstable();
                targets.dedup();
                (pending, targets)
            })
            .collect();
        Ok(self.offer(batch))
    }
}

/// The members other than `user`.
fn others<'a>(members: &'a Members, user: &str) -> Vec<&'a str> {
    members
        .iter()
        .map(String::as_str)
        .filter(|member| *member != user)
        .collect()
}
