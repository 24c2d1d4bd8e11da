//! The operator's short data-plane tasks, each run as a Job in the ImageIndex's namespace with the
//! credentials its pods get (the controller holds none):
//!
//! - `imageindex plan`: the collection made or checked and the catalog migrated, then the bucket
//!   listed once and diffed against the catalog, its work recorded for the embedding shards, and
//!   the catalog's counts. What it finds decides whether an embedding Job runs at all.
//! - `imageindex cleanup`: on deletion, drop the collection and its catalog rows (`Delete`, and
//!   only if the catalog shows they are this index's), or let go of the claim (`Retain`).
//!
//! Each writes a `Report` to `--report` (the pod's termination message) and stdout, and exits 0
//! when it did its part, `contract::EXIT_CONFIG` when the spec cannot work, 1 when a backend failed.

use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;

use super::plan::DeletionGuard;
use super::{Error, Reconcile, planner};
use crate::config::{BackendArgs, SourceArgs};
use crate::contract::env;
use crate::contract::report::{GenerationReport, GenerationsReport, Report, Stop};
use crate::core::{ModelId, Precision, Preprocess};
use crate::embed::describe_file;
use crate::index::{self, CaughtUp, ChooseError, Chosen, Generations, SwapError};
use crate::store::{self, Catalog, Generation, VectorStore};

#[derive(clap::Args)]
pub struct PlanArgs {
    /// `s3://bucket/prefix/`, `gs://bucket/prefix/`, `az://container/prefix/`, `file:///path` or a
    /// local folder.
    #[arg(long, env = env::SOURCE)]
    source: String,
    #[command(flatten)]
    backend: BackendArgs,
    #[command(flatten)]
    src: SourceArgs,
    /// The embedding Jobs' model file: its metadata and output shape say which vectors the
    /// collection is for (it is read, not loaded: the weights are skipped).
    #[arg(long, env = env::MODEL)]
    model: PathBuf,
    #[arg(long, env = env::PRECISION, value_enum, default_value = "fp32")]
    precision: Precision,
    /// The model's preprocessing where its file does not record it (see `imageindex index`).
    #[arg(long, env = env::PREPROCESS)]
    preprocess: Option<Preprocess>,
    /// Most of the catalog one run may delete, in percent (see `imageindex embed`).
    #[arg(long, env = env::MAX_DELETE_PERCENT, default_value_t = 10.0)]
    max_delete_percent: f64,
    #[arg(long, env = env::ALLOW_MASS_DELETE)]
    allow_mass_delete: bool,
    /// Seconds a retired generation is kept, for search pods to move off it, before a plan
    /// drops it (see `index --new-generation`).
    #[arg(long, env = env::GENERATION_GRACE, default_value_t = 60)]
    grace: u64,
    /// Keep retired generations instead of dropping them.
    #[arg(long, env = env::GENERATION_KEEP)]
    keep_generations: bool,
    #[command(flatten)]
    out: Out,
}

#[derive(clap::Args)]
pub struct CleanupArgs {
    #[command(flatten)]
    backend: BackendArgs,
    /// Keep everything and only let go of the claim (`deletionPolicy: Retain`).
    #[arg(long)]
    retain: bool,
    /// Milvus is gone (its Milvus resource deleted): drop only the catalog rows.
    #[arg(long)]
    catalog_only: bool,
    #[command(flatten)]
    out: Out,
}

#[derive(clap::Args)]
struct Out {
    /// Also write the report here (in a pod: its termination message, `/dev/termination-log`).
    #[arg(long, env = env::REPORT)]
    report: Option<PathBuf>,
    /// Seconds allowed for each Milvus and MySQL call.
    #[arg(long, env = env::IO_TIMEOUT, default_value_t = 30)]
    io_timeout: u64,
}

impl Out {
    /// Writes the report, and gives the exit status it implies.
    fn finish(&self, report: Report) -> Result<()> {
        let json = report.to_json();
        println!("{json}");
        if let Some(path) = &self.report {
            std::fs::write(path, &json)?;
        }
        match report {
            Report::Stopped { at, message } if at.is_config() => Err(Stopped(at, message).into()),
            Report::Stopped { at, message } => Err(anyhow::anyhow!("{at:?}: {message}")),
            _ => Ok(()),
        }
    }

    async fn within<T>(&self, f: impl Future<Output = store::Result<T>>) -> Result<T, String> {
        let limit = Duration::from_secs(self.io_timeout);
        match tokio::time::timeout(limit, f).await {
            Ok(r) => r.map_err(|e| e.to_string()),
            Err(_) => Err(format!("no answer in {limit:?}")),
        }
    }
}

/// A configuration error a plan stopped at (exit `contract::EXIT_CONFIG`).
#[derive(Debug, thiserror::Error)]
#[error("{0:?}: {1}")]
pub struct Stopped(pub Stop, pub String);

impl PlanArgs {
    pub async fn run(self) -> Result<()> {
        let report = self.plan().await;
        self.out.finish(report)
    }

    /// The vectors the embedding Jobs will make, read from the model file they will load (its
    /// precision's variant): which model, precision and preprocessing, and their width.
    fn describe_model(&self) -> Result<(ModelId, usize), String> {
        describe_file(&self.model, self.precision, self.preprocess)
    }

    async fn plan(&self) -> Report {
        let out = &self.out;
        let (model, width) = match self.describe_model() {
            Ok(described) => described,
            Err(e) => return Report::stopped(Stop::ModelUnusable, e),
        };
        let milvus = match self.backend.milvus() {
            Ok(m) => m,
            Err(e) => return Report::stopped(Stop::MilvusUnavailable, format!("{e:#}")),
        };
        let vectors = match out.within(VectorStore::connect(&milvus)).await {
            Ok(v) => v,
            Err(e) => return Report::stopped(Stop::MilvusUnavailable, format!("{}: {e}", milvus.url)),
        };
        let model_name = model.to_string();
        let mysql_url = match self.backend.mysql_url() {
            Ok(u) => u,
            Err(e) => return Report::stopped(Stop::MysqlUnavailable, format!("{e:#}")),
        };
        let catalog = Catalog::connect(mysql_url.expose(), &milvus.collection, &model_name);
        let catalog = match out.within(catalog).await {
            Ok(c) => c,
            Err(e) => return Report::stopped(Stop::MysqlUnavailable, e),
        };
        let gens = Generations::new(&vectors, &catalog, &milvus.collection);
        if !self.keep_generations {
            match out.within(gens.collect(Duration::from_secs(self.grace), &self.backend.owner)).await {
                Ok(dropped) => {
                    for g in dropped {
                        tracing::info!(
                            "dropped generation {} ({}), retired since {:?}",
                            g.number,
                            g.collection,
                            g.retired_at
                        );
                    }
                }
                // Tried again by the next plan; nothing serves from them.
                Err(e) => tracing::warn!("dropping retired generations: {e}"),
            }
        }
        let limit = Duration::from_secs(out.io_timeout);
        let Chosen { serving, building, index } = match gens.choose(&model, width, &self.backend.owner, limit).await {
            Ok(chosen) => chosen,
            Err(e) => return Report::stopped(stop_of(&e), e),
        };
        // Milvus and the catalog agreeing first, so that the plan embeds what lost its vector.
        let repaired = tokio::time::timeout(limit, planner::repair(&index, Reconcile::IfCountsDiffer)).await;
        match repaired {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                return Report::stopped(Stop::MilvusUnavailable, format!("comparing Milvus and the catalog: {e}"));
            }
            Err(_) => return Report::stopped(Stop::MilvusUnavailable, format!("no answer in {limit:?}")),
        }
        // The listing is bounded by the Job's deadline, not by a call limit: a large bucket takes
        // as long as it takes.
        let source = match self.src.open(self.source.clone()) {
            Ok(source) => source,
            Err(e) => return Report::stopped(Stop::SourceUnavailable, format!("listing {}: {e}", self.source)),
        };
        let guard = DeletionGuard { max_share: self.max_delete_percent / 100.0, allow: self.allow_mass_delete };
        let planned = match planner::plan(&source, &index, guard).await {
            Ok(p) => p,
            Err(Error::Listing(e)) => {
                return Report::stopped(Stop::SourceUnavailable, format!("listing {}: {e}", self.source));
            }
            Err(e) => return Report::stopped(Stop::MysqlUnavailable, e),
        };
        let c = planned.record.counts;
        let refused = planned.refused.map(|r| r.to_string());
        let (mut serving, mut building, mut swapped) = (serving, building, false);
        // A new generation with nothing left to do takes over once it holds all the serving one holds.
        if let (Some(s), Some(b)) = (&serving, &building)
            && c.pending() == 0
            && refused.is_none()
        {
            match gens.swap_when_caught_up(Some(s), b, &index, &source, self.keep_generations, limit).await {
                // Arrived since the listing: the next plan has them.
                Ok(CaughtUp::Missing(_)) => {}
                Ok(CaughtUp::Swapped(_)) => (serving, building, swapped) = (Some(b.clone()), None, true),
                Err(e @ SwapError::Comparing(_)) => return Report::stopped(Stop::SourceUnavailable, e),
                Err(e) => return Report::stopped(Stop::MilvusUnavailable, e),
            }
        }
        let describe = |g: Generation| {
            let index = gens.index(&g, &model);
            async move {
                let counts = index.catalog.counts().await?;
                let model = g.model.or_else(|| Some(index.catalog.model().to_string()));
                let (indexed, failed, stale) = (counts.indexed, counts.failed, counts.stale);
                Ok::<_, store::Error>(GenerationReport {
                    number: g.number,
                    collection: g.collection,
                    model,
                    indexed,
                    failed,
                    stale,
                })
            }
        };
        let serving_report = match &serving {
            Some(s) => match out.within(describe(s.clone())).await {
                Ok(r) => Some(r),
                Err(e) => return Report::stopped(Stop::MysqlUnavailable, e),
            },
            None => None,
        };
        let building_report = match building {
            Some(b) => match out.within(describe(b)).await {
                Ok(r) => Some(r),
                Err(e) => return Report::stopped(Stop::MysqlUnavailable, e),
            },
            None => None,
        };
        // What search has: the serving generation's counts (the plain collection's, before any).
        let (indexed, failed, stale) = match &serving_report {
            Some(s) => (s.indexed, s.failed, s.stale),
            None => match out.within(index.catalog.counts()).await {
                Ok(c) => (c.indexed, c.failed, c.stale),
                Err(e) => return Report::stopped(Stop::MysqlUnavailable, e),
            },
        };
        let plain = serving.as_ref().is_none_or(|s| s.is_plain(gens.name()));
        let generations = (!plain || building_report.is_some()).then_some(GenerationsReport {
            serving: serving_report,
            building: building_report,
            swapped,
        });
        Report::Planned {
            plan: Some(planned.record.id),
            discovered: c.discovered,
            pending: c.pending(),
            refused,
            indexed,
            failed,
            stale,
            held: c.held,
            generations,
        }
    }
}

/// Where choosing the generation stopped.
fn stop_of(e: &ChooseError) -> Stop {
    match e {
        ChooseError::Alias(_) => Stop::MilvusUnavailable,
        ChooseError::Ensure(e) | ChooseError::Begin(e) => match e {
            store::Error::ModelMismatch(_) => Stop::ModelMismatch,
            store::Error::IndexMismatch(_) => Stop::IndexMismatch,
            store::Error::Claimed(_) => Stop::Claimed,
            _ => Stop::CollectionUnavailable,
        },
    }
}

impl CleanupArgs {
    pub async fn run(self) -> Result<()> {
        let report = self.cleanup().await;
        self.out.finish(report)
    }

    async fn cleanup(&self) -> Report {
        let out = &self.out;
        let milvus = match self.backend.milvus() {
            Ok(m) => m,
            Err(e) => return Report::stopped(Stop::MilvusUnavailable, format!("{e:#}")),
        };
        let mysql_url = match self.backend.mysql_url() {
            Ok(u) => u,
            Err(e) => return Report::stopped(Stop::MysqlUnavailable, format!("{e:#}")),
        };
        let (collection, owner) = (&milvus.collection, &self.backend.owner);
        let catalog = match out.within(Catalog::connect(mysql_url.expose(), collection, "")).await {
            Ok(c) => c,
            Err(e) => return Report::stopped(Stop::MysqlUnavailable, e),
        };
        // The claim is the serving generation's (the name's own before there were generations).
        let catalog = match out.within(catalog.serving_catalog(collection)).await {
            Ok(key) => catalog.scoped(&key, ""),
            Err(e) => return Report::stopped(Stop::MysqlUnavailable, e),
        };
        if self.retain {
            return match out.within(catalog.release(owner)).await {
                Ok(()) => Report::Released,
                Err(e) => Report::stopped(Stop::MysqlUnavailable, e),
            };
        }
        // The catalog says whose the collection is: nothing is dropped that another index holds,
        // or that cannot be shown to be this one's.
        match out.within(catalog.owner()).await {
            Ok(Some(held)) if &held == owner => {}
            Ok(Some(other)) => return Report::Kept { why: format!("it belongs to {other}") },
            Ok(None) => {
                return Report::Kept { why: "it cannot be shown to be this index's (no owner recorded)".into() };
            }
            Err(e) => return Report::stopped(Stop::MysqlUnavailable, e),
        }
        if !self.catalog_only {
            // Every generation, the alias, and their catalog rows.
            let dropped =
                out.within(async { Generations::connect(&milvus, mysql_url.expose()).await?.drop_all(owner).await });
            return match dropped.await {
                Ok(()) => Report::Dropped,
                Err(e) => Report::stopped(Stop::MilvusUnavailable, format!("dropping {collection}: {e}")),
            };
        }
        match out.within(index::generations::forget_all(&catalog, collection, owner)).await {
            Ok(()) => Report::Dropped,
            Err(e) => Report::stopped(Stop::MysqlUnavailable, e),
        }
    }
}
