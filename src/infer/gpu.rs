//! The libraries of the GPU providers (CUDA 13, cuDNN 9, TensorRT 10) and the NVIDIA driver,
//! made ready before ONNX Runtime registers a CUDA or TensorRT provider.
//!
//! ONNX Runtime's provider libraries name their dependencies by soname (`libcublasLt.so.13`,
//! ...), and the dynamic loader resolves a soname to a library already in the process before it
//! searches the disk. Loading each library first, by its full path, from a folder chosen here
//! decides where they come from: no LD_LIBRARY_PATH. The folders, in order:
//!
//! 1. `--cuda-libs DIR` (else `$SAGAN_CUDA_LIBS`, a `:`-separated list);
//! 2. the GPU install of `tools/install-onnxruntime.sh gpu`: beside the loaded ONNX Runtime
//!    (`X/lib/libonnxruntime.so` -> `X`), and `.onnxruntime/gpu` under the search roots;
//! 3. a Python environment's NVIDIA wheels (`site-packages/nvidia/cu13/lib`, `nvidia/cudnn/lib`,
//!    `tensorrt_libs`, where a PyTorch CUDA 13 install keeps them): `$VIRTUAL_ENV`,
//!    `$CONDA_PREFIX`, then what `python3` reports as its site-packages;
//! 4. the system's library path (ldconfig), by soname.
//!
//! Each folder is searched as it is and through the wheels' layout below it, so DIR may be a
//! folder of `.so` files, a site-packages folder or a `.onnxruntime/gpu` install.

use super::generator::Provider;
pub use crate::cuda_driver::NO_DEVICE;
use crate::cuda_driver::{loader_reason, Driver, DRIVER};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// The environment variable that names library folders when `--cuda-libs` is not given.
pub const SAGAN_CUDA_LIBS: &str = "SAGAN_CUDA_LIBS";

/// Where the NVIDIA wheels keep their libraries, below a site-packages (or GPU install) folder.
const WHEEL_LAYOUT: &[&str] = &["nvidia/cu13/lib", "nvidia/cudnn/lib", "tensorrt_libs"];

/// TensorRT 10's libraries, dependencies first: the TensorRT provider links `libnvinfer` and
/// `libnvonnxparser`; TensorRT opens its plugins and builder resource by name at run time.
const TENSORRT_DYLIBS: &[&str] = &["libnvinfer.so.10", "libnvonnxparser.so.10"];
const TENSORRT_OPTIONAL_PREFIXES: &[&str] = &[
    "libnvinfer_builder_resource.so.10",
    "libnvinfer_plugin.so.10",
];

/// Where to look for the GPU libraries (see the module documentation for the order).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GpuLibrarySearch {
    /// `--cuda-libs`, else `$SAGAN_CUDA_LIBS`.
    pub explicit: Vec<PathBuf>,
    /// GPU installs (folders holding `lib/` and `nvidia/`).
    pub installs: Vec<PathBuf>,
    /// Look in Python environments (off in tests, which must not depend on the machine).
    pub python: bool,
}

impl GpuLibrarySearch {
    /// The search for this process: `explicit` (the flag) or `$SAGAN_CUDA_LIBS`; the install
    /// beside `runtime_library`, then `.onnxruntime/gpu` under each of `roots`; Python.
    pub fn from_process(explicit: Vec<PathBuf>, runtime_library: &Path, roots: &[PathBuf]) -> Self {
        let explicit = if explicit.is_empty() {
            std::env::var_os(SAGAN_CUDA_LIBS)
                .map(|v| {
                    std::env::split_paths(&v)
                        .filter(|p| !p.as_os_str().is_empty())
                        .collect()
                })
                .unwrap_or_default()
        } else {
            explicit
        };
        let beside = runtime_library
            .parent()
            .filter(|lib| lib.file_name().is_some_and(|n| n == "lib"))
            .and_then(Path::parent)
            .map(Path::to_path_buf);
        let installs = beside
            .into_iter()
            .chain(roots.iter().map(|r| r.join(".onnxruntime").join("gpu")))
            .collect();
        Self {
            explicit,
            installs,
            python: true,
        }
    }

    /// The folders to search, in order, each that exists once. The Python environments are
    /// only asked (a `python3` run) when `with_python` and nothing earlier had the library.
    fn folders(&self, with_python: bool) -> Vec<PathBuf> {
        let mut roots: Vec<PathBuf> = self
            .explicit
            .iter()
            .chain(&self.installs)
            .cloned()
            .collect();
        if with_python {
            roots.extend(python_site_packages());
        }
        let mut out: Vec<PathBuf> = Vec::new();
        for root in roots {
            let candidates =
                std::iter::once(root.clone()).chain(WHEEL_LAYOUT.iter().map(|d| root.join(d)));
            for dir in candidates {
                let Ok(dir) = dir.canonicalize() else {
                    continue;
                };
                if dir.is_dir() && !out.contains(&dir) {
                    out.push(dir);
                }
            }
        }
        out
    }

    /// Checks the explicitly named folders exist: a typo must not quietly fall through to
    /// another install.
    fn check_explicit(&self) -> Result<(), String> {
        match self.explicit.iter().find(|d| !d.is_dir()) {
            Some(d) => Err(format!(
                "--cuda-libs / ${SAGAN_CUDA_LIBS}: {} is not a folder",
                d.display()
            )),
            None => Ok(()),
        }
    }

    /// The file of `soname` in the first folder that has it; `None` for the system's loader.
    fn locate(&self, soname: &str, python: &mut Option<Vec<PathBuf>>) -> Option<PathBuf> {
        let find = |dirs: &[PathBuf]| dirs.iter().map(|d| d.join(soname)).find(|p| p.is_file());
        find(&self.folders(false)).or_else(|| {
            if !self.python {
                return None;
            }
            let dirs = python.get_or_insert_with(|| {
                let local = self.folders(false);
                self.folders(true)
                    .into_iter()
                    .filter(|d| !local.contains(d))
                    .collect()
            });
            find(dirs)
        })
    }

    /// Where the search looked, for an error message.
    fn describe(&self, python: &Option<Vec<PathBuf>>) -> String {
        let mut places: Vec<String> = self
            .folders(false)
            .iter()
            .map(|d| d.display().to_string())
            .collect();
        if let Some(dirs) = python {
            places.extend(dirs.iter().map(|d| d.display().to_string()));
        }
        places.push("the system library path".into());
        places.join(", ")
    }
}

/// The libraries a provider needs, in load order (dependencies first), and the optional ones.
fn libraries(provider: &Provider) -> (Vec<&'static str>, &'static [&'static str]) {
    let mut required: Vec<&str> = ort::ep::cuda::CUDA_DYLIBS.to_vec();
    required.extend(ort::ep::cuda::CUDNN_DYLIBS);
    match provider {
        Provider::TensorRt(_) => {
            required.extend(TENSORRT_DYLIBS);
            (required, TENSORRT_OPTIONAL_PREFIXES)
        }
        _ => (required, &[]),
    }
}

/// Loads every library `provider` needs (once per process and library) and checks that the
/// driver sees the device. The error says what is missing: a library, with where it was looked
/// for, or the device. Missing libraries are reported before a missing driver, so that a
/// machine without a GPU still shows whether the libraries are complete.
pub fn prepare(
    search: &GpuLibrarySearch,
    provider: &Provider,
    device_id: i32,
) -> Result<(), String> {
    // One preparation at a time; loaded libraries are remembered (and stay loaded).
    static LOADED: Mutex<Vec<String>> = Mutex::new(Vec::new());
    let mut loaded = LOADED
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    search.check_explicit()?;
    let (required, optional) = libraries(provider);
    let mut python = None;
    let mut files: Vec<(String, Option<PathBuf>)> = required
        .iter()
        .map(|&soname| (soname.to_string(), search.locate(soname, &mut python)))
        .collect();
    if !optional.is_empty() {
        // TensorRT opens these by name at run time: take them from libnvinfer's folder.
        let dir = search
            .locate(TENSORRT_DYLIBS[0], &mut python)
            .and_then(|p| p.parent().map(Path::to_path_buf));
        for path in dir.iter().flat_map(|d| companions(d, optional)) {
            let name = path
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned();
            files.push((name, Some(path)));
        }
    }
    // A library that links the driver (cuDNN's runtime compiler does) cannot load without it;
    // that is the driver's failure, reported after every library was tried.
    let mut needs_driver: Option<String> = None;
    for (name, path) in files {
        if loaded.contains(&name) {
            continue;
        }
        let result = match &path {
            Some(path) => ort::util::preload_dylib(path),
            None => ort::util::preload_dylib(name.as_str()),
        };
        match result {
            Ok(()) => {
                tracing::debug!(
                    "loaded {name} from {}",
                    path.as_deref().unwrap_or(Path::new("the system")).display()
                );
                loaded.push(name);
            }
            Err(e) => {
                let reason = loader_reason(&e);
                let msg = match &path {
                    Some(path) => format!("cannot load {}: {reason}", path.display()),
                    None if reason.starts_with(&name) => {
                        format!("{name} not found (looked in: {})", search.describe(&python))
                    }
                    None => format!("cannot load {name}: {reason}"),
                };
                if !reason.contains(DRIVER) {
                    return Err(msg);
                }
                needs_driver.get_or_insert(msg);
            }
        }
    }
    probe_driver(device_id)?;
    needs_driver.map_or(Ok(()), Err)
}

/// The files in `dir` whose names start with one of `prefixes`.
fn companions(dir: &Path, prefixes: &[&str]) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| prefixes.iter().any(|pre| n.starts_with(pre)))
        })
        .collect();
    out.sort();
    out
}

/// The site-packages folders of the active Python environments, then of `python3`.
fn python_site_packages() -> Vec<PathBuf> {
    let mut out = Vec::new();
    for var in ["VIRTUAL_ENV", "CONDA_PREFIX"] {
        if let Some(prefix) = std::env::var_os(var).filter(|v| !v.is_empty()) {
            let lib = Path::new(&prefix).join("lib");
            let mut found: Vec<PathBuf> = std::fs::read_dir(&lib)
                .into_iter()
                .flatten()
                .filter_map(|e| e.ok().map(|e| e.path().join("site-packages")))
                .filter(|p| p.is_dir())
                .collect();
            found.sort();
            out.extend(found);
        }
    }
    let script =
        "import site; print('\\n'.join(site.getsitepackages() + [site.getusersitepackages()]))";
    if let Ok(run) = std::process::Command::new("python3")
        .args(["-c", script])
        .stderr(std::process::Stdio::null())
        .output()
    {
        if run.status.success() {
            out.extend(
                String::from_utf8_lossy(&run.stdout)
                    .lines()
                    .filter(|l| !l.is_empty())
                    .map(PathBuf::from),
            );
        }
    }
    out
}

/// Asks the driver whether device `device_id` exists and can run CUDA 13, so that a machine
/// without one gets "no CUDA-capable device" rather than whatever ONNX Runtime meets first.
fn probe_driver(device_id: i32) -> Result<(), String> {
    let devices = Driver::load()?.devices(13, "ONNX Runtime 1.31's GPU providers")?;
    if device_id < 0 || device_id >= devices {
        return Err(format!(
            "--device-id {device_id}: the driver reports {devices} CUDA device(s), 0 to {}",
            devices - 1
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn touch(path: &Path) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, b"").unwrap();
    }

    fn search(explicit: &[&Path], installs: &[&Path]) -> GpuLibrarySearch {
        GpuLibrarySearch {
            explicit: explicit.iter().map(|p| p.to_path_buf()).collect(),
            installs: installs.iter().map(|p| p.to_path_buf()).collect(),
            python: false,
        }
    }

    #[test]
    fn explicit_folders_come_first_then_installs_in_wheel_layout() {
        let dir = tempfile::tempdir().unwrap();
        let (flat, install) = (dir.path().join("flat"), dir.path().join("gpu"));
        touch(&flat.join("libcudnn.so.9"));
        touch(&install.join("nvidia/cudnn/lib/libcudnn.so.9"));
        touch(&install.join("nvidia/cu13/lib/libcudart.so.13"));
        touch(&install.join("tensorrt_libs/libnvinfer.so.10"));
        let s = search(&[&flat], &[&install]);
        let mut python = None;
        let found = |s: &GpuLibrarySearch, name: &str, python: &mut Option<Vec<PathBuf>>| {
            s.locate(name, python).map(|p| {
                p.strip_prefix(dir.path().canonicalize().unwrap())
                    .unwrap()
                    .to_path_buf()
            })
        };
        assert_eq!(
            found(&s, "libcudnn.so.9", &mut python),
            Some("flat/libcudnn.so.9".into())
        );
        assert_eq!(
            found(&s, "libcudart.so.13", &mut python),
            Some("gpu/nvidia/cu13/lib/libcudart.so.13".into())
        );
        assert_eq!(
            found(&s, "libnvinfer.so.10", &mut python),
            Some("gpu/tensorrt_libs/libnvinfer.so.10".into())
        );
        assert_eq!(found(&s, "libcublas.so.13", &mut python), None);
        let s = search(&[], &[&install]);
        assert_eq!(
            found(&s, "libcudnn.so.9", &mut python),
            Some("gpu/nvidia/cudnn/lib/libcudnn.so.9".into())
        );
    }

    #[test]
    fn install_beside_the_runtime_then_under_each_root() {
        let dir = tempfile::tempdir().unwrap();
        let lib = dir.path().join("elsewhere/gpu/lib/libonnxruntime.so");
        let s =
            GpuLibrarySearch::from_process(vec!["/flag".into()], &lib, &[dir.path().to_path_buf()]);
        assert_eq!(s.explicit, [PathBuf::from("/flag")]);
        assert_eq!(
            s.installs,
            [
                dir.path().join("elsewhere/gpu"),
                dir.path().join(".onnxruntime/gpu")
            ]
        );
        // A runtime not in an install's lib/ folder (the system's) has nothing beside it.
        let s = GpuLibrarySearch::from_process(
            vec!["/flag".into()],
            Path::new("libonnxruntime.so"),
            &[],
        );
        assert!(s.installs.is_empty(), "{:?}", s.installs);
    }

    #[test]
    fn missing_library_names_itself_and_every_place_looked() {
        let dir = tempfile::tempdir().unwrap();
        let install = dir.path().join("gpu");
        std::fs::create_dir_all(install.join("nvidia/cu13/lib")).unwrap();
        let s = search(&[], &[&install]);
        let first = ort::ep::cuda::CUDA_DYLIBS[0];
        if ort::util::preload_dylib(first).is_ok() {
            eprintln!("skipped: the system has {first}, so nothing is missing here");
            return;
        }
        let err = prepare(&s, &Provider::Cuda { device_id: 0 }, 0).unwrap_err();
        assert!(err.starts_with(&format!("{first} not found")), "{err}");
        assert!(err.contains(" not found (looked in: "), "{err}");
        assert!(
            err.contains(
                &install
                    .join("nvidia/cu13/lib")
                    .canonicalize()
                    .unwrap()
                    .display()
                    .to_string()
            ),
            "{err}"
        );
        assert!(err.ends_with("the system library path)"), "{err}");
    }

    #[test]
    fn a_library_that_does_not_load_is_named_with_the_loaders_reason() {
        let dir = tempfile::tempdir().unwrap();
        let bad = dir.path().join("libcudart.so.13");
        std::fs::write(&bad, b"not an ELF file").unwrap();
        let err = prepare(
            &search(&[dir.path()], &[]),
            &Provider::Cuda { device_id: 0 },
            0,
        )
        .unwrap_err();
        assert!(
            err.starts_with(&format!(
                "cannot load {}: ",
                bad.canonicalize().unwrap().display()
            )),
            "{err}"
        );
        assert!(
            err.contains("file too short") || err.contains("invalid ELF header"),
            "{err}"
        );
    }

    #[test]
    fn a_named_folder_that_does_not_exist_is_an_error() {
        let err = prepare(
            &search(&[Path::new("/no/such/cuda")], &[]),
            &Provider::Cuda { device_id: 0 },
            0,
        )
        .unwrap_err();
        assert_eq!(
            err,
            format!("--cuda-libs / ${SAGAN_CUDA_LIBS}: /no/such/cuda is not a folder")
        );
    }

    #[test]
    fn tensorrt_needs_cuda_and_cudnn_too() {
        let (cuda, _) = libraries(&Provider::Cuda { device_id: 0 });
        let (trt, optional) = libraries(&Provider::TensorRt(Default::default()));
        assert!(
            cuda.contains(&"libcublasLt.so.13") && cuda.contains(&"libcudnn.so.9"),
            "{cuda:?}"
        );
        assert_eq!(&trt[..cuda.len()], &cuda[..]);
        assert_eq!(&trt[cuda.len()..], TENSORRT_DYLIBS);
        assert!(!optional.is_empty());
    }
}
