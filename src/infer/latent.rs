//! Latent vectors. z is drawn exactly as sagan-train draws the fixed z of its sample grids, so
//! `sagan-infer --seed S` reproduces the training run's grid for seed S.

use super::{InferError, InferResult};
use crate::rng::{normal_vec, stream, streams};
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use rand_distr::StandardNormal;

/// Smallest accepted truncation: below it, resampling needs ~1/(0.8 T) draws per value and
/// every z is ~0 anyway.
pub const MIN_TRUNCATION: f32 = 1e-3;

/// The stream sagan-train draws the fixed z of its sample grids from.
fn z_stream(seed: u64) -> ChaCha8Rng {
    stream(seed, streams::FIXED_Z)
}

/// Latents drawn batch after batch from one seed's stream: the concatenation of `take`s is
/// what one call of [`latents`] (or [`truncated_latents`]) for all of them gives, so images can
/// be generated a batch at a time without holding every latent.
pub struct LatentStream {
    rng: ChaCha8Rng,
    z_dim: usize,
    truncation: Option<f32>,
}

impl LatentStream {
    /// Standard normal latents, or with `truncation`, every value with |z| above it redrawn
    /// from the same stream until it fits (the truncation trick).
    pub fn new(seed: u64, z_dim: usize, truncation: Option<f32>) -> InferResult<Self> {
        if let Some(t) = truncation {
            check_truncation(t)?;
        }
        Ok(Self {
            rng: z_stream(seed),
            z_dim,
            truncation,
        })
    }

    /// The next `n` latents, row-major `[n, z_dim]`.
    pub fn take(&mut self, n: usize) -> Vec<f32> {
        let Some(truncation) = self.truncation else {
            return normal_vec(&mut self.rng, n * self.z_dim);
        };
        (0..n * self.z_dim)
            .map(|_| loop {
                let v: f32 = self.rng.sample(StandardNormal);
                if v.abs() <= truncation {
                    break v;
                }
            })
            .collect()
    }
}

/// `n` standard normal latents of `z_dim` values, row-major `[n, z_dim]`, from seed `seed`:
/// bit-identical to sagan-train's fixed sample z for the same seed.
pub fn latents(seed: u64, n: usize, z_dim: usize) -> Vec<f32> {
    normal_vec(&mut z_stream(seed), n * z_dim)
}

/// [`latents`] under the truncation trick: values already inside are the ones [`latents`]
/// gives, so a large truncation changes nothing.
pub fn truncated_latents(
    seed: u64,
    n: usize,
    z_dim: usize,
    truncation: f32,
) -> InferResult<Vec<f32>> {
    Ok(LatentStream::new(seed, z_dim, Some(truncation))?.take(n))
}

/// Rejects truncations that are not positive numbers (or so small that sampling never ends).
pub fn check_truncation(truncation: f32) -> InferResult<()> {
    if truncation.is_nan() || truncation < MIN_TRUNCATION {
        return Err(InferError::Invalid(format!(
            "--truncation must be a positive number >= {MIN_TRUNCATION} (got {truncation})"
        )));
    }
    Ok(())
}

/// How to move between two latents.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Interpolation {
    /// Straight line: midpoints of two Gaussian latents have a smaller norm than either, so
    /// mid-way images drift towards the "average" sample.
    Linear,
    /// Great circle (slerp): keeps the norm in the range typical of Gaussian latents, the usual
    /// choice for GAN latent walks.
    Spherical,
}

/// `steps` latents from `a` to `b`, both included (`steps >= 2`), concatenated row-major.
pub fn interpolate(a: &[f32], b: &[f32], steps: usize, mode: Interpolation) -> Vec<f32> {
    debug_assert_eq!(a.len(), b.len());
    let norm = |v: &[f32]| v.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    let (na, nb) = (norm(a), norm(b));
    let dot: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| f64::from(*x) * f64::from(*y))
        .sum();
    let omega = if na > 0.0 && nb > 0.0 {
        (dot / (na * nb)).clamp(-1.0, 1.0).acos()
    } else {
        0.0
    };
    let last = steps.max(2) - 1;
    let mut out = Vec::with_capacity(a.len() * (last + 1));
    for i in 0..=last {
        // The endpoints are copied, not computed, so they equal the seeds' latents exactly.
        if i == 0 {
            out.extend_from_slice(a);
            continue;
        }
        if i == last {
            out.extend_from_slice(b);
            continue;
        }
        let t = i as f64 / last as f64;
        // Nearly parallel vectors make slerp's sin(omega) ~ 0: linear is then the same curve.
        let (wa, wb) = if mode == Interpolation::Spherical && omega.sin().abs() > 1e-6 {
            let s = omega.sin();
            (((1.0 - t) * omega).sin() / s, (t * omega).sin() / s)
        } else {
            (1.0 - t, t)
        };
        out.extend(
            a.iter()
                .zip(b)
                .map(|(x, y)| (wa * f64::from(*x) + wb * f64::from(*y)) as f32),
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stream_taken_in_batches_gives_the_latents_of_one_draw() {
        for truncation in [None, Some(0.5)] {
            let mut stream = LatentStream::new(3, 16, truncation).unwrap();
            let batched: Vec<f32> = [5, 1, 7].iter().flat_map(|&n| stream.take(n)).collect();
            let whole = match truncation {
                None => latents(3, 13, 16),
                Some(t) => truncated_latents(3, 13, 16, t).unwrap(),
            };
            assert_eq!(batched, whole);
        }
    }

    #[test]
    fn latents_are_deterministic_and_seed_dependent() {
        let a = latents(7, 4, 16);
        assert_eq!(a.len(), 64);
        assert_eq!(a, latents(7, 4, 16));
        assert_ne!(a, latents(8, 4, 16));
        // A prefix of a longer draw: batches of one seed agree with the whole.
        assert_eq!(latents(7, 2, 16), a[..32]);
        let mean = a.iter().sum::<f32>() / a.len() as f32;
        assert!(mean.abs() < 0.5, "mean {mean}");
    }

    #[test]
    fn latents_match_sagan_train_stream() {
        // Same recipe as sagan-train's rng::stream(seed, FIXED_Z) + normal_vec.
        let mut rng = <ChaCha8Rng as rand::SeedableRng>::seed_from_u64(0);
        rng.set_stream(3);
        let expected: Vec<f32> = (0..24).map(|_| rng.sample(StandardNormal)).collect();
        assert_eq!(latents(0, 3, 8), expected);
    }

    #[test]
    fn truncation_bounds_every_value_and_keeps_inliers() {
        for t in [0.05_f32, 0.5, 1.0, 2.0] {
            let z = truncated_latents(3, 32, 16, t).unwrap();
            assert_eq!(z.len(), 512);
            assert!(z.iter().all(|v| v.abs() <= t), "truncation {t}");
        }
        assert_eq!(truncated_latents(3, 4, 8, 100.0).unwrap(), latents(3, 4, 8));
    }

    #[test]
    fn truncation_must_be_positive() {
        for t in [0.0_f32, -1.0, f32::NAN, 1e-9] {
            let err = truncated_latents(0, 1, 4, t).unwrap_err().to_string();
            assert!(err.contains("--truncation"), "{err}");
        }
    }

    #[test]
    fn interpolation_endpoints_are_the_seeds_latents() {
        let (a, b) = (latents(1, 1, 32), latents(2, 1, 32));
        for mode in [Interpolation::Linear, Interpolation::Spherical] {
            let path = interpolate(&a, &b, 5, mode);
            assert_eq!(path.len(), 5 * 32);
            assert_eq!(&path[..32], &a[..]);
            assert_eq!(&path[4 * 32..], &b[..]);
        }
    }

    #[test]
    fn slerp_keeps_norm_between_endpoints_and_lerp_shrinks_it() {
        let a = vec![1.0_f32, 0.0];
        let b = vec![0.0_f32, 1.0];
        let mid = |mode| interpolate(&a, &b, 3, mode)[2..4].to_vec();
        let norm = |v: Vec<f32>| v.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm(mid(Interpolation::Spherical)) - 1.0).abs() < 1e-6);
        assert!((norm(mid(Interpolation::Linear)) - 0.5f32.sqrt()).abs() < 1e-6);
        // Parallel vectors fall back to the straight line instead of dividing by sin(0).
        let same = interpolate(&a, &a, 4, Interpolation::Spherical);
        assert!(same.iter().all(|v| v.is_finite()));
    }
}
