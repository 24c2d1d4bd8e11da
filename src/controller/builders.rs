//! The objects an ImageIndex owns, built as pure functions of the resource and what the
//! reconciler resolved (no client here; `apply` sends them with server-side apply).

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec};
use k8s_openapi::api::batch::v1::{
    Job, JobSpec, PodFailurePolicy, PodFailurePolicyOnExitCodesRequirement, PodFailurePolicyOnPodConditionsPattern,
    PodFailurePolicyRule,
};
use k8s_openapi::api::core::v1::{
    Capabilities, Container, ContainerPort, EmptyDirVolumeSource, EnvFromSource, EnvVar, EnvVarSource, HTTPGetAction,
    KeyToPath, PersistentVolumeClaimVolumeSource, PodSecurityContext, PodSpec, PodTemplateSpec, Probe,
    ResourceRequirements, SeccompProfile, SecretEnvSource, SecretKeySelector, SecretVolumeSource, SecurityContext,
    Service, ServicePort, ServiceSpec, TopologySpreadConstraint, Volume, VolumeMount,
};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::Resource;
use sha2::Digest;

use crate::contract::env;
use crate::crd::{ImageIndex, SecretKeyRef};

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
/// Where the plan and cleanup pods write their report: the kubelet's termination message.
const TERMINATION_LOG: &str = "/dev/termination-log";
const HTTP_PORT: i32 = 8080;
/// Where search pods find their credentials, one folder per Secret.
const SECRETS_DIR: &str = "/var/run/secrets/imageindex";
const PVC_MOUNT: &str = "/models/pvc";
/// The non-root user of the image (distroless `nonroot`).
const UID: i64 = 65532;
const GPU: &str = "nvidia.com/gpu";
const MIG: &str = "nvidia.com/mig-";
const TRT_CACHE: &str = "/var/cache/imageindex/trt";

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

fn var(name: &str, value: impl Into<String>) -> EnvVar {
    EnvVar { name: name.into(), value: Some(value.into()), ..Default::default() }
}

/// An env var read from a Secret key: the value never appears in the pod spec.
fn secret_env(name: &str, key_ref: &SecretKeyRef) -> EnvVar {
    EnvVar {
        name: name.into(),
        value_from: Some(EnvVarSource {
            secret_key_ref: Some(SecretKeySelector {
                name: key_ref.name.clone(),
                key: key_ref.key.clone(),
                optional: Some(false),
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Where the model file is inside the pod, and the PVC to mount when it lives on one.
fn model_location(uri: &str) -> (String, Option<(String, String)>) {
    match uri.strip_prefix("pvc://").and_then(|rest| rest.split_once('/')) {
        Some((claim, path)) => (format!("{PVC_MOUNT}/{path}"), Some((claim.to_string(), path.to_string()))),
        None => (uri.to_string(), None),
    }
}

/// A whole GPU (`nvidia.com/gpu`) or a MIG slice of one (`nvidia.com/mig-1g.10gb`).
fn wants_gpu(resources: Option<&ResourceRequirements>) -> bool {
    resources
        .and_then(|requirements| requirements.limits.as_ref())
        .is_some_and(|l| l.keys().any(|k| k == GPU || k.starts_with(MIG)))
}

/// Every pod says which device it runs the model on: an image's own default (the CUDA image's
/// `cuda`) must never decide it, or a search pod on a CPU node fails to start.
fn device(gpu: bool) -> &'static str {
    if gpu { "cuda" } else { "cpu" }
}

/// TensorRT's engines (used where the image has its libraries), kept on a claim if given.
fn trt_cache(claim: Option<&String>, env: &mut Vec<EnvVar>, volumes: &mut Vec<Volume>, mounts: &mut Vec<VolumeMount>) {
    env.push(var(env::TRT_CACHE, TRT_CACHE));
    volumes.push(Volume {
        name: "trt-cache".into(),
        persistent_volume_claim: claim
            .cloned()
            .map(|claim_name| PersistentVolumeClaimVolumeSource { claim_name, read_only: Some(false) }),
        empty_dir: claim.is_none().then(EmptyDirVolumeSource::default),
        ..Default::default()
    });
    mounts.push(VolumeMount { name: "trt-cache".into(), mount_path: TRT_CACHE.into(), ..Default::default() });
}

/// Settings every imageindex pod shares: source, Milvus, catalog, model.
fn common_env(image_index: &ImageIndex, resolved: &Resolved) -> Vec<EnvVar> {
    let spec = &image_index.spec;
    let (model, _) = model_location(&spec.embedding.model_uri);
    let mut e = vec![
        var(env::SOURCE, &spec.source.url),
        var(env::INCLUDE, spec.source.include.join(",")),
        var(env::MILVUS_URL, &resolved.milvus_url),
        var(env::COLLECTION, &resolved.collection),
        var(env::OWNER, image_index.owner()),
        var(env::INDEX_TYPE, spec.milvus.index.kind.as_str()),
        secret_env(env::MYSQL_URL, &spec.mysql.secret_ref),
        var(env::MODEL, model),
        var(env::LOG, "info"),
    ];
    if let Some(ep) = &spec.source.endpoint {
        e.push(var(env::S3_ENDPOINT, ep));
    }
    if let Some(p) = &spec.embedding.preprocess {
        e.push(var(env::PREPROCESS, p));
    }
    if let Some(t) = &spec.milvus.credentials_secret_ref {
        e.push(secret_env(env::MILVUS_TOKEN, t));
    }
    e
}

/// The source's credentials Secret becomes AWS_* env as a whole (`envFrom`).
fn env_from(image_index: &ImageIndex) -> Option<Vec<EnvFromSource>> {
    image_index.spec.source.credentials_secret.as_ref().map(|name| {
        vec![EnvFromSource {
            secret_ref: Some(SecretEnvSource { name: name.clone(), optional: Some(false) }),
            ..Default::default()
        }]
    })
}

/// Non-root, no privilege escalation, no capabilities, read-only root filesystem.
fn container_security() -> SecurityContext {
    SecurityContext {
        allow_privilege_escalation: Some(false),
        read_only_root_filesystem: Some(true),
        run_as_non_root: Some(true),
        capabilities: Some(Capabilities { drop: Some(vec!["ALL".into()]), ..Default::default() }),
        ..Default::default()
    }
}

fn pod_security() -> PodSecurityContext {
    PodSecurityContext {
        run_as_non_root: Some(true),
        run_as_user: Some(UID),
        run_as_group: Some(UID),
        fs_group: Some(UID),
        seccomp_profile: Some(SeccompProfile { type_: "RuntimeDefault".into(), ..Default::default() }),
        ..Default::default()
    }
}

/// `/tmp`'s limit for every pod but the plan's.
const TMP_LIMIT: &str = "1Gi";
/// The plan's `/tmp`: it sorts the listing there (`sync::sorted`), about 100 bytes an object
/// beyond the first 100,000, so 10Gi holds a bucket of about 100 million objects. A limit, not a
/// reservation: a small bucket uses none of it.
const PLAN_TMP_LIMIT: &str = "10Gi";

/// `/tmp`, writable under a read-only root.
fn tmp(limit: &str) -> (Volume, VolumeMount) {
    let volume = Volume {
        name: "tmp".into(),
        empty_dir: Some(EmptyDirVolumeSource { size_limit: Some(Quantity(limit.into())), ..Default::default() }),
        ..Default::default()
    };
    (volume, VolumeMount { name: "tmp".into(), mount_path: "/tmp".into(), ..Default::default() })
}

/// `/tmp` (of `tmp_limit`) and the model's PVC, if any.
fn volumes(image_index: &ImageIndex, tmp_limit: &str) -> (Vec<Volume>, Vec<VolumeMount>) {
    let (tmp, tmp_mount) = tmp(tmp_limit);
    let (mut vols, mut mounts) = (vec![tmp], vec![tmp_mount]);
    if let (_, Some((claim, _))) = model_location(&image_index.spec.embedding.model_uri) {
        vols.push(Volume {
            name: "model".into(),
            persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                claim_name: claim,
                read_only: Some(true),
            }),
            ..Default::default()
        });
        mounts.push(VolumeMount {
            name: "model".into(),
            mount_path: PVC_MOUNT.into(),
            read_only: Some(true),
            ..Default::default()
        });
    }
    (vols, mounts)
}

fn quantities(pairs: &[(&str, &str)]) -> BTreeMap<String, Quantity> {
    pairs.iter().map(|(k, v)| (k.to_string(), Quantity(v.to_string()))).collect()
}

/// The Jobs' image: the spec's, or the operator's own.
fn embed_image(image_index: &ImageIndex, resolved: &Resolved) -> String {
    image_index.spec.embedding.image.clone().unwrap_or_else(|| resolved.default_image.clone())
}

/// The search pods' image: their own, else the Jobs' (it carries the model they use).
fn search_image(image_index: &ImageIndex, resolved: &Resolved) -> String {
    image_index.spec.search.image.clone().unwrap_or_else(|| embed_image(image_index, resolved))
}

/// The pod the Job and the Deployment both run: one imageindex container, hardened, with the
/// source's credentials and the volumes set here once.
fn pod_template(
    image_index: &ImageIndex,
    component: &str,
    mut container: Container,
    volumes: Vec<Volume>,
    mounts: Vec<VolumeMount>,
) -> PodTemplateSpec {
    container.env_from = env_from(image_index);
    container.security_context = Some(container_security());
    container.volume_mounts = Some(mounts);
    let spec = &image_index.spec;
    PodTemplateSpec {
        metadata: Some(ObjectMeta { labels: Some(labels(image_index, component)), ..Default::default() }),
        spec: Some(PodSpec {
            // The spec's account (a cloud identity for the bucket), but never an API token: the
            // pods talk to the bucket, Milvus and MySQL only.
            service_account_name: spec.service_account_name.clone(),
            image_pull_secrets: spec.image_pull_secrets.clone(),
            automount_service_account_token: Some(false),
            enable_service_links: Some(false),
            security_context: Some(pod_security()),
            containers: vec![container],
            volumes: Some(volumes),
            ..Default::default()
        }),
    }
}

/// A pod evicted, preempted or lost with its node (a spot GPU node reclaimed) is retried without
/// counting against the backoff limit; a configuration error (`contract::EXIT_CONFIG`: a model file
/// missing, another model's collection) fails the Job at once, since every retry fails the same.
fn pod_failure_policy() -> PodFailurePolicy {
    PodFailurePolicy {
        rules: vec![
            PodFailurePolicyRule {
                action: "FailJob".into(),
                on_exit_codes: Some(PodFailurePolicyOnExitCodesRequirement {
                    container_name: Some("embed".into()),
                    operator: "In".into(),
                    values: vec![i32::from(crate::contract::EXIT_CONFIG)],
                }),
                on_pod_conditions: None,
            },
            PodFailurePolicyRule {
                action: "Ignore".into(),
                on_exit_codes: None,
                on_pod_conditions: Some(vec![PodFailurePolicyOnPodConditionsPattern {
                    type_: "DisruptionTarget".into(),
                    status: "True".into(),
                }]),
            },
        ],
    }
}

/// The embedding Job: an Indexed Job with one pod per shard, each running `imageindex embed` on
/// its share of `plan`'s work (the newest plan in the catalog without one).
pub fn embed_job(image_index: &ImageIndex, resolved: &Resolved, name: &str, plan: Option<i64>) -> Job {
    let spec = &image_index.spec.embedding;
    let features = resolved.features;
    let shards = if features.indexed { spec.parallelism as i32 } else { 1 };
    let gpu = wants_gpu(spec.resources.as_ref());
    let (mut volumes, mut mounts) = volumes(image_index, TMP_LIMIT);
    let mut env = common_env(image_index, resolved);
    env.extend([
        var(env::SHARDS, shards.to_string()),
        var(env::BATCH_SIZE, spec.batch_size.to_string()),
        var(env::DEVICE, device(gpu)),
        var(env::PRECISION, spec.precision.to_string()),
    ]);
    env.extend(plan.map(|p| var(env::PLAN, p.to_string())));
    if gpu {
        trt_cache(spec.engine_cache_claim.as_ref(), &mut env, &mut volumes, &mut mounts);
    }
    let resources = spec.resources.clone().unwrap_or_else(|| ResourceRequirements {
        requests: Some(quantities(&[("cpu", "1"), ("memory", "1Gi")])),
        limits: Some(quantities(&[("memory", "2Gi")])),
        ..Default::default()
    });
    let per_index = features.indexed && features.backoff_limit_per_index;
    let mut meta = meta(image_index, name.to_string(), "embed");
    meta.annotations = Some(BTreeMap::from([
        (SPEC_GENERATION.to_string(), image_index.metadata.generation.unwrap_or_default().to_string()),
        (EMBEDDING.to_string(), embedding_hash(image_index, resolved)),
    ]));
    Job {
        metadata: meta,
        spec: Some(JobSpec {
            completions: Some(shards),
            parallelism: Some(shards),
            completion_mode: features.indexed.then(|| "Indexed".to_string()),
            // Bad images never fail a pod (they are recorded); retries cover node loss and Milvus
            // blips, per shard where the server can count them so.
            backoff_limit: (!per_index).then_some(3 * shards),
            backoff_limit_per_index: per_index.then_some(3),
            pod_failure_policy: features.pod_failure_policy.then(pod_failure_policy),
            // A Job never holds the index for ever: what it did is kept, the next one goes on.
            active_deadline_seconds: Some(spec.active_deadline_seconds),
            ttl_seconds_after_finished: Some(24 * 3600),
            template: {
                let container = Container {
                    name: "embed".into(),
                    args: Some(vec!["embed".into(), "--json".into()]),
                    env: Some(env),
                    resources: Some(resources),
                    image: Some(embed_image(image_index, resolved)),
                    ..Default::default()
                };
                let mut t = pod_template(image_index, "embed", container, volumes, mounts);
                let pod = t.spec.as_mut().expect("pod_template sets a spec");
                pod.restart_policy = Some("Never".into());
                spec.scheduling.apply(pod);
                t
            },
            ..Default::default()
        }),
        status: None,
    }
}

/// What a plan Job is for, recorded on it (see `AFTER_JOB`, `RESYNC_FOR`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PlanFor {
    pub after_job: Option<String>,
    pub resync: Option<String>,
    /// Seconds it may run: listing a large bucket takes a while, but never for ever.
    pub deadline: i64,
}

/// A short Job of one pod running `imageindex <args>` with the index's settings and credentials,
/// on any node (it needs no GPU), reporting in its termination message. The controller retries
/// it, not the Job: a retry inside would hide why it failed.
fn task_job(image_index: &ImageIndex, resolved: &Resolved, name: &str, component: &str, args: Vec<String>) -> Job {
    let mut env = common_env(image_index, resolved);
    env.push(var(env::REPORT, TERMINATION_LOG));
    // No model volume here: the cleanup never reads the model; the plan Job adds it.
    let (tmp, tmp_mount) = tmp(TMP_LIMIT);
    let container = Container {
        name: component.into(),
        args: Some(args),
        env: Some(env),
        image: Some(embed_image(image_index, resolved)),
        resources: Some(ResourceRequirements {
            requests: Some(quantities(&[("cpu", "100m"), ("memory", "128Mi")])),
            limits: Some(quantities(&[("memory", "1Gi")])),
            ..Default::default()
        }),
        termination_message_path: Some(TERMINATION_LOG.into()),
        termination_message_policy: Some("File".into()),
        ..Default::default()
    };
    let mut template = pod_template(image_index, component, container, vec![tmp], vec![tmp_mount]);
    template.spec.as_mut().expect("pod_template sets a spec").restart_policy = Some("Never".into());
    Job {
        metadata: meta(image_index, name.to_string(), component),
        spec: Some(JobSpec {
            backoff_limit: Some(0),
            ttl_seconds_after_finished: Some(3600),
            template,
            ..Default::default()
        }),
        status: None,
    }
}

/// The plan Job: makes or checks the collection, diffs the bucket against the catalog, counts.
pub fn plan_job(image_index: &ImageIndex, resolved: &Resolved, name: &str, plan: &PlanFor) -> Job {
    let source = &image_index.spec.source;
    let mut job = task_job(image_index, resolved, name, PLAN, vec!["plan".into()]);
    let spec = job.spec.as_mut().expect("task_job sets a spec");
    spec.active_deadline_seconds = Some(plan.deadline);
    let pod = spec.template.spec.as_mut().expect("pod_template sets a spec");
    // The plan reads the model file's header (its width and preprocessing), not its weights.
    let (volumes, mounts) = volumes(image_index, PLAN_TMP_LIMIT);
    pod.volumes = Some(volumes);
    pod.containers[0].volume_mounts = Some(mounts);
    let env = pod.containers[0].env.as_mut().expect("task_job sets env");
    env.extend([
        var(env::PRECISION, image_index.spec.embedding.precision.to_string()),
        var(env::MAX_DELETE_PERCENT, source.max_delete_percent.to_string()),
    ]);
    if source.allow_mass_deletion {
        env.push(var(env::ALLOW_MASS_DELETE, "true"));
    }
    let generations = &image_index.spec.generations;
    env.push(var(env::GENERATION_GRACE, generations.grace_seconds.to_string()));
    if generations.keep {
        env.push(var(env::GENERATION_KEEP, "true"));
    }
    let mut annotations = BTreeMap::from([
        (SPEC_GENERATION.to_string(), image_index.metadata.generation.unwrap_or_default().to_string()),
        (EMBEDDING.to_string(), embedding_hash(image_index, resolved)),
    ]);
    annotations.extend(plan.after_job.clone().map(|j| (AFTER_JOB.to_string(), j)));
    annotations.extend(plan.resync.clone().map(|r| (RESYNC_FOR.to_string(), r)));
    job.metadata.annotations = Some(annotations);
    job
}

pub fn cleanup_name(image_index: &ImageIndex) -> String {
    format!("{}-cleanup", image_index.metadata.name.as_deref().unwrap_or_default())
}

/// The cleanup Job on deletion: drop (`Delete`) or release (`Retain`). Not owned by the
/// ImageIndex: a foreground deletion of it would remove the Job before it ran. The controller
/// deletes it once it has read the report.
pub fn cleanup_job(image_index: &ImageIndex, resolved: &Resolved, catalog_only: bool) -> Job {
    let mut args = vec!["cleanup".to_string()];
    if image_index.spec.deletion_policy == crate::crd::DeletionPolicy::Retain {
        args.push("--retain".into());
    }
    if catalog_only {
        args.push("--catalog-only".into());
    }
    let mut job = task_job(image_index, resolved, &cleanup_name(image_index), CLEANUP, args);
    job.metadata.owner_references = None;
    if let Some(uid) = &image_index.metadata.uid {
        job.metadata.labels.get_or_insert_default().insert(OWNER_UID.into(), uid.clone());
    }
    job.spec.as_mut().expect("task_job sets a spec").active_deadline_seconds = Some(600);
    job
}

/// The search Deployment `<name>-search`: `imageindex serve` behind readiness and liveness probes.
pub fn search_deployment(image_index: &ImageIndex, resolved: &Resolved) -> Deployment {
    let search = &image_index.spec.search;
    let (mut volumes, mut mounts) = volumes(image_index, TMP_LIMIT);
    let mut env = common_env(image_index, resolved);
    let gpu = wants_gpu(search.resources.as_ref());
    let precision = search.precision.unwrap_or(image_index.spec.embedding.precision);
    env.extend([
        var(env::LISTEN, format!("0.0.0.0:{HTTP_PORT}")),
        // A pod told to stop keeps answering while the Service's endpoints drop it (kube-proxy
        // lags the deletion): a rollout, such as a model change's, fails no request.
        var(env::SHUTDOWN_DELAY_SECONDS, SHUTDOWN_DELAY_SECONDS.to_string()),
        var(env::DEVICE, device(gpu)),
        var(env::PRECISION, precision.to_string()),
    ]);
    if precision != image_index.spec.embedding.precision {
        // Asked for in the spec: queries of one precision against the Jobs' vectors of another.
        env.push(var(env::ALLOW_MIXED_PRECISION, "true"));
    }
    if gpu {
        trt_cache(None, &mut env, &mut volumes, &mut mounts);
    }
    // Credentials as files, not env: a rotated Secret reaches mounted files (the kubelet rewrites
    // them) but never a running container's env, and `serve` reads them again (serve/reload.rs).
    let spec = &image_index.spec;
    env.retain(|e| e.name != env::MYSQL_URL && e.name != env::MILVUS_TOKEN);
    let mut secret_files = |name: &str, secret: &str, key: Option<&str>| {
        let dir = format!("{SECRETS_DIR}/{name}");
        volumes.push(Volume {
            name: name.into(),
            secret: Some(SecretVolumeSource {
                secret_name: Some(secret.into()),
                items: key.map(|key| vec![KeyToPath { key: key.into(), path: key.into(), ..Default::default() }]),
                ..Default::default()
            }),
            ..Default::default()
        });
        mounts.push(VolumeMount {
            name: name.into(),
            mount_path: dir.clone(),
            read_only: Some(true),
            ..Default::default()
        });
        dir
    };
    let catalog = &spec.mysql.secret_ref;
    let dir = secret_files("catalog", &catalog.name, Some(&catalog.key));
    env.push(var(env::MYSQL_URL_FILE, format!("{dir}/{}", catalog.key)));
    if let Some(t) = &spec.milvus.credentials_secret_ref {
        let dir = secret_files("milvus", &t.name, Some(&t.key));
        env.push(var(env::MILVUS_TOKEN_FILE, format!("{dir}/{}", t.key)));
    }
    if let Some(name) = &spec.source.credentials_secret {
        env.push(var(env::SOURCE_CREDENTIALS_DIR, secret_files("bucket", name, None)));
    }
    if let Some(t) = &search.token_secret_ref {
        let dir = secret_files("api-token", &t.name, Some(&t.key));
        env.push(var(env::TOKEN_FILE, format!("{dir}/{}", t.key)));
    }
    if let Some(t) = &search.auth.read_token_secret_ref {
        let dir = secret_files("read-token", &t.name, Some(&t.key));
        env.push(var(env::READ_TOKEN_FILE, format!("{dir}/{}", t.key)));
    }
    if search.auth.protects_reads() {
        env.push(var(env::PROTECT_SEARCH, "true"));
    }
    let probe = |path: &str, period: i32, failures: i32| Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::String("http".into()),
            ..Default::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(failures),
        timeout_seconds: Some(3),
        ..Default::default()
    };
    let resources = search.resources.clone().unwrap_or_else(|| ResourceRequirements {
        requests: Some(quantities(&[("cpu", "250m"), ("memory", "512Mi")])),
        limits: Some(quantities(&[("memory", "1536Mi")])),
        ..Default::default()
    });
    let selector = search_selector(image_index);
    let mut template = pod_template(
        image_index,
        "search",
        Container {
            name: "search".into(),
            image: Some(search_image(image_index, resolved)),
            args: Some(vec!["serve".into()]),
            env: Some(env),
            ports: Some(vec![ContainerPort {
                name: Some("http".into()),
                container_port: HTTP_PORT,
                ..Default::default()
            }]),
            readiness_probe: Some(probe("/readyz", 5, 3)),
            liveness_probe: Some(probe("/healthz", 10, 6)),
            // Loading the model and connecting take a while on a cold node.
            startup_probe: Some(probe("/healthz", 2, 60)),
            resources: Some(resources),
            ..Default::default()
        },
        volumes,
        mounts,
    );
    let pod = template.spec.as_mut().expect("pod_template sets a spec");
    pod.containers[0].env_from = None; // the bucket's keys are files here
    search.scheduling.apply(pod);
    pod.topology_spread_constraints = Some(search.topology_spread_constraints.clone().unwrap_or_else(|| {
        // Soft: a one-node cluster still runs every replica.
        ["kubernetes.io/hostname", "topology.kubernetes.io/zone"]
            .map(|key| TopologySpreadConstraint {
                max_skew: 1,
                topology_key: key.into(),
                when_unsatisfiable: "ScheduleAnyway".into(),
                label_selector: Some(LabelSelector { match_labels: Some(selector.clone()), ..Default::default() }),
                ..Default::default()
            })
            .into()
    }));
    Deployment {
        metadata: meta(image_index, search_name(image_index), "search"),
        spec: Some(DeploymentSpec {
            // Autoscaled: not in the applied object, so the HPA's count stands (server-side
            // apply keeps a field another manager also set).
            replicas: (!search.autoscaled).then_some(search.replicas),
            selector: LabelSelector { match_labels: Some(selector), ..Default::default() },
            template,
            ..Default::default()
        }),
        status: None,
    }
}

/// Seconds a search pod goes on answering after SIGTERM (within the 30 s grace period).
const SHUTDOWN_DELAY_SECONDS: u64 = 5;

/// The search pods' PodDisruptionBudget `<name>-search`: a drain or a node upgrade takes one
/// search pod at a time. With one replica that one may go (a budget of zero would block every
/// drain), so search is only as available as its replica count.
pub fn search_pdb(image_index: &ImageIndex) -> PodDisruptionBudget {
    PodDisruptionBudget {
        metadata: meta(image_index, search_name(image_index), "search"),
        spec: Some(PodDisruptionBudgetSpec {
            max_unavailable: Some(IntOrString::Int(1)),
            selector: Some(LabelSelector { match_labels: Some(search_selector(image_index)), ..Default::default() }),
            ..Default::default()
        }),
        status: None,
    }
}

/// The labels that pick the search pods.
fn search_selector(image_index: &ImageIndex) -> BTreeMap<String, String> {
    BTreeMap::from([
        (INSTANCE.to_string(), image_index.metadata.name.clone().unwrap_or_default()),
        (COMPONENT.to_string(), "search".to_string()),
    ])
}

/// The search Service `<name>-search`.
pub fn search_service(image_index: &ImageIndex) -> Service {
    let s = &image_index.spec.search.service;
    let mut metadata = meta(image_index, search_name(image_index), "search");
    metadata.annotations = s.annotations.clone();
    Service {
        metadata,
        spec: Some(ServiceSpec {
            type_: Some(s.kind.as_str().into()),
            selector: Some(search_selector(image_index)),
            ports: Some(vec![ServicePort {
                name: Some("http".into()),
                port: s.port,
                target_port: Some(IntOrString::String("http".into())),
                protocol: Some("TCP".into()),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        status: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn sample(extra: &str) -> ImageIndex {
        let mut image_index: ImageIndex = serde_yaml::from_str(&format!(
            "apiVersion: imageindex.dev/v1alpha1\nkind: ImageIndex\n\
             metadata: {{name: photos, namespace: shop, uid: 1234-abcd, generation: 3}}\n\
             spec:\n  source: {{url: 's3://bucket/photos/', endpoint: 'http://minio:9000', credentialsSecret: s3-keys}}\n  \
             milvus: {{address: 'milvus:19530'}}\n  mysql: {{secretRef: {{name: catalog, key: url}}}}\n{extra}"
        ))
        .unwrap();
        image_index.metadata.generation = Some(3);
        image_index
    }

    fn resolved(indexed: bool) -> Resolved {
        Resolved {
            milvus_url: "http://milvus:19530".into(),
            collection: "shop_photos".into(),
            default_image: "ghcr.io/imageindex/imageindex:0.1.0".into(),
            features: if indexed { ServerFeatures::ALL } else { ServerFeatures::of("1", "20") },
        }
    }

    fn env_of(c: &Container) -> BTreeMap<String, EnvVar> {
        c.env.clone().unwrap().into_iter().map(|e| (e.name.clone(), e)).collect()
    }

    #[test]
    fn job_is_indexed_owned_and_keeps_secrets_out_of_the_spec() {
        let image_index = sample("  embedding: {parallelism: 4, batchSize: 64}\n");
        let job = embed_job(&image_index, &resolved(true), "photos-embed-1", Some(7));
        let spec = job.spec.as_ref().unwrap();
        assert_eq!((spec.completions, spec.parallelism), (Some(4), Some(4)));
        assert_eq!(spec.completion_mode.as_deref(), Some("Indexed"));
        let owner = &job.metadata.owner_references.as_ref().unwrap()[0];
        assert_eq!((owner.kind.as_str(), owner.controller), ("ImageIndex", Some(true)));
        assert_eq!(job.metadata.annotations.as_ref().unwrap()[SPEC_GENERATION], "3");
        let pod = spec.template.spec.as_ref().unwrap();
        assert_eq!(pod.automount_service_account_token, Some(false));
        let c = &pod.containers[0];
        assert_eq!(c.args.as_deref(), Some(&["embed".to_string(), "--json".to_string()][..]));
        let env = env_of(c);
        assert_eq!(env["IMAGEINDEX_SHARDS"].value.as_deref(), Some("4"));
        assert_eq!(
            env["IMAGEINDEX_PLAN"].value.as_deref(),
            Some("7"),
            "the shards carry out the plan that found the work"
        );
        assert_eq!(env["IMAGEINDEX_BATCH_SIZE"].value.as_deref(), Some("64"));
        assert_eq!(env["IMAGEINDEX_DEVICE"].value.as_deref(), Some("cpu"));
        assert_eq!(env["IMAGEINDEX_S3_ENDPOINT"].value.as_deref(), Some("http://minio:9000"));
        let mysql = &env["IMAGEINDEX_MYSQL_URL"];
        assert!(mysql.value.is_none());
        assert_eq!(mysql.value_from.as_ref().unwrap().secret_key_ref.as_ref().unwrap().name, "catalog");
        assert_eq!(c.env_from.as_ref().unwrap()[0].secret_ref.as_ref().unwrap().name, "s3-keys");
        let sc = c.security_context.as_ref().unwrap();
        assert_eq!((sc.read_only_root_filesystem, sc.allow_privilege_escalation), (Some(true), Some(false)));
    }

    /// A Job cannot wedge the index: a deadline, per-shard retries, disruptions (spot nodes)
    /// not counted, and a configuration error (exit 78) failing it at once.
    #[test]
    fn jobs_that_cannot_wedge_the_index() {
        let image_index = sample("  embedding: {parallelism: 4, activeDeadlineSeconds: 7200}\n");
        let spec = embed_job(&image_index, &resolved(true), "j", None).spec.unwrap();
        assert_eq!(spec.active_deadline_seconds, Some(7200));
        assert_eq!((spec.backoff_limit, spec.backoff_limit_per_index), (None, Some(3)));
        let rules = spec.pod_failure_policy.unwrap().rules;
        let fail = rules.iter().find(|r| r.action == "FailJob").unwrap().on_exit_codes.clone().unwrap();
        assert_eq!((fail.container_name.as_deref(), fail.values), (Some("embed"), vec![78]));
        let ignore = rules.iter().find(|r| r.action == "Ignore").unwrap().on_pod_conditions.clone().unwrap();
        assert_eq!(ignore[0].type_, "DisruptionTarget");
        assert_eq!(spec.template.spec.unwrap().restart_policy.as_deref(), Some("Never"), "podFailurePolicy needs it");
        assert_eq!(
            ServerFeatures::of("1", "20"),
            ServerFeatures { indexed: false, pod_failure_policy: false, backoff_limit_per_index: false, pdb: false }
        );
        assert_eq!(
            ServerFeatures::of("1", "27+"),
            ServerFeatures { indexed: true, pod_failure_policy: true, backoff_limit_per_index: false, pdb: true }
        );
        assert_eq!(ServerFeatures::of("1", "33"), ServerFeatures::ALL);
    }

    #[test]
    fn without_indexed_jobs_one_pod_embeds_everything() {
        let image_index = sample("  embedding: {parallelism: 4}\n");
        let job = embed_job(&image_index, &resolved(false), "j", None);
        let spec = job.spec.unwrap();
        assert_eq!((spec.completions, spec.completion_mode), (Some(1), None));
        // 1.20: a plain backoff limit, no pod failure policy; the deadline is there on any server.
        assert_eq!((spec.backoff_limit, spec.backoff_limit_per_index), (Some(3), None));
        assert!(spec.pod_failure_policy.is_none());
        assert_eq!(spec.active_deadline_seconds, Some(24 * 3600));
        let env = env_of(&spec.template.spec.unwrap().containers[0]);
        assert_eq!(env["IMAGEINDEX_SHARDS"].value.as_deref(), Some("1"));
    }

    #[test]
    fn a_gpu_limit_runs_on_cuda_with_the_spec_scheduling() {
        let image_index = sample(
            "  embedding:\n    resources: {limits: {nvidia.com/gpu: 1}}\n    nodeSelector: {pool: gpu}\n    \
             tolerations: [{key: nvidia.com/gpu, operator: Exists, effect: NoSchedule}]\n    image: my/embed:cuda\n    \
             precision: fp16\n    engineCacheClaim: trt-engines\n",
        );
        let job = embed_job(&image_index, &resolved(true), "j", None);
        let pod = job.spec.unwrap().template.spec.unwrap();
        let c = &pod.containers[0];
        assert_eq!(env_of(c)["IMAGEINDEX_DEVICE"].value.as_deref(), Some("cuda"));
        assert_eq!(env_of(c)["IMAGEINDEX_PRECISION"].value.as_deref(), Some("fp16"));
        let cache = env_of(c)["IMAGEINDEX_TRT_CACHE"].value.clone().unwrap();
        let mount =
            c.volume_mounts.iter().flatten().find(|m| m.mount_path == cache).expect("the engine cache is mounted");
        let vol = pod.volumes.iter().flatten().find(|v| v.name == mount.name).unwrap();
        assert_eq!(vol.persistent_volume_claim.as_ref().unwrap().claim_name, "trt-engines");
        assert_eq!(c.image.as_deref(), Some("my/embed:cuda"));
        assert_eq!(c.resources.as_ref().unwrap().limits.as_ref().unwrap()[GPU], Quantity("1".into()));
        assert_eq!(pod.node_selector.unwrap()["pool"], "gpu");
        assert_eq!(pod.tolerations.unwrap()[0].key.as_deref(), Some(GPU));
    }

    #[test]
    fn a_model_on_a_pvc_is_mounted_read_only() {
        let image_index = sample("  embedding: {modelUri: 'pvc://models/resnet50/v2.onnx'}\n");
        let job = embed_job(&image_index, &resolved(true), "j", None);
        let pod = job.spec.unwrap().template.spec.unwrap();
        let vol = pod.volumes.unwrap().into_iter().find(|v| v.name == "model").unwrap();
        let pvc = vol.persistent_volume_claim.unwrap();
        assert_eq!((pvc.claim_name.as_str(), pvc.read_only), ("models", Some(true)));
        assert_eq!(
            env_of(&pod.containers[0])["IMAGEINDEX_MODEL"].value.as_deref(),
            Some("/models/pvc/resnet50/v2.onnx")
        );
        // The plan Job reads the same file's header (its vector width and preprocessing), and
        // passes a declared preprocessing on, as every pod does.
        let image_index = sample("  embedding: {modelUri: 'pvc://models/m.onnx', preprocess: clip}\n");
        let for_ = PlanFor { after_job: None, resync: None, deadline: 900 };
        let pod = plan_job(&image_index, &resolved(true), "p", &for_).spec.unwrap().template.spec.unwrap();
        let c = &pod.containers[0];
        let mount = c.volume_mounts.as_ref().unwrap().iter().find(|m| m.name == "model").unwrap();
        assert_eq!((mount.mount_path.as_str(), mount.read_only), (PVC_MOUNT, Some(true)));
        assert!(pod.volumes.unwrap().iter().any(|v| v.name == "model" && v.persistent_volume_claim.is_some()));
        assert!(c.volume_mounts.as_ref().unwrap().iter().any(|m| m.mount_path == "/tmp"), "and its /tmp still");
        // Its /tmp holds the sort of a large listing; the others' stay small.
        let tmp_limit = |pod: &k8s_openapi::api::core::v1::PodSpec| {
            let tmp = pod.volumes.as_ref().unwrap().iter().find(|v| v.name == "tmp").unwrap();
            tmp.empty_dir.as_ref().unwrap().size_limit.clone().unwrap().0
        };
        let pod = plan_job(&image_index, &resolved(true), "p", &for_).spec.unwrap().template.spec.unwrap();
        assert_eq!(tmp_limit(&pod), PLAN_TMP_LIMIT);
        assert_eq!(env_of(c)["IMAGEINDEX_PREPROCESS"].value.as_deref(), Some("clip"));
        assert_eq!(env_of(c)["IMAGEINDEX_MODEL"].value.as_deref(), Some("/models/pvc/m.onnx"));
    }

    #[test]
    fn search_auth_mounts_the_read_token_and_protects_reads() {
        let open = search_deployment(&sample(""), &resolved(true));
        let env = env_of(&open.spec.unwrap().template.spec.unwrap().containers[0]);
        assert!(!env.contains_key(env::PROTECT_SEARCH) && !env.contains_key(env::READ_TOKEN_FILE), "open by default");
        let spec = "  search:\n    tokenSecretRef: {name: api, key: write}\n    auth: {readTokenSecretRef: {name: api, key: read}}\n";
        let d = search_deployment(&sample(spec), &resolved(true));
        let pod = d.spec.unwrap().template.spec.unwrap();
        let env = env_of(&pod.containers[0]);
        assert_eq!(env[env::PROTECT_SEARCH].value.as_deref(), Some("true"), "a read token protects the reads");
        assert_eq!(env[env::READ_TOKEN_FILE].value.as_deref(), Some("/var/run/secrets/imageindex/read-token/read"));
        assert_eq!(env[env::TOKEN_FILE].value.as_deref(), Some("/var/run/secrets/imageindex/api-token/write"));
        let volume = pod.volumes.unwrap().into_iter().find(|v| v.name == "read-token").unwrap().secret.unwrap();
        assert_eq!((volume.secret_name.as_deref(), volume.items.unwrap()[0].key.as_str()), (Some("api"), "read"));
        // `reads: token` alone: the write token admits them.
        let d = search_deployment(&sample("  search: {auth: {reads: token}}\n"), &resolved(true));
        let env = env_of(&d.spec.unwrap().template.spec.unwrap().containers[0]);
        assert_eq!(env[env::PROTECT_SEARCH].value.as_deref(), Some("true"));
    }

    #[test]
    fn search_deployment_probes_and_hardening() {
        let image_index = sample("  search: {replicas: 2, tokenSecretRef: {name: api, key: token}}\n");
        let d = search_deployment(&image_index, &resolved(true));
        assert_eq!(d.metadata.name.as_deref(), Some("photos-search"));
        let spec = d.spec.unwrap();
        assert_eq!(spec.replicas, Some(2));
        let pod = spec.template.spec.unwrap();
        assert_eq!(pod.automount_service_account_token, Some(false));
        assert_eq!(pod.security_context.unwrap().run_as_non_root, Some(true));
        let c = &pod.containers[0];
        assert_eq!(c.readiness_probe.as_ref().unwrap().http_get.as_ref().unwrap().path.as_deref(), Some("/readyz"));
        assert_eq!(c.liveness_probe.as_ref().unwrap().http_get.as_ref().unwrap().path.as_deref(), Some("/healthz"));
        assert_eq!(c.security_context.as_ref().unwrap().read_only_root_filesystem, Some(true));
        let env = env_of(c);
        assert_eq!(env["IMAGEINDEX_TOKEN_FILE"].value.as_deref(), Some("/var/run/secrets/imageindex/api-token/token"));
        assert_eq!(env["IMAGEINDEX_LISTEN"].value.as_deref(), Some("0.0.0.0:8080"));
        // Credentials as files that a rotated Secret updates, never env that stays as it was.
        assert!(!env.contains_key(env::MYSQL_URL) && c.env_from.is_none(), "{env:?}");
        assert_eq!(env[env::MYSQL_URL_FILE].value.as_deref(), Some("/var/run/secrets/imageindex/catalog/url"));
        assert_eq!(env[env::SOURCE_CREDENTIALS_DIR].value.as_deref(), Some("/var/run/secrets/imageindex/bucket"),);
        let volumes = pod.volumes.as_ref().unwrap();
        let secret = |name: &str| {
            let v = volumes.iter().find(|v| v.name == name).unwrap_or_else(|| panic!("volume {name}"));
            v.secret.as_ref().unwrap().secret_name.clone().unwrap()
        };
        assert_eq!(
            (secret("catalog"), secret("bucket"), secret("api-token")),
            ("catalog".into(), "s3-keys".into(), "api".into())
        );
        let mounted: Vec<_> =
            c.volume_mounts.as_ref().unwrap().iter().map(|m| (m.name.as_str(), m.read_only)).collect();
        for name in ["catalog", "bucket", "api-token"] {
            assert!(mounted.contains(&(name, Some(true))), "{name} in {mounted:?}");
        }
        assert!(env.values().all(|e| !e.value.as_deref().unwrap_or_default().contains("pass")));
        // The selector must match the template's labels, or the apiserver refuses the Deployment.
        let tpl = spec.template.metadata.unwrap().labels.unwrap();
        assert!(spec.selector.match_labels.unwrap().iter().all(|(k, v)| tpl.get(k) == Some(v)));
    }

    #[test]
    fn pod_settings_reach_the_pods_they_are_for() {
        let image_index = sample(
            "  serviceAccountName: bucket-reader\n  imagePullSecrets: [{name: registry}]\n  \
             embedding: {priorityClassName: batch-low, runtimeClassName: nvidia, affinity: {nodeAffinity: \
             {requiredDuringSchedulingIgnoredDuringExecution: {nodeSelectorTerms: [{matchExpressions: \
             [{key: gpu, operator: Exists}]}]}}}}\n  \
             search: {replicas: 3, priorityClassName: web-high, topologySpreadConstraints: [{maxSkew: 2, \
             topologyKey: zone, whenUnsatisfiable: DoNotSchedule}], service: {annotations: {lb: internal}}}\n",
        );
        let r = resolved(true);
        let pods = [
            ("embed", embed_job(&image_index, &r, "e", None).spec.unwrap().template.spec.unwrap()),
            ("plan", plan_job(&image_index, &r, "p", &PlanFor::default()).spec.unwrap().template.spec.unwrap()),
            ("cleanup", cleanup_job(&image_index, &r, false).spec.unwrap().template.spec.unwrap()),
            ("search", search_deployment(&image_index, &r).spec.unwrap().template.spec.unwrap()),
        ];
        for (what, pod) in &pods {
            assert_eq!(pod.service_account_name.as_deref(), Some("bucket-reader"), "{what}");
            assert_eq!(pod.image_pull_secrets.as_ref().unwrap()[0].name, "registry", "{what}");
            assert_eq!(pod.automount_service_account_token, Some(false), "{what}: no API token");
        }
        let embed = &pods[0].1;
        assert_eq!(
            (embed.priority_class_name.as_deref(), embed.runtime_class_name.as_deref()),
            (Some("batch-low"), Some("nvidia"))
        );
        assert!(embed.affinity.as_ref().unwrap().node_affinity.is_some());
        let search = &pods[3].1;
        assert_eq!(
            (search.priority_class_name.as_deref(), search.runtime_class_name.as_deref()),
            (Some("web-high"), None)
        );
        assert!(search.affinity.is_none(), "the Jobs' affinity is theirs alone");
        let spread = search.topology_spread_constraints.as_ref().unwrap();
        assert_eq!((spread.len(), spread[0].max_skew, spread[0].topology_key.as_str()), (1, 2, "zone"));
        let service = search_service(&image_index);
        assert_eq!(service.metadata.annotations.unwrap()["lb"], "internal");
    }

    #[test]
    fn search_disruptions_take_one_pod_at_a_time() {
        let image_index = sample("  search: {replicas: 3}\n");
        let pdb = search_pdb(&image_index);
        assert_eq!(pdb.metadata.name.as_deref(), Some("photos-search"));
        assert_eq!(pdb.metadata.owner_references.as_ref().unwrap()[0].kind, "ImageIndex");
        let spec = pdb.spec.unwrap();
        assert_eq!(spec.max_unavailable, Some(IntOrString::Int(1)));
        let pods = search_deployment(&image_index, &resolved(true)).spec.unwrap().template.metadata.unwrap();
        let labels = pods.labels.unwrap();
        assert!(spec.selector.unwrap().match_labels.unwrap().iter().all(|(k, v)| labels.get(k) == Some(v)));
        assert!(!ServerFeatures::of("1", "20").pdb && ServerFeatures::of("1", "21").pdb);
    }

    #[test]
    fn search_spreads_softly_and_leaves_an_autoscaled_count_alone() {
        let d = search_deployment(&sample("  search: {replicas: 3}\n"), &resolved(true)).spec.unwrap();
        assert_eq!(d.replicas, Some(3));
        let spread = d.template.spec.unwrap().topology_spread_constraints.unwrap();
        assert_eq!(
            spread.iter().map(|c| (c.topology_key.as_str(), c.when_unsatisfiable.as_str())).collect::<Vec<_>>(),
            [("kubernetes.io/hostname", "ScheduleAnyway"), ("topology.kubernetes.io/zone", "ScheduleAnyway")]
        );
        assert_eq!(spread[0].label_selector.as_ref().unwrap().match_labels, d.selector.match_labels);
        let d = search_deployment(&sample("  search: {replicas: 3, autoscaled: true}\n"), &resolved(true));
        assert_eq!(d.spec.unwrap().replicas, None, "an HPA owns the count");
        // Not even as null: a null in a server-side apply would claim the field.
        let applied =
            serde_json::to_value(search_deployment(&sample("  search: {autoscaled: true}\n"), &resolved(true)));
        assert!(applied.unwrap()["spec"].get("replicas").is_none());
    }

    #[test]
    fn search_pods_choose_their_own_device_image_and_precision() {
        let search = |extra: &str| {
            let cuda =
                "  embedding: {image: my/embed:cuda, precision: fp16, resources: {limits: {nvidia.com/gpu: 1}}}\n";
            let d = search_deployment(&sample(&format!("{cuda}{extra}")), &resolved(true));
            let pod = d.spec.unwrap().template.spec.unwrap();
            (env_of(&pod.containers[0]), pod.containers[0].image.clone().unwrap(), pod)
        };
        let value = |env: &BTreeMap<String, EnvVar>, k: &str| env.get(k).and_then(|e| e.value.clone());
        // CUDA Jobs, search unset: the Jobs' image and precision, but on the CPU. The CUDA image
        // sets IMAGEINDEX_DEVICE=cuda itself, so the pod must say cpu, or it fails on a CPU node.
        let (env, image, pod) = search("");
        assert_eq!(value(&env, "IMAGEINDEX_DEVICE").as_deref(), Some("cpu"));
        assert_eq!(value(&env, "IMAGEINDEX_PRECISION").as_deref(), Some("fp16"));
        assert!(!env.contains_key("IMAGEINDEX_ALLOW_MIXED_PRECISION") && !env.contains_key("IMAGEINDEX_TRT_CACHE"));
        assert_eq!((image.as_str(), pod.node_selector), ("my/embed:cuda", None));
        // Their own image, precision (mixing asked for, so allowed) and placement.
        let (env, image, pod) = search(
            "  search: {image: my/search:cpu, precision: fp32, nodeSelector: {pool: web}, \
             tolerations: [{key: spot, operator: Exists}]}\n",
        );
        assert_eq!(value(&env, "IMAGEINDEX_PRECISION").as_deref(), Some("fp32"));
        assert_eq!(value(&env, "IMAGEINDEX_ALLOW_MIXED_PRECISION").as_deref(), Some("true"));
        assert_eq!(image, "my/search:cpu");
        assert_eq!(pod.node_selector.unwrap()["pool"], "web");
        assert_eq!(pod.tolerations.unwrap()[0].key.as_deref(), Some("spot"));
        // A MIG slice is a GPU: CUDA, with somewhere writable for TensorRT's engines.
        let (env, _, pod) = search("  search: {resources: {limits: {nvidia.com/mig-1g.10gb: 1}}}\n");
        assert_eq!(value(&env, "IMAGEINDEX_DEVICE").as_deref(), Some("cuda"));
        let cache = value(&env, "IMAGEINDEX_TRT_CACHE").unwrap();
        assert!(pod.containers[0].volume_mounts.iter().flatten().any(|m| m.mount_path == cache));
        // No image named anywhere: the operator's own, for both.
        let plain = sample("");
        let job = embed_job(&plain, &resolved(true), "j", None).spec.unwrap().template.spec.unwrap();
        let d = search_deployment(&plain, &resolved(true)).spec.unwrap().template.spec.unwrap();
        for c in [&job.containers[0], &d.containers[0]] {
            assert_eq!(c.image.as_deref(), Some("ghcr.io/imageindex/imageindex:0.1.0"));
            assert_eq!(value(&env_of(c), "IMAGEINDEX_DEVICE").as_deref(), Some("cpu"));
        }
        let mig = sample("  embedding: {resources: {limits: {nvidia.com/mig-3g.40gb: 1}}}\n");
        let job = embed_job(&mig, &resolved(true), "j", None).spec.unwrap().template.spec.unwrap();
        assert_eq!(value(&env_of(&job.containers[0]), "IMAGEINDEX_DEVICE").as_deref(), Some("cuda"));
    }

    #[test]
    fn every_variable_the_pods_get_is_one_the_binary_reads() {
        let mut image_index = sample(
            "  embedding:\n    resources: {limits: {nvidia.com/gpu: 1}}\n  search: {tokenSecretRef: {name: api, key: token}, \
             precision: int8, resources: {limits: {nvidia.com/gpu: 1}}}\n",
        );
        image_index.spec.milvus.credentials_secret_ref =
            Some(SecretKeyRef { name: "milvus".into(), key: "token".into() });
        let reads = crate::cli::Args::env_vars();
        let job = embed_job(&image_index, &resolved(true), "j", None).spec.unwrap().template;
        let search = search_deployment(&image_index, &resolved(true)).spec.unwrap().template;
        let plan = plan_job(&image_index, &resolved(true), "p", &PlanFor::default()).spec.unwrap().template;
        let cleanup = cleanup_job(&image_index, &resolved(true), false).spec.unwrap().template;
        let mut set = 0;
        for pod in [job, search, plan, cleanup] {
            for e in pod.spec.unwrap().containers[0].env.clone().unwrap() {
                assert!(reads.contains(&e.name) || e.name == env::LOG, "pods get {} but no flag reads it", e.name);
                set += 1;
            }
        }
        assert!(set > 40, "only {set} variables checked");
        assert!(reads.contains(env::SHARD) && reads.contains(env::MODEL), "{reads:?}");
    }

    #[test]
    fn plan_and_cleanup_jobs_report_through_the_termination_message() {
        let image_index =
            sample("  embedding:\n    resources: {limits: {nvidia.com/gpu: 1}}\n    nodeSelector: {gpu: \"yes\"}\n");
        let mut image_index = image_index;
        image_index.spec.source.allow_mass_deletion = true;
        let for_ = PlanFor { after_job: Some("photos-embed-1".into()), resync: Some("now".into()), deadline: 900 };
        let job = plan_job(&image_index, &resolved(true), "photos-plan-1", &for_);
        let a = job.metadata.annotations.clone().unwrap();
        assert_eq!((a[AFTER_JOB].as_str(), a[RESYNC_FOR].as_str()), ("photos-embed-1", "now"));
        assert_eq!(a[EMBEDDING], embedding_hash(&image_index, &resolved(true)));
        assert_eq!(job.metadata.labels.as_ref().unwrap()[COMPONENT], PLAN);
        let spec = job.spec.unwrap();
        assert_eq!((spec.backoff_limit, spec.active_deadline_seconds), (Some(0), Some(900)), "the controller retries");
        let pod = spec.template.spec.unwrap();
        let c = &pod.containers[0];
        assert_eq!(c.args.as_deref(), Some(&["plan".to_string()][..]));
        assert_eq!(c.termination_message_policy.as_deref(), Some("File"));
        let env = env_of(c);
        let value = |env: &BTreeMap<String, EnvVar>, k: &str| env.get(k).and_then(|e| e.value.clone());
        assert_eq!(value(&env, env::REPORT).as_deref(), c.termination_message_path.as_deref());
        assert_eq!(value(&env, env::ALLOW_MASS_DELETE).as_deref(), Some("true"));
        // Retired generations are dropped by plans after the spec's grace period, or kept.
        assert_eq!(value(&env, env::GENERATION_GRACE).as_deref(), Some("300"));
        assert_eq!(value(&env, env::GENERATION_KEEP), None);
        let mut keeping = image_index.clone();
        keeping.spec.generations = crate::crd::GenerationsSpec { keep: true, grace_seconds: 30 };
        let kept = plan_job(&keeping, &resolved(true), "photos-plan-2", &for_).spec.unwrap().template.spec.unwrap();
        let kept = env_of(&kept.containers[0]);
        assert_eq!(value(&kept, env::GENERATION_GRACE).as_deref(), Some("30"));
        assert_eq!(value(&kept, env::GENERATION_KEEP).as_deref(), Some("true"));
        assert!(env[env::MYSQL_URL].value_from.is_some(), "credentials from the Secret, never in the spec");
        // No GPU, no GPU node, no model volume: it only lists and counts.
        assert!(c.resources.as_ref().unwrap().limits.as_ref().unwrap().keys().all(|k| !k.contains("nvidia")));
        assert_eq!((pod.node_selector, pod.volumes.unwrap().len()), (None, 1));
        let mut deleted = image_index.clone();
        deleted.spec.deletion_policy = crate::crd::DeletionPolicy::Delete;
        let cleanup = cleanup_job(&deleted, &resolved(true), true);
        assert!(cleanup.metadata.owner_references.is_none(), "a foreground deletion would take it first");
        let args = cleanup.spec.unwrap().template.spec.unwrap().containers[0].args.clone().unwrap();
        assert_eq!(args, ["cleanup", "--catalog-only"]);
        let mut retained = image_index.clone();
        retained.spec.deletion_policy = crate::crd::DeletionPolicy::Retain;
        let args = cleanup_job(&retained, &resolved(true), false).spec.unwrap().template.spec.unwrap().containers[0]
            .args
            .clone();
        assert_eq!(args.unwrap(), ["cleanup", "--retain"]);
    }

    #[test]
    fn only_what_names_this_imageindex_is_ours() {
        let image_index = sample("");
        let resolved = resolved(true);
        // What the builders make is ours: by owner reference, or (the cleanup Job) by label.
        assert!(is_ours(&search_deployment(&image_index, &resolved).metadata, &image_index));
        assert!(is_ours(&search_service(&image_index).metadata, &image_index));
        assert!(is_ours(&cleanup_job(&image_index, &resolved, false).metadata, &image_index));
        // Someone else's `photos-search`, with our labels even, is not.
        let mut theirs = search_deployment(&image_index, &resolved).metadata;
        theirs.owner_references = None;
        assert!(!is_ours(&theirs, &image_index));
        // Nor what an ImageIndex of the same name made before (another UID), nor a reference
        // that is not the controller's.
        let mut other = image_index.clone();
        other.metadata.uid = Some("5678-ef01".into());
        assert!(!is_ours(&search_service(&other).metadata, &image_index));
        assert!(!is_ours(&cleanup_job(&other, &resolved, false).metadata, &image_index));
        let mut shared = search_service(&image_index).metadata;
        shared.owner_references.as_mut().unwrap()[0].controller = None;
        assert!(!is_ours(&shared, &image_index));
    }

    #[test]
    fn only_what_changes_the_vectors_changes_the_embedding_hash() {
        let base = embedding_hash(&sample(""), &resolved(true));
        let job = embed_job(&sample(""), &resolved(true), "j", None);
        assert_eq!(job.metadata.annotations.unwrap()[EMBEDDING], base);
        for same in [
            "  search: {replicas: 5}\n",
            "  embedding: {parallelism: 8, resources: {limits: {memory: 4Gi}}}\n",
            "  deletionPolicy: Delete\n",
        ] {
            assert_eq!(embedding_hash(&sample(same), &resolved(true)), base, "{same}");
        }
        for other in [
            "  embedding: {batchSize: 32}\n",
            "  embedding: {precision: int8}\n",
            "  embedding: {modelUri: /models/other.onnx}\n",
            "  embedding: {image: my/embed:2}\n",
        ] {
            assert_ne!(embedding_hash(&sample(other), &resolved(true)), base, "{other}");
        }
        let mut ivf = sample("");
        ivf.spec.milvus.index.kind = crate::core::IndexKind::IvfFlat;
        assert_ne!(embedding_hash(&ivf, &resolved(true)), base);
        let mut moved = sample("");
        moved.spec.source.url = "s3://bucket/elsewhere/".into();
        assert_ne!(embedding_hash(&moved, &resolved(true)), base);
        let elsewhere = Resolved { collection: "other".into(), ..resolved(true) };
        assert_ne!(embedding_hash(&sample(""), &elsewhere), base);
    }

    #[test]
    fn service_and_endpoint_agree() {
        let image_index = sample("  search: {service: {type: LoadBalancer, port: 8000}}\n");
        let s = search_service(&image_index);
        let spec = s.spec.unwrap();
        assert_eq!(spec.type_.as_deref(), Some("LoadBalancer"));
        assert_eq!(spec.ports.unwrap()[0].port, 8000);
        assert_eq!(endpoint(&image_index), "http://photos-search.shop.svc:8000");
    }
}
