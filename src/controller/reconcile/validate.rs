//! Validation, pure: the rules the schema cannot state (no CEL on 1.20), and then whether what the
//! spec refers to is there. Each returns a validated type, or the conditions that say why not.

use std::time::Duration;

use kube::ResourceExt;

use crate::controller::status::{self, COLLECTION_READY, INDEXED, MILVUS_READY, Observed, SEARCH_READY, reason};
use crate::crd::{ImageIndex, parse_interval};

/// A spec that passed the rules.
#[derive(Clone, Debug, PartialEq)]
pub struct ValidSpec {
    /// Where to find Milvus: an address as given, or a Milvus CR to resolve.
    pub milvus: MilvusSource,
    pub resync: Duration,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MilvusSource {
    /// `http://host:19530`
    Address(String),
    Ref {
        namespace: String,
        name: String,
    },
}

/// A Milvus address as a URL: `host:19530` means `http://host:19530`.
pub fn address(addr: &str) -> String {
    if addr.contains("://") { addr.to_string() } else { format!("http://{addr}") }
}

/// The rules the schema cannot state; the message says which and how to fix it.
pub fn validate(image_index: &ImageIndex) -> Result<ValidSpec, String> {
    let name = image_index.name_any();
    let m = &image_index.spec.milvus;
    let milvus = match (&m.reference, &m.address) {
        (Some(r), None) => MilvusSource::Ref {
            namespace: r.namespace.clone().unwrap_or_else(|| image_index.namespace().unwrap_or_default()),
            name: r.name.clone(),
        },
        (None, Some(addr)) => MilvusSource::Address(address(addr)),
        _ => return Err("spec.milvus: set exactly one of `ref` and `address`".into()),
    };
    // `<name>-search` must be a DNS-1035 label (a Service name): lowercase letters, digits and
    // `-`, a letter first, no `-` last. An ImageIndex name may hold dots; a Service name may not.
    let label = name.starts_with(|c: char| c.is_ascii_lowercase())
        && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !name.ends_with('-');
    if name.len() > 40 || !label {
        return Err(format!(
            "metadata.name {name:?}: use lowercase letters, digits and `-`, a letter first, at most 40 characters \
             (it names the `<name>-search` Service and the Jobs)"
        ));
    }
    let resync = parse_interval(&image_index.spec.source.resync_interval).filter(|d| *d >= Duration::from_secs(10));
    let Some(resync) = resync else {
        return Err(format!(
            "spec.source.resyncInterval {:?}: use at least 10s, like `30s`, `10m` or `1h`",
            image_index.spec.source.resync_interval
        ));
    };
    if image_index.spec.source.include.is_empty() {
        return Err("spec.source.include: give at least one glob".into());
    }
    let search = &image_index.spec.search;
    if search.auth.protects_reads() && search.auth.read_token_secret_ref.is_none() && search.token_secret_ref.is_none()
    {
        return Err(
            "spec.search.auth.reads is `token`, but no token is given: set spec.search.auth.readTokenSecretRef \
                    (a token for search only), spec.search.tokenSecretRef (the write token), or both"
                .into(),
        );
    }
    if let Some(p) = &image_index.spec.embedding.preprocess {
        p.parse::<crate::core::Preprocess>().map_err(|e| format!("spec.embedding.preprocess: {e}"))?;
    }
    Ok(ValidSpec { milvus, resync })
}

/// What an ImageIndex's author may choose for its pods, as the operator's installer allows: an
/// ImageIndex makes pods (plan, embedding, cleanup, search) with the image, ServiceAccount and
/// Secrets its spec names, so whoever may create one may run that image as that account. Empty
/// lists allow anything (the default); the operator's own image is always allowed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Policy {
    /// Images, exactly, or every image under a prefix ending in `*` (`registry.example/ml/*`).
    pub images: Vec<String>,
    /// ServiceAccount names; an index that names none runs as the namespace's `default`.
    pub service_accounts: Vec<String>,
}

impl Policy {
    /// Refuses, saying which field and what is allowed, a spec that names what the policy does not
    /// allow.
    pub fn check(&self, image_index: &ImageIndex, default_image: &str) -> Result<(), String> {
        let spec = &image_index.spec;
        let image_ok = |image: &str| {
            image == default_image
                || self.images.is_empty()
                || self.images.iter().any(|a| match a.strip_suffix('*') {
                    Some(prefix) => image.starts_with(prefix),
                    None => image == a,
                })
        };
        for (field, image) in
            [("spec.embedding.image", &spec.embedding.image), ("spec.search.image", &spec.search.image)]
        {
            if let Some(image) = image.as_deref().filter(|i| !image_ok(i)) {
                return Err(format!(
                    "{field} {image:?} is not allowed by this operator (allowed: {}, and its own image)",
                    self.images.join(", ")
                ));
            }
        }
        if let Some(sa) = spec.service_account_name.as_deref()
            && !self.service_accounts.is_empty()
            && !self.service_accounts.iter().any(|a| a == sa)
        {
            return Err(format!(
                "spec.serviceAccountName {sa:?} is not allowed by this operator (allowed: {})",
                self.service_accounts.join(", ")
            ));
        }
        Ok(())
    }
}

/// Every condition Unknown with the reason: the spec cannot work as written.
pub fn invalid(message: &str) -> Vec<Observed> {
    status::ALL.iter().map(|&t| Observed::unknown(t, reason::INVALID_SPEC, message)).collect()
}

fn waiting(types: &[&'static str]) -> impl Iterator<Item = Observed> {
    types.iter().map(|&t| Observed::unknown(t, reason::WAITING, "waiting for the conditions before it"))
}

/// The Milvus to use, as `dereference::milvus` found it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Milvus {
    /// Its gRPC address.
    Ready(String),
    /// The referenced CR does not exist (message says which).
    NotFound(String),
    /// The CR exists but is not MilvusReady yet.
    NotReady(String),
}

/// The Milvus address, or the conditions that say why there is none yet.
pub fn ready(milvus: &Milvus) -> Result<String, Vec<Observed>> {
    let (why, msg) = match milvus {
        Milvus::Ready(url) => return Ok(url.clone()),
        Milvus::NotFound(msg) => (reason::MILVUS_NOT_FOUND, msg),
        Milvus::NotReady(msg) => (reason::MILVUS_NOT_READY, msg),
    };
    let blocked = Observed::no(MILVUS_READY, why, msg);
    Err([blocked].into_iter().chain(waiting(&[COLLECTION_READY, INDEXED, SEARCH_READY])).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn named(name: &str) -> ImageIndex {
        let mut ii = image_index(serde_json::json!({"milvus": {"address": "m:19530"}}));
        ii.metadata.name = Some(name.into());
        ii
    }

    #[test]
    fn names_make_valid_service_names() {
        assert!(validate(&named("photos-2")).is_ok());
        for bad in ["my.photos", "Photos", "2photos", "photos-", &"p".repeat(41)] {
            let err = validate(&named(bad)).unwrap_err();
            assert!(err.contains("metadata.name"), "{bad}: {err}");
        }
    }

    fn image_index(spec: serde_json::Value) -> ImageIndex {
        let mut base = serde_json::json!({"source": {"url": "s3://b/p/"}, "mysql": {"secretRef": {"name": "db"}}});
        base.as_object_mut().unwrap().extend(spec.as_object().unwrap().clone());
        serde_json::from_value(serde_json::json!({"apiVersion": "imageindex.dev/v1alpha1", "kind": "ImageIndex",
            "metadata": {"name": "photos", "namespace": "shop"}, "spec": base}))
        .unwrap()
    }

    #[test]
    fn exactly_one_milvus_and_a_sane_interval() {
        let both = image_index(serde_json::json!({"milvus": {"address": "m:19530", "ref": {"name": "m"}}}));
        assert!(validate(&both).unwrap_err().contains("exactly one"));
        let neither = image_index(serde_json::json!({"milvus": {}}));
        assert!(validate(&neither).is_err());
        let addr = validate(&image_index(serde_json::json!({"milvus": {"address": "m:19530"}}))).unwrap();
        assert_eq!(addr.milvus, MilvusSource::Address("http://m:19530".into()));
        assert_eq!(addr.resync, Duration::from_secs(600));
        let r = validate(&image_index(serde_json::json!({"milvus": {"ref": {"name": "m"}}}))).unwrap();
        assert_eq!(r.milvus, MilvusSource::Ref { namespace: "shop".into(), name: "m".into() });
        let fast = image_index(
            serde_json::json!({"milvus": {"address": "m"}, "source": {"url": "s3://b/", "resyncInterval": "5s"}}),
        );
        assert!(validate(&fast).unwrap_err().contains("at least 10s"));
        let none =
            image_index(serde_json::json!({"milvus": {"address": "m"}, "source": {"url": "s3://b/", "include": []}}));
        assert!(validate(&none).unwrap_err().contains("at least one glob"));
        let declared =
            |p: &str| image_index(serde_json::json!({"milvus": {"address": "m"}, "embedding": {"preprocess": p}}));
        assert!(validate(&declared("clip")).is_ok());
        assert!(validate(&declared("resize=256,crop=224,filter=bicubic,mean=0.5/0.5/0.5,std=0.5/0.5/0.5")).is_ok());
        let err = validate(&declared("resize=256")).unwrap_err();
        assert!(err.starts_with("spec.embedding.preprocess:"), "{err}");
        let invalid = invalid("x");
        assert_eq!(invalid.len(), 4);
        assert!(invalid.iter().all(|o| o.ok.is_none() && o.reason == reason::INVALID_SPEC));
    }

    #[test]
    fn the_policy_allows_only_its_images_and_service_accounts() {
        let ii = |s: serde_json::Value| {
            image_index(
                serde_json::json!({"milvus": {"address": "m"}})
                    .as_object()
                    .unwrap()
                    .clone()
                    .into_iter()
                    .chain(s.as_object().unwrap().clone())
                    .collect::<serde_json::Map<_, _>>()
                    .into(),
            )
        };
        let own = "ghcr.io/imageindex/imageindex:0.1.0";
        let anything = Policy::default();
        let custom =
            ii(serde_json::json!({"embedding": {"image": "evil.example/miner:1"}, "serviceAccountName": "admin"}));
        assert!(anything.check(&custom, own).is_ok(), "no policy: anything, as before");
        let policy = Policy {
            images: vec!["registry.example/ml/*".into(), "ghcr.io/imageindex/imageindex:0.2.0".into()],
            service_accounts: vec!["bucket-reader".into()],
        };
        let err = policy.check(&custom, own).unwrap_err();
        assert!(err.starts_with("spec.embedding.image \"evil.example/miner:1\" is not allowed"), "{err}");
        let search = ii(serde_json::json!({"search": {"image": "registry.example/other/x:1"}}));
        assert!(policy.check(&search, own).unwrap_err().starts_with("spec.search.image"));
        let fine = ii(
            serde_json::json!({"embedding": {"image": "registry.example/ml/clip:2"}, "search": {"image": own}, "serviceAccountName": "bucket-reader"}),
        );
        assert_eq!(policy.check(&fine, own), Ok(()));
        let exact = ii(serde_json::json!({"embedding": {"image": "ghcr.io/imageindex/imageindex:0.2.0"}}));
        assert_eq!(policy.check(&exact, own), Ok(()));
        let admin = ii(serde_json::json!({"serviceAccountName": "admin"}));
        assert!(policy.check(&admin, own).unwrap_err().starts_with("spec.serviceAccountName \"admin\""));
        assert_eq!(policy.check(&ii(serde_json::json!({})), own), Ok(()), "the namespace's default account");
    }

    #[test]
    fn protected_reads_need_a_token() {
        let search = |s: serde_json::Value| image_index(serde_json::json!({"milvus": {"address": "m"}, "search": s}));
        let err = validate(&search(serde_json::json!({"auth": {"reads": "token"}}))).unwrap_err();
        assert!(err.starts_with("spec.search.auth.reads"), "{err}");
        let read = serde_json::json!({"name": "api", "key": "read"});
        assert!(validate(&search(serde_json::json!({"auth": {"reads": "token", "readTokenSecretRef": read}}))).is_ok());
        let write = serde_json::json!({"auth": {"reads": "token"}, "tokenSecretRef": {"name": "api", "key": "w"}});
        assert!(validate(&search(write)).is_ok());
        assert!(validate(&search(serde_json::json!({"auth": {"reads": "open"}}))).is_ok());
    }

    #[test]
    fn an_unresolved_milvus_holds_the_rest() {
        assert_eq!(ready(&Milvus::Ready("http://m:19530".into())).unwrap(), "http://m:19530");
        let blocked = ready(&Milvus::NotFound("gone".into())).unwrap_err();
        assert_eq!((blocked[0].type_, blocked[0].reason), (MILVUS_READY, reason::MILVUS_NOT_FOUND));
        assert!(blocked[1..].iter().all(|o| o.reason == reason::WAITING) && blocked.len() == 4);
        let blocked = ready(&Milvus::NotReady("starting".into())).unwrap_err();
        assert_eq!(blocked[0].reason, reason::MILVUS_NOT_READY);
    }
}
