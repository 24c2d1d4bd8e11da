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
