//! Route handlers.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Json;
use axum::body::Body;
use axum::extract::{FromRequest, Multipart, Path, Query, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{Html, IntoResponse, Response};
use bytes::Bytes;
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use serde::Deserialize;

use super::api::{CountResponse, ErrorBody, ImageForm, SearchResponse, SearchResult, UploadResponse, UrlForm};
use super::{ApiError, AppState, Clients};
use crate::embed::preprocess::sniff;
use crate::index::WriteBatch;
use crate::store::{self, KeyPrefix, Progress, Record, Vector, content_hash, key_id};

const MAX_TOPK: usize = 100;

pub async fn page() -> Html<&'static str> {
    Html(include_str!("page.html"))
}

/// A query or upload: an image from a multipart field, or fetched from `{"url": ...}`, and the
/// body memory it was read in (held until it is embedded).
struct Input {
    image: Bytes,
    topk: Option<usize>,
    prefix: Option<String>,
    _read_in: crate::embed::Reservation,
}

#[derive(Deserialize)]
struct JsonInput {
    url: String,
    topk: Option<usize>,
    prefix: Option<String>,
}

#[derive(Deserialize)]
pub struct Params {
    topk: Option<usize>,
    prefix: Option<String>,
}

/// Reads the request's image, in body memory reserved first: its Content-Length, or the upload
/// limit where it has none or fetches a URL (the fetch is bounded by the same limit). No
/// embedding slot is held meanwhile: a slow body or a slow URL waits on its own budget.
async fn read_input(state: &AppState, req: Request) -> Result<Input, ApiError> {
    let ctype = req.headers().get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
    let max = state.config.max_upload_bytes as u64;
    let declared = req.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    let reserve = match declared {
        Some(n) if !ctype.starts_with("application/json") => n.min(max),
        _ => max,
    };
    let _read_in = state.body_memory.try_reserve(reserve.max(1))?.ok_or_else(overloaded)?;
    if ctype.starts_with("multipart/form-data") {
        let mut form = Multipart::from_request(req, &()).await.map_err(|e| ApiError::bad_request(e.body_text()))?;
        let (mut image, mut topk, mut prefix) = (None, None, None);
        while let Some(field) = form.next_field().await? {
            match field.name() {
                Some("image") => image = Some(field.bytes().await?),
                Some("topk") => {
                    let text = field.text().await?;
                    topk = Some(
                        text.trim()
                            .parse()
                            .map_err(|_| ApiError::bad_request(format!("topk {text:?} is not a number")))?,
                    );
                }
                Some("prefix") => prefix = Some(field.text().await?),
                _ => {}
            }
        }
        let image = image.ok_or_else(|| ApiError::bad_request("multipart field `image` is missing"))?;
        Ok(Input { image, topk, prefix, _read_in })
    } else if ctype.starts_with("application/json") {
        let axum::Json(j) = axum::Json::<JsonInput>::from_request(req, &())
            .await
            .map_err(|e| ApiError::bad_request(format!("expected {{\"url\": ...}}: {}", e.body_text())))?;
        Ok(Input { image: state.fetcher.fetch(&j.url).await?, topk: j.topk, prefix: j.prefix, _read_in })
    } else {
        Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "send multipart/form-data with an `image` field, or JSON {\"url\": \"...\"}",
        ))
    }
}

fn overloaded() -> ApiError {
    ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "overloaded", "too many images are being embedded; retry shortly")
}

/// A slot to embed one image, taken once the image is read (see `read_input`): at most
/// `max_concurrent_embeddings` at once. Beyond that a request waits in a queue of at most `max_queued_embeddings` for at most `queue_timeout`: a
/// burst of a few users is served. A fuller queue, or a wait that runs out, is 503 + Retry-After.
async fn embed_slot(state: &AppState) -> Result<tokio::sync::OwnedSemaphorePermit, ApiError> {
    if let Ok(permit) = state.embed_slots.clone().try_acquire_owned() {
        return Ok(permit);
    }
    let _waiting = state.queue.try_join().ok_or_else(overloaded)?;
    match tokio::time::timeout(state.config.queue_timeout, state.embed_slots.clone().acquire_owned()).await {
        Ok(Ok(permit)) => Ok(permit),
        _ => Err(overloaded()),
    }
}

/// Decode, preprocess and embed one image on the blocking pool, in the slot taken for it.
async fn embed(
    state: &AppState,
    clients: &Clients,
    permit: tokio::sync::OwnedSemaphorePermit,
    image: Bytes,
) -> Result<Vec<f32>, ApiError> {
    // What the decode will take, from the header: refused or reserved before anything is allocated.
    let preprocess = *clients.model.preprocess();
    let cost = crate::embed::decode_cost(&image, state.config.limits, &preprocess)?;
    let memory = state.decode_memory.try_reserve(cost)?.ok_or_else(overloaded)?;
    let limits = state.config.limits;
    let started = Instant::now();
    let tensor = tokio::task::spawn_blocking(move || {
        let _memory = memory; // until decoded, even if the request is gone
        let mut tensor = vec![0.0; preprocess.tensor_len()];
        crate::embed::preprocess_into(&image, limits, &preprocess, &mut tensor).map(|()| tensor)
    })
    .await??;
    // The model, batched with other queries; the slot is held until it has run.
    let v = clients.batcher.embed(tensor, permit).await.map_err(crate::embed::EmbedError::from)?;
    state.metrics.embed_seconds.observe(started.elapsed().as_secs_f64());
    Ok(v)
}

/// The bucket, for the routes that need one.
fn bucket(clients: &Clients) -> Result<&crate::bucket::Source, ApiError> {
    clients
        .source
        .as_ref()
        .ok_or_else(|| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "no_source", "no bucket configured (--source)"))
}

/// Characters escaped in a path segment: all but RFC 3986's unreserved ones.
const SEGMENT: &AsciiSet = &NON_ALPHANUMERIC.remove(b'-').remove(b'.').remove(b'_').remove(b'~');

/// Where the service serves an object from (relative, so it works behind any path prefix).
fn object_url(key: &str) -> String {
    let path: Vec<String> = key.split('/').map(|s| utf8_percent_encode(s, SEGMENT).to_string()).collect();
    format!("img/object/{}", path.join("/"))
}

/// Search by image: the nearest indexed images, best first.
#[utoipa::path(post, path = "/img/search",
    request_body(content((ImageForm = "multipart/form-data"), (UrlForm = "application/json"))),
    params(("topk" = Option<u32>, Query, description = "Results, 1-100"), ("prefix" = Option<String>, Query, description = "Key prefix")),
    responses((status = 200, body = SearchResponse), (status = 400, description = "Bad request or image", body = ErrorBody), (status = 413, description = "Too large", body = ErrorBody), (status = 415, description = "Not a JPEG, PNG or WebP", body = ErrorBody), (status = 503, description = "Backend down or overloaded", body = ErrorBody)))]
pub async fn search(
    State(state): State<Arc<AppState>>,
    Query(q): Query<Params>,
    req: Request,
) -> Result<Json<SearchResponse>, ApiError> {
    let started = Instant::now();
    let input = read_input(&state, req).await?;
    let slot = embed_slot(&state).await?;
    let topk = input.topk.or(q.topk).unwrap_or(10);
    if !(1..=MAX_TOPK).contains(&topk) {
        return Err(ApiError::bad_request(format!("topk must be 1..={MAX_TOPK}")));
    }
    let prefix = KeyPrefix::parse(input.prefix.or(q.prefix).as_deref().unwrap_or_default())?;
    let mut clients = state.clients();
    let vector = embed(&state, &clients, slot, input.image.clone()).await?;
    let t = Instant::now();
    let hits = match clients.index.vectors.search(vector, topk, prefix.as_ref()).await {
        Ok(hits) => hits,
        Err(e) => {
            // The index may have moved under the server (its plain collection renamed as it
            // became generation 0): move with it, and answer from there, once.
            if !super::follow::moved(&state, &clients.generation).await {
                return Err(e.into());
            }
            clients = state.clients();
            let slot = embed_slot(&state).await?;
            let vector = embed(&state, &clients, slot, input.image).await?;
            clients.index.vectors.search(vector, topk, prefix.as_ref()).await?
        }
    };
    state.metrics.milvus_seconds.observe(t.elapsed().as_secs_f64());
    let results = hits
        .into_iter()
        .enumerate()
        .map(|(i, h)| SearchResult { rank: i + 1, url: object_url(&h.key), key: h.key, id: h.id, score: h.score })
        .collect();
    let metric = clients.index.vectors.index_kind().metric();
    Ok(Json(SearchResponse {
        results,
        metric,
        model: clients.model.id().to_string(),
        collection: clients.generation.collection.clone(),
        took_ms: started.elapsed().as_secs_f64() * 1e3,
    }))
}

/// Store an image under a content-addressed key and index it.
#[utoipa::path(post, path = "/img/upload", security(("token" = [])),
    request_body(content((ImageForm = "multipart/form-data"), (UrlForm = "application/json"))),
    responses((status = 201, description = "Stored and indexed", body = UploadResponse),
              (status = 200, description = "The same bytes were already there", body = UploadResponse),
              (status = 401, body = ErrorBody), (status = 400, description = "Bad request or image", body = ErrorBody), (status = 409, description = "Another key holds the id of the upload's key (a hash collision)", body = ErrorBody), (status = 413, description = "Too large", body = ErrorBody), (status = 415, description = "Not a JPEG, PNG or WebP", body = ErrorBody), (status = 503, description = "Backend down or overloaded", body = ErrorBody)))]
pub async fn upload(State(state): State<Arc<AppState>>, req: Request) -> Result<Response, ApiError> {
    let clients = state.clients();
    let source = bucket(&clients)?;
    let input = read_input(&state, req).await?;
    let slot = embed_slot(&state).await?;
    let ext = match sniff(&input.image) {
        Some(image::ImageFormat::Png) => "png",
        Some(image::ImageFormat::WebP) => "webp",
        Some(_) => "jpg",
        None => return Err(crate::embed::DecodeError::Unsupported.into()),
    };
    let hash = content_hash(&input.image);
    let key = format!("uploads/{hash}.{ext}");
    let id = key_id(&key);
    let url = object_url(&key);
    match clients.index.catalog.key_at(id).await? {
        Some(held) if held != key => {
            let collision = store::Collision { key, id, held_by: held };
            return Err(ApiError::new(StatusCode::CONFLICT, "key_collision", collision.to_string()));
        }
        Some(_) if clients.index.catalog.entry(&key).await?.is_some_and(|e| e.indexed) => {
            return Ok((StatusCode::OK, Json(UploadResponse { key, id, url, created: false })).into_response());
        }
        _ => {}
    }
    // Embed first: a file that is not a usable image is refused before anything is stored.
    let vector = embed(&state, &clients, slot, input.image.clone()).await?;
    let size = input.image.len() as u64;
    let etag = source.put(&key, input.image).await?;
    let record = Record::indexed(&key, etag, size, Some(hash));
    let vectors = vec![Vector { id, key: key.clone(), embedding: vector }];
    clients.index.write(WriteBatch { vectors, records: vec![record], remove: vec![] }).await?;
    // Answer once the image is searchable: a search right after an upload must find it.
    clients.index.wait_searchable().await?;
    Ok((StatusCode::CREATED, Json(UploadResponse { key, id, url, created: true })).into_response())
}

/// Remove an object from the index, the catalog and the bucket.
#[utoipa::path(delete, path = "/img/{key}", security(("token" = [])), params(("key" = String, Path)),
    responses((status = 204, description = "Deleted"), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn delete(State(state): State<Arc<AppState>>, Path(key): Path<String>) -> Result<StatusCode, ApiError> {
    let clients = state.clients();
    let entry = clients.index.catalog.entry(&key).await?;
    let entry = entry.ok_or_else(|| ApiError::not_found(format!("{key} is not in the index")))?;
    // The bucket first: should the index removal fail after it, the next sync sees the object
    // gone and removes it; the other way round, a failure would leave an object it re-indexes.
    if let Some(source) = &clients.source {
        source.delete(&key).await?;
    }
    clients.index.remove(&[entry.id]).await?;
    clients.index.wait_searchable().await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Drop the collection and the catalog (only with --allow-drop).
#[utoipa::path(post, path = "/img/drop", security(("token" = [])),
    responses((status = 200, description = "Dropped"), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)))]
pub async fn drop_all(State(state): State<Arc<AppState>>) -> Result<Json<serde_json::Value>, ApiError> {
    let clients = state.clients();
    if !state.config.allow_drop {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "disabled",
            "drop is disabled; start serve with --allow-drop",
        ));
    }
    clients.index.drop().await?;
    clients.index.ensure(clients.model.dim(), clients.model.id(), false, &state.config.owner).await?;
    Ok(Json(serde_json::json!({ "dropped": clients.index.vectors.collection() })))
}

/// The image itself, streamed from the bucket: only indexed images (not objects recorded as
/// failed, which may be anything a glob matched).
#[utoipa::path(get, path = "/img/object/{key}", params(("key" = String, Path)),
    responses((status = 200, description = "The image", content_type = "image/*"), (status = 404, body = ErrorBody)))]
pub async fn object(State(state): State<Arc<AppState>>, Path(key): Path<String>) -> Result<Response, ApiError> {
    let clients = state.clients();
    let source = bucket(&clients)?;
    if !clients.index.catalog.entry(&key).await?.is_some_and(|e| e.indexed) {
        return Err(ApiError::not_found(format!("{key} is not in the index")));
    }
    let stream = source.stream(&key).await?;
    let ctype = match key.rsplit('.').next().map(str::to_ascii_lowercase).as_deref() {
        Some("jpg" | "jpeg") => "image/jpeg",
        Some("png") => "image/png",
        Some("webp") => "image/webp",
        _ => "application/octet-stream",
    };
    Ok((
        [
            (header::CONTENT_TYPE, ctype),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::CACHE_CONTROL, "max-age=300"),
        ],
        Body::from_stream(stream),
    )
        .into_response())
}

/// Vectors in Milvus and catalog rows.
#[utoipa::path(get, path = "/img/count", responses((status = 200, body = CountResponse), (status = 503, body = ErrorBody)))]
pub async fn count(State(state): State<Arc<AppState>>) -> Result<Json<CountResponse>, ApiError> {
    let clients = state.clients();
    let count = clients.index.vectors.count().await?;
    let c = clients.index.catalog.counts().await?;
    Ok(Json(CountResponse { count, indexed: c.indexed, failed: c.failed }))
}

/// Catalog counts and the latest indexing run.
#[utoipa::path(get, path = "/progress", responses((status = 200, body = Progress), (status = 503, body = ErrorBody)))]
pub async fn progress(State(state): State<Arc<AppState>>) -> Result<Json<Progress>, ApiError> {
    let clients = state.clients();
    Ok(Json(clients.index.catalog.progress().await?))
}

/// Ready when Milvus and MySQL answer and the collection exists.
#[utoipa::path(get, path = "/readyz", responses((status = 200, description = "Ready"), (status = 503, body = ErrorBody)))]
pub async fn readyz(State(state): State<Arc<AppState>>) -> Result<Json<serde_json::Value>, ApiError> {
    let clients = state.clients();
    // Any failure is "not ready" (503), a missing collection included.
    let unready = |e: store::Error| match e {
        e @ store::Error::Backend { .. } => ApiError::from(e),
        e => ApiError::from(store::Error::backend("the collection", e.to_string())),
    };
    clients.index.vectors.ready().await.map_err(unready)?;
    clients.index.catalog.ping().await.map_err(unready)?;
    Ok(Json(serde_json::json!({ "milvus": "ok", "mysql": "ok" })))
}

/// Whole-request deadline.
pub async fn deadline(State(limit): State<Duration>, req: Request, next: Next) -> Response {
    match tokio::time::timeout(limit, next.run(req)).await {
        Ok(resp) => resp,
        Err(_) => ApiError::new(StatusCode::GATEWAY_TIMEOUT, "timeout", format!("request took longer than {limit:?}"))
            .into_response(),
    }
}

/// Refuses a body whose Content-Length is over the limit, with a 413 the client can read: the
/// body is read and thrown away first, frame by frame (never held; bounded in bytes and time),
/// because closing a socket with unread data makes the kernel send a reset that can destroy the
/// response in flight.
pub async fn refuse_oversized(State(limit): State<usize>, req: Request, next: Next) -> Response {
    let declared = req.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    match declared {
        Some(len) if len > limit as u64 => {
            if len <= 4 * limit as u64 {
                let mut frames = req.into_body().into_data_stream();
                let drain = async { while let Some(Ok(_)) = futures::StreamExt::next(&mut frames).await {} };
                let _ = tokio::time::timeout(Duration::from_secs(5), drain).await;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn object_urls_escape_each_segment() {
        assert_eq!(object_url("a b/c#d+é.jpg"), "img/object/a%20b/c%23d%2B%C3%A9.jpg");
    }
}
