//! Apply: the owned objects, built by the pure `builders` and sent with server-side apply, and the
//! events that tell users what happened.

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::events::{Event, EventType};
use kube::{Resource, ResourceExt};
use tracing::{info, warn};

use super::dereference::Missing;
use super::{Context, MANAGER};
use crate::controller::builders::{self, Resolved};
use crate::controller::status::{Observed, SEARCH_READY, reason};
use crate::crd::ImageIndex;

#[derive(Debug, thiserror::Error)]
#[error("Kubernetes API: {0}")]
pub struct Error(#[from] kube::Error);

/// The search Deployment and Service, and whether search answers. A missing token Secret holds
/// them back (the pods could not start).
pub async fn search(
    ii: &ImageIndex,
    ctx: &Context,
    r: &Resolved,
    token: &Result<(), Missing>,
) -> Result<Observed, Error> {
    if let Err(missing) = token {
        return Ok(Observed::no(SEARCH_READY, missing.reason, &missing.message));
    }
    let ns = ii.namespace().unwrap_or_default();
    let pp = PatchParams::apply(MANAGER).force();
    let name = builders::search_name(ii);
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

/// Creates an embedding Job (`<name>-embed-<unix seconds>`); returns its name.
pub async fn job(ii: &ImageIndex, ctx: &Context, r: &Resolved, why: &str) -> Result<String, Error> {
    let name = format!("{}-embed-{}", ii.name_any(), Timestamp::now().as_second());
    let job = builders::embed_job(ii, r, &name);
    let api: Api<Job> = Api::namespaced(ctx.client.clone(), &ii.namespace().unwrap_or_default());
    api.patch(&name, &PatchParams::apply(MANAGER).force(), &Patch::Apply(&job)).await?;
    info!(job = %name, %why, "created embedding Job");
    publish(ctx, ii, EventType::Normal, "JobCreated", format!("Job {name}: {why}")).await;
    if !ctx.settings.indexed_jobs && ii.spec.embedding.parallelism > 1 {
        let note = "this cluster has no Indexed Jobs (Kubernetes 1.24+): one pod embeds every shard";
        publish(ctx, ii, EventType::Warning, "NoIndexedJobs", note.into()).await;
    }
    Ok(name)
}

/// An event on the ImageIndex; failing to publish one is logged, never fatal.
pub async fn publish(ctx: &Context, ii: &ImageIndex, type_: EventType, reason: &str, note: String) {
    let ev = Event { type_, reason: reason.into(), note: Some(note), action: "Reconcile".into(), secondary: None };
    if let Err(e) = ctx.recorder.publish(&ev, &ii.object_ref(&())).await {
        warn!(error = %e, "could not publish an event");
    }
}
