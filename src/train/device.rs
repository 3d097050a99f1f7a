//! Where training runs: the CPU (sagan's fused kernels) or an NVIDIA GPU through candle's CUDA
//! backend (candle's own ops; needs a build with the `cuda` feature).

use crate::{Error, Result};
use candle_core::Device;
use std::fmt;
use std::str::FromStr;

/// A `--device` value: `cpu`, `cuda` (the first GPU) or `cuda:N`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceRequest {
    #[default]
    Cpu,
    /// The CUDA device with this ordinal.
    Cuda(usize),
}

impl FromStr for DeviceRequest {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "cpu" => Ok(Self::Cpu),
            "cuda" => Ok(Self::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(Self::Cuda)
                .ok_or_else(|| {
                    format!("'{s}' is not a device: cpu, cuda or cuda:N (N = 0, 1, ...)")
                }),
        }
    }
}

impl fmt::Display for DeviceRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Cpu => f.write_str("cpu"),
            Self::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl DeviceRequest {
    /// The candle device, or why it cannot be had: a build without CUDA support, or no usable
    /// GPU or driver on this machine.
    pub fn open(self) -> Result<Device> {
        match self {
            Self::Cpu => Ok(Device::Cpu),
            Self::Cuda(ordinal) => cuda(ordinal),
        }
    }
}

#[cfg(feature = "cuda")]
fn cuda(ordinal: usize) -> Result<Device> {
    Device::new_cuda(ordinal).map_err(|e| {
        // candle's error spans lines (a backtrace, the driver's wording): keep its first.
        let cause = e.to_string();
        let cause = cause.lines().next().unwrap_or_default().trim().to_string();
        Error::Runtime(format!(
            "--device cuda:{ordinal}: no usable CUDA GPU or driver on this machine ({cause})"
        ))
    })
}

#[cfg(not(feature = "cuda"))]
fn cuda(_ordinal: usize) -> Result<Device> {
    Err(Error::Runtime(
        "this build has no CUDA support: rebuild with --features cuda".into(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_cpu_cuda_and_an_ordinal_and_rejects_the_rest() {
        assert_eq!("cpu".parse(), Ok(DeviceRequest::Cpu));
        assert_eq!("cuda".parse(), Ok(DeviceRequest::Cuda(0)));
        assert_eq!("cuda:3".parse(), Ok(DeviceRequest::Cuda(3)));
        for bad in ["gpu", "cuda:", "cuda:x", "cuda:-1", "CPU", ""] {
            let err = bad.parse::<DeviceRequest>().unwrap_err();
            assert!(err.contains("cpu, cuda or cuda:N"), "{bad}: {err}");
        }
        assert_eq!(DeviceRequest::Cuda(2).to_string(), "cuda:2");
    }

    #[test]
    fn the_cpu_opens_and_cuda_fails_in_one_line_where_it_cannot_run() {
        assert!(DeviceRequest::Cpu.open().unwrap().is_cpu());
        // A CPU build, or a CUDA build on a machine without a GPU (CI has none); with one,
        // the GPU opens.
        match DeviceRequest::Cuda(0).open() {
            Ok(device) => assert!(device.is_cuda()),
            Err(e) => {
                let msg = e.to_string();
                assert!(!msg.contains('\n'), "{msg}");
                let expected = match cfg!(feature = "cuda") {
                    true => "no usable CUDA GPU or driver",
                    false => "this build has no CUDA support: rebuild with --features cuda",
                };
                assert!(msg.contains(expected), "{msg}");
            }
        }
    }
}
