//! Milvus and the catalog kept in agreement, and collections that never collide (issue 12, items
//! 9 and 10): a collection lost outside, a vector without a row, a row without a vector, names
//! that differ only in case, and a collection another index owns.

use milvus::v2::prelude::*;

use imageindex::core::IndexKind;
use imageindex::index::{Repair, WriteBatch};
use imageindex::store::{self, Record, Vector, key_id};
use imageindex::sync::{Backends, RepairWhen, SyncOptions, sync};

use super::consistency::{Consistency, consistency};
use super::support::*;

/// What another client of the same Milvus can do: drop a collection, delete rows by filter.
async fn milvus() -> ClientV2 {
    ClientV2::new(&ConnectConfig::new().uri(env("IMAGEINDEX_MILVUS_URL"))).await.unwrap()
}

/// Dropped outside (or by a `/img/drop` cut short between Milvus and the catalog): the next sync
/// used to recreate it empty and call every object unchanged, with 0 vectors and status Ready.
#[tokio::test(flavor = "multi_thread")]
async fn a_collection_lost_outside_is_indexed_again() {
    let fx = Fixture::new("lost_collection");
    upload_photos(&fx, 12).await;
    let b = fx.backends(IndexKind::Hnsw).await;
    assert_eq!(fx.sync(&b).await.indexed, 12);
    let drop = DropCollectionRequest::builder().collection_name(&fx.name).build().unwrap();
    milvus().await.drop_collection(drop).await.unwrap();

    let s = fx.sync(&b).await;
    assert_eq!((s.new, s.unchanged, s.indexed, s.vectors), (12, 0, 12, 12), "{s:?}");
    let c = consistency(&fx, &b.index, &[]).await;
    assert_eq!(c, Consistency { expected: 12, indexed: 12, failed: 0, lost: 0, duplicated: 0, orphans: 0 });
    fx.cleanup().await;
}

/// A vector whose row was never written (a crash between the two writes) and whose object is
/// then deleted: an orphan that search returned forever. And a row whose vector was lost.
#[tokio::test(flavor = "multi_thread")]
async fn orphans_and_lost_vectors_are_repaired() {
    let fx = Fixture::new("orphans");
    let photos = upload_photos(&fx, 10).await;
    let b = fx.backends(IndexKind::Hnsw).await;
    assert_eq!(fx.sync(&b).await.indexed, 10);
    // The orphan: written as the sync writes it, then the row taken away as the crash would.
    let ghost = "photos/ghost.jpg";
    let id = key_id(ghost);
    let orphan = || {
        let vectors = vec![Vector { id, key: ghost.into(), embedding: embed(&photos[0].1) }];
        let record = Record::indexed(ghost, None, 1, None);
        WriteBatch { vectors, records: vec![record], remove: vec![] }
    };
    let forget = |id: i64| {
        let name = fx.name.clone();
        async move {
            let pool = sqlx::MySqlPool::connect(&env("IMAGEINDEX_MYSQL_URL")).await.unwrap();
            let sql = "DELETE FROM images WHERE collection = ? AND id = ?";
            sqlx::query(sql).bind(name).bind(id).execute(&pool).await.unwrap();
        }
    };
    b.index.write(orphan()).await.unwrap();
    forget(id).await;
    let s = fx.sync(&b).await;
    assert_eq!((s.repaired, s.unchanged, s.vectors), (Repair { orphans: 1, missing: 0 }, 10, 10), "{s:?}");

    // The lost vector: gone from Milvus, its row still `indexed`; embedded again in the same run.
    let lost = key_id(&photos[4].0);
    let milvus = milvus().await;
    let delete =
        |id: i64| DeleteRequest::builder().collection_name(&fx.name).filter(format!("id in [{id}]")).build().unwrap();
    milvus.delete(delete(lost)).await.unwrap();
    let s = fx.sync(&b).await;
    assert_eq!(s.repaired, Repair { orphans: 0, missing: 1 }, "{s:?}");
    assert_eq!((s.changed, s.indexed, s.vectors), (1, 1, 10), "{s:?}");

    // Both at once keep the counts equal, which the cheap check cannot see; a full repair does.
    b.index.write(orphan()).await.unwrap();
    forget(id).await;
    milvus.delete(delete(lost)).await.unwrap();
    let full = SyncOptions { repair: RepairWhen::Always, ..Default::default() };
    let s = sync(&b, model(), &full).await.unwrap();
    assert_eq!((s.repaired, s.indexed, s.vectors), (Repair { orphans: 1, missing: 1 }, 1, 10), "{s:?}");
    let c = consistency(&fx, &b.index, &[]).await;
    assert_eq!(c, Consistency { expected: 10, indexed: 10, failed: 0, lost: 0, duplicated: 0, orphans: 0 });
    // Agreeing now, the next run repairs nothing.
    assert_eq!(sync(&b, model(), &full).await.unwrap().repaired, Repair::default());
    fx.cleanup().await;
}

/// A write in flight, seen by a repair between its vector and its row (an upload answered 201
/// while a sync's repair ran): the repair deleted the vector as an orphan, and the upload was not
/// searchable until the next run embedded it again. The fault matrix's idle-connections row lost
/// it in 2 of 6 runs. A vector is an orphan now only when its row has not come a moment later.
#[tokio::test(flavor = "multi_thread")]
async fn a_write_between_its_vector_and_its_row_is_not_an_orphan() {
    let fx = Fixture::new("in_flight");
    let photos = upload_photos(&fx, 2).await;
    let b = fx.backends(IndexKind::Hnsw).await;
    assert_eq!(fx.sync(&b).await.indexed, 2);
    let key = "uploads/in-flight.jpg";
    let id = key_id(key);
    let vector = Vector { id, key: key.into(), embedding: embed(&photos[0].1) };
    b.index.write(WriteBatch { vectors: vec![vector], ..Default::default() }).await.unwrap(); // the first step
    let (repair, row) = tokio::join!(b.index.repair(0, 1), async {
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        let records = vec![Record::indexed(key, Some("e".into()), 1, None)];
        b.index.write(WriteBatch { records, ..Default::default() }).await
    });
    row.unwrap();
    assert_eq!(repair.unwrap(), Repair::default(), "nothing to repair");
    let entry = b.index.catalog.entry(key).await.unwrap().expect("its row");
    assert!(entry.indexed && !entry.retry, "not marked to be embedded again: {entry:?}");
    let hits = b.index.vectors.search(embed(&photos[0].1), 2, None).await.unwrap();
    assert!(hits.iter().any(|h| h.key == key), "still searchable: {hits:?}");
    fx.cleanup().await;
}

/// `Photos` and `photos` are two Milvus collections; the catalog compared them case-insensitively
/// and gave both one set of rows, so each sync deleted the other's.
#[tokio::test(flavor = "multi_thread")]
async fn collections_that_differ_in_case_stay_apart() {
    let upper = Fixture::new("Case");
    let mut lower = Fixture::new("case");
    lower.name = upper.name.to_lowercase();
    upload_photos(&upper, 3).await;
    upload_photos(&lower, 5).await;
    let (bu, bl) = (upper.backends(IndexKind::Hnsw).await, lower.backends(IndexKind::Hnsw).await);
    assert_eq!(upper.sync(&bu).await.indexed, 3);
    let s = lower.sync(&bl).await;
    assert_eq!((s.new, s.deleted, s.indexed), (5, 0, 5), "{s:?}");
    assert_eq!(upper.sync(&bu).await.unchanged, 3, "the other collection's sync touched this one");
    assert_eq!(bu.index.catalog.counts().await.unwrap().indexed, 3);
    assert_eq!(bl.index.catalog.counts().await.unwrap().indexed, 5);
    upper.cleanup().await;
    lower.cleanup().await;
}

/// Two indexes whose names resolve to one collection: the second is refused, says whose it is,
/// and touches nothing; its owner goes on as before.
#[tokio::test(flavor = "multi_thread")]
async fn a_collection_another_index_owns_is_refused() {
    let fx = Fixture::new("claimed");
    upload_photos(&fx, 4).await;
    let mine = SyncOptions { owner: "ImageIndex team-a/photos (uid 1)".into(), ..Default::default() };
    let theirs = SyncOptions { owner: "ImageIndex team/a-photos (uid 2)".into(), ..Default::default() };
    let b = fx.backends(IndexKind::Hnsw).await;
    assert_eq!(sync(&b, model(), &mine).await.unwrap().indexed, 4);

    let other = Fixture::new("claimed_other");
    let wrong = Backends { source: other.source.clone(), index: fx.index(IndexKind::Hnsw).await };
    let err = sync(&wrong, model(), &theirs).await.unwrap_err();
    assert!(matches!(err, imageindex::sync::Error::Store(store::Error::Claimed(_))), "{err}");
    let msg = err.to_string();
    assert!(msg.contains("belongs to ImageIndex team-a/photos (uid 1)") && msg.contains("uid 2"), "{msg}");
    let c = consistency(&fx, &b.index, &[]).await;
    assert_eq!((c.indexed, c.lost), (4, 0), "the refused run changed something");
    assert_eq!(sync(&b, model(), &mine).await.unwrap().unchanged, 4);
    // Released (what a Retain deletion does), the next claimant takes it up.
    b.index.catalog.release(&mine.owner).await.unwrap();
    let taken = Backends { source: fx.source.clone(), index: fx.index(IndexKind::Hnsw).await };
    assert_eq!(sync(&taken, model(), &theirs).await.unwrap().unchanged, 4);
    assert_eq!(b.index.catalog.owner().await.unwrap().as_deref(), Some(theirs.owner.as_str()));
    fx.cleanup().await;
}
