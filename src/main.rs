//! The imageindex binary: one program, a subcommand per role.
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

use imageindex::config::{BackendArgs, LimitArgs, ModelArgs, SourceArgs};
use imageindex::embed::worker::{Backends, Summary, SyncOptions, sync};
use imageindex::serve::{AppState, ServeConfig};
use imageindex::store::{Source, SourceConfig, ensure_collection};

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
    /// The search server: HTTP API and a web page.
    Serve {
        #[arg(long, env = "IMAGEINDEX_LISTEN", default_value = "127.0.0.1:8080")]
        listen: SocketAddr,
        /// The bucket or folder the index was built from: needed to serve images, take uploads and delete.
        #[arg(long, env = "IMAGEINDEX_SOURCE")]
        source: Option<String>,
        /// Largest request body, and largest image fetched by URL (bytes).
        #[arg(long, env = "IMAGEINDEX_MAX_UPLOAD_BYTES", default_value_t = 20 << 20)]
        max_upload_bytes: usize,
        /// Whole-request deadline in seconds.
        #[arg(long, env = "IMAGEINDEX_REQUEST_TIMEOUT", default_value_t = 30)]
        request_timeout: u64,
        /// Images embedded at once; more get 503 + Retry-After. 0 = twice the cores.
        #[arg(long, env = "IMAGEINDEX_MAX_CONCURRENT_EMBEDDINGS", default_value_t = 0)]
        max_concurrent_embeddings: usize,
        /// File holding the bearer token for upload, delete and drop (a mounted Secret).
        #[arg(long, env = "IMAGEINDEX_TOKEN_FILE")]
        token_file: Option<std::path::PathBuf>,
        /// The token itself (prefer --token-file). Without a token the mutating routes are disabled.
        #[arg(long, env = "IMAGEINDEX_TOKEN", hide_env_values = true)]
        token: Option<String>,
        /// Require the token for search, count, progress and images too.
        #[arg(long, env = "IMAGEINDEX_PROTECT_SEARCH")]
        protect_search: bool,
        /// Enable POST /img/drop (drops the collection and the catalog).
        #[arg(long, env = "IMAGEINDEX_ALLOW_DROP")]
        allow_drop: bool,
        /// Let {"url": ...} queries fetch from loopback and private addresses.
        #[arg(long, env = "IMAGEINDEX_ALLOW_PRIVATE_URLS")]
        allow_private_urls: bool,
        #[command(flatten)]
        backend: BackendArgs,
        #[command(flatten)]
        model: ModelArgs,
        #[command(flatten)]
        src: SourceArgs,
        #[command(flatten)]
        limits: LimitArgs,
    },
    /// The operator: reconcile ImageIndex resources (in a cluster, or against a kubeconfig).
    Controller {
        /// Image for embedding Jobs and search pods when an ImageIndex names none.
        #[arg(long, env = "IMAGEINDEX_IMAGE", default_value = concat!("ghcr.io/imageindex/imageindex:", env!("CARGO_PKG_VERSION")))]
        image: String,
        /// Watch only this namespace (default: all).
        #[arg(long, env = "IMAGEINDEX_WATCH_NAMESPACE")]
        namespace: Option<String>,
        /// Address for /metrics, /healthz and /readyz.
        #[arg(long, env = "IMAGEINDEX_METRICS_LISTEN", default_value = "127.0.0.1:8081")]
        metrics_listen: SocketAddr,
        /// Namespace of the leader-election Lease (in a pod: its own namespace).
        #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
        lease_namespace: String,
        #[arg(long, env = "IMAGEINDEX_LEASE_NAME", default_value = "imageindex-controller")]
        lease_name: String,
        /// Run without leader election (only ever one replica).
        #[arg(long)]
        no_leader_election: bool,
        /// This replica's name in the Lease (in a pod: its name).
        #[arg(long, env = "POD_NAME")]
        identity: Option<String>,
        /// Seconds allowed for each Milvus and MySQL call the controller makes.
        #[arg(long, env = "IMAGEINDEX_IO_TIMEOUT", default_value_t = 10)]
        io_timeout: u64,
        /// Seconds allowed for listing a bucket and diffing it against the catalog.
        #[arg(long, env = "IMAGEINDEX_LIST_TIMEOUT", default_value_t = 300)]
        list_timeout: u64,
    },
    /// Print the ImageIndex CustomResourceDefinition (YAML), generated from the Rust types.
    Crd,
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
    imageindex::install_crypto();
    match Cli::parse().command {
        Command::Controller {
            image,
            namespace,
            metrics_listen,
            lease_namespace,
            lease_name,
            no_leader_election,
            identity,
            io_timeout,
            list_timeout,
        } => {
            use imageindex::controller::{self, ControllerConfig, Settings};
            let client =
                kube::Client::try_default().await.context("connecting to Kubernetes (in-cluster or kubeconfig)")?;
            let indexed_jobs = controller::indexed_jobs_supported(&client).await;
            let identity = identity.unwrap_or_else(|| {
                std::fs::read_to_string("/etc/hostname")
                    .map(|h| h.trim().to_string())
                    .unwrap_or_else(|_| format!("imageindex-{}", std::process::id()))
            });
            let config = ControllerConfig {
                settings: Settings {
                    default_image: image,
                    indexed_jobs,
                    io_timeout: Duration::from_secs(io_timeout),
                    list_timeout: Duration::from_secs(list_timeout),
                },
                namespace,
                listen: metrics_listen,
                lease: (!no_leader_election).then_some((lease_namespace, lease_name)),
                identity,
            };
            controller::run(client, config).await
        }
        Command::Crd => {
            print!("{}", imageindex::crd::crd_yaml());
            Ok(())
        }
        Command::Index { source, run } => run_sync(source, 0, 1, run, true).await,
        Command::Embed { source, shard, shards, run } => {
            anyhow::ensure!(shards >= 1 && shard < shards, "shard {shard} is not in 0..{shards}");
            run_sync(source, shard, shards, run, false).await
        }
        Command::Serve {
            listen,
            source,
            max_upload_bytes,
            request_timeout,
            max_concurrent_embeddings,
            token_file,
            token,
            protect_search,
            allow_drop,
            allow_private_urls,
            backend,
            model,
            src,
            limits,
        } => {
            let token = match token_file {
                Some(f) => Some(
                    std::fs::read_to_string(&f)
                        .with_context(|| format!("reading the token file {}", f.display()))?
                        .trim()
                        .to_string(),
                ),
                None => token,
            };
            let loaded = model.load()?;
            let (vectors, catalog) = backend.connect(loaded.id()).await?;
            ensure_collection(&vectors, &catalog, loaded.dim(), loaded.id(), model.allow_mixed_precision).await?;
            let source = source
                .map(|url| {
                    Source::open(&SourceConfig {
                        url,
                        endpoint: src.s3_endpoint,
                        include: src.include,
                        credentials: None,
                    })
                })
                .transpose()?;
            let defaults = ServeConfig::default();
            let config = ServeConfig {
                max_upload_bytes,
                limits: limits.decode(),
                request_timeout: Duration::from_secs(request_timeout),
                max_concurrent_embeddings: match max_concurrent_embeddings {
                    0 => defaults.max_concurrent_embeddings,
                    n => n,
                },
                token,
                protect_search,
                allow_drop,
                allow_private_urls,
            };
            let state = AppState::new(Arc::new(loaded), vectors, catalog, source, config);
            eprintln!("search on http://{listen}/  (API: POST /img/search, GET /img/count, GET /progress)");
            imageindex::serve::serve(listen, Arc::new(state)).await
        }
    }
}

async fn run_sync(source: String, shard: u32, shards: u32, run: RunArgs, progress_bar: bool) -> Result<()> {
    let model = run.model.load()?;
    let (vectors, catalog) = run.backend.connect(model.id()).await?;
    let source = Source::open(&SourceConfig {
        url: source,
        endpoint: run.src.s3_endpoint,
        include: run.src.include,
        credentials: None,
    })?;
    let opts = SyncOptions {
        shard,
        shards,
        batch_size: run.batch_size,
        fetch_concurrency: run.fetch_concurrency,
        decode_workers: run.decode_workers,
        limits: run.limits.decode(),
        max_object_bytes: run.limits.max_object_bytes,
        progress_bar,
        mixed_precision: run.model.allow_mixed_precision,
    };
    let backends = Backends { source, vectors, catalog };
    let summary = sync(&backends, Arc::new(model), &opts).await.context("sync failed")?;
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
