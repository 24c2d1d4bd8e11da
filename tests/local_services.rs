//! End-to-end tests on the real local services that `hack/services.sh up` starts: Milvus 2.3.5,
//! MariaDB and SeaweedFS S3, with ONNX Runtime and the generated ResNet50. `hack/test.sh` starts
//! them and sets the environment; without it these tests fail and say so (they never skip).

use std::io::Cursor;
use std::process::Command;
use std::sync::{Arc, Mutex, OnceLock};

use bytes::Bytes;
use image::{DynamicImage, ImageFormat, RgbImage, imageops::FilterType};
use imageindex::embed::worker::{Backends, Summary, SyncOptions, sync};
use imageindex::embed::{DecodeLimits, Model, ModelOptions, Preprocessor};
use imageindex::serve::{AppState, ServeOptions};
use imageindex::store::{Catalog, IndexKind, MilvusConfig, Source, SourceConfig, VectorStore, key_id};

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("{name} is not set: run the tests through hack/test.sh"))
}

/// One model for the whole test binary (loading it takes a second).
fn model() -> Arc<Mutex<Model>> {
    static MODEL: OnceLock<Arc<Mutex<Model>>> = OnceLock::new();
    MODEL
        .get_or_init(|| {
            let m = Model::load(env("IMAGEINDEX_MODEL").as_ref(), &ModelOptions::default()).expect("loading the model");
            Arc::new(Mutex::new(m))
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
    model().lock().unwrap().embed(&t, 1).unwrap().remove(0)
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
        let hits = b.vectors.search(embed(&near_duplicate(bytes)), 5).await.unwrap();
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
    let hits = b.vectors.search(embed(&near_duplicate(&replacement)), 3).await.unwrap();
    assert_eq!(&hits[0].key, key);

    // A changed object that is now broken loses its vector and is reported.
    let (key, _) = &photos[5];
    fx.source.put(key, Bytes::from_static(b"\xff\xd8\xff\xe0 broken")).await.unwrap();
    let s = fx.sync(&b).await;
    assert_eq!((s.changed, s.failed), (1, 1));
    assert!(b.vectors.existing(&[key_id(key)]).await.unwrap().is_empty());
    assert_eq!(b.vectors.count().await.unwrap(), 189);

    b.vectors.drop_collection().await.unwrap();
    b.catalog.drop_collection().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn ivf_flat_l2_collections_work_too() {
    let fx = Fixture::new("ivf");
    let photos = upload_photos(&fx, 24).await;
    let b = fx.backends(IndexKind::IvfFlat).await;
    let s = fx.sync(&b).await;
    assert_eq!((s.indexed, s.failed), (24, 0));
    let hits = b.vectors.search(embed(&near_duplicate(&photos[9].1)), 3).await.unwrap();
    assert_eq!(hits[0].key, photos[9].0);
    assert!(hits[0].score <= hits[1].score, "L2: smaller is closer");
    // A collection with another vector width is refused, not silently mixed.
    let other = VectorStore::connect(&fx.milvus(IndexKind::IvfFlat)).await.unwrap();
    let err = other.ensure_collection(512).await.unwrap_err();
    assert!(format!("{err:#}").contains("2048-d"), "{err:#}");
    b.vectors.drop_collection().await.unwrap();
    b.catalog.drop_collection().await.unwrap();
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
        let mut m = m.lock().unwrap();
        let out = m.embed(&[reference, ours].concat(), 2).unwrap();
        let rel = out[0].iter().zip(&out[1]).map(|(a, b)| (a - b).powi(2)).sum::<f32>().sqrt();
        eprintln!("{stem}: relative L2 error of the embedding {rel:.2e}");
        assert!(rel < 1e-3, "{stem}: embedding off the reference path by {rel}");
        assert_eq!(out[0].len(), 2048);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn serve_answers_search_and_count_with_json_errors() {
    let fx = Fixture::new("serve");
    let photos = upload_photos(&fx, 12).await;
    let b = fx.backends(IndexKind::Hnsw).await;
    fx.sync(&b).await;
    let state = AppState { model: model(), vectors: b.vectors, catalog: b.catalog, limits: DecodeLimits::default() };
    let app = imageindex::serve::router(Arc::new(state), ServeOptions { max_upload_bytes: 1 << 20 });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let http = reqwest::Client::new();
    let search = |bytes: Vec<u8>, topk: &str| {
        let form = reqwest::multipart::Form::new()
            .part("image", reqwest::multipart::Part::bytes(bytes).file_name("q.jpg"))
            .text("topk", topk.to_string());
        http.post(format!("{base}/img/search")).multipart(form).send()
    };

    let r = search(near_duplicate(&photos[4].1), "3").await.unwrap();
    let status = r.status();
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["results"].as_array().unwrap().len(), 3);
    assert_eq!(body["results"][0]["key"], photos[4].0.as_str());
    assert_eq!(body["results"][0]["rank"], 1);

    let r = http.get(format!("{base}/img/count")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!((body["count"].as_u64(), body["indexed"].as_u64()), (Some(12), Some(12)));

    let mut png = Vec::new();
    DynamicImage::ImageRgb8(synthetic(&mut Rng(7), 64, 64))
        .write_to(&mut Cursor::new(&mut png), ImageFormat::Png)
        .unwrap();
    for (bytes, topk, status, code) in [
        (b"plain text".to_vec(), "3", 415, "unsupported_media_type"),
        (photos[0].1[..photos[0].1.len() / 3].to_vec(), "3", 400, "bad_image"),
        (png_bomb().to_vec(), "3", 413, "image_too_large"),
        (vec![0xff; 2 << 20], "3", 413, "payload_too_large"),
        (png.clone(), "0", 400, "bad_request"),
        (png.clone(), "101", 400, "bad_request"),
    ] {
        let r = search(bytes, topk).await.unwrap();
        assert_eq!(r.status(), status, "expected {code}");
        let body: serde_json::Value = r.json().await.unwrap();
        assert_eq!(body["error"], code, "{body}");
        assert!(body["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
    let r = http.post(format!("{base}/img/search")).multipart(reqwest::multipart::Form::new().text("topk", "3"));
    assert_eq!(r.send().await.unwrap().status(), 400, "no image field");
    assert_eq!(http.get(format!("{base}/healthz")).send().await.unwrap().status(), 200);
    let cleanup = fx.backends(IndexKind::Hnsw).await;
    cleanup.vectors.drop_collection().await.unwrap();
    cleanup.catalog.drop_collection().await.unwrap();
}
