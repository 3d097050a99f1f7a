use super::LayerStack;
use crate::config::ModelConfig;
use candle_core::{bail, Result, Tensor};
use candle_nn::VarBuilder;

/// Maps latents z [B, z_dim] (and, in a class-conditional model, classes [B]) to images
/// [B, C, H, W] in [-1, 1].
pub struct Generator {
    stack: LayerStack,
    z_dim: usize,
    num_classes: usize,
}

impl Generator {
    pub fn new(vb: VarBuilder, cfg: &ModelConfig) -> Result<Self> {
        let stack = LayerStack::new(
            vb.pp("layers"),
            &cfg.generator,
            (cfg.z_dim, 1, 1),
            cfg.leaky_slope,
            cfg.num_classes,
            cfg.init,
        )?;
        Ok(Self {
            stack,
            z_dim: cfg.z_dim,
            num_classes: cfg.num_classes,
        })
    }

    pub fn num_classes(&self) -> usize {
        self.num_classes
    }

    pub fn stack(&self) -> &LayerStack {
        &self.stack
    }

    /// Images and every attention layer's map [B, N, M]. `classes` [B] (u32) is required by a
    /// class-conditional model and refused by an unconditional one.
    pub fn forward_with_attention(
        &self,
        z: &Tensor,
        classes: Option<&Tensor>,
        train: bool,
    ) -> Result<(Tensor, Vec<Tensor>)> {
        let z = self.stack_input(z, classes)?;
        self.stack.forward_with_maps(&z, classes, train)
    }

    pub fn forward(&self, z: &Tensor, classes: Option<&Tensor>, train: bool) -> Result<Tensor> {
        let z = self.stack_input(z, classes)?;
        self.stack.forward(&z, classes, train)
    }

    /// `z` [B, z_dim] as the layer stack's [B, z_dim, 1, 1] input, after checking the classes.
    fn stack_input(&self, z: &Tensor, classes: Option<&Tensor>) -> Result<Tensor> {
        let b = z.dim(0)?;
        check_classes(classes, b, self.num_classes)?;
        z.reshape((b, self.z_dim, 1, 1))
    }
}

/// Classes must come with a conditional model, one per image, each below `num_classes`.
pub(super) fn check_classes(
    classes: Option<&Tensor>,
    batch: usize,
    num_classes: usize,
) -> Result<()> {
    match (classes, num_classes) {
        (None, 0) => Ok(()),
        (Some(_), 0) => bail!("this model is unconditional: it takes no classes"),
        (None, k) => {
            bail!("this model is class-conditional ({k} classes): give every image a class")
        }
        (Some(classes), k) => {
            if classes.dims() != [batch] {
                bail!("{} classes for {batch} images", classes.elem_count());
            }
            let max = classes
                .max_all()?
                .to_dtype(candle_core::DType::U32)?
                .to_scalar::<u32>()?;
            if max as usize >= k {
                bail!("class {max} is out of range: the model has {k} classes (0..{k})");
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::BUILTIN_PRESETS;
    use crate::rng::{normal_tensor, seeded_var_builder, stream};
    use candle_core::Device;
    use candle_nn::VarMap;

    #[test]
    fn without_grad_trains_like_a_training_forward_but_builds_no_graph() {
        let cfg = ModelConfig::resolve("sagan-mnist28").unwrap();
        let build = || {
            let varmap = VarMap::new();
            let vb = seeded_var_builder(&varmap, stream(1, 1), &Device::Cpu);
            let g = Generator::new(vb, &cfg).unwrap();
            (varmap, g)
        };
        let ((vars_a, g_a), (vars_b, g_b)) = (build(), build());
        let z = normal_tensor(&mut stream(2, 2), 4, cfg.z_dim, &Device::Cpu).unwrap();
        let tracked = g_a.forward(&z, None, true).unwrap();
        let untracked = crate::model::without_grad(|| g_b.forward(&z, None, true)).unwrap();
        assert!(tracked.track_op() && !untracked.track_op());
        let diff = (&tracked - &untracked).unwrap().abs().unwrap();
        assert_eq!(diff.max_all().unwrap().to_scalar::<f32>().unwrap(), 0.0);
        // The same training-mode state updates: spectral-norm vectors, running statistics.
        let (a, b) = (vars_a.data().lock().unwrap(), vars_b.data().lock().unwrap());
        for (name, var) in a.iter() {
            let diff = (var.as_tensor() - b[name].as_tensor())
                .unwrap()
                .abs()
                .unwrap();
            let diff = diff.flatten_all().unwrap().max(0).unwrap();
            assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0, "{name}");
        }
        assert!(
            g_b.forward(&z, None, true).unwrap().track_op(),
            "only inside the closure"
        );
    }

    #[test]
    fn every_preset_generates_images_of_its_shape_in_range() {
        for (name, _) in BUILTIN_PRESETS {
            let cfg = ModelConfig::resolve(name).unwrap();
            let varmap = VarMap::new();
            let g = Generator::new(
                seeded_var_builder(&varmap, stream(1, 1), &Device::Cpu),
                &cfg,
            )
            .unwrap();
            let z = normal_tensor(&mut stream(2, 2), 2, cfg.z_dim, &Device::Cpu).unwrap();
            let classes = (cfg.num_classes > 0)
                .then(|| Tensor::new(&[0u32, cfg.num_classes as u32 - 1], &Device::Cpu).unwrap());
            let (img, maps) = g
                .forward_with_attention(&z, classes.as_ref(), true)
                .unwrap();
            assert_eq!(
                img.dims(),
                &[2, cfg.channels, cfg.image_size, cfg.image_size],
                "{name}"
            );
            let max = img
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(max <= 1.0, "{name}: tanh output out of range");
            let attention_layers = cfg
                .generator
                .layers
                .iter()
                .filter(|l| matches!(l, crate::config::LayerConfig::Attention(_)))
                .count();
            assert_eq!(maps.len(), attention_layers, "{name}");
        }
    }

    #[test]
    fn weight_names_read_like_the_module_tree() {
        let cfg = ModelConfig::resolve("sagan-mnist28").unwrap();
        let varmap = VarMap::new();
        Generator::new(
            seeded_var_builder(&varmap, stream(1, 1), &Device::Cpu),
            &cfg,
        )
        .unwrap();
        let names = varmap.data().lock().unwrap();
        for name in [
            "layers.0.conv.weight",
            "layers.0.conv.weight_u",
            "layers.0.bn.running_mean",
            "layers.2.query.weight",
            "layers.2.gamma",
            "layers.3.conv.bias",
        ] {
            assert!(names.contains_key(name), "missing {name}");
        }
    }
}
