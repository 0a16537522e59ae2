//! `courier`: the Courier data-plane binary.
//!
//! - `courier serve`: every role (gateway, chat, sequencer, fanout) in one process on the
//!   embedded store;
//! - `courier token`: prints a token signed with the server's secret;
//! - `courier chat`: a small interactive terminal client;
//! - `courier store-node`: a store shared by the nodes of a test cluster (not for production);
//! - `courier node`: some of the roles, as one node of a cluster (`docs/distributed.md`);
//! - `courier admin`: a cluster's admin API from a terminal.
//!
//! Every subcommand logs to standard error, as text on a terminal and as JSON lines otherwise
//! (`--log-format`, `docs/operations.md`).

mod admin;
mod backup;
mod cli_admin;
mod cli_chat;
mod config;
mod config_file;
mod http;
mod http_server;
mod jwks;
mod media_api;
mod media_proxy;
mod node;
mod serve;
mod store_node;

use clap::{Parser, Subcommand, ValueEnum};
use courier_core::auth;
use std::io::IsTerminal;
use std::num::NonZeroUsize;

/// jemalloc instead of the system allocator: the server allocates per frame and per commit on
/// one thread and frees on another (a frame parsed on a connection's thread is sequenced on the
/// ordering thread and written by the store's), where glibc malloc took ~20 % of the CPU and
/// mimalloc ~16 % at the 1:1 peak, against ~7 % for jemalloc
/// (`docs/decisions/0016-jemalloc.md`).
#[cfg(not(target_env = "msvc"))]
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Parser)]
#[command(
    name = "courier",
    version,
    about = "Courier: a real-time messaging server"
)]
struct Cli {
    /// Format of the logs on standard error: `text` for people, `json` (one object per line:
    /// timestamp, level, message, target, fields) for log shippers; `auto` is text on a
    /// terminal and JSON otherwise (in a pod, under systemd, into a file).
    #[arg(
        long,
        global = true,
        env = "COURIER_LOG_FORMAT",
        value_enum,
        default_value = "auto"
    )]
    log_format: LogFormat,
    /// Threads that run the roles' tasks (tokio's workers); the embedded store's writer and
    /// compaction threads come on top. Default: one per CPU this process may use. Fewer
    /// workers than CPUs spend less CPU per message under a light load, where the workers
    /// would wake each other across cores; more keep the tail lower near capacity
    /// (`docs/operations.md`, "Worker threads").
    #[arg(long, global = true, env = "COURIER_WORKER_THREADS")]
    worker_threads: Option<NonZeroUsize>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum LogFormat {
    Auto,
    Json,
    Text,
}

// Parsed once at start-up: the size of the largest variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Run every role in one process on the embedded store.
    Serve(config::ServeConfig),
    /// Print a token for a user's device, signed with the server's secret.
    Token {
        #[arg(long, value_parser = user_id)]
        user: String,
        #[arg(long, value_parser = device_id)]
        device: String,
        /// Validity, e.g. `24h`, `30m`, `7d`; at least `1s`.
        #[arg(long, default_value = "24h", value_parser = token_ttl)]
        ttl: Duration,
        /// The server's data directory (holds the generated secret).
        #[arg(long, env = "COURIER_DATA_DIR", default_value = "./courier-data")]
        data_dir: PathBuf,
        /// Sign with this secret instead of the data directory's.
        #[arg(long, env = "COURIER_JWT_SECRET", hide_env_values = true)]
        jwt_secret: Option<String>,
    },
    /// Chat from a terminal: type a line to send it; `/to USER` picks the peer.
    Chat(cli_chat::ChatArgs),
    /// Load-generate against a running server and report latency and throughput.
    Bench(courier_bench::BenchArgs),
    /// Serve a store to the nodes of a test or development cluster on one machine (a stand-in
    /// for FoundationDB where none runs; never a production store: one process, one disk, no
    /// replication).
    StoreNode(store_node::StoreNodeArgs),
    /// Run some of the roles as one node of a cluster on a shared store, e.g. `--roles
    /// sequencer`, `--roles media`, `--roles gateway` (its clients' requests go to the chat
    /// nodes, its media requests to the media nodes) or `--roles gateway,chat,media`
    /// (`docs/distributed.md`).
    Node(node::NodeArgs),
    /// Call a cluster's admin API: list nodes and shards, move a shard, drain or forget a
    /// node.
    Admin(cli_admin::AdminArgs),
    /// Copy a `courier serve` data directory (its store as of one moment, its media, its
    /// token secret) into one archive, while the server runs or while it is stopped.
    Backup(backup::BackupArgs),
    /// Write a new data directory from an archive of `courier backup`.
    Restore(backup::RestoreArgs),
}

/// A token's validity: a duration of at least a second. `exp` counts whole seconds, so a
/// shorter one made a token that had expired when it was printed.
fn token_ttl(text: &str) -> Result<Duration, String> {
    let ttl = humantime::parse_duration(text).map_err(|e| e.to_string())?;
    if ttl < Duration::from_secs(1) {
        return Err("a token must be valid for at least 1s".into());
    }
    Ok(ttl)
}

/// A `--user` as PROTOCOL.md has user ids, checked as the flag is read: before a secret is
/// looked for, so that an id typed wrong is what the error names, not a missing secret.
fn user_id(text: &str) -> Result<String, courier_proto::ids::InvalidId> {
    courier_proto::ids::user_id(text).map(|()| text.to_owned())
}

/// A `--device`, checked as [`user_id`] checks a `--user`.
fn device_id(text: &str) -> Result<String, courier_proto::ids::InvalidId> {
    courier_proto::ids::device_id(text).map(|()| text.to_owned())
}

fn main() -> std::process::ExitCode {
    // The flags, with those of a `--config` file.
    let cli: Cli = config_file::parse();
    let json = init_logging(cli.log_format);
    without_transparent_huge_pages();
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if let Some(workers) = cli.worker_threads {
        runtime.worker_threads(workers.get());
    }
    let result = runtime
        .enable_all()
        .build()
        .map_err(anyhow::Error::from)
        .and_then(|runtime| runtime.block_on(run(cli.command)));
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) if json => {
            tracing::error!(error = format!("{e:#}"), "courier failed");
            std::process::ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Turns transparent huge pages off for this process: the first write to a huge page makes
/// the kernel zero 2 MiB on the writing thread (milliseconds on a virtual machine whose host
/// backs fresh memory as it is first written), and when that thread is the embedded store's
/// writer, every commit queued behind it waits. mimalloc asks for huge pages where the
/// kernel's policy is `madvise`, the common default; with them, send-ACK p99 at 5,000 msgs/s
/// was 41-56 ms, without them 10-14 ms, at the same CPU (`docs/benchmarks.md`, "Huge pages
/// and the writer's tail"). Transparent huge pages are Linux's: elsewhere this does nothing.
fn without_transparent_huge_pages() {
    #[cfg(target_os = "linux")]
    if let Err(e) = rustix::thread::disable_transparent_huge_pages(true) {
        tracing::warn!(error = %e, "could not turn transparent huge pages off for this process");
    }
}

/// Logs to standard error at `RUST_LOG` (default `info`) in `format`; returns whether that is
/// JSON. In JSON, the event's fields sit beside `timestamp`, `level`, `message` and `target` at
/// the top level (where log shippers look for them), and panics are logged as events too, so
/// that every line is one JSON object.
fn init_logging(format: LogFormat) -> bool {
    let terminal = std::io::stderr().is_terminal();
    let json = match format {
        LogFormat::Json => true,
        LogFormat::Text => false,
        LogFormat::Auto => !terminal,
    };
    let logs = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr);
    if json {
        logs.json().flatten_event(true).init();
        std::panic::set_hook(Box::new(log_panic));
    } else {
        // Colours only for a person: not into a file or a pipe.
        logs.with_ansi(terminal).init();
    }
    json
}

/// A panic as an `error` event (where the default hook would print plain text).
fn log_panic(info: &std::panic::PanicHookInfo<'_>) {
    let payload = info.payload();
    let message = payload
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(not text)");
    let thread = std::thread::current();
    let backtrace = std::backtrace::Backtrace::capture();
    let backtrace = (backtrace.status() == std::backtrace::BacktraceStatus::Captured)
        .then(|| backtrace.to_string());
    tracing::error!(
        panic = message,
        location = info.location().map(ToString::to_string),
        thread = thread.name().unwrap_or("unnamed"),
        backtrace,
        "panicked"
    );
}

async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Serve(config) => serve::run(config).await,
        Command::Token {
            user,
            device,
            ttl,
            data_dir,
            jwt_secret,
        } => {
            let secret = match jwt_secret {
                Some(s) => s.into_bytes(),
                None => auth::read_secret(&data_dir)?,
            };
            println!("{}", auth::mint(&secret, &user, &device, ttl)?);
            Ok(())
        }
        Command::Chat(args) => cli_chat::run(args).await,
        Command::Bench(args) => courier_bench::run(args).await,
        Command::StoreNode(args) => store_node::run(args).await,
        Command::Node(args) => node::run(args).await,
        Command::Admin(args) => cli_admin::run(args).await,
        // Long reads and writes of files and sockets: on a thread that may block.
        Command::Backup(args) => {
            tokio::task::spawn_blocking(move || backup::run_backup(&args)).await?
        }
        Command::Restore(args) => {
            tokio::task::spawn_blocking(move || backup::run_restore(&args)).await?
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    /// Every flag of `courier serve`, `courier node` and `courier store-node`, and its
    /// environment variable, is in `docs/operations.md` (the table of `serve`'s flags and the
    /// text below it), so that no flag goes undocumented.
    #[test]
    fn every_server_flag_and_its_variable_is_in_the_operations_guide() {
        let guide = include_str!("../../../docs/operations.md");
        let cli = Cli::command();
        let mut missing = Vec::new();
        let subcommands = ["serve", "node", "store-node"].map(|name| {
            let found = cli.find_subcommand(name);
            (name, found.unwrap_or_else(|| panic!("no `courier {name}`")))
        });
        for (name, command) in std::iter::once(("courier", &cli)).chain(subcommands) {
            for arg in command.get_arguments() {
                let Some(long) = arg.get_long().filter(|long| *long != "help") else {
                    continue;
                };
                if !guide.contains(&format!("`--{long}`")) {
                    missing.push(format!("{name} --{long}"));
                }
                if let Some(env) = arg.get_env() {
                    let env = env.to_string_lossy();
                    if !guide.contains(&format!("`{env}`")) {
                        missing.push(format!("{name} --{long}: {env}"));
                    }
                }
            }
        }
        assert!(missing.is_empty(), "not in docs/operations.md: {missing:?}");
    }
}
