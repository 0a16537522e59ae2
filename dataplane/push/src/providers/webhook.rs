//! The webhook provider: a JSON POST signed with HMAC-SHA256, for any push service.
//!
//! Body: `{"device_token", "conversation_id", "seq", "sender", "count", "quiet", "text"?}`.
//! Headers: `X-Courier-Timestamp: <unix seconds>` and
//! `X-Courier-Signature: sha256=<hex HMAC-SHA256(secret, "<timestamp>.<body>")>`: the
//! timestamp is signed with the body so that a captured request cannot be replayed later;
//! receivers check the signature over the raw body and refuse old timestamps. Answers: 2xx
//! delivered; 410 the token is dead; 429 and 5xx retried (honouring `Retry-After`); other 4xx
//! given up. A 404 is given up too, not taken for a dead token: the token travels in the body,
//! so a 404 is most likely a wrong URL, which would otherwise erase every registration.

use super::{
    Answer, Notification, PushError, PushProvider, http_client, network, now_secs, preview,
};
use async_trait::async_trait;
use hmac::{Hmac, Mac};
use sha2::Sha256;

pub const SIGNATURE_HEADER: &str = "x-courier-signature";
pub const TIMESTAMP_HEADER: &str = "x-courier-timestamp";

/// The webhook provider.
pub struct Webhook {
    http: reqwest::Client,
    url: String,
    secret: String,
}

impl Webhook {
    /// POSTs to `url` (http or https), signing with `secret`.
    pub fn new(url: &str, secret: &str) -> anyhow::Result<Self> {
        if secret.is_empty() {
            anyhow::bail!("--push-webhook-secret is empty");
        }
        Ok(Self {
            http: http_client(url, false)
                .map_err(|e| anyhow::anyhow!("--push-webhook-url: {e}"))?,
            url: url.to_owned(),
            secret: secret.to_owned(),
        })
    }

    /// The request body for `device_token`.
    pub fn payload(device_token: &str, n: &Notification) -> serde_json::Value {
        let mut payload = serde_json::json!({
            "device_token": device_token,
            "conversation_id": n.conversation_id,
            "seq": n.seq,
            "sender": n.sender,
            "count": n.count,
            "quiet": n.quiet,
        });
        if let Some(text) = &n.text {
            payload["text"] = preview(text).into();
        }
        payload
    }
}

/// The `X-Courier-Signature` value for `body` sent at `timestamp` (unix seconds):
/// `sha256=` and the hex HMAC-SHA256, keyed with `secret`, of `"<timestamp>.<body>"`.
pub fn signature(secret: &str, timestamp: u64, body: &[u8]) -> String {
    let mut mac = match Hmac::<Sha256>::new_from_slice(secret.as_bytes()) {
        Ok(mac) => mac,
        Err(hmac::digest::InvalidLength) => unreachable!("HMAC takes keys of any length"),
    };
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

#[async_trait]
impl PushProvider for Webhook {
    async fn send(&self, device_token: &str, n: &Notification) -> Result<(), PushError> {
        let body = Self::payload(device_token, n).to_string().into_bytes();
        let timestamp = now_secs();
        let response = self
            .http
            .post(&self.url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header(TIMESTAMP_HEADER, timestamp.to_string())
            .header(SIGNATURE_HEADER, signature(&self.secret, timestamp, &body))
            .body(body)
            .send()
            .await
            .map_err(network)?;
        Answer::read(response).await.classify()
    }
}
