//! The OpenAPI document (`GET /openapi.json`), generated from the handlers and types with utoipa.

use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi, ToSchema};

use super::routes;

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
}

struct BearerToken;

impl Modify for BearerToken {
    fn modify(&self, api: &mut utoipa::openapi::OpenApi) {
        let components = api.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "token",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

#[derive(OpenApi)]
#[openapi(
    info(title = "imageindex search API", description = "Reverse image search over an indexed bucket."),
    paths(
        routes::search,
        routes::upload,
        routes::count,
        routes::progress,
        routes::delete,
        routes::drop_all,
        routes::object,
        routes::readyz
    ),
    components(schemas(ImageForm, UrlForm, ErrorBody)),
    modifiers(&BearerToken)
)]
pub struct ApiDoc;

pub async fn document() -> axum::Json<utoipa::openapi::OpenApi> {
    axum::Json(ApiDoc::openapi())
}
