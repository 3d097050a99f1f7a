//! sagan-export, run as users run it, on checkpoints that sagan-train wrote.

use assert_cmd::Command;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

mod common;

use common::bin;

/// Trains `preset` for one step and returns the run directory.
fn tiny_run(dir: &Path, preset: &str) -> PathBuf {
    let run = dir.join(preset);
    common::train_one_step(&run, preset, &["--sample-every", "0"]);
    run
}

/// The official ONNX checker, from the Python that tools/test.sh set up.
fn check_with_onnx_checker(files: &[PathBuf]) {
    let out = common::python_tool("check_onnx.py", files);
    assert!(
        out.status.success(),
        "onnx.checker rejected an export (or onnx is not installed: run tools/test.sh):\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn failure_line(cmd: &mut Command) -> String {
    let out = cmd.assert().failure().code(1).get_output().clone();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    assert!(!err.contains("panicked"), "{err}");
    err
}

#[test]
fn every_preset_exports_verified_models_that_pass_the_onnx_checker() {
    let dir = tempfile::tempdir().unwrap();
    let mut files = Vec::new();
    for preset in [
        "sagan-mnist28",
        "dcgan-mnist28",
        "sagan64",
        "dcgan64",
        "sagan-cond-mnist32",
    ] {
        let run = tiny_run(dir.path(), preset);
        for (suffix, flags) in [
            ("plain", vec![]),
            (
                "full",
                vec!["--attention-maps", "--decompose-conv-transpose"],
            ),
        ] {
            let out = dir.path().join(format!("{preset}-{suffix}.onnx"));
            let assert = bin("sagan-export")
                .arg(&out)
                .arg("--checkpoint")
                .arg(&run)
                .args(&flags)
                .assert()
                .success();
            let stdout = String::from_utf8_lossy(&assert.get_output().stdout).into_owned();
            assert!(
                stdout.contains(preset) && stdout.contains("max |candle - onnx|"),
                "{stdout}"
            );
            files.push(out);
        }
    }
    check_with_onnx_checker(&files);
}

/// The checkpoint passed as the output (an easy slip) or any file sagan did not write is never
/// replaced; a model sagan wrote is, and --force replaces anything but a checkpoint.
#[test]
fn export_never_replaces_what_it_did_not_write() {
    let dir = tempfile::tempdir().unwrap();
    let run = tiny_run(dir.path(), "dcgan-mnist28");
    let step = run.join("checkpoints/step-00000001");
    let generator = step.join("generator.safetensors");
    let before = std::fs::read(&generator).unwrap();
    let err = failure_line(
        bin("sagan-export")
            .arg(&generator)
            .arg("--checkpoint")
            .arg(&run),
    );
    assert!(
        err.contains("generator.safetensors") && err.contains("--checkpoint"),
        "{err}"
    );
    let err = failure_line(
        bin("sagan-export")
            .arg(&generator)
            .args(["--force", "--checkpoint"])
            .arg(&run),
    );
    assert!(err.contains(".safetensors"), "{err}");
    assert_eq!(
        std::fs::read(&generator).unwrap(),
        before,
        "the checkpoint was replaced"
    );

    let notes = dir.path().join("notes.onnx");
    std::fs::write(&notes, b"not a model").unwrap();
    let err = failure_line(
        bin("sagan-export")
            .arg(&notes)
            .arg("--checkpoint")
            .arg(&run),
    );
    assert!(
        err.contains("notes.onnx") && err.contains("--force"),
        "{err}"
    );
    assert_eq!(std::fs::read(&notes).unwrap(), b"not a model");
    let err = failure_line(
        bin("sagan-export")
            .arg(dir.path())
            .arg("--checkpoint")
            .arg(&run),
    );
    assert!(err.contains("directory"), "{err}");

    // Ours is replaced (a re-export), and --force replaces a foreign file.
    let model = dir.path().join("model.onnx");
    for _ in 0..2 {
        bin("sagan-export")
            .arg(&model)
            .arg("--checkpoint")
            .arg(&run)
            .assert()
            .success();
    }
    bin("sagan-export")
        .arg(&notes)
        .args(["--force", "--checkpoint"])
        .arg(&run)
        .assert()
        .success();
    assert_eq!(
        std::fs::read(&notes).unwrap(),
        std::fs::read(&model).unwrap()
    );

    // A preset without attention has no maps to add: said, not silently ignored.
    let out = bin("sagan-export")
        .env("RUST_LOG", "warn")
        .arg(dir.path().join("maps.onnx"))
        .args(["--attention-maps", "--checkpoint"])
        .arg(&run)
        .assert()
        .success()
        .get_output()
        .clone();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no attention layer"), "{err}");
}

/// A discriminator of another run copied into a step directory makes the export refuse it,
/// rather than export a generator whose checkpoint cannot be trusted.
#[test]
fn a_step_directory_mixing_runs_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let a = tiny_run(&dir.path().join("a"), "dcgan-mnist28");
    let b = tiny_run(&dir.path().join("b"), "dcgan-mnist28");
    let d_file = "checkpoints/step-00000001/discriminator.safetensors";
    std::fs::copy(b.join(d_file), a.join(d_file)).unwrap();
    let err = failure_line(
        bin("sagan-export")
            .arg(dir.path().join("m.onnx"))
            .arg("--checkpoint")
            .arg(&a),
    );
    assert!(
        err.contains("discriminator.safetensors") && err.contains("another run"),
        "{err}"
    );
}

#[test]
fn default_checkpoint_is_the_newest_run_and_raw_weights_are_selectable() {
    let dir = tempfile::tempdir().unwrap();
    tiny_run(&dir.path().join("runs"), "dcgan-mnist28");
    std::thread::sleep(std::time::Duration::from_millis(20));
    tiny_run(&dir.path().join("runs"), "sagan-mnist28");
    let out = bin("sagan-export")
        .current_dir(dir.path())
        .assert()
        .success()
        .get_output()
        .stdout
        .clone();
    let out = String::from_utf8_lossy(&out);
    assert!(
        out.starts_with("model.onnx: sagan-mnist28") && out.contains("generator_ema.safetensors"),
        "{out}"
    );
    assert!(dir.path().join("model.onnx").exists());
    let out = bin("sagan-export")
        .current_dir(dir.path())
        .args(["raw.onnx", "--raw"])
        .assert()
        .success()
        .get_output()
        .stdout
        .clone();
    assert!(String::from_utf8_lossy(&out).contains("/generator.safetensors"));
}

fn rewrite_metadata(from: &Path, to: &Path, key: &str, value: &str) {
    let bytes = std::fs::read(from).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let mut meta: HashMap<String, String> = header.metadata().clone().unwrap();
    meta.insert(key.into(), value.into());
    let tensors: Vec<_> = st.tensors();
    safetensors::serialize_to_file(tensors, Some(meta), to).unwrap();
}

#[test]
fn bad_checkpoints_and_outputs_are_clear_errors_and_leave_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    let run = tiny_run(dir.path(), "sagan-mnist28");
    let step = run.join("checkpoints/step-00000001");
    let out_dir = dir.path().join("out");
    std::fs::create_dir(&out_dir).unwrap();
    let out = out_dir.join("m.onnx");

    let truncated = dir.path().join("truncated.safetensors");
    let bytes = std::fs::read(step.join("generator.safetensors")).unwrap();
    std::fs::write(&truncated, &bytes[..bytes.len() / 3]).unwrap();
    let foreign = dir.path().join("foreign.safetensors");
    safetensors::serialize_to_file(
        Vec::<(&str, safetensors::tensor::TensorView)>::new(),
        None,
        &foreign,
    )
    .unwrap();
    let unknown = dir.path().join("unknown-preset.safetensors");
    rewrite_metadata(
        &step.join("generator.safetensors"),
        &unknown,
        "model",
        r#"{"name":"sagan-9000"}"#,
    );

    let cases: Vec<(PathBuf, &str)> = vec![
        (
            dir.path().join("missing.safetensors"),
            "missing.safetensors",
        ),
        (truncated.clone(), "truncated.safetensors"),
        (foreign.clone(), "not a sagan checkpoint"),
        (
            step.join("discriminator.safetensors"),
            "is a discriminator checkpoint",
        ),
        (
            step.join("optimizer.safetensors"),
            "is a optimizer checkpoint",
        ),
        (unknown.clone(), "unknown-preset.safetensors"),
        (dir.path().join("empty-dir"), "empty-dir"),
    ];
    std::fs::create_dir(dir.path().join("empty-dir")).unwrap();
    for (checkpoint, expected) in cases {
        let err = failure_line(
            bin("sagan-export")
                .arg(&out)
                .arg("--checkpoint")
                .arg(&checkpoint),
        );
        assert!(err.contains(expected), "{}: {err}", checkpoint.display());
    }
    let err = failure_line(
        bin("sagan-export")
            .arg(dir.path().join("no/such/dir/m.onnx"))
            .arg("--checkpoint")
            .arg(&run),
    );
    assert!(err.contains("no/such/dir/m.onnx"), "{err}");
    let err = failure_line(bin("sagan-export").current_dir(&out_dir).arg("m.onnx"));
    assert!(err.contains("sagan-train"), "{err}");
    assert_eq!(
        std::fs::read_dir(&out_dir).unwrap().count(),
        0,
        "something was left behind"
    );
}
