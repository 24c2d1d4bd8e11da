//! The Jobs: the embedding Job (Indexed, one shard per pod), and the short plan and cleanup Jobs
//! that run `imageindex plan` and `imageindex cleanup` and report in their termination message.

use std::collections::BTreeMap;

use k8s_openapi::api::batch::v1::{
    Job, JobSpec, PodFailurePolicy, PodFailurePolicyOnExitCodesRequirement, PodFailurePolicyOnPodConditionsPattern,
    PodFailurePolicyRule,
};
use k8s_openapi::api::core::v1::{Container, ResourceRequirements};

use crate::contract::env;
use crate::crd::ImageIndex;

use super::pod::*;
use super::*;

/// Where the plan and cleanup pods write their report: the kubelet's termination message.
const TERMINATION_LOG: &str = "/dev/termination-log";

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
