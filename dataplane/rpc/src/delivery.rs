//! Delivery across nodes.
//!
//! - [`GatewayService`]: a gateway node's end: takes batches of events (and typing, receipts,
//!   unlinks) for the devices connected to it and queues them on their connections. An event
//!   of a batch that does not decode there (a fanout node of another version, damage) does
//!   not refuse the batch, which fanout would hand again for good, holding every conversation
//!   of the shard: the others are queued, and that one's recipients are told it was missed
//!   ([`Gateways::missed`]): their connections read it from the store by its conversation
//!   and seq (or, when even those do not decode, reconnect and catch up), logged as a
//!   warning. A connection whose read of the store cannot decode it either is told `internal`
//!   (naming the conversation and the seq) and writes nothing of that conversation past it,
//!   as for any stored event that does not decode: never a silent stall, never a gap.
//! - [`ClusterGateways`]: the [`Gateways`] every node of a cluster uses. It resolves the
//!   recipients' devices to gateway nodes through the route registry in the store
//!   (`courier_store::routes`) and sends **one batch per gateway**; the devices on this node's
//!   own gateway are reached in-process. A gateway that does not take a batch is skipped if
//!   its node lease lapsed by the registry read afresh: it has lost its connections, or
//!   tells them to reconnect when it notices (they catch up); otherwise the batch fails and
//!   fanout hands it again (for a live gateway, at most [`GATEWAY_UNREACHABLE_AFTER`]: below).
//! - [`FanoutService`] and [`CommitNotifier`]: how a chat node tells the fanout node that
//!   drains a shard's outbox (its [`Duty::Delivery`] owner), and the node leading the push
//!   notifier, that the shard has new events. Notices are batched per node; notices whose
//!   sending failed on a read of the store are kept and sent again after a bounded back-off;
//!   a lost notice (a call that failed) only delays delivery (or a push) until the owner's (the
//!   lead's) next lease round, when it looks at every shard it owns (every shard).
//!
//! **A gateway that stays live but takes nothing.** A gateway node that renews its lease in
//! the store but that this node cannot reach (an asymmetric partition, a wrong `--advertise`,
//! a firewall) would fail every batch with one of its devices among the recipients, for
//! good: the shards of those batches would deliver to no one, and refuse every send once
//! past `--outbox-lag-limit`. So each node remembers, per gateway node, since when its calls
//! have failed without a success; once that is [`GATEWAY_UNREACHABLE_AFTER`], and a call to
//! another gateway node succeeded since they began to fail, it ends the gateway's lease in the
//! store (`MessageStore::end_node_lease`, fenced on the record read) and skips it, as it
//! skips a lapsed one, with a warning naming the gateway and the reason. Without that
//! evidence this node may be the one cut off (from every gateway): it blames none, and goes
//! on handing the batch (ending every gateway's lease would send every client of the cluster
//! to reconnect again and again).
//! Nothing is lost: the gateway sees its lease ended at its next renewal and tells every
//! connection to `reconnect` (they catch up from their cursors, on any gateway), and a
//! connection also fills its gaps on a later event. A gateway that goes on failing has its
//! lease ended again at its next failed call.
//!
//! **Unlinks.** An unlinked device's connections must close on every gateway: left open, they
//! go on reading the user's messages. So an unlink is not sent once, as an offer is: it goes
//! out at once to every other gateway node holding a route of the user, and again, half a
//! second then up to 5 s apart, to each that did not take it (unreachable a moment, a
//! timeout, restarting), until it does, or until that gateway no longer holds the
//! connections: gone from the registry, its lease lapsed or ended (it tells its connections
//! to reconnect, and the unlinked device's token is refused), or another process under its
//! id. A live gateway that has not taken it for [`UNLINK_RETRY_FOR`] (60 s) is logged at warn;
//! its pass over its connections (hourly) closes the device's there.
//!
//! **Bounds.** A delivery waits for every gateway it involves (at most [`CALL_TIMEOUT`] each).
//! Offers are sent in the background, at most [`OFFERS_IN_FLIGHT`] at a time; an offer beyond
//! that counts as refused (a receipt is then held and offered again, typing is lost). Unlinks
//! have a budget of their own, [`UNLINKS_IN_FLIGHT`] at a time (each for at most
//! [`UNLINK_RETRY_FOR`] and a call), so a burst of offers never refuses one; an unlink beyond
//! that is logged at warn, and the device's connections on the other gateways close at their
//! next pass over their connections. Notices wait in one map of shards (bounded by the shard
//! count). Failing gateways are remembered in one map of nodes (bounded by the registry: a node
//! gone from it is dropped).

use crate::auth::{AttachToken, RequireToken};
use crate::lock;
use crate::proto::fanout_client::FanoutClient;
use crate::proto::fanout_server::{self, FanoutServer};
use crate::proto::gateway_client::GatewayClient;
use crate::proto::gateway_server::{self, GatewayServer};
use crate::proto::{
    CommittedRequest, CommittedResponse, DeliverRequest, DeliverResponse, EventDelivery, Offer,
    ShardCommits, Unlink,
};
use crate::{ClusterToken, MAX_MESSAGE_BYTES, lazy_channel};
use courier_core::clock::now_ms;
use courier_core::gateways::{DeliveryError, Gateways, Offer as GatewayOffer, Refused};
use courier_core::membership::Members;
use courier_core::sequencing::CommitListener;
use courier_proto::{Encoding, Event, pb};
use courier_store::leaders::Job;
use courier_store::nodes::{LeaseEnd, NodeRecord};
use courier_store::ownership::Duty;
use courier_store::{MessageStore, StoreError};
use prost::Message;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{Notify, Semaphore};
use tonic::codegen::InterceptedService;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

/// Longest wait for a gateway to take a batch.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a live gateway node may fail every delivery call before this node ends its lease
/// and skips it (see the module documentation): three calls that time out, far longer than a
/// blip of the network or a gateway's restart, well within the default `--outbox-lag-limit`
/// (30 s) past which the shards held back by it would refuse sends.
pub const GATEWAY_UNREACHABLE_AFTER: Duration = CALL_TIMEOUT.saturating_mul(3);

/// Offers (typing, receipts) on their way to other gateways at once.
pub const OFFERS_IN_FLIGHT: usize = 1024;

/// Unlinks on their way to other gateways at once, each until it lands or gives up (at most
/// [`UNLINK_RETRY_FOR`] and a call): a budget apart from the offers', which fill it in a
/// burst of typing. Unlinks are rare (one per `DELETE` of a device); this many in flight
/// means many unlinks while gateways take no call for a minute.
pub const UNLINKS_IN_FLIGHT: usize = 4096;

/// How long an unlink is sent again to a live gateway node that does not take it: four
/// times [`GATEWAY_UNREACHABLE_AFTER`], past which a gateway the fanout nodes cannot reach
/// either has had its lease ended (it tells its connections to reconnect, and the unlinked
/// device's token is refused), and past a gateway's restart.
pub const UNLINK_RETRY_FOR: Duration = GATEWAY_UNREACHABLE_AFTER.saturating_mul(4);

/// The wait before an unlink is sent again the first time; doubled at each attempt, up to
/// [`UNLINK_RETRY_MAX_WAIT`].
const UNLINK_RETRY_FIRST_WAIT: Duration = Duration::from_millis(500);

/// The longest wait between two attempts of an unlink.
const UNLINK_RETRY_MAX_WAIT: Duration = Duration::from_secs(5);

/// The wait before notices of commits whose sending failed on a read of the store are sent
/// again the first time; doubled at each failure in a row, up to [`NOTICE_RETRY_MAX`].
const NOTICE_RETRY_FIRST: Duration = Duration::from_millis(50);

/// The longest wait between two attempts to send notices of commits: about a fanout node's
/// lease round, which finds the shards' new events without them.
const NOTICE_RETRY_MAX: Duration = Duration::from_secs(2);

/// How long the node registry and the shards' delivery owners are cached.
const DIRECTORY_TTL: Duration = Duration::from_secs(1);

/// A gateway node's end of [`ClusterGateways`]: queues what it is handed on the connections of
/// this node (its in-process [`Gateways`]).
pub struct GatewayService {
    local: Arc<dyn Gateways>,
}

impl GatewayService {
    pub fn new(local: Arc<dyn Gateways>) -> Self {
        Self { local }
    }

    /// The service with the cluster token required on every call.
    pub fn into_server(
        self,
        token: ClusterToken,
    ) -> InterceptedService<GatewayServer<Self>, RequireToken> {
        let server = GatewayServer::new(self).max_decoding_message_size(MAX_MESSAGE_BYTES);
        InterceptedService::new(server, RequireToken::new(token))
    }
}

fn invalid(what: impl std::fmt::Display) -> Status {
    Status::invalid_argument(format!("malformed delivery: {what}; nothing was queued"))
}

/// An event of a delivery that does not decode here: its conversation and seq, when the
/// envelope decodes (an event kind only a newer node knows), and why.
struct Undecodable {
    at: Option<(String, u64)>,
    reason: String,
}

/// The event `bytes` carry, as a gateway node takes it from a delivery.
fn delivered_event(bytes: &[u8]) -> Result<Event, Undecodable> {
    let event = pb::Event::decode(bytes).map_err(|e| Undecodable {
        at: None,
        reason: e.to_string(),
    })?;
    let at = (!event.conversation_id.is_empty() && event.seq > 0)
        .then(|| (event.conversation_id.clone(), event.seq));
    Event::try_from(event).map_err(|e| Undecodable {
        at,
        reason: e.to_string(),
    })
}

#[tonic::async_trait]
impl gateway_server::Gateway for GatewayService {
    async fn deliver(
        &self,
        request: Request<DeliverRequest>,
    ) -> Result<Response<DeliverResponse>, Status> {
        let request = request.into_inner();
        // An event that does not decode is not a reason to refuse the batch: refused, it
        // would be handed again for good, and its shard would deliver nothing more to anyone
        // here. Its recipients' connections read it from the store instead (`missed`).
        let mut events = Vec::with_capacity(request.events.len());
        for delivery in request.events {
            match delivered_event(&delivery.event) {
                Ok(event) => events.push((event, Members::new(delivery.recipients))),
                Err(Undecodable { at, reason }) => {
                    let (conversation, seq) =
                        at.as_ref().map_or(("", 0), |(c, s)| (c.as_str(), *s));
                    tracing::warn!(
                        conversation,
                        seq,
                        recipients = delivery.recipients.len(),
                        %reason,
                        "a delivered event does not decode on this node; its recipients' connections read it from the store{}",
                        if at.is_some() { "" } else { " after a reconnect" }
                    );
                    let at = at.as_ref().map(|(c, s)| (c.as_str(), *s));
                    self.local.missed(&delivery.recipients, at);
                }
            }
        }
        let offers = request
            .offers
            .into_iter()
            .map(|offer| {
                let frame = Encoding::Proto
                    .decode_server(&offer.frame)
                    .map_err(invalid)?;
                Ok((offer.users, Arc::new(frame)))
            })
            .collect::<Result<Vec<_>, Status>>()?;
        // In-process delivery never fails.
        let _ = self.local.deliver(events).await;
        let offers: Vec<GatewayOffer> = offers
            .iter()
            .map(|(users, frame)| GatewayOffer {
                users: users.iter().map(String::as_str).collect(),
                frame: frame.clone(),
            })
            .collect();
        let refused_offers = self.local.offer(&offers).values().sum::<usize>() as u64;
        for unlink in request.unlinks {
            self.local.unlinked(&unlink.user, &unlink.device);
        }
        Ok(Response::new(DeliverResponse { refused_offers }))
    }
}

type Nodes = HashMap<String, NodeRecord>;
type GatewayStub = GatewayClient<InterceptedService<Channel, AttachToken>>;
type FanoutStub = FanoutClient<InterceptedService<Channel, AttachToken>>;

/// The nodes of the cluster as last read from the registry (at most [`DIRECTORY_TTL`] ago),
/// with one lazily connected client per node.
struct Directory {
    store: MessageStore,
    token: ClusterToken,
    /// The registry, and when it was read.
    nodes: Mutex<(Option<Instant>, Arc<Nodes>)>,
    gateways: Mutex<HashMap<String, GatewayStub>>,
    fanouts: Mutex<HashMap<String, FanoutStub>>,
}

impl Directory {
    fn new(store: MessageStore, token: ClusterToken) -> Self {
        Self {
            store,
            token,
            nodes: Mutex::new((None, Arc::default())),
            gateways: Mutex::default(),
            fanouts: Mutex::default(),
        }
    }

    /// The registered nodes, read again when the copy is older than [`DIRECTORY_TTL`] or
    /// `wanted` is not in it.
    async fn nodes(&self, wanted: &[&str]) -> Result<Arc<Nodes>, StoreError> {
        self.read_nodes(wanted, false).await
    }

    /// The registered nodes as the store has them now.
    async fn nodes_now(&self) -> Result<Arc<Nodes>, StoreError> {
        self.read_nodes(&[], true).await
    }

    async fn read_nodes(&self, wanted: &[&str], now: bool) -> Result<Arc<Nodes>, StoreError> {
        if !now {
            let (read, nodes) = &*lock(&self.nodes);
            if read.is_some_and(|read| read.elapsed() < DIRECTORY_TTL)
                && wanted.iter().all(|id| nodes.contains_key(*id))
            {
                return Ok(nodes.clone());
            }
        }
        let nodes: Arc<Nodes> = Arc::new(self.store.nodes().await?.into_iter().collect());
        *lock(&self.nodes) = (Some(Instant::now()), nodes.clone());
        Ok(nodes)
    }

    /// The live node `id`'s address, if it is live.
    fn live_address<'a>(nodes: &'a Nodes, id: &str) -> Option<&'a str> {
        nodes
            .get(id)
            .filter(|node| node.is_live(now_ms()))
            .map(|node| node.address.as_str())
    }

    fn gateway(&self, address: &str) -> Result<GatewayStub, StoreError> {
        self.client(&self.gateways, address, "gateway", |channel, token| {
            GatewayClient::with_interceptor(channel, token)
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
        })
    }

    fn fanout(&self, address: &str) -> Result<FanoutStub, StoreError> {
        self.client(&self.fanouts, address, "fanout", |channel, token| {
            FanoutClient::with_interceptor(channel, token)
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
        })
    }

    /// The client of the node at `address` in `clients`, made on first use (its channel
    /// connects lazily). `what` names the node's role in errors.
    fn client<C: Clone>(
        &self,
        clients: &Mutex<HashMap<String, C>>,
        address: &str,
        what: &str,
        make: impl FnOnce(Channel, AttachToken) -> C,
    ) -> Result<C, StoreError> {
        let mut clients = lock(clients);
        if let Some(client) = clients.get(address) {
            return Ok(client.clone());
        }
        let channel = lazy_channel(&format!("http://{address}"), what)?;
        let client = make(channel, AttachToken::new(self.token.clone()));
        clients.insert(address.to_owned(), client.clone());
        Ok(client)
    }
}

/// Since when a gateway node's delivery calls have failed without a success.
struct Failing {
    /// The gateway's process (`NodeRecord::instance`): a new process starts a new count.
    instance: u64,
    /// The first failure of the run.
    since: Instant,
    /// The latest failure: a run with a gap longer than [`GATEWAY_UNREACHABLE_AFTER`] (no
    /// call was made meanwhile) starts again.
    last: Instant,
}

/// The [`Gateways`] of a cluster node (see the module documentation).
pub struct ClusterGateways {
    directory: Arc<Directory>,
    /// This node's id and its own gateway, when it runs the gateway role.
    local: Option<(String, Arc<dyn Gateways>)>,
    offers: Arc<Semaphore>,
    /// Room for the unlinks on their way ([`UNLINKS_IN_FLIGHT`]).
    unlinks: Arc<Semaphore>,
    /// Per gateway node whose delivery calls fail, since when. Cleared on a success; holds
    /// only nodes of the registry (bounded by its size).
    failing: Mutex<HashMap<String, Failing>>,
    /// When a call to another gateway node last succeeded: this node's evidence that it can
    /// reach gateways, before it blames one for its failures.
    reached_any: Mutex<Option<Instant>>,
}

impl ClusterGateways {
    /// Gateways found through the route registry of `store`; `local` is this node's id and
    /// in-process gateway when it runs one; `token` authenticates the calls to other nodes.
    pub fn new(
        store: MessageStore,
        local: Option<(String, Arc<dyn Gateways>)>,
        token: ClusterToken,
    ) -> Self {
        Self {
            directory: Arc::new(Directory::new(store, token)),
            local,
            offers: Arc::new(Semaphore::new(OFFERS_IN_FLIGHT)),
            unlinks: Arc::new(Semaphore::new(UNLINKS_IN_FLIGHT)),
            failing: Mutex::default(),
            reached_any: Mutex::default(),
        }
    }

    /// Records a failed delivery call to `gateway` (its process `instance`), and tells whether
    /// it is unreachable: its calls have failed without a success for
    /// [`GATEWAY_UNREACHABLE_AFTER`], while a call to another gateway node succeeded since
    /// they began to (else this node may be the one cut off: it blames no gateway). Forgets
    /// the gateways gone from the registry `nodes` meanwhile.
    fn failed(
        &self,
        gateway: &str,
        instance: u64,
        nodes: &Nodes,
        now: Instant,
    ) -> Option<Duration> {
        let reached_any = *lock(&self.reached_any);
        let mut failing = lock(&self.failing);
        failing.retain(|id, _| nodes.contains_key(id));
        let run = failing.entry(gateway.to_owned()).or_insert(Failing {
            instance,
            since: now,
            last: now,
        });
        if run.instance != instance || now.duration_since(run.last) > GATEWAY_UNREACHABLE_AFTER {
            run.instance = instance;
            run.since = now;
        }
        run.last = now;
        let failing_for = now.duration_since(run.since);
        (failing_for >= GATEWAY_UNREACHABLE_AFTER && reached_any.is_some_and(|at| at > run.since))
            .then_some(failing_for)
    }

    /// Forgets the failures of `gateway`: a call to it succeeded `now`.
    fn reached(&self, gateway: &str, now: Instant) {
        *lock(&self.reached_any) = Some(now);
        let mut failing = lock(&self.failing);
        if !failing.is_empty() {
            failing.remove(gateway);
        }
    }

    fn is_local(&self, gateway: &str) -> bool {
        self.local.as_ref().is_some_and(|(id, _)| id == gateway)
    }

    /// The gateways `user`'s devices are connected to, with those devices, skipping routes to
    /// gateways whose node lease lapsed (as last read).
    async fn routes(
        directory: &Directory,
        user: &str,
    ) -> Result<BTreeMap<String, Vec<String>>, StoreError> {
        let routes = directory.store.routes(user).await?;
        let wanted: Vec<&str> = routes.iter().map(|r| r.gateway.as_str()).collect();
        let nodes = directory.nodes(&wanted).await?;
        let mut by_gateway: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for route in routes {
            if Directory::live_address(&nodes, &route.gateway).is_some() {
                by_gateway
                    .entry(route.gateway)
                    .or_default()
                    .push(route.device);
            }
        }
        Ok(by_gateway)
    }

    /// Sends to the other gateway nodes holding devices of `users`, in the background (offers),
    /// within [`OFFERS_IN_FLIGHT`]: one read of the route registry for all of them, then one
    /// call per gateway with `request` of the users connected there, once. Returns false when
    /// there was no room.
    fn send_in_background(
        &self,
        users: &[&str],
        request: impl Fn(&BTreeSet<String>) -> DeliverRequest + Send + 'static,
    ) -> bool {
        let Ok(permit) = self.offers.clone().try_acquire_owned() else {
            return false;
        };
        let directory = self.directory.clone();
        let local = self.local.as_ref().map(|(id, _)| id.clone());
        let users: Vec<String> = users.iter().map(|user| user.to_string()).collect();
        tokio::spawn(async move {
            let _permit = permit;
            let users: Vec<&str> = users.iter().map(String::as_str).collect();
            let routes = match directory.store.routes_of(&users).await {
                Ok(routes) => routes,
                Err(e) => {
                    tracing::debug!(error = %e, "reading routes for an offer failed; dropped");
                    return;
                }
            };
            let mut by_gateway: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
            for (user, routes) in users.iter().zip(routes) {
                for route in routes {
                    if local.as_deref() != Some(route.gateway.as_str()) {
                        by_gateway
                            .entry(route.gateway)
                            .or_default()
                            .insert(user.to_string());
                    }
                }
            }
            let wanted: Vec<&str> = by_gateway.keys().map(String::as_str).collect();
            let Ok(nodes) = directory.nodes(&wanted).await else {
                return;
            };
            for (gateway, users) in by_gateway {
                let Some(address) = Directory::live_address(&nodes, &gateway) else {
                    continue;
                };
                if let Ok(mut client) = directory.gateway(address) {
                    let call = client.deliver(request(&users));
                    if let Err(e) = tokio::time::timeout(CALL_TIMEOUT, call).await {
                        tracing::debug!(gateway, error = %e, "an offer timed out; dropped");
                    }
                }
            }
        });
        true
    }
}

#[async_trait::async_trait]
impl Gateways for ClusterGateways {
    async fn deliver(&self, batch: Vec<(Event, Members)>) -> Result<(), DeliveryError> {
        if batch.is_empty() {
            return Ok(());
        }
        let recipients: BTreeSet<String> = batch
            .iter()
            .flat_map(|(_, recipients)| recipients.iter().cloned())
            .collect();
        let users: Vec<&str> = recipients.iter().map(String::as_str).collect();
        let directory = &self.directory;
        // Every recipient's routes with one read of the store.
        let routes = directory.store.routes_of(&users).await?;
        let gateways_of: HashMap<&str, BTreeSet<String>> = users
            .iter()
            .copied()
            .zip(routes)
            .map(|(user, routes)| (user, routes.into_iter().map(|r| r.gateway).collect()))
            .collect();
        // Per gateway, the events with their recipients connected there.
        let mut parts: BTreeMap<&str, Vec<(Event, Vec<String>)>> = BTreeMap::new();
        for (event, recipients) in batch {
            let mut here: BTreeMap<&str, Vec<String>> = BTreeMap::new();
            for user in recipients.iter() {
                for gateway in gateways_of.get(user.as_str()).into_iter().flatten() {
                    here.entry(gateway.as_str()).or_default().push(user.clone());
                }
            }
            for (gateway, users) in here {
                parts
                    .entry(gateway)
                    .or_default()
                    .push((event.clone(), users));
            }
        }
        let wanted: Vec<&str> = parts.keys().copied().collect();
        let nodes = directory.nodes(&wanted).await?;
        let calls = parts.into_iter().map(|(gateway, events)| {
            let nodes = &nodes;
            async move {
                if let Some((_, local)) = self.local.as_ref().filter(|_| self.is_local(gateway)) {
                    let events: Vec<(Event, Members)> = events
                        .into_iter()
                        .map(|(event, users)| (event, Members::new(users)))
                        .collect();
                    return local.deliver(events).await;
                }
                // Never registered, or gone from the registry: its devices reconnected.
                let Some(address) = nodes.get(gateway).map(|node| node.address.clone()) else {
                    return Ok(());
                };
                let request = DeliverRequest {
                    events: events
                        .into_iter()
                        .map(|(event, recipients)| EventDelivery {
                            event: pb::Event::from(event).encode_to_vec(),
                            recipients,
                        })
                        .collect(),
                    ..DeliverRequest::default()
                };
                let mut client = directory.gateway(&address)?;
                let reason = match tokio::time::timeout(CALL_TIMEOUT, client.deliver(request)).await
                {
                    Ok(Ok(_)) => {
                        self.reached(gateway, Instant::now());
                        return Ok(());
                    }
                    Ok(Err(status)) => status.message().to_owned(),
                    Err(_) => format!("no answer within {CALL_TIMEOUT:?}"),
                };
                // A gateway whose lease lapsed (by the registry as it is now, not a cached
                // copy) has lost its connections, or drops them when it notices: skip it.
                // Its failures count all the same: one whose lease was ended (by this node
                // or another) and that registered again goes on failing.
                let skip_lapsed = || {
                    tracing::info!(gateway, %reason, "skipped a gateway whose lease lapsed");
                    Ok(())
                };
                // Judged at the time the read began: a slow read must not make a live lease
                // look lapsed.
                let read_at = now_ms();
                let fresh = directory.nodes_now().await?;
                let Some(record) = fresh.get(gateway) else {
                    return skip_lapsed();
                };
                let unreachable = self.failed(gateway, record.instance, &fresh, Instant::now());
                if !record.is_live(read_at) {
                    return skip_lapsed();
                }
                // A live gateway that failed every call for long enough, while others took
                // theirs, has its lease ended, and is skipped as a lapsed one: it tells its
                // connections to reconnect when it sees it. Any other failure hands the batch
                // again.
                if let Some(failing_for) = unreachable {
                    match directory.store.end_node_lease(gateway, record, now_ms()).await? {
                        LeaseEnd::Ended => {
                            tracing::warn!(
                                gateway,
                                %reason,
                                failing_for = ?failing_for,
                                "ended the lease of a live gateway node that took no delivery for {GATEWAY_UNREACHABLE_AFTER:?}, and skipped it: its clients reconnect and catch up"
                            );
                            return Ok(());
                        }
                        // Renewed since it was read: its lease is ended at its next failure.
                        LeaseEnd::Changed(renewed) if renewed.is_live(now_ms()) => {}
                        // Ended by another node meanwhile, or gone.
                        _ => return skip_lapsed(),
                    }
                }
                Err(DeliveryError::Gateway {
                    gateway: gateway.to_owned(),
                    reason,
                })
            }
        });
        // Every call runs to its end, failed or not: the gateways that take their part have
        // it at once (and tell this node it reaches gateways), not when the batch is handed
        // again.
        futures::future::join_all(calls)
            .await
            .into_iter()
            .collect::<Result<Vec<()>, DeliveryError>>()
            .map(drop)
    }

    /// Only a gateway node's end ([`GatewayService`]) finds an event it cannot decode, and it
    /// tells its in-process gateway; passed on to this node's own all the same.
    fn missed(&self, recipients: &[String], at: Option<(&str, u64)>) {
        if let Some((_, local)) = &self.local {
            local.missed(recipients, at);
        }
    }

    fn offer<'a>(&self, offers: &[GatewayOffer<'a>]) -> Refused<'a> {
        let mut refused = match &self.local {
            Some((_, local)) => local.offer(offers),
            None => Refused::new(),
        };
        let mut users: Vec<&'a str> = offers
            .iter()
            .flat_map(|offer| offer.users.iter().copied())
            .collect();
        users.sort_unstable();
        users.dedup();
        if users.is_empty() {
            return refused;
        }
        let encoded: Vec<(BTreeSet<String>, Vec<u8>)> = offers
            .iter()
            .map(|offer| {
                let users = offer.users.iter().map(|user| user.to_string()).collect();
                let frame = pb::ServerFrame::from(offer.frame.as_ref().clone()).encode_to_vec();
                (users, frame)
            })
            .collect();
        // Each gateway gets, in one call, the frames for the users connected there.
        let sent = self.send_in_background(&users, move |there| DeliverRequest {
            offers: encoded
                .iter()
                .filter_map(|(users, frame)| {
                    let users: Vec<String> = users.intersection(there).cloned().collect();
                    (!users.is_empty()).then(|| Offer {
                        users,
                        frame: frame.clone(),
                    })
                })
                .collect(),
            ..DeliverRequest::default()
        });
        if !sent {
            for user in users {
                *refused.entry(user).or_default() += 1;
            }
        }
        refused
    }

    fn unlinked(&self, user: &str, device: &str) {
        if let Some((_, local)) = &self.local {
            local.unlinked(user, device);
        }
        let request = DeliverRequest {
            unlinks: vec![Unlink {
                user: user.to_owned(),
                device: device.to_owned(),
            }],
            ..DeliverRequest::default()
        };
        let Ok(permit) = self.unlinks.clone().try_acquire_owned() else {
            tracing::warn!(
                user,
                device,
                "{UNLINKS_IN_FLIGHT} unlinks in flight: the unlinked device's connections on other gateways close at their next pass over their connections"
            );
            return;
        };
        let directory = self.directory.clone();
        let local = self.local.as_ref().map(|(id, _)| id.clone());
        tokio::spawn(async move {
            let _permit = permit;
            send_unlink(&directory, local.as_deref(), request).await;
        });
    }

    async fn connected_devices(&self, user: &str) -> Result<Vec<String>, StoreError> {
        let routes = Self::routes(&self.directory, user).await?;
        let mut devices: Vec<String> = routes.into_values().flatten().collect();
        devices.sort();
        devices.dedup();
        Ok(devices)
    }
}

/// Sends `request`, the unlink of one device, to the other gateway nodes (not `local`) holding
/// connections of its user, and again, a few seconds apart, to each that has not taken it,
/// until it does or no longer needs it: gone from the registry, lapsed (judged at the time the
/// registry's read began, as a delivery judges it), or run by another process than the one
/// first seen (the old one's connections ended; a connection made since has a token the
/// unlink refuses). A live gateway that has not taken it for [`UNLINK_RETRY_FOR`] is logged
/// at warn: the device's connections there close at its next pass over its connections.
async fn send_unlink(directory: &Directory, local: Option<&str>, request: DeliverRequest) {
    let Some(Unlink { user, device }) = request.unlinks.first() else {
        return;
    };
    let give_up_at = Instant::now() + UNLINK_RETRY_FOR;
    let mut wait = UNLINK_RETRY_FIRST_WAIT;
    // The gateways still to tell, with the process first seen there; read on the first
    // attempt that reads the routes (the device's connections made since are refused).
    let mut pending: Option<BTreeMap<String, Option<u64>>> = None;
    loop {
        // The routes or the registry not read: every gateway still to tell is tried again.
        let failures = match unlink_attempt(directory, local, &request, &mut pending).await {
            Ok(failures) => failures,
            Err(e) => vec![("(routes or registry not read)".to_owned(), e.to_string())],
        };
        if failures.is_empty() {
            return;
        }
        if Instant::now() + wait > give_up_at {
            for (gateway, reason) in failures {
                tracing::warn!(
                    user,
                    device,
                    gateway,
                    %reason,
                    "an unlink was not taken within {UNLINK_RETRY_FOR:?}: the unlinked device's connections there close at the gateway's next pass over its connections"
                );
            }
            return;
        }
        for (gateway, reason) in failures {
            tracing::debug!(user, device, gateway, %reason, "an unlink was not taken; sending it again in {wait:?}");
        }
        tokio::time::sleep(wait).await;
        wait = wait.saturating_mul(2).min(UNLINK_RETRY_MAX_WAIT);
    }
}

/// One attempt of [`send_unlink`]: reads the routes if `pending` is not yet known, drops from
/// it the gateways that no longer need the unlink, and calls the others at once, dropping
/// those that take it. Returns the gateways that did not, each with why.
async fn unlink_attempt(
    directory: &Directory,
    local: Option<&str>,
    request: &DeliverRequest,
    pending: &mut Option<BTreeMap<String, Option<u64>>>,
) -> Result<Vec<(String, String)>, StoreError> {
    let pending = match pending {
        Some(pending) => pending,
        None => {
            let user = request.unlinks.first().map_or("", |u| u.user.as_str());
            let routes = directory.store.routes(user).await?;
            pending.insert(
                routes
                    .into_iter()
                    .map(|route| route.gateway)
                    .filter(|gateway| Some(gateway.as_str()) != local)
                    .map(|gateway| (gateway, None))
                    .collect(),
            )
        }
    };
    if pending.is_empty() {
        return Ok(Vec::new());
    }
    let read_at = now_ms();
    let nodes = directory.nodes_now().await?;
    pending.retain(|gateway, seen| match nodes.get(gateway) {
        Some(record) if record.is_live(read_at) && seen.is_none_or(|i| i == record.instance) => {
            *seen = Some(record.instance);
            true
        }
        _ => false,
    });
    let nodes = &nodes;
    let calls = pending.keys().map(|gateway| async move {
        let reason = match nodes
            .get(gateway)
            .map(|record| directory.gateway(&record.address))
        {
            Some(Ok(mut client)) => {
                match tokio::time::timeout(CALL_TIMEOUT, client.deliver(request.clone())).await {
                    Ok(Ok(_)) => return None,
                    Ok(Err(status)) => status.message().to_owned(),
                    Err(_) => format!("no answer within {CALL_TIMEOUT:?}"),
                }
            }
            Some(Err(e)) => e.to_string(),
            None => "not registered".to_owned(),
        };
        Some((gateway.clone(), reason))
    });
    let failures: Vec<(String, String)> = futures::future::join_all(calls)
        .await
        .into_iter()
        .flatten()
        .collect();
    pending.retain(|gateway, _| failures.iter().any(|(failed, _)| failed == gateway));
    Ok(failures)
}

/// The end of [`CommitNotifier`] on a fanout or push node: tells the node's fanout and push
/// notifier of new events.
pub struct FanoutService {
    fanout: Arc<dyn CommitListener>,
}

impl FanoutService {
    pub fn new(fanout: Arc<dyn CommitListener>) -> Self {
        Self { fanout }
    }

    /// The service with the cluster token required on every call.
    pub fn into_server(
        self,
        token: ClusterToken,
    ) -> InterceptedService<FanoutServer<Self>, RequireToken> {
        let server = FanoutServer::new(self).max_decoding_message_size(MAX_MESSAGE_BYTES);
        InterceptedService::new(server, RequireToken::new(token))
    }
}

#[tonic::async_trait]
impl fanout_server::Fanout for FanoutService {
    async fn committed(
        &self,
        request: Request<CommittedRequest>,
    ) -> Result<Response<CommittedResponse>, Status> {
        for ShardCommits { shard, events } in request.into_inner().shards {
            self.fanout
                .committed(shard, usize::try_from(events).unwrap_or(usize::MAX));
        }
        Ok(Response::new(CommittedResponse {}))
    }
}

/// The [`CommitListener`] of a chat node in a cluster: tells each shard's fanout node (its
/// delivery owner, read from the store and cached for [`DIRECTORY_TTL`]) of the events
/// committed for this node's appends, this node's own fanout in-process; and tells the push
/// notifier's leader (`Job::Push`, read and cached likewise) of every shard committed to, so
/// that it expands their outboxes at once rather than at its next round over every shard.
/// Both get the same call (`Fanout.Committed`), one per node per batch of notices.
pub struct CommitNotifier {
    directory: Arc<Directory>,
    /// This node's id and fanout, when it runs the fanout role.
    local: Option<(String, Arc<dyn CommitListener>)>,
    /// This node's id (its own notifier, when it runs push, hears of its commits in process).
    node: String,
    /// Events per shard not yet told.
    pending: Mutex<HashMap<u32, u64>>,
    wake: Notify,
    /// Per shard, its delivery owner's node id as read, and when.
    owners: Mutex<HashMap<u32, (String, Instant)>>,
    /// The push notifier's leader as read (none: no node leads it), and when.
    push_lead: Mutex<Option<(Option<String>, Instant)>>,
}

impl CommitNotifier {
    pub fn new(
        store: MessageStore,
        node: &str,
        local: Option<(String, Arc<dyn CommitListener>)>,
        token: ClusterToken,
    ) -> Arc<Self> {
        Arc::new(Self {
            directory: Arc::new(Directory::new(store, token)),
            local,
            node: node.to_owned(),
            pending: Mutex::default(),
            wake: Notify::new(),
            owners: Mutex::default(),
            push_lead: Mutex::default(),
        })
    }

    /// Sends the notices as they come, one call per node at a time, until the process ends.
    /// Notices whose sending failed on a read of the store (the shards' owners, the push lead,
    /// the registry: nothing was told yet) are kept, with those that come meanwhile, and sent
    /// again after a wait that doubles from [`NOTICE_RETRY_FIRST`] up to [`NOTICE_RETRY_MAX`]:
    /// dropped, they waited for the fanout node's next lease round. They are at most a count
    /// per shard, so keeping them is bounded by the shard count.
    pub async fn run(self: Arc<Self>) {
        let mut wait = NOTICE_RETRY_FIRST;
        loop {
            self.wake.notified().await;
            let pending = std::mem::take(&mut *lock(&self.pending));
            if pending.is_empty() {
                continue;
            }
            match self.tell(&pending).await {
                Ok(()) => wait = NOTICE_RETRY_FIRST,
                Err(e) => {
                    tracing::debug!(error = %e, retry_in = ?wait, "telling fanout and push nodes of commits failed; retrying");
                    {
                        let mut kept = lock(&self.pending);
                        for (shard, events) in pending {
                            *kept.entry(shard).or_default() += events;
                        }
                    }
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(NOTICE_RETRY_MAX);
                    self.wake.notify_one();
                }
            }
        }
    }

    async fn owner(&self, shard: u32) -> Result<Option<String>, StoreError> {
        if let Some((node, read)) = lock(&self.owners).get(&shard)
            && read.elapsed() < DIRECTORY_TTL
        {
            return Ok(Some(node.clone()));
        }
        let owner = self
            .directory
            .store
            .shard_owner(Duty::Delivery, shard)
            .await?
            .filter(|owner| owner.is_live(now_ms()));
        Ok(owner.map(|owner| {
            lock(&self.owners).insert(shard, (owner.node.clone(), Instant::now()));
            owner.node
        }))
    }

    /// The node leading the push notifier, if another node does.
    async fn push_lead(&self) -> Result<Option<String>, StoreError> {
        if let Some((lead, read)) = lock(&self.push_lead).as_ref()
            && read.elapsed() < DIRECTORY_TTL
        {
            return Ok(lead.clone());
        }
        let lead = self.directory.store.leader(Job::Push, now_ms()).await?;
        *lock(&self.push_lead) = Some((lead.clone(), Instant::now()));
        Ok(lead)
    }

    /// Tells the fanout and push nodes of `pending`. Fails only on a read, before any node
    /// was told, so that the caller may send all of `pending` again.
    async fn tell(&self, pending: &HashMap<u32, u64>) -> Result<(), StoreError> {
        let mut by_node: BTreeMap<String, Vec<ShardCommits>> = BTreeMap::new();
        for (&shard, &events) in pending {
            if let Some(node) = self.owner(shard).await? {
                by_node
                    .entry(node)
                    .or_default()
                    .push(ShardCommits { shard, events });
            }
        }
        if let Some(lead) = self.push_lead().await?
            && lead != self.node
        {
            let told = by_node.entry(lead).or_default();
            let already: BTreeSet<u32> = told.iter().map(|c| c.shard).collect();
            told.extend(
                pending
                    .iter()
                    .filter(|(shard, _)| !already.contains(shard))
                    .map(|(&shard, &events)| ShardCommits { shard, events }),
            );
        }
        let wanted: Vec<&str> = by_node.keys().map(String::as_str).collect();
        let nodes = self.directory.nodes(&wanted).await?;
        for (node, shards) in by_node {
            if let Some((id, local)) = &self.local
                && *id == node
            {
                for ShardCommits { shard, events } in shards {
                    local.committed(shard, usize::try_from(events).unwrap_or(usize::MAX));
                }
                continue;
            }
            let Some(address) = nodes.get(&node).map(|n| n.address.as_str()) else {
                continue;
            };
            // An address that makes no client makes none on a retry either.
            let mut client = match self.directory.fanout(address) {
                Ok(client) => client,
                Err(e) => {
                    tracing::warn!(node, error = %e, "a node's address makes no client; its notices are dropped");
                    continue;
                }
            };
            let call = client.committed(CommittedRequest { shards });
            if !matches!(tokio::time::timeout(CALL_TIMEOUT, call).await, Ok(Ok(_))) {
                // Read the owners and the lead again next time: they may have moved.
                lock(&self.owners).retain(|_, (owner, _)| *owner != node);
                lock(&self.push_lead).take();
            }
        }
        Ok(())
    }
}

impl CommitListener for CommitNotifier {
    fn committed(&self, shard: u32, events: usize) {
        if let Some((id, local)) = &self.local
            && lock(&self.owners)
                .get(&shard)
                .is_some_and(|(owner, read)| owner == id && read.elapsed() < DIRECTORY_TTL)
        {
            local.committed(shard, events);
            return;
        }
        *lock(&self.pending).entry(shard).or_default() += events as u64;
        self.wake.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use courier_core::gateways::NoGateways;
    use courier_proto::{Body, EventPayload, Sender};
    use tokio::net::TcpListener;
    use tonic::transport::server::TcpIncoming;

    const TOKEN: &str = "courier-test-cluster-token-0123456789abcdef";

    /// A fanout's batch may pass tonic's default of 4 MiB (here a hundred of the largest
    /// messages): refused, it was handed again and again, and its shard delivered nothing
    /// more.
    #[tokio::test]
    async fn a_delivery_batch_past_four_mib_is_taken() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let token = ClusterToken::new(TOKEN).unwrap();
        let service = GatewayService::new(Arc::new(NoGateways)).into_server(token.clone());
        tokio::spawn(async move {
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(TcpIncoming::from(listener))
                .await
                .unwrap();
        });
        let text = "x".repeat(60_000);
        let events = (1..=100)
            .map(|seq| EventDelivery {
                event: pb::Event::from(Event {
                    conversation_id: "d:1".into(),
                    seq,
                    server_msg_id: format!("s{seq}"),
                    sender: Sender {
                        user: "alice".into(),
                        device: "phone".into(),
                    },
                    ts_ms: 1,
                    payload: EventPayload::Message {
                        body: Some(Body::Text(text.clone())),
                        client_msg_id: format!("c{seq}"),
                        reply_to: None,
                        deleted: false,
                    },
                })
                .encode_to_vec(),
                recipients: vec!["bob".into()],
            })
            .collect();
        let request = DeliverRequest {
            events,
            ..DeliverRequest::default()
        };
        assert!(request.encoded_len() > 4 << 20);
        let dir = tempfile::tempdir().unwrap();
        let engine = courier_store::embedded::EmbeddedEngine::open(dir.path()).unwrap();
        let store = MessageStore::open(Arc::new(engine), b"", 4).await.unwrap();
        let directory = Directory::new(store, token);
        let mut client = directory.gateway(&address.to_string()).unwrap();
        client.deliver(request).await.unwrap();
    }

    /// A commit listener that counts what it is told, per shard.
    #[derive(Default)]
    struct Told(Mutex<HashMap<u32, usize>>);

    impl CommitListener for Told {
        fn committed(&self, shard: u32, events: usize) {
            *lock(&self.0).entry(shard).or_default() += events;
        }
    }

    /// A read of the store that fails while the notices are sent (the owner of a shard, the
    /// push lead, the registry) keeps them, and they are sent once a read succeeds: they were
    /// dropped, and the fanout node delivered those events only at its next lease round.
    #[tokio::test]
    async fn notices_a_failed_read_held_back_are_sent_once_the_store_answers() {
        use std::sync::atomic::{AtomicUsize, Ordering as AtomicOrdering};
        let engine = courier_store::faulty_engine::FaultyEngine::new();
        let store = engine.store(4).await;
        let shard = 1;
        store
            .acquire_shards(Duty::Delivery, "n1", &[shard], 1, now_ms(), 60_000)
            .await
            .unwrap();
        let failing = Arc::new(AtomicUsize::new(2));
        let reads = failing.clone();
        engine.set_read_fault(Some(Box::new(move |_| {
            let take_one = |n: usize| n.checked_sub(1);
            reads
                .fetch_update(AtomicOrdering::Relaxed, AtomicOrdering::Relaxed, take_one)
                .is_ok()
                .then(|| StoreError::Engine("store node unreachable".into()))
        })));
        let told = Arc::new(Told::default());
        let local: Arc<dyn CommitListener> = told.clone();
        let token = ClusterToken::new(TOKEN).unwrap();
        let notifier = CommitNotifier::new(store, "n1", Some(("n1".into(), local)), token);
        let running = tokio::spawn(notifier.clone().run());
        notifier.committed(shard, 3);
        let deadline = Instant::now() + Duration::from_secs(10);
        while lock(&told.0).get(&shard).copied() != Some(3) {
            assert!(Instant::now() < deadline, "told {:?}", lock(&told.0));
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(
            failing.load(AtomicOrdering::Relaxed),
            0,
            "the reads failed first"
        );
        running.abort();
    }

    /// The in-process gateway of a node, recording what it is handed.
    #[derive(Default)]
    struct Recording {
        delivered: Mutex<Vec<(String, u64, Vec<String>)>>,
        missed: Mutex<Vec<Missed>>,
        /// The devices unlinked, as user and device.
        unlinked: tokio::sync::watch::Sender<Vec<(String, String)>>,
    }

    /// The recipients of an event that did not decode, and its place if known.
    type Missed = (Vec<String>, Option<(String, u64)>);

    #[async_trait::async_trait]
    impl Gateways for Recording {
        async fn deliver(&self, batch: Vec<(Event, Members)>) -> Result<(), DeliveryError> {
            lock(&self.delivered).extend(batch.into_iter().map(|(event, recipients)| {
                let recipients = recipients.iter().cloned().collect();
                (event.conversation_id, event.seq, recipients)
            }));
            Ok(())
        }

        fn missed(&self, recipients: &[String], at: Option<(&str, u64)>) {
            let at = at.map(|(conv, seq)| (conv.to_owned(), seq));
            lock(&self.missed).push((recipients.to_vec(), at));
        }

        fn offer<'a>(&self, _offers: &[GatewayOffer<'a>]) -> Refused<'a> {
            Refused::new()
        }

        fn unlinked(&self, user: &str, device: &str) {
            self.unlinked
                .send_modify(|unlinked| unlinked.push((user.to_owned(), device.to_owned())));
        }

        async fn connected_devices(&self, _user: &str) -> Result<Vec<String>, StoreError> {
            Ok(Vec::new())
        }
    }

    fn delivery(conv: &str, seq: u64, kind: &str, recipients: &[&str]) -> EventDelivery {
        let mut event = pb::Event::from(Event {
            conversation_id: conv.into(),
            seq,
            server_msg_id: format!("s{seq}"),
            sender: Sender {
                user: "alice".into(),
                device: "phone".into(),
            },
            ts_ms: 1,
            payload: EventPayload::Message {
                body: Some(Body::Text("hi".into())),
                client_msg_id: format!("c{seq}"),
                reply_to: None,
                deleted: false,
            },
        });
        event.kind = kind.into();
        EventDelivery {
            event: event.encode_to_vec(),
            recipients: recipients.iter().map(|r| r.to_string()).collect(),
        }
    }

    /// A batch with an event the gateway cannot decode (a kind only a newer node knows, bytes
    /// that are no event) is taken: the events it can decode reach their connections, so the
    /// other conversations and recipients are not held, and the gateway is told of the one it
    /// could not decode (its place when the envelope decodes), so that its recipients'
    /// connections read it from the store. Refused whole, the batch was handed again for good,
    /// and the shard delivered nothing more to anyone on that gateway.
    #[tokio::test]
    async fn a_batch_with_an_event_the_gateway_cannot_decode_is_taken() {
        let local = Arc::new(Recording::default());
        let service = GatewayService::new(local.clone());
        let garbage = EventDelivery {
            event: vec![0xff; 3],
            recipients: vec!["carol".into()],
        };
        let request = DeliverRequest {
            events: vec![
                delivery("d:1", 1, "message", &["bob"]),
                delivery("d:2", 7, "reaction", &["bob", "carol"]),
                garbage,
                delivery("d:3", 2, "message", &["dave"]),
            ],
            ..DeliverRequest::default()
        };
        gateway_server::Gateway::deliver(&service, Request::new(request))
            .await
            .expect("the batch is taken");
        assert_eq!(
            *lock(&local.delivered),
            [
                ("d:1".to_owned(), 1, vec!["bob".to_owned()]),
                ("d:3".to_owned(), 2, vec!["dave".to_owned()]),
            ]
        );
        let users = |names: &[&str]| names.iter().map(|n| n.to_string()).collect::<Vec<_>>();
        assert_eq!(
            *lock(&local.missed),
            [
                (users(&["bob", "carol"]), Some(("d:2".to_owned(), 7))),
                (users(&["carol"]), None),
            ]
        );
    }

    /// A gateway is blamed for its failures once they lasted [`GATEWAY_UNREACHABLE_AFTER`]
    /// and another gateway took a call since they began; a node that reaches no gateway (it
    /// may be the one cut off) blames none: it would end every gateway's lease again and
    /// again, and send every client of the cluster to reconnect.
    #[tokio::test]
    async fn a_gateway_is_unreachable_once_it_failed_for_long_while_another_took_its_calls() {
        let dir = tempfile::tempdir().unwrap();
        let engine = courier_store::embedded::EmbeddedEngine::open(dir.path()).unwrap();
        let store = MessageStore::open(Arc::new(engine), b"", 4).await.unwrap();
        let gateways = ClusterGateways::new(store, None, ClusterToken::new(TOKEN).unwrap());
        let nodes: Nodes = ["g1", "g2"]
            .into_iter()
            .map(|id| (id.to_owned(), NodeRecord::default()))
            .collect();
        let t0 = Instant::now();
        let at = |secs: u64| t0 + Duration::from_secs(secs);
        for secs in [0, 5, 10, 15] {
            assert_eq!(
                gateways.failed("g1", 1, &nodes, at(secs)),
                None,
                "no other gateway reached: this node may be the one cut off"
            );
        }
        gateways.reached("g2", at(16));
        assert_eq!(
            gateways.failed("g1", 1, &nodes, at(17)),
            Some(Duration::from_secs(17))
        );
        // A success clears the count.
        gateways.reached("g1", at(18));
        assert_eq!(gateways.failed("g1", 1, &nodes, at(19)), None);
        gateways.reached("g2", at(20));
        for secs in [25, 30] {
            assert_eq!(gateways.failed("g1", 1, &nodes, at(secs)), None);
        }
        assert_eq!(
            gateways.failed("g1", 1, &nodes, at(34)),
            Some(Duration::from_secs(15))
        );
        // A new process under the id, or failures after a long gap, start a new count.
        assert_eq!(gateways.failed("g1", 2, &nodes, at(35)), None);
        gateways.reached("g2", at(36));
        assert_eq!(
            gateways.failed("g1", 2, &nodes, at(60)),
            None,
            "after a gap"
        );
        // A node gone from the registry is forgotten.
        let without: Nodes = [("g2".to_owned(), NodeRecord::default())].into();
        gateways.failed("g2", 1, &without, at(61));
        assert!(!lock(&gateways.failing).contains_key("g1"));
    }

    /// A cluster whose store registers gateway node `g1` (live for a minute) with alice's
    /// phone connected to it, and `g1` serving its [`GatewayService`] over a [`Recording`],
    /// every call let through `admit` first; with the [`ClusterGateways`] of another node.
    async fn a_gateway_holding_alices_phone(
        admit: impl FnMut(Request<()>) -> Result<Request<()>, Status> + Clone + Send + Sync + 'static,
    ) -> (ClusterGateways, Arc<Recording>, tempfile::TempDir) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let local = Arc::new(Recording::default());
        let server = GatewayServer::new(GatewayService::new(local.clone()));
        tokio::spawn(async move {
            tonic::transport::Server::builder()
                .add_service(InterceptedService::new(server, admit))
                .serve_with_incoming(TcpIncoming::from(listener))
                .await
                .unwrap();
        });
        let dir = tempfile::tempdir().unwrap();
        let engine = courier_store::embedded::EmbeddedEngine::open(dir.path()).unwrap();
        let store = MessageStore::open(Arc::new(engine), b"", 4).await.unwrap();
        let record = NodeRecord {
            roles: vec!["gateway".into()],
            address: address.to_string(),
            lease_until_ms: now_ms() + 60_000,
            instance: 1,
            ..NodeRecord::default()
        };
        store.register_node("g1", &record).await.unwrap();
        store
            .add_route("alice", "phone", "g1", 1, now_ms())
            .await
            .unwrap();
        let token = ClusterToken::new(TOKEN).unwrap();
        (ClusterGateways::new(store, None, token), local, dir)
    }

    /// Waits until `gateway` closed alice's phone, for at most 30 s.
    async fn phone_unlinked_on(gateway: &Recording) -> bool {
        let mut unlinked = gateway.unlinked.subscribe();
        let phone = ("alice".to_owned(), "phone".to_owned());
        let landed = unlinked.wait_for(|unlinked| unlinked.contains(&phone));
        matches!(
            tokio::time::timeout(Duration::from_secs(30), landed).await,
            Ok(Ok(_))
        )
    }

    /// An unlink whose call a gateway does not take (unreachable a moment, a timeout) is sent
    /// again until it lands: sent once, the unlinked device's connection there stayed open,
    /// reading the user's messages, until the gateway's hourly pass over its connections.
    #[tokio::test]
    async fn an_unlink_the_gateway_did_not_take_is_sent_again_until_it_lands() {
        let refused = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let admit = {
            let refused = refused.clone();
            move |request: Request<()>| {
                if refused.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 0 {
                    return Err(Status::unavailable("not now"));
                }
                Ok(request)
            }
        };
        let (gateways, g1, _dir) = a_gateway_holding_alices_phone(admit).await;
        gateways.unlinked("alice", "phone");
        assert!(
            phone_unlinked_on(&g1).await,
            "the unlink lands on a later attempt"
        );
        assert!(refused.load(std::sync::atomic::Ordering::SeqCst) >= 2);
    }

    /// An unlink is not refused for want of room when [`OFFERS_IN_FLIGHT`] offers (typing,
    /// receipts) are on their way: it counted among them, and was dropped.
    #[tokio::test]
    async fn an_unlink_goes_out_while_the_offers_in_flight_are_at_their_bound() {
        let (gateways, g1, _dir) = a_gateway_holding_alices_phone(Ok).await;
        let _offers = gateways
            .offers
            .clone()
            .try_acquire_many_owned(OFFERS_IN_FLIGHT as u32)
            .unwrap();
        gateways.unlinked("alice", "phone");
        assert!(phone_unlinked_on(&g1).await, "the unlink is not refused");
    }

    /// An unlink is sent again to a gateway that does not take it only while that gateway is
    /// live: once its lease is ended (it tells its connections to reconnect, and the unlinked
    /// device's token is refused) the unlink is done, and its room among
    /// [`UNLINKS_IN_FLIGHT`] is free.
    #[tokio::test]
    async fn an_unlink_is_no_longer_sent_to_a_gateway_whose_lease_ended() {
        let attempted = Arc::new(Notify::new());
        let admit = {
            let attempted = attempted.clone();
            move |_: Request<()>| {
                attempted.notify_one();
                Err(Status::unavailable("never"))
            }
        };
        let (gateways, _g1, _dir) = a_gateway_holding_alices_phone(admit).await;
        gateways.unlinked("alice", "phone");
        tokio::time::timeout(Duration::from_secs(30), attempted.notified())
            .await
            .expect("the unlink is sent");
        let store = &gateways.directory.store;
        let (_, record) = store.nodes().await.unwrap().pop().unwrap();
        assert_eq!(
            store.end_node_lease("g1", &record, now_ms()).await.unwrap(),
            LeaseEnd::Ended
        );
        let all_free = gateways.unlinks.acquire_many(UNLINKS_IN_FLIGHT as u32);
        let _all = tokio::time::timeout(Duration::from_secs(30), all_free)
            .await
            .expect("the unlink is no longer sent")
            .unwrap();
    }
}
