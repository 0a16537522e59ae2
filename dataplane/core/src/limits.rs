//! Rate limits: token buckets per user (sends/s), per group (sends/s) and per connection
//! (frames/s). A refused request gets `rate_limited` with `retry_after_ms`; nothing already
//! accepted is ever dropped.

use crate::error::ApiError;
use courier_proto::ErrorCode;
use governor::clock::{Clock, DefaultClock, MonotonicClock};
use governor::middleware::NoOpMiddleware;
use governor::state::keyed::DefaultKeyedStateStore;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};
use std::num::NonZeroU32;

/// A rate and its burst; `per_second == 0` disables the limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    pub per_second: u32,
    pub burst: u32,
}

impl Rate {
    fn quota(self) -> Option<Quota> {
        let per_second = NonZeroU32::new(self.per_second)?;
        let burst = NonZeroU32::new(self.burst.max(self.per_second)).unwrap_or(per_second);
        Some(Quota::per_second(per_second).allow_burst(burst))
    }
}

fn limited(scope: &str, wait: std::time::Duration) -> ApiError {
    ApiError {
        code: ErrorCode::RateLimited,
        message: format!("too many {scope}; slow down"),
        retry_after_ms: Some(wait.as_millis().max(1) as u64),
    }
}

/// Buckets keyed by user id or conversation id.
pub struct KeyedLimit {
    limiter: Option<RateLimiter<String, DefaultKeyedStateStore<String>, DefaultClock>>,
    scope: &'static str,
}

impl KeyedLimit {
    pub fn new(rate: Rate, scope: &'static str) -> Self {
        Self {
            limiter: rate.quota().map(RateLimiter::keyed),
            scope,
        }
    }

    pub fn check(&self, key: &str) -> Result<(), ApiError> {
        self.wait(key).map_err(|wait| limited(self.scope, wait))
    }

    /// Takes a token of `key`'s bucket, or says how long until one is there.
    pub fn wait(&self, key: &str) -> Result<(), std::time::Duration> {
        let Some(limiter) = &self.limiter else {
            return Ok(());
        };
        limiter
            .check_key(&key.to_owned())
            .map_err(|not_until| not_until.wait_time_from(limiter.clock().now()))
    }

    /// Forgets buckets that are full again, so memory follows active keys only.
    pub fn forget_idle(&self) {
        if let Some(limiter) = &self.limiter {
            limiter.retain_recent();
            limiter.shrink_to_fit();
        }
    }
}

/// One connection's bucket (a few bytes of state). Its clock is the standard library's, which
/// takes no room: each connection has two buckets, and governor's default clock is 40 bytes
/// (making one also reads the CPU's features, a trap to the hypervisor on a virtual machine).
pub struct ConnectionLimit {
    limiter: Option<
        RateLimiter<NotKeyed, InMemoryState, MonotonicClock, NoOpMiddleware<std::time::Instant>>,
    >,
}

impl ConnectionLimit {
    pub fn new(rate: Rate) -> Self {
        Self {
            limiter: rate
                .quota()
                .map(|quota| RateLimiter::direct_with_clock(quota, MonotonicClock)),
        }
    }

    pub fn check(&self) -> Result<(), ApiError> {
        let Some(limiter) = &self.limiter else {
            return Ok(());
        };
        limiter.check().map_err(|not_until| {
            limited(
                "frames on this connection",
                not_until.wait_time_from(limiter.clock().now()),
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_refuse_past_the_burst_with_a_retry_hint_and_keys_are_independent() {
        let limit = KeyedLimit::new(
            Rate {
                per_second: 1,
                burst: 3,
            },
            "sends",
        );
        for _ in 0..3 {
            limit.check("flooder").unwrap();
        }
        let refused = limit.check("flooder").unwrap_err();
        assert_eq!(refused.code, ErrorCode::RateLimited);
        assert!(refused.retry_after_ms.unwrap() > 0);
        limit
            .check("someone-else")
            .expect("other keys are unaffected");
        let off = KeyedLimit::new(
            Rate {
                per_second: 0,
                burst: 0,
            },
            "sends",
        );
        for _ in 0..1000 {
            off.check("x").unwrap();
        }
    }

    #[test]
    fn a_connections_bucket_refuses_past_its_burst_with_a_retry_hint() {
        let limit = ConnectionLimit::new(Rate {
            per_second: 1,
            burst: 3,
        });
        for _ in 0..3 {
            limit.check().unwrap();
        }
        let refused = limit.check().unwrap_err();
        assert_eq!(refused.code, ErrorCode::RateLimited);
        let wait = refused.retry_after_ms.unwrap();
        assert!((1..=1_000).contains(&wait), "one token a second: {wait} ms");
        let off = ConnectionLimit::new(Rate {
            per_second: 0,
            burst: 0,
        });
        for _ in 0..1000 {
            off.check().unwrap();
        }
    }
}
