//! `imageindex serve`: its flags, and starting the service from them.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;

use super::{AppState, ServeConfig, follow, reload};
use crate::config::{DataPlaneArgs, ModelArgs};
use crate::contract::env;
use crate::core::Redacted;
use crate::embed::Model;
use crate::index::{Generations, Index};
use crate::store::Generation;

#[derive(clap::Args)]
pub struct ServeArgs {
    #[arg(long, env = env::LISTEN, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// The bucket or folder the index was built from: needed to serve images, take uploads and delete.
    #[arg(long, env = env::SOURCE)]
    source: Option<String>,
    /// Largest request body, and largest image fetched by URL (bytes).
    #[arg(long, env = env::MAX_UPLOAD_BYTES, default_value_t = 20 << 20)]
    max_upload_bytes: usize,
    /// Whole-request deadline in seconds.
    #[arg(long, env = env::REQUEST_TIMEOUT, default_value_t = 30)]
    request_timeout: u64,
    /// Images embedded at once; more wait in the queue. 0 = twice the cores.
    #[arg(long, env = env::MAX_CONCURRENT_EMBEDDINGS, default_value_t = 0)]
    max_concurrent_embeddings: usize,
    /// Requests that may wait for an embedding; more get 503 + Retry-After at once.
    #[arg(long, env = env::MAX_QUEUED_EMBEDDINGS, default_value_t = 32)]
    max_queued_embeddings: usize,
    /// MiB the request bodies and fetched images being read may take at once (each reserves its
    /// Content-Length, or --max-upload-bytes); beyond it, 503 + Retry-After. Reading holds no
    /// embedding slot.
    #[arg(long, env = env::BODY_MEMORY_MIB, default_value_t = 256)]
    body_memory_mib: u64,
    /// Milliseconds a request waits for an embedding before it gets 503 + Retry-After.
    #[arg(long, env = env::QUEUE_TIMEOUT_MS, default_value_t = 5000)]
    queue_timeout_ms: u64,
    /// Most queries embedded in one model call (1: one at a time).
    #[arg(long, env = env::MAX_BATCH, default_value_t = 8, value_parser = clap::value_parser!(u16).range(1..=256))]
    max_batch: u16,
    /// Milliseconds the first query of a batch waits for others to join it.
    #[arg(long, env = env::BATCH_WINDOW_MS, default_value_t = 2)]
    batch_window_ms: u64,
    /// Seconds a client has to send a request's headers (also how long a kept-alive connection may idle).
    #[arg(long, env = env::HEADER_TIMEOUT, default_value_t = 10)]
    header_timeout: u64,
    /// Connections open at once; more are closed as they arrive.
    #[arg(long, env = env::MAX_CONNECTIONS, default_value_t = 1024)]
    max_connections: usize,
    /// File holding the bearer token for upload, delete and drop (a mounted Secret).
    #[arg(long, env = env::TOKEN_FILE)]
    token_file: Option<PathBuf>,
    /// The token itself (prefer --token-file). Without a token the mutating routes are disabled.
    #[arg(long, env = env::TOKEN, hide_env_values = true)]
    token: Option<Redacted>,
    /// File holding the read token (a mounted Secret): it admits search, count, progress and
    /// images, never upload, delete or drop. Giving one protects them (--protect-search).
    #[arg(long, env = env::READ_TOKEN_FILE)]
    read_token_file: Option<PathBuf>,
    /// The read token itself (prefer --read-token-file).
    #[arg(long, env = env::READ_TOKEN, hide_env_values = true)]
    read_token: Option<Redacted>,
    /// Require a token for search, count, progress and images too: the read token, or the write
    /// token (which admits everything).
    #[arg(long, env = env::PROTECT_SEARCH)]
    protect_search: bool,
    /// Enable POST /img/drop (drops the collection and the catalog).
    #[arg(long, env = env::ALLOW_DROP)]
    allow_drop: bool,
    /// Let {"url": ...} queries fetch from loopback and private addresses.
    #[arg(long, env = env::ALLOW_PRIVATE_URLS)]
    allow_private_urls: bool,
    /// Seconds between reads of the index's alias: when it moves to another generation, search
    /// moves with it, loading that generation's model from beside --model.
    #[arg(long, env = env::FOLLOW_SECONDS, default_value_t = follow::EVERY.as_secs(), value_parser = clap::value_parser!(u64).range(1..))]
    follow_seconds: u64,
    /// Seconds to go on answering after SIGTERM before closing (in a pod: while the Service's
    /// endpoints drop it, so that a rollout fails no request).
    #[arg(long, env = env::SHUTDOWN_DELAY_SECONDS, default_value_t = 0)]
    shutdown_delay_seconds: u64,
    #[command(flatten)]
    data: DataPlaneArgs,
}

impl ServeArgs {
    pub async fn run(self) -> Result<()> {
        let DataPlaneArgs { backend, model, src, .. } = &self.data;
        let watch = reload::Watch {
            backend: backend.clone(),
            src: src.clone(),
            source_url: self.source.clone(),
            token_file: self.token_file.clone(),
            token: self.token.clone(),
            read_token_file: self.read_token_file.clone(),
            read_token: self.read_token.clone(),
        };
        let credentials = watch.read()?;
        let (gens, source) = watch.connect(&credentials).await?;
        let mixed = model.allow_mixed_precision;
        let (generation, loaded, index) = serving(&gens, model, &backend.owner).await?;
        let config = self.config(&credentials);
        let state = Arc::new(AppState::serving(generation, Arc::new(loaded), index, source, config));
        let every = Duration::from_secs(self.follow_seconds);
        state.follow(follow::Follow {
            name: gens.name().to_string(),
            model: model.clone(),
            mixed_precision: mixed,
            every,
        });
        if watch.has_files() {
            tokio::spawn(watch.run(state.clone(), credentials, reload::EVERY));
        }
        eprintln!("search on http://{}/  (API: POST /img/search, GET /img/count, GET /progress)", self.listen);
        super::serve(self.listen, state, Duration::from_secs(self.shutdown_delay_seconds)).await
    }

    /// The server's settings, from its flags and the credentials read.
    fn config(&self, credentials: &reload::Credentials) -> ServeConfig {
        let DataPlaneArgs { backend, limits, .. } = &self.data;
        let defaults = ServeConfig::default();
        ServeConfig {
            max_upload_bytes: self.max_upload_bytes,
            limits: limits.decode(),
            request_timeout: Duration::from_secs(self.request_timeout),
            max_concurrent_embeddings: match self.max_concurrent_embeddings {
                0 => defaults.max_concurrent_embeddings,
                n => n,
            },
            max_queued_embeddings: self.max_queued_embeddings,
            queue_timeout: Duration::from_millis(self.queue_timeout_ms),
            max_batch: self.max_batch.into(),
            batch_window: Duration::from_millis(self.batch_window_ms),
            decode_memory: limits.decode_memory_mib << 20,
            body_memory: self.body_memory_mib << 20,
            token: credentials.token(),
            read_token: credentials.read_token(),
            protect_search: self.protect_search || self.read_token.is_some() || self.read_token_file.is_some(),
            allow_drop: self.allow_drop,
            allow_private_urls: self.allow_private_urls,
            owner: backend.owner.clone(),
            connections: super::ConnectionLimits {
                header_timeout: Duration::from_secs(self.header_timeout),
                max_connections: self.max_connections,
            },
        }
    }
}

/// The generation that serves, and the model its vectors came from: `model` where it fits them,
/// else that generation's own file beside it. A new model (an index being rebuilt for it) is not
/// even needed until search moves to it. A generation dropped while its model loaded (a server
/// that outlived its grace period) is not made again: the alias is read again, a few times.
async fn serving(gens: &Generations, model: &ModelArgs, owner: &str) -> Result<(Generation, Model, Index)> {
    let mixed = model.allow_mixed_precision;
    let mut attempts = 0;
    loop {
        let generation = gens.serving().await?.unwrap_or_else(|| Generation::plain(gens.name()));
        let recorded = generation.model.as_deref().map(str::parse).transpose().map_err(anyhow::Error::msg)?;
        let loaded = match recorded {
            Some(id) if !model.describe().is_ok_and(|wanted| generation.fits(&wanted, mixed)) => {
                eprintln!(
                    "generation {} of {} holds vectors of {id}: searching with that model",
                    generation.number,
                    gens.name()
                );
                model.load_for(&id)?
            }
            _ => model.load()?,
        };
        let index = gens.index(&generation, loaded.id());
        match index.ensure(loaded.dim(), loaded.id(), mixed, owner).await {
            Ok(_) => return Ok((generation, loaded, index)),
            Err(e @ crate::store::Error::NotFound(_)) if attempts < 3 => {
                attempts += 1;
                eprintln!("generation {} of {} is gone ({e}): reading the alias again", generation.number, gens.name());
            }
            Err(e) => return Err(e.into()),
        }
    }
}
