//! One plan: the bucket listed once, put in key order whatever order the store sent it in
//! (`sorted`), and merged with the catalog in key order (`plan::Merge`); what it found recorded
//! as the plan's work in the catalog, for the shards to read. The sorted listing and catalog
//! pages are read ahead on tasks of their own, and the work is written in batches on a third, so
//! the three overlap; each holds a page or two, and the sort a segment, whatever the bucket's size.

use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::plan::{DeletionGuard, MassDeletion, Merge, Step};
use super::sorted::{self, SortError};
use super::{Error, RepairWhen};
use crate::bucket::{Object, Source};
use crate::index::{Index, Repair};
use crate::store::{self, Entry, PlanRecord, WorkItem};

/// Catalog entries read at once (a few MB).
const CATALOG_PAGE: u32 = 5000;
/// Work rows written in one statement.
const WORK_BATCH: usize = 2000;
/// Pages of each side read ahead of the merge.
const AHEAD: usize = 4;
/// Sorted listing objects handed to the merge at once.
const LISTING_PAGE: usize = 1000;

/// What a plan found.
#[derive(Debug)]
pub struct Planned {
    pub record: PlanRecord,
    /// Its deletions are refused: nothing of it is to be done.
    pub refused: Option<MassDeletion>,
}

/// Makes Milvus and the catalog agree before a plan (when their counts say they do not, or
/// `when` says always), so that the plan embeds what lost its vector.
pub async fn repair(index: &Index, when: RepairWhen) -> Result<Repair, Error> {
    if when == RepairWhen::IfCountsDiffer && index.counts_agree().await? {
        return Ok(Repair::default());
    }
    Ok(index.repair(0, 1).await?)
}

/// Lists `source` once, diffs it against the catalog of `index`, and records the work.
pub async fn plan(source: &Source, index: &Index, guard: DeletionGuard) -> Result<Planned, Error> {
    let catalog = &index.catalog;
    // Before the listing: a row written from now on is newer than the listing, and never deleted.
    let listing_began = catalog.clock().await?;
    let id = catalog.start_plan(listing_began).await?;
    let mut counts = match merge(source, index, id).await {
        Ok(counts) => counts,
        Err(e) => {
            // Best effort: when the catalog is what failed, the plan stays `planning`, which no
            // shard carries out either.
            let _ = catalog.fail_plan(id).await;
            return Err(e);
        }
    };
    let refused = guard.check(&counts).err();
    if refused.is_none() && guard.holds(&counts) {
        catalog.hold_deletions(id).await?;
        (counts.held, counts.deleted) = (counts.deleted, 0);
    }
    catalog.finish_plan(id, &counts, refused.as_ref().map(ToString::to_string).as_deref()).await?;
    let record = catalog.plan(id).await?.ok_or_else(|| store::Error::Invalid(format!("plan {id} vanished")))?;
    Ok(Planned { record, refused })
}

/// The merge, fed from the two read-ahead tasks, its work handed to the writer.
async fn merge(source: &Source, index: &Index, plan: i64) -> Result<store::PlanCounts, Error> {
    let (mut listing, lister) = read_listing(source);
    let (mut entries, reader) = read_catalog(index);
    let (work_tx, writer) = write_work(index, plan);
    let mut m = Merge::default();
    let mut batch = Vec::with_capacity(WORK_BATCH);
    let merged: Result<(), Error> = async {
        loop {
            match m.step() {
                Step::Listing => match listing.recv().await {
                    Some(page) => m.listing(page.map_err(listing_error)?).map_err(out_of_order)?,
                    None => m.listing_ended(),
                },
                Step::Catalog => match entries.recv().await {
                    Some(page) => {
                        let (page, last) = page?;
                        m.catalog(page, last).map_err(|e| store::Error::Invalid(e.to_string()))?
                    }
                    None => return Err(store::Error::Invalid("the catalog read stopped".into()).into()),
                },
                Step::Work(w) => {
                    batch.push(w);
                    if batch.len() == WORK_BATCH && work_tx.send(std::mem::take(&mut batch)).await.is_err() {
                        break; // the writer stopped, and says why
                    }
                }
                Step::Done => break,
            }
        }
        if !batch.is_empty() {
            let _ = work_tx.send(batch).await;
        }
        Ok(())
    }
    .await;
    drop((listing, entries, work_tx));
    let written = writer.await?;
    lister.abort();
    reader.abort();
    merged?;
    let collided = written?;
    let mut counts = m.counts();
    // Only new keys collide: a changed or deleted one was read from its own catalog row.
    (counts.new, counts.collided) = (counts.new.saturating_sub(collided), collided);
    Ok(counts)
}

fn out_of_order(e: super::plan::OutOfOrder) -> Error {
    Error::Listing(store::Error::Invalid(e.to_string()))
}

/// The listing whole and sorted, then read back a page at a time, ahead of the merge.
fn read_listing(source: &Source) -> (mpsc::Receiver<Result<Vec<Object>, SortError>>, JoinHandle<()>) {
    let (tx, rx) = mpsc::channel(AHEAD);
    let pages = source.pages();
    let task = tokio::spawn(async move {
        match sorted::sort(pages, sorted::SEGMENT).await {
            Ok(objects) => {
                // Segments are read from disk: on a blocking thread.
                let _ = tokio::task::spawn_blocking(move || sorted::send_pages(objects, LISTING_PAGE, &tx)).await;
            }
            Err(e) => {
                let _ = tx.send(Err(e)).await;
            }
        }
    });
    (rx, task)
}

fn listing_error(e: SortError) -> Error {
    match e {
        SortError::Listing(e) => Error::Listing(e),
        e => Error::Listing(store::Error::backend("sorting the listing", e)),
    }
}

/// The catalog's entries in key order, a page at a time, read ahead; each page says whether it is
/// the last.
type CatalogPage = store::Result<(Vec<Entry>, bool)>;

fn read_catalog(index: &Index) -> (mpsc::Receiver<CatalogPage>, JoinHandle<()>) {
    let (tx, rx) = mpsc::channel(AHEAD);
    let catalog = index.catalog.clone();
    let task = tokio::spawn(async move {
        let mut cursor = store::KeyCursor::default();
        loop {
            let page = catalog.entries_page(&mut cursor, CATALOG_PAGE).await;
            let last = page.as_ref().map_or(true, |(_, last)| *last);
            if tx.send(page).await.is_err() || last {
                return;
            }
        }
    });
    (rx, task)
}

/// Writes batches of work to the catalog as they come; returns how many new keys it left out
/// because another key holds their id.
fn write_work(index: &Index, plan: i64) -> (mpsc::Sender<Vec<WorkItem>>, JoinHandle<store::Result<u64>>) {
    let (tx, mut rx) = mpsc::channel::<Vec<WorkItem>>(2);
    let catalog = index.catalog.clone();
    let task = tokio::spawn(async move {
        let mut collided = 0;
        while let Some(batch) = rx.recv().await {
            collided += catalog.add_work(plan, batch).await?;
        }
        Ok(collided)
    });
    (tx, task)
}
