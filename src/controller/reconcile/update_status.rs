//! Status: the conditions merged (pure, `controller::status`), the phase derived, an event when
//! the phase changes, and one server-side apply of the status when anything changed.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::events::EventType;
use serde_json::json;

use super::apply::publish;
use super::{Context, MANAGER};
use crate::controller::status::{self, Observed, reason};
use crate::crd::{ImageIndex, ImageIndexStatus, Phase};

#[derive(Debug, thiserror::Error)]
#[error("Kubernetes API: {0}")]
pub struct Error(#[from] kube::Error);

/// The condition that explains a phase: the running Job, or the first one not holding.
fn explanation(phase: Option<Phase>, observed: &[Observed]) -> String {
    let indexing = phase == Some(Phase::Indexing);
    observed
        .iter()
        .find(|o| if indexing { o.reason == reason::INDEXING } else { o.ok != Some(true) })
        .map(|o| format!("{}: {}", o.reason, o.message))
        .unwrap_or_else(|| "all conditions hold".into())
}

pub async fn write(
    image_index: &ImageIndex,
    ctx: &Context,
    mut st: ImageIndexStatus,
    observed: &[Observed],
) -> Result<(), Error> {
    let previous = st.phase;
    st.conditions = status::merge(&st.conditions, observed, image_index.metadata.generation, &Time(Timestamp::now()));
    st.observed_generation = image_index.metadata.generation;
    let phase = status::phase(&st.conditions, previous);
    st.phase = Some(phase);
    ctx.metrics.index_status(&image_index.namespace().unwrap_or_default(), &image_index.name_any(), &st);
    if image_index.status.as_ref() == Some(&st) {
        return Ok(());
    }
    if previous != st.phase {
        let type_ =
            if matches!(phase, Phase::Degraded | Phase::Failed) { EventType::Warning } else { EventType::Normal };
        publish(ctx, image_index, type_, &format!("{phase:?}"), explanation(st.phase, observed)).await;
    }
    let api: Api<ImageIndex> = Api::namespaced(ctx.client.clone(), &image_index.namespace().unwrap_or_default());
    let patch = json!({"apiVersion": "imageindex.dev/v1alpha1", "kind": "ImageIndex", "status": st});
    api.patch_status(&image_index.name_any(), &PatchParams::apply(MANAGER).force(), &Patch::Apply(patch)).await?;
    Ok(())
}
