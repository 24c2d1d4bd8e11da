//! `imageindex serve`: the search HTTP API. Minimal for now: search by uploaded image, count,
//! health. Errors are JSON `{error, message}` with a real status code.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::Result;
use axum::extract::{DefaultBodyLimit, Multipart, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};

use crate::embed::{DecodeError, DecodeLimits, Model, Preprocessor};
use crate::store::{Catalog, VectorStore};

pub struct AppState {
    pub model: Arc<Mutex<Model>>,
    pub vectors: VectorStore,
    pub catalog: Catalog,
    pub limits: DecodeLimits,
}

#[derive(Clone, Copy, Debug)]
pub struct ServeOptions {
    pub max_upload_bytes: usize,
}

pub fn router(state: Arc<AppState>, opts: ServeOptions) -> Router {
    Router::new()
        .route("/img/search", post(search))
        .route("/img/count", get(count))
        .route("/healthz", get(|| async { "ok" }))
        // Chunked bodies (no Content-Length) are still cut off at the limit inside the extractor.
        .layer(DefaultBodyLimit::max(opts.max_upload_bytes))
        .layer(axum::middleware::from_fn_with_state(opts.max_upload_bytes, refuse_oversized))
        .with_state(state)
}

/// Refuses a body whose Content-Length is over the limit, with a 413 the client can read: the
/// body is drained first (bounded in bytes and time), because closing a socket with unread data
/// makes the kernel send a reset that can destroy the response in flight.
async fn refuse_oversized(
    State(limit): State<usize>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let declared =
        req.headers().get(axum::http::header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    match declared {
        Some(len) if len > limit as u64 => {
            if len <= 4 * limit as u64 {
                let drain = axum::body::to_bytes(req.into_body(), usize::MAX);
                let _ = tokio::time::timeout(std::time::Duration::from_secs(5), drain).await;
            }
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                format!("request body is {len} bytes, more than the limit of {limit}"),
            )
            .into_response()
        }
        _ => next.run(req).await,
    }
}

pub async fn serve(addr: SocketAddr, state: Arc<AppState>, opts: ServeOptions) -> Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(%addr, "serving search");
    axum::serve(listener, router(state, opts)).with_graceful_shutdown(shutdown_signal()).await?;
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! { _ = ctrl_c => {}, _ = term.recv() => {} }
}

/// An error as the API reports it.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self { status, code, message: message.into() }
    }

    fn backend(e: anyhow::Error) -> Self {
        tracing::warn!("backend error: {e:#}");
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "backend_unavailable", format!("{e:#}"))
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

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        #[derive(Serialize)]
        struct Body<'a> {
            error: &'a str,
            message: &'a str,
        }
        (self.status, Json(Body { error: self.code, message: &self.message })).into_response()
    }
}

#[derive(Deserialize)]
struct SearchQuery {
    topk: Option<usize>,
}

#[derive(Serialize)]
pub struct SearchResult {
    pub rank: usize,
    pub key: String,
    pub id: i64,
    /// Cosine similarity (HNSW, higher is closer) or L2 distance (IVF_FLAT, lower is closer).
    pub score: f32,
}

#[derive(Serialize)]
pub struct SearchResponse {
    pub results: Vec<SearchResult>,
    pub metric: &'static str,
    pub took_ms: f64,
}

const MAX_TOPK: usize = 100;

async fn search(
    State(st): State<Arc<AppState>>,
    Query(q): Query<SearchQuery>,
    mut form: Multipart,
) -> Result<Json<SearchResponse>, ApiError> {
    let started = Instant::now();
    let mut image = None;
    let mut topk = q.topk;
    while let Some(field) = form.next_field().await.map_err(multipart_error)? {
        match field.name() {
            Some("image") => image = Some(field.bytes().await.map_err(multipart_error)?),
            Some("topk") => {
                let text = field.text().await.map_err(multipart_error)?;
                topk = Some(text.trim().parse().map_err(|_| {
                    ApiError::new(StatusCode::BAD_REQUEST, "bad_request", format!("topk {text:?} is not a number"))
                })?);
            }
            _ => {}
        }
    }
    let image = image
        .ok_or_else(|| ApiError::new(StatusCode::BAD_REQUEST, "bad_request", "multipart field `image` is missing"))?;
    let topk = topk.unwrap_or(10);
    if !(1..=MAX_TOPK).contains(&topk) {
        return Err(ApiError::new(StatusCode::BAD_REQUEST, "bad_request", format!("topk must be 1..={MAX_TOPK}")));
    }
    let (model, limits) = (st.model.clone(), st.limits);
    let vector = tokio::task::spawn_blocking(move || -> Result<Vec<f32>, ApiError> {
        let tensor = Preprocessor::default().from_bytes(&image, limits)?;
        let mut v = model.lock().unwrap().embed(&tensor, 1).map_err(|e| {
            ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", format!("embedding failed: {e:#}"))
        })?;
        Ok(v.remove(0))
    })
    .await
    .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))??;
    let hits = st.vectors.search(vector, topk).await.map_err(ApiError::backend)?;
    let results = hits
        .into_iter()
        .enumerate()
        .map(|(i, h)| SearchResult { rank: i + 1, key: h.key, id: h.id, score: h.score })
        .collect();
    let metric = if st.vectors.index_kind().higher_is_closer() { "COSINE" } else { "L2" };
    Ok(Json(SearchResponse { results, metric, took_ms: started.elapsed().as_secs_f64() * 1e3 }))
}

fn multipart_error(e: axum::extract::multipart::MultipartError) -> ApiError {
    let status = e.status();
    let code = if status == StatusCode::PAYLOAD_TOO_LARGE { "payload_too_large" } else { "bad_request" };
    ApiError::new(status, code, e.body_text())
}

#[derive(Serialize)]
pub struct CountResponse {
    /// Vectors in the Milvus collection.
    pub count: u64,
    /// Catalog rows indexed and failed.
    pub indexed: u64,
    pub failed: u64,
}

async fn count(State(st): State<Arc<AppState>>) -> Result<Json<CountResponse>, ApiError> {
    let count = st.vectors.count().await.map_err(ApiError::backend)?;
    let c = st.catalog.counts().await.map_err(ApiError::backend)?;
    Ok(Json(CountResponse { count, indexed: c.indexed, failed: c.failed }))
}
