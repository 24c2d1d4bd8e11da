//! ListObjectsV2, signed by object_store (so every credential source it supports works: static
//! keys, the environment, web identity, instance metadata) and sent by reqwest. Keys are asked for
//! URL-encoded (`encoding-type=url`), since XML 1.0 cannot carry control characters, and kept as
//! strings: no key can fail the listing.

use std::sync::Arc;
use std::time::Duration;

use object_store::aws::AmazonS3;
use object_store::path::Path;
use object_store::signer::{SignedUrlOptions, Signer};
use serde::Deserialize;

use super::Object;
use crate::store::{Context, Error, Result};

/// Attempts at one page: 5xx, 429 and transport errors are retried with exponential backoff.
const ATTEMPTS: u32 = 6;

#[derive(Clone)]
pub(super) struct Lister {
    s3: Arc<AmazonS3>,
    http: reqwest::Client,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Page {
    #[serde(default)]
    contents: Vec<Contents>,
    encoding_type: Option<String>,
    #[serde(default)]
    is_truncated: bool,
    next_continuation_token: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Contents {
    key: String,
    size: u64,
    #[serde(rename = "ETag")]
    e_tag: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "PascalCase")]
struct S3Error {
    code: Option<String>,
    message: Option<String>,
}

/// A key as S3 sends it with `encoding-type=url`: form-encoded, `+` for a space.
fn decode_key(raw: &str) -> String {
    percent_encoding::percent_decode_str(&raw.replace('+', " ")).decode_utf8_lossy().into_owned()
}

impl Lister {
    pub(super) fn new(s3: Arc<AmazonS3>, custom_endpoint: bool) -> Result<Self> {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .timeout(Duration::from_secs(60))
            .https_only(!custom_endpoint)
            .build()
            .ctx("building the listing's HTTP client")?;
        Ok(Self { s3, http })
    }

    /// Every object whose key starts with `prefix`, in the bucket's order.
    pub(super) async fn list(&self, prefix: &str) -> Result<Vec<Object>> {
        let mut out = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let page = self.page(prefix, token.as_deref()).await?;
            let encoded = page.encoding_type.as_deref() == Some("url");
            out.extend(page.contents.into_iter().map(|c| Object {
                key: if encoded { decode_key(&c.key) } else { c.key },
                etag: c.e_tag,
                size: c.size,
            }));
            match page.next_continuation_token {
                Some(next) if page.is_truncated => token = Some(next),
                _ => return Ok(out),
            }
        }
    }

    async fn page(&self, prefix: &str, token: Option<&str>) -> Result<Page> {
        let mut query = vec![("list-type", "2"), ("encoding-type", "url")];
        if !prefix.is_empty() {
            query.push(("prefix", prefix));
        }
        if let Some(t) = token {
            query.push(("continuation-token", t));
        }
        let opts = SignedUrlOptions::new().with_query(query);
        let mut attempt = 0;
        loop {
            // Signed afresh for each attempt: credentials may have been refreshed.
            let url = self
                .s3
                .signed_url_opts(reqwest::Method::GET, &Path::ROOT, Duration::from_secs(300), &opts)
                .await
                .ctx("signing the listing request")?;
            let transient = match self.http.get(url).send().await {
                Ok(r) if r.status().is_success() => {
                    let body = r.text().await.ctx("reading the listing")?;
                    return quick_xml::de::from_str(&body).ctx("parsing the listing");
                }
                Ok(r) if r.status().is_server_error() || r.status() == reqwest::StatusCode::TOO_MANY_REQUESTS => {
                    format!("HTTP {}", r.status())
                }
                Ok(r) => {
                    // Denied, no such bucket, bad credentials: retrying will not help.
                    let status = r.status();
                    let e: S3Error = quick_xml::de::from_str(&r.text().await.unwrap_or_default()).unwrap_or_default();
                    let what = [e.code, e.message].into_iter().flatten().collect::<Vec<_>>().join(": ");
                    return Err(Error::backend("listing the source", format!("HTTP {status} {what}")));
                }
                Err(e) => e.to_string(),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_parse_and_keys_decode() {
        let xml = r#"<?xml version="1.0" encoding="UTF-8"?>
            <ListBucketResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">
              <Name>b</Name><Prefix>p%2F</Prefix><KeyCount>2</KeyCount><MaxKeys>1000</MaxKeys>
              <EncodingType>url</EncodingType><IsTruncated>true</IsTruncated>
              <Contents><Key>p%2Fa%2F%2Fb.jpg</Key><LastModified>2026-01-01T00:00:00Z</LastModified>
                <ETag>&quot;abc&quot;</ETag><Size>12</Size><StorageClass>STANDARD</StorageClass></Contents>
              <Contents><Key>p%2Fmy+photo%01%2B.jpg</Key><ETag>&quot;d&quot;</ETag><Size>3</Size></Contents>
              <NextContinuationToken>tok</NextContinuationToken>
            </ListBucketResult>"#;
        let page: Page = quick_xml::de::from_str(xml).unwrap();
        assert!(page.is_truncated);
        assert_eq!(page.next_continuation_token.as_deref(), Some("tok"));
        let keys: Vec<String> = page.contents.iter().map(|c| decode_key(&c.key)).collect();
        assert_eq!(keys, ["p/a//b.jpg", "p/my photo\u{1}+.jpg"]);
        assert_eq!((page.contents[0].e_tag.as_deref(), page.contents[0].size), (Some("\"abc\""), 12));
        let empty: Page =
            quick_xml::de::from_str("<ListBucketResult><IsTruncated>false</IsTruncated></ListBucketResult>").unwrap();
        assert!(empty.contents.is_empty() && !empty.is_truncated);
    }
}
