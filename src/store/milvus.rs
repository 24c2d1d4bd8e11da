//! Vectors in Milvus (milvus-sdk-rust 3, against a 2.3+ server).
//! Schema: `id` INT64 primary key (derived from the object key, so re-runs upsert instead of
//! duplicating), `key` VARCHAR (the object key), `embedding` FLOAT_VECTOR(dim).
//! Known gaps of the 3.x SDK against a 2.3 server are avoided: no `rows()` on results (column
//! accessors instead) and no get/delete by `Ids` (an `id in [..]` filter instead).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use milvus::v2::prelude::*;
use milvus::v2::{self as sdk};

use super::{Context, Error, Result, Vector};
use crate::core::{IndexKind, ModelId};

pub const ID: &str = "id";
pub const KEY: &str = "key";
pub const VECTOR: &str = "embedding";
/// Longest object key a new collection stores: the catalog's (Azure's 1024 characters in UTF-8).
/// Collections made before hold 1024 bytes (`VectorStore::key_limit`).
pub const MAX_KEY_LEN: usize = super::MAX_KEY_BYTES;
fn key_limit() -> Arc<AtomicUsize> {
    Arc::new(AtomicUsize::new(MAX_KEY_LEN))
}

const DESCRIPTION: &str = "imageindex: one row per image object";
/// Precedes the model id (`resnet50.onnx@int8`) in the collection's description.
const MODEL_TAG: &str = "model=";

/// How a collection of `kind` is indexed.
fn index_type(kind: IndexKind) -> IndexType {
    match kind {
        IndexKind::Hnsw => IndexType::Hnsw,
        IndexKind::IvfFlat => IndexType::IvfFlat,
    }
}

fn index_params(kind: IndexKind) -> IndexParam {
    let p = IndexParam::new().field_name(VECTOR).index_type(index_type(kind));
    match kind {
        IndexKind::Hnsw => p
            .metric_type(MetricType::Cosine)
            .extra_params(HashMap::from([("M".into(), "16".into()), ("efConstruction".into(), "200".into())])),
        IndexKind::IvfFlat => {
            p.metric_type(MetricType::L2).extra_params(HashMap::from([("nlist".into(), NLIST.to_string())]))
        }
    }
}

/// Search parameters. Near-duplicate margins can be tiny, so searches are generous: IVF_FLAT
/// probes every list (exact), HNSW uses a wide beam.
fn search_params(kind: IndexKind, topk: usize) -> HashMap<String, String> {
    match kind {
        IndexKind::Hnsw => HashMap::from([("ef".into(), (topk * 4).max(256).to_string())]),
        IndexKind::IvfFlat => HashMap::from([("nprobe".into(), NLIST.to_string())]),
    }
}

/// A key prefix to restrict searches to. It lands inside a Milvus expression, so only plain
/// characters pass: letters, digits and `/_.-`, at most 512 of them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyPrefix(String);

impl KeyPrefix {
    /// None for an empty prefix (no restriction); an error naming the rule for any other.
    pub fn parse(p: &str) -> Result<Option<Self>> {
        if p.is_empty() {
            return Ok(None);
        }
        if p.len() <= 512 && p.chars().all(|c| c.is_ascii_alphanumeric() || "/_.-".contains(c)) {
            Ok(Some(Self(p.to_string())))
        } else {
            Err(Error::Invalid(format!("prefix {p:?} may hold only letters, digits and / _ . -")))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The Milvus filter expression: safe because of what `parse` lets through. A range rather
    /// than `like`, where `_` matches any character (`user_1/` would match `userX1/`). The upper
    /// bound is the prefix with its last character incremented, which for the allowed characters
    /// is never a quote or a backslash.
    fn filter(&self) -> String {
        let mut upper = self.0.clone().into_bytes();
        *upper.last_mut().expect("parse refuses the empty prefix") += 1;
        let upper = String::from_utf8(upper).expect("ASCII stays ASCII");
        format!("{KEY} >= \"{}\" and {KEY} < \"{upper}\"", self.0)
    }
}

const NLIST: usize = 128;

/// Whether `ensure_collection` found the collection or made it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ensured {
    Existed,
    Created,
}

#[derive(Clone, Debug)]
pub struct MilvusConfig {
    /// `http://host:19530`
    pub url: String,
    /// `user:password`, where the server has authentication on.
    pub token: Option<crate::core::Redacted>,
    pub collection: String,
    pub index: IndexKind,
}

/// One search hit.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Hit {
    pub id: i64,
    pub key: String,
    /// The raw Milvus score: cosine similarity for HNSW/COSINE, L2 distance for IVF_FLAT/L2.
    pub score: f32,
}

pub struct VectorStore {
    client: ClientV2,
    collection: String,
    index: IndexKind,
    /// The longest key the collection's key field takes, as read when it was ensured.
    key_limit: Arc<AtomicUsize>,
}

impl VectorStore {
    pub async fn connect(cfg: &MilvusConfig) -> Result<Self> {
        let mut conn = ConnectConfig::new().uri(cfg.url.clone());
        if let Some(t) = &cfg.token {
            conn = conn.token(t.expose().to_string());
        }
        let client = ClientV2::new(&conn).await.ctx(format!("connecting to Milvus at {}", cfg.url))?;
        Ok(Self { client, collection: cfg.collection.clone(), index: cfg.index, key_limit: key_limit() })
    }

    pub fn collection(&self) -> &str {
        &self.collection
    }

    /// The same connection, for another collection (or alias) of the same index type.
    pub fn scoped(&self, collection: &str) -> Self {
        Self {
            client: self.client.clone(),
            collection: collection.to_string(),
            index: self.index,
            key_limit: key_limit(),
        }
    }

    /// The longest key (bytes) the collection takes: `MAX_KEY_LEN`, or less for one made before
    /// keys that long were held. Known once `ensure_collection` has run.
    pub fn key_limit(&self) -> usize {
        self.key_limit.load(Ordering::Relaxed)
    }

    /// The collection this name is an alias of; None when it is not an alias (a collection, or
    /// nothing).
    pub async fn alias_target(&self) -> Result<Option<String>> {
        let asked = DescribeAliasRequest::builder().alias(&self.collection).build()?;
        match self.client.describe_alias(asked).await {
            Ok(r) => Ok(Some(r.collection_name().to_string())),
            Err(e) if e.to_string().contains("alias not found") => Ok(None),
            Err(e) => Err(Error::backend(format!("asking Milvus for the alias {}", self.collection), e)),
        }
    }

    /// Points this name, an alias, at `collection`: created, or moved in one step (searches
    /// through it go to one collection or the other, never to none).
    pub async fn point_alias_at(&self, collection: &str) -> Result<()> {
        let (alias, what) = (&self.collection, format!("pointing the alias {} at {collection}", self.collection));
        if self.alias_target().await?.is_some() {
            let req = AlterAliasRequest::builder().alias(alias).collection_name(collection).build()?;
            self.client.alter_alias(req).await.ctx(what)
        } else {
            let req = CreateAliasRequest::builder().alias(alias).collection_name(collection).build()?;
            self.client.create_alias(req).await.ctx(what)
        }
    }

    /// Drops the alias named after this handle's collection (the collection it points at stays).
    pub async fn drop_alias(&self) -> Result<()> {
        let req = DropAliasRequest::builder().alias(&self.collection).build()?;
        self.client.drop_alias(req).await.ctx(format!("dropping the alias {}", self.collection))
    }

    /// Renames the collection (its vectors, index and load state stay).
    pub async fn rename(&self, to: &str) -> Result<()> {
        let req =
            RenameCollectionRequest::builder().collection_name(&self.collection).new_collection_name(to).build()?;
        self.client.rename_collection(req).await.ctx(format!("renaming collection {} to {to}", self.collection))
    }

    pub fn index_kind(&self) -> IndexKind {
        self.index
    }

    /// Creates the collection, its index and loads it, or checks that the existing one fits: the
    /// same vector width and vectors of the same model and precision (recorded in the collection's
    /// description when it is created; collections made before that record nothing to check).
    /// Says whether this call created it: a new collection holds nothing the catalog may claim.
    /// Without `may_create`, a collection that is not there is `NotFound`.
    pub async fn ensure_collection(
        &self,
        dim: usize,
        model: &ModelId,
        mixed_precision: bool,
        may_create: bool,
    ) -> Result<Ensured> {
        let name = self.collection.as_str();
        let check = |recorded: Option<ModelId>| match recorded {
            Some(theirs) => Ok(model.check(&theirs, mixed_precision, &format!("Milvus collection {name}"))?),
            None => Ok::<_, Error>(()),
        };
        let mut ensured = Ensured::Existed;
        if self.exists().await? {
            check(self.check_schema(dim).await?)?;
        } else if !may_create {
            return Err(Error::NotFound(format!("Milvus collection {name}")));
        } else {
            let schema = sdk::CollectionSchema::new()
                .description(format!("{DESCRIPTION}; {MODEL_TAG}{model}"))
                .add_field(sdk::FieldSchema::new().name(ID).data_type(DataType::Int64).primary_key(true).auto_id(false))
                .add_field(
                    sdk::FieldSchema::new().name(KEY).data_type(DataType::VarChar).max_length(MAX_KEY_LEN as u32),
                )
                .add_field(sdk::FieldSchema::new().name(VECTOR).data_type(DataType::FloatVector).dimension(dim as u32));
            let created = self
                .client
                .create_collection(CreateCollectionRequest::builder().collection_name(name).schema(schema).build()?)
                .await;
            // Shards of one Job start together: another may have created it first.
            if let Err(e) = created {
                if !self.exists().await? {
                    return Err(Error::backend(format!("creating collection {name}"), e));
                }
                check(self.check_schema(dim).await?)?;
            } else {
                ensured = Ensured::Created;
            }
        }
        // Milvus 2.3 answers "index not found" rather than an empty list.
        let existing =
            match self.client.list_indexes(ListIndexesRequest::builder().collection_name(name).build()?).await {
                Ok(r) => r.indexes().iter().find(|i| i.get_field_name() == VECTOR).map(|i| i.get_index_type()),
                Err(e) if e.to_string().contains("index not found") => None,
                Err(e) => return Err(Error::backend("listing indexes", e)),
            };
        // An index type (and with it the metric) does not change in place; searching with the
        // other one's parameters fails or ranks by the wrong distance.
        if let Some(theirs) = existing.filter(|t| *t != index_type(self.index)) {
            return Err(Error::IndexMismatch(format!(
                "Milvus collection {name} has a {theirs:?} index, but {} was asked for: an index type does not \
                 change in place; name another collection, or drop this one to rebuild it",
                self.index.as_str()
            )));
        }
        if existing.is_none() {
            // Creating an identical index twice is a no-op on the server, so a race here is harmless.
            self.client
                .create_index(
                    CreateIndexRequest::builder()
                        .collection_name(name)
                        .index_params(vec![index_params(self.index)])
                        .build()?,
                )
                .await
                .ctx(format!("creating the {:?} index on {name}", self.index))?;
        }
        self.client
            .load_collection(LoadCollectionRequest::builder().collection_name(name).build()?)
            .await
            .ctx(format!("loading collection {name}"))?;
        Ok(ensured)
    }

    /// Checks the fields; returns the model recorded in the description, if any.
    async fn check_schema(&self, dim: usize) -> Result<Option<ModelId>> {
        let desc = self
            .client
            .describe_collection(DescribeCollectionRequest::builder().collection_name(&self.collection).build()?)
            .await?;
        let schema = desc.description().get_schema();
        let recorded = match schema.get_description().split_once(MODEL_TAG) {
            Some((_, m)) => Some(m.trim().parse::<ModelId>().map_err(Error::Invalid)?),
            None => None,
        };
        let fields = schema.get_fields();
        let vector = fields.iter().find(|f| f.get_name() == VECTOR);
        match vector.map(|f| f.get_dimension()) {
            Some(d) if d as usize == dim => {}
            Some(d) => {
                return Err(Error::ModelMismatch(crate::core::ModelMismatch(format!(
                    "collection {} holds {d}-d vectors but the model makes {dim}-d ones: vectors of different \
                     models do not compare; use another collection",
                    self.collection
                ))));
            }
            None => {
                return Err(Error::Invalid(format!(
                    "collection {} exists but was not made by imageindex (no {VECTOR} field)",
                    self.collection
                )));
            }
        }
        let Some(key) = fields.iter().find(|f| f.get_name() == KEY) else {
            return Err(Error::Invalid(format!(
                "collection {} exists but was not made by imageindex (no {KEY} field)",
                self.collection
            )));
        };
        self.key_limit.store((key.get_max_length() as usize).min(MAX_KEY_LEN), Ordering::Relaxed);
        Ok(recorded)
    }

    /// Inserts or replaces rows by id (through `Index::write`, which orders it with the catalog).
    pub(crate) async fn upsert(&self, rows: Vec<Vector>) -> Result<()> {
        if rows.is_empty() {
            return Ok(());
        }
        let (mut ids, mut keys, mut vectors) = (vec![], vec![], vec![]);
        for r in rows {
            ids.push(r.id);
            keys.push(r.key);
            vectors.push(r.embedding);
        }
        let insert = InsertRequest::builder()
            .collection_name(&self.collection)
            .columns(vec![
                FieldData::int64(ID, ids),
                FieldData::varchar(KEY, keys),
                FieldData::float_vector(VECTOR, vectors),
            ])
            .build()?;
        self.client.upsert(UpsertRequest::builder().insert(insert).build()?).await.ctx("Milvus upsert")?;
        Ok(())
    }

    /// Removes rows by id (through `Index`, which orders it with the catalog).
    pub(crate) async fn delete(&self, ids: &[i64]) -> Result<()> {
        for chunk in ids.chunks(1000) {
            self.client
                .delete(DeleteRequest::builder().collection_name(&self.collection).filter(id_filter(chunk)).build()?)
                .await
                .ctx("Milvus delete")?;
        }
        Ok(())
    }

    /// Rows in the collection (deleted ones excluded), read with Strong consistency.
    pub async fn count(&self) -> Result<u64> {
        let resp = self
            .client
            .query(
                QueryRequest::builder()
                    .collection_name(&self.collection)
                    .output_fields(["count(*)"])
                    .consistency_level(ConsistencyLevel::Strong)
                    .build()?,
            )
            .await
            .ctx("Milvus count")?;
        let col = resp
            .results()
            .get_output_field("count(*)")
            .ok_or_else(|| Error::Invalid("count(*) missing from Milvus reply".into()))?;
        Ok(col.as_int64().and_then(|v| v.first().copied()).unwrap_or(0) as u64)
    }

    /// Waits until every write acknowledged so far is searchable, and returns the row count: a
    /// Strong read waits for the query nodes to consume everything up to now, after which
    /// Bounded searches see it too. Cheaper than a flush, which also seals segments.
    pub async fn wait_searchable(&self) -> Result<u64> {
        self.count().await
    }

    /// Ids among `ids` that are in the collection.
    pub async fn existing(&self, ids: &[i64]) -> Result<Vec<i64>> {
        let mut out = Vec::new();
        for chunk in ids.chunks(1000) {
            let resp = self
                .client
                .query(
                    QueryRequest::builder()
                        .collection_name(&self.collection)
                        .filter(id_filter(chunk))
                        .output_fields([ID])
                        .consistency_level(ConsistencyLevel::Strong)
                        .build()?,
                )
                .await?;
            if let Some(col) = resp.results().get_output_field(ID).and_then(|c| c.as_int64()) {
                out.extend_from_slice(col);
            }
        }
        Ok(out)
    }

    /// Every id in `shard` of `shards` (see `shard_ids`), with Strong consistency. Read in id
    /// ranges: Milvus answers at most `PAGE` rows a query, and ids are uniform hashes, so a range
    /// of the expected size rarely fills; one that does is split and read again.
    pub async fn ids(&self, shard: u32, shards: u32) -> Result<Vec<i64>> {
        const PAGE: usize = 16_384;
        let (first, last) = super::shard_ids(shard, shards).into_inner();
        let expected = self.count().await? as usize / shards.max(1) as usize;
        let ranges = (expected / (PAGE / 4)).max(1) as i64;
        let step = (last - first) / ranges;
        let mut todo: Vec<(i64, i64)> = (0..ranges)
            .map(|i| (first + i * step, if i == ranges - 1 { last } else { first + (i + 1) * step - 1 }))
            .collect();
        let mut out = Vec::new();
        while let Some((lo, hi)) = todo.pop() {
            let filter = format!("{ID} >= {lo} and {ID} <= {hi}");
            let resp = self
                .client
                .query(
                    QueryRequest::builder()
                        .collection_name(&self.collection)
                        .filter(filter)
                        .output_fields([ID])
                        .limit(PAGE as i64)
                        .consistency_level(ConsistencyLevel::Strong)
                        .build()?,
                )
                .await
                .ctx("listing Milvus ids")?;
            let ids = resp.results().get_output_field(ID).and_then(|c| c.as_int64()).unwrap_or_default();
            if ids.len() >= PAGE && hi > lo {
                let mid = lo + (hi - lo) / 2;
                todo.extend([(lo, mid), (mid + 1, hi)]);
            } else {
                out.extend_from_slice(ids);
            }
        }
        Ok(out)
    }

    /// Nearest neighbours of one vector, best first. Bounded consistency: a search does not wait
    /// for the latest writes (Strong costs ~200 ms a query on 2.3).
    /// `prefix` restricts hits to keys that start with it.
    pub async fn search(&self, vector: Vec<f32>, topk: usize, prefix: Option<&KeyPrefix>) -> Result<Vec<Hit>> {
        let filter = prefix.map(KeyPrefix::filter).unwrap_or_default();
        let resp = self
            .client
            .search(
                SearchRequest::builder()
                    .collection_name(&self.collection)
                    .filter(filter)
                    .vector_field(VECTOR)
                    .vectors(SearchVectors::Float(vec![vector]))
                    .output_fields([KEY])
                    .limit(topk as i64)
                    .extra_params(search_params(self.index, topk))
                    .consistency_level(ConsistencyLevel::Bounded)
                    .build()?,
            )
            .await
            .ctx("Milvus search")?;
        let Some(result) = resp.results().iter().next() else { return Ok(vec![]) };
        if result.get_scores().is_empty() {
            return Ok(vec![]); // no hits come without output columns
        }
        let ids = match result.get_ids() {
            Ids::Int64(v) => v.clone(),
            _ => {
                return Err(Error::Invalid(format!(
                    "collection {} does not have integer ids; not an imageindex collection",
                    self.collection
                )));
            }
        };
        let keys = result
            .get_output_field(KEY)
            .and_then(|c| c.as_varchar())
            .ok_or_else(|| Error::Invalid("Milvus search reply lacks keys".into()))?;
        Ok(ids
            .into_iter()
            .zip(keys)
            .zip(result.get_scores())
            .map(|((id, key), &score)| Hit { id, key: key.clone(), score })
            .collect())
    }

    /// Drops the collection (through `Index::drop`, which forgets the catalog rows too).
    pub(crate) async fn drop_collection(&self) -> Result<()> {
        self.client
            .drop_collection(DropCollectionRequest::builder().collection_name(&self.collection).build()?)
            .await
            .ctx("dropping collection")?;
        Ok(())
    }

    /// Whether a collection (or an alias) of this name exists.
    pub(crate) async fn exists(&self) -> Result<bool> {
        let r = self
            .client
            .has_collection(HasCollectionRequest::builder().collection_name(&self.collection).build()?)
            .await
            .ctx("asking Milvus for the collection")?;
        Ok(r.exists())
    }

    /// Milvus is reachable and the collection is loaded (searchable).
    pub async fn ready(&self) -> Result<()> {
        let state = self
            .client
            .get_load_state(GetLoadStateRequest::builder().collection_name(&self.collection).build()?)
            .await
            .ctx("asking Milvus for the collection's load state")?
            .state();
        match state {
            LoadState::Loaded => Ok(()),
            LoadState::NotExist => Err(Error::NotFound(format!("collection {}", self.collection))),
            other => Err(Error::backend(format!("collection {}", self.collection), format!("not loaded ({other:?})"))),
        }
    }
}

/// `id in [1,2,3]`: ids are integers we made, so formatting them is safe.
fn id_filter(ids: &[i64]) -> String {
    let list: Vec<String> = ids.iter().map(i64::to_string).collect();
    format!("{ID} in [{}]", list.join(","))
}

impl From<::milvus::v2::error::Error> for Error {
    fn from(e: ::milvus::v2::error::Error) -> Self {
        Self::backend("Milvus", e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_are_plain() {
        let p = KeyPrefix::parse("photos/2024-01_a.b").unwrap().unwrap();
        assert_eq!(p.filter(), r#"key >= "photos/2024-01_a.b" and key < "photos/2024-01_a.c""#);
        let p = KeyPrefix::parse("user_").unwrap().unwrap();
        assert_eq!(p.filter(), r#"key >= "user_" and key < "user`""#);
        assert!(KeyPrefix::parse("").unwrap().is_none());
        for bad in ["a\"b", "x\\", "a% or 1", "ключ", &"a".repeat(513)] {
            assert!(KeyPrefix::parse(bad).is_err(), "{bad}");
        }
    }
}
