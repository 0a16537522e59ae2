//! What every data-plane pod of a cluster shares: labels, environment (secrets, storage),
//! volumes, ports, probes on `/healthz` (after a start of up to [`STARTUP_SECONDS`]) and
//! `/readyz`, `/metrics` on a port of its own ([`METRICS_PORT`]), JSON logs, a spread over
//! nodes and zones ([`SPREAD_OVER`]) and a locked-down security context (no service account
//! token either); the configuration file of the cluster's `configMap`, whose digest the
//! controllers put on the template ([`with_config_digest`]) as they read it.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMapVolumeSource, Container, ContainerPort, EmptyDirVolumeSource,
    EnvFromSource, EnvVar, EnvVarSource, HTTPGetAction, KeyToPath, Lifecycle, LifecycleHandler,
    LocalObjectReference, ObjectFieldSelector, PodSecurityContext, PodSpec, PodTemplateSpec, Probe,
    ResourceRequirements, SeccompProfile, SecretEnvSource, SecretKeySelector, SecretVolumeSource,
    SecurityContext, SleepAction, TopologySpreadConstraint, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use sha2::{Digest, Sha256};

use super::RenderError;
use super::partitions::{self, Layout};
use crate::crd::{CourierCluster, SecretKeyRef};

/// The port of the client API and the probes (a media pod's media endpoints).
pub const HTTP_PORT: i32 = 8080;
/// The port of `/metrics` (`--metrics-listen`), named `metrics`: apart from the client port,
/// which the client Service (and any route to it) opens to the internet, so that only the
/// cluster's network (the scraper, the gateway autoscaler) reads a pod's load and internals.
pub const METRICS_PORT: i32 = 9090;
/// The name of [`METRICS_PORT`] on the container: what the chart's PodMonitor scrapes.
pub const METRICS_PORT_NAME: &str = "metrics";
/// The port of the internal gRPC (sequencer appends, admin API).
pub const INTERNAL_PORT: i32 = 7500;
/// How long a pod may take to serve its probes as it starts (open the store, wait out the
/// registration of the process before it under the same node id, take its shards) before its
/// liveness counts: a startup probe on `/healthz`, every [`PROBE_PERIOD_SECONDS`].
pub const STARTUP_SECONDS: i32 = 300;
/// Seconds between two probes of a pod.
const PROBE_PERIOD_SECONDS: i32 = 5;
/// How long a probe waits for the answer. Kubernetes' default, 1 s, fails a healthy pod whose
/// answer waits behind a loaded runtime or a long accept queue, and restarted a busy one.
const PROBE_TIMEOUT_SECONDS: i32 = 5;
/// Failed liveness probes in a row before the pod is restarted: 30 s of them. A pod that only
/// answers slowly is taken out of its Service first ([`READINESS_FAILURES`]), which sheds its
/// new connections, rather than killed with every connection it holds.
const LIVENESS_FAILURES: i32 = 6;
/// Failed readiness probes in a row before the pod leaves its Service's endpoints (10 s): one
/// slow answer does not take a gateway out.
const READINESS_FAILURES: i32 = 2;
/// Where a pod keeps its data directory.
pub const DATA_DIR: &str = "/var/lib/courier";

/// The internal address a pod advertises when it is reached at its pod IP.
pub fn at_pod_ip() -> String {
    format!("$(POD_IP):{INTERNAL_PORT}")
}

/// The address of a pod's HTTP port at its pod IP (`--advertise-http`).
pub fn http_at_pod_ip() -> String {
    format!("$(POD_IP):{HTTP_PORT}")
}

/// `--metrics-listen` on [`METRICS_PORT`]: every data-plane pod's.
pub fn metrics_listen() -> [String; 2] {
    [
        "--metrics-listen".to_owned(),
        format!("0.0.0.0:{METRICS_PORT}"),
    ]
}

/// `courier node` arguments of a pod running `roles`, which the other nodes reach at
/// `advertise`, followed by `extra`.
pub fn node_args(roles: &str, advertise: String, extra: &[String]) -> Vec<String> {
    let mut args = vec![
        "node".to_owned(),
        "--roles".to_owned(),
        roles.to_owned(),
        "--node-id".to_owned(),
        "$(POD_NAME)".to_owned(),
        "--listen".to_owned(),
        format!("0.0.0.0:{HTTP_PORT}"),
    ];
    args.extend(metrics_listen());
    args.extend([
        "--internal-listen".to_owned(),
        format!("0.0.0.0:{INTERNAL_PORT}"),
        "--advertise".to_owned(),
        advertise,
    ]);
    args.extend_from_slice(extra);
    args
}
/// The user the data plane runs as (the images' non-root user).
const RUN_AS_USER: i64 = 10001;

/// Which part of a cluster a workload is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Component {
    /// `courier serve`: every role on the embedded store (one pod).
    Server,
    /// The gateway role: the client port (WebSocket and HTTP API).
    Gateway,
    /// The chat role, called by the gateways.
    Chat,
    /// The media role: the media endpoints, behind a Service of their own.
    Media,
    /// The sequencer role.
    Sequencer,
    /// The fanout role.
    Fanout,
    /// The push notifier (one pod per cluster).
    Push,
}

impl Component {
    /// The `app.kubernetes.io/component` label.
    pub fn as_str(self) -> &'static str {
        match self {
            Component::Server => "server",
            Component::Gateway => "gateway",
            Component::Chat => "chat",
            Component::Media => "media",
            Component::Sequencer => "sequencer",
            Component::Fanout => "fanout",
            Component::Push => "push",
        }
    }

    /// Whether its pods serve clients (and so verify client tokens).
    fn serves_clients(self) -> bool {
        matches!(
            self,
            Component::Server | Component::Gateway | Component::Media
        )
    }

    /// Whether its pods read and write media bytes.
    fn stores_media(self) -> bool {
        matches!(self, Component::Server | Component::Media)
    }

    /// Whether its pods send push notifications.
    fn pushes(self) -> bool {
        matches!(self, Component::Server | Component::Push)
    }

    /// What its pods ask for when the resource gives no `resources`: a request of CPU and
    /// memory, so that they are not BestEffort (the first evicted, or OOM-killed, when a node
    /// runs short), and no limit (a CPU limit throttles a pod on a node with idle cores).
    /// From docs/benchmarks.md and docs/operations.md: every role in one process (`courier
    /// serve`) peaks at 224-400 MB of RSS at the measured 1:1 peak, beside the embedded
    /// store's block and event caches (32 MiB each) and 64 MiB memtables; a gateway holds up
    /// to 256 MiB of pages (`--max-page-bytes-in-flight`) and ~7 KB per connection (3.8 KB
    /// plus the kernel's ~3 KiB, docs/capacity.md); a media upload up to three 5 MiB parts
    /// (`--media-uploads-in-flight` 64); the sequencer carries the commit path (~50k
    /// msgs/s per core, docs/capacity.md).
    fn default_requests(self) -> (&'static str, &'static str) {
        match self {
            Component::Server => ("500m", "512Mi"),
            Component::Gateway => ("250m", "512Mi"),
            Component::Sequencer => ("500m", "256Mi"),
            Component::Chat | Component::Fanout | Component::Media => ("250m", "256Mi"),
            Component::Push => ("50m", "64Mi"),
        }
    }

    /// [`Self::default_requests`] as a container's resources.
    fn default_resources(self) -> ResourceRequirements {
        let (cpu, memory) = self.default_requests();
        ResourceRequirements {
            requests: Some(BTreeMap::from([
                ("cpu".to_owned(), Quantity(cpu.to_owned())),
                ("memory".to_owned(), Quantity(memory.to_owned())),
            ])),
            ..Default::default()
        }
    }
}

/// The labels of a cluster's `component`: they select its pods.
pub fn selector_labels(cluster: &str, component: Component) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".to_owned(), "courier".to_owned()),
        ("app.kubernetes.io/instance".to_owned(), cluster.to_owned()),
        (
            "app.kubernetes.io/component".to_owned(),
            component.as_str().to_owned(),
        ),
    ])
}

/// The label every object the operator renders carries (through [`labels`]): the
/// controllers watch the workloads and ConfigMaps they own by it ([`managed_selector`]), so
/// that they hold and are woken by their own objects only, not every one in the namespace.
pub const MANAGED_BY: (&str, &str) = ("app.kubernetes.io/managed-by", "courier-operator");

/// The label selector of the objects the operator renders: [`MANAGED_BY`].
pub fn managed_selector() -> String {
    format!("{}={}", MANAGED_BY.0, MANAGED_BY.1)
}

/// The selector labels, and who manages the object ([`MANAGED_BY`]).
pub fn labels(cluster: &str, component: Component) -> BTreeMap<String, String> {
    let mut labels = selector_labels(cluster, component);
    labels.insert(MANAGED_BY.0.to_owned(), MANAGED_BY.1.to_owned());
    labels
}

/// A label selector matching the pods of a cluster's `component`.
pub fn selector(cluster: &str, component: Component) -> LabelSelector {
    LabelSelector {
        match_labels: Some(selector_labels(cluster, component)),
        ..LabelSelector::default()
    }
}

/// How a pod stops: a `preStop` sleep (endpoints are removed meanwhile), then SIGTERM and the
/// process's own drain, within the grace period.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shutdown {
    /// Seconds of the native `preStop` sleep.
    pub pre_stop_sleep_seconds: i64,
    /// `terminationGracePeriodSeconds`: the sleep, the drain and a margin.
    pub grace_seconds: i64,
}

/// Where a cluster's `configMap` is mounted in its pods, and the key its file is under.
pub const CONFIG_DIR: &str = "/etc/courier/config";
pub const CONFIG_FILE: &str = "courier.toml";
/// The pod template annotation holding the SHA-256 of the configuration file (the cluster's
/// `configMap`, key [`CONFIG_FILE`]) the pods were rendered for. The data plane reads the file
/// only as it starts, and a ConfigMap edited in place changes nothing in the template that
/// mounts it: without the digest, no pod would ever take the edit.
pub const CONFIG_DIGEST_ANNOTATION: &str = "courier.dev/config-sha256";

/// The SHA-256 of a configuration file, in hex, for [`CONFIG_DIGEST_ANNOTATION`].
pub fn config_digest(file: &[u8]) -> String {
    Sha256::digest(file)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A workload whose pods come from one template.
pub trait Workload {
    /// Its pod template, if it has a spec.
    fn pod_template_mut(&mut self) -> Option<&mut PodTemplateSpec>;
}

impl Workload for Deployment {
    fn pod_template_mut(&mut self) -> Option<&mut PodTemplateSpec> {
        self.spec.as_mut().map(|spec| &mut spec.template)
    }
}

impl Workload for StatefulSet {
    fn pod_template_mut(&mut self) -> Option<&mut PodTemplateSpec> {
        self.spec.as_mut().map(|spec| &mut spec.template)
    }
}

/// `workload` with the `digest` of its cluster's configuration file on its pod template
/// ([`CONFIG_DIGEST_ANNOTATION`]), so that a changed file changes the template and rolls the
/// pods as a new image would. Without a `configMap` (`None`), the template is left as it is.
pub fn with_config_digest<W: Workload>(mut workload: W, digest: Option<&str>) -> W {
    if let Some(digest) = digest
        && let Some(template) = workload.pod_template_mut()
    {
        template
            .metadata
            .get_or_insert_with(ObjectMeta::default)
            .annotations
            .get_or_insert_with(BTreeMap::new)
            .insert(CONFIG_DIGEST_ANNOTATION.to_owned(), digest.to_owned());
    }
    workload
}

/// A data-plane pod of `cluster` running `courier <args>` (the image's entry point is
/// `courier`). Refused if its FoundationDB storage does not pass [`partitions::check`].
pub fn template(
    cluster: &CourierCluster,
    component: Component,
    args: Vec<String>,
    resources: Option<ResourceRequirements>,
    shutdown: Shutdown,
) -> Result<PodTemplateSpec, RenderError> {
    let name = cluster_name(cluster);
    let spec = &cluster.spec;
    let mut env = vec![
        field_env("POD_NAME", "metadata.name"),
        field_env("POD_NAMESPACE", "metadata.namespace"),
        field_env("POD_IP", "status.podIP"),
        value_env("COURIER_SHARDS", &spec.shards.to_string()),
        value_env("COURIER_DATA_DIR", DATA_DIR),
    ];
    if component.serves_clients()
        && let Some(secret) = &spec.jwt_secret
    {
        env.push(secret_env("COURIER_JWT_SECRET", secret));
    }
    let mut env_from = Vec::new();
    // `data` is an emptyDir unless a volume claim template of that name replaces it.
    let mut volumes = vec![empty_dir("data"), empty_dir("tmp")];
    let mut mounts = vec![mount("data", DATA_DIR, false), mount("tmp", "/tmp", false)];
    let mut annotations = BTreeMap::new();
    if let Some(fdb) = &spec.storage.foundation_db {
        env.push(value_env("COURIER_STORE", "fdb"));
        match partitions::check(fdb, spec.shards)? {
            Layout::OneCluster(secret) => {
                env.push(value_env(
                    "COURIER_FDB_CLUSTER_FILE",
                    &format!("{}/{}", partitions::FDB_DIR, secret.key),
                ));
                volumes.push(secret_volume("fdb", secret));
                mounts.push(mount("fdb", partitions::FDB_DIR, true));
            }
            Layout::Partitions(table) => {
                env.push(value_env(
                    "COURIER_STORAGE_PARTITIONS",
                    &partitions::table_path(),
                ));
                for (index, partition) in table.iter().enumerate() {
                    let volume = format!("fdb-{index}");
                    volumes.push(secret_volume(&volume, &partition.cluster_file_secret));
                    mounts.push(mount(
                        &volume,
                        &format!("{}/{index}", partitions::FDB_DIR),
                        true,
                    ));
                }
                volumes.push(Volume {
                    name: "storage-partitions".to_owned(),
                    config_map: Some(ConfigMapVolumeSource {
                        name: partitions::config_map_name(&name),
                        optional: Some(false),
                        ..ConfigMapVolumeSource::default()
                    }),
                    ..Volume::default()
                });
                mounts.push(mount("storage-partitions", partitions::TABLE_DIR, true));
                // The data plane reads the table once, at start: a new table needs new pods.
                annotations.insert(
                    partitions::TABLE_DIGEST_ANNOTATION.to_owned(),
                    partitions::digest(&partitions::table_json(table)),
                );
            }
        }
        env.push(value_env(
            "COURIER_CLUSTER_TOKEN_FILE",
            &format!("/etc/courier/token/{}", fdb.cluster_token_secret.key),
        ));
        volumes.push(secret_volume("cluster-token", &fdb.cluster_token_secret));
        mounts.push(mount("cluster-token", "/etc/courier/token", true));
    }
    if let Some(media) = spec.media.as_ref().filter(|_| component.stores_media()) {
        env.push(value_env("COURIER_MEDIA_S3_BUCKET", &media.s3.bucket));
        env_from.push(secret_env_from(&media.s3.credentials_secret));
    }
    if let Some(push) = spec.push_secret.as_ref().filter(|_| component.pushes()) {
        env_from.push(secret_env_from(push));
        volumes.push(Volume {
            name: "push".to_owned(),
            secret: Some(SecretVolumeSource {
                secret_name: Some(push.clone()),
                ..SecretVolumeSource::default()
            }),
            ..Volume::default()
        });
        mounts.push(mount("push", "/etc/courier/push", true));
    }
    if let Some(config_map) = &spec.config_map {
        env.push(value_env(
            "COURIER_CONFIG",
            &format!("{CONFIG_DIR}/{CONFIG_FILE}"),
        ));
        volumes.push(Volume {
            name: "config".to_owned(),
            config_map: Some(ConfigMapVolumeSource {
                name: config_map.clone(),
                optional: Some(false),
                ..ConfigMapVolumeSource::default()
            }),
            ..Volume::default()
        });
        mounts.push(mount("config", CONFIG_DIR, true));
    }
    let mut ports = vec![
        port("http", HTTP_PORT),
        port(METRICS_PORT_NAME, METRICS_PORT),
    ];
    if component != Component::Server {
        ports.push(port("internal", INTERNAL_PORT));
    }
    let mut all_args = vec!["--log-format".to_owned(), "json".to_owned()];
    all_args.extend(args);
    let container = Container {
        name: "courier".to_owned(),
        image: Some(spec.image.clone()),
        args: Some(all_args),
        env: Some(env),
        env_from: (!env_from.is_empty()).then_some(env_from),
        ports: Some(ports),
        resources: Some(resources.unwrap_or_else(|| component.default_resources())),
        volume_mounts: Some(mounts),
        startup_probe: Some(probe("/healthz", STARTUP_SECONDS / PROBE_PERIOD_SECONDS)),
        liveness_probe: Some(probe("/healthz", LIVENESS_FAILURES)),
        readiness_probe: Some(probe("/readyz", READINESS_FAILURES)),
        lifecycle: Some(Lifecycle {
            pre_stop: Some(LifecycleHandler {
                sleep: Some(SleepAction {
                    seconds: shutdown.pre_stop_sleep_seconds,
                }),
                ..LifecycleHandler::default()
            }),
            ..Lifecycle::default()
        }),
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".to_owned()]),
                ..Capabilities::default()
            }),
            ..SecurityContext::default()
        }),
        ..Container::default()
    };
    Ok(PodTemplateSpec {
        metadata: Some(ObjectMeta {
            labels: Some(labels(&name, component)),
            annotations: (!annotations.is_empty()).then_some(annotations),
            ..ObjectMeta::default()
        }),
        spec: Some(PodSpec {
            containers: vec![container],
            volumes: Some(volumes),
            termination_grace_period_seconds: Some(shutdown.grace_seconds),
            topology_spread_constraints: Some(spread(&name, component)),
            image_pull_secrets: (!spec.image_pull_secrets.is_empty()).then(|| {
                spec.image_pull_secrets
                    .iter()
                    .map(|secret| LocalObjectReference {
                        name: secret.name.clone(),
                    })
                    .collect()
            }),
            priority_class_name: spec.priority_class_name.clone(),
            enable_service_links: Some(false),
            // The data plane never calls the Kubernetes API: a pod facing the internet holds
            // no token of the namespace's default service account.
            automount_service_account_token: Some(false),
            security_context: Some(PodSecurityContext {
                run_as_non_root: Some(true),
                run_as_user: Some(RUN_AS_USER),
                run_as_group: Some(RUN_AS_USER),
                fs_group: Some(RUN_AS_USER),
                seccomp_profile: Some(SeccompProfile {
                    type_: "RuntimeDefault".to_owned(),
                    ..SeccompProfile::default()
                }),
                ..PodSecurityContext::default()
            }),
            ..PodSpec::default()
        }),
    })
}

/// The node labels over which the pods of a component are spread: hosts, and zones where the
/// nodes have them. One node's (or zone's) loss, which no PodDisruptionBudget covers, then
/// takes a share of the sequencers or gateways rather than all of them, whose shards or
/// connections would all fail over at once.
const SPREAD_OVER: [&str; 2] = ["kubernetes.io/hostname", "topology.kubernetes.io/zone"];

/// The pods of `cluster`'s `component` spread over [`SPREAD_OVER`], as a preference
/// (`ScheduleAnyway`): a cluster of one node, a full node or nodes without zones still run
/// every pod.
fn spread(cluster: &str, component: Component) -> Vec<TopologySpreadConstraint> {
    SPREAD_OVER
        .iter()
        .map(|key| TopologySpreadConstraint {
            max_skew: 1,
            topology_key: (*key).to_owned(),
            when_unsatisfiable: "ScheduleAnyway".to_owned(),
            label_selector: Some(selector(cluster, component)),
            ..TopologySpreadConstraint::default()
        })
        .collect()
}

/// The cluster's name (empty for an object not read from the API).
pub fn cluster_name(cluster: &CourierCluster) -> String {
    cluster.metadata.name.clone().unwrap_or_default()
}

fn field_env(name: &str, path: &str) -> EnvVar {
    EnvVar {
        name: name.to_owned(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: path.to_owned(),
                ..ObjectFieldSelector::default()
            }),
            ..EnvVarSource::default()
        }),
        ..EnvVar::default()
    }
}

fn secret_env(name: &str, secret: &SecretKeyRef) -> EnvVar {
    EnvVar {
        name: name.to_owned(),
        value_from: Some(EnvVarSource {
            secret_key_ref: Some(SecretKeySelector {
                name: secret.name.clone(),
                key: secret.key.clone(),
                optional: Some(false),
            }),
            ..EnvVarSource::default()
        }),
        ..EnvVar::default()
    }
}

fn value_env(name: &str, value: &str) -> EnvVar {
    EnvVar {
        name: name.to_owned(),
        value: Some(value.to_owned()),
        ..EnvVar::default()
    }
}

fn secret_env_from(secret: &str) -> EnvFromSource {
    EnvFromSource {
        secret_ref: Some(SecretEnvSource {
            name: secret.to_owned(),
            optional: Some(false),
        }),
        ..EnvFromSource::default()
    }
}

fn empty_dir(name: &str) -> Volume {
    Volume {
        name: name.to_owned(),
        empty_dir: Some(EmptyDirVolumeSource::default()),
        ..Volume::default()
    }
}

fn secret_volume(name: &str, secret: &SecretKeyRef) -> Volume {
    Volume {
        name: name.to_owned(),
        secret: Some(SecretVolumeSource {
            secret_name: Some(secret.name.clone()),
            items: Some(vec![KeyToPath {
                key: secret.key.clone(),
                path: secret.key.clone(),
                ..KeyToPath::default()
            }]),
            ..SecretVolumeSource::default()
        }),
        ..Volume::default()
    }
}

fn mount(name: &str, path: &str, read_only: bool) -> VolumeMount {
    VolumeMount {
        name: name.to_owned(),
        mount_path: path.to_owned(),
        read_only: Some(read_only),
        ..VolumeMount::default()
    }
}

fn port(name: &str, number: i32) -> ContainerPort {
    ContainerPort {
        name: Some(name.to_owned()),
        container_port: number,
        protocol: Some("TCP".to_owned()),
        ..ContainerPort::default()
    }
}

fn probe(path: &str, failure_threshold: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.to_owned()),
            port: IntOrString::String("http".to_owned()),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(PROBE_PERIOD_SECONDS),
        timeout_seconds: Some(PROBE_TIMEOUT_SECONDS),
        failure_threshold: Some(failure_threshold),
        ..Probe::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{
        CourierClusterSpec, EmbeddedStorage, FoundationDbStorage, MediaStore, S3MediaStore, Storage,
    };

    fn cluster(foundation_db: bool) -> CourierCluster {
        let secret = |name: &str, key: &str| SecretKeyRef {
            name: name.into(),
            key: key.into(),
        };
        CourierCluster::new(
            "prod",
            CourierClusterSpec {
                image: "courier:1".into(),
                image_pull_secrets: Vec::new(),
                priority_class_name: None,
                storage: Storage {
                    embedded: (!foundation_db).then(|| EmbeddedStorage {
                        size: "1Gi".into(),
                        storage_class_name: None,
                    }),
                    foundation_db: foundation_db.then(|| FoundationDbStorage {
                        cluster_file_secret: Some(secret("fdb", "fdb.cluster")),
                        partitions: Vec::new(),
                        cluster_token_secret: secret("tok", "token"),
                    }),
                },
                jwt_secret: Some(secret("jwt", "secret")),
                media: foundation_db.then(|| MediaStore {
                    s3: S3MediaStore {
                        bucket: "media".into(),
                        credentials_secret: "s3".into(),
                    },
                    pods: Default::default(),
                }),
                push_secret: Some("push".into()),
                config_map: None,
                shards: 64,
                gateways: Default::default(),
                sequencers: Default::default(),
                fanout: Default::default(),
                chat: Default::default(),
            },
        )
    }

    const SHUTDOWN: Shutdown = Shutdown {
        pre_stop_sleep_seconds: 3,
        grace_seconds: 30,
    };

    fn env(template: &PodTemplateSpec) -> BTreeMap<String, EnvVar> {
        let container = &template.spec.as_ref().unwrap().containers[0];
        container
            .env
            .clone()
            .unwrap()
            .into_iter()
            .map(|e| (e.name.clone(), e))
            .collect()
    }

    fn value(env: &BTreeMap<String, EnvVar>, name: &str) -> Option<String> {
        env.get(name).and_then(|e| e.value.clone())
    }

    #[test]
    fn a_foundationdb_pod_gets_the_cluster_file_and_token_as_mounted_files_and_media_in_s3() {
        let template = template(&cluster(true), Component::Media, vec![], None, SHUTDOWN).unwrap();
        let env = env(&template);
        assert_eq!(value(&env, "COURIER_STORE").as_deref(), Some("fdb"));
        assert_eq!(
            value(&env, "COURIER_FDB_CLUSTER_FILE").as_deref(),
            Some("/etc/courier/fdb/fdb.cluster")
        );
        assert_eq!(
            value(&env, "COURIER_CLUSTER_TOKEN_FILE").as_deref(),
            Some("/etc/courier/token/token")
        );
        assert_eq!(
            value(&env, "COURIER_MEDIA_S3_BUCKET").as_deref(),
            Some("media")
        );
        assert_eq!(value(&env, "COURIER_SHARDS").as_deref(), Some("64"));
        let jwt = env["COURIER_JWT_SECRET"].value_from.as_ref().unwrap();
        assert_eq!(jwt.secret_key_ref.as_ref().unwrap().name, "jwt");
        let spec = template.spec.unwrap();
        let container = &spec.containers[0];
        let mounts: Vec<&str> = container
            .volume_mounts
            .iter()
            .flatten()
            .map(|m| m.mount_path.as_str())
            .collect();
        for path in ["/etc/courier/fdb", "/etc/courier/token", DATA_DIR] {
            assert!(mounts.contains(&path), "{path} in {mounts:?}");
        }
        let from: Vec<String> = container
            .env_from
            .iter()
            .flatten()
            .filter_map(|e| e.secret_ref.as_ref().map(|s| s.name.clone()))
            .collect();
        assert_eq!(from, ["s3"]);
        assert_eq!(spec.termination_grace_period_seconds, Some(30));
        let ports: Vec<i32> = container
            .ports
            .iter()
            .flatten()
            .map(|p| p.container_port)
            .collect();
        assert_eq!(ports, [HTTP_PORT, METRICS_PORT, INTERNAL_PORT]);
    }

    /// A cluster's `configMap` is every data-plane pod's configuration file: mounted read-only
    /// and named by `COURIER_CONFIG`, in the embedded server's pod and in each role's. Without
    /// one, no pod names a file.
    #[test]
    fn a_clusters_config_map_is_the_configuration_file_of_every_pod() {
        let mut tuned = cluster(true);
        tuned.spec.config_map = Some("courier-tuning".into());
        let mut embedded = cluster(false);
        embedded.spec.config_map = Some("courier-tuning".into());
        let pods = [
            (&tuned, Component::Gateway),
            (&tuned, Component::Sequencer),
            (&tuned, Component::Media),
            (&embedded, Component::Server),
        ];
        for (cluster, component) in pods {
            let template = template(cluster, component, vec![], None, SHUTDOWN).unwrap();
            let env = env(&template);
            assert_eq!(
                value(&env, "COURIER_CONFIG").as_deref(),
                Some("/etc/courier/config/courier.toml"),
                "{component:?}"
            );
            let spec = template.spec.unwrap();
            let volume = spec.volumes.iter().flatten().find(|v| v.name == "config");
            let source = volume.and_then(|v| v.config_map.as_ref()).unwrap();
            assert_eq!(source.name, "courier-tuning");
            let mount = spec.containers[0]
                .volume_mounts
                .iter()
                .flatten()
                .find(|m| m.name == "config")
                .unwrap();
            assert_eq!(
                (mount.mount_path.as_str(), mount.read_only),
                (CONFIG_DIR, Some(true))
            );
        }
        let plain = template(&cluster(true), Component::Gateway, vec![], None, SHUTDOWN).unwrap();
        assert_eq!(value(&env(&plain), "COURIER_CONFIG"), None);
    }

    /// The data plane never calls the Kubernetes API: no pod gets a service account token,
    /// which a gateway or media pod (both face the internet) would otherwise hold, with
    /// whatever the namespace's default service account may do.
    #[test]
    fn no_pod_gets_a_service_account_token() {
        for (cluster, component) in [
            (cluster(false), Component::Server),
            (cluster(true), Component::Gateway),
            (cluster(true), Component::Chat),
            (cluster(true), Component::Media),
            (cluster(true), Component::Sequencer),
            (cluster(true), Component::Fanout),
            (cluster(true), Component::Push),
        ] {
            let template = template(&cluster, component, vec![], None, SHUTDOWN).unwrap();
            let spec = template.spec.unwrap();
            assert_eq!(
                spec.automount_service_account_token,
                Some(false),
                "{component:?}"
            );
        }
    }

    /// Without `jwtSecret` (tokens verified with the key set the configMap names), no pod
    /// gets a token secret, the gateway's neither.
    #[test]
    fn a_cluster_without_a_token_secret_gives_its_pods_none() {
        let mut cluster = cluster(true);
        cluster.spec.jwt_secret = None;
        cluster.spec.config_map = Some("courier-config".into());
        for component in [Component::Gateway, Component::Media] {
            let template = template(&cluster, component, vec![], None, SHUTDOWN).unwrap();
            assert!(
                !env(&template).contains_key("COURIER_JWT_SECRET"),
                "{component:?}"
            );
        }
    }

    /// What a pod of each component gets: (client token secret, S3 media, push Secret).
    #[test]
    fn each_pod_gets_only_the_secrets_its_role_needs() {
        for (component, jwt, s3, push) in [
            (Component::Gateway, true, false, false),
            (Component::Chat, false, false, false),
            (Component::Media, true, true, false),
            (Component::Push, false, false, true),
            (Component::Sequencer, false, false, false),
            (Component::Fanout, false, false, false),
        ] {
            let template = template(&cluster(true), component, vec![], None, SHUTDOWN).unwrap();
            let env = env(&template);
            assert_eq!(env.contains_key("COURIER_JWT_SECRET"), jwt, "{component:?}");
            assert_eq!(
                env.contains_key("COURIER_MEDIA_S3_BUCKET"),
                s3,
                "{component:?}"
            );
            assert!(
                env.contains_key("COURIER_FDB_CLUSTER_FILE"),
                "{component:?}"
            );
            let container = &template.spec.as_ref().unwrap().containers[0];
            let from: Vec<String> = container
                .env_from
                .iter()
                .flatten()
                .filter_map(|e| e.secret_ref.as_ref().map(|s| s.name.clone()))
                .collect();
            let expected: Vec<&str> = [(s3, "s3"), (push, "push")]
                .into_iter()
                .filter_map(|(on, name)| on.then_some(name))
                .collect();
            assert_eq!(from, expected, "{component:?}");
            let mounts: Vec<&str> = container
                .volume_mounts
                .iter()
                .flatten()
                .map(|m| m.mount_path.as_str())
                .collect();
            assert_eq!(mounts.contains(&"/etc/courier/push"), push, "{component:?}");
        }
    }

    #[test]
    fn an_embedded_pod_has_no_foundationdb_settings_and_no_internal_port() {
        let template =
            template(&cluster(false), Component::Server, vec![], None, SHUTDOWN).unwrap();
        let env = env(&template);
        assert!(!env.contains_key("COURIER_STORE"));
        assert!(!env.contains_key("COURIER_FDB_CLUSTER_FILE"));
        let container = &template.spec.as_ref().unwrap().containers[0];
        let ports: Vec<i32> = container
            .ports
            .iter()
            .flatten()
            .map(|p| p.container_port)
            .collect();
        assert_eq!(ports, [HTTP_PORT, METRICS_PORT]);
        assert_eq!(
            container.args.as_deref(),
            Some(&["--log-format".to_owned(), "json".to_owned()][..])
        );
    }

    fn mounts(template: &PodTemplateSpec) -> Vec<(String, String)> {
        let container = &template.spec.as_ref().unwrap().containers[0];
        container
            .volume_mounts
            .iter()
            .flatten()
            .map(|m| (m.name.clone(), m.mount_path.clone()))
            .collect()
    }

    fn volumes(template: &PodTemplateSpec) -> BTreeMap<String, Volume> {
        template
            .spec
            .as_ref()
            .unwrap()
            .volumes
            .iter()
            .flatten()
            .map(|v| (v.name.clone(), v.clone()))
            .collect()
    }

    #[test]
    fn one_cluster_file_is_mounted_as_before_with_no_table() {
        let template = template(&cluster(true), Component::Chat, vec![], None, SHUTDOWN).unwrap();
        let env = env(&template);
        assert!(!env.contains_key("COURIER_STORAGE_PARTITIONS"));
        let mounts = mounts(&template);
        let storage: Vec<&(String, String)> = mounts
            .iter()
            .filter(|(_, path)| path.starts_with("/etc/courier/"))
            .collect();
        assert_eq!(
            storage,
            [
                &("fdb".to_owned(), "/etc/courier/fdb".to_owned()),
                &("cluster-token".to_owned(), "/etc/courier/token".to_owned())
            ]
        );
        let volumes = volumes(&template);
        let fdb = volumes["fdb"].secret.as_ref().unwrap();
        assert_eq!(fdb.secret_name.as_deref(), Some("fdb"));
        assert_eq!(fdb.items.as_ref().unwrap()[0].key, "fdb.cluster");
        assert_eq!(template.metadata.unwrap().annotations, None);
    }

    #[test]
    fn partitioned_pods_mount_each_partitions_secret_and_the_table() {
        let cluster = crate::render::fixtures::partitioned(cluster(true));
        for component in [
            Component::Gateway,
            Component::Chat,
            Component::Media,
            Component::Push,
            Component::Sequencer,
            Component::Fanout,
        ] {
            let template = template(&cluster, component, vec![], None, SHUTDOWN).unwrap();
            let env = env(&template);
            assert_eq!(value(&env, "COURIER_STORE").as_deref(), Some("fdb"));
            assert_eq!(
                value(&env, "COURIER_STORAGE_PARTITIONS").as_deref(),
                Some("/etc/courier/partitions/partitions.json"),
                "{component:?}"
            );
            // The data plane refuses a cluster file given with a table.
            assert!(!env.contains_key("COURIER_FDB_CLUSTER_FILE"));
            assert_eq!(
                value(&env, "COURIER_CLUSTER_TOKEN_FILE").as_deref(),
                Some("/etc/courier/token/token")
            );
            let mounts = mounts(&template);
            for (name, path) in [
                ("fdb-0", "/etc/courier/fdb/0"),
                ("fdb-1", "/etc/courier/fdb/1"),
                ("storage-partitions", "/etc/courier/partitions"),
                ("cluster-token", "/etc/courier/token"),
            ] {
                assert!(
                    mounts.contains(&(name.to_owned(), path.to_owned())),
                    "{name} at {path} in {mounts:?}"
                );
            }
            assert!(!mounts.iter().any(|(name, _)| name == "fdb"));
            let volumes = volumes(&template);
            for (volume, secret, key) in [
                ("fdb-0", "fdb-east", "fdb.cluster"),
                ("fdb-1", "fdb-west", "west.cluster"),
            ] {
                let source = volumes[volume].secret.as_ref().unwrap();
                assert_eq!(source.secret_name.as_deref(), Some(secret));
                let item = &source.items.as_ref().unwrap()[0];
                assert_eq!((item.key.as_str(), item.path.as_str()), (key, key));
            }
            let table = volumes["storage-partitions"].config_map.as_ref().unwrap();
            assert_eq!(table.name, "prod-storage-partitions");
        }
    }

    #[test]
    fn a_changed_table_changes_the_pod_template() {
        let digest = |cluster: &CourierCluster| {
            let template = template(cluster, Component::Sequencer, vec![], None, SHUTDOWN).unwrap();
            template.metadata.unwrap().annotations.unwrap()[partitions::TABLE_DIGEST_ANNOTATION]
                .clone()
        };
        let before = crate::render::fixtures::partitioned(cluster(true));
        let mut after = before.clone();
        let fdb = after.spec.storage.foundation_db.as_mut().unwrap();
        fdb.partitions[0].last_shard = 15;
        fdb.partitions[1].first_shard = 16;
        assert_ne!(digest(&before), digest(&after));
        assert_eq!(digest(&before), digest(&before.clone()));
    }

    #[test]
    fn no_pod_is_rendered_for_a_bad_table() {
        let mut cluster = crate::render::fixtures::partitioned(cluster(true));
        let fdb = cluster.spec.storage.foundation_db.as_mut().unwrap();
        fdb.partitions[1].first_shard = 33;
        let refused = template(&cluster, Component::Gateway, vec![], None, SHUTDOWN);
        assert!(matches!(
            refused,
            Err(RenderError::Storage(partitions::StorageError::Gap { .. }))
        ));
    }
}
