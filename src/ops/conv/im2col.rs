//! im2col and its adjoint col2im: the image patches a convolution reads as the columns of a
//! matrix, and back.

use std::ops::Range;

use rayon::prelude::*;

use super::geometry::ConvGeom;
use crate::ops::cpu::scratch::ScratchBuf;
use crate::ops::cpu::simd::vectorized;

impl ConvGeom {
    /// For each kernel row `ki` (and column `kj`), the output rows (columns) whose image row
    /// `oh * stride + ki - padding` (column) lies inside the image. Computed once per call so that
    /// neither divisions nor bounds checks reach the inner loops.
    pub(super) fn valid_ranges(&self) -> (Vec<Range<usize>>, Vec<Range<usize>>) {
        let ranges = |in_len, out_len| {
            (0..self.k)
                .map(|offset| valid_range(offset, self.padding, self.stride, in_len, out_len))
                .collect()
        };
        (
            ranges(self.img_h, self.out_h),
            ranges(self.img_w, self.out_w),
        )
    }
}

/// Output indices `o` (of `out_len`) whose input index `o * stride + offset - padding` lies in
/// `0..in_len`.
fn valid_range(
    offset: usize,
    padding: usize,
    stride: usize,
    in_len: usize,
    out_len: usize,
) -> Range<usize> {
    let lo = padding.saturating_sub(offset).div_ceil(stride);
    let hi = if in_len + padding > offset {
        (in_len + padding - offset - 1) / stride + 1
    } else {
        0
    };
    let hi = hi.min(out_len);
    lo.min(hi)..hi
}

/// im2col for a batch into `cols` (resized to `[C*k*k, B*Ho*Wo]`): row `(c, ki, kj)`, column
/// `(b, oh, ow)` holds `img[b, c, oh * s + ki - p, ow * s + kj - p]`, zero in the padding.
pub(super) fn im2col(geom: &ConvGeom, img: &[f32], cols: &mut Vec<f32>) {
    cols.resize(geom.col_rows() * geom.col_cols(), 0.0);
    if geom.is_k4_s2_p1() {
        im2col_k4_s2_p1(geom, img, cols);
    } else {
        im2col_gather(geom, img, cols);
    }
}

/// `im2col` for `ConvGeom::is_k4_s2_p1`, one task per (channel, kernel row): per item, the
/// image rows of the kernel row's parity (`K4_S2_TAPS`) are split once into their even and odd
/// columns, and each kernel column's row is one of the two halves, shifted as `K4_S2_TAPS`
/// says (`PlaneShifts`): long contiguous loops over the whole output plane instead of four
/// per output row of 7 to 32 pixels, whose set-up cost more than their copying.
pub(super) fn im2col_k4_s2_p1(geom: &ConvGeom, img: &[f32], cols: &mut [f32]) {
    let (out_w, img_w) = (geom.out_w, geom.img_w);
    let (row_len, out_plane, plane) = (geom.col_cols(), geom.out_plane(), geom.img_h * img_w);
    if row_len == 0 {
        return;
    }
    let shifts = PlaneShifts::new(geom);
    cols.par_chunks_mut(4 * row_len).enumerate().for_each_init(
        ScratchBuf::take,
        |halves, (c_ki, dst)| {
            vectorized(
                #[inline(always)]
                || {
                    let (c, ki) = (c_ki / 4, c_ki % 4);
                    let (parity, row_offset) = K4_S2_TAPS[ki];
                    halves.resize(2 * out_plane, 0.0);
                    let (even, odd) = halves.split_at_mut(out_plane);
                    for b in 0..geom.batch {
                        let src = &img[(b * geom.img_c + c) * plane..][..plane];
                        let rows = src.chunks_exact(img_w).skip(parity).step_by(2);
                        for ((row, even), odd) in rows
                            .zip(even.chunks_exact_mut(out_w))
                            .zip(odd.chunks_exact_mut(out_w))
                        {
                            deinterleave(row, even, odd);
                        }
                        let (d0, rest) = dst.split_at_mut(row_len);
                        let (d1, rest) = rest.split_at_mut(row_len);
                        let (d2, d3) = rest.split_at_mut(row_len);
                        let [d0, d1, d2, d3] =
                            [d0, d1, d2, d3].map(|row| &mut row[b * out_plane..][..out_plane]);
                        // Kernel columns 0-3 as `K4_S2_TAPS` has them, spelt out: with
                        // constant column offsets each call compiles to its own loop, which
                        // offsets looked up from the table in a loop do not.
                        shifts.apply::<false>(d0, odd, row_offset, -1);
                        shifts.apply::<false>(d1, even, row_offset, 0);
                        shifts.apply::<false>(d2, odd, row_offset, 0);
                        shifts.apply::<false>(d3, even, row_offset, 1);
                    }
                },
            )
        },
    );
}

/// For each index `k` of a 4-wide, stride-2, padding-1 kernel: the parity of the image rows
/// (columns) it reads and the output offset `d` at which it reads them: output row `t` reads
/// image row `2 (t + d) + parity` (kernel row 0 reads `2t - 1`, 1 `2t`, 2 `2t + 1`, 3 `2t + 2`).
const K4_S2_TAPS: [(usize, isize); 4] = [(1, -1), (0, 0), (1, 0), (0, 1)];

/// Shifted copies and sums between flattened `out_h x out_w` planes, for the 4x4 / stride-2
/// im2col and col2im: a shift by whole rows is a contiguous range; a shift by a column also
/// masks the pixels whose neighbour in that direction lies outside the row.
struct PlaneShifts {
    out_w: usize,
    /// Whether pixel `p` has a left neighbour in its row.
    has_left: Vec<bool>,
    /// Whether pixel `p` has a right neighbour in its row.
    has_right: Vec<bool>,
}

impl PlaneShifts {
    fn new(geom: &ConvGeom) -> Self {
        let (out_w, out_plane) = (geom.out_w, geom.out_plane());
        Self {
            out_w,
            has_left: (0..out_plane).map(|p| p % out_w > 0).collect(),
            has_right: (0..out_plane).map(|p| p % out_w + 1 < out_w).collect(),
        }
    }

    /// `dst[(t, u)] (+)= src[(t + rows, u + cols)]` (`cols` in -1..=1), `ADD` summing onto
    /// `dst`, else writing it with zeros where the source pixel lies outside the plane.
    #[inline(always)]
    fn apply<const ADD: bool>(&self, dst: &mut [f32], src: &[f32], rows: isize, cols: isize) {
        let mask = match cols {
            0 => None,
            c if c > 0 => Some(&self.has_right[..]),
            _ => Some(&self.has_left[..]),
        };
        let shift = rows * self.out_w as isize + cols;
        let n = dst.len().saturating_sub(shift.unsigned_abs());
        let (to, from) = match shift >= 0 {
            true => (0, shift.unsigned_abs().min(dst.len())),
            false => (dst.len() - n, 0),
        };
        let to = to..to + n;
        if !ADD {
            dst[..to.start].fill(0.0);
            dst[to.end..].fill(0.0);
        }
        let (dst, src) = (&mut dst[to.clone()], &src[from..from + n]);
        match (mask, ADD) {
            (Some(mask), true) => {
                for ((d, &s), &keep) in dst.iter_mut().zip(src).zip(&mask[to]) {
                    *d += if keep { s } else { 0.0 };
                }
            }
            (Some(mask), false) => {
                for ((d, &s), &keep) in dst.iter_mut().zip(src).zip(&mask[to]) {
                    *d = if keep { s } else { 0.0 };
                }
            }
            (None, true) => dst.iter_mut().zip(src).for_each(|(d, &s)| *d += s),
            (None, false) => dst.copy_from_slice(src),
        }
    }
}

/// `even[u] = src[2u]`, `odd[u] = src[2u + 1]`.
#[inline(always)]
fn deinterleave(src: &[f32], even: &mut [f32], odd: &mut [f32]) {
    let n = even.len();
    let (src, odd) = (&src[..2 * n], &mut odd[..n]);
    for u in 0..n {
        even[u] = src[2 * u];
        odd[u] = src[2 * u + 1];
    }
}

/// `im2col` for any geometry: per im2col row, a gather of output-row length per output row.
pub(super) fn im2col_gather(geom: &ConvGeom, img: &[f32], cols: &mut [f32]) {
    let ConvGeom {
        img_h,
        img_w,
        out_h,
        out_w,
        k,
        stride,
        padding,
        ..
    } = *geom;
    let plane = img_h * img_w;
    let row_len = geom.col_cols();
    if row_len == 0 {
        return;
    }
    let (oh_ranges, ow_ranges) = geom.valid_ranges();
    cols.par_chunks_mut(row_len)
        .enumerate()
        .for_each(|(row, dst)| {
            vectorized(
                #[inline(always)]
                || {
                    let (c, ki, kj) = (row / (k * k), row / k % k, row % k);
                    let (oh_range, ow_range) = (oh_ranges[ki].clone(), ow_ranges[kj].clone());
                    if ow_range.len() < out_w || oh_range.len() < out_h {
                        dst.fill(0.0);
                    }
                    if ow_range.is_empty() {
                        return;
                    }
                    let iw0 = ow_range.start * stride + kj - padding;
                    for (b, dst_b) in dst.chunks_exact_mut(out_h * out_w).enumerate() {
                        let src = &img[(b * geom.img_c + c) * plane..][..plane];
                        for oh in oh_range.clone() {
                            let ih = oh * stride + ki - padding;
                            let src_row = &src[ih * img_w..][..img_w];
                            let dst_row = &mut dst_b[oh * out_w..][..out_w];
                            let dst = &mut dst_row[ow_range.clone()];
                            match stride {
                                1 => dst.copy_from_slice(&src_row[iw0..iw0 + dst.len()]),
                                // Indexed with a constant stride the gather vectorises;
                                // through `step_by` it does not.
                                2 => {
                                    let src = &src_row[iw0..iw0 + 2 * dst.len() - 1];
                                    for (t, d) in dst.iter_mut().enumerate() {
                                        *d = src[2 * t];
                                    }
                                }
                                _ => {
                                    let src_iter = src_row[iw0..].iter().step_by(stride);
                                    for (d, s) in dst.iter_mut().zip(src_iter) {
                                        *d = *s;
                                    }
                                }
                            }
                        }
                    }
                },
            )
        });
}

/// col2im for a batch, the adjoint of `im2col`: every entry of `cols` is added onto the pixel
/// of `img` (zeroed by the caller) it would have been read from. Each task owns one `(b, c)`
/// image plane, so the scatter needs no synchronisation.
pub(super) fn col2im(geom: &ConvGeom, cols: &[f32], img: &mut [f32]) {
    if geom.is_k4_s2_p1() {
        col2im_k4_s2_p1(geom, cols, img);
    } else {
        col2im_scatter(geom, cols, img);
    }
}

impl ConvGeom {
    /// The 4x4, stride-2, padding-1 kernel of every SAGAN up- and down-sampling layer, on an
    /// image of twice the output's (even) size.
    pub(super) fn is_k4_s2_p1(&self) -> bool {
        (self.k, self.stride, self.padding) == (4, 2, 1)
            && (self.img_h, self.img_w) == (2 * self.out_h, 2 * self.out_w)
    }
}

/// `col2im` for `ConvGeom::is_k4_s2_p1`, per image plane through its four parity sub-images:
/// the pixels `(2t + py, 2u + px)` take the two kernel rows of parity `py` and the two kernel
/// columns of parity `px` (`K4_S2_TAPS`), so each sub-image is the sum of four of the plane's
/// kernel-tap rows, each shifted back by its taps' offsets (`PlaneShifts`), in long contiguous
/// loops over the whole flattened plane; the sub-images are then interleaved into the image.
/// A gather per image row made loops of output-row length (7 to 32 here) and spent its time
/// setting them up.
pub(super) fn col2im_k4_s2_p1(geom: &ConvGeom, cols: &[f32], img: &mut [f32]) {
    let (out_w, row_len, out_plane) = (geom.out_w, geom.col_cols(), geom.out_plane());
    let plane = geom.img_h * geom.img_w;
    if plane == 0 {
        return;
    }
    let shifts = PlaneShifts::new(geom);
    img.par_chunks_mut(plane)
        .enumerate()
        .for_each_init(ScratchBuf::take, |subs, (bc, dst)| {
            vectorized(
                #[inline(always)]
                || {
                    let (b, c) = (bc / geom.img_c, bc % geom.img_c);
                    subs.resize(4 * out_plane, 0.0);
                    let tap = |ki: usize, kj: usize| {
                        let row = (c * 4 + ki) * 4 + kj;
                        &cols[row * row_len + b * out_plane..][..out_plane]
                    };
                    // Each sub-image's kernel rows and columns (parity 0: 1 and 3, parity 1:
                    // 2 and 0, as `K4_S2_TAPS` has them; the unshifted tap first, a plain
                    // copy), spelt out so that every call's shifts are constants, as they are
                    // not when read from a table in a loop.
                    let (even_even, rest) = subs.split_at_mut(out_plane);
                    let (even_odd, rest) = rest.split_at_mut(out_plane);
                    let (odd_even, odd_odd) = rest.split_at_mut(out_plane);
                    sum_taps(&shifts, even_even, tap, [1, 3], [1, 3]);
                    sum_taps(&shifts, even_odd, tap, [1, 3], [2, 0]);
                    sum_taps(&shifts, odd_even, tap, [2, 0], [1, 3]);
                    sum_taps(&shifts, odd_odd, tap, [2, 0], [2, 0]);
                    let [even_even, even_odd, odd_even, odd_odd] =
                        [0, 1, 2, 3].map(|parity| &subs[parity * out_plane..][..out_plane]);
                    for (t, rows) in dst.chunks_exact_mut(4 * out_w).enumerate() {
                        let (even_row, odd_row) = rows.split_at_mut(2 * out_w);
                        let at = t * out_w..(t + 1) * out_w;
                        interleave(even_row, &even_even[at.clone()], &even_odd[at.clone()]);
                        interleave(odd_row, &odd_even[at.clone()], &odd_odd[at]);
                    }
                },
            )
        });
}

/// One parity sub-image of `col2im_k4_s2_p1`: the sum of the kernel taps `(ki, kj)` for
/// `ki` in `rows` and `kj` in `cols`, each `[near, far]` (the kernel index at output offset
/// 0, then the other), each tap shifted back by its output offsets.
#[inline(always)]
fn sum_taps<'a>(
    shifts: &PlaneShifts,
    sub: &mut [f32],
    tap: impl Fn(usize, usize) -> &'a [f32],
    rows: [usize; 2],
    cols: [usize; 2],
) {
    let back = |k: usize| -K4_S2_TAPS[k].1;
    let ([near_row, far_row], [near_col, far_col]) = (rows, cols);
    let (row_shift, col_shift) = (back(far_row), back(far_col));
    shifts.apply::<false>(sub, tap(near_row, near_col), back(near_row), back(near_col));
    shifts.apply::<true>(sub, tap(far_row, near_col), row_shift, back(near_col));
    shifts.apply::<true>(sub, tap(near_row, far_col), back(near_row), col_shift);
    shifts.apply::<true>(sub, tap(far_row, far_col), row_shift, col_shift);
}

/// `dst[2u] = even[u]`, `dst[2u + 1] = odd[u]`.
#[inline(always)]
fn interleave(dst: &mut [f32], even: &[f32], odd: &[f32]) {
    let n = even.len();
    let (dst, odd) = (&mut dst[..2 * n], &odd[..n]);
    for u in 0..n {
        dst[2 * u] = even[u];
        dst[2 * u + 1] = odd[u];
    }
}

/// `col2im` for any geometry, as a scatter: per image plane, each kernel tap's output rows are
/// added onto the image rows they were read from.
pub(super) fn col2im_scatter(geom: &ConvGeom, cols: &[f32], img: &mut [f32]) {
    let ConvGeom {
        img_c,
        img_h,
        img_w,
        out_w,
        k,
        stride,
        padding,
        ..
    } = *geom;
    let plane = img_h * img_w;
    let (row_len, out_plane) = (geom.col_cols(), geom.out_plane());
    if plane == 0 {
        return;
    }
    let (oh_ranges, ow_ranges) = geom.valid_ranges();
    img.par_chunks_mut(plane).enumerate().for_each(|(bc, dst)| {
        vectorized(
            #[inline(always)]
            || {
                let (b, c) = (bc / img_c, bc % img_c);
                for (ki, oh_range) in oh_ranges.iter().enumerate() {
                    for (kj, ow_range) in ow_ranges.iter().enumerate() {
                        if ow_range.is_empty() {
                            continue;
                        }
                        let row = (c * k + ki) * k + kj;
                        let src = &cols[row * row_len + b * out_plane..][..out_plane];
                        let iw0 = ow_range.start * stride + kj - padding;
                        for oh in oh_range.clone() {
                            let ih = oh * stride + ki - padding;
                            let src_row = &src[oh * out_w..][..out_w];
                            let dst_row = &mut dst[ih * img_w..][..img_w];
                            if stride == 1 {
                                let dst_seg = &mut dst_row[iw0..iw0 + ow_range.len()];
                                for (d, s) in dst_seg.iter_mut().zip(&src_row[ow_range.clone()]) {
                                    *d += *s;
                                }
                            } else {
                                let dst_iter = dst_row[iw0..].iter_mut().step_by(stride);
                                for (d, s) in dst_iter.zip(&src_row[ow_range.clone()]) {
                                    *d += *s;
                                }
                            }
                        }
                    }
                }
            },
        )
    });
}
