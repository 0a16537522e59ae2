//! The hot-shard rebalancer: a pure [`planner`] and an [`executor`] that reads the shards'
//! loads from the sequencer pods' admin API and carries the planned moves out through it.

pub mod executor;
pub mod planner;
pub mod simulation;

pub use planner::{ClusterView, Move, MoveReason, ObservedShard, PlannerPolicy, PodId, Rebalancer};
