//! Strided single-precision GEMM for the custom ops' kernels, on the `gemm` crate.

/// A read-only matrix view: element `(i, j)` is `data[i * rs + j * cs]`.
#[derive(Clone, Copy)]
pub(super) struct MatRef<'a> {
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

    /// Whether every element the view addresses lies inside `data`.
    fn in_bounds(&self) -> bool {
        self.rows == 0
            || self.cols == 0
            || (self.rows - 1) * self.rs + (self.cols - 1) * self.cs < self.data.len()
    }
}

/// `dst [a.rows, b.cols] (row-major) = a x b`, or `+= a x b` when `accumulate`. Uses all rayon
/// threads: for callers that hand it one large product (a chunk of the batch side by side).
pub(super) fn matmul(
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
pub(super) fn matmul_serial(
    dst: &mut [f32],
    a: MatRef,
    b: MatRef,
    accumulate: bool,
) -> candle_core::Result<()> {
    gemm_into(dst, a, b, accumulate, gemm::Parallelism::None)
}

/// `matmul` on all threads, or `matmul_serial`.
pub(super) fn matmul_on(
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
