//! Buckets laid out the way photo buckets are: folders beside sibling keys whose next byte sorts
//! below `/` (`photos/2024/a.jpg` beside `photos-old.jpg`). SeaweedFS lists such a tree depth
//! first, not in byte order, and the plan must be right whatever the order: every object indexed
//! once, re-runs embed nothing, and deletes, renames, changes and additions land exactly.

use std::collections::BTreeSet;

use futures::TryStreamExt;
use imageindex::core::IndexKind;
use imageindex::index::Index;
use imageindex::store::key_id;

use super::consistency::{Consistency, consistency};
use super::support::*;

/// Keys whose byte order and directory-tree order differ.
fn layout() -> Vec<String> {
    let mut keys: Vec<String> = ["photos/2024/a.jpg", "photos/2024/b.jpg", "photos-old.jpg", "photos.jpg"]
        .into_iter()
        .chain(["2024 trip.jpg", "2024/x.jpg", "a%2Fb.jpg", "a/b.jpg", "photos.zip"])
        .map(String::from)
        .collect();
    for sibling in [" ", "!", "#", "&", "'", "+", ",", "-", "."] {
        keys.push(format!("dir{sibling}x.jpg"));
    }
    keys.extend(["dir/1.jpg", "dir/sub/2.jpg", "dir/sub-3.jpg", "dir/sub.4.jpg"].map(String::from));
    keys
}

/// The bucket's image keys, and the catalog's and Milvus's view of them, must be the same set.
async fn check_exact(fx: &Fixture, index: &Index) {
    let bucket: BTreeSet<String> = fx.source.list().await.unwrap().into_iter().map(|o| o.key).collect();
    let rows: BTreeSet<String> = index.catalog.entries(0, 1).await.unwrap().into_keys().collect();
    assert_eq!(rows, bucket, "the catalog against the bucket");
    let vectors: BTreeSet<i64> = index.vectors.ids(0, 1).await.unwrap().into_iter().collect();
    assert_eq!(vectors, bucket.iter().map(|k| key_id(k)).collect(), "Milvus against the bucket");
    let n = bucket.len();
    let c = consistency(fx, index, &[]).await;
    assert_eq!(c, Consistency { expected: n, indexed: n, ..Default::default() });
}

async fn index_sync_and_change(fx: &Fixture) {
    let photos = photo_set(24);
    let keys = layout();
    for (key, (_, img)) in keys.iter().zip(&photos) {
        fx.source.put(key, jpeg(img, 85)).await.unwrap();
    }
    let images = keys.iter().filter(|k| k.ends_with(".jpg")).count();
    let b = fx.backends(IndexKind::Hnsw).await;
    let first = fx.sync(&b).await;
    assert_eq!((first.new, first.indexed, first.failed), (images, images, 0), "{:?}", first.failures);
    check_exact(fx, &b.index).await;
    let again = fx.sync(&b).await;
    assert_eq!((again.unchanged, again.new, again.changed, again.indexed), (images, 0, 0, 0), "{again:?}");

    // Two deletions, a rename into a folder, an addition beside a folder, a change.
    for gone in ["photos-old.jpg", "dir/sub/2.jpg", "photos.jpg"] {
        fx.source.delete(gone).await.unwrap();
    }
    fx.source.put("photos/photos.jpg", jpeg(&photos[3].1, 85)).await.unwrap();
    fx.source.put("photos (1).jpg", jpeg(&photos[20].1, 85)).await.unwrap();
    fx.source.put("2024 trip.jpg", jpeg(&photos[21].1, 70)).await.unwrap();
    let after = fx.sync(&b).await;
    let summary = (after.new, after.changed, after.deleted, after.unchanged, after.indexed, after.failed);
    assert_eq!(summary, (2, 1, 3, images - 4, 3, 0), "{after:?}");
    check_exact(fx, &b.index).await;
    let last = fx.sync(&b).await;
    assert_eq!((last.unchanged, last.indexed, last.deleted), (images - 1, 0, 0), "{last:?}");
    fx.cleanup().await;
}

/// SeaweedFS lists this layout depth first (checked, so that the test means what it says): the
/// plan before sorting refused it as out of key order, on every run.
#[tokio::test(flavor = "multi_thread")]
async fn nested_folders_beside_siblings_index_exactly_on_s3() {
    let fx = Fixture::new("layout");
    for key in ["photos/2024/a.jpg", "photos-old.jpg"] {
        fx.source.put(key, bytes::Bytes::from_static(b"probe")).await.unwrap();
    }
    let raw: Vec<String> =
        fx.source.pages().try_collect::<Vec<_>>().await.unwrap().into_iter().flatten().map(|o| o.key).collect();
    assert_eq!(raw, ["photos/2024/a.jpg", "photos-old.jpg"], "SeaweedFS no longer lists depth first");
    index_sync_and_change(&fx).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn nested_folders_beside_siblings_index_exactly_on_azure() {
    super::stores::create_container().await;
    let fx = Fixture::at("layout_az", &format!("az://{}", super::stores::CONTAINER), "IMAGEINDEX_AZURE_ENDPOINT");
    index_sync_and_change(&fx).await;
}
