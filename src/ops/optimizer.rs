//! In-place optimizer arithmetic on CPU: Adam's moments and update, and the EMA. Composed from
//! candle's ops, one Adam step is about fifteen passes over every weight, each a fresh buffer;
//! these are three passes that allocate nothing.

use candle_core::{CpuStorage, InplaceOp2, InplaceOp3, Layout, Result, Tensor};
use rayon::prelude::*;

use super::cpu::simd::vectorized;
use super::cpu::storage::{f32_slice, f32_slice_mut};

/// Elements per rayon task.
const TASK_ELEMS: usize = 1 << 15;

/// Whether `t` can be updated by these kernels (f32, CPU, contiguous).
pub fn supported(t: &Tensor) -> bool {
    super::fused_on(t.device()) && t.dtype() == candle_core::DType::F32 && t.is_contiguous()
}

/// `acc = keep * acc + (1 - keep) * x` (or `x^2` with `square`), in place. Rounded as
/// candle's `acc * keep + x * (1 - keep)` is, so a run gives the same numbers either way.
pub struct Lerp {
    pub keep: f64,
    pub square: bool,
}

impl InplaceOp2 for Lerp {
    fn name(&self) -> &'static str {
        "sagan-lerp"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<()> {
        let n = l1.shape().elem_count();
        let acc = f32_slice_mut(s1, l1, n)?;
        let x = f32_slice(s2, l2, n)?;
        let (keep, take, square) = (self.keep as f32, (1.0 - self.keep) as f32, self.square);
        acc.par_chunks_mut(TASK_ELEMS)
            .zip(x.par_chunks(TASK_ELEMS))
            .for_each(|(acc, x)| {
                vectorized(
                    #[inline(always)]
                    || {
                        for (a, &x) in acc.iter_mut().zip(x) {
                            let x = if square { x * x } else { x };
                            *a = *a * keep + x * take;
                        }
                    },
                )
            });
        Ok(())
    }
}

/// Adam's update from its moments, in place on the weight:
/// `w -= lr * (m / correction1) / (sqrt(v / correction2) + eps)`, rounded as candle's ops
/// (which multiply by reciprocals) round it.
pub struct AdamApply {
    pub lr: f64,
    pub correction1: f64,
    pub correction2: f64,
    pub eps: f64,
}

impl InplaceOp3 for AdamApply {
    fn name(&self) -> &'static str {
        "sagan-adam-apply"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<()> {
        let n = l1.shape().elem_count();
        let w = f32_slice_mut(s1, l1, n)?;
        let m = f32_slice(s2, l2, n)?;
        let v = f32_slice(s3, l3, n)?;
        let lr = self.lr as f32;
        let scale1 = (1.0 / self.correction1) as f32;
        let scale2 = (1.0 / self.correction2) as f32;
        let eps = self.eps as f32;
        w.par_chunks_mut(TASK_ELEMS)
            .zip(m.par_chunks(TASK_ELEMS).zip(v.par_chunks(TASK_ELEMS)))
            .for_each(|(w, (m, v))| {
                vectorized(
                    #[inline(always)]
                    || {
                        for ((w, &m), &v) in w.iter_mut().zip(m).zip(v) {
                            *w -= (m * scale1) / ((v * scale2).sqrt() + eps) * lr;
                        }
                    },
                )
            });
        Ok(())
    }
}
