//! A gateway pool's objects: a Deployment of pods serving the client port (the gateway role
//! alone) behind the client Service, and a PodDisruptionBudget keeping at most 10 % of them
//! down. Any number of gateway pods may run. Chat and media run in pods of their own
//! ([`super::backends`]): a gateway calls the chat pods for every client request and forwards
//! `/v1/media*` to the media pods (the data plane finds both in its node registry); fanout and
//! the push notifier too ([`super::delivery`]).
//!
//! Scale-down drains a pod before it goes: the pod the autoscaler picked carries the lowest
//! `controller.kubernetes.io/pod-deletion-cost`; on deletion the native `preStop` sleep lets
//! the endpoints drop it, then SIGTERM makes the gateway tell its clients to reconnect
//! elsewhere in batches spread over `--drain-window` (60 s; each `reconnect` with its own
//! jitter), and exit once they are gone (at most `--drain-timeout`, 90 s), within a grace
//! period of sleep + drain + margin.

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::pod::{self, Component, Shutdown};
use super::{
    RenderError, Rollout, ServiceKind, child_meta, deployment, disruption_budget, foundation_db,
    name_and_namespace, owner_reference, pools, service,
};
use crate::crd::{CourierCluster, GatewayPool};

/// The roles of a gateway pod: the client port (connections), nothing else, so that gateways
/// scale with connections alone (`docs/decisions/0004-media-and-push-workloads.md`).
pub const CLIENT_ROLES: &str = "gateway";

/// Over how long a gateway tells its clients to reconnect elsewhere on SIGTERM, batch by
/// batch (the data plane's `--drain-window`): 60 s, the low end of the 60–120 s a scale-down
/// may take, so that a pool shrinking one pod per 120 s has drained each before the next.
pub const DRAIN_WINDOW_SECONDS: i64 = 60;

/// How long a gateway's drain may take on SIGTERM (`--drain-timeout`): the window, then the
/// last batch's sends answered (each waits at most 10 s) and their connections closed.
pub const DRAIN_SECONDS: i64 = 90;

/// The preStop sleep, the drain and 15 s of margin.
pub const SHUTDOWN: Shutdown = Shutdown {
    pre_stop_sleep_seconds: 5,
    grace_seconds: 5 + DRAIN_SECONDS + 15,
};

/// The objects of a gateway pool.
#[derive(Debug, Clone, PartialEq)]
pub struct GatewayChildren {
    /// The gateway pods.
    pub deployment: Deployment,
    /// The client Service, named after the cluster.
    pub service: Service,
    /// At most 10 % of the pods down at once.
    pub disruption_budget: PodDisruptionBudget,
}

/// The objects of `pool` (a pool of `cluster`, on FoundationDB) running `replicas` pods.
pub fn build(
    pool: &GatewayPool,
    cluster: &CourierCluster,
    replicas: i32,
) -> Result<GatewayChildren, RenderError> {
    // An embedded cluster's Service has the name of the client Service below, over its own
    // pod: two controllers would take it from each other.
    foundation_db(cluster, "GatewayPool")?;
    pools::own_gateway_pool(pool)?;
    let (name, namespace) = name_and_namespace(pool)?;
    let owner = owner_reference(pool)?;
    let cluster_name = pool.spec.cluster.clone();
    let drain = [
        "--drain-window".to_owned(),
        format!("{DRAIN_WINDOW_SECONDS}s"),
        "--drain-timeout".to_owned(),
        format!("{DRAIN_SECONDS}s"),
    ];
    let args = pod::node_args(CLIENT_ROLES, pod::at_pod_ip(), &drain);
    let template = pod::template(
        cluster,
        Component::Gateway,
        args,
        pool.spec.pool.resources.clone(),
        SHUTDOWN,
    )?;
    let meta = child_meta(&name, &namespace, &cluster_name, Component::Gateway, owner);
    let deployment = deployment(
        meta.clone(),
        &cluster_name,
        Component::Gateway,
        replicas,
        template,
        Rollout::Surge,
    );
    let mut service_meta = meta.clone();
    service_meta.name = Some(cluster_name.clone());
    let service = service(
        service_meta,
        &cluster_name,
        Component::Gateway,
        &[("http", pool.spec.pool.port, pool.spec.pool.node_port)],
        ServiceKind::Typed(pool.spec.pool.service_type.as_str()),
    );
    let disruption_budget = disruption_budget(
        meta,
        &cluster_name,
        Component::Gateway,
        IntOrString::String("10%".to_owned()),
    );
    Ok(GatewayChildren {
        deployment,
        service,
        disruption_budget,
    })
}
