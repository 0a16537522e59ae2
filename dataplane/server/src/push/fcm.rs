//! FCM HTTP v1: a service-account JWT (RS256) is exchanged for an OAuth access token, cached
//! until shortly before it expires, and each notification is one `messages:send` call.
//! Collapse: `android.collapse_key` and `apns-collapse-id` are the conversation id.

use super::{
    Answer, Notification, PushError, PushProvider, REQUEST_TIMEOUT, classify, network, now_secs,
    retry_after,
};
use async_trait::async_trait;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use std::path::Path;
use std::time::{Duration, Instant};
use tokio::sync::Mutex;

const SCOPE: &str = "https://www.googleapis.com/auth/firebase.messaging";
/// An access token is renewed this long before it expires.
const RENEW_BEFORE: Duration = Duration::from_secs(300);

#[derive(serde::Deserialize)]
struct ServiceAccount {
    client_email: String,
    private_key: String,
    #[serde(default = "default_token_uri")]
    token_uri: String,
    #[serde(default)]
    project_id: Option<String>,
}

fn default_token_uri() -> String {
    "https://oauth2.googleapis.com/token".into()
}

#[derive(serde::Serialize)]
struct Assertion<'a> {
    iss: &'a str,
    scope: &'a str,
    aud: &'a str,
    iat: u64,
    exp: u64,
}

#[derive(serde::Deserialize)]
struct AccessToken {
    access_token: String,
    #[serde(default = "default_expiry")]
    expires_in: u64,
}

fn default_expiry() -> u64 {
    3600
}

pub struct Fcm {
    http: reqwest::Client,
    client_email: String,
    key: EncodingKey,
    token_uri: String,
    send_url: String,
    token: Mutex<Option<(String, Instant)>>,
}

impl Fcm {
    pub fn new(
        service_account: &Path,
        project: Option<&str>,
        endpoint: &str,
    ) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(service_account).map_err(|e| {
            anyhow::anyhow!(
                "reading --fcm-service-account {}: {e}",
                service_account.display()
            )
        })?;
        let account: ServiceAccount = serde_json::from_str(&text).map_err(|e| {
            anyhow::anyhow!(
                "{} is not a service-account JSON: {e}",
                service_account.display()
            )
        })?;
        let project = project
            .map(str::to_owned)
            .or(account.project_id)
            .ok_or_else(|| {
                anyhow::anyhow!("FCM needs --fcm-project (the service account names none)")
            })?;
        Ok(Self {
            http: reqwest::Client::builder()
                .timeout(REQUEST_TIMEOUT)
                .build()?,
            key: EncodingKey::from_rsa_pem(account.private_key.as_bytes())?,
            client_email: account.client_email,
            token_uri: account.token_uri,
            send_url: format!(
                "{}/v1/projects/{project}/messages:send",
                endpoint.trim_end_matches('/')
            ),
            token: Mutex::new(None),
        })
    }

    async fn access_token(&self) -> Result<String, PushError> {
        let mut cached = self.token.lock().await;
        if let Some((token, expires)) = cached.as_ref()
            && Instant::now() + RENEW_BEFORE < *expires
        {
            return Ok(token.clone());
        }
        let now = now_secs();
        let claims = Assertion {
            iss: &self.client_email,
            scope: SCOPE,
            aud: &self.token_uri,
            iat: now,
            exp: now + 3600,
        };
        let assertion = jsonwebtoken::encode(&Header::new(Algorithm::RS256), &claims, &self.key)
            .map_err(|e| PushError::Rejected(format!("signing the FCM assertion: {e}")))?;
        let response = self
            .http
            .post(&self.token_uri)
            .form(&[
                ("grant_type", "urn:ietf:params:oauth:grant-type:jwt-bearer"),
                ("assertion", assertion.as_str()),
            ])
            .send()
            .await
            .map_err(network)?;
        let Answer {
            status,
            headers,
            body,
        } = Answer::read(response).await;
        classify(status, &headers, &body)?;
        let token: AccessToken = serde_json::from_str(&body)
            .map_err(|e| PushError::Rejected(format!("FCM token answer: {e}")))?;
        *cached = Some((
            token.access_token.clone(),
            Instant::now() + Duration::from_secs(token.expires_in),
        ));
        Ok(token.access_token)
    }

    fn message(device_token: &str, n: &Notification) -> serde_json::Value {
        let mut message = serde_json::json!({
            "token": device_token,
            // FCM data values are strings.
            "data": {
                "conversation_id": n.conversation_id,
                "seq": n.seq.to_string(),
                "sender": n.sender,
                "count": n.count.to_string(),
            },
            "android": {
                "collapse_key": n.conversation_id,
                "priority": if n.quiet { "normal" } else { "high" },
            },
            "apns": { "headers": { "apns-collapse-id": n.conversation_id } },
        });
        if let (Some(text), false) = (&n.text, n.quiet) {
            message["notification"] = serde_json::json!({ "title": n.sender, "body": text });
        }
        serde_json::json!({ "message": message })
    }
}

#[async_trait]
impl PushProvider for Fcm {
    async fn send(&self, device_token: &str, n: &Notification) -> Result<(), PushError> {
        let token = self.access_token().await?;
        let response = self
            .http
            .post(&self.send_url)
            .bearer_auth(token)
            .json(&Self::message(device_token, n))
            .send()
            .await
            .map_err(network)?;
        let Answer {
            status,
            headers,
            body,
        } = Answer::read(response).await;
        if status.as_u16() == 401 {
            // The access token was revoked or expired early: fetch a new one next time.
            *self.token.lock().await = None;
            return Err(PushError::Retry {
                after: retry_after(&headers),
            });
        }
        if status.as_u16() == 404 || body.contains("\"UNREGISTERED\"") {
            return Err(PushError::InvalidToken);
        }
        classify(status, &headers, &body)
    }
}
