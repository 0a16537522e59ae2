//! A chat node's [`RoutedSequencer`] over two sequencer nodes served on 127.0.0.1: appends
//! reach the shard's owner, in order; after a hand-off the stale route is forgotten and the
//! new owner goes on with the next seq.

use courier_core::leases::Ownership;
use courier_core::metrics::Metrics;
use courier_core::sequencing::{
    CommitListener, Listeners, PendingAppend, Sequencer, SequencerError,
};
use courier_proto::{Body, Sender};
use courier_rpc::{ClusterToken, SequencerService};
use courier_sequencer::routing::RoutedSequencer;
use courier_sequencer::{LocalSequencer, SequencerLimits};
use courier_store::embedded::EmbeddedEngine;
use courier_store::nodes::NodeRecord;
use courier_store::{Append, MessageStore, NewConversation};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tokio::net::TcpListener;
use tonic::transport::server::TcpIncoming;

const TOKEN: &str = "courier-test-cluster-token-0123456789abcdef";

fn token() -> ClusterToken {
    ClusterToken::new(TOKEN).unwrap()
}

fn message(id: &str) -> Append {
    let sender = Sender {
        user: "alice".into(),
        device: "p".into(),
    };
    Append {
        create: Some(NewConversation::direct("alice", "bob")),
        ..Append::message("d:1".into(), sender, id.into(), Body::Text(id.into()), None)
    }
}

/// A sequencer node: its sequencer, served over gRPC and registered in the store.
async fn sequencer_node(store: &MessageStore, id: &str) -> Arc<LocalSequencer> {
    let ownership = Ownership {
        node: id.into(),
        lease: Duration::from_secs(30),
    };
    let sequencer = LocalSequencer::start(
        store.clone(),
        ownership,
        SequencerLimits::default(),
        Arc::new(Listeners(Vec::new())),
        Arc::new(Metrics::new()),
    )
    .await
    .unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let service = SequencerService::new(sequencer.clone()).into_server(token());
    tokio::spawn(async move {
        let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(incoming)
            .await
            .unwrap();
    });
    let record = NodeRecord {
        roles: vec!["sequencer".into()],
        address: address.to_string(),
        // Live for the test: an hour (one past any lease a node writes is damage).
        lease_until_ms: courier_core::clock::now_ms() + 3_600_000,
        started_ms: 0,
        connections: 0,
        ..NodeRecord::default()
    };
    store.register_node(id, &record).await.unwrap();
    sequencer
}

#[tokio::test]
async fn appends_follow_their_shard_to_its_new_owner() {
    let dir = tempfile::tempdir().unwrap();
    let kv = Arc::new(EmbeddedEngine::open(&dir.path().join("s")).unwrap());
    let store = MessageStore::open(kv, b"", 4).await.unwrap();
    let first = sequencer_node(&store, "s1").await;
    let second = sequencer_node(&store, "s2").await;
    assert_eq!(
        first.owned().len(),
        4,
        "s1 started first and holds every shard"
    );

    let commits = Arc::new(Commits::default());
    let chat = RoutedSequencer::new(store.clone(), None, token(), commits.clone());
    let pending: Vec<PendingAppend> = (1..=50)
        .map(|i| chat.submit(message(&format!("m{i}"))))
        .collect();
    let seqs: Vec<u64> = futures::future::join_all(pending)
        .await
        .into_iter()
        .map(|r| r.unwrap().seq)
        .collect();
    assert_eq!(
        seqs,
        (1..=50).collect::<Vec<u64>>(),
        "in submit order, through s1"
    );

    let shard = store.shard_of("d:1");
    first.hand_off(shard, "s2").await.unwrap();
    second.keep_round().await;

    // The cached route still points at s1: that append is refused (the client retries) and the
    // route is forgotten; the next one goes to s2, which continues the conversation.
    assert!(matches!(
        chat.submit(message("stale")).await,
        Err(SequencerError::ShardMoved)
    ));
    let next = chat.submit(message("m51")).await.unwrap();
    assert_eq!(next.seq, 51);
    let retried = chat.submit(message("stale")).await.unwrap();
    assert_eq!((retried.seq, retried.duplicate), (52, false));
}

#[tokio::test]
async fn a_chat_node_that_runs_a_sequencer_appends_to_its_own_shards_in_process() {
    let dir = tempfile::tempdir().unwrap();
    let kv = Arc::new(EmbeddedEngine::open(&dir.path().join("s")).unwrap());
    let store = MessageStore::open(kv, b"", 4).await.unwrap();
    let own = sequencer_node(&store, "s1").await;
    let commits = Arc::new(Commits::default());
    let chat = RoutedSequencer::new(
        store.clone(),
        Some(("s1".into(), own)),
        token(),
        commits.clone(),
    );
    assert_eq!(chat.submit(message("m1")).await.unwrap().seq, 1);
    assert_eq!(
        commits.0.load(Ordering::Relaxed),
        0,
        "the local sequencer tells its own listeners"
    );
}

/// Counts the events it is told of.
#[derive(Default)]
struct Commits(AtomicUsize);

impl CommitListener for Commits {
    fn committed(&self, _shard: u32, events: usize) {
        self.0.fetch_add(events, Ordering::Relaxed);
    }
}
