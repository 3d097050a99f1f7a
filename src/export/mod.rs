//! Generator checkpoints to ONNX: the graph is derived by walking the same `Generator` the
//! training uses, with spectral norm and batch norm folded into the convolution weights.

pub mod decompose;
pub mod graph;
pub mod session;
pub mod triton;

use crate::checkpoint::{self, Kind, Metadata, RunDir};
use crate::config::{Activation, ModelConfig};
use crate::infer::CLASS_INPUT;
use crate::model::{
    ClassBatchNorm, ConvKind, Generator, GeneratorBlock, Layer, SNConv2d, SNLinear, SelfAttention,
};
use crate::{Error, Result};
use candle_core::{Device, Tensor};
use candle_nn::{BatchNorm, VarMap};
use candle_onnx::onnx::{tensor_proto::DataType, ModelProto};
use graph::{attr_float, attr_int, attr_ints, attr_string, batched, GraphBuilder};
use prost::Message;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Default)]
pub struct ExportOptions {
    /// Add every attention layer's map [batch, N, N] as outputs `attention_0`, `attention_1`, ...
    pub attention_maps: bool,
    /// Write each ConvTranspose as zero insertion plus Conv, for runtimes without ConvTranspose.
    pub decompose_conv_transpose: bool,
    /// Replace an existing output file even when it is not an ONNX model sagan wrote.
    pub force: bool,
}

/// Which weights of a run to export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Weights {
    /// The moving average when the run kept one, else the raw weights.
    Preferred,
    Raw,
}

/// Max |candle - ONNX| an export must stay within to be written.
pub const EXPORT_TOLERANCE: f32 = 1e-4;

/// The folded weight and bias of a conv layer: W / sigma, then batch norm (running
/// statistics) folded in as a per-output-channel scale and shift. Folding rather than
/// exporting BatchNormalization keeps the graph minimal and identical across runtimes.
fn folded_conv(conv: &SNConv2d, batch_norm: Option<&BatchNorm>) -> Result<(Tensor, Tensor)> {
    let weight = conv.spectral_norm().weight(false)?;
    let bias = conv.bias().clone();
    let Some(bn) = batch_norm else {
        return Ok((weight, bias));
    };
    let (scale, shift) = batch_norm_scale_shift(bn)?;
    let out = scale.dim(0)?;
    let per_channel = match conv.kind() {
        ConvKind::Conv => scale.reshape((out, 1, 1, 1))?,
        ConvKind::Transpose => scale.reshape((1, out, 1, 1))?,
    };
    Ok((
        weight.broadcast_mul(&per_channel)?,
        ((bias * &scale)? + shift)?,
    ))
}

/// Batch norm in evaluation mode as y = x * scale + shift per channel, from the running
/// statistics (and the affine weights, when it has them).
fn batch_norm_scale_shift(bn: &BatchNorm) -> Result<(Tensor, Tensor)> {
    let inv_std = (bn.running_var() + bn.eps())?.sqrt()?.recip()?;
    let scale = match bn.weight_and_bias() {
        Some((gamma, _)) => (gamma * &inv_std)?,
        None => inv_std,
    };
    let mut shift = (bn.running_mean() * &scale)?.neg()?;
    if let Some((_, beta)) = bn.weight_and_bias() {
        shift = (shift + beta)?;
    }
    Ok((scale, shift))
}

fn values(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.flatten_all()?.to_vec1::<f32>()?)
}

/// Emits `layer` reading `x` of shape [batch, c, h, w]; returns its output name.
struct Emitter<'a> {
    b: GraphBuilder,
    leaky_slope: f64,
    attention_outputs: Option<&'a mut Vec<String>>,
}

impl Emitter<'_> {
    fn conv(
        &mut self,
        x: &str,
        conv: &SNConv2d,
        bn: Option<&BatchNorm>,
        act: Activation,
        out_shape: [usize; 3],
    ) -> Result<String> {
        let (weight, bias) = folded_conv(conv, bn)?;
        let w = self
            .b
            .float_const("weight", weight.dims(), &values(&weight)?);
        let bias_name = self.b.float_const("bias", bias.dims(), &values(&bias)?);
        let k = weight.dim(2)? as i64;
        let (s, p) = (conv.stride() as i64, conv.padding() as i64);
        let op = match conv.kind() {
            ConvKind::Conv => "Conv",
            ConvKind::Transpose => "ConvTranspose",
        };
        let attrs = vec![
            attr_ints("kernel_shape", &[k, k]),
            attr_ints("strides", &[s, s]),
            attr_ints("pads", &[p, p, p, p]),
        ];
        let y = self
            .b
            .node(op, &[x, &w, &bias_name], attrs, batched(&out_shape));
        Ok(self.activation(&y, act, out_shape))
    }

    fn activation(&mut self, x: &str, act: Activation, shape: [usize; 3]) -> String {
        match act {
            Activation::None => x.to_string(),
            Activation::Relu => self.b.node("Relu", &[x], vec![], batched(&shape)),
            Activation::Tanh => self.b.node("Tanh", &[x], vec![], batched(&shape)),
            Activation::LeakyRelu => self.b.node(
                "LeakyRelu",
                &[x],
                vec![attr_float("alpha", self.leaky_slope as f32)],
                batched(&shape),
            ),
        }
    }

    /// The linear map of the flattened input, reshaped to `out_shape`.
    fn linear(&mut self, x: &str, linear: &SNLinear, out_shape: [usize; 3]) -> Result<String> {
        let weight = linear.spectral_norm().weight(false)?.t()?; // [in, out]
        let (inputs, outputs) = weight.dims2()?;
        let w = self
            .b
            .float_const("weight", &[inputs, outputs], &values(&weight)?);
        let bias = self
            .b
            .float_const("bias", &[outputs], &values(linear.bias())?);
        let flat = self.b.node(
            "Flatten",
            &[x],
            vec![attr_int("axis", 1)],
            batched(&[inputs]),
        );
        let y = self
            .b
            .node("MatMul", &[&flat, &w], vec![], batched(&[outputs]));
        let y = self
            .b
            .node("Add", &[&y, &bias], vec![], batched(&[outputs]));
        let [c, h, w] = out_shape;
        let shape = self
            .b
            .int64_const("shape", &[-1, c as i64, h as i64, w as i64]);
        Ok(self
            .b
            .node("Reshape", &[&y, &shape], vec![], batched(&out_shape)))
    }

    /// Batch norm with running statistics as a per-channel (or, conditional, per-class and
    /// channel, looked up from `class`) scale and shift.
    fn norm(&mut self, x: &str, norm: &ClassBatchNorm, shape: [usize; 3]) -> Result<String> {
        let (scale, shift) = batch_norm_scale_shift(norm.batch_norm())?;
        let c = shape[0];
        let (scale, shift) = match norm.class_tables() {
            Some((gain, bias)) => {
                // (x * scale + shift) * gain[k] + bias[k], per class k.
                let scale = gain.broadcast_mul(&scale.unsqueeze(0)?)?;
                let shift = (bias + gain.broadcast_mul(&shift.unsqueeze(0)?)?)?;
                let classes = scale.dim(0)?;
                let gather = |b: &mut GraphBuilder, table: &Tensor| -> Result<String> {
                    let table = b.float_const("class_table", &[classes, c], &values(table)?);
                    let rows = b.node(
                        "Gather",
                        &[&table, CLASS_INPUT],
                        vec![attr_int("axis", 0)],
                        batched(&[c]),
                    );
                    let as_map = b.int64_const("shape", &[-1, c as i64, 1, 1]);
                    Ok(b.node("Reshape", &[&rows, &as_map], vec![], batched(&[c, 1, 1])))
                };
                (gather(&mut self.b, &scale)?, gather(&mut self.b, &shift)?)
            }
            None => (
                self.b.float_const("scale", &[1, c, 1, 1], &values(&scale)?),
                self.b.float_const("shift", &[1, c, 1, 1], &values(&shift)?),
            ),
        };
        let y = self.b.node("Mul", &[x, &scale], vec![], batched(&shape));
        Ok(self.b.node("Add", &[&y, &shift], vec![], batched(&shape)))
    }

    /// 2x nearest upsampling, in the Resize form every runtime (and candle-onnx) evaluates.
    fn upsample2(&mut self, x: &str, [c, h, w]: [usize; 3]) -> String {
        let scales = self.b.float_const("scales", &[4], &[1.0, 1.0, 2.0, 2.0]);
        self.b.node(
            "Resize",
            &[x, "", &scales],
            vec![
                attr_string("mode", "nearest"),
                attr_string("coordinate_transformation_mode", "asymmetric"),
                attr_string("nearest_mode", "floor"),
            ],
            batched(&[c, 2 * h, 2 * w]),
        )
    }

    /// The residual block, op for op as `GeneratorBlock::forward`.
    fn generator_block(
        &mut self,
        x: &str,
        block: &GeneratorBlock,
        in_shape: [usize; 3],
        out_shape: [usize; 3],
    ) -> Result<String> {
        let [norm1, norm2] = block.norms();
        let [conv1, conv2] = block.convs();
        let [_, hin, win] = in_shape;
        let h = self.norm(x, norm1, in_shape)?;
        let mut h = self.activation(&h, Activation::Relu, in_shape);
        let mut skip = x.to_string();
        let mut skip_shape = in_shape;
        if let Some(conv) = block.shortcut() {
            skip_shape = [out_shape[0], hin, win];
            skip = self.conv1x1(x, conv, skip_shape)?;
        }
        if block.upsamples() {
            h = self.upsample2(&h, in_shape);
            skip = self.upsample2(&skip, skip_shape);
        }
        let h = self.conv(&h, conv1, None, Activation::None, out_shape)?;
        let h = self.norm(&h, norm2, out_shape)?;
        let h = self.activation(&h, Activation::Relu, out_shape);
        let h = self.conv(&h, conv2, None, Activation::None, out_shape)?;
        Ok(self
            .b
            .node("Add", &[&h, &skip], vec![], batched(&out_shape)))
    }

    fn conv1x1(&mut self, x: &str, conv: &SNConv2d, shape: [usize; 3]) -> Result<String> {
        self.conv(x, conv, None, Activation::None, shape)
    }

    /// The attention block, op for op as `SelfAttention::forward_with_map`.
    fn attention(
        &mut self,
        x: &str,
        attn: &SelfAttention,
        [c, h, w]: [usize; 3],
    ) -> Result<String> {
        let (n, c8, cv) = (
            h * w,
            attn.query().bias().dim(0)?,
            attn.value().bias().dim(0)?,
        );
        let q = self.conv1x1(x, attn.query(), [c8, h, w])?;
        let mut k = self.conv1x1(x, attn.key(), [c8, h, w])?;
        let mut v = self.conv1x1(x, attn.value(), [cv, h, w])?;
        let (kh, kw) = match attn.is_pooled() {
            true => (h / 2, w / 2),
            false => (h, w),
        };
        let m = kh * kw;
        if attn.is_pooled() {
            let pool = |b: &mut GraphBuilder, t: &str, ch: usize| {
                b.node(
                    "MaxPool",
                    &[t],
                    vec![
                        attr_ints("kernel_shape", &[2, 2]),
                        attr_ints("strides", &[2, 2]),
                    ],
                    batched(&[ch, kh, kw]),
                )
            };
            k = pool(&mut self.b, &k, c8);
            v = pool(&mut self.b, &v, cv);
        }
        let flat = |b: &mut GraphBuilder, t: &str, ch: usize, len: usize| {
            let shape = b.int64_const("shape", &[-1, ch as i64, len as i64]);
            b.node("Reshape", &[t, &shape], vec![], batched(&[ch, len]))
        };
        let q = flat(&mut self.b, &q, c8, n);
        let k = flat(&mut self.b, &k, c8, m);
        let v = flat(&mut self.b, &v, cv, m);
        let qt = self.b.node(
            "Transpose",
            &[&q],
            vec![attr_ints("perm", &[0, 2, 1])],
            batched(&[n, c8]),
        );
        let energy = self.b.node("MatMul", &[&qt, &k], vec![], batched(&[n, m]));
        let attention = self.b.node(
            "Softmax",
            &[&energy],
            vec![attr_int("axis", -1)],
            batched(&[n, m]),
        );
        let attention_t = self.b.node(
            "Transpose",
            &[&attention],
            vec![attr_ints("perm", &[0, 2, 1])],
            batched(&[m, n]),
        );
        let o = self
            .b
            .node("MatMul", &[&v, &attention_t], vec![], batched(&[cv, n]));
        let image_shape = self
            .b
            .int64_const("shape", &[-1, cv as i64, h as i64, w as i64]);
        let mut o = self
            .b
            .node("Reshape", &[&o, &image_shape], vec![], batched(&[cv, h, w]));
        if let Some(output) = attn.output() {
            o = self.conv1x1(&o, output, [c, h, w])?;
        }
        let gamma = self.b.float_const("gamma", &[1], &values(attn.gamma())?);
        let scaled = self
            .b
            .node("Mul", &[&o, &gamma], vec![], batched(&[c, h, w]));
        if let Some(outputs) = self.attention_outputs.as_deref_mut() {
            let name = format!("attention_{}", outputs.len());
            self.b.rename(&attention, &name);
            self.b.output(&name, batched(&[n, m]));
            outputs.push(name);
        }
        Ok(self
            .b
            .node("Add", &[&scaled, x], vec![], batched(&[c, h, w])))
    }
}

/// Builds the ONNX model of `generator` (evaluation mode).
pub fn generator_to_onnx(
    generator: &Generator,
    cfg: &ModelConfig,
    metadata: Vec<(String, String)>,
    opts: &ExportOptions,
) -> Result<ModelProto> {
    let mut attention_outputs = Vec::new();
    let mut emitter = Emitter {
        b: GraphBuilder::default(),
        leaky_slope: cfg.leaky_slope,
        attention_outputs: opts.attention_maps.then_some(&mut attention_outputs),
    };
    emitter.b.input("z", DataType::Float, batched(&[cfg.z_dim]));
    if cfg.is_conditional() {
        emitter.b.input(CLASS_INPUT, DataType::Int64, batched(&[]));
    }
    let as_image = emitter
        .b
        .int64_const("shape", &[-1, cfg.z_dim as i64, 1, 1]);
    let mut x = emitter.b.node(
        "Reshape",
        &["z", &as_image],
        vec![],
        batched(&[cfg.z_dim, 1, 1]),
    );
    let shapes = cfg.generator.shapes((cfg.z_dim, 1, 1), "generator")?;
    let mut in_shape = [cfg.z_dim, 1, 1];
    for (layer, &(c, h, w)) in generator.stack().layers().iter().zip(&shapes) {
        let shape = [c, h, w];
        x = match layer {
            Layer::Conv {
                conv,
                batch_norm,
                act,
            } => emitter.conv(&x, conv, batch_norm.as_ref(), *act, shape)?,
            Layer::Attention(attn) => emitter.attention(&x, attn, shape)?,
            Layer::Linear { linear, .. } => emitter.linear(&x, linear, shape)?,
            Layer::GeneratorBlock(block) => emitter.generator_block(&x, block, in_shape, shape)?,
            Layer::Norm { norm, act } => {
                let y = emitter.norm(&x, norm, shape)?;
                emitter.activation(&y, *act, shape)
            }
            Layer::DiscriminatorBlock(_) | Layer::ProjectionHead(_) => {
                return Err(Error::Config(format!(
                    "{}: discriminator layers cannot be exported in a generator",
                    cfg.name
                )))
            }
        };
        in_shape = shape;
    }
    let mut b = emitter.b;
    b.rename(&x, "image");
    b.output(
        "image",
        batched(&[cfg.channels, cfg.image_size, cfg.image_size]),
    );
    let mut metadata = metadata;
    metadata.push((
        "sagan.attention_outputs".into(),
        attention_outputs.len().to_string(),
    ));
    let mut model = b.into_model(&cfg.name, metadata);
    if let Some(graph) = model.graph.as_mut() {
        // `image` first: runtimes list outputs in this order.
        graph.output.sort_by_key(|o| o.name != "image");
    }
    if opts.decompose_conv_transpose {
        decompose::decompose_conv_transpose(&mut model)?;
    }
    Ok(model)
}

/// Evaluates `model` with candle-onnx on `z` [n, z_dim] and, for a conditional model, `classes`
/// [n] (decomposing ConvTranspose, which its evaluator lacks), returning every output.
pub fn evaluate(
    model: &ModelProto,
    z: &Tensor,
    classes: Option<&Tensor>,
) -> Result<HashMap<String, Tensor>> {
    let mut model = model.clone();
    decompose::decompose_conv_transpose(&mut model)?;
    let mut inputs = HashMap::from([("z".to_string(), z.clone())]);
    if let Some(classes) = classes {
        inputs.insert(
            CLASS_INPUT.to_string(),
            classes.to_dtype(candle_core::DType::I64)?,
        );
    }
    Ok(candle_onnx::simple_eval(&model, inputs)?)
}

/// Max |candle - ONNX| over `image` and any attention outputs, for latents `z` (and classes).
pub fn max_abs_diff(
    model: &ModelProto,
    generator: &Generator,
    z: &Tensor,
    classes: Option<&Tensor>,
) -> Result<f32> {
    let outputs = evaluate(model, z, classes)?;
    let (image, maps) = generator.forward_with_attention(z, classes, false)?;
    let mut expected = vec![("image".to_string(), image)];
    expected.extend(
        maps.into_iter()
            .enumerate()
            .map(|(i, m)| (format!("attention_{i}"), m)),
    );
    let mut worst = 0f32;
    for (name, want) in expected {
        let Some(got) = outputs.get(&name) else {
            continue;
        };
        let diff = (got - &want)?.abs()?.max_all()?.to_scalar::<f32>()?;
        worst = worst.max(if diff.is_nan() { f32::INFINITY } else { diff });
    }
    Ok(worst)
}

/// A generator loaded from a checkpoint file.
pub struct LoadedGenerator {
    pub generator: Generator,
    pub meta: Metadata,
    pub path: PathBuf,
}

/// Loads a generator checkpoint, refusing files that hold anything else.
pub fn load_generator(path: &Path, device: &Device) -> Result<LoadedGenerator> {
    let (tensors, meta) = checkpoint::load(path, device)?;
    if !matches!(meta.kind, Kind::Generator | Kind::GeneratorEma) {
        return Err(Error::Checkpoint {
            path: path.to_path_buf(),
            msg: format!("is a {} checkpoint, not a generator", meta.kind.name()),
        });
    }
    checkpoint::check_siblings(path, &meta)?;
    // The stored preset says what to build; one that declares far more weights than the file
    // holds (an edited or corrupt preset) is refused before they are allocated.
    let stored: usize = tensors.values().map(Tensor::elem_count).sum();
    let (declared, _) = crate::train::memory::parameter_counts(&meta.model);
    if declared > 2.0 * stored as f64 {
        return Err(Error::Checkpoint {
            path: path.to_path_buf(),
            msg: format!(
                "its preset declares a generator of about {declared:.0} parameters, but the file holds {stored} values: the preset does not match the weights"
            ),
        });
    }
    let varmap = VarMap::new();
    let vb = crate::rng::seeded_var_builder(&varmap, crate::rng::stream(0, 0), device);
    let generator = Generator::new(vb, &meta.model)?;
    checkpoint::restore_varmap(&varmap, &tensors, path)?;
    Ok(LoadedGenerator {
        generator,
        meta,
        path: path.to_path_buf(),
    })
}

/// The generator file to export for `checkpoint`: a file, a step directory, a run directory,
/// or (None) the newest checkpoint under `runs/`.
pub fn resolve_checkpoint(checkpoint: Option<&Path>, weights: Weights) -> Result<PathBuf> {
    let step_dir = match checkpoint {
        Some(path) if path.is_file() => return Ok(path.to_path_buf()),
        Some(path) if path.join(Kind::Generator.file_name()).is_file() => path.to_path_buf(),
        Some(path) if path.is_dir() => {
            let run = RunDir::new(path);
            let step = run.latest_step()?.ok_or_else(|| Error::Checkpoint {
                path: path.to_path_buf(),
                msg: "holds no checkpoint (expected RUN_DIR/checkpoints/step-N/generator.safetensors)".into(),
            })?;
            run.step_dir(step)
        }
        Some(path) => {
            return Err(Error::io(
                path,
                std::io::Error::new(std::io::ErrorKind::NotFound, "no such file or directory"),
            ))
        }
        None => newest_checkpoint(Path::new("runs"))?,
    };
    let ema = step_dir.join(Kind::GeneratorEma.file_name());
    Ok(match weights {
        Weights::Preferred if ema.is_file() => ema,
        _ => step_dir.join(Kind::Generator.file_name()),
    })
}

/// The most recently written step directory of any run under `runs`.
fn newest_checkpoint(runs: &Path) -> Result<PathBuf> {
    let none = || Error::Checkpoint {
        path: runs.to_path_buf(),
        msg: "no training run found: run sagan-train first, or pass --checkpoint".into(),
    };
    let entries = std::fs::read_dir(runs).map_err(|_| none())?;
    let mut newest: Option<(std::time::SystemTime, PathBuf)> = None;
    for run in entries.filter_map(|e| e.ok()) {
        let run = RunDir::new(run.path());
        if let Some(step) = run.latest_step()? {
            let dir = run.step_dir(step);
            let modified = std::fs::metadata(&dir)
                .and_then(|m| m.modified())
                .map_err(|e| Error::io(&dir, e))?;
            if newest.as_ref().is_none_or(|(t, _)| modified > *t) {
                newest = Some((modified, dir));
            }
        }
    }
    newest.map(|(_, dir)| dir).ok_or_else(none)
}

/// What an export wrote.
#[derive(Debug, Clone)]
pub struct ExportReport {
    pub checkpoint: PathBuf,
    pub output: PathBuf,
    pub preset: String,
    pub step: usize,
    pub bytes: usize,
    pub nodes: usize,
    pub max_abs_diff: f32,
}

/// Latents the export is verified on: a few, seeded, so reruns are comparable.
pub fn verification_latents(n: usize, z_dim: usize, device: &Device) -> Result<Tensor> {
    Ok(crate::rng::normal_tensor(
        &mut crate::rng::stream(0, crate::rng::streams::FIXED_Z),
        n,
        z_dim,
        device,
    )?)
}

/// Classes the export of a conditional model is verified on: spread over the range, first
/// and last included.
pub fn verification_classes(
    n: usize,
    num_classes: usize,
    device: &Device,
) -> Result<Option<Tensor>> {
    if num_classes == 0 {
        return Ok(None);
    }
    let classes: Vec<u32> = (0..n)
        .map(|i| (i * (num_classes - 1) / (n - 1).max(1)) as u32)
        .collect();
    Ok(Some(Tensor::from_vec(classes, n, device)?))
}

/// Whether `path` holds an ONNX model that sagan wrote (its producer metadata says so).
pub fn is_sagan_onnx(path: &Path) -> bool {
    // An ONNX file is at most 2 GiB (protobuf's limit); anything larger is something else.
    let small = std::fs::metadata(path).is_ok_and(|m| m.len() < 1 << 31);
    small
        && std::fs::read(path)
            .ok()
            .and_then(|bytes| ModelProto::decode(bytes.as_slice()).ok())
            .is_some_and(|m| {
                m.metadata_props
                    .iter()
                    .any(|p| p.key == "producer" && p.value.starts_with("sagan "))
            })
}

/// Refuses an output path that would replace something sagan did not write: a checkpoint
/// passed where the output goes is an easy slip, and the run could not be resumed after it.
fn check_output(output: &Path, force: bool) -> Result<()> {
    let refuse = |msg: &str| {
        Err(Error::WouldOverwrite {
            path: output.to_path_buf(),
            msg: msg.to_string(),
        })
    };
    if output.extension().is_some_and(|e| e == "safetensors") {
        return refuse("an ONNX model is never written under a .safetensors name (is this the checkpoint? pass it with --checkpoint)");
    }
    match std::fs::symlink_metadata(output) {
        Err(_) => Ok(()),
        Ok(m) if m.is_dir() => refuse("is a directory; name the .onnx file to write"),
        Ok(_) if force || is_sagan_onnx(output) => Ok(()),
        Ok(_) => refuse("exists and is not an ONNX model written by sagan; not replacing it (pass --force to replace it anyway)"),
    }
}

/// Exports the generator in `checkpoint` to `output`. The file is written to a temporary
/// path, read back, evaluated against the candle generator, and only renamed into place if
/// it reproduces it within [`EXPORT_TOLERANCE`].
pub fn export_checkpoint(
    checkpoint: &Path,
    output: &Path,
    opts: &ExportOptions,
) -> Result<ExportReport> {
    check_output(output, opts.force)?;
    let device = Device::Cpu;
    let loaded = load_generator(checkpoint, &device)?;
    let cfg = &loaded.meta.model;
    if opts.attention_maps && !cfg.has_attention() {
        tracing::warn!(
            "--attention-maps: preset {} has no attention layer, so the model gets no map outputs",
            cfg.name
        );
    }
    let metadata = vec![
        ("sagan.preset".to_string(), cfg.name.clone()),
        ("sagan.model".to_string(), cfg.to_json()),
        ("sagan.step".to_string(), loaded.meta.step.to_string()),
        ("sagan.z_dim".to_string(), cfg.z_dim.to_string()),
        ("sagan.channels".to_string(), cfg.channels.to_string()),
        ("sagan.image_size".to_string(), cfg.image_size.to_string()),
        ("sagan.num_classes".to_string(), cfg.num_classes.to_string()),
        ("sagan.value_range".to_string(), "-1,1".to_string()),
        (
            "sagan.weights".to_string(),
            loaded.meta.kind.name().to_string(),
        ),
        (
            "producer".to_string(),
            format!("sagan {}", env!("CARGO_PKG_VERSION")),
        ),
    ];
    let model = generator_to_onnx(&loaded.generator, cfg, metadata, opts)?;
    let bytes = model.encode_to_vec();
    let z = verification_latents(4, cfg.z_dim, &device)?;
    let classes = verification_classes(4, cfg.num_classes, &device)?;
    let mut max_diff = 0.0;
    let at_output = |e: std::io::Error| Error::io(output, e);
    crate::fsutil::write_atomic_with(output, |tmp| {
        std::fs::write(tmp, &bytes).map_err(at_output)?;
        let written = std::fs::read(tmp).map_err(at_output)?;
        let reread = ModelProto::decode(written.as_slice()).map_err(|e| Error::Checkpoint {
            path: output.to_path_buf(),
            msg: format!("the written model does not decode: {e}"),
        })?;
        max_diff = max_abs_diff(&reread, &loaded.generator, &z, classes.as_ref())?;
        if max_diff.is_finite() && max_diff <= EXPORT_TOLERANCE {
            Ok(())
        } else {
            Err(Error::Checkpoint {
                path: output.to_path_buf(),
                msg: format!("the exported graph differs from the generator by {max_diff:e} (tolerance {EXPORT_TOLERANCE:e}); nothing written"),
            })
        }
    })?;
    Ok(ExportReport {
        checkpoint: loaded.path,
        output: output.to_path_buf(),
        preset: cfg.name.clone(),
        step: loaded.meta.step,
        bytes: bytes.len(),
        nodes: model.graph.as_ref().map_or(0, |g| g.node.len()),
        max_abs_diff: max_diff,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::BUILTIN_PRESETS;
    use crate::rng::{seeded_var_builder, stream};

    /// Found by fuzzing: a generator checkpoint whose stored preset was edited to 2^20
    /// channels (in range for a preset) aborted the process allocating 16 GiB of weights.
    #[test]
    fn a_stored_preset_larger_than_its_weights_is_refused_before_building() {
        let cfg = ModelConfig::resolve("dcgan-mnist28").unwrap();
        let varmap = VarMap::new();
        Generator::new(
            seeded_var_builder(&varmap, stream(1, 0), &Device::Cpu),
            &cfg,
        )
        .unwrap();
        let mut huge = cfg.clone();
        if let crate::config::LayerConfig::ConvTranspose(c) = &mut huge.generator.layers[0] {
            // Large enough to tell, small enough that a regression fails instead of aborting.
            c.out = 1 << 14;
        }
        huge.validate().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("generator.safetensors");
        let meta = Metadata {
            kind: Kind::Generator,
            train: crate::config::TrainConfig::default(),
            model: huge,
            step: 1,
            run_id: None,
        };
        checkpoint::save(&path, &checkpoint::varmap_tensors(&varmap), &meta).unwrap();
        let err = load_generator(&path, &Device::Cpu)
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.starts_with(&path.display().to_string())
                && err.contains("its preset declares a generator of about")
                && err.contains("the preset does not match the weights"),
            "{err}"
        );
    }

    /// A generator with non-trivial state: SN vectors iterated, BN statistics moved, gammas set.
    fn trained_like(cfg: &ModelConfig) -> Generator {
        let varmap = VarMap::new();
        let g =
            Generator::new(seeded_var_builder(&varmap, stream(9, 1), &Device::Cpu), cfg).unwrap();
        let z = verification_latents(8, cfg.z_dim, &Device::Cpu).unwrap();
        let classes = verification_classes(8, cfg.num_classes, &Device::Cpu).unwrap();
        for _ in 0..3 {
            g.forward(&z, classes.as_ref(), true).unwrap();
        }
        let data = varmap.data().lock().unwrap();
        for (name, var) in data.iter() {
            if name.ends_with("gamma") {
                var.set(&Tensor::new(&[0.8f32], &Device::Cpu).unwrap())
                    .unwrap();
            }
            // Class tables away from their initial 1 and 0, so each class differs.
            if name.ends_with(".gain") || name.ends_with(".bias") && name.contains("norm") {
                let n = var.elem_count();
                let noise = crate::rng::normal_vec(&mut stream(10, n as u64), n);
                let noise = Tensor::from_vec(noise, var.shape(), &Device::Cpu).unwrap();
                var.set(&(var.as_tensor() + (noise * 0.3).unwrap()).unwrap())
                    .unwrap();
            }
        }
        g
    }

    /// The built-in presets but sagan128 (too big for a unit test: the integration tests cover
    /// it), and sagan-cond-mnist32 with plain attention as well as its own pooled one.
    fn presets_under_test() -> Vec<ModelConfig> {
        let mut presets: Vec<ModelConfig> = BUILTIN_PRESETS
            .iter()
            .filter(|(name, _)| *name != "sagan128")
            .map(|(name, _)| ModelConfig::resolve(name).unwrap())
            .collect();
        let mut plain = ModelConfig::resolve("sagan-cond-mnist32").unwrap();
        for layer in &mut plain.generator.layers {
            if let crate::config::LayerConfig::Attention(a) = layer {
                a.pooled = false;
            }
        }
        plain.name = "sagan-cond-mnist32-plain".into();
        presets.push(plain);
        presets
    }

    #[test]
    fn decomposed_export_matches_candle_within_1e5_for_every_preset() {
        for cfg in presets_under_test() {
            let name = &cfg.name;
            let g = trained_like(&cfg);
            let opts = ExportOptions {
                attention_maps: true,
                decompose_conv_transpose: true,
                force: false,
            };
            let model = generator_to_onnx(&g, &cfg, vec![], &opts).unwrap();
            assert!(model
                .graph
                .as_ref()
                .unwrap()
                .node
                .iter()
                .all(|n| n.op_type != "ConvTranspose"));
            let z = verification_latents(3, cfg.z_dim, &Device::Cpu).unwrap();
            let classes = verification_classes(3, cfg.num_classes, &Device::Cpu).unwrap();
            let diff = max_abs_diff(&model, &g, &z, classes.as_ref()).unwrap();
            assert!(diff <= 1e-5, "{name}: max abs diff {diff}");
            let outputs = evaluate(&model, &z, classes.as_ref()).unwrap();
            let attention = cfg
                .generator
                .layers
                .iter()
                .filter(|l| matches!(l, crate::config::LayerConfig::Attention(_)))
                .count();
            assert_eq!(outputs.len(), 1 + attention, "{name}");
        }
    }
}
