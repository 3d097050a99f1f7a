//! How much memory training a preset takes, estimated from the preset alone, so that a model
//! that cannot fit is refused with a message before anything is allocated (an allocation that
//! fails aborts the process; it cannot be turned into an error).

use crate::config::{
    AttentionConfig, ConvConfig, DiscriminatorBlockConfig, FeatureShape, GeneratorBlockConfig,
    LayerConfig, ModelConfig, NetConfig,
};
use crate::{Error, Result};

const GIB: f64 = (1u64 << 30) as f64;

/// Live values per activation element over a training step: the saved forward output, its
/// gradient and the intermediates of the fused layers (batch norm, activation).
const ACTIVATION_COPIES: f64 = 4.0;

/// An estimate of a training step's memory, in bytes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Estimate {
    /// Weights of G (with its moving average) and D, their gradients and Adam's two moments.
    pub parameters: f64,
    /// Activations of the larger of the D step (D on real and fake) and the G step.
    pub activations: f64,
}

impl Estimate {
    pub fn total(&self) -> f64 {
        self.parameters + self.activations
    }
}

/// Parameter count and activation elements per image of one network, walked from `input`.
fn walk(net: &NetConfig, input: FeatureShape, num_classes: usize) -> (f64, f64) {
    let mut shape = input;
    let (mut params, mut activations) = (0.0, 0.0);
    for layer in &net.layers {
        let Ok(out) = layer.output_shape(shape) else {
            break;
        };
        let (c, h, w) = (shape.0 as f64, shape.1 as f64, shape.2 as f64);
        let elements = |(c, h, w): FeatureShape| (c * h * w) as f64;
        params += match *layer {
            LayerConfig::Conv(ConvConfig {
                out,
                kernel,
                batch_norm,
                ..
            })
            | LayerConfig::ConvTranspose(ConvConfig {
                out,
                kernel,
                batch_norm,
                ..
            }) => {
                let (out, area) = (out as f64, (kernel * kernel) as f64);
                // Spectral norm's power-iteration vectors u and v come with each weight.
                out * c * area + c * area + out * if batch_norm { 6.0 } else { 3.0 }
            }
            LayerConfig::Linear(_) => {
                let (inputs, outputs) = (c * h * w, elements(out));
                inputs * outputs + inputs + 3.0 * outputs
            }
            LayerConfig::Attention(AttentionConfig { pooled }) => {
                let values = if pooled { c * c / 2.0 * 2.0 } else { c * c };
                2.0 * c * c / 8.0 + values + 8.0 * c + 1.0
            }
            LayerConfig::GeneratorBlock(GeneratorBlockConfig { out, .. }) => {
                let out = out as f64;
                // Two batch norms: scale and shift per class (one set when unconditional),
                // plus running statistics.
                let norms = 2.0 * (c + out) * ((num_classes as f64).max(1.0) + 1.0);
                9.0 * c * out + 9.0 * out * out + c * out + 6.0 * out + 10.0 * c + norms
            }
            LayerConfig::DiscriminatorBlock(DiscriminatorBlockConfig { out, .. }) => {
                let out = out as f64;
                9.0 * c * out + 9.0 * out * out + c * out + 6.0 * out + 10.0 * c + 9.0 * out
            }
            LayerConfig::BatchNorm(_) => 4.0 * c,
            LayerConfig::ProjectionHead => c + 1.0 + num_classes as f64 * c,
        };
        activations += elements(out);
        if let LayerConfig::Attention(AttentionConfig { pooled }) = layer {
            let n = h * w;
            let keys = if *pooled { n / 4.0 } else { n };
            // The attention map and its softmax's gradient.
            activations += 2.0 * n * keys;
        }
        shape = out;
    }
    (params, activations)
}

/// The estimate for training `model` with batches of `batch` images.
pub fn estimate(model: &ModelConfig, batch: usize) -> Estimate {
    let image = (model.channels, model.image_size, model.image_size);
    let (g_params, g_act) = walk(&model.generator, (model.z_dim, 1, 1), model.num_classes);
    let (d_params, d_act) = walk(&model.discriminator, image, model.num_classes);
    let b = batch as f64;
    // G: weights, moving average, gradients, two Adam moments; D: the same without the average.
    let parameters = 4.0 * (5.0 * g_params + 4.0 * d_params);
    // The D step holds G's samples and D's graph on a double batch; the G step both graphs.
    let d_step = b * g_act + 2.0 * b * d_act * ACTIVATION_COPIES;
    let g_step = b * (g_act + d_act) * ACTIVATION_COPIES;
    Estimate {
        parameters,
        activations: 4.0 * d_step.max(g_step),
    }
}

/// The parameter count `estimate` assumes for G and D.
pub fn parameter_counts(model: &ModelConfig) -> (f64, f64) {
    let image = (model.channels, model.image_size, model.image_size);
    (
        walk(&model.generator, (model.z_dim, 1, 1), model.num_classes).0,
        walk(&model.discriminator, image, model.num_classes).0,
    )
}

pub use crate::sysmem::available;

/// Refuses a model and batch whose estimate exceeds the memory available.
pub fn check_fits(model: &ModelConfig, batch: usize) -> Result<()> {
    let Some(available) = available() else {
        return Ok(());
    };
    check_against(model, batch, available)
}

fn check_against(model: &ModelConfig, batch: usize, available: f64) -> Result<()> {
    let e = estimate(model, batch);
    if e.total() <= available {
        return Ok(());
    }
    Err(Error::TooLarge(format!(
        "preset {} at batch size {batch} needs about {:.1} GiB to train (parameters and optimizer state {:.1} GiB, activations {:.1} GiB); {:.1} GiB is available: lower --batch-size or the preset's sizes",
        model.name,
        e.total() / GIB,
        e.parameters / GIB,
        e.activations / GIB,
        available / GIB
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{preset_names, BUILTIN_PRESETS};
    use crate::model::{Discriminator, Generator};
    use crate::rng::{seeded_var_builder, stream};
    use candle_core::Device;
    use candle_nn::VarMap;

    fn count(varmap: &VarMap) -> f64 {
        let data = varmap.data().lock().unwrap();
        data.values().map(|v| v.elem_count() as f64).sum()
    }

    /// The parameter side of the estimate is the models' real size, for every preset.
    #[test]
    fn parameter_counts_match_the_built_models() {
        for name in preset_names() {
            let cfg = ModelConfig::resolve(name).unwrap();
            let (g_vars, d_vars) = (VarMap::new(), VarMap::new());
            Generator::new(
                seeded_var_builder(&g_vars, stream(0, 0), &Device::Cpu),
                &cfg,
            )
            .unwrap();
            Discriminator::new(
                seeded_var_builder(&d_vars, stream(0, 1), &Device::Cpu),
                &cfg,
            )
            .unwrap();
            let (g, d) = parameter_counts(&cfg);
            for (net, estimated, real) in [("G", g, count(&g_vars)), ("D", d, count(&d_vars))] {
                let ratio = estimated / real;
                assert!(
                    (0.95..1.05).contains(&ratio),
                    "{name} {net}: estimated {estimated}, built {real}"
                );
            }
        }
    }

    #[test]
    fn absurd_presets_are_refused_with_the_estimate_and_real_ones_fit() {
        let text = BUILTIN_PRESETS
            .iter()
            .find(|(n, _)| *n == "sagan-mnist28")
            .unwrap()
            .1;
        let default = ModelConfig::from_toml(text).unwrap();
        check_against(&default, 64, 2.0 * GIB).unwrap();
        for absurd in [
            text.replacen("out = 256", "out = 1000000", 1),
            text.replacen("z_dim = 128", "z_dim = 1000000", 1),
        ] {
            let cfg = ModelConfig::from_toml(&absurd).unwrap();
            let err = check_against(&cfg, 64, 24.0 * GIB).unwrap_err().to_string();
            assert!(
                err.contains("needs about") && err.contains("GiB") && err.contains("24.0 GiB"),
                "{err}"
            );
        }
        // A batch size far beyond the machine is refused too.
        let err = check_against(&default, 10_000_000, 24.0 * GIB).unwrap_err();
        assert!(matches!(err, Error::TooLarge(_)));
    }
}
