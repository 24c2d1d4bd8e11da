//! ResNet50 through ONNX Runtime (the `ort` crate, runtime library loaded at start-up).
//! The ONNX file takes `[N,3,224,224]` and returns pooled `[N,2048]` features (fc removed);
//! we L2-normalise them so that L2 and inner-product/cosine searches agree.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use anyhow::{Context, Result, bail};
use ort::environment::Environment;
use ort::ep;
use ort::session::{Session, builder::GraphOptimizationLevel};
use ort::value::TensorRef;

use super::preprocess::{CROP, TENSOR_LEN};

/// Where the model runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Device {
    Cpu,
    /// ONNX Runtime's CUDA execution provider (the `onnxruntime-gpu` library); fails loudly if it
    /// cannot register rather than silently running on the CPU.
    Cuda,
}

#[derive(Clone, Debug)]
pub struct ModelOptions {
    pub device: Device,
    /// Intra-op threads for the CPU provider; 0 = every core this process may use.
    pub threads: usize,
    /// `libonnxruntime.so` to load; None = `ORT_DYLIB_PATH` or the system search path.
    pub ort_lib: Option<PathBuf>,
    /// Let ONNX Runtime's idle workers spin between operators. Fastest alone on the machine;
    /// off yields the cores to decoding and I/O that share them.
    pub spinning: bool,
}

impl Default for ModelOptions {
    fn default() -> Self {
        Self { device: Device::Cpu, threads: 0, ort_lib: None, spinning: true }
    }
}

pub struct Model {
    session: Session,
    input: String,
    dim: usize,
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
        .map_err(anyhow::Error::msg)
}

/// Cores this process may use: the cgroup CPU quota where there is one (a pod's limit), not the host's count.
pub fn available_cores() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}

impl Model {
    pub fn load(path: &Path, opts: &ModelOptions) -> Result<Self> {
        let env = runtime(opts.ort_lib.as_deref())?;
        if !path.exists() {
            bail!(
                "model file {} does not exist (hack/make-test-model.py or hack/export-resnet50.py make one)",
                path.display()
            );
        }
        let threads = if opts.threads == 0 { available_cores() } else { opts.threads };
        // Builder errors carry the builder, which is not Send; keep only the message.
        let mut builder = Session::builder(&env)?
            .with_optimization_level(GraphOptimizationLevel::Level3)
            .map_err(ort::Error::<()>::from)?
            .with_intra_threads(threads)
            .map_err(ort::Error::<()>::from)?
            .with_intra_op_spinning(opts.spinning)
            .map_err(ort::Error::<()>::from)?;
        if opts.device == Device::Cuda {
            builder = builder
                .with_execution_providers([ep::CUDA::default().build().error_on_failure()])
                .map_err(ort::Error::<()>::from)
                .context("registering the CUDA execution provider (is onnxruntime-gpu's library loaded?)")?;
        }
        let session = builder.commit_from_file(path).with_context(|| format!("loading model {}", path.display()))?;
        let input = session.inputs().first().context("model has no input")?.name().to_string();
        let mut model = Self { session, input, dim: 0 };
        // One dummy image tells us the output width and warms the kernels up.
        let probe = model.run(&vec![0.0; TENSOR_LEN], 1).context("model does not accept [1,3,224,224]")?;
        model.dim = probe.len();
        Ok(model)
    }

    /// Width of the embeddings (2048 for ResNet50).
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// Runs `n` preprocessed images laid out back to back; returns their raw outputs, flattened.
    fn run(&mut self, batch: &[f32], n: usize) -> Result<Vec<f32>> {
        assert_eq!(batch.len(), n * TENSOR_LEN, "batch buffer does not hold {n} images");
        let c = CROP as usize;
        let tensor = TensorRef::from_array_view(([n, 3, c, c], batch))?;
        let outputs = self.session.run(ort::inputs![self.input.as_str() => tensor])?;
        let (shape, data) = outputs[0].try_extract_tensor::<f32>()?;
        if shape.len() != 2 || shape[0] as usize != n {
            bail!("model output has shape {shape:?}, expected [{n}, D]");
        }
        Ok(data.to_vec())
    }

    /// Embeds `n` preprocessed images: one L2-normalised vector each.
    pub fn embed(&mut self, batch: &[f32], n: usize) -> Result<Vec<Vec<f32>>> {
        let flat = self.run(batch, n)?;
        let dim = flat.len() / n.max(1);
        Ok(flat.chunks_exact(dim).map(normalized).collect())
    }
}

pub fn normalized(v: &[f32]) -> Vec<f32> {
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if norm > 0.0 { v.iter().map(|x| x / norm).collect() } else { v.to_vec() }
}
