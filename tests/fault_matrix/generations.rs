//! A rebuild cut between its steps in Milvus and the catalog: the state a crash between two calls
//! leaves, made with the same calls, then what runs next (a plan, the collection of retired
//! generations). Search keeps every object, once, and nothing is embedded again.

use std::time::Duration;

use imageindex::core::IndexKind;
use imageindex::store::{Generations, LOCAL_OWNER};
use imageindex::sync::{Backends, generation::target, sync};

use super::consistency::{Consistency, consistency};
use super::matrix::{SERIAL, add_row, reset_peak_rss};
use super::support::*;

const PHOTOS: usize = 40;

async fn generations_of(fx: &Fixture) -> Generations {
    Generations::connect(&fx.milvus(IndexKind::Hnsw), &env("IMAGEINDEX_MYSQL_URL")).await.unwrap()
}

/// A plan of the index as the next plan Job makes it: on the generation it reads, then checked.
async fn plan_and_check(fx: &Fixture, gens: &Generations) -> (usize, Consistency) {
    let g = target(gens, model().id(), false).await.unwrap();
    let b = Backends { source: fx.source.clone(), index: gens.index(&g, model().id()) };
    let s = fx.sync(&b).await;
    (s.indexed, consistency(fx, &b.index, &[]).await)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rebuild_killed_between_rename_and_alias() {
    let _serial = SERIAL.lock().await;
    let fx = Fixture::new("matrix_cut_rename");
    upload_photos(&fx, PHOTOS).await;
    reset_peak_rss();
    let plain = fx.backends(IndexKind::Hnsw).await;
    fx.sync(&plain).await;
    plain.index.vectors.rename(&format!("{}_g0", fx.name)).await.unwrap();
    let gens = generations_of(&fx).await;
    let (embedded, c) = plan_and_check(&fx, &gens).await;
    add_row("rebuild killed between the rename of the plain collection and the alias, then a plan", &c);
    assert_eq!(c, Consistency { expected: PHOTOS, indexed: PHOTOS, ..Default::default() });
    assert_eq!(embedded, 0, "nothing embedded again");
    fx.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rebuild_killed_between_alias_and_table() {
    let _serial = SERIAL.lock().await;
    let fx = Fixture::new("matrix_cut_swap");
    upload_photos(&fx, PHOTOS).await;
    reset_peak_rss();
    fx.sync(&fx.backends(IndexKind::Hnsw).await).await;
    let gens = generations_of(&fx).await;
    let (_, building) = gens.begin(model().id(), LOCAL_OWNER).await.unwrap();
    let b = Backends { source: fx.source.clone(), index: gens.to_build(&building, model().id()) };
    sync(&b, model(), &Default::default()).await.unwrap();
    b.index.vectors.scoped(&fx.name).point_alias_at(&building.collection).await.unwrap();
    let collected = gens.collect(Duration::ZERO, LOCAL_OWNER).await.unwrap();
    let (embedded, c) = plan_and_check(&fx, &gens).await;
    add_row("rebuild killed between the alias's move and the catalog, then collect and a plan", &c);
    assert_eq!(c, Consistency { expected: PHOTOS, indexed: PHOTOS, ..Default::default() });
    assert_eq!((embedded, collected.len()), (0, 1), "the old generation collected, nothing embedded again");
    assert!(gens.unfinished().await.unwrap().is_none());
    fx.cleanup().await;
}
