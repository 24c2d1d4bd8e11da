//! `imageindex serve`: the search service. The routes keep the shape of the Milvus bootcamp's
//! server and fix its faults: real status codes, content-addressed uploads, the collection made
//! once at start-up, bound SQL, a token on mutating routes, and objects served only from the
//! bucket and only when the catalog knows them.

mod api;
mod auth;
mod batcher;
pub mod cli;
mod error;
mod fetch;
pub mod follow;
mod http;
mod metrics;
mod openapi;
pub mod reload;
mod request_id;
mod routes;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::Result;
use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::routing::{delete, get, post};
use tokio::sync::Semaphore;

pub use error::ApiError;
pub use http::ConnectionLimits;

use crate::bucket::Source;
use crate::embed::{DecodeLimits, MemoryBudget, Model, available_cores};
use crate::index::Index;
use crate::store::Generation;

/// Limits and switches of the service.
#[derive(Clone, Debug)]
pub struct ServeConfig {
    /// Largest request body (uploads and queries).
    pub max_upload_bytes: usize,
    pub limits: DecodeLimits,
    /// Whole-request deadline.
    pub request_timeout: Duration,
    /// Images embedded at once (decoding, or waiting for or in the model).
    pub max_concurrent_embeddings: usize,
    /// Requests that may wait for an embedding slot; more get 503 + Retry-After at once.
    pub max_queued_embeddings: usize,
    /// How long a request waits for a slot before it gets 503 + Retry-After.
    pub queue_timeout: Duration,
    /// Most queries in one model call (1: no batching).
    pub max_batch: usize,
    /// How long the first query of a batch waits for others.
    pub batch_window: Duration,
    /// Memory the decodes in flight may take at once (see `MemoryBudget`); beyond it, 503.
    pub decode_memory: u64,
    /// Memory the request bodies and fetched images being read may take at once: each reserves
    /// its Content-Length (or the upload limit) before a byte is read; beyond it, 503. Reading
    /// holds no embedding slot, so slow clients wait here and never hold the model up.
    pub body_memory: u64,
    /// Bearer token for upload, delete and drop (and for search when `protect_search`).
    /// Without one, the mutating routes are disabled.
    pub token: Option<crate::core::Redacted>,
    /// Bearer token that admits search, count, progress and images (when `protect_search`), and
    /// nothing else; the write token admits them too.
    pub read_token: Option<crate::core::Redacted>,
    pub protect_search: bool,
    /// `POST /img/drop` is refused unless this is set.
    pub allow_drop: bool,
    /// Let `{"url": ...}` queries reach loopback and private addresses (off: no SSRF into the cluster).
    pub allow_private_urls: bool,
    /// Who the server claims the collection for when it makes it again (after a drop).
    pub owner: String,
    pub connections: ConnectionLimits,
}

impl Default for ServeConfig {
    fn default() -> Self {
        Self {
            max_upload_bytes: 20 << 20,
            limits: DecodeLimits::default(),
            request_timeout: Duration::from_secs(30),
            max_concurrent_embeddings: 2 * available_cores(),
            max_queued_embeddings: 32,
            queue_timeout: Duration::from_secs(5),
            max_batch: 8,
            batch_window: Duration::from_millis(2),
            decode_memory: 512 << 20,
            body_memory: 256 << 20,
            token: None,
            read_token: None,
            protect_search: false,
            allow_drop: false,
            allow_private_urls: false,
            owner: crate::index::LOCAL_OWNER.into(),
            connections: ConnectionLimits::default(),
        }
    }
}

pub struct AppState {
    /// Replaced whole when the credentials change (see `reload`) or search moves to another
    /// generation (see `follow`): a request keeps what it started with.
    clients: RwLock<Arc<Clients>>,
    /// One generation switch at a time.
    switching: tokio::sync::Mutex<()>,
    /// How the server moves to another generation, when it follows the index's (see `follow`).
    follow: std::sync::OnceLock<follow::Follow>,
    token: auth::Token,
    read_token: auth::Token,
    config: ServeConfig,
    embed_slots: Arc<Semaphore>,
    /// Requests waiting for a slot.
    queue: Queue,
    decode_memory: MemoryBudget,
    body_memory: MemoryBudget,
    fetcher: fetch::UrlFetcher,
    metrics: metrics::Metrics,
}

/// What a request works with: the backends (holding the credentials), the generation of the
/// index that serves, and the model its vectors come from, with the batcher that runs it.
pub struct Clients {
    pub index: Index,
    /// The bucket: needed for uploads, deletes and serving objects.
    pub source: Option<Source>,
    pub generation: Generation,
    pub model: Arc<Model>,
    batcher: batcher::Batcher,
}

impl AppState {
    /// Serves `index` (a collection, not followed) with `model`. Starts the batcher: call it
    /// inside a Tokio runtime.
    pub fn new(model: Arc<Model>, index: Index, source: Option<Source>, config: ServeConfig) -> Self {
        let generation = Generation {
            catalog: index.catalog.collection().to_string(),
            ..Generation::plain(index.vectors.collection())
        };
        Self::serving(generation, model, index, source, config)
    }

    /// Serves `generation` of an index, whose vectors `index` holds.
    pub fn serving(
        generation: Generation,
        model: Arc<Model>,
        index: Index,
        source: Option<Source>,
        config: ServeConfig,
    ) -> Self {
        let embed_slots = Arc::new(Semaphore::new(config.max_concurrent_embeddings.max(1)));
        let metrics = metrics::Metrics::default();
        let batcher = batcher_for(&model, &config, &embed_slots, &metrics);
        Self {
            embed_slots,
            queue: Queue { waiting: Default::default(), max: config.max_queued_embeddings },
            decode_memory: MemoryBudget::new(config.decode_memory),
            body_memory: MemoryBudget::new(config.body_memory),
            fetcher: fetch::UrlFetcher::new(config.max_upload_bytes, config.allow_private_urls),
            metrics,
            token: auth::Token::new(config.token.clone()),
            read_token: auth::Token::new(config.read_token.clone()),
            clients: RwLock::new(Arc::new(Clients { index, source, generation, model, batcher })),
            switching: Default::default(),
            follow: Default::default(),
            config,
        }
    }

    /// Follows the index's generations: `follow` moves the server when its alias moves.
    pub fn follow(self: &Arc<Self>, follow: follow::Follow) {
        let every = follow.every;
        if self.follow.set(follow).is_ok() {
            tokio::spawn(follow::run(self.clone(), every));
        }
    }

    pub fn clients(&self) -> Arc<Clients> {
        self.clients.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// New backends (credentials) for the same generation and model.
    fn replace_backends(&self, index: Index, source: Option<Source>) {
        let mut clients = self.clients.write().unwrap_or_else(|e| e.into_inner());
        let Clients { generation, model, batcher, .. } = &**clients;
        let (generation, model, batcher) = (generation.clone(), model.clone(), batcher.clone());
        *clients = Arc::new(Clients { index, source, generation, model, batcher });
    }

    /// Another generation, its index and model: requests from now on search it.
    fn switch(&self, generation: Generation, index: Index, model: Arc<Model>) {
        let batcher = batcher_for(&model, &self.config, &self.embed_slots, &self.metrics);
        let mut clients = self.clients.write().unwrap_or_else(|e| e.into_inner());
        let source = clients.source.clone();
        *clients = Arc::new(Clients { index, source, generation, model, batcher });
    }
}

/// A batcher for `model`, sized by the server's embed slots.
fn batcher_for(
    model: &Arc<Model>,
    config: &ServeConfig,
    slots: &Arc<Semaphore>,
    metrics: &metrics::Metrics,
) -> batcher::Batcher {
    let batch_size = metrics.batch_size.clone();
    let (total, taken) = (config.max_concurrent_embeddings.max(1), slots.clone());
    batcher::Batcher::new(
        model.clone(),
        config.max_batch,
        config.batch_window,
        move || total - taken.available_permits(),
        move |n| batch_size.observe(n as f64),
    )
}

/// A count of waiting requests with a bound.
struct Queue {
    waiting: Arc<std::sync::atomic::AtomicUsize>,
    max: usize,
}

/// A place in the queue, given up when dropped.
struct Place(Arc<std::sync::atomic::AtomicUsize>);

impl Queue {
    fn try_join(&self) -> Option<Place> {
        use std::sync::atomic::Ordering::SeqCst;
        self.waiting.fetch_update(SeqCst, SeqCst, |n| (n < self.max).then_some(n + 1)).ok()?;
        Some(Place(self.waiting.clone()))
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

pub fn router(state: Arc<AppState>) -> Router {
    let cfg = &state.config;
    let token = state.token.clone();
    let mut reads = Router::new()
        .route("/img/search", post(routes::search))
        .route("/img/count", get(routes::count))
        .route("/progress", get(routes::progress))
        .route("/img/object/{*key}", get(routes::object));
    if cfg.protect_search {
        let either = auth::Either { read: state.read_token.clone(), write: token.clone() };
        reads = reads.route_layer(axum::middleware::from_fn_with_state(either, auth::require_read));
    }
    let writes = Router::new()
        .route("/img/upload", post(routes::upload))
        .route("/img/drop", post(routes::drop_all))
        .route("/img/{*key}", delete(routes::delete))
        .route_layer(axum::middleware::from_fn_with_state(token, auth::require));
    Router::new()
        .route("/", get(routes::page))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(routes::readyz))
        .route("/metrics", get(metrics::render))
        .route("/openapi.json", get(openapi::document))
        .merge(reads)
        .merge(writes)
        .fallback(|| async { ApiError::not_found("no such route") })
        // Chunked bodies (no Content-Length) are cut off at the limit inside the extractors.
        .layer(DefaultBodyLimit::max(cfg.max_upload_bytes))
        .layer(axum::middleware::from_fn_with_state(cfg.max_upload_bytes, routes::refuse_oversized))
        .layer(axum::middleware::from_fn_with_state(cfg.request_timeout, routes::deadline))
        .layer(axum::middleware::from_fn_with_state(state.clone(), metrics::track))
        .layer(axum::middleware::from_fn(request_id::assign))
        .with_state(state)
}

/// Serves until SIGTERM or Ctrl-C, then for `drain` more (see `ServeArgs::shutdown_delay_seconds`).
pub async fn serve(addr: SocketAddr, state: Arc<AppState>, drain: Duration) -> Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(%addr, "serving search");
    let shutdown = async move {
        shutdown_signal().await;
        if !drain.is_zero() {
            tracing::info!("stopping in {drain:?}: answering until the endpoints have dropped this server");
            tokio::time::sleep(drain).await;
        }
    };
    serve_on(listener, state, shutdown).await;
    Ok(())
}

/// Serves on a bound listener until `shutdown` (the tests' way in).
pub async fn serve_on(listener: tokio::net::TcpListener, state: Arc<AppState>, shutdown: impl Future<Output = ()>) {
    let limits = state.config.connections;
    http::run(listener, router(state), limits, shutdown).await
}

/// SIGTERM (Kubernetes) or Ctrl-C: stop accepting, finish what is in flight.
async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! { _ = ctrl_c => {}, _ = term.recv() => {} }
}
