//! Every HTTP route of `serve` on the real services: results, errors, auth, limits, back-pressure.

use std::io::Cursor;
use std::sync::Arc;
use std::time::Duration;

use image::{DynamicImage, ImageFormat};
use imageindex::core::IndexKind;
use imageindex::index::Index;
use imageindex::serve::{AppState, ServeConfig};
use imageindex::store::{content_hash, key_id};
use imageindex::sync::Backends;

use super::support::*;

/// A running `serve` on a fresh collection, with a token and drop enabled.
pub struct Server {
    pub base: String,
    pub http: reqwest::Client,
}

pub const TOKEN: &str = "test-token-123";

impl Server {
    pub async fn start(fx: &Fixture, b: Backends, config: ServeConfig) -> Self {
        Self::on(Arc::new(AppState::new(model(), b.index, Some(fx.source.clone()), config))).await
    }

    pub async fn on(state: Arc<AppState>) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(imageindex::serve::serve_on(listener, state, std::future::pending()));
        Self { base, http: reqwest::Client::new() }
    }

    pub fn form(bytes: Vec<u8>, topk: &str) -> reqwest::multipart::Form {
        reqwest::multipart::Form::new()
            .part("image", reqwest::multipart::Part::bytes(bytes).file_name("q.jpg"))
            .text("topk", topk.to_string())
    }

    pub async fn search(&self, bytes: Vec<u8>, topk: &str) -> (u16, serde_json::Value) {
        let r = self.http.post(format!("{}/img/search", self.base)).multipart(Self::form(bytes, topk));
        Self::json(r).await
    }

    pub async fn json(r: reqwest::RequestBuilder) -> (u16, serde_json::Value) {
        let r = r.send().await.unwrap();
        let status = r.status().as_u16();
        let text = r.text().await.unwrap();
        (status, serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text)))
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}/{path}", self.base)
    }
}

pub fn assert_error(got: (u16, serde_json::Value), status: u16, code: &str) {
    assert_eq!(got.0, status, "expected {code}: {}", got.1);
    assert_eq!(got.1["error"], code, "{}", got.1);
    assert!(got.1["message"].as_str().is_some_and(|m| !m.is_empty()), "{}", got.1);
}

#[tokio::test(flavor = "multi_thread")]
async fn serve_routes_errors_and_auth() {
    let fx = Fixture::new("serve");
    let photos = upload_photos(&fx, 12).await;
    let b = fx.backends(IndexKind::Hnsw).await;
    fx.sync(&b).await;
    let config = ServeConfig {
        max_upload_bytes: 1 << 20,
        token: Some(TOKEN.into()),
        allow_drop: true,
        allow_private_urls: true,
        ..Default::default()
    };
    let srv = Server::start(&fx, b, config).await;
    let http = &srv.http;

    // Search by upload: the original is first; results carry a URL that serves the image.
    let (status, body) = srv.search(near_duplicate(&photos[4].1), "3").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["results"].as_array().unwrap().len(), 3);
    assert_eq!(body["results"][0]["key"], photos[4].0.as_str());
    assert_eq!(body["results"][0]["rank"], 1);
    let image_url = srv.url(body["results"][0]["url"].as_str().unwrap());
    let img = http.get(&image_url).send().await.unwrap();
    assert_eq!(img.status(), 200);
    assert_eq!(img.headers()["content-type"], "image/jpeg");
    assert_eq!(img.bytes().await.unwrap(), photos[4].1, "the object is streamed from the bucket as stored");

    // Search by URL (the bucket's own object, over loopback: allowed here), with topk in the JSON.
    let r = http.post(srv.url("img/search")).json(&serde_json::json!({"url": image_url, "topk": 2}));
    let (status, body) = Server::json(r).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["results"].as_array().unwrap().len(), 2);
    assert_eq!(body["results"][0]["key"], photos[4].0.as_str());

    // A key-prefix filter keeps hits inside the prefix.
    let prefix = photos[4].0.rsplit_once('/').unwrap().0.to_string() + "/";
    let form = Server::form(near_duplicate(&photos[4].1), "10").text("prefix", prefix.clone());
    let (status, body) = Server::json(http.post(srv.url("img/search")).multipart(form)).await;
    assert_eq!(status, 200, "{body}");
    let keys: Vec<&str> = body["results"].as_array().unwrap().iter().map(|h| h["key"].as_str().unwrap()).collect();
    assert!(!keys.is_empty() && keys.iter().all(|k| k.starts_with(&prefix)), "{keys:?}");
    let form = Server::form(near_duplicate(&photos[4].1), "3").text("prefix", "a\" or 1");
    assert_error(Server::json(http.post(srv.url("img/search")).multipart(form)).await, 400, "bad_request");

    // Count, progress, health, readiness, metrics.
    let (status, body) = Server::json(http.get(srv.url("img/count"))).await;
    assert_eq!((status, body["count"].as_u64(), body["indexed"].as_u64()), (200, Some(12), Some(12)));
    let (status, body) = Server::json(http.get(srv.url("progress"))).await;
    assert_eq!(status, 200);
    assert_eq!(
        (body["discovered"].as_u64(), body["indexed"].as_u64(), body["failed"].as_u64()),
        (Some(12), Some(12), Some(0))
    );
    assert_eq!(body["run"]["status"], "succeeded", "{body}");
    assert_eq!(http.get(srv.url("healthz")).send().await.unwrap().status(), 200);
    let (status, body) = Server::json(http.get(srv.url("readyz"))).await;
    assert_eq!((status, &body["milvus"]), (200, &serde_json::json!("ok")));
    let metrics = http.get(srv.url("metrics")).send().await.unwrap().text().await.unwrap();
    assert!(
        metrics.contains(r#"imageindex_http_requests_total{route="/img/search",method="POST",status="200"}"#),
        "{metrics}"
    );
    assert!(metrics.contains("imageindex_embed_duration_seconds_count"));
    let (status, doc) = Server::json(http.get(srv.url("openapi.json"))).await;
    assert_eq!(status, 200);
    for path in [
        "/img/search",
        "/img/upload",
        "/img/count",
        "/progress",
        "/img/{key}",
        "/img/drop",
        "/img/object/{key}",
        "/readyz",
    ] {
        assert!(doc["paths"][path].is_object(), "{path} missing from the OpenAPI document");
    }
    assert_eq!(doc["components"]["securitySchemes"]["token"]["scheme"], "bearer");
    assert!(doc["paths"]["/img/search"]["post"]["requestBody"]["content"]["multipart/form-data"].is_object());
    let page = http.get(srv.url("")).send().await.unwrap().text().await.unwrap();
    assert!(
        page.contains("<title>imageindex search</title>") && !page.contains("http://") && !page.contains("https://")
    );

    // Every error status, as JSON.
    let mut png = Vec::new();
    DynamicImage::ImageRgb8(synthetic(&mut Rng(7), 64, 64))
        .write_to(&mut Cursor::new(&mut png), ImageFormat::Png)
        .unwrap();
    assert_error(srv.search(b"plain text".to_vec(), "3").await, 415, "unsupported_media_type");
    assert_error(srv.search(photos[0].1[..photos[0].1.len() / 3].to_vec(), "3").await, 400, "bad_image");
    assert_error(srv.search(png_bomb().to_vec(), "3").await, 413, "image_too_large");
    assert_error(srv.search(vec![0xff; 2 << 20], "3").await, 413, "payload_too_large");
    assert_error(srv.search(png.clone(), "0").await, 400, "bad_request");
    assert_error(srv.search(png.clone(), "101").await, 400, "bad_request");
    let no_image = reqwest::multipart::Form::new().text("topk", "3");
    assert_error(Server::json(http.post(srv.url("img/search")).multipart(no_image)).await, 400, "bad_request");
    assert_error(Server::json(http.post(srv.url("img/search")).body("x")).await, 415, "unsupported_media_type");
    let r = http.post(srv.url("img/search")).json(&serde_json::json!({"url": "file:///etc/passwd"}));
    assert_error(Server::json(r).await, 400, "bad_request");
    assert_error(Server::json(http.get(srv.url("img/object/not/indexed.jpg"))).await, 404, "not_found");
    assert_error(Server::json(http.get(srv.url("img/object/../../etc/passwd"))).await, 404, "not_found");

    // Auth: mutating routes need the token.
    let upload = |token: Option<&str>, bytes: Vec<u8>| {
        let form =
            reqwest::multipart::Form::new().part("image", reqwest::multipart::Part::bytes(bytes).file_name("x.png"));
        let r = http.post(srv.url("img/upload")).multipart(form);
        match token {
            Some(t) => r.bearer_auth(t),
            None => r,
        }
    };
    assert_error(Server::json(upload(None, png.clone())).await, 401, "unauthorized");
    assert_error(Server::json(upload(Some("wrong"), png.clone())).await, 401, "unauthorized");
    assert_error(Server::json(http.delete(srv.url(&format!("img/{}", photos[0].0)))).await, 401, "unauthorized");
    assert_error(Server::json(http.post(srv.url("img/drop"))).await, 401, "unauthorized");

    // Upload: content-addressed, the same file twice is one entry, and it is searchable at once.
    let (status, first) = Server::json(upload(Some(TOKEN), png.clone())).await;
    assert_eq!(status, 201, "{first}");
    let key = first["key"].as_str().unwrap().to_string();
    assert!(key.starts_with("uploads/") && key.ends_with(".png"), "{key}");
    let (status, again) = Server::json(upload(Some(TOKEN), png.clone())).await;
    assert_eq!((status, &again["key"], &again["created"]), (200, &first["key"], &serde_json::json!(false)));
    let mut other = Vec::new();
    DynamicImage::ImageRgb8(synthetic(&mut Rng(8), 64, 64))
        .write_to(&mut Cursor::new(&mut other), ImageFormat::Png)
        .unwrap();
    let (_, second) = Server::json(upload(Some(TOKEN), other)).await;
    assert_ne!(second["key"], first["key"], "different files never share a key");

    // A file whose key's id another key holds (a 63-bit hash collision; made here by moving the
    // second upload's row to that id) is refused, and nothing is stored or written over.
    let mut third = Vec::new();
    DynamicImage::ImageRgb8(synthetic(&mut Rng(9), 64, 64))
        .write_to(&mut Cursor::new(&mut third), ImageFormat::Png)
        .unwrap();
    let third_key = format!("uploads/{}.png", content_hash(&third));
    let second_key = second["key"].as_str().unwrap();
    let pool = sqlx::MySqlPool::connect(&env("IMAGEINDEX_MYSQL_URL")).await.unwrap();
    let move_row = |from: i64, to: i64| {
        sqlx::query("UPDATE images SET id = ? WHERE collection = ? AND id = ?")
            .bind(to)
            .bind(&fx.name)
            .bind(from)
            .execute(&pool)
    };
    move_row(key_id(second_key), key_id(&third_key)).await.unwrap();
    let (status, refused) = Server::json(upload(Some(TOKEN), third.clone())).await;
    assert_eq!((status, refused["error"].as_str()), (409, Some("key_collision")), "{refused}");
    assert!(refused["message"].as_str().unwrap().contains(second_key), "{refused}");
    assert!(fx.source.get(&third_key).await.is_err(), "nothing was stored");
    move_row(key_id(&third_key), key_id(second_key)).await.unwrap();
    assert_error(Server::json(upload(Some(TOKEN), b"not an image".to_vec())).await, 415, "unsupported_media_type");
    let (_, body) = srv.search(png.clone(), "1").await;
    assert_eq!(body["results"][0]["key"], key.as_str());
    let (_, body) = Server::json(http.get(srv.url("img/count"))).await;
    assert_eq!(body["count"].as_u64(), Some(14));

    // Delete: gone from the index, the catalog and the bucket.
    let r = http.delete(srv.url(&format!("img/{key}"))).bearer_auth(TOKEN).send().await.unwrap();
    assert_eq!(r.status(), 204);
    assert_error(Server::json(http.delete(srv.url(&format!("img/{key}"))).bearer_auth(TOKEN)).await, 404, "not_found");
    assert!(fx.source.get(&key).await.is_err(), "the object left the bucket");
    let (_, body) = Server::json(http.get(srv.url("img/count"))).await;
    assert_eq!(body["count"].as_u64(), Some(13));

    // Drop: empties the collection and the catalog, and search keeps working (on nothing).
    let (status, _) = Server::json(http.post(srv.url("img/drop")).bearer_auth(TOKEN)).await;
    assert_eq!(status, 200);
    let (_, body) = Server::json(http.get(srv.url("img/count"))).await;
    assert_eq!((body["count"].as_u64(), body["indexed"].as_u64()), (Some(0), Some(0)));
    let (status, body) = srv.search(png, "3").await;
    assert_eq!((status, body["results"].as_array().map(Vec::len)), (200, Some(0)));

    fx.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn serve_guards_private_urls_drop_search_token_and_backpressure() {
    let fx = Fixture::new("guards");
    let photos = upload_photos(&fx, 2).await;
    let b = fx.backends(IndexKind::Hnsw).await;
    fx.sync(&b).await;
    // No drop, no private URLs, search behind the token, one embedding at a time.
    let config = ServeConfig {
        token: Some(TOKEN.into()),
        protect_search: true,
        max_concurrent_embeddings: 1,
        max_queued_embeddings: 2,
        ..Default::default()
    };
    let srv = Server::start(&fx, b, config).await;
    let http = &srv.http;
    assert_error(srv.search(photos[0].1.to_vec(), "1").await, 401, "unauthorized");
    assert_error(Server::json(http.get(srv.url("progress"))).await, 401, "unauthorized");
    assert_eq!(http.get(srv.url("healthz")).send().await.unwrap().status(), 200, "probes stay open");
    let authed =
        |bytes: Vec<u8>| http.post(srv.url("img/search")).bearer_auth(TOKEN).multipart(Server::form(bytes, "1"));
    let (status, body) = Server::json(authed(photos[0].1.to_vec())).await;
    assert_eq!((status, &body["results"][0]["key"]), (200, &serde_json::json!(photos[0].0)));
    let r = http.post(srv.url("img/search")).bearer_auth(TOKEN).json(&serde_json::json!({"url": srv.url("healthz")}));
    assert_error(Server::json(r).await, 403, "forbidden_url");
    assert_error(Server::json(http.post(srv.url("img/drop")).bearer_auth(TOKEN)).await, 403, "disabled");

    // Back-pressure: one embedding slot and room for two to wait: a burst of six gets 503s with
    // Retry-After for what the queue cannot hold, and the rest is served.
    let burst = (0..6).map(|_| authed(photos[1].1.to_vec()).send());
    let replies = futures::future::join_all(burst).await;
    let mut statuses: Vec<u16> = vec![];
    for r in replies {
        let r = r.unwrap();
        if r.status() == 503 {
            assert_eq!(r.headers()["retry-after"], "1");
        }
        statuses.push(r.status().as_u16());
    }
    assert!(statuses.iter().all(|s| *s == 200 || *s == 503), "{statuses:?}");
    assert!(statuses.iter().filter(|s| **s == 200).count() >= 3 && statuses.contains(&503), "{statuses:?}");

    fx.cleanup().await;
}

/// A TCP proxy to a real service that a test can cut, to take that backend down for one client.
async fn proxy(target: std::net::SocketAddr) -> (std::net::SocketAddr, tokio::sync::watch::Sender<bool>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (cut, cut_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        loop {
            let mut rx = cut_rx.clone();
            tokio::select! {
                _ = rx.wait_for(|c| *c) => return, // drops the listener: new connections are refused
                Ok((mut inbound, _)) = listener.accept() => {
                    let mut rx = cut_rx.clone();
                    tokio::spawn(async move {
                        let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await else { return };
                        tokio::select! {
                            _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                            _ = rx.wait_for(|c| *c) => {} // existing connections close too
                        }
                    });
                }
            }
        }
    });
    (addr, cut)
}

#[tokio::test(flavor = "multi_thread")]
async fn serve_answers_503_when_mysql_goes_down() {
    let fx = Fixture::new("down");
    upload_photos(&fx, 2).await;
    let b = fx.backends(IndexKind::Hnsw).await;
    fx.sync(&b).await;
    // The server's catalog reaches MariaDB through a proxy; cutting it takes MySQL down for it.
    let mut url = url::Url::parse(&env("IMAGEINDEX_MYSQL_URL")).unwrap();
    let target = format!("{}:{}", url.host_str().unwrap(), url.port().unwrap()).parse().unwrap();
    let (addr, cut) = proxy(target).await;
    url.set_port(Some(addr.port())).unwrap();
    let model = "test-model".parse().unwrap();
    let index = Index::connect(&fx.milvus(IndexKind::Hnsw), url.as_str(), &model).await.unwrap();
    let srv = Server::start(&fx, Backends { source: fx.source.clone(), index }, ServeConfig::default()).await;
    let (status, body) = Server::json(srv.http.get(srv.url("readyz"))).await;
    assert_eq!(status, 200, "{body}");

    cut.send(true).unwrap();
    let (status, body) = Server::json(srv.http.get(srv.url("readyz"))).await;
    assert_eq!(status, 503, "{body}");
    assert_error((status, body), 503, "backend_unavailable");
    let r = srv.http.get(srv.url("img/count")).send().await.unwrap();
    assert_eq!((r.status().as_u16(), r.headers()["retry-after"].to_str().unwrap()), (503, "1"));
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["error"], "backend_unavailable");
    // Which backend failed, for the client; the cause itself only in the server's log.
    let msg = body["message"].as_str().unwrap();
    assert!(msg.contains("MySQL"), "{body}");
    assert!(!msg.contains("pool") && !msg.to_lowercase().contains("connect"), "internals sent to the client: {body}");
    fx.cleanup().await;
}

/// `DELETE /img/{key}` with a bucket that refuses the delete: nothing is removed from the index
/// (the old order removed the vector first, leaving an `indexed` row without one, forever).
#[tokio::test(flavor = "multi_thread")]
async fn a_failed_bucket_delete_leaves_the_index_whole() {
    let fx = Fixture::new("faults_delete");
    let photos = upload_photos(&fx, 3).await;
    let proxy = super::s3_proxy::S3Proxy::start().await;
    let b = imageindex::sync::Backends { source: proxy.source(&fx), index: fx.index(IndexKind::Hnsw).await };
    assert_eq!(
        imageindex::sync::sync(&b, model(), &imageindex::sync::SyncOptions::default()).await.unwrap().indexed,
        3
    );
    let config = ServeConfig { token: Some(TOKEN.into()), ..Default::default() };
    let state = AppState::new(model(), b.index, Some(b.source), config);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(imageindex::serve::serve_on(listener, Arc::new(state), std::future::pending()));
    let http = reqwest::Client::new();
    let key = &photos[1].0;
    let delete = || http.delete(format!("{base}/img/{key}")).bearer_auth(TOKEN).send();

    proxy.faults.read_only.store(true, std::sync::atomic::Ordering::SeqCst);
    assert_eq!(delete().await.unwrap().status(), 502);
    let index = fx.index(IndexKind::Hnsw).await;
    let id = imageindex::store::key_id(key);
    assert!(index.catalog.entry(key).await.unwrap().is_some_and(|e| e.indexed), "the row went");
    assert_eq!(index.vectors.existing(&[id]).await.unwrap(), [id], "the vector went");

    proxy.faults.read_only.store(false, std::sync::atomic::Ordering::SeqCst);
    assert_eq!(delete().await.unwrap().status(), 204);
    assert!(index.catalog.entry(key).await.unwrap().is_none());
    assert!(index.vectors.existing(&[id]).await.unwrap().is_empty());
    assert!(!fx.source.exists(key).await.unwrap());
    fx.cleanup().await;
}

/// A rotated Secret reaches a search pod's mounted files but never its environment: the server
/// reads the files again and puts what changed to use without a restart. A new API token replaces
/// the old one; new catalog or bucket credentials that do not work leave the old clients serving
/// (counted as failed), and ones that work are swapped in.
#[tokio::test(flavor = "multi_thread")]
async fn rotated_credentials_are_put_to_use_without_a_restart() {
    use imageindex::config::{BackendArgs, SourceArgs};
    use imageindex::serve::reload::Watch;

    let fx = Fixture::new("rotate");
    let photos = upload_photos(&fx, 4).await;
    let b = fx.backends(IndexKind::Hnsw).await;
    fx.sync(&b).await;
    let dir = std::env::temp_dir().join(format!("imageindex-rotate-{}", std::process::id()));
    let bucket = dir.join("bucket");
    std::fs::create_dir_all(&bucket).unwrap();
    let write = |name: &str, value: &str| std::fs::write(dir.join(name), value).unwrap();
    let mysql_url = env("IMAGEINDEX_MYSQL_URL");
    write("url", &format!("{mysql_url}\n"));
    write("token", "first-token");
    write("bucket/AWS_SECRET_ACCESS_KEY", &env("AWS_SECRET_ACCESS_KEY"));
    let milvus = fx.milvus(IndexKind::Hnsw);
    let watch = Watch {
        backend: BackendArgs {
            milvus_url: milvus.url,
            milvus_token: None,
            milvus_token_file: None,
            collection: milvus.collection,
            index_type: IndexKind::Hnsw,
            mysql_url: None,
            mysql_url_file: Some(dir.join("url")),
            owner: imageindex::index::LOCAL_OWNER.into(),
        },
        src: SourceArgs {
            s3_endpoint: Some(env("IMAGEINDEX_S3_ENDPOINT")),
            include: vec![],
            credentials_dir: Some(bucket.clone()),
        },
        source_url: Some(fx.source_url.clone()),
        token_file: Some(dir.join("token")),
        token: None,
        read_token_file: None,
        read_token: None,
    };
    let credentials = watch.read().unwrap();
    let (gens, source) = watch.connect(&credentials).await.unwrap();
    let index = gens.index(&imageindex::store::Generation::plain(gens.name()), model().id());
    let config = ServeConfig { token: credentials.token(), ..Default::default() };
    let state = Arc::new(AppState::new(model(), index, source, config));
    tokio::spawn(watch.run(state.clone(), credentials, Duration::from_millis(100)));
    let srv = Server::on(state.clone()).await;
    let object = srv.url(&format!("img/object/{}", photos[0].0));
    let delete = |token: &str| srv.http.delete(srv.url("img/not-indexed.jpg")).bearer_auth(token).send();
    let reloads = |result: &str| {
        let line = format!("imageindex_credential_reloads_total{{result=\"{result}\"}} ");
        let (http, url) = (srv.http.clone(), srv.url("metrics"));
        async move {
            let text = http.get(url).send().await.unwrap().text().await.unwrap();
            text.lines().find_map(|l| l.strip_prefix(&line)).map_or(0, |n| n.parse::<u64>().unwrap())
        }
    };
    let settle = || tokio::time::sleep(Duration::from_millis(600));
    assert_eq!(delete("first-token").await.unwrap().status(), 404, "the token admits");

    // A new token: the old one is refused, the new one admitted.
    write("token", "second-token\n");
    settle().await;
    assert_eq!(delete("first-token").await.unwrap().status(), 401);
    assert_eq!(delete("second-token").await.unwrap().status(), 404);
    assert_eq!(reloads("applied").await, 1);

    // A catalog password that does not work, then bucket keys that do not: the old clients serve on.
    let before = state.clients();
    let mut wrong = url::Url::parse(&mysql_url).unwrap();
    wrong.set_password(Some("wrong-password")).unwrap();
    write("url", wrong.as_str());
    settle().await;
    assert!(reloads("failed").await >= 1, "a failed reload is counted");
    write("url", &mysql_url);
    write("bucket/AWS_SECRET_ACCESS_KEY", "not-the-key");
    settle().await;
    assert!(Arc::ptr_eq(&before, &state.clients()), "clients replaced by ones that do not work");
    assert_eq!(srv.http.get(&object).send().await.unwrap().status(), 200, "still served with the old keys");
    let (status, body) = srv.search(near_duplicate(&photos[0].1), "3").await;
    assert_eq!(status, 200, "{body}");

    // The token rotated while the new bucket keys do not work, then while the catalog URL's file
    // cannot be read: each applied at once, on its own (it waited for every backend check).
    write("token", "third-token");
    settle().await;
    assert_eq!(delete("second-token").await.unwrap().status(), 401, "a revoked token stayed valid");
    assert_eq!(delete("third-token").await.unwrap().status(), 404);
    std::fs::remove_file(dir.join("url")).unwrap();
    write("token", "fourth-token");
    settle().await;
    assert_eq!(delete("third-token").await.unwrap().status(), 401, "a revoked token stayed valid");
    assert_eq!(delete("fourth-token").await.unwrap().status(), 404);
    assert_eq!(reloads("applied").await, 3, "each token change counted");
    write("url", &mysql_url);

    // Credentials that work (the same user by another host name, the right key): swapped in.
    let mut by_name = url::Url::parse(&mysql_url).unwrap();
    by_name.set_host(Some("localhost")).unwrap();
    write("url", by_name.as_str());
    write("bucket/AWS_SECRET_ACCESS_KEY", &env("AWS_SECRET_ACCESS_KEY"));
    settle().await;
    assert!(!Arc::ptr_eq(&before, &state.clients()), "the working credentials are in use");
    assert_eq!(reloads("applied").await, 4);
    assert_eq!(srv.http.get(&object).send().await.unwrap().status(), 200);
    let (status, body) = srv.search(near_duplicate(&photos[0].1), "3").await;
    assert_eq!((status, body["results"][0]["key"].as_str()), (200, Some(photos[0].0.as_str())), "{body}");
    std::fs::remove_dir_all(dir).unwrap();
    fx.cleanup().await;
}

/// Under load, queries wait a little and share model calls. A burst larger than the embedding
/// slots waits in the queue and is served (every query got 503 at once before), and concurrent
/// queries embedded in one batch each get their own image's results.
#[tokio::test(flavor = "multi_thread")]
async fn bursts_queue_and_concurrent_queries_share_model_calls() {
    let fx = Fixture::new("burst");
    let photos = upload_photos(&fx, 6).await;
    let b = fx.backends(IndexKind::Hnsw).await;
    fx.sync(&b).await;
    let searches = |srv: &Server| {
        let srv = Server { base: srv.base.clone(), http: srv.http.clone() };
        let photos = photos.clone();
        async move {
            let burst = photos.iter().map(|(_, bytes)| srv.search(near_duplicate(bytes), "1"));
            let replies = futures::future::join_all(burst).await;
            for ((key, _), (status, body)) in photos.iter().zip(replies) {
                assert_eq!((status, body["results"][0]["key"].as_str()), (200, Some(key.as_str())), "{body}");
            }
            let metrics = srv.http.get(srv.url("metrics")).send().await.unwrap().text().await.unwrap();
            let count = metrics.lines().find_map(|l| l.strip_prefix("imageindex_embed_batch_size_count "));
            count.expect("the batch size histogram").parse::<u64>().unwrap()
        }
    };
    // One slot, room for eight to wait: nobody is turned away.
    let queued = ServeConfig { max_concurrent_embeddings: 1, max_queued_embeddings: 8, ..Default::default() };
    let srv = Server::start(&fx, fx.backends(IndexKind::Hnsw).await, queued).await;
    assert_eq!(searches(&srv).await, 6, "one at a time: six model calls");
    // Eight slots and a window to gather in: six queries in fewer model calls, each answered right.
    let batched = ServeConfig { max_batch: 8, batch_window: Duration::from_millis(200), ..Default::default() };
    let srv = Server::start(&fx, b, batched).await;
    let calls = searches(&srv).await;
    assert!(calls < 6, "{calls} model calls for six concurrent queries");
    fx.cleanup().await;
}

/// One token admitted everything: the token a page or an app needed to search could also upload,
/// delete and drop. The read token admits search, count, progress and images, and nothing that
/// writes; the write token admits both.
#[tokio::test(flavor = "multi_thread")]
async fn the_read_token_searches_and_never_writes() {
    const READ: &str = "read-only-token";
    let fx = Fixture::new("read_token");
    let photos = upload_photos(&fx, 1).await;
    let b = fx.backends(IndexKind::Hnsw).await;
    fx.sync(&b).await;
    let config = ServeConfig {
        token: Some(TOKEN.into()),
        read_token: Some(READ.into()),
        protect_search: true,
        ..Default::default()
    };
    let srv = Server::start(&fx, b, config).await;
    let http = &srv.http;
    let search = |token: &str| {
        http.post(srv.url("img/search")).bearer_auth(token).multipart(Server::form(photos[0].1.to_vec(), "1"))
    };
    let object = format!("img/object/{}", photos[0].0);
    for token in [READ, TOKEN] {
        assert_eq!(Server::json(search(token)).await.0, 200, "search with {token}");
        assert_eq!(Server::json(http.get(srv.url("progress")).bearer_auth(token)).await.0, 200);
        assert_eq!(http.get(srv.url(&object)).bearer_auth(token).send().await.unwrap().status(), 200);
    }
    assert_error(Server::json(search("wrong")).await, 401, "unauthorized");
    assert_error(srv.search(photos[0].1.to_vec(), "1").await, 401, "unauthorized");
    // Writes: the read token is not enough.
    let upload = |token: &str| {
        http.post(srv.url("img/upload")).bearer_auth(token).multipart(Server::form(photos[0].1.to_vec(), "1"))
    };
    assert_error(Server::json(upload(READ)).await, 401, "unauthorized");
    assert_error(
        Server::json(http.delete(srv.url(&format!("img/{}", photos[0].0))).bearer_auth(READ)).await,
        401,
        "unauthorized",
    );
    assert!(matches!(Server::json(upload(TOKEN)).await.0, 200 | 201));
    fx.cleanup().await;
}
