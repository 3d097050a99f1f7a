//! Helpers of the model tests.

use crate::rng::{normal_vec, stream};
use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{BatchNorm, BatchNormConfig, VarBuilder, VarMap};

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

/// A batch norm over `channels` with random scale and shift (and running stats), built twice
/// from the same values: one for a fused op, one for the reference it is checked against.
pub fn batch_norms(channels: usize) -> [(VarMap, BatchNorm); 2] {
    std::array::from_fn(|_| {
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        let bn = candle_nn::batch_norm(channels, BatchNormConfig::default(), vb).unwrap();
        let data = varmap.data().lock().unwrap();
        for (name, seed) in [
            ("weight", 21),
            ("bias", 22),
            ("running_mean", 23),
            ("running_var", 24),
        ] {
            let mut v = input(1, 1, 1, channels, seed).flatten_all().unwrap();
            if name == "running_var" || name == "weight" {
                v = (v.abs().unwrap() + 0.5).unwrap();
            }
            data[name].set(&v).unwrap();
        }
        drop(data);
        (varmap, bn)
    })
}

/// Asserts that two of `batch_norms`' norms, after a training forward each and a backward
/// each (`got` and `want`), have the same scale and shift gradients and running statistics.
pub fn assert_batch_norms_close(
    (got_vars, got_bn, got): (&VarMap, &BatchNorm, &GradStore),
    (want_vars, want_bn, want): (&VarMap, &BatchNorm, &GradStore),
    tol: f32,
    what: &str,
) {
    let (Some(got_params), Some(want_params)) =
        (got_bn.weight_and_bias(), want_bn.weight_and_bias())
    else {
        panic!("{what}: a norm without scale and shift");
    };
    for (g, w, name) in [
        (got_params.0, want_params.0, "gamma"),
        (got_params.1, want_params.1, "beta"),
    ] {
        let (Some(g), Some(w)) = (got.get(g), want.get(w)) else {
            panic!("{what} d{name}: missing gradient");
        };
        assert_close(g, w, tol, &format!("{what} d{name}"));
    }
    for name in ["running_mean", "running_var"] {
        let stat = |m: &VarMap| m.data().lock().unwrap()[name].as_tensor().clone();
        assert_close(
            &stat(got_vars),
            &stat(want_vars),
            tol,
            &format!("{what} {name}"),
        );
    }
}
