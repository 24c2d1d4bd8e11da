//! Deletion: apply the deletion policy, then let the ImageIndex go. Owned objects go with it
//! (garbage collection by owner reference).
//!
//! The data is dropped (`Delete`) or let go of (`Retain`) by a cleanup Job in the ImageIndex's
//! namespace, with the credentials its pods get; the controller reads its report. `Delete` drops
//! the collection and its catalog rows, and only once nothing can write to them again: the Jobs
//! and the search Deployment are deleted in the foreground and waited for (a starting pod
//! recreates the collection it does not find). A cleanup that keeps failing raises a Warning and a
//! `Ready=False, CleanupFailed` condition on every try, and after `Settings::cleanup_timeout` the
//! data is kept and the ImageIndex goes (a namespace being torn down never waits for ever). What
//! cannot be shown to be this ImageIndex's is never dropped; where no Job can run (the namespace
//! is terminating, the credentials are gone), the data is kept and a Warning says so.
//!
//! `Retain` keeps everything and lets go of the collection's claim, so that an ImageIndex made
//! again under this name takes it up. The annotation `imageindex.dev/skip-cleanup: "true"` lets it
//! go at once, whatever the policy, keeping all.

use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, ListParams, ObjectMeta, Patch, PatchParams, Preconditions, PropagationPolicy};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;

use super::apply::publish;
use super::dereference;
use super::jobs::JobState;
use super::validate::Milvus;
use super::validate::{self, MilvusSource};
use super::{Context, MANAGER, update_status};
use crate::contract::report::Report;
use crate::controller::builders::{self, Resolved};
use crate::controller::status::{Observed, READY, reason};
use crate::crd::{DeletionPolicy, ImageIndex, SKIP_CLEANUP};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Dereference(#[from] dereference::Error),
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("writing status: {0}")]
    Status(#[from] update_status::Error),
    #[error("cleanup of {0} failed, will retry: {1}")]
    Failed(String, String),
    /// Not a failure: the Jobs or search pods are still going away. An error only because the
    /// finalizer is removed as soon as the cleanup returns Ok; `error_policy` looks again soon.
    #[error("{0}")]
    Waiting(String),
}

/// How often a deletion waiting for its Jobs and search pods looks again (their deletion also
/// wakes it, through the watches on owned objects).
pub const WAIT: Duration = Duration::from_secs(5);

pub async fn cleanup(image_index: &ImageIndex, ctx: &Context) -> Result<Action, Error> {
    let collection = image_index.collection();
    if skip_requested(image_index) {
        let note = format!("{SKIP_CLEANUP} is set: collection {collection} and its catalog rows are kept as they are");
        publish(ctx, image_index, EventType::Warning, "CleanupSkipped", note).await;
        return Ok(Action::await_change());
    }
    // Nothing is dropped while a Job or a search pod could still write to the collection; a
    // retained one needs only the Jobs stopped (they claim it when they start).
    let retain = image_index.spec.deletion_policy == DeletionPolicy::Retain;
    let outcome = match stop_workloads(image_index, ctx, retain).await {
        Ok(left) if left.is_empty() => run_cleanup(image_index, ctx).await,
        Ok(left) => Err(Error::Waiting(format!(
            "waiting for {} to be gone before the cleanup of collection {collection}",
            left.join(", ")
        ))),
        Err(e) => Err(e),
    };
    let failure = match outcome {
        Ok(action) => return Ok(action),
        Err(f) => f,
    };
    let age = deleting_for(image_index);
    if age > ctx.settings.cleanup_timeout {
        let note = format!(
            "gave up after {}s: collection {collection} and its catalog rows are kept; drop them by hand if they \
             should go ({failure})",
            age.as_secs()
        );
        publish(ctx, image_index, EventType::Warning, "CleanupAbandoned", note).await;
        delete_cleanup_job(image_index, ctx).await?;
        return Ok(Action::await_change());
    }
    let waiting = matches!(failure, Error::Waiting(_));
    let why = if waiting { reason::DELETING } else { reason::CLEANUP_FAILED };
    let status = image_index.status.clone().unwrap_or_default();
    update_status::write(image_index, ctx, status, &[Observed::no(READY, why, failure.to_string())]).await?;
    if !waiting {
        let left = ctx.settings.cleanup_timeout.saturating_sub(age).as_secs();
        let note = format!("{failure}; retrying for {left}s more, then the data is kept");
        publish(ctx, image_index, EventType::Warning, "CleanupFailed", note).await;
    }
    Err(failure)
}

fn skip_requested(image_index: &ImageIndex) -> bool {
    image_index.annotations().get(SKIP_CLEANUP).is_some_and(|v| v.trim().eq_ignore_ascii_case("true"))
}

/// How long ago the ImageIndex was deleted.
fn deleting_for(image_index: &ImageIndex) -> Duration {
    let since = image_index.metadata.deletion_timestamp.as_ref();
    since.map(|t| super::jobs::age(t, Timestamp::now())).unwrap_or_default()
}

/// Deletes the embedding and plan Jobs, and (unless retaining) the search Deployment, in the
/// foreground (each object stays until its pods are gone), and says which are still there. Only
/// this ImageIndex's: an object of the same name or labels that is not is left alone (nothing of
/// this ImageIndex runs in it).
async fn stop_workloads(image_index: &ImageIndex, ctx: &Context, retain: bool) -> Result<Vec<String>, Error> {
    let ns = image_index.namespace().unwrap_or_default();
    let jobs: Api<Job> = Api::namespaced(ctx.client.clone(), &ns);
    let mut left = vec![];
    for component in [builders::EMBED, builders::PLAN] {
        let selector = ListParams::default().labels(&builders::selector(image_index, component));
        for job in jobs.list(&selector).await?.items.iter().filter(|j| builders::is_ours(&j.metadata, image_index)) {
            delete_exactly(&jobs, &job.metadata, PropagationPolicy::Foreground).await?;
            left.push(format!("Job {}", job.name_any()));
        }
    }
    if retain {
        return Ok(left);
    }
    let deployments: Api<Deployment> = Api::namespaced(ctx.client.clone(), &ns);
    let search = builders::search_name(image_index);
    if let Some(d) =
        deployments.get_metadata_opt(&search).await?.filter(|d| builders::is_ours(&d.metadata, image_index))
    {
        delete_exactly(&deployments, &d.metadata, PropagationPolicy::Foreground).await?;
        left.push(format!("Deployment {search}"));
    }
    Ok(left)
}

/// Deletes the object `meta` describes and no other (the UID as a precondition: one made again
/// under its name meanwhile is not this one); gone already is fine.
async fn delete_exactly<K>(api: &Api<K>, meta: &ObjectMeta, policy: PropagationPolicy) -> Result<(), Error>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let exactly = DeleteParams {
        propagation_policy: Some(policy),
        preconditions: Some(Preconditions { uid: meta.uid.clone(), resource_version: None }),
        ..Default::default()
    };
    match api.delete(meta.name.as_deref().unwrap_or_default(), &exactly).await {
        Ok(_) => Ok(()),
        // 404: gone; 409: a precondition failed (another object of the name now).
        Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// The cleanup Job: started if there is none, waited for while it runs, and read when done.
async fn run_cleanup(image_index: &ImageIndex, ctx: &Context) -> Result<Action, Error> {
    let collection = image_index.collection();
    let tasks = dereference::tasks(image_index, &ctx.client, builders::CLEANUP).await?;
    let Some(task) = tasks.into_iter().max_by_key(|t| t.job.created) else {
        return start_cleanup(image_index, ctx).await;
    };
    let name = &task.job.name;
    let kept = |why: String| format!("collection {collection} and its catalog rows are kept: {why}");
    match (&task.job.state, task.report) {
        (JobState::Active, _) => match task.blocked {
            // The credentials were deleted first (a namespace teardown deletes in any order):
            // they will not come back, and nothing can be shown or dropped without them.
            Some(b) if b.reason == "CreateContainerConfigError" => {
                let note = kept(format!("the cleanup Job {name} cannot start ({b})"));
                publish(ctx, image_index, EventType::Warning, kept_reason(image_index), note).await;
                delete_cleanup_job(image_index, ctx).await?;
                Ok(Action::await_change())
            }
            Some(b) => Err(Error::Waiting(format!("cleanup Job {name} cannot start yet: {b}"))),
            None => Err(Error::Waiting(format!("cleanup Job {name} is running"))),
        },
        (JobState::Succeeded, Some(report)) => {
            let (type_, why, note) = match report {
                Report::Dropped => {
                    (EventType::Normal, "Deleted", format!("dropped collection {collection} and its catalog rows"))
                }
                Report::Released => {
                    (EventType::Normal, "Retained", format!("collection {collection} and its catalog rows are kept"))
                }
                Report::Kept { why } => (EventType::Warning, "NotDropped", kept(why)),
                other => (EventType::Warning, "NotDropped", kept(format!("unexpected report {other:?}"))),
            };
            publish(ctx, image_index, type_, why, note).await;
            delete_cleanup_job(image_index, ctx).await?;
            Ok(Action::await_change())
        }
        (_, report) => {
            // Failed (or succeeded without a word): the next try starts a new Job.
            let why = match (report, &task.job.state) {
                (Some(Report::Stopped { message, .. }), _) => message,
                (_, JobState::Failed(why)) => why.clone(),
                _ => "no report".into(),
            };
            delete_cleanup_job(image_index, ctx).await?;
            Err(Error::Failed(format!("collection {collection} (Job {name})"), why))
        }
    }
}

async fn start_cleanup(image_index: &ImageIndex, ctx: &Context) -> Result<Action, Error> {
    // The watch cache can lag this controller's own removal of the finalizer: a reconcile queued
    // before it still sees the ImageIndex deleting, and would start a second cleanup Job that
    // nothing ever deletes (found on the local cluster). Only the API's answer counts here.
    if !still_deleting(image_index, ctx).await? {
        return Ok(Action::await_change());
    }
    let collection = image_index.collection();
    // An invalid spec made no collection through a ref; its address, if any, is still tried.
    let source = validate::validate(image_index)
        .map(|spec| spec.milvus)
        .ok()
        .or_else(|| image_index.spec.milvus.address.as_deref().map(|a| MilvusSource::Address(validate::address(a))));
    let credentials = image_index.spec.milvus.credentials_secret_ref.is_some();
    let milvus = match source {
        Some(source) => dereference::milvus(&ctx.client, &source, credentials).await?,
        None => Milvus::NotFound("no Milvus in the spec".into()),
    };
    let (milvus_url, catalog_only) = match milvus {
        Milvus::Ready(url) => (url, false),
        // Gone with its Milvus: only the catalog rows are left to drop.
        Milvus::NotFound(_) => (String::new(), true),
        Milvus::NotReady(msg) => return Err(Error::Failed(format!("collection {collection}"), msg)),
    };
    let resolved = Resolved {
        milvus_url,
        collection,
        default_image: ctx.settings.default_image.clone(),
        features: ctx.settings.features,
    };
    let job = builders::cleanup_job(image_index, &resolved, catalog_only);
    let api: Api<Job> = Api::namespaced(ctx.client.clone(), &image_index.namespace().unwrap_or_default());
    let name = builders::cleanup_name(image_index);
    if api.get_metadata_opt(&name).await?.is_some_and(|j| !builders::is_ours(&j.metadata, image_index)) {
        return Err(Error::Failed(
            format!("collection {}", resolved.collection),
            format!(
                "Job {name} is in the way and is not this ImageIndex's cleanup (no {} label of its UID)",
                builders::OWNER_UID
            ),
        ));
    }
    match api
        .patch(&builders::cleanup_name(image_index), &PatchParams::apply(MANAGER).force(), &Patch::Apply(&job))
        .await
    {
        Ok(_) => Err(Error::Waiting(format!("started cleanup Job {}", builders::cleanup_name(image_index)))),
        // A namespace being deleted takes no new Job: nothing can reach the data from here.
        Err(kube::Error::Api(s)) if s.code == 403 && s.message.contains("being terminated") => {
            let note = format!(
                "collection {} and its catalog rows are kept: the namespace is being deleted, so no cleanup Job can \
                 run (delete the ImageIndex before its namespace to drop them)",
                resolved.collection
            );
            publish(ctx, image_index, EventType::Warning, kept_reason(image_index), note).await;
            Ok(Action::await_change())
        }
        Err(e) => Err(e.into()),
    }
}

/// The event when no cleanup Job could run: `Retain` kept everything anyway (only the claim
/// stays); for `Delete` it is a drop that did not happen.
fn kept_reason(image_index: &ImageIndex) -> &'static str {
    if image_index.spec.deletion_policy == DeletionPolicy::Retain { "Retained" } else { "NotDropped" }
}

/// The cleanup Job is not owned (see `builders::cleanup_job`): it goes once read. One of its
/// name that is not this ImageIndex's stays.
async fn delete_cleanup_job(image_index: &ImageIndex, ctx: &Context) -> Result<(), Error> {
    let api: Api<Job> = Api::namespaced(ctx.client.clone(), &image_index.namespace().unwrap_or_default());
    match api.get_metadata_opt(&builders::cleanup_name(image_index)).await? {
        Some(j) if builders::is_ours(&j.metadata, image_index) => {
            delete_exactly(&api, &j.metadata, PropagationPolicy::Background).await
        }
        _ => Ok(()),
    }
}

/// Whether the API still has this ImageIndex (the same UID), waiting on our finalizer.
async fn still_deleting(image_index: &ImageIndex, ctx: &Context) -> Result<bool, Error> {
    let api: Api<ImageIndex> = Api::namespaced(ctx.client.clone(), &image_index.namespace().unwrap_or_default());
    Ok(api
        .get_opt(&image_index.name_any())
        .await?
        .is_some_and(|now| now.uid() == image_index.uid() && now.finalizers().iter().any(|f| f == super::FINALIZER)))
}
