//! Image -> vector: decoding, the reference preprocessing, and the model.
mod jpeg;
pub mod model;
pub mod preprocess;
pub mod worker;

pub use model::{Device, Model, ModelId, ModelMismatch, ModelOptions, Precision};
pub use preprocess::{DecodeError, DecodeLimits, Preprocessor, TENSOR_LEN};
