//! `courier node`: one node of a cluster, running some of the roles, on a shared store
//! (`--store remote` for a test cluster on one machine, `--store fdb` in production).
//!
//! Roles, and how they combine on a node:
//! - `sequencer` (alone): takes the shards no live node holds, keeps their leases, and serves
//!   appends to the other nodes over internal gRPC (`--internal-listen`, never the client
//!   port), with the admin API (`admin.rs`);
//! - `fanout` (alone): drains the outboxes of its fair share of the shards and hands their
//!   events to the gateway nodes holding the recipients' devices;
//! - `chat` (alone): validates what clients ask, enforces membership, routes appends to the
//!   shards' owners; serves the chat service (`courier.internal.v1.Chat`) on the internal port
//!   to the gateway nodes that do not run chat. Stateless: any number may run;
//! - `gateway` with `media` (the client port), optionally with `chat`, `fanout` and `push`:
//!   clients connect here; with `chat` their requests are handled in process (and the node
//!   serves the chat service too), without it they go to the live chat nodes of the registry
//!   (`courier_rpc::ClusterChat`); deliveries come from the fanout nodes over internal gRPC.
//!   Any number of such nodes may run. The push notifier leads on one node at a time, and media
//!   bytes must be shared (S3, or the same `--media-dir` on a shared filesystem) when several
//!   nodes serve media.
//!
//! Every node registers itself in the store (id, roles, internal address, lease) and renews
//! its registration every third of `--shard-lease`; a node that dies is seen as gone once it
//! lapses, and is forgotten (its record removed) [`FORGET_AFTER_LEASES`] leases later by the
//! registration loops of the live nodes. Every node serves the admin API (`admin.rs`) on its
//! internal port. A cluster node needs a store it shares with the others, its own `--node-id`,
//! and the cluster token.

use crate::admin::AdminService;
use crate::config::{ServeConfig, StoreKind};
use crate::serve::{self, Cluster};
use anyhow::Context;
use axum::Router;
use axum::http::{StatusCode, header};
use axum::routing::get;
use clap::{Args, ValueEnum};
use courier_core::clock::now_ms;
use courier_core::loops::BackgroundLoops;
use courier_core::membership::MembershipCache;
use courier_core::metrics::Metrics;
use courier_core::sequencing::Listeners;
use courier_core::storage_health::StorageHealth;
use courier_fanout::Fanout;
use courier_rpc::{
    ChatNodeService, ClusterGateways, ClusterToken, FanoutService, SequencerService,
};
use courier_sequencer::LocalSequencer;
use courier_store::MessageStore;
use courier_store::nodes::NodeRecord;
use std::future::IntoFuture;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tonic::transport::server::TcpIncoming;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Role {
    Gateway,
    Chat,
    Sequencer,
    Fanout,
    Push,
    Media,
}

impl Role {
    fn name(self) -> &'static str {
        match self {
            Role::Gateway => "gateway",
            Role::Chat => "chat",
            Role::Sequencer => "sequencer",
            Role::Fanout => "fanout",
            Role::Push => "push",
            Role::Media => "media",
        }
    }
}

/// The roles a client node runs together: the client port serves both (chat may run with them
/// or on nodes of its own).
const CLIENT_ROLES: [Role; 2] = [Role::Gateway, Role::Media];

/// `courier node`.
#[derive(Debug, Args)]
pub struct NodeArgs {
    /// The roles this node runs, e.g. `sequencer`, `chat`, `gateway,media` (its clients'
    /// requests go to the chat nodes) or `gateway,chat,fanout,push,media`.
    #[arg(long, env = "COURIER_ROLES", value_delimiter = ',', required = true)]
    pub roles: Vec<Role>,
    /// Where the internal gRPC of this node listens (port 0 picks a free port).
    #[arg(
        long,
        env = "COURIER_INTERNAL_LISTEN",
        default_value = "127.0.0.1:7500"
    )]
    pub internal_listen: SocketAddr,
    /// The address (`host:port`) other nodes reach this node's internal gRPC at; default: the
    /// address `--internal-listen` bound.
    #[arg(long, env = "COURIER_ADVERTISE")]
    pub advertise: Option<String>,
    #[command(flatten)]
    pub serve: ServeConfig,
}

impl NodeArgs {
    fn has(&self, role: Role) -> bool {
        self.roles.contains(&role)
    }

    /// Refuses a node that would not work in a cluster, saying why.
    fn validate(&self) -> anyhow::Result<()> {
        let config = &self.serve;
        anyhow::ensure!(
            config.store != StoreKind::Embedded,
            "a cluster node needs the store it shares with the other nodes: \
             --store remote (a store node, for tests) or --store fdb"
        );
        anyhow::ensure!(
            config.node_id != "local",
            "a cluster node needs its own --node-id (unique in the cluster)"
        );
        let clients = CLIENT_ROLES.iter().filter(|r| self.has(**r)).count();
        anyhow::ensure!(
            clients == 0 || clients == CLIENT_ROLES.len(),
            "the client port serves gateway and media together: \
             --roles gateway,media (with chat, fanout and push if wanted)"
        );
        anyhow::ensure!(
            clients > 0 || !self.has(Role::Chat) || self.roles.iter().all(|r| *r == Role::Chat),
            "a chat node without the client port runs the chat role alone: --roles chat"
        );
        anyhow::ensure!(
            !self.has(Role::Sequencer) || self.roles.iter().all(|r| *r == Role::Sequencer),
            "a sequencer node runs the sequencer role alone: --roles sequencer"
        );
        anyhow::ensure!(
            clients > 0 || !self.has(Role::Push),
            "the push notifier runs on a client node: --roles gateway,media,push"
        );
        anyhow::ensure!(
            clients == 0 || config.jwt_secret.is_some() || config.jwt_public_key.is_some(),
            "the nodes of a cluster must verify the same client tokens: give --jwt-secret \
             (or --jwt-public-key); a secret generated per data directory would differ per node"
        );
        if self.has(Role::Gateway) {
            config.drain(true)?;
        }
        Ok(())
    }
}

/// Runs the node until SIGTERM or Ctrl-C.
pub async fn run(args: NodeArgs) -> anyhow::Result<()> {
    args.validate()?;
    args.serve.validate()?;
    let config = &args.serve;
    let token = config.cluster.token()?;
    let engine = serve::open_engine(config).await?;
    let store = MessageStore::open(engine, b"", config.shards).await?;

    let internal = tokio::net::TcpListener::bind(args.internal_listen)
        .await
        .with_context(|| format!("binding the internal address {}", args.internal_listen))?;
    let address = match &args.advertise {
        Some(address) => address.clone(),
        None => internal.local_addr()?.to_string(),
    };
    let roles: Vec<String> = args.roles.iter().map(|r| r.name().to_owned()).collect();
    let registration = NodeRecord {
        roles: roles.clone(),
        address: address.clone(),
        lease_until_ms: 0,
        started_ms: now_ms(),
        connections: 0,
    };
    let lease = config.shard_lease;
    let lease_ms = lease.as_millis() as u64;
    refuse_conflicting_nodes(&args, &store).await?;
    store
        .register_node(&config.node_id, &leased(&registration, now_ms() + lease_ms))
        .await?;
    // The node's own loops: its registration, and (below) its shard leases.
    let loops = BackgroundLoops::new();
    let lapsed = Arc::new(tokio::sync::Notify::new());
    // The node's metrics: its roles' and the connections its registration reports.
    let metrics = Arc::new(Metrics::new());
    {
        let store = store.clone();
        let node = config.node_id.clone();
        let registration = registration.clone();
        let (lapsed, metrics) = (lapsed.clone(), metrics.clone());
        // Stops at once when cancelled; restarted if it fails: it keeps no state (a restarted
        // loop counts its lease from its start, so it may miss a lapse of the run before).
        loops.spawn("renew node registration", move |cancel| {
            let (store, node, registration) = (store.clone(), node.clone(), registration.clone());
            let (lapsed, metrics) = (lapsed.clone(), metrics.clone());
            async move {
                let renew = async {
                    let mut rounds = tokio::time::interval(lease / 3);
                    let mut deadline = now_ms() + lease_ms;
                    let mut round: u32 = 0;
                    rounds.tick().await;
                    loop {
                        rounds.tick().await;
                        let now = now_ms();
                        let record = NodeRecord {
                            connections: metrics.connections.get().max(0) as u64,
                            ..leased(&registration, now + lease_ms)
                        };
                        match store.register_node(&node, &record).await {
                            Ok(()) if now >= deadline => {
                                tracing::warn!(
                                    late_ms = now - deadline,
                                    "the node's registration had lapsed (paused, or cut off from the store)"
                                );
                                lapsed.notify_one();
                                deadline = now + lease_ms;
                            }
                            Ok(()) => deadline = now + lease_ms,
                            Err(e) => tracing::warn!(error = %e, "renewing the node's registration failed; retrying"),
                        }
                        round += 1;
                        if round.is_multiple_of(FORGET_EVERY_ROUNDS) {
                            forget_dead_nodes(&store, &node, now, lease_ms).await;
                        }
                    }
                };
                cancel.run_until_cancelled(renew).await;
            }
        });
    }

    let result = if args.has(Role::Gateway) {
        let cluster = Cluster {
            token,
            fanout: args.has(Role::Fanout),
            chat: args.has(Role::Chat),
            push: args.has(Role::Push),
            internal,
            lapsed,
            metrics,
        };
        tracing::info!(node = %config.node_id, roles = %roles.join(","), "courier node: internal gRPC on {address}");
        serve::run_client_roles(config.clone(), store.clone(), Some(cluster)).await
    } else {
        let node = InternalNode {
            config,
            store: &store,
            address: &address,
            roles: &roles,
            metrics,
        };
        if args.has(Role::Chat) {
            run_chat(node, token, internal, &loops).await
        } else if args.has(Role::Fanout) {
            run_fanout(node, token, internal, &loops).await
        } else {
            run_sequencer(node, token, internal, &loops).await
        }
    };
    loops
        .shutdown(tokio::time::Instant::now() + Duration::from_secs(5))
        .await;
    // The record says when the node left: a sweep clears the routes written before that, and
    // the registry forgets it `FORGET_AFTER_LEASES` leases later.
    store
        .register_node(&config.node_id, &leased(&registration, now_ms()))
        .await?;
    result
}

/// The sequencer role until SIGTERM or Ctrl-C: takes shards, serves appends and the admin API
/// on `internal`; then drains (what is queued is committed and answered, the shards are
/// released for the other sequencers) and stops serving.
async fn run_sequencer(
    node: InternalNode<'_>,
    token: ClusterToken,
    internal: tokio::net::TcpListener,
    loops: &BackgroundLoops,
) -> anyhow::Result<()> {
    let (config, store) = (node.config, node.store);
    let sequencer = LocalSequencer::start(
        store.clone(),
        config.ownership(),
        config.sequencer_limits(),
        Arc::new(Listeners(Vec::new())),
        node.metrics.clone(),
    )
    .await?;
    sequencer.spawn_loops(loops);

    let service = SequencerService::new(sequencer.clone()).into_server(token.clone());
    let admin = AdminService::new(store.clone(), config.node_id.clone(), token)
        .with_sequencer(sequencer.clone())
        .into_server();
    let services = tonic::service::Routes::new(service).add_service(admin);
    node.serve_until_stopped(internal, services, async {
        tracing::info!("stopping: draining the shards, then leaving the cluster");
        if let Err(e) = sequencer.drain().await {
            tracing::warn!(error = %e, "releasing the shards failed; they lapse with their leases");
        }
    })
    .await
}

/// The fanout role alone until SIGTERM or Ctrl-C: drains its share of the outboxes to the
/// gateway nodes and takes notices of commits on `internal`; then gives its shards back.
async fn run_fanout(
    node: InternalNode<'_>,
    token: ClusterToken,
    internal: tokio::net::TcpListener,
    loops: &BackgroundLoops,
) -> anyhow::Result<()> {
    let store = node.store;
    let gateways = Arc::new(ClusterGateways::new(store.clone(), None, token.clone()));
    let fanout = Fanout::new(
        store.clone(),
        gateways,
        Arc::new(MembershipCache::new(store.clone())),
        node.metrics.clone(),
        node.config.fanout_config(true),
    )
    .await?;
    fanout.start(loops);
    let admin = AdminService::new(store.clone(), node.config.node_id.clone(), token.clone());
    let services =
        tonic::service::Routes::new(FanoutService::new(fanout.clone()).into_server(token))
            .add_service(admin.into_server());
    node.serve_until_stopped(internal, services, async {
        tracing::info!("stopping: giving the fanout shards back, then leaving the cluster");
        if let Err(e) = fanout.release().await {
            tracing::warn!(error = %e, "giving the fanout shards back failed; they lapse with their leases");
        }
    })
    .await
}

/// The chat role alone until SIGTERM or Ctrl-C: serves the chat service to the gateway nodes
/// on `internal`; appends go to the shards' owners, commit notices to the fanout nodes,
/// typing, receipts and unlinks to the gateway nodes. Sends are refused while the cluster's
/// fanout is too far behind, as on a gateway node (the registry is read every lease round).
/// On stop, the calls in flight are answered (at most 10 s) before the node leaves.
async fn run_chat(
    node: InternalNode<'_>,
    token: ClusterToken,
    internal: tokio::net::TcpListener,
    loops: &BackgroundLoops,
) -> anyhow::Result<()> {
    let (config, store) = (node.config, node.store);
    let gateways = Arc::new(ClusterGateways::new(store.clone(), None, token.clone()));
    let sequencer = serve::routed_sequencer(store, &token, None, Vec::new(), loops);
    let storage = StorageHealth::new(store.clone(), None, config.min_free_disk, None, 0);
    storage.start(loops);
    let chat = serve::start_chat(serve::ChatRole {
        config,
        store,
        sequencer,
        gateways,
        membership: Arc::new(MembershipCache::checking_heads(store.clone())),
        metrics: node.metrics.clone(),
        storage,
        loops,
        node: &config.node_id,
    });
    let admin = AdminService::new(store.clone(), config.node_id.clone(), token.clone());
    let services = tonic::service::Routes::new(ChatNodeService::new(chat).into_server(token))
        .add_service(admin.into_server());
    node.serve_until_stopped(internal, services, async {
        tracing::info!("stopping: answering the chat calls in flight, then leaving the cluster");
    })
    .await
}

/// A node that serves no clients: what its probes and its ready line say.
struct InternalNode<'a> {
    config: &'a ServeConfig,
    store: &'a MessageStore,
    address: &'a str,
    roles: &'a [String],
    metrics: Arc<Metrics>,
}

impl InternalNode<'_> {
    /// Serves `services` on `internal`, and the probes and metrics on `--listen`, until SIGTERM
    /// or Ctrl-C; then answers not ready, runs `stopping`, and stops serving.
    async fn serve_until_stopped(
        self,
        internal: tokio::net::TcpListener,
        services: tonic::service::Routes,
        stopping: impl Future<Output = ()>,
    ) -> anyhow::Result<()> {
        let (stop_internal, internal_stopped) = tokio::sync::oneshot::channel::<()>();
        let incoming = TcpIncoming::from(internal).with_nodelay(Some(true));
        let server = tokio::spawn(
            tonic::transport::Server::builder()
                .add_routes(services)
                .serve_with_incoming_shutdown(incoming, async {
                    let _ = internal_stopped.await;
                }),
        );
        // Probes and metrics on `--listen` (the internal port speaks gRPC only).
        let ready = Arc::new(AtomicBool::new(true));
        let listen = self.config.listen;
        let probes_listener = tokio::net::TcpListener::bind(listen)
            .await
            .with_context(|| format!("listening on {listen} for probes and metrics"))?;
        let probes = probes_listener.local_addr()?;
        let probes_server = tokio::spawn(
            axum::serve(
                probes_listener,
                probe_router(self.store.clone(), self.metrics, ready.clone()),
            )
            .into_future(),
        );
        let stop_signal = serve::shutdown_signal()?;
        tracing::info!(
            node = %self.config.node_id,
            roles = %self.roles.join(","),
            %probes,
            "courier node ready on internal {} probes {probes}",
            self.address
        );
        stop_signal.await;
        ready.store(false, Ordering::Release);
        stopping.await;
        let _ = stop_internal.send(());
        let _ = tokio::time::timeout(Duration::from_secs(10), server).await;
        probes_server.abort();
        Ok(())
    }
}

/// Refuses to start a node whose roles would clash with a live node of the cluster: a second
/// node keeping media bytes in a directory of its own (each would hold different media). Push
/// nodes may be several: one at a time leads the notifier (`courier_store::leaders`).
async fn refuse_conflicting_nodes(args: &NodeArgs, store: &MessageStore) -> anyhow::Result<()> {
    let config = &args.serve;
    let now = now_ms();
    let live: Vec<(String, NodeRecord)> = store
        .nodes()
        .await?
        .into_iter()
        .filter(|(id, node)| *id != config.node_id && node.is_live(now))
        .collect();
    let runs = |node: &NodeRecord, role: Role| node.roles.iter().any(|r| r == role.name());
    let private_media = config.media.media_s3_bucket.is_none() && config.media.media_dir.is_none();
    if args.has(Role::Media)
        && private_media
        && let Some((id, _)) = live.iter().find(|(_, node)| runs(node, Role::Media))
    {
        anyhow::bail!(
            "node {id} also serves media, and this node would keep media bytes in its own data \
             directory: give every media node the same --media-s3-bucket, or the same \
             --media-dir on a shared filesystem"
        );
    }
    Ok(())
}

/// `/healthz` (200 unless the store halted), `/readyz` (200 until the node drains) and
/// `/metrics` (OpenMetrics text) of a node that serves no clients.
fn probe_router(store: MessageStore, metrics: Arc<Metrics>, ready: Arc<AtomicBool>) -> Router {
    Router::new()
        .route(
            "/healthz",
            get(move || async move {
                match store.halted() {
                    None => (StatusCode::OK, "ok".to_owned()),
                    Some(why) => (StatusCode::SERVICE_UNAVAILABLE, why),
                }
            }),
        )
        .route(
            "/readyz",
            get(move || async move {
                if ready.load(Ordering::Acquire) {
                    StatusCode::OK
                } else {
                    StatusCode::SERVICE_UNAVAILABLE
                }
            }),
        )
        .route(
            "/metrics",
            get(move || async move {
                (
                    [(
                        header::CONTENT_TYPE,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    )],
                    metrics.render(),
                )
            }),
        )
}

/// How many leases after its lapse a node's record leaves the registry: long past any
/// failover (a lease) and any sweep of its routes (every lease round), yet soon enough that the
/// registry of a cluster whose pods come and go stays small (10 s leases: 100 s).
pub const FORGET_AFTER_LEASES: u64 = 10;

/// Every how many rounds of its registration (a third of a lease each) a node looks for dead
/// nodes to forget: once a lease, so that the cluster's nodes read the registry for it
/// `nodes / lease` times a second in all.
const FORGET_EVERY_ROUNDS: u32 = 3;

/// Forgets the nodes whose lease lapsed more than [`FORGET_AFTER_LEASES`] leases before `now`
/// (`courier_store::nodes`: fenced and idempotent, so every node may do it at once). A failure
/// is logged; the next round tries again.
async fn forget_dead_nodes(store: &MessageStore, node: &str, now: u64, lease_ms: u64) {
    let lapsed_before = now.saturating_sub(FORGET_AFTER_LEASES.saturating_mul(lease_ms));
    match store.forget_lapsed_nodes(lapsed_before, node).await {
        Ok(forgotten) if !forgotten.is_empty() => {
            tracing::info!(nodes = ?forgotten, "forgot nodes whose lease lapsed {FORGET_AFTER_LEASES} leases ago");
        }
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "forgetting dead nodes failed; retrying next lease"),
    }
}

/// `record` alive until `lease_until_ms`.
fn leased(record: &NodeRecord, lease_until_ms: u64) -> NodeRecord {
    NodeRecord {
        lease_until_ms,
        ..record.clone()
    }
}
