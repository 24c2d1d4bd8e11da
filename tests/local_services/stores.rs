//! Buckets on other clouds: `az://` on Azurite (Microsoft's Azure Storage emulator, with
//! shared-key auth as an account key gives) and `gs://` through Google Cloud Storage's XML API.

use http::Method;
use imageindex::bucket::{Source, SourceConfig};
use imageindex::core::IndexKind;
use object_store::azure::{AzureAccessKey, AzureAuthorizer, AzureCredential};
use object_store::client::{HttpRequest, HttpRequestBody};

use super::support::*;

pub const CONTAINER: &str = "imageindex-test";

/// A request to Azurite signed with the account key: what object_store cannot send (it makes no
/// containers, and its paths cannot hold `a//b.jpg`).
async fn azure(method: Method, path_and_query: &str, body: &'static [u8]) -> reqwest::StatusCode {
    imageindex::install_crypto();
    let account = env("AZURE_STORAGE_ACCOUNT_NAME");
    let credential = AzureCredential::AccessKey(AzureAccessKey::try_new(&env("AZURE_STORAGE_ACCOUNT_KEY")).unwrap());
    let url = format!("{}/{path_and_query}", env("IMAGEINDEX_AZURE_ENDPOINT"));
    let mut req = HttpRequest::new(HttpRequestBody::from(body.to_vec()));
    *req.method_mut() = method.clone();
    *req.uri_mut() = url.parse().unwrap();
    req.headers_mut().insert("x-ms-blob-type", "BlockBlob".parse().unwrap());
    req.headers_mut().insert("content-length", body.len().to_string().parse().unwrap());
    AzureAuthorizer::new(&credential, &account).try_authorize(&mut req).unwrap();
    let mut out = reqwest::Client::new().request(method, url).body(body);
    for (k, v) in req.headers() {
        out = out.header(k, v);
    }
    out.send().await.unwrap().status()
}

/// The test container, made if it is not there.
pub async fn create_container() {
    let created = azure(Method::PUT, &format!("{CONTAINER}?restype=container"), b"").await;
    assert!(created.is_success() || created == reqwest::StatusCode::CONFLICT, "creating the container: {created}");
}

/// An az:// source indexes, syncs and deletes as an s3:// one does. Keys object_store's paths
/// cannot hold (`a//b.jpg`, a control character) are listed, fail alone with a reason and stop
/// nothing; an unchanged container re-embeds nothing (Azure lists etags bare and sends them
/// quoted: the catalog must not see a change). Azure lists names with characters XML cannot carry
/// (below U+0020) percent-encoded, which Azurite cannot (a 500): the unit test of the page parser
/// covers those; DEL is a control character XML can carry.
#[tokio::test(flavor = "multi_thread")]
async fn azure_container_indexes_syncs_and_survives_odd_names() {
    create_container().await;
    let fx = Fixture::at("azure", &format!("az://{CONTAINER}"), "IMAGEINDEX_AZURE_ENDPOINT");
    let photos = photo_set(3);
    for (key, img) in &photos {
        fx.source.put(key, jpeg(img, 90)).await.unwrap();
    }
    for odd in ["a//b.jpg", "del%7F.jpg"] {
        let status = azure(Method::PUT, &format!("{CONTAINER}/{}/{odd}", fx.name), b"not fetched").await;
        assert!(status.is_success(), "writing {odd}: {status}");
    }
    let listed: Vec<String> = fx.source.list().await.unwrap().into_iter().map(|o| o.key).collect();
    let mut expected: Vec<String> = photos.iter().map(|(k, _)| k.clone()).collect();
    expected.extend(["a//b.jpg".to_string(), "del\u{7f}.jpg".to_string()]);
    expected.sort();
    assert_eq!(listed, expected);

    let b = fx.backends(IndexKind::Hnsw).await;
    let first = fx.sync(&b).await;
    assert_eq!((first.new, first.indexed, first.failed), (5, 3, 2), "{:?}", first.failures);
    assert!(first.failures.iter().all(|(_, why)| why.contains("cannot be fetched safely")), "{:?}", first.failures);
    let again = fx.sync(&b).await;
    assert_eq!((again.unchanged, again.new, again.changed, again.indexed), (5, 0, 0, 0), "{again:?}");

    fx.source.delete(&photos[0].0).await.unwrap();
    let after = fx.sync(&b).await;
    assert_eq!((after.deleted, after.unchanged, after.vectors), (1, 4, 2), "{after:?}");
    fx.cleanup().await;
}

/// Azure takes names of 1024 characters, up to about 3 KB of UTF-8 here (and 4 KB with
/// characters outside the BMP), which S3 and GCS do not. Three such names that share their first
/// 1024 bytes and one short name index, sync unchanged, and delete as any others; the catalog
/// reads them back in the listing's order, also a page of two at a time, which cuts their group.
#[tokio::test(flavor = "multi_thread")]
async fn azure_names_of_1024_characters_are_indexed_in_order() {
    create_container().await;
    let fx = Fixture::at("azure_long", &format!("az://{CONTAINER}"), "IMAGEINDEX_AZURE_ENDPOINT");
    // Azure's limit counts the whole name: the fixture's prefix, a slash, then ours.
    let room = 1024 - fx.name.chars().count() - 1;
    let han = "\u{6F22}".repeat(room - 6);
    let keys = [format!("{han}xx.jpg"), format!("{han}a.jpeg"), format!("{han}b.jpeg"), "short.jpg".to_string()];
    assert_eq!(keys[0].chars().count(), room);
    assert!(keys[0].len() > 2900, "{} bytes", keys[0].len());
    for (key, (_, img)) in keys.iter().zip(photo_set(4)) {
        fx.source.put(key, jpeg(&img, 90)).await.unwrap();
    }
    let b = fx.backends(IndexKind::Hnsw).await;
    let first = fx.sync(&b).await;
    assert_eq!((first.new, first.indexed, first.failed), (4, 4, 0), "{:?}", first.failures);
    let again = fx.sync(&b).await;
    assert_eq!((again.unchanged, again.new, again.deleted), (4, 0, 0), "{again:?}");

    let mut sorted = keys.to_vec();
    sorted.sort();
    let mut cursor = Default::default();
    let mut read = vec![];
    loop {
        let (page, last) = b.index.catalog.entries_page(&mut cursor, 2).await.unwrap();
        read.extend(page.into_iter().map(|e| e.key));
        if last {
            break;
        }
    }
    assert_eq!(read, sorted, "the catalog in key order, two at a time");
    let hits = b.index.vectors.search(embed(&jpeg(&photo_set(4)[1].1, 90)), 1, None).await.unwrap();
    assert_eq!(hits[0].key, keys[1], "a 3 KB key comes back whole from Milvus");

    fx.source.delete(&keys[1]).await.unwrap();
    let after = fx.sync(&b).await;
    assert_eq!((after.deleted, after.unchanged, after.vectors), (1, 3, 3), "{after:?}");
    fx.cleanup().await;
}

/// A gs:// source speaks Google Cloud Storage's XML API: ListObjectsV2 for the listing, object
/// GETs through object_store's GCS client. No GCS emulator with that API runs here, so this reads
/// a public bucket (no token, `GOOGLE_SKIP_SIGNATURE`) that SeaweedFS serves anonymously; the
/// bearer token that authorizes a private bucket on Google Cloud is not exercised.
#[tokio::test(flavor = "multi_thread")]
async fn public_gcs_bucket_indexes_through_the_xml_api() {
    let writer = Fixture::at("gcs", "s3://imageindex-public", "IMAGEINDEX_S3_ENDPOINT");
    let photos = photo_set(3);
    for (key, img) in &photos {
        writer.source.put(key, jpeg(img, 90)).await.unwrap();
    }
    let url = format!("gs://imageindex-public/{}/", writer.name);
    let config = SourceConfig { url: url.clone(), endpoint: Some(env("IMAGEINDEX_S3_ENDPOINT")), ..Default::default() };
    let fx = Fixture { source: Source::open(&config).unwrap(), source_url: url, name: writer.name.clone() };
    let mut keys: Vec<String> = photos.iter().map(|(k, _)| k.clone()).collect();
    keys.sort();
    let listed: Vec<String> = fx.source.list().await.unwrap().into_iter().map(|o| o.key).collect();
    assert_eq!(listed, keys);

    let b = fx.backends(IndexKind::Hnsw).await;
    let first = fx.sync(&b).await;
    assert_eq!((first.new, first.indexed, first.failed), (3, 3, 0), "{:?}", first.failures);
    let again = fx.sync(&b).await;
    assert_eq!((again.unchanged, again.indexed), (3, 0), "{again:?}");
    writer.source.delete(&photos[0].0).await.unwrap();
    let after = fx.sync(&b).await;
    assert_eq!((after.deleted, after.vectors), (1, 2), "{after:?}");
    fx.cleanup().await;
}
