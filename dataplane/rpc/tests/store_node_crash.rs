//! A real crash of a store node process under load: a child process (this test binary, run
//! again with [`CHILD_DATA_DIR`] set) serves an embedded store; the test commits to it through
//! a `RemoteEngine` from several writers, kills the child with SIGKILL while commits are in
//! flight, restarts a store node on the same data directory and finds every commit that was
//! answered `Ok`. Every commit that was not answered `Ok` must have been answered
//! `MaybeCommitted` (its answer was lost, so its outcome is unknown), never a plain failure.

use courier_rpc::{ClusterToken, RemoteEngine, serve_store_node};
use courier_store::embedded::EmbeddedEngine;
use courier_store::{Batch, KvEngine, StoreError};
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tokio::task::JoinSet;

/// Set in the child: the store directory it serves.
const CHILD_DATA_DIR: &str = "COURIER_TEST_STORE_NODE_CHILD";
const TOKEN: &str = "courier-test-cluster-token-0123456789abcdef";
/// Concurrent writers, and how many commits are answered `Ok` before the kill.
const WRITERS: usize = 4;
const COMMITS_BEFORE_KILL: usize = 60;
/// Longest wait for the child's address or for the commits before the kill.
const DEADLINE: Duration = Duration::from_secs(60);

fn key(writer: usize, commit: usize) -> Vec<u8> {
    format!("w{writer}/c{commit:05}").into_bytes()
}

fn value(writer: usize, commit: usize) -> Vec<u8> {
    format!("{writer}:{commit}:").repeat(40).into_bytes()
}

/// The child: serves the store at `dir` on an ephemeral port, prints `listening <address>`,
/// and serves until it is killed.
fn serve(dir: &str) -> ! {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let engine = Arc::new(EmbeddedEngine::open(dir.as_ref()).unwrap());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        println!("listening {}", listener.local_addr().unwrap());
        let token = ClusterToken::new(TOKEN).unwrap();
        serve_store_node(engine, listener, token, std::future::pending())
            .await
            .unwrap();
    });
    unreachable!("the child serves until it is killed")
}

/// A store node process, killed when dropped (also when a check fails first).
struct NodeProcess(Child);

impl NodeProcess {
    /// SIGKILL, and reaped.
    fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Starts a store node process on `dir`; returns it with its URL once it listens.
fn start_node(dir: &std::path::Path) -> (NodeProcess, String) {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "every_commit_answered_ok_survives_a_sigkill_of_the_store_node",
            "--nocapture",
        ])
        .env(CHILD_DATA_DIR, dir)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (lines, address) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(address) = line.strip_prefix("listening ") {
                let _ = lines.send(address.to_owned());
            }
        }
    });
    let child = NodeProcess(child);
    let address = address
        .recv_timeout(DEADLINE)
        .expect("the store node reports its address");
    (child, format!("http://{address}"))
}

#[test]
fn every_commit_answered_ok_survives_a_sigkill_of_the_store_node() {
    if let Ok(dir) = std::env::var(CHILD_DATA_DIR) {
        serve(&dir);
    }
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let (mut child, url) = start_node(&store);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let token = || ClusterToken::new(TOKEN).unwrap();

    let (answered, outcomes) = runtime.block_on(async {
        let remote = Arc::new(RemoteEngine::connect(&url, token()).await.unwrap());
        let answered = Arc::new(AtomicUsize::new(0));
        let progress = Arc::new(tokio::sync::Notify::new());
        let mut writers = JoinSet::new();
        for writer in 0..WRITERS {
            let (remote, answered, progress) = (remote.clone(), answered.clone(), progress.clone());
            // Each writer commits until its first error; returns its `Ok` commits and that error.
            writers.spawn(async move {
                let mut ok = Vec::new();
                for commit in 0.. {
                    let mut batch = Batch::new();
                    batch.set(key(writer, commit), value(writer, commit));
                    match remote.commit(batch).await {
                        Ok(_) => {
                            ok.push(commit);
                            answered.fetch_add(1, Ordering::SeqCst);
                            progress.notify_one();
                        }
                        Err(error) => return (writer, ok, error),
                    }
                }
                unreachable!()
            });
        }
        tokio::time::timeout(DEADLINE, async {
            while answered.load(Ordering::SeqCst) < COMMITS_BEFORE_KILL {
                progress.notified().await;
            }
        })
        .await
        .expect("commits are answered before the kill");
        // Kill -9 while the writers are still committing.
        child.kill();
        let mut outcomes = Vec::new();
        while let Some(done) = writers.join_next().await {
            outcomes.push(done.unwrap());
        }
        (answered.load(Ordering::SeqCst), outcomes)
    });
    assert!(answered >= COMMITS_BEFORE_KILL);
    for (writer, _, error) in &outcomes {
        assert!(
            matches!(error, StoreError::MaybeCommitted),
            "writer {writer}: a commit cut by the crash must be MaybeCommitted, not {error:?}"
        );
    }

    let (mut child, url) = start_node(&store);
    let missing = runtime.block_on(async {
        let remote = RemoteEngine::connect(&url, token()).await.unwrap();
        let mut missing = Vec::new();
        for (writer, ok, _) in &outcomes {
            for &commit in ok {
                if remote.get(&key(*writer, commit)).await.unwrap() != Some(value(*writer, commit))
                {
                    missing.push((*writer, commit));
                }
            }
        }
        missing
    });
    child.kill();
    assert!(
        missing.is_empty(),
        "commits answered Ok and lost to the store node's SIGKILL (writer, commit): {missing:?}"
    );
}
