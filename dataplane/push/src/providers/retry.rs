//! When to try a notification again: exponential backoff with full jitter, never sooner than
//! the provider asked for in `Retry-After`.

use std::time::{Duration, SystemTime};

/// The first retry waits up to this long; each later one up to twice the previous.
pub const BASE_DELAY: Duration = Duration::from_millis(200);
/// No backoff waits longer than this (a provider's `Retry-After` may).
pub const MAX_DELAY: Duration = Duration::from_secs(60);
/// A provider's `Retry-After` is honoured up to this long: a notification held longer is of
/// little use, and one held "forever" would also hold every later message of its conversation.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);

/// The delay before retry `attempt` (1-based; 0 is read as 1): a uniformly random duration up
/// to `min(60 s, 200 ms * 2^(attempt-1))` ("full jitter", so that devices throttled together do
/// not come back together), and never less than the provider's `Retry-After`.
///
/// ```ignore
/// let wait = next_delay(3, None); // somewhere in 0..=800 ms
/// let wait = next_delay(1, Some(Duration::from_secs(30))); // at least 30 s
/// ```
pub fn next_delay(attempt: u32, retry_after: Option<Duration>) -> Duration {
    let jittered = backoff_ceiling(attempt).mul_f64(rand::random::<f64>());
    jittered.max(retry_after.unwrap_or_default())
}

/// The upper bound of the jittered backoff for `attempt`.
pub fn backoff_ceiling(attempt: u32) -> Duration {
    // 2^9 * 200 ms is already past the cap; the shift never overflows.
    let doublings = attempt.saturating_sub(1).min(16);
    BASE_DELAY.saturating_mul(1u32 << doublings).min(MAX_DELAY)
}

/// Reads a `Retry-After` header: delay-seconds, or an HTTP date (a date in the past means now),
/// [`MAX_RETRY_AFTER`] at most.
pub fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    let value = headers
        .get(reqwest::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim();
    let after = match value.parse::<u64>() {
        Ok(seconds) => Duration::from_secs(seconds),
        Err(_) => {
            let at = httpdate::parse_http_date(value).ok()?;
            at.duration_since(SystemTime::now()).unwrap_or_default()
        }
    };
    Some(after.min(MAX_RETRY_AFTER))
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::{HeaderMap, HeaderValue, RETRY_AFTER};

    #[test]
    fn the_ceiling_starts_at_the_base_doubles_and_stops_at_the_cap() {
        assert_eq!(backoff_ceiling(0), BASE_DELAY);
        assert_eq!(backoff_ceiling(1), BASE_DELAY);
        assert_eq!(backoff_ceiling(2), Duration::from_millis(400));
        assert_eq!(backoff_ceiling(3), Duration::from_millis(800));
        assert_eq!(backoff_ceiling(9), Duration::from_millis(51_200));
        assert_eq!(backoff_ceiling(10), MAX_DELAY);
        assert_eq!(backoff_ceiling(u32::MAX), MAX_DELAY);
    }

    #[test]
    fn delays_are_jittered_within_the_ceiling() {
        for attempt in 0..40 {
            let ceiling = backoff_ceiling(attempt);
            let delays: Vec<Duration> = (0..64).map(|_| next_delay(attempt, None)).collect();
            assert!(delays.iter().all(|d| *d <= ceiling), "attempt {attempt}");
            if attempt >= 3 {
                // Full jitter: 64 draws from 0..ceiling are not all the same value.
                assert!(delays.iter().any(|d| *d != delays[0]), "attempt {attempt}");
            }
        }
    }

    #[test]
    fn delays_are_never_shorter_than_retry_after() {
        for attempt in [1, 5, 30] {
            for after in [1, 45, 600] {
                let after = Duration::from_secs(after);
                assert!(next_delay(attempt, Some(after)) >= after);
            }
        }
        assert_eq!(
            next_delay(1, Some(Duration::from_secs(600))),
            Duration::from_secs(600),
            "a Retry-After beyond the cap is honoured as it is"
        );
    }

    #[test]
    fn retry_after_is_read_as_seconds_or_as_a_date() {
        let mut headers = HeaderMap::new();
        assert_eq!(retry_after(&headers), None);
        headers.insert(RETRY_AFTER, HeaderValue::from_static(" 7 "));
        assert_eq!(retry_after(&headers), Some(Duration::from_secs(7)));
        headers.insert(
            RETRY_AFTER,
            HeaderValue::from_static("Wed, 21 Oct 2015 07:28:00 GMT"),
        );
        assert_eq!(retry_after(&headers), Some(Duration::ZERO), "in the past");
        let later = httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(3600));
        headers.insert(RETRY_AFTER, HeaderValue::from_str(&later).unwrap());
        let parsed = retry_after(&headers).unwrap();
        assert!(parsed > Duration::from_secs(3000) && parsed <= Duration::from_secs(3600));
        headers.insert(RETRY_AFTER, HeaderValue::from_static("soon"));
        assert_eq!(retry_after(&headers), None);
        headers.insert(RETRY_AFTER, HeaderValue::from_static("18446744073709551"));
        assert_eq!(
            retry_after(&headers),
            Some(MAX_RETRY_AFTER),
            "an hour at most"
        );
        let next_year =
            httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(3.2e7 as u64));
        headers.insert(RETRY_AFTER, HeaderValue::from_str(&next_year).unwrap());
        assert_eq!(retry_after(&headers), Some(MAX_RETRY_AFTER));
    }
}
