//! An image encoder through ONNX Runtime (the `ort` crate, runtime library loaded at start-up):
//! ResNet50 by default, any other whose file takes `[N,3,crop,crop]` (its preprocessing profile's
//! crop) and returns `[N,D]` features. The width D is read from the model, never assumed; we
//! L2-normalise the vectors so that L2 and inner-product/cosine searches agree.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};

use ort::environment::Environment;
use ort::ep::{self, ExecutionProvider};
use ort::memory::{AllocationDevice, Allocator, AllocatorType, MemoryInfo, MemoryType};
use ort::session::{IoBinding, Session, builder::GraphOptimizationLevel};
use ort::value::{Tensor, TensorRef};

use crate::core::{ModelId, Precision, Preprocess};

/// ONNX metadata keys the project's scripts stamp on a model file (`hack/make-test-model.py`,
/// `hack/export-resnet50.py`, `hack/quantize.py`).
pub mod metadata {
    /// The fp32 model the file was made from (quantized variants keep their source's name).
    pub const SOURCE: &str = "imageindex.source";
    /// `fp32`, `fp16` or `int8`.
    pub const PRECISION: &str = "imageindex.precision";
    /// The preprocessing profile (`core::Preprocess`): a name or a declaration.
    pub const PREPROCESS: &str = "imageindex.preprocess";
}

/// Where the model runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Device {
    /// CUDA when ONNX Runtime has its CUDA provider and a GPU is visible, else the CPU.
    Auto,
    Cpu,
    /// ONNX Runtime's CUDA execution provider (the `onnxruntime-gpu` library); fails loudly if it
    /// cannot register rather than silently running on the CPU. TensorRT goes first where its
    /// libraries are present.
    Cuda,
}

/// Why a model cannot load or run.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// The runtime library, the model file or its metadata cannot be used as given; the message
    /// says what to do.
    #[error("{0}")]
    Setup(String),
    /// ONNX Runtime failed at `what`.
    #[error("{what}: {error}")]
    Runtime { what: String, error: ort::Error },
}

impl From<ort::Error> for ModelError {
    fn from(error: ort::Error) -> Self {
        Self::Runtime { what: "ONNX Runtime".into(), error }
    }
}

type Result<T, E = ModelError> = std::result::Result<T, E>;

/// `bail!` for setup errors.
macro_rules! setup {
    ($($arg:tt)*) => { return Err(ModelError::Setup(format!($($arg)*))) };
}

/// The file for `precision`: `model` itself when its name says nothing else, or the sibling
/// `<stem>.<precision>.onnx` that `hack/quantize.py` writes.
pub fn variant_path(model: &Path, precision: Precision) -> PathBuf {
    let name = model.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    if precision == Precision::Fp32 || name.contains(&format!(".{precision}.")) {
        return model.to_path_buf();
    }
    let stem = name.strip_suffix(".onnx").unwrap_or(&name);
    model.with_file_name(format!("{stem}.{precision}.onnx"))
}

impl std::str::FromStr for Device {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        <Self as clap::ValueEnum>::from_str(s, true)
    }
}

#[derive(Clone, Debug)]
pub struct ModelOptions {
    pub device: Device,
    pub precision: Precision,
    /// Intra-op threads for the CPU provider; 0 = every core this process may use.
    pub threads: usize,
    /// `libonnxruntime.so` to load; None = `ORT_DYLIB_PATH` or the system search path.
    pub ort_lib: Option<PathBuf>,
    /// Let ONNX Runtime's idle workers spin between operators. Fastest alone on the machine;
    /// off yields the cores to decoding and I/O that share them.
    pub spinning: bool,
    /// Sessions, i.e. batches that can be in the model at once; 0 = 1 on a CPU (one session
    /// already uses every core), 2 on a GPU (one batch copies while the other computes).
    pub sessions: usize,
    pub gpu: GpuOptions,
    /// The preprocessing declared by the user, for a file that records none; checked against the
    /// file's own where it records one. None = the file's, or torchvision's.
    pub preprocess: Option<Preprocess>,
}

impl Default for ModelOptions {
    fn default() -> Self {
        Self {
            preprocess: None,
            device: Device::Cpu,
            precision: Precision::Fp32,
            threads: 0,
            ort_lib: None,
            spinning: true,
            sessions: 0,
            gpu: GpuOptions::default(),
        }
    }
}

/// CUDA provider settings that matter for a convolution net: each is a flag (`--cuda-*`) so the
/// benchmark can A/B it per GPU; public ONNX Runtime issues report ResNet regressions with some.
#[derive(Clone, Debug)]
pub struct GpuOptions {
    pub device_id: i32,
    /// Bound of the CUDA memory arena in bytes; 0 = no bound.
    pub memory_limit: usize,
    /// NHWC convolution kernels (tensor cores prefer them; measure per GPU).
    pub prefer_nhwc: bool,
    /// Let cuDNN use its largest workspace for the fastest algorithm (ResNet regressed with it in
    /// some releases: measure).
    pub max_workspace: bool,
    /// TF32 tensor-core math for fp32 convolutions.
    pub tf32: bool,
    /// Where TensorRT keeps its engines and timing cache (building them takes minutes); None = no TensorRT.
    pub tensorrt_cache: Option<PathBuf>,
}

impl Default for GpuOptions {
    fn default() -> Self {
        Self { device_id: 0, memory_limit: 0, prefer_nhwc: true, max_workspace: true, tf32: true, tensorrt_cache: None }
    }
}

/// One ONNX Runtime session; on CUDA, with page-locked host buffers bound to its input and output.
struct Slot {
    session: Session,
    pinned: Option<Pinned>,
}

/// Reusable pinned buffers: the input tensor per batch size (the last batch of a run is smaller),
/// and an IO binding whose output lands in pinned memory, so host<->GPU copies are plain DMA.
struct Pinned {
    allocator: Allocator,
    output: MemoryInfo<'static>,
    inputs: HashMap<usize, Tensor<f32>>,
    binding: IoBinding,
}

pub struct Model {
    slots: Vec<Mutex<Slot>>,
    next: AtomicUsize,
    input: String,
    output: String,
    dim: usize,
    id: ModelId,
    device: Device,
}

static RUNTIME: OnceLock<Result<Environment, String>> = OnceLock::new();

/// Loads ONNX Runtime once per process.
fn runtime(lib: Option<&Path>) -> Result<Environment> {
    RUNTIME
        .get_or_init(|| {
            let lib = lib.map(Path::to_path_buf).or_else(|| std::env::var_os("ORT_DYLIB_PATH").map(PathBuf::from));
            let Some(lib) = lib else {
                return Err("ONNX Runtime library not set: pass --ort-lib or set ORT_DYLIB_PATH \
                            (hack/install.sh puts one in the cache venv)"
                    .into());
            };
            if !lib.exists() {
                return Err(format!("ONNX Runtime library {} does not exist", lib.display()));
            }
            ort::init_from(&lib)
                .map_err(|e| format!("loading {}: {e}", lib.display()))?
                .with_name("imageindex")
                .build()
                .map_err(|e| e.to_string())
        })
        .clone()
        .map_err(ModelError::Setup)
}

/// Cores this process may use: the cgroup CPU quota where there is one (a pod's limit), not the host's count.
pub fn available_cores() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}

/// Whether the TensorRT provider's own libraries (libnvinfer) can be found on the library path.
fn tensorrt_present() -> bool {
    let dirs = std::env::var("LD_LIBRARY_PATH").unwrap_or_default();
    dirs.split(':').chain(["/usr/lib/x86_64-linux-gnu", "/usr/local/lib"]).any(|d| {
        std::fs::read_dir(d)
            .is_ok_and(|mut e| e.any(|f| f.is_ok_and(|f| f.file_name().to_string_lossy().starts_with("libnvinfer.so"))))
    })
}

impl Model {
    pub fn load(model: &Path, opts: &ModelOptions) -> Result<Self> {
        let env = runtime(opts.ort_lib.as_deref())?;
        let path = &variant_path(model, opts.precision);
        if !path.exists() && path != model {
            setup!(
                "no {} variant of {} ({} does not exist): make one with hack/quantize.py {} --precision {} -o {}",
                opts.precision,
                model.display(),
                path.display(),
                model.display(),
                opts.precision,
                path.display()
            );
        }
        if !path.exists() {
            setup!(
                "model file {} does not exist (hack/make-test-model.py or hack/export-resnet50.py make one)",
                path.display()
            );
        }
        let device = match opts.device {
            Device::Auto => {
                let gpu = Path::new("/dev/nvidiactl").exists()
                    && <ep::CUDA as ExecutionProvider>::is_available().unwrap_or(false);
                if gpu { Device::Cuda } else { Device::Cpu }
            }
            d => d,
        };
        let sessions = match (opts.sessions, device) {
            (0, Device::Cuda) => 2,
            (0, _) => 1,
            (n, _) => n,
        };
        let slots = (0..sessions).map(|_| Self::session(&env, path, device, opts)).collect::<Result<Vec<_>>>()?;
        let session = &slots[0].session;
        let no = |what: &str| ModelError::Setup(format!("model {} has no {what}", path.display()));
        let input = session.inputs().first().ok_or_else(|| no("input"))?.name().to_string();
        let output = session.outputs().first().ok_or_else(|| no("output"))?.name().to_string();
        let id = {
            let meta = session.metadata()?;
            let file = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            let describe = |key: &str| meta.custom(key);
            describe_model(&file, describe, opts.precision, opts.preprocess)
                .map_err(|e| ModelError::Setup(format!("{}: {e}", path.display())))?
        };
        let slots = slots.into_iter().map(Mutex::new).collect();
        let mut model = Self { slots, next: AtomicUsize::new(0), input, output, dim: 0, id, device };
        // One dummy image per session tells us the output width and warms the kernels up.
        let c = model.id.preprocess.crop;
        for _ in 0..sessions {
            let probe = model.run(&vec![0.0; model.id.preprocess.tensor_len()], 1).map_err(|e| {
                ModelError::Setup(format!(
                    "model {} does not accept [1,3,{c},{c}] (its preprocessing is {}): {e}",
                    path.display(),
                    model.id.preprocess
                ))
            })?;
            model.dim = probe.len();
        }
        Ok(model)
    }

    fn session(env: &Environment, path: &Path, device: Device, opts: &ModelOptions) -> Result<Slot> {
        let threads = if opts.threads == 0 { available_cores() } else { opts.threads };
        // Builder errors carry the builder, which is not Send; keep only the message.
        let mut builder = Session::builder(env)?
            .with_optimization_level(GraphOptimizationLevel::Level3)
            .map_err(ort::Error::<()>::from)?
            .with_intra_threads(threads)
            .map_err(ort::Error::<()>::from)?
            .with_intra_op_spinning(opts.spinning)
            .map_err(ort::Error::<()>::from)?;
        if device == Device::Cuda {
            let g = &opts.gpu;
            let mut eps = vec![];
            if let Some(cache) = g.tensorrt_cache.as_ref().filter(|_| tensorrt_present()) {
                eps.push(
                    ep::TensorRT::default()
                        .with_device_id(g.device_id)
                        .with_fp16(opts.precision == Precision::Fp16)
                        .with_engine_cache(true)
                        .with_engine_cache_path(cache.display())
                        .with_timing_cache(true)
                        .with_timing_cache_path(cache.display())
                        .build(),
                );
            }
            let mut cuda = ep::CUDA::default()
                .with_device_id(g.device_id)
                .with_conv_algorithm_search(ep::cuda::ConvAlgorithmSearch::Exhaustive)
                .with_conv_max_workspace(g.max_workspace)
                .with_prefer_nhwc(g.prefer_nhwc)
                .with_tf32(g.tf32)
                .with_arena_extend_strategy(ep::ArenaExtendStrategy::SameAsRequested);
            if g.memory_limit > 0 {
                cuda = cuda.with_memory_limit(g.memory_limit);
            }
            eps.push(cuda.build().error_on_failure());
            builder = builder.with_execution_providers(eps).map_err(|e| ModelError::Runtime {
                what: "registering the CUDA execution provider (is onnxruntime-gpu's library loaded?)".into(),
                error: e.into(),
            })?;
        }
        let session = builder
            .commit_from_file(path)
            .map_err(|error| ModelError::Runtime { what: format!("loading model {}", path.display()), error })?;
        let pinned = if device == Device::Cuda {
            let host = |kind| MemoryInfo::new(AllocationDevice::CUDA_PINNED, 0, AllocatorType::Device, kind);
            Some(Pinned {
                allocator: Allocator::new(&session, host(MemoryType::CPUInput)?)?,
                output: host(MemoryType::CPUOutput)?,
                inputs: HashMap::new(),
                binding: session.create_binding()?,
            })
        } else {
            None
        };
        Ok(Slot { session, pinned })
    }

    /// Width of the embeddings, from the model's output (2048 for ResNet50, 512 for ResNet18).
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// How images are prepared for it.
    pub fn preprocess(&self) -> &Preprocess {
        &self.id.preprocess
    }

    /// Which vectors this model makes.
    pub fn id(&self) -> &ModelId {
        &self.id
    }

    /// Where it runs (`auto` resolved).
    pub fn device(&self) -> Device {
        self.device
    }

    /// Batches that can run at once.
    pub fn sessions(&self) -> usize {
        self.slots.len()
    }

    /// Runs `n` preprocessed images laid out back to back on a free session (or the next one in
    /// turn when all are busy); returns their raw outputs, flattened.
    fn run(&self, batch: &[f32], n: usize) -> Result<Vec<f32>> {
        assert_eq!(batch.len(), n * self.id.preprocess.tensor_len(), "batch buffer does not hold {n} images");
        let len = self.slots.len();
        let turn = self.next.fetch_add(1, Ordering::Relaxed) % len;
        let mut slot = (0..len).find_map(|k| self.slots[(turn + k) % len].try_lock().ok()).map_or_else(
            || self.slots[turn].lock().map_err(|_| ModelError::Setup("a model session panicked".into())),
            Ok,
        )?;
        let Slot { session, pinned } = &mut *slot;
        let c = self.id.preprocess.crop as usize;
        let outputs = match pinned {
            None => {
                let tensor = TensorRef::from_array_view(([n, 3, c, c], batch))?;
                session.run(ort::inputs![self.input.as_str() => tensor])?
            }
            Some(p) => {
                let input = match p.inputs.entry(n) {
                    std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                    std::collections::hash_map::Entry::Vacant(e) => {
                        e.insert(Tensor::<f32>::new(&p.allocator, [n, 3, c, c])?)
                    }
                };
                input.extract_tensor_mut().1.copy_from_slice(batch);
                p.binding.bind_input(self.input.as_str(), input)?;
                p.binding.bind_output_to_device(self.output.as_str(), &p.output)?;
                session.run_binding(&p.binding)?
            }
        };
        let (shape, data) = outputs[0].try_extract_tensor::<f32>()?;
        if shape.len() != 2 || shape[0] as usize != n {
            setup!("model output has shape {shape:?}, expected [{n}, D]");
        }
        Ok(data.to_vec())
    }

    /// Embeds `n` preprocessed images: one L2-normalised vector each. Callable from several
    /// threads: each call takes a session of its own.
    pub fn embed(&self, batch: &[f32], n: usize) -> Result<Vec<Vec<f32>>> {
        let flat = self.run(batch, n)?;
        let dim = flat.len() / n.max(1);
        Ok(flat.chunks_exact(dim).map(normalized).collect())
    }
}

/// Which vectors a model file makes, from its metadata (`describe` reads one key) and its file
/// name: its source model's name, its precision (which must be the one asked for), and its
/// preprocessing, which a user may declare (`declared`) for a file that records none, but never
/// change for one that does.
pub fn describe_model(
    file: &str,
    describe: impl Fn(&str) -> Option<String>,
    wanted: Precision,
    declared: Option<Preprocess>,
) -> Result<ModelId, String> {
    let precision = match describe(metadata::PRECISION) {
        Some(p) => p.parse().map_err(|e| format!("{} metadata: {e}", metadata::PRECISION))?,
        None => Precision::Fp32,
    };
    if precision != wanted {
        return Err(format!(
            "the model is {precision} (its {} metadata says so): run with --precision {precision}",
            metadata::PRECISION
        ));
    }
    let recorded = match describe(metadata::PREPROCESS) {
        Some(p) => Some(p.parse::<Preprocess>().map_err(|e| format!("{} metadata: {e}", metadata::PREPROCESS))?),
        None => None,
    };
    let preprocess = match (recorded, declared) {
        (Some(r), Some(d)) if r != d => {
            return Err(format!(
                "the model is prepared with {r} preprocessing (its {} metadata says so), not {d}: drop --preprocess \
                 or pass --preprocess {r}",
                metadata::PREPROCESS
            ));
        }
        (Some(p), _) | (None, Some(p)) => p,
        (None, None) => Preprocess::TORCHVISION,
    };
    Ok(ModelId { model: describe(metadata::SOURCE).unwrap_or_else(|| file.to_string()), precision, preprocess })
}

/// Which vectors the model file `model` makes at `precision` (read from that variant), and how
/// wide they are, from its header alone: the weights are skipped, not loaded.
pub fn describe_file(
    model: &Path,
    precision: Precision,
    declared: Option<Preprocess>,
) -> Result<(ModelId, usize), String> {
    let path = variant_path(model, precision);
    let header = super::onnx::read_header(&path)?;
    let file = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let id = describe_model(&file, |k| header.metadata.get(k).cloned(), precision, declared)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let width = header.output_width().ok_or_else(|| {
        format!(
            "{}: its output is {:?}, not [batch, width] with a fixed width: export it with a fixed output width",
            path.display(),
            header.output_shape
        )
    })?;
    Ok((id, width))
}

pub fn normalized(v: &[f32]) -> Vec<f32> {
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if norm > 0.0 { v.iter().map(|x| x / norm).collect() } else { v.to_vec() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn variants_sit_beside_the_fp32_model() {
        let m = Path::new("/models/resnet50.onnx");
        assert_eq!(variant_path(m, Precision::Fp32), m);
        assert_eq!(variant_path(m, Precision::Int8), Path::new("/models/resnet50.int8.onnx"));
        let given = Path::new("/models/resnet50.fp16.onnx");
        assert_eq!(variant_path(given, Precision::Fp16), given, "a variant named directly is used as is");
    }

    #[test]
    fn a_model_is_described_by_its_metadata_and_a_declaration_cannot_contradict_it() {
        let none = |_: &str| None;
        let bare = describe_model("m.onnx", none, Precision::Fp32, None).unwrap();
        assert_eq!(bare.to_string(), "m.onnx@fp32");
        let declared = describe_model("m.onnx", none, Precision::Fp32, Some(Preprocess::CLIP)).unwrap();
        assert_eq!(declared.to_string(), "m.onnx@fp32+clip");
        let stamped = |k: &str| match k {
            metadata::SOURCE => Some("clip-vit-b32.onnx".to_string()),
            metadata::PRECISION => Some("int8".to_string()),
            metadata::PREPROCESS => Some("clip".to_string()),
            _ => None,
        };
        assert_eq!(
            describe_model("x.int8.onnx", stamped, Precision::Int8, None).unwrap().to_string(),
            "clip-vit-b32.onnx@int8+clip"
        );
        assert!(
            describe_model("x.onnx", stamped, Precision::Int8, Some(Preprocess::CLIP)).is_ok(),
            "the same profile, declared"
        );
        let err = describe_model("x.onnx", stamped, Precision::Int8, Some(Preprocess::TORCHVISION)).unwrap_err();
        assert!(err.contains("prepared with clip") && err.contains("--preprocess clip"), "{err}");
        let err = describe_model("x.onnx", stamped, Precision::Fp32, None).unwrap_err();
        assert!(err.contains("model is int8") && err.contains("--precision int8"), "{err}");
        let bad = |k: &str| (k == metadata::PREPROCESS).then(|| "sharpen".to_string());
        let err = describe_model("x.onnx", bad, Precision::Fp32, None).unwrap_err();
        assert!(err.contains("imageindex.preprocess metadata"), "{err}");
    }
}
