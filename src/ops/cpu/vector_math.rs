//! Loops written so that the compiler vectorises them: independent lanes for reductions and
//! an exp without a libm call. The kernels run them through `simd::vectorized`, compiled for
//! AVX-512 or AVX2 + FMA when the CPU has them (detected at run time), for SSE2 otherwise.

/// Accumulator lanes of the reductions.
const LANES: usize = 16;

/// Sum of a slice in 16 independent lanes, so the loop vectorises (a single running sum
/// cannot be reordered by the compiler) and rounding error grows more slowly.
#[inline(always)]
pub(in crate::ops) fn lane_sum(xs: &[f32], mut term: impl FnMut(usize, f32) -> f32) -> f32 {
    let mut acc = [0.0f32; LANES];
    let chunks = xs.chunks_exact(LANES);
    let rest = xs.len() - chunks.remainder().len();
    for (c, chunk) in chunks.enumerate() {
        for (l, (a, &x)) in acc.iter_mut().zip(chunk).enumerate() {
            *a += term(c * LANES + l, x);
        }
    }
    let mut total: f32 = acc.iter().sum();
    for (i, &x) in xs.iter().enumerate().skip(rest) {
        total += term(i, x);
    }
    total
}

/// Sum of `term(a[i], b[i], c[i])` over `a`'s length (`b` and `c` at least as long), in the
/// lanes of `lane_sum` (the same order, so the same result). The slices are walked in step
/// rather than indexed: an indexing closure keeps the loop scalar.
#[inline(always)]
pub(in crate::ops) fn lane_sum3(
    a: &[f32],
    b: &[f32],
    c: &[f32],
    term: impl Fn(f32, f32, f32) -> f32,
) -> f32 {
    let n = a.len();
    let (b, c) = (&b[..n], &c[..n]);
    let mut acc = [0.0f32; LANES];
    let chunks = a
        .chunks_exact(LANES)
        .zip(b.chunks_exact(LANES))
        .zip(c.chunks_exact(LANES));
    for ((a, b), c) in chunks {
        for (l, acc) in acc.iter_mut().enumerate() {
            *acc += term(a[l], b[l], c[l]);
        }
    }
    let rest = n - n % LANES;
    let mut total: f32 = acc.iter().sum();
    for ((&a, &b), &c) in a[rest..].iter().zip(&b[rest..]).zip(&c[rest..]) {
        total += term(a, b, c);
    }
    total
}

/// `<a, b>` over `a`'s length, in the lanes of `lane_sum`.
#[inline(always)]
pub(in crate::ops) fn lane_dot(a: &[f32], b: &[f32]) -> f32 {
    lane_sum3(a, b, b, |a, b, _| a * b)
}

/// Replaces every element by `f(element)` and returns the sum of the new values, in one pass
/// with independent lanes.
#[inline(always)]
pub(in crate::ops) fn lane_sum_mut(xs: &mut [f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut acc = [0.0f32; LANES];
    let mut chunks = xs.chunks_exact_mut(LANES);
    for chunk in &mut chunks {
        for (a, x) in acc.iter_mut().zip(chunk.iter_mut()) {
            *x = f(*x);
            *a += *x;
        }
    }
    let mut total: f32 = acc.iter().sum();
    for x in chunks.into_remainder() {
        *x = f(*x);
        total += *x;
    }
    total
}

/// Largest element (-inf for an empty slice), in independent lanes.
#[inline(always)]
pub(in crate::ops) fn lane_max(xs: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let chunks = xs.chunks_exact(LANES);
    let rest = chunks.remainder();
    for chunk in chunks {
        for (a, &x) in acc.iter_mut().zip(chunk) {
            *a = if x > *a { x } else { *a };
        }
    }
    rest.iter()
        .chain(acc.iter())
        .fold(f32::NEG_INFINITY, |m, &x| if x > m { x } else { m })
}

/// e^x to within a few float ulps (Cephes' expf: x = n ln2 + r, a degree-7 polynomial for
/// e^r, 2^n from the exponent bits), without a libm call so that loops over it vectorise.
/// 0 below -87.3 (where e^x leaves the normal floats), e^88 above 88.
#[inline(always)]
pub(in crate::ops) fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding and subtracting 1.5 * 2^23 rounds to the nearest integer in plain float ops.
    const ROUND: f32 = 12_582_912.0;
    const LOWEST: f32 = -87.336_55;
    let underflow = x < LOWEST;
    let x = x.clamp(LOWEST, 88.0);
    let shifted = x * LOG2E + ROUND;
    let n = shifted - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = 1.987_569_1e-4;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 1.666_666_5e-1;
    let p = p * r + 0.5;
    let e_r = p * r * r + r + 1.0;
    // n in [-126, 127]: 2^n is a normal float. n is read from the low bits of `shifted` (one
    // ulp there is 1) rather than with `n as i32`, whose saturating conversion keeps the loop
    // from vectorising.
    let n_bits = shifted.to_bits().wrapping_sub(ROUND.to_bits());
    let two_n = f32::from_bits(n_bits.wrapping_add(127) << 23);
    if underflow {
        0.0
    } else {
        e_r * two_n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_within_a_few_ulps_of_libm() {
        let mut worst = 0f32;
        for i in 0..=200_000 {
            let x = -87.0 + 175.0 * i as f32 / 200_000.0;
            let (got, want) = (exp(x), x.exp());
            worst = worst.max(((got - want) / want).abs());
        }
        assert!(worst < 5e-7, "worst relative error {worst}");
        assert_eq!(exp(-1000.0), 0.0);
        assert!(exp(0.0) == 1.0);
    }

    #[test]
    fn lane_reductions_match_sequential_ones() {
        for len in [0, 1, 15, 16, 17, 100] {
            let xs: Vec<f32> = (0..len)
                .map(|i| ((i * 37 % 11) as f32 - 5.0) * 0.5)
                .collect();
            let sum: f32 = xs.iter().sum();
            assert!((lane_sum(&xs, |_, v| v) - sum).abs() < 1e-5, "sum of {len}");
            let mut doubled = xs.clone();
            assert!((lane_sum_mut(&mut doubled, |v| 2.0 * v) - 2.0 * sum).abs() < 1e-5);
            assert!(
                doubled.iter().zip(&xs).all(|(d, x)| *d == 2.0 * x),
                "doubled {len}"
            );
            let ys: Vec<f32> = xs.iter().map(|x| x * 0.5 - 1.0).collect();
            let indexed = lane_sum(&xs, |i, x| x * ys[i] - ys[i]);
            assert_eq!(
                lane_sum3(&xs, &ys, &ys, |x, y, z| x * y - z),
                indexed,
                "{len}"
            );
            assert_eq!(lane_dot(&xs, &ys), lane_sum(&xs, |i, x| x * ys[i]), "{len}");
            let max = xs.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            assert_eq!(lane_max(&xs), max, "max of {len}");
        }
    }
}
