//! The gateway autoscaler: from the client connections of each gateway pod, how many pods the
//! pool should run, and which pod goes first when it shrinks. Pure: time comes in as
//! milliseconds, observations as numbers.
//!
//! - **Target.** `ceil(connections / targetConnectionsPerPod)`, within `[min, max]`.
//! - **Up fast.** A higher target is applied at once: connections arriving need room now.
//! - **Down slowly.** The pool shrinks only to the highest target seen in the last 600 s (a
//!   dip does not remove pods that the next peak needs), by at most one pod per 120 s (each
//!   removed pod's clients reconnect to the others), and not before the autoscaler has seen a
//!   whole window (after an operator restart it waits rather than guess).
//! - **Who goes.** The pod with the fewest connections: it gets the lowest
//!   `controller.kubernetes.io/pod-deletion-cost`, so the ReplicaSet deletes it first (the
//!   pool's controller removes the mark from any other pod at each sample).
//! - **Unread pods.** A ready pod whose count could not be read may hold any number of
//!   connections: as the HPA does with missing metrics, the pool never shrinks on such a
//!   sample (it holds the pool at its size for a whole window, as a peak would), while what
//!   was read may still grow it.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

/// The annotation the ReplicaSet controller reads to pick the pods to delete.
pub const DELETION_COST: &str = "controller.kubernetes.io/pod-deletion-cost";

/// The autoscaler's limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScalePolicy {
    /// The fewest pods.
    pub min_replicas: i32,
    /// The most pods.
    pub max_replicas: i32,
    /// Connections per pod to aim for.
    pub target_connections_per_pod: u32,
    /// How long a target holds the pool up (600 s).
    pub down_window_ms: u64,
    /// Time between two removals (120 s).
    pub down_step_ms: u64,
}

impl ScalePolicy {
    /// The pool's limits with the default windows.
    pub fn new(min_replicas: i32, max_replicas: i32, target_connections_per_pod: u32) -> Self {
        ScalePolicy {
            min_replicas,
            max_replicas,
            target_connections_per_pod,
            down_window_ms: 600_000,
            down_step_ms: 120_000,
        }
    }

    /// Pods needed for `connections`, within the limits.
    pub fn target(&self, connections: u64) -> i32 {
        let per_pod = u64::from(self.target_connections_per_pod.max(1));
        let needed = connections.div_ceil(per_pod).min(i32::MAX as u64) as i32;
        needed.clamp(self.min_replicas, self.max_replicas.max(self.min_replicas))
    }
}

/// One look at a pool's connections.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConnectionSample {
    /// The connections of each ready pod that answered, by pod name.
    pub read: BTreeMap<String, u64>,
    /// The ready pods whose connections could not be read.
    pub unread: BTreeSet<String>,
}

impl ConnectionSample {
    /// The connections of the pods that answered (at most `u64::MAX`: a sum past it asks for
    /// the most pods, as it is, rather than wrapping round to a few).
    pub fn total(&self) -> u64 {
        self.read
            .values()
            .fold(0, |total, n| total.saturating_add(*n))
    }
}

/// A sample in which every ready pod answered.
impl From<BTreeMap<String, u64>> for ConnectionSample {
    fn from(read: BTreeMap<String, u64>) -> Self {
        ConnectionSample {
            read,
            unread: BTreeSet::new(),
        }
    }
}

/// What to do with the pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScaleDecision {
    /// The replicas to run.
    pub replicas: i32,
    /// On a scale-down: the pod to remove (fewest connections).
    pub remove: Option<String>,
    /// Why, for events and logs.
    pub reason: ScaleReason,
}

/// Why the pool has the size it has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScaleReason {
    /// Below the fewest or above the most pods.
    Limits,
    /// More connections than the pods should hold.
    Up,
    /// Fewer connections for a whole window.
    Down,
    /// Within the stabilisation window or the step interval, or already right.
    Steady,
}

/// The autoscaler of one pool, with the targets it saw.
#[derive(Debug, Clone, Default)]
pub struct GatewayAutoscaler {
    /// `(at, target)`, oldest first, over the last window.
    targets: VecDeque<(u64, i32)>,
    /// When the autoscaler started seeing targets.
    since_ms: Option<u64>,
    last_removal_ms: Option<u64>,
}

impl GatewayAutoscaler {
    /// An autoscaler that has seen nothing yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// When the last decision was made (ms since the epoch), if any.
    pub fn last_decision_ms(&self) -> Option<u64> {
        self.targets.back().map(|(at, _)| *at)
    }

    /// The decision for a pool of `replicas` pods whose connections are `sample`.
    pub fn decide(
        &mut self,
        policy: &ScalePolicy,
        replicas: i32,
        sample: &ConnectionSample,
        now_ms: u64,
    ) -> ScaleDecision {
        let bounded = replicas.clamp(
            policy.min_replicas,
            policy.max_replicas.max(policy.min_replicas),
        );
        let read = policy.target(sample.total());
        // What an unread pod holds is unknown: the sample needs at least the pods there are.
        let target = match sample.unread.is_empty() {
            true => read,
            false => read.max(bounded),
        };
        self.since_ms.get_or_insert(now_ms);
        self.targets.push_back((now_ms, target));
        while self
            .targets
            .front()
            .is_some_and(|(at, _)| now_ms.saturating_sub(*at) > policy.down_window_ms)
        {
            self.targets.pop_front();
        }
        let steady = |replicas| ScaleDecision {
            replicas,
            remove: None,
            reason: ScaleReason::Steady,
        };
        if bounded != replicas {
            return ScaleDecision {
                replicas: bounded,
                remove: None,
                reason: ScaleReason::Limits,
            };
        }
        if target > replicas {
            return ScaleDecision {
                replicas: target,
                remove: None,
                reason: ScaleReason::Up,
            };
        }
        let seen_a_window = self
            .since_ms
            .is_some_and(|since| now_ms.saturating_sub(since) >= policy.down_window_ms);
        let step_due = self
            .last_removal_ms
            .is_none_or(|at| now_ms.saturating_sub(at) >= policy.down_step_ms);
        let highest = self.targets.iter().map(|(_, t)| *t).max().unwrap_or(target);
        if highest >= replicas || !seen_a_window || !step_due {
            return steady(replicas);
        }
        self.last_removal_ms = Some(now_ms);
        let remove = sample
            .read
            .iter()
            .min_by(|a, b| a.1.cmp(b.1).then(a.0.cmp(b.0)))
            .map(|(pod, _)| pod.clone());
        ScaleDecision {
            replicas: replicas - 1,
            remove,
            reason: ScaleReason::Down,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: u64 = 1_000;

    fn pods(connections: &[u64]) -> ConnectionSample {
        connections
            .iter()
            .enumerate()
            .map(|(i, c)| (format!("gw-{i}"), *c))
            .collect::<BTreeMap<_, _>>()
            .into()
    }

    #[test]
    fn scales_up_at_once_to_what_the_connections_need() {
        let policy = ScalePolicy::new(2, 10, 1000);
        let mut autoscaler = GatewayAutoscaler::new();
        let decision = autoscaler.decide(&policy, 2, &pods(&[2500, 2400]), 0);
        assert_eq!(decision.replicas, 5);
        assert_eq!(decision.reason, ScaleReason::Up);
        let capped = autoscaler.decide(&policy, 5, &pods(&[9000, 9000]), SECOND);
        assert_eq!(capped.replicas, 10, "never above max");
    }

    #[test]
    fn scales_down_only_after_a_quiet_window_one_pod_per_step_fewest_connections_first() {
        let policy = ScalePolicy::new(1, 10, 1000);
        let mut autoscaler = GatewayAutoscaler::new();
        let quiet = pods(&[300, 100, 200, 250]);
        let mut now = 0;
        let mut replicas = 4;
        // Within the first window nothing is removed.
        while now < 600 * SECOND {
            let decision = autoscaler.decide(&policy, replicas, &quiet, now);
            assert_eq!(decision.replicas, 4, "at {now} ms");
            now += 15 * SECOND;
        }
        let decision = autoscaler.decide(&policy, replicas, &quiet, now);
        assert_eq!(decision.replicas, 3);
        assert_eq!(decision.remove.as_deref(), Some("gw-1"));
        replicas = 3;
        // The next removal waits for the step interval.
        let soon = autoscaler.decide(&policy, replicas, &quiet, now + 119 * SECOND);
        assert_eq!(soon.replicas, 3);
        let later = autoscaler.decide(&policy, replicas, &quiet, now + 120 * SECOND);
        assert_eq!(later.replicas, 2);
    }

    #[test]
    fn a_peak_within_the_window_holds_the_pool_up() {
        let policy = ScalePolicy::new(1, 10, 1000);
        let mut autoscaler = GatewayAutoscaler::new();
        for step in 0..=40 {
            autoscaler.decide(&policy, 4, &pods(&[100]), step * 15 * SECOND);
        }
        // A peak needing 4 pods, then quiet again: no removal for the next 600 s.
        let peak_at = 41 * 15 * SECOND;
        autoscaler.decide(&policy, 4, &pods(&[4000]), peak_at);
        let mut now = peak_at;
        while now < peak_at + 600 * SECOND {
            now += 15 * SECOND;
            let decision = autoscaler.decide(&policy, 4, &pods(&[100]), now);
            if now - peak_at <= 600 * SECOND {
                assert_eq!(
                    decision.replicas,
                    4,
                    "{} s after the peak",
                    (now - peak_at) / SECOND
                );
            }
        }
    }

    #[test]
    fn a_pod_whose_connections_cannot_be_read_holds_the_pool_up_but_not_down() {
        let policy = ScalePolicy::new(1, 10, 1000);
        let mut autoscaler = GatewayAutoscaler::new();
        let quiet = pods(&[100, 100, 100, 100]);
        let mut partial = pods(&[100]);
        partial.unread = ["gw-1", "gw-2", "gw-3"].map(str::to_owned).into();
        let mut now = 0;
        while now < 600 * SECOND {
            autoscaler.decide(&policy, 4, &quiet, now);
            now += 15 * SECOND;
        }
        // A quiet window has passed: a full reading would remove a pod, a partial one never.
        let blind = autoscaler.decide(&policy, 4, &partial, now);
        assert_eq!((blind.replicas, blind.remove), (4, None));
        // Once every pod answers again, the partial sample holds the pool for a window.
        let soon = autoscaler.decide(&policy, 4, &quiet, now + 590 * SECOND);
        assert_eq!(soon.replicas, 4);
        let later = autoscaler.decide(&policy, 4, &quiet, now + 615 * SECOND);
        assert_eq!(later.replicas, 3);
        // What was read may still grow the pool.
        let mut busy = pods(&[6000]);
        busy.unread = partial.unread.clone();
        let grown = autoscaler.decide(&policy, 3, &busy, now + 630 * SECOND);
        assert_eq!((grown.replicas, grown.reason), (6, ScaleReason::Up));
    }

    #[test]
    fn connections_past_what_a_u64_holds_ask_for_the_most_pods() {
        let policy = ScalePolicy::new(2, 5, 1000);
        let mut autoscaler = GatewayAutoscaler::new();
        let sample = pods(&[u64::MAX, u64::MAX]);
        assert_eq!(sample.total(), u64::MAX);
        assert_eq!(autoscaler.decide(&policy, 2, &sample, 0).replicas, 5);
    }

    #[test]
    fn replicas_outside_the_limits_are_brought_back() {
        let policy = ScalePolicy::new(2, 5, 1000);
        let mut autoscaler = GatewayAutoscaler::new();
        assert_eq!(autoscaler.decide(&policy, 1, &pods(&[0]), 0).replicas, 2);
        assert_eq!(autoscaler.decide(&policy, 9, &pods(&[0]), 0).replicas, 5);
    }
}
