//! The catalog in MySQL/MariaDB (sqlx, migrations embedded from `migrations/`): one row per
//! object with its etag, size, content hash and state, plus one row per sync run.
//! Every statement binds its values; nothing is built by string concatenation.

use std::collections::HashMap;
use std::time::Duration;

use sqlx::mysql::{MySqlConnectOptions, MySqlPool, MySqlPoolOptions};
use sqlx::{QueryBuilder, Row};

use super::{Context, Error, Result};
use crate::core::ModelId;

mod generations;
mod plans;
pub use generations::{Fix, Generation, State, collection_of};
pub use plans::{Collision, PlanCounts, PlanRecord, PlanStatus, WorkItem, WorkKind};

/// What the catalog knows of one object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub id: i64,
    pub key: String,
    pub etag: Option<String>,
    pub size: u64,
    pub indexed: bool,
    /// Failed for a reason outside the bytes (see `Record::retry`): tried again next run.
    pub retry: bool,
    /// Skipped: archived when it was listed (see `Record::skipped`).
    pub skipped: bool,
    /// Its newer version could not be read (see `Record::stale`): its older vector stands.
    pub stale: bool,
}

/// A finished object, to be recorded.
#[derive(Clone, Debug)]
pub struct Record {
    pub id: i64,
    pub key: String,
    pub etag: Option<String>,
    pub size: u64,
    pub content_hash: Option<String>,
    /// None = indexed; Some(reason) = failed.
    pub error: Option<String>,
    /// The failure is not about the bytes (the bucket refused or failed the GET): the next run
    /// tries again, though the etag is the same.
    pub retry: bool,
    /// Not fetched at all, for `error`'s reason (an archive storage class): `skipped`, not
    /// `failed`, and fetched once it changes or leaves the archive tier.
    pub skipped: bool,
    /// The object was indexed, and this (changed) version could not be read, for `error`'s
    /// reason: the older row and vector stand, marked `stale`, and the next run tries again. A
    /// failed read proves nothing about the object.
    pub stale: bool,
}

impl Record {
    /// An object indexed as it is (`etag`, `size`, the hash of its bytes where known), its vector
    /// written in the same batch.
    pub fn indexed(key: &str, etag: Option<String>, size: u64, content_hash: Option<String>) -> Self {
        Self {
            id: super::key_id(key),
            key: key.to_string(),
            etag,
            size,
            content_hash,
            error: None,
            retry: false,
            skipped: false,
            stale: false,
        }
    }
}

/// Counts for one collection.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Counts {
    /// Objects with a vector, the stale ones among them.
    pub indexed: u64,
    pub failed: u64,
    /// Not fetched: in an archive storage class.
    pub skipped: u64,
    /// Indexed, but their newer version could not be read: search has the older one.
    pub stale: u64,
}

/// Progress of one run.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
pub struct RunProgress {
    pub discovered: u64,
    pub planned: u64,
    pub indexed: u64,
    pub failed: u64,
    pub deleted: u64,
}

/// Where the collection stands: catalog counts and the latest run of each shard, summed.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
pub struct Progress {
    /// Objects the latest runs found in the source.
    pub discovered: u64,
    pub indexed: u64,
    pub failed: u64,
    /// Not fetched: in an archive storage class until restored or moved.
    #[serde(default)]
    pub skipped: u64,
    /// Of `indexed`, those whose newer version could not be read (the bucket refused the GET):
    /// search still has the older one, and every run tries again.
    #[serde(default)]
    pub stale: u64,
    /// The latest run (its shards summed), if there was one.
    pub run: Option<RunStatus>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
pub struct RunStatus {
    /// running | succeeded | failed (failed if any shard failed, running if any still runs).
    pub status: String,
    pub shards: u32,
    #[serde(flatten)]
    pub progress: RunProgress,
}

/// A moment on the catalog's own clock (DATETIME(3), the server's time), to compare with
/// `updated_at` without trusting this machine's clock.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CatalogTime(chrono::NaiveDateTime);

/// Runs kept per collection: the latest of each shard is what `/progress` shows; the rest is a
/// short history, not a log that grows with every sync.
pub const RUNS_KEPT: u32 = 200;

/// A failed object and why.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Failure {
    pub key: String,
    pub error: String,
    /// Its newer version failed; an older one is still indexed.
    pub stale: bool,
}

/// A static SELECT of the columns an `Entry` is read from, with the given WHERE clause.
/// The entries' columns as the `by_key` index holds them: the key's head, not the key.
macro_rules! select_heads {
    ($filter:literal) => {
        concat!("SELECT id, key_head, etag, size, state, retry FROM images WHERE ", $filter)
    };
}

macro_rules! select_entries {
    ($filter:literal) => {
        concat!("SELECT id, object_key, etag, size, state, retry FROM images WHERE ", $filter)
    };
}

/// `(id, id, ...)`, every id bound.
fn push_ids(qb: &mut QueryBuilder<sqlx::MySql>, ids: &[i64]) {
    qb.push("(");
    let mut sep = qb.separated(", ");
    for id in ids {
        sep.push_bind(*id);
    }
    qb.push(")");
}

/// An object key, stored as its bytes (`VARBINARY`, so that the catalog sorts keys as buckets
/// list them); every key written was a `String`.
pub(super) fn key_from_row(r: &sqlx::mysql::MySqlRow, column: &str) -> Result<String> {
    let bytes: Vec<u8> = r.try_get(column)?;
    String::from_utf8(bytes).map_err(|e| Error::Invalid(format!("a catalog key is not UTF-8: {e}")))
}

/// An etag, stored as its bytes too (it is part of the index the diff reads).
fn etag_from_row(r: &sqlx::mysql::MySqlRow) -> Result<Option<String>> {
    let bytes: Option<Vec<u8>> = r.try_get("etag")?;
    bytes
        .map(|b| String::from_utf8(b).map_err(|e| Error::Invalid(format!("a catalog etag is not UTF-8: {e}"))))
        .transpose()
}

fn entry_from_row(r: &sqlx::mysql::MySqlRow) -> Result<Entry> {
    entry_of(r, r.try_get("id")?, key_from_row(r, "object_key")?)
}

/// An entry of a row whose id and key are read already.
fn entry_of(r: &sqlx::mysql::MySqlRow, id: i64, key: String) -> Result<Entry> {
    let state: String = r.try_get("state")?;
    Ok(Entry {
        id,
        key,
        etag: etag_from_row(r)?,
        size: r.try_get::<i64, _>("size")? as u64,
        // A stale row holds a vector too (of an older version).
        indexed: state == "indexed" || state == "stale",
        retry: r.try_get("retry")?,
        skipped: state == "skipped",
        stale: state == "stale",
    })
}

/// The longest key the catalog holds: Azure's 1024 characters, in UTF-8 (S3 and GCS take 1024
/// bytes). Longer keys are counted by the plan, never recorded.
pub const MAX_KEY_BYTES: usize = 4096;
/// The bytes of a key in the `by_key` index (`images.key_head`).
const KEY_HEAD: usize = 1024;

/// Where a read of the catalog in key order stands (`Catalog::entries_page`); a new one starts
/// at the first key.
#[derive(Clone, Debug, Default)]
pub struct KeyCursor {
    /// The next page starts after this head; every key with it has been read.
    after_head: Option<Vec<u8>>,
    /// Inside a group of keys that share a whole `KEY_HEAD`: its head, and its last key read.
    group: Option<(Vec<u8>, Option<String>)>,
}

/// How long a process waits for another to finish the migrations (a large ALTER takes minutes).
const MIGRATION_WAIT_SECS: u32 = 600;

/// Applies the migrations under a lock of our own: sqlx's is `GET_LOCK(name, -1)`, which MariaDB
/// answers with NULL at once (it takes no negative timeout), so two processes starting together
/// (the controller and a plan Job, a fleet of shards after an upgrade) would apply one migration
/// twice, or read another's half-applied one as "partially applied".
async fn migrate(pool: &MySqlPool) -> Result<()> {
    let mut conn = pool.acquire().await.ctx("connecting to MySQL")?;
    let locked: Option<i64> = sqlx::query_scalar("SELECT GET_LOCK('imageindex.migrations', ?)")
        .bind(MIGRATION_WAIT_SECS)
        .fetch_one(&mut *conn)
        .await
        .ctx("waiting for the catalog migrations")?;
    if locked != Some(1) {
        return Err(Error::Invalid(format!(
            "another process held the catalog's migration lock for {MIGRATION_WAIT_SECS} s; try again"
        )));
    }
    let mut migrator = sqlx::migrate!();
    migrator.set_locking(false);
    // `run_direct` is `run` on a connection of our own (`run(&mut conn)` is not Send: sqlx's note).
    let applied = migrator.run_direct(None, &mut *conn, false).await.ctx("applying catalog migrations");
    // A connection that fails to release the lock releases it as it closes.
    let released = sqlx::query("SELECT RELEASE_LOCK('imageindex.migrations')").execute(&mut *conn).await;
    if released.is_err() {
        conn.close_on_drop();
    }
    applied
}

#[derive(Clone)]
pub struct Catalog {
    pool: MySqlPool,
    collection: String,
    model: String,
}

impl Catalog {
    /// Connects and applies the migrations.
    pub async fn connect(url: &str, collection: &str, model: &str) -> Result<Self> {
        let opts: MySqlConnectOptions =
            url.parse().map_err(|_| Error::Invalid("bad MySQL URL (mysql://user:pass@host:3306/db)".into()))?;
        let pool = MySqlPoolOptions::new()
            .max_connections(8)
            .acquire_timeout(Duration::from_secs(10))
            // A sort compares the first max_sort_length bytes (1024 by default): longer keys
            // would tie, and a page of them come back in any order.
            .after_connect(|conn, _| {
                Box::pin(async move {
                    sqlx::query("SET SESSION max_sort_length = ?").bind(MAX_KEY_BYTES as u64).execute(conn).await?;
                    Ok(())
                })
            })
            .connect_with(opts)
            .await
            .ctx("connecting to MySQL")?;
        migrate(&pool).await?;
        Ok(Self { pool, collection: collection.to_string(), model: model.to_string() })
    }

    /// The same MySQL (pool, migrations applied) for another collection and model.
    pub fn scoped(&self, collection: &str, model: &str) -> Self {
        Self { pool: self.pool.clone(), collection: collection.to_string(), model: model.to_string() }
    }

    /// The model whose vectors this handle writes (`ModelId`'s form).
    pub fn model(&self) -> &str {
        &self.model
    }

    /// Whose rows these are (`images.collection`).
    pub fn collection(&self) -> &str {
        &self.collection
    }

    /// Every entry of this collection whose id falls in `shard` of `shards` (see `shard_ids`).
    pub async fn entries(&self, shard: u32, shards: u32) -> Result<HashMap<String, Entry>> {
        let ids = super::shard_ids(shard, shards);
        let rows = sqlx::query(select_entries!("collection = ? AND id BETWEEN ? AND ?"))
            .bind(&self.collection)
            .bind(ids.start())
            .bind(ids.end())
            .fetch_all(&self.pool)
            .await
            .ctx("reading the catalog")?;
        rows.iter().map(|r| entry_from_row(r).map(|e| (e.key.clone(), e))).collect()
    }

    /// The next page of this collection's entries in key order (the keys' UTF-8 bytes), about
    /// `limit` of them, from where `cursor` stands; the diff reads the catalog this way, page by
    /// page, along the `by_key` index, which holds each key's first `KEY_HEAD` bytes. Keys that
    /// long may share a head: their whole keys are read by id and the page put in key order; a
    /// group of them cut by the page's end is read on its own, in pages too. Says whether the
    /// catalog is read to its end.
    pub async fn entries_page(&self, cursor: &mut KeyCursor, limit: u32) -> Result<(Vec<Entry>, bool)> {
        if let Some((head, after)) = cursor.group.take() {
            return self.group_page(cursor, head, after, limit).await;
        }
        let rows = match &cursor.after_head {
            None => sqlx::query(select_heads!("collection = ? ORDER BY key_head LIMIT ?"))
                .bind(&self.collection)
                .bind(limit),
            Some(head) => sqlx::query(select_heads!("collection = ? AND key_head > ? ORDER BY key_head LIMIT ?"))
                .bind(&self.collection)
                .bind(head.as_slice())
                .bind(limit),
        }
        .fetch_all(&self.pool)
        .await
        .ctx("reading the catalog")?;
        let full = rows.len() == limit as usize;
        let mut heads =
            rows.iter().map(|r| Ok((r.try_get::<Vec<u8>, _>("key_head")?, r))).collect::<Result<Vec<_>>>()?;
        let Some(last) = heads.last().map(|(h, _)| h.clone()) else { return Ok((vec![], true)) };
        if full && last.len() == KEY_HEAD {
            // The last head may have more keys than this page holds: that group is read whole.
            heads.retain(|(h, _)| *h != last);
            cursor.group = Some((last, None));
        } else {
            cursor.after_head = Some(last);
        }
        let long: Vec<i64> = heads
            .iter()
            .filter(|(h, _)| h.len() == KEY_HEAD)
            .map(|(_, r)| r.try_get("id"))
            .collect::<Result<_, _>>()?;
        let mut whole = self.keys_of(&long).await?;
        let mut entries = heads
            .into_iter()
            .map(|(head, r)| {
                let id: i64 = r.try_get("id")?;
                let key = match whole.remove(&id) {
                    Some(key) => key,
                    None if head.len() < KEY_HEAD => String::from_utf8(head)
                        .map_err(|e| Error::Invalid(format!("a catalog key is not UTF-8: {e}")))?,
                    None => return Err(Error::Invalid(format!("catalog row {id} vanished while it was read"))),
                };
                entry_of(r, id, key)
            })
            .collect::<Result<Vec<_>>>()?;
        if !long.is_empty() {
            // Heads are in order; keys sharing a head are put in order by the rest.
            entries.sort_by(|a, b| a.key.as_bytes().cmp(b.key.as_bytes()));
        }
        Ok((entries, !full && cursor.group.is_none()))
    }

    /// A page of the keys that share `head`, in key order, after `after`: a filesort of that
    /// group alone (keys of more than `KEY_HEAD` bytes, which only Azure allows).
    async fn group_page(
        &self,
        cursor: &mut KeyCursor,
        head: Vec<u8>,
        after: Option<String>,
        limit: u32,
    ) -> Result<(Vec<Entry>, bool)> {
        let rows = match &after {
            None => sqlx::query(select_entries!("collection = ? AND key_head = ? ORDER BY object_key LIMIT ?"))
                .bind(&self.collection)
                .bind(head.as_slice())
                .bind(limit),
            Some(key) => sqlx::query(select_entries!(
                "collection = ? AND key_head = ? AND object_key > ? ORDER BY object_key LIMIT ?"
            ))
            .bind(&self.collection)
            .bind(head.as_slice())
            .bind(key.as_bytes())
            .bind(limit),
        }
        .fetch_all(&self.pool)
        .await
        .ctx("reading the catalog")?;
        let entries = rows.iter().map(entry_from_row).collect::<Result<Vec<_>>>()?;
        match entries.last() {
            Some(e) if entries.len() == limit as usize => cursor.group = Some((head, Some(e.key.clone()))),
            _ => cursor.after_head = Some(head),
        }
        Ok((entries, false))
    }

    /// The whole keys of these rows.
    /// The key whose row holds `id`, if any.
    pub async fn key_at(&self, id: i64) -> Result<Option<String>> {
        Ok(self.keys_of(&[id]).await?.remove(&id))
    }

    pub(super) async fn keys_of(&self, ids: &[i64]) -> Result<HashMap<i64, String>> {
        if ids.is_empty() {
            return Ok(HashMap::new());
        }
        let mut qb = QueryBuilder::new("SELECT id, object_key FROM images WHERE collection = ");
        qb.push_bind(&self.collection).push(" AND id IN ");
        push_ids(&mut qb, ids);
        let rows = qb.build().fetch_all(&self.pool).await.ctx("reading keys by id")?;
        rows.iter().map(|r| Ok((r.try_get("id")?, key_from_row(r, "object_key")?))).collect()
    }

    /// Upserts finished objects (indexed or failed) in one statement (through `Index::write`).
    pub(crate) async fn record(&self, records: &[Record]) -> Result<()> {
        let (stale, records): (Vec<&Record>, Vec<&Record>) = records.iter().partition(|r| r.stale);
        self.record_stale(&stale).await?;
        if records.is_empty() {
            return Ok(());
        }
        let mut qb = QueryBuilder::new(
            "INSERT INTO images (collection, id, object_key, etag, size, content_hash, state, error, retry, model, indexed_at) ",
        );
        qb.push_values(records, |mut b, r| {
            let ok = r.error.is_none();
            b.push_bind(&self.collection)
                .push_bind(r.id)
                .push_bind(&r.key)
                .push_bind(&r.etag)
                .push_bind(r.size as i64)
                .push_bind(&r.content_hash)
                .push_bind(match (ok, r.skipped) {
                    (true, _) => "indexed",
                    (false, true) => "skipped",
                    (false, false) => "failed",
                })
                .push_bind(&r.error)
                .push_bind(r.retry)
                .push_bind(&self.model)
                .push(if ok { "CURRENT_TIMESTAMP(3)" } else { "NULL" });
        });
        qb.push(
            " ON DUPLICATE KEY UPDATE object_key = VALUES(object_key), etag = VALUES(etag), size = VALUES(size), \
             content_hash = VALUES(content_hash), state = VALUES(state), error = VALUES(error), retry = VALUES(retry), \
             model = VALUES(model), indexed_at = VALUES(indexed_at)",
        );
        qb.build().execute(&self.pool).await.ctx("writing the catalog")?;
        Ok(())
    }

    /// Notes that the newer version of indexed objects could not be read: the row keeps its
    /// etag, size, hash and model (those of the vector Milvus holds) and becomes `stale` with the
    /// reason. A row that holds no vector (any more) is recorded as a failed read instead.
    async fn record_stale(&self, records: &[&Record]) -> Result<()> {
        if records.is_empty() {
            return Ok(());
        }
        let mut qb =
            QueryBuilder::new("INSERT INTO images (collection, id, object_key, etag, size, state, error, retry) ");
        qb.push_values(records, |mut b, r| {
            b.push_bind(&self.collection)
                .push_bind(r.id)
                .push_bind(&r.key)
                .push_bind(&r.etag)
                .push_bind(r.size as i64)
                .push_bind("failed")
                .push_bind(&r.error)
                .push_bind(true);
        });
        qb.push(
            " ON DUPLICATE KEY UPDATE state = IF(state IN ('indexed', 'stale'), 'stale', 'failed'), \
             error = VALUES(error), retry = TRUE",
        );
        qb.build().execute(&self.pool).await.ctx("writing the catalog")?;
        Ok(())
    }

    /// The catalog's clock: rows written at or after it are newer than whatever was read before.
    pub async fn clock(&self) -> Result<CatalogTime> {
        let now = sqlx::query_scalar("SELECT CAST(CURRENT_TIMESTAMP(3) AS DATETIME(3))")
            .fetch_one(&self.pool)
            .await
            .ctx("reading the catalog's clock")?;
        Ok(CatalogTime(now))
    }

    /// Those of `ids` that have rows, last written before `before` where given.
    pub(crate) async fn rows(&self, ids: &[i64], before: Option<CatalogTime>) -> Result<Vec<i64>> {
        let mut out = Vec::new();
        for chunk in ids.chunks(1000) {
            let mut qb = QueryBuilder::new("SELECT id FROM images WHERE collection = ");
            qb.push_bind(&self.collection);
            if let Some(before) = before {
                qb.push(" AND updated_at < ").push_bind(before.0);
            }
            qb.push(" AND id IN ");
            push_ids(&mut qb, chunk);
            let rows = qb.build().fetch_all(&self.pool).await.ctx("reading the catalog")?;
            for r in rows {
                out.push(r.try_get("id")?);
            }
        }
        Ok(out)
    }

    /// Marks rows to be embedded again by the next run (their etag forgotten, so the object looks changed).
    pub(crate) async fn redo(&self, ids: &[i64]) -> Result<()> {
        for chunk in ids.chunks(1000) {
            let mut qb = QueryBuilder::new("UPDATE images SET etag = NULL, retry = TRUE WHERE collection = ");
            qb.push_bind(&self.collection).push(" AND id IN ");
            push_ids(&mut qb, chunk);
            qb.build().execute(&self.pool).await.ctx("marking catalog rows for a redo")?;
        }
        Ok(())
    }

    /// Forgets objects (through `Index`, which removes their vectors first); with `since`, only
    /// rows last written before it.
    pub(crate) async fn delete(&self, ids: &[i64]) -> Result<()> {
        self.delete_written_before(ids, None).await
    }

    pub(crate) async fn delete_written_before(&self, ids: &[i64], since: Option<CatalogTime>) -> Result<()> {
        for chunk in ids.chunks(1000) {
            let mut qb = QueryBuilder::new("DELETE FROM images WHERE collection = ");
            qb.push_bind(&self.collection);
            if let Some(since) = since {
                qb.push(" AND updated_at < ").push_bind(since.0);
            }
            qb.push(" AND id IN ");
            push_ids(&mut qb, chunk);
            qb.build().execute(&self.pool).await.ctx("deleting from the catalog")?;
        }
        Ok(())
    }

    pub async fn counts(&self) -> Result<Counts> {
        let rows = sqlx::query("SELECT state, COUNT(*) AS n FROM images WHERE collection = ? GROUP BY state")
            .bind(&self.collection)
            .fetch_all(&self.pool)
            .await?;
        let mut c = Counts::default();
        for r in rows {
            let n = r.try_get::<i64, _>("n")? as u64;
            match r.try_get::<String, _>("state")?.as_str() {
                "indexed" => c.indexed += n,
                "stale" => (c.indexed, c.stale) = (c.indexed + n, n),
                "skipped" => c.skipped = n,
                _ => c.failed = n,
            }
        }
        // Keys the latest plan left out because another key holds their id fail too.
        c.failed += self.latest_plan().await?.map_or(0, |p| p.counts.collided);
        Ok(c)
    }

    /// Up to `limit` objects that failed (their key order), then the keys the latest plan left
    /// out because another key holds their id.
    pub async fn failures(&self, limit: u32) -> Result<Vec<Failure>> {
        let rows = sqlx::query(
            "SELECT object_key, error, state FROM images WHERE collection = ? AND state IN ('failed', 'stale') \
             ORDER BY object_key LIMIT ?",
        )
        .bind(&self.collection)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        let mut failures = rows
            .into_iter()
            .map(|r| {
                Ok(Failure {
                    key: key_from_row(&r, "object_key")?,
                    error: r.try_get::<Option<String>, _>("error")?.unwrap_or_default(),
                    stale: r.try_get::<String, _>("state")? == "stale",
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let left = limit.saturating_sub(failures.len() as u32);
        if let (Some(plan), true) = (self.latest_plan().await?, left > 0) {
            let collided = self.collisions(plan.id, left).await?;
            failures.extend(collided.into_iter().map(|c| Failure { error: c.to_string(), key: c.key, stale: false }));
        }
        Ok(failures)
    }

    /// Counts plus the latest run of each shard (of the latest shard count).
    pub async fn progress(&self) -> Result<Progress> {
        let counts = self.counts().await?;
        let rows = sqlx::query(
            "SELECT r.status, r.shards, r.discovered, r.planned, r.indexed, r.failed, r.deleted FROM runs r \
             JOIN (SELECT shard, MAX(id) AS id FROM runs WHERE collection = ? AND shards = \
                     (SELECT shards FROM runs WHERE collection = ? ORDER BY id DESC LIMIT 1) GROUP BY shard) latest \
             ON r.id = latest.id",
        )
        .bind(&self.collection)
        .bind(&self.collection)
        .fetch_all(&self.pool)
        .await?;
        let mut run: Option<RunStatus> = None;
        for r in rows {
            let get = |c: &str| r.try_get::<i64, _>(c).map(|v| v as u64);
            let status: String = r.try_get("status")?;
            let agg = run.get_or_insert_with(|| RunStatus {
                status: "succeeded".into(),
                shards: r.try_get::<i32, _>("shards").unwrap_or(1) as u32,
                ..Default::default()
            });
            if status == "failed" || (status == "running" && agg.status != "failed") {
                agg.status = status;
            }
            let p = &mut agg.progress;
            // Every shard records what the plan it carried out listed.
            p.discovered = p.discovered.max(get("discovered")?);
            p.planned += get("planned")?;
            p.indexed += get("indexed")?;
            p.failed += get("failed")?;
            p.deleted += get("deleted")?;
        }
        let discovered =
            run.as_ref().map_or(counts.indexed + counts.failed + counts.skipped, |r| r.progress.discovered);
        let Counts { indexed, failed, skipped, stale } = counts;
        Ok(Progress { discovered, indexed, failed, skipped, stale, run })
    }

    /// The catalog entry of a key, if any.
    pub async fn entry(&self, key: &str) -> Result<Option<Entry>> {
        let row = sqlx::query(select_entries!("collection = ? AND id = ? AND object_key = ?"))
            .bind(&self.collection)
            .bind(super::key_id(key))
            .bind(key)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(entry_from_row).transpose()
    }

    /// Records a run, and forgets this collection's runs older than its newest `RUNS_KEPT`.
    pub async fn start_run(&self, shard: u32, shards: u32) -> Result<i64> {
        let res = sqlx::query("INSERT INTO runs (collection, shard, shards, status) VALUES (?, ?, ?, 'running')")
            .bind(&self.collection)
            .bind(shard)
            .bind(shards)
            .execute(&self.pool)
            .await?;
        let oldest_kept: Option<i64> =
            sqlx::query_scalar("SELECT id FROM runs WHERE collection = ? ORDER BY id DESC LIMIT 1 OFFSET ?")
                .bind(&self.collection)
                .bind(RUNS_KEPT - 1)
                .fetch_optional(&self.pool)
                .await?;
        if let Some(oldest) = oldest_kept {
            sqlx::query("DELETE FROM runs WHERE collection = ? AND id < ?")
                .bind(&self.collection)
                .bind(oldest)
                .execute(&self.pool)
                .await
                .ctx("forgetting old runs")?;
        }
        Ok(res.last_insert_id() as i64)
    }

    pub async fn update_run(&self, run: i64, p: &RunProgress) -> Result<()> {
        sqlx::query("UPDATE runs SET discovered = ?, planned = ?, indexed = ?, failed = ?, deleted = ? WHERE id = ?")
            .bind(p.discovered as i64)
            .bind(p.planned as i64)
            .bind(p.indexed as i64)
            .bind(p.failed as i64)
            .bind(p.deleted as i64)
            .bind(run)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub async fn finish_run(&self, run: i64, p: &RunProgress, error: Option<&str>) -> Result<()> {
        self.update_run(run, p).await?;
        sqlx::query("UPDATE runs SET status = ?, error = ?, finished_at = CURRENT_TIMESTAMP(3) WHERE id = ?")
            .bind(if error.is_some() { "failed" } else { "succeeded" })
            .bind(error)
            .bind(run)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Forgets this collection: its objects and its runs (through `Index::drop`).
    pub(crate) async fn drop_collection(&self) -> Result<()> {
        for sql in [
            "DELETE FROM images WHERE collection = ?",
            "DELETE FROM runs WHERE collection = ?",
            "DELETE w FROM work w JOIN plans p ON w.plan = p.id WHERE p.collection = ?",
            "DELETE k FROM key_collisions k JOIN plans p ON k.plan = p.id WHERE p.collection = ?",
            "DELETE FROM plans WHERE collection = ?",
            "DELETE FROM collections WHERE collection = ?",
        ] {
            sqlx::query(sql).bind(&self.collection).execute(&self.pool).await?;
        }
        Ok(())
    }

    /// Claims the collection for `owner`: recorded when it has none (new, or made before owners
    /// were recorded), refused when another holds it (two indexes whose names collide, on one
    /// MySQL, must never share a catalog).
    pub async fn claim_owner(&self, owner: &str) -> Result<()> {
        sqlx::query("INSERT IGNORE INTO collections (collection, owner) VALUES (?, ?)")
            .bind(&self.collection)
            .bind(owner)
            .execute(&self.pool)
            .await
            .ctx("claiming the collection")?;
        sqlx::query("UPDATE collections SET owner = ? WHERE collection = ? AND owner IS NULL")
            .bind(owner)
            .bind(&self.collection)
            .execute(&self.pool)
            .await
            .ctx("claiming the collection")?;
        match self.owner().await? {
            Some(theirs) if theirs != owner => Err(Error::Claimed(format!(
                "collection {} belongs to {theirs}, not {owner}: name another collection \
                 (spec.milvus.collection, --collection), or run as its owner (--owner)",
                self.collection
            ))),
            _ => Ok(()),
        }
    }

    /// Who holds the collection, if anyone.
    pub async fn owner(&self) -> Result<Option<String>> {
        let owner: Option<Option<String>> = sqlx::query_scalar("SELECT owner FROM collections WHERE collection = ?")
            .bind(&self.collection)
            .fetch_optional(&self.pool)
            .await
            .ctx("reading the collection's owner")?;
        Ok(owner.flatten())
    }

    /// Lets go of the collection, if `owner` holds it: kept, for whoever claims it next.
    pub async fn release(&self, owner: &str) -> Result<()> {
        sqlx::query("UPDATE collections SET owner = NULL WHERE collection = ? AND owner = ?")
            .bind(&self.collection)
            .bind(owner)
            .execute(&self.pool)
            .await
            .ctx("releasing the collection")?;
        Ok(())
    }

    /// Records `model` as the one whose vectors this collection holds, or checks that it is the
    /// one already recorded (see `ModelId::check`). `fresh`: the Milvus collection was just made,
    /// so whatever was recorded before describes vectors that are gone.
    pub async fn claim_model(&self, model: &ModelId, mixed_precision: bool, fresh: bool) -> Result<()> {
        let sql = if fresh {
            "UPDATE collections SET model = ? WHERE collection = ?"
        } else {
            "UPDATE collections SET model = ? WHERE collection = ? AND model IS NULL"
        };
        sqlx::query(sql)
            .bind(model.to_string())
            .bind(&self.collection)
            .execute(&self.pool)
            .await
            .ctx("recording the collection's model")?;
        let recorded: Option<Option<String>> = sqlx::query_scalar("SELECT model FROM collections WHERE collection = ?")
            .bind(&self.collection)
            .fetch_optional(&self.pool)
            .await?;
        let Some(Some(recorded)) = recorded else {
            return Err(Error::Invalid(format!("collection {} is not claimed; claim_owner first", self.collection)));
        };
        let recorded: ModelId = recorded.parse().map_err(Error::Invalid)?;
        Ok(model.check(&recorded, mixed_precision, &format!("the catalog of {}", self.collection))?)
    }

    /// Ids of the indexed rows in `shard` of `shards` (see `shard_ids`).
    pub async fn indexed_ids(&self, shard: u32, shards: u32) -> Result<Vec<i64>> {
        let ids = super::shard_ids(shard, shards);
        sqlx::query_scalar(
            "SELECT id FROM images WHERE collection = ? AND state IN ('indexed', 'stale') AND id BETWEEN ? AND ?",
        )
        .bind(&self.collection)
        .bind(ids.start())
        .bind(ids.end())
        .fetch_all(&self.pool)
        .await
        .ctx("reading the catalog's indexed ids")
    }

    /// Those of `ids` whose rows say indexed.
    pub(crate) async fn indexed_among(&self, ids: &[i64]) -> Result<Vec<i64>> {
        let mut out = Vec::new();
        for chunk in ids.chunks(1000) {
            let mut qb =
                QueryBuilder::new("SELECT id FROM images WHERE state IN ('indexed', 'stale') AND collection = ");
            qb.push_bind(&self.collection).push(" AND id IN ");
            push_ids(&mut qb, chunk);
            let rows = qb.build().fetch_all(&self.pool).await.ctx("reading the catalog")?;
            for r in rows {
                out.push(r.try_get("id")?);
            }
        }
        Ok(out)
    }

    /// Forgets every object row last written before `before` (its vector is gone with the
    /// collection it was in); returns how many.
    pub(crate) async fn forget_written_before(&self, before: CatalogTime) -> Result<u64> {
        let done = sqlx::query("DELETE FROM images WHERE collection = ? AND updated_at < ?")
            .bind(&self.collection)
            .bind(before.0)
            .execute(&self.pool)
            .await
            .ctx("forgetting the rows of a lost collection")?;
        Ok(done.rows_affected())
    }

    /// MySQL answers.
    pub async fn ping(&self) -> Result<()> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }
}

impl From<sqlx::Error> for Error {
    fn from(e: sqlx::Error) -> Self {
        Self::backend("MySQL", e)
    }
}
