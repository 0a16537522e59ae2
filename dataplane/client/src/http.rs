//! The HTTP API of PROTOCOL.md.

use crate::ClientError;
use serde_json::Value;

/// HTTP calls with one device's token.
#[derive(Clone)]
pub struct HttpApi {
    base: String,
    token: String,
    http: reqwest::Client,
}

fn http_error(e: reqwest::Error) -> ClientError {
    ClientError::Http(e.to_string())
}

impl HttpApi {
    /// `base_url` is `http://host:port`.
    pub fn new(base_url: &str, token: &str) -> Self {
        Self {
            base: base_url.trim_end_matches('/').to_owned(),
            token: token.to_owned(),
            http: reqwest::Client::new(),
        }
    }

    /// `GET path`; returns the status and the JSON body (`Null` when the body is not JSON).
    pub async fn get(&self, path: &str) -> Result<(u16, Value), ClientError> {
        let response = self
            .http
            .get(format!("{}{path}", self.base))
            .bearer_auth(&self.token)
            .send()
            .await
            .map_err(http_error)?;
        let status = response.status().as_u16();
        let body = response.json().await.unwrap_or(Value::Null);
        Ok((status, body))
    }

    /// `GET /v1/conversations`.
    pub async fn conversations(&self) -> Result<Value, ClientError> {
        match self.get("/v1/conversations").await? {
            (200, body) => Ok(body),
            (status, body) => Err(ClientError::Http(format!("HTTP {status}: {body}"))),
        }
    }
}
