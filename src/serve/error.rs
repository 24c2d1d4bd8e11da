//! API errors: JSON `{error, message}` with a real status code (never a 200 with an error inside).
//! Handlers return `Result<_, ApiError>` and use `?`: the `From` conversions below decide the
//! status. What failed inside (a backend's own error, a panic) is logged, never sent to clients.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use crate::embed::{DecodeError, EmbedError};
use crate::store;

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self { status, code, message: message.into() }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    /// Something that should not fail did: logged in full, a plain 500 for the client (with the
    /// request id that finds the log line).
    pub fn internal(e: impl std::fmt::Display) -> Self {
        tracing::error!("internal error: {e}");
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", "internal error; see the server's log")
    }
}

impl From<store::Error> for ApiError {
    fn from(e: store::Error) -> Self {
        match e {
            store::Error::NotFound(what) => Self::not_found(format!("{what} not found")),
            store::Error::ModelMismatch(m) => Self::new(StatusCode::CONFLICT, "model_mismatch", m.0),
            store::Error::Invalid(msg) => Self::bad_request(msg),
            store::Error::Claimed(msg) => Self::new(StatusCode::CONFLICT, "collection_claimed", msg),
            store::Error::IndexMismatch(msg) => Self::new(StatusCode::CONFLICT, "index_mismatch", msg),
            store::Error::TooLarge(msg) => Self::new(StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large", msg),
            // The bucket refused one of its own objects: logged, a plain 502 for the client.
            store::Error::Refused(msg) => {
                tracing::warn!("bucket refused: {msg}");
                Self::new(
                    StatusCode::BAD_GATEWAY,
                    "bucket_refused",
                    "the bucket refused the object; see the server's log",
                )
            }
            store::Error::Archived(msg) => {
                tracing::warn!("archived: {msg}");
                Self::new(
                    StatusCode::CONFLICT,
                    "object_archived",
                    "the object is in an archive storage class; restore it to read it",
                )
            }
            // Milvus, MySQL or the bucket failed: 503 (retry), saying which call; the cause is logged.
            store::Error::Backend { what, error } => {
                tracing::warn!("backend error: {what}: {error}");
                Self::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "backend_unavailable",
                    format!("a backend failed ({what}); retry shortly"),
                )
            }
        }
    }
}

impl From<EmbedError> for ApiError {
    fn from(e: EmbedError) -> Self {
        match e {
            EmbedError::Decode(d) => d.into(),
            EmbedError::Model(m) => Self::internal(m),
        }
    }
}

impl From<tokio::task::JoinError> for ApiError {
    fn from(e: tokio::task::JoinError) -> Self {
        Self::internal(e)
    }
}

impl From<DecodeError> for ApiError {
    fn from(e: DecodeError) -> Self {
        let (status, code) = match e {
            DecodeError::Unsupported => (StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type"),
            DecodeError::TooLarge { .. } | DecodeError::OverBudget { .. } => {
                (StatusCode::PAYLOAD_TOO_LARGE, "image_too_large")
            }
            DecodeError::Empty
            | DecodeError::BadShape { .. }
            | DecodeError::Corrupt { .. }
            | DecodeError::TruncatedJpeg => (StatusCode::BAD_REQUEST, "bad_image"),
        };
        Self::new(status, code, e.to_string())
    }
}

impl From<axum::extract::multipart::MultipartError> for ApiError {
    fn from(e: axum::extract::multipart::MultipartError) -> Self {
        let status = e.status();
        let code = if status == StatusCode::PAYLOAD_TOO_LARGE { "payload_too_large" } else { "bad_request" };
        Self::new(status, code, e.body_text())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        #[derive(serde::Serialize)]
        struct Body<'a> {
            error: &'a str,
            message: &'a str,
            #[serde(skip_serializing_if = "Option::is_none")]
            request_id: Option<String>,
        }
        let body = Body { error: self.code, message: &self.message, request_id: super::request_id::current() };
        let mut resp = (self.status, Json(body)).into_response();
        match self.status {
            // Back-pressure: tell the client when to come back.
            StatusCode::SERVICE_UNAVAILABLE => {
                resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            }
            StatusCode::UNAUTHORIZED => {
                resp.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            _ => {}
        }
        resp
    }
}
