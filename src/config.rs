//! Command-line and environment configuration shared by the subcommands. Every flag has an
//! environment variable, so the operator configures Job and Deployment pods through env
//! (credentials from Secrets), and a laptop through flags.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

use crate::core::{IndexKind, ModelId, Precision, Redacted};
use crate::embed::{DecodeLimits, Device, GpuOptions, Model, ModelOptions};
use crate::env;
use crate::store::{Index, MilvusConfig, Source, SourceConfig};

/// What every data-plane command (`index`, `embed`, `serve`) is configured with.
#[derive(Args, Clone, Debug)]
pub struct DataPlaneArgs {
    #[command(flatten)]
    pub backend: BackendArgs,
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub src: SourceArgs,
    #[command(flatten)]
    pub limits: LimitArgs,
}

#[derive(Args, Clone, Debug)]
pub struct BackendArgs {
    /// Milvus gRPC address.
    #[arg(long, env = env::MILVUS_URL, default_value = "http://127.0.0.1:19530")]
    pub milvus_url: String,
    /// Milvus credentials, `user:password`, where authentication is on.
    #[arg(long, env = env::MILVUS_TOKEN, hide_env_values = true)]
    pub milvus_token: Option<Redacted>,
    /// Milvus collection (also the catalog's namespace in MySQL).
    #[arg(long, env = env::COLLECTION, default_value = "imageindex")]
    pub collection: String,
    /// Vector index: HNSW with cosine similarity, or IVF_FLAT with L2 distance.
    #[arg(long, env = env::INDEX_TYPE, value_enum, default_value = "HNSW")]
    pub index_type: IndexKind,
    /// MySQL catalog, `mysql://user:password@host:3306/db`.
    #[arg(long, env = env::MYSQL_URL, hide_env_values = true)]
    pub mysql_url: Redacted,
    /// Who this run claims the collection for. A collection another owner holds is refused, so
    /// two indexes never share one by accident; the operator sets its ImageIndex here.
    #[arg(long, env = env::OWNER, default_value = crate::store::LOCAL_OWNER)]
    pub owner: String,
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

    /// Connects to Milvus and the catalog for vectors of `model`.
    pub async fn connect(&self, model: &ModelId) -> Result<Index> {
        Ok(Index::connect(&self.milvus(), self.mysql_url.expose(), model).await?)
    }
}

#[derive(Args, Clone, Debug)]
pub struct ModelArgs {
    /// ResNet50 feature extractor as ONNX (input [N,3,224,224], output [N,2048]).
    #[arg(long, env = env::MODEL)]
    pub model: PathBuf,
    #[arg(long, env = env::DEVICE, value_enum, default_value = "cpu")]
    pub device: Device,
    /// Model precision: fp32 (the --model file), or the fp16/int8 variant beside it
    /// (`<stem>.<precision>.onnx`, made by hack/quantize.py).
    #[arg(long, env = env::PRECISION, value_enum, default_value = "fp32")]
    pub precision: Precision,
    /// Let vectors of another precision of the same model into a collection (only where the parity
    /// check shows they retrieve alike).
    #[arg(long, env = env::ALLOW_MIXED_PRECISION)]
    pub allow_mixed_precision: bool,
    /// Inference threads; 0 = every core this process may use.
    #[arg(long, env = env::THREADS, default_value_t = 0)]
    pub threads: usize,
    /// ONNX Runtime shared library (`libonnxruntime.so`).
    #[arg(long, env = env::ORT_LIB)]
    pub ort_lib: Option<PathBuf>,
    /// Let idle inference threads spin (true/false); off yields cores to decoding and I/O.
    #[arg(long, env = env::ORT_SPINNING, default_value_t = true, action = clap::ArgAction::Set)]
    pub ort_spinning: bool,
    /// Model sessions, i.e. batches in the model at once; 0 = 1 on a CPU, 2 on a GPU.
    #[arg(long, env = env::SESSIONS, default_value_t = 0)]
    pub sessions: usize,
    /// CUDA: which GPU.
    #[arg(long, env = env::GPU_ID, default_value_t = 0)]
    pub gpu_id: i32,
    /// CUDA: bound of the GPU memory arena in MiB; 0 = no bound.
    #[arg(long, env = env::GPU_MEMORY_MIB, default_value_t = 0)]
    pub gpu_memory_mib: usize,
    /// CUDA: NHWC convolution kernels (true/false).
    #[arg(long, env = env::CUDA_NHWC, default_value_t = true, action = clap::ArgAction::Set)]
    pub cuda_nhwc: bool,
    /// CUDA: cuDNN's largest workspace for the fastest convolution algorithms (true/false).
    #[arg(long, env = env::CUDA_MAX_WORKSPACE, default_value_t = true, action = clap::ArgAction::Set)]
    pub cuda_max_workspace: bool,
    /// CUDA: TF32 tensor-core math for fp32 (true/false).
    #[arg(long, env = env::CUDA_TF32, default_value_t = true, action = clap::ArgAction::Set)]
    pub cuda_tf32: bool,
    /// TensorRT engine and timing cache directory; TensorRT is used (before CUDA) when set and its
    /// libraries (libnvinfer) are on the library path.
    #[arg(long, env = env::TRT_CACHE)]
    pub trt_cache: Option<PathBuf>,
}

impl ModelArgs {
    pub fn load(&self) -> Result<Model> {
        let opts = ModelOptions {
            device: self.device,
            precision: self.precision,
            threads: self.threads,
            ort_lib: self.ort_lib.clone(),
            spinning: self.ort_spinning,
            sessions: self.sessions,
            gpu: GpuOptions {
                device_id: self.gpu_id,
                memory_limit: self.gpu_memory_mib << 20,
                prefer_nhwc: self.cuda_nhwc,
                max_workspace: self.cuda_max_workspace,
                tf32: self.cuda_tf32,
                tensorrt_cache: self.trt_cache.clone(),
            },
        };
        Ok(Model::load(&self.model, &opts)?)
    }
}

#[derive(Args, Clone, Debug)]
pub struct SourceArgs {
    /// The store's endpoint: an S3-compatible server for s3:// (MinIO, SeaweedFS...), the account
    /// URL for az:// (Azurite), the XML API for gs://. Credentials come from the environment
    /// (AWS_*, AZURE_STORAGE_*, GOOGLE_*).
    #[arg(long, env = env::S3_ENDPOINT)]
    pub s3_endpoint: Option<String>,
    /// Include globs, comma-separated (default: jpg, jpeg, png, webp anywhere).
    #[arg(long, env = env::INCLUDE, value_delimiter = ',')]
    pub include: Vec<String>,
}

#[derive(Args, Clone, Debug)]
pub struct LimitArgs {
    /// Most pixels a decoded image may have; larger ones are refused before decoding.
    #[arg(long, env = env::MAX_PIXELS, default_value_t = 64_000_000)]
    pub max_pixels: u64,
    /// Largest object (bytes) fetched for indexing.
    #[arg(long, env = env::MAX_OBJECT_BYTES, default_value_t = 64 << 20)]
    pub max_object_bytes: u64,
    /// Decode JPEGs of at least 512 px on the shorter side at reduced scale in the DCT domain:
    /// several times less decode work for large photos, embeddings slightly off the exact path's.
    #[arg(long, env = env::FAST_JPEG)]
    pub fast_jpeg: bool,
    /// Memory all decodes at once may take, in MiB: each reserves its peak (read from the
    /// header) before it starts, and waits (index, embed) or is turned away with 503 (serve).
    #[arg(long, env = env::DECODE_MEMORY_MIB, default_value_t = 512)]
    pub decode_memory_mib: u64,
    /// JPEGs above this many pixels decode at a DCT scale (shorter side kept at 512 or more).
    #[arg(long, env = env::EXACT_MAX_PIXELS, default_value_t = DecodeLimits::default().exact_max_pixels)]
    pub exact_max_pixels: u64,
}

impl LimitArgs {
    pub fn decode(&self) -> DecodeLimits {
        DecodeLimits { max_pixels: self.max_pixels, fast_jpeg: self.fast_jpeg, exact_max_pixels: self.exact_max_pixels }
    }
}

impl SourceArgs {
    /// The source at `url`, with these settings; credentials from the environment.
    pub fn open(&self, url: String) -> Result<Source> {
        let config =
            SourceConfig { url, endpoint: self.s3_endpoint.clone(), include: self.include.clone(), credentials: None };
        Ok(Source::open(&config)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        backend: BackendArgs,
    }

    #[test]
    fn credentials_never_show_in_debug_output() {
        let cli = Cli::parse_from(["x", "--mysql-url", "mysql://u:hunter2@db/x", "--milvus-token", "root:hunter3"]);
        let serve = crate::serve::ServeConfig { token: Some("hunter4".into()), ..Default::default() };
        let printed = format!("{:?} {:?} {serve:?}", cli.backend, cli.backend.milvus());
        for secret in ["hunter2", "hunter3", "hunter4"] {
            assert!(!printed.contains(secret), "{secret} in {printed}");
        }
        assert_eq!(cli.backend.mysql_url.expose(), "mysql://u:hunter2@db/x");
    }
}
