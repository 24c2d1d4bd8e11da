//! Backends: the collection in Milvus and the catalog in MySQL, ready for the Jobs' vectors, and
//! the diff of the bucket against the catalog. Each call is bounded by a timeout; a backend that
//! is not ready is a condition, not an error.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::context::{Connected, Context};
use super::validate::Ready;
use crate::controller::status::{COLLECTION_READY, MILVUS_READY, Observed, reason};
use crate::core::{ModelId, Redacted};
use crate::crd::ImageIndex;
use crate::store::{self, Catalog, Index, MilvusConfig, S3Credentials, Source, SourceConfig, VectorStore};
use crate::sync::plan;

/// ResNet50's pooled output.
const DIM: usize = 2048;

/// A backend call that failed or did not answer in time.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Store(#[from] store::Error),
    #[error("no answer in {0:?}")]
    Timeout(Duration),
    /// It cannot be used yet (credentials missing, Milvus not ready): the message says why.
    #[error("{0}")]
    Unavailable(String),
}

pub async fn within<T, E: Into<Error>>(limit: Duration, f: impl Future<Output = Result<T, E>>) -> Result<T, Error> {
    tokio::time::timeout(limit, f).await.map_err(|_| Error::Timeout(limit))?.map_err(Into::into)
}

/// The vectors the Jobs will make: recorded with a new collection, checked against an old one.
pub fn model_id(image_index: &ImageIndex) -> ModelId {
    ModelId {
        model: image_index.spec.embedding.model_uri.rsplit('/').next().unwrap_or_default().to_string(),
        precision: image_index.spec.embedding.precision,
    }
}

pub fn milvus_config(image_index: &ImageIndex, url: String, token: Option<Redacted>) -> MilvusConfig {
    MilvusConfig { url, token, collection: image_index.collection(), index: image_index.spec.milvus.index.kind }
}

/// Why the collection is not ready, as a condition.
fn not_ready(e: &Error) -> Observed {
    match e {
        Error::Store(store::Error::ModelMismatch(m)) => Observed::no(COLLECTION_READY, reason::MODEL_MISMATCH, &m.0),
        Error::Store(store::Error::IndexMismatch(msg)) => Observed::no(COLLECTION_READY, reason::INDEX_MISMATCH, msg),
        Error::Store(store::Error::Claimed(msg)) => Observed::no(COLLECTION_READY, reason::COLLECTION_CLAIMED, msg),
        e => Observed::no(COLLECTION_READY, reason::COLLECTION_UNAVAILABLE, e.to_string()),
    }
}

/// How long a collection ensured in full (claim, schema, index, load, model) is trusted; in
/// between, a reconcile only asks Milvus whether it is still loaded.
const ENSURE_EVERY: Duration = Duration::from_secs(300);

/// The collection made (or checked), its index and load; the catalog migrated and the collection
/// claimed for this ImageIndex. On success, the catalog and the two conditions that hold;
/// otherwise the conditions that say why.
///
/// The connections are kept between reconciles (one Milvus channel per ImageIndex, one MySQL pool
/// per MySQL, migrated once), and the full ensure runs when they are new or every
/// `ENSURE_EVERY`; before, every reconcile connected, migrated and loaded afresh.
pub async fn ensure(
    image_index: &ImageIndex,
    ready: &Ready,
    ctx: &Context,
) -> Result<(Catalog, Vec<Observed>), Vec<Observed>> {
    let key = super::object_key(image_index);
    let timeout = ctx.settings.io_timeout;
    let url = &ready.milvus_url;
    let model = model_id(image_index);
    let milvus = milvus_config(image_index, url.clone(), ready.milvus_token.clone());
    let milvus_ready = Observed::yes(MILVUS_READY, reason::READY, format!("Milvus at {url}"));
    let collection_ready = Observed::yes(
        COLLECTION_READY,
        reason::READY,
        format!("collection {} loaded; catalog tables migrated", milvus.collection),
    );
    let fingerprint = fingerprint(&milvus, ready, &model, &image_index.owner());
    let cached = ctx.memo(&key).connected.filter(|c| c.fingerprint == fingerprint);
    if let Some(c) = cached.filter(|c| c.ensured.elapsed() < ENSURE_EVERY) {
        match within(timeout, c.index.vectors.ready()).await {
            Ok(()) => return Ok((c.index.catalog.clone(), vec![milvus_ready, collection_ready])),
            // Dropped outside, unloaded, or the channel broke: connect and ensure afresh.
            Err(e) => tracing::info!(collection = %milvus.collection, "reconnecting: {e}"),
        }
    }
    ctx.set_memo(&key, |m| m.connected = None);
    ctx.metrics.connected();
    let vectors = match within(timeout, VectorStore::connect(&milvus)).await {
        Ok(v) => v,
        Err(e) => return Err(vec![Observed::no(MILVUS_READY, reason::MILVUS_UNAVAILABLE, format!("{url}: {e}"))]),
    };
    let model_name = model.to_string();
    let catalog = match within(timeout, ctx.catalog(ready.mysql_url.expose(), &milvus.collection, &model_name)).await {
        Ok(c) => c,
        Err(e) => {
            return Err(vec![milvus_ready, Observed::no(COLLECTION_READY, reason::MYSQL_UNAVAILABLE, e.to_string())]);
        }
    };
    let index = Arc::new(Index { vectors, catalog });
    match within(timeout, index.ensure(DIM, &model, false, &image_index.owner())).await {
        Ok(_) => {
            let connected = Arc::new(Connected { fingerprint, index: index.clone(), ensured: Instant::now() });
            ctx.set_memo(&key, |m| m.connected = Some(connected));
            Ok((index.catalog.clone(), vec![milvus_ready, collection_ready]))
        }
        Err(e) => Err(vec![milvus_ready, not_ready(&e)]),
    }
}

/// What the connections were made for, hashed (the credentials are in it: never kept in clear).
fn fingerprint(milvus: &MilvusConfig, ready: &Ready, model: &ModelId, owner: &str) -> String {
    let token = milvus.token.as_ref().map(|t| t.expose().to_string());
    let parts = serde_json::json!([
        milvus.url,
        token,
        milvus.collection,
        milvus.index.as_str(),
        ready.mysql_url.expose(),
        model.to_string(),
        owner
    ]);
    store::content_hash(parts.to_string().as_bytes())
}

/// What listing the bucket against the catalog found.
pub struct Listed {
    pub discovered: u64,
    /// Objects new, changed or deleted.
    pub pending: u64,
    /// Why the deletions are refused (see `DeletionGuard`); the Job would refuse them too.
    pub refused: Option<String>,
}

/// Lists the bucket (with the source's credentials) and diffs it against the catalog.
pub async fn diff(
    image_index: &ImageIndex,
    credentials: &Result<Option<S3Credentials>, String>,
    catalog: &Catalog,
) -> Result<Listed, Error> {
    let s = &image_index.spec.source;
    let credentials = credentials.clone().map_err(Error::Unavailable)?;
    let source = Source::open(&SourceConfig {
        url: s.url.clone(),
        endpoint: s.endpoint.clone(),
        include: s.include.clone(),
        credentials,
    })?;
    let listing = source.list().await?;
    let entries = catalog.entries(0, 1).await?;
    let catalog_size = entries.len();
    let p = plan(listing, entries, 0, 1);
    let refused = s.deletion_guard().check(&p, catalog_size).err().map(|e| e.to_string());
    let pending = (p.new.len() + p.changed.len() + p.deleted.len()) as u64;
    Ok(Listed { discovered: p.discovered as u64, pending, refused })
}
