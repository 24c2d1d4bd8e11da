//! Dereference: the one step that reads the cluster. It follows the spec's Milvus reference and
//! lists the ImageIndex's Jobs and their pods; what is missing is kept as data for the pure steps
//! to judge. It reads no Secret: the pods get those from the kubelet. Only Kubernetes API failures
//! are errors.

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams};
use kube::core::{ApiResource, DynamicObject, GroupVersionKind};
use kube::{Client, ResourceExt};

use super::jobs::JobView;
use super::tasks::Task;
use super::validate::{Milvus, MilvusSource};
use crate::controller::builders;
use crate::crd::ImageIndex;

#[derive(Debug, thiserror::Error)]
#[error("Kubernetes API: {0}")]
pub struct Error(#[from] kube::Error);

pub fn milvus_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk("milvus.io", "v1beta1", "Milvus"), "milvuses")
}

/// The ImageIndex's embedding Jobs.
pub async fn jobs(image_index: &ImageIndex, client: &Client) -> Result<Vec<JobView>, Error> {
    let api: Api<Job> = Api::namespaced(client.clone(), &image_index.namespace().unwrap_or_default());
    let listed = api.list(&ListParams::default().labels(&builders::embed_selector(image_index))).await?;
    Ok(listed.items.iter().map(JobView::of).collect())
}

/// The ImageIndex's pods of one component (`builders::EMBED`, `PLAN`, `CLEANUP`).
pub async fn pods(image_index: &ImageIndex, client: &Client, component: &str) -> Result<Vec<Pod>, Error> {
    let api: Api<Pod> = Api::namespaced(client.clone(), &image_index.namespace().unwrap_or_default());
    Ok(api.list(&ListParams::default().labels(&builders::selector(image_index, component))).await?.items)
}

/// The ImageIndex's plan or cleanup Jobs, with their reports.
pub async fn tasks(image_index: &ImageIndex, client: &Client, component: &str) -> Result<Vec<Task>, Error> {
    let api: Api<Job> = Api::namespaced(client.clone(), &image_index.namespace().unwrap_or_default());
    let mut jobs = api.list(&ListParams::default().labels(&builders::selector(image_index, component))).await?.items;
    // Labels anyone can set: only this ImageIndex's own Jobs say anything about it.
    jobs.retain(|j| builders::is_ours(&j.metadata, image_index));
    if jobs.is_empty() {
        return Ok(vec![]);
    }
    let pods = pods(image_index, client, component).await?;
    Ok(jobs.iter().map(|j| Task::of(j, &pods)).collect())
}

/// The Milvus address: the spec's, or the referenced Milvus CR's once it is MilvusReady (see
/// `from_cr`). `credentials`: the spec names a Secret for Milvus's user and password.
pub async fn milvus(client: &Client, source: &MilvusSource, credentials: bool) -> Result<Milvus, Error> {
    let (ns, name) = match source {
        MilvusSource::Address(url) => return Ok(Milvus::Ready(url.clone())),
        MilvusSource::Ref { namespace, name } => (namespace, name),
    };
    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), ns, &milvus_resource());
    match api.get_opt(name).await {
        Ok(Some(cr)) => Ok(from_cr(&cr, credentials)),
        Ok(None) => Ok(Milvus::NotFound(format!(
            "Milvus {ns}/{name} not found (milvus.io/v1beta1; is the milvus-operator installed?)"
        ))),
        // The kind itself is not served (no milvus-operator): a plain-text 404, not a Status.
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(Milvus::NotFound(format!(
            "Milvus {ns}/{name}: milvus.io/v1beta1 Milvus is not served here (install the milvus-operator, or use \
             spec.milvus.address)"
        ))),
        Err(e) => Err(e.into()),
    }
}

/// The milvus-operator's Milvus, read as a client inside the cluster needs it:
/// - Ready once `MilvusReady` is True for the spec it has (`status.observedGeneration`, where
///   given, has reached `metadata.generation`: a Ready from before an edit says nothing of it).
/// - The in-cluster Service `<name>-milvus.<ns>.svc`: `status.endpoint` names it only for a
///   ClusterIP Service; for NodePort it is empty and for LoadBalancer an external address,
///   which a pod may not reach (and traffic should not leave the cluster for).
/// - `https` when its config turns TLS on (`common.security.tlsMode` 1); mutual TLS (2) needs
///   a client certificate this operator does not have.
/// - Authorization on (`common.security.authorizationEnabled`) needs the credentials Secret.
pub fn from_cr(cr: &DynamicObject, credentials: bool) -> Milvus {
    let (ns, name) = (cr.namespace().unwrap_or_default(), cr.name_any());
    let (st, security) = (&cr.data["status"], &cr.data["spec"]["config"]["common"]["security"]);
    let ready = st["conditions"]
        .as_array()
        .is_some_and(|cs| cs.iter().any(|c| c["type"] == "MilvusReady" && c["status"] == "True"));
    if !ready {
        let state = st["status"].as_str().unwrap_or("no status yet");
        return Milvus::NotReady(format!("Milvus {ns}/{name} is not MilvusReady ({state})"));
    }
    if let (Some(seen), Some(generation)) = (st["observedGeneration"].as_i64(), cr.metadata.generation)
        && seen < generation
    {
        return Milvus::NotReady(format!(
            "Milvus {ns}/{name} is being updated: the milvus-operator has not yet acted on generation \
             {generation} (observed {seen})"
        ));
    }
    // YAML configs hold numbers and booleans as either type or as strings.
    let number = |v: &serde_json::Value| v.as_i64().or_else(|| v.as_str().and_then(|s| s.trim().parse().ok()));
    let on = |v: &serde_json::Value| v.as_bool().or_else(|| v.as_str().map(|s| s.eq_ignore_ascii_case("true")));
    let scheme = match number(&security["tlsMode"]).unwrap_or(0) {
        0 => "http",
        1 => "https",
        mode => {
            return Milvus::NotReady(format!(
                "Milvus {ns}/{name} asks for mutual TLS (tlsMode {mode}), which needs a client certificate: \
                 use tlsMode 1, or spec.milvus.address with a proxy that terminates it"
            ));
        }
    };
    if on(&security["authorizationEnabled"]).unwrap_or(false) && !credentials {
        return Milvus::NotReady(format!(
            "Milvus {ns}/{name} has authorization on: name a Secret holding user:password in \
             spec.milvus.credentialsSecretRef"
        ));
    }
    let service = format!("{name}-milvus.{ns}");
    let endpoint = st["endpoint"].as_str().unwrap_or_default();
    let port = match endpoint.rsplit_once(':').map(|(_, p)| p.parse::<u16>()) {
        Some(Ok(p)) => p,
        _ => 19530,
    };
    Milvus::Ready(format!("{scheme}://{service}.svc:{port}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cr(generation: i64, extra: serde_json::Value) -> DynamicObject {
        let mut o = serde_json::json!({
            "apiVersion": "milvus.io/v1beta1", "kind": "Milvus",
            "metadata": {"name": "vectors", "namespace": "db", "generation": generation},
            "spec": {}, "status": {"status": "Healthy", "observedGeneration": 2,
                "conditions": [{"type": "MilvusReady", "status": "True"}]}
        });
        merge(&mut o, extra);
        serde_json::from_value(o).unwrap()
    }

    /// JSON merge patch (RFC 7386), enough for these fixtures.
    fn merge(into: &mut serde_json::Value, patch: serde_json::Value) {
        match (into, patch) {
            (serde_json::Value::Object(a), serde_json::Value::Object(b)) => {
                for (k, v) in b {
                    merge(a.entry(k).or_insert(serde_json::Value::Null), v);
                }
            }
            (slot, v) => *slot = v,
        }
    }

    #[test]
    fn a_milvus_cr_is_reached_through_its_in_cluster_service() {
        let ready = |url: &str| Milvus::Ready(url.into());
        // ClusterIP: the endpoint is the Service (`<name>-milvus.<ns>:<port>`).
        let cluster_ip = cr(2, serde_json::json!({"status": {"endpoint": "vectors-milvus.db:19530"}}));
        assert_eq!(from_cr(&cluster_ip, false), ready("http://vectors-milvus.db.svc:19530"));
        // NodePort: no endpoint at all (before: NotReady for ever).
        assert_eq!(from_cr(&cr(2, serde_json::json!({})), false), ready("http://vectors-milvus.db.svc:19530"));
        // LoadBalancer: an external address; pods use the Service, on the same port.
        let lb = cr(2, serde_json::json!({"status": {"endpoint": "203.0.113.7:29530"}}));
        assert_eq!(from_cr(&lb, false), ready("http://vectors-milvus.db.svc:29530"));
        // TLS on: https; as a string in the YAML config too.
        for mode in [serde_json::json!(1), serde_json::json!("1")] {
            let tls = cr(2, serde_json::json!({"spec": {"config": {"common": {"security": {"tlsMode": mode}}}}}));
            assert_eq!(from_cr(&tls, false), ready("https://vectors-milvus.db.svc:19530"));
        }
        let mtls = cr(2, serde_json::json!({"spec": {"config": {"common": {"security": {"tlsMode": 2}}}}}));
        assert!(matches!(from_cr(&mtls, false), Milvus::NotReady(m) if m.contains("mutual TLS")));
        // Authorization on: the credentials Secret is needed.
        let auth =
            cr(2, serde_json::json!({"spec": {"config": {"common": {"security": {"authorizationEnabled": true}}}}}));
        assert!(matches!(from_cr(&auth, false), Milvus::NotReady(m) if m.contains("credentialsSecretRef")));
        assert_eq!(from_cr(&auth, true), ready("http://vectors-milvus.db.svc:19530"));
        // An edit the milvus-operator has not acted on: its Ready is about the old spec.
        assert!(
            matches!(from_cr(&cr(3, serde_json::json!({})), false), Milvus::NotReady(m) if m.contains("generation 3"))
        );
        let unready = cr(
            2,
            serde_json::json!({"status": {"status": "Pending", "conditions": [{"type": "MilvusReady", "status": "False"}]}}),
        );
        assert!(matches!(from_cr(&unready, false), Milvus::NotReady(m) if m.contains("(Pending)")));
    }
}
