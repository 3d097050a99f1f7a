//! The feature network: an ONNX model that maps images to feature vectors (for the Frechet
//! distance) and, optionally, class logits (for the Inception score).
//!
//! Contract: one float32 input `[batch, C, H, W]`; an output `features` `[batch, D]` (or
//! `[batch, D, 1, 1]`, as Inception's pool3 often is) and optionally `logits` `[batch, K]`,
//! under other names when the caller says so. Images arrive as sagan produces them, NCHW in
//! [-1, 1]; they are converted to the network's channels and size here, and mapped to the range
//! its `sagan.input_range` metadata names ("lo,hi"; [-1, 1] without it).

use crate::image_io::ImageBatch;
use crate::infer::generator::{describe_type, provider_error, tensor_decl};
use crate::infer::runtime::Runtime;
use crate::infer::{InferError, InferResult, Provider};
use ort::session::builder::GraphOptimizationLevel;
use ort::session::Session;
use ort::value::{TensorElementType, TensorRef};
use std::path::{Path, PathBuf};

/// The output names looked for when the caller names none.
pub const FEATURES_OUTPUT: &str = "features";
pub const LOGITS_OUTPUT: &str = "logits";

/// How images are resampled to the network's input size.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Resize {
    /// Half-pixel-centred bilinear (PyTorch's `align_corners=False` without antialiasing):
    /// what Inception-v3 FID code does to 32x32 or 64x64 samples before the 299x299 network.
    #[default]
    Bilinear,
    /// Nearest neighbour: integer upscales stay blocky but exact.
    Nearest,
}

/// How to load a feature network.
#[derive(Clone, Debug)]
pub struct FeatureNetOptions {
    pub provider: Provider,
    /// Run on the CPU (with a warning) when `provider` cannot be used.
    pub fallback_cpu: bool,
    /// Intra-op threads; ONNX Runtime's default when `None`.
    pub threads: Option<usize>,
    /// The feature output's name; [`FEATURES_OUTPUT`] when `None`.
    pub features_output: Option<String>,
    /// The logits output's name. When `None`, [`LOGITS_OUTPUT`] is used if the model has it
    /// (a network without logits gives no Inception score, not an error).
    pub logits_output: Option<String>,
    pub resize: Resize,
}

impl Default for FeatureNetOptions {
    fn default() -> Self {
        Self {
            provider: Provider::Cpu,
            fallback_cpu: false,
            threads: None,
            features_output: None,
            logits_output: None,
            resize: Resize::default(),
        }
    }
}

/// What one [`FeatureNet::run`] returns.
#[derive(Clone, Debug)]
pub struct Features {
    pub n: usize,
    pub dim: usize,
    /// `[n, dim]` row-major.
    pub features: Vec<f32>,
    /// `[n, classes]` row-major, when the network has logits.
    pub logits: Option<Vec<f32>>,
    /// 0 without logits.
    pub classes: usize,
}

/// A loaded, validated feature network.
pub struct FeatureNet {
    name: PathBuf,
    session: Session,
    provider: &'static str,
    input: String,
    /// Declared (channels, height, width); `None` where symbolic (the images' own is used).
    input_shape: [Option<usize>; 3],
    fixed_batch: Option<usize>,
    features_output: String,
    logits_output: Option<String>,
    input_range: (f32, f32),
    resize: Resize,
    fingerprint: u64,
    kind: Option<String>,
}

impl std::fmt::Debug for FeatureNet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FeatureNet")
            .field("name", &self.name)
            .field("provider", &self.provider)
            .field("input_shape", &self.input_shape)
            .field("features_output", &self.features_output)
            .field("logits_output", &self.logits_output)
            .finish_non_exhaustive()
    }
}

impl FeatureNet {
    /// Loads the network in the file `path`.
    pub fn load(runtime: &Runtime, path: &Path, options: &FeatureNetOptions) -> InferResult<Self> {
        let bytes = std::fs::read(path).map_err(|e| InferError::Model {
            path: path.to_path_buf(),
            msg: format!("cannot read the feature network: {e}"),
        })?;
        Self::from_bytes(runtime, path, &bytes, options)
    }

    /// Loads a network held in memory (such as one built into a binary); `name` stands for its
    /// path in messages.
    pub fn from_bytes(
        runtime: &Runtime,
        name: &Path,
        bytes: &[u8],
        options: &FeatureNetOptions,
    ) -> InferResult<Self> {
        let model_err = |msg: String| InferError::Model {
            path: name.to_path_buf(),
            msg,
        };
        // Checked on the CPU first, so that errors about the file read the same whatever the
        // provider (as for generators).
        let cpu = build_session(runtime, name, bytes, options.threads, &Provider::Cpu)?;
        let signature = inspect(&cpu, options).map_err(model_err)?;
        let (session, provider) = match &options.provider {
            Provider::Cpu => (cpu, "cpu"),
            provider => {
                drop(cpu);
                match build_session(runtime, name, bytes, options.threads, provider) {
                    Ok(session) => (session, provider.name()),
                    Err(InferError::Provider { provider, msg, .. }) if options.fallback_cpu => {
                        tracing::warn!(
                            "{provider} execution provider unavailable for the feature network ({msg}): running it on the CPU"
                        );
                        let cpu = Provider::Cpu;
                        (
                            build_session(runtime, name, bytes, options.threads, &cpu)?,
                            "cpu",
                        )
                    }
                    Err(e) => return Err(e),
                }
            }
        };
        Ok(Self {
            name: name.to_path_buf(),
            session,
            provider,
            input: signature.input,
            input_shape: signature.input_shape,
            fixed_batch: signature.fixed_batch,
            features_output: signature.features_output,
            logits_output: signature.logits_output,
            input_range: signature.input_range,
            resize: options.resize,
            fingerprint: fingerprint(bytes),
            kind: signature.kind,
        })
    }

    /// The file (or the name given to [`FeatureNet::from_bytes`]).
    pub fn name(&self) -> &Path {
        &self.name
    }

    pub fn provider(&self) -> &'static str {
        self.provider
    }

    /// A hash of the model's bytes: cached statistics are only reused for the same network.
    pub fn fingerprint(&self) -> u64 {
        self.fingerprint
    }

    /// The `sagan.feature_net` metadata, when the network has it.
    pub fn kind(&self) -> Option<&str> {
        self.kind.as_deref()
    }

    /// The name of the output the features are read from.
    pub fn features_output(&self) -> &str {
        &self.features_output
    }

    pub fn resize(&self) -> Resize {
        self.resize
    }

    /// The (channels, height, width) the network declares; `None` where symbolic.
    pub fn declared_input_shape(&self) -> [Option<usize>; 3] {
        self.input_shape
    }

    /// The (channels, height, width) images of shape `(c, h, w)` are converted to.
    pub fn input_shape_for(&self, [c, h, w]: [usize; 3]) -> [usize; 3] {
        let [nc, nh, nw] = self.input_shape;
        [nc.unwrap_or(c), nh.unwrap_or(h), nw.unwrap_or(w)]
    }

    /// Features (and logits) of every image of `images`, in one run or, when the network fixes
    /// its batch size, in zero-padded runs of that size.
    pub fn run(&mut self, images: &ImageBatch) -> InferResult<Features> {
        let target = self.input_shape_for([images.c, images.h, images.w]);
        let input = self.prepare(images, target);
        let per_image = target.iter().product::<usize>();
        let Some(batch) = self.fixed_batch.filter(|&b| b != images.n) else {
            return self.run_checked(&input, images.n, target);
        };
        let mut out: Option<Features> = None;
        for start in (0..images.n).step_by(batch) {
            let real = batch.min(images.n - start);
            let mut chunk = input[start * per_image..(start + real) * per_image].to_vec();
            chunk.resize(batch * per_image, 0.0);
            let mut part = self.run_checked(&chunk, batch, target)?;
            part.truncate(real);
            match &mut out {
                None => out = Some(part),
                Some(all) => all.append(part),
            }
        }
        out.ok_or_else(|| InferError::Invalid("feature network: no images".into()))
    }

    /// The images converted to the network's channels, size and value range, NCHW.
    /// Channels are 1 or 3 on both sides: `ImageBatch` and [`inspect`] checked them.
    fn prepare(&self, images: &ImageBatch, [c, h, w]: [usize; 3]) -> Vec<f32> {
        let plane_in = images.h * images.w;
        let mut out = Vec::with_capacity(images.n * c * h * w);
        for image in images.data.chunks_exact(images.c * plane_in) {
            // Colour to grey before resizing (one plane to resample), grey to colour after.
            let planes: Vec<Vec<f32>> = match (images.c, c) {
                (3, 1) => vec![luma(image, plane_in)],
                _ => image.chunks_exact(plane_in).map(<[f32]>::to_vec).collect(),
            };
            let resized: Vec<Vec<f32>> = planes
                .iter()
                .map(|p| resample(p, (images.h, images.w), (h, w), self.resize))
                .collect();
            for channel in 0..c {
                out.extend_from_slice(&resized[channel % resized.len()]);
            }
        }
        let (lo, hi) = self.input_range;
        if (lo, hi) != (-1.0, 1.0) {
            for v in &mut out {
                *v = lo + (*v + 1.0) * 0.5 * (hi - lo);
            }
        }
        out
    }

    /// One session run on exactly `n` prepared images, outputs checked.
    fn run_checked(
        &mut self,
        input: &[f32],
        n: usize,
        [c, h, w]: [usize; 3],
    ) -> InferResult<Features> {
        let run_err = |msg: String| InferError::Run {
            path: self.name.clone(),
            msg,
        };
        let tensor = TensorRef::from_array_view(([n, c, h, w], input))
            .map_err(|e| run_err(e.to_string()))?;
        let outputs = self
            .session
            .run(ort::inputs![self.input.as_str() => tensor])
            .map_err(|e| run_err(e.to_string()))?;
        let matrix = |name: &str| -> Result<(usize, Vec<f32>), String> {
            let value = outputs
                .get(name)
                .ok_or_else(|| format!("the network returned no output '{name}'"))?;
            let (shape, data) = value
                .try_extract_tensor::<f32>()
                .map_err(|e| format!("output '{name}': {e}"))?;
            let dims: Vec<usize> = shape.iter().map(|&d| d.max(0) as usize).collect();
            match dims.as_slice() {
                [b, d, rest @ ..] if *b == n && *d > 0 && rest.iter().all(|&r| r == 1) => {
                    Ok((*d, data.to_vec()))
                }
                _ => Err(format!(
                    "output '{name}' has shape {dims:?}, expected [{n}, D] (or [{n}, D, 1, 1])"
                )),
            }
        };
        let (dim, features) = matrix(&self.features_output).map_err(&run_err)?;
        let (classes, logits) = match &self.logits_output {
            Some(name) => {
                let (classes, logits) = matrix(name).map_err(&run_err)?;
                (classes, Some(logits))
            }
            None => (0, None),
        };
        Ok(Features {
            n,
            dim,
            features,
            logits,
            classes,
        })
    }
}

impl Features {
    /// Keeps the first `n` rows.
    fn truncate(&mut self, n: usize) {
        self.features.truncate(n * self.dim);
        if let Some(logits) = &mut self.logits {
            logits.truncate(n * self.classes);
        }
        self.n = n;
    }

    /// Appends the rows of a later run of the same network.
    fn append(&mut self, other: Features) {
        self.features.extend(other.features);
        if let (Some(a), Some(b)) = (&mut self.logits, other.logits) {
            a.extend(b);
        }
        self.n += other.n;
    }
}

/// ITU-R BT.601 luma, as `image`'s `to_luma8` (and so sagan's data loader) computes it.
fn luma(rgb: &[f32], plane: usize) -> Vec<f32> {
    (0..plane)
        .map(|i| 0.299 * rgb[i] + 0.587 * rgb[plane + i] + 0.114 * rgb[2 * plane + i])
        .collect()
}

/// Resamples one `from` plane to `to`, with pixel centres aligned (half-pixel convention).
fn resample(plane: &[f32], from: (usize, usize), to: (usize, usize), mode: Resize) -> Vec<f32> {
    if from == to {
        return plane.to_vec();
    }
    let ((fh, fw), (th, tw)) = (from, to);
    // Source coordinate of target pixel centre `i`, and the two neighbours with the weight of
    // the second: clamped at the borders.
    let axis = |i: usize, src: usize, dst: usize| -> (usize, usize, f32) {
        let x = ((i as f32 + 0.5) * src as f32 / dst as f32 - 0.5).max(0.0);
        let x0 = (x.floor() as usize).min(src - 1);
        (x0, (x0 + 1).min(src - 1), x - x0 as f32)
    };
    let nearest = |i: usize, src: usize, dst: usize| -> usize {
        (((i as f32 + 0.5) * src as f32 / dst as f32) as usize).min(src - 1)
    };
    let mut out = Vec::with_capacity(th * tw);
    for y in 0..th {
        for x in 0..tw {
            out.push(match mode {
                Resize::Nearest => plane[nearest(y, fh, th) * fw + nearest(x, fw, tw)],
                Resize::Bilinear => {
                    let (y0, y1, wy) = axis(y, fh, th);
                    let (x0, x1, wx) = axis(x, fw, tw);
                    let row = |r: usize| plane[r * fw + x0] * (1.0 - wx) + plane[r * fw + x1] * wx;
                    row(y0) * (1.0 - wy) + row(y1) * wy
                }
            });
        }
    }
    out
}

/// FNV-1a, 64-bit: stable across Rust versions and platforms, unlike `DefaultHasher`, so a
/// cache written by one build is recognised by the next.
pub fn fingerprint(bytes: &[u8]) -> u64 {
    fingerprint_from(0xcbf2_9ce4_8422_2325, bytes)
}

/// Continues `hash` over more bytes: `fingerprint_from(fingerprint(a), b)` is the fingerprint
/// of `a` followed by `b`, so data can be hashed piece by piece.
pub fn fingerprint_from(hash: u64, bytes: &[u8]) -> u64 {
    bytes.iter().fold(hash, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// What the declared inputs, outputs and metadata say.
struct Signature {
    input: String,
    input_shape: [Option<usize>; 3],
    fixed_batch: Option<usize>,
    features_output: String,
    logits_output: Option<String>,
    input_range: (f32, f32),
    kind: Option<String>,
}

fn inspect(session: &Session, options: &FeatureNetOptions) -> Result<Signature, String> {
    let (input, input_dims) = match session.inputs() {
        [only] => match tensor_decl(only.dtype()) {
            Some((TensorElementType::Float32, dims)) if dims.len() == 4 => {
                (only.name().to_string(), dims)
            }
            _ => {
                return Err(format!(
                    "input '{}' is {}, expected float32 [batch, C, H, W] images",
                    only.name(),
                    describe_type(only.dtype())
                ))
            }
        },
        inputs => {
            let names: Vec<&str> = inputs.iter().map(|i| i.name()).collect();
            return Err(format!(
                "a feature network takes one input, [batch, C, H, W] images; this one has {}: {}",
                inputs.len(),
                names.join(", ")
            ));
        }
    };
    if let Some(c) = input_dims[1].filter(|&c| c != 1 && c != 3) {
        return Err(format!(
            "input '{input}' has {c} channels; only 1 (grey) or 3 (RGB) are supported"
        ));
    }
    check_input_size(&input, &input_dims)?;

    let outputs = session.outputs();
    let names: Vec<&str> = outputs.iter().map(|o| o.name()).collect();
    let find = |name: &str, flag: &str| -> Result<Option<String>, String> {
        let Some(output) = outputs.iter().find(|o| o.name() == name) else {
            return Ok(None);
        };
        match tensor_decl(output.dtype()) {
            Some((TensorElementType::Float32, dims))
                if dims.len() == 2 || (dims.len() == 4 && dims[2..].iter().all(|d| d.is_none_or(|d| d == 1))) =>
            {
                Ok(Some(name.to_string()))
            }
            _ => Err(format!(
                "output '{name}' is {}, expected float32 [batch, D] (choose another output with {flag} NAME)",
                describe_type(output.dtype())
            )),
        }
    };
    let wanted = options
        .features_output
        .as_deref()
        .unwrap_or(FEATURES_OUTPUT);
    let features_output = find(wanted, "--features-output")?.ok_or_else(|| {
        format!(
            "no output '{wanted}' (outputs: {}): name the feature output with --features-output NAME",
            names.join(", ")
        )
    })?;
    let logits_output = match &options.logits_output {
        Some(wanted) => Some(
            find(wanted, "--logits-output")?
                .ok_or_else(|| format!("no output '{wanted}' (outputs: {})", names.join(", ")))?,
        ),
        None => find(LOGITS_OUTPUT, "--logits-output")?,
    };

    let meta = session
        .metadata()
        .map_err(|e| format!("cannot read metadata: {e}"))?;
    let input_range = match meta.custom("sagan.input_range") {
        None => (-1.0, 1.0),
        Some(range) => parse_range(&range).ok_or_else(|| {
            format!("metadata 'sagan.input_range' is '{range}', not 'lo,hi' with lo < hi")
        })?,
    };
    Ok(Signature {
        input,
        input_shape: [input_dims[1], input_dims[2], input_dims[3]],
        fixed_batch: input_dims[0],
        features_output,
        logits_output,
        input_range,
        kind: meta.custom("sagan.feature_net"),
    })
}

/// The largest input side a network may declare, and the most values one run padded to a
/// fixed batch may take: every image is resized to the declared size, so believing a corrupt
/// one would allocate what it declares.
const MAX_INPUT_SIDE: usize = 1024;
const MAX_RUN_VALUES: usize = 1 << 25;

fn check_input_size(input: &str, dims: &[Option<usize>]) -> Result<(), String> {
    if let Some(side) = dims[2..].iter().flatten().find(|&&d| d > MAX_INPUT_SIDE) {
        return Err(format!(
            "input '{input}' declares a side of {side}, more than the {MAX_INPUT_SIDE} images may be resized to"
        ));
    }
    if let Some(batch) = dims[0] {
        let per_image: usize = dims[1..].iter().map(|d| d.unwrap_or(1)).product();
        if batch.saturating_mul(per_image) > MAX_RUN_VALUES {
            return Err(format!(
                "input '{input}' fixes the batch at {batch}: more than the {MAX_RUN_VALUES} values a run may take"
            ));
        }
    }
    Ok(())
}

fn parse_range(s: &str) -> Option<(f32, f32)> {
    let (lo, hi) = s.split_once(',')?;
    let (lo, hi): (f32, f32) = (lo.trim().parse().ok()?, hi.trim().parse().ok()?);
    (lo.is_finite() && hi.is_finite() && lo < hi).then_some((lo, hi))
}

/// A session on `provider`, strict about it: a provider that cannot run is an error (the
/// caller decides about falling back), never ONNX Runtime's silent switch to the CPU.
fn build_session(
    runtime: &Runtime,
    name: &Path,
    bytes: &[u8],
    threads: Option<usize>,
    provider: &Provider,
) -> InferResult<Session> {
    // Before the model is in, failures are the environment's (CPU) or the provider's.
    let setup = |msg: String| match provider {
        Provider::Cpu => InferError::Environment {
            path: runtime.library().to_path_buf(),
            msg,
        },
        _ => provider_error(runtime, provider, msg),
    };
    let mut builder = Session::builder(runtime.environment())
        .map_err(|e| setup(e.to_string()))?
        .with_optimization_level(GraphOptimizationLevel::All)
        .map_err(|e| setup(e.to_string()))?;
    if let Some(threads) = threads {
        builder = builder
            .with_intra_threads(threads)
            .map_err(|e| setup(e.to_string()))?;
    }
    let mut builder = builder
        .with_execution_providers(provider.dispatches(runtime, &[])?)
        .map_err(|e| setup(e.to_string()))?;
    builder.commit_from_memory(bytes).map_err(|e| {
        let msg = e.to_string();
        if !matches!(provider, Provider::Cpu) {
            // The model already loaded on the CPU: what fails now is the provider.
            provider_error(runtime, provider, msg)
        } else if msg.contains("Protobuf parsing failed") || msg.contains("INVALID_PROTOBUF") {
            InferError::Model {
                path: name.to_path_buf(),
                msg: "not an ONNX model (the file does not parse as an ONNX protobuf)".into(),
            }
        } else {
            InferError::Model {
                path: name.to_path_buf(),
                msg: format!("ONNX Runtime cannot load it: {msg}"),
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resample_identity_nearest_and_bilinear() {
        let plane = [0.0_f32, 1.0, 2.0, 3.0];
        assert_eq!(resample(&plane, (2, 2), (2, 2), Resize::Bilinear), plane);
        assert_eq!(
            resample(&plane, (2, 2), (4, 4), Resize::Nearest),
            [0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0, 1.0, 2.0, 2.0, 3.0, 3.0, 2.0, 2.0, 3.0, 3.0]
        );
        // PyTorch F.interpolate(x, size=4, mode="bilinear", align_corners=False) of [[0,1],[2,3]]
        // has first row [0, .25, .75, 1] and rows spaced like it, plus 2 per source row.
        let up = resample(&plane, (2, 2), (4, 4), Resize::Bilinear);
        let expected_row = [0.0, 0.25, 0.75, 1.0];
        for (y, offset) in [0.0, 0.5, 1.5, 2.0].iter().enumerate() {
            for x in 0..4 {
                assert!(
                    (up[y * 4 + x] - (expected_row[x] + offset)).abs() < 1e-6,
                    "{up:?}"
                );
            }
        }
        // Downscaling by 2 averages 2x2 blocks (the sample points fall between pixels).
        let big: Vec<f32> = (0..16).map(|v| v as f32).collect();
        assert_eq!(
            resample(&big, (4, 4), (2, 2), Resize::Bilinear),
            [2.5, 4.5, 10.5, 12.5]
        );
    }

    /// Found by fuzzing: a feature network declaring a huge input (or fixed batch) loaded, and
    /// its first run resized the images to it, allocating what it declared.
    #[test]
    fn declared_inputs_past_the_bounds_are_refused() {
        let dims = |d: [Option<usize>; 4]| check_input_size("image", &d);
        dims([None, Some(3), Some(299), Some(299)]).unwrap();
        dims([Some(64), Some(3), Some(299), Some(299)]).unwrap();
        dims([Some(4), Some(1), None, None]).unwrap();
        let err = dims([None, Some(1), Some(1 << 30), Some(28)]).unwrap_err();
        assert!(err.contains("declares a side of 1073741824"), "{err}");
        let err = dims([Some(1_000_000_000), Some(1), Some(28), Some(28)]).unwrap_err();
        assert!(err.contains("fixes the batch at 1000000000"), "{err}");
    }

    #[test]
    fn luma_weights_sum_to_one() {
        let grey = luma(&[0.5, 0.5, 0.5], 1);
        assert!((grey[0] - 0.5).abs() < 1e-6);
        assert!((luma(&[1.0, 0.0, 0.0], 1)[0] - 0.299).abs() < 1e-6);
    }

    #[test]
    fn ranges_parse() {
        assert_eq!(parse_range("0,1"), Some((0.0, 1.0)));
        assert_eq!(parse_range(" -1 , 1 "), Some((-1.0, 1.0)));
        for bad in ["1,0", "0", "a,b", "0,inf", ""] {
            assert_eq!(parse_range(bad), None, "{bad}");
        }
    }

    #[test]
    fn fingerprint_is_fnv1a() {
        assert_eq!(fingerprint(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fingerprint(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(
            fingerprint_from(fingerprint(b"ab"), b"cd"),
            fingerprint(b"abcd")
        );
    }
}
