//! Winograd F(4x4, 2x2) for the 4x4 / stride-2 / padding-1 convolutions (`ConvGeom::is_k4_s2_p1`)
//! that do most of a SAGAN's arithmetic, with about half the multiply-adds of im2col + GEMM.
//!
//! Such a convolution is a 2x2, stride-1 correlation in disguise. Split the image into its four
//! parity sub-images (`(2t + py, 2u + px)` for `py, px` in {0, 1}): kernel rows 1 and 3 read
//! the even rows at sub-rows `t` and `t + 1`, rows 0 and 2 the odd rows at `t - 1` and `t`. Pad
//! each sub-image by one row and column (before it for odd parities, after it for even ones) and
//! the convolution is a valid 2x2 correlation of the 4 x C padded sub-images, each with its own
//! 2x2 slice of the kernel (`KERNEL_INDEX`). The transposed convolution is its adjoint: a full
//! 2x2 correlation of the output side, padded by one, with the flipped slices, whose result's
//! four parity planes interleave into the image.
//!
//! Winograd's algorithm computes a 4x4 tile of a 2x2 correlation from a 5x5 input tile with 25
//! multiplications instead of 64: `Y = A^T [(G k G^T) . (B^T d B)] A` (Lavin and Gray, 2016).
//! Across channels the 25 elementwise products become 25 GEMMs, `M_p [out, tiles] = U_p [out,
//! in] x V_p [in, tiles]`: transformed kernels `U`, transformed input tiles `V`, and the output
//! transform `A^T M A` per tile. The transforms here use the interpolation points 0, 1, -1, 2
//! and infinity. Their rounding error is several times im2col's, as with any Winograd
//! convolution: ~2e-6 of the output's scale on the test shapes against ~4e-7 for a direct sum.
//!
//! On a 7x7 side (sagan-mnist28) the tiles cover 8x8, and the products take 25 x 4 / 49 of the
//! 16 multiply-adds per output-side pixel and channel pair: 0.51 of im2col's.

use rayon::prelude::*;

use super::geometry::ConvGeom;
use crate::ops::channel::Epilogue;
use crate::ops::cpu::matmul::{matmul_serial, MatRef};
use crate::ops::cpu::scratch::ScratchBuf;
use crate::ops::cpu::simd::vectorized;

/// Output tile side.
const TILE: usize = 4;
/// Input tile side, and the points per axis: `TILE + 2 - 1`.
const SPAN: usize = 5;
/// Transform points per tile, one GEMM each.
const POINTS: usize = SPAN * SPAN;
/// Tiles (or kernel elements) transformed side by side, one per vector lane.
const LANES: usize = 16;

type Lanes = [f32; LANES];

/// The 4x4 kernel's rows (and columns) that parity `py`'s 2x2 slice takes, by slice row `a`:
/// image row `2t + ki - 1` is sub-row `t + a - py` of parity `py`.
const KERNEL_INDEX: [[usize; 2]; 2] = [[1, 3], [0, 2]];

/// Fewest tiles (GEMM columns) for which the transforms pay off against im2col's single GEMM.
const MIN_TILES: usize = 32;

/// Most multiply-adds, as a share of im2col's, for which Winograd pays for its transforms: the
/// tiles' padding decides it. Sides of 4, 8 and 16 take 0.39 of the multiply-adds, 7 and 14
/// 0.51, but 5 or 6 take 1.0 and 0.69.
const MAX_WORK: f64 = 0.55;

/// Largest transformed-tile buffer of one batch chunk, in f32s (4 MiB): the chunk's
/// transformed tiles and products then stay in the last-level cache beside the transformed
/// kernels between the passes.
const CHUNK_BUDGET: usize = 1 << 20;

impl ConvGeom {
    /// Whether the convolution goes through Winograd: the SAGAN sampling kernel between layers
    /// wide enough for the transforms' cost to be small beside the GEMMs (not the RGB or
    /// greyscale end of a network), on enough tiles for efficient GEMMs and with little padding
    /// in them (`MAX_WORK`).
    pub(super) fn takes_winograd(&self) -> bool {
        if !(enabled() && self.is_k4_s2_p1() && self.img_c >= 16 && self.out_c >= 16) {
            return false;
        }
        // Both directions tile the output side's pixels (see `Plan::all`).
        let (tiles_h, tiles_w) = tile_grid(self.out_h, self.out_w);
        let tiles = tiles_h * tiles_w;
        // Per pair of channels and item: 25 points per tile and parity against 16 taps per
        // output-side pixel.
        let work = (POINTS * tiles * 4) as f64 / (16 * self.out_plane()) as f64;
        self.batch * tiles >= MIN_TILES && work <= MAX_WORK
    }
}

/// The tiles covering an `h x w` correlation result.
fn tile_grid(h: usize, w: usize) -> (usize, usize) {
    (h.div_ceil(TILE), w.div_ceil(TILE))
}

/// Whether Winograd is on: `SAGAN_WINOGRAD=0` turns it off, to rule it out when chasing a
/// problem and to compare the two algorithms in one build.
fn enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("SAGAN_WINOGRAD").map_or(true, |v| v != "0"))
}

/// `conv_forward` (image -> output) where `ConvGeom::takes_winograd`, with the epilogue
/// applied.
pub(super) fn conv_forward(
    geom: &ConvGeom,
    img: &[f32],
    w: &[f32],
    epilogue: Option<(Epilogue, &[f32])>,
) -> candle_core::Result<Vec<f32>> {
    let u = transformed_kernels(geom, w, Direction::Forward);
    let mut out = vec![0f32; geom.out_len()];
    for plan in Plan::all(geom, Direction::Forward) {
        plan.run(img, &u, &mut out)?;
    }
    if let Some((epilogue, bias)) = epilogue {
        epilogue.apply_in_place(&mut out, bias, geom.out_plane());
    }
    Ok(out)
}

/// `conv_backward_data` (output -> image, the transposed convolution) where
/// `ConvGeom::takes_winograd`.
pub(super) fn conv_backward_data(
    geom: &ConvGeom,
    grad: &[f32],
    w: &[f32],
) -> candle_core::Result<Vec<f32>> {
    let u = transformed_kernels(geom, w, Direction::Backward);
    let mut img = vec![0f32; geom.img_len()];
    // Each plan writes its own parities' pixels.
    for plan in Plan::all(geom, Direction::Backward) {
        plan.run(grad, &u, &mut img)?;
    }
    Ok(img)
}

/// Which way a convolution's linear map runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Direction {
    /// Image -> output: the valid correlation of the padded parity sub-images.
    Forward,
    /// Output -> image: the full correlation of the output side.
    Backward,
}

/// Where a correlation plane's `h x w` valid pixels lie: pixel `(t, u)` sits at row
/// `t + offset.0`, column `u + offset.1` of the zero-padded correlation plane and at
/// `base + t * row_step + u * col_step` of its tensor plane.
#[derive(Clone, Copy, Debug)]
struct PlaneMap {
    offset: (usize, usize),
    base: usize,
    row_step: usize,
    col_step: usize,
}

impl PlaneMap {
    /// The parity `(py, px)` sub-image of an image plane, padded by `offset` before it.
    fn parity(geom: &ConvGeom, (py, px): (usize, usize), offset: (usize, usize)) -> Self {
        Self {
            offset,
            base: py * geom.img_w + px,
            row_step: 2 * geom.img_w,
            col_step: 2,
        }
    }

    /// An output-side plane, padded by `offset` before it.
    fn output(geom: &ConvGeom, offset: (usize, usize)) -> Self {
        Self {
            offset,
            base: 0,
            row_step: geom.out_w,
            col_step: 1,
        }
    }

    /// `plane`'s index of the correlation plane's `(r, c)`, if that is a valid pixel.
    #[inline(always)]
    fn index(&self, (h, w): (usize, usize), r: usize, c: usize) -> Option<usize> {
        let t = r.checked_sub(self.offset.0).filter(|&t| t < h)?;
        let u = c.checked_sub(self.offset.1).filter(|&u| u < w)?;
        Some(self.base + t * self.row_step + u * self.col_step)
    }
}

/// One side of the correlation: `groups` tensor planes per batch item (channels), each read or
/// written as one correlation channel per map (the four parities of an image channel, or the
/// one output-side plane). Correlation channel `(sub, group)` is GEMM row `sub * groups + group`.
#[derive(Clone, Debug)]
struct Side {
    groups: usize,
    plane: usize,
    maps: Vec<PlaneMap>,
}

impl Side {
    /// The image's parity sub-images `parities`, each padded by `offset(parity)`.
    fn image(
        geom: &ConvGeom,
        parities: impl Iterator<Item = (usize, usize)>,
        offset: impl Fn((usize, usize)) -> (usize, usize),
    ) -> Self {
        Self {
            groups: geom.img_c,
            plane: geom.img_h * geom.img_w,
            maps: parities
                .map(|parity| PlaneMap::parity(geom, parity, offset(parity)))
                .collect(),
        }
    }

    fn output(geom: &ConvGeom, offset: (usize, usize)) -> Self {
        Self {
            groups: geom.out_c,
            plane: geom.out_plane(),
            maps: vec![PlaneMap::output(geom, offset)],
        }
    }

    /// GEMM rows: correlation channels.
    fn rows(&self) -> usize {
        self.groups * self.maps.len()
    }
}

/// A batch's correlation, tiled: which side is read, which written, and the tile grid.
#[derive(Clone, Debug)]
struct Plan {
    batch: usize,
    /// The valid pixels of every correlation plane (the output side's size).
    valid: (usize, usize),
    tiles_h: usize,
    tiles_w: usize,
    input: Side,
    output: Side,
    direction: Direction,
    /// The one image parity a backward plan computes, when the four are computed apart
    /// (`Plan::all`).
    parity: Option<usize>,
    /// Elements of one point's transformed kernels: `O x 4C`.
    point_len: usize,
    /// Batch items per chunk: as many as `CHUNK_BUDGET` allows.
    chunk_items: usize,
}

impl Plan {
    /// The plans that compute the convolution in `direction`. The backward's full correlation
    /// is one pixel larger than the output side: where that takes more tiles, each image parity
    /// is its own correlation instead, over exactly the output side's pixels (rows `t + py` of
    /// the full result are rows `t` of the output side padded by `1 - py`), at the cost of four
    /// input transforms.
    fn all(geom: &ConvGeom, direction: Direction) -> Vec<Self> {
        let parities = || (0..4).map(|sub| (sub / 2, sub % 2));
        let (h, w) = (geom.out_h, geom.out_w);
        let whole_fits = tile_grid(h + 1, w + 1) == tile_grid(h, w);
        match direction {
            Direction::Forward => vec![Self::new(
                geom,
                direction,
                Side::image(geom, parities(), |parity| parity),
                Side::output(geom, (0, 0)),
                None,
            )],
            Direction::Backward if whole_fits => vec![Self::new(
                geom,
                direction,
                Side::output(geom, (1, 1)),
                Side::image(geom, parities(), |parity| parity),
                None,
            )],
            Direction::Backward => parities()
                .enumerate()
                .map(|(sub, (py, px))| {
                    Self::new(
                        geom,
                        direction,
                        Side::output(geom, (1 - py, 1 - px)),
                        Side::image(geom, std::iter::once((py, px)), |_| (0, 0)),
                        Some(sub),
                    )
                })
                .collect(),
        }
    }

    fn new(
        geom: &ConvGeom,
        direction: Direction,
        input: Side,
        output: Side,
        parity: Option<usize>,
    ) -> Self {
        // The whole backward correlation is one pixel larger than the output side.
        let grow = (direction == Direction::Backward && parity.is_none()) as usize;
        let (tiles_h, tiles_w) = tile_grid(geom.out_h + grow, geom.out_w + grow);
        let per_item = POINTS * tiles_h * tiles_w * input.rows().max(output.rows());
        // Evened out: 64 items in four chunks of 16 rather than 3 x 20 and a 4.
        let batch = geom.batch.max(1);
        let items = (CHUNK_BUDGET / per_item.max(1)).clamp(1, batch);
        Self {
            batch: geom.batch,
            valid: (geom.out_h, geom.out_w),
            tiles_h,
            tiles_w,
            input,
            output,
            direction,
            parity,
            point_len: 4 * geom.img_c * geom.out_c,
            chunk_items: batch.div_ceil(batch.div_ceil(items)),
        }
    }

    fn tiles(&self) -> usize {
        self.tiles_h * self.tiles_w
    }

    /// The whole correlation, `src` to `dst` (both `[batch, groups, plane]`), with the
    /// transformed kernels `u [POINTS, O, 4C]` (`transformed_kernels`), `chunk_items` at a time.
    fn run(&self, src: &[f32], u: &[f32], dst: &mut [f32]) -> candle_core::Result<()> {
        let u = &u[..POINTS * self.point_len];
        let items = self.chunk_items;
        let (src_item, dst_item) = (
            self.input.groups * self.input.plane,
            self.output.groups * self.output.plane,
        );
        let (mut v, mut m) = (ScratchBuf::take(), ScratchBuf::take());
        for (src, dst) in src
            .chunks(items * src_item)
            .zip(dst.chunks_mut(items * dst_item))
        {
            let chunk = Self {
                batch: dst.len() / dst_item,
                ..self.clone()
            };
            let n = chunk.batch * chunk.tiles();
            let v = v.grown_to(POINTS * chunk.input.rows() * n);
            let m = m.grown_to(POINTS * chunk.output.rows() * n);
            chunk.transform_input(src, v);
            chunk.multiply(u, v, m)?;
            chunk.transform_output(m, dst);
        }
        Ok(())
    }

    /// `V [POINTS, input rows, tiles] = B^T d B` of every input tile `d`, one task per input
    /// group.
    fn transform_input(&self, src: &[f32], v: &mut [f32]) {
        let (side, n, tiles) = (&self.input, self.batch * self.tiles(), self.tiles());
        let subs = side.maps.len();
        let sources: Vec<Vec<usize>> = side
            .maps
            .iter()
            .map(|map| self.plane_indices(map, SPAN))
            .collect();
        let rows = per_group(v, side.groups, n);
        rows.into_par_iter()
            .enumerate()
            .for_each(|(group, mut rows)| {
                let plane =
                    |item: usize| &src[(item * side.groups + group) * side.plane..][..side.plane];
                vectorized(
                    #[inline(always)]
                    || {
                        for start in (0..n).step_by(LANES) {
                            let lanes = LANES.min(n - start);
                            for (sub, sources) in sources.iter().enumerate() {
                                let mut d = [[0f32; LANES]; POINTS];
                                let (mut item, mut tile) = (start / tiles, start % tiles);
                                for lane in 0..lanes {
                                    let plane = plane(item);
                                    let sources = &sources[tile * POINTS..][..POINTS];
                                    for (d, &at) in d.iter_mut().zip(sources) {
                                        d[lane] = plane.get(at).copied().unwrap_or(0.0);
                                    }
                                    tile += 1;
                                    if tile == tiles {
                                        (item, tile) = (item + 1, 0);
                                    }
                                }
                                two_d(&mut d, SPAN, SPAN, Transform::Input);
                                for (p, d) in d.iter().enumerate() {
                                    copy_lanes(&mut rows[p * subs + sub][start..], d, lanes);
                                }
                            }
                        }
                    },
                );
            });
    }

    /// For every tile of an item, the plane index of each of its `span x span` correlation
    /// pixels under `map` (tile by tile, row-major), `usize::MAX` (outside any plane) where the
    /// pixel is padding.
    fn plane_indices(&self, map: &PlaneMap, span: usize) -> Vec<usize> {
        let mut indices = Vec::with_capacity(self.tiles() * span * span);
        for ty in 0..self.tiles_h {
            for tx in 0..self.tiles_w {
                for i in 0..span {
                    for j in 0..span {
                        let (r, c) = (TILE * ty + i, TILE * tx + j);
                        indices.push(map.index(self.valid, r, c).unwrap_or(usize::MAX));
                    }
                }
            }
        }
        indices
    }

    /// `M_p = U_p V_p` for every point `p` (`U_p^T` for the backward), each product split in two
    /// row halves so that two threads share the 25 products evenly.
    fn multiply(&self, u: &[f32], v: &[f32], m: &mut [f32]) -> candle_core::Result<()> {
        let (rows, cols, n) = (
            self.output.rows(),
            self.input.rows(),
            self.batch * self.tiles(),
        );
        let half = rows.div_ceil(2).max(1);
        let first_row = self.parity.map_or(0, |sub| sub * rows);
        let mut tasks = Vec::with_capacity(2 * POINTS);
        for ((m, u), v) in m
            .chunks_exact_mut(rows * n)
            .zip(u.chunks_exact(self.point_len))
            .zip(v.chunks_exact(cols * n))
        {
            let u = match self.direction {
                Direction::Forward => MatRef::row_major(u, rows, cols),
                Direction::Backward => MatRef::row_major(u, cols, self.point_len / cols).t(),
            };
            for (start, m) in (first_row..).step_by(half).zip(m.chunks_mut(half * n)) {
                let u = u.rows(start..start + m.len() / n);
                tasks.push((m, u, v));
            }
        }
        tasks
            .into_par_iter()
            .try_for_each(|(m, u, v)| matmul_serial(m, u, MatRef::row_major(v, cols, n), false))
    }

    /// `A^T M A` of every tile into `dst`'s valid pixels, one task per output group.
    #[allow(clippy::needless_range_loop)] // one lane index into several lane arrays
    fn transform_output(&self, m: &[f32], dst: &mut [f32]) {
        let (side, n, tiles) = (&self.output, self.batch * self.tiles(), self.tiles());
        let subs = side.maps.len();
        let targets: Vec<Vec<usize>> = side
            .maps
            .iter()
            .map(|map| self.plane_indices(map, TILE))
            .collect();
        let planes = per_group(dst, side.groups, side.plane);
        planes
            .into_par_iter()
            .enumerate()
            .for_each(|(group, mut planes)| {
                let row =
                    |p: usize, sub: usize| &m[((p * subs + sub) * side.groups + group) * n..][..n];
                vectorized(
                    #[inline(always)]
                    || {
                        for start in (0..n).step_by(LANES) {
                            let lanes = LANES.min(n - start);
                            for (sub, targets) in targets.iter().enumerate() {
                                let mut y = [[0f32; LANES]; POINTS];
                                for (p, y) in y.iter_mut().enumerate() {
                                    copy_lanes(y, &row(p, sub)[start..], lanes);
                                }
                                two_d(&mut y, SPAN, TILE, Transform::Output);
                                let (mut item, mut tile) = (start / tiles, start % tiles);
                                for lane in 0..lanes {
                                    let plane = &mut planes[item];
                                    let targets = &targets[tile * TILE * TILE..][..TILE * TILE];
                                    for (k, &at) in targets.iter().enumerate() {
                                        // Padding outputs (`usize::MAX`) are no pixel.
                                        if let Some(pixel) = plane.get_mut(at) {
                                            *pixel = y[k / TILE * SPAN + k % TILE][lane];
                                        }
                                    }
                                    tile += 1;
                                    if tile == tiles {
                                        (item, tile) = (item + 1, 0);
                                    }
                                }
                            }
                        }
                    },
                );
            });
    }
}

/// `data` seen as `[outer, groups, len]`: each group's `outer` slices of `len`, in order.
fn per_group(data: &mut [f32], groups: usize, len: usize) -> Vec<Vec<&mut [f32]>> {
    let outer = data.len() / (groups * len).max(1);
    let mut by_group: Vec<Vec<&mut [f32]>> =
        (0..groups).map(|_| Vec::with_capacity(outer)).collect();
    for (i, slice) in data.chunks_exact_mut(len).enumerate() {
        by_group[i % groups].push(slice);
    }
    by_group
}

/// The transformed kernels, `U [POINTS, O, 4 * C]` from `w [O, C, 4, 4]`: column
/// `sub * C + c` is image channel `c`'s parity `sub`, its 2x2 slice flipped for the backward's
/// full correlation. The backward multiplies by each `U_p` transposed, a column-major operand
/// that gemm reads without packing.
fn transformed_kernels(geom: &ConvGeom, w: &[f32], direction: Direction) -> ScratchBuf {
    let (o, c) = (geom.out_c, geom.img_c);
    let mut u = ScratchBuf::take();
    per_group(u.grown_to(POINTS * o * 4 * c), o, 4 * c)
        .into_par_iter()
        .enumerate()
        .for_each_init(ScratchBuf::take, |taps, (out_c, mut rows)| {
            // This output channel's kernel tap-major, [16, C], so that each tap is one vector.
            let taps = taps.grown_to(16 * c);
            for (ch, kernel) in w[out_c * c * 16..][..c * 16].chunks_exact(16).enumerate() {
                for (tap, &x) in kernel.iter().enumerate() {
                    taps[tap * c + ch] = x;
                }
            }
            let slice_index = |a: usize| match direction {
                Direction::Forward => a,
                Direction::Backward => 1 - a,
            };
            for sub in 0..4 {
                let tap = |a: usize, b: usize| {
                    let row = KERNEL_INDEX[sub / 2][slice_index(a)];
                    let index = row * 4 + KERNEL_INDEX[sub % 2][slice_index(b)];
                    &taps[index * c..][..c]
                };
                let mut dst: Vec<&mut [f32]> = rows
                    .iter_mut()
                    .map(|row| &mut row[sub * c..][..c])
                    .collect();
                transform_kernels([tap(0, 0), tap(0, 1), tap(1, 0), tap(1, 1)], &mut dst);
            }
        });
    u
}

/// `G k G^T` of the 2x2 kernels `k [a][b] = taps[2a + b]`, elementwise along the taps' length,
/// into `dst[p]` for every point `p`.
fn transform_kernels(taps: [&[f32]; 4], dst: &mut [&mut [f32]]) {
    let len = taps[0].len();
    vectorized(
        #[inline(always)]
        || {
            for start in (0..len).step_by(LANES) {
                let lanes = LANES.min(len - start);
                let mut k = [[0f32; LANES]; POINTS];
                for (at, tap) in [0, 1, SPAN, SPAN + 1].into_iter().zip(taps) {
                    copy_lanes(&mut k[at], &tap[start..], lanes);
                }
                two_d(&mut k, 2, SPAN, Transform::Kernel);
                for (dst, k) in dst.iter_mut().zip(&k) {
                    copy_lanes(&mut dst[start..], k, lanes);
                }
            }
        },
    );
}

/// `B^T d` along one axis of the 5x5 tile `x`, in place: `d` at the indices `at`. The
/// interpolation points are 0, 1, -1, 2 and infinity.
#[allow(clippy::needless_range_loop)] // one lane index into several lane arrays
#[inline(always)]
fn input_1d(x: &mut [Lanes; POINTS], at: [usize; SPAN]) {
    for l in 0..LANES {
        let [d0, d1, d2, d3, d4] = lane_at(x, at, l);
        x[at[0]][l] = 2.0 * d0 - d1 - 2.0 * d2 + d3;
        x[at[1]][l] = d3 - 2.0 * d1 - d2;
        x[at[2]][l] = 2.0 * d1 - 3.0 * d2 + d3;
        x[at[3]][l] = d3 - d1;
        x[at[4]][l] = 2.0 * d1 - d2 - 2.0 * d3 + d4;
    }
}

/// Lane `l` of the tile's elements at the indices `at`.
#[inline(always)]
fn lane_at(x: &[Lanes; POINTS], at: [usize; SPAN], l: usize) -> [f32; SPAN] {
    [
        x[at[0]][l],
        x[at[1]][l],
        x[at[2]][l],
        x[at[3]][l],
        x[at[4]][l],
    ]
}

/// `G k` along one axis, in place: `k` at the first two of the indices `at`.
#[allow(clippy::needless_range_loop)] // one lane index into several lane arrays
#[inline(always)]
fn kernel_1d(x: &mut [Lanes; POINTS], at: [usize; SPAN]) {
    for l in 0..LANES {
        let [k0, k1] = [x[at[0]][l], x[at[1]][l]];
        x[at[0]][l] = 0.5 * k0;
        x[at[1]][l] = -0.5 * (k0 + k1);
        x[at[2]][l] = (k1 - k0) / 6.0;
        x[at[3]][l] = (k0 + 2.0 * k1) / 6.0;
        x[at[4]][l] = k1;
    }
}

/// `A^T m` along one axis, in place: the result at the first four of the indices `at`.
#[allow(clippy::needless_range_loop)] // one lane index into several lane arrays
#[inline(always)]
fn output_1d(x: &mut [Lanes; POINTS], at: [usize; SPAN]) {
    for l in 0..LANES {
        let [m0, m1, m2, m3, m4] = lane_at(x, at, l);
        x[at[0]][l] = m0 + m1 + m2 + m3;
        x[at[1]][l] = m1 - m2 + 2.0 * m3;
        x[at[2]][l] = m1 + m2 + 4.0 * m3;
        x[at[3]][l] = m1 - m2 + 8.0 * m3 + m4;
    }
}

/// The one-axis transforms.
#[derive(Clone, Copy)]
enum Transform {
    Input,
    Kernel,
    Output,
}

/// `transform` along both axes of the row-major 5x5 tile `x`, in place, `T X T^T`: first down
/// the columns (`columns` of them), then along rows (`rows` of them). (A match rather than a
/// function argument: a function passed as a closure is called through a shim that is not
/// inlined into the caller's vector instructions.)
#[inline(always)]
fn two_d(x: &mut [Lanes; POINTS], columns: usize, rows: usize, transform: Transform) {
    let one_d = |x: &mut [Lanes; POINTS], at: [usize; SPAN]| match transform {
        Transform::Input => input_1d(x, at),
        Transform::Kernel => kernel_1d(x, at),
        Transform::Output => output_1d(x, at),
    };
    for j in 0..columns {
        one_d(x, [j, SPAN + j, 2 * SPAN + j, 3 * SPAN + j, 4 * SPAN + j]);
    }
    for i in 0..rows {
        let row = i * SPAN;
        one_d(x, [row, row + 1, row + 2, row + 3, row + 4]);
    }
}

/// Copies `lanes` floats, as one fixed-size copy when they are all `LANES` (a slice copy of a
/// runtime length is a call to memcpy).
#[inline(always)]
fn copy_lanes(dst: &mut [f32], src: &[f32], lanes: usize) {
    match (
        <&mut Lanes>::try_from(&mut dst[..lanes]),
        <&Lanes>::try_from(&src[..lanes]),
    ) {
        (Ok(dst), Ok(src)) => *dst = *src,
        _ => dst[..lanes].copy_from_slice(&src[..lanes]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    fn random(len: usize, seed: u64) -> Vec<f32> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        (0..len).map(|_| rng.random_range(-1.0..1.0)).collect()
    }

    fn geom(batch: usize, img_c: usize, out_c: usize, out_h: usize, out_w: usize) -> ConvGeom {
        ConvGeom {
            batch,
            img_c,
            img_h: 2 * out_h,
            img_w: 2 * out_w,
            out_c,
            out_h,
            out_w,
            k: 4,
            stride: 2,
            padding: 1,
        }
    }

    /// The 4x4 / stride-2 / padding-1 convolution by its definition, in f64: each (output,
    /// image, weight) index triple it multiplies, to `f`.
    fn for_each_product(g: &ConvGeom, mut f: impl FnMut(usize, usize, usize)) {
        for (b, o, t, u) in output_pixels(g.batch, g.out_c, g.out_h, g.out_w) {
            for c in 0..g.img_c {
                for ki in 0..4 {
                    for kj in 0..4 {
                        let (r, s) = ((2 * t + ki) as isize - 1, (2 * u + kj) as isize - 1);
                        if r < 0 || s < 0 || r as usize >= g.img_h || s as usize >= g.img_w {
                            continue;
                        }
                        let out = ((b * g.out_c + o) * g.out_h + t) * g.out_w + u;
                        let img = ((b * g.img_c + c) * g.img_h + r as usize) * g.img_w + s as usize;
                        f(out, img, ((o * g.img_c + c) * 4 + ki) * 4 + kj);
                    }
                }
            }
        }
    }

    fn output_pixels(
        a: usize,
        b: usize,
        c: usize,
        d: usize,
    ) -> impl Iterator<Item = (usize, usize, usize, usize)> {
        (0..a).flat_map(move |i| {
            (0..b).flat_map(move |j| (0..c).flat_map(move |k| (0..d).map(move |l| (i, j, k, l))))
        })
    }

    fn max_error(got: &[f32], want: &[f64]) -> f64 {
        assert_eq!(got.len(), want.len());
        let scale = want.iter().fold(1f64, |m, v| m.max(v.abs()));
        got.iter()
            .zip(want)
            .map(|(&g, &w)| (g as f64 - w).abs())
            .fold(0.0, f64::max)
            / scale
    }

    /// Shapes: the sagan-mnist28 layers' 7x7 side, sides that tiles do not divide, one pixel.
    const SHAPES: &[(usize, usize, usize, usize, usize)] = &[
        (4, 16, 24, 7, 7),
        (3, 17, 16, 5, 9),
        (2, 16, 20, 8, 4),
        (2, 16, 16, 1, 1),
    ];

    #[test]
    fn one_axis_transforms_compute_a_two_tap_correlation() {
        let (d, k) = (random(SPAN * LANES, 1), random(2 * LANES, 2));
        let at = [0, 1, 2, 3, 4];
        let mut v = [[0f32; LANES]; POINTS];
        let mut u = [[0f32; LANES]; POINTS];
        for l in 0..LANES {
            for i in 0..SPAN {
                v[i][l] = d[i * LANES + l];
            }
            u[0][l] = k[l];
            u[1][l] = k[LANES + l];
        }
        input_1d(&mut v, at);
        kernel_1d(&mut u, at);
        let mut y = [[0f32; LANES]; POINTS];
        for p in 0..SPAN {
            for l in 0..LANES {
                y[p][l] = u[p][l] * v[p][l];
            }
        }
        output_1d(&mut y, at);
        for i in 0..TILE {
            for l in 0..LANES {
                let want = k[l] * d[i * LANES + l] + k[LANES + l] * d[(i + 1) * LANES + l];
                assert!(
                    (y[i][l] - want).abs() < 1e-5,
                    "y{i} lane {l}: {} vs {want}",
                    y[i][l]
                );
            }
        }
    }

    #[test]
    fn both_directions_match_the_definition() {
        for (i, &(batch, c, o, h, w)) in SHAPES.iter().enumerate() {
            let g = geom(batch, c, o, h, w);
            let seed = 10 * i as u64;
            let weight = random(g.kernel_len(), seed);
            let (img, grad) = (random(g.img_len(), seed + 1), random(g.out_len(), seed + 2));
            let (mut out, mut img_grad) = (vec![0f64; g.out_len()], vec![0f64; g.img_len()]);
            for_each_product(&g, |o, x, k| {
                out[o] += img[x] as f64 * weight[k] as f64;
                img_grad[x] += grad[o] as f64 * weight[k] as f64;
            });
            let got = conv_forward(&g, &img, &weight, None).unwrap();
            let error = max_error(&got, &out);
            assert!(error < 2e-5, "forward {g:?}: relative error {error}");
            let got = conv_backward_data(&g, &grad, &weight).unwrap();
            let error = max_error(&got, &img_grad);
            assert!(error < 2e-5, "backward {g:?}: relative error {error}");
        }
    }

    #[test]
    fn batch_chunks_give_the_whole_batch_result() {
        // A 7x7 side's backward is one correlation, an 8x8 side's four (`Plan::all`).
        for (g, backward_plans) in [(geom(5, 16, 16, 7, 7), 1), (geom(5, 16, 16, 8, 8), 4)] {
            let (img, weight) = (random(g.img_len(), 50), random(g.kernel_len(), 51));
            for direction in [Direction::Forward, Direction::Backward] {
                let u = transformed_kernels(&g, &weight, direction);
                let (src, dst_len) = match direction {
                    Direction::Forward => (&img[..], g.out_len()),
                    Direction::Backward => (&img[..g.out_len()], g.img_len()),
                };
                let plans = Plan::all(&g, direction);
                let want_plans = match direction {
                    Direction::Forward => 1,
                    Direction::Backward => backward_plans,
                };
                assert_eq!(plans.len(), want_plans, "{g:?} {direction:?}");
                let (mut want, mut got) = (vec![0f32; dst_len], vec![0f32; dst_len]);
                for whole in plans {
                    assert_eq!(whole.chunk_items, 5);
                    whole.run(src, &u, &mut want).unwrap();
                    let chunked = Plan {
                        chunk_items: 2,
                        ..whole
                    };
                    chunked.run(src, &u, &mut got).unwrap();
                }
                assert_eq!(got, want, "{g:?} {direction:?}");
            }
        }
    }

    #[test]
    fn only_wide_sampling_layers_on_enough_tiles_with_little_padding_take_winograd() {
        for side in [4, 7, 8, 14, 16] {
            assert!(geom(64, 64, 128, side, side).takes_winograd(), "{side}");
        }
        assert!(!geom(64, 64, 128, 5, 5).takes_winograd(), "1.0 of the work");
        assert!(
            !geom(64, 64, 128, 6, 6).takes_winograd(),
            "0.69 of the work"
        );
        assert!(geom(8, 16, 16, 7, 7).takes_winograd());
        assert!(!geom(7, 16, 16, 7, 7).takes_winograd(), "28 tiles");
        assert!(!geom(64, 1, 64, 14, 14).takes_winograd(), "greyscale image");
        assert!(
            !geom(64, 128, 1, 14, 14).takes_winograd(),
            "one output channel"
        );
        let stride_1 = ConvGeom {
            stride: 1,
            ..geom(64, 64, 64, 7, 7)
        };
        assert!(!stride_1.takes_winograd());
    }
}
