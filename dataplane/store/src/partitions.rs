//! Storage partitions: the logical shards split by a static table into ranges, each range on a
//! store of its own (a FoundationDB cluster, or a store node in test clusters), so that
//! capacity grows by adding stores. `docs/decisions/0005-storage-partitions.md` is the design.
//!
//! - [`PartitionTable`]: the table given at start (JSON), checked against the shard count.
//! - [`PartitionedEngine`]: a [`KvEngine`] over the partitions' engines. Every key lives in
//!   one partition ([`Keys::placement`]): point reads go there, a range inside one partition
//!   goes there, a range across partitions is read from each (concurrently) and merged in key
//!   order, and fails if any partition fails (never a partial answer). A commit must lie in
//!   one partition: one that does not is refused as a bug ([`StoreError::Engine`]), never
//!   split, because FoundationDB has no transaction across clusters. The message store splits
//!   the few operations that span partitions itself, in steps that are each correct alone.
//!
//! Without a table there is no [`PartitionedEngine`] at all: the store uses its one engine
//! directly.

use crate::keys::{Keys, Placement};
use crate::kv::{Batch, BatchLimits, CommitStamp, KeyValue, KvEngine, Mutation, StoreError};
use async_trait::async_trait;
use std::ops::{Range, RangeInclusive};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Where a partition is.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum PartitionStore {
    /// A store node, `http://host:port` (`--store remote`: tests and development).
    Address(String),
    /// A FoundationDB cluster file (`--store fdb`).
    ClusterFile(PathBuf),
}

/// One partition of the table: its shards and its store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Partition {
    pub shards: RangeInclusive<u32>,
    pub store: PartitionStore,
}

/// The table of storage partitions, checked: partition `i` is the `i`-th entry, partition 0
/// also holds the directory, and the ranges cover every shard once, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionTable {
    partitions: Vec<Partition>,
}

/// Why a partition table is refused.
#[derive(Debug, thiserror::Error)]
pub enum TableError {
    #[error("cannot read the partition table {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "not a partition table: {0}; expected {{\"partitions\": [{{\"shards\": [first, last], \
         \"store_address\": \"http://host:port\" or \"cluster_file\": \"/path\"}}, ...]}}"
    )]
    Syntax(#[from] serde_json::Error),
    #[error("the partition table lists no partition")]
    Empty,
    #[error("partition {index}: its shard range [{first}, {last}] is reversed")]
    Reversed { index: usize, first: u32, last: u32 },
    #[error(
        "partition {index} starts at shard {first}, but shard {expected} is next: shards \
         {expected}..{first} have no partition"
    )]
    Gap {
        index: usize,
        first: u32,
        expected: u32,
    },
    #[error(
        "partition {index} starts at shard {first}, which the partition before it holds \
         (it ends at {previous_last}): ranges overlap"
    )]
    Overlap {
        index: usize,
        first: u32,
        previous_last: u32,
    },
    #[error(
        "partition {index} ends at shard {last}, beyond the last shard ({}) of {shard_count}",
        shard_count - 1
    )]
    Beyond {
        index: usize,
        last: u32,
        shard_count: u32,
    },
    #[error(
        "the partitions end at shard {last}: shards {}..{shard_count} have none",
        last + 1
    )]
    Short { last: u32, shard_count: u32 },
    #[error("partition {index} names no store: give \"store_address\" or \"cluster_file\"")]
    NoStore { index: usize },
    #[error("partition {index} names two stores: give \"store_address\" or \"cluster_file\"")]
    TwoStores { index: usize },
    #[error(
        "partition {index} names a {found}, partition 0 a {expected}: every partition is on \
         the same kind of store"
    )]
    MixedKinds {
        index: usize,
        found: &'static str,
        expected: &'static str,
    },
    #[error("partitions {first} and {second} name the same store {store}")]
    SameStore {
        first: usize,
        second: usize,
        store: String,
    },
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct TableFile {
    partitions: Vec<EntryFile>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct EntryFile {
    shards: (u32, u32),
    store_address: Option<String>,
    cluster_file: Option<PathBuf>,
}

impl PartitionStore {
    fn kind(&self) -> &'static str {
        match self {
            PartitionStore::Address(_) => "store_address",
            PartitionStore::ClusterFile(_) => "cluster_file",
        }
    }
}

impl std::fmt::Display for PartitionStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PartitionStore::Address(address) => write!(f, "{address}"),
            PartitionStore::ClusterFile(path) => write!(f, "{}", path.display()),
        }
    }
}

impl PartitionTable {
    /// Reads and checks the table in `path` for a store of `shard_count` shards.
    pub fn read(path: &Path, shard_count: u32) -> Result<Self, TableError> {
        let text = std::fs::read_to_string(path).map_err(|source| TableError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, shard_count)
    }

    /// Parses and checks a table (JSON, see [`TableError::Syntax`]) for `shard_count` shards.
    pub fn parse(text: &str, shard_count: u32) -> Result<Self, TableError> {
        let file: TableFile = serde_json::from_str(text)?;
        let mut partitions: Vec<Partition> = Vec::with_capacity(file.partitions.len());
        for (index, entry) in file.partitions.into_iter().enumerate() {
            let (first, last) = entry.shards;
            let store = match (entry.store_address, entry.cluster_file) {
                (Some(address), None) => PartitionStore::Address(address),
                (None, Some(path)) => PartitionStore::ClusterFile(path),
                (None, None) => return Err(TableError::NoStore { index }),
                (Some(_), Some(_)) => return Err(TableError::TwoStores { index }),
            };
            if first > last {
                return Err(TableError::Reversed { index, first, last });
            }
            let expected = partitions.last().map_or(0, |p| p.shards.end() + 1);
            if first > expected {
                return Err(TableError::Gap {
                    index,
                    first,
                    expected,
                });
            }
            if let Some(previous) = partitions.last().filter(|_| first < expected) {
                return Err(TableError::Overlap {
                    index,
                    first,
                    previous_last: *previous.shards.end(),
                });
            }
            if last >= shard_count {
                return Err(TableError::Beyond {
                    index,
                    last,
                    shard_count,
                });
            }
            if let Some(first_kind) = partitions.first().map(|p| p.store.kind())
                && first_kind != store.kind()
            {
                return Err(TableError::MixedKinds {
                    index,
                    found: store.kind(),
                    expected: first_kind,
                });
            }
            if let Some(first) = partitions.iter().position(|p| p.store == store) {
                return Err(TableError::SameStore {
                    first,
                    second: index,
                    store: store.to_string(),
                });
            }
            partitions.push(Partition {
                shards: first..=last,
                store,
            });
        }
        match partitions.last() {
            None => Err(TableError::Empty),
            Some(p) if p.shards.end() + 1 < shard_count => Err(TableError::Short {
                last: *p.shards.end(),
                shard_count,
            }),
            Some(_) => Ok(Self { partitions }),
        }
    }

    /// The partitions, partition 0 first.
    pub fn partitions(&self) -> &[Partition] {
        &self.partitions
    }

    /// The shards the table covers (the store's shard count).
    pub fn shard_count(&self) -> u32 {
        self.partitions.last().map_or(0, |p| p.shards.end() + 1)
    }

    /// The shard ranges, as recorded in the directory (`0-511,512-1023`): a start with other
    /// ranges is refused, the stores' locations may change.
    pub fn ranges(&self) -> String {
        let ranges: Vec<String> = self
            .partitions
            .iter()
            .map(|p| format!("{}-{}", p.shards.start(), p.shards.end()))
            .collect();
        ranges.join(",")
    }
}

/// A [`KvEngine`] over the engines of a table's partitions (module documentation).
pub struct PartitionedEngine {
    engines: Vec<Arc<dyn KvEngine>>,
    /// The partition of each shard.
    partition_of_shard: Vec<usize>,
    keys: Keys,
}

fn cross_partition(what: &str) -> StoreError {
    StoreError::Engine(format!(
        "{what} spans storage partitions: a commit must lie in one partition (a bug)"
    ))
}

/// Which of `count` partitions each item of a list goes to, in one pass: the partitions in
/// order of first appearance, each with its items in list order.
fn group_by<T>(items: impl IntoIterator<Item = (usize, T)>, count: usize) -> Vec<(usize, Vec<T>)> {
    let mut groups: Vec<Vec<T>> = (0..count).map(|_| Vec::new()).collect();
    let mut order = Vec::new();
    for (partition, item) in items {
        if groups[partition].is_empty() {
            order.push(partition);
        }
        groups[partition].push(item);
    }
    order
        .into_iter()
        .map(|p| (p, std::mem::take(&mut groups[p])))
        .collect()
}

impl PartitionedEngine {
    /// The engines of `table`'s partitions, in its order, for keys under `keys`' root.
    pub fn new(engines: Vec<Arc<dyn KvEngine>>, table: &PartitionTable, keys: Keys) -> Self {
        let partition_of_shard = table
            .partitions
            .iter()
            .enumerate()
            .flat_map(|(i, p)| p.shards.clone().map(move |_| i))
            .collect();
        Self {
            engines,
            partition_of_shard,
            keys,
        }
    }

    /// The partition of `shard` (the directory's for a shard beyond the table, which the
    /// table's check rules out).
    pub fn partition_of_shard(&self, shard: u32) -> usize {
        self.partition_of_shard
            .get(shard as usize)
            .copied()
            .unwrap_or(0)
    }

    fn partition_of(&self, place: Placement) -> usize {
        match place {
            Placement::Directory => 0,
            Placement::Shard(shard) => self.partition_of_shard(shard),
            Placement::Conversation(hash) => self.partition_of_shard(
                crate::message_store::shard_of_hash(hash, self.partition_of_shard.len() as u32),
            ),
        }
    }

    /// The partition of `key`, if it is a key of the store.
    pub fn partition_of_key(&self, key: &[u8]) -> Option<usize> {
        self.keys
            .placement(key)
            .map(|(place, _)| self.partition_of(place))
    }

    /// The one partition holding every key of `range`, if there is one: every key of a
    /// range starts with the bytes its bounds share, so those decide it when they can.
    fn partition_of_range(&self, range: &Range<Vec<u8>>) -> Option<usize> {
        let shared = range
            .start
            .iter()
            .zip(&range.end)
            .take_while(|(a, b)| a == b)
            .count();
        let (place, len) = self.keys.placement(&range.start[..shared])?;
        (len <= shared).then(|| self.partition_of(place))
    }

    /// The partition of what `mutation` writes, if it lies in one.
    fn partition_of_mutation(&self, mutation: &Mutation) -> Option<usize> {
        match mutation {
            Mutation::Set { key, .. }
            | Mutation::Clear { key }
            | Mutation::Max { key, .. }
            | Mutation::Add { key, .. }
            | Mutation::SetVersionstampedKey { key, .. } => self.partition_of_key(key),
            Mutation::ClearRange { begin, end } => {
                self.partition_of_range(&(begin.clone()..end.clone()))
            }
        }
    }

    /// The partition of every mutation and fence of `batch`, if there is one.
    fn partition_of_batch(&self, batch: &Batch) -> Result<usize, StoreError> {
        let fences = batch.fences.iter().map(|f| self.partition_of_key(&f.key));
        let mutations = batch
            .mutations
            .iter()
            .map(|m| self.partition_of_mutation(m));
        let mut partition = None;
        for place in fences.chain(mutations) {
            match (place, partition) {
                (None, _) => return Err(cross_partition("a key of no known placement")),
                (Some(p), Some(q)) if p != q => return Err(cross_partition("a batch")),
                (Some(p), _) => partition = Some(p),
            }
        }
        Ok(partition.unwrap_or(0))
    }

    /// Commits the mutations of `batch`, which are independent of each other (no fences),
    /// one commit per partition they lie in, concurrently; a range across partitions is
    /// cleared in each. Not atomic across partitions: for idempotent clean-up only.
    pub async fn commit_per_partition(&self, batch: Batch) -> Result<(), StoreError> {
        if !batch.fences.is_empty() {
            return Err(cross_partition("a fenced batch committed per partition"));
        }
        let mut items = Vec::with_capacity(batch.mutations.len());
        for mutation in batch.mutations {
            match (self.partition_of_mutation(&mutation), &mutation) {
                (Some(p), _) => items.push((p, mutation)),
                (None, Mutation::ClearRange { .. }) => {
                    items.extend((0..self.engines.len()).map(|p| (p, mutation.clone())))
                }
                (None, _) => return Err(cross_partition("a key of no known placement")),
            }
        }
        let commits = group_by(items, self.engines.len())
            .into_iter()
            .map(|(p, mutations)| {
                self.engines[p].commit(Batch {
                    fences: Vec::new(),
                    mutations,
                    durability: batch.durability,
                })
            });
        futures::future::try_join_all(commits).await.map(drop)
    }
}

#[async_trait]
impl KvEngine for PartitionedEngine {
    fn halted(&self) -> Option<String> {
        self.engines.iter().find_map(|e| e.halted())
    }

    async fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        let partition = self
            .partition_of_key(key)
            .ok_or_else(|| cross_partition("a read of a key of no known placement"))?;
        self.engines[partition].get(key).await
    }

    async fn range(
        &self,
        range: Range<Vec<u8>>,
        limit: usize,
        reverse: bool,
    ) -> Result<Vec<KeyValue>, StoreError> {
        if let Some(partition) = self.partition_of_range(&range) {
            return self.engines[partition].range(range, limit, reverse).await;
        }
        let reads = self
            .engines
            .iter()
            .map(|engine| engine.range(range.clone(), limit, reverse));
        let mut rows: Vec<KeyValue> = futures::future::try_join_all(reads)
            .await?
            .into_iter()
            .flatten()
            .collect();
        rows.sort_unstable_by(|a, b| match reverse {
            false => a.0.cmp(&b.0),
            true => b.0.cmp(&a.0),
        });
        rows.truncate(limit);
        Ok(rows)
    }

    async fn get_many(&self, keys: Vec<Vec<u8>>) -> Result<Vec<Option<Vec<u8>>>, StoreError> {
        let mut placed = Vec::with_capacity(keys.len());
        for (i, key) in keys.into_iter().enumerate() {
            let partition = self
                .partition_of_key(&key)
                .ok_or_else(|| cross_partition("a read of a key of no known placement"))?;
            placed.push((partition, (i, key)));
        }
        let count = placed.len();
        let reads = group_by(placed, self.engines.len())
            .into_iter()
            .map(|(p, keys)| async move {
                let (order, keys): (Vec<usize>, Vec<Vec<u8>>) = keys.into_iter().unzip();
                let values = self.engines[p].get_many(keys).await?;
                Ok::<_, StoreError>(order.into_iter().zip(values))
            });
        let mut values = vec![None; count];
        for (i, value) in futures::future::try_join_all(reads)
            .await?
            .into_iter()
            .flatten()
        {
            values[i] = value;
        }
        Ok(values)
    }

    async fn ranges(
        &self,
        ranges: Vec<Range<Vec<u8>>>,
        limit: usize,
    ) -> Result<Vec<Vec<KeyValue>>, StoreError> {
        let count = ranges.len();
        let (single, spanning): (Vec<_>, Vec<_>) = ranges
            .into_iter()
            .enumerate()
            .map(|(i, range)| (self.partition_of_range(&range), (i, range)))
            .partition(|(p, _)| p.is_some());
        let grouped = group_by(
            single.into_iter().map(|(p, item)| (p.unwrap_or(0), item)),
            self.engines.len(),
        );
        let reads = grouped.into_iter().map(|(p, ranges)| async move {
            let (order, ranges): (Vec<usize>, Vec<Range<Vec<u8>>>) = ranges.into_iter().unzip();
            let rows = self.engines[p].ranges(ranges, limit).await?;
            Ok::<_, StoreError>(order.into_iter().zip(rows).collect::<Vec<_>>())
        });
        let spans = spanning.into_iter().map(|(_, (i, range))| async move {
            Ok::<_, StoreError>(vec![(i, self.range(range, limit, false).await?)])
        });
        let (grouped, spans) = futures::future::try_join(
            futures::future::try_join_all(reads),
            futures::future::try_join_all(spans),
        )
        .await?;
        let mut answers = vec![Vec::new(); count];
        for (i, rows) in grouped.into_iter().chain(spans).flatten() {
            answers[i] = rows;
        }
        Ok(answers)
    }

    async fn commit(&self, batch: Batch) -> Result<CommitStamp, StoreError> {
        let partition = self.partition_of_batch(&batch)?;
        self.engines[partition].commit(batch).await
    }

    /// In every partition: each may hold keys of the range.
    async fn drop_expired(&self, range: Range<Vec<u8>>) -> Result<(), StoreError> {
        futures::future::try_join_all(
            self.engines
                .iter()
                .map(|engine| engine.drop_expired(range.clone())),
        )
        .await
        .map(drop)
    }

    fn limits(&self) -> BatchLimits {
        let all = self.engines.iter().map(|e| e.limits());
        BatchLimits {
            max_key_bytes: all.clone().map(|l| l.max_key_bytes).min().unwrap_or(0),
            max_value_bytes: all.clone().map(|l| l.max_value_bytes).min().unwrap_or(0),
            max_batch_bytes: all.map(|l| l.max_batch_bytes).min().unwrap_or(0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ReceiptKind;
    use crate::faulty_engine::FaultyEngine;
    use crate::message_store::{
        Append, AppendKey, DeliveredBound, HeadCache, MediaRecord, MediaReference, MessageStore,
        NewConversation, PendingPush, PushedBound, ShardLease, bound_after,
    };
    use crate::ownership::Duty;
    use courier_proto::{Body, EventPayload, Media, MembershipChange, Sender};
    use std::sync::Mutex;

    const SHARDS: u32 = 8;
    const TWO: &str = r#"{"partitions": [
        {"shards": [0, 3], "store_address": "http://127.0.0.1:7400"},
        {"shards": [4, 7], "store_address": "http://127.0.0.1:7401"}]}"#;

    fn table() -> PartitionTable {
        PartitionTable::parse(TWO, SHARDS).unwrap()
    }

    fn refused(text: &str) -> String {
        PartitionTable::parse(text, SHARDS).unwrap_err().to_string()
    }

    fn entries(ranges: &[(u32, u32)]) -> String {
        let entries: Vec<String> = ranges
            .iter()
            .enumerate()
            .map(|(i, (a, b))| format!(r#"{{"shards": [{a}, {b}], "cluster_file": "/etc/{i}"}}"#))
            .collect();
        format!(r#"{{"partitions": [{}]}}"#, entries.join(","))
    }

    #[test]
    fn a_table_covers_every_shard_once_in_order_on_distinct_stores_of_one_kind() {
        let table = table();
        assert_eq!(table.ranges(), "0-3,4-7");
        assert_eq!(
            table.partitions()[1].store,
            PartitionStore::Address("http://127.0.0.1:7401".into())
        );
        assert!(PartitionTable::parse(&entries(&[(0, 7)]), SHARDS).is_ok());
        let cases = [
            (entries(&[]), "lists no partition"),
            (entries(&[(0, 2), (4, 7)]), "shards 3..4 have no partition"),
            (entries(&[(1, 7)]), "shards 0..1 have no partition"),
            (entries(&[(0, 4), (4, 7)]), "ranges overlap"),
            (entries(&[(0, 3), (4, 8)]), "beyond the last shard (7) of 8"),
            (entries(&[(0, 3), (4, 6)]), "shards 7..8 have none"),
            (entries(&[(0, 3), (7, 4)]), "[7, 4] is reversed"),
            (
                r#"{"partitions": [{"shards": [0, 7]}]}"#.into(),
                "partition 0 names no store",
            ),
            (
                r#"{"partitions": [{"shards": [0, 7], "store_address": "a", "cluster_file": "b"}]}"#
                    .into(),
                "partition 0 names two stores",
            ),
            (
                r#"{"partitions": [{"shards": [0, 3], "store_address": "a"},
                    {"shards": [4, 7], "cluster_file": "b"}]}"#
                    .into(),
                "partition 1 names a cluster_file, partition 0 a store_address",
            ),
            (
                r#"{"partitions": [{"shards": [0, 3], "store_address": "a"},
                    {"shards": [4, 7], "store_address": "a"}]}"#
                    .into(),
                "partitions 0 and 1 name the same store a",
            ),
            (
                r#"{"partitions": [{"shards": [0, 7], "store": "a"}]}"#.into(),
                "not a partition table: unknown field `store`",
            ),
        ];
        for (text, error) in cases {
            let message = refused(&text);
            assert!(message.contains(error), "{text}: {message}");
        }
    }

    /// Two in-process partitions whose engines record every batch they commit.
    struct TwoPartitions {
        engines: [Arc<FaultyEngine>; 2],
        commits: [Arc<Mutex<Vec<Batch>>>; 2],
        store: MessageStore,
    }

    impl TwoPartitions {
        async fn new() -> Self {
            let engines = [FaultyEngine::new(), FaultyEngine::new()];
            let commits = [Arc::default(), Arc::default()];
            for (engine, commits) in engines.iter().zip(&commits) {
                engine.set_fault(Some(recording(commits)));
            }
            let store = open(&engines).await.unwrap();
            Self {
                engines,
                commits,
                store,
            }
        }

        /// A conversation id of partition `partition` (`prefix` and a number).
        fn conversation(&self, prefix: &str, partition: usize) -> String {
            (0..)
                .map(|i| format!("{prefix}{i}"))
                .find(|conv| self.store.partition_of_shard(self.store.shard_of(conv)) == partition)
                .unwrap()
        }
    }

    fn recording(commits: &Arc<Mutex<Vec<Batch>>>) -> crate::faulty_engine::Fault {
        let commits = commits.clone();
        Box::new(move |batch| {
            commits.lock().unwrap().push(batch.clone());
            None
        })
    }

    async fn open(engines: &[Arc<FaultyEngine>]) -> Result<MessageStore, StoreError> {
        let engines: Vec<Arc<dyn KvEngine>> = engines
            .iter()
            .map(|e| e.clone() as Arc<dyn KvEngine>)
            .collect();
        MessageStore::open_partitioned(engines, &table(), b"", SHARDS).await
    }

    fn sender(user: &str) -> Sender {
        Sender {
            user: user.into(),
            device: "p".into(),
        }
    }

    fn group_append(conv: &str, user: &str, key: &str, payload: EventPayload) -> Append {
        Append {
            conversation_id: conv.into(),
            sender: sender(user),
            key: AppendKey::Server(key.into()),
            payload,
            create: None,
        }
    }

    async fn lease(store: &MessageStore, conv: &str) -> ShardLease {
        let shard = store.shard_of(conv);
        store
            .acquire_shards(Duty::Sequencing, "s", &[shard], 1, 0, u64::MAX)
            .await
            .unwrap()
            .pop()
            .unwrap_or(ShardLease {
                shard,
                epoch: store
                    .shard_owner(Duty::Sequencing, shard)
                    .await
                    .unwrap()
                    .unwrap()
                    .epoch,
            })
    }

    async fn append_one(store: &MessageStore, append: Append) -> u64 {
        let lease = lease(store, &append.conversation_id).await;
        let mut results = store
            .append(lease, &mut HeadCache::default(), &[append])
            .await
            .unwrap();
        results.remove(0).unwrap().seq
    }

    /// Alice's upload `id` and a message body that shares it.
    fn png(id: &str) -> (MediaRecord, Body) {
        let record = MediaRecord {
            mime: "image/png".into(),
            size: 10,
            sha256: "sha".into(),
            created_ms: 1,
            owner: "alice".into(),
            shared_ms: 0,
        };
        let body = Body::Media(Box::new(Media {
            media_id: id.into(),
            mime: record.mime.clone(),
            size: record.size,
            sha256: record.sha256.clone(),
            name: None,
            caption: None,
        }));
        (record, body)
    }

    fn message(conv: &str, from: &str, to: &str, id: &str, body: Body) -> Append {
        Append {
            create: Some(NewConversation::direct(from, to)),
            ..Append::message(conv.into(), sender(from), id.into(), body, None)
        }
    }

    /// Every key of every subspace is placed where the decision says, and a range read
    /// inside one conversation or shard stays in its partition.
    #[tokio::test]
    async fn every_key_lives_in_the_partition_its_placement_names() {
        let parts = TwoPartitions::new().await;
        let store = &parts.store;
        let keys = store.keys().clone();
        let router = store_router(store);
        let conv = parts.conversation("g:", 1);
        let shard = store.shard_of(&conv);
        let directory = [
            keys.shard_count(),
            keys.trim_queue_built(),
            keys.partition_table(),
            keys.leader("retention"),
            keys.route("u", "d", "gw"),
            keys.gateway_route("gw", "u", "d"),
            keys.node("n"),
            keys.device("u", "d"),
            keys.cursor("u", "d", &conv),
            keys.media("m"),
            keys.forgotten_media("m"),
            keys.blob_user("sha", "m"),
            keys.media_usage("u"),
            keys.former_group_count("u"),
        ];
        for key in &directory {
            assert_eq!(router.partition_of_key(key), Some(0), "{key:?}");
        }
        let with_conversation = [
            keys.shard_epoch(Duty::Sequencing, shard),
            keys.shard_epoch(Duty::Delivery, shard),
            keys.shard_owner(Duty::Sequencing, shard),
            keys.shard_owner(Duty::Delivery, shard),
            keys.outbox_entry(shard, 0),
            keys.delivered_bound(shard),
            keys.pushed_bound(shard),
            keys.group_counter("u", shard),
            keys.conversation(&conv),
            keys.member(&conv, "u"),
            keys.user_conversation("u", &conv),
            keys.head(&conv),
            keys.event(&conv, 3),
            keys.idempotency(&[7], &conv, "u", "d", "c").remove(0),
            keys.named_idempotency(&[7], &conv, "u", "d", "c").remove(0),
            keys.server_idempotency(&[u64::MAX], &conv, "k").remove(0),
            keys.legacy_idempotency(&conv, "u", "d", "c"),
            keys.trim_due(7, &conv),
            keys.legacy_server_idempotency(&conv, "k"),
            keys.receipt(&conv, "u", ReceiptKind::Read),
            keys.floor(&conv),
            keys.media_reference("m", &conv, 3),
            keys.pending_push("u", "d", &conv),
            keys.owed_push("u", "d", &conv),
        ];
        for key in &with_conversation {
            assert_eq!(router.partition_of_key(key), Some(1), "{key:?}");
        }
        for range in [
            keys.events(&conv, 1, u64::MAX),
            keys.members(&conv),
            keys.outbox(shard),
        ] {
            assert_eq!(router.partition_of_range(&range), Some(1), "{range:?}");
        }
        for range in [keys.devices("u"), keys.cursors("u", "d"), keys.routes("u")] {
            assert_eq!(router.partition_of_range(&range), Some(0), "{range:?}");
        }
        for range in [
            keys.user_conversations("u"),
            keys.media_references("m"),
            keys.shard_owners(Duty::Sequencing),
            keys.conversations(),
            keys.group_counters("u"),
            keys.pending_pushes(),
            keys.owed_pushes(),
        ] {
            assert_eq!(router.partition_of_range(&range), None, "{range:?}");
        }
        // A conversation id with a NUL in it is hashed as written.
        let odd = "a\0b";
        for key in [
            keys.head(odd),
            keys.idempotency(&[7], odd, "u", "d", "c").remove(0),
        ] {
            assert_eq!(
                router.partition_of_key(&key),
                Some(store.partition_of_shard(store.shard_of(odd)))
            );
        }
    }

    fn store_router(store: &MessageStore) -> PartitionedEngine {
        PartitionedEngine::new(Vec::new(), &table(), store.keys().clone())
    }

    /// Every key stored in `engine` with its partition by placement.
    async fn stored_keys(engine: &FaultyEngine) -> Vec<Vec<u8>> {
        engine
            .range(Vec::new()..vec![0xff], usize::MAX, false)
            .await
            .unwrap()
            .into_iter()
            .map(|(k, _)| k)
            .collect()
    }

    /// A day of a cluster on two partitions: every commit lies in one engine, each engine
    /// holds only its partition's keys, and the reads that span partitions see both.
    #[tokio::test]
    async fn every_commit_lies_in_one_partition_and_reads_across_partitions_merge() {
        let parts = TwoPartitions::new().await;
        let store = &parts.store;
        let direct = [parts.conversation("d:", 0), parts.conversation("d:", 1)];
        let groups = [parts.conversation("g:", 0), parts.conversation("g:", 1)];
        let all: Vec<u32> = (0..SHARDS).collect();
        let sequencing = store
            .acquire_shards(Duty::Sequencing, "s", &all, usize::MAX, 0, u64::MAX)
            .await
            .unwrap();
        assert_eq!(sequencing.len(), SHARDS as usize);
        let delivery = store
            .acquire_shards(Duty::Delivery, "f", &all, usize::MAX, 0, u64::MAX)
            .await
            .unwrap();
        assert_eq!(store.shard_owners(Duty::Sequencing).await.unwrap().len(), 8);
        assert!(
            store
                .renew_shards(Duty::Sequencing, "s", &sequencing, 1, 10)
                .await
                .unwrap()
                .is_empty()
        );

        let (image, media) = png("m1");
        store.put_media("m1", &image, 0).await.unwrap();
        for conv in &direct {
            append_one(
                store,
                message(conv, "alice", "bob", "t", Body::Text("hi".into())),
            )
            .await;
            append_one(store, message(conv, "alice", "bob", "m", media.clone())).await;
            store
                .acknowledge("bob", "p", conv, 2, ReceiptKind::Read)
                .await
                .unwrap();
        }
        for conv in &groups {
            let created = EventPayload::GroupCreated {
                name: "g".into(),
                members: vec!["alice".into(), "bob".into()],
            };
            append_one(store, group_append(conv, "alice", "c", created)).await;
            let add = EventPayload::MemberAdded(MembershipChange::new(vec!["carol".into()]));
            append_one(store, group_append(conv, "alice", "a", add)).await;
            let remove = EventPayload::MemberRemoved(MembershipChange::new(vec!["bob".into()]));
            append_one(store, group_append(conv, "alice", "r", remove)).await;
        }
        // Reads that span partitions.
        let mut convs: Vec<String> = store
            .conversations_of("bob")
            .await
            .unwrap()
            .into_iter()
            .map(|c| c.conversation_id)
            .collect();
        convs.sort();
        let mut expected: Vec<String> = direct.iter().chain(&groups).cloned().collect();
        expected.sort();
        assert_eq!(convs, expected, "bob's conversations of both partitions");
        assert_eq!(store.group_count("carol").await.unwrap(), 2);
        assert_eq!(store.group_count("bob").await.unwrap(), 0);
        assert_eq!(store.media_references("m1").await.unwrap().len(), 2);
        assert_eq!(store.device_cursors("bob", "p").await.unwrap().len(), 2);
        assert_eq!(store.receipt(&direct[1], "bob").await.unwrap(), (2, 2));
        let ids = store.conversation_ids(None, 3).await.unwrap().ids;
        let mut sorted = expected.clone();
        sorted.truncate(3);
        assert_eq!(ids, sorted, "a page of every conversation, in id order");
        assert_eq!(store.shard_map(10).await.unwrap().len(), SHARDS as usize);

        // Outboxes of both partitions, delivered and expanded by partition.
        let mut delivered = Vec::new();
        let mut pushed = Vec::new();
        for lease in &delivery {
            let outbox = store.outbox(lease.shard, None, 100).await.unwrap();
            if let Some((last, _)) = outbox.last() {
                let bound = bound_after(last);
                delivered.push(DeliveredBound {
                    lease: *lease,
                    bound: bound.clone(),
                });
                pushed.push(PushedBound {
                    shard: lease.shard,
                    clear: Some(store.keys().outbox(lease.shard).start..bound.clone()),
                    bound,
                });
            }
        }
        assert!(delivered.len() >= 2);
        store.advance_delivered(&delivered).await.unwrap();
        assert!(
            store
                .shard_map(10)
                .await
                .unwrap()
                .iter()
                .all(|s| s.outbox.entries == 0),
            "nothing waits for fanout"
        );
        let pending: Vec<_> = direct
            .iter()
            .map(|conv| {
                (
                    ("bob".into(), "p".into(), conv.clone()),
                    PendingPush::default(),
                )
            })
            .collect();
        store.expand_outbox(&pushed, &pending).await.unwrap();
        assert_eq!(store.pending_pushes(None, 10).await.unwrap().len(), 2);
        for shard in 0..SHARDS {
            assert!(store.outbox(shard, None, 1).await.unwrap().is_empty());
        }

        // Directory writes, clean-up, retention.
        store
            .update_device("bob", "p", |_| Some(Default::default()))
            .await
            .unwrap();
        store.add_route("bob", "p", "gw", 1, 1).await.unwrap();
        store.unlink_device("bob", "p", 5).await.unwrap();
        assert!(store.device_cursors("bob", "p").await.unwrap().is_empty());
        let shared = [MediaReference {
            media_id: "m1".into(),
            seq: 2,
        }];
        for conv in &direct {
            let lease = lease(store, conv).await;
            store.trim(lease, conv, 3, &shared).await.unwrap();
        }
        assert!(
            store.media_references("m1").await.unwrap().is_empty(),
            "the trims cleared their messages' references"
        );
        store.expire_idempotency_records(u64::MAX).await.unwrap();
        store.forget_media("m1", &image).await.unwrap();
        store
            .release_shards(Duty::Delivery, "f", &delivery)
            .await
            .unwrap();

        let router = store_router(store);
        for (partition, (engine, commits)) in parts.engines.iter().zip(&parts.commits).enumerate() {
            let commits = commits.lock().unwrap().clone();
            assert!(
                commits.len() > 10,
                "partition {partition} took {} commits",
                commits.len()
            );
            let own_index = store.keys().partition_index();
            for batch in commits
                .iter()
                .filter(|b| b.fences.iter().all(|f| f.key != own_index))
            {
                // A clean-up range across partitions is cleared in each: nothing else spans.
                let spanning_clear = batch.fences.is_empty()
                    && batch.mutations.iter().all(|m| {
                        matches!(m, Mutation::ClearRange { .. })
                            && router.partition_of_mutation(m).is_none()
                    });
                assert!(
                    spanning_clear || router.partition_of_batch(batch).ok() == Some(partition),
                    "a commit of partition {partition}: {batch:?}"
                );
            }
            for key in stored_keys(engine).await {
                let placed = router.partition_of_key(&key);
                // Each partition's own index is the one key kept in every partition.
                if key != store.keys().partition_index() {
                    assert_eq!(
                        placed,
                        Some(partition),
                        "{key:?} kept in partition {partition}"
                    );
                }
            }
        }
    }

    /// A crash between an ack's two steps leaves the device's cursor behind its receipts,
    /// never ahead: the events come again, and their ack completes it.
    #[tokio::test]
    async fn an_ack_cut_between_its_steps_leaves_the_cursor_behind_and_its_retry_completes_it() {
        let parts = TwoPartitions::new().await;
        let store = &parts.store;
        let conv = parts.conversation("d:", 1);
        append_one(
            store,
            message(&conv, "alice", "bob", "t", Body::Text("hi".into())),
        )
        .await;
        parts.engines[0].set_fault(Some(Box::new(|_| Some(StoreError::Engine("crash".into())))));
        let cut = store
            .acknowledge("bob", "p", &conv, 1, ReceiptKind::Read)
            .await;
        assert!(cut.is_err(), "the cursor's step failed: {cut:?}");
        assert_eq!(store.receipt(&conv, "bob").await.unwrap(), (1, 1));
        assert_eq!(
            store.device_cursor("bob", "p", &conv).await.unwrap(),
            0,
            "behind"
        );
        parts.engines[0].set_fault(None);
        store
            .acknowledge("bob", "p", &conv, 1, ReceiptKind::Read)
            .await
            .unwrap();
        assert_eq!(store.receipt(&conv, "bob").await.unwrap(), (1, 1));
        assert_eq!(store.device_cursor("bob", "p", &conv).await.unwrap(), 1);
    }

    /// A sweep cut after the media record is forgotten: downloads decide on the record, which
    /// is gone; the references left behind point at retained messages of the same media.
    #[tokio::test]
    async fn a_media_forget_cut_before_its_references_are_cleared_leaves_no_access() {
        let parts = TwoPartitions::new().await;
        let store = &parts.store;
        let conv = parts.conversation("d:", 1);
        let (image, body) = png("m1");
        store.put_media("m1", &image, 100).await.unwrap();
        append_one(store, message(&conv, "alice", "bob", "m", body)).await;
        parts.engines[1].set_fault(Some(Box::new(|_| Some(StoreError::Engine("crash".into())))));
        assert!(store.forget_media("m1", &image).await.is_err());
        assert_eq!(store.media("m1").await.unwrap(), None, "the record is gone");
        assert_eq!(store.media_usage("alice").await.unwrap(), 0);
        assert_eq!(
            store.media_references("m1").await.unwrap(),
            [(conv.clone(), 1)],
            "its reference is the retained message's"
        );
        parts.engines[1].set_fault(None);
        store.put_media("m1", &image, 100).await.unwrap();
        store.forget_media("m1", &image).await.unwrap();
        assert!(store.media_references("m1").await.unwrap().is_empty());
    }

    /// A page of the retention queue's moves spans both partitions: one commit in each, each
    /// move fenced on its entry, so an entry another pass moved meanwhile (in partition 1) is
    /// left where that pass put it, and the page's other moves still happen.
    #[tokio::test]
    async fn retention_queue_moves_commit_per_partition_and_skip_entries_moved_meanwhile() {
        let parts = TwoPartitions::new().await;
        let store = &parts.store;
        let convs = [parts.conversation("d:", 0), parts.conversation("d:", 1)];
        // A second conversation of partition 1, whose move shares the raced one's commit.
        let other = (0..)
            .map(|i| format!("d:{i}"))
            .filter(|conv| store.partition_of_shard(store.shard_of(conv)) == 1)
            .nth(1)
            .unwrap();
        for conv in convs.iter().chain([&other]) {
            append_one(
                store,
                message(conv, "alice", "bob", "m", Body::Text("m".into())),
            )
            .await;
        }
        let entries = store.due_trims(u64::MAX, None, 10).await.unwrap();
        assert_eq!(entries.len(), 3);
        let raced = entries
            .iter()
            .find(|e| e.conversation == convs[1])
            .unwrap()
            .clone();
        let racer = store.clone();
        parts.engines[1].before_next_commit(Box::pin(async move {
            racer.reschedule_trims(&[(&raced, 100)]).await.unwrap();
        }));
        let moves: Vec<_> = entries.iter().map(|e| (e, 200)).collect();
        store.reschedule_trims(&moves).await.unwrap();
        let mut queued: Vec<_> = store
            .due_trims(u64::MAX, None, 10)
            .await
            .unwrap()
            .into_iter()
            .map(|e| (e.due_ms, e.conversation))
            .collect();
        queued.sort();
        let mut expected = vec![
            (100, convs[1].clone()),
            (200, convs[0].clone()),
            (200, other.clone()),
        ];
        expected.sort();
        assert_eq!(queued, expected);
    }

    /// Per conversation: its outbox entries left (up to 1), and whether bob's notification is
    /// written.
    async fn waiting(store: &MessageStore, convs: &[String]) -> Vec<(usize, bool)> {
        let mut waiting = Vec::new();
        for conv in convs {
            let intents = store.outbox(store.shard_of(conv), None, 1).await.unwrap();
            let pending = store.pending_push("bob", "p", conv).await.unwrap();
            waiting.push((intents.len(), pending.is_some()));
        }
        waiting
    }

    /// Push expansion cut in one partition: the other's messages are expanded and cleared, the
    /// cut one's stay and are expanded by the next pass.
    #[tokio::test]
    async fn push_expansion_cut_in_one_partition_keeps_that_partitions_outbox() {
        let parts = TwoPartitions::new().await;
        let store = &parts.store;
        let convs = [parts.conversation("d:", 0), parts.conversation("d:", 1)];
        let mut intents = Vec::new();
        for conv in &convs {
            append_one(
                store,
                message(conv, "alice", "bob", "t", Body::Text("hi".into())),
            )
            .await;
            let shard = store.shard_of(conv);
            let read = store.outbox(shard, None, 10).await.unwrap();
            let bound = bound_after(&read[0].0);
            intents.push(PushedBound {
                shard,
                clear: Some(store.keys().outbox(shard).start..bound.clone()),
                bound,
            });
        }
        let pending: Vec<_> = convs
            .iter()
            .map(|conv| {
                (
                    ("bob".into(), "p".into(), conv.clone()),
                    PendingPush::default(),
                )
            })
            .collect();
        parts.engines[1].set_fault(Some(Box::new(|_| Some(StoreError::Engine("crash".into())))));
        assert!(store.expand_outbox(&intents, &pending).await.is_err());
        parts.engines[1].set_fault(None);
        // Partition 0 expanded and cleared its message; partition 1 kept its own.
        assert_eq!(waiting(store, &convs).await, [(0, true), (1, false)]);
        store
            .expand_outbox(&intents[1..], &pending[1..])
            .await
            .unwrap();
        assert_eq!(waiting(store, &convs).await, [(0, true), (0, true)]);
    }

    #[tokio::test]
    async fn a_store_opens_only_with_the_table_and_stores_it_was_created_with() {
        let engines = [FaultyEngine::new(), FaultyEngine::new()];
        open(&engines).await.unwrap();
        open(&engines).await.expect("the same table again");
        let swapped = [engines[1].clone(), engines[0].clone()];
        let error = open(&swapped).await.err().unwrap().to_string();
        assert!(error.contains("holds partition 1 of this store"), "{error}");
        let twice = [engines[0].clone(), engines[0].clone()];
        let error = open(&twice).await.err().unwrap().to_string();
        assert!(error.contains("holds partition 0 of this store"), "{error}");
        let other: Vec<Arc<dyn KvEngine>> = vec![engines[0].clone(), engines[1].clone()];
        let narrower = PartitionTable::parse(&entries(&[(0, 1), (2, 7)]), SHARDS).unwrap();
        let error = MessageStore::open_partitioned(other, &narrower, b"", SHARDS)
            .await
            .err()
            .unwrap()
            .to_string();
        assert!(
            error.contains("created with the storage partitions 0-3,4-7, not 0-1,2-7"),
            "{error}"
        );
        for (engine, what) in [
            (&engines[0], "created with storage partitions"),
            (&engines[1], "is partition 1"),
        ] {
            let error = MessageStore::open(engine.clone(), b"", SHARDS)
                .await
                .err()
                .unwrap()
                .to_string();
            assert!(error.contains(what), "{error}");
        }
        // A store created without partitions is not split after the fact.
        let single = FaultyEngine::new();
        single.store(SHARDS).await;
        let error = open(&[single, FaultyEngine::new()])
            .await
            .err()
            .unwrap()
            .to_string();
        assert!(
            error.contains("created without storage partitions"),
            "{error}"
        );
        // Nor is a store that holds another store taken as a partition.
        let taken = FaultyEngine::new();
        taken.store(SHARDS).await;
        let error = open(&[FaultyEngine::new(), taken])
            .await
            .err()
            .unwrap()
            .to_string();
        assert!(error.contains("already holds a Courier store"), "{error}");
    }

    /// A batch across partitions is refused, never split.
    #[tokio::test]
    async fn a_commit_across_partitions_is_refused_and_nothing_is_written() {
        let parts = TwoPartitions::new().await;
        let keys = parts.store.keys().clone();
        let conv = parts.conversation("d:", 1);
        let mut batch = Batch::new();
        batch
            .set(keys.head(&conv), vec![1])
            .set(keys.device("u", "d"), vec![1]);
        let router = PartitionedEngine::new(
            parts
                .engines
                .iter()
                .map(|e| e.clone() as Arc<dyn KvEngine>)
                .collect(),
            &table(),
            keys.clone(),
        );
        let error = router.commit(batch).await.unwrap_err().to_string();
        assert!(error.contains("spans storage partitions"), "{error}");
        assert_eq!(router.get(&keys.head(&conv)).await.unwrap(), None);
        assert_eq!(router.get(&keys.device("u", "d")).await.unwrap(), None);
    }
}
