//! Search follows the index's generations. The server reads the Milvus alias named after the
//! index every few seconds; when it points at another generation, the server loads that
//! generation's model (a file beside `--model`, named in the generation's record), checks that
//! the collection is loaded, and swaps both in at once. Until then it keeps searching the
//! generation it has, which stays in Milvus through the grace period, so no request meets a
//! collection of another model. A search that fails checks at once (a collection renamed under
//! the server: the first change of an index made before generations), and is retried once on
//! the generation found.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};

use super::AppState;
use crate::config::ModelArgs;
use crate::index::Generations;

/// How often the alias is read.
pub const EVERY: Duration = Duration::from_secs(5);

pub struct Follow {
    /// The index: its alias, or its plain collection.
    pub name: String,
    /// How to load a generation's model (its file beside `--model`).
    pub model: ModelArgs,
    pub mixed_precision: bool,
    pub every: Duration,
}

pub(super) async fn run(state: Arc<AppState>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await; // the first tick is now
    loop {
        tick.tick().await;
        if let Err(e) = check(&state).await {
            // Milvus or MySQL away, or the new generation's model missing: keep serving the
            // generation we have (it outlives the swap by the grace period), and try again.
            tracing::warn!("following the index's generations: {e:#}");
        }
    }
}

/// After a failed search on `used`: whether the server has moved off it (now, or meanwhile by
/// another request). The rename of a plain collection leaves a moment with neither the
/// collection nor the alias, so it looks a few times.
pub(super) async fn moved(state: &AppState, used: &crate::store::Generation) -> bool {
    for attempt in 0..3 {
        // Bounded: with Milvus down, the search's own error is the answer.
        match tokio::time::timeout(Duration::from_secs(2), check(state)).await {
            Ok(Err(e)) => tracing::warn!("following the index's generations after a failed search: {e:#}"),
            Err(_) => return false,
            Ok(Ok(_)) => {}
        }
        if state.clients().generation.collection != used.collection {
            return true;
        }
        if state.follow.get().is_none() || attempt == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

/// Moves the server to the generation the alias points at, if it is another one; says whether
/// it moved. Does nothing for a server that does not follow.
pub(super) async fn check(state: &AppState) -> Result<bool> {
    let Some(follow) = state.follow.get() else { return Ok(false) };
    let _one = state.switching.lock().await;
    let current = state.clients();
    let gens = Generations::new(&current.index.vectors, &current.index.catalog, &follow.name);
    let Some(serving) = gens.serving().await? else { return Ok(false) };
    if serving.collection == current.generation.collection {
        return Ok(false);
    }
    let model = match serving.model.as_deref() {
        Some(recorded) if !serving.fits(current.model.id(), follow.mixed_precision) => {
            let id = recorded.parse().map_err(anyhow::Error::msg)?;
            let args = follow.model.clone();
            let loaded = tokio::task::spawn_blocking(move || args.load_for(&id)).await??;
            Arc::new(loaded)
        }
        _ => current.model.clone(),
    };
    let index = gens.index(&serving, model.id());
    index.vectors.ready().await.with_context(|| format!("generation {} ({})", serving.number, serving.collection))?;
    tracing::info!(
        "search moved to generation {} of {} ({}, {})",
        serving.number,
        follow.name,
        serving.collection,
        model.id()
    );
    state.switch(serving, index, model);
    Ok(true)
}
