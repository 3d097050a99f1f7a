//! Gaussian statistics of feature vectors and the Frechet distance between two of them: the
//! "F" and "D" of FID.
//!
//! Accumulation is in f64 and shifted (features are centred on the first batch's mean before
//! their cross products are summed), so ten thousand 2048-d Inception features lose no digits
//! to the `sum(x x^T) - n mu mu^T` cancellation.

use crate::infer::{InferError, InferResult};
use nalgebra::{DMatrix, DVector, SymmetricEigen};

/// Mean and (unbiased, `n - 1`) covariance of `n` feature vectors of `dim()` values.
#[derive(Clone, Debug, PartialEq)]
pub struct Statistics {
    /// How many vectors the statistics summarise.
    pub n: usize,
    pub mean: Vec<f64>,
    /// `dim x dim`, row-major (it is symmetric, so column-major reads the same).
    pub cov: Vec<f64>,
}

impl Statistics {
    /// Statistics of `features`, `n x dim` row-major.
    pub fn from_features(features: &[f32], dim: usize) -> InferResult<Self> {
        let mut acc = StatsAccumulator::new(dim);
        acc.add(features)?;
        acc.finish()
    }

    pub fn dim(&self) -> usize {
        self.mean.len()
    }

    /// Checks that the vectors' lengths agree with each other and with `n`: statistics read
    /// from a file are not trusted blindly.
    pub fn validate(&self) -> Result<(), String> {
        let dim = self.mean.len();
        if dim == 0 || self.cov.len() != dim * dim {
            return Err(format!(
                "mean has {dim} values and covariance {} (expected {})",
                self.cov.len(),
                dim * dim
            ));
        }
        if self.n < 2 {
            return Err(format!(
                "computed from {} vectors (at least 2 needed)",
                self.n
            ));
        }
        if !self.mean.iter().chain(&self.cov).all(|v| v.is_finite()) {
            return Err("non-finite values".into());
        }
        Ok(())
    }
}

/// Builds [`Statistics`] batch by batch, so features never need to be held all at once.
#[derive(Clone, Debug)]
pub struct StatsAccumulator {
    dim: usize,
    n: usize,
    /// The first batch's mean: every vector is accumulated minus this.
    shift: Option<DVector<f64>>,
    /// Sum of the shifted vectors.
    sum: DVector<f64>,
    /// Sum of the shifted vectors' outer products.
    cross: DMatrix<f64>,
}

impl StatsAccumulator {
    pub fn new(dim: usize) -> Self {
        Self {
            dim,
            n: 0,
            shift: None,
            sum: DVector::zeros(dim),
            cross: DMatrix::zeros(dim, dim),
        }
    }

    /// Adds `features`, `k x dim` row-major (any `k`, 0 included).
    pub fn add(&mut self, features: &[f32]) -> InferResult<()> {
        let dim = self.dim;
        if dim == 0 || !features.len().is_multiple_of(dim) {
            return Err(InferError::Invalid(format!(
                "{} feature values are not whole vectors of {dim}",
                features.len()
            )));
        }
        if let Some(bad) = features.iter().position(|v| !v.is_finite()) {
            return Err(InferError::Invalid(format!(
                "feature vector {} holds a non-finite value ({}): the feature network's output is unusable",
                self.n + bad / dim,
                features[bad]
            )));
        }
        let k = features.len() / dim;
        if k == 0 {
            return Ok(());
        }
        // One vector per row of a k x dim matrix.
        let batch = DMatrix::from_row_iterator(k, dim, features.iter().map(|&v| f64::from(v)));
        let shift = self
            .shift
            .get_or_insert_with(|| batch.row_mean().transpose());
        let mut centred = batch;
        for mut row in centred.row_iter_mut() {
            row -= shift.transpose();
        }
        self.sum += centred.row_sum().transpose();
        self.cross.gemm_tr(1.0, &centred, &centred, 1.0);
        self.n += k;
        Ok(())
    }

    /// Vectors added so far.
    pub fn len(&self) -> usize {
        self.n
    }

    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    /// The mean and unbiased covariance; needs at least two vectors.
    pub fn finish(self) -> InferResult<Statistics> {
        let Some(shift) = self.shift.filter(|_| self.n >= 2) else {
            return Err(InferError::Invalid(format!(
                "statistics need at least 2 feature vectors, got {}",
                self.n
            )));
        };
        let n = self.n as f64;
        let offset = self.sum / n;
        // sum((x - s)(x - s)^T) - n (mu - s)(mu - s)^T = sum((x - mu)(x - mu)^T)
        let mut cov = (self.cross - &offset * offset.transpose() * n) / (n - 1.0);
        // Rounding leaves the two triangles a few ulps apart; the eigensolver wants symmetry.
        cov = (&cov + cov.transpose()) * 0.5;
        Ok(Statistics {
            n: self.n,
            mean: (shift + offset).iter().copied().collect(),
            cov: cov.iter().copied().collect(),
        })
    }
}

/// The Frechet distance between the Gaussians N(mu1, S1) and N(mu2, S2):
/// `|mu1 - mu2|^2 + Tr(S1) + Tr(S2) - 2 Tr(sqrt(S1 S2))`.
///
/// `Tr(sqrt(S1 S2))` is computed from symmetric eigendecompositions only: S1 S2 is not
/// symmetric, and a general matrix square root of it (scipy's `sqrtm`) can turn complex or
/// inaccurate when the covariances are singular, as they are whenever there are fewer samples
/// than dimensions. With R = sqrt(S1), S1 S2 = R (R S2 R) R^-1 is similar to the symmetric PSD
/// matrix R S2 R (for a singular S1 the eigenvalues still agree, by continuity), so
/// `Tr(sqrt(S1 S2))` is the sum of the square roots of R S2 R's eigenvalues.
pub fn frechet_distance(a: &Statistics, b: &Statistics) -> InferResult<f64> {
    for (name, s) in [("first", a), ("second", b)] {
        s.validate()
            .map_err(|e| InferError::Invalid(format!("{name} statistics: {e}")))?;
    }
    let dim = a.dim();
    if b.dim() != dim {
        return Err(InferError::Invalid(format!(
            "cannot compare statistics of {dim}-d features with {}-d ones (different feature networks?)",
            b.dim()
        )));
    }
    let mean_term: f64 = a
        .mean
        .iter()
        .zip(&b.mean)
        .map(|(x, y)| (x - y).powi(2))
        .sum();
    let s1 = DMatrix::from_row_slice(dim, dim, &a.cov);
    let s2 = DMatrix::from_row_slice(dim, dim, &b.cov);
    let root1 = psd_sqrt(s1.clone());
    let inner = &root1 * s2.clone() * &root1;
    let inner = (&inner + inner.transpose()) * 0.5;
    let tr_sqrt: f64 = psd_eigenvalues(inner).iter().map(|l| l.sqrt()).sum();
    // Rounding can leave a distance of identical statistics a hair below zero.
    Ok((mean_term + s1.trace() + s2.trace() - 2.0 * tr_sqrt).max(0.0))
}

/// The square root of a symmetric positive semi-definite matrix.
fn psd_sqrt(m: DMatrix<f64>) -> DMatrix<f64> {
    let eigen = SymmetricEigen::new(m);
    let roots = clamp_noise(eigen.eigenvalues).map(f64::sqrt);
    let v = eigen.eigenvectors;
    let scaled = &v * DMatrix::from_diagonal(&roots);
    scaled * v.transpose()
}

/// The eigenvalues of a symmetric positive semi-definite matrix, rounding noise removed.
fn psd_eigenvalues(m: DMatrix<f64>) -> DVector<f64> {
    clamp_noise(m.symmetric_eigenvalues())
}

/// Zeroes eigenvalues within rounding noise of zero (|l| <= dim * eps * max |l|), negative
/// ones included. The eigenvalues of a singular covariance come out as +-1e-15-ish instead of
/// 0, and square roots magnify that: sixteen of them would add ~1e-7 to a trace.
fn clamp_noise(eigenvalues: DVector<f64>) -> DVector<f64> {
    let largest = eigenvalues.amax();
    let noise = largest * eigenvalues.len() as f64 * f64::EPSILON;
    eigenvalues.map(|l| if l <= noise { 0.0 } else { l })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;
    use rand_distr::StandardNormal;
    use std::path::Path;

    fn stats(mean: &[f64], cov: &[f64]) -> Statistics {
        Statistics {
            n: 100,
            mean: mean.to_vec(),
            cov: cov.to_vec(),
        }
    }

    fn diag(values: &[f64]) -> Vec<f64> {
        let d = values.len();
        let mut m = vec![0.0; d * d];
        for (i, v) in values.iter().enumerate() {
            m[i * d + i] = *v;
        }
        m
    }

    fn close(a: f64, b: f64, tol: f64) {
        assert!(
            (a - b).abs() <= tol * (1.0 + b.abs()),
            "{a} vs {b} (tol {tol})"
        );
    }

    /// A random symmetric PSD matrix of rank `rank`: A A^T with A `dim x rank`.
    fn random_psd(rng: &mut ChaCha8Rng, dim: usize, rank: usize) -> Vec<f64> {
        let a = DMatrix::from_fn(dim, rank, |_, _| rng.sample::<f64, _>(StandardNormal));
        (&a * a.transpose()).iter().copied().collect()
    }

    #[test]
    fn diagonal_gaussians_match_closed_form() {
        let a = stats(&[0.0, 1.0, -2.0], &diag(&[1.0, 4.0, 0.25]));
        let b = stats(&[1.0, 1.0, 0.0], &diag(&[9.0, 1.0, 0.0]));
        // |dmu|^2 + sum (sqrt(s1) - sqrt(s2))^2
        let expected = (1.0 + 0.0 + 4.0) + (1.0 - 3.0_f64).powi(2) + 1.0 + 0.25;
        close(frechet_distance(&a, &b).unwrap(), expected, 1e-12);
        close(frechet_distance(&b, &a).unwrap(), expected, 1e-12);
    }

    #[test]
    fn scaled_covariance_matches_closed_form() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        for (dim, rank) in [(5, 5), (16, 16), (16, 4)] {
            let s1 = random_psd(&mut rng, dim, rank);
            let scale = 0.3_f64;
            let s2: Vec<f64> = s1.iter().map(|v| v * scale * scale).collect();
            let mu1: Vec<f64> = (0..dim).map(|_| rng.sample(StandardNormal)).collect();
            let mu2: Vec<f64> = (0..dim).map(|_| rng.sample(StandardNormal)).collect();
            let dmu: f64 = mu1.iter().zip(&mu2).map(|(x, y)| (x - y).powi(2)).sum();
            let trace: f64 = (0..dim).map(|i| s1[i * dim + i]).sum();
            // S2 = a^2 S1: Tr(sqrt(S1 S2)) = a Tr(S1), so FD = |dmu|^2 + (1 - a)^2 Tr(S1).
            let expected = dmu + (1.0 - scale).powi(2) * trace;
            let got = frechet_distance(&stats(&mu1, &s1), &stats(&mu2, &s2)).unwrap();
            close(got, expected, 1e-9);
        }
    }

    #[test]
    fn identical_statistics_are_zero_apart_even_when_singular() {
        let mut rng = ChaCha8Rng::seed_from_u64(2);
        let s = stats(&[0.5; 12], &random_psd(&mut rng, 12, 3));
        let d = frechet_distance(&s, &s).unwrap();
        assert!((0.0..1e-9).contains(&d), "{d}");
    }

    #[test]
    fn statistics_are_mean_and_unbiased_covariance() {
        // Large offset: a naive sum(x x^T) - n mu mu^T in f32 would lose everything here.
        let features = [1e4_f32, 1.0, 1e4 + 2.0, 3.0, 1e4 + 4.0, 2.0];
        let s = Statistics::from_features(&features, 2).unwrap();
        assert_eq!(s.n, 3);
        close(s.mean[0], 1e4 + 2.0, 1e-15);
        close(s.mean[1], 2.0, 1e-15);
        // var(0, 2, 4) = 4; var(1, 3, 2) = 1; cov = ((-2)(-1) + 0 + 2 * 0) / 2 = 1.
        for (got, want) in s.cov.iter().zip([4.0, 1.0, 1.0, 1.0]) {
            close(*got, want, 1e-12);
        }
    }

    #[test]
    fn batches_accumulate_like_one() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let features: Vec<f32> = (0..50 * 6).map(|_| rng.sample(StandardNormal)).collect();
        let whole = Statistics::from_features(&features, 6).unwrap();
        let mut acc = StatsAccumulator::new(6);
        for chunk in features.chunks(7 * 6) {
            acc.add(chunk).unwrap();
        }
        acc.add(&[]).unwrap();
        let parts = acc.finish().unwrap();
        assert_eq!(parts.n, 50);
        for (a, b) in whole
            .mean
            .iter()
            .chain(&whole.cov)
            .zip(parts.mean.iter().chain(&parts.cov))
        {
            close(*a, *b, 1e-12);
        }
    }

    #[test]
    fn bad_inputs_are_errors() {
        assert!(
            Statistics::from_features(&[1.0, 2.0], 2).is_err(),
            "one vector"
        );
        assert!(
            Statistics::from_features(&[1.0, 2.0, 3.0], 2).is_err(),
            "ragged"
        );
        let err = Statistics::from_features(&[1.0, f32::NAN, 3.0, 4.0], 2).unwrap_err();
        assert!(err.to_string().contains("non-finite"), "{err}");
        let a = stats(&[0.0; 2], &diag(&[1.0; 2]));
        let b = stats(&[0.0; 3], &diag(&[1.0; 3]));
        let err = frechet_distance(&a, &b).unwrap_err().to_string();
        assert!(err.contains("2-d features with 3-d"), "{err}");
    }

    /// Expected values from numpy/scipy (`tools/make-fid-fixture.py`, scipy.linalg.sqrtm), so
    /// the test needs no Python.
    #[test]
    fn matches_scipy_on_fixture() {
        #[derive(serde::Deserialize)]
        struct Features {
            dim: usize,
            features: Vec<f32>,
        }
        #[derive(serde::Deserialize)]
        struct Expected {
            fid: f64,
            mean_a: Vec<f64>,
            cov_a_trace: f64,
        }
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/fid");
        let read = |name: &str| std::fs::read_to_string(dir.join(name)).unwrap();
        let a: Features = serde_json::from_str(&read("features_a.json")).unwrap();
        let b: Features = serde_json::from_str(&read("features_b.json")).unwrap();
        let expected: Expected = serde_json::from_str(&read("expected.json")).unwrap();
        let sa = Statistics::from_features(&a.features, a.dim).unwrap();
        let sb = Statistics::from_features(&b.features, b.dim).unwrap();
        for (got, want) in sa.mean.iter().zip(&expected.mean_a) {
            close(*got, *want, 1e-9);
        }
        let trace: f64 = (0..sa.dim()).map(|i| sa.cov[i * sa.dim() + i]).sum();
        close(trace, expected.cov_a_trace, 1e-9);
        close(frechet_distance(&sa, &sb).unwrap(), expected.fid, 1e-6);
    }
}
