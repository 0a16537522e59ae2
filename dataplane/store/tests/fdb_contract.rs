//! The engine contract (`courier_store::contract`) on FoundationDB. Runs when
//! `COURIER_FDB_CLUSTER_FILE` names a cluster file, each run under its own random root, cleared
//! afterwards; otherwise it says how to run it and passes.
#![cfg(feature = "fdb")]

use async_trait::async_trait;
use courier_store::contract::{self, EngineHarness};
use courier_store::fdb::FdbEngine;
use courier_store::{Batch, KvEngine};
use std::path::PathBuf;
use std::sync::Arc;

struct Harness {
    cluster_file: PathBuf,
    root: Vec<u8>,
}

impl Harness {
    fn engine(&self) -> Arc<dyn KvEngine> {
        Arc::new(FdbEngine::open(&self.cluster_file, &self.root).expect("open FoundationDB"))
    }
}

#[async_trait]
impl EngineHarness for Harness {
    async fn open(&mut self) -> Arc<dyn KvEngine> {
        self.engine()
    }
    async fn reopen_after_crash(&mut self, engine: Arc<dyn KvEngine>) -> Arc<dyn KvEngine> {
        // The cluster keeps what it acknowledged; a new handle is what a restarted process has.
        drop(engine);
        self.engine()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foundationdb_engine_passes_the_contract() {
    let Some(cluster_file) = std::env::var_os("COURIER_FDB_CLUSTER_FILE") else {
        println!(
            "skipped: set COURIER_FDB_CLUSTER_FILE=/etc/foundationdb/fdb.cluster to run the FoundationDB contract suite"
        );
        return;
    };
    let mut root = b"courier-contract-".to_vec();
    root.extend_from_slice(format!("{:016x}/", rand::random::<u64>()).as_bytes());
    let mut harness = Harness {
        cluster_file: cluster_file.into(),
        root,
    };
    contract::run_all(&mut harness).await;
    let mut clear = Batch::new();
    clear.clear_range(Vec::new()..vec![0xff]);
    harness
        .engine()
        .commit(clear)
        .await
        .expect("clear the run's keys");
}
