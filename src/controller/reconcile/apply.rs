//! Apply: the owned objects, built by the pure `builders` and sent with server-side apply, and the
//! events that tell users what happened.

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PropagationPolicy};
use kube::runtime::events::{Event, EventType};
use kube::{Resource, ResourceExt};
use tracing::{info, warn};

use super::{Context, MANAGER};
use crate::controller::builders::{self, PlanFor, Resolved};
use crate::controller::status::{Observed, SEARCH_READY, reason};
use crate::crd::ImageIndex;

#[derive(Debug, thiserror::Error)]
#[error("Kubernetes API: {0}")]
pub struct Error(#[from] kube::Error);

/// The search Deployment and Service, and whether search answers. None of them is applied while
/// an object of their name is there that is not this ImageIndex's (a force-apply would take it
/// over, and a deletion delete it): the condition names it.
pub async fn search(image_index: &ImageIndex, ctx: &Context, resolved: &Resolved) -> Result<Observed, Error> {
    let ns = image_index.namespace().unwrap_or_default();
    let pp = PatchParams::apply(MANAGER).force();
    let name = builders::search_name(image_index);
    let in_the_way = not_ours(image_index, ctx, &name).await?;
    if !in_the_way.is_empty() {
        let msg = format!(
            "{} {} not this ImageIndex's (no owner reference to it): search is not deployed until {} renamed, \
             deleted, or this ImageIndex is",
            in_the_way.join(" and "),
            if in_the_way.len() == 1 { "is" } else { "are" },
            if in_the_way.len() == 1 { "it is" } else { "they are" },
        );
        publish(ctx, image_index, EventType::Warning, reason::NOT_OWNED, msg.clone()).await;
        return Ok(Observed::no(SEARCH_READY, reason::NOT_OWNED, msg));
    }
    let deployments: Api<Deployment> = Api::namespaced(ctx.client.clone(), &ns);
    let d = deployments.patch(&name, &pp, &Patch::Apply(builders::search_deployment(image_index, resolved))).await?;
    Api::<Service>::namespaced(ctx.client.clone(), &ns)
        .patch(&name, &pp, &Patch::Apply(builders::search_service(image_index)))
        .await?;
    // policy/v1 is 1.21+; older servers get none.
    if ctx.settings.features.pdb {
        Api::<PodDisruptionBudget>::namespaced(ctx.client.clone(), &ns)
            .patch(&name, &pp, &Patch::Apply(builders::search_pdb(image_index)))
            .await?;
    }
    // The count the Deployment has: the spec's, or an autoscaler's (`search.autoscaled`).
    let want = d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(image_index.spec.search.replicas);
    let available = d.status.as_ref().and_then(|s| s.available_replicas).unwrap_or(0);
    Ok(if want == 0 {
        Observed::no(SEARCH_READY, reason::SCALED_TO_ZERO, "the search Deployment is scaled to 0 replicas")
    } else if available > 0 {
        Observed::yes(
            SEARCH_READY,
            reason::AVAILABLE,
            format!("{available}/{want} replicas available at {}", builders::endpoint(image_index)),
        )
    } else {
        Observed::no(SEARCH_READY, reason::UNAVAILABLE, format!("0/{want} replicas available"))
    })
}

/// The search objects of `name` that are there and not this ImageIndex's, as "Kind name".
async fn not_ours(image_index: &ImageIndex, ctx: &Context, name: &str) -> Result<Vec<String>, Error> {
    let ns = image_index.namespace().unwrap_or_default();
    let client = &ctx.client;
    let mut found = vec![
        (
            "Deployment",
            Api::<Deployment>::namespaced(client.clone(), &ns).get_metadata_opt(name).await?.map(|o| o.metadata),
        ),
        ("Service", Api::<Service>::namespaced(client.clone(), &ns).get_metadata_opt(name).await?.map(|o| o.metadata)),
    ];
    if ctx.settings.features.pdb {
        let pdbs = Api::<PodDisruptionBudget>::namespaced(client.clone(), &ns);
        found.push(("PodDisruptionBudget", pdbs.get_metadata_opt(name).await?.map(|o| o.metadata)));
    }
    Ok(found
        .into_iter()
        .filter(|(_, meta)| meta.as_ref().is_some_and(|m| !builders::is_ours(m, image_index)))
        .map(|(kind, _)| format!("{kind} {name}"))
        .collect())
}

/// Creates an embedding Job (`<name>-embed-<unix seconds>`); returns its name.
pub async fn job(
    image_index: &ImageIndex,
    ctx: &Context,
    resolved: &Resolved,
    why: &str,
    plan: Option<i64>,
) -> Result<String, Error> {
    let name = format!("{}-embed-{}", image_index.name_any(), Timestamp::now().as_second());
    let job = builders::embed_job(image_index, resolved, &name, plan);
    let api: Api<Job> = Api::namespaced(ctx.client.clone(), &image_index.namespace().unwrap_or_default());
    api.patch(&name, &PatchParams::apply(MANAGER).force(), &Patch::Apply(&job)).await?;
    info!(job = %name, %why, "created embedding Job");
    publish(ctx, image_index, EventType::Normal, "JobCreated", format!("Job {name}: {why}")).await;
    if !ctx.settings.features.indexed && image_index.spec.embedding.parallelism > 1 {
        let note = "this cluster has no Indexed Jobs (Kubernetes 1.24+): one pod embeds every shard";
        publish(ctx, image_index, EventType::Warning, "NoIndexedJobs", note.into()).await;
    }
    Ok(name)
}

/// How many plan Jobs are kept: the newest is the one that counts, the others show the history
/// (and the run of failures the backoff counts).
const PLANS_KEPT: usize = 5;

/// Creates a plan Job (`<name>-plan-<unix seconds>`) and deletes the oldest finished ones beyond
/// `PLANS_KEPT` (a server without `ttlSecondsAfterFinished` keeps them for ever); returns its name.
pub async fn plan(
    image_index: &ImageIndex,
    ctx: &Context,
    resolved: &Resolved,
    plan: &PlanFor,
) -> Result<String, Error> {
    let name = format!("{}-plan-{}", image_index.name_any(), Timestamp::now().as_second());
    let api: Api<Job> = Api::namespaced(ctx.client.clone(), &image_index.namespace().unwrap_or_default());
    let job = builders::plan_job(image_index, resolved, &name, plan);
    api.patch(&name, &PatchParams::apply(MANAGER).force(), &Patch::Apply(&job)).await?;
    info!(job = %name, "created plan Job");
    let mut old =
        api.list(&ListParams::default().labels(&builders::selector(image_index, builders::PLAN))).await?.items;
    old.retain(|j| {
        j.status.as_ref().is_some_and(|s| s.active.unwrap_or(0) == 0)
            && j.name_any() != name
            && builders::is_ours(&j.metadata, image_index)
    });
    old.sort_by_key(|j| std::cmp::Reverse(j.metadata.creation_timestamp.clone()));
    let background = DeleteParams { propagation_policy: Some(PropagationPolicy::Background), ..Default::default() };
    for j in old.iter().skip(PLANS_KEPT - 1) {
        match api.delete(&j.name_any(), &background).await {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(name)
}

/// An event on the ImageIndex; failing to publish one is logged, never fatal.
pub async fn publish(ctx: &Context, image_index: &ImageIndex, type_: EventType, reason: &str, note: String) {
    let ev = Event { type_, reason: reason.into(), note: Some(note), action: "Reconcile".into(), secondary: None };
    if let Err(e) = ctx.recorder.publish(&ev, &image_index.object_ref(&())).await {
        warn!(error = %e, "could not publish an event");
    }
}
