//! Search at a large collection (issue 14): Milvus search with the API's settings (HNSW M 16,
//! efConstruction 200; top 10 with ef 256) at concurrency 1, 8 and 32, and what it finds, on a
//! collection of N vectors. Needs the local services and the model: run it through
//! `hack/bench-search-scale.sh`, which then measures `/img/search` end to end on the same
//! collection.
//!
//!   search_scale N   fills `search_scale_<N>` once (kept for the next run) and measures it
//!
//! The collection holds the embeddings of PHOTOS/photos (keys `photos/<file>`) and N minus that
//! many distractors: each a random mix of three photos' embeddings plus noise, so that they lie
//! where image embeddings lie rather than spread uniformly (which no real collection does). Two
//! sets of queries: PHOTOS/queries, edited copies of the photos (crops, rescales, recompression),
//! whose neighbours are mostly other crops of the same picture; and held-out distractors (made
//! like the others, never inserted), whose neighbours are spread over the whole collection, so
//! that their recall says how well the graph covers N. Measured: recall@10 of each set against an
//! exact search of the same vectors, and how often an edited photo finds its original first.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use futures::{StreamExt, stream};
use imageindex::core::IndexKind;
use imageindex::embed::{DecodeLimits, Model, ModelOptions, normalized, preprocess_into};
use imageindex::index::{Index, WriteBatch};
use imageindex::store::{MilvusConfig, Record, Vector, key_id};
use milvus::v2::prelude::*;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

const TOPK: usize = 10;
/// Queries in each set.
const QUERIES: usize = 200;
/// Weight of the noise added to each distractor, per coordinate, against unit-length mixes.
const NOISE: f32 = 0.02;
/// Seconds each concurrency runs for.
const SECONDS: u64 = 15;

fn env(name: &str) -> Result<String> {
    std::env::var(name)
        .with_context(|| format!("{name} is not set: run the benchmark through hack/bench-search-scale.sh"))
}

/// The JPEGs of `dir`, by name.
fn jpegs(dir: &Path) -> Result<Vec<(String, Vec<u8>)>> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .map(|e| Ok(e?.file_name().to_string_lossy().into_owned()))
        .collect::<Result<_>>()?;
    names.retain(|n| n.ends_with(".jpg"));
    names.sort();
    names.into_iter().map(|n| Ok((n.clone(), std::fs::read(dir.join(&n))?))).collect()
}

/// Unit-length embeddings of `images`, 16 to a model call.
fn embed(model: &Model, images: &[(String, Vec<u8>)]) -> Result<Vec<Vec<f32>>> {
    let mut out = Vec::with_capacity(images.len());
    for chunk in images.chunks(16) {
        let len = model.preprocess().tensor_len();
        let mut tensor = vec![0.0; len * chunk.len()];
        for ((name, bytes), slot) in chunk.iter().zip(tensor.chunks_mut(len)) {
            preprocess_into(bytes, DecodeLimits::default(), model.preprocess(), slot)
                .with_context(|| format!("decoding {name}"))?;
        }
        out.extend(model.embed(&tensor, chunk.len())?.iter().map(|v| normalized(v)));
    }
    Ok(out)
}

/// The collection's vectors: the photos, then distractors made from them (the same for a given
/// `i` on every run, so the exact search can make them again instead of holding them).
struct Vectors {
    photos: Vec<Vec<f32>>,
    names: Vec<String>,
}

impl Vectors {
    fn key(&self, i: usize) -> String {
        match self.names.get(i) {
            Some(name) => format!("photos/{name}"),
            None => format!("distractors/{i:09}.jpg"),
        }
    }

    fn get(&self, i: usize) -> Vec<f32> {
        if let Some(p) = self.photos.get(i) {
            return p.clone();
        }
        let mut rng = StdRng::seed_from_u64(i as u64);
        let dim = self.photos[0].len();
        let mut v = vec![0.0; dim];
        for _ in 0..3 {
            let (w, base) = (rng.random::<f32>(), &self.photos[rng.random_range(0..self.photos.len())]);
            v.iter_mut().zip(base).for_each(|(x, b)| *x += w * b);
        }
        let mixed = normalized(&v);
        normalized(&mixed.iter().map(|x| x + NOISE * (rng.random::<f32>() * 2.0 - 1.0)).collect::<Vec<_>>())
    }
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

async fn fill(index: &Index, vectors: &Vectors, n: usize) -> Result<()> {
    let t = Instant::now();
    for start in (0..n).step_by(1000) {
        let (vs, records) = (start..(start + 1000).min(n))
            .map(|i| {
                let key = vectors.key(i);
                let id = key_id(&key);
                let record = Record::indexed(&key, None, 0, None);
                (Vector { id, key, embedding: vectors.get(i) }, record)
            })
            .unzip();
        index.write(WriteBatch { vectors: vs, remove: vec![], records }).await?;
    }
    let insert_s = t.elapsed().as_secs_f64();
    // Sealed segments get their HNSW index built; growing ones would be searched without it.
    let client = milvus_client().await?;
    let name = index.vectors.collection();
    client.flush(FlushRequest::builder().collection_names([name]).build()?).await?;
    let flush_s = t.elapsed().as_secs_f64() - insert_s;
    loop {
        let described = client
            .describe_index(DescribeIndexRequest::builder().collection_name(name).field_name("embedding").build()?)
            .await?;
        let idx = described.indexes().first().context("the collection has no index")?;
        if idx.get_pending_rows() == 0 && idx.get_indexed_rows() >= idx.get_total_rows() && idx.get_total_rows() > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
    // Loaded again, the query node holds the indexed segments only.
    client.release_collection(ReleaseCollectionRequest::builder().collection_name(name).build()?).await?;
    client.load_collection(LoadCollectionRequest::builder().collection_name(name).build()?).await?;
    println!(
        "filled {name}: {n} vectors inserted in {insert_s:.0} s ({:.0}/s), flushed in {flush_s:.0} s, HNSW built and loaded after {:.0} s in all",
        n as f64 / insert_s,
        t.elapsed().as_secs_f64()
    );
    Ok(())
}

async fn milvus_client() -> Result<ClientV2> {
    Ok(ClientV2::new(&ConnectConfig::new().uri(env("IMAGEINDEX_MILVUS_URL")?)).await?)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 * p) as usize).min(sorted.len() - 1)]
}

/// `clients` searching back to back for SECONDS, each cycling through the queries.
async fn load(index: &Arc<Index>, queries: &Arc<Vec<Vec<f32>>>, clients: usize) -> Result<String> {
    let deadline = Instant::now() + Duration::from_secs(SECONDS);
    let t = Instant::now();
    let per_client = stream::iter(0..clients)
        .map(|c| {
            let (index, queries) = (index.clone(), queries.clone());
            tokio::spawn(async move {
                let mut times = vec![];
                let mut q = c;
                while Instant::now() < deadline {
                    let t = Instant::now();
                    index.vectors.search(queries[q % queries.len()].clone(), TOPK, None).await?;
                    times.push(t.elapsed().as_secs_f64() * 1000.0);
                    q += clients;
                }
                Ok::<_, imageindex::store::Error>(times)
            })
        })
        .buffer_unordered(clients)
        .collect::<Vec<_>>()
        .await;
    let mut times = vec![];
    for r in per_client {
        times.extend(r??);
    }
    times.sort_by(f64::total_cmp);
    Ok(format!(
        "concurrency {clients:2}: p50 {:6.1} ms  p99 {:6.1} ms  {:6.1} searches/s",
        percentile(&times, 0.5),
        percentile(&times, 0.99),
        times.len() as f64 / t.elapsed().as_secs_f64()
    ))
}

async fn run(n: usize) -> Result<()> {
    let photos_dir = Path::new(&env("PHOTOS")?).to_path_buf();
    let model = Model::load(env("IMAGEINDEX_MODEL")?.as_ref(), &ModelOptions::default())?;
    let photos = jpegs(&photos_dir.join("photos"))?;
    let query_images: Vec<_> = jpegs(&photos_dir.join("queries"))?.into_iter().take(QUERIES).collect();
    anyhow::ensure!(n >= photos.len(), "N must be at least the {} photos", photos.len());
    let t = Instant::now();
    let vectors = Vectors { photos: embed(&model, &photos)?, names: photos.iter().map(|(n, _)| n.clone()).collect() };
    let mut queries = embed(&model, &query_images)?;
    println!("embedded {} photos and {} queries in {:.0} s", photos.len(), queries.len(), t.elapsed().as_secs_f64());
    // Held-out distractors: seeds past the collection's last vector.
    queries.extend((0..QUERIES).map(|k| vectors.get(n + k)));

    let collection = format!("search_scale_{n}");
    let milvus = MilvusConfig { url: env("IMAGEINDEX_MILVUS_URL")?, token: None, collection, index: IndexKind::Hnsw };
    let index = Index::connect(&milvus, &env("IMAGEINDEX_MYSQL_URL")?, model.id()).await?;
    index.ensure(model.dim(), model.id(), false, "search-scale-bench").await?;
    let count = index.vectors.count().await? as usize;
    if count != n {
        anyhow::ensure!(count == 0, "{} holds {count} vectors, not {n}: drop it", index.vectors.collection());
        fill(&index, &vectors, n).await?;
    }

    // The exact top 10 of each query, scanning every vector once.
    let t = Instant::now();
    let mut exact: Vec<Vec<(f32, usize)>> = vec![vec![]; queries.len()];
    for i in 0..n {
        let v = vectors.get(i);
        for (q, best) in queries.iter().zip(&mut exact) {
            best.push((dot(q, &v), i));
            if best.len() > 4 * TOPK {
                best.sort_by(|a, b| b.0.total_cmp(&a.0));
                best.truncate(TOPK);
            }
        }
    }
    for best in &mut exact {
        best.sort_by(|a, b| b.0.total_cmp(&a.0));
        best.truncate(TOPK);
    }
    let exact_s = t.elapsed().as_secs_f64();

    // What HNSW finds with the API's settings, against the exact answer: per query set, the
    // share of the exact top 10 it returns.
    let (mut found, mut original_first, mut exact_original_first) = ([0, 0], 0, 0);
    for (q, (query, best)) in queries.iter().zip(&exact).enumerate() {
        let hits = index.vectors.search(query.clone(), TOPK, None).await?;
        let want: Vec<String> = best.iter().map(|&(_, i)| vectors.key(i)).collect();
        found[q / QUERIES] += hits.iter().filter(|h| want.contains(&h.key)).count();
        if q < QUERIES {
            let original = vectors.key(q);
            original_first += usize::from(hits.first().is_some_and(|h| h.key == original));
            exact_original_first += usize::from(want[0] == original);
        }
    }
    let recall = |set: usize| found[set] as f64 / (QUERIES * TOPK) as f64;
    println!(
        "{n} vectors: recall@10 against exact search {:.3} (edited photos), {:.3} (held-out distractors) \
         (exact: {exact_s:.1} s for {} queries in this process); an edited photo's original first: \
         {original_first} of {QUERIES} (exact search: {exact_original_first})",
        recall(0),
        recall(1),
        queries.len(),
    );

    let index = Arc::new(index);
    let queries = Arc::new(queries);
    for clients in [1, 8, 32] {
        println!("{n} vectors, Milvus search alone (top {TOPK}, ef 256), {}", load(&index, &queries, clients).await?);
    }
    Ok(())
}

fn main() -> Result<()> {
    imageindex::install_crypto();
    let args: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with("--")).collect();
    let n: usize = args.first().context("usage: search_scale N")?.parse()?;
    tokio::runtime::Runtime::new()?.block_on(run(n))
}
