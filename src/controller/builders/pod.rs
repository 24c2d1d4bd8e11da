//! The pod every Job and the search Deployment share: the container's environment (the
//! settings, the credentials as Secret references), the volumes, the security context, GPUs.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Capabilities, Container, EmptyDirVolumeSource, EnvFromSource, EnvVar, EnvVarSource,
    PersistentVolumeClaimVolumeSource, PodSecurityContext, PodSpec, PodTemplateSpec, ResourceRequirements,
    SeccompProfile, SecretEnvSource, SecretKeySelector, SecurityContext, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use crate::contract::env;
use crate::crd::{ImageIndex, SecretKeyRef};

use super::{Resolved, labels};

pub(super) const PVC_MOUNT: &str = "/models/pvc";
/// The non-root user of the image (distroless `nonroot`).
pub(super) const UID: i64 = 65532;
pub(super) const GPU: &str = "nvidia.com/gpu";
pub(super) const MIG: &str = "nvidia.com/mig-";
const TRT_CACHE: &str = "/var/cache/imageindex/trt";

pub(super) fn var(name: &str, value: impl Into<String>) -> EnvVar {
    EnvVar { name: name.into(), value: Some(value.into()), ..Default::default() }
}

/// An env var read from a Secret key: the value never appears in the pod spec.
pub(super) fn secret_env(name: &str, key_ref: &SecretKeyRef) -> EnvVar {
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
pub(super) fn model_location(uri: &str) -> (String, Option<(String, String)>) {
    match uri.strip_prefix("pvc://").and_then(|rest| rest.split_once('/')) {
        Some((claim, path)) => (format!("{PVC_MOUNT}/{path}"), Some((claim.to_string(), path.to_string()))),
        None => (uri.to_string(), None),
    }
}

/// A whole GPU (`nvidia.com/gpu`) or a MIG slice of one (`nvidia.com/mig-1g.10gb`).
pub(super) fn wants_gpu(resources: Option<&ResourceRequirements>) -> bool {
    resources
        .and_then(|requirements| requirements.limits.as_ref())
        .is_some_and(|l| l.keys().any(|k| k == GPU || k.starts_with(MIG)))
}

/// Every pod says which device it runs the model on: an image's own default (the CUDA image's
/// `cuda`) must never decide it, or a search pod on a CPU node fails to start.
pub(super) fn device(gpu: bool) -> &'static str {
    if gpu { "cuda" } else { "cpu" }
}

/// TensorRT's engines (used where the image has its libraries), kept on a claim if given.
pub(super) fn trt_cache(
    claim: Option<&String>,
    env: &mut Vec<EnvVar>,
    volumes: &mut Vec<Volume>,
    mounts: &mut Vec<VolumeMount>,
) {
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
pub(super) fn common_env(image_index: &ImageIndex, resolved: &Resolved) -> Vec<EnvVar> {
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
pub(super) fn env_from(image_index: &ImageIndex) -> Option<Vec<EnvFromSource>> {
    image_index.spec.source.credentials_secret.as_ref().map(|name| {
        vec![EnvFromSource {
            secret_ref: Some(SecretEnvSource { name: name.clone(), optional: Some(false) }),
            ..Default::default()
        }]
    })
}

/// Non-root, no privilege escalation, no capabilities, read-only root filesystem.
pub(super) fn container_security() -> SecurityContext {
    SecurityContext {
        allow_privilege_escalation: Some(false),
        read_only_root_filesystem: Some(true),
        run_as_non_root: Some(true),
        capabilities: Some(Capabilities { drop: Some(vec!["ALL".into()]), ..Default::default() }),
        ..Default::default()
    }
}

pub(super) fn pod_security() -> PodSecurityContext {
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
pub(super) const TMP_LIMIT: &str = "1Gi";
/// The plan's `/tmp`: it sorts the listing there (`sync::sorted`), about 100 bytes an object
/// beyond the first 100,000, so 10Gi holds a bucket of about 100 million objects. A limit, not a
/// reservation: a small bucket uses none of it.
pub(super) const PLAN_TMP_LIMIT: &str = "10Gi";

/// `/tmp`, writable under a read-only root.
pub(super) fn tmp(limit: &str) -> (Volume, VolumeMount) {
    let volume = Volume {
        name: "tmp".into(),
        empty_dir: Some(EmptyDirVolumeSource { size_limit: Some(Quantity(limit.into())), ..Default::default() }),
        ..Default::default()
    };
    (volume, VolumeMount { name: "tmp".into(), mount_path: "/tmp".into(), ..Default::default() })
}

/// `/tmp` (of `tmp_limit`) and the model's PVC, if any.
pub(super) fn volumes(image_index: &ImageIndex, tmp_limit: &str) -> (Vec<Volume>, Vec<VolumeMount>) {
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

pub(super) fn quantities(pairs: &[(&str, &str)]) -> BTreeMap<String, Quantity> {
    pairs.iter().map(|(k, v)| (k.to_string(), Quantity(v.to_string()))).collect()
}

/// The Jobs' image: the spec's, or the operator's own.
pub(super) fn embed_image(image_index: &ImageIndex, resolved: &Resolved) -> String {
    image_index.spec.embedding.image.clone().unwrap_or_else(|| resolved.default_image.clone())
}

/// The search pods' image: their own, else the Jobs' (it carries the model they use).
pub(super) fn search_image(image_index: &ImageIndex, resolved: &Resolved) -> String {
    image_index.spec.search.image.clone().unwrap_or_else(|| embed_image(image_index, resolved))
}

/// The pod the Job and the Deployment both run: one imageindex container, hardened, with the
/// source's credentials and the volumes set here once.
pub(super) fn pod_template(
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
