//! The Inception Score (Salimans et al. 2016) of a classifier's logits:
//! `exp(E_x KL(p(y|x) || p(y)))`, high when each image is confidently one class and the classes
//! are evenly used. It ranges from 1 to the number of classes.

use crate::infer::{InferError, InferResult};

/// The mean and the (population) standard deviation over `splits` equal parts of the score,
/// as the reference implementation reports it (10 splits).
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub struct InceptionScore {
    pub mean: f64,
    pub std: f64,
}

/// Scores `logits`, `n x classes` row-major, in `splits` consecutive parts (part `k` is rows
/// `k n / splits .. (k + 1) n / splits`).
pub fn inception_score(
    logits: &[f32],
    classes: usize,
    splits: usize,
) -> InferResult<InceptionScore> {
    if classes < 2 || !logits.len().is_multiple_of(classes) {
        return Err(InferError::Invalid(format!(
            "{} logits are not rows of {classes} classes (at least 2)",
            logits.len()
        )));
    }
    let n = logits.len() / classes;
    if splits == 0 || n < splits {
        return Err(InferError::Invalid(format!(
            "the Inception score of {n} images in {splits} splits needs at least one image per split"
        )));
    }
    let probs: Vec<f64> = logits.chunks_exact(classes).flat_map(softmax).collect();
    let scores: Vec<f64> = (0..splits)
        .map(|k| {
            split_score(
                &probs[k * n / splits * classes..(k + 1) * n / splits * classes],
                classes,
            )
        })
        .collect();
    let mean = scores.iter().sum::<f64>() / splits as f64;
    let var = scores.iter().map(|s| (s - mean).powi(2)).sum::<f64>() / splits as f64;
    Ok(InceptionScore {
        mean,
        std: var.sqrt(),
    })
}

/// Softmax in f64, shifted by the maximum so large logits do not overflow.
fn softmax(logits: &[f32]) -> Vec<f64> {
    let max = logits.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    let exp: Vec<f64> = logits.iter().map(|&v| f64::from(v - max).exp()).collect();
    let sum: f64 = exp.iter().sum();
    exp.into_iter().map(|e| e / sum).collect()
}

/// `exp(mean KL(p(y|x) || p(y)))` of one split's probabilities.
fn split_score(probs: &[f64], classes: usize) -> f64 {
    let rows = probs.len() / classes;
    let mut marginal = vec![0.0; classes];
    for row in probs.chunks_exact(classes) {
        for (m, p) in marginal.iter_mut().zip(row) {
            *m += p / rows as f64;
        }
    }
    let kl: f64 = probs
        .chunks_exact(classes)
        .map(|row| {
            row.iter()
                .zip(&marginal)
                // p log(p / q) -> 0 as p -> 0; q >= p / rows > 0 whenever p > 0.
                .filter(|(&p, _)| p > 0.0)
                .map(|(&p, &q)| p * (p / q).ln())
                .sum::<f64>()
        })
        .sum();
    (kl / rows as f64).exp()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uniform_predictions_score_one() {
        let logits = vec![0.3_f32; 40 * 10];
        let score = inception_score(&logits, 10, 4).unwrap();
        assert!((score.mean - 1.0).abs() < 1e-12, "{score:?}");
        assert!(score.std < 1e-12, "{score:?}");
    }

    #[test]
    fn confident_distinct_classes_score_k() {
        let k = 10;
        let mut logits = vec![0.0_f32; 100 * k];
        for (i, row) in logits.chunks_exact_mut(k).enumerate() {
            row[i % k] = 50.0;
        }
        let score = inception_score(&logits, k, 10).unwrap();
        assert!((score.mean - k as f64).abs() < 1e-6, "{score:?}");
        assert!(score.std < 1e-6, "{score:?}");
    }

    #[test]
    fn one_confident_class_scores_one() {
        // Confident but no variety: mode collapse scores as badly as no confidence.
        let mut logits = vec![0.0_f32; 20 * 5];
        for row in logits.chunks_exact_mut(5) {
            row[2] = 40.0;
        }
        let score = inception_score(&logits, 5, 2).unwrap();
        assert!((score.mean - 1.0).abs() < 1e-9, "{score:?}");
    }

    #[test]
    fn splits_are_scored_separately() {
        // First half: two classes evenly (score 2); second half: one class (score 1).
        let mut logits = vec![0.0_f32; 8 * 2];
        for (i, row) in logits.chunks_exact_mut(2).enumerate() {
            row[if i < 4 { i % 2 } else { 0 }] = 60.0;
        }
        let score = inception_score(&logits, 2, 2).unwrap();
        assert!((score.mean - 1.5).abs() < 1e-9, "{score:?}");
        assert!((score.std - 0.5).abs() < 1e-9, "{score:?}");
    }

    #[test]
    fn bad_shapes_are_errors() {
        assert!(inception_score(&[0.0; 7], 2, 1).is_err());
        assert!(inception_score(&[0.0; 4], 1, 1).is_err());
        assert!(inception_score(&[0.0; 4], 2, 3).is_err());
        assert!(inception_score(&[0.0; 4], 2, 0).is_err());
    }
}
