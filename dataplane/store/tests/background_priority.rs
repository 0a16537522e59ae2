//! fjall's flush and compaction workers run at the lowest CPU priority, the store's writer at
//! that of the thread that opened the store (`courier_store::embedded`, "Background workers at
//! the lowest CPU priority"). A test binary of its own: every thread of the process is looked
//! at, and no other test's store or threads may be among them.
#![cfg(target_os = "linux")]

use courier_store::embedded::{BACKGROUND_NICE, EmbeddedEngine};
use std::time::{Duration, Instant};

/// The nice value in a `/proc/.../stat` line: its 19th field, the 17th after the command
/// name's closing parenthesis (the name may hold spaces).
fn nice_of(stat: &str) -> i32 {
    let (_, after_name) = stat
        .rsplit_once(')')
        .expect("a stat line names its command");
    after_name
        .split_whitespace()
        .nth(16)
        .and_then(|field| field.parse().ok())
        .expect("a stat line has a nice value")
}

/// The nice values of this process's threads named `name`.
fn nice_values(name: &str) -> Vec<i32> {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .flatten()
        .filter(|task| {
            std::fs::read_to_string(task.path().join("comm"))
                .unwrap()
                .trim_end()
                == name
        })
        .map(|task| nice_of(&std::fs::read_to_string(task.path().join("stat")).unwrap()))
        .collect()
}

#[test]
fn the_stores_flushes_run_at_the_lowest_priority_and_its_writes_do_not() {
    let dir = tempfile::tempdir().unwrap();
    let opener = nice_of(&std::fs::read_to_string("/proc/thread-self/stat").unwrap());
    assert_ne!(
        opener, BACKGROUND_NICE,
        "the test itself runs at the lowest priority"
    );

    let _engine = EmbeddedEngine::open(dir.path()).unwrap();

    let workers = nice_values("fjall:worker");
    assert!(
        !workers.is_empty(),
        "fjall's workers are no longer named fjall:worker"
    );
    assert!(
        workers.iter().all(|&nice| nice == BACKGROUND_NICE),
        "fjall's workers at {workers:?}"
    );
    // A thread names itself as it starts, so the writer's may not have its name yet. Names are
    // cut to 15 bytes: `courier-store-writer`.
    let deadline = Instant::now() + Duration::from_secs(10);
    let writer = loop {
        let found = nice_values("courier-store-w");
        if !found.is_empty() || Instant::now() >= deadline {
            break found;
        }
        std::thread::sleep(Duration::from_millis(1));
    };
    assert_eq!(writer, vec![opener]);
}
