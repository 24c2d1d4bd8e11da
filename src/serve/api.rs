//! The API's request and response bodies: what the handlers send and the OpenAPI document
//! describes. Both `routes` and `openapi` use this module; neither uses the other's types.

use serde::Serialize;
use utoipa::ToSchema;

#[derive(Serialize, ToSchema)]
pub struct SearchResult {
    pub rank: usize,
    pub key: String,
    pub id: i64,
    /// Where to fetch the image, relative to the service's base URL.
    pub url: String,
    /// Cosine similarity (HNSW, higher is closer) or L2 distance (IVF_FLAT, lower is closer).
    pub score: f32,
}

#[derive(Serialize, ToSchema)]
pub struct SearchResponse {
    pub results: Vec<SearchResult>,
    pub metric: &'static str,
    /// The model the query was embedded with: that of the index's serving generation.
    pub model: String,
    /// The generation's collection that answered.
    pub collection: String,
    pub took_ms: f64,
}

#[derive(Serialize, ToSchema)]
pub struct UploadResponse {
    pub key: String,
    pub id: i64,
    pub url: String,
    /// False when the same bytes were uploaded before: one entry, not two.
    pub created: bool,
}

#[derive(Serialize, ToSchema)]
pub struct CountResponse {
    /// Vectors in the Milvus collection.
    pub count: u64,
    /// Catalog rows indexed and failed.
    pub indexed: u64,
    pub failed: u64,
}

/// Multipart body of `/img/search` and `/img/upload` (documentation only).
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct ImageForm {
    /// The image file: JPEG, PNG or WebP, recognised by its bytes.
    #[schema(value_type = String, format = Binary)]
    image: Vec<u8>,
    /// Results, 1-100 (search only; default 10).
    topk: Option<u32>,
    /// Only keys that start with this (search only; letters, digits, `/_.-`).
    prefix: Option<String>,
}

/// JSON body of `/img/search` and `/img/upload`: the image is fetched from `url`.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct UrlForm {
    url: String,
    topk: Option<u32>,
    prefix: Option<String>,
}

/// Every error: a machine-readable code and a message for people.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct ErrorBody {
    /// bad_request, bad_image, unauthorized, disabled, forbidden_url, not_found, payload_too_large,
    /// image_too_large, unsupported_media_type, backend_unavailable, overloaded, timeout, internal
    error: String,
    message: String,
    /// Quote it when reporting a problem: the server's log has the cause under this id.
    request_id: Option<String>,
}
