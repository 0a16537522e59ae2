//! Idempotency records in buckets that expire whole (`docs/decisions/0009-idempotency-buckets.md`).
//!
//! An append's record (the first outcome of a client's `client_msg_id`, or of a server-made
//! append's key) goes to the bucket of its commit time. Buckets are one window wide, and a
//! bucket is named by the time its records may go: two windows and twice the allowed clock
//! skew after it opened. A retry looks in every bucket that a record written within the
//! window before it (by a clock up to the skew apart) can be in: two, or three near a
//! bucket's edge. So a retry within the window always finds the first outcome, a record is
//! kept between one window and two, and a retention pass clears whole buckets when they go,
//! instead of reading every live record on every pass: the engine drops the tables that hold
//! only expired records (`docs/decisions/0018-expired-buckets-dropped.md`), and the pass
//! clears what is left key by key, visiting each of those records once.
//!
//! A client's record is keyed by its conversation's hash (`Keys::idempotency`). Records of
//! earlier versions are still looked up until a pass finds none left: those in buckets under
//! their conversation's id, which expire with their buckets, and those written before buckets
//! (keyed by conversation first), expired by their time one by one.

use crate::kv::StoreError;
use crate::message_store::{IdempotencyRecord, MessageStore, corrupt};
use prost::Message;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// The idempotency window a store keeps records for unless told otherwise.
pub const DEFAULT_IDEMPOTENCY_WINDOW: Duration = Duration::from_secs(7 * 24 * 3600);

/// The largest clock skew between nodes that buckets allow for (less for windows shorter
/// than eight of it: an eighth of the window).
const MAX_CLOCK_SKEW_MS: u64 = 60_000;

/// How long idempotency records are kept, and the buckets that follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdempotencyWindow {
    window_ms: u64,
    skew_ms: u64,
}

impl IdempotencyWindow {
    /// A window of `window`, in whole milliseconds and at least one.
    pub fn new(window: Duration) -> Self {
        let window_ms = u64::try_from(window.as_millis()).unwrap_or(u64::MAX).max(1);
        Self {
            window_ms,
            skew_ms: (window_ms / 8).min(MAX_CLOCK_SKEW_MS),
        }
    }

    pub fn window(&self) -> Duration {
        Duration::from_millis(self.window_ms)
    }

    /// The bucket of a record written at `ts_ms`: the time its records expire.
    pub fn bucket(&self, ts_ms: u64) -> u64 {
        self.expiry(ts_ms / self.window_ms)
    }

    /// The buckets an append at `ts_ms` looks for an earlier record in, its own
    /// ([`IdempotencyWindow::bucket`]) first: those of every time from a window and the skew
    /// before `ts_ms` to the skew after it.
    pub fn lookups(&self, ts_ms: u64) -> Vec<u64> {
        let own = ts_ms / self.window_ms;
        let first =
            ts_ms.saturating_sub(self.window_ms.saturating_add(self.skew_ms)) / self.window_ms;
        let last = ts_ms.saturating_add(self.skew_ms) / self.window_ms;
        std::iter::once(own)
            .chain((first..=last).filter(|&index| index != own))
            .map(|index| self.expiry(index))
            .collect()
    }

    /// When the records of the `index`-th bucket (from the epoch) expire.
    fn expiry(&self, index: u64) -> u64 {
        index
            .saturating_add(2)
            .saturating_mul(self.window_ms)
            .saturating_add(self.skew_ms.saturating_mul(2))
    }
}

impl Default for IdempotencyWindow {
    fn default() -> Self {
        Self::new(DEFAULT_IDEMPOTENCY_WINDOW)
    }
}

/// The layouts of earlier versions' idempotency records a store may still hold: appends look in
/// each too until a retention pass finds none of it left. Both are set until the store's first
/// look.
#[derive(Debug)]
pub(crate) struct EarlierIdempotency {
    /// Records of client sends in buckets under their conversation's id instead of its hash.
    pub(crate) named: AtomicBool,
    /// Records written before buckets.
    pub(crate) before_buckets: AtomicBool,
}

impl Default for EarlierIdempotency {
    fn default() -> Self {
        Self {
            named: AtomicBool::new(true),
            before_buckets: AtomicBool::new(true),
        }
    }
}

impl MessageStore {
    /// Clears the idempotency records whose time has come at `now_ms`: those of the buckets
    /// that expired, then those written before buckets more than a window before `now_ms`.
    /// The engine first drops what it can of the expired buckets without reading them
    /// ([`crate::kv::KvEngine::drop_expired`]); returns how many records were then cleared key
    /// by key. A retry whose record is gone is sequenced as a new event.
    pub async fn expire_idempotency_records(&self, now_ms: u64) -> Result<u64, StoreError> {
        let mut cleared = 0;
        for buckets in self.keys().expired_idempotency_buckets(now_ms) {
            if self.holds_any(buckets.clone()).await? {
                self.kv().drop_expired(buckets.clone()).await?;
                cleared += self.clear_where(buckets, |_, _| true).await?;
            }
        }
        let earlier = &self.earlier_idempotency;
        if earlier.before_buckets.load(Ordering::Relaxed) {
            let cutoff = now_ms.saturating_sub(self.idempotency.window_ms);
            let expired = |key: &[u8], value: &[u8]| match IdempotencyRecord::decode(value) {
                Ok(record) => record.ts_ms <= cutoff,
                Err(e) => {
                    tracing::error!(error = %corrupt(key, e), "idempotency record kept");
                    false
                }
            };
            for records in self.keys().legacy_idempotency_records() {
                cleared += self.clear_where(records, expired).await?;
            }
        }
        self.recheck_earlier_idempotency().await?;
        Ok(cleared)
    }

    /// Which layouts of earlier versions' records remain, read again where some may: appends
    /// stop looking in one once none of it is left (a store never writes them again).
    pub async fn recheck_earlier_idempotency(&self) -> Result<(), StoreError> {
        let keys = self.keys();
        let earlier = &self.earlier_idempotency;
        if earlier.before_buckets.load(Ordering::Relaxed) {
            let mut left = false;
            for records in keys.legacy_idempotency_records() {
                left |= self.holds_any(records).await?;
            }
            earlier.before_buckets.store(left, Ordering::Relaxed);
        }
        if earlier.named.load(Ordering::Relaxed) {
            let left = self.holds_any(keys.named_idempotency_records()).await?;
            earlier.named.store(left, Ordering::Relaxed);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::Batch;
    use crate::message_store::{AppendOutcome, CLEAR_PAGE, HeadCache, ShardLease};
    use crate::testing::{direct_message, owner, temp_store};
    use proptest::prelude::*;
    use std::time::SystemTime;

    const WEEK_MS: u64 = 7 * 24 * 3600 * 1000;
    /// Times from the epoch to year ~2500.
    const LATEST_MS: u64 = 1 << 44;

    fn window(ms: u64) -> IdempotencyWindow {
        IdempotencyWindow::new(Duration::from_millis(ms))
    }

    #[test]
    fn the_skew_allowed_is_a_minute_or_an_eighth_of_a_shorter_window() {
        assert_eq!(IdempotencyWindow::default().window_ms, WEEK_MS);
        assert_eq!(IdempotencyWindow::default().skew_ms, 60_000);
        assert_eq!(window(80_000).skew_ms, 10_000);
        assert_eq!(window(1).skew_ms, 0);
        assert_eq!(
            window(0).window(),
            Duration::from_millis(1),
            "at least 1 ms"
        );
    }

    #[test]
    fn a_week_looks_in_two_buckets_and_three_near_an_edge() {
        let week = IdempotencyWindow::default();
        let mid = 100 * WEEK_MS + WEEK_MS / 2;
        assert_eq!(week.lookups(mid).len(), 2);
        assert_eq!(week.lookups(101 * WEEK_MS - 1).len(), 3);
        assert_eq!(week.lookups(100 * WEEK_MS).len(), 3);
        assert_eq!(
            week.lookups(mid),
            [week.bucket(mid), week.bucket(mid - WEEK_MS)]
        );
    }

    proptest! {
        /// A retry finds its record when the two were made within the window of each other,
        /// by clocks up to the skew apart.
        #[test]
        fn a_retry_within_the_window_looks_in_the_records_bucket(
            window_ms in 1u64..=2 * WEEK_MS,
            retry_ms in 0u64..LATEST_MS,
            back in 0u64..=1_000_000,
            forward in any::<bool>(),
        ) {
            let w = window(window_ms);
            let span = if forward { w.skew_ms } else { w.window_ms + w.skew_ms };
            let offset = back % (span + 1);
            let written_ms = if forward { retry_ms + offset } else { retry_ms.saturating_sub(offset) };
            let lookups = w.lookups(retry_ms);
            prop_assert!(lookups.contains(&w.bucket(written_ms)));
            prop_assert!(lookups.len() <= 3);
            prop_assert_eq!(lookups[0], w.bucket(retry_ms), "its own bucket first");
        }

        /// A record lives more than the window and twice the skew (so a pass by a clock ahead
        /// by the skew never clears one a retry by a clock behind by it still needs), and at
        /// most two windows and twice the skew.
        #[test]
        fn a_record_lives_between_one_and_two_windows(
            window_ms in 1u64..=2 * WEEK_MS,
            written_ms in 0u64..LATEST_MS,
        ) {
            let w = window(window_ms);
            let life = w.bucket(written_ms) - written_ms;
            prop_assert!(life > w.window_ms + 2 * w.skew_ms);
            prop_assert!(life <= 2 * w.window_ms + 2 * w.skew_ms);
        }

        /// Later records go to the same bucket or a later one.
        #[test]
        fn buckets_follow_time(
            window_ms in 1u64..=2 * WEEK_MS,
            a in 0u64..LATEST_MS,
            b in 0u64..LATEST_MS,
        ) {
            let w = window(window_ms);
            if a <= b {
                prop_assert!(w.bucket(a) <= w.bucket(b));
            }
        }
    }

    fn now_ms() -> u64 {
        let since_epoch = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap();
        since_epoch.as_millis() as u64
    }

    async fn send(store: &MessageStore, lease: ShardLease, id: &str) -> AppendOutcome {
        let mut heads = HeadCache::default();
        let results = store.append(lease, &mut heads, &[direct_message(id)]).await;
        results.unwrap().remove(0).unwrap()
    }

    /// Looks for earlier layouts' records as the store's open does (records planted since the
    /// store opened were not there then).
    async fn look_again(store: &MessageStore) {
        let earlier = &store.earlier_idempotency;
        earlier.named.store(true, Ordering::Relaxed);
        earlier.before_buckets.store(true, Ordering::Relaxed);
        store.recheck_earlier_idempotency().await.unwrap();
    }

    async fn put(store: &MessageStore, key: Vec<u8>, record: IdempotencyRecord) {
        let mut batch = Batch::new();
        batch.set(key, record.encode_to_vec());
        store.kv().commit(batch).await.unwrap();
    }

    /// A record as versions before compact server ids wrote it: the id as text.
    fn record(seq: u64, ts_ms: u64) -> IdempotencyRecord {
        IdempotencyRecord {
            seq,
            server_msg_id: format!("s-{seq}"),
            ts_ms,
            server_msg_random: 0,
        }
    }

    /// A retry is answered from its record until the record's bucket expires; from then on
    /// the same id makes a new message.
    #[tokio::test]
    async fn records_expire_with_their_bucket() {
        let dir = tempfile::tempdir().unwrap();
        let store = temp_store(&dir, 8).await;
        let lease = owner(&store, "d:1").await;
        let sent = send(&store, lease, "a").await;
        let bucket = store.idempotency.bucket(sent.ts_ms);
        assert!(bucket > sent.ts_ms + store.idempotency.window_ms);
        let kept = store.expire_idempotency_records(bucket - 1).await.unwrap();
        assert_eq!(kept, 0, "the bucket has not expired: kept");
        let retry = send(&store, lease, "a").await;
        assert_eq!((retry.seq, retry.duplicate), (1, true));
        assert_eq!(retry.server_msg_id, sent.server_msg_id);
        let key = store
            .keys()
            .idempotency(&[bucket], "d:1", "alice", "p", "a");
        let stored = store.kv().get(&key[0]).await.unwrap().unwrap();
        let record = IdempotencyRecord::decode(stored.as_slice()).unwrap();
        assert_eq!(
            (record.server_msg_id.as_str(), record.server_msg_id()),
            ("", sent.server_msg_id),
            "the id kept as its two numbers, under the conversation's hash"
        );
        assert_eq!(store.expire_idempotency_records(bucket).await.unwrap(), 1);
        let late = send(&store, lease, "a").await;
        assert_eq!(
            (late.seq, late.duplicate),
            (2, false),
            "a retry after the bucket expired is a new message"
        );
    }

    /// A pass clears every record of the buckets that expired, page after page, and none of
    /// a bucket that has not.
    #[tokio::test]
    async fn a_pass_clears_expired_buckets_page_after_page() {
        let dir = tempfile::tempdir().unwrap();
        let store = temp_store(&dir, 8).await;
        let keys = store.keys();
        let mut batch = Batch::new();
        for i in 0..2 * CLEAR_PAGE + 10 {
            let bucket = [1_000 + (i % 3) as u64];
            let conv = format!("d:{i}");
            let key = if i % 2 == 0 {
                keys.idempotency(&bucket, &conv, "u", "p", "c").concat()
            } else {
                keys.named_idempotency(&bucket, &conv, "u", "p", "c")
                    .concat()
            };
            batch.set(key, record(1, 1).encode_to_vec());
        }
        let kept = keys.server_idempotency(&[5_000], "d:0", "k").concat();
        batch.set(kept.clone(), record(1, 1).encode_to_vec());
        store.kv().commit(batch).await.unwrap();

        let cleared = store.expire_idempotency_records(4_999).await.unwrap();
        assert_eq!(cleared, 2 * CLEAR_PAGE as u64 + 10);
        let [sends, named, server] = keys.expired_idempotency_buckets(u64::MAX);
        assert!(store.kv().range(sends, 1, false).await.unwrap().is_empty());
        assert!(store.kv().range(named, 1, false).await.unwrap().is_empty());
        let left = store.kv().range(server, 10, false).await.unwrap();
        assert_eq!(left.len(), 1, "the bucket that expires at 5,000 is kept");
        assert_eq!(left[0].0, kept);
    }

    /// A retry looks in every bucket its window reaches, the oldest too.
    #[tokio::test]
    async fn a_retry_finds_a_record_in_the_oldest_bucket_it_looks_in() {
        let dir = tempfile::tempdir().unwrap();
        let store = temp_store(&dir, 8).await;
        let lease = owner(&store, "d:1").await;
        let now = now_ms();
        let oldest = *store.idempotency.lookups(now).iter().min().unwrap();
        assert!(oldest < store.idempotency.bucket(now));
        let key = store
            .keys()
            .idempotency(&[oldest], "d:1", "alice", "p", "x");
        put(&store, key.concat(), record(7, now - 1)).await;
        let retry = send(&store, lease, "x").await;
        assert_eq!(
            (retry.seq, retry.server_msg_id.as_str(), retry.duplicate),
            (7, "s-7", true)
        );
    }

    /// Records of the version before the hash, in buckets under their conversation's id, are
    /// looked up while any is left, and expire with their bucket; then appends stop looking.
    #[tokio::test]
    async fn records_under_the_conversations_id_are_found_until_their_bucket_expires() {
        let dir = tempfile::tempdir().unwrap();
        let store = temp_store(&dir, 8).await;
        let named = &store.earlier_idempotency.named;
        assert!(!named.load(Ordering::Relaxed), "none at first");
        let lease = owner(&store, "d:1").await;
        let now = now_ms();
        let bucket = store.idempotency.bucket(now);
        let keys = store.keys();
        let key = keys.named_idempotency(&[bucket], "d:1", "alice", "p", "old");
        put(&store, key.concat(), record(4, now)).await;
        look_again(&store).await;
        assert!(named.load(Ordering::Relaxed));
        let retry = send(&store, lease, "old").await;
        assert_eq!(
            (retry.seq, retry.server_msg_id.as_str(), retry.duplicate),
            (4, "s-4", true)
        );
        let new = send(&store, lease, "new").await;
        assert_eq!((new.seq, new.duplicate), (1, false));

        let kept = store.expire_idempotency_records(bucket - 1).await.unwrap();
        assert_eq!(kept, 0);
        assert!(
            named.load(Ordering::Relaxed),
            "kept until the bucket expires"
        );
        let cleared = store.expire_idempotency_records(bucket).await.unwrap();
        assert_eq!(
            cleared, 2,
            "the record under the conversation's id and the one under its hash"
        );
        assert!(!named.load(Ordering::Relaxed), "none left");
        let late = send(&store, lease, "old").await;
        assert_eq!((late.seq, late.duplicate), (2, false));
    }

    /// Records written before buckets are looked up while any is left, and expire by their
    /// own time.
    #[tokio::test]
    async fn records_written_before_buckets_are_found_then_expired_by_their_time() {
        let dir = tempfile::tempdir().unwrap();
        let store = temp_store(&dir, 8).await;
        let before_buckets = &store.earlier_idempotency.before_buckets;
        assert!(!before_buckets.load(Ordering::Relaxed), "none at first");
        let lease = owner(&store, "d:1").await;
        let written = now_ms() - 1_000;
        let keys = store.keys();
        put(
            &store,
            keys.legacy_idempotency("d:1", "alice", "p", "old"),
            record(4, written),
        )
        .await;
        put(
            &store,
            keys.legacy_server_idempotency("d:1", "k"),
            record(5, written),
        )
        .await;
        look_again(&store).await;
        let retry = send(&store, lease, "old").await;
        assert_eq!((retry.seq, retry.duplicate), (4, true));

        let window_ms = store.idempotency.window_ms;
        let young = store
            .expire_idempotency_records(written + window_ms - 1)
            .await
            .unwrap();
        assert_eq!(young, 0, "within the window: kept");
        assert!(before_buckets.load(Ordering::Relaxed));
        let old = store
            .expire_idempotency_records(written + window_ms)
            .await
            .unwrap();
        assert_eq!(old, 2);
        assert!(!before_buckets.load(Ordering::Relaxed), "none left");
        let late = send(&store, lease, "old").await;
        assert_eq!((late.seq, late.duplicate), (1, false));
    }
}
