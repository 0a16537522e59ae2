//! Property test of the engine contract: any sequence of batches (sets, clears, range clears,
//! MAX, ADD, some refused by a fence) leaves the embedded engine equal to a sorted-map model,
//! and range reads (forward, reverse, limited) agree with the model after every batch.

use courier_store::embedded::EmbeddedEngine;
use courier_store::kv::{Batch, KvEngine, StoreError, decode_u64};
use proptest::prelude::*;
use std::collections::BTreeMap;

#[derive(Debug, Clone)]
enum Op {
    Set(u8, u8),
    Clear(u8),
    ClearRange(u8, u8),
    Max(u8, u64),
    Add(u8, i64),
}

fn key(k: u8) -> Vec<u8> {
    vec![b'k', k]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0u8..16, any::<u8>()).prop_map(|(k, v)| Op::Set(k, v)),
        (0u8..16).prop_map(Op::Clear),
        (0u8..16, 0u8..16).prop_map(|(a, b)| Op::ClearRange(a, b)),
        (16u8..20, 0u64..1000).prop_map(|(k, v)| Op::Max(k, v)),
        (20u8..24, -50i64..50).prop_map(|(k, d)| Op::Add(k, d)),
    ]
}

/// Applies `ops` to the model as the engine should.
fn apply(model: &mut BTreeMap<Vec<u8>, Vec<u8>>, ops: &[Op]) {
    for op in ops {
        match *op {
            Op::Set(k, v) => drop(model.insert(key(k), vec![v])),
            Op::Clear(k) => drop(model.remove(&key(k))),
            // An empty or inverted range clears nothing, as in FoundationDB.
            Op::ClearRange(a, b) if a >= b => {}
            Op::ClearRange(a, b) => {
                let doomed: Vec<_> = model
                    .range(key(a)..key(b))
                    .map(|(k, _)| k.clone())
                    .collect();
                for k in doomed {
                    model.remove(&k);
                }
            }
            Op::Max(k, v) => {
                let current = model.get(&key(k)).map(|v| decode_u64(v));
                if current.is_none_or(|c| c < v) {
                    model.insert(key(k), v.to_le_bytes().to_vec());
                }
            }
            Op::Add(k, d) => {
                let current = model.get(&key(k)).map_or(0, |v| decode_u64(v));
                model.insert(
                    key(k),
                    current.wrapping_add(d as u64).to_le_bytes().to_vec(),
                );
            }
        }
    }
}

fn batch(ops: &[Op]) -> Batch {
    let mut batch = Batch::new();
    for op in ops {
        match *op {
            Op::Set(k, v) => batch.set(key(k), vec![v]),
            Op::Clear(k) => batch.clear(key(k)),
            Op::ClearRange(a, b) => batch.clear_range(key(a)..key(b)),
            Op::Max(k, v) => batch.max(key(k), v),
            Op::Add(k, d) => batch.add(key(k), d),
        };
    }
    batch
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]
    #[test]
    fn the_embedded_engine_behaves_like_a_sorted_map(
        batches in prop::collection::vec((prop::collection::vec(op(), 1..8), any::<bool>()), 1..12),
        limit in 1usize..20,
    ) {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let kv = EmbeddedEngine::open(&dir.path().join("db")).unwrap();
        let mut model = BTreeMap::new();
        runtime.block_on(async {
            for (ops, fenced_out) in &batches {
                let mut b = batch(ops);
                if *fenced_out {
                    // A fence that cannot hold: the whole batch must be refused.
                    b.fence(b"fence".to_vec(), Some(b"never".to_vec()));
                    assert!(matches!(kv.commit(b).await, Err(StoreError::FenceChanged { .. })));
                } else {
                    kv.commit(b).await.unwrap();
                    apply(&mut model, ops);
                }
                let all = kv.range(b"k".to_vec()..b"l".to_vec(), usize::MAX, false).await.unwrap();
                let expected: Vec<_> = model.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
                assert_eq!(all, expected);
                let last = kv.range(b"k".to_vec()..b"l".to_vec(), limit, true).await.unwrap();
                let expected: Vec<_> = model.iter().rev().take(limit).map(|(k, v)| (k.clone(), v.clone())).collect();
                assert_eq!(last, expected);
            }
        });
    }
}
