//! What reconciles share: the client, the operator's settings, and a little memory per
//! ImageIndex between reconciles (the retry count; all else is in the cluster's objects).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kube::Client;
use kube::runtime::controller::Action;
use kube::runtime::events::Recorder;

use crate::controller::metrics::Metrics;

/// Operator-wide settings.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Image for Jobs and search pods when an ImageIndex names none (the operator's own).
    pub default_image: String,
    /// What the server can do by its version: Indexed Jobs (1.24+; otherwise one pod embeds all
    /// shards), Job failure policies, PodDisruptionBudgets.
    pub features: crate::controller::builders::ServerFeatures,
    /// How long a plan Job may run (listing the bucket and diffing it against the catalog).
    pub plan_timeout: Duration,
    /// How long a `Delete` cleanup retries before it keeps the data and lets the ImageIndex go.
    pub cleanup_timeout: Duration,
    /// What ImageIndexes may choose for their pods (see `validate::Policy`).
    pub policy: super::validate::Policy,
}

pub struct Context {
    pub client: Client,
    pub settings: Settings,
    pub recorder: Recorder,
    pub metrics: Arc<Metrics>,
    memo: Mutex<HashMap<String, Memo>>,
}

/// Per-ImageIndex memory between reconciles: how many times in a row it waited on a dependency.
#[derive(Clone, Default)]
pub(super) struct Memo {
    pub retries: u32,
}

impl Context {
    pub fn new(client: Client, settings: Settings, recorder: Recorder, metrics: Arc<Metrics>) -> Self {
        Self { client, settings, recorder, metrics, memo: Mutex::new(HashMap::new()) }
    }

    /// Forgets an ImageIndex (on deletion).
    pub(super) fn forget(&self, key: &str) {
        self.memo.lock().expect("memo lock").remove(key);
    }

    pub(super) fn set_memo(&self, key: &str, f: impl FnOnce(&mut Memo)) {
        f(self.memo.lock().expect("memo lock").entry(key.to_string()).or_default())
    }

    /// Exponential backoff for waiting on dependencies: 5 s doubling to 5 min.
    pub(super) fn backoff(&self, key: &str) -> Action {
        let mut retries = 0;
        self.set_memo(key, |m| {
            retries = m.retries;
            m.retries = m.retries.saturating_add(1);
        });
        Action::requeue(Duration::from_secs(5u64.saturating_mul(1 << retries.min(6)).min(300)))
    }
}
