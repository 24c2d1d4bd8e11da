//! What the end-to-end tests share: the environment `hack/test.sh` sets, one model per test
//! binary, a fresh collection and bucket prefix per test, and generated photos.

use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use image::{RgbImage, imageops::FilterType};
use imageindex::bucket::{Source, SourceConfig};
use imageindex::core::IndexKind;
use imageindex::embed::{DecodeLimits, Model, ModelOptions};
use imageindex::index::{Generations, Index};
use imageindex::store::MilvusConfig;
use imageindex::sync::{Backends, Summary, SyncOptions, sync};

pub fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("{name} is not set: run the tests through hack/test.sh"))
}

/// One model for the whole test binary (loading it takes a second).
pub fn model() -> Arc<Model> {
    static MODEL: OnceLock<Arc<Model>> = OnceLock::new();
    MODEL
        .get_or_init(|| {
            let m = Model::load(env("IMAGEINDEX_MODEL").as_ref(), &ModelOptions::default()).expect("loading the model");
            Arc::new(m)
        })
        .clone()
}

/// A fresh collection and bucket prefix per test, so tests never share state.
pub struct Fixture {
    pub name: String,
    pub source: Source,
    pub source_url: String,
}

impl Fixture {
    pub fn new(test: &str) -> Self {
        Self::at(test, "s3://imageindex-test", "IMAGEINDEX_S3_ENDPOINT")
    }

    /// A fixture in another store: `bucket` is `scheme://bucket`, `endpoint` the variable that
    /// holds the store's endpoint.
    pub fn at(test: &str, bucket: &str, endpoint: &str) -> Self {
        let name = format!("t_{test}_{}_{}", std::process::id(), nanos());
        let source_url = format!("{bucket}/{name}/");
        let source = Source::open(&SourceConfig {
            url: source_url.clone(),
            endpoint: Some(env(endpoint)),
            include: vec![],
            settings: vec![],
        })
        .unwrap();
        Self { name, source, source_url }
    }

    pub fn milvus(&self, index: IndexKind) -> MilvusConfig {
        MilvusConfig { url: env("IMAGEINDEX_MILVUS_URL"), token: None, collection: self.name.clone(), index }
    }

    pub async fn backends(&self, index: IndexKind) -> Backends {
        Backends { source: self.source.clone(), index: self.index(index).await }
    }

    /// The test's collection and catalog rows, as the test model's.
    pub async fn index(&self, index: IndexKind) -> Index {
        let model = "test-model".parse().unwrap();
        Index::connect(&self.milvus(index), &env("IMAGEINDEX_MYSQL_URL"), &model).await.unwrap()
    }

    /// Drops the test's collection and catalog rows (every generation, where it has more), as
    /// each of the owners that hold them.
    pub async fn cleanup(&self) {
        let url = env("IMAGEINDEX_MYSQL_URL");
        let gens = Generations::connect(&self.milvus(IndexKind::Hnsw), &url).await.unwrap();
        let mut owners = vec![imageindex::index::LOCAL_OWNER.to_string()];
        let catalogs = gens.list().await.unwrap().into_iter().map(|g| g.catalog).chain([self.name.clone()]);
        for catalog in catalogs {
            let held = imageindex::store::Catalog::connect(&url, &catalog, "").await.unwrap().owner().await.unwrap();
            owners.extend(held.filter(|o| !owners.contains(o)));
        }
        // Twice: what serves is dropped by its owner only, and the others' generations after it.
        for owner in owners.iter().chain(&owners) {
            match gens.drop_all(owner).await {
                Ok(()) | Err(imageindex::store::Error::Claimed(_)) => {}
                Err(e) => panic!("cleaning up {}: {e}", self.name),
            }
        }
    }

    pub async fn sync(&self, b: &Backends) -> Summary {
        sync(b, model(), &SyncOptions::default()).await.expect("sync")
    }
}

pub fn nanos() -> u128 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() % 1_000_000
}

pub fn fixture_image(name: &str) -> RgbImage {
    let path = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
    image::open(&path).unwrap().to_rgb8()
}

pub fn jpeg(img: &RgbImage, quality: u8) -> Bytes {
    let mut out = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, quality).encode_image(img).unwrap();
    out.into()
}

/// xorshift: deterministic test images without a rand dependency.
pub struct Rng(pub u64);
impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    pub fn below(&mut self, n: u32) -> u32 {
        (self.next() % n as u64) as u32
    }
}

/// `n` distinct photos: crops, rescales, flips and colour changes of the real fixture photos, and
/// synthetic scenes (gradients and shapes) for the rest.
pub fn photo_set(n: usize) -> Vec<(String, RgbImage)> {
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

pub fn synthetic(rng: &mut Rng, w: u32, h: u32) -> RgbImage {
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
pub fn png_bomb() -> Bytes {
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
pub fn near_duplicate(original: &[u8]) -> Vec<u8> {
    let img = image::load_from_memory(original).unwrap();
    let (w, h) = (img.width(), img.height());
    let small = img.resize_exact(w * 92 / 100, h * 92 / 100, FilterType::CatmullRom);
    jpeg(&small.to_rgb8(), 70).to_vec()
}

pub fn embed(bytes: &[u8]) -> Vec<f32> {
    model().embed_image(bytes, DecodeLimits::default()).unwrap()
}

pub async fn upload_photos(fx: &Fixture, n: usize) -> Vec<(String, Bytes)> {
    let photos: Vec<(String, Bytes)> = photo_set(n).into_iter().map(|(k, img)| (k, jpeg(&img, 88))).collect();
    futures::future::try_join_all(photos.iter().map(|(k, b)| fx.source.put(k, b.clone()))).await.unwrap();
    photos
}

/// A grey PNG of `width` x `height`: a few KB on disk whatever its size.
pub fn flat_png(width: u32, height: u32) -> Bytes {
    let mut out = Vec::new();
    let mut enc = png::Encoder::new(&mut out, width, height);
    enc.set_color(png::ColorType::Grayscale);
    let mut w = enc.write_header().unwrap();
    w.write_image_data(&vec![128u8; width as usize * height as usize]).unwrap();
    w.finish().unwrap();
    out.into()
}

/// A command of the imageindex image run here, with only `env_vars` and what the image provides
/// that this machine has elsewhere (the model file and ONNX Runtime): a pod's view, not the test's.
pub fn run_like_the_image(
    args: &[String],
    env_vars: &std::collections::BTreeMap<String, String>,
) -> std::process::Command {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_imageindex"));
    cmd.args(args).env_clear().envs(env_vars);
    cmd.env("IMAGEINDEX_MODEL", env("IMAGEINDEX_MODEL")).env("ORT_DYLIB_PATH", env("ORT_DYLIB_PATH"));
    cmd.env("PATH", std::env::var("PATH").unwrap_or_default()).env("RUST_LOG", "warn");
    cmd
}
