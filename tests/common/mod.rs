//! Helpers shared by the integration tests.
#![allow(dead_code)] // each test crate uses a different subset

use std::path::{Path, PathBuf};

pub fn manifest_dir() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The ONNX Runtime the tests load, named explicitly so no other install on the machine is
/// picked: `ORT_DYLIB_PATH`, else the CPU install of tools/install-onnxruntime.sh.
pub fn ort_lib() -> PathBuf {
    let path = std::env::var_os("ORT_DYLIB_PATH")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| manifest_dir().join(".onnxruntime/cpu/lib/libonnxruntime.so"));
    assert!(
        path.exists(),
        "ONNX Runtime not found at {}: run tools/install-onnxruntime.sh cpu (or set ORT_DYLIB_PATH)",
        path.display()
    );
    path
}

/// Runs a Python script of tools/ with the Python that tools/test.sh set up ($SAGAN_PYTHON).
pub fn python_tool<I, S>(script: &str, args: I) -> std::process::Output
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    let python = std::env::var("SAGAN_PYTHON").unwrap_or_else(|_| "python3".into());
    std::process::Command::new(&python)
        .arg(manifest_dir().join("tools").join(script))
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{python}: {e} (run the tests through tools/test.sh)"))
}

/// A project binary with logs quietened.
pub fn bin(name: &str) -> assert_cmd::Command {
    let mut cmd = assert_cmd::Command::cargo_bin(name).unwrap();
    cmd.env("RUST_LOG", "warn");
    cmd
}

/// Trains `preset` for one step (batch 2) into `run`, with `extra` flags; a quick checkpoint
/// with the real training state for export and parity tests.
pub fn train_one_step(run: &Path, preset: &str, extra: &[&str]) {
    bin("sagan-train")
        .args([
            "--preset",
            preset,
            "--steps",
            "1",
            "--batch-size",
            "2",
            "--threads",
            "2",
            "--out",
        ])
        .arg(run)
        .args(extra)
        .assert()
        .success();
}
