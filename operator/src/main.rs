//! `courier-operator`: runs the controllers (one replica at a time writes, elected with a
//! Lease), or writes the CRDs.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use clap::{Parser, Subcommand};
use courier_operator::controllers::{self, Context};
use courier_operator::data_plane::NetworkDataPlane;
use courier_operator::leader::{self, LeaseFence};
use courier_operator::metrics::{Metrics, serve};
use courier_operator::scope::WatchScope;
use kube::Client;
use kube_lease_manager::LeaseManagerBuilder;

#[derive(Parser)]
#[command(
    name = "courier-operator",
    version,
    about = "The Courier Kubernetes operator"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the controllers (in a pod: needs the service account of the chart).
    Run {
        /// Where `/metrics` and `/healthz` listen.
        #[arg(long, env = "COURIER_OPERATOR_LISTEN", default_value = "0.0.0.0:8080")]
        listen: SocketAddr,
        /// The namespace of the leader-election Lease (the operator's own).
        #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
        lease_namespace: String,
        /// This replica's identity in the Lease (its pod name).
        #[arg(long, env = "POD_NAME")]
        identity: String,
        /// The one namespace whose resources the controllers watch and write (the chart's
        /// `watchNamespace`, with a Role there instead of a ClusterRole); empty: every
        /// namespace.
        #[arg(long, env = "COURIER_OPERATOR_WATCH_NAMESPACE", default_value = "")]
        watch_namespace: WatchScope,
    },
    /// Write the CRDs as YAML files into a directory (the chart's `crds/`), or check that the
    /// files there match the Rust types (`--check`, for CI).
    Crds {
        /// The directory of the CRD files.
        #[arg(long, default_value = "charts/courier/crds")]
        dir: PathBuf,
        /// Fail, naming the files that differ, instead of writing.
        #[arg(long)]
        check: bool,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Crds { dir, check } => write_crds(&dir, check),
        Command::Run {
            listen,
            lease_namespace,
            identity,
            watch_namespace,
        } => {
            tracing_subscriber::fmt()
                .json()
                .with_env_filter(
                    tracing_subscriber::EnvFilter::try_from_default_env()
                        .unwrap_or_else(|_| "info".into()),
                )
                .init();
            tokio::runtime::Runtime::new()?.block_on(run(
                listen,
                lease_namespace,
                identity,
                watch_namespace,
            ))
        }
    }
}

/// Serves metrics at once; runs the controllers while this replica holds the Lease (one per
/// scope, [`WatchScope::lease_name`]), and exits when it loses it (the pod restarts as a
/// follower). On SIGTERM or SIGINT it stops the controllers, releases the Lease for the
/// standby, and exits 0 ([`leader::lead`]).
async fn run(
    listen: SocketAddr,
    lease_namespace: String,
    identity: String,
    scope: WatchScope,
) -> anyhow::Result<()> {
    // Before anything else: a signal from now on ends the run cleanly.
    let shutdown = leader::shutdown_signal()?;
    let client = Client::try_default().await?;
    let metrics = Arc::new(Metrics::new());
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let server = tokio::spawn(serve(listener, metrics.clone()));
    let fence = LeaseFence::new(
        client.clone(),
        &lease_namespace,
        &scope.lease_name(),
        &identity,
    );
    let manager = LeaseManagerBuilder::new(client.clone(), scope.lease_name())
        .with_namespace(lease_namespace)
        .with_identity(identity)
        .build()
        .await?;
    let (leader, lease_task) = manager.watch().await;
    let data_plane = Arc::new(NetworkDataPlane::new()?);
    let controllers = |stopped| {
        tracing::info!(watching = %scope, "leading: starting the controllers");
        let ctx = Arc::new(Context::new(
            client.clone(),
            data_plane,
            Arc::new(fence),
            metrics,
        ));
        async move { controllers::run(client, ctx, &scope, stopped).await }
    };
    tokio::select! {
        led = leader::lead(leader, lease_task, controllers, shutdown) => Ok(led?),
        served = server => anyhow::bail!("the metrics server stopped: {served:?}"),
    }
}

/// Writes (or checks) the CRD files in `dir`.
fn write_crds(dir: &Path, check: bool) -> anyhow::Result<()> {
    let files = courier_operator::crd::yaml_files()?;
    if check {
        let stale: Vec<String> = files
            .iter()
            .filter(|(name, body)| {
                std::fs::read_to_string(dir.join(name)).ok().as_deref() != Some(body.as_str())
            })
            .map(|(name, _)| name.clone())
            .collect();
        anyhow::ensure!(
            stale.is_empty(),
            "CRD files in {} differ from the Rust types: {}; run `cargo run -p courier-operator -- crds`",
            dir.display(),
            stale.join(", ")
        );
        return Ok(());
    }
    std::fs::create_dir_all(dir)?;
    for (name, body) in files {
        std::fs::write(dir.join(&name), body)?;
    }
    Ok(())
}
