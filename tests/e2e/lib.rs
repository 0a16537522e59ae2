//! What the kind end-to-end tests share: where the cluster under test is (from the
//! environment `tests/e2e/run.sh` sets), clients with tokens, and the history checks.
//!
//! The suite runs only when `COURIER_E2E=1`; elsewhere (`cargo test --workspace`) every test
//! returns at once after saying so.

use std::time::{Duration, Instant};

use courier_client::proto::{Body, Encoding, Event, EventPayload};
use courier_client::{Client, Target};

/// Longest wait for anything the suite expects (pods starting, a move being planned).
pub const WAIT: Duration = Duration::from_secs(600);

/// The cluster under test.
pub struct E2e {
    /// The Kubernetes namespace of the CourierCluster.
    pub namespace: String,
    /// The CourierCluster's name.
    pub cluster: String,
    /// The gateway Service as the host reaches it (`ws://127.0.0.1:30080`).
    pub gateway: String,
    /// The client token secret of the cluster.
    pub jwt_secret: String,
    /// The Kubernetes API.
    pub kube: kube::Client,
}

impl E2e {
    /// The cluster of `tests/e2e/run.sh`, or `None` (and a note) unless `COURIER_E2E=1`.
    pub async fn from_env() -> Option<E2e> {
        if std::env::var("COURIER_E2E").as_deref() != Ok("1") {
            eprintln!("skipped: the kind suite runs with COURIER_E2E=1 (tests/e2e/README.md)");
            return None;
        }
        let var =
            |name: &str, default: &str| std::env::var(name).unwrap_or_else(|_| default.to_owned());
        Some(E2e {
            namespace: var("COURIER_E2E_NAMESPACE", "courier"),
            cluster: var("COURIER_E2E_CLUSTER", "e2e"),
            gateway: var("COURIER_E2E_GATEWAY", "ws://127.0.0.1:30080"),
            jwt_secret: std::env::var("COURIER_E2E_JWT_SECRET")
                .expect("COURIER_E2E_JWT_SECRET: the cluster's client token secret"),
            kube: kube::Client::try_default()
                .await
                .expect("a kubeconfig for the kind cluster"),
        })
    }

    /// A connection of `user`'s phone that has had its catch-up, retried until the gateways
    /// take it (pods may be starting or going).
    pub async fn connect(&self, user: &str) -> Client {
        self.connect_with_catch_up(user).await.0
    }

    /// As [`E2e::connect`], with the events of the catch-up.
    pub async fn connect_with_catch_up(&self, user: &str) -> (Client, Vec<Event>) {
        let token = courier_core::auth::mint(
            self.jwt_secret.as_bytes(),
            user,
            "phone",
            Duration::from_secs(3600),
        )
        .expect("sign a token");
        let deadline = Instant::now() + WAIT;
        loop {
            match Client::connect(&self.gateway, &token, Encoding::Json).await {
                Ok(mut client) => {
                    if let Ok(catch_up) = client.events_until_sync_done().await {
                        return (client, catch_up);
                    }
                }
                Err(e) => assert!(Instant::now() < deadline, "cannot connect {user}: {e}"),
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}

/// One sender's conversation: its messages in send order with their seqs.
#[derive(Debug, Default)]
pub struct Conversation {
    /// The sender.
    pub sender: String,
    /// The recipient.
    pub peer: String,
    /// `(client_msg_id, seq)` in send order.
    pub sent: Vec<(String, u64)>,
}

impl Conversation {
    /// A conversation from `sender` to `peer`, nothing sent yet.
    pub fn new(sender: &str, peer: &str) -> Self {
        Conversation {
            sender: sender.to_owned(),
            peer: peer.to_owned(),
            sent: Vec::new(),
        }
    }

    /// Sends the next message, reconnecting and retrying with the same id until it is taken
    /// (a gateway or sequencer going away costs a delay, never the message).
    pub async fn send_next(&mut self, e2e: &E2e, client: &mut Client) {
        let id = format!("{}-{}", self.sender, self.sent.len() + 1);
        let deadline = Instant::now() + WAIT;
        loop {
            let attempt = client
                .send_with_retry(Target::User(self.peer.clone()), &id, Body::Text(id.clone()))
                .await;
            match attempt {
                Ok(sent) => {
                    self.sent.push((id, sent.seq));
                    return;
                }
                Err(e) => {
                    assert!(Instant::now() < deadline, "{id} was never taken: {e}");
                    *client = e2e.connect(&self.sender).await;
                }
            }
        }
    }

    /// The history check: seqs dense from 1 in send order, and the peer reads exactly those
    /// messages, once each, in order.
    pub async fn check(&self, e2e: &E2e) {
        let seqs: Vec<u64> = self.sent.iter().map(|(_, seq)| *seq).collect();
        let dense: Vec<u64> = (1..=seqs.len() as u64).collect();
        assert_eq!(
            seqs, dense,
            "dense seqs from {} to {}",
            self.sender, self.peer
        );
        let (mut reader, catch_up) = e2e.connect_with_catch_up(&self.peer).await;
        let mut received = Vec::new();
        let mut events = catch_up.into_iter();
        while received.len() < self.sent.len() {
            let event = match events.next() {
                Some(event) => event,
                None => tokio::time::timeout(WAIT, reader.next_event())
                    .await
                    .expect("an event in time")
                    .expect("an event"),
            };
            if let EventPayload::Message { client_msg_id, .. } = event.payload {
                received.push((client_msg_id, event.seq));
            }
        }
        assert_eq!(
            received, self.sent,
            "{} reads what {} sent",
            self.peer, self.sender
        );
    }
}

/// Whether `pod` has its `Ready` condition.
pub fn pod_is_ready(pod: &k8s_openapi::api::core::v1::Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// Waits until `condition` holds, polling every 2 s, for at most [`WAIT`].
pub async fn eventually<F, Fut>(what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + WAIT;
    while !condition().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}
