//! APNs over HTTP/2 with token (.p8) authentication: an ES256 provider token (`kid`, `iss` =
//! team, `iat`) reused for 50 minutes, one `POST /3/device/<token>` per notification, collapsed
//! per conversation with `apns-collapse-id`. Quiet notifications are background pushes
//! (`content-available`, priority 5).

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

/// What an APNs answer means.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    Done(Result<(), PushError>),
    /// 403 `ExpiredProviderToken`: sign a new provider token and try again.
    RenewProviderToken,
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
        (410, _) | (400, "BadDeviceToken") => PushError::InvalidToken,
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
        let url = format!("{}/3/device/{device_token}", self.endpoint);
        let body = Self::payload(n);
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
                .json(&body)
                .send()
                .await
                .map_err(network)?;
            let answer = Answer::read(response).await;
            match outcome(&answer) {
                Outcome::Done(result) => return result,
                Outcome::RenewProviderToken if expired.is_none() => expired = Some(token),
                Outcome::RenewProviderToken => {
                    return Err(PushError::Rejected(
                        "APNs calls a fresh provider token expired: is the clock right?".into(),
                    ));
                }
            }
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
                Done(Err(PushError::InvalidToken)),
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
}
