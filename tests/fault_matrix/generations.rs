//! A rebuild cut between its steps in Milvus and the catalog: the state a crash between two calls
//! leaves, made with the same calls, then what runs next (a plan, the collection of retired
//! generations). Search keeps every object, once, and nothing is embedded again.

use std::time::Duration;

use imageindex::core::IndexKind;
use imageindex::index::{Generations, LOCAL_OWNER};
use imageindex::sync::{Backends, sync};

use super::consistency::{Consistency, consistency};
use super::matrix::{SERIAL, add_row, reset_peak_rss};
use super::support::*;

const PHOTOS: usize = 40;

async fn generations_of(fx: &Fixture) -> Generations {
    Generations::connect(&fx.milvus(IndexKind::Hnsw), &env("IMAGEINDEX_MYSQL_URL")).await.unwrap()
}

/// A plan of the index as the next plan Job makes it: on the generation it reads, then checked.
async fn plan_and_check(fx: &Fixture, gens: &Generations) -> (usize, Consistency) {
    let g = gens.target(model().id(), false).await.unwrap();
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

/// A rebuild whose serving generation holds objects deleted from the bucket since it last synced
/// (half of them) and a key the client cannot address: the swap waits for none of them, and the
/// new generation serves the bucket as it is.
#[tokio::test(flavor = "multi_thread")]
async fn a_rebuild_swaps_past_deleted_and_unaddressable_objects() {
    use imageindex::index::WriteBatch;
    use imageindex::store::Record;
    let _serial = SERIAL.lock().await;
    let fx = Fixture::new("matrix_swap_gone");
    let photos = upload_photos(&fx, PHOTOS).await;
    reset_peak_rss();
    let plain = fx.backends(IndexKind::Hnsw).await;
    fx.sync(&plain).await;
    // A key the client cannot address, recorded in the serving catalog (failed: no vector).
    let odd = Record { error: Some("cannot be fetched safely".into()), ..Record::indexed("a//b.jpg", None, 1, None) };
    plain.index.write(WriteBatch { records: vec![odd], ..Default::default() }).await.unwrap();
    for (key, _) in &photos[..PHOTOS / 2] {
        fx.source.delete(key).await.unwrap();
    }
    let gens = generations_of(&fx).await;
    let (serving, building) = gens.begin(model().id(), LOCAL_OWNER).await.unwrap();
    let serving = serving.expect("the plain collection, adopted");
    let b = Backends { source: fx.source.clone(), index: gens.to_build(&building, model().id()) };
    assert_eq!(sync(&b, model(), &Default::default()).await.unwrap().indexed, PHOTOS / 2);
    let missing = tokio::time::timeout(Duration::from_secs(60), gens.still_missing(&serving, &building, &fx.source))
        .await
        .expect("the comparison ends")
        .expect("no HEAD stops it");
    assert_eq!(missing, 0, "nothing gone or unaddressable is waited for");
    gens.swap(Some(&serving), &building).await.unwrap();
    let (embedded, c) = plan_and_check(&fx, &gens).await;
    add_row("rebuild swapped while half the serving objects were deleted and one key is unaddressable", &c);
    assert_eq!(c, Consistency { expected: PHOTOS / 2, indexed: PHOTOS / 2, ..Default::default() });
    assert_eq!(embedded, 0, "nothing embedded again");
    fx.cleanup().await;
}
