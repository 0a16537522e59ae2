//! Crash test: SIGKILL the server in the middle of a send loop, restart it, and check that
//! every `sent` it gave is readable with the same seq, seqs are dense and nothing is duplicated.

mod support;

use courier_client::proto::{Body, ErrorCode, EventPayload};
use courier_client::{ClientError, Target};
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use support::Server;

/// Sends from several devices as fast as `sent` comes back, recording every acknowledgement,
/// until the connection dies.
async fn send_until_killed(
    server_url: String,
    token: String,
    device: String,
    acked: Arc<Mutex<Vec<(String, String, u64)>>>,
) {
    let Ok(mut client) =
        courier_client::Client::connect(&server_url, &token, Default::default()).await
    else {
        return;
    };
    for i in 0.. {
        let id = format!("{device}-{i}");
        match client
            .send(Target::User("bob".into()), &id, Body::Text(format!("n{i}")))
            .await
        {
            Ok(sent) => acked
                .lock()
                .unwrap()
                .push((id, sent.conversation_id, sent.seq)),
            Err(ClientError::Server(e)) if e.code == ErrorCode::Unavailable => continue,
            Err(_) => return,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_mid_send_loses_no_acknowledged_message() {
    let dir = tempfile::tempdir().unwrap();
    let unlimited = [
        "--user-sends-per-sec",
        "0",
        "--connection-frames-per-sec",
        "0",
    ];
    let mut server = Server::start_in(dir.path(), &unlimited);
    let acked = Arc::new(Mutex::new(Vec::new()));
    let mut senders = Vec::new();
    for device in ["d1", "d2", "d3", "d4"] {
        senders.push(tokio::spawn(send_until_killed(
            server.ws_url(),
            server.token("alice", device),
            device.to_owned(),
            acked.clone(),
        )));
    }
    // Kill once a good number of sends were acknowledged, while the loop is still sending.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while acked.lock().unwrap().len() < 300 {
        assert!(
            std::time::Instant::now() < deadline,
            "senders made no progress"
        );
        tokio::task::yield_now().await;
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    server.kill9();
    for sender in senders {
        sender.await.unwrap();
    }
    let acked = acked.lock().unwrap().clone();

    let mut server = Server::start_in(dir.path(), &unlimited);
    let mut bob = server.connect("bob", "phone").await;
    let conv = acked[0].1.clone();
    let mut stored = Vec::new();
    loop {
        let page = bob
            .fetch(&conv, stored.len() as u64, Some(1000))
            .await
            .unwrap();
        if page.events.is_empty() {
            assert_eq!(
                page.head_seq,
                stored.len() as u64,
                "head matches the events"
            );
            break;
        }
        stored.extend(page.events);
    }
    let seqs: Vec<u64> = stored.iter().map(|e| e.seq).collect();
    let dense: Vec<u64> = (1..=stored.len() as u64).collect();
    assert_eq!(seqs, dense, "seqs are dense from 1");
    let mut by_id = HashMap::new();
    for event in &stored {
        let EventPayload::Message { client_msg_id, .. } = &event.payload else {
            panic!("message")
        };
        let key = (event.sender.device.clone(), client_msg_id.clone());
        assert!(
            by_id.insert(key, event.seq).is_none(),
            "no duplicate of {client_msg_id}"
        );
    }
    for (id, _, seq) in &acked {
        let device = id.split('-').next().unwrap().to_owned();
        assert_eq!(
            by_id.get(&(device, id.clone())),
            Some(seq),
            "acknowledged {id} kept its seq"
        );
    }
    let unique: HashSet<_> = acked.iter().map(|(id, _, _)| id).collect();
    assert_eq!(unique.len(), acked.len());
    println!(
        "{} acknowledged before SIGKILL, {} stored",
        acked.len(),
        stored.len()
    );

    // A retry of an acknowledged send after the restart is recognised as a duplicate.
    let (id, _, seq) = acked.last().unwrap().clone();
    let device = id.split('-').next().unwrap().to_owned();
    let mut again = server.connect("alice", &device).await;
    let retry = again
        .send(Target::User("bob".into()), &id, Body::Text("again".into()))
        .await
        .unwrap();
    assert!(retry.duplicate);
    assert_eq!(retry.seq, seq);
    server.terminate();
}
