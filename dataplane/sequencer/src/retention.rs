//! Retention: a background job that clears events once every active member device has them
//! delivered and they are older than the retention window, then moves the conversation's
//! floor up. Trims go through the sequencer, so they are fenced by the shard's epoch like
//! every other shard write. A device unseen for `device_inactive_after` no longer holds events
//! back; when it returns with a cursor below the floor it gets a `trimmed` frame first.
//!
//! A pass looks only at the conversations the store's retention queue says are due
//! (`courier_store::trim_queue`), and moves each to when it should look again. It reads a
//! conversation's old events a page at a time and trims what each page lets go in a commit of
//! its own, resting between pages (`docs/benchmarks.md`, "A conversation's trim in steps").
//!
//! Each pass also clears the idempotency buckets that expired (`courier_store::idempotency`):
//! a retry with the same `client_msg_id` more than the store's idempotency window after the
//! send may be sequenced as a new message. Server-made keys expire likewise (a delete retried
//! after the window is sequenced again, and tombstones a message already tombstoned).
//!
//! The passes run in a loop owned by the node's [`BackgroundLoops`]. It stops at once when
//! cancelled, mid-pass if need be (a pass is idempotent: the next one starts over), and is
//! restarted if it panics (its state between passes is the queue in the store).

use courier_core::clock::now_ms;
use courier_core::leases::JobLead;
use courier_core::loops::BackgroundLoops;
use courier_core::metrics::Metrics;
use courier_core::sequencing::{Sequencer, SequencerError};
use courier_proto::{Body, EventPayload};
use courier_store::{CLEAR_PAGE, MediaReference, MessageStore, StoreError, rest_after_clear_page};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Conversations read per step of a pass.
const PAGE: usize = 256;

/// A conversation whose old events a device holds back is looked at again after this part of
/// the time its oldest held event has waited past the window (at least at the next pass): a
/// conversation a device holds for weeks is looked at a few dozen times, not at every pass,
/// and its events wait at most this part longer than the device makes them.
const HELD_BACK_BACKOFF: u64 = 4;

#[derive(Debug, Clone, Copy)]
pub struct RetentionPolicy {
    /// Events younger than this are kept, delivered or not.
    pub window: Duration,
    /// A device unseen for this long stops counting as active.
    pub device_inactive_after: Duration,
    /// Time between passes.
    pub interval: Duration,
}

pub struct Retention {
    store: MessageStore,
    sequencer: Arc<dyn Sequencer>,
    policy: RetentionPolicy,
    metrics: Arc<Metrics>,
}

/// What one retention pass cleared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cleared {
    pub events: u64,
    pub idempotency_records: u64,
    /// Conversations that could not be trimmed (each logged; the next pass tries again).
    pub failed_conversations: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum RetentionError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Sequencer(#[from] SequencerError),
}

impl Retention {
    pub fn new(
        store: MessageStore,
        sequencer: Arc<dyn Sequencer>,
        policy: RetentionPolicy,
        metrics: Arc<Metrics>,
    ) -> Arc<Self> {
        Arc::new(Self {
            store,
            sequencer,
            policy,
            metrics,
        })
    }

    /// Runs a pass every `interval` until `loops` shuts down, when this node leads the
    /// retention job (one node of a cluster at a time, `courier_store::leaders`).
    pub fn start(self: &Arc<Self>, loops: &BackgroundLoops, lead: JobLead) {
        let retention = self.clone();
        loops.spawn("retention", move |cancel| {
            let (retention, lead) = (retention.clone(), lead.clone());
            async move {
                cancel.run_until_cancelled(retention.run_every(&lead)).await;
            }
        });
    }

    async fn run_every(&self, lead: &JobLead) {
        loop {
            tokio::time::sleep(self.policy.interval).await;
            if !lead.runs_pass(self.policy.interval).await {
                // The leader's passes clear the idempotency records of earlier versions' layouts;
                // this node's appends stop looking for them once they are gone.
                if let Err(e) = self.store.recheck_earlier_idempotency().await {
                    tracing::warn!(error = %e, "could not check for idempotency records to migrate");
                }
                continue;
            }
            match self.run_once().await {
                Ok(Cleared {
                    events: 0,
                    idempotency_records: 0,
                    failed_conversations: 0,
                }) => {}
                Ok(Cleared {
                    events,
                    idempotency_records,
                    failed_conversations,
                }) => tracing::info!(
                    events,
                    idempotency_records,
                    failed_conversations,
                    "retention pass"
                ),
                Err(e) => tracing::warn!(error = %e, "retention pass failed; will retry"),
            }
        }
    }

    /// One pass over the conversations that are due, then over the idempotency records
    /// (expired even if the conversations could not be listed).
    pub async fn run_once(&self) -> Result<Cleared, RetentionError> {
        let trimmed = self.trim_conversations().await;
        let idempotency_records = self.store.expire_idempotency_records(now_ms()).await?;
        let (events, failed_conversations) = trimmed?;
        Ok(Cleared {
            events,
            idempotency_records,
            failed_conversations,
        })
    }

    /// Trims the conversations the retention queue says are due (building the queue first when
    /// it must be, `courier_store::trim_queue`) and moves each to when it should be looked at
    /// again; returns the number of events cleared and of conversations that could not be
    /// trimmed. One that fails (its shard moving, a record that does not decode) is logged,
    /// looked at again at the next pass, and passed over: the others are still trimmed.
    async fn trim_conversations(&self) -> Result<(u64, u64), RetentionError> {
        let now = now_ms();
        let window = self.policy.window.as_millis() as u64;
        let queued = self.store.build_trim_queue(window, now).await?;
        if queued > 0 {
            tracing::info!(conversations = queued, "retention queue built");
        }
        let (mut cleared, mut failed) = (0, 0);
        let mut after: Option<Vec<u8>> = None;
        loop {
            let page = self.store.due_trims(now, after.as_deref(), PAGE).await?;
            let Some(last) = page.last() else {
                return Ok((cleared, failed));
            };
            let mut moves = Vec::with_capacity(page.len());
            for entry in &page {
                let conv = &entry.conversation;
                match self.trim_conversation(conv, now).await {
                    Ok((events, next_due)) => {
                        cleared += events;
                        moves.push((entry, next_due));
                    }
                    Err(e) => {
                        tracing::warn!(conversation = %conv, error = %e, "could not trim; the next pass tries again");
                        self.metrics.retention_failures.inc();
                        failed += 1;
                    }
                }
            }
            // Entries not moved stay due: the next pass looks at them again.
            if let Err(e) = self.store.reschedule_trims(&moves).await {
                tracing::warn!(error = %e, conversations = moves.len(), "could not move trimmed conversations in the retention queue; the next pass looks at them again");
            }
            if page.len() < PAGE {
                return Ok((cleared, failed));
            }
            after = Some(last.key.clone());
        }
    }

    /// Trims `conv` as of `now`; returns the number of events cleared and when to look at it
    /// again: when its oldest kept event comes of age; when a device holds events back, after
    /// [`held_back_wait`]; a window from now when it keeps none.
    async fn trim_conversation(&self, conv: &str, now: u64) -> Result<(u64, u64), RetentionError> {
        let window = self.policy.window.as_millis() as u64;
        let interval = self.policy.interval.as_millis() as u64;
        let cutoff = now.saturating_sub(window);
        let floor = self.store.floor(conv).await?;
        // Nothing can go while the oldest event kept is younger than the window: the members'
        // devices and cursors are read only when something is old enough.
        let oldest = self.store.events(conv, floor - 1, u64::MAX, 1).await?;
        let oldest_ms = match oldest.first() {
            None => return Ok((0, now.saturating_add(window))),
            Some(event) if event.ts_ms > cutoff => {
                return Ok((0, event.ts_ms.saturating_add(window)));
            }
            Some(event) => event.ts_ms,
        };
        let head = self.store.head(conv).await?;
        let delivered = self.delivered_everywhere(conv, head, now).await?;
        let mut old_enough = floor - 1;
        // The first event kept for its age, and the first old one kept for a device, when the
        // scan reached one.
        let mut young = None;
        let mut held_ms = None;
        let (mut cleared, mut trimmed_to) = (0, floor);
        // A page of events read, then what it lets go cleared in one commit (at most a page:
        // the embedded engine clears a range key by key inside its group commit, which every
        // other commit waits for), then a rest, as every background clean-up does.
        while old_enough < delivered {
            let started = Instant::now();
            let events = self
                .store
                .events(conv, old_enough, u64::MAX, CLEAR_PAGE)
                .await?;
            let full = events.len() == CLEAR_PAGE;
            let mut stopped = false;
            let mut media = Vec::new();
            for event in events {
                if event.ts_ms > cutoff {
                    young = Some((event.seq, event.ts_ms));
                    stopped = true;
                    break;
                }
                if event.seq > delivered {
                    held_ms = Some(event.ts_ms);
                    stopped = true;
                    break;
                }
                old_enough = event.seq;
                if let EventPayload::Message {
                    body: Some(Body::Media(m)),
                    ..
                } = event.payload
                {
                    media.push(MediaReference {
                        media_id: m.media_id,
                        seq: event.seq,
                    });
                }
            }
            let step_floor = old_enough.min(delivered) + 1;
            if step_floor > trimmed_to {
                cleared += self.trim_step(conv, step_floor, media).await?;
                trimmed_to = step_floor;
            }
            if stopped || !full || old_enough >= delivered {
                break;
            }
            rest_after_clear_page(started).await;
        }
        let new_floor = old_enough.min(delivered) + 1;
        // The oldest event a device holds back: the one the scan stopped at, the oldest kept
        // when nothing went (unknown when a page ended the scan: looked at again next pass).
        let held_ms = held_ms.or((new_floor == floor).then_some(oldest_ms));
        let next_due = match young {
            _ if new_floor > head => now.saturating_add(window),
            Some((seq, ts_ms)) if seq == new_floor => ts_ms.saturating_add(window),
            _ => {
                let overdue = held_ms.map_or(0, |held| cutoff.saturating_sub(held));
                now.saturating_add(held_back_wait(overdue, interval))
            }
        };
        Ok((cleared, next_due))
    }

    /// Clears the events of `conv` below `new_floor`, and in the same commit the references to
    /// media of those of its messages that held one (`media`): unreferenced, media is swept
    /// after its TTL. Returns how many seqs went.
    async fn trim_step(
        &self,
        conv: &str,
        new_floor: u64,
        media: Vec<MediaReference>,
    ) -> Result<u64, RetentionError> {
        let cleared = self.sequencer.trim(conv, new_floor, media).await?;
        self.metrics.retention_cleared.inc_by(cleared);
        Ok(cleared)
    }

    /// The highest seq every active device of every member has acknowledged as delivered. A
    /// former member's devices count until they have everything up to its removal.
    async fn delivered_everywhere(
        &self,
        conv: &str,
        head: u64,
        now: u64,
    ) -> Result<u64, StoreError> {
        let active_since = now.saturating_sub(self.policy.device_inactive_after.as_millis() as u64);
        let mut lowest = head;
        for (user, member) in self.store.member_records(conv).await? {
            for (device, record) in self.store.devices(&user).await? {
                if record.is_linked() && record.last_seen_ms >= active_since {
                    let cursor = self.store.device_cursor(&user, &device, conv).await?;
                    if member.is_member() || cursor < member.version() {
                        lowest = lowest.min(cursor);
                    }
                }
            }
        }
        Ok(lowest)
    }
}

/// How long to wait before looking again at a conversation whose oldest held-back event has
/// waited `overdue_ms` past the window: a [`HELD_BACK_BACKOFF`]th of that, at least
/// `interval_ms` (the next pass).
fn held_back_wait(overdue_ms: u64, interval_ms: u64) -> u64 {
    (overdue_ms / HELD_BACK_BACKOFF).max(interval_ms)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::LocalSequencer;
    use courier_proto::Sender;
    use courier_store::faulty_engine::FaultyEngine;
    use courier_store::kv::Mutation;
    use courier_store::{Append, Batch, DeviceRecord, NewConversation};

    fn policy(window: Duration) -> RetentionPolicy {
        RetentionPolicy {
            window,
            device_inactive_after: Duration::from_secs(3600),
            interval: Duration::from_secs(3600),
        }
    }

    async fn sequencer_on(store: &MessageStore) -> Arc<LocalSequencer> {
        crate::tests::node_on(store, crate::tests::node("n1", Duration::from_secs(10))).await
    }

    /// alice's messages `ids` to `peer` in `conv`, created by the first.
    async fn send(sequencer: &LocalSequencer, conv: &str, peer: &str, ids: &[&str]) {
        let sender = Sender {
            user: "alice".into(),
            device: "phone".into(),
        };
        for id in ids {
            let body = courier_proto::Body::Text((*id).into());
            let append = Append {
                create: Some(NewConversation::direct("alice", peer)),
                ..Append::message(conv.into(), sender.clone(), (*id).into(), body, None)
            };
            sequencer.submit(append).await.unwrap();
        }
    }

    fn retention(
        store: &MessageStore,
        sequencer: &Arc<LocalSequencer>,
        window: Duration,
    ) -> Arc<Retention> {
        let sequencer: Arc<dyn Sequencer> = sequencer.clone();
        Retention::new(
            store.clone(),
            sequencer,
            policy(window),
            Arc::new(Metrics::new()),
        )
    }

    /// A conversation whose oldest event is younger than the window is passed over without
    /// reading its members (nor their devices and cursors); past the window it is trimmed.
    #[tokio::test]
    async fn a_pass_reads_the_members_only_of_conversations_with_events_old_enough() {
        let engine = FaultyEngine::new();
        let store = engine.store(4).await;
        let sequencer = sequencer_on(&store).await;
        send(&sequencer, "d:1", "bob", &["a", "b"]).await;
        let members = store.keys().members("d:1");

        engine.take_ranges_read();
        let young = retention(&store, &sequencer, Duration::from_secs(3600));
        assert_eq!(young.run_once().await.unwrap().events, 0);
        assert!(
            !engine.take_ranges_read().contains(&members),
            "members read"
        );

        let old = retention(&store, &sequencer, Duration::ZERO);
        assert_eq!(
            old.run_once().await.unwrap().events,
            2,
            "no device holds them back"
        );
        assert!(engine.take_ranges_read().contains(&members));
    }

    /// A conversation that cannot be trimmed is counted and passed over; the others are
    /// trimmed in the same pass, and the next pass trims it.
    #[tokio::test]
    async fn a_conversation_that_fails_does_not_stop_the_pass() {
        let engine = FaultyEngine::new();
        let store = engine.store(4).await;
        let sequencer = sequencer_on(&store).await;
        send(&sequencer, "d:1", "bob", &["a", "b"]).await;
        send(&sequencer, "d:2", "carol", &["c", "d", "e"]).await;
        let floor = store.keys().floor("d:1");
        engine.set_fault(Some(Box::new(move |batch: &Batch| {
            let trims_d1 = batch
                .mutations
                .iter()
                .any(|m| matches!(m, Mutation::Set { key, .. } if *key == floor));
            trims_d1.then(|| StoreError::Engine("injected".into()))
        })));
        let pass = retention(&store, &sequencer, Duration::ZERO);
        let first = pass.run_once().await.unwrap();
        assert_eq!((first.events, first.failed_conversations), (3, 1));
        assert_eq!(store.floor("d:2").await.unwrap(), 4);
        assert_eq!(store.floor("d:1").await.unwrap(), 1);

        engine.set_fault(None);
        let second = pass.run_once().await.unwrap();
        assert_eq!((second.events, second.failed_conversations), (2, 0));
        assert_eq!(store.floor("d:1").await.unwrap(), 3);
    }

    /// A pass looks at a conversation when it is due, and moves it to when its oldest event
    /// comes of age: the next pass, before then, reads nothing of it.
    #[tokio::test]
    async fn a_pass_visits_only_the_conversations_that_are_due() {
        let engine = FaultyEngine::new();
        let store = engine.store(4).await;
        let sequencer = sequencer_on(&store).await;
        send(&sequencer, "d:1", "bob", &["a"]).await;
        send(&sequencer, "d:2", "carol", &["b"]).await;
        let sent = store.events("d:1", 0, u64::MAX, 1).await.unwrap()[0].ts_ms;
        let hour = Duration::from_secs(3600);
        let pass = retention(&store, &sequencer, hour);
        engine.take_ranges_read();
        assert_eq!(pass.run_once().await.unwrap().events, 0);
        let events_of = |conv: &str| store.keys().events(conv, 1, u64::MAX);
        let read = engine.take_ranges_read();
        assert!(read.contains(&events_of("d:1")) && read.contains(&events_of("d:2")));

        let later = store.due_trims(u64::MAX, None, 10).await.unwrap();
        let d1 = later.iter().find(|e| e.conversation == "d:1").unwrap();
        assert!(
            d1.due_ms >= sent + 3_600_000 && d1.due_ms < sent + 3_700_000,
            "{d1:?}"
        );
        assert!(
            store
                .due_trims(now_ms(), None, 10)
                .await
                .unwrap()
                .is_empty()
        );

        assert_eq!(pass.run_once().await.unwrap().events, 0);
        let read = engine.take_ranges_read();
        assert!(!read.contains(&events_of("d:1")) && !read.contains(&events_of("d:2")));
    }

    /// Alice's phone, and a picture she uploaded (`m1`).
    fn alice_and_a_picture() -> (Sender, courier_proto::Media) {
        let sender = Sender {
            user: "alice".into(),
            device: "phone".into(),
        };
        let picture = courier_proto::Media {
            media_id: "m1".into(),
            mime: "image/png".into(),
            size: 1,
            sha256: "00".into(),
            name: None,
            caption: None,
        };
        (sender, picture)
    }

    /// A trim longer than a page commits a page at a time, the references of each page's
    /// messages to media with it: other commits never wait behind one long clear.
    #[tokio::test]
    async fn a_long_trim_commits_a_page_at_a_time() {
        let engine = FaultyEngine::new();
        let store = engine.store(4).await;
        let sequencer = sequencer_on(&store).await;
        send(&sequencer, "d:1", "bob", &["first"]).await;
        let (sender, picture) = alice_and_a_picture();
        let page = CLEAR_PAGE as u64;
        let events = 2 * page + 3;
        let sends = (1..events).map(|i| {
            let body = if i == page + 7 {
                Body::Media(Box::new(picture.clone()))
            } else {
                Body::Text(i.to_string())
            };
            sequencer.submit(Append::message(
                "d:1".into(),
                sender.clone(),
                i.to_string(),
                body,
                None,
            ))
        });
        futures::future::try_join_all(sends).await.unwrap();
        let [(_, referenced)] = store.media_references("m1").await.unwrap()[..] else {
            panic!("one reference");
        };
        let (floor, reference) = (
            store.keys().floor("d:1"),
            store.keys().media_reference("m1", "d:1", referenced),
        );
        let steps = Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = steps.clone();
        engine.set_fault(Some(Box::new(move |batch: &Batch| {
            let floor_set = batch.mutations.iter().find_map(|m| match m {
                Mutation::Set { key, value } if *key == floor => {
                    Some(u64::from_le_bytes(value[..8].try_into().unwrap()))
                }
                _ => None,
            });
            let clears_reference = batch
                .mutations
                .iter()
                .any(|m| matches!(m, Mutation::Clear { key } if *key == reference));
            seen.lock().unwrap().extend(
                floor_set
                    .map(|f| format!("floor {f}"))
                    .into_iter()
                    .chain(clears_reference.then(|| "reference".to_owned())),
            );
            None
        })));

        let pass = retention(&store, &sequencer, Duration::ZERO);
        assert_eq!(pass.run_once().await.unwrap().events, events);
        let step = |n: u64| format!("floor {}", 1 + n * page);
        assert_eq!(
            *steps.lock().unwrap(),
            [
                step(1),
                step(2),
                "reference".into(),
                format!("floor {}", events + 1)
            ],
            "the reference (seq {referenced}) goes with the second page"
        );
        assert!(store.media_references("m1").await.unwrap().is_empty());
        assert!(
            store
                .events("d:1", 0, u64::MAX, 1)
                .await
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn a_held_back_conversation_waits_a_quarter_of_its_delay_and_at_least_a_pass() {
        let hour = 3_600_000;
        assert_eq!(held_back_wait(0, hour), hour);
        assert_eq!(held_back_wait(3 * hour, hour), hour);
        assert_eq!(held_back_wait(8 * 24 * hour, hour), 2 * 24 * hour);
        // Looked at after each quarter: ~30 times over 30 days of holding, not 720 passes.
        let (mut overdue, mut looks) = (0, 0);
        while overdue < 30 * 24 * hour {
            overdue += held_back_wait(overdue, hour);
            looks += 1;
        }
        assert!(looks < 40, "{looks}");
    }

    /// A conversation whose old events an active device has not had is kept, and looked at
    /// again at the next pass (not a window later).
    #[tokio::test]
    async fn a_conversation_a_device_holds_back_is_looked_at_again_at_the_next_pass() {
        let engine = FaultyEngine::new();
        let store = engine.store(4).await;
        let sequencer = sequencer_on(&store).await;
        send(&sequencer, "d:1", "bob", &["a"]).await;
        let seen = |_: Option<&DeviceRecord>| {
            Some(DeviceRecord {
                last_seen_ms: now_ms(),
                ..Default::default()
            })
        };
        store.update_device("bob", "phone", seen).await.unwrap();
        let mut policy = policy(Duration::ZERO);
        policy.interval = Duration::from_secs(60);
        let sequencer: Arc<dyn Sequencer> = sequencer.clone();
        let pass = Retention::new(store.clone(), sequencer, policy, Arc::new(Metrics::new()));
        let before = now_ms();
        assert_eq!(
            pass.run_once().await.unwrap().events,
            0,
            "bob has not had it"
        );
        let due = store.due_trims(u64::MAX, None, 10).await.unwrap();
        assert_eq!(due.len(), 1);
        assert!(
            due[0].due_ms >= before + 60_000 && due[0].due_ms < before + 120_000,
            "{due:?}"
        );
    }

    /// A trimmed message's media reference goes in the commit that trims the message: when
    /// that commit fails (an engine error, a timeout, a crash), the message stays with its
    /// reference and a later pass clears both. A reference left behind a trimmed message would
    /// keep its media from the sweeper for good, since no later pass reads below the floor.
    #[tokio::test]
    async fn a_trimmed_messages_media_reference_goes_with_it_even_when_a_commit_fails() {
        let engine = FaultyEngine::new();
        let store = engine.store(4).await;
        let sequencer = sequencer_on(&store).await;
        let (sender, picture) = alice_and_a_picture();
        let append = Append {
            create: Some(NewConversation::direct("alice", "bob")),
            ..Append::message(
                "d:1".into(),
                sender,
                "a".into(),
                Body::Media(Box::new(picture)),
                None,
            )
        };
        sequencer.submit(append).await.unwrap();
        assert_eq!(store.media_references("m1").await.unwrap().len(), 1);
        let reference = store.keys().media_reference("m1", "d:1", 1);
        engine.set_fault(Some(Box::new(move |batch: &Batch| {
            let clears = batch
                .mutations
                .iter()
                .any(|m| matches!(m, Mutation::Clear { key } if *key == reference));
            clears.then(|| StoreError::Engine("injected: the reference's clear fails".into()))
        })));
        let pass = retention(&store, &sequencer, Duration::ZERO);
        assert_eq!(pass.run_once().await.unwrap().failed_conversations, 1);
        let floor = store.floor("d:1").await.unwrap();
        let references = store.media_references("m1").await.unwrap();
        assert!(
            floor == 1 || references.is_empty(),
            "message 1 was trimmed (floor {floor}) and left its reference to m1: {references:?}"
        );

        engine.set_fault(None);
        pass.run_once().await.unwrap();
        assert_eq!(
            store.floor("d:1").await.unwrap(),
            2,
            "the message was trimmed"
        );
        assert!(store.media_references("m1").await.unwrap().is_empty());
    }
}
