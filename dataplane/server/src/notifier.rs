//! The push role's queue: turns durable push intents (written in the same commit as each
//! message) into collapsed, per-device pending notifications, and sends those through the
//! providers with retries.
//!
//! - Only devices with a push registration that are not connected at that moment are notified.
//! - Collapse: one pending notification per device and conversation, carrying a count; a new
//!   message adds to it until it is sent. Each waits `--push-collapse` before its first attempt
//!   (`--push-quiet-collapse` in groups above the large-group threshold, whose notifications
//!   are also quiet: silent, background pushes).
//! - Retries: 429 and 5xx are retried with exponential backoff and full jitter, never sooner
//!   than the provider's `Retry-After`, up to `MAX_ATTEMPTS`; tokens the provider calls invalid
//!   are removed from the device.
//! - Payloads carry conversation id, seq, sender and count; the text only with
//!   `--push-include-text`.

use crate::fanout::{ShardCursors, now_ms};
use crate::membership::MembershipCache;
use crate::metrics::{Metrics, OutcomeLabel};
use crate::push::{Notification, PushError, PushProviders, next_delay};
use crate::routes::Routes;
use crate::sequencer::CommitListener;
use clap::Args;
use courier_proto::{Body, EventPayload};
use courier_store::{MessageStore, PendingPush, StoreError};
use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Notify;

/// Intents read per step of one shard.
const INTENT_PAGE: usize = 256;
/// Pending notifications read per step of a send pass.
const PENDING_PAGE: usize = 512;
/// Attempts before a notification is given up.
pub const MAX_ATTEMPTS: u32 = 12;
/// Longest pause between send passes when nothing wakes the notifier.
const IDLE_PASS: Duration = Duration::from_millis(250);

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

pub struct Notifier {
    store: MessageStore,
    routes: Arc<Routes>,
    membership: Arc<MembershipCache>,
    providers: Arc<PushProviders>,
    config: NotifierConfig,
    include_text: bool,
    large_group_threshold: usize,
    metrics: Arc<Metrics>,
    dirty: Mutex<BTreeSet<u32>>,
    cursors: ShardCursors,
    wake: Notify,
    /// The earliest due time of any pending notification (0: unknown, scan).
    next_due_ms: AtomicU64,
}

impl Notifier {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        store: MessageStore,
        routes: Arc<Routes>,
        membership: Arc<MembershipCache>,
        providers: Arc<PushProviders>,
        config: NotifierConfig,
        include_text: bool,
        large_group_threshold: usize,
        metrics: Arc<Metrics>,
    ) -> Arc<Self> {
        Arc::new(Self {
            store,
            routes,
            membership,
            providers,
            config,
            include_text,
            large_group_threshold,
            metrics,
            dirty: Mutex::new(BTreeSet::new()),
            cursors: ShardCursors::default(),
            wake: Notify::new(),
            next_due_ms: AtomicU64::new(0),
        })
    }

    /// Starts the notifier; intents left by a crash are expanded first.
    pub fn start(self: &Arc<Self>) {
        self.dirty
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend(0..self.store.shard_count());
        let notifier = self.clone();
        tokio::spawn(async move {
            loop {
                if let Err(e) = notifier.pass().await {
                    tracing::warn!(error = %e, "push pass failed; retrying");
                }
                let _ = tokio::time::timeout(IDLE_PASS, notifier.wake.notified()).await;
            }
        });
    }

    /// Expands every dirty shard's intents, then sends what is due (scanning the pending
    /// notifications only once the earliest of them is due).
    async fn pass(&self) -> Result<(), StoreError> {
        loop {
            let next = self
                .dirty
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .pop_first();
            let Some(shard) = next else { break };
            if let Err(e) = self.expand(shard).await {
                self.dirty
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(shard);
                return Err(e);
            }
        }
        if now_ms() >= self.next_due_ms.load(Ordering::Relaxed)
            && let Err(e) = self.send_due().await
        {
            // Not everything was seen: scan again next time.
            self.next_due_ms.store(0, Ordering::Relaxed);
            return Err(e);
        }
        Ok(())
    }

    async fn expand(&self, shard: u32) -> Result<(), StoreError> {
        loop {
            let after = self.cursors.get(shard);
            let intents = self
                .store
                .push_intents(shard, after.as_deref(), INTENT_PAGE)
                .await?;
            let (Some((first, _)), Some((last, _))) = (intents.first(), intents.last()) else {
                return Ok(());
            };
            let (first, last) = (first.clone(), last.clone());
            let now = now_ms();
            let mut pending: HashMap<DeviceKey, PendingPush> = HashMap::new();
            for (_, intent) in intents {
                let members = self
                    .membership
                    .members_at(&intent.conversation_id, intent.seq)
                    .await?;
                let quiet = members.len() > self.large_group_threshold;
                let collapse = if quiet {
                    self.config.push_quiet_collapse
                } else {
                    self.config.push_collapse
                };
                for member in members.iter() {
                    if *member == intent.sender_user {
                        continue;
                    }
                    let connected: Vec<String> = self
                        .routes
                        .connections(member)
                        .into_iter()
                        .map(|c| c.device)
                        .collect();
                    for (device, record) in self.store.devices(member).await? {
                        if record.push_token.is_empty()
                            || record.unlinked_ms > 0
                            || connected.contains(&device)
                        {
                            continue;
                        }
                        let key = (member.clone(), device, intent.conversation_id.clone());
                        let entry = match pending.remove(&key) {
                            Some(entry) => Some(entry),
                            None => self.store.pending_push(&key.0, &key.1, &key.2).await?,
                        };
                        let mut entry = entry.unwrap_or(PendingPush {
                            due_ms: now + collapse.as_millis() as u64,
                            quiet,
                            ..PendingPush::default()
                        });
                        entry.count = entry.count.saturating_add(1);
                        entry.last_seq = entry.last_seq.max(intent.seq);
                        entry.sender = intent.sender_user.clone();
                        pending.insert(key, entry);
                    }
                }
            }
            let pending: Vec<_> = pending.into_iter().collect();
            self.store
                .expand_push_intents(&first, &last, &pending)
                .await?;
            self.cursors.set(shard, last);
            if let Some(due) = pending.iter().map(|(_, p)| p.due_ms).min() {
                self.next_due_ms.fetch_min(due, Ordering::Relaxed);
            }
        }
    }

    async fn send_due(&self) -> Result<(), StoreError> {
        self.next_due_ms.store(u64::MAX, Ordering::Relaxed);
        let mut after: Option<Vec<u8>> = None;
        loop {
            let page = self
                .store
                .pending_pushes(after.as_deref(), PENDING_PAGE)
                .await?;
            let Some((last, _)) = page.last() else {
                return Ok(());
            };
            after = Some(last.clone());
            let now = now_ms();
            for (key, pending) in page {
                if pending.due_ms <= now {
                    self.send(&key, pending).await?;
                } else {
                    self.next_due_ms
                        .fetch_min(pending.due_ms, Ordering::Relaxed);
                }
            }
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
        let notification = Notification {
            conversation_id: conv.clone(),
            seq: pending.last_seq,
            sender: pending.sender.clone(),
            count: pending.count,
            text: self.text_of(&conv, pending.last_seq).await?,
            quiet: pending.quiet,
        };
        match provider.send(&record.push_token, &notification).await {
            Ok(()) => {
                self.count("sent");
                self.settle(key, &pending, None).await
            }
            Err(PushError::Retry { after }) if pending.attempts + 1 < MAX_ATTEMPTS => {
                self.count("retried");
                let attempts = pending.attempts + 1;
                let next = PendingPush {
                    attempts,
                    due_ms: now_ms() + next_delay(attempts, after).as_millis() as u64,
                    ..pending.clone()
                };
                self.next_due_ms.fetch_min(next.due_ms, Ordering::Relaxed);
                self.settle(key, &pending, Some(&next)).await
            }
            Err(PushError::InvalidToken) => {
                self.count("invalid_token");
                tracing::info!(%user, %device, "push token refused by the provider; removed");
                self.store.set_push_token(&user, &device, "", "").await?;
                self.settle(key, &pending, None).await
            }
            Err(e) => {
                self.count("failed");
                tracing::warn!(%user, %device, error = ?e, "push notification given up");
                self.settle(key, &pending, None).await
            }
        }
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

impl CommitListener for Notifier {
    fn committed(&self, shard: u32, _events: usize) {
        self.dirty
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(shard);
        self.wake.notify_one();
    }
}
