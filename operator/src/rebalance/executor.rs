//! The rebalancer's hands: reads the cluster's shards through the data plane's admin API
//! (`ListNodes`; `ListShardMap`, the owners as the store has them, every shard owned or not;
//! `ListShards` on each sequencer node, the loads it measures) and carries moves out with
//! `MoveShard` on the source node, which freezes the shard, flips owner and epoch in one store
//! commit, and returns once the target serves it.
//!
//! Every call carries the cluster token and has a deadline, and a sample as a whole has one of
//! [`SAMPLE_CALLS`] calls (the seeds and nodes are asked one after another until one answers:
//! each dead one in front would add a call's deadline); a node that does not answer, or
//! reports a load that is no rate (NaN, infinite, negative), makes the sample fail (a partial
//! view could make the planner move shards onto a node that is down), and a failed move is
//! reported with its cause and left to the next plan.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use courier_rpc::ClusterToken;
use courier_rpc::auth::AttachToken;
use courier_rpc::proto::admin_client::AdminClient;
use courier_rpc::proto::{
    DrainRequest, ListNodesRequest, ListShardMapRequest, ListShardsRequest, MoveShardRequest,
};
use futures::future::join_all;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

use super::planner::{ClusterView, Move, ObservedShard, PodId, Rebalancer};

/// The role a node registers to serve shards.
const SEQUENCER_ROLE: &str = "sequencer";

/// A failed admin call.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// The node's address is not a valid URI.
    #[error("the admin address {address:?} is not valid: {source}")]
    Address {
        /// The address as given.
        address: String,
        /// Why.
        source: tonic::transport::Error,
    },
    /// No connection could be made.
    #[error("cannot reach the admin API at {address}: {source}")]
    Connect {
        /// The node's internal address.
        address: String,
        /// Why.
        source: tonic::transport::Error,
    },
    /// The call was answered with an error.
    #[error("{call} on {address} failed: {status}")]
    Call {
        /// The RPC.
        call: &'static str,
        /// The node's internal address.
        address: String,
        /// The node's answer.
        status: Box<tonic::Status>,
    },
    /// None of the seed addresses answered `ListNodes`.
    #[error("no seed address answered ListNodes (tried {tried}); last error: {last}")]
    NoSeed {
        /// The addresses tried.
        tried: String,
        /// The last failure.
        last: Box<AdminError>,
    },
    /// The sample did not end within its deadline ([`SAMPLE_CALLS`] calls' time).
    #[error("no sample within {0:?}: the sequencers' admin API answers too slowly or not at all")]
    SampleDeadline(Duration),
    /// A move names a node that is not a live sequencer node.
    #[error("node {0} is not a live sequencer node")]
    UnknownNode(String),
    /// A node reported a shard's load as something that is no rate of appends.
    #[error("node {node} reported shard {shard}'s load as {value} appends/s, which is no rate")]
    BadLoad {
        /// The node.
        node: String,
        /// The shard.
        shard: u32,
        /// What it reported.
        value: f64,
    },
}

/// What the operator asks of a cluster's sequencer nodes: implemented over gRPC by
/// [`AdminApi`], and by fakes in tests.
#[async_trait::async_trait]
pub trait ShardAdmin: Send + Sync {
    /// Every live sequencer node's shards and loads.
    async fn sample(&self) -> Result<Sample, AdminError>;
    /// Moves `planned.shard` from `planned.from` to `planned.to`; returns the new epoch once
    /// the target serves it.
    async fn move_shard(&self, sample: &Sample, planned: &Move) -> Result<u64, AdminError>;
    /// Makes `node` stop taking shards and release those it owns; returns the released ones.
    async fn drain(&self, sample: &Sample, node: &str) -> Result<Vec<u32>, AdminError>;
}

/// The admin API of a cluster's sequencer nodes.
#[derive(Debug, Clone)]
pub struct AdminApi {
    token: ClusterToken,
    timeout: Duration,
    /// Addresses (`host:port`) to ask for the node list; any sequencer node answers.
    seeds: Vec<String>,
}

type Admin = AdminClient<InterceptedService<Channel, AttachToken>>;

/// The largest answer of the admin API the operator reads: the shard map of the most shards a
/// set may have (65,536), each with a sequencing and a delivery owner of the longest names
/// (63 characters) and the largest numbers, is about 14 MB. gRPC's default, 4 MiB, is passed
/// by about 44,000 shards of a cluster's usual names: such a set was never sampled.
pub const ADMIN_ANSWER_LIMIT: usize = 32 << 20;

/// How many calls' deadlines a whole sample may take: `ListNodes`, `ListShardMap`, then every
/// node's `ListShards` at once. Without it, seeds that do not answer were tried one after
/// another, a deadline each: a partition from a set of 100 pods held a sample (and the set's
/// reconciliation, its deletion included) for over half an hour.
pub const SAMPLE_CALLS: u32 = 3;

/// What one sample saw: the live sequencer nodes and their addresses, every shard a live
/// node holds and the others.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Sample {
    /// Live sequencer nodes by id, with their internal address.
    pub nodes: BTreeMap<PodId, String>,
    /// Every shard a live node owns (by the store's ownership records), with its load.
    pub shards: BTreeMap<u32, ObservedShard>,
    /// The shards no live sequencer node holds: released, lapsed (their owner died) or never
    /// owned. A sequencer takes them at its next lease round; until then moves wait.
    pub unowned: BTreeSet<u32>,
    /// How long the oldest event waiting for fanout, in any shard's outbox, has waited (ms,
    /// from the store's shard map). Milliseconds when delivery keeps up.
    pub outbox_lag_ms: u64,
    /// The live nodes that drain (their own word, `ListShards`): they take no shard, and are
    /// planned from as leaving pods are, never to.
    pub draining: BTreeSet<PodId>,
}

impl Sample {
    /// The planner's view: the shards as sampled, held by `pods` (default: every live node)
    /// less the draining nodes. A draining node would give back at once any shard moved to it
    /// (the move failing, the shard frozen twice for nothing); what it still owns is
    /// evacuated.
    pub fn view(&self, pods: Option<&BTreeSet<PodId>>) -> ClusterView {
        let pods = pods
            .cloned()
            .unwrap_or_else(|| self.nodes.keys().cloned().collect());
        ClusterView {
            pods: pods.difference(&self.draining).cloned().collect(),
            shards: self.shards.clone(),
        }
    }
}

impl AdminApi {
    /// The admin API reached through `seeds` (`host:port` of sequencer nodes, e.g. the
    /// sequencers' headless Service), each call bounded by `timeout`.
    pub fn new(token: ClusterToken, seeds: Vec<String>, timeout: Duration) -> Self {
        AdminApi {
            token,
            timeout,
            seeds,
        }
    }

    async fn client(&self, address: &str) -> Result<Admin, AdminError> {
        let endpoint = Endpoint::from_shared(format!("http://{address}"))
            .map_err(|source| AdminError::Address {
                address: address.to_owned(),
                source,
            })?
            .connect_timeout(self.timeout)
            .timeout(self.timeout);
        let channel = endpoint
            .connect()
            .await
            .map_err(|source| AdminError::Connect {
                address: address.to_owned(),
                source,
            })?;
        Ok(
            AdminClient::with_interceptor(channel, AttachToken::new(self.token.clone()))
                .max_decoding_message_size(ADMIN_ANSWER_LIMIT),
        )
    }

    /// The live sequencer nodes and their addresses, from the first seed that answers.
    pub async fn sequencers(&self) -> Result<BTreeMap<PodId, String>, AdminError> {
        let mut last = None;
        for seed in &self.seeds {
            match self.list_nodes(seed).await {
                Ok(nodes) => return Ok(nodes),
                Err(e) => last = Some(e),
            }
        }
        Err(AdminError::NoSeed {
            tried: self.seeds.join(", "),
            last: Box::new(last.unwrap_or(AdminError::UnknownNode("(no seeds)".into()))),
        })
    }

    async fn list_nodes(&self, address: &str) -> Result<BTreeMap<PodId, String>, AdminError> {
        let nodes = self
            .client(address)
            .await?
            .list_nodes(ListNodesRequest {})
            .await
            .map_err(|status| call_error("ListNodes", address, status))?
            .into_inner()
            .nodes;
        Ok(nodes
            .into_iter()
            .filter(|node| node.live && node.roles.iter().any(|r| r == SEQUENCER_ROLE))
            .map(|node| (node.id, node.address))
            .collect())
    }

    /// The store's shard map (from the first node that answers), and every live sequencer
    /// node's loads, read concurrently. A shard's owner is the store's: a node that still
    /// reports a shard it just lost is not believed.
    async fn read_sample(&self) -> Result<Sample, AdminError> {
        let nodes = self.sequencers().await?;
        let map = self.shard_map(&nodes).await?;
        let answers = join_all(nodes.iter().map(|(id, address)| async move {
            let answer = self
                .client(address)
                .await?
                .list_shards(ListShardsRequest {})
                .await
                .map_err(|status| call_error("ListShards", address, status))?
                .into_inner();
            Ok::<_, AdminError>((id.clone(), answer))
        }))
        .await;
        let mut loads = BTreeMap::new();
        let mut draining = BTreeSet::new();
        for answer in answers {
            let (node, answer) = answer?;
            if answer.draining {
                draining.insert(node.clone());
            }
            for shard in answer.shards {
                let load = checked_load(&node, shard.shard, shard.appends_per_sec)?;
                loads.insert((node.clone(), shard.shard), load);
            }
        }
        let outbox_lag_ms = map
            .iter()
            .filter_map(|state| state.outbox.as_ref().map(|lag| lag.oldest_age_ms))
            .max()
            .unwrap_or(0);
        let mut shards = BTreeMap::new();
        let mut unowned = BTreeSet::new();
        for state in map {
            match state.sequencing {
                Some(owner) if owner.live && nodes.contains_key(&owner.node) => {
                    let load = loads
                        .get(&(owner.node.clone(), state.shard))
                        .copied()
                        .unwrap_or(0.0);
                    shards.insert(
                        state.shard,
                        ObservedShard {
                            owner: owner.node,
                            load,
                        },
                    );
                }
                _ => {
                    unowned.insert(state.shard);
                }
            }
        }
        Ok(Sample {
            nodes,
            shards,
            unowned,
            outbox_lag_ms,
            draining,
        })
    }

    /// The shard map, from the first of `nodes` that answers (any node reads it from the
    /// store). One outbox entry is counted per shard: the age of the oldest is what the
    /// sample keeps.
    async fn shard_map(
        &self,
        nodes: &BTreeMap<PodId, String>,
    ) -> Result<Vec<courier_rpc::proto::ShardState>, AdminError> {
        let mut last = None;
        for address in nodes.values() {
            let answer = match self.client(address).await {
                Ok(mut client) => client
                    .list_shard_map(ListShardMapRequest {
                        outbox_count_limit: 1,
                    })
                    .await
                    .map_err(|status| call_error("ListShardMap", address, status)),
                Err(e) => Err(e),
            };
            match answer {
                Ok(map) => return Ok(map.into_inner().shards),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or(AdminError::UnknownNode("(no live sequencer node)".into())))
    }

    fn address<'a>(sample: &'a Sample, node: &str) -> Result<&'a str, AdminError> {
        sample
            .nodes
            .get(node)
            .map(String::as_str)
            .ok_or_else(|| AdminError::UnknownNode(node.to_owned()))
    }
}

#[async_trait::async_trait]
impl ShardAdmin for AdminApi {
    async fn sample(&self) -> Result<Sample, AdminError> {
        let deadline = self.timeout * SAMPLE_CALLS;
        tokio::time::timeout(deadline, self.read_sample())
            .await
            .map_err(|_| AdminError::SampleDeadline(deadline))?
    }

    async fn move_shard(&self, sample: &Sample, planned: &Move) -> Result<u64, AdminError> {
        if !sample.nodes.contains_key(&planned.to) {
            return Err(AdminError::UnknownNode(planned.to.clone()));
        }
        let address = Self::address(sample, &planned.from)?;
        let moved = self
            .client(address)
            .await?
            .move_shard(MoveShardRequest {
                shard: planned.shard,
                to: planned.to.clone(),
            })
            .await
            .map_err(|status| call_error("MoveShard", address, status))?;
        Ok(moved.into_inner().epoch)
    }

    async fn drain(&self, sample: &Sample, node: &str) -> Result<Vec<u32>, AdminError> {
        let address = Self::address(sample, node)?;
        let drained = self
            .client(address)
            .await?
            .drain(DrainRequest::default())
            .await
            .map_err(|status| call_error("Drain", address, status))?;
        Ok(drained.into_inner().released)
    }
}

/// `value`, the load `node` reported for `shard`, if it is a rate (finite, not negative): a
/// node reporting anything else fails the sample as one that does not answer does. Planned
/// from, it could move shards anywhere; written to the set's status (JSON has no NaN), it made
/// every status write fail.
fn checked_load(node: &str, shard: u32, value: f64) -> Result<f64, AdminError> {
    match value.is_finite() && value >= 0.0 {
        true => Ok(value),
        false => Err(AdminError::BadLoad {
            node: node.to_owned(),
            shard,
            value,
        }),
    }
}

fn call_error(call: &'static str, address: &str, status: tonic::Status) -> AdminError {
    AdminError::Call {
        call,
        address: address.to_owned(),
        status: Box::new(status),
    }
}

/// What one rebalancing step did.
#[derive(Debug, Default)]
pub struct Step {
    /// The view the plan was made from.
    pub view: ClusterView,
    /// The moves planned (carried out only when the step was told to).
    pub planned: Vec<Move>,
    /// The moves carried out, with the new epoch or the failure.
    pub done: Vec<(Move, Result<u64, AdminError>)>,
}

/// Samples the loads, folds them into `rebalancer`, plans, and (when `execute`) carries the
/// moves out concurrently (see [`carry_out`]). `pods` are the pods meant to hold shards (default: every live
/// sequencer node); `now_ms` is read when the plan is made and again as each move ends.
pub async fn step(
    rebalancer: &mut Rebalancer,
    api: &dyn ShardAdmin,
    pods: Option<&BTreeSet<PodId>>,
    execute: bool,
    now_ms: impl Fn() -> u64,
) -> Result<Step, AdminError> {
    let sample = api.sample().await?;
    let view = sample.view(pods);
    rebalancer.observe(&view);
    let planned = rebalancer.plan(&view, now_ms());
    if !execute {
        return Ok(Step {
            view,
            planned,
            done: Vec::new(),
        });
    }
    let done = carry_out(rebalancer, api, &sample, &planned, now_ms).await;
    Ok(Step {
        view,
        planned,
        done,
    })
}

/// Carries `moves` out concurrently, recording each in `rebalancer` as it starts and ends.
pub async fn carry_out(
    rebalancer: &mut Rebalancer,
    api: &dyn ShardAdmin,
    sample: &Sample,
    moves: &[Move],
    now_ms: impl Fn() -> u64,
) -> Vec<(Move, Result<u64, AdminError>)> {
    for planned in moves {
        rebalancer.started(planned);
    }
    let outcomes = join_all(moves.iter().map(|m| api.move_shard(sample, m))).await;
    let mut done = Vec::new();
    for (planned, outcome) in moves.iter().zip(outcomes) {
        rebalancer.finished(planned, now_ms());
        done.push((planned.clone(), outcome));
    }
    done
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One sequencer node, `s-0`, owning every shard of a set of `shards`, with names as long
    /// as a cluster's (its fanout pods' included).
    struct OneNode {
        address: String,
        shards: u32,
    }

    type Answer<T> = Result<tonic::Response<T>, tonic::Status>;

    #[async_trait::async_trait]
    impl courier_rpc::proto::admin_server::Admin for OneNode {
        async fn list_nodes(
            &self,
            _: tonic::Request<ListNodesRequest>,
        ) -> Answer<courier_rpc::proto::ListNodesResponse> {
            let node = courier_rpc::proto::Node {
                id: "s-0".into(),
                roles: vec![SEQUENCER_ROLE.into()],
                address: self.address.clone(),
                live: true,
                ..Default::default()
            };
            Ok(tonic::Response::new(
                courier_rpc::proto::ListNodesResponse { nodes: vec![node] },
            ))
        }

        async fn list_shards(
            &self,
            _: tonic::Request<ListShardsRequest>,
        ) -> Answer<courier_rpc::proto::ListShardsResponse> {
            Ok(tonic::Response::new(Default::default()))
        }

        async fn list_shard_map(
            &self,
            _: tonic::Request<ListShardMapRequest>,
        ) -> Answer<courier_rpc::proto::ListShardMapResponse> {
            use courier_rpc::proto::{OutboxLag, ShardOwner, ShardState};
            let owner = |node: &str| ShardOwner {
                node: node.into(),
                epoch: 123_456,
                lease_until_ms: 1_796_551_200_000,
                live: true,
            };
            let shards = (0..self.shards)
                .map(|shard| ShardState {
                    shard,
                    sequencing: Some(owner("s-0")),
                    delivery: Some(owner("prod-fanout-5d8f7c9b6-x2x4z")),
                    outbox: Some(OutboxLag {
                        entries: 1,
                        more: false,
                        oldest_age_ms: 250,
                    }),
                })
                .collect();
            Ok(tonic::Response::new(
                courier_rpc::proto::ListShardMapResponse {
                    now_ms: 1_796_551_200_000,
                    shards,
                },
            ))
        }

        async fn move_shard(
            &self,
            _: tonic::Request<MoveShardRequest>,
        ) -> Answer<courier_rpc::proto::MoveShardResponse> {
            Err(tonic::Status::unimplemented("not in this test"))
        }

        async fn take_shards(
            &self,
            _: tonic::Request<courier_rpc::proto::TakeShardsRequest>,
        ) -> Answer<courier_rpc::proto::TakeShardsResponse> {
            Err(tonic::Status::unimplemented("not in this test"))
        }

        async fn drain(
            &self,
            _: tonic::Request<DrainRequest>,
        ) -> Answer<courier_rpc::proto::DrainResponse> {
            Err(tonic::Status::unimplemented("not in this test"))
        }

        async fn forget_node(
            &self,
            _: tonic::Request<courier_rpc::proto::ForgetNodeRequest>,
        ) -> Answer<courier_rpc::proto::ForgetNodeResponse> {
            Err(tonic::Status::unimplemented("not in this test"))
        }
    }

    /// The shard map of a set of the most shards its CRD takes (65,536: about 6 MB on the
    /// wire) is read whole: past gRPC's default of 4 MiB, a set of more than about 44,000
    /// shards was never sampled, so never rebalanced, and its StatefulSet never shrank.
    #[tokio::test]
    async fn the_shard_map_of_the_most_shards_a_set_may_have_is_read() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let node = OneNode {
            address: address.clone(),
            shards: 65_536,
        };
        let server = tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(courier_rpc::proto::admin_server::AdminServer::new(node))
                .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
        );
        let token = ClusterToken::new(&"t".repeat(32)).unwrap();
        let admin = AdminApi::new(token, vec![address], Duration::from_secs(10));
        let sample = admin.sample().await.expect("the whole map");
        assert_eq!(sample.shards.len(), 65_536);
        assert!(sample.unowned.is_empty());
        server.abort();
    }

    /// Seeds that take the connection and never answer (a partition, a hung node) fail the
    /// sample within its deadline, not after each seed's deadline in turn.
    #[tokio::test]
    async fn a_sample_of_seeds_that_never_answer_ends_at_its_deadline() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let silent = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((stream, _)) = listener.accept().await {
                held.push(stream);
            }
        });
        let token = ClusterToken::new(&"t".repeat(32)).unwrap();
        let seeds = vec![address; 100];
        let admin = AdminApi::new(token, seeds, Duration::from_millis(50));
        match admin.sample().await {
            Err(AdminError::SampleDeadline(deadline)) => {
                assert_eq!(deadline, Duration::from_millis(150));
            }
            other => panic!("{other:?}"),
        }
        silent.abort();
    }

    /// A load that is no rate (NaN, infinite, negative) fails the sample, as a node that does
    /// not answer does: planned from, it could move shards anywhere, and written to the
    /// status (JSON has no NaN) it made every status write of the set fail.
    #[test]
    fn a_load_that_is_no_rate_fails_the_sample() {
        assert_eq!(checked_load("s-0", 3, 12.5).unwrap(), 12.5);
        assert_eq!(checked_load("s-0", 3, 0.0).unwrap(), 0.0);
        for garbage in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY, -1.0] {
            let error = checked_load("s-0", 3, garbage).unwrap_err();
            assert!(
                error
                    .to_string()
                    .starts_with("node s-0 reported shard 3's load as"),
                "{error}"
            );
        }
    }
}
