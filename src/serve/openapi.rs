//! The OpenAPI document (`GET /openapi.json`), generated from the handlers and types with utoipa.

use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use super::api::{ErrorBody, ImageForm, UrlForm};
use super::routes;

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
