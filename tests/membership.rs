//! Black-box tests of the membership rules, written as the adversary: a stranger poking at a
//! direct conversation, a member who left and came back, a former member catching up, racing
//! admins, and a client whose ids look like the server's. Each runs against a real
//! `courier serve` and talks the real protocol.
//!
//! The rule (PROTOCOL.md): a member receives exactly the events sequenced while it is a member,
//! from its `member_added` (or `group_created`) through its own `member_removed`, for each
//! period of membership; catch-up, gap fills, `fetch` and the HTTP messages endpoint all follow
//! it, and a former member may catch up to its removal and no further.

mod support;

use courier_client::proto::*;
use courier_client::{Client, ClientError, Target};
use sha2::{Digest, Sha256};
use support::{WAIT, connected, next_event, start, users};

/// Events up to and including the one at `seq` (events of a conversation come in order).
async fn events_through(client: &mut Client, seq: u64) -> Vec<Event> {
    let mut events = Vec::new();
    loop {
        let event = tokio::time::timeout(WAIT, client.next_event())
            .await
            .unwrap_or_else(|_| panic!("no event through {seq}; got {:?}", seqs(&events)))
            .unwrap();
        let last = event.seq;
        events.push(event);
        if last >= seq {
            return events;
        }
    }
}

fn seqs(events: &[Event]) -> Vec<u64> {
    events.iter().map(|e| e.seq).collect()
}

/// The id of the direct conversation of two users: public, as PROTOCOL.md lets anyone derive.
fn direct_id(a: &str, b: &str) -> String {
    let (first, second) = if a <= b { (a, b) } else { (b, a) };
    let mut hash = Sha256::new();
    hash.update(first.as_bytes());
    hash.update([0]);
    hash.update(second.as_bytes());
    format!("d:{}", hex::encode(&hash.finalize()[..16]))
}

async fn say(client: &mut Client, conv: &str, id: &str) -> u64 {
    client
        .send_text(Target::Conversation(conv.to_owned()), id, id)
        .await
        .unwrap()
        .seq
}

/// The seq of the last event of `conv` (read by a member).
async fn head(client: &mut Client, conv: &str) -> u64 {
    client.fetch(conv, 0, Some(1)).await.unwrap().head_seq
}

#[tokio::test]
async fn a_stranger_cannot_stop_live_delivery_between_two_users() {
    let (_dir, server) = start(&[]);
    let conv = direct_id("alice", "bob");
    let mut mallory = connected(&server, "mallory", "phone").await;
    // Typing into the conversation before it exists: refused, and nothing is remembered of it.
    mallory.typing(&conv, true).await.unwrap();
    let refused = mallory.fetch(&conv, 0, None).await;
    assert!(
        matches!(refused, Err(ClientError::Server(ref e)) if matches!(e.code, ErrorCode::NotFound | ErrorCode::Forbidden)),
        "{refused:?}"
    );
    let typing_answer = mallory.next_frame_within(WAIT).await.unwrap();
    assert!(
        matches!(typing_answer, ServerFrame::Error(ref e) if matches!(e.code, ErrorCode::NotFound | ErrorCode::Forbidden)),
        "the typing frame is refused: {typing_answer:?}"
    );

    let mut bob = connected(&server, "bob", "laptop").await;
    let mut alice = connected(&server, "alice", "phone").await;
    let sent = alice
        .send_text(Target::User("bob".into()), "first", "hello bob")
        .await
        .unwrap();
    assert_eq!(sent.conversation_id, conv);
    let event = next_event(&mut bob).await;
    assert_eq!(
        (event.conversation_id.as_str(), event.seq),
        (conv.as_str(), 1),
        "bob gets alice's first message live"
    );
    // And typing works between the members.
    alice.typing(&conv, true).await.unwrap();
    loop {
        match bob.next_frame_within(WAIT).await.unwrap() {
            ServerFrame::Typing(t) => {
                assert_eq!(t.user, "alice");
                break;
            }
            ServerFrame::Event(_) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
}

/// A direct conversation's id is public (derived from the two user ids), so a stranger's
/// request naming one must be answered alike whether the two users have talked or not:
/// otherwise anyone could map who talks to whom.
#[tokio::test]
async fn a_stranger_cannot_tell_whether_two_users_have_talked() {
    let (_dir, server) = start(&[]);
    let mut alice = connected(&server, "alice", "phone").await;
    say_to(&mut alice, "bob").await;
    let talked = direct_id("alice", "bob");
    let never = direct_id("alice", "carol");
    let mut mallory = connected(&server, "mallory", "phone").await;
    let http = server.http("mallory", "phone");
    let mut answers = Vec::new();
    for conv in [&talked, &never] {
        let hide = |text: &str| text.replace(conv.as_str(), "<conv>");
        let refused = |result: Result<_, ClientError>| match result {
            Err(ClientError::Server(e)) => (e.code, hide(&e.message)),
            other => panic!("a stranger's request was not refused: {:?}", other.is_ok()),
        };
        let fetch = refused(mallory.fetch(conv, 0, None).await.map(drop));
        let send = refused(
            mallory
                .send_text(Target::Conversation(conv.clone()), "probe", "hi")
                .await
                .map(drop),
        );
        let delete = refused(mallory.delete(conv, 1).await.map(drop));
        let mut over_http = Vec::new();
        for (status, body) in [
            http.get(&format!("/v1/conversations/{conv}/messages"))
                .await
                .unwrap(),
            http.get(&format!("/v1/conversations/{conv}/receipts"))
                .await
                .unwrap(),
            http.post(
                &format!("/v1/groups/{conv}/members"),
                &serde_json::json!({ "users": ["mallory"] }),
            )
            .await
            .unwrap(),
            http.delete(&format!("/v1/groups/{conv}/members/mallory"))
                .await
                .unwrap(),
        ] {
            over_http.push((status, hide(&body.to_string())));
        }
        answers.push((fetch, send, delete, over_http));
    }
    assert_eq!(
        answers[0], answers[1],
        "the answers to a stranger tell whether alice and bob have talked"
    );
}

/// The receipts `user` reads back over HTTP: `(user, delivered_seq, read_seq)` of every
/// current member, or the refusal's status and code.
async fn receipts_read_by(
    server: &support::Server,
    user: &str,
    conv: &str,
) -> Result<Vec<(String, u64, u64)>, (u16, String)> {
    let (status, body) = server
        .http(user, "phone")
        .get(&format!("/v1/conversations/{conv}/receipts"))
        .await
        .unwrap();
    if status != 200 {
        return Err((status, body["code"].as_str().unwrap_or_default().to_owned()));
    }
    Ok(body["receipts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            assert_eq!(r["conversation_id"], conv);
            (
                r["user"].as_str().unwrap().to_owned(),
                r["delivered_seq"].as_u64().unwrap(),
                r["read_seq"].as_u64().unwrap(),
            )
        })
        .collect())
}

/// Receipt frames reach only the devices connected when the cursors move, so a member reads
/// them back over HTTP; a former member, a stranger and a bad id are refused as `fetch` is.
#[tokio::test]
async fn receipts_are_read_back_by_current_members_only() {
    let (_dir, server) = start(&[]);
    let admin = server.http("alice", "phone");
    let conv = admin
        .create_group("g", &users(&["bob", "carol"]))
        .await
        .unwrap(); // 1
    let mut alice = connected(&server, "alice", "phone").await;
    say(&mut alice, &conv, "m1").await; // 2
    let last = say(&mut alice, &conv, "m2").await; // 3
    drop(alice);
    // While alice's only device is away: bob reads everything, carol has the first delivered.
    let mut bob = connected(&server, "bob", "phone").await;
    bob.ack(&conv, last, AckKind::Read).await.unwrap();
    let mut carol = connected(&server, "carol", "phone").await;
    carol.ack(&conv, 2, AckKind::Delivered).await.unwrap();
    // Each ack takes effect before the connection's next frame is handled: a fetch's answer
    // comes after both are committed.
    bob.fetch(&conv, 0, Some(1)).await.unwrap();
    carol.fetch(&conv, 0, Some(1)).await.unwrap();

    let everyone = vec![
        ("alice".to_owned(), 0, 0),
        ("bob".to_owned(), last, last),
        ("carol".to_owned(), 2, 0),
    ];
    assert_eq!(
        receipts_read_by(&server, "alice", &conv).await,
        Ok(everyone)
    );

    admin.remove_member(&conv, "carol").await.unwrap(); // 4
    let current = vec![("alice".to_owned(), 0, 0), ("bob".to_owned(), last, last)];
    assert_eq!(
        receipts_read_by(&server, "bob", &conv).await,
        Ok(current),
        "a former member's cursors leave the list"
    );
    let forbidden = Err((403, "forbidden".to_owned()));
    assert_eq!(receipts_read_by(&server, "carol", &conv).await, forbidden);
    assert_eq!(receipts_read_by(&server, "mallory", &conv).await, forbidden);
    assert_eq!(
        receipts_read_by(&server, "alice", "g:none").await,
        Err((404, "not_found".to_owned()))
    );
    assert_eq!(
        receipts_read_by(&server, "alice", "no%20spaces").await,
        Err((400, "bad_request".to_owned()))
    );
}

/// Past `--receipt-coalesce-above` members a group's receipts go only to the senders they
/// cover, so its members are not told every member's cursors here either.
#[tokio::test]
async fn receipts_of_a_group_whose_receipts_go_to_senders_only_are_not_listed() {
    let (_dir, server) = start(&["--receipt-coalesce-above", "2"]);
    let admin = server.http("alice", "phone");
    let pair = admin.create_group("two", &users(&["bob"])).await.unwrap();
    let three = admin
        .create_group("three", &users(&["bob", "carol"]))
        .await
        .unwrap();
    assert_eq!(
        receipts_read_by(&server, "bob", &pair).await,
        Ok(vec![("alice".to_owned(), 0, 0), ("bob".to_owned(), 0, 0)])
    );
    assert_eq!(
        receipts_read_by(&server, "bob", &three).await,
        Err((413, "too_large".to_owned()))
    );
}

async fn say_to(client: &mut Client, user: &str) {
    client
        .send_text(Target::User(user.to_owned()), "hello", "hello")
        .await
        .unwrap();
}

#[tokio::test]
async fn a_member_who_left_and_came_back_never_reads_what_was_sent_while_away() {
    let (_dir, server) = start(&[]);
    let admin = server.http("alice", "phone");
    let conv = admin.create_group("g", &users(&["dave"])).await.unwrap();
    let mut alice = connected(&server, "alice", "phone").await;
    let mut dave = connected(&server, "dave", "phone").await;

    say(&mut alice, &conv, "before").await; // 2
    admin.remove_member(&conv, "dave").await.unwrap(); // 3
    let away = [
        say(&mut alice, &conv, "away-1").await,
        say(&mut alice, &conv, "away-2").await,
    ]; // 4, 5
    admin.add_members(&conv, &users(&["dave"])).await.unwrap(); // 6
    let after = say(&mut alice, &conv, "after").await; // 7

    // Live (with the gap before the re-add filled from the store).
    let live = events_through(&mut dave, after).await;
    assert_eq!(
        seqs(&live),
        [2, 3, 6, 7],
        "nothing of the time away: {live:?}"
    );

    // Catch-up of a device that was offline through all of it.
    let offline = server
        .connect("dave", "tablet")
        .await
        .events_until_sync_done()
        .await;
    assert_eq!(seqs(&offline.unwrap()), [1, 2, 3, 6, 7]);

    // fetch and the HTTP messages endpoint.
    let page = dave.fetch(&conv, 0, Some(100)).await.unwrap();
    assert_eq!(seqs(&page.events), [1, 2, 3, 6, 7]);
    let page = dave.fetch(&conv, 3, Some(1)).await.unwrap();
    assert_eq!(seqs(&page.events), [6], "a page skips the time away");
    let (status, body) = server
        .http("dave", "phone")
        .get(&format!("/v1/conversations/{conv}/messages"))
        .await
        .unwrap();
    assert_eq!(status, 200);
    let listed: Vec<u64> = body["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(listed, [1, 2, 3, 6, 7]);
    assert!(away.iter().all(|s| !listed.contains(s)));
}

/// `unread` in `GET /v1/conversations` of `user` for `conv`.
async fn unread(server: &support::Server, user: &str, conv: &str) -> u64 {
    let list = server.http(user, "phone").conversations().await.unwrap();
    let row = list["conversations"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["conversation_id"] == conv)
        .unwrap_or_else(|| panic!("{conv} is not listed for {user}: {list}"))
        .clone();
    row["unread"].as_u64().unwrap()
}

/// `unread` counts the events above the user's read cursor that it may read: a member added to
/// a group with a long history, or back after a time away, is not shown as unread what it will
/// never be given.
#[tokio::test]
async fn the_unread_count_is_of_events_the_member_may_read() {
    let (_dir, server) = start(&[]);
    let admin = server.http("alice", "phone");
    let conv = admin.create_group("g", &users(&["dave"])).await.unwrap();
    let mut alice = connected(&server, "alice", "phone").await;
    for i in 0..5 {
        say(&mut alice, &conv, &format!("early-{i}")).await; // 2..=6
    }
    admin.add_members(&conv, &users(&["erin"])).await.unwrap(); // 7
    say(&mut alice, &conv, "hello erin").await; // 8
    assert_eq!(
        unread(&server, "erin", &conv).await,
        2,
        "its join and one message"
    );
    assert_eq!(unread(&server, "dave", &conv).await, 8);

    let mut dave = connected(&server, "dave", "phone").await;
    dave.ack(&conv, 8, AckKind::Read).await.unwrap();
    dave.ping().await.unwrap();
    admin.remove_member(&conv, "dave").await.unwrap(); // 9
    say(&mut alice, &conv, "away-1").await; // 10
    say(&mut alice, &conv, "away-2").await; // 11
    admin.add_members(&conv, &users(&["dave"])).await.unwrap(); // 12
    // Its removal and its return, not the two messages of the time away.
    assert_eq!(unread(&server, "dave", &conv).await, 2);
}

#[tokio::test]
async fn a_user_added_and_removed_while_connected_reads_nothing_from_before_its_join() {
    let (_dir, server) = start(&[]);
    let admin = server.http("alice", "phone");
    let conv = admin.create_group("g", &[]).await.unwrap();
    let mut alice = connected(&server, "alice", "phone").await;
    say(&mut alice, &conv, "old-1").await; // 2
    say(&mut alice, &conv, "old-2").await; // 3
    let mut erin = connected(&server, "erin", "phone").await;
    // Added and removed back to back: by the time erin's connection sees the addition, it may
    // already be over.
    admin.add_members(&conv, &users(&["erin"])).await.unwrap(); // 4
    admin.remove_member(&conv, "erin").await.unwrap(); // 5
    let events = events_through(&mut erin, 5).await;
    assert_eq!(seqs(&events), [4, 5], "only its own period: {events:?}");
    let page = erin.fetch(&conv, 0, Some(100)).await.unwrap();
    assert_eq!(seqs(&page.events), [4, 5]);
    assert_eq!(page.head_seq, 5);
}

#[tokio::test]
async fn a_removed_member_catches_up_to_its_removal_and_no_further() {
    let (_dir, server) = start(&[]);
    let admin = server.http("alice", "phone");
    let conv = admin.create_group("g", &users(&["bob"])).await.unwrap();
    let mut alice = connected(&server, "alice", "phone").await;
    // Bob is offline while alice writes, then removed, then alice writes more.
    let m1 = say(&mut alice, &conv, "m1").await;
    let m2 = say(&mut alice, &conv, "m2").await;
    admin.remove_member(&conv, "bob").await.unwrap();
    let removal = head(&mut alice, &conv).await;
    say(&mut alice, &conv, "after").await;

    let mut bob = server.connect("bob", "phone").await;
    let caught_up = bob.events_until_sync_done().await.unwrap();
    assert_eq!(seqs(&caught_up), [1, m1, m2, removal]);
    assert!(matches!(
        caught_up.last().unwrap().payload,
        EventPayload::MemberRemoved(ref change) if change.users == ["bob"]
    ));
    // He acknowledges it all; the next connection has nothing more to catch up.
    bob.ack(&conv, removal, AckKind::Delivered).await.unwrap();
    let page = bob.fetch(&conv, 0, Some(100)).await.unwrap();
    assert_eq!(page.head_seq, removal, "the head as it was at his removal");
    assert_eq!(seqs(&page.events), [1, m1, m2, removal]);
    let beyond = bob.fetch(&conv, removal, Some(100)).await.unwrap();
    assert!(beyond.events.is_empty());
    bob.close().await;
    let again = server
        .connect("bob", "phone")
        .await
        .events_until_sync_done()
        .await;
    assert!(again.unwrap().is_empty());
    // Acks beyond the removal, sends and typing are refused.
    let mut bob = connected(&server, "bob", "phone").await;
    let sent = bob
        .send_text(Target::Conversation(conv.clone()), "late", "x")
        .await;
    assert!(matches!(sent, Err(ClientError::Server(ref e)) if e.code == ErrorCode::Forbidden));
    // An ack of an event sequenced after his removal is refused as his send is: that event is
    // not his to read (not a malformed seq).
    bob.ack(&conv, removal + 1, AckKind::Read).await.unwrap();
    let answer = bob.next_frame_within(WAIT).await.unwrap();
    assert!(
        matches!(answer, ServerFrame::Error(ref e) if e.code == ErrorCode::Forbidden),
        "{answer:?}"
    );
    // The group is no longer listed as his.
    let listed = server.http("bob", "phone").conversations().await.unwrap();
    assert_eq!(listed["conversations"], serde_json::json!([]));
}

#[tokio::test]
async fn one_membership_event_per_request_names_its_users() {
    let (_dir, server) = start(&[]);
    let admin = server.http("alice", "phone");
    let conv = admin.create_group("g", &[]).await.unwrap();
    let path = format!("/v1/groups/{conv}/members");
    let add = |names: &[&str]| {
        let body = serde_json::json!({ "users": users(names) });
        let (admin, path) = (&admin, &path);
        async move { admin.post(path, &body).await }
    };
    let (status, added) = add(&["bob", "carol", "bob"]).await.unwrap();
    assert_eq!(status, 200);
    assert_eq!(added["added"], serde_json::json!(["bob", "carol"]));
    admin.remove_member(&conv, "carol").await.unwrap();
    let (_, body) = admin
        .get(&format!("/v1/conversations/{conv}/messages"))
        .await
        .unwrap();
    let events = body["events"].as_array().unwrap();
    assert_eq!(events.len(), 3, "{body}");
    assert_eq!(events[1]["kind"], "member_added");
    assert_eq!(events[1]["users"], serde_json::json!(["bob", "carol"]));
    assert!(events[1].get("user").is_none(), "`user` only for one user");
    assert_eq!(events[2]["kind"], "member_removed");
    assert_eq!(events[2]["users"], serde_json::json!(["carol"]));
    assert_eq!(events[2]["user"], "carol");
    // Adding members who already are: no event.
    let (status, again) = add(&["bob"]).await.unwrap();
    assert_eq!((status, &again["added"]), (200, &serde_json::json!([])));
    let mut alice = connected(&server, "alice", "phone").await;
    assert_eq!(head(&mut alice, &conv).await, 3);
}

#[tokio::test]
async fn racing_admins_add_a_user_once_and_the_group_quota_holds() {
    let (_dir, server) = start(&["--max-groups-per-user", "2"]);
    let admin = server.http("alice", "phone");
    let conv = admin.create_group("g", &[]).await.unwrap();
    // Ten concurrent adds of carol, then two concurrent removals.
    let adds: Vec<_> = (0..10)
        .map(|_| {
            let (admin, conv) = (server.http("alice", "phone"), conv.clone());
            tokio::spawn(async move { admin.add_members(&conv, &users(&["carol"])).await })
        })
        .collect();
    for add in adds {
        add.await.unwrap().unwrap();
    }
    let removes: Vec<_> = (0..2)
        .map(|_| {
            let (admin, conv) = (server.http("alice", "phone"), conv.clone());
            tokio::spawn(async move {
                admin
                    .delete(&format!("/v1/groups/{conv}/members/carol"))
                    .await
                    .unwrap()
                    .0
            })
        })
        .collect();
    let mut statuses = Vec::new();
    for remove in removes {
        statuses.push(remove.await.unwrap());
    }
    statuses.sort();
    assert_eq!(statuses, [200, 404], "carol is removed once");
    let mut alice = connected(&server, "alice", "phone").await;
    let page = alice.fetch(&conv, 0, Some(100)).await.unwrap();
    let kinds: Vec<&str> = page
        .events
        .iter()
        .map(|e| match e.payload {
            EventPayload::GroupCreated { .. } => "created",
            EventPayload::MemberAdded(_) => "added",
            EventPayload::MemberRemoved(_) => "removed",
            _ => "other",
        })
        .collect();
    assert_eq!(kinds, ["created", "added", "removed"]);
    // Carol belongs to no group now: two new groups are within her quota of two, a third is not.
    let third = |name: &'static str| {
        let admin = server.http(name, "phone");
        async move {
            admin
                .post(
                    "/v1/groups",
                    &serde_json::json!({"name": name, "members": ["carol"]}),
                )
                .await
                .unwrap()
                .0
        }
    };
    assert_eq!(third("a").await, 201);
    assert_eq!(third("b").await, 201);
    assert_eq!(third("c").await, 403);
}

#[tokio::test]
async fn a_client_id_that_looks_like_a_delete_never_swallows_one() {
    let (_dir, server) = start(&[]);
    let mut alice = connected(&server, "alice", "phone").await;
    let first = alice
        .send_text(Target::User("bob".into()), "m1", "secret")
        .await
        .unwrap();
    let conv = first.conversation_id.clone();
    let lookalike = alice
        .send_text(
            Target::Conversation(conv.clone()),
            "delete:1",
            "not a delete",
        )
        .await
        .unwrap();
    assert!(!lookalike.duplicate);
    let deleted = alice.delete(&conv, 1).await.unwrap();
    assert!(!deleted.duplicate, "the delete is sequenced: {deleted:?}");
    assert_eq!(deleted.seq, lookalike.seq + 1);
    let retried = alice.delete(&conv, 1).await.unwrap();
    assert_eq!((retried.seq, retried.duplicate), (deleted.seq, true));
    let page = alice.fetch(&conv, 0, Some(1)).await.unwrap();
    assert!(matches!(
        page.events[0].payload,
        EventPayload::Message {
            deleted: true,
            body: None,
            ..
        }
    ));
}

/// The group's creation and membership changes an admin makes over HTTP name the admin's
/// device as their sender, but HTTP answers no seq: its connected device gets them as events,
/// live and in gap fills (only a device's own messages come as `sent` instead).
#[tokio::test]
async fn an_admins_connected_device_gets_the_membership_events_it_made_over_http() {
    let (_dir, server) = start(&[]);
    let mut alice = connected(&server, "alice", "phone").await;
    let admin = server.http("alice", "phone");
    let conv = admin.create_group("g", &users(&["bob"])).await.unwrap(); // seq 1
    admin.add_members(&conv, &users(&["carol"])).await.unwrap(); // seq 2
    let mut bob = connected(&server, "bob", "phone").await;
    let sent = bob
        .send_text(Target::Conversation(conv.clone()), "b1", "hello")
        .await
        .unwrap(); // seq 3
    assert_eq!(sent.seq, 3);

    let mut live = Vec::new();
    loop {
        let event = next_event(&mut alice).await;
        live.push(event.seq);
        if event.seq >= sent.seq {
            break;
        }
    }
    // Cumulative ack of what the device was given, then a new connection of the same device.
    alice
        .ack(&conv, sent.seq, AckKind::Delivered)
        .await
        .unwrap();
    alice.ping().await.unwrap();
    alice.close().await;
    let again = server
        .connect("alice", "phone")
        .await
        .events_until_sync_done()
        .await
        .unwrap();
    let caught_up: Vec<u64> = again.iter().map(|e| e.seq).collect();
    assert_eq!(
        live,
        [1, 2, 3],
        "alice's phone, connected throughout, was never sent group_created and member_added \
         (caught up afterwards: {caught_up:?})"
    );
}

/// A user starts direct conversations up to `--max-direct-conversations-per-user`: the next
/// first message to someone new is refused, while it writes on where it has, and others may
/// still start conversations with it.
#[tokio::test]
async fn a_user_starts_direct_conversations_up_to_the_limit() {
    let (_dir, server) = start(&["--max-direct-conversations-per-user", "2"]);
    let mut alice = connected(&server, "alice", "phone").await;
    for (peer, id) in [("bob", "1"), ("carol", "2")] {
        alice
            .send_text(Target::User(peer.into()), id, "hi")
            .await
            .unwrap();
    }
    let refused = alice
        .send_text(Target::User("dave".into()), "3", "hi")
        .await
        .unwrap_err();
    match refused {
        ClientError::Server(e) => {
            assert_eq!(e.code, ErrorCode::Forbidden, "{}", e.message);
            assert!(e.message.contains("direct conversations"), "{}", e.message);
        }
        other => panic!("{other:?}"),
    }
    let again = alice
        .send_text(Target::User("bob".into()), "4", "still here")
        .await
        .unwrap();
    assert_eq!(again.seq, 2);
    let mut dave = connected(&server, "dave", "phone").await;
    dave.send_text(Target::User("alice".into()), "5", "hi alice")
        .await
        .unwrap();
}

/// A member whose connection dropped before its `sent` retries with the same `client_msg_id`
/// after it was removed: it gets the first outcome (`duplicate`), not a refusal of a message
/// everyone received; a new send is refused.
#[tokio::test]
async fn a_retry_after_removal_gets_the_first_outcome() {
    let (_dir, server) = start(&[]);
    let admin = server.http("alice", "phone");
    let conv = admin.create_group("g", &users(&["bob"])).await.unwrap();
    let mut bob = connected(&server, "bob", "phone").await;
    let group = Target::Conversation(conv.clone());
    let first = bob.send_text(group.clone(), "m1", "hello").await.unwrap();
    bob.close().await;
    let (status, _) = admin
        .delete(&format!("/v1/groups/{conv}/members/bob"))
        .await
        .unwrap();
    assert_eq!(status, 200);
    let mut bob = connected(&server, "bob", "phone").await;
    let retried = bob.send_text(group.clone(), "m1", "hello").await.unwrap();
    assert!(retried.duplicate, "{retried:?}");
    assert_eq!(retried.seq, first.seq);
    match bob.send_text(group, "m2", "again").await.unwrap_err() {
        ClientError::Server(e) => assert_eq!(e.code, ErrorCode::Forbidden, "{}", e.message),
        other => panic!("{other:?}"),
    }
}

/// A device that left a group and acknowledged everything through its removal retries a send
/// on a later connection (answered `duplicate`), then is added back: it gets what came with
/// its return, never again what it had before it left (its connection knew nothing of the
/// group until then: it goes from the device's cursor, not from the start).
#[tokio::test]
async fn a_retry_after_removal_does_not_bring_back_what_the_device_had() {
    let (_dir, server) = start(&[]);
    let admin = server.http("alice", "phone");
    let conv = admin.create_group("g", &users(&["bob"])).await.unwrap(); // 1
    let mut alice = connected(&server, "alice", "phone").await;
    let mut bob = connected(&server, "bob", "phone").await;
    let group = Target::Conversation(conv.clone());
    say(&mut alice, &conv, "hello").await; // 2
    let first = bob.send_text(group.clone(), "m1", "hi").await.unwrap(); // 3
    admin.remove_member(&conv, "bob").await.unwrap(); // 4
    assert_eq!(seqs(&events_through(&mut bob, 4).await), [2, 4]);
    bob.ack(&conv, 4, AckKind::Delivered).await.unwrap();
    bob.ping().await.unwrap(); // the ack took effect before the pong
    bob.close().await;

    let mut bob = server.connect("bob", "phone").await;
    let caught_up = bob.events_until_sync_done().await.unwrap();
    assert!(caught_up.is_empty(), "{caught_up:?}");
    let retried = bob.send_text(group, "m1", "hi").await.unwrap();
    assert!(retried.duplicate && retried.seq == first.seq, "{retried:?}");
    admin.add_members(&conv, &users(&["bob"])).await.unwrap(); // 5
    let back = say(&mut alice, &conv, "welcome back").await; // 6
    let events = events_through(&mut bob, back).await;
    assert_eq!(seqs(&events), [5, 6], "nothing it had again: {events:?}");
}

/// The seqs of `events` (a whole conversation, in order) that `user` may read by the rule:
/// from each `member_added` (or `group_created`) naming it through its next `member_removed`.
fn periods_of(events: &[Event], user: &str) -> Vec<u64> {
    let mut member = false;
    let mut visible = Vec::new();
    for event in events {
        let names = |users: &[String]| users.iter().any(|u| u == user);
        let (joins, leaves) = match &event.payload {
            EventPayload::GroupCreated { members, .. } => (names(members), false),
            EventPayload::MemberAdded(change) => (names(&change.users), false),
            EventPayload::MemberRemoved(change) => (false, names(&change.users)),
            _ => (false, false),
        };
        member |= joins;
        if member {
            visible.push(event.seq);
        }
        member &= !leaves;
    }
    visible
}

/// An admin's add and removal of one user race, again and again, with messages between: in
/// whatever order the sequencer takes them, what the user gets live, from `fetch` and from a
/// new device's catch-up is exactly its periods as the group's own events tell them.
#[tokio::test]
async fn a_user_added_and_removed_at_once_reads_exactly_its_periods_on_every_path() {
    let (_dir, server) = start(&[]);
    let admin = server.http("alice", "phone");
    let conv = admin.create_group("g", &users(&["bob"])).await.unwrap();
    let mut alice = connected(&server, "alice", "phone").await;
    let mut carol = connected(&server, "carol", "phone").await;
    let carol_only = users(&["carol"]);
    let removal = format!("/v1/groups/{conv}/members/carol");
    for i in 0..20 {
        let (added, removed) = tokio::join!(
            admin.add_members(&conv, &carol_only),
            admin.delete(&removal)
        );
        added.unwrap();
        assert!(matches!(removed.unwrap().0, 200 | 404));
        say(&mut alice, &conv, &format!("m{i}")).await;
    }
    let all = alice.fetch(&conv, 0, Some(1000)).await.unwrap();
    let expected = periods_of(&all.events, "carol");
    let last = *expected.last().expect("carol was added at least once");

    let live = events_through(&mut carol, last).await;
    assert_eq!(seqs(&live), expected, "live, with its gap fills");
    let fetched = carol.fetch(&conv, 0, Some(1000)).await.unwrap();
    assert_eq!(seqs(&fetched.events), expected, "fetch");
    let caught_up = server
        .connect("carol", "tablet")
        .await
        .events_until_sync_done()
        .await
        .unwrap();
    assert_eq!(seqs(&caught_up), expected, "a new device's catch-up");
}

/// A `sync` naming a cursor inside a member's time away, and pages whose `after_seq` lies
/// there or whose `limit` spans it, skip what was sequenced while it was away.
#[tokio::test]
async fn a_cursor_inside_a_time_away_skips_it_on_sync_and_fetch() {
    let (_dir, server) = start(&[]);
    let admin = server.http("alice", "phone");
    let conv = admin.create_group("g", &users(&["dave"])).await.unwrap();
    let mut alice = connected(&server, "alice", "phone").await;
    say(&mut alice, &conv, "before").await; // 2
    admin.remove_member(&conv, "dave").await.unwrap(); // 3
    say(&mut alice, &conv, "away-1").await; // 4
    say(&mut alice, &conv, "away-2").await; // 5
    admin.add_members(&conv, &users(&["dave"])).await.unwrap(); // 6
    say(&mut alice, &conv, "after").await; // 7

    let mut dave = connected(&server, "dave", "phone").await;
    for (cursor, expected) in [(4, vec![6, 7]), (1, vec![2, 3, 6, 7])] {
        let synced = dave
            .sync([(conv.clone(), cursor)].into_iter().collect())
            .await
            .unwrap();
        assert_eq!(seqs(&synced), expected, "sync from {cursor}");
    }
    for (after, limit, expected) in [
        (0, 2, vec![1, 2]),
        (2, 2, vec![3, 6]),
        (4, 1, vec![6]),
        (5, 1000, vec![6, 7]),
    ] {
        let page = dave.fetch(&conv, after, Some(limit)).await.unwrap();
        assert_eq!(seqs(&page.events), expected, "after {after}, limit {limit}");
        assert_eq!(page.head_seq, 7);
    }
}
