//! One sync of one shard: plan, remove what is gone, embed what is new or changed, record the run.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{StreamExt, stream};
use indicatif::{ProgressBar, ProgressStyle};
use tokio::sync::mpsc;

use super::pipeline::produce;
use super::plan::{Plan, Work, plan};
use super::{Backends, Error, Reconcile, Summary, SyncOptions};
use crate::embed::Model;
use crate::store::{Entry, Index, Repair, RunProgress, Source, WriteBatch};

/// Runs one sync of one shard, and records it (with its progress and outcome) in the catalog.
pub async fn sync(backends: &Backends, model: Arc<Model>, opts: &SyncOptions) -> Result<Summary, Error> {
    let catalog = &backends.index.catalog;
    backends.index.ensure(model.dim(), model.id(), opts.mixed_precision, &opts.owner).await?;
    let run = catalog.start_run(opts.shard, opts.shards).await?;
    let mut progress = RunProgress::default();
    let result = run_shard(backends, model, opts, run, &mut progress).await;
    let error = result.as_ref().err().map(ToString::to_string);
    // Best effort: when the catalog itself is what failed, the run stays `running` there.
    let _ = catalog.finish_run(run, &progress, error.as_deref()).await;
    result
}

async fn run_shard(
    backends: &Backends,
    model: Arc<Model>,
    opts: &SyncOptions,
    run: i64,
    progress: &mut RunProgress,
) -> Result<Summary, Error> {
    let Backends { source, index } = backends;
    // Milvus and the catalog disagree (a collection lost outside, a crash between the two
    // writes): repair this shard first, so that the plan embeds what lost its vector.
    let mut repaired = repair(index, opts).await?;
    // Before the listing: a row written from now on is newer than the listing, and never deleted.
    let listing_began = index.catalog.clock().await?;
    let listing = source.list().await?;
    let entries = index.catalog.entries(opts.shard, opts.shards).await?;
    let catalog_size = entries.len();
    let diff = plan(listing, entries, opts.shard, opts.shards);
    opts.deletion.check(&diff, catalog_size)?;
    let Plan { discovered, new, changed, deleted, unchanged } = diff;
    let mut summary = Summary {
        discovered,
        new: new.len(),
        changed: changed.len(),
        unchanged,
        deleted: deleted.len(),
        ..Default::default()
    };
    progress.discovered = discovered as u64;
    progress.planned = (new.len() + changed.len()) as u64;

    // Gone from the bucket: out of the index (Milvus first, then the catalog), once proven gone.
    let gone = proven_gone(source, deleted).await;
    let removed = index.remove_unless_written_since(&gone, listing_began).await?;
    summary.kept = summary.deleted - removed;
    summary.deleted = removed;
    progress.deleted = removed as u64;
    index.catalog.update_run(run, progress).await?;

    let started = Instant::now();
    let work: Vec<Work> = new.into_iter().chain(changed).collect();
    summary.failures = embed_and_write(backends, model, work, opts, run, progress).await?;
    // Searches right after the run see all of it. No flush: an upsert is durable once
    // acknowledged, and sealing segments is Milvus's own business (a flush per run costs seconds).
    summary.vectors = index.wait_searchable().await?;
    // And after: what this run did must leave them agreeing. Anything repaired now (a vector lost
    // while the run wrote) is embedded by the next run, which the catalog's marks make a change.
    let after = repair(index, opts).await?;
    repaired.orphans += after.orphans;
    repaired.missing += after.missing;
    if after != Repair::default() {
        summary.vectors = index.wait_searchable().await?;
    }
    summary.repaired = repaired;
    summary.embed_seconds = started.elapsed().as_secs_f64();
    summary.indexed = progress.indexed as usize;
    summary.failed = progress.failed as usize;
    Ok(summary)
}

/// Reconciles this shard when the counts say Milvus and the catalog disagree (cheap when they do not).
async fn repair(index: &Index, opts: &SyncOptions) -> Result<Repair, Error> {
    if opts.reconcile == Reconcile::IfCountsDiffer && index.counts_agree().await? {
        return Ok(Repair::default());
    }
    Ok(index.reconcile(opts.shard, opts.shards).await?)
}

/// The ids of `deleted` that are really gone. A vector costs a model run to remake, so an indexed
/// object is removed only once a HEAD says the bucket no longer has it (the listing may have
/// missed it, or it came back since); a failed one holds no vector and goes on the listing's word.
async fn proven_gone(source: &Source, deleted: Vec<Entry>) -> Vec<i64> {
    let checks = stream::iter(deleted).map(|e| async move {
        let there = if e.indexed { source.exists(&e.key).await } else { Ok(false) };
        match there {
            Ok(false) => Some(e.id),
            Ok(true) => None,
            Err(err) => {
                tracing::warn!("keeping {:?}: cannot tell whether it is gone ({err})", e.key);
                None
            }
        }
    });
    checks.buffer_unordered(16).filter_map(std::future::ready).collect().await
}

/// Runs the pipeline over `work` and writes what it produces; returns the objects that failed.
async fn embed_and_write(
    backends: &Backends,
    model: Arc<Model>,
    work: Vec<Work>,
    opts: &SyncOptions,
    run: i64,
    progress: &mut RunProgress,
) -> Result<Vec<(String, String)>, Error> {
    let bar = if opts.progress_bar { ProgressBar::new(work.len() as u64) } else { ProgressBar::hidden() };
    bar.set_style(
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] {wide_bar} {pos}/{len} {per_sec} eta {eta} {msg}")
            .expect("a valid template"),
    );
    let (writes_tx, mut writes_rx) = mpsc::channel::<WriteBatch>(2);
    let pipeline = tokio::spawn(produce(backends.source.clone(), model, work, opts.clone(), writes_tx));
    let mut failures = Vec::new();
    let mut last_report = Instant::now();
    while let Some(batch) = writes_rx.recv().await {
        let failed: Vec<(String, String)> =
            batch.records.iter().filter_map(|r| Some((r.key.clone(), r.error.clone()?))).collect();
        let indexed = batch.records.len() - failed.len();
        // Counted once written: the run's record never claims more than the index holds.
        backends.index.write(batch).await?;
        progress.indexed += indexed as u64;
        progress.failed += failed.len() as u64;
        for (key, e) in &failed {
            bar.println(format!("skipped {key}: {e}"));
        }
        failures.extend(failed);
        bar.set_position(progress.indexed + progress.failed);
        if last_report.elapsed() > Duration::from_secs(2) {
            backends.index.catalog.update_run(run, progress).await?;
            last_report = Instant::now();
        }
    }
    pipeline.await??;
    bar.finish_and_clear();
    Ok(failures)
}

/// The pipeline without the writes: fetch, decode and embed everything under `source`, and drop
/// the vectors. What the benchmark sets against the full sync to show what Milvus and MySQL cost.
/// Returns (embedded, failed).
pub async fn embed_only(source: &Source, model: Arc<Model>, opts: &SyncOptions) -> Result<(usize, usize), Error> {
    // Everything is new against an empty catalog.
    let work = plan(source.list().await?, HashMap::new(), 0, 1).new;
    let (tx, mut rx) = mpsc::channel::<WriteBatch>(2);
    let pipeline = tokio::spawn(produce(source.clone(), model, work, opts.clone(), tx));
    let (mut embedded, mut failed) = (0, 0);
    while let Some(w) = rx.recv().await {
        embedded += w.vectors.len();
        failed += w.records.iter().filter(|r| r.error.is_some()).count();
    }
    pipeline.await??;
    Ok((embedded, failed))
}
