//! `imageindex plan`, the operator's Job before any embedding: the collection made or checked
//! (or a new generation begun, when the spec's model changed) and the catalog migrated, then the
//! bucket listed once and diffed against the catalog, its work recorded for the embedding shards,
//! a caught-up generation swapped in, and the counts. What it finds decides whether an embedding
//! Job runs at all. `PlanArgs::plan` reads as its steps; each stops the Job with where and why.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;

use super::{Out, Stopped};
use crate::bucket::Source;
use crate::config::{BackendArgs, SourceArgs};
use crate::contract::env;
use crate::contract::report::{GenerationReport, GenerationsReport, Report, Stop};
use crate::core::{ModelId, Precision, Preprocess};
use crate::embed::describe_file;
use crate::index::{CaughtUp, ChooseError, Chosen, Generations, Index, SwapError};
use crate::store::{self, Catalog, Generation, VectorStore};
use crate::sync::{self, DeletionGuard, Planned, RepairWhen, planner};

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

impl PlanArgs {
    pub async fn run(self) -> Result<()> {
        let report = match self.plan().await {
            Ok(report) => report,
            Err(Stopped(at, message)) => Report::stopped(at, message),
        };
        self.out.finish(report)
    }

    async fn plan(&self) -> Result<Report, Stopped> {
        let (model, width) = self.describe_model()?;
        let gens = self.connect(&model).await?;
        if !self.keep_generations {
            self.collect_retired(&gens).await;
        }
        let Chosen { serving, building, index } =
            gens.choose(&model, width, &self.backend.owner, self.out.limit()).await.map_err(|e| {
                let at = stop_of(&e);
                Stopped(at, e.to_string())
            })?;
        self.repair(&index).await?;
        let (source, planned) = self.list(&index).await?;
        let refused = planned.refused.map(|r| r.to_string());
        let caught_up = planned.record.counts.pending() == 0 && refused.is_none();
        let (serving, building, swapped) = match (serving, building) {
            // A new generation with nothing left to do takes over once it holds all the serving one holds.
            (Some(s), Some(b)) if caught_up => match self.swap(&gens, &s, &b, &index, &source).await? {
                true => (Some(b), None, true),
                false => (Some(s), Some(b), false),
            },
            (serving, building) => (serving, building, false),
        };
        let serving_report = self.describe(&gens, &model, serving.clone()).await?;
        let building_report = self.describe(&gens, &model, building).await?;
        // What search has: the serving generation's counts (the plain collection's, before any).
        let (indexed, failed, stale) = match &serving_report {
            Some(s) => (s.indexed, s.failed, s.stale),
            None => {
                let c = self.out.within(index.catalog.counts()).await.map_err(stop(Stop::MysqlUnavailable))?;
                (c.indexed, c.failed, c.stale)
            }
        };
        let plain = serving.as_ref().is_none_or(|s| s.is_plain(gens.name()));
        let generations = (!plain || building_report.is_some()).then_some(GenerationsReport {
            serving: serving_report,
            building: building_report,
            swapped,
        });
        let c = planned.record.counts;
        Ok(Report::Planned {
            plan: Some(planned.record.id),
            discovered: c.discovered,
            pending: c.pending(),
            refused,
            indexed,
            failed,
            stale,
            held: c.held,
            generations,
        })
    }

    /// The vectors the embedding Jobs will make, read from the model file they will load (its
    /// precision's variant): which model, precision and preprocessing, and their width.
    fn describe_model(&self) -> Result<(ModelId, usize), Stopped> {
        describe_file(&self.model, self.precision, self.preprocess).map_err(stop(Stop::ModelUnusable))
    }

    /// The index's generations, on Milvus and the catalog (its migrations applied), for `model`.
    async fn connect(&self, model: &ModelId) -> Result<Generations, Stopped> {
        let out = &self.out;
        let milvus = self.backend.milvus().map_err(|e| Stopped(Stop::MilvusUnavailable, format!("{e:#}")))?;
        let vectors = out
            .within(VectorStore::connect(&milvus))
            .await
            .map_err(|e| Stopped(Stop::MilvusUnavailable, format!("{}: {e}", milvus.url)))?;
        let mysql_url = self.backend.mysql_url().map_err(|e| Stopped(Stop::MysqlUnavailable, format!("{e:#}")))?;
        let model = model.to_string();
        let catalog = out.within(Catalog::connect(mysql_url.expose(), &milvus.collection, &model));
        let catalog = catalog.await.map_err(stop(Stop::MysqlUnavailable))?;
        Ok(Generations::new(&vectors, &catalog, &milvus.collection))
    }

    /// Drops the retired generations whose grace is over; one that fails is tried again by the
    /// next plan (nothing serves from it).
    async fn collect_retired(&self, gens: &Generations) {
        match self.out.within(gens.collect(Duration::from_secs(self.grace), &self.backend.owner)).await {
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
            Err(e) => tracing::warn!("dropping retired generations: {e}"),
        }
    }

    /// Milvus and the catalog made to agree first, so that the plan embeds what lost its vector.
    async fn repair(&self, index: &Index) -> Result<(), Stopped> {
        let limit = self.out.limit();
        match tokio::time::timeout(limit, planner::repair(index, RepairWhen::IfCountsDiffer)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(Stopped(Stop::MilvusUnavailable, format!("comparing Milvus and the catalog: {e}"))),
            Err(_) => Err(Stopped(Stop::MilvusUnavailable, format!("no answer in {limit:?}"))),
        }
    }

    /// The bucket listed once and diffed against the catalog of `index`, the work recorded. Bounded
    /// by the Job's deadline, not by a call limit: a large bucket takes as long as it takes.
    async fn list(&self, index: &Index) -> Result<(Source, Planned), Stopped> {
        let listing = |e| Stopped(Stop::SourceUnavailable, format!("listing {}: {e}", self.source));
        let source = self.src.open(self.source.clone()).map_err(|e| listing(e.to_string()))?;
        let guard = DeletionGuard { max_share: self.max_delete_percent / 100.0, allow: self.allow_mass_delete };
        match planner::plan(&source, index, guard).await {
            Ok(planned) => Ok((source, planned)),
            Err(sync::Error::Listing(e)) => Err(listing(e.to_string())),
            Err(e) => Err(Stopped(Stop::MysqlUnavailable, e.to_string())),
        }
    }

    /// Moves search to `building` when it holds every object `serving` holds that the bucket
    /// still has (kept when asked); says whether it moved. Objects that arrived since the
    /// listing are the next plan's.
    async fn swap(
        &self,
        gens: &Generations,
        serving: &Generation,
        building: &Generation,
        index: &Index,
        source: &Source,
    ) -> Result<bool, Stopped> {
        let limit = self.out.limit();
        match gens.swap_when_caught_up(Some(serving), building, index, source, self.keep_generations, limit).await {
            Ok(CaughtUp::Missing(_)) => Ok(false),
            Ok(CaughtUp::Swapped(_)) => Ok(true),
            Err(e @ SwapError::Comparing(_)) => Err(Stopped(Stop::SourceUnavailable, e.to_string())),
            Err(e) => Err(Stopped(Stop::MilvusUnavailable, e.to_string())),
        }
    }

    /// A generation's part of the report: its model and counts.
    async fn describe(
        &self,
        gens: &Generations,
        model: &ModelId,
        g: Option<Generation>,
    ) -> Result<Option<GenerationReport>, Stopped> {
        let Some(g) = g else { return Ok(None) };
        let index = gens.index(&g, model);
        let counts = self.out.within(index.catalog.counts()).await.map_err(stop(Stop::MysqlUnavailable))?;
        Ok(Some(GenerationReport {
            number: g.number,
            collection: g.collection,
            model: g.model.or_else(|| Some(index.catalog.model().to_string())),
            indexed: counts.indexed,
            failed: counts.failed,
            stale: counts.stale,
        }))
    }
}

/// Stops at `at`, with the error's text.
fn stop<E: std::fmt::Display>(at: Stop) -> impl FnOnce(E) -> Stopped {
    move |e| Stopped(at, e.to_string())
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
