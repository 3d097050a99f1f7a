//! A convolution's per-channel epilogue as fused candle custom ops on CPU: bias + activation,
//! and training-mode batch norm + activation.
//!
//! Composed from candle's ops the same epilogue is about five tensor ops forward and ten
//! backward, each a fresh buffer, and the gradient of a broadcast bias is a strided sum over
//! batch and positions that candle runs slowly. Here each is one pass forward and one (bias) or
//! two (batch norm) passes backward. The activation's derivative is read from the output
//! (ReLU and leaky ReLU with a non-negative slope keep the sign, tanh' = 1 - y^2), so the
//! pre-activation never has to be kept.
//!
//! Only f32 CPU tensors under `Backend::Fused` take this path; anything else is composed from candle's ops.

use std::sync::{Arc, Mutex, PoisonError};

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Device, Layout, Shape};
use candle_core::{Result, Tensor, Var};
use candle_nn::BatchNorm;
use rayon::prelude::*;

use super::cpu::simd::vectorized;
use super::cpu::storage::f32_slice;
use super::cpu::vector_math::{lane_sum, lane_sum3};
use super::grad_mode::param;
use super::handoff;
use super::Activation;

/// Elements per rayon task, so that tiny planes (4x4 feature maps) are not one task each.
const MIN_TASK_ELEMS: usize = 1 << 14;

/// An activation with its parameter, as the kernels apply it.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Act {
    Identity,
    Relu,
    LeakyRelu(f32),
    Tanh,
}

impl Act {
    /// `None` where the derivative cannot be read from the output (a negative leaky slope).
    fn new(act: Activation, leaky_slope: f64) -> Option<Self> {
        match act {
            Activation::None => Some(Self::Identity),
            Activation::Relu => Some(Self::Relu),
            Activation::LeakyRelu if leaky_slope >= 0.0 => {
                Some(Self::LeakyRelu(leaky_slope as f32))
            }
            Activation::LeakyRelu => None,
            Activation::Tanh => Some(Self::Tanh),
        }
    }

    #[inline(always)]
    fn apply(self, z: f32) -> f32 {
        match self {
            Self::Identity => z,
            Self::Relu => z.max(0.0),
            Self::LeakyRelu(slope) => {
                if z > 0.0 {
                    z
                } else {
                    z * slope
                }
            }
            Self::Tanh => z.tanh(),
        }
    }

    /// d act / dz at the point whose output is `y`.
    #[inline(always)]
    fn grad_at_output(self, y: f32) -> f32 {
        match self {
            Self::Identity => 1.0,
            Self::Relu => {
                if y > 0.0 {
                    1.0
                } else {
                    0.0
                }
            }
            Self::LeakyRelu(slope) => {
                if y > 0.0 {
                    1.0
                } else {
                    slope
                }
            }
            Self::Tanh => 1.0 - y * y,
        }
    }
}

/// Composes `act` from candle's ops: the reference, and the path for anything not f32 on CPU.
fn candle_activation(x: &Tensor, act: Activation, leaky_slope: f64) -> Result<Tensor> {
    match act {
        Activation::None => Ok(x.clone()),
        Activation::Relu => x.relu(),
        Activation::LeakyRelu => candle_nn::ops::leaky_relu(x, leaky_slope),
        Activation::Tanh => x.tanh(),
    }
}

/// The fast kernels' domain: non-empty f32 on the CPU with a channel axis.
fn takes_fast_path(x: &Tensor) -> bool {
    super::fused_on(x.device()) && x.dtype() == DType::F32 && x.rank() >= 2 && x.elem_count() > 0
}

/// `[1, C, 1, ...]`: a per-channel vector shaped to broadcast against `x`.
fn per_channel(v: &Tensor, x: &Tensor) -> Result<Tensor> {
    let mut dims = vec![1; x.rank()];
    dims[1] = v.elem_count();
    v.reshape(dims)
}

/// `act(x + bias)` with `bias` [C] added along axis 1 of `x` [B, C, ...]; either may be
/// left out. Gradients flow to `x` and `bias` where the graph tracks them.
pub fn bias_act(
    x: &Tensor,
    bias: Option<&Tensor>,
    act: Activation,
    leaky_slope: f64,
) -> Result<Tensor> {
    let kernel_act = Act::new(act, leaky_slope);
    match (kernel_act, bias) {
        (Some(Act::Identity), None) => Ok(x.clone()),
        (Some(act), _) if takes_fast_path(x) => {
            let x = x.contiguous()?;
            let bias = match bias {
                Some(b) => b.contiguous()?,
                // A constant: the graph does not track it, so it gets no gradient.
                None => Tensor::zeros(x.dim(1)?, DType::F32, x.device())?,
            };
            handoff::apply_op2(&x, &bias, BiasAct { act })
        }
        _ => {
            let y = match bias {
                Some(b) => x.broadcast_add(&per_channel(b, x)?)?,
                None => x.clone(),
            };
            candle_activation(&y, act, leaky_slope)
        }
    }
}

/// Planes (one channel of one batch item) of a `[B, C, ...]` tensor: (C, plane length).
fn planes(dims: &[usize]) -> (usize, usize) {
    let c = dims[1];
    let inner = dims[2..].iter().product();
    (c, inner)
}

/// Planes per rayon task.
fn planes_per_task(inner: usize) -> usize {
    (MIN_TASK_ELEMS / inner.max(1)).max(1)
}

/// `act(x * scale + shift)` per channel of `x` [B, C, inner], with `(scale, shift)` of a
/// channel from `coefficients`. A scale of 1 is an exact bias add.
fn affine_act(
    x: &[f32],
    c: usize,
    inner: usize,
    act: Act,
    coefficients: impl Fn(usize) -> (f32, f32) + Sync,
) -> Vec<f32> {
    let mut y = vec![0.0f32; x.len()];
    y.par_chunks_mut(inner.max(1))
        .zip(x.par_chunks(inner.max(1)))
        .enumerate()
        .with_min_len(planes_per_task(inner))
        .for_each(|(plane, (y, x))| {
            let (scale, shift) = coefficients(plane % c);
            vectorized(
                #[inline(always)]
                || {
                    for (y, &x) in y.iter_mut().zip(x) {
                        *y = act.apply(x * scale + shift);
                    }
                },
            )
        });
    y
}

/// Bias + activation as the epilogue of another kernel (the convolutions'): applied in place
/// to its output, and the backward from that output, as `bias_act` computes them.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) struct Epilogue {
    act: Act,
}

impl Epilogue {
    /// `None` where `bias_act` would not take the fused kernels.
    pub(super) fn new(act: Activation, leaky_slope: f64) -> Option<Self> {
        Act::new(act, leaky_slope).map(|act| Self { act })
    }

    /// `y = act(y + bias[channel])` for `y` [B, C, inner], in place.
    pub(super) fn apply_in_place(self, y: &mut [f32], bias: &[f32], inner: usize) {
        let c = bias.len();
        y.par_chunks_mut(inner.max(1))
            .enumerate()
            .with_min_len(planes_per_task(inner))
            .for_each(|(plane, y)| {
                let shift = bias[plane % c];
                vectorized(
                    #[inline(always)]
                    || y.iter_mut().for_each(|v| *v = self.act.apply(*v + shift)),
                )
            });
    }

    /// `dz = grad * act'(y)`: the gradient before the activation, from the epilogue's output
    /// `y` and its gradient.
    #[inline(always)]
    pub(super) fn grad_before_act(self, y: &[f32], grad: &[f32], dz: &mut [f32]) {
        let act = self.act;
        for ((dz, &g), &y) in dz.iter_mut().zip(grad).zip(y) {
            *dz = g * act.grad_at_output(y);
        }
    }

    /// From the epilogue's output `y` and its gradient: the gradient before the activation
    /// (the kernel's own output gradient) and, where `bias` is tracked, the bias gradient.
    pub(super) fn backward(
        self,
        y: &Tensor,
        grad: &Tensor,
        bias: &Tensor,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let dz = match self.act {
            Act::Identity => grad.clone(),
            act => grad.contiguous()?.apply_op2_no_bwd(y, &ActGrad { act })?,
        };
        let dbias = bias
            .track_op()
            .then(|| dz.contiguous()?.apply_op1_no_bwd(&ChannelSum))
            .transpose()?;
        Ok((dz, dbias))
    }
}

#[derive(Clone, Copy, Debug)]
struct BiasAct {
    act: Act,
}

impl CustomOp2 for BiasAct {
    fn name(&self) -> &'static str {
        "sagan-bias-act"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (c, inner) = planes(l1.dims());
        let x = f32_slice(s1, l1, l1.shape().elem_count())?;
        let bias = f32_slice(s2, l2, c)?;
        let y = affine_act(x, c, inner, self.act, |ch| (1.0, bias[ch]));
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        bias: &Tensor,
        y: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dz, dbias) = Epilogue { act: self.act }.backward(y, grad, bias)?;
        Ok((x.track_op().then_some(dz), dbias))
    }
}

/// `grad * act'(y)` from the output gradient and the activation's output.
#[derive(Clone, Copy, Debug)]
struct ActGrad {
    act: Act,
}

impl CustomOp2 for ActGrad {
    fn name(&self) -> &'static str {
        "sagan-act-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let n = l1.shape().elem_count();
        let grad = f32_slice(s1, l1, n)?;
        let y = f32_slice(s2, l2, n)?;
        let mut dz = vec![0.0f32; n];
        let epilogue = Epilogue { act: self.act };
        dz.par_chunks_mut(MIN_TASK_ELEMS)
            .zip(
                grad.par_chunks(MIN_TASK_ELEMS)
                    .zip(y.par_chunks(MIN_TASK_ELEMS)),
            )
            .for_each(|(dz, (g, y))| {
                vectorized(
                    #[inline(always)]
                    || epilogue.grad_before_act(y, g, dz),
                )
            });
        Ok((CpuStorage::F32(dz), l1.shape().clone()))
    }
}

/// Sum over every axis but 1: `[B, C, ...]` to `[C]`.
#[derive(Clone, Copy, Debug)]
struct ChannelSum;

impl CustomOp1 for ChannelSum {
    fn name(&self) -> &'static str {
        "sagan-channel-sum"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (c, inner) = planes(l.dims());
        let x = f32_slice(s, l, l.shape().elem_count())?;
        let batch = l.dims()[0];
        let sums: Vec<f32> = (0..c)
            .into_par_iter()
            .map(|ch| {
                vectorized(
                    #[inline(always)]
                    || {
                        (0..batch)
                            .map(|b| {
                                let start = (b * c + ch) * inner;
                                lane_sum(&x[start..start + inner], |_, v| v)
                            })
                            .sum()
                    },
                )
            })
            .collect();
        Ok((CpuStorage::F32(sums), Shape::from(c)))
    }
}

/// Batch statistics of one forward, kept for its backward and the running-stat update.
#[derive(Clone, Debug, Default)]
struct BatchStats {
    mean: Vec<f32>,
    /// Biased variance, as the normalisation uses it.
    var: Vec<f32>,
    inv_std: Vec<f32>,
}

/// `act(batch_norm(x + bias))` with `bn`'s scale and shift: batch statistics (and an update
/// of the running ones) when training, running statistics otherwise. `bias` is the
/// preceding convolution's (never differentiated, so it may be a parameter as is). The normalisation removes a constant bias from the output
/// exactly, so in training it only enters the running mean and its gradient is exactly zero
/// (it is not given one).
pub fn batch_norm_act(
    x: &Tensor,
    bias: Option<&Tensor>,
    bn: &BatchNorm,
    act: Activation,
    leaky_slope: f64,
    train: bool,
) -> Result<Tensor> {
    let Some(norm) = BatchNormAct::for_training(x, bn, act, leaky_slope, train) else {
        let x = match bias {
            // Detached as in the kernels: through the norm its gradient is zero but for
            // rounding, which Adam would turn into steps of a full learning rate.
            Some(b) => x.broadcast_add(&per_channel(&b.detach(), x)?)?,
            None => x.clone(),
        };
        return candle_activation(
            &candle_nn::ModuleT::forward_t(bn, &x, train)?,
            act,
            leaky_slope,
        );
    };
    let (gamma, beta) = scale_shift(bn, train, x.device())?;
    let y = handoff::apply_op3(&x.contiguous()?, &gamma, &beta, norm.clone())?;
    norm.update_running_stats(bn, bias, x.elem_count())?;
    Ok(y)
}

/// `bn`'s scale and shift as a forward uses them; a norm without them has the constants 1 and
/// 0, which the graph does not track.
pub(super) fn scale_shift(
    bn: &BatchNorm,
    train: bool,
    device: &Device,
) -> Result<(Tensor, Tensor)> {
    Ok(match bn.weight_and_bias() {
        Some((gamma, beta)) => (param(gamma, train), param(beta, train)),
        None => {
            let c = bn.running_mean().elem_count();
            let ones = Tensor::ones(c, DType::F32, device)?;
            (ones, Tensor::zeros(c, DType::F32, device)?)
        }
    })
}

/// Training-mode batch norm + activation: the op of `batch_norm_act`, and the last stage of
/// `conv::conv_transpose2d_bn_act`'s op.
#[derive(Clone, Debug)]
pub(super) struct BatchNormAct {
    act: Act,
    eps: f32,
    /// Written by the forward, read by the backward and the running-stat update; clones share
    /// it (an op is handed a clone, and its caller reads what the forward wrote).
    stats: Arc<Mutex<Option<BatchStats>>>,
}

fn read_stats(stats: &Mutex<Option<BatchStats>>) -> Result<BatchStats> {
    stats
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone()
        .ok_or_else(|| {
            candle_core::Error::Msg("batch norm: statistics read before the forward".into())
        })
}

/// The contiguous `[B, C, inner]` data of channel `ch`, one slice per batch item.
fn channel_slices(x: &[f32], c: usize, inner: usize, ch: usize) -> impl Iterator<Item = &[f32]> {
    x.chunks_exact(c * inner)
        .map(move |item| &item[ch * inner..(ch + 1) * inner])
}

impl CustomOp3 for BatchNormAct {
    fn name(&self) -> &'static str {
        "sagan-batch-norm-act"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (c, _) = planes(l1.dims());
        let x = f32_slice(s1, l1, l1.shape().elem_count())?;
        let y = self.normalize(x, l1.dims(), f32_slice(s2, l2, c)?, f32_slice(s3, l3, c)?);
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        beta: &Tensor,
        y: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dx, dgamma_beta) = self.gradients(x, y, &gamma.to_vec1()?, grad)?;
        let c = gamma.elem_count();
        Ok((
            x.track_op().then_some(dx),
            gamma
                .track_op()
                .then(|| dgamma_beta.narrow(0, 0, c))
                .transpose()?,
            beta.track_op()
                .then(|| dgamma_beta.narrow(0, c, c))
                .transpose()?,
        ))
    }
}

impl BatchNormAct {
    /// The kernels' norm for a training forward of `x`; None where they do not apply (an
    /// evaluation forward, an activation they lack, a tensor off their path).
    pub(super) fn for_training(
        x: &Tensor,
        bn: &BatchNorm,
        act: Activation,
        leaky_slope: f64,
        train: bool,
    ) -> Option<Self> {
        let act = Act::new(act, leaky_slope)?;
        (train && takes_fast_path(x)).then(|| Self {
            act,
            eps: bn.eps() as f32,
            stats: Arc::default(),
        })
    }

    /// After the forward of an input of `elems` elements: `bn`'s running statistics,
    /// running = (1 - momentum) * running + momentum * batch, with the unbiased variance (as
    /// candle's and PyTorch's batch norms do).
    pub(super) fn update_running_stats(
        &self,
        bn: &BatchNorm,
        bias: Option<&Tensor>,
        elems: usize,
    ) -> Result<()> {
        let stats = read_stats(&self.stats)?;
        let momentum = bn.momentum();
        let device = bn.running_mean().device();
        let c = stats.mean.len();
        let mut mean = Tensor::from_slice(&stats.mean, c, device)?;
        if let Some(bias) = bias {
            mean = (mean + bias.detach())?;
        }
        let count = elems / c;
        let unbiased = count as f64 / (count.max(2) - 1) as f64;
        let var = (Tensor::from_slice(&stats.var, c, device)? * unbiased)?;
        for (running, batch) in [(bn.running_mean(), mean), (bn.running_var(), var)] {
            let updated = ((running * (1.0 - momentum))? + (batch * momentum)?)?;
            Var::from_tensor(running)?.set(&updated)?;
        }
        Ok(())
    }

    /// `act(gamma * xhat + beta)` of `x` (dims `[B, C, ...]`) with its batch statistics, which
    /// it records for the backward and the running-stat update.
    pub(super) fn normalize(
        &self,
        x: &[f32],
        dims: &[usize],
        gamma: &[f32],
        beta: &[f32],
    ) -> Vec<f32> {
        let (c, inner) = planes(dims);
        let count = (x.len() / c) as f32;
        // Two passes per channel (mean, then squared deviations): no cancellation.
        let (mean, var): (Vec<f32>, Vec<f32>) = (0..c)
            .into_par_iter()
            .map(|ch| {
                vectorized(
                    #[inline(always)]
                    || {
                        let sum: f32 = channel_slices(x, c, inner, ch)
                            .map(|p| lane_sum(p, |_, v| v))
                            .sum();
                        let mean = sum / count;
                        let sq: f32 = channel_slices(x, c, inner, ch)
                            .map(|p| lane_sum(p, |_, v| (v - mean) * (v - mean)))
                            .sum();
                        (mean, sq / count)
                    },
                )
            })
            .unzip();
        let inv_std: Vec<f32> = var.iter().map(|v| 1.0 / (v + self.eps).sqrt()).collect();
        let y = affine_act(x, c, inner, self.act, |ch| {
            let scale = gamma[ch] * inv_std[ch];
            (scale, beta[ch] - mean[ch] * scale)
        });
        *self.stats.lock().unwrap_or_else(PoisonError::into_inner) =
            Some(BatchStats { mean, var, inv_std });
        y
    }

    /// Gradients of the forward that read `x` and gave `y`, for the output gradient `grad`:
    /// `dx` and `[dgamma, dbeta]` ([2C]).
    pub(super) fn gradients(
        &self,
        x: &Tensor,
        y: &Tensor,
        gamma: &[f32],
        grad: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        let op = BatchNormActGrad {
            act: self.act,
            stats: read_stats(&self.stats)?,
            gamma: gamma.to_vec(),
        };
        // One buffer holds [dx (B*C*inner), dgamma (C), dbeta (C)]: a custom op has one output.
        let packed = x.apply_op3_no_bwd(y, &grad.contiguous()?, &op)?;
        let n = x.elem_count();
        let dx = packed.narrow(0, 0, n)?.reshape(x.shape())?;
        Ok((dx, packed.narrow(0, n, 2 * gamma.len())?))
    }
}

/// Backward of `BatchNormAct`: `(x, y, grad)` to `[dx, dgamma, dbeta]` flattened.
/// With dz = grad * act'(y), xhat = (x - mean) * inv_std and M values per channel:
/// dbeta = sum dz, dgamma = sum dz * xhat,
/// dx = gamma * inv_std * (dz - dbeta / M - xhat * dgamma / M).
struct BatchNormActGrad {
    act: Act,
    stats: BatchStats,
    gamma: Vec<f32>,
}

impl CustomOp3 for BatchNormActGrad {
    fn name(&self) -> &'static str {
        "sagan-batch-norm-act-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (c, inner) = planes(l1.dims());
        let n = l1.shape().elem_count();
        let x = f32_slice(s1, l1, n)?;
        let y = f32_slice(s2, l2, n)?;
        let grad = f32_slice(s3, l3, n)?;
        let gamma = &self.gamma;
        let BatchStats { mean, inv_std, .. } = &self.stats;
        let act = self.act;
        let count = (n / c) as f32;
        let (dbeta, dgamma): (Vec<f32>, Vec<f32>) = (0..c)
            .into_par_iter()
            .map(|ch| {
                let (m, s) = (mean[ch], inv_std[ch]);
                let mut dbeta = 0.0;
                let mut dgamma = 0.0;
                let items = channel_slices(x, c, inner, ch)
                    .zip(channel_slices(y, c, inner, ch))
                    .zip(channel_slices(grad, c, inner, ch));
                vectorized(
                    #[inline(always)]
                    || {
                        for ((x, y), g) in items {
                            dbeta += lane_sum3(g, y, x, |g, y, _| g * act.grad_at_output(y));
                            dgamma += lane_sum3(g, y, x, |g, y, x| {
                                g * act.grad_at_output(y) * (x - m) * s
                            });
                        }
                        (dbeta, dgamma)
                    },
                )
            })
            .unzip();
        let mut out = vec![0.0f32; n + 2 * c];
        let (dx, sums) = out.split_at_mut(n);
        dx.par_chunks_mut(inner.max(1))
            .enumerate()
            .with_min_len(planes_per_task(inner))
            .for_each(|(plane, dx)| {
                let ch = plane % c;
                let start = plane * inner;
                let (x, y, g) = (
                    &x[start..start + inner],
                    &y[start..start + inner],
                    &grad[start..start + inner],
                );
                let (m, s) = (mean[ch], inv_std[ch]);
                let scale = gamma[ch] * s;
                let mean_dz = dbeta[ch] / count;
                let mean_dz_xhat = dgamma[ch] / count;
                vectorized(
                    #[inline(always)]
                    || {
                        for i in 0..inner {
                            let dz = g[i] * act.grad_at_output(y[i]);
                            let xhat = (x[i] - m) * s;
                            dx[i] = scale * (dz - mean_dz - xhat * mean_dz_xhat);
                        }
                    },
                )
            });
        sums[..c].copy_from_slice(&dgamma);
        sums[c..].copy_from_slice(&dbeta);
        Ok((CpuStorage::F32(out), Shape::from(n + 2 * c)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testing::{self, input};
    use candle_core::backprop::GradStore;
    use candle_nn::{BatchNormConfig, VarBuilder, VarMap};

    const ACTS: [Activation; 4] = [
        Activation::None,
        Activation::Relu,
        Activation::LeakyRelu,
        Activation::Tanh,
    ];

    fn assert_close(got: &Tensor, want: &Tensor, what: &str) {
        testing::assert_close(got, want, 2e-5, what);
    }

    /// Gradients of sum(y * r) for a fixed random r.
    fn backward(y: &Tensor, seed: u64) -> GradStore {
        let dims = y.dims();
        let r = input(
            dims[0],
            dims[1],
            dims.get(2).copied().unwrap_or(1),
            dims.get(3).copied().unwrap_or(1),
            seed,
        )
        .reshape(dims)
        .unwrap();
        (y * r).unwrap().sum_all().unwrap().backward().unwrap()
    }

    #[test]
    fn bias_act_matches_candle_ops_with_gradients() {
        for (shape, seed) in [
            (vec![3, 5, 4, 3], 1),
            (vec![4, 8, 1, 1], 2),
            (vec![5, 6], 3),
        ] {
            let x = input(1, 1, 1, shape.iter().product(), seed)
                .reshape(shape.clone())
                .unwrap();
            let bias = input(1, 1, 1, shape[1], seed + 10).flatten_all().unwrap();
            for act in ACTS {
                let what = format!("{act:?} {shape:?}");
                let (xv, bv) = (
                    Var::from_tensor(&x).unwrap(),
                    Var::from_tensor(&bias).unwrap(),
                );
                let fused = bias_act(xv.as_tensor(), Some(bv.as_tensor()), act, 0.1).unwrap();
                let g_fused = backward(&fused, 7);
                let reference = candle_activation(
                    &xv.broadcast_add(&per_channel(&bv, &x).unwrap()).unwrap(),
                    act,
                    0.1,
                )
                .unwrap();
                let g_ref = backward(&reference, 7);
                assert_close(&fused, &reference, &format!("{what} forward"));
                let vars = [(&xv, "x"), (&bv, "bias")];
                testing::assert_grads_close(&g_fused, &g_ref, &vars, 2e-5, &what);
            }
        }
    }

    #[test]
    fn bias_act_without_bias_is_the_activation() {
        let x = Var::from_tensor(&input(2, 3, 4, 4, 5)).unwrap();
        let y = bias_act(&x, None, Activation::LeakyRelu, 0.2).unwrap();
        let want = candle_nn::ops::leaky_relu(&x, 0.2).unwrap();
        assert_close(&y, &want, "forward");
        assert_close(
            backward(&y, 3).get(&x).unwrap(),
            backward(&want, 3).get(&x).unwrap(),
            "dx",
        );
    }

    #[test]
    fn batch_norm_act_matches_candle_batch_norm_with_gradients() {
        for (shape, seed) in [([4, 6, 5, 3], 1), ([8, 3, 1, 1], 2), ([2, 5, 7, 7], 3)] {
            for act in [Activation::None, Activation::Relu, Activation::LeakyRelu] {
                let what = format!("{act:?} {shape:?}");
                let [(fused_map, fused_bn), (ref_map, ref_bn)] = testing::batch_norms(shape[1]);
                // Scaled and shifted so the statistics are not those of a standard normal.
                let x = ((input(shape[0], shape[1], shape[2], shape[3], seed) * 3.0).unwrap()
                    + 2.0)
                    .unwrap();
                let conv_bias = input(1, 1, 1, shape[1], seed + 5).flatten_all().unwrap();
                let xv = Var::from_tensor(&x).unwrap();
                let fused =
                    batch_norm_act(&xv, Some(&conv_bias), &fused_bn, act, 0.1, true).unwrap();
                let reference = candle_activation(
                    &candle_nn::ModuleT::forward_t(
                        &ref_bn,
                        &xv.broadcast_add(&per_channel(&conv_bias, &x).unwrap())
                            .unwrap(),
                        true,
                    )
                    .unwrap(),
                    act,
                    0.1,
                )
                .unwrap();
                assert_close(&fused, &reference, &format!("{what} forward"));
                let (g_fused, g_ref) = (backward(&fused, 9), backward(&reference, 9));
                assert_close(
                    g_fused.get(&xv).unwrap(),
                    g_ref.get(&xv).unwrap(),
                    &format!("{what} dx"),
                );
                testing::assert_batch_norms_close(
                    (&fused_map, &fused_bn, &g_fused),
                    (&ref_map, &ref_bn, &g_ref),
                    2e-5,
                    &what,
                );
            }
        }
    }

    #[test]
    fn batch_norm_without_scale_and_shift_matches_candle() {
        let config = BatchNormConfig {
            affine: false,
            ..Default::default()
        };
        let [fused_bn, ref_bn] = std::array::from_fn(|_| {
            let varmap = VarMap::new();
            let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
            candle_nn::batch_norm(5, config, vb).unwrap()
        });
        let x = Var::from_tensor(&input(3, 5, 4, 4, 12)).unwrap();
        let fused = batch_norm_act(&x, None, &fused_bn, Activation::Relu, 0.1, true).unwrap();
        let reference = candle_nn::ModuleT::forward_t(&ref_bn, &x, true)
            .unwrap()
            .relu()
            .unwrap();
        assert_close(&fused, &reference, "forward");
        assert_close(
            backward(&fused, 2).get(&x).unwrap(),
            backward(&reference, 2).get(&x).unwrap(),
            "dx",
        );
        assert_close(fused_bn.running_var(), ref_bn.running_var(), "running_var");
    }

    #[test]
    fn batch_norm_act_in_evaluation_uses_running_statistics() {
        let [(_, fused_bn), (_, ref_bn)] = testing::batch_norms(4);
        let x = input(3, 4, 2, 2, 8);
        let y = batch_norm_act(&x, None, &fused_bn, Activation::Relu, 0.1, false).unwrap();
        let want = candle_nn::ModuleT::forward_t(&ref_bn, &x, false)
            .unwrap()
            .relu()
            .unwrap();
        assert_close(&y, &want, "evaluation");
    }
}
