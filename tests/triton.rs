//! `sagan-export --triton`: model repositories checked against Triton's own ModelConfig schema
//! and ONNX Runtime (tools/check_triton.py), bad input refused with nothing written, and
//! tools/triton_client.py's latents and grids against sagan-infer's.
#![cfg(all(feature = "train", feature = "infer"))]

mod common;

use candle_core::Device;
use candle_nn::VarMap;
use common::{bin, manifest_dir, ort_lib};
use sagan::checkpoint::{self, Kind, Metadata};
use sagan::config::{ModelConfig, TrainConfig, BUILTIN_PRESETS};
use sagan::model::Generator;
use sagan::rng::{seeded_var_builder, stream};
use std::path::{Path, PathBuf};
use std::process::Output;

/// A generator checkpoint of `preset` with freshly initialised weights: what export needs,
/// without the cost of a training step (sagan128's is a minute on two cores).
fn fresh_checkpoint(dir: &Path, preset: &str, step: usize) -> PathBuf {
    let cfg = ModelConfig::resolve(preset).unwrap();
    let varmap = VarMap::new();
    Generator::new(
        seeded_var_builder(&varmap, stream(1, 1), &Device::Cpu),
        &cfg,
    )
    .unwrap();
    let path = dir.join(format!("{preset}-{step}.safetensors"));
    let meta = Metadata {
        kind: Kind::GeneratorEma,
        model: cfg,
        train: TrainConfig::default(),
        step,
        run_id: None,
    };
    checkpoint::save(&path, &checkpoint::varmap_tensors(&varmap), &meta).unwrap();
    path
}

fn python<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> Output {
    let python = std::env::var("SAGAN_PYTHON").unwrap_or_else(|_| "python3".into());
    std::process::Command::new(&python)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{python}: {e} (run the tests through tools/test.sh)"))
}

fn check_triton(model_dirs: &[PathBuf]) -> Output {
    let mut args = vec![manifest_dir().join("tools/check_triton.py")];
    args.extend_from_slice(model_dirs);
    python(&args)
}

fn export(repo: &Path, checkpoint: &Path, flags: &[&str]) -> String {
    let out = bin("sagan-export")
        .arg("--triton")
        .arg(repo)
        .arg("--checkpoint")
        .arg(checkpoint)
        .args(flags)
        .assert()
        .success()
        .get_output()
        .stdout
        .clone();
    String::from_utf8(out).unwrap()
}

#[test]
fn every_preset_exports_a_repository_that_matches_triton_schema_and_onnx_runtime() {
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo");
    let mut model_dirs = Vec::new();
    for (i, (preset, _)) in BUILTIN_PRESETS.iter().enumerate() {
        let checkpoint = fresh_checkpoint(dir.path(), preset, 10);
        // Small batches keep check_triton's warm-up runs fast; each preset gets other options.
        let flags: &[&str] = match i % 3 {
            0 => &["--max-batch", "4", "--kind", "cpu"],
            1 => &["--max-batch", "3", "--instances", "2", "--tensorrt"],
            _ => &[
                "--max-batch",
                "1",
                "--tensorrt",
                "--trt-fp16",
                "--attention-maps",
            ],
        };
        let stdout = export(&repo, &checkpoint, flags);
        assert!(
            stdout.contains(&format!("Triton model '{preset}' version 1")),
            "{stdout}"
        );
        let model_dir = repo.join(preset);
        assert!(model_dir.join("1/model.onnx").is_file());
        model_dirs.push(model_dir);
    }
    // A later export of the same model: a new version, the unedited config replaced with the
    // new step; then an edited config is left alone.
    let cond = repo.join("sagan-cond-mnist32");
    let later = fresh_checkpoint(dir.path(), "sagan-cond-mnist32", 20);
    let stdout = export(&repo, &later, &["--max-batch", "4", "--kind", "cpu"]);
    assert!(
        stdout.contains("version 2") && stdout.contains("replaced"),
        "{stdout}"
    );
    let config = std::fs::read_to_string(cond.join("config.pbtxt")).unwrap();
    assert!(config.contains(r#"key: "sagan.step" value { string_value: "20" }"#));
    std::fs::write(
        cond.join("config.pbtxt"),
        config.replace("count: 1", "count: 3"),
    )
    .unwrap();
    let stdout = export(&repo, &later, &["--max-batch", "4", "--kind", "cpu"]);
    assert!(
        stdout.contains("version 3") && stdout.contains("kept as edited"),
        "{stdout}"
    );
    assert!(std::fs::read_to_string(cond.join("config.pbtxt"))
        .unwrap()
        .contains("count: 3"));
    let names: Vec<String> = std::fs::read_dir(&repo)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names.len(), BUILTIN_PRESETS.len(), "{names:?}");

    let out = check_triton(&model_dirs);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "check_triton.py (needs tritonclient and onnxruntime: run tools/test.sh):\n{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        stdout.matches(": ok (").count(),
        model_dirs.len(),
        "{stdout}"
    );
    assert!(stdout.contains("versions [1, 2, 3]"), "{stdout}");

    // The checker is not a rubber stamp: a config whose image shape disagrees with the graph
    // fails.
    let broken = dir.path().join("broken").join("sagan64");
    std::fs::create_dir_all(&broken).unwrap();
    std::fs::rename(repo.join("sagan64/1"), broken.join("1")).unwrap();
    let config = std::fs::read_to_string(repo.join("sagan64/config.pbtxt")).unwrap();
    std::fs::write(
        broken.join("config.pbtxt"),
        config.replacen("dims: [ 3, 64, 64 ]", "dims: [ 3, 64, 63 ]", 1),
    )
    .unwrap();
    let out = check_triton(&[broken]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("output image: [3, 64, 63] vs ONNX [3, 64, 64]"),
        "{err}"
    );
}

/// Everything under `dir`, hidden files included, for "nothing was written" checks.
fn tree(dir: &Path) -> Vec<PathBuf> {
    let mut all = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            all.extend(tree(&path));
        }
        all.push(path);
    }
    all.sort();
    all
}

#[test]
fn bad_repositories_names_and_options_are_one_line_errors_and_write_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let checkpoint = fresh_checkpoint(dir.path(), "sagan-mnist28", 1);
    let other = fresh_checkpoint(dir.path(), "sagan-cond-mnist32", 1);
    let work = dir.path().join("work");
    std::fs::create_dir(&work).unwrap();
    // Not a repository: a project folder with a file and a directory that is no model.
    let project = work.join("project");
    std::fs::create_dir_all(project.join("src")).unwrap();
    std::fs::write(project.join("notes.txt"), "mine").unwrap();
    let file = work.join("file");
    std::fs::write(&file, "mine").unwrap();
    // A repository with a model sagan-export did not write, and one it did (sagan-mnist28).
    let repo = work.join("repo");
    std::fs::create_dir_all(repo.join("theirs/1")).unwrap();
    std::fs::write(repo.join("theirs/config.pbtxt"), "name: \"theirs\"\n").unwrap();
    export(&repo, &checkpoint, &[]);
    let before = tree(&work);

    let new_repo = work.join("new-repo");
    let missing_parent = work.join("no/such/dir");
    let repo_s = repo.to_str().unwrap();
    let cases: Vec<(Vec<&str>, &Path, &str)> = vec![
        (
            vec![],
            &project,
            "is not a Triton model repository ('notes.txt'",
        ),
        (vec![], &file, "it is a file"),
        (vec![], &missing_parent, "parent directory does not exist"),
        (
            vec!["--name", "a/b"],
            &new_repo,
            "'a/b' is not a usable Triton model name",
        ),
        (vec!["--name", ".."], &new_repo, "'..' is not a usable"),
        (
            vec!["--name", "has space"],
            &new_repo,
            "'has space' is not a usable",
        ),
        (
            vec!["--max-batch", "0"],
            &new_repo,
            "--max-batch must be at least 1",
        ),
        (
            vec!["--instances", "0"],
            &new_repo,
            "--instances must be at least 1",
        ),
        (
            vec!["--kind", "cpu", "--tensorrt"],
            &new_repo,
            "--tensorrt needs --kind gpu",
        ),
        (
            vec!["--name", "theirs"],
            &repo,
            "was not written by sagan-export",
        ),
    ];
    for (flags, target, expected) in cases {
        let out = bin("sagan-export")
            .arg("--triton")
            .arg(target)
            .arg("--checkpoint")
            .arg(&checkpoint)
            .args(&flags)
            .assert()
            .failure()
            .code(1)
            .get_output()
            .clone();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.trim().lines().count(), 1, "{flags:?}: {err}");
        assert!(
            err.contains(expected),
            "{flags:?} {}: {err}",
            target.display()
        );
        assert_eq!(tree(&work), before, "{flags:?}: something was written");
    }
    // Another model under an existing sagan model's name: one config cannot serve both.
    let out = bin("sagan-export")
        .args([
            "--triton",
            repo_s,
            "--name",
            "sagan-mnist28",
            "--checkpoint",
        ])
        .arg(&other)
        .assert()
        .failure()
        .get_output()
        .clone();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("sagan-mnist28/1/model.onnx") && err.contains("other inputs or outputs"),
        "{err}"
    );
    assert_eq!(tree(&work), before, "something was written");
    // --trt-fp16 alone and repository flags without --triton are usage errors (clap's).
    for flags in [
        vec!["--triton", repo_s, "--trt-fp16"],
        vec!["--max-batch", "8"],
    ] {
        bin("sagan-export").args(&flags).assert().failure().code(2);
    }
}

fn latents_from_client(seed: u64, n: usize, z_dim: usize, truncation: Option<f32>) -> Vec<f32> {
    let script = manifest_dir().join("tests/triton_client_local.py");
    let args: Vec<String> = [
        script.display().to_string(),
        "--latents".into(),
        seed.to_string(),
        n.to_string(),
        z_dim.to_string(),
    ]
    .into_iter()
    .chain(truncation.map(|t| t.to_string()))
    .collect();
    let out = python(&args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .map(|w| f32::from_bits(u32::from_str_radix(w, 16).unwrap()))
        .collect()
}

#[test]
fn the_client_draws_sagan_infers_latents_bit_for_bit() {
    use sagan::infer::latent::{latents, truncated_latents};
    // 20000 values per seed: the ziggurat's slow paths (edge strips, the tail) are taken
    // hundreds of times.
    for seed in [0, 1, 12345] {
        let want = latents(seed, 100, 200);
        let got = latents_from_client(seed, 100, 200, None);
        let first_diff = want
            .iter()
            .zip(&got)
            .position(|(a, b)| a.to_bits() != b.to_bits());
        assert_eq!(got.len(), want.len());
        assert_eq!(first_diff, None, "seed {seed}");
    }
    let want = truncated_latents(3, 40, 64, 0.5).unwrap();
    assert_eq!(latents_from_client(3, 40, 64, Some(0.5)), want);
}

#[test]
fn the_clients_grid_is_sagan_infers_for_the_same_seed() {
    let dir = tempfile::tempdir().unwrap();
    for (preset, count, columns) in [("sagan-cond-mnist32", 12, 5), ("dcgan64", 5, 2)] {
        let checkpoint = fresh_checkpoint(dir.path(), preset, 1);
        let onnx = dir.path().join(format!("{preset}.onnx"));
        bin("sagan-export")
            .arg(&onnx)
            .arg("--checkpoint")
            .arg(&checkpoint)
            .assert()
            .success();
        let out = dir.path().join(preset);
        bin("sagan-infer")
            .env("ORT_DYLIB_PATH", ort_lib())
            .arg("--model")
            .arg(&onnx)
            .args(["--seed", "9", "--count", &count.to_string()])
            .args(["--columns", &columns.to_string(), "--out"])
            .arg(&out)
            .assert()
            .success();
        let client_png = dir.path().join(format!("{preset}-client.png"));
        let script = manifest_dir().join("tests/triton_client_local.py");
        let run = python(&[
            script.into_os_string(),
            onnx.clone().into_os_string(),
            "9".into(),
            count.to_string().into(),
            columns.to_string().into(),
            client_png.clone().into_os_string(),
        ]);
        assert!(
            run.status.success(),
            "{}",
            String::from_utf8_lossy(&run.stderr)
        );
        let want = image::open(out.join("seed9-grid.png")).unwrap().to_rgb8();
        let got = image::open(&client_png).unwrap().to_rgb8();
        assert_eq!(got.dimensions(), want.dimensions(), "{preset}");
        let differing = got
            .pixels()
            .zip(want.pixels())
            .filter(|(a, b)| a != b)
            .count();
        assert_eq!(differing, 0, "{preset}: {differing} pixels differ");
    }
}
