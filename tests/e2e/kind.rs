//! The kind suite: the operator and the data plane on a real Kubernetes cluster with a
//! one-pod FoundationDB, set up by `tests/e2e/run.sh`. Runs only with `COURIER_E2E=1`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use courier_client::Target;
use courier_client::proto::EventPayload;
use courier_e2e::{Conversation, E2e, WAIT, eventually, pod_is_ready};
use courier_operator::crd::{CourierCluster, GatewayPool, SequencerShardSet};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::api::{DeleteParams, Patch, PatchParams};

#[tokio::test]
async fn a_message_sent_through_the_gateway_service_is_received() {
    let Some(e2e) = E2e::from_env().await else {
        return;
    };
    let mut alice = e2e.connect("e2e-alice").await;
    let mut bob = e2e.connect("e2e-bob").await;
    let sent = alice
        .send_text(Target::User("e2e-bob".into()), "hello-1", "hello")
        .await
        .expect("sent");
    let event = tokio::time::timeout(WAIT, bob.next_event())
        .await
        .expect("an event in time")
        .expect("an event");
    assert_eq!(event.seq, sent.seq);
    assert!(
        matches!(event.payload, EventPayload::Message { client_msg_id, .. } if client_msg_id == "hello-1")
    );
}

/// Sends in `conversation` until `stop`.
async fn keep_sending(
    e2e: Arc<E2e>,
    mut conversation: Conversation,
    stop: Arc<AtomicBool>,
) -> Conversation {
    let mut client = e2e.connect(&conversation.sender).await;
    while !stop.load(Ordering::Relaxed) {
        conversation.send_next(&e2e, &mut client).await;
    }
    conversation
}

/// Runs `during` while four conversations keep sending, then checks their histories.
async fn under_load<F: std::future::Future<Output = ()>>(e2e: Arc<E2e>, tag: &str, during: F) {
    let stop = Arc::new(AtomicBool::new(false));
    let senders: Vec<_> = (0..4)
        .map(|i| {
            let conversation = Conversation::new(&format!("{tag}-s{i}"), &format!("{tag}-r{i}"));
            tokio::spawn(keep_sending(e2e.clone(), conversation, stop.clone()))
        })
        .collect();
    during.await;
    stop.store(true, Ordering::Relaxed);
    for sender in senders {
        sender.await.expect("a sender").check(&e2e).await;
    }
}

#[tokio::test]
async fn a_sequencer_pod_killed_under_load_loses_nothing_and_keeps_order() {
    let Some(e2e) = E2e::from_env().await else {
        return;
    };
    let e2e = Arc::new(e2e);
    let pods = Api::<Pod>::namespaced(e2e.kube.clone(), &e2e.namespace);
    let victim = format!("{}-sequencers-0", e2e.cluster);
    let before = pods
        .get(&victim)
        .await
        .expect("the sequencer pod")
        .metadata
        .uid;
    under_load(e2e.clone(), "kill", async move {
        tokio::time::sleep(std::time::Duration::from_secs(5)).await;
        pods.delete(
            &victim,
            &DeleteParams {
                grace_period_seconds: Some(0),
                ..DeleteParams::default()
            },
        )
        .await
        .expect("delete the pod");
        eventually("the sequencer pod to come back", || async {
            let pod = pods.get_opt(&victim).await.ok().flatten();
            pod.is_some_and(|p| p.metadata.uid != before && pod_is_ready(&p))
        })
        .await;
    })
    .await;
}

#[tokio::test]
async fn a_hot_conversation_gets_its_shard_moved_by_the_rebalancer() {
    let Some(e2e) = E2e::from_env().await else {
        return;
    };
    let e2e = Arc::new(e2e);
    let sets = Api::<SequencerShardSet>::namespaced(e2e.kube.clone(), &e2e.namespace);
    let name = format!("{}-sequencers", e2e.cluster);
    let moves_before = recent_moves(&sets, &name).await;
    let watch = sets.clone();
    under_load(e2e.clone(), "hot", async move {
        eventually("the rebalancer to move a shard", || async {
            recent_moves(&watch, &name).await > moves_before
        })
        .await;
    })
    .await;
    let set = sets
        .get(&format!("{}-sequencers", e2e.cluster))
        .await
        .unwrap();
    let last = set.status.unwrap().recent_moves.pop().unwrap();
    assert!(
        last.outcome.starts_with("epoch "),
        "the move succeeded: {last:?}"
    );
}

async fn recent_moves(sets: &Api<SequencerShardSet>, name: &str) -> usize {
    sets.get(name)
        .await
        .ok()
        .and_then(|s| s.status)
        .map_or(0, |s| s.recent_moves.len())
}

#[tokio::test]
async fn gateways_scale_up_and_down_while_clients_reconnect() {
    let Some(e2e) = E2e::from_env().await else {
        return;
    };
    let e2e = Arc::new(e2e);
    let clusters = Api::<CourierCluster>::namespaced(e2e.kube.clone(), &e2e.namespace);
    let deployments = Api::<Deployment>::namespaced(e2e.kube.clone(), &e2e.namespace);
    let pools = Api::<GatewayPool>::namespaced(e2e.kube.clone(), &e2e.namespace);
    let pool = format!("{}-gateways", e2e.cluster);
    let ready = |deployments: Api<Deployment>, name: String, want: i32| async move {
        deployments
            .get(&name)
            .await
            .ok()
            .and_then(|d| d.status)
            .is_some_and(|s| s.ready_replicas == Some(want) && s.replicas == Some(want))
    };
    let cluster = e2e.cluster.clone();
    under_load(e2e.clone(), "scale", async move {
        for want in [2, 1] {
            let patch = serde_json::json!({ "spec": { "gateways": { "minReplicas": want, "maxReplicas": want } } });
            clusters
                .patch(&cluster, &PatchParams::default(), &Patch::Merge(&patch))
                .await
                .expect("patch the cluster");
            eventually(&format!("{want} gateway pods"), || ready(deployments.clone(), pool.clone(), want)).await;
            let status = pools.get(&pool).await.unwrap().status.unwrap_or_default();
            assert_eq!(status.replicas, want);
        }
    })
    .await;
}
