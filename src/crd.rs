//! The `ImageIndex` custom resource (`imageindex.dev/v1alpha1`): a bucket of images, the Milvus and
//! MySQL that hold its index, how to embed it and how to serve search. The CRD YAML is generated
//! from these types (`imageindex crd`, checked in as `crds/imageindex.yaml`).
//!
//! The schema only uses what both Kubernetes 1.20 and current releases accept as a structural
//! schema: types, enums, patterns, ranges, required fields and `oneOf` of `required` lists. No CEL
//! rules: 1.20 has none, and the controller's `validate` step checks the rest.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::core::v1::{
    Affinity, LocalObjectReference, ResourceRequirements, Toleration, TopologySpreadConstraint,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::CustomResource;
use kube::core::CustomResourceExt;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use sha2::Digest;

use crate::contract::report::GenerationReport;
use crate::core::{IndexKind, Precision};

/// Set to `"true"` on an ImageIndex, its deletion keeps the collection and catalog rows as they
/// are and finishes at once, whatever `deletionPolicy` says (a Milvus or MySQL gone for good).
pub const SKIP_CLEANUP: &str = "imageindex.dev/skip-cleanup";

/// Set to a new value (a timestamp, say) to resync now: list the bucket at once, and start a Job
/// if it has work, even within the wait after a failed one. `status.lastHandledResync` echoes
/// the value once acted on (as Flux's `reconcile.fluxcd.io/requestedAt` does).
pub const RESYNC: &str = "imageindex.dev/resync";

/// A bucket of images turned into a reverse-image-search service.
// The printer columns repeat `type_ = ...` by design.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "imageindex.dev",
    version = "v1alpha1",
    kind = "ImageIndex",
    namespaced,
    shortname = "imgidx",
    status = "ImageIndexStatus",
    derive = "PartialEq",
    doc = "A bucket of images indexed into Milvus, with a catalog in MySQL and a search service",
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "Indexed", type_ = "integer", json_path = ".status.images.indexed"),
    printcolumn(name = "Discovered", type_ = "integer", json_path = ".status.images.discovered"),
    printcolumn(name = "Failed", type_ = "integer", json_path = ".status.images.failed", priority = 1),
    printcolumn(name = "Serving", type_ = "integer", json_path = ".status.generations.serving.number", priority = 1),
    printcolumn(name = "Building", type_ = "integer", json_path = ".status.generations.building.number", priority = 1),
    printcolumn(name = "Built", type_ = "integer", json_path = ".status.generations.building.indexed", priority = 1),
    printcolumn(name = "Endpoint", type_ = "string", json_path = ".status.endpoint"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
pub struct ImageIndexSpec {
    pub source: SourceSpec,
    pub milvus: MilvusSpec,
    pub mysql: MysqlSpec,
    #[serde(default)]
    pub embedding: EmbeddingSpec,
    #[serde(default)]
    pub search: SearchSpec,
    /// What a change of model, precision, width or index type does: a new collection
    /// (generation) is built beside the serving one, and search moves to it once it is complete.
    #[serde(default, skip_serializing_if = "GenerationsSpec::is_default")]
    pub generations: GenerationsSpec,
    /// What deleting the ImageIndex does to the collection and its catalog rows.
    #[serde(default)]
    pub deletion_policy: DeletionPolicy,
    /// Pause indexing: no bucket listing and no new embedding Job (one running finishes); search
    /// keeps serving what is indexed.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub suspend: bool,
    /// The ServiceAccount every pod of the index runs as (plan, embedding, cleanup, search): one
    /// bound to a cloud role (IRSA, GKE or Azure Workload Identity) reads the bucket without
    /// static keys. The namespace's `default` when unset. Pods get no Kubernetes API token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub service_account_name: Option<String>,
    /// Secrets for pulling the images of every pod of the index from a private registry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_pull_secrets: Option<Vec<LocalObjectReference>>,
}

/// Where the images are.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SourceSpec {
    /// `s3://bucket/prefix/` (AWS S3 or any S3-compatible store), `gs://bucket/prefix/` (Google
    /// Cloud Storage) or `az://container/prefix/` (Azure Blob Storage; see `endpoint`).
    #[schemars(regex(pattern = r"^(s3|gs|az)://[a-z0-9][a-z0-9._\-]{1,62}(/.*)?$"))]
    pub url: String,
    /// The store's endpoint: an S3-compatible server (MinIO, SeaweedFS, Ceph...; AWS when unset),
    /// the Azure account's URL (`https://<account>.blob.core.windows.net`, which names the account
    /// when the Secret does not), or the Google Cloud Storage XML API's (storage.googleapis.com
    /// when unset).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^https?://.+"))]
    pub endpoint: Option<String>,
    /// Secret in the ImageIndex's namespace whose keys become the pods' environment:
    /// `AWS_ACCESS_KEY_ID` and `AWS_SECRET_ACCESS_KEY` (optionally `AWS_REGION`,
    /// `AWS_SESSION_TOKEN`) for s3://; `AZURE_STORAGE_ACCOUNT_NAME` with `AZURE_STORAGE_ACCOUNT_KEY`
    /// or `AZURE_STORAGE_SAS_KEY` for az://; `GOOGLE_SERVICE_ACCOUNT_KEY` (the key's JSON) for
    /// gs://. Unset: the pods' own identity (`serviceAccountName` with IRSA, AKS or GKE Workload
    /// Identity).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub credentials_secret: Option<String>,
    /// Globs of the keys to index.
    #[serde(default = "default_include")]
    pub include: Vec<String>,
    /// How often the bucket is listed for new, changed and deleted objects (`30s`, `10m`, `1h`).
    #[serde(default = "default_resync")]
    #[schemars(regex(pattern = r"^([0-9]+(s|m|h))+$"))]
    pub resync_interval: String,
    /// Most of the catalog one sync may delete, in percent (10 objects may always go). A listing
    /// that would delete more (a typo'd prefix, a bucket policy change) deletes and indexes nothing,
    /// and `Indexed` says why.
    #[serde(default = "default_max_delete_percent")]
    #[schemars(range(min = 0, max = 100))]
    pub max_delete_percent: u8,
    /// Delete whatever the listing says is gone, however much. Set it for the one sync that should,
    /// then unset it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_mass_deletion: bool,
}

fn default_max_delete_percent() -> u8 {
    10
}

fn default_include() -> Vec<String> {
    crate::contract::DEFAULT_INCLUDE.iter().map(|s| s.to_string()).collect()
}
fn default_resync() -> String {
    "10m".into()
}

/// The Milvus that holds the vectors: a `milvus.io/v1beta1` Milvus (the milvus-operator's), or an
/// address. Exactly one of `ref` and `address`.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("oneOf" = [{"required": ["ref"]}, {"required": ["address"]}]))]
pub struct MilvusSpec {
    /// A Milvus custom resource; its `status.endpoint` is used once it is `MilvusReady`.
    #[serde(default, rename = "ref", skip_serializing_if = "Option::is_none")]
    pub reference: Option<MilvusRef>,
    /// `host:port` of Milvus's gRPC port (19530), or `http://host:port`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1))]
    pub address: Option<String>,
    /// Secret key holding `user:password`, where Milvus has authentication on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_secret_ref: Option<SecretKeyRef>,
    /// The collection; when unset, `<namespace>_<name>_<hash>` (dashes and dots as underscores,
    /// and a hash of the exact namespace and name, so that `team-a/photos` and `team/a-photos`
    /// never share one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[A-Za-z_][A-Za-z0-9_]{0,254}$"))]
    pub collection: Option<String>,
    /// The vector index (HNSW by default).
    #[serde(default)]
    pub index: IndexSpec,
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
pub struct MilvusRef {
    /// The `Milvus` resource's name.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Defaults to the ImageIndex's namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Default, JsonSchema)]
pub struct IndexSpec {
    /// HNSW searches by cosine similarity; IVF_FLAT (the Milvus bootcamp's) by L2 distance.
    #[serde(default, rename = "type")]
    pub kind: IndexKind,
}

/// The MySQL catalog.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MysqlSpec {
    /// Secret key holding `mysql://user:password@host:3306/db`.
    pub secret_ref: SecretKeyRef,
}

/// A key of a Secret in the ImageIndex's namespace.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
pub struct SecretKeyRef {
    /// The Secret, in the ImageIndex's namespace.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// The key within it (`url` when unset).
    #[serde(default = "default_secret_key")]
    #[schemars(length(min = 1))]
    pub key: String,
}

fn default_secret_key() -> String {
    "url".into()
}

/// Where a workload's pods run: the pod fields a platform team sets for GPU pools, spot nodes and
/// priorities, the same for the Jobs and for search.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Scheduling {
    /// Labels a node must have to run the pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<BTreeMap<String, String>>,
    /// Taints the pods tolerate (a GPU or spot pool's, say).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tolerations: Option<Vec<Toleration>>,
    /// Scheduling beyond `nodeSelector`: node and pod (anti-)affinity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<Affinity>,
    /// The pods' PriorityClass.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub priority_class_name: Option<String>,
    /// The pods' RuntimeClass (`nvidia` where the GPU runtime is not the node's default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub runtime_class_name: Option<String>,
}

impl Scheduling {
    /// Sets these fields on `pod`.
    pub fn apply(&self, pod: &mut k8s_openapi::api::core::v1::PodSpec) {
        pod.node_selector = self.node_selector.clone();
        pod.tolerations = self.tolerations.clone();
        pod.affinity = self.affinity.clone();
        pod.priority_class_name = self.priority_class_name.clone();
        pod.runtime_class_name = self.runtime_class_name.clone();
    }
}

/// The embedding Jobs.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EmbeddingSpec {
    /// The ONNX model: a path in the image (`/models/resnet50.onnx`, the default), or
    /// `pvc://<claim>/<path>` on a PersistentVolumeClaim, mounted read-only.
    #[serde(default = "default_model_uri")]
    #[schemars(regex(pattern = r"^(/.+|pvc://[a-z0-9][a-z0-9.\-]*/.+)$"))]
    pub model_uri: String,
    /// Images per model call.
    #[serde(default = "default_batch")]
    #[schemars(range(min = 1, max = 1024))]
    pub batch_size: u32,
    /// Model precision: `fp32`, `fp16` (GPU) or `int8` (CPU). Lower precisions load the variant
    /// beside the model (`resnet50.int8.onnx` for `/models/resnet50.onnx`). A collection holds
    /// vectors of one precision: changing it on an existing collection is refused.
    #[serde(default)]
    pub precision: Precision,
    /// How images are prepared for a model whose file does not record it (the project's scripts
    /// record it): `torchvision` (ResNet; the default), `clip`, or
    /// `resize=N,crop=N,filter=bilinear|bicubic,mean=R/G/B,std=R/G/B`. A file that records
    /// another is refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preprocess: Option<String>,
    /// Pods of the Indexed Job, each embedding its shard of the bucket.
    #[serde(default = "default_parallelism")]
    #[schemars(range(min = 1, max = 256))]
    pub parallelism: u32,
    /// The Job pods' resources; a `nvidia.com/gpu` limit runs the model on CUDA.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// Where the pods run.
    #[serde(flatten)]
    pub scheduling: Scheduling,
    /// The image for the Jobs (and for the search pods unless `search.image` is set); the
    /// operator's own image when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Seconds an embedding Job may run before Kubernetes stops it. What it embedded is kept,
    /// and the next Job (after the resync interval) goes on from there, so a huge bucket is
    /// indexed in several Jobs rather than by one that can hang for ever.
    #[serde(default = "default_active_deadline")]
    #[schemars(range(min = 60))]
    pub active_deadline_seconds: i64,
    /// GPU Jobs: a PersistentVolumeClaim that keeps TensorRT's engine and timing caches from one
    /// Job to the next (building engines takes minutes); an emptyDir when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"))]
    pub engine_cache_claim: Option<String>,
}

impl Default for EmbeddingSpec {
    fn default() -> Self {
        Self {
            model_uri: default_model_uri(),
            batch_size: default_batch(),
            precision: Precision::Fp32,
            preprocess: None,
            parallelism: default_parallelism(),
            resources: None,
            scheduling: Scheduling::default(),
            image: None,
            engine_cache_claim: None,
            active_deadline_seconds: default_active_deadline(),
        }
    }
}

fn default_active_deadline() -> i64 {
    24 * 3600
}

fn default_model_uri() -> String {
    "/models/resnet50.onnx".into()
}
fn default_batch() -> u32 {
    16
}
fn default_parallelism() -> u32 {
    1
}

/// Generations of the index: the collections behind its Milvus alias.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GenerationsSpec {
    /// Keep a generation search has moved off, instead of dropping it after the grace period.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub keep: bool,
    /// Seconds a generation search has moved off is kept, so that every search pod moves too
    /// (they read the alias every 5 s), before the next plan drops it.
    #[serde(default = "default_grace_seconds")]
    #[schemars(range(min = 0, max = 604800))]
    pub grace_seconds: u32,
}

fn default_grace_seconds() -> u32 {
    300
}

impl Default for GenerationsSpec {
    fn default() -> Self {
        Self { keep: false, grace_seconds: default_grace_seconds() }
    }
}

impl GenerationsSpec {
    fn is_default(&self) -> bool {
        *self == Self::default()
    }
}

/// The search Deployment and Service (`<name>-search`).
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SearchSpec {
    /// Search pods (0 stops search; ignored when `autoscaled`).
    #[serde(default = "default_replicas")]
    #[schemars(range(min = 0, max = 100))]
    pub replicas: i32,
    /// The Service `<name>-search` in front of the search pods.
    #[serde(default)]
    pub service: ServiceSpec,
    /// The search pods' resources; a `nvidia.com/gpu` (or MIG) limit embeds queries on CUDA,
    /// otherwise they run on the CPU, whatever the Jobs use.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// Secret key holding the bearer token for upload and delete (the write token, which admits
    /// every route); without one they are off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_secret_ref: Option<SecretKeyRef>,
    /// Who may search, count, read progress and fetch images.
    #[serde(default, skip_serializing_if = "SearchAuth::is_default")]
    pub auth: SearchAuth,
    /// The image for the search pods; `embedding.image` (then the operator's own) when unset. Set
    /// it to the CPU image when the Jobs use the CUDA one, which is much larger.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// The precision the search pods embed queries with; `embedding.precision` when unset. Another
    /// one (fp16 Jobs on GPUs, fp32 or int8 search on CPUs) lets search query vectors of the Jobs'
    /// precision: README, "Precision", says how closely they agree.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub precision: Option<Precision>,
    /// Where the pods run.
    #[serde(flatten)]
    pub scheduling: Scheduling,
    /// How the search pods spread over the cluster; when unset, at most one more per node and
    /// per zone than on any other, where the scheduler can (`ScheduleAnyway`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topology_spread_constraints: Option<Vec<TopologySpreadConstraint>>,
    /// Leave the search Deployment's replica count to a HorizontalPodAutoscaler (or a person):
    /// the operator stops setting it, and `replicas` is ignored.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub autoscaled: bool,
}

impl Default for SearchSpec {
    fn default() -> Self {
        Self {
            replicas: default_replicas(),
            service: ServiceSpec::default(),
            resources: None,
            token_secret_ref: None,
            auth: SearchAuth::default(),
            image: None,
            precision: None,
            scheduling: Scheduling::default(),
            topology_spread_constraints: None,
            autoscaled: false,
        }
    }
}

/// Who may use the read routes: search, count, progress and the images themselves (every indexed
/// image, and URL fetches from the pods' network).
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SearchAuth {
    /// `open`: anyone who reaches the Service (a `LoadBalancer` makes that the internet). `token`:
    /// a bearer token, the read token or the write token. Set when `readTokenSecretRef` is.
    #[serde(default)]
    pub reads: ReadAccess,
    /// Secret key holding the read token: it admits the read routes and never upload, delete or
    /// drop (the token to give a page or an app). Without it, `reads: token` takes the write token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read_token_secret_ref: Option<SecretKeyRef>,
}

impl SearchAuth {
    fn is_default(&self) -> bool {
        *self == Self::default()
    }

    /// Whether the read routes need a token.
    pub fn protects_reads(&self) -> bool {
        self.reads == ReadAccess::Token || self.read_token_secret_ref.is_some()
    }
}

#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum ReadAccess {
    #[default]
    Open,
    Token,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

fn default_replicas() -> i32 {
    1
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
pub struct ServiceSpec {
    /// `ClusterIP` (the default), `NodePort` or `LoadBalancer`.
    #[serde(default, rename = "type")]
    pub kind: ServiceType,
    /// The Service's port (80 by default).
    #[serde(default = "default_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: i32,
    /// Annotations for the Service (a cloud load balancer's settings, say).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotations: Option<BTreeMap<String, String>>,
}

impl Default for ServiceSpec {
    fn default() -> Self {
        Self { kind: ServiceType::default(), port: default_port(), annotations: None }
    }
}

fn default_port() -> i32 {
    80
}

#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
pub enum ServiceType {
    #[default]
    ClusterIP,
    NodePort,
    LoadBalancer,
}

impl ServiceType {
    pub fn as_str(self) -> &'static str {
        match self {
            ServiceType::ClusterIP => "ClusterIP",
            ServiceType::NodePort => "NodePort",
            ServiceType::LoadBalancer => "LoadBalancer",
        }
    }
}

/// `Retain` keeps the collection and catalog when the ImageIndex is deleted; `Delete` drops them.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
pub enum DeletionPolicy {
    #[default]
    Retain,
    Delete,
}

/// What the controller observed.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ImageIndexStatus {
    /// The spec generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<Phase>,
    /// MilvusReady, CollectionReady, Indexed, SearchReady, and their aggregate Ready. A map
    /// keyed by type, so server-side apply merges them by type.
    #[serde(default)]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    #[serde(default)]
    pub images: ImageCounts,
    /// The Milvus collection in use.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub collection: Option<String>,
    /// The embedding Job now running, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_job: Option<String>,
    /// When the last embedding Job completed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_sync_time: Option<Time>,
    /// The spec generation the last completed Job ran for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub synced_generation: Option<i64>,
    /// A hash of the embedding settings (source, collection, model, precision, batch size,
    /// image) the last completed Job ran with. A new Job starts when they change, not on every
    /// spec edit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub synced_embedding: Option<String>,
    /// The search Service's URL inside the cluster.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// The generations of the index, once it has more than its first collection: the one search
    /// reads, and the one being built for a new model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generations: Option<GenerationsStatus>,
    /// The last `imageindex.dev/resync` annotation value acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_handled_resync: Option<String>,
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, Default, JsonSchema)]
pub struct GenerationsStatus {
    /// What search reads (the Milvus alias points at its collection).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serving: Option<GenerationReport>,
    /// Being built for the model the spec asks for; search moves to it once it holds every object.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub building: Option<GenerationReport>,
}

/// Objects in the bucket and in the index.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, Default, JsonSchema)]
pub struct ImageCounts {
    /// Objects in the bucket that match `include`.
    pub discovered: u64,
    /// Objects with a vector in Milvus.
    pub indexed: u64,
    /// Objects that could not be embedded (reasons are in the catalog and `/progress`).
    pub failed: u64,
    /// Indexed objects whose newer version could not be read (the bucket refused or kept failing
    /// the GET): search answers with the older version, and every sync tries again.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub stale: u64,
    /// Objects gone from the listing whose deletion is held back: so many objects could not be
    /// read that the listing proves nothing gone. Deleted once they are read again, or with
    /// `spec.source.allowMassDeletion`.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub held: u64,
    /// New, changed and deleted objects not yet synced.
    pub pending: u64,
}

#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum Phase {
    /// Waiting for Milvus, MySQL or the Secrets.
    Pending,
    /// An embedding Job is running.
    Indexing,
    /// Indexed and searchable.
    Ready,
    /// Was ready; something it needs is failing now (a Job, Milvus, MySQL, the search pods).
    Degraded,
    /// The spec cannot work as written; fix it.
    Failed,
    /// Deleted with `deletionPolicy: Delete`; the `Ready` condition says what the cleanup waits for.
    Deleting,
    /// `spec.suspend`: no indexing; search serves what is indexed.
    Suspended,
}

impl ImageIndex {
    /// The Milvus collection (and catalog namespace): the spec's; else the one status says is in
    /// use (an index made before names carried a hash keeps its collection); else
    /// `default_collection`.
    pub fn collection(&self) -> String {
        self.spec
            .milvus
            .collection
            .clone()
            .or_else(|| self.status.as_ref().and_then(|s| s.collection.clone()))
            .unwrap_or_else(|| {
                default_collection(
                    self.metadata.namespace.as_deref().unwrap_or("default"),
                    self.metadata.name.as_deref().unwrap_or_default(),
                )
            })
    }

    /// Who this ImageIndex claims its collection as (see `Catalog::claim_owner`): its UID, which
    /// a deleted and re-created ImageIndex of the same name does not share.
    pub fn owner(&self) -> String {
        format!(
            "ImageIndex {}/{} (uid {})",
            self.metadata.namespace.as_deref().unwrap_or("default"),
            self.metadata.name.as_deref().unwrap_or_default(),
            self.metadata.uid.as_deref().unwrap_or("none")
        )
    }
}

/// `<namespace>_<name>_<hash>`: readable, a valid Milvus name (dashes and dots become
/// underscores), and unambiguous: the hash is of the exact `namespace/name`, which the
/// replacement alone would not keep apart (`team-a/photos`, `team/a-photos`).
pub fn default_collection(namespace: &str, name: &str) -> String {
    let hash = sha2::Sha256::digest(format!("{namespace}/{name}").as_bytes());
    let hex: String = hash[..4].iter().map(|b| format!("{b:02x}")).collect();
    let mut readable = format!("{namespace}_{name}").replace(['-', '.'], "_");
    // Milvus names are at most 255 characters; the hash keeps a cut name unique.
    readable.truncate(200);
    format!("{readable}_{hex}")
}

/// The CRD as YAML, as `imageindex crd` prints it and `crds/imageindex.yaml` holds it.
pub fn crd_yaml() -> String {
    let crd = ImageIndex::crd();
    format!(
        "# Generated by `imageindex crd` from src/crd.rs; do not edit.\n{}",
        serde_yaml::to_string(&crd).expect("a CRD serialises")
    )
}

/// Parses `resyncInterval` (`90s`, `10m`, `1h30m`).
pub fn parse_interval(s: &str) -> Option<Duration> {
    let mut total = 0u64;
    let mut digits = String::new();
    for c in s.chars() {
        match c {
            '0'..='9' => digits.push(c),
            's' | 'm' | 'h' if !digits.is_empty() => {
                let n: u64 = digits.parse().ok()?;
                total = total.checked_add(n.checked_mul(if c == 's' {
                    1
                } else if c == 'm' {
                    60
                } else {
                    3600
                })?)?;
                digits.clear();
            }
            _ => return None,
        }
    }
    (digits.is_empty() && total > 0).then(|| Duration::from_secs(total))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crds_folder_matches_the_types() {
        // The chart carries a copy (Helm installs `crds/` before its templates).
        for (path, checked_in) in [
            ("crds/imageindex.yaml", include_str!("../crds/imageindex.yaml")),
            ("charts/imageindex/crds/imageindex.yaml", include_str!("../charts/imageindex/crds/imageindex.yaml")),
        ] {
            assert!(checked_in == crd_yaml(), "{path} is stale: run `cargo run -- crd | tee {path}`");
        }
    }

    /// Conditions merge by type under server-side apply (kstatus and `kubectl wait` expect one
    /// per type); a plain list would be replaced whole by each manager.
    #[test]
    fn conditions_are_a_map_keyed_by_type() {
        let crd = serde_json::to_value(ImageIndex::crd()).unwrap();
        let conditions = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"]
            ["conditions"];
        assert_eq!(conditions["x-kubernetes-list-type"], "map");
        assert_eq!(conditions["x-kubernetes-list-map-keys"], serde_json::json!(["type"]));
        assert!(
            conditions["items"]["required"].as_array().unwrap().iter().any(|k| k == "type"),
            "a map key must be required"
        );
    }

    /// `kubectl explain imageindex.spec...` has something to say about every field.
    #[test]
    fn every_spec_field_is_described() {
        fn undescribed(schema: &serde_json::Value, path: &str, out: &mut Vec<String>) {
            for (name, field) in schema["properties"].as_object().into_iter().flatten() {
                let path = format!("{path}.{name}");
                if field.get("description").is_none() {
                    out.push(path.clone());
                }
                undescribed(field, &path, out);
                undescribed(&field["items"], &format!("{path}[]"), out);
            }
        }
        let crd = serde_json::to_value(ImageIndex::crd()).unwrap();
        let mut missing = vec![];
        undescribed(
            &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"],
            "spec",
            &mut missing,
        );
        assert!(missing.is_empty(), "no description: {missing:?}");
    }

    #[test]
    fn default_collections_never_collide() {
        let a = default_collection("team-a", "photos");
        let b = default_collection("team", "a-photos");
        assert!(a.starts_with("team_a_photos_") && b.starts_with("team_a_photos_"), "{a} {b}");
        assert_ne!(a, b);
        let long = default_collection(&"n".repeat(63), &"x".repeat(253));
        assert!(long.len() <= 255 && long.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'), "{long}");
    }

    #[test]
    fn the_collection_in_use_stays_in_use() {
        let mut image_index: ImageIndex = serde_yaml::from_str(
            "apiVersion: imageindex.dev/v1alpha1\nkind: ImageIndex\nmetadata: {name: photos, namespace: shop}\n\
             spec: {source: {url: 's3://b/p/'}, milvus: {address: 'milvus:19530'}, mysql: {secretRef: {name: db}}}",
        )
        .unwrap();
        // Made by an operator before names had a hash: status says which one it uses.
        image_index.status = Some(ImageIndexStatus { collection: Some("shop_photos".into()), ..Default::default() });
        assert_eq!(image_index.collection(), "shop_photos");
        image_index.spec.milvus.collection = Some("mine".into());
        assert_eq!(image_index.collection(), "mine");
    }

    #[test]
    fn intervals() {
        assert_eq!(parse_interval("90s"), Some(Duration::from_secs(90)));
        assert_eq!(parse_interval("1h30m"), Some(Duration::from_secs(5400)));
        for bad in ["", "10", "m", "0s", "1d", "1.5h"] {
            assert_eq!(parse_interval(bad), None, "{bad}");
        }
    }

    #[test]
    fn defaults_fill_a_minimal_spec() {
        let image_index: ImageIndex = serde_yaml::from_str(
            "apiVersion: imageindex.dev/v1alpha1\nkind: ImageIndex\nmetadata: {name: my-photos, namespace: shop}\n\
             spec: {source: {url: 's3://b/p/'}, milvus: {address: 'milvus:19530'}, mysql: {secretRef: {name: db}}}",
        )
        .unwrap();
        assert_eq!(image_index.collection(), default_collection("shop", "my-photos"));
        assert_eq!(image_index.spec.mysql.secret_ref.key, "url");
        assert_eq!(image_index.spec.search.service.port, 80);
        assert_eq!(image_index.spec.embedding.parallelism, 1);
        assert_eq!(image_index.spec.deletion_policy, DeletionPolicy::Retain);
        assert_eq!(image_index.spec.source.resync_interval, "10m");
    }
}
