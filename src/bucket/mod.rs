//! The image source: a bucket (S3, Google Cloud Storage, Azure Blob Storage) or a folder behind
//! `object_store`, listed with include globs, and its objects read. A leaf: it uses `core` only
//! (the listed `Object` and the backends' `Error` live there, since the catalog and the planner
//! take them too).
//!
//! Buckets are listed by `listing` (each store's list request, authorized by object_store), not by
//! object_store's own lister: that one fails the whole listing on a single key its `Path` cannot
//! hold (`a//b.jpg`, `./x.jpg`, a control character), so anyone who can write to the bucket could
//! freeze the index. Such keys are listed like any other; fetching one fails for that object alone.

mod listing;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::stream::{self, BoxStream};
use futures::{StreamExt, TryStreamExt};
use globset::{Glob, GlobSet, GlobSetBuilder};
use listing::{Lister, Store};
use object_store::aws::{AmazonS3, AmazonS3Builder, AmazonS3ConfigKey};
use object_store::azure::{AzureConfigKey, MicrosoftAzure, MicrosoftAzureBuilder};
use object_store::gcp::{GoogleCloudStorageBuilder, GoogleConfigKey};
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::{BackoffConfig, ObjectStore, ObjectStoreExt, RetryConfig};
use url::Url;

pub use crate::core::Object;
use crate::core::error::{Error, Result};
use crate::core::{Redacted, without_secrets};

#[derive(Clone, Debug, Default)]
pub struct SourceConfig {
    /// `s3://bucket/prefix/`, `gs://bucket/prefix/`, `az://container/prefix/` or `file:///path`
    /// (a bare path also works).
    pub url: String,
    /// The store's endpoint: an S3-compatible server (MinIO, SeaweedFS, ...; path-style requests),
    /// an Azure account URL, or a Google Cloud Storage XML API base URL.
    pub endpoint: Option<String>,
    pub include: Vec<String>,
    /// The store's settings by their environment names (`AWS_SECRET_ACCESS_KEY`,
    /// `AZURE_STORAGE_ACCOUNT_KEY`, `GOOGLE_SERVICE_ACCOUNT_KEY`...), over the environment's:
    /// the keys of a mounted Secret. Names the store does not know are ignored, as in the
    /// environment.
    pub settings: Vec<(String, Redacted)>,
}

/// An object's bytes, with the etag and size of what was fetched (which may be newer than the
/// listing).
#[derive(Clone, Debug)]
pub struct Fetched {
    pub bytes: Bytes,
    pub etag: Option<String>,
    pub size: u64,
}

#[derive(Clone)]
pub struct Source {
    store: Arc<dyn ObjectStore>,
    /// Lists buckets (None for a folder, which object_store lists entry by entry).
    lister: Option<Lister>,
    prefix: Path,
    include: GlobSet,
}

/// Retries of one request to the bucket (5xx, 429, timeouts, resets), with exponential backoff.
/// Bounded in time, so that a bucket that stays down stops the run within a minute or so.
fn retry_config() -> RetryConfig {
    RetryConfig {
        backoff: BackoffConfig {
            init_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(5),
            base: 2.0,
        },
        max_retries: 5,
        retry_timeout: Duration::from_secs(30),
    }
}

impl Source {
    pub fn open(cfg: &SourceConfig) -> Result<Self> {
        crate::install_crypto(); // object_store's HTTP client takes the process's provider
        let url = parse_url(&cfg.url)?;
        let (store, lister, prefix): (Arc<dyn ObjectStore>, _, Path) = match url.scheme() {
            "s3" => {
                let s3 = Arc::new(s3_store(&url, cfg)?);
                (s3.clone(), Some(Store::S3(s3)), url_prefix(&url)?)
            }
            "gs" => {
                let (gcs, store) = gcs_store(&url, cfg)?;
                (gcs, Some(store), url_prefix(&url)?)
            }
            "az" => {
                let (azure, store) = azure_store(&url, cfg)?;
                (azure, Some(store), url_prefix(&url)?)
            }
            "file" => {
                let dir = url.to_file_path().map_err(|_| Error::Invalid(format!("bad file URL {url}")))?;
                if !dir.is_dir() {
                    return Err(Error::Invalid(format!("{} is not a directory", dir.display())));
                }
                let fs = LocalFileSystem::new_with_prefix(&dir).map_err(|e| Error::Invalid(e.to_string()))?;
                (Arc::new(fs), None, Path::default())
            }
            other => {
                return Err(Error::Invalid(format!(
                    "unsupported source scheme {other}:// (s3://, gs://, az:// and file:// are supported)"
                )));
            }
        };
        let lister = lister.map(|s| Lister::new(s, cfg.endpoint.is_some())).transpose()?;
        let patterns: Vec<&str> = if cfg.include.is_empty() {
            crate::contract::DEFAULT_INCLUDE.to_vec()
        } else {
            cfg.include.iter().map(String::as_str).collect()
        };
        let mut set = GlobSetBuilder::new();
        for p in patterns {
            // Case-insensitive: photo.JPG is as much a photo as photo.jpg.
            let glob =
                Glob::new(&p.to_lowercase()).map_err(|e| Error::Invalid(format!("bad include glob {p:?}: {e}")))?;
            set.add(glob);
        }
        let include = set.build().map_err(|e| Error::Invalid(e.to_string()))?;
        Ok(Self { store, lister, prefix, include })
    }

    fn location(&self, key: &str) -> Result<Path> {
        let key = Path::parse(key).map_err(|e| {
            Error::Invalid(format!("the key {key:?} cannot be fetched safely ({e}); rename the object"))
        })?;
        let mut loc = self.prefix.clone();
        loc.extend(key.parts());
        Ok(loc)
    }

    /// Every object under the prefix that an include glob matches, sorted by key. Keys are as
    /// the bucket has them, including ones that cannot be fetched (see the module comment).
    pub async fn list(&self) -> Result<Vec<Object>> {
        let pages: Vec<Vec<Object>> = self.pages().try_collect().await?;
        let mut all: Vec<Object> = pages.into_iter().flatten().collect();
        all.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(all)
    }

    /// The same listing a page at a time, in the order the store sends it, which is not
    /// trusted to be any order (the planner sorts it: `sync::sorted`): a bucket's listing is never
    /// held whole. A folder is listed whole (folders are laptop-sized).
    pub fn pages(&self) -> BoxStream<'static, Result<Vec<Object>>> {
        let under = self.prefix_dir();
        let include = self.include.clone();
        let keep = move |page: Vec<Object>| -> Vec<Object> {
            page.into_iter()
                .filter_map(|mut o| {
                    o.key = o.key.strip_prefix(&under)?.to_string();
                    include.is_match(o.key.to_lowercase()).then_some(o)
                })
                .collect()
        };
        match &self.lister {
            Some(lister) => lister.pages(&self.prefix_dir()).map_ok(keep).boxed(),
            None => {
                let this = self.clone();
                stream::once(async move { Ok(keep(this.list_folder().await?)) }).boxed()
            }
        }
    }

    /// List requests sent to the bucket by this source and its clones (none for a folder).
    pub fn list_requests(&self) -> u64 {
        self.lister.as_ref().map_or(0, Lister::requests)
    }

    /// The prefix as a folder, `photos/` (empty for the whole bucket): `photos` lists
    /// photos/..., never photos2/...
    fn prefix_dir(&self) -> String {
        match self.prefix.as_ref() {
            "" => String::new(),
            p => format!("{p}/"),
        }
    }

    /// A folder, through object_store. A file it cannot name (a name that is not UTF-8, say) is
    /// skipped with a warning; the listing goes on.
    async fn list_folder(&self) -> Result<Vec<Object>> {
        let mut entries = self.store.list(None);
        let mut out = Vec::new();
        while let Some(entry) = entries.next().await {
            match entry {
                Ok(m) => out.push(Object { key: m.location.to_string(), etag: m.e_tag, size: m.size, archived: false }),
                Err(e @ object_store::Error::InvalidPath { .. }) => tracing::warn!("skipping a file: {e}"),
                Err(e) => return Err(Error::backend("listing the source", e)),
            }
        }
        Ok(out)
    }

    /// Whether the object is there (a HEAD): the proof a sync asks for before it deletes a vector.
    pub async fn exists(&self, key: &str) -> Result<bool> {
        match self.store.head(&self.location(key)?).await.map_err(|e| bucket_error(key, "checking", e)) {
            Ok(_) => Ok(true),
            Err(Error::NotFound(_)) => Ok(false),
            Err(e) => Err(e),
        }
    }

    pub async fn get(&self, key: &str) -> Result<Bytes> {
        Ok(self.fetch(key, u64::MAX).await?.bytes)
    }

    /// The object's bytes, refused (`Error::TooLarge`) without reading them if the object is now
    /// larger than `max_bytes` (it may have been replaced since it was listed).
    pub async fn fetch(&self, key: &str, max_bytes: u64) -> Result<Fetched> {
        let loc = self.location(key)?;
        let got = self.store.get(&loc).await.map_err(|e| bucket_error(key, "fetching", e))?;
        let (etag, size) = (got.meta.e_tag.clone(), got.meta.size);
        if size > max_bytes {
            return Err(Error::TooLarge(format!("object is {size} bytes, more than the limit of {max_bytes}")));
        }
        let bytes = got.bytes().await.map_err(|e| bucket_error(key, "fetching", e))?;
        Ok(Fetched { bytes, etag, size })
    }

    /// Writes an object; returns its etag.
    pub async fn put(&self, key: &str, data: Bytes) -> Result<Option<String>> {
        let put = self.store.put(&self.location(key)?, data.into()).await;
        Ok(put.map_err(|e| bucket_error(key, "writing", e))?.e_tag)
    }

    /// The object's bytes as a stream, for serving it without holding it in memory.
    pub async fn stream(&self, key: &str) -> Result<futures::stream::BoxStream<'static, object_store::Result<Bytes>>> {
        let got = self.store.get(&self.location(key)?).await.map_err(|e| bucket_error(key, "fetching", e))?;
        Ok(got.into_stream())
    }

    pub async fn delete(&self, key: &str) -> Result<()> {
        self.store.delete(&self.location(key)?).await.map_err(|e| bucket_error(key, "deleting", e))
    }
}

/// `s3://bucket/prefix/`: AWS, or an S3-compatible server at `endpoint` (path-style).
fn s3_store(url: &Url, cfg: &SourceConfig) -> Result<AmazonS3> {
    // Keys and region come from the environment (AWS_ACCESS_KEY_ID, ...), as in a pod with a
    // Secret, or from web identity (IRSA) and instance metadata.
    let mut b = AmazonS3Builder::from_env()
        .with_bucket_name(bucket(url)?)
        .with_virtual_hosted_style_request(false)
        .with_retry(retry_config());
    b = configured(b, &cfg.settings, |b, k: AmazonS3ConfigKey, v| b.with_config(k, v));
    if let Some(ep) = &cfg.endpoint {
        b = b.with_endpoint(ep).with_allow_http(ep.starts_with("http://"));
    }
    b.build().map_err(|e| Error::Invalid(format!("configuring the S3 client: {e}")))
}

/// `gs://bucket/prefix/`: credentials from the environment (GOOGLE_APPLICATION_CREDENTIALS, a
/// service account key) or the metadata server (GKE Workload Identity); `endpoint` is the XML
/// API's base URL (storage.googleapis.com when unset).
fn gcs_store(url: &Url, cfg: &SourceConfig) -> Result<(Arc<dyn ObjectStore>, Store)> {
    let name = bucket(url)?;
    let mut b = GoogleCloudStorageBuilder::from_env().with_bucket_name(name).with_retry(retry_config());
    b = configured(b, &cfg.settings, |b, k: GoogleConfigKey, v| b.with_config(k, v));
    if let Some(ep) = &cfg.endpoint {
        b = b
            .with_base_url(ep.trim_end_matches('/'))
            .with_client_options(object_store::ClientOptions::new().with_allow_http(ep.starts_with("http://")));
    }
    let base = b.get_config_value(&GoogleConfigKey::BaseUrl).unwrap_or_else(|| "https://storage.googleapis.com".into());
    let anonymous = b.get_config_value(&GoogleConfigKey::SkipSignature).is_some_and(|v| v == "true");
    let bucket_url = Url::parse(&format!("{}/", base.trim_end_matches('/')))
        .and_then(|u| u.join(name))
        .map_err(|e| Error::Invalid(format!("bad Google Cloud Storage endpoint {base}: {e}")))?;
    let gcs = Arc::new(b.build().map_err(|e| Error::Invalid(format!("configuring the Google Cloud client: {e}")))?);
    Ok((gcs.clone(), Store::Gcs { gcs, bucket_url, anonymous }))
}

/// `az://container/prefix/`: the account and its credentials from the environment
/// (AZURE_STORAGE_ACCOUNT_NAME with AZURE_STORAGE_ACCOUNT_KEY or a SAS, or AKS Workload
/// Identity); `endpoint` is the account's URL (Azurite: `http://127.0.0.1:10000/devstoreaccount1`).
fn azure_store(url: &Url, cfg: &SourceConfig) -> Result<(Arc<dyn ObjectStore>, Store)> {
    let container = bucket(url)?;
    let mut b = MicrosoftAzureBuilder::from_env().with_container_name(container).with_retry(retry_config());
    b = configured(b, &cfg.settings, |b, k: AzureConfigKey, v| b.with_config(k, v));
    if let Some(ep) = &cfg.endpoint {
        b = b.with_endpoint(ep.trim_end_matches('/').into()).with_allow_http(ep.starts_with("http://"));
    }
    let account = b
        .get_config_value(&AzureConfigKey::AccountName)
        .or_else(|| cfg.endpoint.as_deref().and_then(azure_account))
        .ok_or_else(|| {
            Error::Invalid("an az:// source needs AZURE_STORAGE_ACCOUNT_NAME or the account's URL as endpoint".into())
        })?;
    b = b.with_account(&account);
    let account_url = cfg.endpoint.clone().unwrap_or_else(|| format!("https://{account}.blob.core.windows.net"));
    let container_url = Url::parse(&format!("{}/", account_url.trim_end_matches('/')))
        .and_then(|u| u.join(container))
        .map_err(|e| Error::Invalid(format!("bad Azure endpoint {account_url}: {e}")))?;
    let azure: Arc<MicrosoftAzure> =
        Arc::new(b.build().map_err(|e| Error::Invalid(format!("configuring the Azure client: {e}")))?);
    Ok((azure.clone(), Store::Azure { azure, container_url, account }))
}

/// `builder` with each setting its store knows (by the lower-cased environment name, as
/// object_store's `from_env` reads them).
fn configured<B, K: std::str::FromStr>(
    mut builder: B,
    settings: &[(String, Redacted)],
    with: impl Fn(B, K, String) -> B,
) -> B {
    for (name, value) in settings {
        if let Ok(key) = name.to_ascii_lowercase().parse::<K>() {
            builder = with(builder, key, value.expose().to_string());
        }
    }
    builder
}

/// The account an Azure endpoint names: `https://<account>.blob.core.windows.net`, or Azurite's
/// `http://127.0.0.1:10000/<account>`.
fn azure_account(endpoint: &str) -> Option<String> {
    let url = Url::parse(endpoint).ok()?;
    let host = url.host_str()?;
    let account = match host.split_once(".blob.") {
        Some((account, _)) => account,
        None => url.path_segments()?.find(|s| !s.is_empty())?,
    };
    Some(account.to_string())
}

/// The bucket (or container) of `scheme://bucket/prefix`.
fn bucket(url: &Url) -> Result<&str> {
    url.host_str().filter(|h| !h.is_empty()).ok_or_else(|| Error::Invalid(format!("{url}: the URL needs a bucket")))
}

/// The prefix of `scheme://bucket/prefix`. The URL's path is percent-encoded (`my%20photos/`);
/// the keys under it are not.
fn url_prefix(url: &Url) -> Result<Path> {
    let path = percent_encoding::percent_decode_str(url.path())
        .decode_utf8()
        .map_err(|_| Error::Invalid(format!("the prefix in {url} is not UTF-8")))?;
    Path::parse(path).map_err(|e| Error::Invalid(format!("bad prefix in {url}: {e}")))
}

/// NotFound is its own case (the sync skips an object deleted since the listing), and so is a
/// bucket that answered but refused this object (any 4xx but 408 and 429, which object_store
/// retries: 403, 401, 400 for an SSE-C object read without its key, a failed precondition):
/// that is about the object, not a bucket that is down. An archived object says so in its error
/// body. What is left failed after object_store's retries.
fn bucket_error(key: &str, doing: &str, e: object_store::Error) -> Error {
    use object_store::Error as E;
    let text = error_chain(&e);
    // The message keeps no URL's query (an Azure SAS travels in it).
    let said = |e: &E| without_secrets(&format!("{doing} {key:?}: {e}"));
    if text.contains("InvalidObjectState") || text.contains("BlobArchived") {
        return Error::Archived(said(&e));
    }
    if matches!(e, E::Generic { .. }) && client_error(&text) {
        return Error::Refused(said(&e));
    }
    match e {
        E::NotFound { .. } => Error::NotFound(format!("object {key:?}")),
        e @ (E::PermissionDenied { .. }
        | E::Unauthenticated { .. }
        | E::Precondition { .. }
        | E::NotModified { .. }
        | E::NotSupported { .. }
        | E::NotImplemented { .. }
        | E::InvalidPath { .. }) => Error::Refused(said(&e)),
        e => Error::backend(format!("{doing} {key:?}"), e),
    }
}

/// An error and its sources, as one line: object_store keeps the server's status and body in
/// a source whose type it does not export.
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// Whether object_store's text names a 4xx status the server answered, other than the 408 and
/// 429 it retries (`Server returned non-2xx status code: 400 Bad Request: ...`).
fn client_error(text: &str) -> bool {
    text.match_indices("status code: ").any(|(i, m)| {
        let code = text[i + m.len()..].get(..3).and_then(|c| c.parse::<u16>().ok());
        matches!(code, Some(c) if (400..500).contains(&c) && c != 408 && c != 429)
    })
}

fn parse_url(s: &str) -> Result<Url> {
    match Url::parse(s) {
        Ok(u) => Ok(u),
        // A bare path: a local folder.
        Err(url::ParseError::RelativeUrlWithoutBase) => {
            let bad = || Error::Invalid(format!("bad path {s}"));
            let abs = std::path::absolute(s).map_err(|_| bad())?;
            Url::from_directory_path(&abs).map_err(|_| bad())
        }
        Err(e) => Err(Error::Invalid(format!("bad source URL {s:?}: {e}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_errors_are_told_from_servers_that_are_down() {
        assert!(client_error(
            "Error performing GET x in 2ms - Server returned non-2xx status code: 400 Bad Request: <Error>"
        ));
        assert!(client_error("a: b: Server returned non-2xx status code: 403 Forbidden: "));
        for down in
            ["status code: 500 Internal", "status code: 429 Too Many", "status code: 408 R", "status code: 4", "reset"]
        {
            assert!(!client_error(down), "{down}");
        }
    }

    #[test]
    fn azure_endpoints_name_their_account() {
        assert_eq!(azure_account("https://photos.blob.core.windows.net/").as_deref(), Some("photos"));
        assert_eq!(azure_account("http://127.0.0.1:10000/devstoreaccount1").as_deref(), Some("devstoreaccount1"));
        assert_eq!(azure_account("http://127.0.0.1:10000/"), None);
    }

    #[test]
    fn bucket_urls_need_a_bucket_and_a_known_scheme() {
        for (url, error) in [
            ("gs:///photos/", "needs a bucket"),
            ("az:///photos/", "needs a bucket"),
            ("ftp://host/photos/", "s3://, gs://, az:// and file:// are supported"),
        ] {
            let err = Source::open(&SourceConfig { url: url.into(), ..Default::default() }).err().expect(url);
            assert!(err.to_string().contains(error), "{url}: {err}");
        }
    }

    #[tokio::test]
    async fn lists_a_folder_with_globs_case_insensitively() {
        let dir = std::env::temp_dir().join(format!("imageindex-src-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("a/b")).unwrap();
        for f in ["x.jpg", "a/y.PNG", "a/b/z.webp", "notes.txt", "a/b/w.gif"] {
            std::fs::write(dir.join(f), b"data").unwrap();
        }
        let src = Source::open(&SourceConfig { url: dir.display().to_string(), ..Default::default() }).unwrap();
        let keys: Vec<_> = src.list().await.unwrap().into_iter().map(|o| o.key).collect();
        assert_eq!(keys, ["a/b/z.webp", "a/y.PNG", "x.jpg"]);
        assert_eq!(src.get("a/y.PNG").await.unwrap().as_ref(), b"data");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
