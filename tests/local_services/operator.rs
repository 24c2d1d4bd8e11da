//! The operator against a real kube-apiserver (1.20.2, built by `hack/kube-build.sh`, started by
//! `hack/kube.sh up` with the CRD and the Helm chart applied). The controller runs as a process
//! under the chart's ServiceAccount identity, bound only to the chart's RBAC rules. With no kubelet
//! or controller-manager here, the test plays their part honestly: it runs the Job's command with
//! the Job's own env (Secrets resolved as the kubelet would) against the local Milvus, MariaDB and
//! S3, marks the Job complete, runs the search Deployment's command and marks it available.

use std::collections::BTreeMap;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{Container, Namespace, Pod, Secret, Service, ServiceAccount};
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};
use serde_json::json;

use imageindex::core::IndexKind;
use imageindex::crd::{ImageIndex, Phase};
use imageindex::store::{Catalog, MilvusConfig, VectorStore};

use super::support::{Fixture, env, run_like_the_image};

async fn client(kubeconfig: &str) -> Client {
    imageindex::install_crypto();
    let kc = Kubeconfig::read_from(kubeconfig).expect("reading the kubeconfig (run hack/kube.sh up)");
    let config = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await.unwrap();
    Client::try_from(config).unwrap()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Kills the child when the test ends, pass or fail.
struct Proc(Child);
impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn artifacts() -> std::path::PathBuf {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(".state/artifacts");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

async fn wait_for(api: &Api<ImageIndex>, name: &str, what: &str, ok: impl Fn(&ImageIndex) -> bool) -> ImageIndex {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let ii = api.get(name).await.unwrap();
        if ok(&ii) {
            return ii;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}; status: {:#?}", ii.status);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

fn condition<'a>(ii: &'a ImageIndex, t: &str) -> (&'a str, &'a str) {
    let c = ii.status.as_ref().and_then(|s| s.conditions.iter().find(|c| c.type_ == t)).expect(t);
    (c.status.as_str(), c.reason.as_str())
}

fn reason_of<'a>(ii: &'a ImageIndex, t: &str) -> Option<&'a str> {
    ii.status.as_ref()?.conditions.iter().find(|c| c.type_ == t).map(|c| c.reason.as_str())
}

/// The pod's environment as the kubelet builds it: plain values, `secretKeyRef`s and `envFrom`
/// Secrets; or the kubelet's message when one is missing (`CreateContainerConfigError`).
async fn pod_env(secrets: &Api<Secret>, c: &Container) -> Result<BTreeMap<String, String>, String> {
    let mut out = BTreeMap::new();
    let get = |name: String| async move {
        secrets.get_opt(&name).await.unwrap().ok_or_else(|| format!("secret \"{name}\" not found"))
    };
    for from in c.env_from.iter().flatten() {
        let s = get(from.secret_ref.as_ref().unwrap().name.clone()).await?;
        for (k, v) in s.data.unwrap_or_default() {
            out.insert(k, String::from_utf8(v.0).unwrap());
        }
    }
    for e in c.env.iter().flatten() {
        let value = match (&e.value, &e.value_from) {
            (Some(v), _) => v.clone(),
            (None, Some(from)) => {
                let r = from.secret_key_ref.as_ref().expect("only secretKeyRef is used");
                let s = get(r.name.clone()).await?;
                let v = s.data.unwrap_or_default().get(&r.key).cloned();
                let v = v.ok_or_else(|| format!("couldn't find key {} in Secret {}", r.key, r.name))?;
                String::from_utf8(v.0).unwrap()
            }
            _ => String::new(),
        };
        out.insert(e.name.clone(), value);
    }
    Ok(out)
}

/// The kubelet's part for a pod's Secret volumes: each mounted Secret's keys (or its items) written
/// as files under a folder of the test's, and the env's paths under the mount pointed there.
async fn mount_secrets(
    secrets: &Api<Secret>,
    pod: &k8s_openapi::api::core::v1::PodSpec,
    env: &mut BTreeMap<String, String>,
) -> std::path::PathBuf {
    let root = std::env::temp_dir().join(format!("imageindex-pod-{}-{}", std::process::id(), super::support::nanos()));
    for mount in pod.containers[0].volume_mounts.iter().flatten() {
        let volume = pod.volumes.iter().flatten().find(|v| v.name == mount.name).unwrap();
        let Some(secret) = &volume.secret else { continue };
        let data = secrets.get(secret.secret_name.as_ref().unwrap()).await.unwrap().data.unwrap_or_default();
        let dir = root.join(&mount.name);
        std::fs::create_dir_all(&dir).unwrap();
        let files: Vec<(String, String)> = match &secret.items {
            Some(items) => items.iter().map(|i| (i.key.clone(), i.path.clone())).collect(),
            None => data.keys().map(|k| (k.clone(), k.clone())).collect(),
        };
        for (key, path) in files {
            std::fs::write(dir.join(path), &data[&key].0).unwrap();
        }
        for value in env.values_mut() {
            if let Some(rest) = value.strip_prefix(mount.mount_path.as_str()) {
                *value = format!("{}{rest}", dir.display());
            }
        }
    }
    root
}

/// The kubelet's and the Job controller's part for the plan and cleanup Jobs in `ns`, until
/// dropped: each new Job's pod made, its command run with the pod's env (its report written to
/// the termination message), the pod's status and the Job's set as they would be. A pod whose
/// Secret is missing waits with `CreateContainerConfigError`, and starts once it is there.
fn run_tasks(admin: Client, ns: String) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let (jobs, pods) = (Api::<Job>::namespaced(admin.clone(), &ns), Api::<Pod>::namespaced(admin.clone(), &ns));
        let secrets: Api<Secret> = Api::namespaced(admin.clone(), &ns);
        loop {
            let selector = "app.kubernetes.io/component in (plan,cleanup)";
            let listed = jobs.list(&ListParams::default().labels(selector)).await.map(|l| l.items).unwrap_or_default();
            for job in listed {
                let done = job.status.as_ref().is_some_and(|s| s.conditions.iter().flatten().next().is_some());
                if done || job.metadata.deletion_timestamp.is_some() {
                    continue;
                }
                let name = job.metadata.name.clone().unwrap();
                let template = job.spec.clone().unwrap().template;
                let container = template.spec.clone().unwrap().containers[0].clone();
                let pod_name = format!("{name}-pod");
                if pods.get_opt(&pod_name).await.unwrap().is_none() {
                    let mut labels = template.metadata.clone().unwrap_or_default().labels.unwrap_or_default();
                    labels.insert("job-name".into(), name.clone());
                    let pod = json!({"metadata": {"name": pod_name, "labels": labels},
                        "spec": {"restartPolicy": "Never", "automountServiceAccountToken": false,
                            "containers": [{"name": container.name, "image": container.image}]}});
                    pods.create(&PostParams::default(), &serde_json::from_value(pod).unwrap()).await.unwrap();
                }
                let state = match pod_env(&secrets, &container).await {
                    Err(message) => json!({"waiting": {"reason": "CreateContainerConfigError", "message": message}}),
                    Ok(mut vars) => {
                        let report = std::env::temp_dir().join(format!("{ns}-{name}.report"));
                        vars.insert("IMAGEINDEX_REPORT".into(), report.display().to_string());
                        let out =
                            run_like_the_image(&container.args.clone().unwrap_or_default(), &vars).output().unwrap();
                        let message = std::fs::read_to_string(&report).unwrap_or_default();
                        let _ = std::fs::remove_file(&report);
                        json!({"terminated": {"exitCode": out.status.code().unwrap_or(137), "message": message}})
                    }
                };
                let status = json!({"status": {"phase": "Pending", "containerStatuses": [{"name": container.name,
                    "image": container.image, "imageID": "", "ready": false, "restartCount": 0, "state": state}]}});
                pods.patch_status(&pod_name, &PatchParams::default(), &Patch::Merge(&status)).await.unwrap();
                let Some(code) = state["terminated"]["exitCode"].as_i64() else { continue };
                let now = Timestamp::now().to_string();
                let (kind, counts) = if code == 0 {
                    ("Complete", json!({"succeeded": 1, "completionTime": now}))
                } else {
                    ("Failed", json!({"failed": 1}))
                };
                let mut status = json!({"startTime": now, "conditions": [{"type": kind, "status": "True",
                    "lastProbeTime": now, "lastTransitionTime": now, "reason": if code == 0 { "" } else { "BackoffLimitExceeded" }}]});
                status.as_object_mut().unwrap().extend(counts.as_object().unwrap().clone());
                jobs.patch_status(&name, &PatchParams::default(), &Patch::Merge(&json!({"status": status})))
                    .await
                    .unwrap();
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    })
}

/// Stops the task when dropped.
struct Abort(tokio::task::JoinHandle<()>);
impl Drop for Abort {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// One controller on the apiserver at a time: a cluster-wide one would also reconcile the other
/// test's namespace, and each test reads what its own controller did.
static ONE_CONTROLLER: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[tokio::test(flavor = "multi_thread")]
async fn operator_reconciles_on_a_real_apiserver_with_only_the_charts_rbac() {
    let _one = ONE_CONTROLLER.lock().await;
    let admin = client(&env("IMAGEINDEX_TEST_KUBECONFIG")).await;
    let fx = Fixture::new("operator");
    let ns = fx.name.replace('_', "-");
    Api::<Namespace>::all(admin.clone())
        .create(&PostParams::default(), &serde_json::from_value(json!({"metadata": {"name": ns}})).unwrap())
        .await
        .unwrap();
    // What the ServiceAccount controller would make (pods need one to be admitted).
    Api::<ServiceAccount>::namespaced(admin.clone(), &ns)
        .create(&PostParams::default(), &serde_json::from_value(json!({"metadata": {"name": "default"}})).unwrap())
        .await
        .unwrap();
    let _kubelet = Abort(run_tasks(admin.clone(), ns.clone()));

    // The bucket: the fixture images and one truncated JPEG.
    let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let mut images = vec![];
    for f in std::fs::read_dir(&fixtures).unwrap() {
        let path = f.unwrap().path();
        if matches!(path.extension().and_then(|e| e.to_str()), Some("jpg" | "png" | "webp")) {
            images.push(path.file_name().unwrap().to_string_lossy().to_string());
            fx.source.put(images.last().unwrap(), std::fs::read(&path).unwrap().into()).await.unwrap();
        }
    }
    // And 200 photos, so that the Job runs long enough to count the reconciles during it.
    let photos = std::path::Path::new(&env("IMAGEINDEX_PARITY_PHOTOS")).join("photos");
    let mut names: Vec<_> = std::fs::read_dir(&photos).unwrap().map(|f| f.unwrap().path()).collect();
    names.sort();
    for path in names.iter().take(200) {
        images.push(format!("photos/{}", path.file_name().unwrap().to_string_lossy()));
        fx.source.put(images.last().unwrap(), std::fs::read(path).unwrap().into()).await.unwrap();
    }
    let rocket = std::fs::read(fixtures.join("rocket.jpg")).unwrap();
    fx.source.put("broken/truncated.jpg", rocket[..rocket.len() / 2].to_vec().into()).await.unwrap();
    let (good, all) = (images.len() as u64, images.len() as u64 + 1);

    let secrets: Api<Secret> = Api::namespaced(admin.clone(), &ns);
    let secret = |name: &str, data: serde_json::Value| {
        serde_json::from_value::<Secret>(json!({"metadata": {"name": name}, "stringData": data})).unwrap()
    };
    let keys = json!({"AWS_ACCESS_KEY_ID": env("AWS_ACCESS_KEY_ID"), "AWS_SECRET_ACCESS_KEY": env("AWS_SECRET_ACCESS_KEY"), "AWS_REGION": "us-east-1"});
    secrets.create(&PostParams::default(), &secret("s3-keys", keys)).await.unwrap();

    // The controller, as the chart's ServiceAccount.
    let log_path = artifacts().join("controller.log");
    let replica = |identity: &str, port: u16, log: Stdio| {
        Proc(
            Command::new(env!("CARGO_BIN_EXE_imageindex"))
                .args(["controller", "--lease-namespace", "imageindex-system", "--identity", identity])
                .args(["--metrics-listen", &format!("127.0.0.1:{port}")])
                .env("KUBECONFIG", env("IMAGEINDEX_TEST_CONTROLLER_KUBECONFIG"))
                .env("RUST_LOG", "info,kube=warn")
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .unwrap(),
        )
    };
    let http = reqwest::Client::new();
    let readyz = |port: u16| {
        let http = http.clone();
        async move {
            let url = format!("http://127.0.0.1:{port}/readyz");
            for _ in 0..300 {
                if let Ok(r) = http.get(&url).send().await
                    && r.status() == 200
                {
                    return r.text().await.unwrap();
                }
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            panic!("/readyz on :{port} never answered 200 in 30 s");
        }
    };
    let leader_port = free_port();
    let controller = replica(&ns, leader_port, std::fs::File::create(&log_path).unwrap().into());
    while readyz(leader_port).await != "leading" {
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    // A second replica, as a rollout's new pod: it waits for the lease and is Ready meanwhile
    // (it was 503 until it led, so the rollout never finished).
    let standby_port = free_port();
    let standby = replica(&format!("{ns}-standby"), standby_port, Stdio::null());
    assert_eq!(readyz(standby_port).await, "standby");
    let metrics = http.get(format!("http://127.0.0.1:{standby_port}/metrics")).send().await.unwrap();
    assert!(metrics.text().await.unwrap().contains("imageindex_controller_leading 0"));
    drop(standby);
    // What a user sees: `kubectl get imgidx -w`, kept as an artifact and checked for the phases.
    let watch_path = artifacts().join("kubectl-get-imgidx.txt");
    let _watch = Proc(
        Command::new(env("KUBECTL"))
            .args(["--kubeconfig", &env("IMAGEINDEX_TEST_KUBECONFIG"), "get", "imgidx", "-n", &ns, "-w"])
            .stdout(std::fs::File::create(&watch_path).unwrap())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );

    let indexes: Api<ImageIndex> = Api::namespaced(admin.clone(), &ns);
    let manifest = |url: &str| {
        serde_yaml::from_str::<ImageIndex>(&format!(
            "apiVersion: imageindex.dev/v1alpha1\nkind: ImageIndex\nmetadata: {{name: photos}}\nspec:\n  \
             source: {{url: '{url}', endpoint: '{}', credentialsSecret: s3-keys, resyncInterval: 30s}}\n  \
             milvus: {{address: '{}', collection: {}}}\n  mysql: {{secretRef: {{name: catalog}}}}\n  \
             embedding: {{parallelism: 2, batchSize: 4, modelUri: /models/{}}}\n  deletionPolicy: Delete\n",
            env("IMAGEINDEX_S3_ENDPOINT"),
            env("IMAGEINDEX_MILVUS_URL"),
            fx.name,
            // The image's model is the test model here (see run_like_the_image); the collection records its name.
            std::path::Path::new(&env("IMAGEINDEX_MODEL")).file_name().unwrap().to_string_lossy()
        ))
        .unwrap()
    };

    // A bad spec is refused by the apiserver's schema, with the field named.
    let refused = indexes.create(&PostParams::default(), &manifest("ftp://elsewhere/photos")).await.unwrap_err();
    assert!(
        matches!(&refused, kube::Error::Api(s) if s.code == 422 && s.message.contains("spec.source.url")),
        "{refused}"
    );

    // Pending: the catalog Secret does not exist yet, so the plan Job's pod cannot start (the
    // controller reads no Secret: the pod's status says which one is missing).
    // Someone's own `photos-search` Deployment, with the labels of ours even: never taken over.
    let deployments = Api::<Deployment>::namespaced(admin.clone(), &ns);
    let theirs = json!({"metadata": {"name": "photos-search", "labels": {"app.kubernetes.io/instance": "photos"}},
        "spec": {"selector": {"matchLabels": {"app": "theirs"}}, "template": {"metadata": {"labels": {"app": "theirs"}},
            "spec": {"containers": [{"name": "theirs", "image": "registry.invalid/theirs:1"}]}}}});
    deployments.create(&PostParams::default(), &serde_json::from_value(theirs).unwrap()).await.unwrap();
    indexes.create(&PostParams::default(), &manifest(&fx.source_url)).await.unwrap();
    let ii = wait_for(&indexes, "photos", "Pending on the missing Secret", |ii| {
        ii.status.as_ref().is_some_and(|s| s.phase == Some(Phase::Pending))
            && ii.status.as_ref().unwrap().conditions.iter().any(|c| c.type_ == "CollectionReady")
            && condition(ii, "CollectionReady") == ("False", "SecretNotFound")
    })
    .await;
    let msg = &ii.status.as_ref().unwrap().conditions.iter().find(|c| c.type_ == "CollectionReady").unwrap().message;
    assert!(msg.contains("secret \"catalog\" not found"), "{msg}");

    // The Secret appears; the plan pod starts, its report wakes the reconciler: search objects, a Job.
    secrets
        .create(&PostParams::default(), &secret("catalog", json!({"url": env("IMAGEINDEX_MYSQL_URL")})))
        .await
        .unwrap();
    let ii = wait_for(&indexes, "photos", "Indexing", |ii| {
        ii.status.as_ref().is_some_and(|s| s.phase == Some(Phase::Indexing) && s.current_job.is_some())
    })
    .await;
    let status = ii.status.clone().unwrap();
    assert_eq!((status.images.discovered, status.images.pending), (all, all));
    // Indexing goes on; search waits, and says which object is in the way.
    let ii =
        wait_for(&indexes, "photos", "SearchReady NotOwned", |ii| reason_of(ii, "SearchReady") == Some("NotOwned"))
            .await;
    let msg = &ii.status.as_ref().unwrap().conditions.iter().find(|c| c.type_ == "SearchReady").unwrap().message;
    assert!(msg.contains("Deployment photos-search"), "{msg}");
    assert_eq!(ii.status.as_ref().unwrap().endpoint, None);
    let still = deployments.get("photos-search").await.unwrap();
    assert!(still.metadata.owner_references.is_none(), "taken over: {:?}", still.metadata.owner_references);
    let image = still.spec.unwrap().template.spec.unwrap().containers[0].image.clone();
    assert_eq!(image.as_deref(), Some("registry.invalid/theirs:1"));
    // Once it is gone, search is deployed.
    deployments.delete("photos-search", &DeleteParams::default()).await.unwrap();
    let ii = wait_for(&indexes, "photos", "search deployed", |ii| {
        ii.status.as_ref().is_some_and(|s| s.endpoint.is_some()) && reason_of(ii, "SearchReady") != Some("NotOwned")
    })
    .await;
    let status = ii.status.clone().unwrap();
    assert_eq!(status.endpoint.as_deref(), Some(format!("http://photos-search.{ns}.svc:80").as_str()));

    let job = Api::<Job>::namespaced(admin.clone(), &ns).get(status.current_job.as_ref().unwrap()).await.unwrap();
    assert_eq!(job.metadata.owner_references.as_ref().unwrap()[0].name, "photos");
    let job_spec = job.spec.clone().unwrap();
    // 1.20 has no Indexed Jobs: the controller asked for one pod for every shard (and said so).
    assert_eq!((job_spec.completions, job_spec.completion_mode.as_deref()), (Some(1), None));
    let container = job_spec.template.spec.unwrap().containers[0].clone();
    let mysql_env = container.env.iter().flatten().find(|e| e.name == "IMAGEINDEX_MYSQL_URL").unwrap();
    assert!(mysql_env.value.is_none() && mysql_env.value_from.is_some(), "credentials only by Secret reference");
    let deployment = Api::<Deployment>::namespaced(admin.clone(), &ns).get("photos-search").await.unwrap();
    Api::<Service>::namespaced(admin.clone(), &ns).get("photos-search").await.unwrap();

    // Reconciles while the Job runs, from the leader's /metrics (the figure issue 16 asks for).
    let reconciles = || {
        let http = http.clone();
        async move {
            let text = http.get(format!("http://127.0.0.1:{leader_port}/metrics")).send().await.unwrap();
            let text = text.text().await.unwrap();
            let line = text.lines().find(|l| l.starts_with("imageindex_controller_reconciles_total "));
            line.and_then(|l| l.split_whitespace().nth(1)).and_then(|v| v.parse::<f64>().ok()).unwrap() as u64
        }
    };
    let (job_started, reconciles_before) = (Instant::now(), reconciles().await);

    // The kubelet's part for the Job: its command, its env, JOB_COMPLETION_INDEX per completion.
    let job_env = pod_env(&secrets, &container).await.unwrap();
    for index in 0..job_spec.completions.unwrap() {
        let out = run_like_the_image(&container.args.clone().unwrap_or_default(), &job_env)
            .env("JOB_COMPLETION_INDEX", index.to_string())
            .output()
            .unwrap();
        assert!(out.status.success(), "embed failed: {}", String::from_utf8_lossy(&out.stderr));
        let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!((summary["indexed"].as_u64(), summary["failed"].as_u64()), (Some(good), Some(1)), "{summary}");
    }
    // The Job's rows are written; the controller sees its progress for a few seconds more.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let during = reconciles().await - reconciles_before;
    let secs = job_started.elapsed().as_secs_f64();
    let figure = format!(
        "reconciles while the Job ran: {during} in {secs:.1} s ({:.0} per minute)\n",
        during as f64 * 60.0 / secs
    );
    print!("{figure}");
    let now = Timestamp::now().to_string();
    let done = json!({"status": {"startTime": now, "completionTime": now, "succeeded": job_spec.completions,
        "conditions": [{"type": "Complete", "status": "True", "lastProbeTime": now, "lastTransitionTime": now}]}});
    Api::<Job>::namespaced(admin.clone(), &ns)
        .patch_status(&job.metadata.name.clone().unwrap(), &PatchParams::default(), &Patch::Merge(&done))
        .await
        .unwrap();

    // The Deployment's part: run its pod's command, wait for /readyz, search, mark it available.
    let search_container = deployment.spec.as_ref().unwrap().template.spec.as_ref().unwrap().containers[0].clone();
    let mut search_env = pod_env(&secrets, &search_container).await.unwrap();
    let search_pod = deployment.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
    let mounted = mount_secrets(&secrets, search_pod, &mut search_env).await;
    let port = free_port();
    search_env.insert("IMAGEINDEX_LISTEN".into(), format!("127.0.0.1:{port}"));
    let _search = Proc(
        run_like_the_image(&search_container.args.clone().unwrap_or_default(), &search_env)
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let http = reqwest::Client::new();
    let base = format!("http://127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(60);
    while http.get(format!("{base}/readyz")).send().await.map(|r| r.status().as_u16()).unwrap_or(0) != 200 {
        assert!(Instant::now() < deadline, "the search pod's command never became ready");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let query = reqwest::multipart::Form::new()
        .part("image", reqwest::multipart::Part::bytes(std::fs::read(fixtures.join("chelsea.png")).unwrap()));
    let hits: serde_json::Value =
        http.post(format!("{base}/img/search?topk=1")).multipart(query).send().await.unwrap().json().await.unwrap();
    let top = hits["results"][0]["key"].as_str().unwrap_or_default().to_string();
    assert!(top == "chelsea.png" || top == "chelsea.webp", "top hit {top}: {hits}");
    let available = json!({"status": {"observedGeneration": deployment.metadata.generation, "replicas": 1,
        "updatedReplicas": 1, "readyReplicas": 1, "availableReplicas": 1}});
    Api::<Deployment>::namespaced(admin.clone(), &ns)
        .patch_status("photos-search", &PatchParams::default(), &Patch::Merge(&available))
        .await
        .unwrap();

    // Ready, with the catalog's counts.
    let ii = wait_for(&indexes, "photos", "Ready", |ii| {
        ii.status.as_ref().is_some_and(|s| s.phase == Some(Phase::Ready) && s.images.indexed == good)
    })
    .await;
    let total = format!("reconciles from the first to Ready: {}\n", reconciles().await);
    print!("{total}");
    std::fs::write(artifacts().join("reconciles.txt"), figure + &total).unwrap();
    let status = ii.status.clone().unwrap();
    assert_eq!((status.images.discovered, status.images.failed, status.images.pending), (all, 1, 0));
    assert_eq!(status.observed_generation, ii.metadata.generation);
    assert!(status.last_sync_time.is_some() && status.current_job.is_none());
    for t in ["MilvusReady", "CollectionReady", "Indexed", "SearchReady"] {
        assert_eq!(condition(&ii, t).0, "True", "{t}");
    }
    let events = Api::<Event>::namespaced(admin.clone(), &ns).list(&ListParams::default()).await.unwrap();
    let reasons: Vec<String> = events.items.iter().filter_map(|e| e.reason.clone()).collect();
    for r in ["JobCreated", "NoIndexedJobs", "Indexed", "Ready"] {
        assert!(reasons.iter().any(|x| x == r), "no {r} event in {reasons:?}");
    }

    // Deletion runs the finalizer: deletionPolicy Delete first deletes the Job and the search
    // Deployment in the foreground and waits for them (their pods could recreate the collection).
    indexes.delete("photos", &DeleteParams::default()).await.unwrap();
    let (jobs, deployments) =
        (Api::<Job>::namespaced(admin.clone(), &ns), Api::<Deployment>::namespaced(admin.clone(), &ns));
    let job_name = job.metadata.name.clone().unwrap();
    let foreground = |meta: &kube::api::ObjectMeta| {
        meta.deletion_timestamp.is_some() && meta.finalizers.iter().flatten().any(|f| f == "foregroundDeletion")
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (j, d) = (jobs.get(&job_name).await.unwrap(), deployments.get("photos-search").await.unwrap());
        if foreground(&j.metadata) && foreground(&d.metadata) {
            break;
        }
        assert!(Instant::now() < deadline, "the Job and the Deployment were not deleted in the foreground");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let ii = wait_for(&indexes, "photos", "Deleting", |ii| {
        ii.status.as_ref().is_some_and(|s| s.phase == Some(Phase::Deleting))
    })
    .await;
    assert_eq!(condition(&ii, "Ready"), ("False", "Deleting"));
    let milvus = MilvusConfig {
        url: env("IMAGEINDEX_MILVUS_URL"),
        token: None,
        collection: fx.name.clone(),
        index: IndexKind::Hnsw,
    };
    VectorStore::connect(&milvus).await.unwrap().ready().await.expect("dropped while its Job still existed");
    // The garbage collector's part (no controller-manager here): their pods are gone (there are
    // none), so it removes `foregroundDeletion` and the objects go.
    let release = json!({"metadata": {"finalizers": null}});
    for j in jobs.list(&ListParams::default()).await.unwrap() {
        if foreground(&j.metadata) {
            jobs.patch(&j.metadata.name.unwrap(), &PatchParams::default(), &Patch::Merge(&release)).await.unwrap();
        }
    }
    deployments.patch("photos-search", &PatchParams::default(), &Patch::Merge(&release)).await.unwrap();
    // Then the cleanup Job drops the collection and its catalog rows, and the finalizer goes.
    let deadline = Instant::now() + Duration::from_secs(60);
    while indexes.get_opt("photos").await.unwrap().is_some() {
        assert!(Instant::now() < deadline, "the finalizer did not finish");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let gone = VectorStore::connect(&milvus).await.unwrap().ready().await.unwrap_err();
    assert!(matches!(gone, imageindex::store::Error::NotFound(_)), "{gone}");
    let catalog = Catalog::connect(&env("IMAGEINDEX_MYSQL_URL"), &fx.name, "").await.unwrap();
    assert_eq!(catalog.counts().await.unwrap().indexed + catalog.counts().await.unwrap().failed, 0);

    // What a user saw, and what the controller said: no permission was missing.
    drop(controller);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let seen = std::fs::read_to_string(&watch_path).unwrap();
    println!("kubectl get imgidx -w:\n{seen}");
    let phases: Vec<&str> = seen.lines().filter_map(|l| l.split_whitespace().nth(1)).collect();
    let order = ["Pending", "Indexing", "Ready"];
    let mut at = 0;
    for p in &phases {
        if at < order.len() && *p == order[at] {
            at += 1;
        }
    }
    assert_eq!(at, order.len(), "phases seen: {phases:?}");
    let log = std::fs::read_to_string(&log_path).unwrap();
    // A 403 is kube's `code: 403` (a bare "403" also turns up in log timestamps).
    let rbac = log.to_lowercase().contains("forbidden") || log.contains("code: 403");
    assert!(!rbac, "the controller hit RBAC: see {}", log_path.display());
    Api::<Namespace>::all(admin).delete(&ns, &DeleteParams::default()).await.unwrap();
    let _ = std::fs::remove_dir_all(mounted);
}

/// The chart in single-namespace mode (`watchNamespace`: a Role, no ClusterRole) and a
/// milvus-operator installed after the controller started: a change to the Milvus a spec refers
/// to wakes the reconciler at once. Before, the Milvus watch was probed once, at startup and
/// cluster-wide: a 404 (no CRD yet) or a 403 (a namespaced Role) turned it off for good, and an
/// ImageIndex waiting for its Milvus was looked at again only on its backoff (20 s and more here).
#[tokio::test(flavor = "multi_thread")]
async fn single_namespace_mode_follows_a_milvus_installed_later() {
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    let _one = ONE_CONTROLLER.lock().await;
    let admin = client(&env("IMAGEINDEX_TEST_KUBECONFIG")).await;
    let ns = format!("single-ns-{}", std::process::id());
    Api::<Namespace>::all(admin.clone())
        .create(&PostParams::default(), &serde_json::from_value(json!({"metadata": {"name": ns}})).unwrap())
        .await
        .unwrap();
    Api::<ServiceAccount>::namespaced(admin.clone(), &ns)
        .create(&PostParams::default(), &serde_json::from_value(json!({"metadata": {"name": "default"}})).unwrap())
        .await
        .unwrap();
    let _kubelet = Abort(run_tasks(admin.clone(), ns.clone()));
    // No milvus-operator yet.
    let crds: Api<CustomResourceDefinition> = Api::all(admin.clone());
    let milvus_crd = "milvuses.milvus.io";
    if crds.get_opt(milvus_crd).await.unwrap().is_some() {
        crds.delete(milvus_crd, &DeleteParams::default()).await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        while crds.get_opt(milvus_crd).await.unwrap().is_some() {
            assert!(Instant::now() < deadline, "the Milvus CRD was not deleted");
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }

    // The chart's RBAC as `helm install --set watchNamespace=NS` makes it, and the controller as
    // that ServiceAccount (the admin impersonates it: `kubectl --as`).
    let rendered = Command::new(env("HELM"))
        .args(["template", "imageindex", concat!(env!("CARGO_MANIFEST_DIR"), "/charts/imageindex")])
        .args(["--namespace", &ns, "--set", &format!("watchNamespace={ns}"), "-s", "templates/rbac.yaml"])
        .output()
        .unwrap();
    assert!(rendered.status.success(), "helm template: {}", String::from_utf8_lossy(&rendered.stderr));
    let rbac = String::from_utf8(rendered.stdout).unwrap();
    assert!(rbac.contains("kind: Role\n") && !rbac.contains("ClusterRole"), "{rbac}");
    let mut apply = Command::new(env("KUBECTL"))
        .args(["--kubeconfig", &env("IMAGEINDEX_TEST_KUBECONFIG"), "apply", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    std::io::Write::write_all(apply.stdin.as_mut().unwrap(), rbac.as_bytes()).unwrap();
    assert!(apply.wait().unwrap().success(), "kubectl apply of the chart's Role");
    let mut kc = Kubeconfig::read_from(env("IMAGEINDEX_TEST_KUBECONFIG")).unwrap();
    for user in &mut kc.auth_infos {
        let auth = user.auth_info.as_mut().unwrap();
        auth.impersonate = Some(format!("system:serviceaccount:{ns}:imageindex-controller"));
        auth.impersonate_groups = Some(vec!["system:serviceaccounts".into(), "system:authenticated".into()]);
    }
    let kubeconfig = artifacts().join("single-ns.kubeconfig");
    std::fs::write(&kubeconfig, serde_yaml::to_string(&kc).unwrap()).unwrap();
    let log_path = artifacts().join("controller-single-ns.log");
    let port = free_port();
    let mut controller = Proc(
        Command::new(env!("CARGO_BIN_EXE_imageindex"))
            .args(["controller", "--namespace", &ns, "--lease-namespace", &ns, "--identity", &ns])
            .args(["--metrics-listen", &format!("127.0.0.1:{port}")])
            .env("KUBECONFIG", &kubeconfig)
            .env("RUST_LOG", "info,kube=warn")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log_path).unwrap())
            .spawn()
            .unwrap(),
    );

    let secrets: Api<Secret> = Api::namespaced(admin.clone(), &ns);
    let catalog = json!({"metadata": {"name": "catalog"}, "stringData": {"url": env("IMAGEINDEX_MYSQL_URL")}});
    secrets.create(&PostParams::default(), &serde_json::from_value(catalog).unwrap()).await.unwrap();
    let indexes: Api<ImageIndex> = Api::namespaced(admin.clone(), &ns);
    let manifest = "apiVersion: imageindex.dev/v1alpha1\nkind: ImageIndex\nmetadata: {name: photos}\nspec:\n  \
                    source: {url: 's3://photos/'}\n  milvus: {ref: {name: vectors}}\n  mysql: {secretRef: {name: catalog}}\n";
    indexes.create(&PostParams::default(), &serde_yaml::from_str(manifest).unwrap()).await.unwrap();
    let milvus_reason = |reason: &'static str| {
        move |ii: &ImageIndex| {
            ii.status
                .as_ref()
                .is_some_and(|s| s.conditions.iter().any(|c| c.type_ == "MilvusReady" && c.reason == reason))
        }
    };
    wait_for(&indexes, "photos", "MilvusNotFound", milvus_reason("MilvusNotFound")).await;

    // The milvus-operator arrives: its CRD, then a Milvus that is not ready yet.
    let crd = json!({
        "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
        "metadata": {"name": milvus_crd},
        "spec": {"group": "milvus.io", "scope": "Namespaced",
            "names": {"plural": "milvuses", "singular": "milvus", "kind": "Milvus", "listKind": "MilvusList"},
            "versions": [{"name": "v1beta1", "served": true, "storage": true, "subresources": {"status": {}},
                "schema": {"openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": true}}}]}
    });
    crds.create(&PostParams::default(), &serde_json::from_value(crd).unwrap()).await.unwrap();
    let milvus_api: Api<kube::core::DynamicObject> =
        Api::namespaced_with(admin.clone(), &ns, &imageindex::controller::reconcile::milvus_resource());
    let cr = json!({"apiVersion": "milvus.io/v1beta1", "kind": "Milvus", "metadata": {"name": "vectors"}, "spec": {}});
    let deadline = Instant::now() + Duration::from_secs(30);
    while let Err(e) = milvus_api.create(&PostParams::default(), &serde_json::from_value(cr.clone()).unwrap()).await {
        assert!(Instant::now() < deadline, "the Milvus CRD was never served: {e}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let status = |ready: &str| {
        json!({"status": {"status": if ready == "True" { "Healthy" } else { "Pending" },
            "endpoint": format!("vectors-milvus.{ns}:19530"),
            "conditions": [{"type": "MilvusReady", "status": ready}]}})
    };
    milvus_api.patch_status("vectors", &PatchParams::default(), &Patch::Merge(&status("False"))).await.unwrap();
    // Seen through the watch once it has found the CRD (its backoff is at most 30 s), or on the
    // ImageIndex's own backoff; either way the reconciler has now been blocked at least twice.
    let blocked = Duration::from_secs(120);
    let deadline = Instant::now() + blocked;
    loop {
        let ii = indexes.get("photos").await.unwrap();
        if milvus_reason("MilvusNotReady")(&ii) {
            break;
        }
        assert!(Instant::now() < deadline, "never MilvusNotReady: {:#?}", ii.status);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // Now Milvus becomes ready: the watch must wake the reconciler well before its backoff
    // (20 s or more) would, and it starts a plan Job against the in-cluster Service.
    let jobs: Api<Job> = Api::namespaced(admin.clone(), &ns);
    let patched = Instant::now();
    milvus_api.patch_status("vectors", &PatchParams::default(), &Patch::Merge(&status("True"))).await.unwrap();
    let plan = loop {
        let plans = jobs.list(&ListParams::default().labels("app.kubernetes.io/component=plan")).await.unwrap();
        if let Some(plan) = plans.items.into_iter().next() {
            break plan;
        }
        assert!(
            patched.elapsed() < Duration::from_secs(10),
            "the Milvus change did not wake the reconciler in 10 s (see {})",
            log_path.display(),
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    println!("the ready Milvus was acted on {:.1} s after its status changed", patched.elapsed().as_secs_f64());
    let url = format!("http://vectors-milvus.{ns}.svc:19530");
    let env = plan.spec.unwrap().template.spec.unwrap().containers[0].env.clone().unwrap_or_default();
    assert!(env.iter().any(|e| e.name == "IMAGEINDEX_MILVUS_URL" && e.value.as_deref() == Some(&url)), "{env:?}");
    // That Service cannot be resolved on this machine: the plan's report says MilvusUnavailable.
    let ii = wait_for(&indexes, "photos", "MilvusUnavailable", milvus_reason("MilvusUnavailable")).await;
    let c = ii.status.unwrap().conditions.into_iter().find(|c| c.type_ == "MilvusReady").unwrap();
    assert!(c.message.contains(&url), "{}", c.message);
    let log = std::fs::read_to_string(&log_path).unwrap();
    assert!(!log.contains("code: 403"), "the controller hit RBAC in single-namespace mode: see {}", log_path.display());
    indexes.delete("photos", &DeleteParams::default()).await.unwrap();
    // The plan Job goes in the foreground; the garbage collector's part (no controller-manager
    // here) is to let it go once its pods are. Then the cleanup Job lets go of the catalog's
    // claim (Retain), and the finalizer goes.
    let release = json!({"metadata": {"finalizers": null}});
    let deadline = Instant::now() + Duration::from_secs(60);
    while indexes.get_opt("photos").await.unwrap().is_some() {
        for j in jobs.list(&ListParams::default()).await.unwrap() {
            if j.metadata.deletion_timestamp.is_some() {
                // It may be gone between the list and the patch.
                let _ = jobs.patch(&j.metadata.name.unwrap(), &PatchParams::default(), &Patch::Merge(&release)).await;
            }
        }
        assert!(Instant::now() < deadline, "the finalizer did not finish");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    // A rollout stops the old pod with SIGTERM: it hands the Lease back as it goes, so the Lease
    // no longer names a pod that is gone (it did until it expired) and is free to take.
    let term = Command::new("kill").args(["-TERM", &controller.0.id().to_string()]).status().unwrap();
    assert!(term.success());
    let deadline = Instant::now() + Duration::from_secs(30);
    let exit = loop {
        if let Some(exit) = controller.0.try_wait().unwrap() {
            break exit;
        }
        assert!(Instant::now() < deadline, "the controller did not stop on SIGTERM");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(exit.success(), "{exit}");
    let lease = Api::<k8s_openapi::api::coordination::v1::Lease>::namespaced(admin.clone(), &ns)
        .get("imageindex-controller")
        .await
        .unwrap();
    let holder = lease.spec.and_then(|s| s.holder_identity);
    assert_eq!(holder, None, "the stopped controller still holds the Lease");
    Api::<Namespace>::all(admin).delete(&ns, &DeleteParams::default()).await.unwrap();
}

/// The chart's `policy` reaches the controller: what ImageIndexes may choose for their pods (see
/// `validate::Policy`, whose unit test checks the refusals).
#[test]
fn the_charts_pod_policy_reaches_the_controller() {
    let render = |sets: &[&str]| {
        let mut cmd = Command::new(env("HELM"));
        cmd.args(["template", "imageindex", concat!(env!("CARGO_MANIFEST_DIR"), "/charts/imageindex")]);
        cmd.args(["-s", "templates/deployment.yaml"]);
        for s in sets {
            cmd.args(["--set", s]);
        }
        let out = cmd.output().unwrap();
        assert!(out.status.success(), "helm template: {}", String::from_utf8_lossy(&out.stderr));
        let d: Deployment = serde_yaml::from_slice(&out.stdout).unwrap();
        let env = d.spec.unwrap().template.spec.unwrap().containers[0].env.clone().unwrap();
        let value = |name: &str| env.iter().find(|e| e.name == name).and_then(|e| e.value.clone()).unwrap();
        (value("IMAGEINDEX_ALLOWED_IMAGES"), value("IMAGEINDEX_ALLOWED_SERVICE_ACCOUNTS"))
    };
    assert_eq!(render(&[]), (String::new(), String::new()), "anything, by default");
    let set = render(&[
        "policy.allowedImages={registry.example/ml/*,ghcr.io/x/y:1}",
        "policy.allowedServiceAccounts={reader}",
    ]);
    assert_eq!(set, ("registry.example/ml/*,ghcr.io/x/y:1".to_string(), "reader".to_string()));
}
