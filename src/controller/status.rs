//! Conditions and phase: pure functions from what a reconcile observed to the status it writes.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

use crate::crd::Phase;

pub const MILVUS_READY: &str = "MilvusReady";
pub const COLLECTION_READY: &str = "CollectionReady";
pub const INDEXED: &str = "Indexed";
pub const SEARCH_READY: &str = "SearchReady";
pub const ALL: [&str; 4] = [MILVUS_READY, COLLECTION_READY, INDEXED, SEARCH_READY];
/// True while a new generation of the index is built (a model change); search is unaffected, so
/// it is not part of Ready.
pub const REBUILDING: &str = "Rebuilding";
/// Conditions that say what is going on without deciding Ready.
pub const INFO: [&str; 1] = [REBUILDING];
/// The aggregate that kstatus, Argo CD, Flux and `kubectl wait --for=condition=Ready` read: True
/// when all four hold; otherwise False, with the reason of the first that does not.
pub const READY: &str = "Ready";

/// Every reason a condition can carry. `kubectl describe` shows them; tests cover each.
pub mod reason {
    pub const READY: &str = "Ready";
    pub const INVALID_SPEC: &str = "InvalidSpec";
    pub const MILVUS_NOT_FOUND: &str = "MilvusNotFound";
    pub const MILVUS_NOT_READY: &str = "MilvusNotReady";
    pub const MILVUS_UNAVAILABLE: &str = "MilvusUnavailable";
    pub const SECRET_NOT_FOUND: &str = "SecretNotFound";
    pub const SECRET_KEY_MISSING: &str = "SecretKeyMissing";
    pub const MYSQL_UNAVAILABLE: &str = "MySQLUnavailable";
    pub const MODEL_MISMATCH: &str = "ModelMismatch";
    /// The model file is missing, or does not say its vector width or preprocessing.
    pub const MODEL_UNUSABLE: &str = "ModelUnusable";
    /// The collection has another index type than `milvus.index.type`.
    pub const INDEX_MISMATCH: &str = "IndexMismatch";
    /// Another index owns the collection (see `Catalog::claim_owner`).
    pub const COLLECTION_CLAIMED: &str = "CollectionClaimed";
    /// Milvus or MySQL answered but making or checking the collection failed.
    pub const COLLECTION_UNAVAILABLE: &str = "CollectionUnavailable";
    pub const SOURCE_UNAVAILABLE: &str = "SourceUnavailable";
    pub const WAITING: &str = "WaitingForDependencies";
    pub const INDEXING: &str = "Indexing";
    pub const UP_TO_DATE: &str = "UpToDate";
    pub const JOB_FAILED: &str = "JobFailed";
    pub const DELETION_REFUSED: &str = "DeletionRefused";
    pub const AVAILABLE: &str = "Available";
    pub const UNAVAILABLE: &str = "Unavailable";
    pub const SCALED_TO_ZERO: &str = "ScaledToZero";
    /// An object of the search's name is in the namespace and is not this ImageIndex's.
    pub const NOT_OWNED: &str = "NotOwned";
    /// The Kubernetes API refused or failed a call the reconcile needed (RBAC, a 5xx, a timeout).
    pub const KUBERNETES_API_ERROR: &str = "KubernetesAPIError";
    /// `spec.suspend` is set: no listing, no new Job.
    pub const SUSPENDED: &str = "Suspended";
    /// Deleted; waiting for its Jobs and search pods to be gone before dropping the collection.
    pub const DELETING: &str = "Deleting";
    /// Deleted; dropping the collection or its catalog rows failed (retried, then kept).
    pub const CLEANUP_FAILED: &str = "CleanupFailed";
    /// A plan Job is making or checking the collection and diffing the bucket.
    pub const PLANNING: &str = "Planning";
    /// A new generation is being built for the model the spec asks for.
    pub const BUILDING: &str = "Building";
    /// Search reads the newest generation.
    pub const SERVING: &str = "Serving";
    /// This plan moved search to the generation it had built.
    pub const SWAPPED: &str = "Swapped";
    /// No node can take a Job's pods (no GPU node, taints, too little memory).
    pub const UNSCHEDULABLE: &str = "Unschedulable";
    /// A Job's pods cannot start: an image that cannot be pulled, a container that cannot be made.
    pub const PODS_CANNOT_START: &str = "PodsCannotStart";

    const ALL: &[&str] = &[
        READY,
        INVALID_SPEC,
        MILVUS_NOT_FOUND,
        MILVUS_NOT_READY,
        MILVUS_UNAVAILABLE,
        SECRET_NOT_FOUND,
        SECRET_KEY_MISSING,
        MYSQL_UNAVAILABLE,
        MODEL_MISMATCH,
        MODEL_UNUSABLE,
        INDEX_MISMATCH,
        COLLECTION_CLAIMED,
        COLLECTION_UNAVAILABLE,
        SOURCE_UNAVAILABLE,
        WAITING,
        INDEXING,
        UP_TO_DATE,
        JOB_FAILED,
        DELETION_REFUSED,
        AVAILABLE,
        UNAVAILABLE,
        SCALED_TO_ZERO,
        KUBERNETES_API_ERROR,
        DELETING,
        CLEANUP_FAILED,
        SUSPENDED,
        PLANNING,
        UNSCHEDULABLE,
        PODS_CANNOT_START,
        BUILDING,
        SERVING,
        SWAPPED,
    ];

    /// The reason among these that `r` is (conditions read back from the API hold Strings).
    pub fn known(r: &str) -> &'static str {
        ALL.iter().find(|k| **k == r).copied().unwrap_or(WAITING)
    }
}

/// One condition as a reconcile decided it (time and generation are added by `merge`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Observed {
    pub type_: &'static str,
    pub ok: Option<bool>,
    pub reason: &'static str,
    pub message: String,
}

impl Observed {
    pub fn yes(type_: &'static str, reason: &'static str, message: impl Into<String>) -> Self {
        Self { type_, ok: Some(true), reason, message: message.into() }
    }
    pub fn no(type_: &'static str, reason: &'static str, message: impl Into<String>) -> Self {
        Self { type_, ok: Some(false), reason, message: message.into() }
    }
    pub fn unknown(type_: &'static str, reason: &'static str, message: impl Into<String>) -> Self {
        Self { type_, ok: None, reason, message: message.into() }
    }
}

/// The new condition list: observed ones replace old ones of the same type, keeping
/// `lastTransitionTime` when the status did not change; types not observed this time keep theirs.
pub fn merge(old: &[Condition], observed: &[Observed], generation: Option<i64>, now: &Time) -> Vec<Condition> {
    let mut conds: Vec<Condition> = ALL
        .iter()
        .chain(&INFO)
        .filter_map(|&t| {
            let prev = old.iter().find(|c| c.type_ == t);
            let Some(o) = observed.iter().find(|o| o.type_ == t) else { return prev.cloned() };
            Some(condition(prev, o, generation, now))
        })
        .collect();
    // A reconcile that stopped on an API error says so here, whatever the others last said;
    // otherwise Ready is the first condition that does not hold.
    let ready = observed.iter().find(|o| o.type_ == READY).cloned().unwrap_or_else(|| {
        let blocking = ALL.iter().find_map(|&t| match conds.iter().find(|c| c.type_ == t) {
            Some(c) if c.status == "True" => None,
            Some(c) => Some((c.reason.clone(), format!("{t}: {}", c.message))),
            None => Some((reason::WAITING.to_string(), format!("{t}: not observed yet"))),
        });
        match blocking {
            None => Observed::yes(READY, reason::READY, "searchable and up to date"),
            Some((why, message)) => Observed { type_: READY, ok: Some(false), reason: reason::known(&why), message },
        }
    });
    conds.push(condition(old.iter().find(|c| c.type_ == READY), &ready, generation, now));
    conds
}

/// One condition from what was observed, keeping `lastTransitionTime` when the status is unchanged.
fn condition(prev: Option<&Condition>, o: &Observed, generation: Option<i64>, now: &Time) -> Condition {
    let status = match o.ok {
        Some(true) => "True",
        Some(false) => "False",
        None => "Unknown",
    };
    let last_transition_time = match prev {
        Some(p) if p.status == status => p.last_transition_time.clone(),
        _ => now.clone(),
    };
    Condition {
        type_: o.type_.into(),
        status: status.into(),
        reason: o.reason.into(),
        message: o.message.clone(),
        observed_generation: generation,
        last_transition_time,
    }
}

fn is(conds: &[Condition], t: &str, status: &str) -> bool {
    conds.iter().any(|c| c.type_ == t && c.status == status)
}

fn has_reason(conds: &[Condition], reason: &str) -> bool {
    conds.iter().any(|c| c.reason == reason)
}

/// The phase `kubectl get imgidx` shows. Failed: the spec cannot work. Indexing: a Job runs.
/// Ready: all four conditions hold. Degraded: was Ready (or Degraded) and something broke since,
/// or a Job failed. Pending: still waiting for what it needs.
pub fn phase(conds: &[Condition], previous: Option<Phase>) -> Phase {
    if has_reason(conds, reason::DELETING) || has_reason(conds, reason::CLEANUP_FAILED) {
        Phase::Deleting
    } else if has_reason(conds, reason::INVALID_SPEC) {
        Phase::Failed
    } else if conds.iter().any(|c| c.type_ == INDEXED && c.reason == reason::INDEXING) {
        Phase::Indexing
    } else if conds.iter().any(|c| c.type_ == INDEXED && c.reason == reason::SUSPENDED) {
        Phase::Suspended
    } else if ALL.iter().all(|t| is(conds, t, "True")) {
        Phase::Ready
    } else if has_reason(conds, reason::JOB_FAILED) || matches!(previous, Some(Phase::Ready | Phase::Degraded)) {
        Phase::Degraded
    } else {
        Phase::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::jiff::Timestamp;

    fn t(secs: i64) -> Time {
        Time(Timestamp::from_second(secs).unwrap())
    }

    fn all_true() -> Vec<Observed> {
        ALL.iter().map(|&c| Observed::yes(c, reason::READY, "")).collect()
    }

    #[test]
    fn transition_time_moves_only_when_the_status_does() {
        let first = merge(&[], &all_true(), Some(1), &t(100));
        let again = merge(&first, &all_true(), Some(2), &t(200));
        assert!(again.iter().all(|c| c.last_transition_time == t(100) && c.observed_generation == Some(2)));
        let broke = merge(&again, &[Observed::no(MILVUS_READY, reason::MILVUS_NOT_READY, "x")], Some(2), &t(300));
        let m = broke.iter().find(|c| c.type_ == MILVUS_READY).unwrap();
        assert_eq!((m.status.as_str(), m.last_transition_time.clone()), ("False", t(300)));
        // Conditions not observed this time are kept as they were.
        assert_eq!(broke.iter().find(|c| c.type_ == INDEXED).unwrap().last_transition_time, t(100));
        assert_eq!(broke.len(), 5);
        // The aggregate follows: False with the reason of the one that broke, then True again.
        let ready = |c: &[Condition]| c.iter().find(|c| c.type_ == READY).cloned().unwrap();
        assert_eq!((ready(&again).status.as_str(), ready(&again).last_transition_time), ("True", t(100)));
        let r = ready(&broke);
        assert_eq!((r.status.as_str(), r.reason.as_str()), ("False", reason::MILVUS_NOT_READY));
        assert!(r.message.starts_with("MilvusReady: x"), "{}", r.message);
        let healed = merge(&broke, &all_true(), Some(3), &t(400));
        assert_eq!((ready(&healed).status.as_str(), ready(&healed).last_transition_time), ("True", t(400)));
        let partial = merge(&[], &[Observed::yes(MILVUS_READY, reason::READY, "")], None, &t(1));
        assert_eq!(ready(&partial).reason, reason::WAITING);
    }

    #[test]
    fn phases() {
        let ready = merge(&[], &all_true(), Some(1), &t(1));
        assert_eq!(phase(&ready, None), Phase::Ready);
        let milvus_down = merge(&ready, &[Observed::no(MILVUS_READY, reason::MILVUS_NOT_READY, "")], None, &t(2));
        assert_eq!(phase(&milvus_down, Some(Phase::Ready)), Phase::Degraded);
        assert_eq!(phase(&milvus_down, Some(Phase::Pending)), Phase::Pending);
        let indexing = merge(&ready, &[Observed::no(INDEXED, reason::INDEXING, "")], None, &t(2));
        assert_eq!(phase(&indexing, Some(Phase::Ready)), Phase::Indexing);
        let failed_job = merge(&ready, &[Observed::no(INDEXED, reason::JOB_FAILED, "")], None, &t(2));
        assert_eq!(phase(&failed_job, Some(Phase::Indexing)), Phase::Degraded);
        let invalid = merge(&[], &[Observed::unknown(MILVUS_READY, reason::INVALID_SPEC, "")], None, &t(2));
        assert_eq!(phase(&invalid, Some(Phase::Ready)), Phase::Failed);
        assert_eq!(phase(&[], None), Phase::Pending);
    }
}
