//! The networks: spectral-normalised convolutions, self-attention, and the generator and
//! discriminator built from a preset's layer list.

pub mod attention;
pub mod conditional;
pub mod discriminator;
pub mod generator;
mod init;
pub mod resnet;
pub mod spectral_norm;

pub use attention::SelfAttention;
pub use conditional::{ClassBatchNorm, ProjectionHead};
pub use discriminator::Discriminator;
pub use generator::Generator;
pub use resnet::{DiscriminatorBlock, GeneratorBlock};
pub use spectral_norm::{ConvKind, SNConv2d, SNLinear, SpectralNorm};

pub use crate::ops::grad_mode::without_grad;

use crate::config::{Activation, ConvConfig, FeatureShape, LayerConfig, NetConfig, WeightInit};
use crate::ops::grad_mode::param;
use crate::ops::{channel, handoff};
use candle_core::{ModuleT, Result, Tensor};
use candle_nn::{BatchNorm, BatchNormConfig, VarBuilder};

/// One entry of a network's layer list.
pub enum Layer {
    Conv {
        conv: SNConv2d,
        batch_norm: Option<BatchNorm>,
        act: Activation,
    },
    Attention(SelfAttention),
    /// A linear map of the flattened input, reshaped to `shape`.
    Linear {
        linear: SNLinear,
        shape: FeatureShape,
    },
    GeneratorBlock(GeneratorBlock),
    DiscriminatorBlock(DiscriminatorBlock),
    Norm {
        norm: ClassBatchNorm,
        act: Activation,
    },
    ProjectionHead(ProjectionHead),
}

impl Layer {
    /// Whether the layer applies only sagan's own ops to its input and what it makes of it, so
    /// that gradients can pass it by hand-off (see `handoff`). The attention map's forward and
    /// the pooled block's residual use candle's ops.
    fn hands_off_gradients(&self, returns_maps: bool) -> bool {
        match self {
            Layer::Conv { .. } => true,
            Layer::Attention(attention) => !returns_maps && !attention.is_pooled(),
            _ => false,
        }
    }
}

/// The layers of G or D in order, as the preset lists them. Weights are named
/// `layers.{i}.conv.weight`, `layers.{i}.bn.running_mean`, `layers.{i}.query.weight`, ...
pub struct LayerStack {
    layers: Vec<Layer>,
    leaky_slope: f64,
}

impl LayerStack {
    /// `num_classes` > 0 makes G's residual blocks' batch norms and D's projection head
    /// class-conditional.
    pub fn new(
        vb: VarBuilder,
        cfg: &NetConfig,
        input: FeatureShape,
        leaky_slope: f64,
        num_classes: usize,
        init: WeightInit,
    ) -> Result<Self> {
        let mut shape = input;
        let mut layers = Vec::with_capacity(cfg.layers.len());
        for (i, layer_cfg) in cfg.layers.iter().enumerate() {
            let vb = vb.pp(i.to_string());
            let channels = shape.0;
            let layer =
                match layer_cfg {
                    LayerConfig::Conv(conv) | LayerConfig::ConvTranspose(conv) => {
                        let kind = match layer_cfg {
                            LayerConfig::Conv(_) => ConvKind::Conv,
                            _ => ConvKind::Transpose,
                        };
                        let &ConvConfig {
                            out,
                            kernel,
                            stride,
                            padding,
                            batch_norm,
                            act,
                        } = conv;
                        let conv = SNConv2d::new(
                            vb.pp("conv"),
                            kind,
                            channels,
                            out,
                            kernel,
                            stride,
                            padding,
                            init,
                        )?;
                        let batch_norm = match batch_norm {
                            true => Some(candle_nn::batch_norm(
                                out,
                                BatchNormConfig::default(),
                                vb.pp("bn"),
                            )?),
                            false => None,
                        };
                        Layer::Conv {
                            conv,
                            batch_norm,
                            act,
                        }
                    }
                    LayerConfig::Attention(attention) => {
                        Layer::Attention(SelfAttention::new(vb, channels, attention, init)?)
                    }
                    LayerConfig::Linear(linear) => Layer::Linear {
                        linear: SNLinear::new(
                            vb.pp("linear"),
                            shape.0 * shape.1 * shape.2,
                            linear.out * linear.size * linear.size,
                            init,
                        )?,
                        shape: (linear.out, linear.size, linear.size),
                    },
                    LayerConfig::GeneratorBlock(block) => Layer::GeneratorBlock(
                        GeneratorBlock::new(vb, block, channels, num_classes, init)?,
                    ),
                    LayerConfig::DiscriminatorBlock(block) => Layer::DiscriminatorBlock(
                        DiscriminatorBlock::new(vb, block, channels, init)?,
                    ),
                    LayerConfig::BatchNorm(norm) => Layer::Norm {
                        norm: ClassBatchNorm::new(vb.pp("bn"), channels, 0)?,
                        act: norm.act,
                    },
                    LayerConfig::ProjectionHead => {
                        Layer::ProjectionHead(ProjectionHead::new(vb, channels, num_classes, init)?)
                    }
                };
            shape = layer_cfg
                .output_shape(shape)
                .map_err(candle_core::Error::msg)?;
            layers.push(layer);
        }
        Ok(Self {
            layers,
            leaky_slope,
        })
    }

    pub fn layers(&self) -> &[Layer] {
        &self.layers
    }

    pub fn leaky_slope(&self) -> f64 {
        self.leaky_slope
    }

    /// Runs every layer; also returns each attention layer's map [B, N, M], in order.
    /// `classes` [B] (u32) is needed by class-conditional layers.
    pub fn forward_with_maps(
        &self,
        x: &Tensor,
        classes: Option<&Tensor>,
        train: bool,
    ) -> Result<(Tensor, Vec<Tensor>)> {
        let mut maps = Vec::new();
        let y = self.run(x, classes, train, Some(&mut maps))?;
        Ok((y, maps))
    }

    /// Runs every layer. Without maps to return, attention layers can take their fused kernel.
    pub fn forward(&self, x: &Tensor, classes: Option<&Tensor>, train: bool) -> Result<Tensor> {
        self.run(x, classes, train, None)
    }

    /// The layers in turn, with gradients handed from op to op past candle's gradient store
    /// (`handoff`) through runs of layers made only of sagan's ops; a layer that uses candle's
    /// ops gets its input as a plain tensor, and so does the caller the result.
    fn run(
        &self,
        x: &Tensor,
        classes: Option<&Tensor>,
        train: bool,
        mut maps: Option<&mut Vec<Tensor>>,
    ) -> Result<Tensor> {
        handoff::run(true, || {
            let mut x = x.clone();
            for layer in &self.layers {
                let maps = maps.as_deref_mut();
                x = match layer.hands_off_gradients(maps.is_some()) {
                    true => self.forward_layer(layer, &x, classes, train, maps)?,
                    false => {
                        let x = handoff::bridge(&x)?;
                        handoff::run(false, || {
                            self.forward_layer(layer, &x, classes, train, maps)
                        })?
                    }
                };
            }
            handoff::bridge(&x)
        })
    }

    fn forward_layer(
        &self,
        layer: &Layer,
        x: &Tensor,
        classes: Option<&Tensor>,
        train: bool,
        maps: Option<&mut Vec<Tensor>>,
    ) -> Result<Tensor> {
        Ok(match layer {
            Layer::Conv {
                conv,
                batch_norm,
                act,
            } => match batch_norm {
                Some(bn) => conv.forward_bn_act(x, bn, *act, self.leaky_slope, train)?,
                None => conv.forward_act(x, *act, self.leaky_slope, train)?,
            },
            Layer::Attention(attention) => match maps {
                Some(maps) => {
                    let (y, map) = attention.forward_with_map(x, train)?;
                    maps.push(map);
                    y
                }
                None => attention.forward_t(x, train)?,
            },
            Layer::Linear { linear, shape } => {
                let b = x.dim(0)?;
                linear
                    .forward_t(&x.flatten_from(1)?, train)?
                    .reshape((b, shape.0, shape.1, shape.2))?
            }
            Layer::GeneratorBlock(block) => block.forward(x, classes, train)?,
            Layer::DiscriminatorBlock(block) => block.forward(x, train)?,
            Layer::Norm { norm, act } => {
                channel::bias_act(&norm.forward(x, None, train)?, None, *act, self.leaky_slope)?
            }
            Layer::ProjectionHead(head) => head.forward(x, classes, train)?,
        })
    }

    /// Every attention layer's index in the stack and its gamma, in order.
    pub fn gammas(&self) -> Result<Vec<(usize, f32)>> {
        let mut gammas = Vec::new();
        for (i, layer) in self.layers.iter().enumerate() {
            if let Layer::Attention(a) = layer {
                gammas.push((i, a.gamma().flatten_all()?.get(0)?.to_scalar::<f32>()?));
            }
        }
        Ok(gammas)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ModelConfig;
    use crate::rng::{normal_tensor, seeded_var_builder, stream};
    use candle_core::backprop::GradStore;
    use candle_core::Device;
    use candle_nn::VarMap;

    /// sagan-mnist28's G then D in training mode, both stacks through `LayerStack::forward`
    /// (`handoff`) or layer by layer outside it (candle's own graph): the summed logits, the
    /// gradients, and whether candle's backward walks any of G's 14x14 activations.
    fn g_then_d(handoff: bool) -> (f32, VarMap, GradStore, bool) {
        let cfg = ModelConfig::resolve("sagan-mnist28").unwrap();
        let varmap = VarMap::new();
        let vb = seeded_var_builder(&varmap, stream(1, 1), &Device::Cpu);
        let g = Generator::new(vb.pp("g"), &cfg).unwrap();
        let d = Discriminator::new(vb.pp("d"), &cfg).unwrap();
        let z = normal_tensor(&mut stream(2, 2), 4, cfg.z_dim, &Device::Cpu).unwrap();
        let z = z.reshape((4, cfg.z_dim, 1, 1)).unwrap();
        let run = |stack: &LayerStack, x: &Tensor| match handoff {
            true => stack.forward(x, None, true).unwrap(),
            false => stack.layers().iter().fold(x.clone(), |x, layer| {
                stack.forward_layer(layer, &x, None, true, None).unwrap()
            }),
        };
        let logits = run(d.stack(), &run(g.stack(), &z));
        let loss = logits.sum_all().unwrap();
        let walks_activations = loss
            .sorted_nodes()
            .iter()
            .any(|t| t.dims() == [4, 128, 14, 14]);
        let grads = loss.backward().unwrap();
        (loss.to_scalar().unwrap(), varmap, grads, walks_activations)
    }

    #[test]
    fn the_stacks_hand_off_gives_candle_s_gradients_to_the_bit() {
        let (want_loss, want_vars, want, walked) = g_then_d(false);
        assert!(walked, "candle's own graph holds G's activations");
        let (got_loss, got_vars, got, walked) = g_then_d(true);
        assert!(!walked, "handed off");
        assert_eq!(got_loss, want_loss);
        let (got_vars, want_vars) = (
            got_vars.data().lock().unwrap(),
            want_vars.data().lock().unwrap(),
        );
        let mut compared = 0;
        for (name, var) in want_vars.iter() {
            let Some(w) = want.get(var.as_tensor()) else {
                continue;
            };
            let g = got.get(got_vars[name].as_tensor()).unwrap();
            let (g, w) = (g.flatten_all().unwrap(), w.flatten_all().unwrap());
            assert_eq!(
                g.to_vec1::<f32>().unwrap(),
                w.to_vec1::<f32>().unwrap(),
                "{name}"
            );
            compared += 1;
        }
        assert!(compared >= 20, "only {compared} gradients compared");
    }
}
