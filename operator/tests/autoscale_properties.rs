//! Properties of the gateway autoscaler under arbitrary connection curves: it stays within its
//! limits, grows at once to what connections need, and shrinks by one pod per step, only after
//! a whole window without a higher need.

use std::collections::BTreeMap;

use courier_operator::autoscale::{GatewayAutoscaler, ScalePolicy};
use proptest::prelude::*;

const SAMPLE_MS: u64 = 15_000;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn the_pool_follows_connections_up_at_once_and_down_slowly(
        min in 1i32..4,
        extra in 0i32..8,
        target in 100u32..2000,
        curve in proptest::collection::vec(0u64..20_000, 50..200),
    ) {
        let policy = ScalePolicy::new(min, min + extra, target);
        let mut autoscaler = GatewayAutoscaler::new();
        let mut replicas = min;
        let mut needs: Vec<(u64, i32)> = Vec::new();
        let mut last_removal: Option<u64> = None;
        for (step, connections) in curve.iter().enumerate() {
            let now = step as u64 * SAMPLE_MS;
            let pods: BTreeMap<String, u64> = (0..replicas)
                .map(|p| (format!("gw-{p}"), connections / replicas as u64))
                .collect();
            let need = policy.target(pods.values().sum());
            needs.push((now, need));
            let decision = autoscaler.decide(&policy, replicas, &pods.into(), now);
            prop_assert!(decision.replicas >= min && decision.replicas <= min + extra);
            if need > replicas {
                prop_assert_eq!(decision.replicas, need, "up at once");
            }
            if decision.replicas < replicas {
                prop_assert_eq!(decision.replicas, replicas - 1, "one pod at a time");
                prop_assert!(last_removal.is_none_or(|at| now - at >= policy.down_step_ms));
                prop_assert!(now >= policy.down_window_ms, "not before a whole window");
                let window_need = needs
                    .iter()
                    .filter(|(at, _)| now - at <= policy.down_window_ms)
                    .map(|(_, n)| *n)
                    .max()
                    .unwrap();
                prop_assert!(window_need < replicas, "no higher need within the window");
                prop_assert!(decision.remove.is_some(), "it names the pod to remove");
                last_removal = Some(now);
            }
            replicas = decision.replicas;
        }
    }
}
