//! The engine contract (`courier_store::contract`) on FoundationDB, under its own random root
//! subspace, cleared afterwards (also when a check fails). It needs a cluster, so it is ignored
//! (cargo lists it as ignored, with the reason) unless asked for:
//!
//! ```sh
//! COURIER_FDB_CLUSTER_FILE=/etc/foundationdb/fdb.cluster \
//!   cargo test -p courier-store --features fdb --test fdb_contract -- --ignored
//! ```
//! Asked for without the feature or without `COURIER_FDB_CLUSTER_FILE`, it fails and says what
//! is missing. Linking needs the FoundationDB client library (libfdb_c 7.3); see
//! `docs/foundationdb.md`.

/// The variable naming the cluster file of the FoundationDB to test against.
const CLUSTER_FILE_VAR: &str = "COURIER_FDB_CLUSTER_FILE";

#[cfg(not(feature = "fdb"))]
#[test]
#[ignore = "needs a FoundationDB cluster: build with --features fdb, set COURIER_FDB_CLUSTER_FILE and run with --ignored"]
fn foundationdb_engine_passes_the_contract() {
    panic!(
        "this test binary was built without the `fdb` feature: run \
         {CLUSTER_FILE_VAR}=/etc/foundationdb/fdb.cluster \
         cargo test -p courier-store --features fdb --test fdb_contract -- --ignored"
    );
}

#[cfg(feature = "fdb")]
mod foundationdb {
    use super::CLUSTER_FILE_VAR;
    use async_trait::async_trait;
    use courier_store::contract::{self, EngineHarness};
    use courier_store::fdb::{self, FdbEngine};
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
    #[ignore = "needs a FoundationDB cluster: set COURIER_FDB_CLUSTER_FILE and run with --ignored"]
    async fn foundationdb_engine_passes_the_contract() {
        let Some(cluster_file) = std::env::var_os(CLUSTER_FILE_VAR) else {
            panic!(
                "set {CLUSTER_FILE_VAR} to the cluster file of the FoundationDB to test against, \
             e.g. {CLUSTER_FILE_VAR}=/etc/foundationdb/fdb.cluster"
            );
        };
        // A root of its own: `courier-contract-<random>/`, so runs never see each other's keys.
        let root = format!("courier-contract-{:016x}/", rand::random::<u64>()).into_bytes();
        let cluster_file = PathBuf::from(cluster_file);
        let mut harness = Harness {
            cluster_file: cluster_file.clone(),
            root: root.clone(),
        };
        // Run in a task so that a failed check still reaches the clean-up below.
        let outcome = tokio::spawn(async move { contract::run_all(&mut harness).await }).await;

        let kv = FdbEngine::open(&cluster_file, &root).expect("open FoundationDB to clean up");
        let mut clear = Batch::new();
        clear.clear_range(Vec::new()..vec![0xff]);
        kv.commit(clear).await.expect("clear the run's keys");
        assert!(
            kv.range(Vec::new()..vec![0xff], 1, false)
                .await
                .expect("read the run's keys")
                .is_empty(),
            "the run's subspace is empty after clean-up"
        );
        drop(kv);
        fdb::stop_network();

        if let Err(failure) = outcome {
            std::panic::resume_unwind(failure.into_panic());
        }
    }
}
