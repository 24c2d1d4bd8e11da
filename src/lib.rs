//! imageindex: a bucket of images turned into a reverse-image-search service.
//!
//! Dependencies point one way, down this list (`layers.rs` checks it, and that no two files of
//! one folder use each other):
//! - `cli` parses the command line and runs a role's command.
//! - The roles: `controller` (the operator) schedules everything on Kubernetes; `serve` answers
//!   searches; `commands` are the data-plane commands (`index`, `embed`, `plan`, `cleanup`, ...).
//!   No role uses another; the controller uses no data-plane module at all (only `crd`, `core`,
//!   `contract`).
//! - `config` (the flags the data-plane commands share), `crd` (the ImageIndex resource),
//!   `telemetry` (logging), `sync` (the loop that keeps a collection in step with its bucket).
//! - `index`: one collection's writes in order (`Index`), and the generations behind an index's
//!   name, over the adapters of `store`.
//! - The leaves: `embed` turns image bytes into vectors; `store` keeps them (Milvus, the MySQL
//!   catalog); `bucket` lists and reads the images. None uses another.
//! - `core` (model identity, index kind) and `contract` (what the binary and the operator agree
//!   on: environment names, Job reports, exit codes): used by all, using nothing.
pub mod bucket;
pub mod cli;
pub mod commands;
pub mod config;
pub mod contract;
pub mod controller;
pub mod core;
pub mod crd;
pub mod embed;
pub mod index;
#[cfg(test)]
mod layers;
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
