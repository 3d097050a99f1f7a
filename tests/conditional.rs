//! The class-conditional path end to end on sagan-cond-mnist32: labels into training, one
//! class per sample-grid row, the `class` input through export, sagan-infer --class and the
//! class accuracy of sagan-eval. Parity of the exported graph is in tests/parity.rs.
#![cfg(all(feature = "train", feature = "infer"))]

mod common;

use common::{bin, manifest_dir, ort_lib, train_one_step};
use std::path::Path;
use std::process::Output;

const PRESET: &str = "sagan-cond-mnist32";

fn run(cmd: &mut assert_cmd::Command) -> Output {
    cmd.env("ORT_DYLIB_PATH", ort_lib()).output().unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A one-step sagan-cond-mnist32 run in `dir/run`, exported to `dir/cond.onnx`.
fn exported(dir: &Path) -> std::path::PathBuf {
    let run_dir = dir.join("run");
    train_one_step(&run_dir, PRESET, &[]);
    let onnx = dir.join("cond.onnx");
    let out = run(bin("sagan-export")
        .arg(&onnx)
        .arg("--checkpoint")
        .arg(&run_dir));
    assert!(out.status.success(), "{}", text(&out.stderr));
    onnx
}

#[test]
fn training_grid_has_one_row_per_class() {
    let dir = tempfile::tempdir().unwrap();
    let run_dir = dir.path().join("run");
    train_one_step(&run_dir, PRESET, &[]);
    // The built-in MNIST digits have 10 classes: 10 rows of 8 images (32 px shown at 64, 2 px
    // gaps).
    let grid = run_dir.join("samples/step-00000001.png");
    let (w, h) = image::image_dimensions(&grid).unwrap();
    assert_eq!((w, h), (8 * 66 + 2, 10 * 66 + 2));
}

#[test]
fn a_conditional_preset_needs_labelled_images() {
    let dir = tempfile::tempdir().unwrap();
    // Pictures straight in the folder: no sub-folders, so no classes.
    let flat = dir.path().join("flat");
    std::fs::create_dir(&flat).unwrap();
    for name in ["wide.png", "gray.png", "tall.JPG"] {
        std::fs::copy(
            manifest_dir()
                .join("fixtures/images-small/circles")
                .join(name),
            flat.join(name),
        )
        .unwrap();
    }
    let out = run(bin("sagan-train")
        .args([
            "--preset",
            PRESET,
            "--steps",
            "1",
            "--batch-size",
            "2",
            "--data",
        ])
        .arg(&flat)
        .arg("--out")
        .arg(dir.path().join("run")));
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains("class-conditional") && err.contains("no labels"),
        "{err}"
    );
    assert!(!dir.path().join("run/checkpoints").exists());
}

#[test]
fn sagan_infer_draws_requested_classes_and_refuses_bad_ones() {
    let dir = tempfile::tempdir().unwrap();
    let onnx = exported(dir.path());
    let infer = |args: &[&str]| {
        run(bin("sagan-infer")
            .arg("--model")
            .arg(&onnx)
            .arg("--out")
            .arg(dir.path().join("samples"))
            .args(args))
    };

    let out = infer(&["--count", "80", "--columns", "8"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("10 classes"),
        "{}",
        text(&out.stderr)
    );
    let (w, h) = image::image_dimensions(dir.path().join("samples/seed0-grid.png")).unwrap();
    assert_eq!((w, h), (8 * 66 + 2, 10 * 66 + 2));

    // Row r of the default grid is class r: the same seed with --class 3 reproduces row 3.
    let default_grid = image::open(dir.path().join("samples/seed0-grid.png"))
        .unwrap()
        .to_rgb8();
    let out = infer(&["--count", "80", "--columns", "8", "--class", "3"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let threes = image::open(dir.path().join("samples/seed0-grid.png"))
        .unwrap()
        .to_rgb8();
    let row = |img: &image::RgbImage, r: u32| -> Vec<u8> {
        (0..66)
            .flat_map(|y| (0..img.width()).map(move |x| (x, r * 66 + y)))
            .flat_map(|(x, y)| img.get_pixel(x, y).0)
            .collect()
    };
    assert_eq!(row(&default_grid, 3), row(&threes, 3));
    assert_ne!(row(&default_grid, 2), row(&threes, 2));

    for (args, needle) in [
        (
            vec!["--class", "10"],
            "--class 10 is out of range: the model has 10 classes",
        ),
        (vec!["--class", "-1"], "--class -1 is out of range"),
    ] {
        let out = infer(&args);
        assert!(!out.status.success(), "{args:?}");
        let err = text(&out.stderr);
        assert!(err.contains(needle) && err.contains("cond.onnx"), "{err}");
    }
}

#[test]
fn an_unconditional_model_refuses_class() {
    let dir = tempfile::tempdir().unwrap();
    let run_dir = dir.path().join("run");
    train_one_step(&run_dir, "dcgan-mnist28", &["--sample-every", "0"]);
    let onnx = dir.path().join("g.onnx");
    assert!(run(bin("sagan-export")
        .arg(&onnx)
        .arg("--checkpoint")
        .arg(&run_dir))
    .status
    .success());
    let out = run(bin("sagan-infer")
        .arg("--model")
        .arg(&onnx)
        .args(["--class", "1", "--out"])
        .arg(dir.path().join("samples")));
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("unconditional: --class does not apply"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn sagan_eval_reports_class_accuracy_for_a_conditional_model() {
    let dir = tempfile::tempdir().unwrap();
    let onnx = exported(dir.path());
    let out = run(bin("sagan-eval")
        .current_dir(dir.path())
        .arg("--model")
        .arg(&onnx)
        .args(["--data", "builtin", "--count", "200"]));
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", text(&out.stderr));
    let accuracy: f64 = stdout
        .lines()
        .find_map(|l| l.strip_prefix("class accuracy: "))
        .and_then(|l| l.split('%').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no class accuracy in:\n{stdout}"));
    assert!((0.0..=100.0).contains(&accuracy), "{accuracy}");
}
