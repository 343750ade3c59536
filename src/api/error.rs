//! The API's error type: every failure becomes `{"error": {"code", "message"}}` with the status
//! SPEC section 4 pins.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;

use crate::model::ValueError;
use crate::repo::RepoError;
use crate::store::StoreError;

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }

    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::BAD_REQUEST, code, message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({"error": {"code": self.code, "message": self.message}});
        (self.status, Json(body)).into_response()
    }
}

impl From<RepoError> for ApiError {
    fn from(e: RepoError) -> Self {
        let message = e.to_string();
        let (status, code) = match &e {
            RepoError::TrackerNotFound(_) => (StatusCode::NOT_FOUND, "tracker_not_found"),
            RepoError::ItemNotFound(_) => (StatusCode::NOT_FOUND, "item_not_found"),
            RepoError::NoSuchLoser { .. } => (StatusCode::NOT_FOUND, "conflict_not_found"),
            RepoError::DuplicateTracker(_) => (StatusCode::CONFLICT, "duplicate_tracker"),
            RepoError::DuplicateField { .. } => (StatusCode::CONFLICT, "duplicate_field"),
            RepoError::Invalid(ValueError::UnknownField(_)) => {
                (StatusCode::BAD_REQUEST, "unknown_field")
            }
            RepoError::Invalid(ValueError::Missing(_)) => {
                (StatusCode::BAD_REQUEST, "missing_field")
            }
            RepoError::Invalid(ValueError::Invalid { .. }) => {
                (StatusCode::BAD_REQUEST, "invalid_value")
            }
            RepoError::BadRequest(_) => (StatusCode::BAD_REQUEST, "invalid_request"),
            RepoError::Store(StoreError::FlushFailed(_) | StoreError::WriteFailed(_)) => {
                (StatusCode::SERVICE_UNAVAILABLE, "storage_unavailable")
            }
            RepoError::Store(_) => (StatusCode::SERVICE_UNAVAILABLE, "storage_error"),
            RepoError::Doc(_) => (StatusCode::INTERNAL_SERVER_ERROR, "document_error"),
        };
        if status.is_server_error() {
            tracing::error!(error = %message, "request failed");
        }
        ApiError::new(status, code, message)
    }
}

impl From<tokio::task::JoinError> for ApiError {
    fn from(e: tokio::task::JoinError) -> Self {
        tracing::error!(error = %e, "request task failed");
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "internal error; see the node's log",
        )
    }
}
