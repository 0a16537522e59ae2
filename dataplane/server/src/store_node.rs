//! `courier store-node`: the ordered-KV store served over gRPC, so that the nodes of a test or
//! development cluster on one machine share one embedded store (`--store remote`). A stand-in
//! for FoundationDB where none runs, never a production store: one process on one disk, no
//! replication, no failover.

use crate::config::{ConfigFileArgs, StoreCacheArgs};
use anyhow::Context as _;
use clap::Args;
use courier_rpc::{ClusterToken, serve_store_node};
use courier_store::KvEngine;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

/// The cluster token every internal call carries.
#[derive(Debug, Clone, Args)]
pub struct ClusterTokenArgs {
    /// File holding the cluster's shared token (at least 32 bytes); every node of a cluster
    /// must be given the same one. Default: the `COURIER_CLUSTER_TOKEN` environment variable.
    #[arg(long, env = "COURIER_CLUSTER_TOKEN_FILE")]
    pub cluster_token_file: Option<PathBuf>,
}

impl ClusterTokenArgs {
    pub fn token(&self) -> anyhow::Result<ClusterToken> {
        Ok(match &self.cluster_token_file {
            Some(path) => ClusterToken::from_file(path)?,
            None => ClusterToken::from_env(courier_rpc::auth::TOKEN_ENV)?,
        })
    }
}

/// `courier store-node`.
#[derive(Debug, Args)]
pub struct StoreNodeArgs {
    #[command(flatten)]
    pub config_file: ConfigFileArgs,
    /// Where the store node listens for the cluster's nodes.
    #[arg(long, env = "COURIER_STORE_LISTEN", default_value = "127.0.0.1:7400")]
    pub listen: SocketAddr,
    /// The store's directory.
    #[arg(long, env = "COURIER_DATA_DIR", default_value = "./courier-store")]
    pub data_dir: PathBuf,
    #[command(flatten)]
    pub token: ClusterTokenArgs,
    #[command(flatten)]
    pub cache: StoreCacheArgs,
}

/// Serves the store until SIGTERM or Ctrl-C.
pub async fn run(args: StoreNodeArgs) -> anyhow::Result<()> {
    // First: a signal while the store opens stops the node once it is open, not by killing it.
    let stop = crate::serve::StopSignal::install()?;
    let token = args.token.token()?;
    courier_core::dirs::create_private(&args.data_dir)
        .with_context(|| format!("creating the data directory {}", args.data_dir.display()))?;
    let engine = Arc::new(args.cache.open(&args.data_dir)?);
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    let address = listener.local_addr()?;
    tracing::info!(
        data_dir = %args.data_dir.display(),
        "courier store node ready on {address} (a test and development stand-in for FoundationDB)"
    );
    serve_store_node(engine.clone(), listener, token, stop.stopped()).await?;
    engine.closing();
    Ok(())
}
