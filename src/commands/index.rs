//! `imageindex index` (a whole bucket or folder, with a progress bar; or a new generation of the
//! index, built beside the serving one and swapped in), `imageindex embed` (one shard, in an
//! embedding Job's pod): the same sync.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};

use crate::bucket::Source;
use crate::config::DataPlaneArgs;
use crate::contract::env;
use crate::embed::Model;
use crate::index::{CaughtUp, Generations, SwapError};
use crate::store::{self, Generation};
use crate::sync::{self, Backends, DeletionGuard, RepairWhen, Summary, SyncOptions, carry_out, sync};

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
    generation: GenerationArgs,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(clap::Args)]
struct GenerationArgs {
    /// Build a new generation of the index for this model (or precision, or index type) while
    /// search keeps reading the current one, and move search to it in one step once it holds
    /// every object the current one holds. A build that stops is resumed by the next one.
    #[arg(long)]
    new_generation: bool,
    /// Seconds a retired generation is kept, so that search servers move off it, before it is
    /// dropped (by this run, or by the next `index` when this one is interrupted).
    #[arg(long, env = env::GENERATION_GRACE, default_value_t = 60)]
    grace: u64,
    /// Keep the retired generation instead of dropping it.
    #[arg(long, requires = "new_generation")]
    keep_old: bool,
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
    #[arg(long, alias = "reconcile", env = env::REPAIR, value_enum, default_value = "if-counts-differ")]
    repair: RepairWhen,
    /// Print the summary as JSON on stdout.
    #[arg(long)]
    json: bool,
}

impl IndexArgs {
    pub async fn run(self) -> Result<()> {
        let deletion = DeletionGuard { max_share: self.max_delete_percent / 100.0, allow: self.allow_mass_delete };
        let args = &self.run;
        let DataPlaneArgs { backend, model, src, .. } = &args.data;
        let model = Arc::new(model.load()?);
        let source = src.open(self.source.clone())?;
        let opts = args.options(0, 1, deletion, true);
        let gens = Generations::connect(&backend.milvus()?, backend.mysql_url()?.expose()).await?;
        let grace = Duration::from_secs(self.generation.grace);
        drop_retired(&gens, grace, &opts.owner).await?;
        if self.generation.new_generation {
            return rebuild(&gens, source, model, &opts, &self.generation).await;
        }
        let target = gens.target(model.id(), opts.mixed_precision).await?;
        let backends = Backends { source, index: gens.index(&target, model.id()) };
        let summary = sync(&backends, model, &opts).await.map_err(|e| match e {
            sync::Error::Store(store::Error::ModelMismatch(m)) => anyhow::Error::from(store::Error::ModelMismatch(m))
                .context(
                    "to move the index to this model without a gap in search, run `imageindex index --new-generation`",
                ),
            e => anyhow::Error::from(e),
        });
        args.finish(&summary.context("sync failed")?)
    }
}

/// Drops the generations retired more than `grace` ago (a run that waited out its grace period
/// was interrupted), not kept, and held by `owner`.
async fn drop_retired(gens: &Generations, grace: Duration, owner: &str) -> Result<()> {
    for g in gens.collect(grace, owner).await? {
        eprintln!(
            "dropped generation {} of {} ({}), retired since {:?}",
            g.number,
            gens.name(),
            g.collection,
            g.retired_at
        );
    }
    Ok(())
}

/// Rounds of syncing a new generation may take to catch up with objects added meanwhile.
const CATCH_UP_ROUNDS: u32 = 5;

/// Builds a new generation for `model` beside the serving one, moves search to it, and retires
/// the old one. A build that stops is recorded as failed with its reason; search stays where it was.
async fn rebuild(
    gens: &Generations,
    source: Source,
    model: Arc<Model>,
    opts: &SyncOptions,
    args: &GenerationArgs,
) -> Result<()> {
    let (serving, building) = gens.begin(model.id(), &opts.owner).await?;
    match &serving {
        Some(s) => eprintln!(
            "building generation {} of {} ({}) for {}; search stays on generation {} ({}) until it is complete",
            building.number,
            gens.name(),
            building.collection,
            model.id(),
            s.number,
            s.model.as_deref().unwrap_or("empty")
        ),
        None => eprintln!("building generation {} of {} for {}", building.number, gens.name(), model.id()),
    }
    let backends = Backends { source, index: gens.to_build(&building, model.id()) };
    let retired = match build(gens, serving.as_ref(), &building, &backends, model, opts, args.keep_old).await {
        Ok(retired) => retired,
        Err(e) => {
            // A swap cut short may have moved the alias: the next reader settles it, and the
            // build is not failed.
            if !matches!(e.downcast_ref::<SwapError>(), Some(SwapError::Moving(_)))
                && let Err(also) = gens.fail(&building, &format!("{e:#}")).await
            {
                tracing::warn!("recording the failed build: {also}");
            }
            return Err(e.context(format!("building generation {} (search stays where it was)", building.number)));
        }
    };
    eprintln!("search moved to generation {} ({})", building.number, building.collection);
    let Some(old) = retired else { return Ok(()) };
    if args.keep_old {
        eprintln!("kept generation {} ({}), retired", old.number, old.collection);
        return Ok(());
    }
    let grace = Duration::from_secs(args.grace);
    eprintln!(
        "generation {} ({}) is dropped in {grace:?}, once search servers have moved off it (if interrupted, the next \
         `imageindex index` drops it)",
        old.number, old.collection
    );
    tokio::time::sleep(grace).await;
    drop_retired(gens, grace, &opts.owner).await
}

/// Syncs the new generation until it holds every object the serving one holds, or the object is
/// gone from the bucket (deleted since the serving generation last synced), then moves search to
/// it; returns the generation it retired.
async fn build(
    gens: &Generations,
    serving: Option<&Generation>,
    building: &Generation,
    backends: &Backends,
    model: Arc<Model>,
    opts: &SyncOptions,
    keep_old: bool,
) -> Result<Option<Generation>> {
    // A command on a terminal: each step takes as long as it takes (interrupted with ^C).
    let no_limit = Duration::MAX;
    let mut round = 0;
    loop {
        round += 1;
        let summary = sync(backends, model.clone(), opts).await?;
        print_summary(&summary);
        let caught_up =
            gens.swap_when_caught_up(serving, building, &backends.index, &backends.source, keep_old, no_limit);
        match caught_up.await? {
            CaughtUp::Swapped(retired) => return Ok(retired),
            CaughtUp::Missing(arrived) if round < CATCH_UP_ROUNDS => {
                eprintln!("{arrived} objects arrived during the build; syncing again");
            }
            CaughtUp::Missing(arrived) => anyhow::bail!(
                "{arrived} objects of the serving generation are still missing after {round} rounds: the bucket \
                 changes faster than the build catches up"
            ),
        }
    }
}

impl EmbedArgs {
    pub async fn run(self) -> Result<()> {
        let (shard, shards) = (self.shard, self.shards);
        anyhow::ensure!(shards >= 1 && shard < shards, "shard {shard} is not in 0..{shards}");
        let args = &self.run;
        let DataPlaneArgs { backend, model, src, .. } = &args.data;
        let model = Arc::new(model.load()?);
        // The generation the plan was made for (a new one, while the index is rebuilt for this
        // model); without a plan, the one this model's vectors go to.
        let gens = Generations::connect(&backend.milvus()?, backend.mysql_url()?.expose()).await?;
        let planned = match self.plan {
            Some(plan) => gens.of_plan(plan).await?,
            None => None,
        };
        let generation = match planned {
            Some(g) => g,
            None => gens.target(model.id(), args.data.model.allow_mixed_precision).await?,
        };
        let index = gens.index(&generation, model.id());
        let backends = Backends { source: src.open(self.source.clone())?, index };
        let opts = args.options(shard, shards, DeletionGuard::default(), false);
        let summary = carry_out(&backends, model, &opts, self.plan).await.context("sync failed")?;
        args.finish(&summary)
    }
}

impl RunArgs {
    fn options(&self, shard: u32, shards: u32, deletion: DeletionGuard, progress_bar: bool) -> SyncOptions {
        let DataPlaneArgs { backend, model, limits, .. } = &self.data;
        SyncOptions {
            shard,
            shards,
            batch_size: self.batch_size,
            fetch_concurrency: self.fetch_concurrency,
            decode_workers: self.decode_workers,
            limits: limits.decode(),
            max_object_bytes: limits.max_object_bytes,
            decode_memory: limits.decode_memory_mib << 20,
            fetch_memory: SyncOptions::default().fetch_memory,
            progress_bar,
            mixed_precision: model.allow_mixed_precision,
            deletion,
            owner: backend.owner.clone(),
            repair: self.repair,
        }
    }

    fn finish(&self, summary: &Summary) -> Result<()> {
        if self.json {
            println!("{}", serde_json::to_string_pretty(summary)?);
        } else {
            print_summary(summary);
        }
        Ok(())
    }
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
    if s.stale > 0 {
        eprintln!(
            "  {} of the {} changed objects could not be read (the bucket refused or failed the GET): search keeps \
             their older versions, and the next run tries again. Many at once usually means the bucket's \
             credentials, policy or encryption keys changed.",
            s.stale, s.changed
        );
    }
    if s.held > 0 {
        eprintln!(
            "  {} deletions the listing implies are held back: too many objects could not be read when last \
             tried for the listing to prove anything gone. They are made once the objects can be read again, \
             or with --allow-mass-delete.",
            s.held
        );
    }
    if s.too_long > 0 {
        eprintln!(
            "  {} objects were left out: their keys are longer than the {} bytes the catalog holds (no supported \
             store makes such keys)",
            s.too_long,
            crate::store::MAX_KEY_BYTES
        );
    }
    if s.collided > 0 {
        eprintln!(
            "  {} new objects were left out: another key holds their id (a 63-bit hash collision of the keys). \
             Rename one of each pair; the failures below say which.",
            s.collided
        );
    }
    for (key, err) in &s.failures {
        eprintln!("  failed {key}: {err}");
    }
}
