//! Batch-commit throughput with fsync on every commit: fjall (journal, `PersistMode::SyncAll`)
//! against redb (`Durability::Immediate`), with the write shape of a Courier append batch:
//! N events (key ~40 bytes, value 200 bytes), one head and one outbox entry per commit.
//! Usage: `engine-compare [SECONDS_PER_CELL]` (default 3).

use std::time::{Duration, Instant};

const TABLE: redb::TableDefinition<&[u8], &[u8]> = redb::TableDefinition::new("data");

struct Cell {
    commits: u64,
    records: u64,
    latencies: Vec<Duration>,
    elapsed: Duration,
}

fn event_key(conv: u64, seq: u64) -> Vec<u8> {
    let mut k = b"ev/".to_vec();
    k.extend_from_slice(format!("d:{conv:032x}/").as_bytes());
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

/// Runs `commit(batch_number)` for `duration`, each commit writing `batch` events.
fn measure(duration: Duration, batch: u64, mut commit: impl FnMut(u64)) -> Cell {
    let start = Instant::now();
    let mut cell = Cell { commits: 0, records: 0, latencies: Vec::new(), elapsed: Duration::ZERO };
    while start.elapsed() < duration {
        let t = Instant::now();
        commit(cell.commits);
        cell.latencies.push(t.elapsed());
        cell.commits += 1;
        cell.records += batch;
    }
    cell.elapsed = start.elapsed();
    cell
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p) as usize]
}

fn report(engine: &str, batch: u64, mut cell: Cell) {
    cell.latencies.sort();
    let secs = cell.elapsed.as_secs_f64();
    println!(
        "| {engine} | {batch} | {:.0} | {:.0} | {:.2} | {:.2} |",
        cell.commits as f64 / secs,
        cell.records as f64 / secs,
        percentile(&cell.latencies, 0.5).as_secs_f64() * 1e3,
        percentile(&cell.latencies, 0.99).as_secs_f64() * 1e3,
    );
}

fn main() {
    let seconds: u64 = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(3);
    let duration = Duration::from_secs(seconds);
    let value = vec![7u8; 200];
    println!("| engine | events per commit | commits/s | events/s | p50 commit ms | p99 commit ms |");
    println!("|---|---|---|---|---|---|");
    for batch in [1u64, 16, 128, 512] {
        let dir = tempfile::tempdir().unwrap();
        let db = fjall::Database::builder(dir.path().join("fjall")).open().unwrap();
        let ks = db.keyspace("data", fjall::KeyspaceCreateOptions::default).unwrap();
        let cell = measure(duration, batch, |n| {
            let mut b = db.batch().durability(Some(fjall::PersistMode::SyncAll));
            for i in 0..batch {
                b.insert(&ks, event_key(n % 64, n * batch + i), value.clone());
            }
            b.insert(&ks, format!("head/{}", n % 64).into_bytes(), (n * batch).to_le_bytes().to_vec());
            b.insert(&ks, format!("ob/{n:016x}").into_bytes(), value.clone());
            b.commit().unwrap();
        });
        report("fjall 3 (write batch)", batch, cell);

        let txdb = fjall::SingleWriterTxDatabase::builder(dir.path().join("fjall-tx")).open().unwrap();
        let tks = txdb.keyspace("data", fjall::KeyspaceCreateOptions::default).unwrap();
        let cell = measure(duration, batch, |n| {
            let mut tx = txdb.write_tx().durability(Some(fjall::PersistMode::SyncAll));
            for i in 0..batch {
                tx.insert(&tks, event_key(n % 64, n * batch + i), value.clone());
            }
            tx.insert(&tks, format!("head/{}", n % 64).into_bytes(), (n * batch).to_le_bytes().to_vec());
            tx.insert(&tks, format!("ob/{n:016x}").into_bytes(), value.clone());
            tx.commit().unwrap();
        });
        report("fjall 3 (single-writer tx)", batch, cell);

        let db = redb::Database::create(dir.path().join("redb")).unwrap();
        let cell = measure(duration, batch, |n| {
            let txn = db.begin_write().unwrap();
            {
                let mut t = txn.open_table(TABLE).unwrap();
                for i in 0..batch {
                    t.insert(event_key(n % 64, n * batch + i).as_slice(), value.as_slice()).unwrap();
                }
                t.insert(format!("head/{}", n % 64).as_bytes(), (n * batch).to_le_bytes().as_slice()).unwrap();
                t.insert(format!("ob/{n:016x}").as_bytes(), value.as_slice()).unwrap();
            }
            txn.commit().unwrap();
        });
        report("redb 4", batch, cell);
    }
}
