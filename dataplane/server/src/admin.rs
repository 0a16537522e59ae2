//! The admin API of a sequencer node (`courier.internal.v1.Admin`, on the internal port, behind
//! the cluster token): what the operator reads (nodes, shards and their load) and the moves it
//! makes (move a shard, take shards now, drain the node).
//!
//! A move is the hand-off of `LocalSequencer::hand_off` (freeze here, flip owner and epoch in
//! one commit), then a call to the target's `TakeShards`, so that the move returns once the
//! target serves the shard. A move that fails after the flip leaves the shard to the target in
//! the store; the target takes it at its next lease round.

use courier_core::clock::now_ms;
use courier_rpc::ClusterToken;
use courier_rpc::auth::{AttachToken, RequireToken};
use courier_rpc::proto::admin_client::AdminClient;
use courier_rpc::proto::admin_server::{self, AdminServer};
use courier_rpc::proto::{
    DrainRequest, DrainResponse, ListNodesRequest, ListNodesResponse, ListShardsRequest,
    ListShardsResponse, MoveShardRequest, MoveShardResponse, Node, Shard, TakeShardsRequest,
    TakeShardsResponse,
};
use courier_rpc::sequencer::to_status;
use courier_rpc::status;
use courier_sequencer::LocalSequencer;
use courier_store::MessageStore;
use courier_store::ownership::Duty;
use std::sync::Arc;
use std::time::Duration;
use tonic::codegen::InterceptedService;
use tonic::transport::Endpoint;
use tonic::{Request, Response, Status};

/// Longest wait for the target of a move to take the shard.
const TAKE_TIMEOUT: Duration = Duration::from_secs(10);

pub struct AdminService {
    store: MessageStore,
    node: String,
    sequencer: Arc<LocalSequencer>,
    token: ClusterToken,
}

impl AdminService {
    pub fn new(
        store: MessageStore,
        node: String,
        sequencer: Arc<LocalSequencer>,
        token: ClusterToken,
    ) -> Self {
        Self {
            store,
            node,
            sequencer,
            token,
        }
    }

    pub fn into_server(self) -> InterceptedService<AdminServer<Self>, RequireToken> {
        let token = self.token.clone();
        AdminServer::with_interceptor(self, RequireToken::new(token))
    }

    /// Asks node `id` to take the shards handed to it now.
    async fn tell_to_take(&self, id: &str) -> Result<(), Status> {
        let nodes = self
            .store
            .nodes()
            .await
            .map_err(|e| status::to_status(&e))?;
        let (_, node) = nodes
            .into_iter()
            .find(|(node, _)| node == id)
            .ok_or_else(|| Status::not_found(format!("no node {id} is registered")))?;
        let channel = Endpoint::from_shared(format!("http://{}", node.address))
            .map_err(|e| Status::internal(format!("node {id} has an invalid address: {e}")))?
            .timeout(TAKE_TIMEOUT)
            .connect()
            .await
            .map_err(|e| Status::unavailable(format!("cannot reach node {id}: {e}")))?;
        AdminClient::with_interceptor(channel, AttachToken::new(self.token.clone()))
            .take_shards(TakeShardsRequest {})
            .await?;
        Ok(())
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
            })
            .collect();
        Ok(Response::new(ListNodesResponse { nodes }))
    }

    async fn list_shards(
        &self,
        _request: Request<ListShardsRequest>,
    ) -> Result<Response<ListShardsResponse>, Status> {
        let shards = self
            .sequencer
            .load()
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
        }))
    }

    async fn move_shard(
        &self,
        request: Request<MoveShardRequest>,
    ) -> Result<Response<MoveShardResponse>, Status> {
        let MoveShardRequest { shard, to } = request.into_inner();
        if to == self.node {
            return Err(Status::invalid_argument("the shard is already this node's"));
        }
        self.sequencer
            .hand_off(shard, &to)
            .await
            .map_err(|e| to_status(&e))?;
        self.tell_to_take(&to).await?;
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
        self.sequencer.keep_round().await;
        let owned = self.sequencer.owned().iter().map(|l| l.shard).collect();
        Ok(Response::new(TakeShardsResponse { owned }))
    }

    async fn drain(
        &self,
        _request: Request<DrainRequest>,
    ) -> Result<Response<DrainResponse>, Status> {
        let released = self
            .sequencer
            .drain()
            .await
            .map_err(|e| status::to_status(&e))?;
        Ok(Response::new(DrainResponse { released }))
    }
}
