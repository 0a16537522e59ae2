//! Admission of sends. Past the node's capacity a send only waits longer in its queues, so the
//! node answers `unavailable` instead, with a jittered `retry_after_ms` (clients retry with the
//! same `client_msg_id`; refused clients do not come back together). Two bounds:
//!
//! - **The commit wait.** While sends are in flight and those answered lately waited longer
//!   than [`AdmissionLimits::max_wait`] for their commit (a moving average over about the last
//!   [`AVERAGE_OVER`] answers), new sends are refused: the queue stays near that wait, however
//!   fast the machine. The retry hint is that wait, so clients come back once the queue could
//!   have drained. When nothing is in flight, everything is admitted (the average is stale).
//! - **The sends in flight** ([`AdmissionLimits::max_in_flight`]): a bound on memory for when
//!   answers stop coming at all (a store that hangs), which the average cannot see.

use courier_core::error::ApiError;
use courier_core::metrics::{Metrics, ScopeLabel};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
// tokio's clock: the same as the system's, and paused in tests.
use tokio::time::Instant;

/// The moving average of the commit wait weighs each answer by 1 / this.
pub const AVERAGE_OVER: u64 = 16;

/// Bounds of admission.
#[derive(Debug, Clone, Copy)]
pub struct AdmissionLimits {
    /// Sends accepted and not answered yet.
    pub max_in_flight: usize,
    /// Average wait for a commit past which new sends are refused while some are in flight.
    pub max_wait: Duration,
}

impl Default for AdmissionLimits {
    fn default() -> Self {
        Self {
            max_in_flight: 65_536,
            max_wait: Duration::from_secs(2),
        }
    }
}

/// The node's admission state (one per chat role).
pub struct SendAdmission {
    limits: AdmissionLimits,
    metrics: Arc<Metrics>,
    /// Moving average of the commit wait of answered sends, in microseconds.
    wait_us: AtomicU64,
}

/// A send's place among the sends in flight, given back when dropped.
pub struct Admitted {
    admission: Arc<SendAdmission>,
    started: Instant,
}

impl SendAdmission {
    pub fn new(limits: AdmissionLimits, metrics: Arc<Metrics>) -> Arc<Self> {
        Arc::new(Self {
            limits,
            metrics,
            wait_us: AtomicU64::new(0),
        })
    }

    /// Admits a send, or refuses it `unavailable` (module documentation).
    pub fn admit(self: &Arc<Self>) -> Result<Admitted, ApiError> {
        let in_flight = &self.metrics.sends_in_flight;
        let before = in_flight.inc();
        let wait = Duration::from_micros(self.wait_us.load(Ordering::Relaxed));
        // A bound past what the gauge can count (`--max-sends-in-flight` up to u64::MAX) is
        // never reached; cast, it would be negative and refuse every send.
        let full = i64::try_from(self.limits.max_in_flight).is_ok_and(|max| before >= max);
        let slow = before > 0 && wait > self.limits.max_wait;
        if full || slow {
            in_flight.dec();
            self.metrics
                .rate_limited
                .get_or_create(&ScopeLabel { scope: "node" })
                .inc();
            let hint = wait.clamp(Duration::from_millis(100), Duration::from_secs(5));
            let hint_ms = hint.as_millis() as u64;
            let retry_after_ms = hint_ms + rand::random::<u64>() % hint_ms;
            return Err(ApiError::unavailable(
                "the server is at capacity; retry shortly",
                retry_after_ms,
            ));
        }
        Ok(Admitted {
            admission: self.clone(),
            started: Instant::now(),
        })
    }

    /// The moving average of the commit wait.
    pub fn average_wait(&self) -> Duration {
        Duration::from_micros(self.wait_us.load(Ordering::Relaxed))
    }
}

impl Admitted {
    /// Counts the send's wait into the average once it is answered.
    pub fn answered(self) {
        let waited = self.started.elapsed().as_micros() as u64;
        let average = &self.admission.wait_us;
        // Racing updates may lose one sample: harmless for an average.
        let old = average.load(Ordering::Relaxed);
        let new = old - old / AVERAGE_OVER + waited / AVERAGE_OVER;
        average.store(new, Ordering::Relaxed);
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        self.admission.metrics.sends_in_flight.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use courier_proto::ErrorCode;

    fn admission(max_in_flight: usize) -> Arc<SendAdmission> {
        let limits = AdmissionLimits {
            max_in_flight,
            max_wait: Duration::from_millis(500),
        };
        SendAdmission::new(limits, Arc::new(Metrics::new()))
    }

    fn refused(result: Result<Admitted, ApiError>) -> bool {
        match result {
            Ok(_) => false,
            Err(e) => {
                assert_eq!(e.code, ErrorCode::Unavailable);
                assert!(e.retry_after_ms.is_some_and(|ms| ms >= 100));
                true
            }
        }
    }

    #[test]
    fn sends_past_the_in_flight_bound_are_refused_until_one_is_answered() {
        let admission = admission(2);
        let first = admission.admit().unwrap();
        let _second = admission.admit().unwrap();
        assert!(refused(admission.admit()));
        first.answered();
        assert!(!refused(admission.admit()));
    }

    /// A bound too large for the in-flight gauge (an operator's u64::MAX for "no bound") admits
    /// sends: cast to the gauge's i64 it was -1, and every send was refused `unavailable`.
    #[test]
    fn a_bound_larger_than_the_gauge_counts_refuses_nothing() {
        for max in [usize::MAX, i64::MAX as usize + 1] {
            let admission = admission(max);
            let _held: Vec<_> = (0..3).map(|_| admission.admit().unwrap()).collect();
        }
    }

    #[tokio::test(start_paused = true)]
    async fn sends_are_refused_while_commits_wait_too_long_and_while_some_are_in_flight() {
        let admission = admission(1000);
        let slow: Vec<_> = (0..3).map(|_| admission.admit().unwrap()).collect();
        tokio::time::advance(Duration::from_secs(20)).await;
        let mut slow = slow.into_iter();
        // Two answers after 20 s: the average passes 500 ms.
        slow.next().unwrap().answered();
        slow.next().unwrap().answered();
        assert!(admission.average_wait() > Duration::from_millis(500));
        assert!(refused(admission.admit()), "a slow queue admits no more");
        // The last one answered: nothing is in flight, so the stale average refuses nothing.
        slow.next().unwrap().answered();
        let fast = admission.admit().unwrap();
        // Quick answers bring the average back under the bound.
        let others: Vec<_> = (0..200).map(|_| admission.admit()).collect();
        assert!(
            others.iter().all(Result::is_err),
            "refused while fast one waits"
        );
        drop(others);
        fast.answered();
        for _ in 0..200 {
            admission.admit().unwrap().answered();
        }
        assert!(admission.average_wait() < Duration::from_millis(500));
        let _a = admission.admit().unwrap();
        assert!(!refused(admission.admit()));
    }
}
