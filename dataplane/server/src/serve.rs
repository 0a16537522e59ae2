//! `courier serve`: every role in one process on one store, wired with in-process bindings.
//!
//! # Stopping
//!
//! SIGTERM or Ctrl-C, or a background loop that kept failing past its restart budget
//! ([`BackgroundLoops`]), stops the node in this order (the signal's handler is installed as
//! the process starts, [`StopSignal`]: a signal during the start-up gives it up, or drains the
//! node as soon as it is ready):
//!
//! 1. `/readyz` answers 503 and no connection is accepted any more.
//! 2. HTTP requests finish, and the WebSockets are told to reconnect in batches spread over
//!    `--drain-window` (`courier_gateway::drain`; 0 for `courier serve`: all at once); each
//!    answers the sends it accepted, says `reconnect` and closes (at most `--drain-timeout`
//!    from the signal). The admin API's `Drain` starts the same drain without stopping the
//!    node (it answers not ready and accepts no connection from then on). All the background
//!    loops still run meanwhile, because this work needs them: fanout delivers the answered
//!    sends to the connections still open and the outbox clearer clears what it handed off;
//!    the receipt relay flushes the receipts of the last acks; the notifier pushes to the
//!    devices that left; the free-space watch keeps guarding the sends still accepted.
//! 3. Once the last connection has closed (or the drain deadline passed), the background loops
//!    are shut down together: every loop is cancelled; the fanout workers stop at once (nobody
//!    is left to deliver to) and the outbox clearer clears what they queued, then ends after the
//!    last of them; a notifier pass in progress finishes. They get until the drain deadline, at
//!    least [`LOOP_GRACE`]; a loop still running then is aborted and logged at `error`.
//! 4. The embedded store notes which conversations its cache of recent events holds, so that
//!    the next start reads them back (`courier_store::KvEngine::closing`). The process ends
//!    its record in the node registry (a cluster node, or a server on a shared store), and
//!    last the FoundationDB client's network thread stops ([`stop_store_client`]: nothing
//!    uses the store any more).
//! 5. The process exits 0, or 1 when a background loop was given up (its supervisor then
//!    restarts it from a clean state).
//!
//! The sequencer's shard actors are not background loops of this kind yet: they end with the
//! ordering runtime, after the loops.
//!
//! # Two runtimes
//!
//! Ordering and delivery (the local sequencer's shard actors and loops, fanout, the push
//! notifier) run on a runtime of their own, [`OrderingRuntime`] (`--ordering-threads`), and the
//! connections on the process's. A runtime's tasks wait in one queue: when a large group's
//! message wakes 10,000 connections, and their acks wake them again, a shard actor woken by
//! its commit would wait behind them all (~200 ms on the test machine), and every send of
//! every conversation with it (`docs/benchmarks.md`, "Ordering apart from the connections").

use crate::admin::AdminService;
use crate::backup;
use crate::config::{PublicKeyAlgorithm, ServeConfig, StoreKind};
use crate::http::{AppState, ClientAuth, PushProviderNames, metrics_router, router, with_web_app};
use crate::http_server;
use crate::jwks::KeySetSource;
use crate::media_api::{self, MediaApi};
use crate::media_proxy::{self, MediaProxy};
use crate::node;
use anyhow::Context as _;
use axum::serve::ListenerExt;
use courier_chat::receipts::ReceiptRelay;
use courier_chat::{Chat, ChatBinding};
use courier_core::auth::{self, TokenVerifier};
use courier_core::clock::now_ms;
use courier_core::context::Context;
use courier_core::gateways::Gateways;
use courier_core::leases::JobLead;
use courier_core::loops::{BackgroundLoops, CancellationToken};
use courier_core::membership::MembershipCache;
use courier_core::metrics::Metrics;
use courier_core::sequencing::{CommitListener, Listeners, OwedPushListener, Sequencer};
use courier_core::storage_health::StorageHealth;
use courier_fanout::Fanout;
use courier_gateway::drain::GatewayDrain;
use courier_gateway::pages::PageBudget;
use courier_gateway::routes::Routes;
use courier_gateway::{ClusterRoutes, Gateway};
use courier_media::MediaService;
use courier_push::Notifier;
use courier_push::providers::PushProviders;
use courier_rpc::{
    ChatNodeService, ClusterChat, ClusterGateways, ClusterToken, CommitNotifier, FanoutService,
    GatewayService, RemoteEngine,
};
use courier_sequencer::LocalSequencer;
use courier_sequencer::retention::Retention;
use courier_sequencer::routing::RoutedSequencer;
use courier_store::embedded::EmbeddedEngine;
use courier_store::leaders::Job;
use courier_store::nodes::NodeRecord;
use courier_store::{KvEngine, MessageStore, PartitionStore, PartitionTable, StoreError};
use futures::FutureExt;
use futures::future::{BoxFuture, Shared};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use tokio::sync::watch;

/// Directory of the embedded store inside the data directory.
pub const STORE_DIR: &str = "store";

/// Least time the background loops get to stop once connections have drained, even when the
/// drain used all of `--drain-timeout`.
pub const LOOP_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

/// How long a client connection may be silent before its peer is probed (TCP keepalive), the
/// time between two probes, and how many may go unanswered: a peer gone without closing (a
/// phone out of coverage, a NAT that forgot the mapping) is found gone about two minutes
/// after it last answered, its connection ends and the device counts as offline again (the
/// push notifier notifies it). Without them such a connection stayed open while nothing was
/// written to it, for good.
const KEEPALIVE_IDLE: std::time::Duration = std::time::Duration::from_secs(60);
const KEEPALIVE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(15);
const KEEPALIVE_PROBES: u32 = 4;

/// Longest that data written to a client connection may stay unacknowledged (Linux's
/// `TCP_USER_TIMEOUT`): a peer gone while the server writes to it is found gone as fast as an
/// idle one, rather than after TCP's retransmissions give up (about 15 minutes at Linux's
/// defaults), all that time counted as connected.
#[cfg(target_os = "linux")]
const UNACKNOWLEDGED_LIMIT: std::time::Duration = std::time::Duration::from_secs(120);

/// Time between two passes forgetting the rate limits of idle users and connections.
const FORGET_IDLE_LIMITS_EVERY: std::time::Duration = std::time::Duration::from_secs(60);

/// The verifier of client tokens: `--jwt-jwks-url` (its keys not fetched yet:
/// [`client_auth`]) or `--jwt-public-key`, each with `--jwt-secret` (and
/// `--jwt-previous-secret`) beside it when given; `--jwt-secret` alone; or the secret of the
/// data directory (created on first start); with `--jwt-issuer` and `--jwt-audience` checked.
pub fn verifier(config: &ServeConfig) -> anyhow::Result<TokenVerifier> {
    let secrets: Vec<&[u8]> = (config.jwt_secret.iter())
        .chain(&config.jwt_previous_secret)
        .map(String::as_bytes)
        .collect();
    let keys = if config.jwt_jwks_url.is_some() {
        Some(TokenVerifier::key_set())
    } else if let (false, Some(algorithm)) =
        (config.jwt_public_key.is_empty(), config.jwt_algorithm)
    {
        let pems = config
            .jwt_public_key
            .iter()
            .map(|path| {
                std::fs::read(path)
                    .with_context(|| format!("reading --jwt-public-key {}", path.display()))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let pems: Vec<&[u8]> = pems.iter().map(Vec::as_slice).collect();
        let algorithm = match algorithm {
            PublicKeyAlgorithm::EdDsa => jsonwebtoken::Algorithm::EdDSA,
            PublicKeyAlgorithm::Rs256 => jsonwebtoken::Algorithm::RS256,
        };
        Some(TokenVerifier::public_keys(&pems, algorithm).context("--jwt-public-key")?)
    } else {
        None
    };
    let secret_flags = "--jwt-secret and --jwt-previous-secret";
    let verifier = match keys {
        None if secrets.is_empty() => {
            TokenVerifier::hs256(&auth::read_or_create_secret(&config.data_dir)?)?
        }
        None => TokenVerifier::hs256_secrets(&secrets).context(secret_flags)?,
        Some(keys) => {
            if !secrets.is_empty() {
                tracing::info!(
                    "client tokens are verified with the identity provider's keys and, HS256, \
                     with --jwt-secret"
                );
            }
            keys.and_hs256_secrets(&secrets).context(secret_flags)?
        }
    };
    let verifier = verifier.with_audiences(&config.jwt_audience);
    Ok(match &config.jwt_issuer {
        Some(issuer) => verifier.with_issuer(issuer),
        None => verifier,
    })
}

/// How the client roles authenticate their clients: with `verifier` ([`verifier`]), whose
/// identity provider's keys, with `--jwt-jwks-url`, are fetched now (the node serves no
/// client before) and then every `--jwt-jwks-refresh` in `loops`.
pub async fn client_auth(
    config: &ServeConfig,
    verifier: TokenVerifier,
    store: &MessageStore,
    metrics: &Arc<Metrics>,
    loops: &BackgroundLoops,
) -> anyhow::Result<Arc<ClientAuth>> {
    let key_set = match &config.jwt_jwks_url {
        Some(url) => {
            let source =
                KeySetSource::new(url, verifier.clone(), &config.data_dir, metrics.clone());
            let source = Arc::new(source?);
            source.load().await?;
            source.start_refreshing(config.jwt_jwks_refresh, loops);
            Some(source)
        }
        None => None,
    };
    Ok(Arc::new(ClientAuth {
        verifier,
        key_set,
        store: store.clone(),
        max_devices_per_user: config.max_devices_per_user,
    }))
}

/// The store: one engine, or with `--storage-partitions` one per partition of the table
/// (`docs/decisions/0005-storage-partitions.md`).
/// With the embedded store, its engine too (for its backups, `crate::backup`).
pub async fn open_store(
    config: &ServeConfig,
) -> anyhow::Result<(MessageStore, Option<Arc<EmbeddedEngine>>)> {
    let (store, embedded) = match &config.storage_partitions {
        None => {
            let (engine, embedded) = open_engine(config).await?;
            let store = MessageStore::open(engine, b"", config.shards).await?;
            (store, embedded)
        }
        Some(path) => (open_partitioned_store(config, path).await?, None),
    };
    Ok((
        store.with_idempotency_window(config.idempotency_window),
        embedded,
    ))
}

async fn open_partitioned_store(config: &ServeConfig, path: &Path) -> anyhow::Result<MessageStore> {
    let table = PartitionTable::read(path, config.shards)?;
    let mut engines = Vec::with_capacity(table.partitions().len());
    for (index, partition) in table.partitions().iter().enumerate() {
        let engine = open_partition(config, &partition.store)
            .await
            .with_context(|| format!("storage partition {index} ({})", partition.store))?;
        engines.push(engine);
    }
    Ok(MessageStore::open_partitioned(engines, &table, b"", config.shards).await?)
}

/// What `/metrics` tells of `store` ([`open_store`]): the embedded store's block cache and
/// its writer's work.
pub fn report_store(config: &ServeConfig, store: &MessageStore, metrics: &Metrics) {
    if config.store == StoreKind::Embedded {
        let cache = i64::try_from(config.store_cache.bytes).unwrap_or(i64::MAX);
        metrics.store_cache_bytes.set(cache);
    }
    metrics.watch_store(store.clone());
}

async fn open_engine(
    config: &ServeConfig,
) -> anyhow::Result<(Arc<dyn KvEngine>, Option<Arc<EmbeddedEngine>>)> {
    match config.store {
        StoreKind::Embedded => {
            crate::backup::check_no_restore_left(&config.data_dir)?;
            // Before fjall makes it (with the umask's mode): it holds every message.
            let path = config.data_dir.join(STORE_DIR);
            courier_core::dirs::create_private(&path)
                .with_context(|| format!("creating the store directory {}", path.display()))?;
            let engine = Arc::new(config.store_cache.open(&path)?);
            Ok((engine.clone(), Some(engine)))
        }
        StoreKind::Fdb => {
            let cluster_file = config.fdb_cluster_file.as_deref();
            let cluster_file = cluster_file.context("--store fdb needs --fdb-cluster-file")?;
            Ok((open_fdb(cluster_file)?, None))
        }
        StoreKind::Remote => {
            let address = config
                .store_address
                .as_deref()
                .context("--store remote needs --store-address")?;
            let token = config.cluster.token()?;
            Ok((Arc::new(RemoteEngine::connect(address, token).await?), None))
        }
    }
}

/// The engine of one partition of the table, of the kind `--store` names.
async fn open_partition(
    config: &ServeConfig,
    store: &PartitionStore,
) -> anyhow::Result<Arc<dyn KvEngine>> {
    match (config.store, store) {
        (StoreKind::Remote, PartitionStore::Address(address)) => Ok(Arc::new(
            RemoteEngine::connect(address, config.cluster.token()?).await?,
        )),
        (StoreKind::Fdb, PartitionStore::ClusterFile(path)) => open_fdb(path),
        (StoreKind::Remote, PartitionStore::ClusterFile(_)) => anyhow::bail!(
            "--store remote takes store nodes: give each partition a \"store_address\""
        ),
        (StoreKind::Fdb, PartitionStore::Address(_)) => anyhow::bail!(
            "--store fdb takes FoundationDB clusters: give each partition a \"cluster_file\""
        ),
        (StoreKind::Embedded, _) => anyhow::bail!(
            "storage partitions need --store remote or --store fdb: the embedded store is one disk"
        ),
    }
}

#[cfg(feature = "fdb")]
fn open_fdb(cluster_file: &std::path::Path) -> anyhow::Result<Arc<dyn KvEngine>> {
    Ok(Arc::new(courier_store::fdb::FdbEngine::open(
        cluster_file,
        b"courier",
    )?))
}

#[cfg(not(feature = "fdb"))]
fn open_fdb(_: &std::path::Path) -> anyhow::Result<Arc<dyn KvEngine>> {
    anyhow::bail!(
        "this courier binary was built without FoundationDB support; \
         rebuild with `cargo build --release -p courier --features fdb` or use --store embedded"
    )
}

/// How the client roles of a `courier node` reach the rest of its cluster.
pub struct Cluster {
    pub token: ClusterToken,
    /// Whether this node also drains outboxes (the fanout role).
    pub fanout: bool,
    /// Whether this node runs the chat role (and serves it to the gateway nodes that do not);
    /// without it, its clients' requests go to the cluster's chat nodes.
    pub chat: bool,
    /// The push notifier's providers, when this node runs it (the push role).
    pub push: Option<Arc<PushProviders>>,
    /// Whether this node serves media itself (the media role); without it, its media
    /// requests go to the cluster's media nodes ([`MediaProxy`]).
    pub media: bool,
    /// Where this node's internal gRPC listens: deliveries from fanout nodes and, with
    /// `fanout`, notices of commits from chat nodes.
    pub internal: tokio::net::TcpListener,
    /// What this node's registration loop tells: that it renewed its registration after it
    /// had lapsed, or found its lease ended by another node (a fanout node that could not
    /// deliver to it): deliveries may have skipped its connections meanwhile, so they are told
    /// to reconnect; and after an ending, the node answers not ready for a while
    /// ([`node::ENDED_LEASE_HOLD_DOWN`]).
    pub registration: Arc<node::RegistrationNotices>,
    /// The node's metrics (its registration reports the connections open).
    pub metrics: Arc<Metrics>,
}

/// `courier serve`: every role in one process. On a store other processes reach (`--store
/// remote` or `fdb`) the server registers in the node registry first, and does not start
/// while another process serves that store ([`node::claim_the_server`]); the embedded store's
/// lock file keeps it to one process.
pub async fn run(config: ServeConfig) -> anyhow::Result<()> {
    // First: a SIGTERM from now on stops the process cleanly, whatever it is doing.
    let stop = StopSignal::install()?;
    tracing::info!(pid = std::process::id(), "courier serve starting");
    config.validate()?;
    let Some(store) = stop.unless_stopped(open_store(&config)).await else {
        return Ok(());
    };
    let (store, embedded) = store?;
    let listener = bind_http(config.listen, config.listen_backlog)?;
    let metrics_listener = bind_metrics(&config)?;
    if let Some(engine) = embedded {
        // Backups while the server runs, until it has drained (`crate::backup`).
        let sources = backup::Sources {
            data_dir: config.data_dir.clone(),
            media_dir: config.media.local_dir(&config.data_dir),
        };
        let backups = CancellationToken::new();
        let serving = tokio::spawn(backup::serve(engine, sources, backups.clone()));
        let result = run_client_roles(config, store, listener, metrics_listener, None, stop).await;
        backups.cancel();
        let _ = serving.await;
        return result;
    }
    let registration = NodeRecord {
        roles: vec![node::SERVE_ROLE.to_owned()],
        address: listener.local_addr()?.to_string(),
        lease_until_ms: 0,
        started_ms: now_ms(),
        connections: 0,
        http_address: String::new(),
        push_providers: Vec::new(),
        instance: rand::random::<u64>() | 1,
    };
    let lease = config.shard_lease;
    // Given up, it registered nothing: it writes the record only once it may.
    let claim = node::claim_the_server(
        &store,
        &config.node_id,
        &registration,
        lease.as_millis() as u64,
    );
    let Some(claimed) = stop.unless_stopped(claim).await else {
        stop_store_client(&config);
        return Ok(());
    };
    claimed?;
    let loops = BackgroundLoops::new();
    // Set never: the record lives as long as the process, and ends below.
    let (_stay, staying) = watch::channel(false);
    node::keep_registration(
        &loops,
        node::Registered {
            store: store.clone(),
            node: config.node_id.clone(),
            record: registration.clone(),
            lease,
        },
        Arc::new(node::RegistrationNotices::default()),
        None,
        staying,
    );
    let result = run_client_roles(
        config.clone(),
        store.clone(),
        listener,
        metrics_listener,
        None,
        stop,
    )
    .await;
    loops
        .shutdown(tokio::time::Instant::now() + std::time::Duration::from_secs(5))
        .await;
    if let Err(e) = node::end_registration(&store, &config.node_id, &registration).await {
        tracing::warn!(error = %e, "ending the server's registration failed; it lapses with its lease");
    }
    stop_store_client(&config);
    result
}

/// The listener of `--metrics-listen`, if given: bound at start, with the HTTP port.
pub fn bind_metrics(config: &ServeConfig) -> anyhow::Result<Option<std::net::TcpListener>> {
    let Some(listen) = config.metrics_listen else {
        return Ok(None);
    };
    // A scraper's few connections: no room for a reconnect storm is needed.
    let listener = bind_http(listen, 128).context("binding --metrics-listen")?;
    Ok(Some(listener.into_std()?))
}

/// Serves `/metrics` on `listener` (`--metrics-listen`), alone and without authentication,
/// with the client port's `limits` on each connection ([`http_server::serve`]: a peer that
/// sends or reads nothing is not held for good), as a loop of `loops` (so until the node has
/// drained), and returns what the HTTP port
/// (`--listen`) serves of them: nothing then; without a listener, `/metrics` itself, as
/// before the flag (`courier serve` on a laptop, `courier bench` reading the client port).
pub fn metrics_routes(
    listener: Option<std::net::TcpListener>,
    metrics: &Arc<Metrics>,
    loops: &BackgroundLoops,
    limits: http_server::ConnectionLimits,
) -> anyhow::Result<axum::Router> {
    let Some(listener) = listener else {
        return Ok(metrics_router(metrics.clone()));
    };
    let address = listener.local_addr()?;
    let app = metrics_router(metrics.clone());
    // Restarted if it fails, on a copy of the same socket (the port stays bound meanwhile).
    loops.spawn("serve /metrics", move |cancel| {
        let (app, listener) = (app.clone(), listener.try_clone());
        async move {
            match listener.and_then(tokio::net::TcpListener::from_std) {
                Ok(listener) => {
                    http_server::serve(listener, app, limits, cancel.cancelled_owned()).await;
                }
                Err(e) => tracing::warn!(error = %e, "serving /metrics failed"),
            }
        }
    });
    tracing::info!(%address, "courier metrics on {address}");
    Ok(axum::Router::new())
}

/// Has the kernel probe `tcp`'s peer while the connection is idle and end it once the peer
/// stops answering ([`KEEPALIVE_IDLE`], [`UNACKNOWLEDGED_LIMIT`]).
fn probe_when_idle(tcp: &tokio::net::TcpStream) -> std::io::Result<()> {
    let socket = socket2::SockRef::from(tcp);
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(KEEPALIVE_IDLE)
        .with_interval(KEEPALIVE_INTERVAL)
        .with_retries(KEEPALIVE_PROBES);
    socket.set_tcp_keepalive(&keepalive)?;
    #[cfg(target_os = "linux")]
    socket.set_tcp_user_timeout(Some(UNACKNOWLEDGED_LIMIT))?;
    Ok(())
}

/// The listener of the node's HTTP port (`--listen`: the client port, or a node's probes),
/// with room for `backlog` connections not yet accepted: after a gateway restarts, its devices
/// all reconnect at once, and a handshake the kernel drops is retried only after a second.
pub fn bind_http(
    listen: std::net::SocketAddr,
    backlog: u32,
) -> anyhow::Result<tokio::net::TcpListener> {
    let bind = || {
        let socket = match listen {
            std::net::SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
            std::net::SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
        };
        // As `TcpListener::bind` does: a restarted node binds while its old connections wait
        // out TIME_WAIT.
        socket.set_reuseaddr(true)?;
        socket.bind(listen)?;
        socket.listen(backlog)
    };
    bind().with_context(|| format!("listening on {listen}"))
}

/// Runs the client roles (gateway, and unless `cluster` says otherwise chat, media, fanout and
/// push) on `store`, with the client port on `listener`, until `signal` (one that came while
/// the roles were built drains the node as soon as it is ready); then drains
/// and returns (module documentation, "Stopping"). Without `cluster` (`courier serve`) every
/// role is in this process, with a local sequencer; with it, appends go to the shards'
/// owners, deliveries to the gateways holding the devices, and commit notices to the shards'
/// fanout nodes.
pub async fn run_client_roles(
    config: ServeConfig,
    store: MessageStore,
    listener: tokio::net::TcpListener,
    metrics_listener: Option<std::net::TcpListener>,
    cluster: Option<Cluster>,
    signal: StopSignal,
) -> anyhow::Result<()> {
    courier_core::dirs::create_private(&config.data_dir)
        .with_context(|| format!("creating the data directory {}", config.data_dir.display()))?;
    let verifier = verifier(&config)?;
    let node = config.node_id.clone();
    // Jobs over the whole keyspace run on the one node that leads each.
    let lead = |job| JobLead {
        store: store.clone(),
        job,
        node: node.clone(),
    };
    let drain_settings = config.drain(cluster.is_some())?;

    // A cluster node's metrics already report its store (`node::run`).
    let metrics = cluster.as_ref().map_or_else(
        || {
            let metrics = Arc::new(Metrics::new());
            report_store(&config, &store, &metrics);
            metrics
        },
        |c| c.metrics.clone(),
    );
    // Ordering and delivery apart from the connections (module documentation).
    let ordering = OrderingRuntime::new(config.ordering_threads)?;
    metrics.ordering_threads.set(config.ordering_threads as i64);
    // Every background loop of every role; shut down last (module documentation, "Stopping").
    let loops = BackgroundLoops::new();
    let limits = http_server::ConnectionLimits::new(config.http_write_timeout);
    let metrics_routes = metrics_routes(metrics_listener, &metrics, &loops, limits)?;
    let routes = Arc::new(Routes::new(metrics.clone()));
    let gateway_limits = config.gateway_limits();
    // The drain of the connections (SIGTERM, or the admin API): batch by batch over the window.
    let drain = Arc::new(GatewayDrain::new(
        routes.clone(),
        drain_settings.window,
        gateway_limits.reconnect_jitter,
    ));
    // Waits for the order; cancelled when the node stops, after its connections have gone.
    // Restarted if it panics: it tells what it has not told yet.
    let connections_drain = drain.clone();
    loops.spawn("drain the connections batch by batch", move |cancel| {
        let drain = connections_drain.clone();
        async move {
            cancel.run_until_cancelled(drain.run()).await;
        }
    });
    let (gateways, membership): (Arc<dyn Gateways>, _) = match &cluster {
        None => (
            routes.clone(),
            Arc::new(MembershipCache::new(store.clone())),
        ),
        Some(cluster) => {
            // Routes a previous run of this node left behind point at connections gone.
            let swept = store.clear_gateway_routes(&node, u64::MAX).await?;
            if swept > 0 {
                tracing::info!(swept, "cleared the routes this node's previous run left");
            }
            let local: Arc<dyn Gateways> = routes.clone();
            let gateways = ClusterGateways::new(
                store.clone(),
                Some((node.clone(), local)),
                cluster.token.clone(),
            );
            (
                Arc::new(gateways),
                Arc::new(MembershipCache::checking_heads(store.clone())),
            )
        }
    };
    // The roles' bindings: this process's gateway on its own, every gateway node in a cluster.
    let context = Context {
        store: store.clone(),
        gateways: gateways.clone(),
        membership,
        metrics: metrics.clone(),
    };
    let runs_fanout = cluster.as_ref().is_none_or(|c| c.fanout);
    let runs_media = cluster.as_ref().is_none_or(|c| c.media);
    let fanout = match runs_fanout {
        true => Some(Fanout::new(context.clone(), config.fanout_config(cluster.is_some())).await?),
        false => None,
    };
    let push = match &cluster {
        None => Some(Arc::new(PushProviders::from_config(&config.push)?)),
        Some(cluster) => cluster.push.clone(),
    };
    let notifier = push.clone().map(|providers| {
        Notifier::new(
            context.clone(),
            providers,
            config.notifier.clone(),
            config.push.push_include_text,
            config.large_group_threshold,
        )
    });
    // Fanout first: delivery is what a user waits for.
    let mut listeners: Vec<Arc<dyn CommitListener>> = Vec::new();
    let sequencer: Option<Arc<dyn Sequencer>> = match &cluster {
        None => {
            listeners.extend(fanout.clone().map(|f| f as Arc<dyn CommitListener>));
            listeners.extend(notifier.clone().map(|n| n as Arc<dyn CommitListener>));
            let sequencer = ordering
                .handle
                .spawn(LocalSequencer::start(
                    store.clone(),
                    config.ownership(),
                    config.sequencer_limits(),
                    Arc::new(Listeners(listeners)),
                    metrics.clone(),
                ))
                .await??;
            let _on = ordering.handle.enter();
            sequencer.spawn_loops(&loops);
            Some(sequencer)
        }
        Some(cluster) if cluster.chat => {
            let local = fanout
                .clone()
                .map(|f| (node.clone(), f as Arc<dyn CommitListener>));
            listeners.extend(notifier.clone().map(|n| n as Arc<dyn CommitListener>));
            Some(routed_sequencer(
                &store,
                &cluster.token,
                &node,
                local,
                listeners,
                &loops,
            ))
        }
        // The chat nodes append; this node's notifier looks at every shard each round.
        Some(_) => None,
    };
    // Delivery's loops spawn on the ordering runtime (module documentation).
    let on_ordering = ordering.handle.enter();
    if let Some(notifier) = &notifier {
        // On a cluster node it is told of the commits made through this node, and, while it
        // leads, by the chat nodes of theirs; every shard is looked at each round besides.
        let every_shard_each = cluster.is_some().then(|| config.ownership().round());
        notifier.start(
            &loops,
            every_shard_each,
            cluster.is_some().then(|| lead(Job::Push)),
        );
    }
    if let Some(fanout) = &fanout {
        fanout.start(&loops);
    }
    drop(on_ordering);
    let storage = StorageHealth::new(
        store.clone(),
        (config.store == StoreKind::Embedded).then(|| config.data_dir.join(STORE_DIR)),
        config.min_free_disk,
        runs_media
            .then(|| config.media.local_dir(&config.data_dir))
            .flatten(),
        config.media.media_min_free_disk,
    );
    let chat = match sequencer {
        Some(sequencer) => ChatBinding::Local(start_chat(ChatRole {
            config: &config,
            context,
            sequencer,
            storage: storage.clone(),
            loops: &loops,
            node: &node,
        })),
        None => {
            let token = cluster.as_ref().map(|c| c.token.clone());
            let token = token.context("a node without chat needs the cluster's chat nodes")?;
            ChatBinding::Remote(Arc::new(ClusterChat::new(store.clone(), token)))
        }
    };
    let gateway = Arc::new(Gateway {
        chat: chat.clone(),
        store: store.clone(),
        routes: routes.clone(),
        cluster_routes: cluster
            .is_some()
            .then(|| Arc::new(ClusterRoutes::new(store.clone(), node.clone()))),
        metrics: metrics.clone(),
        limits: gateway_limits,
        drain,
        owed_pushes: notifier.clone().map(|n| n as Arc<dyn OwedPushListener>),
        pages: PageBudget::new(
            config.max_page_bytes_in_flight,
            config.max_frame_bytes,
            metrics.page_bytes_in_flight.clone(),
        ),
    });
    gateway.start_recording_connected_devices(&loops);
    gateway.start_liveness_pass(&loops);
    // What hears the notices of commits made through other nodes: the fanout of the shards
    // this node drains, and the push notifier while this node leads it.
    let notices: Vec<Arc<dyn CommitListener>> = fanout
        .clone()
        .map(|f| f as Arc<dyn CommitListener>)
        .into_iter()
        .chain(notifier.clone().map(|n| n as Arc<dyn CommitListener>))
        .collect();
    let notices = (!notices.is_empty()).then(|| Arc::new(Listeners(notices)) as _);
    let registration = cluster.as_ref().map(|c| c.registration.clone());
    let internal = match cluster {
        Some(cluster) => Some(serve_internal(
            cluster, &store, &node, &gateway, notices, &config, &loops,
        )?),
        None => None,
    };
    let (stop, stopping) = watch::channel(false);
    let auth = client_auth(&config, verifier, &store, &metrics, &loops).await?;
    let media_routes = match runs_media {
        true => {
            let media = MediaService::open(
                config.media.clone(),
                &config.data_dir,
                store.clone(),
                chat.clone(),
                metrics.clone(),
                storage.clone(),
            )?;
            media.start_sweeper(&loops, lead(Job::MediaSweep));
            media_api::router(Arc::new(MediaApi {
                media,
                auth: auth.clone(),
            }))
        }
        false => media_proxy::router(Arc::new(MediaProxy::new(store.clone())?)),
    };
    storage.start(&loops);
    let state = Arc::new(AppState {
        chat,
        push: match push {
            Some(providers) => PushProviderNames::Here(providers),
            None => PushProviderNames::Cluster(store.clone()),
        },
        gateway,
        auth,
        storage,
        ready: AtomicBool::new(false),
        registration,
    });

    let address = listener.local_addr()?;
    let stop_signal = signal.stopped();
    state.ready.store(true, Ordering::Release);
    tracing::info!(%address, data_dir = %config.data_dir.display(), "courier ready on {address}");

    let app_state = state.clone();
    let loop_failed = loops.failed();
    let shutdown = async move {
        tokio::select! {
            () = stop_signal => {
                tracing::info!("stopping: draining the connections");
            }
            task = loop_failed => {
                tracing::error!(task, "a background loop kept failing; draining to stop the node");
            }
        }
        app_state.ready.store(false, Ordering::Release);
        let order = app_state.gateway.drain.start(None);
        tracing::info!(
            connections = order.connections,
            window_ms = order.window.as_millis() as u64,
            "telling the connections to reconnect, batch by batch"
        );
        let _ = stop.send(true);
    };
    // Frames are small and each one a reply someone waits for: Nagle's algorithm would hold
    // one back until the previous one is acknowledged (tens of ms under load). The gateway
    // buffers what it writes and flushes when its queue is empty, so frames still leave in
    // few segments.
    let listener = listener.tap_io(|tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::warn!(error = %e, "could not set TCP_NODELAY on a connection");
        }
        if let Err(e) = probe_when_idle(tcp) {
            tracing::warn!(error = %e, "could not set TCP keepalive on a connection");
        }
    });
    let app = router(state).merge(media_routes).merge(metrics_routes);
    let app = with_web_app(app, config.web_dir.as_deref());
    let limits = http_server::ConnectionLimits::new(config.http_write_timeout);
    let server = http_server::serve(listener, app, limits, shutdown);
    tokio::pin!(server);
    let mut signalled = stopping;
    // Draining takes at most `drain_timeout` from the signal: HTTP requests finish, and every
    // connection, in its batch, answers its accepted sends, says `reconnect`, closes and leaves
    // the registry.
    let deadline = tokio::select! {
        () = &mut server => {
            tokio::time::Instant::now() + drain_settings.timeout
        }
        _ = signalled.wait_for(|stopping| *stopping) => {
            let deadline = tokio::time::Instant::now() + drain_settings.timeout;
            if tokio::time::timeout_at(deadline, &mut server).await.is_err() {
                tracing::warn!("HTTP requests still running at the drain deadline");
            }
            deadline
        }
    };
    // Upgraded WebSockets outlive the HTTP server: wait for them to close.
    while routes.count() > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    match routes.count() {
        0 => tracing::info!("drained; stopping the background loops"),
        open => tracing::warn!(
            open,
            "drain deadline passed with connections open; stopping the background loops"
        ),
    }
    // Every loop that failed to stop in time, or panicked while stopping, was logged at error.
    let loops_deadline = deadline.max(tokio::time::Instant::now() + LOOP_GRACE);
    let stopped_cleanly = loops.shutdown(loops_deadline).await.is_clean();
    // A cluster node gives its outboxes back to the other fanout nodes at once.
    if let Some(internal) = internal {
        if let Some(fanout) = &fanout
            && let Err(e) = fanout.release().await
        {
            tracing::warn!(error = %e, "giving the fanout shards back failed; they lapse with their leases");
        }
        internal.abort();
    }
    // The shard actors end with it.
    drop(ordering);
    // Commits may still come from tasks not yet ended; the next start warms up from this.
    store.closing();
    if stopped_cleanly {
        tracing::info!("background loops stopped; exiting");
    }
    if let Some(task) = loops.given_up() {
        anyhow::bail!(
            "the background loop `{task}` kept failing (see the log above); \
             the node stopped so that its supervisor restarts it"
        );
    }
    Ok(())
}

/// Stops the FoundationDB client's network thread, for a clean exit: the process's last use
/// of the store, as an operation after it never completes (a node's final registry write
/// waited for ever, until the process was killed). Nothing for the other stores.
pub fn stop_store_client(config: &ServeConfig) {
    #[cfg(feature = "fdb")]
    if config.store == StoreKind::Fdb {
        courier_store::fdb::stop_network();
    }
    #[cfg(not(feature = "fdb"))]
    let _ = config;
}

/// The runtime of ordering and delivery (module documentation, "Two runtimes"), or the
/// current one with `--ordering-threads 0`. Dropped from async code, it shuts down in the
/// background: its loops have stopped by then, and only idle shard actors are left.
struct OrderingRuntime {
    handle: tokio::runtime::Handle,
    runtime: Option<tokio::runtime::Runtime>,
}

impl OrderingRuntime {
    fn new(threads: usize) -> anyhow::Result<Self> {
        if threads == 0 {
            return Ok(Self {
                handle: tokio::runtime::Handle::current(),
                runtime: None,
            });
        }
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .thread_name("courier-ordering")
            .enable_all()
            .build()
            .context("starting the ordering runtime")?;
        Ok(Self {
            handle: runtime.handle().clone(),
            runtime: Some(runtime),
        })
    }
}

impl Drop for OrderingRuntime {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// What the chat role of a node is built from ([`start_chat`]).
pub struct ChatRole<'a> {
    pub config: &'a ServeConfig,
    /// The store, and how typing, receipts and unlinks reach the devices.
    pub context: Context,
    /// Where appends go: this process's sequencer (`courier serve`) or the shards' owners.
    pub sequencer: Arc<dyn Sequencer>,
    pub storage: Arc<StorageHealth>,
    pub loops: &'a BackgroundLoops,
    /// This node's id (the retention job's lead is taken under it).
    pub node: &'a str,
}

/// Builds the chat role and starts its loops: the receipt relay, retention (on the node that
/// leads it) and the pass that forgets idle rate limits.
pub fn start_chat(role: ChatRole<'_>) -> Arc<Chat> {
    let ChatRole {
        config,
        context,
        sequencer,
        storage,
        loops,
        node,
    } = role;
    let store = &context.store;
    let receipts = ReceiptRelay::new(&context, config.receipt_coalesce_above);
    receipts.start(loops, config.receipt_interval);
    Retention::new(
        store.clone(),
        sequencer.clone(),
        config.retention_policy(),
        context.metrics.clone(),
    )
    .start(
        loops,
        JobLead {
            store: store.clone(),
            job: Job::Retention,
            node: node.to_owned(),
        },
    );
    let chat = Arc::new(Chat::new(
        context.clone(),
        sequencer,
        receipts,
        config.chat_limits(),
        storage,
    ));
    // Stops at once when cancelled, restarted if it panics: it keeps no state of its own.
    let idle_chat = chat.clone();
    loops.spawn("forget idle rate limits", move |cancel| {
        let chat = idle_chat.clone();
        async move {
            let forget = async {
                let mut tick = tokio::time::interval(FORGET_IDLE_LIMITS_EVERY);
                loop {
                    tick.tick().await;
                    chat.forget_idle_limits();
                }
            };
            cancel.run_until_cancelled(forget).await;
        }
    });
    chat
}

/// The sequencer of a cluster node running chat: appends go to the shards' owners, and
/// `listeners` (after the fanout nodes and the push lead, told of every commit in batches;
/// `local_fanout` is this node's own fanout, told in process) hear of the events committed
/// for this node `node`.
pub fn routed_sequencer(
    store: &MessageStore,
    token: &ClusterToken,
    node: &str,
    local_fanout: Option<(String, Arc<dyn CommitListener>)>,
    mut listeners: Vec<Arc<dyn CommitListener>>,
    loops: &BackgroundLoops,
) -> Arc<dyn Sequencer> {
    let notices = CommitNotifier::new(store.clone(), node, local_fanout, token.clone());
    // Fanout first: delivery is what a user waits for.
    listeners.insert(0, notices.clone());
    // Stops at once when cancelled; restarted if it panics: a lost notice is found at the
    // fanout's next round.
    loops.spawn("tell fanout nodes of commits", move |cancel| {
        let notices = notices.clone();
        async move {
            cancel.run_until_cancelled(notices.run()).await;
        }
    });
    Arc::new(RoutedSequencer::new(
        store.clone(),
        None,
        token.clone(),
        Arc::new(Listeners(listeners)),
    ))
}

/// Serves the internal gRPC of a client node on `cluster.internal` (deliveries to this
/// gateway; notices of commits to `notices`, when it runs fanout or push; the chat service, when it runs chat; the
/// admin API, whose `Drain` starts the gateway's drain), and reads the node registry every
/// lease round to sweep the routes of gateway nodes whose lease lapsed (and clears again this
/// gateway's routes whose clearing failed when their connection ended).
fn serve_internal(
    cluster: Cluster,
    store: &MessageStore,
    node: &str,
    gateway: &Gateway,
    notices: Option<Arc<dyn CommitListener>>,
    config: &ServeConfig,
    loops: &BackgroundLoops,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let routes = gateway.routes.clone();
    let incoming =
        courier_rpc::stall::bounded_incoming(cluster.internal, courier_rpc::stall::INTERNAL);
    let deliveries = GatewayService::new(routes.clone()).into_server(cluster.token.clone());
    let notices = notices.map(|n| FanoutService::new(n).into_server(cluster.token.clone()));
    // The gateway nodes without chat call this node's chat.
    let chat = match &gateway.chat {
        ChatBinding::Local(chat) => {
            Some(ChatNodeService::new(chat.clone()).into_server(cluster.token.clone()))
        }
        ChatBinding::Remote(_) => None,
    };
    let admin = AdminService::new(store.clone(), node.to_owned(), cluster.token.clone())
        .with_gateway(gateway.drain.clone())
        .into_server();
    let server = courier_rpc::internal_server()
        .add_service(deliveries)
        .add_service(admin)
        .add_optional_service(notices)
        .add_optional_service(chat)
        .serve_with_incoming(incoming);
    let served = tokio::spawn(async move {
        if let Err(e) = server.await {
            tracing::error!(error = %e, "the internal gRPC server stopped");
        }
    });
    let registration = cluster.registration;
    let jitter = gateway.limits.reconnect_jitter;
    // Stops at once when cancelled; restarted if it panics: it keeps no state.
    loops.spawn("reconnect clients after a lapsed lease", move |cancel| {
        let (registration, routes) = (registration.clone(), routes.clone());
        async move {
            let rejoin = async {
                loop {
                    registration.lapsed.notified().await;
                    tracing::warn!("this gateway's lease lapsed: telling its clients to reconnect");
                    routes.rejoin_all(jitter);
                }
            };
            cancel.run_until_cancelled(rejoin).await;
        }
    });
    let (store, node, round) = (store.clone(), node.to_owned(), config.ownership().round());
    let own_routes = gateway.cluster_routes.clone();
    let open = gateway.routes.clone();
    // Stops at once when cancelled; restarted if it panics: it keeps no state (the routes of
    // this gateway to clear again are kept by `own_routes`).
    loops.spawn("sweep the routes of lapsed gateways", move |cancel| {
        let (store, node, own_routes) = (store.clone(), node.clone(), own_routes.clone());
        let open = open.clone();
        async move {
            let read = async {
                let mut rounds = tokio::time::interval(round);
                loop {
                    rounds.tick().await;
                    if let Some(own) = &own_routes {
                        own.clear_left(&open).await;
                    }
                    if let Err(e) = sweep_round(&store, &node).await {
                        tracing::warn!(error = %e, "sweeping the routes of lapsed gateways failed; retrying");
                    }
                }
            };
            cancel.run_until_cancelled(read).await;
        }
    });
    Ok(served)
}

/// One round of the sweep of gateway `node`: reads the registry, and clears the routes of the
/// gateways it shows lapsed when the read began ([`sweep_lapsed_gateways`]). Judged by the
/// clock after the read, a read that returned late (a slow store, this process descheduled or
/// paused) would show live gateways lapsed: their routes cleared while their connections stay
/// open, never told to reconnect, as their leases never lapsed.
async fn sweep_round(store: &MessageStore, node: &str) -> Result<(), StoreError> {
    let now = courier_core::clock::now_ms();
    let nodes = store.nodes().await?;
    sweep_lapsed_gateways(store, node, &nodes, now).await
}

/// Clears the routes of every gateway node of `nodes` but `node` whose lease lapsed, those
/// written before the lapse (its devices lost their connections, or are told to reconnect when
/// it notices). Idempotent: every gateway node runs it.
async fn sweep_lapsed_gateways(
    store: &MessageStore,
    node: &str,
    nodes: &[(String, NodeRecord)],
    now: u64,
) -> Result<(), StoreError> {
    for (id, record) in nodes {
        if id != node && !record.is_live(now) && record.roles.iter().any(|r| r == "gateway") {
            let swept = store
                .clear_gateway_routes(id, record.lease_until_ms)
                .await?;
            if swept > 0 {
                tracing::info!(gateway = %id, swept, "cleared the routes of a gateway whose lease lapsed");
            }
        }
    }
    Ok(())
}

/// SIGTERM or Ctrl-C, for every part of the process to wait on. Installed first thing
/// ([`StopSignal::install`]), before the store opens: a signal that came during the start-up
/// (the store opening, a claim waiting out a killed run's record) took the signal's default
/// action and killed the process (status 143, which a supervisor takes for a crash). Now the
/// start-up is given up ([`StopSignal::unless_stopped`]), or, once the roles are being built,
/// the node drains as soon as it is ready (with nothing to drain): either way it exits 0.
#[derive(Clone)]
pub struct StopSignal(Shared<BoxFuture<'static, ()>>);

impl StopSignal {
    /// Installs the handlers now, not when the signal is first awaited.
    #[cfg(unix)]
    pub fn install() -> anyhow::Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
        let mut interrupt =
            signal(SignalKind::interrupt()).context("installing the Ctrl-C (SIGINT) handler")?;
        let signalled = async move {
            tokio::select! {
                _ = term.recv() => {},
                _ = interrupt.recv() => {},
            }
        };
        Ok(Self(signalled.boxed().shared()))
    }

    #[cfg(not(unix))]
    pub fn install() -> anyhow::Result<Self> {
        let signalled = async {
            let _ = tokio::signal::ctrl_c().await;
        };
        Ok(Self(signalled.boxed().shared()))
    }

    /// Resolves once the signal came (at once if it came before).
    pub fn stopped(&self) -> impl Future<Output = ()> + Send + 'static {
        self.0.clone()
    }

    /// Runs `starting`, a step of the start-up, unless the signal comes first: then it is
    /// dropped (nothing was served yet, nothing acknowledged) and `None` is returned, logged.
    pub async fn unless_stopped<T>(&self, starting: impl Future<Output = T>) -> Option<T> {
        tokio::select! {
            biased;
            started = starting => Some(started),
            () = self.stopped() => {
                tracing::info!("stopped while starting (SIGTERM or Ctrl-C): nothing was served; exiting");
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use courier_core::clock::now_ms;
    use courier_store::faulty_engine::FaultyEngine;

    /// A registry read that returns late (a slow store, or this process descheduled or paused
    /// meanwhile) showed a live gateway as lapsed when judged by the clock after it: its routes
    /// were cleared while its connections stayed open, and as its lease never lapsed it never
    /// told them to reconnect. Its devices got no live event until they reconnected.
    #[tokio::test]
    async fn a_registry_read_that_returns_late_sweeps_no_live_gateways_routes() {
        let engine = FaultyEngine::new();
        let store = engine.store(8).await;
        let lease_until_ms = now_ms() + 200;
        let gateway = NodeRecord {
            roles: vec!["gateway".into()],
            address: "127.0.0.9:7500".into(),
            lease_until_ms,
            ..NodeRecord::default()
        };
        store.register_node("gb", &gateway).await.unwrap();
        store
            .add_route("bob", "phone", "gb", 1, now_ms())
            .await
            .unwrap();
        // The read returns once the lease it read has run out.
        engine.after_next_read(Box::pin(async move {
            while now_ms() <= lease_until_ms {
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
        }));
        sweep_round(&store, "ga").await.unwrap();
        assert_eq!(
            store.routes("bob").await.unwrap().len(),
            1,
            "live when the read began: its route is kept"
        );
        // Lapsed when a later read begins: swept.
        sweep_round(&store, "ga").await.unwrap();
        assert!(store.routes("bob").await.unwrap().is_empty());
    }

    /// `/metrics` on `--metrics-listen` is served with the client port's bounds
    /// ([`http_server::serve`]): under `axum::serve` a peer that connected and sent nothing (or
    /// read nothing) held its connection, task and memory for good.
    #[tokio::test]
    async fn a_metrics_connection_that_sends_nothing_is_closed() {
        use tokio::io::AsyncReadExt;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let address = listener.local_addr().unwrap();
        let loops = BackgroundLoops::new();
        let limits = http_server::ConnectionLimits {
            header_read_timeout: std::time::Duration::from_millis(200),
            write_timeout: std::time::Duration::from_secs(60),
        };
        let metrics = Arc::new(Metrics::new());
        let _routes = metrics_routes(Some(listener), &metrics, &loops, limits).unwrap();
        let mut socket = tokio::net::TcpStream::connect(address).await.unwrap();
        let mut buf = [0u8; 64];
        let read = tokio::time::timeout(std::time::Duration::from_secs(20), socket.read(&mut buf))
            .await
            .expect("the metrics port closed the idle connection");
        assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    }
}
