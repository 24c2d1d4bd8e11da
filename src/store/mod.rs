//! The adapters of the two stores an index writes: vectors in Milvus (`milvus`) and the catalog
//! of what was indexed in MySQL (`catalog`, which holds every SQL statement). `Index` is the one
//! way to change a collection: it owns the order of the writes. A leaf: it uses `core` only,
//! never `bucket`, `embed` or the roles above it.
pub mod catalog;
pub mod milvus;

pub use catalog::{
    Catalog, CatalogTime, Collision, Counts, Entry, Fix, Generation, KeyCursor, MAX_KEY_BYTES, PlanCounts, PlanRecord,
    PlanStatus, Progress, Record, RunProgress, State, WorkItem, WorkKind, collection_of,
};
pub use milvus::{Ensured, Hit, KeyPrefix, MilvusConfig, VectorStore};

use sha2::{Digest, Sha256};

pub use crate::core::error::{BoxError, Context, Error, Result};

/// A vector to upsert: the object's id and key, and its embedding.
#[derive(Clone, Debug)]
pub struct Vector {
    pub id: i64,
    pub key: String,
    pub embedding: Vec<f32>,
}

/// The id of an object key: the first 8 bytes of its SHA-256, as a non-negative i64. The same key
/// always maps to the same Milvus primary key, so re-indexing replaces rather than duplicates.
pub fn key_id(key: &str) -> i64 {
    let h = Sha256::digest(key.as_bytes());
    (u64::from_be_bytes(h[..8].try_into().unwrap()) >> 1) as i64
}

/// The ids (inclusive) of `shard` of `shards`: the id space [0, 2^63) cut into `shards`
/// contiguous ranges. Ids are uniform hashes, so the ranges hold even shares, and a shard is a
/// range scan on the catalog's primary key and a plain range filter in Milvus (whose `%` is wrong
/// on int64 values this large before 2.5: milvus#39640).
pub fn shard_ids(shard: u32, shards: u32) -> std::ops::RangeInclusive<i64> {
    let shards = u128::from(shards.max(1));
    let start = |s: u128| ((s << 63).div_ceil(shards)) as i64;
    let shard = u128::from(shard).min(shards - 1);
    // The next shard's start, less one; the last shard ends at i64::MAX (2^63 - 1).
    let end = ((((shard + 1) << 63).div_ceil(shards)) - 1) as i64;
    start(shard)..=end
}

/// The shard of `shards` that `id` falls in (see `shard_ids`).
pub fn shard_of_id(id: i64, shards: u32) -> u32 {
    ((id.max(0) as u128 * u128::from(shards.max(1))) >> 63) as u32
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

    #[test]
    fn shards_are_contiguous_ranges_that_cover_every_id() {
        for shards in [1, 2, 3, 7, 64, 1000] {
            assert_eq!(*shard_ids(0, shards).start(), 0);
            assert_eq!(*shard_ids(shards - 1, shards).end(), i64::MAX);
            for s in 0..shards {
                let r = shard_ids(s, shards);
                assert!(r.start() <= r.end());
                assert_eq!(shard_of_id(*r.start(), shards), s);
                assert_eq!(shard_of_id(*r.end(), shards), s);
                if s + 1 < shards {
                    assert_eq!(*r.end() + 1, *shard_ids(s + 1, shards).start(), "a gap or overlap");
                }
            }
        }
        for i in 0..2_000 {
            let id = key_id(&format!("img/{i}.jpg"));
            assert!(shard_ids(shard_of_id(id, 5), 5).contains(&id));
        }
    }
}
