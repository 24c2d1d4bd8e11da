//! Reconcile paths against a mock Kubernetes API (kube's `tower-test` pattern: the client talks to
//! an in-process service that answers like an apiserver and records every request), with the real
//! local Milvus, MariaDB and S3 behind the data-plane steps. Where a test turns `kubelet` on, the
//! mock plays the kubelet and Job controller for the plan and cleanup Jobs: it runs the Job's
//! command with the pod's env (Secrets resolved from the mock's, or the pod left waiting with
//! `CreateContainerConfigError` as a kubelet would), and keeps the Job and pod with their status
//! and the report in the termination message. One test per condition reason.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use http::{Method, Request, Response};
use kube::Client;
use kube::client::Body;
use kube::runtime::controller::Action;
use kube::runtime::events::{Recorder, Reporter};
use serde_json::{Value, json};

use imageindex::controller::metrics::Metrics;
use imageindex::controller::reconcile::{Context, Error, Settings, reconcile};
use imageindex::crd::{ImageIndex, ImageIndexStatus, Phase};

use super::support::{Fixture, env, model, run_like_the_image, upload_photos};
use imageindex::sync::{SyncOptions, sync};

/// What the fake apiserver holds.
#[derive(Clone, Default)]
struct Cluster {
    /// Paths containing one of these are refused with 403, as RBAC would.
    forbidden: Vec<&'static str>,
    secrets: BTreeMap<String, Value>,
    milvus: Option<Value>,
    jobs: Vec<Value>,
    pods: Vec<Value>,
    /// Run the plan and cleanup Jobs when they are created (see the module's doc).
    kubelet: bool,
    available_replicas: i32,
    /// The search Deployment, where a GET should find it (a deletion waits for it to go).
    search: Option<Value>,
    /// The ImageIndex is no longer on the server (a reconcile queued before its finalizer went).
    gone: bool,
}

#[derive(Clone, Debug)]
struct Call {
    method: Method,
    path: String,
    body: Value,
}

fn not_found(path: &str) -> (u16, Value) {
    (
        404,
        json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404, "message": format!("{path} not found")}),
    )
}

impl Cluster {
    fn secret(mut self, name: &str, data: Value) -> Self {
        let data: BTreeMap<String, String> = serde_json::from_value::<BTreeMap<String, String>>(data)
            .unwrap()
            .into_iter()
            .map(|(k, v)| (k, base64::engine::general_purpose::STANDARD.encode(v)))
            .collect();
        self.secrets.insert(
            name.into(),
            json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name}, "data": data}),
        );
        self
    }

    fn answer(&mut self, method: &Method, path: &str, query: &str, body: &Value) -> (u16, Value) {
        let last = path.rsplit('/').next().unwrap_or_default();
        if self.forbidden.iter().any(|f| path.contains(f)) {
            let msg = format!("{path} is forbidden: User \"system:serviceaccount:x:y\" cannot get resource");
            return (
                403,
                json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Forbidden", "code": 403, "message": msg}),
            );
        }
        match (method.as_str(), path) {
            ("GET", p) if p.contains("/secrets/") => {
                self.secrets.get(last).cloned().map(|s| (200, s)).unwrap_or_else(|| not_found(p))
            }
            ("GET", p) if p.contains("/milvuses/") => {
                self.milvus.clone().map(|m| (200, m)).unwrap_or_else(|| not_found(p))
            }
            ("GET", p) if p.ends_with("/jobs") => {
                let items: Vec<&Value> = self.jobs.iter().filter(|j| selects(query, j)).collect();
                (200, json!({"kind": "JobList", "apiVersion": "batch/v1", "metadata": {}, "items": items}))
            }
            ("GET", p) if p.contains("/jobs/") => self
                .jobs
                .iter()
                .find(|j| j["metadata"]["name"] == last)
                .cloned()
                .map(|j| (200, j))
                .unwrap_or_else(|| not_found(p)),
            ("GET", p) if p.contains("/services/") || p.contains("/poddisruptionbudgets/") => not_found(p),
            ("GET", p) if p.ends_with("/pods") => {
                let items: Vec<&Value> = self.pods.iter().filter(|j| selects(query, j)).collect();
                (200, json!({"kind": "PodList", "apiVersion": "v1", "metadata": {}, "items": items}))
            }
            ("DELETE", p) if p.contains("/jobs/") => {
                self.jobs.retain(|j| j["metadata"]["name"] != last);
                self.pods.retain(|p| p["metadata"]["labels"]["job-name"] != last);
                (200, json!({"kind": "Status", "apiVersion": "v1", "status": "Success", "code": 200}))
            }
            ("DELETE", p) if p.contains("/deployments/") => {
                (200, json!({"kind": "Status", "apiVersion": "v1", "status": "Success", "code": 200}))
            }
            ("GET", p) if p.contains("/deployments/") => {
                self.search.clone().map(|d| (200, d)).unwrap_or_else(|| not_found(p))
            }
            ("PATCH", p) if p.contains("/jobs/") => {
                // Kept, like an apiserver would: the next reconcile lists it as running.
                let mut j = body.clone();
                j["metadata"]["creationTimestamp"] = json!("2026-11-24T00:00:00Z");
                self.jobs.retain(|x| x["metadata"]["name"] != j["metadata"]["name"]);
                let component = j["metadata"]["labels"]["app.kubernetes.io/component"].clone();
                if self.kubelet && (component == "plan" || component == "cleanup") {
                    self.run_task(&mut j);
                }
                self.jobs.push(j.clone());
                (200, j)
            }
            ("PATCH", p) if p.contains("/deployments/") => {
                let mut d = body.clone();
                d["status"] = json!({"availableReplicas": self.available_replicas});
                (200, d)
            }
            ("GET", p) if p.ends_with("/imageindexes/photos") => {
                if self.gone {
                    return not_found(p);
                }
                // As the reconciled object has it: deleting, waiting on the finalizer.
                let meta = json!({"name": "photos", "namespace": "shop", "uid": "6f1c-0001",
                    "deletionTimestamp": "2026-11-24T00:00:00Z", "finalizers": ["imageindex.dev/cleanup"]});
                (
                    200,
                    json!({"apiVersion": "imageindex.dev/v1alpha1", "kind": "ImageIndex", "metadata": meta, "spec": sample_spec()}),
                )
            }
            ("PATCH", p) if p.contains("/imageindexes/") && !p.ends_with("/status") => {
                // The finalizer helper's JSON patch: answer with the finalizer removed.
                (
                    200,
                    json!({"apiVersion": "imageindex.dev/v1alpha1", "kind": "ImageIndex", "metadata": {"name": "photos", "namespace": "shop", "finalizers": []}, "spec": sample_spec()}),
                )
            }
            ("PATCH", p) if p.ends_with("/status") => {
                // Server-side apply of the status: answer with the whole object.
                let mut ii = body.clone();
                ii["metadata"] = json!({"name": "photos", "namespace": "shop"});
                ii["spec"] = sample_spec();
                (200, ii)
            }
            ("PATCH", _) => (200, body.clone()),
            ("POST", p) if p.ends_with("/events") => (201, body.clone()),
            (m, p) => panic!("unexpected request {m} {p}"),
        }
    }
}

impl Cluster {
    /// The kubelet's and Job controller's part for a plan or cleanup Job: its pod, run with the
    /// pod's env; the pod's status and the Job's as they would be.
    fn run_task(&mut self, job: &mut Value) {
        let name = job["metadata"]["name"].as_str().unwrap().to_string();
        let container = &job["spec"]["template"]["spec"]["containers"][0];
        let state = match self.pod_env(container) {
            Err(message) => json!({"waiting": {"reason": "CreateContainerConfigError", "message": message}}),
            Ok(vars) => {
                let report = std::env::temp_dir().join(format!("mock-{name}-{}.report", super::support::nanos()));
                let mut vars: BTreeMap<String, String> = vars.into_iter().collect();
                vars.insert("IMAGEINDEX_REPORT".into(), report.display().to_string());
                vars.insert("IMAGEINDEX_IO_TIMEOUT".into(), "5".into());
                let args: Vec<String> = serde_json::from_value(container["args"].clone()).unwrap_or_default();
                let out = run_like_the_image(&args, &vars).output().unwrap();
                let message = std::fs::read_to_string(&report).unwrap_or_default();
                let _ = std::fs::remove_file(&report);
                json!({"terminated": {"exitCode": out.status.code().unwrap_or(137), "message": message}})
            }
        };
        let mut labels = job["spec"]["template"]["metadata"]["labels"].clone();
        labels["job-name"] = json!(name);
        self.pods.retain(|p| p["metadata"]["labels"]["job-name"] != name.as_str());
        self.pods.push(json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": format!("{name}-pod"), "namespace": "shop", "labels": labels, "creationTimestamp": "2026-11-24T00:00:00Z"},
            "status": {"containerStatuses": [{"name": container["name"], "image": "i", "imageID": "", "ready": false,
                "restartCount": 0, "state": state}]}}));
        let Some(code) = state["terminated"]["exitCode"].as_i64() else { return };
        let now = k8s_openapi::jiff::Timestamp::now().to_string();
        job["status"] = if code == 0 {
            json!({"succeeded": 1, "completionTime": now, "conditions": [{"type": "Complete", "status": "True", "lastTransitionTime": now}]})
        } else {
            json!({"failed": 1, "conditions": [{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded", "lastTransitionTime": now}]})
        };
    }

    /// The pod's env as the kubelet builds it, or its message for a Secret or key that is missing.
    fn pod_env(&self, container: &Value) -> Result<Vec<(String, String)>, String> {
        let secret = |name: &str| -> Result<BTreeMap<String, String>, String> {
            let data = self.secrets.get(name).ok_or_else(|| format!("secret \"{name}\" not found"))?["data"].clone();
            let data: BTreeMap<String, String> = serde_json::from_value(data).unwrap_or_default();
            Ok(data
                .into_iter()
                .map(|(k, v)| {
                    (k, String::from_utf8(base64::engine::general_purpose::STANDARD.decode(v).unwrap()).unwrap())
                })
                .collect())
        };
        let mut vars = vec![];
        for from in container["envFrom"].as_array().into_iter().flatten() {
            vars.extend(secret(from["secretRef"]["name"].as_str().unwrap())?);
        }
        for e in container["env"].as_array().into_iter().flatten() {
            let value = match (e["value"].as_str(), &e["valueFrom"]["secretKeyRef"]) {
                (Some(v), _) => v.to_string(),
                (None, r) => {
                    let (name, key) = (r["name"].as_str().unwrap(), r["key"].as_str().unwrap());
                    secret(name)?.remove(key).ok_or_else(|| format!("couldn't find key {key} in Secret shop/{name}"))?
                }
            };
            vars.push((e["name"].as_str().unwrap().to_string(), value));
        }
        Ok(vars)
    }
}

/// Whether `object` matches the `labelSelector` in `query` (equality terms, as the reconciler sends).
fn selects(query: &str, object: &Value) -> bool {
    let selector = query.split('&').find_map(|kv| kv.strip_prefix("labelSelector=")).unwrap_or_default();
    let selector = selector.replace("%3D", "=").replace("%2C", ",").replace("%2F", "/");
    selector.split(',').filter(|t| !t.is_empty()).all(|term| {
        let (k, v) = term.split_once('=').unwrap();
        object["metadata"]["labels"][k] == v
    })
}

/// A client whose every request goes to `cluster`, and the log of those requests.
fn mock(mut cluster: Cluster) -> (Client, Arc<Mutex<Vec<Call>>>) {
    let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let calls = Arc::new(Mutex::new(Vec::new()));
    let log = calls.clone();
    tokio::spawn(async move {
        while let Some((request, send)) = handle.next_request().await {
            let (parts, body) = request.into_parts();
            let bytes = body.collect_bytes().await.unwrap();
            let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
            let path = parts.uri.path().to_string();
            let query = parts.uri.query().unwrap_or_default().to_string();
            let (code, answer) = cluster.answer(&parts.method, &path, &query, &body);
            log.lock().unwrap().push(Call { method: parts.method, path, body });
            send.send_response(
                Response::builder().status(code).body(Body::from(serde_json::to_vec(&answer).unwrap())).unwrap(),
            );
        }
    });
    (Client::new(service, "default"), calls)
}

fn sample_spec() -> Value {
    json!({"source": {"url": "s3://imageindex-test/none/"}, "milvus": {"address": "127.0.0.1:1"}, "mysql": {"secretRef": {"name": "catalog"}}})
}

/// An ImageIndex as the apiserver would hand it over: named, with a uid, a generation and our finalizer.
fn imageindex(spec: Value, deleting: bool) -> ImageIndex {
    let mut meta = json!({"name": "photos", "namespace": "shop", "uid": "6f1c-0001", "generation": 2, "resourceVersion": "7", "finalizers": ["imageindex.dev/cleanup"]});
    if deleting {
        meta["deletionTimestamp"] = json!("2026-11-24T00:00:00Z");
    }
    serde_json::from_value(
        json!({"apiVersion": "imageindex.dev/v1alpha1", "kind": "ImageIndex", "metadata": meta, "spec": spec}),
    )
    .unwrap()
}

async fn run(ii: ImageIndex, cluster: Cluster) -> (Action, Vec<Call>) {
    let (result, calls) = settle(ii, cluster, 1).await;
    (result.expect("reconcile"), calls)
}

/// `times` reconciles of `ii` by one controller, each given the status the one before wrote (as
/// the informer would hand it over): the last one's result, and every request. With `kubelet`,
/// the first starts a plan (or cleanup) Job and the next reads its report.
async fn settle(mut ii: ImageIndex, cluster: Cluster, times: usize) -> (Result<Action, Error>, Vec<Call>) {
    let (ctx, log) = controller(cluster);
    let mut result = None;
    for _ in 0..times {
        result = Some(reconcile(Arc::new(ii.clone()), ctx.clone()).await);
        if let Some(st) = last_status(&log.lock().unwrap()) {
            ii.status = Some(st);
        }
    }
    let calls = log.lock().unwrap().clone();
    (result.expect("at least one reconcile"), calls)
}

/// The reconciler's context over a fake apiserver holding `cluster`, and the log of its requests.
fn controller(cluster: Cluster) -> (Arc<Context>, Arc<Mutex<Vec<Call>>>) {
    imageindex::install_crypto();
    let (client, calls) = mock(cluster);
    let settings = Settings {
        default_image: "imageindex:test".into(),
        features: imageindex::controller::builders::ServerFeatures::ALL,
        plan_timeout: Duration::from_secs(300),
        cleanup_timeout: Duration::from_secs(600),
        policy: Default::default(),
    };
    let recorder = Recorder::new(client.clone(), Reporter { controller: "test".into(), instance: None });
    (Arc::new(Context::new(client, settings, recorder, Arc::new(Metrics::default()))), calls)
}

/// The status the reconcile wrote.
fn written(calls: &[Call]) -> ImageIndexStatus {
    last_status(calls).expect("a status write")
}

fn last_status(calls: &[Call]) -> Option<ImageIndexStatus> {
    let call = calls.iter().rev().find(|c| c.method == Method::PATCH && c.path.ends_with("/status"))?;
    Some(serde_json::from_value(call.body["status"].clone()).unwrap())
}

/// Whether the reconciler applied a Job whose name starts with `prefix` (`photos-plan`, `photos-embed`).
fn applied_job<'a>(calls: &'a [Call], prefix: &str) -> Option<&'a Call> {
    calls.iter().find(|c| c.method == Method::PATCH && c.path.contains(&format!("/jobs/{prefix}")))
}

fn reason(st: &ImageIndexStatus, t: &str) -> (String, String) {
    let c = st.conditions.iter().find(|c| c.type_ == t).unwrap_or_else(|| panic!("no {t} in {:?}", st.conditions));
    (c.status.clone(), c.reason.clone())
}

fn pair(s: &str, r: &str) -> (String, String) {
    (s.to_string(), r.to_string())
}

fn requeues(a: &Action) -> bool {
    format!("{a:?}").contains("requeue_after: Some")
}

#[tokio::test]
async fn invalid_spec_fails_and_waits_for_a_change() {
    let mut spec = sample_spec();
    spec["milvus"]["ref"] = json!({"name": "m"}); // and `address`: exactly one may be set
    let (action, calls) = run(imageindex(spec, false), Cluster::default()).await;
    let st = written(&calls);
    assert_eq!(st.phase, Some(Phase::Failed));
    assert_eq!(reason(&st, "MilvusReady"), pair("Unknown", "InvalidSpec"));
    assert!(!requeues(&action));
    assert_eq!(st.observed_generation, Some(2));
}

#[tokio::test]
async fn milvus_ref_not_found_or_not_ready_is_a_condition_and_a_requeue() {
    let mut spec = sample_spec();
    spec["milvus"] = json!({"ref": {"name": "vectors", "namespace": "milvus"}});
    let (action, calls) = run(imageindex(spec.clone(), false), Cluster::default()).await;
    let st = written(&calls);
    assert_eq!(reason(&st, "MilvusReady"), pair("False", "MilvusNotFound"));
    assert_eq!(reason(&st, "CollectionReady"), pair("Unknown", "WaitingForDependencies"));
    assert_eq!(st.phase, Some(Phase::Pending));
    assert!(requeues(&action));
    assert!(calls.iter().any(|c| c.path == "/apis/milvus.io/v1beta1/namespaces/milvus/milvuses/vectors"));

    let pending = json!({"apiVersion": "milvus.io/v1beta1", "kind": "Milvus", "metadata": {"name": "vectors", "namespace": "milvus"},
        "status": {"status": "Pending", "conditions": [{"type": "MilvusReady", "status": "False"}]}});
    let (action, calls) = run(imageindex(spec, false), Cluster { milvus: Some(pending), ..Default::default() }).await;
    assert_eq!(reason(&written(&calls), "MilvusReady"), pair("False", "MilvusNotReady"));
    assert!(requeues(&action));
    let event = calls.iter().find(|c| c.path.ends_with("/events")).expect("an event");
    assert!(event.body["note"].as_str().unwrap().contains("not MilvusReady (Pending)"), "{}", event.body);
}

/// The ref resolves to the Milvus Service, and the plan Job is given that address (this machine
/// cannot resolve it). A NodePort Milvus has no `status.endpoint`: before, it was NotReady for ever.
#[tokio::test]
async fn a_ready_milvus_ref_resolves_to_its_in_cluster_service() {
    let mut spec = sample_spec();
    spec["milvus"] = json!({"ref": {"name": "vectors"}});
    for endpoint in [json!("vectors-milvus.shop:19530"), Value::Null] {
        let ready = json!({"apiVersion": "milvus.io/v1beta1", "kind": "Milvus", "metadata": {"name": "vectors", "namespace": "shop"},
            "status": {"status": "Healthy", "endpoint": endpoint, "conditions": [{"type": "MilvusReady", "status": "True"}]}});
        let (action, calls) =
            run(imageindex(spec.clone(), false), Cluster { milvus: Some(ready), ..Default::default() }).await;
        let plan = applied_job(&calls, "photos-plan-").expect("a plan Job");
        let env = &plan.body["spec"]["template"]["spec"]["containers"][0]["env"];
        let url =
            env.as_array().unwrap().iter().find(|e| e["name"] == "IMAGEINDEX_MILVUS_URL").expect("the Milvus URL");
        assert_eq!(url["value"], "http://vectors-milvus.shop.svc:19530", "endpoint {endpoint}");
        assert!(requeues(&action));
    }
}

/// A Kubernetes API failure (here RBAC refusing the Jobs) is on the resource: Ready=False,
/// KubernetesAPIError, with the API's message. Before, the reconcile returned before its status
/// write, and only the logs knew.
#[tokio::test]
async fn api_errors_reach_the_status() {
    let cluster = Cluster { forbidden: vec!["/jobs"], ..Default::default() };
    let (result, calls) = settle(imageindex(sample_spec(), false), cluster, 1).await;
    assert!(result.is_err(), "still an error, for the backoff");
    let st = written(&calls);
    assert_eq!(reason(&st, "Ready"), pair("False", "KubernetesAPIError"));
    let msg = &st.conditions.iter().find(|c| c.type_ == "Ready").unwrap().message;
    assert!(msg.contains("forbidden"), "{msg}");
}

/// The controller reads no Secret: the plan pod cannot start without it, and the kubelet's
/// message becomes the condition of what needs it.
#[tokio::test]
async fn secret_missing_or_without_the_key() {
    let cluster = Cluster { kubelet: true, ..Default::default() };
    let (action, calls) = settle(imageindex(sample_spec(), false), cluster.clone(), 2).await;
    let st = written(&calls);
    assert_eq!(reason(&st, "CollectionReady"), pair("False", "SecretNotFound"));
    let msg = &st.conditions.iter().find(|c| c.type_ == "CollectionReady").unwrap().message;
    assert!(msg.contains("cannot start") && msg.contains("secret \"catalog\" not found"), "{msg}");
    assert!(requeues(&action.unwrap()));
    assert!(!calls.iter().any(|c| c.path.contains("/secrets")), "the controller read a Secret");

    let cluster = cluster.secret("catalog", json!({"password": "x"}));
    let (_, calls) = settle(imageindex(sample_spec(), false), cluster, 2).await;
    assert_eq!(reason(&written(&calls), "CollectionReady"), pair("False", "SecretKeyMissing"));
}

/// A spec on the real local services, in a fresh collection and bucket prefix.
fn live_spec(fx: &Fixture) -> Value {
    json!({"source": {"url": fx.source_url, "endpoint": env("IMAGEINDEX_S3_ENDPOINT"), "credentialsSecret": "s3-keys"},
           "milvus": {"address": env("IMAGEINDEX_MILVUS_URL"), "collection": fx.name},
           "mysql": {"secretRef": {"name": "catalog"}},
           "embedding": {"modelUri": model_uri()}})
}

/// The test model as the Job's image would hold it (the collection records its file name).
fn model_uri() -> String {
    let model = env("IMAGEINDEX_MODEL");
    format!("/models/{}", std::path::Path::new(&model).file_name().unwrap().to_string_lossy())
}

/// The real services' Secrets, and the kubelet on.
fn live_cluster() -> Cluster {
    let keys = json!({"AWS_ACCESS_KEY_ID": env("AWS_ACCESS_KEY_ID"), "AWS_SECRET_ACCESS_KEY": env("AWS_SECRET_ACCESS_KEY"), "AWS_REGION": "us-east-1"});
    Cluster { available_replicas: 1, kubelet: true, ..Default::default() }
        .secret("catalog", json!({"url": env("IMAGEINDEX_MYSQL_URL")}))
        .secret("s3-keys", keys)
}

/// The Job the controller applied, as the Job controller leaves it once it completes.
fn completed(applied: &Value) -> Value {
    let now = k8s_openapi::jiff::Timestamp::now().to_string();
    let mut j = applied.clone();
    j["metadata"]["creationTimestamp"] = json!("2026-11-24T00:00:00Z");
    j["status"] = json!({"succeeded": 1, "completionTime": now,
        "conditions": [{"type": "Complete", "status": "True", "lastTransitionTime": now}]});
    j
}

/// The embedding hash the controller gives a Job for `spec` (see `builders::embedding_hash`).
fn embedding_of(spec: &Value) -> String {
    use imageindex::controller::builders::{Resolved, embedding_hash};
    let ii = imageindex(spec.clone(), false);
    let resolved = Resolved {
        milvus_url: imageindex::controller::reconcile::validate::address(spec["milvus"]["address"].as_str().unwrap()),
        collection: ii.collection(),
        default_image: String::new(),
        features: imageindex::controller::builders::ServerFeatures::ALL,
    };
    embedding_hash(&ii, &resolved)
}

/// The controller owner reference of the ImageIndex `photos` (uid 6f1c-0001).
static OWNED_BY_PHOTOS: std::sync::LazyLock<Value> = std::sync::LazyLock::new(|| {
    json!({"apiVersion": "imageindex.dev/v1alpha1", "kind": "ImageIndex", "name": "photos", "uid": "6f1c-0001",
        "controller": true, "blockOwnerDeletion": true})
});

/// An embedding Job of `photos` for `generation`, running or ended with `condition`.
fn job(name: &str, generation: i64, condition: Option<(&str, &str)>) -> Value {
    let conditions: Vec<Value> = condition
        .map(|(t, msg)| json!({"type": t, "status": "True", "message": msg, "lastTransitionTime": k8s_openapi::jiff::Timestamp::now().to_string()}))
        .into_iter()
        .collect();
    json!({"apiVersion": "batch/v1", "kind": "Job",
        "metadata": {"name": name, "namespace": "shop", "annotations": {"imageindex.dev/generation": generation.to_string()},
            "ownerReferences": [OWNED_BY_PHOTOS.clone()],
            "labels": {"app.kubernetes.io/instance": "photos", "app.kubernetes.io/component": "embed"},
            "creationTimestamp": "2026-11-24T00:00:00Z"},
        "spec": {"completions": 1, "template": {"spec": {"containers": []}}},
        "status": {"succeeded": if conditions.iter().any(|c| c["type"] == "Complete") { 1 } else { 0 },
                   "completionTime": conditions.first().map(|c| c["lastTransitionTime"].clone()), "conditions": conditions}})
}

/// A Job the controller made for `spec`, failed.
fn failed_job(spec: &Value, why: &str) -> Value {
    let mut j = job("photos-embed-1", 2, Some(("Failed", why)));
    j["metadata"]["annotations"]["imageindex.dev/embedding"] = json!(embedding_of(spec));
    j
}

/// What the plan Job found unreachable is the condition of what needs it, and the next plan
/// waits (backoff) rather than running in a loop.
#[tokio::test(flavor = "multi_thread")]
async fn mysql_and_source_unavailable() {
    let fx = Fixture::new("mock_down");
    let down = live_cluster().secret("catalog", json!({"url": "mysql://u:p@127.0.0.1:1/db"}));
    let (action, calls) = settle(imageindex(live_spec(&fx), false), down, 2).await;
    assert_eq!(reason(&written(&calls), "CollectionReady"), pair("False", "MySQLUnavailable"));
    assert!(requeues(&action.unwrap()));

    let mut spec = live_spec(&fx);
    spec["source"]["endpoint"] = json!("http://127.0.0.1:1");
    let (action, calls) = settle(imageindex(spec, false), live_cluster(), 2).await;
    let st = written(&calls);
    assert_eq!(reason(&st, "CollectionReady"), pair("True", "Ready"));
    assert_eq!(reason(&st, "Indexed"), pair("False", "SourceUnavailable"));
    assert!(requeues(&action.unwrap()));
    assert_eq!(calls.iter().filter(|c| applied_job(std::slice::from_ref(c), "photos-plan-").is_some()).count(), 1);
    fx.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn happy_path_plans_then_embeds_then_reports_ready() {
    let fx = Fixture::new("mock_happy");
    fx.source
        .put("a.png", std::fs::read(format!("{}/tests/fixtures/logo.png", env!("CARGO_MANIFEST_DIR"))).unwrap().into())
        .await
        .unwrap();

    // The first reconcile starts a plan: it makes the collection and lists the bucket. Nothing is
    // served before there is a collection.
    let (ctx, log) = controller(live_cluster());
    let mut ii = imageindex(live_spec(&fx), false);
    reconcile(Arc::new(ii.clone()), ctx.clone()).await.unwrap();
    let calls = std::mem::take(&mut *log.lock().unwrap());
    let planning = written(&calls);
    assert_eq!(reason(&planning, "Indexed"), pair("Unknown", "Planning"));
    assert_eq!(reason(&planning, "SearchReady"), pair("Unknown", "WaitingForDependencies"));
    assert!(applied_job(&calls, "photos-plan-").is_some() && applied_job(&calls, "photos-embed").is_none());
    // The next reads its report: one new object, an embedding Job, the search objects.
    ii.status = Some(planning.clone());
    reconcile(Arc::new(ii.clone()), ctx.clone()).await.unwrap();
    let calls = std::mem::take(&mut *log.lock().unwrap());
    let st = written(&calls);
    assert_eq!(st.phase, Some(Phase::Indexing), "{:#?}", st.conditions);
    assert_eq!(reason(&st, "Indexed"), pair("False", "Indexing"));
    assert_eq!(reason(&st, "SearchReady"), pair("True", "Available"));
    assert_eq!(reason(&st, "CollectionReady"), pair("True", "Ready"));
    assert_eq!((st.images.discovered, st.images.pending), (1, 1));
    let applied_embed = applied_job(&calls, "photos-embed").expect("an embedding Job").clone();
    assert_eq!(applied_embed.body["spec"]["completionMode"], "Indexed");
    assert!(calls.iter().any(|c| c.method == Method::PATCH && c.path.ends_with("/deployments/photos-search")));
    assert!(calls.iter().any(|c| c.method == Method::PATCH && c.path.ends_with("/services/photos-search")));
    assert!(
        calls.iter().any(|c| c.method == Method::PATCH && c.path.ends_with("/poddisruptionbudgets/photos-search")),
        "no PodDisruptionBudget for search"
    );
    // The Job's watch event wakes the reconciler before the informer has our status write: the
    // counts must not fall back to that stale copy's, and no second Job starts.
    reconcile(Arc::new(ii), ctx).await.unwrap();
    let again = log.lock().unwrap().clone();
    let st2 = written(&again);
    assert_eq!((st2.phase, st2.current_job.clone()), (Some(Phase::Indexing), st.current_job.clone()));
    assert_eq!((st2.images.discovered, st2.images.pending), (1, 1));
    assert!(applied_job(&again, "photos-").is_none(), "one Job at a time");

    // The Job completed (as it does: for the ImageIndex that owns the collection), and a plan
    // after it finds nothing pending: Ready, and no new Job.
    let backends = fx.backends(imageindex::core::IndexKind::Hnsw).await;
    let as_job = SyncOptions { owner: imageindex(live_spec(&fx), false).owner(), ..Default::default() };
    sync(&backends, model(), &as_job).await.unwrap();
    let done = completed(&applied_embed.body);
    let cluster = Cluster { jobs: vec![done.clone()], ..live_cluster() };
    let (action, calls) = settle(imageindex(live_spec(&fx), false), cluster.clone(), 2).await;
    let st = written(&calls);
    let action = action.unwrap();
    assert_eq!(st.phase, Some(Phase::Ready), "{:?}", st.conditions);
    assert_eq!(reason(&st, "Indexed"), pair("True", "UpToDate"));
    assert_eq!((st.images.indexed, st.images.pending, st.synced_generation), (1, 0, Some(2)));
    assert_eq!(st.synced_embedding.as_deref(), done["metadata"]["annotations"]["imageindex.dev/embedding"].as_str());
    assert!(requeues(&action), "resyncs on the interval");
    assert!(applied_job(&calls, "photos-embed").is_none(), "no new Job when nothing changed");

    // An edit that changes no vector (search replicas: generation 3) starts no embedding Job;
    // before, every new generation started a full one. One that does (the batch size) starts one.
    let edited = |spec: Value| {
        let mut ii = imageindex(spec, false);
        ii.metadata.generation = Some(3);
        ii.status = Some(st.clone());
        ii
    };
    let mut spec = live_spec(&fx);
    spec["search"] = json!({"replicas": 3});
    let (_, calls) = settle(edited(spec), cluster.clone(), 2).await;
    assert_eq!(reason(&written(&calls), "Indexed"), pair("True", "UpToDate"));
    assert!(applied_job(&calls, "photos-plan-").is_some(), "the new generation is planned");
    assert!(applied_job(&calls, "photos-embed").is_none(), "a replicas edit started an embedding Job");
    let mut spec = live_spec(&fx);
    spec["embedding"]["batchSize"] = json!(4);
    // Suspended, the same edit starts nothing, and the search Deployment is still applied.
    let mut suspended = spec.clone();
    suspended["suspend"] = json!(true);
    let (action, calls) = run(edited(suspended), cluster.clone()).await;
    let st = written(&calls);
    assert_eq!((reason(&st, "Indexed"), st.phase), (pair("False", "Suspended"), Some(Phase::Suspended)));
    assert!(applied_job(&calls, "photos-").is_none(), "a suspended index started a Job");
    assert!(calls.iter().any(|c| c.path.contains("/deployments/photos-search")), "search is left alone");
    assert!(!requeues(&action));
    let (_, calls) = settle(edited(spec), cluster, 2).await;
    assert!(applied_job(&calls, "photos-embed").is_some(), "a batch size edit");

    // The precision changed on a collection of fp32 vectors, or the index type on an HNSW one:
    // the plan begins a new generation beside the serving one (which search goes on reading),
    // the Rebuilding condition says so, and an embedding Job is started to fill it. A build for
    // another setting drops the unfinished one and begins the next.
    let rebuilt = [("embedding", "precision", json!("int8"), 1), ("milvus", "index", json!({"type": "IVF_FLAT"}), 2)];
    for (section, field, value, number) in rebuilt {
        let mut spec = live_spec(&fx);
        spec[section][field] = value;
        let (_, calls) = settle(imageindex(spec, false), live_cluster(), 3).await;
        let st = written(&calls);
        assert_eq!(reason(&st, "CollectionReady"), pair("True", "Ready"), "{field}");
        assert_eq!(reason(&st, "Rebuilding"), pair("True", "Building"), "{field}");
        let g = st.generations.as_ref().expect("status.generations");
        let numbers = (g.serving.as_ref().map(|s| s.number), g.building.as_ref().map(|b| b.number));
        assert_eq!(numbers, (Some(0), Some(number)), "{field}");
        assert!(applied_job(&calls, "photos-embed").is_some(), "an embedding Job fills the new generation");
    }
    fx.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn running_failed_jobs_and_scaled_to_zero() {
    let fx = Fixture::new("mock_jobs");
    // Search is served once a plan has made the collection.
    let made = |spec: Value| {
        let mut ii = imageindex(spec, false);
        ii.status = Some(ImageIndexStatus { collection: Some(ii.collection()), ..Default::default() });
        ii
    };
    // A running Job: Indexing, and no second Job. No search pod is available yet: Unavailable.
    let cluster = Cluster { jobs: vec![job("photos-embed-1", 2, None)], available_replicas: 0, ..live_cluster() };
    let (_, calls) = run(made(live_spec(&fx)), cluster).await;
    let st = written(&calls);
    assert_eq!(st.current_job.as_deref(), Some("photos-embed-1"));
    assert_eq!(reason(&st, "SearchReady"), pair("False", "Unavailable"));
    assert!(applied_job(&calls, "photos-").is_none());

    // The latest Job failed for this generation: JobFailed, Degraded, no retry before the resync.
    let mut spec = live_spec(&fx);
    spec["search"] = json!({"replicas": 0});
    let cluster = Cluster { jobs: vec![failed_job(&spec, "BackoffLimitExceeded")], ..live_cluster() };
    let (_, calls) = run(made(spec), cluster).await;
    let st = written(&calls);
    assert_eq!(reason(&st, "Indexed"), pair("False", "JobFailed"));
    assert_eq!(st.phase, Some(Phase::Degraded));
    assert_eq!(reason(&st, "SearchReady"), pair("False", "ScaledToZero"));
    assert!(applied_job(&calls, "photos-").is_none(), "a failed Job is not retried at once");
    fx.cleanup().await;
}

/// Deleted just now (the fixture's `imageindex(_, true)` was deleted days ago).
fn deleted_now(spec: Value) -> ImageIndex {
    let mut ii = imageindex(spec, true);
    ii.metadata.deletion_timestamp =
        Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(k8s_openapi::jiff::Timestamp::now()));
    ii
}

fn event<'a>(calls: &'a [Call], reason: &str) -> Option<&'a str> {
    calls
        .iter()
        .find(|c| c.path.ends_with("/events") && c.body["reason"] == reason)
        .map(|c| c.body["note"].as_str().unwrap())
}

fn finalizer_removed(calls: &[Call]) -> bool {
    calls.last().is_some_and(|c| c.method == Method::PATCH && c.path.ends_with("/imageindexes/photos"))
}

/// `Delete` stops the Jobs and the search pods in the foreground and drops nothing until they are
/// gone (before: Background deletion and the drop at once, so a starting pod could recreate the
/// collection). A cleanup Job that keeps failing is a Warning and a condition on every try, and
/// after the cleanup timeout the data is kept and the ImageIndex goes (before: silent retries for
/// ever, the namespace stuck Terminating). Credentials that are gone, or the skip annotation, keep
/// the data at once.
#[tokio::test(flavor = "multi_thread")]
async fn deletion_waits_for_its_workloads_and_never_hangs() {
    let fx = Fixture::new("mock_delete");
    upload_photos(&fx, 2).await;
    let mut spec = live_spec(&fx);
    spec["deletionPolicy"] = json!("Delete");
    let b = fx.backends(imageindex::core::IndexKind::Hnsw).await;
    run(imageindex(spec.clone(), false), live_cluster()).await; // the plan claims the collection, makes it
    assert!(b.index.vectors.ready().await.is_ok());

    // A Job and the Deployment still going away: foreground deletions, nothing dropped, Deleting.
    let mut going = job("photos-embed-1", 2, None);
    going["metadata"]["deletionTimestamp"] = json!("2026-12-01T00:00:00Z");
    let search = json!({"apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "photos-search", "uid": "d-1", "ownerReferences": [OWNED_BY_PHOTOS.clone()]}});
    let cluster = Cluster { jobs: vec![going], search: Some(search.clone()), ..live_cluster() };
    let (ctx, log) = controller(cluster);
    let ii = Arc::new(deleted_now(spec.clone()));
    // An error only so that the finalizer stays; the error policy looks again in a few seconds.
    let waiting = reconcile(ii.clone(), ctx.clone()).await.unwrap_err();
    assert!(waiting.is_waiting(), "{waiting}");
    assert_eq!(
        imageindex::controller::reconcile::error_policy(ii, &waiting, ctx),
        Action::requeue(Duration::from_secs(5))
    );
    let calls = log.lock().unwrap().clone();
    for what in ["/jobs/photos-embed-1", "/deployments/photos-search"] {
        let delete = calls.iter().find(|c| c.method == Method::DELETE && c.path.ends_with(what)).expect(what);
        assert_eq!(delete.body["propagationPolicy"], "Foreground", "{what}");
    }
    let st = written(&calls);
    assert_eq!(reason(&st, "Ready"), pair("False", "Deleting"));
    assert_eq!(st.phase, Some(Phase::Deleting));
    let msg = &st.conditions.iter().find(|c| c.type_ == "Ready").unwrap().message;
    assert!(msg.contains("Job photos-embed-1") && msg.contains("Deployment photos-search"), "{msg}");
    assert!(!finalizer_removed(&calls) && applied_job(&calls, "photos-cleanup").is_none());
    assert!(b.index.vectors.ready().await.is_ok(), "dropped while a Job could still write");
    // Only the Deployment left, for longer than the cleanup timeout: the data is kept.
    let cluster = Cluster { search: Some(search), ..live_cluster() };
    let (_, calls) = run(imageindex(spec.clone(), true), cluster).await;
    let note = event(&calls, "CleanupAbandoned").expect("a CleanupAbandoned event");
    assert!(note.contains("are kept") && note.contains("Deployment photos-search"), "{note}");
    assert!(finalizer_removed(&calls) && b.index.vectors.ready().await.is_ok());

    // A reconcile queued before the finalizer went (the watch cache lags): the API no longer has
    // the ImageIndex, so no second cleanup Job starts (it would never be deleted).
    let (ctx, log) = controller(Cluster { gone: true, ..live_cluster() });
    let _ = reconcile(Arc::new(deleted_now(spec.clone())), ctx).await;
    let calls = log.lock().unwrap().clone();
    assert!(applied_job(&calls, "photos-cleanup").is_none(), "a cleanup Job for an ImageIndex that is gone");

    // MySQL unreachable: the cleanup Job fails; an error (for the backoff), a Warning, the condition.
    let down = live_cluster().secret("catalog", json!({"url": "mysql://u:p@127.0.0.1:1/db"}));
    let (result, calls) = settle(deleted_now(spec.clone()), down.clone(), 2).await;
    assert!(result.is_err_and(|e| !e.is_waiting()), "retried");
    assert_eq!(reason(&written(&calls), "Ready"), pair("False", "CleanupFailed"));
    let note = event(&calls, "CleanupFailed").expect("a CleanupFailed event");
    assert!(note.contains("photos-cleanup") && note.contains("retrying for"), "{note}");
    assert!(!finalizer_removed(&calls));
    // Deleted longer ago than the cleanup timeout: given up, kept, the ImageIndex goes.
    let (_, calls) = run(imageindex(spec.clone(), true), down).await;
    assert!(event(&calls, "CleanupAbandoned").is_some() && finalizer_removed(&calls));

    // The Milvus credentials Secret went first (a namespace teardown): the cleanup pod cannot
    // start, so the data is kept, said so. Before, the drop was tried without them (and an
    // authenticating Milvus refused it for ever).
    let mut with_credentials = spec.clone();
    with_credentials["milvus"]["credentialsSecretRef"] = json!({"name": "milvus-user", "key": "token"});
    let (_, calls) = settle(deleted_now(with_credentials), live_cluster(), 2).await;
    let note = event(&calls, "NotDropped").expect("a NotDropped event");
    assert!(note.contains("cannot start") && note.contains("secret \"milvus-user\" not found"), "{note}");
    assert!(finalizer_removed(&calls) && b.index.vectors.ready().await.is_ok());

    // The skip annotation: kept, whatever the policy, at once.
    let mut skip = deleted_now(spec.clone());
    skip.metadata.annotations = Some([("imageindex.dev/skip-cleanup".to_string(), "true".to_string())].into());
    let (_, calls) = run(skip, live_cluster()).await;
    assert!(event(&calls, "CleanupSkipped").is_some() && finalizer_removed(&calls));
    assert!(applied_job(&calls, "photos-").is_none() && b.index.vectors.ready().await.is_ok());

    // Nothing left running: the cleanup Job drops it.
    let (_, calls) = settle(deleted_now(spec), live_cluster(), 2).await;
    assert!(event(&calls, "Deleted").is_some() && finalizer_removed(&calls));
    assert!(b.index.vectors.ready().await.is_err(), "the collection is still there");
    fx.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn deletion_retain_keeps_data_and_delete_tolerates_what_is_gone() {
    let running = vec![job("photos-embed-1", 2, None)];
    let cluster = Cluster { kubelet: true, jobs: running, ..Default::default() }
        .secret("catalog", json!({"url": env("IMAGEINDEX_MYSQL_URL")}));
    let (_, calls) = settle(deleted_now(sample_spec()), cluster, 3).await;
    let stopped = |c: &&Call| c.method == Method::DELETE && c.path.ends_with("/jobs/photos-embed-1");
    assert!(calls.iter().any(|c| stopped(&c)), "running Jobs are stopped");
    let cleanup = applied_job(&calls, "photos-cleanup").expect("a cleanup Job");
    assert!(cleanup.body["spec"]["template"]["spec"]["containers"][0]["args"].to_string().contains("--retain"));
    assert!(event(&calls, "Retained").is_some(), "the claim is released");
    assert!(!calls.iter().any(|c| c.method == Method::DELETE && !c.path.contains("/jobs")), "Retain deletes nothing");
    assert!(finalizer_removed(&calls), "the finalizer is removed last");

    // Delete, with the Milvus CR and the Secret already gone: whose the collection is cannot be
    // read, so nothing is dropped; it says so, and the finalizer goes.
    let mut spec = sample_spec();
    spec["deletionPolicy"] = json!("Delete");
    spec["milvus"] = json!({"ref": {"name": "gone"}});
    let (_, calls) = settle(deleted_now(spec), Cluster { kubelet: true, ..Default::default() }, 2).await;
    assert!(event(&calls, "NotDropped").is_some_and(|n| n.contains("cannot start")));
    assert!(finalizer_removed(&calls));
}

/// `Delete` drops only a collection this ImageIndex owns: one that another holds (their names
/// collided, or it was named on purpose) is kept, with a Warning. Before, it was dropped.
#[tokio::test(flavor = "multi_thread")]
async fn deletion_drops_only_what_this_imageindex_owns() {
    let fx = Fixture::new("mock_owner");
    upload_photos(&fx, 2).await;
    let mut spec = live_spec(&fx);
    spec["deletionPolicy"] = json!("Delete");
    // Another index made and owns the collection.
    let other = SyncOptions { owner: "ImageIndex team/a-photos (uid 2)".into(), ..Default::default() };
    let b = fx.backends(imageindex::core::IndexKind::Hnsw).await;
    assert_eq!(sync(&b, model(), &other).await.unwrap().indexed, 2);
    let (_, calls) = settle(deleted_now(spec.clone()), live_cluster(), 2).await;
    let note = event(&calls, "NotDropped").expect("a NotDropped event");
    assert!(note.contains("belongs to ImageIndex team/a-photos (uid 2)"), "{note}");
    assert!(finalizer_removed(&calls));
    assert_eq!(b.index.vectors.count().await.unwrap(), 2, "another's collection was dropped");
    assert_eq!(b.index.catalog.counts().await.unwrap().indexed, 2);

    // Its own (planned once: claimed for its UID), it is dropped.
    b.index.catalog.release(&other.owner).await.unwrap();
    run(imageindex(spec.clone(), false), live_cluster()).await;
    let (_, calls) = settle(deleted_now(spec), live_cluster(), 2).await;
    assert!(event(&calls, "Deleted").is_some());
    assert!(b.index.vectors.ready().await.is_err(), "the collection is still there");
    assert_eq!(b.index.catalog.counts().await.unwrap().indexed, 0);
}

/// Objects of this ImageIndex's names or labels that are someone else's (no owner reference to
/// it, no label of its UID) are never deleted or applied over. Before, `Delete` deleted another
/// `photos-search` Deployment by name and every Job with the labels, and force-applied over
/// another `photos-cleanup` Job.
#[tokio::test(flavor = "multi_thread")]
async fn deletion_leaves_what_is_not_this_imageindexs() {
    let mut spec = sample_spec();
    spec["deletionPolicy"] = json!("Delete");
    let theirs =
        json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "photos-search", "uid": "x-1"}});
    let mut their_job = job("photos-embed-9", 2, None);
    their_job["metadata"]["ownerReferences"] = json!([]);
    let mut their_cleanup = job("photos-cleanup", 2, None);
    their_cleanup["metadata"]["ownerReferences"] = json!([]);
    their_cleanup["metadata"]["labels"]["app.kubernetes.io/component"] = json!("cleanup");
    let cluster = Cluster { jobs: vec![their_job, their_cleanup], search: Some(theirs), ..Default::default() };
    let (result, calls) = settle(deleted_now(spec), cluster, 2).await;
    assert!(result.is_err(), "not done: the cleanup cannot run");
    assert!(
        !calls.iter().any(|c| c.method == Method::DELETE),
        "deleted: {:?}",
        calls.iter().filter(|c| c.method == Method::DELETE).map(|c| &c.path).collect::<Vec<_>>()
    );
    assert!(applied_job(&calls, "photos-cleanup").is_none(), "applied over their Job");
    let msg = written(&calls).conditions.iter().find(|c| c.type_ == "Ready").unwrap().message.clone();
    assert!(msg.contains("Job photos-cleanup is in the way"), "{msg}");
    assert!(!finalizer_removed(&calls));
}
