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

    /// A request with an optional JSON body; returns the status and the JSON body (`Null`
    /// when the body is not JSON).
    pub async fn request(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<(u16, Value), ClientError> {
        let mut request = self
            .http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(&self.token);
        if let Some(body) = body {
            request = request.json(body);
        }
        let response = request.send().await.map_err(http_error)?;
        let status = response.status().as_u16();
        let body = response.json().await.unwrap_or(Value::Null);
        Ok((status, body))
    }

    /// `GET path`.
    pub async fn get(&self, path: &str) -> Result<(u16, Value), ClientError> {
        self.request(reqwest::Method::GET, path, None).await
    }

    /// `POST path` with a JSON body.
    pub async fn post(&self, path: &str, body: &Value) -> Result<(u16, Value), ClientError> {
        self.request(reqwest::Method::POST, path, Some(body)).await
    }

    /// `DELETE path`.
    pub async fn delete(&self, path: &str) -> Result<(u16, Value), ClientError> {
        self.request(reqwest::Method::DELETE, path, None).await
    }

    /// Creates a group; returns its conversation id.
    pub async fn create_group(
        &self,
        name: &str,
        members: &[String],
    ) -> Result<String, ClientError> {
        let body = serde_json::json!({ "name": name, "members": members });
        match self.post("/v1/groups", &body).await? {
            (201, body) => body["conversation_id"]
                .as_str()
                .map(str::to_owned)
                .ok_or_else(|| ClientError::Http(format!("no conversation_id in {body}"))),
            (status, body) => Err(ClientError::Http(format!("HTTP {status}: {body}"))),
        }
    }

    /// Adds members to a group (admins only).
    pub async fn add_members(
        &self,
        conversation_id: &str,
        users: &[String],
    ) -> Result<(), ClientError> {
        let body = serde_json::json!({ "users": users });
        match self
            .post(&format!("/v1/groups/{conversation_id}/members"), &body)
            .await?
        {
            (200, _) => Ok(()),
            (status, body) => Err(ClientError::Http(format!("HTTP {status}: {body}"))),
        }
    }

    /// Removes a member from a group (an admin, or the member itself).
    pub async fn remove_member(
        &self,
        conversation_id: &str,
        user: &str,
    ) -> Result<(), ClientError> {
        match self
            .delete(&format!("/v1/groups/{conversation_id}/members/{user}"))
            .await?
        {
            (200, _) => Ok(()),
            (status, body) => Err(ClientError::Http(format!("HTTP {status}: {body}"))),
        }
    }

    /// `GET /v1/conversations`.
    pub async fn conversations(&self) -> Result<Value, ClientError> {
        match self.get("/v1/conversations").await? {
            (200, body) => Ok(body),
            (status, body) => Err(ClientError::Http(format!("HTTP {status}: {body}"))),
        }
    }
}
