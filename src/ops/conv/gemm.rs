//! The convolutions' passes as GEMMs over batch chunks: forward, input gradient and weight
//! gradient, and the fused backward passes, with the chunking and threading they share.

use rayon::prelude::*;

use super::geometry::ConvGeom;
use super::im2col::{col2im, im2col};
use super::winograd;
use crate::ops::channel::Epilogue;
use crate::ops::cpu::matmul::{matmul, matmul_on, MatRef};
use crate::ops::cpu::scratch::ScratchBuf;
use crate::ops::cpu::simd::vectorized;
use crate::ops::cpu::vector_math::lane_sum;

/// Backward of a transposed convolution (`geom` seen as the plain convolution from its output
/// to its input) in one pass over the batch: per chunk, one im2col of the output gradient feeds
/// both the input gradient (`W x im2col(grad)`) and the weight gradient
/// (`x x im2col(grad)^T`), which as separate ops would each build it.
pub(super) fn conv_transpose_backward(
    geom: &ConvGeom,
    [x, w, grad]: [&[f32]; 3],
    wanted: Wanted,
) -> candle_core::Result<ConvGrads> {
    let w_mat = MatRef::row_major(w, geom.out_c, geom.col_rows());
    let mut dx = vec![0f32; if wanted.x { geom.out_len() } else { 0 }];
    let (img_item, out_item) = (geom.img_item(), geom.out_item());
    let runs = for_each_run(geom, &mut dx, out_item, |run, dx, all_threads| {
        let mut filter = wanted.w.then(|| FilterGrad::new(&run.geom));
        let (mut cols, mut buf) = (ScratchBuf::take(), ScratchBuf::take());
        for (chunk, offset) in run.chunks() {
            let item = run.first + offset;
            im2col(
                &chunk,
                &grad[item * img_item..][..chunk.img_len()],
                &mut cols,
            );
            if wanted.x {
                let dx = &mut dx[offset * out_item..][..chunk.out_len()];
                forward_chunk(&chunk, w_mat, &cols, dx, &mut buf, all_threads)?;
            }
            if let Some(filter) = filter.as_mut() {
                let x = channel_major(&chunk, &x[item * out_item..][..chunk.out_len()], &mut buf);
                filter.add(&chunk, offset, &cols, x, all_threads)?;
            }
        }
        Ok(filter)
    })?;
    Ok(ConvGrads {
        dx: wanted.x.then_some(dx),
        dw: wanted
            .w
            .then(|| FilterGrad::sum(geom, runs.into_iter().flatten().collect())),
        dbias: None,
    })
}

/// Target size, in f32s (4 MiB), of one chunk's im2col matrix: small enough to stay in the
/// last-level cache between the im2col / GEMM / col2im steps that touch it, large enough for an
/// efficient GEMM.
const CHUNK_COLS_BUDGET: usize = 1 << 20;

/// Fewest GEMM columns (batch items x output pixels) worth a chunk of their own.
const CHUNK_MIN_COLS: usize = 256;

/// Items per batch chunk: about `CHUNK_COLS_BUDGET` im2col elements, at least
/// `CHUNK_MIN_COLS` columns, and then evened out so that the chunk count is a multiple of the
/// thread count (chunks may run one per thread: see `for_each_chunk`).
pub(super) fn chunk_items(geom: &ConvGeom) -> usize {
    let per_item = geom.col_rows() * geom.out_plane();
    let batch = geom.batch.max(1);
    let items = (CHUNK_COLS_BUDGET / per_item.max(1))
        .max(CHUNK_MIN_COLS.div_ceil(geom.out_plane().max(1)))
        .clamp(1, batch);
    let threads = rayon::current_num_threads().max(1);
    let chunks = batch.div_ceil(items).next_multiple_of(threads).min(batch);
    batch.div_ceil(chunks)
}

/// Whether chunks of `items` run one per thread: with more than one thread and at least as many
/// chunks as threads (see `for_each_chunk`).
fn chunks_per_thread(geom: &ConvGeom, items: usize) -> bool {
    let threads = rayon::current_num_threads();
    threads > 1 && geom.batch.div_ceil(items) >= threads
}

/// Reusable buffers of one chunk's pass: the im2col matrix and a layout buffer.
type ChunkBuffers = (ScratchBuf, ScratchBuf);

fn take_chunk_buffers() -> ChunkBuffers {
    (ScratchBuf::take(), ScratchBuf::take())
}

/// Runs `f(chunk geometry, dst chunk, src chunk, buffers, all_threads)` for every batch chunk,
/// `dst` and `src` split into chunks of `dst_item` and `src_item` elements per batch item.
///
/// With at least as many chunks as threads the chunks run in parallel, each on one thread with
/// single-threaded GEMMs (`all_threads` false): gemm's own threading splits every product and
/// joins after it, and im2col, GEMM and rearrangement would each fork and join per chunk, where
/// whole chunks per thread synchronise once. Fewer chunks run one after another on all threads.
fn for_each_chunk(
    geom: &ConvGeom,
    dst: &mut [f32],
    dst_item: usize,
    src: &[f32],
    src_item: usize,
    f: impl Fn(&ConvGeom, &mut [f32], &[f32], &mut ChunkBuffers, bool) -> candle_core::Result<()> + Sync,
) -> candle_core::Result<()> {
    let items = chunk_items(geom);
    let chunk_geom = |dst: &[f32]| ConvGeom {
        batch: dst.len() / dst_item,
        ..*geom
    };
    if chunks_per_thread(geom, items) {
        dst.par_chunks_mut(items * dst_item)
            .zip(src.par_chunks(items * src_item))
            .try_for_each_init(take_chunk_buffers, |bufs, (dst, src)| {
                f(&chunk_geom(dst), dst, src, bufs, false)
            })
    } else {
        let mut bufs = take_chunk_buffers();
        dst.chunks_mut(items * dst_item)
            .zip(src.chunks(items * src_item))
            .try_for_each(|(dst, src)| f(&chunk_geom(dst), dst, src, &mut bufs, true))
    }
}

/// Plain convolution, image -> output: `out[b] = W [O, C*k*k] x im2col(img[b])`, one GEMM per
/// batch chunk over the chunk's side-by-side im2col matrix. An `epilogue` with its bias is
/// applied to each chunk's output while it is in cache.
pub(super) fn conv_forward(
    geom: &ConvGeom,
    img: &[f32],
    w: &[f32],
    epilogue: Option<(Epilogue, &[f32])>,
) -> candle_core::Result<Vec<f32>> {
    if geom.takes_winograd() {
        return winograd::conv_forward(geom, img, w, epilogue);
    }
    let w_mat = MatRef::row_major(w, geom.out_c, geom.col_rows());
    let mut out = vec![0f32; geom.out_len()];
    let finish = |out: &mut [f32]| {
        if let Some((epilogue, bias)) = epilogue {
            epilogue.apply_in_place(out, bias, geom.out_plane());
        }
    };
    if geom.is_dense() {
        // out [B, O] = img [B, C*k*k] x W^T.
        let img = MatRef::row_major(img, geom.batch, geom.col_rows());
        matmul(&mut out, img, w_mat.t(), false)?;
        finish(&mut out);
        return Ok(out);
    }
    let (out_item, img_item) = (geom.out_item(), geom.img_item());
    for_each_chunk(
        geom,
        &mut out,
        out_item,
        img,
        img_item,
        |chunk, dst, img, (cols, buf), all_threads| {
            im2col(chunk, img, cols);
            forward_chunk(chunk, w_mat, cols, dst, buf, all_threads)?;
            finish(dst);
            Ok(())
        },
    )?;
    Ok(out)
}

/// `out [B, O, Ho*Wo]` of one chunk from its im2col matrix: `W [O, C*k*k] x cols`, which is
/// channel-major (`[O, B*Ho*Wo]`) and rearranged through `buf` unless the chunk is one item.
fn forward_chunk(
    chunk: &ConvGeom,
    w_mat: MatRef,
    cols: &[f32],
    out: &mut [f32],
    buf: &mut Vec<f32>,
    all_threads: bool,
) -> candle_core::Result<()> {
    let cols = MatRef::row_major(cols, chunk.col_rows(), chunk.col_cols());
    if chunk.batch == 1 {
        return matmul_on(out, w_mat, cols, false, all_threads);
    }
    buf.resize(chunk.out_len(), 0.0);
    matmul_on(buf, w_mat, cols, false, all_threads)?;
    swap_outer_dims(buf, out, chunk.out_c, chunk.batch, chunk.out_plane());
    Ok(())
}

/// Adjoint of `conv_forward`, output -> image: per batch chunk, `cols = W^T [C*k*k, O] x grad`,
/// then col2im scatter-adds every column back onto the image pixels it was read from.
pub(super) fn conv_backward_data(
    geom: &ConvGeom,
    grad: &[f32],
    w: &[f32],
) -> candle_core::Result<Vec<f32>> {
    if geom.takes_winograd() {
        return winograd::conv_backward_data(geom, grad, w);
    }
    let w_mat = MatRef::row_major(w, geom.out_c, geom.col_rows());
    let mut img = vec![0f32; geom.img_len()];
    if geom.is_dense() {
        // img [B, C*k*k] = grad [B, O] x W.
        let grad = MatRef::row_major(grad, geom.batch, geom.out_c);
        matmul(&mut img, grad, w_mat, false)?;
        return Ok(img);
    }
    let w_t = transposed_weight(geom, w);
    let w_t = MatRef::row_major(&w_t, geom.col_rows(), geom.out_c);
    let (img_item, out_item) = (geom.img_item(), geom.out_item());
    for_each_chunk(
        geom,
        &mut img,
        img_item,
        grad,
        out_item,
        |chunk, img, grad, (cols, grad_buf), all_threads| {
            let grad = channel_major(chunk, grad, grad_buf);
            cols.resize(chunk.col_rows() * chunk.col_cols(), 0.0);
            let grad = MatRef::row_major(grad, chunk.out_c, chunk.col_cols());
            matmul_on(cols, w_t, grad, false, all_threads)?;
            col2im(chunk, cols, img);
            Ok(())
        },
    )?;
    Ok(img)
}

/// `W^T [C*k*k, O]` copied row-major, for the products from the output side to the image side:
/// gemm runs them faster than over the transposed view of W, and every chunk reuses the copy.
fn transposed_weight(geom: &ConvGeom, w: &[f32]) -> ScratchBuf {
    let mut w_t = ScratchBuf::take();
    w_t.resize(w.len(), 0.0);
    MatRef::row_major(w, geom.out_c, geom.col_rows())
        .t()
        .copy_row_major(&mut w_t);
    w_t
}

/// Weight gradient: `dW [O, C*k*k] = sum over chunks of grad [O, n] x im2col(img)^T [n, C*k*k]`,
/// the batch sum folded into the GEMMs' inner dimension.
pub(super) fn conv_backward_filter(
    geom: &ConvGeom,
    img: &[f32],
    grad: &[f32],
) -> candle_core::Result<Vec<f32>> {
    if geom.is_dense() {
        // dW [O, C*k*k] = grad^T [O, B] x img [B, C*k*k].
        let mut dw = vec![0f32; geom.kernel_len()];
        let grad_t = MatRef::row_major(grad, geom.batch, geom.out_c).t();
        let img = MatRef::row_major(img, geom.batch, geom.col_rows());
        matmul(&mut dw, grad_t, img, false)?;
        return Ok(dw);
    }
    let (img_item, out_item) = (geom.img_item(), geom.out_item());
    let partials = for_each_run(geom, &mut [], 0, |run, _, all_threads| {
        let mut filter = FilterGrad::new(&run.geom);
        let (mut cols, mut grad_buf) = (ScratchBuf::take(), ScratchBuf::take());
        for (chunk, offset) in run.chunks() {
            let item = run.first + offset;
            im2col(
                &chunk,
                &img[item * img_item..][..chunk.img_len()],
                &mut cols,
            );
            let grad = &grad[item * out_item..][..chunk.out_len()];
            let grad = channel_major(&chunk, grad, &mut grad_buf);
            filter.add(&chunk, offset, &cols, grad, all_threads)?;
        }
        Ok(filter)
    })?;
    Ok(FilterGrad::sum(geom, partials))
}

/// Consecutive batch chunks that one thread works through (or the whole batch, on all
/// threads).
struct Run {
    /// The run's geometry: the layer's, with the run's batch.
    geom: ConvGeom,
    /// The run's first batch item in the layer's batch.
    first: usize,
    /// Items per chunk, the layer's (`chunk_items`), so that every run chunks alike.
    items: usize,
}

impl Run {
    /// Each chunk's geometry and first item within the run.
    fn chunks(&self) -> impl Iterator<Item = (ConvGeom, usize)> + '_ {
        (0..self.geom.batch).step_by(self.items).map(move |offset| {
            let chunk = ConvGeom {
                batch: self.items.min(self.geom.batch - offset),
                ..self.geom
            };
            (chunk, offset)
        })
    }
}

/// Runs `f(run, run's part of dst, all_threads)` on consecutive runs of chunks and returns the
/// results in batch order: one run per thread, with single-threaded GEMMs, when chunks run one
/// per thread (see `for_each_chunk`), else the whole batch as one run on all threads. `dst`
/// holds `dst_item` elements per batch item (it may be empty).
fn for_each_run<R: Send>(
    geom: &ConvGeom,
    dst: &mut [f32],
    dst_item: usize,
    f: impl Fn(&Run, &mut [f32], bool) -> candle_core::Result<R> + Sync,
) -> candle_core::Result<Vec<R>> {
    let items = chunk_items(geom);
    if !chunks_per_thread(geom, items) {
        let run = Run {
            geom: *geom,
            first: 0,
            items,
        };
        return Ok(vec![f(&run, dst, true)?]);
    }
    let chunks = geom.batch.div_ceil(items);
    let run_items = chunks.div_ceil(rayon::current_num_threads()) * items;
    let firsts = (0..geom.batch).step_by(run_items);
    let dsts: Vec<&mut [f32]> = match dst.is_empty() {
        true => firsts.clone().map(|_| Default::default()).collect(),
        false => dst.chunks_mut(run_items * dst_item).collect(),
    };
    firsts
        .zip(dsts)
        .collect::<Vec<_>>()
        .into_par_iter()
        .map(|(first, dst)| {
            let geom = ConvGeom {
                batch: run_items.min(geom.batch - first),
                ..*geom
            };
            f(&Run { geom, first, items }, dst, false)
        })
        .collect()
}

/// A weight gradient summed chunk by chunk: `dW [O, C*k*k] += grad [O, n] x im2col(img)^T`.
struct FilterGrad {
    /// The sum, stored transposed (`dW^T [C*k*k, O]`) when `transposed`.
    sum: Vec<f32>,
    /// gemm copies (packs) the operand that is not in its preferred layout: here im2col's
    /// matrix, C*k*k x n elements. Computed transposed, dW^T = im2col(img) x grad^T, it packs
    /// the output gradient, O x n, instead: take the order that packs the smaller one.
    transposed: bool,
}

impl FilterGrad {
    fn new(geom: &ConvGeom) -> Self {
        Self {
            sum: vec![0f32; geom.kernel_len()],
            transposed: geom.col_rows() > geom.out_c,
        }
    }

    /// Adds one chunk's product from its im2col matrix `cols` and its output gradient
    /// channel-major, `grad` [O, n]; a run's first chunk (`offset` 0) writes the sum instead.
    fn add(
        &mut self,
        chunk: &ConvGeom,
        offset: usize,
        cols: &[f32],
        grad: &[f32],
        all_threads: bool,
    ) -> candle_core::Result<()> {
        let (rows, n) = (chunk.col_rows(), chunk.col_cols());
        let cols = MatRef::row_major(cols, rows, n);
        let grad = MatRef::row_major(grad, chunk.out_c, n);
        let accumulate = offset > 0;
        match self.transposed {
            true => matmul_on(&mut self.sum, cols, grad.t(), accumulate, all_threads),
            false => matmul_on(&mut self.sum, grad, cols.t(), accumulate, all_threads),
        }
    }

    /// The runs' sums added in batch order (deterministic for a thread count), as `[O, C*k*k]`.
    fn sum(geom: &ConvGeom, runs: Vec<FilterGrad>) -> Vec<f32> {
        let mut runs = runs.into_iter();
        let Some(first) = runs.next() else {
            return vec![0f32; geom.kernel_len()];
        };
        let transposed = first.transposed;
        let mut sum = first.sum;
        for run in runs {
            sum.iter_mut().zip(run.sum).for_each(|(s, r)| *s += r);
        }
        if !transposed {
            return sum;
        }
        let mut dw = vec![0f32; sum.len()];
        MatRef::row_major(&sum, geom.col_rows(), geom.out_c)
            .t()
            .copy_row_major(&mut dw);
        dw
    }
}

/// Which of a convolution's gradients a backward computes: only what the graph tracks (a
/// network's input and a frozen weight need none, and each skipped one is a whole GEMM).
#[derive(Clone, Copy, Debug)]
pub(super) struct Wanted {
    pub(super) x: bool,
    pub(super) w: bool,
    pub(super) bias: bool,
}

/// A convolution backward's gradients, each `None` unless wanted.
pub(super) struct ConvGrads {
    pub(super) dx: Option<Vec<f32>>,
    pub(super) dw: Option<Vec<f32>>,
    pub(super) dbias: Option<Vec<f32>>,
}

/// Backward of conv2d + bias + activation in one pass over the batch: per chunk, the output
/// gradient goes through the activation's derivative and into channel-major layout in one copy,
/// and that buffer feeds the bias sum, the input gradient (`W^T x dz`, col2im) and the weight
/// gradient (`dz x im2col(x)^T`). As separate ops, the activation's gradient, the bias sum and
/// the two convolution gradients would each pass over a full-size tensor of their own.
pub(super) fn conv_epilogue_backward(
    geom: &ConvGeom,
    epilogue: Epilogue,
    [x, w, y, grad]: [&[f32]; 4],
    wanted: Wanted,
) -> candle_core::Result<ConvGrads> {
    let w_t = wanted.x.then(|| transposed_weight(geom, w));
    let w_t = w_t
        .as_deref()
        .map(|w_t| MatRef::row_major(w_t, geom.col_rows(), geom.out_c));
    let mut dx = vec![0f32; if wanted.x { geom.img_len() } else { 0 }];
    let (img_item, out_item) = (geom.img_item(), geom.out_item());
    let runs = for_each_run(geom, &mut dx, img_item, |run, dx, all_threads| {
        let mut filter = wanted.w.then(|| FilterGrad::new(&run.geom));
        let mut dbias = vec![0f32; geom.out_c];
        let (mut dz, mut cols) = (ScratchBuf::take(), ScratchBuf::take());
        for (chunk, offset) in run.chunks() {
            let item = run.first + offset;
            let start = item * out_item;
            let outputs = start..start + chunk.out_len();
            grad_before_act_channel_major(
                &chunk,
                epilogue,
                &y[outputs.clone()],
                &grad[outputs],
                &mut dz,
                &mut dbias,
            );
            if let Some(w_t) = w_t {
                cols.resize(chunk.col_rows() * chunk.col_cols(), 0.0);
                let dz = MatRef::row_major(&dz, chunk.out_c, chunk.col_cols());
                matmul_on(&mut cols, w_t, dz, false, all_threads)?;
                col2im(
                    &chunk,
                    &cols,
                    &mut dx[offset * img_item..][..chunk.img_len()],
                );
            }
            if let Some(filter) = filter.as_mut() {
                // `cols` is free again: col2im has consumed the input gradient's columns.
                im2col(&chunk, &x[item * img_item..][..chunk.img_len()], &mut cols);
                filter.add(&chunk, offset, &cols, &dz, all_threads)?;
            }
        }
        Ok((filter, dbias))
    })?;
    let mut dbias = vec![0f32; geom.out_c];
    let mut filters = Vec::with_capacity(runs.len());
    for (filter, run_dbias) in runs {
        dbias.iter_mut().zip(run_dbias).for_each(|(d, r)| *d += r);
        filters.extend(filter);
    }
    Ok(ConvGrads {
        dx: wanted.x.then_some(dx),
        dw: wanted.w.then(|| FilterGrad::sum(geom, filters)),
        dbias: wanted.bias.then_some(dbias),
    })
}

/// `dz [O, B*Ho*Wo] = grad * act'(y)` for a chunk's `y` and `grad` `[B, O, Ho*Wo]`, each
/// channel's sum added to `dbias [O]`.
fn grad_before_act_channel_major(
    chunk: &ConvGeom,
    epilogue: Epilogue,
    y: &[f32],
    grad: &[f32],
    dz: &mut Vec<f32>,
    dbias: &mut [f32],
) {
    let plane = chunk.out_plane();
    dz.resize(chunk.out_len(), 0.0);
    dz.par_chunks_mut(chunk.batch * plane)
        .zip(dbias.par_iter_mut())
        .enumerate()
        .for_each(|(o, (row, dbias))| {
            vectorized(
                #[inline(always)]
                || {
                    for (b, dst) in row.chunks_exact_mut(plane).enumerate() {
                        let src = (b * chunk.out_c + o) * plane;
                        epilogue.grad_before_act(&y[src..][..plane], &grad[src..][..plane], dst);
                    }
                    *dbias += lane_sum(row, |_, v| v);
                },
            )
        });
}

/// Output-side data `[B, O, Ho*Wo]` as `[O, B*Ho*Wo]`, the GEMM operand layout; rearranged into
/// `buf` unless the batch is a single item.
fn channel_major<'a>(geom: &ConvGeom, data: &'a [f32], buf: &'a mut Vec<f32>) -> &'a [f32] {
    if geom.batch == 1 {
        return data;
    }
    buf.resize(data.len(), 0.0);
    swap_outer_dims(data, buf, geom.batch, geom.out_c, geom.out_plane());
    buf
}

/// Copies `src [a, b, inner]` to `dst [b, a, inner]`.
fn swap_outer_dims(src: &[f32], dst: &mut [f32], a: usize, b: usize, inner: usize) {
    if inner == 0 || a == 0 {
        return;
    }
    dst.par_chunks_mut(a * inner)
        .enumerate()
        .for_each(|(j, dst_block)| {
            for (i, dst_row) in dst_block.chunks_exact_mut(inner).enumerate() {
                let start = (i * b + j) * inner;
                dst_row.copy_from_slice(&src[start..start + inner]);
            }
        });
}
