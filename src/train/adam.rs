//! Adam whose state is ours to checkpoint: candle's AdamW keeps its moments private, and an
//! exact resume needs them.

use candle_core::backprop::GradStore;
use candle_core::{DType, Result, Tensor, Var};
use candle_nn::VarMap;
use std::collections::{BTreeMap, HashMap};

use crate::ops::optimizer;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
}

/// Adam (Kingma & Ba) with bias correction. Moments exist only for variables that have
/// received a gradient, so buffers such as batch-norm statistics and spectral-norm vectors,
/// which live in the same VarMap, are never touched.
pub struct Adam {
    cfg: AdamConfig,
    vars: Vec<(String, Var)>,
    moments: BTreeMap<String, (Tensor, Tensor)>,
    steps: u64,
}

/// One variable's Adam step from its moments `(m, v)` and gradient; returns the new moments.
/// `in_place` updates the three buffers with the fused CPU kernels (`ops::optimizer`), which round
/// exactly as the composed candle ops do.
fn update(
    var: &Var,
    (m, v): (Tensor, Tensor),
    grad: &Tensor,
    cfg: AdamConfig,
    (correction1, correction2): (f64, f64),
    in_place: bool,
) -> Result<(Tensor, Tensor)> {
    let AdamConfig {
        lr,
        beta1,
        beta2,
        eps,
    } = cfg;
    if in_place {
        let moment = |keep, square| optimizer::Lerp { keep, square };
        m.inplace_op2(grad, &moment(beta1, false))?;
        v.inplace_op2(grad, &moment(beta2, true))?;
        let apply = optimizer::AdamApply {
            lr,
            correction1,
            correction2,
            eps,
        };
        var.as_tensor().inplace_op3(&m, &v, &apply)?;
        return Ok((m, v));
    }
    let m = ((m * beta1)? + (grad * (1.0 - beta1))?)?;
    let v = ((v * beta2)? + (grad.sqr()? * (1.0 - beta2))?)?;
    let update = ((&m / correction1)? / ((&v / correction2)?.sqrt()? + eps)?)?;
    var.set(&(var.as_tensor() - (update * lr)?)?)?;
    Ok((m, v))
}

impl Adam {
    pub fn new(varmap: &VarMap, cfg: AdamConfig) -> Self {
        let data = varmap.data().lock().unwrap_or_else(|e| e.into_inner());
        let mut vars: Vec<_> = data.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        Self {
            cfg,
            vars,
            moments: BTreeMap::new(),
            steps: 0,
        }
    }

    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// Names of the variables this optimizer trains (those that have had a gradient).
    pub fn trained(&self) -> impl Iterator<Item = &str> {
        self.moments.keys().map(String::as_str)
    }

    pub fn step(&mut self, grads: &GradStore) -> Result<()> {
        self.steps += 1;
        let AdamConfig { beta1, beta2, .. } = self.cfg;
        let correction1 = 1.0 - beta1.powi(self.steps as i32);
        let correction2 = 1.0 - beta2.powi(self.steps as i32);
        for (name, var) in &self.vars {
            let Some(grad) = grads.get(var.as_tensor()) else {
                continue;
            };
            // A variable's gradient still references the step's graph; the moments outlive
            // the step, so they must not keep it (and every step's activations) alive.
            let grad = grad.detach();
            let (m, v) = match self.moments.get(name) {
                Some(state) => state.clone(),
                None => (grad.zeros_like()?, grad.zeros_like()?),
            };
            let in_place = [var.as_tensor(), &m, &v, &grad]
                .into_iter()
                .all(optimizer::supported);
            let corrections = (correction1, correction2);
            let (m, v) = update(var, (m, v), &grad, self.cfg, corrections, in_place)?;
            self.moments.insert(name.clone(), (m, v));
        }
        Ok(())
    }

    /// The state as named tensors under `prefix`: `{prefix}.m.{var}`, `{prefix}.v.{var}`, `{prefix}.steps`.
    pub fn state(&self, prefix: &str) -> Result<Vec<(String, Tensor)>> {
        let mut out = vec![(
            format!("{prefix}.steps"),
            Tensor::new(&[self.steps as i64], &candle_core::Device::Cpu)?,
        )];
        for (name, (m, v)) in &self.moments {
            out.push((format!("{prefix}.m.{name}"), m.clone()));
            out.push((format!("{prefix}.v.{name}"), v.clone()));
        }
        Ok(out)
    }

    /// Restores what `state` wrote under `prefix`.
    pub fn load_state(
        &mut self,
        tensors: &HashMap<String, Tensor>,
        prefix: &str,
    ) -> std::result::Result<(), String> {
        let steps = tensors
            .get(&format!("{prefix}.steps"))
            .ok_or_else(|| format!("lacks '{prefix}.steps'"))?;
        let steps = steps
            .to_dtype(DType::I64)
            .and_then(|s| s.to_vec1::<i64>())
            .map_err(|e| e.to_string())?;
        self.steps = *steps.first().ok_or("empty step count")? as u64;
        self.moments.clear();
        for (name, var) in &self.vars {
            let m = tensors.get(&format!("{prefix}.m.{name}"));
            let v = tensors.get(&format!("{prefix}.v.{name}"));
            match (m, v) {
                (Some(m), Some(v)) if m.shape() == var.shape() && v.shape() == var.shape() => {
                    let to_device =
                        |t: &Tensor| t.to_device(var.device()).map_err(|e| e.to_string());
                    self.moments
                        .insert(name.clone(), (to_device(m)?, to_device(v)?));
                }
                (None, None) => {}
                _ => return Err(format!("moments of '{name}' are missing or misshapen")),
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn matches_the_closed_form_first_steps() {
        // With a constant gradient g, bias-corrected Adam moves every weight by lr * g/|g| (up to eps).
        let varmap = VarMap::new();
        let w = varmap
            .get(
                3,
                "w",
                candle_nn::Init::Const(1.0),
                DType::F32,
                &Device::Cpu,
            )
            .unwrap();
        let mut opt = Adam::new(
            &varmap,
            AdamConfig {
                lr: 0.1,
                beta1: 0.0,
                beta2: 0.9,
                eps: 1e-8,
            },
        );
        for step in 1..=3 {
            let loss = (&w * Tensor::new(&[2f32, -3., 0.5], &Device::Cpu).unwrap())
                .unwrap()
                .sum_all()
                .unwrap();
            opt.step(&loss.backward().unwrap()).unwrap();
            let got = w.to_vec1::<f32>().unwrap();
            let expected = [
                1.0 - 0.1 * step as f32,
                1.0 + 0.1 * step as f32,
                1.0 - 0.1 * step as f32,
            ];
            for (g, e) in got.iter().zip(expected) {
                assert!((g - e).abs() < 1e-5, "step {step}: {got:?}");
            }
        }
    }

    #[test]
    fn in_place_kernels_give_the_composed_ops_numbers_bit_for_bit() {
        let cfg = AdamConfig {
            lr: 4e-4,
            beta1: 0.5,
            beta2: 0.999,
            eps: 1e-8,
        };
        let data = |seed: u64| {
            let v = crate::rng::normal_vec(&mut crate::rng::stream(seed, 1), 1000);
            Tensor::from_vec(v, 1000, &Device::Cpu).unwrap()
        };
        let (w0, g, m0) = (data(1), data(2), data(3));
        let v0 = data(4).sqr().unwrap();
        let results: Vec<Vec<Vec<f32>>> = [true, false]
            .into_iter()
            .map(|in_place| {
                let var = Var::from_tensor(&w0.copy().unwrap()).unwrap();
                let moments = (m0.copy().unwrap(), v0.copy().unwrap());
                let (m, v) = update(&var, moments, &g, cfg, (0.75, 0.002), in_place).unwrap();
                [var.as_tensor(), &m, &v]
                    .map(|t| t.to_vec1::<f32>().unwrap())
                    .to_vec()
            })
            .collect();
        assert_eq!(results[0], results[1]);
    }

    #[test]
    fn state_round_trips_and_skips_gradientless_buffers() {
        let varmap = VarMap::new();
        let w = varmap
            .get(
                2,
                "w",
                candle_nn::Init::Const(1.0),
                DType::F32,
                &Device::Cpu,
            )
            .unwrap();
        varmap
            .get(
                2,
                "running_mean",
                candle_nn::Init::Const(0.0),
                DType::F32,
                &Device::Cpu,
            )
            .unwrap();
        let mut opt = Adam::new(
            &varmap,
            AdamConfig {
                lr: 0.1,
                beta1: 0.5,
                beta2: 0.9,
                eps: 1e-8,
            },
        );
        opt.step(&w.sqr().unwrap().sum_all().unwrap().backward().unwrap())
            .unwrap();
        assert_eq!(opt.trained().collect::<Vec<_>>(), vec!["w"]);
        let state: HashMap<_, _> = opt.state("g").unwrap().into_iter().collect();
        let mut restored = Adam::new(&varmap, opt.cfg);
        restored.load_state(&state, "g").unwrap();
        assert_eq!(restored.steps(), 1);
        assert_eq!(
            restored.moments["w"].1.to_vec1::<f32>().unwrap(),
            opt.moments["w"].1.to_vec1::<f32>().unwrap()
        );
    }
}
