//! sagan-train, run as users run it.

mod common;

use assert_cmd::Command;
use predicates::prelude::*;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(name)
}

fn train() -> Command {
    let mut cmd = Command::cargo_bin("sagan-train").unwrap();
    cmd.env("RUST_LOG", "warn");
    cmd
}

/// A short run's flags: small batches so tests stay quick on two cores.
const QUICK: &[&str] = &["--batch-size", "16", "--threads", "2", "--log-every", "1"];

/// All tensors of a safetensors file as raw bytes, for bit-exact comparison.
fn tensors(path: &Path) -> HashMap<String, Vec<u8>> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(name, view)| (name, view.data().to_vec()))
        .collect()
}

fn stderr_of(cmd: &mut Command) -> String {
    let out = cmd.assert().failure().code(1).get_output().clone();
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn help_teaches_the_main_options() {
    train().arg("--help").assert().success().stdout(
        predicate::str::contains("--resume")
            .and(predicate::str::contains("--preset"))
            .and(predicate::str::contains("--no-tensorboard"))
            .and(predicate::str::contains("sagan-mnist28")),
    );
}

#[test]
fn short_run_writes_checkpoints_samples_metrics_and_curves() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    train()
        .args(QUICK)
        .args([
            "--steps",
            "4",
            "--sample-every",
            "2",
            "--checkpoint-every",
            "2",
            "--keep-last",
            "1",
            "--out",
        ])
        .arg(&run)
        .assert()
        .success();
    let ckpt = run.join("checkpoints/step-00000004");
    for file in ["generator", "generator_ema", "discriminator", "optimizer"] {
        assert!(ckpt.join(format!("{file}.safetensors")).exists(), "{file}");
    }
    assert!(
        !run.join("checkpoints/step-00000002").exists(),
        "--keep-last 1 keeps one"
    );
    let bytes = std::fs::read(ckpt.join("generator.safetensors")).unwrap();
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let meta = header.metadata().clone().unwrap();
    assert_eq!(meta["kind"], "generator");
    assert_eq!(meta["step"], "4");
    assert!(meta["model"].contains("sagan-mnist28"));
    for png in [
        "samples/step-00000002.png",
        "samples/step-00000004.png",
        "samples/attention-g2-step-00000004.png",
        "curves.png",
    ] {
        image::open(run.join(png)).unwrap_or_else(|e| panic!("{png}: {e}"));
    }
    let metrics = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    let lines: Vec<serde_json::Value> = metrics
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 4);
    for key in [
        "step",
        "d_loss",
        "g_loss",
        "d_real",
        "d_fake",
        "gammas",
        "images_per_sec",
    ] {
        assert!(lines[3].get(key).is_some(), "metrics lack {key}");
    }
    assert!(
        lines[3]["gammas"].get("g.layers.2").is_some()
            && lines[3]["gammas"].get("d.layers.1").is_some()
    );
}

#[test]
fn every_simd_level_trains_the_same_weights() {
    // The kernels' loops run compiled for AVX-512, AVX2 or baseline x86-64, whichever the CPU
    // has; capped with SAGAN_SIMD, a run must give the same bits (on a CPU without AVX-512
    // some of these runs are the same level, and the test still holds).
    let dir = tempfile::tempdir().unwrap();
    let runs: Vec<PathBuf> = ["baseline", "avx2", "auto"]
        .iter()
        .map(|level| {
            let run = dir.path().join(level);
            train()
                .env("SAGAN_SIMD", level)
                .args(QUICK)
                .args([
                    "--steps",
                    "2",
                    "--sample-every",
                    "0",
                    "--seed",
                    "3",
                    "--out",
                ])
                .arg(&run)
                .assert()
                .success();
            run
        })
        .collect();
    for file in ["generator", "discriminator", "optimizer"] {
        let name = format!("checkpoints/step-00000002/{file}.safetensors");
        let want = tensors(&runs[0].join(&name));
        for run in &runs[1..] {
            let got = tensors(&run.join(&name));
            assert_eq!(got.len(), want.len(), "{file}");
            for (tensor, bytes) in &want {
                assert!(got[tensor] == *bytes, "{run:?} {file}: {tensor} differs");
            }
        }
    }
}

#[test]
fn resume_is_bit_identical_to_an_uninterrupted_run() {
    let dir = tempfile::tempdir().unwrap();
    let (straight, split) = (dir.path().join("straight"), dir.path().join("split"));
    let common = [
        "--sample-every",
        "0",
        "--checkpoint-every",
        "2",
        "--seed",
        "7",
    ];
    train()
        .args(QUICK)
        .args(common)
        .args(["--steps", "4", "--no-tensorboard", "--out"])
        .arg(&straight)
        .assert()
        .success();
    train()
        .args(QUICK)
        .args(common)
        .args(["--steps", "2", "--out"])
        .arg(&split)
        .assert()
        .success();
    train()
        .args([
            "--threads",
            "2",
            "--log-every",
            "1",
            "--steps",
            "4",
            "--resume",
        ])
        .arg(&split)
        .assert()
        .success();
    for file in ["generator", "generator_ema", "discriminator", "optimizer"] {
        let name = format!("checkpoints/step-00000004/{file}.safetensors");
        let (a, b) = (tensors(&straight.join(&name)), tensors(&split.join(&name)));
        assert_eq!(a.len(), b.len(), "{file}");
        for (tensor, bytes) in &a {
            assert!(b[tensor] == *bytes, "{file}: {tensor} differs after resume");
        }
    }
    // The resumed run's metrics continue the first part's.
    let metrics = std::fs::read_to_string(split.join("metrics.jsonl")).unwrap();
    let steps: Vec<u64> = metrics
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["step"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(steps, vec![1, 2, 3, 4]);
    let event_files = |run: &Path| {
        std::fs::read_dir(run)
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .contains("tfevents")
            })
            .count()
    };
    assert_eq!(event_files(&straight), 0, "--no-tensorboard");
    assert_eq!(event_files(&split), 2, "one event file per process");
}

#[test]
fn trains_on_an_image_folder_with_any_preset_shape() {
    let dir = tempfile::tempdir().unwrap();
    let preset = dir.path().join("tiny16.toml");
    std::fs::write(
        &preset,
        r#"
name = "tiny16"
channels = 3
image_size = 16
z_dim = 16
[generator]
layers = [
  { type = "conv_transpose", out = 32, kernel = 4, batch_norm = true, act = "relu" },
  { type = "conv_transpose", out = 16, kernel = 4, stride = 2, padding = 1, batch_norm = true, act = "relu" },
  { type = "attention" },
  { type = "conv_transpose", out = 3, kernel = 4, stride = 2, padding = 1, act = "tanh" },
]
[discriminator]
layers = [
  { type = "conv", out = 16, kernel = 4, stride = 2, padding = 1, act = "leaky_relu" },
  { type = "attention" },
  { type = "conv", out = 1, kernel = 8 },
]
"#,
    )
    .unwrap();
    let run = dir.path().join("run");
    train()
        .args([
            "--threads",
            "2",
            "--batch-size",
            "4",
            "--steps",
            "2",
            "--preset",
        ])
        .arg(&preset)
        .arg("--data")
        .arg(fixture("images-small"))
        .arg("--out")
        .arg(&run)
        .assert()
        .success();
    let grid = image::open(run.join("samples/step-00000002.png")).unwrap();
    assert!(grid.width() > 0);
}

#[test]
fn bad_data_is_one_clear_error_naming_the_file() {
    let cases: [(PathBuf, &str); 4] = [
        (fixture("does-not-exist"), "does-not-exist"),
        (fixture("no-images"), "no-images"),
        (fixture("corrupt"), "not-an-image.png"),
        (
            fixture("corrupt/truncated-images-idx3-ubyte.gz"),
            "truncated",
        ),
    ];
    for (path, expected) in cases {
        let dir = tempfile::tempdir().unwrap();
        let err = stderr_of(
            train()
                .args(QUICK)
                .arg("--data")
                .arg(&path)
                .arg("--out")
                .arg(dir.path().join("run")),
        );
        assert!(err.contains(expected), "{}: {err}", path.display());
        assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
        assert!(!err.contains("panicked"));
    }
}

#[test]
fn bad_flag_values_are_rejected_before_any_work() {
    for (args, expected) in [
        (vec!["--lr-d", "-1"], "--lr-d"),
        (vec!["--batch-size", "0"], "--batch-size"),
        (vec!["--beta2", "1.5"], "--beta2"),
        (vec!["--threads", "0"], "--threads"),
        (vec!["--ema-decay", "2"], "--ema-decay"),
        (vec!["--batch-size", "100000"], "batch size"),
        (vec!["--keep-last", "0"], "--keep-last"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let err = stderr_of(train().args(&args).arg("--out").arg(dir.path().join("run")));
        assert!(err.contains(expected), "{args:?}: {err}");
    }
    train()
        .args(["--preset", "nope"])
        .assert()
        .failure()
        .stderr(predicate::str::contains("sagan-mnist28"));
    train().args(["--steps", "ten"]).assert().failure().code(2);
}

/// A CUDA build's refusal (no GPU or driver) is a unit test of `train::device`: whether it
/// refuses depends on the machine.
#[cfg(not(feature = "cuda"))]
#[test]
fn a_device_this_build_cannot_use_is_one_line_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    for device in ["cuda", "cuda:1"] {
        let err = stderr_of(train().args(["--device", device]).arg("--out").arg(&run));
        assert_eq!(
            err.trim(),
            "error: this build has no CUDA support: rebuild with --features cuda"
        );
        assert!(!run.exists(), "--device {device} created the run directory");
    }
    train()
        .args(["--device", "gpu"])
        .arg("--out")
        .arg(&run)
        .assert()
        .failure()
        .code(2)
        .stderr(predicate::str::contains("cpu, cuda or cuda:N"));
}

#[test]
fn existing_runs_are_never_overwritten_and_resume_checks_the_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    train()
        .args(QUICK)
        .args(["--steps", "1", "--sample-every", "0", "--out"])
        .arg(&run)
        .assert()
        .success();
    let generator = run.join("checkpoints/step-00000001/generator.safetensors");
    let before = std::fs::read(&generator).unwrap();

    let err = stderr_of(
        train()
            .args(QUICK)
            .args(["--steps", "2", "--out"])
            .arg(&run),
    );
    assert!(
        err.contains("already holds checkpoints") && err.contains("--resume"),
        "{err}"
    );

    let err = stderr_of(
        train()
            .args(["--preset", "dcgan-mnist28", "--resume"])
            .arg(&run),
    );
    assert!(err.contains("--preset"), "{err}");

    let err = stderr_of(train().args(["--steps", "1", "--resume"]).arg(&run));
    assert!(err.contains("already at step 1"), "{err}");

    // A checkpoint of another preset copied into the run.
    let other = dir.path().join("other");
    train()
        .args(QUICK)
        .args([
            "--preset",
            "dcgan-mnist28",
            "--steps",
            "1",
            "--sample-every",
            "0",
            "--out",
        ])
        .arg(&other)
        .assert()
        .success();
    let d_file = "checkpoints/step-00000001/discriminator.safetensors";
    let own_d = std::fs::read(run.join(d_file)).unwrap();
    std::fs::copy(other.join(d_file), run.join(d_file)).unwrap();
    let err = stderr_of(
        train()
            .args(["--threads", "2", "--steps", "2", "--resume"])
            .arg(&run),
    );
    assert!(
        err.contains("discriminator.safetensors") && err.contains("preset"),
        "{err}"
    );

    // A truncated checkpoint file.
    std::fs::write(run.join(d_file), &own_d[..own_d.len() / 2]).unwrap();
    let err = stderr_of(
        train()
            .args(["--threads", "2", "--steps", "2", "--resume"])
            .arg(&run),
    );
    assert!(err.contains("discriminator.safetensors"), "{err}");

    assert_eq!(
        std::fs::read(&generator).unwrap(),
        before,
        "the checkpoint was touched"
    );
    assert!(!run.join("checkpoints/step-00000002").exists());

    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let err = stderr_of(train().arg("--resume").arg(&empty));
    assert!(err.contains("no checkpoint"), "{err}");
}

/// Waits until `run`'s metrics.jsonl has `lines` records.
fn wait_for_metrics(run: &Path, lines: usize) {
    let metrics = run.join("metrics.jsonl");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while std::fs::read_to_string(&metrics)
        .map(|m| m.lines().count())
        .unwrap_or(0)
        < lines
    {
        assert!(
            std::time::Instant::now() < deadline,
            "training did not start"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// A trainer that would run for minutes, without checkpoints until it is stopped.
fn long_run(run: &Path) -> std::process::Child {
    std::process::Command::new(assert_cmd::cargo::cargo_bin("sagan-train"))
        .args(QUICK)
        .args([
            "--steps",
            "1000",
            "--sample-every",
            "0",
            "--checkpoint-every",
            "0",
            "--out",
        ])
        .arg(run)
        .env("RUST_LOG", "warn")
        .spawn()
        .unwrap()
}

fn step_dirs(run: &Path) -> Vec<String> {
    let mut steps: Vec<_> = std::fs::read_dir(run.join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.starts_with("step-"))
        .collect();
    steps.sort();
    steps
}

/// A second trainer on a run directory in use is refused with the holder's pid (before, two
/// trainers interleaved their checkpoint files); SIGTERM, as `kill` and container runtimes
/// send it, stops the holder with a checkpoint like Ctrl-C.
#[cfg(unix)]
#[test]
fn one_trainer_per_run_and_sigterm_saves_a_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let mut child = long_run(&run);
    wait_for_metrics(&run, 1);
    let holder = format!("pid {}", child.id());
    let fresh = stderr_of(train().args(QUICK).arg("--out").arg(&run));
    let resumed = stderr_of(train().arg("--resume").arg(&run));
    for err in [fresh, resumed] {
        assert!(err.contains(&holder) && err.contains("training"), "{err}");
    }
    let kill = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    assert_eq!(child.wait().unwrap().code(), Some(130));
    assert_eq!(step_dirs(&run).len(), 1, "no checkpoint on SIGTERM");
}

/// A resumed run writes on its own schedule, not the defaults, and clears what an interrupted
/// checkpoint write left.
#[test]
fn a_resumed_run_keeps_its_schedule_and_clears_stale_partials() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    train()
        .args(QUICK)
        .args([
            "--steps",
            "2",
            "--sample-every",
            "0",
            "--checkpoint-every",
            "1",
            "--keep-last",
            "9",
            "--out",
        ])
        .arg(&run)
        .assert()
        .success();
    let partial = run.join("checkpoints/.step-00000003.partial");
    std::fs::create_dir(&partial).unwrap();
    train()
        .args(["--threads", "2", "--steps", "4", "--resume"])
        .arg(&run)
        .assert()
        .success();
    assert_eq!(
        step_dirs(&run),
        [
            "step-00000001",
            "step-00000002",
            "step-00000003",
            "step-00000004"
        ]
    );
    assert!(!partial.exists());
}

/// A newer step directory of another run dropped into a run is refused on resume instead of
/// being trained on as if it were the run's own.
#[test]
fn a_step_directory_of_another_run_is_not_resumed() {
    let dir = tempfile::tempdir().unwrap();
    let (run, other) = (dir.path().join("run"), dir.path().join("other"));
    for (out, preset, steps) in [(&run, "sagan-mnist28", "1"), (&other, "dcgan-mnist28", "2")] {
        train()
            .args(QUICK)
            .args([
                "--preset",
                preset,
                "--steps",
                steps,
                "--sample-every",
                "0",
                "--out",
            ])
            .arg(out)
            .assert()
            .success();
    }
    let foreign = run.join("checkpoints/step-00000002");
    std::fs::create_dir(&foreign).unwrap();
    for entry in std::fs::read_dir(other.join("checkpoints/step-00000002")).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), foreign.join(entry.file_name())).unwrap();
    }
    let err = stderr_of(train().args(["--steps", "3", "--resume"]).arg(&run));
    assert!(
        err.contains("step-00000002")
            && err.contains("another run")
            && err.contains("dcgan-mnist28"),
        "{err}"
    );
    assert!(!run.join("checkpoints/step-00000003").exists());
}

/// An absurd learning rate: the weights go non-finite in the first step. No checkpoint with
/// NaN is written (before, step 1's was 99 % NaN), and the error says so.
#[test]
fn a_diverging_run_writes_no_non_finite_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let err = stderr_of(
        train()
            .args(QUICK)
            .args(["--lr-d", "1e10", "--lr-g", "1e10", "--steps", "4"])
            .args(["--checkpoint-every", "1", "--sample-every", "0", "--out"])
            .arg(&run),
    );
    assert!(
        err.contains("training diverged at step 1") && err.contains("no checkpoint was written"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(step_dirs(&run).is_empty());
    // What was logged reads back (a resumed or inspected run parses it).
    let metrics = sagan::train::metrics::read(&run.join("metrics.jsonl")).unwrap();
    assert!(metrics.iter().all(|r| r.step <= 1));
}

#[cfg(unix)]
#[test]
fn ctrl_c_writes_a_checkpoint_and_the_run_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let mut child = long_run(&run);
    wait_for_metrics(&run, 2);
    let kill = std::process::Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(130));
    let steps = step_dirs(&run);
    assert_eq!(steps.len(), 1, "{steps:?}");
    let step: usize = steps[0].trim_start_matches("step-").parse().unwrap();
    assert!(step >= 2);
    train()
        .args(["--threads", "2", "--steps"])
        .arg((step + 1).to_string())
        .arg("--resume")
        .arg(&run)
        .assert()
        .success();
    assert!(run
        .join(format!("checkpoints/step-{:08}", step + 1))
        .exists());
}

#[test]
fn eval_every_logs_fid_and_keeps_the_best_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    train()
        .env("ORT_DYLIB_PATH", common::ort_lib())
        .args(QUICK)
        .args([
            "--steps",
            "4",
            "--sample-every",
            "0",
            "--eval-every",
            "2",
            "--eval-count",
            "300",
            "--out",
        ])
        .arg(&run)
        .assert()
        .success();
    let metrics = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    let fids: Vec<(u64, f64)> = metrics
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter_map(|r| Some((r["step"].as_u64()?, r.get("fid")?.as_f64()?)))
        .collect();
    assert_eq!(
        fids.iter().map(|(s, _)| *s).collect::<Vec<_>>(),
        vec![2, 4],
        "{metrics}"
    );
    assert!(fids.iter().all(|(_, f)| f.is_finite() && *f > 0.0));
    let best_step = fids.iter().min_by(|a, b| a.1.total_cmp(&b.1)).unwrap().0;
    let bytes = std::fs::read(run.join("checkpoints/best/generator.safetensors")).unwrap();
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    assert_eq!(
        header.metadata().as_ref().unwrap()["step"],
        best_step.to_string()
    );

    // Colour presets need a feature network for FID (the built-in one reads greyscale digits).
    let err = stderr_of(
        train()
            .args(QUICK)
            .args(["--preset", "sagan64", "--eval-every", "1", "--out"])
            .arg(dir.path().join("x")),
    );
    assert!(
        err.contains("--feature-net") && err.contains("3x64x64"),
        "{err}"
    );

    // A network whose feature output has another name: the error's advice works here.
    let net = fixture("fid/embedding-net.onnx");
    let fid_run = |extra: &[&str], out: &str| {
        let mut cmd = train();
        cmd.env("ORT_DYLIB_PATH", common::ort_lib())
            .args(QUICK)
            .args(["--steps", "1", "--sample-every", "0", "--eval-every", "1"])
            .args(["--eval-count", "50", "--feature-net"])
            .arg(&net)
            .args(extra)
            .arg("--out")
            .arg(dir.path().join(out));
        cmd
    };
    let err = stderr_of(&mut fid_run(&[], "y"));
    assert!(err.contains("--features-output"), "{err}");
    fid_run(&["--features-output", "embedding"], "z")
        .assert()
        .success();
}

/// A real trainer SIGKILLed at seeded random moments (mid-step, mid-checkpoint, mid-log), then
/// resumed each time, ends bit-identical to a run never interrupted.
#[cfg(unix)]
#[test]
fn killed_at_random_moments_a_run_resumes_to_the_same_weights() {
    use rand::{Rng, SeedableRng};
    const STEPS: usize = 12;
    const KILLS: usize = 8;
    let dir = tempfile::tempdir().unwrap();
    let flags = [
        "--batch-size",
        "8",
        "--threads",
        "2",
        "--sample-every",
        "4",
        "--checkpoint-every",
        "1",
        "--log-every",
        "1",
        "--seed",
        "3",
    ];
    let straight = dir.path().join("straight");
    train()
        .args(flags)
        .args(["--steps", &STEPS.to_string(), "--out"])
        .arg(&straight)
        .assert()
        .success();

    let run = dir.path().join("killed");
    let latest = || {
        std::fs::read_dir(run.join("checkpoints"))
            .map(|entries| {
                entries
                    .filter_map(|e| {
                        let name = e.ok()?.file_name().into_string().ok()?;
                        name.strip_prefix("step-")?.parse::<usize>().ok()
                    })
                    .max()
            })
            .unwrap_or(None)
    };
    let start = || {
        let mut cmd = std::process::Command::new(assert_cmd::cargo::cargo_bin("sagan-train"));
        cmd.env("RUST_LOG", "warn")
            .stderr(std::process::Stdio::null());
        match latest() {
            None => cmd
                .args(flags)
                .args(["--steps", &STEPS.to_string(), "--out"])
                .arg(&run),
            Some(_) => cmd.arg("--resume").arg(&run),
        };
        cmd.spawn().unwrap()
    };
    let metric_lines =
        || std::fs::read_to_string(run.join("metrics.jsonl")).map_or(0, |m| m.lines().count());
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(26);
    let (mut kills, mut reached) = (0, Vec::new());
    while kills < KILLS && latest() != Some(STEPS) {
        // Kill once the process is training (it has logged a new step), a random moment
        // later: inside a step, a checkpoint write or a log append.
        let logged = metric_lines();
        let mut child = start();
        while metric_lines() <= logged && child.try_wait().unwrap().is_none() {
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        std::thread::sleep(std::time::Duration::from_millis(rng.random_range(0..120)));
        if child.try_wait().unwrap().is_none() {
            child.kill().unwrap();
            kills += 1;
        }
        child.wait().unwrap();
        reached.push(latest().unwrap_or(0));
    }
    if latest() != Some(STEPS) {
        assert!(start().wait().unwrap().success());
    }
    println!("{kills} kills survived; checkpoint step after each start: {reached:?}");
    assert!(
        kills >= KILLS / 2,
        "too few kills landed ({kills}): the runs end too fast"
    );
    for file in ["generator", "generator_ema", "discriminator", "optimizer"] {
        let name = format!("checkpoints/step-{STEPS:08}/{file}.safetensors");
        let (a, b) = (tensors(&straight.join(&name)), tensors(&run.join(&name)));
        assert_eq!(a.len(), b.len(), "{file}");
        for (tensor, bytes) in &a {
            assert!(
                b[tensor] == *bytes,
                "{file}: {tensor} differs after {kills} kills"
            );
        }
    }
    // Every step is logged once, in order.
    let steps: Vec<usize> = sagan::train::metrics::read(&run.join("metrics.jsonl"))
        .unwrap()
        .iter()
        .map(|r| r.step)
        .collect();
    assert_eq!(steps, (1..=STEPS).collect::<Vec<_>>());
}

/// The run's TensorBoard event files as the `tensorboard` package reads them.
fn read_tensorboard(run: &Path) -> serde_json::Value {
    let out = common::python_tool("read_tensorboard.py", [run]);
    assert!(
        out.status.success(),
        "tools/read_tensorboard.py failed (is tensorboard installed? run tools/test.sh):\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Every summary value of a file, in reading order: (step, "scalars" or "images", tag, value).
fn summary_values(file: &serde_json::Value) -> Vec<(u64, &str, String, serde_json::Value)> {
    let mut values = Vec::new();
    for event in file["events"].as_array().unwrap() {
        let step = event["step"].as_u64().unwrap();
        for kind in ["scalars", "images"] {
            for (tag, v) in event
                .get(kind)
                .and_then(|v| v.as_object())
                .into_iter()
                .flatten()
            {
                values.push((step, kind, tag.clone(), v.clone()));
            }
        }
    }
    values
}

fn checkpoint_steps(run: &Path) -> Vec<u64> {
    let mut steps: Vec<u64> = std::fs::read_dir(run.join("checkpoints"))
        .unwrap()
        .filter_map(|e| {
            e.ok()?
                .file_name()
                .to_str()?
                .strip_prefix("step-")?
                .parse()
                .ok()
        })
        .collect();
    steps.sort();
    steps
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

#[cfg(unix)]
#[test]
fn tensorboard_shows_every_metric_and_picture_once_across_a_kill_and_resume() {
    use std::collections::{BTreeMap, BTreeSet, HashSet};
    use std::time::{Duration, Instant};
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let schedule = [
        "--sample-every",
        "2",
        "--checkpoint-every",
        "2",
        "--eval-every",
        "3",
        "--eval-count",
        "300",
    ];
    // A run killed without warning (no checkpoint on the way out) ...
    let mut child = std::process::Command::new(assert_cmd::cargo::cargo_bin("sagan-train"))
        .args(QUICK)
        .args(schedule)
        .args(["--steps", "1000", "--out"])
        .arg(&run)
        .env("RUST_LOG", "warn")
        .env("ORT_DYLIB_PATH", common::ort_lib())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    while !run.join("checkpoints/step-00000004").exists() {
        assert!(Instant::now() < deadline, "training did not reach step 4");
        assert!(child.try_wait().unwrap().is_none(), "training stopped");
        std::thread::sleep(Duration::from_millis(50));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    // Only a sample step can have drawn the curves: the run never got to its end.
    image::open(run.join("curves.png")).unwrap();
    // ... with its newest checkpoint gone, so it surely logged steps past the one it resumes from.
    let newest = *checkpoint_steps(&run).last().unwrap();
    std::fs::remove_dir_all(run.join(format!("checkpoints/step-{newest:08}"))).unwrap();
    let resumed_from = *checkpoint_steps(&run).last().unwrap();
    let before = read_tensorboard(&run);
    let logged = summary_values(&before["files"][0])
        .iter()
        .map(|v| v.0)
        .max()
        .unwrap();
    assert!(logged > resumed_from, "{logged} {resumed_from}");
    let end = logged + 3;
    train()
        .env("ORT_DYLIB_PATH", common::ort_lib())
        .args(["--threads", "2", "--log-every", "1"])
        .args(schedule)
        .args(["--steps", &end.to_string(), "--resume"])
        .arg(&run)
        .assert()
        .success();

    let tb = read_tensorboard(&run);
    let files = tb["files"].as_array().unwrap();
    assert_eq!(files.len(), 2, "one event file per process");
    assert_eq!(files[0]["name"], before["files"][0]["name"]);
    for (file, from) in files.iter().zip([0, resumed_from]) {
        let events = &file["events"];
        assert_eq!(events[0]["file_version"], "brain.Event:2");
        assert_eq!(events[1]["status"], "START");
        assert_eq!(events[1]["step"], from + 1);
    }
    assert!(summary_values(&files[0])
        .iter()
        .all(|v| v.0 <= resumed_from));
    // In reading order steps never go back, and no tag comes twice at one step.
    let values: Vec<_> = files.iter().flat_map(summary_values).collect();
    assert!(values.windows(2).all(|w| w[0].0 <= w[1].0));
    let distinct: HashSet<(u64, &String)> = values.iter().map(|v| (v.0, &v.2)).collect();
    assert_eq!(distinct.len(), values.len(), "a tag twice at one step");

    // The scalars are metrics.jsonl's: every metric at every logged step, nothing else.
    let metrics: Vec<serde_json::Value> = std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let mut expected = BTreeMap::new();
    for r in &metrics {
        let step = r["step"].as_u64().unwrap();
        let mut put = |tag: String, v: &serde_json::Value| {
            expected.insert((step, tag), v.as_f64().unwrap() as f32)
        };
        for (tag, key) in [
            ("loss/d_loss", "d_loss"),
            ("loss/g_loss", "g_loss"),
            ("D/D(x)", "d_real"),
            ("D/D(G(z))", "d_fake"),
            ("speed/images_per_sec", "images_per_sec"),
            ("eval/FID", "fid"),
        ] {
            if let Some(v) = r.get(key) {
                put(tag.to_string(), v);
            }
        }
        for (layer, gamma) in r["gammas"].as_object().unwrap() {
            put(format!("gamma/{layer}"), gamma);
        }
    }
    let scalars: BTreeMap<(u64, String), f32> = values
        .iter()
        .filter(|v| v.1 == "scalars")
        .map(|(step, _, tag, v)| ((*step, tag.clone()), v.as_f64().unwrap() as f32))
        .collect();
    assert_eq!(scalars, expected);
    let steps_of = |tag: &str| -> Vec<u64> {
        let steps = expected.keys().filter(|(_, t)| t == tag).map(|(s, _)| *s);
        steps.collect()
    };
    assert_eq!(steps_of("loss/d_loss"), (1..=end).collect::<Vec<_>>());
    let fid_steps: Vec<u64> = (1..=end).filter(|s| s % 3 == 0 || *s == end).collect();
    assert_eq!(steps_of("eval/FID"), fid_steps);
    for layer in ["g.layers.2", "d.layers.1"] {
        assert_eq!(steps_of(&format!("gamma/{layer}")).len() as u64, end);
    }

    // The pictures are the sample files, byte for byte, at every sample step.
    let sample_steps: BTreeSet<u64> = (1..=end).filter(|s| s % 2 == 0 || *s == end).collect();
    let mut pictures = BTreeSet::new();
    for (step, _, tag, v) in values.iter().filter(|v| v.1 == "images") {
        let file = match tag.strip_prefix("attention/") {
            Some(layer) => format!("samples/attention-{layer}-step-{step:08}.png"),
            None => format!("samples/step-{step:08}.png"),
        };
        let bytes = std::fs::read(run.join(&file)).unwrap();
        let png = image::load_from_memory(&bytes).unwrap();
        assert_eq!(v["png"].as_str(), Some(hex(&bytes).as_str()), "{file}");
        assert_eq!(
            (v["width"].as_u64(), v["height"].as_u64()),
            (Some(png.width().into()), Some(png.height().into()))
        );
        assert_eq!(v["colorspace"], 3);
        pictures.insert((*step, tag.as_str()));
    }
    let all: BTreeSet<(u64, &str)> = sample_steps
        .iter()
        .flat_map(|s| [(*s, "samples"), (*s, "attention/g2")])
        .collect();
    assert_eq!(pictures, all);

    // TensorBoard files each tag under the right plugin and sees the same steps.
    let plugins = tb["plugins"].as_object().unwrap();
    let accumulated = &tb["accumulator"];
    for (_, tag) in expected.keys() {
        assert_eq!(plugins[tag], "scalars", "{tag}");
        assert_eq!(
            accumulated["scalars"][tag],
            serde_json::json!(steps_of(tag))
        );
    }
    for tag in ["samples", "attention/g2"] {
        assert_eq!(plugins[tag], "images", "{tag}");
        assert_eq!(accumulated["images"][tag], serde_json::json!(sample_steps));
    }
    let tags: BTreeSet<&str> = expected.keys().map(|(_, t)| t.as_str()).collect();
    assert_eq!(plugins.len(), tags.len() + 2, "{plugins:?}");
}
