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
//! - `media` (alone): the client media endpoints (`/v1/media*`, `media_api.rs`) on `--listen`,
//!   with the probes (and `/metrics` without `--metrics-listen`); who may read what is asked of
//!   the chat nodes. It registers the address of its HTTP port (`--advertise-http`) for the
//!   gateway nodes that forward media requests. Any number may run; media bytes must be shared (S3, or the same `--media-dir` on
//!   a shared filesystem) when several nodes serve media;
//! - `push` (alone): the push notifier, with the providers it registers for the other nodes
//!   (they accept device registrations for those). Connected devices are read from the route
//!   store. Several may run; one at a time leads the notifier;
//! - `gateway` (the client port), optionally with `chat`, `media`, `fanout` and `push`:
//!   clients connect here; with `chat` their requests are handled in process (and the node
//!   serves the chat service too), without it they go to the live chat nodes of the registry
//!   (`courier_rpc::ClusterChat`); without `media`, media requests are forwarded to the live
//!   media nodes (`media_proxy.rs`); deliveries come from the fanout nodes over internal gRPC.
//!   Any number of such nodes may run.
//!
//! Every node registers itself in the store (id, roles, internal address, lease) and renews
//! its registration every third of `--shard-lease`; a node that dies is seen as gone once it
//! lapses, and is forgotten (its record removed) [`FORGET_AFTER_LEASES`] leases later by the
//! registration loops of the live nodes. A node whose lease another node ended (a fanout node
//! that could not deliver to this gateway, `courier_rpc::delivery`) sees it at its next
//! renewal, by the lease it finds shorter than the one it wrote, takes it for a lapse (a
//! gateway tells its connections to reconnect, and answers not ready for
//! [`ENDED_LEASE_HOLD_DOWN`], so that they go elsewhere) and registers again. Every node
//! serves the admin API (`admin.rs`) on its internal port. A cluster node needs a store it
//! shares with the others, its own `--node-id`, and the cluster token.

use crate::admin::AdminService;
use crate::config::{DRAIN_TAIL, ServeConfig, StoreKind, same_port};
use crate::media_api::{self, MediaApi};
use crate::serve::{self, Cluster, StopSignal};
use anyhow::Context as _;
use axum::Router;
use axum::http::StatusCode;
use axum::routing::get;
use clap::{Args, ValueEnum};
use courier_chat::ChatBinding;
use courier_core::clock::now_ms;
use courier_core::context::Context;
use courier_core::leases::JobLead;
use courier_core::loops::BackgroundLoops;
use courier_core::membership::MembershipCache;
use courier_core::metrics::Metrics;
use courier_core::sequencing::Listeners;
use courier_core::storage_health::StorageHealth;
use courier_fanout::Fanout;
use courier_media::MediaService;
use courier_push::Notifier;
use courier_push::providers::PushProviders;
use courier_rpc::delivery::GATEWAY_UNREACHABLE_AFTER;
use courier_rpc::directory::DIRECTORY_TTL;
use courier_rpc::{
    ChatNodeService, ClusterChat, ClusterGateways, ClusterToken, FanoutService, SequencerService,
};
use courier_sequencer::LocalSequencer;
use courier_store::leaders::Job;
use courier_store::nodes::{Claim, NodeRecord};
use courier_store::{MessageStore, StoreError};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

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
    pub fn name(self) -> &'static str {
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

/// `courier node`.
#[derive(Debug, Args)]
pub struct NodeArgs {
    /// The roles this node runs: one of `sequencer`, `chat`, `fanout`, `push` and `media`
    /// alone, or `gateway` with any of `chat`, `media`, `fanout` and `push` (without `chat`
    /// its clients' requests go to the chat nodes, without `media` to the media nodes).
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
    /// address `--internal-listen` bound (which must then not be a wildcard such as 0.0.0.0).
    #[arg(long, env = "COURIER_ADVERTISE")]
    pub advertise: Option<String>,
    /// The address (`host:port`) gateway nodes reach this node's HTTP port (`--listen`) at, to
    /// forward media requests to a node running `media`; default: the address `--listen`
    /// bound (which must then not be a wildcard such as 0.0.0.0).
    #[arg(long, env = "COURIER_ADVERTISE_HTTP")]
    pub advertise_http: Option<String>,
    #[command(flatten)]
    pub serve: ServeConfig,
}

impl NodeArgs {
    fn has(&self, role: Role) -> bool {
        self.roles.contains(&role)
    }

    /// Whether clients reach this node over HTTP (and so it verifies client tokens).
    fn serves_clients(&self) -> bool {
        self.has(Role::Gateway) || self.has(Role::Media)
    }

    /// The address of this node's HTTP port, `http`, as gateway nodes reach it: registered by
    /// a media node (for the others, empty).
    fn http_address(&self, http: &tokio::net::TcpListener) -> anyhow::Result<String> {
        if !self.has(Role::Media) {
            return Ok(String::new());
        }
        if let Some(address) = &self.advertise_http {
            return Ok(address.clone());
        }
        let bound = http.local_addr()?;
        anyhow::ensure!(
            !bound.ip().is_unspecified(),
            "a media node listening on {bound} must say where the gateway nodes reach its HTTP \
             port: give --advertise-http HOST:PORT (in Kubernetes, the pod IP)"
        );
        Ok(bound.to_string())
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
        let mut distinct = self.roles.clone();
        distinct.sort_by_key(|r| r.name());
        distinct.dedup();
        anyhow::ensure!(
            self.has(Role::Gateway) || distinct.len() == 1,
            "a node without the gateway role runs one role alone: --roles sequencer, chat, \
             fanout, push or media (the gateway role runs with any of chat, media, fanout and \
             push)"
        );
        anyhow::ensure!(
            !self.has(Role::Sequencer) || distinct.len() == 1,
            "a sequencer node runs the sequencer role alone: --roles sequencer"
        );
        anyhow::ensure!(
            !self.serves_clients()
                || config.jwt_secret.is_some()
                || !config.jwt_public_key.is_empty()
                || config.jwt_jwks_url.is_some(),
            "the nodes of a cluster must verify the same client tokens: give --jwt-secret \
             (or --jwt-public-key, or --jwt-jwks-url); a secret generated per data directory \
             would differ per node"
        );
        // The other nodes call this one at the address it registers: `0.0.0.0` would have
        // them call themselves (as `--advertise-http` is refused for a media node's port).
        anyhow::ensure!(
            self.advertise.is_some() || !self.internal_listen.ip().is_unspecified(),
            "a node whose --internal-listen is {} must say where the other nodes reach it: give \
             --advertise HOST:PORT (in Kubernetes, the pod IP)",
            self.internal_listen
        );
        if let Some(metrics) = config.metrics_listen {
            anyhow::ensure!(
                !same_port(metrics, self.internal_listen),
                "--metrics-listen {metrics} is the port of --internal-listen {}: give /metrics \
                 a port of its own",
                self.internal_listen
            );
        }
        if self.has(Role::Gateway) {
            config.drain(true)?;
        }
        Ok(())
    }
}

/// Runs the node until SIGTERM or Ctrl-C.
pub async fn run(args: NodeArgs) -> anyhow::Result<()> {
    // First: a SIGTERM from now on stops the process cleanly, whatever it is doing.
    let stop = StopSignal::install()?;
    tracing::info!(pid = std::process::id(), node = %args.serve.node_id, "courier node starting");
    args.validate()?;
    args.serve.validate()?;
    let config = &args.serve;
    let token = config.cluster.token()?;
    let Some(store) = stop.unless_stopped(serve::open_store(config)).await else {
        return Ok(());
    };
    // Backups are `courier serve`'s, on its embedded store.
    let (store, _) = store?;

    let internal = tokio::net::TcpListener::bind(args.internal_listen)
        .await
        .with_context(|| format!("binding the internal address {}", args.internal_listen))?;
    let address = match &args.advertise {
        Some(address) => address.clone(),
        None => internal.local_addr()?.to_string(),
    };
    // The HTTP port is bound before the node registers, so that the address it registers
    // takes connections from then on.
    let http = serve::bind_http(config.listen, config.listen_backlog)?;
    let metrics_listener = serve::bind_metrics(config)?;
    let push = match args.has(Role::Push) {
        true => Some(Arc::new(PushProviders::from_config(&config.push)?)),
        false => None,
    };
    let roles: Vec<String> = args.roles.iter().map(|r| r.name().to_owned()).collect();
    let registration = NodeRecord {
        roles: roles.clone(),
        address: address.clone(),
        lease_until_ms: 0,
        started_ms: now_ms(),
        connections: 0,
        http_address: args.http_address(&http)?,
        push_providers: push.as_ref().map_or_else(Vec::new, |providers| {
            providers
                .configured()
                .into_iter()
                .map(str::to_owned)
                .collect()
        }),
        instance: rand::random::<u64>() | 1,
    };
    let lease = config.shard_lease;
    let lease_ms = lease.as_millis() as u64;
    // Given up, it registered nothing: the claim writes the record only once it may.
    let claim = async {
        refuse_conflicting_nodes(&args, &store).await?;
        claim_node_id(&store, &config.node_id, &registration, lease_ms).await
    };
    let Some(claimed) = stop.unless_stopped(claim).await else {
        serve::stop_store_client(config);
        return Ok(());
    };
    claimed?;
    // The node's own loops: its registration, and (below) its shard leases.
    let loops = BackgroundLoops::new();
    let notices = Arc::new(RegistrationNotices::default());
    // Set when the node leaves: its registration ends at once and is renewed no more. The
    // sender lives as long as the node (the renewal waits on it).
    let (leave, leaving) = tokio::sync::watch::channel(false);
    // The node's metrics: its roles' and the connections its registration reports.
    let metrics = Arc::new(Metrics::new());
    serve::report_store(config, &store, &metrics);
    keep_registration(
        &loops,
        Registered {
            store: store.clone(),
            node: config.node_id.clone(),
            record: registration.clone(),
            lease,
        },
        notices.clone(),
        Some(metrics.clone()),
        leaving,
    );

    let result = if args.has(Role::Gateway) {
        let cluster = Cluster {
            token,
            fanout: args.has(Role::Fanout),
            chat: args.has(Role::Chat),
            push,
            media: args.has(Role::Media),
            internal,
            registration: notices,
            metrics,
        };
        tracing::info!(node = %config.node_id, roles = %roles.join(","), "courier node: internal gRPC on {address}");
        let (config, store) = (config.clone(), store.clone());
        serve::run_client_roles(config, store, http, metrics_listener, Some(cluster), stop).await
    } else {
        let limits = crate::http_server::ConnectionLimits::new(config.http_write_timeout);
        let metrics_routes = serve::metrics_routes(metrics_listener, &metrics, &loops, limits)?;
        let node = InternalNode {
            config,
            store: &store,
            address: &address,
            roles: &roles,
            metrics,
            http,
            metrics_routes,
            leave: (args.has(Role::Chat) || args.has(Role::Media)).then_some(&leave),
            stop,
        };
        // Without the gateway, a node runs one role (`NodeArgs::validate`).
        match args.roles[0] {
            Role::Chat => run_chat(node, token, internal, &loops).await,
            Role::Fanout => run_fanout(node, token, internal, &loops).await,
            Role::Media => run_media(node, token, internal, &loops).await,
            Role::Push => run_push(node, token, internal, push.unwrap_or_default(), &loops).await,
            _ => run_sequencer(node, token, internal, &loops).await,
        }
    };
    loops
        .shutdown(tokio::time::Instant::now() + Duration::from_secs(5))
        .await;
    // The record says when the node left: a sweep clears the routes written before that, and
    // the registry forgets it `FORGET_AFTER_LEASES` leases later.
    let ended = end_registration(&store, &config.node_id, &registration).await;
    serve::stop_store_client(config);
    ended?;
    result
}

/// How long a gateway node whose lease another node ended (a fanout node that could not
/// deliver to it, `courier_rpc::delivery`) answers `/readyz` 503, from the last ending it saw:
/// twice [`GATEWAY_UNREACHABLE_AFTER`] (30 s). It tells its clients to reconnect; ready, it
/// got many of them back through the load balancer, and while it stayed unreachable it had
/// its lease ended, and told them again, every 15 s, for good. Not ready, Kubernetes takes it
/// out of its Service and they connect elsewhere. Each ending seen again (it still takes no
/// delivery) starts the hold-down over; its liveness (`/healthz`) stays, as a restart cures no
/// network.
pub const ENDED_LEASE_HOLD_DOWN: Duration = GATEWAY_UNREACHABLE_AFTER.saturating_mul(2);

/// What a node's registration loop tells the rest of the node ([`keep_registration`]).
#[derive(Default)]
pub struct RegistrationNotices {
    /// Notified when a renewal found the record lapsed, or its lease ended by another node:
    /// deliveries may have skipped the node's connections meanwhile (a gateway tells them to
    /// reconnect).
    pub lapsed: tokio::sync::Notify,
    /// When another node last ended this node's lease: a gateway is not ready for
    /// [`ENDED_LEASE_HOLD_DOWN`] after.
    pub ended: EndedLease,
}

/// The last time a node saw its lease ended by another node, and the readiness it implies
/// ([`ENDED_LEASE_HOLD_DOWN`]).
#[derive(Debug, Default)]
pub struct EndedLease(std::sync::Mutex<Option<Instant>>);

impl EndedLease {
    /// The node saw its lease ended at `at`.
    pub fn ended(&self, at: Instant) {
        let mut last = self.0.lock().unwrap_or_else(|e| e.into_inner());
        *last = Some(last.map_or(at, |last| last.max(at)));
    }

    /// Whether the node is held out of its load balancer at `now`: less than
    /// [`ENDED_LEASE_HOLD_DOWN`] after the last ending it saw.
    pub fn holds_down(&self, now: Instant) -> bool {
        let last = *self.0.lock().unwrap_or_else(|e| e.into_inner());
        last.is_some_and(|ended| now < ended + ENDED_LEASE_HOLD_DOWN)
    }
}

/// The node's registration loop: renews `registration` as `node` every third of `lease`
/// (with the connections open, from `metrics`) until `leaving` is set, then ends it. A
/// renewal that finds the lease lapsed, or ended by another node, tells `notices` (a gateway
/// tells its connections to reconnect, and after an ending answers not ready for a while).
/// Once a lease, forgets the dead nodes. A process that finds its id taken by another while
/// its lease had lapsed exits.
async fn renew_registration(
    store: &MessageStore,
    node: &str,
    registration: &NodeRecord,
    lease: Duration,
    notices: &RegistrationNotices,
    metrics: Option<&Metrics>,
    leaving: &mut tokio::sync::watch::Receiver<bool>,
) {
    let lease_ms = lease.as_millis() as u64;
    let mut rounds = tokio::time::interval(lease / 3);
    let mut deadline = now_ms() + lease_ms;
    // The lease this loop last wrote: a record found with a shorter one had its lease ended by
    // another node (a fanout node that could not reach this one). A restarted loop knows none
    // until its first renewal.
    let mut written: Option<u64> = None;
    let mut round: u32 = 0;
    rounds.tick().await;
    loop {
        tokio::select! {
            _ = rounds.tick() => {}
            _ = leaving.wait_for(|leaving| *leaving) => break,
        }
        let now = now_ms();
        let record = NodeRecord {
            connections: metrics.map_or(0, |m| m.connections.get().max(0) as u64),
            ..leased(registration, now + lease_ms)
        };
        let claim = store.claim_node(node, &record, now).await;
        // The write landed at the latest now: the lease it renewed lapsed meanwhile if it ran
        // out before (the other nodes may have seen it lapsed, skipped this node's deliveries
        // and swept its routes). Judged by the time the renewal began, a slow write would hide
        // that lapse.
        let renewed_by = now_ms();
        match claim {
            Ok(Claim::HeldBy(other)) => {
                // This process's lease had lapsed (it was paused, or cut off from the store)
                // and another process took the id: two processes must never serve as one node.
                tracing::error!(
                    node = %node,
                    other = %other.address,
                    "another process registered as this node while its lease had lapsed; exiting"
                );
                std::process::exit(1);
            }
            Ok(Claim::Registered {
                replaced_lease_until_ms,
            }) => {
                let ended = replaced_lease_until_ms
                    .zip(written)
                    .is_some_and(|(found, wrote)| found < wrote);
                if ended {
                    // Compared with what this process wrote, not with a clock: seen whatever
                    // the two nodes' clocks say.
                    tracing::warn!(
                        ended_at_ms = replaced_lease_until_ms,
                        hold_down_ms = ENDED_LEASE_HOLD_DOWN.as_millis() as u64,
                        "another node ended this node's lease (fanout could not deliver to it): registering again, not ready meanwhile"
                    );
                    notices.ended.ended(Instant::now());
                    notices.lapsed.notify_one();
                } else if renewed_by >= deadline {
                    tracing::warn!(
                        late_ms = renewed_by - deadline,
                        "the node's registration had lapsed (paused, or cut off from the store)"
                    );
                    notices.lapsed.notify_one();
                }
                deadline = now + lease_ms;
                written = Some(record.lease_until_ms);
            }
            Err(e) => {
                tracing::warn!(error = %e, "renewing the node's registration failed; retrying")
            }
        }
        round += 1;
        if round.is_multiple_of(FORGET_EVERY_ROUNDS) {
            forget_dead_nodes(store, node, now, lease_ms).await;
        }
    }
    // Left: the callers that find this node in the registry stop choosing it.
    if let Err(e) = end_registration(store, node, registration).await {
        tracing::warn!(error = %e, "ending the node's registration failed; it lapses with its lease");
    }
}

/// Ends `node`'s record now: the callers that find it in the registry stop choosing it, a
/// sweep clears the routes written before, and a restart need not wait for it to lapse.
pub async fn end_registration(
    store: &MessageStore,
    node: &str,
    registration: &NodeRecord,
) -> Result<(), StoreError> {
    let now = now_ms();
    store
        .claim_node(node, &leased(registration, now), now)
        .await
        .map(drop)
}

/// Registers the node as `node_id`, unless another live process runs under that id
/// ([`claim_waiting_out`]): its shards and routes would be taken back and forth between the
/// two.
async fn claim_node_id(
    store: &MessageStore,
    node_id: &str,
    registration: &NodeRecord,
    lease_ms: u64,
) -> anyhow::Result<()> {
    match claim_waiting_out(store, node_id, registration, lease_ms, None).await? {
        None => Ok(()),
        Some((_, other)) => anyhow::bail!(
            "another process runs as node {node_id} (at {}): give every node its own --node-id",
            other.address
        ),
    }
}

/// The role a `courier serve` on a shared store registers under: no cluster node's role, so
/// no node counts it as one of theirs (a fanout's fair share, a chat or media directory).
pub const SERVE_ROLE: &str = "serve";

/// Registers a `courier serve` on a store other processes reach (`--store remote` or `fdb`) as
/// `node_id`, unless another process serves that store: one registered live as `node_id`, or
/// as another `courier serve` ([`claim_waiting_out`]). Each would take every shard in turn
/// from the other, so half the sends were refused, and each would deliver only to its own
/// connections.
pub async fn claim_the_server(
    store: &MessageStore,
    node_id: &str,
    registration: &NodeRecord,
    lease_ms: u64,
) -> anyhow::Result<()> {
    match claim_waiting_out(store, node_id, registration, lease_ms, Some(SERVE_ROLE)).await? {
        None => Ok(()),
        Some((id, other)) => anyhow::bail!(
            "another process serves this store (node {id} at {}): one `courier serve` per \
             store; to serve it from several processes, run a cluster of `courier node`s \
             (docs/distributed.md)",
            other.address
        ),
    }
}

/// Registers `registration` as `node_id`, unless a live record of another process stands in
/// the way: the id's own, or (with `rival_role`) any record under that role. Such a record is
/// waited out first, as the run before this one leaves it when it was killed; if it is renewed
/// meanwhile, another process holds it: its id and record are returned, and nothing is
/// registered.
async fn claim_waiting_out(
    store: &MessageStore,
    node_id: &str,
    registration: &NodeRecord,
    lease_ms: u64,
    rival_role: Option<&str>,
) -> anyhow::Result<Option<(String, NodeRecord)>> {
    let mut waited_for: Option<(String, u64)> = None;
    loop {
        let now = now_ms();
        let rival = match rival_role {
            Some(role) => store.nodes().await?.into_iter().find(|(id, node)| {
                node.instance != registration.instance
                    && node.is_live(now)
                    && (id == node_id || node.roles.iter().any(|r| r == role))
            }),
            None => None,
        };
        let (id, other) = match rival {
            Some(rival) => rival,
            None => match store
                .claim_node(node_id, &leased(registration, now + lease_ms), now)
                .await?
            {
                Claim::Registered { .. } => return Ok(None),
                Claim::HeldBy(other) => (node_id.to_owned(), other),
            },
        };
        if waited_for
            .as_ref()
            .is_some_and(|(waited, until)| *waited == id && other.lease_until_ms > *until)
        {
            return Ok(Some((id, other)));
        }
        let wait = other.lease_until_ms.saturating_sub(now) + CLAIM_MARGIN_MS;
        tracing::warn!(
            node = %id,
            other = %other.address,
            wait_ms = wait,
            "another process is registered live in this process's way: waiting for its lease \
             to lapse (the run before this one, killed?)"
        );
        waited_for = Some((id, other.lease_until_ms));
        tokio::time::sleep(Duration::from_millis(wait)).await;
    }
}

/// A process's record in the node registry, as it claimed it ([`claim_node_id`]).
pub struct Registered {
    pub store: MessageStore,
    pub node: String,
    pub record: NodeRecord,
    /// How long the record stays live without renewal (`--shard-lease`).
    pub lease: Duration,
}

/// Renews `registered` every third of its lease, in a loop of `loops`, with the connections
/// `metrics` count (none without); tells `notices` when a renewal found the record had
/// lapsed, or ended by another node, meanwhile; exits the process if another process took
/// the id then (two processes must never serve as one node); and forgets dead nodes once a
/// lease. Once `leaving` is set, the record ends at once and is renewed no more.
pub fn keep_registration(
    loops: &BackgroundLoops,
    registered: Registered,
    notices: Arc<RegistrationNotices>,
    metrics: Option<Arc<Metrics>>,
    leaving: tokio::sync::watch::Receiver<bool>,
) {
    let Registered {
        store,
        node,
        record: registration,
        lease,
    } = registered;
    // Stops at once when cancelled; restarted if it fails: it keeps no state (a restarted
    // loop counts its lease from its start and knows no lease it wrote, so it may miss a lapse
    // of the run before, or its lease ended by another node: the next one ended is seen).
    loops.spawn("renew node registration", move |cancel| {
        let (store, node, registration) = (store.clone(), node.clone(), registration.clone());
        let (notices, metrics, mut leaving) = (notices.clone(), metrics.clone(), leaving.clone());
        async move {
            let renew = async {
                renew_registration(
                    &store,
                    &node,
                    &registration,
                    lease,
                    &notices,
                    metrics.as_deref(),
                    &mut leaving,
                )
                .await;
                std::future::pending::<()>().await;
            };
            cancel.run_until_cancelled(renew).await;
        }
    });
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
    node.serve_until_stopped(internal, services, Router::new(), async {
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
    let context = Context {
        store: store.clone(),
        gateways,
        membership: Arc::new(MembershipCache::new(store.clone())),
        metrics: node.metrics.clone(),
    };
    let fanout = Fanout::new(context, node.config.fanout_config(true)).await?;
    fanout.start(loops);
    let admin = AdminService::new(store.clone(), node.config.node_id.clone(), token.clone());
    let services =
        tonic::service::Routes::new(FanoutService::new(fanout.clone()).into_server(token))
            .add_service(admin.into_server());
    node.serve_until_stopped(internal, services, Router::new(), async {
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
    let sequencer =
        serve::routed_sequencer(store, &token, &config.node_id, None, Vec::new(), loops);
    let storage = StorageHealth::new(store.clone(), None, config.min_free_disk, None, 0);
    storage.start(loops);
    let chat = serve::start_chat(serve::ChatRole {
        config,
        context: Context {
            store: store.clone(),
            gateways,
            membership: Arc::new(MembershipCache::checking_heads(store.clone())),
            metrics: node.metrics.clone(),
        },
        sequencer,
        storage,
        loops,
        node: &config.node_id,
    });
    let admin = AdminService::new(store.clone(), config.node_id.clone(), token.clone());
    let services = tonic::service::Routes::new(ChatNodeService::new(chat).into_server(token))
        .add_service(admin.into_server());
    node.serve_until_stopped(internal, services, Router::new(), async {
        tracing::info!("stopping: answering the chat calls in flight, then leaving the cluster");
    })
    .await
}

/// The media role alone until SIGTERM or Ctrl-C: the client media endpoints on `--listen`
/// (`media_api.rs`; who may read a conversation's media is asked of the chat nodes), the media
/// sweeper while this node leads it, and the admin API on `internal`. On stop it answers not
/// ready and finishes the transfers in flight (at most `--drain-timeout`).
async fn run_media(
    node: InternalNode<'_>,
    token: ClusterToken,
    internal: tokio::net::TcpListener,
    loops: &BackgroundLoops,
) -> anyhow::Result<()> {
    let (config, store) = (node.config, node.store);
    let storage = StorageHealth::new(
        store.clone(),
        None,
        config.min_free_disk,
        config.media.local_dir(&config.data_dir),
        config.media.media_min_free_disk,
    );
    storage.start(loops);
    let chat = ChatBinding::Remote(Arc::new(ClusterChat::new(store.clone(), token.clone())));
    let media = MediaService::open(
        config.media.clone(),
        &config.data_dir,
        store.clone(),
        chat,
        node.metrics.clone(),
        storage,
    )?;
    media.start_sweeper(
        loops,
        JobLead {
            store: store.clone(),
            job: Job::MediaSweep,
            node: config.node_id.clone(),
        },
    );
    let verifier = serve::verifier(config)?;
    let auth = serve::client_auth(config, verifier, store, &node.metrics, loops).await?;
    let routes = media_api::router(Arc::new(MediaApi { media, auth }));
    let admin = AdminService::new(store.clone(), config.node_id.clone(), token).into_server();
    node.serve_until_stopped(
        internal,
        tonic::service::Routes::new(admin),
        routes,
        async {
            tracing::info!(
                "stopping: finishing the media transfers in flight, then leaving the cluster"
            );
        },
    )
    .await
}

/// The push notifier alone until SIGTERM or Ctrl-C, sending with `providers`: while this node
/// leads the notifier, the chat nodes tell it of the shards they commit to (`Fanout.Committed`
/// on `internal`), and it expands every shard's outbox each lease round besides (for a
/// lost notice); it sends them, skipping the devices connected at that moment (read from the
/// route store). The admin API on `internal`.
async fn run_push(
    node: InternalNode<'_>,
    token: ClusterToken,
    internal: tokio::net::TcpListener,
    providers: Arc<PushProviders>,
    loops: &BackgroundLoops,
) -> anyhow::Result<()> {
    let (config, store) = (node.config, node.store);
    let gateways = Arc::new(ClusterGateways::new(store.clone(), None, token.clone()));
    tracing::info!(providers = ?providers.configured(), "push providers");
    let context = Context {
        store: store.clone(),
        gateways,
        membership: Arc::new(MembershipCache::checking_heads(store.clone())),
        metrics: node.metrics.clone(),
    };
    let notifier = Notifier::new(
        context,
        providers,
        config.notifier.clone(),
        config.push.push_include_text,
        config.large_group_threshold,
    );
    notifier.start(
        loops,
        Some(config.ownership().round()),
        Some(JobLead {
            store: store.clone(),
            job: Job::Push,
            node: config.node_id.clone(),
        }),
    );
    let notices = FanoutService::new(notifier).into_server(token.clone());
    let admin = AdminService::new(store.clone(), config.node_id.clone(), token).into_server();
    node.serve_until_stopped(
        internal,
        tonic::service::Routes::new(admin).add_service(notices),
        Router::new(),
        async {
            tracing::info!(
                "stopping: the notifier finishes its pass, then the node leaves the cluster"
            );
        },
    )
    .await
}

/// A node that serves no clients: what its probes and its ready line say.
struct InternalNode<'a> {
    config: &'a ServeConfig,
    store: &'a MessageStore,
    address: &'a str,
    roles: &'a [String],
    metrics: Arc<Metrics>,
    /// The HTTP port (`--listen`): probes, `metrics_routes`, and a media node's client
    /// endpoints.
    http: tokio::net::TcpListener,
    /// What the HTTP port serves of the metrics: `/metrics`, or nothing with
    /// `--metrics-listen` ([`serve::metrics_routes`]).
    metrics_routes: Router,
    /// For a node its callers find in the registry (chat, media: `NodeDirectory`): ends its
    /// registration, [`LEAVE_NOTICE`] before it stops serving.
    leave: Option<&'a tokio::sync::watch::Sender<bool>>,
    /// SIGTERM or Ctrl-C, installed as the process started.
    stop: StopSignal,
}

/// How long a node its callers find in the registry (chat, media) serves on after it left the
/// registry: the callers' copies of the registry expire meanwhile ([`DIRECTORY_TTL`]), so none
/// still chooses it when it stops taking connections.
const LEAVE_NOTICE: Duration = DIRECTORY_TTL.saturating_add(Duration::from_secs(1));

impl InternalNode<'_> {
    /// Serves `services` on `internal`, and `routes` with the probes (and the metrics, without
    /// `--metrics-listen`) on `--listen`, until SIGTERM or Ctrl-C; then answers not ready, runs
    /// `stopping`, and stops serving: the internal calls in flight get up to 10 s, the HTTP
    /// requests in flight (a media transfer) up to `--drain-timeout` (default [`DRAIN_TAIL`]).
    async fn serve_until_stopped(
        self,
        internal: tokio::net::TcpListener,
        services: tonic::service::Routes,
        routes: Router,
        stopping: impl Future<Output = ()>,
    ) -> anyhow::Result<()> {
        let http_grace = self.config.drain_timeout.unwrap_or(DRAIN_TAIL);
        let (stop_internal, internal_stopped) = tokio::sync::oneshot::channel::<()>();
        let incoming = courier_rpc::stall::bounded_incoming(internal, courier_rpc::stall::INTERNAL);
        let server = tokio::spawn(
            courier_rpc::internal_server()
                .add_routes(services)
                .serve_with_incoming_shutdown(incoming, async {
                    let _ = internal_stopped.await;
                }),
        );
        // Probes (and metrics) on `--listen` (the internal port speaks gRPC only); what no
        // route takes is refused with the protocol's body, as on a gateway's client port.
        let ready = Arc::new(AtomicBool::new(true));
        let probes = self.http.local_addr()?;
        let (stop_http, http_stopped) = tokio::sync::oneshot::channel::<()>();
        let app = routes
            .merge(probe_router(self.store.clone(), ready.clone()))
            .merge(self.metrics_routes);
        let app = crate::http::with_web_app(app, None);
        let limits = crate::http_server::ConnectionLimits::new(self.config.http_write_timeout);
        let http_server = tokio::spawn(crate::http_server::serve(self.http, app, limits, async {
            let _ = http_stopped.await;
        }));
        let stop_signal = self.stop.stopped();
        tracing::info!(
            node = %self.config.node_id,
            roles = %self.roles.join(","),
            %probes,
            "courier node ready on internal {} probes {probes}",
            self.address
        );
        stop_signal.await;
        ready.store(false, Ordering::Release);
        if let Some(leave) = self.leave {
            let _ = leave.send(true);
            tokio::time::sleep(LEAVE_NOTICE).await;
        }
        let http_deadline = tokio::time::Instant::now() + http_grace;
        stopping.await;
        let _ = stop_internal.send(());
        let _ = stop_http.send(());
        let _ = tokio::time::timeout(Duration::from_secs(10), server).await;
        if tokio::time::timeout_at(http_deadline, http_server)
            .await
            .is_err()
        {
            tracing::warn!("HTTP requests still running at the drain deadline");
        }
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

/// `/healthz` (200 unless the store halted) and `/readyz` (200 until the node drains) of a
/// node that serves no clients.
fn probe_router(store: MessageStore, ready: Arc<AtomicBool>) -> Router {
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
}

/// How many leases after its lapse a node's record leaves the registry: long past any
/// failover (a lease) and any sweep of its routes (every lease round), yet soon enough that the
/// registry of a cluster whose pods come and go stays small (10 s leases: 100 s).
pub const FORGET_AFTER_LEASES: u64 = 10;

/// How long past another process's lease a starting node looks at its id again: clocks of
/// the two processes may differ by this much.
const CLAIM_MARGIN_MS: u64 = 200;

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

#[cfg(test)]
mod tests {
    use super::*;
    use courier_store::faulty_engine::FaultyEngine;

    /// The client nodes of a cluster must verify the same tokens: a secret generated per data
    /// directory would differ per node, so one of `--jwt-secret`, `--jwt-public-key` or
    /// `--jwt-jwks-url` is asked for.
    #[test]
    fn a_client_node_of_a_cluster_names_how_it_verifies_tokens() {
        use clap::Parser;
        #[derive(Parser)]
        struct Node {
            #[command(flatten)]
            args: NodeArgs,
        }
        let validated = |extra: &[&str]| {
            let base = [
                "courier",
                "--roles",
                "gateway",
                "--internal-listen",
                "127.0.0.1:7000",
                "--store",
                "remote",
                "--store-address",
                "http://127.0.0.1:7001",
                "--node-id",
                "gateway-1",
            ];
            let args = base.iter().chain(extra).copied();
            Node::try_parse_from(args).unwrap().args.validate()
        };
        let refused = validated(&[]).unwrap_err().to_string();
        assert!(refused.contains("--jwt-jwks-url"), "{refused}");
        let secret = "s".repeat(32);
        for taken in [
            ["--jwt-secret", secret.as_str()],
            ["--jwt-jwks-url", "https://id.example.com/jwks"],
        ] {
            validated(&taken).unwrap();
        }
    }

    /// A renewal whose write lands after the lease it renews ran out (a slow store) let the
    /// other nodes see the node lapsed meanwhile: they skipped its deliveries and swept its
    /// routes. Judged by the time it began, the node saw no lapse and never told its
    /// connections to reconnect.
    #[tokio::test]
    async fn a_renewal_that_lands_after_the_lease_ran_out_is_a_lapse() {
        let engine = FaultyEngine::new();
        let store = engine.store(8).await;
        let lease = Duration::from_secs(3);
        let lease_ms = lease.as_millis() as u64;
        let registration = NodeRecord {
            roles: vec!["gateway".into()],
            address: "127.0.0.9:7500".into(),
            instance: 7,
            ..NodeRecord::default()
        };
        let now = now_ms();
        store
            .claim_node("g", &leased(&registration, now + lease_ms), now)
            .await
            .unwrap();
        // The first renewal (a third of a lease after the loop began, its lease ending two
        // thirds after) lands four fifths of a lease after it began: past that lease, and
        // before the one it writes, that the next renewals keep.
        engine.before_next_commit(Box::pin(async move {
            let began = now_ms();
            while now_ms() <= began + lease_ms * 4 / 5 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }));
        let notices = Arc::new(RegistrationNotices::default());
        let (_leave, mut leaving) = tokio::sync::watch::channel(false);
        let renewing = {
            let (store, notices) = (store.clone(), notices.clone());
            tokio::spawn(async move {
                let metrics = Metrics::new();
                renew_registration(
                    &store,
                    "g",
                    &registration,
                    lease,
                    &notices,
                    Some(&metrics),
                    &mut leaving,
                )
                .await;
            })
        };
        let seen = tokio::time::timeout(Duration::from_secs(10), notices.lapsed.notified()).await;
        renewing.abort();
        assert!(seen.is_ok(), "the node saw its lease lapse");
    }

    /// The hold-down of a node whose lease another node ended: not ready from the ending it
    /// saw until [`ENDED_LEASE_HOLD_DOWN`] after the last one, whatever order they are told in.
    #[test]
    fn a_node_whose_lease_was_ended_is_held_down_until_the_hold_down_after_the_last_ending() {
        let ended = EndedLease::default();
        let t = Instant::now();
        assert!(!ended.holds_down(t), "never ended: ready");
        ended.ended(t);
        assert!(ended.holds_down(t));
        assert!(ended.holds_down(t + ENDED_LEASE_HOLD_DOWN - Duration::from_millis(1)));
        assert!(!ended.holds_down(t + ENDED_LEASE_HOLD_DOWN), "ready again");
        // Ended again (it still takes no delivery): held down from then.
        let again = t + ENDED_LEASE_HOLD_DOWN / 2;
        ended.ended(again);
        assert!(ended.holds_down(t + ENDED_LEASE_HOLD_DOWN));
        assert!(!ended.holds_down(again + ENDED_LEASE_HOLD_DOWN));
        // An earlier ending told late does not shorten it.
        ended.ended(t);
        assert!(ended.holds_down(again + ENDED_LEASE_HOLD_DOWN - Duration::from_millis(1)));
        assert_eq!(ENDED_LEASE_HOLD_DOWN, Duration::from_secs(30));
    }

    /// A gateway whose lease a fanout node ended told its clients to reconnect, and was
    /// ready at once: through the load balancer they came back to it, and while it stayed
    /// unreachable they were told again 15 s later, for good. Its registration loop now holds
    /// it down (not ready) as well.
    #[tokio::test]
    async fn a_renewal_that_finds_its_lease_ended_by_another_node_holds_the_node_down() {
        let store = FaultyEngine::new().store(8).await;
        let lease = Duration::from_millis(900);
        let lease_ms = lease.as_millis() as u64;
        let registration = NodeRecord {
            roles: vec!["gateway".into()],
            address: "127.0.0.9:7500".into(),
            instance: 7,
            ..NodeRecord::default()
        };
        let now = now_ms();
        let claimed = now + lease_ms;
        store
            .claim_node("g", &leased(&registration, claimed), now)
            .await
            .unwrap();
        let notices = Arc::new(RegistrationNotices::default());
        let (_leave, mut leaving) = tokio::sync::watch::channel(false);
        let renewing = {
            let (store, notices) = (store.clone(), notices.clone());
            tokio::spawn(async move {
                renew_registration(
                    &store,
                    "g",
                    &registration,
                    lease,
                    &notices,
                    None,
                    &mut leaving,
                )
                .await;
            })
        };
        // Once the loop has renewed (it knows the lease it wrote), a fanout node ends it.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            assert!(
                tokio::time::Instant::now() < deadline,
                "never renewed, or never ended"
            );
            let nodes = store.nodes().await.unwrap();
            let (_, record) = nodes.iter().find(|(id, _)| id == "g").unwrap();
            if record.lease_until_ms > claimed
                && let courier_store::nodes::LeaseEnd::Ended =
                    store.end_node_lease("g", record, now_ms()).await.unwrap()
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let seen = tokio::time::timeout(Duration::from_secs(10), notices.lapsed.notified()).await;
        renewing.abort();
        assert!(seen.is_ok(), "the node saw its lease ended");
        assert!(notices.ended.holds_down(Instant::now()), "and is held down");
    }
}
