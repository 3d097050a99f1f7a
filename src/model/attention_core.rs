//! The core of the SAGAN attention block as one candle custom op on CPU, with its backward:
//! `qkv = W x + b` (the query, key and value 1x1 convolutions as one GEMM), in the pooled form
//! keys and values 2x2 max-pooled, `energy = q^T k`, a softmax over the keys and `o = v A^T`.
//!
//! Composed from candle's ops the block materialises [B, N, M] tensors (energy, map, their
//! transposes and gradients: 256 MiB each for a plain 32x32 layer at batch 64), every one a
//! full pass and a fresh allocation, and candle accumulates each gradient through another. Here
//! the work runs per batch item, items in parallel, and the [N, M] map lives in a per-item
//! scratch buffer; the backward recomputes it (and qkv) from the inputs rather than keeping it.

use candle_core::{CpuStorage, CustomOp3, DType, Device, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::cpu_storage::f32_slice;
use super::matmul::{matmul, matmul_serial, MatRef};
use super::softmax::{softmax_grad_in_place, softmax_in_place};

/// `o [B, Cv, H, W]` of the attention core for `x [B, C, H, W]`, the stacked 1x1 weights
/// `w [2 * query_channels + Cv, C]` (query rows, then key rows, then value rows) and biases
/// `b [2 * query_channels + Cv]`; `pooled` max-pools keys and values 2x2 (H and W even).
/// Differentiable in all three. f32 CPU tensors only: see `supports`.
pub fn attention_core(
    x: &Tensor,
    w: &Tensor,
    b: &Tensor,
    query_channels: usize,
    pooled: bool,
) -> Result<Tensor> {
    let op = AttentionCore {
        query_channels,
        pooled,
    };
    let geom = op.geom(x.dims(), w.dims())?;
    if b.dims() != [geom.rows] {
        candle_core::bail!(
            "attention core: bias shape {:?}, expected [{}]",
            b.dims(),
            geom.rows
        );
    }
    x.contiguous()?
        .apply_op3(&w.contiguous()?, &b.contiguous()?, op)
}

/// Whether the fused kernels can run on `x`.
pub fn supports(x: &Tensor) -> bool {
    matches!(x.device(), Device::Cpu) && x.dtype() == DType::F32 && x.rank() == 4
}

#[derive(Clone, Copy, Debug)]
struct Geom {
    batch: usize,
    channels: usize,
    query: usize,
    value: usize,
    /// Rows of the stacked weight: 2 * query + value.
    rows: usize,
    h: usize,
    w: usize,
    /// Query positions N = H * W.
    positions: usize,
    /// Key positions M: N, or N / 4 when pooled.
    keys: usize,
    pooled: bool,
    /// Fewer items than threads (batch 1 at high resolution): each item's products and rows
    /// use all threads, instead of one item per thread.
    split_items: bool,
}

/// Per-item buffers of the forward and the backward.
struct Scratch {
    qkv: Vec<f32>,
    /// Pooled keys and values [query + value, M] (pooled form only).
    kv: Vec<f32>,
    /// For each pooled key/value element, the position of its maximum (pooled form only).
    argmax: Vec<u32>,
    map: Vec<f32>,
}

impl Geom {
    fn new(x: &[usize], w: &[usize], query: usize, pooled: bool) -> Result<Self> {
        let (&[batch, channels, h, wd], &[rows, w_in]) = (x, w) else {
            candle_core::bail!("attention core: x {x:?} must be [B, C, H, W], w {w:?} [rows, C]");
        };
        if w_in != channels || rows <= 2 * query || query == 0 {
            candle_core::bail!(
                "attention core: weight {w:?} does not stack 2 x {query} query/key rows and value rows over {channels} channels"
            );
        }
        if h == 0 || wd == 0 {
            candle_core::bail!("attention core: empty feature map {h}x{wd}");
        }
        if pooled && (h % 2 != 0 || wd % 2 != 0) {
            candle_core::bail!("attention core: pooling 2x2 needs an even size, got {h}x{wd}");
        }
        let positions = h * wd;
        Ok(Self {
            batch,
            channels,
            query,
            value: rows - 2 * query,
            rows,
            h,
            w: wd,
            positions,
            keys: if pooled { positions / 4 } else { positions },
            pooled,
            split_items: batch < rayon::current_num_threads(),
        })
    }

    /// Items per rayon task: one task per thread, so that each allocates its scratch buffers
    /// (8 MiB for a 32x32 map and its gradient) once rather than once per item.
    fn items_per_task(&self) -> usize {
        self.batch.div_ceil(rayon::current_num_threads()).max(1)
    }

    /// `dst = a x b` on the item's share of the threads.
    fn gemm(&self, dst: &mut [f32], a: MatRef, b: MatRef) -> Result<()> {
        match self.split_items {
            true => matmul(dst, a, b, false),
            false => matmul_serial(dst, a, b, false),
        }
    }

    /// `f` on every row of `rows` (rows of `len`), on the item's share of the threads.
    fn each_row(&self, rows: &mut [f32], len: usize, f: impl Fn(usize, &mut [f32]) + Sync) {
        match self.split_items {
            true => rows
                .par_chunks_mut(len)
                .enumerate()
                .for_each(|(i, r)| f(i, r)),
            false => rows.chunks_mut(len).enumerate().for_each(|(i, r)| f(i, r)),
        }
    }

    fn scratch(&self) -> Scratch {
        let kv_len = if self.pooled {
            (self.query + self.value) * self.keys
        } else {
            0
        };
        Scratch {
            qkv: vec![0f32; self.rows * self.positions],
            kv: vec![0f32; kv_len],
            argmax: vec![0; kv_len],
            map: vec![0f32; self.positions * self.keys],
        }
    }

    /// For one item: `qkv [rows, N] = w x + b`, the keys and values the map uses (pooled
    /// into `kv` in the pooled form) and the map `A [N, M] = softmax_rows(q^T k)`.
    fn forward_item(&self, w: &[f32], b: &[f32], x: &[f32], s: &mut Scratch) -> Result<()> {
        let n = self.positions;
        self.gemm(
            &mut s.qkv,
            MatRef::row_major(w, self.rows, self.channels),
            MatRef::row_major(x, self.channels, n),
        )?;
        for (row, &bias) in s.qkv.chunks_mut(n).zip(b) {
            row.iter_mut().for_each(|v| *v += bias);
        }
        if self.pooled {
            self.max_pool(&s.qkv[self.query * n..], &mut s.kv, &mut s.argmax);
        }
        let q = MatRef::row_major(&s.qkv[..self.query * n], self.query, n);
        let keys = match self.pooled {
            true => &s.kv[..self.query * self.keys],
            false => &s.qkv[self.query * n..2 * self.query * n],
        };
        let k = MatRef::row_major(keys, self.query, self.keys);
        self.gemm(&mut s.map, q.t(), k)?;
        self.each_row(&mut s.map, self.keys, |_, row| softmax_in_place(row));
        Ok(())
    }

    /// Keys then values, [query + value, M], as the map sees them.
    fn kv<'a>(&self, s: &'a Scratch) -> &'a [f32] {
        match self.pooled {
            true => &s.kv,
            false => &s.qkv[self.query * self.positions..],
        }
    }

    fn values<'a>(&self, s: &'a Scratch) -> MatRef<'a> {
        MatRef::row_major(&self.kv(s)[self.query * self.keys..], self.value, self.keys)
    }

    /// 2x2 max pooling of `rows` planes [.., H, W] into `pooled` [.., H/2, W/2], remembering
    /// where each maximum came from (the first of equal ones).
    fn max_pool(&self, planes: &[f32], pooled: &mut [f32], argmax: &mut [u32]) {
        let (w, pw) = (self.w, self.w / 2);
        let planes = planes.chunks_exact(self.positions);
        let outs = pooled
            .chunks_exact_mut(self.keys)
            .zip(argmax.chunks_exact_mut(self.keys));
        for (plane, (out, arg)) in planes.zip(outs) {
            for (i, (o, a)) in out.iter_mut().zip(arg.iter_mut()).enumerate() {
                let (r, c) = (2 * (i / pw), 2 * (i % pw));
                let candidates = [
                    r * w + c,
                    r * w + c + 1,
                    (r + 1) * w + c,
                    (r + 1) * w + c + 1,
                ];
                let best = candidates
                    .into_iter()
                    .reduce(|best, p| if plane[p] > plane[best] { p } else { best })
                    .unwrap_or(0);
                (*o, *a) = (plane[best], best as u32);
            }
        }
    }
}

#[derive(Clone, Copy, Debug)]
struct AttentionCore {
    query_channels: usize,
    pooled: bool,
}

impl AttentionCore {
    fn geom(&self, x: &[usize], w: &[usize]) -> Result<Geom> {
        Geom::new(x, w, self.query_channels, self.pooled)
    }
}

impl CustomOp3 for AttentionCore {
    fn name(&self) -> &'static str {
        "sagan-attention-core"
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
        let g = self.geom(l1.dims(), l2.dims())?;
        let n = g.positions;
        let x = f32_slice(s1, l1, g.batch * g.channels * n)?;
        let w = f32_slice(s2, l2, g.rows * g.channels)?;
        let b = f32_slice(s3, l3, g.rows)?;
        let mut o = vec![0f32; g.batch * g.value * n];
        o.par_chunks_mut(g.value * n)
            .zip(x.par_chunks(g.channels * n))
            .with_min_len(g.items_per_task())
            .try_for_each_init(
                || (g.scratch(), vec![0f32; n * g.value]),
                |(s, o_t), (o, x)| -> Result<()> {
                    g.forward_item(w, b, x, s)?;
                    // o^T [N, Cv] = A [N, M] x v^T, then transposed: see `transpose`.
                    let map = MatRef::row_major(&s.map, n, g.keys);
                    g.gemm(o_t, map, g.values(s).t())?;
                    transpose(o_t, n, g.value, o);
                    Ok(())
                },
            )?;
        Ok((
            CpuStorage::F32(o),
            Shape::from((g.batch, g.value, g.h, g.w)),
        ))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _o: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let op = AttentionCoreGrad {
            core: *self,
            bias: b.to_vec1()?,
        };
        // One buffer holds [dx (B*C*N), dw (rows*C), db (rows)]: a custom op has one output.
        let packed = x.apply_op3_no_bwd(w, &grad.contiguous()?, &op)?;
        let (nx, nw) = (x.elem_count(), w.elem_count());
        let dx = packed.narrow(0, 0, nx)?.reshape(x.shape())?;
        let dw = packed.narrow(0, nx, nw)?.reshape(w.shape())?;
        let db = packed.narrow(0, nx + nw, b.elem_count())?;
        Ok((
            x.track_op().then_some(dx),
            w.track_op().then_some(dw),
            b.track_op().then_some(db),
        ))
    }
}

/// `dst [cols, rows] = src [rows, cols]^T`, both row-major.
///
/// The GEMM kernels stream their left operand down columns and pack (copy) it when it is
/// row-major; for the two products with the [N, M] map on the right transposed (o = v A^T and
/// dq = k dE^T) that would copy the whole map per product. Computing the transposed product
/// instead packs the small operand, and transposing the small result back is cheap.
fn transpose(src: &[f32], rows: usize, cols: usize, dst: &mut [f32]) {
    for (r, row) in src.chunks_exact(cols).enumerate().take(rows) {
        for (c, &v) in row.iter().enumerate() {
            dst[c * rows + r] = v;
        }
    }
}

/// Backward of `AttentionCore`: `(x, w, do)` to `[dx, dw, db]` flattened. Per item, with
/// A recomputed: dv = do A, dA = do^T v, dE = A * (dA - rowsum(dA * A)), dq = k dE^T,
/// dk = q dE (pooled keys and values: their gradients go back to where each maximum came
/// from), then dx = w^T dqkv; dw = sum over items of dqkv x^T and db of dqkv's row sums,
/// summed in item order after the parallel part so that results do not depend on scheduling.
struct AttentionCoreGrad {
    core: AttentionCore,
    bias: Vec<f32>,
}

impl CustomOp3 for AttentionCoreGrad {
    fn name(&self) -> &'static str {
        "sagan-attention-core-grad"
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
        let g = self.core.geom(l1.dims(), l2.dims())?;
        let (n, m) = (g.positions, g.keys);
        let x = f32_slice(s1, l1, g.batch * g.channels * n)?;
        let w = f32_slice(s2, l2, g.rows * g.channels)?;
        let grad = f32_slice(s3, l3, g.batch * g.value * n)?;
        let (nx, nw) = (x.len(), w.len());
        let mut out = vec![0f32; nx + nw + g.rows];
        let mut dqkv_all = vec![0f32; g.batch * g.rows * n];
        let (dx_all, rest) = out.split_at_mut(nx);
        let (dw, db) = rest.split_at_mut(nw);
        let q_len = g.query * n;
        dx_all
            .par_chunks_mut(g.channels * n)
            .zip(dqkv_all.par_chunks_mut(g.rows * n))
            .zip(
                x.par_chunks(g.channels * n)
                    .zip(grad.par_chunks(g.value * n)),
            )
            .with_min_len(g.items_per_task())
            .try_for_each_init(
                || {
                    let dmap = vec![0f32; n * m];
                    let dkv = vec![0f32; (g.query + g.value) * m];
                    (g.scratch(), dmap, dkv, vec![0f32; n * g.query])
                },
                |(s, dmap, dkv, dq_t), ((dx, dqkv), (x, d_o))| -> Result<()> {
                    g.forward_item(w, &self.bias, x, s)?;
                    let d_o = MatRef::row_major(d_o, g.value, n);
                    let a = MatRef::row_major(&s.map, n, m);
                    let (dq, dkv_full) = dqkv.split_at_mut(q_len);
                    // Gradients of the keys and values the map saw: pooled ones in `dkv`.
                    let dkv_seen: &mut [f32] = match g.pooled {
                        true => &mut dkv[..],
                        false => &mut *dkv_full,
                    };
                    let (dk, dv) = dkv_seen.split_at_mut(g.query * m);
                    // dv [Cv, M] = do [Cv, N] x A [N, M]
                    g.gemm(dv, d_o, a)?;
                    // dA [N, M] = do^T [N, Cv] x v [Cv, M], then dE in place.
                    g.gemm(dmap, d_o.t(), g.values(s))?;
                    let map = &s.map;
                    g.each_row(dmap, m, |i, de| {
                        softmax_grad_in_place(&map[i * m..(i + 1) * m], de)
                    });
                    let de = MatRef::row_major(dmap, n, m);
                    let q = MatRef::row_major(&s.qkv[..q_len], g.query, n);
                    let k = MatRef::row_major(&g.kv(s)[..g.query * m], g.query, m);
                    // dq = k dE^T, as dq^T = dE k^T (see `transpose`).
                    g.gemm(dq_t, de, k.t())?;
                    transpose(dq_t, n, g.query, dq);
                    g.gemm(dk, q, de)?; // dk = q dE
                    if g.pooled {
                        dkv_full.fill(0.0);
                        let planes = dkv_full.chunks_exact_mut(n);
                        let pooled = dkv.chunks_exact(m).zip(s.argmax.chunks_exact(m));
                        for (plane, (d, arg)) in planes.zip(pooled) {
                            for (&d, &p) in d.iter().zip(arg) {
                                plane[p as usize] += d;
                            }
                        }
                    }
                    // dx [C, N] = w^T [C, rows] x dqkv [rows, N]
                    let w = MatRef::row_major(w, g.rows, g.channels);
                    g.gemm(dx, w.t(), MatRef::row_major(dqkv, g.rows, n))
                },
            )?;
        for (item, (dqkv, x)) in dqkv_all
            .chunks(g.rows * n)
            .zip(x.chunks(g.channels * n))
            .enumerate()
        {
            // dw [rows, C] += dqkv [rows, N] x x^T [N, C]
            let x_t = MatRef::row_major(x, g.channels, n).t();
            matmul(dw, MatRef::row_major(dqkv, g.rows, n), x_t, item > 0)?;
            for (db, row) in db.iter_mut().zip(dqkv.chunks(n)) {
                *db += row.iter().sum::<f32>();
            }
        }
        Ok((CpuStorage::F32(out), Shape::from(nx + nw + g.rows)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::testing::{self, input};
    use candle_core::{Var, D};

    /// The same computation composed from candle's ops.
    fn reference(x: &Tensor, w: &Tensor, b: &Tensor, query: usize, pooled: bool) -> Tensor {
        let (batch, c, h, wd) = x.dims4().unwrap();
        let rows = w.dim(0).unwrap();
        let x = x.reshape((batch, c, h * wd)).unwrap();
        let qkv = w
            .broadcast_matmul(&x)
            .unwrap()
            .broadcast_add(&b.reshape((1, rows, 1)).unwrap())
            .unwrap();
        let keys = |start: usize, len: usize| {
            let t = qkv.narrow(1, start, len).unwrap();
            match pooled {
                true => {
                    crate::model::attention::max_pool2(&t.reshape((batch, len, h, wd)).unwrap())
                        .unwrap()
                        .flatten_from(2)
                        .unwrap()
                }
                false => t,
            }
        };
        let q = qkv.narrow(1, 0, query).unwrap();
        let k = keys(query, query);
        let v = keys(2 * query, rows - 2 * query);
        let energy = q.transpose(1, 2).unwrap().matmul(&k).unwrap();
        let map = candle_nn::ops::softmax(&energy, D::Minus1).unwrap();
        v.matmul(&map.t().unwrap())
            .unwrap()
            .reshape((batch, rows - 2 * query, h, wd))
            .unwrap()
    }

    fn assert_close(got: &Tensor, want: &Tensor, what: &str) {
        testing::assert_close(got, want, 1e-5, what);
    }

    #[test]
    fn forward_and_gradients_match_composed_ops() {
        // (batch, channels, h, w, query, value, pooled): the plain block's value = channels,
        // the pooled block's channels / 2, and others.
        for (batch, c, h, wd, query, value, pooled) in [
            (3, 16, 5, 4, 2, 16, false),
            (2, 8, 3, 3, 1, 5, false),
            (3, 16, 6, 4, 2, 8, true),
            (2, 8, 2, 2, 1, 3, true),
            // One item: its products and rows are split over the threads instead.
            (1, 8, 4, 4, 1, 8, false),
            (1, 8, 4, 6, 1, 4, true),
        ] {
            let what = format!("B{batch} C{c} {h}x{wd} q{query} v{value} pooled {pooled}");
            let rows = 2 * query + value;
            let x = Var::from_tensor(&input(batch, c, h, wd, 1)).unwrap();
            // Scaled up so the maps are far from uniform.
            let w = Var::from_tensor(
                &(input(1, 1, rows, c, 2).reshape((rows, c)).unwrap() * 0.7).unwrap(),
            )
            .unwrap();
            let b = Var::from_tensor(&input(1, 1, 1, rows, 3).flatten_all().unwrap()).unwrap();
            let fused = attention_core(&x, &w, &b, query, pooled).unwrap();
            let want = reference(&x, &w, &b, query, pooled);
            assert_close(&fused, &want, &format!("{what} forward"));
            let r = input(batch, value, h, wd, 4);
            let grads = |y: &Tensor| (y * &r).unwrap().sum_all().unwrap().backward().unwrap();
            let (g_fused, g_ref) = (grads(&fused), grads(&want));
            let vars = [(&x, "x"), (&w, "w"), (&b, "b")];
            testing::assert_grads_close(&g_fused, &g_ref, &vars, 1e-5, &what);
        }
    }

    #[test]
    fn only_tracked_operands_get_gradients() {
        let x = Var::from_tensor(&input(2, 8, 3, 3, 1)).unwrap();
        let w = input(1, 1, 10, 8, 2).reshape((10, 8)).unwrap();
        let b = Tensor::zeros(10, DType::F32, &Device::Cpu).unwrap();
        let y = attention_core(&x, &w, &b, 1, false).unwrap();
        let grads = y.sum_all().unwrap().backward().unwrap();
        assert!(grads.get(&x).is_some());
        assert!(grads.get(&w).is_none() && grads.get(&b).is_none());
    }

    #[test]
    fn bad_shapes_are_errors() {
        let x = input(2, 8, 3, 3, 1);
        let w = Tensor::zeros((10, 8), DType::F32, &Device::Cpu).unwrap();
        let b = Tensor::zeros(10, DType::F32, &Device::Cpu).unwrap();
        assert!(
            attention_core(&x, &w, &b, 5, false).is_err(),
            "no value rows left"
        );
        let w7 = Tensor::zeros((10, 7), DType::F32, &Device::Cpu).unwrap();
        assert!(
            attention_core(&x, &w7, &b, 1, false).is_err(),
            "channel mismatch"
        );
        let empty = Tensor::zeros((2, 8, 0, 3), DType::F32, &Device::Cpu).unwrap();
        assert!(
            attention_core(&empty, &w, &b, 1, false).is_err(),
            "empty map"
        );
        let b9 = Tensor::zeros(9, DType::F32, &Device::Cpu).unwrap();
        assert!(
            attention_core(&x, &w, &b9, 1, false).is_err(),
            "bias length"
        );
        assert!(
            attention_core(&x, &w, &b, 1, true).is_err(),
            "odd size, pooled"
        );
    }
}
