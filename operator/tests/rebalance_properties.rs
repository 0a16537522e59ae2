//! Properties of the hot-shard planner: it keeps its limits, leaves cooling shards alone,
//! converges under a Zipf-skewed load, moves only what scaling needs, and moves nothing to a
//! draining node.

use courier_operator::rebalance::executor::Sample;
use courier_operator::rebalance::simulation::{Simulation, zipf};
use courier_operator::rebalance::{
    ClusterView, Move, MoveReason, ObservedShard, PlannerPolicy, Rebalancer,
};
use proptest::prelude::*;
use std::collections::{BTreeMap, BTreeSet};

const ROUND_MS: u64 = 15_000;

fn pod(i: usize) -> String {
    format!("seq-{i}")
}

/// A cluster of `staying` pods (plus `leaving` ones that still own shards) with the given
/// owners (indexes into staying then leaving pods) and loads.
fn cluster(staying: usize, owners: &[usize], loads: &[f64]) -> ClusterView {
    ClusterView {
        pods: (0..staying).map(pod).collect(),
        shards: owners
            .iter()
            .zip(loads)
            .enumerate()
            .map(|(shard, (owner, load))| {
                (
                    shard as u32,
                    ObservedShard {
                        owner: pod(*owner),
                        load: *load,
                    },
                )
            })
            .collect(),
    }
}

fn arbitrary_cluster() -> impl Strategy<Value = (ClusterView, u32)> {
    (1usize..8, 0usize..3, 1usize..96).prop_flat_map(|(staying, leaving, shards)| {
        (
            proptest::collection::vec(0..staying + leaving, shards),
            proptest::collection::vec(prop_oneof![Just(0.0), 0.0..50.0, 50.0..5000.0], shards),
            0u32..5,
        )
            .prop_map(move |(owners, loads, samples)| (cluster(staying, &owners, &loads), samples))
    })
}

/// Checks one plan against the limits, counting the moves in flight.
fn assert_within_limits(
    rebalancer: &Rebalancer,
    view: &ClusterView,
    plan: &[Move],
) -> Result<(), TestCaseError> {
    let in_flight: Vec<&Move> = rebalancer.in_flight().collect();
    prop_assert!(plan.len() + in_flight.len() <= rebalancer.policy().max_concurrent_moves);
    let mut shards = BTreeSet::new();
    let mut giving: BTreeMap<&str, usize> = BTreeMap::new();
    let mut taking: BTreeMap<&str, usize> = BTreeMap::new();
    let mut evacuated_to = BTreeSet::new();
    for m in in_flight.iter().copied().chain(plan) {
        prop_assert!(shards.insert(m.shard), "shard {} moves twice", m.shard);
        prop_assert!(
            view.pods.contains(&m.to),
            "{m:?} goes to a pod that is not staying"
        );
        prop_assert_ne!(&m.from, &m.to);
        // Evacuations may leave one pod and enter another several at a time; load moves not.
        if m.reason == MoveReason::Evacuate {
            prop_assert!(
                !view.pods.contains(&m.from),
                "{m:?} evacuates a staying pod"
            );
            evacuated_to.insert(m.to.as_str());
        } else {
            *giving.entry(&m.from).or_default() += 1;
            *taking.entry(&m.to).or_default() += 1;
        }
    }
    prop_assert!(
        taking.keys().all(|pod| !evacuated_to.contains(pod)),
        "a pod takes an evacuated shard and a load move at once: {taking:?}"
    );
    for m in plan {
        prop_assert_eq!(
            &view.shards[&m.shard].owner,
            &m.from,
            "{:?} is not from its owner",
            m
        );
    }
    prop_assert!(
        giving.values().all(|n| *n <= 1),
        "a pod gives two shards at once: {giving:?}"
    );
    prop_assert!(
        taking.values().all(|n| *n <= 1),
        "a pod takes two shards at once: {taking:?}"
    );
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn plans_never_exceed_their_limits(
        (view, samples) in arbitrary_cluster(),
        max_moves in 1usize..6,
        start_first in any::<bool>(),
    ) {
        let policy = PlannerPolicy { max_concurrent_moves: max_moves, ..PlannerPolicy::default() };
        let mut rebalancer = Rebalancer::new(policy);
        for _ in 0..samples {
            rebalancer.observe(&view);
        }
        let first = rebalancer.plan(&view, 0);
        assert_within_limits(&rebalancer, &view, &first)?;
        if start_first && !first.is_empty() {
            // With the first plan's first move in flight, the next plan still keeps the limits.
            rebalancer.started(&first[0]);
            let second = rebalancer.plan(&view, 0);
            assert_within_limits(&rebalancer, &view, &second)?;
        }
    }

    #[test]
    fn no_shard_moves_to_a_draining_node_and_a_draining_nodes_shards_leave_first(
        (view, samples) in arbitrary_cluster(),
        draining in proptest::collection::vec(any::<bool>(), 8),
    ) {
        // The sample the executor reads: the staying pods are the live nodes, some of them
        // draining (their own word in `ListShards`).
        let sample = Sample {
            nodes: view.pods.iter().map(|pod| (pod.clone(), format!("{pod}:7500"))).collect(),
            shards: view.shards.clone(),
            draining: view
                .pods
                .iter()
                .zip(&draining)
                .filter(|(_, drains)| **drains)
                .map(|(pod, _)| pod.clone())
                .collect(),
            ..Sample::default()
        };
        let planned = sample.view(None);
        let mut rebalancer = Rebalancer::new(PlannerPolicy::default());
        for _ in 0..samples {
            rebalancer.observe(&planned);
        }
        let plan = rebalancer.plan(&planned, 0);
        assert_within_limits(&rebalancer, &planned, &plan)?;
        prop_assert!(
            plan.iter().all(|m| !sample.draining.contains(&m.to)),
            "a move to a draining node: {plan:?} (draining: {:?})",
            sample.draining
        );
        // A draining node's shards are evacuated as a leaving pod's are: before any load move,
        // which only comes once every one of them is on its way out.
        let takers = view.pods.len() - sample.draining.len();
        let held: Vec<u32> = view
            .shards
            .iter()
            .filter(|(_, s)| sample.draining.contains(&s.owner))
            .map(|(shard, _)| *shard)
            .collect();
        if !held.is_empty() && takers > 0 {
            let evacuated: BTreeSet<u32> = plan
                .iter()
                .filter(|m| m.reason == MoveReason::Evacuate)
                .map(|m| m.shard)
                .collect();
            prop_assert!(
                plan.first().is_some_and(|m| m.reason == MoveReason::Evacuate),
                "a draining node's shards do not leave first: {plan:?}"
            );
            prop_assert!(
                held.iter().all(|shard| evacuated.contains(shard))
                    || plan.iter().all(|m| m.reason == MoveReason::Evacuate),
                "a load move while a draining node keeps shards: {plan:?}"
            );
        }
    }

    #[test]
    fn a_shard_never_moves_for_load_during_its_cooldown(
        seed_loads in proptest::collection::vec(0.0f64..1000.0, 16..64),
        pods in 2usize..6,
        drift in proptest::collection::vec((0usize..64, 0.0f64..3000.0), 40),
    ) {
        let shards = seed_loads.len();
        let owners: Vec<usize> = (0..shards).map(|s| s % pods).collect();
        let mut sim = Simulation::new(PlannerPolicy::default(), cluster(pods, &owners, &seed_loads), ROUND_MS);
        let mut last_move: BTreeMap<u32, u64> = BTreeMap::new();
        let cooldown = sim.rebalancer.policy().cooldown_ms;
        for round in 0..200 {
            // The load moves around: every 5 rounds one shard's load changes.
            if round % 5 == 0 {
                let (shard, load) = drift[(round / 5) % drift.len()];
                if let Some(s) = sim.view.shards.get_mut(&((shard % shards) as u32)) {
                    s.load = load;
                }
            }
            for m in sim.round() {
                if let Some(at) = last_move.get(&m.shard) {
                    prop_assert!(
                        m.reason == MoveReason::Evacuate || sim.now_ms >= at + cooldown,
                        "shard {} moved again after {} ms", m.shard, sim.now_ms - at
                    );
                }
                last_move.insert(m.shard, sim.now_ms);
            }
        }
    }

    #[test]
    fn converges_under_a_zipf_load(
        pods in 2usize..9,
        shards in 64usize..256,
        exponent in 0.6f64..1.3,
        owners in proptest::collection::vec(0usize..8, 256),
    ) {
        let loads = zipf(shards, exponent, 10_000.0);
        let owners: Vec<usize> = owners.iter().take(shards).map(|o| o % pods).collect();
        let mut sim = Simulation::new(PlannerPolicy::default(), cluster(pods, &owners, &loads), ROUND_MS);
        let policy = sim.rebalancer.policy().clone();
        // Quiet for longer than a cooldown plus the hysteresis: nothing is left to do.
        let quiet_needed = (policy.cooldown_ms / ROUND_MS) as usize + 5;
        let mut quiet = 0;
        let mut rounds = 0;
        while quiet < quiet_needed {
            rounds += 1;
            prop_assert!(rounds < 5_000, "no convergence after {rounds} rounds");
            quiet = if sim.round().is_empty() { quiet + 1 } else { 0 };
        }
        // Every pod is within the band widened by the minimum benefit, unless a single shard
        // is heavier than that alone.
        let weights: Vec<f64> = sim.pod_loads().iter().map(|(pod, load)| {
            let count = sim.view.shards.values().filter(|s| &s.owner == pod).count();
            load + count as f64 * policy.idle_weight
        }).collect();
        let mean = weights.iter().sum::<f64>() / weights.len() as f64;
        let heaviest_shard = loads[0] + policy.idle_weight;
        let bound = (mean * (1.0 + policy.tolerance) / (1.0 - policy.min_benefit)).max(heaviest_shard)
            + heaviest_shard.min(mean * policy.tolerance);
        let max = weights.iter().copied().fold(0.0, f64::max);
        prop_assert!(max <= bound, "max {max:.0} over bound {bound:.0} (mean {mean:.0}): {weights:?}");
    }

    #[test]
    fn scaling_up_moves_shards_only_onto_the_new_pods(
        old in 1usize..6,
        per_pod in 4usize..32,
        added in 1usize..4,
    ) {
        let shards = old * per_pod;
        let owners: Vec<usize> = (0..shards).map(|s| s % old).collect();
        let mut sim = Simulation::new(PlannerPolicy::default(), cluster(old + added, &owners, &vec![10.0; shards]), ROUND_MS);
        let new: BTreeSet<String> = (old..old + added).map(pod).collect();
        let mut moved = Vec::new();
        for _ in 0..(shards * 3 + 60) {
            moved.extend(sim.round());
        }
        prop_assert!(moved.iter().all(|m| new.contains(&m.to)), "a move between old pods: {moved:?}");
        let on_new = sim.view.shards.values().filter(|s| new.contains(&s.owner)).count();
        prop_assert_eq!(moved.len(), on_new, "a shard moved twice");
        let share = shards / (old + added);
        for pod in &new {
            let held = sim.view.shards.values().filter(|s| &s.owner == pod).count();
            prop_assert!(held + 1 >= share * 9 / 10, "{pod} holds {held} of a share of {share}");
        }
    }

    #[test]
    fn scaling_down_moves_only_the_leaving_pods_shards(
        staying in 1usize..6,
        leaving in 1usize..4,
        per_pod in 2usize..24,
    ) {
        let pods = staying + leaving;
        let shards = pods * per_pod;
        let owners: Vec<usize> = (0..shards).map(|s| s % pods).collect();
        let mut sim = Simulation::new(PlannerPolicy::default(), cluster(staying, &owners, &vec![10.0; shards]), ROUND_MS);
        let mut moved = Vec::new();
        for _ in 0..(shards * 2 + 60) {
            moved.extend(sim.round());
        }
        prop_assert_eq!(moved.len(), leaving * per_pod, "{:?}", moved);
        prop_assert!(moved.iter().all(|m| m.reason == MoveReason::Evacuate));
        prop_assert!(sim.view.shards.values().all(|s| sim.view.pods.contains(&s.owner)));
    }
}
