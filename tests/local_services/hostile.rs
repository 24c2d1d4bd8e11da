//! Hostile inputs and odd names, on the real services (issue 12): what a bucket holds or a client
//! sends never kills a process, halts the index, or reaches what it should not.

use imageindex::core::IndexKind;
use imageindex::serve::ServeConfig;
use imageindex::store::{Source, SourceConfig};

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
