//! The imageindex binary: one program, a subcommand per role.
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

use imageindex::config::{BackendArgs, LimitArgs, ModelArgs, SourceArgs};
use imageindex::embed::DecodeLimits;
use imageindex::embed::worker::{Backends, Summary, SyncOptions, sync};
use imageindex::serve::{AppState, ServeOptions};
use imageindex::store::{Source, SourceConfig};

#[derive(Parser)]
#[command(name = "imageindex", version, about = "Turn a bucket of images into a reverse-image-search service")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Index a whole bucket or folder in one process: list, diff, delete, embed, upsert.
    Index {
        /// `s3://bucket/prefix/`, `file:///path` or a local folder.
        source: String,
        #[command(flatten)]
        run: RunArgs,
    },
    /// The embedding Job's work: the same sync, for one shard of the listing.
    Embed {
        /// `s3://bucket/prefix/`, `file:///path` or a local folder.
        #[arg(long, env = "IMAGEINDEX_SOURCE")]
        source: String,
        /// This pod's shard (an Indexed Job sets JOB_COMPLETION_INDEX).
        #[arg(long, env = "JOB_COMPLETION_INDEX", default_value_t = 0)]
        shard: u32,
        #[arg(long, env = "IMAGEINDEX_SHARDS", default_value_t = 1)]
        shards: u32,
        #[command(flatten)]
        run: RunArgs,
    },
    /// The search server.
    Serve {
        #[arg(long, env = "IMAGEINDEX_LISTEN", default_value = "127.0.0.1:8080")]
        listen: SocketAddr,
        /// Largest upload accepted (bytes).
        #[arg(long, env = "IMAGEINDEX_MAX_UPLOAD_BYTES", default_value_t = 20 << 20)]
        max_upload_bytes: usize,
        #[command(flatten)]
        backend: BackendArgs,
        #[command(flatten)]
        model: ModelArgs,
        #[command(flatten)]
        limits: LimitArgs,
    },
}

#[derive(clap::Args)]
struct RunArgs {
    #[command(flatten)]
    backend: BackendArgs,
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    src: SourceArgs,
    #[command(flatten)]
    limits: LimitArgs,
    /// Images per model call.
    #[arg(long, env = "IMAGEINDEX_BATCH_SIZE", default_value_t = 16)]
    batch_size: usize,
    /// Objects fetched concurrently.
    #[arg(long, env = "IMAGEINDEX_FETCH_CONCURRENCY", default_value_t = 16)]
    fetch_concurrency: usize,
    /// Images decoded concurrently; 0 = the cores this process may use.
    #[arg(long, env = "IMAGEINDEX_DECODE_WORKERS", default_value_t = 0)]
    decode_workers: usize,
    /// Print the summary as JSON on stdout.
    #[arg(long)]
    json: bool,
}

#[tokio::main]
async fn main() -> Result<()> {
    imageindex::telemetry::init();
    match Cli::parse().command {
        Command::Index { source, run } => run_sync(source, 0, 1, run, true).await,
        Command::Embed { source, shard, shards, run } => {
            anyhow::ensure!(shards >= 1 && shard < shards, "shard {shard} is not in 0..{shards}");
            run_sync(source, shard, shards, run, false).await
        }
        Command::Serve { listen, max_upload_bytes, backend, model, limits } => {
            let loaded = model.load()?;
            let (vectors, catalog) = backend.connect(&model.name()).await?;
            vectors.ensure_collection(loaded.dim()).await?;
            let state = AppState {
                model: Arc::new(Mutex::new(loaded)),
                vectors,
                catalog,
                limits: DecodeLimits { max_pixels: limits.max_pixels },
            };
            eprintln!("search API on http://{listen}  (POST /img/search, GET /img/count)");
            imageindex::serve::serve(listen, Arc::new(state), ServeOptions { max_upload_bytes }).await
        }
    }
}

async fn run_sync(source: String, shard: u32, shards: u32, run: RunArgs, progress_bar: bool) -> Result<()> {
    let model = run.model.load()?;
    let (vectors, catalog) = run.backend.connect(&run.model.name()).await?;
    let source = Source::open(&SourceConfig { url: source, endpoint: run.src.s3_endpoint, include: run.src.include })?;
    let opts = SyncOptions {
        shard,
        shards,
        batch_size: run.batch_size,
        fetch_concurrency: run.fetch_concurrency,
        decode_workers: run.decode_workers,
        limits: DecodeLimits { max_pixels: run.limits.max_pixels },
        max_object_bytes: run.limits.max_object_bytes,
        progress_bar,
    };
    let backends = Backends { source, vectors, catalog };
    let summary = sync(&backends, Arc::new(Mutex::new(model)), &opts).await.context("sync failed")?;
    if run.json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        print_summary(&summary);
    }
    Ok(())
}

fn print_summary(s: &Summary) {
    eprintln!(
        "discovered {} | new {} changed {} unchanged {} deleted {} | indexed {} failed {} | {:.1} images/s | {} vectors in the collection",
        s.discovered,
        s.new,
        s.changed,
        s.unchanged,
        s.deleted,
        s.indexed,
        s.failed,
        s.images_per_second(),
        s.vectors
    );
    for (key, err) in &s.failures {
        eprintln!("  failed {key}: {err}");
    }
}
