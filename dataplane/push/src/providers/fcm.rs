//! FCM HTTP v1: a service-account JWT (RS256) is exchanged for an OAuth access token, cached
//! until shortly before it expires, and each notification is one `messages:send` call.
//!
//! The message is data-first: `data` carries `conversation_id`, `seq`, `sender` and `count`
//! (FCM data values are strings), `android.collapse_key` and `apns-collapse-id` are the
//! conversation id, Android priority is `high` (`normal` when quiet). A `notification` block is
//! added only when the message text is configured in. iOS devices reached through FCM get the
//! same `aps` dictionary as from the APNs provider.

use super::{
    Answer, Notification, PushError, PushProvider, apns, http_client, network, now_secs, preview,
};
use anyhow::Context as _;
use async_trait::async_trait;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use std::path::Path;
use std::time::{Duration, Instant};
use tokio::sync::Mutex;

pub const DEFAULT_ENDPOINT: &str = "https://fcm.googleapis.com";
const DEFAULT_TOKEN_URI: &str = "https://oauth2.googleapis.com/token";
const SCOPE: &str = "https://www.googleapis.com/auth/firebase.messaging";
const JWT_BEARER: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";
/// Lifetime of the signed assertion (Google accepts at most an hour).
const ASSERTION_LIFETIME: u64 = 3600;
/// An access token is renewed this long before it expires.
const RENEW_BEFORE: Duration = Duration::from_secs(300);
/// An access token is kept at most this long, whatever lifetime the token endpoint gives
/// (Google's are an hour): a lifetime past `Instant`'s range would otherwise panic.
const MAX_TOKEN_LIFETIME: Duration = Duration::from_secs(3600);

/// The fields of a Google service-account JSON file that FCM needs.
#[derive(serde::Deserialize)]
struct ServiceAccount {
    client_email: String,
    private_key: String,
    #[serde(default)]
    token_uri: Option<String>,
    #[serde(default)]
    project_id: Option<String>,
}

/// The claims of the JWT-bearer assertion (RFC 7523) Google exchanges for an access token.
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

/// The FCM provider. Cheap to share: one HTTP client, one cached access token.
pub struct Fcm {
    http: reqwest::Client,
    client_email: String,
    key: EncodingKey,
    token_uri: String,
    send_url: String,
    /// The access token and when it expires. Held across a renewal, so that one request
    /// renews it while the others wait for the result.
    token: Mutex<Option<(String, Instant)>>,
}

impl Fcm {
    /// From a service-account JSON file (`--fcm-service-account`).
    pub fn from_file(
        service_account: &Path,
        project: Option<&str>,
        endpoint: &str,
        token_uri: Option<&str>,
    ) -> anyhow::Result<Self> {
        let json = std::fs::read_to_string(service_account).with_context(|| {
            format!(
                "reading --fcm-service-account {}",
                service_account.display()
            )
        })?;
        Self::new(&json, project, endpoint, token_uri)
            .with_context(|| format!("--fcm-service-account {}", service_account.display()))
    }

    /// From the text of a service-account JSON file. `project` and `token_uri` override the
    /// file's `project_id` and `token_uri`; `endpoint` is the API base URL.
    pub fn new(
        service_account_json: &str,
        project: Option<&str>,
        endpoint: &str,
        token_uri: Option<&str>,
    ) -> anyhow::Result<Self> {
        let account: ServiceAccount = serde_json::from_str(service_account_json).context(
            "not a Google service-account JSON (client_email, private_key, token_uri, project_id)",
        )?;
        let project = project
            .map(str::to_owned)
            .or(account.project_id)
            .context("FCM needs --fcm-project (the service account names no project_id)")?;
        let token_uri = token_uri
            .map(str::to_owned)
            .or(account.token_uri)
            .unwrap_or_else(|| DEFAULT_TOKEN_URI.to_owned());
        reqwest::Url::parse(&token_uri)
            .with_context(|| format!("the FCM token endpoint {token_uri:?} is not a URL"))?;
        Ok(Self {
            http: http_client(endpoint, false)?,
            key: EncodingKey::from_rsa_pem(account.private_key.as_bytes())
                .context("the service account's private_key is not an RSA PEM key")?,
            client_email: account.client_email,
            token_uri,
            send_url: format!(
                "{}/v1/projects/{project}/messages:send",
                endpoint.trim_end_matches('/')
            ),
            token: Mutex::new(None),
        })
    }

    /// The cached access token, or a new one when it is missing, about to expire, or `stale`
    /// (the one FCM just refused).
    async fn access_token(&self, stale: Option<&str>) -> Result<String, PushError> {
        let mut cached = self.token.lock().await;
        if let Some((token, expires)) = cached.as_ref()
            && Instant::now() + RENEW_BEFORE < *expires
            && stale != Some(token.as_str())
        {
            return Ok(token.clone());
        }
        let now = now_secs();
        let claims = Assertion {
            iss: &self.client_email,
            scope: SCOPE,
            aud: &self.token_uri,
            iat: now,
            exp: now + ASSERTION_LIFETIME,
        };
        let assertion = jsonwebtoken::encode(&Header::new(Algorithm::RS256), &claims, &self.key)
            .map_err(|e| PushError::Rejected(format!("signing the FCM assertion: {e}")))?;
        let response = self
            .http
            .post(&self.token_uri)
            .form(&[
                ("grant_type", JWT_BEARER),
                ("assertion", assertion.as_str()),
            ])
            .send()
            .await
            .map_err(network)?;
        let answer = Answer::read(response).await;
        if !answer.status.is_success() {
            // Never `InvalidToken`: this answer is about the server's credentials, not a device.
            return Err(match answer.failure() {
                PushError::Rejected(why) => {
                    PushError::Rejected(format!("FCM OAuth token endpoint: {why}"))
                }
                retry => retry,
            });
        }
        let token: AccessToken = serde_json::from_str(&answer.body).map_err(|e| {
            tracing::warn!(error = %e, "the FCM OAuth token endpoint answered without a token");
            PushError::Retry { after: None }
        })?;
        let lifetime = Duration::from_secs(token.expires_in).min(MAX_TOKEN_LIFETIME);
        *cached = Some((token.access_token.clone(), Instant::now() + lifetime));
        Ok(token.access_token)
    }

    /// The `messages:send` request body for `device_token`.
    pub fn message(device_token: &str, n: &Notification) -> serde_json::Value {
        let text = n.text.as_deref().filter(|_| !n.quiet).map(preview);
        let mut android = serde_json::json!({
            "collapse_key": n.conversation_id,
            "priority": if n.quiet { "normal" } else { "high" },
        });
        let mut message = serde_json::json!({
            "token": device_token,
            "data": {
                "conversation_id": n.conversation_id,
                "seq": n.seq.to_string(),
                "sender": n.sender,
                "count": n.count.to_string(),
            },
            "apns": {
                "headers": {
                    "apns-collapse-id": n.conversation_id,
                    "apns-push-type": if n.quiet { "background" } else { "alert" },
                    "apns-priority": if n.quiet { "5" } else { "10" },
                },
                "payload": { "aps": apns::aps(n) },
            },
        });
        if let Some(text) = text {
            message["notification"] = serde_json::json!({ "title": n.sender, "body": text });
            // One shown notification per conversation: a newer one replaces it.
            android["notification"] = serde_json::json!({ "tag": n.conversation_id });
        }
        message["android"] = android;
        serde_json::json!({ "message": message })
    }
}

/// What an FCM answer means.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    Done(Result<(), PushError>),
    /// 401: the access token was refused; get a new one and try again.
    Reauthenticate,
}

/// The `google.rpc.Status` error body of FCM v1.
#[derive(Default, serde::Deserialize)]
struct ErrorBody {
    #[serde(default)]
    error: Status,
}

#[derive(Default, serde::Deserialize)]
struct Status {
    #[serde(default)]
    status: String,
    #[serde(default)]
    message: String,
    #[serde(default)]
    details: Vec<Detail>,
}

/// `google.firebase.fcm.v1.FcmError` (`errorCode`) or `google.rpc.BadRequest`
/// (`fieldViolations`).
#[derive(Default, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct Detail {
    #[serde(default)]
    error_code: Option<String>,
    #[serde(default)]
    field_violations: Vec<FieldViolation>,
}

#[derive(Default, serde::Deserialize)]
struct FieldViolation {
    #[serde(default)]
    field: String,
}

impl Status {
    /// FCM's own error code, else the canonical status.
    fn code(&self) -> &str {
        self.details
            .iter()
            .find_map(|d| d.error_code.as_deref())
            .unwrap_or(&self.status)
    }

    /// An `INVALID_ARGUMENT` about the registration token rather than the rest of the message
    /// (which Courier builds itself): FCM says so in a field violation on `message.token`, or
    /// in its message ("The registration token is not a valid FCM registration token").
    fn token_is_malformed(&self) -> bool {
        self.code() == "INVALID_ARGUMENT"
            && (self
                .details
                .iter()
                .flat_map(|d| &d.field_violations)
                .any(|v| v.field == "message.token")
                || self.message.contains("registration token"))
    }
}

fn outcome(answer: &Answer) -> Outcome {
    if answer.status.is_success() {
        return Outcome::Done(Ok(()));
    }
    let error = serde_json::from_str::<ErrorBody>(&answer.body)
        .unwrap_or_default()
        .error;
    let code = error.code();
    Outcome::Done(Err(match answer.status.as_u16() {
        // The token was valid once and is no more (the app was uninstalled...).
        // A 404 without it is not about the token (a wrong project id in the URL answers
        // 404 too): given up, so that it cannot erase every registration.
        _ if code == "UNREGISTERED" => PushError::InvalidToken,
        400 if error.token_is_malformed() => PushError::InvalidToken,
        // FCM could not authenticate to APNs (the Firebase project's APNs key or certificate).
        401 if code == "THIRD_PARTY_AUTH_ERROR" => PushError::Rejected(format!(
            "FCM could not reach APNs with the Firebase project's credentials: {}",
            answer.excerpt()
        )),
        401 => return Outcome::Reauthenticate,
        // 403 SENDER_ID_MISMATCH and other refusals: a configuration problem, not the token.
        _ => answer.failure(),
    }))
}

#[async_trait]
impl PushProvider for Fcm {
    async fn send(&self, device_token: &str, n: &Notification) -> Result<(), PushError> {
        let message = Self::message(device_token, n);
        let mut refused: Option<String> = None;
        loop {
            let token = self.access_token(refused.as_deref()).await?;
            let response = self
                .http
                .post(&self.send_url)
                .bearer_auth(&token)
                .json(&message)
                .send()
                .await
                .map_err(network)?;
            let answer = Answer::read(response).await;
            match outcome(&answer) {
                Outcome::Done(result) => return result,
                Outcome::Reauthenticate if refused.is_none() => refused = Some(token),
                Outcome::Reauthenticate => {
                    return Err(PushError::Rejected(format!(
                        "FCM refused a fresh access token (does the service account have the \
                         Firebase Cloud Messaging API Admin role?): {}",
                        answer.excerpt()
                    )));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fcm_error(status: u16, canonical: &str, code: &str) -> String {
        serde_json::json!({"error": {
            "code": status,
            "message": "x",
            "status": canonical,
            "details": [{
                "@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError",
                "errorCode": code,
            }],
        }})
        .to_string()
    }

    #[test]
    fn fcm_answers_map_to_what_the_notifier_does() {
        use Outcome::*;
        let cases = [
            (
                Answer::canned(200, None, r#"{"name":"projects/p/messages/1"}"#),
                Done(Ok(())),
            ),
            (
                Answer::canned(404, None, &fcm_error(404, "NOT_FOUND", "UNREGISTERED")),
                Done(Err(PushError::InvalidToken)),
            ),
            (
                Answer::canned(
                    400,
                    None,
                    &fcm_error(400, "INVALID_ARGUMENT", "UNREGISTERED"),
                ),
                Done(Err(PushError::InvalidToken)),
            ),
            (
                Answer::canned(404, None, "Not Found"),
                Done(Err(PushError::Rejected(
                    "HTTP 404 Not Found: Not Found".into(),
                ))),
            ),
            (
                Answer::canned(
                    400,
                    None,
                    r#"{"error":{"code":400,"status":"INVALID_ARGUMENT","message":"The registration token is not a valid FCM registration token","details":[{"@type":"type.googleapis.com/google.firebase.fcm.v1.FcmError","errorCode":"INVALID_ARGUMENT"}]}}"#,
                ),
                Done(Err(PushError::InvalidToken)),
            ),
            (
                Answer::canned(
                    400,
                    None,
                    r#"{"error":{"code":400,"status":"INVALID_ARGUMENT","message":"Request contains an invalid argument.","details":[{"@type":"type.googleapis.com/google.rpc.BadRequest","fieldViolations":[{"field":"message.token","description":"Invalid registration token"}]}]}}"#,
                ),
                Done(Err(PushError::InvalidToken)),
            ),
            (
                Answer::canned(
                    429,
                    Some("7"),
                    &fcm_error(429, "RESOURCE_EXHAUSTED", "QUOTA_EXCEEDED"),
                ),
                Done(Err(PushError::Throttled {
                    after: Some(Duration::from_secs(7)),
                })),
            ),
            (
                Answer::canned(500, None, &fcm_error(500, "INTERNAL", "INTERNAL")),
                Done(Err(PushError::Retry { after: None })),
            ),
            (
                Answer::canned(
                    503,
                    Some("2"),
                    &fcm_error(503, "UNAVAILABLE", "UNAVAILABLE"),
                ),
                Done(Err(PushError::Retry {
                    after: Some(Duration::from_secs(2)),
                })),
            ),
            (
                Answer::canned(
                    401,
                    None,
                    &fcm_error(401, "UNAUTHENTICATED", "UNAUTHENTICATED"),
                ),
                Reauthenticate,
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
        for (status, body) in [
            // The payload, not the token: the token stays.
            (
                400,
                r#"{"error":{"code":400,"status":"INVALID_ARGUMENT","message":"Message is too big","details":[{"@type":"type.googleapis.com/google.firebase.fcm.v1.FcmError","errorCode":"INVALID_ARGUMENT"}]}}"#.to_owned(),
            ),
            (403, fcm_error(403, "PERMISSION_DENIED", "SENDER_ID_MISMATCH")),
            (401, fcm_error(401, "UNAUTHENTICATED", "THIRD_PARTY_AUTH_ERROR")),
            (400, "not json".to_owned()),
        ] {
            assert!(
                matches!(outcome(&Answer::canned(status, None, &body)), Done(Err(PushError::Rejected(_)))),
                "{status} {body}"
            );
        }
    }
}
