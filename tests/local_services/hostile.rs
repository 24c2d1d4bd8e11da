//! Hostile inputs and odd names, on the real services (issue 12): what a bucket holds or a client
//! sends never kills a process, halts the index, or reaches what it should not.

use imageindex::bucket::{Source, SourceConfig};
use imageindex::core::IndexKind;
use imageindex::serve::ServeConfig;

use super::serve::{Server, assert_error};
use super::support::*;

/// A 1 x 1,000,000 PNG (a few KB) asked the resize for 256 x 256,000,000 pixels and killed the
/// server; it is a 400 now, with a request id that the log shares. Objects recorded as failed are
/// not served, and `_` in a prefix is a character, not Milvus's one-character wildcard.
#[tokio::test(flavor = "multi_thread")]
async fn thin_images_failed_objects_and_underscores_in_prefixes() {
    let fx = Fixture::new("hostile_serve");
    let photos = photo_set(3);
    for (key, bytes) in [
        ("user_1/a.jpg", jpeg(&photos[0].1, 90)),
        ("userX1/b.jpg", jpeg(&photos[0].1, 80)),
        ("notes.jpg", "not an image, whatever its name".into()),
        ("thin.png", flat_png(1, 1_000_000)),
    ] {
        fx.source.put(key, bytes).await.unwrap();
    }
    let b = fx.backends(IndexKind::Hnsw).await;
    let summary = fx.sync(&b).await;
    assert_eq!((summary.indexed, summary.failed), (2, 2), "{:?}", summary.failures);
    let thin = summary.failures.iter().find(|(k, _)| k == "thin.png").expect("thin.png recorded");
    assert!(thin.1.contains("aspect ratio"), "{}", thin.1);

    let srv = Server::start(&fx, b, ServeConfig::default()).await;
    let resp = srv
        .http
        .post(srv.url("img/search"))
        .multipart(Server::form(flat_png(1, 1_000_000).to_vec(), "3"))
        .send()
        .await
        .unwrap();
    let id = resp.headers().get("x-request-id").expect("a request id").to_str().unwrap().to_string();
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["request_id"], id.as_str(), "{body}");
    assert_error((400, body), 400, "bad_image");
    let wide = srv.search(flat_png(65_000, 1).to_vec(), "3").await;
    assert_error(wide, 400, "bad_image");

    // The failed object is in the catalog, but only indexed images are served.
    assert_error(Server::json(srv.http.get(srv.url("img/object/notes.jpg"))).await, 404, "not_found");
    assert_eq!(srv.http.get(srv.url("img/object/user_1/a.jpg")).send().await.unwrap().status(), 200);

    let form = Server::form(near_duplicate(&jpeg(&photos[0].1, 90)), "10").text("prefix", "user_1/");
    let (status, body) = Server::json(srv.http.post(srv.url("img/search")).multipart(form)).await;
    assert_eq!(status, 200, "{body}");
    let keys: Vec<&str> = body["results"].as_array().unwrap().iter().map(|h| h["key"].as_str().unwrap()).collect();
    assert_eq!(keys, ["user_1/a.jpg"], "userX1/ matched user_1/");
    fx.cleanup().await;
}

/// `s3://bucket/my photos/` arrives percent-encoded (`my%20photos`); it listed nothing.
#[tokio::test(flavor = "multi_thread")]
async fn percent_encoded_and_non_ascii_prefixes_list_their_objects() {
    let fx = Fixture::new("hostile_prefix");
    let img = jpeg(&photo_set(1)[0].1, 90);
    for key in ["my photos/a.jpg", "фото/b.jpg", "other/c.jpg"] {
        fx.source.put(key, img.clone()).await.unwrap();
    }
    for (prefix, key) in [("my photos/", "a.jpg"), ("my%20photos/", "a.jpg"), ("фото/", "b.jpg")] {
        let url = format!("{}{prefix}", fx.source_url);
        let endpoint = Some(env("IMAGEINDEX_S3_ENDPOINT"));
        let source = Source::open(&SourceConfig { url: url.clone(), endpoint, ..Default::default() }).unwrap();
        let keys: Vec<String> = source.list().await.unwrap().into_iter().map(|o| o.key).collect();
        assert_eq!(keys, [key], "{url}");
        assert_eq!(source.get(key).await.unwrap(), img);
    }
}

/// A client that never finishes its headers held a connection (and a task) for ever, and any
/// number of them could: `axum::serve` had no header timeout and no connection bound.
#[tokio::test(flavor = "multi_thread")]
async fn slow_clients_and_connection_floods_are_cut_off() {
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let fx = Fixture::new("hostile_slow");
    let connections =
        imageindex::serve::ConnectionLimits { header_timeout: Duration::from_secs(1), max_connections: 8 };
    let srv =
        Server::start(&fx, fx.backends(IndexKind::Hnsw).await, ServeConfig { connections, ..Default::default() }).await;
    let addr = srv.base.trim_start_matches("http://").to_string();

    // Slowloris: half a request line, then a byte now and then. Cut off after the header timeout.
    let mut slow = tokio::net::TcpStream::connect(&addr).await.unwrap();
    slow.write_all(b"POST /img/search HTTP/1.1\r\nHost: x\r\n").await.unwrap();
    let cut = tokio::time::timeout(Duration::from_secs(5), async {
        let mut buf = [0u8; 256];
        loop {
            let _ = slow.write_all(b"X").await;
            match slow.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {} // a 408, then the close
            }
        }
    });
    assert!(cut.await.is_ok(), "the slow client was still connected after 5 s");

    // A flood of idle connections: beyond 8, each is closed as it is accepted.
    let mut idle = Vec::new();
    for _ in 0..30 {
        idle.push(tokio::net::TcpStream::connect(&addr).await.unwrap());
    }
    let mut closed = 0;
    for c in &mut idle {
        let mut buf = [0u8; 16];
        if let Ok(Ok(0)) = tokio::time::timeout(Duration::from_millis(300), c.read(&mut buf)).await {
            closed += 1;
        }
    }
    assert!(closed >= 20, "only {closed} of 30 connections beyond the limit of 8 were closed");
    // The idle ones time out too, and the service answers again.
    drop(idle);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(srv.http.get(srv.url("healthz")).send().await.unwrap().status(), 200);
    fx.cleanup().await;
}

/// Connections that send nothing (not a byte, or only part of the HTTP/2 preface, or the preface
/// and then no request) held a slot for ever: hyper's header timeout starts with a request, and
/// the version sniffing before it has none. With every slot taken, probes still answer (a probe
/// connection of its own), anything else there is a 503, and the idle ones are cut off.
#[tokio::test(flavor = "multi_thread")]
async fn connections_that_send_nothing_are_cut_off_and_probes_answer_meanwhile() {
    use std::time::{Duration, Instant};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let fx = Fixture::new("hostile_idle");
    let connections =
        imageindex::serve::ConnectionLimits { header_timeout: Duration::from_secs(1), max_connections: 8 };
    let srv =
        Server::start(&fx, fx.backends(IndexKind::Hnsw).await, ServeConfig { connections, ..Default::default() }).await;
    let addr = srv.base.trim_start_matches("http://").to_string();
    const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    // What readiness says with slots to spare (this fixture has no collection yet: a 503 of its own).
    let ready = srv.http.get(srv.url("readyz")).send().await.unwrap().status().as_u16();
    let mut idle = Vec::new();
    for i in 0..8 {
        let mut c = tokio::net::TcpStream::connect(&addr).await.unwrap();
        match i % 4 {
            0 => {}                                                                             // nothing at all
            1 => c.write_all(&PREFACE[..10]).await.unwrap(),                                    // part of the preface
            2 => c.write_all(&[PREFACE, &[0, 0, 0, 4, 0, 0, 0, 0, 0]].concat()).await.unwrap(), // preface + SETTINGS
            _ => c.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap(), // one request, then idle
        }
        idle.push(c);
    }
    let opened = Instant::now();
    tokio::time::sleep(Duration::from_millis(200)).await;

    // Every slot is taken: a probe still answers, and search is told to come back.
    let fresh = || reqwest::Client::builder().pool_max_idle_per_host(0).build().unwrap();
    for (probe, answer) in [("healthz", 200), ("readyz", ready)] {
        let r = fresh().get(srv.url(probe)).send().await.expect("a probe while every slot is taken");
        assert_eq!(r.status(), answer, "{probe}: {}", r.text().await.unwrap());
    }
    let busy = fresh().get(srv.url("openapi.json")).send().await.unwrap();
    assert_eq!(busy.status(), 503);

    // Each idle connection is closed after the header timeout (1 s), well within 5 s.
    for (i, c) in idle.iter_mut().enumerate() {
        let closed = tokio::time::timeout(Duration::from_secs(5), async {
            let mut buf = [0u8; 1024];
            loop {
                match c.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {} // a response, a SETTINGS frame, a GOAWAY: then the close
                }
            }
        });
        assert!(closed.await.is_ok(), "idle connection {i} still open after 5 s");
    }
    assert!(opened.elapsed() >= Duration::from_millis(900), "closed before the timeout: {:?}", opened.elapsed());
    assert_eq!(fresh().get(srv.url("openapi.json")).send().await.unwrap().status(), 200, "the slots are free again");
    fx.cleanup().await;
}

/// Every request was counted under its HTTP method, before auth, and hyper accepts any extension
/// method: a client could add a time series to /metrics per request. Unknown ones are `other`.
#[tokio::test(flavor = "multi_thread")]
async fn request_methods_a_client_makes_up_are_not_metric_labels() {
    let fx = Fixture::new("hostile_methods");
    let srv = Server::start(&fx, fx.backends(IndexKind::Hnsw).await, ServeConfig::default()).await;
    for i in 0..20 {
        let method = reqwest::Method::from_bytes(format!("MADEUP{i}").as_bytes()).unwrap();
        let r = srv.http.request(method, srv.url("img/count")).send().await.unwrap();
        assert_eq!(r.status(), 405);
    }
    let metrics = srv.http.get(srv.url("metrics")).send().await.unwrap().text().await.unwrap();
    assert!(!metrics.contains("MADEUP"), "a client's method became a label:\n{metrics}");
    let other = metrics.lines().find(|l| l.contains(r#"method="other""#));
    assert!(other.is_some_and(|l| l.ends_with(" 20")), "{metrics}");
    fx.cleanup().await;
}

/// reqwest puts the URL in its errors, and a listing's URL is presigned: its query holds the
/// access key id, the signature and any session token. A listing that cannot reach the bucket
/// carried all three into the sync's error, and from there into the plan's report and status.
#[tokio::test(flavor = "multi_thread")]
async fn a_failed_listing_does_not_carry_its_signature() {
    use imageindex::sync::{Backends, SyncOptions, sync};
    let fx = Fixture::new("listing_secrets");
    // A port nothing listens on: every attempt is a transport error that names the URL.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let endpoint = Some(format!("http://127.0.0.1:{port}"));
    let source = Source::open(&SourceConfig { url: fx.source_url.clone(), endpoint, ..Default::default() }).unwrap();
    let b = Backends { source, index: fx.index(IndexKind::Hnsw).await };
    let err = sync(&b, model(), &SyncOptions::default()).await.unwrap_err();
    let told = format!("{err} | {err:?}");
    let told = format!("{told} | {:#}", anyhow::Error::from(err));
    assert!(told.contains("listing the source") && told.contains(&format!("127.0.0.1:{port}")), "{told}");
    // (The local access key id is also the bucket's name: the credential parameter is what names it.)
    for secret in ["X-Amz-Credential", "X-Amz-Signature", "X-Amz-Algorithm"] {
        assert!(!told.contains(secret), "{secret} in {told}");
    }
    fx.cleanup().await;
}

/// A query took its embedding slot before its body was read, so a few slow clients (2 x cores +
/// the queue's 32 by default) held every slot while they trickled their bodies in, and real
/// searches got 503. Bodies are read on a memory budget of their own now; the slot is taken once
/// there is an image to embed.
#[tokio::test(flavor = "multi_thread")]
async fn slow_bodies_do_not_hold_the_embedding_slots() {
    use std::time::{Duration, Instant};
    use tokio::io::AsyncWriteExt;
    let fx = Fixture::new("hostile_slow_bodies");
    let photos = upload_photos(&fx, 2).await;
    let b = fx.backends(IndexKind::Hnsw).await;
    fx.sync(&b).await;
    let config = ServeConfig {
        max_concurrent_embeddings: 2,
        max_queued_embeddings: 2,
        queue_timeout: Duration::from_millis(500),
        request_timeout: Duration::from_secs(10),
        ..Default::default()
    };
    let srv = Server::start(&fx, b, config).await;
    let addr = srv.base.trim_start_matches("http://").to_string();
    // 20 clients announce a 100 kB query and send 100 bytes of it.
    let mut slow = Vec::new();
    for _ in 0..20 {
        let mut c = tokio::net::TcpStream::connect(&addr).await.unwrap();
        let head = "POST /img/search HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n\
                    Content-Length: 100000\r\n\r\n--b\r\nContent-Disposition: form-data; name=\"image\"\r\n\r\n";
        c.write_all(head.as_bytes()).await.unwrap();
        c.write_all(&[0u8; 100]).await.unwrap();
        slow.push(c);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    for (i, (_, photo)) in photos.iter().enumerate() {
        let t = Instant::now();
        let (status, body) = srv.search(photo.to_vec(), "1").await;
        assert_eq!(status, 200, "search {i} beside 20 slow bodies: {body}");
        eprintln!("search {i} beside 20 slow bodies: {:.0} ms", t.elapsed().as_secs_f64() * 1e3);
    }
    drop(slow);
    fx.cleanup().await;
}
