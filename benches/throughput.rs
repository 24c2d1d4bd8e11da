//! Embedding throughput, every stage measured in one run so that the figures compare. Needs the
//! local services and the model: run it through `hack/bench.sh`, which makes the photos.
//!
//! For the device and precision asked for (DEVICE, PRECISION):
//! - decode + preprocess alone (JPEG bytes -> normalised tensor), on one core and on all; the JPEG
//!   decoder alone against image-rs's;
//! - bare model on preprocessed tensors in memory, at each of BARE_BATCHES (default 1 16 64 256);
//! - end to end at each of BATCHES (default 16), in rounds bracketed by bare-model runs (the mean
//!   of the two bare figures is what the end-to-end one is compared with, which cancels a shared
//!   machine's drift): from the local folder and from the S3 server, each without writes
//!   (vectors dropped) and with them (Milvus upsert + catalog rows, a fresh collection each time);
//! - the fp32 bare model at the same batch size, when another precision is benchmarked, as the
//!   baseline the lower precisions are judged against;
//! - with LARGE (a folder of large JPEGs): decode exact vs --fast-jpeg, and the centred cosine of
//!   the two paths' embeddings;
//! - the GPU's mean utilisation during the end-to-end runs (nvidia-smi), where there is one;
//! - peak RSS.
//!
//! PHOTOS: a folder of JPEGs (hack/make-photos.py). ROUNDS (default 3).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt, stream};
use imageindex::bucket::{Source, SourceConfig};
use imageindex::core::{IndexKind, Precision};
use imageindex::embed::{DecodeLimits, Device, Model, ModelOptions, Preprocessor};
use imageindex::index::Index;
use imageindex::store::MilvusConfig;
use imageindex::sync::{Backends, SyncOptions, embed_only, sync};

fn env(name: &str) -> Result<String> {
    std::env::var(name).with_context(|| format!("{name} is not set: run the benchmark through hack/bench.sh"))
}

fn list(var: &str, default: &str) -> Result<Vec<usize>> {
    std::env::var(var)
        .unwrap_or_else(|_| default.into())
        .split_whitespace()
        .map(|b| b.parse().with_context(|| format!("{var} holds numbers")))
        .collect()
}

fn jpegs(dir: &Path) -> Result<Vec<(String, Bytes)>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()?;
    files.sort();
    files
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "jpg"))
        .map(|p| Ok((format!("bench/{}", p.file_name().unwrap().to_string_lossy()), std::fs::read(&p)?.into())))
        .collect()
}

fn peak_rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kb =
        status.lines().find_map(|l| l.strip_prefix("VmHWM:")).and_then(|v| v.split_whitespace().next()?.parse().ok());
    kb.unwrap_or(0.0) / 1024.0
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Samples the GPU's utilisation every 200 ms while it lives; None where there is no nvidia-smi.
struct GpuSampler(Option<std::process::Child>);

impl GpuSampler {
    fn start() -> Self {
        let child = Command::new("nvidia-smi")
            .args(["--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "-lms", "200"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .ok();
        Self(child)
    }

    /// Mean utilisation in percent over the samples.
    fn stop(self) -> Option<f64> {
        let mut child = self.0?;
        let _ = child.kill();
        let out = child.wait_with_output().ok()?;
        let samples: Vec<f64> =
            String::from_utf8_lossy(&out.stdout).lines().filter_map(|l| l.trim().parse().ok()).collect();
        (!samples.is_empty()).then(|| samples.iter().sum::<f64>() / samples.len() as f64)
    }
}

/// `--embed-only`: the bare embedding of one query (QUERY, a file): decode + preprocess + model at
/// batch 1, no HTTP and no Milvus; the baseline for the load test's latencies.
fn embed_query() -> Result<()> {
    let bytes = std::fs::read(env("QUERY")?)?;
    let model = Model::load(env("IMAGEINDEX_MODEL")?.as_ref(), &ModelOptions::default())?;
    let mut pre = Preprocessor::default();
    let mut times = vec![];
    for i in 0..21 {
        let t = Instant::now();
        let tensor = pre.from_bytes(&bytes, DecodeLimits::default(), model.preprocess())?;
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
        return embed_query();
    }
    let photos = jpegs(&PathBuf::from(env("PHOTOS")?).join("photos"))?;
    let n = photos.len();
    anyhow::ensure!(n > 0, "no photos under $PHOTOS/photos");
    let bare_batches = list("BARE_BATCHES", "1 16 64 256")?;
    let batches = list("BATCHES", "16")?;
    let rounds: usize = std::env::var("ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(3);
    let device: Device = env("DEVICE").unwrap_or_else(|_| "cpu".into()).parse().map_err(anyhow::Error::msg)?;
    let precision: Precision =
        env("PRECISION").unwrap_or_else(|_| "fp32".into()).parse().map_err(anyhow::Error::msg)?;
    let spinning = std::env::var("IMAGEINDEX_ORT_SPINNING").map_or(true, |v| v != "false");
    let model_path = env("IMAGEINDEX_MODEL")?;
    let opts = ModelOptions { device, precision, spinning, ..Default::default() };
    let model = Arc::new(Model::load(model_path.as_ref(), &opts)?);
    let cores = imageindex::embed::available_cores();
    let dims = image::load_from_memory(&photos[0].1)?;
    let mean_kib = photos.iter().map(|(_, b)| b.len()).sum::<usize>() as f64 / n as f64 / 1024.0;
    println!(
        "{} on {device:?}, {precision}; {n} JPEG photos of {}x{}, {mean_kib:.0} KiB on average; {cores} cores; ORT spinning {spinning}",
        model.id(),
        dims.width(),
        dims.height()
    );

    // Decode + preprocess alone: one core, then every core; and on one core with the decoder and
    // buffers made afresh for every image, which is what reusing them saves.
    let preprocess = *model.preprocess();
    let decode_rate = |threads: usize, fresh: bool| -> Result<f64> {
        let t = Instant::now();
        std::thread::scope(|s| {
            let chunks: Vec<_> = photos.chunks(n.div_ceil(threads)).collect();
            let handles: Vec<_> = chunks
                .into_iter()
                .map(|c| {
                    s.spawn(move || {
                        let mut pre = Preprocessor::default();
                        c.iter().try_for_each(|(_, b)| {
                            if fresh {
                                pre = Preprocessor::default();
                            }
                            pre.from_bytes(b, DecodeLimits::default(), &preprocess).map(drop)
                        })
                    })
                })
                .collect();
            handles.into_iter().try_for_each(|h| h.join().expect("decode thread"))
        })?;
        Ok(n as f64 / t.elapsed().as_secs_f64())
    };
    println!(
        "decode + preprocess: {:.1} images/s on 1 core ({:.1} with fresh buffers for every image), {:.1} on {cores}",
        decode_rate(1, false)?,
        decode_rate(1, true)?,
        decode_rate(cores, false)?
    );
    let (turbo, zune) = jpeg_decoders(&photos)?;
    println!(
        "JPEG decode alone, 1 core: libjpeg-turbo {turbo:.1} images/s, image-rs (zune-jpeg) {zune:.1} ({:.2}x)",
        turbo / zune
    );
    let mut pre = Preprocessor::default();
    let tensors: Vec<Vec<f32>> = photos
        .iter()
        .take(256)
        .map(|(_, b)| pre.from_bytes(b, DecodeLimits::default(), model.preprocess()))
        .collect::<Result<_, _>>()?;

    // The bare model at each batch size.
    let bare: Vec<String> = bare_batches
        .iter()
        .map(|&b| bare_model(&model, &tensors, b, n.max(b)).map(|r| format!("batch {b}: {r:.1}")))
        .collect::<Result<_>>()?;
    println!("bare model images/s: {}", bare.join(", "));
    let baseline = if precision != Precision::Fp32 {
        Some(Model::load(model_path.as_ref(), &ModelOptions { precision: Precision::Fp32, ..opts.clone() })?)
    } else {
        None
    };

    // End to end, in rounds bracketed by the bare model.
    let rt = tokio::runtime::Runtime::new()?;
    let local = Source::open(&SourceConfig {
        url: format!("file://{}/photos", env("PHOTOS")?),
        endpoint: None,
        include: vec![],
        settings: vec![],
    })?;
    let s3 = rt.block_on(upload(&photos))?;
    println!(
        "\nbatch | round | bare img/s (before, after) | local, no writes | S3, no writes | S3 + Milvus | local + Milvus | GPU util"
    );
    for &batch in &batches {
        let mut ratios: [Vec<f64>; 4] = Default::default();
        let mut fp32_bare = vec![];
        for round in 1..=rounds {
            let before = bare_model(&model, &tensors, batch, n)?;
            let gpu = GpuSampler::start();
            let e2e = [
                rt.block_on(pipeline(&local, model.clone(), batch, false))?,
                rt.block_on(pipeline(&s3, model.clone(), batch, false))?,
                rt.block_on(pipeline(&s3, model.clone(), batch, true))?,
                rt.block_on(pipeline(&local, model.clone(), batch, true))?,
            ];
            let util = gpu.stop().map_or("-".into(), |u| format!("{u:.0}%"));
            let after = bare_model(&model, &tensors, batch, n)?;
            let bare = (before + after) / 2.0;
            for (r, e) in ratios.iter_mut().zip(e2e) {
                r.push(e / bare);
            }
            if let Some(fp32) = &baseline {
                fp32_bare.push(bare_model(fp32, &tensors, batch, n)?);
            }
            let cells: Vec<String> = e2e.iter().map(|e| format!("{e:.1} ({:.0}%)", 100.0 * e / bare)).collect();
            println!(
                "{batch:5} | {round:5} | {bare:6.1} ({before:5.1}, {after:5.1})      | {:>16} | {:>13} | {:>11} | {:>14} | {util}",
                cells[0], cells[1], cells[2], cells[3]
            );
        }
        let m: Vec<String> = ratios.iter_mut().map(|r| format!("{:.1}%", 100.0 * median(r))).collect();
        println!(
            "batch {batch}: end to end / bare model, median of {rounds} rounds: local {}, S3 {}, S3 + Milvus {}, local + Milvus {}",
            m[0], m[1], m[2], m[3]
        );
        if !fp32_bare.is_empty() {
            let fp32 = median(&mut fp32_bare);
            println!("batch {batch}: bare fp32 model {fp32:.1} images/s (the baseline for {precision})");
        }
    }
    rt.block_on(async {
        for (key, _) in &photos {
            s3.delete(key).await?;
        }
        anyhow::Ok(())
    })?;

    if let Ok(large) = std::env::var("LARGE") {
        // Embedded by the fp32 model: int8's own rounding noise would swamp what decoding changes.
        fast_jpeg(&PathBuf::from(large), baseline.as_ref().unwrap_or(&model))?;
    }
    println!("peak RSS {:.0} MiB", peak_rss_mib());
    Ok(())
}

/// Images/s of the JPEG decoder alone on one core: ours (libjpeg-turbo) and image-rs's zune-jpeg,
/// which it replaced. Each decodes the set twice and the second pass counts (warm caches); both
/// allocate their output for every image here.
fn jpeg_decoders(photos: &[(String, Bytes)]) -> Result<(f64, f64)> {
    let rate = |decode: &dyn Fn(&[u8]) -> Result<()>| -> Result<f64> {
        photos.iter().try_for_each(|(_, b)| decode(b))?;
        let t = Instant::now();
        photos.iter().try_for_each(|(_, b)| decode(b))?;
        Ok(photos.len() as f64 / t.elapsed().as_secs_f64())
    };
    let turbo =
        rate(&|b| imageindex::embed::preprocess::decode(b, DecodeLimits::default()).map(drop).map_err(Into::into))?;
    let zune = rate(&|b| image::load_from_memory(b).map(|i| drop(i.into_rgb8())).map_err(Into::into))?;
    Ok((turbo, zune))
}

/// Images per second of the model alone on preprocessed tensors, over about `n` images.
fn bare_model(model: &Model, tensors: &[Vec<f32>], batch: usize, n: usize) -> Result<f64> {
    let input: Vec<f32> = (0..batch).flat_map(|i| tensors[i % tensors.len()].iter().copied()).collect();
    let m = model;
    m.embed(&input, batch)?; // warm-up
    let calls = n.div_ceil(batch);
    let t = Instant::now();
    for _ in 0..calls {
        m.embed(&input, batch)?;
    }
    Ok((calls * batch) as f64 / t.elapsed().as_secs_f64())
}

/// The photos in the S3 server under a fresh prefix.
async fn upload(photos: &[(String, Bytes)]) -> Result<Source> {
    let name = format!("bench_{}", std::process::id());
    let source = Source::open(&SourceConfig {
        url: format!("s3://imageindex-bench/{name}/"),
        endpoint: Some(env("IMAGEINDEX_S3_ENDPOINT")?),
        include: vec![],
        settings: vec![],
    })?;
    stream::iter(photos).map(|(k, b)| source.put(k, b.clone())).buffer_unordered(16).try_collect::<Vec<_>>().await?;
    Ok(source)
}

/// Images/s of the pipeline over `source`: with `writes`, a full sync into a fresh collection
/// (Milvus upsert + catalog); without, the same pipeline with the vectors dropped.
async fn pipeline(source: &Source, model: Arc<Model>, batch: usize, writes: bool) -> Result<f64> {
    let opts = SyncOptions { batch_size: batch, ..Default::default() };
    if !writes {
        let t = Instant::now();
        let (embedded, failed) = embed_only(source, model, &opts).await?;
        anyhow::ensure!(failed == 0, "{failed} photos failed");
        return Ok(embedded as f64 / t.elapsed().as_secs_f64());
    }
    let name = format!("bench_{}_{batch}_{}", std::process::id(), std::time::UNIX_EPOCH.elapsed()?.as_millis());
    let milvus = MilvusConfig {
        url: env("IMAGEINDEX_MILVUS_URL")?,
        token: None,
        collection: name.clone(),
        index: IndexKind::Hnsw,
    };
    let index = Index::connect(&milvus, &env("IMAGEINDEX_MYSQL_URL")?, model.id()).await?;
    let backends = Backends { source: source.clone(), index };
    let summary = sync(&backends, model, &opts).await?;
    anyhow::ensure!(summary.failed == 0, "{} photos failed", summary.failed);
    backends.index.drop().await?;
    Ok(summary.images_per_second())
}

/// Exact decode against DCT-scaled decode on large JPEGs: speed on one core, and how far the
/// embeddings move (centred cosine: both minus the mean exact embedding of the set).
fn fast_jpeg(dir: &Path, model: &Model) -> Result<()> {
    let photos = jpegs(dir)?;
    let dims = image::load_from_memory(&photos[0].1)?;
    let run = |fast: bool| -> Result<(f64, Vec<Vec<f32>>)> {
        let limits = DecodeLimits { fast_jpeg: fast, ..Default::default() };
        let mut pre = Preprocessor::default();
        let t = Instant::now();
        let tensors: Vec<Vec<f32>> =
            photos.iter().map(|(_, b)| pre.from_bytes(b, limits, model.preprocess())).collect::<Result<_, _>>()?;
        let rate = photos.len() as f64 / t.elapsed().as_secs_f64();
        let vectors =
            tensors.iter().map(|t| model.embed(t, 1).map(|mut v| v.remove(0))).collect::<Result<Vec<_>, _>>()?;
        Ok((rate, vectors))
    };
    let (exact_rate, exact) = run(false)?;
    let (fast_rate, fast) = run(true)?;
    let (turbo, zune) = jpeg_decoders(&photos)?;
    let n = exact.len() as f32;
    let mean: Vec<f32> = (0..exact[0].len()).map(|i| exact.iter().map(|v| v[i]).sum::<f32>() / n).collect();
    let cos: Vec<f32> = exact
        .iter()
        .zip(&fast)
        .map(|(a, b)| {
            let (ca, cb): (Vec<f32>, Vec<f32>) = a.iter().zip(b).zip(&mean).map(|((x, y), m)| (x - m, y - m)).unzip();
            let dot = |u: &[f32], v: &[f32]| u.iter().zip(v).map(|(x, y)| x * y).sum::<f32>();
            dot(&ca, &cb) / (dot(&ca, &ca) * dot(&cb, &cb)).sqrt()
        })
        .collect();
    println!(
        "\nlarge JPEGs ({} of {}x{}): decode + preprocess on 1 core, exact {exact_rate:.1} images/s, --fast-jpeg {fast_rate:.1} ({:.2}x); \
         centred cosine of the embeddings, fast vs exact: mean {:.4}, min {:.4}; \
         JPEG decode alone: libjpeg-turbo {turbo:.1} images/s, image-rs (zune-jpeg) {zune:.1} ({:.2}x)",
        photos.len(),
        dims.width(),
        dims.height(),
        fast_rate / exact_rate,
        cos.iter().sum::<f32>() / n,
        cos.iter().copied().fold(f32::INFINITY, f32::min),
        turbo / zune
    );
    Ok(())
}
