//! APNs over HTTP/2 with token (.p8) authentication: an ES256 provider token (`kid`, `iss` =
//! team, `iat`) reused for 50 minutes, one `POST /3/device/<token>` per notification, collapsed
//! per conversation with `apns-collapse-id`. Quiet notifications are background pushes
//! (`content-available`, priority 5).
//!
//! A device token belongs to one of Apple's two environments (a development build's to the
//! sandbox, any other build's to production), and the other environment answers 400
//! `BadDeviceToken` for it, as for a token that is no good at all: Apple's word for that answer
//! is to check that the token matches the environment. So a token the configured environment
//! refuses so is sent to the other one ([`other_environment`]), and taken for dead only if
//! that one refuses it too; with an endpoint that is not Apple's, it is kept.

use super::{
    Answer, Notification, PushError, PushProvider, http_client, network, now_secs, preview,
};
use anyhow::Context as _;
use async_trait::async_trait;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use std::path::Path;
use std::time::{Duration, Instant};
use tokio::sync::Mutex;

pub const DEFAULT_ENDPOINT: &str = "https://api.push.apple.com";
/// Apple's hosts of production and of the sandbox (`api.development.push.apple.com` is an
/// older name of the sandbox).
const PRODUCTION_HOST: &str = "api.push.apple.com";
const SANDBOX_HOST: &str = "api.sandbox.push.apple.com";
const OLD_SANDBOX_HOST: &str = "api.development.push.apple.com";
/// Apple refuses provider tokens older than an hour, and renewals more often than every 20
/// minutes.
const TOKEN_LIFETIME: Duration = Duration::from_secs(50 * 60);

#[derive(serde::Serialize)]
struct ProviderClaims<'a> {
    iss: &'a str,
    iat: u64,
}

/// The APNs provider. Cheap to share: one HTTP/2 connection, one cached provider token.
pub struct Apns {
    http: reqwest::Client,
    endpoint: String,
    /// Apple's other environment than `endpoint`'s, where that one is Apple's.
    other_environment: Option<String>,
    key: EncodingKey,
    key_id: String,
    team_id: String,
    topic: String,
    token: Mutex<Option<(String, Instant)>>,
}

impl Apns {
    /// With the `.p8` key in `key_file` (`--apns-key-file`).
    pub fn from_file(
        key_file: &Path,
        key_id: &str,
        team_id: &str,
        topic: &str,
        endpoint: &str,
    ) -> anyhow::Result<Self> {
        let pem = std::fs::read(key_file)
            .with_context(|| format!("reading --apns-key-file {}", key_file.display()))?;
        Self::new(&pem, key_id, team_id, topic, endpoint)
            .with_context(|| format!("--apns-key-file {}", key_file.display()))
    }

    /// With the `.p8` key's PEM text (a PKCS#8 P-256 key), its id, the team id, the app's
    /// bundle id and the API base URL (`http://` means HTTP/2 in clear, with prior knowledge).
    pub fn new(
        key_pem: &[u8],
        key_id: &str,
        team_id: &str,
        topic: &str,
        endpoint: &str,
    ) -> anyhow::Result<Self> {
        Ok(Self {
            http: http_client(endpoint, true)?,
            endpoint: endpoint.trim_end_matches('/').to_owned(),
            other_environment: other_environment(endpoint),
            key: EncodingKey::from_ec_pem(key_pem)
                .context("not a .p8 (PKCS#8 PEM, P-256) APNs key")?,
            key_id: key_id.to_owned(),
            team_id: team_id.to_owned(),
            topic: topic.to_owned(),
            token: Mutex::new(None),
        })
    }

    /// The cached provider token, or a new one when it is old or `stale` (the one APNs just
    /// called expired).
    async fn provider_token(&self, stale: Option<&str>) -> Result<String, PushError> {
        let mut cached = self.token.lock().await;
        if let Some((token, made)) = cached.as_ref()
            && made.elapsed() < TOKEN_LIFETIME
            && stale != Some(token.as_str())
        {
            return Ok(token.clone());
        }
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some(self.key_id.clone());
        let claims = ProviderClaims {
            iss: &self.team_id,
            iat: now_secs(),
        };
        let token = jsonwebtoken::encode(&header, &claims, &self.key)
            .map_err(|e| PushError::Rejected(format!("signing the APNs provider token: {e}")))?;
        *cached = Some((token.clone(), Instant::now()));
        Ok(token)
    }

    /// This provider, sending a token its environment answers `BadDeviceToken` for to
    /// `endpoint` (for tests, whose endpoints are not Apple's).
    #[cfg(test)]
    pub(super) fn with_other_environment(mut self, endpoint: &str) -> Self {
        self.other_environment = Some(endpoint.to_owned());
        self
    }

    /// Sends the notification `body` to `device_token` through the APNs of `endpoint`.
    async fn send_to(
        &self,
        endpoint: &str,
        device_token: &str,
        n: &Notification,
        body: &serde_json::Value,
    ) -> Result<Delivery, PushError> {
        let url = format!("{endpoint}/3/device/{device_token}");
        let mut expired: Option<String> = None;
        loop {
            let token = self.provider_token(expired.as_deref()).await?;
            let response = self
                .http
                .post(&url)
                .header(reqwest::header::AUTHORIZATION, format!("bearer {token}"))
                .header("apns-topic", &self.topic)
                .header(
                    "apns-push-type",
                    if n.quiet { "background" } else { "alert" },
                )
                .header("apns-priority", if n.quiet { "5" } else { "10" })
                .header("apns-collapse-id", &n.conversation_id)
                .json(body)
                .send()
                .await
                .map_err(network)?;
            let answer = Answer::read(response).await;
            match outcome(&answer) {
                Outcome::Done(result) => return result.map(|()| Delivery::Sent),
                Outcome::BadDeviceToken => return Ok(Delivery::BadDeviceToken),
                Outcome::RenewProviderToken if expired.is_none() => expired = Some(token),
                Outcome::RenewProviderToken => {
                    return Err(PushError::Rejected(
                        "APNs calls a fresh provider token expired: is the clock right?".into(),
                    ));
                }
            }
        }
    }

    /// The request body: `aps` plus Courier's fields.
    pub fn payload(n: &Notification) -> serde_json::Value {
        serde_json::json!({
            "aps": aps(n),
            "conversation_id": n.conversation_id,
            "seq": n.seq,
            "sender": n.sender,
            "count": n.count,
        })
    }
}

/// The `aps` dictionary: an alert (the text only when configured in), or for a quiet
/// notification a background wake-up. Also used for iOS devices reached through FCM.
pub(super) fn aps(n: &Notification) -> serde_json::Value {
    if n.quiet {
        return serde_json::json!({ "content-available": 1 });
    }
    let body = match &n.text {
        Some(text) => preview(text),
        None if n.count > 1 => format!("{} new messages", n.count),
        None => "New message".to_owned(),
    };
    serde_json::json!({
        "alert": { "title": n.sender, "body": body },
        "thread-id": n.conversation_id,
        "sound": "default",
        // Lets the app's notification service extension fetch and show the message itself.
        "mutable-content": 1,
    })
}

/// Apple's other environment than that of `endpoint` (production and the sandbox), with its
/// scheme and port; `None` for an endpoint that is not Apple's.
fn other_environment(endpoint: &str) -> Option<String> {
    let mut url = reqwest::Url::parse(endpoint).ok()?;
    let other = match url.host_str()? {
        PRODUCTION_HOST => SANDBOX_HOST,
        SANDBOX_HOST | OLD_SANDBOX_HOST => PRODUCTION_HOST,
        _ => return None,
    };
    url.set_host(Some(other)).ok()?;
    Some(url.as_str().trim_end_matches('/').to_owned())
}

/// What an APNs answer means.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    Done(Result<(), PushError>),
    /// 403 `ExpiredProviderToken`: sign a new provider token and try again.
    RenewProviderToken,
    /// 400 `BadDeviceToken`: a token of no use, or of the other environment.
    BadDeviceToken,
}

/// What became of a notification sent to one environment.
#[derive(Debug, PartialEq, Eq)]
enum Delivery {
    Sent,
    /// Answered 400 `BadDeviceToken`.
    BadDeviceToken,
}

fn outcome(answer: &Answer) -> Outcome {
    if answer.status.is_success() {
        return Outcome::Done(Ok(()));
    }
    let reason = serde_json::from_str::<serde_json::Value>(&answer.body)
        .ok()
        .and_then(|v| v["reason"].as_str().map(str::to_owned))
        .unwrap_or_default();
    Outcome::Done(Err(match (answer.status.as_u16(), reason.as_str()) {
        // 410 `Unregistered` / `ExpiredToken`: the app is gone from the device.
        (410, _) => PushError::InvalidToken,
        (400, "BadDeviceToken") => return Outcome::BadDeviceToken,
        (403, "ExpiredProviderToken") => return Outcome::RenewProviderToken,
        // `DeviceTokenNotForTopic` is not taken as a dead token: a wrong --apns-topic would
        // otherwise erase every registration.
        _ => match answer.failure() {
            PushError::Rejected(_) if !reason.is_empty() => {
                PushError::Rejected(format!("APNs {}: {reason}", answer.status))
            }
            other => other,
        },
    }))
}

#[async_trait]
impl PushProvider for Apns {
    async fn send(&self, device_token: &str, n: &Notification) -> Result<(), PushError> {
        if courier_proto::ids::push_token("apns", device_token).is_err() {
            // APNs would answer BadDeviceToken; it also must not reach the URL path as it is
            // (a registration refuses it; one from before that rule may hold it).
            return Err(PushError::InvalidToken);
        }
        let body = Self::payload(n);
        if self.send_to(&self.endpoint, device_token, n, &body).await? == Delivery::Sent {
            return Ok(());
        }
        let Some(other) = &self.other_environment else {
            return Err(PushError::Rejected(format!(
                "APNs BadDeviceToken from {}: the token is not of this environment, or no \
                 good; kept, as no other environment could be asked",
                self.endpoint
            )));
        };
        match self.send_to(other, device_token, n, &body).await? {
            Delivery::Sent => Ok(()),
            Delivery::BadDeviceToken => Err(PushError::InvalidToken),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn apns_answers_map_to_what_the_notifier_does() {
        use Outcome::*;
        let retry = |after| Done(Err(PushError::Retry { after }));
        let cases = [
            (Answer::canned(200, None, ""), Done(Ok(()))),
            (
                Answer::canned(410, None, r#"{"reason":"Unregistered","timestamp":1}"#),
                Done(Err(PushError::InvalidToken)),
            ),
            (
                Answer::canned(410, None, r#"{"reason":"ExpiredToken"}"#),
                Done(Err(PushError::InvalidToken)),
            ),
            (
                Answer::canned(400, None, r#"{"reason":"BadDeviceToken"}"#),
                BadDeviceToken,
            ),
            (
                Answer::canned(403, None, r#"{"reason":"ExpiredProviderToken"}"#),
                RenewProviderToken,
            ),
            (
                Answer::canned(429, Some("9"), r#"{"reason":"TooManyRequests"}"#),
                Done(Err(PushError::Throttled {
                    after: Some(Duration::from_secs(9)),
                })),
            ),
            (
                Answer::canned(500, None, r#"{"reason":"InternalServerError"}"#),
                retry(None),
            ),
            (
                Answer::canned(503, None, r#"{"reason":"ServiceUnavailable"}"#),
                retry(None),
            ),
        ];
        for (answer, expected) in cases {
            assert_eq!(
                outcome(&answer),
                expected,
                "{} {}",
                answer.status,
                answer.body
            );
        }
        for (status, reason) in [
            (400, "DeviceTokenNotForTopic"),
            (400, "BadCollapseId"),
            (403, "InvalidProviderToken"),
            (413, "PayloadTooLarge"),
        ] {
            let body = format!(r#"{{"reason":"{reason}"}}"#);
            match outcome(&Answer::canned(status, None, &body)) {
                Done(Err(PushError::Rejected(why))) => assert!(why.contains(reason), "{why}"),
                other => panic!("{status} {reason}: {other:?}"),
            }
        }
    }

    #[test]
    fn the_other_environment_of_apples_endpoints_is_the_other_one() {
        let cases = [
            (
                "https://api.push.apple.com",
                Some("https://api.sandbox.push.apple.com"),
            ),
            (
                "https://api.push.apple.com/",
                Some("https://api.sandbox.push.apple.com"),
            ),
            (
                "https://api.sandbox.push.apple.com",
                Some("https://api.push.apple.com"),
            ),
            (
                "https://api.development.push.apple.com:443",
                Some("https://api.push.apple.com"),
            ),
            (
                "https://api.push.apple.com:2197",
                Some("https://api.sandbox.push.apple.com:2197"),
            ),
            ("http://127.0.0.1:8443", None),
            ("https://apns-relay.example.com", None),
        ];
        for (endpoint, other) in cases {
            assert_eq!(other_environment(endpoint).as_deref(), other, "{endpoint}");
        }
    }
}
