//! Prometheus metrics on `/metrics`: requests and latency per route, time spent embedding and in Milvus.

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use super::AppState;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    route: String,
    method: String,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    route: String,
}

fn seconds_histogram() -> Histogram {
    // 1 ms to ~33 s
    Histogram::new(exponential_buckets(0.001, 2.0, 16))
}

pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    latency: Family<RouteLabels, Histogram>,
    pub embed_seconds: Histogram,
    pub milvus_seconds: Histogram,
    /// Queries per model call.
    pub batch_size: Histogram,
    credential_reloads: Family<ResultLabels, Counter>,
}

impl Metrics {
    /// A change of the credentials files, put to use or not.
    pub fn credential_reload(&self, applied: bool) {
        let result = if applied { "applied" } else { "failed" };
        self.credential_reloads.get_or_create(&ResultLabels { result }).inc();
    }
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("imageindex");
        let requests = Family::<RequestLabels, Counter>::default();
        let latency = Family::<RouteLabels, Histogram>::new_with_constructor(seconds_histogram as fn() -> Histogram);
        let (embed_seconds, milvus_seconds) = (seconds_histogram(), seconds_histogram());
        registry.register("http_requests", "HTTP requests by route, method and status", requests.clone());
        registry.register("http_request_duration_seconds", "HTTP request latency by route", latency.clone());
        registry.register(
            "embed_duration_seconds",
            "Decode, preprocess and model time per image",
            embed_seconds.clone(),
        );
        registry.register("milvus_duration_seconds", "Time in Milvus calls made by requests", milvus_seconds.clone());
        let batch_size = Histogram::new(exponential_buckets(1.0, 2.0, 7));
        registry.register("embed_batch_size", "Queries embedded in one model call", batch_size.clone());
        let credential_reloads = Family::<ResultLabels, Counter>::default();
        registry.register(
            "credential_reloads",
            "Changes of the mounted credentials, applied or failed (the old ones still in use)",
            credential_reloads.clone(),
        );
        Self { registry, requests, latency, embed_seconds, milvus_seconds, batch_size, credential_reloads }
    }
}

/// Records every request under its route pattern (not the raw path, which would explode the labels).
pub async fn track(State(st): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let route = req.extensions().get::<MatchedPath>().map_or("unmatched", |p| p.as_str()).to_string();
    let method = method_label(req.method()).to_string();
    let started = Instant::now();
    let resp = next.run(req).await;
    let m = &st.metrics;
    m.latency.get_or_create(&RouteLabels { route: route.clone() }).observe(started.elapsed().as_secs_f64());
    m.requests.get_or_create(&RequestLabels { route, method, status: resp.status().as_u16() }).inc();
    resp
}

/// A request's method as a label: hyper accepts any extension method, and the label is written
/// before auth, so a client could otherwise make a new time series per request.
fn method_label(method: &axum::http::Method) -> &'static str {
    use axum::http::Method;
    const KNOWN: [Method; 9] = [
        Method::GET,
        Method::HEAD,
        Method::POST,
        Method::PUT,
        Method::DELETE,
        Method::OPTIONS,
        Method::PATCH,
        Method::TRACE,
        Method::CONNECT,
    ];
    const NAMES: [&str; 9] = ["GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH", "TRACE", "CONNECT"];
    KNOWN.iter().position(|m| m == method).map_or("other", |i| NAMES[i])
}

pub async fn render(State(st): State<Arc<AppState>>) -> Response {
    let mut out = String::new();
    match prometheus_client::encoding::text::encode(&mut out, &st.metrics.registry) {
        Ok(()) => ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], out)
            .into_response(),
        Err(e) => super::ApiError::internal(e).into_response(),
    }
}
