//! The core of the SAGAN attention block as one candle custom op on CPU, with its backward:
//! `qkv = W x + b` (the query, key and value 1x1 convolutions as one GEMM), in the pooled form
//! keys and values 2x2 max-pooled, `energy = q^T k`, a softmax over the keys and `o = v A^T`;
//! optionally the block's residual `y = x + gamma * o` too.
//!
//! Composed from candle's ops the block materialises [B, N, M] tensors (energy, map, their
//! transposes and gradients: 256 MiB each for a plain 32x32 layer at batch 64), every one a
//! full pass and a fresh allocation, and candle accumulates each gradient through another. Here
//! the work runs per batch item, items in parallel, and the [N, M] map lives in a per-item
//! buffer. Small maps (`KEEP_BUDGET`) are kept from the forward for the backward; larger ones
//! live in per-thread scratch and the backward recomputes them (and qkv) from the inputs.

use std::sync::{Mutex, PoisonError};

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::cpu::matmul::{matmul_on, MatRef};
use super::cpu::storage::f32_slice;
use super::handoff;
use super::softmax::{softmax_grad_in_place, softmax_in_place};

/// Most bytes of per-item buffers (qkv, pooled keys and values, map) a forward keeps for its
/// backward. A 14x14 map at batch 128 takes 28 MiB; a 32x32 one at batch 64 would take 300 MiB
/// and is recomputed instead (its GEMMs are a small part of that layer's work).
const KEEP_BUDGET: usize = 64 << 20;

/// Batch items whose weight gradients one backward task sums before the tasks' sums are added
/// in order: a fixed grouping, so the result does not depend on scheduling or thread count.
const GROUP_ITEMS: usize = 4;

/// Kept forward buffers a backward (or a graph dropped without one) has finished with, for the
/// next forward to size and overwrite: allocating them afresh zeroes 17-27 MiB per attention
/// layer and step on sagan-mnist28. Holds at most `POOL_BUDGET` bytes.
static KEPT_POOL: Mutex<Vec<Scratch>> = Mutex::new(Vec::new());

/// Most bytes `KEPT_POOL` holds: what one training step's forwards keep.
const POOL_BUDGET: usize = 2 * KEEP_BUDGET;

/// `batch` kept buffers, from the pool where it has them (stale, unsized).
fn take_kept(batch: usize) -> Vec<Scratch> {
    let mut pool = KEPT_POOL.lock().unwrap_or_else(PoisonError::into_inner);
    let start = pool.len().saturating_sub(batch);
    let mut kept: Vec<Scratch> = pool.drain(start..).collect();
    drop(pool);
    kept.resize_with(batch, Scratch::default);
    kept
}

fn return_kept(kept: Vec<Scratch>) {
    let mut pool = KEPT_POOL.lock().unwrap_or_else(PoisonError::into_inner);
    let mut held: usize = pool.iter().map(Scratch::bytes).sum();
    for s in kept {
        held += s.bytes();
        if held > POOL_BUDGET {
            break;
        }
        pool.push(s);
    }
}

/// `o [B, Cv, H, W]` of the attention core for `x [B, C, H, W]`, the stacked 1x1 weights
/// `w [2 * query_channels + Cv, C]` (query rows, then key rows, then value rows) and biases
/// `b [2 * query_channels + Cv]`; `pooled` max-pools keys and values 2x2 (H and W even).
/// With `gamma` (one element; Cv = C) the result is the block's output `x + gamma * o`.
/// Differentiable in every operand. f32 CPU tensors only: see `supports`.
pub fn attention_core(
    x: &Tensor,
    w: &Tensor,
    b: &Tensor,
    gamma: Option<&Tensor>,
    query_channels: usize,
    pooled: bool,
) -> Result<Tensor> {
    attention_core_keeping(x, w, b, gamma, query_channels, pooled, KEEP_BUDGET)
}

/// `attention_core` keeping the forward's buffers for the backward up to `keep_budget` bytes.
fn attention_core_keeping(
    x: &Tensor,
    w: &Tensor,
    b: &Tensor,
    gamma: Option<&Tensor>,
    query_channels: usize,
    pooled: bool,
    keep_budget: usize,
) -> Result<Tensor> {
    let core = Core {
        query_channels,
        pooled,
        residual: gamma.is_some(),
    };
    let geom = core.geom(x.dims(), w.dims())?;
    if b.dims() != [geom.rows] {
        candle_core::bail!(
            "attention core: bias shape {:?}, expected [{}]",
            b.dims(),
            geom.rows
        );
    }
    // The op has three operands: gamma travels after the biases.
    let params = match gamma {
        Some(gamma) if gamma.elem_count() == 1 => Tensor::cat(&[b, &gamma.flatten_all()?], 0)?,
        Some(gamma) => candle_core::bail!("attention core: gamma shape {:?}", gamma.dims()),
        None => b.clone(),
    };
    let tracked = x.track_op() || w.track_op() || params.track_op();
    let op = AttentionCore {
        core,
        keep: tracked && geom.kept_bytes() <= keep_budget,
        kept: Mutex::new(None),
    };
    handoff::apply_op3(
        &x.contiguous()?,
        &w.contiguous()?,
        &params.contiguous()?,
        op,
    )
}

/// Whether the fused kernels can run on `x`.
pub fn supports(x: &Tensor) -> bool {
    super::fused_on(x.device()) && x.dtype() == DType::F32 && x.rank() == 4
}

/// What the op computes, as fixed when it is built.
#[derive(Clone, Copy, Debug)]
struct Core {
    query_channels: usize,
    pooled: bool,
    /// Whether the result is `x + gamma * o` rather than `o`.
    residual: bool,
}

impl Core {
    fn geom(&self, x: &[usize], w: &[usize]) -> Result<Geom> {
        Geom::new(x, w, *self)
    }
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
    residual: bool,
    /// Fewer items than threads (batch 1 at high resolution): each item's products and rows
    /// use all threads, instead of one item per thread.
    split_items: bool,
}

/// Per-item buffers of the forward, which the backward reads.
#[derive(Default)]
struct Scratch {
    qkv: Vec<f32>,
    /// Pooled keys and values [query + value, M] (pooled form only).
    kv: Vec<f32>,
    /// For each pooled key/value element, the position of its maximum (pooled form only).
    argmax: Vec<u32>,
    map: Vec<f32>,
}

impl Scratch {
    /// Asks for kept buffers in cache ahead of the backward's use: kept since the forward,
    /// they come from memory, and a prefetch loop keeps many more lines in flight than the
    /// GEMMs' packing does. (Recomputed ones are in cache already.)
    fn prefetch(&self) {
        prefetch(&self.qkv);
        prefetch(&self.kv);
        prefetch(&self.map);
    }

    /// Sizes every buffer for `g`, keeping stale contents: `Geom::forward_item` overwrites
    /// all of them before reading any.
    fn size_for(&mut self, g: &Geom) {
        self.qkv.resize(g.rows * g.positions, 0.0);
        self.kv.resize(g.kv_len(), 0.0);
        self.argmax.resize(g.kv_len(), 0);
        self.map.resize(g.positions * g.keys, 0.0);
    }

    /// Bytes the buffers hold.
    fn bytes(&self) -> usize {
        4 * (self.qkv.capacity()
            + self.kv.capacity()
            + self.argmax.capacity()
            + self.map.capacity())
    }
}

/// Per-thread buffers of the backward, besides the recomputed forward's.
struct GradBuffers {
    dmap: Vec<f32>,
    /// Gradients of the pooled keys and values (pooled form only).
    dkv: Vec<f32>,
    dq_t: Vec<f32>,
    dqkv: Vec<f32>,
}

impl Geom {
    fn new(x: &[usize], w: &[usize], core: Core) -> Result<Self> {
        let query = core.query_channels;
        let (&[batch, channels, h, wd], &[rows, w_in]) = (x, w) else {
            candle_core::bail!("attention core: x {x:?} must be [B, C, H, W], w {w:?} [rows, C]");
        };
        if w_in != channels || rows <= 2 * query || query == 0 {
            candle_core::bail!(
                "attention core: weight {w:?} does not stack 2 x {query} query/key rows and value rows over {channels} channels"
            );
        }
        if core.residual && rows - 2 * query != channels {
            candle_core::bail!(
                "attention core: the residual needs {channels} value rows, got {}",
                rows - 2 * query
            );
        }
        if h == 0 || wd == 0 {
            candle_core::bail!("attention core: empty feature map {h}x{wd}");
        }
        if core.pooled && (h % 2 != 0 || wd % 2 != 0) {
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
            keys: if core.pooled {
                positions / 4
            } else {
                positions
            },
            pooled: core.pooled,
            residual: core.residual,
            split_items: batch < rayon::current_num_threads(),
        })
    }

    /// Length of the third operand: the biases, then gamma for the residual form.
    fn params_len(&self) -> usize {
        self.rows + usize::from(self.residual)
    }

    /// The biases and the scale of `o` (gamma, or 1 without the residual).
    fn split_params<'a>(&self, params: &'a [f32]) -> (&'a [f32], f32) {
        let (b, gamma) = params.split_at(self.rows);
        (b, gamma.first().copied().unwrap_or(1.0))
    }

    fn kv_len(&self) -> usize {
        if self.pooled {
            (self.query + self.value) * self.keys
        } else {
            0
        }
    }

    /// Bytes of the whole batch's `Scratch` buffers.
    fn kept_bytes(&self) -> usize {
        let per_item = self.rows * self.positions + 2 * self.kv_len() + self.positions * self.keys;
        4 * self.batch * per_item
    }

    /// `dst = a x b` (`+=` when `accumulate`) on the item's share of the threads.
    fn gemm(&self, dst: &mut [f32], a: MatRef, b: MatRef, accumulate: bool) -> Result<()> {
        matmul_on(dst, a, b, accumulate, self.split_items)
    }

    /// `f` on every row of `rows` (rows of `len`), on the item's share of the threads; its
    /// results in row order.
    fn each_row<T: Send>(
        &self,
        rows: &mut [f32],
        len: usize,
        f: impl Fn(usize, &mut [f32]) -> T + Sync,
    ) -> Vec<T> {
        match self.split_items {
            true => rows
                .par_chunks_mut(len)
                .enumerate()
                .map(|(i, r)| f(i, r))
                .collect(),
            false => rows
                .chunks_mut(len)
                .enumerate()
                .map(|(i, r)| f(i, r))
                .collect(),
        }
    }

    fn scratch(&self) -> Scratch {
        let mut s = Scratch::default();
        s.size_for(self);
        s
    }

    fn grad_buffers(&self) -> GradBuffers {
        GradBuffers {
            dmap: vec![0f32; self.positions * self.keys],
            dkv: vec![0f32; self.kv_len()],
            dq_t: vec![0f32; self.positions * self.query],
            dqkv: vec![0f32; self.rows * self.positions],
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
            false,
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
        // The map's buffer, kept from step to step, is out of cache: fetching it in one loop
        // (many lines in flight) is faster than the product's stores missing one by one.
        prefetch(&s.map);
        self.gemm(&mut s.map, q.t(), k, false)?;
        self.each_row(&mut s.map, self.keys, |_, row| softmax_in_place(row));
        Ok(())
    }

    /// One item's result from its forward buffers: `o [Cv, N] = v A^T`, or `x + gamma * o`.
    fn output_item(
        &self,
        s: &Scratch,
        x: &[f32],
        gamma: f32,
        o_t: &mut [f32],
        out: &mut [f32],
    ) -> Result<()> {
        let n = self.positions;
        // o^T [N, Cv] = A [N, M] x v^T, then transposed: see `transpose`.
        let map = MatRef::row_major(&s.map, n, self.keys);
        self.gemm(o_t, map, self.values(s).t(), false)?;
        transpose(o_t, n, self.value, out);
        if self.residual {
            for (y, &x) in out.iter_mut().zip(x) {
                *y = x + gamma * *y;
            }
        }
        Ok(())
    }

    /// One item's backward from its forward buffers `s` and the result's gradient `dy`:
    /// writes `dx` and adds the item's weight, bias and gamma gradients onto `sums` (when
    /// there are any to compute).
    ///
    /// With dO = gamma dy: dv = dO A; dA = dO^T v, dE = A * (dA - rowsum(dA * A));
    /// dq = k dE^T, dk = q dE (pooled keys and values: their gradients go back to where each
    /// maximum came from); dx = w^T dqkv (+ dy for the residual). dgamma = <dy, o> is the sum
    /// of the softmax backward's row sums of dy^T v * A, so o itself is never needed.
    #[allow(clippy::too_many_arguments)]
    fn backward_item(
        &self,
        w: &[f32],
        gamma: f32,
        s: &Scratch,
        x: &[f32],
        dy: &[f32],
        t: &mut GradBuffers,
        dx: &mut [f32],
        sums: Option<&mut [f32]>,
    ) -> Result<()> {
        let (n, m) = (self.positions, self.keys);
        let q_len = self.query * n;
        let dy_mat = MatRef::row_major(dy, self.value, n);
        let a = MatRef::row_major(&s.map, n, m);
        let (dq, dkv_full) = t.dqkv.split_at_mut(q_len);
        // Gradients of the keys and values the map saw: pooled ones in `dkv`.
        let dkv_seen: &mut [f32] = match self.pooled {
            true => &mut t.dkv[..],
            false => &mut *dkv_full,
        };
        let (dk, dv) = dkv_seen.split_at_mut(self.query * m);
        // dv [Cv, M] = gamma dy [Cv, N] x A [N, M]
        self.gemm(dv, dy_mat, a, false)?;
        if gamma != 1.0 {
            dv.iter_mut().for_each(|d| *d *= gamma);
        }
        // dy^T [N, Cv] x v [Cv, M], then dE in place.
        self.gemm(&mut t.dmap, dy_mat.t(), self.values(s), false)?;
        let map = &s.map;
        let row_sums = self.each_row(&mut t.dmap, m, |i, de| {
            softmax_grad_in_place(&map[i * m..(i + 1) * m], de, gamma)
        });
        let de = MatRef::row_major(&t.dmap, n, m);
        let q = MatRef::row_major(&s.qkv[..q_len], self.query, n);
        let k = MatRef::row_major(&self.kv(s)[..self.query * m], self.query, m);
        // dq = k dE^T, as dq^T = dE k^T (see `transpose`).
        self.gemm(&mut t.dq_t, de, k.t(), false)?;
        transpose(&t.dq_t, n, self.query, dq);
        self.gemm(dk, q, de, false)?; // dk = q dE
        if self.pooled {
            dkv_full.fill(0.0);
            let planes = dkv_full.chunks_exact_mut(n);
            let pooled = t.dkv.chunks_exact(m).zip(s.argmax.chunks_exact(m));
            for (plane, (d, arg)) in planes.zip(pooled) {
                for (&d, &p) in d.iter().zip(arg) {
                    plane[p as usize] += d;
                }
            }
        }
        // dx [C, N] = w^T [C, rows] x dqkv [rows, N] (+ dy)
        let w = MatRef::row_major(w, self.rows, self.channels);
        let dqkv = MatRef::row_major(&t.dqkv, self.rows, n);
        if self.residual {
            dx.copy_from_slice(dy);
        }
        self.gemm(dx, w.t(), dqkv, self.residual)?;
        let Some(sums) = sums else {
            return Ok(());
        };
        // dw [rows, C] += dqkv [rows, N] x x^T [N, C]; db += dqkv's row sums.
        let (dw, dparams) = sums.split_at_mut(self.rows * self.channels);
        let x_t = MatRef::row_major(x, self.channels, n).t();
        self.gemm(dw, dqkv, x_t, true)?;
        for (db, row) in dparams.iter_mut().zip(t.dqkv.chunks(n)) {
            *db += row.iter().sum::<f32>();
        }
        if self.residual {
            dparams[self.rows] += row_sums.iter().sum::<f32>();
        }
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

/// The forward op. `keep`: store every item's forward buffers in `kept` for the backward.
struct AttentionCore {
    core: Core,
    keep: bool,
    kept: Mutex<Option<Vec<Scratch>>>,
}

impl Drop for AttentionCore {
    fn drop(&mut self) {
        let kept = self.kept.get_mut().unwrap_or_else(PoisonError::into_inner);
        if let Some(kept) = kept.take() {
            return_kept(kept);
        }
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
        let g = self.core.geom(l1.dims(), l2.dims())?;
        let n = g.positions;
        let x = f32_slice(s1, l1, g.batch * g.channels * n)?;
        let w = f32_slice(s2, l2, g.rows * g.channels)?;
        let (b, gamma) = g.split_params(f32_slice(s3, l3, g.params_len())?);
        let mut out = vec![0f32; g.batch * g.value * n];
        let items = out
            .par_chunks_mut(g.value * n)
            .zip(x.par_chunks(g.channels * n));
        // Item by item, no minimum task length: rayon splits further only when a thread runs
        // out of work, so the `init` buffers are made a few times per call, and one slow
        // thread does not leave the other waiting on a fixed half of the batch.
        let o_t = || vec![0f32; n * g.value];
        if self.keep {
            let mut kept = take_kept(g.batch);
            kept.par_iter_mut().zip(items).try_for_each_init(
                o_t,
                |o_t, (s, (out, x))| -> Result<()> {
                    s.size_for(&g);
                    g.forward_item(w, b, x, s)?;
                    g.output_item(s, x, gamma, o_t, out)
                },
            )?;
            *self.kept.lock().unwrap_or_else(PoisonError::into_inner) = Some(kept);
        } else {
            items.try_for_each_init(
                || (g.scratch(), o_t()),
                |(s, o_t), (out, x)| -> Result<()> {
                    g.forward_item(w, b, x, s)?;
                    g.output_item(s, x, gamma, o_t, out)
                },
            )?;
        }
        Ok((
            CpuStorage::F32(out),
            Shape::from((g.batch, g.value, g.h, g.w)),
        ))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        params: &Tensor,
        _out: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let kept = self
            .kept
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        let op = AttentionCoreGrad {
            core: self.core,
            params: params.to_vec1()?,
            kept,
            // The G step's pass through D, whose parameters are constants there.
            param_grads: w.track_op() || params.track_op(),
        };
        // One buffer holds [dx (B*C*N), dw (rows*C), dparams]: a custom op has one output.
        let packed = x.apply_op3_no_bwd(w, &grad.contiguous()?, &op)?;
        let (nx, nw) = (x.elem_count(), w.elem_count());
        let dx = packed.narrow(0, 0, nx)?.reshape(x.shape())?;
        let dw = packed.narrow(0, nx, nw)?.reshape(w.shape())?;
        let dparams = packed.narrow(0, nx + nw, params.elem_count())?;
        Ok((
            x.track_op().then_some(dx),
            w.track_op().then_some(dw),
            params.track_op().then_some(dparams),
        ))
    }
}

/// Asks for `data` in the first-level cache, line by line, without waiting for it (to be read
/// or overwritten).
fn prefetch(data: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    for line in data.chunks(16) {
        // SAFETY: a prefetch never faults, whatever the address; this one is inside `data`.
        unsafe {
            std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(
                line.as_ptr().cast(),
            )
        };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = data;
}

/// `dst [cols, rows] = src [rows, cols]^T`, both row-major.
///
/// The GEMM kernels stream their left operand down columns and pack (copy) it when it is
/// row-major; for the two products with the [N, M] map on the right transposed (o = v A^T and
/// dq = k dE^T) that would copy the whole map per product. Computing the transposed product
/// instead packs the small operand, and transposing the small result back is cheap.
fn transpose(src: &[f32], rows: usize, cols: usize, dst: &mut [f32]) {
    MatRef::row_major(src, rows, cols).t().copy_row_major(dst);
}

/// Backward of `AttentionCore`: `(x, w, dy)` to `[dx, dw, dparams]` flattened, per item with
/// the forward's buffers as kept or recomputed (`Geom::backward_item`). Items run in groups of
/// `GROUP_ITEMS` in parallel, each group summing its weight gradients; the groups' sums are
/// added in order afterwards, so results do not depend on scheduling.
struct AttentionCoreGrad {
    core: Core,
    params: Vec<f32>,
    kept: Option<Vec<Scratch>>,
    /// Whether dw and dparams are wanted (they stay zero otherwise).
    param_grads: bool,
}

impl Drop for AttentionCoreGrad {
    fn drop(&mut self) {
        if let Some(kept) = self.kept.take() {
            return_kept(kept);
        }
    }
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
        let n = g.positions;
        let x = f32_slice(s1, l1, g.batch * g.channels * n)?;
        let w = f32_slice(s2, l2, g.rows * g.channels)?;
        let dy = f32_slice(s3, l3, g.batch * g.value * n)?;
        if self.params.len() != g.params_len()
            || self.kept.as_ref().is_some_and(|k| k.len() != g.batch)
        {
            candle_core::bail!("attention core grad: operands do not match the forward");
        }
        let (b, gamma) = g.split_params(&self.params);
        let (nx, nw) = (x.len(), w.len());
        let sums_len = nw + g.params_len();
        let groups = g.batch.div_ceil(GROUP_ITEMS);
        let mut group_sums = vec![0f32; groups * sums_len];
        let mut out = vec![0f32; nx + sums_len];
        let (dx_all, total) = out.split_at_mut(nx);
        let (x_item, dy_item) = (g.channels * n, g.value * n);
        group_sums
            .par_chunks_mut(sums_len)
            .zip(dx_all.par_chunks_mut(GROUP_ITEMS * x_item))
            .zip(
                x.par_chunks(GROUP_ITEMS * x_item)
                    .zip(dy.par_chunks(GROUP_ITEMS * dy_item)),
            )
            .enumerate()
            .try_for_each_init(
                || {
                    // Buffers for a recomputed forward, unless the forward's were kept.
                    let recomputed = match self.kept {
                        Some(_) => Scratch::default(),
                        None => g.scratch(),
                    };
                    (recomputed, g.grad_buffers())
                },
                |(recomputed, t), (group, ((sums, dx), (x, dy)))| -> Result<()> {
                    // Written before the first `+=` reads it: fresh zeroed memory that is read
                    // first maps the shared zero page, and the write after it costs a
                    // copy-on-write fault with a TLB shootdown on every CPU.
                    sums.fill(0.0);
                    let items = dx
                        .chunks_mut(x_item)
                        .zip(x.chunks(x_item).zip(dy.chunks(dy_item)));
                    for (i, (dx, (x, dy))) in items.enumerate() {
                        let s = match &self.kept {
                            Some(kept) => {
                                let s = &kept[group * GROUP_ITEMS + i];
                                s.prefetch();
                                s
                            }
                            None => {
                                g.forward_item(w, b, x, recomputed)?;
                                &*recomputed
                            }
                        };
                        let sums = self.param_grads.then_some(&mut *sums);
                        g.backward_item(w, gamma, s, x, dy, t, dx, sums)?;
                    }
                    Ok(())
                },
            )?;
        for sums in group_sums.chunks_exact(sums_len) {
            total.iter_mut().zip(sums).for_each(|(t, s)| *t += s);
        }
        Ok((CpuStorage::F32(out), Shape::from(nx + sums_len)))
    }
}

/// 2x2 max pooling (even H and W). Not candle's `max_pool2d`: its backward (candle 0.11) hands
/// the maximum a quarter of the gradient (it multiplies by the window's share of maxima where
/// it should divide), which would shrink every gradient through the keys and values 4-fold.
pub fn max_pool2(x: &Tensor) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    x.reshape((b, c, h / 2, 2, w / 2, 2))?.max(5)?.max(3)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testing::{self, input, max_abs};
    use candle_core::Device;
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
                true => max_pool2(&t.reshape((batch, len, h, wd)).unwrap())
                    .unwrap()
                    .flatten_from(2)
                    .unwrap(),
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
            // More items than a backward group, the last group partial.
            (6, 16, 5, 4, 2, 16, false),
            (2, 8, 3, 3, 1, 5, false),
            (3, 16, 6, 4, 2, 8, true),
            (2, 8, 2, 2, 1, 3, true),
            // One item: its products and rows are split over the threads instead.
            (1, 8, 4, 4, 1, 8, false),
            (1, 8, 4, 6, 1, 4, true),
        ] {
            let rows = 2 * query + value;
            let x = Var::from_tensor(&input(batch, c, h, wd, 1)).unwrap();
            // Scaled up so the maps are far from uniform.
            let w = Var::from_tensor(
                &(input(1, 1, rows, c, 2).reshape((rows, c)).unwrap() * 0.7).unwrap(),
            )
            .unwrap();
            let b = Var::from_tensor(&input(1, 1, 1, rows, 3).flatten_all().unwrap()).unwrap();
            let r = input(batch, value, h, wd, 4);
            let grads = |y: &Tensor| (y * &r).unwrap().sum_all().unwrap().backward().unwrap();
            // gamma 0 is the block's initial state: o does not reach the output, yet gamma
            // needs its gradient.
            let residuals = match value == c {
                true => vec![None, Some(0.0), Some(0.6)],
                false => vec![None],
            };
            for (gamma, keep_budget) in residuals
                .into_iter()
                .flat_map(|g| [(g, 0), (g, usize::MAX)])
            {
                let what = format!(
                    "B{batch} C{c} {h}x{wd} q{query} v{value} pooled {pooled} gamma {gamma:?} kept {}",
                    keep_budget > 0
                );
                let gamma = gamma.map(|g| Var::new(&[g as f32], &Device::Cpu).unwrap());
                let fused = attention_core_keeping(
                    &x,
                    &w,
                    &b,
                    gamma.as_deref(),
                    query,
                    pooled,
                    keep_budget,
                )
                .unwrap();
                let mut want = reference(&x, &w, &b, query, pooled);
                if let Some(gamma) = &gamma {
                    want = (want.broadcast_mul(gamma).unwrap() + x.as_tensor()).unwrap();
                }
                assert_close(&fused, &want, &format!("{what} forward"));
                let (g_fused, g_ref) = (grads(&fused), grads(&want));
                let mut vars = vec![(&x, "x"), (&w, "w"), (&b, "b")];
                vars.extend(gamma.as_ref().map(|g| (g, "gamma")));
                // 2e-5: the key biases' gradient is 0 in exact arithmetic (they shift every
                // energy row by a constant), so both sides hold rounding noise there, which
                // grows with the batch.
                testing::assert_grads_close(&g_fused, &g_ref, &vars, 2e-5, &what);
            }
        }
    }

    #[test]
    fn only_tracked_operands_get_gradients() {
        let x = Var::from_tensor(&input(2, 8, 3, 3, 1)).unwrap();
        let w = input(1, 1, 10, 8, 2).reshape((10, 8)).unwrap();
        let b = input(1, 1, 1, 10, 3).flatten_all().unwrap();
        let r = input(2, 8, 3, 3, 4);
        let grads = |w: &Tensor, b: &Tensor| {
            let y = attention_core(&x, w, b, None, 1, false).unwrap();
            (y * &r).unwrap().sum_all().unwrap().backward().unwrap()
        };
        // Constant w and b (the G step's pass through D): the backward skips their gradients,
        // and x's gradient is the same as with every operand tracked.
        let constants = grads(&w, &b);
        assert!(constants.get(&w).is_none() && constants.get(&b).is_none());
        let (w_var, b_var) = (Var::from_tensor(&w).unwrap(), Var::from_tensor(&b).unwrap());
        let tracked = grads(&w_var, &b_var);
        assert!(tracked.get(&w_var).is_some() && tracked.get(&b_var).is_some());
        let dx = |g: &candle_core::backprop::GradStore| g.get(&x).unwrap().clone();
        assert_close(&dx(&constants), &dx(&tracked), "dx with constant w and b");
    }

    #[test]
    fn bad_shapes_are_errors() {
        let x = input(2, 8, 3, 3, 1);
        let w = Tensor::zeros((10, 8), DType::F32, &Device::Cpu).unwrap();
        let b = Tensor::zeros(10, DType::F32, &Device::Cpu).unwrap();
        assert!(
            attention_core(&x, &w, &b, None, 5, false).is_err(),
            "no value rows left"
        );
        let w7 = Tensor::zeros((10, 7), DType::F32, &Device::Cpu).unwrap();
        assert!(
            attention_core(&x, &w7, &b, None, 1, false).is_err(),
            "channel mismatch"
        );
        let empty = Tensor::zeros((2, 8, 0, 3), DType::F32, &Device::Cpu).unwrap();
        assert!(
            attention_core(&empty, &w, &b, None, 1, false).is_err(),
            "empty map"
        );
        let b9 = Tensor::zeros(9, DType::F32, &Device::Cpu).unwrap();
        assert!(
            attention_core(&x, &w, &b9, None, 1, false).is_err(),
            "bias length"
        );
        assert!(
            attention_core(&x, &w, &b, None, 1, true).is_err(),
            "odd size, pooled"
        );
    }

    #[test]
    fn max_pool_sends_the_whole_gradient_to_each_maximum() {
        let x = Var::from_tensor(&input(2, 3, 4, 6, 9)).unwrap();
        let pooled = max_pool2(&x).unwrap();
        let reference = x.max_pool2d(2).unwrap();
        assert_eq!(max_abs(&(&pooled - &reference).unwrap()), 0.0);
        let grads = pooled.sum_all().unwrap().backward().unwrap();
        let grad = grads
            .get(&x)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        // One 1 per 2x2 window (inputs are distinct), at its maximum; zeros elsewhere.
        assert_eq!(grad.iter().filter(|&&g| g == 1.0).count(), 2 * 3 * 2 * 3);
        assert!(grad.iter().all(|&g| g == 0.0 || g == 1.0));
        let upsampled_max = reference.upsample_nearest2d(4, 6).unwrap();
        let at_max = x
            .eq(&upsampled_max)
            .unwrap()
            .to_dtype(candle_core::DType::F32)
            .unwrap();
        let at_max = at_max.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(grad, at_max);
    }
}
