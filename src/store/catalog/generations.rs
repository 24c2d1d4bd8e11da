//! The catalog's record of generations (the `generations` table): which collections stand behind
//! an index name, and where each stands. Only reads and writes; the lifecycle that decides them
//! is `index::Generations`.

use std::time::Duration;

use sqlx::Row;

use super::{Catalog, Context, Error, Result, key_from_row};
use crate::core::ModelId;

/// Where a generation stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    /// Being filled; search does not read it.
    Building,
    /// What the alias points at.
    Serving,
    /// Search moved off it; dropped after the grace period unless kept.
    Retired,
    /// Its build stopped (the reason says why); the next build of the same model resumes it.
    Failed,
    /// Gone from Milvus and the catalog.
    Dropped,
}

impl State {
    fn as_str(self) -> &'static str {
        match self {
            Self::Building => "building",
            Self::Serving => "serving",
            Self::Retired => "retired",
            Self::Failed => "failed",
            Self::Dropped => "dropped",
        }
    }

    fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "building" => Self::Building,
            "serving" => Self::Serving,
            "retired" => Self::Retired,
            "failed" => Self::Failed,
            "dropped" => Self::Dropped,
            other => return Err(Error::Invalid(format!("unknown generation state {other:?}"))),
        })
    }
}

/// One collection behind an index name.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Generation {
    pub number: u32,
    /// The Milvus collection.
    pub collection: String,
    /// Whose catalog rows are its (`images.collection`).
    pub catalog: String,
    pub state: State,
    /// The model its vectors come from, once recorded (`ModelId`'s form).
    pub model: Option<String>,
    /// Why its build failed.
    pub reason: Option<String>,
    pub keep: bool,
    pub created_at: Option<chrono::NaiveDateTime>,
    pub swapped_at: Option<chrono::NaiveDateTime>,
    pub retired_at: Option<chrono::NaiveDateTime>,
}

impl Generation {
    /// The name itself as a collection (no alias): generation 0.
    pub fn plain(name: &str) -> Self {
        Self {
            number: 0,
            collection: name.to_string(),
            catalog: name.to_string(),
            state: State::Serving,
            model: None,
            reason: None,
            keep: false,
            created_at: None,
            swapped_at: None,
            retired_at: None,
        }
    }

    /// Whether it is a collection made before generations, still under the index's name.
    pub fn is_plain(&self, name: &str) -> bool {
        self.collection == name
    }

    /// Whether its vectors can come from `model` (nothing recorded yet, or the same model; see
    /// `ModelId::check`).
    pub fn fits(&self, model: &ModelId, mixed_precision: bool) -> bool {
        match self.model.as_deref().map(str::parse::<ModelId>) {
            None => true,
            Some(Ok(recorded)) => model.check(&recorded, mixed_precision, "").is_ok(),
            Some(Err(_)) => false,
        }
    }
}

/// The collection of generation `number` of index `name`.
pub fn collection_of(name: &str, number: u32) -> String {
    format!("{name}_g{number}")
}

/// A change to the generations table that makes it agree with the alias (see
/// `index::generations::settle`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fix {
    /// The alias points at `<name>_g0` with no row: the move of a plain collection behind the
    /// alias was cut before it was recorded (its rows are under the name).
    RecordAdopted,
    /// The alias points at this generation, which the table says is not serving.
    Serve(u32),
    /// The table says this generation serves, and the alias points elsewhere.
    Retire(u32),
}

/// A static SELECT of one name's generations (and their models), with more of the WHERE clause.
macro_rules! select_generations {
    ($more:literal) => {
        concat!(
            "SELECT g.number, g.collection, g.catalog, g.state, g.reason, g.keep, g.created_at, g.swapped_at, ",
            "g.retired_at, c.model FROM generations g LEFT JOIN collections c ON c.collection = g.catalog ",
            "WHERE g.name = ? ",
            $more
        )
    };
}

fn generation_from_row(r: &sqlx::mysql::MySqlRow) -> Result<Generation> {
    Ok(Generation {
        number: r.try_get::<i32, _>("number")? as u32,
        collection: r.try_get("collection")?,
        catalog: r.try_get("catalog")?,
        state: State::parse(&r.try_get::<String, _>("state")?)?,
        model: r.try_get("model")?,
        reason: r.try_get("reason")?,
        keep: r.try_get("keep")?,
        created_at: r.try_get("created_at")?,
        swapped_at: r.try_get("swapped_at")?,
        retired_at: r.try_get("retired_at")?,
    })
}

impl Catalog {
    /// Every generation of `name` the table records, oldest first.
    pub async fn generations(&self, name: &str) -> Result<Vec<Generation>> {
        let rows = sqlx::query(select_generations!("ORDER BY g.number"))
            .bind(name)
            .fetch_all(&self.pool)
            .await
            .ctx("reading the generations")?;
        rows.iter().map(generation_from_row).collect()
    }

    /// The retired generations of `name` whose grace is over and that are not kept, oldest first.
    pub async fn generations_due(&self, name: &str, grace: Duration) -> Result<Vec<Generation>> {
        let due = sqlx::query(select_generations!(
            "AND g.state = 'retired' AND NOT g.keep AND g.retired_at <= NOW(3) - INTERVAL ? MICROSECOND \
             ORDER BY g.number"
        ))
        .bind(name)
        .bind(grace.as_micros() as u64)
        .fetch_all(&self.pool)
        .await
        .ctx("reading the retired generations")?;
        due.iter().map(generation_from_row).collect()
    }

    /// The model recorded for the collection whose rows are under `catalog`.
    pub async fn model_of(&self, catalog: &str) -> Result<Option<String>> {
        let model: Option<Option<String>> = sqlx::query_scalar("SELECT model FROM collections WHERE collection = ?")
            .bind(catalog)
            .fetch_optional(&self.pool)
            .await
            .ctx("reading the collection's model")?;
        Ok(model.flatten())
    }

    /// Makes the table of `name`'s generations agree with its alias, in one transaction.
    pub async fn settle_generations(&self, name: &str, fixes: &[Fix]) -> Result<()> {
        let mut tx = self.pool.begin().await.ctx("beginning a transaction")?;
        for fix in fixes {
            let q = match *fix {
                Fix::RecordAdopted => sqlx::query(
                    "INSERT INTO generations (name, number, collection, catalog, state, swapped_at) \
                     VALUES (?, 0, ?, ?, 'serving', NOW(3)) ON DUPLICATE KEY UPDATE state = 'serving'",
                )
                .bind(name)
                .bind(collection_of(name, 0))
                .bind(name),
                Fix::Serve(n) => sqlx::query(
                    "UPDATE generations SET state = 'serving', reason = NULL, swapped_at = NOW(3) \
                     WHERE name = ? AND number = ? AND state NOT IN ('serving', 'dropped')",
                )
                .bind(name)
                .bind(n as i32),
                Fix::Retire(n) => sqlx::query(
                    "UPDATE generations SET state = 'retired', retired_at = NOW(3) \
                     WHERE name = ? AND number = ? AND state = 'serving'",
                )
                .bind(name)
                .bind(n as i32),
            };
            q.execute(&mut *tx).await.ctx("recording the generations' states")?;
        }
        tx.commit().await.ctx("recording the generations' states")
    }

    /// The catalog key (`images.collection`) plan `plan`'s work is under.
    pub async fn catalog_of_plan(&self, plan: i64) -> Result<Option<String>> {
        sqlx::query_scalar("SELECT collection FROM plans WHERE id = ?")
            .bind(plan)
            .fetch_optional(&self.pool)
            .await
            .ctx("reading the plan")
    }

    /// Records generation `number` of `name` as building in `collection` (its rows under the same key).
    pub async fn record_generation(&self, name: &str, number: u32, collection: &str) -> Result<()> {
        sqlx::query(
            "INSERT INTO generations (name, number, collection, catalog, state) VALUES (?, ?, ?, ?, 'building')",
        )
        .bind(name)
        .bind(number as i32)
        .bind(collection)
        .bind(collection)
        .execute(&self.pool)
        .await
        .ctx("recording the new generation")?;
        Ok(())
    }

    pub async fn set_generation_state(
        &self,
        name: &str,
        number: u32,
        state: State,
        reason: Option<&str>,
    ) -> Result<()> {
        sqlx::query("UPDATE generations SET state = ?, reason = ? WHERE name = ? AND number = ?")
            .bind(state.as_str())
            .bind(reason)
            .bind(name)
            .bind(number as i32)
            .execute(&self.pool)
            .await
            .ctx("recording the generation's state")?;
        Ok(())
    }

    /// Keeps a retired generation (never collected), or lets it go.
    pub async fn keep_generation(&self, name: &str, number: u32, keep: bool) -> Result<()> {
        sqlx::query("UPDATE generations SET keep = ? WHERE name = ? AND number = ?")
            .bind(keep)
            .bind(name)
            .bind(number as i32)
            .execute(&self.pool)
            .await
            .ctx("recording whether to keep the generation")?;
        Ok(())
    }

    /// Objects whose rows under `from` are indexed, or failed for a reason in the bytes, and
    /// under `to` are not: no row, or a failure to be tried again (the bucket failed the read)
    /// where `from`'s is final. In id order after `after`, at most `limit`.
    pub async fn missing_from(&self, from: &str, to: &str, after: i64, limit: u32) -> Result<Vec<(i64, String)>> {
        let rows = sqlx::query(
            "SELECT a.id, a.object_key FROM images a LEFT JOIN images b ON b.collection = ? AND b.id = a.id \
             WHERE a.collection = ? AND a.id > ? AND (b.id IS NULL OR (b.retry AND NOT a.retry)) \
             ORDER BY a.id LIMIT ?",
        )
        .bind(to)
        .bind(from)
        .bind(after)
        .bind(limit)
        .fetch_all(&self.pool)
        .await
        .ctx("comparing two generations' catalogs")?;
        rows.iter().map(|r| Ok((r.try_get("id")?, key_from_row(r, "object_key")?))).collect()
    }

    /// Forgets the generations of `name` that are dropped.
    pub async fn forget_dropped_generations(&self, name: &str) -> Result<()> {
        sqlx::query("DELETE FROM generations WHERE name = ? AND state = 'dropped'")
            .bind(name)
            .execute(&self.pool)
            .await
            .ctx("forgetting the generations")?;
        Ok(())
    }

    /// Forgets the generations of `name` whose rows are under `catalog`.
    pub async fn forget_generations_of(&self, name: &str, catalog: &str) -> Result<()> {
        sqlx::query("DELETE FROM generations WHERE name = ? AND catalog = ?")
            .bind(name)
            .bind(catalog)
            .execute(&self.pool)
            .await
            .ctx("forgetting the generations")?;
        Ok(())
    }

    /// The catalog keys of every generation of `name` the table records.
    pub async fn generation_catalogs(&self, name: &str) -> Result<Vec<String>> {
        sqlx::query_scalar("SELECT catalog FROM generations WHERE name = ?")
            .bind(name)
            .fetch_all(&self.pool)
            .await
            .ctx("reading the generations")
    }

    /// The catalog key whose rows (and owner) are the serving generation's of `name`, as the
    /// table records it: the name itself before there were generations. Needs no Milvus.
    pub async fn serving_catalog(&self, name: &str) -> Result<String> {
        let key: Option<String> = sqlx::query_scalar(
            "SELECT catalog FROM generations WHERE name = ? AND state = 'serving' ORDER BY number DESC",
        )
        .bind(name)
        .fetch_optional(&self.pool)
        .await
        .ctx("reading the serving generation")?;
        Ok(key.unwrap_or_else(|| name.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_generation_fits_its_own_model_only() {
        let resnet50: ModelId = "resnet50.onnx@fp32".parse().unwrap();
        let resnet18: ModelId = "resnet18.onnx@fp32".parse().unwrap();
        let mut g = Generation::plain("photos");
        assert!(g.fits(&resnet18, false), "nothing recorded yet");
        g.model = Some(resnet50.to_string());
        assert!(g.fits(&resnet50, false));
        assert!(!g.fits(&resnet18, false));
        assert!(!g.fits(&"resnet50.onnx@int8".parse().unwrap(), false));
        assert!(g.fits(&"resnet50.onnx@int8".parse().unwrap(), true));
        g.model = Some("not a model id".into());
        assert!(!g.fits(&resnet50, false));
    }
}
