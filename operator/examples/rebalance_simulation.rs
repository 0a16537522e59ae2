//! The simulation of `docs/rebalancing.md`: 1024 shards under a Zipf load, sequencer pods
//! added over a day (4, then 6, then 8), a hotspot that moves to another shard every 3 hours,
//! planned every 15 s sample with the default policy. Writes CSV on standard output: per
//! round, the hour, the pods, the busiest pod's load over the mean, and the moves.
//!
//! ```sh
//! cargo run -p courier-operator --example rebalance_simulation > target/rebalance.csv
//! python3 operator/examples/plot-rebalancing.py target/rebalance.csv docs/img/rebalancing.png
//! ```

use courier_operator::rebalance::simulation::{Simulation, zipf};
use courier_operator::rebalance::{ClusterView, ObservedShard, PlannerPolicy};

const SHARDS: usize = 1024;
const ROUND_MS: u64 = 15_000;
const HOURS: u64 = 24;
/// Appends per second over the cluster, spread as a Zipf law (exponent 0.9) over the shards.
const TOTAL_LOAD: f64 = 100_000.0;
/// The hotspot's own load: a celebrity conversation, on top of the Zipf load.
const HOTSPOT_LOAD: f64 = 8_000.0;

/// The pods at hour `hour`.
fn pods_at(hour: f64) -> usize {
    match hour {
        h if h < 8.0 => 4,
        h if h < 16.0 => 6,
        _ => 8,
    }
}

/// The shard the hotspot is on at hour `hour` (a different, pseudo-random one every 3 h).
fn hotspot_at(hour: f64) -> u32 {
    let period = (hour / 3.0) as u64;
    ((period.wrapping_mul(2_654_435_761) + 17) % SHARDS as u64) as u32
}

fn main() {
    // The Zipf ranks are spread over the shards (rank r on shard r * 37 mod 1024) so that the
    // heaviest shards do not start on one pod.
    let mut base = vec![0.0; SHARDS];
    for (rank, load) in zipf(SHARDS, 0.9, TOTAL_LOAD).into_iter().enumerate() {
        base[(rank * 37) % SHARDS] = load;
    }
    let load_of = |shard: u32, hour: f64| {
        base[shard as usize]
            + if shard == hotspot_at(hour) {
                HOTSPOT_LOAD
            } else {
                0.0
            }
    };
    let pods = pods_at(0.0);
    let view = ClusterView {
        pods: (0..pods).map(|p| format!("seq-{p}")).collect(),
        shards: (0..SHARDS as u32)
            .map(|shard| {
                (
                    shard,
                    ObservedShard {
                        owner: format!("seq-{}", shard as usize % pods),
                        load: load_of(shard, 0.0),
                    },
                )
            })
            .collect(),
    };
    let mut sim = Simulation::new(PlannerPolicy::default(), view, ROUND_MS);
    let mut total_moves = 0;
    println!("hour,pods,max_over_mean,moves,total_moves");
    for round in 0..(HOURS * 3600 * 1000 / ROUND_MS) {
        let hour = (round * ROUND_MS) as f64 / 3_600_000.0;
        let pods = pods_at(hour);
        sim.view.pods = (0..pods).map(|p| format!("seq-{p}")).collect();
        for (shard, observed) in sim.view.shards.iter_mut() {
            observed.load = load_of(*shard, hour);
        }
        let moves = sim.round().len();
        total_moves += moves;
        println!(
            "{hour:.4},{pods},{:.4},{moves},{total_moves}",
            sim.max_over_mean()
        );
    }
}
