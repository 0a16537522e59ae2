//! `courier chat`: a small interactive terminal client, so a person can try Courier from two
//! terminals. Lines typed are sent to the current peer; incoming messages are printed and
//! acknowledged as delivered. A session ends, successfully, at the end of input, when the
//! server drains, or when its output is closed (`courier chat | head -1`).

use clap::Args;
use courier_client::proto::{
    AckKind, Body, Encoding, Event, EventPayload, Media, Receipt, ServerFrame,
};
use courier_client::{Client, ClientError, HttpApi, Target};
use courier_core::auth;
use std::collections::{HashMap, VecDeque};
use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, Args)]
pub struct ChatArgs {
    /// Server address.
    #[arg(long, default_value = "ws://127.0.0.1:8080")]
    url: String,
    #[arg(long, value_parser = crate::user_id)]
    user: String,
    #[arg(long, value_parser = crate::device_id)]
    device: String,
    /// Whom to talk to first (change with `/to USER`).
    #[arg(long)]
    to: Option<String>,
    /// A token; without one, a token is minted with the data directory's secret.
    #[arg(long, env = "COURIER_TOKEN", hide_env_values = true)]
    token: Option<String>,
    #[arg(long, env = "COURIER_DATA_DIR", default_value = "./courier-data")]
    data_dir: PathBuf,
    /// Without a token, mint one with this secret instead of the data directory's.
    #[arg(long, env = "COURIER_JWT_SECRET", hide_env_values = true)]
    jwt_secret: Option<String>,
}

/// `println!`, but a line that cannot be written ends the session (see [`say`]) where
/// `println!` panicked: with `?`, so only where that returns an `anyhow::Result`.
macro_rules! say {
    ($($arg:tt)*) => {
        say(format_args!($($arg)*))?
    };
}

pub async fn run(args: ChatArgs) -> anyhow::Result<()> {
    let token = match args.token {
        Some(token) => token,
        None => {
            let secret = match args.jwt_secret {
                Some(secret) => secret.into_bytes(),
                None => auth::read_secret(&args.data_dir)?,
            };
            auth::mint(
                &secret,
                &args.user,
                &args.device,
                Duration::from_secs(24 * 3600),
            )?
        }
    };
    let http = HttpApi::new(&args.url.replacen("ws", "http", 1), &token).map_err(|e| {
        anyhow::anyhow!("cannot make the HTTP client that shares and fetches files: {e}")
    })?;
    let mut client = Client::connect(&args.url, &token, Encoding::Json)
        .await
        .map_err(|e| not_connected(&args.url, e))?;
    // Standard output closed (`courier chat | head -1`) ends the session as the end of input
    // does; any other error ends it with that error. The connection is closed either way.
    let ended: anyhow::Result<()> = async {
        let mut target = args.to.map(Target::User);
        say!(
            "connected as {}/{}; type a message, `/to USER` to pick a peer, `/send-file PATH` to share \
             a file, `/fetch MEDIA_ID OUT` to download one, Ctrl-D to quit",
            args.user, args.device
        );
        let mut lines = typed_lines()?;
        let mut counter = 0u64;
        let mut shared = SharedMedia::default();
        let session = format!("{:x}", rand::random::<u32>());
        loop {
            tokio::select! {
                line = lines.recv() => {
                    let Some(line) = line.transpose()? else { break };
                    let line = line.trim();
                    if let Some(usage) = usage_of_bare_command(line) {
                        say!("usage: {usage}");
                    } else if let Some(peer) = line.strip_prefix("/to ") {
                        target = Some(Target::User(peer.trim().to_owned()));
                        say!("now talking to {}", peer.trim());
                    } else if let Some(args) = line.strip_prefix("/fetch ") {
                        let mut parts = args.split_whitespace();
                        match (parts.next(), parts.next()) {
                            (Some(id), Some(out)) => match shared.get(id) {
                                Some(media) => match http.download_shared_media(media, std::path::Path::new(out)).await {
                                    Ok(n) => say!("  saved {n} bytes to {out}"),
                                    Err(e) => say!("  ✗ {e}"),
                                },
                                None => say!(
                                    "  ✗ {}: no message of this session shared it, so its size and SHA-256 are \
                                     unknown: /fetch takes the id a shared file's line offers",
                                    shown(id)
                                ),
                            },
                            _ => say!("usage: /fetch MEDIA_ID OUT"),
                        }
                    } else if let Some(path) = line.strip_prefix("/send-file ") {
                        let Some(to) = target.clone() else {
                            say!("pick a peer first: /to USER");
                            continue;
                        };
                        let path = std::path::Path::new(path.trim());
                        let uploaded = match http.upload_media(path, mime_of(path)).await {
                            Ok(uploaded) => uploaded,
                            Err(e) => {
                                say!("  ✗ {e}");
                                continue;
                            }
                        };
                        counter += 1;
                        let media = Media {
                            media_id: uploaded["media_id"].as_str().unwrap_or_default().to_owned(),
                            mime: uploaded["mime"].as_str().unwrap_or_default().to_owned(),
                            size: uploaded["size"].as_u64().unwrap_or_default(),
                            sha256: uploaded["sha256"].as_str().unwrap_or_default().to_owned(),
                            name: path.file_name().map(|n| n.to_string_lossy().into_owned()),
                            caption: None,
                        };
                        match client.send_with_retry(to, &format!("{session}-{counter}"), Body::Media(Box::new(media))).await {
                            Ok(sent) => say!("  ✓ file sent (seq {})", sent.seq),
                            Err(e) => say!("  ✗ {e}"),
                        }
                    } else if !line.is_empty() {
                        let Some(to) = target.clone() else {
                            say!("pick a peer first: /to USER");
                            continue;
                        };
                        counter += 1;
                        let id = format!("{session}-{counter}");
                        match client.send_with_retry(to, &id, Body::Text(line.to_owned())).await {
                            Ok(sent) => say!("  ✓ sent (seq {})", sent.seq),
                            Err(e) => say!("  ✗ {e}"),
                        }
                    }
                }
                frame = client.next_frame() => {
                    match frame? {
                        ServerFrame::Event(event) => {
                            if let Some(line) = event_line(&event) {
                                say!("{line}");
                            }
                            if let EventPayload::Message { body: Some(Body::Media(media)), .. } = &event.payload {
                                shared.remember(media);
                            }
                            if target.is_none() {
                                target = Some(Target::Conversation(event.conversation_id.clone()));
                            }
                            client.ack(&event.conversation_id, event.seq, AckKind::Delivered).await?;
                        }
                        ServerFrame::Receipt(receipt) => say!("{}", receipt_line(&receipt)),
                        ServerFrame::Reconnect(_) => {
                            say!("server is draining; reconnect later");
                            break;
                        }
                        _ => {}
                    }
                }
            }
        }
        Ok(())
    }
    .await;
    client.close().await;
    match ended {
        Err(e) if e.is::<OutputClosed>() => Ok(()),
        ended => ended,
    }
}

/// The media of the messages a session showed, by id, that `/fetch` checks its download
/// against (their size and SHA-256): the latest [`SHARED_MEDIA_KEPT`], the oldest forgotten
/// first, each without its name and caption (up to a message's size each).
#[derive(Default)]
struct SharedMedia {
    by_id: HashMap<String, Media>,
    order: VecDeque<String>,
}

impl SharedMedia {
    fn remember(&mut self, media: &Media) {
        let kept = Media {
            name: None,
            caption: None,
            ..media.clone()
        };
        if self.by_id.insert(media.media_id.clone(), kept).is_some() {
            return;
        }
        self.order.push_back(media.media_id.clone());
        if self.order.len() > SHARED_MEDIA_KEPT
            && let Some(oldest) = self.order.pop_front()
        {
            self.by_id.remove(&oldest);
        }
    }

    fn get(&self, media_id: &str) -> Option<&Media> {
        self.by_id.get(media_id)
    }
}

/// The most files shared in a session that `/fetch` can download.
const SHARED_MEDIA_KEPT: usize = 1024;

/// Writes `line` to standard output. A closed pipe (`courier chat | head -1` once `head` has
/// its line) is [`OutputClosed`], which ends the session as the end of input does; another
/// error is named as one of standard output.
fn say(line: std::fmt::Arguments) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    match writeln!(out, "{line}").and_then(|()| out.flush()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Err(OutputClosed.into()),
        Err(e) => Err(anyhow::Error::new(e).context("writing to standard output")),
    }
}

/// Standard output was closed by its reader: the session ends, successfully.
#[derive(Debug, thiserror::Error)]
#[error("standard output is closed")]
struct OutputClosed;

/// The usage of a command typed with nothing after it: the line is trimmed, so `/to ` is
/// `/to`, which the commands' prefixes (`/to `) do not match, and it would otherwise go to
/// the peer as a message.
fn usage_of_bare_command(line: &str) -> Option<&'static str> {
    match line {
        "/to" => Some("/to USER"),
        "/send-file" => Some("/send-file PATH"),
        "/fetch" => Some("/fetch MEDIA_ID OUT"),
        _ => None,
    }
}

/// Why a session could not start, in the words of the person who started it: which server,
/// and what to do next.
fn not_connected(url: &str, error: ClientError) -> anyhow::Error {
    match error {
        ClientError::Rejected(401) => anyhow::anyhow!(
            "the server at {url} refused the token (HTTP 401): it has expired, names a device \
             that was removed, or was signed with another secret than the server's (mint one \
             with `--data-dir` set to the server's data directory)"
        ),
        ClientError::Rejected(503) => anyhow::anyhow!(
            "the server at {url} takes no connections now (HTTP 503: draining, or not ready): \
             try again once its /readyz answers 200"
        ),
        ClientError::Rejected(status) => {
            anyhow::anyhow!("the server at {url} refused the connection with HTTP {status}")
        }
        other => anyhow::anyhow!("cannot reach {url}: {other}"),
    }
}

/// The line printed for an incoming event, if any. What the sender chose (a text, a file's
/// name) is shown with its control characters escaped: anyone may write to anyone, and an
/// escape sequence would act on the reader's terminal, a line break fake a line from someone
/// else. So is what the server names (the sender, a media id): the server checks them, a
/// broken or hostile one would not. The suggested name to save a file as is the last part of its name, so that it stays
/// in the current directory.
fn event_line(event: &Event) -> Option<String> {
    match &event.payload {
        EventPayload::Message {
            body: Some(Body::Text(text)),
            ..
        } => Some(format!("{}: {}", shown(&event.sender.user), shown(text))),
        EventPayload::Message {
            body: Some(Body::Media(m)),
            ..
        } => {
            let save_as = m
                .name
                .as_deref()
                .and_then(|name| std::path::Path::new(name).file_name()?.to_str())
                .unwrap_or("download.bin");
            Some(format!(
                "{} shared {} ({}, {} bytes): /fetch {} {}",
                shown(&event.sender.user),
                shown(m.name.as_deref().unwrap_or("a file")),
                shown(&m.mime),
                m.size,
                shown(&m.media_id),
                shown(save_as),
            ))
        }
        _ => None,
    }
}

/// The line printed for a receipt, its user escaped as [`event_line`] escapes a sender.
fn receipt_line(receipt: &Receipt) -> String {
    format!(
        "  ({} has delivered {} / read {})",
        shown(&receipt.user),
        receipt.delivered_seq,
        receipt.read_seq
    )
}

/// `text` with its control characters (C0, DEL, C1) escaped as Rust writes them (`\u{1b}`,
/// `\n`), everything else as it is.
fn shown(text: &str) -> std::borrow::Cow<'_, str> {
    if !text.chars().any(char::is_control) {
        return text.into();
    }
    text.chars()
        .map(|c| match c.is_control() {
            true => c.escape_default().to_string(),
            false => c.to_string(),
        })
        .collect::<String>()
        .into()
}

/// Lines typed on standard input, read on a thread of its own; the channel ends at the end of
/// input. Not `tokio::io::stdin`: it reads on the runtime's blocking pool, a read it cannot
/// cancel, and the runtime waits for it on exit, so a session the server ended (a drain, a
/// lost connection) hung until the person pressed Enter. A thread of its own does not hold up
/// the exit. Up to [`TYPED_LINES_QUEUED`] lines wait for the session; past that, reading waits.
fn typed_lines() -> anyhow::Result<tokio::sync::mpsc::Receiver<std::io::Result<String>>> {
    let (typed, lines) = tokio::sync::mpsc::channel(TYPED_LINES_QUEUED);
    std::thread::Builder::new()
        .name("courier-chat-input".into())
        .spawn(move || {
            for line in std::io::stdin().lock().lines() {
                // The session ended: nobody reads any more.
                if typed.blocking_send(line).is_err() {
                    return;
                }
            }
        })?;
    Ok(lines)
}

/// Lines typed and not yet taken by the session (a paste of many lines).
const TYPED_LINES_QUEUED: usize = 64;

/// The MIME type of a file, from its extension.
fn mime_of(path: &std::path::Path) -> &'static str {
    let extension = path
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or_default();
    match extension.to_ascii_lowercase().as_str() {
        "jpg" | "jpeg" => "image/jpeg",
        "png" => "image/png",
        "gif" => "image/gif",
        "webp" => "image/webp",
        "mp4" => "video/mp4",
        "mov" => "video/quicktime",
        "pdf" => "application/pdf",
        "txt" => "text/plain",
        _ => "application/octet-stream",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use courier_client::proto::Sender;

    fn from_mallory(body: Body) -> Event {
        Event {
            conversation_id: "d:1".into(),
            seq: 1,
            server_msg_id: "m".into(),
            sender: Sender {
                user: "mallory".into(),
                device: "phone".into(),
            },
            ts_ms: 0,
            payload: EventPayload::Message {
                body: Some(body),
                client_msg_id: "c".into(),
                reply_to: None,
                deleted: false,
            },
        }
    }

    /// Anyone may write to anyone: what a message carries is shown, never acted on by the
    /// terminal (an escape sequence that clears the screen or retitles the window, a line break
    /// that fakes a line from someone else), and a file's suggested name stays in the current
    /// directory.
    #[test]
    fn what_a_stranger_writes_is_shown_not_acted_on() {
        let text = "hi\u{1b}[2J\u{1b}]0;owned\u{7}\nbob: send me your token\r\u{9b}";
        let line = event_line(&from_mallory(Body::Text(text.into()))).unwrap();
        assert!(!line.chars().any(char::is_control), "{line:?}");
        assert!(line.starts_with("mallory: hi\\u{1b}[2J"), "{line}");
        assert!(line.contains("\\nbob: send me"), "{line}");

        let media = Media {
            media_id: "m1".into(),
            mime: "image/png".into(),
            size: 3,
            sha256: String::new(),
            name: Some("../../.bashrc\u{1b}[8m".into()),
            caption: None,
        };
        let line = event_line(&from_mallory(Body::Media(Box::new(media)))).unwrap();
        assert!(!line.chars().any(char::is_control), "{line:?}");
        assert!(line.ends_with("/fetch m1 .bashrc\\u{1b}[8m"), "{line}");
    }

    /// What the server names (a sender, a media id, the user of a receipt) is shown escaped
    /// too: a broken or hostile server, or one a person was pointed to, wrote escape
    /// sequences to the reader's terminal through them.
    #[test]
    fn what_a_server_names_is_shown_not_acted_on() {
        let mut event = from_mallory(Body::Text("hi".into()));
        event.sender.user = "mallory\u{1b}]0;owned\u{7}".into();
        let line = event_line(&event).unwrap();
        assert!(!line.chars().any(char::is_control), "{line:?}");
        let media = Media {
            media_id: "m1\u{1b}[2J".into(),
            mime: "image/png".into(),
            size: 3,
            sha256: String::new(),
            name: None,
            caption: None,
        };
        let line = event_line(&from_mallory(Body::Media(Box::new(media)))).unwrap();
        assert!(!line.chars().any(char::is_control), "{line:?}");
        let receipt = Receipt {
            conversation_id: "d:1".into(),
            user: "bob\u{1b}[2J".into(),
            delivered_seq: 2,
            read_seq: 1,
        };
        let line = receipt_line(&receipt);
        assert!(!line.chars().any(char::is_control), "{line:?}");
        assert!(line.contains("has delivered 2 / read 1"), "{line}");
    }
}
