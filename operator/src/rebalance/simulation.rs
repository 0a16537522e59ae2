//! A deterministic simulation of the rebalancer: every round is one load sample, the plan is
//! made, and its moves complete at once. Used by the property tests and by the simulation of
//! `docs/rebalancing.md` (`cargo run -p courier-operator --example rebalance_simulation`).

use super::planner::{ClusterView, Move, PlannerPolicy, PodId, Rebalancer};

/// A cluster under a load the caller sets before each round.
#[derive(Debug, Clone)]
pub struct Simulation {
    /// The planner under test.
    pub rebalancer: Rebalancer,
    /// The shards, their owners and loads, and the pods meant to hold them.
    pub view: ClusterView,
    /// The simulated clock.
    pub now_ms: u64,
    /// Time between rounds (a load sample each).
    pub round_ms: u64,
}

impl Simulation {
    /// A simulation of `view` under `policy`, sampled every `round_ms`.
    pub fn new(policy: PlannerPolicy, view: ClusterView, round_ms: u64) -> Self {
        Simulation {
            rebalancer: Rebalancer::new(policy),
            view,
            now_ms: 0,
            round_ms,
        }
    }

    /// One round: sample, plan, carry the moves out. Returns the moves.
    pub fn round(&mut self) -> Vec<Move> {
        self.now_ms += self.round_ms;
        self.rebalancer.observe(&self.view);
        let moves = self.rebalancer.plan(&self.view, self.now_ms);
        for planned in &moves {
            self.rebalancer.started(planned);
        }
        for planned in &moves {
            if let Some(shard) = self.view.shards.get_mut(&planned.shard) {
                shard.owner = planned.to.clone();
            }
            self.rebalancer.finished(planned, self.now_ms);
        }
        moves
    }

    /// Appends per second of each pod meant to hold shards (0 for an empty one).
    pub fn pod_loads(&self) -> Vec<(PodId, f64)> {
        self.view
            .pods
            .iter()
            .map(|pod| {
                let load = self
                    .view
                    .shards
                    .values()
                    .filter(|shard| shard.owner == *pod)
                    .map(|shard| shard.load)
                    .sum();
                (pod.clone(), load)
            })
            .collect()
    }

    /// The busiest pod's load over the mean pod load (1.0 is even; 0.0 when idle).
    pub fn max_over_mean(&self) -> f64 {
        let loads = self.pod_loads();
        let total: f64 = loads.iter().map(|(_, load)| load).sum();
        if loads.is_empty() || total <= 0.0 {
            return 0.0;
        }
        let max = loads.iter().map(|(_, load)| *load).fold(0.0, f64::max);
        max / (total / loads.len() as f64)
    }
}

/// Zipf weights of `n` items with exponent `s`, the heaviest first, summing to `total`.
pub fn zipf(n: usize, s: f64, total: f64) -> Vec<f64> {
    let raw: Vec<f64> = (1..=n).map(|rank| 1.0 / (rank as f64).powf(s)).collect();
    let sum: f64 = raw.iter().sum();
    raw.into_iter().map(|w| w / sum * total).collect()
}
