//! Changing the model under live search (issue 15): `index --new-generation` builds a collection
//! for the new model beside the serving one, the alias moves once, a `serve` process follows it,
//! and the old generation is dropped after its grace period. A build that fails or is cancelled
//! leaves search where it was.

use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use imageindex::contract::report::Report;
use imageindex::core::IndexKind;
use imageindex::index::Generations;
use imageindex::store::State;
use imageindex::store::{Generation, VectorStore};

use super::serve::TOKEN;
use super::support::*;

/// The CLI on the test's index, with `model`.
fn cli(fx: &Fixture, model: &str) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_imageindex"));
    cmd.env("IMAGEINDEX_COLLECTION", &fx.name).env("IMAGEINDEX_MODEL", model).env("RUST_LOG", "warn");
    cmd
}

fn check(out: Output, what: &str) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{what} failed ({:?}):\n{stderr}", out.status);
    stderr
}

/// A `serve` process, killed when dropped.
struct Served {
    child: Child,
    base: String,
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn serve(fx: &Fixture, model: &str) -> Served {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let child = cli(fx, model)
        .args(["serve", "--listen", &format!("127.0.0.1:{port}"), "--source", &fx.source_url])
        .args(["--token", TOKEN, "--follow-seconds", "1"])
        .spawn()
        .unwrap();
    let served = Served { child, base: format!("http://127.0.0.1:{port}") };
    let deadline = Instant::now() + Duration::from_secs(60);
    while reqwest::get(format!("{}/readyz", served.base)).await.map(|r| r.status().as_u16()).ok() != Some(200) {
        assert!(Instant::now() < deadline, "serve did not become ready");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    served
}

/// One search's answer: status, the model that embedded it, the collection that answered, hits.
type Answer = (u16, String, String, usize);

async fn search(http: &reqwest::Client, base: &str, image: &Bytes) -> Answer {
    let form = reqwest::multipart::Form::new()
        .part("image", reqwest::multipart::Part::bytes(image.to_vec()).file_name("q.jpg"));
    let r = http.post(format!("{base}/img/search")).multipart(form).send().await.unwrap();
    let status = r.status().as_u16();
    let body: serde_json::Value = r.json().await.unwrap_or_default();
    let text = |k: &str| body[k].as_str().unwrap_or_default().to_string();
    (status, text("model"), text("collection"), body["results"].as_array().map_or(0, Vec::len))
}

/// Searches one after another until told to stop (at most `limit`).
fn search_continuously(base: String, image: Bytes, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<Vec<Answer>> {
    tokio::spawn(async move {
        let http = reqwest::Client::new();
        let mut answers = Vec::new();
        while !stop.load(Ordering::SeqCst) && answers.len() < 20_000 {
            answers.push(search(&http, &base, &image).await);
        }
        answers
    })
}

async fn generations_of(fx: &Fixture) -> Generations {
    Generations::connect(&fx.milvus(IndexKind::Hnsw), &env("IMAGEINDEX_MYSQL_URL")).await.unwrap()
}

fn model_name(path: &str) -> String {
    std::path::Path::new(path).file_name().unwrap().to_string_lossy().into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_model_changes_under_live_search_without_a_failed_query() {
    let fx = Fixture::new("generations");
    let (a, b) = (env("IMAGEINDEX_MODEL"), env("IMAGEINDEX_MODEL_RESNET18"));
    assert_eq!(
        std::path::Path::new(&a).parent(),
        std::path::Path::new(&b).parent(),
        "serve finds a generation's model beside --model"
    );
    let photos = upload_photos(&fx, 200).await;
    check(cli(&fx, &a).args(["index", &fx.source_url]).output().unwrap(), "indexing with model A");

    let served = serve(&fx, &a).await;
    let stop = Arc::new(AtomicBool::new(false));
    let searcher = search_continuously(served.base.clone(), photos[0].1.clone(), stop.clone());
    tokio::time::sleep(Duration::from_secs(2)).await;

    // Model B, of another width, built beside A while search goes on; images uploaded meanwhile
    // go to A (the serving generation) and must reach B before the swap.
    let rebuild = cli(&fx, &b)
        .args(["index", &fx.source_url, "--new-generation", "--grace", "4"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let http = reqwest::Client::new();
    let mut rng = Rng(15);
    let mut uploaded = Vec::new();
    for _ in 0..5 {
        let image = jpeg(&synthetic(&mut rng, 320, 240), 90);
        let form = reqwest::multipart::Form::new()
            .part("image", reqwest::multipart::Part::bytes(image.to_vec()).file_name("new.jpg"));
        let r = http.post(format!("{}/img/upload", served.base)).bearer_auth(TOKEN).multipart(form).send().await;
        let body: serde_json::Value = r.unwrap().json().await.unwrap();
        uploaded.push(body["key"].as_str().expect("uploaded").to_string());
    }
    let out = tokio::task::spawn_blocking(move || rebuild.wait_with_output()).await.unwrap().unwrap();
    let log = check(out, "the rebuild with model B");
    // Searches go on a little on B.
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::SeqCst);
    let answers = searcher.await.unwrap();

    // Every search answered, with results: from A until the swap, from B after, moving once.
    assert!(answers.len() > 20, "only {} searches", answers.len());
    if let Some(bad) = answers.iter().find(|(status, _, _, hits)| *status != 200 || *hits == 0) {
        panic!("a search failed during the change: {bad:?}\n{log}");
    }
    let models: Vec<&str> = answers.iter().map(|(_, m, _, _)| m.as_str()).collect();
    let moves = models.windows(2).filter(|w| w[0] != w[1]).count();
    assert_eq!(moves, 1, "search moved from A to B once, never back: {:?}", models.first().zip(models.last()));
    assert_eq!(models[0], format!("{}@fp32", model_name(&a)));
    assert_eq!(models[models.len() - 1], format!("{}@fp32", model_name(&b)));
    let on_b = answers.iter().filter(|(_, m, _, _)| m == models[models.len() - 1]).count();
    eprintln!("{} searches: {} on A, {on_b} on B", answers.len(), answers.len() - on_b);

    // The alias points at generation 1 (B); generation 0 (A, renamed when the alias took its name)
    // was dropped after the grace period.
    let gens = generations_of(&fx).await;
    let all = gens.list().await.unwrap();
    let states: Vec<(u32, State)> = all.iter().map(|g| (g.number, g.state)).collect();
    assert_eq!(states, [(0, State::Dropped), (1, State::Serving)], "{all:#?}");
    let serving = gens.serving().await.unwrap().unwrap();
    assert_eq!(serving.collection, format!("{}_g1", fx.name));
    assert!(serving.model.as_deref().unwrap().starts_with(&model_name(&b)));
    let old = VectorStore::connect(&fx.milvus(IndexKind::Hnsw)).await.unwrap().scoped(&format!("{}_g0", fx.name));
    assert!(old.ready().await.is_err(), "generation 0 is dropped");

    // B has every object: the 200 and those uploaded during the build.
    let index = gens.index(&serving, &"any.onnx@fp32".parse().unwrap());
    assert_eq!(index.catalog.counts().await.unwrap().indexed, 205);
    assert_eq!(index.vectors.count().await.unwrap(), 205);
    for key in &uploaded {
        assert!(index.catalog.entry(key).await.unwrap().is_some_and(|e| e.indexed), "{key} is not in B");
    }
    fx.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failed_or_cancelled_rebuild_leaves_search_where_it_was() {
    let fx = Fixture::new("generations_fail");
    let (a, b) = (env("IMAGEINDEX_MODEL"), env("IMAGEINDEX_MODEL_RESNET18"));
    let photos = upload_photos(&fx, 60).await;
    check(cli(&fx, &a).args(["index", &fx.source_url]).output().unwrap(), "indexing with model A");
    let served = serve(&fx, &a).await;
    let http = reqwest::Client::new();
    let model_a = format!("{}@fp32", model_name(&a));
    let on_a = || async {
        let (status, model, _, hits) = search(&http, &served.base, &photos[0].1).await;
        assert_eq!((status, model.as_str()), (200, model_a.as_str()));
        assert!(hits > 0);
    };

    // Model B's file missing: refused before anything is built (a configuration error).
    let missing = cli(&fx, "/nonexistent/resnet18.onnx").args(["index", &fx.source_url, "--new-generation"]).output();
    assert_eq!(missing.unwrap().status.code(), Some(78));
    let all = generations_of(&fx).await.list().await.unwrap();
    assert_eq!(all.iter().map(|g| (g.number, g.state)).collect::<Vec<_>>(), [(0, State::Serving)], "nothing begun");
    on_a().await;

    // The bucket down once the build has begun: the generation is recorded as failed, with why.
    let proxy = super::s3_proxy::S3Proxy::start().await;
    proxy.faults.down.store(true, Ordering::SeqCst);
    let down = cli(&fx, &b)
        .args(["index", &fx.source_url, "--new-generation"])
        .env("IMAGEINDEX_S3_ENDPOINT", &proxy.endpoint)
        .output()
        .unwrap();
    assert_eq!(down.status.code(), Some(1), "{}", String::from_utf8_lossy(&down.stderr));
    let gens = generations_of(&fx).await;
    let all = gens.list().await.unwrap();
    let failed: Vec<&Generation> = all.iter().filter(|g| g.state == State::Failed).collect();
    assert_eq!(failed.len(), 1, "{all:#?}");
    let reason = failed[0].reason.as_deref().unwrap();
    assert!(reason.contains("listing"), "{reason}");
    assert_eq!(gens.serving().await.unwrap().unwrap().number, 0, "search stays on A");
    on_a().await;
    // A search server started with model B (a Deployment rolled to the new spec) serves with A
    // from beside it: B is not needed until search moves to it.
    let rolled = serve(&fx, &b).await;
    let (status, model, _, hits) = search(&http, &rolled.base, &photos[0].1).await;
    assert_eq!((status, model.as_str()), (200, model_a.as_str()));
    assert!(hits > 0);
    drop(rolled);
    let listed = cli(&fx, &a).args(["generations"]).output().unwrap();
    let listed = String::from_utf8_lossy(&listed.stdout).into_owned();
    assert!(listed.contains("failed") && listed.contains(reason.lines().next().unwrap()), "{listed}");

    // Cancelled half way (killed while it embeds): search still on A; the next build resumes it.
    let mut cancelled =
        cli(&fx, &b).args(["index", &fx.source_url, "--new-generation", "--batch-size", "2"]).spawn().unwrap();
    let building = failed[0].clone();
    let index = gens.index(&building, &"any.onnx@fp32".parse().unwrap());
    let deadline = Instant::now() + Duration::from_secs(120);
    while index.catalog.counts().await.map(|c| c.indexed).unwrap_or(0) == 0 {
        assert!(Instant::now() < deadline, "the build never wrote");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    cancelled.kill().unwrap();
    cancelled.wait().unwrap();
    let partial = index.catalog.counts().await.unwrap().indexed;
    assert!(partial < 60, "killed half way, not after: {partial}");
    on_a().await;

    let out = cli(&fx, &b).args(["index", &fx.source_url, "--new-generation", "--keep-old"]).output().unwrap();
    check(out, "the resumed build");
    let serving = gens.serving().await.unwrap().unwrap();
    assert_eq!(serving.number, building.number, "the same generation, resumed");
    assert_eq!(index.catalog.counts().await.unwrap().indexed, 60);
    let all = gens.list().await.unwrap();
    assert!(all.iter().any(|g| g.number == 0 && g.state == State::Retired && g.keep), "{all:#?}");
    fx.cleanup().await;
}

/// Runs a task as the operator's Job pod would (see tasks.rs); (exit code, report).
fn job(fx: &Fixture, model: &str, args: &[&str], env: &[(&str, &str)]) -> (i32, Report) {
    let report = std::env::temp_dir().join(format!("{}-{}.report", fx.name, nanos()));
    let out = cli(fx, model)
        .args(args)
        .env("IMAGEINDEX_SOURCE", &fx.source_url)
        .env("IMAGEINDEX_OWNER", "ImageIndex shop/photos uid-1")
        .env("IMAGEINDEX_REPORT", &report)
        .envs(env.iter().copied())
        .output()
        .unwrap();
    let written = std::fs::read_to_string(&report).unwrap_or_default();
    let _ = std::fs::remove_file(&report);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let parsed = Report::parse(&written).unwrap_or_else(|| panic!("no report ({:?}): {stderr}", out.status));
    (out.status.code().unwrap_or(-1), parsed)
}

/// An embedding Job's one shard, carrying out `plan`.
fn embed_shard(fx: &Fixture, model: &str, plan: i64) {
    let out = cli(fx, model)
        .args(["embed", "--plan", &plan.to_string(), "--source", &fx.source_url])
        .env("IMAGEINDEX_OWNER", "ImageIndex shop/photos uid-1")
        .output()
        .unwrap();
    check(out, "the embedding shard");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_operators_jobs_rebuild_the_index_for_a_new_model_and_swap_when_it_is_complete() {
    let fx = Fixture::new("generations_jobs");
    let (a, b) = (env("IMAGEINDEX_MODEL"), env("IMAGEINDEX_MODEL_RESNET18"));
    let photos = upload_photos(&fx, 12).await;
    let planned = |report: &Report| match report {
        Report::Planned { plan: Some(plan), pending, generations, .. } => (*plan, *pending, generations.clone()),
        other => panic!("{other:?}"),
    };

    // Model A, as the operator indexes it: a plan, then its embedding Job.
    let (code, report) = job(&fx, &a, &["plan"], &[]);
    let (plan, pending, generations) = planned(&report);
    assert_eq!((code, pending, generations), (0, 12, None));
    embed_shard(&fx, &a, plan);

    // The spec moves to model B (another width): the plan begins generation 1 beside the serving
    // one, and plans all of the bucket (two images added since) into it.
    let mut rng = Rng(7);
    for i in 0..2 {
        fx.source.put(&format!("added/{i}.jpg"), jpeg(&synthetic(&mut rng, 300, 200), 90)).await.unwrap();
    }
    let (code, report) = job(&fx, &b, &["plan"], &[]);
    let (plan, pending, generations) = planned(&report);
    let g = generations.expect("generations reported");
    assert_eq!((code, pending), (0, 14));
    let serving = g.serving.as_ref().unwrap();
    assert_eq!(
        (serving.number, serving.indexed, serving.model.as_deref()),
        (0, 12, Some(&*format!("{}@fp32", model_name(&a))))
    );
    let building = g.building.as_ref().unwrap();
    assert_eq!((building.number, building.indexed, g.swapped), (1, 0, false));
    let Report::Planned { indexed: 12, .. } = report else { panic!("the counts are what search has: {report:?}") };

    // Search through the index's name still reads A's vectors.
    let by_name = VectorStore::connect(&fx.milvus(IndexKind::Hnsw)).await.unwrap();
    let hits = by_name.search(embed(&photos[4].1), 1, None).await.unwrap();
    assert_eq!(hits[0].key, photos[4].0);

    // The embedding Job fills generation 1; an image arrives before the next plan, which plans
    // it instead of swapping; once that is embedded, the plan after swaps.
    embed_shard(&fx, &b, plan);
    fx.source.put("added/late.jpg", jpeg(&synthetic(&mut rng, 300, 200), 90)).await.unwrap();
    let (_, report) = job(&fx, &b, &["plan"], &[]);
    let (plan, pending, generations) = planned(&report);
    let g = generations.unwrap();
    assert_eq!((pending, g.swapped, g.building.map(|b| b.indexed)), (1, false, Some(14)));
    embed_shard(&fx, &b, plan);
    let (code, report) = job(&fx, &b, &["plan"], &[]);
    let (_, pending, generations) = planned(&report);
    let g = generations.unwrap();
    assert_eq!((code, pending, g.swapped, g.building), (0, 0, true, None));
    let serving = g.serving.unwrap();
    assert_eq!((serving.number, serving.indexed), (1, 15));
    let gens = generations_of(&fx).await;
    assert_eq!(gens.serving().await.unwrap().unwrap().collection, format!("{}_g1", fx.name));
    let small = imageindex::embed::Model::load(b.as_ref(), &Default::default()).unwrap();
    let query = small.embed_image(&photos[4].1, Default::default()).unwrap();
    assert_eq!(by_name.search(query, 1, None).await.unwrap()[0].key, photos[4].0, "the name now reads B");

    // Generation 0 is kept through the grace period, then a plan drops it.
    let (_, report) = job(&fx, &b, &["plan"], &[]);
    let Report::Planned { generations: Some(g), .. } = &report else { panic!("{report:?}") };
    assert!(!g.swapped);
    assert_eq!(gens.list().await.unwrap()[0].state, State::Retired);
    job(&fx, &b, &["plan"], &[("IMAGEINDEX_GENERATION_GRACE", "0")]);
    assert_eq!(gens.list().await.unwrap()[0].state, State::Dropped);

    // Deleting the index drops every generation and the alias.
    assert_eq!(job(&fx, &b, &["cleanup"], &[]), (0, Report::Dropped));
    assert!(gens.serving().await.unwrap().is_none());
    assert!(by_name.scoped(&format!("{}_g1", fx.name)).ready().await.is_err());
}

/// Two indexes whose names resolve to one Milvus name, on one catalog. Before anything serves,
/// nothing said whose the name was: the second index's build of another model dropped the first
/// one's unfinished generation, and its deletion dropped and forgot every generation of the name.
/// A generation is claimed before it is recorded now, and only its holder drops or forgets it.
#[tokio::test(flavor = "multi_thread")]
async fn an_index_never_drops_or_forgets_a_generation_another_index_holds() {
    use imageindex::index::generations;
    use imageindex::store::{Catalog, Error};
    use imageindex::sync::{Backends, SyncOptions, sync};
    let fx = Fixture::new("generations_owners");
    upload_photos(&fx, 3).await;
    let gens = generations_of(&fx).await;
    let (ours, theirs) = ("ImageIndex shop/photos uid-a", "ImageIndex other/photos uid-b");
    let model_a = model().id().clone();
    let model_b: imageindex::core::ModelId = "resnet18.onnx@fp32".parse().unwrap();

    // A's first build, before anything serves: three vectors in its generation.
    let (_, building) = gens.begin(&model_a, ours).await.unwrap();
    let a = Backends { source: fx.source.clone(), index: gens.to_build(&building, &model_a) };
    let opts = SyncOptions { owner: ours.into(), ..Default::default() };
    assert_eq!(sync(&a, model(), &opts).await.unwrap().indexed, 3);

    // B, another model: neither resumes nor drops A's build.
    let refused = gens.begin(&model_b, theirs).await.unwrap_err();
    assert!(matches!(&refused, Error::Claimed(why) if why.contains(ours)), "{refused}");
    // B deleted (Delete policy, or its catalog alone): A's build, rows and all, stays.
    gens.drop_all(theirs).await.unwrap();
    let catalog = Catalog::connect(&env("IMAGEINDEX_MYSQL_URL"), &fx.name, "").await.unwrap();
    generations::forget_all(&catalog, &fx.name, theirs).await.unwrap();
    assert!(gens.collect(Duration::ZERO, theirs).await.unwrap().is_empty());
    assert_eq!(a.index.vectors.count().await.unwrap(), 3, "A's vectors");
    assert_eq!(a.index.catalog.counts().await.unwrap().indexed, 3, "A's catalog rows");
    let all = gens.list().await.unwrap();
    assert_eq!(all.iter().map(|g| (g.number, g.state)).collect::<Vec<_>>(), [(building.number, State::Building)]);

    // Serving, A's generation is dropped by A alone.
    gens.swap(None, &building).await.unwrap();
    assert!(matches!(gens.drop_all(theirs).await, Err(Error::Claimed(_))));
    assert_eq!(gens.serving().await.unwrap().unwrap().number, building.number);
    assert_eq!(a.index.vectors.count().await.unwrap(), 3);
    gens.drop_all(ours).await.unwrap();
    assert!(gens.serving().await.unwrap().is_none() && gens.list().await.unwrap().is_empty());
    fx.cleanup().await;
}

/// Before a swap the build HEADs what the serving generation holds and it lacks. One HEAD at a
/// time inside one 30 s limit, aborting on any error: thousands of deletions, or one key the
/// client cannot address, blocked the swap for ever. Now the HEADs run side by side, each bounded,
/// and what is gone, refused or unaddressable (the build's own listing did not have it) is not
/// waited for; what is still there is.
#[tokio::test(flavor = "multi_thread")]
async fn a_swap_waits_only_for_objects_still_in_the_bucket() {
    use imageindex::index::{LOCAL_OWNER, WriteBatch};
    use imageindex::store::{Catalog, Record};
    let fx = Fixture::new("generations_missing");
    let photos = upload_photos(&fx, 1).await;
    let gens = generations_of(&fx).await;
    let catalog = Catalog::connect(&env("IMAGEINDEX_MYSQL_URL"), &fx.name, "").await.unwrap();
    catalog.claim_owner(LOCAL_OWNER).await.unwrap();
    let serving = Generation::plain(&fx.name);
    let building = Generation { number: 1, collection: format!("{}_g1", fx.name), ..serving.clone() };
    let building = Generation { catalog: building.collection.clone(), ..building };
    // The serving generation's rows: 2,000 objects deleted since, a key the client cannot
    // address (not in the bucket either), and one photo that is still there.
    let keys: Vec<String> =
        (0..2000).map(|i| format!("gone/{i}.jpg")).chain(["a//b.jpg".to_string(), photos[0].0.clone()]).collect();
    let record = |key: &String| Record::indexed(key, Some("e".into()), 1, None);
    let index = gens.index(&serving, &"test-model".parse().unwrap());
    for chunk in keys.chunks(500) {
        let records = chunk.iter().map(record).collect();
        index.write(WriteBatch { vectors: vec![], remove: vec![], records }).await.unwrap();
    }
    let missing = gens.still_missing(&serving, &building, &fx.source).await.expect("no HEAD stops the comparison");
    assert_eq!(missing, 1, "only the photo still in the bucket is waited for");
    fx.source.delete(&photos[0].0).await.unwrap();
    assert_eq!(gens.still_missing(&serving, &building, &fx.source).await.unwrap(), 0);
    fx.cleanup().await;
}

/// A plain index with `n` photos, synced; its Milvus handle.
async fn plain_index(fx: &Fixture, n: usize) -> VectorStore {
    upload_photos(fx, n).await;
    let b = fx.backends(IndexKind::Hnsw).await;
    assert_eq!(fx.sync(&b).await.indexed, n);
    b.index.vectors
}

/// What a plan (or a search pod) does first: the generation to sync, and the sync.
async fn plan_again(fx: &Fixture, gens: &Generations) -> imageindex::sync::Summary {
    use imageindex::sync::Backends;
    let target = gens.target(model().id(), false).await.unwrap();
    fx.sync(&Backends { source: fx.source.clone(), index: gens.index(&target, model().id()) }).await
}

/// The first rebuild of a plain index renames it `<name>_g0`, then points the alias at it, then
/// records it; a rebuild cut after the rename left neither the name nor the alias, and the next
/// plan or search pod made an empty plain collection and forgot the whole catalog (every object
/// embedded again beside the orphaned generation 0). A swap cut after the alias moved left the
/// table saying the old generation serves: never collected, and the new one "building" for ever.
/// Each cut is the state a crash between the two calls leaves, made here with the same calls.
#[tokio::test(flavor = "multi_thread")]
async fn a_rebuild_cut_at_any_step_is_finished_by_the_next_reader() {
    use imageindex::index::LOCAL_OWNER;
    let fx = Fixture::new("generations_cut");
    let plain = plain_index(&fx, 3).await;
    let gens = generations_of(&fx).await;
    let g0 = format!("{}_g0", fx.name);

    // Cut between the rename and the alias.
    plain.rename(&g0).await.unwrap();
    let err = fx.index(IndexKind::Hnsw).await.ensure(2048, model().id(), false, LOCAL_OWNER).await.unwrap_err();
    assert!(err.to_string().contains("moved behind its alias"), "a plain collection is not made: {err}");
    assert_eq!(fx.index(IndexKind::Hnsw).await.catalog.counts().await.unwrap().indexed, 3, "rows kept");
    let again = plan_again(&fx, &gens).await;
    assert_eq!((again.indexed, again.vectors), (0, 3), "nothing embedded again: {again:?}");
    let serving = gens.serving().await.unwrap().unwrap();
    assert_eq!((serving.number, serving.collection.as_str(), serving.catalog.as_str()), (0, g0.as_str(), &*fx.name));
    assert_eq!(plain.alias_target().await.unwrap().as_deref(), Some(g0.as_str()), "the alias is back");

    // Cut between the alias and the table, in a swap: generation 1 built, the alias moved to it.
    let (_, building) = gens.begin(model().id(), LOCAL_OWNER).await.unwrap();
    let b = imageindex::sync::Backends { source: fx.source.clone(), index: gens.to_build(&building, model().id()) };
    assert_eq!(fx.sync(&b).await.indexed, 3);
    plain.point_alias_at(&building.collection).await.unwrap();
    let dropped = gens.collect(Duration::ZERO, LOCAL_OWNER).await.unwrap();
    assert_eq!(dropped.iter().map(|g| g.number).collect::<Vec<_>>(), [0], "the old generation is collected");
    assert!(gens.unfinished().await.unwrap().is_none(), "nothing left building");
    let states: Vec<_> = gens.list().await.unwrap().iter().map(|g| (g.number, g.state)).collect();
    assert_eq!(states, [(0, State::Dropped), (1, State::Serving)]);
    assert_eq!(plan_again(&fx, &gens).await.vectors, 3);
    fx.cleanup().await;

    // Cut between the alias and the row of generation 0: its rows are the name's.
    let fx = Fixture::new("generations_cut_row");
    let plain = plain_index(&fx, 2).await;
    let g0 = format!("{}_g0", fx.name);
    plain.rename(&g0).await.unwrap();
    plain.point_alias_at(&g0).await.unwrap();
    let gens = generations_of(&fx).await;
    let again = plan_again(&fx, &gens).await;
    assert_eq!((again.indexed, again.unchanged, again.vectors), (0, 2, 2), "{again:?}");
    let all = gens.list().await.unwrap();
    assert_eq!(
        all.iter().map(|g| (g.number, g.state, g.catalog.as_str())).collect::<Vec<_>>(),
        [(0, State::Serving, &*fx.name)]
    );
    fx.cleanup().await;
}

/// A search pod or Job that outlived a generation's grace period (a long model load) opened its
/// collection with `ensure`, which made it again, empty: a dropped generation came back, with a
/// catalog claim and, after an upload, vectors nobody would ever collect.
#[tokio::test(flavor = "multi_thread")]
async fn a_dropped_generation_is_never_made_again() {
    use imageindex::index::LOCAL_OWNER;
    use imageindex::store::Error;
    let fx = Fixture::new("generations_resurrect");
    let plain = plain_index(&fx, 2).await;
    let gens = generations_of(&fx).await;
    let (serving, building) = gens.begin(model().id(), LOCAL_OWNER).await.unwrap();
    let old = serving.unwrap();
    let b = imageindex::sync::Backends { source: fx.source.clone(), index: gens.to_build(&building, model().id()) };
    fx.sync(&b).await;
    gens.swap(Some(&old), &building).await.unwrap();
    assert_eq!(gens.collect(Duration::ZERO, LOCAL_OWNER).await.unwrap().len(), 1);

    let late = gens.index(&old, model().id());
    let err = late.ensure(2048, model().id(), false, LOCAL_OWNER).await.unwrap_err();
    assert!(matches!(err, Error::NotFound(_)), "{err}");
    assert!(plain.scoped(&old.collection).ready().await.is_err(), "{} is not in Milvus", old.collection);
    let states: Vec<_> = gens.list().await.unwrap().iter().map(|g| (g.number, g.state)).collect();
    assert_eq!(states, [(0, State::Dropped), (1, State::Serving)]);
    fx.cleanup().await;
}
