//! Pure builders of the objects the operator applies: from a resource (and what was observed),
//! the exact Kubernetes objects it should own. No I/O: every builder is unit-tested on its
//! output, and the controllers only apply what these return.
//!
//! - [`embedded`]: an embedded-storage cluster is one `courier serve` StatefulSet with a volume;
//! - [`pools`]: a FoundationDB cluster owns a `GatewayPool` and a `SequencerShardSet`;
//! - [`gateways`]: a pool's Deployment (the client port), client Service and PDB;
//! - [`sequencers`]: a shard set's StatefulSet (`OnDelete`), headless Service and PDB;
//! - [`backends`]: a FoundationDB cluster's chat Deployment, media Deployment and Service;
//! - [`delivery`]: a FoundationDB cluster's fanout Deployment and push notifier;
//! - [`stateless_budget`]: the PodDisruptionBudget of the chat, media and fanout pods;
//! - [`partitions`]: a FoundationDB cluster's storage, checked, and its partition table's
//!   ConfigMap.

pub mod backends;
pub mod delivery;
pub mod embedded;
pub mod gateways;
pub mod partitions;
pub mod pod;
pub mod pools;
pub mod sequencers;

use k8s_openapi::api::apps::v1::{
    Deployment, DeploymentSpec, DeploymentStrategy, RollingUpdateDeployment,
};
use k8s_openapi::api::core::v1::{PodTemplateSpec, Service, ServicePort, ServiceSpec};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::{Resource, ResourceExt};

use crate::crd::{CourierCluster, FoundationDbStorage, WorkloadSettings};
use pod::Component;

/// The name under which the operator applies (server-side apply field manager).
pub const FIELD_MANAGER: &str = "courier-operator";

/// A builder's input was not an object read from the API server.
#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    /// The object has no name, namespace or uid (it was not read from the API server).
    #[error("{kind} has no {field}: only objects read from the API server can own children")]
    Incomplete {
        /// The object's kind.
        kind: String,
        /// The missing field.
        field: &'static str,
    },
    /// The cluster's FoundationDB storage is not one the data plane would accept.
    #[error(transparent)]
    Storage(#[from] partitions::StorageError),
    /// A pool or shard set names a cluster whose own is another: a FoundationDB cluster runs
    /// the `GatewayPool` and the `SequencerShardSet` it creates ([`pools`]). A second one
    /// would select the same pods (by cluster and role), take over the client Service, count
    /// and mark the other's gateways, and see the other's sequencers holding shards that are
    /// not its own: it would evacuate them to its pods and the first one back, for good, and
    /// its deletion would drain them.
    #[error(
        "{kind} {name} names CourierCluster {cluster}, whose {kind} is {own} (the cluster creates it): a second one would fight it over the same pods, Service and shards, so it runs nothing; delete it, or change the cluster's spec instead"
    )]
    NotTheClustersOwn {
        /// `GatewayPool` or `SequencerShardSet`.
        kind: &'static str,
        /// Its name.
        name: String,
        /// The cluster it names.
        cluster: String,
        /// The name of the cluster's own.
        own: String,
    },
    /// A pool's pods were asked of a cluster on the embedded store.
    #[error(
        "CourierCluster {cluster} has embedded storage (one courier serve pod that runs every role): a {kind} needs storage.foundationDb"
    )]
    NotFoundationDb {
        /// The cluster.
        cluster: String,
        /// The kind of the pool (`GatewayPool`, `SequencerShardSet`).
        kind: &'static str,
    },
}

/// The FoundationDB storage of `cluster`, which the pods of a `kind` need: an embedded
/// cluster is one `courier serve` pod that already runs every role, the client port included
/// (behind a Service named after the cluster, the name a gateway pool's Service takes).
pub fn foundation_db<'a>(
    cluster: &'a CourierCluster,
    kind: &'static str,
) -> Result<&'a FoundationDbStorage, RenderError> {
    cluster
        .spec
        .storage
        .foundation_db
        .as_ref()
        .ok_or_else(|| RenderError::NotFoundationDb {
            cluster: cluster.name_any(),
            kind,
        })
}

/// The owner reference (controller, blocking deletion) children of `owner` carry.
pub fn owner_reference<K>(owner: &K) -> Result<OwnerReference, RenderError>
where
    K: Resource<DynamicType = ()>,
{
    owner
        .controller_owner_ref(&())
        .ok_or(RenderError::Incomplete {
            kind: K::kind(&()).into_owned(),
            field: "uid",
        })
}

/// Name and namespace of an object read from the API server.
pub fn name_and_namespace<K>(object: &K) -> Result<(String, String), RenderError>
where
    K: Resource<DynamicType = ()>,
{
    let meta = object.meta();
    let name = meta.name.clone().ok_or(RenderError::Incomplete {
        kind: K::kind(&()).into_owned(),
        field: "name",
    })?;
    let namespace = meta.namespace.clone().ok_or(RenderError::Incomplete {
        kind: K::kind(&()).into_owned(),
        field: "namespace",
    })?;
    Ok((name, namespace))
}

/// Metadata of a child named `name` of `owner`, labelled for `cluster`'s `component`.
pub fn child_meta(
    name: &str,
    namespace: &str,
    cluster: &str,
    component: Component,
    owner: OwnerReference,
) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.to_owned()),
        namespace: Some(namespace.to_owned()),
        labels: Some(pod::labels(cluster, component)),
        owner_references: Some(vec![owner]),
        ..ObjectMeta::default()
    }
}

/// A Service over `cluster`'s `component` pods with the named ports `(name, port, node
/// port)`.
pub fn service(
    meta: ObjectMeta,
    cluster: &str,
    component: Component,
    ports: &[(&str, i32, Option<i32>)],
    kind: ServiceKind,
) -> Service {
    let (type_, cluster_ip, publish_not_ready) = match kind {
        ServiceKind::Typed(type_) => (Some(type_.to_owned()), None, None),
        ServiceKind::Headless => (None, Some("None".to_owned()), Some(true)),
    };
    Service {
        metadata: meta,
        spec: Some(ServiceSpec {
            type_,
            cluster_ip,
            publish_not_ready_addresses: publish_not_ready,
            selector: Some(pod::selector_labels(cluster, component)),
            ports: Some(
                ports
                    .iter()
                    .map(|(name, port, node_port)| ServicePort {
                        name: Some((*name).to_owned()),
                        port: *port,
                        node_port: *node_port,
                        target_port: Some(IntOrString::String((*name).to_owned())),
                        protocol: Some("TCP".to_owned()),
                        ..ServicePort::default()
                    })
                    .collect(),
            ),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
}

/// What kind of Service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServiceKind {
    /// `ClusterIP`, `LoadBalancer` or `NodePort`.
    Typed(&'static str),
    /// No cluster IP; DNS names every pod, ready or not (peers reach each other while starting).
    Headless,
}

/// A PodDisruptionBudget allowing `max_unavailable` of `cluster`'s `component` pods down.
pub fn disruption_budget(
    meta: ObjectMeta,
    cluster: &str,
    component: Component,
    max_unavailable: IntOrString,
) -> PodDisruptionBudget {
    PodDisruptionBudget {
        metadata: meta,
        spec: Some(PodDisruptionBudgetSpec {
            max_unavailable: Some(max_unavailable),
            selector: Some(pod::selector(cluster, component)),
            ..PodDisruptionBudgetSpec::default()
        }),
        ..PodDisruptionBudget::default()
    }
}

/// How a Deployment replaces its pods.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rollout {
    /// New pods first (a quarter more at a time), none down meanwhile.
    Surge,
    /// The old pod goes before the new one starts (a singleton that refuses a twin).
    Recreate,
}

/// A Deployment of `replicas` pods of `cluster`'s `component` from `template`.
pub fn deployment(
    meta: ObjectMeta,
    cluster: &str,
    component: Component,
    replicas: i32,
    template: PodTemplateSpec,
    rollout: Rollout,
) -> Deployment {
    let strategy = match rollout {
        Rollout::Surge => DeploymentStrategy {
            type_: Some("RollingUpdate".to_owned()),
            rolling_update: Some(RollingUpdateDeployment {
                max_surge: Some(IntOrString::String("25%".to_owned())),
                max_unavailable: Some(IntOrString::Int(0)),
            }),
        },
        Rollout::Recreate => DeploymentStrategy {
            type_: Some("Recreate".to_owned()),
            rolling_update: None,
        },
    };
    Deployment {
        metadata: meta,
        spec: Some(DeploymentSpec {
            replicas: Some(replicas),
            selector: pod::selector(cluster, component),
            template,
            strategy: Some(strategy),
            ..DeploymentSpec::default()
        }),
        ..Deployment::default()
    }
}

/// A Deployment `name` of `settings.replicas` pods of `cluster`'s stateless `component` running
/// `args` (any number of them share the work), new pods first.
pub fn stateless_deployment(
    cluster: &CourierCluster,
    component: Component,
    name: &str,
    settings: &WorkloadSettings,
    args: Vec<String>,
    shutdown: pod::Shutdown,
) -> Result<Deployment, RenderError> {
    let (cluster_name, namespace) = name_and_namespace(cluster)?;
    let template = pod::template(
        cluster,
        component,
        args,
        settings.resources.clone(),
        shutdown,
    )?;
    let meta = child_meta(
        name,
        &namespace,
        &cluster_name,
        component,
        owner_reference(cluster)?,
    );
    Ok(deployment(
        meta,
        &cluster_name,
        component,
        settings.replicas,
        template,
        Rollout::Surge,
    ))
}

/// The PodDisruptionBudget of `cluster`'s stateless `component` pods (the Deployment `name`):
/// one pod down at a time, so that a node drain (a cluster upgrade, the cluster autoscaler)
/// never evicts every pod of a role at once and stops it until new ones are ready. A role of
/// one pod may still be evicted: the budget slows drains, it never blocks them.
pub fn stateless_budget(
    cluster: &CourierCluster,
    component: Component,
    name: &str,
) -> Result<PodDisruptionBudget, RenderError> {
    let (cluster_name, namespace) = name_and_namespace(cluster)?;
    let meta = child_meta(
        name,
        &namespace,
        &cluster_name,
        component,
        owner_reference(cluster)?,
    );
    Ok(disruption_budget(
        meta,
        &cluster_name,
        component,
        IntOrString::Int(1),
    ))
}

/// A FoundationDB cluster and readers of what is rendered from it, for the builders' tests.
#[cfg(test)]
pub(crate) mod fixtures {
    use crate::crd::{
        CourierCluster, CourierClusterSpec, FoundationDbStorage, MediaStore, S3MediaStore,
        SecretKeyRef, Storage, StoragePartition,
    };
    use k8s_openapi::api::apps::v1::Deployment;
    use kube::core::ObjectMeta;

    /// `prod` in `chat`, on FoundationDB with media in S3, and `push_secret` if given.
    pub fn foundation_db_cluster(push_secret: Option<&str>) -> CourierCluster {
        let secret = |name: &str| SecretKeyRef {
            name: name.into(),
            key: "k".into(),
        };
        let mut cluster = CourierCluster::new(
            "prod",
            CourierClusterSpec {
                image: "courier:1".into(),
                image_pull_secrets: Vec::new(),
                priority_class_name: None,
                storage: Storage {
                    embedded: None,
                    foundation_db: Some(FoundationDbStorage {
                        cluster_file_secret: Some(secret("fdb")),
                        partitions: Vec::new(),
                        cluster_token_secret: secret("tok"),
                    }),
                },
                jwt_secret: Some(secret("jwt")),
                media: Some(MediaStore {
                    s3: S3MediaStore {
                        bucket: "media".into(),
                        credentials_secret: "s3".into(),
                    },
                    pods: Default::default(),
                }),
                push_secret: push_secret.map(str::to_owned),
                config_map: None,
                shards: 64,
                gateways: Default::default(),
                sequencers: Default::default(),
                fanout: Default::default(),
                chat: Default::default(),
            },
        );
        cluster.metadata = ObjectMeta {
            name: Some("prod".into()),
            namespace: Some("chat".into()),
            uid: Some("uid".into()),
            ..ObjectMeta::default()
        };
        cluster
    }

    /// `cluster` (of 64 shards) on two storage partitions instead of one cluster file:
    /// shards 0-31 in Secret `fdb-east` key `fdb.cluster`, 32-63 in `fdb-west` key
    /// `west.cluster`.
    pub fn partitioned(mut cluster: CourierCluster) -> CourierCluster {
        let fdb = cluster.spec.storage.foundation_db.as_mut().unwrap();
        fdb.cluster_file_secret = None;
        fdb.partitions = vec![
            StoragePartition {
                first_shard: 0,
                last_shard: 31,
                cluster_file_secret: SecretKeyRef {
                    name: "fdb-east".into(),
                    key: "fdb.cluster".into(),
                },
            },
            StoragePartition {
                first_shard: 32,
                last_shard: 63,
                cluster_file_secret: SecretKeyRef {
                    name: "fdb-west".into(),
                    key: "west.cluster".into(),
                },
            },
        ];
        cluster
    }

    /// The container arguments of `deployment`'s pods.
    pub fn args(deployment: &Deployment) -> Vec<String> {
        let spec = deployment.spec.as_ref().unwrap();
        spec.template.spec.as_ref().unwrap().containers[0]
            .args
            .clone()
            .unwrap()
    }
}

#[cfg(test)]
mod tests {
    use super::fixtures::{self, foundation_db_cluster};
    use super::pod::{HTTP_PORT, METRICS_PORT, METRICS_PORT_NAME};
    use super::*;
    use crate::crd::{EmbeddedStorage, SecretRef};
    use k8s_openapi::api::apps::v1::StatefulSet;
    use k8s_openapi::api::core::v1::{PodTemplateSpec, Probe, ResourceRequirements};
    use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
    use std::collections::BTreeMap;

    /// A rendered pod template: its role, and the selector of its workload.
    type RenderedPod = (&'static str, LabelSelector, PodTemplateSpec);

    /// Every StatefulSet, Deployment and ConfigMap the operator renders (the kinds its
    /// controllers watch by label) matches the selector they watch with: one that did not
    /// would never wake its owner, so a change to it (a pod turning ready, a deletion) would go
    /// unseen until the next periodic reconciliation.
    #[test]
    fn every_watched_object_the_operator_renders_carries_the_watched_label() {
        let cluster = foundation_db_cluster(Some("push"));
        let mut pools = pools::build(&cluster).unwrap();
        pools.gateways.metadata.uid = Some("gateways".into());
        pools.sequencers.metadata.uid = Some("sequencers".into());
        let mut embedded_cluster = cluster.clone();
        embedded_cluster.spec.storage.foundation_db = None;
        embedded_cluster.spec.storage.embedded = Some(EmbeddedStorage {
            size: "1Gi".into(),
            storage_class_name: None,
        });
        let partitioned = fixtures::partitioned(cluster.clone());
        let (media, _) = backends::media(&cluster).unwrap().unwrap();
        let rendered = [
            (
                "gateways",
                gateways::build(&pools.gateways, &cluster, 2)
                    .unwrap()
                    .deployment
                    .metadata,
            ),
            ("chat", backends::chat(&cluster).unwrap().metadata),
            ("media", media.metadata),
            ("fanout", delivery::fanout(&cluster).unwrap().metadata),
            ("push", delivery::push(&cluster).unwrap().unwrap().metadata),
            (
                "push stopped",
                delivery::push_stopped(&cluster).unwrap().metadata,
            ),
            (
                "sequencers",
                sequencers::build(&pools.sequencers, &cluster, 3)
                    .unwrap()
                    .stateful_set
                    .metadata,
            ),
            (
                "server",
                embedded::build(&embedded_cluster)
                    .unwrap()
                    .stateful_set
                    .metadata,
            ),
            (
                "partition table",
                partitions::config_map(&partitioned)
                    .unwrap()
                    .unwrap()
                    .metadata,
            ),
        ];
        let selector = pod::managed_selector();
        let (key, value) = selector.split_once('=').unwrap();
        for (what, meta) in rendered {
            let labels = meta.labels.unwrap_or_default();
            assert_eq!(
                labels.get(key).map(String::as_str),
                Some(value),
                "{what}: {labels:?}"
            );
        }
    }

    /// Every data-plane pod template the operator renders, with the selector of its workload,
    /// and every Service: of a FoundationDB cluster with media and push, and of an embedded one.
    fn every_pod_and_service() -> (Vec<RenderedPod>, Vec<(&'static str, Service)>) {
        every_pod_and_service_of(foundation_db_cluster(Some("push")))
    }

    /// [`every_pod_and_service`] of `cluster` (on FoundationDB, with a push Secret), and of
    /// its embedded twin.
    fn every_pod_and_service_of(
        cluster: CourierCluster,
    ) -> (Vec<RenderedPod>, Vec<(&'static str, Service)>) {
        let mut pools = pools::build(&cluster).unwrap();
        pools.gateways.metadata.uid = Some("gateways".into());
        pools.sequencers.metadata.uid = Some("sequencers".into());
        let gateways = gateways::build(&pools.gateways, &cluster, 2).unwrap();
        let sequencers = sequencers::build(&pools.sequencers, &cluster, 3).unwrap();
        let (media, media_service) = backends::media(&cluster).unwrap().unwrap();
        let mut embedded_cluster = cluster.clone();
        embedded_cluster.spec.storage.foundation_db = None;
        embedded_cluster.spec.storage.embedded = Some(EmbeddedStorage {
            size: "1Gi".into(),
            storage_class_name: None,
        });
        let embedded = embedded::build(&embedded_cluster).unwrap();

        let deployment = |d: Deployment| {
            let spec = d.spec.unwrap();
            (spec.selector, spec.template)
        };
        let stateful_set = |s: StatefulSet| {
            let spec = s.spec.unwrap();
            (spec.selector, spec.template)
        };
        let pods = [
            ("gateway", deployment(gateways.deployment)),
            ("chat", deployment(backends::chat(&cluster).unwrap())),
            ("media", deployment(media)),
            ("fanout", deployment(delivery::fanout(&cluster).unwrap())),
            (
                "push",
                deployment(delivery::push(&cluster).unwrap().unwrap()),
            ),
            ("sequencer", stateful_set(sequencers.stateful_set)),
            ("server", stateful_set(embedded.stateful_set)),
        ];
        let services = vec![
            ("client", gateways.service),
            ("embedded client", embedded.service),
            ("media", media_service),
            ("sequencers", sequencers.service),
        ];
        let pods = pods
            .into_iter()
            .map(|(role, (selector, template))| (role, selector, template))
            .collect();
        (pods, services)
    }

    /// Every data-plane pod the operator runs serves `/metrics` on its `metrics` port alone
    /// (`--metrics-listen`), and every Service the operator makes reaches the client port
    /// only: the client Service (a LoadBalancer or NodePort, and any HTTPRoute to it) opens
    /// that port to the internet, where a pod's load and internals are nobody's business.
    #[test]
    fn every_data_plane_pod_serves_its_metrics_on_a_port_no_service_reaches() {
        let (pods, services) = every_pod_and_service();
        for (role, _, pod) in pods {
            let container = &pod.spec.unwrap().containers[0];
            let args = container.args.clone().unwrap();
            let at = args.iter().position(|a| a == "--metrics-listen");
            let listen = at.and_then(|at| args.get(at + 1));
            let expected = format!("0.0.0.0:{METRICS_PORT}");
            assert_eq!(listen, Some(&expected), "{role}: {args:?}");
            let ports: Vec<(Option<&str>, i32)> = container
                .ports
                .iter()
                .flatten()
                .map(|p| (p.name.as_deref(), p.container_port))
                .collect();
            assert!(
                ports.contains(&(Some(METRICS_PORT_NAME), METRICS_PORT)),
                "{role}: {ports:?}"
            );
            assert!(
                ports.contains(&(Some("http"), HTTP_PORT)),
                "{role}: {ports:?}"
            );
        }
        for (what, service) in services {
            let targets: Vec<String> = service
                .spec
                .unwrap()
                .ports
                .iter()
                .flatten()
                .map(|p| format!("{:?}", p.target_port))
                .collect();
            assert!(
                !targets.iter().any(|t| t.contains(METRICS_PORT_NAME)),
                "the {what} Service reaches the metrics port: {targets:?}"
            );
        }
    }

    /// Every data-plane pod asks for CPU and memory by default, and is limited in neither: a
    /// pod without requests is BestEffort, the first evicted or OOM-killed when its node runs
    /// short (a sequencer's shards, a gateway's connections with it), and a CPU limit would
    /// throttle a pod the node has idle cores for.
    #[test]
    fn every_data_plane_pod_requests_cpu_and_memory_by_default() {
        let (pods, _) = every_pod_and_service();
        for (role, _, pod) in pods {
            let resources = pod.spec.unwrap().containers[0].resources.clone();
            let resources = resources.unwrap_or_default();
            let requests = resources.requests.unwrap_or_default();
            assert!(
                requests.contains_key("cpu") && requests.contains_key("memory"),
                "{role}: {requests:?}"
            );
            assert_eq!(resources.limits, None, "{role}");
        }
    }

    /// A cluster's `resources` for a role replace the role's default whole.
    #[test]
    fn a_roles_resources_replace_its_default() {
        let mut cluster = foundation_db_cluster(None);
        let mine = ResourceRequirements {
            requests: Some(BTreeMap::from([(
                "memory".to_owned(),
                Quantity("3Gi".to_owned()),
            )])),
            ..Default::default()
        };
        cluster.spec.chat.resources = Some(mine.clone());
        let template = backends::chat(&cluster).unwrap().spec.unwrap().template;
        assert_eq!(template.spec.unwrap().containers[0].resources, Some(mine));
    }

    /// The pods of each role are spread over the nodes, and over the zones where the nodes
    /// have them, one pod of skew at most: Kubernetes' own default spread (a skew of 3 per
    /// node, 5 per zone) let a set of three sequencers, or a pool's first gateways, all run
    /// on one node, whose loss (which no PodDisruptionBudget covers) took every shard, or
    /// every client connection, at once. The spread is a preference (`ScheduleAnyway`): a
    /// cluster of one node, or one full node, still runs every pod.
    #[test]
    fn the_pods_of_each_role_are_spread_over_nodes_and_zones() {
        let (pods, _) = every_pod_and_service();
        for (role, selector, pod) in pods {
            let spread = pod.spec.unwrap().topology_spread_constraints;
            let over: Vec<(&str, &str, i32)> = spread
                .iter()
                .flatten()
                .filter(|c| c.label_selector.as_ref() == Some(&selector))
                .map(|c| {
                    (
                        c.topology_key.as_str(),
                        c.when_unsatisfiable.as_str(),
                        c.max_skew,
                    )
                })
                .collect();
            assert_eq!(
                over,
                [
                    ("kubernetes.io/hostname", "ScheduleAnyway", 1),
                    ("topology.kubernetes.io/zone", "ScheduleAnyway", 1)
                ],
                "{role}: {spread:?}"
            );
        }
    }

    /// A starting pod is given [`pod::STARTUP_SECONDS`] before its liveness counts: a process
    /// serves its probes only once it has opened the store and claimed its node id, and a
    /// sequencer whose process died (OOM-killed, or killed past its grace) restarts under the
    /// same node id, which it first waits to claim until the dead process's registration
    /// lapses (`--shard-lease`, 10 s by default, longer if the configMap says so). Liveness
    /// alone (3 failures 5 s apart from the container's start) killed it about 10 s in, while
    /// it waited, and again at each start until the lease had lapsed.
    #[test]
    fn every_pod_is_given_its_start_before_its_liveness_counts() {
        let (pods, _) = every_pod_and_service();
        for (role, _, pod) in pods {
            let container = &pod.spec.unwrap().containers[0];
            let startup = container.startup_probe.clone().unwrap_or_default();
            let path = startup
                .http_get
                .as_ref()
                .and_then(|get| get.path.as_deref());
            assert_eq!(path, Some("/healthz"), "{role}: {startup:?}");
            let window =
                startup.period_seconds.unwrap_or(10) * startup.failure_threshold.unwrap_or(3);
            assert!(window >= pod::STARTUP_SECONDS, "{role}: {startup:?}");
        }
    }

    /// A cluster's registry credentials and PriorityClass are every pod's, each role's and
    /// the embedded server's: an image in a private registry is pulled, and the scheduler
    /// ranks the pods as the cluster says. Without them, no pod names any.
    #[test]
    fn every_pod_gets_the_clusters_pull_secrets_and_priority_class() {
        let mut cluster = foundation_db_cluster(Some("push"));
        cluster.spec.image_pull_secrets = ["registry", "mirror"]
            .map(|name| SecretRef { name: name.into() })
            .to_vec();
        cluster.spec.priority_class_name = Some("courier-critical".into());
        let (pods, _) = every_pod_and_service_of(cluster);
        for (role, _, pod) in pods {
            let spec = pod.spec.unwrap();
            let pulled: Vec<String> = spec
                .image_pull_secrets
                .into_iter()
                .flatten()
                .map(|s| s.name)
                .collect();
            assert_eq!(pulled, ["registry", "mirror"], "{role}");
            let priority = spec.priority_class_name.as_deref();
            assert_eq!(priority, Some("courier-critical"), "{role}");
        }
        let (pods, _) = every_pod_and_service();
        for (role, _, pod) in pods {
            let spec = pod.spec.unwrap();
            assert_eq!(spec.image_pull_secrets, None, "{role}");
            assert_eq!(spec.priority_class_name, None, "{role}");
        }
    }

    /// A loaded pod answers its probes late, not never: each probe waits 5 s for the answer
    /// (Kubernetes' default, 1 s, failed a busy pod), a pod leaves its Service after 10 s of
    /// failed readiness probes and is restarted only after 30 s of failed liveness probes.
    #[test]
    fn every_pod_is_probed_patiently_and_restarted_only_after_30_seconds() {
        let window = |role: &str, probe: &Option<Probe>| {
            let probe = probe.clone().unwrap_or_default();
            assert_eq!(probe.timeout_seconds, Some(5), "{role}: {probe:?}");
            probe.period_seconds.unwrap_or(10) * probe.failure_threshold.unwrap_or(3)
        };
        let (pods, _) = every_pod_and_service();
        for (role, _, pod) in pods {
            let container = &pod.spec.unwrap().containers[0];
            window(role, &container.startup_probe);
            assert_eq!(window(role, &container.liveness_probe), 30, "{role}");
            assert_eq!(window(role, &container.readiness_probe), 10, "{role}");
        }
    }
}
