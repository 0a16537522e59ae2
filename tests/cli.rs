//! The command line as a person uses it: `courier token`, public-key tokens, and two
//! `courier chat` sessions exchanging a message and a photo.

mod support;

use courier_client::proto::Encoding;
use courier_client::{Client, ClientError};
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;
use support::Server;

const WAIT: Duration = Duration::from_secs(60);
const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures");

#[tokio::test]
async fn courier_token_mints_tokens_the_server_accepts() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_in(dir.path(), &[]);
    let output = Command::new(env!("CARGO_BIN_EXE_courier"))
        .args([
            "token",
            "--user",
            "alice",
            "--device",
            "phone",
            "--ttl",
            "1h",
            "--data-dir",
        ])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let token = String::from_utf8(output.stdout).unwrap();
    let client = Client::connect(&server.ws_url(), token.trim(), Encoding::Json)
        .await
        .unwrap();
    assert_eq!(client.hello().user, "alice");

    let refused = Command::new(env!("CARGO_BIN_EXE_courier"))
        .args([
            "token",
            "--user",
            "bad user",
            "--device",
            "phone",
            "--data-dir",
        ])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!refused.status.success(), "invalid user ids are refused");
}

#[tokio::test]
async fn eddsa_public_keys_verify_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_in(
        dir.path(),
        &[
            "--jwt-public-key",
            &format!("{FIXTURES}/jwt-test-ed25519.pub.pem"),
            "--jwt-algorithm",
            "EdDSA",
        ],
    );
    let key = std::fs::read(format!("{FIXTURES}/jwt-test-ed25519.pem")).unwrap();
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 600;
    let token = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::EdDSA),
        &serde_json::json!({ "sub": "alice", "dev": "phone", "exp": exp }),
        &jsonwebtoken::EncodingKey::from_ed_pem(&key).unwrap(),
    )
    .unwrap();
    Client::connect(&server.ws_url(), &token, Encoding::Json)
        .await
        .expect("EdDSA token accepted");
    let hs256 = jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &serde_json::json!({ "sub": "alice", "dev": "phone", "exp": exp }),
        &jsonwebtoken::EncodingKey::from_secret(b"guess"),
    )
    .unwrap();
    assert!(matches!(
        Client::connect(&server.ws_url(), &hs256, Encoding::Json).await,
        Err(ClientError::Rejected(401))
    ));
}

/// A `courier chat` process whose output lines arrive on a channel.
struct Chat {
    child: Child,
    input: ChildStdin,
    lines: mpsc::Receiver<String>,
}

impl Chat {
    fn start(server: &Server, user: &str, peer: &str) -> Chat {
        let mut child = Command::new(env!("CARGO_BIN_EXE_courier"))
            .args([
                "chat",
                "--url",
                &server.ws_url(),
                "--user",
                user,
                "--device",
                "cli",
                "--to",
                peer,
                "--data-dir",
            ])
            .arg(&server.data_dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let input = child.stdin.take().unwrap();
        let output = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(output).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let mut chat = Chat {
            child,
            input,
            lines,
        };
        chat.expect("connected as");
        chat
    }

    fn say(&mut self, line: &str) {
        writeln!(self.input, "{line}").unwrap();
    }

    /// The first line containing `needle`.
    fn expect(&mut self, needle: &str) -> String {
        loop {
            let line = self
                .lines
                .recv_timeout(WAIT)
                .unwrap_or_else(|_| panic!("no line with {needle:?}"));
            if line.contains(needle) {
                return line;
            }
        }
    }
}

impl Drop for Chat {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn two_chat_sessions_exchange_a_message_and_a_photo() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_in(dir.path(), &[]);
    let mut bob = Chat::start(&server, "bob", "alice");
    let mut alice = Chat::start(&server, "alice", "bob");
    alice.say("hello bob");
    alice.expect("sent (seq 1)");
    bob.expect("alice: hello bob");

    let photo: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    let photo_path = dir.path().join("photo.jpg");
    std::fs::write(&photo_path, &photo).unwrap();
    alice.say(&format!("/send-file {}", photo_path.display()));
    alice.expect("file sent");
    let shared = bob.expect("alice shared photo.jpg");
    assert!(shared.contains("image/jpeg"), "{shared}");
    let media_id = shared
        .split("/fetch ")
        .nth(1)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned();
    let saved = dir.path().join("received.jpg");
    bob.say(&format!("/fetch {media_id} {}", saved.display()));
    bob.expect("saved 200000 bytes");
    assert_eq!(std::fs::read(&saved).unwrap(), photo);
}
