//! A bucket of many objects (issue 14): what planning one sync costs, at one bucket size per
//! process (so that each size's peak RSS is its own). Needs the local services; run it through
//! `hack/bench-scale.sh`, which fills the buckets and runs every size.
//!
//!   scale fill N      N small JPEGs (one tiny image under many keys) under s3://imageindex-scale/n<N>/
//!   scale measure N   lists them alone; plans the new bucket (all of it work); writes their catalog
//!                     rows as the shards would; plans the unchanged bucket again; prints one line
//!
//! The catalog rows are written as indexed, without vectors: planning reads the catalog only.

use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt, stream};
use imageindex::core::IndexKind;
use imageindex::store::{Index, MilvusConfig, Record, Source, SourceConfig, WriteBatch, key_id, shard_ids};
use imageindex::sync::{DeletionGuard, plan};

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

/// The catalog rows of an indexed bucket, as the shards write them: `etag` and `size` are those
/// of the one tiny JPEG every key holds. Made from the keys, a chunk at a time, so that the
/// benchmark itself holds no listing.
async fn write_catalog(index: &Index, n: usize, etag: &Option<String>, size: u64) -> Result<f64> {
    let t = Instant::now();
    for chunk in (0..n).collect::<Vec<_>>().chunks(5000) {
        let records = chunk
            .iter()
            .map(|&i| Record {
                id: key_id(&key(i)),
                key: key(i),
                etag: etag.clone(),
                size,
                content_hash: None,
                error: None,
                retry: false,
                skipped: false,
            })
            .collect();
        index.write(WriteBatch { vectors: vec![], remove: vec![], records }).await?;
    }
    Ok(t.elapsed().as_secs_f64())
}

async fn measure(n: usize, shards: u32) -> Result<()> {
    let src = source(n)?;
    // The listing alone, streamed (as rclone does it), for the anchor.
    let t = Instant::now();
    let mut pages = src.pages();
    let (mut listed, mut first) = (0, None);
    while let Some(page) = pages.next().await {
        let page = page?;
        first = first.or_else(|| page.first().cloned());
        listed += page.len();
    }
    let list_s = t.elapsed().as_secs_f64();
    anyhow::ensure!(listed == n, "listed {listed} objects, filled {n}: run `scale fill {n}` first");
    let first = first.context("an empty bucket")?;

    let collection = format!("scale_{n}_{}", std::process::id());
    let milvus = MilvusConfig { url: env("IMAGEINDEX_MILVUS_URL")?, token: None, collection, index: IndexKind::Hnsw };
    let index =
        Index::connect(&milvus, &env("IMAGEINDEX_MYSQL_URL")?, &"scale-bench".parse().map_err(anyhow::Error::msg)?)
            .await?;
    let guard = DeletionGuard::default();

    // The first plan of the bucket: everything is new, and recorded as work.
    let t = Instant::now();
    let first_plan = plan(&src, &index, guard).await?.record.counts;
    let first_s = t.elapsed().as_secs_f64();
    anyhow::ensure!(first_plan.new == n as u64, "the first plan found {first_plan:?}");

    // Indexed (the catalog as the shards leave it), then the next sync of the unchanged bucket:
    // one listing and one ordered read of the catalog, by the plan alone.
    let write_s = write_catalog(&index, n, &first.etag, first.size).await?;
    // The catalog alone, in key order, a page at a time (as the plan reads it).
    let t = Instant::now();
    let (mut after, mut read) = (None::<String>, 0);
    loop {
        let page = index.catalog.entries_after(after.as_deref(), 5000).await?;
        read += page.len();
        match page.last() {
            Some(e) if page.len() == 5000 => after = Some(e.key.clone()),
            _ => break,
        }
    }
    let read_s = t.elapsed().as_secs_f64();
    anyhow::ensure!(read == n, "read {read} catalog rows of {n}");
    let lists_before = src.list_requests();
    let t = Instant::now();
    let again = plan(&src, &index, guard).await?.record;
    let rerun_s = t.elapsed().as_secs_f64();
    let lists = src.list_requests() - lists_before;
    anyhow::ensure!(again.counts.unchanged == n as u64 && again.counts.pending() == 0, "{:?}", again.counts);
    let mut shard_work = 0;
    for shard in 0..shards {
        shard_work += index.catalog.work_left(again.id, &shard_ids(shard, shards)).await?.pending();
    }
    index.drop().await?;

    println!(
        "{n:>8} objects | listing {list_s:6.2} s, {:>7.0} objects/s | first plan {first_s:6.2} s ({:>7.0} work rows/s) | \
         catalog rows written {:>7.0}/s, read in key order {read_s:5.2} s | re-run (plan of the unchanged bucket) {rerun_s:6.2} s, {:>7.0} objects/s | \
         LIST requests per sync: {lists} (the plan; {shards} shards: 0, work left {shard_work}) | peak RSS {:.0} MiB",
        n as f64 / list_s,
        n as f64 / first_s,
        n as f64 / write_s,
        n as f64 / rerun_s,
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
