//! `imageindex cleanup`, the operator's Job on deletion: drop the collection and its catalog rows
//! (`Delete`, and only if the catalog shows they are this index's), or let go of the claim
//! (`Retain`).

use anyhow::Result;

use super::Out;
use crate::config::BackendArgs;
use crate::contract::report::{Report, Stop};
use crate::index::{self, Generations};
use crate::store::Catalog;

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
