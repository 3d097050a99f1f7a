//! The NVIDIA driver (`libcuda.so.1`), asked through its C API whether it can run CUDA and sees a
//! device, before a CUDA library meets it: ONNX Runtime's GPU providers (`infer::gpu`) and
//! candle's CUDA backend (`train::device`) would report a missing driver or device as a failed
//! load or a panic. No candle and no ONNX Runtime: both halves use it.

use std::ffi::{c_char, c_int, c_uint, CStr};
use std::sync::OnceLock;

/// The driver's library: only an NVIDIA driver install provides it.
pub const DRIVER: &str = "libcuda.so.1";
/// How every error about the device begins.
pub const NO_DEVICE: &str = "no CUDA-capable device";

/// The loader's own words (`dlerror`) without libloading's prefix.
pub fn loader_reason(e: &libloading::Error) -> String {
    match std::error::Error::source(e) {
        Some(reason) => reason.to_string(),
        None => e.to_string(),
    }
}

/// `CUresult` of the driver API.
type CuResult = c_int;
const CUDA_SUCCESS: CuResult = 0;

/// The loaded driver library.
pub struct Driver(libloading::Library);

impl Driver {
    /// The driver, loaded on first use and kept: the CUDA libraries loaded later link the same
    /// one.
    pub fn load() -> Result<&'static Driver, String> {
        static DRIVER_LIBRARY: OnceLock<Result<Driver, String>> = OnceLock::new();
        DRIVER_LIBRARY
            .get_or_init(|| {
                // SAFETY: the NVIDIA driver's library has no initialisers with preconditions.
                unsafe { libloading::Library::new(DRIVER) }
                    .map(Driver)
                    .map_err(|e| {
                        format!(
                            "{NO_DEVICE}: the NVIDIA driver is not installed ({})",
                            loader_reason(&e)
                        )
                    })
            })
            .as_ref()
            .map_err(Clone::clone)
    }

    /// The number of CUDA devices the driver sees, at least one, where it supports CUDA
    /// `cuda_major` (`user`, what needs that version, is named in the error): "no CUDA-capable
    /// device is detected (CUDA error 100)", or the driver's other reasons behind
    /// "no CUDA-capable device: ".
    pub fn devices(&self, cuda_major: c_int, user: &str) -> Result<c_int, String> {
        // SAFETY: the signatures are those of the CUDA driver API (cuda.h), stable since CUDA 2.
        unsafe {
            let symbol_error = |e: libloading::Error| format!("{DRIVER}: {e}");
            let init: libloading::Symbol<unsafe extern "C" fn(c_uint) -> CuResult> =
                self.0.get(b"cuInit\0").map_err(symbol_error)?;
            let version: libloading::Symbol<unsafe extern "C" fn(*mut c_int) -> CuResult> =
                self.0.get(b"cuDriverGetVersion\0").map_err(symbol_error)?;
            let count: libloading::Symbol<unsafe extern "C" fn(*mut c_int) -> CuResult> =
                self.0.get(b"cuDeviceGetCount\0").map_err(symbol_error)?;
            let error_string: libloading::Symbol<
                unsafe extern "C" fn(CuResult, *mut *const c_char) -> CuResult,
            > = self.0.get(b"cuGetErrorString\0").map_err(symbol_error)?;
            let failed = |code: CuResult| {
                let mut text: *const c_char = std::ptr::null();
                let text = if error_string(code, &mut text) == CUDA_SUCCESS && !text.is_null() {
                    format!(
                        "{} (CUDA error {code})",
                        CStr::from_ptr(text).to_string_lossy()
                    )
                } else {
                    format!("CUDA error {code}")
                };
                if text.starts_with(NO_DEVICE) {
                    text
                } else {
                    format!("{NO_DEVICE}: the driver says {text}")
                }
            };
            let mut driver_version = 0;
            if version(&mut driver_version) == CUDA_SUCCESS && driver_version < cuda_major * 1000 {
                // CUDA 13's first driver (CUDA's release notes).
                let driver = if cuda_major == 13 {
                    " (driver 580 or newer)"
                } else {
                    ""
                };
                return Err(format!(
                    "the NVIDIA driver supports CUDA {}.{}; {user} need CUDA {cuda_major}{driver}",
                    driver_version / 1000,
                    driver_version % 1000 / 10
                ));
            }
            let code = init(0);
            if code != CUDA_SUCCESS {
                return Err(failed(code));
            }
            let mut devices = 0;
            let code = count(&mut devices);
            if code != CUDA_SUCCESS {
                return Err(failed(code));
            }
            if devices == 0 {
                return Err(format!("{NO_DEVICE}: the driver reports none"));
            }
            Ok(devices)
        }
    }
}
