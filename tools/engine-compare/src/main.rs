//! Batch-commit throughput of fjall vs redb with an fsync on every commit.
//!
//! Run: `cargo run --release --manifest-path tools/engine-compare/Cargo.toml [-- SECS]`
//! Env: SECS (per write cell, default 3; the first argument overrides it),
//!      READ_SECS (per read cell, default 1), BATCHES (default "1,16,128,512"),
//!      ENGINES (default "fjall,fjall-tx,redb"),
//!      ENGINE_TMP (default "target/engine-compare-tmp", relative to the current dir).
//! Each commit: N events for one conversation (key 40 bytes `ev/<conv>/<seq BE>`, value 200
//! bytes) + that conversation's head + one outbox entry, in three tables/keyspaces.
use std::path::Path;
use std::time::{Duration, Instant};

const CONVS: u64 = 64; // conversations written round-robin, one per commit
const VALUE: [u8; 200] = [0xAB; 200];
const TABLES: [&str; 3] = ["events", "heads", "outbox"];

/// 40-byte ordered event key: `ev/<28-digit conv>/<seq u64 BE>`.
fn ev_key(conv: u64, seq: u64) -> Vec<u8> {
    let mut k = format!("ev/{conv:028}/").into_bytes();
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

/// One commit's writes: (table index into TABLES, key, value).
type Batch = Vec<(usize, Vec<u8>, Vec<u8>)>;

trait Engine {
    fn commit(&mut self, b: &Batch);
    /// Point read in `events`; returns the value length.
    fn get(&self, key: &[u8]) -> usize;
    /// Forward scan of `events` in `[from, to)`, at most `n` keys; returns the number of keys.
    fn scan(&self, from: &[u8], to: &[u8], n: usize) -> usize;
}

struct Fjall {
    db: fjall::Database,
    ks: Vec<fjall::Keyspace>,
}
impl Engine for Fjall {
    fn commit(&mut self, b: &Batch) {
        // Some(SyncAll): the journal is written and fsynced (File::sync_all) inside commit().
        let mut wb = self.db.batch().durability(Some(fjall::PersistMode::SyncAll));
        for (t, k, v) in b {
            wb.insert(&self.ks[*t], k.as_slice(), v.as_slice());
        }
        wb.commit().unwrap();
    }
    fn get(&self, key: &[u8]) -> usize {
        self.ks[0].get(key).unwrap().map_or(0, |v| v.len())
    }
    fn scan(&self, from: &[u8], to: &[u8], n: usize) -> usize {
        self.ks[0].range(from..to).take(n).map(|g| g.into_inner().unwrap().1.len() / 200).sum()
    }
}

/// fjall's single-writer transactions (read-your-writes inside the tx; one tx at a time).
struct FjallTx {
    db: fjall::SingleWriterTxDatabase,
    ks: Vec<fjall::SingleWriterTxKeyspace>,
}
impl Engine for FjallTx {
    fn commit(&mut self, b: &Batch) {
        let mut tx = self.db.write_tx().durability(Some(fjall::PersistMode::SyncAll));
        for (t, k, v) in b {
            tx.insert(&self.ks[*t], k.as_slice(), v.as_slice());
        }
        tx.commit().unwrap();
    }
    fn get(&self, key: &[u8]) -> usize {
        self.ks[0].get(key).unwrap().map_or(0, |v| v.len())
    }
    fn scan(&self, from: &[u8], to: &[u8], n: usize) -> usize {
        use fjall::Readable; // range() on a snapshot is a trait method
        let snap = self.db.read_tx();
        let it = snap.range(&self.ks[0], from..to);
        it.take(n).map(|g| g.into_inner().unwrap().1.len() / 200).sum()
    }
}

const DEFS: [redb::TableDefinition<&[u8], &[u8]>; 3] = [
    redb::TableDefinition::new(TABLES[0]),
    redb::TableDefinition::new(TABLES[1]),
    redb::TableDefinition::new(TABLES[2]),
];

struct Redb(redb::Database);
impl Engine for Redb {
    fn commit(&mut self, b: &Batch) {
        let mut tx = self.0.begin_write().unwrap();
        tx.set_durability(redb::Durability::Immediate).unwrap(); // the default; explicit here
        {
            let mut tables: Vec<_> = DEFS.iter().map(|d| tx.open_table(*d).unwrap()).collect();
            for (t, k, v) in b {
                tables[*t].insert(k.as_slice(), v.as_slice()).unwrap();
            }
        } // tables must be dropped before commit
        tx.commit().unwrap();
    }
    fn get(&self, key: &[u8]) -> usize {
        use redb::ReadableDatabase; // begin_read() is a trait method in redb 4
        let t = self.0.begin_read().unwrap().open_table(DEFS[0]).unwrap();
        t.get(key).unwrap().map_or(0, |v| v.value().len())
    }
    fn scan(&self, from: &[u8], to: &[u8], n: usize) -> usize {
        use redb::ReadableDatabase;
        let t = self.0.begin_read().unwrap().open_table(DEFS[0]).unwrap();
        t.range(from..to).unwrap().take(n).map(|r| r.unwrap().1.value().len() / 200).sum()
    }
}

fn open(engine: &str, dir: &Path) -> Box<dyn Engine> {
    match engine {
        "fjall" => {
            let db = fjall::Database::builder(dir).open().unwrap();
            let ks = TABLES.map(|n| db.keyspace(n, fjall::KeyspaceCreateOptions::default));
            Box::new(Fjall { ks: ks.into_iter().map(Result::unwrap).collect(), db })
        }
        "fjall-tx" => {
            let db = fjall::SingleWriterTxDatabase::builder(dir).open().unwrap();
            let ks = TABLES.map(|n| db.keyspace(n, fjall::KeyspaceCreateOptions::default));
            Box::new(FjallTx { ks: ks.into_iter().map(Result::unwrap).collect(), db })
        }
        "redb" => Box::new(Redb(redb::Database::create(dir.join("courier.redb")).unwrap())),
        other => panic!("unknown engine {other}"),
    }
}

fn env<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// xorshift64*: deterministic, dependency-free.
fn rng(s: &mut u64) -> u64 {
    *s ^= *s >> 12;
    *s ^= *s << 25;
    *s ^= *s >> 27;
    s.wrapping_mul(0x2545_F491_4F6C_DD1D)
}

fn pct_ms(sorted: &[Duration], p: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize].as_secs_f64() * 1e3
}

/// Calls `op` repeatedly for `secs`; returns (calls per second, sum of op's results per call).
fn rate(secs: f64, mut op: impl FnMut() -> usize) -> (f64, f64) {
    let (mut calls, mut sum, t) = (0u64, 0usize, Instant::now());
    while t.elapsed().as_secs_f64() < secs {
        sum += op();
        calls += 1;
    }
    (calls as f64 / t.elapsed().as_secs_f64(), sum as f64 / calls.max(1) as f64)
}

fn main() {
    let arg = std::env::args().nth(1).and_then(|a| a.parse().ok()); // `-- 3` = SECS=3
    let secs: f64 = arg.unwrap_or_else(|| env("SECS", 3.0));
    let read_secs: f64 = env("READ_SECS", 1.0);
    let batches: String = env("BATCHES", "1,16,128,512".to_string());
    let engines: String = env("ENGINES", "fjall,fjall-tx,redb".to_string());
    let tmp: String = env("ENGINE_TMP", "target/engine-compare-tmp".to_string());

    println!("fsync on every commit; {secs}s per write cell, {read_secs}s per read cell; {tmp}");
    println!(
        "| engine | batch | commits/s | records/s | p50 ms | p99 ms | gets/s | scans/s | keys/scan |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for bs in batches.split(',').map(|s| s.trim().parse::<u64>().unwrap()) {
        for engine in engines.split(',') {
            let dir = Path::new(&tmp).join(format!("{engine}-{bs}"));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            let mut e = open(engine, &dir);

            // Writes: commit n goes to conversation n % CONVS.
            let mut next_seq = [0u64; CONVS as usize];
            let (mut lat, mut n, start) = (Vec::new(), 0u64, Instant::now());
            while start.elapsed().as_secs_f64() < secs {
                let c = n % CONVS;
                let s0 = next_seq[c as usize];
                next_seq[c as usize] += bs;
                let mut b: Batch =
                    (s0..s0 + bs).map(|s| (0, ev_key(c, s), VALUE.to_vec())).collect();
                let head = format!("head/{c:028}").into_bytes();
                b.push((1, head, next_seq[c as usize].to_be_bytes().to_vec()));
                b.push((2, [b"ob/".as_slice(), &n.to_be_bytes()].concat(), ev_key(c, s0)));
                let t = Instant::now();
                e.commit(&b);
                lat.push(t.elapsed());
                n += 1;
            }
            let el = start.elapsed().as_secs_f64();
            lat.sort();

            // Reads on what was written: random point gets, then forward scans of up to 100
            // keys inside one conversation, started so that 100 keys remain where possible.
            let mut seed = 0x9E37_79B9_7F4A_7C15u64;
            let mut pick = move || {
                let c = rng(&mut seed) % CONVS.min(n);
                (c, rng(&mut seed) % next_seq[c as usize].saturating_sub(99).max(1))
            };
            let (gets_s, bytes) = rate(read_secs, || {
                let (c, s) = pick();
                e.get(&ev_key(c, s))
            });
            let (scans_s, keys) = rate(read_secs, || {
                let (c, s) = pick();
                e.scan(&ev_key(c, s), &ev_key(c, u64::MAX), 100)
            });
            assert!(bytes == 200.0 && keys > 0.0, "reads returned wrong data");
            println!(
                "| {engine} | {bs} | {:.0} | {:.0} | {:.2} | {:.2} | {gets_s:.0} | {scans_s:.0} | {:.0} |",
                n as f64 / el,
                (n * bs) as f64 / el,
                pct_ms(&lat, 0.50),
                pct_ms(&lat, 0.99),
                keys,
            );
            drop(e);
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
}
