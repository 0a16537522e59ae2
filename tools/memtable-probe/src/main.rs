//! The cost of one insert into lsm-tree's memtable (fjall's, which the embedded store writes
//! every key into) with keys shaped like `courier serve`'s: a subspace, a 34-byte conversation id,
//! and a sequence number. Each "message" inserts one unique key (an event) and a second key:
//! a new version of a key its conversation rewrites every time (`rewritten`, as a head), another
//! unique key (`unique`), or none (`none`). Between messages the probe may write `EVICT_MIB` of
//! other memory, as the other threads of a lightly loaded server do between two of the store
//! writer's commits.
//!
//! `LAYOUT=numbered` probes the shorter layout a conversation numbered at its creation would give
//! instead: a subspace byte, the conversation's 8-byte number and the 8-byte seq, 17 bytes that
//! the memtable's keys hold inline (byteview keeps up to 20 bytes without a heap block).
//!
//! Run: `cargo run --release --manifest-path tools/memtable-probe/Cargo.toml [-- MESSAGES]`
//! Env: CONVERSATIONS (default 100), EVICT_MIB (default "0,2"),
//!      SECOND (default "rewritten,unique,none"), LAYOUT ("courier" by default, or "numbered").
//! Prints ns per insert of each key for each setting.
use lsm_tree::{InternalValue, Memtable, ValueType};
use std::hint::black_box;
use std::time::Instant;

/// How keys are laid out (module documentation).
#[derive(Clone, Copy, PartialEq)]
enum Layout {
    Courier,
    Numbered,
}

/// A key of the subspace `name` for conversation `conv`, with `seq` appended when given.
fn key(layout: Layout, name: &str, conv: u64, seq: Option<u64>) -> Vec<u8> {
    match layout {
        Layout::Courier => courier_key(name, conv, seq),
        Layout::Numbered => {
            let mut key = vec![name.as_bytes()[0]];
            key.extend_from_slice(&conv.to_be_bytes());
            if let Some(seq) = seq {
                key.extend_from_slice(&seq.to_be_bytes());
            }
            key
        }
    }
}

/// The layout of `courier serve`'s keys: FoundationDB tuples under an empty root, the subspace's
/// name, the conversation id (`d:` and 32 hex digits) and the seq.
fn courier_key(name: &str, conv: u64, seq: Option<u64>) -> Vec<u8> {
    let mut key = vec![0x02];
    key.extend_from_slice(name.as_bytes());
    key.extend_from_slice(b"\x00\x02d:");
    let spread = u128::from(conv).wrapping_mul(0x9E37_79B9_7F4A_7C15_F39C_C060_5CED_C835);
    key.extend_from_slice(format!("{spread:032x}").as_bytes());
    key.push(0);
    if let Some(seq) = seq {
        // A tuple's integer of eight bytes.
        key.push(0x1c);
        key.extend_from_slice(&seq.to_be_bytes());
    }
    key
}

fn list(var: &str, default: &str) -> Vec<String> {
    std::env::var(var)
        .unwrap_or_else(|_| default.into())
        .split(',')
        .map(|s| s.trim().to_owned())
        .collect()
}

/// The second key of each message (module documentation).
#[derive(Clone, Copy, PartialEq)]
enum Second {
    Rewritten,
    Unique,
    None,
}

/// Nanoseconds per insert of the events and of the second keys (`None` without them).
fn probe(
    layout: Layout,
    messages: u64,
    conversations: u64,
    evict_mib: usize,
    second: Second,
) -> (f64, Option<f64>) {
    let memtable = Memtable::new(0);
    let mut other = vec![0u8; evict_mib.max(1) << 20];
    let (mut event_ns, mut second_ns, mut seqno) = (0u128, 0u128, 0u64);
    for message in 0..messages {
        if evict_mib > 0 {
            for byte in other.iter_mut().step_by(64) {
                *byte = byte.wrapping_add(1);
            }
        }
        let conv = message % conversations;
        let event = key(layout, "ev", conv, Some(message));
        seqno += 1;
        let started = Instant::now();
        memtable.insert(InternalValue::from_components(event, [0u8; 200], seqno, ValueType::Value));
        event_ns += started.elapsed().as_nanos();
        let other_key = match second {
            Second::Rewritten => key(layout, "head", conv, None),
            Second::Unique => key(layout, "head", conv, Some(message)),
            Second::None => continue,
        };
        seqno += 1;
        let started = Instant::now();
        memtable.insert(InternalValue::from_components(
            other_key,
            message.to_le_bytes(),
            seqno,
            ValueType::Value,
        ));
        second_ns += started.elapsed().as_nanos();
    }
    black_box(&other);
    let per = |ns: u128| ns as f64 / messages as f64;
    (per(event_ns), (second != Second::None).then(|| per(second_ns)))
}

fn main() {
    let messages: u64 = std::env::args()
        .nth(1)
        .map_or(400_000, |a| a.parse().expect("MESSAGES: a whole number of messages"));
    let conversations: u64 = std::env::var("CONVERSATIONS")
        .map_or(100, |v| v.parse().expect("CONVERSATIONS: a whole number, at least 1"));
    assert!(conversations > 0, "CONVERSATIONS: a whole number, at least 1");
    let layout = match std::env::var("LAYOUT").as_deref() {
        Err(_) | Ok("courier") => Layout::Courier,
        Ok("numbered") => Layout::Numbered,
        Ok(other) => panic!("LAYOUT: courier or numbered, not {other}"),
    };
    println!("{messages} messages over {conversations} conversations, ns per insert");
    for evict in list("EVICT_MIB", "0,2") {
        let evict_mib: usize = evict.parse().expect("EVICT_MIB: whole MiB, comma-separated");
        for name in list("SECOND", "rewritten,unique,none") {
            let second = match name.as_str() {
                "rewritten" => Second::Rewritten,
                "unique" => Second::Unique,
                "none" => Second::None,
                other => panic!("SECOND: rewritten, unique or none, not {other}"),
            };
            let (event, other) = probe(layout, messages, conversations, evict_mib, second);
            let other = other.map_or("-".into(), |ns| format!("{ns:.0}"));
            println!(
                "  evicting {evict_mib} MiB between messages, second key {name}: event {event:.0}, second {other}"
            );
        }
    }
}
