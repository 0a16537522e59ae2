//! What the notifier knows of each push provider from its answers, shared by every
//! notification sent through it, however many are in flight.
//!
//! - Blocks: a provider that answers 5xx (or cannot be reached) is in trouble as a whole,
//!   not for one device. So one such answer blocks the provider until its `Retry-After` (or,
//!   without one, a backoff that doubles with each block in a row: [`backoff_ceiling`]), and
//!   the notifications due for it meanwhile are postponed to the block's end without a
//!   request, spending none of their attempts. Without it, a pass sent every other due
//!   notification into the trouble, each losing one of its [`crate::MAX_ATTEMPTS`].
//! - Throttles: a 429 is usually about one device token (APNs `TooManyRequests`, FCM's
//!   per-device rate), and blocking the provider for it would hold every user's notifications
//!   up to an hour for one busy phone; but it may be the whole sender's (an FCM project's
//!   quota). So a throttled token's notifications wait for its `Retry-After` (postponed like
//!   a blocked provider's, for [`THROTTLED_TOKENS_KEPT`] tokens at most), the provider is sent one
//!   notification at a time while it throttles, and it is blocked once
//!   [`THROTTLED_TOKENS`] different tokens were throttled with no other answer between.
//! - Probes: the notifier sends many notifications at once (`crate::SENDS_IN_FLIGHT`), which
//!   would all reach a throttled provider before its first answer. So a provider not known to
//!   answer (none yet since the notifier started, or its latest answer asked for a retry, as
//!   when its block ends) is sent one notification alone first; the others due for it wait
//!   for that answer, then are sent together (or postponed, if it blocked the provider). A
//!   provider that does not answer within [`PROBE_WAIT`] is sent the others anyway, so that
//!   one that hangs costs about one request timeout, not one per notification.

use crate::providers::{PushError, backoff_ceiling};
use courier_core::clock::now_ms;
use foldhash::HashMap;
use std::hash::BuildHasher;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Notify;
use tokio::time::Instant;

/// How long the notifications to a provider not known to answer wait for the one sent alone
/// first before they are sent anyway: FCM and APNs answer in about 100 ms, so this leaves
/// room for a throttle's answer, and is short against the request timeout (10 s), which a
/// provider that hangs costs each request.
pub(crate) const PROBE_WAIT: Duration = Duration::from_secs(1);

/// Different device tokens throttled (429) in a row, with no other answer between, that make
/// a throttle the provider's as a whole rather than their devices'.
pub(crate) const THROTTLED_TOKENS: usize = 3;

/// Throttled tokens a provider keeps the end of (past it, a throttled token's next
/// notification is sent and spends an attempt, as before tokens were kept).
pub(crate) const THROTTLED_TOKENS_KEPT: usize = 10_000;

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
    /// Its latest answer asked for no retry: its notifications are sent without a probe.
    answering: bool,
    /// The tokens (hashed) throttled since its last other answer, up to [`THROTTLED_TOKENS`].
    throttled: Vec<u64>,
    /// Tokens (hashed) throttled, and until when (ms since the epoch).
    throttled_until: HashMap<u64, u64>,
    /// The request sent alone to learn whether it answers, and when it was sent; told when it
    /// is answered.
    probe: Option<(Arc<Notify>, Instant)>,
}

/// Whether a notification may be sent to its provider now.
pub(crate) enum Admission<'a> {
    /// Send it, then tell the ticket the answer.
    Send(Ticket<'a>),
    /// The provider is blocked until then (ms since the epoch).
    Postpone(u64),
}

/// A notification admitted to its provider, to be told the answer. Dropped unanswered (its
/// pass stopped), a probe lets the notifications waiting for it go on.
pub(crate) struct Ticket<'a> {
    gates: &'a ProviderGates,
    provider: &'a str,
    token: &'a str,
    probe: bool,
}

impl ProviderGates {
    /// Waits until a notification may be sent to `provider`: at once if it is known to
    /// answer, or if it is the provider's probe; once the probe is answered (or
    /// [`PROBE_WAIT`] after it was sent) otherwise. A blocked provider's notification is
    /// postponed to the block's end.
    pub(crate) async fn admit<'a>(&'a self, provider: &'a str, token: &'a str) -> Admission<'a> {
        let ticket = |probe| {
            Admission::Send(Ticket {
                gates: self,
                provider,
                token,
                probe,
            })
        };
        loop {
            let probe: Arc<Notify>;
            let (answered, waited) = {
                let mut providers = self.providers.lock().unwrap_or_else(|e| e.into_inner());
                let state = providers.entry(provider.to_owned()).or_default();
                let now = now_ms();
                if now < state.blocked_until_ms {
                    return Admission::Postpone(state.blocked_until_ms);
                }
                if let Some(&until) = state.throttled_until.get(&token_hash(token))
                    && now < until
                {
                    return Admission::Postpone(until);
                }
                if state.answering {
                    return ticket(false);
                }
                let Some((sent, since)) = &state.probe else {
                    state.probe = Some((Arc::new(Notify::new()), Instant::now()));
                    return ticket(true);
                };
                let waited = *since + PROBE_WAIT;
                if Instant::now() >= waited {
                    return ticket(false);
                }
                probe = sent.clone();
                // Registered before the lock is let go: the probe's end cannot be missed.
                (probe.notified(), waited)
            };
            let _ = tokio::time::timeout_at(waited, answered).await;
        }
    }

    /// Records `provider`'s `answer` to a request for `token`, received at `now` (ms): trouble
    /// blocks it, a throttle once it was seen for [`THROTTLED_TOKENS`] tokens.
    fn answered(&self, provider: &str, token: &str, answer: &Result<(), PushError>, now: u64) {
        let mut providers = self.providers.lock().unwrap_or_else(|e| e.into_inner());
        let state = providers.entry(provider.to_owned()).or_default();
        match answer {
            Err(PushError::Retry { after }) => state.block(*after, now),
            Err(PushError::Throttled { after }) => {
                let token = token_hash(token);
                let until = now
                    .saturating_add(after.unwrap_or_else(|| backoff_ceiling(1)).as_millis() as u64);
                state.throttled_until.retain(|_, until| *until > now);
                if state.throttled_until.len() < THROTTLED_TOKENS_KEPT {
                    state.throttled_until.insert(token, until);
                }
                if !state.throttled.contains(&token) {
                    state.throttled.push(token);
                }
                if state.throttled.len() >= THROTTLED_TOKENS {
                    state.throttled.clear();
                    state.block(*after, now);
                }
                // One at a time while it throttles, until it answers or is blocked.
                state.answering = false;
            }
            _ => {
                state.blocks = 0;
                state.answering = true;
                state.throttled.clear();
            }
        }
    }
}

/// A token as the gates keep it: its hash, a few bytes however long the token.
fn token_hash(token: &str) -> u64 {
    foldhash::fast::FixedState::default().hash_one(token)
}

impl ProviderState {
    /// Blocks the provider `after` (its `Retry-After`), or the backoff of its blocks in a row.
    fn block(&mut self, after: Option<Duration>, now: u64) {
        if now >= self.blocked_until_ms {
            self.blocks = self.blocks.saturating_add(1);
        }
        let wait = after.unwrap_or_else(|| backoff_ceiling(self.blocks));
        let until = now.saturating_add(wait.as_millis() as u64);
        self.blocked_until_ms = self.blocked_until_ms.max(until);
        self.answering = false;
    }
}

impl Ticket<'_> {
    /// Records the provider's `answer`, received at `now` (ms).
    pub(crate) fn answered(self, answer: &Result<(), PushError>, now: u64) {
        self.gates.answered(self.provider, self.token, answer, now);
    }
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        if !self.probe {
            return;
        }
        let mut providers = self
            .gates
            .providers
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some((probe, _)) = providers
            .get_mut(self.provider)
            .and_then(|s| s.probe.take())
        {
            probe.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::FutureExt;

    fn retry(after: Option<u64>) -> Result<(), PushError> {
        Err(PushError::Retry {
            after: after.map(Duration::from_secs),
        })
    }

    /// When `provider` may be sent to again, if it is blocked at `now` (ms).
    fn blocked_until(gates: &ProviderGates, provider: &str, now: u64) -> Option<u64> {
        let providers = gates.providers.lock().unwrap();
        let until = providers.get(provider)?.blocked_until_ms;
        (now < until).then_some(until)
    }

    #[test]
    fn a_retry_blocks_its_provider_until_its_retry_after_and_no_other() {
        let gates = ProviderGates::default();
        assert_eq!(blocked_until(&gates, "fcm", 1_000), None, "nothing known");
        gates.answered("fcm", "t", &retry(Some(60)), 1_000);
        assert_eq!(blocked_until(&gates, "fcm", 1_000), Some(61_000));
        assert_eq!(blocked_until(&gates, "fcm", 60_999), Some(61_000));
        assert_eq!(blocked_until(&gates, "fcm", 61_000), None, "over");
        assert_eq!(
            blocked_until(&gates, "apns", 1_000),
            None,
            "another provider"
        );

        // Answers that ask for no retry do not block.
        let answers = [
            Ok(()),
            Err(PushError::InvalidToken),
            Err(PushError::Rejected("no".into())),
        ];
        for answer in answers {
            gates.answered("apns", "t", &answer, 1_000);
        }
        assert_eq!(blocked_until(&gates, "apns", 1_000), None);
    }

    /// Without `Retry-After` a block lasts the backoff of the blocks in a row; the answers of
    /// the requests that were in flight when it began do not lengthen it, and an answer that
    /// is not a retry starts the series again.
    #[test]
    fn blocks_without_retry_after_double_with_each_block_in_a_row() {
        let gates = ProviderGates::default();
        gates.answered("fcm", "t", &retry(None), 0);
        assert_eq!(blocked_until(&gates, "fcm", 0), Some(200));
        gates.answered("fcm", "t", &retry(None), 10);
        assert_eq!(
            blocked_until(&gates, "fcm", 10),
            Some(210),
            "the same block"
        );
        gates.answered("fcm", "t", &retry(None), 300);
        assert_eq!(
            blocked_until(&gates, "fcm", 300),
            Some(700),
            "the next: 400 ms"
        );
        gates.answered("fcm", "t", &Ok(()), 800);
        gates.answered("fcm", "t", &retry(None), 900);
        assert_eq!(
            blocked_until(&gates, "fcm", 900),
            Some(1_100),
            "200 ms again"
        );
        gates.answered("fcm", "t", &retry(Some(0)), 2_000);
        assert_eq!(blocked_until(&gates, "fcm", 2_000), None, "Retry-After: 0");
    }

    /// A throttle of one token, or two, is their devices': the provider is not blocked, and
    /// the next answer of another kind ends the series; a third token throttled in a row
    /// blocks it as a whole.
    #[test]
    fn a_throttle_blocks_the_provider_once_seen_for_three_tokens_in_a_row() {
        let gates = ProviderGates::default();
        let throttled = Err(PushError::Throttled {
            after: Some(Duration::from_secs(60)),
        });
        gates.answered("apns", "busy-phone", &throttled, 1_000);
        gates.answered("apns", "busy-phone", &throttled, 1_000);
        gates.answered("apns", "other-phone", &throttled, 1_000);
        assert_eq!(blocked_until(&gates, "apns", 1_000), None, "two devices");
        gates.answered("apns", "quiet-phone", &Ok(()), 1_100);
        gates.answered("apns", "third-phone", &throttled, 1_200);
        assert_eq!(
            blocked_until(&gates, "apns", 1_200),
            None,
            "the series began again"
        );
        gates.answered("apns", "busy-phone", &throttled, 1_300);
        gates.answered("apns", "other-phone", &throttled, 1_400);
        assert_eq!(
            blocked_until(&gates, "apns", 1_400),
            Some(61_400),
            "three tokens in a row"
        );
    }

    /// A throttled token's next notifications wait for its `Retry-After`, without a request;
    /// the other tokens' go.
    #[tokio::test]
    async fn a_throttled_tokens_notifications_wait_for_its_retry_after() {
        let gates = ProviderGates::default();
        gates.answered("apns", "other", &Ok(()), now_ms());
        let throttled = Err(PushError::Throttled {
            after: Some(Duration::from_secs(60)),
        });
        gates.answered("apns", "busy", &throttled, now_ms());
        assert!(matches!(
            gates.admit("apns", "busy").await,
            Admission::Postpone(until) if until > now_ms() + 50_000
        ));
        let Admission::Send(probe) = gates.admit("apns", "other").await else {
            panic!("another token waits too")
        };
        probe.answered(&Ok(()), now_ms());
        assert!(matches!(
            gates.admit("apns", "other").await,
            Admission::Send(_)
        ));
    }

    /// A provider not known to answer gets one notification alone; the others wait for its
    /// answer: a throttle postpones them, an answer lets them all go at once, until the
    /// provider asks for a retry again.
    #[tokio::test]
    async fn a_provider_not_known_to_answer_is_sent_one_notification_first() {
        let gates = ProviderGates::default();
        let Admission::Send(probe) = gates.admit("fcm", "t").await else {
            panic!("blocked")
        };
        let mut waiting = Box::pin(gates.admit("fcm", "t"));
        assert!(
            futures::poll!(&mut waiting).is_pending(),
            "waits for the probe"
        );
        assert!(
            matches!(
                gates.admit("apns", "t").now_or_never(),
                Some(Admission::Send(_))
            ),
            "another provider's probe"
        );
        probe.answered(&retry(Some(60)), now_ms());
        assert!(matches!(waiting.await, Admission::Postpone(_)), "throttled");

        // The block ends: a probe again, and once it is answered, no more.
        gates
            .providers
            .lock()
            .unwrap()
            .get_mut("fcm")
            .unwrap()
            .blocked_until_ms = 0;
        let Admission::Send(probe) = gates.admit("fcm", "t").await else {
            panic!("blocked")
        };
        let mut waiting = Box::pin(gates.admit("fcm", "t"));
        assert!(futures::poll!(&mut waiting).is_pending());
        probe.answered(&Ok(()), now_ms());
        assert!(matches!(waiting.await, Admission::Send(_)));
        for _ in 0..3 {
            let admitted = gates.admit("fcm", "t").now_or_never();
            assert!(matches!(admitted, Some(Admission::Send(_))), "answering");
        }

        // A probe dropped unanswered (its pass stopped) lets the others go on.
        gates.answered("fcm", "t", &retry(Some(0)), now_ms());
        let probe = gates.admit("fcm", "t").await;
        let mut waiting = Box::pin(gates.admit("fcm", "t"));
        assert!(futures::poll!(&mut waiting).is_pending());
        drop(probe);
        assert!(
            matches!(waiting.await, Admission::Send(_)),
            "the next probe"
        );
    }
}
