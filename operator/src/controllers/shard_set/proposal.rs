//! Mode `Proposal`: a set's load moves wait in a `ShardRebalance` named `<set>-rebalance`,
//! owned by the set (so it goes when the set goes), until a user approves them with
//! `kubectl annotate srb <set>-rebalance courier.dev/rebalance=approve`.
//!
//! At every sample the set's reconciliation reads it and [`decide`]s, without I/O:
//! - a plan approved while `ProposalReady`, or found `Rebalancing` (the operator stopped during
//!   its moves), is carried out through the executor; moves whose shard changed owner, or whose
//!   target is no longer one of the set's pods, are dropped with the reason in the outcomes;
//! - otherwise a planning round that yields other moves than the plan's replaces it (state
//!   `ProposalReady` again, outcomes cleared), and one that yields none makes a waiting plan
//!   `Stale`; `courier.dev/rebalance=refresh` makes a round due at once;
//! - an approval waits while load moves wait (pods not ready, failover, or leaving pods being
//!   evacuated), and is acted on at the first sample after it (within `sampleSeconds`).
//!
//! Invariants: one plan per set; an annotation is removed once acted on, before any move, so
//! an approval carries out one plan and never the next one. Failure policy: the state
//! `Rebalancing` is written before the moves start, so a plan interrupted by a crash or a
//! failed write is resumed at the next sample; its moves already made are found at their
//! target and count as done.

use std::collections::BTreeSet;
use std::fmt;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams};
use kube::runtime::events::EventType;
use kube::{Api, ResourceExt};

use super::{outcome_text, recorded_move};
use crate::controllers::{Context, Error, apply, apply_status};
use crate::crd::{
    ConditionType, Conditions, ProposedMove, Salvaged, SequencerShardSet, ShardRebalance,
    ShardRebalanceSpec, ShardRebalanceStatus,
};
use crate::rebalance::executor::{AdminError, Sample};
use crate::rebalance::{Move, MoveReason, PodId};
use crate::render::{name_and_namespace, owner_reference};

/// The annotation of a `ShardRebalance` through which a user approves its plan (`approve`) or
/// asks for a new one (`refresh`).
pub const REBALANCE_ANNOTATION: &str = "courier.dev/rebalance";

/// What the annotation asks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// `approve`: carry the plan out.
    Approve,
    /// `refresh`: plan again now.
    Refresh,
    /// Any other value; it is reported, not acted on.
    Unknown(String),
}

impl Request {
    /// The request the annotation of `rebalance` makes, if it has one.
    pub fn of(rebalance: &ShardRebalance) -> Option<Request> {
        let value = rebalance.annotations().get(REBALANCE_ANNOTATION)?;
        Some(match value.as_str() {
            "approve" => Request::Approve,
            "refresh" => Request::Refresh,
            other => Request::Unknown(other.to_owned()),
        })
    }
}

/// The name of the `ShardRebalance` of the set `set`.
pub fn rebalance_name(set: &str) -> String {
    format!("{set}-rebalance")
}

/// The `ShardRebalance` of `set`, owned by it; the status is applied on its own.
pub fn build(set: &SequencerShardSet) -> Result<ShardRebalance, Error> {
    let (name, namespace) = name_and_namespace(set)?;
    let mut rebalance = ShardRebalance::new(
        &rebalance_name(&name),
        ShardRebalanceSpec { shard_set: name },
    );
    rebalance.metadata.namespace = Some(namespace);
    rebalance.metadata.owner_references = Some(vec![owner_reference(set)?]);
    Ok(rebalance)
}

/// What a sample does with the plan.
#[derive(Debug, Clone, PartialEq)]
pub enum PlanAction {
    /// Nothing is written.
    Keep,
    /// The round's moves become the plan, waiting for approval.
    Propose(Vec<Move>),
    /// The plan is carried out.
    Execute(Execution),
    /// The plan no longer applies, for this reason.
    Stale(String),
}

/// An approved plan, split at the current sample.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Execution {
    /// The moves still valid, in the plan's order.
    pub moves: Vec<Move>,
    /// The others, and why they are not made.
    pub dropped: Vec<(Move, Dropped)>,
}

/// Why a move of an approved plan is not made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Dropped {
    /// Its shard is at its target already (moved before an interruption).
    AlreadyMoved,
    /// Its shard is on another pod now.
    OwnerChanged(PodId),
    /// Its shard has no live owner now.
    Unowned,
    /// Its target is no longer one of the set's pods, or it drains.
    TargetGone,
}

impl fmt::Display for Dropped {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Dropped::AlreadyMoved => f.write_str("already moved"),
            Dropped::OwnerChanged(owner) => write!(f, "dropped: the shard is on {owner} now"),
            Dropped::Unowned => f.write_str("dropped: the shard has no live owner"),
            Dropped::TargetGone => {
                f.write_str("dropped: the target is not a pod of the set, or it drains")
            }
        }
    }
}

/// What a sample does with the plan and its annotation.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    /// What is written, and which moves are made.
    pub action: PlanAction,
    /// The annotation is removed: its request was acted on, or cannot be.
    pub consume: bool,
    /// A request that is not acted on, and why (a Warning event).
    pub warning: Option<String>,
}

/// What to do with the plan `rebalance` (if the set has one) at a sample: `round` holds the
/// load moves of the planning round made at this sample (`None`: no round was due), `pods`
/// the set's pods, `paused` why load moves wait, if they do.
pub fn decide(
    rebalance: Option<&ShardRebalance>,
    round: Option<&[Move]>,
    sample: &Sample,
    pods: &BTreeSet<PodId>,
    paused: Option<&str>,
) -> Decision {
    let status = rebalance.and_then(|r| r.status.as_ref());
    let state = status.and_then(ShardRebalanceStatus::state);
    let plan: Vec<Move> = status
        .map(|s| s.moves.iter().map(planned_move).collect())
        .unwrap_or_default();
    let request = rebalance.and_then(Request::of);
    let approved = request == Some(Request::Approve);
    if state == Some(ConditionType::Rebalancing)
        || (approved && state == Some(ConditionType::ProposalReady))
    {
        // Some of its moves left out, the plan is not the one approved: none of it is made.
        if let Some(unreadable) = status.map(Salvaged::unreadable).filter(|u| !u.is_empty()) {
            return Decision {
                action: PlanAction::Stale(format!(
                    "the stored plan could not be read whole ({}): none of it is carried out, and the next planning round proposes another",
                    unreadable.join("; ")
                )),
                consume: approved,
                warning: None,
            };
        }
        return match paused {
            Some(_) => Decision {
                action: PlanAction::Keep,
                consume: false,
                warning: None,
            },
            None => Decision {
                action: PlanAction::Execute(execution(&plan, sample, pods)),
                consume: approved,
                warning: None,
            },
        };
    }
    let warning = match &request {
        Some(Request::Approve) => Some(format!(
            "nothing to approve: the plan is {}",
            state.map_or("not made yet", ConditionType::as_str)
        )),
        Some(Request::Unknown(value)) => Some(format!(
            "{REBALANCE_ANNOTATION}={value} is not understood: use approve or refresh"
        )),
        _ => None,
    };
    let refresh = request == Some(Request::Refresh);
    let action = match round {
        Some(moves)
            if !moves.is_empty()
                && (refresh || state != Some(ConditionType::ProposalReady) || moves != plan) =>
        {
            PlanAction::Propose(moves.to_vec())
        }
        Some([])
            if rebalance.is_some() && (refresh || state == Some(ConditionType::ProposalReady)) =>
        {
            PlanAction::Stale("the last planning round found no move needed".to_owned())
        }
        _ => PlanAction::Keep,
    };
    Decision {
        action,
        consume: approved || (refresh && round.is_some()),
        warning,
    }
}

/// The moves of `plan` that are still valid at `sample`, and the others.
fn execution(plan: &[Move], sample: &Sample, pods: &BTreeSet<PodId>) -> Execution {
    let mut execution = Execution::default();
    for m in plan {
        let dropped = match sample.shards.get(&m.shard) {
            Some(shard) if shard.owner == m.to => Some(Dropped::AlreadyMoved),
            _ if !pods.contains(&m.to) => Some(Dropped::TargetGone),
            None => Some(Dropped::Unowned),
            Some(shard) if shard.owner != m.from => {
                Some(Dropped::OwnerChanged(shard.owner.clone()))
            }
            Some(_) => None,
        };
        match dropped {
            Some(why) => execution.dropped.push((m.clone(), why)),
            None => execution.moves.push(m.clone()),
        }
    }
    execution
}

/// The status of a new plan of `moves` (`ProposalReady`).
pub fn proposed(
    rebalance: &ShardRebalance,
    moves: &[Move],
    now: Timestamp,
) -> ShardRebalanceStatus {
    let status = ShardRebalanceStatus {
        moves: moves.iter().map(proposed_move).collect(),
        move_count: moves.len() as u32,
        proposed_at: Some(Time(now)),
        ..ShardRebalanceStatus::default()
    };
    let message = format!(
        "{} moves wait for approval: kubectl annotate srb {} {REBALANCE_ANNOTATION}=approve",
        moves.len(),
        rebalance.name_any()
    );
    in_state(
        rebalance,
        status,
        ConditionType::ProposalReady,
        "Planned",
        &message,
        now,
    )
}

/// The status of the plan once its moves start (`Rebalancing`); a resumed plan keeps its
/// start time.
pub fn started(
    rebalance: &ShardRebalance,
    execution: &Execution,
    now: Timestamp,
) -> ShardRebalanceStatus {
    let previous = rebalance.status.clone().unwrap_or_default();
    let status = ShardRebalanceStatus {
        started_at: previous.started_at.clone().or(Some(Time(now))),
        ..previous
    };
    let message = format!(
        "{} moves under way, {} dropped",
        execution.moves.len(),
        execution.dropped.len()
    );
    in_state(
        rebalance,
        status,
        ConditionType::Rebalancing,
        "Approved",
        &message,
        now,
    )
}

/// The status of the plan once its moves ended: each move's outcome, and `Failed` if one
/// failed, `Ready` if any was made, `Stale` if every one was dropped.
pub fn finished(
    rebalance: &ShardRebalance,
    execution: &Execution,
    done: &[(Move, Result<u64, AdminError>)],
    now: Timestamp,
) -> ShardRebalanceStatus {
    let previous = rebalance.status.clone().unwrap_or_default();
    let at = now.to_string();
    let text = |m: &Move| {
        done.iter()
            .find(|(made, _)| made == m)
            .map(|(_, result)| outcome_text(result))
            .or_else(|| {
                let (_, why) = execution.dropped.iter().find(|(dropped, _)| dropped == m)?;
                Some(why.to_string())
            })
    };
    let outcomes = previous
        .moves
        .iter()
        .map(planned_move)
        .filter_map(|m| Some(recorded_move(&m, text(&m)?, &at)))
        .collect();
    let ran = done.iter().filter(|(m, _)| execution.moves.contains(m));
    let failed = ran.clone().filter(|(_, result)| result.is_err()).count();
    let already = execution
        .dropped
        .iter()
        .filter(|(_, why)| *why == Dropped::AlreadyMoved)
        .count();
    let made = ran.filter(|(_, result)| result.is_ok()).count() + already;
    let dropped = execution.dropped.len() - already;
    let (state, reason, message) = if failed > 0 {
        (
            ConditionType::Failed,
            "MovesFailed",
            format!("{failed} moves failed, {made} made, {dropped} dropped; see outcomes"),
        )
    } else if made > 0 {
        (
            ConditionType::Ready,
            "Rebalanced",
            format!("{made} moves made, {dropped} dropped"),
        )
    } else {
        (
            ConditionType::Stale,
            "MovesDropped",
            format!("every move was dropped ({dropped}); see outcomes"),
        )
    };
    let status = ShardRebalanceStatus {
        outcomes,
        finished_at: Some(Time(now)),
        ..previous
    };
    in_state(rebalance, status, state, reason, &message, now)
}

/// The status of a plan that no longer applies.
pub fn stale(rebalance: &ShardRebalance, why: &str, now: Timestamp) -> ShardRebalanceStatus {
    let status = rebalance.status.clone().unwrap_or_default();
    in_state(
        rebalance,
        status,
        ConditionType::Stale,
        "NoMoveNeeded",
        why,
        now,
    )
}

/// `status` in `state` (its one condition), for `rebalance`'s generation.
fn in_state(
    rebalance: &ShardRebalance,
    status: ShardRebalanceStatus,
    state: ConditionType,
    reason: &str,
    message: &str,
    now: Timestamp,
) -> ShardRebalanceStatus {
    let generation = rebalance.metadata.generation;
    let conditions = Conditions::new(&status.conditions, generation, now)
        .set(state, true, reason, message)
        .into_vec();
    ShardRebalanceStatus {
        observed_generation: generation,
        conditions,
        ..status
    }
}

fn proposed_move(m: &Move) -> ProposedMove {
    ProposedMove {
        shard: m.shard,
        from: m.from.clone(),
        to: m.to.clone(),
        reason: m.reason.as_str().to_owned(),
    }
}

fn planned_move(m: &ProposedMove) -> Move {
    let reason = match m.reason.as_str() {
        "Evacuate" => MoveReason::Evacuate,
        "Isolate" => MoveReason::Isolate,
        "Fill" => MoveReason::Fill,
        _ => MoveReason::Relieve,
    };
    Move {
        shard: m.shard,
        from: m.from.clone(),
        to: m.to.clone(),
        reason,
    }
}

/// The set's `ShardRebalance`, if it has one.
pub(super) async fn read(
    ctx: &Context,
    set: &SequencerShardSet,
) -> Result<Option<ShardRebalance>, Error> {
    let (name, namespace) = name_and_namespace(set)?;
    Ok(
        Api::<ShardRebalance>::namespaced(ctx.client.clone(), &namespace)
            .get_opt(&rebalance_name(&name))
            .await?,
    )
}

/// A plan at one sample, between the writes before its moves and those after.
pub(super) struct PlanStep {
    rebalance: Option<ShardRebalance>,
    execution: Option<Execution>,
}

impl PlanStep {
    /// Writes what `decision` says before any move (a new plan, a stale one, or the start of
    /// the moves), removes the annotation it consumes, and reports a request it ignores.
    pub(super) async fn begin(
        ctx: &Context,
        set: &SequencerShardSet,
        rebalance: Option<ShardRebalance>,
        decision: Decision,
        now: Timestamp,
    ) -> Result<PlanStep, Error> {
        let created = rebalance.is_none();
        let mut current = match (rebalance, &decision.action) {
            (Some(existing), _) => existing,
            (None, PlanAction::Propose(_)) => build(set)?,
            (None, _) => {
                return Ok(PlanStep {
                    rebalance: None,
                    execution: None,
                });
            }
        };
        let mut approved = None;
        let (status, event) = match decision.action {
            PlanAction::Keep => (None, None),
            PlanAction::Propose(moves) => {
                if created {
                    current = apply(&ctx.client, &current).await?;
                }
                let note = format!("{} moves proposed", moves.len());
                (
                    Some(proposed(&current, &moves, now)),
                    Some(("Proposed", note)),
                )
            }
            PlanAction::Stale(why) => (Some(stale(&current, &why, now)), Some(("Stale", why))),
            PlanAction::Execute(execution) => {
                let status = started(&current, &execution, now);
                approved = Some(execution);
                (Some(status), None)
            }
        };
        // The state first: a plan found `Rebalancing` is resumed, whatever its annotation.
        if let Some(status) = status {
            apply_status(&ctx.client, &current, &status).await?;
            current.status = Some(status);
        }
        if decision.consume {
            let patch = serde_json::json!({
                "metadata": { "annotations": { REBALANCE_ANNOTATION: null } }
            });
            let namespace = current.namespace().unwrap_or_default();
            Api::<ShardRebalance>::namespaced(ctx.client.clone(), &namespace)
                .patch(
                    &current.name_any(),
                    &PatchParams::default(),
                    &Patch::Merge(&patch),
                )
                .await?;
        }
        if let Some((reason, note)) = event {
            ctx.event(&current, EventType::Normal, reason, "Plan", note)
                .await;
        }
        if let Some(warning) = decision.warning {
            ctx.event(
                &current,
                EventType::Warning,
                "RequestIgnored",
                "Plan",
                warning,
            )
            .await;
        }
        Ok(PlanStep {
            rebalance: Some(current),
            execution: approved,
        })
    }

    /// The moves to carry out now.
    pub(super) fn moves(&self) -> &[Move] {
        self.execution.as_ref().map_or(&[], |e| &e.moves)
    }

    /// Records the outcomes of the moves made (`done` may hold other moves too); returns the
    /// name of the plan if it waits for approval.
    pub(super) async fn finish(
        self,
        ctx: &Context,
        done: &[(Move, Result<u64, AdminError>)],
        now: Timestamp,
    ) -> Result<Option<String>, Error> {
        let Some(rebalance) = self.rebalance else {
            return Ok(None);
        };
        let Some(execution) = self.execution else {
            let waiting = rebalance
                .status
                .as_ref()
                .and_then(ShardRebalanceStatus::state)
                == Some(ConditionType::ProposalReady);
            return Ok(waiting.then(|| rebalance.name_any()));
        };
        let status = finished(&rebalance, &execution, done, now);
        apply_status(&ctx.client, &rebalance, &status).await?;
        let (type_, reason) = match status.state() {
            Some(ConditionType::Failed) => (EventType::Warning, "RebalanceFailed"),
            Some(ConditionType::Stale) => (EventType::Normal, "Stale"),
            _ => (EventType::Normal, "Rebalanced"),
        };
        let note = status
            .conditions
            .first()
            .map(|c| c.message.clone())
            .unwrap_or_default();
        ctx.event(&rebalance, type_, reason, "Rebalance", note)
            .await;
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use kube::core::ObjectMeta;

    use super::*;
    use crate::crd::SequencerShardSetSpec;
    use crate::rebalance::ObservedShard;

    fn set() -> SequencerShardSet {
        SequencerShardSet {
            metadata: ObjectMeta {
                name: Some("s".into()),
                namespace: Some("chat".into()),
                uid: Some("uid-s".into()),
                ..ObjectMeta::default()
            },
            spec: SequencerShardSetSpec {
                cluster: "prod".into(),
                shards: 4,
                sequencers: Default::default(),
            },
            status: None,
        }
    }

    /// Pods `a`, `b`, `c`; shard `i` on `owners[i]`.
    fn sample(owners: &[&str]) -> Sample {
        Sample {
            nodes: ["a", "b", "c"]
                .iter()
                .map(|pod| (pod.to_string(), format!("{pod}:7500")))
                .collect(),
            shards: owners
                .iter()
                .enumerate()
                .map(|(shard, owner)| {
                    let owner = owner.to_string();
                    (shard as u32, ObservedShard { owner, load: 1.0 })
                })
                .collect(),
            unowned: Default::default(),
            outbox_lag_ms: 0,
            draining: Default::default(),
        }
    }

    fn pods() -> BTreeSet<PodId> {
        ["a", "b", "c"].iter().map(|p| p.to_string()).collect()
    }

    fn planned(shard: u32, from: &str, to: &str) -> Move {
        Move {
            shard,
            from: from.into(),
            to: to.into(),
            reason: MoveReason::Relieve,
        }
    }

    fn at(seconds: i64) -> Timestamp {
        Timestamp::from_second(seconds).unwrap()
    }

    /// The set's plan of `moves`, waiting for approval, with `annotation` if any.
    fn waiting(moves: &[Move], annotation: Option<&str>) -> ShardRebalance {
        let mut rebalance = build(&set()).unwrap();
        rebalance.status = Some(proposed(&rebalance, moves, at(100)));
        rebalance.metadata.annotations = annotation
            .map(|value| BTreeMap::from([(REBALANCE_ANNOTATION.to_owned(), value.to_owned())]));
        rebalance
    }

    #[test]
    fn a_plan_is_a_shard_rebalance_owned_by_its_set_waiting_for_approval() {
        let moves = [planned(0, "a", "b"), planned(1, "a", "c")];
        let rebalance = waiting(&moves, None);
        assert_eq!(rebalance.metadata.name.as_deref(), Some("s-rebalance"));
        assert_eq!(rebalance.metadata.namespace.as_deref(), Some("chat"));
        assert_eq!(rebalance.spec.shard_set, "s");
        let owner = &rebalance.metadata.owner_references.as_ref().unwrap()[0];
        assert_eq!(
            (owner.kind.as_str(), owner.uid.as_str(), owner.controller),
            ("SequencerShardSet", "uid-s", Some(true))
        );
        let status = rebalance.status.unwrap();
        assert_eq!(status.move_count, 2);
        assert_eq!(
            status.moves[1],
            ProposedMove {
                shard: 1,
                from: "a".into(),
                to: "c".into(),
                reason: "Relieve".into()
            }
        );
        assert_eq!(status.state(), Some(ConditionType::ProposalReady));
        assert_eq!(status.conditions.len(), 1, "one state at a time");
        assert!(
            status.conditions[0]
                .message
                .ends_with("kubectl annotate srb s-rebalance courier.dev/rebalance=approve"),
            "{:?}",
            status.conditions[0]
        );
        assert_eq!(status.proposed_at, Some(Time(at(100))));
    }

    #[test]
    fn only_an_approved_plan_is_carried_out_and_not_while_moves_are_paused() {
        let moves = vec![planned(0, "a", "b")];
        let now = sample(&["a", "a", "b"]);
        let unapproved = decide(Some(&waiting(&moves, None)), None, &now, &pods(), None);
        assert_eq!(unapproved.action, PlanAction::Keep);
        assert!(!unapproved.consume);
        let approved = waiting(&moves, Some("approve"));
        let paused = decide(Some(&approved), None, &now, &pods(), Some("rollout"));
        assert_eq!(paused.action, PlanAction::Keep);
        assert!(!paused.consume, "the approval waits for the pause to end");
        let carried_out = decide(Some(&approved), None, &now, &pods(), None);
        assert_eq!(
            carried_out.action,
            PlanAction::Execute(Execution {
                moves: moves.clone(),
                dropped: Vec::new()
            })
        );
        assert!(carried_out.consume, "an approval is used once");
    }

    /// A plan stored with a move that does not fit its type (a `shard` of -1) is read without
    /// it: approved, it is not the plan the user saw, and none of it is carried out.
    #[test]
    fn an_approved_plan_read_without_some_of_it_is_stale_not_carried_out() {
        let moves = vec![planned(0, "a", "b"), planned(1, "a", "b")];
        let mut stored = serde_json::to_value(waiting(&moves, Some("approve"))).unwrap();
        stored["status"]["moves"][1]["shard"] = serde_json::json!(-1);
        let damaged: ShardRebalance = serde_json::from_value(stored).unwrap();
        assert_eq!(damaged.status.as_ref().unwrap().moves.len(), 1);
        let now = sample(&["a", "a", "b"]);
        let decision = decide(Some(&damaged), None, &now, &pods(), None);
        let PlanAction::Stale(why) = &decision.action else {
            panic!("{decision:?}");
        };
        assert!(
            why.starts_with("the stored plan could not be read whole (moves: 1 of 2 entries"),
            "{why}"
        );
        assert!(decision.consume, "the approval is used up");
    }

    #[test]
    fn an_approved_plan_drops_the_moves_whose_shard_or_target_changed() {
        let moves = vec![
            planned(0, "a", "b"),
            planned(1, "a", "b"),
            planned(2, "a", "c"),
            planned(3, "a", "b"),
            planned(4, "a", "gone"),
        ];
        // Shard 1 went to c, shard 2 is at its target already, shard 3 has no owner.
        let mut now = sample(&["a", "c", "c", "a", "a"]);
        now.shards.remove(&3);
        let decision = decide(
            Some(&waiting(&moves, Some("approve"))),
            None,
            &now,
            &pods(),
            None,
        );
        let PlanAction::Execute(execution) = decision.action else {
            panic!("{decision:?}");
        };
        assert_eq!(execution.moves, [moves[0].clone()]);
        assert_eq!(
            execution.dropped,
            [
                (moves[1].clone(), Dropped::OwnerChanged("c".into())),
                (moves[2].clone(), Dropped::AlreadyMoved),
                (moves[3].clone(), Dropped::Unowned),
                (moves[4].clone(), Dropped::TargetGone),
            ]
        );
    }

    #[test]
    fn a_new_round_replaces_a_waiting_plan_only_when_its_moves_differ() {
        let moves = vec![planned(0, "a", "b")];
        let other = vec![planned(1, "a", "c")];
        let now = sample(&["a", "a", "b"]);
        let plan = waiting(&moves, None);
        let decide_round = |plan: Option<&ShardRebalance>, round: &[Move]| {
            decide(plan, Some(round), &now, &pods(), None).action
        };
        assert_eq!(
            decide_round(None, &moves),
            PlanAction::Propose(moves.clone())
        );
        assert_eq!(
            decide_round(None, &[]),
            PlanAction::Keep,
            "no plan, no object"
        );
        assert_eq!(decide_round(Some(&plan), &moves), PlanAction::Keep);
        assert_eq!(
            decide_round(Some(&plan), &other),
            PlanAction::Propose(other.clone())
        );
        assert!(matches!(
            decide_round(Some(&plan), &[]),
            PlanAction::Stale(_)
        ));
        assert_eq!(
            decide(Some(&plan), None, &now, &pods(), None).action,
            PlanAction::Keep,
            "no round, no change"
        );
        // A plan carried out is followed by the next one, even of the same moves.
        let mut done = plan.clone();
        done.status = Some(finished(&plan, &Execution::default(), &[], at(200)));
        assert_eq!(
            decide_round(Some(&done), &moves),
            PlanAction::Propose(moves.clone())
        );
        assert_eq!(decide_round(Some(&done), &[]), PlanAction::Keep);
    }

    #[test]
    fn a_plan_interrupted_during_its_moves_is_resumed_not_replaced() {
        let moves = vec![planned(0, "a", "b"), planned(1, "a", "c")];
        let mut plan = waiting(&moves, None);
        let execution = Execution {
            moves: moves.clone(),
            dropped: Vec::new(),
        };
        plan.status = Some(started(&plan, &execution, at(200)));
        // Shard 0 moved before the interruption.
        let now = sample(&["b", "a", "b"]);
        let decision = decide(
            Some(&plan),
            Some(&[planned(2, "b", "c")]),
            &now,
            &pods(),
            None,
        );
        assert_eq!(
            decision.action,
            PlanAction::Execute(Execution {
                moves: vec![moves[1].clone()],
                dropped: vec![(moves[0].clone(), Dropped::AlreadyMoved)],
            })
        );
        let resumed = started(&plan, &execution, at(300));
        assert_eq!(resumed.started_at, Some(Time(at(200))));
    }

    #[test]
    fn refresh_asks_for_a_new_plan_and_other_requests_are_reported() {
        let moves = vec![planned(0, "a", "b")];
        let now = sample(&["a", "a", "b"]);
        let refresh = waiting(&moves, Some("refresh"));
        let refreshed = decide(Some(&refresh), Some(&moves), &now, &pods(), None);
        assert_eq!(refreshed.action, PlanAction::Propose(moves.clone()));
        assert!(refreshed.consume);
        let waits = decide(Some(&refresh), None, &now, &pods(), Some("rollout"));
        assert!(!waits.consume, "kept until a round is made");
        let typo = decide(
            Some(&waiting(&moves, Some("yes"))),
            None,
            &now,
            &pods(),
            None,
        );
        assert_eq!(typo.action, PlanAction::Keep);
        assert!(!typo.consume);
        assert_eq!(
            typo.warning.as_deref(),
            Some("courier.dev/rebalance=yes is not understood: use approve or refresh")
        );
        let mut stale = waiting(&moves, Some("approve"));
        stale.status = Some(super::stale(&stale, "no move needed", at(200)));
        let nothing = decide(Some(&stale), None, &now, &pods(), None);
        assert_eq!(nothing.action, PlanAction::Keep);
        assert!(nothing.consume, "not kept for the next plan");
        assert_eq!(
            nothing.warning.as_deref(),
            Some("nothing to approve: the plan is Stale")
        );
    }

    #[test]
    fn a_finished_plan_records_each_outcome_in_order_and_its_state() {
        let moves = vec![planned(0, "a", "b"), planned(1, "a", "c")];
        let plan = waiting(&moves, None);
        let execution = Execution {
            moves: vec![moves[1].clone()],
            dropped: vec![(moves[0].clone(), Dropped::OwnerChanged("c".into()))],
        };
        let made = finished(&plan, &execution, &[(moves[1].clone(), Ok(7))], at(300));
        assert_eq!(made.state(), Some(ConditionType::Ready));
        let outcomes: Vec<(u32, &str)> = made
            .outcomes
            .iter()
            .map(|o| (o.shard, o.outcome.as_str()))
            .collect();
        assert_eq!(
            outcomes,
            [(0, "dropped: the shard is on c now"), (1, "epoch 7")]
        );
        assert_eq!(made.finished_at, Some(Time(at(300))));
        assert_eq!(made.moves.len(), 2, "the plan stays readable");
        let failure = Err(AdminError::UnknownNode("c".into()));
        let failed = finished(&plan, &execution, &[(moves[1].clone(), failure)], at(300));
        assert_eq!(failed.state(), Some(ConditionType::Failed));
        assert_eq!(
            failed.outcomes[1].outcome,
            "failed: node c is not a live sequencer node"
        );
        let none = Execution {
            moves: Vec::new(),
            dropped: execution.dropped.clone(),
        };
        assert_eq!(
            finished(&plan, &none, &[], at(300)).state(),
            Some(ConditionType::Stale)
        );
    }
}
