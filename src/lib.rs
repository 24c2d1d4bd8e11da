//! imageindex: a bucket of images turned into a reverse-image-search service.
//! `embed` turns images into vectors, `store` keeps them (Milvus, MySQL catalog, the bucket),
//! `serve` answers searches, `controller` (the operator) schedules all of it on Kubernetes.
pub mod config;
pub mod controller;
pub mod crd;
pub mod embed;
pub mod serve;
pub mod store;
pub mod telemetry;

/// Picks rustls's process-wide crypto provider. Dependencies enable both `ring` and `aws-lc-rs`,
/// and clients that do not choose one themselves (kube's) refuse to guess. Call once at start.
pub fn install_crypto() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}
