//! The SAGAN self-attention block.

use super::spectral_norm::{ConvKind, SNConv2d};
use crate::config::{AttentionConfig, WeightInit};
use crate::ops;
use crate::ops::attention::{attention_core, max_pool2};
use candle_core::{ModuleT, Result, Tensor};
use candle_nn::{Init, VarBuilder};

/// y = gamma * o + x, where o attends from every position to every other.
///
/// query and key are 1x1 convs to C/8 channels, value a 1x1 conv C -> C; the energy q^T k over
/// the N = H*W positions is softmaxed over the keys. gamma starts at 0, so the block begins as
/// the identity and the network learns how much non-local evidence to use.
///
/// The pooled form (the official SAGAN code's) max-pools keys and values 2x2, so the map is
/// [B, N, N/4], and computes values at C/2 with a 1x1 `output` conv back to C.
pub struct SelfAttention {
    query: SNConv2d,
    key: SNConv2d,
    value: SNConv2d,
    output: Option<SNConv2d>,
    gamma: Tensor,
    pooled: bool,
}

impl SelfAttention {
    pub fn new(
        vb: VarBuilder,
        channels: usize,
        cfg: &AttentionConfig,
        init: WeightInit,
    ) -> Result<Self> {
        let reduced = channels / 8;
        let conv1x1 = |name: &str, cin: usize, out: usize| {
            SNConv2d::new(vb.pp(name), ConvKind::Conv, cin, out, 1, 1, 0, init)
        };
        let (value, output) = match cfg.pooled {
            true => (
                conv1x1("value", channels, channels / 2)?,
                Some(conv1x1("output", channels / 2, channels)?),
            ),
            false => (conv1x1("value", channels, channels)?, None),
        };
        Ok(Self {
            query: conv1x1("query", channels, reduced)?,
            key: conv1x1("key", channels, reduced)?,
            value,
            output,
            gamma: vb.get_with_hints(1, "gamma", Init::Const(0.0))?,
            pooled: cfg.pooled,
        })
    }

    pub fn output(&self) -> Option<&SNConv2d> {
        self.output.as_ref()
    }

    pub fn is_pooled(&self) -> bool {
        self.pooled
    }

    pub fn query(&self) -> &SNConv2d {
        &self.query
    }

    pub fn key(&self) -> &SNConv2d {
        &self.key
    }

    pub fn value(&self) -> &SNConv2d {
        &self.value
    }

    pub fn gamma(&self) -> &Tensor {
        &self.gamma
    }

    /// The block's output and its attention map [B, N, M] (row = query position, softmax
    /// over the M keys: M = N, or N/4 when pooled).
    pub fn forward_with_map(&self, x: &Tensor, train: bool) -> Result<(Tensor, Tensor)> {
        let (b, _, h, w) = x.dims4()?;
        let n = h * w;
        let keys = |conv: &SNConv2d| -> Result<Tensor> {
            let y = conv.forward_t(x, train)?;
            let y = if self.pooled { max_pool2(&y)? } else { y };
            y.flatten_from(2) // [B, C', M]
        };
        let q = self.query.forward_t(x, train)?.reshape((b, (), n))?; // [B, C/8, N]
        let k = keys(&self.key)?; // [B, C/8, M]
        let v = keys(&self.value)?; // [B, Cv, M]
        let energy = q.transpose(1, 2)?.matmul(&k)?; // [B, N, M]
        let attention = ops::softmax::softmax_last_dim(&energy)?;
        let o = v
            .matmul(&attention.transpose(1, 2)?)?
            .reshape((b, (), h, w))?; // [B, Cv, H, W]
        let o = match &self.output {
            Some(conv) => conv.forward_t(&o, train)?,
            None => o,
        };
        Ok((self.residual(&o, x, train)?, attention))
    }

    /// y = gamma * o + x.
    fn residual(&self, o: &Tensor, x: &Tensor, train: bool) -> Result<Tensor> {
        let gamma = super::param(&self.gamma, train);
        o.broadcast_mul(&gamma.reshape((1, 1, 1, 1))?)? + x
    }

    /// The block through the fused kernel (`attention_core`): the query, key and value
    /// weights stacked into one matrix, the map never materialised for the whole batch.
    fn forward_fused(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let convs = [&self.query, &self.key, &self.value];
        let mut weights = Vec::with_capacity(3);
        let mut biases = Vec::with_capacity(3);
        for conv in convs {
            weights.push(conv.spectral_norm().weight(train)?.flatten_from(1)?);
            biases.push(super::param(conv.bias(), train));
        }
        let query_channels = weights[0].dim(0)?;
        let (weights, biases) = (Tensor::cat(&weights, 0)?, Tensor::cat(&biases, 0)?);
        match &self.output {
            // The residual goes into the core too, sparing its passes and gradient buffers.
            None => {
                let gamma = super::param(&self.gamma, train);
                attention_core(
                    x,
                    &weights,
                    &biases,
                    Some(&gamma),
                    query_channels,
                    self.pooled,
                )
            }
            Some(conv) => {
                let o = attention_core(x, &weights, &biases, None, query_channels, self.pooled)?;
                self.residual(&conv.forward_t(&o, train)?, x, train)
            }
        }
    }
}

impl ModuleT for SelfAttention {
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        match ops::attention::supports(x) {
            true => self.forward_fused(x, train),
            false => Ok(self.forward_with_map(x, train)?.0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testing::{input, max_abs};
    use crate::rng::{seeded_var_builder, stream};
    use candle_core::{Device, Var, D};
    use candle_nn::VarMap;

    fn block(channels: usize) -> (VarMap, SelfAttention) {
        let varmap = VarMap::new();
        let vb = seeded_var_builder(&varmap, stream(11, 1), &Device::Cpu);
        let attn = SelfAttention::new(
            vb,
            channels,
            &AttentionConfig::default(),
            WeightInit::Normal,
        )
        .unwrap();
        (varmap, attn)
    }

    #[test]
    fn starts_as_identity_with_row_stochastic_map() {
        let (_, attn) = block(16);
        let x = input(2, 16, 3, 4, 5);
        let (y, map) = attn.forward_with_map(&x, false).unwrap();
        assert_eq!(map.dims(), &[2, 12, 12]);
        let diff = max_abs(&(y - &x).unwrap());
        assert_eq!(diff, 0.0, "gamma = 0 must make the block the identity");
        let row_sums = map
            .sum(D::Minus1)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert!(row_sums.iter().all(|s| (s - 1.0).abs() < 1e-5));
    }

    #[test]
    fn output_matches_a_per_position_reference() {
        let (mut varmap, attn) = block(8);
        varmap
            .set_one("gamma", Tensor::new(&[0.7f32], &Device::Cpu).unwrap())
            .unwrap();
        let x = input(1, 8, 2, 3, 5);
        let (y, map) = attn.forward_with_map(&x, false).unwrap();
        let v = attn
            .value
            .forward_t(&x, false)
            .unwrap()
            .reshape((8, 6))
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        let map = map.squeeze(0).unwrap().to_vec2::<f32>().unwrap();
        let xs = x.reshape((8, 6)).unwrap().to_vec2::<f32>().unwrap();
        let ys = y.reshape((8, 6)).unwrap().to_vec2::<f32>().unwrap();
        for c in 0..8 {
            for i in 0..6 {
                // o[c, i] = sum_j v[c, j] * attention[i, j]
                let o: f32 = (0..6).map(|j| v[c][j] * map[i][j]).sum();
                assert!((ys[c][i] - (0.7 * o + xs[c][i])).abs() < 1e-5);
            }
        }
    }

    /// The fused training path against the composed one: same output, same gradient for
    /// the input and every parameter (each from the same spectral-norm vectors).
    #[test]
    fn fused_path_matches_the_composed_block() {
        for pooled in [false, true] {
            fused_path_matches_the_composed_block_with(pooled);
        }
    }

    fn fused_path_matches_the_composed_block_with(pooled: bool) {
        let mut varmap = VarMap::new();
        let vb = seeded_var_builder(&varmap, stream(11, 1), &Device::Cpu);
        let attn =
            SelfAttention::new(vb, 16, &AttentionConfig { pooled }, WeightInit::Normal).unwrap();
        varmap
            .set_one("gamma", Tensor::new(&[0.8f32], &Device::Cpu).unwrap())
            .unwrap();
        let vectors: Vec<(String, Tensor)> = varmap
            .data()
            .lock()
            .unwrap()
            .iter()
            .filter(|(name, _)| name.ends_with("_u") || name.ends_with("_v"))
            .map(|(name, var)| (name.clone(), var.as_tensor().copy().unwrap()))
            .collect();
        let x = Var::from_tensor(&input(3, 16, 4, 6, 6)).unwrap();
        let r = input(3, 16, 4, 6, 7);
        let run = |fused: bool| {
            for (name, value) in &vectors {
                varmap.data().lock().unwrap()[name].set(value).unwrap();
            }
            let y = match fused {
                true => attn.forward_t(&x, true).unwrap(),
                false => attn.forward_with_map(&x, true).unwrap().0,
            };
            let grads = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
            (y, grads)
        };
        let ((y_fused, g_fused), (y_ref, g_ref)) = (run(true), run(false));
        assert!(max_abs(&(&y_fused - &y_ref).unwrap()) < 1e-5);
        let mut names = vec!["x".to_string()];
        names.extend(varmap.data().lock().unwrap().keys().cloned());
        for name in names {
            let var = match name.as_str() {
                "x" => x.clone(),
                _ => varmap.data().lock().unwrap()[&name].clone(),
            };
            match (g_fused.get(&var), g_ref.get(&var)) {
                (Some(a), Some(b)) => {
                    let diff = max_abs(&(a - b).unwrap());
                    assert!(
                        diff < 1e-4 * max_abs(b).max(1.0),
                        "pooled {pooled} {name}: {diff}"
                    );
                }
                (None, None) => {}
                (a, b) => panic!(
                    "{name}: fused grad {} vs composed {}",
                    a.is_some(),
                    b.is_some()
                ),
            }
        }
    }

    #[test]
    fn gradients_reach_gamma_and_every_conv() {
        let (mut varmap, attn) = block(8);
        varmap
            .set_one("gamma", Tensor::new(&[0.5f32], &Device::Cpu).unwrap())
            .unwrap();
        let x = input(2, 8, 2, 2, 5);
        let loss = attn
            .forward_t(&x, true)
            .unwrap()
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap();
        let grads = loss.backward().unwrap();
        for name in [
            "gamma",
            "query.weight",
            "key.weight",
            "value.weight",
            "value.bias",
        ] {
            let var = varmap.data().lock().unwrap()[name].clone();
            let g = grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("no grad for {name}"));
            let norm = g
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(norm > 0.0, "{name} got a zero gradient");
        }
    }

    #[test]
    fn pooled_form_attends_to_max_pooled_keys() {
        let mut varmap = VarMap::new();
        let vb = seeded_var_builder(&varmap, stream(12, 1), &Device::Cpu);
        let attn = SelfAttention::new(
            vb,
            16,
            &AttentionConfig { pooled: true },
            WeightInit::Normal,
        )
        .unwrap();
        varmap
            .set_one("gamma", Tensor::new(&[0.6f32], &Device::Cpu).unwrap())
            .unwrap();
        let x = input(2, 16, 4, 6, 5);
        let (y, map) = attn.forward_with_map(&x, false).unwrap();
        assert_eq!(map.dims(), &[2, 24, 6]);
        assert_eq!(y.dims(), x.dims());
        // Reference for image 1: o = output(v_pooled @ map^T), y = 0.6 o + x.
        let v = attn
            .value
            .forward_t(&x, false)
            .unwrap()
            .max_pool2d(2)
            .unwrap()
            .flatten_from(2)
            .unwrap();
        let o = v
            .matmul(&map.transpose(1, 2).unwrap())
            .unwrap()
            .reshape((2, 8, 4, 6))
            .unwrap();
        let o = attn.output().unwrap().forward_t(&o, false).unwrap();
        let want = ((o * 0.6).unwrap() + &x).unwrap();
        let diff = max_abs(&(y - want).unwrap());
        assert!(diff < 1e-5, "{diff}");
        let loss = attn
            .forward_t(&x, true)
            .unwrap()
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap();
        let grads = loss.backward().unwrap();
        for name in ["key.weight", "value.weight", "output.weight", "gamma"] {
            let var = varmap.data().lock().unwrap()[name].clone();
            assert!(grads.get(var.as_tensor()).is_some(), "no grad for {name}");
        }
    }
}
