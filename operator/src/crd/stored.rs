//! Statuses read as the API server stored them, a field that does not fit its type left out
//! rather than the whole object refused.
//!
//! The API server does not enforce an integer's `format` (kubernetes/kubernetes#136091), keeps
//! an integer past 2^63 as a float, and checks nothing against the operator's types when
//! someone else writes a status (`kubectl patch --subresource status`, an older operator, a
//! restored backup). A number past what its Rust type holds (a pool's `connections` of
//! 18446744073709552000, a move's `shard` of -1) made the whole object unreadable, and so every
//! list of that kind: the operator's watch of every such resource in its scope failed over and
//! over, and none was reconciled, every other tenant's included.
//!
//! So a status is read field by field when it cannot be read whole: a field that does not fit
//! is left out (its default: absent, zero, empty), a list keeps the entries that fit, and what
//! was left out is named in the status's `unreadable` (never written back). The controllers
//! report it as a `Warning` event (`StatusUnreadable`) on the object, and the status they write
//! next replaces the damaged one.

use serde_json::{Map, Value};

/// A status read with [`salvage`]: what of the stored one was left out.
pub trait Salvaged: Default {
    /// The fields (and list entries) of the stored status that could not be read, each with
    /// why; empty when it was read whole.
    fn unreadable(&self) -> &[String];
    /// The same, to fill in.
    fn unreadable_mut(&mut self) -> &mut Vec<String>;
}

/// `stored` read with `strict` (the status's derived deserializer), or, when that fails,
/// field by field: see the module's documentation. Every field of the status must have a
/// default.
pub fn salvage<T: Salvaged>(stored: Value, strict: fn(Value) -> serde_json::Result<T>) -> T {
    let whole = match strict(stored.clone()) {
        Ok(status) => return status,
        Err(e) => e,
    };
    let Value::Object(fields) = stored else {
        let mut status = T::default();
        status.unreadable_mut().push(format!("status: {whole}"));
        return status;
    };
    let alone =
        |key: &str, value: Value| strict(Value::Object(Map::from_iter([(key.to_owned(), value)])));
    let mut kept = Map::new();
    let mut unreadable = Vec::new();
    for (key, value) in fields {
        let error = match alone(&key, value.clone()) {
            Ok(_) => {
                kept.insert(key, value);
                continue;
            }
            Err(e) => e,
        };
        match value {
            Value::Array(entries) => {
                let count = entries.len();
                let (fit, unfit): (Vec<Value>, Vec<Value>) = entries
                    .into_iter()
                    .partition(|entry| alone(&key, Value::Array(vec![entry.clone()])).is_ok());
                let example = unfit
                    .first()
                    .and_then(|entry| alone(&key, Value::Array(vec![entry.clone()])).err())
                    .map_or_else(|| error.to_string(), |e| e.to_string());
                unreadable.push(format!(
                    "{key}: {} of {count} entries ({example})",
                    unfit.len()
                ));
                kept.insert(key, Value::Array(fit));
            }
            _ => unreadable.push(format!("{key}: {error}")),
        }
    }
    let mut status = strict(Value::Object(kept)).unwrap_or_default();
    *status.unreadable_mut() = unreadable;
    status
}

/// Implements `Serialize` and `Deserialize` for statuses that derive them with
/// `#[serde(remote = "Self")]` (the derived code as inherent functions), reading them with
/// [`salvage`], and [`Salvaged`] over their `unreadable` field.
macro_rules! salvaged {
    ($($status:ty),*) => {$(
        impl<'de> serde::Deserialize<'de> for $status {
            fn deserialize<D: serde::Deserializer<'de>>(stored: D) -> Result<Self, D::Error> {
                let stored = <serde_json::Value as serde::Deserialize>::deserialize(stored)?;
                Ok($crate::crd::stored::salvage(stored, |value| <$status>::deserialize(value)))
            }
        }

        impl serde::Serialize for $status {
            fn serialize<S: serde::Serializer>(&self, out: S) -> Result<S::Ok, S::Error> {
                <$status>::serialize(self, out)
            }
        }

        impl $crate::crd::stored::Salvaged for $status {
            fn unreadable(&self) -> &[String] {
                &self.unreadable
            }

            fn unreadable_mut(&mut self) -> &mut Vec<String> {
                &mut self.unreadable
            }
        }
    )*};
}

pub(crate) use salvaged;

#[cfg(test)]
mod tests {
    use kube::core::ObjectList;
    use serde_json::json;

    use super::Value;
    use crate::crd::{GatewayPool, Salvaged, SequencerShardSet, ShardRebalance};

    fn pool(name: &str, status: Value) -> Value {
        json!({
            "apiVersion": "courier.dev/v1alpha1",
            "kind": "GatewayPool",
            "metadata": {"name": name, "namespace": "chat"},
            "spec": {"cluster": "prod"},
            "status": status,
        })
    }

    /// A pool whose stored status holds a number past its type (a `connections` past 2^63,
    /// which the API server keeps as a float) no longer makes the list of every pool
    /// unreadable: the others are read as stored, and it is read without that field, named.
    #[test]
    fn a_status_number_past_its_type_is_read_as_absent_and_named() {
        let list = json!({
            "apiVersion": "courier.dev/v1alpha1",
            "kind": "GatewayPoolList",
            "metadata": {},
            "items": [
                pool("damaged", json!({
                    "replicas": 3,
                    "readyReplicas": 4294967296u64,
                    "connections": 18446744073709552000.0,
                    "observedGeneration": 2,
                })),
                pool("sound", json!({"replicas": 2, "connections": 42})),
            ],
        });
        let pools: ObjectList<GatewayPool> = serde_json::from_value(list).expect("readable");
        let damaged = pools.items[0].status.as_ref().unwrap();
        assert_eq!(damaged.replicas, 3);
        assert_eq!(damaged.observed_generation, Some(2));
        assert_eq!((damaged.ready_replicas, damaged.connections), (0, 0));
        let unreadable = damaged.unreadable();
        assert_eq!(unreadable.len(), 2, "{unreadable:?}");
        assert!(unreadable[0].starts_with("connections: "), "{unreadable:?}");
        assert!(
            unreadable[1].starts_with("readyReplicas: "),
            "{unreadable:?}"
        );
        let sound = pools.items[1].status.as_ref().unwrap();
        assert_eq!((sound.replicas, sound.connections), (2, 42));
        assert!(sound.unreadable().is_empty());
        let written = serde_json::to_value(damaged).unwrap();
        assert!(written.get("unreadable").is_none(), "{written}");
    }

    /// A list keeps its entries that fit: one recorded move of a shard past `u32` does not
    /// lose the others (and their cooldowns).
    #[test]
    fn a_list_keeps_the_entries_that_fit() {
        let moved = |shard: Value| {
            json!({"shard": shard, "from": "s-0", "to": "s-1", "reason": "Relieve",
                   "outcome": "epoch 2", "at": "2026-12-06T10:00:00Z"})
        };
        let set: SequencerShardSet = serde_json::from_value(json!({
            "apiVersion": "courier.dev/v1alpha1",
            "kind": "SequencerShardSet",
            "metadata": {"name": "s", "namespace": "chat"},
            "spec": {"cluster": "prod", "shards": 8},
            "status": {
                "recentMoves": [moved(json!(1)), moved(json!(-1)), moved(json!(3))],
                "pods": [{"pod": "s-0", "shards": 4294967296u64, "appendsPerSec": 1.0}],
                "conditions": [{"type": "Ready", "status": "True", "reason": "Available",
                                "message": "", "lastTransitionTime": "not a time"}],
            },
        }))
        .expect("readable");
        let status = set.status.unwrap();
        let shards: Vec<u32> = status.recent_moves.iter().map(|m| m.shard).collect();
        assert_eq!(shards, [1, 3]);
        assert!(status.pods.is_empty());
        assert!(status.conditions.is_empty());
        let unreadable = status.unreadable();
        assert_eq!(unreadable.len(), 3, "{unreadable:?}");
        assert!(
            unreadable[0].starts_with("conditions: 1 of 1 entries"),
            "{unreadable:?}"
        );
        assert!(
            unreadable[2].starts_with("recentMoves: 1 of 3 entries"),
            "{unreadable:?}"
        );
    }

    /// A status that is no object at all is read as none, and said so.
    #[test]
    fn a_status_that_is_no_object_is_read_as_empty() {
        let rebalance: ShardRebalance = serde_json::from_value(json!({
            "apiVersion": "courier.dev/v1alpha1",
            "kind": "ShardRebalance",
            "metadata": {"name": "s-rebalance", "namespace": "chat"},
            "spec": {"shardSet": "s"},
            "status": "garbage",
        }))
        .expect("readable");
        let status = rebalance.status.unwrap();
        assert!(status.moves.is_empty());
        assert!(status.unreadable()[0].starts_with("status: "), "{status:?}");
    }
}
