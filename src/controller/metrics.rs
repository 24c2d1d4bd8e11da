//! Controller metrics on `/metrics`: reconciles, failures by kind, and reconcile duration; and
//! per ImageIndex (labels `namespace`, `name`): images by state, phase, last sync time and
//! embedding Job durations, as the last status written says, forgotten when the index goes.

use std::sync::atomic::AtomicU64;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::crd::{ImageIndexStatus, Phase};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ErrorLabels {
    error: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct IndexLabels {
    namespace: String,
    name: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    namespace: String,
    name: String,
    state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PhaseLabels {
    namespace: String,
    name: String,
    phase: &'static str,
}

const PHASES: [(Phase, &str); 5] = [
    (Phase::Pending, "Pending"),
    (Phase::Indexing, "Indexing"),
    (Phase::Ready, "Ready"),
    (Phase::Degraded, "Degraded"),
    (Phase::Failed, "Failed"),
];
const STATES: [&str; 4] = ["discovered", "indexed", "failed", "pending"];

fn job_buckets() -> Histogram {
    // 10 s to ~28 h.
    Histogram::new(exponential_buckets(10.0, 2.0, 14))
}

pub struct Metrics {
    pub registry: Registry,
    reconciles: Counter,
    failures: Family<ErrorLabels, Counter>,
    duration: Histogram,
    leading: Gauge,
    images: Family<StateLabels, Gauge>,
    phase: Family<PhaseLabels, Gauge>,
    last_sync: Family<IndexLabels, Gauge<f64, AtomicU64>>,
    job_duration: Family<IndexLabels, Histogram, fn() -> Histogram>,
    /// The Job each index's duration was last observed for: a reconcile whose status write
    /// failed sees the same Job succeed again.
    observed_jobs: std::sync::Mutex<std::collections::HashMap<IndexLabels, String>>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("imageindex_controller");
        let reconciles = Counter::default();
        let failures = Family::<ErrorLabels, Counter>::default();
        // 1 ms to ~65 s.
        let duration = Histogram::new(exponential_buckets(0.001, 2.0, 17));
        registry.register("reconciles", "Reconciles run", reconciles.clone());
        registry.register("reconcile_failures", "Reconciles that failed, by kind of error", failures.clone());
        registry.register("reconcile_duration_seconds", "Time per reconcile", duration.clone());
        let leading = Gauge::default();
        registry.register("leading", "1 while this replica holds the lease and reconciles", leading.clone());
        let images = Family::<StateLabels, Gauge>::default();
        registry.register(
            "images",
            "Objects of an ImageIndex by state (discovered, indexed, failed, pending), as its status says",
            images.clone(),
        );
        let phase = Family::<PhaseLabels, Gauge>::default();
        registry.register("phase", "1 for an ImageIndex's current phase, 0 for the others", phase.clone());
        let last_sync = Family::<IndexLabels, Gauge<f64, AtomicU64>>::default();
        registry.register(
            "last_sync_timestamp_seconds",
            "When an ImageIndex's last embedding Job completed (Unix time)",
            last_sync.clone(),
        );
        let job_duration = Family::<IndexLabels, Histogram, fn() -> Histogram>::new_with_constructor(job_buckets);
        registry.register(
            "embedding_job_duration_seconds",
            "From creation to completion of the embedding Jobs that succeeded",
            job_duration.clone(),
        );
        Self {
            registry,
            reconciles,
            failures,
            duration,
            leading,
            images,
            phase,
            last_sync,
            job_duration,
            observed_jobs: Default::default(),
        }
    }
}

impl Metrics {
    pub fn observe(&self, took: Duration, error: Option<&str>) {
        self.reconciles.inc();
        self.duration.observe(took.as_secs_f64());
        if let Some(e) = error {
            self.failures.get_or_create(&ErrorLabels { error: e.to_string() }).inc();
        }
    }

    pub fn set_leading(&self, leading: bool) {
        self.leading.set(leading as i64);
    }

    /// An ImageIndex's figures as `status` says them.
    pub fn index_status(&self, namespace: &str, name: &str, status: &ImageIndexStatus) {
        let labels = |state| StateLabels { namespace: namespace.into(), name: name.into(), state };
        let c = &status.images;
        for (state, n) in STATES.into_iter().zip([c.discovered, c.indexed, c.failed, c.pending]) {
            self.images.get_or_create(&labels(state)).set(n as i64);
        }
        for (phase, label) in PHASES {
            let l = PhaseLabels { namespace: namespace.into(), name: name.into(), phase: label };
            self.phase.get_or_create(&l).set((status.phase == Some(phase)) as i64);
        }
        if let Some(t) = &status.last_sync_time {
            let l = IndexLabels { namespace: namespace.into(), name: name.into() };
            self.last_sync.get_or_create(&l).set(t.0.as_millisecond() as f64 / 1000.0);
        }
    }

    /// The embedding Job `job` of the ImageIndex succeeded after `took` (observed once per Job).
    pub fn job_succeeded(&self, namespace: &str, name: &str, job: &str, took: Duration) {
        let l = IndexLabels { namespace: namespace.into(), name: name.into() };
        let mut observed = self.observed_jobs.lock().unwrap_or_else(|e| e.into_inner());
        if observed.get(&l).map(String::as_str) != Some(job) {
            self.job_duration.get_or_create(&l).observe(took.as_secs_f64());
            observed.insert(l, job.into());
        }
    }

    /// Drops every series of a deleted ImageIndex.
    pub fn forget_index(&self, namespace: &str, name: &str) {
        let index = IndexLabels { namespace: namespace.into(), name: name.into() };
        for state in STATES {
            self.images.remove(&StateLabels { namespace: namespace.into(), name: name.into(), state });
        }
        for (_, phase) in PHASES {
            self.phase.remove(&PhaseLabels { namespace: namespace.into(), name: name.into(), phase });
        }
        self.last_sync.remove(&index);
        self.job_duration.remove(&index);
        self.observed_jobs.lock().unwrap_or_else(|e| e.into_inner()).remove(&index);
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry).expect("writing to a String");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    #[test]
    fn per_index_series_follow_the_status_and_go_with_the_index() {
        let m = Metrics::default();
        let mut st = ImageIndexStatus { phase: Some(Phase::Indexing), ..Default::default() };
        (st.images.discovered, st.images.indexed, st.images.failed, st.images.pending) = (220, 150, 3, 67);
        st.last_sync_time = Some(Time("2026-12-05T12:00:00Z".parse().unwrap()));
        m.index_status("shop", "products", &st);
        m.index_status("other", "photos", &ImageIndexStatus::default());
        m.job_succeeded("shop", "products", "products-embed-3", Duration::from_secs(95));
        // The same Job again (its status write failed, the next reconcile sees it succeed anew).
        m.job_succeeded("shop", "products", "products-embed-3", Duration::from_secs(95));
        let text = m.encode();
        for line in [
            r#"imageindex_controller_images{namespace="shop",name="products",state="indexed"} 150"#,
            r#"imageindex_controller_images{namespace="shop",name="products",state="pending"} 67"#,
            r#"imageindex_controller_phase{namespace="shop",name="products",phase="Indexing"} 1"#,
            r#"imageindex_controller_phase{namespace="shop",name="products",phase="Ready"} 0"#,
            r#"imageindex_controller_last_sync_timestamp_seconds{namespace="shop",name="products"} 1796472000"#,
            r#"imageindex_controller_embedding_job_duration_seconds_count{namespace="shop",name="products"} 1"#,
        ] {
            assert!(text.contains(line), "no {line} in\n{text}");
        }
        m.forget_index("shop", "products");
        let text = m.encode();
        assert!(!text.contains(r#"name="products""#), "series left after the index went:\n{text}");
        assert!(text.contains(r#"imageindex_controller_images{namespace="other",name="photos",state="indexed"} 0"#));
    }
}
