//! A bucket of many objects (issue 14): what planning one sync costs, as the code does it today,
//! at one bucket size per process (so that each size's peak RSS is its own). Needs the local
//! services; run it through `hack/bench-scale.sh`, which fills the buckets and runs every size.
//!
//!   scale fill N      N small JPEGs (one tiny image under many keys) under s3://imageindex-scale/n<N>/
//!   scale measure N   lists them, writes their catalog rows, diffs the listing against the catalog,
//!                     then plans the unchanged bucket again, and prints one line of figures
//!
//! The catalog rows are written as indexed, without vectors: planning reads the catalog only.

use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt, stream};
use imageindex::core::IndexKind;
use imageindex::store::{Index, MilvusConfig, Record, Source, SourceConfig, WriteBatch, key_id};
use imageindex::sync::plan;

/// A page of ListObjectsV2.
const PAGE: usize = 1000;
const BUCKET: &str = "imageindex-scale";

fn env(name: &str) -> Result<String> {
    std::env::var(name).with_context(|| format!("{name} is not set: run the benchmark through hack/bench-scale.sh"))
}

fn peak_rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kb =
        status.lines().find_map(|l| l.strip_prefix("VmHWM:")).and_then(|v| v.split_whitespace().next()?.parse().ok());
    kb.unwrap_or(0.0) / 1024.0
}

fn source(n: usize) -> Result<Source> {
    let url = format!("s3://{BUCKET}/n{n}/");
    Ok(Source::open(&SourceConfig { url, endpoint: Some(env("IMAGEINDEX_S3_ENDPOINT")?), ..Default::default() })?)
}

fn key(i: usize) -> String {
    format!("{:02}/{i:09}.jpg", i % 100)
}

/// A 16 x 16 JPEG of a few hundred bytes.
fn tiny_jpeg() -> Result<Bytes> {
    let img = image::RgbImage::from_fn(16, 16, |x, y| image::Rgb([(x * 16) as u8, (y * 16) as u8, 128]));
    let mut out = std::io::Cursor::new(Vec::new());
    image::DynamicImage::ImageRgb8(img).write_to(&mut out, image::ImageFormat::Jpeg)?;
    Ok(out.into_inner().into())
}

async fn fill(n: usize) -> Result<()> {
    let src = Arc::new(source(n)?);
    let jpeg = tiny_jpeg()?;
    let t = Instant::now();
    stream::iter(0..n)
        .map(|i| {
            let (src, jpeg) = (src.clone(), jpeg.clone());
            async move { src.put(&key(i), jpeg).await }
        })
        .buffer_unordered(64)
        .try_collect::<Vec<_>>()
        .await?;
    let secs = t.elapsed().as_secs_f64();
    println!(
        "filled s3://{BUCKET}/n{n}/ with {n} objects of {} bytes in {secs:.1} s ({:.0}/s)",
        jpeg.len(),
        n as f64 / secs
    );
    Ok(())
}

async fn measure(n: usize, shards: u32) -> Result<()> {
    let src = source(n)?;
    let t = Instant::now();
    let listing = src.list().await?;
    let list_s = t.elapsed().as_secs_f64();
    anyhow::ensure!(listing.len() == n, "listed {} objects, filled {n}: run `scale fill {n}` first", listing.len());
    let pages = n.div_ceil(PAGE);

    let collection = format!("scale_{n}_{}", std::process::id());
    let milvus = MilvusConfig { url: env("IMAGEINDEX_MILVUS_URL")?, token: None, collection, index: IndexKind::Hnsw };
    let index =
        Index::connect(&milvus, &env("IMAGEINDEX_MYSQL_URL")?, &"scale-bench".parse().map_err(anyhow::Error::msg)?)
            .await?;
    let t = Instant::now();
    for chunk in listing.chunks(5000) {
        let records = chunk
            .iter()
            .map(|o| Record {
                id: key_id(&o.key),
                key: o.key.clone(),
                etag: o.etag.clone(),
                size: o.size,
                content_hash: None,
                error: None,
                retry: false,
            })
            .collect();
        index.write(WriteBatch { vectors: vec![], remove: vec![], records }).await?;
    }
    let write_s = t.elapsed().as_secs_f64();

    let t = Instant::now();
    let entries = index.catalog.entries(0, 1).await?;
    let read_s = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let diff = plan(listing, entries, 0, 1);
    let diff_s = t.elapsed().as_secs_f64();
    anyhow::ensure!(diff.unchanged == n, "the diff found {} of {n} unchanged", diff.unchanged);

    // The next sync of the unchanged bucket: every shard lists the whole bucket and reads its
    // share of the catalog; here one shard of `shards`, timed as a whole.
    let t = Instant::now();
    let listing = src.list().await?;
    let entries = index.catalog.entries(0, shards).await?;
    let again = plan(listing, entries, 0, shards);
    let rerun_s = t.elapsed().as_secs_f64();
    anyhow::ensure!(again.new.is_empty() && again.changed.is_empty(), "the unchanged bucket planned work");
    index.drop().await?;

    println!(
        "{n:>8} objects | listing {list_s:6.2} s, {:>7.0} objects/s, {pages} LIST pages | catalog rows written {:>7.0}/s | \
         catalog read {read_s:5.2} s | diff {diff_s:5.2} s | re-run of one of {shards} shards {rerun_s:6.2} s | \
         LIST requests per sync: {} (plan Job + {shards} shards, each the whole bucket) | peak RSS {:.0} MiB",
        n as f64 / list_s,
        n as f64 / write_s,
        pages * (1 + shards as usize),
        peak_rss_mib(),
    );
    Ok(())
}

fn main() -> Result<()> {
    imageindex::install_crypto();
    let args: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with("--")).collect();
    let n: usize = args.get(1).context("usage: scale fill|measure N")?.parse()?;
    let shards: u32 = std::env::var("SHARDS").ok().and_then(|s| s.parse().ok()).unwrap_or(4);
    let rt = tokio::runtime::Runtime::new()?;
    match args.first().map(String::as_str) {
        Some("fill") => rt.block_on(fill(n)),
        Some("measure") => rt.block_on(measure(n, shards)),
        _ => anyhow::bail!("usage: scale fill|measure N"),
    }
}
