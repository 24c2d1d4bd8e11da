//! The bucket misbehaving, on the real services (issue 12): an S3 proxy in front of SeaweedFS
//! that fails requests, refuses objects, and adds keys to listings, and a consistency check that
//! every case ends with.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use imageindex::core::IndexKind;
use imageindex::store::{Index, Source, SourceConfig};
use imageindex::sync::{DeletionGuard, SyncOptions, sync};

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
        if f.vanish.lock().unwrap().contains(&key) {
            return s3_error(StatusCode::NOT_FOUND, "NoSuchKey");
        }
        let n = f.fail_every.load(Ordering::SeqCst);
        if n > 0 && f.object_gets.fetch_add(1, Ordering::SeqCst) % n == 0 {
            f.injected_500s.fetch_add(1, Ordering::SeqCst);
            return s3_error(StatusCode::INTERNAL_SERVER_ERROR, "InternalError");
        }
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

/// Adds the injected keys to a listing page and shrinks the listed sizes of `shrink`'s keys.
fn rewrite_listing(f: &Faults, query: &str, mut xml: String) -> String {
    let prefix = query_param(query, "prefix").unwrap_or_default();
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
    let injected: String = f
        .inject
        .lock()
        .unwrap()
        .iter()
        .map(|k| {
            format!(
                "<Contents><Key>{}</Key><LastModified>2026-01-01T00:00:00.000Z</LastModified><ETag>\"injected\"</ETag><Size>10</Size></Contents>",
                encode(&format!("{prefix}{k}"))
            )
        })
        .collect();
    xml.replace("</ListBucketResult>", &format!("{injected}</ListBucketResult>"))
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

/// How a case ended, against what the bucket holds.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Consistency {
    /// Objects in the bucket (an include glob matches them) plus the keys the listing was told of.
    pub expected: usize,
    pub indexed: usize,
    /// Recorded failed, each with a reason.
    pub failed: usize,
    /// Expected but neither indexed nor recorded, or indexed without its vector.
    pub lost: usize,
    /// Vectors beyond one per indexed row: duplicates, or orphans without a catalog row.
    pub extra_vectors: usize,
}

/// Checks a collection against the bucket: every object exactly once in Milvus and the catalog,
/// or recorded failed with a reason; no vector without a row.
pub async fn consistency(fx: &Fixture, index: &Index, injected: &[String]) -> Consistency {
    let listed = fx.source.list().await.unwrap();
    let mut expected: HashSet<String> = listed.into_iter().map(|o| o.key).collect();
    expected.extend(injected.iter().cloned());
    let entries = index.catalog.entries(0, 1).await.unwrap();
    let failures: HashMap<String, String> =
        index.catalog.failures(100_000).await.unwrap().into_iter().map(|f| (f.key, f.error)).collect();
    let indexed: Vec<i64> = entries.values().filter(|e| e.indexed).map(|e| e.id).collect();
    let found = index.vectors.existing(&indexed).await.unwrap().len();
    let vectors = index.vectors.count().await.unwrap() as usize;
    let mut c = Consistency { expected: expected.len(), indexed: found, ..Default::default() };
    for key in &expected {
        match entries.get(key) {
            Some(e) if e.indexed => {}
            Some(_) if failures.get(key).is_some_and(|r| !r.is_empty()) => c.failed += 1,
            _ => c.lost += 1,
        }
    }
    c.lost += indexed.len() - found;
    c.extra_vectors = vectors.saturating_sub(found);
    c
}

/// 500s on a third of the GETs, one object denied (403), one gone between list and get, one
/// replaced by a larger one, and keys object_store cannot hold in the listing: all in one run,
/// every good object indexed, every other one recorded with its reason. The next run, with the
/// bucket healthy, picks up what was refused.
#[tokio::test(flavor = "multi_thread")]
async fn a_misbehaving_bucket_loses_nothing_and_stops_nothing() {
    let fx = Fixture::new("faults_bucket");
    let photos = upload_photos(&fx, 40).await;
    let big = jpeg(&photo_set(41)[40].1, 100);
    fx.source.put("photos/replaced.jpg", big.clone()).await.unwrap();
    let proxy = S3Proxy::start().await;
    let f = &proxy.faults;
    let (denied, vanished) = (photos[3].0.clone(), photos[5].0.clone());
    f.deny.lock().unwrap().insert(denied.clone());
    f.vanish.lock().unwrap().insert(vanished.clone());
    f.shrink.lock().unwrap().insert("photos/replaced.jpg".into());
    let odd: Vec<String> = ["a//b.jpg", "./dot.jpg", "x/../y.jpg", "ctl\u{1}.jpg"].map(String::from).into();
    *f.inject.lock().unwrap() = odd.clone();
    f.fail_every.store(3, Ordering::SeqCst);

    let index = fx.index(IndexKind::Hnsw).await;
    let backends = imageindex::sync::Backends { source: proxy.source(&fx), index };
    let opts = SyncOptions { max_object_bytes: big.len() as u64 - 1, ..Default::default() };
    let s = sync(&backends, model(), &opts).await.expect("the run goes on through the faults");
    let reasons: HashMap<&str, &str> = s.failures.iter().map(|(k, e)| (k.as_str(), e.as_str())).collect();
    eprintln!(
        "{} GETs, {} answered 500; failures: {reasons:#?}",
        f.object_gets.load(Ordering::SeqCst),
        f.injected_500s.load(Ordering::SeqCst)
    );
    assert!(f.injected_500s.load(Ordering::SeqCst) >= 10, "the 500s were injected");
    assert_eq!(s.indexed, 40 - 2, "every good object indexed in the same run: {reasons:#?}");
    assert!(reasons[denied.as_str()].contains("the bucket refused it"), "{reasons:#?}");
    assert!(reasons["photos/replaced.jpg"].contains("more than the limit"), "{reasons:#?}");
    for k in &odd {
        assert!(reasons[k.as_str()].contains("cannot be fetched safely"), "{k:?}: {reasons:#?}");
    }
    assert!(!reasons.contains_key(vanished.as_str()), "gone since the listing: not recorded");
    let c = consistency(&fx, &backends.index, &odd).await;
    // The vanished object is still in the bucket (the proxy hid it): the one object not yet seen.
    assert_eq!(c, Consistency { expected: 45, indexed: 38, failed: 6, lost: 1, extra_vectors: 0 });

    // The bucket heals: the denied and the hidden objects are indexed; the rest stay recorded.
    f.deny.lock().unwrap().clear();
    f.vanish.lock().unwrap().clear();
    f.shrink.lock().unwrap().clear();
    f.fail_every.store(0, Ordering::SeqCst);
    let s = sync(&backends, model(), &opts).await.unwrap();
    assert_eq!((s.indexed, s.unchanged), (2, 38 + 5), "{:?}", s.failures);
    let c = consistency(&fx, &backends.index, &odd).await;
    assert_eq!(c, Consistency { expected: 45, indexed: 40, failed: 5, lost: 0, extra_vectors: 0 });

    // Every GET failing, however often retried, is a bucket that is down, not 20 bad objects:
    // the run stops with the cause, and the next one indexes them.
    for (i, (_, img)) in photo_set(60).into_iter().skip(40).enumerate() {
        fx.source.put(&format!("more/{i}.jpg"), jpeg(&img, 85)).await.unwrap();
    }
    f.fail_every.store(1, Ordering::SeqCst);
    let err = sync(&backends, model(), &opts).await.unwrap_err().to_string();
    assert!(err.contains("fetching") && err.contains("500"), "{err}");
    f.fail_every.store(0, Ordering::SeqCst);
    assert_eq!(sync(&backends, model(), &opts).await.unwrap().indexed, 20);

    // A bucket that stays down stops the run with a clear error, and deletes nothing.
    f.down.store(true, Ordering::SeqCst);
    let err = sync(&backends, model(), &opts).await.unwrap_err().to_string();
    assert!(err.contains("listing the source"), "{err}");
    assert_eq!(backends.index.vectors.count().await.unwrap(), 60);
    fx.cleanup().await;
}

/// A typo'd prefix or an empty listing would have deleted the whole collection; it refuses, says
/// why, deletes nothing, and deletes when allowed.
#[tokio::test(flavor = "multi_thread")]
async fn a_wrong_listing_deletes_nothing() {
    let fx = Fixture::new("faults_guard");
    upload_photos(&fx, 30).await;
    let index = fx.index(IndexKind::Hnsw).await;
    let right = imageindex::sync::Backends { source: fx.source.clone(), index };
    assert_eq!(fx.sync(&right).await.indexed, 30);
    // A prefix with nothing under it, and another folder with two other photos (a typo).
    let empty = Fixture::new("faults_guard_empty");
    let typo = Fixture::new("faults_guard_typo");
    upload_photos(&typo, 2).await;
    // The typo'd folder has two of the same keys (the same photos): 28 would go.
    let cases = [
        (&empty, "30 of the 30", "the listing is empty"),
        (&typo, "28 of the 30", "(93.3%, more than the 10% allowed)"),
    ];
    for (elsewhere, count, why) in cases {
        let wrong =
            imageindex::sync::Backends { source: elsewhere.source.clone(), index: fx.index(IndexKind::Hnsw).await };
        let err = sync(&wrong, model(), &SyncOptions::default()).await.unwrap_err().to_string();
        assert!(err.contains(&format!("refusing to delete {count}")) && err.contains(why), "{err}");
        assert!(err.contains("--allow-mass-delete"), "says how to go on: {err}");
        let c = consistency(&fx, &right.index, &[]).await;
        assert_eq!((c.indexed, c.lost, c.extra_vectors), (30, 0, 0), "{}: something was deleted", elsewhere.source_url);
        let progress = right.index.catalog.progress().await.unwrap();
        assert_eq!(progress.run.unwrap().status, "failed", "the refusal is the run's outcome");
    }
    // Allowed, the listing's word goes: 28 deleted, the 2 shared keys unchanged.
    let wrong = imageindex::sync::Backends { source: typo.source.clone(), index: fx.index(IndexKind::Hnsw).await };
    let allow = SyncOptions { deletion: DeletionGuard { allow: true, ..Default::default() }, ..Default::default() };
    let s = sync(&wrong, model(), &allow).await.unwrap();
    assert_eq!((s.deleted, s.unchanged, s.vectors), (28, 2, 2));
    fx.cleanup().await;
}

/// An upload that lands while a sync is listing is "gone" by that listing's word; the sync deleted
/// it. Now rows written after the listing began, and objects a HEAD still finds, are kept.
#[tokio::test(flavor = "multi_thread")]
async fn writes_during_a_listing_survive_the_sync() {
    let fx = Fixture::new("faults_race");
    upload_photos(&fx, 12).await;
    let proxy = S3Proxy::start().await;
    let backends = imageindex::sync::Backends { source: proxy.source(&fx), index: fx.index(IndexKind::Hnsw).await };
    assert_eq!(sync(&backends, model(), &SyncOptions::default()).await.unwrap().indexed, 12);

    let (read_tx, read_rx) = tokio::sync::oneshot::channel();
    let (release_tx, release_rx) = tokio::sync::oneshot::channel();
    *proxy.faults.hold_listing.lock().unwrap() = Some((read_tx, release_rx));
    let running =
        tokio::spawn(async move { sync(&backends, model(), &SyncOptions::default()).await.map(|s| (s, backends)) });
    read_rx.await.unwrap();
    // What `POST /img/upload` does, while the listing is on its way: the bucket, then the index.
    let writer = fx.index(IndexKind::Hnsw).await;
    let img = jpeg(&photo_set(13)[12].1, 90);
    let key = "uploads/fresh.jpg";
    fx.source.put(key, img.clone()).await.unwrap();
    let id = imageindex::store::key_id(key);
    let record = imageindex::store::Record {
        id,
        key: key.into(),
        etag: None,
        size: img.len() as u64,
        content_hash: None,
        error: None,
        retry: false,
    };
    let vectors = vec![imageindex::store::Vector { id, key: key.into(), embedding: embed(&img) }];
    writer.write(imageindex::store::WriteBatch { vectors, records: vec![record], remove: vec![] }).await.unwrap();
    release_tx.send(()).unwrap();
    let (s, backends) = running.await.unwrap().unwrap();
    assert_eq!((s.deleted, s.kept), (0, 1), "the upload was deleted as gone");
    assert_eq!(backends.index.vectors.existing(&[id]).await.unwrap(), [id]);
    let c = consistency(&fx, &backends.index, &[]).await;
    assert_eq!(c, Consistency { expected: 13, indexed: 13, failed: 0, lost: 0, extra_vectors: 0 });
    fx.cleanup().await;
}

/// Two syncs of one collection at once (an old and a new Job, the CLI beside the operator).
#[tokio::test(flavor = "multi_thread")]
async fn two_syncs_at_once_converge() {
    let fx = Fixture::new("faults_twice");
    upload_photos(&fx, 40).await;
    let (a, b) = (fx.backends(IndexKind::Hnsw).await, fx.backends(IndexKind::Hnsw).await);
    let opts = SyncOptions::default();
    let (ra, rb) = tokio::join!(sync(&a, model(), &opts), sync(&b, model(), &opts));
    let (ra, rb) = (ra.unwrap(), rb.unwrap());
    assert_eq!((ra.failed, rb.failed), (0, 0));
    let c = consistency(&fx, &a.index, &[]).await;
    assert_eq!(c, Consistency { expected: 40, indexed: 40, failed: 0, lost: 0, extra_vectors: 0 });
    fx.cleanup().await;
}

/// `DELETE /img/{key}` with a bucket that refuses the delete: nothing is removed from the index
/// (the old order removed the vector first, leaving an `indexed` row without one, forever).
#[tokio::test(flavor = "multi_thread")]
async fn a_failed_bucket_delete_leaves_the_index_whole() {
    let fx = Fixture::new("faults_delete");
    let photos = upload_photos(&fx, 3).await;
    let proxy = S3Proxy::start().await;
    let b = imageindex::sync::Backends { source: proxy.source(&fx), index: fx.index(IndexKind::Hnsw).await };
    assert_eq!(sync(&b, model(), &SyncOptions::default()).await.unwrap().indexed, 3);
    let config = imageindex::serve::ServeConfig { token: Some(super::serve::TOKEN.into()), ..Default::default() };
    let state = imageindex::serve::AppState::new(model(), b.index, Some(b.source), config);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(imageindex::serve::serve_on(listener, Arc::new(state), std::future::pending()));
    let http = reqwest::Client::new();
    let key = &photos[1].0;
    let delete = || http.delete(format!("{base}/img/{key}")).bearer_auth(super::serve::TOKEN).send();

    proxy.faults.read_only.store(true, Ordering::SeqCst);
    assert_eq!(delete().await.unwrap().status(), 502);
    let index = fx.index(IndexKind::Hnsw).await;
    let id = imageindex::store::key_id(key);
    assert!(index.catalog.entry(key).await.unwrap().is_some_and(|e| e.indexed), "the row went");
    assert_eq!(index.vectors.existing(&[id]).await.unwrap(), [id], "the vector went");

    proxy.faults.read_only.store(false, Ordering::SeqCst);
    assert_eq!(delete().await.unwrap().status(), 204);
    assert!(index.catalog.entry(key).await.unwrap().is_none());
    assert!(index.vectors.existing(&[id]).await.unwrap().is_empty());
    assert!(!fx.source.exists(key).await.unwrap());
    fx.cleanup().await;
}
