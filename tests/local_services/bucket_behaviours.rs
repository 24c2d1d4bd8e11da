//! What real buckets do that the local server does not, through the S3 proxy in front of it:
//! archive storage classes, customer-key encryption, keys at S3's length limit, and listings that
//! loop or repeat a page. Each is an outcome for one object, or a plan stopped with a clear
//! error; never a run that stops halfway or deletes.

use std::sync::atomic::Ordering;

use bytes::Bytes;

use imageindex::core::IndexKind;
use imageindex::store::Counts;
use imageindex::sync::{Backends, SyncOptions, sync};

use super::s3_proxy::S3Proxy;
use super::support::*;

/// `photos` indexed through a new S3 proxy, then each rewritten (new bytes, new etag) under a
/// customer key the pods lack: no GET can read them. A bucket re-encrypted behind the index's back.
async fn indexed_then_refused(fx: &Fixture, photos: &[(String, Bytes)]) -> (S3Proxy, Backends) {
    let proxy = S3Proxy::start().await;
    let b = Backends { source: proxy.source(fx), index: fx.index(IndexKind::Hnsw).await };
    assert_eq!(sync(&b, model(), &SyncOptions::default()).await.unwrap().indexed, photos.len());
    for (i, (key, _)) in photos.iter().enumerate() {
        fx.source.put(key, photos[(i + 1) % photos.len()].1.clone()).await.unwrap();
        proxy.faults.customer_key.lock().unwrap().insert(key.clone());
    }
    (proxy, b)
}

/// How many GETs of `key` the proxy saw.
fn gets(proxy: &S3Proxy, key: &str) -> usize {
    proxy.faults.gets.lock().unwrap().iter().filter(|k| *k == key).count()
}

/// Archived objects are skipped with their reason and never fetched again while the listing says
/// archived; an SSE-C object is recorded failed with the bucket's reason; a key of S3's 1024 bytes
/// is indexed and searchable; none of them stops the run. Restored, an archived object is indexed.
#[tokio::test(flavor = "multi_thread")]
async fn archived_encrypted_and_longest_keys_are_outcomes_of_their_own() {
    let fx = Fixture::new("behaviours");
    let photos = upload_photos(&fx, 6).await;
    // S3's limit counts the whole key: the fixture's prefix, then folders of at most 255 bytes.
    let room = 1024 - fx.name.len() - 1 - "/x.jpg".len();
    let long = format!("{}/{}/x.jpg", "l".repeat(255), "m".repeat(room - 256));
    assert_eq!(fx.name.len() + 1 + long.len(), 1024);
    fx.source.put(&long, photos[0].1.clone()).await.unwrap();
    let proxy = S3Proxy::start().await;
    let (glacier, tiered, sse_c) = (&photos[1].0, &photos[2].0, &photos[3].0);
    proxy.faults.glacier.lock().unwrap().insert(glacier.clone());
    proxy.faults.archived_tier.lock().unwrap().insert(tiered.clone());
    proxy.faults.customer_key.lock().unwrap().insert(sse_c.clone());
    let b = Backends { source: proxy.source(&fx), index: fx.index(IndexKind::Hnsw).await };

    let first = sync(&b, model(), &SyncOptions::default()).await.expect("one run for all of them");
    assert_eq!((first.new, first.indexed, first.failed), (7, 4, 3), "{:?}", first.failures);
    assert_eq!(b.index.catalog.counts().await.unwrap(), Counts { indexed: 4, failed: 1, skipped: 2, stale: 0 });
    let why = |key: &str| first.failures.iter().find(|(k, _)| k == key).map(|(_, e)| e.clone()).unwrap();
    assert!(why(glacier).contains("archive storage class"), "{}", why(glacier));
    assert!(why(tiered).contains("archived") && why(tiered).contains("InvalidObjectState"), "{}", why(tiered));
    assert!(why(sse_c).contains("refused") && why(sse_c).contains("400"), "{}", why(sse_c));
    assert_eq!((gets(&proxy, glacier), gets(&proxy, tiered)), (0, 1), "a listed GLACIER object is never fetched");
    let hits = b.index.vectors.search(embed(&photos[0].1), 10, None).await.unwrap();
    assert!(hits.iter().any(|h| h.key == long), "the 1024-byte key is searchable: {hits:?}");

    // A listed GLACIER object is not fetched again. An archived one its listing does not show
    // (an Intelligent-Tiering archive tier) is, since no listing would show its restore; so is
    // the refused read.
    let again = sync(&b, model(), &SyncOptions::default()).await.unwrap();
    assert_eq!((again.unchanged, again.changed), (5, 2), "{again:?}");
    assert_eq!((gets(&proxy, glacier), gets(&proxy, tiered), gets(&proxy, sse_c)), (0, 2, 2));

    // Restored to STANDARD (the same bytes and etag): fetched and indexed.
    proxy.faults.glacier.lock().unwrap().clear();
    let restored = sync(&b, model(), &SyncOptions::default()).await.unwrap();
    assert_eq!((restored.changed, restored.indexed), (3, 1), "{restored:?}");
    assert_eq!(gets(&proxy, glacier), 1);
    assert_eq!(b.index.catalog.counts().await.unwrap(), Counts { indexed: 5, failed: 1, skipped: 1, stale: 0 });
    fx.cleanup().await;
}

/// A listing whose continuation token comes back, or that sends a page twice, stops the plan
/// with an error that says so; nothing is indexed or deleted on its word.
#[tokio::test(flavor = "multi_thread")]
async fn a_looping_or_repeating_listing_stops_the_plan() {
    let fx = Fixture::new("listing_loops");
    upload_photos(&fx, 3).await;
    let proxy = S3Proxy::start().await;
    let b = Backends { source: proxy.source(&fx), index: fx.index(IndexKind::Hnsw).await };
    let first = sync(&b, model(), &SyncOptions::default()).await.unwrap();
    assert_eq!(first.indexed, 3);

    proxy.faults.token_loop.store(true, Ordering::SeqCst);
    let looped = tokio::time::timeout(std::time::Duration::from_secs(60), sync(&b, model(), &SyncOptions::default()))
        .await
        .expect("the listing must not go on forever")
        .unwrap_err();
    assert!(looped.to_string().contains("the listing loops"), "{looped}");
    proxy.faults.token_loop.store(false, Ordering::SeqCst);

    proxy.faults.repeat_page.store(true, Ordering::SeqCst);
    let repeated = sync(&b, model(), &SyncOptions::default()).await.unwrap_err();
    assert!(repeated.to_string().contains("twice"), "{repeated}");
    proxy.faults.repeat_page.store(false, Ordering::SeqCst);

    assert_eq!(b.index.catalog.counts().await.unwrap().indexed, 3);
    assert_eq!(b.index.vectors.count().await.unwrap(), 3);
    fx.cleanup().await;
}

/// A bucket re-encrypted with a key the pods cannot use (every changed object's GET answers 400)
/// leaves search as it was: each object keeps its older vector and row, marked stale with the
/// bucket's reason, counted on /progress and in the run's summary; once readable, the new
/// version replaces the old.
#[tokio::test(flavor = "multi_thread")]
async fn a_changed_object_that_cannot_be_read_keeps_its_older_vector() {
    let fx = Fixture::new("refused_change");
    let photos = upload_photos(&fx, 4).await;
    let (proxy, b) = indexed_then_refused(&fx, &photos).await;
    let refused = sync(&b, model(), &SyncOptions::default()).await.expect("refused reads are outcomes, not a stop");
    assert_eq!((refused.changed, refused.indexed, refused.failed, refused.stale), (4, 0, 4, 4), "{refused:?}");
    assert_eq!(b.index.vectors.count().await.unwrap(), 4, "no refused read takes a vector out of search");
    assert_eq!(b.index.catalog.counts().await.unwrap(), Counts { indexed: 4, failed: 0, skipped: 0, stale: 4 });
    let progress = b.index.catalog.progress().await.unwrap();
    assert_eq!((progress.indexed, progress.stale), (4, 4), "{progress:?}");
    let failures = b.index.catalog.failures(10).await.unwrap();
    assert!(failures.iter().all(|f| f.stale && f.error.contains("400")), "{failures:?}");
    let hits = b.index.vectors.search(embed(&photos[0].1), 1, None).await.unwrap();
    assert_eq!(hits[0].key, photos[0].0, "the older version still answers");
    assert!(b.index.counts_agree().await.unwrap());

    // The key is given to the pods: every object is read again and its new version indexed.
    proxy.faults.customer_key.lock().unwrap().clear();
    let readable = sync(&b, model(), &SyncOptions::default()).await.unwrap();
    assert_eq!((readable.changed, readable.indexed, readable.stale), (4, 4, 0), "{readable:?}");
    assert_eq!(b.index.catalog.counts().await.unwrap(), Counts { indexed: 4, failed: 0, skipped: 0, stale: 0 });
    let hits = b.index.vectors.search(embed(&photos[1].1), 1, None).await.unwrap();
    assert_eq!(hits[0].key, photos[0].0, "photos[0]'s key now holds photos[1]'s bytes");
    let again = sync(&b, model(), &SyncOptions::default()).await.unwrap();
    assert_eq!((again.unchanged, again.changed), (4, 0), "{again:?}");
    fx.cleanup().await;
}

/// A bucket whose objects the pods can no longer read (re-encrypted with a key they lack) and
/// whose listing lacks a few: the listing proves nothing gone while so many reads are refused,
/// so those deletions are held and search keeps everything; once the objects are read again,
/// the next plan makes them.
#[tokio::test(flavor = "multi_thread")]
async fn deletions_wait_while_the_bucket_refuses_most_reads() {
    let fx = Fixture::new("refused_deletes");
    let photos = upload_photos(&fx, 14).await;
    let (proxy, b) = indexed_then_refused(&fx, &photos).await;
    let refused = sync(&b, model(), &SyncOptions::default()).await.unwrap();
    assert_eq!((refused.stale, refused.held), (14, 0), "{refused:?}");

    // Two gone from the listing meanwhile: 2 of 14 is within the share one run may delete.
    for (key, _) in &photos[..2] {
        fx.source.delete(key).await.unwrap();
    }
    let held = sync(&b, model(), &SyncOptions::default()).await.unwrap();
    assert_eq!((held.held, held.deleted, held.stale), (2, 0, 12), "{held:?}");
    assert_eq!(b.index.vectors.count().await.unwrap(), 14, "nothing leaves search on a refused bucket's word");
    let plan = b.index.catalog.latest_plan().await.unwrap().unwrap();
    assert_eq!((plan.counts.held, plan.counts.deleted, plan.counts.stale), (2, 0, 14), "{plan:?}");

    // The key is given to the pods: the objects are read again, then the deletions are made.
    proxy.faults.customer_key.lock().unwrap().clear();
    let readable = sync(&b, model(), &SyncOptions::default()).await.unwrap();
    assert_eq!((readable.indexed, readable.stale, readable.held), (12, 0, 2), "{readable:?}");
    let deleted = sync(&b, model(), &SyncOptions::default()).await.unwrap();
    assert_eq!((deleted.deleted, deleted.held), (2, 0), "{deleted:?}");
    assert_eq!(b.index.vectors.count().await.unwrap(), 12);
    assert_eq!(b.index.catalog.counts().await.unwrap(), Counts { indexed: 12, failed: 0, skipped: 0, stale: 0 });
    fx.cleanup().await;
}
