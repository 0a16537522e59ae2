//! A FoundationDB cluster's storage: one cluster file, or a table of storage partitions
//! (`docs/decisions/0005-storage-partitions.md`), checked and rendered for the data plane.
//!
//! - [`check`]: what the CRD's CEL rules cannot say cheaply: the ranges run from shard 0 to
//!   `shards - 1` in order, once each, and no cluster file is named twice. A table that fails
//!   is never rendered: the cluster controller reports it in the status instead.
//! - [`config_map`]: the table as the data plane reads it (`--storage-partitions`), each
//!   partition's cluster file at `/etc/courier/fdb/<index>/<key>`, where [`super::pod`] mounts
//!   its Secret. The pods carry the table's digest ([`TABLE_DIGEST_ANNOTATION`]), so a changed
//!   table rolls them (the data plane reads it only at start).

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::Serialize;
use sha2::{Digest, Sha256};

use super::{RenderError, name_and_namespace, owner_reference, pod};
use crate::crd::{
    CourierCluster, FoundationDbStorage, MAX_STORAGE_PARTITIONS, SecretKeyRef, StoragePartition,
};

/// Where a pod finds its cluster files: `<FDB_DIR>/<key>` for one cluster, or
/// `<FDB_DIR>/<index>/<key>` for partition `index`.
pub const FDB_DIR: &str = "/etc/courier/fdb";
/// Where the table's ConfigMap is mounted.
pub const TABLE_DIR: &str = "/etc/courier/partitions";
/// The table's key in its ConfigMap (and its file name under [`TABLE_DIR`]).
pub const TABLE_FILE: &str = "partitions.json";
/// The pod template annotation holding the SHA-256 of the table.
pub const TABLE_DIGEST_ANNOTATION: &str = "courier.dev/storage-partitions-sha256";

/// Why a cluster's FoundationDB storage cannot be rendered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StorageError {
    /// Neither form is given.
    #[error(
        "storage.foundationDb names no FoundationDB cluster: set clusterFileSecret, or \
         partitions (a shard range per cluster)"
    )]
    NoCluster,
    /// Both forms are given.
    #[error(
        "storage.foundationDb sets both clusterFileSecret and partitions: keep clusterFileSecret \
         for one FoundationDB cluster, or partitions for several"
    )]
    BothForms,
    /// More partitions than [`MAX_STORAGE_PARTITIONS`].
    #[error(
        "storage.foundationDb.partitions has {count} entries; at most {MAX_STORAGE_PARTITIONS}"
    )]
    TooMany {
        /// How many were given.
        count: usize,
    },
    /// A range ends before it starts.
    #[error(
        "storage.foundationDb.partitions[{index}]: firstShard {first} is greater than lastShard \
         {last}"
    )]
    Reversed {
        /// The partition.
        index: usize,
        /// Its first shard.
        first: u32,
        /// Its last shard.
        last: u32,
    },
    /// Shards between two ranges (or before the first) have no partition.
    #[error(
        "storage.foundationDb.partitions[{index}] starts at shard {first}, but shard {expected} \
         is next: shards {expected} to {} have no partition",
        first - 1
    )]
    Gap {
        /// The partition after the gap.
        index: usize,
        /// Its first shard.
        first: u32,
        /// The shard it should start at.
        expected: u32,
    },
    /// A range starts inside the one before it.
    #[error(
        "storage.foundationDb.partitions[{index}] starts at shard {first}, which partition \
         {} holds (it ends at {previous_last}): ranges must not overlap",
        index - 1
    )]
    Overlap {
        /// The partition that overlaps the one before it.
        index: usize,
        /// Its first shard.
        first: u32,
        /// The last shard of the one before it.
        previous_last: u32,
    },
    /// A range ends past the last shard.
    #[error(
        "storage.foundationDb.partitions[{index}] ends at shard {last}, beyond the last shard \
         ({}) of spec.shards {shards}",
        shards.saturating_sub(1)
    )]
    Beyond {
        /// The partition.
        index: usize,
        /// Its last shard.
        last: u32,
        /// `spec.shards`.
        shards: u32,
    },
    /// The ranges end before the last shard.
    #[error(
        "storage.foundationDb.partitions end at shard {last}: shards {} to {} have no partition \
         (spec.shards is {shards})",
        last + 1,
        shards - 1
    )]
    Short {
        /// The last shard of the last partition.
        last: u32,
        /// `spec.shards`.
        shards: u32,
    },
    /// Two partitions name the same cluster file: one FoundationDB cluster would hold both.
    #[error(
        "storage.foundationDb.partitions[{first}] and [{second}] both name Secret {} key {}: \
         each partition is a FoundationDB cluster of its own",
        secret.name,
        secret.key
    )]
    SameCluster {
        /// The first partition naming it.
        first: usize,
        /// The second.
        second: usize,
        /// The Secret key both name.
        secret: SecretKeyRef,
    },
}

/// Where the FoundationDB data is, once checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout<'a> {
    /// One cluster holds every shard.
    OneCluster(&'a SecretKeyRef),
    /// Storage partitions, partition 0 first.
    Partitions(&'a [StoragePartition]),
}

/// Checks `fdb` for a store of `shards` logical shards.
pub fn check(fdb: &FoundationDbStorage, shards: u32) -> Result<Layout<'_>, StorageError> {
    let partitions = &fdb.partitions[..];
    match (&fdb.cluster_file_secret, partitions.is_empty()) {
        (Some(secret), true) => return Ok(Layout::OneCluster(secret)),
        (Some(_), false) => return Err(StorageError::BothForms),
        (None, true) => return Err(StorageError::NoCluster),
        (None, false) => {}
    }
    if partitions.len() > MAX_STORAGE_PARTITIONS {
        return Err(StorageError::TooMany {
            count: partitions.len(),
        });
    }
    let mut expected = 0u32;
    for (index, partition) in partitions.iter().enumerate() {
        let (first, last) = (partition.first_shard, partition.last_shard);
        if first > last {
            return Err(StorageError::Reversed { index, first, last });
        }
        if first > expected {
            return Err(StorageError::Gap {
                index,
                first,
                expected,
            });
        }
        if first < expected {
            return Err(StorageError::Overlap {
                index,
                first,
                previous_last: expected - 1,
            });
        }
        if last >= shards {
            return Err(StorageError::Beyond {
                index,
                last,
                shards,
            });
        }
        if let Some(earlier) = partitions[..index]
            .iter()
            .position(|p| p.cluster_file_secret == partition.cluster_file_secret)
        {
            return Err(StorageError::SameCluster {
                first: earlier,
                second: index,
                secret: partition.cluster_file_secret.clone(),
            });
        }
        expected = last + 1;
    }
    if expected < shards {
        return Err(StorageError::Short {
            last: expected - 1,
            shards,
        });
    }
    Ok(Layout::Partitions(partitions))
}

/// The path of partition `index`'s cluster file in a pod.
pub fn cluster_file_path(index: usize, secret: &SecretKeyRef) -> String {
    format!("{FDB_DIR}/{index}/{}", secret.key)
}

/// The path of the table in a pod.
pub fn table_path() -> String {
    format!("{TABLE_DIR}/{TABLE_FILE}")
}

/// The name of `cluster`'s table ConfigMap.
pub fn config_map_name(cluster: &str) -> String {
    format!("{cluster}-storage-partitions")
}

#[derive(Serialize)]
struct TableFile {
    partitions: Vec<EntryFile>,
}

#[derive(Serialize)]
struct EntryFile {
    shards: (u32, u32),
    cluster_file: String,
}

/// The table as the data plane reads it (`courier_store::partitions::PartitionTable`).
pub fn table_json(partitions: &[StoragePartition]) -> String {
    let file = TableFile {
        partitions: partitions
            .iter()
            .enumerate()
            .map(|(index, p)| EntryFile {
                shards: (p.first_shard, p.last_shard),
                cluster_file: cluster_file_path(index, &p.cluster_file_secret),
            })
            .collect(),
    };
    // Serializing strings and integers cannot fail.
    serde_json::to_string_pretty(&file).unwrap_or_default() + "\n"
}

/// The SHA-256 of `table` in hex, for [`TABLE_DIGEST_ANNOTATION`].
pub fn digest(table: &str) -> String {
    Sha256::digest(table.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The table ConfigMap of `cluster`, if its FoundationDB storage has partitions.
pub fn config_map(cluster: &CourierCluster) -> Result<Option<ConfigMap>, RenderError> {
    let Some(fdb) = &cluster.spec.storage.foundation_db else {
        return Ok(None);
    };
    let Layout::Partitions(partitions) = check(fdb, cluster.spec.shards)? else {
        return Ok(None);
    };
    let (name, namespace) = name_and_namespace(cluster)?;
    let labels = BTreeMap::from([
        ("app.kubernetes.io/name".to_owned(), "courier".to_owned()),
        ("app.kubernetes.io/instance".to_owned(), name.clone()),
        (
            "app.kubernetes.io/component".to_owned(),
            "storage".to_owned(),
        ),
        (pod::MANAGED_BY.0.to_owned(), pod::MANAGED_BY.1.to_owned()),
    ]);
    Ok(Some(ConfigMap {
        metadata: ObjectMeta {
            name: Some(config_map_name(&name)),
            namespace: Some(namespace),
            labels: Some(labels),
            owner_references: Some(vec![owner_reference(cluster)?]),
            ..ObjectMeta::default()
        },
        data: Some(BTreeMap::from([(
            TABLE_FILE.to_owned(),
            table_json(partitions),
        )])),
        ..ConfigMap::default()
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::render::fixtures::{foundation_db_cluster, partitioned};

    fn secret(name: &str) -> SecretKeyRef {
        SecretKeyRef {
            name: name.into(),
            key: "fdb.cluster".into(),
        }
    }

    fn partition(first: u32, last: u32, name: &str) -> StoragePartition {
        StoragePartition {
            first_shard: first,
            last_shard: last,
            cluster_file_secret: secret(name),
        }
    }

    fn storage(partitions: Vec<StoragePartition>) -> FoundationDbStorage {
        FoundationDbStorage {
            cluster_file_secret: None,
            partitions,
            cluster_token_secret: secret("tok"),
        }
    }

    fn checked(partitions: Vec<StoragePartition>, shards: u32) -> Result<(), StorageError> {
        check(&storage(partitions), shards).map(drop)
    }

    #[test]
    fn contiguous_ranges_from_zero_to_the_last_shard_are_accepted() {
        assert_eq!(checked(vec![partition(0, 63, "a")], 64), Ok(()));
        assert_eq!(
            checked(
                vec![
                    partition(0, 0, "a"),
                    partition(1, 31, "b"),
                    partition(32, 63, "c")
                ],
                64
            ),
            Ok(())
        );
        let one = FoundationDbStorage {
            cluster_file_secret: Some(secret("fdb")),
            ..storage(Vec::new())
        };
        assert_eq!(check(&one, 64), Ok(Layout::OneCluster(&secret("fdb"))));
    }

    #[test]
    fn both_forms_or_neither_are_refused() {
        assert_eq!(checked(Vec::new(), 64), Err(StorageError::NoCluster));
        let both = FoundationDbStorage {
            cluster_file_secret: Some(secret("fdb")),
            ..storage(vec![partition(0, 63, "a")])
        };
        assert_eq!(check(&both, 64), Err(StorageError::BothForms));
    }

    #[test]
    fn a_gap_is_refused_naming_the_shards_without_a_partition() {
        let error = checked(vec![partition(0, 9, "a"), partition(12, 63, "b")], 64).unwrap_err();
        assert_eq!(
            error,
            StorageError::Gap {
                index: 1,
                first: 12,
                expected: 10
            }
        );
        assert!(
            error
                .to_string()
                .contains("shards 10 to 11 have no partition")
        );
        // The first range must start at 0: shard 0 is the directory's.
        assert!(matches!(
            checked(vec![partition(1, 63, "a")], 64),
            Err(StorageError::Gap { index: 0, .. })
        ));
    }

    #[test]
    fn overlapping_or_repeated_ranges_are_refused() {
        assert_eq!(
            checked(vec![partition(0, 31, "a"), partition(31, 63, "b")], 64),
            Err(StorageError::Overlap {
                index: 1,
                first: 31,
                previous_last: 31
            })
        );
        assert!(matches!(
            checked(vec![partition(0, 63, "a"), partition(0, 63, "b"),], 64),
            Err(StorageError::Overlap { index: 1, .. })
        ));
        // Out of order: the later range first.
        assert!(matches!(
            checked(vec![partition(32, 63, "a"), partition(0, 31, "b")], 64),
            Err(StorageError::Gap { index: 0, .. })
        ));
    }

    #[test]
    fn ranges_beyond_or_short_of_the_shard_count_are_refused() {
        let beyond = checked(vec![partition(0, 31, "a"), partition(32, 64, "b")], 64);
        assert_eq!(
            beyond,
            Err(StorageError::Beyond {
                index: 1,
                last: 64,
                shards: 64
            })
        );
        let short = checked(vec![partition(0, 31, "a"), partition(32, 62, "b")], 64);
        assert_eq!(
            short,
            Err(StorageError::Short {
                last: 62,
                shards: 64
            })
        );
        assert!(
            short
                .unwrap_err()
                .to_string()
                .contains("shards 63 to 63 have no partition")
        );
        // u32::MAX as a last shard overflows nothing.
        assert!(matches!(
            checked(vec![partition(0, u32::MAX, "a")], 64),
            Err(StorageError::Beyond { .. })
        ));
    }

    #[test]
    fn a_reversed_range_is_refused() {
        assert_eq!(
            checked(vec![partition(0, 31, "a"), partition(40, 32, "b")], 64),
            Err(StorageError::Reversed {
                index: 1,
                first: 40,
                last: 32
            })
        );
    }

    #[test]
    fn one_cluster_file_for_two_partitions_is_refused() {
        assert!(matches!(
            checked(vec![partition(0, 31, "a"), partition(32, 63, "a")], 64),
            Err(StorageError::SameCluster {
                first: 0,
                second: 1,
                ..
            })
        ));
        // The same Secret with another key is another cluster file.
        let mut other_key = partition(32, 63, "a");
        other_key.cluster_file_secret.key = "west.cluster".into();
        assert_eq!(checked(vec![partition(0, 31, "a"), other_key], 64), Ok(()));
    }

    #[test]
    fn more_partitions_than_the_limit_are_refused() {
        let many: Vec<StoragePartition> = (0..=MAX_STORAGE_PARTITIONS as u32)
            .map(|i| partition(i, i, &format!("p{i}")))
            .collect();
        assert_eq!(
            checked(many, 1024),
            Err(StorageError::TooMany {
                count: MAX_STORAGE_PARTITIONS + 1
            })
        );
    }

    #[test]
    fn the_table_names_each_partitions_mounted_cluster_file_in_order() {
        let cluster = partitioned(foundation_db_cluster(None));
        let map = config_map(&cluster).unwrap().unwrap();
        assert_eq!(
            map.metadata.name.as_deref(),
            Some("prod-storage-partitions")
        );
        assert_eq!(map.metadata.namespace.as_deref(), Some("chat"));
        let owner = &map.metadata.owner_references.as_ref().unwrap()[0];
        assert_eq!(
            (owner.kind.as_str(), owner.uid.as_str()),
            ("CourierCluster", "uid")
        );
        assert_eq!(owner.controller, Some(true));
        assert_eq!(
            map.data.unwrap()["partitions.json"],
            r#"{
  "partitions": [
    {
      "shards": [
        0,
        31
      ],
      "cluster_file": "/etc/courier/fdb/0/fdb.cluster"
    },
    {
      "shards": [
        32,
        63
      ],
      "cluster_file": "/etc/courier/fdb/1/west.cluster"
    }
  ]
}
"#
        );
    }

    #[test]
    fn one_cluster_file_or_embedded_storage_has_no_table() {
        assert_eq!(config_map(&foundation_db_cluster(None)).unwrap(), None);
    }

    #[test]
    fn a_bad_table_is_not_rendered() {
        let mut cluster = partitioned(foundation_db_cluster(None));
        cluster.spec.shards = 128;
        assert!(matches!(
            config_map(&cluster),
            Err(RenderError::Storage(StorageError::Short { .. }))
        ));
    }

    /// The data plane's own parser accepts what the operator renders, and reads the same
    /// ranges and cluster files.
    #[test]
    fn the_data_plane_accepts_the_rendered_table() {
        use courier_store::partitions::{PartitionStore, PartitionTable};
        let cluster = partitioned(foundation_db_cluster(None));
        let fdb = cluster.spec.storage.foundation_db.as_ref().unwrap();
        let table = PartitionTable::parse(&table_json(&fdb.partitions), 64).unwrap();
        let parsed: Vec<(u32, u32, PartitionStore)> = table
            .partitions()
            .iter()
            .map(|p| (*p.shards.start(), *p.shards.end(), p.store.clone()))
            .collect();
        assert_eq!(
            parsed,
            [
                (
                    0,
                    31,
                    PartitionStore::ClusterFile("/etc/courier/fdb/0/fdb.cluster".into())
                ),
                (
                    32,
                    63,
                    PartitionStore::ClusterFile("/etc/courier/fdb/1/west.cluster".into())
                ),
            ]
        );
        // And refuses it for another shard count, as the operator's check does.
        assert!(PartitionTable::parse(&table_json(&fdb.partitions), 128).is_err());
    }
}
