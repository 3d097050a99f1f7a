//! Finding and loading ONNX Runtime. ort's `load-dynamic` opens `libonnxruntime` at run time
//! (the binary links nothing), so a missing or wrong library is a normal, reportable error
//! here; plain `ort::init()` would panic instead.

use super::gpu::GpuLibrarySearch;
use super::{InferError, InferResult, INSTALL_CPU, INSTALL_GPU};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock, PoisonError};

/// The name the dynamic loader resolves through the system search path (ldconfig).
const SYSTEM_LIBRARY: &str = "libonnxruntime.so";
/// The environment variable ort itself honours; we honour it too, in the same place in the order.
pub const ORT_DYLIB_PATH: &str = "ORT_DYLIB_PATH";

/// Where a candidate library came from; decides how failures are reported.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    /// `--ort-lib PATH`: the only candidate when given.
    Flag,
    /// `ORT_DYLIB_PATH`: the only candidate when given and there is no flag.
    Env,
    /// A `.onnxruntime/<variant>/lib` install made by `tools/install-onnxruntime.sh`.
    Local,
    /// The system's `libonnxruntime.so`, found by the dynamic loader.
    System,
}

/// One library to try.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Candidate {
    pub path: PathBuf,
    pub origin: Origin,
}

/// The places to look for `libonnxruntime`, in order: `--ort-lib`, `ORT_DYLIB_PATH`, project
/// local installs under each of `roots`, then the system. A path the user named is the only
/// candidate: silently loading some other runtime instead would hide their mistake.
#[derive(Clone, Debug, Default)]
pub struct LibrarySearch {
    pub explicit: Option<PathBuf>,
    pub env: Option<PathBuf>,
    /// Folders that may hold `.onnxruntime/` (the current dir; the repo root above `target/`).
    pub roots: Vec<PathBuf>,
    /// Look in `.onnxruntime/gpu` before `.onnxruntime/cpu` (for the CUDA and TensorRT providers).
    pub prefer_gpu: bool,
    /// `--cuda-libs`: folders with the GPU providers' libraries (see [`GpuLibrarySearch`]).
    pub cuda_libs: Vec<PathBuf>,
}

impl LibrarySearch {
    /// The search for this process: `--ort-lib`, `ORT_DYLIB_PATH`, then `./.onnxruntime` and
    /// the executable's `../../.onnxruntime` (`target/<profile>/` -> repo root, for `cargo run`).
    pub fn from_process(explicit: Option<PathBuf>, prefer_gpu: bool) -> Self {
        let env = std::env::var_os(ORT_DYLIB_PATH)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from);
        let mut roots = Vec::new();
        if let Ok(cwd) = std::env::current_dir() {
            roots.push(cwd);
        }
        if let Some(root) = std::env::current_exe()
            .ok()
            .and_then(|exe| Some(exe.parent()?.parent()?.parent()?.to_path_buf()))
        {
            roots.push(root);
        }
        Self {
            explicit,
            env,
            roots,
            prefer_gpu,
            cuda_libs: Vec::new(),
        }
    }

    /// The variants in the order this search prefers them.
    fn variants(&self) -> [&'static str; 2] {
        if self.prefer_gpu {
            ["gpu", "cpu"]
        } else {
            ["cpu", "gpu"]
        }
    }

    /// The command to print when nothing usable is found.
    pub fn install_hint(&self) -> &'static str {
        if self.prefer_gpu {
            INSTALL_GPU
        } else {
            INSTALL_CPU
        }
    }

    /// Every library to try, in order. Local installs are listed only where a library file
    /// exists; the system name is always last (only the loader knows whether it resolves).
    pub fn candidates(&self) -> Vec<Candidate> {
        if let Some(path) = &self.explicit {
            return vec![Candidate {
                path: path.clone(),
                origin: Origin::Flag,
            }];
        }
        if let Some(path) = &self.env {
            return vec![Candidate {
                path: path.clone(),
                origin: Origin::Env,
            }];
        }
        let mut out: Vec<Candidate> = Vec::new();
        for root in &self.roots {
            for variant in self.variants() {
                let dir = root.join(".onnxruntime").join(variant).join("lib");
                if let Some(path) = library_in(&dir) {
                    let seen = out.iter().any(|c| same_file(&c.path, &path));
                    if !seen {
                        out.push(Candidate {
                            path,
                            origin: Origin::Local,
                        });
                    }
                }
            }
        }
        out.push(Candidate {
            path: PathBuf::from(SYSTEM_LIBRARY),
            origin: Origin::System,
        });
        out
    }
}

fn same_file(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => a == b,
    }
}

/// The runtime library in an install's `lib` folder: `libonnxruntime.so` (the install script's
/// link) or else the highest versioned `libonnxruntime.so.X.Y.Z`.
fn library_in(dir: &Path) -> Option<PathBuf> {
    let plain = dir.join(SYSTEM_LIBRARY);
    if plain.is_file() {
        return Some(plain);
    }
    let prefix = format!("{SYSTEM_LIBRARY}.");
    std::fs::read_dir(dir)
        .ok()?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|p| {
            p.is_file()
                && p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with(&prefix))
        })
        .max()
}

/// ort's message plus the loader's own reason (`dlerror`), which ort's Display leaves out:
/// "dlopen failed" alone does not say whether the file is missing, not a library, or lacks a
/// dependency.
fn load_error_text(e: &ort::LoadDynamicError) -> String {
    match e {
        ort::LoadDynamicError::Dlopen { error, .. } => match std::error::Error::source(error) {
            Some(reason) => format!("{e}: {reason}"),
            None => e.to_string(),
        },
        _ => e.to_string(),
    }
}

/// The process-wide ONNX Runtime: the loaded library and the one environment ort allows.
#[derive(Debug)]
pub struct Runtime {
    library: PathBuf,
    environment: ort::environment::Environment,
    gpu_libraries: GpuLibrarySearch,
}

static RUNTIME: OnceLock<Runtime> = OnceLock::new();
static INIT: Mutex<()> = Mutex::new(());

impl Runtime {
    /// Loads ONNX Runtime from the first candidate of `search` that loads, once per process;
    /// later calls return the same runtime whatever they ask for.
    pub fn init(search: &LibrarySearch) -> InferResult<&'static Runtime> {
        if let Some(runtime) = RUNTIME.get() {
            return Ok(runtime);
        }
        let _guard = INIT.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(runtime) = RUNTIME.get() {
            return Ok(runtime);
        }
        let install = search.install_hint();
        let mut tried = Vec::new();
        for candidate in search.candidates() {
            let builder = match ort::init_from(&candidate.path) {
                Ok(builder) => builder,
                Err(e) if matches!(candidate.origin, Origin::Flag | Origin::Env) => {
                    let e = load_error_text(&e);
                    let via = match candidate.origin {
                        Origin::Flag => "--ort-lib",
                        _ => ORT_DYLIB_PATH,
                    };
                    return Err(InferError::RuntimeLoad {
                        path: candidate.path,
                        source_msg: format!("given by {via}: {e}"),
                        install,
                    });
                }
                Err(e) => {
                    let e = load_error_text(&e);
                    tracing::debug!("ONNX Runtime candidate {}: {e}", candidate.path.display());
                    tried.push(format!("{}: {e}", candidate.path.display()));
                    continue;
                }
            };
            let environment =
                builder
                    .with_name("sagan-infer")
                    .build()
                    .map_err(|e| InferError::Environment {
                        path: candidate.path.clone(),
                        msg: e.to_string(),
                    })?;
            tracing::info!("ONNX Runtime loaded from {}", candidate.path.display());
            let gpu_libraries = GpuLibrarySearch::from_process(
                search.cuda_libs.clone(),
                &candidate.path,
                &search.roots,
            );
            return Ok(RUNTIME.get_or_init(|| Runtime {
                library: candidate.path,
                environment,
                gpu_libraries,
            }));
        }
        let looked: Vec<String> = search
            .roots
            .iter()
            .map(|r| format!("{}/.onnxruntime/{{cpu,gpu}}/lib", r.display()))
            .collect();
        Err(InferError::RuntimeNotFound {
            tried: format!(
                "--ort-lib and {ORT_DYLIB_PATH} unset; no install in {}; {}",
                looked.join(", "),
                tried.join("; ")
            ),
            install,
        })
    }

    /// The library that was loaded (as given: the system one is just its name).
    pub fn library(&self) -> &Path {
        &self.library
    }

    pub fn environment(&self) -> &ort::environment::Environment {
        &self.environment
    }

    /// Where the GPU providers' libraries are looked for.
    pub fn gpu_libraries(&self) -> &GpuLibrarySearch {
        &self.gpu_libraries
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake project root with empty library files for the given variants.
    fn fake_root(variants: &[&str]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for v in variants {
            let lib = dir.path().join(".onnxruntime").join(v).join("lib");
            std::fs::create_dir_all(&lib).unwrap();
            std::fs::write(lib.join("libonnxruntime.so.1.31.1"), b"").unwrap();
            // Provider libraries share the prefix but are not the runtime.
            std::fs::write(lib.join("libonnxruntime_providers_shared.so"), b"").unwrap();
        }
        dir
    }

    fn lib(root: &Path, variant: &str) -> PathBuf {
        root.join(".onnxruntime")
            .join(variant)
            .join("lib")
            .join("libonnxruntime.so.1.31.1")
    }

    #[test]
    fn flag_beats_env_beats_local() {
        let root = fake_root(&["cpu"]);
        let mut search = LibrarySearch {
            explicit: Some("/opt/flag/libonnxruntime.so".into()),
            env: Some("/opt/env/libonnxruntime.so".into()),
            roots: vec![root.path().to_path_buf()],
            ..Default::default()
        };
        let only = |s: &LibrarySearch| {
            let c = s.candidates();
            assert_eq!(c.len(), 1, "{c:?}");
            (c[0].path.clone(), c[0].origin)
        };
        assert_eq!(
            only(&search),
            ("/opt/flag/libonnxruntime.so".into(), Origin::Flag)
        );
        search.explicit = None;
        assert_eq!(
            only(&search),
            ("/opt/env/libonnxruntime.so".into(), Origin::Env)
        );
        search.env = None;
        let c = search.candidates();
        assert_eq!(c[0].path, lib(root.path(), "cpu"));
        assert_eq!(c[0].origin, Origin::Local);
        assert_eq!(c.last().unwrap().path, PathBuf::from(SYSTEM_LIBRARY));
        assert_eq!(c.last().unwrap().origin, Origin::System);
        assert_eq!(c.len(), 2);
    }

    #[test]
    fn gpu_install_first_for_gpu_providers() {
        let root = fake_root(&["cpu", "gpu"]);
        let mut search = LibrarySearch {
            roots: vec![root.path().to_path_buf()],
            ..Default::default()
        };
        let paths = |s: &LibrarySearch| -> Vec<PathBuf> {
            s.candidates().into_iter().map(|c| c.path).collect()
        };
        assert_eq!(
            paths(&search),
            [
                lib(root.path(), "cpu"),
                lib(root.path(), "gpu"),
                SYSTEM_LIBRARY.into()
            ]
        );
        assert_eq!(search.install_hint(), INSTALL_CPU);
        search.prefer_gpu = true;
        assert_eq!(
            paths(&search),
            [
                lib(root.path(), "gpu"),
                lib(root.path(), "cpu"),
                SYSTEM_LIBRARY.into()
            ]
        );
        assert_eq!(search.install_hint(), INSTALL_GPU);
    }

    #[test]
    fn roots_in_order_without_duplicates() {
        let (first, second) = (fake_root(&["cpu"]), fake_root(&["cpu"]));
        let search = LibrarySearch {
            roots: vec![
                first.path().to_path_buf(),
                first.path().join("."),
                second.path().to_path_buf(),
            ],
            ..Default::default()
        };
        let paths: Vec<PathBuf> = search.candidates().into_iter().map(|c| c.path).collect();
        assert_eq!(
            paths,
            [
                lib(first.path(), "cpu"),
                lib(second.path(), "cpu"),
                SYSTEM_LIBRARY.into()
            ]
        );
    }

    #[test]
    fn plain_link_preferred_and_empty_dirs_skipped() {
        let root = fake_root(&[]);
        let dir = root.path().join(".onnxruntime/cpu/lib");
        std::fs::create_dir_all(&dir).unwrap();
        let search = LibrarySearch {
            roots: vec![root.path().to_path_buf()],
            ..Default::default()
        };
        assert_eq!(
            search.candidates().len(),
            1,
            "empty install is no candidate"
        );
        std::fs::write(dir.join("libonnxruntime.so.1.30.0"), b"").unwrap();
        std::fs::write(dir.join("libonnxruntime.so.1.31.1"), b"").unwrap();
        assert_eq!(
            search.candidates()[0].path,
            dir.join("libonnxruntime.so.1.31.1")
        );
        std::fs::write(dir.join("libonnxruntime.so"), b"").unwrap();
        assert_eq!(search.candidates()[0].path, dir.join("libonnxruntime.so"));
    }
}
