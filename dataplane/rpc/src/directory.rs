//! The live nodes of one role, from the node registry, in the order a caller should try them.
//!
//! Used by the callers that may go to any node of a role: [`crate::ClusterChat`] (the chat
//! nodes, one device's calls to one node) and a gateway node's media forwarding (the media
//! nodes, any will do).
//!
//! - **Freshness.** The registry is read at most every [`DIRECTORY_TTL`]; a copy that held no
//!   live node is read again at once, so a node that just started is found.
//! - **Order.** Rendezvous hashing of the caller's key and each node id: a key's calls go to the
//!   same node while the set of live nodes stays the same, and a node that joins or leaves moves
//!   only the keys it takes or had.
//! - **Failures.** A node that failed a call is [`NodeDirectory::mark_down`]: it is ranked last
//!   for [`DOWN_FOR`], then ranked as before. A node leaves the order once its lease lapsed.

use crate::lock;
use courier_core::clock::now_ms;
use courier_store::nodes::NodeRecord;
use courier_store::{MessageStore, StoreError};
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long a node that failed a call is ranked last.
pub const DOWN_FOR: Duration = Duration::from_secs(2);

/// How long the node registry is cached.
pub const DIRECTORY_TTL: Duration = Duration::from_secs(1);

/// A live node of the role: its id and the address its callers reach (`host:port`).
pub type LiveNode = (String, String);

/// The live nodes of one role (module documentation).
pub struct NodeDirectory {
    store: MessageStore,
    role: &'static str,
    /// Which of a node's registered addresses the callers use.
    address: fn(&NodeRecord) -> &str,
    /// When the registry was last read, and the live nodes it held, sorted by id.
    nodes: Mutex<(Option<Instant>, Arc<Vec<LiveNode>>)>,
    /// Nodes that failed a call, and when.
    down: Mutex<HashMap<String, Instant>>,
}

impl NodeDirectory {
    /// The live nodes registered in `store` with `role`, reached at `address` (a node whose
    /// `address` is empty is left out).
    pub fn new(store: MessageStore, role: &'static str, address: fn(&NodeRecord) -> &str) -> Self {
        Self {
            store,
            role,
            address,
            nodes: Mutex::new((None, Arc::default())),
            down: Mutex::default(),
        }
    }

    /// The live nodes, read again once the copy is older than [`DIRECTORY_TTL`] (or held none).
    async fn live(&self) -> Result<Arc<Vec<LiveNode>>, StoreError> {
        {
            let (read, nodes) = &*lock(&self.nodes);
            if read.is_some_and(|read| read.elapsed() < DIRECTORY_TTL) && !nodes.is_empty() {
                return Ok(nodes.clone());
            }
        }
        let now = now_ms();
        let mut live: Vec<LiveNode> = self
            .store
            .nodes()
            .await?
            .into_iter()
            .filter(|(_, n)| n.is_live(now) && n.roles.iter().any(|r| r == self.role))
            .filter_map(|(id, n)| {
                let address = (self.address)(&n);
                (!address.is_empty()).then(|| (id, address.to_owned()))
            })
            .collect();
        live.sort();
        let live = Arc::new(live);
        *lock(&self.nodes) = (Some(Instant::now()), live.clone());
        Ok(live)
    }

    /// The live nodes in the order `key`'s calls try them: by rank, nodes marked down last.
    /// Empty when no node of the role is live.
    pub async fn ranked(&self, key: impl Hash) -> Result<Vec<LiveNode>, StoreError> {
        let nodes = self.live().await?;
        let down: Vec<String> = {
            let mut down = lock(&self.down);
            down.retain(|_, since| since.elapsed() < DOWN_FOR);
            down.keys().cloned().collect()
        };
        let mut ranked: Vec<(bool, u64, &LiveNode)> = nodes
            .iter()
            .map(|node| (down.contains(&node.0), u64::MAX - rank(&key, &node.0), node))
            .collect();
        ranked.sort();
        Ok(ranked
            .into_iter()
            .map(|(_, _, node)| node.clone())
            .collect())
    }

    /// Ranks `node` last for [`DOWN_FOR`]: it failed a call.
    pub fn mark_down(&self, node: &str) {
        lock(&self.down).insert(node.to_owned(), Instant::now());
    }
}

/// The rank of `node` for `key`: highest first (rendezvous hashing).
fn rank(key: &impl Hash, node: &str) -> u64 {
    let mut hasher = std::hash::DefaultHasher::new();
    key.hash(&mut hasher);
    node.hash(&mut hasher);
    hasher.finish()
}
