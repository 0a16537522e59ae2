//! What the notifier knows of each push provider from its answers, shared by every
//! notification sent through it.
//!
//! A provider that answers 429 or 5xx (or cannot be reached) is usually in trouble as a
//! whole, not for one device: FCM's `QUOTA_EXCEEDED` throttles the whole project. So one such
//! answer blocks the provider until its `Retry-After` (or, without one, a backoff that doubles
//! with each block in a row: [`backoff_ceiling`]), and the notifications due for it meanwhile
//! are postponed to the block's end without a request, spending none of their attempts.
//! Without it, a pass sent every other due notification into the throttle, each losing one of
//! its [`crate::MAX_ATTEMPTS`].

use crate::providers::{PushError, backoff_ceiling};
use foldhash::HashMap;
use std::sync::Mutex;

/// Per provider (by its name: `fcm`, `apns`, `webhook`), what its answers said.
#[derive(Default)]
pub(crate) struct ProviderGates {
    providers: Mutex<HashMap<String, ProviderState>>,
}

#[derive(Default)]
struct ProviderState {
    /// Nothing is sent to it before this (ms since the epoch).
    blocked_until_ms: u64,
    /// Blocks in a row: answers asking for a retry that came while it was not blocked. Those
    /// that come while it is (the other requests that were in flight) belong to the same
    /// block and do not lengthen the next one. Any other answer ends the series.
    blocks: u32,
}

impl ProviderGates {
    /// When `provider` may be sent to again, if it is blocked at `now` (ms).
    pub(crate) fn blocked_until(&self, provider: &str, now: u64) -> Option<u64> {
        let providers = self.providers.lock().unwrap_or_else(|e| e.into_inner());
        let until = providers.get(provider)?.blocked_until_ms;
        (now < until).then_some(until)
    }

    /// Records `provider`'s `answer` to a request, received at `now` (ms): a retry blocks it.
    pub(crate) fn answered(&self, provider: &str, answer: &Result<(), PushError>, now: u64) {
        let mut providers = self.providers.lock().unwrap_or_else(|e| e.into_inner());
        let state = providers.entry(provider.to_owned()).or_default();
        match answer {
            Err(PushError::Retry { after }) => {
                if now >= state.blocked_until_ms {
                    state.blocks = state.blocks.saturating_add(1);
                }
                let wait = after.unwrap_or_else(|| backoff_ceiling(state.blocks));
                let until = now.saturating_add(wait.as_millis() as u64);
                state.blocked_until_ms = state.blocked_until_ms.max(until);
            }
            _ => state.blocks = 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn retry(after: Option<u64>) -> Result<(), PushError> {
        Err(PushError::Retry {
            after: after.map(Duration::from_secs),
        })
    }

    #[test]
    fn a_retry_blocks_its_provider_until_its_retry_after_and_no_other() {
        let gates = ProviderGates::default();
        assert_eq!(gates.blocked_until("fcm", 1_000), None, "nothing known");
        gates.answered("fcm", &retry(Some(60)), 1_000);
        assert_eq!(gates.blocked_until("fcm", 1_000), Some(61_000));
        assert_eq!(gates.blocked_until("fcm", 60_999), Some(61_000));
        assert_eq!(gates.blocked_until("fcm", 61_000), None, "over");
        assert_eq!(gates.blocked_until("apns", 1_000), None, "another provider");

        // Answers that ask for nothing do not block.
        for answer in [Ok(()), Err(PushError::InvalidToken)] {
            gates.answered("apns", &answer, 1_000);
        }
        gates.answered("apns", &Err(PushError::Rejected("no".into())), 1_000);
        assert_eq!(gates.blocked_until("apns", 1_000), None);
    }

    /// Without `Retry-After` a block lasts the backoff of the blocks in a row; the answers of
    /// the requests that were in flight when it began do not lengthen it, and an answer that
    /// is not a retry starts the series again.
    #[test]
    fn blocks_without_retry_after_double_with_each_block_in_a_row() {
        let gates = ProviderGates::default();
        gates.answered("fcm", &retry(None), 0);
        assert_eq!(gates.blocked_until("fcm", 0), Some(200));
        gates.answered("fcm", &retry(None), 10);
        assert_eq!(gates.blocked_until("fcm", 10), Some(210), "the same block");
        gates.answered("fcm", &retry(None), 300);
        assert_eq!(
            gates.blocked_until("fcm", 300),
            Some(700),
            "the next: 400 ms"
        );
        gates.answered("fcm", &Ok(()), 800);
        gates.answered("fcm", &retry(None), 900);
        assert_eq!(gates.blocked_until("fcm", 900), Some(1_100), "200 ms again");
        gates.answered("fcm", &retry(Some(0)), 2_000);
        assert_eq!(gates.blocked_until("fcm", 2_000), None, "Retry-After: 0");
    }
}
