//! The error every role returns to clients: a protocol code and a message, rendered as an
//! `error` frame on WebSocket and as `{"code", "message"}` with a status over HTTP.

use crate::auth::AuthError;
use crate::sequencing::SequencerError;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use courier_proto::ErrorCode;
use courier_store::{AppendRefused, StoreError};

/// The `retry_after_ms` of a send refused because delivery is behind on its shard
/// ([`SequencerError::DeliveryBehind`]): two rounds of the sequencer's outbox watch, the
/// soonest it can see the outbox drained.
pub const DELIVERY_BEHIND_RETRY_MS: u64 = 500;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    pub code: ErrorCode,
    pub message: String,
    pub retry_after_ms: Option<u64>,
}

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            retry_after_ms: None,
        }
    }
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::BadRequest, message)
    }
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Forbidden, message)
    }
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::NotFound, message)
    }
    pub fn unavailable(message: impl Into<String>, retry_after_ms: u64) -> Self {
        Self {
            retry_after_ms: Some(retry_after_ms),
            ..Self::new(ErrorCode::Unavailable, message)
        }
    }

    pub fn status(&self) -> StatusCode {
        match self.code {
            ErrorCode::BadRequest => StatusCode::BAD_REQUEST,
            ErrorCode::Unauthorized => StatusCode::UNAUTHORIZED,
            ErrorCode::Forbidden => StatusCode::FORBIDDEN,
            ErrorCode::NotFound => StatusCode::NOT_FOUND,
            ErrorCode::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ErrorCode::RateLimited => StatusCode::TOO_MANY_REQUESTS,
            ErrorCode::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

impl From<courier_proto::ids::InvalidId> for ApiError {
    fn from(e: courier_proto::ids::InvalidId) -> Self {
        Self::bad_request(e.to_string())
    }
}

/// The one mapping of storage and sequencer errors to client codes, by type:
///
/// - `unavailable` (with `retry_after_ms`): a retry with the same `client_msg_id` is safe and
///   resolves the outcome: the commit's outcome stayed unknown after the store's own retries
///   (the idempotency record tells the retry what landed), the engine is overloaded or failed
///   (I/O, unreachable) or halted (until a restart), a fence moved, the shard moved, the
///   sequencer's queue is full or the send timed out;
/// - `too_large`: what the client asked for alone exceeds an engine limit (a group commit that
///   is too large is split by the sequencer, never failed);
/// - `internal`: stored data that does not decode: a bug or corruption; and a request a node
///   could not decode ([`StoreError::Invalid`]: a node of another version, or damage in
///   transit), which a retry would have refused again: the message says what did not decode.
impl From<AuthError> for ApiError {
    fn from(e: AuthError) -> Self {
        ApiError::new(ErrorCode::Unauthorized, e.to_string())
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::MaybeCommitted
            | StoreError::Overloaded(_)
            | StoreError::Engine(_)
            | StoreError::FenceChanged { .. } => {
                tracing::warn!(error = %e, "storage unavailable; the client retries");
                Self::unavailable(
                    "storage is unavailable; retry with the same client_msg_id",
                    100,
                )
            }
            // Logged once by the engine; the node fails its health checks and is restarted.
            StoreError::Halted(_) => Self::unavailable(
                "storage is unavailable; retry with the same client_msg_id",
                1000,
            ),
            StoreError::TooLarge(reason) => Self::new(ErrorCode::TooLarge, reason),
            StoreError::Corrupt { .. } => {
                tracing::error!(error = %e, "storage error");
                Self::new(ErrorCode::Internal, "internal storage error")
            }
            StoreError::Invalid(reason) => {
                tracing::error!(%reason, "a node could not decode a request; the client is told internal, not to retry");
                Self::new(
                    ErrorCode::Internal,
                    format!("internal error, retrying will not help: {reason}"),
                )
            }
        }
    }
}

impl From<AppendRefused> for ApiError {
    fn from(e: AppendRefused) -> Self {
        match e {
            AppendRefused::NotMember
            | AppendRefused::NotAdmin
            | AppendRefused::TooManyConversations => Self::forbidden(e.to_string()),
            AppendRefused::NoChange => Self::bad_request(e.to_string()),
            // Logged at error by the store with the record's key; the client does not retry.
            AppendRefused::Damaged => Self::new(ErrorCode::Internal, e.to_string()),
        }
    }
}

impl From<SequencerError> for ApiError {
    fn from(e: SequencerError) -> Self {
        match e {
            SequencerError::Store(store) => store.into(),
            SequencerError::Refused(refused) => refused.into(),
            SequencerError::Overloaded | SequencerError::ShardMoved => {
                Self::unavailable(e.to_string(), 50)
            }
            SequencerError::DeliveryBehind => {
                Self::unavailable(e.to_string(), DELIVERY_BEHIND_RETRY_MS)
            }
            SequencerError::RateLimited { retry_after_ms } => Self {
                code: ErrorCode::RateLimited,
                message: e.to_string(),
                retry_after_ms: Some(retry_after_ms),
            },
        }
    }
}

/// `{"code", "message"}` with the code's status; an error with a wait (`unavailable`,
/// `rate_limited`) also carries it, as the `error` frame does: `retry_after_ms` in the body (an
/// addition to PROTOCOL.md's body) and `Retry-After` in whole seconds, rounded up (RFC 9110,
/// 10.2.3), for HTTP clients and proxies that know only the header.
impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = serde_json::json!({ "code": self.code, "message": self.message });
        if let Some(wait) = self.retry_after_ms {
            body["retry_after_ms"] = wait.into();
        }
        let mut response = (self.status(), axum::Json(body)).into_response();
        if let Some(wait) = self.retry_after_ms {
            response.headers_mut().insert(
                axum::http::header::RETRY_AFTER,
                axum::http::HeaderValue::from(wait.div_ceil(1000)),
            );
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_errors_map_to_client_codes_by_type() {
        let cases = [
            (StoreError::MaybeCommitted, ErrorCode::Unavailable),
            (StoreError::Overloaded("x".into()), ErrorCode::Unavailable),
            (StoreError::Engine("I/O".into()), ErrorCode::Unavailable),
            (
                StoreError::Halted("disk full".into()),
                ErrorCode::Unavailable,
            ),
            (
                StoreError::FenceChanged { key: Vec::new() },
                ErrorCode::Unavailable,
            ),
            (StoreError::TooLarge("x".into()), ErrorCode::TooLarge),
            (
                StoreError::Corrupt {
                    key: Vec::new(),
                    reason: "x".into(),
                },
                ErrorCode::Internal,
            ),
            (StoreError::Invalid("x".into()), ErrorCode::Internal),
        ];
        for (error, code) in cases {
            let api = ApiError::from(SequencerError::Store(error.clone()));
            assert_eq!(api.code, code, "{error:?}");
            assert_eq!(
                api.retry_after_ms.is_some(),
                code == ErrorCode::Unavailable,
                "{error:?}"
            );
        }
        for error in [SequencerError::Overloaded, SequencerError::ShardMoved] {
            assert_eq!(ApiError::from(error).code, ErrorCode::Unavailable);
        }
        // Damage of one conversation's record refuses its append for good: `internal`, no wait.
        let damaged = ApiError::from(SequencerError::Refused(AppendRefused::Damaged));
        assert_eq!(
            (damaged.code, damaged.retry_after_ms),
            (ErrorCode::Internal, None)
        );
        assert!(damaged.message.contains("damaged"), "{}", damaged.message);
        // The answer clients got when chat refused sends on the fanout backlog.
        assert_eq!(
            ApiError::from(SequencerError::DeliveryBehind),
            ApiError::unavailable("delivery is behind; retry shortly", 500)
        );
    }

    async fn rendered(error: ApiError) -> (StatusCode, Option<String>, serde_json::Value) {
        let response = error.into_response();
        let status = response.status();
        let retry_after = response
            .headers()
            .get(axum::http::header::RETRY_AFTER)
            .map(|v| v.to_str().unwrap().to_owned());
        let body = axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .unwrap();
        (status, retry_after, serde_json::from_slice(&body).unwrap())
    }

    /// An HTTP client is told how long to wait, as a WebSocket client is: `retry_after_ms` in
    /// the body and `Retry-After` (whole seconds, rounded up) in the headers. Errors without a
    /// wait carry neither.
    #[tokio::test]
    async fn an_http_error_with_a_wait_says_how_long() {
        let (status, retry_after, body) =
            rendered(ApiError::unavailable("draining; connect again", 1500)).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(retry_after.as_deref(), Some("2"));
        assert_eq!(
            body,
            serde_json::json!({
                "code": "unavailable",
                "message": "draining; connect again",
                "retry_after_ms": 1500,
            })
        );
        let limited = ApiError::from(SequencerError::RateLimited { retry_after_ms: 7 });
        let (status, retry_after, body) = rendered(limited).await;
        assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(retry_after.as_deref(), Some("1"));
        assert_eq!(body["retry_after_ms"], 7);

        let (status, retry_after, body) = rendered(ApiError::forbidden("not a member")).await;
        assert_eq!(status, StatusCode::FORBIDDEN);
        assert_eq!(retry_after, None);
        assert_eq!(
            body,
            serde_json::json!({ "code": "forbidden", "message": "not a member" })
        );
    }
}
