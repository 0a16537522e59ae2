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

/// Most samples a [`Latency`] keeps as they are before it builds its histogram.
const SAMPLES_MAX: usize = 1024;

/// A latency histogram in microseconds. Its first [`SAMPLES_MAX`] samples are kept as they
/// are, and the HdrHistogram (~190 KB, zeroed, at these bounds) is built only past them: a
/// scenario whose thousands of receivers each record a few latencies (a reconnect storm, a
/// large group) otherwise spent most of its CPU zeroing one histogram per receiver
/// (`docs/benchmarks.md`, "The load generator's share of a storm").
#[derive(Clone, Default)]
pub struct Latency(Recorded);

#[derive(Clone)]
enum Recorded {
    Samples(Vec<u64>),
    Histogram(Box<Histogram<u64>>),
}

impl Default for Recorded {
    fn default() -> Self {
        Recorded::Samples(Vec::new())
    }
}

/// An empty histogram of the bounds every [`Latency`] uses.
fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_MICROS, 3)
        .expect("1 us..1 h at 3 significant figures is a valid histogram")
}

/// A histogram holding `samples`.
fn histogram_of(samples: &[u64]) -> Histogram<u64> {
    let mut histogram = histogram();
    for &micros in samples {
        histogram.saturating_record(micros);
    }
    histogram
}

impl Latency {
    pub fn new() -> Self {
        Self::default()
    }

    /// Records the time from `since` to `now`.
    pub fn record_since(&mut self, since: Instant, now: Instant) {
        self.record(now.saturating_duration_since(since));
    }

    pub fn record(&mut self, latency: Duration) {
        self.record_micros((latency.as_micros() as u64).clamp(1, MAX_MICROS));
    }

    fn record_micros(&mut self, micros: u64) {
        match &mut self.0 {
            Recorded::Samples(samples) if samples.len() < SAMPLES_MAX => samples.push(micros),
            Recorded::Samples(_) => self.histogram_mut().saturating_record(micros),
            Recorded::Histogram(histogram) => histogram.saturating_record(micros),
        }
    }

    /// The histogram, built from the samples kept so far if there is none yet.
    fn histogram_mut(&mut self) -> &mut Histogram<u64> {
        if let Recorded::Samples(samples) = &self.0 {
            self.0 = Recorded::Histogram(Box::new(histogram_of(samples)));
        }
        match &mut self.0 {
            Recorded::Histogram(histogram) => histogram,
            Recorded::Samples(_) => unreachable!("the histogram was just built"),
        }
    }

    pub fn merge(&mut self, other: &Latency) {
        match &other.0 {
            Recorded::Samples(samples) => {
                for &micros in samples {
                    self.record_micros(micros);
                }
            }
            // Same bounds on both sides: adding cannot fail.
            Recorded::Histogram(other) => {
                let _ = self.histogram_mut().add(&**other);
            }
        }
    }

    pub fn count(&self) -> u64 {
        match &self.0 {
            Recorded::Samples(samples) => samples.len() as u64,
            Recorded::Histogram(histogram) => histogram.len(),
        }
    }

    /// Summary in milliseconds.
    pub fn summary(&self) -> super::report::LatencySummary {
        let built;
        let h = match &self.0 {
            Recorded::Samples(samples) => {
                built = histogram_of(samples);
                &built
            }
            Recorded::Histogram(histogram) => &**histogram,
        };
        let ms = |micros: u64| micros as f64 / 1000.0;
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

/// Buckets of a [`Timeline`] second: latencies up to 0.1 ms, 0.2 ms, 0.4 ms... doubling, the
/// last one (~7 min) holding everything longer. The same bounds as the server's histograms
/// on `/metrics`, so a second here can be set beside a scrape.
const SECOND_BUCKETS: usize = 23;
const FIRST_BOUND_MICROS: u64 = 100;

/// Latencies by the second their operation began (since [`epoch`]), each second a histogram
/// of [`SECOND_BUCKETS`] power-of-two buckets (92 bytes): where a run's tail comes from, a
/// second at a time, at a few kilobytes per task for a run of minutes. A whole-run histogram
/// says how slow the slowest operations were; this says when (a store's flush every few
/// seconds, or a slowdown that grows with the run).
#[derive(Debug, Clone, Default)]
pub struct Timeline(Vec<[u32; SECOND_BUCKETS]>);

/// One second of a [`Timeline`], as reported.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Second {
    /// Seconds since the start asked for.
    pub at_secs: u64,
    /// Operations that began in this second.
    pub count: u64,
    /// The upper bound of the bucket holding the second's 99th percentile, in milliseconds.
    pub p99_ms_at_most: f64,
}

impl Timeline {
    /// Records an operation that began at `since` and ended at `now`.
    pub fn record_since(&mut self, since: Instant, now: Instant) {
        let second = since.saturating_duration_since(epoch()).as_secs() as usize;
        let micros = now.saturating_duration_since(since).as_micros() as u64;
        if self.0.len() <= second {
            self.0.resize(second + 1, [0; SECOND_BUCKETS]);
        }
        self.0[second][bucket_of(micros)] += 1;
    }

    pub fn merge(&mut self, other: &Timeline) {
        if self.0.len() < other.0.len() {
            self.0.resize(other.0.len(), [0; SECOND_BUCKETS]);
        }
        for (mine, theirs) in self.0.iter_mut().zip(&other.0) {
            for (m, t) in mine.iter_mut().zip(theirs) {
                *m += t;
            }
        }
    }

    /// Each second from the one `start` falls in that saw an operation, numbered from it.
    pub fn seconds_from(&self, start: Instant) -> Vec<Second> {
        let first = start.saturating_duration_since(epoch()).as_secs() as usize;
        let seconds = self.0.iter().enumerate().skip(first);
        seconds
            .filter_map(|(second, buckets)| {
                let count: u64 = buckets.iter().map(|&n| u64::from(n)).sum();
                if count == 0 {
                    return None;
                }
                // The first bucket whose running total reaches 99 % of the count.
                let mut below = 0;
                let p99 = buckets.iter().position(|&n| {
                    below += u64::from(n);
                    below * 100 >= count * 99
                })?;
                Some(Second {
                    at_secs: (second - first) as u64,
                    count,
                    p99_ms_at_most: bound_micros(p99) as f64 / 1000.0,
                })
            })
            .collect()
    }
}

/// The bucket of a latency: the first whose bound is at least `micros`.
fn bucket_of(micros: u64) -> usize {
    let ratio = micros.div_ceil(FIRST_BOUND_MICROS).max(1);
    (ratio.next_power_of_two().trailing_zeros() as usize).min(SECOND_BUCKETS - 1)
}

fn bound_micros(bucket: usize) -> u64 {
    FIRST_BOUND_MICROS << bucket
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

    /// The same latencies, summarized from kept samples, from a histogram, and merged from
    /// either into the other.
    #[test]
    fn kept_samples_summarize_and_merge_as_the_histogram_does() {
        let record = |latency: &mut Latency, range: std::ops::Range<u64>| {
            for micros in range {
                latency.record(Duration::from_micros(micros * 37 % 100_000 + 1));
            }
        };
        let few = 0..(SAMPLES_MAX as u64 / 2);
        let many = 0..(SAMPLES_MAX as u64 * 3);
        let mut kept = Latency::new();
        record(&mut kept, few.clone());
        assert!(
            matches!(kept.0, Recorded::Samples(_)),
            "a few samples build no histogram"
        );
        let mut built = Latency::new();
        record(&mut built, many.clone());
        assert!(matches!(built.0, Recorded::Histogram(_)));

        let mut direct = histogram();
        for micros in few.chain(many) {
            direct.saturating_record(micros * 37 % 100_000 + 1);
        }
        let expected = Latency(Recorded::Histogram(Box::new(direct))).summary();
        let mut into_kept = kept.clone();
        into_kept.merge(&built);
        let mut into_built = built.clone();
        into_built.merge(&kept);
        for merged in [into_kept, into_built] {
            let summary = merged.summary();
            assert_eq!(summary.count, expected.count);
            assert_eq!(summary.percentiles_ms, expected.percentiles_ms);
            assert_eq!(summary.mean_ms, expected.mean_ms);
        }
    }

    /// Each second's count and 99th percentile bucket, seconds numbered from the start asked
    /// for, empty seconds left out, and a merge that adds.
    #[test]
    fn a_timeline_says_which_second_was_slow() {
        let start = epoch() + Duration::from_secs(2);
        let at = |second: u64, millis: u64| start + Duration::from_millis(second * 1000 + millis);
        let mut first = Timeline::default();
        let mut second = Timeline::default();
        // A second before the start, not reported.
        first.record_since(at(0, 0) - Duration::from_secs(1), at(0, 5));
        for i in 0..99 {
            first.record_since(at(0, i), at(0, i) + Duration::from_micros(150));
        }
        second.record_since(at(0, 500), at(0, 500) + Duration::from_millis(30));
        // Second 3: a hundred operations, two slow ones set its p99.
        for i in 0..98 {
            second.record_since(at(3, i), at(3, i) + Duration::from_micros(90));
        }
        for _ in 0..2 {
            second.record_since(at(3, 100), at(3, 100) + Duration::from_millis(50));
        }
        first.merge(&second);
        assert_eq!(
            first.seconds_from(start),
            [
                Second {
                    at_secs: 0,
                    count: 100,
                    p99_ms_at_most: 0.2
                },
                Second {
                    at_secs: 3,
                    count: 100,
                    p99_ms_at_most: 51.2
                },
            ]
        );
        assert_eq!(bucket_of(0), 0);
        assert_eq!(bucket_of(100), 0);
        assert_eq!(bucket_of(101), 1);
        assert_eq!(bucket_of(u64::MAX / 2), SECOND_BUCKETS - 1);
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
