//! The builders' unit tests: the objects as the apiserver will get them.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Container, EnvVar};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::contract::env;
use crate::crd::{ImageIndex, SecretKeyRef};

use super::job::*;
use super::pod::*;
use super::search::*;
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
    assert_eq!(env["IMAGEINDEX_PLAN"].value.as_deref(), Some("7"), "the shards carry out the plan that found the work");
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
    let mount = c.volume_mounts.iter().flatten().find(|m| m.mount_path == cache).expect("the engine cache is mounted");
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
    assert_eq!(env_of(&pod.containers[0])["IMAGEINDEX_MODEL"].value.as_deref(), Some("/models/pvc/resnet50/v2.onnx"));
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
    let mounted: Vec<_> = c.volume_mounts.as_ref().unwrap().iter().map(|m| (m.name.as_str(), m.read_only)).collect();
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
    assert_eq!((search.priority_class_name.as_deref(), search.runtime_class_name.as_deref()), (Some("web-high"), None));
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
    let applied = serde_json::to_value(search_deployment(&sample("  search: {autoscaled: true}\n"), &resolved(true)));
    assert!(applied.unwrap()["spec"].get("replicas").is_none());
}

#[test]
fn search_pods_choose_their_own_device_image_and_precision() {
    let search = |extra: &str| {
        let cuda = "  embedding: {image: my/embed:cuda, precision: fp16, resources: {limits: {nvidia.com/gpu: 1}}}\n";
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
    image_index.spec.milvus.credentials_secret_ref = Some(SecretKeyRef { name: "milvus".into(), key: "token".into() });
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
    let args =
        cleanup_job(&retained, &resolved(true), false).spec.unwrap().template.spec.unwrap().containers[0].args.clone();
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
