//! Command-line options shared by the binaries that run ONNX Runtime.

use super::{LibrarySearch, Provider, TensorRtOptions};
use clap::ValueEnum;
use std::path::PathBuf;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ProviderArg {
    Cpu,
    Cuda,
    Tensorrt,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum FallbackArg {
    Cpu,
}

/// Where ONNX Runtime runs: `#[command(flatten)]` into a binary's arguments.
#[derive(clap::Args, Clone, Debug)]
pub struct ProviderArgs {
    /// Execution provider. A provider that cannot run here is an error (see --fallback).
    #[arg(long, value_enum, default_value_t = ProviderArg::Cpu)]
    pub provider: ProviderArg,

    /// Run on the CPU, with a warning, when --provider cannot be used.
    #[arg(long, value_enum, value_name = "cpu")]
    pub fallback: Option<FallbackArg>,

    /// GPU to run on (cuda, tensorrt).
    #[arg(long, default_value_t = 0, value_name = "N")]
    pub device_id: i32,

    /// The ONNX Runtime library (libonnxruntime.so*) to load; overrides $ORT_DYLIB_PATH.
    #[arg(long, value_name = "PATH")]
    pub ort_lib: Option<PathBuf>,

    /// Folder with the CUDA, cuDNN and TensorRT libraries for cuda and tensorrt (a folder of
    /// .so files, a Python site-packages, or a .onnxruntime/gpu install); repeatable; overrides
    /// $SAGAN_CUDA_LIBS. Looked in first, then the GPU install of tools/install-onnxruntime.sh
    /// gpu, a Python environment's NVIDIA wheels, and the system. No LD_LIBRARY_PATH needed.
    #[arg(long, value_name = "DIR")]
    pub cuda_libs: Vec<PathBuf>,
}

impl ProviderArgs {
    pub fn fallback_cpu(&self) -> bool {
        self.fallback.is_some()
    }

    /// Where to look for ONNX Runtime; a GPU provider prefers the GPU install.
    pub fn library_search(&self) -> LibrarySearch {
        LibrarySearch {
            cuda_libs: self.cuda_libs.clone(),
            ..LibrarySearch::from_process(self.ort_lib.clone(), self.provider != ProviderArg::Cpu)
        }
    }

    /// The provider asked for; `tensorrt` holds the binary's TensorRT settings (its device
    /// is --device-id's).
    pub fn provider(&self, tensorrt: TensorRtOptions) -> Provider {
        match self.provider {
            ProviderArg::Cpu => Provider::Cpu,
            ProviderArg::Cuda => Provider::Cuda {
                device_id: self.device_id,
            },
            ProviderArg::Tensorrt => Provider::TensorRt(TensorRtOptions {
                device_id: self.device_id,
                ..tensorrt
            }),
        }
    }
}
