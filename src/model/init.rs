//! How a layer's weight and bias start (`WeightInit`), drawn from the VarBuilder's seeded stream.

use crate::config::WeightInit;
use candle_core::{DType, Result, Tensor};
use candle_nn::{Init, VarBuilder};

/// The weight `NAME.weight` of `shape` (output or input units first, then the kernel), drawn as
/// `init` says, and how the layer's bias should be drawn.
pub(super) fn weight(vb: &VarBuilder, shape: &[usize], init: WeightInit) -> Result<(Tensor, Init)> {
    let (weight_init, bias_init) = hints(init, shape);
    let weight = vb.get_with_hints(shape.to_vec(), "weight", weight_init)?;
    if init == WeightInit::Orthogonal {
        orthogonalize(&weight)?;
    }
    Ok((weight, bias_init))
}

/// The initial distributions of a weight of `shape` and of its bias, under `init` (for
/// `Orthogonal`, the Gaussian that `orthogonalize` starts from). Fans are counted as PyTorch
/// counts them.
fn hints(init: WeightInit, shape: &[usize]) -> (Init, Init) {
    let area: usize = shape[2..].iter().product();
    let (fan_in, fan_out) = ((shape[1] * area) as f64, (shape[0] * area) as f64);
    let uniform = |bound: f64| Init::Uniform {
        lo: -bound,
        up: bound,
    };
    let pytorch = uniform(fan_in.powf(-0.5));
    match init {
        WeightInit::Pytorch => (pytorch, pytorch),
        WeightInit::Normal => (
            Init::Randn {
                mean: 0.0,
                stdev: 0.02,
            },
            Init::Const(0.0),
        ),
        WeightInit::Xavier => (uniform((6.0 / (fan_in + fan_out)).sqrt()), Init::Const(0.0)),
        // BigGAN-PyTorch re-initialises the weights only: biases keep PyTorch's default.
        WeightInit::Orthogonal => (
            Init::Randn {
                mean: 0.0,
                stdev: 1.0,
            },
            pytorch,
        ),
    }
}

/// Replaces a Gaussian `weight`, in place, by the orthogonal factor Q of its QR decomposition,
/// as torch.nn.init.orthogonal_ does: viewed as a [shape[0], rest] matrix, its rows or its
/// columns (whichever are fewer) become orthonormal. Gram-Schmidt gives the Q whose R has a
/// positive diagonal, the sign convention PyTorch applies.
fn orthogonalize(weight: &Tensor) -> Result<()> {
    let rows = weight.dim(0)?;
    let cols = weight.elem_count() / rows;
    let a = weight
        .flatten_all()?
        .to_dtype(DType::F64)?
        .to_vec1::<f64>()?;
    // The tall matrix's n columns, each of length m: A's columns, or its rows when A is wide.
    let tall = rows >= cols;
    let (m, n) = if tall { (rows, cols) } else { (cols, rows) };
    let at = |j: usize, i: usize| if tall { i * cols + j } else { j * cols + i };
    let mut q: Vec<Vec<f64>> = (0..n)
        .map(|j| (0..m).map(|i| a[at(j, i)]).collect())
        .collect();
    for j in 0..n {
        let (done, rest) = q.split_at_mut(j);
        let column = &mut rest[0];
        // Two passes of modified Gram-Schmidt keep Q orthogonal to rounding error.
        for _ in 0..2 {
            for prev in done.iter() {
                let dot: f64 = prev.iter().zip(column.iter()).map(|(p, c)| p * c).sum();
                column.iter_mut().zip(prev).for_each(|(c, p)| *c -= dot * p);
            }
        }
        let norm = column.iter().map(|c| c * c).sum::<f64>().sqrt();
        column.iter_mut().for_each(|c| *c /= norm);
    }
    let mut out = vec![0f64; a.len()];
    for (j, column) in q.iter().enumerate() {
        for (i, value) in column.iter().enumerate() {
            out[at(j, i)] = *value;
        }
    }
    let q = Tensor::from_vec(out, weight.shape(), weight.device())?.to_dtype(weight.dtype())?;
    // The weight is the VarMap's variable itself: write into its storage.
    weight.slice_set(&q, 0, 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::{seeded_var_builder, stream};
    use candle_core::Device;
    use candle_nn::VarMap;

    fn bounds(init: Init) -> (f64, f64) {
        match init {
            Init::Uniform { lo, up } => (lo, up),
            other => panic!("not uniform: {other:?}"),
        }
    }

    #[test]
    fn pytorch_init_counts_fan_in_as_pytorch_does() {
        // Conv [out 8, in 4, 3, 3]: fan_in = 4 * 9; transposed [in 4, out 8, 3, 3]: 8 * 9, the
        // out channels (PyTorch reads dimension 1 whatever the layer).
        let (w, b) = hints(WeightInit::Pytorch, &[8, 4, 3, 3]);
        assert_eq!(bounds(w), (-1.0 / 6.0, 1.0 / 6.0));
        assert_eq!(bounds(b), bounds(w));
        let (w, _) = hints(WeightInit::Pytorch, &[4, 8, 3, 3]);
        assert!((bounds(w).1 - 1.0 / 72f64.sqrt()).abs() < 1e-12);
        let (w, b) = hints(WeightInit::Xavier, &[8, 4, 3, 3]);
        assert!((bounds(w).1 - (6.0 / 108.0f64).sqrt()).abs() < 1e-12);
        assert!(matches!(b, Init::Const(0.0)));
        let (w, b) = hints(WeightInit::Normal, &[3, 5]);
        assert!(matches!(w, Init::Randn { stdev, .. } if stdev == 0.02));
        assert!(matches!(b, Init::Const(0.0)));
        let (_, b) = hints(WeightInit::Orthogonal, &[8, 4, 3, 3]);
        assert_eq!(bounds(b), (-1.0 / 6.0, 1.0 / 6.0));
    }

    fn orthogonal(seed: u64, shape: &[usize]) -> (Vec<Vec<f64>>, VarMap) {
        let varmap = VarMap::new();
        let vb = seeded_var_builder(&varmap, stream(seed, 1), &Device::Cpu);
        let (w, _) = weight(&vb, shape, WeightInit::Orthogonal).unwrap();
        let w = w.flatten_from(1).unwrap().to_dtype(DType::F64).unwrap();
        (w.to_vec2().unwrap(), varmap)
    }

    /// The largest deviation of the Gram matrix of `vectors` from the identity.
    fn off_identity(vectors: &[Vec<f64>]) -> f64 {
        let mut worst = 0f64;
        for (i, a) in vectors.iter().enumerate() {
            for (j, b) in vectors.iter().enumerate() {
                let dot: f64 = a.iter().zip(b).map(|(x, y)| x * y).sum();
                worst = worst.max((dot - if i == j { 1.0 } else { 0.0 }).abs());
            }
        }
        worst
    }

    #[test]
    fn orthogonal_weights_have_orthonormal_rows_or_columns_and_follow_the_seed() {
        // Wide: 8 rows of 36 are orthonormal. Tall: 3 columns of 10 are.
        let (wide, varmap) = orthogonal(3, &[8, 4, 3, 3]);
        assert!(off_identity(&wide) < 1e-6, "{}", off_identity(&wide));
        // The variable in the VarMap (what training updates and checkpoints save) holds Q.
        let stored = varmap.all_vars()[0].flatten_from(1).unwrap();
        let stored: Vec<Vec<f32>> = stored.to_vec2().unwrap();
        assert_eq!(stored[0][0] as f64, wide[0][0]);
        let (tall, _) = orthogonal(3, &[10, 3]);
        let columns: Vec<Vec<f64>> = (0..3)
            .map(|j| tall.iter().map(|r| r[j]).collect())
            .collect();
        assert!(off_identity(&columns) < 1e-6, "{}", off_identity(&columns));
        assert_eq!(orthogonal(3, &[10, 3]).0, tall);
        assert_ne!(orthogonal(4, &[10, 3]).0, tall);
    }
}
