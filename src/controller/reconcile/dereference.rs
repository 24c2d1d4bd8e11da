//! Dereference: the one step that reads the cluster. It follows the spec's references (the Milvus
//! CR, the Secrets) and lists the ImageIndex's Jobs; what is missing is kept as data for the
//! pure steps to judge. Only Kubernetes API failures are errors.

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, ListParams};
use kube::core::{ApiResource, DynamicObject, GroupVersionKind};
use kube::{Client, ResourceExt};

use super::jobs::JobView;
use super::validate::{MilvusSource, ValidSpec};
use crate::controller::builders;
use crate::controller::status::reason;
use crate::core::Redacted;
use crate::crd::{ImageIndex, SecretKeyRef};
use crate::store::S3Credentials;

#[derive(Debug, thiserror::Error)]
#[error("Kubernetes API: {0}")]
pub struct Error(#[from] kube::Error);

/// A reference that could not be followed: the condition reason and a message for people.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Missing {
    pub reason: &'static str,
    pub message: String,
}

/// The Milvus to use.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Milvus {
    /// Its gRPC address.
    Ready(String),
    /// The referenced CR does not exist (message says which).
    NotFound(String),
    /// The CR exists but is not MilvusReady yet.
    NotReady(String),
}

/// Everything the spec refers to, as found.
#[derive(Clone, Debug, PartialEq)]
pub struct Refs {
    pub milvus: Milvus,
    /// The Milvus credentials, where the spec names a Secret for them.
    pub milvus_token: Option<Result<Redacted, Missing>>,
    pub mysql_url: Result<Redacted, Missing>,
    /// The search token Secret has its key (or none is needed).
    pub search_token: Result<(), Missing>,
    /// The bucket's keys from `source.credentialsSecret`; None: from the pods' environment.
    pub source_credentials: Result<Option<S3Credentials>, String>,
}

pub fn milvus_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk("milvus.io", "v1beta1", "Milvus"), "milvuses")
}

pub async fn dereference(image_index: &ImageIndex, spec: &ValidSpec, client: &Client) -> Result<Refs, Error> {
    let ns = image_index.namespace().unwrap_or_default();
    let s = &image_index.spec;
    let milvus_token = match &s.milvus.credentials_secret_ref {
        Some(r) => Some(secret_key(client, &ns, r).await?),
        None => None,
    };
    let search_token = match &s.search.token_secret_ref {
        Some(r) => secret_key(client, &ns, r).await?.map(drop),
        None => Ok(()),
    };
    Ok(Refs {
        milvus: milvus(client, &spec.milvus).await?,
        milvus_token,
        mysql_url: secret_key(client, &ns, &s.mysql.secret_ref).await?,
        search_token,
        source_credentials: source_credentials(client, &ns, s.source.credentials_secret.as_deref()).await?,
    })
}

/// The ImageIndex's embedding Jobs.
pub async fn jobs(image_index: &ImageIndex, client: &Client) -> Result<Vec<JobView>, Error> {
    let api: Api<Job> = Api::namespaced(client.clone(), &image_index.namespace().unwrap_or_default());
    let listed = api.list(&ListParams::default().labels(&builders::embed_selector(image_index))).await?;
    Ok(listed.items.iter().map(JobView::of).collect())
}

/// The Milvus address: the spec's, or the referenced Milvus CR's `status.endpoint` once it is MilvusReady.
pub async fn milvus(client: &Client, source: &MilvusSource) -> Result<Milvus, Error> {
    let (ns, name) = match source {
        MilvusSource::Address(url) => return Ok(Milvus::Ready(url.clone())),
        MilvusSource::Ref { namespace, name } => (namespace, name),
    };
    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), ns, &milvus_resource());
    let Some(milvus) = api.get_opt(name).await? else {
        let msg = format!("Milvus {ns}/{name} not found (milvus.io/v1beta1; is the milvus-operator installed?)");
        return Ok(Milvus::NotFound(msg));
    };
    let st = &milvus.data["status"];
    let ready = st["conditions"]
        .as_array()
        .is_some_and(|cs| cs.iter().any(|c| c["type"] == "MilvusReady" && c["status"] == "True"));
    let endpoint = st["endpoint"].as_str().unwrap_or_default();
    if !ready || endpoint.is_empty() {
        let state = st["status"].as_str().unwrap_or("no status yet");
        return Ok(Milvus::NotReady(format!("Milvus {ns}/{name} is not MilvusReady ({state})")));
    }
    Ok(Milvus::Ready(format!("http://{endpoint}")))
}

/// A Secret key's value, or why it cannot be read.
pub async fn secret_key(client: &Client, ns: &str, r: &SecretKeyRef) -> Result<Result<Redacted, Missing>, Error> {
    let api: Api<Secret> = Api::namespaced(client.clone(), ns);
    let Some(secret) = api.get_opt(&r.name).await? else {
        return Ok(Err(Missing {
            reason: reason::SECRET_NOT_FOUND,
            message: format!("Secret {ns}/{} not found", r.name),
        }));
    };
    match secret.data.as_ref().and_then(|d| d.get(&r.key)).map(|v| String::from_utf8(v.0.clone())) {
        Some(Ok(v)) if !v.trim().is_empty() => Ok(Ok(Redacted::new(v.trim()))),
        _ => Ok(Err(Missing {
            reason: reason::SECRET_KEY_MISSING,
            message: format!("Secret {ns}/{} has no key {:?} (or it is empty)", r.name, r.key),
        })),
    }
}

async fn source_credentials(
    client: &Client,
    ns: &str,
    name: Option<&str>,
) -> Result<Result<Option<S3Credentials>, String>, Error> {
    let Some(name) = name else { return Ok(Ok(None)) };
    let Some(secret) = Api::<Secret>::namespaced(client.clone(), ns).get_opt(name).await? else {
        return Ok(Err(format!("Secret {ns}/{name} not found")));
    };
    Ok(credentials_from(&secret.data.unwrap_or_default())
        .map(Some)
        .ok_or_else(|| format!("Secret {ns}/{name} needs AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY")))
}

/// The bucket credentials a Secret holds, as the Job's pods get them (its keys as env): the key
/// pair, and the region and session token (temporary credentials) where given.
fn credentials_from(data: &BTreeMap<String, ByteString>) -> Option<S3Credentials> {
    let get = |k: &str| data.get(k).and_then(|v| String::from_utf8(v.0.clone()).ok()).filter(|v| !v.is_empty());
    Some(S3Credentials {
        access_key_id: get("AWS_ACCESS_KEY_ID")?,
        secret_access_key: get("AWS_SECRET_ACCESS_KEY")?,
        region: get("AWS_REGION"),
        session_token: get("AWS_SESSION_TOKEN"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temporary_credentials_keep_their_session_token() {
        let data: BTreeMap<String, ByteString> =
            [("AWS_ACCESS_KEY_ID", "ASIA1"), ("AWS_SECRET_ACCESS_KEY", "s"), ("AWS_SESSION_TOKEN", "tok")]
                .into_iter()
                .map(|(k, v)| (k.to_string(), ByteString(v.as_bytes().to_vec())))
                .collect();
        let c = credentials_from(&data).unwrap();
        assert_eq!((c.session_token.as_deref(), c.region), (Some("tok"), None));
        assert!(credentials_from(&BTreeMap::new()).is_none());
    }
}
