//! Milvus and MariaDB killed (SIGKILL) in the middle of a sync, restarted, and the sync run
//! again: it converges, with every object once in each and nothing else.

use std::time::Duration;

use imageindex::core::IndexKind;
use imageindex::sync::{SyncOptions, sync};

use super::consistency::{Consistency, consistency};
use super::matrix::{SERIAL, add_row, kill, reset_peak_rss, restart_services};
use super::support::*;

const PHOTOS: usize = 200;

/// Runs a sync of the fixture in the background, kills `service` once the catalog says 40 objects
/// are written, waits for the run to end (it stops with the cause, or rides through), restarts the
/// service and runs the sync again.
async fn kill_in_the_middle(fx: &Fixture, service: &str) -> Consistency {
    let b = fx.backends(IndexKind::Hnsw).await;
    let watch = fx.index(IndexKind::Hnsw).await;
    let opts = SyncOptions { batch_size: 8, ..Default::default() };
    let running = tokio::spawn(async move { sync(&b, model(), &opts).await.map(|s| s.indexed) });
    while watch.catalog.counts().await.unwrap().indexed < 40 {
        assert!(!running.is_finished(), "the run ended before the kill");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    kill(service);
    let first = tokio::time::timeout(Duration::from_secs(300), running).await.expect("the run ends").unwrap();
    match &first {
        Ok(indexed) => eprintln!("{service} killed: the run rode through ({indexed} indexed)"),
        Err(e) => eprintln!("{service} killed: the run stopped: {e}"),
    }
    restart_services().await;
    let b = fx.backends(IndexKind::Hnsw).await;
    let s = sync(&b, model(), &SyncOptions::default()).await.expect("the re-run after the restart");
    eprintln!("re-run: {s:?}");
    consistency(fx, &b.index, &[]).await
}

#[tokio::test(flavor = "multi_thread")]
async fn milvus_killed_in_the_middle_of_a_sync() {
    let _serial = SERIAL.lock().await;
    let fx = Fixture::new("matrix_milvus");
    upload_photos(&fx, PHOTOS).await;
    reset_peak_rss();
    let c = kill_in_the_middle(&fx, "milvus").await;
    add_row("Milvus SIGKILLed in the middle of a sync, restarted, re-run", &c);
    assert_eq!(c, Consistency { expected: PHOTOS, indexed: PHOTOS, ..Default::default() });
    fx.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn mariadb_killed_in_the_middle_of_a_sync() {
    let _serial = SERIAL.lock().await;
    let fx = Fixture::new("matrix_mariadb");
    upload_photos(&fx, PHOTOS).await;
    reset_peak_rss();
    let c = kill_in_the_middle(&fx, "mysql").await;
    add_row("MariaDB SIGKILLed in the middle of a sync, restarted, re-run", &c);
    assert_eq!(c, Consistency { expected: PHOTOS, indexed: PHOTOS, ..Default::default() });
    fx.cleanup().await;
}
