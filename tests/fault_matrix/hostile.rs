//! Hostile files beside good ones in one sync: the good ones are indexed, the hostile ones
//! recorded with a reason, and the process's peak memory stays under its budget.

use image::{Rgb, RgbImage};
use imageindex::core::IndexKind;
use imageindex::sync::{SyncOptions, sync};

use super::consistency::{Consistency, consistency};
use super::matrix::{SERIAL, add_row, peak_rss_mib, reset_peak_rss, rss_mib};
use super::support::*;

#[tokio::test(flavor = "multi_thread")]
async fn hostile_files_beside_good_ones() {
    let _serial = SERIAL.lock().await;
    let fx = Fixture::new("matrix_hostile");
    upload_photos(&fx, 20).await;
    // Eight flat 8000 x 8000 JPEGs (64 MP each, the most the limit lets through: 192 MB decoded
    // at full size), a 1 x 1,000,000 PNG, and a 20000 x 20000 PNG bomb.
    let flat = jpeg(&RgbImage::from_pixel(8000, 8000, Rgb([20, 90, 200])), 80);
    for i in 0..8 {
        fx.source.put(&format!("huge/flat-{i}.jpg"), flat.clone()).await.unwrap();
    }
    fx.source.put("thin.png", flat_png(1, 1_000_000)).await.unwrap();
    fx.source.put("bomb.png", png_bomb()).await.unwrap();
    // The model's own working memory for a full batch is in the baseline, not the budget.
    let opts = SyncOptions { decode_memory: 256 << 20, fetch_memory: 64 << 20, ..Default::default() };
    model().embed(&vec![0.0; opts.batch_size * 3 * 224 * 224], opts.batch_size).unwrap();
    let b = fx.backends(IndexKind::Hnsw).await;

    reset_peak_rss();
    let baseline = rss_mib();
    let s = sync(&b, model(), &opts).await.unwrap();
    let peak = peak_rss_mib();
    let bound = baseline + ((opts.decode_memory + opts.fetch_memory) >> 20);
    eprintln!("peak RSS {peak} MiB: baseline {baseline} MiB + budgets -> bound {bound} MiB; {:?}", s.failures);
    let c = consistency(&fx, &b.index, &[]).await;
    add_row("hostile files (8 flat 8000x8000 JPEGs, a 1x1e6 PNG, a PNG bomb) beside 20 photos", &c);
    assert_eq!(c, Consistency { expected: 30, indexed: 28, failed: 2, ..Default::default() });
    assert!(peak <= bound, "peak RSS {peak} MiB is over the bound {bound} MiB");
    fx.cleanup().await;
}
