//! Exponential moving average of the generator's weights.

use crate::checkpoint::varmap_tensors;
use crate::config::ModelConfig;
use crate::model::Generator;
use crate::ops::optimizer;
use candle_core::{DType, Device, Result, Var};
use candle_nn::{VarBuilder, VarMap};
use std::collections::HashSet;

/// A second generator whose trained weights follow G's as ema = decay * ema + (1 - decay) * w.
/// Buffers (batch-norm statistics, spectral-norm vectors) are copied, not averaged, as
/// StudioGAN and BigGAN do: an average of unit vectors is not a unit vector.
pub struct Ema {
    decay: f64,
    varmap: VarMap,
    generator: Generator,
}

impl Ema {
    /// Starts as a copy of `source`.
    pub fn new(source: &VarMap, cfg: &ModelConfig, decay: f64, device: &Device) -> Result<Self> {
        let varmap = VarMap::new();
        {
            let mut data = varmap.data().lock().unwrap_or_else(|e| e.into_inner());
            for (name, tensor) in varmap_tensors(source) {
                data.insert(name, Var::from_tensor(&tensor.copy()?)?);
            }
        }
        let generator = Generator::new(VarBuilder::from_varmap(&varmap, DType::F32, device), cfg)?;
        Ok(Self {
            decay,
            varmap,
            generator,
        })
    }

    pub fn varmap(&self) -> &VarMap {
        &self.varmap
    }

    pub fn generator(&self) -> &Generator {
        &self.generator
    }

    /// Folds in G's weights after its `step`-th update. The decay ramps up as
    /// min(decay, (1 + step) / (10 + step)), so that early in training the average is not
    /// dominated by the random initial weights.
    pub fn update(&self, source: &VarMap, trained: &HashSet<&str>, step: usize) -> Result<()> {
        let decay = self.decay.min((1.0 + step as f64) / (10.0 + step as f64));
        let data = self.varmap.data().lock().unwrap_or_else(|e| e.into_inner());
        for (name, value) in varmap_tensors(source) {
            let Some(avg) = data.get(&name) else { continue };
            if trained.contains(name.as_str()) {
                if optimizer::supported(avg.as_tensor()) && optimizer::supported(&value) {
                    let lerp = optimizer::Lerp {
                        keep: decay,
                        square: false,
                    };
                    avg.as_tensor().inplace_op2(&value, &lerp)?;
                } else {
                    avg.set(&((avg.as_tensor() * decay)? + (value * (1.0 - decay))?)?)?;
                }
            } else {
                avg.set(&value)?;
            }
        }
        Ok(())
    }
}
