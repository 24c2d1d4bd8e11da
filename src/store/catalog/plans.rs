//! Plans and their work in the catalog: one listing of the bucket diffed against the catalog
//! (`plans`), and what it found to do, one row per object (`work`). The embedding shards read
//! the work of their id range instead of listing the bucket.

use std::collections::HashMap;
use std::ops::RangeInclusive;

use sqlx::{QueryBuilder, Row};

use super::{Catalog, CatalogTime, Context, Error, Result, key_from_row, push_ids};

/// What a plan found an object needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WorkKind {
    New,
    Changed,
    /// In the catalog, not in the listing.
    Deleted,
}

impl WorkKind {
    fn as_str(self) -> &'static str {
        match self {
            WorkKind::New => "new",
            WorkKind::Changed => "changed",
            WorkKind::Deleted => "deleted",
        }
    }

    fn parse(s: &str) -> Result<Self> {
        match s {
            "new" => Ok(WorkKind::New),
            "changed" => Ok(WorkKind::Changed),
            "deleted" => Ok(WorkKind::Deleted),
            other => Err(Error::Invalid(format!("unknown work kind {other:?} in the catalog"))),
        }
    }
}

/// One object a plan found work for: as listed (new, changed) or as the catalog had it (deleted).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkItem {
    pub id: i64,
    pub key: String,
    pub etag: Option<String>,
    pub size: u64,
    pub kind: WorkKind,
    /// The object has a vector now.
    pub indexed: bool,
    /// Listed in an archive storage class: recorded as skipped, not fetched.
    pub archived: bool,
}

impl WorkItem {
    pub fn of(object: crate::core::Object, kind: WorkKind, indexed: bool) -> Self {
        let id = crate::store::key_id(&object.key);
        let archived = object.archived;
        Self { id, key: object.key, etag: object.etag, size: object.size, kind, indexed, archived }
    }
}

/// What a plan found, over the whole bucket.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct PlanCounts {
    /// Objects listed.
    pub discovered: u64,
    /// Catalog entries read.
    pub catalog: u64,
    pub new: u64,
    pub changed: u64,
    pub deleted: u64,
    pub unchanged: u64,
    /// Catalog entries whose newer version could not be read when last tried (the bucket
    /// refused or kept failing the GET): a listing made with the same access may be wrong too.
    pub stale: u64,
    /// Deletions the listing implies that are held back, not in the work (`DeletionGuard::holds`).
    pub held: u64,
    /// Objects listed whose key is longer than the catalog holds (`MAX_KEY_BYTES`; no supported
    /// store makes one): counted, never planned.
    pub too_long: u64,
    /// Objects listed as new whose id another key holds (`Collision`): left out, not in `new`.
    pub collided: u64,
}

/// A key whose 63-bit id another key holds (`key_id`; about once in 10^19 pairs, 0.05% of
/// buckets of 100 M objects). They would share a catalog row and a Milvus primary key and
/// overwrite each other on every run, so the plan leaves the later key out and records it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Collision {
    pub key: String,
    pub id: i64,
    /// The key that holds the id: in the catalog, or earlier in the same plan.
    pub held_by: String,
}

impl std::fmt::Display for Collision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "its id {} is held by {:?} (a 63-bit hash collision): left out until one of the two is renamed or deleted",
            self.id, self.held_by
        )
    }
}

impl PlanCounts {
    /// Objects with work to do.
    pub fn pending(&self) -> u64 {
        self.new + self.changed + self.deleted
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PlanStatus {
    /// Still listing; its work is incomplete.
    Planning,
    /// Complete: its work is to be done.
    Ready,
    /// Complete, but its deletions are refused (the deletion guard): nothing of it is done.
    Refused,
    /// Stopped before it was complete.
    Failed,
}

impl PlanStatus {
    fn as_str(self) -> &'static str {
        match self {
            PlanStatus::Planning => "planning",
            PlanStatus::Ready => "ready",
            PlanStatus::Refused => "refused",
            PlanStatus::Failed => "failed",
        }
    }

    fn parse(s: &str) -> Result<Self> {
        [PlanStatus::Planning, PlanStatus::Ready, PlanStatus::Refused, PlanStatus::Failed]
            .into_iter()
            .find(|p| p.as_str() == s)
            .ok_or_else(|| Error::Invalid(format!("unknown plan status {s:?} in the catalog")))
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlanRecord {
    pub id: i64,
    pub status: PlanStatus,
    /// Rows written at or after it are newer than the listing: never deleted on its word.
    pub listing_began: CatalogTime,
    pub counts: PlanCounts,
    /// Why its deletions are refused, when they are.
    pub refused: Option<String>,
}

/// Plans kept in the catalog: the newest is the one that counts, the others are history.
const PLANS_KEPT: usize = 10;
/// Rows one statement deletes, so that no transaction holds millions of row locks.
const DELETE_CHUNK: u32 = 10_000;

/// A static SELECT of a plan's columns, with the given WHERE clause.
macro_rules! select_plan {
    ($filter:literal) => {
        concat!(
            "SELECT id, status, listing_began, discovered, catalog, new, changed, deleted, unchanged, stale, held, too_long, collided, refused ",
            "FROM plans WHERE ",
            $filter
        )
    };
}

/// A static SELECT of a plan's work, deletions or not.
macro_rules! select_work {
    ($kind:literal) => {
        concat!(
            "SELECT id, object_key, etag, size, kind, indexed, archived FROM work ",
            "WHERE plan = ? AND id BETWEEN ? AND ? AND ",
            $kind,
            " ORDER BY id LIMIT ?"
        )
    };
}

fn plan_from_row(r: &sqlx::mysql::MySqlRow) -> Result<PlanRecord> {
    let get = |c: &str| r.try_get::<i64, _>(c).map(|v| v as u64);
    Ok(PlanRecord {
        id: r.try_get("id")?,
        status: PlanStatus::parse(&r.try_get::<String, _>("status")?)?,
        listing_began: CatalogTime(r.try_get("listing_began")?),
        counts: PlanCounts {
            discovered: get("discovered")?,
            catalog: get("catalog")?,
            new: get("new")?,
            changed: get("changed")?,
            deleted: get("deleted")?,
            unchanged: get("unchanged")?,
            stale: get("stale")?,
            held: get("held")?,
            too_long: get("too_long")?,
            collided: get("collided")?,
        },
        refused: r.try_get("refused")?,
    })
}

impl Catalog {
    /// Starts a plan whose listing began at `listing_began`, and forgets the work of this
    /// collection's earlier plans: what they left undone, this one finds again.
    pub async fn start_plan(&self, listing_began: CatalogTime) -> Result<i64> {
        let res = sqlx::query("INSERT INTO plans (collection, status, listing_began) VALUES (?, 'planning', ?)")
            .bind(&self.collection)
            .bind(listing_began.0)
            .execute(&self.pool)
            .await
            .ctx("starting a plan")?;
        let plan = res.last_insert_id() as i64;
        self.forget_plans_before(plan).await?;
        Ok(plan)
    }

    /// Records work, leaving out and recording the new keys whose id another key holds (in the
    /// catalog, or earlier in this plan); returns how many.
    pub async fn add_work(&self, plan: i64, items: Vec<WorkItem>) -> Result<u64> {
        let (items, mut collided) = self.without_collisions(items).await?;
        match self.insert_work(plan, &items).await {
            // Two new keys of one id in different batches of this plan: the first holds it.
            Err(e) if e.as_database_error().is_some_and(|d| d.is_unique_violation()) => {
                let ids: Vec<i64> = items.iter().map(|w| w.id).collect();
                let held = self.work_keys(plan, &ids).await?;
                let (fresh, later): (Vec<_>, Vec<_>) = items.into_iter().partition(|w| !held.contains_key(&w.id));
                collided.extend(later.into_iter().map(|w| Collision {
                    held_by: held[&w.id].clone(),
                    key: w.key,
                    id: w.id,
                }));
                self.insert_work(plan, &fresh).await.ctx("recording a plan's work")?;
            }
            done => done.ctx("recording a plan's work")?,
        }
        self.record_collisions(plan, &collided).await?;
        Ok(collided.len() as u64)
    }

    /// Splits off the new keys whose id is held by another key of the catalog or of `items`.
    /// A changed or deleted item was read from the catalog by its key: its row is its own.
    async fn without_collisions(&self, items: Vec<WorkItem>) -> Result<(Vec<WorkItem>, Vec<Collision>)> {
        let new_ids: Vec<i64> = items.iter().filter(|w| w.kind == WorkKind::New).map(|w| w.id).collect();
        let mut held = self.keys_of(&new_ids).await?;
        let (mut kept, mut collided) = (Vec::with_capacity(items.len()), Vec::new());
        for w in items {
            match held.get(&w.id) {
                Some(holder) if w.kind == WorkKind::New && *holder != w.key => {
                    collided.push(Collision { held_by: holder.clone(), key: w.key, id: w.id })
                }
                _ => {
                    held.insert(w.id, w.key.clone());
                    kept.push(w);
                }
            }
        }
        Ok((kept, collided))
    }

    /// One statement.
    async fn insert_work(&self, plan: i64, items: &[WorkItem]) -> sqlx::Result<()> {
        if items.is_empty() {
            return Ok(());
        }
        let mut qb = QueryBuilder::new("INSERT INTO work (plan, id, object_key, etag, size, kind, indexed, archived) ");
        qb.push_values(items, |mut b, w| {
            b.push_bind(plan)
                .push_bind(w.id)
                .push_bind(w.key.as_bytes())
                .push_bind(&w.etag)
                .push_bind(w.size as i64)
                .push_bind(w.kind.as_str())
                .push_bind(w.indexed)
                .push_bind(w.archived);
        });
        qb.build().execute(&self.pool).await.map(drop)
    }

    /// The keys of a plan's work items with these ids.
    async fn work_keys(&self, plan: i64, ids: &[i64]) -> Result<HashMap<i64, String>> {
        let mut qb = QueryBuilder::new("SELECT id, object_key FROM work WHERE plan = ");
        qb.push_bind(plan).push(" AND id IN ");
        push_ids(&mut qb, ids);
        let rows = qb.build().fetch_all(&self.pool).await.ctx("reading a plan's work")?;
        rows.iter().map(|r| Ok((r.try_get("id")?, key_from_row(r, "object_key")?))).collect()
    }

    async fn record_collisions(&self, plan: i64, collided: &[Collision]) -> Result<()> {
        if collided.is_empty() {
            return Ok(());
        }
        let mut qb = QueryBuilder::new("INSERT INTO key_collisions (plan, id, object_key, held_by) ");
        qb.push_values(collided, |mut b, c| {
            b.push_bind(plan).push_bind(c.id).push_bind(c.key.as_bytes()).push_bind(c.held_by.as_bytes());
        });
        qb.build().execute(&self.pool).await.ctx("recording key collisions")?;
        Ok(())
    }

    /// Up to `limit` of the keys a plan left out because another key holds their id, in key order.
    pub async fn collisions(&self, plan: i64, limit: u32) -> Result<Vec<Collision>> {
        let rows = sqlx::query(
            "SELECT id, object_key, held_by FROM key_collisions WHERE plan = ? ORDER BY object_key LIMIT ?",
        )
        .bind(plan)
        .bind(limit)
        .fetch_all(&self.pool)
        .await
        .ctx("reading key collisions")?;
        rows.iter()
            .map(|r| {
                Ok(Collision {
                    id: r.try_get("id")?,
                    key: key_from_row(r, "object_key")?,
                    held_by: key_from_row(r, "held_by")?,
                })
            })
            .collect()
    }

    /// Completes a plan: ready, or refused (and its work forgotten) when `refused` says why.
    pub async fn finish_plan(&self, plan: i64, c: &PlanCounts, refused: Option<&str>) -> Result<()> {
        sqlx::query(
            "UPDATE plans SET status = ?, discovered = ?, catalog = ?, new = ?, changed = ?, deleted = ?, \
             unchanged = ?, stale = ?, held = ?, too_long = ?, collided = ?, refused = ?, finished_at = CURRENT_TIMESTAMP(3) WHERE id = ?",
        )
        .bind(if refused.is_some() { PlanStatus::Refused } else { PlanStatus::Ready }.as_str())
        .bind(c.discovered as i64)
        .bind(c.catalog as i64)
        .bind(c.new as i64)
        .bind(c.changed as i64)
        .bind(c.deleted as i64)
        .bind(c.unchanged as i64)
        .bind(c.stale as i64)
        .bind(c.held as i64)
        .bind(c.too_long as i64)
        .bind(c.collided as i64)
        .bind(refused)
        .bind(plan)
        .execute(&self.pool)
        .await
        .ctx("completing a plan")?;
        if refused.is_some() {
            self.delete_work(plan).await?;
        }
        Ok(())
    }

    /// Takes a plan's deletions out of its work, before it is complete (see `DeletionGuard::holds`).
    pub async fn hold_deletions(&self, plan: i64) -> Result<()> {
        self.delete_in_chunks(
            "DELETE FROM work WHERE plan = ? AND kind = 'deleted' LIMIT ?",
            plan,
            "holding a plan's deletions back",
        )
        .await
    }

    /// A plan that stopped before it was complete: its work is forgotten, never done.
    pub async fn fail_plan(&self, plan: i64) -> Result<()> {
        sqlx::query("UPDATE plans SET status = 'failed', finished_at = CURRENT_TIMESTAMP(3) WHERE id = ?")
            .bind(plan)
            .execute(&self.pool)
            .await
            .ctx("recording a failed plan")?;
        self.delete_work(plan).await
    }

    /// A plan of this collection.
    pub async fn plan(&self, id: i64) -> Result<Option<PlanRecord>> {
        let row = sqlx::query(select_plan!("collection = ? AND id = ?"))
            .bind(&self.collection)
            .bind(id)
            .fetch_optional(&self.pool)
            .await
            .ctx("reading a plan")?;
        row.as_ref().map(plan_from_row).transpose()
    }

    /// The newest complete plan (ready or refused) of this collection.
    pub async fn latest_plan(&self) -> Result<Option<PlanRecord>> {
        let row =
            sqlx::query(select_plan!("collection = ? AND status IN ('ready', 'refused') ORDER BY id DESC LIMIT 1"))
                .bind(&self.collection)
                .fetch_optional(&self.pool)
                .await
                .ctx("reading the latest plan")?;
        row.as_ref().map(plan_from_row).transpose()
    }

    /// Up to `limit` of a plan's work items with ids in `ids` and above `after`, in id order:
    /// the deletions, or the objects to embed.
    pub async fn work(
        &self,
        plan: i64,
        ids: &RangeInclusive<i64>,
        after: Option<i64>,
        deletions: bool,
        limit: u32,
    ) -> Result<Vec<WorkItem>> {
        let from = after.map_or(*ids.start(), |a| (a + 1).max(*ids.start()));
        let sql = if deletions { select_work!("kind = 'deleted'") } else { select_work!("kind <> 'deleted'") };
        let rows = sqlx::query(sql)
            .bind(plan)
            .bind(from)
            .bind(ids.end())
            .bind(limit)
            .fetch_all(&self.pool)
            .await
            .ctx("reading a plan's work")?;
        rows.iter()
            .map(|r| {
                Ok(WorkItem {
                    id: r.try_get("id")?,
                    key: key_from_row(r, "object_key")?,
                    etag: r.try_get("etag")?,
                    size: r.try_get::<i64, _>("size")? as u64,
                    kind: WorkKind::parse(&r.try_get::<String, _>("kind")?)?,
                    indexed: r.try_get("indexed")?,
                    archived: r.try_get("archived")?,
                })
            })
            .collect()
    }

    /// How much of a plan's work is left in `ids`: new, changed and deleted set.
    pub async fn work_left(&self, plan: i64, ids: &RangeInclusive<i64>) -> Result<PlanCounts> {
        let rows =
            sqlx::query("SELECT kind, COUNT(*) AS n FROM work WHERE plan = ? AND id BETWEEN ? AND ? GROUP BY kind")
                .bind(plan)
                .bind(ids.start())
                .bind(ids.end())
                .fetch_all(&self.pool)
                .await
                .ctx("counting a plan's work")?;
        let mut c = PlanCounts::default();
        for r in rows {
            let n = r.try_get::<i64, _>("n")? as u64;
            match WorkKind::parse(&r.try_get::<String, _>("kind")?)? {
                WorkKind::New => c.new = n,
                WorkKind::Changed => c.changed = n,
                WorkKind::Deleted => c.deleted = n,
            }
        }
        Ok(c)
    }

    /// Marks work done: a retried shard does not do it again.
    pub async fn work_done(&self, plan: i64, ids: &[i64]) -> Result<()> {
        for chunk in ids.chunks(1000) {
            let mut qb = QueryBuilder::new("DELETE FROM work WHERE plan = ");
            qb.push_bind(plan).push(" AND id IN ");
            push_ids(&mut qb, chunk);
            qb.build().execute(&self.pool).await.ctx("marking a plan's work done")?;
        }
        Ok(())
    }

    /// Forgets the work of this collection's plans before `plan`, and the rows of all but the
    /// newest `PLANS_KEPT` of them.
    async fn forget_plans_before(&self, plan: i64) -> Result<()> {
        let older: Vec<i64> = sqlx::query_scalar("SELECT id FROM plans WHERE collection = ? AND id < ? ORDER BY id")
            .bind(&self.collection)
            .bind(plan)
            .fetch_all(&self.pool)
            .await
            .ctx("reading earlier plans")?;
        for id in &older {
            self.delete_work(*id).await?;
        }
        if let Some(last_forgotten) = older.len().checked_sub(PLANS_KEPT).map(|i| older[i]) {
            for sql in [
                "DELETE k FROM key_collisions k JOIN plans p ON k.plan = p.id WHERE p.collection = ? AND p.id <= ?",
                "DELETE FROM plans WHERE collection = ? AND id <= ?",
            ] {
                sqlx::query(sql)
                    .bind(&self.collection)
                    .bind(last_forgotten)
                    .execute(&self.pool)
                    .await
                    .ctx("forgetting old plans")?;
            }
        }
        Ok(())
    }

    /// Forgets a plan's work.
    async fn delete_work(&self, plan: i64) -> Result<()> {
        self.delete_in_chunks("DELETE FROM work WHERE plan = ? LIMIT ?", plan, "forgetting a plan's work").await
    }

    /// Runs `sql` (a DELETE of `plan`'s rows ending in `LIMIT ?`) until it deletes less than a
    /// chunk: no one statement holds millions of row locks.
    async fn delete_in_chunks(&self, sql: &'static str, plan: i64, what: &'static str) -> Result<()> {
        loop {
            let done = sqlx::query(sql).bind(plan).bind(DELETE_CHUNK).execute(&self.pool).await.ctx(what)?;
            if done.rows_affected() < u64::from(DELETE_CHUNK) {
                return Ok(());
            }
        }
    }
}
