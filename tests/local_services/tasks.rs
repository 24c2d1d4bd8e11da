//! The operator's short tasks (`imageindex plan`, `imageindex cleanup`) as its Jobs run them, on
//! the real services: what they report, in their termination message, and how they exit.

use std::process::Command;

use imageindex::contract::report::{Report, Stop};
use imageindex::core::IndexKind;
use imageindex::embed::{DecodeLimits, Model, ModelOptions};

use super::support::*;

/// Runs the binary as the Job's pod would, with its report file; (exit code, report).
fn task(fx: &Fixture, args: &[&str], env: &[(&str, &str)]) -> (i32, Report) {
    let report = std::env::temp_dir().join(format!("{}-{}.report", fx.name, nanos()));
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_imageindex"));
    cmd.args(args)
        .env("IMAGEINDEX_SOURCE", &fx.source_url)
        .env("IMAGEINDEX_COLLECTION", &fx.name)
        .env("IMAGEINDEX_OWNER", "ImageIndex shop/photos uid-1")
        .env("IMAGEINDEX_REPORT", &report)
        .env("IMAGEINDEX_IO_TIMEOUT", "5");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    let written = std::fs::read_to_string(&report).unwrap_or_default();
    let _ = std::fs::remove_file(&report);
    let parsed = Report::parse(&written)
        .unwrap_or_else(|| panic!("no report in {written:?}; stderr: {}", String::from_utf8_lossy(&out.stderr)));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), written.trim(), "stdout carries the same report");
    (out.status.code().unwrap_or(-1), parsed)
}

#[tokio::test(flavor = "multi_thread")]
async fn plan_reports_the_work_and_cleanup_drops_only_its_own() {
    let fx = Fixture::new("tasks");
    upload_photos(&fx, 30).await;

    // A new collection: made, and everything in the bucket is work.
    let (code, report) = task(&fx, &["plan"], &[]);
    assert_eq!(code, 0, "{report:?}");
    let Report::Planned { plan: Some(plan), .. } = report else { panic!("no plan id: {report:?}") };
    assert_eq!(
        report,
        Report::Planned {
            plan: Some(plan),
            discovered: 30,
            pending: 30,
            refused: None,
            indexed: 0,
            failed: 0,
            stale: 0,
            held: 0,
            generations: None
        }
    );
    assert!(fx.index(IndexKind::Hnsw).await.vectors.ready().await.is_ok(), "the plan made and loaded the collection");

    // Its work carried out by an embedding shard (which lists nothing), a second plan finds
    // nothing to do, and reads the counts.
    let index = Command::new(env!("CARGO_BIN_EXE_imageindex"))
        .args(["embed", "--batch-size", "8", "--plan", &plan.to_string()])
        .env("IMAGEINDEX_SOURCE", &fx.source_url)
        .env("IMAGEINDEX_COLLECTION", &fx.name)
        .env("IMAGEINDEX_OWNER", "ImageIndex shop/photos uid-1")
        .status()
        .unwrap();
    assert!(index.success());
    let (code, report) = task(&fx, &["plan"], &[]);
    let Report::Planned { plan: second, .. } = report else { panic!("{report:?}") };
    assert!(second > Some(plan), "a new plan each time");
    assert_eq!(
        (code, report),
        (
            0,
            Report::Planned {
                plan: second,
                discovered: 30,
                pending: 0,
                refused: None,
                indexed: 30,
                failed: 0,
                stale: 0,
                held: 0,
                generations: None
            }
        )
    );

    // Most of the bucket gone: the plan says the deletions would be refused, and why.
    for k in fx.source.list().await.unwrap().into_iter().take(20) {
        fx.source.delete(&k.key).await.unwrap();
    }
    let (code, report) = task(&fx, &["plan"], &[]);
    let Report::Planned { pending: 20, refused: Some(why), .. } = &report else { panic!("{report:?}") };
    assert!(why.contains("20 of the 30"), "{why}");
    assert_eq!(code, 0);

    // Another index type is a new generation, built beside the serving one (see generations.rs).
    let (code, report) = task(&fx, &["plan"], &[("IMAGEINDEX_INDEX_TYPE", "IVF_FLAT")]);
    let Report::Planned { generations: Some(g), .. } = &report else { panic!("{report:?}") };
    assert_eq!((g.serving.as_ref().map(|s| s.number), g.building.as_ref().map(|b| b.number)), (Some(0), Some(1)));
    assert_eq!(code, 0);

    // Configuration errors exit 78 (the Job fails at once); a backend down exits 1.
    let (code, report) = task(&fx, &["plan"], &[("IMAGEINDEX_OWNER", "ImageIndex other/photos uid-2")]);
    assert!(matches!(report, Report::Stopped { at: Stop::Claimed, .. }), "{report:?}");
    assert_eq!(code, 78);
    let (code, report) = task(&fx, &["plan"], &[("IMAGEINDEX_MILVUS_URL", "http://127.0.0.1:9")]);
    assert!(matches!(report, Report::Stopped { at: Stop::MilvusUnavailable, .. }), "{report:?}");
    assert_eq!(code, 1);
    let bucket = fx.source_url.replace("imageindex-test", "no-such-bucket-here");
    let (code, report) = task(&fx, &["plan"], &[("IMAGEINDEX_SOURCE", bucket.as_str())]);
    assert!(matches!(report, Report::Stopped { at: Stop::SourceUnavailable, .. }), "{report:?}");
    assert_eq!(code, 1);

    // Cleanup: another owner's collection is kept; Retain lets go of the claim; Delete drops.
    let (code, report) = task(&fx, &["cleanup"], &[("IMAGEINDEX_OWNER", "ImageIndex other/photos uid-2")]);
    assert!(matches!(&report, Report::Kept { why } if why.contains("uid-1")), "{report:?}");
    assert_eq!(code, 0);
    assert_eq!(fx.index(IndexKind::Hnsw).await.vectors.count().await.unwrap(), 30, "nothing dropped");
    assert_eq!(task(&fx, &["cleanup", "--retain"], &[]), (0, Report::Released));
    let (_, report) = task(&fx, &["cleanup"], &[]);
    assert!(matches!(report, Report::Kept { .. }), "released: no longer shown to be this index's: {report:?}");
    // Claimed again by a plan, then dropped.
    assert_eq!(task(&fx, &["plan"], &[]).0, 0);
    assert_eq!(task(&fx, &["cleanup"], &[]), (0, Report::Dropped));
    let catalog = fx.index(IndexKind::Hnsw).await.catalog;
    assert_eq!(catalog.counts().await.unwrap().indexed, 0, "the catalog rows went with it");
    fx.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_plan_takes_the_vector_width_and_preprocessing_from_the_model_file() {
    // A ResNet18 (512-d vectors, not ResNet50's 2048) that records torchvision's preprocessing.
    let fx = Fixture::new("tasks_width");
    let photos = upload_photos(&fx, 6).await;
    let resnet18 = env("IMAGEINDEX_MODEL_RESNET18");
    let with_resnet18 = [("IMAGEINDEX_MODEL", resnet18.as_str())];
    let (code, report) = task(&fx, &["plan"], &with_resnet18);
    let Report::Planned { plan: Some(plan), pending: 6, .. } = report else { panic!("{report:?}") };
    assert_eq!(code, 0);
    let index = fx.index(IndexKind::Hnsw).await;
    let resnet50 = model();
    let err = index.vectors.ensure_collection(resnet50.dim(), resnet50.id(), false, true).await.unwrap_err();
    assert!(err.to_string().contains("holds 512-d vectors"), "the plan made a 512-d collection: {err}");

    // The embedding shard loads the same file and fills it; search finds a photo by itself.
    let embedded = Command::new(env!("CARGO_BIN_EXE_imageindex"))
        .args(["embed", "--batch-size", "4", "--plan", &plan.to_string()])
        .env("IMAGEINDEX_SOURCE", &fx.source_url)
        .env("IMAGEINDEX_COLLECTION", &fx.name)
        .env("IMAGEINDEX_OWNER", "ImageIndex shop/photos uid-1")
        .env("IMAGEINDEX_MODEL", &resnet18)
        .status()
        .unwrap();
    assert!(embedded.success());
    assert_eq!(index.vectors.wait_searchable().await.unwrap(), 6);
    let small = Model::load(resnet18.as_ref(), &ModelOptions::default()).unwrap();
    assert_eq!(small.dim(), 512);
    let query = small.embed_image(&photos[3].1, DecodeLimits::default()).unwrap();
    assert_eq!(index.vectors.search(query, 1, None).await.unwrap()[0].key, photos[3].0);

    // Another model (2048-d) is a new generation beside this one (see generations.rs).
    let (code, report) = task(&fx, &["plan"], &[]);
    let Report::Planned { generations: Some(g), .. } = &report else { panic!("{report:?}") };
    assert_eq!(g.building.as_ref().map(|b| (b.number, b.model.clone())), Some((1, Some(resnet50.id().to_string()))));
    assert_eq!(code, 0);
    // A preprocessing the file contradicts, or no file at all: configuration errors, which no
    // retry mends (exit 78).
    let (code, report) = task(&fx, &["plan"], &[with_resnet18[0], ("IMAGEINDEX_PREPROCESS", "clip")]);
    assert!(
        matches!(&report, Report::Stopped { at: Stop::ModelUnusable, message } if message.contains("prepared with torchvision")),
        "{report:?}"
    );
    assert_eq!(code, 78);
    let (code, report) = task(&fx, &["plan"], &[("IMAGEINDEX_MODEL", "/no/such/model.onnx")]);
    assert!(
        matches!(&report, Report::Stopped { at: Stop::ModelUnusable, message } if message.contains("/no/such/model.onnx")),
        "{report:?}"
    );
    assert_eq!(code, 78);
    fx.cleanup().await;
}
