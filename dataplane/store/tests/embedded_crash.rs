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
//! A second child writes large values until fjall flushes a memtable to a blob file (values of
//! 128 bytes and more are kept apart from their keys), then commits small ones and is killed
//! the same way, during that flush or after it: the values in the blob file and those only in
//! the journal are all found after the reopen.
//!
//! A process kill cannot lose what the operating system already holds: that `Ok` also waits for
//! the fsync is pinned by `embedded::tests::commits_wait_for_fsync`.

use courier_store::embedded::{EmbeddedEngine, MAX_VALUE_BYTES, MEMTABLE_BYTES};
use courier_store::kv::{Batch, KvEngine};
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// Set in the child of the first scenario: the store directory it commits to.
const CHILD_DATA_DIR: &str = "COURIER_TEST_ENGINE_CRASH_CHILD";
/// Set in the child of the flush scenario: the store directory it commits to.
const FLUSH_CHILD_DATA_DIR: &str = "COURIER_TEST_ENGINE_CRASH_FLUSH_CHILD";
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

/// The child of the flush scenario: commits batches of large values until fjall has begun a
/// blob file, then [`COMMITS_PER_WRITER`] small ones, each reported as the other child does
/// (writer 0 for the large ones, 1 for the small ones), then `parked`.
fn flush_commit_and_report(dir: &str) -> ! {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let engine = EmbeddedEngine::open(dir.as_ref()).unwrap();
        let most = 3 * MEMTABLE_BYTES as usize / (10 * MAX_VALUE_BYTES);
        for commit in 0.. {
            assert!(commit < most, "{commit} MB written and no blob file");
            if has_blob_files(dir.as_ref()) {
                break;
            }
            let mut batch = Batch::new();
            for part in 0..10 {
                batch.set(large_key(commit, part), large_value(commit, part));
            }
            batch.deferred();
            let stamp = engine.commit(batch).await.unwrap();
            println!("committed 0 {commit} {}", hex::encode(stamp));
        }
        for commit in 0..COMMITS_PER_WRITER {
            let mut batch = Batch::new();
            batch.set(key(1, commit), value(1, commit));
            let stamp = engine.commit(batch).await.unwrap();
            println!("committed 1 {commit} {}", hex::encode(stamp));
        }
        println!("parked");
        std::future::pending::<()>().await;
    });
    unreachable!("the child waits until it is killed")
}

fn large_key(commit: usize, part: usize) -> Vec<u8> {
    format!("large/c{commit:05}/{part}").into_bytes()
}

fn large_value(commit: usize, part: usize) -> Vec<u8> {
    vec![(commit * 10 + part) as u8; MAX_VALUE_BYTES]
}

/// Whether fjall has begun a blob file in the store at `dir`.
fn has_blob_files(dir: &Path) -> bool {
    let Ok(keyspaces) = std::fs::read_dir(dir.join("keyspaces")) else {
        return false;
    };
    keyspaces.map_while(Result::ok).any(|keyspace| {
        std::fs::read_dir(keyspace.path().join("blobs"))
            .is_ok_and(|mut blobs| blobs.any(|blob| blob.is_ok()))
    })
}

/// Runs this test binary again as the child of `test` on a store in `store`, and kills it with
/// SIGKILL once it has parked. Returns what it reported: `(writer, commit)` and the stamp of
/// each commit answered `Ok`.
fn run_child_and_kill(test: &str, child_env: &str, store: &Path) -> Vec<((usize, usize), Vec<u8>)> {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", test, "--nocapture"])
        .env(child_env, store)
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
            let commit = (writer.parse().unwrap(), commit.parse().unwrap());
            reported.push((commit, hex::decode(stamp).unwrap()));
        }
    }
    child.kill().unwrap();
    child.wait().unwrap();
    reported
}

/// After the kill: every reported commit is found with `stored(writer, commit)` true, and a
/// new commit's stamp is above every one the child was given.
fn assert_every_reported_commit_survived(
    engine: &EmbeddedEngine,
    runtime: &tokio::runtime::Runtime,
    reported: &[((usize, usize), Vec<u8>)],
    stored: impl Fn(usize, usize) -> bool,
) {
    let missing: Vec<_> = reported
        .iter()
        .map(|&(commit, _)| commit)
        .filter(|&(writer, commit)| !stored(writer, commit))
        .collect();
    assert!(
        missing.is_empty(),
        "commits answered Ok and lost to SIGKILL (writer, commit): {missing:?}"
    );
    let mut probe = Batch::new();
    probe.set(b"probe".to_vec(), Vec::new());
    let after = runtime.block_on(engine.commit(probe)).unwrap();
    let before = reported.iter().map(|(_, stamp)| stamp).max().unwrap();
    assert!(
        after.as_slice() > before.as_slice(),
        "a stamp after the kill, {after:02x?}, above every one before it, {before:02x?}"
    );
}

#[test]
fn every_commit_answered_ok_survives_a_sigkill() {
    if let Ok(dir) = std::env::var(CHILD_DATA_DIR) {
        commit_and_report(&dir);
    }
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let test = "every_commit_answered_ok_survives_a_sigkill";
    let reported = run_child_and_kill(test, CHILD_DATA_DIR, &store);
    assert_eq!(reported.len(), WRITERS * COMMITS_PER_WRITER);

    let engine = EmbeddedEngine::open(&store).unwrap();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    assert_every_reported_commit_survived(&engine, &runtime, &reported, |writer, commit| {
        let stored = runtime.block_on(engine.get(&key(writer, commit))).unwrap();
        stored == Some(value(writer, commit))
    });
}

#[test]
fn commits_whose_values_were_flushed_to_a_blob_file_survive_a_sigkill() {
    if let Ok(dir) = std::env::var(FLUSH_CHILD_DATA_DIR) {
        flush_commit_and_report(&dir);
    }
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let test = "commits_whose_values_were_flushed_to_a_blob_file_survive_a_sigkill";
    let reported = run_child_and_kill(test, FLUSH_CHILD_DATA_DIR, &store);
    assert!(
        has_blob_files(&store),
        "the child's values reached a blob file"
    );
    let small = reported.iter().filter(|((writer, _), _)| *writer == 1);
    assert_eq!(small.count(), COMMITS_PER_WRITER);

    let engine = EmbeddedEngine::open(&store).unwrap();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    assert_every_reported_commit_survived(&engine, &runtime, &reported, |writer, commit| {
        let get = |key: Vec<u8>| runtime.block_on(engine.get(&key)).unwrap();
        if writer == 1 {
            return get(key(1, commit)) == Some(value(1, commit));
        }
        (0..10).all(|part| get(large_key(commit, part)) == Some(large_value(commit, part)))
    });
}
