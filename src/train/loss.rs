//! Adversarial losses, computed from D's logits.

use crate::config::LossKind;
use candle_core::{Result, Tensor};

/// log(1 + e^x), stable for large |x|.
fn softplus(x: &Tensor) -> Result<Tensor> {
    x.relu()? + x.abs()?.neg()?.exp()?.affine(1.0, 1.0)?.log()?
}

/// The discriminator's loss on real and fake logits.
pub fn discriminator_loss(kind: LossKind, real: &Tensor, fake: &Tensor) -> Result<Tensor> {
    match kind {
        LossKind::Hinge => {
            real.affine(-1.0, 1.0)?.relu()?.mean_all()?
                + fake.affine(1.0, 1.0)?.relu()?.mean_all()?
        }
        LossKind::NonSaturating => {
            softplus(&real.neg()?)?.mean_all()? + softplus(fake)?.mean_all()?
        }
    }
}

/// The generator's loss on the logits D gives its samples.
pub fn generator_loss(kind: LossKind, fake: &Tensor) -> Result<Tensor> {
    match kind {
        LossKind::Hinge => fake.mean_all()?.neg(),
        LossKind::NonSaturating => softplus(&fake.neg()?)?.mean_all(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn t(v: &[f32]) -> Tensor {
        Tensor::new(v, &Device::Cpu).unwrap()
    }

    fn scalar(x: Tensor) -> f32 {
        x.to_scalar::<f32>().unwrap()
    }

    #[test]
    fn hinge_values() {
        // relu(1 - [2, 0.5]) = [0, 0.5] -> 0.25; relu(1 + [-2, 0]) = [0, 1] -> 0.5
        assert_eq!(
            scalar(discriminator_loss(LossKind::Hinge, &t(&[2.0, 0.5]), &t(&[-2.0, 0.0])).unwrap()),
            0.75
        );
        assert_eq!(
            scalar(generator_loss(LossKind::Hinge, &t(&[1.0, 3.0])).unwrap()),
            -2.0
        );
    }

    #[test]
    fn non_saturating_values_and_stability() {
        let ln2 = std::f32::consts::LN_2;
        let d =
            scalar(discriminator_loss(LossKind::NonSaturating, &t(&[0.0]), &t(&[0.0])).unwrap());
        assert!((d - 2.0 * ln2).abs() < 1e-6);
        let g = scalar(generator_loss(LossKind::NonSaturating, &t(&[-100.0, 100.0])).unwrap());
        assert!((g - 50.0).abs() < 1e-4, "{g}");
    }
}
