//! End-to-end tests on the real local services that `hack/services.sh up` starts: Milvus 2.3.5,
//! MariaDB and SeaweedFS S3, with ONNX Runtime and the generated ResNet50. `hack/test.sh` starts
//! them and sets the environment; without it these tests fail and say so (they never skip).
//! `cargo test --lib` runs the unit tests alone, with no services.

mod bucket_behaviours;
mod consistency;
mod generations;
mod hostile;
mod layouts;
mod mock_api;
mod operator;
mod precision;
mod repair;
mod s3_proxy;
mod serve;
mod stores;
mod support;
mod sync;
mod tasks;
