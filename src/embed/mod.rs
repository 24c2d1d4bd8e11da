//! Image bytes to a vector: decoding, the reference preprocessing, and the model. A leaf: it uses
//! `core` only, never `store` or the roles above it.
//!
//! One path from bytes to vectors serves every caller: `preprocess_into` (decode + transform
//! into a tensor buffer) and `Model::embed` (a batch of tensors to L2-normalised vectors). The
//! sync runs the two on separate threads, batched; `Model::embed_image` runs them for one image.
mod budget;
mod jpeg;
mod model;
pub mod onnx;
pub mod preprocess;

pub use budget::{MemoryBudget, Reservation};
pub use model::{
    Device, GpuOptions, Model, ModelError, ModelOptions, available_cores, describe_file, describe_model, metadata,
    normalized, variant_path,
};
pub use preprocess::{DecodeError, DecodeLimits, Preprocessor, decode_cost};

use crate::core::Preprocess;

/// Why an image did not become a vector: the image (the caller's fault, recorded per object) or
/// the model (the process's fault).
#[derive(Debug, thiserror::Error)]
pub enum EmbedError {
    #[error(transparent)]
    Decode(#[from] DecodeError),
    #[error(transparent)]
    Model(#[from] ModelError),
}

/// Decodes one image and prepares it as profile `p` says into `out` (`p.tensor_len()` floats),
/// with this thread's reusable buffers.
pub fn preprocess_into(bytes: &[u8], limits: DecodeLimits, p: &Preprocess, out: &mut [f32]) -> Result<(), DecodeError> {
    Preprocessor::with_local(|pre| pre.tensor_into(bytes, limits, p, out))
}

impl Model {
    /// One image's bytes to its vector: `preprocess_into`, then the model. Blocking: call it from
    /// a blocking thread.
    pub fn embed_image(&self, bytes: &[u8], limits: DecodeLimits) -> Result<Vec<f32>, EmbedError> {
        let mut tensor = vec![0.0; self.preprocess().tensor_len()];
        preprocess_into(bytes, limits, self.preprocess(), &mut tensor)?;
        Ok(self.embed(&tensor, 1)?.remove(0))
    }
}
