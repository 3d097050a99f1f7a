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
            cfg.init,
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
        self.stack.forward(x, classes, train)?.flatten_all()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::BUILTIN_PRESETS;
    use crate::ops::testing::input;
    use crate::rng::{seeded_var_builder, stream};
    use candle_core::{DType, Device, Var};
    use candle_nn::VarMap;

    fn discriminator(preset: &str) -> (ModelConfig, VarMap, Discriminator) {
        let cfg = ModelConfig::resolve(preset).unwrap();
        let varmap = VarMap::new();
        let vb = seeded_var_builder(&varmap, stream(1, 2), &Device::Cpu);
        let d = Discriminator::new(vb, &cfg).unwrap();
        (cfg, varmap, d)
    }

    #[test]
    fn every_preset_gives_one_logit_per_image() {
        for (name, _) in BUILTIN_PRESETS {
            let (cfg, _, d) = discriminator(name);
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

    /// The G step runs D in evaluation mode: the gradient must reach the images exactly, and
    /// D's parameters must get none (they would be computed only to be thrown away).
    #[test]
    fn evaluation_forward_differentiates_the_input_only() {
        for name in ["sagan-mnist28", "sagan-cond-mnist32"] {
            let (cfg, varmap, d) = discriminator(name);
            let size = cfg.image_size;
            let x = input(2, cfg.channels, size, size, 4);
            let classes =
                (cfg.num_classes > 0).then(|| Tensor::new(&[3u32, 7], &Device::Cpu).unwrap());
            let loss = |x: &Tensor| -> f32 {
                let logits = d.forward(x, classes.as_ref(), false).unwrap();
                logits.sum_all().unwrap().to_scalar().unwrap()
            };
            let xv = Var::from_tensor(&x).unwrap();
            let logits = d.forward(&xv, classes.as_ref(), false).unwrap();
            let grads = logits.sum_all().unwrap().backward().unwrap();
            for (var_name, var) in varmap.data().lock().unwrap().iter() {
                assert!(
                    grads.get(var).is_none(),
                    "{name}: {var_name} got a gradient"
                );
            }
            let analytic = grads
                .get(&xv)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let base = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let eps = 1e-2f32;
            for idx in [0, base.len() / 3, base.len() / 2, base.len() - 1] {
                let shifted = |delta: f32| {
                    let mut v = base.clone();
                    v[idx] += delta;
                    Tensor::from_vec(v, x.dims(), &Device::Cpu).unwrap()
                };
                let numeric = (loss(&shifted(eps)) - loss(&shifted(-eps))) / (2.0 * eps);
                let want = analytic[idx];
                assert!(
                    (numeric - want).abs() <= 2e-2 * want.abs().max(1e-2),
                    "{name} pixel {idx}: numeric {numeric} vs analytic {want}"
                );
            }
        }
    }
}
