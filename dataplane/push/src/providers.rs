//! Push-notification providers: FCM HTTP v1, APNs over HTTP/2 with token auth, and a signed
//! webhook for anyone else. Each turns a [`Notification`] into its provider's request and the
//! answer into a [`PushError`] the notifier acts on (retry later, drop the token, give up).
//!
//! This module sends one notification to one device; what to send, when, collapsing and the
//! durable queue are the notifier's (`crate::notifier`).
//!
//! ```ignore
//! let providers = PushProviders::from_config(&config.push)?;
//! if let Some(apns) = providers.provider("apns") {
//!     match apns.send(&device_token, &notification).await {
//!         Ok(()) => {}
//!         Err(PushError::Retry { after }) => { /* again after next_delay(attempt, after) */ }
//!         Err(PushError::InvalidToken) => { /* forget the device's token */ }
//!         Err(PushError::Rejected(why)) => { /* give up, log `why` */ }
//!     }
//! }
//! ```

mod apns;
mod fcm;
mod retry;
#[cfg(test)]
mod tests;
mod webhook;

pub use apns::Apns;
pub use fcm::Fcm;
pub use retry::{backoff_ceiling, next_delay};
pub use webhook::Webhook;

use async_trait::async_trait;
use clap::Args;
use std::path::PathBuf;
use std::time::Duration;

/// What a device is told. Never the message text unless the server is configured to include it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notification {
    pub conversation_id: String,
    /// The latest message's seq.
    pub seq: u64,
    /// The latest message's sender (user id).
    pub sender: String,
    /// Messages collapsed into this notification.
    pub count: u32,
    /// The latest message's text, only with `--push-include-text`; providers shorten it to
    /// [`MAX_TEXT_BYTES`].
    pub text: Option<String>,
    /// A large group's notification: silent (background) where the provider has the notion.
    pub quiet: bool,
}

/// Why a notification was not delivered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PushError {
    /// Provider trouble (5xx) or network: retry, not before `after`.
    #[error("temporary failure; retry")]
    Retry { after: Option<Duration> },
    /// Throttled (429): retry, not before `after`. Usually this device token's notifications
    /// (APNs `TooManyRequests`, FCM's per-device rate), sometimes the whole sender (an FCM
    /// project's quota): the notifier tells them apart by how many tokens it is seen for.
    #[error("throttled; retry")]
    Throttled { after: Option<Duration> },
    /// The provider says this device token is dead (FCM UNREGISTERED, APNs 410...): forget it.
    #[error("the device token is no longer valid")]
    InvalidToken,
    /// Refused for another reason (a 4xx, a misconfiguration): retrying will not help.
    #[error("refused: {0}")]
    Rejected(String),
}

/// One push service.
#[async_trait]
pub trait PushProvider: Send + Sync {
    /// Delivers `notification` to the device registered with `device_token`.
    async fn send(&self, device_token: &str, notification: &Notification) -> Result<(), PushError>;
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
        default_value = fcm::DEFAULT_ENDPOINT
    )]
    pub fcm_endpoint: String,
    /// FCM: the OAuth token endpoint (default: the service account's `token_uri`).
    #[arg(long, env = "COURIER_FCM_TOKEN_URI")]
    pub fcm_token_uri: Option<String>,
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
        default_value = apns::DEFAULT_ENDPOINT
    )]
    pub apns_endpoint: String,
    /// Webhook: the URL notifications are POSTed to.
    #[arg(long, visible_alias = "webhook-url", env = "COURIER_PUSH_WEBHOOK_URL")]
    pub push_webhook_url: Option<String>,
    /// Webhook: the HMAC-SHA256 secret of the `X-Courier-Signature` header.
    #[arg(
        long,
        visible_alias = "webhook-secret",
        env = "COURIER_PUSH_WEBHOOK_SECRET",
        hide_env_values = true
    )]
    pub push_webhook_secret: Option<String>,
    /// Put the message text in notifications (off: conversation, seq, sender and count only).
    #[arg(long, env = "COURIER_PUSH_INCLUDE_TEXT")]
    pub push_include_text: bool,
}

/// The configured providers.
#[derive(Default)]
pub struct PushProviders {
    fcm: Option<Fcm>,
    apns: Option<Apns>,
    webhook: Option<Webhook>,
}

impl std::fmt::Debug for PushProviders {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.configured()).finish()
    }
}

impl PushProviders {
    /// Builds the providers `config` has settings for; an incomplete or unreadable setting is
    /// an error that says which flag to fix.
    pub fn from_config(config: &PushConfig) -> anyhow::Result<Self> {
        let mut providers = Self::default();
        match &config.fcm_service_account {
            Some(path) => {
                providers.fcm = Some(Fcm::from_file(
                    path,
                    config.fcm_project.as_deref(),
                    &config.fcm_endpoint,
                    config.fcm_token_uri.as_deref(),
                )?);
            }
            None if config.fcm_project.is_some() || config.fcm_token_uri.is_some() => {
                anyhow::bail!("--fcm-project and --fcm-token-uri need --fcm-service-account");
            }
            None => {}
        }
        match (
            &config.apns_key_file,
            &config.apns_key_id,
            &config.apns_team_id,
            &config.apns_topic,
        ) {
            (Some(path), Some(key_id), Some(team_id), Some(topic)) => {
                providers.apns = Some(Apns::from_file(
                    path,
                    key_id,
                    team_id,
                    topic,
                    &config.apns_endpoint,
                )?);
            }
            (None, None, None, None) => {}
            _ => anyhow::bail!(
                "APNs needs all of --apns-key-file, --apns-key-id, --apns-team-id and --apns-topic"
            ),
        }
        match (&config.push_webhook_url, &config.push_webhook_secret) {
            (Some(url), Some(secret)) => providers.webhook = Some(Webhook::new(url, secret)?),
            (None, None) => {}
            _ => {
                anyhow::bail!("the webhook needs both --push-webhook-url and --push-webhook-secret")
            }
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

    /// The names of the configured providers, for a start-up log line.
    pub fn configured(&self) -> Vec<&'static str> {
        [
            ("fcm", self.fcm.is_some()),
            ("apns", self.apns.is_some()),
            ("webhook", self.webhook.is_some()),
        ]
        .into_iter()
        .filter_map(|(name, on)| on.then_some(name))
        .collect()
    }
}

/// Longest wait for one provider request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest wait for a connection to a provider.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Message text in a notification is cut to this many bytes of its JSON encoding (APNs and FCM
/// payloads are limited to 4 KiB, and a lock screen shows a few lines).
pub const MAX_TEXT_BYTES: usize = 1000;
/// At most this much of a provider's answer is read (they are small JSON documents).
const MAX_ANSWER_BYTES: usize = 64 * 1024;

/// `text` cut on a character boundary, with an ellipsis when cut, so that it takes at most
/// [`MAX_TEXT_BYTES`] in a JSON payload. Its escapes count: a control character takes six
/// bytes there (`\u0001`), a quote or a backslash two, so 1,000 bytes of text can take ~6 KiB,
/// past the providers' limit (APNs answers 413 `PayloadTooLarge`, and the notification is given
/// up).
fn preview(text: &str) -> String {
    let ellipsis = '…';
    let room = MAX_TEXT_BYTES - ellipsis.len_utf8();
    // Where a cut leaves at most `room` bytes, and the bytes of the text so far.
    let (mut cut, mut taken) = (0, 0);
    for (at, c) in text.char_indices() {
        taken += escaped_len(c);
        if taken > MAX_TEXT_BYTES {
            return format!("{}{ellipsis}", &text[..cut]);
        }
        if taken <= room {
            cut = at + c.len_utf8();
        }
    }
    text.to_owned()
}

/// The bytes `c` takes in a JSON string as `serde_json` writes it.
fn escaped_len(c: char) -> usize {
    match c {
        '"' | '\\' | '\n' | '\r' | '\t' | '\u{8}' | '\u{c}' => 2,
        '\0'..='\u{1f}' => 6,
        c => c.len_utf8(),
    }
}

/// An HTTP client for a provider: bounded waits; `http2_only` for APNs. Redirects are not
/// followed: a 301, 302 or 303 would be followed as a GET without the notification, whose
/// 200 would count it delivered, and a provider's URL that moved is a setting to fix
/// ([`Answer::failure`] names where it points).
fn http_client(endpoint: &str, http2_only: bool) -> anyhow::Result<reqwest::Client> {
    let url = reqwest::Url::parse(endpoint)
        .map_err(|e| anyhow::anyhow!("{endpoint:?} is not a URL: {e}"))?;
    if !matches!(url.scheme(), "http" | "https") {
        anyhow::bail!("{endpoint:?}: expected an http:// or https:// URL");
    }
    let mut builder = reqwest::Client::builder()
        .timeout(REQUEST_TIMEOUT)
        .connect_timeout(CONNECT_TIMEOUT)
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("courier/", env!("CARGO_PKG_VERSION")));
    // Over TLS HTTP/2 is negotiated (ALPN); in clear (tests, a local relay) it is assumed.
    if http2_only && url.scheme() == "http" {
        builder = builder.http2_prior_knowledge();
    }
    Ok(builder.build()?)
}

/// A provider's answer, read up to [`MAX_ANSWER_BYTES`].
struct Answer {
    status: reqwest::StatusCode,
    headers: reqwest::header::HeaderMap,
    body: String,
}

#[cfg(test)]
impl Answer {
    /// An answer as a provider would give it, for the providers' unit tests.
    fn canned(status: u16, retry_after: Option<&str>, body: &str) -> Self {
        let mut headers = reqwest::header::HeaderMap::new();
        if let Some(seconds) = retry_after {
            headers.insert(reqwest::header::RETRY_AFTER, seconds.parse().unwrap());
        }
        Answer {
            status: reqwest::StatusCode::from_u16(status).unwrap(),
            headers,
            body: body.to_owned(),
        }
    }
}

impl Answer {
    async fn read(mut response: reqwest::Response) -> Self {
        let status = response.status();
        let headers = std::mem::take(response.headers_mut());
        let mut body = Vec::new();
        // A body cut short by the network is as good as none: the status decides.
        while let Ok(Some(chunk)) = response.chunk().await {
            let room = MAX_ANSWER_BYTES - body.len();
            body.extend_from_slice(&chunk[..chunk.len().min(room)]);
            if body.len() == MAX_ANSWER_BYTES {
                break;
            }
        }
        Self {
            status,
            headers,
            body: String::from_utf8_lossy(&body).into_owned(),
        }
    }

    /// The common reading of an answer; providers refine it for their own error bodies.
    fn classify(&self) -> Result<(), PushError> {
        match self.status.as_u16() {
            200..=299 => Ok(()),
            410 => Err(PushError::InvalidToken),
            _ => Err(self.failure()),
        }
    }

    /// A failure that is not about the token: 429 and 5xx are retried, the rest given up (a
    /// redirect with where it points: the URL to configure).
    fn failure(&self) -> PushError {
        let after = retry::retry_after(&self.headers);
        match self.status.as_u16() {
            429 => PushError::Throttled { after },
            500..=599 => PushError::Retry { after },
            300..=399 => {
                // Quoted as far as an excerpt of a body is.
                let to: Option<String> = self.headers.get(reqwest::header::LOCATION).map(|to| {
                    String::from_utf8_lossy(to.as_bytes())
                        .chars()
                        .take(200)
                        .collect()
                });
                PushError::Rejected(format!(
                    "HTTP {}: redirected to {}; push requests follow no redirect, so set the \
                     provider's URL to where it points",
                    self.status,
                    to.as_deref().unwrap_or("nowhere (no Location)")
                ))
            }
            _ => PushError::Rejected(format!("HTTP {}: {}", self.status, self.excerpt())),
        }
    }

    /// The start of the body, for error messages.
    fn excerpt(&self) -> String {
        self.body.chars().take(200).collect()
    }
}

/// A request that got no answer, logged without its URL: an APNs URL holds the device's token
/// (`/3/device/<token>`), a webhook's may hold a key.
fn network(e: reqwest::Error) -> PushError {
    tracing::debug!(error = %e.without_url(), "push request failed");
    PushError::Retry { after: None }
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
