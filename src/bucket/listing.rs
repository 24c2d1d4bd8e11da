//! Bucket listings, one request per page, authorized by object_store's credential chains (static
//! keys, the environment, web identity, workload identity, instance metadata) and sent by reqwest.
//! Keys are kept as strings and asked for URL-encoded where the store can encode them (XML 1.0
//! cannot carry control characters): no key can fail the listing.
//!
//! - S3 and S3-compatible stores: ListObjectsV2 on a presigned URL.
//! - Google Cloud Storage: ListObjectsV2 of its XML API, with the OAuth bearer token.
//! - Azure Blob Storage: List Blobs, signed by object_store's `AzureAuthorizer`.

use std::collections::HashSet;
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures::stream::{self, BoxStream, StreamExt};

use object_store::aws::AmazonS3;
use object_store::azure::{AzureAuthorizer, MicrosoftAzure};
use object_store::gcp::GoogleCloudStorage;
use object_store::path::Path;
use object_store::signer::{SignedUrlOptions, Signer};
use serde::Deserialize;
use url::Url;

use super::Object;
use crate::core::error::{Context, Error, Result};

/// Attempts at one page: 5xx, 429 and transport errors are retried with exponential backoff.
const ATTEMPTS: u32 = 6;

#[derive(Clone)]
pub(super) struct Lister {
    store: Store,
    http: reqwest::Client,
    /// List requests sent (every attempt), for the benchmark and the tests that say who lists.
    requests: Arc<AtomicU64>,
}

#[derive(Clone)]
pub(super) enum Store {
    S3(Arc<AmazonS3>),
    /// `bucket_url` is `<base>/<bucket>`; no bearer token when `anonymous` (a public bucket).
    Gcs {
        gcs: Arc<GoogleCloudStorage>,
        bucket_url: Url,
        anonymous: bool,
    },
    /// `container_url` is `<account URL>/<container>`.
    Azure {
        azure: Arc<MicrosoftAzure>,
        container_url: Url,
        account: String,
    },
}

/// One page of any store's listing.
struct Page {
    objects: Vec<Object>,
    next: Option<String>,
}

impl Lister {
    /// `custom_endpoint`: a server the user named (plain HTTP is allowed there, nowhere else).
    pub(super) fn new(store: Store, custom_endpoint: bool) -> Result<Self> {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .timeout(Duration::from_secs(60))
            .https_only(!custom_endpoint)
            .build()
            .ctx("building the listing's HTTP client")?;
        Ok(Self { store, http, requests: Arc::default() })
    }

    /// List requests this lister (and its clones) sent.
    pub(super) fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// Every object whose key starts with `prefix`, in the bucket's order, one page (up to 1000
    /// objects, the stores' default) at a time: the next page is asked for only when this one
    /// has been taken, so a listing of any size holds one page.
    pub(super) fn pages(&self, prefix: &str) -> BoxStream<'static, Result<Vec<Object>>> {
        let (lister, prefix) = (self.clone(), prefix.to_string());
        // The state: the next page's token (None once the last page was read), and the hashes of
        // the tokens seen so far: a server whose tokens loop would otherwise list forever (8
        // bytes a page, 800 KB at 100 million objects).
        let first: (Option<Option<String>>, HashSet<u64>) = (Some(None), HashSet::new());
        stream::try_unfold(first, move |(state, mut seen)| {
            let (lister, prefix) = (lister.clone(), prefix.clone());
            async move {
                let Some(token) = state else { return Ok(None) };
                let body = lister.page(&prefix, token.as_deref()).await?;
                let page = match lister.store {
                    Store::S3(_) | Store::Gcs { .. } => parse_s3(&body),
                    Store::Azure { .. } => parse_azure(&body),
                }
                .ctx("parsing the listing")?;
                if let Some(next) = &page.next
                    && !seen.insert(token_hash(next))
                {
                    return Err(Error::Invalid(format!(
                        "the listing loops: after {} pages the server sent a continuation token it had sent \
                         before; nothing was planned",
                        seen.len() + 1
                    )));
                }
                Ok(Some((page.objects, (page.next.map(Some), seen))))
            }
        })
        .boxed()
    }

    /// The request for one page, authorized afresh (credentials may have been refreshed).
    async fn request(&self, prefix: &str, token: Option<&str>) -> Result<reqwest::Request> {
        let mut query: Vec<(&str, &str)> = Vec::with_capacity(5);
        match &self.store {
            Store::S3(_) | Store::Gcs { .. } => {
                query.extend([("list-type", "2"), ("encoding-type", "url")]);
                query.extend(token.map(|t| ("continuation-token", t)));
            }
            Store::Azure { .. } => {
                query.extend([("restype", "container"), ("comp", "list")]);
                query.extend(token.map(|t| ("marker", t)));
            }
        }
        if !prefix.is_empty() {
            query.push(("prefix", prefix));
        }
        match &self.store {
            Store::S3(s3) => {
                let opts = SignedUrlOptions::new().with_query(query);
                let url = s3
                    .signed_url_opts(reqwest::Method::GET, &Path::ROOT, Duration::from_secs(300), &opts)
                    .await
                    .ctx("signing the listing request")?;
                self.http.get(url).build().ctx("building the listing request")
            }
            Store::Gcs { gcs, bucket_url, anonymous } => {
                let mut url = bucket_url.clone();
                url.query_pairs_mut().extend_pairs(&query);
                let mut req = self.http.get(url);
                if !anonymous {
                    let token = gcs.credentials().get_credential().await.ctx("getting a Google Cloud token")?;
                    req = req.bearer_auth(&token.bearer);
                }
                req.build().ctx("building the listing request")
            }
            Store::Azure { azure, container_url, account } => {
                let mut url = container_url.clone();
                url.query_pairs_mut().extend_pairs(&query);
                let credential = azure.credentials().get_credential().await.ctx("getting Azure credentials")?;
                let mut req = object_store::client::HttpRequest::new(object_store::client::HttpRequestBody::empty());
                *req.uri_mut() = url.as_str().parse().ctx("building the listing request")?;
                AzureAuthorizer::new(&credential, account)
                    .try_authorize(&mut req)
                    .ctx("signing the listing request")?;
                // The signature covers the URL as signed (a SAS adds its query pairs to it).
                let url = Url::parse(&req.uri().to_string()).ctx("building the listing request")?;
                let mut out = self.http.get(url).build().ctx("building the listing request")?;
                out.headers_mut().extend(req.headers().clone());
                Ok(out)
            }
        }
    }

    /// One page's body, retried on 5xx, 429 and transport errors.
    async fn page(&self, prefix: &str, token: Option<&str>) -> Result<String> {
        let mut attempt = 0;
        loop {
            let req = self.request(prefix, token).await?;
            self.requests.fetch_add(1, Ordering::Relaxed);
            let transient = match self.http.execute(req).await {
                Ok(r) if r.status().is_success() => return r.text().await.ctx("reading the listing"),
                Ok(r) if r.status().is_server_error() || r.status() == reqwest::StatusCode::TOO_MANY_REQUESTS => {
                    format!("HTTP {}", r.status())
                }
                Ok(r) => {
                    // Denied, no such bucket, bad credentials: retrying will not help. All three
                    // stores answer <Error><Code/><Message/></Error>.
                    let status = r.status();
                    let e: StoreError =
                        quick_xml::de::from_str(&r.text().await.unwrap_or_default()).unwrap_or_default();
                    let what = [e.code, e.message].into_iter().flatten().collect::<Vec<_>>().join(": ");
                    return Err(Error::backend("listing the source", format!("HTTP {status} {what}")));
                }
                // reqwest's text has the URL, whose query is a presigned signature.
                Err(e) => crate::core::without_secrets(&e.to_string()),
            };
            attempt += 1;
            if attempt == ATTEMPTS {
                return Err(Error::backend("listing the source", format!("{transient}, {ATTEMPTS} attempts")));
            }
            tracing::warn!("listing the source: {transient}; retrying");
            tokio::time::sleep(Duration::from_millis(100 << attempt)).await;
        }
    }
}

fn token_hash(token: &str) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    token.hash(&mut h);
    h.finish()
}

/// S3's archive classes: a GET answers 403 InvalidObjectState until the object is restored.
/// (`GLACIER_IR`, instant retrieval, reads like any other.)
fn s3_archived(class: Option<&str>) -> bool {
    matches!(class, Some("GLACIER" | "DEEP_ARCHIVE"))
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "PascalCase")]
struct StoreError {
    code: Option<String>,
    message: Option<String>,
}

/// A ListObjectsV2 reply (S3, and Google Cloud Storage's XML API).
#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct S3Page {
    #[serde(default)]
    contents: Vec<S3Contents>,
    encoding_type: Option<String>,
    #[serde(default)]
    is_truncated: bool,
    next_continuation_token: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct S3Contents {
    key: String,
    size: u64,
    #[serde(rename = "ETag")]
    e_tag: Option<String>,
    storage_class: Option<String>,
}

fn parse_s3(body: &str) -> std::result::Result<Page, quick_xml::DeError> {
    let page: S3Page = quick_xml::de::from_str(body)?;
    let encoded = page.encoding_type.as_deref() == Some("url");
    let objects = page
        .contents
        .into_iter()
        .map(|c| Object {
            // Form-encoded, `+` for a space.
            key: if encoded { decode(&c.key.replace('+', " ")) } else { c.key },
            etag: c.e_tag,
            size: c.size,
            archived: s3_archived(c.storage_class.as_deref()),
        })
        .collect();
    let next = page.next_continuation_token.filter(|_| page.is_truncated);
    Ok(Page { objects, next })
}

/// A List Blobs reply (Azure).
#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct AzurePage {
    #[serde(default)]
    blobs: AzureBlobs,
    next_marker: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "PascalCase")]
struct AzureBlobs {
    #[serde(default)]
    blob: Vec<AzureBlob>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct AzureBlob {
    name: AzureName,
    properties: AzureProperties,
}

/// A name that XML cannot carry comes percent-encoded, marked `Encoded="true"`.
#[derive(Deserialize)]
struct AzureName {
    #[serde(rename = "@Encoded", default)]
    encoded: bool,
    #[serde(rename = "$text", default)]
    text: String,
}

#[derive(Deserialize)]
struct AzureProperties {
    #[serde(rename = "Content-Length")]
    size: u64,
    #[serde(rename = "Etag")]
    etag: Option<String>,
    /// `Archive`: a GET answers 409 BlobArchived until the blob is rehydrated.
    #[serde(rename = "AccessTier")]
    access_tier: Option<String>,
}

fn parse_azure(body: &str) -> std::result::Result<Page, quick_xml::DeError> {
    let page: AzurePage = quick_xml::de::from_str(body)?;
    let objects = page
        .blobs
        .blob
        .into_iter()
        .map(|b| Object {
            key: if b.name.encoded { decode(&b.name.text) } else { b.name.text },
            // Quoted, as the ETag header of the object's GET is: the sync compares the listed etag
            // with the one it fetched.
            etag: b.properties.etag.map(|e| if e.starts_with('"') { e } else { format!("\"{e}\"") }),
            size: b.properties.size,
            archived: b.properties.access_tier.as_deref() == Some("Archive"),
        })
        .collect();
    Ok(Page { objects, next: page.next_marker.filter(|m| !m.is_empty()) })
}

fn decode(raw: &str) -> String {
    percent_encoding::percent_decode_str(raw).decode_utf8_lossy().into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(page: &Page) -> Vec<&str> {
        page.objects.iter().map(|o| o.key.as_str()).collect()
    }

    #[test]
    fn s3_pages_parse_and_keys_decode() {
        let xml = r#"<?xml version="1.0" encoding="UTF-8"?>
            <ListBucketResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">
              <Name>b</Name><Prefix>p%2F</Prefix><KeyCount>2</KeyCount><MaxKeys>1000</MaxKeys>
              <EncodingType>url</EncodingType><IsTruncated>true</IsTruncated>
              <Contents><Key>p%2Fa%2F%2Fb.jpg</Key><LastModified>2026-01-01T00:00:00Z</LastModified>
                <ETag>&quot;abc&quot;</ETag><Size>12</Size><StorageClass>STANDARD</StorageClass></Contents>
              <Contents><Key>p%2Fmy+photo%01%2B.jpg</Key><ETag>&quot;d&quot;</ETag><Size>3</Size></Contents>
              <Contents><Key>p%2Fg.jpg</Key><Size>3</Size><StorageClass>GLACIER</StorageClass></Contents>
              <Contents><Key>p%2Fd.jpg</Key><Size>3</Size><StorageClass>DEEP_ARCHIVE</StorageClass></Contents>
              <Contents><Key>p%2Fi.jpg</Key><Size>3</Size><StorageClass>GLACIER_IR</StorageClass></Contents>
              <NextContinuationToken>tok</NextContinuationToken>
            </ListBucketResult>"#;
        let page = parse_s3(xml).unwrap();
        assert_eq!(page.next.as_deref(), Some("tok"));
        assert_eq!(keys(&page), ["p/a//b.jpg", "p/my photo\u{1}+.jpg", "p/g.jpg", "p/d.jpg", "p/i.jpg"]);
        assert_eq!((page.objects[0].etag.as_deref(), page.objects[0].size), (Some("\"abc\""), 12));
        let archived: Vec<bool> = page.objects.iter().map(|o| o.archived).collect();
        assert_eq!(archived, [false, false, true, true, false], "GLACIER and DEEP_ARCHIVE; instant retrieval reads");
        let last = parse_s3(
            "<ListBucketResult><IsTruncated>false</IsTruncated><NextContinuationToken>x</NextContinuationToken>\
             </ListBucketResult>",
        )
        .unwrap();
        assert!(last.objects.is_empty() && last.next.is_none());
    }

    #[test]
    fn azure_pages_parse_and_encoded_names_decode() {
        let xml = r#"<?xml version="1.0" encoding="utf-8"?>
            <EnumerationResults ServiceEndpoint="http://127.0.0.1:10000/devstoreaccount1" ContainerName="c">
              <Prefix>p/</Prefix><MaxResults>2</MaxResults>
              <Blobs>
                <Blob><Name>p/a//b.jpg</Name><Properties><Creation-Time>Sat, 05 Dec 2026 10:00:00 GMT</Creation-Time>
                  <Content-Length>12</Content-Length><Content-Type>image/jpeg</Content-Type>
                  <Etag>0x8DB1</Etag><BlobType>BlockBlob</BlobType></Properties><OrMetadata /></Blob>
                <Blob><Name Encoded="true">p%2Fctl%01%2B%25.jpg</Name><Properties><Content-Length>3</Content-Length>
                  <Etag>"0x8DB2"</Etag><AccessTier>Archive</AccessTier></Properties></Blob>
              </Blobs>
              <NextMarker>m2</NextMarker>
            </EnumerationResults>"#;
        let page = parse_azure(xml).unwrap();
        assert_eq!(keys(&page), ["p/a//b.jpg", "p/ctl\u{1}+%.jpg"]);
        let etags: Vec<_> = page.objects.iter().map(|o| o.etag.as_deref().unwrap()).collect();
        assert_eq!(etags, ["\"0x8DB1\"", "\"0x8DB2\""]);
        assert_eq!((page.objects[0].archived, page.objects[1].archived), (false, true), "the Archive tier");
        assert_eq!(page.objects[0].size, 12);
        assert_eq!(page.next.as_deref(), Some("m2"));
        let last = parse_azure("<EnumerationResults><Blobs /><NextMarker /></EnumerationResults>").unwrap();
        assert!(last.objects.is_empty() && last.next.is_none());
    }
}
