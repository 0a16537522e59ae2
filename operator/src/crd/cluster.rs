//! `CourierCluster`: one Courier deployment. It names the data plane's image, its storage and
//! its secrets, and owns the pools that run it: with embedded storage, one `courier serve`
//! pod (a development install); with FoundationDB, a [`GatewayPool`] and a
//! [`SequencerShardSet`] that the operator creates from `gateways` and `sequencers`.
//!
//! [`GatewayPool`]: super::GatewayPool
//! [`SequencerShardSet`]: super::SequencerShardSet

use super::gateway_pool::GatewayPoolSettings;
use super::shard_set::SequencerSettings;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A Courier deployment.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "courier.dev",
    version = "v1alpha1",
    kind = "CourierCluster",
    namespaced,
    status = "CourierClusterStatus",
    shortname = "courier",
    category = "courier",
    doc = "A Courier deployment: image, storage, secrets; owns its GatewayPool and SequencerShardSet.",
    printcolumn = r#"{"name": "Storage", "type": "string", "jsonPath": ".status.storage"}"#,
    printcolumn = r#"{"name": "Shards", "type": "integer", "jsonPath": ".spec.shards"}"#,
    printcolumn = r#"{"name": "Ready", "type": "string", "jsonPath": ".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}"#,
    // `render::sequencers::MAX_STATEFUL_SET_NAME`: the embedded StatefulSet takes the
    // cluster's name, a FoundationDB cluster's shard set `<cluster>-sequencers`.
    validation = Rule::new("size(self.metadata.name) <= (has(self.spec.storage.embedded) ? 52 : 41)").message("metadata.name is too long: at most 41 characters (52 with storage.embedded), or Kubernetes creates no pod of the cluster's StatefulSet (its pods' controller-revision-hash label would pass 63 characters)")
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.storage.embedded) || has(self.media)").message("a FoundationDB cluster runs several pods that must share media: set media.s3"))]
#[x_kube(validation = Rule::new("has(self.jwtSecret) || has(self.configMap) || has(self.storage.embedded)").message("a FoundationDB cluster's gateway pods must verify client tokens alike: set jwtSecret, or a configMap whose courier.toml names your identity provider's key set (jwt-jwks-url)"))]
pub struct CourierClusterSpec {
    /// The data plane's container image (the `courier` binary), e.g.
    /// `ghcr.io/courier-chat/courier:0.1.0`.
    #[schemars(length(min = 1))]
    pub image: String,
    /// Secrets (`kubernetes.io/dockerconfigjson`) in the cluster's namespace with the
    /// credentials of the registry of `image`: every data-plane pod's `imagePullSecrets`. At
    /// most 16 (the admission policy on the Secrets a cluster names reads each).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub image_pull_secrets: Vec<SecretRef>,
    /// The PriorityClass of every data-plane pod: with one above the cluster's other
    /// workloads, the scheduler preempts those to place a Courier pod, and a node short of
    /// memory evicts them first. Without it, the cluster's default priority (usually 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub priority_class_name: Option<String>,
    /// Where messages are kept: `embedded` (one pod, a development install) or `foundationDb`.
    pub storage: Storage,
    /// The Secret key holding the client token (JWT HS256) secret; the gateway and media pods
    /// verify client tokens with it. Optional when the `configMap`'s `courier.toml` names
    /// your identity provider's key set (`jwt-jwks-url`, docs/operator.md "Tokens from your
    /// identity provider"; with both, the tokens of each are taken, while clients move to the
    /// provider's), and with embedded storage, whose pod then generates a secret in its
    /// volume (`courier token` run in the pod mints tokens with it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwt_secret: Option<SecretKeyRef>,
    /// Where media bytes go, and (FoundationDB storage) how many media pods serve them
    /// (`replicas`, default 2) with which `resources`. Without it they stay on the pod's
    /// volume, which only an embedded (single-pod) cluster may do.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media: Option<MediaStore>,
    /// A Secret whose keys are push provider settings as `COURIER_*` environment variables
    /// (e.g. `COURIER_FCM_PROJECT`, `COURIER_PUSH_WEBHOOK_URL`); it is also mounted at
    /// `/etc/courier/push` for key files (`COURIER_APNS_KEY_FILE=/etc/courier/push/apns.p8`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub push_secret: Option<String>,
    /// A ConfigMap whose key `courier.toml` is a configuration file for every data-plane pod
    /// (`--config`, docs/operations.md "Configuration file"): the data plane's limits, rate
    /// limits and timeouts, each flag by its long name as `courier node --help` lists it
    /// (`courier serve --help` with embedded storage).
    /// What the operator sets itself (addresses, storage, ports, node ids) wins over the
    /// file. Pods read it as they start, so their templates carry its digest: an edit in
    /// place rolls them as a new image would (sequencer pods as each is deleted). A missing
    /// ConfigMap, or one without `courier.toml`, rolls nothing out and is named in the status.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_map: Option<String>,
    /// Logical sequencer shards, fixed when the store is created (it cannot change later).
    #[serde(default = "default_shards")]
    #[schemars(range(min = 1, max = 65536))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("shards is immutable: the store was created with this many logical shards"))]
    pub shards: u32,
    /// The gateway pods (FoundationDB storage). With embedded storage only the client
    /// Service's settings apply (`serviceType`, `port`, `nodePort`), to the one pod's Service.
    #[serde(default)]
    pub gateways: GatewayPoolSettings,
    /// The sequencer pods (FoundationDB storage only).
    #[serde(default)]
    pub sequencers: SequencerSettings,
    /// The fanout pods (FoundationDB storage only): they deliver committed events to the
    /// gateways holding the recipients, the shards' outboxes split evenly between them. Their
    /// `resources` also size the push notifier's pod.
    #[serde(default)]
    pub fanout: WorkloadSettings,
    /// The chat pods (FoundationDB storage only): they validate what clients ask, enforce
    /// membership and rate limits, and have messages sequenced, for the gateway pods.
    #[serde(default)]
    pub chat: WorkloadSettings,
}

/// The pods of a stateless workload: any number of them share its work.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadSettings {
    /// How many pods.
    #[serde(default = "default_workload_replicas")]
    #[schemars(range(min = 1, max = 1000))]
    pub replicas: i32,
    /// CPU and memory of each pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<k8s_openapi::api::core::v1::ResourceRequirements>,
}

impl Default for WorkloadSettings {
    fn default() -> Self {
        Self {
            replicas: default_workload_replicas(),
            resources: None,
        }
    }
}

fn default_workload_replicas() -> i32 {
    2
}

fn default_shards() -> u32 {
    1024
}

/// Exactly one storage, of a kind fixed once the cluster is created.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.embedded) != has(self.foundationDb)").message("set exactly one of storage.embedded (one pod, development) or storage.foundationDb (production)"))]
#[x_kube(validation = Rule::new("has(self.embedded) == has(oldSelf.embedded)").message("storage cannot switch between embedded and foundationDb: the messages would stay behind in the old store"))]
pub struct Storage {
    /// The embedded engine on a persistent volume of one `courier serve` pod. Fixed once set:
    /// the volume is the StatefulSet's claim template, which Kubernetes refuses to change.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self == oldSelf").message("storage.embedded (size, storageClassName) is immutable: the StatefulSet's volume claim cannot change; to grow the volume, expand the PersistentVolumeClaim data-<cluster>-0 itself"))]
    pub embedded: Option<EmbeddedStorage>,
    /// A FoundationDB cluster every pod reaches.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub foundation_db: Option<FoundationDbStorage>,
}

/// The embedded engine on a volume.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EmbeddedStorage {
    /// Size of the volume claim, e.g. `10Gi`.
    #[serde(default = "default_volume_size")]
    #[schemars(regex(pattern = r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|Pi|k|M|G|T|P)?$"))]
    pub size: String,
    /// The storage class of the claim (default: the cluster's default class).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_class_name: Option<String>,
}

fn default_volume_size() -> String {
    "10Gi".to_owned()
}

/// The most storage partitions a cluster may have: each is a Secret volume in every data-plane
/// pod, and a read across partitions (a user's conversations at connect) asks every one.
pub const MAX_STORAGE_PARTITIONS: usize = 32;

/// FoundationDB: one cluster (`clusterFileSecret`), or several, each holding a range of the
/// logical shards (`partitions`, `docs/decisions/0005-storage-partitions.md`); and the token
/// the Courier pods share.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.clusterFileSecret) != (has(self.partitions) && size(self.partitions) > 0)").message("set exactly one of clusterFileSecret (one FoundationDB cluster) or partitions (a shard range on each of several clusters)"))]
#[x_kube(validation = Rule::new("!has(self.partitions) || size(self.partitions) == 0 || self.partitions[0].firstShard == 0").message("partitions[0] (the directory) must start at shard 0"))]
pub struct FoundationDbStorage {
    /// The Secret key holding the FoundationDB cluster file (`fdb.cluster`) of the one
    /// cluster that holds every shard.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster_file_secret: Option<SecretKeyRef>,
    /// Storage partitions, instead of `clusterFileSecret`: each a range of shards and the
    /// cluster file of the FoundationDB cluster holding it. The ranges run from shard 0 to
    /// `shards - 1` in order, once each; the first entry (partition 0) also holds the
    /// directory (nodes, routes, devices, cursors, media records). The table is fixed when
    /// the store is created: pods given another one refuse to start.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = MAX_STORAGE_PARTITIONS))]
    pub partitions: Vec<StoragePartition>,
    /// The Secret key holding the cluster token (at least 32 bytes) that authenticates the
    /// pods' internal gRPC to each other.
    pub cluster_token_secret: SecretKeyRef,
}

/// A storage partition: a range of logical shards on one FoundationDB cluster.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.firstShard <= self.lastShard").message("firstShard must not be greater than lastShard"))]
pub struct StoragePartition {
    /// The first shard of the range.
    #[schemars(range(max = 65535))]
    pub first_shard: u32,
    /// The last shard of the range (inclusive).
    #[schemars(range(max = 65535))]
    pub last_shard: u32,
    /// The Secret key holding the cluster file of the FoundationDB cluster of this range.
    pub cluster_file_secret: SecretKeyRef,
}

/// A key of a Secret in the cluster's namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    /// The Secret's name.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// The key in the Secret.
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
}

/// A Secret in the cluster's namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretRef {
    /// The Secret's name.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

/// Object storage for media, and (FoundationDB storage only) the media pods serving it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MediaStore {
    /// An S3-compatible bucket.
    pub s3: S3MediaStore,
    /// The media pods.
    #[serde(flatten)]
    pub pods: WorkloadSettings,
}

/// An S3-compatible bucket for media.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct S3MediaStore {
    /// The bucket's name.
    #[schemars(length(min = 3, max = 63))]
    pub bucket: String,
    /// A Secret with the bucket's credentials as environment variables (`AWS_ACCESS_KEY_ID`,
    /// `AWS_SECRET_ACCESS_KEY`, and optionally `AWS_REGION`, `AWS_ENDPOINT`).
    pub credentials_secret: String,
}

/// What the operator last saw of a cluster.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", remote = "Self")]
// Read with `stored::salvage` (the `Deserialize` of `salvaged!`); named as ever in schemas.
#[schemars(rename = "CourierClusterStatus")]
pub struct CourierClusterStatus {
    /// The generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `embedded` or `foundationDb`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage: Option<String>,
    /// Ready, Progressing, Degraded.
    #[serde(default)]
    pub conditions: Vec<Condition>,
    /// What of the stored status could not be read (`stored`); never written.
    #[serde(skip)]
    pub unreadable: Vec<String>,
}

impl Storage {
    /// The storage's name as shown in the status: `embedded` or `foundationDb`.
    pub fn kind_name(&self) -> &'static str {
        if self.embedded.is_some() {
            "embedded"
        } else {
            "foundationDb"
        }
    }
}
