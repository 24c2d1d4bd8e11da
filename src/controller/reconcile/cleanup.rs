//! Deletion: stop running Jobs, then apply the deletion policy. Owned objects go with the
//! ImageIndex (garbage collection by owner reference).

use k8s_openapi::api::batch::v1::Job;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, ListParams, PropagationPolicy};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use tracing::warn;

use super::Context;
use super::apply::publish;
use super::backends::{self, milvus_config, within};
use super::dereference::{self, Milvus};
use super::validate::{self, MilvusSource};
use crate::controller::builders;
use crate::crd::{DeletionPolicy, ImageIndex};
use crate::store::{Catalog, VectorStore};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Dereference(#[from] dereference::Error),
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("cleanup of {0} failed, will retry: {1}")]
    Backend(String, backends::Error),
}

pub async fn cleanup(image_index: &ImageIndex, ctx: &Context) -> Result<Action, Error> {
    let ns = image_index.namespace().unwrap_or_default();
    let jobs: Api<Job> = Api::namespaced(ctx.client.clone(), &ns);
    let dp = DeleteParams { propagation_policy: Some(PropagationPolicy::Background), ..Default::default() };
    jobs.delete_collection(&dp, &ListParams::default().labels(&builders::embed_selector(image_index))).await?;
    let collection = image_index.collection();
    let owner = image_index.owner();
    let timeout = ctx.settings.io_timeout;
    let failed = |what: &str, e| Error::Backend(format!("{what} {collection}"), e);
    if image_index.spec.deletion_policy == DeletionPolicy::Retain {
        // Kept, and let go where this one holds it: an ImageIndex made again under this name (a
        // new UID) takes it up. Best effort: keeping never waits on a backend.
        let released = match dereference::secret_key(&ctx.client, &ns, &image_index.spec.mysql.secret_ref).await? {
            Ok(url) => {
                within(timeout, async { Catalog::connect(url.expose(), &collection, "").await?.release(&owner).await })
                    .await
                    .map_err(|e| e.to_string())
            }
            Err(missing) => Err(missing.message),
        };
        let mut note = format!("collection {collection} and its catalog rows are kept");
        if let Err(e) = released {
            warn!(%collection, "not released: {e}");
            note.push_str(&format!(" (still claimed by {owner}: {e})"));
        }
        publish(ctx, image_index, EventType::Normal, "Retained", note).await;
        return Ok(Action::await_change());
    }
    // The catalog says whose the collection is: nothing is dropped that another index holds, or
    // that cannot be shown to be this one's.
    let catalog = match dereference::secret_key(&ctx.client, &ns, &image_index.spec.mysql.secret_ref).await? {
        Ok(url) => Some(
            within(timeout, Catalog::connect(url.expose(), &collection, ""))
                .await
                .map_err(|e| failed("catalog of", e))?,
        ),
        Err(missing) => {
            warn!(%collection, "{}; cannot tell who owns the collection", missing.message);
            None
        }
    };
    let held = match &catalog {
        Some(c) => within(timeout, c.owner()).await.map_err(|e| failed("owner of", e))?,
        None => None,
    };
    let Some(catalog) = catalog.filter(|_| held.as_deref() == Some(owner.as_str())) else {
        let whose = match held {
            Some(other) => format!("it belongs to {other}"),
            None => "it cannot be shown to be this ImageIndex's (no owner recorded, or the catalog Secret is gone)"
                .to_string(),
        };
        let note = format!("collection {collection} and its catalog rows are kept: {whose}");
        publish(ctx, image_index, EventType::Warning, "NotDropped", note).await;
        return Ok(Action::await_change());
    };
    // An invalid spec made no collection through a ref; its address, if any, is still tried.
    let source = validate::validate(image_index)
        .map(|spec| spec.milvus)
        .ok()
        .or_else(|| image_index.spec.milvus.address.as_deref().map(|a| MilvusSource::Address(validate::address(a))));
    // A Milvus or Secret that is already gone has nothing left to clean up.
    let milvus = match source {
        Some(source) => dereference::milvus(&ctx.client, &source).await?,
        None => Milvus::NotFound("no Milvus in the spec".into()),
    };
    match milvus {
        Milvus::Ready(url) => {
            let token = match &image_index.spec.milvus.credentials_secret_ref {
                Some(r) => dereference::secret_key(&ctx.client, &ns, r).await?.ok(),
                None => None,
            };
            let cfg = milvus_config(image_index, url, token);
            within(timeout, async { VectorStore::connect(&cfg).await?.drop_collection().await })
                .await
                .map_err(|e| failed("Milvus collection", e))?;
        }
        Milvus::NotFound(_) => warn!(%collection, "Milvus is gone; nothing to drop there"),
        Milvus::NotReady(msg) => {
            return Err(failed("Milvus collection", backends::Error::Unavailable(msg)));
        }
    }
    within(timeout, catalog.drop_collection()).await.map_err(|e| failed("catalog rows of", e))?;
    let note = format!("dropped collection {collection} and its catalog rows");
    publish(ctx, image_index, EventType::Normal, "Deleted", note).await;
    Ok(Action::await_change())
}
