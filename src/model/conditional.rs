//! The class-conditional pieces of the paper's ImageNet model: conditional batch norm in G
//! (de Vries et al. 2017) and the projection head of D (Miyato & Koyama 2018).

use super::param;
use super::spectral_norm::{SNLinear, SpectralNorm};
use crate::config::{Activation, WeightInit};
use crate::ops::channel::{batch_norm_act, bias_act};
use candle_core::{bail, ModuleT, Result, Tensor};
use candle_nn::{BatchNorm, BatchNormConfig, Init, VarBuilder};

/// Batch norm whose scale and shift are either learned per channel (unconditional) or looked
/// up per class from tables `gain` [classes, C] (initialised to 1) and `bias` (to 0).
pub struct ClassBatchNorm {
    bn: BatchNorm,
    tables: Option<(Tensor, Tensor)>,
}

impl ClassBatchNorm {
    /// `num_classes` 0 gives an ordinary affine batch norm.
    pub fn new(vb: VarBuilder, channels: usize, num_classes: usize) -> Result<Self> {
        let affine = num_classes == 0;
        let config = BatchNormConfig {
            affine,
            ..Default::default()
        };
        let bn = candle_nn::batch_norm(channels, config, vb.clone())?;
        let tables = match affine {
            true => None,
            false => Some((
                vb.get_with_hints((num_classes, channels), "gain", Init::Const(1.0))?,
                vb.get_with_hints((num_classes, channels), "bias", Init::Const(0.0))?,
            )),
        };
        Ok(Self { bn, tables })
    }

    pub fn batch_norm(&self) -> &BatchNorm {
        &self.bn
    }

    /// The per-class gain and bias tables [classes, C] of a conditional norm.
    pub fn class_tables(&self) -> Option<&(Tensor, Tensor)> {
        self.tables.as_ref()
    }

    /// `classes` [B] (u32) is required by a conditional norm and ignored otherwise.
    pub fn forward(&self, x: &Tensor, classes: Option<&Tensor>, train: bool) -> Result<Tensor> {
        self.forward_act(x, classes, Activation::None, 0.0, train)
    }

    /// `act(norm(x))`, through the fused batch-norm kernels (`ops::channel`).
    pub fn forward_act(
        &self,
        x: &Tensor,
        classes: Option<&Tensor>,
        act: Activation,
        leaky_slope: f64,
        train: bool,
    ) -> Result<Tensor> {
        let Some((gain, bias)) = &self.tables else {
            return batch_norm_act(x, None, &self.bn, act, leaky_slope, train);
        };
        let y = batch_norm_act(x, None, &self.bn, Activation::None, 0.0, train)?;
        let Some(classes) = classes else {
            bail!("a class-conditional batch norm needs the class of every image")
        };
        let per_image = |table: &Tensor| -> Result<Tensor> {
            let rows = table.index_select(classes, 0)?; // [B, C]
            rows.unsqueeze(2)?.unsqueeze(3)
        };
        let (gain, bias) = (param(gain, train), param(bias, train));
        let y = y
            .broadcast_mul(&per_image(&gain)?)?
            .broadcast_add(&per_image(&bias)?)?;
        bias_act(&y, None, act, leaky_slope)
    }
}

/// ReLU, global sum pool over positions, a linear map to one logit, and in a conditional
/// model the projection <embed(class), pooled features> with a spectrally normalised embedding.
pub struct ProjectionHead {
    linear: SNLinear,
    embedding: Option<SpectralNorm>,
}

impl ProjectionHead {
    pub fn new(
        vb: VarBuilder,
        channels: usize,
        num_classes: usize,
        init: WeightInit,
    ) -> Result<Self> {
        let linear = SNLinear::new(vb.pp("linear"), channels, 1, init)?;
        let embedding = match num_classes {
            0 => None,
            k => {
                let vb = vb.pp("embedding");
                let weight = vb.get_with_hints(
                    (k, channels),
                    "weight",
                    Init::Randn {
                        mean: 0.0,
                        stdev: 0.02,
                    },
                )?;
                Some(SpectralNorm::new(weight, 0, &vb, "weight")?)
            }
        };
        Ok(Self { linear, embedding })
    }

    /// Logits [B, 1, 1, 1] for features `x` [B, C, H, W].
    pub fn forward(&self, x: &Tensor, classes: Option<&Tensor>, train: bool) -> Result<Tensor> {
        let pooled = bias_act(x, None, Activation::Relu, 0.0)?.sum((2, 3))?; // [B, C]
        let mut logits = self.linear.forward_t(&pooled, train)?; // [B, 1]
        if let Some(embedding) = &self.embedding {
            let Some(classes) = classes else {
                bail!("a projection discriminator needs the class of every image")
            };
            let embedded = embedding.weight(train)?.index_select(classes, 0)?;
            logits = (logits + (embedded * pooled)?.sum_keepdim(1)?)?;
        }
        logits.reshape(((), 1, 1, 1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testing::{input, max_abs};
    use crate::rng::{seeded_var_builder, stream};
    use candle_core::{DType, Device, D};
    use candle_nn::VarMap;

    #[test]
    fn conditional_norm_applies_each_images_class_row() {
        let mut varmap = VarMap::new();
        let vb = seeded_var_builder(&varmap, stream(3, 1), &Device::Cpu);
        let norm = ClassBatchNorm::new(vb, 4, 3).unwrap();
        let gain = Tensor::new(
            &[[1f32, 1., 1., 1.], [2., 2., 2., 2.], [0.5, -1., 3., 0.]],
            &Device::Cpu,
        )
        .unwrap();
        varmap.set_one("gain", &gain).unwrap();
        varmap
            .set_one("bias", (gain.ones_like().unwrap() * 0.25).unwrap())
            .unwrap();
        let x = input(3, 4, 2, 2, 9);
        let classes = Tensor::new(&[2u32, 0, 1], &Device::Cpu).unwrap();
        let y = norm.forward(&x, Some(&classes), true).unwrap();
        let plain = norm.batch_norm().forward_t(&x, true).unwrap();
        for (image, class) in [(0, 2), (1, 0), (2, 1)] {
            let g = gain.get(class).unwrap().reshape((1, 4, 1, 1)).unwrap();
            let want = (plain
                .narrow(0, image, 1)
                .unwrap()
                .broadcast_mul(&g)
                .unwrap()
                + 0.25)
                .unwrap();
            let got = y.narrow(0, image, 1).unwrap();
            assert!(max_abs(&(got - want).unwrap()) < 1e-5, "image {image}");
        }
        let err = norm.forward(&x, None, true).unwrap_err().to_string();
        assert!(err.contains("class"), "{err}");
    }

    #[test]
    fn unconditional_norm_is_an_affine_batch_norm() {
        let varmap = VarMap::new();
        let vb = seeded_var_builder(&varmap, stream(3, 1), &Device::Cpu);
        ClassBatchNorm::new(vb, 4, 0).unwrap();
        let names = varmap.data().lock().unwrap();
        assert!(names.contains_key("weight") && !names.contains_key("gain"));
    }

    #[test]
    fn projection_adds_the_class_embedding_dot_the_pooled_features() {
        let mut varmap = VarMap::new();
        let vb = seeded_var_builder(&varmap, stream(4, 1), &Device::Cpu);
        let head = ProjectionHead::new(vb.clone(), 6, 5, WeightInit::Normal).unwrap();
        let unconditional = ProjectionHead::new(vb.pp("plain"), 6, 0, WeightInit::Normal).unwrap();
        // Same linear weights for both heads: the difference is the projection term alone.
        let data = varmap.data().lock().unwrap().clone();
        for name in ["weight", "bias", "weight_u", "weight_v"] {
            varmap
                .set_one(
                    format!("plain.linear.{name}"),
                    data[&format!("linear.{name}")].as_tensor(),
                )
                .unwrap();
        }
        let x = input(2, 6, 3, 3, 5);
        let classes = Tensor::new(&[4u32, 1], &Device::Cpu).unwrap();
        let with = head.forward(&x, Some(&classes), false).unwrap();
        let without = unconditional.forward(&x, None, false).unwrap();
        assert_eq!(with.dims(), &[2, 1, 1, 1]);
        let pooled = x.relu().unwrap().sum((2, 3)).unwrap();
        let table = head.embedding.as_ref().unwrap().weight(false).unwrap();
        let want = (table.index_select(&classes, 0).unwrap() * pooled)
            .unwrap()
            .sum(D::Minus1)
            .unwrap();
        let got = (with - without).unwrap().flatten_all().unwrap();
        assert!(max_abs(&(got - want).unwrap()) < 1e-4);
    }

    #[test]
    fn gradients_reach_the_class_tables_and_the_embedding() {
        let varmap = VarMap::new();
        let vb = seeded_var_builder(&varmap, stream(6, 1), &Device::Cpu);
        let norm = ClassBatchNorm::new(vb.pp("norm"), 4, 3).unwrap();
        let head = ProjectionHead::new(vb.pp("head"), 4, 3, WeightInit::Normal).unwrap();
        let x = input(2, 4, 2, 2, 7);
        let classes = Tensor::new(&[1u32, 2], &Device::Cpu).unwrap();
        let h = norm.forward(&x, Some(&classes), true).unwrap();
        let loss = head
            .forward(&h, Some(&classes), true)
            .unwrap()
            .sum_all()
            .unwrap();
        let grads = loss.backward().unwrap();
        let data = varmap.data().lock().unwrap();
        for name in ["norm.gain", "norm.bias", "head.embedding.weight"] {
            let g = grads.get(data[name].as_tensor()).expect(name);
            let rows = g.abs().unwrap().sum(1).unwrap().to_vec1::<f32>().unwrap();
            assert!(rows[1] > 0.0 && rows[2] > 0.0, "{name}: {rows:?}");
            // Only the rows of classes 1 and 2 were used; the embedding's sigma still reaches
            // every row of it.
            if name.starts_with("norm") {
                assert_eq!(rows[0], 0.0, "{name}");
            }
        }
        assert_eq!(data["norm.gain"].dtype(), DType::F32);
    }
}
