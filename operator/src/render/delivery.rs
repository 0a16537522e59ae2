//! A FoundationDB cluster's delivery workloads, owned by the `CourierCluster`:
//!
//! - `<cluster>-fanout`: fanout nodes (`courier node --roles fanout`), any number; they split
//!   the shards' outboxes between them by delivery leases and hand events to the gateways;
//! - `<cluster>-push` (with `pushSecret` only): the push notifier (`courier node --roles
//!   push`), the only pod with the push Secret; it registers the providers it has, and the
//!   gateways accept device registrations for those. One pod, replaced old-first (the data
//!   plane lets one push node at a time lead the notifier). Once `pushSecret` is removed, the
//!   Deployment is kept at zero pods ([`push_stopped`]): the operator deletes nothing, and a
//!   notifier left running would go on sending with the old Secret and the old image.

use k8s_openapi::api::apps::v1::Deployment;

use super::pod::{self, Component, Shutdown};
use super::{
    RenderError, Rollout, child_meta, deployment, name_and_namespace, owner_reference,
    stateless_deployment,
};
use crate::crd::CourierCluster;

/// A fanout node hands its leases back, and a push node finishes its pass, on SIGTERM within
/// seconds.
const DELIVERY_SHUTDOWN: Shutdown = Shutdown {
    pre_stop_sleep_seconds: 2,
    grace_seconds: 40,
};

/// The roles of the push notifier's pod.
pub const PUSH_ROLES: &str = "push";

/// The name of `cluster`'s fanout Deployment.
pub fn fanout_name(cluster: &str) -> String {
    format!("{cluster}-fanout")
}

/// The name of `cluster`'s push notifier Deployment.
pub fn push_name(cluster: &str) -> String {
    format!("{cluster}-push")
}

/// The fanout Deployment of `cluster`.
pub fn fanout(cluster: &CourierCluster) -> Result<Deployment, RenderError> {
    let (name, _) = name_and_namespace(cluster)?;
    stateless_deployment(
        cluster,
        Component::Fanout,
        &fanout_name(&name),
        &cluster.spec.fanout,
        pod::node_args("fanout", pod::at_pod_ip(), &[]),
        DELIVERY_SHUTDOWN,
    )
}

/// The push notifier's Deployment of `cluster`, if it has push providers (`pushSecret`).
pub fn push(cluster: &CourierCluster) -> Result<Option<Deployment>, RenderError> {
    if cluster.spec.push_secret.is_none() {
        return Ok(None);
    }
    push_deployment(cluster, 1).map(Some)
}

/// The push notifier's Deployment of `cluster` at zero pods: what is left of it once
/// `pushSecret` is gone (the pod template no longer names the Secret).
pub fn push_stopped(cluster: &CourierCluster) -> Result<Deployment, RenderError> {
    let mut cluster = cluster.clone();
    cluster.spec.push_secret = None;
    push_deployment(&cluster, 0)
}

/// The push notifier's Deployment of `cluster` with `replicas` pods (one at most).
fn push_deployment(cluster: &CourierCluster, replicas: i32) -> Result<Deployment, RenderError> {
    let (name, namespace) = name_and_namespace(cluster)?;
    let template = pod::template(
        cluster,
        Component::Push,
        pod::node_args(PUSH_ROLES, pod::at_pod_ip(), &[]),
        cluster.spec.fanout.resources.clone(),
        DELIVERY_SHUTDOWN,
    )?;
    let meta = child_meta(
        &push_name(&name),
        &namespace,
        &name,
        Component::Push,
        owner_reference(cluster)?,
    );
    Ok(deployment(
        meta,
        &name,
        Component::Push,
        replicas,
        template,
        Rollout::Recreate,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::render::fixtures::{args, foundation_db_cluster as cluster};

    #[test]
    fn the_push_notifier_is_one_pod_replaced_old_first_and_only_with_push_providers() {
        assert!(push(&cluster(None)).unwrap().is_none());
        let push = push(&cluster(Some("push"))).unwrap().unwrap();
        assert_eq!(push.metadata.name.as_deref(), Some("prod-push"));
        let spec = push.spec.as_ref().unwrap();
        assert_eq!(spec.replicas, Some(1));
        assert_eq!(
            spec.strategy.as_ref().unwrap().type_.as_deref(),
            Some("Recreate")
        );
        assert_eq!(args(&push)[2..5], ["node", "--roles", PUSH_ROLES]);
        let labels = spec.selector.match_labels.as_ref().unwrap();
        assert_eq!(labels["app.kubernetes.io/component"], "push");
    }

    #[test]
    fn a_stopped_push_notifier_has_no_pod_and_names_no_push_secret() {
        let stopped = push_stopped(&cluster(Some("push"))).unwrap();
        assert_eq!(stopped.metadata.name.as_deref(), Some("prod-push"));
        let spec = stopped.spec.as_ref().unwrap();
        assert_eq!(spec.replicas, Some(0));
        let pod = spec.template.spec.as_ref().unwrap();
        assert!(pod.containers[0].env_from.is_none(), "no push variables");
        assert!(pod.volumes.iter().flatten().all(|v| v.name != "push"));
    }

    #[test]
    fn fanout_pods_run_the_fanout_role_alone() {
        let fanout = fanout(&cluster(None)).unwrap();
        assert_eq!(fanout.metadata.name.as_deref(), Some("prod-fanout"));
        assert_eq!(fanout.spec.as_ref().unwrap().replicas, Some(2));
        assert_eq!(args(&fanout)[2..5], ["node", "--roles", "fanout"]);
    }
}
