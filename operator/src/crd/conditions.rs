//! Status conditions shared by every Courier resource: the four types the issue names (and
//! the states of a `ShardRebalance`, one of which is true at a time), set with a reason and a
//! message, and their transition time kept while the status stays the same.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use serde::{Deserialize, Serialize};

/// The condition types of Courier resources.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ConditionType {
    /// Every workload of the resource is available; of a `ShardRebalance`: its plan was
    /// carried out.
    Ready,
    /// The operator is rolling something out (pods created, replaced or removed).
    Progressing,
    /// Something needs a person: a bad reference, a failed move, a workload that cannot start.
    Degraded,
    /// Shards are being moved between sequencer pods.
    Rebalancing,
    /// A `ShardRebalance`'s plan waits for approval.
    ProposalReady,
    /// A `ShardRebalance`'s plan no longer applies: no move is needed, or every move's shard
    /// changed owner.
    Stale,
    /// Some moves of a `ShardRebalance`'s plan failed.
    Failed,
}

impl ConditionType {
    const ALL: [ConditionType; 7] = [
        ConditionType::Ready,
        ConditionType::Progressing,
        ConditionType::Degraded,
        ConditionType::Rebalancing,
        ConditionType::ProposalReady,
        ConditionType::Stale,
        ConditionType::Failed,
    ];

    /// The `type` field of the condition.
    pub fn as_str(self) -> &'static str {
        match self {
            ConditionType::Ready => "Ready",
            ConditionType::Progressing => "Progressing",
            ConditionType::Degraded => "Degraded",
            ConditionType::Rebalancing => "Rebalancing",
            ConditionType::ProposalReady => "ProposalReady",
            ConditionType::Stale => "Stale",
            ConditionType::Failed => "Failed",
        }
    }

    /// The condition type named `name` (a condition's `type` field), if it is one of ours.
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|kind| kind.as_str() == name)
    }
}

/// The status of a resource the operator reconciles: conditions, and the generation they
/// describe.
pub trait ObservedStatus {
    /// The conditions.
    fn conditions(&self) -> &[Condition];
    /// Makes the status describe `generation` with `conditions`.
    fn observe(&mut self, generation: Option<i64>, conditions: Vec<Condition>);
}

/// Builds the condition list of a status from the previous one.
#[derive(Debug, Clone)]
pub struct Conditions {
    previous: Vec<Condition>,
    next: Vec<Condition>,
    generation: Option<i64>,
    now: Timestamp,
}

impl Conditions {
    /// Conditions for the object at `generation`, starting from `previous` (the current status).
    pub fn new(previous: &[Condition], generation: Option<i64>, now: Timestamp) -> Self {
        Self {
            previous: previous.to_vec(),
            next: Vec::new(),
            generation,
            now,
        }
    }

    /// Conditions for the object at `generation` that keep every condition of `previous` not
    /// set again: a status of which only some conditions change.
    pub fn keeping(previous: &[Condition], generation: Option<i64>, now: Timestamp) -> Self {
        Self {
            next: previous.to_vec(),
            ..Self::new(previous, generation, now)
        }
    }

    /// Sets `kind` to `status` with a CamelCase `reason` and a sentence for people, in the
    /// place it had if it was set before. The transition time moves only when the status
    /// changes.
    pub fn set(mut self, kind: ConditionType, status: bool, reason: &str, message: &str) -> Self {
        let status = if status { "True" } else { "False" };
        let last_transition_time = self
            .previous
            .iter()
            .find(|c| c.type_ == kind.as_str() && c.status == status)
            .map(|c| c.last_transition_time.clone())
            .unwrap_or(Time(self.now));
        let condition = Condition {
            type_: kind.as_str().to_owned(),
            status: status.to_owned(),
            reason: reason.to_owned(),
            message: message.to_owned(),
            observed_generation: self.generation,
            last_transition_time,
        };
        match self.next.iter_mut().find(|c| c.type_ == kind.as_str()) {
            Some(set_before) => *set_before = condition,
            None => self.next.push(condition),
        }
        self
    }

    /// The conditions, in the order they were set.
    pub fn into_vec(self) -> Vec<Condition> {
        self.next
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(seconds: i64) -> Timestamp {
        Timestamp::from_second(seconds).unwrap()
    }

    #[test]
    fn the_transition_time_moves_only_when_the_status_changes() {
        let first = Conditions::new(&[], Some(1), at(100))
            .set(ConditionType::Ready, false, "Starting", "pods are starting")
            .into_vec();
        let same = Conditions::new(&first, Some(2), at(200))
            .set(ConditionType::Ready, false, "Starting", "still starting")
            .into_vec();
        assert_eq!(same[0].last_transition_time, Time(at(100)));
        assert_eq!(same[0].observed_generation, Some(2));
        assert_eq!(same[0].message, "still starting");
        let changed = Conditions::new(&same, Some(2), at(300))
            .set(ConditionType::Ready, true, "Available", "all pods ready")
            .into_vec();
        assert_eq!(changed[0].last_transition_time, Time(at(300)));
        assert_eq!(changed[0].status, "True");
    }

    #[test]
    fn one_condition_changes_in_its_place_and_the_others_are_kept() {
        let before = Conditions::new(&[], Some(1), at(100))
            .set(ConditionType::Ready, true, "Available", "all pods ready")
            .set(ConditionType::Degraded, false, "Healthy", "fine")
            .into_vec();
        let after = Conditions::keeping(&before, Some(2), at(200))
            .set(ConditionType::Ready, false, "ClusterNotFound", "gone")
            .into_vec();
        assert_eq!(after.len(), 2);
        assert_eq!(
            (after[0].type_.as_str(), after[0].status.as_str()),
            ("Ready", "False")
        );
        assert_eq!(after[0].last_transition_time, Time(at(200)));
        assert_eq!(after[0].observed_generation, Some(2));
        assert_eq!(after[1], before[1], "untouched, of the generation it saw");
    }

    #[test]
    fn every_condition_type_is_read_back_from_its_name() {
        for kind in ConditionType::ALL {
            assert_eq!(ConditionType::parse(kind.as_str()), Some(kind));
        }
        assert_eq!(ConditionType::parse("Available"), None);
    }
}
