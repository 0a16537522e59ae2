//! An embedded-storage cluster: one `courier serve` pod (every role, the embedded store on a
//! persistent volume) in a StatefulSet of one, and the client Service. A development install:
//! it does not scale, and a pod restart is a short outage.

use k8s_openapi::api::apps::v1::{StatefulSet, StatefulSetSpec};
use k8s_openapi::api::core::v1::{
    PersistentVolumeClaim, PersistentVolumeClaimSpec, Service, VolumeResourceRequirements,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use std::collections::BTreeMap;

use super::pod::{self, Component, Shutdown};
use super::{RenderError, ServiceKind, child_meta, name_and_namespace, owner_reference, service};
use crate::crd::CourierCluster;

/// How long `courier serve` may drain on SIGTERM (`--drain-timeout`, its default), its
/// clients told to reconnect all at once (`--drain-window 0s`: they have no other gateway to
/// go to). Given as flags, which win over the cluster's configuration file (`configMap`): a
/// `drain-window` or `drain-timeout` there would run the drain past the grace below, the pod
/// killed midway.
pub const DRAIN_SECONDS: i64 = 25;

/// The preStop sleep, the drain and 15 s of margin.
const SHUTDOWN: Shutdown = Shutdown {
    pre_stop_sleep_seconds: 5,
    grace_seconds: 5 + DRAIN_SECONDS + 15,
};

/// The objects of an embedded cluster.
#[derive(Debug, Clone, PartialEq)]
pub struct EmbeddedChildren {
    /// One `courier serve` pod with its volume.
    pub stateful_set: StatefulSet,
    /// The client Service.
    pub service: Service,
}

/// The objects of `cluster`, which must have embedded storage.
pub fn build(cluster: &CourierCluster) -> Result<EmbeddedChildren, RenderError> {
    let (name, namespace) = name_and_namespace(cluster)?;
    let owner = owner_reference(cluster)?;
    let storage = cluster
        .spec
        .storage
        .embedded
        .as_ref()
        .ok_or(RenderError::Incomplete {
            kind: "CourierCluster".to_owned(),
            field: "spec.storage.embedded",
        })?;
    let mut args = ["serve", "--listen", "0.0.0.0:8080"]
        .map(str::to_owned)
        .to_vec();
    args.extend(pod::metrics_listen());
    args.extend([
        "--drain-window".to_owned(),
        "0s".to_owned(),
        "--drain-timeout".to_owned(),
        format!("{DRAIN_SECONDS}s"),
    ]);
    let template = pod::template(
        cluster,
        Component::Server,
        args,
        cluster.spec.gateways.resources.clone(),
        SHUTDOWN,
    )?;
    let claim = PersistentVolumeClaim {
        metadata: ObjectMeta {
            name: Some("data".to_owned()),
            ..ObjectMeta::default()
        },
        spec: Some(PersistentVolumeClaimSpec {
            access_modes: Some(vec!["ReadWriteOnce".to_owned()]),
            storage_class_name: storage.storage_class_name.clone(),
            resources: Some(VolumeResourceRequirements {
                requests: Some(BTreeMap::from([(
                    "storage".to_owned(),
                    Quantity(storage.size.clone()),
                )])),
                ..VolumeResourceRequirements::default()
            }),
            ..PersistentVolumeClaimSpec::default()
        }),
        ..PersistentVolumeClaim::default()
    };
    let meta = child_meta(&name, &namespace, &name, Component::Server, owner);
    let stateful_set = StatefulSet {
        metadata: meta.clone(),
        spec: Some(StatefulSetSpec {
            replicas: Some(1),
            service_name: Some(name.clone()),
            selector: pod::selector(&name, Component::Server),
            template: without_data_volume(template),
            volume_claim_templates: Some(vec![claim]),
            ..StatefulSetSpec::default()
        }),
        ..StatefulSet::default()
    };
    let gateways = &cluster.spec.gateways;
    let service = service(
        meta,
        &name,
        Component::Server,
        // The client Service, as a gateway pool's: `spec.gateways`' type, port and node port.
        &[("http", gateways.port, gateways.node_port)],
        ServiceKind::Typed(gateways.service_type.as_str()),
    );
    Ok(EmbeddedChildren {
        stateful_set,
        service,
    })
}

/// The template without its `data` volume: the claim template of the same name provides it.
fn without_data_volume(
    mut template: k8s_openapi::api::core::v1::PodTemplateSpec,
) -> k8s_openapi::api::core::v1::PodTemplateSpec {
    if let Some(volumes) = template.spec.as_mut().and_then(|s| s.volumes.as_mut()) {
        volumes.retain(|v| v.name != "data");
    }
    template
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::EmbeddedStorage;
    use crate::render::fixtures::foundation_db_cluster;

    /// The pod's grace is the preStop sleep, the drain and a margin: the drain is given as
    /// flags, which win over the cluster's configuration file, so that a `drain-window` or
    /// `drain-timeout` there cannot run the drain past the grace (the pod was killed midway,
    /// its clients cut rather than told to reconnect).
    #[test]
    fn the_drain_is_pinned_within_the_grace() {
        let mut cluster = foundation_db_cluster(None);
        cluster.spec.storage.foundation_db = None;
        cluster.spec.media = None;
        cluster.spec.storage.embedded = Some(EmbeddedStorage {
            size: "1Gi".into(),
            storage_class_name: None,
        });
        let built = build(&cluster).unwrap();
        let pod = built.stateful_set.spec.unwrap().template.spec.unwrap();
        let args = pod.containers[0].args.clone().unwrap();
        let flag = |name: &str| {
            args.windows(2)
                .find(|pair| pair[0] == name)
                .map(|pair| pair[1].clone())
        };
        assert_eq!(flag("--drain-window").as_deref(), Some("0s"), "{args:?}");
        assert_eq!(flag("--drain-timeout").as_deref(), Some("25s"), "{args:?}");
        assert_eq!(
            pod.termination_grace_period_seconds,
            Some(SHUTDOWN.pre_stop_sleep_seconds + 25 + 15)
        );
    }
}
