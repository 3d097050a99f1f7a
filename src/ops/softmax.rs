//! A differentiable softmax over the last dimension as one fused pass forward and one backward.
//!
//! candle's differentiable `candle_nn::ops::softmax` is a chain of max, subtract, exp, sum and
//! divide, each a full pass over the tensor with its own buffer and its own backward; for the
//! attention maps of a SAGAN ([B, N, N], 64 MiB per 1024-position layer at batch 16) those passes
//! are a large part of a training step. Here the forward is one pass per row (max, exp, sum,
//! scale) and the backward, dx = y * (dy - <dy, y>), another.

use super::cpu::simd::vectorized;
use super::cpu::storage::f32_slice;
use super::cpu::vector_math::{exp, lane_dot, lane_max, lane_sum_mut};
use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Shape, Tensor, D};
use rayon::prelude::*;

/// Softmax over the last dimension, differentiable. f32 CPU tensors take the fused kernels;
/// anything else goes to candle's own op.
pub fn softmax_last_dim(x: &Tensor) -> candle_core::Result<Tensor> {
    if !super::fused_on(x.device()) || x.dtype() != DType::F32 || x.rank() == 0 {
        return candle_nn::ops::softmax(x, D::Minus1);
    }
    x.contiguous()?.apply_op1(Softmax)
}

/// Rows handed to one rayon task: enough work to amortise the scheduling.
const ROWS_PER_TASK: usize = 64;

fn row_len(layout: &Layout) -> candle_core::Result<usize> {
    match layout.dims().last() {
        Some(&n) if n > 0 => Ok(n),
        _ => candle_core::bail!("softmax: the last dimension is empty"),
    }
}

struct Softmax;

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "sagan-softmax-last-dim"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let n = row_len(l)?;
        let x = f32_slice(s, l, l.shape().elem_count())?;
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(n * ROWS_PER_TASK)
            .zip(x.par_chunks(n * ROWS_PER_TASK))
            .for_each(|(ys, xs)| {
                ys.copy_from_slice(xs);
                ys.chunks_mut(n).for_each(softmax_in_place);
            });
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, y: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(y.apply_op2_no_bwd(&grad.contiguous()?, &SoftmaxGrad)?))
    }
}

/// Softmax of one row, in place: the max, then exp and sum in one pass, then the scaling.
pub(super) fn softmax_in_place(row: &mut [f32]) {
    vectorized(
        #[inline(always)]
        || softmax_row(row),
    )
}

#[inline(always)]
fn softmax_row(row: &mut [f32]) {
    let max = lane_max(row);
    let scale = 1.0 / lane_sum_mut(row, |y| exp(y - max));
    row.iter_mut().for_each(|y| *y *= scale);
}

/// The gradient of one softmax row in place, for an output scaled by `scale`: `dy` (the
/// gradient of the unscaled output) becomes `dx = scale * y * (dy - <dy, y>)`. Returns
/// `<dy, y>`.
pub(super) fn softmax_grad_in_place(y: &[f32], dy: &mut [f32], scale: f32) -> f32 {
    vectorized(
        #[inline(always)]
        || softmax_grad_row(y, dy, scale),
    )
}

#[inline(always)]
fn softmax_grad_row(y: &[f32], dy: &mut [f32], scale: f32) -> f32 {
    let dot = lane_dot(dy, y);
    for (dy, &y) in dy.iter_mut().zip(y) {
        *dy = scale * y * (*dy - dot);
    }
    dot
}

/// (y, dy) -> dx = y * (dy - <dy, y>) row by row.
struct SoftmaxGrad;

impl CustomOp2 for SoftmaxGrad {
    fn name(&self) -> &'static str {
        "sagan-softmax-last-dim-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        if l1.dims() != l2.dims() {
            candle_core::bail!(
                "softmax grad: shapes {:?} and {:?} differ",
                l1.dims(),
                l2.dims()
            );
        }
        let n = row_len(l1)?;
        let len = l1.shape().elem_count();
        let (y, dy) = (f32_slice(s1, l1, len)?, f32_slice(s2, l2, len)?);
        let mut dx = vec![0f32; len];
        dx.par_chunks_mut(n * ROWS_PER_TASK)
            .zip(
                y.par_chunks(n * ROWS_PER_TASK)
                    .zip(dy.par_chunks(n * ROWS_PER_TASK)),
            )
            .for_each(|(dxs, (ys, dys))| {
                dxs.copy_from_slice(dys);
                for (dx, y) in dxs.chunks_mut(n).zip(ys.chunks(n)) {
                    softmax_grad_in_place(y, dx, 1.0);
                }
            });
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testing::{input, max_abs, weighted_grad};
    use candle_core::Device;
    use candle_core::Var;

    #[test]
    fn forward_and_gradient_match_candles_softmax() {
        // Rows of 37 (not a multiple of anything) and more rows than one task takes.
        let x = (input(3, 50, 1, 37, 4) * 4.0).unwrap().squeeze(2).unwrap();
        let weights = input(3, 50, 1, 37, 5).squeeze(2).unwrap();
        let x = Var::from_tensor(&x).unwrap();
        let ours = softmax_last_dim(x.as_tensor()).unwrap();
        let reference = candle_nn::ops::softmax(x.as_tensor(), D::Minus1).unwrap();
        assert!(max_abs(&(&ours - &reference).unwrap()) < 1e-6);
        let (ours, reference) = (
            weighted_grad(&ours, &weights, &x),
            weighted_grad(&reference, &weights, &x),
        );
        assert!(max_abs(&(ours - reference).unwrap()) < 1e-6);
    }

    /// Every CPU computes the same rows: the dispatched build (AVX-512 or AVX2 where the CPU
    /// has them) against the baseline one.
    #[test]
    fn dispatched_and_baseline_rows_agree() {
        for len in [1, 7, 16, 33, 196, 1024] {
            let row: Vec<f32> = (0..len)
                .map(|i| ((i * 7919 % 97) as f32 - 48.0) * 0.3)
                .collect();
            let (mut baseline, mut dispatched) = (row.clone(), row.clone());
            softmax_row(&mut baseline);
            softmax_in_place(&mut dispatched);
            assert_eq!(baseline, dispatched, "row of {len}");
            let sum: f32 = baseline.iter().sum();
            assert!((sum - 1.0).abs() < 1e-5, "row of {len} sums to {sum}");
            let dy: Vec<f32> = (0..len).map(|i| (i % 5) as f32 - 2.0).collect();
            let (mut baseline_dx, mut dispatched_dx) = (dy.clone(), dy.clone());
            let dot = softmax_grad_row(&baseline, &mut baseline_dx, 0.5);
            assert_eq!(
                dot,
                softmax_grad_in_place(&baseline, &mut dispatched_dx, 0.5)
            );
            assert_eq!(baseline_dx, dispatched_dx, "gradient row of {len}");
        }
    }

    #[test]
    fn large_logits_do_not_overflow() {
        let x = Tensor::new(&[[1000f32, 1000., -1000.]], &Device::Cpu).unwrap();
        let y = softmax_last_dim(&x).unwrap().to_vec2::<f32>().unwrap();
        assert!((y[0][0] - 0.5).abs() < 1e-6 && (y[0][1] - 0.5).abs() < 1e-6 && y[0][2] == 0.0);
    }

    #[test]
    fn gradient_matches_finite_differences() {
        let x = input(1, 1, 2, 5, 8).squeeze(0).unwrap().squeeze(0).unwrap();
        let weights = input(1, 1, 2, 5, 9).squeeze(0).unwrap().squeeze(0).unwrap();
        let loss = |x: &Tensor| -> f64 {
            let y = softmax_last_dim(x).unwrap();
            (y * &weights)
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap() as f64
        };
        let var = Var::from_tensor(&x).unwrap();
        let y = softmax_last_dim(var.as_tensor()).unwrap();
        let analytic = weighted_grad(&y, &weights, &var).to_vec2::<f32>().unwrap();
        let base = x.to_vec2::<f32>().unwrap();
        let eps = 1e-2f32;
        for r in 0..2 {
            for c in 0..5 {
                let shifted = |d: f32| {
                    let mut v = base.clone();
                    v[r][c] += d;
                    Tensor::new(v, &Device::Cpu).unwrap()
                };
                let numeric = (loss(&shifted(eps)) - loss(&shifted(-eps))) / (2.0 * eps as f64);
                assert!(
                    (numeric - analytic[r][c] as f64).abs() < 1e-3,
                    "[{r}][{c}]: {numeric} vs {}",
                    analytic[r][c]
                );
            }
        }
    }
}
