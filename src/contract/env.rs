//! The environment variables the binary reads: the contract between `imageindex` and the pods the
//! operator builds. Each name is written here once; the CLI's flags (`env = env::...`) and the
//! controller's builders both use these constants, and a test checks that every variable the
//! builders set is one the CLI reads.

// Shared by the data-plane commands (`config`).
pub const MILVUS_URL: &str = "IMAGEINDEX_MILVUS_URL";
pub const MILVUS_TOKEN: &str = "IMAGEINDEX_MILVUS_TOKEN";
pub const COLLECTION: &str = "IMAGEINDEX_COLLECTION";
pub const INDEX_TYPE: &str = "IMAGEINDEX_INDEX_TYPE";
pub const MYSQL_URL: &str = "IMAGEINDEX_MYSQL_URL";
pub const MAX_QUEUED_EMBEDDINGS: &str = "IMAGEINDEX_MAX_QUEUED_EMBEDDINGS";
pub const QUEUE_TIMEOUT_MS: &str = "IMAGEINDEX_QUEUE_TIMEOUT_MS";
pub const BODY_MEMORY_MIB: &str = "IMAGEINDEX_BODY_MEMORY_MIB";
pub const MAX_BATCH: &str = "IMAGEINDEX_MAX_BATCH";
pub const FOLLOW_SECONDS: &str = "IMAGEINDEX_FOLLOW_SECONDS";
pub const BATCH_WINDOW_MS: &str = "IMAGEINDEX_BATCH_WINDOW_MS";
pub const MYSQL_URL_FILE: &str = "IMAGEINDEX_MYSQL_URL_FILE";
pub const MILVUS_TOKEN_FILE: &str = "IMAGEINDEX_MILVUS_TOKEN_FILE";
pub const SOURCE_CREDENTIALS_DIR: &str = "IMAGEINDEX_SOURCE_CREDENTIALS_DIR";
pub const OWNER: &str = "IMAGEINDEX_OWNER";
pub const MODEL: &str = "IMAGEINDEX_MODEL";
pub const DEVICE: &str = "IMAGEINDEX_DEVICE";
pub const PRECISION: &str = "IMAGEINDEX_PRECISION";
pub const PREPROCESS: &str = "IMAGEINDEX_PREPROCESS";
pub const ALLOW_MIXED_PRECISION: &str = "IMAGEINDEX_ALLOW_MIXED_PRECISION";
pub const THREADS: &str = "IMAGEINDEX_THREADS";
pub const ORT_LIB: &str = "ORT_DYLIB_PATH";
pub const ORT_SPINNING: &str = "IMAGEINDEX_ORT_SPINNING";
pub const SESSIONS: &str = "IMAGEINDEX_SESSIONS";
pub const GPU_ID: &str = "IMAGEINDEX_GPU_ID";
pub const GPU_MEMORY_MIB: &str = "IMAGEINDEX_GPU_MEMORY_MIB";
pub const CUDA_NHWC: &str = "IMAGEINDEX_CUDA_NHWC";
pub const CUDA_MAX_WORKSPACE: &str = "IMAGEINDEX_CUDA_MAX_WORKSPACE";
pub const CUDA_TF32: &str = "IMAGEINDEX_CUDA_TF32";
pub const TRT_CACHE: &str = "IMAGEINDEX_TRT_CACHE";
pub const S3_ENDPOINT: &str = "IMAGEINDEX_S3_ENDPOINT";
pub const INCLUDE: &str = "IMAGEINDEX_INCLUDE";
pub const MAX_PIXELS: &str = "IMAGEINDEX_MAX_PIXELS";
pub const MAX_OBJECT_BYTES: &str = "IMAGEINDEX_MAX_OBJECT_BYTES";
pub const FAST_JPEG: &str = "IMAGEINDEX_FAST_JPEG";
pub const DECODE_MEMORY_MIB: &str = "IMAGEINDEX_DECODE_MEMORY_MIB";
pub const EXACT_MAX_PIXELS: &str = "IMAGEINDEX_EXACT_MAX_PIXELS";
pub const SOURCE: &str = "IMAGEINDEX_SOURCE";

// `index` and `embed`.
pub const BATCH_SIZE: &str = "IMAGEINDEX_BATCH_SIZE";
pub const FETCH_CONCURRENCY: &str = "IMAGEINDEX_FETCH_CONCURRENCY";
pub const DECODE_WORKERS: &str = "IMAGEINDEX_DECODE_WORKERS";
pub const MAX_DELETE_PERCENT: &str = "IMAGEINDEX_MAX_DELETE_PERCENT";
pub const REPAIR: &str = "IMAGEINDEX_REPAIR";
pub const ALLOW_MASS_DELETE: &str = "IMAGEINDEX_ALLOW_MASS_DELETE";
pub const GENERATION_GRACE: &str = "IMAGEINDEX_GENERATION_GRACE";
pub const GENERATION_KEEP: &str = "IMAGEINDEX_GENERATION_KEEP";
/// `plan` and `cleanup`: where the report goes (the pod's termination message).
pub const REPORT: &str = "IMAGEINDEX_REPORT";
/// Set by Kubernetes in an Indexed Job's pods.
pub const SHARD: &str = "JOB_COMPLETION_INDEX";
pub const SHARDS: &str = "IMAGEINDEX_SHARDS";
pub const PLAN: &str = "IMAGEINDEX_PLAN";

// `serve`.
pub const LISTEN: &str = "IMAGEINDEX_LISTEN";
pub const MAX_UPLOAD_BYTES: &str = "IMAGEINDEX_MAX_UPLOAD_BYTES";
pub const REQUEST_TIMEOUT: &str = "IMAGEINDEX_REQUEST_TIMEOUT";
pub const MAX_CONCURRENT_EMBEDDINGS: &str = "IMAGEINDEX_MAX_CONCURRENT_EMBEDDINGS";
pub const HEADER_TIMEOUT: &str = "IMAGEINDEX_HEADER_TIMEOUT";
pub const SHUTDOWN_DELAY_SECONDS: &str = "IMAGEINDEX_SHUTDOWN_DELAY_SECONDS";
pub const MAX_CONNECTIONS: &str = "IMAGEINDEX_MAX_CONNECTIONS";
pub const TOKEN_FILE: &str = "IMAGEINDEX_TOKEN_FILE";
pub const TOKEN: &str = "IMAGEINDEX_TOKEN";
pub const READ_TOKEN_FILE: &str = "IMAGEINDEX_READ_TOKEN_FILE";
pub const READ_TOKEN: &str = "IMAGEINDEX_READ_TOKEN";
pub const ALLOWED_IMAGES: &str = "IMAGEINDEX_ALLOWED_IMAGES";
pub const ALLOWED_SERVICE_ACCOUNTS: &str = "IMAGEINDEX_ALLOWED_SERVICE_ACCOUNTS";
pub const PROTECT_SEARCH: &str = "IMAGEINDEX_PROTECT_SEARCH";
pub const ALLOW_DROP: &str = "IMAGEINDEX_ALLOW_DROP";
pub const ALLOW_PRIVATE_URLS: &str = "IMAGEINDEX_ALLOW_PRIVATE_URLS";

// `controller`.
pub const IMAGE: &str = "IMAGEINDEX_IMAGE";
pub const WATCH_NAMESPACE: &str = "IMAGEINDEX_WATCH_NAMESPACE";
pub const METRICS_LISTEN: &str = "IMAGEINDEX_METRICS_LISTEN";
pub const POD_NAMESPACE: &str = "POD_NAMESPACE";
pub const LEASE_NAME: &str = "IMAGEINDEX_LEASE_NAME";
pub const POD_NAME: &str = "POD_NAME";
pub const IO_TIMEOUT: &str = "IMAGEINDEX_IO_TIMEOUT";
pub const PLAN_TIMEOUT: &str = "IMAGEINDEX_PLAN_TIMEOUT";
pub const CLEANUP_TIMEOUT: &str = "IMAGEINDEX_CLEANUP_TIMEOUT";

/// Read by the log filter (`telemetry`), not by a flag.
pub const LOG: &str = "RUST_LOG";
