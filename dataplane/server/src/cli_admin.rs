//! `courier admin`: a cluster's admin API from a terminal (`docs/distributed.md`, "Admin
//! API"): list the nodes and the shard map, move a shard, drain a node, forget a dead one.
//! It calls the internal port of one node with the cluster token, as the operator does.

use crate::store_node::ClusterTokenArgs;
use anyhow::Context;
use clap::{Args, Subcommand};
use courier_rpc::auth::AttachToken;
use courier_rpc::proto::admin_client::AdminClient;
use courier_rpc::proto::{
    DrainRequest, ForgetNodeRequest, ListNodesRequest, ListShardMapRequest, MoveShardRequest, Node,
    ShardOwner, ShardState,
};
use std::time::Duration;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

/// `courier admin`.
#[derive(Debug, Args)]
pub struct AdminArgs {
    /// The internal address (`host:port`, its `--internal-listen`) of a node of the cluster:
    /// any node answers `nodes`, `shards` and `move-shard`; `drain` drains this node.
    #[arg(long, env = "COURIER_ADMIN_NODE", default_value = "127.0.0.1:7500")]
    pub node: String,
    /// How long the command waits for its answers (a node that takes the call and never
    /// answers, its store hanging say, would otherwise hold it for good).
    #[arg(long, default_value = "2m", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
    #[command(flatten)]
    pub token: ClusterTokenArgs,
    #[command(subcommand)]
    pub command: AdminCommand,
}

#[derive(Debug, Subcommand)]
pub enum AdminCommand {
    /// Every registered node: roles, internal address, live or lapsed, client connections.
    Nodes,
    /// Every shard: its sequencer and fanout owners with their epochs, and its outbox lag.
    Shards {
        /// Outbox entries counted per shard (at most 1000).
        #[arg(long, default_value_t = 100)]
        outbox_count_limit: u32,
    },
    /// Move SHARD to the sequencer node TO: asks the shard's sequencer for the hand-off and
    /// returns once TO serves the shard.
    MoveShard {
        shard: u32,
        /// The node id of the sequencer node to take it.
        #[arg(long)]
        to: String,
    },
    /// Drain the node at `--node`: a sequencer releases its shards to the others; a gateway
    /// tells its clients to reconnect elsewhere, in batches over the window.
    Drain {
        /// A gateway: spread the reconnects over this long (default: its `--drain-window`).
        #[arg(long, value_parser = humantime::parse_duration)]
        window: Option<Duration>,
    },
    /// Remove a dead node (its lease lapsed) from the registry, with its devices' routes.
    Forget { id: String },
}

type Admin = AdminClient<InterceptedService<Channel, AttachToken>>;

/// Runs one admin command and prints its answer, within `--timeout`.
pub async fn run(args: AdminArgs) -> anyhow::Result<()> {
    let (node, timeout) = (args.node.clone(), args.timeout);
    tokio::time::timeout(timeout, run_command(args))
        .await
        .unwrap_or_else(|_| {
            anyhow::bail!(
                "{node}: no answer within {} (--timeout); the call may still be under way \
                 there (`courier admin nodes` or `shards` show where it stands)",
                humantime::format_duration(timeout)
            )
        })
}

async fn run_command(args: AdminArgs) -> anyhow::Result<()> {
    let token = args.token.token()?;
    let connect = |address: &str| {
        let channel = courier_rpc::lazy_channel(&format!("http://{address}"), "node")?;
        anyhow::Ok(AdminClient::with_interceptor(
            channel,
            AttachToken::new(token.clone()),
        ))
    };
    let mut admin = connect(&args.node)?;
    match args.command {
        AdminCommand::Nodes => print_nodes(&mut admin, &args.node).await,
        AdminCommand::Shards { outbox_count_limit } => {
            print_shards(&mut admin, &args.node, outbox_count_limit).await
        }
        AdminCommand::MoveShard { shard, to } => {
            let owner = sequencer_address(&mut admin, &args.node, shard).await?;
            let moved = connect(&owner)?
                .move_shard(MoveShardRequest {
                    shard,
                    to: to.clone(),
                })
                .await
                .map_err(|e| answer_error(&owner, e))?
                .into_inner();
            println!("shard {shard} moved to {to} at epoch {}", moved.epoch);
            Ok(())
        }
        AdminCommand::Drain { window } => {
            let drained = admin
                .drain(DrainRequest {
                    window_ms: window_ms(window),
                })
                .await
                .map_err(|e| answer_error(&args.node, e))?
                .into_inner();
            if !drained.released.is_empty() {
                println!("released shards {:?}", drained.released);
            }
            if drained.connections > 0 || drained.window_ms > 0 {
                println!(
                    "{} connections told to reconnect over {} ms",
                    drained.connections, drained.window_ms
                );
            }
            if drained.released.is_empty() && drained.window_ms == 0 {
                println!("drained: the node held no shard and serves no client");
            }
            Ok(())
        }
        AdminCommand::Forget { id } => {
            let forgotten = admin
                .forget_node(ForgetNodeRequest { id: id.clone() })
                .await
                .map_err(|e| answer_error(&args.node, e))?
                .into_inner();
            match forgotten.forgotten {
                true => println!(
                    "forgot {id} and {} routes of its devices",
                    forgotten.routes_cleared
                ),
                false => println!("{id} was not registered"),
            }
            Ok(())
        }
    }
}

/// The `window_ms` of a drain over `window`. In the request 0 stands for the gateway's own
/// `--drain-window`, so a window asked for that is shorter than a millisecond (`--window 0s`:
/// everyone at once) is sent as 1 ms, which the gateway also tells in one batch; sent as 0 it
/// was taken as the default, 60 s on a cluster gateway.
fn window_ms(window: Option<Duration>) -> u64 {
    window.map_or(0, |w| {
        u64::try_from(w.as_millis()).unwrap_or(u64::MAX).max(1)
    })
}

/// An rpc's failure, naming the node that answered (or did not), and why: the causes of a
/// transport error (tonic's message alone, "tcp connect error", names none), and a hint when
/// what answered is no node's internal port.
fn answer_error(node: &str, status: tonic::Status) -> anyhow::Error {
    let mut why = status.message().to_owned();
    let mut cause = std::error::Error::source(&status);
    while let Some(e) = cause {
        let said = e.to_string();
        if !why.contains(&said) {
            why = format!("{why}: {said}");
        }
        cause = e.source();
    }
    let hint = match status.code() {
        tonic::Code::Unavailable => " (is the node up, and is this its --internal-listen?)",
        tonic::Code::Unimplemented => " (is this a node's --internal-listen, not its --listen?)",
        _ => "",
    };
    anyhow::anyhow!("{node}: {why} ({:?}){hint}", status.code())
}

/// The registered nodes, as the node `admin` calls (at `node`) lists them.
async fn nodes(admin: &mut Admin, node: &str) -> anyhow::Result<Vec<Node>> {
    Ok(admin
        .list_nodes(ListNodesRequest {})
        .await
        .map_err(|e| answer_error(node, e))?
        .into_inner()
        .nodes)
}

/// The shard map, as the node `admin` calls (at `node`) reads it from the store.
async fn shard_map(
    admin: &mut Admin,
    node: &str,
    outbox_count_limit: u32,
) -> anyhow::Result<Vec<ShardState>> {
    Ok(admin
        .list_shard_map(ListShardMapRequest { outbox_count_limit })
        .await
        .map_err(|e| answer_error(node, e))?
        .into_inner()
        .shards)
}

async fn print_nodes(admin: &mut Admin, node: &str) -> anyhow::Result<()> {
    let nodes = nodes(admin, node).await?;
    let mut table = format!(
        "{:<16} {:<36} {:<22} {:<7} CONNECTIONS\n",
        "NODE", "ROLES", "ADDRESS", "LEASE"
    );
    for node in nodes {
        table += &format!(
            "{:<16} {:<36} {:<22} {:<7} {}\n",
            node.id,
            node.roles.join(","),
            node.address,
            if node.live { "live" } else { "lapsed" },
            node.connections
        );
    }
    print_listing(&mut std::io::stdout().lock(), &table)
}

async fn print_shards(
    admin: &mut Admin,
    node: &str,
    outbox_count_limit: u32,
) -> anyhow::Result<()> {
    let shards = shard_map(admin, node, outbox_count_limit).await?;
    let mut table = format!(
        "{:<6} {:<28} {:<28} OUTBOX\n",
        "SHARD", "SEQUENCER", "FANOUT"
    );
    for shard in shards {
        let outbox = shard.outbox.unwrap_or_default();
        let waiting = match (outbox.entries, outbox.more) {
            (0, _) => "empty".to_owned(),
            (n, more) => format!(
                "{n}{} waiting, oldest {} ms",
                if more { "+" } else { "" },
                outbox.oldest_age_ms
            ),
        };
        table += &format!(
            "{:<6} {:<28} {:<28} {waiting}\n",
            shard.shard,
            owner(shard.sequencing.as_ref()),
            owner(shard.delivery.as_ref())
        );
    }
    print_listing(&mut std::io::stdout().lock(), &table)
}

/// Writes a listing to `out`; a reader that stopped reading (`courier admin shards | head`)
/// ends it quietly, where `println!` would panic.
fn print_listing(out: &mut impl std::io::Write, listing: &str) -> anyhow::Result<()> {
    match out.write_all(listing.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        written => Ok(written?),
    }
}

/// `node (epoch N)`, marked when its lease lapsed; `-` when the shard never had one.
fn owner(owner: Option<&ShardOwner>) -> String {
    match owner {
        None => "-".to_owned(),
        Some(o) if o.live => format!("{} (epoch {})", o.node, o.epoch),
        Some(o) => format!("{} (epoch {}, lapsed)", o.node, o.epoch),
    }
}

/// The internal address of `shard`'s live sequencer, from the shard map and the registry.
async fn sequencer_address(admin: &mut Admin, node: &str, shard: u32) -> anyhow::Result<String> {
    let shards = shard_map(admin, node, 1).await?;
    let state = shards
        .iter()
        .find(|s| s.shard == shard)
        .with_context(|| format!("no shard {shard}: the cluster has {}", shards.len()))?;
    let owner = state
        .sequencing
        .as_ref()
        .filter(|o| o.live)
        .with_context(|| format!("shard {shard} has no live sequencer to hand it off"))?;
    nodes(admin, node)
        .await?
        .into_iter()
        .find(|n| n.id == owner.node)
        .map(|n| n.address)
        .with_context(|| format!("shard {shard}'s sequencer {} is not registered", owner.node))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Standard output whose reader has gone, as after `| head`.
    struct ClosedPipe;

    impl std::io::Write for ClosedPipe {
        fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
            Err(std::io::ErrorKind::BrokenPipe.into())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// `courier admin drain --window 0s` asks for everyone at once: never the 0 that stands
    /// for the gateway's default window; no `--window` asks for that default.
    #[test]
    fn a_drain_window_of_zero_is_not_the_default() {
        assert_eq!(window_ms(None), 0);
        assert_eq!(window_ms(Some(Duration::ZERO)), 1);
        assert_eq!(window_ms(Some(Duration::from_micros(500))), 1);
        assert_eq!(window_ms(Some(Duration::from_secs(30))), 30_000);
        assert_eq!(
            crate::admin::drain_window(window_ms(Some(Duration::ZERO))),
            Some(Duration::from_millis(1))
        );
        assert_eq!(courier_gateway::drain::steps(Duration::from_millis(1)), 1);
    }

    /// `courier admin shards | head -3` prints three lines and exits 0, not with a panic
    /// about a broken pipe; other write errors still fail the command.
    #[test]
    fn a_listing_whose_reader_stopped_ends_quietly() {
        print_listing(&mut ClosedPipe, "SHARD\n0\n1\n").unwrap();
        let mut written = Vec::new();
        print_listing(&mut written, "SHARD\n0\n").unwrap();
        assert_eq!(written, b"SHARD\n0\n");
        let mut full = std::io::Cursor::new([0u8; 2]);
        assert!(print_listing(&mut full, "SHARD\n").is_err());
    }

    /// A node that cannot be reached is named, with why (the connection refused, the name
    /// unknown): it was "the node: tcp connect error", naming neither the address given nor
    /// the cause.
    #[tokio::test]
    async fn an_unreachable_node_is_named_with_the_cause() {
        let dir = tempfile::tempdir().unwrap();
        let token_file = dir.path().join("token");
        std::fs::write(&token_file, "0123456789abcdef0123456789abcdef").unwrap();
        // A port nothing listens on.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let node = listener.local_addr().unwrap().to_string();
        drop(listener);
        for command in [AdminCommand::Nodes, AdminCommand::Forget { id: "x".into() }] {
            let args = AdminArgs {
                node: node.clone(),
                timeout: Duration::from_secs(60),
                token: ClusterTokenArgs {
                    cluster_token_file: Some(token_file.clone()),
                },
                command,
            };
            let error = format!("{:#}", run(args).await.unwrap_err());
            assert!(error.contains(&node), "{error}");
            assert!(error.to_lowercase().contains("refused"), "{error}");
        }
    }

    /// A node that takes the connection and never answers (here a socket nothing reads; a
    /// node whose store hangs alike) held the command for good: it gives up after
    /// `--timeout`, naming the node.
    #[tokio::test]
    async fn a_node_that_never_answers_is_given_up_after_the_timeout() {
        let dir = tempfile::tempdir().unwrap();
        let token_file = dir.path().join("token");
        std::fs::write(&token_file, "0123456789abcdef0123456789abcdef").unwrap();
        let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let node = silent.local_addr().unwrap().to_string();
        let _held = tokio::spawn(async move {
            let mut sockets = Vec::new();
            while let Ok((socket, _)) = silent.accept().await {
                sockets.push(socket);
            }
        });
        let args = AdminArgs {
            node: node.clone(),
            timeout: Duration::from_millis(300),
            token: ClusterTokenArgs {
                cluster_token_file: Some(token_file),
            },
            command: AdminCommand::Nodes,
        };
        let error = format!("{:#}", run(args).await.unwrap_err());
        assert!(
            error.contains(&node) && error.contains("--timeout"),
            "{error}"
        );
    }
}
