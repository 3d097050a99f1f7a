//! sagan: Self-Attention GANs trained in candle, exported to ONNX, served with ONNX Runtime.
//!
//! The candle-dependent half (the models and their kernels, training, checkpoints, export)
//! sits behind the `train` feature so that the inference binary can be built without it;
//! presets (`config`) and datasets (`data`) need no candle.

pub mod config;
#[cfg(feature = "infer")]
pub mod cuda_driver;
pub mod data;
pub mod error;
pub mod fsutil;
pub mod image_io;
pub mod logging;
pub mod ops;
pub mod rng;
pub mod sysmem;

#[cfg(feature = "train")]
pub mod checkpoint;
#[cfg(feature = "infer")]
pub mod eval;
#[cfg(feature = "train")]
pub mod export;
#[cfg(feature = "infer")]
pub mod infer;
#[cfg(feature = "train")]
pub mod model;
#[cfg(feature = "train")]
pub mod train;

pub use error::{Error, Result};
