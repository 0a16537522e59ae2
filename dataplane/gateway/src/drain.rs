//! Draining a gateway: its clients are told to reconnect elsewhere in batches spread over a
//! window, not all at once, so that the other gateways (and the store, as each device catches
//! up) take the reconnections at a steady rate rather than as a storm.
//!
//! A drain is ordered once ([`GatewayDrain::start`]: on SIGTERM, or by the admin API's `Drain`)
//! and carried out by one owned loop ([`GatewayDrain::run`]). The loop takes the connections
//! open when it starts, splits them into [`steps`] batches of nearly equal size (at most
//! `ceil(connections / steps)` each), and tells the connections of batch `k` at
//! `k × window / steps`, the first batch at once. Each connection told answers the sends it
//! accepted, writes `reconnect` with an `after_ms` drawn below the gateway's
//! `reconnect_jitter`, and closes with 1001 (the per-connection drain of `lib.rs`). After
//! the last batch, every [`DRAIN_STEP`] the loop tells the connections opened since (an upgrade
//! accepted just before the order) until the node stops. A window of zero tells every
//! connection at once.
//!
//! Once ordered, the drain cannot be called off: [`GatewayDrain::is_draining`] stays true, the
//! node answers not ready and refuses new connections, so that clients go elsewhere.

use crate::routes::{ConnectionHandle, Routes};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;

/// The time between two batches of a drain (a window is cut into steps of this length).
pub const DRAIN_STEP: Duration = Duration::from_millis(250);

/// Most batches of a drain, whatever its window (a window past `DRAIN_STEP × MAX_STEPS` gets
/// longer steps).
pub const MAX_STEPS: u32 = 4 * 60 * 10;

/// A drain as ordered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DrainOrder {
    /// The client connections open when it was ordered.
    pub connections: usize,
    /// The window its batches are spread over.
    pub window: Duration,
}

/// The batches of a drain of one gateway (module documentation).
pub struct GatewayDrain {
    routes: Arc<Routes>,
    default_window: Duration,
    jitter: Duration,
    order: watch::Sender<Option<DrainOrder>>,
}

/// The batches a drain over `window` makes: one per [`DRAIN_STEP`], at least one, at most
/// [`MAX_STEPS`].
pub fn steps(window: Duration) -> u32 {
    let steps = window.as_millis() / DRAIN_STEP.as_millis();
    steps.clamp(1, u128::from(MAX_STEPS)) as u32
}

/// The connections of batch `k` of `steps` among `connections`: indexes
/// `ceil(k × connections / steps)..ceil((k + 1) × connections / steps)`, so the first batch is
/// never empty while any connection is open, and no batch differs from another by more than one.
pub fn batch(k: u32, steps: u32, connections: usize) -> std::ops::Range<usize> {
    let bound = |k: u64| {
        let (n, steps) = (connections as u128, u128::from(steps));
        (u128::from(k) * n).div_ceil(steps) as usize
    };
    bound(u64::from(k))..bound(u64::from(k) + 1)
}

/// A `reconnect`'s `after_ms`, drawn in `[0, jitter)` (0 without jitter).
pub fn reconnect_delay_ms(jitter: Duration) -> u64 {
    match jitter.as_millis() as u64 {
        0 => 0,
        jitter => rand::random::<u64>() % jitter,
    }
}

impl GatewayDrain {
    /// The drain of the connections of `routes`: over `default_window` unless the order says
    /// otherwise, each `reconnect`'s `after_ms` drawn below `jitter`.
    pub fn new(routes: Arc<Routes>, default_window: Duration, jitter: Duration) -> Self {
        Self {
            routes,
            default_window,
            jitter,
            order: watch::Sender::new(None),
        }
    }

    /// Orders the drain, over `window` (default: the gateway's), and returns the order; a
    /// drain ordered before goes on as it was ordered, and its order is returned.
    pub fn start(&self, window: Option<Duration>) -> DrainOrder {
        let mut order = DrainOrder {
            connections: self.routes.count(),
            window: window.unwrap_or(self.default_window),
        };
        self.order.send_if_modified(|current| match current {
            Some(earlier) => {
                order = *earlier;
                false
            }
            None => {
                *current = Some(order);
                true
            }
        });
        order
    }

    /// Whether a drain was ordered.
    pub fn is_draining(&self) -> bool {
        self.order.borrow().is_some()
    }

    /// Waits for the order, then tells the connections to reconnect batch by batch, and after
    /// the last batch, those opened since, every [`DRAIN_STEP`]. Never returns: run it as a
    /// background loop, cancelled when the node stops. Restarted, it tells the connections
    /// not told yet, over the whole window again.
    pub async fn run(&self) {
        let mut ordered = self.order.subscribe();
        let Ok(order) = ordered.wait_for(Option::is_some).await.map(|order| *order) else {
            // The sender lives in `self`: never closed while this runs.
            return std::future::pending().await;
        };
        let window = order.map_or(Duration::ZERO, |order| order.window);
        let connections = self.routes.untold();
        let steps = steps(window);
        let step = window / steps;
        let started = Instant::now();
        tracing::info!(
            connections = connections.len(),
            window_ms = window.as_millis() as u64,
            steps,
            "draining: telling the connections to reconnect elsewhere, batch by batch"
        );
        for k in 0..steps {
            tokio::time::sleep_until(started + step * k).await;
            self.tell(&connections[batch(k, steps, connections.len())]);
        }
        let mut rounds = tokio::time::interval(DRAIN_STEP);
        loop {
            rounds.tick().await;
            self.tell(&self.routes.untold());
        }
    }

    fn tell(&self, connections: &[ConnectionHandle]) {
        for connection in connections {
            connection.tell_to_reconnect(reconnect_delay_ms(self.jitter));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use courier_core::metrics::Metrics;

    #[test]
    fn batches_cover_every_connection_once_evenly_and_start_at_once() {
        for (connections, steps) in [(10, 4), (1, 240), (3, 240), (1000, 240), (0, 4), (7, 1)] {
            let batches: Vec<_> = (0..steps).map(|k| batch(k, steps, connections)).collect();
            let covered: Vec<usize> = batches.iter().flat_map(|b| b.clone()).collect();
            assert_eq!(covered, (0..connections).collect::<Vec<_>>());
            let sizes: Vec<usize> = batches.iter().map(|b| b.len()).collect();
            let most = connections.div_ceil(steps as usize);
            assert!(sizes.iter().all(|&n| n <= most), "{sizes:?}");
            if connections > 0 {
                assert!(sizes[0] > 0, "the first batch goes at once");
            }
        }
        assert_eq!(steps(Duration::ZERO), 1);
        assert_eq!(steps(Duration::from_secs(60)), 240);
        assert_eq!(steps(Duration::from_secs(3600)), MAX_STEPS);
    }

    /// `n` connections registered as open (telling one does not use its delivery queue).
    fn connections(routes: &Routes, n: usize) -> Vec<ConnectionHandle> {
        (0..n)
            .map(|i| routes.register(&format!("u{i}"), "phone", 0, 16).0)
            .collect()
    }

    fn told(connections: &[ConnectionHandle]) -> usize {
        connections
            .iter()
            .filter(|c| c.signals.reconnect_after_ms().is_some())
            .count()
    }

    #[tokio::test(start_paused = true)]
    async fn a_drain_tells_its_connections_batch_by_batch_over_its_window() {
        let routes = Arc::new(Routes::new(Arc::new(Metrics::new())));
        let open = connections(&routes, 10);
        let jitter = Duration::from_secs(2);
        let drain = Arc::new(GatewayDrain::new(
            routes.clone(),
            Duration::from_secs(60),
            jitter,
        ));
        let runner = drain.clone();
        let run = tokio::spawn(async move { runner.run().await });
        tokio::time::sleep(DRAIN_STEP * 3).await;
        assert_eq!(told(&open), 0, "nothing is told before the order");
        assert!(!drain.is_draining());

        // Over 1 s: 4 steps of 250 ms, batches of 3, 2, 3 and 2 connections.
        let window = DRAIN_STEP * 4;
        let order = drain.start(Some(window));
        assert_eq!(
            order,
            DrainOrder {
                connections: 10,
                window
            }
        );
        assert!(drain.is_draining());
        let mut seen = Vec::new();
        for _ in 0..5 {
            // Half a step into each step: the batch of the step has been told.
            tokio::time::sleep(DRAIN_STEP / 2).await;
            seen.push(told(&open));
            tokio::time::sleep(DRAIN_STEP / 2).await;
        }
        assert_eq!(seen, [3, 5, 8, 10, 10]);
        assert!(
            open.iter()
                .filter_map(|c| c.signals.reconnect_after_ms())
                .all(|after_ms| after_ms < jitter.as_millis() as u64),
            "each `after_ms` is drawn below the jitter"
        );
        assert_eq!(
            drain.start(Some(Duration::from_secs(99))),
            order,
            "a drain ordered again goes on as first ordered"
        );

        // A connection opened after the last batch is told at the next step.
        let late = connections(&routes, 1);
        assert_eq!(told(&late), 0);
        tokio::time::sleep(DRAIN_STEP + DRAIN_STEP / 2).await;
        assert_eq!(told(&late), 1);
        run.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn a_drain_with_no_window_tells_every_connection_at_once() {
        let routes = Arc::new(Routes::new(Arc::new(Metrics::new())));
        let open = connections(&routes, 50);
        let drain = Arc::new(GatewayDrain::new(
            routes.clone(),
            Duration::ZERO,
            Duration::ZERO,
        ));
        let runner = drain.clone();
        let run = tokio::spawn(async move { runner.run().await });
        drain.start(None);
        tokio::time::sleep(DRAIN_STEP / 2).await;
        assert_eq!(told(&open), 50);
        assert!(
            open.iter()
                .all(|c| c.signals.reconnect_after_ms() == Some(0))
        );
        run.abort();
    }
}
