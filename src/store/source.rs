//! The image source: a bucket or folder behind `object_store`, listed with include globs.

use std::sync::Arc;

use bytes::Bytes;
use futures::TryStreamExt;
use globset::{Glob, GlobSet, GlobSetBuilder};
use object_store::aws::AmazonS3Builder;
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt};
use url::Url;

use super::{Context, Error, Result};

/// Default include patterns: the formats we decode.
pub const DEFAULT_INCLUDE: &[&str] = &["**/*.jpg", "**/*.jpeg", "**/*.png", "**/*.webp"];

/// One listed object. `key` is relative to the source prefix.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Object {
    pub key: String,
    pub etag: Option<String>,
    pub size: u64,
}

#[derive(Clone, Debug, Default)]
pub struct SourceConfig {
    /// `s3://bucket/prefix/` or `file:///path` (a bare path also works).
    pub url: String,
    /// S3-compatible endpoint (MinIO, SeaweedFS, ...); path-style requests are used.
    pub endpoint: Option<String>,
    pub include: Vec<String>,
    /// S3 keys; when unset they come from the environment (AWS_ACCESS_KEY_ID, ...), as in a pod
    /// with the Secret as env. The operator passes the Secret's values here.
    pub credentials: Option<S3Credentials>,
}

#[derive(Clone, Default, PartialEq, Eq)]
pub struct S3Credentials {
    pub access_key_id: String,
    pub secret_access_key: String,
    pub region: Option<String>,
}

impl std::fmt::Debug for S3Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Credentials").field("access_key_id", &self.access_key_id).finish_non_exhaustive()
    }
}

#[derive(Clone)]
pub struct Source {
    store: Arc<dyn ObjectStore>,
    prefix: Path,
    include: GlobSet,
}

impl Source {
    pub fn open(cfg: &SourceConfig) -> Result<Self> {
        crate::install_crypto(); // object_store's HTTP client takes the process's provider
        let url = parse_url(&cfg.url)?;
        let (store, prefix): (Arc<dyn ObjectStore>, Path) = match url.scheme() {
            "s3" => {
                let bucket =
                    url.host_str().ok_or_else(|| Error::Invalid(format!("{url}: an s3 URL needs a bucket")))?;
                // Keys and region come from the environment (AWS_ACCESS_KEY_ID, ...), as in a pod with a Secret.
                let mut b =
                    AmazonS3Builder::from_env().with_bucket_name(bucket).with_virtual_hosted_style_request(false);
                if let Some(c) = &cfg.credentials {
                    b = b.with_access_key_id(&c.access_key_id).with_secret_access_key(&c.secret_access_key);
                    if let Some(r) = &c.region {
                        b = b.with_region(r);
                    }
                }
                if let Some(ep) = &cfg.endpoint {
                    b = b.with_endpoint(ep).with_allow_http(ep.starts_with("http://"));
                }
                // The URL's path is percent-encoded (`my%20photos/`); the keys under it are not.
                let path = percent_encoding::percent_decode_str(url.path())
                    .decode_utf8()
                    .map_err(|_| Error::Invalid(format!("the prefix in {url} is not UTF-8")))?;
                let prefix = Path::parse(path).map_err(|e| Error::Invalid(format!("bad prefix in {url}: {e}")))?;
                (Arc::new(b.build().map_err(|e| Error::Invalid(format!("configuring the S3 client: {e}")))?), prefix)
            }
            "file" => {
                let dir = url.to_file_path().map_err(|_| Error::Invalid(format!("bad file URL {url}")))?;
                if !dir.is_dir() {
                    return Err(Error::Invalid(format!("{} is not a directory", dir.display())));
                }
                let fs = LocalFileSystem::new_with_prefix(&dir).map_err(|e| Error::Invalid(e.to_string()))?;
                (Arc::new(fs), Path::default())
            }
            other => {
                return Err(Error::Invalid(format!(
                    "unsupported source scheme {other}:// (s3:// and file:// are supported)"
                )));
            }
        };
        let patterns: Vec<&str> = if cfg.include.is_empty() {
            DEFAULT_INCLUDE.to_vec()
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
        Ok(Self { store, prefix, include })
    }

    fn location(&self, key: &str) -> Result<Path> {
        let key = Path::parse(key).map_err(|e| Error::Invalid(format!("bad object key {key:?}: {e}")))?;
        let mut loc = self.prefix.clone();
        loc.extend(key.parts());
        Ok(loc)
    }

    /// Every object under the prefix that an include glob matches, sorted by key.
    pub async fn list(&self) -> Result<Vec<Object>> {
        let prefix = (!self.prefix.as_ref().is_empty()).then_some(&self.prefix);
        let metas: Vec<_> = self.store.list(prefix).try_collect().await.ctx("listing the source")?;
        let strip = self.prefix.as_ref().len();
        let mut out: Vec<Object> = metas
            .into_iter()
            .filter_map(|m| {
                let full = m.location.as_ref();
                let key = full[strip..].trim_start_matches('/').to_string();
                self.include.is_match(key.to_lowercase()).then_some(Object { key, etag: m.e_tag, size: m.size })
            })
            .collect();
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    pub async fn get(&self, key: &str) -> Result<Bytes> {
        let loc = self.location(key)?;
        let got = self.store.get(&loc).await.map_err(|e| bucket_error(key, "fetching", e))?;
        got.bytes().await.map_err(|e| bucket_error(key, "fetching", e))
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

/// NotFound is its own case: the sync skips an object deleted since the listing.
fn bucket_error(key: &str, doing: &str, e: object_store::Error) -> Error {
    match e {
        object_store::Error::NotFound { .. } => Error::NotFound(format!("object {key:?}")),
        e => Error::backend(format!("{doing} {key:?}"), e),
    }
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
