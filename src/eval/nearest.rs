//! The memorisation check the GAN evaluation suites offer: generated samples beside their
//! nearest training images in a feature network's space. A generator that copies its data
//! shows near-twins in every row; one that generalises shows look-alikes, not copies.

use super::features::FeatureNet;
use super::{for_each_batch, requested_class};
use crate::image_io::{grid_image, ImageBatch};
use crate::infer::{latents, Generator, InferError, InferResult};
use image::RgbImage;
use std::ops::Range;

/// How many samples, how many neighbours each, from which latents.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NearestOptions {
    pub samples: usize,
    pub k: usize,
    /// Images per run of the feature network.
    pub batch: usize,
    /// Latent seed of the samples (the same latents as `sagan-infer --seed`).
    pub seed: u64,
}

/// One sample's neighbours: (reference index, squared feature distance), nearest first.
pub type Neighbours = Vec<(usize, f32)>;

/// For each row of `queries`, the `k` rows of `reference` nearest to it in squared Euclidean
/// distance, nearest first (ties: the lower index). Both are row-major with `dim` columns.
pub fn k_nearest(queries: &[f32], reference: &[f32], dim: usize, k: usize) -> Vec<Neighbours> {
    queries
        .chunks_exact(dim)
        .map(|q| {
            let mut best: Neighbours = Vec::with_capacity(k + 1);
            for (i, r) in reference.chunks_exact(dim).enumerate() {
                let d: f32 = q.iter().zip(r).map(|(a, b)| (a - b) * (a - b)).sum();
                if best.len() == k && best.last().is_some_and(|&(_, worst)| d >= worst) {
                    continue;
                }
                let at = best.partition_point(|&(_, e)| e <= d);
                best.insert(at, (i, d));
                best.truncate(k);
            }
            best
        })
        .collect()
}

/// The feature rows of `count` images that `fill(range, out)` appends (NCHW f32 in [-1, 1]),
/// and their width.
fn feature_rows(
    net: &mut FeatureNet,
    count: usize,
    batch: usize,
    shape: [usize; 3],
    fill: impl FnMut(Range<usize>, &mut Vec<f32>) -> InferResult<()>,
) -> InferResult<(Vec<f32>, usize)> {
    let (mut rows, mut dim) = (Vec::new(), 0);
    for_each_batch(net, count, batch, shape, fill, |out| {
        dim = out.dim;
        rows.extend(out.features);
        Ok(())
    })?;
    Ok((rows, dim))
}

/// `options.samples` samples of `generator`, each followed in its row by its `options.k`
/// nearest among the `reference_count` images that `fill_reference` appends, as one grid;
/// also returns the neighbours.
pub fn nearest_grid(
    generator: &mut Generator,
    net: &mut FeatureNet,
    reference_count: usize,
    mut fill_reference: impl FnMut(Range<usize>, &mut Vec<f32>) -> InferResult<()>,
    options: &NearestOptions,
) -> InferResult<(RgbImage, Vec<Neighbours>)> {
    let (samples, k) = (options.samples, options.k);
    if samples == 0 || k == 0 || k > reference_count {
        return Err(InferError::Invalid(format!(
            "the nearest-neighbour grid needs at least one sample and 1..={reference_count} \
             neighbours each (got {samples} samples, {k} neighbours)"
        )));
    }
    let (h, w) = generator.size();
    let shape = [generator.channels(), h, w];
    let classes: Option<Vec<i64>> = match generator.num_classes() {
        0 => None,
        n => Some((0..samples).map(|i| requested_class(i, n)).collect()),
    };
    let z = latents(options.seed, samples, generator.z_dim());
    let generated = generator.generate(&z, classes.as_deref(), samples)?.images;
    let size = generated.len() / samples;
    let (queries, _) = feature_rows(net, samples, options.batch, shape, |range, out| {
        out.extend_from_slice(&generated[range.start * size..range.end * size]);
        Ok(())
    })?;
    let (reference, dim) = feature_rows(
        net,
        reference_count,
        options.batch,
        shape,
        &mut fill_reference,
    )?;
    let neighbours = k_nearest(&queries, &reference, dim, k);
    let mut tiles = Vec::with_capacity(samples * (k + 1) * size);
    for (i, row) in neighbours.iter().enumerate() {
        tiles.extend_from_slice(&generated[i * size..(i + 1) * size]);
        for &(j, _) in row {
            fill_reference(j..j + 1, &mut tiles)?;
        }
    }
    let batch = ImageBatch::new(&tiles, samples * (k + 1), shape[0], h, w)
        .map_err(|e| InferError::Invalid(format!("the nearest-neighbour grid: {e}")))?;
    Ok((grid_image(batch, k + 1), neighbours))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn k_nearest_orders_by_distance_and_keeps_k() {
        // Reference points on a line at 0, 10, 1, 5, 2; queries at 0.9 and 6 (to which 10 and
        // 2 are equally far: the lower index comes first).
        let reference = [0.0, 10.0, 1.0, 5.0, 2.0];
        let got = k_nearest(&[0.9, 6.0], &reference, 1, 3);
        let index = |row: &Neighbours| row.iter().map(|&(i, _)| i).collect::<Vec<_>>();
        assert_eq!(index(&got[0]), vec![2, 0, 4]);
        assert_eq!(index(&got[1]), vec![3, 1, 4]);
        assert!((got[0][0].1 - 0.01).abs() < 1e-6);
    }

    #[test]
    fn k_nearest_measures_every_dimension() {
        // (2, 0) is nearer to (0, 0) than (0.5, 3) is, though the first coordinate alone
        // would say otherwise.
        let reference = [0.5, 3.0, 2.0, 0.0];
        let got = k_nearest(&[0.0, 0.0], &reference, 2, 1);
        assert_eq!(got, vec![vec![(1, 4.0)]]);
    }
}
