//! The one error of the backends (the bucket, Milvus, the MySQL catalog), told apart by what
//! went wrong so that callers need not guess from a message. Here, below both `bucket` and
//! `store`, because a caller's one `?` passes either's on; each adapter adds its client's `From`.

use super::{ModelMismatch, without_secrets};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// What went wrong in a store, told apart so that callers need not guess from a message.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The object is not in the bucket (deleted since it was listed, or never there).
    #[error("{0} not found")]
    NotFound(String),
    /// The collection holds vectors of another model or precision.
    #[error(transparent)]
    ModelMismatch(#[from] ModelMismatch),
    /// The collection has another index type than the one asked for.
    #[error("{0}")]
    IndexMismatch(String),
    /// What was asked cannot work as given: a bad URL, glob or key, or a collection that
    /// imageindex did not make.
    #[error("{0}")]
    Invalid(String),
    /// The object is larger than the limit (found when fetched, before its bytes are read).
    #[error("{0}")]
    TooLarge(String),
    /// The bucket answered but refused this object (access denied, a customer key it needs, a
    /// key it cannot address): about the object, not a bucket that is down.
    #[error("the bucket refused it: {0}")]
    Refused(String),
    /// The object is in an archive tier (S3's 403 InvalidObjectState, Azure's 409 BlobArchived):
    /// readable only once restored.
    #[error("the object is archived: {0}")]
    Archived(String),
    /// Another index owns the collection (their names collide): the message names it.
    #[error("{0}")]
    Claimed(String),
    /// Milvus, MySQL or the bucket failed at `what`; worth a retry.
    #[error("{what}: {error}")]
    Backend { what: String, error: BoxError },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// The error's text (and its sources') loses the query strings and passwords of the URLs in
    /// it (see `core::without_secrets`): a store's error ends up in status, events and logs.
    pub fn backend(what: impl Into<String>, error: impl Into<BoxError>) -> Self {
        let error: BoxError = error.into();
        Self::Backend { what: without_secrets(&what.into()), error: Box::new(Scrubbed::of(&*error)) }
    }
}

/// An error's text and its sources', without secrets.
#[derive(Debug)]
struct Scrubbed {
    text: String,
    source: Option<Box<Scrubbed>>,
}

impl Scrubbed {
    fn of(e: &(dyn std::error::Error + 'static)) -> Self {
        Self { text: without_secrets(&e.to_string()), source: e.source().map(|s| Box::new(Self::of(s))) }
    }
}

impl std::fmt::Display for Scrubbed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

impl std::error::Error for Scrubbed {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source.as_deref().map(|s| s as _)
    }
}

/// Says which backend call failed, keeping the cause.
pub trait Context<T> {
    fn ctx(self, what: impl Into<String>) -> Result<T>;
}

impl<T, E: Into<BoxError>> Context<T> for std::result::Result<T, E> {
    fn ctx(self, what: impl Into<String>) -> Result<T> {
        self.map_err(|e| Error::backend(what, e))
    }
}
