//! Spectral normalisation's work per forward as loops over the weight in its own layout, on
//! CPU: the power iteration, sigma = u^T M v and W / sigma with its backward.
//!
//! Composed from candle's ops, a transposed conv's weight is first copied into matrix layout,
//! and W / sigma with sigma differentiable in W takes a dozen full passes over the weight and as
//! many buffers forward and backward (a broadcast division's gradient alone squares and divides
//! a weight-sized tensor). Here the power iteration takes two passes, sigma one, the division
//! one, and the backward two.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::cpu::simd::vectorized;
use super::cpu::storage::{f32_slice, with_f32_data};
use super::cpu::vector_math::lane_dot;
use super::handoff;

/// Weight elements per rayon task.
const TASK_ELEMS: usize = 1 << 15;

/// Added to a norm before dividing by it, as in the composed normalisation.
const EPS: f64 = 1e-12;

/// Whether these kernels handle `weight`.
pub fn supports(weight: &Tensor) -> bool {
    super::fused_on(weight.device()) && weight.dtype() == DType::F32 && weight.rank() >= 2
}

/// One power iteration from `u`: `v = normalize(M^T u)`, `u = normalize(M v)`, returned as
/// `(u, v)`. `weight` has its output units on `out_axis` (0 or 1).
pub fn power_iteration(
    weight: &Tensor,
    out_axis: usize,
    u: &Tensor,
) -> candle_core::Result<(Tensor, Tensor)> {
    let view = MatrixView::new(weight.dims(), out_axis)?;
    let u = u.to_vec1::<f32>()?;
    if u.len() != view.rows {
        candle_core::bail!(
            "spectral norm: u has {} entries for {} rows",
            u.len(),
            view.rows
        );
    }
    let (u, v) = with_f32_data([weight], |[w]| {
        let mut v = vec![0f32; view.cols()];
        for (r, c, run) in view.runs(w) {
            for (v, &x) in v[c..c + run.len()].iter_mut().zip(run) {
                *v += u[r] * x;
            }
        }
        normalize(&mut v);
        let mut u = vec![0f32; view.rows];
        for (r, c, run) in view.runs(w) {
            u[r] += lane_dot(run, &v[c..]);
        }
        normalize(&mut u);
        (u, v)
    })?;
    let device = weight.device();
    Ok((Tensor::new(u, device)?, Tensor::new(v, device)?))
}

/// `weight / sigma` with `sigma = u^T M v` (u and v constants), differentiable in `weight`.
pub fn normalized(
    weight: &Tensor,
    out_axis: usize,
    u: &Tensor,
    v: &Tensor,
) -> candle_core::Result<Tensor> {
    let view = MatrixView::new(weight.dims(), out_axis)?;
    let (u, v) = (u.to_vec1::<f32>()?, v.to_vec1::<f32>()?);
    if u.len() != view.rows || v.len() != view.cols() {
        candle_core::bail!(
            "spectral norm: u [{}] and v [{}] do not fit a {}x{} weight matrix",
            u.len(),
            v.len(),
            view.rows,
            view.cols()
        );
    }
    let weight = weight.contiguous()?;
    let sigma = with_f32_data([&weight], |[w]| view.bilinear(w, &u, &v))?;
    handoff::apply_op1(&weight, DivideBySigma { view, sigma, u, v })
}

/// `x / (|x| + EPS)`.
fn normalize(x: &mut [f32]) {
    let norm = x
        .iter()
        .map(|&v| f64::from(v) * f64::from(v))
        .sum::<f64>()
        .sqrt();
    let scale = (1.0 / (norm + EPS)) as f32;
    x.iter_mut().for_each(|v| *v *= scale);
}

/// A weight seen as the matrix M [rows, outer * inner] that spectral normalisation normalises:
/// the weight is [outer, rows, inner] and `M[r, a * inner + t] = W[a, r, t]`. Output units on
/// axis 0 (conv, linear) make `outer` 1; on axis 1 (transposed conv), `outer` is axis 0.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct MatrixView {
    outer: usize,
    rows: usize,
    inner: usize,
}

impl MatrixView {
    fn new(dims: &[usize], out_axis: usize) -> candle_core::Result<Self> {
        let (outer, rest) = match (out_axis, dims) {
            (0, _) => (1, dims),
            (1, [outer, rest @ ..]) => (*outer, rest),
            _ => candle_core::bail!("spectral norm: output axis {out_axis} of {dims:?}"),
        };
        let Some((&rows, inner)) = rest.split_first() else {
            candle_core::bail!("spectral norm: weight {dims:?} has no output axis");
        };
        let view = Self {
            outer,
            rows,
            inner: inner.iter().product(),
        };
        if view.len() == 0 {
            candle_core::bail!("spectral norm: empty weight {dims:?}");
        }
        Ok(view)
    }

    fn len(&self) -> usize {
        self.outer * self.rows * self.inner
    }

    fn cols(&self) -> usize {
        self.outer * self.inner
    }

    /// Row and first column of the contiguous run `W[a, r, :]` with storage index `j`.
    fn run_position(&self, j: usize) -> (usize, usize) {
        (j % self.rows, j / self.rows * self.inner)
    }

    /// The runs of `w` in storage order, each with its row and first column.
    fn runs<'a>(&self, w: &'a [f32]) -> impl Iterator<Item = (usize, usize, &'a [f32])> + 'a {
        let view = *self;
        w.chunks_exact(self.inner).enumerate().map(move |(j, run)| {
            let (r, c) = view.run_position(j);
            (r, c, run)
        })
    }

    /// Runs per rayon task: about `TASK_ELEMS` elements.
    fn runs_per_task(&self) -> usize {
        (TASK_ELEMS / self.inner).max(1)
    }

    /// `u^T M v`, summed per task in f64 and the tasks' sums in order (independent of
    /// scheduling).
    fn bilinear(&self, w: &[f32], u: &[f32], v: &[f32]) -> f32 {
        let per_task = self.runs_per_task();
        let partial: Vec<f64> = w
            .par_chunks(per_task * self.inner)
            .enumerate()
            .map(|(task, chunk)| {
                chunk
                    .chunks_exact(self.inner)
                    .enumerate()
                    .map(|(k, run)| {
                        let (r, c) = self.run_position(task * per_task + k);
                        let dot = vectorized(
                            #[inline(always)]
                            || lane_dot(run, &v[c..]),
                        );
                        f64::from(u[r] * dot)
                    })
                    .sum()
            })
            .collect();
        partial.iter().sum::<f64>() as f32
    }
}

/// `W -> W / sigma`, with sigma's dependence on W in the backward.
struct DivideBySigma {
    view: MatrixView,
    sigma: f32,
    u: Vec<f32>,
    v: Vec<f32>,
}

impl CustomOp1 for DivideBySigma {
    fn name(&self) -> &'static str {
        "sagan-spectral-norm"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let w = f32_slice(s, l, self.view.len())?;
        let mut out = vec![0f32; w.len()];
        out.par_chunks_mut(TASK_ELEMS)
            .zip(w.par_chunks(TASK_ELEMS))
            .for_each(|(out, w)| {
                for (o, &w) in out.iter_mut().zip(w) {
                    *o = w / self.sigma;
                }
            });
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    fn bwd(
        &self,
        weight: &Tensor,
        _out: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let op = DivideBySigmaGrad {
            view: self.view,
            sigma: self.sigma,
            u: self.u.clone(),
            v: self.v.clone(),
        };
        Ok(Some(weight.apply_op2_no_bwd(&grad.contiguous()?, &op)?))
    }
}

/// `(W, dy) -> dW = dy / sigma - <dy, W> / sigma^2 * u v^T` (in W's layout), as
/// d sigma / dW = u v^T.
struct DivideBySigmaGrad {
    view: MatrixView,
    sigma: f32,
    u: Vec<f32>,
    v: Vec<f32>,
}

impl CustomOp2 for DivideBySigmaGrad {
    fn name(&self) -> &'static str {
        "sagan-spectral-norm-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let view = self.view;
        let w = f32_slice(s1, l1, view.len())?;
        let dy = f32_slice(s2, l2, view.len())?;
        let partial: Vec<f64> = w
            .par_chunks(TASK_ELEMS)
            .zip(dy.par_chunks(TASK_ELEMS))
            .map(|(w, dy)| {
                f64::from(vectorized(
                    #[inline(always)]
                    || lane_dot(w, dy),
                ))
            })
            .collect();
        let dot = partial.iter().sum::<f64>() as f32;
        let (inv_sigma, k) = (1.0 / self.sigma, dot / (self.sigma * self.sigma));
        let per_task = view.runs_per_task() * view.inner;
        let mut dw = vec![0f32; w.len()];
        dw.par_chunks_mut(per_task)
            .zip(dy.par_chunks(per_task))
            .enumerate()
            .for_each(|(task, (dw, dy))| {
                let runs = dw
                    .chunks_exact_mut(view.inner)
                    .zip(dy.chunks_exact(view.inner));
                for (k_run, (dw, dy)) in runs.enumerate() {
                    let (r, c) = view.run_position(task * view.runs_per_task() + k_run);
                    let v = &self.v[c..c + view.inner];
                    let ku = k * self.u[r];
                    vectorized(
                        #[inline(always)]
                        || {
                            for ((dw, &dy), &v) in dw.iter_mut().zip(dy).zip(v) {
                                *dw = dy * inv_sigma - ku * v;
                            }
                        },
                    );
                }
            });
        Ok((CpuStorage::F32(dw), l1.shape().clone()))
    }
}
