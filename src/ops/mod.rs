//! The CPU kernels under the layers: candle custom ops with their own backward (convolutions,
//! bias/batch norm + activation, attention, softmax, spectral normalisation), the optimizer's
//! in-place updates, and the gradient hand-off between them. The layers in `model` call them;
//! nothing here depends on a layer, a network or a preset.

pub(crate) mod attention;
pub mod channel;
pub mod conv;
mod cpu;
pub(crate) mod handoff;
pub(crate) mod optimizer;
pub mod softmax;
pub(crate) mod spectral_norm;

#[cfg(test)]
pub(crate) mod testing;
