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

/// Connections that send nothing take every slot of `serve` while a sync runs and a client
/// uploads through the API, retrying its 503s as a client does: the slots come back once the
/// idle ones are cut (the header timeout), probes answer throughout, and the index ends whole.
#[tokio::test(flavor = "multi_thread")]
async fn uploads_while_idle_connections_hold_every_slot() {
    use imageindex::serve::{AppState, ConnectionLimits, ServeConfig};
    use std::sync::Arc;
    use std::time::{Duration, Instant};
    let _serial = SERIAL.lock().await;
    let fx = Fixture::new("matrix_idle");
    upload_photos(&fx, 20).await;
    reset_peak_rss();
    let connections = ConnectionLimits { header_timeout: Duration::from_secs(1), max_connections: 8 };
    let config = ServeConfig { token: Some("matrix-token".into()), connections, ..Default::default() };
    let state = Arc::new(AppState::new(model(), fx.index(IndexKind::Hnsw).await, Some(fx.source.clone()), config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(imageindex::serve::serve_on(listener, state, std::future::pending()));
    let b = fx.backends(IndexKind::Hnsw).await;
    fx.sync(&b).await;

    let mut idle = Vec::new();
    for _ in 0..8 {
        idle.push(tokio::net::TcpStream::connect(addr).await.unwrap());
    }
    let http = || reqwest::Client::builder().pool_max_idle_per_host(0).build().unwrap();
    let more: Vec<_> = photo_set(23).into_iter().skip(20).map(|(_, img)| jpeg(&img, 88)).collect();
    fx.source.put("late/0.jpg", more[0].clone()).await.unwrap();
    let syncing = tokio::spawn(async move { fx_sync(b).await });
    let started = Instant::now();
    let (mut busy, mut probes) = (0, 0);
    for image in &more[1..] {
        loop {
            let form = reqwest::multipart::Form::new()
                .part("image", reqwest::multipart::Part::bytes(image.to_vec()).file_name("u.jpg"));
            let r = http().post(format!("http://{addr}/img/upload")).bearer_auth("matrix-token").multipart(form);
            match r.send().await.unwrap().status().as_u16() {
                201 => break,
                503 => busy += 1,
                other => panic!("upload answered {other}"),
            }
            let probe = http().get(format!("http://{addr}/healthz")).send().await.unwrap();
            assert_eq!(probe.status(), 200, "a probe while the slots are held");
            probes += 1;
            assert!(started.elapsed() < Duration::from_secs(30), "the slots never came back");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let index = syncing.await.unwrap();
    eprintln!("{busy} uploads told to come back (503), {probes} probes answered, {:?}", started.elapsed());
    assert!(busy > 0, "the idle connections held every slot");
    drop(idle);
    let c = consistency(&fx, &index, &[]).await;
    add_row("8 connections that send nothing hold every slot of serve during a sync; uploads retried", &c);
    assert_eq!(c, Consistency { expected: 23, indexed: 23, ..Default::default() });
    fx.cleanup().await;
}

/// The sync of `b` (the fixture's own helper, on a task of its own); its index, for the check.
async fn fx_sync(b: imageindex::sync::Backends) -> imageindex::index::Index {
    sync(&b, model(), &SyncOptions::default()).await.expect("sync");
    b.index
}
