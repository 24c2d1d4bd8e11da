//! imageindex: a bucket of images turned into a reverse-image-search service.
//!
//! Dependencies point one way, down this list:
//! - `cli` parses the command line and runs a role's command.
//! - The roles: `controller` (the operator) schedules everything on Kubernetes; `serve` answers
//!   searches; `sync` keeps a collection in step with its bucket. They use the leaves and `config`.
//! - `config` (the flags the data-plane commands share), `crd` (the ImageIndex resource).
//! - The leaves: `embed` turns image bytes into vectors; `store` keeps them (Milvus, the MySQL
//!   catalog, the bucket). Neither uses the other.
//! - `core` (model identity, index kind) and `env` (variable names): used by all, using nothing.
pub mod cli;
pub mod config;
pub mod controller;
pub mod core;
pub mod crd;
pub mod embed;
pub mod env;
pub mod serve;
pub mod store;
pub mod sync;
pub mod telemetry;

/// Installs rustls's process-wide crypto provider (ring), which the HTTP clients that do not
/// bring their own (object_store's, the URL fetcher's) build on. Idempotent: `Source::open` and the
/// URL fetcher call it too, so library users need not remember it.
pub fn install_crypto() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}
