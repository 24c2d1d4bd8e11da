//! `imageindex index` (a whole bucket or folder, with a progress bar) and `imageindex embed` (one
//! shard, in an embedding Job's pod): the same sync.

use std::sync::Arc;

use anyhow::{Context, Result};

use super::{Backends, DeletionGuard, Reconcile, Summary, SyncOptions, carry_out, sync};
use crate::config::DataPlaneArgs;
use crate::env;

#[derive(clap::Args)]
pub struct IndexArgs {
    /// `s3://bucket/prefix/`, `gs://bucket/prefix/`, `az://container/prefix/`, `file:///path` or a
    /// local folder.
    source: String,
    /// Most of the catalog one run may delete, in percent (at least 10 objects may always go).
    /// A run that would delete more refuses, deleting and indexing nothing.
    #[arg(long, env = env::MAX_DELETE_PERCENT, default_value_t = 10.0)]
    max_delete_percent: f64,
    /// Delete whatever the listing says is gone, however much (also from an empty listing).
    #[arg(long, env = env::ALLOW_MASS_DELETE)]
    allow_mass_delete: bool,
    #[command(flatten)]
    run: RunArgs,
}

/// One shard of a plan's work (`imageindex plan` lists the bucket; a shard never does).
#[derive(clap::Args)]
pub struct EmbedArgs {
    /// `s3://bucket/prefix/`, `gs://bucket/prefix/`, `az://container/prefix/`, `file:///path` or a
    /// local folder: where the plan's objects are fetched from.
    #[arg(long, env = env::SOURCE)]
    source: String,
    /// The plan to carry out (`imageindex plan` prints its id); the newest complete plan of the
    /// collection without it.
    #[arg(long, env = env::PLAN)]
    plan: Option<i64>,
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
        let deletion = DeletionGuard { max_share: self.max_delete_percent / 100.0, allow: self.allow_mass_delete };
        run(self.source, Shard::Whole(deletion), self.run).await
    }
}

impl EmbedArgs {
    pub async fn run(self) -> Result<()> {
        let (shard, shards) = (self.shard, self.shards);
        anyhow::ensure!(shards >= 1 && shard < shards, "shard {shard} is not in 0..{shards}");
        run(self.source, Shard::Of { shard, shards, plan: self.plan }, self.run).await
    }
}

/// What one run does: plan and carry out the whole source, or one shard of a plan.
enum Shard {
    Whole(DeletionGuard),
    Of { shard: u32, shards: u32, plan: Option<i64> },
}

async fn run(source: String, what: Shard, args: RunArgs) -> Result<()> {
    let DataPlaneArgs { backend, model, src, limits } = &args.data;
    let loaded = model.load()?;
    let index = backend.connect(loaded.id()).await?;
    let source = src.open(source)?;
    let (shard, shards, deletion) = match what {
        Shard::Whole(deletion) => (0, 1, deletion),
        Shard::Of { shard, shards, .. } => (shard, shards, DeletionGuard::default()),
    };
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
        progress_bar: matches!(what, Shard::Whole(_)),
        mixed_precision: model.allow_mixed_precision,
        deletion,
        owner: backend.owner.clone(),
        reconcile: args.reconcile,
    };
    let (backends, model) = (Backends { source, index }, Arc::new(loaded));
    let summary = match what {
        Shard::Whole(_) => sync(&backends, model, &opts).await,
        Shard::Of { plan, .. } => carry_out(&backends, model, &opts, plan).await,
    }
    .context("sync failed")?;
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
