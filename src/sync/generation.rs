//! Which generation of the index a sync works on, and when a new generation has caught up with
//! the serving one (see `index::generations`).

use std::time::Duration;

use futures::{StreamExt, TryStreamExt, stream};

use crate::bucket::Source;
use crate::core::ModelId;
use crate::index::Generations;
use crate::store::{self, Generation};

/// HEADs in flight at once while comparing two generations.
const HEADS_AT_ONCE: usize = 16;
/// One HEAD's own limit (object_store retries inside it): a slow object costs this, not the whole
/// comparison, and thousands of deletions are never one limit's worth of HEADs.
const HEAD_LIMIT: Duration = Duration::from_secs(30);

/// The generation a sync of `model`'s vectors goes to: the serving one when the model fits it;
/// the one being built when the model fits that instead (filling it along with its build); the
/// name itself when nothing is there yet. Otherwise the serving one, which refuses the model.
pub async fn target(gens: &Generations, model: &ModelId, mixed_precision: bool) -> store::Result<Generation> {
    let Some(serving) = gens.serving().await? else { return Ok(Generation::plain(gens.name())) };
    if serving.fits(model, mixed_precision) {
        return Ok(serving);
    }
    match gens.unfinished().await? {
        Some(building) if building.fits(model, mixed_precision) => Ok(building),
        _ => Ok(serving),
    }
}

/// How many objects the serving generation holds that `building` lacks and the bucket still has:
/// 0 when `building` may take its place. Objects gone from the bucket (deleted since the serving
/// generation last synced) are not waited for, and neither is one whose HEAD the bucket refuses
/// or whose key the client cannot address: `building`'s own plan listed the bucket, and would
/// have a row for it (indexed, or failed with its reason) had the listing had it. A HEAD that
/// fails for a reason that may pass (5xx, a timeout) is an error: the caller tries later.
pub async fn still_missing(
    gens: &Generations,
    serving: &Generation,
    building: &Generation,
    source: &Source,
) -> store::Result<usize> {
    let (mut after, mut missing) = (-1, 0);
    loop {
        let page = gens.missing(serving, building, after, 1000).await?;
        let Some((last, _)) = page.last() else { return Ok(missing) };
        after = *last;
        let there = stream::iter(page)
            .map(|(_, key)| async move {
                match tokio::time::timeout(HEAD_LIMIT, source.exists(&key)).await {
                    Ok(Ok(there)) => Ok(there),
                    Ok(Err(store::Error::Invalid(_) | store::Error::Refused(_) | store::Error::Archived(_))) => {
                        Ok(false)
                    }
                    Ok(Err(e)) => Err(e),
                    Err(_) => {
                        Err(store::Error::backend(format!("checking {key:?}"), format!("no answer in {HEAD_LIMIT:?}")))
                    }
                }
            })
            .buffer_unordered(HEADS_AT_ONCE)
            .try_fold(0, |n, there| async move { Ok(n + usize::from(there)) });
        missing += there.await?;
    }
}
