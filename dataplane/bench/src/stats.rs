//! Latency histograms (HdrHistogram, microseconds) and the run's time base.

use hdrhistogram::Histogram;
use std::collections::BTreeMap;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Highest latency recorded exactly: one hour; longer values are clamped.
const MAX_MICROS: u64 = 3_600_000_000;

static EPOCH: OnceLock<Instant> = OnceLock::new();

/// The process's time base: message bodies carry their intended send time as nanoseconds since
/// it, so the receiving task (same process) measures delivery latency without shared maps.
pub fn epoch() -> Instant {
    *EPOCH.get_or_init(Instant::now)
}

/// `instant` as nanoseconds since [`epoch`]; an instant before the epoch counts as the epoch.
pub fn to_offset(instant: Instant) -> u64 {
    instant.saturating_duration_since(epoch()).as_nanos() as u64
}

/// The instant `offset` nanoseconds after [`epoch`].
pub fn from_offset(offset: u64) -> Instant {
    epoch() + Duration::from_nanos(offset)
}

/// A latency histogram in microseconds.
#[derive(Clone)]
pub struct Latency(Histogram<u64>);

impl Default for Latency {
    fn default() -> Self {
        Self::new()
    }
}

impl Latency {
    pub fn new() -> Self {
        let histogram = Histogram::new_with_bounds(1, MAX_MICROS, 3)
            .expect("1 us..1 h at 3 significant figures is a valid histogram");
        Latency(histogram)
    }

    /// Records the time from `since` to `now`.
    pub fn record_since(&mut self, since: Instant, now: Instant) {
        self.record(now.saturating_duration_since(since));
    }

    pub fn record(&mut self, latency: Duration) {
        let micros = (latency.as_micros() as u64).clamp(1, MAX_MICROS);
        self.0.saturating_record(micros);
    }

    pub fn merge(&mut self, other: &Latency) {
        // Same bounds on both sides: adding cannot fail.
        let _ = self.0.add(&other.0);
    }

    pub fn count(&self) -> u64 {
        self.0.len()
    }

    /// Summary in milliseconds.
    pub fn summary(&self) -> super::report::LatencySummary {
        let ms = |micros: u64| micros as f64 / 1000.0;
        let h = &self.0;
        let mut distribution = BTreeMap::new();
        if !h.is_empty() {
            for q in [
                0.0, 10.0, 25.0, 50.0, 75.0, 90.0, 95.0, 99.0, 99.5, 99.9, 99.99, 100.0,
            ] {
                distribution.insert(format!("{q}"), ms(h.value_at_percentile(q)));
            }
        }
        super::report::LatencySummary {
            count: h.len(),
            min_ms: ms(h.min()),
            mean_ms: h.mean() / 1000.0,
            p50_ms: ms(h.value_at_quantile(0.5)),
            p99_ms: ms(h.value_at_quantile(0.99)),
            p999_ms: ms(h.value_at_quantile(0.999)),
            max_ms: ms(h.max()),
            percentiles_ms: distribution,
        }
    }
}

/// Error frames (or connection failures) counted by code.
#[derive(Debug, Default, Clone)]
pub struct ErrorCounts(pub BTreeMap<String, u64>);

impl ErrorCounts {
    pub fn add(&mut self, code: &str) {
        *self.0.entry(code.to_owned()).or_default() += 1;
    }

    pub fn merge(&mut self, other: &ErrorCounts) {
        for (code, n) in &other.0 {
            *self.0.entry(code.clone()).or_default() += n;
        }
    }

    pub fn total(&self) -> u64 {
        self.0.values().sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_in_milliseconds() {
        let mut h = Latency::new();
        for ms in 1..=100 {
            h.record(Duration::from_millis(ms));
        }
        let s = h.summary();
        assert_eq!(s.count, 100);
        assert!((s.p50_ms - 50.0).abs() < 0.1, "{}", s.p50_ms);
        assert!((s.max_ms - 100.0).abs() < 0.1, "{}", s.max_ms);
    }

    #[test]
    fn offsets_round_trip() {
        // The epoch is set by its first use, which may be this test's: fix it before taking
        // `now`, or `now` would precede it and clamp to it.
        let epoch = epoch();
        let now = Instant::now();
        let back = from_offset(to_offset(now));
        assert!(back.max(now) - back.min(now) < Duration::from_micros(1));
        assert_eq!(
            from_offset(to_offset(epoch - Duration::from_nanos(1))),
            epoch
        );
    }
}

/// Counters shared by every task of a run, read by the progress bar and by the coordinator
/// that decides when the drain is over.
#[derive(Debug, Default)]
pub struct Live {
    pub attempted: std::sync::atomic::AtomicU64,
    pub acked: std::sync::atomic::AtomicU64,
    pub failed: std::sync::atomic::AtomicU64,
    pub delivered: std::sync::atomic::AtomicU64,
    pub receipted: std::sync::atomic::AtomicU64,
    pub senders_done: std::sync::atomic::AtomicU64,
}

impl Live {
    pub fn get(counter: &std::sync::atomic::AtomicU64) -> u64 {
        counter.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn add(counter: &std::sync::atomic::AtomicU64, n: u64) {
        counter.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
    }
}

/// What the coordinator tells the tasks of a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Senders send.
    Run,
    /// Senders send no new messages; they finish their in-flight ones (and receipts).
    Drain,
    /// Everyone stops now.
    Stop,
}
