//! Credentials that change under a running server. A rotated Secret reaches a pod's mounted files
//! (the kubelet rewrites them in place, within a minute or so) but never its environment, so the
//! operator gives search pods their credentials as files, and this loop reads them again. When
//! they change it connects anew and swaps the clients in; requests in flight finish on the old
//! ones. New credentials that do not work leave the old clients serving (they may well still
//! work), and the failure is logged and counted, then tried again. The API token is read and
//! applied on its own, first: a revoked token stops working at once, whatever the backends do.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};

use super::AppState;
use crate::bucket::Source;
use crate::config::{BackendArgs, SourceArgs};
use crate::core::Redacted;
use crate::index::{Generations, Index};

/// How often the files are read. The kubelet's own delay (its sync period plus its cache) is
/// longer.
pub const EVERY: Duration = Duration::from_secs(10);

/// Every credential the server holds, as read at one moment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Credentials {
    mysql_url: Redacted,
    milvus_token: Option<Redacted>,
    source: Vec<(String, Redacted)>,
    token: Option<Redacted>,
    read_token: Option<Redacted>,
}

impl Credentials {
    /// The API token (for upload, delete and drop).
    pub fn token(&self) -> Option<Redacted> {
        self.token.clone()
    }

    /// The read token (for search, count, progress and images, where they are protected).
    pub fn read_token(&self) -> Option<Redacted> {
        self.read_token.clone()
    }

    fn same_backends(&self, other: &Self) -> bool {
        (&self.mysql_url, &self.milvus_token, &self.source) == (&other.mysql_url, &other.milvus_token, &other.source)
    }
}

/// Where the server's credentials come from.
pub struct Watch {
    pub backend: BackendArgs,
    pub src: SourceArgs,
    /// The bucket, when the server has one.
    pub source_url: Option<String>,
    pub token_file: Option<PathBuf>,
    /// The token given as a flag or in the environment (when there is no file).
    pub token: Option<Redacted>,
    pub read_token_file: Option<PathBuf>,
    pub read_token: Option<Redacted>,
}

impl Watch {
    /// Whether any credential comes from a file: otherwise nothing can change.
    pub fn has_files(&self) -> bool {
        self.backend.mysql_url_file.is_some()
            || self.backend.milvus_token_file.is_some()
            || self.src.credentials_dir.is_some()
            || self.token_file.is_some()
            || self.read_token_file.is_some()
    }

    pub fn read(&self) -> Result<Credentials> {
        let (token, read_token) = self.read_tokens()?;
        Ok(Credentials { token, read_token, ..self.read_backends()? })
    }

    /// The write token and the read token.
    fn read_tokens(&self) -> Result<(Option<Redacted>, Option<Redacted>)> {
        let one = |file: &Option<PathBuf>, given: &Option<Redacted>| -> Result<Option<Redacted>> {
            Ok(match file {
                Some(f) => {
                    let text = std::fs::read_to_string(f)
                        .with_context(|| format!("reading the token file {}", f.display()))?;
                    Some(Redacted::new(text.trim()))
                }
                None => given.clone(),
            })
        };
        Ok((one(&self.token_file, &self.token)?, one(&self.read_token_file, &self.read_token)?))
    }

    /// Every credential but the API token (None here).
    fn read_backends(&self) -> Result<Credentials> {
        Ok(Credentials {
            mysql_url: self.backend.mysql_url()?,
            milvus_token: self.backend.milvus_token()?,
            source: self.src.settings()?,
            token: None,
            read_token: None,
        })
    }

    /// Connections on `creds`: the index's generations (Milvus and the catalog) and the bucket.
    pub async fn connect(&self, creds: &Credentials) -> Result<(Generations, Option<Source>)> {
        let milvus = self.backend.milvus_config(creds.milvus_token.clone());
        let gens = Generations::connect(&milvus, creds.mysql_url.expose()).await?;
        let source = match &self.source_url {
            Some(url) => Some(self.src.open_with(url.clone(), creds.source.clone())?),
            None => None,
        };
        Ok((gens, source))
    }

    /// Reads the files every `every`, and applies what changed to `state`, starting from
    /// `current`, what the server was started with.
    pub async fn run(self, state: Arc<AppState>, mut current: Credentials, every: Duration) {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await; // the first tick is now
        loop {
            tick.tick().await;
            match self.read_tokens() {
                Ok((token, read_token)) if (&token, &read_token) != (&current.token, &current.read_token) => {
                    state.token.set(token.clone());
                    state.read_token.set(read_token.clone());
                    tracing::info!("the API tokens changed: now in use");
                    state.metrics.credential_reload(true);
                    (current.token, current.read_token) = (token, read_token);
                }
                Ok(_) => {}
                Err(e) => {
                    // A file mid-update: the token in use stays (a removed file is no revocation).
                    tracing::warn!("reading the API token: {e:#}; keeping the current one");
                    state.metrics.credential_reload(false);
                }
            }
            let next = match self.read_backends() {
                Ok(c) => Credentials { token: current.token.clone(), read_token: current.read_token.clone(), ..c },
                Err(e) => {
                    // A file mid-update, or a Secret key removed: keep what works.
                    tracing::warn!("reading the credentials: {e:#}; keeping the current ones");
                    state.metrics.credential_reload(false);
                    continue;
                }
            };
            if next.same_backends(&current) {
                continue;
            }
            // No generation switch meanwhile: the new connections are for the generation served.
            let _one = state.switching.lock().await;
            match self.checked(&next, &state).await {
                Ok((index, source)) => state.replace_backends(index, source),
                Err(e) => {
                    tracing::warn!("the new credentials do not work ({e:#}); still serving with the old ones");
                    state.metrics.credential_reload(false);
                    continue;
                }
            }
            tracing::info!("credentials changed: now in use");
            state.metrics.credential_reload(true);
            current = next;
        }
    }

    /// Connections on `creds` to the generation `state` serves, each checked to answer.
    async fn checked(&self, creds: &Credentials, state: &AppState) -> Result<(Index, Option<Source>)> {
        let (gens, source) = self.connect(creds).await?;
        let serving = state.clients();
        let index = gens.index(&serving.generation, serving.model.id());
        index.vectors.ready().await?;
        index.catalog.ping().await?;
        if let Some(source) = &source {
            // A HEAD of a key that is not there: 404 with working keys, 403 without.
            source.exists(".imageindex-credentials-check").await?;
        }
        Ok((index, source))
    }
}
