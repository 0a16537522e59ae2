//! The store node over a real TCP socket on 127.0.0.1 (ephemeral port): the engine contract
//! through a `RemoteEngine`, the cluster token, errors and unknown outcomes across the network,
//! and message sizes from the engine's limits.
//!
//! No sleeps: every wait is on a condition, with a deadline.

use async_trait::async_trait;
use courier_rpc::proto::kv_store_client::KvStoreClient;
use courier_rpc::proto::{CommitRequest, GetRequest};
use courier_rpc::status::{self, Call};
use courier_rpc::{
    ClusterToken, RemoteEngine, ServeError, serve_store_node, serve_store_node_with,
};
use courier_store::contract::{self, EngineHarness};
use courier_store::embedded::EmbeddedEngine;
use courier_store::kv::{BatchLimits, CommitStamp, KeyValue};
use courier_store::{Batch, KvEngine, StoreError};
use std::future::Future;
use std::net::SocketAddr;
use std::ops::Range;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio::sync::{Notify, oneshot};
use tokio::task::{JoinHandle, JoinSet};
use tonic::Code;

const TOKEN: &str = "courier-test-cluster-token-0123456789abcdef";
const OTHER_TOKEN: &str = "courier-test-other-token-0123456789abcdef";
/// Longest wait for any condition in these tests.
const DEADLINE: Duration = Duration::from_secs(30);

fn token() -> ClusterToken {
    ClusterToken::new(TOKEN).unwrap()
}

/// Polls `check` until it yields a value, failing the test after [`DEADLINE`].
async fn eventually<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + DEADLINE;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::task::yield_now().await;
    }
}

/// A store node running in a task of this process.
struct Node {
    address: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), ServeError>>,
}

impl Node {
    async fn start(engine: Arc<dyn KvEngine>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        Self::start_on(engine, listener)
    }

    fn start_on(engine: Arc<dyn KvEngine>, listener: TcpListener) -> Self {
        let address = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(serve_store_node(engine, listener, token(), async {
            let _ = stopped.await;
        }));
        Self {
            address,
            stop: Some(stop),
            task,
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.address)
    }

    async fn remote(&self) -> RemoteEngine {
        RemoteEngine::connect(&self.url(), token()).await.unwrap()
    }

    /// Graceful stop: answers what is in flight, then returns.
    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        self.task.await.unwrap().unwrap();
    }

    /// Aborts the server's task: the listener closes at once, and its open connections (whose
    /// tasks see their server gone) are told to go away. A restart, not a crash of the
    /// process: `tests/store_node_crash.rs` kills a store node process with SIGKILL.
    async fn kill(self) {
        self.task.abort();
        assert!(self.task.await.unwrap_err().is_cancelled());
    }
}

/// Opens the embedded store at `path`, waiting (with a deadline) for a previous engine on the
/// same directory to release it: its writer thread stops once its last handle is dropped.
async fn open_embedded(path: &Path) -> Arc<dyn KvEngine> {
    eventually("the previous engine to release the store", || async {
        EmbeddedEngine::open(path)
            .ok()
            .map(|e| Arc::new(e) as Arc<dyn KvEngine>)
    })
    .await
}

/// Binds `address` again after its previous listener was dropped.
async fn rebind(address: SocketAddr) -> TcpListener {
    eventually("the port to be free again", || async {
        TcpListener::bind(address).await.ok()
    })
    .await
}

/// The contract's engine: a `RemoteEngine` talking to a store node backed by an embedded
/// engine in a temporary directory. A reopen after a crash aborts the node's server and starts
/// a new one, on the same port and the same data directory (as the embedded engine's own
/// harness, a reopen rather than a crash: see `tests/store_node_crash.rs` for a SIGKILL).
struct StoreNodeHarness {
    dir: tempfile::TempDir,
    node: Option<Node>,
}

impl StoreNodeHarness {
    fn path(&self) -> std::path::PathBuf {
        self.dir.path().join("store")
    }
}

#[async_trait]
impl EngineHarness for StoreNodeHarness {
    async fn open(&mut self) -> Arc<dyn KvEngine> {
        let node = Node::start(open_embedded(&self.path()).await).await;
        let remote = node.remote().await;
        self.node = Some(node);
        Arc::new(remote)
    }

    async fn reopen_after_crash(&mut self, engine: Arc<dyn KvEngine>) -> Arc<dyn KvEngine> {
        drop(engine);
        let node = self.node.take().unwrap();
        let address = node.address;
        node.kill().await;
        let engine = open_embedded(&self.path()).await;
        let node = Node::start_on(engine, rebind(address).await);
        let remote = node.remote().await;
        self.node = Some(node);
        Arc::new(remote)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_engine_passes_the_contract() {
    let mut harness = StoreNodeHarness {
        dir: tempfile::tempdir().unwrap(),
        node: None,
    };
    contract::run_all(&mut harness).await;
    harness.node.take().unwrap().stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remote_engine_reconnects_after_the_node_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store");
    let node = Node::start(open_embedded(&path).await).await;
    let address = node.address;
    let remote = node.remote().await;
    let mut batch = Batch::new();
    batch.set(b"k".to_vec(), b"before".to_vec());
    let before = remote.commit(batch).await.unwrap();

    node.kill().await;
    let node = Node::start_on(open_embedded(&path).await, rebind(address).await);

    let value = eventually("the same RemoteEngine to read again", || async {
        remote.get(b"k").await.ok()
    })
    .await;
    assert_eq!(value.as_deref(), Some(&b"before"[..]));
    let mut batch = Batch::new();
    batch.set(b"k".to_vec(), b"after".to_vec());
    assert!(remote.commit(batch).await.unwrap() > before);
    node.stop().await;
}

// ---- the cluster token ----

#[tokio::test]
async fn calls_without_the_token_or_with_another_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(open_embedded(&dir.path().join("store")).await).await;

    // No token at all: a plain client.
    let mut bare = KvStoreClient::connect(node.url()).await.unwrap();
    let refused = bare
        .get(GetRequest { key: b"k".to_vec() })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated);
    let mut commit = CommitRequest::default();
    commit.mutations.push(courier_rpc::proto::Mutation {
        kind: Some(courier_rpc::proto::mutation::Kind::Set(
            courier_rpc::proto::Set {
                key: b"k".to_vec(),
                value: b"intruder".to_vec(),
            },
        )),
    });
    let refused = bare.commit(commit.clone()).await.unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated);
    // Refused before any handler ran: a known outcome, not an unknown one.
    assert!(matches!(
        status::store_error(&refused, Call::Commit),
        StoreError::Engine(_)
    ));

    // Another cluster's token.
    let other = ClusterToken::new(OTHER_TOKEN).unwrap();
    let error = RemoteEngine::connect(&node.url(), other).await.unwrap_err();
    assert!(
        matches!(&error, StoreError::Engine(text) if text.contains("Unauthenticated")),
        "{error:?}"
    );
    let channel = tonic::transport::Endpoint::from_shared(node.url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let other = ClusterToken::new(OTHER_TOKEN).unwrap();
    let mut forged =
        KvStoreClient::with_interceptor(channel, courier_rpc::auth::AttachToken::new(other));
    assert_eq!(
        forged.commit(commit).await.unwrap_err().code(),
        Code::Unauthenticated
    );

    // The right token works, and nothing the refused calls sent was written.
    let remote = node.remote().await;
    assert_eq!(remote.get(b"k").await.unwrap(), None);
    node.stop().await;
}

// ---- errors and unknown outcomes across the network ----

/// An engine that answers every call with the error it is given.
struct Failing(Mutex<StoreError>);

#[async_trait]
impl KvEngine for Failing {
    async fn get(&self, _: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        Err(self.0.lock().unwrap().clone())
    }
    async fn range(
        &self,
        _: Range<Vec<u8>>,
        _: usize,
        _: bool,
    ) -> Result<Vec<KeyValue>, StoreError> {
        Err(self.0.lock().unwrap().clone())
    }
    async fn commit(&self, _: Batch) -> Result<CommitStamp, StoreError> {
        Err(self.0.lock().unwrap().clone())
    }
    fn limits(&self) -> BatchLimits {
        courier_store::embedded::LIMITS
    }
}

#[tokio::test]
async fn every_store_error_crosses_the_network_as_itself() {
    let failing = Arc::new(Failing(Mutex::new(StoreError::MaybeCommitted)));
    let node = Node::start(failing.clone()).await;
    let remote = node.remote().await;
    let errors = [
        // The largest key an engine accepts: the detail must fit the trailers.
        StoreError::FenceChanged {
            key: vec![0xab; courier_store::embedded::MAX_KEY_BYTES],
        },
        StoreError::MaybeCommitted,
        StoreError::Overloaded("throttled".into()),
        StoreError::TooLarge("a batch is limited to 16777216 bytes".into()),
        StoreError::Corrupt {
            key: vec![0, 0xff],
            reason: "bad varint".into(),
        },
        // The largest detail: a key at the limit and the longest text carried (past hyper's
        // default 16 KiB of trailers).
        StoreError::Corrupt {
            key: vec![0xcd; courier_store::embedded::MAX_KEY_BYTES],
            reason: "r".repeat(courier_rpc::status::MAX_REASON_BYTES),
        },
        StoreError::Engine("I/O error".into()),
        StoreError::Halted("disk full".into()),
    ];
    for error in errors {
        *failing.0.lock().unwrap() = error.clone();
        let expected = format!("{error:?}");
        let mut batch = Batch::new();
        batch.set(b"k".to_vec(), b"v".to_vec());
        assert_eq!(
            format!("{:?}", remote.commit(batch).await.unwrap_err()),
            expected
        );
        assert_eq!(
            format!("{:?}", remote.get(b"k").await.unwrap_err()),
            expected
        );
        assert_eq!(
            format!(
                "{:?}",
                remote
                    .range(b"a".to_vec()..b"z".to_vec(), 10, false)
                    .await
                    .unwrap_err()
            ),
            expected
        );
    }
    node.stop().await;
}

/// An engine whose halt can be set, over a working embedded engine.
struct Haltable {
    inner: Arc<dyn KvEngine>,
    halted: Mutex<Option<String>>,
}

#[async_trait]
impl KvEngine for Haltable {
    fn halted(&self) -> Option<String> {
        self.halted.lock().unwrap().clone()
    }
    async fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        self.inner.get(key).await
    }
    async fn range(
        &self,
        range: Range<Vec<u8>>,
        limit: usize,
        reverse: bool,
    ) -> Result<Vec<KeyValue>, StoreError> {
        self.inner.range(range, limit, reverse).await
    }
    async fn commit(&self, batch: Batch) -> Result<CommitStamp, StoreError> {
        match self.halted() {
            Some(reason) => Err(StoreError::Halted(reason)),
            None => self.inner.commit(batch).await,
        }
    }
    fn limits(&self) -> BatchLimits {
        self.inner.limits()
    }
}

#[tokio::test]
async fn a_halted_node_is_reported_as_halted() {
    let dir = tempfile::tempdir().unwrap();
    let engine = Arc::new(Haltable {
        inner: open_embedded(&dir.path().join("store")).await,
        halted: Mutex::new(None),
    });
    let node = Node::start(engine.clone()).await;
    let remote = node.remote().await;
    assert_eq!(remote.halted(), None);
    assert_eq!(remote.health().await.unwrap(), None);

    *engine.halted.lock().unwrap() = Some("disk full".into());
    assert_eq!(remote.health().await.unwrap().as_deref(), Some("disk full"));
    assert_eq!(remote.halted().as_deref(), Some("disk full"));

    // A restarted (healthy) node clears it with its first successful commit.
    *engine.halted.lock().unwrap() = None;
    let mut batch = Batch::new();
    batch.set(b"k".to_vec(), Vec::new());
    remote.commit(batch.clone()).await.unwrap();
    assert_eq!(remote.halted(), None);

    // A commit answered Halted sets it, without a health call.
    *engine.halted.lock().unwrap() = Some("I/O error".into());
    assert!(matches!(
        remote.commit(batch).await,
        Err(StoreError::Halted(reason)) if reason == "I/O error"
    ));
    assert_eq!(remote.halted().as_deref(), Some("I/O error"));
    node.stop().await;
}

/// An embedded engine whose commits, once applied, wait for `release` before answering, and
/// whose reads of keys under `stall/` wait likewise: to lose an answer on purpose.
struct Stalling {
    inner: Arc<dyn KvEngine>,
    entered: Notify,
    release: Notify,
}

#[async_trait]
impl KvEngine for Stalling {
    async fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        if key.starts_with(b"stall/") {
            self.entered.notify_one();
            self.release.notified().await;
        }
        self.inner.get(key).await
    }
    async fn range(
        &self,
        range: Range<Vec<u8>>,
        limit: usize,
        reverse: bool,
    ) -> Result<Vec<KeyValue>, StoreError> {
        self.inner.range(range, limit, reverse).await
    }
    async fn commit(&self, batch: Batch) -> Result<CommitStamp, StoreError> {
        let stamp = self.inner.commit(batch).await?;
        self.entered.notify_one();
        self.release.notified().await;
        Ok(stamp)
    }
    fn limits(&self) -> BatchLimits {
        self.inner.limits()
    }
}

/// A TCP proxy whose connections can be cut at once, as by a network failure.
struct Proxy {
    address: SocketAddr,
    accept: JoinHandle<()>,
    links: Arc<Mutex<JoinSet<()>>>,
}

impl Proxy {
    async fn start(target: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let links = Arc::new(Mutex::new(JoinSet::new()));
        let accepted = links.clone();
        let accept = tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                accepted.lock().unwrap().spawn(async move {
                    if let Ok(mut server) = tokio::net::TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                });
            }
        });
        Self {
            address,
            accept,
            links,
        }
    }

    /// Closes every connection through the proxy and accepts no more.
    fn cut(&self) {
        self.accept.abort();
        self.links.lock().unwrap().abort_all();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_whose_answer_is_lost_is_maybe_committed() {
    let dir = tempfile::tempdir().unwrap();
    let engine = Arc::new(Stalling {
        inner: open_embedded(&dir.path().join("store")).await,
        entered: Notify::new(),
        release: Notify::new(),
    });
    let node = Node::start(engine.clone()).await;
    let proxy = Proxy::start(node.address).await;
    let remote = RemoteEngine::connect(&format!("http://{}", proxy.address), token())
        .await
        .unwrap();

    let mut batch = Batch::new();
    batch.set(b"landed".to_vec(), b"yes".to_vec());
    let commit = tokio::spawn(async move { remote.commit(batch).await });
    tokio::time::timeout(DEADLINE, engine.entered.notified())
        .await
        .expect("the commit reaches the engine");
    proxy.cut();
    let outcome = tokio::time::timeout(DEADLINE, commit)
        .await
        .expect("the commit returns once its connection is cut")
        .unwrap();
    assert!(
        matches!(outcome, Err(StoreError::MaybeCommitted)),
        "{outcome:?}"
    );
    // And it did land: why "failed" would have been a lie.
    let direct = node.remote().await;
    assert_eq!(
        direct.get(b"landed").await.unwrap().as_deref(),
        Some(&b"yes"[..])
    );
    engine.release.notify_waiters();
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_whose_answer_is_lost_is_an_engine_error() {
    let dir = tempfile::tempdir().unwrap();
    let engine = Arc::new(Stalling {
        inner: open_embedded(&dir.path().join("store")).await,
        entered: Notify::new(),
        release: Notify::new(),
    });
    let node = Node::start(engine.clone()).await;
    let proxy = Proxy::start(node.address).await;
    let remote = RemoteEngine::connect(&format!("http://{}", proxy.address), token())
        .await
        .unwrap();
    let read = tokio::spawn(async move { remote.get(b"stall/k").await });
    tokio::time::timeout(DEADLINE, engine.entered.notified())
        .await
        .expect("the read reaches the engine");
    proxy.cut();
    let outcome = tokio::time::timeout(DEADLINE, read).await.unwrap().unwrap();
    assert!(matches!(outcome, Err(StoreError::Engine(_))), "{outcome:?}");
    engine.release.notify_waiters();
    node.stop().await;
}

#[tokio::test]
async fn an_unreachable_node_fails_reads_and_makes_commits_unknown() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(open_embedded(&dir.path().join("store")).await).await;
    let remote = node.remote().await;
    node.stop().await;
    assert!(matches!(remote.get(b"k").await, Err(StoreError::Engine(_))));
    assert!(matches!(
        remote.range(b"a".to_vec()..b"b".to_vec(), 1, false).await,
        Err(StoreError::Engine(_))
    ));
    let mut batch = Batch::new();
    batch.set(b"k".to_vec(), b"v".to_vec());
    assert!(matches!(
        remote.commit(batch).await,
        Err(StoreError::MaybeCommitted)
    ));
}

// ---- limits and message sizes ----

/// An embedded engine announcing other limits (the service sizes its messages from them).
struct WithLimits {
    inner: Arc<dyn KvEngine>,
    limits: BatchLimits,
    commits: AtomicUsize,
}

#[async_trait]
impl KvEngine for WithLimits {
    async fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        self.inner.get(key).await
    }
    async fn range(
        &self,
        range: Range<Vec<u8>>,
        limit: usize,
        reverse: bool,
    ) -> Result<Vec<KeyValue>, StoreError> {
        self.inner.range(range, limit, reverse).await
    }
    async fn commit(&self, batch: Batch) -> Result<CommitStamp, StoreError> {
        self.commits.fetch_add(1, Ordering::SeqCst);
        self.inner.commit(batch).await
    }
    fn limits(&self) -> BatchLimits {
        self.limits
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_largest_batch_the_engine_takes_crosses_the_network() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(open_embedded(&dir.path().join("store")).await).await;
    let remote = node.remote().await;
    assert_eq!(remote.limits(), courier_store::embedded::LIMITS);

    // Full values up to the batch limit: four times tonic's default 4 MiB message limit.
    let limits = remote.limits();
    let key = |i: usize| format!("big/{i:04}").into_bytes();
    let per_pair = limits.max_value_bytes + key(0).len();
    let count = limits.max_batch_bytes / per_pair;
    let mut batch = Batch::new();
    for i in 0..count {
        batch.set(key(i), vec![i as u8; limits.max_value_bytes]);
    }
    assert!(batch.approximate_size() > 4 << 20);
    remote.commit(batch).await.unwrap();
    let rows = remote
        .range(b"big/".to_vec()..b"big0".to_vec(), usize::MAX, false)
        .await
        .unwrap();
    assert_eq!(rows.len(), count);
    assert!(
        rows.iter()
            .enumerate()
            .all(|(i, (k, v))| *k == key(i) && v[0] == i as u8)
    );

    // One pair more than the engine takes: refused as the engine refuses it.
    let mut over = Batch::new();
    for i in 0..=count {
        over.set(key(i), vec![0; limits.max_value_bytes]);
    }
    assert!(matches!(
        remote.commit(over).await,
        Err(StoreError::TooLarge(_))
    ));
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_come_from_the_engine_and_bound_every_message() {
    let dir = tempfile::tempdir().unwrap();
    let small = BatchLimits {
        max_key_bytes: 100,
        max_value_bytes: 1000,
        max_batch_bytes: 10_000,
    };
    let engine = Arc::new(WithLimits {
        inner: open_embedded(&dir.path().join("store")).await,
        limits: small,
        commits: AtomicUsize::new(0),
    });
    let node = Node::start(engine.clone()).await;
    let remote = node.remote().await;
    assert_eq!(
        remote.limits(),
        small,
        "the remote engine caches the node's limits"
    );

    // Beyond the limits: refused before the network, as the engine would refuse it.
    let mut too_big = Batch::new();
    too_big.set(b"k".to_vec(), vec![0; 1001]);
    assert!(matches!(
        remote.commit(too_big).await,
        Err(StoreError::TooLarge(_))
    ));
    assert_eq!(engine.commits.load(Ordering::SeqCst), 0);

    // A range answer far larger than one message (1.8 MB against 1.07 MB here): written in many small
    // batches, read back whole, in order, in one call.
    let mut written = Vec::new();
    for b in 0..200u32 {
        let mut batch = Batch::new();
        for i in 0..9u32 {
            let key = format!("r/{:05}", b * 9 + i).into_bytes();
            let value = vec![(b % 251) as u8; 1000];
            batch.set(key.clone(), value.clone());
            written.push((key, value));
        }
        remote.commit(batch).await.unwrap();
    }
    let answer = remote
        .range(b"r/".to_vec()..b"r0".to_vec(), usize::MAX, false)
        .await
        .unwrap();
    assert!(written.len() * 1000 > courier_rpc::max_message_bytes(&small));
    assert_eq!(answer, written);
    let mut reversed = written.clone();
    reversed.reverse();
    let tail = remote
        .range(b"r/".to_vec()..b"r0".to_vec(), 1500, true)
        .await
        .unwrap();
    assert_eq!(tail, reversed[..1500]);
    node.stop().await;
}

// ---- expired ranges ----

/// An engine that notes the expired ranges it is asked to drop, and refuses them once told.
#[derive(Default)]
struct Dropping {
    asked: Mutex<Vec<Range<Vec<u8>>>>,
    refuse: Mutex<Option<StoreError>>,
}

#[async_trait]
impl KvEngine for Dropping {
    async fn get(&self, _: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(None)
    }
    async fn range(
        &self,
        _: Range<Vec<u8>>,
        _: usize,
        _: bool,
    ) -> Result<Vec<KeyValue>, StoreError> {
        Ok(Vec::new())
    }
    async fn commit(&self, _: Batch) -> Result<CommitStamp, StoreError> {
        Ok([0; 10])
    }
    async fn drop_expired(&self, range: Range<Vec<u8>>) -> Result<(), StoreError> {
        if let Some(error) = self.refuse.lock().unwrap().clone() {
            return Err(error);
        }
        self.asked.lock().unwrap().push(range);
        Ok(())
    }
    fn limits(&self) -> BatchLimits {
        courier_store::embedded::LIMITS
    }
}

/// A remote engine hands an expired range to the node's engine, which drops what it can
/// (the embedded engine: the tables wholly inside it), and its refusal comes back as itself.
#[tokio::test]
async fn an_expired_range_is_dropped_by_the_nodes_engine() {
    let engine = Arc::new(Dropping::default());
    let node = Node::start(engine.clone()).await;
    let remote = node.remote().await;
    let expired = b"hidem/1".to_vec()..b"hidem/2".to_vec();
    remote.drop_expired(expired.clone()).await.unwrap();
    assert_eq!(*engine.asked.lock().unwrap(), vec![expired.clone()]);

    *engine.refuse.lock().unwrap() = Some(StoreError::Engine("disk".into()));
    assert!(matches!(
        remote.drop_expired(expired).await,
        Err(StoreError::Engine(reason)) if reason.contains("disk")
    ));
    node.stop().await;
}

/// A peer of the store node that connects and sends nothing, not even the HTTP/2 preface, is
/// closed once the first-byte bound passes (`courier_rpc::stall`): tonic waits for the preface
/// with no bound, so each such connection (a port scanner, anyone on the network) was held for
/// good, its socket and task with it.
#[tokio::test]
async fn a_connection_that_sends_nothing_is_closed() {
    use tokio::io::AsyncReadExt;
    let dir = tempfile::tempdir().unwrap();
    let engine: Arc<dyn KvEngine> = Arc::new(EmbeddedEngine::open(dir.path()).unwrap());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let bounds = courier_rpc::stall::ConnectionBounds {
        first_byte: Duration::from_millis(200),
        write: Duration::from_secs(60),
    };
    let (_stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(serve_store_node_with(
        engine,
        listener,
        token(),
        bounds,
        async {
            let _ = stopped.await;
        },
    ));
    let mut socket = tokio::net::TcpStream::connect(address).await.unwrap();
    // The server's own SETTINGS come first, then the end of the connection.
    let closed = async {
        let mut buf = [0u8; 64];
        while let Ok(1..) = socket.read(&mut buf).await {}
    };
    tokio::time::timeout(DEADLINE, closed)
        .await
        .expect("the store node closed the connection");
}
