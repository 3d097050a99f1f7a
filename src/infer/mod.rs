//! Serving exported generators with ONNX Runtime (through `ort`), without candle.
//!
//! - [`runtime`] finds `libonnxruntime` and creates the one ONNX Runtime environment a process
//!   may have.
//! - [`generator`] loads and validates a sagan ONNX export, registers the requested execution
//!   provider (strictly: a provider that cannot run is an error, not a silent CPU fallback)
//!   and runs it.
//! - [`gpu`] loads the CUDA, cuDNN and TensorRT libraries of the GPU providers from a known
//!   folder and asks the driver for the device, before a GPU provider registers.
//! - [`latent`] draws the latents: bit-compatible with sagan-train's sample grids, with the
//!   truncation trick and latent interpolation.
//! - [`bench`] summarises latencies.
//! - [`sampling`] draws a request's latents and writes its images, batch by batch.
//! - [`session`] is one sagan-infer invocation, from its flags ([`cli`]) to the written files.

pub mod bench;
pub mod cli;
pub mod generator;
pub mod gpu;
pub mod latent;
pub mod metadata;
pub mod runtime;
pub mod sampling;
pub mod session;

pub use generator::{Generated, Generator, LoadOptions, Provider, TensorRtOptions, CLASS_INPUT};
pub use latent::{interpolate, latents, truncated_latents, Interpolation};
pub use metadata::SaganMetadata;
pub use runtime::{LibrarySearch, Runtime};

use std::path::PathBuf;

/// The command that installs the CPU runtime where [`LibrarySearch`] looks first.
pub const INSTALL_CPU: &str = "tools/install-onnxruntime.sh";
/// The command that installs the GPU runtime (CUDA and TensorRT providers).
pub const INSTALL_GPU: &str = "tools/install-onnxruntime.sh gpu";

/// Errors of the inference half. Each says what to do about it in one line: the binary prints
/// `error: {e}` and exits.
#[derive(Debug, thiserror::Error)]
pub enum InferError {
    /// No candidate library could be loaded; `tried` lists every path with its loader error.
    #[error("ONNX Runtime not found (tried: {tried}); install it with: {install}")]
    RuntimeNotFound {
        tried: String,
        install: &'static str,
    },

    /// A library the user named explicitly (`--ort-lib`, `ORT_DYLIB_PATH`) failed to load.
    #[error("cannot load ONNX Runtime from {path} ({source_msg}); fix the path or install it with: {install}")]
    RuntimeLoad {
        path: PathBuf,
        source_msg: String,
        install: &'static str,
    },

    /// ONNX Runtime loaded but an environment could not be created from it.
    #[error("ONNX Runtime ({path}): {msg}")]
    Environment { path: PathBuf, msg: String },

    /// The model file is missing, not ONNX, or not a generator we can drive.
    #[error("{path}: {}", crate::error::one_line(.msg))]
    Model { path: PathBuf, msg: String },

    /// The requested execution provider cannot run here.
    #[error("{provider} execution provider unavailable: {msg}{hint}; use --fallback cpu to run on the CPU instead")]
    Provider {
        provider: &'static str,
        msg: String,
        /// A trailing sentence such as the install command, starting with "; " (or empty).
        hint: String,
    },

    /// A run of the model failed, or returned something that does not match its declaration.
    #[error("{path}: inference failed: {}", crate::error::one_line(.msg))]
    Run { path: PathBuf, msg: String },

    /// An argument out of range (a count of 0, a non-positive truncation, ...).
    #[error("{0}")]
    Invalid(String),

    /// `error` happened while `doing` something worth naming (e.g. the warm-up runs of a
    /// benchmark).
    #[error("{doing}: {error}")]
    During {
        doing: &'static str,
        error: Box<InferError>,
    },

    /// A failure outside the runtime: reading data, writing images or reports.
    #[error(transparent)]
    Sagan(#[from] crate::Error),
}

pub type InferResult<T> = std::result::Result<T, InferError>;

/// For library code outside this module that runs ONNX Runtime (FID during training): the
/// crate's error keeps the message and holds no `ort` value.
impl From<InferError> for crate::Error {
    fn from(e: InferError) -> Self {
        match e {
            InferError::Sagan(e) => e,
            e => crate::Error::Runtime(e.to_string()),
        }
    }
}
