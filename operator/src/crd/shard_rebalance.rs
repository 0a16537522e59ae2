//! `ShardRebalance`: the plan of a `SequencerShardSet` in rebalance mode `Proposal`, waiting
//! for a person (after Strimzi's `KafkaRebalance`). The operator writes it, one per shard set,
//! named `<set>-rebalance` and owned by the set; a user reads the moves and approves them with
//! the annotation `courier.dev/rebalance=approve`, or asks for a new plan with
//! `courier.dev/rebalance=refresh`.
//!
//! Its state is its one condition whose status is `True`: `ProposalReady`, `Rebalancing`,
//! `Ready` (carried out), `Stale` (no longer applicable) or `Failed`.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{ConditionType, RecordedMove};

/// The shard set a plan is for; the plan itself is in the status, written by the operator.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "courier.dev",
    version = "v1alpha1",
    kind = "ShardRebalance",
    namespaced,
    status = "ShardRebalanceStatus",
    shortname = "srb",
    category = "courier",
    doc = "A plan of sequencer shard moves (rebalance mode Proposal): approve it with the annotation courier.dev/rebalance=approve, or ask for a new one with courier.dev/rebalance=refresh.",
    printcolumn = r#"{"name": "Shard Set", "type": "string", "jsonPath": ".spec.shardSet"}"#,
    printcolumn = r#"{"name": "State", "type": "string", "jsonPath": ".status.conditions[?(@.status==\"True\")].type"}"#,
    printcolumn = r#"{"name": "Moves", "type": "integer", "jsonPath": ".status.moveCount"}"#,
    printcolumn = r#"{"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct ShardRebalanceSpec {
    /// The `SequencerShardSet` (same namespace) whose shards the plan moves.
    #[schemars(length(min = 1, max = 63))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("shardSet is immutable: a ShardRebalance plans the moves of one SequencerShardSet"))]
    pub shard_set: String,
}

/// The plan, where it stands, and what its moves did.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", remote = "Self")]
// Read with `stored::salvage` (the `Deserialize` of `salvaged!`); named as ever in schemas.
#[schemars(rename = "ShardRebalanceStatus")]
pub struct ShardRebalanceStatus {
    /// The generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// The moves of the plan, in order.
    #[serde(default)]
    pub moves: Vec<ProposedMove>,
    /// How many moves the plan has.
    #[serde(default)]
    pub move_count: u32,
    /// Once approved: each move's outcome (the shard's new epoch, why it failed, or why it was
    /// dropped), in the plan's order.
    #[serde(default)]
    pub outcomes: Vec<RecordedMove>,
    /// When this plan was made.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proposed_at: Option<Time>,
    /// When its moves started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<Time>,
    /// When its moves ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<Time>,
    /// The state: one condition with status `True`, of type `ProposalReady`, `Rebalancing`,
    /// `Ready`, `Stale` or `Failed`.
    #[serde(default)]
    pub conditions: Vec<Condition>,
    /// What of the stored status could not be read (`stored`); never written.
    #[serde(skip)]
    pub unreadable: Vec<String>,
}

impl ShardRebalanceStatus {
    /// The state: the type of the condition whose status is `True`.
    pub fn state(&self) -> Option<ConditionType> {
        self.conditions
            .iter()
            .find(|c| c.status == "True")
            .and_then(|c| ConditionType::parse(&c.type_))
    }
}

/// One move of a plan.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ProposedMove {
    /// The shard.
    pub shard: u32,
    /// The pod that has it.
    pub from: String,
    /// The pod to take it.
    pub to: String,
    /// Why: `Isolate`, `Relieve` or `Fill`.
    pub reason: String,
}
