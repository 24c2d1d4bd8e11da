//! The bucket misbehaving and racing the sync: an S3 proxy that fails, refuses, hides and adds
//! objects; a listing that is wrong; an upload during a listing; two syncs at once.

use std::collections::HashMap;
use std::sync::atomic::Ordering;

use imageindex::core::IndexKind;
use imageindex::sync::{DeletionGuard, SyncOptions, sync};

use super::consistency::{Consistency, consistency};
use super::matrix::{SERIAL, add_row, reset_peak_rss};
use super::s3_proxy::S3Proxy;
use super::support::*;

/// 500s on a third of the GETs, one object denied (403), one gone between list and get, one
/// replaced by a larger one, and keys object_store cannot hold in the listing: all in one run,
/// every good object indexed, every other one recorded with its reason. The next run, with the
/// bucket healthy, picks up what was refused.
#[tokio::test(flavor = "multi_thread")]
async fn a_misbehaving_bucket_loses_nothing_and_stops_nothing() {
    let _serial = SERIAL.lock().await;
    reset_peak_rss();
    let fx = Fixture::new("faults_bucket");
    let photos = upload_photos(&fx, 40).await;
    let big = jpeg(&photo_set(41)[40].1, 100);
    fx.source.put("photos/replaced.jpg", big.clone()).await.unwrap();
    let proxy = S3Proxy::start().await;
    let f = &proxy.faults;
    let (denied, vanished) = (photos[3].0.clone(), photos[5].0.clone());
    f.deny.lock().unwrap().insert(denied.clone());
    f.vanish.lock().unwrap().insert(vanished.clone());
    *f.bucket.lock().unwrap() = Some(fx.source.clone());
    f.shrink.lock().unwrap().insert("photos/replaced.jpg".into());
    let odd: Vec<String> = ["a//b.jpg", "./dot.jpg", "x/../y.jpg", "ctl\u{1}.jpg"].map(String::from).into();
    *f.inject.lock().unwrap() = odd.clone();
    f.fail_every.store(3, Ordering::SeqCst);

    let index = fx.index(IndexKind::Hnsw).await;
    let backends = imageindex::sync::Backends { source: proxy.source(&fx), index };
    let opts = SyncOptions { max_object_bytes: big.len() as u64 - 1, ..Default::default() };
    let s = sync(&backends, model(), &opts).await.expect("the run goes on through the faults");
    let reasons: HashMap<&str, &str> = s.failures.iter().map(|(k, e)| (k.as_str(), e.as_str())).collect();
    eprintln!(
        "{} GETs, {} answered 500; failures: {reasons:#?}",
        f.object_gets.load(Ordering::SeqCst),
        f.injected_500s.load(Ordering::SeqCst)
    );
    assert!(f.injected_500s.load(Ordering::SeqCst) >= 10, "the 500s were injected");
    assert_eq!(s.indexed, 40 - 2, "every good object indexed in the same run: {reasons:#?}");
    assert!(reasons[denied.as_str()].contains("the bucket refused it"), "{reasons:#?}");
    assert!(reasons["photos/replaced.jpg"].contains("more than the limit"), "{reasons:#?}");
    for k in &odd {
        assert!(reasons[k.as_str()].contains("cannot be fetched safely"), "{k:?}: {reasons:#?}");
    }
    assert!(!reasons.contains_key(vanished.as_str()), "gone since the listing: not recorded");
    let c = consistency(&fx, &backends.index, &odd).await;
    add_row("bucket: 500 on 1/3 of GETs, a 403, deleted and grown after listing, 4 odd keys", &c);
    assert_eq!(c, Consistency { expected: 44, indexed: 38, failed: 6, ..Default::default() });

    // The bucket heals: the denied object is indexed; the rest stay recorded.
    f.deny.lock().unwrap().clear();
    f.vanish.lock().unwrap().clear();
    f.shrink.lock().unwrap().clear();
    f.fail_every.store(0, Ordering::SeqCst);
    let s = sync(&backends, model(), &opts).await.unwrap();
    assert_eq!((s.indexed, s.unchanged), (1, 38 + 5), "{:?}", s.failures);
    let c = consistency(&fx, &backends.index, &odd).await;
    assert_eq!(c, Consistency { expected: 44, indexed: 39, failed: 5, ..Default::default() });

    // Every GET failing, however often retried, is a bucket that is down, not 20 bad objects:
    // the run stops with the cause, and the next one indexes them.
    for (i, (_, img)) in photo_set(60).into_iter().skip(40).enumerate() {
        fx.source.put(&format!("more/{i}.jpg"), jpeg(&img, 85)).await.unwrap();
    }
    f.fail_every.store(1, Ordering::SeqCst);
    let err = sync(&backends, model(), &opts).await.unwrap_err().to_string();
    assert!(err.contains("fetching") && err.contains("500"), "{err}");
    f.fail_every.store(0, Ordering::SeqCst);
    assert_eq!(sync(&backends, model(), &opts).await.unwrap().indexed, 20);

    // A bucket that stays down stops the run with a clear error, and deletes nothing.
    f.down.store(true, Ordering::SeqCst);
    let err = sync(&backends, model(), &opts).await.unwrap_err().to_string();
    assert!(err.contains("listing the source"), "{err}");
    assert_eq!(backends.index.vectors.count().await.unwrap(), 59);
    fx.cleanup().await;
}

/// The bucket re-encrypted with a key the pods cannot use: every changed object's GET is refused
/// (400). Search keeps every older vector (stale, with the reason); once readable, every new
/// version replaces its old one, each exactly once.
#[tokio::test(flavor = "multi_thread")]
async fn a_bucket_that_refuses_every_changed_object_keeps_search_as_it_was() {
    let _serial = SERIAL.lock().await;
    reset_peak_rss();
    let fx = Fixture::new("faults_reencrypted");
    let photos = upload_photos(&fx, 20).await;
    let proxy = S3Proxy::start().await;
    let backends = imageindex::sync::Backends { source: proxy.source(&fx), index: fx.index(IndexKind::Hnsw).await };
    assert_eq!(sync(&backends, model(), &SyncOptions::default()).await.unwrap().indexed, 20);
    for (i, (key, _)) in photos.iter().enumerate() {
        fx.source.put(key, photos[(i + 7) % photos.len()].1.clone()).await.unwrap();
        proxy.faults.customer_key.lock().unwrap().insert(key.clone());
    }
    let s = sync(&backends, model(), &SyncOptions::default()).await.expect("refusals are outcomes, not a stop");
    assert_eq!((s.changed, s.failed, s.stale), (20, 20, 20), "{s:?}");
    let c = consistency(&fx, &backends.index, &[]).await;
    add_row("bucket: every changed object's GET refused (re-encrypted, SSE-C 400)", &c);
    assert_eq!(c, Consistency { expected: 20, indexed: 20, ..Default::default() });
    assert_eq!(backends.index.catalog.counts().await.unwrap().stale, 20);

    proxy.faults.customer_key.lock().unwrap().clear();
    let s = sync(&backends, model(), &SyncOptions::default()).await.unwrap();
    assert_eq!((s.changed, s.indexed, s.stale), (20, 20, 0), "{s:?}");
    let c = consistency(&fx, &backends.index, &[]).await;
    assert_eq!(c, Consistency { expected: 20, indexed: 20, ..Default::default() });
    assert_eq!(backends.index.catalog.counts().await.unwrap().stale, 0);
    fx.cleanup().await;
}

/// A typo'd prefix or an empty listing would have deleted the whole collection; it refuses, says
/// why, deletes nothing, and deletes when allowed.
#[tokio::test(flavor = "multi_thread")]
async fn a_wrong_listing_deletes_nothing() {
    let _serial = SERIAL.lock().await;
    reset_peak_rss();
    let fx = Fixture::new("faults_guard");
    upload_photos(&fx, 30).await;
    let index = fx.index(IndexKind::Hnsw).await;
    let right = imageindex::sync::Backends { source: fx.source.clone(), index };
    assert_eq!(fx.sync(&right).await.indexed, 30);
    // A prefix with nothing under it, and another folder with two other photos (a typo).
    let empty = Fixture::new("faults_guard_empty");
    let typo = Fixture::new("faults_guard_typo");
    upload_photos(&typo, 2).await;
    // The typo'd folder has two of the same keys (the same photos): 28 would go.
    let cases = [
        (&empty, "30 of the 30", "the listing is empty"),
        (&typo, "28 of the 30", "(93.3%, more than the 10% allowed)"),
    ];
    for (elsewhere, count, why) in cases {
        let wrong =
            imageindex::sync::Backends { source: elsewhere.source.clone(), index: fx.index(IndexKind::Hnsw).await };
        let err = sync(&wrong, model(), &SyncOptions::default()).await.unwrap_err().to_string();
        assert!(err.contains(&format!("refusing to delete {count}")) && err.contains(why), "{err}");
        assert!(err.contains("--allow-mass-delete"), "says how to go on: {err}");
        let c = consistency(&fx, &right.index, &[]).await;
        assert_eq!(c, Consistency { expected: 30, indexed: 30, ..Default::default() }, "{}", elsewhere.source_url);
        if elsewhere.source_url == empty.source_url {
            add_row("mass-deletion guard: the sync pointed at an empty prefix", &c);
        }
        let progress = right.index.catalog.progress().await.unwrap();
        assert_eq!(progress.run.unwrap().status, "failed", "the refusal is the run's outcome");
    }
    // Allowed, the listing's word goes: 28 deleted, the 2 shared keys unchanged.
    let wrong = imageindex::sync::Backends { source: typo.source.clone(), index: fx.index(IndexKind::Hnsw).await };
    let allow = SyncOptions { deletion: DeletionGuard { allow: true, ..Default::default() }, ..Default::default() };
    let s = sync(&wrong, model(), &allow).await.unwrap();
    assert_eq!((s.deleted, s.unchanged, s.vectors), (28, 2, 2));
    fx.cleanup().await;
}

/// An upload that lands while a sync is listing is "gone" by that listing's word; the sync deleted
/// it. Now rows written after the listing began, and objects a HEAD still finds, are kept.
#[tokio::test(flavor = "multi_thread")]
async fn writes_during_a_listing_survive_the_sync() {
    let _serial = SERIAL.lock().await;
    reset_peak_rss();
    let fx = Fixture::new("faults_race");
    upload_photos(&fx, 12).await;
    let proxy = S3Proxy::start().await;
    let backends = imageindex::sync::Backends { source: proxy.source(&fx), index: fx.index(IndexKind::Hnsw).await };
    assert_eq!(sync(&backends, model(), &SyncOptions::default()).await.unwrap().indexed, 12);

    let (read_tx, read_rx) = tokio::sync::oneshot::channel();
    let (release_tx, release_rx) = tokio::sync::oneshot::channel();
    *proxy.faults.hold_listing.lock().unwrap() = Some((read_tx, release_rx));
    let running =
        tokio::spawn(async move { sync(&backends, model(), &SyncOptions::default()).await.map(|s| (s, backends)) });
    read_rx.await.unwrap();
    // What `POST /img/upload` does, while the listing is on its way: the bucket, then the index.
    let writer = fx.index(IndexKind::Hnsw).await;
    let img = jpeg(&photo_set(13)[12].1, 90);
    let key = "uploads/fresh.jpg";
    fx.source.put(key, img.clone()).await.unwrap();
    let id = imageindex::store::key_id(key);
    let record = imageindex::store::Record::indexed(key, None, img.len() as u64, None);
    let vectors = vec![imageindex::store::Vector { id, key: key.into(), embedding: embed(&img) }];
    writer.write(imageindex::index::WriteBatch { vectors, records: vec![record], remove: vec![] }).await.unwrap();
    release_tx.send(()).unwrap();
    let (s, backends) = running.await.unwrap().unwrap();
    // The plan reads the catalog beside the listing: it either never saw the upload's row, or
    // saw it missing from the listing and kept it (written since the listing began).
    assert_eq!(s.deleted, 0, "the upload was deleted as gone: {s:?}");
    assert_eq!(backends.index.vectors.existing(&[id]).await.unwrap(), [id]);
    let c = consistency(&fx, &backends.index, &[]).await;
    add_row("an upload through the API during the sync's listing", &c);
    assert_eq!(c, Consistency { expected: 13, indexed: 13, ..Default::default() });
    fx.cleanup().await;
}

/// Two syncs of one collection at once (an old and a new Job, the CLI beside the operator).
#[tokio::test(flavor = "multi_thread")]
async fn two_syncs_at_once_converge() {
    let _serial = SERIAL.lock().await;
    reset_peak_rss();
    let fx = Fixture::new("faults_twice");
    upload_photos(&fx, 40).await;
    let (a, b) = (fx.backends(IndexKind::Hnsw).await, fx.backends(IndexKind::Hnsw).await);
    let opts = SyncOptions::default();
    let (ra, rb) = tokio::join!(sync(&a, model(), &opts), sync(&b, model(), &opts));
    let (ra, rb) = (ra.unwrap(), rb.unwrap());
    assert_eq!((ra.failed, rb.failed), (0, 0));
    let c = consistency(&fx, &a.index, &[]).await;
    add_row("two syncs of one collection at once", &c);
    assert_eq!(c, Consistency { expected: 40, indexed: 40, ..Default::default() });
    fx.cleanup().await;
}
