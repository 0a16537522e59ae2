//! Configuration of `courier serve`: one typed struct, from flags, `COURIER_*` environment
//! variables and an optional TOML file of flags (`--config`, `config_file.rs`), validated at
//! start-up.

use crate::store_node::ClusterTokenArgs;
use clap::{Args, ValueEnum};
use courier_chat::ChatLimits;
use courier_chat::admission::AdmissionLimits;
use courier_core::leases::Ownership;
use courier_core::limits::Rate;
use courier_core::units::parse_bytes;
use courier_fanout::FanoutConfig;
use courier_gateway::GatewayLimits;
use courier_sequencer::SequencerLimits;
use courier_sequencer::retention::RetentionPolicy;
use courier_store::embedded::{Caches, EmbeddedEngine};
use courier_store::kv::StoreError;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum StoreKind {
    /// The embedded engine in the data directory (default; no set-up).
    Embedded,
    /// FoundationDB (needs a build with `--features fdb` and `--fdb-cluster-file`).
    Fdb,
    /// A `courier store-node` (`--store-address`): a test or development cluster on one
    /// machine, never production.
    Remote,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PublicKeyAlgorithm {
    #[value(name = "EdDSA", alias = "eddsa")]
    EdDsa,
    #[value(name = "RS256", alias = "rs256")]
    Rs256,
}

/// `--config`: a file of the subcommand's flags, read before the flags are parsed
/// (`config_file.rs`).
#[derive(Debug, Clone, Args)]
pub struct ConfigFileArgs {
    /// A TOML file of this command's flags: `flag-name = value` lines, keys the flags' long
    /// names (`listen = "0.0.0.0:8080"`, `shards = 1024`, `roles = ["gateway", "chat"]`). A
    /// flag on the command line or its environment variable wins over the file.
    #[arg(long, env = "COURIER_CONFIG")]
    pub config: Option<PathBuf>,
}

#[derive(Debug, Clone, Args)]
pub struct ServeConfig {
    #[command(flatten)]
    pub config_file: ConfigFileArgs,
    /// Address to listen on (port 0 picks a free port; the ready line shows it).
    #[arg(long, env = "COURIER_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// Connections the kernel holds for the listener before it accepts them (the `listen(2)`
    /// backlog; the kernel caps it at `net.core.somaxconn`). Past it the kernel drops new
    /// handshakes and clients retry them after a second or more.
    #[arg(long, env = "COURIER_LISTEN_BACKLOG", default_value_t = 65_535)]
    pub listen_backlog: u32,
    /// Where `/metrics` is served, apart from the client port: plain HTTP without
    /// authentication, for the cluster's network only (port 0 picks a free port; the line
    /// `courier metrics on ADDR` shows it). `--listen` then answers `/metrics` as any path no
    /// route takes. Without it `/metrics` is on `--listen`, where anyone who reaches the client
    /// port reads the node's load and internals: set it in production.
    #[arg(long, env = "COURIER_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
    /// Directory of the embedded store and the generated token secret.
    #[arg(long, env = "COURIER_DATA_DIR", default_value = "./courier-data")]
    pub data_dir: PathBuf,
    /// Storage engine.
    #[arg(long, env = "COURIER_STORE", value_enum, default_value = "embedded")]
    pub store: StoreKind,
    /// FoundationDB cluster file (with `--store fdb`).
    #[arg(long, env = "COURIER_FDB_CLUSTER_FILE")]
    pub fdb_cluster_file: Option<PathBuf>,
    /// The store node's address, `http://host:port` (with `--store remote`).
    #[arg(long, env = "COURIER_STORE_ADDRESS")]
    pub store_address: Option<String>,
    /// Storage partitions: a JSON file mapping shard ranges to stores (store nodes with
    /// `--store remote`, FoundationDB cluster files with `--store fdb`), in place of
    /// `--store-address` or `--fdb-cluster-file`; fixed when the store is created (see
    /// docs/distributed.md). Without it one store holds every shard.
    #[arg(long, env = "COURIER_STORAGE_PARTITIONS")]
    pub storage_partitions: Option<PathBuf>,
    #[command(flatten)]
    pub cluster: ClusterTokenArgs,
    /// Logical sequencer shards; fixed when the store is created.
    #[arg(long, env = "COURIER_SHARDS", default_value_t = 1024)]
    pub shards: u32,
    /// This node's id in the store's shard ownership records; unique per node of a cluster
    /// (one `courier serve` on its own store needs no other).
    #[arg(long, env = "COURIER_NODE_ID", default_value = "local")]
    pub node_id: String,
    /// How long a shard lease runs without renewal (renewed every third of it); after a node
    /// dies, its shards are taken over once this has passed.
    #[arg(long, env = "COURIER_SHARD_LEASE", default_value = "10s", value_parser = humantime::parse_duration)]
    pub shard_lease: Duration,
    /// HS256 token secret (default: generated in the data directory on first start).
    #[arg(long, env = "COURIER_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,
    /// A second HS256 secret tokens may be signed with, during a rotation of `--jwt-secret`
    /// (`courier token` signs with `--jwt-secret` only): `docs/operations.md`, "Tokens".
    #[arg(
        long,
        env = "COURIER_JWT_PREVIOUS_SECRET",
        hide_env_values = true,
        requires = "jwt_secret"
    )]
    pub jwt_previous_secret: Option<String>,
    /// PEM public key to verify tokens with (with `--jwt-secret`, its HS256 tokens are taken
    /// too); several (repeated or comma-separated) during a rotation of the issuer's keys,
    /// each tried in turn.
    #[arg(
        long,
        env = "COURIER_JWT_PUBLIC_KEY",
        requires = "jwt_algorithm",
        value_delimiter = ','
    )]
    pub jwt_public_key: Vec<PathBuf>,
    /// Algorithm of `--jwt-public-key`.
    #[arg(long, env = "COURIER_JWT_ALGORITHM", value_enum)]
    pub jwt_algorithm: Option<PublicKeyAlgorithm>,
    /// An identity provider's key set (its OpenID configuration's `jwks_uri`, https) to verify
    /// tokens with instead of key files (with `--jwt-secret`, its HS256 tokens are taken too,
    /// while clients move to the provider's): fetched before the node serves, every
    /// `--jwt-jwks-refresh`, and at once for a token naming a key it lacks (`docs/operations.md`,
    /// "Tokens").
    #[arg(long, env = "COURIER_JWT_JWKS_URL", conflicts_with = "jwt_public_key")]
    pub jwt_jwks_url: Option<String>,
    /// How often `--jwt-jwks-url` is fetched again (from 10s to a day).
    #[arg(long, env = "COURIER_JWT_JWKS_REFRESH", default_value = "10m", value_parser = humantime::parse_duration)]
    pub jwt_jwks_refresh: Duration,
    /// The issuer whose tokens are taken: a token's `iss` must be this (an identity
    /// provider's URL, say). Unset: `iss` is not looked at.
    #[arg(long, env = "COURIER_JWT_ISSUER")]
    pub jwt_issuer: Option<String>,
    /// The audiences a token may be for (repeated or comma-separated): its `aud` must name
    /// one of them. Unset: a token that names an audience is refused (it is meant for another
    /// service), one that names none is taken.
    #[arg(long, env = "COURIER_JWT_AUDIENCE", value_delimiter = ',')]
    pub jwt_audience: Vec<String>,
    /// Largest client WebSocket message in bytes; larger ones close the connection (1009).
    #[arg(long, env = "COURIER_MAX_FRAME_BYTES", default_value_t = 64 * 1024)]
    pub max_frame_bytes: usize,
    /// Most bytes of pages of history (`fetch` replies, `GET .../messages` bodies) a node
    /// holds while their clients read them; a page past it is refused `unavailable` and asked
    /// again (0: no limit).
    #[arg(long, env = "COURIER_MAX_PAGE_BYTES_IN_FLIGHT", default_value_t = 256 << 20)]
    pub max_page_bytes_in_flight: u64,
    /// Deliveries queued per connection; past it events are read from the store instead.
    #[arg(long, env = "COURIER_OUTBOUND_QUEUE", default_value_t = 1024)]
    pub outbound_queue: usize,
    /// How often the gateway sends a WebSocket ping to its connections, which clients'
    /// WebSocket libraries answer by themselves; a connection that read nothing from its
    /// client for two intervals (an app its OS suspended, its TCP connection kept alive by the
    /// kernel) is closed, 1001, and its device notified by push from then on. 0: no pings (at
    /// least 1s otherwise, at most 1h; `docs/operations.md`, "Silent connections").
    #[arg(long, env = "COURIER_PING_INTERVAL", default_value = "30s", value_parser = humantime::parse_duration)]
    pub ping_interval: Duration,
    /// Most appends per group commit of a shard.
    #[arg(long, env = "COURIER_COMMIT_MAX_APPENDS", default_value_t = 512)]
    pub commit_max_appends: usize,
    /// Longest wait of a shard's first append for more to batch with (e.g. `0ms`, `1ms`).
    #[arg(long, env = "COURIER_COMMIT_LINGER", default_value = "0ms", value_parser = humantime::parse_duration)]
    pub commit_linger: Duration,
    /// Appends queued per shard before sends are answered `unavailable`.
    #[arg(long, env = "COURIER_SHARD_QUEUE", default_value_t = 4096)]
    pub shard_queue: usize,
    /// Fanout workers (shards are split among them). Default: 2 on the embedded store, whose
    /// reads take microseconds; 16 on a store across the network, where each worker spends
    /// most of its time waiting for a read's round trip.
    #[arg(long, env = "COURIER_FANOUT_WORKERS")]
    pub fanout_workers: Option<usize>,
    /// Sends per second per user (0: unlimited); deletes for everyone, creating a group, adding
    /// and removing members count as sends (leaving a group does not).
    #[arg(long, env = "COURIER_USER_SENDS_PER_SEC", default_value_t = 100)]
    pub user_sends_per_sec: u32,
    /// Burst of sends per user.
    #[arg(long, env = "COURIER_USER_SENDS_BURST", default_value_t = 200)]
    pub user_sends_burst: u32,
    /// Messages and deletes per second into one group (0: unlimited), kept by the owner of the
    /// group's shard (the sequencer), so the limit holds across gateway nodes.
    #[arg(long, env = "COURIER_GROUP_SENDS_PER_SEC", default_value_t = 200)]
    pub group_sends_per_sec: u32,
    /// Burst of messages and deletes into one group.
    #[arg(long, env = "COURIER_GROUP_SENDS_BURST", default_value_t = 400)]
    pub group_sends_burst: u32,
    /// Frames per second per connection (0: unlimited).
    #[arg(long, env = "COURIER_CONNECTION_FRAMES_PER_SEC", default_value_t = 300)]
    pub connection_frames_per_sec: u32,
    /// Burst of frames per connection.
    #[arg(long, env = "COURIER_CONNECTION_FRAMES_BURST", default_value_t = 600)]
    pub connection_frames_burst: u32,
    /// Typing frames per second per connection (0: unlimited); more are dropped.
    #[arg(long, env = "COURIER_TYPING_PER_SEC", default_value_t = 5)]
    pub typing_per_sec: u32,
    /// Most members of a group.
    #[arg(long, env = "COURIER_MAX_GROUP_MEMBERS", default_value_t = 100_000)]
    pub max_group_members: usize,
    /// Most groups a user belongs to.
    #[arg(long, env = "COURIER_MAX_GROUPS_PER_USER", default_value_t = 10_000)]
    pub max_groups_per_user: u64,
    /// Most direct conversations a user may start, by a first message to someone (0: no
    /// limit). Each is a conversation every connection of the user's devices catches up on.
    #[arg(
        long,
        env = "COURIER_MAX_DIRECT_CONVERSATIONS_PER_USER",
        default_value_t = 10_000
    )]
    pub max_direct_conversations_per_user: u64,
    /// Most linked devices of a user (0: no limit). A token of one more device (a device id
    /// not seen before, or one unlinked signing in again) is refused `forbidden` at its
    /// WebSocket upgrade and HTTP requests, saying to unlink one (`DELETE /v1/devices/{device}`);
    /// no device is unlinked in its place, and a linked device is never refused. Each device
    /// is listed, read by retention and push, and holds a cursor per conversation.
    #[arg(long, env = "COURIER_MAX_DEVICES_PER_USER", default_value_t = 32)]
    pub max_devices_per_user: u64,
    /// Longest group name, in characters.
    #[arg(long, env = "COURIER_MAX_GROUP_NAME", default_value_t = 128)]
    pub max_group_name: usize,
    /// Events before their join that new group members may read (0: from the join on).
    #[arg(long, env = "COURIER_HISTORY_ON_JOIN", default_value_t = 0)]
    pub history_on_join: u64,
    /// Worker threads of the runtime that runs ordering and delivery (the sequencer's shard
    /// actors, fanout, the push notifier) apart from the connections; 0 runs them with the
    /// connections (`docs/operations.md`, "Ordering threads").
    #[arg(long, env = "COURIER_ORDERING_THREADS", default_value_t = 1)]
    pub ordering_threads: usize,
    /// Groups with more members take the large-group fanout path, get quiet pushes, and
    /// relay no typing.
    #[arg(long, env = "COURIER_LARGE_GROUP_THRESHOLD", default_value_t = 1000)]
    pub large_group_threshold: usize,
    /// Groups with more members get coalesced receipts.
    #[arg(long, env = "COURIER_RECEIPT_COALESCE_ABOVE", default_value_t = 100)]
    pub receipt_coalesce_above: usize,
    /// Interval of coalesced receipts.
    #[arg(long, env = "COURIER_RECEIPT_INTERVAL", default_value = "1s", value_parser = humantime::parse_duration)]
    pub receipt_interval: Duration,
    /// Sends to a shard get `unavailable` (clients retry with the same `client_msg_id`) while
    /// the oldest message waiting in its outbox for fanout was committed longer ago than this:
    /// delivery is that far behind on it (fanout overloaded, paused, or dead until another
    /// fanout node takes its shards). Kept by the shard's sequencer, which reads its outbox in
    /// the store every 250 ms. At least 1s. The default outlasts a fanout failover (a lease).
    #[arg(long, env = "COURIER_OUTBOX_LAG_LIMIT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub outbox_lag_limit: Duration,
    /// Sends (and deletes) accepted by this node and not answered yet, past which new ones get
    /// `unavailable`: a bound on memory for when commits stop being answered.
    #[arg(long, env = "COURIER_MAX_SENDS_IN_FLIGHT", default_value_t = 65_536, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_sends_in_flight: u64,
    /// While sends are in flight and those answered lately waited longer than this for their
    /// commit (on average), new ones get `unavailable` with a jittered `retry_after_ms`: past
    /// the node's capacity a send would only wait longer in its queues.
    #[arg(long, env = "COURIER_MAX_SEND_WAIT", default_value = "2s", value_parser = humantime::parse_duration)]
    pub max_send_wait: Duration,
    /// Events are kept at least this long, and until every active device has them.
    #[arg(long, env = "COURIER_RETENTION", default_value = "30days", value_parser = humantime::parse_duration)]
    pub retention: Duration,
    /// A device unseen this long stops holding events back.
    #[arg(long, env = "COURIER_DEVICE_INACTIVE_AFTER", default_value = "30days", value_parser = humantime::parse_duration)]
    pub device_inactive_after: Duration,
    /// Time between retention passes.
    #[arg(long, env = "COURIER_RETENTION_INTERVAL", default_value = "1h", value_parser = humantime::parse_duration)]
    pub retention_interval: Duration,
    /// How long a send's idempotency record is at least kept (cleared by retention passes
    /// within twice that): a retry with the same `client_msg_id` within it gets the first
    /// outcome, and one after it may be a new message.
    #[arg(long, env = "COURIER_IDEMPOTENCY_WINDOW", default_value = "7days", value_parser = humantime::parse_duration)]
    pub idempotency_window: Duration,
    /// Sends get `unavailable`, and `/readyz` fails, while the embedded store's filesystem has
    /// less free space than this (0: off); see `--media-min-free-disk` for uploads.
    #[arg(long, env = "COURIER_MIN_FREE_DISK", default_value = "256MiB", value_parser = parse_bytes)]
    pub min_free_disk: u64,
    #[command(flatten)]
    pub store_cache: StoreCacheArgs,
    #[command(flatten)]
    pub media: courier_media::MediaConfig,
    #[command(flatten)]
    pub push: courier_push::providers::PushConfig,
    #[command(flatten)]
    pub notifier: courier_push::NotifierConfig,
    /// Serve the reference web app (`clients/web`, built) from this directory at `/`. Off by
    /// default: without it, paths outside the API stay 404. The app asks the person for a token
    /// (`courier token`); the server hands none out.
    #[arg(long, env = "COURIER_WEB_DIR")]
    pub web_dir: Option<PathBuf>,
    /// Over how long a draining gateway tells its clients to reconnect elsewhere, batch by
    /// batch (on SIGTERM, or the admin API's `Drain`). Default: 0 for `courier serve` (its
    /// clients have no other gateway to go to: all are told at once, so a restart is quick),
    /// 60s for a cluster node with the gateway role.
    #[arg(long, env = "COURIER_DRAIN_WINDOW", value_parser = humantime::parse_duration)]
    pub drain_window: Option<Duration>,
    /// How long draining may take on SIGTERM before the process exits anyway. Default: the
    /// drain window plus 25s (room for the last batch's sends to be answered). On a node
    /// without the gateway role: how long its HTTP requests in flight (a media node's
    /// transfers) may take to finish; default 25s.
    #[arg(long, env = "COURIER_DRAIN_TIMEOUT", value_parser = humantime::parse_duration)]
    pub drain_timeout: Option<Duration>,
    /// Longest a response may wait for its client to take any of its bytes (`--listen`): a
    /// client that stops reading a download, a page of messages or any other answer while
    /// its connection stays open has the connection closed then, its response cut, so that
    /// it holds no connection, task or open file for long. A client that reads, however
    /// slowly, is not cut. It bounds a WebSocket's writes too, where the gateway's own bound
    /// (30s) comes first unless this is shorter. A request's head must arrive within 30s.
    #[arg(
        long,
        env = "COURIER_HTTP_WRITE_TIMEOUT",
        value_parser = humantime::parse_duration,
        default_value = "60s"
    )]
    pub http_write_timeout: Duration,
}

/// The shortest `--outbox-lag-limit`: several rounds of the sequencer's outbox watch (250 ms)
/// and well above what a fanout that keeps up leaves waiting.
pub const MIN_OUTBOX_LAG_LIMIT: Duration = Duration::from_secs(1);

/// The longest `--shard-queue`: the most a tokio channel holds.
pub const MAX_SHARD_QUEUE: usize = tokio::sync::Semaphore::MAX_PERMITS;

/// The longest `--http-write-timeout`: past an hour a client that takes nothing is gone (and a
/// timeout near `Duration::MAX` would overflow when added to the time a write started waiting).
pub const MAX_HTTP_WRITE_TIMEOUT: Duration = Duration::from_secs(3600);

/// The drain window of a cluster gateway unless `--drain-window` says otherwise.
pub const CLUSTER_DRAIN_WINDOW: Duration = Duration::from_secs(60);

/// The longest `--drain-window`: past a day a drain is a mistake, not a plan (and a window
/// near `Duration::MAX` overflowed when the default timeout was added to it, a panic at start).
pub const MAX_DRAIN_WINDOW: Duration = Duration::from_secs(24 * 3600);

/// The longest `--drain-timeout`: the longest window and its default tail.
pub const MAX_DRAIN_TIMEOUT: Duration = MAX_DRAIN_WINDOW.saturating_add(DRAIN_TAIL);

/// What `--drain-timeout` adds to the drain window by default: the last batch's connections
/// answer their accepted sends (each waits at most the send timeout, 10 s) and close.
pub const DRAIN_TAIL: Duration = Duration::from_secs(25);

/// The shortest `--jwt-jwks-refresh`: each is a request to the identity provider from every
/// node.
pub const MIN_JWKS_REFRESH: Duration = Duration::from_secs(10);

/// The longest `--jwt-jwks-refresh`: a key the provider withdrew is trusted until the next
/// fetch, and a duration too long to add to a clock's time would panic the refresh loop.
pub const MAX_JWKS_REFRESH: Duration = Duration::from_secs(24 * 60 * 60);

/// The shortest `--ping-interval` but 0: a client on a slow network has two of it to answer,
/// and every connection is written to once an interval.
pub const MIN_PING_INTERVAL: Duration = Duration::from_secs(1);

/// The longest `--ping-interval`: past an hour a suspended app would stay unnotified for hours
/// (and a connection's silence is kept in 32-bit milliseconds, `courier_gateway::routes`).
pub const MAX_PING_INTERVAL: Duration = Duration::from_secs(3600);

/// The embedded store's caches (`courier serve` and `courier store-node`).
#[derive(Debug, Clone, Copy, Args)]
pub struct StoreCacheArgs {
    /// The embedded store's block cache: blocks of its tables (data, index, bloom filters)
    /// kept decompressed, read again from memory instead of the files. fjall suggests a fifth
    /// to a quarter of the memory the process may use, more if the data fits whole.
    #[arg(long = "store-cache", env = "COURIER_STORE_CACHE", default_value = "32MiB", value_parser = parse_bytes)]
    pub bytes: u64,
    /// The embedded store's cache of recent events: the last events written to each
    /// conversation, up to this size, so that a device's catch-up of what it missed reads them
    /// from memory; the conversations written to least recently leave it first. 0 keeps none.
    #[arg(long = "store-event-cache", env = "COURIER_STORE_EVENT_CACHE", default_value = "32MiB", value_parser = parse_bytes)]
    pub events: u64,
}

impl StoreCacheArgs {
    /// Opens the embedded store at `path` with these caches.
    pub fn open(&self, path: &std::path::Path) -> Result<EmbeddedEngine, StoreError> {
        let caches = Caches {
            blocks: self.bytes,
            events: self.events,
        };
        EmbeddedEngine::open_with_caches(path, caches)
    }
}

/// Whether listeners on `a` and `b` would take the same port: the same port number (not 0,
/// which picks a free one) on the same address, or on a wildcard address (0.0.0.0, ::) that
/// takes it on every address.
pub fn same_port(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() != 0
        && a.port() == b.port()
        && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
}

/// How a node with the client port drains.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DrainSettings {
    /// The window the connections are told to reconnect over.
    pub window: Duration,
    /// The longest a drain on SIGTERM takes before the process exits anyway.
    pub timeout: Duration,
}

impl ServeConfig {
    /// Checks values that flags alone cannot; the message says what to change.
    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(self.shards >= 1, "--shards must be at least 1");
        anyhow::ensure!(
            self.outbox_lag_limit >= MIN_OUTBOX_LAG_LIMIT,
            "--outbox-lag-limit must be at least 1s: a fanout that keeps up holds a message \
             in the outbox for up to a few hundred milliseconds (a page, then the clear)"
        );
        anyhow::ensure!(!self.node_id.is_empty(), "--node-id must not be empty");
        anyhow::ensure!(
            self.jwt_issuer
                .as_ref()
                .is_none_or(|issuer| !issuer.is_empty())
                && self
                    .jwt_audience
                    .iter()
                    .all(|audience| !audience.is_empty()),
            "--jwt-issuer and --jwt-audience must not be empty (leave them out to check no \
             issuer, or to refuse tokens that name an audience)"
        );
        anyhow::ensure!(
            (MIN_JWKS_REFRESH..=MAX_JWKS_REFRESH).contains(&self.jwt_jwks_refresh),
            "--jwt-jwks-refresh must be from {MIN_JWKS_REFRESH:?} to a day (a provider's key set \
             changes a few times a year, and a token naming a new key fetches it at once; a key \
             the provider withdrew is trusted until the next fetch)"
        );
        if let Some(metrics) = self.metrics_listen {
            anyhow::ensure!(
                !same_port(metrics, self.listen),
                "--metrics-listen {metrics} is the port of --listen {}: give /metrics a port of \
                 its own (the client port is the internet's)",
                self.listen
            );
        }
        anyhow::ensure!(
            self.shard_lease >= Duration::from_millis(300),
            "--shard-lease must be at least 300ms (it is renewed every third of it)"
        );
        anyhow::ensure!(
            self.max_frame_bytes >= 1024,
            "--max-frame-bytes must be at least 1024"
        );
        anyhow::ensure!(
            self.outbound_queue >= 16,
            "--outbound-queue must be at least 16"
        );
        anyhow::ensure!(
            self.ping_interval.is_zero()
                || (MIN_PING_INTERVAL..=MAX_PING_INTERVAL).contains(&self.ping_interval),
            "--ping-interval ({}) must be 0 (no pings) or from 1s to 1h",
            humantime::format_duration(self.ping_interval),
        );
        anyhow::ensure!(
            self.commit_max_appends >= 1,
            "--commit-max-appends must be at least 1"
        );
        anyhow::ensure!(self.shard_queue >= 1, "--shard-queue must be at least 1");
        // A shard's queue is a tokio channel, made at its first send: one larger than tokio
        // allows panicked there, at every send, and closed the sender's connection.
        anyhow::ensure!(
            self.shard_queue <= MAX_SHARD_QUEUE,
            "--shard-queue must be at most {MAX_SHARD_QUEUE} (the queue is bounded: past it \
             sends are answered unavailable and retried)"
        );
        anyhow::ensure!(
            self.fanout_workers != Some(0),
            "--fanout-workers must be at least 1"
        );
        // A job's lead lasts three of its intervals (`courier_core::leases::JobLead`): at zero,
        // every node would lead it and run its passes back to back.
        anyhow::ensure!(
            !self.retention_interval.is_zero(),
            "--retention-interval must be longer than 0s (retention cannot be turned off; \
             keep events longer with --retention)"
        );
        anyhow::ensure!(
            !self.media.media_sweep_interval.is_zero(),
            "--media-sweep-interval must be longer than 0s (keep unreferenced media longer \
             with --media-unreferenced-ttl)"
        );
        // Added to the time of the signal, a timeout near `Duration::MAX` overflowed: the
        // process panicked on SIGTERM instead of draining (and a window as long, at start).
        let drain = [
            ("--drain-window", self.drain_window, MAX_DRAIN_WINDOW),
            ("--drain-timeout", self.drain_timeout, MAX_DRAIN_TIMEOUT),
        ];
        for (flag, given, longest) in drain {
            if let Some(given) = given {
                anyhow::ensure!(
                    given <= longest,
                    "{flag} ({}) must be at most {}",
                    humantime::format_duration(given),
                    humantime::format_duration(longest),
                );
            }
        }
        anyhow::ensure!(
            !self.http_write_timeout.is_zero() && self.http_write_timeout <= MAX_HTTP_WRITE_TIMEOUT,
            "--http-write-timeout ({}) must be longer than 0s and at most {}",
            humantime::format_duration(self.http_write_timeout),
            humantime::format_duration(MAX_HTTP_WRITE_TIMEOUT),
        );
        self.media.validate()?;
        anyhow::ensure!(
            self.media.media_min_free_disk >= self.min_free_disk,
            "--media-min-free-disk must be at least --min-free-disk, so that uploads are \
             refused before sends when the disk fills up"
        );
        if let Some(dir) = &self.web_dir {
            anyhow::ensure!(
                dir.join("index.html").is_file(),
                "--web-dir {}: no index.html there; build the web app first (see \
                 clients/web/README.md) and pass its `dist` directory",
                dir.display()
            );
        }
        if self.storage_partitions.is_some() {
            anyhow::ensure!(
                self.store != StoreKind::Embedded,
                "--storage-partitions needs --store remote or --store fdb: the embedded store is \
                 one disk"
            );
            anyhow::ensure!(
                self.store_address.is_none() && self.fdb_cluster_file.is_none(),
                "--storage-partitions names every partition's store: drop --store-address and \
                 --fdb-cluster-file"
            );
        } else if self.store == StoreKind::Remote {
            anyhow::ensure!(
                self.store_address.is_some(),
                "--store remote needs --store-address (or COURIER_STORE_ADDRESS)"
            );
        } else if self.store == StoreKind::Fdb {
            anyhow::ensure!(
                self.fdb_cluster_file.is_some(),
                "--store fdb needs --fdb-cluster-file (or COURIER_FDB_CLUSTER_FILE)"
            );
        }
        Ok(())
    }

    /// `--drain-window` and `--drain-timeout`, or their defaults for a cluster node with the
    /// gateway role (`cluster`) or `courier serve`; refused when the timeout leaves no room
    /// after the window.
    pub fn drain(&self, cluster: bool) -> anyhow::Result<DrainSettings> {
        let default_window = if cluster {
            CLUSTER_DRAIN_WINDOW
        } else {
            Duration::ZERO
        };
        let window = self.drain_window.unwrap_or(default_window);
        let timeout = self
            .drain_timeout
            .unwrap_or(window.saturating_add(DRAIN_TAIL));
        anyhow::ensure!(
            timeout > window,
            "--drain-timeout ({}) must be longer than the drain window ({}): the connections \
             told last need time to answer their sends and close; raise --drain-timeout or \
             lower --drain-window",
            humantime::format_duration(timeout),
            humantime::format_duration(window),
        );
        Ok(DrainSettings { window, timeout })
    }

    pub fn gateway_limits(&self) -> GatewayLimits {
        GatewayLimits {
            max_frame_bytes: self.max_frame_bytes,
            outbound_queue: self.outbound_queue,
            connection_frames: Rate {
                per_second: self.connection_frames_per_sec,
                burst: self.connection_frames_burst,
            },
            connection_typing: Rate {
                per_second: self.typing_per_sec,
                burst: self.typing_per_sec,
            },
            ping_interval: self.ping_interval,
            max_devices_per_user: self.max_devices_per_user,
            ..GatewayLimits::default()
        }
    }

    pub fn chat_limits(&self) -> ChatLimits {
        ChatLimits {
            max_group_members: self.max_group_members,
            max_groups_per_user: self.max_groups_per_user,
            max_direct_conversations_per_user: self.max_direct_conversations_per_user,
            max_group_name: self.max_group_name,
            history_on_join: self.history_on_join,
            typing_members_max: self.large_group_threshold,
            admission: AdmissionLimits {
                // Past `usize` (a 32-bit target), as many as it holds: a cast would truncate
                // 2^32 to 0, and refuse every send.
                max_in_flight: usize::try_from(self.max_sends_in_flight).unwrap_or(usize::MAX),
                max_wait: self.max_send_wait,
            },
            user_sends: Rate {
                per_second: self.user_sends_per_sec,
                burst: self.user_sends_burst,
            },
            media_unreferenced_ttl: self.media.media_unreferenced_ttl,
            ..ChatLimits::default()
        }
    }

    pub fn retention_policy(&self) -> RetentionPolicy {
        RetentionPolicy {
            window: self.retention,
            device_inactive_after: self.device_inactive_after,
            interval: self.retention_interval,
        }
    }

    pub fn ownership(&self) -> Ownership {
        Ownership {
            node: self.node_id.clone(),
            lease: self.shard_lease,
        }
    }

    /// `--fanout-workers` (or its default for the store), the large-group threshold and this
    /// node's delivery leases; `cluster` for a node of a cluster (`courier node`).
    pub fn fanout_config(&self, cluster: bool) -> FanoutConfig {
        FanoutConfig {
            workers: self.fanout_workers.unwrap_or(match self.store {
                StoreKind::Embedded => 2,
                StoreKind::Fdb | StoreKind::Remote => 16,
            }),
            large_group_threshold: self.large_group_threshold,
            ownership: self.ownership(),
            look_at_every_shard_each_round: cluster,
        }
    }

    pub fn sequencer_limits(&self) -> SequencerLimits {
        SequencerLimits {
            max_appends: self.commit_max_appends,
            linger: self.commit_linger,
            queue_capacity: self.shard_queue,
            group_sends: Rate {
                per_second: self.group_sends_per_sec,
                burst: self.group_sends_burst,
            },
            outbox_lag_limit: self.outbox_lag_limit,
            ..SequencerLimits::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Serve {
        #[command(flatten)]
        config: ServeConfig,
    }

    fn validated(args: &[&str]) -> anyhow::Result<()> {
        let args = std::iter::once("courier").chain(args.iter().copied());
        Serve::try_parse_from(args)?.config.validate()
    }

    /// A background job's interval of zero would run its passes back to back, each with a
    /// store commit, on every node at once (its lead lasts three intervals: none): refused,
    /// naming the flag.
    #[test]
    fn a_zero_interval_of_a_background_job_is_refused() {
        validated(&[]).unwrap();
        for flag in ["--retention-interval", "--media-sweep-interval"] {
            validated(&[flag, "1s"]).unwrap();
            let refused = validated(&[flag, "0s"]).unwrap_err().to_string();
            assert!(refused.contains(flag), "{flag}: {refused}");
        }
    }

    /// A signed media URL is a bearer credential: with an empty or short secret anyone could
    /// sign one for any media id and download it without a token. Refused, as a short token
    /// secret is.
    #[test]
    fn an_empty_or_short_media_url_secret_is_refused() {
        for secret in ["", "short", &"x".repeat(31)] {
            let refused = validated(&["--media-url-secret", secret])
                .unwrap_err()
                .to_string();
            assert!(refused.contains("--media-url-secret"), "{refused}");
        }
        validated(&["--media-url-secret", &"x".repeat(32)]).unwrap();
    }

    /// A shard's queue larger than a tokio channel may be (u64::MAX, meant as no bound) was
    /// taken, and every send panicked as it made the queue, closing its connection: refused
    /// at start, naming the flag.
    #[test]
    fn a_shard_queue_larger_than_a_channel_holds_is_refused() {
        validated(&["--shard-queue", &MAX_SHARD_QUEUE.to_string()]).unwrap();
        for over in [MAX_SHARD_QUEUE as u64 + 1, u64::MAX] {
            let refused = validated(&["--shard-queue", &over.to_string()])
                .unwrap_err()
                .to_string();
            assert!(refused.contains("--shard-queue"), "{refused}");
        }
        // The largest taken is one a channel can be made with.
        drop(tokio::sync::mpsc::channel::<()>(MAX_SHARD_QUEUE));
    }

    /// A drain window or timeout too long to add to a clock's time (u64::MAX seconds, meant as
    /// "never give up") panicked: the window at start, the timeout on SIGTERM, where the
    /// connections were then dropped without `reconnect`. Refused at start, naming the flag,
    /// as is anything past a day.
    #[test]
    fn a_drain_window_or_timeout_past_a_day_is_refused() {
        let forever = format!("{}s", u64::MAX);
        for (flag, longest) in [("--drain-window", "24h"), ("--drain-timeout", "24h 25s")] {
            validated(&[flag, longest]).unwrap();
            for value in ["24h 26s", "30days", forever.as_str()] {
                let refused = validated(&[flag, value]).unwrap_err().to_string();
                assert!(refused.contains(flag), "{flag} {value}: {refused}");
            }
        }
        // The longest window with its default timeout drains.
        let args = ["courier", "--drain-window", "24h"];
        let config = Serve::try_parse_from(args).unwrap().config;
        config.drain(true).unwrap();
    }

    /// A key set refreshed less often than a day (u64::MAX seconds panicked the refresh loop,
    /// which the node then ended on, exit 1) or more often than every 10 s is refused at
    /// start, naming the flag.
    #[test]
    fn a_key_set_refresh_is_from_ten_seconds_to_a_day() {
        let url = ["--jwt-jwks-url", "https://idp.example/jwks"];
        for ok in ["10s", "24h"] {
            validated(&[url[0], url[1], "--jwt-jwks-refresh", ok]).unwrap();
        }
        let forever = format!("{}s", u64::MAX);
        for value in ["9s", "24h 1s", forever.as_str()] {
            let refused = validated(&[url[0], url[1], "--jwt-jwks-refresh", value])
                .unwrap_err()
                .to_string();
            assert!(refused.contains("--jwt-jwks-refresh"), "{value}: {refused}");
        }
    }

    /// A rotation of the HS256 secret: the nodes take tokens of `--jwt-secret` and of
    /// `--jwt-previous-secret`, and of no other; the previous secret alone means nothing (it
    /// is refused), nor do an empty issuer or audience.
    #[test]
    fn a_previous_secret_is_verified_beside_the_secret() {
        let (secret, previous) = ("s".repeat(32), "p".repeat(32));
        let args = [
            "courier",
            "--jwt-secret",
            &secret,
            "--jwt-previous-secret",
            &previous,
        ];
        let config = Serve::try_parse_from(args).unwrap().config;
        let verifier = crate::serve::verifier(&config).unwrap();
        for (key, taken) in [(&secret, true), (&previous, true), (&"o".repeat(32), false)] {
            let token =
                courier_core::auth::mint(key.as_bytes(), "alice", "phone", Duration::from_secs(60))
                    .unwrap();
            assert_eq!(verifier.verify(&token).is_ok(), taken, "{key}");
        }
        assert!(Serve::try_parse_from(["courier", "--jwt-previous-secret", &previous]).is_err());
        for empty in [["--jwt-issuer", ""], ["--jwt-audience", ""]] {
            let refused = validated(&empty).unwrap_err().to_string();
            assert!(refused.contains("must not be empty"), "{refused}");
        }
        validated(&[
            "--jwt-issuer",
            "https://id.example.com/",
            "--jwt-audience",
            "a,b",
        ])
        .unwrap();
    }

    /// A platform team moving its clients from the tokens its backend signs (`--jwt-secret`)
    /// to an identity provider's (`--jwt-jwks-url` or `--jwt-public-key`) gives both for a
    /// while: the nodes take the tokens of each, and of no other key (beside a provider's
    /// keys the secret was silently unused: every token of the backend refused).
    #[test]
    fn a_secret_beside_a_providers_keys_is_verified_too() {
        let (secret, other) = ("s".repeat(32), "o".repeat(32));
        let fixtures = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures");
        let public = format!("{fixtures}/jwt-test-ed25519.pub.pem");
        let private = std::fs::read(format!("{fixtures}/jwt-test-ed25519.pem")).unwrap();
        let exp = courier_core::clock::now_ms() / 1000 + 600;
        let providers_token = jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::EdDSA),
            &serde_json::json!({ "sub": "alice", "dev": "phone", "exp": exp }),
            &jsonwebtoken::EncodingKey::from_ed_pem(&private).unwrap(),
        )
        .unwrap();
        let mint = |key: &str| {
            courier_core::auth::mint(key.as_bytes(), "alice", "phone", Duration::from_secs(60))
                .unwrap()
        };
        for provider in [
            vec!["--jwt-jwks-url", "https://id.example.com/jwks"],
            vec!["--jwt-public-key", &public, "--jwt-algorithm", "EdDSA"],
        ] {
            let mut args = vec!["courier", "--jwt-secret", &secret];
            args.extend(&provider);
            let config = Serve::try_parse_from(args).unwrap().config;
            let verifier = crate::serve::verifier(&config).unwrap();
            assert!(verifier.verify(&mint(&secret)).is_ok(), "{provider:?}");
            assert!(verifier.verify(&mint(&other)).is_err(), "{provider:?}");
            if provider[0] == "--jwt-jwks-url" {
                let jwk = std::fs::read_to_string(format!("{fixtures}/jwt-test-ed25519.jwk.json"));
                let set = format!("{{\"keys\": [{}]}}", jwk.unwrap());
                verifier.set_keys(set.as_bytes()).unwrap();
            }
            assert!(verifier.verify(&providers_token).is_ok(), "{provider:?}");
        }
    }

    /// `--ping-interval` is 0 (no pings) or from 1s to 1h: shorter, every connection would be
    /// written to many times a second and a client on a slow network closed; longer, a
    /// suspended app would go unnotified for hours.
    #[test]
    fn a_ping_interval_is_off_or_from_a_second_to_an_hour() {
        for taken in ["0s", "1s", "30s", "1h"] {
            validated(&["--ping-interval", taken]).unwrap();
            let args = ["courier", "--ping-interval", taken];
            let limits = Serve::try_parse_from(args).unwrap().config.gateway_limits();
            let given = humantime::parse_duration(taken).unwrap();
            assert_eq!(limits.ping_interval, given, "{taken}");
        }
        for refused in ["1ms", "999ms", "1h 1s", "30days"] {
            let e = validated(&["--ping-interval", refused]).unwrap_err();
            assert!(e.to_string().contains("--ping-interval"), "{refused}: {e}");
        }
        let config = Serve::try_parse_from(["courier"]).unwrap().config;
        assert_eq!(
            config.gateway_limits().ping_interval,
            Duration::from_secs(30)
        );
    }

    /// `/metrics` apart from the client port needs a port of its own: the same one would not
    /// bind, and is refused at once, naming both flags. Port 0 picks a free one for each.
    #[test]
    fn a_metrics_port_that_is_the_client_port_is_refused() {
        validated(&["--metrics-listen", "127.0.0.1:9090"]).unwrap();
        validated(&["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"]).unwrap();
        validated(&[
            "--listen",
            "0.0.0.0:8080",
            "--metrics-listen",
            "10.0.0.1:9090",
        ])
        .unwrap();
        for (listen, metrics) in [
            ("127.0.0.1:8080", "127.0.0.1:8080"),
            ("0.0.0.0:8080", "10.0.0.1:8080"),
            ("127.0.0.1:8080", "0.0.0.0:8080"),
        ] {
            let refused = validated(&["--listen", listen, "--metrics-listen", metrics])
                .unwrap_err()
                .to_string();
            assert!(refused.contains("--metrics-listen"), "{refused}");
            assert!(refused.contains("--listen"), "{refused}");
        }
        let refused = validated(&["--metrics-listen", "not an address"]).unwrap_err();
        assert!(
            refused.to_string().contains("--metrics-listen"),
            "{refused}"
        );
    }

    /// On S3 the sweeper moves unused bytes aside with a copy, which S3 does in one request
    /// up to 5 GiB: larger uploads would stay in the bucket forever, each sweep failing on
    /// them. Refused at start, naming the flag; a local directory takes any size.
    #[test]
    fn uploads_over_five_gib_into_a_bucket_are_refused() {
        let five_gib = (5u64 << 30).to_string();
        let over = ((5u64 << 30) + 1).to_string();
        let bucket = ["--media-s3-bucket", "media"];
        validated(&[&bucket[..], &["--media-max-bytes", &five_gib]].concat()).unwrap();
        let refused = validated(&[&bucket[..], &["--media-max-bytes", &over]].concat())
            .unwrap_err()
            .to_string();
        assert!(refused.contains("--media-max-bytes"), "{refused}");
        validated(&["--media-max-bytes", &over]).unwrap();
    }

    /// No upload in flight would refuse every upload: refused at start, naming the flag.
    #[test]
    fn no_upload_in_flight_is_refused() {
        let refused = validated(&["--media-uploads-in-flight", "0"])
            .unwrap_err()
            .to_string();
        assert!(refused.contains("--media-uploads-in-flight"), "{refused}");
        validated(&["--media-uploads-in-flight", "1"]).unwrap();
    }
}
