//! Push-notification providers: FCM HTTP v1, APNs over HTTP/2 with token auth, and a signed
//! webhook for anyone else. Each turns a [`Notification`] into its provider's request and the
//! answer into a [`PushError`] the notifier acts on (retry, drop the token, give up).

mod apns;
mod fcm;
mod webhook;

use async_trait::async_trait;
use clap::Args;
use std::path::PathBuf;
use std::time::Duration;

/// What a device is told. Never the message text unless the server is configured to include it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notification {
    pub conversation_id: String,
    pub seq: u64,
    pub sender: String,
    /// Messages collapsed into this notification.
    pub count: u32,
    pub text: Option<String>,
    /// A large group's notification: silent (background) where the provider has the notion.
    pub quiet: bool,
}

/// Why a notification was not delivered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PushError {
    /// Throttled (429), provider trouble (5xx) or network: retry, not before `after`.
    #[error("temporary failure; retry")]
    Retry { after: Option<Duration> },
    /// The provider says this device token is dead (FCM UNREGISTERED, APNs 410...).
    #[error("the device token is no longer valid")]
    InvalidToken,
    /// Refused for another reason (a 4xx): retrying will not help.
    #[error("refused: {0}")]
    Rejected(String),
}

#[async_trait]
pub trait PushProvider: Send + Sync {
    async fn send(&self, device_token: &str, notification: &Notification) -> Result<(), PushError>;
}

/// The delay before retry `attempt` (1-based): exponential from 200 ms, capped at 60 s, with
/// full jitter, and never sooner than the provider's `Retry-After`.
pub fn next_delay(attempt: u32, retry_after: Option<Duration>) -> Duration {
    let exponential = Duration::from_millis(200)
        .saturating_mul(1u32 << attempt.min(16))
        .min(Duration::from_secs(60));
    let jittered = exponential.mul_f64(rand::random::<f64>());
    jittered.max(retry_after.unwrap_or_default())
}

/// Reads a `Retry-After` given in seconds.
fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    headers
        .get(reqwest::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim()
        .parse::<u64>()
        .ok()
        .map(Duration::from_secs)
}

/// A provider's answer, read whole (they are small JSON documents).
struct Answer {
    status: reqwest::StatusCode,
    headers: reqwest::header::HeaderMap,
    body: String,
}

impl Answer {
    async fn read(response: reqwest::Response) -> Self {
        let status = response.status();
        let headers = response.headers().clone();
        let body = response.text().await.unwrap_or_default();
        Self {
            status,
            headers,
            body,
        }
    }
}

/// The common reading of an HTTP answer; providers refine it.
fn classify(
    status: reqwest::StatusCode,
    headers: &reqwest::header::HeaderMap,
    body: &str,
) -> Result<(), PushError> {
    match status.as_u16() {
        200..=299 => Ok(()),
        410 => Err(PushError::InvalidToken),
        429 | 500..=599 => Err(PushError::Retry {
            after: retry_after(headers),
        }),
        _ => Err(PushError::Rejected(format!(
            "HTTP {status}: {}",
            body.chars().take(200).collect::<String>()
        ))),
    }
}

fn network(e: reqwest::Error) -> PushError {
    tracing::debug!(error = %e, "push request failed");
    PushError::Retry { after: None }
}

/// Push providers, from flags or `COURIER_*` variables. A provider without its settings is off.
#[derive(Debug, Clone, Args)]
pub struct PushConfig {
    /// FCM: the Google service-account JSON file (client_email, private_key, token_uri, project_id).
    #[arg(long, env = "COURIER_FCM_SERVICE_ACCOUNT")]
    pub fcm_service_account: Option<PathBuf>,
    /// FCM: the Firebase project id (default: the service account's).
    #[arg(long, env = "COURIER_FCM_PROJECT")]
    pub fcm_project: Option<String>,
    /// FCM: the API base URL.
    #[arg(
        long,
        env = "COURIER_FCM_ENDPOINT",
        default_value = "https://fcm.googleapis.com"
    )]
    pub fcm_endpoint: String,
    /// APNs: the token-auth key (.p8) file.
    #[arg(long, env = "COURIER_APNS_KEY_FILE")]
    pub apns_key_file: Option<PathBuf>,
    /// APNs: the key's id.
    #[arg(long, env = "COURIER_APNS_KEY_ID")]
    pub apns_key_id: Option<String>,
    /// APNs: the developer team id.
    #[arg(long, env = "COURIER_APNS_TEAM_ID")]
    pub apns_team_id: Option<String>,
    /// APNs: the app's bundle id (`apns-topic`).
    #[arg(long, env = "COURIER_APNS_TOPIC")]
    pub apns_topic: Option<String>,
    /// APNs: the API base URL (`https://api.sandbox.push.apple.com` for development builds).
    #[arg(
        long,
        env = "COURIER_APNS_ENDPOINT",
        default_value = "https://api.push.apple.com"
    )]
    pub apns_endpoint: String,
    /// Webhook: the URL notifications are POSTed to.
    #[arg(long, env = "COURIER_PUSH_WEBHOOK_URL")]
    pub push_webhook_url: Option<String>,
    /// Webhook: the HMAC-SHA256 secret of the `X-Courier-Signature` header.
    #[arg(long, env = "COURIER_PUSH_WEBHOOK_SECRET", hide_env_values = true)]
    pub push_webhook_secret: Option<String>,
    /// Put the message text in notifications (off: conversation, seq, sender and count only).
    #[arg(long, env = "COURIER_PUSH_INCLUDE_TEXT")]
    pub push_include_text: bool,
}

/// The configured providers.
#[derive(Default)]
pub struct PushProviders {
    fcm: Option<fcm::Fcm>,
    apns: Option<apns::Apns>,
    webhook: Option<webhook::Webhook>,
}

/// Longest wait for one provider request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

impl PushProviders {
    pub fn from_config(config: &PushConfig) -> anyhow::Result<Self> {
        let mut providers = Self::default();
        if let Some(path) = &config.fcm_service_account {
            providers.fcm = Some(fcm::Fcm::new(
                path,
                config.fcm_project.as_deref(),
                &config.fcm_endpoint,
            )?);
        }
        if let Some(path) = &config.apns_key_file {
            let (Some(key_id), Some(team_id), Some(topic)) = (
                &config.apns_key_id,
                &config.apns_team_id,
                &config.apns_topic,
            ) else {
                anyhow::bail!(
                    "--apns-key-file needs --apns-key-id, --apns-team-id and --apns-topic"
                );
            };
            providers.apns = Some(apns::Apns::new(
                path,
                key_id,
                team_id,
                topic,
                &config.apns_endpoint,
            )?);
        }
        if let Some(url) = &config.push_webhook_url {
            let secret = config
                .push_webhook_secret
                .as_deref()
                .ok_or_else(|| anyhow::anyhow!("--push-webhook-url needs --push-webhook-secret"))?;
            providers.webhook = Some(webhook::Webhook::new(url, secret)?);
        }
        Ok(providers)
    }

    /// The provider registered under `name` (`fcm`, `apns`, `webhook`), if configured.
    pub fn provider(&self, name: &str) -> Option<&dyn PushProvider> {
        match name {
            "fcm" => self.fcm.as_ref().map(|p| p as &dyn PushProvider),
            "apns" => self.apns.as_ref().map(|p| p as &dyn PushProvider),
            "webhook" => self.webhook.as_ref().map(|p| p as &dyn PushProvider),
            _ => None,
        }
    }
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_are_capped_and_honour_retry_after() {
        for attempt in 1..30 {
            assert!(next_delay(attempt, None) <= Duration::from_secs(60));
        }
        assert!(next_delay(1, Some(Duration::from_secs(7))) >= Duration::from_secs(7));
        let mut headers = reqwest::header::HeaderMap::new();
        headers.insert(reqwest::header::RETRY_AFTER, "3".parse().unwrap());
        assert_eq!(
            classify(reqwest::StatusCode::TOO_MANY_REQUESTS, &headers, ""),
            Err(PushError::Retry {
                after: Some(Duration::from_secs(3))
            })
        );
        assert_eq!(
            classify(reqwest::StatusCode::GONE, &headers, ""),
            Err(PushError::InvalidToken)
        );
        assert!(matches!(
            classify(reqwest::StatusCode::BAD_REQUEST, &headers, "x"),
            Err(PushError::Rejected(_))
        ));
    }
}
