//! The operator: reconciles `ImageIndex` resources into a Milvus collection, the MySQL catalog,
//! embedding Jobs (`imageindex embed`) and the search Deployment + Service (`imageindex serve`).
//! `builders` makes the objects (pure), `status` the conditions (pure), `reconcile` runs the
//! pipeline against the API; this file wires watches, leader election and `/metrics`.

pub mod builders;
pub mod cli;
pub mod metrics;
pub mod reconcile;
pub mod status;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context as _, Result};
use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{Pod, Service};
use kube::api::Api;
use kube::core::{DynamicObject, PartialObjectMeta};
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef};
use kube::runtime::{Controller, WatchStreamExt, watcher};
use kube::{Client, ResourceExt};
use kube_lease_manager::LeaseManagerBuilder;
use tracing::{error, info, warn};

use crate::crd::ImageIndex;
pub use reconcile::{Context, Settings};

#[derive(Clone, Debug)]
pub struct ControllerConfig {
    pub settings: Settings,
    /// Watch one namespace, or all.
    pub namespace: Option<String>,
    /// `/metrics`, `/healthz` and `/readyz`.
    pub listen: SocketAddr,
    /// Lease for leader election: `namespace/name`; None runs without election (one replica).
    pub lease: Option<(String, String)>,
    /// This replica's identity in the lease (the pod name).
    pub identity: String,
}

/// Runs the operator until SIGTERM, or until it loses the lease (then exits non-zero, so the
/// pod restarts and waits its turn: two replicas never reconcile at once).
pub async fn run(client: Client, config: ControllerConfig) -> Result<()> {
    let metrics = Arc::new(metrics::Metrics::default());
    let leading = Arc::new(AtomicBool::new(config.lease.is_none()));
    tokio::spawn(serve_metrics(config.listen, metrics.clone(), leading.clone()));
    let mut leadership = match &config.lease {
        Some(lease) => Some(Leadership::acquire(&client, lease, &config.identity).await?),
        None => None,
    };
    leading.store(true, Ordering::Relaxed);
    metrics.set_leading(true);

    let reporter = Reporter { controller: reconcile::MANAGER.into(), instance: Some(config.identity.clone()) };
    let recorder = Recorder::new(client.clone(), reporter);
    let ctx = Arc::new(Context::new(client.clone(), config.settings.clone(), recorder, metrics));
    let controller = watches(&client, config.namespace.as_deref());
    info!(namespace = config.namespace.as_deref().unwrap_or("(all)"), "reconciling ImageIndexes");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    // Ends with whether the lease was lost, handing the leadership back to be released.
    let signals = tokio::spawn(async move {
        let lost = {
            let lost_lease = async {
                match leadership.as_mut() {
                    Some(l) => l.lost().await,
                    None => futures::future::pending().await,
                }
            };
            tokio::select! {
                _ = lost_lease => { error!("lost the lease; stopping"); true }
                _ = tokio::signal::ctrl_c() => { info!("interrupted; stopping"); false }
                _ = sigterm() => { info!("SIGTERM; stopping"); false }
            }
        };
        let _ = stop.send(());
        (lost, leadership)
    });
    controller
        .graceful_shutdown_on(async move {
            let _ = stopped.await;
        })
        .run(reconcile::reconcile, reconcile::error_policy, ctx)
        .for_each(|r| async move {
            match r {
                // An owned object outlived its ImageIndex (garbage collection is on its way).
                Err(kube::runtime::controller::Error::ObjectNotFound(o)) => tracing::debug!(%o, "gone"),
                Err(e) => warn!(error = %e, "controller"),
                Ok(_) => {}
            }
        })
        .await;
    let (lost, leadership) = signals.await.context("the signal task")?;
    anyhow::ensure!(!lost, "lost the leader lease");
    // Only now that no reconcile runs: the Lease is free for the next replica's next look, and
    // says nobody leads, instead of naming a pod that is gone until it expires.
    if let Some(l) = leadership {
        l.release().await;
    }
    Ok(())
}

/// This replica's hold on the Lease, renewed in the background by kube-lease-manager.
struct Leadership {
    channel: tokio::sync::watch::Receiver<bool>,
    task: tokio::task::JoinHandle<kube_lease_manager::Result<kube_lease_manager::LeaseManager>>,
}

/// How long a stopping replica waits to hand the Lease back (the pod's grace period is 30 s).
const RELEASE_TIMEOUT: Duration = Duration::from_secs(5);

impl Leadership {
    /// Waits until this replica holds the Lease `(namespace, name)`.
    async fn acquire(client: &Client, (ns, name): &(String, String), identity: &str) -> Result<Self> {
        let manager = LeaseManagerBuilder::new(client.clone(), name)
            .with_namespace(ns)
            .with_identity(identity)
            .with_duration(15)
            .with_grace(5)
            .build()
            .await
            .context("setting up leader election")?;
        let (mut channel, task) = manager.watch().await;
        info!(lease = %format!("{ns}/{name}"), %identity, "waiting for the lease");
        while !*channel.borrow_and_update() {
            channel.changed().await.context("leader election stopped")?;
        }
        info!("leading");
        Ok(Self { channel, task })
    }

    /// Ends when this replica no longer holds the Lease.
    async fn lost(&mut self) {
        while *self.channel.borrow_and_update() {
            if self.channel.changed().await.is_err() {
                break;
            }
        }
    }

    /// Lets the Lease go: closing the channel makes the manager release it and end.
    async fn release(self) {
        drop(self.channel);
        match tokio::time::timeout(RELEASE_TIMEOUT, self.task).await {
            Ok(Ok(Ok(_))) => info!("released the lease"),
            Ok(Ok(Err(e))) => warn!(error = %e, "could not release the lease; it expires on its own"),
            Ok(Err(e)) => warn!(error = %e, "the lease task failed"),
            Err(_) => warn!("releasing the lease timed out; it expires on its own"),
        }
    }
}

/// The controller and what wakes it: ImageIndexes, the objects they own, their Jobs' pods (a
/// report written, a pod that cannot start), the cleanup Jobs they do not own, and the Milvus CRs
/// they refer to (where the milvus-operator's CRD is served).
fn watches(client: &Client, namespace: Option<&str>) -> Controller<ImageIndex> {
    fn api<K>(client: &Client, namespace: Option<&str>) -> Api<K>
    where
        K: kube::Resource<Scope = kube::core::NamespaceResourceScope>,
        <K as kube::Resource>::DynamicType: Default,
    {
        match namespace {
            Some(ns) => Api::namespaced(client.clone(), ns),
            None => Api::all(client.clone()),
        }
    }
    // Only what we made: the owned objects carry our managed-by label.
    let owned = watcher::Config::default().labels("app.kubernetes.io/managed-by=imageindex-operator");
    // The ImageIndexes, with what changes only in their status filtered out: our own status
    // writes would wake the controller again, back to back while a Job makes progress. The store
    // still sees every change.
    let (reader, writer) = reflector::store();
    let image_indexes = watcher(api::<ImageIndex>(client, namespace), watcher::Config::default())
        .default_backoff()
        .reflect(writer)
        .applied_objects()
        .predicate_filter(wakes, Default::default());
    let controller = Controller::for_stream(image_indexes, reader);
    let store = controller.store();
    let controller = controller
        .owns(api::<Job>(client, namespace), owned.clone())
        .owns(api::<Deployment>(client, namespace), owned.clone())
        .owns(api::<Service>(client, namespace), owned.clone())
        // By metadata only (a status change bumps it too): the controller reads the pods it needs
        // when it reconciles. They name their ImageIndex in the instance label (the cleanup
        // Job's pod too: that Job is not owned).
        .watches(api::<PartialObjectMeta<Pod>>(client, namespace), owned, instance);
    controller.watches_stream_with(
        milvus_events(client, namespace),
        move |m| {
            let (ns, name) = (m.namespace().unwrap_or_default(), m.name_any());
            let refers = |image_index: &ImageIndex| {
                image_index.spec.milvus.reference.as_ref().is_some_and(|r| {
                    r.name == name
                        && r.namespace.clone().unwrap_or_else(|| image_index.namespace().unwrap_or_default()) == ns
                })
            };
            store
                .state()
                .into_iter()
                .filter(|image_index| refers(image_index))
                .map(|image_index| ObjectRef::from_obj(&*image_index))
                .collect::<Vec<_>>()
        },
        reconcile::milvus_resource(),
    )
}

/// The milvus-operator's Milvus CRs, in the watched namespace (a namespaced Role cannot list
/// them cluster-wide) or in all. The CRD may be installed after this operator, or never: until
/// it is served (and readable), the watch retries with backoff (at most every 30 s) and says so
/// once; `spec.milvus.ref` resolves on each reconcile meanwhile, and `address` needs none of it.
fn milvus_events(
    client: &Client,
    namespace: Option<&str>,
) -> impl futures::Stream<Item = Result<DynamicObject, watcher::Error>> + Send + 'static {
    let resource = reconcile::milvus_resource();
    let api: Api<DynamicObject> = match namespace {
        Some(ns) => Api::namespaced_with(client.clone(), ns, &resource),
        None => Api::all_with(client.clone(), &resource),
    };
    let failing = Arc::new(AtomicBool::new(false));
    watcher(api, watcher::Config::default()).default_backoff().touched_objects().filter_map(move |event| {
        let failing = failing.clone();
        async move {
            match event {
                Ok(m) => {
                    if failing.swap(false, Ordering::Relaxed) {
                        info!("watching milvus.io/v1beta1 Milvus: spec.milvus.ref is followed");
                    }
                    Some(Ok(m))
                }
                Err(e) => {
                    if !failing.swap(true, Ordering::Relaxed) {
                        warn!(
                            error = %e,
                            "cannot watch milvus.io/v1beta1 Milvus (milvus-operator not installed, or not readable); \
                             retrying. spec.milvus.address works without it"
                        );
                    }
                    None
                }
            }
        }
    })
}

/// What of an ImageIndex wakes the reconciler: its spec (generation), its finalizers, its
/// deletion and its annotations; not its status. Objects not seen before always pass.
fn wakes(image_index: &ImageIndex) -> Option<u64> {
    use std::hash::{Hash, Hasher};
    let meta = &image_index.metadata;
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (meta.generation, &meta.finalizers, meta.deletion_timestamp.as_ref().map(|t| t.0.as_second()), &meta.annotations)
        .hash(&mut h);
    Some(h.finish())
}

async fn sigterm() {
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(mut s) => {
            s.recv().await;
        }
        Err(_) => futures::future::pending().await,
    }
}

/// The ImageIndex an object of ours names in its instance label.
fn instance<K: kube::Resource>(o: K) -> Option<ObjectRef<ImageIndex>> {
    let name = o.meta().labels.as_ref()?.get(builders::INSTANCE)?;
    Some(ObjectRef::new(name).within(o.meta().namespace.as_deref()?))
}

/// `/metrics` (Prometheus), `/healthz` (the process runs), `/readyz` (it serves: leading or on
/// standby). Readiness never waits for the lease: with a RollingUpdate, the new pod must become
/// Ready while the old one still leads, or the rollout stalls; the body says which it is.
async fn serve_metrics(listen: SocketAddr, metrics: Arc<metrics::Metrics>, leading: Arc<AtomicBool>) {
    use axum::http::header;
    use axum::routing::get;
    let app = axum::Router::new()
        .route(
            "/metrics",
            get(move || async move { ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], metrics.encode()) }),
        )
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(move || async move { role(leading.load(Ordering::Relaxed)) }));
    match tokio::net::TcpListener::bind(listen).await {
        Ok(l) => {
            if let Err(e) = axum::serve(l, app).await {
                error!(error = %e, "metrics server stopped");
            }
        }
        Err(e) => error!(error = %e, %listen, "cannot listen for /metrics"),
    }
}

/// What `/readyz` says: 200 either way.
fn role(leading: bool) -> &'static str {
    if leading { "leading" } else { "standby" }
}

/// What the server can do (1.20, the apiserver we can build here, has none of the Job features
/// nor policy/v1); all of it when the version cannot be read.
pub async fn server_features(client: &Client) -> builders::ServerFeatures {
    match client.apiserver_version().await {
        Ok(v) => builders::ServerFeatures::of(&v.major, &v.minor),
        Err(_) => builders::ServerFeatures::ALL,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_status_write_does_not_wake_the_reconciler() {
        let mut ii: ImageIndex = serde_yaml::from_str(
            "apiVersion: imageindex.dev/v1alpha1\nkind: ImageIndex\nmetadata: {name: p, namespace: s, generation: 1}\n\
             spec: {source: {url: 's3://b/p/'}, milvus: {address: 'm:19530'}, mysql: {secretRef: {name: db}}}",
        )
        .unwrap();
        let before = wakes(&ii);
        ii.status = Some(crate::crd::ImageIndexStatus { current_job: Some("j".into()), ..Default::default() });
        ii.metadata.resource_version = Some("8".into());
        assert_eq!(wakes(&ii), before, "status only");
        for change in [
            |ii: &mut ImageIndex| ii.metadata.generation = Some(2),
            |ii: &mut ImageIndex| ii.metadata.finalizers = Some(vec!["imageindex.dev/cleanup".into()]),
            |ii: &mut ImageIndex| {
                ii.metadata.deletion_timestamp =
                    Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(k8s_openapi::jiff::Timestamp::now()))
            },
            |ii: &mut ImageIndex| ii.metadata.annotations = Some([("imageindex.dev/resync".into(), "1".into())].into()),
        ] {
            let mut changed = ii.clone();
            change(&mut changed);
            assert_ne!(wakes(&changed), before);
        }
    }
}
