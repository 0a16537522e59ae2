//! `courier chat`: a small interactive terminal client, so a person can try Courier from two
//! terminals. Lines typed are sent to the current peer; incoming messages are printed and
//! acknowledged as delivered.

use crate::auth;
use clap::Args;
use courier_client::proto::{AckKind, Body, Encoding, EventPayload, ServerFrame};
use courier_client::{Client, Target};
use std::path::PathBuf;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, BufReader};

#[derive(Debug, Args)]
pub struct ChatArgs {
    /// Server address.
    #[arg(long, default_value = "ws://127.0.0.1:8080")]
    url: String,
    #[arg(long)]
    user: String,
    #[arg(long)]
    device: String,
    /// Whom to talk to first (change with `/to USER`).
    #[arg(long)]
    to: Option<String>,
    /// A token; without one, a token is minted with the data directory's secret.
    #[arg(long, env = "COURIER_TOKEN", hide_env_values = true)]
    token: Option<String>,
    #[arg(long, env = "COURIER_DATA_DIR", default_value = "./courier-data")]
    data_dir: PathBuf,
}

pub async fn run(args: ChatArgs) -> anyhow::Result<()> {
    let token = match args.token {
        Some(token) => token,
        None => auth::mint(
            &auth::read_secret(&args.data_dir)?,
            &args.user,
            &args.device,
            Duration::from_secs(24 * 3600),
        )?,
    };
    let mut client = Client::connect(&args.url, &token, Encoding::Json).await?;
    let mut target = args.to.map(Target::User);
    println!(
        "connected as {}/{}; type a message, `/to USER` to pick a peer, Ctrl-D to quit",
        args.user, args.device
    );
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    let mut counter = 0u64;
    let session = format!("{:x}", rand::random::<u32>());
    loop {
        tokio::select! {
            line = lines.next_line() => {
                let Some(line) = line? else { break };
                let line = line.trim();
                if let Some(peer) = line.strip_prefix("/to ") {
                    target = Some(Target::User(peer.trim().to_owned()));
                    println!("now talking to {}", peer.trim());
                } else if !line.is_empty() {
                    let Some(to) = target.clone() else {
                        println!("pick a peer first: /to USER");
                        continue;
                    };
                    counter += 1;
                    let id = format!("{session}-{counter}");
                    match client.send_with_retry(to, &id, Body::Text(line.to_owned())).await {
                        Ok(sent) => println!("  ✓ sent (seq {})", sent.seq),
                        Err(e) => println!("  ✗ {e}"),
                    }
                }
            }
            frame = client.next_frame() => {
                match frame? {
                    ServerFrame::Event(event) => {
                        if let EventPayload::Message { body: Some(Body::Text(text)), .. } = &event.payload {
                            println!("{}: {text}", event.sender.user);
                            if target.is_none() {
                                target = Some(Target::Conversation(event.conversation_id.clone()));
                            }
                        }
                        client.ack(&event.conversation_id, event.seq, AckKind::Delivered).await?;
                    }
                    ServerFrame::Receipt(r) => println!("  ({} has delivered {} / read {})", r.user, r.delivered_seq, r.read_seq),
                    ServerFrame::Reconnect(_) => {
                        println!("server is draining; reconnect later");
                        break;
                    }
                    _ => {}
                }
            }
        }
    }
    client.close().await;
    Ok(())
}
