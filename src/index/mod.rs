//! An index: one collection's vectors in Milvus and their rows in the catalog, changed only
//! through `Index`, which owns the order of the writes; and the generations behind an index's
//! name (`generations`: their record and their steps; `lifecycle`: the choices the commands
//! make with them, written once). Uses the adapters of `store`, `bucket` (a swap HEADs what it
//! waits for) and `core`; the roles above use it.
pub mod generations;
mod lifecycle;

pub use generations::Generations;
pub use lifecycle::{CaughtUp, ChooseError, Chosen, SwapError};

use std::collections::HashSet;

use crate::core::ModelId;
use crate::store::{
    Catalog, CatalogTime, Ensured, Error, MilvusConfig, Record, Result, Vector, VectorStore, collection_of,
};

/// The owner a run or server claims a collection for when it is given none: every CLI run on
/// every machine, as one. The operator claims for its ImageIndex by UID.
pub const LOCAL_OWNER: &str = "imageindex-cli";

/// One write to an index: new vectors, ids whose old vector must go (a changed object that now
/// fails), and the catalog rows that record all of them.
#[derive(Debug, Default)]
pub struct WriteBatch {
    pub vectors: Vec<Vector>,
    pub remove: Vec<i64>,
    pub records: Vec<Record>,
}

impl WriteBatch {
    pub fn is_empty(&self) -> bool {
        self.vectors.is_empty() && self.remove.is_empty() && self.records.is_empty()
    }
}

/// One collection's index: its vectors in Milvus and their rows in the catalog. Every change
/// goes through here, Milvus first and the catalog second, so a catalog row never claims a
/// vector that is not there, and a crash in between leaves a row that the next sync redoes.
pub struct Index {
    pub vectors: VectorStore,
    pub catalog: Catalog,
    /// Whether `ensure` may make the collection: a plain one, or a generation by its own build
    /// (see `Generations::index`). Otherwise a collection that is not there is an error.
    pub may_create: bool,
}

impl Index {
    /// Connects to Milvus and the catalog (applying its migrations) for vectors of `model`.
    pub async fn connect(milvus: &MilvusConfig, mysql_url: &str, model: &ModelId) -> Result<Self> {
        let vectors = VectorStore::connect(milvus).await?;
        let catalog = Catalog::connect(mysql_url, &milvus.collection, &model.to_string()).await?;
        Ok(Self { vectors, catalog, may_create: true })
    }

    /// The collection ready for `dim`-wide vectors of `model`, held by `owner`: claimed in the
    /// catalog (refused when another owns it), created (where `may_create`) or checked in Milvus,
    /// and its model recorded or checked (see `ModelId::check`). A collection made here is empty,
    /// so catalog rows from before it describe vectors that are gone (dropped outside, or a drop
    /// cut short): they are forgotten, and the objects embedded again. Not so while its
    /// generation 0 is in Milvus: the collection was moved behind its alias meanwhile (see
    /// `Generations::serving`), and its rows are that generation's.
    pub async fn ensure(&self, dim: usize, model: &ModelId, mixed_precision: bool, owner: &str) -> Result<Ensured> {
        let moved = || async {
            let g0 = self.vectors.scoped(&collection_of(self.vectors.collection(), 0));
            match g0.exists().await? {
                true => Err(Error::backend(
                    format!("making collection {}", self.vectors.collection()),
                    format!("it was moved behind its alias as {} meanwhile; read the alias again", g0.collection()),
                )),
                false => Ok(()),
            }
        };
        if !self.vectors.exists().await? {
            if !self.may_create {
                return Err(Error::NotFound(format!(
                    "collection {} (a generation is made by its build alone, and one dropped stays dropped)",
                    self.vectors.collection()
                )));
            }
            moved().await?;
        }
        let before = self.catalog.clock().await?;
        self.catalog.claim_owner(owner).await?;
        let ensured = self.vectors.ensure_collection(dim, model, mixed_precision, self.may_create).await?;
        if ensured == Ensured::Created {
            if let Err(e) = moved().await {
                // Made in the moment between the rename and the alias: empty, so nothing is lost
                // by dropping it, and the alias can take the name.
                if self.vectors.count().await? == 0 {
                    self.vectors.drop_collection().await?;
                }
                return Err(e);
            }
            let forgotten = self.catalog.forget_written_before(before).await?;
            if forgotten > 0 {
                tracing::warn!(
                    "collection {} was not in Milvus; forgot its {forgotten} catalog rows, to be embedded again",
                    self.vectors.collection()
                );
            }
        }
        self.catalog.claim_model(model, mixed_precision, ensured == Ensured::Created).await?;
        Ok(ensured)
    }

    /// Makes Milvus and the catalog agree on the objects of `shard`: vectors without an indexed
    /// row (a crash between the two writes, then the object deleted) are deleted, and indexed
    /// rows without a vector (lost outside) are marked to be embedded again. Safe beside writers,
    /// which write the vector first and the row second: a vector without a row is given
    /// `ORPHAN_GRACE` for its row to land, and an "orphan" whose row still appears after its
    /// delete was a write in flight, marked to be embedded again since its vector went.
    pub async fn repair(&self, shard: u32, shards: u32) -> Result<Repair> {
        let rows: HashSet<i64> = self.catalog.indexed_ids(shard, shards).await?.into_iter().collect();
        let vectors: HashSet<i64> = self.vectors.ids(shard, shards).await?.into_iter().collect();
        let missing: Vec<i64> = rows.difference(&vectors).copied().collect();
        let mut orphans: Vec<i64> = vectors.difference(&rows).copied().collect();
        if !orphans.is_empty() {
            // A write puts its vector first and its row second, so a vector without a row may be
            // a write in flight (an upload answered a moment later): only one still without its
            // row a moment later is an orphan.
            tokio::time::sleep(ORPHAN_GRACE).await;
            let landed: HashSet<i64> = self.catalog.indexed_among(&orphans).await?.into_iter().collect();
            orphans.retain(|id| !landed.contains(id));
        }
        self.catalog.redo(&missing).await?;
        self.vectors.delete(&orphans).await?;
        let in_flight = self.catalog.indexed_among(&orphans).await?;
        self.catalog.redo(&in_flight).await?;
        let repair = Repair { orphans: orphans.len() - in_flight.len(), missing: missing.len() + in_flight.len() };
        if repair != Repair::default() {
            tracing::warn!(
                "collection {}: deleted {} vectors without a catalog row; {} indexed objects had no vector and will be embedded again",
                self.vectors.collection(),
                repair.orphans,
                repair.missing
            );
        }
        Ok(repair)
    }

    /// Whether Milvus holds as many vectors as the catalog has indexed rows (all shards): the
    /// cheap check that says when `repair` is worth its listing.
    pub async fn counts_agree(&self) -> Result<bool> {
        Ok(self.vectors.count().await? == self.catalog.counts().await?.indexed)
    }

    /// Upserts the vectors, removes the replaced ones, then records the rows.
    pub async fn write(&self, batch: WriteBatch) -> Result<()> {
        self.vectors.upsert(batch.vectors).await?;
        self.vectors.delete(&batch.remove).await?;
        self.catalog.record(&batch.records).await
    }

    /// Removes objects: out of Milvus, then out of the catalog (both idempotent).
    pub async fn remove(&self, ids: &[i64]) -> Result<()> {
        self.vectors.delete(ids).await?;
        self.catalog.delete(ids).await
    }

    /// Removes the objects among `ids` whose rows were last written before `since` (the moment a
    /// sync began listing); a row written since is a newer write (an upload, another run) and
    /// stays. Should a write land between the two deletes, its row is marked to be embedded
    /// again, since its vector may have gone. Returns how many were removed.
    pub async fn remove_unless_written_since(&self, ids: &[i64], since: CatalogTime) -> Result<usize> {
        let stale = self.catalog.rows(ids, Some(since)).await?;
        self.vectors.delete(&stale).await?;
        self.catalog.delete_written_before(&stale, Some(since)).await?;
        let rewritten = self.catalog.rows(&stale, None).await?;
        if !rewritten.is_empty() {
            tracing::warn!("{} objects were written while being removed; they will be embedded again", rewritten.len());
            self.catalog.redo(&rewritten).await?;
        }
        Ok(stale.len() - rewritten.len())
    }

    /// Waits until every acknowledged write is searchable; returns the vectors in the collection.
    pub async fn wait_searchable(&self) -> Result<u64> {
        self.vectors.wait_searchable().await
    }

    /// Drops the collection and forgets its catalog rows and runs.
    pub async fn drop(&self) -> Result<()> {
        self.vectors.drop_collection().await?;
        self.catalog.drop_collection().await
    }
}

/// How long a vector without a catalog row is given for its row to arrive before `repair`
/// deletes it: a write's two steps are milliseconds apart, even on a loaded machine.
const ORPHAN_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

/// What `Index::repair` repaired.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Repair {
    /// Vectors without an indexed catalog row, deleted.
    pub orphans: usize,
    /// Indexed rows without a vector, marked to be embedded again.
    pub missing: usize,
}
