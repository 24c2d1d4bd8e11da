//! The sync, the product's core loop: list the source once, diff it against the catalog, remove
//! what is gone, and embed what is new or changed. `plan` merges the listing with the catalog
//! (pure), `planner` feeds it and records the plan's work in the catalog, `pipeline` fetches,
//! decodes and embeds, `run` carries out one shard's work and records the run. The commands that
//! run it are in `commands`.
//! Uses `embed`, `index`, `store` and `bucket`; nothing below it uses it.
//!
//! A bad object (corrupt, truncated, not an image, too large) is recorded as failed with its
//! reason and never stops the run. A backend failure (Milvus, MySQL, the bucket) does: what was
//! written stays written, and the next run picks up where this one stopped.

mod pipeline;
pub mod plan;
pub mod planner;
mod run;
pub mod sorted;

pub use plan::{DeletionGuard, MassDeletion, Work, shard_of};
pub use planner::{Planned, plan};
pub use run::{carry_out, embed_only, sync};

use crate::bucket::Source;
use crate::embed::{DecodeLimits, ModelError};
use crate::index::Index;
use crate::store;

/// Why a sync stopped. Bad objects never stop it; these do.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Store(#[from] store::Error),
    #[error("the model failed: {0}")]
    Model(#[from] ModelError),
    #[error("a pipeline task panicked: {0}")]
    Panicked(#[from] tokio::task::JoinError),
    #[error(transparent)]
    MassDeletion(#[from] MassDeletion),
    /// The source could not be listed (or listed a key twice): nothing was planned.
    #[error("listing the source: {0}")]
    Listing(store::Error),
    /// No complete plan to carry out (an embedding shard runs after `imageindex plan`).
    #[error("{0}")]
    NoPlan(String),
}

/// The backends one sync talks to.
pub struct Backends {
    pub source: Source,
    pub index: Index,
}

#[derive(Clone, Debug)]
pub struct SyncOptions {
    pub shard: u32,
    pub shards: u32,
    pub batch_size: usize,
    /// Objects fetched at once.
    pub fetch_concurrency: usize,
    /// Images decoded at once; 0 = the cores this process may use.
    pub decode_workers: usize,
    pub limits: DecodeLimits,
    /// Larger objects are recorded as failed without being fetched.
    pub max_object_bytes: u64,
    /// Memory the decodes in flight may take at once (see `MemoryBudget`).
    pub decode_memory: u64,
    /// Bytes of fetched objects waiting to be decoded, at most (at least one object's).
    pub fetch_memory: u64,
    pub progress_bar: bool,
    /// Let vectors of another precision into the collection (see `ModelId::check`).
    pub mixed_precision: bool,
    pub deletion: DeletionGuard,
    /// Who this run claims the collection for (see `Catalog::claim_owner`).
    pub owner: String,
    pub repair: RepairWhen,
}

/// When a run compares Milvus with the catalog object by object (see `Index::repair`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum RepairWhen {
    /// When the vector count and the indexed rows differ, before and after the run: one count
    /// each, but blind to errors that cancel out (an orphan and a lost vector).
    #[default]
    IfCountsDiffer,
    /// Every run: lists every id of the shard in Milvus and in the catalog.
    Always,
}

impl Default for SyncOptions {
    fn default() -> Self {
        Self {
            shard: 0,
            shards: 1,
            batch_size: 16,
            fetch_concurrency: 16,
            decode_workers: 0,
            limits: DecodeLimits::default(),
            max_object_bytes: 64 << 20,
            decode_memory: 512 << 20,
            fetch_memory: 256 << 20,
            progress_bar: false,
            mixed_precision: false,
            deletion: DeletionGuard::default(),
            owner: crate::index::LOCAL_OWNER.into(),
            repair: RepairWhen::default(),
        }
    }
}

/// What a sync did.
#[derive(Debug, Default, serde::Serialize)]
pub struct Summary {
    pub discovered: usize,
    pub new: usize,
    pub changed: usize,
    pub unchanged: usize,
    pub deleted: usize,
    /// Catalog entries whose object the listing lacks but the bucket still has (a HEAD found it),
    /// or that were written after the listing began: kept.
    pub kept: usize,
    pub indexed: usize,
    pub failed: usize,
    /// Of `failed`, indexed objects whose changed version could not be read (refused, failing,
    /// archived): search keeps their older vectors, and the next run tries again.
    pub stale: usize,
    /// Deletions the listing implies that were held back: many objects could not be read when
    /// last tried, so the listing proves nothing gone (`DeletionGuard::holds`).
    pub held: usize,
    /// Objects listed whose key is longer than the catalog holds (`store::MAX_KEY_BYTES`): left out.
    pub too_long: usize,
    /// Objects listed as new whose id another key holds (`store::Collision`): left out, and
    /// listed with the failures.
    pub collided: usize,
    /// Objects that failed in this run, with the reason.
    pub failures: Vec<(String, String)>,
    /// Vectors in the collection after the run (all shards).
    pub vectors: u64,
    /// What disagreed between Milvus and the catalog, and was repaired.
    pub repaired: crate::index::Repair,
    /// Seconds spent embedding (fetch to write), excluding listing and deletes.
    pub embed_seconds: f64,
}

impl Summary {
    pub fn images_per_second(&self) -> f64 {
        if self.embed_seconds > 0.0 { (self.indexed + self.failed) as f64 / self.embed_seconds } else { 0.0 }
    }
}
