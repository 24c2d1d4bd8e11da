//! Embedding Jobs: what the cluster's Jobs say, and the decision whether to start one. Pure: the
//! driver lists the Jobs and the bucket, and acts on the decision.

use std::time::Duration;

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;

use crate::controller::builders::{EMBEDDING, SPEC_GENERATION};

/// A Job as the decision needs it.
#[derive(Clone, Debug, PartialEq)]
pub struct JobView {
    pub name: String,
    /// The spec generation it was created for.
    pub spec_generation: i64,
    /// The embedding hash it was created for (`builders::embedding_hash`); None on Jobs made
    /// before Jobs carried one.
    pub embedding: Option<String>,
    pub created: Option<Timestamp>,
    pub finished: Option<Time>,
    pub completions: i32,
    pub succeeded: i32,
    pub state: JobState,
}

#[derive(Clone, Debug, PartialEq)]
pub enum JobState {
    Active,
    Succeeded,
    Failed(String),
}

impl JobView {
    pub fn of(j: &Job) -> Self {
        let status = j.status.clone().unwrap_or_default();
        let cond = |t: &str| status.conditions.iter().flatten().find(|c| c.type_ == t && c.status == "True").cloned();
        let state = match (cond("Complete"), cond("Failed")) {
            (Some(_), _) => JobState::Succeeded,
            (_, Some(c)) => JobState::Failed(c.message.or(c.reason).unwrap_or_else(|| "failed".into())),
            _ => JobState::Active,
        };
        let finished = status.completion_time.clone().or_else(|| cond("Failed").and_then(|c| c.last_transition_time));
        Self {
            name: j.name_any(),
            spec_generation: j.annotations().get(SPEC_GENERATION).and_then(|g| g.parse().ok()).unwrap_or_default(),
            embedding: j.annotations().get(EMBEDDING).cloned(),
            created: j.metadata.creation_timestamp.as_ref().map(|t| t.0),
            finished,
            completions: j.spec.as_ref().and_then(|s| s.completions).unwrap_or(1),
            succeeded: status.succeeded.unwrap_or(0),
            state,
        }
    }
}

/// The last diff of the bucket against the catalog.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Diff {
    pub at: Timestamp,
    /// The spec generation it was made for, and the last finished Job it was made after.
    pub spec_generation: i64,
    pub after_job: Option<String>,
    /// Objects in the bucket, and objects new, changed or deleted since the catalog saw them.
    pub discovered: u64,
    pub pending: u64,
    /// The deletions it would make are refused (see `DeletionGuard`), and why.
    pub refused: Option<String>,
    /// Its id in the catalog (None from a plan Job of a version before plans were recorded).
    pub plan: Option<i64>,
}

/// What the decision looks at.
pub struct Inputs<'a> {
    pub jobs: &'a [JobView],
    pub spec_generation: i64,
    /// The embedding hash of the spec now, and the one the last successful Job indexed.
    pub embedding: &'a str,
    pub synced_embedding: Option<&'a str>,
    pub resync: Duration,
    pub diff: Option<&'a Diff>,
    pub now: Timestamp,
    /// `spec.suspend`.
    pub suspended: bool,
    /// A resync was asked for (`imageindex.dev/resync`) and not yet acted on: the wait after a
    /// failed Job is cut short (the caller also drops the remembered diff).
    pub resync_requested: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum JobDecision {
    /// A Job runs: never a second one.
    Running { name: String, succeeded: i32, completions: i32 },
    /// The latest Job failed for these embedding settings within the resync interval: wait the
    /// rest of it.
    FailedRecently { name: String, why: String, retry_in: Duration },
    /// No recent diff holds: list the bucket and decide again.
    Diff,
    /// Start a Job, for this reason, carrying out this plan.
    Create { why: String, plan: Option<i64> },
    /// The listing would delete more than the spec allows: no Job until it changes (or is allowed).
    DeletionRefused { why: String },
    /// Nothing to do until the next resync.
    UpToDate { discovered: u64 },
    /// `spec.suspend`: nothing is listed or started.
    Suspended,
}

/// The newest Job that is no longer running.
pub fn latest_done(jobs: &[JobView]) -> Option<&JobView> {
    jobs.iter().filter(|j| j.state != JobState::Active).max_by_key(|j| j.created)
}

/// How long before `now` `t` was (zero if after it).
pub(super) fn age(t: &Time, now: Timestamp) -> Duration {
    Duration::try_from(now.duration_since(t.0)).unwrap_or_default()
}

pub fn decide(i: &Inputs) -> JobDecision {
    if let Some(j) = i.jobs.iter().find(|j| j.state == JobState::Active) {
        return JobDecision::Running { name: j.name.clone(), succeeded: j.succeeded, completions: j.completions };
    }
    if i.suspended {
        return JobDecision::Suspended;
    }
    let latest = latest_done(i.jobs);
    if let Some(j) = latest.filter(|_| !i.resync_requested)
        && let JobState::Failed(why) = &j.state
        && j.embedding.as_deref() == Some(i.embedding)
        && let Some(finished) = &j.finished
        && age(finished, i.now) < i.resync
    {
        let retry_in = i.resync.saturating_sub(age(finished, i.now)).max(Duration::from_secs(5));
        return JobDecision::FailedRecently { name: j.name.clone(), why: why.clone(), retry_in };
    }
    let last_job = latest.map(|j| j.name.clone());
    let holds = |d: &&Diff| {
        Duration::try_from(i.now.duration_since(d.at)).unwrap_or_default() < i.resync
            && d.spec_generation == i.spec_generation
            && d.after_job == last_job
    };
    let Some(diff) = i.diff.filter(holds) else { return JobDecision::Diff };
    if let Some(why) = &diff.refused {
        JobDecision::DeletionRefused { why: why.clone() }
    } else if i.synced_embedding != Some(i.embedding) {
        JobDecision::Create { why: format!("embedding settings {} not indexed yet", i.embedding), plan: diff.plan }
    } else if diff.pending > 0 {
        JobDecision::Create { why: format!("{} objects new, changed or deleted", diff.pending), plan: diff.plan }
    } else {
        JobDecision::UpToDate { discovered: diff.discovered }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_800_000_000;

    fn at(secs_ago: i64) -> Timestamp {
        Timestamp::from_second(NOW - secs_ago).unwrap()
    }

    /// A Job for the embedding settings `h<generation>`.
    fn job(name: &str, spec_generation: i64, state: JobState, finished_ago: Option<i64>) -> JobView {
        JobView {
            name: name.into(),
            spec_generation,
            embedding: Some(format!("h{spec_generation}")),
            created: Some(at(3600)),
            finished: finished_ago.map(|s| Time(at(s))),
            completions: 2,
            succeeded: 1,
            state,
        }
    }

    fn diff(secs_ago: i64, after: Option<&str>, pending: u64) -> Diff {
        Diff {
            at: at(secs_ago),
            spec_generation: 3,
            after_job: after.map(Into::into),
            discovered: 10,
            pending,
            refused: None,
            plan: Some(41),
        }
    }

    /// Spec generation 3, embedding settings `h3`; `synced`: the settings of the last success.
    fn decide_with(jobs: &[JobView], synced: Option<i64>, d: Option<&Diff>) -> JobDecision {
        let synced = synced.map(|g| format!("h{g}"));
        decide(&Inputs {
            jobs,
            spec_generation: 3,
            embedding: "h3",
            synced_embedding: synced.as_deref(),
            resync: Duration::from_secs(600),
            diff: d,
            now: at(0),
            suspended: false,
            resync_requested: false,
        })
    }

    #[test]
    fn a_running_job_is_never_doubled() {
        let running = [job("j2", 3, JobState::Active, None), job("j1", 3, JobState::Succeeded, Some(10))];
        let d = decide_with(&running, Some(3), Some(&diff(1, Some("j1"), 5)));
        assert_eq!(d, JobDecision::Running { name: "j2".into(), succeeded: 1, completions: 2 });
    }

    #[test]
    fn a_failed_job_waits_out_the_interval_for_its_generation_only() {
        let failed = [job("j1", 3, JobState::Failed("BackoffLimitExceeded".into()), Some(100))];
        let d = decide_with(&failed, Some(2), None);
        let JobDecision::FailedRecently { retry_in, why, .. } = d else { panic!("{d:?}") };
        assert_eq!((retry_in, why.as_str()), (Duration::from_secs(500), "BackoffLimitExceeded"));
        // Long ago, or for an older spec: try again (after a fresh diff).
        let old = [job("j1", 3, JobState::Failed("x".into()), Some(700))];
        assert_eq!(decide_with(&old, Some(2), None), JobDecision::Diff);
        let other_spec = [job("j1", 2, JobState::Failed("x".into()), Some(100))];
        assert_eq!(decide_with(&other_spec, Some(2), None), JobDecision::Diff);
    }

    #[test]
    fn a_diff_holds_for_the_interval_the_spec_and_the_last_job() {
        let done = [job("j1", 3, JobState::Succeeded, Some(50))];
        assert_eq!(decide_with(&done, Some(3), None), JobDecision::Diff, "no diff yet");
        assert_eq!(decide_with(&done, Some(3), Some(&diff(700, Some("j1"), 0))), JobDecision::Diff, "too old");
        assert_eq!(decide_with(&done, Some(3), Some(&diff(5, None, 0))), JobDecision::Diff, "made before j1");
        let other_gen = Diff { spec_generation: 2, ..diff(5, Some("j1"), 0) };
        assert_eq!(decide_with(&done, Some(3), Some(&other_gen)), JobDecision::Diff, "another spec");
        assert_eq!(
            decide_with(&done, Some(3), Some(&diff(5, Some("j1"), 0))),
            JobDecision::UpToDate { discovered: 10 }
        );
    }

    #[test]
    fn work_or_a_new_spec_starts_a_job() {
        let done = [job("j1", 3, JobState::Succeeded, Some(50))];
        let d = decide_with(&done, Some(3), Some(&diff(5, Some("j1"), 4)));
        assert_eq!(d, JobDecision::Create { why: "4 objects new, changed or deleted".into(), plan: Some(41) });
        let d = decide_with(&done, Some(2), Some(&diff(5, Some("j1"), 0)));
        assert_eq!(d, JobDecision::Create { why: "embedding settings h3 not indexed yet".into(), plan: Some(41) });
        assert_eq!(
            decide_with(&[], None, Some(&diff(5, None, 0))),
            JobDecision::Create { why: "embedding settings h3 not indexed yet".into(), plan: Some(41) }
        );
    }

    /// A spec edit that leaves the embedding settings alone (search replicas: generation 4, the
    /// same hash) starts no Job; before, every new generation did.
    #[test]
    fn an_edit_that_changes_no_vector_starts_no_job() {
        let done = [job("j1", 3, JobState::Succeeded, Some(50))];
        let d = Diff { spec_generation: 4, ..diff(5, Some("j1"), 0) };
        let inputs = Inputs {
            jobs: &done,
            spec_generation: 4,
            embedding: "h3",
            synced_embedding: Some("h3"),
            resync: Duration::from_secs(600),
            diff: Some(&d),
            now: at(0),
            suspended: false,
            resync_requested: false,
        };
        assert_eq!(decide(&inputs), JobDecision::UpToDate { discovered: 10 });
        // A failed Job for the same settings waits out the interval across such edits too.
        let failed = [job("j1", 3, JobState::Failed("x".into()), Some(100))];
        assert!(matches!(decide(&Inputs { jobs: &failed, ..inputs }), JobDecision::FailedRecently { .. }));
    }

    #[test]
    fn suspend_stops_new_work_and_a_resync_request_cuts_the_wait_short() {
        let failed = [job("j1", 3, JobState::Failed("x".into()), Some(100))];
        let d = diff(5, Some("j1"), 4);
        let inputs = Inputs {
            jobs: &failed,
            spec_generation: 3,
            embedding: "h3",
            synced_embedding: Some("h3"),
            resync: Duration::from_secs(600),
            diff: Some(&d),
            now: at(0),
            suspended: true,
            resync_requested: false,
        };
        assert_eq!(decide(&inputs), JobDecision::Suspended);
        // A running Job is left to finish.
        let running = [job("j2", 3, JobState::Active, None)];
        assert!(matches!(decide(&Inputs { jobs: &running, ..inputs }), JobDecision::Running { .. }));
        let live = Inputs { suspended: false, ..inputs };
        assert!(matches!(decide(&live), JobDecision::FailedRecently { .. }));
        let asked = Inputs { resync_requested: true, ..live };
        assert_eq!(
            decide(&asked),
            JobDecision::Create { why: "4 objects new, changed or deleted".into(), plan: Some(41) }
        );
    }

    #[test]
    fn the_latest_finished_job_is_the_newest_created() {
        let mut a = job("a", 1, JobState::Succeeded, Some(10));
        a.created = Some(at(100));
        let mut b = job("b", 1, JobState::Failed("x".into()), Some(20));
        b.created = Some(at(50));
        let running = job("c", 1, JobState::Active, None);
        assert_eq!(latest_done(&[a, b, running]).unwrap().name, "b");
    }

    #[test]
    fn a_refused_deletion_starts_no_job() {
        let done = [job("j1", 3, JobState::Succeeded, Some(60))];
        let why = "refusing to delete 30 of the 30".to_string();
        let refused = Diff { refused: Some(why.clone()), ..diff(5, Some("j1"), 30) };
        let expected = JobDecision::DeletionRefused { why };
        assert_eq!(decide_with(&done, Some(3), Some(&refused)), expected);
        // Even for a spec generation not indexed yet: a new spec is listed afresh first.
        assert_eq!(decide_with(&done, Some(2), Some(&refused)), expected);
    }
}
