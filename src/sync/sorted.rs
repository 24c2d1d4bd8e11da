//! The listing in key order (the key's UTF-8 bytes, the catalog's order), whatever order the store
//! sent it in. No store's order is trusted: SeaweedFS, the local S3 server, lists a directory
//! tree depth first (`photos/2024/a.jpg` before `photos-old.jpg`), S3 and MinIO list by bytes, and
//! gateways in their own ways; a server may even change its order between two runs. The planner
//! pushes pages as they come; up to `segment` objects are sorted in memory, and a larger listing
//! is written to the temp dir in sorted segments and merged back (extsort), so that memory stays
//! flat whatever the bucket's size. A segment costs about 60 bytes of disk an object plus its key
//! and etag; the files go when the sort is dropped.

use std::cmp::Ordering;
use std::io::{self, Read, Write};

use extsort::{ExternalSorter, PushExternalSorter, Sortable};
use futures::{Stream, StreamExt};
use tokio::sync::mpsc;

use crate::bucket::Object;
use crate::store;

/// Objects sorted in memory before a segment is written: ~20 MB of objects with 40-byte keys.
pub const SEGMENT: usize = 100_000;

type ByKey = fn(&Object, &Object) -> Ordering;

fn by_key(a: &Object, b: &Object) -> Ordering {
    a.key.as_bytes().cmp(b.key.as_bytes())
}

/// Keys up to S3's and Azure's limits (1024 bytes, 1024 characters) and etags; anything longer in
/// a segment file is corruption, refused rather than allocated.
const MAX_FIELD: usize = 1 << 16;

/// A segment file's record: key, etag (or none), size, archived. Lengths are little-endian u32.
impl Sortable for Object {
    fn encode<W: Write>(&self, w: &mut W) -> io::Result<()> {
        let field = |w: &mut W, bytes: &[u8]| {
            w.write_all(&(bytes.len() as u32).to_le_bytes())?;
            w.write_all(bytes)
        };
        field(w, self.key.as_bytes())?;
        match &self.etag {
            Some(etag) => {
                w.write_all(&[1])?;
                field(w, etag.as_bytes())?;
            }
            None => w.write_all(&[0])?,
        }
        w.write_all(&self.size.to_le_bytes())?;
        w.write_all(&[u8::from(self.archived)])
    }

    /// `UnexpectedEof` at the first byte is the end of the segment (extsort's contract).
    fn decode<R: Read>(r: &mut R) -> io::Result<Self> {
        fn field<R: Read>(r: &mut R) -> io::Result<String> {
            let mut len = [0; 4];
            r.read_exact(&mut len)?;
            let len = u32::from_le_bytes(len) as usize;
            if len > MAX_FIELD {
                return Err(io::Error::new(io::ErrorKind::InvalidData, "a sort segment is corrupt"));
            }
            let mut bytes = vec![0; len];
            r.read_exact(&mut bytes)?;
            String::from_utf8(bytes).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
        }
        let key = field(r)?;
        let mut byte = [0; 1];
        r.read_exact(&mut byte)?;
        let etag = if byte[0] == 1 { Some(field(r)?) } else { None };
        let mut size = [0; 8];
        r.read_exact(&mut size)?;
        r.read_exact(&mut byte)?;
        Ok(Object { key, etag, size: u64::from_le_bytes(size), archived: byte[0] == 1 })
    }
}

/// Why the listing could not be put in order.
#[derive(Debug, thiserror::Error)]
pub enum SortError {
    #[error(transparent)]
    Listing(#[from] store::Error),
    #[error("sorting the listing in the temp dir ({}): {error}", std::env::temp_dir().display())]
    Disk {
        #[from]
        error: io::Error,
    },
    #[error("the sort stopped: {0}")]
    Panicked(#[from] tokio::task::JoinError),
}

/// Sorts a listing: every page of `pages`, in any order, held `segment` objects at a time.
/// Returns the objects in key order, to be read on a blocking thread (`send_pages`).
pub async fn sort(
    pages: impl Stream<Item = store::Result<Vec<Object>>>,
    segment: usize,
) -> Result<extsort::SortedIterator<Object, ByKey>, SortError> {
    let mut sorter: PushExternalSorter<Object, ByKey> =
        ExternalSorter::new().with_segment_size(segment.max(1)).pushed_by(by_key as ByKey);
    let mut pages = std::pin::pin!(pages);
    while let Some(page) = pages.next().await {
        let page = page?;
        // A push may sort and write a whole segment: off the async threads.
        sorter = tokio::task::spawn_blocking(move || sorter.push_iter(page).map(|()| sorter)).await??;
    }
    Ok(tokio::task::spawn_blocking(move || sorter.done()).await??)
}

/// Sends the sorted objects as pages of `page` (on a blocking thread: segments are read from
/// disk); stops early when the receiver is gone.
pub fn send_pages(
    sorted: impl Iterator<Item = io::Result<Object>>,
    page: usize,
    tx: &mpsc::Sender<Result<Vec<Object>, SortError>>,
) {
    let mut out = Vec::with_capacity(page);
    for object in sorted {
        match object {
            Ok(o) => out.push(o),
            Err(e) => {
                let _ = tx.blocking_send(Err(e.into()));
                return;
            }
        }
        if out.len() == page && tx.blocking_send(Ok(std::mem::replace(&mut out, Vec::with_capacity(page)))).is_err() {
            return;
        }
    }
    if !out.is_empty() {
        let _ = tx.blocking_send(Ok(out));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{Entry, PlanCounts, WorkItem, key_id};
    use crate::sync::plan::{Merge, Step};
    use rand::seq::SliceRandom;
    use rand::{SeedableRng, rngs::StdRng};

    fn obj(key: &str, etag: &str) -> Object {
        Object { key: key.into(), etag: Some(etag.into()), size: 10, archived: false }
    }

    fn entry(key: &str, etag: &str) -> Entry {
        Entry {
            id: key_id(key),
            key: key.into(),
            etag: Some(etag.into()),
            size: 10,
            indexed: true,
            retry: false,
            skipped: false,
            stale: false,
        }
    }

    /// Lists `listing` in pages of 7, sorts it with segments of `segment`, and merges it with the
    /// catalog as the planner does.
    async fn plan(listing: Vec<Object>, catalog: &[Entry], segment: usize) -> (Vec<WorkItem>, PlanCounts) {
        let pages: Vec<store::Result<Vec<Object>>> = listing.chunks(7).map(|p| Ok(p.to_vec())).collect();
        let sorted = sort(futures::stream::iter(pages), segment).await.unwrap();
        let (tx, mut rx) = mpsc::channel(4);
        let sender = tokio::task::spawn_blocking(move || send_pages(sorted, 5, &tx));
        let mut m = Merge::default();
        m.catalog(catalog.to_vec(), true).unwrap();
        let mut work = vec![];
        loop {
            match m.step() {
                Step::Listing => match rx.recv().await {
                    Some(page) => m.listing(page.unwrap()).unwrap(),
                    None => m.listing_ended(),
                },
                Step::Catalog => unreachable!("the catalog is one page"),
                Step::Work(w) => work.push(w),
                Step::Done => break,
            }
        }
        sender.await.unwrap();
        (work, m.counts())
    }

    /// Path components compared one by one: SeaweedFS's depth-first order.
    fn tree_order(a: &Object, b: &Object) -> Ordering {
        a.key.split('/').cmp(b.key.split('/'))
    }

    #[tokio::test]
    async fn any_listing_order_gives_the_same_plan() {
        // Folders beside siblings whose next byte sorts below '/': byte order and tree order differ.
        let mut keys: Vec<String> =
            ["photos/2024/a.jpg", "photos-old.jpg", "photos.jpg", "2024 trip.jpg", "2024/x.jpg", "a%2Fb.jpg"]
                .into_iter()
                .map(String::from)
                .collect();
        for sibling in [" ", "!", "#", "%", "&", "'", "+", ",", "-", "."] {
            keys.push(format!("dir{sibling}x.jpg"));
            keys.extend((0..5).map(|i| format!("dir/{i}{sibling}.jpg")));
            keys.push(format!("dir/sub{sibling}/y.jpg"));
        }
        keys.extend((0..60).map(|i| format!("cam/{:02}/IMG_{i:04}.jpg", i % 4)));
        keys.extend(["é.jpg".into(), "Z.jpg".into(), "z/é/1.jpg".into()]);
        let listing: Vec<Object> = keys.iter().map(|k| obj(k, "e")).collect();
        // A third unchanged, a third changed, the rest new; and some rows whose objects are gone.
        let mut catalog: Vec<Entry> = keys
            .iter()
            .enumerate()
            .filter(|(i, _)| i % 3 != 2)
            .map(|(i, k)| entry(k, if i % 3 == 0 { "e" } else { "old" }))
            .collect();
        catalog.extend(["photos/gone.jpg", "photos-gone.jpg", "dir/gone.jpg"].map(|k| entry(k, "e")));
        catalog.sort_by(|a, b| a.key.as_bytes().cmp(b.key.as_bytes()));

        let mut bytes = listing.clone();
        bytes.sort_by(by_key);
        let mut tree = listing.clone();
        tree.sort_by(tree_order);
        assert_ne!(bytes, tree, "the layout must tell the two orders apart");
        let mut shuffled = listing.clone();
        shuffled.shuffle(&mut StdRng::seed_from_u64(7));

        let expected = plan(bytes.clone(), &catalog, 1_000_000).await;
        let c = expected.1;
        assert_eq!((c.discovered, c.deleted), (listing.len() as u64, 3));
        assert_eq!((c.discovered, c.new, c.changed, c.unchanged), (139, 46, 46, 47));
        for (name, order) in [("bytes", bytes), ("tree", tree), ("shuffled", shuffled)] {
            // In memory, and spilled to disk in segments of 1, 10 and 33 objects.
            for segment in [1_000_000, 1, 10, 33] {
                assert_eq!(
                    plan(order.clone(), &catalog, segment).await,
                    expected,
                    "{name} order, segments of {segment}"
                );
            }
        }
    }

    #[tokio::test]
    async fn a_key_listed_twice_stops_the_plan() {
        let pages = vec![Ok(vec![obj("b.jpg", "1"), obj("a.jpg", "1")]), Ok(vec![obj("a.jpg", "1")])];
        let sorted = sort(futures::stream::iter(pages), 1).await.unwrap();
        let keys: Vec<Object> = sorted.map(Result::unwrap).collect();
        let mut m = Merge::default();
        let err = m.listing(keys).unwrap_err();
        assert!(err.to_string().contains("listed \"a.jpg\" twice"), "{err}");
    }

    #[test]
    fn segment_records_round_trip() {
        let objects = [
            Object { key: "k".repeat(1024), etag: None, size: u64::MAX, archived: true },
            Object { key: "ctl\u{1}é/".into(), etag: Some("\"abc\"".into()), size: 0, archived: false },
            Object { key: String::new(), etag: Some(String::new()), size: 3, archived: false },
        ];
        let mut buf = Vec::new();
        for o in &objects {
            o.encode(&mut buf).unwrap();
        }
        let mut r = buf.as_slice();
        for o in &objects {
            assert_eq!(&Object::decode(&mut r).unwrap(), o);
        }
        assert_eq!(Object::decode(&mut r).unwrap_err().kind(), io::ErrorKind::UnexpectedEof);
        let corrupt = u32::MAX.to_le_bytes();
        assert_eq!(Object::decode(&mut corrupt.as_slice()).unwrap_err().kind(), io::ErrorKind::InvalidData);
    }
}
