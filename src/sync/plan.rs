//! What a sync has to do, from the listing and the catalog alone: pure, no I/O.

use std::collections::HashMap;

use crate::store::{Entry, Object, key_id, shard_of_id};

/// An object to embed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Work {
    pub object: Object,
    pub id: i64,
    /// It has a vector in Milvus now (a changed object): if the new content fails, that vector goes.
    pub was_indexed: bool,
}

/// What a sync has to do, from the listing and the catalog alone.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// Objects of this shard in the source.
    pub discovered: usize,
    pub new: Vec<Work>,
    pub changed: Vec<Work>,
    /// Catalog entries whose object is gone from the source.
    pub deleted: Vec<Entry>,
    pub unchanged: usize,
}

/// Deletions a run makes only when told to: a wrong listing (a typo'd prefix, a bucket policy
/// change, a listing that returns nothing) makes every row look deleted, and the vectors cost
/// GPU-hours to recompute.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DeletionGuard {
    /// Most of the catalog (0..=1) one run may delete; at least `FREE_DELETIONS` are always allowed.
    pub max_share: f64,
    /// Delete whatever the listing says is gone.
    pub allow: bool,
}

impl Default for DeletionGuard {
    fn default() -> Self {
        Self { max_share: 0.10, allow: false }
    }
}

/// Deletions allowed whatever the share, so that small collections can lose a few images; an
/// empty listing never deletes all of a catalog without `allow`.
pub const FREE_DELETIONS: usize = 10;

#[derive(Debug, PartialEq, thiserror::Error)]
#[error(
    "refusing to delete {deleted} of the {catalog} objects in the catalog{why}: the listing may be wrong \
     (a typo'd prefix, a bucket policy change). Nothing was deleted or indexed. If they are really gone, \
     run with --allow-mass-delete (spec.source.allowMassDeletion)"
)]
pub struct MassDeletion {
    pub deleted: usize,
    pub catalog: usize,
    why: String,
}

impl DeletionGuard {
    /// Whether `plan` may delete what it says is gone from a catalog of `catalog` entries.
    pub fn check(&self, plan: &Plan, catalog: usize) -> Result<(), MassDeletion> {
        let deleted = plan.deleted.len();
        let share = deleted as f64 / catalog.max(1) as f64;
        let why = if self.allow || deleted == 0 {
            return Ok(());
        } else if plan.discovered == 0 {
            ", because the listing is empty".to_string()
        } else if deleted > FREE_DELETIONS && share > self.max_share {
            format!(" ({:.1}%, more than the {:.0}% allowed)", share * 100.0, self.max_share * 100.0)
        } else {
            return Ok(());
        };
        Err(MassDeletion { deleted, catalog, why })
    }
}

/// The shard an object key belongs to: the id range its id falls in (see `store::shard_ids`).
pub fn shard_of(key: &str, shards: u32) -> u32 {
    shard_of_id(key_id(key), shards)
}

/// Diffs the listing against the catalog for one shard. `catalog` holds only that shard's entries.
pub fn plan(listing: Vec<Object>, mut catalog: HashMap<String, Entry>, shard: u32, shards: u32) -> Plan {
    let mut diff = Plan::default();
    for object in listing {
        if shard_of(&object.key, shards) != shard {
            continue;
        }
        diff.discovered += 1;
        let id = key_id(&object.key);
        match catalog.remove(&object.key) {
            None => diff.new.push(Work { object, id, was_indexed: false }),
            // Same etag and size: the bytes are the ones we saw (a failed object stays failed until
            // it changes, unless its bytes were never seen).
            Some(e) if !e.retry && e.etag == object.etag && e.size == object.size => diff.unchanged += 1,
            Some(e) => diff.changed.push(Work { object, id, was_indexed: e.indexed }),
        }
    }
    diff.deleted = catalog.into_values().collect();
    diff.deleted.sort_by(|a, b| a.key.cmp(&b.key));
    diff
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    fn obj(key: &str, etag: &str) -> Object {
        Object { key: key.into(), etag: Some(etag.into()), size: 10 }
    }

    fn entry(key: &str, etag: &str, indexed: bool) -> (String, Entry) {
        (
            key.into(),
            Entry { id: key_id(key), key: key.into(), etag: Some(etag.into()), size: 10, indexed, retry: false },
        )
    }

    #[test]
    fn plan_finds_new_changed_deleted_and_unchanged() {
        let listing = vec![obj("a.jpg", "1"), obj("b.jpg", "2"), obj("c.jpg", "3"), obj("f.jpg", "9")];
        let catalog = HashMap::from([
            entry("a.jpg", "1", true),   // unchanged
            entry("b.jpg", "old", true), // changed
            entry("d.jpg", "4", true),   // deleted
            entry("f.jpg", "9", false),  // failed before, same bytes: not retried
        ]);
        let p = plan(listing, catalog, 0, 1);
        assert_eq!(p.discovered, 4);
        assert_eq!(p.unchanged, 2);
        assert_eq!(p.new.iter().map(|w| w.object.key.as_str()).collect::<Vec<_>>(), ["c.jpg"]);
        assert_eq!(p.changed.len(), 1);
        assert!(p.changed[0].was_indexed && p.changed[0].object.key == "b.jpg");
        assert_eq!(p.deleted.iter().map(|e| e.key.as_str()).collect::<Vec<_>>(), ["d.jpg"]);
    }

    #[test]
    fn mass_deletions_are_refused_unless_allowed() {
        let catalog: HashMap<_, _> = (0..200).map(|i| entry(&format!("{i}.jpg"), "e", true)).collect();
        let listing = |n: usize| (0..n).map(|i| obj(&format!("{i}.jpg"), "e")).collect::<Vec<_>>();
        let guard = DeletionGuard::default();
        let check = |n, g: DeletionGuard| g.check(&plan(listing(n), catalog.clone(), 0, 1), 200);
        assert_eq!(check(200, guard), Ok(()));
        assert_eq!(check(180, guard), Ok(()), "10% may go");
        let refused = check(179, guard).unwrap_err();
        assert_eq!((refused.deleted, refused.catalog), (21, 200));
        assert!(refused.to_string().contains("(10.5%, more than the 10% allowed)"), "{refused}");
        let empty = check(0, guard).unwrap_err();
        assert!(empty.to_string().contains("the listing is empty"), "{empty}");
        assert_eq!(check(0, DeletionGuard { allow: true, ..guard }), Ok(()));
        assert_eq!(check(100, DeletionGuard { max_share: 0.5, ..guard }), Ok(()));
        // A few deletions from a small catalog pass; an empty listing never empties it.
        let small: HashMap<_, _> = (0..5).map(|i| entry(&format!("{i}.jpg"), "e", true)).collect();
        assert_eq!(guard.check(&plan(listing(2), small.clone(), 0, 1), 5), Ok(()));
        assert!(guard.check(&plan(vec![], small, 0, 1), 5).is_err());
    }

    #[test]
    fn objects_whose_fetch_failed_are_tried_again() {
        let (key, mut refused) = entry("a.jpg", "1", false);
        refused.retry = true;
        let p = plan(vec![obj("a.jpg", "1")], HashMap::from([(key, refused)]), 0, 1);
        assert_eq!((p.changed.len(), p.unchanged), (1, 0));
    }

    #[test]
    fn a_size_change_with_the_same_etag_is_a_change() {
        let mut o = obj("a.jpg", "1");
        o.size = 11;
        let p = plan(vec![o], HashMap::from([entry("a.jpg", "1", true)]), 0, 1);
        assert_eq!(p.changed.len(), 1);
    }

    #[test]
    fn shards_partition_the_listing() {
        let listing: Vec<Object> = (0..300).map(|i| obj(&format!("img/{i}.jpg"), "e")).collect();
        let mut seen = HashSet::new();
        let mut sizes = vec![];
        for shard in 0..3 {
            let p = plan(listing.clone(), HashMap::new(), shard, 3);
            sizes.push(p.new.len());
            for w in p.new {
                assert!(seen.insert(w.object.key), "an object in two shards");
            }
        }
        assert_eq!(seen.len(), 300);
        assert!(sizes.iter().all(|&n| n > 60), "shards very uneven: {sizes:?}");
    }

    #[test]
    fn a_shard_deletes_only_its_own_entries() {
        let catalog: HashMap<_, _> = (0..50).map(|i| entry(&format!("{i}.jpg"), "e", true)).collect();
        let mine: HashMap<_, _> = catalog.into_iter().filter(|(k, _)| shard_of(k, 2) == 1).collect();
        let p = plan(vec![], mine.clone(), 1, 2);
        assert_eq!(p.deleted.len(), mine.len());
    }
}
