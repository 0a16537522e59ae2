//! A shard set's objects: a StatefulSet of sequencer pods with `OnDelete` updates (the
//! operator, not the StatefulSet controller, decides when a pod goes: after its shards were
//! handed off), a headless Service through which the pods, the chat nodes and the operator
//! reach each pod's internal gRPC by name, and a PodDisruptionBudget of one pod down.

use k8s_openapi::api::apps::v1::{StatefulSet, StatefulSetSpec, StatefulSetUpdateStrategy};
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::pod::{self, Component, HTTP_PORT, INTERNAL_PORT, Shutdown};
use super::{
    RenderError, ServiceKind, child_meta, disruption_budget, name_and_namespace, owner_reference,
    pools, service,
};
use crate::crd::{CourierCluster, SequencerShardSet};

/// A sequencer drains (hands its shards back) on SIGTERM within seconds; the grace covers the
/// preStop sleep, a drain of every shard and a margin.
const SHUTDOWN: Shutdown = Shutdown {
    pre_stop_sleep_seconds: 2,
    grace_seconds: 45,
};

/// The objects of a shard set.
#[derive(Debug, Clone, PartialEq)]
pub struct SequencerChildren {
    /// The sequencer pods, `<set>-0` to `<set>-(replicas-1)`.
    pub stateful_set: StatefulSet,
    /// The headless Service naming each pod.
    pub service: Service,
    /// One pod down at a time.
    pub disruption_budget: PodDisruptionBudget,
}

/// The longest name of a StatefulSet whose pods Kubernetes creates: each pod's label
/// `controller-revision-hash` is the StatefulSet's name, `-` and a hash of up to 10 characters,
/// at most 63 characters in all (kubernetes/kubernetes#64023). The CRDs refuse longer names of
/// shard sets, and of clusters (`<cluster>-sequencers`, or an embedded cluster's own).
pub const MAX_STATEFUL_SET_NAME: usize = 52;

/// The name of pod `ordinal` of shard set `set`: also its node id in the data plane.
pub fn pod_name(set: &str, ordinal: i32) -> String {
    format!("{set}-{ordinal}")
}

/// The admin address (`host:port`) of pod `ordinal` of shard set `set` in `namespace`.
pub fn admin_address(set: &str, namespace: &str, ordinal: i32) -> String {
    format!(
        "{}.{set}.{namespace}.svc:{INTERNAL_PORT}",
        pod_name(set, ordinal)
    )
}

/// The objects of `set` (a shard set of `cluster`) running `replicas` pods.
pub fn build(
    set: &SequencerShardSet,
    cluster: &CourierCluster,
    replicas: i32,
) -> Result<SequencerChildren, RenderError> {
    pools::own_shard_set(set)?;
    let (name, namespace) = name_and_namespace(set)?;
    let owner = owner_reference(set)?;
    let cluster_name = set.spec.cluster.clone();
    // Reached by its stable name under the headless Service, which outlives a pod's IP.
    let advertise = format!("$(POD_NAME).{name}.$(POD_NAMESPACE).svc:{INTERNAL_PORT}");
    let args = pod::node_args("sequencer", advertise, &[]);
    let template = pod::template(
        cluster,
        Component::Sequencer,
        args,
        set.spec.sequencers.resources.clone(),
        SHUTDOWN,
    )?;
    let meta = child_meta(
        &name,
        &namespace,
        &cluster_name,
        Component::Sequencer,
        owner,
    );
    let stateful_set = StatefulSet {
        metadata: meta.clone(),
        spec: Some(StatefulSetSpec {
            replicas: Some(replicas),
            service_name: Some(name.clone()),
            pod_management_policy: Some("Parallel".to_owned()),
            update_strategy: Some(StatefulSetUpdateStrategy {
                type_: Some("OnDelete".to_owned()),
                ..StatefulSetUpdateStrategy::default()
            }),
            selector: pod::selector(&cluster_name, Component::Sequencer),
            template,
            ..StatefulSetSpec::default()
        }),
        ..StatefulSet::default()
    };
    let service = service(
        meta.clone(),
        &cluster_name,
        Component::Sequencer,
        &[("internal", INTERNAL_PORT, None), ("http", HTTP_PORT, None)],
        ServiceKind::Headless,
    );
    let disruption_budget = disruption_budget(
        meta,
        &cluster_name,
        Component::Sequencer,
        IntOrString::Int(1),
    );
    Ok(SequencerChildren {
        stateful_set,
        service,
        disruption_budget,
    })
}
