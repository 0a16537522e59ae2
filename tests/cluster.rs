//! Courier past one process: a server on a store node (`courier store-node`, `courier serve
//! --store remote`), and a cluster of sequencer nodes behind a node with the client roles
//! (`courier node`). Real processes on 127.0.0.x, real SIGKILL, SIGSTOP and SIGCONT.

mod support;

use courier_client::Target;
use courier_client::proto::EventPayload;
use courier_rpc::ClusterToken;
use courier_rpc::auth::AttachToken;
use courier_rpc::proto::admin_client::AdminClient;
use courier_rpc::proto::{
    DrainRequest, ForgetNodeRequest, ListNodesRequest, ListShardMapRequest, ListShardsRequest,
    MoveShardRequest, ShardState, TakeShardsRequest,
};
use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use support::{Server, WAIT, next_event, users};

const TOKEN: &str = "courier-test-cluster-token-0123456789abcdef";

fn binary() -> PathBuf {
    std::env::var_os("COURIER_TEST_BIN").map_or_else(
        || PathBuf::from(env!("CARGO_BIN_EXE_courier")),
        PathBuf::from,
    )
}

/// A `courier store-node` process on an ephemeral port of 127.0.0.1.
struct StoreNode {
    child: Child,
    address: String,
    data_dir: PathBuf,
    token_file: PathBuf,
}

/// Runs `courier <args>` and waits for its log line `<ready> ...`; returns what follows it.
fn spawn_ready(args: &[String], ready: &'static str) -> (Child, String) {
    spawn_wrapped(&[], args, ready)
}

/// As [`spawn_ready`], with `courier` run by `wrapper` (e.g. `ip netns exec NS`).
fn spawn_wrapped(wrapper: &[&str], args: &[String], ready: &'static str) -> (Child, String) {
    let mut command = match wrapper.split_first() {
        Some((program, rest)) => {
            let mut command = Command::new(program);
            command.args(rest).arg(binary());
            command
        }
        None => Command::new(binary()),
    };
    let mut child = command
        .args(args)
        .env("RUST_LOG", "info")
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn courier");
    let (tx, rx) = mpsc::channel();
    let stderr = child.stderr.take().expect("stderr");
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(rest) = line.split(ready).nth(1) {
                let _ = tx.send(rest.to_owned());
            }
            if std::env::var_os("COURIER_TEST_LOG").is_some() {
                eprintln!("[{ready}] {line}");
            }
        }
    });
    let rest = rx.recv_timeout(WAIT).expect("the process is ready");
    (child, rest)
}

/// The first word of `text` (an address at the start of a ready line's rest, in text or JSON).
fn first_word(text: &str) -> String {
    text.split(|c: char| c.is_whitespace() || c == '"')
        .next()
        .unwrap_or_default()
        .to_owned()
}

impl StoreNode {
    fn start(data_dir: &Path, token_file: &Path, listen: &str) -> StoreNode {
        let args = vec![
            "store-node".into(),
            "--listen".into(),
            listen.into(),
            "--data-dir".into(),
            data_dir.display().to_string(),
            "--cluster-token-file".into(),
            token_file.display().to_string(),
        ];
        let (child, rest) = spawn_ready(&args, "store node ready on ");
        let address = first_word(&rest);
        StoreNode {
            child,
            address,
            data_dir: data_dir.to_owned(),
            token_file: token_file.to_owned(),
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.address)
    }

    fn kill9(&mut self) {
        self.child.kill().expect("kill");
        self.child.wait().expect("wait");
    }

    /// Starts again on the same directory and port.
    fn restart(&mut self) {
        self.kill9();
        *self = StoreNode::start(
            &self.data_dir.clone(),
            &self.token_file.clone(),
            &self.address.clone(),
        );
    }
}

impl Drop for StoreNode {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A temporary directory with the cluster token file, and a store node in it.
fn store_node() -> (tempfile::TempDir, StoreNode) {
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("cluster-token");
    std::fs::write(&token_file, TOKEN).unwrap();
    let node = StoreNode::start(&dir.path().join("store"), &token_file, "127.0.0.1:0");
    (dir, node)
}

/// How the nodes of a test cluster reach their store: one store node, or several as storage
/// partitions ([`PartitionedStores`]).
trait ClusterStore {
    /// The node's flags that name it.
    fn args(&self) -> Vec<String>;
}

impl ClusterStore for StoreNode {
    fn args(&self) -> Vec<String> {
        vec![
            "--store".into(),
            "remote".into(),
            "--store-address".into(),
            self.url(),
            "--cluster-token-file".into(),
            self.token_file.display().to_string(),
        ]
    }
}

#[tokio::test]
async fn a_server_on_a_store_node_keeps_every_sent_message_across_a_sigkill_of_either() {
    let (_dir, mut store) = store_node();
    let server_dir = tempfile::tempdir().unwrap();
    let args = store.args();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut server = Server::start_in(server_dir.path(), &args);
    assert!(
        !server_dir.path().join("store").exists(),
        "the server keeps no store of its own"
    );

    let mut alice = server.connect("alice", "phone").await;
    alice.events_until_sync_done().await.unwrap();
    for i in 1..=10 {
        let sent = alice
            .send_text(Target::User("bob".into()), &format!("m{i}"), "hi")
            .await
            .unwrap();
        assert_eq!(sent.seq, i);
    }
    drop(alice);

    // The server dies: what it acknowledged is in the store node.
    server.kill9();
    let mut server = Server::start_in(server_dir.path(), &args);
    // The store node dies and comes back on the same port and directory.
    store.restart();
    let mut alice = server.connect("alice", "phone").await;
    alice.events_until_sync_done().await.unwrap();
    let sent = alice
        .send_text(Target::User("bob".into()), "m11", "hi")
        .await
        .expect("sends work again once the store node is back");
    assert_eq!(sent.seq, 11, "nothing acknowledged was lost");

    let mut bob = server.connect("bob", "phone").await;
    let mut ids = Vec::new();
    while ids.len() < 11 {
        let event = next_event(&mut bob).await;
        if let EventPayload::Message { client_msg_id, .. } = event.payload {
            ids.push(client_msg_id);
        }
    }
    let expected: Vec<String> = (1..=11).map(|i| format!("m{i}")).collect();
    assert_eq!(ids, expected);
    server.kill9();

    // Stopped with SIGTERM, the store node notes which conversations its cache of recent
    // events holds, for its next start.
    let stopped = support::terminate(&mut store.child);
    assert!(stopped.success(), "{stopped}");
    assert!(store.data_dir.join("recent-events").exists());
}

/// Runs `command`, which must refuse to start: its stderr, once it has exited unsuccessfully
/// (within [`WAIT`]; killed and failed past it).
async fn refused_to_start(mut command: Command) -> String {
    let mut process = command
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn courier");
    let deadline = std::time::Instant::now() + WAIT;
    while process.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            let _ = process.kill();
            panic!("{command:?} started");
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let output = process.wait_with_output().unwrap();
    assert!(!output.status.success(), "{command:?} exited 0");
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// A second `courier serve` on a store another one serves does not start, whatever its
/// `--node-id`, and says why; the first goes on serving every send. The two took every shard
/// from each other in turn: about half the sends were refused, and each delivered only to its
/// own connections. After a SIGTERM the server's record ends: the next one need not wait for it to lapse.
#[tokio::test]
async fn a_second_server_on_a_served_store_does_not_start() {
    let (_dir, store) = store_node();
    let args = store.args();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let first_dir = tempfile::tempdir().unwrap();
    let mut first = Server::start_in(first_dir.path(), &args);
    for node_id in ["local", "other"] {
        let twin_dir = tempfile::tempdir().unwrap();
        let mut twin = Command::new(binary());
        twin.args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--node-id",
            node_id,
            "--data-dir",
        ])
        .arg(twin_dir.path())
        .args(&args);
        let stderr = refused_to_start(twin).await;
        assert!(
            stderr.contains("another process serves this store"),
            "the error names the cause: {stderr}"
        );
    }
    let mut alice = first.connect("alice", "phone").await;
    alice.events_until_sync_done().await.unwrap();
    for i in 1..=20 {
        let sent = alice
            .send_text(Target::User("bob".into()), &format!("m{i}"), "hi")
            .await
            .expect("the first server still takes every send");
        assert_eq!(sent.seq, i);
    }
    drop(alice);
    assert!(first.terminate().success());
    // With a lease of an hour, a record left live would hold the next server back past the
    // harness's wait for its ready line.
    let long_lease: Vec<&str> = args
        .iter()
        .copied()
        .chain(["--shard-lease", "1h"])
        .collect();
    let mut second = Server::start_in(first_dir.path(), &long_lease);
    assert!(second.terminate().success());
    let _third = Server::start_in(first_dir.path(), &long_lease);
}

#[tokio::test]
async fn a_server_with_the_wrong_cluster_token_does_not_start() {
    let (dir, store) = store_node();
    let wrong = dir.path().join("wrong-token");
    std::fs::write(&wrong, "another-cluster-token-0123456789abcdefgh").unwrap();
    let server_dir = tempfile::tempdir().unwrap();
    let output = Command::new(binary())
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(server_dir.path())
        .args(["--store", "remote", "--store-address", &store.url()])
        .arg("--cluster-token-file")
        .arg(&wrong)
        .output()
        .expect("run courier serve");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("cluster token"),
        "the error names the cause: {stderr}"
    );
}

/// A node without a client port (`courier node --roles sequencer`, or `fanout`) on its own
/// loopback address.
struct InternalNode {
    child: Child,
    /// Its internal gRPC address (sequencer and admin API).
    address: String,
    /// Its probes and metrics (HTTP).
    probes: String,
}

impl InternalNode {
    fn start(id: &str, host: &str, store: &impl ClusterStore, dir: &Path) -> InternalNode {
        InternalNode::start_in(&[], "sequencer", id, host, store, dir)
    }

    /// Starts it with `roles`, prefixed by `wrapper` (e.g. `ip netns exec NS`).
    fn start_in(
        wrapper: &[&str],
        roles: &str,
        id: &str,
        host: &str,
        store: &impl ClusterStore,
        dir: &Path,
    ) -> InternalNode {
        InternalNode::start_with(wrapper, roles, id, host, store, dir, &[])
    }

    /// As [`InternalNode::start_in`], with `extra` arguments (a `--shard-lease` among them
    /// replaces the test's).
    fn start_with(
        wrapper: &[&str],
        roles: &str,
        id: &str,
        host: &str,
        store: &impl ClusterStore,
        dir: &Path,
        extra: &[&str],
    ) -> InternalNode {
        let args = node_args(roles, id, host, store, dir, extra);
        let (child, rest) = spawn_wrapped(wrapper, &args, "node ready on internal ");
        let probes = first_word(rest.split("probes ").nth(1).expect("the probes address"));
        InternalNode {
            child,
            address: first_word(&rest),
            probes,
        }
    }

    fn signal(&self, signal: i32) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, signal) };
    }

    fn kill9(&mut self) {
        self.child.kill().expect("kill");
        self.child.wait().expect("wait");
    }
}

impl Drop for InternalNode {
    fn drop(&mut self) {
        self.signal(libc::SIGCONT);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The arguments of `courier node` with `roles` as node `id` on `host` (see
/// [`InternalNode::start_with`]).
fn node_args(
    roles: &str,
    id: &str,
    host: &str,
    store: &impl ClusterStore,
    dir: &Path,
    extra: &[&str],
) -> Vec<String> {
    let mut args: Vec<String> = [
        "node",
        "--roles",
        roles,
        "--node-id",
        id,
        "--internal-listen",
        &format!("{host}:0"),
        "--listen",
        &format!("{host}:0"),
        "--shards",
        SHARDS,
        "--data-dir",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.push(dir.join(id).display().to_string());
    args.extend(store.args());
    if !extra.contains(&"--shard-lease") {
        args.extend(["--shard-lease".to_owned(), LEASE.to_owned()]);
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

/// Short leases, so that failovers happen within a test.
const LEASE: &str = "1s";
const SHARDS: &str = "8";
const JWT_SECRET: &str = "cluster-test-jwt-secret-of-32-bytes-or-more";

/// Sends `id` to `to` until the cluster takes it (retrying `unavailable` with the same id, as
/// clients do), and returns its seq. With `server`, a connection the server closes with
/// `reconnect` (1001: it drains, or saw its own lease lapse under load) is opened again there
/// and the send retried with the same id, as clients do.
async fn send_until_sent(
    client: &mut courier_client::Client,
    to: &str,
    id: &str,
    server: Option<&Server>,
) -> u64 {
    send_until_taken(client, Target::User(to.into()), id, server).await
}

/// As [`send_until_sent`], to any `target` (a group).
async fn send_until_taken(
    client: &mut courier_client::Client,
    target: Target,
    id: &str,
    server: Option<&Server>,
) -> u64 {
    send_text_until_taken(client, target, id, id, server)
        .await
        .seq
}

/// As [`send_until_taken`], with `text` for the message's text; returns its `sent`.
async fn send_text_until_taken(
    client: &mut courier_client::Client,
    target: Target,
    id: &str,
    text: &str,
    server: Option<&Server>,
) -> courier_client::proto::Sent {
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        assert!(
            std::time::Instant::now() < deadline,
            "{id} was not taken before the deadline"
        );
        match client.send_text(target.clone(), id, text).await {
            Ok(sent) => return sent,
            Err(courier_client::ClientError::Server(error))
                if error.code == courier_client::proto::ErrorCode::Unavailable =>
            {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
            Err(courier_client::ClientError::Closed(Some((1001, _)))) if server.is_some() => {
                let hello = client.hello().clone();
                if let Some(server) = server {
                    *client = server.connect(&hello.user, &hello.device).await;
                }
            }
            Err(e) => panic!("sending {id} failed: {e}"),
        }
    }
}

/// The history checker: for each peer, the seqs of the messages `sent` to it (each sent once,
/// in order, and answered `sent`) are dense from 1, and the peer reads exactly those, in
/// order, each once.
async fn check_history(front: &Server, peers: &[String], sent: &[Vec<(String, u64)>]) {
    for (peer, sent) in peers.iter().zip(sent) {
        let seqs: Vec<u64> = sent.iter().map(|(_, seq)| *seq).collect();
        let dense: Vec<u64> = (1..=sent.len() as u64).collect();
        assert_eq!(seqs, dense, "dense seqs for {peer}, in send order");
        let mut reader = front.connect(peer, "phone").await;
        let mut received = Vec::new();
        while received.len() < sent.len() {
            let event = next_event(&mut reader).await;
            if let EventPayload::Message { client_msg_id, .. } = event.payload {
                received.push((client_msg_id, event.seq));
            }
        }
        assert_eq!(
            &received, sent,
            "{peer} reads exactly what was sent, once each"
        );
    }
}

/// One message to each peer, each sent until taken through `front`; records `(id, seq)` per
/// peer.
async fn send_round(
    front: &Server,
    alice: &mut courier_client::Client,
    peers: &[String],
    round: u32,
    sent: &mut [Vec<(String, u64)>],
) {
    for (peer, sent) in peers.iter().zip(sent) {
        let id = format!("r{round}-{peer}");
        let seq = send_until_sent(alice, peer, &id, Some(front)).await;
        sent.push((id, seq));
    }
}

/// A front node (every client role) on `store`.
fn front_node(store: &impl ClusterStore, dir: &Path) -> Server {
    gateway_node(store, dir, "front", "gateway,chat,fanout,push,media", &[])
}

/// A node with the client port, `id`, running `roles`, on `store`, with `extra` arguments.
fn gateway_node(
    store: &impl ClusterStore,
    dir: &Path,
    id: &str,
    roles: &str,
    extra: &[&str],
) -> Server {
    std::fs::write(dir.join("jwt-secret"), JWT_SECRET).unwrap();
    let mut args: Vec<String> = [
        "--node-id",
        id,
        "--shards",
        SHARDS,
        "--jwt-secret",
        JWT_SECRET,
        "--internal-listen",
        "127.0.0.1:0",
    ]
    .iter()
    .chain(extra)
    .map(|s| s.to_string())
    .collect();
    // A `--shard-lease` in `extra` replaces the test's.
    if !extra.contains(&"--shard-lease") {
        args.extend(["--shard-lease".to_owned(), LEASE.to_owned()]);
    }
    args.extend(store.args());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Server::start_as(&["node", "--roles", roles], dir, &args)
}

/// Two nodes with the client port sharing one media directory under `dir` (a cluster's nodes
/// must share media bytes): `ga` running `ga_roles`, `gb` running `gateway,chat,media`. Their
/// data directories come first, so that they outlive the nodes.
fn two_gateway_nodes(
    store: &StoreNode,
    dir: &Path,
    ga_roles: &str,
) -> ([tempfile::TempDir; 2], Server, Server) {
    let media = dir.join("shared-media").display().to_string();
    let shared = ["--media-dir", media.as_str()];
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let ga = gateway_node(store, dirs[0].path(), "ga", ga_roles, &shared);
    let gb = gateway_node(store, dirs[1].path(), "gb", "gateway,chat,media", &shared);
    (dirs, ga, gb)
}

type Admin = AdminClient<
    tonic::service::interceptor::InterceptedService<tonic::transport::Channel, AttachToken>,
>;

/// The admin API of a node without a client port, as the operator calls it (from another
/// crate).
async fn admin(node: &InternalNode) -> Admin {
    admin_at(&node.address).await
}

/// The admin API on the internal port `address` (`host:port`).
async fn admin_at(address: &str) -> Admin {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{address}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    AdminClient::with_interceptor(channel, AttachToken::new(ClusterToken::new(TOKEN).unwrap()))
}

/// The registered nodes, as `node`'s admin API lists them: `(id, address, live)`.
async fn registry(node: &InternalNode) -> Vec<(String, String, bool)> {
    let nodes = admin(node)
        .await
        .list_nodes(ListNodesRequest {})
        .await
        .unwrap()
        .into_inner()
        .nodes;
    nodes
        .into_iter()
        .map(|n| (n.id, n.address, n.live))
        .collect()
}

/// The internal address of node `id`, from the registry.
async fn internal_address(node: &InternalNode, id: &str) -> String {
    registry(node)
        .await
        .into_iter()
        .find(|(node, _, _)| node == id)
        .map(|(_, address, _)| address)
        .unwrap_or_else(|| panic!("{id} is registered"))
}

/// The shard map as the admin API at `address` reads it from the store.
async fn shard_map(address: &str, outbox_count_limit: u32) -> Vec<ShardState> {
    admin_at(address)
        .await
        .list_shard_map(ListShardMapRequest { outbox_count_limit })
        .await
        .unwrap()
        .into_inner()
        .shards
}

/// Outbox entries waiting in all of `map`.
fn waiting(map: &[ShardState]) -> u64 {
    map.iter().filter_map(|s| s.outbox).map(|o| o.entries).sum()
}

async fn owned(node: &InternalNode) -> Vec<u32> {
    let shards = admin(node)
        .await
        .list_shards(ListShardsRequest {})
        .await
        .unwrap()
        .into_inner()
        .shards;
    shards.into_iter().map(|s| s.shard).collect()
}

/// With `--metrics-listen`, a node without the client port serves `/metrics` on that port
/// alone, and its HTTP port (`--listen`, a media node's client endpoints) keeps the probes and
/// answers `/metrics` 404. (A fixed port on a loopback address no other test uses: the node
/// logs its metrics port on a line of its own, not its ready line.)
#[tokio::test]
async fn a_nodes_metrics_port_serves_its_metrics_and_its_http_port_does_not() {
    let (dir, store) = store_node();
    let metrics_port = "127.0.0.42:9090";
    let node = InternalNode::start_with(
        &[],
        "sequencer",
        "s1",
        "127.0.0.2",
        &store,
        dir.path(),
        &["--metrics-listen", metrics_port],
    );
    let metrics = reqwest::get(format!("http://{metrics_port}/metrics"))
        .await
        .unwrap();
    assert_eq!(metrics.status(), 200);
    let metrics = metrics.text().await.unwrap();
    assert!(
        metrics.contains("courier_sequencer_owned_shards"),
        "a sequencer node's metrics on its metrics port: {metrics}"
    );
    let probe = |path: &str| format!("http://{}{path}", node.probes);
    let refused = reqwest::get(probe("/metrics")).await.unwrap();
    assert_eq!(refused.status(), 404, "/metrics on the HTTP port");
    let body: serde_json::Value = refused.json().await.unwrap();
    assert_eq!(body["code"], "not_found", "the protocol's body: {body}");
    for path in ["/healthz", "/readyz"] {
        let status = reqwest::get(probe(path)).await.unwrap().status();
        assert_eq!(status, 200, "{path}");
    }
}

#[tokio::test]
async fn the_admin_api_lists_nodes_moves_every_shard_and_drains_a_node_while_clients_send() {
    let (dir, store) = store_node();
    let first = InternalNode::start("s1", "127.0.0.2", &store, dir.path());
    let second = InternalNode::start("s2", "127.0.0.3", &store, dir.path());
    let front_dir = tempfile::tempdir().unwrap();
    let front = front_node(&store, front_dir.path());

    let nodes = admin(&second)
        .await
        .list_nodes(ListNodesRequest {})
        .await
        .unwrap()
        .into_inner()
        .nodes;
    let mut live: Vec<(String, Vec<String>)> = nodes
        .into_iter()
        .filter(|n| n.live)
        .map(|n| (n.id, n.roles))
        .collect();
    live.sort();
    assert_eq!(
        live,
        [
            (
                "front".to_string(),
                users(&["gateway", "chat", "fanout", "push", "media"])
            ),
            ("s1".to_string(), users(&["sequencer"])),
            ("s2".to_string(), users(&["sequencer"])),
        ]
    );
    assert_eq!(owned(&first).await, (0..8).collect::<Vec<u32>>());
    assert!(owned(&second).await.is_empty());
    let probe = |node: &InternalNode, path: &str| format!("http://{}{path}", node.probes);
    let metrics = reqwest::get(probe(&first, "/metrics")).await.unwrap();
    let metrics = metrics.text().await.unwrap();
    assert!(
        metrics.contains("courier_sequencer_owned_shards 8"),
        "a sequencer node's metrics show its shards: {metrics}"
    );
    for path in ["/healthz", "/readyz"] {
        let status = reqwest::get(probe(&second, path)).await.unwrap().status();
        assert_eq!(status, 200, "{path}");
    }

    let peers: Vec<String> = (0..4).map(|i| format!("bob{i}")).collect();
    let mut alice = front.connect("alice", "phone").await;
    alice.events_until_sync_done().await.unwrap();
    let mut sent: Vec<Vec<(String, u64)>> = vec![Vec::new(); peers.len()];
    send_round(&front, &mut alice, &peers, 1, &mut sent).await;

    // A move to a node that is not a live sequencer is refused, and the shard stays served.
    for (to, code) in [
        ("ghost", tonic::Code::NotFound),
        ("front", tonic::Code::FailedPrecondition),
    ] {
        let refused = admin(&first)
            .await
            .move_shard(MoveShardRequest {
                shard: 0,
                to: to.into(),
            })
            .await;
        assert_eq!(refused.unwrap_err().code(), code, "a move to {to}");
    }
    // A shard beyond the store's is a bad argument, not a shard that moved.
    let refused = admin(&first)
        .await
        .move_shard(MoveShardRequest {
            shard: 8,
            to: "s2".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");
    assert!(
        refused.message().contains("the store has 8 shards"),
        "{refused:?}"
    );
    assert_eq!(owned(&first).await, (0..8).collect::<Vec<u32>>());
    send_round(&front, &mut alice, &peers, 10, &mut sent).await;

    // Every shard moves from s1 to s2; each move returns once s2 serves the shard.
    for shard in 0..8 {
        let moved = admin(&first)
            .await
            .move_shard(MoveShardRequest {
                shard,
                to: "s2".into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert!(moved.epoch >= 2);
    }
    assert!(owned(&first).await.is_empty());
    assert_eq!(owned(&second).await, (0..8).collect::<Vec<u32>>());
    send_round(&front, &mut alice, &peers, 2, &mut sent).await;

    // s2 drains: its shards are released, and s1 takes them when told to.
    let released = admin(&second)
        .await
        .drain(DrainRequest::default())
        .await
        .unwrap()
        .into_inner()
        .released;
    assert_eq!(released, (0..8).collect::<Vec<u32>>());
    let taken = admin(&first)
        .await
        .take_shards(TakeShardsRequest {})
        .await
        .unwrap()
        .into_inner()
        .owned;
    assert_eq!(taken, (0..8).collect::<Vec<u32>>());
    send_round(&front, &mut alice, &peers, 3, &mut sent).await;

    // s2, drained, is still up and registered as a live sequencer: a move to it is refused
    // and the shard stays served by s1 (it was left to s2, unserved until its lease lapsed).
    let refused = admin(&first)
        .await
        .move_shard(MoveShardRequest {
            shard: 0,
            to: "s2".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(
        refused.code(),
        tonic::Code::FailedPrecondition,
        "{refused:?}"
    );
    assert!(refused.message().contains("drained"), "{refused:?}");
    assert_eq!(owned(&first).await, (0..8).collect::<Vec<u32>>());
    assert!(owned(&second).await.is_empty());
    send_round(&front, &mut alice, &peers, 4, &mut sent).await;

    check_history(&front, &peers, &sent).await;
    // Without the cluster token, the admin API answers nothing.
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", first.address))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let refused = AdminClient::new(channel)
        .drain(DrainRequest::default())
        .await;
    assert_eq!(refused.unwrap_err().code(), tonic::Code::Unauthenticated);
    assert_eq!(owned(&first).await.len(), 8, "nothing was drained");
}

/// Two processes never run as one node: a second process started under a live node's id
/// waits that node's lease out, sees it renewed, and does not start. A node killed and started
/// again under its id waits its old lease out, and starts.
#[tokio::test]
async fn a_node_id_runs_in_one_process_at_a_time() {
    let (dir, store) = store_node();
    let mut first = InternalNode::start("s1", "127.0.0.2", &store, dir.path());
    let twin_dir = tempfile::tempdir().unwrap();
    let args = node_args("sequencer", "s1", "127.0.0.3", &store, twin_dir.path(), &[]);
    let mut twin = Command::new(binary());
    twin.args(&args);
    let stderr = refused_to_start(twin).await;
    assert!(
        stderr.contains("another process runs as node s1"),
        "the error names the cause: {stderr}"
    );
    assert_eq!(owned(&first).await, (0..8).collect::<Vec<u32>>());

    first.kill9();
    let again = InternalNode::start("s1", "127.0.0.2", &store, dir.path());
    assert_eq!(owned(&again).await, (0..8).collect::<Vec<u32>>());
}

/// A node that listens on a wildcard address (`0.0.0.0`) without `--advertise` does not
/// start: it registered that address, and the other nodes, reaching `0.0.0.0`, called
/// themselves (appends to its shards refused for good, deliveries to its devices retried for
/// good or made to the caller's own connections).
#[tokio::test]
async fn a_node_listening_on_a_wildcard_address_without_advertise_does_not_start() {
    let (dir, store) = store_node();
    let mut args = node_args("sequencer", "s1", "127.0.0.2", &store, dir.path(), &[]);
    let at = args.iter().position(|a| a == "--internal-listen").unwrap() + 1;
    args[at] = "0.0.0.0:0".into();
    let mut node = Command::new(binary());
    node.args(&args);
    let stderr = refused_to_start(node).await;
    assert!(
        stderr.contains("--advertise"),
        "the error says what to give: {stderr}"
    );
}

#[tokio::test]
async fn sequencer_nodes_take_over_from_a_killed_or_paused_owner_and_lose_nothing() {
    let (dir, store) = store_node();
    let mut first = InternalNode::start("s1", "127.0.0.2", &store, dir.path());
    let second = InternalNode::start("s2", "127.0.0.3", &store, dir.path());
    let _third = InternalNode::start("s3", "127.0.0.4", &store, dir.path());

    let front_dir = tempfile::tempdir().unwrap();
    let front = front_node(&store, front_dir.path());

    // Several conversations, so that several shards are in play.
    let peers: Vec<String> = (0..6).map(|i| format!("bob{i}")).collect();
    let mut alice = front.connect("alice", "phone").await;
    alice.events_until_sync_done().await.unwrap();
    let mut sent: Vec<Vec<(String, u64)>> = vec![Vec::new(); peers.len()];
    send_round(&front, &mut alice, &peers, 1, &mut sent).await;

    // The owner of every shard dies: the others take its shards once its lease lapsed.
    first.kill9();
    send_round(&front, &mut alice, &peers, 2, &mut sent).await;

    // A node is paused past its lease (its shards move), then resumes: it must not commit.
    second.signal(libc::SIGSTOP);
    send_round(&front, &mut alice, &peers, 3, &mut sent).await;
    send_round(&front, &mut alice, &peers, 4, &mut sent).await;
    second.signal(libc::SIGCONT);
    send_round(&front, &mut alice, &peers, 5, &mut sent).await;

    // The history: every `sent` is stored once, at its seq, in send order, with no gap, and
    // each peer receives exactly that.
    check_history(&front, &peers, &sent).await;
}

/// A TCP relay on 127.0.0.1 to `upstream` that can hold what it relays, both ways or only
/// the upstream's answers: a direction held forwards nothing (the bytes wait in it), as a slow
/// network holds a store call in flight, or its answer; released, it forwards what it held, in
/// order, and goes on.
struct HeldLink {
    address: String,
    /// What the relay's clients send.
    requests: std::sync::Arc<Direction>,
    /// What the upstream sends back.
    answers: std::sync::Arc<Direction>,
    relay: tokio::task::JoinHandle<()>,
}

/// One direction of a [`HeldLink`].
struct Direction {
    held: tokio::sync::watch::Sender<bool>,
    /// Bytes that, once seen in the other direction, hold this one before they pass on.
    held_after: std::sync::Mutex<Option<Vec<u8>>>,
}

impl Direction {
    fn new() -> std::sync::Arc<Direction> {
        std::sync::Arc::new(Direction {
            held: tokio::sync::watch::Sender::new(false),
            held_after: std::sync::Mutex::new(None),
        })
    }

    /// Holds this direction if `seen` (the latest bytes of the other one) holds the bytes it
    /// waits for.
    fn hold_if_after(&self, seen: &[u8]) {
        let mut after = self.held_after.lock().unwrap();
        let found = after
            .as_deref()
            .is_some_and(|bytes| seen.windows(bytes.len()).any(|window| window == bytes));
        if found {
            *after = None;
            self.held.send_replace(true);
        }
    }
}

impl HeldLink {
    async fn to(upstream: &str) -> HeldLink {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let (requests, answers) = (Direction::new(), Direction::new());
        let upstream = upstream.to_owned();
        let (to_upstream, from_upstream) = (requests.clone(), answers.clone());
        let relay = tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                let Ok(outbound) = tokio::net::TcpStream::connect(&upstream).await else {
                    continue;
                };
                let (from_in, to_in) = inbound.into_split();
                let (from_out, to_out) = outbound.into_split();
                let forward = HeldLink::forward;
                let (ahead, back) = (to_upstream.clone(), from_upstream.clone());
                tokio::spawn(forward(from_in, to_out, ahead.clone(), back.clone()));
                tokio::spawn(forward(from_out, to_in, back, ahead));
            }
        });
        HeldLink {
            address,
            requests,
            answers,
            relay,
        }
    }

    /// Copies `from` to `to`, each chunk once `this` direction is not held; a chunk that
    /// holds what the `other` direction waits for holds it before it is passed on.
    async fn forward(
        mut from: tokio::net::tcp::OwnedReadHalf,
        mut to: tokio::net::tcp::OwnedWriteHalf,
        this: std::sync::Arc<Direction>,
        other: std::sync::Arc<Direction>,
    ) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        /// The end of the chunk before kept with the next, for bytes split between two.
        const KEPT: usize = 256;
        let mut held = this.held.subscribe();
        let mut buffer = vec![0u8; 64 * 1024];
        let mut seen = Vec::new();
        loop {
            let read = match from.read(&mut buffer).await {
                Ok(0) | Err(_) => return,
                Ok(read) => read,
            };
            seen.extend_from_slice(&buffer[..read]);
            other.hold_if_after(&seen);
            seen.drain(..seen.len().saturating_sub(KEPT));
            if held.wait_for(|held| !*held).await.is_err() {
                return;
            }
            if to.write_all(&buffer[..read]).await.is_err() {
                return;
            }
        }
    }

    /// Holds both ways.
    fn hold(&self) {
        self.requests.held.send_replace(true);
        self.answers.held.send_replace(true);
    }

    /// Holds the upstream's answers from the first request that holds `bytes` on: that
    /// request passes, its answer waits.
    fn hold_answers_after(&self, bytes: &[u8]) {
        *self.answers.held_after.lock().unwrap() = Some(bytes.to_vec());
    }

    /// Whether the upstream's answers are held.
    fn answers_held(&self) -> bool {
        *self.answers.held.borrow()
    }

    /// Releases both ways.
    fn release(&self) {
        for direction in [&self.requests, &self.answers] {
            *direction.held_after.lock().unwrap() = None;
            direction.held.send_replace(false);
        }
    }
}

impl Drop for HeldLink {
    fn drop(&mut self) {
        self.relay.abort();
    }
}

/// A store node reached through a [`HeldLink`].
struct Relayed<'a> {
    store: &'a StoreNode,
    link: &'a HeldLink,
}

impl ClusterStore for Relayed<'_> {
    fn args(&self) -> Vec<String> {
        let mut args = self.store.args();
        let at = args
            .iter()
            .position(|arg| arg == "--store-address")
            .unwrap();
        args[at + 1] = format!("http://{}", self.link.address);
        args
    }
}

/// The count of `histogram` on a node's `/metrics`.
async fn histogram_count(node: &InternalNode, histogram: &str) -> u64 {
    probe_metric(node, &format!("{histogram}_count")).await
}

/// Two sequencer nodes and a front node on one store node: `paused` (s1, started first: it
/// owns every shard) reaches the store through `link`, `other` (s2) directly; alice's and
/// bob's phones are connected to the front and have had their catch-up.
/// (Taken apart, bound in the order of its fields: the connections go first, the
/// directories last.)
struct HeldCluster {
    _dirs: [tempfile::TempDir; 2],
    _store: StoreNode,
    link: HeldLink,
    other: InternalNode,
    paused: InternalNode,
    front: Server,
    bob: courier_client::Client,
    alice: courier_client::Client,
}

impl HeldCluster {
    async fn start() -> HeldCluster {
        let (dir, store) = store_node();
        let link = HeldLink::to(&store.address).await;
        let relayed = Relayed {
            store: &store,
            link: &link,
        };
        let paused = InternalNode::start("s1", "127.0.0.2", &relayed, dir.path());
        let other = InternalNode::start("s2", "127.0.0.3", &store, dir.path());
        let front_dir = tempfile::tempdir().unwrap();
        let front = front_node(&store, front_dir.path());
        assert_eq!(owned(&paused).await.len(), 8, "s1 started first");
        let alice = support::connected(&front, "alice", "phone").await;
        let bob = support::connected(&front, "bob", "phone").await;
        HeldCluster {
            _dirs: [front_dir, dir],
            _store: store,
            link,
            other,
            paused,
            front,
            bob,
            alice,
        }
    }
}

/// Checks that a device of each of alice and bob that has read nothing reads the messages `sent`
/// (ids and seqs) through `front`, once each and in that order.
async fn check_new_devices_read(front: &Server, sent: &[(String, u64)]) {
    for user in ["alice", "bob"] {
        let mut reader = front.connect(user, "laptop").await;
        let read: Vec<(String, u64)> = reader
            .events_until_sync_done()
            .await
            .unwrap()
            .into_iter()
            .filter_map(|event| match event.payload {
                EventPayload::Message { client_msg_id, .. } => Some((client_msg_id, event.seq)),
                _ => None,
            })
            .collect();
        assert_eq!(read, sent, "{user} reads exactly what was sent, once each");
    }
}

/// A sequencer paused past its lease with a batch in flight (its store read answered while it
/// is stopped, its commit sent after SIGCONT) commits nothing of it: the new owner took the
/// shard and appended at the seq the batch was built for, and the batch's commit is refused
/// by the epoch fence. Every `sent` is stored once, at its seq, dense; the client's retry of
/// the message the paused node held is sequenced once, by the new owner. Without the fence,
/// the resumed node's batch overwrote the new owner's message at that seq (acknowledged, then
/// lost) and the retry was answered as a duplicate of the overwriting one.
#[tokio::test(flavor = "multi_thread")]
async fn a_sequencer_paused_with_a_batch_in_flight_commits_nothing_of_it_after_resuming() {
    let HeldCluster {
        _dirs,
        _store,
        link,
        other,
        paused,
        front,
        mut bob,
        mut alice,
    } = HeldCluster::start().await;
    let mut sent = vec![(
        "m1".to_owned(),
        send_until_sent(&mut alice, "bob", "m1", Some(&front)).await,
    )];
    assert_eq!(sent[0].1, 1);

    // s1 takes m2 and reads for its batch, but its store does not answer yet: the send is
    // answered `unavailable` (its outcome unknown) once the front stops waiting.
    const COMMIT: &str = "courier_sequencer_commit_seconds";
    let commits = histogram_count(&paused, COMMIT).await;
    link.hold();
    let refused = alice
        .send_text(Target::User("bob".into()), "m2", "m2")
        .await;
    match refused {
        Err(courier_client::ClientError::Server(error))
            if error.code == courier_client::proto::ErrorCode::Unavailable => {}
        other => panic!("m2 was not left in flight: {other:?}"),
    }
    // s1 stops, its lease lapses (its renewals are held too) and s2 takes its shards.
    paused.signal(libc::SIGSTOP);
    until("s2 took s1's shards", || async {
        owned(&other).await.len() == 8
    })
    .await;
    let m3 = send_until_sent(&mut bob, "alice", "m3", Some(&front)).await;
    sent.push(("m3".to_owned(), m3));

    // s1's read is answered while it is stopped; resumed, it commits its batch, built on the
    // head it cached (1), at the epoch it held.
    link.release();
    paused.signal(libc::SIGCONT);
    until("s1 tried to commit its batch", || async {
        histogram_count(&paused, COMMIT).await > commits
    })
    .await;
    until("s1 dropped the shards it lost", || async {
        owned(&paused).await.is_empty()
    })
    .await;

    // The retry of m2 is sequenced once, after m3.
    let m2 = send_until_sent(&mut alice, "bob", "m2", Some(&front)).await;
    sent.push(("m2".to_owned(), m2));
    let seqs: Vec<u64> = sent.iter().map(|(_, seq)| *seq).collect();
    assert_eq!(seqs, [1, 2, 3], "dense seqs, in the order of the `sent`s");
    // Every `sent` is read once, at its seq, by a device of each member that has read nothing.
    check_new_devices_read(&front, &sent).await;
}

/// Planned hand-offs while a client sends without pause: every shard is moved from s1 to s2
/// and back through the admin API, then s1 is drained and s2 takes its shards, one step after
/// each round of sends. A send that meets a frozen or moving shard is answered `unavailable`
/// (or its connection told to reconnect), which clients retry with the same id; none is
/// refused for good (the sender fails on any other answer), and the history has every `sent`
/// once, at its seq, dense.
#[tokio::test(flavor = "multi_thread")]
async fn shards_moved_and_drained_while_a_client_sends_refuse_and_lose_nothing() {
    let (dir, store) = store_node();
    let first = InternalNode::start("s1", "127.0.0.2", &store, dir.path());
    let second = InternalNode::start("s2", "127.0.0.3", &store, dir.path());
    let front_dir = tempfile::tempdir().unwrap();
    let front = front_node(&store, front_dir.path());
    assert_eq!(owned(&first).await.len(), 8, "s1 started first");

    let peers: Vec<String> = (0..4).map(|i| format!("bob{i}")).collect();
    let mut alice = front.connect("alice", "phone").await;
    alice.events_until_sync_done().await.unwrap();
    let (rounds, mut done) = tokio::sync::watch::channel(0u32);
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let sender = tokio::spawn(async move {
        let mut sent: Vec<Vec<(String, u64)>> = vec![Vec::new(); peers.len()];
        let mut round = 0;
        while !*stopped.borrow() {
            round += 1;
            send_round(&front, &mut alice, &peers, round, &mut sent).await;
            rounds.send_replace(round);
        }
        (front, peers, sent)
    });
    // One step of hand-off after each further round of sends, the sends never paused.
    for (from, to) in [(&first, "s2"), (&second, "s1")] {
        for shard in 0..8 {
            after_a_round(&mut done).await;
            admin(from)
                .await
                .move_shard(MoveShardRequest {
                    shard,
                    to: to.into(),
                })
                .await
                .unwrap();
        }
    }
    after_a_round(&mut done).await;
    let released = admin(&first)
        .await
        .drain(DrainRequest::default())
        .await
        .unwrap()
        .into_inner()
        .released;
    assert_eq!(released, (0..8).collect::<Vec<u32>>());
    until("s2 took the drained shards", || async {
        owned(&second).await.len() == 8
    })
    .await;
    after_a_round(&mut done).await;
    stop.send_replace(true);
    let (front, peers, sent) = sender.await.unwrap();
    check_history(&front, &peers, &sent).await;
}

/// Waits until the sender counting its rounds on `done` finished another one.
async fn after_a_round(done: &mut tokio::sync::watch::Receiver<u32>) {
    let seen = *done.borrow_and_update();
    done.wait_for(|&round| round > seen).await.unwrap();
}

/// How [`a_retry_through_a_new_owner_of_a_send`] stops the sequencer whose answer is held.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Stop {
    /// SIGSTOP, and SIGCONT once another node answered the retry.
    Paused,
    /// SIGKILL.
    Killed,
}

/// The text of the send whose commit's answer [`a_retry_through_a_new_owner_of_a_send`] holds:
/// the relay holds the store's answers from the request that carries it, the commit (the
/// reads before it carry the client's id, not the text).
const ANSWER_HELD: &str = "m2, whose commit's answer is held";

/// A send whose commit landed but whose answer was lost (the store node's answer held in the
/// relay, its sequencer paused past its lease or killed before it answered) is answered
/// `unavailable`; retried with the same `client_msg_id` once another node took the shard, it
/// gets the first attempt's seq and server_msg_id (`duplicate`), and is stored once. With
/// `interleaved`, the peer sends to the conversation between the lost answer and the retry,
/// and the retry is not sequenced after it. Resumed, a paused node gets its commit's answer, late: it answers no
/// one with it and drops the shards it lost; a killed one answers nothing, and its commit's
/// event reaches the peer all the same.
async fn a_retry_through_a_new_owner_of_a_send(stop: Stop, interleaved: bool) {
    let HeldCluster {
        _dirs,
        _store,
        link,
        other,
        mut paused,
        front,
        mut bob,
        mut alice,
    } = HeldCluster::start().await;
    let to_bob = Target::User("bob".into());
    let m1 = send_text_until_taken(&mut alice, to_bob.clone(), "m1", "m1", Some(&front)).await;
    assert_eq!(m1.seq, 1);
    let conv = m1.conversation_id;

    // s1's commit of m2 reaches the store, its answer waits in the relay: the send is
    // answered `unavailable` (its outcome unknown) once the front stops waiting.
    const COMMIT: &str = "courier_sequencer_commit_seconds";
    let commits = histogram_count(&paused, COMMIT).await;
    link.hold_answers_after(ANSWER_HELD.as_bytes());
    match alice.send_text(to_bob.clone(), "m2", ANSWER_HELD).await {
        Err(courier_client::ClientError::Server(error))
            if error.code == courier_client::proto::ErrorCode::Unavailable => {}
        other => panic!("m2 was not left unanswered: {other:?}"),
    }
    assert!(link.answers_held(), "s1 sent m2's commit");
    let stored = || async {
        let (status, body) = front
            .http("bob", "phone")
            .get(&format!("/v1/conversations/{conv}/messages?after_seq=1"))
            .await
            .unwrap();
        assert_eq!(status, 200, "{body}");
        body["events"].as_array().unwrap().first().cloned()
    };
    until("m2's commit landed", || async { stored().await.is_some() }).await;
    let first = stored().await.unwrap();
    assert_eq!(
        (&first["client_msg_id"], &first["seq"]),
        (&serde_json::json!("m2"), &serde_json::json!(2))
    );

    // s1 stops (or dies) before it has the answer; its lease lapses and s2 takes its shards.
    match stop {
        Stop::Paused => paused.signal(libc::SIGSTOP),
        Stop::Killed => paused.kill9(),
    }
    until("s2 took s1's shards", || async {
        owned(&other).await.len() == 8
    })
    .await;
    let mut sent = vec![("m1".to_owned(), 1), ("m2".to_owned(), 2)];
    if interleaved {
        let m3 = send_until_sent(&mut bob, "alice", "m3", Some(&front)).await;
        assert_eq!(m3, 3, "m3 is sequenced after m2, which landed");
        sent.push(("m3".to_owned(), m3));
    }
    let retry = send_text_until_taken(&mut alice, to_bob, "m2", ANSWER_HELD, Some(&front)).await;
    assert_eq!(
        (
            retry.seq,
            retry.server_msg_id.as_str(),
            retry.ts_ms,
            retry.duplicate
        ),
        (
            2,
            first["server_msg_id"].as_str().unwrap(),
            first["ts_ms"].as_u64().unwrap(),
            true
        ),
        "the retry is answered with the first attempt's outcome"
    );

    // s1 resumes and gets its commit's answer, late: it answers no one with it, and drops
    // the shards it lost.
    if stop == Stop::Paused {
        link.release();
        paused.signal(libc::SIGCONT);
        until("s1 had its commit's answer", || async {
            histogram_count(&paused, COMMIT).await > commits
        })
        .await;
        until("s1 dropped the shards it lost", || async {
            owned(&paused).await.is_empty()
        })
        .await;
    }
    let next = sent.len() as u64 + 1;
    let m4 = send_until_sent(&mut alice, "bob", "m4", Some(&front)).await;
    assert_eq!(m4, next, "the conversation goes on at its head");
    sent.push(("m4".to_owned(), m4));
    for frame in frames_until_pong(&mut alice).await {
        use courier_client::proto::ServerFrame;
        assert!(
            !matches!(frame, ServerFrame::Sent(_) | ServerFrame::Error(_)),
            "alice was answered what she did not ask: {frame:?}"
        );
    }
    // Bob's phone, connected throughout, reads alice's messages live, once each.
    read_live(&mut bob, &users(&["m1", "m2", "m4"])).await;

    // Every member's device that has read nothing reads each message once, at its seq.
    check_new_devices_read(&front, &sent).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_send_whose_answer_was_lost_in_a_hand_off_is_answered_its_first_outcome_on_retry() {
    a_retry_through_a_new_owner_of_a_send(Stop::Paused, false).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_retry_after_a_lost_answer_is_not_sequenced_after_a_send_made_meanwhile() {
    a_retry_through_a_new_owner_of_a_send(Stop::Paused, true).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_send_whose_sequencer_died_before_answering_is_answered_its_first_outcome_on_retry() {
    a_retry_through_a_new_owner_of_a_send(Stop::Killed, true).await;
}

/// A network namespace joined to the host by a veth pair: the host side is `10.213.0.1`, the
/// namespace side `10.213.0.2`. Setting the host side down cuts the namespace off (a
/// partition); setting it up heals it. Removed when dropped.
struct Partitionable {
    namespace: String,
    host_link: String,
}

fn ip(args: &[&str]) {
    let status = Command::new("ip").args(args).status().expect("run ip");
    assert!(status.success(), "ip {args:?} failed (root is needed)");
}

impl Partitionable {
    const HOST: &'static str = "10.213.0.1";
    const INSIDE: &'static str = "10.213.0.2";

    fn new() -> Partitionable {
        let id = std::process::id();
        let namespace = format!("courier-test-{id}");
        let host_link = format!("ct{id}h");
        let inside_link = format!("ct{id}n");
        ip(&["netns", "add", &namespace]);
        let this = Partitionable {
            namespace: namespace.clone(),
            host_link: host_link.clone(),
        };
        ip(&[
            "link",
            "add",
            &host_link,
            "type",
            "veth",
            "peer",
            "name",
            &inside_link,
        ]);
        ip(&["link", "set", &inside_link, "netns", &namespace]);
        ip(&[
            "addr",
            "add",
            &format!("{}/24", Self::HOST),
            "dev",
            &host_link,
        ]);
        ip(&["link", "set", &host_link, "up"]);
        let inside = |args: &[&str]| {
            let mut all = vec!["netns", "exec", &namespace, "ip"];
            all.extend_from_slice(args);
            ip(&all);
        };
        inside(&[
            "addr",
            "add",
            &format!("{}/24", Self::INSIDE),
            "dev",
            &inside_link,
        ]);
        inside(&["link", "set", &inside_link, "up"]);
        inside(&["link", "set", "lo", "up"]);
        this
    }

    fn wrapper(&self) -> [&str; 3] {
        ["netns", "exec", &self.namespace]
    }

    fn cut(&self) {
        ip(&["link", "set", &self.host_link, "down"]);
    }

    fn heal(&self) {
        ip(&["link", "set", &self.host_link, "up"]);
    }
}

impl Drop for Partitionable {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_link])
            .status();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.namespace])
            .status();
    }
}

#[tokio::test]
async fn a_sequencer_cut_off_by_a_partition_loses_its_shards_and_commits_nothing_after_healing() {
    let network = Partitionable::new();
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("cluster-token");
    std::fs::write(&token_file, TOKEN).unwrap();
    // The store node listens on the host side of the link, reachable from both sides.
    let store = StoreNode::start(
        &dir.path().join("store"),
        &token_file,
        &format!("{}:0", Partitionable::HOST),
    );
    let mut wrapper = vec!["ip"];
    wrapper.extend(network.wrapper());
    let cut_off = InternalNode::start_in(
        &wrapper,
        "sequencer",
        "s1",
        Partitionable::INSIDE,
        &store,
        dir.path(),
    );
    let _other = InternalNode::start("s2", "127.0.0.3", &store, dir.path());
    let front_dir = tempfile::tempdir().unwrap();
    let front = front_node(&store, front_dir.path());
    assert_eq!(owned(&cut_off).await.len(), 8, "s1 started first");

    let peers: Vec<String> = (0..4).map(|i| format!("bob{i}")).collect();
    let mut alice = front.connect("alice", "phone").await;
    alice.events_until_sync_done().await.unwrap();
    let mut sent: Vec<Vec<(String, u64)>> = vec![Vec::new(); peers.len()];
    send_round(&front, &mut alice, &peers, 1, &mut sent).await;

    // s1 is cut off from the store and from the other nodes: s2 takes its shards once its
    // lease lapsed, and clients go on (after retries).
    network.cut();
    send_round(&front, &mut alice, &peers, 2, &mut sent).await;
    network.heal();
    send_round(&front, &mut alice, &peers, 3, &mut sent).await;

    // Back on the network, s1 finds its shards taken and serves none of them.
    let deadline = std::time::Instant::now() + WAIT;
    while !owned(&cut_off).await.is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "s1 still believes it owns shards"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    send_round(&front, &mut alice, &peers, 4, &mut sent).await;
    check_history(&front, &peers, &sent).await;
}

/// A value of `metric` on a node's `/metrics` (its probes address).
async fn probe_metric(node: &InternalNode, metric: &str) -> u64 {
    let text = reqwest::get(format!("http://{}/metrics", node.probes))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find_map(|line| line.strip_prefix(metric)?.trim().parse().ok())
        .unwrap_or(0)
}

/// Waits until `check` holds, polling.
async fn until<F: std::future::Future<Output = bool>>(what: &str, mut check: impl FnMut() -> F) {
    let deadline = std::time::Instant::now() + WAIT;
    while !check().await {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting: {what}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// Reads events on `client` until it has the messages `expected` (ids, in this order), and
/// returns nothing else: a message read twice or out of order fails.
async fn read_live(client: &mut courier_client::Client, expected: &[String]) {
    let mut read: Vec<String> = Vec::new();
    while read.len() < expected.len() {
        let event = next_event(client).await;
        if let EventPayload::Message { client_msg_id, .. } = event.payload {
            read.push(client_msg_id);
        }
    }
    assert_eq!(read, expected, "read live, in order, once each");
}

#[tokio::test]
async fn two_gateways_and_two_fanout_nodes_deliver_across_nodes_through_fanout_and_gateway_faults()
{
    let (dir, store) = store_node();
    let sequencers: Vec<InternalNode> = (1..=3)
        .map(|i| {
            InternalNode::start(
                &format!("s{i}"),
                &format!("127.0.0.{}", i + 1),
                &store,
                dir.path(),
            )
        })
        .collect();
    let mut f1 = InternalNode::start_in(&[], "fanout", "f1", "127.0.0.5", &store, dir.path());
    let f2 = InternalNode::start_in(&[], "fanout", "f2", "127.0.0.6", &store, dir.path());
    let (_dirs, ga, mut gb) = two_gateway_nodes(&store, dir.path(), "gateway,chat,media,push");

    // The two fanout nodes split the shards.
    until("each fanout node drains half of the shards", || async {
        probe_metric(&f1, "courier_fanout_owned_shards").await == 4
            && probe_metric(&f2, "courier_fanout_owned_shards").await == 4
    })
    .await;

    // alice on one gateway, bob on the other: each reads the other's messages live.
    let mut alice = ga.connect("alice", "phone").await;
    alice.events_until_sync_done().await.unwrap();
    let mut bob = gb.connect("bob", "phone").await;
    bob.events_until_sync_done().await.unwrap();
    // The admin API reports each gateway's connections (for the operator's autoscaler).
    until("ListNodes counts each gateway's connection", || async {
        let nodes = admin(&sequencers[0])
            .await
            .list_nodes(ListNodesRequest {})
            .await
            .unwrap()
            .into_inner()
            .nodes;
        let connections = |id: &str| nodes.iter().find(|n| n.id == id).map(|n| n.connections);
        connections("ga") == Some(1) && connections("gb") == Some(1) && connections("f1") == Some(0)
    })
    .await;
    let mut to_bob: Vec<(String, u64)> = Vec::new();
    let ids = |sent: &[(String, u64)], from: usize| -> Vec<String> {
        sent[from..].iter().map(|(id, _)| id.clone()).collect()
    };
    for i in 1..=10 {
        let id = format!("a{i}");
        let seq = send_until_sent(&mut alice, "bob", &id, None).await;
        to_bob.push((id, seq));
    }
    read_live(&mut bob, &ids(&to_bob, 0)).await;
    let mut to_alice = Vec::new();
    for i in 1..=5 {
        let id = format!("b{i}");
        let seq = send_until_sent(&mut bob, "alice", &id, None).await;
        to_alice.push((id, seq));
    }
    let expected: Vec<String> = to_bob
        .iter()
        .chain(&to_alice)
        .map(|(id, _)| id.clone())
        .collect();
    // Both are in one conversation: alice reads her own messages only through catch-up.
    read_live(&mut alice, &expected[10..]).await;

    // A fanout node dies: the other takes its shards once their leases lapse, and delivery
    // goes on (delayed, never lost).
    f1.kill9();
    until("the other fanout node drains every shard", || async {
        probe_metric(&f2, "courier_fanout_owned_shards").await == 8
    })
    .await;
    for i in 11..=20 {
        let id = format!("a{i}");
        let seq = send_until_sent(&mut alice, "bob", &id, None).await;
        to_bob.push((id, seq));
    }
    read_live(&mut bob, &ids(&to_bob, 10)).await;

    // bob's gateway is paused past its lease: deliveries skip it once it lapsed. When it
    // resumes it notices, and tells bob to reconnect; he catches up.
    gb.signal(libc::SIGSTOP);
    tokio::time::sleep(std::time::Duration::from_millis(2500)).await;
    for i in 21..=23 {
        let id = format!("a{i}");
        let seq = send_until_sent(&mut alice, "bob", &id, None).await;
        to_bob.push((id, seq));
    }
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    gb.signal(libc::SIGCONT);
    let mut live = Vec::new();
    let closed = loop {
        match tokio::time::timeout(WAIT, bob.next_event()).await {
            Ok(Ok(event)) => live.push(event.seq),
            Ok(Err(e)) => break e,
            Err(_) => panic!("bob's lapsed gateway kept his connection; read live: {live:?}"),
        }
    };
    assert!(
        closed.to_string().contains("1001"),
        "told to reconnect: {closed}"
    );
    let mut bob = gb.connect("bob", "phone").await;
    let caught_up: Vec<u64> = bob
        .events_until_sync_done()
        .await
        .unwrap()
        .iter()
        .map(|event| event.seq)
        .collect();
    let seen: BTreeSet<u64> = live.iter().chain(&caught_up).copied().collect();
    for (id, seq) in &to_bob[20..] {
        assert!(
            seen.contains(seq),
            "{id} reached bob after his gateway resumed"
        );
    }

    // bob's gateway dies: he reconnects to the other one and catches up.
    gb.kill9();
    let mut bob = ga.connect("bob", "phone").await;
    bob.events_until_sync_done().await.unwrap();
    for i in 24..=28 {
        let id = format!("a{i}");
        let seq = send_until_sent(&mut alice, "bob", &id, None).await;
        to_bob.push((id, seq));
    }
    read_live(&mut bob, &ids(&to_bob, 23)).await;
    let mut wanted: Vec<(String, u64)> = to_bob.iter().chain(&to_alice).cloned().collect();
    wanted.sort_by_key(|(_, seq)| *seq);
    let seqs: Vec<u64> = wanted.iter().map(|(_, seq)| *seq).collect();
    let dense: Vec<u64> = (1..=33).collect();
    assert_eq!(seqs, dense, "every sent is stored once, densely");
    // The history, read from scratch on the surviving gateway.
    check_history(&ga, &users(&["bob"]), &[wanted.into_iter().collect()]).await;
}

/// A gateway node that renews its lease but that the fanout nodes cannot reach (an asymmetric
/// partition, a wrong `--advertise`: here an address nothing listens on) failed every batch
/// with one of its devices among the recipients, as a whole: the shard's outbox was handed
/// again and again (to the healthy gateways too) and never passed, so once its oldest entry was
/// older than `--outbox-lag-limit` every send to the shard was refused as behind, whoever the
/// recipients. Fanout now ends the lease of a gateway whose calls all failed for
/// `GATEWAY_UNREACHABLE_AFTER` while another gateway took its calls, and skips it: the shard
/// goes on, and the gateway, seeing its lease ended, tells its clients to reconnect; they
/// catch up elsewhere.
#[tokio::test]
async fn a_gateway_the_fanout_cannot_reach_loses_its_lease_and_holds_back_no_one_else() {
    use courier_client::proto::ServerFrame;
    let (dir, store) = store_node();
    // Leases longer than the other tests': no lapse under load but the one fanout makes.
    let lease = ["--shard-lease", "3s"];
    let sequencer = InternalNode::start_with(
        &[],
        "sequencer",
        "s1",
        "127.0.0.2",
        &store,
        dir.path(),
        &[&lease[..], &["--outbox-lag-limit", "1s"]].concat(),
    );
    let _fanout =
        InternalNode::start_with(&[], "fanout", "f1", "127.0.0.3", &store, dir.path(), &lease);
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let ga = gateway_node(&store, dirs[0].path(), "ga", "gateway,chat", &lease);
    let nowhere = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .to_string();
    let gb = gateway_node(
        &store,
        dirs[1].path(),
        "gb",
        "gateway",
        &[&lease[..], &["--advertise", &nowhere]].concat(),
    );
    let conv = ga
        .http("carol", "phone")
        .create_group("g", &users(&["alice", "bob"]))
        .await
        .unwrap();
    let mut alice = gb.connect("alice", "phone").await;
    alice.events_until_sync_done().await.unwrap();
    let mut bob = ga.connect("bob", "phone").await;
    bob.events_until_sync_done().await.unwrap();
    let mut carol = ga.connect("carol", "phone").await;
    carol.events_until_sync_done().await.unwrap();

    // m1 reaches bob (his gateway takes its part of each batch; the batch fails as a whole),
    // but the shard's outbox does not pass it: the shard falls behind.
    let target = Target::Conversation(conv.clone());
    let mut sent = Vec::new();
    let seq = send_until_taken(&mut carol, target.clone(), "m1", None).await;
    sent.push(("m1".to_string(), seq));
    read_live(&mut bob, &["m1".to_string()]).await;
    until("the group's shard is behind", || async {
        probe_metric(&sequencer, "courier_sequencer_shards_behind").await >= 1
    })
    .await;
    // Before, it stayed behind, refusing every send for good. Now fanout gives up on alice's
    // gateway: the shard goes on (the send is refused as behind until then, and retried).
    let seq = send_until_taken(&mut carol, target.clone(), "m2", None).await;
    sent.push(("m2".to_string(), seq));
    read_live(&mut bob, &["m2".to_string()]).await;

    // alice's gateway sees its lease ended: it tells her to reconnect, and closes.
    let after_ms = loop {
        match alice.next_frame_within(WAIT).await {
            Ok(ServerFrame::Reconnect(r)) => break r.after_ms,
            Ok(_) => continue,
            Err(e) => panic!("alice's gateway never told her to reconnect: {e}"),
        }
    };
    assert!(after_ms < 2000, "after_ms within the jitter: {after_ms}");
    let closed = alice.next_frame_within(WAIT).await.unwrap_err();
    assert!(closed.to_string().contains("1001"), "closed: {closed}");
    // And it answers not ready, saying why, so that the load balancer sends her elsewhere
    // (ready, it took her back, to be told again 15 s later, for good); alive all the same.
    let probe = |node: &Server, path: &str| {
        let url = format!("{}{path}", node.http_url());
        async move {
            let answer = reqwest::get(url).await.unwrap();
            (answer.status().as_u16(), answer.text().await.unwrap())
        }
    };
    let (status, why) = probe(&gb, "/readyz").await;
    assert_eq!(status, 503, "the unreachable gateway is not ready: {why}");
    assert!(why.contains("lease"), "{why}");
    assert_eq!(probe(&gb, "/healthz").await.0, 200);
    assert_eq!(probe(&ga, "/readyz").await.0, 200, "the healthy one is");

    // She reconnects to the healthy gateway and catches up; what follows reaches her live.
    let mut alice = ga.connect("alice", "phone").await;
    let caught_up: BTreeSet<u64> = alice
        .events_until_sync_done()
        .await
        .unwrap()
        .iter()
        .map(|event| event.seq)
        .collect();
    for (id, seq) in &sent {
        assert!(caught_up.contains(seq), "alice caught up with {id}");
    }
    send_until_taken(&mut carol, target, "m3", None).await;
    read_live(&mut alice, &["m3".to_string()]).await;
    read_live(&mut bob, &["m3".to_string()]).await;
}

/// A group's send rate is kept by the owner of its shard (a sequencer node), so two members
/// sending through two gateway nodes share it; each gateway alone would let every send through.
#[tokio::test]
async fn a_groups_send_rate_holds_across_gateway_nodes() {
    const BURST: u64 = 4;
    let (dir, store) = store_node();
    let rate = [
        "env",
        "COURIER_GROUP_SENDS_PER_SEC=1",
        "COURIER_GROUP_SENDS_BURST=4",
    ];
    let _sequencer =
        InternalNode::start_in(&rate, "sequencer", "s1", "127.0.0.2", &store, dir.path());
    let (_dirs, ga, gb) = two_gateway_nodes(&store, dir.path(), "gateway,chat,media");
    let conv = ga
        .http("alice", "phone")
        .create_group("g", &users(&["bob"]))
        .await
        .unwrap();
    let mut alice = ga.connect("alice", "phone").await;
    let mut bob = gb.connect("bob", "phone").await;

    let started = std::time::Instant::now();
    let (mut sent, mut limited) = (0u64, 0u64);
    for i in 0..6 {
        for (client, who) in [(&mut alice, "a"), (&mut bob, "b")] {
            let target = Target::Conversation(conv.clone());
            match client.send_text(target, &format!("{who}{i}"), "x").await {
                Ok(_) => sent += 1,
                Err(courier_client::ClientError::Server(e)) => {
                    assert_eq!(
                        e.code,
                        courier_client::proto::ErrorCode::RateLimited,
                        "{e:?}"
                    );
                    assert!(e.retry_after_ms.unwrap_or(0) > 0, "{e:?}");
                    limited += 1;
                }
                Err(e) => panic!("{who}{i}: {e}"),
            }
        }
    }
    // The bucket refills by one a second: at most that many more than the burst got through.
    let refilled = started.elapsed().as_secs() + 1;
    assert!(
        sent <= BURST + refilled,
        "{sent} sends to the group got through in {:?}, past the burst of {BURST} (and {refilled} refills)",
        started.elapsed()
    );
    assert!(limited > 0);
}

/// The next frame of `client` that `wanted` keeps, skipping the others.
async fn next_frame_where<T>(
    client: &mut courier_client::Client,
    mut wanted: impl FnMut(courier_client::proto::ServerFrame) -> Option<T>,
) -> T {
    loop {
        if let Some(found) = wanted(client.next_frame_within(WAIT).await.unwrap()) {
            return found;
        }
    }
}

#[tokio::test]
async fn typing_and_receipts_reach_members_connected_to_another_gateway_node() {
    use courier_client::proto::{AckKind, ServerFrame};
    let (dir, store) = store_node();
    let _sequencer = InternalNode::start("s1", "127.0.0.2", &store, dir.path());
    let (_dirs, ga, gb) = two_gateway_nodes(&store, dir.path(), "gateway,chat,media,fanout");
    let conv = ga
        .http("alice", "phone")
        .create_group("g", &users(&["bob", "carol"]))
        .await
        .unwrap();
    let mut alice = ga.connect("alice", "phone").await;
    let mut bob = gb.connect("bob", "phone").await;
    let mut carol = gb.connect("carol", "phone").await;

    // Alice types on ga: one offer to gb carries both members connected there.
    alice.typing(&conv, true).await.unwrap();
    for member in [&mut bob, &mut carol] {
        let typing = next_frame_where(member, |frame| match frame {
            ServerFrame::Typing(t) => Some((t.user, t.active, t.conversation_id)),
            _ => None,
        })
        .await;
        assert_eq!(typing, ("alice".to_string(), true, conv.clone()));
    }

    // Bob reads alice's message on gb: his receipt reaches alice on ga.
    let sent = alice
        .send_text(Target::Conversation(conv.clone()), "hi", "m1")
        .await
        .unwrap();
    while next_event(&mut bob).await.seq < sent.seq {}
    bob.ack(&conv, sent.seq, AckKind::Read).await.unwrap();
    let receipt = next_frame_where(&mut alice, |frame| match frame {
        ServerFrame::Receipt(r) if r.read_seq >= sent.seq => Some(r),
        _ => None,
    })
    .await;
    assert_eq!((receipt.user.as_str(), receipt.read_seq), ("bob", sent.seq));
}

/// Who holds each shard's duty in `map` and whether the lease runs: `(node, live)`.
fn holders(
    map: &[ShardState],
    duty: impl Fn(&ShardState) -> Option<&courier_rpc::proto::ShardOwner>,
) -> Vec<Option<(String, bool)>> {
    map.iter()
        .map(|s| duty(s).map(|o| (o.node.clone(), o.live)))
        .collect()
}

#[tokio::test]
async fn the_shard_map_shows_every_shard_with_its_owners_and_outbox_lag_from_any_node() {
    let (dir, store) = store_node();
    let sequencer = InternalNode::start("s1", "127.0.0.2", &store, dir.path());
    let fanout = InternalNode::start_in(&[], "fanout", "f1", "127.0.0.3", &store, dir.path());
    let front_dir = tempfile::tempdir().unwrap();
    let front = gateway_node(
        &store,
        front_dir.path(),
        "front",
        "gateway,chat,media,push",
        &[],
    );
    let front_admin = internal_address(&sequencer, "front").await;
    let s1 = |live| Some(("s1".to_string(), live));
    let f1 = |live| Some(("f1".to_string(), live));

    // Any node answers from the store, a node with the client port as well as the others.
    until("f1 drains every shard", || async {
        let map = shard_map(&front_admin, 0).await;
        holders(&map, |s| s.delivery.as_ref()) == vec![f1(true); 8]
    })
    .await;
    for address in [&front_admin, &sequencer.address, &fanout.address] {
        let map = shard_map(address, 0).await;
        assert_eq!(
            map.iter().map(|s| s.shard).collect::<Vec<_>>(),
            (0..8).collect::<Vec<u32>>(),
            "every shard, from {address}"
        );
        assert_eq!(holders(&map, |s| s.sequencing.as_ref()), vec![s1(true); 8]);
        assert!(
            map.iter()
                .all(|s| s.sequencing.as_ref().unwrap().epoch >= 1)
        );
    }

    // The fanout node is paused: its leases lapse, and what is sent waits in the outboxes.
    let peers: Vec<String> = (0..6).map(|i| format!("bob{i}")).collect();
    let mut alice = front.connect("alice", "phone").await;
    alice.events_until_sync_done().await.unwrap();
    fanout.signal(libc::SIGSTOP);
    until("f1's delivery leases lapse", || async {
        let map = shard_map(&sequencer.address, 0).await;
        holders(&map, |s| s.delivery.as_ref()) == vec![f1(false); 8]
    })
    .await;
    let mut sent: Vec<Vec<(String, u64)>> = vec![Vec::new(); peers.len()];
    let sending = std::time::Instant::now();
    send_round(&front, &mut alice, &peers, 1, &mut sent).await;
    send_round(&front, &mut alice, &peers, 2, &mut sent).await;
    let map = shard_map(&sequencer.address, 0).await;
    let since_sending = sending.elapsed().as_millis() as u64;
    assert!(
        waiting(&map) >= 12,
        "every message sent waits for fanout: {map:?}"
    );
    for shard in &map {
        let lag = shard.outbox.unwrap();
        assert!(!lag.more, "the default limit counts them all: {shard:?}");
        // The age comes from the oldest entry's commit time: sent after `sending`.
        match lag.entries {
            0 => assert_eq!(lag.oldest_age_ms, 0, "{shard:?}"),
            _ => assert!(lag.oldest_age_ms <= since_sending + 1, "{shard:?}"),
        }
    }
    let busiest = map
        .iter()
        .max_by_key(|s| s.outbox.unwrap().entries)
        .unwrap()
        .shard;
    let capped = shard_map(&sequencer.address, 1).await;
    assert!(
        capped.iter().all(|s| s.outbox.unwrap().entries <= 1),
        "counted up to the limit asked"
    );
    assert_eq!(
        capped[busiest as usize].outbox.unwrap().more,
        map[busiest as usize].outbox.unwrap().entries > 1,
        "says when more wait than counted"
    );

    // The fanout node resumes: it takes its shards again and empties the outboxes.
    fanout.signal(libc::SIGCONT);
    until("the outboxes are drained", || async {
        let map = shard_map(&front_admin, 0).await;
        waiting(&map) == 0 && holders(&map, |s| s.delivery.as_ref()) == vec![f1(true); 8]
    })
    .await;
    check_history(&front, &peers, &sent).await;
}

/// The shard of each conversation in a store of [`SHARDS`] shards (the store's own hash).
struct ShardOf {
    store: courier_store::MessageStore,
    _dir: tempfile::TempDir,
}

impl ShardOf {
    async fn new() -> ShardOf {
        let dir = tempfile::tempdir().unwrap();
        let engine = courier_store::embedded::EmbeddedEngine::open(&dir.path().join("s")).unwrap();
        let shards = SHARDS.parse().unwrap();
        let store = courier_store::MessageStore::open(std::sync::Arc::new(engine), b"", shards)
            .await
            .unwrap();
        ShardOf { store, _dir: dir }
    }

    /// The shard of the direct conversation of `a` and `b`.
    fn direct(&self, a: &str, b: &str) -> u32 {
        self.store
            .shard_of(&courier_chat::direct_conversation_id(a, b))
    }
}

#[tokio::test]
async fn sends_to_a_shard_whose_outbox_is_behind_get_unavailable_until_fanout_catches_up() {
    let (dir, store) = store_node();
    // Refuses messages to a shard whose oldest outbox entry waited more than 1 s.
    let limit = ["--outbox-lag-limit", "1s"];
    let sequencer = InternalNode::start_with(
        &[],
        "sequencer",
        "s1",
        "127.0.0.2",
        &store,
        dir.path(),
        &limit,
    );
    let fanout = InternalNode::start_in(&[], "fanout", "f1", "127.0.0.3", &store, dir.path());
    let front_dir = tempfile::tempdir().unwrap();
    let front = gateway_node(
        &store,
        front_dir.path(),
        "front",
        "gateway,chat,media,push",
        &[],
    );
    let shards = ShardOf::new().await;
    let peers: Vec<String> = (0..6).map(|i| format!("bob{i}")).collect();
    let behind = shards.direct("alice", &peers[0]);
    let elsewhere = (1..peers.len())
        .find(|&i| shards.direct("alice", &peers[i]) != behind)
        .expect("a peer whose conversation is on another shard");
    let mut alice = front.connect("alice", "phone").await;
    alice.events_until_sync_done().await.unwrap();
    let mut sent: Vec<Vec<(String, u64)>> = vec![Vec::new(); peers.len()];
    send_round(&front, &mut alice, &peers, 1, &mut sent).await;
    until("fanout delivered and cleared the first round", || async {
        waiting(&shard_map(&sequencer.address, 0).await) == 0
    })
    .await;

    // The only fanout node stops: what is sent to bob0 waits in its shard's outbox, and
    // once the oldest has waited past the limit, the shard's owner refuses bob0's messages.
    fanout.signal(libc::SIGSTOP);
    let deadline = std::time::Instant::now() + WAIT;
    let (refused_id, refused) = loop {
        assert!(
            std::time::Instant::now() < deadline,
            "sends to the stalled shard were never refused"
        );
        let id = format!("r2-bob0-{}", sent[0].len());
        match alice
            .send_text(Target::User(peers[0].clone()), &id, &id)
            .await
        {
            Ok(taken) => sent[0].push((id, taken.seq)),
            Err(courier_client::ClientError::Server(error)) => break (id, error),
            Err(e) => panic!("sending {id} failed: {e}"),
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    assert!(
        sent[0].len() >= 2,
        "accepted until the lag passed the limit"
    );
    assert_eq!(
        (
            refused.code,
            refused.message.as_str(),
            refused.retry_after_ms,
            refused.client_msg_id.as_deref()
        ),
        (
            courier_client::proto::ErrorCode::Unavailable,
            "delivery is behind; retry shortly",
            Some(500),
            Some(refused_id.as_str())
        ),
        "the answer clients got before, for the send it refuses"
    );
    assert!(probe_metric(&sequencer, "courier_sequencer_shards_behind").await >= 1);
    // A shard whose outbox is empty is not held back by the stalled one.
    let other = &peers[elsewhere];
    let id = format!("r2-{other}");
    let taken = alice
        .send_text(Target::User(other.clone()), &id, &id)
        .await
        .expect("a send to another shard is taken");
    sent[elsewhere].push((id, taken.seq));

    // Fanout resumes: it drains the outbox, the owner's next round sees it, and the refused
    // message, retried with the same id as clients do, is taken.
    fanout.signal(libc::SIGCONT);
    let seq = send_until_sent(&mut alice, &peers[0], &refused_id, Some(&front)).await;
    sent[0].push((refused_id, seq));
    until("no shard is behind", || async {
        probe_metric(&sequencer, "courier_sequencer_shards_behind").await == 0
    })
    .await;
    send_round(&front, &mut alice, &peers, 3, &mut sent).await;
    // Every message acknowledged was stored once, densely, and reaches its recipient.
    check_history(&front, &peers, &sent).await;
}

#[tokio::test]
async fn a_gateway_drained_through_the_admin_api_tells_its_clients_to_reconnect_in_batches() {
    const CLIENTS: usize = 6;
    let (dir, store) = store_node();
    let sequencer = InternalNode::start("s1", "127.0.0.2", &store, dir.path());
    let (_dirs, ga, mut gb) =
        two_gateway_nodes(&store, dir.path(), "gateway,chat,fanout,push,media");
    let gb_admin = internal_address(&sequencer, "gb").await;

    let mut clients = Vec::new();
    for i in 0..CLIENTS {
        let mut client = gb.connect(&format!("u{i}"), "phone").await;
        client.events_until_sync_done().await.unwrap();
        clients.push(client);
    }
    // Each client waits for its `reconnect` and the close that follows, and reports it.
    let (told, mut reconnects) = tokio::sync::mpsc::channel(CLIENTS);
    let mut waiting = tokio::task::JoinSet::new();
    for (i, mut client) in clients.into_iter().enumerate() {
        let told = told.clone();
        waiting.spawn(async move {
            let after_ms = loop {
                match client.next_frame_within(WAIT).await.unwrap() {
                    courier_client::proto::ServerFrame::Reconnect(r) => break r.after_ms,
                    _ => continue,
                }
            };
            told.send(i).await.unwrap();
            let closed = client.next_frame_within(WAIT).await.unwrap_err();
            (after_ms, closed.to_string())
        });
    }

    // Spread over 3 s: one connection every 500 ms.
    let drained = admin_at(&gb_admin)
        .await
        .drain(DrainRequest { window_ms: 3000 })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (
            drained.connections,
            drained.window_ms,
            drained.released.len()
        ),
        (CLIENTS as u64, 3000, 0)
    );
    let first = reconnects.recv().await.unwrap();
    // The checkpoint: when the first client is told, the others are not told yet.
    let told_at_first = 1 + std::iter::from_fn(|| reconnects.try_recv().ok()).count();
    assert!(
        told_at_first < CLIENTS,
        "the clients are told in batches, not all at once ({told_at_first} with u{first})"
    );
    // A drained gateway is not ready and takes no new connection; it keeps serving its
    // clients until they are told, and answers the admin API.
    let ready = reqwest::get(format!("{}/readyz", gb.http_url()))
        .await
        .unwrap();
    assert_eq!(ready.status(), 503);
    let refused = courier_client::Client::connect(
        &gb.ws_url(),
        &gb.token("late", "phone"),
        courier_client::proto::Encoding::Json,
    )
    .await;
    assert!(refused.is_err(), "a draining gateway takes no connection");
    let again = admin_at(&gb_admin)
        .await
        .drain(DrainRequest { window_ms: 0 })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.window_ms, 3000, "a second drain goes on as the first");
    let mut told = told_at_first;
    while told < CLIENTS {
        reconnects.recv().await.unwrap();
        told += 1;
    }
    for (after_ms, closed) in waiting.join_all().await {
        assert!(after_ms < 2000, "after_ms within the jitter: {after_ms}");
        assert!(
            closed.contains("1001"),
            "closed with 1001 after reconnect: {closed}"
        );
    }
    // They reconnect to the other gateway and talk to each other there.
    let mut u0 = ga.connect("u0", "phone").await;
    u0.events_until_sync_done().await.unwrap();
    let mut u1 = ga.connect("u1", "phone").await;
    u1.events_until_sync_done().await.unwrap();
    send_until_sent(&mut u0, "u1", "after-drain", None).await;
    read_live(&mut u1, &["after-drain".to_string()]).await;

    // The drained gateway stops: it leaves the registry at once (its lease ends), and is
    // forgotten 10 leases later by the live nodes.
    assert!(gb.terminate().success());
    let gone = registry(&sequencer).await;
    assert!(
        gone.iter().any(|(id, _, live)| id == "gb" && !live),
        "gb left: {gone:?}"
    );
    until("the live nodes forget gb", || async {
        registry(&sequencer)
            .await
            .iter()
            .all(|(id, _, _)| id != "gb")
    })
    .await;
}

#[tokio::test]
async fn a_dead_node_is_forgotten_through_the_admin_api_and_a_live_one_is_not() {
    let (dir, store) = store_node();
    let sequencer = InternalNode::start("s1", "127.0.0.2", &store, dir.path());
    let mut dead = InternalNode::start_in(&[], "fanout", "f1", "127.0.0.3", &store, dir.path());
    dead.kill9();
    until("f1's lease lapses", || async {
        registry(&sequencer)
            .await
            .iter()
            .any(|(id, _, live)| id == "f1" && !live)
    })
    .await;
    let mut api = admin(&sequencer).await;
    let live = api
        .forget_node(ForgetNodeRequest { id: "s1".into() })
        .await
        .unwrap_err();
    assert_eq!(live.code(), tonic::Code::InvalidArgument, "{live}");
    let forgotten = api
        .forget_node(ForgetNodeRequest { id: "f1".into() })
        .await
        .unwrap()
        .into_inner();
    assert!(forgotten.forgotten);
    assert!(
        registry(&sequencer)
            .await
            .iter()
            .all(|(id, _, _)| id != "f1")
    );
    let again = api
        .forget_node(ForgetNodeRequest { id: "f1".into() })
        .await
        .unwrap()
        .into_inner();
    assert!(!again.forgotten, "forgetting again is harmless");

    // A live node is refused; a forgotten node that comes back registers again.
    let back = InternalNode::start_in(&[], "fanout", "f1", "127.0.0.3", &store, dir.path());
    let refused = admin(&back)
        .await
        .forget_node(ForgetNodeRequest { id: "s1".into() })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition, "{refused}");
    assert!(
        registry(&sequencer)
            .await
            .iter()
            .any(|(id, _, live)| id == "f1" && *live)
    );
}

/// `courier bench` against a cluster: given both gateways, it puts every sender on one and its
/// receiver on the other, and every message crosses nodes with nothing lost.
#[tokio::test(flavor = "multi_thread")]
async fn the_bench_spreads_its_connections_over_the_gateways_it_is_given() {
    let (dir, store) = store_node();
    let _sequencer = InternalNode::start("s1", "127.0.0.2", &store, dir.path());
    let media = dir.path().join("shared-media").display().to_string();
    let args = [
        "--media-dir",
        media.as_str(),
        "--user-sends-per-sec",
        "0",
        "--connection-frames-per-sec",
        "0",
    ];
    let roles = "gateway,chat,media,fanout";
    let (a_dir, b_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let ga = gateway_node(&store, a_dir.path(), "ga", roles, &args);
    let gb = gateway_node(&store, b_dir.path(), "gb", roles, &args);
    let urls = format!("{},{}", ga.ws_url(), gb.ws_url());
    let out = tempfile::tempdir().unwrap();
    let result = out.path().join("result.json");
    let bench = tokio::process::Command::new(binary())
        .args(["bench", "--url", &urls, "--jwt-secret", JWT_SECRET])
        .args(["--no-progress", "--duration", "2s", "--json"])
        .arg(&result)
        .args(["throughput", "--pairs", "4", "--rate", "100"])
        .output()
        .await
        .expect("run courier bench");
    assert!(
        bench.status.success(),
        "{}",
        String::from_utf8_lossy(&bench.stderr)
    );
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&result).unwrap()).unwrap();
    let counts = &json["counts"];
    assert_eq!(counts["lost"], 0, "{json:#}");
    let acked = counts["acked"].as_u64().unwrap();
    assert!(acked > 0, "{json:#}");
    assert_eq!(counts["delivered"], acked, "{json:#}");
    // The receivers were the second gateway's: it wrote every message to them.
    let written = gb.metric("courier_gateway_queue_wait_seconds_count").await;
    assert!(
        written >= acked,
        "gb wrote {written} events for {acked} messages"
    );
}

/// `courier admin NODE ARGS...` with the cluster token in `token_file`: its exit success and
/// standard output, or standard error when it failed.
async fn admin_cli(node: &str, token_file: &Path, args: &[&str]) -> (bool, String) {
    let output = tokio::process::Command::new(binary())
        .args(["admin", "--node", node, "--cluster-token-file"])
        .arg(token_file)
        .args(args)
        .env_remove(courier_rpc::auth::TOKEN_ENV)
        .output()
        .await
        .expect("run courier admin");
    let text = match output.status.success() {
        true => output.stdout,
        false => output.stderr,
    };
    (
        output.status.success(),
        String::from_utf8_lossy(&text).into_owned(),
    )
}

/// The row of `shard` in the output of `courier admin shards`.
fn shard_row(shards: &str, shard: u32) -> &str {
    shards
        .lines()
        .find(|line| line.split_whitespace().next() == Some(&shard.to_string()))
        .unwrap_or_else(|| panic!("no shard {shard} in:\n{shards}"))
}

/// `courier admin` from a terminal: nodes, the shard map and a move asked of a node that is
/// not the shard's sequencer (the command finds the owner); the wrong token gets nothing.
#[tokio::test(flavor = "multi_thread")]
async fn the_admin_command_lists_the_cluster_and_moves_a_shard() {
    let (dir, store) = store_node();
    let first = InternalNode::start("s1", "127.0.0.2", &store, dir.path());
    let second = InternalNode::start("s2", "127.0.0.3", &store, dir.path());
    let token = store.token_file.clone();

    let (ok, nodes) = admin_cli(&second.address, &token, &["nodes"]).await;
    assert!(ok, "{nodes}");
    for (id, address) in [("s1", &first.address), ("s2", &second.address)] {
        let row = nodes
            .lines()
            .find(|line| line.starts_with(id))
            .unwrap_or_else(|| panic!("no {id} in:\n{nodes}"));
        assert!(
            row.contains("sequencer") && row.contains(address.as_str()) && row.contains("live"),
            "{row}"
        );
    }
    let (ok, shards) = admin_cli(&second.address, &token, &["shards"]).await;
    assert!(ok, "{shards}");
    assert!(shard_row(&shards, 3).contains("s1 (epoch"), "{shards}");

    let (ok, moved) = admin_cli(&second.address, &token, &["move-shard", "3", "--to", "s2"]).await;
    assert!(ok, "{moved}");
    assert!(moved.starts_with("shard 3 moved to s2 at epoch"), "{moved}");
    assert_eq!(owned(&second).await, [3]);
    let (_, shards) = admin_cli(&first.address, &token, &["shards"]).await;
    assert!(shard_row(&shards, 3).contains("s2 (epoch"), "{shards}");
    assert!(shard_row(&shards, 4).contains("s1 (epoch"), "{shards}");

    let (ok, refused) =
        admin_cli(&second.address, &token, &["move-shard", "99", "--to", "s1"]).await;
    assert!(!ok && refused.contains("no shard 99"), "{refused}");
    // A drain of the second node hands its one shard back to the others.
    let (ok, drained) = admin_cli(&second.address, &token, &["drain"]).await;
    assert!(ok && drained.contains("released shards [3]"), "{drained}");
    let wrong = dir.path().join("wrong-token");
    std::fs::write(&wrong, "another-cluster-token-0123456789abcdef").unwrap();
    let (ok, refused) = admin_cli(&second.address, &wrong, &["nodes"]).await;
    assert!(!ok && refused.contains("Unauthenticated"), "{refused}");
}

/// A cluster whose gateway nodes run without chat: a store node, a sequencer, a fanout node,
/// two chat nodes (`--roles chat`) and two gateway nodes (`--roles gateway,media`) sharing a
/// media directory. Returns the chat nodes and the gateways (data directories first, so they
/// outlive the nodes).
fn cluster_with_chat_nodes(
    store: &StoreNode,
    dir: &Path,
    chat_args: &[&str],
) -> (Vec<InternalNode>, [tempfile::TempDir; 2], Server, Server) {
    let mut internal = vec![
        InternalNode::start("s1", "127.0.0.2", store, dir),
        InternalNode::start_in(&[], "fanout", "f1", "127.0.0.3", store, dir),
    ];
    for (id, host) in [("c1", "127.0.0.4"), ("c2", "127.0.0.5")] {
        internal.push(InternalNode::start_with(
            &[],
            "chat",
            id,
            host,
            store,
            dir,
            chat_args,
        ));
    }
    let media = dir.join("shared-media").display().to_string();
    let shared = ["--media-dir", media.as_str()];
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let ga = gateway_node(store, dirs[0].path(), "ga", "gateway,media", &shared);
    let gb = gateway_node(store, dirs[1].path(), "gb", "gateway,media", &shared);
    (internal, dirs, ga, gb)
}

/// A user's send rate limit holds across gateways and chat nodes: every device of the user is
/// served by one chat node, so its devices on two gateways draw on one bucket.
#[tokio::test]
async fn a_users_send_limit_holds_for_its_devices_on_two_gateways_and_two_chat_nodes() {
    let (dir, store) = store_node();
    let limit = ["--user-sends-per-sec", "1", "--user-sends-burst", "4"];
    let (_internal, _dirs, ga, gb) = cluster_with_chat_nodes(&store, dir.path(), &limit);
    let mut devices = Vec::new();
    for i in 0..6 {
        let gateway = if i % 2 == 0 { &ga } else { &gb };
        let mut client = gateway.connect("rita", &format!("d{i}")).await;
        client.events_until_sync_done().await.unwrap();
        devices.push(client);
    }

    let started = std::time::Instant::now();
    let (mut sent, mut limited) = (0u64, 0u64);
    for round in 0..2 {
        for (i, client) in devices.iter_mut().enumerate() {
            let id = format!("d{i}-{round}");
            match client.send_text(Target::User("sam".into()), &id, "x").await {
                Ok(_) => sent += 1,
                Err(courier_client::ClientError::Server(e)) => {
                    assert_eq!(
                        e.code,
                        courier_client::proto::ErrorCode::RateLimited,
                        "{e:?}"
                    );
                    limited += 1;
                }
                Err(e) => panic!("{id}: {e}"),
            }
        }
    }
    // One bucket of 4 that refills by one a second: six devices on two chat nodes with a
    // bucket each would have got 8 through at once.
    let refilled = started.elapsed().as_secs();
    assert!(
        sent <= 4 + refilled,
        "{sent} sends taken in {refilled} s, {limited} refused"
    );
    assert_eq!(sent + limited, 12);
}

/// Every client request of a gateway node without chat goes to a chat node over gRPC: sends
/// (1:1 and group), receipts, fetch, catch-up, a group change, and a stranger's refusals, with
/// the code and message `courier serve` gives (`tests/groups.rs`, `tests/protocol.rs`).
#[tokio::test]
async fn gateway_nodes_without_chat_serve_every_request_through_the_chat_nodes() {
    use courier_client::proto::{AckKind, ErrorCode, ServerFrame};
    let (dir, store) = store_node();
    let (_internal, _dirs, ga, gb) = cluster_with_chat_nodes(&store, dir.path(), &[]);

    // 1:1 across the gateways: alice on ga, bob on gb; bob's read receipt reaches alice.
    let mut alice = ga.connect("alice", "phone").await;
    alice.events_until_sync_done().await.unwrap();
    let mut bob = gb.connect("bob", "phone").await;
    bob.events_until_sync_done().await.unwrap();
    let sent = send_until_sent(&mut alice, "bob", "d1", None).await;
    assert_eq!(sent, 1);
    let event = next_event(&mut bob).await;
    assert_eq!(event.seq, 1);
    let direct = event.conversation_id.clone();
    bob.ack(&direct, 1, AckKind::Read).await.unwrap();
    let receipt = next_frame_where(&mut alice, |frame| match frame {
        ServerFrame::Receipt(r) if r.read_seq >= 1 => Some(r),
        _ => None,
    })
    .await;
    assert_eq!((receipt.user.as_str(), receipt.read_seq), ("bob", 1));

    // A group, created and changed through the client HTTP API of a gateway without chat.
    let conv = ga
        .http("alice", "phone")
        .create_group("g", &users(&["bob"]))
        .await
        .unwrap();
    ga.http("alice", "phone")
        .add_members(&conv, &users(&["carol"]))
        .await
        .unwrap();
    let group_sent = alice
        .send_text(Target::Conversation(conv.clone()), "g1", "hello group")
        .await
        .unwrap();
    assert_eq!(
        group_sent.seq, 3,
        "group_created, member_added, then the message"
    );
    let mut carol = gb.connect("carol", "phone").await;
    let caught_up = carol.events_until_sync_done().await.unwrap();
    assert!(
        caught_up
            .iter()
            .any(|e| e.seq == 3 && e.conversation_id == conv),
        "carol's catch-up (planned by a chat node) has the message: {caught_up:?}"
    );
    let page = bob.fetch(&conv, 0, None).await.unwrap();
    assert_eq!(page.head_seq, 3);
    let seqs: Vec<u64> = page.events.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, vec![1, 2, 3]);

    // A stranger gets what `courier serve` answers: forbidden, with the same message.
    let mut mallory = gb.connect("mallory", "phone").await;
    mallory.events_until_sync_done().await.unwrap();
    let not_a_member = format!("you are not a member of {conv}");
    match mallory
        .send_text(Target::Conversation(conv.clone()), "x1", "let me in")
        .await
    {
        Err(courier_client::ClientError::Server(e)) => {
            assert_eq!(
                (e.code, e.message.as_str()),
                (ErrorCode::Forbidden, &*not_a_member)
            );
            assert_eq!(e.client_msg_id.as_deref(), Some("x1"));
        }
        other => panic!("a stranger's send to a group: {other:?}"),
    }
    match mallory.fetch(&conv, 0, None).await {
        Err(courier_client::ClientError::Server(e)) => {
            assert_eq!(
                (e.code, e.message.as_str()),
                (ErrorCode::Forbidden, &*not_a_member)
            );
        }
        other => panic!("a stranger's fetch of a group: {other:?}"),
    }
    let (status, body) = gb
        .http("mallory", "phone")
        .post(
            &format!("/v1/groups/{conv}/members"),
            &serde_json::json!({ "users": ["mallory"] }),
        )
        .await
        .unwrap();
    assert_eq!(status, 403, "{body}");
    assert_eq!(body["code"], "forbidden");
    assert_eq!(body["message"], not_a_member.as_str());
    match mallory
        .fetch("g:00000000000000000000000000000000", 0, None)
        .await
    {
        Err(courier_client::ClientError::Server(e)) => assert_eq!(e.code, ErrorCode::NotFound),
        other => panic!("a fetch of no conversation: {other:?}"),
    }
}

/// A chat node SIGKILLed under a send load: the sends it held are answered `unavailable`, the
/// clients' retries (the same `client_msg_id`) go through the other chat node, and every
/// message is stored once, densely, and read once by its recipient; a retry of a message
/// already sent is answered `duplicate: true` with its seq.
#[tokio::test(flavor = "multi_thread")]
async fn a_chat_node_killed_under_load_loses_and_duplicates_nothing() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    const SENDERS: usize = 8;
    const MESSAGES: usize = 30;
    let (dir, store) = store_node();
    let (mut internal, _dirs, ga, gb) = cluster_with_chat_nodes(&store, dir.path(), &[]);
    let ga = Arc::new(ga);
    let taken = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for i in 0..SENDERS {
        let (ga, taken) = (ga.clone(), taken.clone());
        tasks.push(tokio::spawn(async move {
            let mut sender = ga.connect(&format!("sender{i}"), "phone").await;
            sender.events_until_sync_done().await.unwrap();
            let peer = format!("peer{i}");
            let mut sent = Vec::new();
            for m in 0..MESSAGES {
                let id = format!("s{i}-{m}");
                let seq = send_until_sent(&mut sender, &peer, &id, Some(&ga)).await;
                sent.push((id, seq));
                taken.fetch_add(1, Ordering::Relaxed);
            }
            // The first message again: the chat node that takes the retry finds it sequenced.
            let (first, seq) = sent[0].clone();
            let again = sender
                .send_text(Target::User(peer.clone()), &first, &first)
                .await
                .unwrap();
            assert!(again.duplicate, "a retry of {first} is a duplicate");
            assert_eq!(again.seq, seq);
            sent
        }));
    }
    until("the load is under way", || async {
        taken.load(Ordering::Relaxed) >= SENDERS * MESSAGES / 4
    })
    .await;
    let c1 = internal
        .iter_mut()
        .find(|node| node.address.starts_with("127.0.0.4:"))
        .unwrap();
    c1.kill9();
    let mut sent = Vec::new();
    for task in tasks {
        sent.push(task.await.unwrap());
    }
    assert_eq!(taken.load(Ordering::Relaxed), SENDERS * MESSAGES);
    let peers: Vec<String> = (0..SENDERS).map(|i| format!("peer{i}")).collect();
    check_history(&gb, &peers, &sent).await;
}

/// The gateway pods as the operator renders them: a store node, a sequencer, a fanout node, a
/// chat node, a media node `m1` (`--roles media`, with `media_extra`) keeping its bytes in a
/// shared directory, and two gateway nodes running the gateway role alone. Returns the nodes
/// without a client port (the media node last) and the gateways (data directories first, so
/// that they outlive the nodes).
fn cluster_with_a_media_node(
    store: &StoreNode,
    dir: &Path,
    media_extra: &[&str],
) -> (Vec<InternalNode>, [tempfile::TempDir; 2], Server, Server) {
    let media = dir.join("shared-media").display().to_string();
    let mut media_args = vec![
        "--jwt-secret",
        JWT_SECRET,
        "--media-dir",
        &media,
        "--min-free-disk",
        "0",
        "--media-min-free-disk",
        "0",
    ];
    media_args.extend_from_slice(media_extra);
    let internal = vec![
        InternalNode::start("s1", "127.0.0.2", store, dir),
        InternalNode::start_in(&[], "fanout", "f1", "127.0.0.3", store, dir),
        InternalNode::start_in(&[], "chat", "c1", "127.0.0.4", store, dir),
        InternalNode::start_with(&[], "media", "m1", "127.0.0.5", store, dir, &media_args),
    ];
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let ga = gateway_node(store, dirs[0].path(), "ga", "gateway", &[]);
    let gb = gateway_node(store, dirs[1].path(), "gb", "gateway", &[]);
    (internal, dirs, ga, gb)
}

/// `GET path` on `server` with `token` (none: no `Authorization`) and `headers`.
async fn media_get(
    server: &Server,
    path: &str,
    token: Option<String>,
    headers: &[(&str, &str)],
) -> reqwest::Response {
    let mut request = reqwest::Client::new().get(format!("{}{path}", server.http_url()));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    request.send().await.unwrap()
}

/// The status and JSON body of `response`.
async fn status_and_json(response: reqwest::Response) -> (u16, serde_json::Value) {
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or_default())
}

/// `bytes` uploaded by `user` through `server` as a stream of 64 KiB chunks (chunked transfer:
/// no `Content-Length`), as a client streams a large file.
async fn upload_streamed(server: &Server, user: &str, bytes: &[u8]) -> (u16, serde_json::Value) {
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
        bytes.chunks(64 * 1024).map(|c| Ok(c.to_vec())).collect();
    let response = reqwest::Client::new()
        .post(format!("{}/v1/media", server.http_url()))
        .bearer_auth(server.token(user, "phone"))
        .header("content-type", "video/mp4")
        .body(reqwest::Body::wrap_stream(futures::stream::iter(chunks)))
        .send()
        .await
        .unwrap();
    status_and_json(response).await
}

/// Media through gateway nodes that do not run the media role: an upload through one gateway
/// streams to the media node, a download with `Range` through the other comes back from it
/// with the media node's status and headers; a caller without a token, or who may not read
/// the media, gets the media node's refusal; once no media node is live, `unavailable`.
#[tokio::test(flavor = "multi_thread")]
async fn gateways_without_media_forward_media_requests_to_a_media_node() {
    use sha2::Digest;
    let (dir, store) = store_node();
    let (mut internal, _dirs, ga, gb) = cluster_with_a_media_node(
        &store,
        dir.path(),
        &[
            "--media-url-secret",
            "cdn-secret-of-thirty-two-bytes-or-more",
        ],
    );

    // 6 MiB and a few bytes, streamed in through ga.
    let bytes: Vec<u8> = (0..6 * 1024 * 1024 + 5)
        .map(|i| (i * 7 % 251) as u8)
        .collect();
    let (status, uploaded) = upload_streamed(&ga, "alice", &bytes).await;
    assert_eq!(status, 201, "{uploaded}");
    assert_eq!(
        uploaded["sha256"],
        hex::encode(sha2::Sha256::digest(&bytes)).as_str()
    );
    assert_eq!(uploaded["size"], bytes.len() as u64);
    assert_eq!(uploaded["mime"], "video/mp4");
    let id = uploaded["media_id"].as_str().unwrap().to_owned();

    // alice shares it with bob.
    let mut alice = ga.connect("alice", "phone").await;
    alice.events_until_sync_done().await.unwrap();
    let media = courier_client::proto::Body::Media(Box::new(courier_client::proto::Media {
        media_id: id.clone(),
        mime: "video/mp4".into(),
        size: bytes.len() as u64,
        sha256: String::new(),
        name: None,
        caption: None,
    }));
    alice
        .send_with_retry(Target::User("bob".into()), "clip", media)
        .await
        .unwrap();

    // bob reads a range through gb: the media node's 206 and headers, the bytes asked.
    let path = format!("/v1/media/{id}");
    let bob = gb.token("bob", "phone");
    let ranged = media_get(
        &gb,
        &path,
        Some(bob.clone()),
        &[("range", "bytes=1000-1999")],
    )
    .await;
    assert_eq!(ranged.status().as_u16(), 206);
    let header = |response: &reqwest::Response, name: &str| {
        response.headers()[name].to_str().unwrap().to_owned()
    };
    assert_eq!(
        header(&ranged, "content-range"),
        format!("bytes 1000-1999/{}", bytes.len())
    );
    assert_eq!(header(&ranged, "content-type"), "video/mp4");
    assert_eq!(header(&ranged, "accept-ranges"), "bytes");
    let etag = header(&ranged, "etag");
    assert_eq!(ranged.bytes().await.unwrap(), bytes[1000..2000]);
    let whole = media_get(&gb, &path, Some(bob.clone()), &[]).await;
    assert_eq!(whole.status().as_u16(), 200);
    assert_eq!(header(&whole, "content-length"), bytes.len().to_string());
    assert_eq!(whole.bytes().await.unwrap(), bytes);
    let cached = media_get(&gb, &path, Some(bob.clone()), &[("if-none-match", &etag)]).await;
    assert_eq!(cached.status().as_u16(), 304);

    // Refusals are the media node's: no token, a stranger, a bad token on upload.
    let (status, body) = status_and_json(media_get(&gb, &path, None, &[]).await).await;
    assert_eq!((status, body["code"].as_str()), (401, Some("unauthorized")));
    let mallory = gb.token("mallory", "phone");
    let (status, body) = status_and_json(media_get(&gb, &path, Some(mallory), &[]).await).await;
    assert_eq!((status, body["code"].as_str()), (404, Some("not_found")));
    let forged = reqwest::Client::new()
        .post(format!("{}/v1/media", ga.http_url()))
        .bearer_auth("not-a-token")
        .header("content-type", "image/png")
        .body(vec![1u8; 10])
        .send()
        .await
        .unwrap();
    let (status, body) = status_and_json(forged).await;
    assert_eq!((status, body["code"].as_str()), (401, Some("unauthorized")));
    // An upload with a `Content-Length` goes through as well.
    let sized = reqwest::Client::new()
        .post(format!("{}/v1/media", ga.http_url()))
        .bearer_auth(ga.token("alice", "phone"))
        .header("content-type", "image/png")
        .body(bytes[..100_000].to_vec())
        .send()
        .await
        .unwrap();
    let (status, body) = status_and_json(sized).await;
    assert_eq!(
        (status, body["size"].as_u64()),
        (201, Some(100_000)),
        "{body}"
    );

    // A signed URL, asked through ga, downloads through gb without a token.
    let (status, signed) = status_and_json(
        media_get(
            &ga,
            &format!("{path}/url"),
            Some(ga.token("alice", "phone")),
            &[],
        )
        .await,
    )
    .await;
    assert_eq!(status, 200, "{signed}");
    let url = signed["url"].as_str().unwrap();
    let by_url = media_get(&gb, url, None, &[("range", "bytes=-5")]).await;
    assert_eq!(by_url.status().as_u16(), 206);
    assert_eq!(by_url.bytes().await.unwrap(), bytes[bytes.len() - 5..]);

    // The media node stops: it leaves the registry, and media requests get `unavailable`.
    let mut media_node = internal.pop().unwrap();
    media_node.signal(libc::SIGTERM);
    media_node.child.wait().unwrap();
    until("the media node has left the registry", || async {
        registry(&internal[0])
            .await
            .iter()
            .any(|(id, _, live)| id == "m1" && !live)
    })
    .await;
    let (status, body) = upload_streamed(&ga, "alice", b"after the media node").await;
    assert_eq!(
        (status, body["code"].as_str()),
        (503, Some("unavailable")),
        "{body}"
    );
    assert_eq!(body["message"], "no media node is running; retry shortly");
    let (status, body) = status_and_json(media_get(&gb, &path, Some(bob), &[]).await).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (503, Some("unavailable")),
        "{body}"
    );
}

/// A node without a client port running the push role alone: a gateway node without push
/// answers device registrations `unavailable` while no push node is live, then accepts them
/// for the providers the push node registered (and refuses the others, as `courier serve`
/// does), and a message to a device that is not connected reaches it through the push node's
/// webhook. The push node looks at every shard only once a minute
/// here (a long lease): the chat node's notice of the commit is what makes it push in time.
#[tokio::test(flavor = "multi_thread")]
async fn a_push_node_alone_notifies_devices_registered_through_a_gateway_without_push() {
    let (hook, notified) = {
        let (tx, rx) = tokio::sync::mpsc::channel::<serde_json::Value>(16);
        let app = axum::Router::new().fallback(move |body: axum::body::Bytes| {
            let tx = tx.clone();
            async move {
                let _ = tx
                    .send(serde_json::from_slice(&body).unwrap_or_default())
                    .await;
                "ok"
            }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        (addr, rx)
    };
    let mut notified = notified;
    let (dir, store) = store_node();
    let hook_url = format!("http://{hook}/hook");
    let push_args = [
        "--push-webhook-url",
        hook_url.as_str(),
        "--push-webhook-secret",
        "s3cret",
        "--push-collapse",
        "0ms",
        "--shard-lease",
        "180s",
    ];
    let _internal = [
        InternalNode::start("s1", "127.0.0.2", &store, dir.path()),
        InternalNode::start_in(&[], "fanout", "f1", "127.0.0.3", &store, dir.path()),
    ];
    let ga_dir = tempfile::tempdir().unwrap();
    let ga = gateway_node(&store, ga_dir.path(), "ga", "gateway,chat,media", &[]);

    let register = |provider: &'static str| {
        let http = ga.http("bob", "phone");
        async move {
            let body = serde_json::json!({ "provider": provider, "token": "tok-bob" });
            http.request(reqwest::Method::PUT, "/v1/devices/me/push", Some(&body))
                .await
                .unwrap()
        }
    };
    // No push node yet: retry later, not a bad request; an unknown provider is still one.
    let (status, body) = register("webhook").await;
    assert_eq!(
        (status, body["code"].as_str()),
        (503, Some("unavailable")),
        "{body}"
    );
    assert_eq!(body["message"], "no push node is running; try again later");
    let (status, body) = register("pigeon").await;
    assert_eq!(
        (status, body["code"].as_str()),
        (400, Some("bad_request")),
        "{body}"
    );

    let _push = InternalNode::start_with(
        &[],
        "push",
        "p1",
        "127.0.0.4",
        &store,
        dir.path(),
        &push_args,
    );
    let (status, body) = register("webhook").await;
    assert_eq!(status, 204, "{body}");
    let (status, body) = register("fcm").await;
    assert_eq!((status, body["code"].as_str()), (400, Some("bad_request")));
    assert_eq!(
        body["message"],
        "this server has no fcm push provider configured"
    );

    let mut alice = ga.connect("alice", "phone").await;
    alice.events_until_sync_done().await.unwrap();
    let seq = send_until_sent(&mut alice, "bob", "while bob is away", None).await;
    let notification = tokio::time::timeout(WAIT, notified.recv())
        .await
        .expect("a notification in time")
        .unwrap();
    assert_eq!(notification["device_token"], "tok-bob", "{notification}");
    assert_eq!(notification["seq"], seq, "{notification}");
}

/// Two store nodes as two storage partitions: shards 0-3 on the first (which also holds the
/// directory), 4-7 on the second (`docs/decisions/0005-storage-partitions.md`).
struct PartitionedStores {
    nodes: [StoreNode; 2],
    table: PathBuf,
}

impl PartitionedStores {
    fn start(dir: &Path) -> PartitionedStores {
        let token_file = dir.join("cluster-token");
        std::fs::write(&token_file, TOKEN).unwrap();
        let nodes = ["store-a", "store-b"]
            .map(|name| StoreNode::start(&dir.join(name), &token_file, "127.0.0.1:0"));
        let table = dir.join("partitions.json");
        let json = serde_json::json!({ "partitions": [
            { "shards": [0, 3], "store_address": nodes[0].url() },
            { "shards": [4, 7], "store_address": nodes[1].url() },
        ]});
        std::fs::write(&table, json.to_string()).unwrap();
        PartitionedStores { nodes, table }
    }

    /// The partition of `shard`.
    fn partition_of(shard: u32) -> usize {
        usize::from(shard >= 4)
    }

    /// How many events of `conv` the store node of `partition` holds.
    async fn stored_events(&self, partition: usize, conv: &str) -> usize {
        use courier_store::KvEngine;
        let token = ClusterToken::new(TOKEN).unwrap();
        let engine = courier_rpc::RemoteEngine::connect(&self.nodes[partition].url(), token)
            .await
            .unwrap();
        let keys = courier_store::Keys::new(b"");
        engine
            .range(keys.events(conv, 1, u64::MAX), usize::MAX, false)
            .await
            .unwrap()
            .len()
    }
}

impl ClusterStore for PartitionedStores {
    fn args(&self) -> Vec<String> {
        vec![
            "--store".into(),
            "remote".into(),
            "--storage-partitions".into(),
            self.table.display().to_string(),
            "--cluster-token-file".into(),
            self.nodes[0].token_file.display().to_string(),
        ]
    }
}

/// Runs `courier serve` with `store_args` (and the test's shard count), which must refuse to
/// start; returns its error output.
fn refused_start(store_args: &[String]) -> String {
    let server_dir = tempfile::tempdir().unwrap();
    let output = Command::new(binary())
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--shards",
            SHARDS,
            "--data-dir",
        ])
        .arg(server_dir.path())
        .args(store_args)
        .output()
        .expect("run courier serve");
    assert!(!output.status.success());
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[tokio::test]
async fn a_node_whose_partition_table_does_not_fit_the_store_does_not_start() {
    let dir = tempfile::tempdir().unwrap();
    let stores = PartitionedStores::start(dir.path());
    // The store is created with the table: shards 0-3 on store-a, 4-7 on store-b.
    let mut args = stores.args();
    args.extend(["--shards".into(), SHARDS.into()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    drop(Server::start_in(&dir.path().join("created"), &args));

    let [a, b] = [stores.nodes[0].url(), stores.nodes[1].url()];
    let entry = |first: u32, last: u32, address: &str| serde_json::json!({ "shards": [first, last], "store_address": address });
    let cases = [
        (
            [entry(0, 2, &a), entry(4, 7, &b)],
            "shards 3..4 have no partition",
        ),
        (
            [entry(0, 3, &a), entry(4, 8, &b)],
            "beyond the last shard (7) of 8",
        ),
        ([entry(0, 3, &a), entry(4, 7, &a)], "name the same store"),
        (
            [entry(0, 3, &b), entry(4, 7, &a)],
            "the store given for partition 0 holds partition 1 of this store",
        ),
        (
            [entry(0, 4, &a), entry(5, 7, &b)],
            "created with the storage partitions 0-3,4-7, not 0-4,5-7",
        ),
    ];
    let other = dir.path().join("other.json");
    for (entries, error) in cases {
        std::fs::write(
            &other,
            serde_json::json!({ "partitions": entries }).to_string(),
        )
        .unwrap();
        let mut args = stores.args();
        args[3] = other.display().to_string();
        let stderr = refused_start(&args);
        assert!(stderr.contains(error), "expected {error:?}: {stderr}");
    }
    // Either store node alone, without the table, is not the store.
    for (node, error) in [
        (
            &stores.nodes[0],
            "created with storage partitions (shards 0-3,4-7)",
        ),
        (
            &stores.nodes[1],
            "is partition 1 of a store with storage partitions",
        ),
    ] {
        let stderr = refused_start(&node.args());
        assert!(stderr.contains(error), "expected {error:?}: {stderr}");
    }
}

/// Every message of each of `user`'s conversations in `convs`, as its catch-up on a fresh
/// connection has them, `(client_msg_id, seq)` in order; every event of a conversation
/// comes in strictly increasing seq.
async fn caught_up(
    front: &Server,
    user: &str,
    convs: &[String],
) -> BTreeMap<String, Vec<(String, u64)>> {
    let mut reader = front.connect(user, "tablet").await;
    let events = reader.events_until_sync_done().await.unwrap();
    let mut last_seq: BTreeMap<String, u64> = BTreeMap::new();
    let mut messages: BTreeMap<String, Vec<(String, u64)>> =
        convs.iter().map(|c| (c.clone(), Vec::new())).collect();
    for event in events {
        let last = last_seq.entry(event.conversation_id.clone()).or_default();
        assert!(event.seq > *last, "{user}: {event:?} after seq {last}");
        *last = event.seq;
        if let (Some(list), EventPayload::Message { client_msg_id, .. }) =
            (messages.get_mut(&event.conversation_id), event.payload)
        {
            list.push((client_msg_id, event.seq));
        }
    }
    messages
}

#[tokio::test]
async fn two_storage_partitions_keep_their_shards_and_lose_nothing_across_a_failover() {
    let dir = tempfile::tempdir().unwrap();
    let stores = PartitionedStores::start(dir.path());
    let mut first = InternalNode::start("s1", "127.0.0.2", &stores, dir.path());
    let _second = InternalNode::start("s2", "127.0.0.3", &stores, dir.path());
    let front_dir = tempfile::tempdir().unwrap();
    let front = front_node(&stores, front_dir.path());
    let shard_of = ShardOf::new().await;

    // Direct conversations on shards of both partitions.
    let peers: Vec<String> = (0..6).map(|i| format!("bob{i}")).collect();
    let partitions: BTreeSet<usize> = peers
        .iter()
        .map(|p| PartitionedStores::partition_of(shard_of.direct("alice", p)))
        .collect();
    assert_eq!(
        partitions.len(),
        2,
        "the peers' conversations use both partitions"
    );
    let mut alice = front.connect("alice", "phone").await;
    alice.events_until_sync_done().await.unwrap();
    let mut sent: Vec<Vec<(String, u64)>> = vec![Vec::new(); peers.len()];

    // Groups until both partitions hold one (their ids are the server's).
    let http = front.http("alice", "phone");
    let mut groups: Vec<String> = Vec::new();
    let mut group_partitions = BTreeSet::new();
    while group_partitions.len() < 2 {
        assert!(groups.len() < 32, "32 groups in one partition");
        let conv = http
            .create_group("g", &users(&["carol", "dave"]))
            .await
            .unwrap();
        group_partitions.insert(PartitionedStores::partition_of(
            shard_of.store.shard_of(&conv),
        ));
        groups.push(conv);
    }
    let mut group_sent: BTreeMap<String, Vec<(String, u64)>> = BTreeMap::new();
    let mut send_to_groups = async |alice: &mut courier_client::Client, step: &str| {
        for conv in &groups {
            let id = format!("{step}-{conv}");
            let target = Target::Conversation(conv.clone());
            let seq = send_until_taken(alice, target, &id, Some(&front)).await;
            group_sent.entry(conv.clone()).or_default().push((id, seq));
        }
    };

    send_round(&front, &mut alice, &peers, 1, &mut sent).await;
    send_to_groups(&mut alice, "before").await;
    // erin joins every group, then the owner of every shard (of both partitions) dies.
    for conv in &groups {
        http.add_members(conv, &users(&["erin"])).await.unwrap();
    }
    first.kill9();
    send_round(&front, &mut alice, &peers, 2, &mut sent).await;
    send_to_groups(&mut alice, "joined").await;
    for conv in &groups {
        http.remove_member(conv, "dave").await.unwrap();
    }
    send_round(&front, &mut alice, &peers, 3, &mut sent).await;
    send_to_groups(&mut alice, "left").await;

    check_history(&front, &peers, &sent).await;
    // Each member reads exactly the messages of its periods of membership, in order.
    let during = |steps: &[&str]| -> BTreeMap<String, Vec<(String, u64)>> {
        group_sent
            .iter()
            .map(|(conv, sent)| {
                let kept = sent
                    .iter()
                    .filter(|(id, _)| steps.iter().any(|s| id.starts_with(s)))
                    .cloned()
                    .collect();
                (conv.clone(), kept)
            })
            .collect()
    };
    let all = during(&["before", "joined", "left"]);
    assert_eq!(caught_up(&front, "carol", &groups).await, all);
    assert_eq!(
        caught_up(&front, "erin", &groups).await,
        during(&["joined", "left"])
    );
    assert_eq!(
        caught_up(&front, "dave", &groups).await,
        during(&["before", "joined"])
    );

    // Each conversation's events are in its shard's partition, and only there.
    let direct: Vec<String> = peers
        .iter()
        .map(|p| courier_chat::direct_conversation_id("alice", p))
        .collect();
    for conv in direct.iter().chain(&groups) {
        let home = PartitionedStores::partition_of(shard_of.store.shard_of(conv));
        let events = stores.stored_events(home, conv).await;
        assert!(events >= 3, "{conv}: {events} events in partition {home}");
        assert_eq!(
            stores.stored_events(1 - home, conv).await,
            0,
            "{conv} has nothing in partition {}",
            1 - home
        );
    }
}

/// The frames `client` has been written up to the answer to a ping it sends now (a connection
/// writes what is queued on it before it reads the next frame), but for `sync_done` and pongs.
async fn frames_until_pong(
    client: &mut courier_client::Client,
) -> Vec<courier_client::proto::ServerFrame> {
    use courier_client::proto::{ClientFrame, Ping, ServerFrame};
    client
        .send_frame(&ClientFrame::Ping(Ping {
            reference: Some(-1),
        }))
        .await
        .unwrap();
    let mut frames = Vec::new();
    loop {
        match client.next_frame_within(WAIT).await.unwrap() {
            ServerFrame::Pong(pong) if pong.reference == Some(-1) => return frames,
            ServerFrame::Pong(_) | ServerFrame::SyncDone(_) => {}
            frame => frames.push(frame),
        }
    }
}

/// The seqs of `conv` that `user` reads through `gateway` on every path: a new device's
/// catch-up, `fetch` and the HTTP messages endpoint (each checked to agree), and the
/// `head_seq` they answer.
async fn read_through(gateway: &Server, user: &str, device: &str, conv: &str) -> Vec<u64> {
    let mut client = gateway.connect(user, device).await;
    let caught_up: Vec<u64> = client
        .events_until_sync_done()
        .await
        .unwrap()
        .into_iter()
        .filter(|e| e.conversation_id == conv)
        .map(|e| e.seq)
        .collect();
    let page = client.fetch(conv, 0, None).await.unwrap();
    let fetched: Vec<u64> = page.events.iter().map(|e| e.seq).collect();
    let (status, body) = gateway
        .http(user, device)
        .get(&format!("/v1/conversations/{conv}/messages"))
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    let listed: Vec<u64> = body["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(caught_up, fetched, "{user}'s catch-up and fetch");
    assert_eq!(fetched, listed, "{user}'s fetch and HTTP messages");
    assert_eq!(body["head_seq"], page.head_seq, "{user}'s head_seq");
    fetched
}

/// The membership rule across nodes, in the operator's layout (gateway nodes without chat, two
/// chat nodes): a change made through one gateway decides every read, live event, receipt and
/// typing notice through the other. Bob, removed, gets nothing past his removal and may no
/// longer ack, type or send there; his device that was offline catches up to the removal and
/// no further; dave, added later, reads from his `member_added` on; bob, added back, reads his
/// two periods and not the time between.
#[tokio::test]
async fn a_membership_change_through_one_gateway_rules_every_read_through_the_other() {
    use courier_client::ClientError;
    use courier_client::proto::{AckKind, ErrorCode, ServerFrame};
    let (dir, store) = store_node();
    let (_internal, _dirs, ga, gb) = cluster_with_chat_nodes(&store, dir.path(), &[]);
    let admin = ga.http("alice", "phone");
    let conv = admin
        .create_group("g", &users(&["bob", "carol"]))
        .await
        .unwrap();
    let group = Target::Conversation(conv.clone());
    let mut alice = ga.connect("alice", "phone").await;
    // Alice's tablet on gb: a receipt or typing notice offered to bob is in the same call to gb.
    let mut tablet = gb.connect("alice", "tablet").await;
    let mut bob = gb.connect("bob", "phone").await;
    let mut carol = gb.connect("carol", "phone").await;
    for client in [&mut alice, &mut tablet, &mut bob, &mut carol] {
        client.events_until_sync_done().await.unwrap();
    }

    send_until_taken(&mut alice, group.clone(), "before", None).await;
    admin.remove_member(&conv, "bob").await.unwrap();
    let after = send_until_taken(&mut alice, group.clone(), "after", None).await;
    let removal = after - 1;
    while next_event(&mut carol).await.seq < after {}
    carol.ack(&conv, after, AckKind::Read).await.unwrap();
    carol.typing(&conv, true).await.unwrap();
    for frame in ["receipt", "typing"] {
        next_frame_where(&mut tablet, |f| match f {
            ServerFrame::Receipt(r) if r.user == "carol" && frame == "receipt" => Some(()),
            ServerFrame::Typing(t) if t.user == "carol" && frame == "typing" => Some(()),
            _ => None,
        })
        .await;
    }
    let mut live = Vec::new();
    while live.last() != Some(&removal) {
        live.push(next_event(&mut bob).await.seq);
    }
    assert_eq!(live, (2..=removal).collect::<Vec<_>>(), "bob's live events");
    assert_eq!(
        frames_until_pong(&mut bob).await,
        [],
        "bob got frames of the group after his removal"
    );

    // Bob may no longer ack past his removal, type or send there (each refused).
    bob.ack(&conv, after, AckKind::Read).await.unwrap();
    bob.typing(&conv, true).await.unwrap();
    let refused: Vec<ErrorCode> = frames_until_pong(&mut bob)
        .await
        .into_iter()
        .map(|frame| match frame {
            ServerFrame::Error(e) => e.code,
            other => panic!("bob got {other:?}"),
        })
        .collect();
    assert_eq!(refused, [ErrorCode::Forbidden, ErrorCode::Forbidden]);
    match bob.send_text(group.clone(), "late", "x").await {
        Err(ClientError::Server(e)) => assert_eq!(e.code, ErrorCode::Forbidden),
        other => panic!("bob's send after his removal: {other:?}"),
    }
    let (status, body) = gb
        .http("bob", "phone")
        .get(&format!("/v1/conversations/{conv}/receipts"))
        .await
        .unwrap();
    assert_eq!(status, 403, "{body}");

    // Bob's laptop, offline during the removal, catches up to it and no further.
    assert_eq!(
        read_through(&gb, "bob", "laptop", &conv).await,
        (1..=removal).collect::<Vec<_>>()
    );

    // Dave, added later, reads from his `member_added` on.
    admin.add_members(&conv, &users(&["dave"])).await.unwrap();
    let dave_joined = after + 1;
    assert_eq!(
        read_through(&gb, "dave", "phone", &conv).await,
        [dave_joined]
    );

    // Bob, added back, reads his two periods and not the time between.
    admin.add_members(&conv, &users(&["bob"])).await.unwrap();
    let back = send_until_taken(&mut alice, group.clone(), "back", None).await;
    let mut expected: Vec<u64> = (1..=removal).collect();
    expected.extend([back - 1, back]);
    assert_eq!(read_through(&gb, "bob", "desktop", &conv).await, expected);
}
