//! Spectral normalisation (Miyato et al. 2018) of conv, transposed-conv and linear weights.
//!
//! The weight is viewed as a matrix with one row per output unit; its largest singular value
//! sigma is estimated by power iteration and the layer uses W / sigma. The iteration vectors u
//! and v are variables of the VarMap (saved in checkpoints, never given gradients): one power
//! iteration per training forward refines them; evaluation uses them as stored.

use super::init;
use crate::config::{Activation, WeightInit};
use crate::ops;
use candle_core::{Module, ModuleT, Result, Tensor, Var};
use candle_nn::{BatchNorm, Init, VarBuilder};

const EPS: f64 = 1e-12;

pub struct SpectralNorm {
    weight: Tensor,
    u: Var,
    v: Var,
    /// The axis of `weight` that indexes output units (0 for conv/linear, 1 for conv-transpose).
    out_axis: usize,
}

fn normalize(x: &Tensor) -> Result<Tensor> {
    x.broadcast_div(&(x.sqr()?.sum_all()?.sqrt()? + EPS)?)
}

/// A variable of the VarMap as a `Var`, so that it can be updated in place.
fn var_from(vb: &VarBuilder, shape: usize, name: &str) -> Result<Var> {
    let tensor = vb.get_with_hints(
        shape,
        name,
        Init::Randn {
            mean: 0.0,
            stdev: 1.0,
        },
    )?;
    Var::from_tensor(&tensor)
}

impl SpectralNorm {
    /// Wraps `weight` (a variable of `vb`'s VarMap); u and v are `{name}_u`, `{name}_v` in `vb`.
    pub fn new(weight: Tensor, out_axis: usize, vb: &VarBuilder, name: &str) -> Result<Self> {
        let rows = weight.dim(out_axis)?;
        let cols = weight.elem_count() / rows;
        let u = var_from(vb, rows, &format!("{name}_u"))?;
        let v = var_from(vb, cols, &format!("{name}_v"))?;
        Ok(Self {
            weight,
            u,
            v,
            out_axis,
        })
    }

    /// The raw (unnormalised) weight.
    pub fn raw_weight(&self) -> &Tensor {
        &self.weight
    }

    /// `weight` (this layer's, as a forward uses it) as a [rows, cols] matrix, rows indexing
    /// output units.
    fn matrix(&self, weight: &Tensor) -> Result<Tensor> {
        let w = if self.out_axis == 0 {
            weight.clone()
        } else {
            weight.transpose(0, self.out_axis)?
        };
        let rows = w.dim(0)?;
        w.contiguous()?.reshape((rows, ()))
    }

    /// sigma = u^T W v, differentiable in W (u and v are constants of the graph).
    fn sigma_of(matrix: &Tensor, u: &Tensor, v: &Tensor) -> Result<Tensor> {
        let wv = matrix.matmul(&v.unsqueeze(1)?)?.squeeze(1)?;
        (u * wv)?.sum_all()
    }

    /// The normalised weight W / sigma. Training (`train`) first runs one power iteration
    /// and stores the new u and v; evaluation uses them as stored and, like every parameter in
    /// an evaluation forward, gives a constant (see `ops::grad_mode::param`).
    pub fn weight(&self, train: bool) -> Result<Tensor> {
        let weight = super::param(&self.weight, train);
        if ops::spectral_norm::supports(&weight) {
            if train {
                let (u, v) = ops::spectral_norm::power_iteration(
                    &weight,
                    self.out_axis,
                    self.u.as_tensor(),
                )?;
                self.u.set(&u)?;
                self.v.set(&v)?;
            }
            let (u, v) = (self.u.as_tensor(), self.v.as_tensor());
            return ops::spectral_norm::normalized(&weight, self.out_axis, u, v);
        }
        self.weight_composed(weight, train)
    }

    /// `weight` through candle's ops, for tensors the kernels do not take.
    fn weight_composed(&self, weight: Tensor, train: bool) -> Result<Tensor> {
        let matrix = self.matrix(&weight)?;
        if train {
            let w = matrix.detach();
            let v = normalize(
                &w.t()?
                    .matmul(&self.u.as_tensor().unsqueeze(1)?)?
                    .squeeze(1)?,
            )?;
            let u = normalize(&w.matmul(&v.unsqueeze(1)?)?.squeeze(1)?)?;
            self.u.set(&u)?;
            self.v.set(&v)?;
        }
        // Differentiable in W exactly when `weight` is.
        let sigma = Self::sigma_of(
            &matrix,
            &self.u.as_tensor().detach(),
            &self.v.as_tensor().detach(),
        )?;
        weight.broadcast_div(&sigma)
    }

    /// The current sigma estimate as a number, from the stored vectors.
    pub fn sigma(&self) -> Result<f32> {
        Self::sigma_of(
            &self.matrix(&self.weight)?,
            self.u.as_tensor(),
            self.v.as_tensor(),
        )?
        .to_scalar()
    }
}

/// How a convolution's weight is laid out and applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConvKind {
    /// Weight [out, in, k, k].
    Conv,
    /// Weight [in, out, k, k], as candle's `conv_transpose2d` expects.
    Transpose,
}

/// A spectrally normalised 2-D convolution or transposed convolution with bias.
pub struct SNConv2d {
    sn: SpectralNorm,
    bias: Tensor,
    kind: ConvKind,
    stride: usize,
    padding: usize,
}

impl SNConv2d {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        vb: VarBuilder,
        kind: ConvKind,
        in_channels: usize,
        out_channels: usize,
        kernel: usize,
        stride: usize,
        padding: usize,
        init: WeightInit,
    ) -> Result<Self> {
        let (shape, out_axis) = match kind {
            ConvKind::Conv => ([out_channels, in_channels, kernel, kernel], 0),
            ConvKind::Transpose => ([in_channels, out_channels, kernel, kernel], 1),
        };
        let (weight, bias_init) = init::weight(&vb, &shape, init)?;
        let sn = SpectralNorm::new(weight, out_axis, &vb, "weight")?;
        let bias = vb.get_with_hints(out_channels, "bias", bias_init)?;
        Ok(Self {
            sn,
            bias,
            kind,
            stride,
            padding,
        })
    }

    pub fn spectral_norm(&self) -> &SpectralNorm {
        &self.sn
    }

    pub fn bias(&self) -> &Tensor {
        &self.bias
    }

    pub fn kind(&self) -> ConvKind {
        self.kind
    }

    pub fn stride(&self) -> usize {
        self.stride
    }

    pub fn padding(&self) -> usize {
        self.padding
    }

    /// `act(conv(x) + bias)`, the bias and activation in one fused kernel.
    pub fn forward_act(
        &self,
        x: &Tensor,
        act: Activation,
        leaky_slope: f64,
        train: bool,
    ) -> Result<Tensor> {
        let bias = super::param(&self.bias, train);
        if self.kind == ConvKind::Conv {
            let w = self.sn.weight(train)?;
            let (stride, padding) = (self.stride, self.padding);
            return ops::conv::conv2d_bias_act(x, &w, &bias, stride, padding, act, leaky_slope);
        }
        let y = self.forward_unbiased(x, train)?;
        ops::channel::bias_act(&y, Some(&bias), act, leaky_slope)
    }

    /// `act(batch_norm(conv(x) + bias))`; a transposed convolution's training-mode norm runs
    /// inside its op (see `ops::conv::conv_transpose2d_bn_act`).
    pub fn forward_bn_act(
        &self,
        x: &Tensor,
        bn: &BatchNorm,
        act: Activation,
        leaky_slope: f64,
        train: bool,
    ) -> Result<Tensor> {
        if self.kind == ConvKind::Conv {
            let z = self.forward_unbiased(x, train)?;
            return ops::channel::batch_norm_act(&z, Some(&self.bias), bn, act, leaky_slope, train);
        }
        let w = self.sn.weight(train)?;
        let (stride, padding) = (self.stride, self.padding);
        ops::conv::conv_transpose2d_bn_act(
            x,
            &w,
            stride,
            padding,
            &self.bias,
            bn,
            act,
            leaky_slope,
            train,
        )
    }

    /// The convolution without its bias, for callers that fuse the bias into what follows.
    pub fn forward_unbiased(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let w = self.sn.weight(train)?;
        // im2col/col2im + GEMM kernels with their own backward: candle's CPU transposed conv
        // (also its conv2d input gradient) is a direct loop several times slower.
        match self.kind {
            ConvKind::Conv => ops::conv::conv2d(x, &w, self.stride, self.padding),
            ConvKind::Transpose => ops::conv::conv_transpose2d(x, &w, self.stride, self.padding),
        }
    }
}

impl ModuleT for SNConv2d {
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        self.forward_act(x, Activation::None, 0.0, train)
    }
}

/// A spectrally normalised linear layer, weight [out, in].
pub struct SNLinear {
    sn: SpectralNorm,
    bias: Tensor,
}

impl SNLinear {
    pub fn new(
        vb: VarBuilder,
        in_features: usize,
        out_features: usize,
        init: WeightInit,
    ) -> Result<Self> {
        let (weight, bias_init) = init::weight(&vb, &[out_features, in_features], init)?;
        let sn = SpectralNorm::new(weight, 0, &vb, "weight")?;
        let bias = vb.get_with_hints(out_features, "bias", bias_init)?;
        Ok(Self { sn, bias })
    }

    pub fn spectral_norm(&self) -> &SpectralNorm {
        &self.sn
    }

    pub fn bias(&self) -> &Tensor {
        &self.bias
    }
}

impl ModuleT for SNLinear {
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let w = self.sn.weight(train)?;
        candle_nn::Linear::new(w, Some(super::param(&self.bias, train))).forward(x)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testing;
    use crate::rng::{seeded_var_builder, stream};
    use candle_core::Device;
    use candle_nn::VarMap;

    fn largest_singular_value(m: &[Vec<f32>]) -> f32 {
        // Many power iterations on M^T M, in f64, as the reference.
        let (rows, cols) = (m.len(), m[0].len());
        let mut v = vec![1.0f64; cols];
        let mut sigma = 0.0;
        for _ in 0..500 {
            let mv: Vec<f64> = (0..rows)
                .map(|r| (0..cols).map(|c| m[r][c] as f64 * v[c]).sum())
                .collect();
            let mtmv: Vec<f64> = (0..cols)
                .map(|c| (0..rows).map(|r| m[r][c] as f64 * mv[r]).sum())
                .collect();
            let norm = mtmv.iter().map(|x| x * x).sum::<f64>().sqrt();
            v = mtmv.iter().map(|x| x / norm).collect();
            sigma = norm.sqrt();
        }
        sigma as f32
    }

    #[test]
    fn a_layer_draws_its_weights_within_the_bounds() {
        let varmap = VarMap::new();
        let vb = seeded_var_builder(&varmap, stream(6, 1), &Device::Cpu);
        let conv = SNConv2d::new(vb, ConvKind::Transpose, 4, 16, 4, 2, 1, WeightInit::Pytorch);
        let conv = conv.unwrap();
        // Weight [in 4, out 16, 4, 4]: fan_in = 16 * 16.
        let bound = 1.0 / 16.0;
        for t in [&conv.sn.weight, &conv.bias] {
            let values = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let max = values.iter().fold(0f32, |m, v| m.max(v.abs()));
            // Uniform: the largest of 16 or more draws lies well past half the bound, never past it.
            assert!(max <= bound && max > 0.5 * bound, "{max} vs {bound}");
        }
    }

    #[test]
    fn kernels_match_the_composed_normalisation() {
        // (kind or linear, in, out, k): output units on axis 0 and on axis 1.
        for (kind, cin, cout, k) in [
            (Some(ConvKind::Conv), 5, 7, 3),
            (Some(ConvKind::Transpose), 6, 4, 4),
            (None, 9, 3, 1),
        ] {
            let build = || {
                let varmap = VarMap::new();
                let vb = seeded_var_builder(&varmap, stream(5, 1), &Device::Cpu);
                let sn = match kind {
                    Some(kind) => {
                        SNConv2d::new(vb, kind, cin, cout, k, 1, 0, WeightInit::Normal)
                            .unwrap()
                            .sn
                    }
                    None => SNLinear::new(vb, cin, cout, WeightInit::Normal).unwrap().sn,
                };
                (varmap, sn)
            };
            let ((_, fast), (_, composed)) = (build(), build());
            let what = format!("{kind:?} {cin}->{cout} k{k}");
            for train in [true, true, false] {
                let got = fast.weight(train).unwrap();
                let want = composed
                    .weight_composed(super::super::param(&composed.weight, train), train)
                    .unwrap();
                testing::assert_close(&got, &want, 1e-5, &format!("{what} train {train}"));
                for (a, b) in [(&fast.u, &composed.u), (&fast.v, &composed.v)] {
                    testing::assert_close(a.as_tensor(), b.as_tensor(), 1e-5, &what);
                }
                if train {
                    let r = testing::input(1, 1, 1, got.elem_count(), 9).reshape(got.shape());
                    let r = r.unwrap();
                    let grad = |w: &Tensor, sn: &SpectralNorm| {
                        let grads = (w * &r).unwrap().sum_all().unwrap().backward().unwrap();
                        grads.get(&sn.weight).unwrap().clone()
                    };
                    let (g, w) = (grad(&got, &fast), grad(&want, &composed));
                    testing::assert_close(&g, &w, 1e-5, &format!("{what} gradient"));
                }
            }
        }
    }

    #[test]
    fn power_iteration_converges_to_the_largest_singular_value() {
        let varmap = VarMap::new();
        let vb = seeded_var_builder(&varmap, stream(3, 1), &Device::Cpu);
        let conv =
            SNConv2d::new(vb, ConvKind::Transpose, 6, 4, 3, 1, 0, WeightInit::Normal).unwrap();
        for _ in 0..200 {
            conv.sn.weight(true).unwrap();
        }
        // Rows are output units: weight [in, out, k, k] -> [out, in*k*k].
        let m = conv
            .sn
            .matrix(&conv.sn.weight)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        let expected = largest_singular_value(&m);
        let sigma = conv.sn.sigma().unwrap();
        assert!(
            (sigma - expected).abs() / expected < 1e-3,
            "{sigma} vs {expected}"
        );
        let normalised = conv.sn.weight(false).unwrap().transpose(0, 1).unwrap();
        let rows = normalised.dim(0).unwrap();
        let m = normalised
            .contiguous()
            .unwrap()
            .reshape((rows, ()))
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        assert!((largest_singular_value(&m) - 1.0).abs() < 1e-3);
    }

    #[test]
    fn evaluation_leaves_u_and_v_alone_training_updates_them() {
        let varmap = VarMap::new();
        let vb = seeded_var_builder(&varmap, stream(4, 1), &Device::Cpu);
        let lin = SNLinear::new(vb, 5, 3, WeightInit::Normal).unwrap();
        let u0 = lin.sn.u.as_tensor().to_vec1::<f32>().unwrap();
        lin.forward_t(
            &Tensor::ones((2, 5), candle_core::DType::F32, &Device::Cpu).unwrap(),
            false,
        )
        .unwrap();
        assert_eq!(lin.sn.u.as_tensor().to_vec1::<f32>().unwrap(), u0);
        lin.forward_t(
            &Tensor::ones((2, 5), candle_core::DType::F32, &Device::Cpu).unwrap(),
            true,
        )
        .unwrap();
        assert_ne!(lin.sn.u.as_tensor().to_vec1::<f32>().unwrap(), u0);
        // u and v live in the VarMap, so checkpoints carry them.
        let names: Vec<String> = varmap.data().lock().unwrap().keys().cloned().collect();
        assert!(names.contains(&"weight_u".to_string()) && names.contains(&"weight_v".to_string()));
    }
}
