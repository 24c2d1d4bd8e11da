//! Generations: the collections behind one index name. Search reads through the Milvus alias
//! named after the index. A change of model, precision, width or index type builds a new
//! collection, `<name>_g<N>` with its own catalog rows, while search keeps reading the current
//! one; the alias moves in one step once the new one holds every object the old one held
//! (indexed, or failed with a reason). The old one is then retired: dropped after a grace period,
//! which gives search servers time to move, or kept.
//!
//! A collection made before generations (or by a plain first `index`) is the name itself:
//! generation 0, with no alias. Its first change renames it to `<name>_g0` and puts the alias in
//! its place; its catalog rows keep the name, which `Generation::catalog` records.

use std::time::Duration;

use super::Index;
use crate::core::ModelId;
use crate::store::{Catalog, Error, MilvusConfig, Result, VectorStore};
use crate::store::{Fix, Generation, State, collection_of};

/// The next generation's number: one past every number used, and never 0 (the plain collection's).
pub fn next_number(used: impl IntoIterator<Item = u32>) -> u32 {
    used.into_iter().max().map_or(1, |n| n + 1).max(1)
}

/// The generations of one index name.
pub struct Generations {
    name: String,
    /// The index's name in Milvus: the alias, or a plain collection.
    alias: VectorStore,
    catalog: Catalog,
}

impl Generations {
    /// On connections already made (the name's Milvus and a migrated catalog).
    pub fn new(vectors: &VectorStore, catalog: &Catalog, name: &str) -> Self {
        Self { name: name.to_string(), alias: vectors.scoped(name), catalog: catalog.scoped(name, "") }
    }

    /// Connects to Milvus and the catalog (applying its migrations) for the index `milvus.collection`.
    pub async fn connect(milvus: &MilvusConfig, mysql_url: &str) -> Result<Self> {
        let vectors = VectorStore::connect(milvus).await?;
        let catalog = Catalog::connect(mysql_url, &milvus.collection, "").await?;
        Ok(Self::new(&vectors, &catalog, &milvus.collection))
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The index of generation `g`, on these connections, for vectors of `model`. Its
    /// collection is made by `Index::ensure` only where it is the plain one (nothing served yet):
    /// a generation's collection is made by its build alone (`to_build`), so a search pod or a
    /// Job that outlived a generation never brings a dropped one back.
    pub fn index(&self, g: &Generation, model: &ModelId) -> Index {
        Index {
            vectors: self.alias.scoped(&g.collection),
            catalog: self.catalog.scoped(&g.catalog, &model.to_string()),
            may_create: g.is_plain(&self.name),
        }
    }

    /// The index of `building`, which `begin` returned: its build makes its collection.
    pub fn to_build(&self, building: &Generation, model: &ModelId) -> Index {
        Index { may_create: true, ..self.index(building, model) }
    }

    async fn rows(&self) -> Result<Vec<Generation>> {
        self.catalog.generations(&self.name).await
    }

    /// The generation search reads now; None when the name has no collection yet. The alias is
    /// the truth, and the table is made to agree with it first (see `settle`): a swap cut short
    /// between Milvus and the catalog is finished, and a plain collection's move behind the alias
    /// cut short (renamed, no alias yet) is completed, so that nobody reads the missing name as
    /// "no collection yet" and makes an empty one.
    pub async fn serving(&self) -> Result<Option<Generation>> {
        let target = match self.alias.alias_target().await? {
            Some(collection) => collection,
            None if self.alias.exists().await? => {
                let mut g = Generation::plain(&self.name);
                g.model = self.catalog.model_of(&self.name).await?;
                return Ok(Some(g));
            }
            None => match self.restore_alias().await? {
                Some(collection) => collection,
                None => return Ok(None),
            },
        };
        let mut rows = self.rows().await?;
        let fixes = settle(&self.name, &rows, &target);
        if !fixes.is_empty() {
            tracing::warn!("the generations of {} disagreed with the alias (a step cut short): {fixes:?}", self.name);
            self.catalog.settle_generations(&self.name, &fixes).await?;
            rows = self.rows().await?;
        }
        let mut g = match rows.into_iter().find(|g| g.collection == target) {
            Some(g) => g,
            // An alias made outside imageindex: its catalog rows are under its collection's name.
            None => Generation { collection: target.clone(), catalog: target, ..Generation::plain("") },
        };
        g.state = State::Serving;
        if g.model.is_none() {
            g.model = self.catalog.model_of(&g.catalog).await?;
        }
        Ok(Some(g))
    }

    /// With neither the alias nor a plain collection in Milvus: points the alias back at the
    /// generation that served, where one is still there (a step cut short after the rename of a
    /// plain collection, or after the alias was dropped). Returns its collection.
    async fn restore_alias(&self) -> Result<Option<String>> {
        for collection in lost_alias_candidates(&self.name, &self.rows().await?) {
            if self.alias.scoped(&collection).exists().await? {
                tracing::warn!("{} has no alias but {collection} served it: pointing the alias at it", self.name);
                self.alias.point_alias_at(&collection).await?;
                return Ok(Some(collection));
            }
        }
        Ok(None)
    }

    /// Every generation, oldest first, the serving one as the alias says.
    pub async fn list(&self) -> Result<Vec<Generation>> {
        let serving = self.serving().await?;
        let mut all = self.rows().await?;
        for g in &mut all {
            if serving.as_ref().is_some_and(|s| s.collection == g.collection) {
                g.state = State::Serving;
            } else if g.state == State::Serving {
                g.state = State::Retired; // a swap cut short after the alias moved
            }
        }
        if let Some(s) = serving.filter(|s| !all.iter().any(|g| g.collection == s.collection)) {
            all.insert(0, s);
        }
        Ok(all)
    }

    /// The generation plan `plan` was made for (its work is in that generation's catalog); None
    /// for a plan of another index, or none.
    pub async fn of_plan(&self, plan: i64) -> Result<Option<Generation>> {
        let catalog = self.catalog.catalog_of_plan(plan).await?;
        let Some(catalog) = catalog else { return Ok(None) };
        let all = self.list().await?;
        Ok(all.into_iter().find(|g| g.catalog == catalog && g.state != State::Dropped).or_else(|| {
            // The plain collection, before it had generations.
            (catalog == self.name).then(|| Generation::plain(&self.name))
        }))
    }

    /// The unfinished build (building or failed), if any.
    pub async fn unfinished(&self) -> Result<Option<Generation>> {
        Ok(self.rows().await?.into_iter().rev().find(|g| matches!(g.state, State::Building | State::Failed)))
    }

    /// A generation to build for `model`, held by `owner`: the unfinished one where it is for the
    /// same model (its work so far is kept), else a new one. An unfinished build of another model
    /// is dropped first: nothing serves from it. Refused when another owner holds the index.
    /// A plain collection is put behind the alias first (see `adopt_plain`); `serving` says what
    /// serves after that.
    pub async fn begin(&self, model: &ModelId, owner: &str) -> Result<(Option<Generation>, Generation)> {
        let mut serving = self.serving().await?;
        if let Some(s) = &serving {
            match self.catalog.scoped(&s.catalog, "").owner().await? {
                Some(theirs) if theirs != owner => {
                    return Err(Error::Claimed(format!("index {} belongs to {theirs}, not {owner}", self.name)));
                }
                _ => {}
            }
            if s.is_plain(&self.name) {
                serving = Some(self.adopt_plain(s).await?);
            }
        }
        if let Some(u) = self.unfinished().await? {
            // Another index of the same name may be building it (nothing served yet, so no
            // serving generation said whose the name is): neither resumed nor dropped, then.
            self.catalog.scoped(&u.catalog, "").claim_owner(owner).await?;
            if u.fits(model, false) {
                self.set_state(&u, State::Building, None).await?;
                return Ok((serving, Generation { state: State::Building, reason: None, ..u }));
            }
            tracing::warn!(
                "dropping the unfinished generation {} of {} ({}): this build is for {model}",
                u.number,
                self.name,
                u.model.as_deref().unwrap_or("no model yet")
            );
            self.drop_generation(&u, owner).await?;
        }
        let used =
            self.rows().await?.iter().map(|g| g.number).chain(serving.as_ref().map(|s| s.number)).collect::<Vec<_>>();
        let number = next_number(used);
        let collection = collection_of(&self.name, number);
        // Claimed before it is recorded: a generation row always names a collection its owner
        // holds, and nothing drops one it does not hold.
        self.catalog.scoped(&collection, "").claim_owner(owner).await?;
        self.catalog.record_generation(&self.name, number, &collection).await?;
        let building = Generation {
            number,
            catalog: collection.clone(),
            collection,
            state: State::Building,
            ..Generation::plain(&self.name)
        };
        Ok((serving, building))
    }

    async fn set_state(&self, g: &Generation, state: State, reason: Option<&str>) -> Result<()> {
        self.catalog.set_generation_state(&self.name, g.number, state, reason).await
    }

    /// Records that the build of `g` stopped, and why; search is untouched.
    pub async fn fail(&self, g: &Generation, reason: &str) -> Result<()> {
        self.set_state(g, State::Failed, Some(reason)).await
    }

    /// Objects that `from` holds (indexed, or failed for a reason in the bytes) and `to` does
    /// not: no row, or a failure to be tried again (the bucket failed the read) where `from`'s is
    /// final. In id order after `after`, at most `limit`: what `to` lacks to take `from`'s place.
    pub async fn missing(
        &self,
        from: &Generation,
        to: &Generation,
        after: i64,
        limit: u32,
    ) -> Result<Vec<(i64, String)>> {
        self.catalog.missing_from(&from.catalog, &to.catalog, after, limit).await
    }

    /// Puts a plain collection (generation 0) behind the alias: renamed `<name>_g0`, with the
    /// alias in its place, so that searches by the name reach the same vectors. Its catalog rows
    /// keep the name. Search by the name misses only the moment between the rename and the alias
    /// (a server retries it); should the alias fail, the rename is undone.
    async fn adopt_plain(&self, plain: &Generation) -> Result<Generation> {
        let renamed = collection_of(&self.name, 0);
        self.alias.rename(&renamed).await?;
        if let Err(e) = self.alias.point_alias_at(&renamed).await {
            if let Err(undo) = self.alias.scoped(&renamed).rename(&self.name).await {
                tracing::error!("undoing the rename of {} after the alias failed: {undo}", self.name);
            }
            return Err(e);
        }
        // Its rows are the name's: the plain collection's catalog.
        self.catalog.settle_generations(&self.name, &[Fix::RecordAdopted]).await?;
        tracing::info!("collection {} is now generation 0 ({renamed}) behind the alias {}", self.name, self.name);
        Ok(Generation { collection: renamed, ..plain.clone() })
    }

    /// Moves search from `from` (None: nothing served yet) to `to` in one step of the alias, and
    /// retires `from`; returns it. The table follows the alias (`serving` settles it), so a swap
    /// cut after the alias moved is finished by whoever reads the generations next.
    pub async fn swap(&self, from: Option<&Generation>, to: &Generation) -> Result<Option<Generation>> {
        self.alias.point_alias_at(&to.collection).await?;
        self.serving().await?;
        Ok(from.map(|old| Generation { state: State::Retired, ..old.clone() }))
    }

    /// Keeps a retired generation (never dropped by `collect`), or lets it go.
    pub async fn keep(&self, g: &Generation, keep: bool) -> Result<()> {
        self.catalog.keep_generation(&self.name, g.number, keep).await
    }

    /// Drops the retired generations whose grace period is over, not kept, and held by `owner`;
    /// returns them. One another index holds is left (with a warning), never dropped.
    pub async fn collect(&self, grace: Duration, owner: &str) -> Result<Vec<Generation>> {
        self.serving().await?; // a swap cut short retires its old generation, from now
        let due = self.catalog.generations_due(&self.name, grace).await?;
        let mut dropped = Vec::new();
        for g in due {
            match self.drop_generation(&g, owner).await {
                Ok(()) => dropped.push(g),
                Err(Error::Claimed(why)) => tracing::warn!("keeping retired generation {}: {why}", g.number),
                Err(e) => return Err(e),
            }
        }
        Ok(dropped)
    }

    /// Drops every generation, the alias and a plain collection, with their catalog rows (the
    /// index deleted), when `owner` holds what serves; of the others, only those it holds. What
    /// another index holds is left, rows and all.
    pub async fn drop_all(&self, owner: &str) -> Result<()> {
        if let Some(serving) = self.serving().await? {
            self.must_hold(&serving, owner).await?;
            if serving.is_plain(&self.name) {
                self.alias.drop_collection().await?;
            } else {
                self.alias.drop_alias().await?;
            }
        }
        if self.holds(&self.name, owner).await? {
            self.catalog.scoped(&self.name, "").drop_collection().await?;
        }
        for g in self.rows().await?.into_iter().filter(|g| g.state != State::Dropped) {
            match self.drop_generation(&g, owner).await {
                Ok(()) | Err(Error::Claimed(_)) => {}
                Err(e) => return Err(e),
            }
        }
        self.catalog.forget_dropped_generations(&self.name).await
    }

    /// Whether the catalog says `owner` holds the collection whose rows are under `catalog`.
    async fn holds(&self, catalog: &str, owner: &str) -> Result<bool> {
        Ok(self.catalog.scoped(catalog, "").owner().await?.as_deref() == Some(owner))
    }

    /// Refuses, with whose it is, unless `owner` holds `g`.
    async fn must_hold(&self, g: &Generation, owner: &str) -> Result<()> {
        match self.catalog.scoped(&g.catalog, "").owner().await? {
            Some(held) if held == owner => Ok(()),
            held => Err(Error::Claimed(format!(
                "generation {} of {} belongs to {}, not {owner}: not dropped",
                g.number,
                self.name,
                held.as_deref().unwrap_or("no one it can be shown to be (no owner recorded)")
            ))),
        }
    }

    /// Drops a generation's collection and catalog rows, if `owner` holds it; never the one the
    /// alias points at.
    async fn drop_generation(&self, g: &Generation, owner: &str) -> Result<()> {
        if self.alias.alias_target().await?.as_deref() == Some(g.collection.as_str()) || g.is_plain(&self.name) {
            return Err(Error::Invalid(format!("generation {} of {} serves search: not dropped", g.number, self.name)));
        }
        self.must_hold(g, owner).await?;
        let vectors = self.alias.scoped(&g.collection);
        if vectors.exists().await? {
            vectors.drop_collection().await?;
        }
        self.catalog.scoped(&g.catalog, "").drop_collection().await?;
        self.set_state(g, State::Dropped, None).await
    }
}

/// Forgets the catalog rows of every generation of `name` that `owner` holds (its Milvus is
/// gone); another index's are left.
pub async fn forget_all(catalog: &Catalog, name: &str, owner: &str) -> Result<()> {
    let keys = catalog.generation_catalogs(name).await?;
    for key in keys.iter().map(String::as_str).chain([name]) {
        let scoped = catalog.scoped(key, "");
        if scoped.owner().await?.as_deref() != Some(owner) {
            continue;
        }
        scoped.drop_collection().await?;
        catalog.forget_generations_of(name, key).await?;
    }
    Ok(())
}

/// What the table of `name`'s generations (`rows`) must change to agree with its alias, which
/// points at `target`.
fn settle(name: &str, rows: &[Generation], target: &str) -> Vec<Fix> {
    let mut fixes = Vec::new();
    if target == collection_of(name, 0) && !rows.iter().any(|g| g.collection == target) {
        fixes.push(Fix::RecordAdopted);
    }
    for g in rows.iter().filter(|g| g.state != State::Dropped) {
        if g.collection == target && g.state != State::Serving {
            fixes.push(Fix::Serve(g.number));
        } else if g.collection != target && g.state == State::Serving {
            fixes.push(Fix::Retire(g.number));
        }
    }
    fixes
}

/// The collections that may have served `name` before its alias went missing, the likeliest
/// first: the newest the table says serves, then `<name>_g0` unless the table says it is gone
/// (only the move of a plain collection behind the alias makes it).
fn lost_alias_candidates(name: &str, rows: &[Generation]) -> Vec<String> {
    let serving = rows.iter().rev().filter(|g| g.state == State::Serving).map(|g| g.collection.clone());
    let g0 = collection_of(name, 0);
    let adopted = (!rows.iter().any(|g| g.number == 0 && g.state != State::Serving)).then_some(g0);
    let mut all: Vec<String> = serving.chain(adopted).collect();
    all.dedup();
    all
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(number: u32, state: State) -> Generation {
        let collection = collection_of("photos", number);
        Generation { number, catalog: collection.clone(), collection, state, ..Generation::plain("photos") }
    }

    #[test]
    fn the_table_is_settled_by_the_alias() {
        let agreed = [row(1, State::Retired), row(2, State::Serving), row(3, State::Building)];
        assert_eq!(settle("photos", &agreed, "photos_g2"), []);
        // A swap cut after the alias moved: 3 serves, 2 is retired from now.
        assert_eq!(settle("photos", &agreed, "photos_g3"), [Fix::Retire(2), Fix::Serve(3)]);
        // Generation 0 behind the alias with no row (the move of a plain collection cut short).
        assert_eq!(settle("photos", &[], "photos_g0"), [Fix::RecordAdopted]);
        assert_eq!(settle("photos", &[row(1, State::Building)], "photos_g0"), [Fix::RecordAdopted]);
        // A dropped generation is never brought back.
        assert_eq!(settle("photos", &[row(1, State::Dropped)], "photos_g2"), []);
    }

    #[test]
    fn a_lost_alias_goes_back_to_what_served() {
        assert_eq!(lost_alias_candidates("photos", &[]), ["photos_g0"], "a plain collection renamed, then cut");
        let swapped = [row(0, State::Retired), row(1, State::Serving), row(2, State::Building)];
        assert_eq!(lost_alias_candidates("photos", &swapped), ["photos_g1"]);
        let adopted = [row(0, State::Serving), row(1, State::Building)];
        assert_eq!(lost_alias_candidates("photos", &adopted), ["photos_g0"]);
        assert!(lost_alias_candidates("photos", &[row(0, State::Dropped)]).is_empty());
    }

    #[test]
    fn numbers_go_up_and_start_at_one() {
        assert_eq!(next_number([]), 1);
        assert_eq!(next_number([0]), 1);
        assert_eq!(next_number([1, 3, 2]), 4);
        assert_eq!(collection_of("photos", 2), "photos_g2");
    }
}
