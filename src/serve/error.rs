//! API errors: JSON `{error, message}` with a real status code (never a 200 with an error inside).

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use crate::embed::DecodeError;

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

    /// Milvus, MySQL or the bucket failed: 503, with the cause for the operator to read.
    pub fn backend(e: anyhow::Error) -> Self {
        tracing::warn!("backend error: {e:#}");
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "backend_unavailable", format!("{e:#}"))
    }

    pub fn internal(e: impl std::fmt::Display) -> Self {
        tracing::error!("internal error: {e}");
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string())
    }
}

impl From<DecodeError> for ApiError {
    fn from(e: DecodeError) -> Self {
        let (status, code) = match e {
            DecodeError::Unsupported => (StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type"),
            DecodeError::TooLarge { .. } => (StatusCode::PAYLOAD_TOO_LARGE, "image_too_large"),
            DecodeError::Empty | DecodeError::Corrupt { .. } | DecodeError::TruncatedJpeg => {
                (StatusCode::BAD_REQUEST, "bad_image")
            }
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
        }
        let mut resp = (self.status, Json(Body { error: self.code, message: &self.message })).into_response();
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
