//! The objects an ImageIndex owns, built as pure functions of the resource and what the
//! reconciler resolved (no client here; `apply` sends them with server-side apply). Here: the
//! labels, selectors and annotations the other modules find them by, and the embedding settings'
//! hash; `pod` the pod they share, `job` the Jobs, `search` the search Deployment, PDB and Service.

mod job;
mod pod;
mod search;
#[cfg(test)]
mod tests;

pub use job::{PlanFor, cleanup_job, cleanup_name, embed_job, plan_job};
pub use search::{search_deployment, search_pdb, search_service};

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Resource;
use sha2::Digest;

use crate::crd::ImageIndex;

/// Set on everything the operator creates; `INSTANCE` names the ImageIndex.
pub const INSTANCE: &str = "app.kubernetes.io/instance";
pub const COMPONENT: &str = "app.kubernetes.io/component";
/// The UID of the ImageIndex a cleanup Job is for: that Job has no owner reference (see
/// `cleanup_job`), and this label is what says it is this ImageIndex's.
pub const OWNER_UID: &str = "imageindex.dev/owner-uid";
/// The spec generation a Job was created for.
pub const SPEC_GENERATION: &str = "imageindex.dev/generation";
/// The `embedding_hash` a Job was created for.
pub const EMBEDDING: &str = "imageindex.dev/embedding";
/// On a plan Job: the last finished embedding Job when it was made (its diff is of the catalog
/// after that one), and the resync request (`crd::RESYNC`) it answers.
pub const AFTER_JOB: &str = "imageindex.dev/after-job";
pub const RESYNC_FOR: &str = "imageindex.dev/resync-request";
/// The components: what each of an ImageIndex's Jobs and pods is for.
pub const EMBED: &str = "embed";
pub const PLAN: &str = "plan";
pub const CLEANUP: &str = "cleanup";

/// What the reconciler resolved and the cluster can do: inputs besides the ImageIndex itself.
#[derive(Clone, Debug)]
pub struct Resolved {
    /// `http://host:19530`
    pub milvus_url: String,
    pub collection: String,
    /// The image for Jobs and search pods when the spec does not name one.
    pub default_image: String,
    /// What the server can do (Job features, PodDisruptionBudgets), by its version.
    pub features: ServerFeatures,
}

/// What the server can do, by Kubernetes version.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServerFeatures {
    /// Indexed completion mode (1.24). Without it, one pod embeds every shard.
    pub indexed: bool,
    /// `podFailurePolicy` and the `DisruptionTarget` pod condition (1.26).
    pub pod_failure_policy: bool,
    /// `backoffLimitPerIndex` (1.29): a shard that keeps failing does not use up the others' retries.
    pub backoff_limit_per_index: bool,
    /// `policy/v1` PodDisruptionBudgets (1.21).
    pub pdb: bool,
}

impl ServerFeatures {
    pub const ALL: Self = Self { indexed: true, pod_failure_policy: true, backoff_limit_per_index: true, pdb: true };

    /// From the apiserver's `/version` (`minor` may read `"29+"`).
    pub fn of(major: &str, minor: &str) -> Self {
        let minor: u32 = minor.trim_end_matches('+').parse().unwrap_or(0);
        let at_least = |m: u32| major == "1" && minor >= m;
        Self {
            indexed: at_least(24),
            pod_failure_policy: at_least(26),
            backoff_limit_per_index: at_least(29),
            pdb: at_least(21),
        }
    }
}

/// A hash of what decides the vectors a Job writes: which objects, where they go, the model and
/// how it runs. An edit to anything else (search replicas, Job resources, parallelism) starts no
/// Job: it would find nothing to do, after bringing up nodes (GPUs) to find it.
pub fn embedding_hash(image_index: &ImageIndex, resolved: &Resolved) -> String {
    let (s, e) = (&image_index.spec.source, &image_index.spec.embedding);
    let fields = serde_json::json!([
        s.url,
        s.endpoint,
        s.include,
        resolved.milvus_url,
        resolved.collection,
        image_index.spec.milvus.index.kind.as_str(),
        e.model_uri,
        e.batch_size,
        e.precision.to_string(),
        e.preprocess,
        e.image,
    ]);
    // 64 bits of SHA-256, as hex: short enough for an annotation and a log line.
    let digest = sha2::Sha256::digest(fields.to_string().as_bytes());
    digest[..8].iter().map(|b| format!("{b:02x}")).collect()
}

/// Selects the ImageIndex's Jobs (and their pods) of one component.
pub fn selector(image_index: &ImageIndex, component: &str) -> String {
    format!("{INSTANCE}={},{COMPONENT}={component}", image_index.metadata.name.as_deref().unwrap_or_default())
}

/// Selects the ImageIndex's embedding Jobs.
pub fn embed_selector(image_index: &ImageIndex) -> String {
    selector(image_index, EMBED)
}

pub fn search_name(image_index: &ImageIndex) -> String {
    format!("{}-search", image_index.metadata.name.as_deref().unwrap_or_default())
}

/// `http://<name>-search.<namespace>.svc:<port>`
pub fn endpoint(image_index: &ImageIndex) -> String {
    let ns = image_index.metadata.namespace.as_deref().unwrap_or("default");
    format!("http://{}.{ns}.svc:{}", search_name(image_index), image_index.spec.search.service.port)
}

pub fn labels(image_index: &ImageIndex, component: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".into(), "imageindex".into()),
        (INSTANCE.into(), image_index.metadata.name.clone().unwrap_or_default()),
        (COMPONENT.into(), component.into()),
        ("app.kubernetes.io/managed-by".into(), "imageindex-operator".into()),
    ])
}

fn meta(image_index: &ImageIndex, name: String, component: &str) -> ObjectMeta {
    ObjectMeta {
        name: Some(name),
        namespace: image_index.metadata.namespace.clone(),
        labels: Some(labels(image_index, component)),
        owner_references: image_index.controller_owner_ref(&()).map(|o| vec![o]),
        ..Default::default()
    }
}

/// Whether an object in the namespace is this ImageIndex's: its controller owner reference names
/// this ImageIndex's UID, or (a cleanup Job, which has none) its `OWNER_UID` label does. An
/// object of the same name that is not is never applied over or deleted: it belongs to someone.
pub fn is_ours(object: &ObjectMeta, image_index: &ImageIndex) -> bool {
    let Some(uid) = image_index.metadata.uid.as_deref() else { return false };
    let owned = object.owner_references.iter().flatten().any(|o| o.uid == uid && o.controller == Some(true));
    owned || object.labels.as_ref().and_then(|l| l.get(OWNER_UID)).is_some_and(|u| u == uid)
}
