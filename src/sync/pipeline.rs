//! The pipeline: fetch, decode and embed a stream of work, handing write batches downstream.
//!
//!   fetch (async, N in flight) -> decode + preprocess (blocking pool) -> batch + model (as many
//!   batches in flight as model sessions) -> `WriteBatch`es of at least `WRITE_BATCH` rows
//!
//! Stages overlap through bounded channels, so the model (the slowest stage on a CPU) never
//! waits for fetching or decoding, and memory stays flat however much work there is. A bad
//! object becomes a failed record, and so does one the bucket refuses or keeps failing (after
//! object_store's retries); only a bucket that fails `BUCKET_DOWN_AFTER` fetches in a row, with
//! none succeeding, or the model, stops it. An object indexed before whose new version cannot be
//! read keeps its older vector (`stale`): only bad bytes take a vector out of search.

use std::sync::{Arc, Mutex};

use futures::StreamExt;
use futures::stream::{BoxStream, FuturesOrdered};
use tokio::sync::mpsc;

use super::plan::Work;
use super::{Error, SyncOptions};
use crate::bucket::Source;
use crate::core::Preprocess;
use crate::embed::{DecodeLimits, MemoryBudget, Model, available_cores, decode_cost, preprocess_into};
use crate::index::WriteBatch;
use crate::store::{self, Record, Vector, content_hash};

/// Fewest rows per write to Milvus and the catalog (except the last): every upsert and insert
/// costs the servers CPU on the cores we share.
const WRITE_BATCH: usize = 32;

/// Fetches failing in a row (each after its own retries) that mean the bucket is down, not one
/// object: the run stops, and the next one resumes.
const BUCKET_DOWN_AFTER: usize = 16;

enum Decoded {
    Ready { work: Work, hash: String, tensor: Vec<f32> },
    Failed { work: Work, hash: Option<String>, error: String, why: Why },
}

/// What a failure says about the object, and so what the next run does with it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Why {
    /// The bytes (corrupt, too large, not an image): failed until the object changes.
    Bytes,
    /// The read (the bucket refused or kept failing the GET; see `Record::retry`): tried again.
    Read,
    /// An archive storage class: skipped, never fetched, until it changes or is restored.
    Archived,
    /// The key cannot be addressed by the client: failed until renamed.
    Key,
}

impl Why {
    /// Whether the failure says something about the object's new version (its bytes, or its
    /// size as listed). Those that do not (a refused or failing GET, an archive tier, a key the
    /// client cannot address) prove nothing, so an object indexed before keeps its older vector.
    fn judges_the_object(self) -> bool {
        self == Why::Bytes
    }
}

/// What fetching one object came to.
enum Fetch {
    /// The bytes, with their share of the fetch budget.
    Got(Work, bytes::Bytes, crate::embed::Reservation),
    /// Deleted since the listing: the next run removes it.
    Gone,
    /// About this object: recorded, and the run goes on.
    Failed { work: Work, error: String, why: Why },
    /// The bucket failed (after retries): recorded too, unless it keeps happening.
    Down { work: Work, error: store::Error },
}

/// `key_limit`: the longest key the collection takes (`VectorStore::key_limit`).
async fn fetch(source: &Source, mut work: Work, max_bytes: u64, key_limit: usize, budget: &MemoryBudget) -> Fetch {
    let failed = |work, error: String, why| Fetch::Failed { work, error, why };
    if work.object.key.len() > key_limit {
        let error = format!(
            "the key is {} bytes, longer than the {key_limit} this index's Milvus collection takes (it was made \
             before keys that long were held; a rebuild into a new generation takes {} bytes)",
            work.object.key.len(),
            crate::store::MAX_KEY_BYTES
        );
        return failed(work, error, Why::Key);
    }
    if work.object.archived {
        let error = "in an archive storage class (S3 Glacier Flexible Retrieval or Deep Archive, Azure Archive): \
                     not read until it is restored to another class";
        return failed(work, error.into(), Why::Archived);
    }
    if work.object.size > max_bytes {
        let error = format!("object is {} bytes, more than the limit of {max_bytes}", work.object.size);
        return failed(work, error, Why::Bytes);
    }
    // Fetched bytes wait for a decoder: at most the fetch budget of them (one object always fits).
    let held = budget.reserve(work.object.size.min(budget.bytes())).await.expect("clamped to the budget");
    match source.fetch(&work.object.key, max_bytes).await {
        Ok(f) => {
            // What was fetched may be newer than the listing: record what the vector is of.
            (work.object.etag, work.object.size) = (f.etag, f.size);
            Fetch::Got(work, f.bytes, held)
        }
        Err(store::Error::NotFound(_)) => Fetch::Gone,
        Err(e @ store::Error::Invalid(_)) => failed(work, e.to_string(), Why::Key),
        // It grew past the limit: about the new version.
        Err(e @ store::Error::TooLarge(_)) => failed(work, e.to_string(), Why::Bytes),
        Err(e @ store::Error::Archived(_)) => failed(work, e.to_string(), Why::Archived),
        Err(e @ store::Error::Backend { .. }) => Fetch::Down { work, error: e },
        Err(e) => failed(work, e.to_string(), Why::Read),
    }
}

/// Tensor buffers (600 KB an image at 224 x 224) handed back once copied into a batch, so
/// decoding reuses them instead of allocating. It holds at most what was in flight at once:
/// decoders plus the queue. Every buffer is for images prepared as `preprocess` says.
#[derive(Clone)]
struct TensorPool {
    free: Arc<Mutex<Vec<Vec<f32>>>>,
    preprocess: Preprocess,
}

impl TensorPool {
    fn new(preprocess: Preprocess) -> Self {
        Self { free: Arc::default(), preprocess }
    }

    fn take(&self) -> Vec<f32> {
        self.free.lock().expect("pool lock").pop().unwrap_or_else(|| vec![0.0; self.preprocess.tensor_len()])
    }

    fn give(&self, tensor: Vec<f32>) {
        self.free.lock().expect("pool lock").push(tensor);
    }
}

fn decode(work: Work, bytes: bytes::Bytes, limits: DecodeLimits, pool: &TensorPool) -> Decoded {
    let hash = content_hash(&bytes);
    let mut tensor = pool.take();
    match preprocess_into(&bytes, limits, &pool.preprocess, &mut tensor) {
        Ok(()) => Decoded::Ready { work, hash, tensor },
        Err(e) => {
            pool.give(tensor);
            Decoded::Failed { work, hash: Some(hash), error: e.to_string(), why: Why::Bytes }
        }
    }
}

/// `failed`: why the object failed, if it did.
fn record(work: &Work, hash: Option<String>, failed: Option<(String, Why)>) -> Record {
    let why = failed.as_ref().map(|(_, why)| *why);
    let stale = work.was_indexed && why.is_some_and(|why| !why.judges_the_object());
    Record {
        id: work.id,
        key: work.object.key.clone(),
        etag: work.object.etag.clone(),
        size: work.object.size,
        content_hash: hash,
        error: failed.map(|(error, _)| error),
        // A stale row is tried again too: its older version is what search has.
        retry: why == Some(Why::Read) || stale,
        skipped: why == Some(Why::Archived) && !stale,
        stale,
    }
}

/// Fetches and decodes `work` on a task of its own (streams advance only while polled, so it
/// keeps going while the model runs), a bounded queue of two batches ahead of the model.
fn fetch_and_decode(
    source: Source,
    work: BoxStream<'static, Work>,
    opts: &SyncOptions,
    key_limit: usize,
    pool: TensorPool,
) -> (mpsc::Receiver<Decoded>, tokio::task::JoinHandle<Result<(), Error>>) {
    let decoders = if opts.decode_workers == 0 { available_cores() } else { opts.decode_workers };
    let (limits, max_bytes) = (opts.limits, opts.max_object_bytes);
    let (fetched_bytes, decode_memory) = (MemoryBudget::new(opts.fetch_memory), MemoryBudget::new(opts.decode_memory));
    // Fetches failed in a row; any success resets it (fetches finish in any order).
    let mut down_in_a_row = 0;
    let decoded = work
        .map(move |w| {
            let (source, budget) = (source.clone(), fetched_bytes.clone());
            async move { fetch(&source, w, max_bytes, key_limit, &budget).await }
        })
        .buffer_unordered(opts.fetch_concurrency.max(1))
        .map(move |fetched| {
            let (pool, decode_memory) = (pool.clone(), decode_memory.clone());
            down_in_a_row = if matches!(fetched, Fetch::Down { .. }) { down_in_a_row + 1 } else { 0 };
            let bucket_down = down_in_a_row >= BUCKET_DOWN_AFTER;
            async move {
                Ok::<_, Error>(match fetched {
                    Fetch::Gone => None,
                    Fetch::Down { error, .. } if bucket_down => return Err(Error::Store(error)),
                    Fetch::Down { work, error } => {
                        Some(Decoded::Failed { work, hash: None, error: error.to_string(), why: Why::Read })
                    }
                    Fetch::Failed { work, error, why } => Some(Decoded::Failed { work, hash: None, error, why }),
                    Fetch::Got(work, bytes, held) => {
                        // The decode's peak, reserved from the header before anything is allocated.
                        let reserved = match decode_cost(&bytes, limits, &pool.preprocess) {
                            Ok(cost) => decode_memory.reserve(cost).await,
                            Err(e) => Err(e),
                        };
                        match reserved {
                            Ok(reservation) => Some(
                                tokio::task::spawn_blocking(move || {
                                    let _memory = (reservation, held);
                                    decode(work, bytes, limits, &pool)
                                })
                                .await?,
                            ),
                            Err(e) => {
                                let hash = Some(content_hash(&bytes));
                                Some(Decoded::Failed { work, hash, error: e.to_string(), why: Why::Bytes })
                            }
                        }
                    }
                })
            }
        })
        .buffer_unordered(decoders.max(1));
    let (ready_tx, ready_rx) = mpsc::channel::<Decoded>(2 * opts.batch_size.max(1));
    let feeder = tokio::spawn(async move {
        let mut decoded = std::pin::pin!(decoded);
        while let Some(item) = decoded.next().await.transpose()? {
            if let Some(d) = item
                && ready_tx.send(d).await.is_err()
            {
                break; // the consumer stopped; it reports why
            }
        }
        Ok(())
    });
    (ready_rx, feeder)
}

/// Fetch, decode and embed `work`, sending write batches downstream. Returns when all is sent,
/// or when the receiver stops (it reports its own error).
pub(super) async fn produce(
    source: Source,
    model: Arc<Model>,
    work: BoxStream<'static, Work>,
    opts: SyncOptions,
    key_limit: usize,
    writes: mpsc::Sender<WriteBatch>,
) -> Result<(), Error> {
    let batch_size = opts.batch_size.max(1);
    let pool = TensorPool::new(*model.preprocess());
    let tensor_len = model.preprocess().tensor_len();
    let (mut ready, feeder) = fetch_and_decode(source, work, &opts, key_limit, pool.clone());

    let write_batch = batch_size.max(WRITE_BATCH);
    let mut pending = WriteBatch::default();
    let mut batch: Vec<(Work, String)> = Vec::with_capacity(batch_size);
    let mut tensors: Vec<f32> = Vec::with_capacity(batch_size * tensor_len);
    // Batch inputs come back from the model and are refilled: at batch 256 one is 150 MB, which
    // the allocator would otherwise map and fault in afresh for every batch.
    let mut spare_inputs: Vec<Vec<f32>> = Vec::new();
    // Batches in the model at once, one per session (two on a GPU: one copies while the other
    // computes), finished in the order they went in.
    let mut inflight = FuturesOrdered::new();
    let mut done = false;
    while !done {
        match ready.recv().await {
            None => done = true,
            Some(Decoded::Failed { work, hash, error, why }) => {
                // The new version is known to be bad: the older vector is of bytes no longer
                // there. Any other failure keeps it (see `record`).
                if work.was_indexed && why.judges_the_object() {
                    pending.remove.push(work.id);
                }
                pending.records.push(record(&work, hash, Some((error, why))));
            }
            Some(Decoded::Ready { work, hash, tensor }) => {
                tensors.extend_from_slice(&tensor);
                pool.give(tensor);
                batch.push((work, hash));
            }
        }
        if batch.len() == batch_size || (done && !batch.is_empty()) {
            let n = batch.len();
            let next = spare_inputs.pop().unwrap_or_else(|| Vec::with_capacity(batch_size * tensor_len));
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
            for ((work, hash), embedding) in items.into_iter().zip(embedded?) {
                pending.records.push(record(&work, Some(hash), None));
                pending.vectors.push(Vector { id: work.id, key: work.object.key, embedding });
            }
        }
        if !pending.records.is_empty()
            && (done || pending.records.len() >= write_batch)
            && writes.send(std::mem::take(&mut pending)).await.is_err()
        {
            break; // the writer stopped on an error and reports it
        }
    }
    drop(ready);
    feeder.await?
}
