//! The generation lifecycle as the commands run it, written once: which generation a sync or a
//! plan works on (`target`, `choose`), whether a new generation has caught up with the serving
//! one (`still_missing`), and the swap once it has (`swap_when_caught_up`). `index`, `embed` and
//! `plan` call these; `Generations::collect` drops what retired.

use std::future::Future;
use std::time::Duration;

use futures::{StreamExt, TryStreamExt, stream};

use super::Index;
use super::generations::Generations;
use crate::bucket::Source;
use crate::core::ModelId;
use crate::store::{Error, Generation, Result};

/// HEADs in flight at once while comparing two generations.
const HEADS_AT_ONCE: usize = 16;
/// One HEAD's own limit (object_store retries inside it): a slow object costs this, not the whole
/// comparison, and thousands of deletions are never one limit's worth of HEADs.
const HEAD_LIMIT: Duration = Duration::from_secs(30);

/// The generations a plan works on: what serves, what is being built (when the serving one
/// cannot hold the model's vectors), and the index of the one the plan fills, made or checked.
pub struct Chosen {
    pub serving: Option<Generation>,
    pub building: Option<Generation>,
    pub index: Index,
}

/// Which step of `choose` failed: reading the alias is Milvus's, the rest say what stopped them
/// (another model or index type, another owner, or a backend).
#[derive(Debug, thiserror::Error)]
pub enum ChooseError {
    #[error("reading the index's alias: {0}")]
    Alias(Error),
    #[error("{0}")]
    Ensure(Error),
    #[error("beginning a new generation: {0}")]
    Begin(Error),
}

/// Which step of `swap_when_caught_up` failed: the comparison (the catalog and the bucket's
/// HEADs), or the swap (Milvus).
#[derive(Debug, thiserror::Error)]
pub enum SwapError {
    #[error("comparing generations: {0}")]
    Comparing(Error),
    #[error("{0}")]
    Waiting(Error),
    #[error("moving the alias: {0}")]
    Moving(Error),
}

/// Where a new generation stands against the serving one.
#[derive(Debug)]
pub enum CaughtUp {
    /// This many objects of the serving generation that the bucket still has are not in it yet.
    Missing(usize),
    /// Search moved to it; the generation it retired, if any (kept where asked).
    Swapped(Option<Generation>),
}

/// `f` within `limit`, a late answer an error like any other.
async fn within<T>(limit: Duration, what: &str, f: impl Future<Output = Result<T>>) -> Result<T> {
    match tokio::time::timeout(limit, f).await {
        Ok(r) => r,
        Err(_) => Err(Error::backend(what, format!("no answer in {limit:?}"))),
    }
}

impl Generations {
    /// The generation a sync of `model`'s vectors goes to: the serving one when the model fits
    /// it; the one being built when the model fits that instead (filling it along with its
    /// build); the name itself when nothing is there yet. Otherwise the serving one, which
    /// refuses the model.
    pub async fn target(&self, model: &ModelId, mixed_precision: bool) -> Result<Generation> {
        let Some(serving) = self.serving().await? else { return Ok(Generation::plain(self.name())) };
        if serving.fits(model, mixed_precision) {
            return Ok(serving);
        }
        match self.unfinished().await? {
            Some(building) if building.fits(model, mixed_precision) => Ok(building),
            _ => Ok(serving),
        }
    }

    /// The generation a plan of `model`'s `width`-wide vectors works on, held by `owner`: the
    /// serving one, made or checked; or, when it cannot hold this model's vectors (another
    /// model, width or index type: the spec changed), a new generation beside it. Each step is
    /// given `limit`.
    pub async fn choose(
        &self,
        model: &ModelId,
        width: usize,
        owner: &str,
        limit: Duration,
    ) -> Result<Chosen, ChooseError> {
        let serving = within(limit, "Milvus", self.serving()).await.map_err(ChooseError::Alias)?;
        let ensure = |index: Index| async move {
            within(limit, "making or checking the collection", index.ensure(width, model, false, owner)).await?;
            Ok::<_, Error>(index)
        };
        let target = serving.clone().unwrap_or_else(|| Generation::plain(self.name()));
        match ensure(self.index(&target, model)).await {
            Ok(index) => return Ok(Chosen { serving, building: None, index }),
            Err(Error::ModelMismatch(_) | Error::IndexMismatch(_)) if serving.is_some() => {}
            Err(e) => return Err(ChooseError::Ensure(e)),
        }
        let (serving, building) =
            within(limit, "Milvus or MySQL", self.begin(model, owner)).await.map_err(ChooseError::Begin)?;
        let index = ensure(self.to_build(&building, model)).await.map_err(ChooseError::Ensure)?;
        Ok(Chosen { serving, building: Some(building), index })
    }

    /// How many objects the serving generation holds that `building` lacks and the bucket still
    /// has: 0 when `building` may take its place. Objects gone from the bucket (deleted since the
    /// serving generation last synced) are not waited for, and neither is one whose HEAD the
    /// bucket refuses or whose key the client cannot address: `building`'s own plan listed the
    /// bucket, and would have a row for it (indexed, or failed with its reason) had the listing
    /// had it. A HEAD that fails for a reason that may pass (5xx, a timeout) is an error: the
    /// caller tries later.
    pub async fn still_missing(&self, serving: &Generation, building: &Generation, source: &Source) -> Result<usize> {
        let (mut after, mut missing) = (-1, 0);
        loop {
            let page = self.missing(serving, building, after, 1000).await?;
            let Some((last, _)) = page.last() else { return Ok(missing) };
            after = *last;
            let there = stream::iter(page)
                .map(|(_, key)| async move {
                    match tokio::time::timeout(HEAD_LIMIT, source.exists(&key)).await {
                        Ok(Ok(there)) => Ok(there),
                        Ok(Err(Error::Invalid(_) | Error::Refused(_) | Error::Archived(_))) => Ok(false),
                        Ok(Err(e)) => Err(e),
                        Err(_) => {
                            Err(Error::backend(format!("checking {key:?}"), format!("no answer in {HEAD_LIMIT:?}")))
                        }
                    }
                })
                .buffer_unordered(HEADS_AT_ONCE)
                .try_fold(0, |n, there| async move { Ok(n + usize::from(there)) });
            missing += there.await?;
        }
    }

    /// Moves search to `building` (whose index is `index`) when it holds every object `serving`
    /// holds that the bucket still has (at once where nothing serves), once its writes are
    /// searchable; retires `serving`, kept where `keep`. Each Milvus step is given `limit`; the
    /// comparison is bounded per HEAD.
    pub async fn swap_when_caught_up(
        &self,
        serving: Option<&Generation>,
        building: &Generation,
        index: &Index,
        source: &Source,
        keep: bool,
        limit: Duration,
    ) -> Result<CaughtUp, SwapError> {
        if let Some(serving) = serving {
            match self.still_missing(serving, building, source).await.map_err(SwapError::Comparing)? {
                0 => {}
                n => return Ok(CaughtUp::Missing(n)),
            }
        }
        within(limit, "waiting for the writes to be searchable", index.wait_searchable())
            .await
            .map_err(SwapError::Waiting)?;
        let retired = within(limit, "Milvus", self.swap(serving, building)).await.map_err(SwapError::Moving)?;
        if let Some(old) = retired.as_ref().filter(|_| keep)
            && let Err(e) = within(limit, "MySQL", self.keep(old, true)).await
        {
            tracing::warn!("keeping generation {}: {e}", old.number);
        }
        Ok(CaughtUp::Swapped(retired))
    }
}
