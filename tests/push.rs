//! Push notifications end to end: a real `courier serve` notifies offline devices through
//! in-test HTTP servers that speak each provider's request format (webhook, FCM v1, APNs over
//! HTTP/2), including their error answers.

mod support;

use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode, Uri};
use courier_client::Target;
use courier_client::proto::AckKind;
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use support::Server;

const WAIT: Duration = Duration::from_secs(30);

#[derive(Debug, Clone)]
struct Request {
    path: String,
    headers: HeaderMap,
    body: Bytes,
}

impl Request {
    fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_default()
    }
    fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
    }
}

/// A scripted answer: status, `Retry-After` and body.
type Scripted = (u16, &'static str, &'static str);

/// An in-test provider: records requests, answers from a script (then 200), except the OAuth
/// token endpoint, which always issues `test-access-token`.
#[derive(Clone, Default)]
struct Provider {
    seen: Arc<Mutex<Vec<Request>>>,
    script: Arc<Mutex<VecDeque<Scripted>>>,
}

impl Provider {
    async fn start() -> (SocketAddr, Provider) {
        let provider = Provider::default();
        let state = provider.clone();
        let app = axum::Router::new().fallback(move |uri: Uri, headers: HeaderMap, body: Bytes| {
            let state = state.clone();
            async move {
                let path = uri.path().to_owned();
                state.seen.lock().unwrap().push(Request {
                    path: path.clone(),
                    headers,
                    body,
                });
                if path == "/token" {
                    return (
                        StatusCode::OK,
                        [("retry-after", "0")],
                        r#"{"access_token":"test-access-token","expires_in":3600}"#.to_owned(),
                    );
                }
                let (status, retry_after, body) = state
                    .script
                    .lock()
                    .unwrap()
                    .pop_front()
                    .unwrap_or((200, "0", "{}"));
                (
                    StatusCode::from_u16(status).unwrap(),
                    [("retry-after", retry_after)],
                    body.to_owned(),
                )
            }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        (addr, provider)
    }

    fn answer(&self, status: u16, retry_after: &'static str, body: &'static str) {
        self.script
            .lock()
            .unwrap()
            .push_back((status, retry_after, body));
    }

    /// The requests to paths other than the token endpoint, once there are `n` of them.
    async fn wait_for(&self, n: usize) -> Vec<Request> {
        let deadline = std::time::Instant::now() + WAIT;
        loop {
            let sends: Vec<Request> = self
                .seen
                .lock()
                .unwrap()
                .iter()
                .filter(|r| r.path != "/token")
                .cloned()
                .collect();
            if sends.len() >= n {
                return sends;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "expected {n} notifications, got {}",
                sends.len()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

async fn register(server: &Server, user: &str, device: &str, provider: &str, token: &str) {
    let body = serde_json::json!({ "provider": provider, "token": token });
    let (status, body) = server
        .http(user, device)
        .request(reqwest::Method::PUT, "/v1/devices/me/push", Some(&body))
        .await
        .unwrap();
    assert_eq!(status, 204, "{body}");
}

async fn push_flag(server: &Server, user: &str, device: &str) -> bool {
    let (_, body) = server.http(user, "other").get("/v1/devices").await.unwrap();
    body["devices"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["device"] == device)
        .unwrap()["push"]
        .as_bool()
        .unwrap()
}

async fn wait_until_unregistered(server: &Server, user: &str, device: &str) {
    let deadline = std::time::Instant::now() + WAIT;
    while push_flag(server, user, device).await {
        assert!(
            std::time::Instant::now() < deadline,
            "the invalid token was not removed"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn webhook_args(addr: SocketAddr, collapse: &str) -> Vec<String> {
    vec![
        "--push-webhook-url".into(),
        format!("http://{addr}/hook"),
        "--push-webhook-secret".into(),
        "s3cret".into(),
        "--push-collapse".into(),
        collapse.into(),
    ]
}

fn start(dir: &std::path::Path, args: &[String]) -> Server {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Server::start_in(dir, &args)
}

#[tokio::test]
async fn webhook_notifies_only_devices_that_are_not_connected_with_a_valid_signature() {
    let (addr, provider) = Provider::start().await;
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), &webhook_args(addr, "0ms"));
    register(&server, "bob", "phone", "webhook", "tok-bob").await;
    let (status, body) = server
        .http("bob", "phone")
        .request(
            reqwest::Method::PUT,
            "/v1/devices/me/push",
            Some(&serde_json::json!({"provider": "apns", "token": "x"})),
        )
        .await
        .unwrap();
    assert_eq!(
        (status, body["code"].as_str()),
        (400, Some("bad_request")),
        "apns is not configured here"
    );

    let mut alice = server.connect("alice", "phone").await;
    let mut bob = server.connect("bob", "phone").await;
    bob.events_until_sync_done().await.unwrap();
    let first = alice
        .send_text(Target::User("bob".into()), "m1", "while online")
        .await
        .unwrap();
    assert_eq!(bob.next_event().await.unwrap().seq, first.seq);
    bob.ack(&first.conversation_id, first.seq, AckKind::Delivered)
        .await
        .unwrap();
    bob.close().await;
    while server.metric("courier_gateway_connections").await > 1 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let second = alice
        .send_text(Target::User("bob".into()), "m2", "secret words")
        .await
        .unwrap();

    let sent = provider.wait_for(1).await;
    let hook = &sent[0];
    assert_eq!(hook.path, "/hook");
    let body = hook.json();
    assert_eq!(body["device_token"], "tok-bob");
    assert_eq!(body["conversation_id"], second.conversation_id.as_str());
    assert_eq!(
        (body["seq"].as_u64(), body["count"].as_u64()),
        (Some(second.seq), Some(1))
    );
    assert_eq!(body["sender"], "alice");
    assert!(
        body.get("text").is_none(),
        "no message text unless configured"
    );
    let timestamp = hook.header("x-courier-timestamp");
    let expected = {
        use hmac::Mac;
        let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(b"s3cret").unwrap();
        mac.update(format!("{timestamp}.").as_bytes());
        mac.update(&hook.body);
        format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
    };
    assert_eq!(hook.header("x-courier-signature"), expected);
    alice.ping().await.unwrap();
    assert_eq!(
        provider.wait_for(1).await.len(),
        1,
        "the message seen while connected was not pushed"
    );
}

#[tokio::test]
async fn a_device_that_took_its_messages_while_the_push_waited_is_not_notified() {
    let (addr, provider) = Provider::start().await;
    let dir = tempfile::tempdir().unwrap();
    // A window long enough for bob to come and go on a slow machine.
    let server = start(dir.path(), &webhook_args(addr, "3s"));
    register(&server, "bob", "phone", "webhook", "tok-bob").await;
    let mut alice = server.connect("alice", "phone").await;
    alice.events_until_sync_done().await.unwrap();
    let mut carol = server.connect("carol", "phone").await;
    carol.events_until_sync_done().await.unwrap();
    // Bob is offline: alice's message waits out its collapse window for a push.
    let from_alice = alice
        .send_text(Target::User("bob".into()), "a1", "hi bob")
        .await
        .unwrap();
    // Bob comes online within the window, takes the message and leaves again.
    let mut bob = server.connect("bob", "phone").await;
    let caught_up = bob.events_until_sync_done().await.unwrap();
    assert_eq!(caught_up.last().map(|e| e.seq), Some(from_alice.seq));
    bob.ack(
        &from_alice.conversation_id,
        from_alice.seq,
        AckKind::Delivered,
    )
    .await
    .unwrap();
    bob.ping().await.unwrap();
    bob.close().await;
    while server.metric("courier_gateway_connections").await > 2 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // A later message from carol, which bob does not have, is the one push he gets.
    let from_carol = carol
        .send_text(Target::User("bob".into()), "c1", "hi from carol")
        .await
        .unwrap();
    let pushed = provider.wait_for(1).await;
    assert_eq!(
        pushed[0].json()["conversation_id"],
        from_carol.conversation_id.as_str(),
        "the first push is carol's: alice's message was delivered while its push waited"
    );
}

/// A message its user read on another device while its push waited (its collapse window, a
/// retry's backoff, a provider's `Retry-After`) is not pushed: the user's read cursor covers
/// it (PROTOCOL.md: the highest any of their devices acknowledged). Bob reads alice's message
/// on his phone; his tablet, offline, was notified of it all the same, a while after he had
/// read it.
#[tokio::test]
async fn a_message_read_on_another_device_while_its_push_waited_is_not_pushed() {
    let (addr, provider) = Provider::start().await;
    let dir = tempfile::tempdir().unwrap();
    // A window long enough for bob to read on a slow machine.
    let server = start(dir.path(), &webhook_args(addr, "3s"));
    register(&server, "bob", "tablet", "webhook", "tok-tablet").await;
    let mut alice = server.connect("alice", "phone").await;
    alice.events_until_sync_done().await.unwrap();
    let mut carol = server.connect("carol", "phone").await;
    carol.events_until_sync_done().await.unwrap();
    let mut phone = server.connect("bob", "phone").await;
    phone.events_until_sync_done().await.unwrap();
    let from_alice = alice
        .send_text(Target::User("bob".into()), "a1", "hi bob")
        .await
        .unwrap();
    assert_eq!(phone.next_event().await.unwrap().seq, from_alice.seq);
    phone
        .ack(&from_alice.conversation_id, from_alice.seq, AckKind::Read)
        .await
        .unwrap();
    phone.ping().await.unwrap();
    // A later message from carol, which bob has not read, is the one push his tablet gets.
    let from_carol = carol
        .send_text(Target::User("bob".into()), "c1", "hi from carol")
        .await
        .unwrap();
    let pushed = provider.wait_for(1).await;
    assert_eq!(
        pushed[0].json()["conversation_id"],
        from_carol.conversation_id.as_str(),
        "the first push is carol's: bob read alice's message while its push waited"
    );
    let text = server.metrics_text().await;
    assert!(
        text.contains("courier_push_notifications_total{outcome=\"read\"} 1"),
        "{text}"
    );
}

/// An app its OS suspended keeps its TCP connection, which takes the device's messages "live"
/// into a socket nobody reads until the server closes it for silence (`--ping-interval`): what
/// it was written then and the device did not acknowledge is pushed, as if the device had
/// been offline when it was sent. The notifier skipped the device while it counted as
/// connected, and none of it was ever pushed (the user saw no notification until they opened
/// the app). What the device acknowledged before the close is not pushed.
#[tokio::test]
async fn what_a_connection_closed_for_silence_took_and_did_not_acknowledge_is_pushed() {
    let (addr, provider) = Provider::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut args = webhook_args(addr, "0ms");
    args.extend(["--ping-interval".to_owned(), "2s".to_owned()]);
    let server = start(dir.path(), &args);
    register(&server, "bob", "phone", "webhook", "tok-bob").await;
    let mut alice = server.connect("alice", "phone").await;
    let mut carol = server.connect("carol", "phone").await;
    let mut bob = server.connect("bob", "phone").await;
    bob.events_until_sync_done().await.unwrap();
    // Bob's phone takes alice's message and acknowledges it...
    let read = alice
        .send_text(Target::User("bob".into()), "a1", "read")
        .await
        .unwrap();
    assert_eq!(bob.next_event().await.unwrap().seq, read.seq);
    bob.ack(&read.conversation_id, read.seq, AckKind::Delivered)
        .await
        .unwrap();
    // ...then its app is suspended: nothing reads its socket, which still counts as connected
    // when carol's message is written to it.
    let unread = carol
        .send_text(Target::User("bob".into()), "c1", "unread")
        .await
        .unwrap();
    assert_eq!(
        server.metric("courier_gateway_silent_closes_total").await,
        0,
        "bob's phone counted as connected when carol's message was sent"
    );
    alice.close().await;
    carol.close().await;

    let pushed = provider.wait_for(1).await;
    let body = pushed[0].json();
    assert_eq!(
        (
            body["conversation_id"].as_str(),
            body["seq"].as_u64(),
            body["count"].as_u64(),
            body["sender"].as_str(),
        ),
        (
            Some(unread.conversation_id.as_str()),
            Some(unread.seq),
            Some(1),
            Some("carol")
        ),
        "the message written to the silent connection is pushed"
    );
    assert_eq!(
        server.metric("courier_gateway_silent_closes_total").await,
        1
    );

    // A later message of alice's is pushed as usual: the one bob acknowledged never was (a
    // push of it would have left before this one).
    let mut alice = server.connect("alice", "phone").await;
    let later = alice
        .send_text(Target::User("bob".into()), "a2", "later")
        .await
        .unwrap();
    let pushed = provider.wait_for(2).await;
    let bodies: Vec<_> = pushed.iter().map(Request::json).collect();
    assert_eq!(bodies.len(), 2, "{bodies:?}");
    assert_eq!(
        (
            bodies[1]["conversation_id"].as_str(),
            bodies[1]["seq"].as_u64(),
            bodies[1]["count"].as_u64()
        ),
        (
            Some(read.conversation_id.as_str()),
            Some(later.seq),
            Some(1)
        ),
        "{bodies:?}"
    );
}

/// A message pushed while the device was offline, then written by the catch-up of a
/// connection whose app was suspended before it acknowledged it, is not pushed again when the
/// connection closes for silence: only what the connection took live after its catch-up was
/// not notified. It was pushed a second time.
#[tokio::test]
async fn a_message_pushed_while_offline_is_not_pushed_again_at_a_silent_close() {
    let (addr, provider) = Provider::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut args = webhook_args(addr, "0ms");
    args.extend(["--ping-interval".to_owned(), "2s".to_owned()]);
    let server = start(dir.path(), &args);
    register(&server, "bob", "phone", "webhook", "tok-bob").await;
    let mut alice = server.connect("alice", "phone").await;
    let offline = alice
        .send_text(Target::User("bob".into()), "a1", "while offline")
        .await
        .unwrap();
    assert_eq!(
        provider.wait_for(1).await[0].json()["seq"].as_u64(),
        Some(offline.seq)
    );
    alice.close().await;
    // Bob's app connects in the background, takes the message in its catch-up, and is
    // suspended before it acknowledges it.
    let mut bob = server.connect("bob", "phone").await;
    let caught_up = bob.events_until_sync_done().await.unwrap();
    assert_eq!(caught_up.last().map(|e| e.seq), Some(offline.seq));
    let deadline = std::time::Instant::now() + WAIT;
    while server.metric("courier_gateway_connections").await > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "bob's connection stayed"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        server.metric("courier_gateway_silent_closes_total").await,
        1
    );

    // Two later messages of carol's, each pushed after the one before, are the only other
    // pushes: a second push of alice's message would have left before the second of them.
    let mut carol = server.connect("carol", "phone").await;
    for (n, id) in [(2, "c1"), (3, "c2")] {
        let sent = carol
            .send_text(Target::User("bob".into()), id, "later")
            .await
            .unwrap();
        let pushed = provider.wait_for(n).await;
        let bodies: Vec<_> = pushed.iter().map(Request::json).collect();
        assert_eq!(
            (
                bodies.len(),
                bodies[n - 1]["conversation_id"].as_str(),
                bodies[n - 1]["seq"].as_u64()
            ),
            (n, Some(sent.conversation_id.as_str()), Some(sent.seq)),
            "{bodies:?}"
        );
    }
}

#[tokio::test]
async fn a_device_signed_in_again_after_an_unlink_gets_push_once_it_registers() {
    let (addr, provider) = Provider::start().await;
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), &webhook_args(addr, "0ms"));
    register(&server, "bob", "phone", "webhook", "tok-old").await;
    let (status, _) = server
        .http("bob", "other")
        .delete("/v1/devices/phone")
        .await
        .unwrap();
    assert_eq!(status, 204);

    let fresh = support::token_with_iat(dir.path(), "bob", "phone", 5);
    let body = serde_json::json!({ "provider": "webhook", "token": "tok-new" });
    let (status, body) = courier_client::HttpApi::new(&server.http_url(), &fresh)
        .unwrap()
        .request(reqwest::Method::PUT, "/v1/devices/me/push", Some(&body))
        .await
        .unwrap();
    assert_eq!(status, 204, "{body}");
    assert!(push_flag(&server, "bob", "phone").await);

    let mut alice = server.connect("alice", "phone").await;
    let sent = alice
        .send_text(Target::User("bob".into()), "m1", "hello again")
        .await
        .unwrap();
    let hook = provider.wait_for(1).await[0].json();
    assert_eq!(hook["device_token"], "tok-new");
    assert_eq!(hook["seq"].as_u64(), Some(sent.seq));
}

#[tokio::test]
async fn notifications_collapse_per_conversation_and_retries_honour_the_provider() {
    let (addr, provider) = Provider::start().await;
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), &webhook_args(addr, "1s"));
    register(&server, "bob", "phone", "webhook", "tok-bob").await;
    provider.answer(429, "1", "slow down");
    let mut alice = server.connect("alice", "phone").await;
    for i in 1..=3 {
        alice
            .send_text(Target::User("bob".into()), &format!("m{i}"), "x")
            .await
            .unwrap();
    }
    let attempts = provider.wait_for(2).await;
    for attempt in &attempts {
        assert_eq!(
            (
                attempt.json()["count"].as_u64(),
                attempt.json()["seq"].as_u64()
            ),
            (Some(3), Some(3)),
            "one notification for three messages"
        );
    }
    let text = server.metrics_text().await;
    assert!(
        text.contains("courier_push_notifications_total{outcome=\"retried\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("courier_push_notifications_total{outcome=\"sent\"} 1"),
        "{text}"
    );

    provider.answer(410, "0", "gone");
    alice
        .send_text(Target::User("bob".into()), "m4", "x")
        .await
        .unwrap();
    wait_until_unregistered(&server, "bob", "phone").await;
}

#[tokio::test]
async fn fcm_v1_gets_an_oauth_token_and_the_v1_message_format() {
    let (addr, provider) = Provider::start().await;
    let dir = tempfile::tempdir().unwrap();
    let key = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../tests/fixtures/fcm-test-key.pem"
    ))
    .unwrap();
    let account = serde_json::json!({
        "type": "service_account",
        "project_id": "courier-test",
        "client_email": "push@courier-test.iam.gserviceaccount.com",
        "private_key": key,
        "token_uri": format!("http://{addr}/token"),
    });
    let account_file = dir.path().join("service-account.json");
    std::fs::write(&account_file, account.to_string()).unwrap();
    let data = dir.path().join("data");
    let server = start(
        &data,
        &[
            "--fcm-service-account".into(),
            account_file.display().to_string(),
            "--fcm-endpoint".into(),
            format!("http://{addr}"),
            "--push-collapse".into(),
            "0ms".into(),
        ],
    );
    register(&server, "bob", "phone", "fcm", "fcm-bob").await;
    let mut alice = server.connect("alice", "phone").await;
    let sent = alice
        .send_text(Target::User("bob".into()), "m1", "x")
        .await
        .unwrap();
    let request = provider.wait_for(1).await.remove(0);
    assert_eq!(request.path, "/v1/projects/courier-test/messages:send");
    assert_eq!(request.header("authorization"), "Bearer test-access-token");
    let message = &request.json()["message"];
    assert_eq!(message["token"], "fcm-bob");
    assert_eq!(
        message["data"]["seq"],
        sent.seq.to_string(),
        "FCM data values are strings"
    );
    assert_eq!(
        message["data"]["conversation_id"],
        sent.conversation_id.as_str()
    );
    assert_eq!(
        message["android"]["collapse_key"],
        sent.conversation_id.as_str()
    );

    let token_request = provider
        .seen
        .lock()
        .unwrap()
        .iter()
        .find(|r| r.path == "/token")
        .cloned()
        .unwrap();
    let form: Vec<(String, String)> = serde_urlencoded::from_bytes(&token_request.body).unwrap();
    assert!(form.contains(&(
        "grant_type".into(),
        "urn:ietf:params:oauth:grant-type:jwt-bearer".into()
    )));
    let assertion = &form.iter().find(|(k, _)| k == "assertion").unwrap().1;
    let public = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../tests/fixtures/fcm-test-key.pub.pem"
    ))
    .unwrap();
    let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::RS256);
    validation.set_audience(&[format!("http://{addr}/token")]);
    let claims = jsonwebtoken::decode::<serde_json::Value>(
        assertion,
        &jsonwebtoken::DecodingKey::from_rsa_pem(&public).unwrap(),
        &validation,
    )
    .expect("the assertion is signed with the service account's key")
    .claims;
    assert_eq!(claims["iss"], "push@courier-test.iam.gserviceaccount.com");
    assert_eq!(
        claims["scope"],
        "https://www.googleapis.com/auth/firebase.messaging"
    );

    register(&server, "carol", "phone", "fcm", "fcm-dead").await;
    provider.answer(404, "0", r#"{"error":{"code":404,"status":"NOT_FOUND","details":[{"@type":"type.googleapis.com/google.firebase.fcm.v1.FcmError","errorCode":"UNREGISTERED"}]}}"#);
    alice
        .send_text(Target::User("carol".into()), "c1", "x")
        .await
        .unwrap();
    wait_until_unregistered(&server, "carol", "phone").await;
}

#[tokio::test]
async fn apns_gets_http2_requests_with_token_auth_and_collapse_ids() {
    let (addr, provider) = Provider::start().await;
    let dir = tempfile::tempdir().unwrap();
    let key_file = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../tests/fixtures/apns-test-key.p8"
    );
    let server = start(
        dir.path(),
        &[
            "--apns-key-file".into(),
            key_file.into(),
            "--apns-key-id".into(),
            "KEY1234567".into(),
            "--apns-team-id".into(),
            "TEAM123456".into(),
            "--apns-topic".into(),
            "dev.courier.app".into(),
            "--apns-endpoint".into(),
            format!("http://{addr}"),
            "--push-collapse".into(),
            "0ms".into(),
        ],
    );
    register(&server, "bob", "phone", "apns", "apns-bob").await;
    let mut alice = server.connect("alice", "phone").await;
    let sent = alice
        .send_text(Target::User("bob".into()), "m1", "x")
        .await
        .unwrap();
    let request = provider.wait_for(1).await.remove(0);
    assert_eq!(request.path, "/3/device/apns-bob");
    assert_eq!(request.header("apns-topic"), "dev.courier.app");
    assert_eq!(request.header("apns-push-type"), "alert");
    assert_eq!(request.header("apns-collapse-id"), sent.conversation_id);
    let body = request.json();
    assert_eq!(body["seq"], sent.seq);
    assert_eq!(body["aps"]["alert"]["title"], "alice");
    let token = request
        .header("authorization")
        .strip_prefix("bearer ")
        .unwrap();
    let public = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../tests/fixtures/apns-test-key.pub.pem"
    ))
    .unwrap();
    let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::ES256);
    validation.set_required_spec_claims::<&str>(&[]);
    validation.validate_exp = false;
    let decoded = jsonwebtoken::decode::<serde_json::Value>(
        token,
        &jsonwebtoken::DecodingKey::from_ec_pem(&public).unwrap(),
        &validation,
    )
    .expect("the provider token is signed with the .p8 key");
    assert_eq!(decoded.header.kid.as_deref(), Some("KEY1234567"));
    assert_eq!(decoded.claims["iss"], "TEAM123456");

    provider.answer(410, "0", r#"{"reason":"Unregistered"}"#);
    alice
        .send_text(Target::User("bob".into()), "m2", "x")
        .await
        .unwrap();
    wait_until_unregistered(&server, "bob", "phone").await;
}

#[tokio::test]
async fn a_crash_between_commit_and_push_loses_no_notification() {
    let (addr, provider) = Provider::start().await;
    let dir = tempfile::tempdir().unwrap();
    // First the provider is unreachable: whatever the notifier did before the crash (nothing,
    // expanded the intent, or failed an attempt), the notification is still owed afterwards.
    let unreachable = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let mut server = start(dir.path(), &webhook_args(unreachable, "0ms"));
    register(&server, "bob", "phone", "webhook", "tok-bob").await;
    let mut alice = server.connect("alice", "phone").await;
    let sent = alice
        .send_text(Target::User("bob".into()), "m1", "x")
        .await
        .unwrap();
    server.kill9();
    let _server = start(dir.path(), &webhook_args(addr, "0ms"));
    let hook = provider.wait_for(1).await.remove(0);
    assert_eq!(hook.json()["seq"].as_u64(), Some(sent.seq));
}
