//! Where things live: images in a bucket (`source`), vectors in Milvus (`milvus`), and the
//! catalog of what was indexed in MySQL (`catalog`).
pub mod catalog;
pub mod milvus;
pub mod source;

pub use catalog::{Catalog, Counts, Record};
pub use milvus::{Hit, IndexKind, MilvusConfig, VectorStore};
pub use source::{Object, Source, SourceConfig};

use sha2::{Digest, Sha256};

use crate::embed::ModelId;

/// The collection ready for vectors of `model`: created or checked in Milvus, and recorded or
/// checked in the catalog (see `ModelId::check`).
pub async fn ensure_collection(
    vectors: &VectorStore,
    catalog: &Catalog,
    dim: usize,
    model: &ModelId,
    mixed_precision: bool,
) -> anyhow::Result<()> {
    vectors.ensure_collection(dim, model, mixed_precision).await?;
    catalog.claim(model, mixed_precision).await
}

/// The id of an object key: the first 8 bytes of its SHA-256, as a non-negative i64. The same key
/// always maps to the same Milvus primary key, so re-indexing replaces rather than duplicates.
pub fn key_id(key: &str) -> i64 {
    let h = Sha256::digest(key.as_bytes());
    (u64::from_be_bytes(h[..8].try_into().unwrap()) >> 1) as i64
}

/// SHA-256 of content, hex.
pub fn content_hash(bytes: &[u8]) -> String {
    let h = Sha256::digest(bytes);
    h.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_ids_are_stable_and_non_negative() {
        assert_eq!(key_id("cats/1.jpg"), key_id("cats/1.jpg"));
        assert_ne!(key_id("cats/1.jpg"), key_id("cats/2.jpg"));
        assert!((0..10_000).all(|i| key_id(&format!("k{i}")) >= 0));
    }
}
