//! Typed model presets. A preset is a TOML file in `models/` listing the layers of G and D; it
//! is stored in every checkpoint's metadata so later tools know what they are reading.

use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// Presets compiled into the binaries, so `--preset NAME` works from any directory.
pub const BUILTIN_PRESETS: &[(&str, &str)] = &[
    (
        "sagan-mnist28",
        include_str!("../models/sagan-mnist28.toml"),
    ),
    (
        "dcgan-mnist28",
        include_str!("../models/dcgan-mnist28.toml"),
    ),
    ("sagan64", include_str!("../models/sagan64.toml")),
    ("dcgan64", include_str!("../models/dcgan64.toml")),
    (
        "sagan-cond-mnist32",
        include_str!("../models/sagan-cond-mnist32.toml"),
    ),
    ("sagan128", include_str!("../models/sagan128.toml")),
];

pub use crate::ops::Activation;

/// A spectrally normalised (transposed) convolution, optionally followed by batch norm, then `act`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConvConfig {
    pub out: usize,
    pub kernel: usize,
    #[serde(default = "one")]
    pub stride: usize,
    #[serde(default)]
    pub padding: usize,
    #[serde(default)]
    pub batch_norm: bool,
    #[serde(default = "no_activation")]
    pub act: Activation,
}

/// The self-attention block's form.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AttentionConfig {
    /// The official SAGAN code's memory-lean form: keys and values 2x2 max-pooled (N/4 keys),
    /// values at C/2 with a 1x1 output conv back to C.
    #[serde(skip_serializing_if = "is_false")]
    pub pooled: bool,
}

/// A spectrally normalised linear map of the flattened input, reshaped to `out x size x size`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LinearConfig {
    pub out: usize,
    pub size: usize,
}

/// The generator's residual block: BN, ReLU, 2x nearest upsample, 3x3 conv, BN, ReLU, 3x3 conv;
/// shortcut: upsample and 1x1 conv. The batch norms are class-conditional in a conditional model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GeneratorBlockConfig {
    pub out: usize,
    #[serde(default = "yes")]
    pub upsample: bool,
}

/// The discriminator's residual block: ReLU, 3x3 conv, ReLU, 3x3 conv, 2x2 average pool;
/// shortcut: 1x1 conv and average pool. The first block of D has no leading ReLU
/// (`preactivation = false`): its input is the image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiscriminatorBlockConfig {
    pub out: usize,
    #[serde(default = "yes")]
    pub downsample: bool,
    #[serde(default = "yes")]
    pub preactivation: bool,
}

/// Batch norm (never class-conditional) followed by `act`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NormConfig {
    pub act: Activation,
}

/// One layer of a generator or discriminator, in order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum LayerConfig {
    Conv(ConvConfig),
    ConvTranspose(ConvConfig),
    /// SAGAN self-attention block; keeps the shape.
    Attention(AttentionConfig),
    Linear(LinearConfig),
    GeneratorBlock(GeneratorBlockConfig),
    DiscriminatorBlock(DiscriminatorBlockConfig),
    BatchNorm(NormConfig),
    /// The projection discriminator's head: ReLU, global sum pool, linear to one logit, plus
    /// <embed(class), features> in a conditional model (Miyato & Koyama 2018).
    ProjectionHead,
}

fn yes() -> bool {
    true
}

fn is_false(b: &bool) -> bool {
    !*b
}

fn one() -> usize {
    1
}

fn no_activation() -> Activation {
    Activation::None
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetConfig {
    pub layers: Vec<LayerConfig>,
}

/// How the weights and biases of the (transposed) convolutions and linear layers start. Under
/// spectral normalisation a weight's scale does not change the forward pass, but it sets how far
/// each Adam step moves the normalised weight: a smaller weight turns faster.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WeightInit {
    /// PyTorch's layer default, which the PyTorch SAGANs keep: weight and bias uniform in
    /// +-1/sqrt(fan_in), with fan_in counted as PyTorch does (dimension 1 times the kernel area,
    /// so out * k * k for a transposed convolution's [in, out, k, k] weight).
    #[default]
    Pytorch,
    /// Weights from N(0, 0.02), zero biases: the DCGAN convention.
    Normal,
    /// Glorot uniform weights, zero biases: the official TensorFlow SAGAN's.
    Xavier,
    /// Orthogonal weights (rows or columns orthonormal), PyTorch's default biases: BigGAN's.
    Orthogonal,
}

/// Training settings a preset may carry; `sagan-train`'s flags override them, and what neither
/// sets comes from `TrainConfig::default()` (the paper's).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PresetTraining {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub steps: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub batch_size: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lr_d: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lr_g: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub beta1: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub beta2: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub n_dis: Option<usize>,
    /// 0 keeps no average.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ema_decay: Option<f64>,
}

impl PresetTraining {
    fn is_empty(&self) -> bool {
        *self == Self::default()
    }

    /// These settings, with `under`'s where these leave one unset.
    pub fn over(&self, under: &PresetTraining) -> PresetTraining {
        PresetTraining {
            steps: self.steps.or(under.steps),
            batch_size: self.batch_size.or(under.batch_size),
            lr_d: self.lr_d.or(under.lr_d),
            lr_g: self.lr_g.or(under.lr_g),
            beta1: self.beta1.or(under.beta1),
            beta2: self.beta2.or(under.beta2),
            n_dis: self.n_dis.or(under.n_dis),
            ema_decay: self.ema_decay.or(under.ema_decay),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    pub name: String,
    pub channels: usize,
    pub image_size: usize,
    pub z_dim: usize,
    /// Classes of a class-conditional model; 0 for an unconditional one.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub num_classes: usize,
    /// Negative slope of every LeakyReLU.
    #[serde(default = "default_leaky_slope")]
    pub leaky_slope: f64,
    #[serde(default)]
    pub init: WeightInit,
    #[serde(default, skip_serializing_if = "PresetTraining::is_empty")]
    pub training: PresetTraining,
    pub generator: NetConfig,
    pub discriminator: NetConfig,
}

fn default_leaky_slope() -> f64 {
    0.1
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

/// Shape of a feature map flowing through a network: channels, height, width.
pub type FeatureShape = (usize, usize, usize);

impl LayerConfig {
    /// The output shape for `input`, or why the layer cannot take it.
    pub fn output_shape(
        &self,
        (c, h, w): FeatureShape,
    ) -> std::result::Result<FeatureShape, String> {
        match *self {
            LayerConfig::Conv(ConvConfig {
                out,
                kernel,
                stride,
                padding,
                ..
            }) => {
                if stride == 0 || h + 2 * padding < kernel || w + 2 * padding < kernel {
                    return Err(format!(
                        "conv k{kernel} s{stride} p{padding} cannot take {h}x{w}"
                    ));
                }
                Ok((
                    out,
                    (h + 2 * padding - kernel) / stride + 1,
                    (w + 2 * padding - kernel) / stride + 1,
                ))
            }
            LayerConfig::ConvTranspose(ConvConfig {
                out,
                kernel,
                stride,
                padding,
                ..
            }) => {
                let size = |s: usize| ((s - 1) * stride + kernel).checked_sub(2 * padding);
                match (stride, size(h), size(w)) {
                    (1.., Some(oh @ 1..), Some(ow @ 1..)) => Ok((out, oh, ow)),
                    _ => Err(format!(
                        "conv_transpose k{kernel} s{stride} p{padding} cannot take {h}x{w}"
                    )),
                }
            }
            LayerConfig::Attention(_) if c < 8 => Err(format!(
                "attention needs at least 8 channels (query/key use C/8), got {c}"
            )),
            LayerConfig::Attention(AttentionConfig { pooled: true })
                if h % 2 != 0 || w % 2 != 0 =>
            {
                Err(format!(
                    "pooled attention max-pools 2x2, so it needs an even size, got {h}x{w}"
                ))
            }
            LayerConfig::Attention(_) => Ok((c, h, w)),
            LayerConfig::Linear(LinearConfig { out, size }) => match out * size {
                0 => Err("linear needs positive out and size".into()),
                _ => Ok((out, size, size)),
            },
            LayerConfig::GeneratorBlock(GeneratorBlockConfig { out, upsample }) => {
                let scale = if upsample { 2 } else { 1 };
                Ok((out, h * scale, w * scale))
            }
            LayerConfig::DiscriminatorBlock(DiscriminatorBlockConfig {
                out, downsample, ..
            }) => match downsample {
                true if h % 2 != 0 || w % 2 != 0 || h < 2 || w < 2 => Err(format!(
                    "a downsampling block average-pools 2x2, so it needs an even size, got {h}x{w}"
                )),
                true => Ok((out, h / 2, w / 2)),
                false => Ok((out, h, w)),
            },
            LayerConfig::BatchNorm(_) => Ok((c, h, w)),
            LayerConfig::ProjectionHead => Ok((1, 1, 1)),
        }
    }
}

/// The largest channel count, latent size or class count a preset may state.
const MAX_SIZE: usize = 1 << 20;
const MAX_IMAGE_SIZE: usize = 4096;
const MAX_KERNEL: usize = 15;

fn in_range(field: &str, value: usize, min: usize, max: usize) -> std::result::Result<(), String> {
    if (min..=max).contains(&value) {
        Ok(())
    } else {
        Err(format!(
            "{field} must be between {min} and {max}, got {value}"
        ))
    }
}

impl LayerConfig {
    /// The layer's `type` as written in a preset.
    pub fn kind(&self) -> &'static str {
        match self {
            LayerConfig::Conv(_) => "conv",
            LayerConfig::ConvTranspose(_) => "conv_transpose",
            LayerConfig::Attention(_) => "attention",
            LayerConfig::Linear(_) => "linear",
            LayerConfig::GeneratorBlock(_) => "generator_block",
            LayerConfig::DiscriminatorBlock(_) => "discriminator_block",
            LayerConfig::BatchNorm(_) => "batch_norm",
            LayerConfig::ProjectionHead => "projection_head",
        }
    }

    fn check_fields(&self) -> std::result::Result<(), String> {
        match *self {
            LayerConfig::Conv(c) | LayerConfig::ConvTranspose(c) => {
                in_range("out", c.out, 1, MAX_SIZE)?;
                in_range("kernel", c.kernel, 1, MAX_KERNEL)?;
                in_range("stride", c.stride, 1, MAX_KERNEL)?;
                in_range("padding", c.padding, 0, c.kernel - 1)
            }
            LayerConfig::Linear(l) => {
                in_range("out", l.out, 1, MAX_SIZE)?;
                in_range("size", l.size, 1, MAX_IMAGE_SIZE)
            }
            LayerConfig::GeneratorBlock(GeneratorBlockConfig { out, .. })
            | LayerConfig::DiscriminatorBlock(DiscriminatorBlockConfig { out, .. }) => {
                in_range("out", out, 1, MAX_SIZE)
            }
            LayerConfig::Attention(_) | LayerConfig::BatchNorm(_) | LayerConfig::ProjectionHead => {
                Ok(())
            }
        }
    }
}

impl NetConfig {
    /// Walks the layers from `input`, returning every layer's output shape.
    pub fn shapes(&self, input: FeatureShape, net: &str) -> Result<Vec<FeatureShape>> {
        let mut shape = input;
        let mut shapes = Vec::with_capacity(self.layers.len());
        for (i, layer) in self.layers.iter().enumerate() {
            shape = layer
                .output_shape(shape)
                .map_err(|msg| Error::Config(format!("{net} layer {i}: {msg}")))?;
            shapes.push(shape);
        }
        Ok(shapes)
    }
}

impl ModelConfig {
    pub fn from_toml(text: &str) -> Result<Self> {
        let cfg: ModelConfig =
            toml::from_str(text).map_err(|e| Error::Config(toml_error(&e, text)))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// A built-in preset by name, or a TOML file when `name_or_path` ends in `.toml`.
    pub fn resolve(name_or_path: &str) -> Result<Self> {
        if name_or_path.ends_with(".toml") {
            let path = Path::new(name_or_path);
            let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
            return Self::from_toml(&text).map_err(|e| Error::Preset {
                path: path.to_path_buf(),
                msg: match e {
                    Error::Config(msg) => msg,
                    other => other.to_string(),
                },
            });
        }
        match BUILTIN_PRESETS
            .iter()
            .find(|(name, _)| *name == name_or_path)
        {
            Some((_, text)) => Self::from_toml(text),
            None => Err(Error::Config(format!(
                "unknown preset '{name_or_path}' (built-in: {}; or pass a .toml file)",
                preset_names().join(", ")
            ))),
        }
    }

    /// Checks every field's range, then that G maps z to an image of the stated shape and that
    /// D maps it to one logit.
    pub fn validate(&self) -> Result<()> {
        self.check_fields().map_err(Error::Config)?;
        if !matches!(self.channels, 1 | 3) {
            return Err(Error::Config(format!(
                "{}: channels must be 1 or 3, got {}",
                self.name, self.channels
            )));
        }
        if self.z_dim == 0 {
            return Err(Error::Config(format!(
                "{}: z_dim must be positive",
                self.name
            )));
        }
        let image = (self.channels, self.image_size, self.image_size);
        let g_out = self.generator.shapes((self.z_dim, 1, 1), "generator")?;
        if g_out.last() != Some(&image) {
            return Err(Error::Config(format!(
                "{}: generator produces {:?}, the preset's image is {image:?}",
                self.name,
                g_out.last()
            )));
        }
        let conditional_g = self
            .generator
            .layers
            .iter()
            .any(|l| matches!(l, LayerConfig::GeneratorBlock(_)));
        let projection_d = matches!(
            self.discriminator.layers.last(),
            Some(LayerConfig::ProjectionHead)
        );
        if self.num_classes > 0 && !(conditional_g && projection_d) {
            return Err(Error::Config(format!(
                "{}: a class-conditional model (num_classes = {}) needs generator_block layers \
                 (their batch norms take the class) and a discriminator ending in projection_head",
                self.name, self.num_classes
            )));
        }
        let d_out = self.discriminator.shapes(image, "discriminator")?;
        if d_out.last() != Some(&(1, 1, 1)) {
            return Err(Error::Config(format!(
                "{}: discriminator must end in one 1x1 logit, produces {:?}",
                self.name,
                d_out.last()
            )));
        }
        Ok(())
    }

    /// Ranges of the scalar fields and of every layer's, named as in the preset file. Sizes
    /// are bounded so that no arithmetic on them overflows; whether a large model fits in
    /// memory is the memory estimate's question, not this one.
    fn check_fields(&self) -> std::result::Result<(), String> {
        let valid_name = !self.name.is_empty()
            && self.name.len() <= 64
            && !self.name.starts_with(['.', '-'])
            && self
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
        if !valid_name {
            return Err(format!(
                "name '{}' must be 1-64 letters, digits, '.', '_' or '-', not starting with '.' or '-' \
                 (it names the run directory)",
                self.name
            ));
        }
        TrainConfig::with(&self.training).check(|field| format!("training.{field}"))?;
        in_range("image_size", self.image_size, 4, MAX_IMAGE_SIZE)?;
        in_range("z_dim", self.z_dim, 1, MAX_SIZE)?;
        in_range("num_classes", self.num_classes, 0, MAX_SIZE)?;
        if !(self.leaky_slope.is_finite() && (0.0..1.0).contains(&self.leaky_slope)) {
            return Err(format!(
                "leaky_slope must be in [0, 1), got {}",
                self.leaky_slope
            ));
        }
        for (net, cfg) in [
            ("generator", &self.generator),
            ("discriminator", &self.discriminator),
        ] {
            if cfg.layers.is_empty() {
                return Err(format!("{net} has no layers"));
            }
            for (i, layer) in cfg.layers.iter().enumerate() {
                layer
                    .check_fields()
                    .map_err(|msg| format!("{net} layer {i} ({}): {msg}", layer.kind()))?;
            }
        }
        Ok(())
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    pub fn from_json(text: &str) -> Result<Self> {
        let cfg: ModelConfig =
            serde_json::from_str(text).map_err(|e| Error::Config(e.to_string()))?;
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn has_attention(&self) -> bool {
        self.generator
            .layers
            .iter()
            .any(|l| matches!(l, LayerConfig::Attention(_)))
    }

    pub fn is_conditional(&self) -> bool {
        self.num_classes > 0
    }
}

/// The adversarial loss.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum LossKind {
    /// SAGAN's loss: D minimises relu(1 - D(x)) + relu(1 + D(G(z))), G minimises -D(G(z)).
    #[default]
    Hinge,
    /// The non-saturating loss of the original GAN paper, in logits (softplus).
    NonSaturating,
}

/// Everything that decides what a training run computes. Stored in every checkpoint, so a
/// resumed run continues exactly where it stopped.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    /// Generator steps in total (each preceded by `n_dis` discriminator steps).
    pub steps: usize,
    pub batch_size: usize,
    pub lr_d: f64,
    pub lr_g: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub n_dis: usize,
    pub loss: LossKind,
    /// Decay of the exponential moving average of G's weights; `None` keeps no average.
    pub ema_decay: Option<f64>,
    pub seed: u64,
    /// The training images: an MNIST IDX file or directory, or an image folder; `None` is the
    /// built-in MNIST training set.
    pub data: Option<std::path::PathBuf>,
}

impl Default for TrainConfig {
    /// The SAGAN paper's settings: two time-scale Adam with betas (0, 0.9), hinge loss.
    fn default() -> Self {
        Self {
            steps: 1000,
            batch_size: 64,
            lr_d: 4e-4,
            lr_g: 1e-4,
            beta1: 0.0,
            beta2: 0.9,
            n_dis: 1,
            loss: LossKind::Hinge,
            ema_decay: Some(0.999),
            seed: 0,
            data: None,
        }
    }
}

impl TrainConfig {
    /// The paper's settings, overridden by what `model`'s preset sets.
    pub fn for_preset(model: &ModelConfig) -> Self {
        Self::with(&model.training)
    }

    /// The paper's settings, overridden by what `t` sets.
    pub fn with(t: &PresetTraining) -> Self {
        let d = Self::default();
        Self {
            steps: t.steps.unwrap_or(d.steps),
            batch_size: t.batch_size.unwrap_or(d.batch_size),
            lr_d: t.lr_d.unwrap_or(d.lr_d),
            lr_g: t.lr_g.unwrap_or(d.lr_g),
            beta1: t.beta1.unwrap_or(d.beta1),
            beta2: t.beta2.unwrap_or(d.beta2),
            n_dis: t.n_dis.unwrap_or(d.n_dis),
            ema_decay: t
                .ema_decay
                .map_or(d.ema_decay, |x| Some(x).filter(|&x| x != 0.0)),
            ..d
        }
    }

    /// Checks the ranges, naming a field as its command-line flag (`--lr-g`).
    pub fn validate(&self) -> Result<()> {
        self.check(|field| format!("--{}", field.replace('_', "-")))
            .map_err(Error::Config)
    }

    /// The first field out of range, named by `name(field)`.
    fn check(&self, name: impl Fn(&str) -> String) -> std::result::Result<(), String> {
        for (field, value) in [
            ("steps", self.steps),
            ("batch_size", self.batch_size),
            ("n_dis", self.n_dis),
        ] {
            if value == 0 {
                return Err(format!("{} must be at least 1", name(field)));
            }
        }
        for (field, lr) in [("lr_d", self.lr_d), ("lr_g", self.lr_g)] {
            if !(lr.is_finite() && lr > 0.0) {
                return Err(format!(
                    "{} must be a positive number, got {lr}",
                    name(field)
                ));
            }
        }
        for (field, beta) in [("beta1", self.beta1), ("beta2", self.beta2)] {
            if !(0.0..1.0).contains(&beta) {
                return Err(format!("{} must be in [0, 1), got {beta}", name(field)));
            }
        }
        if let Some(decay) = self.ema_decay {
            if !(0.0..1.0).contains(&decay) {
                return Err(format!(
                    "{} must be in [0, 1) (0 turns it off), got {decay}",
                    name("ema_decay")
                ));
            }
        }
        Ok(())
    }
}

/// A TOML error as one line, "line L, column C: what": the toml crate's own display spreads
/// over several lines to draw the offending text.
fn toml_error(e: &toml::de::Error, text: &str) -> String {
    let message = e.message().trim_end();
    match e.span() {
        Some(span) => {
            let before = &text.as_bytes()[..span.start.min(text.len())];
            let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
            let column = before.iter().rev().take_while(|&&b| b != b'\n').count() + 1;
            format!("line {line}, column {column}: {message}")
        }
        None => message.to_string(),
    }
}

pub fn preset_names() -> Vec<&'static str> {
    BUILTIN_PRESETS.iter().map(|(name, _)| *name).collect()
}

/// A `--preset` value as given (clap's value parser): a built-in name or a .toml file; the
/// error lists the built-in names.
pub fn preset_arg(value: &str) -> std::result::Result<String, String> {
    if value.ends_with(".toml") || preset_names().contains(&value) {
        Ok(value.to_string())
    } else {
        Err(format!(
            "unknown preset (built-in: {}; or a .toml file)",
            preset_names().join(", ")
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preset_args_are_builtin_names_or_toml_files() {
        assert_eq!(preset_arg("sagan64"), Ok("sagan64".to_string()));
        assert_eq!(preset_arg("my.toml"), Ok("my.toml".to_string()));
        let err = preset_arg("sagan65").unwrap_err();
        assert!(
            err.contains("sagan-mnist28") && err.contains(".toml"),
            "{err}"
        );
    }

    #[test]
    fn every_builtin_preset_parses_and_validates() {
        for (name, text) in BUILTIN_PRESETS {
            let cfg = ModelConfig::from_toml(text).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(&cfg.name, name);
            assert_eq!(ModelConfig::from_json(&cfg.to_json()).unwrap(), cfg);
        }
    }

    #[test]
    fn sagan_mnist28_shapes_follow_the_spec() {
        let cfg = ModelConfig::resolve("sagan-mnist28").unwrap();
        let g = cfg.generator.shapes((128, 1, 1), "g").unwrap();
        assert_eq!(
            g,
            vec![(256, 7, 7), (128, 14, 14), (128, 14, 14), (1, 28, 28)]
        );
        let d = cfg.discriminator.shapes((1, 28, 28), "d").unwrap();
        assert_eq!(d, vec![(64, 14, 14), (64, 14, 14), (128, 7, 7), (1, 1, 1)]);
    }

    #[test]
    fn a_preset_whose_generator_misses_the_image_size_is_rejected() {
        let text = BUILTIN_PRESETS[0]
            .1
            .replace("image_size = 28", "image_size = 32");
        let err = ModelConfig::from_toml(&text).unwrap_err().to_string();
        assert!(err.contains("generator produces"), "{err}");
    }

    #[test]
    fn a_misspelt_layer_field_is_rejected() {
        let text = BUILTIN_PRESETS[0].1.replacen("kernel = 7", "kernal = 7", 1);
        let err = ModelConfig::from_toml(&text).unwrap_err().to_string();
        assert!(err.contains("kernal"), "{err}");
    }

    #[test]
    fn a_presets_training_settings_override_the_papers() {
        let cfg = ModelConfig::resolve("sagan-mnist28").unwrap();
        let paper = TrainConfig::default();
        let preset = TrainConfig::for_preset(&cfg);
        assert_eq!(Some(preset.lr_g), cfg.training.lr_g);
        assert_eq!(preset.lr_d, paper.lr_d);
        let edited = ModelConfig {
            training: PresetTraining {
                steps: Some(7),
                batch_size: Some(3),
                ema_decay: Some(0.0),
                ..cfg.training.clone()
            },
            ..cfg.clone()
        };
        let flags = PresetTraining {
            lr_g: Some(1e-3),
            steps: None,
            ..edited.training.clone()
        };
        let merged = flags.over(&edited.training);
        assert_eq!((merged.lr_g, merged.steps), (Some(1e-3), Some(7)));
        let edited = TrainConfig::for_preset(&edited);
        assert_eq!((edited.steps, edited.batch_size), (7, 3));
        assert_eq!(edited.ema_decay, None);
        // What the preset sets travels with it, and nothing it leaves unset.
        let json = cfg.to_json();
        assert!(json.contains("\"training\":{\"steps\":2400,"), "{json}");
        assert!(!json.contains("null"), "{json}");
        assert_eq!(ModelConfig::from_json(&json).unwrap(), cfg);
    }

    #[test]
    fn training_settings_and_init_are_checked_by_name() {
        let typo = BUILTIN_PRESETS[0]
            .1
            .replace("[training]", "[training]\nlr_gg = 1.0");
        let err = ModelConfig::from_toml(&typo).unwrap_err().to_string();
        assert!(err.contains("lr_gg"), "{err}");
        let init = BUILTIN_PRESETS[0]
            .1
            .replace("init = \"pytorch\"", "init = \"kaiming\"");
        let err = ModelConfig::from_toml(&init).unwrap_err().to_string();
        assert!(err.contains("kaiming"), "{err}");
        // A preset without the fields (as stored in older checkpoints) gets the defaults.
        let bare = BUILTIN_PRESETS[0].1.replace("init = \"pytorch\"", "");
        let bare = &bare[..bare.find("[training]").unwrap()];
        let bare = format!(
            "{bare}{}",
            &BUILTIN_PRESETS[0].1[BUILTIN_PRESETS[0].1.find("[generator]").unwrap()..]
        );
        let cfg = ModelConfig::from_toml(&bare).unwrap();
        assert_eq!(
            (cfg.init, cfg.training),
            (WeightInit::Pytorch, PresetTraining::default())
        );
    }

    /// Every field a preset states, set out of range, is refused at load time with the file and
    /// the field in one line (not a panic or an abort later, in spectral norm or an allocation).
    #[test]
    fn out_of_range_preset_fields_are_named_errors() {
        let text = BUILTIN_PRESETS
            .iter()
            .find(|(n, _)| *n == "sagan-mnist28")
            .unwrap()
            .1;
        let cases = [
            (
                text.replacen("out = 256", "out = 0", 1),
                "generator layer 0 (conv_transpose): out must be between 1",
            ),
            (
                text.replacen("z_dim = 128", "z_dim = 0", 1),
                "z_dim must be between 1",
            ),
            (
                text.replacen("z_dim = 128", "z_dim = 100000000", 1),
                "z_dim must be between 1 and 1048576",
            ),
            (
                text.replacen("image_size = 28", "image_size = 0", 1),
                "image_size must be between 4",
            ),
            (
                text.replacen("name = \"sagan-mnist28\"", "name = \"../../x\"", 1),
                "name '../../x' must be",
            ),
            (
                text.replacen("lr_g = 4e-4", "lr_g = -1.0", 1),
                "training.lr_g must be a positive number",
            ),
            (
                text.replacen("batch_size = 32", "batch_size = 0", 1),
                "training.batch_size must be at least 1",
            ),
            (
                text.replacen("kernel = 4", "kernel = 0", 1),
                "kernel must be between 1",
            ),
            (
                text.replacen("kernel = 7", "kernel = 999", 1),
                "kernel must be between 1 and 15",
            ),
        ];
        let dir = tempfile::tempdir().unwrap();
        for (i, (preset, expected)) in cases.iter().enumerate() {
            assert_ne!(preset, text, "case {i} did not change the preset");
            let path = dir.path().join(format!("case{i}.toml"));
            std::fs::write(&path, preset).unwrap();
            let err = ModelConfig::resolve(path.to_str().unwrap())
                .unwrap_err()
                .to_string();
            assert!(
                err.starts_with(&format!("{}: ", path.display())) && err.contains(expected),
                "case {i}: {err}"
            );
            assert_eq!(err.lines().count(), 1, "{err}");
        }
    }

    /// Found by fuzzing: every TOML syntax or type error was several lines (the toml crate
    /// draws the offending text under the message).
    #[test]
    fn toml_errors_are_one_line_with_the_position() {
        let text = BUILTIN_PRESETS[0]
            .1
            .replacen("z_dim = 128", "z_dim = -1e-300", 1);
        let err = ModelConfig::from_toml(&text).unwrap_err().to_string();
        assert!(
            err.starts_with(
                "invalid configuration: line 5, column 9: invalid type: floating point"
            ),
            "{err}"
        );
        assert!(!err.contains('\n'), "{err:?}");
        let err = ModelConfig::from_toml("name = \"x\"\n[generator\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("invalid configuration: line 2, column "),
            "{err}"
        );
        assert!(!err.contains('\n'), "{err:?}");
    }

    #[test]
    fn unknown_preset_names_the_choices() {
        let err = ModelConfig::resolve("nope").unwrap_err().to_string();
        assert!(
            err.contains("nope") && err.contains("sagan-mnist28"),
            "{err}"
        );
    }
}
