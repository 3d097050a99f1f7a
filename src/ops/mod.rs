//! The CPU kernels under the layers: candle custom ops with their own backward (convolutions,
//! bias/batch norm + activation, attention, softmax, spectral normalisation), the optimizer's
//! in-place updates, and the gradient hand-off between them. The layers in `model` call them;
//! nothing here depends on a layer, a network or a preset. Only `Activation` builds without
//! the `train` feature: the presets name it.
//!
//! Every kernel here has a CPU forward only. Each public function hands tensors it does not take
//! to candle's own ops (the device-generic path): tensors on another device (CUDA) always, and
//! CPU tensors too while a thread runs under `Backend::Generic` (see `with_backend`), which is
//! how the generic path is tested without a GPU.

#[cfg(feature = "train")]
pub(crate) mod attention;
#[cfg(feature = "train")]
pub mod channel;
#[cfg(feature = "train")]
pub mod conv;
#[cfg(feature = "train")]
mod cpu;
#[cfg(feature = "train")]
pub mod grad_mode;
#[cfg(feature = "train")]
pub(crate) mod handoff;
#[cfg(feature = "train")]
pub(crate) mod optimizer;
#[cfg(feature = "train")]
pub mod softmax;
#[cfg(feature = "train")]
pub(crate) mod spectral_norm;

#[cfg(all(test, feature = "train"))]
pub(crate) mod testing;

#[cfg(feature = "train")]
pub(crate) mod backend;
#[cfg(feature = "train")]
pub(crate) use backend::fused_on;
#[cfg(feature = "train")]
pub use backend::{backend, with_backend, Backend};

use serde::{Deserialize, Serialize};

/// The activation a kernel applies after its linear part (with the layer's leaky slope for
/// `LeakyRelu`). Presets spell it in snake_case (`act = "leaky_relu"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    None,
    Relu,
    LeakyRelu,
    Tanh,
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    /// The `.rs` files under `dir`, with how many `super::` lead from each to the crate root.
    fn sources(dir: &Path, depth: usize, files: &mut Vec<(PathBuf, usize)>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                sources(&path, depth + 1, files);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let own_module = path.file_name().is_some_and(|n| n == "mod.rs");
                files.push((path, if own_module { depth } else { depth + 1 }));
            }
        }
    }

    /// Where the kernels' code leads outside `ops`: `crate::X` for X other than `ops` (and the
    /// `rng` leaf, for test inputs), or enough `super::` to climb out of it. Comments are
    /// skipped; the needles are built here so that this function does not find itself.
    fn paths_out_of_ops() -> (usize, Vec<String>) {
        let mut files = Vec::new();
        sources(
            &Path::new(env!("CARGO_MANIFEST_DIR")).join("src/ops"),
            1,
            &mut files,
        );
        let (krate, up) = (["crate", "::"].concat(), ["super", "::"].concat());
        let (mut paths, mut outside) = (0, Vec::new());
        for (path, depth) in files {
            let text = std::fs::read_to_string(&path).unwrap();
            let code = text.lines().enumerate();
            for (i, line) in code.filter(|(_, l)| !l.trim_start().starts_with("//")) {
                let leaves = line.match_indices(&krate).any(|(at, _)| {
                    paths += 1;
                    let rest = &line[at + krate.len()..];
                    let first = rest
                        .split(|c: char| !c.is_alphanumeric() && c != '_')
                        .next();
                    !matches!(first, Some("ops" | "rng"))
                });
                if leaves || line.contains(&up.repeat(depth)) {
                    outside.push(format!("{}:{}: {line}", path.display(), i + 1));
                }
            }
        }
        (paths, outside)
    }

    #[test]
    fn kernels_import_nothing_above_them() {
        let (paths, outside) = paths_out_of_ops();
        assert!(
            paths > 10,
            "only {paths} crate paths found: is src/ops read?"
        );
        assert!(
            outside.is_empty(),
            "ops imports from outside:\n{}",
            outside.join("\n")
        );
    }
}
