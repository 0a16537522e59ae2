//! A FoundationDB cluster's workloads behind the gateways, owned by the `CourierCluster`:
//!
//! - `<cluster>-chat`: chat nodes (`courier node --roles chat`), `spec.chat.replicas` of them;
//!   the gateways call them over internal gRPC, one device's requests to one node, found in
//!   the node registry (no Service: the data plane picks among the live ones);
//! - `<cluster>-media`: media nodes (`courier node --roles media`), `spec.media.replicas` of
//!   them, sharing the S3 bucket; they register their HTTP address (the pod IP) and the
//!   gateways forward `/v1/media*` to them; the Service `<cluster>-media` over the same pods
//!   lets an Ingress or HTTPRoute send `/v1/media` to them directly and skip that hop.
//!
//! Both are stateless and roll new pods first; on SIGTERM a pod leaves the registry, serves on
//! for two seconds while the gateways' copies of it expire, then finishes what is in flight.

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Service;

use super::pod::{self, Component, HTTP_PORT, Shutdown};
use super::{
    RenderError, ServiceKind, child_meta, name_and_namespace, owner_reference, service,
    stateless_deployment,
};
use crate::crd::CourierCluster;

/// A chat pod answers the calls in flight (each at most 10 s) after its leave notice.
const CHAT_SHUTDOWN: Shutdown = Shutdown {
    pre_stop_sleep_seconds: 2,
    grace_seconds: 30,
};

/// How long a media pod's transfers in flight may take on SIGTERM (`--drain-timeout`); a
/// download cut then is resumed by the client with `Range`, an upload is sent again.
pub const MEDIA_DRAIN_SECONDS: i64 = 60;

/// The preStop sleep (the Service drops the pod for direct Ingress traffic), the leave notice,
/// the transfers in flight and 10 s of margin.
const MEDIA_SHUTDOWN: Shutdown = Shutdown {
    pre_stop_sleep_seconds: 5,
    grace_seconds: 5 + 2 + MEDIA_DRAIN_SECONDS + 10,
};

/// The name of `cluster`'s chat Deployment.
pub fn chat_name(cluster: &str) -> String {
    format!("{cluster}-chat")
}

/// The name of `cluster`'s media Deployment and Service.
pub fn media_name(cluster: &str) -> String {
    format!("{cluster}-media")
}

/// The chat Deployment of `cluster`.
pub fn chat(cluster: &CourierCluster) -> Result<Deployment, RenderError> {
    let (name, _) = name_and_namespace(cluster)?;
    stateless_deployment(
        cluster,
        Component::Chat,
        &chat_name(&name),
        &cluster.spec.chat,
        pod::node_args("chat", pod::at_pod_ip(), &[]),
        CHAT_SHUTDOWN,
    )
}

/// The media Deployment of `cluster` and its Service, if it has a media store (the API server
/// refuses a FoundationDB cluster without one).
pub fn media(cluster: &CourierCluster) -> Result<Option<(Deployment, Service)>, RenderError> {
    let Some(media) = &cluster.spec.media else {
        return Ok(None);
    };
    let (name, namespace) = name_and_namespace(cluster)?;
    let extra = [
        "--advertise-http".to_owned(),
        pod::http_at_pod_ip(),
        "--drain-timeout".to_owned(),
        format!("{MEDIA_DRAIN_SECONDS}s"),
    ];
    let args = pod::node_args("media", pod::at_pod_ip(), &extra);
    let deployment = stateless_deployment(
        cluster,
        Component::Media,
        &media_name(&name),
        &media.pods,
        args,
        MEDIA_SHUTDOWN,
    )?;
    let meta = child_meta(
        &media_name(&name),
        &namespace,
        &name,
        Component::Media,
        owner_reference(cluster)?,
    );
    let service = service(
        meta,
        &name,
        Component::Media,
        &[("http", HTTP_PORT, None)],
        ServiceKind::Typed("ClusterIP"),
    );
    Ok(Some((deployment, service)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::render::fixtures::{args, foundation_db_cluster};

    fn env_names(deployment: &Deployment) -> Vec<String> {
        let spec = deployment
            .spec
            .as_ref()
            .unwrap()
            .template
            .spec
            .as_ref()
            .unwrap();
        let container = &spec.containers[0];
        let mut names: Vec<String> = container
            .env
            .iter()
            .flatten()
            .map(|e| e.name.clone())
            .collect();
        names.extend(
            container
                .env_from
                .iter()
                .flatten()
                .filter_map(|e| e.secret_ref.as_ref().map(|s| format!("envFrom:{}", s.name))),
        );
        names
    }

    #[test]
    fn chat_pods_run_the_chat_role_alone_with_no_client_secret() {
        let mut cluster = foundation_db_cluster(Some("push"));
        cluster.spec.chat.replicas = 5;
        let chat = chat(&cluster).unwrap();
        assert_eq!(chat.metadata.name.as_deref(), Some("prod-chat"));
        let spec = chat.spec.as_ref().unwrap();
        assert_eq!(spec.replicas, Some(5));
        assert_eq!(args(&chat)[2..5], ["node", "--roles", "chat"]);
        let labels = spec.selector.match_labels.as_ref().unwrap();
        assert_eq!(labels["app.kubernetes.io/component"], "chat");
        let env = env_names(&chat);
        for secret in ["COURIER_JWT_SECRET", "envFrom:s3", "envFrom:push"] {
            assert!(!env.iter().any(|e| e == secret), "{secret} in {env:?}");
        }
    }

    #[test]
    fn media_pods_run_the_media_role_alone_behind_their_service_with_the_s3_credentials() {
        let mut cluster = foundation_db_cluster(Some("push"));
        cluster.spec.media.as_mut().unwrap().pods.replicas = 3;
        let (media, service) = media(&cluster).unwrap().unwrap();
        assert_eq!(media.metadata.name.as_deref(), Some("prod-media"));
        assert_eq!(media.spec.as_ref().unwrap().replicas, Some(3));
        let args = args(&media);
        assert_eq!(args[2..5], ["node", "--roles", "media"]);
        let after = |flag: &str| {
            let at = args.iter().position(|a| a == flag).unwrap();
            args[at + 1].clone()
        };
        assert_eq!(after("--advertise-http"), "$(POD_IP):8080");
        assert_eq!(after("--drain-timeout"), "60s");
        let env = env_names(&media);
        for secret in [
            "COURIER_JWT_SECRET",
            "COURIER_MEDIA_S3_BUCKET",
            "envFrom:s3",
        ] {
            assert!(env.iter().any(|e| e == secret), "{secret} in {env:?}");
        }
        assert!(!env.iter().any(|e| e == "envFrom:push"), "{env:?}");
        let pod = media.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
        assert_eq!(pod.termination_grace_period_seconds, Some(77));

        assert_eq!(service.metadata.name.as_deref(), Some("prod-media"));
        let spec = service.spec.unwrap();
        assert_eq!(spec.type_.as_deref(), Some("ClusterIP"));
        assert_eq!(
            spec.selector.unwrap()["app.kubernetes.io/component"],
            "media"
        );
        assert_eq!(spec.ports.unwrap()[0].port, HTTP_PORT);
    }

    #[test]
    fn a_cluster_without_a_media_store_gets_no_media_pods() {
        let mut cluster = foundation_db_cluster(None);
        cluster.spec.media = None;
        assert!(media(&cluster).unwrap().is_none());
    }
}
