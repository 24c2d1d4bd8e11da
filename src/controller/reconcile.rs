//! One reconcile of an ImageIndex, as a pipeline: validate -> resolve references (Milvus, Secrets)
//! -> ensure the collection and catalog -> apply the search Deployment and Service -> decide on an
//! embedding Job -> write status. A missing dependency is a condition with a reason and a requeue
//! with backoff, never an error loop; only Kubernetes API failures are errors.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{Secret, Service};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PropagationPolicy};
use kube::core::{ApiResource, DynamicObject, GroupVersionKind};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder};
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::{Client, Resource, ResourceExt};
use serde_json::json;
use tracing::{info, warn};

use super::builders::{self, GENERATION, Resolved};
use super::metrics::Metrics;
use super::status::{self, COLLECTION_READY, INDEXED, MILVUS_READY, Observed, SEARCH_READY, reason};
use crate::crd::{DeletionPolicy, ImageIndex, ImageIndexStatus, SecretKeyRef, parse_interval};
use crate::embed::worker::plan;
use crate::embed::{ModelId, ModelMismatch};
use crate::store::source::S3Credentials;
use crate::store::{Catalog, MilvusConfig, Source, SourceConfig, VectorStore};

pub const MANAGER: &str = "imageindex-controller";
pub const FINALIZER: &str = "imageindex.dev/cleanup";
/// ResNet50's pooled output.
const DIM: usize = 2048;

/// Operator-wide settings.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Image for Jobs and search pods when an ImageIndex names none (the operator's own).
    pub default_image: String,
    /// The cluster runs Indexed Jobs (1.24+); otherwise one pod embeds all shards.
    pub indexed_jobs: bool,
    /// Limit for each Milvus and MySQL call the controller makes.
    pub io_timeout: Duration,
    /// Limit for listing a bucket and diffing it against the catalog.
    pub list_timeout: Duration,
}

pub struct Context {
    pub client: Client,
    pub settings: Settings,
    pub recorder: Recorder,
    pub metrics: Arc<Metrics>,
    memo: Mutex<HashMap<String, Memo>>,
}

/// Per-ImageIndex memory between reconciles: the last bucket diff (listing is the expensive part,
/// so it runs once per resync interval, after each Job, and on spec changes) and the retry count.
#[derive(Clone, Default)]
struct Memo {
    listed: Option<(Instant, i64, Option<String>)>,
    discovered: u64,
    pending: u64,
    retries: u32,
}

impl Context {
    pub fn new(client: Client, settings: Settings, recorder: Recorder, metrics: Arc<Metrics>) -> Self {
        Self { client, settings, recorder, metrics, memo: Mutex::new(HashMap::new()) }
    }

    fn memo(&self, key: &str) -> Memo {
        self.memo.lock().unwrap().get(key).cloned().unwrap_or_default()
    }

    fn set_memo(&self, key: &str, f: impl FnOnce(&mut Memo)) {
        f(self.memo.lock().unwrap().entry(key.to_string()).or_default())
    }

    /// Exponential backoff for waiting on dependencies: 5 s doubling to 5 min.
    fn backoff(&self, key: &str) -> Action {
        let mut retries = 0;
        self.set_memo(key, |m| {
            retries = m.retries;
            m.retries = m.retries.saturating_add(1);
        });
        Action::requeue(Duration::from_secs(5u64.saturating_mul(1 << retries.min(6)).min(300)))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("finalizer: {0}")]
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<Error>>),
    #[error("cleanup of {0} failed, will retry: {1:#}")]
    Cleanup(String, anyhow::Error),
}

impl Error {
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Kube(_) => "kube",
            Error::Finalizer(_) => "finalizer",
            Error::Cleanup(..) => "cleanup",
        }
    }
}

pub async fn reconcile(ii: Arc<ImageIndex>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = Instant::now();
    let ns = ii.namespace().unwrap_or_default();
    let api: Api<ImageIndex> = Api::namespaced(ctx.client.clone(), &ns);
    let result = finalizer(&api, FINALIZER, ii, |event| async {
        match event {
            Finalizer::Apply(ii) => apply(&ii, &ctx).await,
            Finalizer::Cleanup(ii) => cleanup(&ii, &ctx).await,
        }
    })
    .await
    .map_err(|e| Error::Finalizer(Box::new(e)));
    ctx.metrics.observe(started.elapsed(), result.as_ref().err().map(Error::metric_label));
    result
}

/// What a reconcile of a live ImageIndex ends with: conditions, counts, and when to come back.
struct Outcome {
    observed: Vec<Observed>,
    action: Action,
}

async fn apply(ii: &ImageIndex, ctx: &Context) -> Result<Action, Error> {
    let key = object_key(ii);
    let mut status = ii.status.clone().unwrap_or_default();
    let outcome = match pipeline(ii, ctx, &mut status).await? {
        Ok(outcome) => {
            ctx.set_memo(&key, |m| m.retries = 0);
            outcome
        }
        // Blocked on a dependency: say why, keep the other conditions, retry with backoff.
        Err(blocked) => Outcome { observed: blocked, action: ctx.backoff(&key) },
    };
    write_status(ii, ctx, status, &outcome.observed).await?;
    Ok(outcome.action)
}

/// The steps of a reconcile. The outer error is the Kubernetes API failing; the inner one is a
/// dependency not being there yet, as the conditions that say so.
async fn pipeline(
    ii: &ImageIndex,
    ctx: &Context,
    status: &mut ImageIndexStatus,
) -> Result<Result<Outcome, Vec<Observed>>, Error> {
    let ns = ii.namespace().unwrap_or_default();
    let key = object_key(ii);

    // 1. Validate what the schema cannot express.
    if let Err(msg) = validate(ii) {
        let observed = status::ALL.iter().map(|&t| Observed::unknown(t, reason::INVALID_SPEC, msg.clone())).collect();
        return Ok(Ok(Outcome { observed, action: Action::await_change() }));
    }
    let waiting = |types: &[&'static str]| -> Vec<Observed> {
        types.iter().map(|&t| Observed::unknown(t, reason::WAITING, "waiting for the conditions before it")).collect()
    };

    // 2. Resolve references: Milvus, then the Secrets.
    let milvus_url = match resolve_milvus(ii, ctx).await? {
        Ok(url) => url,
        Err(blocked) => {
            let mut b = vec![blocked];
            b.extend(waiting(&[COLLECTION_READY, INDEXED, SEARCH_READY]));
            return Ok(Err(b));
        }
    };
    let milvus_token = match &ii.spec.milvus.credentials_secret_ref {
        Some(r) => match secret_key(ctx, &ns, r).await? {
            Ok(v) => Some(v),
            Err((reason, msg)) => return Ok(Err(vec![Observed::no(MILVUS_READY, reason, msg)])),
        },
        None => None,
    };
    let mysql_url = match secret_key(ctx, &ns, &ii.spec.mysql.secret_ref).await? {
        Ok(v) => v,
        Err((reason, msg)) => {
            let mut b = vec![
                Observed::yes(MILVUS_READY, reason::READY, &milvus_url),
                Observed::no(COLLECTION_READY, reason, msg),
            ];
            b.extend(waiting(&[INDEXED, SEARCH_READY]));
            return Ok(Err(b));
        }
    };

    // 3. The collection, its index and load; the catalog tables.
    let collection = ii.collection();
    let milvus_cfg = MilvusConfig {
        url: milvus_url.clone(),
        token: milvus_token,
        collection: collection.clone(),
        index: ii.spec.milvus.index.kind.into(),
    };
    let timeout = ctx.settings.io_timeout;
    // The vectors the Jobs will make: recorded with a new collection, checked against an old one.
    let model = ModelId {
        model: ii.spec.embedding.model_uri.rsplit('/').next().unwrap_or_default().to_string(),
        precision: ii.spec.embedding.precision,
    };
    let mismatch = |e: &anyhow::Error| {
        e.downcast_ref::<ModelMismatch>().map(|m| Observed::no(COLLECTION_READY, reason::MODEL_MISMATCH, &m.0))
    };
    let vectors = async {
        let v = VectorStore::connect(&milvus_cfg).await?;
        v.ensure_collection(DIM, &model, false).await?;
        anyhow::Ok(v)
    };
    if let Err(e) = within(timeout, vectors).await {
        if let Some(m) = mismatch(&e) {
            return Ok(Err(vec![Observed::yes(MILVUS_READY, reason::READY, &milvus_url), m]));
        }
        let msg = format!("{milvus_url}: {e:#}");
        return Ok(Err(vec![Observed::no(MILVUS_READY, reason::MILVUS_UNAVAILABLE, msg)]));
    }
    let catalog = async {
        let c = Catalog::connect(&mysql_url, &collection, &model.to_string()).await?;
        c.claim(&model, false).await?;
        anyhow::Ok(c)
    };
    let catalog = match within(timeout, catalog).await {
        Ok(c) => c,
        Err(e) => {
            let m = mismatch(&e);
            let b = vec![
                Observed::yes(MILVUS_READY, reason::READY, &milvus_url),
                m.unwrap_or_else(|| Observed::no(COLLECTION_READY, reason::MYSQL_UNAVAILABLE, format!("{e:#}"))),
            ];
            return Ok(Err(b));
        }
    };
    status.collection = Some(collection.clone());
    let mut observed = vec![
        Observed::yes(MILVUS_READY, reason::READY, format!("Milvus at {milvus_url}")),
        Observed::yes(
            COLLECTION_READY,
            reason::READY,
            format!("collection {collection} loaded; catalog tables migrated"),
        ),
    ];
    let resolved = Resolved {
        milvus_url,
        collection,
        default_image: ctx.settings.default_image.clone(),
        indexed_jobs: ctx.settings.indexed_jobs,
    };

    // 4. The search Deployment and Service, from the start: search answers while indexing runs.
    observed.push(apply_search(ii, ctx, &resolved).await?);
    status.endpoint = Some(builders::endpoint(ii));

    // 5. Embedding Jobs: at most one at a time; a new one when the spec changed or the bucket did.
    let resync = parse_interval(&ii.spec.source.resync_interval).unwrap_or(Duration::from_secs(600));
    let generation = ii.metadata.generation.unwrap_or_default();
    let jobs_api: Api<Job> = Api::namespaced(ctx.client.clone(), &ns);
    let selector = format!("{}={},{}=embed", builders::INSTANCE, ii.name_any(), builders::COMPONENT);
    let jobs: Vec<JobView> =
        jobs_api.list(&ListParams::default().labels(&selector)).await?.items.iter().map(JobView::of).collect();
    let latest_done = jobs.iter().filter(|j| j.state != JobState::Active).max_by_key(|j| j.created);
    if let Some(j) = latest_done.filter(|j| j.state == JobState::Succeeded)
        && status.last_sync_time != j.finished
    {
        status.synced_generation = Some(j.generation.max(status.synced_generation.unwrap_or_default()));
        status.last_sync_time = j.finished.clone();
        publish(ctx, ii, EventType::Normal, "Indexed", format!("Job {} completed", j.name)).await;
    }
    let action;
    if let Some(active) = jobs.iter().find(|j| j.state == JobState::Active) {
        status.current_job = Some(active.name.clone());
        let progress = catalog.progress().await.ok().and_then(|p| p.run).map(|r| {
            format!(", {} of {} planned objects done", r.progress.indexed + r.progress.failed, r.progress.planned)
        });
        let msg = format!(
            "Job {}: {} of {} shards done{}",
            active.name,
            active.succeeded,
            active.completions,
            progress.unwrap_or_default()
        );
        observed.push(Observed::no(INDEXED, reason::INDEXING, msg));
        action = Action::requeue(Duration::from_secs(30));
    } else {
        status.current_job = None;
        let failed = latest_done.filter(|j| {
            matches!(j.state, JobState::Failed(_))
                && j.generation == generation
                && j.finished.as_ref().is_some_and(|t| age(t) < resync)
        });
        if let Some(j) = failed {
            let JobState::Failed(why) = &j.state else { unreachable!() };
            observed.push(Observed::no(
                INDEXED,
                reason::JOB_FAILED,
                format!("Job {} failed: {why}; retrying after {}", j.name, ii.spec.source.resync_interval),
            ));
            action = Action::requeue(
                resync.saturating_sub(j.finished.as_ref().map(age).unwrap_or_default()).max(Duration::from_secs(5)),
            );
        } else {
            // Diff the bucket against the catalog, unless a recent diff still holds.
            let memo = ctx.memo(&key);
            let last_job = latest_done.map(|j| j.name.clone());
            let fresh = memo
                .listed
                .as_ref()
                .is_some_and(|(at, g, job)| at.elapsed() < resync && *g == generation && *job == last_job);
            if !fresh {
                match within(ctx.settings.list_timeout, diff(ii, ctx, &catalog)).await {
                    Ok((discovered, pending)) => ctx.set_memo(&key, |m| {
                        m.listed = Some((Instant::now(), generation, last_job.clone()));
                        m.discovered = discovered;
                        m.pending = pending;
                    }),
                    Err(e) => {
                        observed.push(Observed::no(
                            INDEXED,
                            reason::SOURCE_UNAVAILABLE,
                            format!("listing {}: {e:#}", ii.spec.source.url),
                        ));
                        return Ok(Err(observed));
                    }
                }
            }
            let memo = ctx.memo(&key);
            let stale_spec = status.synced_generation != Some(generation);
            if stale_spec || memo.pending > 0 {
                let why = if stale_spec {
                    format!("spec generation {generation} not indexed yet")
                } else {
                    format!("{} objects new, changed or deleted", memo.pending)
                };
                let name = job_name(ii);
                let job = builders::embed_job(ii, &resolved, &name);
                jobs_api.patch(&name, &PatchParams::apply(MANAGER).force(), &Patch::Apply(&job)).await?;
                info!(job = %name, %why, "created embedding Job");
                publish(ctx, ii, EventType::Normal, "JobCreated", format!("Job {name}: {why}")).await;
                if !ctx.settings.indexed_jobs && ii.spec.embedding.parallelism > 1 {
                    publish(
                        ctx,
                        ii,
                        EventType::Warning,
                        "NoIndexedJobs",
                        "this cluster has no Indexed Jobs (Kubernetes 1.24+): one pod embeds every shard".into(),
                    )
                    .await;
                }
                status.current_job = Some(name.clone());
                observed.push(Observed::no(INDEXED, reason::INDEXING, format!("Job {name}: {why}")));
                action = Action::requeue(Duration::from_secs(30));
            } else {
                observed.push(Observed::yes(
                    INDEXED,
                    reason::UP_TO_DATE,
                    format!("{} objects in sync with {}", memo.discovered, ii.spec.source.url),
                ));
                action = Action::requeue(resync);
            }
        }
    }

    // 6. Counts: the bucket's from the last diff (kept while a Job runs: the informer's copy of our
    // own status can lag behind the write that set them), the catalog's fresh.
    let memo = ctx.memo(&key);
    if memo.listed.is_some() {
        status.images.discovered = memo.discovered;
        status.images.pending = memo.pending;
    }
    if let Ok(Ok(c)) = tokio::time::timeout(timeout, catalog.counts()).await {
        status.images.indexed = c.indexed;
        status.images.failed = c.failed;
    }
    Ok(Ok(Outcome { observed, action }))
}

/// Rules the schema cannot state (no CEL on 1.20).
pub fn validate(ii: &ImageIndex) -> Result<(), String> {
    let name = ii.name_any();
    let m = &ii.spec.milvus;
    if m.reference.is_some() == m.address.is_some() {
        return Err("spec.milvus: set exactly one of `ref` and `address`".into());
    }
    // `<name>-search` must be a DNS label (Service names: a letter first, at most 63 characters).
    if name.len() > 40 || !name.starts_with(|c: char| c.is_ascii_lowercase()) {
        return Err(format!(
            "metadata.name {name:?}: must start with a letter and be at most 40 characters (it names `<name>-search` and Jobs)"
        ));
    }
    if parse_interval(&ii.spec.source.resync_interval).is_none_or(|d| d < Duration::from_secs(10)) {
        return Err(format!(
            "spec.source.resyncInterval {:?}: use at least 10s, like `30s`, `10m` or `1h`",
            ii.spec.source.resync_interval
        ));
    }
    if ii.spec.source.include.is_empty() {
        return Err("spec.source.include: give at least one glob".into());
    }
    Ok(())
}

pub fn milvus_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk("milvus.io", "v1beta1", "Milvus"), "milvuses")
}

/// The Milvus address: the spec's, or the referenced Milvus CR's `status.endpoint` once it is MilvusReady.
async fn resolve_milvus(ii: &ImageIndex, ctx: &Context) -> Result<Result<String, Observed>, Error> {
    let m = &ii.spec.milvus;
    if let Some(addr) = &m.address {
        return Ok(Ok(if addr.contains("://") { addr.clone() } else { format!("http://{addr}") }));
    }
    let r = m.reference.as_ref().expect("validated: ref or address");
    let ns = r.namespace.clone().unwrap_or_else(|| ii.namespace().unwrap_or_default());
    let api: Api<DynamicObject> = Api::namespaced_with(ctx.client.clone(), &ns, &milvus_resource());
    let Some(milvus) = api.get_opt(&r.name).await? else {
        let msg = format!("Milvus {ns}/{} not found (milvus.io/v1beta1; is the milvus-operator installed?)", r.name);
        return Ok(Err(Observed::no(MILVUS_READY, reason::MILVUS_NOT_FOUND, msg)));
    };
    let st = &milvus.data["status"];
    let ready = st["conditions"]
        .as_array()
        .is_some_and(|cs| cs.iter().any(|c| c["type"] == "MilvusReady" && c["status"] == "True"));
    let endpoint = st["endpoint"].as_str().unwrap_or_default();
    if !ready || endpoint.is_empty() {
        let state = st["status"].as_str().unwrap_or("no status yet");
        let msg = format!("Milvus {ns}/{} is not MilvusReady ({state})", r.name);
        return Ok(Err(Observed::no(MILVUS_READY, reason::MILVUS_NOT_READY, msg)));
    }
    Ok(Ok(format!("http://{endpoint}")))
}

/// A Secret key's value, or why it cannot be read (as a condition reason and message).
async fn secret_key(
    ctx: &Context,
    ns: &str,
    r: &SecretKeyRef,
) -> Result<Result<String, (&'static str, String)>, Error> {
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), ns);
    let Some(secret) = api.get_opt(&r.name).await? else {
        return Ok(Err((reason::SECRET_NOT_FOUND, format!("Secret {ns}/{} not found", r.name))));
    };
    match secret.data.as_ref().and_then(|d| d.get(&r.key)).map(|v| String::from_utf8(v.0.clone())) {
        Some(Ok(v)) if !v.trim().is_empty() => Ok(Ok(v.trim().to_string())),
        _ => Ok(Err((
            reason::SECRET_KEY_MISSING,
            format!("Secret {ns}/{} has no key {:?} (or it is empty)", r.name, r.key),
        ))),
    }
}

/// Lists the bucket (with the source's credentials) and diffs it against the catalog.
async fn diff(ii: &ImageIndex, ctx: &Context, catalog: &Catalog) -> anyhow::Result<(u64, u64)> {
    let s = &ii.spec.source;
    let credentials = match &s.credentials_secret {
        Some(name) => {
            let ns = ii.namespace().unwrap_or_default();
            let secret = Api::<Secret>::namespaced(ctx.client.clone(), &ns).get(name).await?;
            let data = secret.data.unwrap_or_default();
            let get = |k: &str| data.get(k).and_then(|v| String::from_utf8(v.0.clone()).ok());
            let (Some(access_key_id), Some(secret_access_key)) =
                (get("AWS_ACCESS_KEY_ID"), get("AWS_SECRET_ACCESS_KEY"))
            else {
                anyhow::bail!("Secret {ns}/{name} needs AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY");
            };
            Some(S3Credentials { access_key_id, secret_access_key, region: get("AWS_REGION") })
        }
        None => None,
    };
    let source = Source::open(&SourceConfig {
        url: s.url.clone(),
        endpoint: s.endpoint.clone(),
        include: s.include.clone(),
        credentials,
    })?;
    let listing = source.list().await?;
    let p = plan(listing, catalog.entries(0, 1).await?, 0, 1);
    Ok((p.discovered as u64, (p.new.len() + p.changed.len() + p.deleted.len()) as u64))
}

async fn apply_search(ii: &ImageIndex, ctx: &Context, r: &Resolved) -> Result<Observed, Error> {
    let ns = ii.namespace().unwrap_or_default();
    let pp = PatchParams::apply(MANAGER).force();
    let name = builders::search_name(ii);
    if let Some(t) = &ii.spec.search.token_secret_ref
        && let Err((reason, msg)) = secret_key(ctx, &ns, t).await?
    {
        return Ok(Observed::no(SEARCH_READY, reason, msg));
    }
    let deployments: Api<Deployment> = Api::namespaced(ctx.client.clone(), &ns);
    let d = deployments.patch(&name, &pp, &Patch::Apply(builders::search_deployment(ii, r))).await?;
    Api::<Service>::namespaced(ctx.client.clone(), &ns)
        .patch(&name, &pp, &Patch::Apply(builders::search_service(ii)))
        .await?;
    let want = ii.spec.search.replicas;
    let available = d.status.as_ref().and_then(|s| s.available_replicas).unwrap_or(0);
    Ok(if want == 0 {
        Observed::no(SEARCH_READY, reason::SCALED_TO_ZERO, "spec.search.replicas is 0")
    } else if available > 0 {
        Observed::yes(
            SEARCH_READY,
            reason::AVAILABLE,
            format!("{available}/{want} replicas available at {}", builders::endpoint(ii)),
        )
    } else {
        Observed::no(SEARCH_READY, reason::UNAVAILABLE, format!("0/{want} replicas available"))
    })
}

async fn write_status(
    ii: &ImageIndex,
    ctx: &Context,
    mut status: ImageIndexStatus,
    observed: &[Observed],
) -> Result<(), Error> {
    let previous = status.phase;
    status.conditions = status::merge(&status.conditions, observed, ii.metadata.generation, &Time(Timestamp::now()));
    status.observed_generation = ii.metadata.generation;
    status.phase = Some(status::phase(&status.conditions, previous));
    if ii.status.as_ref() == Some(&status) {
        return Ok(());
    }
    if previous != status.phase {
        // The condition that explains the phase: the running Job, or the first one not holding.
        let indexing = status.phase == Some(crate::crd::Phase::Indexing);
        let msg = observed
            .iter()
            .find(|o| if indexing { o.reason == reason::INDEXING } else { o.ok != Some(true) })
            .map(|o| format!("{}: {}", o.reason, o.message));
        let type_ = if matches!(status.phase, Some(crate::crd::Phase::Degraded | crate::crd::Phase::Failed)) {
            EventType::Warning
        } else {
            EventType::Normal
        };
        publish(
            ctx,
            ii,
            type_,
            &format!("{:?}", status.phase.unwrap()),
            msg.unwrap_or_else(|| "all conditions hold".into()),
        )
        .await;
    }
    let api: Api<ImageIndex> = Api::namespaced(ctx.client.clone(), &ii.namespace().unwrap_or_default());
    let patch = json!({"apiVersion": "imageindex.dev/v1alpha1", "kind": "ImageIndex", "status": status});
    api.patch_status(&ii.name_any(), &PatchParams::apply(MANAGER).force(), &Patch::Apply(patch)).await?;
    Ok(())
}

/// Deletion: stop running Jobs, then apply the deletion policy. Owned objects go with the
/// ImageIndex (garbage collection by owner reference).
async fn cleanup(ii: &ImageIndex, ctx: &Context) -> Result<Action, Error> {
    let ns = ii.namespace().unwrap_or_default();
    let selector = format!("{}={},{}=embed", builders::INSTANCE, ii.name_any(), builders::COMPONENT);
    let jobs: Api<Job> = Api::namespaced(ctx.client.clone(), &ns);
    let dp = DeleteParams { propagation_policy: Some(PropagationPolicy::Background), ..Default::default() };
    jobs.delete_collection(&dp, &ListParams::default().labels(&selector)).await?;
    if ii.spec.deletion_policy == DeletionPolicy::Retain {
        publish(
            ctx,
            ii,
            EventType::Normal,
            "Retained",
            format!("collection {} and its catalog rows are kept", ii.collection()),
        )
        .await;
        return Ok(Action::await_change());
    }
    let collection = ii.collection();
    let timeout = ctx.settings.io_timeout;
    // A Milvus or Secret that is already gone has nothing left to clean up.
    match resolve_milvus(ii, ctx).await? {
        Ok(url) => {
            let token = match &ii.spec.milvus.credentials_secret_ref {
                Some(r) => secret_key(ctx, &ns, r).await?.ok(),
                None => None,
            };
            let cfg =
                MilvusConfig { url, token, collection: collection.clone(), index: ii.spec.milvus.index.kind.into() };
            within(timeout, async { VectorStore::connect(&cfg).await?.drop_collection().await })
                .await
                .map_err(|e| Error::Cleanup(format!("Milvus collection {collection}"), e))?;
        }
        Err(o) if o.reason == reason::MILVUS_NOT_FOUND => warn!(%collection, "Milvus is gone; nothing to drop there"),
        Err(o) => return Err(Error::Cleanup(format!("Milvus collection {collection}"), anyhow::anyhow!(o.message))),
    }
    match secret_key(ctx, &ns, &ii.spec.mysql.secret_ref).await? {
        Ok(url) => within(timeout, async { Catalog::connect(&url, &collection, "").await?.drop_collection().await })
            .await
            .map_err(|e| Error::Cleanup(format!("catalog rows of {collection}"), e))?,
        Err((_, msg)) => warn!(%collection, "{msg}; catalog rows not dropped"),
    }
    publish(ctx, ii, EventType::Normal, "Deleted", format!("dropped collection {collection} and its catalog rows"))
        .await;
    Ok(Action::await_change())
}

pub fn error_policy(ii: Arc<ImageIndex>, err: &Error, ctx: Arc<Context>) -> Action {
    warn!(name = %ii.name_any(), error = %err, "reconcile failed");
    ctx.backoff(&object_key(&ii))
}

/// Jobs as the decision needs them.
#[derive(Clone, Debug, PartialEq)]
pub struct JobView {
    pub name: String,
    pub generation: i64,
    pub created: Option<Timestamp>,
    pub finished: Option<Time>,
    pub completions: i32,
    pub succeeded: i32,
    pub state: JobState,
}

#[derive(Clone, Debug, PartialEq)]
pub enum JobState {
    Active,
    Succeeded,
    Failed(String),
}

impl JobView {
    pub fn of(j: &Job) -> Self {
        let status = j.status.clone().unwrap_or_default();
        let cond = |t: &str| status.conditions.iter().flatten().find(|c| c.type_ == t && c.status == "True").cloned();
        let state = match (cond("Complete"), cond("Failed")) {
            (Some(_), _) => JobState::Succeeded,
            (_, Some(c)) => JobState::Failed(c.message.or(c.reason).unwrap_or_else(|| "failed".into())),
            _ => JobState::Active,
        };
        let finished = status.completion_time.clone().or_else(|| cond("Failed").and_then(|c| c.last_transition_time));
        Self {
            name: j.name_any(),
            generation: j.annotations().get(GENERATION).and_then(|g| g.parse().ok()).unwrap_or_default(),
            created: j.metadata.creation_timestamp.as_ref().map(|t| t.0),
            finished,
            completions: j.spec.as_ref().and_then(|s| s.completions).unwrap_or(1),
            succeeded: status.succeeded.unwrap_or(0),
            state,
        }
    }
}

fn age(t: &Time) -> Duration {
    Duration::try_from(Timestamp::now().duration_since(t.0)).unwrap_or_default()
}

/// `<name>-embed-<unix seconds>`: unique per creation, sortable, within 63 characters.
fn job_name(ii: &ImageIndex) -> String {
    format!("{}-embed-{}", ii.name_any(), Timestamp::now().as_second())
}

fn object_key(ii: &ImageIndex) -> String {
    format!("{}/{}", ii.namespace().unwrap_or_default(), ii.name_any())
}

async fn publish(ctx: &Context, ii: &ImageIndex, type_: EventType, reason: &str, note: String) {
    let ev = Event { type_, reason: reason.into(), note: Some(note), action: "Reconcile".into(), secondary: None };
    if let Err(e) = ctx.recorder.publish(&ev, &ii.object_ref(&())).await {
        warn!(error = %e, "could not publish an event");
    }
}

async fn within<T>(limit: Duration, f: impl Future<Output = anyhow::Result<T>>) -> anyhow::Result<T> {
    tokio::time::timeout(limit, f).await.map_err(|_| anyhow::anyhow!("no answer in {limit:?}"))?
}
