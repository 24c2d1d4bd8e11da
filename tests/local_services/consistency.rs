//! The check every fault case ends with: every object in the bucket exactly once in Milvus and
//! once in the catalog, or recorded failed with a reason; no vector without an indexed row.

use std::collections::{HashMap, HashSet};

use imageindex::index::Index;

use super::support::Fixture;

/// How a case ended, against what the bucket holds.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Consistency {
    /// Objects in the bucket (an include glob matches them) plus the keys the listing was told of.
    pub expected: usize,
    /// Indexed in the catalog, with their vector in Milvus.
    pub indexed: usize,
    /// Recorded failed, each with a reason.
    pub failed: usize,
    /// Expected but neither indexed nor recorded, or indexed without its vector.
    pub lost: usize,
    /// Vectors beyond the first of one id.
    pub duplicated: usize,
    /// Vectors without an indexed catalog row.
    pub orphans: usize,
}

/// Checks a collection against the bucket (`injected`: keys the listing was told of besides).
pub async fn consistency(fx: &Fixture, index: &Index, injected: &[String]) -> Consistency {
    let listed = fx.source.list().await.unwrap();
    let mut expected: HashSet<String> = listed.into_iter().map(|o| o.key).collect();
    expected.extend(injected.iter().cloned());
    let entries = index.catalog.entries(0, 1).await.unwrap();
    let failures: HashMap<String, String> =
        index.catalog.failures(100_000).await.unwrap().into_iter().map(|f| (f.key, f.error)).collect();
    let rows: HashSet<i64> = entries.values().filter(|e| e.indexed).map(|e| e.id).collect();
    let ids = index.vectors.ids(0, 1).await.unwrap();
    let vectors: HashSet<i64> = ids.iter().copied().collect();
    let count = index.vectors.count().await.unwrap() as usize;
    let mut c = Consistency {
        expected: expected.len(),
        indexed: rows.intersection(&vectors).count(),
        duplicated: count.max(ids.len()) - vectors.len(),
        orphans: vectors.difference(&rows).count(),
        ..Default::default()
    };
    for key in &expected {
        match entries.get(key) {
            Some(e) if e.indexed => {}
            Some(_) if failures.get(key).is_some_and(|r| !r.is_empty()) => c.failed += 1,
            _ => c.lost += 1,
        }
    }
    c.lost += rows.difference(&vectors).count();
    c
}
