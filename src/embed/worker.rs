//! The sync: list the source, diff it against the catalog, remove what is gone, and embed what is
//! new or changed. Stages overlap through bounded channels, so the model (the slowest stage on a
//! CPU) never waits for fetching or decoding, and memory stays flat however large the bucket:
//!
//!   fetch (async, N in flight) -> decode + preprocess (blocking pool) -> batch + model (one
//!   blocking thread at a time) -> write (Milvus upsert, then the catalog)
//!
//! A bad object (corrupt, truncated, not an image, too large) is recorded as failed with its
//! reason and never stops the run. A backend failure (Milvus, MySQL, the bucket) does: what was
//! written stays written, and the next run picks up where this one stopped.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use futures::stream::FuturesOrdered;
use futures::{StreamExt, stream};
use indicatif::{ProgressBar, ProgressStyle};
use tokio::sync::mpsc;

use super::{DecodeLimits, Model, Preprocessor, TENSOR_LEN};
use crate::store::catalog::{Entry, RunProgress};
use crate::store::{Catalog, Object, Record, Source, VectorStore, content_hash, key_id};

#[derive(Clone, Debug)]
pub struct SyncOptions {
    pub shard: u32,
    pub shards: u32,
    pub batch_size: usize,
    /// Objects fetched at once.
    pub fetch_concurrency: usize,
    /// Images decoded at once; 0 = the cores this process may use.
    pub decode_workers: usize,
    pub limits: DecodeLimits,
    /// Larger objects are recorded as failed without being fetched.
    pub max_object_bytes: u64,
    pub progress_bar: bool,
    /// Let vectors of another precision into the collection (see `ModelId::check`).
    pub mixed_precision: bool,
}

impl Default for SyncOptions {
    fn default() -> Self {
        Self {
            shard: 0,
            shards: 1,
            batch_size: 16,
            fetch_concurrency: 16,
            decode_workers: 0,
            limits: DecodeLimits::default(),
            max_object_bytes: 64 << 20,
            progress_bar: false,
            mixed_precision: false,
        }
    }
}

/// An object to embed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Work {
    pub object: Object,
    pub id: i64,
    /// It has a vector in Milvus now (a changed object): if the new content fails, that vector goes.
    pub was_indexed: bool,
}

/// What a sync has to do, from the listing and the catalog alone.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// Objects of this shard in the source.
    pub discovered: usize,
    pub new: Vec<Work>,
    pub changed: Vec<Work>,
    /// Catalog entries whose object is gone from the source.
    pub deleted: Vec<Entry>,
    pub unchanged: usize,
}

/// The shard an object key belongs to: its id modulo the shard count (ids are uniform hashes).
pub fn shard_of(key: &str, shards: u32) -> u32 {
    (key_id(key) % i64::from(shards.max(1))) as u32
}

/// Diffs the listing against the catalog for one shard. `catalog` holds only that shard's entries.
pub fn plan(listing: Vec<Object>, mut catalog: HashMap<String, Entry>, shard: u32, shards: u32) -> Plan {
    let mut p = Plan::default();
    for object in listing {
        if shard_of(&object.key, shards) != shard {
            continue;
        }
        p.discovered += 1;
        let id = key_id(&object.key);
        match catalog.remove(&object.key) {
            None => p.new.push(Work { object, id, was_indexed: false }),
            // Same etag and size: the bytes are the ones we saw (a failed object stays failed until it changes).
            Some(e) if e.etag == object.etag && e.size == object.size => p.unchanged += 1,
            Some(e) => p.changed.push(Work { object, id, was_indexed: e.indexed }),
        }
    }
    p.deleted = catalog.into_values().collect();
    p.deleted.sort_by(|a, b| a.key.cmp(&b.key));
    p
}

/// What a sync did.
#[derive(Debug, Default, serde::Serialize)]
pub struct Summary {
    pub discovered: usize,
    pub new: usize,
    pub changed: usize,
    pub unchanged: usize,
    pub deleted: usize,
    pub indexed: usize,
    pub failed: usize,
    /// Objects that failed in this run, with the reason.
    pub failures: Vec<(String, String)>,
    /// Vectors in the collection after the run (all shards).
    pub vectors: u64,
    /// Seconds spent embedding (fetch to write), excluding listing and deletes.
    pub embed_seconds: f64,
}

impl Summary {
    pub fn images_per_second(&self) -> f64 {
        if self.embed_seconds > 0.0 { (self.indexed + self.failed) as f64 / self.embed_seconds } else { 0.0 }
    }
}

/// The backends one sync talks to.
pub struct Backends {
    pub source: Source,
    pub vectors: VectorStore,
    pub catalog: Catalog,
}

enum Decoded {
    Ready { work: Work, hash: String, tensor: Vec<f32> },
    Failed { work: Work, hash: Option<String>, error: String },
}

/// Fewest rows per write to Milvus and the catalog (except the last).
const WRITE_BATCH: usize = 32;

/// One unit for the writer: vectors to upsert, ids whose old vector must go, rows to record.
#[derive(Default)]
struct Write {
    upsert: Vec<(i64, String, Vec<f32>)>,
    remove: Vec<i64>,
    records: Vec<Record>,
}

/// Tensor buffers (600 KB an image) handed back once copied into a batch, so decoding reuses
/// them instead of allocating. It holds at most what was in flight at once: decoders plus the queue.
#[derive(Clone, Default)]
struct TensorPool(Arc<Mutex<Vec<Vec<f32>>>>);

impl TensorPool {
    fn take(&self) -> Vec<f32> {
        self.0.lock().expect("pool lock").pop().unwrap_or_else(|| vec![0.0; TENSOR_LEN])
    }

    fn give(&self, tensor: Vec<f32>) {
        self.0.lock().expect("pool lock").push(tensor);
    }
}

fn decode(work: Work, bytes: bytes::Bytes, limits: DecodeLimits, pool: &TensorPool) -> Decoded {
    let hash = content_hash(&bytes);
    let mut tensor = pool.take();
    match Preprocessor::with_local(|p| p.tensor_into(&bytes, limits, &mut tensor)) {
        Ok(()) => Decoded::Ready { work, hash, tensor },
        Err(e) => {
            pool.give(tensor);
            Decoded::Failed { work, hash: Some(hash), error: e.to_string() }
        }
    }
}

fn record(work: &Work, hash: Option<String>, error: Option<String>) -> Record {
    Record {
        id: work.id,
        key: work.object.key.clone(),
        etag: work.object.etag.clone(),
        size: work.object.size,
        content_hash: hash,
        error,
    }
}

/// Runs one sync of one shard.
pub async fn sync(backends: &Backends, model: Arc<Model>, opts: &SyncOptions) -> Result<Summary> {
    let Backends { vectors, catalog, .. } = backends;
    crate::store::ensure_collection(vectors, catalog, model.dim(), model.id(), opts.mixed_precision).await?;
    let run = catalog.start_run(opts.shard, opts.shards).await?;
    let result = sync_inner(backends, model, opts, run).await;
    let _ = match &result {
        Ok((_, p)) => catalog.finish_run(run, p, None).await,
        Err((e, p)) => catalog.finish_run(run, p, Some(&format!("{e:#}"))).await,
    };
    result.map(|(s, _)| s).map_err(|(e, _)| e)
}

async fn sync_inner(
    b: &Backends,
    model: Arc<Model>,
    opts: &SyncOptions,
    run: i64,
) -> std::result::Result<(Summary, RunProgress), (anyhow::Error, RunProgress)> {
    let mut progress = RunProgress::default();
    macro_rules! tri {
        ($e:expr) => {
            match $e {
                Ok(v) => v,
                Err(e) => return Err((anyhow::Error::from(e), progress)),
            }
        };
    }
    let listing = tri!(b.source.list().await);
    let entries = tri!(b.catalog.entries(opts.shard, opts.shards).await);
    let plan = plan(listing, entries, opts.shard, opts.shards);
    let mut summary = Summary {
        discovered: plan.discovered,
        new: plan.new.len(),
        changed: plan.changed.len(),
        unchanged: plan.unchanged,
        deleted: plan.deleted.len(),
        ..Default::default()
    };
    progress.discovered = plan.discovered as u64;
    progress.planned = (plan.new.len() + plan.changed.len()) as u64;

    // Gone from the bucket: out of Milvus first, then out of the catalog (a crash in between
    // leaves the catalog row, so the next run deletes again; both deletes are idempotent).
    let gone: Vec<i64> = plan.deleted.iter().map(|e| e.id).collect();
    tri!(b.vectors.delete(&gone).await);
    tri!(b.catalog.delete(&gone).await);
    progress.deleted = gone.len() as u64;
    tri!(b.catalog.update_run(run, &progress).await);

    let work: Vec<Work> = plan.new.into_iter().chain(plan.changed).collect();
    let bar = if opts.progress_bar { ProgressBar::new(work.len() as u64) } else { ProgressBar::hidden() };
    bar.set_style(
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] {wide_bar} {pos}/{len} {per_sec} eta {eta} {msg}")
            .unwrap(),
    );
    let started = Instant::now();
    let (writes_tx, mut writes_rx) = mpsc::channel::<Write>(2);
    let pipeline = tokio::spawn(produce(b.source.clone(), model, work, opts.clone(), writes_tx));

    // The writer runs here: Milvus first, then the catalog, so a catalog row never claims a
    // vector that is not there.
    let mut failures = Vec::new();
    let mut last_report = Instant::now();
    while let Some(w) = writes_rx.recv().await {
        let (ids, keys, vecs) = w.upsert.into_iter().fold((vec![], vec![], vec![]), |mut acc, (i, k, v)| {
            acc.0.push(i);
            acc.1.push(k);
            acc.2.push(v);
            acc
        });
        tri!(b.vectors.upsert(ids, keys, vecs).await);
        tri!(b.vectors.delete(&w.remove).await);
        tri!(b.catalog.record(&w.records).await);
        for r in &w.records {
            match &r.error {
                None => progress.indexed += 1,
                Some(e) => {
                    progress.failed += 1;
                    bar.println(format!("skipped {}: {e}", r.key));
                    failures.push((r.key.clone(), e.clone()));
                }
            }
        }
        bar.set_position(progress.indexed + progress.failed);
        if last_report.elapsed() > Duration::from_secs(2) {
            tri!(b.catalog.update_run(run, &progress).await);
            last_report = Instant::now();
        }
    }
    tri!(tri!(pipeline.await.context("pipeline task panicked")));
    // Searches right after the run see all of it. No flush: an upsert is durable once
    // acknowledged, and sealing segments is Milvus's own business (a flush per run costs seconds).
    summary.vectors = tri!(b.vectors.wait_searchable().await);
    bar.finish_and_clear();
    summary.embed_seconds = started.elapsed().as_secs_f64();
    summary.indexed = progress.indexed as usize;
    summary.failed = progress.failed as usize;
    summary.failures = failures;
    Ok((summary, progress))
}

/// The pipeline without the writes: fetch, decode and embed everything under `source`, and drop
/// the vectors. What the benchmark sets against the full sync to show what Milvus and MySQL cost.
/// Returns (embedded, failed).
pub async fn embed_only(source: &Source, model: Arc<Model>, opts: &SyncOptions) -> Result<(usize, usize)> {
    // Everything is new against an empty catalog.
    let work = plan(source.list().await?, HashMap::new(), 0, 1).new;
    let (tx, mut rx) = mpsc::channel::<Write>(2);
    let pipeline = tokio::spawn(produce(source.clone(), model, work, opts.clone(), tx));
    let (mut embedded, mut failed) = (0, 0);
    while let Some(w) = rx.recv().await {
        embedded += w.upsert.len();
        failed += w.records.iter().filter(|r| r.error.is_some()).count();
    }
    pipeline.await.context("pipeline task panicked")??;
    Ok((embedded, failed))
}

/// Fetch, decode and embed `work`, sending writes downstream. Returns when all is sent.
async fn produce(
    source: Source,
    model: Arc<Model>,
    work: Vec<Work>,
    opts: SyncOptions,
    writes: mpsc::Sender<Write>,
) -> Result<()> {
    let decoders = if opts.decode_workers == 0 { super::model::available_cores() } else { opts.decode_workers };
    let limits = opts.limits;
    let max_bytes = opts.max_object_bytes;
    let batch_size = opts.batch_size.max(1);
    let pool = TensorPool::default();
    let decode_pool = pool.clone();
    let decoded = stream::iter(work)
        .map(move |w| {
            let source = source.clone();
            async move {
                if w.object.size > max_bytes {
                    let error = format!("object is {} bytes, more than the limit of {max_bytes}", w.object.size);
                    return Ok(Some(Err((w, error))));
                }
                match source.get(&w.object.key).await {
                    Ok(bytes) => Ok(Some(Ok((w, bytes)))),
                    // Deleted between listing and fetching: the next run removes it.
                    Err(e) if is_not_found(&e) => Ok(None),
                    Err(e) => Err(e.context(format!("fetching {}", w.object.key))),
                }
            }
        })
        .buffer_unordered(opts.fetch_concurrency.max(1))
        .map(move |fetched: Result<Option<_>>| {
            let pool = decode_pool.clone();
            async move {
                Ok::<_, anyhow::Error>(match fetched? {
                    None => None,
                    Some(Err((work, error))) => Some(Decoded::Failed { work, hash: None, error }),
                    Some(Ok((work, bytes))) => {
                        Some(tokio::task::spawn_blocking(move || decode(work, bytes, limits, &pool)).await?)
                    }
                })
            }
        })
        .buffer_unordered(decoders.max(1));
    // Streams advance only while polled: run fetch + decode as a task of its own, so it keeps
    // going while the model runs, a bounded queue (two batches) ahead of it.
    let (ready_tx, mut ready_rx) = mpsc::channel::<Decoded>(2 * batch_size);
    let feeder = tokio::spawn(async move {
        let mut decoded = std::pin::pin!(decoded);
        while let Some(item) = decoded.next().await.transpose()? {
            if let Some(d) = item
                && ready_tx.send(d).await.is_err()
            {
                break; // the consumer stopped; it reports why
            }
        }
        Ok::<_, anyhow::Error>(())
    });

    let write_batch = batch_size.max(WRITE_BATCH);
    let mut pending = Write::default();
    let mut batch: Vec<(Work, String)> = Vec::with_capacity(batch_size);
    let mut tensors: Vec<f32> = Vec::with_capacity(batch_size * TENSOR_LEN);
    // Batch inputs come back from the model and are refilled: at batch 256 one is 150 MB, which
    // the allocator would otherwise map and fault in afresh for every batch.
    let mut spare_inputs: Vec<Vec<f32>> = Vec::new();
    // Batches in the model at once, one per session (two on a GPU: one copies while the other
    // computes), finished in the order they went in.
    let mut inflight = FuturesOrdered::new();
    let mut done = false;
    while !done {
        match ready_rx.recv().await {
            None => done = true,
            Some(Decoded::Failed { work, hash, error }) => {
                if work.was_indexed {
                    pending.remove.push(work.id);
                }
                pending.records.push(record(&work, hash, Some(error)));
            }
            Some(Decoded::Ready { work, hash, tensor }) => {
                tensors.extend_from_slice(&tensor);
                pool.give(tensor);
                batch.push((work, hash));
            }
        }
        if batch.len() == batch_size || (done && !batch.is_empty()) {
            let n = batch.len();
            let next = spare_inputs.pop().unwrap_or_else(|| Vec::with_capacity(batch_size * TENSOR_LEN));
            let input = std::mem::replace(&mut tensors, next);
            let items = std::mem::replace(&mut batch, Vec::with_capacity(batch_size));
            let model = model.clone();
            // The model runs on a blocking thread while the feeder keeps fetching and decoding.
            // (Decoding alongside it measured faster than taking turns, even on a 2-core CPU.)
            let task = tokio::task::spawn_blocking(move || (model.embed(&input, n), input));
            inflight.push_back(async move { (task.await, items) });
        }
        while inflight.len() >= model.sessions() || (done && !inflight.is_empty()) {
            let Some((finished, items)) = inflight.next().await else { break };
            let (embedded, mut input) = finished?;
            input.clear();
            spare_inputs.push(input);
            for ((work, hash), v) in items.into_iter().zip(embedded?) {
                pending.records.push(record(&work, Some(hash), None));
                pending.upsert.push((work.id, work.object.key, v));
            }
        }
        // Writes go out in chunks of at least WRITE_BATCH rows, whatever the model's batch size:
        // every Milvus upsert and catalog insert costs the servers CPU on the cores we share.
        if !pending.records.is_empty()
            && (done || pending.records.len() >= write_batch)
            && writes.send(std::mem::take(&mut pending)).await.is_err()
        {
            break; // the writer stopped on an error and reports it
        }
    }
    drop(ready_rx);
    feeder.await.context("fetch/decode task panicked")?
}

fn is_not_found(e: &anyhow::Error) -> bool {
    matches!(e.downcast_ref::<object_store::Error>(), Some(object_store::Error::NotFound { .. }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    fn obj(key: &str, etag: &str) -> Object {
        Object { key: key.into(), etag: Some(etag.into()), size: 10 }
    }

    fn entry(key: &str, etag: &str, indexed: bool) -> (String, Entry) {
        (key.into(), Entry { id: key_id(key), key: key.into(), etag: Some(etag.into()), size: 10, indexed })
    }

    #[test]
    fn plan_finds_new_changed_deleted_and_unchanged() {
        let listing = vec![obj("a.jpg", "1"), obj("b.jpg", "2"), obj("c.jpg", "3"), obj("f.jpg", "9")];
        let catalog = HashMap::from([
            entry("a.jpg", "1", true),   // unchanged
            entry("b.jpg", "old", true), // changed
            entry("d.jpg", "4", true),   // deleted
            entry("f.jpg", "9", false),  // failed before, same bytes: not retried
        ]);
        let p = plan(listing, catalog, 0, 1);
        assert_eq!(p.discovered, 4);
        assert_eq!(p.unchanged, 2);
        assert_eq!(p.new.iter().map(|w| w.object.key.as_str()).collect::<Vec<_>>(), ["c.jpg"]);
        assert_eq!(p.changed.len(), 1);
        assert!(p.changed[0].was_indexed && p.changed[0].object.key == "b.jpg");
        assert_eq!(p.deleted.iter().map(|e| e.key.as_str()).collect::<Vec<_>>(), ["d.jpg"]);
    }

    #[test]
    fn a_size_change_with_the_same_etag_is_a_change() {
        let mut o = obj("a.jpg", "1");
        o.size = 11;
        let p = plan(vec![o], HashMap::from([entry("a.jpg", "1", true)]), 0, 1);
        assert_eq!(p.changed.len(), 1);
    }

    #[test]
    fn shards_partition_the_listing() {
        let listing: Vec<Object> = (0..300).map(|i| obj(&format!("img/{i}.jpg"), "e")).collect();
        let mut seen = HashSet::new();
        let mut sizes = vec![];
        for shard in 0..3 {
            let p = plan(listing.clone(), HashMap::new(), shard, 3);
            sizes.push(p.new.len());
            for w in p.new {
                assert!(seen.insert(w.object.key), "an object in two shards");
            }
        }
        assert_eq!(seen.len(), 300);
        assert!(sizes.iter().all(|&n| n > 60), "shards very uneven: {sizes:?}");
    }

    #[test]
    fn a_shard_deletes_only_its_own_entries() {
        let catalog: HashMap<_, _> = (0..50).map(|i| entry(&format!("{i}.jpg"), "e", true)).collect();
        let mine: HashMap<_, _> = catalog.into_iter().filter(|(k, _)| shard_of(k, 2) == 1).collect();
        let p = plan(vec![], mine.clone(), 1, 2);
        assert_eq!(p.deleted.len(), mine.len());
    }
}
