//! One reconcile of an ImageIndex, as steps, each a module with its own error type:
//!
//!   validate (pure) -> dereference (the only step that reads the cluster: the Milvus CR, the
//!   Jobs and their pods) -> validate::ready (pure) -> apply (search Deployment and Service) ->
//!   jobs and tasks (pure decisions: plan, embed or wait) -> apply (the Job they ask for) ->
//!   update_status
//!
//! The controller talks to no backend and reads no Secret. What needs Milvus, MySQL or the bucket
//! runs in the ImageIndex's namespace as a Job with the credentials its pods get: a short plan
//! Job (make or check the collection, diff the bucket, count) whose report decides whether an
//! embedding Job runs, and a cleanup Job on deletion. A missing dependency halts the steps with
//! conditions that say why, and a requeue with backoff, never an error loop; only Kubernetes API
//! failures are errors. `cleanup` runs on deletion.

mod apply;
mod cleanup;
mod context;
pub mod dereference;
pub mod jobs;
pub mod tasks;
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

use jobs::{Inputs, JobDecision, JobState};
use tasks::{PlanNext, Task};
use validate::ValidSpec;

use super::builders::{self, PlanFor, Resolved};
use super::status::{INDEXED, Observed, READY, SEARCH_READY, reason};
use crate::contract::report::Report;
use crate::crd::{ImageIndex, ImageIndexStatus};

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
                ctx.metrics.forget_index(&image_index.namespace().unwrap_or_default(), &image_index.name_any());
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
    ctx.settings
        .policy
        .check(image_index, &ctx.settings.default_image)
        .map_err(|m| Halt::Invalid(validate::invalid(&m)))?;
    let credentials = image_index.spec.milvus.credentials_secret_ref.is_some();
    let milvus = dereference::milvus(&ctx.client, &spec.milvus, credentials).await?;
    let milvus_url = validate::ready(&milvus).map_err(Halt::Blocked)?;
    let resolved = Resolved {
        milvus_url,
        collection: image_index.collection(),
        default_image: ctx.settings.default_image.clone(),
        features: ctx.settings.features,
    };
    let plans = dereference::tasks(image_index, &ctx.client, builders::PLAN).await?;
    let mut observed = vec![];
    // The backends as the last finished plan found them (a plan still running says nothing yet).
    let finished: Vec<Task> = plans.iter().filter(|t| t.job.state != JobState::Active).cloned().collect();
    if let Some(last) = tasks::latest(&finished) {
        observed.extend(tasks::conditions(last, &resolved.milvus_url));
    }
    let planned = plans.iter().filter(|t| t.job.state == JobState::Succeeded && t.report.is_some());
    if let Some(p) = planned.max_by_key(|t| t.job.created) {
        status.collection = Some(resolved.collection.clone());
        if let Some(Report::Planned { discovered, pending, indexed, failed, stale, held, generations, .. }) = &p.report
        {
            (status.images.discovered, status.images.pending) = (*discovered, *pending);
            (status.images.stale, status.images.held) = (*stale, *held);
            (status.images.indexed, status.images.failed) = (*indexed, *failed);
            status.generations = generations.as_ref().map(tasks::generations_status);
            observed.extend(tasks::rebuilding(generations.as_ref()));
        }
    }
    // The search objects once a plan has made the collection they serve; then always, so that
    // search answers while indexing runs and while a backend is down.
    if status.collection.as_deref() == Some(resolved.collection.as_str()) {
        let search = apply::search(image_index, ctx, &resolved).await?;
        // Not an endpoint of ours while another's Service has the name.
        status.endpoint = (search.reason != reason::NOT_OWNED).then(|| builders::endpoint(image_index));
        observed.push(search);
    } else {
        observed.push(Observed::unknown(
            SEARCH_READY,
            reason::WAITING,
            "waiting for the first plan to make the collection",
        ));
    }
    let found = Found { spec: &spec, plans: &plans, resolved: &resolved };
    let action = embedding(image_index, ctx, &found, status, &mut observed).await?;
    Ok((observed, action))
}

/// What the steps before the Job decision found, for it to use.
struct Found<'a> {
    spec: &'a ValidSpec,
    plans: &'a [Task],
    resolved: &'a Resolved,
}

/// Embedding Jobs: at most one at a time; a new one when the embedding settings changed or the
/// bucket did, as the latest plan found it; a plan when none holds. Pushes the Indexed condition
/// (and whatever else holds the work up); returns when to come back.
async fn embedding(
    image_index: &ImageIndex,
    ctx: &Context,
    found: &Found<'_>,
    status: &mut ImageIndexStatus,
    observed: &mut Vec<Observed>,
) -> Result<Action, Halt> {
    let Found { spec, plans, resolved } = found;
    let jobs = dereference::jobs(image_index, &ctx.client).await?;
    let latest = jobs::latest_done(&jobs);
    if let Some(j) = latest.filter(|j| j.state == JobState::Succeeded && status.last_sync_time != j.finished) {
        status.synced_generation = Some(j.spec_generation.max(status.synced_generation.unwrap_or_default()));
        status.synced_embedding = j.embedding.clone();
        status.last_sync_time = j.finished.clone();
        if let (Some(created), Some(finished)) = (j.created, &j.finished) {
            let took = finished.0.duration_since(created).unsigned_abs();
            let ns = image_index.namespace().unwrap_or_default();
            ctx.metrics.job_succeeded(&ns, &image_index.name_any(), &j.name, took);
        }
        apply::publish(ctx, image_index, EventType::Normal, "Indexed", format!("Job {} completed", j.name)).await;
    }
    let spec_generation = image_index.metadata.generation.unwrap_or_default();
    let embedding = builders::embedding_hash(image_index, resolved);
    // The status's record, else the last successful Job's own (an apiserver still serving an
    // older CRD prunes the status field; the Jobs keep their annotations).
    let synced = status.synced_embedding.clone().or_else(|| {
        jobs.iter().filter(|j| j.state == JobState::Succeeded).max_by_key(|j| j.created)?.embedding.clone()
    });
    let requested = image_index.annotations().get(crate::crd::RESYNC).cloned();
    // Only the newest plan speaks for the bucket, and only for the resync request it answers.
    let latest_plan = tasks::latest(plans);
    let answered = latest_plan.filter(|p| requested.is_none() || p.resync == requested);
    if answered.is_some() && latest_plan.is_some_and(|p| p.job.state != JobState::Active) {
        status.last_handled_resync = requested.clone();
    }
    let resync_requested = requested.is_some() && requested != status.last_handled_resync;
    let diff = answered.and_then(tasks::diff);
    let decision = jobs::decide(&Inputs {
        jobs: &jobs,
        spec_generation,
        embedding: &embedding,
        synced_embedding: synced.as_deref(),
        resync: spec.resync,
        diff: diff.as_ref(),
        now: Timestamp::now(),
        suspended: image_index.spec.suspend,
        resync_requested,
    });
    status.current_job = None;
    let (indexed, action) = match decision {
        JobDecision::Running { name, succeeded, completions } => {
            let pods = dereference::pods(image_index, &ctx.client, builders::EMBED).await?;
            let stuck = pods.iter().filter(|p| p.labels().get("job-name") == Some(&name)).find_map(tasks::blocked);
            status.current_job = Some(name.clone());
            let indexed = match stuck {
                Some(b) => tasks::blocked_condition(image_index, &format!("Job {name}"), &b),
                None => Observed::no(
                    INDEXED,
                    reason::INDEXING,
                    format!("Job {name}: {succeeded} of {completions} shards done"),
                ),
            };
            (indexed, Action::requeue(Duration::from_secs(30)))
        }
        JobDecision::FailedRecently { name, why, retry_in } => {
            let interval = &image_index.spec.source.resync_interval;
            let msg = format!("Job {name} failed: {why}; retrying after {interval}");
            (Observed::no(INDEXED, reason::JOB_FAILED, msg), Action::requeue(retry_in))
        }
        JobDecision::Diff => {
            return plan(image_index, ctx, found, latest.map(|j| j.name.clone()), requested, observed).await;
        }
        JobDecision::Create { why, plan } => {
            let name = apply::job(image_index, ctx, resolved, &why, plan).await?;
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
    };
    observed.push(tasks::with_stale(indexed, &status.images));
    Ok(action)
}

/// No diff holds: wait for the plan that runs, back off after one that failed, or start one.
/// Indexed keeps what it said while a routine plan runs (a resync must not flap Ready); it says
/// Planning only when it has said nothing yet.
async fn plan(
    image_index: &ImageIndex,
    ctx: &Context,
    found: &Found<'_>,
    after_job: Option<String>,
    resync: Option<String>,
    observed: &mut Vec<Observed>,
) -> Result<Action, Halt> {
    let spec_generation = image_index.metadata.generation.unwrap_or_default();
    let first = image_index.status.as_ref().is_none_or(|s| !s.conditions.iter().any(|c| c.type_ == INDEXED));
    let planning = |msg: String| {
        let told = observed.iter().any(|o| o.type_ == INDEXED);
        (first && !told).then(|| Observed::unknown(INDEXED, reason::PLANNING, msg))
    };
    let url = &image_index.spec.source.url;
    match tasks::next_plan(found.plans, spec_generation, Timestamp::now()) {
        PlanNext::Running { name, blocked: Some(b) } => {
            observed.push(tasks::blocked_condition(image_index, &format!("plan Job {name}"), &b));
            Ok(Action::requeue(Duration::from_secs(30)))
        }
        PlanNext::Running { name, blocked: None } => {
            observed.extend(planning(format!("plan Job {name} is listing {url}")));
            Ok(Action::requeue(Duration::from_secs(30)))
        }
        // The conditions of the failed plan say why.
        PlanNext::Backoff { retry_in } => Ok(Action::requeue(retry_in)),
        PlanNext::Halted => Ok(Action::await_change()),
        PlanNext::Create => {
            let deadline = ctx.settings.plan_timeout.as_secs().max(60) as i64;
            let name = apply::plan(image_index, ctx, found.resolved, &PlanFor { after_job, resync, deadline }).await?;
            observed.extend(planning(format!("plan Job {name} is listing {url}")));
            Ok(Action::requeue(Duration::from_secs(30)))
        }
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
