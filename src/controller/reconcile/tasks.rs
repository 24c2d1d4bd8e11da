//! The plan and cleanup Jobs as the reconciler reads them, pure: their state, the report in their
//! pod's termination message, why a pod cannot start, what the report means as conditions, and
//! when to plan again.

use std::time::Duration;

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;

use super::jobs::{Diff, JobState, JobView, age};
use crate::contract::report::{GenerationReport, GenerationsReport, Report, Stop};
use crate::controller::builders::{AFTER_JOB, RESYNC_FOR};
use crate::controller::status::{COLLECTION_READY, INDEXED, MILVUS_READY, Observed, REBUILDING, reason};
use crate::crd::{GenerationsStatus, ImageCounts, ImageIndex};

/// A plan or cleanup Job with what its pod said.
#[derive(Clone, Debug, PartialEq)]
pub struct Task {
    pub job: JobView,
    pub after_job: Option<String>,
    pub resync: Option<String>,
    /// The report its pod wrote, once it ended.
    pub report: Option<Report>,
    /// Why its pod cannot start (Unschedulable, a Secret missing, an image it cannot pull).
    pub blocked: Option<Blocked>,
}

/// A pod that cannot start: the kubelet's or scheduler's reason, and its message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Blocked {
    pub reason: String,
    pub message: String,
}

impl std::fmt::Display for Blocked {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.reason, self.message)
    }
}

impl Task {
    /// `pods`: any pods; those of this Job (by the Job controller's `job-name` label) are used.
    pub fn of(job: &Job, pods: &[Pod]) -> Self {
        let name = job.name_any();
        let mut own: Vec<&Pod> =
            pods.iter().filter(|p| p.labels().get("job-name").is_some_and(|n| *n == name)).collect();
        own.sort_by_key(|p| p.metadata.creation_timestamp.as_ref().map(|t| t.0));
        let a = job.annotations();
        Self {
            job: JobView::of(job),
            after_job: a.get(AFTER_JOB).cloned(),
            resync: a.get(RESYNC_FOR).cloned(),
            report: own.iter().rev().find_map(|p| report(p)),
            blocked: own.iter().rev().find_map(|p| blocked(p)),
        }
    }
}

/// The report in a pod's termination message, once its container ended.
pub fn report(pod: &Pod) -> Option<Report> {
    let statuses = pod.status.as_ref()?.container_statuses.as_ref()?;
    statuses.iter().find_map(|c| Report::parse(c.state.as_ref()?.terminated.as_ref()?.message.as_deref()?))
}

/// Why a pod that has not started cannot: the scheduler found no node (no GPU node, taints, too
/// little memory), or the kubelet cannot make its container (a Secret or key missing, an image it
/// cannot pull). A pod merely starting is not blocked.
pub fn blocked(pod: &Pod) -> Option<Blocked> {
    let status = pod.status.as_ref()?;
    if let Some(c) = status.conditions.iter().flatten().find(|c| c.type_ == "PodScheduled" && c.status == "False")
        && c.reason.as_deref() == Some("Unschedulable")
    {
        return Some(Blocked { reason: "Unschedulable".into(), message: c.message.clone().unwrap_or_default() });
    }
    const STUCK: [&str; 5] =
        ["CreateContainerConfigError", "ErrImagePull", "ImagePullBackOff", "InvalidImageName", "CreateContainerError"];
    status.container_statuses.iter().flatten().find_map(|c| {
        let waiting = c.state.as_ref()?.waiting.as_ref()?;
        let why = waiting.reason.as_deref()?;
        STUCK
            .contains(&why)
            .then(|| Blocked { reason: why.into(), message: waiting.message.clone().unwrap_or_default() })
    })
}

/// The newest of `tasks`.
pub fn latest(tasks: &[Task]) -> Option<&Task> {
    tasks.iter().max_by_key(|t| t.job.created)
}

/// The generations a plan reported, as the status shows them.
pub fn generations_status(report: &GenerationsReport) -> GenerationsStatus {
    GenerationsStatus { serving: report.serving.clone(), building: report.building.clone() }
}

/// The Rebuilding condition: True while a generation is built for a new model (search reads the
/// old one meanwhile), False once search reads the newest; nothing for an index that never had
/// more than its first collection.
pub fn rebuilding(report: Option<&GenerationsReport>) -> Option<Observed> {
    let report = report?;
    let name =
        |g: &GenerationReport| format!("generation {} ({})", g.number, g.model.as_deref().unwrap_or("no model yet"));
    let serving = report.serving.as_ref().map_or("nothing yet".to_string(), name);
    Some(match &report.building {
        Some(b) => Observed::yes(
            REBUILDING,
            reason::BUILDING,
            format!(
                "building {}: {} objects indexed, {} failed; search reads {serving} until it is complete",
                name(b),
                b.indexed,
                b.failed
            ),
        ),
        None if report.swapped => Observed::no(REBUILDING, reason::SWAPPED, format!("search moved to {serving}")),
        None => Observed::no(REBUILDING, reason::SERVING, format!("search reads {serving}")),
    })
}

/// The diff a plan that succeeded found, for the Job decision.
pub fn diff(plan: &Task) -> Option<Diff> {
    let Some(Report::Planned { plan: id, discovered, pending, refused, .. }) = &plan.report else { return None };
    (plan.job.state == JobState::Succeeded).then(|| Diff {
        at: plan.job.finished.as_ref().map(|t| t.0).or(plan.job.created).unwrap_or_default(),
        spec_generation: plan.job.spec_generation,
        after_job: plan.after_job.clone(),
        discovered: *discovered,
        pending: *pending,
        refused: refused.clone(),
        plan: *id,
    })
}

/// What to do about planning, when the Job decision needs a fresh diff.
#[derive(Clone, Debug, PartialEq)]
pub enum PlanNext {
    /// A plan runs: wait for it (its pod may be blocked).
    Running {
        name: String,
        blocked: Option<Blocked>,
    },
    /// The last plan failed: try again after this long.
    Backoff {
        retry_in: Duration,
    },
    /// The last plan found a configuration error: no plan until the spec changes.
    Halted,
    Create,
}

/// Plans are retried with backoff: 10 s, doubling with each failure in a row, at most 5 min.
pub fn next_plan(plans: &[Task], spec_generation: i64, now: Timestamp) -> PlanNext {
    if let Some(t) = plans.iter().find(|t| t.job.state == JobState::Active) {
        return PlanNext::Running { name: t.job.name.clone(), blocked: t.blocked.clone() };
    }
    let Some(last) = latest(plans) else { return PlanNext::Create };
    if last.job.state == JobState::Succeeded {
        return PlanNext::Create;
    }
    if let Some(Report::Stopped { at, .. }) = &last.report
        && at.is_config()
        && last.job.spec_generation == spec_generation
    {
        return PlanNext::Halted;
    }
    let mut newest_first: Vec<&Task> = plans.iter().collect();
    newest_first.sort_by_key(|t| std::cmp::Reverse(t.job.created));
    let failures = newest_first.iter().take_while(|t| matches!(t.job.state, JobState::Failed(_))).count() as u32;
    let wait = Duration::from_secs(10u64.saturating_mul(1 << failures.saturating_sub(1).min(5)).min(300));
    let since = last.job.finished.as_ref().map(|t| age(t, now)).unwrap_or(wait);
    if since < wait { PlanNext::Backoff { retry_in: wait - since } } else { PlanNext::Create }
}

/// The backend conditions a finished plan shows: both ready, or the one it stopped at. A plan
/// that failed without a report (killed, out of time) says so on Indexed.
pub fn conditions(plan: &Task, milvus_url: &str) -> Vec<Observed> {
    let milvus = Observed::yes(MILVUS_READY, reason::READY, format!("Milvus at {milvus_url}"));
    let collection = Observed::yes(COLLECTION_READY, reason::READY, "collection loaded; catalog tables migrated");
    let name = &plan.job.name;
    match (&plan.report, &plan.job.state) {
        (Some(Report::Stopped { at, message }), _) => {
            let (type_, why) = match at {
                Stop::MilvusUnavailable => (MILVUS_READY, reason::MILVUS_UNAVAILABLE),
                Stop::MysqlUnavailable => (COLLECTION_READY, reason::MYSQL_UNAVAILABLE),
                Stop::ModelMismatch => (COLLECTION_READY, reason::MODEL_MISMATCH),
                Stop::ModelUnusable => (COLLECTION_READY, reason::MODEL_UNUSABLE),
                Stop::IndexMismatch => (COLLECTION_READY, reason::INDEX_MISMATCH),
                Stop::Claimed => (COLLECTION_READY, reason::COLLECTION_CLAIMED),
                Stop::CollectionUnavailable => (COLLECTION_READY, reason::COLLECTION_UNAVAILABLE),
                Stop::SourceUnavailable => (INDEXED, reason::SOURCE_UNAVAILABLE),
            };
            let stopped = Observed::no(type_, why, format!("{message} (plan Job {name})"));
            match type_ {
                MILVUS_READY => vec![stopped],
                COLLECTION_READY => vec![milvus, stopped],
                _ => vec![milvus, collection, stopped],
            }
        }
        (Some(Report::Planned { .. }), JobState::Succeeded) => vec![milvus, collection],
        (_, JobState::Failed(why)) => {
            vec![Observed::no(INDEXED, reason::JOB_FAILED, format!("plan Job {name} failed without a report: {why}"))]
        }
        _ => vec![],
    }
}

/// A blocked pod as a condition: a Secret the spec names belongs to the condition that needs it
/// (the MySQL URL to the catalog, the Milvus credentials to Milvus, the bucket's keys to
/// indexing); anything else holds indexing up.
pub fn blocked_condition(image_index: &ImageIndex, what: &str, b: &Blocked) -> Observed {
    let s = &image_index.spec;
    let names = |n: &str| b.message.contains(&format!("\"{n}\"")) || b.message.contains(&format!("/{n}"));
    let message = format!("{what} cannot start: {b}");
    if b.reason == "CreateContainerConfigError" {
        let why =
            if b.message.contains("couldn't find key") { reason::SECRET_KEY_MISSING } else { reason::SECRET_NOT_FOUND };
        if names(&s.mysql.secret_ref.name) {
            return Observed::no(COLLECTION_READY, why, message);
        }
        if s.milvus.credentials_secret_ref.as_ref().is_some_and(|r| names(&r.name)) {
            return Observed::no(MILVUS_READY, why, message);
        }
        if s.source.credentials_secret.as_deref().is_some_and(names) {
            return Observed::no(INDEXED, why, message);
        }
    }
    let why = if b.reason == "Unschedulable" { reason::UNSCHEDULABLE } else { reason::PODS_CANNOT_START };
    Observed::no(INDEXED, why, message)
}

/// The Indexed condition, saying how many indexed objects could not be read again, where any
/// could not: search keeps their older versions. When they are half of what is indexed or more
/// (a bucket re-encrypted with a key the pods lack, a policy that denies them), it says that is
/// the likely cause; and it says how many deletions are held back meanwhile.
pub fn with_stale(mut indexed: Observed, images: &ImageCounts) -> Observed {
    let ImageCounts { stale, held, indexed: of, .. } = *images;
    if stale > 0 {
        indexed.message.push_str(&format!(
            "; {stale} of the {of} indexed objects changed but could not be read (the bucket refused or kept \
             failing the GET): search keeps their older versions, and each sync tries again"
        ));
        if stale * 2 >= of {
            indexed.message.push_str(
                ". Most reads are refused: the bucket's credentials, policy or encryption keys likely changed",
            );
        }
    }
    if held > 0 {
        indexed.message.push_str(&format!(
            "; {held} objects gone from the listing are not deleted from the index: with so many reads refused, \
             the listing proves nothing gone. They are deleted once the objects can be read again, or with \
             spec.source.allowMassDeletion"
        ));
    }
    indexed
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    const NOW: i64 = 1_800_000_000;

    fn at(secs_ago: i64) -> Timestamp {
        Timestamp::from_second(NOW - secs_ago).unwrap()
    }

    fn pod(job: &str, status: serde_json::Value) -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": format!("{job}-x"), "labels": {"job-name": job}, "creationTimestamp": "2026-01-01T00:00:00Z"},
            "status": status,
        }))
        .unwrap()
    }

    fn job(name: &str, created_ago: i64, state: &str, finished_ago: i64) -> Job {
        let conditions = match state {
            "Complete" | "Failed" => serde_json::json!([{"type": state, "status": "True",
                "lastTransitionTime": Time(at(finished_ago)), "message": "BackoffLimitExceeded"}]),
            _ => serde_json::json!([]),
        };
        let completion = (state == "Complete").then(|| Time(at(finished_ago)));
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "creationTimestamp": Time(at(created_ago)),
                "annotations": {"imageindex.dev/generation": "3", "imageindex.dev/after-job": "photos-embed-1"}},
            "spec": {"template": {}},
            "status": {"conditions": conditions, "completionTime": completion},
        }))
        .unwrap()
    }

    #[test]
    fn stale_objects_are_told_in_the_indexed_condition() {
        let up = Observed::yes(INDEXED, reason::UP_TO_DATE, "40 objects in sync");
        let images = |stale, held| ImageCounts { indexed: 40, stale, held, ..Default::default() };
        assert_eq!(with_stale(up.clone(), &images(0, 0)), up);
        let few = with_stale(up.clone(), &images(3, 0));
        assert!(few.message.contains("3 of the 40 indexed objects changed but could not be read"), "{}", few.message);
        assert!(!few.message.contains("Most reads"));
        assert!(!few.message.contains("not deleted"));
        let most = with_stale(up, &images(40, 5));
        assert!(most.message.contains("encryption keys likely changed"), "{}", most.message);
        assert!(most.message.contains("5 objects gone from the listing are not deleted"), "{}", most.message);
    }

    #[test]
    fn the_rebuilding_condition_says_which_generation_serves_and_which_is_built() {
        let g = |number, model: &str, indexed| GenerationReport {
            number,
            collection: format!("photos_g{number}"),
            model: Some(model.into()),
            indexed,
            failed: 1,
            stale: 0,
        };
        assert_eq!(rebuilding(None), None, "an index that never had more than its first collection");
        let building = GenerationsReport {
            serving: Some(g(1, "resnet50.onnx@fp32", 200)),
            building: Some(g(2, "resnet18.onnx@fp32", 120)),
            swapped: false,
        };
        let c = rebuilding(Some(&building)).unwrap();
        assert_eq!((c.type_, c.ok, c.reason), (REBUILDING, Some(true), reason::BUILDING));
        assert!(c.message.contains("generation 2 (resnet18.onnx@fp32): 120 objects indexed"), "{}", c.message);
        assert!(c.message.contains("search reads generation 1 (resnet50.onnx@fp32)"), "{}", c.message);
        let status = generations_status(&building);
        assert_eq!(status.building.as_ref().map(|b| (b.number, b.indexed)), Some((2, 120)));
        assert_eq!(status.serving.as_ref().map(|s| s.collection.as_str()), Some("photos_g1"));

        let swapped =
            GenerationsReport { serving: Some(g(2, "resnet18.onnx@fp32", 201)), building: None, swapped: true };
        let c = rebuilding(Some(&swapped)).unwrap();
        assert_eq!((c.ok, c.reason), (Some(false), reason::SWAPPED));
        assert_eq!(c.message, "search moved to generation 2 (resnet18.onnx@fp32)");
        let settled = GenerationsReport { swapped: false, ..swapped };
        assert_eq!(rebuilding(Some(&settled)).unwrap().reason, reason::SERVING);
        assert_eq!(generations_status(&settled).building, None);
    }

    fn terminated(report: &Report) -> serde_json::Value {
        serde_json::json!({"containerStatuses": [{"name": "plan", "image": "i", "imageID": "", "ready": false,
            "restartCount": 0, "state": {"terminated": {"exitCode": 0, "message": report.to_json()}}}]})
    }

    #[test]
    fn a_plan_reads_back_as_its_report_and_its_diff() {
        let planned = Report::Planned {
            plan: Some(12),
            discovered: 9,
            pending: 2,
            refused: None,
            indexed: 7,
            failed: 0,
            stale: 0,
            held: 0,
            generations: None,
        };
        let pods = [pod("photos-plan-1", terminated(&planned)), pod("other", terminated(&Report::Dropped))];
        let t = Task::of(&job("photos-plan-1", 60, "Complete", 30), &pods);
        assert_eq!(t.report.as_ref(), Some(&planned));
        let d = diff(&t).unwrap();
        assert_eq!(
            (d.spec_generation, d.after_job.as_deref(), d.pending, d.at, d.plan),
            (3, Some("photos-embed-1"), 2, at(30), Some(12))
        );
        assert_eq!(conditions(&t, "http://m").iter().map(|o| o.ok).collect::<Vec<_>>(), vec![Some(true); 2]);
        // A pod killed before it wrote one: no report, no diff.
        let killed = Task::of(&job("photos-plan-2", 60, "Failed", 30), &[]);
        assert_eq!((killed.report.clone(), diff(&killed)), (None, None));
        assert_eq!(conditions(&killed, "m")[0].reason, reason::JOB_FAILED);
    }

    #[test]
    fn what_a_plan_stopped_at_is_the_condition_that_says_so() {
        let stopped = |at| {
            let r = Report::stopped(at, "why");
            Task::of(&job("p", 60, "Failed", 30), &[pod("p", terminated(&r))])
        };
        let last = |t: &Task| conditions(t, "m").last().map(|o| (o.type_, o.reason)).unwrap();
        assert_eq!(last(&stopped(Stop::MilvusUnavailable)), (MILVUS_READY, reason::MILVUS_UNAVAILABLE));
        assert_eq!(last(&stopped(Stop::ModelMismatch)), (COLLECTION_READY, reason::MODEL_MISMATCH));
        assert_eq!(last(&stopped(Stop::SourceUnavailable)), (INDEXED, reason::SOURCE_UNAVAILABLE));
        assert_eq!(conditions(&stopped(Stop::SourceUnavailable), "m").len(), 3);
    }

    #[test]
    fn plans_back_off_and_configuration_errors_wait_for_the_spec() {
        let now = at(0);
        let failed = |name: &str, created, finished| Task::of(&job(name, created, "Failed", finished), &[]);
        assert_eq!(next_plan(&[], 3, now), PlanNext::Create);
        // One failure 4 s ago: 10 s; three in a row, the last 30 s ago: 40 s.
        assert_eq!(next_plan(&[failed("a", 10, 4)], 3, now), PlanNext::Backoff { retry_in: Duration::from_secs(6) });
        let three = [failed("a", 300, 290), failed("b", 200, 190), failed("c", 100, 30)];
        assert_eq!(next_plan(&three, 3, now), PlanNext::Backoff { retry_in: Duration::from_secs(10) });
        assert_eq!(next_plan(&[failed("a", 100, 20)], 3, now), PlanNext::Create);
        let ok = Task::of(&job("ok", 400, "Complete", 390), &[]);
        assert_eq!(next_plan(std::slice::from_ref(&ok), 3, now), PlanNext::Create);
        let running = Task::of(&job("r", 5, "", 0), &[]);
        assert!(matches!(next_plan(&[ok, running], 3, now), PlanNext::Running { name, .. } if name == "r"));
        // Another model in the collection: no retry storm; a new generation tries again.
        let r = Report::stopped(Stop::ModelMismatch, "holds fp16");
        let mismatch = Task::of(&job("m", 100, "Failed", 90), &[pod("m", terminated(&r))]);
        assert_eq!(next_plan(std::slice::from_ref(&mismatch), 3, now), PlanNext::Halted);
        assert_eq!(next_plan(&[mismatch], 4, now), PlanNext::Create);
    }

    #[test]
    fn pods_that_cannot_start_say_why_on_the_condition_that_needs_them() {
        let unschedulable = pod(
            "j",
            serde_json::json!({"conditions": [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                "message": "0/3 nodes are available: 3 Insufficient nvidia.com/gpu."}]}),
        );
        let waiting = |reason: &str, message: &str| {
            pod(
                "j",
                serde_json::json!({"containerStatuses": [{"name": "plan", "image": "i", "imageID": "", "ready": false,
                "restartCount": 0, "state": {"waiting": {"reason": reason, "message": message}}}]}),
            )
        };
        let ii: ImageIndex = serde_json::from_value(serde_json::json!({
            "apiVersion": "imageindex.dev/v1alpha1", "kind": "ImageIndex", "metadata": {"name": "photos"},
            "spec": {"source": {"url": "s3://b/", "credentialsSecret": "bucket-keys"}, "milvus": {"address": "m"},
                "mysql": {"secretRef": {"name": "db"}}}}))
        .unwrap();
        let gpu = blocked(&unschedulable).unwrap();
        let o = blocked_condition(&ii, "Job photos-embed-1", &gpu);
        assert_eq!((o.type_, o.reason), (INDEXED, reason::UNSCHEDULABLE));
        assert!(o.message.contains("Insufficient nvidia.com/gpu"), "{}", o.message);
        let db = blocked(&waiting("CreateContainerConfigError", "secret \"db\" not found")).unwrap();
        assert_eq!(blocked_condition(&ii, "x", &db).type_, COLLECTION_READY);
        let key = blocked(&waiting("CreateContainerConfigError", "couldn't find key url in Secret shop/db")).unwrap();
        assert_eq!(blocked_condition(&ii, "x", &key).reason, reason::SECRET_KEY_MISSING);
        let keys = blocked(&waiting("CreateContainerConfigError", "secret \"bucket-keys\" not found")).unwrap();
        assert_eq!(blocked_condition(&ii, "x", &keys).type_, INDEXED);
        let pull = blocked(&waiting("ImagePullBackOff", "Back-off pulling image")).unwrap();
        assert_eq!(blocked_condition(&ii, "x", &pull).reason, reason::PODS_CANNOT_START);
        assert_eq!(blocked(&waiting("ContainerCreating", "")), None, "starting is not blocked");
    }
}
