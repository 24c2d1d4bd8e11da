//! Command-line and environment configuration shared by the subcommands. Every flag has an
//! environment variable, so the operator configures Job and Deployment pods through env
//! (credentials from Secrets), and a laptop through flags.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;

use crate::bucket::{Source, SourceConfig};
use crate::contract::env;
use crate::core::{IndexKind, ModelId, Precision, Preprocess, Redacted};
use crate::embed::{DecodeLimits, Device, GpuOptions, Model, ModelOptions};
use crate::index::Index;
use crate::store::MilvusConfig;

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
    /// A file holding the Milvus credentials, over `--milvus-token` (a mounted Secret; `serve`
    /// reads it again when it changes).
    #[arg(long, env = env::MILVUS_TOKEN_FILE)]
    pub milvus_token_file: Option<PathBuf>,
    /// Milvus collection (also the catalog's namespace in MySQL).
    #[arg(long, env = env::COLLECTION, default_value = "imageindex")]
    pub collection: String,
    /// Vector index: HNSW with cosine similarity, or IVF_FLAT with L2 distance.
    #[arg(long, env = env::INDEX_TYPE, value_enum, default_value = "HNSW")]
    pub index_type: IndexKind,
    /// MySQL catalog, `mysql://user:password@host:3306/db`.
    #[arg(long, env = env::MYSQL_URL, hide_env_values = true, required_unless_present = "mysql_url_file")]
    pub mysql_url: Option<Redacted>,
    /// A file holding the catalog URL, over `--mysql-url` (a mounted Secret; `serve` reads it
    /// again when it changes).
    #[arg(long, env = env::MYSQL_URL_FILE)]
    pub mysql_url_file: Option<PathBuf>,
    /// Who this run claims the collection for. A collection another owner holds is refused, so
    /// two indexes never share one by accident; the operator sets its ImageIndex here.
    #[arg(long, env = env::OWNER, default_value = crate::index::LOCAL_OWNER)]
    pub owner: String,
}

impl BackendArgs {
    /// The catalog URL, from the flag or read from its file now.
    pub fn mysql_url(&self) -> Result<Redacted> {
        match (&self.mysql_url, &self.mysql_url_file) {
            (_, Some(file)) => read_secret_file(file),
            (Some(url), None) => Ok(url.clone()),
            (None, None) => anyhow::bail!("--mysql-url or --mysql-url-file is required"),
        }
    }

    /// The Milvus credentials, from the flag or read from their file now.
    pub fn milvus_token(&self) -> Result<Option<Redacted>> {
        match &self.milvus_token_file {
            Some(file) => read_secret_file(file).map(Some),
            None => Ok(self.milvus_token.clone()),
        }
    }

    pub fn milvus(&self) -> Result<MilvusConfig> {
        Ok(self.milvus_config(self.milvus_token()?))
    }

    pub fn milvus_config(&self, token: Option<Redacted>) -> MilvusConfig {
        MilvusConfig {
            url: self.milvus_url.clone(),
            token,
            collection: self.collection.clone(),
            index: self.index_type,
        }
    }

    /// Connects to Milvus and the catalog for vectors of `model`.
    pub async fn connect(&self, model: &ModelId) -> Result<Index> {
        Ok(Index::connect(&self.milvus()?, self.mysql_url()?.expose(), model).await?)
    }
}

/// A credential in a file (a key of a mounted Secret), without the line break an editor leaves.
fn read_secret_file(file: &std::path::Path) -> Result<Redacted> {
    let text = std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    Ok(Redacted::new(text.trim_end_matches(['\r', '\n'])))
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
    /// How images are prepared for the model, for a file that does not record it in its
    /// `imageindex.preprocess` metadata: `torchvision` (ResNet: resize 256 bilinear, crop 224,
    /// ImageNet mean/std; the default), `clip` (resize 224 bicubic, crop 224, CLIP mean/std), or
    /// `resize=N,crop=N,filter=bilinear|bicubic,mean=R/G/B,std=R/G/B`. A file that records one
    /// refuses another.
    #[arg(long, env = env::PREPROCESS)]
    pub preprocess: Option<Preprocess>,
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
        Ok(Model::load(&self.model, &self.options())?)
    }

    /// The model a collection's vectors came from (`id`): its file beside `--model` (a folder of
    /// models, as a search server that follows the index's generations needs), loaded with these
    /// options at its precision and preprocessing, and checked to be that model.
    pub fn load_for(&self, id: &ModelId) -> Result<Model> {
        // A name from the catalog, so never a path: only a file beside `--model`.
        anyhow::ensure!(
            !id.model.is_empty() && !id.model.contains(['/', '\\']) && id.model != "..",
            "the index's model is recorded as {:?}, which is not a file name",
            id.model
        );
        let path = self.model.with_file_name(&id.model);
        let opts = ModelOptions { precision: id.precision, preprocess: Some(id.preprocess), ..self.options() };
        let loaded = Model::load(&path, &opts).with_context(|| {
            format!("loading {id}, the model of the index's vectors, from {} (beside --model)", path.display())
        })?;
        loaded.id().check(id, false, &format!("{}", path.display()))?;
        Ok(loaded)
    }

    /// Which vectors `--model` makes, from its file's header (nothing loaded).
    pub fn describe(&self) -> Result<ModelId> {
        crate::embed::describe_file(&self.model, self.precision, self.preprocess)
            .map(|(id, _)| id)
            .map_err(anyhow::Error::msg)
    }

    fn options(&self) -> ModelOptions {
        ModelOptions {
            preprocess: self.preprocess,
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
        }
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
    /// A folder of the store's settings, one file per variable named as in the environment
    /// (`AWS_SECRET_ACCESS_KEY`, `AZURE_STORAGE_ACCOUNT_KEY`...): a mounted Secret, which `serve`
    /// reads again when it changes. They take precedence over the environment.
    #[arg(long, env = env::SOURCE_CREDENTIALS_DIR)]
    pub credentials_dir: Option<PathBuf>,
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
    /// The source at `url`, with these settings; credentials from the environment and the
    /// credentials folder as it is now.
    pub fn open(&self, url: String) -> Result<Source> {
        self.open_with(url, self.settings()?)
    }

    /// The source at `url` with these settings (`settings` as `settings()` reads them).
    pub fn open_with(&self, url: String, settings: Vec<(String, Redacted)>) -> Result<Source> {
        let config = SourceConfig { url, endpoint: self.s3_endpoint.clone(), include: self.include.clone(), settings };
        Ok(Source::open(&config)?)
    }

    /// The credentials folder's variables, sorted by name. Kubernetes keeps its own entries
    /// (`..data`, `..2026_...`) beside the keys; names starting with `.` are not keys.
    pub fn settings(&self) -> Result<Vec<(String, Redacted)>> {
        let Some(dir) = &self.credentials_dir else { return Ok(vec![]) };
        let mut out = Vec::new();
        for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
            let path = entry?.path();
            let Some(name) = path.file_name().and_then(|n| n.to_str()).filter(|n| !n.starts_with('.')) else {
                continue;
            };
            if path.is_file() {
                out.push((name.to_string(), read_secret_file(&path)?));
            }
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
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

    #[derive(Parser)]
    struct ModelCli {
        #[command(flatten)]
        model: ModelArgs,
    }

    /// A generation's model is named by the catalog, which is input like any other: only a file
    /// beside `--model` is ever loaded for it.
    #[test]
    fn a_generations_model_is_only_a_file_beside_the_model() {
        let cli = ModelCli::parse_from(["x", "--model", "/models/resnet50.onnx"]);
        for name in ["../etc/secret.onnx", "sub/model.onnx", "..\\model.onnx", "..", ""] {
            let id = ModelId { model: name.into(), .."resnet18.onnx@fp32".parse::<ModelId>().unwrap() };
            let err = cli.model.load_for(&id).err().unwrap_or_else(|| panic!("{name:?} was loaded"));
            assert!(err.to_string().contains("which is not a file name"), "{name:?}: {err:#}");
        }
    }

    #[test]
    fn credentials_never_show_in_debug_output() {
        let cli = Cli::parse_from(["x", "--mysql-url", "mysql://u:hunter2@db/x", "--milvus-token", "root:hunter3"]);
        let serve = crate::serve::ServeConfig { token: Some("hunter4".into()), ..Default::default() };
        let printed = format!("{:?} {:?} {serve:?}", cli.backend, cli.backend.milvus());
        for secret in ["hunter2", "hunter3", "hunter4"] {
            assert!(!printed.contains(secret), "{secret} in {printed}");
        }
        assert_eq!(cli.backend.mysql_url().unwrap().expose(), "mysql://u:hunter2@db/x");
    }

    /// Credentials from a mounted Secret: read when asked (so a rotation is seen), without the
    /// trailing newline, and the kubelet's own entries are not keys.
    #[test]
    fn credentials_come_from_secret_files_as_they_are_now() {
        let dir = std::env::temp_dir().join(format!("imageindex-creds-{}", std::process::id()));
        let keys = dir.join("..2026_12_05_10_00_00.1");
        std::fs::create_dir_all(&keys).unwrap();
        std::fs::write(keys.join("AWS_SECRET_ACCESS_KEY"), "s3cret\n").unwrap();
        std::os::unix::fs::symlink(&keys, dir.join("..data")).unwrap();
        std::os::unix::fs::symlink("..data/AWS_SECRET_ACCESS_KEY", dir.join("AWS_SECRET_ACCESS_KEY")).unwrap();
        std::fs::write(dir.join("url"), "mysql://u:one@db/x\n").unwrap();
        let url = dir.join("url").display().to_string();
        let cli = Cli::parse_from(["x", "--mysql-url-file", &url]);
        assert_eq!(cli.backend.mysql_url().unwrap().expose(), "mysql://u:one@db/x");
        std::fs::write(dir.join("url"), "mysql://u:two@db/x").unwrap();
        assert_eq!(cli.backend.mysql_url().unwrap().expose(), "mysql://u:two@db/x");
        // The file wins over the flag or the environment (which CI's tests have set).
        let both = Cli::parse_from(["x", "--mysql-url", "mysql://u:flag@db/x", "--mysql-url-file", &url]);
        assert_eq!(both.backend.mysql_url().unwrap().expose(), "mysql://u:two@db/x");

        let src = SourceArgs { s3_endpoint: None, include: vec![], credentials_dir: Some(dir.clone()) };
        let settings: Vec<(String, String)> =
            src.settings().unwrap().into_iter().map(|(k, v)| (k, v.expose().to_string())).collect();
        assert_eq!(
            settings,
            [("AWS_SECRET_ACCESS_KEY".to_string(), "s3cret".to_string()), ("url".into(), "mysql://u:two@db/x".into())]
        );
        std::fs::remove_dir_all(dir).unwrap();
    }
}
