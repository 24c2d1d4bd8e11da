//! An S3 proxy in front of SeaweedFS that fails requests, refuses objects, hides them, and adds
//! keys to listings: the bucket misbehaving, for the fault cases (issue 12).

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use imageindex::bucket::{Source, SourceConfig};

use super::support::*;

/// What the proxy does to requests. Keys are relative to the fixture's prefix.
#[derive(Default)]
pub struct Faults {
    /// Every `n`th object GET answers 500 (0: none).
    pub fail_every: AtomicUsize,
    /// Object GETs answered 403 AccessDenied.
    pub deny: Mutex<HashSet<String>>,
    /// Object GETs answered 404, as if deleted after the listing.
    pub vanish: Mutex<HashSet<String>>,
    /// The bucket itself, where `vanish` really deletes the object before answering 404 (an
    /// object deleted between the listing and the GET); unset, the object only looks gone.
    pub bucket: Mutex<Option<Source>>,
    /// Keys the listing reports that are not in the bucket (odd names), 10 bytes each.
    pub inject: Mutex<Vec<String>>,
    /// Keys whose listed size is rewritten to 10 bytes (the object is then "replaced" by a larger one).
    pub shrink: Mutex<HashSet<String>>,
    /// Every request answers 503.
    pub down: AtomicBool,
    /// Writes and deletes (anything but GET and HEAD) answer 403.
    pub read_only: AtomicBool,
    /// The next listing, once read from the bucket, is held: the sender says it was read, and
    /// the reply waits for the receiver.
    pub hold_listing: Mutex<Option<(tokio::sync::oneshot::Sender<()>, tokio::sync::oneshot::Receiver<()>)>>,
    pub object_gets: AtomicUsize,
    pub injected_500s: AtomicUsize,
    /// Keys listed with `StorageClass` GLACIER whose GETs answer 403 InvalidObjectState.
    pub glacier: Mutex<HashSet<String>>,
    /// Keys whose GETs answer 403 InvalidObjectState though listed STANDARD (Intelligent-Tiering's
    /// archive tiers).
    pub archived_tier: Mutex<HashSet<String>>,
    /// Keys whose GETs answer 400, as an SSE-C object read without its customer key.
    pub customer_key: Mutex<HashSet<String>>,
    /// Every listing page says it is truncated with one and the same continuation token.
    pub token_loop: AtomicBool,
    /// The first listing page is sent twice: truncated, then again as the page after it.
    pub repeat_page: AtomicBool,
    /// The keys of every object GET, in order.
    pub gets: Mutex<Vec<String>>,
    /// The latest first page of a listing, as sent (before `token_loop` or `repeat_page`).
    pub first_page: Mutex<Option<String>>,
}

pub struct S3Proxy {
    pub endpoint: String,
    pub faults: Arc<Faults>,
}

struct ProxyState {
    upstream: String,
    http: reqwest::Client,
    faults: Arc<Faults>,
}

fn s3_error(status: StatusCode, code: &str) -> Response {
    let body = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>{code}</Code><Message>{code} (injected)</Message></Error>"
    );
    (status, [("content-type", "application/xml")], body).into_response()
}

/// The key relative to the fixture's prefix, from a path-style object path `/bucket/prefix/key`.
fn relative_key(path: &str) -> String {
    let decoded = percent_encoding::percent_decode_str(path).decode_utf8_lossy().into_owned();
    decoded.splitn(4, '/').nth(3).unwrap_or_default().to_string()
}

fn query_param(query: &str, name: &str) -> Option<String> {
    url::form_urlencoded::parse(query.as_bytes()).find(|(k, _)| k == name).map(|(_, v)| v.into_owned())
}

async fn handle(State(st): State<Arc<ProxyState>>, req: Request) -> Response {
    let f = &st.faults;
    if f.down.load(Ordering::SeqCst) {
        return s3_error(StatusCode::SERVICE_UNAVAILABLE, "ServiceUnavailable");
    }
    let (parts, body) = req.into_parts();
    if f.read_only.load(Ordering::SeqCst) && !matches!(parts.method.as_str(), "GET" | "HEAD") {
        return s3_error(StatusCode::FORBIDDEN, "AccessDenied");
    }
    let query = parts.uri.query().unwrap_or_default().to_string();
    let listing = parts.method == "GET" && query_param(&query, "list-type").is_some();
    let on_object = !listing && parts.uri.path().matches('/').count() >= 2;
    if on_object && f.deny.lock().unwrap().contains(&relative_key(parts.uri.path())) {
        return s3_error(StatusCode::FORBIDDEN, "AccessDenied");
    }
    if on_object && parts.method == "GET" {
        let key = relative_key(parts.uri.path());
        f.gets.lock().unwrap().push(key.clone());
        if f.glacier.lock().unwrap().contains(&key) || f.archived_tier.lock().unwrap().contains(&key) {
            return s3_error(StatusCode::FORBIDDEN, "InvalidObjectState");
        }
        if f.customer_key.lock().unwrap().contains(&key) {
            return s3_error(StatusCode::BAD_REQUEST, "InvalidRequest");
        }
        if f.vanish.lock().unwrap().contains(&key) {
            let bucket = f.bucket.lock().unwrap().clone();
            if let Some(bucket) = bucket {
                bucket.delete(&key).await.unwrap();
            }
            return s3_error(StatusCode::NOT_FOUND, "NoSuchKey");
        }
        let n = f.fail_every.load(Ordering::SeqCst);
        if n > 0 && f.object_gets.fetch_add(1, Ordering::SeqCst) % n == 0 {
            f.injected_500s.fetch_add(1, Ordering::SeqCst);
            return s3_error(StatusCode::INTERNAL_SERVER_ERROR, "InternalError");
        }
    }
    // A looping or repeating listing: a token we made up is answered with the first page again.
    let made_up = query_param(&query, "continuation-token").filter(|t| t == LOOP || t == AGAIN);
    if listing && let Some(token) = made_up {
        let first = f.first_page.lock().unwrap().clone().unwrap_or_default();
        let xml = if token == LOOP { truncated(&first, LOOP) } else { first };
        return (StatusCode::OK, [("content-type", "application/xml")], xml).into_response();
    }
    let url = format!("{}{}", st.upstream, parts.uri.path_and_query().map_or("/", |p| p.as_str()));
    let body = axum::body::to_bytes(body, usize::MAX).await.unwrap();
    // Headers as sent, Host included: the SigV4 signature covers it.
    let upstream = st.http.request(parts.method.clone(), url).headers(parts.headers.clone()).body(body).send().await;
    let Ok(resp) = upstream else { return s3_error(StatusCode::BAD_GATEWAY, "ProxyError") };
    let status = StatusCode::from_u16(resp.status().as_u16()).unwrap();
    let mut headers = resp.headers().clone();
    headers.remove("content-length");
    headers.remove("transfer-encoding");
    let mut bytes = resp.bytes().await.unwrap().to_vec();
    if listing && status.is_success() {
        bytes = rewrite_listing(f, &query, String::from_utf8(bytes).unwrap()).into_bytes();
        let held = f.hold_listing.lock().unwrap().take();
        if let Some((read, release)) = held {
            read.send(()).unwrap();
            release.await.unwrap();
        }
    }
    let mut out = Response::new(Body::from(bytes));
    *out.status_mut() = status;
    *out.headers_mut() = headers;
    out
}

const LOOP: &str = "loop";
const AGAIN: &str = "again";

/// Marks a page truncated, with `token` as the next page's.
fn truncated(xml: &str, token: &str) -> String {
    let xml = xml.replace("<IsTruncated>false</IsTruncated>", "<IsTruncated>true</IsTruncated>");
    xml.replace(
        "</ListBucketResult>",
        &format!("<NextContinuationToken>{token}</NextContinuationToken></ListBucketResult>"),
    )
}

/// Adds the injected keys to a listing page and shrinks the listed sizes of `shrink`'s keys;
/// marks `glacier`'s keys archived; loops or repeats pages.
fn rewrite_listing(f: &Faults, query: &str, xml: String) -> String {
    let prefix = query_param(query, "prefix").unwrap_or_default();
    let mut xml = rewrite_keys(f, query, &prefix, xml);
    for key in f.glacier.lock().unwrap().iter() {
        let encoded =
            percent_encoding::utf8_percent_encode(&format!("{prefix}{key}"), percent_encoding::NON_ALPHANUMERIC)
                .to_string();
        for tag in [format!("<Key>{encoded}</Key>"), format!("<Key>{prefix}{key}</Key>")] {
            if let Some(at) = xml.find(&tag) {
                let end = xml[at..].find("</Contents>").unwrap() + at;
                let class = xml[at..end].find("<StorageClass>").map(|i| i + at);
                match class {
                    Some(i) => {
                        let j = xml[i..].find("</StorageClass>").unwrap() + i;
                        xml.replace_range(i..j, "<StorageClass>GLACIER");
                    }
                    None => xml.insert_str(end, "<StorageClass>GLACIER</StorageClass>"),
                }
                break;
            }
        }
    }
    let token = query_param(query, "continuation-token");
    if token.is_none() {
        *f.first_page.lock().unwrap() = Some(xml.clone());
    }
    if f.token_loop.load(Ordering::SeqCst) {
        xml = truncated(&xml, LOOP);
    } else if f.repeat_page.load(Ordering::SeqCst) && token.is_none() {
        xml = truncated(&xml, AGAIN);
    }
    xml
}

fn rewrite_keys(f: &Faults, query: &str, prefix: &str, mut xml: String) -> String {
    let encoded = query_param(query, "encoding-type").as_deref() == Some("url");
    let encode = |k: &str| -> String {
        if encoded {
            percent_encoding::utf8_percent_encode(k, percent_encoding::NON_ALPHANUMERIC).to_string()
        } else {
            k.replace('&', "&amp;").replace('<', "&lt;")
        }
    };
    for key in f.shrink.lock().unwrap().iter() {
        let tag = format!("<Key>{}</Key>", encode(&format!("{prefix}{key}")));
        if let Some(at) = xml.find(&tag) {
            let (start, end) = (xml[at..].find("<Size>").unwrap() + at, xml[at..].find("</Size>").unwrap() + at);
            xml.replace_range(start..end + "</Size>".len(), "<Size>10</Size>");
        }
    }
    // Injected keys go where a bucket lists them: in key order among the others.
    let decode = |k: &str| -> String {
        if encoded {
            percent_encoding::percent_decode_str(k).decode_utf8_lossy().into_owned()
        } else {
            k.replace("&lt;", "<").replace("&amp;", "&")
        }
    };
    let mut contents: Vec<(String, String)> = f
        .inject
        .lock()
        .unwrap()
        .iter()
        .map(|k| {
            let key = format!("{prefix}{k}");
            let xml = format!(
                "<Contents><Key>{}</Key><LastModified>2026-01-01T00:00:00.000Z</LastModified><ETag>\"injected\"</ETag><Size>10</Size></Contents>",
                encode(&key)
            );
            (key, xml)
        })
        .collect();
    let (start, end) = match (xml.find("<Contents>"), xml.rfind("</Contents>")) {
        (Some(start), Some(end)) => (start, end + "</Contents>".len()),
        _ => {
            let at = xml.find("</ListBucketResult>").unwrap();
            (at, at)
        }
    };
    for item in xml[start..end].split_inclusive("</Contents>") {
        let key = &item[item.find("<Key>").unwrap() + 5..item.find("</Key>").unwrap()];
        contents.push((decode(key), item.to_string()));
    }
    contents.sort();
    let sorted: String = contents.into_iter().map(|(_, xml)| xml).collect();
    xml.replace_range(start..end, &sorted);
    xml
}

impl S3Proxy {
    pub async fn start() -> Self {
        let faults = Arc::new(Faults::default());
        let state = Arc::new(ProxyState {
            upstream: env("IMAGEINDEX_S3_ENDPOINT"),
            http: reqwest::Client::builder().no_proxy().build().unwrap(),
            faults: faults.clone(),
        });
        let app = axum::Router::new().fallback(handle).with_state(state);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Self { endpoint, faults }
    }

    /// The fixture's bucket prefix, through the proxy.
    pub fn source(&self, fx: &Fixture) -> Source {
        let cfg =
            SourceConfig { url: fx.source_url.clone(), endpoint: Some(self.endpoint.clone()), ..Default::default() };
        Source::open(&cfg).unwrap()
    }
}
