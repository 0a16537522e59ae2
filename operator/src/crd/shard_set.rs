//! `SequencerShardSet`: the sequencer pods, the fixed number of logical shards they share,
//! and the policy of the hot-shard rebalancer; its status holds the load per pod and the moves
//! made. In mode `Proposal` the plan waits in a `ShardRebalance` (`shard_rebalance.rs`).

use k8s_openapi::api::core::v1::ResourceRequirements;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The sequencer pods of a CourierCluster.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "courier.dev",
    version = "v1alpha1",
    kind = "SequencerShardSet",
    namespaced,
    status = "SequencerShardSetStatus",
    shortname = "sss",
    category = "courier",
    doc = "The sequencer pods of a CourierCluster, their logical shards and the rebalancing policy.",
    printcolumn = r#"{"name": "Cluster", "type": "string", "jsonPath": ".spec.cluster"}"#,
    printcolumn = r#"{"name": "Shards", "type": "integer", "jsonPath": ".spec.shards"}"#,
    printcolumn = r#"{"name": "Replicas", "type": "integer", "jsonPath": ".spec.replicas"}"#,
    printcolumn = r#"{"name": "Mode", "type": "string", "jsonPath": ".spec.rebalance.mode"}"#,
    printcolumn = r#"{"name": "Max/Mean", "type": "number", "jsonPath": ".status.maxOverMean"}"#,
    printcolumn = r#"{"name": "Rebalancing", "type": "string", "jsonPath": ".status.conditions[?(@.type==\"Rebalancing\")].status"}"#,
    // `render::sequencers::MAX_STATEFUL_SET_NAME`: the StatefulSet takes the set's name.
    validation = Rule::new("size(self.metadata.name) <= 52").message("metadata.name is too long: at most 52 characters, or Kubernetes creates no pod of the set's StatefulSet (its pods' controller-revision-hash label would pass 63 characters)")
)]
#[serde(rename_all = "camelCase")]
pub struct SequencerShardSetSpec {
    /// The `CourierCluster` (same namespace) whose image, storage and secrets the pods use.
    #[schemars(length(min = 1, max = 63))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("cluster is immutable: the pods are selected by their cluster, and Kubernetes refuses to change a StatefulSet's selector; create a shard set for the other cluster instead"))]
    pub cluster: String,
    /// Logical shards, fixed when the store was created.
    #[schemars(range(min = 1, max = 65536))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("shards is immutable: the store was created with this many logical shards"))]
    pub shards: u32,
    /// Pods, resources and the rebalancing policy.
    #[serde(flatten)]
    pub sequencers: SequencerSettings,
}

/// How many sequencer pods, and how shards are balanced between them.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SequencerSettings {
    /// Sequencer pods. Scaling down evacuates the last pods' shards before deleting them.
    #[serde(default = "default_replicas")]
    #[schemars(range(min = 1, max = 1000))]
    pub replicas: i32,
    /// CPU and memory of each pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// The hot-shard rebalancer.
    #[serde(default)]
    pub rebalance: RebalancePolicy,
}

impl Default for SequencerSettings {
    fn default() -> Self {
        Self {
            replicas: default_replicas(),
            resources: None,
            rebalance: RebalancePolicy::default(),
        }
    }
}

fn default_replicas() -> i32 {
    3
}

/// What the rebalancer does, and within which limits. Defaults follow TiDB PD, CockroachDB
/// and Cruise Control practice (`docs/rebalancing.md`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RebalancePolicy {
    /// `Auto` moves shards; `Proposal` writes the plan to the ShardRebalance `<set>-rebalance`
    /// and moves once it has the annotation `courier.dev/rebalance=approve`; `Off` only
    /// reports loads.
    #[serde(default)]
    pub mode: RebalanceMode,
    /// A pod is hot above the mean pod load by this percentage (and cold below it by as much).
    #[serde(default = "default_tolerance")]
    #[schemars(range(min = 1, max = 100))]
    pub tolerance_percent: u32,
    /// A move must cut its source pod's load by at least this percentage.
    #[serde(default = "default_min_benefit")]
    #[schemars(range(min = 0, max = 100))]
    pub min_benefit_percent: u32,
    /// Moves in flight at once, over all pods.
    #[serde(default = "default_max_moves")]
    #[schemars(range(min = 1, max = 64))]
    pub max_concurrent_moves: u32,
    /// A moved shard stays put this long (at most a week).
    #[serde(default = "default_cooldown")]
    #[schemars(range(min = 0, max = 604800))]
    pub cooldown_seconds: u64,
    /// Time between load samples (each sample reads every pod's shard loads), at most an hour.
    #[serde(default = "default_sample")]
    #[schemars(range(min = 1, max = 3600))]
    pub sample_seconds: u64,
    /// Time between plans (each gets up to 10 % of jitter), at most a day; mode `Off` plans
    /// nothing.
    #[serde(default = "default_interval")]
    #[schemars(range(min = 1, max = 86400))]
    pub interval_seconds: u64,
}

impl Default for RebalancePolicy {
    fn default() -> Self {
        Self {
            mode: RebalanceMode::default(),
            tolerance_percent: default_tolerance(),
            min_benefit_percent: default_min_benefit(),
            max_concurrent_moves: default_max_moves(),
            cooldown_seconds: default_cooldown(),
            sample_seconds: default_sample(),
            interval_seconds: default_interval(),
        }
    }
}

fn default_tolerance() -> u32 {
    10
}
fn default_min_benefit() -> u32 {
    5
}
fn default_max_moves() -> u32 {
    4
}
fn default_cooldown() -> u64 {
    600
}
fn default_sample() -> u64 {
    15
}
fn default_interval() -> u64 {
    60
}

/// Whether the rebalancer moves shards by itself.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum RebalanceMode {
    /// Plans are carried out as they are made.
    #[default]
    Auto,
    /// Plans wait in a `ShardRebalance` for approval by annotation.
    Proposal,
    /// No plan is made; loads are still reported.
    Off,
}

/// What the operator last saw of a shard set.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", remote = "Self")]
// Read with `stored::salvage` (the `Deserialize` of `salvaged!`); named as ever in schemas.
#[schemars(rename = "SequencerShardSetStatus")]
pub struct SequencerShardSetStatus {
    /// The generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Pods the StatefulSet runs.
    #[serde(default)]
    pub replicas: i32,
    /// Pods that pass `/readyz`.
    #[serde(default)]
    pub ready_replicas: i32,
    /// The load of the busiest pod over the mean, at the last sample (1.0 is even).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_over_mean: Option<f64>,
    /// Shards and load (appends per second) per pod, at the last sample.
    #[serde(default)]
    pub pods: Vec<PodLoad>,
    /// The latest moves, newest last (at most 20).
    #[serde(default)]
    pub recent_moves: Vec<RecordedMove>,
    /// Ready, Progressing, Degraded, Rebalancing.
    #[serde(default)]
    pub conditions: Vec<Condition>,
    /// What of the stored status could not be read (`stored`); never written.
    #[serde(skip)]
    pub unreadable: Vec<String>,
}

/// One pod's share.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PodLoad {
    /// The pod (its node id).
    pub pod: String,
    /// Shards it owns.
    pub shards: u32,
    /// Appends per second over its shards.
    pub appends_per_sec: f64,
}

/// A move the rebalancer made.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RecordedMove {
    /// The shard.
    pub shard: u32,
    /// The pod it left.
    pub from: String,
    /// The pod it went to.
    pub to: String,
    /// Why: `Evacuate`, `Isolate`, `Relieve` or `Fill`.
    pub reason: String,
    /// The shard's epoch under its new owner, or why the move failed (or, in a
    /// `ShardRebalance`, why it was dropped).
    pub outcome: String,
    /// When it finished (RFC 3339).
    pub at: String,
}
