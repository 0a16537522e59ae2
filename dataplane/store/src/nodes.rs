//! The node registry of a cluster: every node writes its record (`("node", id)`: roles,
//! internal address, lease deadline) when it starts and renews it every lease round; a node
//! that stops renewing is seen as gone once its lease lapsed, and a node that leaves cleanly
//! ends its lease at once.
//!
//! **Forgetting.** A record whose lease lapsed long ago is removed ([`MessageStore::forget_node`])
//! by the live nodes' registration loops, or by the admin API's `ForgetNode`, so that the
//! registry does not grow with every pod a cluster ever ran. Before the record goes, the
//! routes of devices to that node written before its lapse are cleared (the only other keys
//! that name a node: ownership records name their owner too, but they are keyed by shard and
//! lapse with it, so the next owner takes them over). Forgetting is idempotent and fenced:
//! two nodes forgetting the same record at once both succeed (one reports it gone), and a
//! node that re-registers meanwhile is kept (its record changed, the delete's fence fails).
//! A forgotten node that comes back simply registers again.
//!
//! **A record that does not decode** (damage) is passed over by every reader of the registry,
//! logged at error; its node writes it anew at its next renewal, and a dead node's is
//! forgotten with the lapsed nodes (or by `ForgetNode`). A record whose lease ends further
//! ahead than any node writes one (more than a day ahead: damage) is no live node's
//! ([`NodeRecord::is_live`]); a process started under its id writes it anew (logged at error).
//!
//! **Ending another node's lease.** A node may end a live node's lease before its time
//! ([`MessageStore::end_node_lease`]): fanout does it to a gateway node that renews its lease
//! but takes no delivery (`courier_rpc::delivery`). The record is then lapsed for every node,
//! whose route sweeps clear the routes written before. The end is fenced on the record as the
//! caller read it, so a renewal in between wins, and it never raises a lease. The node sees it
//! at its next renewal, whatever the clocks: [`Claim::Registered`] reports the lease its own
//! record had, shorter than the one it last wrote; it takes that for a lapse (it tells its
//! connections to reconnect) and registers again.

use crate::kv::{Batch, KeyValue, StoreError};
use crate::message_store::{MessageStore, corrupt};
use crate::ownership::{beyond_any_lease, reading_again};
use prost::Message;

/// A node of the cluster, as it registered itself.
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct NodeRecord {
    /// `gateway`, `chat`, `sequencer`, `fanout`, `push`, `media`.
    #[prost(string, repeated, tag = "1")]
    pub roles: Vec<String>,
    /// Where the node's internal gRPC (and admin API) listens, `host:port`.
    #[prost(string, tag = "2")]
    pub address: String,
    /// The node is alive until this time (ms since the Unix epoch, by the node's clock); a
    /// node that leaves sets it to the time it left.
    #[prost(uint64, tag = "3")]
    pub lease_until_ms: u64,
    #[prost(uint64, tag = "4")]
    pub started_ms: u64,
    /// Client connections open on the node (a gateway) at its last renewal.
    #[prost(uint64, tag = "5")]
    pub connections: u64,
    // Tag 6 was a fanout node's backlog, summed for the senders' backpressure; that is now
    // kept by each shard's sequencer from the outbox lag. Records that still carry it decode.
    /// Where a node running `media` serves the client HTTP API, `host:port`: the gateway nodes
    /// without media forward media requests there. Empty on other nodes.
    #[prost(string, tag = "7")]
    pub http_address: String,
    /// The push providers (`fcm`, `apns`, `webhook`) a node running `push` sends with: the
    /// nodes without push accept device registrations for these. Empty on other nodes.
    #[prost(string, repeated, tag = "8")]
    pub push_providers: Vec<String>,
    /// A random number the process drew when it started: two processes that register under
    /// one node id are told apart ([`MessageStore::claim_node`]). 0 in records of versions
    /// before it.
    #[prost(uint64, tag = "9")]
    pub instance: u64,
}

impl NodeRecord {
    /// Whether the node's lease runs at `now_ms`. One that ends further ahead than any node
    /// writes one (more than a day ahead: damage, a deadline at `u64::MAX` say, or a hostile
    /// write) does not: taken as live, it kept a dead node live for every reader for good (its
    /// devices' routes kept, the push notifier taking them for connected), and a process
    /// started under its id waited for it to lapse for ever.
    pub fn is_live(&self, now_ms: u64) -> bool {
        self.lease_until_ms > now_ms && !beyond_any_lease(self.lease_until_ms, now_ms, 0)
    }
}

/// What [`MessageStore::claim_node`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// The record is this process's. `replaced_lease_until_ms` is the lease of the record
    /// this write replaced when that was this process's own (same instance), `None` when the
    /// id was free or another process's: a lease shorter than the one the process last wrote
    /// was ended by another node ([`MessageStore::end_node_lease`]).
    Registered {
        replaced_lease_until_ms: Option<u64>,
    },
    /// Another process, live, holds the node id: its record.
    HeldBy(NodeRecord),
}

/// What [`MessageStore::forget_node`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ForgetOutcome {
    /// The record is gone, with the routes to the node written before its lapse.
    Forgotten { routes_cleared: usize },
    /// No such record: never registered, or already forgotten (by another node, say).
    Unknown,
    /// The node's lease ended at `lease_until_ms`, not before the time given: it is live, or
    /// lapsed too recently, or re-registered meanwhile. Nothing was removed.
    Kept { lease_until_ms: u64 },
}

/// What [`MessageStore::end_node_lease`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaseEnd {
    /// The record was the one seen, live: its lease now ends at the time given.
    Ended,
    /// The record was the one seen, and its lease had ended by the time given: left as it is.
    Lapsed,
    /// The record is no longer the one seen (the node renewed or registered again, or another
    /// node ended its lease): left as it is, and here as it is now.
    Changed(NodeRecord),
    /// No such record: never registered, or forgotten.
    Unknown,
}

impl MessageStore {
    /// Records `node` as alive until `record.lease_until_ms` (registering or renewing; a later
    /// write wins).
    pub async fn register_node(&self, node: &str, record: &NodeRecord) -> Result<(), StoreError> {
        let mut batch = Batch::new();
        batch.set(self.keys().node(node), record.encode_to_vec());
        self.kv().commit(batch).await.map(drop)
    }

    /// Registers or renews `node` as [`Self::register_node`] does, unless another process
    /// holds the id: a record of another instance still live at `now_ms` is left as it is and
    /// returned. A write races no other (fenced on the record read).
    pub async fn claim_node(
        &self,
        node: &str,
        record: &NodeRecord,
        now_ms: u64,
    ) -> Result<Claim, StoreError> {
        let key = self.keys().node(node);
        reading_again(|| async {
            let stored = self.kv().get(&key).await?;
            let mut replaced_lease_until_ms = None;
            // A record that does not decode (damage) names no process: written anew, as a
            // free id (failing on it, this node could never renew its registration).
            let held = stored.as_ref().and_then(|value| {
                NodeRecord::decode(value.as_slice())
                    .inspect_err(|e| {
                        tracing::error!(error = %corrupt(&key, e), "this node's registry record does not decode: written anew");
                    })
                    .ok()
            });
            if let Some(held) = held {
                if held.instance == record.instance {
                    replaced_lease_until_ms = Some(held.lease_until_ms);
                } else if held.is_live(now_ms) {
                    return Ok(Claim::HeldBy(held));
                } else if held.lease_until_ms > now_ms {
                    tracing::error!(
                        node,
                        lease_until_ms = held.lease_until_ms,
                        "this node's registry record ends further ahead than any node writes one: written anew"
                    );
                }
            }
            let mut batch = Batch::new();
            batch
                .fence(key.clone(), stored)
                .set(key.clone(), record.encode_to_vec());
            self.kv().commit(batch).await?;
            Ok(Claim::Registered {
                replaced_lease_until_ms,
            })
        })
        .await
    }

    /// Ends the lease of node `id` at `now_ms` if its record is still `seen` (as the caller
    /// read it) and live then: every node sees it lapsed from then on, and the route sweeps
    /// clear the routes to it written before. A record that changed since it was read (a
    /// renewal) is left as it is, and a lease is never raised: ending a lease twice, or one
    /// that lapsed, writes nothing. The write is fenced on the record read, so a renewal
    /// racing it either comes first (and wins) or reads the ended record (and reports it,
    /// [`Claim::Registered`]).
    pub async fn end_node_lease(
        &self,
        id: &str,
        seen: &NodeRecord,
        now_ms: u64,
    ) -> Result<LeaseEnd, StoreError> {
        let key = self.keys().node(id);
        reading_again(|| async {
            let Some(value) = self.kv().get(&key).await? else {
                return Ok(LeaseEnd::Unknown);
            };
            let record = NodeRecord::decode(value.as_slice()).map_err(|e| corrupt(&key, e))?;
            if record != *seen {
                return Ok(LeaseEnd::Changed(record));
            }
            if !record.is_live(now_ms) {
                return Ok(LeaseEnd::Lapsed);
            }
            let ended = NodeRecord {
                lease_until_ms: now_ms,
                ..record
            };
            let mut batch = Batch::new();
            batch
                .fence(key.clone(), Some(value))
                .set(key.clone(), ended.encode_to_vec());
            self.kv().commit(batch).await?;
            Ok(LeaseEnd::Ended)
        })
        .await
    }

    /// Every node in the registry, in id order, live or not (see [`NodeRecord::is_live`]). A
    /// record that does not decode (damage) is passed over, logged at error: failing on it,
    /// every read of the registry failed on every node, and with them the routes to sequencer
    /// nodes and gateways. Its node writes it anew at its next renewal
    /// ([`MessageStore::claim_node`]); a dead node's is forgotten with the lapsed nodes
    /// ([`MessageStore::forget_lapsed_nodes`]).
    pub async fn nodes(&self) -> Result<Vec<(String, NodeRecord)>, StoreError> {
        let (nodes, damaged) = self.registry().await?;
        for (key, _) in &damaged {
            tracing::error!(
                key = %key.escape_ascii(),
                "a registry record that does not decode is passed over"
            );
        }
        Ok(nodes)
    }

    /// The records of the registry that decode, and the rows of those that do not.
    async fn registry(&self) -> Result<(Vec<(String, NodeRecord)>, Vec<KeyValue>), StoreError> {
        let rows = self
            .kv()
            .range(self.keys().nodes(), usize::MAX, false)
            .await?;
        let mut nodes = Vec::with_capacity(rows.len());
        let mut damaged = Vec::new();
        for (key, value) in rows {
            let id = self.keys().node_id(&key);
            match (id, NodeRecord::decode(value.as_slice())) {
                (Some(id), Ok(record)) => nodes.push((id, record)),
                _ => damaged.push((key, value)),
            }
        }
        Ok((nodes, damaged))
    }

    /// Removes node `id` from the registry if its lease ended before `lapsed_before_ms`: first
    /// the routes to it written before its lapse (a page per commit), then its record, in a
    /// commit fenced on the record read. A concurrent forget or a re-registration makes a
    /// step read again (at most 5 times), so the outcome says what holds afterwards.
    pub async fn forget_node(
        &self,
        id: &str,
        lapsed_before_ms: u64,
    ) -> Result<ForgetOutcome, StoreError> {
        reading_again(|| self.try_forget_node(id, lapsed_before_ms)).await
    }

    async fn try_forget_node(
        &self,
        id: &str,
        lapsed_before_ms: u64,
    ) -> Result<ForgetOutcome, StoreError> {
        let key = self.keys().node(id);
        let Some(value) = self.kv().get(&key).await? else {
            return Ok(ForgetOutcome::Unknown);
        };
        // A record that does not decode names no live process (a live one writes it anew at
        // its renewal): forgotten as one that lapsed long ago, its routes left to be passed
        // over (their gateway is not in the registry).
        let record = NodeRecord::decode(value.as_slice()).unwrap_or_default();
        if record.lease_until_ms >= lapsed_before_ms {
            return Ok(ForgetOutcome::Kept {
                lease_until_ms: record.lease_until_ms,
            });
        }
        // Routes first: once the record is gone, no sweep would find them.
        let routes_cleared = self.clear_gateway_routes(id, record.lease_until_ms).await?;
        let mut batch = Batch::new();
        batch.fence(key.clone(), Some(value)).clear(key);
        self.kv().commit(batch).await?;
        Ok(ForgetOutcome::Forgotten { routes_cleared })
    }

    /// Forgets every node but `except` whose lease ended before `lapsed_before_ms` (see
    /// [`MessageStore::forget_node`]); returns the ids forgotten by this call. One read of the
    /// registry, then a few small commits per node forgotten.
    pub async fn forget_lapsed_nodes(
        &self,
        lapsed_before_ms: u64,
        except: &str,
    ) -> Result<Vec<String>, StoreError> {
        let mut forgotten = Vec::new();
        let (nodes, damaged) = self.registry().await?;
        for (key, value) in damaged {
            let mut batch = Batch::new();
            batch.fence(key.clone(), Some(value)).clear(key.clone());
            match self.kv().commit(batch).await {
                Ok(_) => tracing::warn!(
                    key = %key.escape_ascii(),
                    "forgot a registry record that does not decode"
                ),
                // Written anew meanwhile by its node.
                Err(StoreError::FenceChanged { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        for (id, record) in nodes {
            if id == except || record.lease_until_ms >= lapsed_before_ms {
                continue;
            }
            if let ForgetOutcome::Forgotten { .. } = self.forget_node(&id, lapsed_before_ms).await?
            {
                forgotten.push(id);
            }
        }
        Ok(forgotten)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::temp_store;

    fn node(address: &str, lease_until_ms: u64) -> NodeRecord {
        NodeRecord {
            roles: vec!["gateway".into()],
            address: address.into(),
            lease_until_ms,
            started_ms: 0,
            connections: 0,
            ..NodeRecord::default()
        }
    }

    fn ids(nodes: &[(String, NodeRecord)]) -> Vec<&str> {
        nodes.iter().map(|(id, _)| id.as_str()).collect()
    }

    /// A record written by a node of the previous version (with its fanout backlog, tag 6)
    /// still decodes.
    #[test]
    fn a_record_with_the_former_backlog_field_decodes() {
        let mut bytes = node("127.0.0.2:7100", 200).encode_to_vec();
        bytes.extend([6 << 3, 42]);
        let record = NodeRecord::decode(bytes.as_slice()).unwrap();
        assert_eq!(record, node("127.0.0.2:7100", 200));
    }

    #[tokio::test]
    async fn nodes_register_and_their_leases_lapse() {
        let dir = tempfile::tempdir().unwrap();
        let store = temp_store(&dir, 8).await;
        store
            .register_node("s1", &node("127.0.0.2:7100", 100))
            .await
            .unwrap();
        store
            .register_node("s2", &node("127.0.0.3:7100", 50))
            .await
            .unwrap();
        store
            .register_node("s1", &node("127.0.0.2:7100", 200))
            .await
            .unwrap();
        let nodes = store.nodes().await.unwrap();
        assert_eq!(ids(&nodes), ["s1", "s2"]);
        assert_eq!(
            nodes[0].1.lease_until_ms, 200,
            "a renewal replaces the record"
        );
        let live: Vec<&str> = nodes
            .iter()
            .filter(|(_, n)| n.is_live(100))
            .map(|(id, _)| id.as_str())
            .collect();
        assert_eq!(live, ["s1"]);
    }

    #[tokio::test]
    async fn a_node_lapsed_long_enough_is_forgotten_with_its_routes_and_a_live_one_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let store = temp_store(&dir, 8).await;
        store
            .register_node("dead", &node("a:1", 100))
            .await
            .unwrap();
        store
            .register_node("live", &node("b:1", 900))
            .await
            .unwrap();
        store
            .add_route("bob", "phone", "dead", 1, 50)
            .await
            .unwrap();
        store
            .add_route("bob", "laptop", "live", 2, 50)
            .await
            .unwrap();

        assert_eq!(
            store.forget_node("dead", 100).await.unwrap(),
            ForgetOutcome::Kept {
                lease_until_ms: 100
            },
            "a lease that ended at the limit is kept"
        );
        assert_eq!(
            store.forget_lapsed_nodes(500, "me").await.unwrap(),
            ["dead"]
        );
        assert_eq!(ids(&store.nodes().await.unwrap()), ["live"]);
        let routes = store.routes("bob").await.unwrap();
        assert_eq!(
            routes
                .iter()
                .map(|r| r.gateway.as_str())
                .collect::<Vec<_>>(),
            ["live"],
            "the forgotten node's route went with it; nothing keys on it any more"
        );
        assert_eq!(
            store.forget_node("dead", 500).await.unwrap(),
            ForgetOutcome::Unknown,
            "forgetting again is harmless"
        );
        assert!(
            store
                .forget_lapsed_nodes(500, "me")
                .await
                .unwrap()
                .is_empty()
        );
        assert!(
            store
                .forget_lapsed_nodes(u64::MAX, "live")
                .await
                .unwrap()
                .is_empty()
        );
        assert_eq!(
            ids(&store.nodes().await.unwrap()),
            ["live"],
            "`except` is kept"
        );
    }

    #[tokio::test]
    async fn a_node_that_registers_again_while_it_is_forgotten_is_kept_with_its_new_routes() {
        use crate::faulty_engine::FaultyEngine;
        let engine = FaultyEngine::new();
        let store = engine.store(8).await;
        store.register_node("g", &node("a:1", 100)).await.unwrap();
        store.add_route("bob", "phone", "g", 1, 50).await.unwrap();
        // The node comes back between the forget's read and its commits: it registers again
        // and a device connects to it.
        let back = store.clone();
        engine.before_next_commit(Box::pin(async move {
            back.register_node("g", &node("a:1", 2_000)).await.unwrap();
            back.add_route("carol", "phone", "g", 2, 1_000)
                .await
                .unwrap();
        }));
        assert_eq!(
            store.forget_node("g", 500).await.unwrap(),
            ForgetOutcome::Kept {
                lease_until_ms: 2_000
            }
        );
        assert_eq!(ids(&store.nodes().await.unwrap()), ["g"]);
        assert_eq!(
            store.routes("carol").await.unwrap().len(),
            1,
            "a route written after the node came back is kept"
        );
        assert!(
            store.routes("bob").await.unwrap().is_empty(),
            "the route from before its lapse was cleared"
        );
    }

    #[tokio::test]
    async fn two_nodes_forgetting_the_same_node_at_once_both_succeed() {
        use crate::faulty_engine::FaultyEngine;
        let engine = FaultyEngine::new();
        let store = engine.store(8).await;
        store.register_node("g", &node("a:1", 100)).await.unwrap();
        for i in 0..3u64 {
            store
                .add_route(&format!("u{i}"), "phone", "g", i, 50)
                .await
                .unwrap();
        }
        // Another node's forget runs to the end between this one's read and its first commit.
        let other = store.clone();
        engine.before_next_commit(Box::pin(async move {
            let outcome = other.forget_node("g", 500).await.unwrap();
            assert_eq!(outcome, ForgetOutcome::Forgotten { routes_cleared: 3 });
        }));
        assert_eq!(
            store.forget_node("g", 500).await.unwrap(),
            ForgetOutcome::Unknown
        );
        assert!(store.nodes().await.unwrap().is_empty());
    }

    /// A process renews its own record; another process's claim of a live record is refused
    /// with that record, and succeeds once it lapsed (or ended: the node left).
    /// A registry record that does not decode (damage) is passed over by the readers of the
    /// registry, logged, and its node writes it anew at its next renewal. It failed every read
    /// of the registry, on every node: no route to a sequencer node was read (sends answered
    /// `unavailable`), no delivery batch to another gateway went out (every shard's sends
    /// refused past `--outbox-lag-limit`), no fanout share was counted; and its node's own
    /// renewals failed on it, for good.
    #[tokio::test]
    async fn a_registry_record_that_does_not_decode_is_passed_over_and_written_anew() {
        let dir = tempfile::tempdir().unwrap();
        let store = temp_store(&dir, 8).await;
        store.register_node("s1", &node("a:1", 100)).await.unwrap();
        let mut damage = Batch::new();
        damage.set(store.keys().node("s2"), vec![0xff; 3]);
        store.kv().commit(damage).await.unwrap();
        assert_eq!(ids(&store.nodes().await.unwrap()), ["s1"]);

        let s2 = NodeRecord {
            instance: 7,
            ..node("b:1", 200)
        };
        assert_eq!(
            store.claim_node("s2", &s2, 10).await.unwrap(),
            Claim::Registered {
                replaced_lease_until_ms: None
            }
        );
        assert_eq!(ids(&store.nodes().await.unwrap()), ["s1", "s2"]);

        // A dead node's damaged record is forgotten with the lapsed nodes.
        let mut damage = Batch::new();
        damage.set(store.keys().node("s3"), vec![0xff; 3]);
        store.kv().commit(damage).await.unwrap();
        store.forget_lapsed_nodes(50, "s1").await.unwrap();
        assert_eq!(ids(&store.nodes().await.unwrap()), ["s1", "s2"]);
        assert_eq!(
            store.kv().get(&store.keys().node("s3")).await.unwrap(),
            None
        );
    }

    #[tokio::test]
    async fn a_node_id_is_claimed_by_one_live_process_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let store = temp_store(&dir, 8).await;
        let first = NodeRecord {
            instance: 1,
            ..node("127.0.0.2:7100", 100)
        };
        let second = NodeRecord {
            instance: 2,
            ..node("127.0.0.3:7100", 200)
        };
        assert_eq!(
            store.claim_node("s1", &first, 10).await.unwrap(),
            Claim::Registered {
                replaced_lease_until_ms: None
            }
        );
        let renewed = NodeRecord {
            lease_until_ms: 150,
            ..first.clone()
        };
        assert_eq!(
            store.claim_node("s1", &renewed, 60).await.unwrap(),
            Claim::Registered {
                replaced_lease_until_ms: Some(100)
            },
            "a renewal reports the lease it replaced"
        );
        assert_eq!(
            store.claim_node("s1", &second, 100).await.unwrap(),
            Claim::HeldBy(renewed.clone()),
            "live until 150"
        );
        assert_eq!(store.nodes().await.unwrap()[0].1, renewed, "left as it was");
        // A record of a version before instances is another process's too.
        let unnumbered = NodeRecord {
            instance: 0,
            ..node("127.0.0.2:7100", 300)
        };
        store.register_node("s2", &unnumbered).await.unwrap();
        assert_eq!(
            store.claim_node("s2", &second, 200).await.unwrap(),
            Claim::HeldBy(unnumbered)
        );
        assert_eq!(
            store.claim_node("s1", &second, 150).await.unwrap(),
            Claim::Registered {
                replaced_lease_until_ms: None
            },
            "another process's lapsed record is no lease of this one"
        );
        assert_eq!(
            store.claim_node("s1", &renewed, 160).await.unwrap(),
            Claim::HeldBy(second),
            "the first process, back after a pause, finds the id taken"
        );
    }
    /// A registry record whose lease ends further ahead than any node writes one (damage: a
    /// deadline at `u64::MAX`, say) is no live node's: every reader sees it lapsed, and a
    /// process started under its id registers. It counted as live for good: the node's routes
    /// were kept and its devices taken for connected, and that process waited for its lapse
    /// for ever.
    #[tokio::test]
    async fn a_node_lease_ending_past_any_a_node_writes_is_no_live_node() {
        let dir = tempfile::tempdir().unwrap();
        let store = temp_store(&dir, 8).await;
        let damaged = NodeRecord {
            instance: 1,
            ..node("127.0.0.2:7100", u64::MAX)
        };
        store.register_node("s1", &damaged).await.unwrap();
        assert!(!damaged.is_live(1_000));
        let restarted = NodeRecord {
            instance: 2,
            ..node("127.0.0.2:7100", 11_000)
        };
        assert_eq!(
            store.claim_node("s1", &restarted, 1_000).await.unwrap(),
            Claim::Registered {
                replaced_lease_until_ms: None
            }
        );
        // A lease a node writes (an hour of `--shard-lease`, say) is a live one.
        let long = node("127.0.0.2:7100", 1_000 + 3_600_000);
        assert!(long.is_live(1_000));
    }

    /// Fanout ends the lease of a gateway it cannot reach: every node sees the record lapsed
    /// at once, and the node's next renewal reports its lease cut short, whatever its clock.
    #[tokio::test]
    async fn a_node_lease_ended_by_another_node_lapses_and_its_renewal_reports_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = temp_store(&dir, 8).await;
        let gateway = NodeRecord {
            instance: 7,
            ..node("a:1", 1_000)
        };
        store.claim_node("g", &gateway, 0).await.unwrap();
        store.add_route("bob", "phone", "g", 1, 400).await.unwrap();
        assert_eq!(
            store.end_node_lease("g", &gateway, 500).await.unwrap(),
            LeaseEnd::Ended
        );
        let ended = store.nodes().await.unwrap().remove(0).1;
        assert_eq!(ended.lease_until_ms, 500, "ends at the caller's time");
        assert!(!ended.is_live(500), "lapsed for every reader from then on");
        assert_eq!(
            store
                .clear_gateway_routes("g", ended.lease_until_ms)
                .await
                .unwrap(),
            1,
            "a sweep clears the routes written before the end"
        );
        assert_eq!(
            store.end_node_lease("g", &ended, 600).await.unwrap(),
            LeaseEnd::Lapsed,
            "ending it again writes nothing"
        );
        assert_eq!(
            store.end_node_lease("g", &gateway, 600).await.unwrap(),
            LeaseEnd::Changed(ended.clone()),
            "nor does an end from a stale read"
        );
        assert_eq!(store.nodes().await.unwrap()[0].1, ended, "never raised");
        // The node's next renewal (its clock may be behind the caller's: no matter) reports
        // the lease it replaced, shorter than the one it wrote.
        let renewed = NodeRecord {
            lease_until_ms: 1_300,
            ..gateway.clone()
        };
        assert_eq!(
            store.claim_node("g", &renewed, 300).await.unwrap(),
            Claim::Registered {
                replaced_lease_until_ms: Some(500)
            }
        );
        assert_eq!(
            store.end_node_lease("other", &gateway, 500).await.unwrap(),
            LeaseEnd::Unknown
        );
    }

    /// A renewal that commits between an end's read and its commit wins: the end's fence
    /// fails, it reads the renewed record, and leaves it; the renewal is never undone by an
    /// end decided on the record before it.
    #[tokio::test]
    async fn a_renewal_racing_an_end_of_the_lease_wins() {
        use crate::faulty_engine::FaultyEngine;
        let engine = FaultyEngine::new();
        let store = engine.store(8).await;
        let gateway = NodeRecord {
            instance: 7,
            ..node("a:1", 1_000)
        };
        store.claim_node("g", &gateway, 0).await.unwrap();
        let renewed = NodeRecord {
            lease_until_ms: 1_300,
            ..gateway.clone()
        };
        let renewing = store.clone();
        let record = renewed.clone();
        engine.before_next_commit(Box::pin(async move {
            let claim = renewing.claim_node("g", &record, 300).await.unwrap();
            assert_eq!(
                claim,
                Claim::Registered {
                    replaced_lease_until_ms: Some(1_000)
                }
            );
        }));
        assert_eq!(
            store.end_node_lease("g", &gateway, 500).await.unwrap(),
            LeaseEnd::Changed(renewed.clone())
        );
        assert_eq!(store.nodes().await.unwrap()[0].1, renewed);
    }

    /// An end that commits between a renewal's read and its commit is not overwritten: the
    /// renewal's fence fails, it reads the ended record, and reports the lease cut short.
    #[tokio::test]
    async fn a_renewal_that_meets_an_ended_lease_reports_it() {
        use crate::faulty_engine::FaultyEngine;
        let engine = FaultyEngine::new();
        let store = engine.store(8).await;
        let gateway = NodeRecord {
            instance: 7,
            ..node("a:1", 1_000)
        };
        store.claim_node("g", &gateway, 0).await.unwrap();
        let ending = store.clone();
        let seen = gateway.clone();
        engine.before_next_commit(Box::pin(async move {
            let end = ending.end_node_lease("g", &seen, 500).await.unwrap();
            assert_eq!(end, LeaseEnd::Ended);
        }));
        let renewed = NodeRecord {
            lease_until_ms: 1_300,
            ..gateway.clone()
        };
        assert_eq!(
            store.claim_node("g", &renewed, 300).await.unwrap(),
            Claim::Registered {
                replaced_lease_until_ms: Some(500)
            }
        );
        assert_eq!(store.nodes().await.unwrap()[0].1, renewed);
    }
}
