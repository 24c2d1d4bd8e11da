//! The sync on the real services: index, search, resync, delete; index kinds; model checks.

use std::collections::HashSet;
use std::process::Command;

use bytes::Bytes;

use imageindex::core::{IndexKind, ModelId, Precision};
use imageindex::embed::{DecodeLimits, Preprocessor};
use imageindex::index::Repair;
use imageindex::store::{self, VectorStore, key_id, shard_ids};
use imageindex::sync::{DeletionGuard, SyncOptions, carry_out, plan};

use super::support::*;

#[tokio::test(flavor = "multi_thread")]
async fn index_search_resync_and_delete() {
    let fx = Fixture::new("e2e");
    let photos = upload_photos(&fx, 200).await;
    let truncated = photos[0].1.slice(..photos[0].1.len() / 3);
    fx.source.put("bad/truncated.jpg", truncated).await.unwrap();
    fx.source.put("bad/notes.jpg", Bytes::from_static(b"this is a text file, not a photo\n")).await.unwrap();
    fx.source.put("bad/bomb.png", png_bomb()).await.unwrap();

    // First run: the Jobs' path. `imageindex plan` lists the bucket once and records the work;
    // two shards carry it out as two `imageindex embed` processes side by side.
    let planned = Command::new(env!("CARGO_BIN_EXE_imageindex"))
        .arg("plan")
        .env("IMAGEINDEX_SOURCE", &fx.source_url)
        .env("IMAGEINDEX_COLLECTION", &fx.name)
        .output()
        .unwrap();
    assert!(planned.status.success(), "{}", String::from_utf8_lossy(&planned.stderr));
    let report: serde_json::Value = serde_json::from_slice(&planned.stdout).unwrap();
    assert_eq!((report["discovered"].as_u64(), report["pending"].as_u64()), (Some(203), Some(203)), "{report}");
    let plan = report["plan"].as_i64().expect("the plan's id").to_string();
    let shards: Vec<_> = (0..2)
        .map(|shard| {
            Command::new(env!("CARGO_BIN_EXE_imageindex"))
                .args(["embed", "--json", "--batch-size", "8", "--plan", &plan])
                .env("IMAGEINDEX_SOURCE", &fx.source_url)
                .env("JOB_COMPLETION_INDEX", shard.to_string())
                .env("IMAGEINDEX_SHARDS", "2")
                .env("IMAGEINDEX_COLLECTION", &fx.name)
                .env("IMAGEINDEX_THREADS", "1")
                // One shard keeps two batches in the model at once, as on a GPU.
                .env("IMAGEINDEX_SESSIONS", (shard + 1).to_string())
                .spawn()
                .unwrap()
        })
        .collect();
    for mut child in shards {
        assert!(child.wait().unwrap().success(), "an embed shard failed");
    }
    let b = fx.backends(IndexKind::Hnsw).await;
    assert_eq!(b.index.vectors.count().await.unwrap(), 200, "Milvus holds every good photo once");
    let counts = b.index.catalog.counts().await.unwrap();
    assert_eq!((counts.indexed, counts.failed), (200, 3));
    let failures = b.index.catalog.failures(10).await.unwrap();
    let reason = |key: &str| failures.iter().find(|f| f.key == key).map(|f| f.error.clone()).unwrap_or_default();
    assert!(reason("bad/truncated.jpg").contains("truncated JPEG"), "{failures:?}");
    assert!(reason("bad/notes.jpg").contains("not a supported image"), "{failures:?}");
    assert!(reason("bad/bomb.png").contains("20000x20000"), "{failures:?}");

    // Each shard reads exactly its own ids from Milvus and the catalog, and finds nothing to
    // repair (with `id % shards` in the filter, Milvus 2.3 answered a wrong set for 63-bit ids,
    // and a shard that finished first marked half the index to be embedded again).
    let all: HashSet<i64> = b.index.vectors.ids(0, 1).await.unwrap().into_iter().collect();
    assert_eq!(all.len(), 200);
    for shards in [2, 3] {
        let mut union = HashSet::new();
        for shard in 0..shards {
            let ids = b.index.vectors.ids(shard, shards).await.unwrap();
            assert!(ids.iter().all(|id| shard_ids(shard, shards).contains(id)), "shard {shard}/{shards}: {ids:?}");
            let rows = b.index.catalog.indexed_ids(shard, shards).await.unwrap();
            assert_eq!(ids.iter().collect::<HashSet<_>>(), rows.iter().collect(), "shard {shard}/{shards}");
            union.extend(ids);
            assert_eq!(b.index.repair(shard, shards).await.unwrap(), Repair::default());
        }
        assert_eq!(union, all, "{shards} shards do not cover the collection");
    }

    // Near-duplicate queries find their original first.
    for i in [0, 1, 2, 7, 50, 101, 150, 199] {
        let (key, bytes) = &photos[i];
        let hits = b.index.vectors.search(embed(&near_duplicate(bytes)), 5, None).await.unwrap();
        assert_eq!(&hits[0].key, key, "query {i}: top hits {hits:?}");
    }

    // Second run: nothing new, nothing duplicated.
    let s = fx.sync(&b).await;
    assert_eq!((s.discovered, s.new, s.changed, s.unchanged, s.indexed, s.failed), (203, 0, 0, 203, 0, 0));
    assert_eq!(s.vectors, 200, "the summary reports the collection's size");
    assert_eq!(b.index.vectors.count().await.unwrap(), 200);

    // Delete 10 objects: exactly those leave Milvus and the catalog.
    let gone: Vec<&str> = photos.iter().step_by(20).map(|(k, _)| k.as_str()).collect();
    assert_eq!(gone.len(), 10);
    for k in &gone {
        fx.source.delete(k).await.unwrap();
    }
    let s = fx.sync(&b).await;
    assert_eq!((s.deleted, s.new, s.indexed), (10, 0, 0));
    assert_eq!(b.index.vectors.count().await.unwrap(), 190);
    let gone_ids: Vec<i64> = gone.iter().map(|k| key_id(k)).collect();
    assert!(b.index.vectors.existing(&gone_ids).await.unwrap().is_empty(), "deleted objects still in Milvus");
    let kept_ids: Vec<i64> = photos.iter().skip(1).take(10).map(|(k, _)| key_id(k)).collect();
    assert_eq!(b.index.vectors.existing(&kept_ids).await.unwrap().len(), 10, "the wrong objects were deleted");
    let entries = b.index.catalog.entries(0, 1).await.unwrap();
    assert_eq!(entries.len(), 193);
    assert!(gone.iter().all(|k| !entries.contains_key(*k)));
    let (by_key, last) = b.index.catalog.entries_page(&mut Default::default(), 1000).await.unwrap();
    assert_eq!((by_key.len(), last), (193, true));
    assert!(by_key.windows(2).all(|w| w[0].key < w[1].key), "the catalog reads back in key order");

    // A changed object is re-embedded in place: the new content is found under the same key.
    let (key, _) = &photos[3];
    let replacement = jpeg(&synthetic(&mut Rng(42), 400, 300), 90);
    fx.source.put(key, replacement.clone()).await.unwrap();
    let s = fx.sync(&b).await;
    assert_eq!((s.changed, s.indexed, s.new), (1, 1, 0));
    assert_eq!(b.index.vectors.count().await.unwrap(), 190);
    let hits = b.index.vectors.search(embed(&near_duplicate(&replacement)), 3, None).await.unwrap();
    assert_eq!(&hits[0].key, key);

    // A changed object that is now broken loses its vector and is reported.
    let (key, _) = &photos[5];
    fx.source.put(key, Bytes::from_static(b"\xff\xd8\xff\xe0 broken")).await.unwrap();
    let s = fx.sync(&b).await;
    assert_eq!((s.changed, s.failed), (1, 1));
    assert!(b.index.vectors.existing(&[key_id(key)]).await.unwrap().is_empty());
    assert_eq!(b.index.vectors.count().await.unwrap(), 189);
    fx.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn ivf_flat_l2_collections_work_too() {
    let fx = Fixture::new("ivf");
    let photos = upload_photos(&fx, 24).await;
    let b = fx.backends(IndexKind::IvfFlat).await;
    let s = fx.sync(&b).await;
    assert_eq!((s.indexed, s.failed), (24, 0));
    let hits = b.index.vectors.search(embed(&near_duplicate(&photos[9].1)), 3, None).await.unwrap();
    assert_eq!(hits[0].key, photos[9].0);
    assert!(hits[0].score <= hits[1].score, "L2: smaller is closer");
    // A collection with another vector width is refused, not silently mixed.
    let other = VectorStore::connect(&fx.milvus(IndexKind::IvfFlat)).await.unwrap();
    let fp32 = model().id().clone();
    let err = other.ensure_collection(512, &fp32, false, true).await.unwrap_err();
    assert!(format!("{err:#}").contains("2048-d"), "{err:#}");
    // So are vectors of another precision or model, in Milvus and in the catalog alike.
    let int8 = ModelId { precision: Precision::Int8, ..fp32.clone() };
    let err = other.ensure_collection(2048, &int8, false, true).await.unwrap_err();
    assert!(format!("{err:#}").contains("holds fp32 vectors"), "{err:#}");
    other.ensure_collection(2048, &int8, true, true).await.expect("mixing when asked for");
    let err = b.index.catalog.claim_model(&int8, false, false).await.unwrap_err();
    assert!(format!("{err:#}").contains("the catalog of"), "{err:#}");
    let clip = ModelId { model: "clip.onnx".into(), ..fp32 };
    let err = other.ensure_collection(2048, &clip, true, true).await.unwrap_err();
    assert!(format!("{err:#}").contains("different models"), "{err:#}");
    fx.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn model_output_matches_the_reference_tensor_path() {
    // The Rust pipeline (decode + preprocess + model) against the model on the torchvision tensor:
    // the raw 2048-d outputs agree element-wise to a small relative error.
    let m = model();
    for stem in ["chelsea", "camera"] {
        let levels = std::fs::read(format!("{}/tests/fixtures/{stem}.levels.u8", env!("CARGO_MANIFEST_DIR"))).unwrap();
        let (mean, std) = ([0.485f32, 0.456, 0.406], [0.229f32, 0.224, 0.225]);
        let plane = levels.len() / 3;
        let reference: Vec<f32> =
            levels.iter().enumerate().map(|(i, &k)| (k as f32 / 255.0 - mean[i / plane]) / std[i / plane]).collect();
        let bytes = std::fs::read(format!("{}/tests/fixtures/{stem}.png", env!("CARGO_MANIFEST_DIR"))).unwrap();
        let ours = Preprocessor::default().from_bytes(&bytes, DecodeLimits::default(), m.preprocess()).unwrap();
        let out = m.embed(&[reference, ours].concat(), 2).unwrap();
        let rel = out[0].iter().zip(&out[1]).map(|(a, b)| (a - b).powi(2)).sum::<f32>().sqrt();
        eprintln!("{stem}: relative L2 error of the embedding {rel:.2e}");
        assert!(rel < 1e-3, "{stem}: embedding off the reference path by {rel}");
        assert_eq!(out[0].len(), 2048);
    }
}

/// One listing per sync (issue 14): the plan lists the bucket once and records the work; each
/// shard reads only its own and sends no LIST request; a shard run again after it finished finds
/// nothing left (a retried pod carries on where it stopped); an unchanged bucket plans no work.
#[tokio::test(flavor = "multi_thread")]
async fn a_plan_lists_once_and_shards_read_only_their_work() {
    let fx = Fixture::new("plan_once");
    upload_photos(&fx, 40).await;
    let b = fx.backends(IndexKind::Hnsw).await;
    let model = model();
    b.index.ensure(model.dim(), model.id(), false, imageindex::index::LOCAL_OWNER).await.unwrap();
    let planned = plan(&b.source, &b.index, DeletionGuard::default()).await.unwrap();
    assert_eq!(b.source.list_requests(), 1, "40 objects: one page");
    let counts = planned.record.counts;
    assert_eq!((counts.discovered, counts.new, counts.pending()), (40, 40, 40));
    let mut per_shard = 0;
    for shard in 0..3 {
        let opts = SyncOptions { shard, shards: 3, ..Default::default() };
        let s = carry_out(&b, model.clone(), &opts, Some(planned.record.id)).await.unwrap();
        assert_eq!(s.indexed, s.new, "shard {shard}: {s:?}");
        per_shard += s.indexed;
        let again = carry_out(&b, model.clone(), &opts, None).await.unwrap();
        assert_eq!((again.new, again.indexed), (0, 0), "a shard run again redid its work: {again:?}");
    }
    assert_eq!(b.source.list_requests(), 1, "a shard listed the bucket");
    assert_eq!(per_shard, 40);
    assert_eq!(b.index.vectors.count().await.unwrap(), 40);
    let again = plan(&b.source, &b.index, DeletionGuard::default()).await.unwrap();
    assert_eq!((again.record.counts.unchanged, again.record.counts.pending()), (40, 0));
    assert_eq!(b.source.list_requests(), 2);
    fx.cleanup().await;
}

/// The catalog's queries use its indexes: the diff reads the catalog in key order from the
/// covering `by_key` index alone (no table rows, no sort), the counts from `by_state`, and a
/// shard's work from the primary key of `work`.
#[tokio::test(flavor = "multi_thread")]
async fn the_catalog_queries_use_their_indexes() {
    use sqlx::Row;
    let pool = sqlx::MySqlPool::connect(&env("IMAGEINDEX_MYSQL_URL")).await.unwrap();
    // Migrated by connecting.
    let fx = Fixture::new("explain");
    let _ = fx.index(IndexKind::Hnsw).await;
    let explain = |sql: &'static str| {
        let pool = pool.clone();
        async move {
            let row = sqlx::query(sql).fetch_one(&pool).await.unwrap();
            let key: Option<String> = row.try_get("key").unwrap();
            let extra: Option<String> = row.try_get("Extra").unwrap();
            (key.unwrap_or_default(), extra.unwrap_or_default())
        }
    };
    let (key, extra) = explain(
        "EXPLAIN SELECT id, key_head, etag, size, state, retry FROM images \
         WHERE collection = 'c' AND key_head > 'k' ORDER BY key_head LIMIT 5000",
    )
    .await;
    assert_eq!(key, "by_key");
    assert!(extra.contains("Using index") && !extra.contains("filesort"), "{extra}");
    let (key, extra) =
        explain("EXPLAIN SELECT state, COUNT(*) FROM images WHERE collection = 'c' GROUP BY state").await;
    assert_eq!(key, "by_state");
    assert!(extra.contains("Using index"), "{extra}");
    let (key, extra) = explain(
        "EXPLAIN SELECT id, object_key, etag, size, kind, indexed FROM work \
         WHERE plan = 1 AND id BETWEEN 0 AND 99 AND kind <> 'deleted' ORDER BY id LIMIT 1000",
    )
    .await;
    assert_eq!(key, "PRIMARY");
    assert!(!extra.contains("filesort"), "{extra}");
}

/// Every run added a row that was never deleted, and `/progress` (polled every 5 s by the page)
/// read them all. A collection keeps its newest `RUNS_KEPT`, and progress still shows the latest.
#[tokio::test(flavor = "multi_thread")]
async fn old_runs_are_forgotten_and_progress_shows_the_latest() {
    use imageindex::store::catalog::{RUNS_KEPT, RunProgress};
    let fx = Fixture::new("runs_kept");
    let index = fx.index(IndexKind::Hnsw).await;
    let extra = 30;
    for i in 0..RUNS_KEPT + extra {
        let run = index.catalog.start_run(0, 1).await.unwrap();
        let p = RunProgress { discovered: i as u64, indexed: i as u64, ..Default::default() };
        index.catalog.finish_run(run, &p, None).await.unwrap();
    }
    let pool = sqlx::MySqlPool::connect(&env("IMAGEINDEX_MYSQL_URL")).await.unwrap();
    let runs: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM runs WHERE collection = ?")
        .bind(&fx.name)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(runs, RUNS_KEPT as i64);
    let run = index.catalog.progress().await.unwrap().run.unwrap();
    assert_eq!((run.status.as_str(), run.progress.indexed), ("succeeded", (RUNS_KEPT + extra - 1) as u64));
    fx.cleanup().await;
}

/// Processes that start together on an empty catalog (the controller and a plan Job, shards
/// after an upgrade) apply each migration once and all come up: MariaDB answers sqlx's own
/// migration lock (`GET_LOCK(name, -1)`) with NULL at once, so without a lock of our own one
/// of them read another's migration half applied, or applied it twice.
#[tokio::test(flavor = "multi_thread")]
async fn processes_starting_together_migrate_an_empty_catalog_once() {
    use sqlx::Connection;
    let base = env("IMAGEINDEX_MYSQL_URL");
    let (server, db) = base.rsplit_once('/').unwrap();
    let fresh = format!("{db}_migrate_{}", std::process::id());
    let mut admin = sqlx::MySqlConnection::connect(&base).await.unwrap();
    // The name is ours: a number on the catalog's database name.
    let sql = |s: String| sqlx::raw_sql(sqlx::AssertSqlSafe(s));
    sql(format!("DROP DATABASE IF EXISTS `{fresh}`; CREATE DATABASE `{fresh}`")).execute(&mut admin).await.unwrap();
    let url = format!("{server}/{fresh}");
    let starts = (0..8).map(|_| store::Catalog::connect(&url, "c", "m"));
    let started = futures::future::join_all(starts).await;
    let failed: Vec<String> = started.iter().filter_map(|r| r.as_ref().err().map(ToString::to_string)).collect();
    let mut conn = sqlx::MySqlConnection::connect(&url).await.unwrap();
    let (applied, dirty): (i64, i64) =
        sqlx::query_as("SELECT COUNT(*), CAST(COALESCE(SUM(NOT success), 0) AS SIGNED) FROM _sqlx_migrations")
            .fetch_one(&mut conn)
            .await
            .unwrap();
    sql(format!("DROP DATABASE `{fresh}`")).execute(&mut admin).await.unwrap();
    assert!(failed.is_empty(), "{failed:?}");
    let migrations = std::fs::read_dir("migrations").unwrap().count() as i64;
    assert_eq!((applied, dirty), (migrations, 0));
}

/// Two keys with one 63-bit id (`key_id`) would share a catalog row and a Milvus primary key and
/// overwrite each other run after run. No colliding pair of real keys is known, so the test
/// moves an indexed object's row and vector to the id of a key it then uploads. The later key is
/// left out and listed with the failures, the held one keeps its row and vector, and once the
/// held one is deleted, the later one is indexed.
#[tokio::test(flavor = "multi_thread")]
async fn a_key_whose_id_another_key_holds_is_left_out_and_listed() {
    let fx = Fixture::new("key_collision");
    let b = fx.backends(IndexKind::Hnsw).await;
    let photos = photo_set(2).into_iter().map(|(_, img)| jpeg(&img, 88)).collect::<Vec<_>>();
    fx.source.put("held.jpg", photos[0].clone()).await.unwrap();
    assert_eq!(fx.sync(&b).await.indexed, 1);

    // held.jpg moves to the id of later.jpg, in the catalog and in Milvus.
    let (own, taken) = (key_id("held.jpg"), key_id("later.jpg"));
    let pool = sqlx::MySqlPool::connect(&env("IMAGEINDEX_MYSQL_URL")).await.unwrap();
    sqlx::query("UPDATE images SET id = ? WHERE collection = ? AND id = ?")
        .bind(taken)
        .bind(&fx.name)
        .bind(own)
        .execute(&pool)
        .await
        .unwrap();
    let moved = store::Vector { id: taken, key: "held.jpg".into(), embedding: embed(&photos[0]) };
    b.index
        .write(imageindex::index::WriteBatch { vectors: vec![moved], remove: vec![own], records: vec![] })
        .await
        .unwrap();
    assert_eq!(fx.sync(&b).await.unchanged, 1);

    fx.source.put("later.jpg", photos[1].clone()).await.unwrap();
    for run in 0..2 {
        let s = fx.sync(&b).await;
        assert_eq!((s.new, s.collided, s.indexed, s.unchanged), (0, 1, 0, 1), "run {run}: {s:?}");
        assert!(s.failures.iter().any(|(k, e)| k == "later.jpg" && e.contains("\"held.jpg\"")), "{s:?}");
        assert_eq!(b.index.catalog.key_at(taken).await.unwrap().as_deref(), Some("held.jpg"), "run {run}");
        assert_eq!(b.index.vectors.count().await.unwrap(), 1);
        let hits = b.index.vectors.search(embed(&photos[0]), 1, None).await.unwrap();
        assert_eq!((hits[0].id, hits[0].key.as_str()), (taken, "held.jpg"), "held.jpg keeps its vector");
    }
    assert_eq!(b.index.catalog.counts().await.unwrap().failed, 1, "a collision is counted with the failures");
    let failures = b.index.catalog.failures(10).await.unwrap();
    assert_eq!(failures.iter().map(|f| f.key.as_str()).collect::<Vec<_>>(), ["later.jpg"], "{failures:?}");

    // held.jpg deleted: the plan that deletes it still finds its row, the next indexes later.jpg.
    fx.source.delete("held.jpg").await.unwrap();
    let deleted = fx.sync(&b).await;
    assert_eq!((deleted.deleted, deleted.collided), (1, 1), "{deleted:?}");
    let freed = fx.sync(&b).await;
    assert_eq!((freed.new, freed.indexed, freed.collided), (1, 1, 0), "{freed:?}");
    let hits = b.index.vectors.search(embed(&photos[1]), 1, None).await.unwrap();
    assert_eq!((hits[0].id, hits[0].key.as_str()), (taken, "later.jpg"));
    assert_eq!(b.index.catalog.counts().await.unwrap().failed, 0);
    fx.cleanup().await;
}

/// Two new keys of one id in one plan: in one batch of work or in two, the first holds the id
/// and the other is recorded, never written over it or failing the plan.
#[tokio::test(flavor = "multi_thread")]
async fn two_new_keys_of_one_id_in_a_plan_keep_the_first() {
    let name = format!("t_plan_collision_{}_{}", std::process::id(), nanos());
    let catalog = store::Catalog::connect(&env("IMAGEINDEX_MYSQL_URL"), &name, "m").await.unwrap();
    let plan = catalog.start_plan(catalog.clock().await.unwrap()).await.unwrap();
    let item = |key: &str| store::WorkItem {
        id: 7,
        key: key.into(),
        etag: None,
        size: 1,
        kind: store::WorkKind::New,
        indexed: false,
        archived: false,
    };
    assert_eq!(catalog.add_work(plan, vec![item("a.jpg"), item("b.jpg")]).await.unwrap(), 1, "in one batch");
    assert_eq!(catalog.add_work(plan, vec![item("c.jpg")]).await.unwrap(), 1, "in a later batch");
    let work = catalog.work(plan, &shard_ids(0, 1), None, false, 10).await.unwrap();
    assert_eq!(work.iter().map(|w| w.key.as_str()).collect::<Vec<_>>(), ["a.jpg"]);
    let collided = catalog.collisions(plan, 10).await.unwrap();
    let pairs: Vec<(&str, &str)> = collided.iter().map(|c| (c.key.as_str(), c.held_by.as_str())).collect();
    assert_eq!(pairs, [("b.jpg", "a.jpg"), ("c.jpg", "a.jpg")]);
    catalog.fail_plan(plan).await.unwrap();
}
