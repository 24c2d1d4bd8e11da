//! What a sync has to do: the listing merged with the catalog, both in key order, a page of each
//! at a time, so that memory stays flat however large the bucket. Pure, no I/O: the planner
//! (`planner`) feeds the pages and records the work.

use std::collections::VecDeque;

use crate::bucket::Object;
use crate::store::{Entry, MAX_KEY_BYTES, PlanCounts, WorkItem, WorkKind, key_id, shard_of_id};

/// An object to embed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Work {
    pub object: Object,
    pub id: i64,
    /// It has a vector in Milvus now (a changed object): if the new content fails, that vector goes.
    pub was_indexed: bool,
}

impl Work {
    /// Everything is new to an empty catalog.
    pub fn new(object: Object) -> Self {
        Self { id: key_id(&object.key), object, was_indexed: false }
    }
}

impl From<WorkItem> for Work {
    fn from(w: WorkItem) -> Self {
        let object = Object { key: w.key, etag: w.etag, size: w.size, archived: w.archived };
        Self { object, id: w.id, was_indexed: w.indexed }
    }
}

/// What the merge needs, or found, next.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// The next page of the listing (`Merge::listing`), or its end (`Merge::listing_ended`).
    Listing,
    /// The next page of the catalog in key order (`Merge::catalog`).
    Catalog,
    /// An object to embed or to remove.
    Work(WorkItem),
    /// Both are merged: `Merge::counts` says what was found.
    Done,
}

/// A page out of key order: merging it would call objects new or deleted that are not. The
/// planner sorts the listing (`sorted`), so from the listing this is a key listed twice: a
/// page the server repeated.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub struct OutOfOrder {
    pub what: &'static str,
    pub before: String,
    pub key: String,
}

impl std::fmt::Display for OutOfOrder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let Self { what, before, key } = self;
        if before == key {
            write!(f, "the {what} listed {key:?} twice (a repeated page?); nothing was planned")
        } else {
            write!(f, "the {what} is not in key order ({before:?} came before {key:?}); nothing was planned")
        }
    }
}

/// The merge of a listing and a catalog, both in key order (UTF-8 bytes), a page at a time.
#[derive(Debug, Default)]
pub struct Merge {
    listed: VecDeque<Object>,
    entries: VecDeque<Entry>,
    listing_done: bool,
    catalog_done: bool,
    last_listed: Option<String>,
    last_entry: Option<String>,
    counts: PlanCounts,
}

impl Merge {
    /// Takes the next page of the listing. Keys longer than the catalog holds are counted
    /// (`too_long`) and left out.
    pub fn listing(&mut self, page: Vec<Object>) -> Result<(), OutOfOrder> {
        for o in &page {
            check_order("listing", &mut self.last_listed, &o.key)?;
        }
        self.counts.discovered += page.len() as u64;
        let (fits, too_long): (Vec<_>, Vec<_>) = page.into_iter().partition(|o| o.key.len() <= MAX_KEY_BYTES);
        self.counts.too_long += too_long.len() as u64;
        self.listed.extend(fits);
        Ok(())
    }

    pub fn listing_ended(&mut self) {
        self.listing_done = true;
    }

    /// Takes the next page of the catalog; `last`: there is no more after it.
    pub fn catalog(&mut self, page: Vec<Entry>, last: bool) -> Result<(), OutOfOrder> {
        for e in &page {
            check_order("catalog", &mut self.last_entry, &e.key)?;
        }
        self.counts.catalog += page.len() as u64;
        self.counts.stale += page.iter().filter(|e| e.stale).count() as u64;
        self.entries.extend(page);
        self.catalog_done |= last;
        Ok(())
    }

    /// What was found so far (all of it once `step` said `Done`).
    pub fn counts(&self) -> PlanCounts {
        self.counts
    }

    /// The next step: a page to fetch, or the next object's work.
    pub fn step(&mut self) -> Step {
        loop {
            if self.listed.is_empty() && !self.listing_done {
                return Step::Listing;
            }
            if self.entries.is_empty() && !self.catalog_done {
                return Step::Catalog;
            }
            let order = match (self.listed.front(), self.entries.front()) {
                (None, None) => return Step::Done,
                (Some(_), None) => std::cmp::Ordering::Less,
                (None, Some(_)) => std::cmp::Ordering::Greater,
                (Some(o), Some(e)) => o.key.cmp(&e.key),
            };
            let (listed, entry) = match order {
                std::cmp::Ordering::Less => (self.listed.pop_front(), None),
                std::cmp::Ordering::Greater => (None, self.entries.pop_front()),
                std::cmp::Ordering::Equal => (self.listed.pop_front(), self.entries.pop_front()),
            };
            let found = self.classify(listed, entry);
            if let Some(work) = found {
                return Step::Work(work);
            }
        }
    }

    /// One object: listed, in the catalog, or both. None when it is unchanged.
    fn classify(&mut self, listed: Option<Object>, entry: Option<Entry>) -> Option<WorkItem> {
        let c = &mut self.counts;
        let (object, kind, indexed) = match (listed, entry) {
            (Some(o), None) => (o, WorkKind::New, false),
            (None, Some(e)) => {
                c.deleted += 1;
                let object = Object { key: e.key, etag: e.etag, size: e.size, archived: false };
                // The row's own id: what is removed is what the catalog holds.
                return Some(WorkItem { id: e.id, ..WorkItem::of(object, WorkKind::Deleted, e.indexed) });
            }
            // Same etag and size: the bytes are the ones we saw (a failed object stays failed
            // until it changes, unless its bytes were never seen). A skipped archived object
            // stays skipped until it changes or leaves the archive tier.
            (Some(o), Some(e)) if !e.retry && e.etag == o.etag && e.size == o.size && (!e.skipped || o.archived) => {
                c.unchanged += 1;
                return None;
            }
            (Some(o), Some(e)) => (o, WorkKind::Changed, e.indexed),
            (None, None) => return None,
        };
        match kind {
            WorkKind::New => c.new += 1,
            _ => c.changed += 1,
        }
        Some(WorkItem::of(object, kind, indexed))
    }
}

/// Keys must rise strictly, each after the one before it.
fn check_order(what: &'static str, last: &mut Option<String>, key: &str) -> Result<(), OutOfOrder> {
    if let Some(before) = last.as_deref()
        && before >= key
    {
        return Err(OutOfOrder { what, before: before.to_string(), key: key.to_string() });
    }
    *last = Some(key.to_string());
    Ok(())
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
pub const FREE_DELETIONS: u64 = 10;

#[derive(Debug, PartialEq, thiserror::Error)]
#[error(
    "refusing to delete {deleted} of the {catalog} objects in the catalog{why}: the listing may be wrong \
     (a typo'd prefix, a bucket policy change). Nothing was deleted or indexed. If they are really gone, \
     run with --allow-mass-delete (spec.source.allowMassDeletion)"
)]
pub struct MassDeletion {
    pub deleted: u64,
    pub catalog: u64,
    why: String,
}

impl DeletionGuard {
    /// Whether a plan may delete what it says is gone.
    pub fn check(&self, plan: &PlanCounts) -> Result<(), MassDeletion> {
        let (deleted, catalog) = (plan.deleted, plan.catalog);
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

impl DeletionGuard {
    /// Whether the deletions of a plan that `check` passes are to be held back, its other work
    /// done: many of the catalog's objects could not be read when last tried (more than the free
    /// deletions, and more than the share one run may delete), so the bucket's credentials,
    /// policy or keys likely changed, and a listing made with them proves nothing gone. Once the
    /// objects are read again (the plan's work retries them), a later plan makes the deletions.
    pub fn holds(&self, plan: &PlanCounts) -> bool {
        let refusal_heavy =
            plan.stale > FREE_DELETIONS && plan.stale as f64 / plan.catalog.max(1) as f64 > self.max_share;
        !self.allow && plan.deleted > 0 && refusal_heavy
    }
}

/// The shard an object key belongs to: the id range its id falls in (see `store::shard_ids`).
pub fn shard_of(key: &str, shards: u32) -> u32 {
    shard_of_id(key_id(key), shards)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    fn obj(key: &str, etag: &str) -> Object {
        Object { key: key.into(), etag: Some(etag.into()), size: 10, archived: false }
    }

    fn entry(key: &str, etag: &str, indexed: bool) -> Entry {
        Entry {
            id: key_id(key),
            key: key.into(),
            etag: Some(etag.into()),
            size: 10,
            indexed,
            retry: false,
            skipped: false,
            stale: false,
        }
    }

    /// Runs the merge as the planner does, `page` objects and entries a page; returns the work
    /// by kind and the counts.
    fn merge(mut listing: Vec<Object>, mut catalog: Vec<Entry>, page: usize) -> (Vec<WorkItem>, PlanCounts) {
        listing.sort_by(|a, b| a.key.cmp(&b.key));
        catalog.sort_by(|a, b| a.key.cmp(&b.key));
        let (mut listing, mut work, mut m) = (listing.chunks(page).map(<[_]>::to_vec), vec![], Merge::default());
        loop {
            match m.step() {
                Step::Listing => match listing.next() {
                    Some(p) => m.listing(p).unwrap(),
                    None => m.listing_ended(),
                },
                Step::Catalog => {
                    let p: Vec<Entry> = catalog.drain(..page.min(catalog.len())).collect();
                    m.catalog(p, catalog.is_empty()).unwrap();
                }
                Step::Work(w) => work.push(w),
                Step::Done => return (work, m.counts()),
            }
        }
    }

    fn keys(work: &[WorkItem], kind: WorkKind) -> Vec<&str> {
        work.iter().filter(|w| w.kind == kind).map(|w| w.key.as_str()).collect()
    }

    #[test]
    fn the_merge_finds_new_changed_deleted_and_unchanged() {
        let listing = vec![obj("a.jpg", "1"), obj("b.jpg", "2"), obj("c.jpg", "3"), obj("f.jpg", "9")];
        let catalog = vec![
            entry("a.jpg", "1", true),   // unchanged
            entry("b.jpg", "old", true), // changed
            entry("d.jpg", "4", true),   // deleted
            entry("f.jpg", "9", false),  // failed before, same bytes: not retried
        ];
        for page in [1, 2, 3, 1000] {
            let (work, c) = merge(listing.clone(), catalog.clone(), page);
            assert_eq!((c.discovered, c.catalog, c.unchanged, c.pending()), (4, 4, 2, 3), "page {page}");
            assert_eq!(keys(&work, WorkKind::New), ["c.jpg"]);
            assert_eq!(keys(&work, WorkKind::Changed), ["b.jpg"]);
            assert_eq!(keys(&work, WorkKind::Deleted), ["d.jpg"]);
            let changed = work.iter().find(|w| w.kind == WorkKind::Changed).unwrap();
            assert!(changed.indexed && changed.etag.as_deref() == Some("2"), "the listed etag is the one recorded");
        }
    }

    #[test]
    fn pages_of_any_size_give_one_answer() {
        // Keys that sort differently as bytes and as characters would betray a wrong order:
        // "a/b" > "a.jpg" > "a" in bytes, and "é" (0xC3) above every ASCII key.
        let names = ["a", "a.jpg", "a/b", "a//b.jpg", "\u{7f}x", "é.jpg", "z.jpg", "Z.jpg", "0.png"];
        let mut listing: Vec<Object> = names.iter().map(|k| obj(k, "e")).collect();
        listing.extend((0..200).map(|i| obj(&format!("img/{i:03}.jpg"), "e")));
        let catalog: Vec<Entry> =
            listing.iter().enumerate().filter(|(i, _)| i % 3 != 0).map(|(_, o)| entry(&o.key, "e", true)).collect();
        let gone: Vec<Entry> = (0..50).map(|i| entry(&format!("img/{i:03}x.jpg"), "e", true)).collect();
        let catalog: Vec<Entry> = catalog.into_iter().chain(gone).collect();
        let (whole, counts) = merge(listing.clone(), catalog.clone(), 100_000);
        assert_eq!((counts.new, counts.deleted, counts.unchanged), (70, 50, 139));
        for page in [1, 2, 7, 1000] {
            assert_eq!(merge(listing.clone(), catalog.clone(), page), (whole.clone(), counts), "page {page}");
        }
    }

    #[test]
    fn a_listing_out_of_key_order_is_refused() {
        let mut m = Merge::default();
        assert_eq!(m.step(), Step::Listing);
        m.listing(vec![obj("b.jpg", "1")]).unwrap();
        let err = m.listing(vec![obj("a.jpg", "1")]).unwrap_err();
        assert_eq!((err.before.as_str(), err.key.as_str()), ("b.jpg", "a.jpg"));
        assert!(m.listing(vec![obj("c.jpg", "1"), obj("c.jpg", "1")]).is_err(), "a key listed twice");
        let mut m = Merge::default();
        assert!(m.catalog(vec![entry("b", "1", true), entry("a", "1", true)], true).is_err());
    }

    #[test]
    fn mass_deletions_are_refused_unless_allowed() {
        let catalog: Vec<Entry> = (0..200).map(|i| entry(&format!("{i}.jpg"), "e", true)).collect();
        let listing = |n: usize| (0..n).map(|i| obj(&format!("{i}.jpg"), "e")).collect::<Vec<_>>();
        let guard = DeletionGuard::default();
        let check = |n, g: DeletionGuard| g.check(&merge(listing(n), catalog.clone(), 64).1);
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
        let small: Vec<Entry> = catalog[..5].to_vec();
        assert_eq!(guard.check(&merge(listing(2), small.clone(), 64).1), Ok(()));
        assert!(guard.check(&merge(vec![], small, 64).1).is_err());
    }

    #[test]
    fn deletions_are_held_while_many_objects_cannot_be_read() {
        // 200 indexed, of which `stale` could not be read last time; the listing lacks 5.
        let catalog = |stale: usize| -> Vec<Entry> {
            (0..200)
                .map(|i| Entry { stale: i < stale, retry: i < stale, ..entry(&format!("{i:03}.jpg"), "e", true) })
                .collect()
        };
        let listing: Vec<Object> = (5..200).map(|i| obj(&format!("{i:03}.jpg"), "e")).collect();
        let guard = DeletionGuard::default();
        let holds = |stale, g: DeletionGuard| {
            let (_, counts) = merge(listing.clone(), catalog(stale), 64);
            assert_eq!((counts.stale, counts.deleted), (stale as u64, 5));
            assert_eq!(g.check(&counts), Ok(()), "5 deletions of 200 pass the share");
            g.holds(&counts)
        };
        assert!(!holds(0, guard));
        assert!(!holds(20, guard), "a tenth that cannot be read is not yet a pattern");
        assert!(holds(21, guard));
        assert!(holds(120, guard));
        assert!(!holds(120, DeletionGuard { allow: true, ..guard }));
        let nothing_gone = merge(listing[..].to_vec(), catalog(120)[5..].to_vec(), 64).1;
        assert!(!guard.holds(&nothing_gone), "nothing to hold");
    }

    #[test]
    fn keys_longer_than_the_catalog_holds_are_counted_and_left_out() {
        // Azure's longest name: 1024 characters of 4 bytes each.
        let longest = "\u{1F600}".repeat(1024);
        let longer = format!("{longest}x");
        let listing = vec![obj(&longest, "e"), obj(&longer, "e"), obj("a.jpg", "e")];
        let (work, c) = merge(listing, vec![], 10);
        assert_eq!((c.discovered, c.new, c.too_long), (3, 2, 1));
        assert_eq!(keys(&work, WorkKind::New), vec!["a.jpg", longest.as_str()]);
    }

    #[test]
    fn objects_whose_fetch_failed_are_tried_again() {
        let mut refused = entry("a.jpg", "1", false);
        refused.retry = true;
        let (work, c) = merge(vec![obj("a.jpg", "1")], vec![refused], 10);
        assert_eq!((keys(&work, WorkKind::Changed), c.unchanged), (vec!["a.jpg"], 0));
    }

    #[test]
    fn a_skipped_archived_object_waits_until_it_leaves_the_archive() {
        let archived = |a| Object { archived: a, ..obj("a.jpg", "1") };
        let skipped = Entry { indexed: false, skipped: true, ..entry("a.jpg", "1", false) };
        let (work, c) = merge(vec![archived(true)], vec![skipped.clone()], 10);
        assert_eq!((work.len(), c.unchanged), (0, 1), "still archived: not fetched again");
        let (work, _) = merge(vec![archived(false)], vec![skipped], 10);
        assert_eq!(keys(&work, WorkKind::Changed), ["a.jpg"], "restored: fetched");
        // An indexed object moved to an archive tier keeps its vector: its bytes are the same.
        let (work, c) = merge(vec![archived(true)], vec![entry("a.jpg", "1", true)], 10);
        assert_eq!((work.len(), c.unchanged), (0, 1));
        let (work, _) = merge(vec![archived(true)], vec![], 10);
        assert!(work[0].archived && work[0].kind == WorkKind::New, "new and archived: recorded, not fetched");
    }

    #[test]
    fn a_size_change_with_the_same_etag_is_a_change() {
        let mut o = obj("a.jpg", "1");
        o.size = 11;
        let (work, _) = merge(vec![o], vec![entry("a.jpg", "1", true)], 10);
        assert_eq!(keys(&work, WorkKind::Changed), ["a.jpg"]);
    }

    #[test]
    fn shards_partition_the_keys() {
        let mut seen = HashSet::new();
        let mut sizes = vec![0; 3];
        for i in 0..300 {
            let key = format!("img/{i}.jpg");
            sizes[shard_of(&key, 3) as usize] += 1;
            assert!(seen.insert(key));
        }
        assert!(sizes.iter().all(|&n| n > 60), "shards very uneven: {sizes:?}");
    }
}
