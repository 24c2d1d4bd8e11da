//! Carrying out a plan: one shard's work read from the catalog (deletions first, then the
//! objects to embed, both in id order and a page at a time), embedded and written, each item
//! marked done once written. `sync` plans and then carries out, in one process.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{StreamExt, stream};
use indicatif::{ProgressBar, ProgressStyle};
use tokio::sync::mpsc;

use super::pipeline::produce;
use super::plan::Work;
use super::planner::{self, Planned};
use super::{Backends, Error, RepairWhen, Summary, SyncOptions};
use crate::bucket::Source;
use crate::embed::Model;
use crate::index::{Index, Repair, WriteBatch};
use crate::store::{PlanRecord, PlanStatus, RunProgress, WorkItem, shard_ids};

/// Work items read at once.
const WORK_PAGE: u32 = 1000;
/// Keys left out for a collision of ids that a summary lists (the plan records all of them).
const COLLISIONS_LISTED: u32 = 100;

/// Plans (one listing of the whole source) and carries out shard `opts.shard` of the plan, and
/// records the run: `imageindex index`. When the plan finds nothing to do, nothing more is done
/// (an unchanged source costs one listing and one read of the catalog).
pub async fn sync(backends: &Backends, model: Arc<Model>, opts: &SyncOptions) -> Result<Summary, Error> {
    let index = &backends.index;
    index.ensure(model.dim(), model.id(), opts.mixed_precision, &opts.owner).await?;
    let planned = async {
        let repaired = planner::repair(index, opts.repair).await?;
        let Planned { record, refused } = planner::plan(&backends.source, index, opts.deletion).await?;
        match refused {
            Some(refused) => Err(Error::MassDeletion(refused)),
            None => Ok((record, repaired)),
        }
    }
    .await;
    let (record, repaired) = match planned {
        Ok(p) => p,
        Err(e) => {
            // The run's outcome, where the progress API and the status read it. Best effort: when
            // the catalog is what failed, there is nowhere to say so.
            if let Ok(run) = index.catalog.start_run(opts.shard, opts.shards).await {
                let _ = index.catalog.finish_run(run, &RunProgress::default(), Some(&e.to_string())).await;
            }
            return Err(e);
        }
    };
    let c = record.counts;
    let mut summary = if c.pending() == 0 && opts.repair == RepairWhen::IfCountsDiffer {
        Summary { vectors: index.vectors.count().await?, ..Default::default() }
    } else {
        carry_out_ensured(backends, model, opts, &record).await?
    };
    (summary.discovered, summary.new, summary.changed, summary.unchanged) =
        (c.discovered as usize, c.new as usize, c.changed as usize, c.unchanged as usize);
    (summary.held, summary.too_long, summary.collided) = (c.held as usize, c.too_long as usize, c.collided as usize);
    if c.collided > 0 {
        let collided = index.catalog.collisions(record.id, COLLISIONS_LISTED).await?;
        summary.failures.extend(collided.into_iter().map(|c| (c.key.clone(), c.to_string())));
    }
    summary.repaired.orphans += repaired.orphans;
    summary.repaired.missing += repaired.missing;
    Ok(summary)
}

/// Carries out shard `opts.shard` of a plan (the newest complete one without `plan`), and records
/// the run: `imageindex embed`, in an embedding Job's pod. It never lists the source.
pub async fn carry_out(
    backends: &Backends,
    model: Arc<Model>,
    opts: &SyncOptions,
    plan: Option<i64>,
) -> Result<Summary, Error> {
    let catalog = &backends.index.catalog;
    backends.index.ensure(model.dim(), model.id(), opts.mixed_precision, &opts.owner).await?;
    let record = match plan {
        Some(id) => catalog.plan(id).await?.ok_or_else(|| Error::NoPlan(format!("plan {id} is not in the catalog")))?,
        None => catalog.latest_plan().await?.ok_or_else(|| {
            Error::NoPlan("the catalog has no plan for this collection: run `imageindex plan` first".into())
        })?,
    };
    match record.status {
        PlanStatus::Ready => {}
        PlanStatus::Refused => {
            let why = record.refused.clone().unwrap_or_default();
            return Err(Error::NoPlan(format!("plan {} is refused: {why}", record.id)));
        }
        s => return Err(Error::NoPlan(format!("plan {} is not complete ({s:?})", record.id))),
    }
    carry_out_ensured(backends, model, opts, &record).await
}

async fn carry_out_ensured(
    backends: &Backends,
    model: Arc<Model>,
    opts: &SyncOptions,
    plan: &PlanRecord,
) -> Result<Summary, Error> {
    let catalog = &backends.index.catalog;
    let run = catalog.start_run(opts.shard, opts.shards).await?;
    let mut progress = RunProgress::default();
    let result = run_shard(backends, model, opts, plan, run, &mut progress).await;
    let error = result.as_ref().err().map(ToString::to_string);
    // Best effort: when the catalog itself is what failed, the run stays `running` there.
    let _ = catalog.finish_run(run, &progress, error.as_deref()).await;
    result
}

async fn run_shard(
    backends: &Backends,
    model: Arc<Model>,
    opts: &SyncOptions,
    plan: &PlanRecord,
    run: i64,
    progress: &mut RunProgress,
) -> Result<Summary, Error> {
    let Backends { source, index } = backends;
    let ids = shard_ids(opts.shard, opts.shards);
    let left = index.catalog.work_left(plan.id, &ids).await?;
    let mut summary = Summary {
        discovered: plan.counts.discovered as usize,
        new: left.new as usize,
        changed: left.changed as usize,
        deleted: left.deleted as usize,
        ..Default::default()
    };
    progress.discovered = plan.counts.discovered;
    progress.planned = left.new + left.changed;

    // Gone from the bucket: out of the index (Milvus first, then the catalog), once proven gone.
    let removed = remove_deleted(source, index, plan, &ids).await?;
    summary.kept = summary.deleted - removed;
    summary.deleted = removed;
    progress.deleted = removed as u64;
    index.catalog.update_run(run, progress).await?;

    let started = Instant::now();
    let to_embed = (left.new + left.changed) as usize;
    (summary.failures, summary.stale) =
        embed_and_write(backends, model, plan.id, &ids, to_embed, opts, run, progress).await?;
    // Searches right after the run see all of it. No flush: an upsert is durable once
    // acknowledged, and sealing segments is Milvus's own business (a flush per run costs seconds).
    summary.vectors = index.wait_searchable().await?;
    // What this run did must leave Milvus and the catalog agreeing. Anything repaired now (a
    // vector lost while the run wrote) is embedded by the next run, which the catalog's marks
    // make a change.
    let after = repair(index, opts).await?;
    if after != Repair::default() {
        summary.vectors = index.wait_searchable().await?;
    }
    summary.repaired = after;
    summary.embed_seconds = started.elapsed().as_secs_f64();
    summary.indexed = progress.indexed as usize;
    summary.failed = progress.failed as usize;
    Ok(summary)
}

/// Repairs this shard when the counts say Milvus and the catalog disagree (cheap when they do not).
async fn repair(index: &Index, opts: &SyncOptions) -> Result<Repair, Error> {
    if opts.repair == RepairWhen::IfCountsDiffer && index.counts_agree().await? {
        return Ok(Repair::default());
    }
    Ok(index.repair(opts.shard, opts.shards).await?)
}

/// The plan's deletions in `ids`, a page at a time: those proven gone are removed, unless
/// written since the listing began. Returns how many were removed.
async fn remove_deleted(
    source: &Source,
    index: &Index,
    plan: &PlanRecord,
    ids: &std::ops::RangeInclusive<i64>,
) -> Result<usize, Error> {
    let (mut after, mut removed) = (None, 0);
    loop {
        let page = index.catalog.work(plan.id, ids, after, true, WORK_PAGE).await?;
        let Some(last) = page.last() else { return Ok(removed) };
        after = Some(last.id);
        let done: Vec<i64> = page.iter().map(|w| w.id).collect();
        let gone = proven_gone(source, page).await;
        removed += index.remove_unless_written_since(&gone, plan.listing_began).await?;
        index.catalog.work_done(plan.id, &done).await?;
    }
}

/// The ids of `deleted` that are really gone. A vector costs a model run to remake, so an indexed
/// object is removed only once a HEAD says the bucket no longer has it (the listing may have
/// missed it, or it came back since); a failed one holds no vector and goes on the listing's word.
async fn proven_gone(source: &Source, deleted: Vec<WorkItem>) -> Vec<i64> {
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

/// Runs the pipeline over the plan's objects to embed in `ids` (`count` of them), read from the
/// catalog a page at a time, and writes what it produces, marking each done; returns the
/// objects that failed, and how many of them are stale (an older version still indexed).
#[allow(clippy::too_many_arguments)]
async fn embed_and_write(
    backends: &Backends,
    model: Arc<Model>,
    plan: i64,
    ids: &std::ops::RangeInclusive<i64>,
    count: usize,
    opts: &SyncOptions,
    run: i64,
    progress: &mut RunProgress,
) -> Result<(Vec<(String, String)>, usize), Error> {
    let bar = if opts.progress_bar { ProgressBar::new(count as u64) } else { ProgressBar::hidden() };
    bar.set_style(
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] {wide_bar} {pos}/{len} {per_sec} eta {eta} {msg}")
            .expect("a valid template"),
    );
    let (work, reader) = read_work(&backends.index, plan, ids.clone());
    let (writes_tx, mut writes_rx) = mpsc::channel::<WriteBatch>(2);
    let key_limit = backends.index.vectors.key_limit();
    let pipeline = tokio::spawn(produce(backends.source.clone(), model, work, opts.clone(), key_limit, writes_tx));
    let (mut failures, mut stale) = (Vec::new(), 0);
    let mut last_report = Instant::now();
    while let Some(batch) = writes_rx.recv().await {
        let failed: Vec<(String, String)> =
            batch.records.iter().filter_map(|r| Some((r.key.clone(), r.error.clone()?))).collect();
        let indexed = batch.records.len() - failed.len();
        stale += batch.records.iter().filter(|r| r.stale).count();
        let done: Vec<i64> = batch.records.iter().map(|r| r.id).collect();
        // Counted once written: the run's record never claims more than the index holds.
        backends.index.write(batch).await?;
        backends.index.catalog.work_done(plan, &done).await?;
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
    reader.await??;
    bar.finish_and_clear();
    Ok((failures, stale))
}

/// The plan's objects to embed in `ids`, read a page at a time on a task of its own (a page
/// ahead of the pipeline, which holds its own bounded queue).
fn read_work(
    index: &Index,
    plan: i64,
    ids: std::ops::RangeInclusive<i64>,
) -> (futures::stream::BoxStream<'static, Work>, tokio::task::JoinHandle<Result<(), Error>>) {
    let (tx, rx) = mpsc::channel::<Work>(WORK_PAGE as usize);
    let catalog = index.catalog.clone();
    let reader = tokio::spawn(async move {
        let mut after = None;
        loop {
            let page = catalog.work(plan, &ids, after, false, WORK_PAGE).await?;
            let Some(last) = page.last() else { return Ok(()) };
            after = Some(last.id);
            for w in page {
                if tx.send(Work::from(w)).await.is_err() {
                    return Ok(()); // the pipeline stopped, and says why
                }
            }
        }
    });
    let work = stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|w| (w, rx)) });
    (work.boxed(), reader)
}

/// The pipeline without the writes: fetch, decode and embed everything under `source`, and drop
/// the vectors. What the benchmark sets against the full sync to show what Milvus and MySQL cost.
/// Returns (embedded, failed).
pub async fn embed_only(source: &Source, model: Arc<Model>, opts: &SyncOptions) -> Result<(usize, usize), Error> {
    // Everything is new against an empty catalog.
    let work: Vec<Work> = source.list().await?.into_iter().map(Work::new).collect();
    let (tx, mut rx) = mpsc::channel::<WriteBatch>(2);
    let work = stream::iter(work).boxed();
    let pipeline = tokio::spawn(produce(source.clone(), model, work, opts.clone(), crate::store::MAX_KEY_BYTES, tx));
    let (mut embedded, mut failed) = (0, 0);
    while let Some(w) = rx.recv().await {
        embedded += w.vectors.len();
        failed += w.records.iter().filter(|r| r.error.is_some()).count();
    }
    pipeline.await??;
    Ok((embedded, failed))
}
