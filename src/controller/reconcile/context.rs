//! What reconciles share: the client, the operator's settings, and a little memory per
//! ImageIndex between reconciles.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kube::Client;
use kube::runtime::controller::Action;
use kube::runtime::events::Recorder;

use super::jobs::Diff;
use crate::controller::metrics::Metrics;
use crate::store::{Catalog, Index};

/// Operator-wide settings.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Image for Jobs and search pods when an ImageIndex names none (the operator's own).
    pub default_image: String,
    /// The cluster runs Indexed Jobs (1.24+); otherwise one pod embeds all shards.
    pub jobs: crate::controller::builders::JobFeatures,
    /// Limit for each Milvus and MySQL call the controller makes.
    pub io_timeout: Duration,
    /// Limit for listing a bucket and diffing it against the catalog.
    pub list_timeout: Duration,
    /// How long a `Delete` cleanup retries before it keeps the data and lets the ImageIndex go.
    pub cleanup_timeout: Duration,
}

pub struct Context {
    pub client: Client,
    pub settings: Settings,
    pub recorder: Recorder,
    pub metrics: Arc<Metrics>,
    memo: Mutex<HashMap<String, Memo>>,
    /// One pool per MySQL (keyed by a hash of its URL), migrated when first connected: every
    /// ImageIndex on that MySQL shares it.
    catalogs: tokio::sync::Mutex<HashMap<String, Catalog>>,
}

/// An ImageIndex's backends, connected and ensured, kept between reconciles (see
/// `backends::ensure`): the Milvus channel, the catalog scoped to its collection, and when the
/// collection was last ensured in full.
pub(super) struct Connected {
    /// A hash of what they were connected for (addresses, credentials, collection, model, owner):
    /// any change connects afresh.
    pub fingerprint: String,
    pub index: Arc<Index>,
    pub ensured: Instant,
}

/// Per-ImageIndex memory between reconciles: the last bucket diff (listing is the expensive part,
/// so it runs once per resync interval, after each Job, and on spec changes) and the retry count.
#[derive(Clone, Default)]
pub(super) struct Memo {
    pub diff: Option<Diff>,
    pub retries: u32,
    pub connected: Option<Arc<Connected>>,
}

impl Context {
    pub fn new(client: Client, settings: Settings, recorder: Recorder, metrics: Arc<Metrics>) -> Self {
        Self {
            client,
            settings,
            recorder,
            metrics,
            memo: Mutex::new(HashMap::new()),
            catalogs: tokio::sync::Mutex::new(HashMap::new()),
        }
    }

    /// The catalog on `url` for `collection`: the shared pool, connected and migrated once.
    pub(super) async fn catalog(&self, url: &str, collection: &str, model: &str) -> crate::store::Result<Catalog> {
        let key = crate::store::content_hash(url.as_bytes());
        let mut catalogs = self.catalogs.lock().await;
        if let Some(c) = catalogs.get(&key) {
            return Ok(c.scoped(collection, model));
        }
        let c = Catalog::connect(url, collection, model).await?;
        catalogs.insert(key, c.clone());
        Ok(c)
    }

    /// Forgets an ImageIndex: its memo and its connections (on deletion).
    pub(super) fn forget(&self, key: &str) {
        self.memo.lock().expect("memo lock").remove(key);
    }

    pub(super) fn memo(&self, key: &str) -> Memo {
        self.memo.lock().expect("memo lock").get(key).cloned().unwrap_or_default()
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
