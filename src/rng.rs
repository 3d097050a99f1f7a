//! Reproducible randomness. candle's CPU RNG cannot be seeded, so every random tensor sagan
//! needs (initial weights, z, data order) comes from a seeded ChaCha stream.

#[cfg(feature = "train")]
pub use seeded_init::{normal_tensor, seeded_var_builder};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::StandardNormal;

/// A ChaCha stream for one purpose (`stream`) of one run (`seed`): streams never overlap, so
/// e.g. the z of step 500 is the same whether or not the run was resumed at step 250.
pub fn stream(seed: u64, stream: u64) -> ChaCha8Rng {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(stream);
    rng
}

/// Stream ids, one per purpose.
pub mod streams {
    pub const INIT_G: u64 = 1;
    pub const INIT_D: u64 = 2;
    pub const FIXED_Z: u64 = 3;
    /// Latents of the FID evaluations during training.
    pub const EVAL_Z: u64 = 4;
    /// Per-step latents use `STEP_Z_BASE + step`.
    pub const STEP_Z_BASE: u64 = 1 << 32;
    /// Per-epoch data permutations use `SHUFFLE_BASE + epoch`.
    pub const SHUFFLE_BASE: u64 = 2 << 32;
}

pub fn normal_vec(rng: &mut impl Rng, len: usize) -> Vec<f32> {
    (0..len)
        .map(|_| rng.sample::<f32, _>(StandardNormal))
        .collect()
}

/// The candle half: seeded tensors and variable initialisation.
#[cfg(feature = "train")]
mod seeded_init {
    use super::normal_vec;
    use candle_core::{DType, Device, Shape, Tensor, Var};
    use candle_nn::var_builder::SimpleBackend;
    use candle_nn::{Init, VarBuilder, VarMap};
    use rand::Rng;
    use rand_chacha::ChaCha8Rng;
    use std::sync::Mutex;

    /// A `[n, dim]` tensor of standard normal latents.
    pub fn normal_tensor(
        rng: &mut impl Rng,
        n: usize,
        dim: usize,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        Tensor::from_vec(normal_vec(rng, n * dim), (n, dim), device)
    }

    /// A `VarMap` backend that draws missing variables from a seeded stream instead of candle's
    /// unseedable RNG. Variables are created in model-construction order, which is deterministic.
    struct SeededBackend {
        varmap: VarMap,
        rng: Mutex<ChaCha8Rng>,
    }

    impl SeededBackend {
        fn sample(
            &self,
            shape: &Shape,
            init: Init,
            device: &Device,
        ) -> candle_core::Result<Tensor> {
            let mut rng = self
                .rng
                .lock()
                .map_err(|_| candle_core::Error::Msg("rng poisoned".into()))?;
            let n = shape.elem_count();
            let values: Vec<f32> = match init {
                Init::Const(c) => vec![c as f32; n],
                Init::Randn { mean, stdev } => normal_vec(&mut *rng, n)
                    .into_iter()
                    .map(|x| (mean + stdev * x as f64) as f32)
                    .collect(),
                Init::Uniform { lo, up } => {
                    (0..n).map(|_| rng.random_range(lo..up) as f32).collect()
                }
                Init::Kaiming {
                    fan, non_linearity, ..
                } => {
                    let std = non_linearity.gain() / (fan.for_shape(shape) as f64).sqrt();
                    normal_vec(&mut *rng, n)
                        .into_iter()
                        .map(|x| (std * x as f64) as f32)
                        .collect()
                }
            };
            Tensor::from_vec(values, shape.clone(), device)
        }
    }

    impl SimpleBackend for SeededBackend {
        fn get(
            &self,
            s: Shape,
            name: &str,
            h: Init,
            dtype: DType,
            dev: &Device,
        ) -> candle_core::Result<Tensor> {
            if self.varmap.contains_tensor(name) {
                return self.varmap.get(s, name, h, dtype, dev);
            }
            let var = Var::from_tensor(&self.sample(&s, h, dev)?.to_dtype(dtype)?)?;
            let tensor = var.as_tensor().clone();
            self.varmap
                .data()
                .lock()
                .map_err(|_| candle_core::Error::Msg("varmap poisoned".into()))?
                .insert(name.to_string(), var);
            Ok(tensor)
        }

        fn get_unchecked(
            &self,
            name: &str,
            dtype: DType,
            dev: &Device,
        ) -> candle_core::Result<Tensor> {
            self.varmap.get_unchecked(name, dtype, dev)
        }

        fn contains_tensor(&self, name: &str) -> bool {
            self.varmap.contains_tensor(name)
        }
    }

    /// A `VarBuilder` over `varmap` whose new variables are initialised from `rng`.
    pub fn seeded_var_builder(
        varmap: &VarMap,
        rng: ChaCha8Rng,
        device: &Device,
    ) -> VarBuilder<'static> {
        let backend = SeededBackend {
            varmap: varmap.clone(),
            rng: Mutex::new(rng),
        };
        VarBuilder::from_backend(Box::new(backend), DType::F32, device.clone())
    }
}

#[cfg(all(test, feature = "train"))]
mod tests {
    use super::*;
    use candle_core::Device;
    use candle_nn::{Init, VarMap};

    fn init_once(seed: u64) -> Vec<f32> {
        let varmap = VarMap::new();
        let vb = seeded_var_builder(&varmap, stream(seed, streams::INIT_G), &Device::Cpu);
        let t = vb
            .get_with_hints(
                (4, 5),
                "w",
                Init::Randn {
                    mean: 0.0,
                    stdev: 0.02,
                },
            )
            .unwrap();
        t.flatten_all().unwrap().to_vec1().unwrap()
    }

    #[test]
    fn same_seed_same_weights_other_seed_other_weights() {
        assert_eq!(init_once(7), init_once(7));
        assert_ne!(init_once(7), init_once(8));
    }

    #[test]
    fn variables_land_in_the_varmap() {
        let varmap = VarMap::new();
        let vb = seeded_var_builder(&varmap, stream(1, 1), &Device::Cpu);
        let t = vb.pp("a").get_with_hints(3, "b", Init::Const(0.5)).unwrap();
        assert_eq!(t.to_vec1::<f32>().unwrap(), vec![0.5; 3]);
        assert!(varmap.data().lock().unwrap().contains_key("a.b"));
    }
}
