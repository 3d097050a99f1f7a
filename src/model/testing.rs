//! Helpers of the model tests.

use crate::rng::{normal_vec, stream};
use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};

/// A seeded standard-normal input [b, c, h, w].
pub fn input(b: usize, c: usize, h: usize, w: usize, seed: u64) -> Tensor {
    let v = normal_vec(&mut stream(seed, 1), b * c * h * w);
    Tensor::from_vec(v, (b, c, h, w), &Device::Cpu).unwrap()
}

/// max |t| over all elements.
pub fn max_abs(t: &Tensor) -> f32 {
    let max = t.abs().unwrap().max_all().unwrap();
    max.to_dtype(DType::F32).unwrap().to_scalar().unwrap()
}

/// The gradient with respect to `x` of sum(y * weights): a loss whose gradient at y is `weights`.
pub fn weighted_grad(y: &Tensor, weights: &Tensor, x: &Var) -> Tensor {
    let grads = (y * weights)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    grads.get(x.as_tensor()).unwrap().clone()
}

/// Asserts that `got` has `want`'s shape and lies within `tol` of it, relative to the larger
/// of 1 and max |want|.
pub fn assert_close(got: &Tensor, want: &Tensor, tol: f32, what: &str) {
    assert_eq!(got.dims(), want.dims(), "{what}: shape");
    let diff = max_abs(&(got - want).unwrap());
    let scale = max_abs(want).max(1.0);
    assert!(
        diff <= tol * scale,
        "{what}: max diff {diff} (scale {scale})"
    );
}

/// Asserts that two backward passes gave every named variable the same gradient (within `tol`).
pub fn assert_grads_close(
    got: &GradStore,
    want: &GradStore,
    vars: &[(&Var, &str)],
    tol: f32,
    what: &str,
) {
    for (var, name) in vars {
        let (g, w) = (got.get(var), want.get(var));
        let (Some(g), Some(w)) = (g, w) else {
            panic!("{what} d{name}: missing gradient");
        };
        assert_close(g, w, tol, &format!("{what} d{name}"));
    }
}
