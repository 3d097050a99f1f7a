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
    let failed = |cause: &str| {
        Error::Runtime(format!(
            "--device cuda:{ordinal}: {}",
            crate::error::one_line(cause)
        ))
    };
    cuda_probe::check(ordinal).map_err(|e| failed(&e))?;
    Device::new_cuda(ordinal).map_err(|e| {
        // candle's error spans lines (a backtrace, the driver's wording): keep its first.
        let cause = e.to_string();
        let cause = cause.lines().next().unwrap_or_default().trim();
        failed(&format!("candle cannot open the GPU ({cause})"))
    })
}

/// What candle's CUDA backend needs to open a device, checked before it runs: cudarc (its CUDA
/// binding) opens the driver and the CUDA libraries on first use, and panics where one is
/// missing (or, where it links them, the binary does not start at all).
#[cfg(feature = "cuda")]
mod cuda_probe {
    use crate::cuda_driver::{loader_reason, Driver};
    use candle_core::cuda_backend::cudarc::driver::sys::CUDA_VERSION;
    use std::env::consts::{DLL_PREFIX, DLL_SUFFIX};

    /// The CUDA version cudarc's bindings were built for, major and minor (13, 4).
    const MAJOR: u32 = CUDA_VERSION / 1000;
    const MINOR: u32 = CUDA_VERSION % 1000 / 10;

    /// The libraries opening a device loads: cudarc's names and how users know them. cuBLAS
    /// loads cuBLASLt itself; NVRTC is only loaded to compile kernels, and candle's are
    /// compiled at build time.
    const LIBRARIES: &[(&str, &str)] = &[("cublas", "cuBLAS"), ("curand", "cuRAND")];

    /// The driver, a device with this ordinal, then the libraries.
    pub fn check(ordinal: usize) -> Result<(), String> {
        let devices = Driver::load()?.devices(MAJOR as i32, "this build's CUDA libraries")?;
        if ordinal >= devices as usize {
            return Err(format!(
                "the driver reports {devices} CUDA device(s), 0 to {}",
                devices - 1
            ));
        }
        LIBRARIES
            .iter()
            .try_for_each(|&(lib, known_as)| library(lib, known_as))
    }

    /// Whether the loader finds `lib` under one of the names cudarc tries for it; if not, the
    /// loader's reason for its CUDA soname (`libcublas.so.13`) and where to get it.
    pub(super) fn library(lib: &str, known_as: &str) -> Result<(), String> {
        // SAFETY: the CUDA libraries have no initialisers with preconditions.
        let loads = |name: &String| unsafe { libloading::Library::new(name) };
        if let Some(found) = candidates(lib).iter().find_map(|name| loads(name).ok()) {
            // Left loaded: cudarc opens it next.
            std::mem::forget(found);
            return Ok(());
        }
        let soname = format!("{DLL_PREFIX}{lib}{DLL_SUFFIX}.{MAJOR}");
        let reason = loads(&soname).err().map_or(soname, |e| loader_reason(&e));
        Err(format!(
            "cannot load {known_as} ({reason}): put CUDA {MAJOR}'s libraries on LD_LIBRARY_PATH \
             (e.g. .onnxruntime/gpu/nvidia/cu{MAJOR}/lib, installed by \
             tools/install-onnxruntime.sh gpu)"
        ))
    }

    /// The file names cudarc tries for `lib`, in its order (its `get_lib_name_candidates`, for
    /// a 64-bit target).
    pub(super) fn candidates(lib: &str) -> Vec<String> {
        let name = |tail: String| format!("{DLL_PREFIX}{lib}{tail}");
        let (major, minor, s) = (MAJOR, MINOR, DLL_SUFFIX);
        let mut out: Vec<String> = [
            String::new(),
            "64".into(),
            format!("64_{major}"),
            format!("64_{major}{minor}"),
            format!("64_{major}{minor}_0"),
            format!("64_{major}0_{minor}"),
            "64_10".into(),
            "64_11".into(),
            "64_12".into(),
            format!("64_{major}0_0"),
            "64_9".into(),
        ]
        .into_iter()
        .map(|stem| name(format!("{stem}{s}")))
        .collect();
        for version in [major, 12, 11, 10, 9, 1] {
            out.push(name(format!("{s}.{version}")));
        }
        out
    }
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
                    true => "--device cuda:0: ",
                    false => "this build has no CUDA support: rebuild with --features cuda",
                };
                assert!(msg.starts_with(expected), "{msg}");
            }
        }
    }

    #[cfg(feature = "cuda")]
    #[test]
    fn a_missing_cuda_library_is_named_with_its_soname() {
        let names = cuda_probe::candidates("cublas");
        assert_eq!(names.len(), 17, "{names:?}");
        assert_eq!(names[0], "libcublas.so");
        let err = cuda_probe::library("sagan-missing", "Missing").unwrap_err();
        assert!(
            err.starts_with("cannot load Missing (libsagan-missing.so.1"),
            "{err}"
        );
        assert!(err.contains("cannot open shared object file"), "{err}");
        assert!(err.contains("LD_LIBRARY_PATH"), "{err}");
    }
}
