use super::LayerStack;
use crate::config::ModelConfig;
use candle_core::{ModuleT, Result, Tensor};
use candle_nn::VarBuilder;

/// Maps images [B, C, H, W] to one real/fake logit each, [B].
pub struct Discriminator {
    stack: LayerStack,
}

impl Discriminator {
    pub fn new(vb: VarBuilder, cfg: &ModelConfig) -> Result<Self> {
        let input = (cfg.channels, cfg.image_size, cfg.image_size);
        let stack = LayerStack::new(vb.pp("layers"), &cfg.discriminator, input, cfg.leaky_slope)?;
        Ok(Self { stack })
    }

    pub fn stack(&self) -> &LayerStack {
        &self.stack
    }
}

impl ModuleT for Discriminator {
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let (logits, _) = self.stack.forward_with_maps(x, train)?;
        logits.flatten_all()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::BUILTIN_PRESETS;
    use crate::rng::{seeded_var_builder, stream};
    use candle_core::{DType, Device};
    use candle_nn::VarMap;

    #[test]
    fn every_preset_gives_one_logit_per_image() {
        for (name, _) in BUILTIN_PRESETS {
            let cfg = ModelConfig::resolve(name).unwrap();
            let varmap = VarMap::new();
            let d = Discriminator::new(
                seeded_var_builder(&varmap, stream(1, 2), &Device::Cpu),
                &cfg,
            )
            .unwrap();
            let x = Tensor::zeros(
                (3, cfg.channels, cfg.image_size, cfg.image_size),
                DType::F32,
                &Device::Cpu,
            )
            .unwrap();
            assert_eq!(d.forward_t(&x, false).unwrap().dims(), &[3], "{name}");
        }
    }
}
