//! `GatewayPool`: the pods that hold client connections (the client roles of the data plane),
//! behind the client Service, scaled by the operator from their connection counts.

use k8s_openapi::api::core::v1::ResourceRequirements;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The gateway pods of a CourierCluster.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "courier.dev",
    version = "v1alpha1",
    kind = "GatewayPool",
    namespaced,
    status = "GatewayPoolStatus",
    shortname = "gwp",
    category = "courier",
    doc = "The gateway pods of a CourierCluster, scaled from their connections per pod.",
    printcolumn = r#"{"name": "Cluster", "type": "string", "jsonPath": ".spec.cluster"}"#,
    printcolumn = r#"{"name": "Min", "type": "integer", "jsonPath": ".spec.minReplicas"}"#,
    printcolumn = r#"{"name": "Max", "type": "integer", "jsonPath": ".spec.maxReplicas"}"#,
    printcolumn = r#"{"name": "Replicas", "type": "integer", "jsonPath": ".status.replicas"}"#,
    printcolumn = r#"{"name": "Connections", "type": "integer", "jsonPath": ".status.connections"}"#,
    printcolumn = r#"{"name": "Ready", "type": "string", "jsonPath": ".status.conditions[?(@.type==\"Ready\")].status"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct GatewayPoolSpec {
    /// The `CourierCluster` (same namespace) whose image, storage and secrets the pods use.
    #[schemars(length(min = 1, max = 63))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("cluster is immutable: the pods are selected by their cluster, and Kubernetes refuses to change a Deployment's selector; create a pool for the other cluster instead"))]
    pub cluster: String,
    /// Replicas, scaling and Service.
    #[serde(flatten)]
    pub pool: GatewayPoolSettings,
}

/// How many gateway pods, how they scale, and how clients reach them.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.minReplicas <= self.maxReplicas").message("minReplicas must not be greater than maxReplicas"))]
#[x_kube(validation = Rule::new("!has(self.nodePort) || self.serviceType == 'NodePort'").message("nodePort needs serviceType NodePort"))]
pub struct GatewayPoolSettings {
    /// The fewest pods, whatever the load.
    #[serde(default = "default_min_replicas")]
    #[schemars(range(min = 1, max = 10000))]
    pub min_replicas: i32,
    /// The most pods, whatever the load.
    #[serde(default = "default_max_replicas")]
    #[schemars(range(min = 1, max = 10000))]
    pub max_replicas: i32,
    /// Connections per pod the operator scales towards, at most 10,000,000 (far past what a
    /// pod holds).
    #[serde(default = "default_target_connections")]
    // Bounded for the API server: it does not enforce the `uint32` format, and an object it
    // stored with more could not be read (`crd::tests`).
    #[schemars(range(min = 1, max = 10_000_000))]
    pub target_connections_per_pod: u32,
    /// CPU and memory of each pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// How clients reach the pods.
    #[serde(default)]
    pub service_type: ServiceType,
    /// The client port of the Service (WebSocket `/v1/ws` and HTTP).
    #[serde(default = "default_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: i32,
    /// The port on every node (`serviceType: NodePort` only; default: one Kubernetes picks).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 30000, max = 32767))]
    pub node_port: Option<i32>,
}

impl Default for GatewayPoolSettings {
    fn default() -> Self {
        Self {
            min_replicas: default_min_replicas(),
            max_replicas: default_max_replicas(),
            target_connections_per_pod: default_target_connections(),
            resources: None,
            service_type: ServiceType::default(),
            port: default_port(),
            node_port: None,
        }
    }
}

fn default_min_replicas() -> i32 {
    2
}

fn default_max_replicas() -> i32 {
    10
}

fn default_target_connections() -> u32 {
    50_000
}

fn default_port() -> i32 {
    8080
}

/// The type of the client Service.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum ServiceType {
    /// Reachable inside the Kubernetes cluster (put an Ingress or Gateway in front).
    #[default]
    ClusterIP,
    /// A cloud load balancer.
    LoadBalancer,
    /// A port on every node.
    NodePort,
}

impl ServiceType {
    /// The Service's `spec.type`.
    pub fn as_str(self) -> &'static str {
        match self {
            ServiceType::ClusterIP => "ClusterIP",
            ServiceType::LoadBalancer => "LoadBalancer",
            ServiceType::NodePort => "NodePort",
        }
    }
}

/// What the operator last saw of a pool.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", remote = "Self")]
// Read with `stored::salvage` (the `Deserialize` of `salvaged!`); named as ever in schemas.
#[schemars(rename = "GatewayPoolStatus")]
pub struct GatewayPoolStatus {
    /// The generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Pods the Deployment runs.
    #[serde(default)]
    pub replicas: i32,
    /// Pods that pass `/readyz`.
    #[serde(default)]
    pub ready_replicas: i32,
    /// Client connections over every pod whose `/metrics` answered, at the last scaling
    /// decision (at most 2^63 - 1, the most the API server keeps as an integer).
    #[serde(default)]
    pub connections: u64,
    /// Ready, Progressing, Degraded.
    #[serde(default)]
    pub conditions: Vec<Condition>,
    /// What of the stored status could not be read (`stored`); never written.
    #[serde(skip)]
    pub unreadable: Vec<String>,
}
