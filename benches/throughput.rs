//! Indexing throughput against bare model throughput, measured in one run so that they compare.
//! Needs the local services and the model: run it through `hack/bench.sh`.
//!
//! - decode + preprocess alone, one core: JPEG bytes -> normalised tensor
//! - bare model: preprocessed tensors in memory -> L2-normalised vectors, at each batch size
//! - end to end: `sync` over photos in the S3 server (fetch + decode + preprocess + embed +
//!   Milvus upsert + catalog rows), at each batch size, into a fresh collection
//!
//! Workload: IMAGES (default 200) photos of a typical size (500x375 JPEG, quality 90), cut from the
//! committed fixture photos. Batch sizes: BATCHES (default "1 16"). Rounds: ROUNDS (default 3).

use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::{Context, Result};
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt, stream};
use image::imageops::FilterType;
use imageindex::embed::worker::{Backends, SyncOptions, sync};
use imageindex::embed::{DecodeLimits, Model, ModelOptions, Preprocessor};
use imageindex::store::{Catalog, IndexKind, MilvusConfig, Source, SourceConfig, VectorStore};

fn env(name: &str) -> Result<String> {
    std::env::var(name).with_context(|| format!("{name} is not set: run the benchmark through hack/bench.sh"))
}

fn photos(n: usize) -> Vec<(String, Bytes)> {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");
    let bases: Vec<image::RgbImage> = ["chelsea.png", "rocket.jpg", "camera.png", "logo.png"]
        .map(|f| image::open(format!("{dir}/{f}")).unwrap().to_rgb8())
        .into();
    let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
    let mut next = move |n: u32| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        (seed % n as u64) as u32
    };
    (0..n)
        .map(|i| {
            let base = &bases[i % bases.len()];
            let (w, h) = base.dimensions();
            let (cw, ch) = (w / 2 + next(w / 2), h / 2 + next(h / 2));
            let (x, y) = (next(w - cw + 1), next(h - ch + 1));
            let crop = image::imageops::crop_imm(base, x, y, cw, ch).to_image();
            let photo = image::imageops::resize(&crop, 500, 375, FilterType::Triangle);
            let mut jpeg = Vec::new();
            image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpeg, 90).encode_image(&photo).unwrap();
            (format!("bench/{i:05}.jpg"), Bytes::from(jpeg))
        })
        .collect()
}

fn peak_rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kb =
        status.lines().find_map(|l| l.strip_prefix("VmHWM:")).and_then(|v| v.split_whitespace().next()?.parse().ok());
    kb.unwrap_or(0.0) / 1024.0
}

/// `--embed-only`: the bare embedding of one query (QUERY, a file): decode + preprocess + model at
/// batch 1, no HTTP and no Milvus; the baseline for the load test's latencies.
fn embed_only() -> Result<()> {
    let bytes = std::fs::read(env("QUERY")?)?;
    let mut model = Model::load(env("IMAGEINDEX_MODEL")?.as_ref(), &ModelOptions::default())?;
    let mut pre = Preprocessor::default();
    let mut times = vec![];
    for i in 0..21 {
        let t = Instant::now();
        let tensor = pre.from_bytes(&bytes, DecodeLimits::default())?;
        model.embed(&tensor, 1)?;
        if i > 0 {
            times.push(t.elapsed().as_secs_f64() * 1e3); // the first call warms up
        }
    }
    let p50 = median(&mut times);
    println!(
        "bare embedding of the query (decode + preprocess + model, batch 1): p50 {p50:.1} ms, {:.2} images/s",
        1e3 / p50
    );
    Ok(())
}

fn main() -> Result<()> {
    if std::env::args().any(|a| a == "--embed-only") {
        return embed_only();
    }
    let n: usize = std::env::var("IMAGES").ok().and_then(|v| v.parse().ok()).unwrap_or(200);
    let batches: Vec<usize> = std::env::var("BATCHES")
        .unwrap_or_else(|_| "1 16".into())
        .split_whitespace()
        .map(|b| b.parse().context("BATCHES holds batch sizes"))
        .collect::<Result<_>>()?;
    let rounds: usize = std::env::var("ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(3);
    let rt = tokio::runtime::Runtime::new()?;
    let photos = photos(n);
    let spinning = std::env::var("IMAGEINDEX_ORT_SPINNING").map_or(true, |v| v != "false");
    let model = Model::load(env("IMAGEINDEX_MODEL")?.as_ref(), &ModelOptions { spinning, ..Default::default() })?;
    let model = Arc::new(Mutex::new(model));
    let cores = imageindex::embed::model::available_cores();
    let mean_kib = photos.iter().map(|(_, b)| b.len()).sum::<usize>() as f64 / n as f64 / 1024.0;
    println!(
        "workload: {n} JPEG photos, 500x375, {mean_kib:.0} KiB on average; {cores} cores; ORT spinning {spinning}"
    );

    // Decode + preprocess alone, on one core.
    let mut pre = Preprocessor::default();
    let t = Instant::now();
    let tensors: Vec<Vec<f32>> =
        photos.iter().map(|(_, b)| pre.from_bytes(b, DecodeLimits::default())).collect::<Result<_, _>>()?;
    let decode_rate = n as f64 / t.elapsed().as_secs_f64();
    println!("decode + preprocess, 1 core:      {decode_rate:8.1} images/s");

    // Rounds of (bare model, end to end, bare model) over the same number of images; the mean of
    // the two bare figures brackets the end-to-end one, which cancels the drift of a shared machine.
    println!("\nbatch | round | bare model img/s (before, after) | end to end img/s | end to end / bare");
    for &batch in &batches {
        let mut ratios = vec![];
        for round in 1..=rounds {
            let before = bare_model(&model, &tensors, batch, n)?;
            let e2e = rt.block_on(end_to_end(&photos, model.clone(), batch))?;
            let after = bare_model(&model, &tensors, batch, n)?;
            let bare = (before + after) / 2.0;
            ratios.push(e2e / bare);
            println!(
                "{batch:5} | {round:5} | {bare:6.1} ({before:5.1}, {after:5.1})          | {e2e:16.1} | {:16.1}%",
                100.0 * e2e / bare
            );
        }
        println!(
            "batch {batch}: end to end / bare model, median of {rounds} rounds: {:.1}%",
            100.0 * median(&mut ratios)
        );
    }
    println!("peak RSS {:.0} MiB", peak_rss_mib());
    Ok(())
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Images per second of the model alone on preprocessed tensors, over about `n` images.
fn bare_model(model: &Mutex<Model>, tensors: &[Vec<f32>], batch: usize, n: usize) -> Result<f64> {
    let input: Vec<f32> = (0..batch).flat_map(|i| tensors[i % tensors.len()].iter().copied()).collect();
    let mut m = model.lock().unwrap();
    m.embed(&input, batch)?; // warm-up
    let calls = n.div_ceil(batch);
    let t = Instant::now();
    for _ in 0..calls {
        m.embed(&input, batch)?;
    }
    Ok((calls * batch) as f64 / t.elapsed().as_secs_f64())
}

/// Uploads the photos under a fresh prefix, indexes them into a fresh collection, and returns images/s.
async fn end_to_end(photos: &[(String, Bytes)], model: Arc<Mutex<Model>>, batch: usize) -> Result<f64> {
    let name = format!("bench_{}_{batch}_{}", std::process::id(), std::time::UNIX_EPOCH.elapsed()?.as_millis());
    let source = Source::open(&SourceConfig {
        url: format!("s3://imageindex-bench/{name}/"),
        endpoint: Some(env("IMAGEINDEX_S3_ENDPOINT")?),
        include: vec![],
        credentials: None,
    })?;
    stream::iter(photos).map(|(k, b)| source.put(k, b.clone())).buffer_unordered(16).try_collect::<Vec<_>>().await?;
    let milvus = MilvusConfig {
        url: env("IMAGEINDEX_MILVUS_URL")?,
        token: None,
        collection: name.clone(),
        index: IndexKind::Hnsw,
    };
    let backends = Backends {
        source,
        vectors: VectorStore::connect(&milvus).await?,
        catalog: Catalog::connect(&env("IMAGEINDEX_MYSQL_URL")?, &name, "bench").await?,
    };
    let opts = SyncOptions { batch_size: batch, ..Default::default() };
    let summary = sync(&backends, model, &opts).await?;
    anyhow::ensure!(summary.indexed == photos.len(), "indexed {} of {}", summary.indexed, photos.len());
    backends.vectors.drop_collection().await?;
    backends.catalog.drop_collection().await?;
    Ok(summary.images_per_second())
}
