//! The webhook provider: a JSON POST signed with HMAC-SHA256, for any push service.
//!
//! Headers: `X-Courier-Timestamp: <unix seconds>` and
//! `X-Courier-Signature: sha256=<hex HMAC-SHA256(secret, "<timestamp>.<body>")>`; receivers
//! should check the signature and refuse old timestamps. Answers: 2xx delivered; 404 or 410
//! the token is dead; 429 and 5xx retried (honouring `Retry-After`); other 4xx given up.

use super::{
    Answer, Notification, PushError, PushProvider, REQUEST_TIMEOUT, classify, network, now_secs,
};
use async_trait::async_trait;
use hmac::{Hmac, Mac};
use sha2::Sha256;

pub struct Webhook {
    http: reqwest::Client,
    url: String,
    secret: String,
}

impl Webhook {
    pub fn new(url: &str, secret: &str) -> anyhow::Result<Self> {
        Ok(Self {
            http: reqwest::Client::builder()
                .timeout(REQUEST_TIMEOUT)
                .build()?,
            url: url.to_owned(),
            secret: secret.to_owned(),
        })
    }
}

/// The signature header value for `body` sent at `timestamp`.
pub fn signature(secret: &str, timestamp: u64, body: &[u8]) -> String {
    // HMAC takes keys of any length.
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(secret.as_bytes()).expect("any key length");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

#[async_trait]
impl PushProvider for Webhook {
    async fn send(&self, device_token: &str, n: &Notification) -> Result<(), PushError> {
        let mut payload = serde_json::json!({
            "device_token": device_token,
            "conversation_id": n.conversation_id,
            "seq": n.seq,
            "sender": n.sender,
            "count": n.count,
            "quiet": n.quiet,
        });
        if let Some(text) = &n.text {
            payload["text"] = text.clone().into();
        }
        let body = payload.to_string().into_bytes();
        let timestamp = now_secs();
        let response = self
            .http
            .post(&self.url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header("x-courier-timestamp", timestamp.to_string())
            .header(
                "x-courier-signature",
                signature(&self.secret, timestamp, &body),
            )
            .body(body)
            .send()
            .await
            .map_err(network)?;
        let Answer {
            status,
            headers,
            body,
        } = Answer::read(response).await;
        if status.as_u16() == 404 {
            return Err(PushError::InvalidToken);
        }
        classify(status, &headers, &body)
    }
}
