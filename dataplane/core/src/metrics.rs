//! Prometheus metrics of every role, named `courier_<area>_<what>_<unit>`.

use courier_store::MessageStore;
use courier_store::kv::{EventCacheTotals, WriterTotals};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;
use std::sync::{Mutex, OnceLock};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ShardLabel {
    pub shard: u32,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ScopeLabel {
    pub scope: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReaderLabel {
    pub reader: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TransferLimitLabel {
    pub transfer: &'static str,
    pub limit: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CodeLabel {
    pub code: &'static str,
}

/// Latency of each stage of a message's way, so that where the time goes is visible on
/// `/metrics`: commit, fanout's read of the outbox, hand-off (`delivery_lag`), the wait in a
/// connection's queue until it is written, and for acks, receipt to commit.
pub struct StageLatencies {
    /// One group commit of a sequencer shard: the engine's queue, write and fsync.
    pub commit: Histogram,
    /// From an event's timestamp (taken as its batch starts committing) to fanout reading it
    /// from the outbox.
    pub outbox_read: Histogram,
    /// From fanout's hand-off to the connection task writing the event to its socket.
    pub connection_queue: Histogram,
    /// From an `ack` frame read to its durable commit.
    pub ack_commit: Histogram,
}

/// Every metric, registered once at start-up and shared by the roles.
pub struct Metrics {
    registry: Registry,
    /// Time from a `send` frame to its `sent` reply.
    pub send_ack_latency: Histogram,
    /// Time from an event's commit to its hand-off to a connection's queue.
    pub delivery_lag: Histogram,
    /// Per-stage latencies of the delivery path (`docs/operations.md`, "Where the time goes").
    pub stages: StageLatencies,
    /// Events committed and not yet fanned out (by this node's fanout).
    pub fanout_backlog: Gauge,
    /// The age of the oldest outbox entry of the shards this node sequences, as its last
    /// outbox-lag round read it, in seconds.
    pub sequencer_outbox_lag: Gauge<f64, AtomicU64>,
    /// Shards this node sequences whose messages are refused because their outbox is behind.
    pub sequencer_shards_behind: Gauge,
    /// Messages refused because their shard's outbox is behind.
    pub delivery_behind_refusals: Counter,
    /// Sends this node's chat role accepted and has not answered yet.
    pub sends_in_flight: Gauge,
    /// Events appended, per sequencer shard (hot shards stand out).
    pub shard_appends: Family<ShardLabel, Counter>,
    /// Sequencer shards this node owns (holds a lease on).
    pub owned_shards: Gauge,
    pub fanout_owned_shards: Gauge,
    /// Appends per group commit.
    pub commit_batch_size: Histogram,
    /// Open WebSocket connections.
    pub connections: Gauge,
    /// Sends that matched an earlier one (client retries).
    pub send_retries: Counter,
    /// Events dropped from a full outbound queue, read from the store by their connection.
    pub lagged_deliveries: Counter,
    /// `error` frames sent, by code.
    pub errors: Family<CodeLabel, Counter>,
    /// Requests refused by a rate limit, by scope (`user`, `group`, `connection`).
    pub rate_limited: Family<ScopeLabel, Counter>,
    /// Typing frames dropped (queue filling or rate limit).
    pub typing_dropped: Counter,
    /// Connections closed for reading nothing from their client for two ping intervals.
    pub silent_closes: Counter,
    /// Events cleared by retention.
    pub retention_cleared: Counter,
    /// Conversations a retention pass could not trim (the next pass tries again).
    pub retention_failures: Counter,
    /// Events waiting in the large-group fanout queue.
    pub large_group_queue: Gauge,
    /// Bytes of media uploaded.
    pub media_uploaded_bytes: Counter,
    /// Media deleted by the sweeper.
    pub media_swept: Counter,
    /// Media downloads in flight (`--media-downloads-in-flight`).
    pub media_downloads_in_flight: Gauge,
    /// Media transfers refused by a bound, by transfer (`upload`, `download`) and limit
    /// ([`Metrics::media_refused`]).
    media_transfers_refused: Family<TransferLimitLabel, Counter>,
    /// Push notifications by outcome (`sent`, `retried`, `invalid_token`, `failed`, `dropped`,
    /// `delivered`: the device had the messages before the notification was due).
    pub push_notifications: Family<OutcomeLabel, Counter>,
    /// Fetches of the identity provider's key set (`--jwt-jwks-url`) by outcome (`fetched`,
    /// `failed`: the keys in place stay).
    pub token_key_set_fetches: Family<OutcomeLabel, Counter>,
    /// Pages of a shard's outbox read from the store, by reader (`fanout`, `push`); in one
    /// process both take what its commits list instead, once a read reached the outbox's end.
    pub outbox_pages_read: Family<ReaderLabel, Counter>,
    /// Outbox entries (or whole rows) a reader (`fanout`, `push`) could not decode and passed
    /// over: their events were neither delivered live nor pushed (`docs/distributed.md`).
    pub outbox_undecodable_entries: Family<ReaderLabel, Counter>,
    resident_memory: Gauge,
    worker_threads: Gauge,
    /// Threads of the runtime of ordering and delivery (`--ordering-threads`; 0: they run
    /// with the connections).
    pub ordering_threads: Gauge,
    /// The embedded store's block cache (`--store-cache`; 0: another store).
    pub store_cache_bytes: Gauge,
    /// Bytes of pages of history held while their clients read them
    /// (`--max-page-bytes-in-flight`).
    pub page_bytes_in_flight: Gauge,
    /// The embedded store's writer and cache of recent events, read from the store at each
    /// render.
    store_engine: StoreEngineMetrics,
}

/// The store's writer ([`WriterTotals`]) and cache of recent events ([`EventCacheTotals`]) as
/// counters, brought up to date when rendered.
#[derive(Default)]
struct StoreEngineMetrics {
    store: OnceLock<MessageStore>,
    seen: Mutex<(WriterTotals, EventCacheTotals)>,
    busy: Counter<f64, AtomicU64>,
    groups: Counter,
    batches: Counter,
    events_held: Counter,
    events_missed: Counter,
}

impl StoreEngineMetrics {
    fn refresh(&self) {
        let Some(store) = self.store.get() else {
            return;
        };
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        let (writer, events) = &mut *seen;
        if let Some(now) = store.writer_totals() {
            self.busy
                .inc_by(now.busy.saturating_sub(writer.busy).as_secs_f64());
            self.groups.inc_by(now.groups.saturating_sub(writer.groups));
            self.batches
                .inc_by(now.batches.saturating_sub(writer.batches));
            *writer = now;
        }
        if let Some(now) = store.event_cache_totals() {
            self.events_held
                .inc_by(now.held.saturating_sub(events.held));
            self.events_missed
                .inc_by(now.missed.saturating_sub(events.missed));
            *events = now;
        }
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("courier");
        let latency = || Histogram::new(exponential_buckets(0.000_05, 2.0, 20));
        let metrics = Self {
            send_ack_latency: latency(),
            delivery_lag: latency(),
            stages: StageLatencies {
                commit: latency(),
                outbox_read: latency(),
                connection_queue: latency(),
                ack_commit: latency(),
            },
            fanout_backlog: Gauge::default(),
            sequencer_outbox_lag: Gauge::default(),
            sequencer_shards_behind: Gauge::default(),
            delivery_behind_refusals: Counter::default(),
            sends_in_flight: Gauge::default(),
            shard_appends: Family::default(),
            owned_shards: Gauge::default(),
            fanout_owned_shards: Gauge::default(),
            commit_batch_size: Histogram::new(exponential_buckets(1.0, 2.0, 12)),
            connections: Gauge::default(),
            send_retries: Counter::default(),
            lagged_deliveries: Counter::default(),
            errors: Family::default(),
            rate_limited: Family::default(),
            typing_dropped: Counter::default(),
            silent_closes: Counter::default(),
            retention_cleared: Counter::default(),
            retention_failures: Counter::default(),
            large_group_queue: Gauge::default(),
            media_uploaded_bytes: Counter::default(),
            media_swept: Counter::default(),
            media_downloads_in_flight: Gauge::default(),
            media_transfers_refused: Family::default(),
            push_notifications: Family::default(),
            token_key_set_fetches: Family::default(),
            outbox_pages_read: Family::default(),
            outbox_undecodable_entries: Family::default(),
            resident_memory: Gauge::default(),
            worker_threads: Gauge::default(),
            ordering_threads: Gauge::default(),
            store_cache_bytes: Gauge::default(),
            page_bytes_in_flight: Gauge::default(),
            store_engine: StoreEngineMetrics::default(),
            registry: Registry::default(),
        };
        registry.register(
            "chat_send_ack_latency_seconds",
            "Time from a send frame to its sent reply",
            metrics.send_ack_latency.clone(),
        );
        registry.register(
            "fanout_delivery_lag_seconds",
            "Time from an event's commit to its hand-off to a connection",
            metrics.delivery_lag.clone(),
        );
        registry.register(
            "sequencer_commit_seconds",
            "Time of one group commit of a shard: the engine's queue, write and fsync",
            metrics.stages.commit.clone(),
        );
        registry.register(
            "fanout_outbox_read_lag_seconds",
            "Time from an event's commit to fanout reading it from the outbox",
            metrics.stages.outbox_read.clone(),
        );
        registry.register(
            "gateway_queue_wait_seconds",
            "Time from fanout's hand-off of an event to its connection writing it",
            metrics.stages.connection_queue.clone(),
        );
        registry.register(
            "chat_ack_commit_seconds",
            "Time from an ack frame to its durable commit",
            metrics.stages.ack_commit.clone(),
        );
        registry.register(
            "chat_sends_in_flight",
            "Sends accepted by this node and not answered yet (see --max-sends-in-flight)",
            metrics.sends_in_flight.clone(),
        );
        registry.register(
            "fanout_backlog_events",
            "Events this node's fanout was told of and has not fanned out yet (a metric only)",
            metrics.fanout_backlog.clone(),
        );
        registry.register(
            "sequencer_outbox_lag_seconds",
            "Age of the oldest outbox entry of the shards this node sequences (every 250 ms)",
            metrics.sequencer_outbox_lag.clone(),
        );
        registry.register(
            "sequencer_shards_behind",
            "Shards refusing messages because their outbox is older than --outbox-lag-limit",
            metrics.sequencer_shards_behind.clone(),
        );
        registry.register(
            "sequencer_delivery_behind_refusals",
            "Messages refused because their shard's outbox is behind (clients retry)",
            metrics.delivery_behind_refusals.clone(),
        );
        registry.register(
            "sequencer_appends",
            "Events appended, per shard",
            metrics.shard_appends.clone(),
        );
        registry.register(
            "sequencer_owned_shards",
            "Sequencer shards this node holds a lease on",
            metrics.owned_shards.clone(),
        );
        registry.register(
            "fanout_owned_shards",
            "Shards whose outbox this node drains (holds a delivery lease on)",
            metrics.fanout_owned_shards.clone(),
        );
        registry.register(
            "sequencer_commit_batch_appends",
            "Appends per group commit",
            metrics.commit_batch_size.clone(),
        );
        registry.register(
            "gateway_connections",
            "Open WebSocket connections",
            metrics.connections.clone(),
        );
        registry.register(
            "chat_send_retries",
            "Sends that matched an earlier send with the same client_msg_id",
            metrics.send_retries.clone(),
        );
        registry.register(
            "gateway_lagged_deliveries",
            "Events dropped from a full outbound queue and read from the store instead",
            metrics.lagged_deliveries.clone(),
        );
        registry.register(
            "gateway_errors",
            "Error frames sent, by code",
            metrics.errors.clone(),
        );
        registry.register(
            "chat_rate_limited",
            "Requests refused by a rate limit, by scope",
            metrics.rate_limited.clone(),
        );
        registry.register(
            "gateway_typing_dropped",
            "Typing frames dropped under load or by rate limit",
            metrics.typing_dropped.clone(),
        );
        registry.register(
            "gateway_silent_closes",
            "Connections closed for answering no ping for two ping intervals",
            metrics.silent_closes.clone(),
        );
        registry.register(
            "retention_events_cleared",
            "Events cleared by retention",
            metrics.retention_cleared.clone(),
        );
        registry.register(
            "retention_conversation_failures",
            "Conversations a retention pass could not trim (the next pass tries again)",
            metrics.retention_failures.clone(),
        );
        registry.register(
            "fanout_large_group_queue_events",
            "Events waiting in the large-group fanout queue",
            metrics.large_group_queue.clone(),
        );
        registry.register(
            "media_uploaded_bytes",
            "Bytes of media uploaded",
            metrics.media_uploaded_bytes.clone(),
        );
        registry.register(
            "media_swept",
            "Unreferenced media deleted by the sweeper",
            metrics.media_swept.clone(),
        );
        registry.register(
            "media_downloads_in_flight",
            "Media downloads in flight",
            metrics.media_downloads_in_flight.clone(),
        );
        registry.register(
            "media_transfers_refused",
            "Media uploads and downloads refused by a bound, by transfer and limit",
            metrics.media_transfers_refused.clone(),
        );
        registry.register(
            "push_notifications",
            "Push notification attempts by outcome",
            metrics.push_notifications.clone(),
        );
        registry.register(
            "token_key_set_fetches",
            "Fetches of the identity provider's key set by outcome",
            metrics.token_key_set_fetches.clone(),
        );
        registry.register(
            "outbox_pages_read",
            "Pages of a shard's outbox read from the store, by reader",
            metrics.outbox_pages_read.clone(),
        );
        registry.register(
            "outbox_undecodable_entries",
            "Outbox entries a reader could not decode and passed over, by reader",
            metrics.outbox_undecodable_entries.clone(),
        );
        registry.register(
            "process_resident_memory_bytes",
            "Resident memory of this process",
            metrics.resident_memory.clone(),
        );
        registry.register(
            "runtime_worker_threads",
            "Threads running the roles' tasks (--worker-threads)",
            metrics.worker_threads.clone(),
        );
        registry.register(
            "runtime_ordering_threads",
            "Threads running ordering and delivery apart from the connections (--ordering-threads)",
            metrics.ordering_threads.clone(),
        );
        registry.register(
            "store_writer_busy_seconds",
            "Time the embedded store's writer spent on group commits; at one second per second, commits queue for it",
            metrics.store_engine.busy.clone(),
        );
        registry.register(
            "store_group_commits",
            "Group commits of the embedded store's writer (a journal write each, and an fsync unless all its batches are deferred)",
            metrics.store_engine.groups.clone(),
        );
        registry.register(
            "store_group_commit_batches",
            "Batches the embedded store's group commits held (commits of shards, acks, leases)",
            metrics.store_engine.batches.clone(),
        );
        registry.register(
            "store_event_cache_held_reads",
            "Range reads of a conversation's events the embedded store's cache of recent events answered (--store-event-cache)",
            metrics.store_engine.events_held.clone(),
        );
        registry.register(
            "store_event_cache_missed_reads",
            "Range reads of a conversation's events the embedded store read from its tables, the cache of recent events not holding every one",
            metrics.store_engine.events_missed.clone(),
        );
        registry.register(
            "store_cache_bytes",
            "The embedded store's block cache (--store-cache; 0: another store)",
            metrics.store_cache_bytes.clone(),
        );
        registry.register(
            "gateway_page_bytes_in_flight",
            "Bytes of pages of history (fetch replies, HTTP message pages) held while their clients read them (--max-page-bytes-in-flight)",
            metrics.page_bytes_in_flight.clone(),
        );
        Self {
            registry,
            ..metrics
        }
    }

    /// Reports the writer and the cache of recent events of `store`'s engine, if it has them
    /// (the embedded engine), from now on; a second store is ignored.
    /// Counts a media `transfer` (`upload`, `download`) refused by `limit`: `node` (the node's
    /// places in flight), `user` (the user's), `slow` (an upload slower than
    /// `--media-upload-min-rate`).
    pub fn media_refused(&self, transfer: &'static str, limit: &'static str) {
        let label = TransferLimitLabel { transfer, limit };
        self.media_transfers_refused.get_or_create(&label).inc();
    }

    pub fn watch_store(&self, store: MessageStore) {
        let _ = self.store_engine.store.set(store);
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        self.resident_memory.set(resident_memory_bytes());
        self.store_engine.refresh();
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            self.worker_threads
                .set(runtime.metrics().num_workers() as i64);
        }
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Resident set size from `/proc/self/statm` (0 where it does not exist).
fn resident_memory_bytes() -> i64 {
    let pages = std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<i64>().ok())
        .unwrap_or(0);
    pages * 4096
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every metric is named in `docs/operations.md`, where operators look up what a metric
    /// means, under the name `/metrics` shows (a counter with its `_total`).
    #[test]
    fn every_metric_is_named_in_the_operations_guide() {
        let guide = include_str!("../../../docs/operations.md");
        let metrics = Metrics::new();
        // A family shows on `/metrics` once it has a label set.
        metrics
            .shard_appends
            .get_or_create(&ShardLabel { shard: 0 })
            .inc();
        let code = CodeLabel { code: "internal" };
        metrics.errors.get_or_create(&code).inc();
        let scope = ScopeLabel { scope: "node" };
        metrics.rate_limited.get_or_create(&scope).inc();
        let outcome = OutcomeLabel { outcome: "sent" };
        metrics.push_notifications.get_or_create(&outcome).inc();
        let reader = ReaderLabel { reader: "push" };
        metrics.outbox_pages_read.get_or_create(&reader).inc();
        metrics
            .outbox_undecodable_entries
            .get_or_create(&reader)
            .inc();
        let text = metrics.render();
        let names: Vec<String> = text
            .lines()
            .filter_map(|line| {
                let mut words = line.strip_prefix("# TYPE ")?.split_whitespace();
                let (name, kind) = (words.next()?, words.next()?);
                Some(match kind {
                    "counter" => format!("{name}_total"),
                    _ => name.to_owned(),
                })
            })
            .collect();
        assert!(names.len() >= 30, "{text}");
        let missing: Vec<&String> = names
            .iter()
            .filter(|name| !guide.contains(&format!("`{name}")))
            .collect();
        assert!(
            missing.is_empty(),
            "metrics not named in docs/operations.md: {missing:?}"
        );
    }
}
