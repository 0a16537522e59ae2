//! Conversions between `courier_store::kv` and the `courier.internal.v1` messages, one for one.
//! The only lossy direction is a malformed request (a mutation without its kind, a limit that
//! does not fit this machine's `usize`): refused, never guessed.

use crate::proto;
use courier_store::StoreError;
use courier_store::kv::{Batch, BatchLimits, Durability, Fence, KeyValue, Mutation};

pub(crate) fn commit_request(batch: Batch) -> proto::CommitRequest {
    use proto::mutation::Kind;
    proto::CommitRequest {
        deferred: batch.durability == Durability::Deferred,
        fences: batch
            .fences
            .into_iter()
            .map(|Fence { key, expected }| proto::Fence { key, expected })
            .collect(),
        mutations: batch
            .mutations
            .into_iter()
            .map(|m| {
                let kind = match m {
                    Mutation::Set { key, value } => Kind::Set(proto::Set { key, value }),
                    Mutation::Clear { key } => Kind::Clear(proto::Clear { key }),
                    Mutation::ClearRange { begin, end } => {
                        Kind::ClearRange(proto::ClearRange { begin, end })
                    }
                    Mutation::Max { key, value } => Kind::Max(proto::Max { key, value }),
                    Mutation::Add { key, delta } => Kind::Add(proto::Add { key, delta }),
                    Mutation::SetVersionstampedKey { key, value } => {
                        Kind::SetVersionstampedKey(proto::SetVersionstampedKey { key, value })
                    }
                };
                proto::Mutation { kind: Some(kind) }
            })
            .collect(),
    }
}

/// The batch of a commit request; a mutation without its kind refuses the whole request.
pub(crate) fn batch(request: proto::CommitRequest) -> Result<Batch, StoreError> {
    use proto::mutation::Kind;
    let mutations = request
        .mutations
        .into_iter()
        .map(|m| {
            Ok(match m.kind {
                Some(Kind::Set(proto::Set { key, value })) => Mutation::Set { key, value },
                Some(Kind::Clear(proto::Clear { key })) => Mutation::Clear { key },
                Some(Kind::ClearRange(proto::ClearRange { begin, end })) => {
                    Mutation::ClearRange { begin, end }
                }
                Some(Kind::Max(proto::Max { key, value })) => Mutation::Max { key, value },
                Some(Kind::Add(proto::Add { key, delta })) => Mutation::Add { key, delta },
                Some(Kind::SetVersionstampedKey(proto::SetVersionstampedKey { key, value })) => {
                    Mutation::SetVersionstampedKey { key, value }
                }
                None => {
                    return Err(StoreError::Invalid(
                        "malformed commit request: a mutation without its kind (a client of \
                         another version?); nothing was applied"
                            .into(),
                    ));
                }
            })
        })
        .collect::<Result<_, _>>()?;
    Ok(Batch {
        fences: request
            .fences
            .into_iter()
            .map(|proto::Fence { key, expected }| Fence { key, expected })
            .collect(),
        mutations,
        durability: if request.deferred {
            Durability::Deferred
        } else {
            Durability::Synced
        },
    })
}

pub(crate) fn limits_response(limits: &BatchLimits) -> proto::LimitsResponse {
    proto::LimitsResponse {
        max_key_bytes: limits.max_key_bytes as u64,
        max_value_bytes: limits.max_value_bytes as u64,
        max_batch_bytes: limits.max_batch_bytes as u64,
    }
}

pub(crate) fn limits(response: proto::LimitsResponse) -> Result<BatchLimits, StoreError> {
    let size = |n: u64| {
        usize::try_from(n).map_err(|_| {
            StoreError::Engine(format!("the store node announced a limit of {n} bytes"))
        })
    };
    Ok(BatchLimits {
        max_key_bytes: size(response.max_key_bytes)?,
        max_value_bytes: size(response.max_value_bytes)?,
        max_batch_bytes: size(response.max_batch_bytes)?,
    })
}

pub(crate) fn pair((key, value): KeyValue) -> proto::KeyValue {
    proto::KeyValue { key, value }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_mutation_fence_and_durability_round_trips() {
        let mut original = Batch::new();
        original
            .fence(b"epoch".to_vec(), Some(vec![1, 0, 0]))
            .fence(b"absent".to_vec(), None)
            .fence(b"empty".to_vec(), Some(Vec::new()))
            .set(b"k".to_vec(), Vec::new())
            .clear(b"c".to_vec())
            .clear_range(b"a".to_vec()..b"b".to_vec())
            .max(b"m".to_vec(), u64::MAX)
            .add(b"n".to_vec(), i64::MIN)
            .set_versionstamped_key(vec![0xff; 14], b"v".to_vec());
        assert_eq!(batch(commit_request(original.clone())).unwrap(), original);
        original.deferred();
        assert_eq!(batch(commit_request(original.clone())).unwrap(), original);
    }

    #[test]
    fn a_mutation_without_kind_refuses_the_request() {
        let request = proto::CommitRequest {
            fences: Vec::new(),
            mutations: vec![proto::Mutation { kind: None }],
            deferred: false,
        };
        assert!(matches!(batch(request), Err(StoreError::Invalid(_))));
    }
}
