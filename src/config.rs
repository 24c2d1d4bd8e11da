//! Command-line and environment configuration shared by the subcommands. Every flag has an
//! environment variable, so the operator configures Job and Deployment pods through env
//! (credentials from Secrets), and a laptop through flags.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

use crate::embed::{Device, Model, ModelOptions};
use crate::store::{Catalog, IndexKind, MilvusConfig, VectorStore};

#[derive(Args, Clone, Debug)]
pub struct BackendArgs {
    /// Milvus gRPC address.
    #[arg(long, env = "IMAGEINDEX_MILVUS_URL", default_value = "http://127.0.0.1:19530")]
    pub milvus_url: String,
    /// Milvus credentials, `user:password`, where authentication is on.
    #[arg(long, env = "IMAGEINDEX_MILVUS_TOKEN", hide_env_values = true)]
    pub milvus_token: Option<String>,
    /// Milvus collection (also the catalog's namespace in MySQL).
    #[arg(long, env = "IMAGEINDEX_COLLECTION", default_value = "imageindex")]
    pub collection: String,
    /// Vector index: HNSW with cosine similarity, or IVF_FLAT with L2 distance.
    #[arg(long, env = "IMAGEINDEX_INDEX_TYPE", value_enum, default_value = "HNSW")]
    pub index_type: IndexKind,
    /// MySQL catalog, `mysql://user:password@host:3306/db`.
    #[arg(long, env = "IMAGEINDEX_MYSQL_URL", hide_env_values = true)]
    pub mysql_url: String,
}

impl BackendArgs {
    pub fn milvus(&self) -> MilvusConfig {
        MilvusConfig {
            url: self.milvus_url.clone(),
            token: self.milvus_token.clone(),
            collection: self.collection.clone(),
            index: self.index_type,
        }
    }

    pub async fn connect(&self, model_name: &str) -> Result<(VectorStore, Catalog)> {
        let vectors = VectorStore::connect(&self.milvus()).await?;
        let catalog = Catalog::connect(&self.mysql_url, &self.collection, model_name).await?;
        Ok((vectors, catalog))
    }
}

#[derive(Args, Clone, Debug)]
pub struct ModelArgs {
    /// ResNet50 feature extractor as ONNX (input [N,3,224,224], output [N,2048]).
    #[arg(long, env = "IMAGEINDEX_MODEL")]
    pub model: PathBuf,
    #[arg(long, env = "IMAGEINDEX_DEVICE", value_enum, default_value = "cpu")]
    pub device: Device,
    /// Inference threads; 0 = every core this process may use.
    #[arg(long, env = "IMAGEINDEX_THREADS", default_value_t = 0)]
    pub threads: usize,
    /// ONNX Runtime shared library (`libonnxruntime.so`).
    #[arg(long, env = "ORT_DYLIB_PATH")]
    pub ort_lib: Option<PathBuf>,
    /// Let idle inference threads spin (true/false); off yields cores to decoding and I/O.
    #[arg(long, env = "IMAGEINDEX_ORT_SPINNING", default_value_t = true, action = clap::ArgAction::Set)]
    pub ort_spinning: bool,
}

impl ModelArgs {
    pub fn load(&self) -> Result<Model> {
        let opts = ModelOptions {
            device: self.device,
            threads: self.threads,
            ort_lib: self.ort_lib.clone(),
            spinning: self.ort_spinning,
        };
        Model::load(&self.model, &opts)
    }

    /// The name recorded with each catalog row: which weights made the vector.
    pub fn name(&self) -> String {
        self.model.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
    }
}

#[derive(Args, Clone, Debug)]
pub struct SourceArgs {
    /// S3-compatible endpoint for s3:// URLs (MinIO, SeaweedFS...). Credentials come from
    /// AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY.
    #[arg(long, env = "IMAGEINDEX_S3_ENDPOINT")]
    pub s3_endpoint: Option<String>,
    /// Include globs, comma-separated (default: jpg, jpeg, png, webp anywhere).
    #[arg(long, env = "IMAGEINDEX_INCLUDE", value_delimiter = ',')]
    pub include: Vec<String>,
}

#[derive(Args, Clone, Debug)]
pub struct LimitArgs {
    /// Most pixels a decoded image may have; larger ones are refused before decoding.
    #[arg(long, env = "IMAGEINDEX_MAX_PIXELS", default_value_t = 64_000_000)]
    pub max_pixels: u64,
    /// Largest object (bytes) fetched for indexing.
    #[arg(long, env = "IMAGEINDEX_MAX_OBJECT_BYTES", default_value_t = 64 << 20)]
    pub max_object_bytes: u64,
}
