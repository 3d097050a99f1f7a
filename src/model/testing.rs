//! Helpers of the model tests.

use crate::rng::{normal_vec, stream};
use candle_core::{Device, Tensor, Var};

/// A seeded standard-normal input [b, c, h, w].
pub fn input(b: usize, c: usize, h: usize, w: usize, seed: u64) -> Tensor {
    let v = normal_vec(&mut stream(seed, 1), b * c * h * w);
    Tensor::from_vec(v, (b, c, h, w), &Device::Cpu).unwrap()
}

/// max |t| over all elements.
pub fn max_abs(t: &Tensor) -> f32 {
    t.abs().unwrap().max_all().unwrap().to_scalar().unwrap()
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
