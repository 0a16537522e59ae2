//! The error every role returns to clients: a protocol code and a message, rendered as an
//! `error` frame on WebSocket and as `{"code", "message"}` with a status over HTTP.

use crate::sequencer::SequencerError;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use courier_proto::ErrorCode;
use courier_store::{AppendRefused, StoreError};

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

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Overloaded(_) | StoreError::MaybeCommitted => {
                Self::unavailable("storage is busy; retry", 100)
            }
            // Logged by the engine; the node fails its health checks and is restarted.
            StoreError::Halted(_) => Self::unavailable("storage is unavailable; retry", 1000),
            other => {
                tracing::error!(error = %other, "storage error");
                Self::new(ErrorCode::Internal, "internal storage error")
            }
        }
    }
}

impl From<AppendRefused> for ApiError {
    fn from(e: AppendRefused) -> Self {
        match e {
            AppendRefused::NotMember | AppendRefused::NotAdmin => Self::forbidden(e.to_string()),
            AppendRefused::NoChange => Self::bad_request(e.to_string()),
        }
    }
}

impl From<SequencerError> for ApiError {
    fn from(e: SequencerError) -> Self {
        match e {
            SequencerError::Store(store) => store.into(),
            SequencerError::Refused(refused) => refused.into(),
            other => Self::unavailable(other.to_string(), 50),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({ "code": self.code, "message": self.message });
        (self.status(), axum::Json(body)).into_response()
    }
}
