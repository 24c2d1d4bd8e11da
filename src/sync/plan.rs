//! What a sync has to do, from the listing and the catalog alone: pure, no I/O.

use std::collections::HashMap;

use crate::store::{Entry, Object, key_id};

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

/// The shard an object key belongs to: its id modulo the shard count (ids are uniform hashes).
pub fn shard_of(key: &str, shards: u32) -> u32 {
    (key_id(key) % i64::from(shards.max(1))) as u32
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
