//! The operator's rebalancer (planner and executor, without the Kubernetes API) against a real
//! multi-process Courier cluster on 127.0.0.x: a store node, two sequencer nodes and a node
//! with the client roles. A skewed send load makes two shards hot on the first sequencer; the
//! rebalancer reads the loads from the admin API, moves a hot shard to the second sequencer
//! while the clients keep sending, and every message is stored once, in order, with dense
//! seqs, and read so by its recipient.
//!
//! Needs the `courier` binary: `COURIER_TEST_BIN`, or `courier` next to the test executable's
//! directory in the cargo target directory (`cargo test --workspace` builds it; or run
//! `cargo build -p courier` first).

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use courier_client::proto::{Body, Encoding, EventPayload};
use courier_client::{Client, Target};
use courier_operator::rebalance::executor::{AdminApi, ShardAdmin, step};
use courier_operator::rebalance::{MoveReason, PlannerPolicy, Rebalancer};
use courier_rpc::ClusterToken;

const TOKEN: &str = "courier-operator-test-cluster-token-0123456789";
const JWT_SECRET: &str = "courier-operator-test-jwt-secret";
/// Longest wait for anything the test expects.
const WAIT: Duration = Duration::from_secs(60);

/// The `courier` binary under test.
fn courier_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("COURIER_TEST_BIN") {
        return PathBuf::from(path);
    }
    // target/<profile>/deps/<this test> -> target/<profile>/courier
    let exe = std::env::current_exe().expect("the test executable's path");
    let candidate = exe
        .parent()
        .and_then(Path::parent)
        .map(|dir| dir.join("courier"))
        .expect("the test executable is in a cargo target directory");
    assert!(
        candidate.exists(),
        "the `courier` binary is missing at {}: build it with `cargo build -p courier` \
         (or run `cargo test --workspace`), or point COURIER_TEST_BIN at one",
        candidate.display()
    );
    candidate
}

/// A `courier` process, killed when dropped.
struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs `courier <args>` and waits for the log line containing `ready`; returns the process
/// and the first word after `ready`.
fn spawn(args: &[String], ready: &'static str) -> (Process, String) {
    let mut child = Command::new(courier_binary())
        .args(args)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn courier");
    let stderr = child.stderr.take().expect("stderr");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(rest) = line.split(ready).nth(1) {
                let word = rest
                    .split(|c: char| c.is_whitespace() || c == '"')
                    .next()
                    .unwrap_or_default();
                let _ = tx.send(word.to_owned());
            }
            if std::env::var_os("COURIER_TEST_LOG").is_some() {
                eprintln!("[{ready}] {line}");
            }
        }
    });
    let process = Process(child);
    let word = rx
        .recv_timeout(WAIT)
        .unwrap_or_else(|_| panic!("courier {args:?} did not log {ready:?}"));
    (process, word)
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}

/// The cluster: store node, sequencers s1 (started first: it takes every shard) and s2, and
/// a front node with the client roles.
struct TestCluster {
    _dir: tempfile::TempDir,
    _processes: Vec<Process>,
    /// The front node's client address.
    front: String,
    /// Admin addresses of s1 and s2.
    sequencers: Vec<String>,
}

impl TestCluster {
    fn start() -> TestCluster {
        let dir = tempfile::tempdir().unwrap();
        let token_file = dir.path().join("cluster-token");
        std::fs::write(&token_file, TOKEN).unwrap();
        let token_file = token_file.display().to_string();
        let data = |name: &str| dir.path().join(name).display().to_string();
        let mut processes = Vec::new();
        let (store, store_address) = spawn(
            &strings(&[
                "store-node",
                "--listen",
                "127.0.0.1:0",
                "--data-dir",
                &data("store"),
                "--cluster-token-file",
                &token_file,
            ]),
            "store node ready on ",
        );
        processes.push(store);
        let store_url = format!("http://{store_address}");
        // Leases of the default length: nothing here waits for one to lapse, and a lease of
        // 1 s lapsed on a loaded machine (renewals every third of it, each a store commit
        // queued behind the senders' appends): the front node's lapsed and its clients were
        // told to reconnect mid-send, or a shard's, so the sample taken right after the move
        // listed it as owned by no node.
        let common = [
            "--store",
            "remote",
            "--store-address",
            &store_url,
            "--cluster-token-file",
            &token_file,
            "--shards",
            "8",
            "--shard-lease",
            "10s",
            "--min-free-disk",
            "0",
            "--media-min-free-disk",
            "0",
        ];
        let mut sequencers = Vec::new();
        for (id, host) in [("s1", "127.0.0.2"), ("s2", "127.0.0.3")] {
            let mut args = strings(&[
                "node",
                "--roles",
                "sequencer",
                "--node-id",
                id,
                "--internal-listen",
                &format!("{host}:0"),
                "--listen",
                &format!("{host}:0"),
                "--data-dir",
                &data(id),
            ]);
            args.extend(strings(&common));
            let (process, address) = spawn(&args, "node ready on internal ");
            processes.push(process);
            sequencers.push(address);
        }
        let mut args = strings(&[
            "node",
            "--roles",
            "gateway,chat,fanout,push,media",
            "--node-id",
            "front",
            "--internal-listen",
            "127.0.0.1:0",
            "--listen",
            "127.0.0.1:0",
            "--jwt-secret",
            JWT_SECRET,
            "--data-dir",
            &data("front"),
        ]);
        args.extend(strings(&common));
        let (process, front) = spawn(&args, "courier ready on ");
        processes.push(process);
        TestCluster {
            _dir: dir,
            _processes: processes,
            front,
            sequencers,
        }
    }

    fn admin(&self) -> AdminApi {
        AdminApi::new(
            ClusterToken::new(TOKEN).unwrap(),
            self.sequencers.clone(),
            Duration::from_secs(10),
        )
    }

    /// A connection of `user`'s phone that has had its catch-up (the events of which are
    /// returned).
    async fn connect_with_catch_up(
        &self,
        user: &str,
    ) -> (Client, Vec<courier_client::proto::Event>) {
        let output = Command::new(courier_binary())
            .args(["token", "--user", user, "--device", "phone", "--jwt-secret"])
            .arg(JWT_SECRET)
            .output()
            .expect("run courier token");
        assert!(output.status.success(), "courier token failed");
        let token = String::from_utf8(output.stdout).unwrap();
        let mut client = Client::connect(
            &format!("ws://{}", self.front),
            token.trim(),
            Encoding::Json,
        )
        .await
        .expect("connect to the front node");
        let catch_up = client.events_until_sync_done().await.unwrap();
        (client, catch_up)
    }

    async fn connect(&self, user: &str) -> Client {
        self.connect_with_catch_up(user).await.0
    }
}

/// One sender's conversation: what it sent, in order, with the seqs it was given.
struct Sent {
    peer: String,
    messages: Vec<(String, u64)>,
}

/// Sends to `peer` as fast as the cluster answers until `stop`, retrying `unavailable` with
/// the same id (as clients do across a hand-off).
async fn send_until(
    mut client: Client,
    sender: String,
    peer: String,
    stop: Arc<AtomicBool>,
    taken: Arc<AtomicUsize>,
) -> Sent {
    let mut messages = Vec::new();
    let mut n = 0;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        let id = format!("{sender}-{n}");
        let sent = client
            .send_with_retry(Target::User(peer.clone()), &id, Body::Text(id.clone()))
            .await
            .unwrap_or_else(|e| panic!("{id} to {peer} was not taken: {e}"));
        messages.push((id, sent.seq));
        taken.fetch_add(1, Ordering::Relaxed);
    }
    Sent { peer, messages }
}

/// The shards that take the senders' appends (a load above zero: nothing else appends), by
/// owner. No rate is asked for: on a loaded machine the senders' pace is anyone's guess.
async fn hot_shards(admin: &AdminApi) -> Vec<(u32, String)> {
    let sample = admin.sample().await.expect("sample the shard loads");
    sample
        .shards
        .iter()
        .filter(|(_, s)| s.load > 0.0)
        .map(|(shard, s)| (*shard, s.owner.clone()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_rebalancer_moves_a_hot_shard_of_a_real_cluster_while_clients_keep_sending() {
    let cluster = TestCluster::start();
    let admin = cluster.admin();
    let initial = admin.sample().await.unwrap();
    assert_eq!(initial.nodes.len(), 2, "two live sequencer nodes");
    assert!(
        initial.unowned.is_empty() && !initial.shards.is_empty(),
        "the store's shard map: every shard held by a live node: {initial:?}"
    );
    assert!(
        initial.shards.values().all(|s| s.owner == "s1"),
        "s1 started first and owns every shard"
    );

    // Six senders, each to its own peer, as fast as the cluster answers: their
    // conversations fall on several shards (names fix the shards, so this is the same on
    // every run), all owned by s1.
    let stop = Arc::new(AtomicBool::new(false));
    let taken = Arc::new(AtomicUsize::new(0));
    let mut senders = Vec::new();
    for i in 0..6 {
        let sender = format!("sender{i}");
        let client = cluster.connect(&sender).await;
        senders.push(tokio::spawn(send_until(
            client,
            sender,
            format!("peer{i}"),
            stop.clone(),
            taken.clone(),
        )));
    }
    let deadline = Instant::now() + WAIT;
    let hot = loop {
        let hot = hot_shards(&admin).await;
        if hot.len() >= 2 {
            break hot;
        }
        assert!(Instant::now() < deadline, "no two hot shards: {hot:?}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert!(hot.iter().all(|(_, owner)| owner == "s1"), "{hot:?}");
    let hot: BTreeSet<u32> = hot.iter().map(|(shard, _)| *shard).collect();

    // The rebalancer: it sees s1 carrying both hot shards and s2 empty, and moves one hot
    // shard to s2 through the admin API.
    let mut rebalancer = Rebalancer::new(PlannerPolicy::default());
    let deadline = Instant::now() + WAIT;
    let first = loop {
        assert!(Instant::now() < deadline, "the rebalancer moved nothing");
        let step = step(&mut rebalancer, &admin, None, true, now_ms)
            .await
            .expect("a rebalancing step");
        if let Some((planned, outcome)) = step.done.into_iter().next() {
            let epoch = outcome.expect("the move succeeds");
            assert!(epoch >= 2, "the shard's epoch was bumped");
            break planned;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    assert!(
        hot.contains(&first.shard),
        "the first move is a hot shard: moved {first:?}, hot {hot:?}"
    );
    assert_eq!((first.from.as_str(), first.to.as_str()), ("s1", "s2"));
    assert_eq!(first.reason, MoveReason::Fill);
    let after = admin.sample().await.unwrap();
    assert_eq!(
        after.shards.get(&first.shard).map(|s| s.owner.as_str()),
        Some("s2"),
        "s2 serves the moved shard: {after:?}"
    );
    assert!(
        hot.iter()
            .any(|shard| after.shards.get(shard).is_some_and(|s| s.owner == "s1")),
        "only one hot shard moved at first: {after:?}"
    );

    // The senders go on after the move (600 more messages, at whatever pace the machine
    // allows: only a wait of `WAIT` with none taken is a stall); then every conversation is
    // checked.
    let after_move = taken.load(Ordering::Relaxed) + 600;
    let mut last = (taken.load(Ordering::Relaxed), Instant::now());
    while last.0 < after_move {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = taken.load(Ordering::Relaxed);
        if now > last.0 {
            last = (now, Instant::now());
        }
        assert!(last.1.elapsed() < WAIT, "sends stalled after the move");
    }
    stop.store(true, Ordering::Relaxed);
    for sender in senders {
        let sent = sender.await.expect("the sender finished");
        check_conversation(&cluster, &sent).await;
    }
}

/// A sequencer drained through the admin API stays up, so it is still a live sequencer node:
/// it says it drains, and the rebalancer moves nothing to it (the empty node was filled at
/// once, and every move failed: the drained node gave the shard back, after it had been frozen
/// and handed over twice for nothing).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_rebalancer_moves_no_shard_to_a_drained_sequencer() {
    let cluster = TestCluster::start();
    let admin = cluster.admin();
    let before = admin.sample().await.unwrap();
    assert!(
        before.shards.values().all(|s| s.owner == "s1") && before.draining.is_empty(),
        "s1 owns every shard, s2 none, and no node drains: {before:?}"
    );
    assert_eq!(admin.drain(&before, "s2").await.unwrap(), Vec::<u32>::new());
    let mut rebalancer = Rebalancer::new(PlannerPolicy::default());
    let step = step(&mut rebalancer, &admin, None, true, now_ms)
        .await
        .expect("a rebalancing step");
    assert!(
        step.view.pods.iter().all(|pod| pod != "s2"),
        "{:?}",
        step.view
    );
    assert!(
        step.planned.is_empty(),
        "moves to a drained node: {:?}",
        step.done
    );
    let after = admin.sample().await.unwrap();
    assert!(after.draining.contains("s2"), "{after:?}");
    assert!(after.shards.values().all(|s| s.owner == "s1"), "{after:?}");
}

/// Milliseconds since the Unix epoch.
fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// Seqs dense from 1 in send order, and the peer reads exactly those messages, in order.
async fn check_conversation(cluster: &TestCluster, sent: &Sent) {
    assert!(!sent.messages.is_empty(), "{} got messages", sent.peer);
    let seqs: Vec<u64> = sent.messages.iter().map(|(_, seq)| *seq).collect();
    let dense: Vec<u64> = (1..=seqs.len() as u64).collect();
    assert_eq!(seqs, dense, "dense seqs for {}, in send order", sent.peer);
    let (mut reader, catch_up) = cluster.connect_with_catch_up(&sent.peer).await;
    let mut received = Vec::new();
    let mut events = catch_up.into_iter();
    while received.len() < sent.messages.len() {
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
        received, sent.messages,
        "{} reads what was sent, once each, in order",
        sent.peer
    );
}
