//! Strided single-precision GEMM for the custom ops' kernels, on the `gemm` crate.

use super::scratch::ScratchBuf;

/// A read-only matrix view: element `(i, j)` is `data[i * rs + j * cs]`.
#[derive(Clone, Copy)]
pub(in crate::ops) struct MatRef<'a> {
    data: &'a [f32],
    rows: usize,
    cols: usize,
    rs: usize,
    cs: usize,
}

impl<'a> MatRef<'a> {
    pub fn row_major(data: &'a [f32], rows: usize, cols: usize) -> Self {
        Self {
            data,
            rows,
            cols,
            rs: cols,
            cs: 1,
        }
    }

    /// The transpose, as a view over the same data.
    pub fn t(self) -> Self {
        Self {
            rows: self.cols,
            cols: self.rows,
            rs: self.cs,
            cs: self.rs,
            ..self
        }
    }

    /// Rows `range` of the matrix, as a view over the same data.
    pub fn rows(self, range: std::ops::Range<usize>) -> Self {
        Self {
            data: &self.data[(range.start * self.rs).min(self.data.len())..],
            rows: range.len(),
            ..self
        }
    }

    /// The matrix copied into a row-major scratch buffer.
    fn to_row_major(self) -> ScratchBuf {
        let mut out = ScratchBuf::take();
        out.resize(self.rows * self.cols, 0.0);
        self.copy_row_major(&mut out);
        out
    }

    /// Copies the matrix into `out` (`rows * cols` elements), row-major, through a 16 x 16 tile:
    /// each tile is read along the source's columns and written as whole row segments, so
    /// both sides touch only a few cache lines (transposing the attention's 196 x 64 and
    /// 196 x 128 results: ~0.43 ns per element, hot cache, against ~1.0 for an
    /// element-by-element tiled loop).
    pub fn copy_row_major(&self, out: &mut [f32]) {
        const TILE: usize = 16;
        let mut tile = [[0f32; TILE]; TILE];
        for i0 in (0..self.rows).step_by(TILE) {
            let tile_rows = TILE.min(self.rows - i0);
            for j0 in (0..self.cols).step_by(TILE) {
                let tile_cols = TILE.min(self.cols - j0);
                for dj in 0..tile_cols {
                    let src = &self.data[i0 * self.rs + (j0 + dj) * self.cs..];
                    for (di, row) in tile[..tile_rows].iter_mut().enumerate() {
                        row[dj] = src[di * self.rs];
                    }
                }
                for (di, row) in tile[..tile_rows].iter().enumerate() {
                    let dst = &mut out[(i0 + di) * self.cols + j0..][..tile_cols];
                    // A whole tile row as one fixed-size store: a slice copy of a runtime
                    // length is a memcpy call per 64 bytes.
                    match <&mut [f32; TILE]>::try_from(&mut *dst) {
                        Ok(dst) => *dst = *row,
                        Err(_) => dst.copy_from_slice(&row[..tile_cols]),
                    }
                }
            }
        }
    }

    /// Whether every element the view addresses lies inside `data`.
    fn in_bounds(&self) -> bool {
        self.rows == 0
            || self.cols == 0
            || (self.rows - 1) * self.rs + (self.cols - 1) * self.cs < self.data.len()
    }
}

/// `dst [a.rows, b.cols] (row-major) = a x b`, or `+= a x b` when `accumulate`. Uses all rayon
/// threads: for callers that hand it one large product (a chunk of the batch side by side).
pub(in crate::ops) fn matmul(
    dst: &mut [f32],
    a: MatRef,
    b: MatRef,
    accumulate: bool,
) -> candle_core::Result<()> {
    let threads = rayon::current_num_threads();
    let parallelism = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    gemm_into(dst, a, b, accumulate, parallelism)
}

/// `matmul` on the calling thread only: for callers already running one product per rayon task.
pub(in crate::ops) fn matmul_serial(
    dst: &mut [f32],
    a: MatRef,
    b: MatRef,
    accumulate: bool,
) -> candle_core::Result<()> {
    gemm_into(dst, a, b, accumulate, gemm::Parallelism::None)
}

/// `matmul` on all threads, or `matmul_serial`.
pub(in crate::ops) fn matmul_on(
    dst: &mut [f32],
    a: MatRef,
    b: MatRef,
    accumulate: bool,
    all_threads: bool,
) -> candle_core::Result<()> {
    match all_threads {
        true => matmul(dst, a, b, accumulate),
        false => matmul_serial(dst, a, b, accumulate),
    }
}

/// Whether gemm would multiply by `b` faster from a row-major copy. gemm packs a column-major
/// right operand slowly once the inner dimension exceeds its depth block (256), most for small
/// m and n; for large m and n the loss is small and the copy would cost as much as it saves.
fn packs_slowly(m: usize, n: usize, k: usize, b: &MatRef) -> bool {
    b.rs == 1 && b.cs != 1 && k > 256 && n >= 32 && (m <= 256 || n <= 128)
}

fn gemm_into(
    dst: &mut [f32],
    a: MatRef,
    b: MatRef,
    accumulate: bool,
    parallelism: gemm::Parallelism,
) -> candle_core::Result<()> {
    let (m, n, k) = (a.rows, b.cols, a.cols);
    if b.rows != k || dst.len() != m * n || !a.in_bounds() || !b.in_bounds() {
        candle_core::bail!(
            "sagan kernels: inconsistent matmul operands ({m}x{k} by {}x{n} into {})",
            b.rows,
            dst.len()
        );
    }
    if m == 0 || n == 0 {
        return Ok(());
    }
    if k == 0 {
        if !accumulate {
            dst.fill(0.0);
        }
        return Ok(());
    }
    let row_major_b;
    let b = if packs_slowly(m, n, k, &b) {
        row_major_b = b.to_row_major();
        MatRef::row_major(&row_major_b, k, n)
    } else {
        b
    };
    // SAFETY: the check above ensures that every element addressed through the strides of `a`,
    // `b` and the row-major `dst` lies inside its slice, and `dst` is borrowed mutably so it
    // cannot alias the inputs.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            a.data.as_ptr(),
            a.cs as isize,
            a.rs as isize,
            b.data.as_ptr(),
            b.cs as isize,
            b.rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(a: MatRef, b: MatRef) -> Vec<f32> {
        let mut out = vec![0f32; a.rows * b.cols];
        for i in 0..a.rows {
            for j in 0..b.cols {
                out[i * b.cols + j] = (0..a.cols)
                    .map(|p| a.data[i * a.rs + p * a.cs] * b.data[p * b.rs + j * b.cs])
                    .sum();
            }
        }
        out
    }

    #[test]
    fn column_major_right_operands_multiply_like_row_major_ones() {
        // (m, n, k): the first two and the fourth take the row-major copy, the third (k <= 256)
        // and the last two (large m and n; an inner dimension of 1) gemm's own packing.
        for (m, n, k) in [
            (8, 48, 300),
            (70, 33, 517),
            (70, 33, 200),
            (300, 40, 400),
            (300, 140, 400),
            (5, 9, 1),
        ] {
            let a_data: Vec<f32> = (0..m * k).map(|i| (i % 13) as f32 - 6.0).collect();
            let b_data: Vec<f32> = (0..k * n).map(|i| (i % 7) as f32 * 0.5 - 1.5).collect();
            let a = MatRef::row_major(&a_data, m, k);
            // b [k, n] column-major: the transpose of a row-major [n, k].
            let b = MatRef::row_major(&b_data, n, k).t();
            assert_eq!(packs_slowly(m, n, k, &b), k > 256 && (m <= 256 || n <= 128));
            let mut got = vec![1f32; m * n];
            matmul_serial(&mut got, a, b, false).unwrap();
            assert_eq!(got, naive(a, b), "m {m} n {n} k {k}");
            // Accumulating adds the same product once more.
            matmul(&mut got, a, b, true).unwrap();
            let twice: Vec<f32> = naive(a, b).iter().map(|x| 2.0 * x).collect();
            assert_eq!(got, twice, "accumulated, m {m} n {n} k {k}");
        }
    }
}
