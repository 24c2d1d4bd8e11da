//! Which generation of the index a sync works on, and when a new generation has caught up with
//! the serving one (see `store::generations`).

use crate::core::ModelId;
use crate::store::{self, Generation, Generations, Source};

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
/// generation last synced) are not waited for.
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
        for (_, key) in &page {
            missing += usize::from(source.exists(key).await?);
        }
    }
}
