//! The push role's queue: turns the messages of each shard's outbox (the durable queue the
//! sequencer writes in the same commit as each message, which fanout reads too) into
//! collapsed, per-device pending notifications, and sends those through the providers with
//! retries.
//!
//! - Only devices with a push registration that are not connected when the notifier reads the
//!   message, and whose delivered cursor does not cover it, are notified of it: a device that
//!   took the message and went away before the notifier's pass is not. Nor is one whose user
//!   read the message on another device before its notification was sent.
//! - Silent closes: a connection closed because its client read nothing for two ping
//!   intervals (an app its OS suspended) took its device's messages "live" while the device
//!   counted as connected. Its gateway records where it left the device in the conversations
//!   it wrote to ([`MessageStore::owe_pushes`], at the close only), and the notifier turns what
//!   the device did not acknowledge there into pending notifications as if the device had
//!   been offline ([`Notifier::expand_owed`]): told at once by a gateway of its process
//!   ([`OwedPushListener`]), and reading them at its start and, on a cluster's node, every
//!   round.
//! - Collapse: one pending notification per device and conversation, carrying a count; a new
//!   message adds to it until it is sent. Each waits `--push-collapse` before its first attempt
//!   (`--push-quiet-collapse` in groups above the large-group threshold, whose notifications
//!   are also quiet: silent, background pushes).
//! - Retries: 429 and 5xx are retried with exponential backoff and full jitter, never sooner
//!   than the provider's `Retry-After`, up to `MAX_ATTEMPTS`; tokens the provider calls invalid
//!   (or the index of tokens gives to another device) are removed from the device, and a
//!   device that registered again while its notification was being sent gets it at the next
//!   pass, with its new registration. A 5xx (or a 429 seen for several tokens in a row) also
//!   blocks the provider as a whole until its `Retry-After` (`provider_gates`): what falls
//!   due for it meanwhile is postponed to the block's end, without a request and without
//!   spending an attempt. A 429 for one token waits for that notification alone.
//! - Sends: due notifications are sent [`SENDS_IN_FLIGHT`] at a time, so a provider that does
//!   not answer costs a pass about one request timeout, not one per notification. A provider
//!   not known to answer (since the notifier started, or since it asked for a retry) is sent
//!   one alone first; the others due for it wait for its answer, or `PROBE_WAIT`, so that a
//!   throttled provider is not sent a burst before its first answer.
//! - Payloads carry conversation id, seq, sender and count; the text only with
//!   `--push-include-text`.
//! - Expansion: a pass of the notifier takes a page of the outbox from every shard it was told
//!   of (waiting [`PASS_LINGER`] after the first notice, so that one pass takes many shards),
//!   from the notifier's bound in it, and writes their pending notifications in bounded
//!   commits; the last one moves each shard's bound past its page: one commit per pass under
//!   a light load, not one per message. In one process, once a read of a shard's outbox
//!   reached its end, the notifier takes the headers of the entries the sequencer lists after
//!   each commit instead of reading them back (`courier_core::listed_tails`, as fanout does
//!   with the entries). Re-expanding after a failure counts no message twice
//!   (each notification keeps the latest seq it counted). A shard that fails to expand is
//!   retried with backoff and holds back neither the other shards nor the sends. Which of a
//!   user's devices take push is read once and kept from pass to pass while no device's push
//!   registration begins or ends (the store counts those), for at most a minute: a large
//!   group's members are not read again for every message.
//! - Clearing (decision 0006): the commit that moves a shard's bound also clears its outbox
//!   below both the notifier's and fanout's bounds; the notifier is the outbox's only clearer.
//!   When fanout is behind, what lies between the bounds is cleared at a later round. While
//!   no notifier runs, the outbox grows behind fanout; sends go on. An entry or row that does
//!   not decode is passed over (logged at error, counted in
//!   `courier_outbox_undecodable_entries_total{reader="push"}`) and cleared with the others:
//!   its messages are not pushed, where failing the pass held the shard for good. Likewise a
//!   pending notification whose stored data does not decode is given up and cleared
//!   (`Notifier::unreadable`), where failing the send pass held back every one after it; a
//!   member whose device records do not decode is not notified, where failing the expansion
//!   held its shard for good.
//! - The notifier is one loop owned by the node's [`BackgroundLoops`]. It stops between passes
//!   (a pass in progress finishes, unless the shutdown deadline aborts it). If it panics it is
//!   restarted, with every shard marked for expansion again: its state is durable (its bounds
//!   and the pending notifications are in the store; re-expansion counts nothing twice), so a
//!   restart costs at most the repeat of a notification that was sent but not yet recorded as
//!   sent. A node that takes the lead reads every shard's bound from the store again (another
//!   node may have moved it meanwhile), and reads an outbox from its start where that bound
//!   lies past every entry the outbox holds (damage, logged at error, or an outbox emptied
//!   below it): an entry held is pushed again rather than skipped (`Notifier::starting_bound`).

mod provider_gates;
pub mod providers;

use crate::provider_gates::{Admission, ProviderGates};
use crate::providers::{Notification, PushError, PushProviders, next_delay};
use clap::Args;
use courier_chat::devices::Devices;
use courier_core::context::Context;
use courier_core::gateways::Gateways;
use courier_core::leases::JobLead;
use courier_core::listed_tails::{Listed, Tails};
use courier_core::loops::BackgroundLoops;
use courier_core::membership::MembershipCache;
use courier_core::metrics::{Metrics, OutcomeLabel, ReaderLabel};
use courier_core::sequencing::{CommitListener, OwedPushListener};
use courier_core::{clock::now_ms, shard_cursors::ShardCursors};
use courier_proto::{Body, EventPayload};
use courier_store::{
    EventHeader, ListedEntry, MessageStore, OutboxHeaders, OwedPush, PendingPush,
    PushRegistrationCounts, PushedBound, StoreError, bound_after, push_registration_slot,
};
use foldhash::{HashMap, HashMapExt};
use futures::{StreamExt, TryStreamExt};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::Notify;

/// Entries one shard's step takes at most, from its tail or read from the store. Each pass
/// waits for its own commit, and under load a commit waits for those before it, so a step
/// takes many: at 256 a step, 8 conversations at ~80,000 msgs/s outran the passes, the tails
/// grew past [`TAILS_MAX_BYTES`] and were dropped, and from then on every pass read 256 entries
/// back from the outbox, each time reading 256 rows of commits that held ~100 entries each,
/// slower than the commits came (`docs/benchmarks.md`, "The push notifier keeps up").
const SHARD_PAGE: usize = 4096;
/// Rows (a commit's entries each) one shard's step reads from the store at most, and the
/// entries it takes at least when many shards are read at once.
const OUTBOX_PAGE: usize = 256;
/// Entries one pass reads from the store at most, over all its shards: a step of each of
/// the store's 1,024 shards takes [`OUTBOX_PAGE`] entries, one of a few shards [`SHARD_PAGE`].
const OUTBOX_READ_ENTRIES: usize = 1024 * OUTBOX_PAGE;
/// Listed entries a page expands before it lets the other tasks of its thread run.
const ENTRIES_PER_YIELD: usize = 256;
/// Pending notifications read per step of a send pass.
const PENDING_PAGE: usize = 512;
/// Attempts before a notification is given up.
pub const MAX_ATTEMPTS: u32 = 12;
/// Shards whose newest outbox entry is read at once when the notifier reads their bounds
/// (`Notifier::starting_bound`); the others wait for those reads.
const BOUND_CHECKS_IN_FLIGHT: usize = 64;
/// Notifications being sent at once, over all providers. A provider that does not answer
/// holds each request for the request timeout (10 s): sent one at a time, each of its
/// notifications cost that much, and held back every other provider's sends and the
/// expansion of new messages (a pass waits for its sends). Bounded so that a burst of due
/// notifications opens no more connections and store calls at once; a provider that is not
/// known to answer gets one of them alone first (`provider_gates`).
const SENDS_IN_FLIGHT: usize = 64;
/// Longest pause between send passes when nothing wakes the notifier.
const IDLE_PASS: Duration = Duration::from_millis(250);
/// Pending notifications built in memory for one pass: a shard's page ends after the message
/// that reaches it (one large group's devices may go beyond it), and the shards after it wait
/// for the next pass.
const PENDING_PER_PASS: usize = 10_000;
/// How long the notifier waits, once told of a commit, before its pass: the commits of every
/// shard meanwhile are expanded together, each shard's with one outbox read, in one store
/// commit. It delays no notification: each is due `--push-collapse` (500 ms by default) after
/// the message that opened it was committed. Fewer, larger passes cost the server less CPU
/// under a light load (`docs/benchmarks.md`, "A longer push pass"). It ends early once the
/// tails hold half of [`TAILS_MAX_BYTES`]: under a heavy load 250 ms of commits filled them,
/// and past their bound they are dropped and the outbox read back.
const PASS_LINGER: Duration = Duration::from_millis(250);
/// Bytes of listed entries' headers kept across all shards' tails; past it, the tail that would
/// grow beyond it is dropped and its shard's outbox read again.
const TAILS_MAX_BYTES: usize = 8 << 20;
/// Longest wait before a shard whose messages could not be expanded is tried again (the wait
/// doubles from [`IDLE_PASS`] with each failure in a row).
const MAX_SHARD_BACKOFF: Duration = Duration::from_secs(30);

/// Places of silent closes ([`MessageStore::owed_pushes`]) one pass takes at most; the rest
/// wait for the next pass, which starts at once.
const OWED_PAGE: usize = 256;
/// Events of each such place read at most, the latest: a notification of more unread
/// messages counts these only.
const OWED_EVENTS: usize = 100;

#[derive(Debug, Clone, Args)]
pub struct NotifierConfig {
    /// How long a notification waits for more messages of its conversation before it is sent.
    #[arg(long, env = "COURIER_PUSH_COLLAPSE", default_value = "500ms", value_parser = humantime::parse_duration)]
    pub push_collapse: Duration,
    /// The same for groups above the large-group threshold (their pushes are also silent).
    #[arg(long, env = "COURIER_PUSH_QUIET_COLLAPSE", default_value = "10s", value_parser = humantime::parse_duration)]
    pub push_quiet_collapse: Duration,
}

type DeviceKey = (String, String, String);

/// An outbox entry's key and header, built from the entry a commit of this process listed.
struct ListedHeader {
    key: Vec<u8>,
    header: EventHeader,
}

impl ListedHeader {
    fn of(entry: &ListedEntry) -> Self {
        Self {
            key: entry.key.clone(),
            header: EventHeader::of(&entry.event),
        }
    }
}

impl Listed for ListedHeader {
    fn key(&self) -> &[u8] {
        &self.key
    }

    fn bytes(&self) -> usize {
        // The strings and the struct around them.
        self.key.len()
            + self.header.conversation_id.len()
            + self.header.sender().len()
            + std::mem::size_of::<Self>()
            + 16
    }
}

/// What one expansion did: the shards that failed, and whether a shard has messages left.
#[derive(Default)]
struct Expanded {
    failed: Vec<(u32, StoreError)>,
    more: bool,
}

/// A page of one shard's outbox as pending notifications, and how the notifier's bound
/// moves with it.
struct OutboxPage {
    bound: PushedBound,
    pending: Vec<(DeviceKey, PendingPush)>,
    /// The shard has entries after the page.
    more: bool,
    /// Fanout's bound is below the notifier's: entries between them are cleared later.
    trailing: bool,
}

/// Each user's devices that take push ([`courier_store::DeviceRecord::takes_push`]), as read
/// from the store, kept from pass to pass while the store's count of registrations begun or
/// ended by the users of its slot ([`MessageStore::push_registration_counts`]) stays put: the
/// members of a large group are read once, not for every message, and a registration that
/// begins drops the users of one slot in [`courier_store::PUSH_REGISTRATION_SLOTS`], not
/// everyone. The counts are read after a pass's outbox pages, so no registration that began
/// before one of their messages was committed is missed.
#[derive(Default)]
struct Registrations {
    /// The counts the devices were read under, and when the oldest kept was read.
    read_under: Option<(PushRegistrationCounts, Instant)>,
    /// Per user: the slot its registrations are counted in, and its devices that take push.
    devices: HashMap<String, (u16, Vec<String>)>,
}

/// Users whose registrations are kept at most: past it, the next pass reads them again.
const REGISTRATIONS_KEPT: usize = 100_000;
/// How long registrations are kept at most, whatever the counts say: a bound on what a node
/// that does not count them (a version before the counts, in a rolling upgrade) can hide.
const REGISTRATIONS_MAX_AGE: Duration = Duration::from_secs(60);

impl Registrations {
    /// Forgets the registrations read of the users whose slot's count moved since; all of
    /// them if the counts cannot tell which (a node of a version that counts in all only), or
    /// if they are too old or too many.
    async fn refresh(&mut self, store: &MessageStore) -> Result<(), StoreError> {
        let since = self.read_under.as_ref().map(|(counts, _)| counts);
        let counts = store.push_registration_counts(since).await?;
        let kept = self.read_under.as_ref().and_then(|(before, since)| {
            let young =
                since.elapsed() < REGISTRATIONS_MAX_AGE && self.devices.len() <= REGISTRATIONS_KEPT;
            young
                .then(|| counts.slots_moved_since(before))
                .flatten()
                .map(|moved| (moved, *since))
        });
        match kept {
            Some((moved, since)) => {
                if !moved.is_empty() {
                    self.devices
                        .retain(|_, (slot, _)| moved.binary_search(slot).is_err());
                }
                self.read_under = Some((counts, since));
            }
            None => {
                self.devices.clear();
                self.read_under = Some((counts, Instant::now()));
            }
        }
        Ok(())
    }
}

/// The devices to notify per user, looked up once per expansion: those that take push, less
/// the connected ones.
struct DeviceLookups<'a> {
    registrations: &'a mut Registrations,
    /// Users with a device that takes push: those of their devices not connected.
    offline: HashMap<String, Vec<String>>,
}

/// Users whose device records, or devices whose push states, one store call reads at most.
const LOOKUPS_PER_READ: usize = 1000;

impl<'a> DeviceLookups<'a> {
    fn new(registrations: &'a mut Registrations) -> Self {
        Self {
            registrations,
            offline: HashMap::new(),
        }
    }

    /// Looks up those of `users` not looked up yet: the device records of those whose
    /// registrations are not kept, with one store call per [`LOOKUPS_PER_READ`] users, then
    /// the connected devices of those with a device that takes push (most users' devices take
    /// none, or are all connected).
    async fn look_up(
        &mut self,
        notifier: &Notifier,
        users: impl Iterator<Item = &str>,
    ) -> Result<(), StoreError> {
        let wanted: Vec<&str> = users
            .filter(|user| !self.offline.contains_key(*user))
            .collect();
        let unread: Vec<&str> = wanted
            .iter()
            .copied()
            .filter(|user| !self.registrations.devices.contains_key(*user))
            .collect();
        for chunk in unread.chunks(LOOKUPS_PER_READ) {
            let records = notifier.store.devices_of(chunk).await?;
            for (user, records) in chunk.iter().zip(records) {
                let devices = records
                    .into_iter()
                    .filter(|(_, record)| record.takes_push())
                    .map(|(device, _)| device)
                    .collect();
                let slot = push_registration_slot(user);
                self.registrations
                    .devices
                    .insert((*user).to_owned(), (slot, devices));
            }
        }
        for user in wanted {
            let Some((_, registered)) = self.registrations.devices.get(user) else {
                continue;
            };
            if registered.is_empty() {
                continue;
            }
            let connected = notifier.gateways.connected_devices(user).await?;
            let offline = registered
                .iter()
                .filter(|device| !connected.contains(*device))
                .cloned()
                .collect();
            self.offline.insert(user.to_owned(), offline);
        }
        Ok(())
    }

    /// `user`'s devices that take push and are not connected, as looked up.
    fn offline_with_push(&self, user: &str) -> &[String] {
        self.offline.get(user).map_or(&[], Vec::as_slice)
    }
}

pub struct Notifier {
    store: MessageStore,
    gateways: Arc<dyn Gateways>,
    membership: Arc<MembershipCache>,
    providers: Arc<PushProviders>,
    config: NotifierConfig,
    include_text: bool,
    large_group_threshold: usize,
    metrics: Arc<Metrics>,
    dirty: Mutex<BTreeSet<u32>>,
    /// Shards whose expansion failed: failures in a row, and when to try again (ms).
    backoff: Mutex<HashMap<u32, (u32, u64)>>,
    /// Per shard, the notifier's bound in the outbox (read from the store when unknown).
    cursors: ShardCursors,
    /// Per shard, where the outbox is cleared up to (unknown: from its start).
    cleared: ShardCursors,
    /// Shards whose outbox waits for fanout to be cleared ([`OutboxPage::trailing`]).
    trailing: Mutex<BTreeSet<u32>>,
    /// Kept between passes (taken by each pass while it runs).
    registrations: Mutex<Registrations>,
    /// The headers of the entries this process's commits listed, kept for the next passes
    /// once [`Notifier::start`] knows that this process's sequencer is the only one.
    tails: Tails<ListedHeader>,
    wake: Notify,
    /// Told once the tails hold half their bound: the pass starts without waiting out
    /// [`PASS_LINGER`].
    tails_filling: Notify,
    /// The earliest due time of any pending notification (0: unknown, scan).
    next_due_ms: AtomicU64,
    /// Places of silent closes may wait to be notified ([`Notifier::expand_owed`]).
    owed_dirty: AtomicBool,
    /// The providers' blocks, from their answers.
    gates: ProviderGates,
}

impl Notifier {
    pub fn new(
        context: Context,
        providers: Arc<PushProviders>,
        config: NotifierConfig,
        include_text: bool,
        large_group_threshold: usize,
    ) -> Arc<Self> {
        let Context {
            store,
            gateways,
            membership,
            metrics,
        } = context;
        Arc::new(Self {
            store,
            gateways,
            membership,
            providers,
            config,
            include_text,
            large_group_threshold,
            metrics,
            dirty: Mutex::new(BTreeSet::new()),
            backoff: Mutex::new(HashMap::new()),
            cursors: ShardCursors::default(),
            cleared: ShardCursors::default(),
            trailing: Mutex::new(BTreeSet::new()),
            registrations: Mutex::new(Registrations::default()),
            tails: Tails::new(TAILS_MAX_BYTES),
            wake: Notify::new(),
            tails_filling: Notify::new(),
            next_due_ms: AtomicU64::new(0),
            owed_dirty: AtomicBool::new(true),
            gates: ProviderGates::default(),
        })
    }

    /// Starts the notifier as a loop of `loops`; every shard is looked at first (and again
    /// after a restart), from its bound in the store. With `every_shard_each`, every shard is
    /// looked at again that often: for a cluster node, which may miss a notice of another
    /// node's commit.
    /// With `lead`, the notifier runs its passes only while this node leads the push job (one
    /// push node of a cluster at a time, `courier_store::leaders`), checked at start and then
    /// every `every_shard_each` (or idle pass); a node that takes the lead looks at every shard.
    pub fn start(
        self: &Arc<Self>,
        loops: &BackgroundLoops,
        every_shard_each: Option<Duration>,
        lead: Option<JobLead>,
    ) {
        // On a cluster's node other nodes commit to the outboxes too, and nothing lists their
        // entries here.
        self.tails.set_keeping(every_shard_each.is_none());
        let notifier = self.clone();
        loops.spawn("push notifier", move |cancel| {
            let (notifier, lead) = (notifier.clone(), lead.clone());
            async move {
                let round = every_shard_each.unwrap_or(IDLE_PASS);
                let mut looked_at_all = std::time::Instant::now();
                let mut leading = match &lead {
                    Some(lead) => lead.runs_pass(round).await,
                    None => true,
                };
                // A loop restarted after a panic may have taken headers it never expanded.
                notifier.tails.drop_all();
                notifier.mark_all_dirty();
                notifier.owed_dirty.store(true, Ordering::Relaxed);
                loop {
                    if looked_at_all.elapsed() >= round {
                        looked_at_all = std::time::Instant::now();
                        let was_leading = leading;
                        if let Some(lead) = &lead {
                            leading = lead.runs_pass(round).await;
                        }
                        if leading && !was_leading {
                            notifier.took_lead();
                        } else if every_shard_each.is_some() {
                            notifier.mark_all_dirty();
                            // Gateways of other nodes record the places of their silent
                            // closes in the store, and cannot tell this node.
                            notifier.owed_dirty.store(true, Ordering::Relaxed);
                        }
                        notifier.mark_trailing_dirty();
                    }
                    if !leading {
                        // Another node notifies; what this one was told of stays dirty for
                        // the day it leads (it then looks at every shard anyway).
                        if cancel
                            .run_until_cancelled(tokio::time::sleep(round))
                            .await
                            .is_none()
                        {
                            return;
                        }
                        continue;
                    }
                    let more = match notifier.pass().await {
                        Ok(more) => more,
                        Err(e) => {
                            tracing::warn!(error = %e, "push pass failed; retrying");
                            false
                        }
                    };
                    if more {
                        continue;
                    }
                    let next = async {
                        if tokio::time::timeout(IDLE_PASS, notifier.wake.notified())
                            .await
                            .is_ok()
                        {
                            let filling = notifier.tails_filling.notified();
                            let _ = tokio::time::timeout(PASS_LINGER, filling).await;
                        }
                    };
                    if cancel.run_until_cancelled(next).await.is_none() {
                        return;
                    }
                }
            }
        });
    }

    /// Expands the outbox of every dirty shard that is not backing off, then sends what is
    /// due (scanning the pending notifications only once the earliest of them is due). A
    /// shard whose messages cannot be expanded stays dirty and is tried again after a backoff;
    /// it holds back neither the other shards nor the sends. Returns whether a shard was left
    /// with more messages than one pass takes.
    async fn pass(&self) -> Result<bool, StoreError> {
        let dirty = std::mem::take(&mut *self.dirty.lock().unwrap_or_else(|e| e.into_inner()));
        let (ready, waiting): (Vec<u32>, Vec<u32>) = dirty
            .into_iter()
            .partition(|&shard| !self.backing_off(shard));
        for shard in waiting {
            self.mark_dirty(shard);
        }
        let expanded = self.expand(ready).await;
        for (shard, e) in &expanded.failed {
            tracing::warn!(shard, error = %e, "outbox not expanded into push notifications; retrying later");
            // What it took from the tail is read again from the outbox.
            self.tails.drop_shard(*shard);
            self.back_off(*shard);
            self.mark_dirty(*shard);
        }
        let mut more = expanded.more;
        if self.owed_dirty.swap(false, Ordering::Relaxed) {
            match self.expand_owed().await {
                Ok(false) => {}
                Ok(true) => {
                    self.owed_dirty.store(true, Ordering::Relaxed);
                    more = true;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "places of silent closes not expanded into push notifications; retrying at the next pass");
                    self.owed_dirty.store(true, Ordering::Relaxed);
                }
            }
        }
        if now_ms() >= self.next_due_ms.load(Ordering::Relaxed)
            && let Err(e) = self.send_due().await
        {
            // Not everything was seen: scan again next time.
            self.next_due_ms.store(0, Ordering::Relaxed);
            return Err(e);
        }
        Ok(more)
    }

    fn mark_all_dirty(&self) {
        self.dirty
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend(0..self.store.shard_count());
    }

    /// This node leads the notifier again: another node may have moved the bounds meanwhile,
    /// so they are read from the store, and every shard is looked at.
    fn took_lead(&self) {
        self.tails.drop_all();
        self.cursors.forget_all();
        self.mark_all_dirty();
        self.owed_dirty.store(true, Ordering::Relaxed);
    }

    fn mark_trailing_dirty(&self) {
        let trailing =
            std::mem::take(&mut *self.trailing.lock().unwrap_or_else(|e| e.into_inner()));
        self.dirty
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend(trailing);
    }

    fn mark_dirty(&self, shard: u32) {
        self.dirty
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(shard);
    }

    fn backing_off(&self, shard: u32) -> bool {
        let backoff = self.backoff.lock().unwrap_or_else(|e| e.into_inner());
        backoff
            .get(&shard)
            .is_some_and(|&(_, retry_at)| now_ms() < retry_at)
    }

    fn back_off(&self, shard: u32) {
        let mut backoff = self.backoff.lock().unwrap_or_else(|e| e.into_inner());
        let failures = backoff.get(&shard).map_or(0, |&(n, _)| n) + 1;
        let wait = IDLE_PASS
            .saturating_mul(1 << (failures - 1).min(16))
            .min(MAX_SHARD_BACKOFF);
        backoff.insert(shard, (failures, now_ms() + wait.as_millis() as u64));
    }

    /// Turns a page of the outbox of each of `shards` into pending notifications, in one
    /// commit for all of them (a pass of the notifier commits once, however many shards had
    /// messages). When that commit fails, each shard's part is committed alone, so that a
    /// shard that cannot be expanded holds back none of the others. A shard left with more
    /// messages than it gave is marked dirty again. Each message counts once per notification:
    /// a message at or below a notification's `last_seq` was counted by an expansion that
    /// failed before moving the bound.
    async fn expand(&self, shards: Vec<u32>) -> Expanded {
        let mut expanded = Expanded::default();
        if shards.is_empty() {
            return expanded;
        }
        let delivered = match self.bounds_of(&shards).await {
            Ok(delivered) => delivered,
            Err(e) => {
                expanded.failed = shards.into_iter().map(|s| (s, e.clone())).collect();
                return expanded;
            }
        };
        // Every shard's page is taken from its tail or read, all of them at once, before the
        // registrations are looked at (see `Registrations`); a page that finds no room left is
        // read again by a later pass.
        let mut read = Vec::new();
        let mut unread = Vec::new();
        for (shard, delivered) in shards.iter().copied().zip(delivered) {
            let from = self.cursors.get(shard);
            match self.tails.take(shard, from.as_deref(), SHARD_PAGE) {
                Some((kept, more)) => {
                    let entries = kept.into_iter().map(|kept| (kept.key, Ok(kept.header)));
                    read.push((shard, delivered, from, entries.collect(), more));
                }
                None => unread.push((shard, delivered, from)),
            }
        }
        if !unread.is_empty() {
            let positions: Vec<(u32, Option<Vec<u8>>)> = unread
                .iter()
                .map(|(shard, _, from)| (*shard, from.clone()))
                .collect();
            self.metrics
                .outbox_pages_read
                .get_or_create(&ReaderLabel { reader: "push" })
                .inc_by(positions.len() as u64);
            let per_shard = (OUTBOX_READ_ENTRIES / positions.len()).clamp(OUTBOX_PAGE, SHARD_PAGE);
            let read_pages = self
                .store
                .outbox_headers(&positions, OUTBOX_PAGE, per_shard)
                .await;
            let pages = match read_pages {
                Ok(pages) => pages,
                Err(e) => {
                    expanded.failed = shards.into_iter().map(|s| (s, e.clone())).collect();
                    return expanded;
                }
            };
            for ((shard, delivered, from), (entries, more)) in unread.into_iter().zip(pages) {
                if !more {
                    self.tails.complete(shard);
                }
                read.push((shard, delivered, from, entries, more));
            }
        }
        let mut registrations =
            std::mem::take(&mut *self.registrations.lock().unwrap_or_else(|e| e.into_inner()));
        if let Err(e) = registrations.refresh(&self.store).await {
            let shards = read.into_iter().map(|(shard, ..)| (shard, e.clone()));
            expanded.failed.extend(shards);
            return expanded;
        }
        let mut pages = Vec::new();
        let mut devices = DeviceLookups::new(&mut registrations);
        let mut room = PENDING_PER_PASS;
        for (shard, delivered, from, entries, more) in read {
            // The store's reads return without waiting on the embedded engine, so a pass over
            // many pages would hold its thread, and the shard actors beside it, until it ends.
            tokio::task::yield_now().await;
            // Where the page ends if it takes every entry given: a page that ends before (or
            // is not taken) leaves entries that the shard's tail no longer has.
            let through = entries.last().map(|(key, _)| bound_after(key));
            if room == 0 {
                self.tails.drop_shard(shard);
                self.mark_dirty(shard);
                expanded.more = true;
                continue;
            }
            let page = self
                .page(shard, from, (entries, more), delivered, room, &mut devices)
                .await;
            match page {
                Ok(Some(page)) => {
                    if through.is_some_and(|through| through != page.bound.bound) {
                        self.tails.drop_shard(shard);
                    }
                    room = room.saturating_sub(page.pending.len());
                    if page.more {
                        self.mark_dirty(shard);
                        expanded.more = true;
                    }
                    pages.push(page);
                }
                Ok(None) => self.expanded(shard, None),
                Err(e) => expanded.failed.push((shard, e)),
            }
        }
        *self.registrations.lock().unwrap_or_else(|e| e.into_inner()) = registrations;
        if pages.len() > 1 && self.commit_pages(&pages).await.is_ok() {
            for page in pages {
                self.expanded(page.bound.shard, Some(page));
            }
            return expanded;
        }
        for page in pages {
            match self.commit_pages(std::slice::from_ref(&page)).await {
                Ok(()) => self.expanded(page.bound.shard, Some(page)),
                Err(e) => expanded.failed.push((page.bound.shard, e)),
            }
        }
        expanded
    }

    /// A notification, counting nothing yet, opened by a message committed at `committed_ms`
    /// in a conversation of `members` members: quiet in a large group, and due once its
    /// collapse (`--push-collapse`, or `--push-quiet-collapse` when quiet) has passed.
    fn opened(&self, members: usize, committed_ms: u64, now: u64) -> PendingPush {
        let quiet = members > self.large_group_threshold;
        let collapse = if quiet {
            self.config.push_quiet_collapse
        } else {
            self.config.push_collapse
        };
        PendingPush {
            due_ms: due_after(committed_ms, collapse, now),
            quiet,
            ..PendingPush::default()
        }
    }

    /// Turns a page of the places silent closes left ([`MessageStore::owe_pushes`]: a
    /// connection closed because its client read nothing for two ping intervals, or dropped
    /// because it took nothing of a write for the gateway's write timeout: an app its OS
    /// suspended) into pending notifications, as if the device had been offline when the
    /// events it was written there were sent: the messages of others above the device's
    /// delivered cursor (the latest [`OWED_EVENTS`] events of each place at most), collapsed
    /// into the device's notification of the conversation like any (counted once by seq:
    /// those the outbox's expansion counted, while the device was offline for part of the
    /// window, are not counted again), quiet in a large group, due `--push-collapse` after
    /// the latest of them. A device without a registration, unlinked, or connected again
    /// (its new connection's catch-up writes them) is not notified. Every place read is
    /// cleared in the commit that writes the notifications. Returns whether more places wait.
    async fn expand_owed(&self) -> Result<bool, StoreError> {
        let owed = self.store.owed_pushes(OWED_PAGE).await?;
        if owed.is_empty() {
            return Ok(false);
        }
        let mut by_device: BTreeMap<(&str, &str), Vec<&OwedPush>> = BTreeMap::new();
        for place in &owed {
            match &place.device {
                Some((user, device, _)) => by_device.entry((user, device)).or_default().push(place),
                None => tracing::error!(
                    key = %place.key.escape_ascii(),
                    "a place of a silent close whose key does not decode is cleared"
                ),
            }
        }
        let now = now_ms();
        let mut pending = Vec::new();
        for ((user, device), places) in by_device {
            match self.owed_device(user, device, &places, now).await {
                Ok(made) => pending.extend(made),
                Err(error @ StoreError::Corrupt { .. }) => tracing::error!(
                    user,
                    device,
                    %error,
                    "stored data that does not decode: the device is not notified of what its silent connection was written"
                ),
                Err(e) => return Err(e),
            }
        }
        self.store.settle_owed_pushes(&owed, &pending).await?;
        if let Some(due) = pending.iter().map(|(_, p)| p.due_ms).min() {
            self.next_due_ms.fetch_min(due, Ordering::Relaxed);
        }
        Ok(owed.len() == OWED_PAGE)
    }

    /// The pending notifications of `user`'s `device` for its `places` ([`Self::expand_owed`]).
    async fn owed_device(
        &self,
        user: &str,
        device: &str,
        places: &[&OwedPush],
        now: u64,
    ) -> Result<Vec<(DeviceKey, PendingPush)>, StoreError> {
        let takes_push = self
            .store
            .device(user, device)
            .await?
            .is_some_and(|record| record.takes_push());
        if !takes_push
            || self
                .gateways
                .connected_devices(user)
                .await?
                .iter()
                .any(|connected| connected == device)
        {
            return Ok(Vec::new());
        }
        let keys: Vec<DeviceKey> = places
            .iter()
            .filter_map(|place| place.device.clone())
            .collect();
        let states = self.store.push_states(&keys).await?;
        let mut made = Vec::new();
        for ((key, (cursor, stored)), place) in keys.into_iter().zip(states).zip(places) {
            if cursor >= place.through {
                // It acknowledged all of it before the connection closed.
                continue;
            }
            let Some(entry) = self
                .owed_entry(&key, cursor, place.through, stored, now)
                .await?
            else {
                continue;
            };
            made.push((key, entry));
        }
        Ok(made)
    }

    /// The notification of `key`'s device in its conversation for the messages of others in
    /// `(cursor, through]`, merged into `stored`; `None` when it counts none.
    async fn owed_entry(
        &self,
        (user, _, conv): &DeviceKey,
        cursor: u64,
        through: u64,
        stored: Option<PendingPush>,
        now: u64,
    ) -> Result<Option<PendingPush>, StoreError> {
        let from = cursor.max(through.saturating_sub(OWED_EVENTS as u64));
        let events = self.store.events(conv, from, through, OWED_EVENTS).await?;
        let messages: Vec<EventHeader> = events
            .iter()
            .map(EventHeader::of)
            .filter(|header| header.is_message() && header.sender() != user)
            .collect();
        let Some(last) = messages.last() else {
            return Ok(None);
        };
        let members = self.membership.members_at(conv, last.seq).await?;
        if !members.iter().any(|member| member == user) {
            return Ok(None);
        }
        let mut entry = stored.unwrap_or_else(|| self.opened(members.len(), last.ts_ms, now));
        let counted = entry.count;
        for message in &messages {
            count_message(&mut entry, message.seq, message.sender());
        }
        Ok((entry.count != counted).then_some(entry))
    }

    /// Fanout's bound of each of `shards`, with one read, after taking the notifier's own
    /// bounds from the store for the shards it does not know yet (one read too).
    async fn bounds_of(&self, shards: &[u32]) -> Result<Vec<Option<Vec<u8>>>, StoreError> {
        let unknown: Vec<u32> = shards
            .iter()
            .copied()
            .filter(|&shard| self.cursors.get(shard).is_none())
            .collect();
        if !unknown.is_empty() {
            let pushed = self.store.pushed_bounds(&unknown).await?;
            let recorded: Vec<(u32, Vec<u8>)> = unknown
                .into_iter()
                .zip(pushed)
                .filter_map(|(shard, bound)| Some((shard, bound?)))
                .collect();
            // Each outbox's newest entry, read after the bound (a commit meanwhile only
            // raises it), a few shards at a time: at a take of the lead, every shard's.
            let starts: Vec<(u32, Vec<u8>)> = futures::stream::iter(recorded)
                .map(|(shard, bound)| async move {
                    let newest = self.store.last_outbox_key(shard).await?;
                    let start = self.starting_bound(shard, bound, newest.as_deref());
                    Ok::<_, StoreError>((shard, start))
                })
                .buffered(BOUND_CHECKS_IN_FLIGHT)
                .try_collect()
                .await?;
            for (shard, start) in starts {
                self.cursors.set(shard, start);
            }
        }
        self.store.delivered_bounds(shards).await
    }

    /// Where the notifier reads `shard`'s outbox from, with its `recorded` bound there and the
    /// `newest` entry the outbox holds (read after it): the bound, unless it lies past every
    /// entry held. The notifier clears the outbox from its start only, below its own bound
    /// and fanout's, so such a bound is damage (or a hostile write) when entries are held, and
    /// is then logged at error; with none held it may also be where the notifier stopped after
    /// it cleared everything. Either way the read starts at the outbox's start, which is below
    /// every entry held: those are pushed again (re-expansion counts none twice), and none is
    /// skipped. Taken as it was, a bound past every entry held read nothing, pushed nothing,
    /// and the outbox was cleared below fanout's bound all the same; a bound past the stamps
    /// of the commits to come left every new message of the shard below it, never pushed.
    fn starting_bound(&self, shard: u32, recorded: Vec<u8>, newest: Option<&[u8]>) -> Vec<u8> {
        let after_newest = newest.map(bound_after);
        match after_newest {
            Some(after) if recorded <= after => return recorded,
            Some(_) => tracing::error!(
                shard,
                bound = %recorded.escape_ascii(),
                "the push notifier's recorded bound lies past every entry of the outbox: the entries held are pushed again"
            ),
            None => {}
        }
        self.store.keys().outbox(shard).start
    }

    /// The `entries` of `shard`'s outbox read from `from` (`None`: nothing new, nothing to
    /// clear), with whether the outbox holds `more` after them, as pending notifications, at
    /// most about `room` of them: the page ends after the message that reaches it (one large
    /// group's devices may go beyond it). Events other than messages notify nobody; the page
    /// passes over them. An entry (or a whole row) that does not decode is passed over too,
    /// logged and counted: its messages are not pushed (fanout passes it over as well; the
    /// recipients read them from the event log at their next catch-up); held for it, the
    /// shard would push nothing more and its outbox would never be cleared again. The outbox
    /// is cleared below the page's end and `delivered`, fanout's bound.
    async fn page(
        &self,
        shard: u32,
        from: Option<Vec<u8>>,
        (entries, mut more): OutboxHeaders,
        delivered: Option<Vec<u8>>,
        room: usize,
        devices: &mut DeviceLookups<'_>,
    ) -> Result<Option<OutboxPage>, StoreError> {
        let read = entries.len();
        let mut bound = from;
        let now = now_ms();
        let mut pending: HashMap<DeviceKey, PendingPush> = HashMap::new();
        // Each offline device's delivered cursor in the conversation and stored notification,
        // read once per page, [`LOOKUPS_PER_READ`] devices per store call.
        let mut states: HashMap<DeviceKey, (u64, Option<PendingPush>)> = HashMap::new();
        for (taken, (key, event)) in entries.into_iter().enumerate() {
            if pending.len() >= room {
                more |= taken < read;
                break;
            }
            if taken > 0 && taken % ENTRIES_PER_YIELD == 0 {
                tokio::task::yield_now().await;
            }
            bound = Some(bound_after(&key));
            let event = match event {
                Ok(event) => event,
                Err(error) => {
                    tracing::error!(
                        shard,
                        key = %key.escape_ascii(),
                        %error,
                        "an outbox entry that does not decode is passed over: its messages are not pushed"
                    );
                    self.metrics
                        .outbox_undecodable_entries
                        .get_or_create(&ReaderLabel { reader: "push" })
                        .inc();
                    continue;
                }
            };
            if !event.is_message() {
                continue;
            }
            let conv = event.conversation_id.as_str();
            let members = self.membership.members_at(conv, event.seq).await?;
            let others = members
                .iter()
                .filter(|member| member.as_str() != event.sender());
            devices
                .look_up(self, others.clone().map(String::as_str))
                .await?;
            let offline: Vec<DeviceKey> = others
                .flat_map(|member| {
                    devices
                        .offline_with_push(member)
                        .iter()
                        .map(|device| (member.clone(), device.clone(), conv.to_owned()))
                })
                .collect();
            let unread: Vec<DeviceKey> = offline
                .iter()
                .filter(|key| !states.contains_key(*key))
                .cloned()
                .collect();
            for chunk in unread.chunks(LOOKUPS_PER_READ) {
                let chunk_states = self.store.push_states(chunk).await?;
                states.extend(chunk.iter().cloned().zip(chunk_states));
            }
            for key in offline {
                let Some((cursor, stored)) = states.get_mut(&key) else {
                    continue;
                };
                if *cursor >= event.seq {
                    // It took the message before it went away.
                    continue;
                }
                let entry = pending.remove(&key).or_else(|| stored.take());
                let mut entry =
                    entry.unwrap_or_else(|| self.opened(members.len(), event.ts_ms, now));
                count_message(&mut entry, event.seq, event.sender());
                pending.insert(key, entry);
            }
        }
        let Some(bound) = bound else {
            return Ok(None);
        };
        // Cleared below both bounds: what fanout has not delivered stays.
        let (clear_to, trailing) = match delivered {
            Some(delivered) if delivered < bound => (Some(delivered), true),
            Some(_) => (Some(bound.clone()), false),
            None => (None, true),
        };
        let clear = clear_to.and_then(|to| {
            let from = self
                .cleared
                .get(shard)
                .unwrap_or_else(|| self.store.keys().outbox(shard).start);
            (from < to).then_some(from..to)
        });
        if read == 0 && clear.is_none() {
            return Ok(None);
        }
        Ok(Some(OutboxPage {
            bound: PushedBound {
                shard,
                bound,
                clear,
            },
            pending: pending.into_iter().collect(),
            more,
            trailing,
        }))
    }

    /// Writes the pending notifications of `pages` and moves their bounds.
    async fn commit_pages(&self, pages: &[OutboxPage]) -> Result<(), StoreError> {
        let bounds: Vec<PushedBound> = pages.iter().map(|page| page.bound.clone()).collect();
        let pending: Vec<_> = pages
            .iter()
            .flat_map(|page| page.pending.iter().cloned())
            .collect();
        self.store.expand_outbox(&bounds, &pending).await
    }

    /// `shard` was expanded (through `page`, if it had anything to do): it no longer backs
    /// off, and its next read starts after the page.
    fn expanded(&self, shard: u32, page: Option<OutboxPage>) {
        self.backoff
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&shard);
        let Some(page) = page else {
            return;
        };
        if let Some(due) = page.pending.iter().map(|(_, p)| p.due_ms).min() {
            self.next_due_ms.fetch_min(due, Ordering::Relaxed);
        }
        if let Some(clear) = page.bound.clear {
            self.cleared.set(shard, clear.end);
        }
        if page.trailing {
            self.trailing
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(shard);
        }
        self.cursors.set(shard, page.bound.bound);
    }

    /// Sends every due notification, [`SENDS_IN_FLIGHT`] at a time, reading the pending ones a
    /// page at a time as the sends go (the last sends of a page do not hold back the next
    /// page's). Once one fails no more are started: those in flight finish, each settled once,
    /// and the first failure is returned.
    async fn send_due(&self) -> Result<(), StoreError> {
        self.next_due_ms.store(u64::MAX, Ordering::Relaxed);
        // Boxed: unboxed, rustc fails to prove the notifier's loop `Send` through this stream
        // ("one type is more general than the other", a limit of its higher-ranked checks).
        let pages =
            futures::stream::try_unfold(Some(None), |after: Option<Option<Vec<u8>>>| async move {
                let Some(after) = after else {
                    return Ok(None);
                };
                let page = self
                    .store
                    .pending_pushes(after.as_deref(), PENDING_PAGE)
                    .await?;
                let next = page.last().map(|(last, _)| Some(last.clone()));
                Ok(Some((page, next)))
            })
            .boxed();
        let due = pages
            .map_ok(|page| {
                let now = now_ms();
                // One that does not decode is due: to be cleared.
                let due = page.into_iter().filter(move |(_, pending)| match pending {
                    Ok(pending) if pending.due_ms > now => {
                        self.next_due_ms
                            .fetch_min(pending.due_ms, Ordering::Relaxed);
                        false
                    }
                    _ => true,
                });
                futures::stream::iter(due.map(Ok))
            })
            .try_flatten();
        let failed = AtomicBool::new(false);
        let mut sends = std::pin::pin!(
            due.take_while(|_| std::future::ready(!failed.load(Ordering::Relaxed)))
                .map(|due| async move {
                    let (key, pending) = due?;
                    match pending {
                        Ok(pending) => self.send_readable(&key, pending).await,
                        Err(error) => self.unreadable(&key, None, &error).await,
                    }
                })
                .buffer_unordered(SENDS_IN_FLIGHT)
        );
        let mut outcome = Ok(());
        while let Some(sent) = sends.next().await {
            if let Err(e) = sent {
                failed.store(true, Ordering::Relaxed);
                outcome = outcome.and(Err(e));
            }
        }
        outcome
    }

    /// Sends `pending` ([`Notifier::send`]), unless what it needs of the store does not decode
    /// (its device record, its message...): then it is given up ([`Notifier::unreadable`]),
    /// as the store would refuse it the same way at every pass.
    async fn send_readable(&self, key: &[u8], pending: PendingPush) -> Result<(), StoreError> {
        match self.send(key, pending.clone()).await {
            Err(error @ StoreError::Corrupt { .. }) => {
                self.unreadable(key, Some(&pending), &error).await
            }
            other => other,
        }
    }

    /// Gives up the notification at `key` (`pending`, or none when it does not decode itself)
    /// for stored data that does not decode: logged at error, counted `failed` and cleared.
    /// Left, it failed every send pass, which stopped there, so that no notification after it
    /// in key order was sent again.
    async fn unreadable(
        &self,
        key: &[u8],
        pending: Option<&PendingPush>,
        error: &StoreError,
    ) -> Result<(), StoreError> {
        tracing::error!(
            key = %key.escape_ascii(),
            %error,
            "a push notification whose stored data does not decode is given up"
        );
        self.count("failed");
        match pending {
            Some(pending) => self.settle(key, pending, None).await,
            None => self.store.clear_undecodable_pending_push(key).await,
        }
    }

    async fn send(&self, key: &[u8], pending: PendingPush) -> Result<(), StoreError> {
        let Some((user, device, conv)) = self.store.keys().pending_push_parts(key) else {
            return self.store.settle_pending_push(key, &pending, None).await;
        };
        let record = self.store.device(&user, &device).await?.unwrap_or_default();
        let provider = self.providers.provider(&record.push_provider);
        let (Some(provider), false) = (provider, record.push_token.is_empty()) else {
            // Unregistered meanwhile, or a provider this server no longer has: drop it.
            self.count("dropped");
            return self.settle(key, &pending, None).await;
        };
        if self.store.push_token_taken(&user, &device, &record).await? {
            // Registered before the index of tokens, and by another device since: the app
            // instance is someone else's now (`courier_store::push_tokens`), unless the
            // device registered again meanwhile.
            if !self
                .store
                .drop_taken_push_token(&user, &device, &record)
                .await?
            {
                return self.registered_again(key, &pending).await;
            }
            self.count("dropped");
            return self.settle(key, &pending, None).await;
        }
        if self.store.device_cursor(&user, &device, &conv).await? >= pending.last_seq {
            // The device connected and took the messages while the notification waited.
            self.count("delivered");
            return self.settle(key, &pending, None).await;
        }
        let (_, read) = self.store.receipt(&conv, &user).await?;
        if read >= pending.last_seq {
            // The user read the messages on another device while the notification waited.
            self.count("read");
            return self.settle(key, &pending, None).await;
        }
        let ticket = match self
            .gates
            .admit(&record.push_provider, &record.push_token)
            .await
        {
            Admission::Send(ticket) => ticket,
            Admission::Postpone(until) => {
                // The provider asked to be left alone: no request, no attempt spent.
                self.count("postponed");
                let next = PendingPush {
                    due_ms: until,
                    ..pending.clone()
                };
                self.next_due_ms.fetch_min(until, Ordering::Relaxed);
                return self.settle(key, &pending, Some(&next)).await;
            }
        };
        // Read again once admitted: the wait for a provider's probe (up to `PROBE_WAIT`) is
        // time enough for the device to be unlinked (a lost phone must not get it) or to
        // register again.
        let now = self.store.device(&user, &device).await?.unwrap_or_default();
        if (&now.push_provider, &now.push_token) != (&record.push_provider, &record.push_token) {
            drop(ticket);
            if now.push_token.is_empty() {
                self.count("dropped");
                return self.settle(key, &pending, None).await;
            }
            return self.registered_again(key, &pending).await;
        }
        // Read once the provider takes a request: a postponed notification reads no event.
        let notification = Notification {
            conversation_id: conv.clone(),
            seq: pending.last_seq,
            sender: pending.sender.clone(),
            count: pending.count,
            text: self.text_of(&conv, pending.last_seq).await?,
            quiet: pending.quiet,
        };
        let answer = provider.send(&record.push_token, &notification).await;
        let now = now_ms();
        ticket.answered(&answer, now);
        match answer {
            Ok(()) => {
                self.count("sent");
                self.settle(key, &pending, None).await
            }
            Err(PushError::Retry { after } | PushError::Throttled { after })
                if next_attempt(&pending) < MAX_ATTEMPTS =>
            {
                let delay = next_delay(next_attempt(&pending), after);
                self.retry(key, &pending, now + delay.as_millis() as u64)
                    .await
            }
            Err(PushError::InvalidToken) => {
                self.count("invalid_token");
                if !Devices::new(self.store.clone())
                    .drop_push(&user, &device, &record.push_token)
                    .await?
                {
                    return self.registered_again(key, &pending).await;
                }
                tracing::info!(%user, %device, "push token refused by the provider; removed");
                self.settle(key, &pending, None).await
            }
            Err(e) => {
                self.count("failed");
                tracing::warn!(%user, %device, error = ?e, "push notification given up");
                self.settle(key, &pending, None).await
            }
        }
    }

    /// Keeps `pending` for another attempt at `due_ms`.
    async fn retry(
        &self,
        key: &[u8],
        pending: &PendingPush,
        due_ms: u64,
    ) -> Result<(), StoreError> {
        self.count("retried");
        let next = PendingPush {
            attempts: next_attempt(pending),
            due_ms,
            ..pending.clone()
        };
        self.next_due_ms.fetch_min(due_ms, Ordering::Relaxed);
        self.settle(key, pending, Some(&next)).await
    }

    /// The registration `pending` was being sent with was to end (taken by another device, or
    /// refused by the provider), but its drop found the device's registration changed since
    /// it was read (registered again, with a new token or the same one): the notification is
    /// tried again with the registration the next pass reads, if it has an attempt left.
    async fn registered_again(&self, key: &[u8], pending: &PendingPush) -> Result<(), StoreError> {
        if next_attempt(pending) < MAX_ATTEMPTS {
            return self.retry(key, pending, now_ms()).await;
        }
        self.count("failed");
        self.settle(key, pending, None).await
    }

    /// Settles a notification; if more messages were collapsed into it meanwhile, it stays
    /// for the next pass.
    async fn settle(
        &self,
        key: &[u8],
        seen: &PendingPush,
        next: Option<&PendingPush>,
    ) -> Result<(), StoreError> {
        match self.store.settle_pending_push(key, seen, next).await {
            Err(StoreError::FenceChanged { .. }) => Ok(()),
            other => other,
        }
    }

    async fn text_of(&self, conv: &str, seq: u64) -> Result<Option<String>, StoreError> {
        if !self.include_text {
            return Ok(None);
        }
        Ok(
            match self.store.event(conv, seq).await?.map(|e| e.payload) {
                Some(EventPayload::Message {
                    body: Some(Body::Text(text)),
                    ..
                }) => Some(text),
                _ => None,
            },
        )
    }

    fn count(&self, outcome: &'static str) {
        self.metrics
            .push_notifications
            .get_or_create(&OutcomeLabel { outcome })
            .inc();
    }
}

/// Counts the message `seq` of `sender` in `entry`, unless it counts it already (a
/// notification counts its conversation's messages in seq order, through its `last_seq`).
/// The number of `pending`'s next attempt. Its attempts are read from the store: at
/// `u32::MAX` they are damage, and the next is no more (then it is given up, out of attempts),
/// never wrapped round to 0.
fn next_attempt(pending: &PendingPush) -> u32 {
    pending.attempts.saturating_add(1)
}

fn count_message(entry: &mut PendingPush, seq: u64, sender: &str) {
    if entry.last_seq < seq {
        entry.count = entry.count.saturating_add(1);
        entry.last_seq = seq;
        entry.sender = sender.to_owned();
    }
}

/// When a notification opened by a message committed at `committed_ms` is due: `collapse`
/// after the commit (a pass that reads the message later shortens its wait, never lengthens
/// it), and never before `now`.
fn due_after(committed_ms: u64, collapse: Duration, now: u64) -> u64 {
    committed_ms
        .saturating_add(collapse.as_millis() as u64)
        .max(now)
}

impl OwedPushListener for Notifier {
    /// A gateway of this process recorded the places of a silent close: read at the next pass.
    fn owed(&self) {
        self.owed_dirty.store(true, Ordering::Relaxed);
        self.wake.notify_one();
    }
}

impl CommitListener for Notifier {
    /// Entries nobody listed: the shard's outbox is read.
    fn committed(&self, shard: u32, _events: usize) {
        self.tails.drop_shard(shard);
        self.mark_dirty(shard);
        self.wake.notify_one();
    }

    /// Keeps the entries' headers in the shard's tail if it has one.
    fn committed_listed(&self, shard: u32, entries: &[ListedEntry]) {
        self.tails
            .listed(shard, entries.iter().map(ListedHeader::of));
        self.mark_dirty(shard);
        self.wake.notify_one();
        if self.tails.bytes() > TAILS_MAX_BYTES / 2 {
            self.tails_filling.notify_one();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::providers::PushConfig;
    use clap::Parser;
    use courier_core::gateways::NoGateways;
    use courier_proto::Sender;
    use courier_store::faulty_engine::{FaultyEngine, touches};
    use courier_store::ownership::Duty;
    use courier_store::{
        Append, AppendKey, Batch, DeliveredBound, DeviceRecord, HeadCache, KvEngine, ReceiptKind,
        ShardLease,
    };
    use futures::FutureExt;

    #[derive(Parser)]
    struct Flags {
        #[command(flatten)]
        push: PushConfig,
    }

    /// A webhook endpoint that answers every notification with `status` (and `Retry-After`)
    /// after `delay`, and records the device token and conversation of each as it arrives.
    async fn scripted_webhook(
        status: u16,
        retry_after: Option<&'static str>,
        delay: Duration,
    ) -> (PushProviders, Arc<Mutex<Vec<(String, String)>>>) {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let recorded = seen.clone();
        let app = axum::Router::new().fallback(move |body: axum::body::Bytes| {
            let recorded = recorded.clone();
            async move {
                let json: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
                let field = |name: &str| json[name].as_str().unwrap_or_default().to_owned();
                recorded
                    .lock()
                    .unwrap()
                    .push((field("device_token"), field("conversation_id")));
                tokio::time::sleep(delay).await;
                let mut headers = axum::http::HeaderMap::new();
                if let Some(after) = retry_after {
                    headers.insert("retry-after", after.parse().unwrap());
                }
                (
                    axum::http::StatusCode::from_u16(status).unwrap(),
                    headers,
                    "{}",
                )
            }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        let flags = Flags::try_parse_from([
            "courier",
            "--push-webhook-url",
            &url,
            "--push-webhook-secret",
            "s",
        ])
        .unwrap();
        (PushProviders::from_config(&flags.push).unwrap(), seen)
    }

    /// A webhook endpoint that accepts every notification at once.
    async fn webhook() -> (PushProviders, Arc<Mutex<Vec<(String, String)>>>) {
        scripted_webhook(200, None, Duration::ZERO).await
    }

    /// Whether the webhook got a notification of `conv`.
    fn notified(seen: &Mutex<Vec<(String, String)>>, conv: &str) -> bool {
        seen.lock().unwrap().iter().any(|(_, c)| c == conv)
    }

    fn notifier(
        store: &MessageStore,
        providers: PushProviders,
        collapse: Duration,
    ) -> Arc<Notifier> {
        let context = Context {
            store: store.clone(),
            gateways: Arc::new(NoGateways),
            membership: Arc::new(MembershipCache::new(store.clone())),
            metrics: Arc::new(Metrics::new()),
        };
        let config = NotifierConfig {
            push_collapse: collapse,
            push_quiet_collapse: collapse,
        };
        Notifier::new(context, Arc::new(providers), config, false, 1000)
    }

    async fn append(store: &MessageStore, append: Append) {
        let shard = store.shard_of(&append.conversation_id);
        let lease = store
            .acquire_shards(Duty::Sequencing, "test", &[shard], usize::MAX, 0, u64::MAX)
            .await
            .unwrap()[0];
        store
            .append(lease, &mut HeadCache::default(), &[append])
            .await
            .unwrap();
    }

    /// A change of a device record that registers `token` with the webhook.
    fn registered(token: &str) -> impl Fn(Option<&DeviceRecord>) -> Option<DeviceRecord> {
        let token = token.to_owned();
        move |record| {
            let mut record = record.cloned().unwrap_or_default();
            record.push_provider = "webhook".into();
            record.push_token = token.clone();
            Some(record)
        }
    }

    /// Two passes of sending, Ann's phone registering `token` just before the first commit of
    /// the first (the drop of the registration being sent to).
    async fn send_while_ann_registers(
        engine: &FaultyEngine,
        store: &MessageStore,
        notifier: &Notifier,
        token: &'static str,
    ) {
        let racing = store.clone();
        engine.before_next_commit(Box::pin(async move {
            racing
                .register_push_token("ann", "phone", registered(token))
                .await
                .unwrap();
        }));
        notifier.send_due().await.unwrap();
        notifier.send_due().await.unwrap();
    }

    /// Ann's phone holds the token Bob's phone registers later, and the index of tokens has
    /// no entry for it, as for registrations written before the index.
    async fn ann_holds_bobs_token_from_before_the_index(
        engine: &FaultyEngine,
        store: &MessageStore,
    ) {
        store
            .update_device("ann", "phone", registered("bob"))
            .await
            .unwrap();
        let mut batch = Batch::new();
        batch.clear(store.keys().push_token("webhook", "bob"));
        engine.commit(batch).await.unwrap();
    }

    /// Expands the shard of `g:1` into pending notifications, none failing.
    async fn expand_the_group(notifier: &Notifier, store: &MessageStore) {
        assert!(
            notifier
                .expand(vec![store.shard_of("g:1")])
                .await
                .failed
                .is_empty()
        );
    }

    /// Registers `user`'s phone for push.
    async fn register_phone(store: &MessageStore, user: &str) {
        store
            .update_device(user, "phone", registered(user))
            .await
            .unwrap();
    }

    /// A phone registered with a token before the index of tokens existed, and registered by
    /// another user since (signed in on the same app instance), is not notified with it: its
    /// user's messages would show on the other user's screen.
    #[tokio::test]
    async fn a_token_another_user_registered_since_is_not_notified_for_the_first() {
        let engine = FaultyEngine::new();
        let store = engine.store(4).await;
        ann_holds_bobs_token_from_before_the_index(&engine, &store).await;
        let members = vec!["cat".to_owned(), "ann".to_owned(), "bob".to_owned()];
        group_with_a_message_and_push(&store, "g:1", &members, &["bob".to_owned()]).await;
        let (providers, seen) = webhook().await;
        let notifier = notifier(&store, providers, Duration::ZERO);
        expand_the_group(&notifier, &store).await;
        notifier.send_due().await.unwrap();
        assert_eq!(seen.lock().unwrap().len(), 1, "Bob's phone, once");
        let ann = store.device("ann", "phone").await.unwrap().unwrap();
        assert_eq!(ann.push_token, "", "Ann's stale registration was dropped");
    }

    /// Ann's phone holds a token from before the index that Bob's phone registered since, and
    /// the notifier drops it; but Ann's app registers again just before that drop commits
    /// (with a new token, or with Bob's again, as Ann signing in there once more). The drop
    /// leaves the new registration, and Ann's notification goes to it, not nowhere.
    #[tokio::test]
    async fn a_device_that_registered_again_while_its_taken_token_was_dropped_is_notified() {
        for again in ["ann", "bob"] {
            let engine = FaultyEngine::new();
            let store = engine.store(4).await;
            let members = ["cat", "ann"].map(String::from);
            group_with_a_message_and_push(&store, "g:1", &members, &[]).await;
            ann_holds_bobs_token_from_before_the_index(&engine, &store).await;
            register_phone(&store, "bob").await;
            let (providers, seen) = webhook().await;
            let notifier = notifier(&store, providers, Duration::ZERO);
            expand_the_group(&notifier, &store).await;
            send_while_ann_registers(&engine, &store, &notifier, again).await;
            let ann = store.device("ann", "phone").await.unwrap().unwrap();
            assert_eq!(ann.push_token, again, "Ann's new registration stays");
            assert_eq!(
                *seen.lock().unwrap(),
                [(again.to_owned(), "g:1".to_owned())],
                "Ann's phone, through its registration of {again}"
            );
        }
    }

    /// The provider refuses the token a notification went to, while the device registered a
    /// new one: the refused token is gone already, and the notification goes to the new one.
    #[tokio::test]
    async fn a_notification_refused_for_a_token_replaced_meanwhile_goes_to_the_new_one() {
        let engine = FaultyEngine::new();
        let store = engine.store(4).await;
        let members = ["cat", "ann"].map(String::from);
        group_with_a_message_and_push(&store, "g:1", &members, &members[1..]).await;
        let (providers, seen) = scripted_webhook(410, None, Duration::ZERO).await;
        let notifier = notifier(&store, providers, Duration::ZERO);
        expand_the_group(&notifier, &store).await;
        send_while_ann_registers(&engine, &store, &notifier, "ann-new").await;
        let tokens: Vec<String> = seen.lock().unwrap().iter().map(|s| s.0.clone()).collect();
        assert_eq!(
            tokens,
            ["ann", "ann-new"],
            "the refused token, then the new one"
        );
    }

    /// A phone unlinked while a notification waits for it (a lost phone) is not notified, of
    /// what was pending nor of what came after; its user's other devices still are.
    #[tokio::test]
    async fn a_phone_unlinked_while_its_notification_waits_is_not_notified() {
        let engine = FaultyEngine::new();
        let store = engine.store(4).await;
        let members = ["cat", "ann", "bob"].map(String::from);
        group_with_a_message_and_push(&store, "g:1", &members, &members[1..]).await;
        let (providers, seen) = webhook().await;
        let notifier = notifier(&store, providers, Duration::ZERO);
        expand_the_group(&notifier, &store).await;
        assert!(store.unlink_device("bob", "phone", now_ms()).await.unwrap());
        second_message(&store, "g:1", "cat").await;
        expand_the_group(&notifier, &store).await;
        notifier.send_due().await.unwrap();
        notifier.send_due().await.unwrap();
        let tokens: Vec<String> = seen.lock().unwrap().iter().map(|s| s.0.clone()).collect();
        assert_eq!(tokens, ["ann"], "only ann's phone");
        assert_eq!(
            store.pending_push("bob", "phone", "g:1").await.unwrap(),
            None
        );
    }

    /// A phone unlinked while its notification waits for the provider's first answer (up to
    /// `PROBE_WAIT`) is not notified: its registration is read again once the notification
    /// may go.
    #[tokio::test]
    async fn a_phone_unlinked_while_its_notification_waits_for_the_provider_is_not_notified() {
        let engine = FaultyEngine::new();
        let store = engine.store(4).await;
        let members = ["cat", "ann", "bob"].map(String::from);
        group_with_a_message_and_push(&store, "g:1", &members, &members[1..]).await;
        // Its first request (ann's, the probe) answered after the others' wait for it.
        let (providers, seen) =
            scripted_webhook(200, None, crate::provider_gates::PROBE_WAIT * 2).await;
        let notifier = notifier(&store, providers, Duration::ZERO);
        expand_the_group(&notifier, &store).await;
        let sending = tokio::spawn({
            let notifier = notifier.clone();
            async move { notifier.send_due().await }
        });
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while seen.lock().unwrap().is_empty() {
            assert!(tokio::time::Instant::now() < deadline, "no probe sent");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(store.unlink_device("bob", "phone", now_ms()).await.unwrap());
        sending.await.unwrap().unwrap();
        let tokens: Vec<String> = seen.lock().unwrap().iter().map(|s| s.0.clone()).collect();
        assert_eq!(tokens, ["ann"], "only ann's phone");
        assert_eq!(
            store.pending_push("bob", "phone", "g:1").await.unwrap(),
            None
        );
    }

    /// A pending notification that does not decode, and one whose device record does not
    /// (damage, or a bug of a version that wrote them), are logged, counted `failed` and
    /// cleared: the others are sent, and the pass succeeds. Each failed every send pass, which
    /// stopped there: no notification after them in key order was ever sent again.
    #[tokio::test]
    async fn notifications_that_cannot_be_read_are_cleared_and_hold_back_no_other() {
        let engine = FaultyEngine::new();
        let store = engine.store(4).await;
        let members = ["cat", "ann", "bob"].map(String::from);
        group_with_a_message_and_push(&store, "g:1", &members, &members[1..]).await;
        // Keyed before ann's and bob's: "aaa" and "aab".
        let unreadable = store.keys().pending_push("aaa", "phone", "g:1");
        let unreadable_device = store.keys().pending_push("aab", "phone", "g:1");
        let due = PendingPush {
            count: 1,
            last_seq: 2,
            sender: "cat".into(),
            ..PendingPush::default()
        };
        let aab = ("aab".to_owned(), "phone".to_owned(), "g:1".to_owned());
        store.expand_outbox(&[], &[(aab, due)]).await.unwrap();
        let mut batch = Batch::new();
        batch
            .set(unreadable.clone(), vec![0xff; 3])
            .set(store.keys().device("aab", "phone"), vec![0xff; 3]);
        engine.commit(batch).await.unwrap();
        let (providers, seen) = webhook().await;
        let notifier = notifier(&store, providers, Duration::ZERO);
        expand_the_group(&notifier, &store).await;
        notifier.send_due().await.unwrap();
        let mut tokens: Vec<String> = seen.lock().unwrap().iter().map(|s| s.0.clone()).collect();
        tokens.sort();
        assert_eq!(tokens, ["ann", "bob"]);
        for key in [unreadable, unreadable_device] {
            assert_eq!(engine.get(&key).await.unwrap(), None, "cleared");
        }
        notifier.send_due().await.unwrap();
    }

    /// A device record that does not decode is passed over, logged; its user's other devices
    /// (bob's phone) and the other members are notified, and the shard's bound moves on. It
    /// failed the expansion of every page with a message to that member: the shard was held
    /// for good, nothing of it pushed, its outbox never cleared again; taken later for a
    /// user without devices, it cost that user the notifications of their other devices.
    #[tokio::test]
    async fn a_member_whose_device_record_does_not_decode_holds_back_no_other() {
        let engine = FaultyEngine::new();
        let store = engine.store(4).await;
        let members = ["cat", "ann", "bob"].map(String::from);
        group_with_a_message_and_push(&store, "g:1", &members, &members[1..]).await;
        let mut batch = Batch::new();
        batch.set(store.keys().device("bob", "tablet"), vec![0xff; 3]);
        engine.commit(batch).await.unwrap();
        let notifier = notifier(&store, PushProviders::default(), Duration::from_secs(3600));
        expand_the_group(&notifier, &store).await;
        assert_eq!(counts(&store, "g:1", &members).await, [0, 1, 1]);
        assert!(all_expanded(&store, store.shard_of("g:1")).await);
    }

    /// The notifier's recorded bound past every entry of its outbox (damage, or a hostile
    /// write) does not keep the entries held from being pushed: the notifier reads from no
    /// higher than the first entry held (logged at error), and pushes the messages committed
    /// after. Taken as it was, nothing was read, nothing pushed, and the outbox was cleared
    /// below fanout's bound all the same: those messages, and every one committed after
    /// (below the bound too), were never pushed.
    #[tokio::test]
    async fn a_recorded_bound_past_every_entry_does_not_skip_the_entries_held() {
        let engine = FaultyEngine::new();
        let store = engine.store(4).await;
        let members = ["cat", "ann", "bob"].map(String::from);
        group_with_a_message(&store, "g:1", &members).await;
        let shard = store.shard_of("g:1");
        let newest = store.last_outbox_key(shard).await.unwrap().unwrap();
        let mut damage = Batch::new();
        damage
            .set(
                store.keys().pushed_bound(shard),
                store.keys().outbox(shard).end,
            )
            // Fanout delivered everything held: the outbox may be cleared below it.
            .set(store.keys().delivered_bound(shard), bound_after(&newest));
        engine.commit(damage).await.unwrap();
        let notifier = notifier(&store, PushProviders::default(), Duration::from_secs(3600));
        expand_the_group(&notifier, &store).await;
        assert_eq!(counts(&store, "g:1", &members).await, [0, 1, 1]);
        // A message committed after is pushed too: it lies above the bound now.
        second_message(&store, "g:1", "cat").await;
        expand_the_group(&notifier, &store).await;
        assert_eq!(counts(&store, "g:1", &members).await, [0, 2, 2]);
        assert!(all_expanded(&store, shard).await);
        // Delivered and cleared, the outbox empty, the bound damaged again: a notifier that
        // takes the shard pushes what is committed next.
        let newest = store.last_outbox_key(shard).await.unwrap().unwrap();
        let mut delivered = Batch::new();
        delivered.set(store.keys().delivered_bound(shard), bound_after(&newest));
        engine.commit(delivered).await.unwrap();
        notifier.mark_dirty(shard);
        expand_the_group(&notifier, &store).await;
        assert_eq!(store.last_outbox_key(shard).await.unwrap(), None);
        let mut damage = Batch::new();
        damage.set(
            store.keys().pushed_bound(shard),
            store.keys().outbox(shard).end,
        );
        engine.commit(damage).await.unwrap();
        let taken = self::notifier(&store, PushProviders::default(), Duration::from_secs(3600));
        message(&store, "g:1", "cat", "third").await;
        expand_the_group(&taken, &store).await;
        assert_eq!(counts(&store, "g:1", &members).await, [0, 3, 3]);
    }

    /// A group of `members` with a push-registered, offline phone each, and one message from
    /// the first member.
    async fn group_with_a_message(store: &MessageStore, conv: &str, members: &[String]) {
        group_with_a_message_and_push(store, conv, members, members).await;
    }

    /// A group of `members` with one message from the first, where the phones of `registered`
    /// have a push registration.
    async fn group_with_a_message_and_push(
        store: &MessageStore,
        conv: &str,
        members: &[String],
        registered: &[String],
    ) {
        let sender = Sender {
            user: members[0].clone(),
            device: "phone".into(),
        };
        append(
            store,
            Append {
                conversation_id: conv.into(),
                sender: sender.clone(),
                key: AppendKey::Server("created".into()),
                payload: EventPayload::GroupCreated {
                    name: conv.into(),
                    members: members.to_vec(),
                },
                create: None,
            },
        )
        .await;
        futures::future::join_all(registered.iter().map(|user| register_phone(store, user))).await;
        append(
            store,
            Append {
                conversation_id: conv.into(),
                sender,
                key: AppendKey::Client("hello".into()),
                payload: EventPayload::Message {
                    body: Some(Body::Text("hello".into())),
                    client_msg_id: "hello".into(),
                    reply_to: None,
                    deleted: false,
                },
                create: None,
            },
        )
        .await;
    }

    /// Settles `user`'s pending notification of `conv` on their phone as sent; returns it.
    async fn sent(store: &MessageStore, user: &str, conv: &str) -> Option<PendingPush> {
        let pending = store.pending_push(user, "phone", conv).await.unwrap()?;
        let key = store.keys().pending_push(user, "phone", conv);
        store
            .settle_pending_push(&key, &pending, None)
            .await
            .unwrap();
        Some(pending)
    }

    /// A second message to `conv`, from `sender`'s phone.
    async fn second_message(store: &MessageStore, conv: &str, sender: &str) {
        message(store, conv, sender, "second").await;
    }

    /// A message from `sender`'s phone, sent as `client_msg_id`.
    async fn message(store: &MessageStore, conv: &str, sender: &str, client_msg_id: &str) {
        let sender = Sender {
            user: sender.into(),
            device: "phone".into(),
        };
        let body = Body::Text(client_msg_id.into());
        append(
            store,
            Append::message(conv.into(), sender, client_msg_id.into(), body, None),
        )
        .await;
    }

    /// Group ids, one per shard they fall on, in shard order.
    fn groups_on_distinct_shards(store: &MessageStore) -> Vec<String> {
        let mut convs: Vec<String> = (0..64).map(|i| format!("g:{i}")).collect();
        convs.sort_by_key(|c| store.shard_of(c));
        convs.dedup_by_key(|c| store.shard_of(c));
        convs
    }

    /// Three groups on three shards, each with a sender, a reader and one message: the groups
    /// and their shards.
    async fn three_shards_with_a_message(store: &MessageStore) -> (Vec<String>, Vec<u32>) {
        let convs = groups_on_distinct_shards(store)[..3].to_vec();
        for conv in &convs {
            let members = vec![format!("{conv}-sender"), format!("{conv}-reader")];
            group_with_a_message(store, conv, &members).await;
        }
        let shards = convs.iter().map(|c| store.shard_of(c)).collect();
        (convs, shards)
    }

    /// The key of the notifier's bound of `shard`, as a range (what a commit that moves it
    /// touches).
    fn pushed_bound_key(store: &MessageStore, shard: u32) -> std::ops::Range<Vec<u8>> {
        let key = store.keys().pushed_bound(shard);
        let end = bound_after(&key);
        key..end
    }

    /// Whether the notifier's bound of `shard` is past every entry of its outbox.
    async fn all_expanded(store: &MessageStore, shard: u32) -> bool {
        let bound = store.pushed_bounds(&[shard]).await.unwrap().pop().flatten();
        bound.is_some()
            && store
                .outbox(shard, bound.as_deref(), 1)
                .await
                .unwrap()
                .is_empty()
    }

    async fn counts(store: &MessageStore, conv: &str, members: &[String]) -> Vec<u32> {
        let mut counts = Vec::new();
        for user in members {
            let pending = store.pending_push(user, "phone", conv).await.unwrap();
            counts.push(pending.map_or(0, |p| p.count));
        }
        counts
    }

    #[tokio::test]
    async fn a_group_with_more_offline_devices_than_one_batch_holds_gets_one_pending_notification_each()
     {
        let engine = FaultyEngine::new();
        let store = engine.store(4).await;
        let members: Vec<String> = (0..300).map(|i| format!("user{i:03}")).collect();
        group_with_a_message(&store, "g:big", &members).await;
        // 299 pending notifications take ~13 kB: three times this limit.
        engine.set_max_batch_bytes(4 << 10);
        // Nothing is due for an hour: the notifications stay pending, to be counted.
        let notifier = notifier(&store, PushProviders::default(), Duration::from_secs(3600));
        let shard = store.shard_of("g:big");
        let pushed = pushed_bound_key(&store, shard);

        // The commit that moves the bound fails once (a crash after the first chunks).
        engine.set_fault(Some(Box::new(move |batch| {
            touches(batch, &pushed).then(|| StoreError::Engine("lost".into()))
        })));
        assert_eq!(notifier.expand(vec![shard]).await.failed.len(), 1);
        engine.set_fault(None);
        assert!(notifier.expand(vec![shard]).await.failed.is_empty());

        assert_eq!(
            counts(&store, "g:big", &members[1..]).await,
            vec![1; 299],
            "every offline device has one pending notification, counted once"
        );
        assert_eq!(
            counts(&store, "g:big", &members[..1]).await,
            [0],
            "not the sender"
        );
        assert!(all_expanded(&store, shard).await);
    }

    #[test]
    fn a_notification_is_due_a_collapse_after_its_message_was_committed() {
        let collapse = Duration::from_millis(500);
        assert_eq!(
            due_after(10_000, collapse, 10_250),
            10_500,
            "read 250 ms late"
        );
        assert_eq!(
            due_after(10_000, collapse, 12_000),
            12_000,
            "read after it was due"
        );
        assert_eq!(due_after(u64::MAX, collapse, 0), u64::MAX);
    }

    /// A device that took a message and went away before the notifier read it is not notified
    /// of it, only of what came after.
    #[tokio::test]
    async fn a_device_is_not_notified_of_a_message_it_took_before_it_went_away() {
        let engine = FaultyEngine::new();
        let store = engine.store(4).await;
        let members = vec!["ann".to_owned(), "ben".to_owned()];
        group_with_a_message(&store, "g:1", &members).await;
        let hello = store.head("g:1").await.unwrap();
        store
            .acknowledge("ben", "phone", "g:1", hello, ReceiptKind::Delivered)
            .await
            .unwrap();
        let notifier = notifier(&store, PushProviders::default(), Duration::from_secs(3600));
        let shard = store.shard_of("g:1");
        assert!(notifier.expand(vec![shard]).await.failed.is_empty());
        assert_eq!(counts(&store, "g:1", &members).await, [0, 0]);

        second_message(&store, "g:1", "ann").await;
        assert!(notifier.expand(vec![shard]).await.failed.is_empty());
        let pending = store.pending_push("ben", "phone", "g:1").await.unwrap();
        let pending = pending.expect("notified of the second message");
        assert_eq!((pending.count, pending.last_seq), (1, hello + 1));
    }

    /// The places a silent close left are notified as if the device had been offline when
    /// their events were sent: the messages of others above its cursor, each counted once with
    /// those the outbox's expansion counted already; a device without a registration is not
    /// notified; every place read is cleared, and a second close through the same events
    /// counts nothing again.
    #[tokio::test]
    async fn the_places_of_a_silent_close_are_notified_counting_each_message_once() {
        let engine = FaultyEngine::new();
        let store = engine.store(4).await;
        let members = ["ann", "bob", "cat"].map(String::from);
        group_with_a_message_and_push(&store, "g:1", &members, &members[1..2]).await;
        second_message(&store, "g:1", "ann").await;
        let second = store.head("g:1").await.unwrap();
        message(&store, "g:1", "bob", "bob's own").await;
        message(&store, "g:1", "ann", "third").await;
        let third = store.head("g:1").await.unwrap();
        // Bob's phone was offline for part of the window: the outbox's expansion counted the
        // first two messages.
        let counted = PendingPush {
            count: 2,
            last_seq: second,
            sender: "ann".into(),
            due_ms: u64::MAX,
            ..PendingPush::default()
        };
        let bob = ("bob".to_owned(), "phone".to_owned(), "g:1".to_owned());
        store.expand_outbox(&[], &[(bob, counted)]).await.unwrap();
        let through = [("g:1".to_owned(), third)];
        store.owe_pushes("bob", "phone", &through).await.unwrap();
        store.owe_pushes("cat", "phone", &through).await.unwrap();
        let notifier = notifier(&store, PushProviders::default(), Duration::ZERO);

        assert!(!notifier.expand_owed().await.unwrap());
        let pending = store.pending_push("bob", "phone", "g:1").await.unwrap();
        let pending = pending.expect("bob's phone is notified");
        assert_eq!(
            (pending.count, pending.last_seq, pending.sender.as_str()),
            (3, third, "ann"),
            "the third message is added, bob's own is not counted"
        );
        assert_eq!(
            store.pending_push("cat", "phone", "g:1").await.unwrap(),
            None
        );
        assert!(store.owed_pushes(10).await.unwrap().is_empty());

        store.owe_pushes("bob", "phone", &through).await.unwrap();
        assert!(!notifier.expand_owed().await.unwrap());
        let again = store.pending_push("bob", "phone", "g:1").await.unwrap();
        assert_eq!(again.map(|p| p.count), Some(3), "nothing counted twice");
        assert!(store.owed_pushes(10).await.unwrap().is_empty());
    }

    /// The users whose device records the ranges read since the last call covered.
    fn device_records_read(engine: &FaultyEngine, store: &MessageStore, users: &[String]) -> usize {
        let ranges = engine.take_ranges_read();
        users
            .iter()
            .filter(|user| ranges.contains(&store.keys().devices(user)))
            .count()
    }

    /// A large group's device records are read once, not for every message, while no device's
    /// push registration begins or ends; one that begins is seen by the next pass, which reads
    /// again the users of its slot only, unless a node that counts registrations in all only
    /// changed one.
    #[tokio::test]
    async fn registrations_are_read_again_only_once_one_begins_or_ends() {
        let engine = FaultyEngine::new();
        let store = engine.store(4).await;
        let members: Vec<String> = ["ann", "ben", "cat"].map(String::from).to_vec();
        group_with_a_message_and_push(&store, "g:1", &members, &[]).await;
        let notifier = notifier(&store, PushProviders::default(), Duration::from_secs(3600));
        let shard = store.shard_of("g:1");
        engine.take_ranges_read();
        assert!(notifier.expand(vec![shard]).await.failed.is_empty());
        assert_eq!(
            device_records_read(&engine, &store, &members),
            2,
            "not the sender's"
        );
        assert_eq!(counts(&store, "g:1", &members).await, [0, 0, 0]);

        second_message(&store, "g:1", "ann").await;
        assert!(notifier.expand(vec![shard]).await.failed.is_empty());
        assert_eq!(device_records_read(&engine, &store, &members), 0, "kept");

        // Ben's phone takes push, and goes away: the next message notifies it.
        register_phone(&store, "ben").await;
        message(&store, "g:1", "ann", "third").await;
        assert!(notifier.expand(vec![shard]).await.failed.is_empty());
        assert_ne!(push_registration_slot("ben"), push_registration_slot("cat"));
        assert_eq!(
            device_records_read(&engine, &store, &members),
            1,
            "Ben's read again, not Cat's"
        );
        let head = store.head("g:1").await.unwrap();
        let pending = store.pending_push("ben", "phone", "g:1").await.unwrap();
        assert_eq!(pending.map(|p| (p.count, p.last_seq)), Some((1, head)));
        assert_eq!(counts(&store, "g:1", &members[2..]).await, [0]);

        // A node of a version that counts registrations in all only changes one.
        let mut counted_in_all = Batch::new();
        counted_in_all.add(store.keys().push_registration_changes(), 1);
        engine.commit(counted_in_all).await.unwrap();
        message(&store, "g:1", "ann", "fourth").await;
        assert!(notifier.expand(vec![shard]).await.failed.is_empty());
        assert_eq!(
            device_records_read(&engine, &store, &members),
            2,
            "everyone read again"
        );
    }

    /// The notifier reads a message before fanout delivered it: it clears nothing fanout
    /// still needs, and clears it at a later round once fanout's bound passed it.
    #[tokio::test]
    async fn the_outbox_is_cleared_only_below_fanouts_bound() {
        let engine = FaultyEngine::new();
        let store = engine.store(4).await;
        let members = vec!["ann".to_owned(), "ben".to_owned()];
        group_with_a_message(&store, "g:1", &members).await;
        let shard = store.shard_of("g:1");
        let entries = store.outbox(shard, None, 10).await.unwrap();
        let notifier = notifier(&store, PushProviders::default(), Duration::from_secs(3600));

        assert!(notifier.expand(vec![shard]).await.failed.is_empty());
        assert_eq!(counts(&store, "g:1", &members[1..]).await, [1]);
        assert_eq!(
            store.outbox(shard, None, 10).await.unwrap().len(),
            entries.len(),
            "fanout has delivered nothing: nothing is cleared"
        );

        // Fanout delivers the group's creation only: the message stays.
        let lease = store
            .acquire_shards(Duty::Delivery, "f", &[shard], 1, 0, u64::MAX)
            .await
            .unwrap()[0];
        let advance = |key: &[u8]| {
            let bound = DeliveredBound {
                lease,
                bound: bound_after(key),
            };
            let store = store.clone();
            async move { store.advance_delivered(&[bound]).await.unwrap() }
        };
        advance(&entries[0].0).await;
        notifier.mark_trailing_dirty();
        assert!(notifier.expand(vec![shard]).await.failed.is_empty());
        let left = store.outbox(shard, None, 10).await.unwrap();
        assert_eq!(left.len(), entries.len() - 1, "only what fanout delivered");
        assert_eq!(left[0].0, entries[1].0);

        advance(&entries[entries.len() - 1].0).await;
        assert!(notifier.expand(vec![shard]).await.failed.is_empty());
        assert!(store.outbox(shard, None, 10).await.unwrap().is_empty());
        assert_eq!(
            counts(&store, "g:1", &members[1..]).await,
            [1],
            "a clear counts nothing again"
        );
    }

    /// An outbox row that does not decode is passed over, counted, and cleared with the rows
    /// around it: the messages after it are notified, and the shard is not held for good (its
    /// expansion failed at every pass: no push for any of its conversations, and its outbox
    /// never cleared again).
    #[tokio::test]
    async fn an_outbox_row_that_does_not_decode_is_passed_over_and_cleared() {
        let engine = FaultyEngine::new();
        let store = engine.store(4).await;
        let members = vec!["ann".to_owned(), "ben".to_owned()];
        group_with_a_message(&store, "g:1", &members).await;
        let shard = store.shard_of("g:1");
        let mut damaged = Batch::new();
        damaged.set_versionstamped_key(store.keys().outbox_entry(shard, 0), vec![0, 0xff, 0xff]);
        engine.commit(damaged).await.unwrap();
        message(&store, "g:1", "ann", "second").await;
        let notifier = notifier(&store, PushProviders::default(), Duration::from_secs(3600));

        assert!(notifier.expand(vec![shard]).await.failed.is_empty());
        assert_eq!(counts(&store, "g:1", &members[1..]).await, [2]);
        let passed_over = notifier
            .metrics
            .outbox_undecodable_entries
            .get_or_create(&ReaderLabel { reader: "push" })
            .get();
        assert_eq!(passed_over, 1);

        // Once fanout passed it too, it is cleared with the others.
        let last = store.last_outbox_key(shard).await.unwrap().unwrap();
        let lease = store
            .acquire_shards(Duty::Delivery, "f", &[shard], 1, 0, u64::MAX)
            .await
            .unwrap()[0];
        let bound = bound_after(&last);
        store
            .advance_delivered(&[DeliveredBound { lease, bound }])
            .await
            .unwrap();
        notifier.mark_trailing_dirty();
        assert!(notifier.expand(vec![shard]).await.failed.is_empty());
        let outbox = store.keys().outbox(shard);
        assert!(engine.range(outbox, 10, false).await.unwrap().is_empty());
    }

    /// A notifier that starts again (another push node, a restart) reads on from the bound in
    /// the store: a notification already sent is not made again.
    #[tokio::test]
    async fn a_new_notifier_reads_on_from_the_stored_bound() {
        let engine = FaultyEngine::new();
        let store = engine.store(4).await;
        let members = vec!["ann".to_owned(), "ben".to_owned()];
        group_with_a_message(&store, "g:1", &members).await;
        let shard = store.shard_of("g:1");
        let first = notifier(&store, PushProviders::default(), Duration::from_secs(3600));
        assert!(first.expand(vec![shard]).await.failed.is_empty());
        // Sent, say.
        assert!(sent(&store, "ben", "g:1").await.is_some());

        let second = notifier(&store, PushProviders::default(), Duration::from_secs(3600));
        assert!(second.expand(vec![shard]).await.failed.is_empty());
        assert_eq!(
            store.pending_push("ben", "phone", "g:1").await.unwrap(),
            None
        );
    }

    /// A node that leads the notifier again after another node did reads on from the bound
    /// the other left, not from where it stopped: what the other notified is not notified
    /// again.
    #[tokio::test]
    async fn a_node_that_takes_the_lead_again_reads_on_from_the_other_nodes_bound() {
        let engine = FaultyEngine::new();
        let store = engine.store(4).await;
        let members = vec!["ann".to_owned(), "ben".to_owned()];
        group_with_a_message(&store, "g:1", &members).await;
        let shard = store.shard_of("g:1");
        let (first, other) = (
            notifier(&store, PushProviders::default(), Duration::from_secs(3600)),
            notifier(&store, PushProviders::default(), Duration::from_secs(3600)),
        );
        assert!(first.expand(vec![shard]).await.failed.is_empty());
        // The other node leads meanwhile: it notifies a second message, sent since.
        second_message(&store, "g:1", &members[0]).await;
        assert!(other.expand(vec![shard]).await.failed.is_empty());
        let pending = sent(&store, "ben", "g:1").await;
        assert_eq!(pending.map(|p| p.count), Some(2));

        first.took_lead();
        assert!(first.expand(vec![shard]).await.failed.is_empty());
        assert_eq!(
            store.pending_push("ben", "phone", "g:1").await.unwrap(),
            None
        );
    }

    #[tokio::test]
    async fn a_groups_devices_are_read_in_one_call_whatever_its_members() {
        let mut reads = Vec::new();
        for size in [20, 400] {
            let engine = FaultyEngine::new();
            let store = engine.store(4).await;
            let members: Vec<String> = (0..size).map(|i| format!("user{i:03}")).collect();
            // Every phone but user002's is registered: the device records, then the cursors
            // and stored notifications of the registered ones, are each one read.
            let registered: Vec<String> = members
                .iter()
                .filter(|m| *m != "user002")
                .cloned()
                .collect();
            group_with_a_message_and_push(&store, "g:1", &members, &registered).await;
            let notifier = notifier(&store, PushProviders::default(), Duration::from_secs(3600));
            let before = engine.read_calls();
            let expanded = notifier.expand(vec![store.shard_of("g:1")]).await;
            assert!(expanded.failed.is_empty() && !expanded.more);
            reads.push(engine.read_calls() - before);
            assert_eq!(counts(&store, "g:1", &members[..3]).await, [0, 1, 0]);
        }
        assert_eq!(reads[0], reads[1], "reads of 20 and 400 members: {reads:?}");
    }

    /// A pass with no shard told of reads nothing (an idle notifier makes four a second).
    #[tokio::test]
    async fn a_pass_with_nothing_to_expand_reads_nothing() {
        let engine = FaultyEngine::new();
        let store = engine.store(4).await;
        let notifier = notifier(&store, PushProviders::default(), Duration::from_secs(3600));
        let before = engine.read_calls();
        let expanded = notifier.expand(Vec::new()).await;
        assert!(expanded.failed.is_empty() && !expanded.more);
        assert_eq!(engine.read_calls(), before);
    }

    #[tokio::test]
    async fn the_messages_of_several_shards_are_expanded_in_one_commit() {
        let engine = FaultyEngine::new();
        let store = engine.store(64).await;
        let (convs, shards) = three_shards_with_a_message(&store).await;
        let bounds: Vec<_> = shards
            .iter()
            .map(|&s| pushed_bound_key(&store, s))
            .collect();
        let moving = Arc::new(Mutex::new(Vec::new()));
        let seen = moving.clone();
        engine.set_fault(Some(Box::new(move |batch| {
            let touched = bounds.iter().filter(|range| touches(batch, range)).count();
            seen.lock().unwrap().push(touched);
            None
        })));
        let notifier = notifier(&store, PushProviders::default(), Duration::from_secs(3600));

        let expanded = notifier.expand(shards.clone()).await;
        assert!(expanded.failed.is_empty() && !expanded.more);
        assert_eq!(
            *moving.lock().unwrap(),
            [3],
            "one commit writes every notification and moves the three shards' bounds"
        );
        for conv in &convs {
            let reader = format!("{conv}-reader");
            assert_eq!(counts(&store, conv, &[reader]).await, [1]);
        }
        for shard in shards {
            assert!(all_expanded(&store, shard).await);
        }
    }

    /// The notifier runs beside the shard actors on the ordering runtime: it lets them run
    /// between the pages of a pass instead of holding the thread until its commit.
    #[tokio::test(flavor = "current_thread")]
    async fn a_pass_lets_other_tasks_run_between_its_pages() {
        let engine = FaultyEngine::new();
        let store = engine.store(64).await;
        let (_, shards) = three_shards_with_a_message(&store).await;
        let ran = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let ran_before_commit = Arc::new(Mutex::new(None));
        let (flag, seen) = (ran.clone(), ran_before_commit.clone());
        engine.set_fault(Some(Box::new(move |_| {
            seen.lock()
                .unwrap()
                .get_or_insert(flag.load(std::sync::atomic::Ordering::SeqCst));
            None
        })));
        let notifier = notifier(&store, PushProviders::default(), Duration::from_secs(3600));
        let other = tokio::spawn({
            let ran = ran.clone();
            async move { ran.store(true, std::sync::atomic::Ordering::SeqCst) }
        });

        let expanded = notifier.expand(shards).await;
        assert!(expanded.failed.is_empty());
        assert_eq!(
            *ran_before_commit.lock().unwrap(),
            Some(true),
            "another task ran before the pass's commit"
        );
        other.await.unwrap();
    }

    /// Group "g:1" of ann and ben with one message: its members, its shard and a sequencing
    /// lease on that shard.
    async fn ann_and_ben(store: &MessageStore) -> (Vec<String>, u32, ShardLease) {
        let members = vec!["ann".to_owned(), "ben".to_owned()];
        group_with_a_message(store, "g:1", &members).await;
        let shard = store.shard_of("g:1");
        let lease = store
            .acquire_shards(Duty::Sequencing, "test", &[shard], usize::MAX, 0, u64::MAX)
            .await
            .unwrap()[0];
        (members, shard, lease)
    }

    /// A message of ann's phone to "g:1", its text its id.
    fn from_ann(id: &str) -> Append {
        let ann = Sender {
            user: "ann".into(),
            device: "phone".into(),
        };
        Append::message("g:1".into(), ann, id.into(), Body::Text(id.into()), None)
    }

    /// In one process, once a pass read a shard's outbox to its end, the headers of the entries
    /// the sequencer lists after each commit are expanded without reading the outbox back, a
    /// page at a time (many more entries than a read of the outbox takes); a commit told of
    /// without a list, and a pass that failed, read it again; every message counts once either
    /// way, and `/metrics` counts the pages read.
    #[tokio::test]
    async fn listed_entries_are_expanded_without_reading_the_outbox_back() {
        let engine = FaultyEngine::new();
        let store = engine.store(4).await;
        let (members, shard, lease) = ann_and_ben(&store).await;
        let mut heads = HeadCache::default();
        let mut sent = 0;
        let mut messages = |n: usize| {
            let appends: Vec<Append> = (0..n)
                .map(|_| {
                    sent += 1;
                    from_ann(&format!("m{sent}"))
                })
                .collect();
            appends
        };
        let notifier = notifier(&store, PushProviders::default(), Duration::from_secs(3600));
        notifier.tails.set_keeping(true);
        let outbox = store.keys().outbox(shard);
        let outbox_reads = || engine.take_reads_within(&outbox);
        let ben = || async { counts(&store, "g:1", &members).await[1] };
        let pages_read = || {
            notifier
                .metrics
                .outbox_pages_read
                .get_or_create(&ReaderLabel { reader: "push" })
                .get()
        };

        assert!(notifier.expand(vec![shard]).await.failed.is_empty());
        assert!(outbox_reads() > 0, "what was there before is read");
        assert_eq!((ben().await, pages_read()), (1, 1));

        for _ in 0..2 {
            let listed = store.append_listed(lease, &mut heads, &messages(1)).await;
            notifier.committed_listed(shard, &listed.unwrap().outbox.unwrap());
        }
        assert!(notifier.expand(vec![shard]).await.failed.is_empty());
        assert_eq!(outbox_reads(), 0, "listed entries are not read back");
        assert_eq!(ben().await, 3);

        // Many more than a read of the outbox takes, in one pass: passes keep up with commits
        // however long each pass's own commit waits.
        let burst = 4 * OUTBOX_PAGE;
        let listed = store
            .append_listed(lease, &mut heads, &messages(burst))
            .await;
        notifier.committed_listed(shard, &listed.unwrap().outbox.unwrap());
        let expanded = notifier.expand(vec![shard]).await;
        assert!(expanded.failed.is_empty() && !expanded.more);
        let mut expected = 3 + burst as u32;
        assert_eq!(ben().await, expected);

        // More than a page: the rest at the next pass.
        let listed = store
            .append_listed(lease, &mut heads, &messages(SHARD_PAGE + 44))
            .await;
        notifier.committed_listed(shard, &listed.unwrap().outbox.unwrap());
        let expanded = notifier.expand(vec![shard]).await;
        assert!(expanded.failed.is_empty() && expanded.more);
        assert_eq!(ben().await, expected + SHARD_PAGE as u32);
        assert!(!notifier.expand(vec![shard]).await.more);
        assert_eq!((outbox_reads(), pages_read()), (0, 1));
        expected += SHARD_PAGE as u32 + 44;
        assert_eq!(ben().await, expected);

        // Told of without a list: read from the outbox.
        store.append(lease, &mut heads, &messages(1)).await.unwrap();
        notifier.committed(shard, 1);
        assert!(notifier.expand(vec![shard]).await.failed.is_empty());
        assert!(outbox_reads() > 0);
        expected += 1;
        assert_eq!((ben().await, pages_read()), (expected, 2));

        // Many, told of without a list: read back in one page of many more entries than the
        // rows it reads, so that a notifier whose tail was dropped under load catches up.
        store
            .append(lease, &mut heads, &messages(burst))
            .await
            .unwrap();
        notifier.committed(shard, burst);
        let expanded = notifier.expand(vec![shard]).await;
        assert!(expanded.failed.is_empty() && !expanded.more);
        expected += burst as u32;
        assert!(outbox_reads() > 0);
        assert_eq!((ben().await, pages_read()), (expected, 3));

        // A pass whose commit fails drops what it took: the next one reads it again.
        let listed = store.append_listed(lease, &mut heads, &messages(1)).await;
        notifier.committed_listed(shard, &listed.unwrap().outbox.unwrap());
        assert!(notifier.expand(vec![shard]).await.failed.is_empty());
        expected += 1;
        assert_eq!((outbox_reads(), ben().await), (0, expected));
        let listed = store.append_listed(lease, &mut heads, &messages(1)).await;
        notifier.committed_listed(shard, &listed.unwrap().outbox.unwrap());
        let bound = pushed_bound_key(&store, shard);
        engine.set_fault(Some(Box::new(move |batch| {
            touches(batch, &bound).then(|| StoreError::Engine("broken".into()))
        })));
        assert!(notifier.pass().await.is_ok());
        engine.set_fault(None);
        assert_eq!(ben().await, expected, "not expanded");
        assert!(notifier.expand(vec![shard]).await.failed.is_empty());
        assert!(outbox_reads() > 0, "read again");
        assert_eq!(ben().await, expected + 1);
        assert_eq!(notifier.tails.bytes(), 0);
    }

    /// Once the tails hold half their bound, the notifier is told to start its pass without
    /// waiting out [`PASS_LINGER`]: under a heavy load the linger filled them past their bound,
    /// and every pass then read the outbox back.
    #[tokio::test]
    async fn tails_that_fill_cut_the_linger_short() {
        let engine = FaultyEngine::new();
        let store = engine.store(4).await;
        let (_, shard, lease) = ann_and_ben(&store).await;
        let notifier = notifier(&store, PushProviders::default(), Duration::from_secs(3600));
        notifier.tails.set_keeping(true);
        assert!(notifier.expand(vec![shard]).await.failed.is_empty());
        let listed = store
            .append_listed(lease, &mut HeadCache::default(), &[from_ann("m")])
            .await
            .unwrap()
            .outbox
            .unwrap();
        let filling = || notifier.tails_filling.notified().now_or_never().is_some();

        notifier.committed_listed(shard, &listed);
        assert!(!filling(), "a light load lingers");
        let mut large = listed;
        large[0].key.resize(TAILS_MAX_BYTES / 2, 0xff);
        notifier.committed_listed(shard, &large);
        assert!(notifier.tails.bytes() > TAILS_MAX_BYTES / 2, "kept");
        assert!(filling(), "the pass starts now");
    }

    #[tokio::test]
    async fn a_shard_whose_messages_cannot_be_expanded_does_not_hold_back_the_others() {
        let engine = FaultyEngine::new();
        let store = engine.store(64).await;
        // Two groups, the failing one on the lower shard (expanded first before).
        let convs = groups_on_distinct_shards(&store);
        let (failing, healthy) = (convs[0].clone(), convs[1].clone());
        let pair = |a: &str| vec![format!("{a}-sender"), format!("{a}-reader")];
        group_with_a_message(&store, &failing, &pair("f")).await;
        group_with_a_message(&store, &healthy, &pair("h")).await;
        let failing_bound = pushed_bound_key(&store, store.shard_of(&failing));
        engine.set_fault(Some(Box::new(move |batch| {
            touches(batch, &failing_bound).then(|| StoreError::Engine("broken".into()))
        })));
        let (providers, sent) = webhook().await;
        let notifier = notifier(&store, providers, Duration::ZERO);
        let loops = BackgroundLoops::new();
        notifier.start(&loops, None, None);

        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while !notified(&sent, &healthy) {
            assert!(
                std::time::Instant::now() < deadline,
                "no notification for the healthy shard"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        engine.set_fault(None);
        while !notified(&sent, &failing) {
            assert!(
                std::time::Instant::now() < deadline,
                "the failing shard was not retried"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test]
    async fn a_cluster_notifier_finds_the_messages_of_commits_it_was_not_told_of() {
        let engine = FaultyEngine::new();
        let store = engine.store(4).await;
        let (providers, sent) = webhook().await;
        let notifier = notifier(&store, providers, Duration::ZERO);
        let loops = BackgroundLoops::new();
        notifier.start(&loops, Some(Duration::from_millis(100)), None);
        // Committed through another node after the notifier's first pass: nobody tells it.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let members = vec!["ann".to_owned(), "ben".to_owned()];
        group_with_a_message(&store, "g:elsewhere", &members).await;

        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while !notified(&sent, "g:elsewhere") {
            assert!(
                std::time::Instant::now() < deadline,
                "the notifier never looked at the shard again"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// A cluster's gateways record the places of their silent closes in the store and cannot
    /// tell the notifier, which runs on another node: it reads them every round.
    #[tokio::test]
    async fn a_cluster_notifier_finds_the_places_of_silent_closes_on_other_nodes() {
        let engine = FaultyEngine::new();
        let store = engine.store(4).await;
        let (providers, sent) = webhook().await;
        let notifier = notifier(&store, providers, Duration::ZERO);
        let members = vec!["ann".to_owned(), "ben".to_owned()];
        // Ben's phone had no registration when the message was expanded (it was connected).
        group_with_a_message_and_push(&store, "g:1", &members, &[]).await;
        expand_the_group(&notifier, &store).await;
        register_phone(&store, "ben").await;
        let loops = BackgroundLoops::new();
        notifier.start(&loops, Some(Duration::from_millis(100)), None);
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while notifier.owed_dirty.load(Ordering::Relaxed) {
            assert!(std::time::Instant::now() < deadline, "no first pass");
            tokio::task::yield_now().await;
        }
        // Ben's connection closes for silence on another node's gateway.
        let head = store.head("g:1").await.unwrap();
        store
            .owe_pushes("ben", "phone", &[("g:1".to_owned(), head)])
            .await
            .unwrap();
        while !notified(&sent, "g:1") {
            assert!(
                std::time::Instant::now() < deadline,
                "the notifier never read the places of the silent close"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test]
    async fn only_the_push_leader_notifies_and_another_node_takes_over_once_its_lead_lapses() {
        use courier_store::leaders::Job;
        let engine = FaultyEngine::new();
        let store = engine.store(4).await;
        // Node a leads the push job for 600 ms, then stops renewing (it died).
        let now = courier_core::clock::now_ms();
        assert!(store.lead(Job::Push, "a", now, 600).await.unwrap());
        let (providers, sent) = webhook().await;
        let b = notifier(&store, providers, Duration::ZERO);
        let loops = BackgroundLoops::new();
        let lead = JobLead {
            store: store.clone(),
            job: Job::Push,
            node: "b".into(),
        };
        b.start(&loops, Some(Duration::from_millis(50)), Some(lead));
        let members = vec!["ann".to_owned(), "ben".to_owned()];
        group_with_a_message(&store, "g:led", &members).await;
        b.committed(store.shard_of("g:led"), 1);

        // While a leads, b sends nothing (several of its rounds pass).
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(sent.lock().unwrap().is_empty(), "b notified while a led");
        // Once a's lead lapsed, b takes it and sends what waited.
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while !notified(&sent, "g:led") {
            assert!(
                std::time::Instant::now() < deadline,
                "b never took the lead over"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(
            !store
                .lead(Job::Push, "a", courier_core::clock::now_ms(), 600)
                .await
                .unwrap()
        );
    }

    /// A provider that throttles every device (429 with `Retry-After`, as FCM's
    /// `QUOTA_EXCEEDED` throttles a whole project) is sent one notification at a time, and
    /// left alone until its `Retry-After` once three tokens were throttled: the other
    /// notifications due for it are postponed to the block's end without a request and without
    /// spending an attempt. (One device throttled blocks no one else: `provider_gates`.)
    #[tokio::test]
    async fn a_throttling_provider_gets_a_few_requests_a_pass_not_one_per_notification() {
        let engine = FaultyEngine::new();
        let store = engine.store(4).await;
        let members: Vec<String> = (0..20).map(|i| format!("user{i:02}")).collect();
        group_with_a_message(&store, "g:1", &members).await;
        let (providers, seen) = scripted_webhook(429, Some("60"), Duration::ZERO).await;
        let notifier = notifier(&store, providers, Duration::ZERO);
        let before = now_ms();

        notifier.mark_all_dirty();
        notifier.pass().await.unwrap();
        let throttled = provider_gates::THROTTLED_TOKENS;
        assert_eq!(
            seen.lock().unwrap().len(),
            throttled,
            "a request per token until blocked"
        );
        let mut attempts = Vec::new();
        for user in &members[1..] {
            let pending = store.pending_push(user, "phone", "g:1").await.unwrap();
            let pending = pending.expect("still pending");
            assert!(
                pending.due_ms >= before + 60_000,
                "not before the Retry-After"
            );
            attempts.push(pending.attempts);
        }
        attempts.sort();
        assert_eq!(
            attempts,
            [vec![0; 19 - throttled], vec![1; throttled]].concat(),
            "an attempt spent per request"
        );

        // Nothing falls due before the block ends: the next pass sends nothing.
        notifier.next_due_ms.store(0, Ordering::Relaxed);
        notifier.pass().await.unwrap();
        assert_eq!(seen.lock().unwrap().len(), throttled);
    }

    /// A pending notification whose stored attempts are at their maximum (damage) is given up
    /// when its provider asks for a retry, as one out of attempts is. One was added to them: a
    /// debug build's notifier panicked at every pass that sent it (no notification was sent
    /// or expanded after it), and a build without overflow checks wrapped them to 0 and tried
    /// it all over again.
    #[tokio::test]
    async fn a_notification_whose_attempts_are_at_their_maximum_is_given_up() {
        let engine = FaultyEngine::new();
        let store = engine.store(4).await;
        let members = ["ann", "ben"].map(String::from);
        group_with_a_message(&store, "g:1", &members).await;
        let (providers, seen) = scripted_webhook(503, None, Duration::ZERO).await;
        let notifier = notifier(&store, providers, Duration::ZERO);
        expand_the_group(&notifier, &store).await;
        let pending = store.pending_push("ben", "phone", "g:1").await.unwrap();
        let pending = pending.expect("pending");
        let damaged = PendingPush {
            attempts: u32::MAX,
            due_ms: 0,
            ..pending.clone()
        };
        let key = store.keys().pending_push("ben", "phone", "g:1");
        store
            .settle_pending_push(&key, &pending, Some(&damaged))
            .await
            .unwrap();
        notifier.next_due_ms.store(0, Ordering::Relaxed);
        notifier.pass().await.unwrap();
        assert_eq!(seen.lock().unwrap().len(), 1, "sent once");
        assert_eq!(
            store.pending_push("ben", "phone", "g:1").await.unwrap(),
            None,
            "given up"
        );
    }

    /// A provider that does not answer holds each request for the request timeout: the
    /// notifications due for it are sent together, not each after the previous one's timeout
    /// (which held back every other provider's sends and the next expansion too).
    #[tokio::test]
    async fn notifications_to_a_provider_that_does_not_answer_are_in_flight_together() {
        let engine = FaultyEngine::new();
        let store = engine.store(4).await;
        let members = ["ann", "ben", "cat"].map(String::from);
        group_with_a_message(&store, "g:1", &members).await;
        let (providers, seen) = scripted_webhook(200, None, Duration::from_secs(3600)).await;
        let notifier = notifier(&store, providers, Duration::ZERO);
        notifier.mark_all_dirty();
        let pass = tokio::spawn({
            let notifier = notifier.clone();
            async move { notifier.pass().await }
        });

        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while seen.lock().unwrap().len() < 2 {
            assert!(
                std::time::Instant::now() < deadline,
                "the second notification was never sent"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let outcomes = ["sent", "retried", "failed"].map(|outcome| {
            let outcomes = &notifier.metrics.push_notifications;
            outcomes.get_or_create(&OutcomeLabel { outcome }).get()
        });
        assert_eq!(
            outcomes,
            [0, 0, 0],
            "the second request went out before the first was answered or timed out"
        );
        let mut tokens: Vec<String> = seen.lock().unwrap().iter().map(|s| s.0.clone()).collect();
        tokens.sort();
        assert_eq!(tokens, ["ben", "cat"]);
        pass.abort();
    }
}
