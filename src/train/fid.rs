//! FID while training: the sampling generator's images against the training data, through a
//! feature network run by ONNX Runtime.

use crate::data::Dataset;
use crate::eval::{summarise, EvalReport, FeatureNet, Statistics};
use crate::model::Generator;
use crate::Result;
use candle_core::Tensor;

/// Images per feature-network run.
const BATCH: usize = 100;

pub struct FidMonitor {
    net: FeatureNet,
    real: Statistics,
    count: usize,
    every: usize,
}

impl FidMonitor {
    /// Computes the real statistics from `count` images spread evenly over `data`.
    pub fn new(mut net: FeatureNet, data: &Dataset, count: usize, every: usize) -> Result<Self> {
        let count = count.min(data.len());
        let indices: Vec<usize> = (0..count).map(|i| i * data.len() / count).collect();
        let shape = [data.channels(), data.size(), data.size()];
        let real = summarise(&mut net, count, BATCH, shape, |range, out| {
            data.fill_batch(&indices[range], out);
            Ok(())
        })?
        .stats;
        Ok(Self {
            net,
            real,
            count,
            every,
        })
    }

    /// Evaluate every this many steps.
    pub fn every(&self) -> usize {
        self.every
    }

    /// Images evaluated each time.
    pub fn count(&self) -> usize {
        self.count
    }

    /// FID of `generator` (evaluation mode) on the latents `z` [count, z_dim] and, for a
    /// class-conditional model, their classes [count].
    pub fn fid(
        &mut self,
        generator: &Generator,
        z: &Tensor,
        classes: Option<&Tensor>,
    ) -> Result<f64> {
        let part = |start: usize, len: usize| -> candle_core::Result<Tensor> {
            let classes = classes.map(|c| c.narrow(0, start, len)).transpose()?;
            generator.forward(&z.narrow(0, start, len)?, classes.as_ref(), false)
        };
        let (_, c, h, w) = part(0, 1)?.dims4()?;
        let summary = summarise(&mut self.net, self.count, BATCH, [c, h, w], |range, out| {
            let images = part(range.start, range.len())
                .and_then(|x| x.flatten_all()?.to_vec1::<f32>())
                .map_err(|e| crate::infer::InferError::Invalid(e.to_string()))?;
            out.extend(images);
            Ok(())
        })?;
        Ok(EvalReport::new(&self.real, &summary, 1)?.fid)
    }
}
