//! End-to-end tests of sagan-infer on the tiny ONNX fixtures (tools/make-onnx-fixture.py).
//!
//! They need ONNX Runtime: `ORT_DYLIB_PATH`, or the CPU install that
//! `tools/install-onnxruntime.sh cpu` makes in `.onnxruntime/cpu`. The provider tests assume
//! that CPU-only runtime (as in CI), and skip where CUDA runs.
#![cfg(feature = "infer")]

mod common;

use common::{manifest_dir, ort_lib};

use assert_cmd::Command;
use sagan::infer::{Generator, LibrarySearch, LoadOptions, Runtime};
use std::path::{Path, PathBuf};

fn fixture(name: &str) -> PathBuf {
    manifest_dir().join("fixtures/onnx").join(name)
}

fn infer(dir: &Path) -> Command {
    let mut cmd = Command::cargo_bin("sagan-infer").unwrap();
    cmd.current_dir(dir)
        .env("ORT_DYLIB_PATH", ort_lib())
        .env_remove("RUST_LOG");
    cmd
}

fn png_size(path: &Path) -> (u32, u32) {
    image::image_dimensions(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

struct Outcome {
    success: bool,
    stdout: String,
    stderr: String,
}

fn run(cmd: &mut Command) -> Outcome {
    let out = cmd.output().unwrap();
    Outcome {
        success: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// A failure must be one `error: ...` line containing `needle`, a non-zero exit, no panic.
fn assert_clean_error(args: &[&str], needle: &str) {
    let dir = tempfile::tempdir().unwrap();
    check_clean_error(&run(infer(dir.path()).args(args)), args, needle);
}

fn check_clean_error(out: &Outcome, args: &[&str], needle: &str) {
    assert!(!out.success, "{args:?} succeeded: {}", out.stdout);
    let lines: Vec<&str> = out.stderr.lines().collect();
    assert_eq!(
        lines.len(),
        1,
        "{args:?}: expected one line, got:\n{}",
        out.stderr
    );
    assert!(lines[0].starts_with("error: "), "{args:?}: {}", lines[0]);
    assert!(
        lines[0].contains(needle),
        "{args:?}: '{needle}' not in: {}",
        lines[0]
    );
    assert!(!out.stderr.contains("panicked"), "{}", out.stderr);
}

#[test]
fn writes_grid_and_individual_pngs_of_the_model_size() {
    let dir = tempfile::tempdir().unwrap();
    let model = fixture("tiny-generator.onnx");
    let out = run(infer(dir.path()).args([
        "--model",
        model.to_str().unwrap(),
        "--count",
        "6",
        "--png-each",
        "--out",
        "out",
    ]));
    assert!(out.success, "{}", out.stderr);
    assert!(out.stdout.contains("seed0-grid.png"), "{}", out.stdout);
    assert!(out.stderr.contains("first PNG written"), "{}", out.stderr);
    for i in 0..6 {
        assert_eq!(
            png_size(&dir.path().join(format!("out/seed0-{i:04}.png"))),
            (4, 4)
        );
    }
    assert!(!dir.path().join("out/seed0-0006.png").exists());
    // 3 columns x 2 rows of 4x4 tiles upscaled x16 to 64, with 2px gaps.
    assert_eq!(
        png_size(&dir.path().join("out/seed0-grid.png")),
        (3 * 66 + 2, 2 * 66 + 2)
    );
    // Nothing but PNGs: no temporary files left behind.
    let names: Vec<String> = std::fs::read_dir(dir.path().join("out"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(names.iter().all(|n| n.ends_with(".png")), "{names:?}");
}

/// Images stream to disk a batch at a time: a count in the thousands writes every PNG, and
/// the grid (which alone would grow with the count) holds the first GRID_LIMIT and says so.
#[test]
fn large_counts_stream_and_the_grid_keeps_the_first_images() {
    let dir = tempfile::tempdir().unwrap();
    let model = fixture("tiny-generator.onnx");
    let out = run(infer(dir.path()).args([
        "--model",
        model.to_str().unwrap(),
        "--count",
        "3000",
        "--columns",
        "32",
        "--batch",
        "7",
        "--png-each",
        "--out",
        "out",
    ]));
    assert!(out.success, "{}", out.stderr);
    assert!(
        out.stdout.contains("the first 1024 of 3000 images")
            && out.stdout.contains("seed0-2999.png"),
        "{}",
        out.stdout
    );
    let pngs = std::fs::read_dir(dir.path().join("out")).unwrap().count();
    assert_eq!(pngs, 3000 + 1);
    // 32 columns x 32 rows of 64-pixel tiles with 2px gaps.
    assert_eq!(
        png_size(&dir.path().join("out/seed0-grid.png")),
        (32 * 66 + 2, 32 * 66 + 2)
    );
}

#[test]
fn same_seed_same_bytes_other_seed_other_bytes() {
    let model = fixture("tiny-generator.onnx");
    let grid = |seed: &str| {
        let dir = tempfile::tempdir().unwrap();
        let out = run(infer(dir.path()).args([
            "--model",
            model.to_str().unwrap(),
            "--count",
            "9",
            "--seed",
            seed,
        ]));
        assert!(out.success, "{}", out.stderr);
        std::fs::read(dir.path().join(format!("samples/seed{seed}-grid.png"))).unwrap()
    };
    let a = grid("3");
    assert_eq!(a, grid("3"));
    assert_ne!(a, grid("4"));
}

#[test]
fn bench_prints_percentiles_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let model = fixture("tiny-generator.onnx");
    let out = run(infer(dir.path()).args([
        "--model",
        model.to_str().unwrap(),
        "--bench",
        "--batch",
        "8",
        "--bench-runs",
        "20",
        "--threads",
        "1",
    ]));
    assert!(out.success, "{}", out.stderr);
    for column in ["batch", "p50 ms", "p90 ms", "p99 ms", "images/s"] {
        assert!(out.stdout.contains(column), "{column}: {}", out.stdout);
    }
    let row = out.stdout.lines().last().unwrap();
    let fields: Vec<f64> = row.split_whitespace().map(|f| f.parse().unwrap()).collect();
    assert_eq!(fields.len(), 6, "{row}");
    assert_eq!((fields[0], fields[1]), (8.0, 20.0));
    assert!(fields[2] <= fields[3] && fields[3] <= fields[4], "{row}");
    assert!(fields[5] > 0.0, "{row}");
    assert!(!dir.path().join("samples").exists());
}

#[test]
fn cuda_is_required_unless_fallback_cpu() {
    let model = fixture("tiny-generator.onnx");
    let cuda = ["--model", model.to_str().unwrap(), "--provider", "cuda"];
    let dir = tempfile::tempdir().unwrap();
    let out = run(infer(dir.path()).args(cuda));
    if out.success {
        // A GPU runtime on a machine with a GPU: there is no unavailable provider to test.
        eprintln!(
            "skipped: CUDA runs here with {}; this test needs a runtime or machine without it",
            ort_lib().display()
        );
        return;
    }
    check_clean_error(
        &out,
        &cuda,
        "cuda execution provider unavailable: CUDA execution provider is not enabled in this build",
    );
    assert_clean_error(
        &["--model", model.to_str().unwrap(), "--provider", "tensorrt"],
        "use --fallback cpu",
    );

    let dir = tempfile::tempdir().unwrap();
    let out = run(infer(dir.path()).args([
        "--model",
        model.to_str().unwrap(),
        "--provider",
        "cuda",
        "--fallback",
        "cpu",
        "--count",
        "4",
    ]));
    assert!(out.success, "{}", out.stderr);
    assert!(out.stderr.contains("WARN"), "{}", out.stderr);
    assert!(out.stderr.contains("running on the CPU"), "{}", out.stderr);
    assert!(out.stderr.contains("provider cpu"), "{}", out.stderr);
    assert!(dir.path().join("samples/seed0-grid.png").exists());
}

#[test]
fn compare_cpu_prints_the_largest_difference() {
    let dir = tempfile::tempdir().unwrap();
    let model = fixture("tiny-generator.onnx");
    let model = model.to_str().unwrap();
    let out = run(infer(dir.path()).args(["--model", model, "--count", "5", "--compare-cpu"]));
    assert!(out.success, "{}", out.stderr);
    // The CPU against itself: the same runtime and latents give the same numbers.
    assert!(
        out.stdout
            .contains("max |diff| against the CPU provider: 0.000e0 (5 images on cpu)"),
        "{}",
        out.stdout
    );
    assert!(dir.path().join("samples/seed0-grid.png").exists());
    assert_clean_error(
        &["--model", model, "--bench", "--compare-cpu"],
        "--compare-cpu does not apply to --bench",
    );
}

#[test]
fn bad_inputs_are_one_clear_line() {
    let tiny = fixture("tiny-generator.onnx");
    let tiny = tiny.to_str().unwrap();
    let not_onnx = fixture("not-onnx.onnx");
    assert_clean_error(
        &["--model", not_onnx.to_str().unwrap()],
        "not-onnx.onnx: not an ONNX model",
    );
    let plain = fixture("plain-generator.onnx");
    assert_clean_error(
        &["--model", plain.to_str().unwrap()],
        "plain-generator.onnx: no 'sagan.z_dim' metadata and input 'z' has no static z dimension: pass --z-dim",
    );
    let not_gen = fixture("not-a-generator.onnx");
    assert_clean_error(
        &["--model", not_gen.to_str().unwrap()],
        "not an image generator (no 'sagan.*' metadata: not a sagan export)",
    );
    assert_clean_error(
        &["--model", "missing.onnx"],
        "missing.onnx: cannot read the model",
    );
    assert_clean_error(
        &["--model", tiny, "--z-dim", "16"],
        "--z-dim is 16 but the metadata 'sagan.z_dim' says 8",
    );
    assert_clean_error(
        &["--model", tiny, "--count", "0"],
        "--count must be at least 1",
    );
    for t in ["0", "-0.5"] {
        assert_clean_error(
            &["--model", tiny, "--truncation", t],
            "--truncation must be a positive number",
        );
    }
    // A folder under a regular file cannot be created, even by root.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("file");
    std::fs::write(&file, b"").unwrap();
    let out_dir = file.join("samples");
    assert_clean_error(
        &["--model", tiny, "--out", out_dir.to_str().unwrap()],
        "output folder is not writable",
    );
    assert_clean_error(
        &["--model", tiny, "--ort-lib", not_onnx.to_str().unwrap()],
        "cannot load ONNX Runtime from",
    );
}

#[test]
fn plain_generator_runs_with_z_dim() {
    let dir = tempfile::tempdir().unwrap();
    let plain = fixture("plain-generator.onnx");
    let out = run(infer(dir.path()).args([
        "--model",
        plain.to_str().unwrap(),
        "--z-dim",
        "8",
        "--count",
        "4",
    ]));
    assert!(out.success, "{}", out.stderr);
    assert!(out.stderr.contains("plain generator"), "{}", out.stderr);
    assert_eq!(
        png_size(&dir.path().join("samples/seed0-grid.png")),
        (2 * 66 + 2, 2 * 66 + 2)
    );
}

#[test]
fn attention_outputs_become_overlays() {
    let dir = tempfile::tempdir().unwrap();
    let model = fixture("tiny-generator-attention.onnx");
    let out = run(infer(dir.path()).args(["--model", model.to_str().unwrap(), "--count", "3"]));
    assert!(out.success, "{}", out.stderr);
    // One row per image: the marked image plus one tile per query (4 queries on a 2x2 map),
    // tiles upscaled to 128 px.
    assert_eq!(
        png_size(&dir.path().join("samples/seed0-attention0.png")),
        (5 * 130 + 2, 3 * 130 + 2)
    );
}

#[test]
fn interpolation_rows_and_truncation() {
    let dir = tempfile::tempdir().unwrap();
    let model = fixture("tiny-generator.onnx");
    let out = run(infer(dir.path()).args([
        "--model",
        model.to_str().unwrap(),
        "--interpolate",
        "5",
        "--count",
        "3",
        "--truncation",
        "0.8",
    ]));
    assert!(out.success, "{}", out.stderr);
    // 2 segments (seeds 0->1, 1->2) of 5 images each.
    assert_eq!(
        png_size(&dir.path().join("samples/interp-seed0-grid.png")),
        (5 * 66 + 2, 2 * 66 + 2)
    );
}

#[test]
fn help_teaches_with_examples() {
    let dir = tempfile::tempdir().unwrap();
    let out = run(infer(dir.path()).arg("--help"));
    assert!(out.success);
    for needle in [
        "Examples:",
        "--provider cuda",
        "--fallback cpu",
        "install-onnxruntime.sh",
    ] {
        assert!(out.stdout.contains(needle), "{needle}");
    }
}

/// Parity with the reference runtime: onnxruntime 1.31.1 (Python) computed the fixture's
/// output for a fixed z when the fixture was made.
#[test]
fn generator_matches_python_onnxruntime() {
    let text = std::fs::read_to_string(fixture("tiny-generator.parity.json")).unwrap();
    let reference: serde_json::Value = serde_json::from_str(&text).unwrap();
    let floats = |key: &str| -> Vec<f32> {
        reference[key]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap() as f32)
            .collect()
    };
    let (z, expected) = (floats("z"), floats("image"));
    let n = reference["n"].as_u64().unwrap() as usize;

    let search = LibrarySearch {
        explicit: Some(ort_lib()),
        ..Default::default()
    };
    let runtime = Runtime::init(&search).unwrap();
    let mut generator = Generator::load(
        runtime,
        &fixture("tiny-generator.onnx"),
        &LoadOptions::default(),
    )
    .unwrap();
    assert_eq!(generator.z_dim(), 8);
    assert_eq!((generator.channels(), generator.size()), (1, (4, 4)));
    let out = generator.generate(&z, None, n).unwrap();
    assert_eq!(out.images.len(), expected.len());
    let max_diff = out
        .images
        .iter()
        .zip(&expected)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0_f32, f32::max);
    eprintln!("max |sagan-infer - onnxruntime python| = {max_diff:e}");
    assert!(max_diff <= 1e-6, "max abs diff {max_diff}");
}

#[test]
fn fixed_batch_model_is_run_in_padded_batches() {
    // Same weights, batch fixed at 4: 6 images take two runs, the second half padding.
    let each = |model: &str| -> Vec<Vec<u8>> {
        let dir = tempfile::tempdir().unwrap();
        let model = fixture(model);
        let out = run(infer(dir.path()).args([
            "--model",
            model.to_str().unwrap(),
            "--count",
            "6",
            "--batch",
            "6",
            "--png-each",
            "--no-grid",
        ]));
        assert!(out.success, "{}", out.stderr);
        (0..6)
            .map(|i| std::fs::read(dir.path().join(format!("samples/seed0-{i:04}.png"))).unwrap())
            .collect()
    };
    assert_eq!(
        each("fixed-batch-generator.onnx"),
        each("tiny-generator.onnx")
    );
}
