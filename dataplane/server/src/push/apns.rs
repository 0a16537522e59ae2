//! APNs over HTTP/2 with token (.p8) authentication: an ES256 provider token (`kid`, `iss` =
//! team, `iat`) reused for 50 minutes, one `POST /3/device/<token>` per notification, collapsed
//! per conversation with `apns-collapse-id`. Quiet notifications are background pushes.

use super::{
    Answer, Notification, PushError, PushProvider, REQUEST_TIMEOUT, classify, network, now_secs,
};
use async_trait::async_trait;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use std::path::Path;
use std::time::{Duration, Instant};
use tokio::sync::Mutex;

/// Apple refuses provider tokens older than an hour and too-frequent renewals.
const TOKEN_LIFETIME: Duration = Duration::from_secs(50 * 60);

#[derive(serde::Serialize)]
struct ProviderClaims<'a> {
    iss: &'a str,
    iat: u64,
}

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
    pub fn new(
        key_file: &Path,
        key_id: &str,
        team_id: &str,
        topic: &str,
        endpoint: &str,
    ) -> anyhow::Result<Self> {
        let pem = std::fs::read(key_file)
            .map_err(|e| anyhow::anyhow!("reading --apns-key-file {}: {e}", key_file.display()))?;
        let mut http = reqwest::Client::builder().timeout(REQUEST_TIMEOUT);
        // APNs speaks HTTP/2 only; over TLS it is negotiated, in clear (tests) it is assumed.
        if endpoint.starts_with("http://") {
            http = http.http2_prior_knowledge();
        }
        Ok(Self {
            http: http.build()?,
            endpoint: endpoint.trim_end_matches('/').to_owned(),
            key: EncodingKey::from_ec_pem(&pem)?,
            key_id: key_id.to_owned(),
            team_id: team_id.to_owned(),
            topic: topic.to_owned(),
            token: Mutex::new(None),
        })
    }

    async fn provider_token(&self, renew: bool) -> Result<String, PushError> {
        let mut cached = self.token.lock().await;
        if let Some((token, made)) = cached.as_ref()
            && !renew
            && made.elapsed() < TOKEN_LIFETIME
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
            .map_err(|e| PushError::Rejected(format!("signing the APNs token: {e}")))?;
        *cached = Some((token.clone(), Instant::now()));
        Ok(token)
    }

    fn payload(n: &Notification) -> serde_json::Value {
        let aps = if n.quiet {
            serde_json::json!({ "content-available": 1 })
        } else {
            let body = match &n.text {
                Some(text) => text.clone(),
                None if n.count > 1 => format!("{} new messages", n.count),
                None => "New message".to_owned(),
            };
            serde_json::json!({
                "alert": { "title": n.sender, "body": body },
                "thread-id": n.conversation_id,
                "sound": "default",
            })
        };
        serde_json::json!({
            "aps": aps,
            "conversation_id": n.conversation_id,
            "seq": n.seq,
            "sender": n.sender,
            "count": n.count,
        })
    }
}

#[async_trait]
impl PushProvider for Apns {
    async fn send(&self, device_token: &str, n: &Notification) -> Result<(), PushError> {
        let mut renew = false;
        loop {
            let token = self.provider_token(renew).await?;
            let response = self
                .http
                .post(format!("{}/3/device/{device_token}", self.endpoint))
                .header("authorization", format!("bearer {token}"))
                .header("apns-topic", &self.topic)
                .header(
                    "apns-push-type",
                    if n.quiet { "background" } else { "alert" },
                )
                .header("apns-priority", if n.quiet { "5" } else { "10" })
                .header("apns-collapse-id", &n.conversation_id)
                .json(&Self::payload(n))
                .send()
                .await
                .map_err(network)?;
            let Answer {
                status,
                headers,
                body,
            } = Answer::read(response).await;
            let reason = serde_json::from_str::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v["reason"].as_str().map(str::to_owned))
                .unwrap_or_default();
            match (status.as_u16(), reason.as_str()) {
                (400, "BadDeviceToken" | "DeviceTokenNotForTopic") | (410, _) => {
                    return Err(PushError::InvalidToken);
                }
                (403, "ExpiredProviderToken") if !renew => renew = true,
                _ => return classify(status, &headers, &body),
            }
        }
    }
}
