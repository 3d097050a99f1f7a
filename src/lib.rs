//! sagan: Self-Attention GANs trained in candle, exported to ONNX, served with ONNX Runtime.
//!
//! The candle-dependent half (models, data, training, checkpoints) sits behind the `train`
//! feature so that the inference binary can be built without it.

pub mod error;
pub mod fsutil;
pub mod image_io;
pub mod logging;
pub mod rng;

#[cfg(feature = "train")]
pub mod checkpoint;
#[cfg(feature = "train")]
pub mod config;
#[cfg(feature = "train")]
pub mod data;
#[cfg(feature = "infer")]
pub mod eval;
#[cfg(feature = "train")]
pub mod export;
#[cfg(feature = "infer")]
pub mod infer;
#[cfg(feature = "train")]
pub mod model;
pub mod ops;
#[cfg(feature = "train")]
pub mod train;

pub use error::{Error, Result};
