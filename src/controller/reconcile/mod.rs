//! One reconcile of an ImageIndex, as steps, each a module with its own error type:
//!
//!   validate (pure) -> dereference (the only step that reads the cluster) -> validate::ready
//!   (pure) -> backends (Milvus, MySQL) -> apply (search Deployment and Service) -> jobs (a pure
//!   decision, then a Job if it says so) -> update_status
//!
//! A missing dependency halts the steps with conditions that say why, and a requeue with backoff,
//! never an error loop; only Kubernetes API failures are errors. `cleanup` runs on deletion.

mod apply;
mod backends;
mod cleanup;
mod context;
pub mod dereference;
pub mod jobs;
mod update_status;
pub mod validate;

use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kube::api::Api;
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::runtime::finalizer::{self, Event as Finalizer, finalizer};
use tracing::warn;

pub use context::{Context, Settings};
pub use dereference::milvus_resource;

use backends::within;
use dereference::Refs;
use jobs::{Diff, Inputs, JobDecision, JobState};
use validate::ValidSpec;

use super::builders::{self, Resolved};
use super::status::{INDEXED, Observed, READY, reason};
use crate::crd::{ImageIndex, ImageIndexStatus};
use crate::store::Catalog;

pub const MANAGER: &str = "imageindex-controller";
pub const FINALIZER: &str = "imageindex.dev/cleanup";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("reading references: {0}")]
    Dereference(#[from] dereference::Error),
    #[error("applying owned objects: {0}")]
    Apply(#[from] apply::Error),
    #[error("writing status: {0}")]
    Status(#[from] update_status::Error),
    #[error("{0}")]
    Cleanup(#[from] cleanup::Error),
    #[error("finalizer: {0}")]
    Finalizer(#[source] Box<finalizer::Error<Error>>),
}

impl Error {
    /// A deletion waiting for its Jobs and search pods to go (see `cleanup::Error::Waiting`).
    pub fn is_waiting(&self) -> bool {
        match self {
            Error::Cleanup(cleanup::Error::Waiting(_)) => true,
            Error::Finalizer(e) => matches!(e.as_ref(), finalizer::Error::CleanupFailed(e) if e.is_waiting()),
            _ => false,
        }
    }

    /// The `error` label of the reconcile failure metric: which step failed.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Dereference(_) => "dereference",
            Error::Apply(_) => "apply",
            Error::Status(_) => "status",
            Error::Cleanup(_) => "cleanup",
            Error::Finalizer(e) => match e.as_ref() {
                finalizer::Error::ApplyFailed(e) | finalizer::Error::CleanupFailed(e) => e.metric_label(),
                _ => "finalizer",
            },
        }
    }
}

/// Why the steps stopped before the end.
enum Halt {
    /// The spec cannot work as written: these conditions say why; wait for it to change.
    Invalid(Vec<Observed>),
    /// A dependency is not there yet: these conditions say which; retry with backoff.
    Blocked(Vec<Observed>),
    /// The Kubernetes API failed.
    Error(Error),
}

impl From<dereference::Error> for Halt {
    fn from(e: dereference::Error) -> Self {
        Halt::Error(e.into())
    }
}

impl From<apply::Error> for Halt {
    fn from(e: apply::Error) -> Self {
        Halt::Error(e.into())
    }
}

pub async fn reconcile(image_index: Arc<ImageIndex>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = Instant::now();
    let api: Api<ImageIndex> = Api::namespaced(ctx.client.clone(), &image_index.namespace().unwrap_or_default());
    let result = finalizer(&api, FINALIZER, image_index, |event| async {
        match event {
            Finalizer::Apply(image_index) => apply(&image_index, &ctx).await,
            Finalizer::Cleanup(image_index) => {
                ctx.forget(&object_key(&image_index));
                Ok(cleanup::cleanup(&image_index, &ctx).await?)
            }
        }
    })
    .await
    .map_err(|e| Error::Finalizer(Box::new(e)));
    let failure = result.as_ref().err().filter(|e| !e.is_waiting()).map(Error::metric_label);
    ctx.metrics.observe(started.elapsed(), failure);
    result
}

/// A live ImageIndex: run the steps, then write what they observed, halted or not.
async fn apply(image_index: &ImageIndex, ctx: &Context) -> Result<Action, Error> {
    let key = object_key(image_index);
    let mut status = image_index.status.clone().unwrap_or_default();
    let (observed, action, settled) = match steps(image_index, ctx, &mut status).await {
        Ok((observed, action)) => (observed, action, true),
        Err(Halt::Invalid(observed)) => (observed, Action::await_change(), true),
        Err(Halt::Blocked(observed)) => (observed, ctx.backoff(&key), false),
        Err(Halt::Error(e)) => {
            // Visible on the resource, not only in the logs (a 403 from missing RBAC, a 5xx);
            // the error still backs off through `error_policy`. If the status write fails too,
            // the logs and the failure metric are all there is.
            let failed = Observed::no(READY, reason::KUBERNETES_API_ERROR, e.to_string());
            if let Err(w) = update_status::write(image_index, ctx, status, &[failed]).await {
                warn!(error = %w, "could not write the failure to status");
            }
            return Err(e);
        }
    };
    if settled {
        ctx.set_memo(&key, |m| m.retries = 0);
    }
    update_status::write(image_index, ctx, status, &observed).await?;
    Ok(action)
}

/// The steps in order: each hands the next what it needs, or halts with the conditions that say why.
async fn steps(
    image_index: &ImageIndex,
    ctx: &Context,
    status: &mut ImageIndexStatus,
) -> Result<(Vec<Observed>, Action), Halt> {
    let spec = validate::validate(image_index).map_err(|msg| Halt::Invalid(validate::invalid(&msg)))?;
    let refs = dereference::dereference(image_index, &spec, &ctx.client).await?;
    let ready = validate::ready(&refs).map_err(Halt::Blocked)?;
    let (catalog, mut observed) = backends::ensure(image_index, &ready, ctx).await.map_err(Halt::Blocked)?;
    status.collection = Some(image_index.collection());
    let resolved = Resolved {
        milvus_url: ready.milvus_url,
        collection: image_index.collection(),
        default_image: ctx.settings.default_image.clone(),
        jobs: ctx.settings.jobs,
    };
    // The search objects first: search answers while indexing runs.
    observed.push(apply::search(image_index, ctx, &resolved, &refs.search_token).await?);
    status.endpoint = Some(builders::endpoint(image_index));
    let found = Found { spec: &spec, refs: &refs, catalog: &catalog, resolved: &resolved };
    let action = embedding(image_index, ctx, &found, status, &mut observed).await?;
    counts(image_index, ctx, &catalog, status).await;
    Ok((observed, action))
}

/// What the steps before the Job decision found, for it to use.
struct Found<'a> {
    spec: &'a ValidSpec,
    refs: &'a Refs,
    catalog: &'a Catalog,
    resolved: &'a Resolved,
}

/// Embedding Jobs: at most one at a time; a new one when the spec changed or the bucket did.
/// Pushes the Indexed condition; returns when to come back.
async fn embedding(
    image_index: &ImageIndex,
    ctx: &Context,
    found: &Found<'_>,
    status: &mut ImageIndexStatus,
    observed: &mut Vec<Observed>,
) -> Result<Action, Halt> {
    let Found { spec, refs, catalog, resolved } = found;
    let key = object_key(image_index);
    let jobs = dereference::jobs(image_index, &ctx.client).await?;
    let latest = jobs::latest_done(&jobs);
    if let Some(j) = latest.filter(|j| j.state == JobState::Succeeded && status.last_sync_time != j.finished) {
        status.synced_generation = Some(j.generation.max(status.synced_generation.unwrap_or_default()));
        status.synced_embedding = j.embedding.clone();
        status.last_sync_time = j.finished.clone();
        apply::publish(ctx, image_index, EventType::Normal, "Indexed", format!("Job {} completed", j.name)).await;
    }
    let generation = image_index.metadata.generation.unwrap_or_default();
    let embedding = builders::embedding_hash(image_index, resolved);
    // The status's record, else the last successful Job's own (an apiserver still serving an
    // older CRD prunes the status field; the Jobs keep their annotations).
    let synced = status.synced_embedding.clone().or_else(|| {
        jobs.iter().filter(|j| j.state == JobState::Succeeded).max_by_key(|j| j.created)?.embedding.clone()
    });
    let requested = image_index.annotations().get(crate::crd::RESYNC).cloned();
    let resync_requested = requested.is_some() && requested != status.last_handled_resync;
    let inputs = |diff| Inputs {
        jobs: &jobs,
        generation,
        embedding: &embedding,
        synced_embedding: synced.as_deref(),
        resync: spec.resync,
        diff,
        now: Timestamp::now(),
        suspended: image_index.spec.suspend,
        resync_requested,
    };
    // A resync asked for lists afresh, whatever was listed before.
    let remembered = ctx.memo(&key).diff.filter(|_| !resync_requested);
    let mut decision = jobs::decide(&inputs(remembered.as_ref()));
    if decision == JobDecision::Diff {
        let url = &image_index.spec.source.url;
        let listed =
            within(ctx.settings.list_timeout, backends::diff(image_index, &refs.source_credentials, catalog)).await;
        let backends::Listed { discovered, pending, refused } = listed.map_err(|e| {
            observed.push(Observed::no(INDEXED, reason::SOURCE_UNAVAILABLE, format!("listing {url}: {e}")));
            Halt::Blocked(std::mem::take(observed))
        })?;
        let after_job = latest.map(|j| j.name.clone());
        let diff = Diff { at: Timestamp::now(), generation, after_job, discovered, pending, refused };
        ctx.set_memo(&key, |m| m.diff = Some(diff.clone()));
        status.last_handled_resync = requested.clone();
        decision = jobs::decide(&inputs(Some(&diff)));
    }
    status.current_job = None;
    let (indexed, action) = match decision {
        JobDecision::Running { name, succeeded, completions } => {
            let progress = within(ctx.settings.io_timeout, catalog.progress()).await.ok().and_then(|p| p.run);
            let progress = progress.map(|r| {
                format!(", {} of {} planned objects done", r.progress.indexed + r.progress.failed, r.progress.planned)
            });
            let msg = format!("Job {name}: {succeeded} of {completions} shards done{}", progress.unwrap_or_default());
            status.current_job = Some(name);
            (Observed::no(INDEXED, reason::INDEXING, msg), Action::requeue(Duration::from_secs(30)))
        }
        JobDecision::FailedRecently { name, why, retry_in } => {
            let interval = &image_index.spec.source.resync_interval;
            let msg = format!("Job {name} failed: {why}; retrying after {interval}");
            (Observed::no(INDEXED, reason::JOB_FAILED, msg), Action::requeue(retry_in))
        }
        JobDecision::Create { why } => {
            let name = apply::job(image_index, ctx, resolved, &why).await?;
            let msg = format!("Job {name}: {why}");
            status.current_job = Some(name);
            (Observed::no(INDEXED, reason::INDEXING, msg), Action::requeue(Duration::from_secs(30)))
        }
        JobDecision::DeletionRefused { why } => {
            apply::publish(ctx, image_index, EventType::Warning, "DeletionRefused", why.clone()).await;
            (Observed::no(INDEXED, reason::DELETION_REFUSED, why), Action::requeue(spec.resync))
        }
        JobDecision::UpToDate { discovered } => {
            let msg = format!("{discovered} objects in sync with {}", image_index.spec.source.url);
            (Observed::yes(INDEXED, reason::UP_TO_DATE, msg), Action::requeue(spec.resync))
        }
        JobDecision::Suspended => {
            let msg = "indexing is suspended (spec.suspend); search serves what is indexed".to_string();
            (Observed::no(INDEXED, reason::SUSPENDED, msg), Action::await_change())
        }
        JobDecision::Diff => unreachable!("a diff made just now holds"),
    };
    observed.push(indexed);
    Ok(action)
}

/// Counts: the bucket's from the last diff (kept while a Job runs: the informer's copy of our own
/// status can lag behind the write that set them), the catalog's fresh.
async fn counts(image_index: &ImageIndex, ctx: &Context, catalog: &Catalog, status: &mut ImageIndexStatus) {
    if let Some(d) = ctx.memo(&object_key(image_index)).diff {
        status.images.discovered = d.discovered;
        status.images.pending = d.pending;
    }
    if let Ok(c) = within(ctx.settings.io_timeout, catalog.counts()).await {
        status.images.indexed = c.indexed;
        status.images.failed = c.failed;
    }
}

pub fn error_policy(image_index: Arc<ImageIndex>, err: &Error, ctx: Arc<Context>) -> Action {
    if err.is_waiting() {
        tracing::info!(name = %image_index.name_any(), "{err}");
        return Action::requeue(cleanup::WAIT);
    }
    warn!(name = %image_index.name_any(), error = %err, "reconcile failed");
    ctx.backoff(&object_key(&image_index))
}

fn object_key(image_index: &ImageIndex) -> String {
    format!("{}/{}", image_index.namespace().unwrap_or_default(), image_index.name_any())
}
