//! Helpers of the model tests.

use crate::rng::{normal_vec, stream};
use candle_core::{Device, Tensor};

/// A seeded standard-normal input [b, c, h, w].
pub fn input(b: usize, c: usize, h: usize, w: usize, seed: u64) -> Tensor {
    let v = normal_vec(&mut stream(seed, 1), b * c * h * w);
    Tensor::from_vec(v, (b, c, h, w), &Device::Cpu).unwrap()
}

/// max |t| over all elements.
pub fn max_abs(t: &Tensor) -> f32 {
    t.abs().unwrap().max_all().unwrap().to_scalar().unwrap()
}
