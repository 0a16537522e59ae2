//! The hot-shard planner: from each shard's load and owner, the moves that even out the load of
//! the sequencer pods. Pure: no clock, no I/O; time comes in as milliseconds.
//!
//! How it decides (the figures are the policy's defaults, `docs/rebalancing.md`):
//! - **Weight.** A shard weighs its appends per second (an EWMA over 15 s samples) plus an idle
//!   weight (1 append/s): an idle cluster is balanced by shard count, a busy one by load.
//! - **Band.** The mean pod load ±10 %. Above it a pod is *over*, below it *under*.
//! - **Hysteresis.** A pod becomes *hot* after 3 samples over the band in a row and stops being
//!   hot after 2 samples that are not; *cold* likewise below the band. A pod without shards is
//!   cold at once. Only hot pods give shards for load, only cold pods pull them.
//! - **Isolation.** A shard heavier than the band's top is too hot to share a pod: its pod's
//!   other shards move away, and a pod left with only such a shard is taken out of the band
//!   (its load does not raise the mean the others are held to).
//! - **Minimum benefit.** A load move must cut its source's load by 5 % (the pair's peak, source
//!   or target, goes down by that much); a pod whose shards are all too small for that, but
//!   which is itself more than 5 % above the band, sheds its largest shard that keeps its
//!   target within the band, one at a time.
//! - **Limits.** At most 4 moves in flight; per pod at most one shard leaving and one arriving at
//!   a time for load; a shard moves at most once per plan, and a shard moved in the last 10
//!   minutes stays put; a move never leaves its target busier than its source was.
//! - **Pods leaving** (scale-down) are evacuated first, heaviest shard to lightest pod, as many
//!   shards at once as the limit of moves in flight allows (every one of them must go: the
//!   per-pod limits of load moves would make a pod of a thousand shards leave one shard per
//!   sample), and no other move is planned until they are empty; cooldown does not hold an
//!   evacuation back.
//!   Pods arriving (scale-up) are cold and pull shards until they reach the mean: only what the
//!   new pod needs moves.
//!
//! Every load move lowers the sum of the squared pod loads, so under a steady load the plans
//! come to an end.

use std::collections::{BTreeMap, BTreeSet};

use crate::crd::RebalancePolicy;

/// A sequencer pod, by its node id in the data plane.
pub type PodId = String;

/// The planner's limits and thresholds.
#[derive(Debug, Clone, PartialEq)]
pub struct PlannerPolicy {
    /// Half-width of the band around the mean pod load, as a fraction of the mean (0.10).
    pub tolerance: f64,
    /// The least fraction of its source's load a move must take away (0.05).
    pub min_benefit: f64,
    /// Moves in flight at once (4).
    pub max_concurrent_moves: usize,
    /// How long a moved shard stays put, in milliseconds (10 min).
    pub cooldown_ms: u64,
    /// Samples over the band, in a row, that make a pod hot (3).
    pub hot_samples: u32,
    /// Samples back in the band, in a row, that end it (2).
    pub cool_samples: u32,
    /// What an idle shard weighs, in appends per second (1).
    pub idle_weight: f64,
}

impl Default for PlannerPolicy {
    fn default() -> Self {
        PlannerPolicy::from(&RebalancePolicy::default())
    }
}

impl From<&RebalancePolicy> for PlannerPolicy {
    fn from(policy: &RebalancePolicy) -> Self {
        PlannerPolicy {
            tolerance: f64::from(policy.tolerance_percent) / 100.0,
            min_benefit: f64::from(policy.min_benefit_percent) / 100.0,
            max_concurrent_moves: policy.max_concurrent_moves as usize,
            cooldown_ms: policy.cooldown_seconds.saturating_mul(1000),
            hot_samples: 3,
            cool_samples: 2,
            idle_weight: 1.0,
        }
    }
}

/// One shard as observed: who owns it and its load.
#[derive(Debug, Clone, PartialEq)]
pub struct ObservedShard {
    /// The pod that owns it.
    pub owner: PodId,
    /// Appends per second (EWMA).
    pub load: f64,
}

/// What the planner sees: the pods meant to hold shards, and every owned shard.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ClusterView {
    /// The pods that should hold shards. A pod that owns shards but is not listed is leaving.
    pub pods: BTreeSet<PodId>,
    /// Owned shards by number (a shard no pod owns is taken by the sequencers themselves).
    pub shards: BTreeMap<u32, ObservedShard>,
}

/// Why a shard moves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum MoveReason {
    /// Its pod is leaving.
    Evacuate,
    /// It shares a pod with a shard too hot to share one.
    Isolate,
    /// Its pod is hot.
    Relieve,
    /// A cold pod pulls it.
    Fill,
}

impl MoveReason {
    /// The reason's name, as written in statuses and events.
    pub fn as_str(self) -> &'static str {
        match self {
            MoveReason::Evacuate => "Evacuate",
            MoveReason::Isolate => "Isolate",
            MoveReason::Relieve => "Relieve",
            MoveReason::Fill => "Fill",
        }
    }
}

/// A planned move of one shard.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Move {
    /// The shard.
    pub shard: u32,
    /// Its owner now.
    pub from: PodId,
    /// The pod to take it.
    pub to: PodId,
    /// Why.
    pub reason: MoveReason,
}

/// A hysteresis flag: on after `enter` samples in a row that say so, off after `leave` that
/// do not.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Streak {
    on: bool,
    run: u32,
}

impl Streak {
    fn sample(&mut self, says_on: bool, enter: u32, leave: u32) {
        if says_on == self.on {
            self.run = 0;
            return;
        }
        self.run += 1;
        if self.run >= if self.on { leave } else { enter } {
            self.on = !self.on;
            self.run = 0;
        }
    }
}

/// A pod's trend over the last samples.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Trend {
    hot: Streak,
    cold: Streak,
}

/// The planner with what it remembers between plans: each pod's trend, each moved shard's
/// cooldown, and the moves in flight.
#[derive(Debug, Clone)]
pub struct Rebalancer {
    policy: PlannerPolicy,
    trends: BTreeMap<PodId, Trend>,
    cooldown_until: BTreeMap<u32, u64>,
    in_flight: BTreeMap<u32, Move>,
}

impl Rebalancer {
    /// A planner that has seen nothing yet.
    pub fn new(policy: PlannerPolicy) -> Self {
        Rebalancer {
            policy,
            trends: BTreeMap::new(),
            cooldown_until: BTreeMap::new(),
            in_flight: BTreeMap::new(),
        }
    }

    /// The policy.
    pub fn policy(&self) -> &PlannerPolicy {
        &self.policy
    }

    /// Replaces the policy (the resource changed); trends, cooldowns and moves are kept.
    pub fn set_policy(&mut self, policy: PlannerPolicy) {
        self.policy = policy;
    }

    /// Folds one load sample into the pods' trends.
    pub fn observe(&mut self, view: &ClusterView) {
        let projection = Projection::new(view, &self.in_flight, &self.policy);
        let band = Band::of(&projection, &view.pods, &self.policy);
        self.trends.retain(|pod, _| view.pods.contains(pod));
        let (enter, leave) = (self.policy.hot_samples, self.policy.cool_samples);
        for pod in &view.pods {
            let load = projection.load(pod);
            let shared = !band.isolated.contains(pod);
            let trend = self.trends.entry(pod.clone()).or_default();
            trend.hot.sample(shared && load > band.upper, enter, leave);
            trend.cold.sample(shared && load < band.lower, enter, leave);
        }
    }

    /// The moves to start now, given what is in flight. Empty when nothing needs to move, or
    /// nothing may.
    pub fn plan(&self, view: &ClusterView, now_ms: u64) -> Vec<Move> {
        let mut round = Round {
            projection: Projection::new(view, &self.in_flight, &self.policy),
            planned: BTreeSet::new(),
            budget: self
                .policy
                .max_concurrent_moves
                .saturating_sub(self.in_flight.len()),
            giving: self.in_flight.values().map(|m| m.from.clone()).collect(),
            taking: self.in_flight.values().map(|m| m.to.clone()).collect(),
            moves: Vec::new(),
        };
        if view.pods.is_empty() {
            return Vec::new();
        }
        self.evacuate(view, &mut round);
        if round
            .projection
            .owners()
            .any(|pod| !view.pods.contains(pod))
        {
            return round.moves;
        }
        self.isolate(view, now_ms, &mut round);
        self.relieve(view, now_ms, &mut round);
        self.fill(view, now_ms, &mut round);
        round.moves
    }

    /// Records that `planned` started.
    pub fn started(&mut self, planned: &Move) {
        self.in_flight.insert(planned.shard, planned.clone());
    }

    /// Records that `planned` ended (done or failed) at `now_ms`: the shard cools down either
    /// way, so that a failing move is not retried at once.
    pub fn finished(&mut self, planned: &Move, now_ms: u64) {
        self.in_flight.remove(&planned.shard);
        self.cooldown_until.retain(|_, until| *until > now_ms);
        self.recall_finished(planned.shard, now_ms, now_ms);
    }

    /// Records that a move of `shard` ended at `finished_ms`, as another planner saw it (a
    /// status remembers the latest moves; a new leader of the operator has no memory of its
    /// own): at `now_ms` the shard cools down as if this planner had seen the move end.
    pub fn recall_finished(&mut self, shard: u32, finished_ms: u64, now_ms: u64) {
        let until = finished_ms.saturating_add(self.policy.cooldown_ms);
        if until > now_ms {
            let cooling = self.cooldown_until.entry(shard).or_insert(until);
            *cooling = (*cooling).max(until);
        }
    }

    /// The moves in flight.
    pub fn in_flight(&self) -> impl Iterator<Item = &Move> {
        self.in_flight.values()
    }

    /// Whether `shard` may move for load at `now_ms` (not cooling down, not moving).
    pub fn movable(&self, shard: u32, now_ms: u64) -> bool {
        !self.in_flight.contains_key(&shard)
            && self
                .cooldown_until
                .get(&shard)
                .is_none_or(|until| *until <= now_ms)
    }

    /// Whether `shard` may move for load in `round`.
    fn may_move(&self, shard: u32, now_ms: u64, round: &Round) -> bool {
        self.movable(shard, now_ms) && !round.planned.contains(&shard)
    }

    fn trend(&self, pod: &str) -> Trend {
        self.trends.get(pod).copied().unwrap_or_default()
    }

    /// Shards of pods that are leaving, heaviest first, each to the lightest staying pod, as
    /// many as the budget allows, taken from the leaving pods in turn.
    fn evacuate(&self, view: &ClusterView, round: &mut Round) {
        let leaving: BTreeSet<PodId> = round
            .projection
            .owners()
            .filter(|pod| !view.pods.contains(*pod))
            .cloned()
            .collect();
        let mut waiting: Vec<(PodId, std::vec::IntoIter<(u32, f64)>)> = leaving
            .into_iter()
            .map(|pod| {
                let shards = round.projection.shards_of(&pod);
                (pod, shards.into_iter())
            })
            .collect();
        let mut moved = true;
        while moved && round.budget > 0 {
            moved = false;
            for (pod, shards) in &mut waiting {
                let Some((shard, _)) =
                    shards.find(|(shard, _)| !self.in_flight.contains_key(shard))
                else {
                    continue;
                };
                let Some(target) = round.lightest_of(view.pods.iter(), |_| true) else {
                    return;
                };
                round.push(shard, pod, &target, MoveReason::Evacuate);
                moved = true;
                if round.budget == 0 {
                    return;
                }
            }
        }
    }

    /// Moves the other shards off pods that hold a shard too hot to share.
    fn isolate(&self, view: &ClusterView, now_ms: u64, round: &mut Round) {
        let band = Band::of(&round.projection, &view.pods, &self.policy);
        for pod in round.projection.by_load_desc(&view.pods) {
            let shards = round.projection.shards_of(&pod);
            let too_hot = shards.iter().any(|(_, weight)| *weight > band.upper);
            if round.budget == 0 || !too_hot || shards.len() < 2 || round.giving.contains(&pod) {
                continue;
            }
            let companions = shards.iter().filter(|(shard, weight)| {
                *weight <= band.upper && self.may_move(*shard, now_ms, round)
            });
            for (shard, weight) in companions {
                let source = round.projection.load(&pod);
                let fits = |target: &PodId| {
                    *target != pod
                        && !band.isolated.contains(target)
                        && round.projection.load(target) + weight < source
                        && round
                            .projection
                            .shards_of(target)
                            .iter()
                            .all(|(_, w)| *w <= band.upper)
                };
                if let Some(target) = round.lightest(view.pods.iter(), fits) {
                    round.push(*shard, &pod, &target, MoveReason::Isolate);
                    break;
                }
            }
        }
    }

    /// Moves a shard off each hot pod: the move that lowers the pair's peak the most.
    fn relieve(&self, view: &ClusterView, now_ms: u64, round: &mut Round) {
        let band = Band::of(&round.projection, &view.pods, &self.policy);
        for pod in round.projection.by_load_desc(&view.pods) {
            let source = round.projection.load(&pod);
            if round.budget == 0
                || !self.trend(&pod).hot.on
                || source <= band.upper
                || band.isolated.contains(&pod)
                || round.giving.contains(&pod)
            {
                continue;
            }
            let mut candidates = Vec::new();
            for (shard, weight) in round.projection.shards_of(&pod) {
                if !self.may_move(shard, now_ms, round) || weight > band.upper {
                    continue;
                }
                for target in &view.pods {
                    if *target == pod
                        || round.taking.contains(target)
                        || band.isolated.contains(target)
                    {
                        continue;
                    }
                    let target_after = round.projection.load(target) + weight;
                    let benefit = source - (source - weight).max(target_after);
                    if benefit > 0.0 {
                        candidates.push(Candidate {
                            benefit,
                            weight,
                            shard,
                            target: target.clone(),
                            target_after,
                        });
                    }
                }
            }
            let enough = self.policy.min_benefit * source;
            // The biggest cut of the peak; among equals, the lightest target after the move.
            let best = candidates
                .iter()
                .filter(|c| c.benefit >= enough)
                .max_by(|a, b| {
                    a.benefit
                        .total_cmp(&b.benefit)
                        .then(b.target_after.total_cmp(&a.target_after))
                        .then(b.shard.cmp(&a.shard))
                })
                .or_else(|| {
                    // Only small shards: shed the largest that keeps its target in the band,
                    // if the pod is well above the band.
                    (source - band.upper >= enough).then_some(())?;
                    candidates
                        .iter()
                        .filter(|c| c.target_after <= band.upper)
                        .max_by(|a, b| {
                            a.weight
                                .total_cmp(&b.weight)
                                .then(b.target_after.total_cmp(&a.target_after))
                                .then(b.shard.cmp(&a.shard))
                        })
                });
            if let Some(best) = best.cloned() {
                round.push(best.shard, &pod, &best.target, MoveReason::Relieve);
            }
        }
    }

    /// Cold pods, lightest first, each pull a shard from the heaviest pod above the mean.
    fn fill(&self, view: &ClusterView, now_ms: u64, round: &mut Round) {
        let band = Band::of(&round.projection, &view.pods, &self.policy);
        let mut cold: Vec<PodId> = view
            .pods
            .iter()
            .filter(|pod| {
                let empty = round.projection.shards_of(pod).is_empty();
                (empty || self.trend(pod).cold.on)
                    && !band.isolated.contains(*pod)
                    && round.projection.load(pod) < band.lower
            })
            .cloned()
            .collect();
        cold.sort_by(|a, b| {
            round
                .projection
                .load(a)
                .total_cmp(&round.projection.load(b))
                .then(a.cmp(b))
        });
        for pod in cold {
            if round.budget == 0 || round.taking.contains(&pod) {
                continue;
            }
            let target_load = round.projection.load(&pod);
            let sources: Vec<PodId> = round
                .projection
                .by_load_desc(&view.pods)
                .into_iter()
                .filter(|source| {
                    *source != pod
                        && !band.isolated.contains(source)
                        && !round.giving.contains(source)
                        && round.projection.load(source) > band.mean
                })
                .collect();
            let pick = sources.iter().find_map(|source| {
                let source_load = round.projection.load(source);
                round
                    .projection
                    .shards_of(source)
                    .into_iter()
                    .find(|(shard, weight)| {
                        self.may_move(*shard, now_ms, round)
                            && target_load + weight <= band.mean
                            && source_load - weight >= target_load + weight
                    })
                    .map(|(shard, _)| (shard, source.clone()))
            });
            if let Some((shard, source)) = pick {
                round.push(shard, &source, &pod, MoveReason::Fill);
            }
        }
    }
}

/// A load move considered for a hot pod.
#[derive(Debug, Clone)]
struct Candidate {
    /// How much lower the pair's peak (source or target) is after the move.
    benefit: f64,
    weight: f64,
    shard: u32,
    target: PodId,
    /// The target's load after the move.
    target_after: f64,
}

/// The shards' owners and weights as they will be once the moves in flight and those planned
/// so far are done.
#[derive(Debug, Clone)]
struct Projection {
    owner: BTreeMap<u32, PodId>,
    weight: BTreeMap<u32, f64>,
    /// The sum of the weights of each pod's shards.
    loads: BTreeMap<PodId, f64>,
}

impl Projection {
    fn new(view: &ClusterView, in_flight: &BTreeMap<u32, Move>, policy: &PlannerPolicy) -> Self {
        let mut owner = BTreeMap::new();
        let mut weight = BTreeMap::new();
        let mut loads = BTreeMap::new();
        for (shard, observed) in &view.shards {
            let pod = in_flight
                .get(shard)
                .map_or(&observed.owner, |moving| &moving.to);
            let shard_weight = observed.load.max(0.0) + policy.idle_weight;
            *loads.entry(pod.clone()).or_insert(0.0) += shard_weight;
            owner.insert(*shard, pod.clone());
            weight.insert(*shard, shard_weight);
        }
        Projection {
            owner,
            weight,
            loads,
        }
    }

    fn owners(&self) -> impl Iterator<Item = &PodId> {
        self.owner.values()
    }

    fn load(&self, pod: &str) -> f64 {
        self.loads.get(pod).copied().unwrap_or(0.0)
    }

    /// `pod`'s shards with their weights, heaviest first (then by number).
    fn shards_of(&self, pod: &str) -> Vec<(u32, f64)> {
        let mut shards: Vec<(u32, f64)> = self
            .owner
            .iter()
            .filter(|(_, owner)| *owner == pod)
            .map(|(shard, _)| (*shard, self.weight[shard]))
            .collect();
        shards.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        shards
    }

    /// `pods`, heaviest first (then by name).
    fn by_load_desc(&self, pods: &BTreeSet<PodId>) -> Vec<PodId> {
        let mut pods: Vec<(f64, PodId)> = pods.iter().map(|p| (self.load(p), p.clone())).collect();
        pods.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        pods.into_iter().map(|(_, pod)| pod).collect()
    }

    fn apply(&mut self, shard: u32, to: &str) {
        let weight = self.weight[&shard];
        if let Some(from) = self.owner.insert(shard, to.to_owned()) {
            *self.loads.entry(from).or_insert(0.0) -= weight;
        }
        *self.loads.entry(to.to_owned()).or_insert(0.0) += weight;
    }
}

/// The band the shared pods are held to, and the pods left out of it.
#[derive(Debug, Clone)]
struct Band {
    mean: f64,
    lower: f64,
    upper: f64,
    /// Pods that hold nothing but one shard too hot to share.
    isolated: BTreeSet<PodId>,
}

impl Band {
    fn of(projection: &Projection, pods: &BTreeSet<PodId>, policy: &PlannerPolicy) -> Band {
        let mut isolated = BTreeSet::new();
        loop {
            let shared: Vec<&PodId> = pods.iter().filter(|p| !isolated.contains(*p)).collect();
            let total: f64 = shared.iter().map(|p| projection.load(p)).sum();
            let mean = if shared.is_empty() {
                0.0
            } else {
                total / shared.len() as f64
            };
            let upper = mean * (1.0 + policy.tolerance);
            let newly: Vec<PodId> = shared
                .iter()
                .filter(|pod| {
                    let shards = projection.shards_of(pod);
                    shards.len() == 1 && shards[0].1 > upper
                })
                .map(|pod| (*pod).clone())
                .collect();
            // Keep at least one pod in the band.
            if newly.is_empty() || newly.len() >= shared.len() {
                return Band {
                    mean,
                    lower: mean * (1.0 - policy.tolerance),
                    upper,
                    isolated,
                };
            }
            isolated.extend(newly);
        }
    }
}

/// One plan being made: the projection with the planned moves applied, and the limits left.
struct Round {
    projection: Projection,
    /// Shards already in this plan: none moves twice.
    planned: BTreeSet<u32>,
    budget: usize,
    giving: BTreeSet<PodId>,
    taking: BTreeSet<PodId>,
    moves: Vec<Move>,
}

impl Round {
    /// The lightest of `pods` that takes no shard yet and passes `accept` (then by name).
    fn lightest<'a>(
        &self,
        pods: impl Iterator<Item = &'a PodId>,
        accept: impl Fn(&PodId) -> bool,
    ) -> Option<PodId> {
        self.lightest_of(pods, |pod| !self.taking.contains(pod) && accept(pod))
    }

    /// The lightest of `pods` that passes `accept` (then by name), whatever it takes already.
    fn lightest_of<'a>(
        &self,
        pods: impl Iterator<Item = &'a PodId>,
        accept: impl Fn(&PodId) -> bool,
    ) -> Option<PodId> {
        pods.filter(|pod| accept(pod))
            .map(|pod| (self.projection.load(pod), pod))
            .min_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(b.1)))
            .map(|(_, pod)| pod.clone())
    }

    fn push(&mut self, shard: u32, from: &str, to: &str, reason: MoveReason) {
        self.projection.apply(shard, to);
        self.planned.insert(shard);
        self.budget -= 1;
        self.giving.insert(from.to_owned());
        self.taking.insert(to.to_owned());
        self.moves.push(Move {
            shard,
            from: from.to_owned(),
            to: to.to_owned(),
            reason,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `owners[i]` owns shard `i` with load `loads[i]`; every named pod stays.
    fn view(pods: &[&str], owners: &[&str], loads: &[f64]) -> ClusterView {
        ClusterView {
            pods: pods.iter().map(|p| p.to_string()).collect(),
            shards: owners
                .iter()
                .zip(loads)
                .enumerate()
                .map(|(shard, (owner, load))| {
                    (
                        shard as u32,
                        ObservedShard {
                            owner: owner.to_string(),
                            load: *load,
                        },
                    )
                })
                .collect(),
        }
    }

    fn apply(view: &mut ClusterView, moves: &[Move]) {
        for m in moves {
            view.shards.get_mut(&m.shard).unwrap().owner = m.to.clone();
        }
    }

    fn observed(rebalancer: &mut Rebalancer, view: &ClusterView, samples: u32) {
        for _ in 0..samples {
            rebalancer.observe(view);
        }
    }

    #[test]
    fn a_hot_pod_is_relieved_only_after_three_samples_over_the_band() {
        let mut rebalancer = Rebalancer::new(PlannerPolicy::default());
        // a holds two busy shards, b two idle ones.
        let v = view(
            &["a", "b"],
            &["a", "a", "b", "b"],
            &[100.0, 100.0, 0.0, 0.0],
        );
        observed(&mut rebalancer, &v, 2);
        assert!(
            rebalancer.plan(&v, 0).is_empty(),
            "two samples are not a trend"
        );
        rebalancer.observe(&v);
        let moves = rebalancer.plan(&v, 0);
        assert_eq!(
            moves,
            [Move {
                shard: 0,
                from: "a".into(),
                to: "b".into(),
                reason: MoveReason::Relieve
            }]
        );
    }

    #[test]
    fn a_pod_stops_being_hot_after_two_samples_in_the_band() {
        let mut streak = Streak::default();
        for _ in 0..3 {
            streak.sample(true, 3, 2);
        }
        assert!(streak.on);
        streak.sample(false, 3, 2);
        assert!(streak.on, "one sample back in the band is not enough");
        streak.sample(true, 3, 2);
        streak.sample(false, 3, 2);
        assert!(streak.on, "the samples back in the band must be in a row");
        streak.sample(false, 3, 2);
        assert!(!streak.on);
    }

    #[test]
    fn a_moved_shard_stays_put_through_its_cooldown() {
        let policy = PlannerPolicy {
            cooldown_ms: 1_000,
            ..PlannerPolicy::default()
        };
        let mut rebalancer = Rebalancer::new(policy);
        let mut v = view(&["a", "b"], &["a", "a", "b"], &[100.0, 100.0, 0.0]);
        observed(&mut rebalancer, &v, 3);
        let first = rebalancer.plan(&v, 0);
        assert_eq!(first.len(), 1);
        rebalancer.started(&first[0]);
        rebalancer.finished(&first[0], 0);
        apply(&mut v, &first);
        // The load turns around: the moved shard would be the one to move back.
        v.shards.get_mut(&1).unwrap().load = 0.0;
        v.shards.get_mut(&0).unwrap().load = 300.0;
        v.shards.get_mut(&2).unwrap().load = 300.0;
        observed(&mut rebalancer, &v, 3);
        assert!(!rebalancer.movable(first[0].shard, 999));
        let during = rebalancer.plan(&v, 999);
        assert!(
            during.iter().all(|m| m.shard != first[0].shard),
            "{during:?}"
        );
        assert!(rebalancer.movable(first[0].shard, 1_000));
    }

    #[test]
    fn a_move_another_planner_saw_end_cools_down_as_if_seen_here() {
        let policy = PlannerPolicy {
            cooldown_ms: 10_000,
            ..PlannerPolicy::default()
        };
        let mut rebalancer = Rebalancer::new(policy);
        rebalancer.recall_finished(3, 5_000, 6_000);
        rebalancer.recall_finished(4, 5_000, 20_000);
        assert!(!rebalancer.movable(3, 14_999));
        assert!(rebalancer.movable(3, 15_000));
        assert!(
            rebalancer.movable(4, 20_000),
            "cooled down before it was recalled"
        );
        // An older record does not shorten a cooldown.
        rebalancer.recall_finished(3, 1_000, 6_000);
        assert!(!rebalancer.movable(3, 14_999));
    }

    #[test]
    fn a_leaving_pod_is_evacuated_first_heaviest_shard_to_the_lightest_pod() {
        let rebalancer = Rebalancer::new(PlannerPolicy::default());
        // c is leaving; a is hot, but evacuation comes first.
        let v = view(
            &["a", "b"],
            &["a", "a", "b", "c", "c"],
            &[500.0, 500.0, 10.0, 5.0, 50.0],
        );
        let evacuate = |shard| Move {
            shard,
            from: "c".into(),
            to: "b".into(),
            reason: MoveReason::Evacuate,
        };
        // Both of c's shards leave at once, to b, which stays the lighter pod.
        assert_eq!(rebalancer.plan(&v, 0), [evacuate(4), evacuate(3)]);
    }

    #[test]
    fn leaving_pods_are_evacuated_in_turn_as_many_shards_at_once_as_moves_may_run() {
        let policy = PlannerPolicy {
            max_concurrent_moves: 5,
            ..PlannerPolicy::default()
        };
        let rebalancer = Rebalancer::new(policy);
        // c and d are leaving with four shards each; a and b stay, empty.
        let owners = ["c", "c", "c", "c", "d", "d", "d", "d"];
        let v = view(
            &["a", "b"],
            &owners,
            &[10.0, 20.0, 30.0, 40.0, 1.0, 2.0, 3.0, 4.0],
        );
        let moves = rebalancer.plan(&v, 0);
        let taken: Vec<(u32, &str)> = moves.iter().map(|m| (m.shard, m.to.as_str())).collect();
        // The heaviest of each pod in turn, each to the pod lighter at that point.
        assert_eq!(taken, [(3, "a"), (7, "b"), (2, "b"), (6, "b"), (1, "b")]);
        assert!(moves.iter().all(|m| m.reason == MoveReason::Evacuate));
    }

    #[test]
    fn a_shard_too_hot_to_share_gets_its_pod_to_itself() {
        let mut rebalancer = Rebalancer::new(PlannerPolicy::default());
        // Shard 0 alone is above the band's top: its companion 1 leaves, it stays.
        let v = view(
            &["a", "b", "c"],
            &["a", "a", "b", "c"],
            &[1000.0, 50.0, 50.0, 50.0],
        );
        observed(&mut rebalancer, &v, 3);
        let moves = rebalancer.plan(&v, 0);
        assert_eq!(moves.len(), 1, "{moves:?}");
        assert_eq!(moves[0].shard, 1);
        assert_eq!(moves[0].reason, MoveReason::Isolate);
        let mut after = v.clone();
        apply(&mut after, &moves);
        observed(&mut rebalancer, &after, 3);
        assert!(
            rebalancer.plan(&after, 0).is_empty(),
            "an isolated shard is not moved around"
        );
    }

    #[test]
    fn a_new_pod_pulls_shards_until_it_carries_its_share() {
        let mut rebalancer = Rebalancer::new(PlannerPolicy::default());
        let owners: Vec<&str> = (0..12)
            .map(|i| if i % 2 == 0 { "a" } else { "b" })
            .collect();
        let mut v = view(&["a", "b", "c"], &owners, &[10.0; 12]);
        let mut moved = 0;
        for _ in 0..20 {
            rebalancer.observe(&v);
            let moves = rebalancer.plan(&v, 0);
            assert!(moves.iter().all(|m| m.to == "c"), "{moves:?}");
            moved += moves.len();
            apply(&mut v, &moves);
        }
        let on_c = v.shards.values().filter(|s| s.owner == "c").count();
        assert_eq!(on_c, 4, "c holds a third of the shards");
        assert_eq!(moved, 4, "and nothing else moved");
    }

    #[test]
    fn plans_never_exceed_the_concurrent_moves_counting_those_in_flight() {
        let policy = PlannerPolicy {
            max_concurrent_moves: 2,
            ..PlannerPolicy::default()
        };
        let mut rebalancer = Rebalancer::new(policy);
        let owners = ["a", "a", "a", "a", "b", "b", "b", "b"];
        let v = view(&["a", "b", "c", "d", "e", "f"], &owners, &[10.0; 8]);
        let first = rebalancer.plan(&v, 0);
        assert_eq!(first.len(), 2);
        rebalancer.started(&first[0]);
        let second = rebalancer.plan(&v, 0);
        assert_eq!(second.len(), 1, "one slot is taken by the move in flight");
        assert_ne!(second[0].shard, first[0].shard);
    }

    #[test]
    fn no_plan_without_pods_to_hold_shards() {
        let rebalancer = Rebalancer::new(PlannerPolicy::default());
        let v = view(&[], &["a"], &[10.0]);
        assert!(rebalancer.plan(&v, 0).is_empty());
    }
}
