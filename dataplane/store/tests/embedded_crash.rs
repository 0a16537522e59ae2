//! A real crash of the embedded engine: a child process (this test binary, run again with
//! [`CHILD_DATA_DIR`] set) commits batches and reports each one the engine answered `Ok`, then
//! waits; the test kills it with SIGKILL, reopens the store and finds every reported commit.
//! Unlike the contract suite's reopen (a clean drop, after which fjall has synced everything),
//! nothing runs between the kill and the reopen, so a commit answered before its journal write
//! left the process is caught here.
//!
//! Half of the writers commit [deferred](courier_store::kv::Durability::Deferred) batches,
//! answered once the operating system holds them: a process kill loses none of those either.
//! The reopened store's versionstamps are above every one the child was given.
//!
//! A process kill cannot lose what the operating system already holds: that `Ok` also waits for
//! the fsync is pinned by `embedded::tests::commits_wait_for_fsync`.

use courier_store::embedded::EmbeddedEngine;
use courier_store::kv::{Batch, KvEngine};
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// Set in the child: the store directory it commits to.
const CHILD_DATA_DIR: &str = "COURIER_TEST_ENGINE_CRASH_CHILD";
/// Concurrent committers in the child (so that commits are grouped) and commits by each.
const WRITERS: usize = 4;
const COMMITS_PER_WRITER: usize = 25;
/// Longest wait for the child's reports.
const CHILD_TIMEOUT: Duration = Duration::from_secs(60);

fn key(writer: usize, commit: usize) -> Vec<u8> {
    format!("w{writer}/c{commit:03}").into_bytes()
}

fn value(writer: usize, commit: usize) -> Vec<u8> {
    format!("{writer}:{commit}:").repeat(40).into_bytes()
}

/// The child: commits, prints `committed <writer> <commit> <stamp>` after each `Ok` (the
/// stamp in hex), then `parked`, and waits to be killed.
fn commit_and_report(dir: &str) -> ! {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let engine = std::sync::Arc::new(EmbeddedEngine::open(dir.as_ref()).unwrap());
        let mut writers = tokio::task::JoinSet::new();
        for writer in 0..WRITERS {
            let engine = engine.clone();
            writers.spawn(async move {
                for commit in 0..COMMITS_PER_WRITER {
                    let mut batch = Batch::new();
                    batch.set(key(writer, commit), value(writer, commit));
                    if writer % 2 == 1 {
                        batch.deferred();
                    }
                    let stamp = engine.commit(batch).await.unwrap();
                    println!("committed {writer} {commit} {}", hex::encode(stamp));
                }
            });
        }
        while let Some(done) = writers.join_next().await {
            done.unwrap();
        }
        println!("parked");
        std::future::pending::<()>().await;
    });
    unreachable!("the child waits until it is killed")
}

#[test]
fn every_commit_answered_ok_survives_a_sigkill() {
    if let Ok(dir) = std::env::var(CHILD_DATA_DIR) {
        commit_and_report(&dir);
    }
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "every_commit_answered_ok_survives_a_sigkill",
            "--nocapture",
        ])
        .env(CHILD_DATA_DIR, &store)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (lines, reports) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = lines.send(line);
        }
    });
    let mut reported = Vec::new();
    let mut stamps = Vec::new();
    loop {
        let line = reports
            .recv_timeout(CHILD_TIMEOUT)
            .expect("the child reports its commits");
        if line == "parked" {
            break;
        }
        if let Some(commit) = line.strip_prefix("committed ") {
            let [writer, commit, stamp] = commit.split(' ').collect::<Vec<_>>()[..] else {
                panic!("a report of three fields: {line}");
            };
            reported.push((writer.parse().unwrap(), commit.parse().unwrap()));
            stamps.push(hex::decode(stamp).unwrap());
        }
    }
    assert_eq!(reported.len(), WRITERS * COMMITS_PER_WRITER);
    child.kill().unwrap();
    child.wait().unwrap();

    let engine = EmbeddedEngine::open(&store).unwrap();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let missing: Vec<_> = reported
        .iter()
        .filter(|&&(writer, commit)| {
            let stored = runtime.block_on(engine.get(&key(writer, commit))).unwrap();
            stored != Some(value(writer, commit))
        })
        .collect();
    assert!(
        missing.is_empty(),
        "commits answered Ok and lost to SIGKILL (writer, commit): {missing:?}"
    );
    let mut probe = Batch::new();
    probe.set(b"probe".to_vec(), Vec::new());
    let after = runtime.block_on(engine.commit(probe)).unwrap();
    let before = stamps.iter().max().unwrap();
    assert!(
        after.as_slice() > before.as_slice(),
        "a stamp after the kill, {after:02x?}, above every one before it, {before:02x?}"
    );
}
