//! The search objects: the Deployment running `imageindex serve`, its PodDisruptionBudget, and
//! its Service.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec};
use k8s_openapi::api::core::v1::{
    Container, ContainerPort, EnvVar, HTTPGetAction, KeyToPath, Probe, ResourceRequirements, SecretVolumeSource,
    Service, ServicePort, ServiceSpec, TopologySpreadConstraint, Volume, VolumeMount,
};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::contract::env;
use crate::crd::ImageIndex;

use super::pod::*;
use super::*;

const HTTP_PORT: i32 = 8080;
/// Where search pods find their credentials, one folder per Secret.
const SECRETS_DIR: &str = "/var/run/secrets/imageindex";

/// The search Deployment `<name>-search`: `imageindex serve` behind readiness and liveness probes.
pub fn search_deployment(image_index: &ImageIndex, resolved: &Resolved) -> Deployment {
    let search = &image_index.spec.search;
    let (mut volumes, mut mounts) = volumes(image_index, TMP_LIMIT);
    let env = search_env(image_index, resolved, &mut volumes, &mut mounts);
    let selector = search_selector(image_index);
    let container = search_container(image_index, resolved, env);
    let mut template = pod_template(image_index, "search", container, volumes, mounts);
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

/// The search pods' environment, with the Secret volumes it names added to `volumes` and
/// `mounts`. Credentials are files, not env: a rotated Secret reaches mounted files (the kubelet
/// rewrites them) but never a running container's env, and `serve` reads them again
/// (serve/reload.rs).
fn search_env(
    image_index: &ImageIndex,
    resolved: &Resolved,
    volumes: &mut Vec<Volume>,
    mounts: &mut Vec<VolumeMount>,
) -> Vec<EnvVar> {
    let (spec, search) = (&image_index.spec, &image_index.spec.search);
    let mut env = common_env(image_index, resolved);
    let gpu = wants_gpu(search.resources.as_ref());
    let precision = search.precision.unwrap_or(spec.embedding.precision);
    env.extend([
        var(env::LISTEN, format!("0.0.0.0:{HTTP_PORT}")),
        // A pod told to stop keeps answering while the Service's endpoints drop it (kube-proxy
        // lags the deletion): a rollout, such as a model change's, fails no request.
        var(env::SHUTDOWN_DELAY_SECONDS, SHUTDOWN_DELAY_SECONDS.to_string()),
        var(env::DEVICE, device(gpu)),
        var(env::PRECISION, precision.to_string()),
    ]);
    if precision != spec.embedding.precision {
        // Asked for in the spec: queries of one precision against the Jobs' vectors of another.
        env.push(var(env::ALLOW_MIXED_PRECISION, "true"));
    }
    if gpu {
        trt_cache(None, &mut env, volumes, mounts);
    }
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
    env
}

/// The search container: `imageindex serve` on the http port, behind its probes.
fn search_container(image_index: &ImageIndex, resolved: &Resolved, env: Vec<EnvVar>) -> Container {
    let search = &image_index.spec.search;
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
    Container {
        name: "search".into(),
        image: Some(search_image(image_index, resolved)),
        args: Some(vec!["serve".into()]),
        env: Some(env),
        ports: Some(vec![ContainerPort { name: Some("http".into()), container_port: HTTP_PORT, ..Default::default() }]),
        readiness_probe: Some(probe("/readyz", 5, 3)),
        liveness_probe: Some(probe("/healthz", 10, 6)),
        // Loading the model and connecting take a while on a cold node.
        startup_probe: Some(probe("/healthz", 2, 60)),
        resources: Some(resources),
        ..Default::default()
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
