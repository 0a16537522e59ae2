//! The contract every [`KvEngine`] passes, written once and run against each engine: the
//! embedded one in this crate's tests, FoundationDB where a cluster file is given.
//!
//! The checks panic with a message naming the broken rule, like any test assertion.

use crate::kv::{Batch, Durability, KvEngine, StoreError, decode_u64};
use async_trait::async_trait;
use std::collections::BTreeMap;
use std::sync::Arc;

/// Opens an engine for the contract, and reopens it as after a crash of its process.
#[async_trait]
pub trait EngineHarness: Send {
    /// The engine under test, empty on first open.
    async fn open(&mut self) -> Arc<dyn KvEngine>;
    /// Drops every handle without a clean shutdown and opens the same data again.
    async fn reopen_after_crash(&mut self, engine: Arc<dyn KvEngine>) -> Arc<dyn KvEngine>;
}

/// Runs every check of the contract.
pub async fn run_all(harness: &mut dyn EngineHarness) {
    let kv = harness.open().await;
    ordered_ranges(kv.as_ref()).await;
    get_many_reads_one_state(kv.as_ref()).await;
    atomic_batches(kv.as_ref()).await;
    a_batch_reads_its_own_writes(kv.as_ref()).await;
    fences(kv.as_ref()).await;
    atomic_max_and_add(&kv).await;
    counters_follow_every_other_write(kv.as_ref()).await;
    versionstamps_follow_commit_order(kv.as_ref()).await;
    a_malformed_batch_fails_alone(kv.as_ref()).await;
    dropping_expired_keys_keeps_every_other(kv.as_ref()).await;
    reopen_keeps_every_commit(harness, kv).await;
}

fn key(prefix: &str, n: u32) -> Vec<u8> {
    let mut k = prefix.as_bytes().to_vec();
    k.extend_from_slice(&n.to_be_bytes());
    k
}

/// Range reads return keys in order, bounded, limited and reversible, like a sorted map.
pub async fn ordered_ranges(kv: &dyn KvEngine) {
    let mut model = BTreeMap::new();
    let mut batch = Batch::new();
    // A scrambled insertion order (multiplication by an odd constant is a permutation).
    for i in 0..200u32 {
        let n = i.wrapping_mul(2_654_435_761) % 1000;
        model.insert(key("r/", n), n.to_le_bytes().to_vec());
        batch.set(key("r/", n), n.to_le_bytes().to_vec());
    }
    batch.set(b"r0".to_vec(), b"outside".to_vec());
    kv.commit(batch).await.expect("commit of 201 keys");

    let (begin, end) = (key("r/", 100), key("r/", 700));
    let expected: Vec<_> = model
        .range(begin.clone()..end.clone())
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let all = kv
        .range(begin.clone()..end.clone(), usize::MAX, false)
        .await
        .unwrap();
    assert_eq!(all, expected, "forward range must equal the sorted model");
    let first = kv
        .range(begin.clone()..end.clone(), 5, false)
        .await
        .unwrap();
    assert_eq!(first, expected[..5], "a limit keeps the first keys");
    let last = kv.range(begin..end, 5, true).await.unwrap();
    let mut tail: Vec<_> = expected[expected.len() - 5..].to_vec();
    tail.reverse();
    assert_eq!(last, tail, "a reverse range starts from the end");
    assert_eq!(kv.get(&key("r/", 1001)).await.unwrap(), None);

    // Several ranges in one read: each answered as `range` would, in the order asked.
    let asked = [
        key("r/", 0)..key("r/", 300),
        key("r/", 990)..key("r/", 995),
        key("r/", 300)..key("r/", 310),
        b"r0".to_vec()..b"r1".to_vec(),
    ];
    let answers = kv.ranges(asked.to_vec(), 3).await.unwrap();
    assert_eq!(answers.len(), asked.len(), "one answer per range asked");
    for (range, answer) in asked.into_iter().zip(answers) {
        let expected = kv.range(range.clone(), 3, false).await.unwrap();
        assert_eq!(
            answer, expected,
            "ranges must answer {range:?} as range does"
        );
    }
    assert!(kv.ranges(Vec::new(), 3).await.unwrap().is_empty());

    // Several keys in one read, present or not, answered in the order asked.
    let (first, last) = (model.keys().next().unwrap(), model.keys().last().unwrap());
    let keys = vec![
        last.clone(),
        b"r/absent".to_vec(),
        first.clone(),
        last.clone(),
    ];
    let values = kv.get_many(keys.clone()).await.unwrap();
    assert_eq!(values.len(), keys.len(), "one value per key asked");
    assert!(values[0].is_some() && values[1].is_none());
    for (key, value) in keys.iter().zip(values) {
        assert_eq!(
            value,
            kv.get(key).await.unwrap(),
            "get_many must answer as get"
        );
    }
    assert!(kv.get_many(Vec::new()).await.unwrap().is_empty());
}

/// A batch is applied whole or not at all.
pub async fn atomic_batches(kv: &dyn KvEngine) {
    let mut setup = Batch::new();
    setup.set(b"a/fence".to_vec(), b"1".to_vec());
    setup.set(b"a/x".to_vec(), b"old".to_vec());
    kv.commit(setup).await.unwrap();

    let mut doomed = Batch::new();
    doomed
        .fence(b"a/fence".to_vec(), Some(b"2".to_vec()))
        .set(b"a/x".to_vec(), b"new".to_vec())
        .set(b"a/y".to_vec(), b"new".to_vec())
        .clear_range(b"a/".to_vec()..b"a0".to_vec());
    assert!(matches!(
        kv.commit(doomed).await,
        Err(StoreError::FenceChanged { .. })
    ));
    assert_eq!(kv.get(b"a/x").await.unwrap().as_deref(), Some(&b"old"[..]));
    assert_eq!(
        kv.get(b"a/y").await.unwrap(),
        None,
        "no part of a refused batch lands"
    );

    let mut both = Batch::new();
    both.clear(b"a/x".to_vec())
        .set(b"a/y".to_vec(), b"y".to_vec());
    kv.commit(both).await.unwrap();
    assert_eq!(kv.get(b"a/x").await.unwrap(), None);
    assert_eq!(kv.get(b"a/y").await.unwrap().as_deref(), Some(&b"y"[..]));

    let mut clear = Batch::new();
    clear.clear_range(b"a/".to_vec()..b"a0".to_vec());
    kv.commit(clear).await.unwrap();
    assert!(
        kv.range(b"a/".to_vec()..b"a0".to_vec(), 10, false)
            .await
            .unwrap()
            .is_empty()
    );
}

/// A batch's writes see its earlier ones: a range clear takes the keys it set, a counter
/// starts from the value it set, a key set after a clear stands, a key's last write wins.
pub async fn a_batch_reads_its_own_writes(kv: &dyn KvEngine) {
    let mut setup = Batch::new();
    setup.set(b"o/old".to_vec(), b"x".to_vec());
    kv.commit(setup).await.unwrap();

    let mut batch = Batch::new();
    batch
        .set(b"o/new".to_vec(), b"y".to_vec())
        .clear_range(b"o/".to_vec()..b"o0".to_vec())
        .set(b"o/after".to_vec(), b"first".to_vec())
        .set(b"o/after".to_vec(), b"z".to_vec())
        .set(b"o/counter".to_vec(), 5u64.to_le_bytes().to_vec())
        .add(b"o/counter".to_vec(), 2)
        .set(b"o/gone".to_vec(), b"w".to_vec())
        .clear(b"o/gone".to_vec());
    kv.commit(batch).await.unwrap();
    let left = kv
        .range(b"o/".to_vec()..b"o0".to_vec(), 10, false)
        .await
        .unwrap();
    assert_eq!(
        left,
        vec![
            (b"o/after".to_vec(), b"z".to_vec()),
            (b"o/counter".to_vec(), 7u64.to_le_bytes().to_vec()),
        ]
    );
}

/// Dropping a range of expired keys removes none outside it and changes none inside it: each
/// key of the range is either gone or as it was, and what is left is cleared as usual.
pub async fn dropping_expired_keys_keeps_every_other(kv: &dyn KvEngine) {
    let mut batch = Batch::new();
    for n in 0..100u32 {
        batch.set(key("x/", n), n.to_le_bytes().to_vec());
    }
    batch.set(b"x.".to_vec(), b"below".to_vec());
    batch.set(b"x0".to_vec(), b"above".to_vec());
    kv.commit(batch).await.unwrap();
    let everything = b"x.".to_vec()..b"x1".to_vec();
    let before = kv
        .range(everything.clone(), usize::MAX, false)
        .await
        .unwrap();

    let expired = key("x/", 10)..key("x/", 50);
    kv.drop_expired(expired.clone()).await.unwrap();
    let after = kv
        .range(everything.clone(), usize::MAX, false)
        .await
        .unwrap();
    let (inside, outside): (Vec<_>, Vec<_>) =
        before.into_iter().partition(|(k, _)| expired.contains(k));
    let (left, kept): (Vec<_>, Vec<_>) = after.into_iter().partition(|(k, _)| expired.contains(k));
    assert_eq!(
        kept, outside,
        "a key outside the dropped range changed or went"
    );
    assert!(
        left.iter().all(|pair| inside.contains(pair)),
        "a key inside the dropped range changed"
    );

    let mut rest = Batch::new();
    for (key, _) in left {
        rest.clear(key);
    }
    if !rest.is_empty() {
        kv.commit(rest).await.unwrap();
    }
    assert!(kv.range(expired, 1, false).await.unwrap().is_empty());
    assert_eq!(
        kv.range(everything, usize::MAX, false).await.unwrap(),
        outside
    );
}

/// A commit is refused when a fenced key no longer holds the expected value (shard epochs).
pub async fn fences(kv: &dyn KvEngine) {
    let epoch = b"f/epoch".to_vec();
    let mut take = Batch::new();
    take.fence(epoch.clone(), None)
        .set(epoch.clone(), 1u64.to_le_bytes().to_vec());
    kv.commit(take)
        .await
        .expect("absent fence holds on an absent key");

    let mut again = Batch::new();
    again
        .fence(epoch.clone(), None)
        .set(b"f/w".to_vec(), b"x".to_vec());
    assert!(matches!(
        kv.commit(again).await,
        Err(StoreError::FenceChanged { .. })
    ));

    let mut bump = Batch::new();
    bump.fence(epoch.clone(), Some(1u64.to_le_bytes().to_vec()))
        .set(epoch.clone(), 2u64.to_le_bytes().to_vec());
    kv.commit(bump).await.unwrap();

    let mut deposed = Batch::new();
    deposed
        .fence(epoch, Some(1u64.to_le_bytes().to_vec()))
        .set(b"f/w".to_vec(), b"stale".to_vec());
    assert!(
        matches!(
            kv.commit(deposed).await,
            Err(StoreError::FenceChanged { .. })
        ),
        "a deposed owner's commit must be refused"
    );
    assert_eq!(kv.get(b"f/w").await.unwrap(), None);
}

/// `MAX` and `ADD` are atomic under concurrency: no update is lost.
pub async fn atomic_max_and_add(kv: &Arc<dyn KvEngine>) {
    let mut tasks = Vec::new();
    for t in 0..8u64 {
        let kv = kv.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..25u64 {
                let mut batch = Batch::new();
                batch
                    .max(b"m/max".to_vec(), (i * 37 + t * 11) % 500)
                    .add(b"m/add".to_vec(), 1);
                kv.commit(batch).await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let expected_max = (0..8u64)
        .flat_map(|t| (0..25u64).map(move |i| (i * 37 + t * 11) % 500))
        .max()
        .unwrap();
    assert_eq!(
        decode_u64(&kv.get(b"m/max").await.unwrap().unwrap()),
        expected_max
    );
    assert_eq!(decode_u64(&kv.get(b"m/add").await.unwrap().unwrap()), 200);

    let mut lower = Batch::new();
    lower.max(b"m/max".to_vec(), 1);
    kv.commit(lower).await.unwrap();
    assert_eq!(
        decode_u64(&kv.get(b"m/max").await.unwrap().unwrap()),
        expected_max,
        "MAX never lowers a value"
    );
}

/// `MAX` and `ADD` start from whatever the key holds, however it was last written: set,
/// cleared, cleared with a range, or not at all by a refused commit.
pub async fn counters_follow_every_other_write(kv: &dyn KvEngine) {
    let counter = b"c/counter".to_vec();
    let value = async || decode_u64(&kv.get(b"c/counter").await.unwrap().unwrap());
    let commit = async |batch: &mut Batch| kv.commit(std::mem::take(batch)).await;
    let mut batch = Batch::new();

    commit(batch.max(counter.clone(), 5)).await.unwrap();
    commit(batch.set(counter.clone(), 2u64.to_le_bytes().to_vec()))
        .await
        .unwrap();
    commit(batch.max(counter.clone(), 4)).await.unwrap();
    assert_eq!(
        value().await,
        4,
        "MAX after a SET starts from the set value"
    );

    commit(batch.clear(counter.clone())).await.unwrap();
    commit(batch.max(counter.clone(), 1)).await.unwrap();
    assert_eq!(value().await, 1, "MAX after a CLEAR starts from nothing");

    commit(batch.max(counter.clone(), 9)).await.unwrap();
    commit(batch.clear_range(b"c/".to_vec()..b"c0".to_vec()))
        .await
        .unwrap();
    commit(batch.add(counter.clone(), 2)).await.unwrap();
    assert_eq!(value().await, 2, "ADD after a range clear starts from 0");

    let refused = commit(
        batch
            .fence(b"c/fence".to_vec(), Some(b"absent".to_vec()))
            .max(counter.clone(), 100),
    )
    .await;
    assert!(matches!(refused, Err(StoreError::FenceChanged { .. })));
    commit(batch.max(counter.clone(), 50)).await.unwrap();
    assert_eq!(value().await, 50, "a refused MAX leaves nothing behind");

    commit(batch.max(counter.clone(), 7).add(counter.clone(), 1))
        .await
        .unwrap();
    assert_eq!(value().await, 51, "a batch sees its own counter writes");
}

fn stamped_key(prefix: &[u8], order: u16) -> Vec<u8> {
    let mut k = prefix.to_vec();
    let offset = k.len() as u32;
    k.extend_from_slice(&[0xff; 10]);
    k.extend_from_slice(&order.to_be_bytes());
    k.extend_from_slice(&offset.to_le_bytes());
    k
}

/// Versionstamps grow with commit order, so versionstamped keys read back in commit order.
pub async fn versionstamps_follow_commit_order(kv: &dyn KvEngine) {
    let mut stamps = Vec::new();
    for i in 0..20u8 {
        let mut batch = Batch::new();
        batch
            .set_versionstamped_key(stamped_key(b"v/", 1), vec![i, 1])
            .set_versionstamped_key(stamped_key(b"v/", 0), vec![i, 0]);
        stamps.push(kv.commit(batch).await.unwrap());
    }
    assert!(
        stamps.windows(2).all(|w| w[0] < w[1]),
        "stamps increase with commits"
    );
    let rows = kv
        .range(b"v/".to_vec()..b"v0".to_vec(), usize::MAX, false)
        .await
        .unwrap();
    let values: Vec<_> = rows.iter().map(|(_, v)| v.clone()).collect();
    let expected: Vec<_> = (0..20u8).flat_map(|i| [vec![i, 0], vec![i, 1]]).collect();
    assert_eq!(
        values, expected,
        "versionstamped keys sort by commit, then by user order"
    );
    assert_eq!(
        &rows[0].0[2..12],
        &stamps[0][..],
        "the key holds the commit's stamp"
    );
}

/// A batch the engine cannot write (here, a versionstamped key that names no valid place for
/// its stamp) is refused by itself: batches committed beside it, in the same group commit of
/// an engine that groups them, are not.
pub async fn a_malformed_batch_fails_alone(kv: &dyn KvEngine) {
    let good = |i: u32| async move {
        let mut batch = Batch::new();
        batch.set(key("m/", i), b"v".to_vec());
        kv.commit(batch).await
    };
    let bad = async {
        let mut batch = Batch::new();
        batch.set_versionstamped_key(b"m/x".to_vec(), b"v".to_vec());
        kv.commit(batch).await
    };
    let (before, bad, after) = tokio::join!(
        futures::future::join_all((0..50).map(good)),
        bad,
        futures::future::join_all((50..100).map(good)),
    );
    assert!(
        matches!(bad, Err(StoreError::TooLarge(_))),
        "a malformed batch is refused as such: {bad:?}"
    );
    let failed: Vec<_> = before.iter().chain(&after).filter(|r| r.is_err()).collect();
    assert!(
        failed.is_empty(),
        "{} well-formed batches failed with another's: {:?}",
        failed.len(),
        failed.first()
    );
    let written = kv
        .range(key("m/", 0)..key("m/", 100), usize::MAX, false)
        .await
        .unwrap();
    assert_eq!(written.len(), 100, "every well-formed batch was written");
}

/// `get_many` reads every key from one committed state: keys written together, read together
/// while commits land, always hold values of the same commit.
pub async fn get_many_reads_one_state(kv: &dyn KvEngine) {
    const COMMITS: u32 = 400;
    let keys = vec![key("one/", 0), key("one/", 1), key("one/", 2)];
    let written = std::sync::atomic::AtomicBool::new(false);
    let writes = async {
        for i in 0..COMMITS {
            let mut batch = Batch::new();
            batch.durability = Durability::Deferred;
            for key in &keys {
                batch.set(key.clone(), i.to_le_bytes().to_vec());
            }
            kv.commit(batch).await.expect("a commit of three keys");
        }
        written.store(true, std::sync::atomic::Ordering::Relaxed);
    };
    let reads = async {
        let mut torn = Vec::new();
        while !written.load(std::sync::atomic::Ordering::Relaxed) {
            let values = kv
                .get_many(keys.clone())
                .await
                .expect("a read of three keys");
            if values.iter().any(|v| *v != values[0]) {
                torn.push(values);
            }
            tokio::task::yield_now().await;
        }
        torn
    };
    let ((), torn) = tokio::join!(writes, reads);
    assert!(
        torn.is_empty(),
        "{} reads of keys written together saw two states, e.g. {:?}",
        torn.len(),
        torn.first()
    );
}

/// Everything committed survives a crash; stamps keep growing after it.
pub async fn reopen_keeps_every_commit(harness: &mut dyn EngineHarness, kv: Arc<dyn KvEngine>) {
    let mut batch = Batch::new();
    for i in 0..100u32 {
        batch.set(key("c/", i), vec![7; 100]);
    }
    let before = kv.commit(batch).await.unwrap();
    let kv = harness.reopen_after_crash(kv).await;
    let rows = kv
        .range(key("c/", 0)..key("c/", 100), usize::MAX, false)
        .await
        .unwrap();
    assert_eq!(rows.len(), 100, "every committed key is back after a crash");
    assert_eq!(decode_u64(&kv.get(b"m/add").await.unwrap().unwrap()), 200);
    let mut probe = Batch::new();
    probe.set(b"c/probe".to_vec(), Vec::new());
    let after = kv.commit(probe).await.unwrap();
    assert!(
        after > before,
        "stamps after a restart are above those before it"
    );
}
