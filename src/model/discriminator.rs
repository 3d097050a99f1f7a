use super::generator::check_classes;
use super::LayerStack;
use crate::config::ModelConfig;
use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;

/// Maps images [B, C, H, W] (and, in a class-conditional model, their classes [B]) to one
/// real/fake logit each, [B].
pub struct Discriminator {
    stack: LayerStack,
    num_classes: usize,
}

impl Discriminator {
    pub fn new(vb: VarBuilder, cfg: &ModelConfig) -> Result<Self> {
        let input = (cfg.channels, cfg.image_size, cfg.image_size);
        let stack = LayerStack::new(
            vb.pp("layers"),
            &cfg.discriminator,
            input,
            cfg.leaky_slope,
            cfg.num_classes,
        )?;
        Ok(Self {
            stack,
            num_classes: cfg.num_classes,
        })
    }

    pub fn stack(&self) -> &LayerStack {
        &self.stack
    }

    pub fn forward(&self, x: &Tensor, classes: Option<&Tensor>, train: bool) -> Result<Tensor> {
        check_classes(classes, x.dim(0)?, self.num_classes)?;
        let (logits, _) = self.stack.forward_with_maps(x, classes, train)?;
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
            let classes =
                (cfg.num_classes > 0).then(|| Tensor::new(&[0u32, 1, 2], &Device::Cpu).unwrap());
            let logits = d.forward(&x, classes.as_ref(), false).unwrap();
            assert_eq!(logits.dims(), &[3], "{name}");
        }
    }
}
