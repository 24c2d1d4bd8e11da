//! Deletion: apply the deletion policy, then let the ImageIndex go. Owned objects go with it
//! (garbage collection by owner reference).
//!
//! `Delete` drops the collection and its catalog rows, and only once nothing can write to them
//! again: the Jobs and the search Deployment are deleted in the foreground and waited for (a
//! starting pod recreates the collection it does not find). A drop that keeps failing raises a
//! Warning and a `Ready=False, CleanupFailed` condition on every try, and after
//! `Settings::cleanup_timeout` the data is kept and the ImageIndex goes (a namespace being torn
//! down never waits for ever). What cannot be shown to be this ImageIndex's is never dropped.
//!
//! `Retain` keeps everything and only lets go of the collection's claim (best effort, never
//! waits), so that an ImageIndex made again under this name takes it up. The annotation
//! `imageindex.dev/skip-cleanup: "true"` lets it go at once, whatever the policy, keeping all.

use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, ListParams, PropagationPolicy};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use tracing::warn;

use super::apply::publish;
use super::backends::{self, milvus_config, within};
use super::dereference::{self, Milvus};
use super::validate::{self, MilvusSource};
use super::{Context, update_status};
use crate::controller::builders;
use crate::controller::status::{Observed, READY, reason};
use crate::crd::{DeletionPolicy, ImageIndex, SKIP_CLEANUP};
use crate::store::{Catalog, VectorStore};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Dereference(#[from] dereference::Error),
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("writing status: {0}")]
    Status(#[from] update_status::Error),
    #[error("cleanup of {0} failed, will retry: {1}")]
    Backend(String, backends::Error),
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
    if image_index.spec.deletion_policy == DeletionPolicy::Retain {
        stop_jobs(image_index, ctx, PropagationPolicy::Background).await?;
        return retain(image_index, ctx).await;
    }
    // Nothing is dropped while a Job or a search pod could still write to the collection.
    let outcome = match stop_workloads(image_index, ctx).await {
        Ok(left) if left.is_empty() => drop_owned(image_index, ctx).await,
        Ok(left) => Err(Error::Waiting(format!(
            "waiting for {} to be gone before dropping collection {collection}",
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

async fn stop_jobs(image_index: &ImageIndex, ctx: &Context, propagation: PropagationPolicy) -> Result<(), Error> {
    let jobs: Api<Job> = Api::namespaced(ctx.client.clone(), &image_index.namespace().unwrap_or_default());
    let dp = DeleteParams { propagation_policy: Some(propagation), ..Default::default() };
    jobs.delete_collection(&dp, &ListParams::default().labels(&builders::embed_selector(image_index))).await?;
    Ok(())
}

/// Deletes the Jobs and the search Deployment in the foreground (each object stays until its
/// pods are gone) and says which are still there.
async fn stop_workloads(image_index: &ImageIndex, ctx: &Context) -> Result<Vec<String>, Error> {
    stop_jobs(image_index, ctx, PropagationPolicy::Foreground).await?;
    let ns = image_index.namespace().unwrap_or_default();
    let deployments: Api<Deployment> = Api::namespaced(ctx.client.clone(), &ns);
    let search = builders::search_name(image_index);
    let dp = DeleteParams { propagation_policy: Some(PropagationPolicy::Foreground), ..Default::default() };
    match deployments.delete(&search, &dp).await {
        Ok(_) => {}
        Err(kube::Error::Api(s)) if s.code == 404 => {}
        Err(e) => return Err(e.into()),
    }
    let mut left: Vec<String> =
        dereference::jobs(image_index, &ctx.client).await?.into_iter().map(|j| format!("Job {}", j.name)).collect();
    if deployments.get_opt(&search).await?.is_some() {
        left.push(format!("Deployment {search}"));
    }
    Ok(left)
}

/// Kept, and let go where this one holds it: an ImageIndex made again under this name (a new
/// UID) takes it up. Best effort: keeping never waits on a backend.
async fn retain(image_index: &ImageIndex, ctx: &Context) -> Result<Action, Error> {
    let ns = image_index.namespace().unwrap_or_default();
    let (collection, owner) = (image_index.collection(), image_index.owner());
    let released = match dereference::secret_key(&ctx.client, &ns, &image_index.spec.mysql.secret_ref).await? {
        Ok(url) => within(ctx.settings.io_timeout, async {
            Catalog::connect(url.expose(), &collection, "").await?.release(&owner).await
        })
        .await
        .map_err(|e| e.to_string()),
        Err(missing) => Err(missing.message),
    };
    let mut note = format!("collection {collection} and its catalog rows are kept");
    if let Err(e) = released {
        warn!(%collection, "not released: {e}");
        note.push_str(&format!(" (still claimed by {owner}: {e})"));
    }
    publish(ctx, image_index, EventType::Normal, "Retained", note).await;
    Ok(Action::await_change())
}

/// Drops the collection and its catalog rows if the catalog shows they are this ImageIndex's
/// and the credentials to do it are still there; otherwise keeps them and says why.
async fn drop_owned(image_index: &ImageIndex, ctx: &Context) -> Result<Action, Error> {
    let ns = image_index.namespace().unwrap_or_default();
    let (collection, owner) = (image_index.collection(), image_index.owner());
    let timeout = ctx.settings.io_timeout;
    let failed = |what: &str, e| Error::Backend(format!("{what} {collection}"), e);
    let collection_ref = &collection;
    let keep = |why: String| async move {
        let note = format!("collection {collection_ref} and its catalog rows are kept: {why}");
        publish(ctx, image_index, EventType::Warning, "NotDropped", note).await;
        Ok(Action::await_change())
    };
    // The catalog says whose the collection is: nothing is dropped that another index holds, or
    // that cannot be shown to be this one's.
    let url = match dereference::secret_key(&ctx.client, &ns, &image_index.spec.mysql.secret_ref)
        .await
        .map_err(Error::from)?
    {
        Ok(url) => url,
        Err(missing) => {
            return keep(format!("it cannot be shown to be this ImageIndex's ({})", missing.message)).await;
        }
    };
    let catalog =
        within(timeout, Catalog::connect(url.expose(), &collection, "")).await.map_err(|e| failed("catalog of", e))?;
    match within(timeout, catalog.owner()).await.map_err(|e| failed("owner of", e))? {
        Some(held) if held == owner => {}
        Some(other) => return keep(format!("it belongs to {other}")).await,
        None => return keep("it cannot be shown to be this ImageIndex's (no owner recorded)".into()).await,
    }
    // An invalid spec made no collection through a ref; its address, if any, is still tried.
    let source = validate::validate(image_index)
        .map(|spec| spec.milvus)
        .ok()
        .or_else(|| image_index.spec.milvus.address.as_deref().map(|a| MilvusSource::Address(validate::address(a))));
    let credentials = &image_index.spec.milvus.credentials_secret_ref;
    let milvus = match source {
        Some(source) => dereference::milvus(&ctx.client, &source, credentials.is_some()).await?,
        None => Milvus::NotFound("no Milvus in the spec".into()),
    };
    match milvus {
        Milvus::Ready(url) => {
            // Credentials named but gone (a namespace teardown deletes Secrets in any order):
            // they will not come back, and Milvus would refuse the drop. Kept.
            let token = match credentials {
                Some(r) => match dereference::secret_key(&ctx.client, &ns, r).await? {
                    Ok(token) => Some(token),
                    Err(missing) => {
                        return keep(format!("the Milvus credentials are gone ({})", missing.message)).await;
                    }
                },
                None => None,
            };
            let cfg = milvus_config(image_index, url, token);
            within(timeout, async { VectorStore::connect(&cfg).await?.drop_collection().await })
                .await
                .map_err(|e| failed("Milvus collection", e))?;
        }
        Milvus::NotFound(_) => warn!(%collection, "Milvus is gone; nothing to drop there"),
        Milvus::NotReady(msg) => return Err(failed("Milvus collection", backends::Error::Unavailable(msg))),
    }
    within(timeout, catalog.drop_collection()).await.map_err(|e| failed("catalog rows of", e))?;
    let note = format!("dropped collection {collection} and its catalog rows");
    publish(ctx, image_index, EventType::Normal, "Deleted", note).await;
    Ok(Action::await_change())
}
