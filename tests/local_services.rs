//! End-to-end tests on the real local services that `hack/services.sh up` starts: Milvus 2.3.5,
//! MariaDB and SeaweedFS S3, with ONNX Runtime and the generated ResNet50. `hack/test.sh` starts
//! them and sets the environment; without it these tests fail and say so (they never skip).

use std::io::Cursor;
use std::process::Command;
use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use image::{DynamicImage, ImageFormat, RgbImage, imageops::FilterType};
use imageindex::embed::worker::{Backends, Summary, SyncOptions, sync};
use imageindex::embed::{DecodeLimits, Model, ModelId, ModelOptions, Precision, Preprocessor};
use imageindex::serve::{AppState, ServeConfig};
use imageindex::store::{Catalog, IndexKind, MilvusConfig, Source, SourceConfig, VectorStore, key_id};

#[path = "local_services/mock_api.rs"]
mod mock_api;
#[path = "local_services/operator.rs"]
mod operator;
#[path = "local_services/precision.rs"]
mod precision;

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("{name} is not set: run the tests through hack/test.sh"))
}

/// One model for the whole test binary (loading it takes a second).
fn model() -> Arc<Model> {
    static MODEL: OnceLock<Arc<Model>> = OnceLock::new();
    MODEL
        .get_or_init(|| {
            let m = Model::load(env("IMAGEINDEX_MODEL").as_ref(), &ModelOptions::default()).expect("loading the model");
            Arc::new(m)
        })
        .clone()
}

/// A fresh collection and bucket prefix per test, so tests never share state.
struct Fixture {
    name: String,
    source: Source,
    source_url: String,
}

impl Fixture {
    fn new(test: &str) -> Self {
        let name = format!("t_{test}_{}_{}", std::process::id(), nanos());
        let source_url = format!("s3://imageindex-test/{name}/");
        let source = Source::open(&SourceConfig {
            url: source_url.clone(),
            endpoint: Some(env("IMAGEINDEX_S3_ENDPOINT")),
            include: vec![],
            credentials: None,
        })
        .unwrap();
        Self { name, source, source_url }
    }

    fn milvus(&self, index: IndexKind) -> MilvusConfig {
        MilvusConfig { url: env("IMAGEINDEX_MILVUS_URL"), token: None, collection: self.name.clone(), index }
    }

    async fn backends(&self, index: IndexKind) -> Backends {
        Backends {
            source: self.source.clone(),
            vectors: VectorStore::connect(&self.milvus(index)).await.unwrap(),
            catalog: Catalog::connect(&env("IMAGEINDEX_MYSQL_URL"), &self.name, "test-model").await.unwrap(),
        }
    }

    /// Drops the test's collection and catalog rows.
    async fn cleanup(&self) {
        let b = self.backends(IndexKind::Hnsw).await;
        b.vectors.drop_collection().await.unwrap();
        b.catalog.drop_collection().await.unwrap();
    }

    async fn sync(&self, b: &Backends) -> Summary {
        sync(b, model(), &SyncOptions::default()).await.expect("sync")
    }
}

fn nanos() -> u128 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() % 1_000_000
}

fn fixture_image(name: &str) -> RgbImage {
    let path = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
    image::open(&path).unwrap().to_rgb8()
}

fn jpeg(img: &RgbImage, quality: u8) -> Bytes {
    let mut out = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, quality).encode_image(img).unwrap();
    out.into()
}

/// xorshift: deterministic test images without a rand dependency.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u32) -> u32 {
        (self.next() % n as u64) as u32
    }
}

/// `n` distinct photos: crops, rescales, flips and colour changes of the real fixture photos, and
/// synthetic scenes (gradients and shapes) for the rest.
fn photo_set(n: usize) -> Vec<(String, RgbImage)> {
    let bases: Vec<RgbImage> = ["chelsea.png", "rocket.jpg", "camera.png", "logo.png"].map(fixture_image).into();
    let mut rng = Rng(0x5eed);
    (0..n)
        .map(|i| {
            let img = if i % 2 == 0 {
                let base = &bases[(i / 2) % bases.len()];
                let (w, h) = base.dimensions();
                let (cw, ch) = (w / 2 + rng.below(w / 2), h / 2 + rng.below(h / 2));
                let (x, y) = (rng.below(w - cw + 1), rng.below(h - ch + 1));
                let mut crop = image::imageops::crop_imm(base, x, y, cw, ch).to_image();
                if rng.below(2) == 1 {
                    crop = image::imageops::flip_horizontal(&crop);
                }
                let shift = [rng.below(60) as i32 - 30, rng.below(60) as i32 - 30, rng.below(60) as i32 - 30];
                for p in crop.pixels_mut() {
                    for (v, d) in p.0.iter_mut().zip(shift) {
                        *v = (*v as i32 + d).clamp(0, 255) as u8;
                    }
                }
                let s = 0.6 + rng.below(60) as f32 / 100.0;
                image::imageops::resize(&crop, (cw as f32 * s) as u32, (ch as f32 * s) as u32, FilterType::Triangle)
            } else {
                let (w, h) = (320 + rng.below(200), 240 + rng.below(160));
                synthetic(&mut rng, w, h)
            };
            (format!("photos/{:03}/img-{i:04}.jpg", i % 7), img)
        })
        .collect()
}

fn synthetic(rng: &mut Rng, w: u32, h: u32) -> RgbImage {
    let (a, b) = ([rng.below(256), rng.below(256), rng.below(256)], [rng.below(256), rng.below(256), rng.below(256)]);
    let mut img = RgbImage::from_fn(w, h, |x, y| {
        let t = (x + y) as f32 / (w + h) as f32;
        image::Rgb(std::array::from_fn(|c| (a[c] as f32 * (1.0 - t) + b[c] as f32 * t) as u8))
    });
    for _ in 0..(3 + rng.below(8)) {
        let (cx, cy, r) = (rng.below(w), rng.below(h), 10 + rng.below(w / 3));
        let color = [rng.below(256) as u8, rng.below(256) as u8, rng.below(256) as u8];
        let square = rng.below(2) == 1;
        for (x, y, p) in img.enumerate_pixels_mut() {
            let (dx, dy) = (x.abs_diff(cx), y.abs_diff(cy));
            if (square && dx < r && dy < r) || (!square && dx * dx + dy * dy < r * r) {
                p.0 = color;
            }
        }
    }
    img
}

/// A real decompression bomb: a valid 1-bit 20000x20000 PNG, ~50 KB on disk, 400 MP decoded.
fn png_bomb() -> Bytes {
    let mut out = Vec::new();
    let mut enc = png::Encoder::new(&mut out, 20_000, 20_000);
    enc.set_color(png::ColorType::Grayscale);
    enc.set_depth(png::BitDepth::One);
    let mut w = enc.write_header().unwrap();
    w.write_image_data(&vec![0u8; 2_500 * 20_000]).unwrap();
    w.finish().unwrap();
    out.into()
}

/// The query a user would make: the same photo, re-encoded at another quality and slightly smaller.
fn near_duplicate(original: &[u8]) -> Vec<u8> {
    let img = image::load_from_memory(original).unwrap();
    let (w, h) = (img.width(), img.height());
    let small = img.resize_exact(w * 92 / 100, h * 92 / 100, FilterType::CatmullRom);
    jpeg(&small.to_rgb8(), 70).to_vec()
}

fn embed(bytes: &[u8]) -> Vec<f32> {
    let t = Preprocessor::default().from_bytes(bytes, DecodeLimits::default()).unwrap();
    model().embed(&t, 1).unwrap().remove(0)
}

async fn upload_photos(fx: &Fixture, n: usize) -> Vec<(String, Bytes)> {
    let photos: Vec<(String, Bytes)> = photo_set(n).into_iter().map(|(k, img)| (k, jpeg(&img, 88))).collect();
    futures::future::try_join_all(photos.iter().map(|(k, b)| fx.source.put(k, b.clone()))).await.unwrap();
    photos
}

#[tokio::test(flavor = "multi_thread")]
async fn index_search_resync_and_delete() {
    let fx = Fixture::new("e2e");
    let photos = upload_photos(&fx, 200).await;
    let truncated = photos[0].1.slice(..photos[0].1.len() / 3);
    fx.source.put("bad/truncated.jpg", truncated).await.unwrap();
    fx.source.put("bad/notes.jpg", Bytes::from_static(b"this is a text file, not a photo\n")).await.unwrap();
    fx.source.put("bad/bomb.png", png_bomb()).await.unwrap();

    // First run: the Job's path, two shards as two `imageindex embed` processes side by side.
    let shards: Vec<_> = (0..2)
        .map(|shard| {
            Command::new(env!("CARGO_BIN_EXE_imageindex"))
                .args(["embed", "--json", "--batch-size", "8"])
                .env("IMAGEINDEX_SOURCE", &fx.source_url)
                .env("JOB_COMPLETION_INDEX", shard.to_string())
                .env("IMAGEINDEX_SHARDS", "2")
                .env("IMAGEINDEX_COLLECTION", &fx.name)
                .env("IMAGEINDEX_THREADS", "1")
                // One shard keeps two batches in the model at once, as on a GPU.
                .env("IMAGEINDEX_SESSIONS", (shard + 1).to_string())
                .spawn()
                .unwrap()
        })
        .collect();
    for mut child in shards {
        assert!(child.wait().unwrap().success(), "an embed shard failed");
    }
    let b = fx.backends(IndexKind::Hnsw).await;
    assert_eq!(b.vectors.count().await.unwrap(), 200, "Milvus holds every good photo once");
    let counts = b.catalog.counts().await.unwrap();
    assert_eq!((counts.indexed, counts.failed), (200, 3));
    let failures = b.catalog.failures(10).await.unwrap();
    let reason = |key: &str| failures.iter().find(|f| f.key == key).map(|f| f.error.clone()).unwrap_or_default();
    assert!(reason("bad/truncated.jpg").contains("truncated JPEG"), "{failures:?}");
    assert!(reason("bad/notes.jpg").contains("not a supported image"), "{failures:?}");
    assert!(reason("bad/bomb.png").contains("20000x20000"), "{failures:?}");

    // Near-duplicate queries find their original first.
    for i in [0, 1, 2, 7, 50, 101, 150, 199] {
        let (key, bytes) = &photos[i];
        let hits = b.vectors.search(embed(&near_duplicate(bytes)), 5, None).await.unwrap();
        assert_eq!(&hits[0].key, key, "query {i}: top hits {hits:?}");
    }

    // Second run: nothing new, nothing duplicated.
    let s = fx.sync(&b).await;
    assert_eq!((s.discovered, s.new, s.changed, s.unchanged, s.indexed, s.failed), (203, 0, 0, 203, 0, 0));
    assert_eq!(s.vectors, 200, "the summary reports the collection's size");
    assert_eq!(b.vectors.count().await.unwrap(), 200);

    // Delete 10 objects: exactly those leave Milvus and the catalog.
    let gone: Vec<&str> = photos.iter().step_by(20).map(|(k, _)| k.as_str()).collect();
    assert_eq!(gone.len(), 10);
    for k in &gone {
        fx.source.delete(k).await.unwrap();
    }
    let s = fx.sync(&b).await;
    assert_eq!((s.deleted, s.new, s.indexed), (10, 0, 0));
    assert_eq!(b.vectors.count().await.unwrap(), 190);
    let gone_ids: Vec<i64> = gone.iter().map(|k| key_id(k)).collect();
    assert!(b.vectors.existing(&gone_ids).await.unwrap().is_empty(), "deleted objects still in Milvus");
    let kept_ids: Vec<i64> = photos.iter().skip(1).take(10).map(|(k, _)| key_id(k)).collect();
    assert_eq!(b.vectors.existing(&kept_ids).await.unwrap().len(), 10, "the wrong objects were deleted");
    let entries = b.catalog.entries(0, 1).await.unwrap();
    assert_eq!(entries.len(), 193);
    assert!(gone.iter().all(|k| !entries.contains_key(*k)));

    // A changed object is re-embedded in place: the new content is found under the same key.
    let (key, _) = &photos[3];
    let replacement = jpeg(&synthetic(&mut Rng(42), 400, 300), 90);
    fx.source.put(key, replacement.clone()).await.unwrap();
    let s = fx.sync(&b).await;
    assert_eq!((s.changed, s.indexed, s.new), (1, 1, 0));
    assert_eq!(b.vectors.count().await.unwrap(), 190);
    let hits = b.vectors.search(embed(&near_duplicate(&replacement)), 3, None).await.unwrap();
    assert_eq!(&hits[0].key, key);

    // A changed object that is now broken loses its vector and is reported.
    let (key, _) = &photos[5];
    fx.source.put(key, Bytes::from_static(b"\xff\xd8\xff\xe0 broken")).await.unwrap();
    let s = fx.sync(&b).await;
    assert_eq!((s.changed, s.failed), (1, 1));
    assert!(b.vectors.existing(&[key_id(key)]).await.unwrap().is_empty());
    assert_eq!(b.vectors.count().await.unwrap(), 189);
    fx.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn ivf_flat_l2_collections_work_too() {
    let fx = Fixture::new("ivf");
    let photos = upload_photos(&fx, 24).await;
    let b = fx.backends(IndexKind::IvfFlat).await;
    let s = fx.sync(&b).await;
    assert_eq!((s.indexed, s.failed), (24, 0));
    let hits = b.vectors.search(embed(&near_duplicate(&photos[9].1)), 3, None).await.unwrap();
    assert_eq!(hits[0].key, photos[9].0);
    assert!(hits[0].score <= hits[1].score, "L2: smaller is closer");
    // A collection with another vector width is refused, not silently mixed.
    let other = VectorStore::connect(&fx.milvus(IndexKind::IvfFlat)).await.unwrap();
    let fp32 = model().id().clone();
    let err = other.ensure_collection(512, &fp32, false).await.unwrap_err();
    assert!(format!("{err:#}").contains("2048-d"), "{err:#}");
    // So are vectors of another precision or model, in Milvus and in the catalog alike.
    let int8 = ModelId { precision: Precision::Int8, ..fp32.clone() };
    let err = other.ensure_collection(2048, &int8, false).await.unwrap_err();
    assert!(format!("{err:#}").contains("holds fp32 vectors"), "{err:#}");
    other.ensure_collection(2048, &int8, true).await.expect("mixing when asked for");
    let err = b.catalog.claim(&int8, false).await.unwrap_err();
    assert!(format!("{err:#}").contains("the catalog of"), "{err:#}");
    let clip = ModelId { model: "clip.onnx".into(), ..fp32 };
    let err = other.ensure_collection(2048, &clip, true).await.unwrap_err();
    assert!(format!("{err:#}").contains("different models"), "{err:#}");
    fx.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn model_output_matches_the_reference_tensor_path() {
    // The Rust pipeline (decode + preprocess + model) against the model on the torchvision tensor:
    // the raw 2048-d outputs agree element-wise to a small relative error.
    let m = model();
    for stem in ["chelsea", "camera"] {
        let levels = std::fs::read(format!("{}/tests/fixtures/{stem}.levels.u8", env!("CARGO_MANIFEST_DIR"))).unwrap();
        let (mean, std) = ([0.485f32, 0.456, 0.406], [0.229f32, 0.224, 0.225]);
        let plane = levels.len() / 3;
        let reference: Vec<f32> =
            levels.iter().enumerate().map(|(i, &k)| (k as f32 / 255.0 - mean[i / plane]) / std[i / plane]).collect();
        let bytes = std::fs::read(format!("{}/tests/fixtures/{stem}.png", env!("CARGO_MANIFEST_DIR"))).unwrap();
        let ours = Preprocessor::default().from_bytes(&bytes, DecodeLimits::default()).unwrap();
        let out = m.embed(&[reference, ours].concat(), 2).unwrap();
        let rel = out[0].iter().zip(&out[1]).map(|(a, b)| (a - b).powi(2)).sum::<f32>().sqrt();
        eprintln!("{stem}: relative L2 error of the embedding {rel:.2e}");
        assert!(rel < 1e-3, "{stem}: embedding off the reference path by {rel}");
        assert_eq!(out[0].len(), 2048);
    }
}

/// A running `serve` on a fresh collection, with a token and drop enabled.
struct Server {
    base: String,
    http: reqwest::Client,
}

const TOKEN: &str = "test-token-123";

impl Server {
    async fn start(fx: &Fixture, b: Backends, config: ServeConfig) -> Self {
        let state = AppState::new(model(), b.vectors, b.catalog, Some(fx.source.clone()), config);
        let app = imageindex::serve::router(Arc::new(state));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Self { base, http: reqwest::Client::new() }
    }

    fn form(bytes: Vec<u8>, topk: &str) -> reqwest::multipart::Form {
        reqwest::multipart::Form::new()
            .part("image", reqwest::multipart::Part::bytes(bytes).file_name("q.jpg"))
            .text("topk", topk.to_string())
    }

    async fn search(&self, bytes: Vec<u8>, topk: &str) -> (u16, serde_json::Value) {
        let r = self.http.post(format!("{}/img/search", self.base)).multipart(Self::form(bytes, topk));
        Self::json(r).await
    }

    async fn json(r: reqwest::RequestBuilder) -> (u16, serde_json::Value) {
        let r = r.send().await.unwrap();
        let status = r.status().as_u16();
        let text = r.text().await.unwrap();
        (status, serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text)))
    }

    fn url(&self, path: &str) -> String {
        format!("{}/{path}", self.base)
    }
}

fn assert_error(got: (u16, serde_json::Value), status: u16, code: &str) {
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

    // Back-pressure: with one embedding slot, a burst gets some 503s with Retry-After, never a queue.
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
    assert!(statuses.contains(&200) && statuses.contains(&503), "{statuses:?}");

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
    let catalog = Catalog::connect(url.as_str(), &fx.name, "test-model").await.unwrap();
    let vectors = VectorStore::connect(&fx.milvus(IndexKind::Hnsw)).await.unwrap();
    let srv =
        Server::start(&fx, Backends { source: fx.source.clone(), vectors, catalog }, ServeConfig::default()).await;
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
    assert!(
        body["message"].as_str().unwrap().to_lowercase().contains("connect")
            || body["message"].as_str().unwrap().contains("pool"),
        "{body}"
    );
    fx.cleanup().await;
}
