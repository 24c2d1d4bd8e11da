//! The fault matrix (issue 12), on the real services: the bucket misbehaving, Milvus and MariaDB
//! killed in the middle of a sync, hostile files, a wrong listing, races. Every case ends with the
//! consistency check (every object exactly once in Milvus and the catalog, or recorded failed
//! with a reason; nothing else) and adds a row to `.state/artifacts/fault-matrix.txt`, which
//! `hack/test.sh` and `hack/fault-matrix.sh` print.
//!
//! A test binary of its own: cargo runs test binaries one after another, so killing the services
//! here never disturbs the other suites, and `matrix::SERIAL` keeps these cases from each other.

#[path = "../local_services/consistency.rs"]
mod consistency;
#[path = "../local_services/s3_proxy.rs"]
#[allow(dead_code)]
mod s3_proxy;
#[path = "../local_services/support.rs"]
#[allow(dead_code)]
mod support;

mod bucket;
mod crashes;
mod generations;
mod hostile;
mod matrix;
