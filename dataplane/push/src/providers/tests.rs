//! The providers against in-test servers on 127.0.0.1 that check each provider's real request
//! format (FCM v1 and its OAuth token exchange, APNs over cleartext HTTP/2, the signed webhook)
//! and answer as the real services do, errors included. The notifier's use of them (collapse,
//! retries, removing dead tokens) is tested end to end in `tests/push.rs`.

use super::*;
use axum::body::Bytes;
use axum::http::{HeaderMap, Method, StatusCode, Uri, Version};
use clap::Parser;
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

fn fixture(name: &str) -> String {
    let path = format!("{}/../../tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// A request as the in-test provider received it.
#[derive(Debug, Clone)]
struct Seen {
    method: Method,
    path: String,
    version: Version,
    headers: HeaderMap,
    body: Bytes,
}

impl Seen {
    fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).expect("a JSON body")
    }
    fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .map(|v| v.to_str().unwrap())
            .unwrap_or_default()
    }
}

/// A scripted answer: status, headers, body.
type Reply = (u16, Vec<(&'static str, String)>, String);

fn reply(status: u16, body: &str) -> Reply {
    (status, Vec::new(), body.to_owned())
}

fn reply_after(status: u16, retry_after: &str, body: &str) -> Reply {
    (
        status,
        vec![("retry-after", retry_after.to_owned())],
        body.to_owned(),
    )
}

/// An in-test provider: records every request and answers from a script (then 200 `{}`).
/// `POST /token` is an OAuth token endpoint with its own script; by default it issues
/// `access-1`, `access-2`... valid for an hour.
#[derive(Clone, Default)]
struct ProviderServer {
    addr: Option<SocketAddr>,
    seen: Arc<Mutex<Vec<Seen>>>,
    replies: Arc<Mutex<VecDeque<Reply>>>,
    token_replies: Arc<Mutex<VecDeque<Reply>>>,
    tokens_issued: Arc<AtomicU32>,
}

impl ProviderServer {
    async fn start() -> Self {
        let mut server = Self::default();
        let state = server.clone();
        let app = axum::Router::new().fallback(
            move |method: Method, uri: Uri, version: Version, headers: HeaderMap, body: Bytes| {
                let state = state.clone();
                async move { state.answer(method, uri, version, headers, body) }
            },
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        server.addr = Some(listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        server
    }

    fn answer(
        &self,
        method: Method,
        uri: Uri,
        version: Version,
        headers: HeaderMap,
        body: Bytes,
    ) -> (StatusCode, HeaderMap, String) {
        let path = uri.path().to_owned();
        self.seen.lock().unwrap().push(Seen {
            method,
            path: path.clone(),
            version,
            headers,
            body,
        });
        let scripted = if path == "/token" {
            self.token_replies.lock().unwrap().pop_front().or_else(|| {
                let n = self.tokens_issued.fetch_add(1, Ordering::SeqCst) + 1;
                Some(reply(
                    200,
                    &format!(
                        r#"{{"access_token":"access-{n}","expires_in":3600,"token_type":"Bearer"}}"#
                    ),
                ))
            })
        } else {
            self.replies.lock().unwrap().pop_front()
        };
        let (status, headers, body) = scripted.unwrap_or_else(|| reply(200, "{}"));
        let mut map = HeaderMap::new();
        map.insert("content-type", "application/json".parse().unwrap());
        for (name, value) in headers {
            map.insert(name, value.parse().unwrap());
        }
        (StatusCode::from_u16(status).unwrap(), map, body)
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr.unwrap())
    }

    fn script(&self, reply: Reply) {
        self.replies.lock().unwrap().push_back(reply);
    }

    fn script_token(&self, reply: Reply) {
        self.token_replies.lock().unwrap().push_back(reply);
    }

    /// The requests to paths other than `/token`, in order.
    fn sends(&self) -> Vec<Seen> {
        self.requests(|path| path != "/token")
    }

    /// The requests to `/token`, in order.
    fn token_requests(&self) -> Vec<Seen> {
        self.requests(|path| path == "/token")
    }

    fn requests(&self, keep: impl Fn(&str) -> bool) -> Vec<Seen> {
        let seen = self.seen.lock().unwrap();
        seen.iter().filter(|r| keep(&r.path)).cloned().collect()
    }
}

fn notification() -> Notification {
    Notification {
        conversation_id: "d:alice:bob".into(),
        seq: 42,
        sender: "alice".into(),
        count: 3,
        text: None,
        quiet: false,
    }
}

fn quiet() -> Notification {
    Notification {
        conversation_id: "g:1234".into(),
        count: 1,
        quiet: true,
        ..notification()
    }
}

fn with_text(text: &str) -> Notification {
    Notification {
        text: Some(text.into()),
        ..notification()
    }
}

const CLIENT_EMAIL: &str = "push@courier-test.iam.gserviceaccount.com";

fn service_account(token_uri: &str) -> String {
    serde_json::json!({
        "type": "service_account",
        "project_id": "courier-test",
        "private_key_id": "0123456789abcdef",
        "private_key": fixture("fcm-test-key.pem"),
        "client_email": CLIENT_EMAIL,
        "client_id": "1234567890",
        "token_uri": token_uri,
    })
    .to_string()
}

fn fcm(server: &ProviderServer) -> Fcm {
    let account = service_account(&format!("{}/token", server.url()));
    Fcm::new(&account, None, &server.url(), None).unwrap()
}

/// Checks the JWT-bearer token request and returns the assertion's verified claims.
fn verified_assertion(request: &Seen, token_uri: &str) -> serde_json::Value {
    assert_eq!(request.method, Method::POST);
    assert_eq!(
        request.header("content-type"),
        "application/x-www-form-urlencoded"
    );
    let form: Vec<(String, String)> = serde_urlencoded::from_bytes(&request.body).unwrap();
    assert_eq!(form.len(), 2, "{form:?}");
    assert!(form.contains(&(
        "grant_type".into(),
        "urn:ietf:params:oauth:grant-type:jwt-bearer".into()
    )));
    let assertion = &form.iter().find(|(k, _)| k == "assertion").unwrap().1;
    let public = fixture("fcm-test-key.pub.pem");
    let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::RS256);
    validation.set_audience(&[token_uri]);
    validation.set_issuer(&[CLIENT_EMAIL]);
    validation.set_required_spec_claims(&["exp", "iat", "iss", "aud"]);
    let decoded = jsonwebtoken::decode::<serde_json::Value>(
        assertion,
        &jsonwebtoken::DecodingKey::from_rsa_pem(public.as_bytes()).unwrap(),
        &validation,
    )
    .expect("the assertion is signed with the service account's key");
    assert_eq!(decoded.header.alg, jsonwebtoken::Algorithm::RS256);
    let claims = decoded.claims;
    assert_eq!(
        claims["scope"],
        "https://www.googleapis.com/auth/firebase.messaging"
    );
    assert_eq!(
        claims["exp"].as_u64().unwrap() - claims["iat"].as_u64().unwrap(),
        3600,
        "an assertion is valid for one hour"
    );
    claims
}

#[tokio::test]
async fn fcm_exchanges_a_signed_assertion_once_and_sends_v1_messages() {
    let server = ProviderServer::start().await;
    let fcm = fcm(&server);
    fcm.send("fcm-token-1", &notification()).await.unwrap();
    fcm.send("fcm-token-2", &quiet()).await.unwrap();

    let tokens = server.token_requests();
    assert_eq!(tokens.len(), 1, "the access token is cached");
    verified_assertion(&tokens[0], &format!("{}/token", server.url()));

    let sends = server.sends();
    assert_eq!(sends.len(), 2);
    for send in &sends {
        assert_eq!(send.method, Method::POST);
        assert_eq!(send.path, "/v1/projects/courier-test/messages:send");
        assert_eq!(send.header("authorization"), "Bearer access-1");
        assert_eq!(send.header("content-type"), "application/json");
    }
    assert_eq!(
        sends[0].json(),
        serde_json::json!({"message": {
            "token": "fcm-token-1",
            "data": {
                "conversation_id": "d:alice:bob",
                "seq": "42",
                "sender": "alice",
                "count": "3",
            },
            "android": {"collapse_key": "d:alice:bob", "priority": "high"},
            "apns": {
                "headers": {
                    "apns-collapse-id": "d:alice:bob",
                    "apns-push-type": "alert",
                    "apns-priority": "10",
                },
                "payload": {"aps": {
                    "alert": {"title": "alice", "body": "3 new messages"},
                    "thread-id": "d:alice:bob",
                    "sound": "default",
                    "mutable-content": 1,
                }},
            },
        }}),
        "no text, no `notification` block: the app renders it"
    );
    assert_eq!(
        sends[1].json(),
        serde_json::json!({"message": {
            "token": "fcm-token-2",
            "data": {
                "conversation_id": "g:1234",
                "seq": "42",
                "sender": "alice",
                "count": "1",
            },
            "android": {"collapse_key": "g:1234", "priority": "normal"},
            "apns": {
                "headers": {
                    "apns-collapse-id": "g:1234",
                    "apns-push-type": "background",
                    "apns-priority": "5",
                },
                "payload": {"aps": {"content-available": 1}},
            },
        }})
    );
}

#[tokio::test]
async fn fcm_shows_the_text_only_when_given_and_shortened() {
    let server = ProviderServer::start().await;
    let fcm = fcm(&server);
    fcm.send("t", &with_text("see you at 8")).await.unwrap();
    let long = "é".repeat(3000);
    fcm.send("t", &with_text(&long)).await.unwrap();
    let quiet_with_text = Notification {
        text: Some("hidden".into()),
        ..quiet()
    };
    fcm.send("t", &quiet_with_text).await.unwrap();

    let sends = server.sends();
    let message = &sends[0].json()["message"];
    assert_eq!(
        message["notification"],
        serde_json::json!({"title": "alice", "body": "see you at 8"})
    );
    assert_eq!(message["android"]["notification"]["tag"], "d:alice:bob");
    assert_eq!(
        message["apns"]["payload"]["aps"]["alert"]["body"],
        "see you at 8"
    );
    let body = sends[1].json()["message"]["notification"]["body"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        body.len() <= MAX_TEXT_BYTES && body.ends_with('…'),
        "{body}"
    );
    assert!(long.starts_with(body.trim_end_matches('…')));
    let message = &sends[2].json()["message"];
    assert!(message.get("notification").is_none(), "{message}");
    assert!(!sends[2].body.windows(6).any(|w| w == b"hidden"));
}

#[tokio::test]
async fn fcm_errors_are_retried_given_up_or_mark_the_token_invalid() {
    let server = ProviderServer::start().await;
    let fcm = fcm(&server);
    let unregistered = r#"{"error":{"code":404,"message":"Requested entity was not found.","status":"NOT_FOUND","details":[{"@type":"type.googleapis.com/google.firebase.fcm.v1.FcmError","errorCode":"UNREGISTERED"}]}}"#;
    let bad_token = r#"{"error":{"code":400,"message":"The registration token is not a valid FCM registration token","status":"INVALID_ARGUMENT","details":[{"@type":"type.googleapis.com/google.firebase.fcm.v1.FcmError","errorCode":"INVALID_ARGUMENT"}]}}"#;
    let quota = r#"{"error":{"code":429,"status":"RESOURCE_EXHAUSTED","details":[{"@type":"type.googleapis.com/google.firebase.fcm.v1.FcmError","errorCode":"QUOTA_EXCEEDED"}]}}"#;
    let mismatch = r#"{"error":{"code":403,"status":"PERMISSION_DENIED","details":[{"@type":"type.googleapis.com/google.firebase.fcm.v1.FcmError","errorCode":"SENDER_ID_MISMATCH"}]}}"#;
    let cases = [
        (
            reply_after(429, "7", quota),
            PushError::Throttled {
                after: Some(Duration::from_secs(7)),
            },
        ),
        (
            reply(500, r#"{"error":{"code":500,"status":"INTERNAL"}}"#),
            PushError::Retry { after: None },
        ),
        (reply(404, unregistered), PushError::InvalidToken),
        (reply(400, bad_token), PushError::InvalidToken),
    ];
    for (answer, expected) in cases {
        server.script(answer.clone());
        assert_eq!(
            fcm.send("t", &notification()).await,
            Err(expected),
            "{answer:?}"
        );
    }
    server.script(reply(403, mismatch));
    let refused = fcm.send("t", &notification()).await;
    assert!(
        matches!(&refused, Err(PushError::Rejected(why)) if why.contains("SENDER_ID_MISMATCH")),
        "{refused:?}"
    );
    assert_eq!(
        server.token_requests().len(),
        1,
        "none of these is about the OAuth token"
    );
}

#[tokio::test]
async fn fcm_renews_an_access_token_it_refuses_once() {
    let server = ProviderServer::start().await;
    let fcm = fcm(&server);
    let unauthenticated = r#"{"error":{"code":401,"message":"Request had invalid authentication credentials.","status":"UNAUTHENTICATED"}}"#;
    server.script(reply(401, unauthenticated));
    fcm.send("t", &notification()).await.unwrap();
    let sends = server.sends();
    assert_eq!(
        sends
            .iter()
            .map(|s| s.header("authorization"))
            .collect::<Vec<_>>(),
        ["Bearer access-1", "Bearer access-2"]
    );
    assert_eq!(server.token_requests().len(), 2);

    server.script(reply(401, unauthenticated));
    server.script(reply(401, unauthenticated));
    assert!(matches!(
        fcm.send("t", &notification()).await,
        Err(PushError::Rejected(_))
    ));
    assert_eq!(
        server.sends().len(),
        4,
        "one renewal per notification, not a loop"
    );
}

#[tokio::test]
async fn fcm_token_endpoint_failures_never_blame_the_device_token() {
    let server = ProviderServer::start().await;
    let fcm = fcm(&server);
    server.script_token(reply(
        400,
        r#"{"error":"invalid_grant","error_description":"Invalid JWT Signature."}"#,
    ));
    let refused = fcm.send("t", &notification()).await;
    assert!(
        matches!(&refused, Err(PushError::Rejected(why)) if why.contains("invalid_grant")),
        "{refused:?}"
    );
    server.script_token(reply(410, "gone"));
    assert!(matches!(
        fcm.send("t", &notification()).await,
        Err(PushError::Rejected(_))
    ));
    server.script_token(reply_after(503, "4", "busy"));
    assert_eq!(
        fcm.send("t", &notification()).await,
        Err(PushError::Retry {
            after: Some(Duration::from_secs(4))
        })
    );
    assert!(server.sends().is_empty(), "nothing sent without a token");
    fcm.send("t", &notification()).await.unwrap();
    assert_eq!(server.sends()[0].header("authorization"), "Bearer access-1");
}

/// A token endpoint that names a lifetime past any clock's range gets its token used and
/// renewed within the hour, not a panic.
#[tokio::test]
async fn fcm_keeps_an_access_token_an_hour_at_most() {
    let server = ProviderServer::start().await;
    let fcm = fcm(&server);
    server.script_token(reply(
        200,
        r#"{"access_token":"forever","expires_in":18446744073709551615,"token_type":"Bearer"}"#,
    ));
    fcm.send("t", &notification()).await.unwrap();
    fcm.send("t", &notification()).await.unwrap();
    let sends = server.sends();
    assert_eq!(sends[0].header("authorization"), "Bearer forever");
    assert_eq!(sends[1].header("authorization"), "Bearer forever");
    assert_eq!(server.token_requests().len(), 1);
}

const KEY_ID: &str = "KEY1234567";
const TEAM_ID: &str = "TEAM123456";
const TOPIC: &str = "dev.courier.app";

fn apns(server: &ProviderServer) -> Apns {
    Apns::new(
        fixture("apns-test-key.p8").as_bytes(),
        KEY_ID,
        TEAM_ID,
        TOPIC,
        &server.url(),
    )
    .unwrap()
}

/// Verifies an APNs `authorization: bearer <jwt>` header with the test key's public half.
fn verified_provider_token(request: &Seen) -> serde_json::Value {
    let token = request
        .header("authorization")
        .strip_prefix("bearer ")
        .expect("authorization: bearer <provider token>");
    let public = fixture("apns-test-key.pub.pem");
    let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::ES256);
    validation.set_required_spec_claims(&["iss", "iat"]);
    validation.set_issuer(&[TEAM_ID]);
    validation.validate_exp = false;
    let decoded = jsonwebtoken::decode::<serde_json::Value>(
        token,
        &jsonwebtoken::DecodingKey::from_ec_pem(public.as_bytes()).unwrap(),
        &validation,
    )
    .expect("the provider token is signed with the .p8 key");
    assert_eq!(decoded.header.alg, jsonwebtoken::Algorithm::ES256);
    assert_eq!(decoded.header.kid.as_deref(), Some(KEY_ID));
    assert!(decoded.claims["iat"].as_u64().unwrap() <= now_secs());
    decoded.claims
}

#[tokio::test]
async fn apns_sends_over_http2_with_an_es256_provider_token_and_collapse_ids() {
    let server = ProviderServer::start().await;
    let apns = apns(&server);
    let device = "a1b2".repeat(16);
    apns.send(&device, &notification()).await.unwrap();
    apns.send(&device, &quiet()).await.unwrap();

    let sends = server.sends();
    assert_eq!(sends.len(), 2);
    for send in &sends {
        assert_eq!(send.version, Version::HTTP_2, "APNs speaks HTTP/2 only");
        assert_eq!(send.method, Method::POST);
        assert_eq!(send.path, format!("/3/device/{device}"));
        assert_eq!(send.header("apns-topic"), TOPIC);
        verified_provider_token(send);
    }
    assert_eq!(
        sends[0].header("authorization"),
        sends[1].header("authorization"),
        "the provider token is reused"
    );
    assert_eq!(sends[0].header("apns-push-type"), "alert");
    assert_eq!(sends[0].header("apns-priority"), "10");
    assert_eq!(sends[0].header("apns-collapse-id"), "d:alice:bob");
    assert_eq!(
        sends[0].json(),
        serde_json::json!({
            "aps": {
                "alert": {"title": "alice", "body": "3 new messages"},
                "thread-id": "d:alice:bob",
                "sound": "default",
                "mutable-content": 1,
            },
            "conversation_id": "d:alice:bob",
            "seq": 42,
            "sender": "alice",
            "count": 3,
        })
    );
    assert_eq!(sends[1].header("apns-push-type"), "background");
    assert_eq!(sends[1].header("apns-priority"), "5");
    assert_eq!(sends[1].header("apns-collapse-id"), "g:1234");
    assert_eq!(
        sends[1].json(),
        serde_json::json!({
            "aps": {"content-available": 1},
            "conversation_id": "g:1234",
            "seq": 42,
            "sender": "alice",
            "count": 1,
        })
    );

    apns.send(&device, &with_text("see you at 8"))
        .await
        .unwrap();
    assert_eq!(
        server.sends()[2].json()["aps"]["alert"],
        serde_json::json!({"title": "alice", "body": "see you at 8"})
    );
}

#[tokio::test]
async fn apns_errors_are_retried_given_up_or_mark_the_token_invalid() {
    let server = ProviderServer::start().await;
    let apns = apns(&server);
    let cases = [
        (
            reply(
                410,
                r#"{"reason":"Unregistered","timestamp":1700000000000}"#,
            ),
            Err(PushError::InvalidToken),
        ),
        (
            reply_after(429, "3", r#"{"reason":"TooManyRequests"}"#),
            Err(PushError::Throttled {
                after: Some(Duration::from_secs(3)),
            }),
        ),
        (
            reply(503, r#"{"reason":"ServiceUnavailable"}"#),
            Err(PushError::Retry { after: None }),
        ),
        (
            reply(400, r#"{"reason":"DeviceTokenNotForTopic"}"#),
            Err(PushError::Rejected(
                "APNs 400 Bad Request: DeviceTokenNotForTopic".into(),
            )),
        ),
    ];
    for (answer, expected) in cases {
        server.script(answer.clone());
        assert_eq!(
            apns.send("abcd", &notification()).await,
            expected,
            "{answer:?}"
        );
    }

    // An expired provider token is renewed and the notification sent again, once.
    server.script(reply(403, r#"{"reason":"ExpiredProviderToken"}"#));
    apns.send("abcd", &notification()).await.unwrap();
    let sends = server.sends();
    assert_eq!(sends.len(), 6);
    verified_provider_token(&sends[5]);

    // A token that is not one path segment is refused before any request.
    assert_eq!(
        apns.send("../../3/device/other", &notification()).await,
        Err(PushError::InvalidToken)
    );
    assert_eq!(server.sends().len(), 6);
}

/// APNs answers 400 `BadDeviceToken` for a token of its other environment (a development
/// build's token sent to production) as for a token of no use, and Apple's word is to check
/// the environment: such a token was removed, and a device of the other environment never
/// got a notification again. It is sent to the other environment, delivered there, and kept;
/// a token both environments refuse is dead. With no other environment known (an endpoint
/// not Apple's), it is kept.
#[tokio::test]
async fn apns_tries_a_bad_device_token_in_the_other_environment_before_it_is_dropped() {
    let (production, sandbox) = (ProviderServer::start().await, ProviderServer::start().await);
    let both = apns(&production).with_other_environment(&sandbox.url());
    let bad = || reply(400, r#"{"reason":"BadDeviceToken"}"#);

    production.script(bad());
    assert_eq!(both.send("abcd", &notification()).await, Ok(()));
    let delivered = sandbox.sends();
    assert_eq!(delivered.len(), 1);
    assert_eq!(delivered[0].path, "/3/device/abcd");
    assert_eq!(delivered[0].json(), Apns::payload(&notification()));
    verified_provider_token(&delivered[0]);

    production.script(bad());
    sandbox.script(bad());
    let refused = both.send("abcd", &notification()).await;
    assert_eq!(refused, Err(PushError::InvalidToken));

    let relay = ProviderServer::start().await;
    relay.script(bad());
    match apns(&relay).send("abcd", &notification()).await {
        Err(PushError::Rejected(why)) => assert!(why.contains("BadDeviceToken"), "{why}"),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn webhook_posts_signed_json_and_reads_the_answer() {
    let server = ProviderServer::start().await;
    let secret = "s3cret";
    let webhook = Webhook::new(&format!("{}/hook", server.url()), secret).unwrap();
    webhook.send("tok-bob", &notification()).await.unwrap();
    webhook
        .send("tok-bob", &with_text("see you at 8"))
        .await
        .unwrap();

    let sends = server.sends();
    for send in &sends {
        assert_eq!(
            (send.method.clone(), send.path.as_str()),
            (Method::POST, "/hook")
        );
        assert_eq!(send.header("content-type"), "application/json");
        let timestamp = send.header("x-courier-timestamp");
        assert!(timestamp.parse::<u64>().unwrap() <= now_secs());
        // Recomputed here from the documented recipe, not with the provider's own function.
        use hmac::Mac as _;
        let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).unwrap();
        mac.update(format!("{timestamp}.").as_bytes());
        mac.update(&send.body);
        let expected = format!("sha256={}", hex::encode(mac.finalize().into_bytes()));
        assert_eq!(send.header("x-courier-signature"), expected);
    }
    assert_eq!(
        sends[0].json(),
        serde_json::json!({
            "device_token": "tok-bob",
            "conversation_id": "d:alice:bob",
            "seq": 42,
            "sender": "alice",
            "count": 3,
            "quiet": false,
        }),
        "no text unless configured"
    );
    assert_eq!(sends[1].json()["text"], "see you at 8");

    let cases = [
        (
            reply_after(429, "5", "slow down"),
            Err(PushError::Throttled {
                after: Some(Duration::from_secs(5)),
            }),
        ),
        (
            reply(502, "bad gateway"),
            Err(PushError::Retry { after: None }),
        ),
        (reply(410, "gone"), Err(PushError::InvalidToken)),
        (
            reply(404, "no such route"),
            Err(PushError::Rejected(
                "HTTP 404 Not Found: no such route".into(),
            )),
        ),
        (
            reply(400, "bad"),
            Err(PushError::Rejected("HTTP 400 Bad Request: bad".into())),
        ),
        (reply(204, ""), Ok(())),
    ];
    for (answer, expected) in cases {
        server.script(answer.clone());
        assert_eq!(
            webhook.send("tok-bob", &notification()).await,
            expected,
            "{answer:?}"
        );
    }
}

/// A provider (or a proxy before it) that answers a redirect has not taken the notification:
/// a 301 or 302 would have been followed as a GET without the body, and its page's 200
/// counted `sent`, the notification lost. It is given up, named a redirect, with one request.
#[tokio::test]
async fn a_redirect_is_not_followed_nor_taken_for_delivery() {
    let server = ProviderServer::start().await;
    let moved = format!("{}/moved", server.url());
    let webhook = Webhook::new(&format!("{}/hook", server.url()), "s").unwrap();
    let apns = apns(&server);
    let fcm = fcm(&server);
    let device = "a1b2".repeat(16);
    for status in [301, 302, 303, 307, 308] {
        let redirect = || (status, vec![("location", moved.clone())], String::new());
        let answers = [
            ("webhook", {
                server.script(redirect());
                webhook.send("tok-bob", &notification()).await
            }),
            ("apns", {
                server.script(redirect());
                apns.send(&device, &notification()).await
            }),
            ("fcm", {
                server.script(redirect());
                fcm.send("tok-bob", &notification()).await
            }),
        ];
        for (provider, answer) in answers {
            match answer {
                Err(PushError::Rejected(why)) => {
                    assert!(why.contains(&moved), "{provider} {status}: {why}")
                }
                other => panic!("{provider} {status}: {other:?}"),
            }
        }
    }
    assert!(
        server.sends().iter().all(|send| send.path != "/moved"),
        "no redirect was followed"
    );
}

/// What is logged while it runs, at every level.
#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Logs {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// An unreachable provider is retried, and its failure logged without the request's URL: an
/// APNs URL holds the device's token (`/3/device/<token>`), a webhook's URL may hold a key.
#[tokio::test]
async fn an_unreachable_provider_is_retried() {
    let logs = Logs::default();
    let writer = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .finish();
    let _logging = tracing::subscriber::set_default(subscriber);
    // A port that was just free: connections to it are refused.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("http://127.0.0.1:{port}");
    let webhook = Webhook::new(&format!("{url}/hook?key=the-hooks-key"), "s").unwrap();
    assert_eq!(
        webhook.send("t", &notification()).await,
        Err(PushError::Retry { after: None })
    );
    let apns = Apns::new(
        fixture("apns-test-key.p8").as_bytes(),
        KEY_ID,
        TEAM_ID,
        TOPIC,
        &url,
    )
    .unwrap();
    assert_eq!(
        apns.send("abcd0123", &notification()).await,
        Err(PushError::Retry { after: None })
    );
    let logged = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    assert!(logged.contains("push request failed"), "{logged}");
    assert!(!logged.contains("the-hooks-key"), "{logged}");
    assert!(!logged.contains("abcd0123"), "{logged}");
}

#[derive(Parser)]
struct Flags {
    #[command(flatten)]
    push: PushConfig,
}

fn providers(args: &[&str]) -> anyhow::Result<PushProviders> {
    let flags = Flags::try_parse_from(std::iter::once("courier").chain(args.iter().copied()))?;
    PushProviders::from_config(&flags.push)
}

#[tokio::test]
async fn providers_are_built_from_flags_and_looked_up_by_name() {
    let none = providers(&[]).unwrap();
    assert!(none.configured().is_empty());
    assert!(none.provider("fcm").is_none());

    let server = ProviderServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    // The file's token_uri is unreachable; --fcm-token-uri overrides it.
    let account = dir.path().join("service-account.json");
    std::fs::write(&account, service_account("http://127.0.0.1:9/token")).unwrap();
    let key = format!(
        "{}/../../tests/fixtures/apns-test-key.p8",
        env!("CARGO_MANIFEST_DIR")
    );
    let token_uri = format!("{}/token", server.url());
    let url = server.url();
    let hook = format!("{url}/hook");
    let all = providers(&[
        "--fcm-service-account",
        account.to_str().unwrap(),
        "--fcm-project",
        "other-project",
        "--fcm-endpoint",
        &url,
        "--fcm-token-uri",
        &token_uri,
        "--apns-key-file",
        &key,
        "--apns-key-id",
        KEY_ID,
        "--apns-team-id",
        TEAM_ID,
        "--apns-topic",
        TOPIC,
        "--apns-endpoint",
        &url,
        "--webhook-url",
        &hook,
        "--webhook-secret",
        "s",
    ])
    .unwrap();
    assert_eq!(all.configured(), ["fcm", "apns", "webhook"]);
    assert!(all.provider("gcm").is_none());
    for name in ["fcm", "apns", "webhook"] {
        all.provider(name)
            .unwrap()
            .send("abcd", &notification())
            .await
            .unwrap();
    }
    let paths: Vec<String> = server.sends().into_iter().map(|s| s.path).collect();
    assert_eq!(
        paths,
        [
            "/v1/projects/other-project/messages:send",
            "/3/device/abcd",
            "/hook"
        ]
    );
    verified_assertion(&server.token_requests()[0], &token_uri);
}

#[test]
fn incomplete_or_broken_settings_say_what_to_fix() {
    let dir = tempfile::tempdir().unwrap();
    let key = format!(
        "{}/../../tests/fixtures/apns-test-key.p8",
        env!("CARGO_MANIFEST_DIR")
    );
    let garbage = dir.path().join("garbage.json");
    std::fs::write(&garbage, "{}").unwrap();
    let cases: [(&[&str], &str); 6] = [
        (
            &["--apns-key-file", &key, "--apns-key-id", "K"],
            "--apns-topic",
        ),
        (
            &["--push-webhook-url", "http://127.0.0.1:1/"],
            "--push-webhook-secret",
        ),
        (&["--webhook-secret", "s"], "--push-webhook-url"),
        (&["--fcm-project", "p"], "--fcm-service-account"),
        (
            &["--fcm-service-account", garbage.to_str().unwrap()],
            "service-account JSON",
        ),
        (
            &[
                "--push-webhook-url",
                "ftp://x",
                "--push-webhook-secret",
                "s",
            ],
            "http",
        ),
    ];
    for (args, hint) in cases {
        let error = format!("{:#}", providers(args).unwrap_err());
        assert!(error.contains(hint), "{args:?}: {error}");
    }
    let missing = format!(
        "{:#}",
        providers(&["--fcm-service-account", "/nonexistent/sa.json"]).unwrap_err()
    );
    assert!(missing.contains("/nonexistent/sa.json"), "{missing}");
}

#[test]
fn text_is_shortened_on_a_character_boundary() {
    assert_eq!(preview("short"), "short");
    let exact = "a".repeat(MAX_TEXT_BYTES);
    assert_eq!(preview(&exact), exact);
    for text in ["a".repeat(5000), "é".repeat(5000), "日本".repeat(900)] {
        let short = preview(&text);
        assert!(short.len() <= MAX_TEXT_BYTES, "{}", short.len());
        assert!(short.ends_with('…'));
        assert!(text.starts_with(short.trim_end_matches('…')));
    }
}

/// The text is cut by what it takes in the JSON payload, escapes included: a control
/// character takes six bytes there, a quote or a backslash two. A message of 1,000 control
/// characters made an APNs payload of ~6 KiB, which APNs refuses (413 `PayloadTooLarge`) and
/// the notifier gives up: a sender could keep a conversation's notifications from every device.
#[test]
fn text_is_shortened_by_its_escaped_length_so_that_payloads_stay_under_4_kib() {
    const PAYLOAD_LIMIT: usize = 4096;
    let longest = Notification {
        conversation_id: "c".repeat(128),
        sender: "s".repeat(64),
        seq: u64::MAX,
        count: u32::MAX,
        ..notification()
    };
    for text in [
        "\u{1}".repeat(5000),
        "\"".repeat(5000),
        "\\".repeat(5000),
        "\n".repeat(5000),
        "a\u{1f}é\"".repeat(5000),
    ] {
        let escaped = serde_json::to_string(&preview(&text)).unwrap();
        assert!(
            escaped.len() <= MAX_TEXT_BYTES + 2,
            "{} bytes escaped",
            escaped.len()
        );
        let n = Notification {
            text: Some(text),
            ..longest.clone()
        };
        let apns = serde_json::to_vec(&Apns::payload(&n)).unwrap();
        assert!(apns.len() <= PAYLOAD_LIMIT, "APNs: {} bytes", apns.len());
        let fcm = serde_json::to_vec(&Fcm::message(&"t".repeat(200), &n)).unwrap();
        assert!(fcm.len() <= PAYLOAD_LIMIT, "FCM: {} bytes", fcm.len());
    }
}
