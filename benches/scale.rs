//! A bucket of many objects (issue 14): what planning one sync costs, at one bucket size per
//! process (so that each size's peak RSS is its own). Needs the local services; run it through
//! `hack/bench-scale.sh`, which fills the buckets and runs every size.
//!
//!   scale fill N [nested]     N small JPEGs (one tiny image under many keys) under
//!                             s3://imageindex-scale/n<N>/ (flat) or nested<N>/ (nested)
//!   scale measure N [nested]  lists them alone; plans the new bucket (all of it work); writes their
//!                             catalog rows as the shards would; plans the unchanged bucket again;
//!                             prints one line
//!
//! Two layouts (issue 32): `flat` is 100 folders of N/100 objects, whose tree order is byte order;
//! `nested` is year/album folders of 248 photos, each album with two sibling files whose next byte
//! sorts below `/` (`2003/07 trip.jpg`, `2003/07-old.jpg` beside `2003/07/IMG_0002.jpg`), the
//! way cameras and apps write them: a server that lists a tree depth first (SeaweedFS) lists it
//! out of byte order.
//!
//! The catalog rows are written as indexed, without vectors: planning reads the catalog only.
//! `measure` expects a database of its own (hack/bench-scale.sh makes one per run), so that the
//! catalog's size on disk is this bucket's alone.

use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt, stream};
use imageindex::bucket::{Source, SourceConfig};
use imageindex::core::IndexKind;
use imageindex::index::{Index, WriteBatch};
use imageindex::store::{MilvusConfig, Record, shard_ids};
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

#[derive(Clone, Copy, PartialEq)]
enum Layout {
    Flat,
    Nested,
}

impl Layout {
    fn parse(arg: Option<&String>) -> Result<Self> {
        match arg.map(String::as_str) {
            None | Some("flat") => Ok(Layout::Flat),
            Some("nested") => Ok(Layout::Nested),
            Some(other) => anyhow::bail!("layout {other:?}: flat or nested"),
        }
    }

    fn name(self) -> &'static str {
        match self {
            Layout::Flat => "flat",
            Layout::Nested => "nested",
        }
    }

    fn prefix(self, n: usize) -> String {
        match self {
            Layout::Flat => format!("n{n}/"),
            Layout::Nested => format!("nested{n}/"),
        }
    }

    fn key(self, i: usize) -> String {
        match self {
            Layout::Flat => format!("{:02}/{i:09}.jpg", i % 100),
            Layout::Nested => {
                let (album, j) = (i / 250, i % 250);
                let (year, album) = (2000 + album / 100, album % 100);
                match j {
                    0 => format!("{year}/{album:02} trip.jpg"),
                    1 => format!("{year}/{album:02}-old.jpg"),
                    _ => format!("{year}/{album:02}/IMG_{j:04}.jpg"),
                }
            }
        }
    }
}

fn source(n: usize, layout: Layout) -> Result<Source> {
    let url = format!("s3://{BUCKET}/{}", layout.prefix(n));
    Ok(Source::open(&SourceConfig { url, endpoint: Some(env("IMAGEINDEX_S3_ENDPOINT")?), ..Default::default() })?)
}

/// Bytes on disk of the catalog's tables (data and indexes, as InnoDB counts its pages after
/// ANALYZE) in the benchmark's own database.
async fn catalog_bytes(pool: &sqlx::MySqlPool) -> Result<i64> {
    sqlx::query("ANALYZE TABLE images, work").execute(pool).await?;
    let bytes: Option<i64> = sqlx::query_scalar(
        "SELECT CAST(SUM(data_length + index_length) AS SIGNED) FROM information_schema.tables \
         WHERE table_schema = DATABASE()",
    )
    .fetch_one(pool)
    .await?;
    Ok(bytes.unwrap_or(0))
}

/// A 16 x 16 JPEG of a few hundred bytes.
fn tiny_jpeg() -> Result<Bytes> {
    let img = image::RgbImage::from_fn(16, 16, |x, y| image::Rgb([(x * 16) as u8, (y * 16) as u8, 128]));
    let mut out = std::io::Cursor::new(Vec::new());
    image::DynamicImage::ImageRgb8(img).write_to(&mut out, image::ImageFormat::Jpeg)?;
    Ok(out.into_inner().into())
}

async fn fill(n: usize, layout: Layout) -> Result<()> {
    let src = Arc::new(source(n, layout)?);
    let jpeg = tiny_jpeg()?;
    let t = Instant::now();
    stream::iter(0..n)
        .map(|i| {
            let (src, jpeg) = (src.clone(), jpeg.clone());
            async move { src.put(&layout.key(i), jpeg).await }
        })
        .buffer_unordered(64)
        .try_collect::<Vec<_>>()
        .await?;
    let secs = t.elapsed().as_secs_f64();
    println!(
        "filled s3://{BUCKET}/{} with {n} objects of {} bytes in {secs:.1} s ({:.0}/s)",
        layout.prefix(n),
        jpeg.len(),
        n as f64 / secs
    );
    Ok(())
}

/// The catalog rows of an indexed bucket, as the shards write them: `etag` and `size` are those
/// of the one tiny JPEG every key holds. Made from the keys, a chunk at a time, so that the
/// benchmark itself holds no listing.
async fn write_catalog(index: &Index, n: usize, layout: Layout, etag: &Option<String>, size: u64) -> Result<f64> {
    let t = Instant::now();
    for chunk in (0..n).collect::<Vec<_>>().chunks(5000) {
        let records = chunk.iter().map(|&i| Record::indexed(&layout.key(i), etag.clone(), size, None)).collect();
        index.write(WriteBatch { vectors: vec![], remove: vec![], records }).await?;
    }
    Ok(t.elapsed().as_secs_f64())
}

async fn measure(n: usize, layout: Layout, shards: u32) -> Result<()> {
    let src = source(n, layout)?;
    // The listing alone, streamed (as rclone does it), for the anchor; and whether the server
    // listed it in byte order.
    let t = Instant::now();
    let mut pages = src.pages();
    let (mut listed, mut first, mut last, mut out_of_order) = (0, None, None::<String>, 0);
    while let Some(page) = pages.next().await {
        let page = page?;
        first = first.or_else(|| page.first().cloned());
        for o in &page {
            out_of_order += usize::from(last.as_ref().is_some_and(|l| l.as_bytes() >= o.key.as_bytes()));
            last = Some(o.key.clone());
        }
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
    let pool = sqlx::MySqlPool::connect(&env("IMAGEINDEX_MYSQL_URL")?).await?;
    let empty = catalog_bytes(&pool).await?;

    // The first plan of the bucket: everything is new, and recorded as work.
    let t = Instant::now();
    let first_plan = plan(&src, &index, guard).await?.record.counts;
    let first_s = t.elapsed().as_secs_f64();
    anyhow::ensure!(first_plan.new == n as u64, "the first plan found {first_plan:?}");
    let first_rss = peak_rss_mib();

    // Indexed (the catalog as the shards leave it), then the next sync of the unchanged bucket:
    // one listing and one ordered read of the catalog, by the plan alone.
    let write_s = write_catalog(&index, n, layout, &first.etag, first.size).await?;
    // The catalog alone, in key order, a page at a time (as the plan reads it).
    let t = Instant::now();
    let (mut cursor, mut read) = (imageindex::store::KeyCursor::default(), 0);
    loop {
        let (page, last) = index.catalog.entries_page(&mut cursor, 5000).await?;
        read += page.len();
        if last {
            break;
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
    let grown = catalog_bytes(&pool).await? - empty;
    index.drop().await?;

    println!(
        "{n:>8} objects, {:<6} ({out_of_order} listed out of byte order) | listing {list_s:6.2} s, {:>7.0} objects/s | \
         first plan {first_s:6.2} s ({:>7.0} work rows/s, peak RSS {first_rss:.0} MiB) | \
         catalog rows written {:>7.0}/s, read in key order {read_s:5.2} s, on disk {:.0} B/object | \
         re-run (plan of the unchanged bucket) {rerun_s:6.2} s, {:>7.0} objects/s | \
         LIST requests per sync: {lists} (the plan; {shards} shards: 0, work left {shard_work}) | peak RSS {:.0} MiB",
        layout.name(),
        n as f64 / list_s,
        n as f64 / first_s,
        n as f64 / write_s,
        grown as f64 / n as f64,
        n as f64 / rerun_s,
        peak_rss_mib(),
    );
    Ok(())
}

fn main() -> Result<()> {
    imageindex::install_crypto();
    let args: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with("--")).collect();
    let n: usize = args.get(1).context("usage: scale fill|measure N [flat|nested]")?.parse()?;
    let layout = Layout::parse(args.get(2))?;
    let shards: u32 = std::env::var("SHARDS").ok().and_then(|s| s.parse().ok()).unwrap_or(4);
    let rt = tokio::runtime::Runtime::new()?;
    match args.first().map(String::as_str) {
        Some("fill") => rt.block_on(fill(n, layout)),
        Some("measure") => rt.block_on(measure(n, layout, shards)),
        _ => anyhow::bail!("usage: scale fill|measure N [flat|nested]"),
    }
}
