//! `imageindex index` (a whole bucket or folder, with a progress bar) and `imageindex embed` (one
//! shard, in an embedding Job's pod): the same sync.

use std::sync::Arc;

use anyhow::{Context, Result};

use super::{Backends, DeletionGuard, Reconcile, Summary, SyncOptions, sync};
use crate::config::DataPlaneArgs;
use crate::env;

#[derive(clap::Args)]
pub struct IndexArgs {
    /// `s3://bucket/prefix/`, `gs://bucket/prefix/`, `az://container/prefix/`, `file:///path` or a
    /// local folder.
    source: String,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(clap::Args)]
pub struct EmbedArgs {
    /// `s3://bucket/prefix/`, `gs://bucket/prefix/`, `az://container/prefix/`, `file:///path` or a
    /// local folder.
    #[arg(long, env = env::SOURCE)]
    source: String,
    /// This pod's shard (an Indexed Job sets JOB_COMPLETION_INDEX).
    #[arg(long, env = env::SHARD, default_value_t = 0)]
    shard: u32,
    #[arg(long, env = env::SHARDS, default_value_t = 1)]
    shards: u32,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(clap::Args)]
struct RunArgs {
    #[command(flatten)]
    data: DataPlaneArgs,
    /// Images per model call.
    #[arg(long, env = env::BATCH_SIZE, default_value_t = 16)]
    batch_size: usize,
    /// Objects fetched concurrently.
    #[arg(long, env = env::FETCH_CONCURRENCY, default_value_t = 16)]
    fetch_concurrency: usize,
    /// Images decoded concurrently; 0 = the cores this process may use.
    #[arg(long, env = env::DECODE_WORKERS, default_value_t = 0)]
    decode_workers: usize,
    /// Most of the catalog one run may delete, in percent (at least 10 objects may always go).
    /// A run that would delete more refuses, deleting and indexing nothing.
    #[arg(long, env = env::MAX_DELETE_PERCENT, default_value_t = 10.0)]
    max_delete_percent: f64,
    /// Delete whatever the listing says is gone, however much (also from an empty listing).
    #[arg(long, env = env::ALLOW_MASS_DELETE)]
    allow_mass_delete: bool,
    /// When to compare Milvus with the catalog object by object and repair what disagrees:
    /// when their counts differ (one count each), or on every run (lists every id).
    #[arg(long, env = env::RECONCILE, value_enum, default_value = "if-counts-differ")]
    reconcile: Reconcile,
    /// Print the summary as JSON on stdout.
    #[arg(long)]
    json: bool,
}

impl IndexArgs {
    pub async fn run(self) -> Result<()> {
        run(self.source, 0, 1, self.run, true).await
    }
}

impl EmbedArgs {
    pub async fn run(self) -> Result<()> {
        let (shard, shards) = (self.shard, self.shards);
        anyhow::ensure!(shards >= 1 && shard < shards, "shard {shard} is not in 0..{shards}");
        run(self.source, shard, shards, self.run, false).await
    }
}

async fn run(source: String, shard: u32, shards: u32, args: RunArgs, progress_bar: bool) -> Result<()> {
    let DataPlaneArgs { backend, model, src, limits } = &args.data;
    let loaded = model.load()?;
    let index = backend.connect(loaded.id()).await?;
    let source = src.open(source)?;
    let opts = SyncOptions {
        shard,
        shards,
        batch_size: args.batch_size,
        fetch_concurrency: args.fetch_concurrency,
        decode_workers: args.decode_workers,
        limits: limits.decode(),
        max_object_bytes: limits.max_object_bytes,
        decode_memory: limits.decode_memory_mib << 20,
        fetch_memory: SyncOptions::default().fetch_memory,
        progress_bar,
        mixed_precision: model.allow_mixed_precision,
        deletion: DeletionGuard { max_share: args.max_delete_percent / 100.0, allow: args.allow_mass_delete },
        owner: backend.owner.clone(),
        reconcile: args.reconcile,
    };
    let summary = sync(&Backends { source, index }, Arc::new(loaded), &opts).await.context("sync failed")?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        print_summary(&summary);
    }
    Ok(())
}

fn print_summary(s: &Summary) {
    eprintln!(
        "discovered {} | new {} changed {} unchanged {} deleted {} kept {} | indexed {} failed {} | {:.1} images/s | {} vectors in the collection{}",
        s.discovered,
        s.new,
        s.changed,
        s.unchanged,
        s.deleted,
        s.kept,
        s.indexed,
        s.failed,
        s.images_per_second(),
        s.vectors,
        match s.repaired {
            r if r.orphans + r.missing > 0 => format!(
                " | repaired: {} vectors without a catalog row deleted, {} objects without a vector to embed again",
                r.orphans, r.missing
            ),
            _ => String::new(),
        }
    );
    for (key, err) in &s.failures {
        eprintln!("  failed {key}: {err}");
    }
}
