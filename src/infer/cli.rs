//! Command-line options shared by the binaries that run ONNX Runtime.

use super::{InferError, InferResult, LibrarySearch, LoadOptions, Provider, TensorRtOptions};
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

    /// How to load a model on the provider asked for, with `tensorrt`'s settings there.
    pub fn load_options(
        &self,
        tensorrt: TensorRtOptions,
        threads: Option<usize>,
        z_dim: Option<usize>,
    ) -> LoadOptions {
        LoadOptions {
            provider: self.provider(tensorrt),
            fallback_cpu: self.fallback_cpu(),
            threads,
            z_dim,
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

/// sagan-infer's TensorRT settings: `#[command(flatten)]` after [`ProviderArgs`].
#[derive(clap::Args, Clone, Debug, Default)]
pub struct TensorRtArgs {
    /// TensorRT: keep built engines and timing caches in DIR (first run builds, later runs load).
    #[arg(long, value_name = "DIR")]
    pub trt_cache: Option<PathBuf>,

    /// TensorRT: allow fp16 kernels.
    #[arg(long)]
    pub trt_fp16: bool,

    /// TensorRT: batch sizes of the optimisation profile [default: 1,BATCH,BATCH].
    #[arg(long, value_name = "MIN,OPT,MAX", value_parser = parse_batch_profile)]
    pub trt_batch: Option<[usize; 3]>,
}

impl TensorRtArgs {
    /// The TensorRT options for runs of `batch` images; these flags only apply to `tensorrt`.
    pub fn options(&self, provider: ProviderArg, batch: usize) -> InferResult<TensorRtOptions> {
        let given = self.trt_cache.is_some() || self.trt_fp16 || self.trt_batch.is_some();
        if given && provider != ProviderArg::Tensorrt {
            return Err(InferError::Invalid(
                "--trt-cache, --trt-fp16 and --trt-batch need --provider tensorrt".into(),
            ));
        }
        Ok(TensorRtOptions {
            cache_dir: self.trt_cache.clone(),
            fp16: self.trt_fp16,
            batch_profile: Some(self.trt_batch.unwrap_or([1, batch, batch])),
            ..Default::default()
        })
    }
}

fn parse_batch_profile(s: &str) -> Result<[usize; 3], String> {
    let parts: Vec<usize> = s
        .split(',')
        .map(|p| p.trim().parse::<usize>())
        .collect::<Result<_, _>>()
        .map_err(|_| format!("'{s}' is not MIN,OPT,MAX (three positive integers)"))?;
    match parts[..] {
        [min, opt, max] if min >= 1 && min <= opt && opt <= max => Ok([min, opt, max]),
        _ => Err(format!(
            "'{s}' is not MIN,OPT,MAX with 1 <= MIN <= OPT <= MAX"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_profiles_must_be_ordered_positive_triples() {
        assert_eq!(parse_batch_profile("1, 8,64"), Ok([1, 8, 64]));
        for bad in [
            "0,1,1", "2,1,4", "1,4,2", "1,2", "1,2,3,4", "a,b,c", "-1,2,3",
        ] {
            assert!(parse_batch_profile(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn tensorrt_flags_need_the_tensorrt_provider() {
        let fp16 = TensorRtArgs {
            trt_fp16: true,
            ..Default::default()
        };
        let err = fp16.options(ProviderArg::Cuda, 4).unwrap_err();
        assert!(
            err.to_string().contains("need --provider tensorrt"),
            "{err}"
        );
        let options = fp16.options(ProviderArg::Tensorrt, 4).unwrap();
        assert!(options.fp16);
        assert_eq!(options.batch_profile, Some([1, 4, 4]));
        let plain = TensorRtArgs::default()
            .options(ProviderArg::Cpu, 2)
            .unwrap();
        assert_eq!(plain.batch_profile, Some([1, 2, 2]));
    }
}
