//! A generator exported to ONNX, loaded into an ONNX Runtime session.
//!
//! The contract (what sagan-export writes): input `z` float32 `[batch, z_dim]`, for a
//! class-conditional model also `class` int64 `[batch]` (with `sagan.num_classes` metadata),
//! output `image` float32 `[batch, C, H, W]` in [-1, 1], optional outputs `attention_<i>`
//! float32 `[batch, N, M]` (M = N, or N/4 with pooled keys), and `sagan.*` metadata. A plain
//! generator (one float `[batch, z]` input, one 4-D output, no metadata) is accepted when its
//! z size is known.

use super::gpu;
use super::metadata::SaganMetadata;
use super::runtime::Runtime;
use super::{InferError, InferResult, INSTALL_GPU};
use crate::image_io::MapGrid;
use ort::ep::{self, ExecutionProvider, ExecutionProviderDispatch};
use ort::session::builder::GraphOptimizationLevel;
use ort::session::{Session, SessionOutputs};
use ort::value::{TensorElementType, TensorRef, ValueType};
use std::collections::BTreeMap;

/// The class input of a class-conditional export.
pub const CLASS_INPUT: &str = "class";
use std::path::{Path, PathBuf};

/// Options of the TensorRT execution provider.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TensorRtOptions {
    pub device_id: i32,
    /// Where built engines (and the timing cache) are kept: building one takes seconds to
    /// minutes, loading it milliseconds.
    pub cache_dir: Option<PathBuf>,
    pub fp16: bool,
    /// Batch sizes (min, opt, max) of the optimisation profile; engines are built for this range.
    pub batch_profile: Option<[usize; 3]>,
}

/// The execution provider a session must run on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Provider {
    Cpu,
    Cuda { device_id: i32 },
    TensorRt(TensorRtOptions),
}

impl Provider {
    pub fn name(&self) -> &'static str {
        match self {
            Provider::Cpu => "cpu",
            Provider::Cuda { .. } => "cuda",
            Provider::TensorRt(_) => "tensorrt",
        }
    }

    /// True for providers that only the GPU build of ONNX Runtime has.
    pub fn needs_gpu_runtime(&self) -> bool {
        !matches!(self, Provider::Cpu)
    }

    /// The providers to register, every one strict (`error_on_failure`): ort's default is to
    /// log and quietly run on the CPU, which would make `--provider cuda` a lie.
    /// `batch_inputs` are the inputs with a symbolic batch and their other dimensions, for
    /// TensorRT's optimisation profile.
    /// The GPU libraries are loaded and the device checked first (see [`super::gpu`]), so that
    /// a failure names what is missing.
    pub(crate) fn dispatches(
        &self,
        runtime: &Runtime,
        batch_inputs: &[(&str, &[usize])],
    ) -> InferResult<Vec<ExecutionProviderDispatch>> {
        self.prepare_gpu(runtime)?;
        // TF32 (ONNX Runtime's default on Ampere and newer) rounds fp32 matmuls and convolutions
        // to 10-bit mantissas: --provider cuda would no longer compute what the CPU does.
        let cuda = |device_id: i32| {
            ep::CUDA::default()
                .with_device_id(device_id)
                .with_tf32(false)
                .build()
                .error_on_failure()
        };
        Ok(match self {
            Provider::Cpu => Vec::new(),
            Provider::Cuda { device_id } => vec![cuda(*device_id)],
            Provider::TensorRt(trt) => {
                let mut provider = ep::TensorRT::default()
                    .with_device_id(trt.device_id)
                    .with_fp16(trt.fp16);
                if let Some(dir) = &trt.cache_dir {
                    std::fs::create_dir_all(dir).map_err(|e| InferError::Provider {
                        provider: "tensorrt",
                        msg: format!("cannot create engine cache {}: {e}", dir.display()),
                        hint: String::new(),
                    })?;
                    let dir = dir.display().to_string();
                    provider = provider
                        .with_engine_cache(true)
                        .with_engine_cache_path(&dir)
                        .with_timing_cache(true)
                        .with_timing_cache_path(&dir);
                }
                // A profile only makes sense for a symbolic batch dimension.
                if let (Some([min, opt, max]), false) = (trt.batch_profile, batch_inputs.is_empty())
                {
                    let shape = |b: usize| {
                        let per_input: Vec<String> = batch_inputs
                            .iter()
                            .map(|(name, rest)| {
                                let dims: Vec<String> = std::iter::once(b)
                                    .chain(rest.iter().copied())
                                    .map(|d| d.to_string())
                                    .collect();
                                format!("{name}:{}", dims.join("x"))
                            })
                            .collect();
                        per_input.join(",")
                    };
                    provider = provider
                        .with_profile_min_shapes(shape(min))
                        .with_profile_opt_shapes(shape(opt))
                        .with_profile_max_shapes(shape(max));
                }
                // CUDA runs whatever TensorRT does not take; both must work.
                vec![provider.build().error_on_failure(), cuda(trt.device_id)]
            }
        })
    }
}

impl Provider {
    /// Loads the libraries of a GPU provider and checks the device, where the loaded ONNX
    /// Runtime has the provider; a CPU-only runtime is left to say so itself on registration.
    fn prepare_gpu(&self, runtime: &Runtime) -> InferResult<()> {
        let (compiled_in, device_id) = match self {
            Provider::Cpu => return Ok(()),
            Provider::Cuda { device_id } => (ep::CUDA::is_available(), *device_id),
            Provider::TensorRt(trt) => (ep::TensorRT::is_available(), trt.device_id),
        };
        if !compiled_in.unwrap_or(false) {
            return Ok(());
        }
        gpu::prepare(runtime.gpu_libraries(), self, device_id)
            .map_err(|msg| provider_error(runtime, self, msg))
    }
}

/// How to load a generator.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    pub provider: Provider,
    /// Run on the CPU (with a warning) when `provider` cannot be used.
    pub fallback_cpu: bool,
    /// Intra-op threads; ONNX Runtime's default (one per core) when `None`.
    pub threads: Option<usize>,
    /// The z size, for plain generators whose files do not say.
    pub z_dim: Option<usize>,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            provider: Provider::Cpu,
            fallback_cpu: false,
            threads: None,
            z_dim: None,
        }
    }
}

/// The outputs of one [`Generator::generate`] call.
#[derive(Clone, Debug)]
pub struct Generated {
    pub n: usize,
    pub channels: usize,
    pub height: usize,
    pub width: usize,
    /// `[n, channels, height, width]`, in [-1, 1].
    pub images: Vec<f32>,
    /// One per attention output of the model, in output order.
    pub attention: Vec<AttentionMaps>,
}

/// One self-attention layer's maps: `[n, N, M]` over the query and key grids, row = query
/// position.
#[derive(Clone, Debug)]
pub struct AttentionMaps {
    pub name: String,
    pub grid: MapGrid,
    pub maps: Vec<f32>,
}

impl AttentionMaps {
    /// Values per image.
    pub fn per_image(&self) -> usize {
        let ((qh, qw), (kh, kw)) = (self.grid.queries, self.grid.keys);
        qh * qw * kh * kw
    }
}

/// A validated generator session.
pub struct Generator {
    path: PathBuf,
    session: Session,
    provider: &'static str,
    metadata: SaganMetadata,
    z_input: String,
    /// The int64 [batch] class input of a class-conditional model.
    class_input: Option<String>,
    num_classes: usize,
    image_output: String,
    attention_outputs: Vec<String>,
    z_dim: usize,
    /// `Some(b)` when the file fixes the batch size: [`Generator::generate`] then runs in
    /// batches of exactly `b`, padding the last one.
    fixed_batch: Option<usize>,
    /// (channels, height, width).
    image_shape: [usize; 3],
    attention_grids: Vec<MapGrid>,
}

impl std::fmt::Debug for Generator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Generator")
            .field("path", &self.path)
            .field("provider", &self.provider)
            .field("z_dim", &self.z_dim)
            .field("image_shape", &self.image_shape)
            .field("num_classes", &self.num_classes)
            .field("attention_grids", &self.attention_grids)
            .finish_non_exhaustive()
    }
}

/// What the model's declared inputs and outputs say, before any run.
struct Signature {
    z_input: String,
    z_dim: usize,
    /// The class input and the number of classes, for a class-conditional model.
    class_input: Option<(String, usize)>,
    fixed_batch: Option<usize>,
    image_output: String,
    /// Declared (channels, height, width); `None` where symbolic and not in the metadata.
    image_shape: [Option<usize>; 3],
    attention_outputs: Vec<String>,
    /// Declared (queries, keys) of each attention output.
    attention_n: Vec<MapDims>,
}

/// Declared (queries, keys) of an attention output; `None` where symbolic.
type MapDims = (Option<usize>, Option<usize>);

impl Generator {
    /// Loads `path` on `options.provider`, validates it against the sagan export contract and,
    /// when the file leaves a picture dimension open, finds it with one run on zeros.
    pub fn load(runtime: &Runtime, path: &Path, options: &LoadOptions) -> InferResult<Self> {
        let model_err = |msg: String| InferError::Model {
            path: path.to_path_buf(),
            msg,
        };
        match std::fs::metadata(path) {
            Ok(m) if m.is_file() => {}
            Ok(_) => return Err(model_err("not a file".into())),
            Err(e) => return Err(model_err(format!("cannot read the model: {e}"))),
        }

        // The model is parsed and checked on the CPU first: errors about the file then read the
        // same whatever the provider, and TensorRT's profile needs the z size up front.
        let cpu = LoadOptions {
            provider: Provider::Cpu,
            ..options.clone()
        };
        let (cpu_session, metadata, signature) = {
            let session = build_session(runtime, path, &cpu)?;
            let metadata = read_metadata(&session).map_err(model_err)?;
            let signature = inspect(&session, &metadata, options.z_dim).map_err(model_err)?;
            (session, metadata, signature)
        };

        let (session, provider) = match &options.provider {
            Provider::Cpu => (cpu_session, "cpu"),
            provider => {
                drop(cpu_session);
                match build_provider_session(runtime, path, options, &signature) {
                    Ok(session) => (session, provider.name()),
                    Err(InferError::Provider { provider, msg, .. }) if options.fallback_cpu => {
                        tracing::warn!(
                            "{provider} execution provider unavailable ({msg}): running on the CPU (--fallback cpu)"
                        );
                        (build_session(runtime, path, &cpu)?, "cpu")
                    }
                    Err(e) => return Err(e),
                }
            }
        };

        let mut generator = Generator {
            path: path.to_path_buf(),
            session,
            provider,
            metadata,
            z_input: signature.z_input,
            num_classes: signature.class_input.as_ref().map_or(0, |c| c.1),
            class_input: signature.class_input.map(|c| c.0),
            image_output: signature.image_output,
            attention_outputs: signature.attention_outputs,
            z_dim: signature.z_dim,
            fixed_batch: signature.fixed_batch,
            image_shape: [0; 3],
            attention_grids: Vec::new(),
        };
        let declared = signature.image_shape;
        let mut attention_n = signature.attention_n;
        if let ([Some(c), Some(h), Some(w)], true) = (
            declared,
            attention_n.iter().all(|(q, k)| q.is_some() && k.is_some()),
        ) {
            generator.image_shape = [c, h, w];
        } else {
            let classes = generator.class_input.as_ref().map(|_| vec![0i64]);
            let probe =
                generator.run_checked(&vec![0.0; generator.z_dim], classes.as_deref(), 1)?;
            let found = [probe.channels, probe.height, probe.width];
            for (i, (d, f)) in declared.iter().zip(found).enumerate() {
                if d.is_some_and(|d| d != f) {
                    return Err(model_err(format!(
                        "output '{}' declares dimension {} = {} but produced {f}",
                        generator.image_output,
                        i + 1,
                        d.unwrap_or_default()
                    )));
                }
            }
            generator.image_shape = found;
            for (n, maps) in attention_n.iter_mut().zip(&probe.attention) {
                let ((qh, qw), (kh, kw)) = (maps.grid.queries, maps.grid.keys);
                *n = (Some(qh * qw), Some(kh * kw));
            }
        }
        generator.attention_grids = attention_n
            .iter()
            .zip(&generator.attention_outputs)
            .map(|(&(q, k), name)| {
                map_grid(q.unwrap_or_default(), k.unwrap_or_default(), name).map_err(model_err)
            })
            .collect::<InferResult<_>>()?;
        let [c, ..] = generator.image_shape;
        if c != 1 && c != 3 {
            return Err(model_err(format!(
                "output '{}' has {c} channels; only 1 (greyscale) or 3 (RGB) can be written as PNG",
                generator.image_output
            )));
        }
        Ok(generator)
    }

    /// The model file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The provider the session actually runs on ("cpu" after a `--fallback cpu`).
    pub fn provider(&self) -> &'static str {
        self.provider
    }

    pub fn metadata(&self) -> &SaganMetadata {
        &self.metadata
    }

    pub fn z_dim(&self) -> usize {
        self.z_dim
    }

    pub fn channels(&self) -> usize {
        self.image_shape[0]
    }

    /// (height, width) of the generated images.
    pub fn size(&self) -> (usize, usize) {
        (self.image_shape[1], self.image_shape[2])
    }

    /// The query and key grids of each attention output, in output order.
    pub fn attention_grids(&self) -> &[MapGrid] {
        &self.attention_grids
    }

    /// Classes of a class-conditional model; 0 for an unconditional one.
    pub fn num_classes(&self) -> usize {
        self.num_classes
    }

    pub fn attention_outputs(&self) -> usize {
        self.attention_outputs.len()
    }

    /// The batch size the file fixes, if it does.
    pub fn fixed_batch(&self) -> Option<usize> {
        self.fixed_batch
    }

    /// Runs `n` latents (`z` is `[n, z_dim]` row-major) and returns images and attention maps.
    /// A class-conditional model needs `classes`, one per latent, each in `0..num_classes`;
    /// an unconditional one refuses them.
    pub fn generate(
        &mut self,
        z: &[f32],
        classes: Option<&[i64]>,
        n: usize,
    ) -> InferResult<Generated> {
        if n == 0 || z.len() != n * self.z_dim {
            return Err(InferError::Invalid(format!(
                "generate: {} values are not {n} latents of size {}",
                z.len(),
                self.z_dim
            )));
        }
        self.check_classes(classes, n)?;
        let Some(batch) = self.fixed_batch.filter(|&b| b != n) else {
            return self.run_checked(z, classes, n);
        };
        // A fixed batch size: run full batches, zero-pad the last, keep only real images.
        let mut out: Option<Generated> = None;
        for start in (0..n).step_by(batch) {
            let real = batch.min(n - start);
            let mut chunk = z[start * self.z_dim..(start + real) * self.z_dim].to_vec();
            chunk.resize(batch * self.z_dim, 0.0);
            let chunk_classes = classes.map(|c| {
                let mut part = c[start..start + real].to_vec();
                part.resize(batch, 0);
                part
            });
            let mut part = self.run_checked(&chunk, chunk_classes.as_deref(), batch)?;
            part.truncate(real);
            match &mut out {
                None => out = Some(part),
                Some(all) => all.append(part),
            }
        }
        out.ok_or_else(|| InferError::Invalid("generate: no latents".into()))
    }

    fn check_classes(&self, classes: Option<&[i64]>, n: usize) -> InferResult<()> {
        let invalid = |msg: String| Err(InferError::Invalid(msg));
        match (classes, self.num_classes) {
            (None, 0) => Ok(()),
            (Some(_), 0) => invalid(format!(
                "{} is unconditional: it takes no classes",
                self.path.display()
            )),
            (None, k) => invalid(format!(
                "{} is class-conditional ({k} classes): give every image a class",
                self.path.display()
            )),
            (Some(c), _) if c.len() != n => invalid(format!("{} classes for {n} latents", c.len())),
            (Some(c), k) => match c.iter().find(|&&c| c < 0 || c as usize >= k) {
                Some(bad) => invalid(format!(
                    "class {bad} is out of range: {} has {k} classes (0..{k})",
                    self.path.display()
                )),
                None => Ok(()),
            },
        }
    }

    /// One session run on exactly `n` latents, with every output's shape checked.
    fn run_checked(
        &mut self,
        z: &[f32],
        classes: Option<&[i64]>,
        n: usize,
    ) -> InferResult<Generated> {
        let run_err = |msg: String| InferError::Run {
            path: self.path.clone(),
            msg,
        };
        let tensor =
            TensorRef::from_array_view(([n, self.z_dim], z)).map_err(|e| run_err(e.to_string()))?;
        let mut inputs = ort::inputs![self.z_input.as_str() => tensor];
        if let (Some(name), Some(classes)) = (&self.class_input, classes) {
            let classes =
                TensorRef::from_array_view(([n], classes)).map_err(|e| run_err(e.to_string()))?;
            inputs.push((name.as_str().into(), classes.into()));
        }
        let outputs = self.session.run(inputs).map_err(|e| InferError::Run {
            path: self.path.clone(),
            msg: e.to_string(),
        })?;
        let (image_dims, images) = extract(&outputs, &self.image_output).map_err(&run_err)?;
        let [c, h, w] = match image_dims.as_slice() {
            &[b, c, h, w] if b == n => [c, h, w],
            dims => {
                return Err(run_err(format!(
                    "output '{}' has shape {dims:?}, expected [{n}, C, H, W]",
                    self.image_output
                )))
            }
        };
        if self.image_shape != [0; 3] && self.image_shape != [c, h, w] {
            return Err(run_err(format!(
                "output '{}' changed shape to {image_dims:?}",
                self.image_output
            )));
        }
        let mut attention = Vec::with_capacity(self.attention_outputs.len());
        for name in &self.attention_outputs {
            let (dims, maps) = extract(&outputs, name).map_err(&run_err)?;
            let grid = match dims.as_slice() {
                &[b, q, k] if b == n => map_grid(q, k, name).map_err(&run_err)?,
                dims => {
                    return Err(run_err(format!(
                        "output '{name}' has shape {dims:?}, expected [{n}, N, M]"
                    )))
                }
            };
            attention.push(AttentionMaps {
                name: name.clone(),
                grid,
                maps,
            });
        }
        Ok(Generated {
            n,
            channels: c,
            height: h,
            width: w,
            images,
            attention,
        })
    }
}

impl Generated {
    /// Keeps the first `n` images (and their attention maps).
    fn truncate(&mut self, n: usize) {
        self.images
            .truncate(n * self.channels * self.height * self.width);
        for a in &mut self.attention {
            a.maps.truncate(n * a.per_image());
        }
        self.n = n;
    }

    /// Appends the images (and maps) of a later batch of the same model.
    pub fn append(&mut self, other: Generated) {
        self.images.extend(other.images);
        for (a, b) in self.attention.iter_mut().zip(other.attention) {
            a.maps.extend(b.maps);
        }
        self.n += other.n;
    }

    /// The largest |difference| between these images and `other`'s (the same latents on
    /// another provider); infinite where one is NaN and the other not, `None` when the shapes
    /// differ.
    pub fn max_abs_diff(&self, other: &Generated) -> Option<f32> {
        let shape = |g: &Generated| (g.n, g.channels, g.height, g.width);
        if shape(self) != shape(other) || self.images.len() != other.images.len() {
            return None;
        }
        Some(
            self.images
                .iter()
                .zip(&other.images)
                .map(|(a, b)| match (a.is_nan(), b.is_nan()) {
                    (true, true) => 0.0,
                    (false, false) => (a - b).abs(),
                    _ => f32::INFINITY,
                })
                .fold(0.0, f32::max),
        )
    }
}

/// Copies output `name` out of the session's buffers, with its shape.
fn extract(outputs: &SessionOutputs, name: &str) -> Result<(Vec<usize>, Vec<f32>), String> {
    let value = outputs
        .get(name)
        .ok_or_else(|| format!("the model returned no output '{name}'"))?;
    let (shape, data) = value
        .try_extract_tensor::<f32>()
        .map_err(|e| format!("output '{name}': {e}"))?;
    let dims = shape.iter().map(|&d| d.max(0) as usize).collect();
    Ok((dims, data.to_vec()))
}

/// The grids of an attention output with `queries` x `keys` positions: square, with as many
/// keys as queries or a quarter of them (pooled keys).
fn map_grid(queries: usize, keys: usize, name: &str) -> Result<MapGrid, String> {
    let grid = MapGrid::square(queries, keys);
    let ((qh, qw), (kh, kw)) = (grid.queries, grid.keys);
    if qh == 0 || qh * qw != queries || kh * kw != keys || !(kh == qh || 2 * kh == qh) {
        return Err(format!(
            "output '{name}' maps {queries} queries to {keys} keys: not a square feature map \
             attending to itself or to its 2x2-pooled self"
        ));
    }
    Ok(grid)
}

/// A CPU session (or the base of a provider session): threads and the model, nothing else.
fn build_session(runtime: &Runtime, path: &Path, options: &LoadOptions) -> InferResult<Session> {
    let setup = |msg: String| InferError::Environment {
        path: runtime.library().to_path_buf(),
        msg,
    };
    let mut builder = Session::builder(runtime.environment())
        .map_err(|e| setup(e.to_string()))?
        .with_optimization_level(GraphOptimizationLevel::All)
        .map_err(|e| setup(e.to_string()))?;
    if let Some(threads) = options.threads {
        builder = builder
            .with_intra_threads(threads)
            .map_err(|e| setup(e.to_string()))?;
    }
    let dispatches = match &options.provider {
        Provider::Cpu => Vec::new(),
        // Only called for the CPU; provider sessions go through `build_provider_session`.
        other => {
            return Err(InferError::Invalid(format!(
                "internal: build_session called for {}",
                other.name()
            )))
        }
    };
    let mut builder = builder
        .with_execution_providers(dispatches)
        .map_err(|e| setup(e.to_string()))?;
    builder
        .commit_from_file(path)
        .map_err(|e| model_load_error(path, &e.to_string()))
}

/// A session on a GPU provider. Every failure here (registration, or a commit that fails once
/// the provider is in) is the provider's: the model already loaded on the CPU.
fn build_provider_session(
    runtime: &Runtime,
    path: &Path,
    options: &LoadOptions,
    signature: &Signature,
) -> InferResult<Session> {
    let provider_err = |msg: String| provider_error(runtime, &options.provider, msg);
    let z_rest = [signature.z_dim];
    let mut batch_inputs: Vec<(&str, &[usize])> = Vec::new();
    if signature.fixed_batch.is_none() {
        batch_inputs.push((signature.z_input.as_str(), &z_rest));
        if let Some((name, _)) = &signature.class_input {
            batch_inputs.push((name.as_str(), &[]));
        }
    }
    let dispatches = options.provider.dispatches(runtime, &batch_inputs)?;
    let mut builder =
        Session::builder(runtime.environment()).map_err(|e| provider_err(e.to_string()))?;
    if let Some(threads) = options.threads {
        builder = builder
            .with_intra_threads(threads)
            .map_err(|e| provider_err(e.to_string()))?;
    }
    let mut builder = builder
        .with_execution_providers(dispatches)
        .map_err(|e| provider_err(e.to_string()))?;
    builder
        .commit_from_file(path)
        .map_err(|e| provider_err(e.to_string()))
}

/// A provider that cannot run, with what to do about it.
pub(crate) fn provider_error(runtime: &Runtime, provider: &Provider, msg: String) -> InferError {
    let lib = runtime.library().display();
    let hint = if msg.contains("not enabled in this build") {
        format!("; {lib} is a CPU-only ONNX Runtime: install the GPU one with {INSTALL_GPU}")
    } else if msg.contains(".so") && !msg.starts_with(gpu::NO_DEVICE) {
        format!(
            "; {lib} needs CUDA 13 and cuDNN 9{}: install them with {INSTALL_GPU}, or name their folder with --cuda-libs",
            if matches!(provider, Provider::TensorRt(_)) {
                " (and TensorRT 10)"
            } else {
                ""
            }
        )
    } else {
        String::new()
    };
    InferError::Provider {
        provider: provider.name(),
        msg: msg.trim_end_matches(['.', ' ', '\n']).to_string(),
        hint,
    }
}

/// Turns ONNX Runtime's load errors into what the user needs to know.
fn model_load_error(path: &Path, msg: &str) -> InferError {
    let msg = if msg.contains("Protobuf parsing failed") || msg.contains("INVALID_PROTOBUF") {
        "not an ONNX model (the file does not parse as an ONNX protobuf)".to_string()
    } else {
        format!("ONNX Runtime cannot load it: {msg}")
    };
    InferError::Model {
        path: path.to_path_buf(),
        msg,
    }
}

fn read_metadata(session: &Session) -> Result<SaganMetadata, String> {
    let meta = session
        .metadata()
        .map_err(|e| format!("cannot read metadata: {e}"))?;
    let keys = meta
        .custom_keys()
        .map_err(|e| format!("cannot read metadata: {e}"))?;
    let props: BTreeMap<String, String> = keys
        .into_iter()
        .filter_map(|k| meta.custom(&k).map(|v| (k, v)))
        .collect();
    SaganMetadata::parse(&props)
}

/// A declared tensor: element type and shape with `None` for symbolic dimensions.
pub(crate) fn tensor_decl(ty: &ValueType) -> Option<(TensorElementType, Vec<Option<usize>>)> {
    match ty {
        ValueType::Tensor { ty, shape, .. } => Some((
            *ty,
            shape
                .iter()
                .map(|&d| usize::try_from(d).ok().filter(|&d| d > 0))
                .collect(),
        )),
        _ => None,
    }
}

/// A declared value as a user reads it: `float32 [?, 3, 64, 64]`, not a Rust debug dump.
pub(crate) fn describe_type(ty: &ValueType) -> String {
    match tensor_decl(ty) {
        Some((elem, dims)) => format!(
            "{} {}",
            format!("{elem:?}").to_lowercase(),
            show_dims(&dims)
        ),
        None => "not a tensor".to_string(),
    }
}

fn show_dims(dims: &[Option<usize>]) -> String {
    let parts: Vec<String> = dims
        .iter()
        .map(|d| d.map_or("?".to_string(), |d| d.to_string()))
        .collect();
    format!("[{}]", parts.join(", "))
}

/// Checks the session's inputs and outputs against the contract and resolves the z size.
fn inspect(
    session: &Session,
    meta: &SaganMetadata,
    z_override: Option<usize>,
) -> Result<Signature, String> {
    let not_sagan = if meta.is_sagan_export() {
        ""
    } else {
        " (no 'sagan.*' metadata: not a sagan export)"
    };

    // Inputs: float [batch, z], and for a class-conditional export int64 `class` [batch].
    let inputs = session.inputs();
    let describe_inputs = || {
        let names: Vec<String> = inputs
            .iter()
            .map(|i| format!("'{}' {}", i.name(), describe_type(i.dtype())))
            .collect();
        names.join(", ")
    };
    let (z, class) = match inputs {
        [only] => (only, None),
        [a, b] if a.name() == CLASS_INPUT => (b, Some(a)),
        [a, b] if b.name() == CLASS_INPUT => (a, Some(b)),
        _ => {
            return Err(format!(
                "expected input 'z' [batch, z_dim] (and 'class' [batch] for a class-conditional model), found {}: {}{not_sagan}",
                inputs.len(),
                describe_inputs()
            ));
        }
    };
    let class_input = match class {
        None => None,
        Some(class) => {
            match tensor_decl(class.dtype()) {
                Some((TensorElementType::Int64, dims)) if dims.len() == 1 => {}
                _ => {
                    return Err(format!(
                        "input '{CLASS_INPUT}' is {}, expected int64 [batch]",
                        describe_type(class.dtype())
                    ))
                }
            }
            let k = meta.num_classes.filter(|&k| k > 0).ok_or_else(|| {
                format!("input '{CLASS_INPUT}' but no 'sagan.num_classes' metadata: the class range is unknown")
            })?;
            Some((CLASS_INPUT.to_string(), k))
        }
    };
    let z_name = z.name().to_string();
    let (z_ty, z_dims) = tensor_decl(z.dtype())
        .ok_or_else(|| format!("input '{z_name}' is not a tensor{not_sagan}"))?;
    if z_ty != TensorElementType::Float32 || z_dims.len() != 2 {
        return Err(format!(
            "input '{z_name}' is {}, expected float32 [batch, z_dim]{not_sagan}",
            describe_type(z.dtype())
        ));
    }
    let known = [
        ("metadata 'sagan.z_dim'", meta.z_dim),
        ("input shape", z_dims[1]),
    ];
    let mut z_dim = z_override;
    for (source, value) in known {
        if let Some(v) = value {
            match z_dim {
                Some(d) if d != v => {
                    let first = if z_override.is_some() {
                        "--z-dim"
                    } else {
                        "metadata 'sagan.z_dim'"
                    };
                    return Err(format!("{first} is {d} but the {source} says {v}"));
                }
                _ => z_dim = Some(v),
            }
        }
    }
    let z_dim = z_dim.ok_or_else(|| {
        format!(
            "no 'sagan.z_dim' metadata and input '{z_name}' has no static z dimension: pass --z-dim"
        )
    })?;

    // Outputs: `image` (or the only output of a plain model), plus `attention_<i>`.
    let outputs = session.outputs();
    let image = outputs
        .iter()
        .find(|o| o.name() == "image")
        .or(match outputs {
            [only] => Some(only),
            _ => None,
        })
        .ok_or_else(|| {
            let names: Vec<&str> = outputs.iter().map(|o| o.name()).collect();
            format!(
                "no output 'image' (outputs: {}){not_sagan}",
                names.join(", ")
            )
        })?;
    let image_name = image.name().to_string();
    let image_dims = match tensor_decl(image.dtype()) {
        Some((TensorElementType::Float32, dims)) if dims.len() == 4 => dims,
        Some(_) => {
            return Err(format!(
                "output '{image_name}' is {}, expected float32 [batch, C, H, W]: not an image generator{not_sagan}",
                describe_type(image.dtype())
            ))
        }
        None => return Err(format!("output '{image_name}' is not a tensor{not_sagan}")),
    };
    let from_meta = [meta.channels, meta.image_size, meta.image_size];
    let mut image_shape = [None; 3];
    for (i, slot) in image_shape.iter_mut().enumerate() {
        *slot = match (image_dims[i + 1], from_meta[i]) {
            (Some(d), Some(m)) if d != m => {
                return Err(format!(
                    "output '{image_name}' has shape {} but the metadata says {} channels, size {}",
                    show_dims(&image_dims),
                    meta.channels.unwrap_or_default(),
                    meta.image_size.unwrap_or_default()
                ))
            }
            (d, m) => d.or(m),
        };
    }

    let mut attention: Vec<(usize, String, MapDims)> = Vec::new();
    for output in outputs {
        let Some(index) = output
            .name()
            .strip_prefix("attention_")
            .and_then(|i| i.parse::<usize>().ok())
        else {
            continue;
        };
        match tensor_decl(output.dtype()) {
            Some((TensorElementType::Float32, dims)) if dims.len() == 3 => {
                attention.push((index, output.name().to_string(), (dims[1], dims[2])))
            }
            _ => {
                return Err(format!(
                    "output '{}' is not float32 [batch, N, M]",
                    output.name()
                ))
            }
        }
    }
    attention.sort();
    if let Some(declared) = meta.attention_outputs.filter(|&d| d != attention.len()) {
        tracing::warn!(
            "metadata 'sagan.attention_outputs' says {declared} but the model has {}",
            attention.len()
        );
    }

    let signature = Signature {
        z_input: z_name,
        z_dim,
        class_input,
        fixed_batch: z_dims[0],
        image_output: image_name,
        image_shape,
        attention_outputs: attention.iter().map(|a| a.1.clone()).collect(),
        attention_n: attention.iter().map(|a| a.2).collect(),
    };
    check_sizes(&signature)?;
    Ok(signature)
}

/// The largest z size, class count and picture side a file may declare, and the most latent
/// values one run may take (a fixed batch is padded to): past them the file is corrupt, and
/// believing it would allocate what it declares.
const MAX_Z_DIM: usize = 1 << 20;
const MAX_CLASSES: usize = 1 << 20;
const MAX_SIDE: usize = 1 << 14;
const MAX_LATENT_VALUES: usize = 1 << 24;

fn check_sizes(s: &Signature) -> Result<(), String> {
    if s.z_dim > MAX_Z_DIM {
        return Err(format!(
            "declares a z size of {}, more than the {MAX_Z_DIM} a generator may have",
            s.z_dim
        ));
    }
    if let Some(batch) = s.fixed_batch {
        if batch.saturating_mul(s.z_dim) > MAX_LATENT_VALUES {
            return Err(format!(
                "input '{}' fixes the batch at {batch}: {batch} latents of size {} are more than the {MAX_LATENT_VALUES} values a run may take",
                s.z_input, s.z_dim
            ));
        }
    }
    if let Some((name, k)) = s.class_input.as_ref().filter(|c| c.1 > MAX_CLASSES) {
        return Err(format!(
            "input '{name}' takes {k} classes, more than {MAX_CLASSES}"
        ));
    }
    let [_, h, w] = s.image_shape;
    if let Some(side) = [h, w].into_iter().flatten().find(|&d| d > MAX_SIDE) {
        return Err(format!(
            "output '{}' declares a picture side of {side}, more than {MAX_SIDE}",
            s.image_output
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn signature(z_dim: usize, fixed_batch: Option<usize>) -> Signature {
        Signature {
            z_input: "z".into(),
            z_dim,
            class_input: None,
            fixed_batch,
            image_output: "image".into(),
            image_shape: [Some(1), Some(4), None],
            attention_outputs: Vec::new(),
            attention_n: Vec::new(),
        }
    }

    /// Found by fuzzing: fixed-batch-generator.onnx with its batch dimension edited to 10^9
    /// loaded, and generating one image padded the batch to 10^9 latents (a 32 GB allocation,
    /// an abort); a z size from the metadata was believed the same way.
    #[test]
    fn declared_sizes_past_the_bounds_are_refused() {
        check_sizes(&signature(128, Some(64))).unwrap();
        check_sizes(&signature(MAX_Z_DIM, None)).unwrap();
        let err = check_sizes(&signature(8, Some(1_000_000_000))).unwrap_err();
        assert!(
            err.starts_with("input 'z' fixes the batch at 1000000000"),
            "{err}"
        );
        let err = check_sizes(&signature(MAX_Z_DIM + 1, None)).unwrap_err();
        assert!(err.contains("declares a z size of 1048577"), "{err}");
        let mut big = signature(8, None);
        big.image_shape[2] = Some(MAX_SIDE + 1);
        assert!(check_sizes(&big)
            .unwrap_err()
            .contains("picture side of 16385"));
        let mut classes = signature(8, None);
        classes.class_input = Some(("class".into(), usize::MAX));
        assert!(check_sizes(&classes).unwrap_err().contains("classes"));
    }

    fn generated(images: Vec<f32>) -> Generated {
        Generated {
            n: 1,
            channels: 1,
            height: 1,
            width: images.len(),
            images,
            attention: Vec::new(),
        }
    }

    #[test]
    fn max_abs_diff_is_the_largest_gap_and_nan_counts_as_infinite() {
        let a = generated(vec![0.0, 1.0, -1.0]);
        assert_eq!(a.max_abs_diff(&generated(vec![0.0, 1.25, -1.5])), Some(0.5));
        assert_eq!(a.max_abs_diff(&a), Some(0.0));
        assert_eq!(
            a.max_abs_diff(&generated(vec![0.0, f32::NAN, -1.0])),
            Some(f32::INFINITY)
        );
        assert_eq!(a.max_abs_diff(&generated(vec![0.0, 1.0])), None);
    }
}
