//! Black-box tests of the client protocol (PROTOCOL.md) against a real `courier serve`.

mod support;

use courier_client::ClientError;
use courier_client::proto::*;
use courier_client::{Client, Target};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;
use support::{Server, token_for};
use tokio_tungstenite::tungstenite::Message;

const WAIT: Duration = Duration::from_secs(20);

fn server() -> (tempfile::TempDir, Server) {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_in(dir.path(), &[]);
    (dir, server)
}

fn text_of(event: &Event) -> &str {
    match &event.payload {
        EventPayload::Message {
            body: Some(Body::Text(text)),
            ..
        } => text,
        other => panic!("not a text message: {other:?}"),
    }
}

async fn expect_event(client: &mut Client) -> Event {
    match client.next_frame_within(WAIT).await.unwrap() {
        ServerFrame::Event(event) => event,
        other => panic!("expected an event, got {other:?}"),
    }
}

async fn expect_sync_done(client: &mut Client) {
    match client.next_frame_within(WAIT).await.unwrap() {
        ServerFrame::SyncDone(_) => {}
        other => panic!("expected sync_done, got {other:?}"),
    }
}

async fn expect_error(client: &mut Client) -> ErrorFrame {
    match client.next_frame_within(WAIT).await.unwrap() {
        ServerFrame::Error(e) => e,
        other => panic!("expected an error, got {other:?}"),
    }
}

async fn expect_close(client: &mut Client) -> Option<(u16, String)> {
    loop {
        match client.next_frame_within(WAIT).await {
            Err(ClientError::Closed(frame)) => return frame,
            Err(other) => panic!("expected a close, got {other}"),
            Ok(_) => continue,
        }
    }
}

#[tokio::test]
async fn hello_sync_done_and_ping() {
    let (_dir, server) = server();
    let mut alice = server.connect("alice", "phone").await;
    assert_eq!(alice.hello().user, "alice");
    assert_eq!(alice.hello().device, "phone");
    assert!(alice.hello().server_time_ms > 0);
    expect_sync_done(&mut alice).await;
    alice.ping().await.unwrap();
}

/// A frame the client writes together with its upgrade request reaches the server with the
/// request; the connection reads it before its catch-up (to free hyper's request buffer) and
/// answers it after, as any frame sent before `sync_done`.
#[tokio::test]
async fn a_frame_sent_with_the_upgrade_request_is_answered_after_the_catch_up() {
    use futures::StreamExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_tungstenite::tungstenite::protocol::Role;
    use tokio_tungstenite::tungstenite::protocol::frame::Frame;
    use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};

    let (_dir, server) = server();
    let mut stream = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let mut bytes = format!(
        "GET /v1/ws HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
         Authorization: Bearer {}\r\n\r\n",
        server.addr,
        server.token("alice", "phone")
    )
    .into_bytes();
    let mut ping = Frame::message(r#"{"type":"ping","ref":7}"#, OpCode::Data(Data::Text), true);
    ping.header_mut().mask = Some([1, 2, 3, 4]);
    ping.format(&mut bytes).unwrap();
    stream.write_all(&bytes).await.unwrap();

    // The response's head, byte by byte: the frames after it are the WebSocket's to read.
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        head.push(stream.read_u8().await.unwrap());
    }
    let head = String::from_utf8(head).unwrap();
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    let socket =
        tokio_tungstenite::WebSocketStream::from_raw_socket(stream, Role::Client, None).await;
    let frames = socket.take(3).map(|message| {
        let frame: serde_json::Value =
            serde_json::from_str(message.unwrap().to_text().unwrap()).unwrap();
        (
            frame["type"].as_str().unwrap().to_owned(),
            frame["ref"].as_i64(),
        )
    });
    let kinds: Vec<(String, Option<i64>)> = tokio::time::timeout(WAIT, frames.collect())
        .await
        .expect("hello, sync_done and the ping's answer in time");
    let expected = [("hello", None), ("sync_done", None), ("pong", Some(7))];
    let expected: Vec<(String, Option<i64>)> = expected
        .map(|(kind, reference)| (kind.to_owned(), reference))
        .into();
    assert_eq!(kinds, expected);
}

#[tokio::test]
async fn direct_message_reaches_the_peer_and_the_senders_other_devices_only() {
    let (_dir, server) = server();
    let mut phone = server.connect("alice", "phone").await;
    let mut laptop = server.connect("alice", "laptop").await;
    let mut bob = server.connect("bob", "phone").await;
    for c in [&mut phone, &mut laptop, &mut bob] {
        expect_sync_done(c).await;
    }
    let sent = phone
        .send_text(Target::User("bob".into()), "m1", "hi bob")
        .await
        .unwrap();
    assert_eq!(
        (sent.seq, sent.duplicate, sent.client_msg_id.as_str()),
        (1, false, "m1")
    );
    assert!(sent.conversation_id.starts_with("d:"));

    let event = expect_event(&mut bob).await;
    assert_eq!(event.conversation_id, sent.conversation_id);
    assert_eq!(event.seq, 1);
    assert_eq!(event.server_msg_id, sent.server_msg_id);
    assert_eq!(
        event.sender,
        Sender {
            user: "alice".into(),
            device: "phone".into()
        }
    );
    assert_eq!(text_of(&event), "hi bob");
    let on_laptop = expect_event(&mut laptop).await;
    assert_eq!(on_laptop.seq, 1);

    // The sending device gets `sent`, never an event for its own message.
    let reply = bob
        .send_text(Target::User("alice".into()), "b1", "hi alice")
        .await
        .unwrap();
    assert_eq!(reply.seq, 2);
    assert_eq!(
        reply.conversation_id, sent.conversation_id,
        "one conversation per pair"
    );
    let next = expect_event(&mut phone).await;
    assert_eq!((next.seq, text_of(&next)), (2, "hi alice"));
}

#[tokio::test]
async fn offline_device_catches_up_in_order_and_acked_events_are_not_resent() {
    let (_dir, server) = server();
    let mut alice = server.connect("alice", "phone").await;
    expect_sync_done(&mut alice).await;
    let mut conv = String::new();
    for i in 1..=5 {
        conv = alice
            .send_text(
                Target::User("bob".into()),
                &format!("m{i}"),
                &format!("text {i}"),
            )
            .await
            .unwrap()
            .conversation_id;
    }
    let mut bob = server.connect("bob", "phone").await;
    let events = bob.events_until_sync_done().await.unwrap();
    let seqs: Vec<u64> = events.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, vec![1, 2, 3, 4, 5]);
    assert_eq!(text_of(&events[4]), "text 5");

    // Acknowledge 3 and drop the connection: 4 and 5 come again (at-least-once).
    bob.ack(&conv, 3, AckKind::Delivered).await.unwrap();
    // An ack takes effect before any later frame is handled: the pong proves it landed.
    bob.ping().await.unwrap();
    bob.close().await;
    let mut bob = server.connect("bob", "phone").await;
    let again: Vec<u64> = bob
        .events_until_sync_done()
        .await
        .unwrap()
        .iter()
        .map(|e| e.seq)
        .collect();
    assert_eq!(again, vec![4, 5]);
    bob.ack(&conv, 5, AckKind::Delivered).await.unwrap();
    bob.ping().await.unwrap();
    bob.close().await;
    let mut bob = server.connect("bob", "phone").await;
    assert!(bob.events_until_sync_done().await.unwrap().is_empty());

    // A device that never connected starts from the beginning of retained history.
    let mut tablet = server.connect("bob", "tablet").await;
    assert_eq!(tablet.events_until_sync_done().await.unwrap().len(), 5);
}

/// A device back after a long time away acknowledges its catch-up as it reads it, and its
/// acks take effect while the catch-up is still being written: a connection lost midway (a
/// phone's network) resumes after what the device acknowledged, rather than from where it
/// began, again at each reconnect.
#[tokio::test]
async fn acks_sent_during_a_long_catch_up_take_effect_before_it_ends() {
    let (_dir, server) = support::start(&["--user-sends-per-sec", "0"]);
    let mut alice = server.connect("alice", "phone").await;
    expect_sync_done(&mut alice).await;
    support::send_long_history(&mut alice, Target::User("bob".into())).await;
    let mut bob = server.connect("bob", "phone").await;
    let mut last = expect_event(&mut bob).await;
    while last.seq < 10 {
        last = expect_event(&mut bob).await;
    }
    let conv = last.conversation_id.clone();
    // A WebSocket ping of the client's library (OkHttp's ping interval, say) comes first.
    bob.send_raw(Message::Ping(Default::default()))
        .await
        .unwrap();
    bob.ack(&conv, 10, AckKind::Delivered).await.unwrap();
    // Read on a little: the catch-up, 400 events of 48 KiB, is far from its end (and from
    // what the socket buffers hold), and bob reads no further until his ack took effect.
    for _ in 0..40 {
        assert!(expect_event(&mut bob).await.seq < 400);
    }
    let phone = server.http("bob", "phone");
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let listed = phone.conversations().await.unwrap();
        if listed["conversations"][0]["delivered_seq"] == 10 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the ack did not take effect during the catch-up: {listed}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The connection is lost: the next catch-up starts after the ack.
    drop(bob);
    let mut bob = server.connect("bob", "phone").await;
    assert_eq!(expect_event(&mut bob).await.seq, 11);
}

fn ack_frame(reference: i64, conversation_id: &str, seq: u64) -> ClientFrame {
    ClientFrame::Ack(Ack {
        reference: Some(reference),
        conversation_id: conversation_id.to_owned(),
        seq,
        kind: AckKind::Delivered,
    })
}

/// Alice and bob connected and synced, and `count` messages from alice that bob received:
/// both clients and their conversation.
async fn bob_received(server: &Server, count: usize) -> (Client, Client, String) {
    let mut alice = server.connect("alice", "phone").await;
    let mut bob = server.connect("bob", "phone").await;
    expect_sync_done(&mut alice).await;
    expect_sync_done(&mut bob).await;
    let mut conv = String::new();
    for i in 1..=count {
        conv = alice
            .send_text(Target::User("bob".into()), &format!("m{i}"), "hi")
            .await
            .unwrap()
            .conversation_id;
    }
    for _ in 0..count {
        expect_event(&mut bob).await;
    }
    (alice, bob, conv)
}

#[tokio::test]
async fn acks_written_at_once_all_take_effect_before_the_next_frame_and_before_a_close() {
    let (_dir, server) = server();
    let (mut alice, mut bob, conv) = bob_received(&server, 8).await;

    // One ack per event, written at once: those read while the first commits are committed
    // together, and the sync behind them is handled only after they took effect.
    let mut frames: Vec<ClientFrame> = (1..=5)
        .map(|seq| ack_frame(seq as i64, &conv, seq))
        .collect();
    frames.push(ClientFrame::Sync(Sync::default()));
    let resent = synced_after(&mut bob, &frames).await;
    assert_eq!(resent, vec![6, 7, 8], "the sync saw every ack before it");
    assert_eq!(delivered_receipt(&mut alice, 5).await.user, "bob");

    // Acks written right before a close are committed all the same: the receipt they move
    // reaches alice (the client does not wait for the server's side of the close, so the
    // receipt, not a reconnect, tells when they were committed), and the device's cursor
    // moved with them.
    let frames: Vec<ClientFrame> = (6..=8)
        .map(|seq| ack_frame(seq as i64, &conv, seq))
        .collect();
    bob.send_frames(&frames).await.unwrap();
    bob.close().await;
    delivered_receipt(&mut alice, 8).await;
    let mut bob = server.connect("bob", "phone").await;
    assert!(
        bob.events_until_sync_done().await.unwrap().is_empty(),
        "every ack before the close took effect"
    );
}

#[tokio::test]
async fn sends_written_at_once_are_each_answered_once_in_order_of_their_seqs() {
    let (_dir, server) = server();
    let mut alice = server.connect("alice", "phone").await;
    expect_sync_done(&mut alice).await;
    // Sends committed together are answered together (one write for their `sent`s): every
    // one of them still gets its own answer.
    let count = 40;
    let frames: Vec<ClientFrame> = (1..=count)
        .map(|i| {
            ClientFrame::Send(Send {
                reference: Some(i),
                client_msg_id: format!("m{i}"),
                conversation_id: None,
                to_user: Some("bob".into()),
                body: Body::Text(format!("hi {i}")),
                reply_to: None,
            })
        })
        .collect();
    alice.send_frames(&frames).await.unwrap();
    let mut answered = BTreeMap::new();
    while answered.len() < count as usize {
        match alice.next_frame_within(WAIT).await.unwrap() {
            ServerFrame::Sent(sent) => {
                let reference = sent.reference.expect("a sent echoes its ref");
                assert_eq!(sent.client_msg_id, format!("m{reference}"));
                assert!(
                    answered.insert(reference, sent.seq).is_none(),
                    "answered once"
                );
            }
            other => panic!("only answers were due, got {other:?}"),
        }
    }
    let seqs: Vec<u64> = answered.values().copied().collect();
    assert_eq!(
        seqs,
        (1..=count as u64).collect::<Vec<_>>(),
        "in the order sent"
    );
}

/// Writes `frames` (a sync last) at once; the seqs of the events the sync brought.
async fn synced_after(client: &mut Client, frames: &[ClientFrame]) -> Vec<u64> {
    client.send_frames(frames).await.unwrap();
    let events = client.events_until_sync_done().await.unwrap();
    events.iter().map(|e| e.seq).collect()
}

/// The receipt that reports `seq` delivered; those before it report less.
async fn delivered_receipt(client: &mut Client, seq: u64) -> Receipt {
    loop {
        match client.next_frame_within(WAIT).await.unwrap() {
            ServerFrame::Receipt(r) if r.delivered_seq == seq => return r,
            ServerFrame::Receipt(r) => assert!(r.delivered_seq < seq, "{r:?}"),
            _ => continue,
        }
    }
}

#[tokio::test]
async fn a_refused_ack_among_acks_committed_together_is_answered_alone() {
    let (_dir, server) = server();
    let (_alice, mut bob, conv) = bob_received(&server, 4).await;

    // Merged, these would ack 99, beyond the head: each is then committed alone, so 1-3 move
    // the cursor and only the ack of 99 is refused, with its own ref.
    let frames = [
        ack_frame(11, &conv, 1),
        ack_frame(12, &conv, 2),
        ack_frame(13, &conv, 99),
        ack_frame(14, &conv, 3),
        ClientFrame::Sync(Sync::default()),
    ];
    let resent = synced_after(&mut bob, &frames).await;
    assert_eq!(resent, vec![4], "the valid acks took effect");
    let error = expect_error(&mut bob).await;
    assert_eq!(
        (error.reference, error.code),
        (Some(13), ErrorCode::BadRequest),
        "{}",
        error.message
    );
    bob.send_frame(&ClientFrame::Ping(Ping {
        reference: Some(15),
    }))
    .await
    .unwrap();
    match bob.next_frame_within(WAIT).await.unwrap() {
        ServerFrame::Pong(pong) => assert_eq!(pong.reference, Some(15)),
        other => panic!("one error only, then the pong; got {other:?}"),
    }
}

#[tokio::test]
async fn a_refused_ack_on_its_own_is_answered_with_its_ref() {
    let (_dir, server) = server();
    let (_alice, mut bob, conv) = bob_received(&server, 1).await;

    bob.send_frame(&ack_frame(21, &conv, 99)).await.unwrap();
    let error = expect_error(&mut bob).await;
    assert_eq!(
        (error.reference, error.code),
        (Some(21), ErrorCode::BadRequest),
        "{}",
        error.message
    );
    // The refused ack moved nothing: the event comes again at the next sync.
    let resent = synced_after(&mut bob, &[ClientFrame::Sync(Sync::default())]).await;
    assert_eq!(resent, vec![1]);
}

#[tokio::test]
async fn catch_up_includes_own_sends_above_the_cursor() {
    let (_dir, server) = server();
    let mut alice = server.connect("alice", "phone").await;
    expect_sync_done(&mut alice).await;
    alice
        .send_text(Target::User("bob".into()), "m1", "one")
        .await
        .unwrap();
    alice.close().await;
    let mut alice = server.connect("alice", "phone").await;
    let events = alice.events_until_sync_done().await.unwrap();
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].sender.device, "phone");
}

#[tokio::test]
async fn live_events_after_sync_arrive_in_strictly_increasing_seq() {
    let (_dir, server) = server();
    let mut alice = server.connect("alice", "phone").await;
    let mut bob = server.connect("bob", "phone").await;
    expect_sync_done(&mut alice).await;
    expect_sync_done(&mut bob).await;
    for i in 0..50 {
        alice
            .send_text(Target::User("bob".into()), &format!("a{i}"), "x")
            .await
            .unwrap();
    }
    let mut last = 0;
    while last < 50 {
        let event = expect_event(&mut bob).await;
        assert_eq!(event.seq, last + 1, "no gap, no repeat");
        last = event.seq;
    }
}

#[tokio::test]
async fn retried_sends_are_idempotent_across_reconnects_and_restarts() {
    let (_dir, mut server) = server();
    let mut alice = server.connect("alice", "phone").await;
    expect_sync_done(&mut alice).await;
    let first = alice
        .send_text(Target::User("bob".into()), "same", "once")
        .await
        .unwrap();
    let again = alice
        .send_text(Target::User("bob".into()), "same", "once")
        .await
        .unwrap();
    assert!(again.duplicate);
    assert_eq!(
        (again.seq, &again.server_msg_id),
        (first.seq, &first.server_msg_id)
    );
    alice.close().await;

    let mut alice = server.connect("alice", "phone").await;
    let after_reconnect = alice
        .send_text(Target::User("bob".into()), "same", "once")
        .await
        .unwrap();
    assert!(after_reconnect.duplicate);
    assert_eq!(after_reconnect.seq, first.seq);
    alice.close().await;

    server.restart();
    let mut alice = server.connect("alice", "phone").await;
    let after_restart = alice
        .send_text(Target::User("bob".into()), "same", "once")
        .await
        .unwrap();
    assert!(after_restart.duplicate);
    assert_eq!(after_restart.seq, first.seq);
    // Another device may reuse the id: idempotency is per sending device.
    let mut laptop = server.connect("alice", "laptop").await;
    let other = laptop
        .send_text(Target::User("bob".into()), "same", "twice")
        .await
        .unwrap();
    assert_eq!((other.seq, other.duplicate), (2, false));
    let head = alice
        .fetch(&first.conversation_id, 0, None)
        .await
        .unwrap()
        .head_seq;
    assert_eq!(head, 2, "retries stored nothing new");
}

#[tokio::test]
async fn a_retry_after_the_idempotency_window_is_a_new_message() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_in(
        dir.path(),
        &[
            "--idempotency-window",
            "1ms",
            "--retention-interval",
            "20ms",
        ],
    );
    let mut alice = server.connect("alice", "phone").await;
    expect_sync_done(&mut alice).await;
    let first = alice
        .send_text(Target::User("bob".into()), "same", "once")
        .await
        .unwrap();
    // A retry is answered from the idempotency record until a retention pass expires it;
    // from then on the same id makes a new message.
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let retry = alice
            .send_text(Target::User("bob".into()), "same", "once")
            .await
            .unwrap();
        if !retry.duplicate {
            assert_eq!(retry.seq, first.seq + 1);
            break;
        }
        assert_eq!(retry.seq, first.seq);
        assert!(
            std::time::Instant::now() < deadline,
            "the idempotency record never expired"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn receipts_reach_the_other_members_devices() {
    let (_dir, server) = server();
    let mut alice = server.connect("alice", "phone").await;
    let mut bob = server.connect("bob", "phone").await;
    expect_sync_done(&mut alice).await;
    expect_sync_done(&mut bob).await;
    let sent = alice
        .send_text(Target::User("bob".into()), "m1", "hi")
        .await
        .unwrap();
    alice
        .send_text(Target::User("bob".into()), "m2", "there")
        .await
        .unwrap();
    assert_eq!(expect_event(&mut bob).await.seq, 1);
    bob.ack(&sent.conversation_id, 2, AckKind::Read)
        .await
        .unwrap();
    let receipt = loop {
        match alice.next_frame_within(WAIT).await.unwrap() {
            ServerFrame::Receipt(r) => break r,
            _ => continue,
        }
    };
    assert_eq!(receipt.user, "bob");
    assert_eq!(
        (receipt.delivered_seq, receipt.read_seq),
        (2, 2),
        "read implies delivered"
    );

    let listed = server.http("bob", "phone").conversations().await.unwrap();
    let conv = &listed["conversations"][0];
    assert_eq!(conv["conversation_id"], sent.conversation_id.as_str());
    assert_eq!(conv["kind"], "direct");
    assert_eq!(conv["name"], "alice");
    assert_eq!(
        (conv["head_seq"].as_u64(), conv["read_seq"].as_u64()),
        (Some(2), Some(2))
    );
}

/// A catch-up reads at most 256 KiB of events per step (one at least), as a step stays in
/// memory while the client reads it: a backlog of the largest messages comes whole and in
/// order, a few events a step.
#[tokio::test]
async fn a_catch_up_of_large_messages_comes_whole_in_steps() {
    let (_dir, server) = server();
    let mut alice = server.connect("alice", "phone").await;
    expect_sync_done(&mut alice).await;
    let text = "y".repeat(60_000);
    for i in 1..=40 {
        alice
            .send_text(Target::User("bob".into()), &format!("big{i}"), &text)
            .await
            .unwrap();
    }
    let mut bob = server.connect("bob", "phone").await;
    let events = bob.events_until_sync_done().await.unwrap();
    assert_eq!(
        events.iter().map(|e| e.seq).collect::<Vec<_>>(),
        (1..=40).collect::<Vec<_>>()
    );
    assert!(events.iter().all(|e| text_of(e) == text));
}

#[tokio::test]
async fn fetch_pages_and_refuses_strangers() {
    let (_dir, server) = server();
    let mut alice = server.connect("alice", "phone").await;
    expect_sync_done(&mut alice).await;
    let mut conv = String::new();
    for i in 1..=7 {
        conv = alice
            .send_text(Target::User("bob".into()), &format!("m{i}"), "x")
            .await
            .unwrap()
            .conversation_id;
    }
    let page = alice.fetch(&conv, 2, Some(3)).await.unwrap();
    assert_eq!(
        page.events.iter().map(|e| e.seq).collect::<Vec<_>>(),
        vec![3, 4, 5]
    );
    assert_eq!(page.head_seq, 7);

    let mut mallory = server.connect("mallory", "phone").await;
    expect_sync_done(&mut mallory).await;
    match mallory.fetch(&conv, 0, None).await {
        Err(ClientError::Server(e)) => assert_eq!(e.code, ErrorCode::Forbidden),
        other => panic!("expected forbidden, got {other:?}"),
    }
    match mallory
        .send_text(Target::Conversation(conv.clone()), "x", "intrude")
        .await
    {
        Err(ClientError::Server(e)) => {
            assert_eq!(e.code, ErrorCode::Forbidden);
            assert_eq!(e.client_msg_id.as_deref(), Some("x"));
        }
        other => panic!("expected forbidden, got {other:?}"),
    }
    match mallory.fetch("g:nope", 0, None).await {
        Err(ClientError::Server(e)) => assert_eq!(e.code, ErrorCode::NotFound),
        other => panic!("expected not_found, got {other:?}"),
    }
    // A direct conversation's id can be derived by anyone: that of two users who never
    // talked is refused as theirs is (`tests/membership.rs`).
    match mallory.fetch("d:nope", 0, None).await {
        Err(ClientError::Server(e)) => assert_eq!(e.code, ErrorCode::Forbidden),
        other => panic!("expected forbidden, got {other:?}"),
    }
    let (status, _) = server
        .http("mallory", "phone")
        .get(&format!("/v1/conversations/{conv}/messages"))
        .await
        .unwrap();
    assert_eq!(status, 403);
    let (status, body) = server
        .http("alice", "phone")
        .get(&format!(
            "/v1/conversations/{conv}/messages?after_seq=5&limit=10"
        ))
        .await
        .unwrap();
    assert_eq!(status, 200);
    assert_eq!(body["head_seq"], 7);
    assert_eq!(body["events"].as_array().unwrap().len(), 2);
    assert_eq!(body["events"][0]["kind"], "message");
}

/// A page of history stays in memory until its client has taken it, and a node holds at most
/// `--max-page-bytes-in-flight` of them: past it a page is refused `unavailable` with a
/// `retry_after_ms`, over the WebSocket and over HTTP, and is served once the others are
/// read. Without the bound, clients that ask for pages of large messages and read them slowly
/// held tens of megabytes each, for as long as they took (many such connections took the
/// node's memory).
/// `courier_gateway_page_bytes_in_flight`: the bytes of pages of history a node holds.
const PAGES_IN_FLIGHT: &str = "courier_gateway_page_bytes_in_flight";

/// Waits until the node holds `bytes` of pages of history.
async fn until_pages_hold(server: &Server, bytes: u64) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while server.metric(PAGES_IN_FLIGHT).await != bytes {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the pages in flight never held {bytes} bytes"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Alice writes bob 100 messages of 60 KB; bob's phone asks for the whole history (~6 MB
/// encoded) and reads nothing of it. Returns the conversation, the phone and the bytes the
/// unread page holds of the node's room, once it holds them.
async fn a_page_bob_does_not_read(server: &Server) -> (String, Client, u64) {
    let mut alice = server.connect("alice", "phone").await;
    expect_sync_done(&mut alice).await;
    let text = "y".repeat(60_000);
    let mut conv = String::new();
    for i in 1..=100 {
        conv = alice
            .send_text(Target::User("bob".into()), &format!("big{i}"), &text)
            .await
            .unwrap()
            .conversation_id;
    }
    let mut slow = server.connect("bob", "phone").await;
    assert_eq!(slow.events_until_sync_done().await.unwrap().len(), 100);
    slow.send_frame(&ClientFrame::Fetch(Fetch {
        reference: Some(1),
        conversation_id: conv.clone(),
        after_seq: Some(0),
        limit: Some(100),
    }))
    .await
    .unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let held = server.metric(PAGES_IN_FLIGHT).await;
        if held > 0 {
            return (conv, slow, held);
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the page took no room"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Reads the page of `size` events the client was sent.
async fn read_the_page(client: &mut Client, size: usize) {
    let page = loop {
        match client.next_frame_within(WAIT).await.unwrap() {
            ServerFrame::Messages(page) => break page,
            _ => continue,
        }
    };
    assert_eq!(page.events.len(), size);
}

/// Asserts a page was refused `unavailable`, to be asked again after `retry_after_ms`.
fn assert_unavailable(refused: Result<Messages, ClientError>) {
    match refused {
        Err(ClientError::Server(e)) => {
            assert_eq!(e.code, ErrorCode::Unavailable);
            assert!(e.retry_after_ms.is_some_and(|ms| ms > 0));
        }
        Err(other) => panic!("expected unavailable, got {other:?}"),
        Ok(page) => panic!("expected unavailable, got {} events", page.events.len()),
    }
}

#[tokio::test]
async fn pages_of_history_past_the_nodes_room_wait_until_the_others_are_read() {
    const ROOM: u64 = 1 << 20;
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_in(
        dir.path(),
        &["--max-page-bytes-in-flight", &ROOM.to_string()],
    );
    // Bob's page (6 MB) takes the whole room while it waits on him.
    let (conv, mut slow, held) = a_page_bob_does_not_read(&server).await;
    assert_eq!(held, ROOM);
    let mut other = server.connect("bob", "laptop").await;
    other.events_until_sync_done().await.unwrap();
    assert_unavailable(other.fetch(&conv, 0, Some(1)).await);
    let path = format!("/v1/conversations/{conv}/messages?limit=1");
    let (status, body) = server.http("bob", "laptop").get(&path).await.unwrap();
    assert_eq!((status, body["code"].as_str()), (503, Some("unavailable")));
    // Once the slow client has read its page, the room is free again.
    read_the_page(&mut slow, 100).await;
    until_pages_hold(&server, 0).await;
    let page = other.fetch(&conv, 0, Some(1)).await.unwrap();
    assert_eq!(page.events.len(), 1);
    let (status, body) = server.http("bob", "laptop").get(&path).await.unwrap();
    assert_eq!((status, body["events"][0]["seq"].as_u64()), (200, Some(1)));
    assert_eq!(server.metric(PAGES_IN_FLIGHT).await, 0);
}

/// One user's devices asking for pages and reading none of them hold at most their share of
/// the node's room (an eighth): the user's next page waits, everyone else's is served.
#[tokio::test]
async fn a_user_holding_their_share_of_the_pages_room_waits_while_others_are_served() {
    // A share of 8 MiB: one of bob's 6 MB pages fits in it, two do not; the room takes eight.
    const ROOM: u64 = 64 << 20;
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_in(
        dir.path(),
        &["--max-page-bytes-in-flight", &ROOM.to_string()],
    );
    let (conv, mut slow, _) = a_page_bob_does_not_read(&server).await;
    let mut laptop = server.connect("bob", "laptop").await;
    laptop.events_until_sync_done().await.unwrap();
    assert_unavailable(laptop.fetch(&conv, 0, Some(100)).await);
    let path = format!("/v1/conversations/{conv}/messages?limit=100");
    let (status, body) = server.http("bob", "tablet").get(&path).await.unwrap();
    assert_eq!((status, body["code"].as_str()), (503, Some("unavailable")));
    // Alice, who wrote it all, reads the same history meanwhile.
    let mut alice = server.connect("alice", "laptop").await;
    alice.events_until_sync_done().await.unwrap();
    let page = alice.fetch(&conv, 0, Some(100)).await.unwrap();
    assert_eq!(page.events.len(), 100);
    let (status, body) = server.http("alice", "laptop").get(&path).await.unwrap();
    assert_eq!(status, 200);
    assert_eq!(body["events"].as_array().map(Vec::len), Some(100));
    // Once bob has read his page, his next one is served.
    read_the_page(&mut slow, 100).await;
    until_pages_hold(&server, 0).await;
    let page = laptop.fetch(&conv, 0, Some(100)).await.unwrap();
    assert_eq!(page.events.len(), 100);
    let (status, body) = server.http("bob", "tablet").get(&path).await.unwrap();
    assert_eq!(status, 200);
    assert_eq!(body["events"].as_array().map(Vec::len), Some(100));
}

/// The range reads of conversations' events the node has made (from the store's cache of recent
/// events or from its tables).
async fn event_reads(server: &Server) -> u64 {
    server
        .metric("courier_store_event_cache_held_reads_total")
        .await
        + server
            .metric("courier_store_event_cache_missed_reads_total")
            .await
}

/// A page takes its room before its events are read, as much as its `limit` of the largest
/// events could take: one that finds no room is refused having read nothing. Pages were read
/// and encoded whole before their room was asked for, so the budget bounded only what was
/// held after: 200 concurrent `limit=1000` requests of one user were each read (tens of
/// megabytes each) before most were refused, and raised the node's memory by ~380 MB.
#[tokio::test]
async fn a_page_without_room_is_refused_before_its_events_are_read() {
    // A share of 8 MiB: bob's unread page (6 MB) leaves no room for another 100 events of up
    // to 64 KiB, but does for 10.
    const ROOM: u64 = 64 << 20;
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_in(
        dir.path(),
        &["--max-page-bytes-in-flight", &ROOM.to_string()],
    );
    let (conv, mut slow, _) = a_page_bob_does_not_read(&server).await;
    let mut laptop = server.connect("bob", "laptop").await;
    laptop.events_until_sync_done().await.unwrap();
    let reads = event_reads(&server).await;
    assert_unavailable(laptop.fetch(&conv, 0, Some(100)).await);
    let path = format!("/v1/conversations/{conv}/messages?limit=100");
    let (status, body) = server.http("bob", "tablet").get(&path).await.unwrap();
    assert_eq!((status, body["code"].as_str()), (503, Some("unavailable")));
    let (status, _) = server
        .http("bob", "tablet")
        .get(&format!("/v1/conversations/{conv}/messages"))
        .await
        .unwrap();
    assert_eq!(status, 503, "the default limit is 100");
    assert_eq!(event_reads(&server).await, reads, "a refused page was read");
    // A page whose most fits beside the held one is read and served.
    let page = laptop.fetch(&conv, 0, Some(10)).await.unwrap();
    assert_eq!(page.events.len(), 10);
    let (status, body) = server
        .http("bob", "tablet")
        .get(&format!("/v1/conversations/{conv}/messages?limit=10"))
        .await
        .unwrap();
    assert_eq!(status, 200);
    assert_eq!(body["events"].as_array().map(Vec::len), Some(10));
    read_the_page(&mut slow, 100).await;
    until_pages_hold(&server, 0).await;
}

#[tokio::test]
async fn sync_with_cursors_overrides_the_servers_cursor() {
    let (_dir, server) = server();
    let mut alice = server.connect("alice", "phone").await;
    expect_sync_done(&mut alice).await;
    let mut conv = String::new();
    for i in 1..=4 {
        conv = alice
            .send_text(Target::User("bob".into()), &format!("m{i}"), "x")
            .await
            .unwrap()
            .conversation_id;
    }
    let mut bob = server.connect("bob", "phone").await;
    assert_eq!(bob.events_until_sync_done().await.unwrap().len(), 4);
    let events = bob.sync(BTreeMap::from([(conv, 2)])).await.unwrap();
    assert_eq!(events.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![3, 4]);
}

#[tokio::test]
async fn seqs_at_u64_max_are_answered_as_empty_and_the_connection_stays_usable() {
    let (_dir, server) = server();
    let mut alice = server.connect("alice", "phone").await;
    expect_sync_done(&mut alice).await;
    let conv = alice
        .send_text(Target::User("bob".into()), "m1", "x")
        .await
        .unwrap()
        .conversation_id;

    let page = alice.fetch(&conv, u64::MAX, None).await.unwrap();
    assert!(page.events.is_empty(), "{page:?}");
    assert_eq!(page.head_seq, 1);
    let events = alice.sync(BTreeMap::from([(conv.clone(), u64::MAX)])).await;
    assert!(events.unwrap().is_empty());
    // A send after the override, and live delivery goes on: an override beyond the head
    // counts as the head.
    let sent = alice
        .send_text(Target::Conversation(conv.clone()), "m2", "y")
        .await
        .unwrap();
    assert_eq!(sent.seq, 2);
    alice.ping().await.unwrap();
    let mut bob = server.connect("bob", "phone").await;
    bob.events_until_sync_done().await.unwrap();
    bob.send_text(Target::Conversation(conv.clone()), "b1", "z")
        .await
        .unwrap();
    let live = alice.next_event().await.unwrap();
    assert_eq!(live.seq, 3, "{live:?}");

    let (status, body) = server
        .http("alice", "phone")
        .get(&format!(
            "/v1/conversations/{conv}/messages?after_seq={}",
            u64::MAX
        ))
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["events"], serde_json::json!([]));
    assert_eq!(body["head_seq"], 3);
    alice.ping().await.unwrap();
}

#[tokio::test]
async fn bad_frames_get_errors_and_the_connection_stays_open() {
    let (_dir, server) = server();
    let mut alice = server.connect("alice", "phone").await;
    expect_sync_done(&mut alice).await;
    let cases: [&str; 6] = [
        "{not json",
        r#"{"type":"teleport","ref":3}"#,
        r#"{"type":"ack","conversation_id":"d:x","seq":"one","kind":"read"}"#,
        r#"{"type":"send","client_msg_id":"","to_user":"bob","body":{"text":"x"}}"#,
        r#"{"type":"send","client_msg_id":"a","to_user":"no spaces","body":{"text":"x"}}"#,
        r#"{"type":"fetch","conversation_id":"bad id!"}"#,
    ];
    for case in cases {
        alice.send_raw(Message::text(case)).await.unwrap();
        let error = expect_error(&mut alice).await;
        assert_eq!(
            error.code,
            ErrorCode::BadRequest,
            "for {case}: {}",
            error.message
        );
    }
    alice
        .send_raw(Message::text(r#"{"type":"teleport","ref":3}"#))
        .await
        .unwrap();
    assert_eq!(
        expect_error(&mut alice).await.reference,
        Some(3),
        "the ref is echoed"
    );
    // An error in reply to a send carries its client_msg_id, however the send is malformed.
    for (id, send) in [
        (
            "c1",
            r#"{"type":"send","ref":7,"client_msg_id":"c1","to_user":"bob","body":{"text":5}}"#,
        ),
        (
            "c2",
            r#"{"type":"send","ref":8,"client_msg_id":"c2","to_user":"bob"}"#,
        ),
    ] {
        alice.send_raw(Message::text(send)).await.unwrap();
        let error = expect_error(&mut alice).await;
        assert_eq!(error.code, ErrorCode::BadRequest, "{}", error.message);
        assert_eq!(error.client_msg_id.as_deref(), Some(id), "{send}");
    }
    alice
        .send_raw(Message::binary(vec![1, 2, 3]))
        .await
        .unwrap();
    assert_eq!(expect_error(&mut alice).await.code, ErrorCode::BadRequest);
    alice.ping().await.expect("still open after bad frames");
    alice
        .send_text(Target::User("bob".into()), "ok", "still works")
        .await
        .unwrap();
}

/// One device's connections are bounded: past 16 on a gateway, its oldest closes (1008), so
/// that one token cannot open connections until the node has none left; the newest works.
#[tokio::test]
async fn a_device_past_its_connections_has_its_oldest_closed() {
    let (_dir, server) = server();
    let mut oldest = server.connect("alice", "phone").await;
    expect_sync_done(&mut oldest).await;
    let mut others = Vec::new();
    for _ in 0..16 {
        let mut connection = server.connect("alice", "phone").await;
        expect_sync_done(&mut connection).await;
        others.push(connection);
    }
    let (code, reason) = expect_close(&mut oldest).await.expect("a close frame");
    assert_eq!(code, 1008, "{reason}");
    assert!(reason.contains("too many connections"), "{reason}");
    let newest = others.last_mut().unwrap();
    newest.ping().await.expect("the newest stays open");
    newest
        .send_text(Target::User("bob".into()), "n1", "still works")
        .await
        .unwrap();
}

/// The bound holds for connections busy with a catch-up too: the oldest closes (1008) at once
/// rather than once it has streamed the whole history, so that a token cannot keep more
/// connections by reconnecting while each catches up.
#[tokio::test]
async fn a_device_past_its_connections_has_its_oldest_closed_during_its_catch_up() {
    let (_dir, server) = support::start(&["--user-sends-per-sec", "0"]);
    let mut bob = support::connected(&server, "bob", "phone").await;
    // Alice's catch-up is still being written when her connection is replaced.
    support::send_long_history(&mut bob, Target::User("alice".into())).await;
    let mut oldest = server.connect("alice", "phone").await;
    let mut others = Vec::new();
    for _ in 0..16 {
        others.push(server.connect("alice", "phone").await);
    }
    for other in others {
        other.close().await;
    }
    let (events, closed) = support::events_until_closed(&mut oldest).await;
    assert!(
        matches!(closed, ClientError::Closed(Some((1008, _)))),
        "{closed:?}"
    );
    assert!(events < 400, "the whole history before the close");
}

/// Connections that hold the client port and send nothing do not take the process's last file
/// descriptors: past the open-file limit less what the process keeps for its store and the
/// rest, a new connection closes the oldest one with no request in flight. Here HTTP/2
/// connections that sent their preface and then nothing (each held a minute: 30 s idle, then
/// 30 s for the answer to the server's GOAWAY), as many as the limit: they took every
/// descriptor, no device could connect nor any probe be answered until they were closed, and
/// anyone who reached the port could keep it so.
#[tokio::test]
async fn silent_connections_past_the_open_file_limit_leave_room_for_devices() {
    use tokio::io::AsyncWriteExt;
    /// The HTTP/2 connection preface, then an empty SETTINGS frame.
    const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0";

    let (_dir, server) = server();
    let limit = 2 * (server.descriptors() + 32);
    server.limit_open_files(limit as u64);
    let mut silent = Vec::new();
    for _ in 0..limit {
        let mut socket = tokio::net::TcpStream::connect(server.addr).await.unwrap();
        socket.write_all(H2_PREFACE).await.unwrap();
        silent.push(socket);
    }
    let connecting = support::connected(&server, "alice", "phone");
    let mut alice = tokio::time::timeout(WAIT, connecting)
        .await
        .expect("a device connects past the silent connections");
    alice
        .send_text(Target::User("bob".into()), "m1", "hi")
        .await
        .unwrap();
    let probe = tokio::time::timeout(WAIT, reqwest_get(&server, "/readyz"));
    assert_eq!(probe.await.expect("a probe answered").0, 200);
    drop(silent);
}

/// A `messages` page its client reads steadily over a slow link comes whole, however long it
/// takes past the gateway's write timeout (30 s): the page's write was bounded as a whole by
/// it, so a client reading 8 KB a second was dropped partway through a page of 480 KB as one
/// that took nothing, and again each time it asked for the page.
#[tokio::test]
async fn a_page_read_slowly_comes_whole() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (_dir, server) = support::start(&["--user-sends-per-sec", "0"]);
    let mut alice = support::connected(&server, "alice", "phone").await;
    let text = "y".repeat(6000);
    let mut conversation = String::new();
    for i in 0..80 {
        let to_bob = Target::User("bob".into());
        let sent = alice.send_text(to_bob, &format!("m{i}"), &text).await;
        conversation = sent.unwrap().conversation_id;
    }
    // Bob's socket takes little at a time.
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    socket.connect(&server.addr.into()).unwrap();
    socket.set_nonblocking(true).unwrap();
    let mut bob = tokio::net::TcpStream::from_std(socket.into()).unwrap();
    let upgrade = format!(
        "GET /v1/ws HTTP/1.1\r\nhost: x\r\nupgrade: websocket\r\nconnection: upgrade\r\n\
         sec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\nsec-websocket-version: 13\r\n\
         authorization: Bearer {}\r\n\r\n",
        server.token("bob", "phone")
    );
    bob.write_all(upgrade.as_bytes()).await.unwrap();
    let contains = |read: &[u8], what: &[u8]| read.windows(what.len()).any(|w| w == what);
    // The catch-up, read as fast as it comes.
    let mut read = Vec::new();
    let mut buf = [0u8; 4096];
    while !contains(&read, b"sync_done") {
        let n = tokio::time::timeout(WAIT, bob.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0, "closed during the catch-up");
        read.extend_from_slice(&buf[..n]);
    }
    let fetch =
        format!(r#"{{"type":"fetch","ref":1,"conversation_id":"{conversation}","limit":80}}"#);
    let length = u8::try_from(fetch.len()).unwrap();
    assert!(length < 126);
    // A masked text frame, its mask zero.
    let mut frame = vec![0x81, 0x80 | length, 0, 0, 0, 0];
    frame.extend_from_slice(fetch.as_bytes());
    bob.write_all(&frame).await.unwrap();
    // 4 KiB every half second, until the page's end.
    let mut page = Vec::new();
    while !contains(&page, b"\"head_seq\":80") {
        let n = tokio::time::timeout(WAIT, bob.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0, "closed after {} bytes of the page", page.len());
        page.extend_from_slice(&buf[..n]);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(page.len() > 480_000, "{} bytes", page.len());
}

/// A request head past 64 KiB is refused (431) before it is read whole: the client port took
/// heads of up to 400 KiB (hyper's default), each held in memory for up to 30 s by a
/// client that needs no token, a few gigabytes for the connections a node holds.
#[tokio::test]
async fn a_request_head_past_its_limit_is_refused() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (_dir, server) = server();
    let mut socket = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let padding = format!("x-padding: {}\r\n", "p".repeat(5000)).repeat(20);
    let head = format!("GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n{padding}\r\n");
    // The server may close before it has all of it.
    let _ = socket.write_all(head.as_bytes()).await;
    let mut answer = Vec::new();
    let read = tokio::time::timeout(WAIT, socket.read_to_end(&mut answer));
    let _ = read.await.expect("the server answered and closed");
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");
}

#[tokio::test]
async fn oversized_message_closes_with_1009() {
    let (_dir, server) = server();
    let mut alice = server.connect("alice", "phone").await;
    expect_sync_done(&mut alice).await;
    let big = format!(
        r#"{{"type":"send","client_msg_id":"big","to_user":"bob","body":{{"text":"{}"}}}}"#,
        "x".repeat(70 * 1024)
    );
    alice.send_raw(Message::text(big)).await.unwrap();
    let close = expect_close(&mut alice).await;
    assert_eq!(close.map(|(code, _)| code), Some(1009));
}

/// A WebSocket frame the server's WebSocket library refuses closes the connection with the code
/// RFC 6455 gives it, so that its client learns why: a text message that is not UTF-8 with
/// 1007, a frame that breaks the protocol (an RSV bit no extension gave a meaning, an opcode
/// that is reserved) with 1002. The connection was dropped with no close frame at all.
#[tokio::test]
async fn a_frame_that_breaks_the_websocket_protocol_closes_with_its_code() {
    use tokio_tungstenite::tungstenite::protocol::frame::Frame;
    use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};

    let not_utf8 = Frame::message(
        &b"{\"type\":\"ping\",\"ref\":\xff}"[..],
        OpCode::Data(Data::Text),
        true,
    );
    let mut reserved_bit = Frame::message(r#"{"type":"ping"}"#, OpCode::Data(Data::Text), true);
    reserved_bit.header_mut().rsv1 = true;
    let reserved_opcode = Frame::message(&b"x"[..], OpCode::Data(Data::Reserved(3)), true);

    let (_dir, server) = server();
    for (what, frame, code) in [
        ("invalid UTF-8 in a text message", not_utf8, 1007),
        ("RSV1 set", reserved_bit, 1002),
        ("a reserved opcode", reserved_opcode, 1002),
    ] {
        let mut alice = server.connect("alice", "phone").await;
        expect_sync_done(&mut alice).await;
        alice.send_raw(Message::Frame(frame)).await.unwrap();
        let close = expect_close(&mut alice).await;
        assert_eq!(close.map(|(code, _)| code), Some(code), "{what}");
    }
}

#[tokio::test]
async fn bad_tokens_are_refused_with_401_before_the_upgrade() {
    let (dir, server) = server();
    let expired = token_for(dir.path(), "alice", "phone", -60);
    let forged = {
        let other = tempfile::tempdir().unwrap();
        std::fs::write(other.path().join("jwt-secret"), "not-the-secret").unwrap();
        token_for(other.path(), "alice", "phone", 60)
    };
    for token in ["", "garbage", expired.as_str(), forged.as_str()] {
        match Client::connect(&server.ws_url(), token, Encoding::Json).await {
            Err(ClientError::Rejected(401)) => {}
            Err(other) => panic!("token {token:?}: expected 401, got {other}"),
            Ok(_) => panic!("token {token:?} was accepted"),
        }
    }
    let (status, body) = courier_client::HttpApi::new(&server.http_url(), "garbage")
        .unwrap()
        .get("/v1/conversations")
        .await
        .unwrap();
    assert_eq!(status, 401);
    assert_eq!(body["code"], "unauthorized");
}

/// The status of `method path` with `authorization` as its `Authorization` header, if any,
/// and the error code of its body.
async fn status_of(
    server: &Server,
    method: reqwest::Method,
    path: &str,
    authorization: Option<&str>,
) -> (u16, Option<String>) {
    let mut request =
        reqwest::Client::new().request(method, format!("{}{path}", server.http_url()));
    if let Some(value) = authorization {
        request = request.header("authorization", value);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let body: serde_json::Value = response.json().await.unwrap_or_default();
    (status, body["code"].as_str().map(str::to_owned))
}

/// Every error of the HTTP API has PROTOCOL.md's body `{"code", "message"}`, those the router
/// answers itself too: a path segment that is not UTF-8 once decoded, a path no route takes, a
/// method its route does not take, a request to the WebSocket endpoint that is no upgrade. A
/// client reads the code of every refusal.
#[tokio::test]
async fn errors_the_router_answers_have_the_protocols_body() {
    use reqwest::Method;
    let (_dir, server) = server();
    let bearer = format!("Bearer {}", server.token("alice", "phone"));
    let bad = (400, Some("bad_request".to_owned()));
    let cases = [
        (Method::GET, "/v1/conversations/%FF/messages", bad.clone()),
        (Method::GET, "/v1/conversations/%FF/receipts", bad.clone()),
        (Method::POST, "/v1/groups/g:%C0/members", bad.clone()),
        (Method::DELETE, "/v1/groups/g:x/members/%FF", bad.clone()),
        (Method::DELETE, "/v1/devices/%FF", bad.clone()),
        (Method::GET, "/v1/media/%FF", bad.clone()),
        (Method::GET, "/v1/media/%FF/url", bad.clone()),
        // Not an upgrade, its token good.
        (Method::GET, "/v1/ws", bad),
        (Method::GET, "/v1/nothing", (404, Some("not_found".into()))),
        (
            Method::GET,
            "/v1/conversations/c/x",
            (404, Some("not_found".into())),
        ),
        (
            Method::PUT,
            "/v1/conversations",
            (405, Some("bad_request".into())),
        ),
        (Method::GET, "/v1/groups", (405, Some("bad_request".into()))),
    ];
    for (method, path, expected) in cases {
        let answer = status_of(&server, method.clone(), path, Some(&bearer)).await;
        assert_eq!(answer, expected, "{method} {path}");
    }
}

/// With `--metrics-listen`, `/metrics` is served on that port alone (the cluster's network):
/// the client port, which anyone on the internet may reach, answers it as a path no route
/// takes, without a word of the node's load, queues or internals. The probes stay on the
/// client port, and the metrics port serves nothing of the API.
#[tokio::test]
async fn with_a_metrics_port_the_client_port_does_not_serve_metrics() {
    use reqwest::Method;
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_in(dir.path(), &["--metrics-listen", "127.0.0.1:0"]);
    let metrics = server
        .metrics_addr
        .expect("the server logs its metrics port");
    assert_ne!(metrics, server.addr);

    let response = reqwest::get(format!("http://{metrics}/metrics"))
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let text = response.text().await.unwrap();
    assert!(text.contains("courier_gateway_connections"), "{text}");

    let not_found = (404, Some("not_found".to_owned()));
    let answer = status_of(&server, Method::GET, "/metrics", None).await;
    assert_eq!(answer, not_found, "GET /metrics on the client port");
    for probe in ["/healthz", "/readyz"] {
        let status = reqwest::get(format!("{}{probe}", server.http_url()))
            .await
            .unwrap()
            .status();
        assert_eq!(status, 200, "{probe} on the client port");
    }
    let api = reqwest::get(format!("http://{metrics}/v1/conversations"))
        .await
        .unwrap()
        .status();
    assert_eq!(api, 404, "the API on the metrics port");
}

/// A JSON body past the API's limit (2 MiB) is `too_large` (413), as PROTOCOL.md's code for
/// it says, not a malformed request: the client is to send less, not to fix its JSON.
#[tokio::test]
async fn a_json_body_past_the_limit_is_too_large() {
    let (_dir, server) = server();
    let members: Vec<String> = (0..200_000).map(|i| format!("user-{i}")).collect();
    let group = serde_json::json!({ "name": "big", "members": members });
    let (status, body) = server
        .http("alice", "phone")
        .post("/v1/groups", &group)
        .await
        .unwrap();
    assert_eq!((status, body["code"].as_str()), (413, Some("too_large")));
}

/// A JSON body whose `Content-Length` says it is past the limit is `too_large` (413) as soon as
/// its head has come, before any of it is read: the client, which may wait for the answer
/// before it sends (`Expect: 100-continue`) or send slowly, is told at once to send less.
#[tokio::test]
async fn a_json_body_declared_past_the_limit_is_too_large_before_it_is_sent() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (_dir, server) = server();
    let token = server.token("alice", "phone");
    let mut stream = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let head = format!(
        "POST /v1/groups HTTP/1.1\r\nhost: courier\r\nauthorization: Bearer {token}\r\n\
         content-type: application/json\r\ncontent-length: {}\r\n\r\n{{\"name\": ",
        3 << 20
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    // The rest of the body never comes: the answer must not wait for it.
    let mut answer = Vec::new();
    let read = tokio::time::timeout(WAIT, async {
        let mut buffer = [0u8; 4096];
        while !answer.ends_with(b"}") {
            match stream.read(&mut buffer).await.unwrap() {
                0 => break,
                n => answer.extend_from_slice(&buffer[..n]),
            }
        }
    })
    .await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        read.is_ok(),
        "no answer while the body was awaited: {answer:?}"
    );
    assert!(answer.starts_with("HTTP/1.1 413 "), "{answer}");
    assert!(answer.contains(r#""code":"too_large""#), "{answer}");
}

/// The status of a WebSocket upgrade of `/v1/ws{query}` with `authorization` as its
/// `Authorization` header, if any: 101 once the connection has had its `hello`.
async fn upgrade_status(server: &Server, query: &str, authorization: Option<&str>) -> u16 {
    use futures::StreamExt;
    use tokio_tungstenite::tungstenite::{self, client::IntoClientRequest};
    let mut request = format!("{}/v1/ws{query}", server.ws_url())
        .into_client_request()
        .unwrap();
    if let Some(value) = authorization {
        request
            .headers_mut()
            .insert("authorization", value.parse().unwrap());
    }
    match tokio_tungstenite::connect_async(request).await {
        Ok((mut socket, response)) => {
            let first = tokio::time::timeout(WAIT, socket.next()).await.unwrap();
            let Some(Ok(Message::Text(hello))) = first else {
                panic!("expected hello, got {first:?}");
            };
            assert!(hello.contains(r#""type":"hello""#), "{hello}");
            response.status().as_u16()
        }
        Err(tungstenite::Error::Http(response)) => response.status().as_u16(),
        Err(e) => panic!("the upgrade failed: {e}"),
    }
}

/// A token in a URL ends up in access logs, browser history and `Referer` headers. Only the
/// WebSocket upgrade takes one there (`access_token`: a browser cannot set a header on a
/// WebSocket); every other route, media downloads included, answers 401 `unauthorized` to a
/// token in its query, and takes the same token in `Authorization: Bearer`.
#[tokio::test]
async fn a_token_in_the_query_opens_the_websocket_and_no_other_route() {
    use reqwest::Method;
    let (_dir, server) = server();
    let token = server.token("alice", "phone");
    let in_query = format!("?access_token={token}");
    assert_eq!(upgrade_status(&server, &in_query, None).await, 101);

    let bearer = format!("Bearer {token}");
    let uploaded = reqwest::Client::new()
        .post(format!("{}/v1/media", server.http_url()))
        .header("authorization", &bearer)
        .header("content-type", "image/png")
        .body(vec![1u8; 64])
        .send()
        .await
        .unwrap();
    assert_eq!(uploaded.status(), 201);
    let uploaded: serde_json::Value = uploaded.json().await.unwrap();
    let media = format!("/v1/media/{}", uploaded["media_id"].as_str().unwrap());
    for (method, path) in [
        (Method::GET, "/v1/conversations"),
        (Method::GET, "/v1/devices"),
        (Method::GET, media.as_str()),
        (Method::GET, &format!("{media}/url")),
        (Method::POST, "/v1/media"),
        (Method::POST, "/v1/groups"),
        (Method::DELETE, "/v1/devices/laptop"),
    ] {
        let with_token = format!("{path}{in_query}");
        let refused = status_of(&server, method.clone(), &with_token, None).await;
        assert_eq!(
            refused,
            (401, Some("unauthorized".into())),
            "{method} {path}"
        );
    }
    for path in ["/v1/conversations", "/v1/devices", media.as_str()] {
        let taken = status_of(&server, Method::GET, path, Some(&bearer)).await;
        assert_eq!(taken.0, 200, "GET {path}");
    }
}

/// The auth scheme is case-insensitive (RFC 9110, 11.1): `bearer` is `Bearer`. The rest of the
/// header is read strictly: the scheme, one or more spaces, the token.
#[tokio::test]
async fn the_bearer_scheme_is_taken_in_any_case_and_nothing_else_is() {
    let (_dir, server) = server();
    let token = server.token("alice", "phone");
    let taken = ["Bearer ", "bearer ", "BEARER ", "bEaReR ", "Bearer   "].map(|s| (s, true));
    let refused = [
        "Bearer", "Bearer\t", "Bearer: ", "Basic ", "Bear ", "Bearers ",
    ]
    .map(|s| (s, false));
    for (scheme, taken) in taken.into_iter().chain(refused) {
        let authorization = format!("{scheme}{token}");
        let api = status_of(
            &server,
            reqwest::Method::GET,
            "/v1/conversations",
            Some(&authorization),
        )
        .await;
        let upgrade = upgrade_status(&server, "", Some(&authorization)).await;
        let expected = match taken {
            true => ((200, None), 101),
            false => ((401, Some("unauthorized".into())), 401),
        };
        assert_eq!((api, upgrade), expected, "{authorization:?}");
    }
}

/// A token dated ahead (`iat`) would outlive an unlink of its device: tokens issued after the
/// unlink link the device again. One issued more than a minute ahead of the server's clock is
/// refused, on the WebSocket and on the API; a few seconds ahead is an issuer's clock, taken.
#[tokio::test]
async fn a_token_issued_in_the_future_is_refused_and_does_not_outlive_an_unlink() {
    let (dir, server) = server();
    let laptop = server.http("alice", "laptop");
    assert_eq!(laptop.get("/v1/devices").await.unwrap().0, 200);
    assert_eq!(
        server
            .http("alice", "phone")
            .get("/v1/devices")
            .await
            .unwrap()
            .0,
        200
    );
    let stolen = support::token_with_iat(dir.path(), "alice", "phone", 24 * 3600);
    assert_eq!(laptop.delete("/v1/devices/phone").await.unwrap().0, 204);

    let bearer = format!("Bearer {stolen}");
    let api = status_of(
        &server,
        reqwest::Method::GET,
        "/v1/conversations",
        Some(&bearer),
    );
    assert_eq!(api.await, (401, Some("unauthorized".into())));
    assert_eq!(upgrade_status(&server, "", Some(&bearer)).await, 401);
    let (_, listed) = laptop.get("/v1/devices").await.unwrap();
    assert_eq!(listed["devices"].as_array().unwrap().len(), 1, "{listed}");

    let skewed = support::token_with_iat(dir.path(), "alice", "tablet", 30);
    let bearer = format!("Bearer {skewed}");
    assert_eq!(upgrade_status(&server, "", Some(&bearer)).await, 101);
}

#[tokio::test]
async fn protobuf_subprotocol_speaks_the_same_frames() {
    let (_dir, server) = server();
    let mut alice = server.connect_with("alice", "phone", Encoding::Proto).await;
    let mut bob = server.connect_with("bob", "phone", Encoding::Proto).await;
    let mut bob_json = server.connect("bob", "laptop").await;
    expect_sync_done(&mut alice).await;
    expect_sync_done(&mut bob).await;
    expect_sync_done(&mut bob_json).await;
    let sent = alice
        .send_text(Target::User("bob".into()), "p1", "over protobuf")
        .await
        .unwrap();
    let event = expect_event(&mut bob).await;
    assert_eq!((event.seq, text_of(&event)), (sent.seq, "over protobuf"));
    assert_eq!(text_of(&expect_event(&mut bob_json).await), "over protobuf");
    alice
        .send_raw(Message::binary(vec![0xff, 0xff, 0xff]))
        .await
        .unwrap();
    assert_eq!(expect_error(&mut alice).await.code, ErrorCode::BadRequest);
    alice.ping().await.unwrap();
}

#[tokio::test]
async fn health_readiness_and_metrics() {
    let (_dir, server) = server();
    let mut alice = server.connect("alice", "phone").await;
    expect_sync_done(&mut alice).await;
    let mut bob = server.connect("bob", "phone").await;
    expect_sync_done(&mut bob).await;
    alice
        .send_text(Target::User("bob".into()), "m", "x")
        .await
        .unwrap();
    let event = expect_event(&mut bob).await;
    bob.ack(&event.conversation_id, event.seq, AckKind::Delivered)
        .await
        .unwrap();
    // Answered once the ack is committed: the connection reads nothing before.
    bob.ping().await.unwrap();
    let http = reqwest_get(&server, "/healthz").await;
    assert_eq!(http.0, 200);
    assert_eq!(reqwest_get(&server, "/readyz").await.0, 200);
    let (status, metrics) = reqwest_get(&server, "/metrics").await;
    assert_eq!(status, 200);
    for name in [
        "courier_chat_send_ack_latency_seconds_count 1",
        "courier_gateway_connections 2",
        // Each stage of the message's way, once.
        "courier_sequencer_commit_seconds_count 1",
        "courier_fanout_outbox_read_lag_seconds_count 1",
        "courier_fanout_delivery_lag_seconds_count 1",
        "courier_gateway_queue_wait_seconds_count 1",
        "courier_chat_ack_commit_seconds_count 1",
        "courier_fanout_backlog_events",
        "courier_sequencer_shards_behind 0",
        "courier_sequencer_delivery_behind_refusals_total 0",
        "courier_sequencer_outbox_lag_seconds",
        "courier_sequencer_appends_total{shard=",
        "courier_fanout_delivery_lag_seconds",
        "courier_chat_send_retries_total 0",
        "courier_process_resident_memory_bytes",
    ] {
        assert!(metrics.contains(name), "metrics lack {name}:\n{metrics}");
    }
}

async fn reqwest_get(server: &Server, path: &str) -> (u16, String) {
    // No token: these endpoints are public.
    let response = reqwest::get(format!("{}{path}", server.http_url()))
        .await
        .unwrap();
    (response.status().as_u16(), response.text().await.unwrap())
}

#[tokio::test]
async fn sigterm_sends_reconnect_closes_1001_and_exits_0() {
    let (_dir, mut server) = server();
    let mut alice = server.connect("alice", "phone").await;
    expect_sync_done(&mut alice).await;
    let terminated = tokio::task::spawn_blocking(move || server.terminate());
    match alice.next_frame_within(WAIT).await.unwrap() {
        ServerFrame::Reconnect(r) => assert!(r.after_ms < 2000),
        other => panic!("expected reconnect, got {other:?}"),
    }
    assert_eq!(expect_close(&mut alice).await.map(|(c, _)| c), Some(1001));
    let status = terminated.await.unwrap();
    assert!(status.success(), "exit status {status}");
}

/// A drain reaches a connection amid its catch-up: the catch-up stops there, and the
/// connection says `reconnect` and closes with 1001 (rather than streaming on past the drain
/// deadline, to be dropped without either); what it did not write comes on the next connection.
#[tokio::test]
async fn sigterm_stops_a_catch_up_under_way_with_reconnect_and_1001_and_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start_in(dir.path(), &["--user-sends-per-sec", "0"]);
    let mut alice = support::connected(&server, "alice", "phone").await;
    support::send_long_history(&mut alice, Target::User("bob".into())).await;
    // Bob's catch-up is more than the socket buffers hold, and he reads none of it yet.
    let mut bob = server.connect("bob", "phone").await;
    let terminated = tokio::task::spawn_blocking(move || server.terminate());
    // `courier serve` tells every connection at once: alice's `reconnect` says bob was told.
    match alice.next_frame_within(WAIT).await.unwrap() {
        ServerFrame::Reconnect(_) => {}
        other => panic!("expected reconnect, got {other:?}"),
    }
    let mut events = 0;
    loop {
        match bob.next_frame_within(WAIT).await {
            Ok(ServerFrame::Event(_)) => events += 1,
            Ok(ServerFrame::Reconnect(_)) => break,
            Ok(other) => panic!("{other:?} after {events} events, before reconnect"),
            Err(e) => panic!("ended without reconnect after {events} events: {e}"),
        }
    }
    assert!(events < 400, "the whole catch-up was written first");
    assert_eq!(
        expect_close(&mut bob).await.map(|(code, _)| code),
        Some(1001)
    );
    let status = terminated.await.unwrap();
    assert!(status.success(), "exit status {status}");

    let server = Server::start_in(dir.path(), &[]);
    let mut bob = server.connect("bob", "phone").await;
    let again = bob.events_until_sync_done().await.unwrap();
    let seqs: Vec<u64> = again.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, (1..=400).collect::<Vec<_>>(), "bob acknowledged none");
}

/// Sends in flight per connection in the drain test.
const DRAIN_WINDOW: usize = 64;
/// Answers each connection of the drain test waits for before the server is stopped.
const ANSWERS_BEFORE_STOP: usize = 20;

/// What one connection saw of a drain: the answer to each send (`Some(seq)` for `sent`,
/// `None` for an error) and its conversation.
#[derive(Default)]
struct DrainedConnection {
    answers: HashMap<String, Option<u64>>,
    conversation_id: Option<String>,
}

/// Keeps `DRAIN_WINDOW` sends in flight until the server says `reconnect`, and checks the
/// order of what comes back: answers, `reconnect`, a 1001 close, then a clean end (no reset).
async fn send_until_drained(
    url: &str,
    token: &str,
    user: &str,
    answering: tokio::sync::mpsc::Sender<()>,
) -> DrainedConnection {
    use futures::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut request = format!("{url}/v1/ws").into_client_request().unwrap();
    let bearer = format!("Bearer {token}");
    request
        .headers_mut()
        .insert("authorization", bearer.parse().unwrap());
    let (socket, _) = tokio_tungstenite::connect_async(request).await.unwrap();
    let (mut sink, mut stream) = socket.split();
    let window = Arc::new(tokio::sync::Semaphore::new(DRAIN_WINDOW));
    let writer = tokio::spawn({
        let window = window.clone();
        async move {
            for n in 0.. {
                match window.acquire().await {
                    Ok(permit) => permit.forget(),
                    Err(_) => break,
                }
                let send = serde_json::json!({
                    "type": "send", "client_msg_id": format!("m{n}"), "to_user": "bob",
                    "body": {"text": "in flight"},
                });
                if sink.send(Message::text(send.to_string())).await.is_err() {
                    break;
                }
            }
        }
    });
    let mut seen = DrainedConnection::default();
    let (mut reconnected, mut close_code) = (false, None);
    loop {
        let message = tokio::time::timeout(WAIT, stream.next())
            .await
            .expect("the server ends the connection in time");
        let frame: serde_json::Value = match message {
            Some(Ok(Message::Text(text))) => serde_json::from_str(&text).unwrap(),
            Some(Ok(Message::Close(frame))) => {
                assert!(reconnected, "{user}: closed before reconnect");
                close_code = frame.map(|f| u16::from(f.code));
                continue;
            }
            Some(Ok(_)) => continue,
            Some(Err(tokio_tungstenite::tungstenite::Error::ConnectionClosed)) | None => break,
            Some(Err(e)) => panic!("{user}: the connection failed instead of closing: {e}"),
        };
        assert!(close_code.is_none(), "{user}: {frame} after the close");
        match frame["type"].as_str().unwrap() {
            "hello" | "sync_done" => {}
            kind @ ("sent" | "error") => {
                assert!(!reconnected, "{user}: {frame} after reconnect");
                let id = frame["client_msg_id"].as_str().unwrap().to_owned();
                let seq = frame["seq"].as_u64();
                if kind == "sent" {
                    seen.conversation_id = frame["conversation_id"].as_str().map(str::to_owned);
                }
                assert!(
                    seen.answers.insert(id, seq).is_none(),
                    "{user}: {frame} twice"
                );
                window.add_permits(1);
                if seen.answers.len() == ANSWERS_BEFORE_STOP {
                    answering.send(()).await.unwrap();
                }
            }
            "reconnect" => {
                assert!(!reconnected, "{user}: a second reconnect");
                reconnected = true;
                window.close();
            }
            other => panic!("{user}: unexpected {other}: {frame}"),
        }
    }
    assert_eq!(close_code, Some(1001), "{user}: closed with 1001");
    writer.await.unwrap();
    seen
}

#[tokio::test]
async fn sigterm_answers_every_accepted_send_then_reconnects_and_closes_cleanly() {
    const CONNECTIONS: usize = 4;
    let dir = tempfile::tempdir().unwrap();
    let unlimited = [
        "--user-sends-per-sec",
        "0",
        "--connection-frames-per-sec",
        "0",
    ];
    let mut server = Server::start_in(dir.path(), &unlimited);
    let (answering, mut answered) = tokio::sync::mpsc::channel(CONNECTIONS);
    let mut connections = tokio::task::JoinSet::new();
    for i in 0..CONNECTIONS {
        let user = format!("u{i}");
        let (url, token) = (server.ws_url(), server.token(&user, "phone"));
        let answering = answering.clone();
        connections.spawn(async move {
            let seen = send_until_drained(&url, &token, &user, answering).await;
            (user, seen)
        });
    }
    for _ in 0..CONNECTIONS {
        tokio::time::timeout(WAIT, answered.recv())
            .await
            .expect("every connection has answers in time");
    }
    let status = tokio::task::spawn_blocking(move || server.terminate())
        .await
        .unwrap();
    assert!(status.success(), "exit status {status}");
    let drained = connections.join_all().await;

    // Every send the old process committed was answered on its connection, before `reconnect`.
    let server = Server::start_in(dir.path(), &[]);
    for (user, seen) in drained {
        let conv = seen.conversation_id.expect("some sends were answered");
        let http = server.http(&user, "phone");
        let mut after = 0;
        loop {
            let path = format!("/v1/conversations/{conv}/messages?after_seq={after}&limit=1000");
            let (status, body) = http.get(&path).await.unwrap();
            assert_eq!(status, 200, "{body}");
            let events = body["events"].as_array().unwrap();
            let Some(last) = events.last() else { break };
            after = last["seq"].as_u64().unwrap();
            for event in events {
                let id = event["client_msg_id"].as_str().unwrap();
                match seen.answers.get(id) {
                    Some(Some(seq)) => assert_eq!(Some(*seq), event["seq"].as_u64(), "{event}"),
                    Some(None) => {}
                    None => panic!("{user}: {id} was committed but never answered"),
                }
            }
        }
    }
}

#[tokio::test]
async fn a_reader_that_falls_behind_gets_every_event_in_order_without_reconnecting() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_in(
        dir.path(),
        &["--outbound-queue", "16", "--user-sends-per-sec", "0"],
    );
    let mut alice = server.connect("alice", "phone").await;
    let mut bob = server.connect("bob", "phone").await;
    expect_sync_done(&mut alice).await;
    expect_sync_done(&mut bob).await;
    // Bob reads nothing while ~25 MB are sent to him: the socket buffers fill, then his queue
    // of 16, and the events after that are dropped from it.
    let body = "y".repeat(60_000);
    for i in 0..420 {
        alice
            .send_text(Target::User("bob".into()), &format!("m{i}"), &body)
            .await
            .unwrap();
    }
    let (_, metrics) = reqwest_get(&server, "/metrics").await;
    let lagged = metrics
        .lines()
        .find_map(|l| l.strip_prefix("courier_gateway_lagged_deliveries_total "))
        .and_then(|n| n.parse::<u64>().ok())
        .unwrap_or(0);
    assert!(lagged > 0, "the queue overflowed:\n{metrics}");
    // He then reads everything, in order, on the same connection (what was dropped comes
    // from the store).
    for seq in 1..=420 {
        let event = tokio::time::timeout(Duration::from_secs(30), bob.next_event())
            .await
            .expect("an event in time")
            .unwrap();
        assert_eq!(event.seq, seq);
    }
}

#[test]
fn asking_for_foundationdb_without_the_feature_fails_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_courier"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--store",
            "fdb",
            "--fdb-cluster-file",
            "/nonexistent/fdb.cluster",
            "--data-dir",
        ])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    if cfg!(feature = "fdb") {
        return;
    }
    assert!(
        stderr.contains("built without FoundationDB support"),
        "{stderr}"
    );
}

/// An `ack` "is not lost if the connection closes right after it", also when the server closes
/// it: a connection told to reconnect (a drain) reads no further frame to handle, but commits
/// the acks among those it reads until the client's close reply.
#[tokio::test]
async fn an_ack_written_before_a_drain_is_not_lost() {
    let (_dir, mut server) = support::start(&["--user-sends-per-sec", "0"]);
    let mut alice = support::connected(&server, "alice", "phone").await;
    // A backlog for bob larger than the socket buffers, so bob's catch-up is still being
    // written when he acks and when the drain is ordered.
    let body = "x".repeat(48 * 1024);
    let mut conv = String::new();
    let mut head = 0;
    for i in 0..400 {
        let sent = alice
            .send_text(Target::User("bob".into()), &format!("m{i}"), &body)
            .await
            .unwrap();
        conv = sent.conversation_id;
        head = sent.seq;
    }
    alice.close().await;
    let mut bob = server.connect("bob", "phone").await;
    // Bob has these from another device's copy, say: he acks them all at once (valid: <= head).
    bob.send_frame(&ClientFrame::Ack(Ack {
        reference: None,
        conversation_id: conv.clone(),
        seq: head,
        kind: AckKind::Read,
    }))
    .await
    .unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    server.signal(libc::SIGTERM);
    // Bob now reads everything: the catch-up, sync_done, reconnect, close.
    let mut frames = 0;
    loop {
        match bob.next_frame_within(support::WAIT).await {
            Ok(ServerFrame::Reconnect(_)) => {}
            Ok(_) => frames += 1,
            Err(_) => break,
        }
    }
    assert!(frames > 0);
    server.restart();
    let again = server
        .connect("bob", "phone")
        .await
        .events_until_sync_done()
        .await
        .unwrap();
    assert_eq!(
        again.len(),
        0,
        "bob's ack of seq {head}, written before the drain, was lost: {} events again",
        again.len()
    );
}

/// A reply names a message of its conversation: a `reply_to` past the conversation's head is
/// refused (it was stored and delivered to every member as a reply to nothing).
#[tokio::test]
async fn a_reply_to_a_message_not_yet_in_the_conversation_is_refused() {
    let (_dir, server) = server();
    let mut alice = server.connect("alice", "phone").await;
    expect_sync_done(&mut alice).await;
    let send = |i: i64, reply_to: Option<u64>| {
        ClientFrame::Send(Send {
            reference: Some(i),
            client_msg_id: format!("m{i}"),
            conversation_id: None,
            to_user: Some("bob".into()),
            body: Body::Text(format!("hi {i}")),
            reply_to,
        })
    };
    let mut answer = async |frame: ClientFrame| {
        alice.send_frame(&frame).await.unwrap();
        match alice.next_frame_within(WAIT).await.unwrap() {
            ServerFrame::Sent(sent) => Ok(sent.seq),
            ServerFrame::Error(e) => Err(e.code),
            other => panic!("expected an answer, got {other:?}"),
        }
    };
    assert_eq!(answer(send(1, Some(1))).await, Err(ErrorCode::BadRequest));
    assert_eq!(answer(send(2, None)).await, Ok(1));
    assert_eq!(answer(send(3, Some(1))).await, Ok(2));
    assert_eq!(answer(send(4, Some(3))).await, Err(ErrorCode::BadRequest));
    assert_eq!(answer(send(5, Some(2))).await, Ok(3));
}

/// The timers of the server's established TCP sockets on `port` (`/proc/net/tcp`'s `tr`:
/// 0 none, 1 retransmission, 2 keepalive).
fn server_socket_timers(port: u16) -> Vec<u8> {
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
    let local = format!(":{port:04X}");
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let established = fields[3] == "01";
            (fields[1].ends_with(&local) && established).then(|| {
                let timer = fields[5].split(':').next().unwrap();
                u8::from_str_radix(timer, 16).unwrap()
            })
        })
        .collect()
}

/// A device that vanishes without closing its connection (a phone out of coverage, a NAT that
/// forgot the mapping) is not taken for connected for good: the server probes its idle
/// connections (TCP keepalive) and ends one whose peer no longer answers. Without it, such a
/// connection stayed registered until the server wrote to it and TCP gave up retransmitting
/// (about 15 minutes at Linux's defaults), or for ever while nothing was written: the push
/// notifier counted the device as connected and notified it of nothing.
#[tokio::test]
async fn an_idle_connection_is_probed_by_tcp_keepalive() {
    let (_dir, server) = server();
    let mut alice = server.connect("alice", "phone").await;
    expect_sync_done(&mut alice).await;
    let port: u16 = server.ws_url().rsplit(':').next().unwrap().parse().unwrap();
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let timers = server_socket_timers(port);
        if !timers.is_empty() && timers.iter().all(|&timer| timer == 2) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the connection's socket has no keepalive timer: {timers:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// An HTTP/2 WebSocket, its connection's task, and the connection's sender of requests: the
/// client's side of the connection ends once it is dropped and no stream is open.
type Http2WebSocket = (
    tokio_tungstenite::WebSocketStream<hyper_util::rt::TokioIo<hyper::upgrade::Upgraded>>,
    tokio::task::JoinHandle<hyper::Result<()>>,
    hyper::client::conn::http2::SendRequest<axum::body::Body>,
);

/// A WebSocket of `user`'s `device` to `server` over HTTP/2 (extended CONNECT, RFC 8441, which
/// the server's settings announce), after its `hello`.
async fn http2_websocket(server: &Server, user: &str, device: &str) -> Http2WebSocket {
    use futures::StreamExt;
    use hyper_util::rt::{TokioExecutor, TokioIo};
    let address = server.http_url().trim_start_matches("http://").to_owned();
    let socket = tokio::net::TcpStream::connect(&address).await.unwrap();
    let (mut sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(socket))
            .await
            .unwrap();
    let connection = tokio::spawn(connection);
    // A request answered first: the server's settings, which allow the extended CONNECT, have
    // come.
    let request = axum::http::Request::get(format!("http://{address}/healthz"))
        .body(axum::body::Body::empty())
        .unwrap();
    assert_eq!(sender.send_request(request).await.unwrap().status(), 200);
    let mut request = axum::http::Request::connect(format!("http://{address}/v1/ws"))
        .header(
            "authorization",
            format!("Bearer {}", server.token(user, device)),
        )
        .header("sec-websocket-version", "13")
        .body(axum::body::Body::empty())
        .unwrap();
    request
        .extensions_mut()
        .insert(hyper::ext::Protocol::from_static("websocket"));
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.status(), 200);
    let upgraded = hyper::upgrade::on(response).await.unwrap();
    let mut websocket = tokio_tungstenite::WebSocketStream::from_raw_socket(
        TokioIo::new(upgraded),
        tokio_tungstenite::tungstenite::protocol::Role::Client,
        None,
    )
    .await;
    let hello = tokio::time::timeout(WAIT, websocket.next())
        .await
        .expect("hello in time")
        .expect("the WebSocket open")
        .unwrap();
    assert!(hello.to_text().unwrap().contains("\"hello\""), "{hello:?}");
    (websocket, connection, sender)
}

/// A WebSocket over HTTP/2 is served as over HTTP/1 (`hello` first; the CONNECT was refused
/// 405), and once it has ended its connection is idle, and closed by the server after the idle
/// bound (30 s) like any connection with nothing in flight.
#[tokio::test]
async fn an_http2_connection_whose_websocket_ended_is_closed_once_idle() {
    use futures::StreamExt;
    let (_dir, server) = server();
    let (mut websocket, mut connection, _sender) = http2_websocket(&server, "alice", "phone").await;
    websocket.close(None).await.unwrap();
    while let Some(Ok(_)) = websocket.next().await {}
    drop(websocket);
    // The idle bound, then the graceful close (the client keeps its side open).
    tokio::time::timeout(Duration::from_secs(90), &mut connection)
        .await
        .expect("the server closed the idle connection")
        .unwrap()
        .unwrap();
}

/// On SIGTERM a WebSocket over HTTP/2 is told `reconnect` and closed 1001, as one over
/// HTTP/1, and the server exits 0.
#[tokio::test]
async fn sigterm_tells_an_http2_websocket_to_reconnect_and_closes_it_1001() {
    use futures::StreamExt;
    use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
    let (_dir, mut server) = server();
    let (mut websocket, _connection, _sender) = http2_websocket(&server, "alice", "phone").await;
    let terminated = tokio::task::spawn_blocking(move || server.terminate());
    let mut reconnect = false;
    let close = loop {
        let message = tokio::time::timeout(WAIT, websocket.next())
            .await
            .expect("a frame in time")
            .expect("the WebSocket open until its close")
            .unwrap();
        match message {
            Message::Text(text) if text.contains("\"reconnect\"") => reconnect = true,
            Message::Close(close) => break close,
            _ => {}
        }
    };
    assert!(reconnect, "reconnect before the close");
    assert_eq!(close.map(|c| c.code), Some(CloseCode::Away));
    let status = terminated.await.unwrap();
    assert!(status.success(), "exit status {status}");
}

/// An app its OS suspended keeps its TCP connection (the kernel answers it, and its keepalive
/// probes) but reads nothing, and so answers no WebSocket ping. The server pings its
/// connections every `--ping-interval` and closes one that read nothing for two intervals,
/// 1001: its device is no longer connected, and the push notifier notifies it. It was counted
/// as connected for good, took events live that nobody read, and was notified of none.
#[tokio::test]
async fn a_connection_whose_client_answers_no_ping_is_closed() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_in(dir.path(), &["--ping-interval", "1s"]);
    let mut alice = server.connect("alice", "phone").await;
    expect_sync_done(&mut alice).await;
    // alice's app is suspended: nothing reads its socket.
    let deadline = std::time::Instant::now() + WAIT;
    while server.metric("courier_gateway_silent_closes_total").await < 1 {
        assert!(
            std::time::Instant::now() < deadline,
            "the silent connection was never closed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    match alice.next_frame_within(WAIT).await {
        Err(ClientError::Closed(Some((code, _)))) => assert_eq!(code, 1001),
        other => panic!("expected the silent connection closed 1001, got {other:?}"),
    }
}
