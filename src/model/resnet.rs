//! The residual blocks of the paper's ResNet SAGAN (the BigGAN layout): G's blocks upsample
//! and take the class through conditional batch norm, D's blocks downsample.

use super::conditional::ClassBatchNorm;
use super::spectral_norm::{ConvKind, SNConv2d};
use crate::config::{Activation, WeightInit};
use crate::config::{DiscriminatorBlockConfig, GeneratorBlockConfig};
use crate::ops::channel::bias_act;
use candle_core::{ModuleT, Result, Tensor};
use candle_nn::VarBuilder;

/// 2x nearest-neighbour upsampling as a broadcast, whose gradient candle sums correctly
/// (the backward of `upsample_nearest2d` overwrites, not adds, the input's gradient).
pub fn upsample2(x: &Tensor) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    x.reshape((b, c, h, 1, w, 1))?
        .broadcast_as((b, c, h, 2, w, 2))?
        .contiguous()?
        .reshape((b, c, 2 * h, 2 * w))
}

fn conv(
    vb: VarBuilder,
    cin: usize,
    cout: usize,
    kernel: usize,
    init: WeightInit,
) -> Result<SNConv2d> {
    SNConv2d::new(vb, ConvKind::Conv, cin, cout, kernel, 1, kernel / 2, init)
}

pub struct GeneratorBlock {
    norm1: ClassBatchNorm,
    conv1: SNConv2d,
    norm2: ClassBatchNorm,
    conv2: SNConv2d,
    /// 1x1 conv on the shortcut, present when the block changes channels or size.
    shortcut: Option<SNConv2d>,
    upsample: bool,
}

impl GeneratorBlock {
    pub fn new(
        vb: VarBuilder,
        cfg: &GeneratorBlockConfig,
        channels: usize,
        num_classes: usize,
        init: WeightInit,
    ) -> Result<Self> {
        let out = cfg.out;
        let shortcut = match channels != out || cfg.upsample {
            true => Some(conv(vb.pp("shortcut"), channels, out, 1, init)?),
            false => None,
        };
        Ok(Self {
            norm1: ClassBatchNorm::new(vb.pp("norm1"), channels, num_classes)?,
            conv1: conv(vb.pp("conv1"), channels, out, 3, init)?,
            norm2: ClassBatchNorm::new(vb.pp("norm2"), out, num_classes)?,
            conv2: conv(vb.pp("conv2"), out, out, 3, init)?,
            shortcut,
            upsample: cfg.upsample,
        })
    }

    pub fn norms(&self) -> [&ClassBatchNorm; 2] {
        [&self.norm1, &self.norm2]
    }

    pub fn convs(&self) -> [&SNConv2d; 2] {
        [&self.conv1, &self.conv2]
    }

    pub fn shortcut(&self) -> Option<&SNConv2d> {
        self.shortcut.as_ref()
    }

    pub fn upsamples(&self) -> bool {
        self.upsample
    }

    pub fn forward(&self, x: &Tensor, classes: Option<&Tensor>, train: bool) -> Result<Tensor> {
        let up = |t: Tensor| if self.upsample { upsample2(&t) } else { Ok(t) };
        let relu = Activation::Relu;
        let h = self.norm1.forward_act(x, classes, relu, 0.0, train)?;
        let h = self.conv1.forward_t(&up(h)?, train)?;
        let h = self.norm2.forward_act(&h, classes, relu, 0.0, train)?;
        let h = self.conv2.forward_t(&h, train)?;
        // 1x1 conv before the upsample: the same function (both are linear and per-pixel),
        // at a quarter of the cost.
        let skip = match &self.shortcut {
            Some(conv) => conv.forward_t(x, train)?,
            None => x.clone(),
        };
        h + up(skip)?
    }
}

pub struct DiscriminatorBlock {
    conv1: SNConv2d,
    conv2: SNConv2d,
    shortcut: Option<SNConv2d>,
    downsample: bool,
    preactivation: bool,
}

fn avg_pool2(x: &Tensor) -> Result<Tensor> {
    x.avg_pool2d(2)
}

impl DiscriminatorBlock {
    pub fn new(
        vb: VarBuilder,
        cfg: &DiscriminatorBlockConfig,
        channels: usize,
        init: WeightInit,
    ) -> Result<Self> {
        let out = cfg.out;
        let shortcut = match channels != out || cfg.downsample {
            true => Some(conv(vb.pp("shortcut"), channels, out, 1, init)?),
            false => None,
        };
        Ok(Self {
            conv1: conv(vb.pp("conv1"), channels, out, 3, init)?,
            conv2: conv(vb.pp("conv2"), out, out, 3, init)?,
            shortcut,
            downsample: cfg.downsample,
            preactivation: cfg.preactivation,
        })
    }

    pub fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let down = |t: Tensor| {
            if self.downsample {
                avg_pool2(&t)
            } else {
                Ok(t)
            }
        };
        let h = match self.preactivation {
            true => bias_act(x, None, Activation::Relu, 0.0)?,
            false => x.clone(),
        };
        let h = self.conv1.forward_act(&h, Activation::Relu, 0.0, train)?;
        let h = down(self.conv2.forward_t(&h, train)?)?;
        // Pool before the 1x1 conv: the same function (both linear), a quarter of the cost.
        let skip = down(x.clone())?;
        let skip = match &self.shortcut {
            Some(conv) => conv.forward_t(&skip, train)?,
            None => skip,
        };
        h + skip
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testing::{input, max_abs, weighted_grad};
    use crate::rng::{seeded_var_builder, stream};
    use candle_core::{Device, Var};
    use candle_nn::VarMap;

    #[test]
    fn upsample2_matches_candle_and_its_gradient_sums_each_2x2_cell() {
        let x = Var::from_tensor(&input(2, 3, 2, 3, 1)).unwrap();
        let y = upsample2(x.as_tensor()).unwrap();
        let reference = x.as_tensor().upsample_nearest2d(4, 6).unwrap();
        assert_eq!(max_abs(&(&y - reference).unwrap()), 0.0);
        // Weighted sum: each input gradient is the sum of the weights over its 2x2 cell.
        let weights = input(2, 3, 4, 6, 2);
        let want = weights.avg_pool2d(2).unwrap().affine(4.0, 0.0).unwrap();
        let got = weighted_grad(&y, &weights, &x);
        assert!(max_abs(&(got - want).unwrap()) < 1e-5);
    }

    #[test]
    fn blocks_change_shape_as_configured() {
        let varmap = VarMap::new();
        let vb = seeded_var_builder(&varmap, stream(1, 1), &Device::Cpu);
        let g = GeneratorBlock::new(
            vb.pp("g"),
            &GeneratorBlockConfig {
                out: 4,
                upsample: true,
            },
            8,
            3,
            WeightInit::Normal,
        )
        .unwrap();
        let classes = Tensor::new(&[0u32, 2], &Device::Cpu).unwrap();
        let y = g
            .forward(&input(2, 8, 3, 3, 3), Some(&classes), true)
            .unwrap();
        assert_eq!(y.dims(), &[2, 4, 6, 6]);
        let d = DiscriminatorBlock::new(
            vb.pp("d"),
            &DiscriminatorBlockConfig {
                out: 6,
                downsample: true,
                preactivation: false,
            },
            4,
            WeightInit::Normal,
        )
        .unwrap();
        assert_eq!(d.forward(&y, true).unwrap().dims(), &[2, 6, 3, 3]);
        let same = DiscriminatorBlock::new(
            vb.pp("same"),
            &DiscriminatorBlockConfig {
                out: 6,
                downsample: false,
                preactivation: true,
            },
            6,
            WeightInit::Normal,
        )
        .unwrap();
        assert!(same.shortcut.is_none());
    }

    #[test]
    fn shortcut_reordering_equals_the_papers_order() {
        // conv1x1(upsample(x)) == upsample(conv1x1(x)) and conv1x1(pool(x)) == pool(conv1x1(x)).
        let varmap = VarMap::new();
        let vb = seeded_var_builder(&varmap, stream(2, 1), &Device::Cpu);
        let conv = conv(vb, 5, 3, 1, WeightInit::Normal).unwrap();
        let x = input(2, 5, 4, 4, 4);
        let a = conv.forward_t(&upsample2(&x).unwrap(), false).unwrap();
        let b = upsample2(&conv.forward_t(&x, false).unwrap()).unwrap();
        assert!(max_abs(&(a - b).unwrap()) < 1e-5);
        let a = conv.forward_t(&avg_pool2(&x).unwrap(), false).unwrap();
        let b = avg_pool2(&conv.forward_t(&x, false).unwrap()).unwrap();
        assert!(max_abs(&(a - b).unwrap()) < 1e-5);
    }
}
