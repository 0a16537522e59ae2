//! The connection task on a real WebSocket (127.0.0.1, an ephemeral port), with the chat role in
//! process over a store that fails on demand, and a sequencer whose commits the test answers:
//! the error paths a running server does not let a black-box test reach.

use axum::Router;
use axum::extract::ws::WebSocketUpgrade;
use axum::http::HeaderMap;
use axum::routing::get;
use courier_chat::receipts::ReceiptRelay;
use courier_chat::{Chat, ChatBinding, ChatLimits};
use courier_client::Client;
use courier_core::auth::Identity;
use courier_core::context::Context;
use courier_core::gateways::{Gateways, NoGateways};
use courier_core::membership::MembershipCache;
use courier_core::metrics::Metrics;
use courier_core::sequencing::{PendingAppend, PendingTrim, Sequencer, SequencerError};
use courier_core::storage_health::StorageHealth;
use courier_gateway::drain::GatewayDrain;
use courier_gateway::pages::PageBudget;
use courier_gateway::routes::Routes;
use courier_gateway::{ClusterRoutes, Gateway, GatewayLimits};
use courier_proto::{
    Body, ClientFrame, Encoding, ErrorCode, ErrorFrame, Send, Sender, ServerFrame, pb,
};
use courier_store::faulty_engine::FaultyEngine;
use courier_store::ownership::Duty;
use courier_store::{
    Append, AppendOutcome, Batch, DeviceRecord, HeadCache, KvEngine, MediaReference, MessageStore,
    NewConversation, StoreError,
};
use prost::Message as _;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{Notify, oneshot};

/// Longest wait for a frame a test expects.
const WAIT: Duration = Duration::from_secs(30);

type Reply = oneshot::Sender<Result<AppendOutcome, SequencerError>>;

/// Holds every append until the test answers it.
#[derive(Default)]
struct HeldSequencer {
    held: Mutex<Vec<Reply>>,
    submitted: Notify,
}

impl HeldSequencer {
    /// The reply of the next append submitted.
    async fn next_held(&self) -> Reply {
        loop {
            let submitted = self.submitted.notified();
            if let Some(reply) = self.held.lock().unwrap().pop() {
                return reply;
            }
            tokio::time::timeout(WAIT, submitted)
                .await
                .expect("an append in time");
        }
    }
}

impl Sequencer for HeldSequencer {
    fn submit(&self, _append: Append) -> PendingAppend {
        let (reply, outcome) = oneshot::channel();
        self.held.lock().unwrap().push(reply);
        self.submitted.notify_one();
        Box::pin(async move { outcome.await.unwrap_or(Err(SequencerError::ShardMoved)) })
    }

    fn trim(&self, _conv: &str, _floor: u64, _media: Vec<MediaReference>) -> PendingTrim {
        Box::pin(async { Ok(0) })
    }
}

/// A gateway over `store`, its chat role appending through `sequencer`.
fn gateway(store: MessageStore, sequencer: Arc<HeldSequencer>) -> Arc<Gateway> {
    gateway_with_routes(store, sequencer, None, GatewayLimits::default())
}

/// As [`gateway`], writing its devices' routes to `cluster_routes` (a cluster's gateway node).
fn gateway_with_routes(
    store: MessageStore,
    sequencer: Arc<HeldSequencer>,
    cluster_routes: Option<Arc<ClusterRoutes>>,
    limits: GatewayLimits,
) -> Arc<Gateway> {
    let metrics = Arc::new(Metrics::new());
    let context = Context {
        store: store.clone(),
        gateways: Arc::new(NoGateways),
        membership: Arc::new(MembershipCache::new(store.clone())),
        metrics: metrics.clone(),
    };
    let receipts = ReceiptRelay::new(&context, 100);
    let storage = StorageHealth::new(store.clone(), None, 0, None, 0);
    let chat = Chat::new(context, sequencer, receipts, ChatLimits::default(), storage);
    let routes = Arc::new(Routes::new(metrics.clone()));
    Arc::new(Gateway {
        chat: ChatBinding::Local(Arc::new(chat)),
        store,
        routes: routes.clone(),
        cluster_routes,
        metrics,
        limits,
        drain: Arc::new(GatewayDrain::new(routes, Duration::ZERO, Duration::ZERO)),
        owed_pushes: None,
        pages: PageBudget::new(0, 64 * 1024, Default::default()),
    })
}

/// Serves `gateway`'s `/v1/ws` on 127.0.0.1; the bearer token is `user:device`, taken as is.
/// Returns the base URL.
async fn serve(gateway: Arc<Gateway>) -> String {
    let upgrade = move |headers: HeaderMap, ws: WebSocketUpgrade| async move {
        let token = headers["authorization"].to_str().unwrap();
        let (user, device) = token.trim_start_matches("Bearer ").split_once(':').unwrap();
        let who = Identity {
            user: user.to_owned(),
            device: device.to_owned(),
            issued_at_ms: 0,
        };
        let encoding = Encoding::Json;
        ws.protocols([encoding.subprotocol()])
            .on_upgrade(move |socket| gateway.serve(socket, who, encoding))
    };
    let app = Router::new().route("/v1/ws", get(upgrade));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    format!("ws://{address}")
}

/// A gateway over `store` whose sequencer holds every append, and `device` (`user:device`)
/// connected to it and caught up: the gateway, its URL and the client.
async fn caught_up(store: &MessageStore, device: &str) -> (Arc<Gateway>, String, Client) {
    let gateway = gateway(store.clone(), Arc::new(HeldSequencer::default()));
    let url = serve(gateway.clone()).await;
    let mut client = Client::connect(&url, device, Encoding::Json).await.unwrap();
    client.events_until_sync_done().await.unwrap();
    (gateway, url, client)
}

/// The first `sent` in a conversation the connection has not seen reads the device's cursor
/// first. A store that fails that read does not take the `sent` back from the client (the
/// message is committed) nor close the connection.
#[tokio::test]
async fn a_sent_is_written_and_the_connection_stays_open_when_the_cursor_read_before_it_fails() {
    let engine = FaultyEngine::new();
    let sequencer = Arc::new(HeldSequencer::default());
    let url = serve(gateway(engine.store(4).await, sequencer.clone())).await;
    let mut alice = Client::connect(&url, "alice:phone", Encoding::Json)
        .await
        .unwrap();
    alice.events_until_sync_done().await.unwrap();

    alice
        .send_frame(&ClientFrame::Send(Send {
            reference: Some(1),
            client_msg_id: "m1".into(),
            conversation_id: None,
            to_user: Some("bob".into()),
            body: Body::Text("hi".into()),
            reply_to: None,
        }))
        .await
        .unwrap();
    let commit = sequencer.next_held().await;
    // Committed as seq 5 of a conversation the connection has not seen; the store then fails.
    engine.set_read_fault(Some(Box::new(|_| {
        Some(StoreError::Engine("injected read fault".into()))
    })));
    let outcome = AppendOutcome {
        seq: 5,
        server_msg_id: "s5".into(),
        ts_ms: 1,
        duplicate: false,
    };
    commit.send(Ok(outcome)).unwrap();
    match alice.next_frame_within(WAIT).await.unwrap() {
        ServerFrame::Sent(sent) => {
            assert_eq!((sent.client_msg_id.as_str(), sent.seq), ("m1", 5));
            assert!(!sent.duplicate);
        }
        other => panic!("expected sent, got {other:?}"),
    }
    engine.set_read_fault(None);
    alice.ping().await.expect("the connection stays open");
}

/// A route whose clearing fails as its connection ends (the store unavailable) is cleared
/// again once the store is back. Left, it named this live gateway for good: the push notifier
/// took the device for connected and notified it of nothing.
#[tokio::test]
async fn a_route_whose_clearing_failed_as_its_connection_ended_is_cleared_again() {
    let engine = FaultyEngine::new();
    let store = engine.store(4).await;
    let routes = Arc::new(ClusterRoutes::new(store.clone(), "g1".into()));
    let sequencer = Arc::new(HeldSequencer::default());
    let gateway = gateway_with_routes(
        store.clone(),
        sequencer,
        Some(routes.clone()),
        GatewayLimits::default(),
    );
    let url = serve(gateway.clone()).await;
    let mut alice = Client::connect(&url, "alice:phone", Encoding::Json)
        .await
        .unwrap();
    alice.events_until_sync_done().await.unwrap();
    assert_eq!(store.routes("alice").await.unwrap().len(), 1);

    engine.set_fault(Some(Box::new(|_| {
        Some(StoreError::Engine("injected commit fault".into()))
    })));
    drop(alice);
    let deadline = tokio::time::Instant::now() + WAIT;
    while gateway.routes.count() > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the connection never left"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(store.routes("alice").await.unwrap().len(), 1, "not cleared");
    assert_eq!(
        routes.clear_left(&gateway.routes).await,
        1,
        "the store still fails"
    );

    engine.set_fault(None);
    assert_eq!(routes.clear_left(&gateway.routes).await, 0);
    assert!(store.routes("alice").await.unwrap().is_empty());
}

/// Two connections of one device on one gateway (two tabs of a web app sharing its device id):
/// the newer closing first leaves the device's route in place, since the older is still open
/// there; the route goes once the last one closes. Cleared by the newer one, the route was
/// gone while the older stayed connected: no event reached it live for as long as it stayed,
/// and the push notifier took the device for offline.
#[tokio::test]
async fn a_devices_route_stays_while_one_of_its_connections_is_open_here() {
    let engine = FaultyEngine::new();
    let store = engine.store(4).await;
    let routes = Arc::new(ClusterRoutes::new(store.clone(), "g1".into()));
    let gateway = gateway_with_routes(
        store.clone(),
        Arc::new(HeldSequencer::default()),
        Some(routes),
        GatewayLimits::default(),
    );
    let url = serve(gateway.clone()).await;
    let mut older = Client::connect(&url, "alice:phone", Encoding::Json)
        .await
        .unwrap();
    older.events_until_sync_done().await.unwrap();
    let mut newer = Client::connect(&url, "alice:phone", Encoding::Json)
        .await
        .unwrap();
    newer.events_until_sync_done().await.unwrap();
    let until_open = |open: usize| {
        let gateway = gateway.clone();
        async move {
            let deadline = tokio::time::Instant::now() + WAIT;
            while gateway.routes.count() != open {
                assert!(tokio::time::Instant::now() < deadline, "still open");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    };

    newer.close().await;
    until_open(1).await;
    let left = store.routes("alice").await.unwrap();
    assert_eq!(
        left.len(),
        1,
        "the older connection's device keeps its route"
    );
    assert_eq!(
        (left[0].device.as_str(), left[0].gateway.as_str()),
        ("phone", "g1")
    );

    older.close().await;
    until_open(0).await;
    assert!(
        store.routes("alice").await.unwrap().is_empty(),
        "no route once none is open"
    );
}

/// A device's record is written when a connection of it opens and closes; a connection open
/// for weeks would list it as that long inactive. The gateway's pass over its connections
/// records their devices as seen now.
#[tokio::test]
async fn a_pass_over_the_connections_records_their_devices_as_seen() {
    let engine = FaultyEngine::new();
    let store = engine.store(4).await;
    let (gateway, _url, _alice) = caught_up(&store, "alice:phone").await;
    // The record as it stands once the connection has been open for weeks.
    let weeks_ago = |record: Option<&DeviceRecord>| {
        record.map(|r| DeviceRecord {
            last_seen_ms: 1,
            ..r.clone()
        })
    };
    store
        .record_device_activity("alice", "phone", weeks_ago)
        .await
        .unwrap();

    assert_eq!(gateway.record_connected_devices().await, 1);
    let record = store.device("alice", "phone").await.unwrap().unwrap();
    assert!(record.last_seen_ms > 1, "{record:?}");
}

/// An unlink reaches the gateways holding the device's connections by a call that may be
/// lost (in a cluster: a gateway node unreachable a moment, a timeout, too many offers in
/// flight), here not made at all (`NoGateways`). The gateway's pass over its connections then
/// closes them (1008): without it, the unlinked device read and sent on its open connection
/// for as long as its client kept it open.
#[tokio::test]
async fn a_pass_over_the_connections_closes_those_of_a_device_unlinked_unseen() {
    let engine = FaultyEngine::new();
    let store = engine.store(4).await;
    let (gateway, url, mut phone) = caught_up(&store, "alice:phone").await;
    let mut laptop = Client::connect(&url, "alice:laptop", Encoding::Json)
        .await
        .unwrap();
    laptop.events_until_sync_done().await.unwrap();
    let ChatBinding::Local(chat) = &gateway.chat else {
        unreachable!("the chat role is in process");
    };
    chat.unlink_device("alice", "phone").await.unwrap();
    phone
        .ping()
        .await
        .expect("no gateway was told of the unlink");

    gateway.record_connected_devices().await;
    match phone.next_frame_within(WAIT).await {
        Err(courier_client::ClientError::Closed(Some((code, _)))) => assert_eq!(code, 1008),
        other => panic!("expected the unlinked device's connection closed, got {other:?}"),
    }
    laptop
        .ping()
        .await
        .expect("the other device stays connected");
}

/// A new device whose upgrade's check passed but which finds the user's last place taken
/// when its connection records it (another new device linked meanwhile) is told
/// `forbidden` and closed 1008, not recorded; the linked device goes on.
#[tokio::test]
async fn a_connection_of_a_device_past_the_users_limit_is_refused_and_closed() {
    let store = FaultyEngine::new().store(4).await;
    let limits = GatewayLimits {
        max_devices_per_user: 1,
        ..GatewayLimits::default()
    };
    let gateway = gateway_with_routes(
        store.clone(),
        Arc::new(HeldSequencer::default()),
        None,
        limits,
    );
    let url = serve(gateway.clone()).await;
    let mut phone = Client::connect(&url, "alice:phone", Encoding::Json)
        .await
        .unwrap();
    phone.events_until_sync_done().await.unwrap();
    // This harness's upgrade checks nothing, as if the laptop's check had raced the phone.
    let mut laptop = Client::connect(&url, "alice:laptop", Encoding::Json)
        .await
        .unwrap();
    match laptop.next_frame_within(WAIT).await {
        Ok(ServerFrame::Error(e)) => {
            assert_eq!(e.code, courier_proto::ErrorCode::Forbidden, "{e:?}");
            assert!(e.message.contains("DELETE /v1/devices/"), "{e:?}");
        }
        other => panic!("expected forbidden, got {other:?}"),
    }
    match laptop.next_frame_within(WAIT).await {
        Err(courier_client::ClientError::Closed(Some((code, _)))) => assert_eq!(code, 1008),
        other => panic!("expected the connection closed, got {other:?}"),
    }
    assert_eq!(store.device("alice", "laptop").await.unwrap(), None);
    phone
        .ping()
        .await
        .expect("the linked device stays connected");
}

/// Appends messages `from..to` from alice to bob in `conv`, through a lease the test takes.
async fn messages_to_bob(store: &MessageStore, conv: &str, ids: std::ops::Range<usize>) {
    messages_from(store, ("alice", "bob"), conv, ids).await;
}

/// Appends messages `from..to` from `sender` to `recipient` in their direct conversation
/// `conv`, through a lease the test takes.
async fn messages_from(
    store: &MessageStore,
    (sender, recipient): (&str, &str),
    conv: &str,
    ids: std::ops::Range<usize>,
) {
    let shard = store.shard_of(conv);
    let leases = store
        .acquire_shards(Duty::Sequencing, "test", &[shard], usize::MAX, 0, u64::MAX)
        .await
        .unwrap();
    let mut heads = HeadCache::default();
    for i in ids {
        let author = Sender {
            user: sender.into(),
            device: "p".into(),
        };
        let append = Append {
            create: Some(NewConversation::direct(sender, recipient)),
            ..Append::message(
                conv.into(),
                author,
                format!("m{i}"),
                Body::Text("hi".into()),
                None,
            )
        };
        let sent = store
            .append(leases[0], &mut heads, &[append])
            .await
            .unwrap();
        assert!(sent[0].is_ok(), "{sent:?}");
    }
}

/// The seqs of the next `count` events the client reads (any other frame fails the test).
async fn next_seqs(client: &mut Client, count: usize) -> Vec<u64> {
    let mut seqs = Vec::new();
    while seqs.len() < count {
        match client.next_frame_within(WAIT).await.unwrap() {
            ServerFrame::Event(event) => seqs.push(event.seq),
            other => panic!("expected an event, got {other:?}"),
        }
    }
    seqs
}

/// An event a gateway node could not decode in a delivery (a fanout node of another version)
/// is not skipped: the connections of its recipients read it from the store, in its place
/// among the events delivered around it, or alone when none follows; one whose place is
/// unknown tells them to reconnect (their catch-up reads it). A stored event this node cannot
/// decode either stops its conversation's catch-up with `internal`, at each connection: an
/// error the client sees, never a silent stall.
#[tokio::test]
async fn an_event_the_gateway_could_not_decode_is_read_from_the_store_in_its_place() {
    let engine = FaultyEngine::new();
    let store = engine.store(4).await;
    let (gateway, url, mut bob) = caught_up(&store, "bob:phone").await;
    let conv = "d:alice:bob";
    messages_to_bob(&store, conv, 0..4).await;
    let events = store
        .events_within(conv, 0, 4, 10, usize::MAX)
        .await
        .unwrap();
    let bob_only = vec!["bob".to_owned()];

    // Seq 2 did not decode; 1 and 3 did, and came around it in the same batch.
    let routes = &gateway.routes;
    routes
        .deliver(vec![(events[0].clone(), Arc::new(bob_only.clone()))])
        .await
        .unwrap();
    routes.missed(&bob_only, Some((conv, 2)));
    routes
        .deliver(vec![(events[2].clone(), Arc::new(bob_only.clone()))])
        .await
        .unwrap();
    assert_eq!(next_seqs(&mut bob, 3).await, [1, 2, 3]);

    // The last event of the conversation: no later one would reveal the gap.
    routes.missed(&bob_only, Some((conv, 4)));
    assert_eq!(next_seqs(&mut bob, 1).await, [4]);

    // Not even its conversation could be read.
    routes.missed(&bob_only, None);
    match bob.next_frame_within(WAIT).await.unwrap() {
        ServerFrame::Reconnect(_) => {}
        other => panic!("expected reconnect, got {other:?}"),
    }

    // Seq 5 is stored in a form this node cannot decode (a kind only a newer node knows).
    messages_to_bob(&store, conv, 4..5).await;
    let mut newer = pb::Event::from(events[0].clone());
    (newer.seq, newer.kind) = (5, "reaction".into());
    let mut batch = Batch::new();
    batch.set(store.keys().event(conv, 5), newer.encode_to_vec());
    engine.commit(batch).await.unwrap();
    let mut bob = Client::connect(&url, "bob:phone", Encoding::Json)
        .await
        .unwrap();
    // Its conversation's catch-up stops there: told, not stalled.
    loop {
        match bob.next_frame_within(WAIT).await.unwrap() {
            ServerFrame::Event(event) => assert!(event.seq < 5, "{event:?}"),
            ServerFrame::Error(error) => break assert_eq!(error.code, ErrorCode::Internal),
            other => panic!("expected an internal error, got {other:?}"),
        }
    }
}

/// A delivered event at seq 0, which no event has, or past its conversation's head (damage in
/// an outbox entry, or in transit), is passed over: the conversation's next events reach the
/// connection. Past the head, the gap before it was filled through it: the connection's place
/// went past every later event of that conversation, delivered to it no more until it
/// reconnected. At seq 0 one was subtracted from it: a debug build's connection task panicked
/// (the connection ended), and a build without overflow checks filled the gap through
/// `u64::MAX`.
#[tokio::test]
async fn a_delivered_event_at_seq_0_or_past_its_head_is_passed_over() {
    let engine = FaultyEngine::new();
    let store = engine.store(4).await;
    let (gateway, _url, mut bob) = caught_up(&store, "bob:phone").await;
    let conv = "d:alice:bob";
    let bob_only = Arc::new(vec!["bob".to_owned()]);
    for (from, damaged_seq) in [(0, 1 << 40), (2, 0)] {
        messages_to_bob(&store, conv, from..from + 2).await;
        let after = from as u64;
        let events = store
            .events_within(conv, after, after + 2, 10, usize::MAX)
            .await
            .unwrap();
        let damaged = courier_proto::Event {
            seq: damaged_seq,
            ..events[0].clone()
        };
        for event in [&events[0], &damaged, &events[1]] {
            gateway
                .routes
                .deliver(vec![(event.clone(), bob_only.clone())])
                .await
                .unwrap();
        }
        assert_eq!(next_seqs(&mut bob, 2).await, [after + 1, after + 2]);
    }
}

/// A gap fill that meets a damaged record of its conversation (a floor of the wrong length)
/// tells the client `internal`, naming the conversation, and the connection goes on with the
/// others: closed for it, every member's connection was closed at each event of that
/// conversation, reconnected, and closed again at the next.
#[tokio::test]
async fn a_gap_fill_that_meets_a_damaged_floor_fails_its_conversation_alone() {
    let engine = FaultyEngine::new();
    let store = engine.store(4).await;
    let (gateway, _url, mut bob) = caught_up(&store, "bob:phone").await;
    let (conv, other) = ("d:alice:bob", "d:bob:carol");
    messages_to_bob(&store, conv, 0..2).await;
    messages_from(&store, ("carol", "bob"), other, 0..1).await;
    let mut damage = Batch::new();
    damage.set(store.keys().floor(conv), vec![1; 9]);
    engine.commit(damage).await.unwrap();
    let bob_only = Arc::new(vec!["bob".to_owned()]);
    let second = store.events(conv, 1, 2, 1).await.unwrap().remove(0);
    let from_carol = store.events(other, 0, 1, 1).await.unwrap().remove(0);
    for event in [second, from_carol] {
        gateway
            .routes
            .deliver(vec![(event, bob_only.clone())])
            .await
            .unwrap();
    }
    match bob.next_frame_within(WAIT).await.unwrap() {
        ServerFrame::Error(error) => {
            assert_eq!(error.code, ErrorCode::Internal);
            assert!(error.message.contains(conv), "{error:?}");
        }
        other => panic!("expected an internal error, got {other:?}"),
    }
    match bob.next_frame_within(WAIT).await.unwrap() {
        ServerFrame::Event(event) => {
            assert_eq!((event.conversation_id.as_str(), event.seq), (other, 1))
        }
        other => panic!("expected carol's message, got {other:?}"),
    }
}

/// A catch-up that passes over a conversation whose stored records are damaged (its floor
/// here) tells the client `internal`, naming it, before `sync_done`, as a gap fill that meets
/// it does, and goes on with the others: passed over silently, the device took its catch-up
/// for whole and never learnt it lacked that conversation's events.
#[tokio::test]
async fn a_catch_up_that_passes_over_a_damaged_conversation_tells_the_client() {
    let engine = FaultyEngine::new();
    let store = engine.store(4).await;
    let gateway = gateway(store.clone(), Arc::new(HeldSequencer::default()));
    let url = serve(gateway).await;
    let (damaged, other) = ("d:alice:bob", "d:bob:carol");
    messages_to_bob(&store, damaged, 0..2).await;
    messages_from(&store, ("carol", "bob"), other, 0..1).await;
    let mut damage = Batch::new();
    damage.set(store.keys().floor(damaged), vec![1; 9]);
    engine.commit(damage).await.unwrap();

    let mut bob = Client::connect(&url, "bob:phone", Encoding::Json)
        .await
        .unwrap();
    let mut read = Vec::new();
    let mut errors = Vec::new();
    loop {
        match bob.next_frame_within(WAIT).await.unwrap() {
            ServerFrame::Event(event) => read.push((event.conversation_id, event.seq)),
            ServerFrame::Error(error) => errors.push(error),
            ServerFrame::SyncDone(_) => break,
            other => panic!("expected events, an error and sync_done, got {other:?}"),
        }
    }
    assert_eq!(read, [(other.to_owned(), 1)]);
    let [error] = &errors[..] else {
        panic!("expected one error: {errors:?}");
    };
    assert_eq!(error.code, ErrorCode::Internal);
    assert!(error.message.contains(damaged), "{error:?}");
    bob.ping().await.unwrap();
}

/// `count` frames of 128 KiB queued to `user`'s connection on `gateway`: 64 MiB for 512, more
/// than the sockets' buffers on both ends hold (Linux grows a receiving buffer up to
/// `tcp_rmem`, 32 MiB here), so a client that reads none of them leaves the connection waiting
/// on a write.
fn flood(gateway: &Gateway, user: &str, count: usize) {
    let frame = Arc::new(ServerFrame::Error(ErrorFrame {
        reference: None,
        code: ErrorCode::Internal,
        message: "x".repeat(128 << 10),
        client_msg_id: None,
        retry_after_ms: None,
    }));
    let frames: Arc<[Arc<ServerFrame>]> = (0..count).map(|_| frame.clone()).collect();
    let connection = gateway.routes.connections(user).pop().expect("connected");
    assert!(connection.deliver_droppable(&frames));
}

/// Orders `gateway`'s drain (every connection at once) and runs it.
fn drain(gateway: &Gateway) {
    let drain = gateway.drain.clone();
    tokio::spawn(async move { drain.run().await });
    gateway.drain.start(None);
}

/// Waits until every connection of `gateway` has left its registry.
async fn until_no_connection(gateway: &Gateway) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while gateway.routes.count() > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "a connection held the drain"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A client that stopped reading (its socket's buffers full, its connection waiting on a
/// write) when its gateway drains, and reads again: it gets every frame queued before, then
/// `reconnect`, then the close 1001 (the protocol's going away).
#[tokio::test]
async fn a_client_that_stopped_reading_as_its_gateway_drains_is_told_to_reconnect_once_it_reads() {
    let store = FaultyEngine::new().store(4).await;
    let gateway = gateway(store, Arc::new(HeldSequencer::default()));
    let url = serve(gateway.clone()).await;
    let mut alice = Client::connect(&url, "alice:phone", Encoding::Json)
        .await
        .unwrap();
    alice.events_until_sync_done().await.unwrap();
    flood(&gateway, "alice", 512);
    drain(&gateway);

    let mut flooded = 0;
    let after_ms = loop {
        match alice.next_frame_within(WAIT).await {
            Ok(ServerFrame::Error(_)) => flooded += 1,
            Ok(ServerFrame::Reconnect(reconnect)) => break reconnect.after_ms,
            other => panic!("expected the flood, then reconnect; got {other:?}"),
        }
    };
    assert_eq!((flooded, after_ms), (512, 0));
    let closed = alice.next_frame_within(WAIT).await.unwrap_err();
    assert!(closed.to_string().contains("1001"), "closed: {closed}");
    until_no_connection(&gateway).await;
}

/// A client that reads nothing at all as its gateway drains holds the drain no longer than a
/// write waits for it (`write_timeout`): it cannot take `reconnect`, nor a close frame behind
/// it, and is dropped; the drain's other connections are told and closed meanwhile.
#[tokio::test]
async fn a_client_that_reads_nothing_as_its_gateway_drains_does_not_hold_the_drain() {
    let store = FaultyEngine::new().store(4).await;
    let limits = GatewayLimits {
        write_timeout: Duration::from_secs(1),
        ..GatewayLimits::default()
    };
    let gateway = gateway_with_routes(store, Arc::new(HeldSequencer::default()), None, limits);
    let url = serve(gateway.clone()).await;
    let mut alice = Client::connect(&url, "alice:phone", Encoding::Json)
        .await
        .unwrap();
    alice.events_until_sync_done().await.unwrap();
    let mut bob = Client::connect(&url, "bob:phone", Encoding::Json)
        .await
        .unwrap();
    bob.events_until_sync_done().await.unwrap();
    flood(&gateway, "alice", 512);
    drain(&gateway);

    match bob.next_frame_within(WAIT).await {
        Ok(ServerFrame::Reconnect(_)) => {}
        other => panic!("expected reconnect, got {other:?}"),
    }
    let closed = bob.next_frame_within(WAIT).await.unwrap_err();
    assert!(closed.to_string().contains("1001"), "closed: {closed}");
    until_no_connection(&gateway).await;
    drop(alice);
}

/// A client that acknowledges an event and then stops reading (its connection waiting on a
/// write to it) has its ack committed all the same. The commit went on only when the
/// connection's loop next turned: not while the write waited (up to `write_timeout`, 30 s),
/// and on a drain whose deadline came first (`courier serve`: 25 s) the process exited with the
/// ack read and never committed, where an ack is not lost once sent (PROTOCOL.md).
#[tokio::test]
async fn an_ack_is_committed_while_its_connection_waits_on_a_client_that_stopped_reading() {
    use courier_proto::{Ack, AckKind, Sender};
    use courier_store::ownership::Duty;
    use courier_store::{HeadCache, NewConversation};
    let engine = FaultyEngine::new();
    let store = engine.store(4).await;
    // bob wrote to alice: seq 1 of their conversation.
    let leases = store
        .acquire_shards(
            Duty::Sequencing,
            "test",
            &[0, 1, 2, 3],
            usize::MAX,
            0,
            u64::MAX,
        )
        .await
        .unwrap();
    let conv = "d:alice:bob".to_owned();
    let bob = Sender {
        user: "bob".into(),
        device: "p".into(),
    };
    let append = Append {
        create: Some(NewConversation::direct("bob", "alice")),
        ..Append::message(conv.clone(), bob, "m".into(), Body::Text("hi".into()), None)
    };
    let lease = leases[store.shard_of(&conv) as usize];
    let sent = store
        .append(lease, &mut HeadCache::default(), &[append])
        .await
        .unwrap();
    assert!(sent[0].is_ok(), "{sent:?}");
    // Writes wait on the client for longer than the test.
    let limits = GatewayLimits {
        write_timeout: Duration::from_secs(600),
        ..GatewayLimits::default()
    };
    let gateway = gateway_with_routes(
        store.clone(),
        Arc::new(HeldSequencer::default()),
        None,
        limits,
    );
    let url = serve(gateway.clone()).await;
    let mut alice = Client::connect(&url, "alice:phone", Encoding::Json)
        .await
        .unwrap();
    assert_eq!(alice.events_until_sync_done().await.unwrap().len(), 1);

    // The ack's commit is held, at its first read, until the connection waits on its client.
    let (entered, commit_began) = oneshot::channel::<()>();
    let release = Arc::new(Notify::new());
    let released = release.clone();
    engine.after_next_read(Box::pin(async move {
        let _ = entered.send(());
        released.notified().await;
    }));
    alice
        .send_frame(&ClientFrame::Ack(Ack {
            reference: None,
            conversation_id: conv.clone(),
            seq: 1,
            kind: AckKind::Delivered,
        }))
        .await
        .unwrap();
    tokio::time::timeout(WAIT, commit_began)
        .await
        .expect("the ack's commit began")
        .unwrap();
    // alice reads nothing more: the connection's write waits.
    flood(&gateway, "alice", 512);
    // The test's runtime runs one task at a time: at its first turn the connection takes the
    // flood and writes until the sockets are full, then waits on the write.
    for _ in 0..16 {
        tokio::task::yield_now().await;
    }
    release.notify_one();

    let deadline = tokio::time::Instant::now() + WAIT;
    while store.device_cursor("alice", "phone", &conv).await.unwrap() < 1 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the ack was never committed"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    drop(alice);
}

/// A stored event the gateway cannot decode (a kind only a newer node knows) stops its own
/// conversation's catch-up there, not the connection's: the events before it are sent, the
/// client is told `internal` naming the conversation and the seq, none after it is sent (the
/// device's cursor never passes an event it did not get), and the catch-up goes on with the
/// user's other conversations, then `sync_done`; the connection stays open. A live event past
/// it is not written either: its gap fill meets the same event and tells the client again.
/// The whole catch-up failed and the connection closed, at every reconnect: one event locked
/// the user out of every conversation.
#[tokio::test]
async fn an_event_the_gateway_cannot_decode_stops_its_conversations_catch_up_only() {
    let engine = FaultyEngine::new();
    let store = engine.store(4).await;
    let gateway = gateway(store.clone(), Arc::new(HeldSequencer::default()));
    let url = serve(gateway.clone()).await;
    let (damaged, other) = ("d:alice:bob", "d:bob:carol");
    messages_to_bob(&store, damaged, 0..6).await;
    messages_from(&store, ("carol", "bob"), other, 0..2).await;
    let events = store
        .events_within(damaged, 0, 6, 10, usize::MAX)
        .await
        .unwrap();
    let mut newer = pb::Event::from(events[3].clone());
    newer.kind = "reaction".into();
    let mut batch = Batch::new();
    batch.set(store.keys().event(damaged, 4), newer.encode_to_vec());
    engine.commit(batch).await.unwrap();

    let mut bob = Client::connect(&url, "bob:phone", Encoding::Json)
        .await
        .unwrap();
    let mut read = Vec::new();
    let mut errors = Vec::new();
    loop {
        match bob.next_frame_within(WAIT).await.unwrap() {
            ServerFrame::Event(event) => read.push((event.conversation_id, event.seq)),
            ServerFrame::Error(error) => errors.push((read.len(), error)),
            ServerFrame::SyncDone(_) => break,
            other => panic!("expected events, an error and sync_done, got {other:?}"),
        }
    }
    let seqs_of = |conv: &str| -> Vec<u64> {
        let of_conv = read.iter().filter(|(c, _)| c == conv);
        of_conv.map(|(_, seq)| *seq).collect()
    };
    assert_eq!(seqs_of(damaged), [1, 2, 3], "none past the undecodable one");
    assert_eq!(seqs_of(other), [1, 2], "the other conversation goes on");
    let [(at, error)] = &errors[..] else {
        panic!("expected one error: {errors:?}");
    };
    assert_eq!(error.code, ErrorCode::Internal);
    assert!(
        error.message.contains(damaged) && error.message.contains("seq 4"),
        "{error:?}"
    );
    let third = read.iter().position(|r| *r == (damaged.to_owned(), 3));
    assert_eq!(
        third.map(|i| i + 1),
        Some(*at),
        "told after the events before it"
    );
    bob.ping().await.unwrap();

    // A live event past it: its gap fill stops at the same event, and it is not written.
    let bob_only = Arc::new(vec!["bob".to_owned()]);
    gateway
        .routes
        .deliver(vec![(events[5].clone(), bob_only)])
        .await
        .unwrap();
    match bob.next_frame_within(WAIT).await.unwrap() {
        ServerFrame::Error(error) => assert_eq!(error.code, ErrorCode::Internal),
        other => panic!("expected an internal error, got {other:?}"),
    }
    bob.ping().await.unwrap();
    match bob.fetch(damaged, 0, None).await {
        Err(courier_client::ClientError::Server(error)) => {
            assert_eq!(error.code, ErrorCode::Internal)
        }
        other => panic!("expected an internal error, got {other:?}"),
    }
    let fetched = bob.fetch(other, 0, None).await.unwrap();
    assert_eq!(fetched.events.len(), 2);
    bob.ping().await.unwrap();
    assert!(
        matches!(
            bob.next_frame_within(Duration::ZERO).await,
            Err(courier_client::ClientError::Timeout(_))
        ),
        "nothing else was written"
    );
}

/// Waits until `condition` holds (`what` names it if it never does).
async fn until(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !condition() {
        assert!(tokio::time::Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A gateway over `store` whose liveness pass pings every `interval` (when run).
fn pinging(store: MessageStore, interval: Duration) -> Arc<Gateway> {
    let limits = GatewayLimits {
        ping_interval: interval,
        ..GatewayLimits::default()
    };
    gateway_with_routes(store, Arc::new(HeldSequencer::default()), None, limits)
}

/// A client whose app its OS suspended keeps its TCP connection open (the kernel acknowledges
/// what is written to it, so TCP keepalive never finds it gone) and reads nothing: it answers
/// no WebSocket ping. The gateway's liveness pass closes its connection, 1001, two to three
/// ping intervals after its last read, and the device leaves the registry (the push notifier
/// notifies it from then on). It was counted as connected for good: it took events live that
/// nobody read, and was notified of none.
#[tokio::test]
async fn a_client_that_answers_no_ping_is_closed_after_two_intervals() {
    use courier_core::loops::BackgroundLoops;
    let interval = Duration::from_millis(200);
    let gateway = pinging(FaultyEngine::new().store(4).await, interval);
    let url = serve(gateway.clone()).await;
    let mut alice = Client::connect(&url, "alice:phone", Encoding::Json)
        .await
        .unwrap();
    alice.events_until_sync_done().await.unwrap();
    let loops = BackgroundLoops::new();
    gateway.start_liveness_pass(&loops);

    // alice's app is suspended: its socket stays open and nothing polls it.
    until("the silent connection closed", || {
        gateway.metrics.silent_closes.get() == 1
    })
    .await;
    match alice.next_frame_within(WAIT).await {
        Err(courier_client::ClientError::Closed(Some((code, _)))) => assert_eq!(code, 1001),
        other => panic!("expected the silent connection closed 1001, got {other:?}"),
    }
    until_no_connection(&gateway).await;
    loops.shutdown(tokio::time::Instant::now() + WAIT).await;
}

/// A client that keeps reading answers each ping with a pong (its WebSocket library does, as
/// browsers do), which the connection reads: it stays connected across passes well past two
/// intervals, pinged at each.
#[tokio::test]
async fn a_client_that_answers_pings_stays_connected_across_intervals() {
    use courier_gateway::routes::Liveness;
    let interval = Duration::from_millis(200);
    let gateway = pinging(FaultyEngine::new().store(4).await, interval);
    let url = serve(gateway.clone()).await;
    let mut alice = Client::connect(&url, "alice:phone", Encoding::Json)
        .await
        .unwrap();
    alice.events_until_sync_done().await.unwrap();
    let handle = gateway
        .routes
        .connections("alice")
        .pop()
        .expect("connected");
    // Reads until a frame or the close (nothing else is sent to alice).
    let reading = tokio::spawn(async move { alice.next_frame().await });

    for pass in 0..5 {
        // An interval of silence at least, as between two passes of the loop: five of them
        // are more than two intervals.
        until("an interval of silence", || {
            handle.signals.silent_for() >= interval
        })
        .await;
        let liveness = gateway.check_liveness();
        let pinged = Liveness {
            pinged: 1,
            closed: 0,
        };
        assert_eq!(liveness, pinged, "pass {pass}");
        until("the pong read", || handle.signals.silent_for() < interval).await;
    }
    assert!(!reading.is_finished(), "{:?}", reading.await);
    assert_eq!(gateway.metrics.silent_closes.get(), 0);
    assert_eq!(gateway.routes.count(), 1);
}

/// A client on a slow link reads what it is written, slower than it comes: its connection
/// waits on writes to it, and meanwhile reads nothing and can write no ping. That wait is the
/// server's, not the client's silence: once the client reads again it gets all it was
/// written, and its connection stays open. It was closed, 1001, at the end of a write that had
/// waited two ping intervals with nothing read, its client awake: a write may wait up to
/// `write_timeout` (30 s), so any `--ping-interval` under 15 s could cut an awake client.
#[tokio::test]
async fn a_connection_waiting_on_a_write_to_its_client_is_not_closed_as_silent() {
    let interval = Duration::from_millis(200);
    let gateway = pinging(FaultyEngine::new().store(4).await, interval);
    let url = serve(gateway.clone()).await;
    let mut alice = Client::connect(&url, "alice:phone", Encoding::Json)
        .await
        .unwrap();
    alice.events_until_sync_done().await.unwrap();
    // alice reads nothing for a while: the connection writes until the sockets are full, then
    // waits on its write; a liveness pass comes three intervals later.
    flood(&gateway, "alice", 512);
    let flooded = std::time::Instant::now();
    until("three intervals of the connection's wait", || {
        flooded.elapsed() >= interval * 3
    })
    .await;
    gateway.check_liveness();

    // alice reads again: everything comes, and the connection stays open.
    for flooded in 0..512 {
        match alice.next_frame_within(WAIT).await {
            Ok(ServerFrame::Error(_)) => {}
            other => panic!("expected the flood's frame {flooded}, got {other:?}"),
        }
    }
    alice.ping().await.expect("the connection stays open");
    assert_eq!(gateway.metrics.silent_closes.get(), 0);
}

/// A client that takes nothing written to it for `write_timeout` is dropped, and what its
/// connection wrote it live and its device did not acknowledge is recorded for the push
/// notifier, as at a silent close: an app its OS suspended whose socket's buffers filled
/// before the liveness pass found it silent is the same client. It was recorded at a silent
/// close only: such a device, taken for connected while it was written to, was notified of
/// none of it.
#[tokio::test]
async fn a_client_dropped_for_taking_nothing_is_pushed_what_it_was_written() {
    let store = FaultyEngine::new().store(4).await;
    let limits = GatewayLimits {
        write_timeout: Duration::from_secs(1),
        ..GatewayLimits::default()
    };
    let gateway = gateway_with_routes(
        store.clone(),
        Arc::new(HeldSequencer::default()),
        None,
        limits,
    );
    let url = serve(gateway.clone()).await;
    let alice = {
        let mut alice = Client::connect(&url, "alice:phone", Encoding::Json)
            .await
            .unwrap();
        alice.events_until_sync_done().await.unwrap();
        alice
    };
    // bob writes to alice, delivered live: written to her connection, never acknowledged.
    let conv = "d:alice:bob";
    messages_from(&store, ("bob", "alice"), conv, 0..1).await;
    let events = store
        .events_within(conv, 0, 1, 10, usize::MAX)
        .await
        .unwrap();
    let alice_only = Arc::new(vec!["alice".to_owned()]);
    gateway
        .routes
        .deliver(vec![(events[0].clone(), alice_only)])
        .await
        .unwrap();
    // alice's app is suspended: her connection's writes wait until it is dropped.
    flood(&gateway, "alice", 512);
    until_no_connection(&gateway).await;

    let owed: Vec<_> = store
        .owed_pushes(10)
        .await
        .unwrap()
        .into_iter()
        .map(|owed| (owed.device, owed.through))
        .collect();
    let device = ("alice".to_owned(), "phone".to_owned(), conv.to_owned());
    assert_eq!(owed, [(Some(device), 1)]);
    drop(alice);
}

/// With `ping_interval` zero there is no liveness pass: nothing is pinged nor closed.
#[tokio::test]
async fn with_a_ping_interval_of_zero_nothing_is_pinged() {
    use courier_gateway::routes::{Liveness, Signal};
    let gateway = pinging(FaultyEngine::new().store(4).await, Duration::ZERO);
    let url = serve(gateway.clone()).await;
    let mut alice = Client::connect(&url, "alice:phone", Encoding::Json)
        .await
        .unwrap();
    alice.events_until_sync_done().await.unwrap();
    let handle = gateway
        .routes
        .connections("alice")
        .pop()
        .expect("connected");

    assert_eq!(gateway.check_liveness(), Liveness::default());
    assert!(!handle.signals.is_raised(Signal::Ping));
    assert!(!handle.signals.is_raised(Signal::Silent));
    alice.ping().await.expect("the connection stays open");
}

/// A connection that stops reading for reasons of its own (its sends in flight at the most,
/// waiting on their commits) is not taken for silent when the liveness pass finds nothing read
/// for two intervals: what its client sent meanwhile waits unread. The silence is counted
/// afresh, the connection stays open, and its client gets its `sent`. It was closed, 1001,
/// with its client awake.
#[tokio::test]
async fn a_connection_kept_from_reading_by_its_own_sends_is_not_closed_as_silent() {
    use courier_gateway::routes::{Liveness, Signal};
    let interval = Duration::from_millis(200);
    let sequencer = Arc::new(HeldSequencer::default());
    let limits = GatewayLimits {
        ping_interval: interval,
        max_pending_sends: 1,
        send_timeout: Duration::from_secs(600),
        ..GatewayLimits::default()
    };
    let store = FaultyEngine::new().store(4).await;
    let gateway = gateway_with_routes(store, sequencer.clone(), None, limits);
    let url = serve(gateway.clone()).await;
    let mut alice = Client::connect(&url, "alice:phone", Encoding::Json)
        .await
        .unwrap();
    alice.events_until_sync_done().await.unwrap();
    let handle = gateway
        .routes
        .connections("alice")
        .pop()
        .expect("connected");
    alice
        .send_frame(&ClientFrame::Send(Send {
            reference: Some(1),
            client_msg_id: "m1".into(),
            conversation_id: None,
            to_user: Some("bob".into()),
            body: Body::Text("hi".into()),
            reply_to: None,
        }))
        .await
        .unwrap();
    // Its one send in flight: the connection reads nothing more until it is answered.
    let commit = sequencer.next_held().await;
    let reading = tokio::spawn(async move {
        let frame = alice.next_frame().await;
        (alice, frame)
    });

    // A pass has it ping its client, whose pong waits unread.
    let pinged = Liveness {
        pinged: 1,
        closed: 0,
    };
    assert_eq!(gateway.check_liveness(), pinged);
    until("two intervals of silence, the ping unanswered", || {
        handle.signals.silent_for() >= interval * 2
            && handle
                .signals
                .ping_unanswered_for()
                .is_some_and(|unanswered| unanswered >= interval / 2)
    })
    .await;
    let silent = Liveness {
        pinged: 0,
        closed: 1,
    };
    assert_eq!(gateway.check_liveness(), silent);
    until("the signal taken", || {
        !handle.signals.is_raised(Signal::Silent)
    })
    .await;
    let outcome = AppendOutcome {
        seq: 1,
        server_msg_id: "s1".into(),
        ts_ms: 1,
        duplicate: false,
    };
    commit.send(Ok(outcome)).unwrap();
    let (mut alice, frame) = reading.await.unwrap();
    match frame {
        Ok(ServerFrame::Sent(sent)) => assert_eq!(sent.client_msg_id, "m1"),
        other => panic!("expected sent, got {other:?}"),
    }
    alice.ping().await.expect("the connection stays open");
    assert_eq!(gateway.metrics.silent_closes.get(), 0);
}

/// Retention clears events of a conversation after a connection's catch-up read its floor and
/// before it read those events (a device away past `--device-inactive-after` coming back as a
/// pass trims): the connection says `trimmed` with the new floor before the events, as it would
/// have had it connected a moment later, rather than writing them from above a silent gap.
#[tokio::test]
async fn a_catch_up_whose_events_are_trimmed_after_its_plan_says_trimmed_first() {
    let engine = FaultyEngine::new();
    let store = engine.store(4).await;
    let conv = "d:alice:bob";
    messages_to_bob(&store, conv, 0..5).await;
    let lease = store
        .acquire_shards(
            Duty::Sequencing,
            "test",
            &[store.shard_of(conv)],
            usize::MAX,
            0,
            u64::MAX,
        )
        .await
        .unwrap()[0];
    // Right after the catch-up plan's read of bob's membership, floor and head: a trim of 1-3.
    let plan_read = store.keys().member(conv, "bob");
    let hooked = Arc::downgrade(&engine);
    let (trimming, trimmed) = (store.clone(), Arc::new(Notify::new()));
    let done = trimmed.clone();
    let armed = std::sync::atomic::AtomicBool::new(true);
    engine.set_read_fault(Some(Box::new(move |key: &[u8]| {
        let ours = key == plan_read.as_slice();
        if ours && armed.swap(false, std::sync::atomic::Ordering::SeqCst) {
            let (store, done) = (trimming.clone(), done.clone());
            let engine = hooked.upgrade().unwrap();
            engine.after_next_read(Box::pin(async move {
                assert_eq!(store.trim(lease, conv, 4, &[]).await.unwrap(), 3);
                done.notify_one();
            }));
        }
        None
    })));
    let gateway = gateway(store.clone(), Arc::new(HeldSequencer::default()));
    let url = serve(gateway).await;
    let mut bob = Client::connect(&url, "bob:phone", Encoding::Json)
        .await
        .unwrap();
    let mut frames = Vec::new();
    loop {
        match bob.next_frame_within(WAIT).await.unwrap() {
            ServerFrame::Trimmed(t) => frames.push(format!("trimmed {}", t.floor_seq)),
            ServerFrame::Event(event) => frames.push(format!("event {}", event.seq)),
            ServerFrame::SyncDone(_) => break,
            other => panic!("expected trimmed, events and sync_done, got {other:?}"),
        }
    }
    tokio::time::timeout(WAIT, trimmed.notified())
        .await
        .expect("the trim ran");
    assert_eq!(frames, ["trimmed 4", "event 4", "event 5"]);
}
