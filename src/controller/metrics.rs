//! Controller metrics on `/metrics`: reconciles, failures by kind, and reconcile duration.

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ErrorLabels {
    error: String,
}

pub struct Metrics {
    pub registry: Registry,
    reconciles: Counter,
    failures: Family<ErrorLabels, Counter>,
    duration: Histogram,
    leading: Gauge,
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
        Self { registry, reconciles, failures, duration, leading }
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

    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry).expect("writing to a String");
        out
    }
}
