//! The admin API of a node (`courier.internal.v1.Admin`, on the internal port, behind the
//! cluster token): what the operator reads (nodes, shards, their load and outbox lag) and what
//! it does (move a shard, take shards now, drain the node, forget a dead node).
//!
//! Every node serves it. What reads the store (`ListNodes`, `ListShardMap`, `ForgetNode`) any
//! node answers; the calls about the shards a node owns need a sequencer node (`MoveShard` and
//! `TakeShards` are refused elsewhere with `FAILED_PRECONDITION`, `ListShards` lists nothing);
//! `Drain` drains what the node runs: a sequencer's shards, a gateway's connections (batch by
//! batch, `courier_gateway::drain`).
//!
//! A move is the hand-off of `LocalSequencer::hand_off` (freeze here, flip owner and epoch in
//! one commit), then a call to the target's `TakeShards`, so that the move returns once the
//! target serves the shard. A shard beyond the store's shard count is refused first
//! (`INVALID_ARGUMENT`), and so is a target that is not a live sequencer node (`NOT_FOUND`
//! when unregistered, `FAILED_PRECONDITION` otherwise), with the shard untouched. A move that
//! fails after the flip leaves the shard to the target in the store; the target takes it at
//! its next lease round. A target that was drained (`Drain`, and still up) takes nothing: it
//! gives the shard back when told to take it, and the move takes it back here and answers
//! `FAILED_PRECONDITION`.

use crate::config::MAX_DRAIN_WINDOW;
use crate::node::Role;
use courier_core::clock::now_ms;
use courier_gateway::drain::GatewayDrain;
use courier_rpc::ClusterToken;
use courier_rpc::auth::{AttachToken, RequireToken};
use courier_rpc::proto::admin_client::AdminClient;
use courier_rpc::proto::admin_server::{self, AdminServer};
use courier_rpc::proto::{
    self as pb, DrainRequest, DrainResponse, ForgetNodeRequest, ForgetNodeResponse,
    ListNodesRequest, ListNodesResponse, ListShardMapRequest, ListShardMapResponse,
    ListShardsRequest, ListShardsResponse, MoveShardRequest, MoveShardResponse, Node, Shard,
    TakeShardsRequest, TakeShardsResponse,
};
use courier_rpc::sequencer::to_status;
use courier_rpc::status;
use courier_sequencer::LocalSequencer;
use courier_store::MessageStore;
use courier_store::nodes::{ForgetOutcome, NodeRecord};
use courier_store::ownership::{Duty, ShardOwner};
use courier_store::shard_map::{DEFAULT_OUTBOX_COUNT_LIMIT, ShardState};
use std::sync::Arc;
use std::time::Duration;
use tonic::codegen::InterceptedService;
use tonic::transport::Endpoint;
use tonic::{Request, Response, Status};

/// Longest wait for the target of a move to take the shard, and to connect to it (a target
/// that drops packets otherwise held the move for the kernel's connect retries, ~2 min).
const TAKE_TIMEOUT: Duration = Duration::from_secs(10);

pub struct AdminService {
    store: MessageStore,
    node: String,
    token: ClusterToken,
    /// On a sequencer node: its shards.
    sequencer: Option<Arc<LocalSequencer>>,
    /// On a node with the gateway role: the drain of its connections.
    gateway: Option<Arc<GatewayDrain>>,
}

impl AdminService {
    /// The admin API of node `node`, which runs no sequencer and no gateway (until told with
    /// [`AdminService::with_sequencer`] or [`AdminService::with_gateway`]).
    pub fn new(store: MessageStore, node: String, token: ClusterToken) -> Self {
        Self {
            store,
            node,
            token,
            sequencer: None,
            gateway: None,
        }
    }

    /// The node runs `sequencer`.
    pub fn with_sequencer(self, sequencer: Arc<LocalSequencer>) -> Self {
        Self {
            sequencer: Some(sequencer),
            ..self
        }
    }

    /// The node is a gateway, drained by `drain`.
    pub fn with_gateway(self, drain: Arc<GatewayDrain>) -> Self {
        Self {
            gateway: Some(drain),
            ..self
        }
    }

    pub fn into_server(self) -> InterceptedService<AdminServer<Self>, RequireToken> {
        let token = self.token.clone();
        AdminServer::with_interceptor(self, RequireToken::new(token))
    }

    /// This node's sequencer, or why the call is refused.
    fn sequencer(&self) -> Result<&Arc<LocalSequencer>, Status> {
        self.sequencer.as_ref().ok_or_else(|| {
            Status::failed_precondition(format!(
                "node {} runs no sequencer: call a sequencer node",
                self.node
            ))
        })
    }

    /// Node `id`'s record, if it is a live sequencer node: the only kind a shard may move to.
    /// Checked before the hand-off, which would otherwise leave the shard, leased to a node that
    /// never serves it, unserved until that lease lapses.
    async fn live_sequencer(&self, id: &str) -> Result<NodeRecord, Status> {
        let nodes = self
            .store
            .nodes()
            .await
            .map_err(|e| status::to_status(&e))?;
        let (_, node) = nodes
            .into_iter()
            .find(|(node, _)| node == id)
            .ok_or_else(|| Status::not_found(format!("no node {id} is registered")))?;
        if !node.is_live(now_ms()) {
            return Err(Status::failed_precondition(format!(
                "node {id} is not live: its lease lapsed"
            )));
        }
        if !node.roles.iter().any(|role| role == Role::Sequencer.name()) {
            return Err(Status::failed_precondition(format!(
                "node {id} runs no sequencer"
            )));
        }
        Ok(node)
    }

    /// Asks node `id`, at `address`, to take the shards handed to it now; returns the shards
    /// it owns then.
    async fn tell_to_take(&self, id: &str, address: &str) -> Result<Vec<u32>, Status> {
        let channel = Endpoint::from_shared(format!("http://{address}"))
            .map_err(|e| Status::internal(format!("node {id} has an invalid address: {e}")))?
            .connect_timeout(TAKE_TIMEOUT)
            .timeout(TAKE_TIMEOUT)
            .connect()
            .await
            .map_err(|e| Status::unavailable(format!("cannot reach node {id}: {e}")))?;
        let taken = AdminClient::with_interceptor(channel, AttachToken::new(self.token.clone()))
            .take_shards(TakeShardsRequest {})
            .await?;
        Ok(taken.into_inner().owned)
    }
}

/// The window a `Drain` asks for: `window_ms`, or the gateway's own for 0 (`courier admin
/// drain` sends a window shorter than a millisecond as 1 ms).
pub fn drain_window(window_ms: u64) -> Option<Duration> {
    (window_ms > 0).then(|| Duration::from_millis(window_ms))
}

/// A shard of the map as the API shows it, liveness and ages as of `now_ms`.
fn shard_state(state: ShardState, now_ms: u64) -> pb::ShardState {
    let owner = |owner: ShardOwner| pb::ShardOwner {
        live: owner.is_live(now_ms),
        node: owner.node,
        epoch: owner.epoch,
        lease_until_ms: owner.lease_until_ms,
    };
    pb::ShardState {
        shard: state.shard,
        sequencing: state.sequencing.map(owner),
        delivery: state.delivery.map(owner),
        outbox: Some(pb::OutboxLag {
            entries: state.outbox.entries as u64,
            more: state.outbox.more,
            oldest_age_ms: state.outbox.oldest_age_ms(now_ms),
        }),
    }
}

#[tonic::async_trait]
impl admin_server::Admin for AdminService {
    async fn list_nodes(
        &self,
        _request: Request<ListNodesRequest>,
    ) -> Result<Response<ListNodesResponse>, Status> {
        let now = now_ms();
        let nodes = self
            .store
            .nodes()
            .await
            .map_err(|e| status::to_status(&e))?
            .into_iter()
            .map(|(id, record)| Node {
                live: record.is_live(now),
                id,
                roles: record.roles,
                address: record.address,
                lease_until_ms: record.lease_until_ms,
                started_ms: record.started_ms,
                connections: record.connections,
            })
            .collect();
        Ok(Response::new(ListNodesResponse { nodes }))
    }

    async fn list_shards(
        &self,
        _request: Request<ListShardsRequest>,
    ) -> Result<Response<ListShardsResponse>, Status> {
        let (load, draining) = self
            .sequencer
            .as_ref()
            .map(|s| (s.load(), s.is_draining()))
            .unwrap_or_default();
        let shards = load
            .into_iter()
            .map(|(lease, appends_per_sec)| Shard {
                shard: lease.shard,
                epoch: lease.epoch,
                appends_per_sec,
            })
            .collect();
        Ok(Response::new(ListShardsResponse {
            node: self.node.clone(),
            shards,
            draining,
        }))
    }

    async fn list_shard_map(
        &self,
        request: Request<ListShardMapRequest>,
    ) -> Result<Response<ListShardMapResponse>, Status> {
        let limit = match request.into_inner().outbox_count_limit {
            0 => DEFAULT_OUTBOX_COUNT_LIMIT,
            limit => limit as usize,
        };
        let map = self
            .store
            .shard_map(limit)
            .await
            .map_err(|e| status::to_status(&e))?;
        let now_ms = now_ms();
        let shards = map.into_iter().map(|s| shard_state(s, now_ms)).collect();
        Ok(Response::new(ListShardMapResponse { now_ms, shards }))
    }

    async fn move_shard(
        &self,
        request: Request<MoveShardRequest>,
    ) -> Result<Response<MoveShardResponse>, Status> {
        let MoveShardRequest { shard, to } = request.into_inner();
        if to == self.node {
            return Err(Status::invalid_argument("the shard is already this node's"));
        }
        let shards = self.store.shard_count();
        if shard >= shards {
            return Err(Status::invalid_argument(format!(
                "no shard {shard}: the store has {shards} shards, numbered 0 to {}",
                shards.saturating_sub(1)
            )));
        }
        let sequencer = self.sequencer()?;
        let target = self.live_sequencer(&to).await?;
        sequencer
            .hand_off(shard, &to)
            .await
            .map_err(|e| to_status(&e))?;
        let taken = self.tell_to_take(&to, &target.address).await?;
        if !taken.contains(&shard) {
            // A drained node (still up, so still a live sequencer in the registry) gives a
            // shard handed to it back at once: take it back here rather than leave it to
            // whichever node's round comes next. Otherwise its round failed, and its next one
            // takes the shard leased to it.
            sequencer.keep_round().await;
            let here = sequencer.owned().iter().any(|lease| lease.shard == shard);
            return Err(Status::failed_precondition(if here {
                format!(
                    "node {to} did not take shard {shard} (it was drained): the shard stays on {}",
                    self.node
                )
            } else {
                format!(
                    "node {to} did not take shard {shard} when told: it is leased to {to}, which \
                     takes it at its next lease round"
                )
            }));
        }
        let owner = self
            .store
            .shard_owner(Duty::Sequencing, shard)
            .await
            .map_err(|e| status::to_status(&e))?
            .filter(|owner| owner.node == to)
            .ok_or_else(|| Status::aborted(format!("node {to} did not keep shard {shard}")))?;
        tracing::info!(shard, to, epoch = owner.epoch, "shard moved");
        Ok(Response::new(MoveShardResponse { epoch: owner.epoch }))
    }

    async fn take_shards(
        &self,
        _request: Request<TakeShardsRequest>,
    ) -> Result<Response<TakeShardsResponse>, Status> {
        let sequencer = self.sequencer()?;
        sequencer.keep_round().await;
        let owned = sequencer.owned().iter().map(|l| l.shard).collect();
        Ok(Response::new(TakeShardsResponse { owned }))
    }

    async fn drain(
        &self,
        request: Request<DrainRequest>,
    ) -> Result<Response<DrainResponse>, Status> {
        let DrainRequest { window_ms } = request.into_inner();
        // Checked before anything is drained: a drain's order is for good (a second `Drain`
        // goes on with the first's window), so a window of years left the gateway unready and
        // most of its clients untold until it restarted.
        if drain_window(window_ms).is_some_and(|window| window > MAX_DRAIN_WINDOW) {
            return Err(Status::invalid_argument(format!(
                "a drain window of {window_ms} ms is longer than {}, the longest \
                 --drain-window",
                humantime::format_duration(MAX_DRAIN_WINDOW)
            )));
        }
        let released = match &self.sequencer {
            Some(sequencer) => sequencer.drain().await.map_err(|e| status::to_status(&e))?,
            None => Vec::new(),
        };
        let (connections, window_ms) = match &self.gateway {
            Some(drain) => {
                let order = drain.start(drain_window(window_ms));
                tracing::info!(
                    connections = order.connections,
                    window_ms = order.window.as_millis() as u64,
                    "drain asked through the admin API: not ready any more, clients told to reconnect batch by batch"
                );
                (order.connections as u64, order.window.as_millis() as u64)
            }
            None => (0, 0),
        };
        Ok(Response::new(DrainResponse {
            released,
            connections,
            window_ms,
        }))
    }

    async fn forget_node(
        &self,
        request: Request<ForgetNodeRequest>,
    ) -> Result<Response<ForgetNodeResponse>, Status> {
        let ForgetNodeRequest { id } = request.into_inner();
        if id == self.node {
            return Err(Status::invalid_argument(format!(
                "node {id} is the node answering: call another node"
            )));
        }
        let outcome = self
            .store
            .forget_node(&id, now_ms())
            .await
            .map_err(|e| status::to_status(&e))?;
        match outcome {
            ForgetOutcome::Forgotten { routes_cleared } => {
                tracing::info!(node = %id, routes_cleared, "node forgotten through the admin API");
                Ok(Response::new(ForgetNodeResponse {
                    forgotten: true,
                    routes_cleared: routes_cleared as u64,
                }))
            }
            ForgetOutcome::Unknown => Ok(Response::new(ForgetNodeResponse {
                forgotten: false,
                routes_cleared: 0,
            })),
            ForgetOutcome::Kept { lease_until_ms } => Err(Status::failed_precondition(format!(
                "node {id} is live (its lease runs until {lease_until_ms} ms since the epoch): \
                 stop it first, or wait for its lease to lapse"
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use courier_core::metrics::Metrics;
    use courier_gateway::routes::Routes;
    use courier_rpc::proto::admin_server::Admin as _;
    use courier_store::faulty_engine::FaultyEngine;

    /// A `Drain` whose window passes a day (`--drain-window`'s bound, `u64::MAX` ms at the
    /// most) is refused before anything is drained: taken, it was the drain's order for good
    /// (a second `Drain` goes on with the first's window), the gateway unready and most of its
    /// clients never told to reconnect, short of a restart.
    #[tokio::test]
    async fn a_drain_window_past_a_day_is_refused_before_anything_is_drained() {
        let store = FaultyEngine::new().store(8).await;
        let routes = Arc::new(Routes::new(Arc::new(Metrics::new())));
        let drain = Arc::new(GatewayDrain::new(
            routes,
            Duration::from_secs(60),
            Duration::ZERO,
        ));
        let token = ClusterToken::new("0123456789abcdef0123456789abcdef").unwrap();
        let admin = AdminService::new(store, "g1".into(), token).with_gateway(drain.clone());
        let day_ms = MAX_DRAIN_WINDOW.as_millis() as u64;
        for window_ms in [u64::MAX, day_ms + 1] {
            let refused = admin
                .drain(Request::new(DrainRequest { window_ms }))
                .await
                .unwrap_err();
            assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{window_ms}");
            assert!(!drain.is_draining());
        }
        let drained = admin
            .drain(Request::new(DrainRequest { window_ms: day_ms }))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(drained.window_ms, day_ms);
        assert!(drain.is_draining());
    }
}
