//! Black-box tests of groups, delete for everyone, receipts, typing, rate limits, devices and
//! retention against a real `courier serve`.

mod support;

use courier_client::proto::*;
use courier_client::{Client, ClientError, Target};
use std::time::Duration;
use support::{
    Server, WAIT, connected, events_until_closed, next_event, send_long_history, start, users,
};

fn server_error(result: Result<Sent, ClientError>) -> ErrorCode {
    match result {
        Err(ClientError::Server(e)) => e.code,
        other => panic!("expected a server error, got {other:?}"),
    }
}

#[tokio::test]
async fn membership_changes_are_sequenced_events_and_only_admins_manage_members() {
    let (_dir, server) = start(&[]);
    let alice = server.http("alice", "phone");
    let conv = alice
        .create_group("friends", &users(&["bob"]))
        .await
        .unwrap();
    assert!(conv.starts_with("g:"));
    let mut bob = server.connect("bob", "phone").await;
    let events = bob.events_until_sync_done().await.unwrap();
    assert_eq!(events.len(), 1);
    match &events[0].payload {
        EventPayload::GroupCreated { name, members } => {
            assert_eq!(name, "friends");
            assert_eq!(members, &users(&["alice", "bob"]));
        }
        other => panic!("expected group_created, got {other:?}"),
    }
    assert_eq!(
        (events[0].seq, events[0].sender.user.as_str()),
        (1, "alice")
    );

    let (status, _) = server
        .http("bob", "phone")
        .post(
            &format!("/v1/groups/{conv}/members"),
            &serde_json::json!({"users": ["mallory"]}),
        )
        .await
        .unwrap();
    assert_eq!(status, 403, "members who are not admins cannot add");
    alice.add_members(&conv, &users(&["carol"])).await.unwrap();
    let added = next_event(&mut bob).await;
    assert_eq!(added.seq, 2);
    assert_eq!(
        added.payload,
        EventPayload::MemberAdded(MembershipChange::new(users(&["carol"])))
    );

    let (status, body) = server
        .http("alice", "phone")
        .get("/v1/conversations")
        .await
        .unwrap();
    assert_eq!(status, 200);
    let listed = &body["conversations"][0];
    assert_eq!(
        (listed["kind"].as_str(), listed["name"].as_str()),
        (Some("group"), Some("friends"))
    );

    let (status, _) = server
        .http("carol", "phone")
        .delete(&format!("/v1/groups/{conv}/members/bob"))
        .await
        .unwrap();
    assert_eq!(status, 403, "members remove only themselves");
    server
        .http("carol", "phone")
        .remove_member(&conv, "carol")
        .await
        .unwrap();
    let left = next_event(&mut bob).await;
    assert_eq!(
        left.payload,
        EventPayload::MemberRemoved(MembershipChange::new(users(&["carol"])))
    );

    let (status, body) = alice
        .post("/v1/groups", &serde_json::json!({"name": ""}))
        .await
        .unwrap();
    assert_eq!((status, body["code"].as_str()), (400, Some("bad_request")));
    let (status, _) = alice
        .post(
            "/v1/groups",
            &serde_json::json!({"name": "x", "members": ["bad id!"]}),
        )
        .await
        .unwrap();
    assert_eq!(status, 400);
}

#[tokio::test]
async fn a_removed_member_gets_nothing_after_its_removal_even_with_messages_in_flight() {
    let (_dir, server) = start(&["--user-sends-per-sec", "0", "--group-sends-per-sec", "0"]);
    let admin = server.http("alice", "phone");
    let conv = admin
        .create_group("g", &users(&["bob", "carol"]))
        .await
        .unwrap();
    let mut alice = connected(&server, "alice", "phone").await;
    let mut bob = connected(&server, "bob", "phone").await;
    let mut carol = connected(&server, "carol", "phone").await;

    // Alice sends before bob's removal, and keeps sending while he is removed.
    for i in 0..5 {
        alice
            .send_text(Target::Conversation(conv.clone()), &format!("m{i}"), "hi")
            .await
            .unwrap();
    }
    let sender_conv = conv.clone();
    let sender = tokio::spawn(async move {
        for i in 5..60 {
            alice
                .send_text(
                    Target::Conversation(sender_conv.clone()),
                    &format!("m{i}"),
                    "hi",
                )
                .await
                .unwrap();
        }
        alice
    });
    admin.remove_member(&conv, "bob").await.unwrap();

    // Carol sees everything: 60 messages and the removal, in order.
    let mut removal_seq = None;
    let mut last = 1;
    let mut messages = 0;
    while messages < 60 || removal_seq.is_none() {
        let event = next_event(&mut carol).await;
        assert_eq!(event.seq, last + 1, "carol gets every seq in order");
        last = event.seq;
        match event.payload {
            EventPayload::MemberRemoved(ref change) if change.users == ["bob"] => {
                removal_seq = Some(event.seq)
            }
            EventPayload::Message { .. } => messages += 1,
            _ => {}
        }
    }
    let removal_seq = removal_seq.unwrap();
    // One more message, sequenced after the removal for certain.
    let mut alice = sender.await.unwrap();
    let after = alice
        .send_text(Target::Conversation(conv.clone()), "after", "bye")
        .await
        .unwrap()
        .seq;
    assert!(after > removal_seq);
    assert_eq!(next_event(&mut carol).await.seq, after);

    // Bob was a member from the group's creation (seq 1, in his catch-up) to his removal: live,
    // he gets every event after seq 1 up to and including his removal, in order.
    let seqs_of = |events: &[Event]| events.iter().map(|e| e.seq).collect::<Vec<_>>();
    let mut live = Vec::new();
    while live.last().is_none_or(|e: &Event| e.seq < removal_seq) {
        live.push(next_event(&mut bob).await);
    }
    assert_eq!(seqs_of(&live), (2..=removal_seq).collect::<Vec<_>>());
    // Then nothing. Fanout hands an event to all its recipients' queues in one step, so once
    // carol has `after` bob's queue has had it too if it were his; and a connection writes
    // what is queued before it reads the next frame (the ping).
    let mut later = Vec::new();
    bob.send_frame(&ClientFrame::Ping(Ping { reference: Some(7) }))
        .await
        .unwrap();
    loop {
        match bob.next_frame_within(WAIT).await.unwrap() {
            ServerFrame::Pong(_) => break,
            ServerFrame::Event(event) => later.push(event.seq),
            _ => {}
        }
    }
    assert_eq!(later, Vec::<u64>::new(), "bob got events after his removal");
    assert_eq!(
        server_error(
            bob.send_text(Target::Conversation(conv.clone()), "late", "x")
                .await
        ),
        ErrorCode::Forbidden
    );

    // A former member still reads up to its removal and no further: on reconnect (bob acked
    // nothing, so all of it comes again) and by fetch.
    let mut resynced = server.connect("bob", "phone").await;
    let caught_up = resynced.events_until_sync_done().await.unwrap();
    assert_eq!(seqs_of(&caught_up), (1..=removal_seq).collect::<Vec<_>>());
    let page = resynced.fetch(&conv, 0, Some(1000)).await.unwrap();
    assert_eq!(seqs_of(&page.events), (1..=removal_seq).collect::<Vec<_>>());
    assert_eq!(
        page.head_seq, removal_seq,
        "the head as it was at the removal"
    );
}

#[tokio::test]
async fn an_added_member_sees_events_from_its_join_on() {
    let (_dir, server) = start(&[]);
    let admin = server.http("alice", "phone");
    let conv = admin.create_group("g", &[]).await.unwrap();
    let mut alice = connected(&server, "alice", "phone").await;
    for i in 0..3 {
        alice
            .send_text(
                Target::Conversation(conv.clone()),
                &format!("before{i}"),
                "secret",
            )
            .await
            .unwrap();
    }
    admin.add_members(&conv, &users(&["dave"])).await.unwrap();
    alice
        .send_text(Target::Conversation(conv.clone()), "after", "welcome")
        .await
        .unwrap();
    let mut dave = server.connect("dave", "phone").await;
    let events = dave.events_until_sync_done().await.unwrap();
    let seqs: Vec<u64> = events.iter().map(|e| e.seq).collect();
    assert_eq!(
        seqs,
        vec![5, 6],
        "the join (5) and what follows, none of 1..=4"
    );
    assert_eq!(
        events[0].payload,
        EventPayload::MemberAdded(MembershipChange::new(users(&["dave"])))
    );
    let page = dave.fetch(&conv, 0, None).await.unwrap();
    assert_eq!(
        page.events.iter().map(|e| e.seq).collect::<Vec<_>>(),
        vec![5, 6]
    );
    assert_eq!(page.head_seq, 6);
}

#[tokio::test]
async fn delete_for_everyone_tombstones_the_message() {
    let (_dir, server) = start(&[]);
    let conv = server
        .http("alice", "phone")
        .create_group("g", &users(&["bob", "carol"]))
        .await
        .unwrap();
    let mut alice = connected(&server, "alice", "phone").await;
    let mut bob = connected(&server, "bob", "phone").await;
    let mut carol = connected(&server, "carol", "phone").await;
    let by_bob = bob
        .send_text(Target::Conversation(conv.clone()), "b1", "oops")
        .await
        .unwrap();
    let by_carol = carol
        .send_text(Target::Conversation(conv.clone()), "c1", "hello")
        .await
        .unwrap();

    assert_eq!(
        server_error(carol.delete(&conv, by_bob.seq).await),
        ErrorCode::Forbidden,
        "not your message"
    );
    let deleted = bob.delete(&conv, by_bob.seq).await.unwrap();
    assert_eq!(deleted.client_msg_id, format!("delete:{}", by_bob.seq));
    let again = bob.delete(&conv, by_bob.seq).await.unwrap();
    assert!(again.duplicate, "a retried delete is idempotent");
    // The group admin may delete anyone's message.
    alice.delete(&conv, by_carol.seq).await.unwrap();

    let page = carol.fetch(&conv, 0, None).await.unwrap();
    let target = page.events.iter().find(|e| e.seq == by_bob.seq).unwrap();
    assert_eq!(
        target.payload,
        EventPayload::Message {
            body: None,
            client_msg_id: "b1".into(),
            reply_to: None,
            deleted: true
        }
    );
    let tombstone = page.events.iter().find(|e| e.seq == deleted.seq).unwrap();
    assert_eq!(
        tombstone.payload,
        EventPayload::Delete {
            target_seq: by_bob.seq
        }
    );
    loop {
        let event = next_event(&mut carol).await;
        if event.payload
            == (EventPayload::Delete {
                target_seq: by_bob.seq,
            })
        {
            break;
        }
    }
    assert_eq!(
        server_error(carol.delete(&conv, 999).await),
        ErrorCode::NotFound
    );
    assert_eq!(
        server_error(carol.delete(&conv, 1).await),
        ErrorCode::BadRequest,
        "group_created is not a message"
    );
}

#[tokio::test]
async fn typing_is_relayed_to_other_members_and_never_stored() {
    let (_dir, server) = start(&[]);
    let conv = server
        .http("alice", "phone")
        .create_group("g", &users(&["bob"]))
        .await
        .unwrap();
    let mut alice = connected(&server, "alice", "phone").await;
    let mut bob = connected(&server, "bob", "phone").await;
    alice.typing(&conv, true).await.unwrap();
    match bob.next_frame_within(WAIT).await.unwrap() {
        ServerFrame::Typing(t) => assert_eq!(
            (t.user.as_str(), t.active, t.conversation_id.as_str()),
            ("alice", true, conv.as_str())
        ),
        other => panic!("expected typing, got {other:?}"),
    }
    assert_eq!(
        alice.fetch(&conv, 0, None).await.unwrap().head_seq,
        1,
        "typing is not an event"
    );
    let mut mallory = connected(&server, "mallory", "phone").await;
    mallory.typing(&conv, true).await.unwrap();
    match mallory.next_frame_within(WAIT).await.unwrap() {
        ServerFrame::Error(e) => assert_eq!(e.code, ErrorCode::Forbidden),
        other => panic!("expected forbidden, got {other:?}"),
    }
}

/// Typing in a group past `--large-group-threshold` is not relayed: each frame would be
/// offered to every member (a 100,000-member group, 500,000 offers a second per typist at
/// the per-connection limit), more than the group's messages cost. It is counted as dropped;
/// messages go on as before.
#[tokio::test]
async fn typing_in_a_group_past_the_large_group_threshold_is_not_relayed() {
    let (_dir, server) = start(&["--large-group-threshold", "2"]);
    let api = server.http("alice", "phone");
    let small = api.create_group("small", &users(&["bob"])).await.unwrap();
    let large = api
        .create_group("large", &users(&["bob", "carol"]))
        .await
        .unwrap();
    let mut alice = connected(&server, "alice", "phone").await;
    let mut bob = connected(&server, "bob", "phone").await;
    alice.typing(&large, true).await.unwrap();
    alice.typing(&small, true).await.unwrap();
    // Frames of one connection are handled in order: the first typing bob sees is the small
    // group's, so the large group's was never relayed.
    match bob.next_frame_within(WAIT).await.unwrap() {
        ServerFrame::Typing(t) => assert_eq!(t.conversation_id, small),
        other => panic!("expected typing, got {other:?}"),
    }
    assert_eq!(
        server.metric("courier_gateway_typing_dropped_total").await,
        1
    );
    alice
        .send_text(Target::Conversation(large.clone()), "m1", "hi")
        .await
        .unwrap();
    let event = next_event(&mut bob).await;
    assert_eq!(event.conversation_id, large);
}

async fn next_receipt(client: &mut Client) -> Receipt {
    loop {
        if let ServerFrame::Receipt(r) = client.next_frame_within(WAIT).await.unwrap() {
            return r;
        }
    }
}

#[tokio::test]
async fn group_receipts_are_cumulative_and_coalesced_to_the_senders_in_large_groups() {
    let (_dir, server) = start(&[
        "--receipt-coalesce-above",
        "2",
        "--receipt-interval",
        "300ms",
    ]);
    let conv = server
        .http("alice", "phone")
        .create_group("g", &users(&["bob", "carol"]))
        .await
        .unwrap();
    let mut alice = connected(&server, "alice", "phone").await;
    let mut bob = connected(&server, "bob", "phone").await;
    let mut carol = connected(&server, "carol", "phone").await;
    let group = || Target::Conversation(conv.clone());
    for i in 0..3 {
        alice
            .send_text(group(), &format!("a{i}"), "x")
            .await
            .unwrap();
    }
    for seq in 2..=4 {
        bob.ack(&conv, seq, AckKind::Read).await.unwrap();
    }
    // Three acks inside one interval: one receipt, with the latest cursors, to the sender of
    // the events it covers.
    let receipt = next_receipt(&mut alice).await;
    let cursors = |r: &Receipt| (r.user.clone(), r.delivered_seq, r.read_seq);
    assert_eq!(cursors(&receipt), ("bob".into(), 4, 4));

    // Carol's message (seq 5) read by bob: the receipt goes to carol, not to alice; carol's
    // first receipt is this one (the one of seqs 2..4 never went to her).
    carol.send_text(group(), "c0", "from carol").await.unwrap();
    bob.ack(&conv, 5, AckKind::Read).await.unwrap();
    assert_eq!(
        cursors(&next_receipt(&mut carol).await),
        ("bob".into(), 5, 5)
    );
    // Alice's next receipt is for her next message, not the one of carol's message.
    alice.send_text(group(), "a3", "again").await.unwrap();
    bob.ack(&conv, 6, AckKind::Delivered).await.unwrap();
    assert_eq!(
        cursors(&next_receipt(&mut alice).await),
        ("bob".into(), 6, 5)
    );

    let (_, body) = server
        .http("bob", "phone")
        .get("/v1/conversations")
        .await
        .unwrap();
    assert_eq!(body["conversations"][0]["read_seq"], 5);
    assert_eq!(body["conversations"][0]["delivered_seq"], 6);
}

#[tokio::test]
async fn receipts_in_a_small_group_never_disconnect_a_slow_member_and_reach_it_later() {
    let (_dir, server) = start(&[
        "--outbound-queue",
        "16",
        "--user-sends-per-sec",
        "0",
        "--group-sends-per-sec",
        "0",
    ]);
    let conv = server
        .http("alice", "phone")
        .create_group("g", &users(&["bob"]))
        .await
        .unwrap();
    let mut alice = connected(&server, "alice", "phone").await;
    let mut bob = connected(&server, "bob", "phone").await;
    // Bob reads nothing: large messages fill his socket buffers, then his queue of 16 (events
    // that find it full are dropped from it and read from the store later).
    let body = "y".repeat(60_000);
    let mut head = 1;
    while server
        .metric("courier_gateway_lagged_deliveries_total")
        .await
        == 0
    {
        assert!(head < 2000, "bob's queue never filled");
        for _ in 0..10 {
            head = alice
                .send_text(
                    Target::Conversation(conv.clone()),
                    &format!("m{head}"),
                    &body,
                )
                .await
                .unwrap()
                .seq;
        }
    }
    // Alice's acks move her receipt cursors while bob's queue is full.
    alice
        .ack(&conv, head - 1, AckKind::Delivered)
        .await
        .unwrap();
    alice.ack(&conv, head, AckKind::Read).await.unwrap();
    alice.ping().await.unwrap();

    // Bob reads again: everything comes, on the same connection, up to the latest receipt.
    let mut seq = 1;
    loop {
        match bob.next_frame_within(WAIT).await {
            Ok(ServerFrame::Event(event)) => {
                assert_eq!(event.seq, seq + 1, "events in order");
                seq = event.seq;
            }
            Ok(ServerFrame::Receipt(r)) if (r.delivered_seq, r.read_seq) == (head, head) => {
                assert_eq!(r.user, "alice");
                break;
            }
            Ok(_) => {}
            Err(e) => panic!("bob lost his connection or waited in vain: {e}"),
        }
    }
    bob.ping().await.unwrap();
}

#[tokio::test]
async fn a_flood_from_one_user_is_limited_while_others_are_unaffected() {
    let (_dir, server) = start(&["--user-sends-per-sec", "5", "--user-sends-burst", "10"]);
    let mut flooder = connected(&server, "flooder", "phone").await;
    let mut limited = None;
    for i in 0..40 {
        match flooder
            .send_text(Target::User("bob".into()), &format!("f{i}"), "spam")
            .await
        {
            Ok(_) => {}
            Err(ClientError::Server(e)) => {
                limited = Some(e);
                break;
            }
            Err(other) => panic!("{other}"),
        }
    }
    let limited = limited.expect("the flood is limited");
    assert_eq!(limited.code, ErrorCode::RateLimited);
    assert!(limited.retry_after_ms.unwrap_or(0) > 0);
    let mut calm = connected(&server, "calm", "phone").await;
    calm.send_text(Target::User("bob".into()), "c", "hello")
        .await
        .expect("other users are not limited");
    let text = server.metrics_text().await;
    assert!(
        text.contains("courier_chat_rate_limited_total{scope=\"user\"}"),
        "{text}"
    );
}

/// A group's name is shown to every member, whoever made it: control characters (a NUL, a line
/// break that fakes another line, a terminal's escape sequence) and bidirectional overrides (a
/// name stored as `\u{202e}gpj.exe` reads `exe.jpg`) are refused as `bad_request` with what is
/// wrong; any other text of 1 to 128 characters is taken, whatever its script or direction.
#[tokio::test]
async fn group_names_with_control_characters_are_refused() {
    let (_dir, server) = start(&[]);
    let alice = server.http("alice", "phone");
    let create = |name: String| {
        let alice = &alice;
        async move {
            let group = serde_json::json!({ "name": name, "members": ["bob"] });
            alice.post("/v1/groups", &group).await.unwrap()
        }
    };
    for name in [
        "a\u{0}b",
        "line\nbreak",
        "\u{1b}[2Jcleared",
        "tab\there",
        "c1\u{85}",
        "del\u{7f}",
        "\u{202e}gpj.exe",
        "isolated\u{2066}tail",
        "pop\u{2069}",
    ] {
        let (status, body) = create(name.to_owned()).await;
        assert_eq!(
            (status, body["code"].as_str()),
            (400, Some("bad_request")),
            "{name:?}"
        );
        assert!(
            body["message"].as_str().unwrap().contains("control"),
            "{body}"
        );
    }
    for name in [
        "Ünïcödé 👋 группа".to_owned(),
        "مجموعة\u{200f} 2".to_owned(),
        "字".repeat(128),
    ] {
        let (status, body) = create(name.clone()).await;
        assert_eq!(status, 201, "{name:?}: {body}");
    }
    let (status, _) = create("字".repeat(129)).await;
    assert_eq!(status, 400);
}

/// Sends `request` until it is refused (each accepted one passed to `accepted`), at most 200
/// times; returns the refusal's status and body.
async fn until_refused<F, Fut>(mut request: F) -> (u16, serde_json::Value)
where
    F: FnMut(usize) -> Fut,
    Fut: std::future::Future<Output = (u16, serde_json::Value)>,
{
    for i in 0..200 {
        let (status, body) = request(i).await;
        if !(200..300).contains(&status) {
            return (status, body);
        }
    }
    panic!("200 requests in a row were taken");
}

fn assert_rate_limited((status, body): (u16, serde_json::Value)) {
    assert_eq!(status, 429, "{body}");
    assert_eq!(body["code"], "rate_limited", "{body}");
    assert!(body["retry_after_ms"].as_u64().unwrap_or(0) > 0, "{body}");
}

/// Every membership change is an event that every member's devices get, as a message is: a
/// user creating groups of 1,000 or an admin adding and removing in a loop draws on the user's
/// send rate, as its sends do (429 `rate_limited` with the wait), or a group of 100,000 took
/// events at any rate, past the limit its messages have. Leaving a group is never refused.
#[tokio::test]
async fn membership_requests_draw_on_the_users_send_rate_and_leaving_never_is() {
    let (_dir, server) = start(&["--user-sends-per-sec", "1", "--user-sends-burst", "4"]);
    let admin = server.http("alice", "phone");
    let create = |_| async {
        let group = serde_json::json!({ "name": "g", "members": ["bob"] });
        admin.post("/v1/groups", &group).await.unwrap()
    };
    let refused = until_refused(create).await;
    let wait = refused.1["retry_after_ms"].as_u64().unwrap_or(0);
    assert_rate_limited(refused);
    // Taken once the wait it was told has passed.
    tokio::time::sleep(Duration::from_millis(wait)).await;
    let (status, body) = create(0).await;
    assert_eq!(status, 201, "{body}");
    let conv = body["conversation_id"].as_str().unwrap().to_owned();
    let members = format!("/v1/groups/{conv}/members");
    let add_or_remove = |i: usize| {
        let (admin, members) = (&admin, &members);
        async move {
            if i.is_multiple_of(2) {
                admin.delete(&format!("{members}/bob")).await.unwrap()
            } else {
                let bob = serde_json::json!({ "users": ["bob"] });
                admin.post(members, &bob).await.unwrap()
            }
        }
    };
    assert_rate_limited(until_refused(add_or_remove).await);
    // The admin's bucket is empty; leaving takes nothing from it.
    let (status, body) = admin.delete(&format!("{members}/alice")).await.unwrap();
    assert_eq!(status, 200, "{body}");
    let bob = server.http("bob", "phone");
    assert!(bob.create_group("b", &[]).await.is_ok(), "bob has his own");
}

#[tokio::test]
async fn devices_are_listed_and_unlinked_devices_are_refused() {
    let (dir, server) = start(&[]);
    let mut phone = connected(&server, "alice", "phone").await;
    let _laptop = connected(&server, "alice", "laptop").await;
    let (status, body) = server
        .http("alice", "phone")
        .get("/v1/devices")
        .await
        .unwrap();
    assert_eq!(status, 200);
    let devices: Vec<&str> = body["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["device"].as_str().unwrap())
        .collect();
    assert_eq!(devices, ["laptop", "phone"]);
    assert!(body["devices"][0]["last_seen_ms"].as_u64().unwrap() > 0);

    let (status, _) = server
        .http("alice", "laptop")
        .delete("/v1/devices/phone")
        .await
        .unwrap();
    assert_eq!(status, 204);
    match phone.next_frame_within(WAIT).await {
        Err(ClientError::Closed(Some((code, _)))) => assert_eq!(code, 1008),
        other => panic!("expected the unlinked device to be closed, got {other:?}"),
    }
    match Client::connect(
        &server.ws_url(),
        &server.token("alice", "phone"),
        Encoding::Json,
    )
    .await
    {
        Err(ClientError::Rejected(401)) => {}
        other => panic!(
            "expected 401 for an unlinked device, got {:?}",
            other.map(|_| ())
        ),
    }
    let (_, body) = server
        .http("alice", "laptop")
        .get("/v1/devices")
        .await
        .unwrap();
    assert_eq!(body["devices"].as_array().unwrap().len(), 1);
    let (status, _) = server
        .http("alice", "laptop")
        .delete("/v1/devices/phone")
        .await
        .unwrap();
    assert_eq!(status, 404);

    // Signing in again (a token issued after the unlink) links the device anew.
    let fresh = support::token_with_iat(dir.path(), "alice", "phone", 5);
    Client::connect(&server.ws_url(), &fresh, Encoding::Json)
        .await
        .expect("a newer token is accepted");
}

/// A token used only on the HTTP API (never a WebSocket) still belongs to a device the user
/// can see and unlink: a stolen token must not read the user's conversations unseen and
/// beyond the reach of `DELETE /v1/devices/{device}`.
#[tokio::test]
async fn a_device_that_only_used_the_http_api_is_listed_and_can_be_unlinked() {
    let (_dir, server) = start(&[]);
    let mut phone = connected(&server, "alice", "phone").await;
    phone
        .send_text(Target::User("bob".into()), "m1", "secret plans")
        .await
        .unwrap();
    let thief = server.http("alice", "stolen");
    assert_eq!(thief.get("/v1/conversations").await.unwrap().0, 200);

    let owner = server.http("alice", "phone");
    let (_, body) = owner.get("/v1/devices").await.unwrap();
    assert!(
        body["devices"]
            .as_array()
            .unwrap()
            .iter()
            .any(|d| d["device"] == "stolen"),
        "the device that used the API is listed: {body}"
    );
    assert_eq!(owner.delete("/v1/devices/stolen").await.unwrap().0, 204);
    assert_eq!(thief.get("/v1/conversations").await.unwrap().0, 401);
}

/// The device ids `GET /v1/devices` lists for `user`, asked from another of its devices
/// (`web`, itself listed and left out here).
async fn listed_devices(server: &Server, user: &str) -> Vec<String> {
    let (status, body) = server.http(user, "web").get("/v1/devices").await.unwrap();
    assert_eq!(status, 200, "{body}");
    body["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["device"].as_str().unwrap().to_owned())
        .filter(|device| device != "web")
        .collect()
}

#[tokio::test]
async fn a_device_signed_in_again_after_an_unlink_can_be_unlinked_again() {
    let (dir, server) = start(&[]);
    let old = server.token("alice", "phone");
    let mut phone = connected(&server, "alice", "phone").await;
    let web = server.http("alice", "web");
    assert_eq!(web.delete("/v1/devices/phone").await.unwrap().0, 204);
    assert!(matches!(
        phone.next_frame_within(WAIT).await,
        Err(ClientError::Closed(Some((1008, _))))
    ));

    // A token issued after the unlink links the device again: listed, unlinkable.
    let fresh = support::token_with_iat(dir.path(), "alice", "phone", 5);
    let mut phone = Client::connect(&server.ws_url(), &fresh, Encoding::Json)
        .await
        .expect("a newer token is accepted");
    phone.events_until_sync_done().await.unwrap();
    assert_eq!(listed_devices(&server, "alice").await, ["phone"]);
    assert_eq!(web.delete("/v1/devices/phone").await.unwrap().0, 204);
    assert!(matches!(
        phone.next_frame_within(WAIT).await,
        Err(ClientError::Closed(Some((1008, _))))
    ));
    assert!(listed_devices(&server, "alice").await.is_empty());
    for token in [&old, &fresh] {
        let refused = Client::connect(&server.ws_url(), token, Encoding::Json).await;
        assert!(
            matches!(refused, Err(ClientError::Rejected(401))),
            "a token of the unlinked device is refused"
        );
        let http = courier_client::HttpApi::new(&server.http_url(), token).unwrap();
        assert_eq!(http.get("/v1/devices").await.unwrap().0, 401);
    }
    assert_eq!(web.delete("/v1/devices/phone").await.unwrap().0, 404);
}

/// Past `--max-devices-per-user`, a new device's token is refused 403 `forbidden` at its
/// WebSocket upgrade and over HTTP, saying to unlink a device, and no device is unlinked in
/// its place; the linked ones go on working, and unlinking one makes room.
#[tokio::test]
async fn a_device_past_the_limit_is_refused_until_another_is_unlinked() {
    let (_dir, server) = start(&["--max-devices-per-user", "2"]);
    let _phone = connected(&server, "alice", "phone").await;
    let laptop = server.http("alice", "laptop");
    assert_eq!(laptop.get("/v1/devices").await.unwrap().0, 200);

    let refused = Client::connect(
        &server.ws_url(),
        &server.token("alice", "tablet"),
        Encoding::Json,
    )
    .await;
    assert!(
        matches!(refused, Err(ClientError::Rejected(403))),
        "a third device's upgrade: {:?}",
        refused.map(|_| ())
    );
    let tablet = server.http("alice", "tablet");
    let (status, body) = tablet.get("/v1/conversations").await.unwrap();
    assert_eq!((status, body["code"].as_str()), (403, Some("forbidden")));
    let message = body["message"].as_str().unwrap();
    assert!(
        message.contains("DELETE /v1/devices/") && message.contains("laptop"),
        "says to unlink one, the laptop seen least recently (never connected): {message}"
    );

    // The linked devices go on, neither unlinked in the tablet's place.
    let _phone_again = connected(&server, "alice", "phone").await;
    let (status, body) = laptop.get("/v1/devices").await.unwrap();
    assert_eq!(status, 200, "{body}");
    let listed: Vec<&str> = body["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["device"].as_str().unwrap())
        .collect();
    assert_eq!(listed, ["laptop", "phone"]);
    // Another user's devices are counted apart.
    let _bob = connected(&server, "bob", "tablet").await;

    assert_eq!(laptop.delete("/v1/devices/phone").await.unwrap().0, 204);
    let _tablet = connected(&server, "alice", "tablet").await;
    assert_eq!(tablet.get("/v1/conversations").await.unwrap().0, 200);
}

#[tokio::test]
async fn a_device_is_listed_as_soon_as_it_has_sync_done() {
    // 51 devices of one user.
    let (_dir, server) = start(&["--max-devices-per-user", "0"]);
    // Its record is written before `sync_done`, not beside the catch-up.
    let web = server.http("alice", "web");
    for i in 0..50 {
        let device = format!("d{i}");
        let _client = connected(&server, "alice", &device).await;
        let (_, body) = web.get("/v1/devices").await.unwrap();
        assert!(
            body["devices"]
                .as_array()
                .unwrap()
                .iter()
                .any(|d| d["device"] == device.as_str()),
            "{device} is listed right after its sync_done: {body}"
        );
    }
}

#[tokio::test]
async fn retention_clears_delivered_events_and_late_devices_get_trimmed() {
    let (_dir, server) = start(&["--retention", "0s", "--retention-interval", "50ms"]);
    let mut alice = connected(&server, "alice", "phone").await;
    let mut conv = String::new();
    for i in 1..=3 {
        conv = alice
            .send_text(Target::User("bob".into()), &format!("m{i}"), "x")
            .await
            .unwrap()
            .conversation_id;
    }
    // Nothing is cleared while bob's active device has not had the messages.
    let mut bob = connected(&server, "bob", "phone").await;
    alice.ack(&conv, 3, AckKind::Delivered).await.unwrap();
    alice.ping().await.unwrap();
    assert_eq!(alice.fetch(&conv, 0, None).await.unwrap().events.len(), 3);
    bob.ack(&conv, 3, AckKind::Delivered).await.unwrap();
    bob.ping().await.unwrap();
    until_trimmed(&server.http("alice", "phone"), &conv, 4).await;
    let mut tablet = server.connect("bob", "tablet").await;
    match tablet.next_frame_within(WAIT).await.unwrap() {
        ServerFrame::Trimmed(t) => assert_eq!(
            (t.conversation_id.as_str(), t.floor_seq),
            (conv.as_str(), 4)
        ),
        other => panic!("expected trimmed, got {other:?}"),
    }
    let text = server.metrics_text().await;
    assert!(
        text.contains("courier_retention_events_cleared_total 3"),
        "{text}"
    );
}

/// Waits until retention has cleared every event of `conv` below `floor` that `member` (over
/// HTTP) may read.
async fn until_trimmed(member: &courier_client::HttpApi, conv: &str, floor: u64) {
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let (_, body) = member
            .get(&format!("/v1/conversations/{conv}/messages"))
            .await
            .unwrap();
        if body["events"].as_array().unwrap().is_empty() {
            assert_eq!(body["floor_seq"], floor);
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "retention did not run"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A gap fill follows the catch-up's rule: a member added to a group while connected, whose
/// earlier events (which `--history-on-join` lets it read) retention cleared, gets `trimmed`
/// before what is left, not a silent jump past them.
#[tokio::test]
async fn a_gap_fill_that_starts_below_the_retention_floor_sends_trimmed_first() {
    let (_dir, server) = start(&[
        "--retention",
        "0s",
        "--retention-interval",
        "50ms",
        "--history-on-join",
        "10",
    ]);
    let admin = server.http("alice", "phone");
    let conv = admin.create_group("g", &users(&["carol"])).await.unwrap(); // 1
    let mut alice = connected(&server, "alice", "phone").await;
    let group = Target::Conversation(conv.clone());
    for i in 2..=3 {
        alice
            .send_text(group.clone(), &format!("m{i}"), "x")
            .await
            .unwrap();
    }
    alice.ack(&conv, 3, AckKind::Delivered).await.unwrap();
    alice.ping().await.unwrap();
    until_trimmed(&admin, &conv, 4).await;
    // Bob's connection has not seen the group: his place in it is his cursor, 0.
    let mut bob = connected(&server, "bob", "phone").await;
    admin.add_members(&conv, &users(&["bob"])).await.unwrap(); // 4
    match bob.next_frame_within(WAIT).await.unwrap() {
        ServerFrame::Trimmed(t) => assert_eq!(
            (t.conversation_id.as_str(), t.floor_seq),
            (conv.as_str(), 4)
        ),
        other => panic!("expected trimmed, got {other:?}"),
    }
    assert_eq!(next_event(&mut bob).await.seq, 4);
}

/// A connection keeps a place in each conversation it wrote events in, however many
/// (`docs/operations.md`, "Limits"): within a conversation it never writes an event again, as
/// it would if it forgot its place and read the device's cursor again (PROTOCOL.md: strictly
/// increasing seqs; events come again only after a reconnect). Here bob's connection holds
/// 1,025 groups' events, none acknowledged but the first group's.
#[tokio::test]
async fn a_connection_in_more_conversations_than_the_bound_writes_no_event_twice() {
    let (_dir, server) = start(&["--user-sends-per-sec", "0"]);
    let admin = server.http("alice", "phone");
    let mut bob = connected(&server, "bob", "phone").await;
    let mut groups = Vec::new();
    for i in 0..1025 {
        let conv = admin
            .create_group(&format!("g{i}"), &users(&["bob"]))
            .await
            .unwrap();
        let created = next_event(&mut bob).await;
        assert_eq!(
            (created.conversation_id.as_str(), created.seq),
            (conv.as_str(), 1)
        );
        groups.push(conv);
    }
    // Bob acknowledges the first group's event only.
    bob.ack(&groups[0], 1, AckKind::Delivered).await.unwrap();
    bob.ping().await.unwrap();
    let mut alice = connected(&server, "alice", "phone").await;
    for conv in &groups[..2] {
        let target = Target::Conversation(conv.clone());
        alice
            .send_text(target, &format!("to {conv}"), "x")
            .await
            .unwrap();
    }
    let mut got = Vec::new();
    while got.last() != Some(&(groups[1].clone(), 2)) {
        let event = next_event(&mut bob).await;
        got.push((event.conversation_id, event.seq));
    }
    assert_eq!(got, [(groups[0].clone(), 2), (groups[1].clone(), 2)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_group_of_5000_members_delivers_one_message_to_500_devices_in_order() {
    let (_dir, server) = start(&[
        "--user-sends-per-sec",
        "0",
        "--connection-frames-per-sec",
        "0",
    ]);
    let admin = server.http("admin", "phone");
    let first: Vec<String> = (0..999).map(|i| format!("u{i:04}")).collect();
    let conv = admin.create_group("big", &first).await.unwrap();
    let rest: Vec<String> = (999..4999).map(|i| format!("u{i:04}")).collect();
    for chunk in rest.chunks(1000) {
        admin.add_members(&conv, chunk).await.unwrap();
    }
    let head = {
        let mut probe = connected(&server, "admin", "probe").await;
        probe.fetch(&conv, 0, Some(1)).await.unwrap().head_seq
    };
    assert_eq!(
        head,
        1 + 4,
        "group_created and one member_added per request"
    );

    // The last 500 members added connect (spread over tasks) and drain their catch-up.
    let mut devices = Vec::new();
    for i in 4499..4999 {
        devices.push(connected(&server, &format!("u{i:04}"), "phone").await);
    }
    let mut sender = connected(&server, "admin", "phone").await;
    let sent = sender
        .send_text(
            Target::Conversation(conv.clone()),
            "hello-all",
            "hello everyone",
        )
        .await
        .unwrap();
    assert_eq!(sent.seq, head + 1);
    let mut receivers = Vec::new();
    for mut device in devices {
        let expected = sent.seq;
        receivers.push(tokio::spawn(async move {
            let event = next_event(&mut device).await;
            assert_eq!(event.seq, expected, "the message is the next event, in order");
            assert!(matches!(event.payload, EventPayload::Message { ref client_msg_id, .. } if client_msg_id == "hello-all"));
        }));
    }
    for receiver in receivers {
        receiver.await.unwrap();
    }
}

/// An ack an unlinked device sent, read while its connection closes, is not committed: it
/// would bring back the cursor the unlink dropped, and the device, signed in again, would miss
/// what it covered.
#[tokio::test]
async fn an_ack_read_while_an_unlinked_device_closes_is_not_committed() {
    let (dir, server) = start(&["--user-sends-per-sec", "0"]);
    let mut alice = connected(&server, "alice", "phone").await;
    // More than the socket buffers hold: bob's catch-up is still being written when his ack
    // arrives and when he is unlinked, so the ack is read only as the connection closes.
    let body = "x".repeat(48 * 1024);
    let mut last = None;
    for i in 0..400 {
        let target = Target::User("bob".into());
        last = Some(
            alice
                .send_text(target, &format!("m{i}"), &body)
                .await
                .unwrap(),
        );
    }
    let last = last.unwrap();
    let mut bob = server.connect("bob", "phone").await;
    let ack = Ack {
        reference: None,
        conversation_id: last.conversation_id.clone(),
        seq: last.seq,
        kind: AckKind::Read,
    };
    bob.send_frame(&ClientFrame::Ack(ack)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let web = server.http("bob", "web");
    assert_eq!(web.delete("/v1/devices/phone").await.unwrap().0, 204);
    while bob.next_frame_within(WAIT).await.is_ok() {}

    let fresh = support::token_with_iat(dir.path(), "bob", "phone", 5);
    let mut phone = Client::connect(&server.ws_url(), &fresh, Encoding::Json)
        .await
        .expect("a newer token is accepted");
    let again = phone.events_until_sync_done().await.unwrap();
    assert_eq!(
        again.len(),
        400,
        "every message again, from an empty cursor"
    );
}

/// An unlinked device gets no more of its catch-up: its connection closes (1008) as a live
/// one does, rather than going on streaming the history for as long as the device reads.
#[tokio::test]
async fn an_unlinked_device_gets_no_more_of_its_catch_up() {
    let (_dir, server) = start(&["--user-sends-per-sec", "0"]);
    let mut alice = connected(&server, "alice", "phone").await;
    // Bob's catch-up is still being written when he is unlinked (or has not started: then it
    // never does).
    send_long_history(&mut alice, Target::User("bob".into())).await;
    let mut bob = server.connect("bob", "phone").await;
    let web = server.http("bob", "web");
    assert_eq!(web.delete("/v1/devices/phone").await.unwrap().0, 204);
    let (events, closed) = events_until_closed(&mut bob).await;
    assert!(
        matches!(closed, ClientError::Closed(Some((1008, _)))),
        "{closed:?}"
    );
    assert!(events < 400, "the whole history after the unlink");
}

/// Once its removal is answered, a removed member gets no typing and no receipts of the group:
/// the node's membership cache, which fanout keeps, is brought through the removal first.
#[tokio::test]
async fn a_removed_member_gets_no_typing_or_receipts_once_its_removal_is_answered() {
    let (_dir, server) = start(&[]);
    let admin = server.http("alice", "p");
    for round in 0..10 {
        let conv = admin
            .create_group("g", &users(&["bob", "carol"]))
            .await
            .unwrap();
        let mut alice = connected(&server, "alice", "p").await;
        let mut carol = connected(&server, "carol", "p").await;
        let mut bob = connected(&server, "bob", "p").await;
        admin.remove_member(&conv, "bob").await.unwrap();
        alice.typing(&conv, true).await.unwrap();
        carol.ack(&conv, 2, AckKind::Read).await.unwrap();
        alice.ping().await.unwrap();
        carol.ping().await.unwrap();
        while let Ok(frame) = bob.next_frame_within(Duration::from_millis(150)).await {
            assert!(
                !matches!(frame, ServerFrame::Typing(_) | ServerFrame::Receipt(_)),
                "round {round}: removed bob got {frame:?}"
            );
        }
    }
}

/// A delete for everyone is an event every member gets, as a message is: it draws on the
/// user's send rate (each device could delete each message again, a new event each time).
#[tokio::test]
async fn deletes_draw_on_the_users_send_rate() {
    let (_dir, server) = start(&["--user-sends-per-sec", "1", "--user-sends-burst", "3"]);
    let mut phone = connected(&server, "alice", "phone").await;
    let mut laptop = connected(&server, "alice", "laptop").await;
    let bob = Target::User("bob".into());
    let sent = phone.send_text(bob, "m1", "hi").await.unwrap();
    let conv = sent.conversation_id.clone();
    phone.delete(&conv, sent.seq).await.unwrap();
    laptop.delete(&conv, sent.seq).await.unwrap();
    assert_eq!(
        server_error(phone.delete(&conv, sent.seq).await),
        ErrorCode::RateLimited
    );
}

/// A member's own sends racing its removal, many in flight at once: each is answered, `sent`
/// for the messages sequenced before the removal and `forbidden` for the others, and none is
/// stored after the removal (the sequenced commit decides again at the event's place in the
/// order, after the check its send passed on arrival).
#[tokio::test]
async fn a_members_sends_in_flight_at_its_removal_are_never_stored_after_it() {
    let (_dir, server) = start(&["--user-sends-per-sec", "0", "--group-sends-per-sec", "0"]);
    let admin = server.http("alice", "phone");
    for round in 0..3 {
        let conv = admin.create_group("g", &users(&["bob"])).await.unwrap();
        let mut bob = connected(&server, "bob", "phone").await;
        let sends = |ids: std::ops::Range<u32>| -> Vec<ClientFrame> {
            ids.map(|i| {
                ClientFrame::Send(Send {
                    reference: None,
                    client_msg_id: format!("b{i}"),
                    conversation_id: Some(conv.clone()),
                    to_user: None,
                    body: Body::Text("hi".into()),
                    reply_to: None,
                })
            })
            .collect()
        };
        bob.send_frames(&sends(0..100)).await.unwrap();
        admin.remove_member(&conv, "bob").await.unwrap();
        bob.send_frames(&sends(100..150)).await.unwrap();
        let mut answered = std::collections::BTreeMap::new();
        while answered.len() < 150 {
            match bob.next_frame_within(WAIT).await.unwrap() {
                ServerFrame::Sent(sent) => answered.insert(sent.client_msg_id, Ok(sent.seq)),
                ServerFrame::Error(e) => answered.insert(e.client_msg_id.unwrap(), Err(e.code)),
                _ => None,
            };
        }

        let mut alice = connected(&server, "alice", "phone").await;
        let history = alice.fetch(&conv, 0, Some(1000)).await.unwrap().events;
        let removal = history
            .iter()
            .find(|e| matches!(&e.payload, EventPayload::MemberRemoved(c) if c.users == ["bob"]))
            .expect("bob's removal")
            .seq;
        let stored: std::collections::BTreeMap<String, u64> = history
            .iter()
            .filter_map(|e| match &e.payload {
                EventPayload::Message { client_msg_id, .. } => Some((client_msg_id.clone(), e.seq)),
                _ => None,
            })
            .collect();
        assert!(
            stored.values().all(|&seq| seq < removal),
            "round {round}: bob's messages after his removal at {removal}: {stored:?}"
        );
        for (id, answer) in answered {
            match answer {
                Ok(seq) => assert_eq!(stored.get(&id), Some(&seq), "round {round}: {id}"),
                Err(code) => {
                    assert_eq!(code, ErrorCode::Forbidden, "round {round}: {id}");
                    assert!(
                        !stored.contains_key(&id),
                        "round {round}: {id} refused, stored"
                    );
                }
            }
        }
    }
}

/// A member removed while its device's catch-up is still being written (a history longer than
/// the socket buffers, the device not reading) reads the group up to its removal, each event
/// once and in order, and nothing sequenced after it: not in the catch-up planned before the
/// removal, not live, not by a gap fill.
#[tokio::test]
async fn a_member_removed_during_its_catch_up_reads_up_to_its_removal_and_no_further() {
    let (_dir, server) = start(&["--user-sends-per-sec", "0", "--group-sends-per-sec", "0"]);
    let admin = server.http("alice", "phone");
    let conv = admin.create_group("g", &users(&["bob"])).await.unwrap();
    let group = Target::Conversation(conv.clone());
    let mut alice = connected(&server, "alice", "phone").await;
    send_long_history(&mut alice, group.clone()).await;
    let mut bob = server.connect("bob", "phone").await;
    admin.remove_member(&conv, "bob").await.unwrap();
    let after = alice.send_text(group, "after", "bye").await.unwrap().seq;
    let removal = after - 1;

    let mut seqs = Vec::new();
    while let Some(event) = bob.next_event_until_sync_done().await.unwrap() {
        seqs.push(event.seq);
    }
    while seqs.last() < Some(&removal) {
        seqs.push(next_event(&mut bob).await.seq);
    }
    assert_eq!(seqs, (1..=removal).collect::<Vec<_>>());
    bob.send_frame(&ClientFrame::Ping(Ping { reference: Some(7) }))
        .await
        .unwrap();
    loop {
        match bob.next_frame_within(WAIT).await.unwrap() {
            ServerFrame::Pong(_) => break,
            ServerFrame::Event(event) => panic!("bob got {} after his removal", event.seq),
            _ => {}
        }
    }
}
