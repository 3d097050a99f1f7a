//! End-to-end tests of sagan-eval and of the feature network on the shipped MNIST classifier.
//!
//! They need ONNX Runtime: `ORT_DYLIB_PATH`, or the CPU install that
//! `tools/install-onnxruntime.sh cpu` makes in `.onnxruntime/cpu`.
#![cfg(all(feature = "train", feature = "infer"))]

mod common;

use common::{manifest_dir, ort_lib};

use assert_cmd::Command;
use sagan::data::{DataSource, Dataset};
use sagan::eval::nearest::{nearest_grid, NearestOptions};
use sagan::eval::{summarise, FeatureNet, FeatureNetOptions, Resize};
use sagan::image_io::ImageBatch;
use sagan::infer::{latents, Generator, LibrarySearch, LoadOptions, Runtime};
use std::path::{Path, PathBuf};

fn fixture(rel: &str) -> String {
    manifest_dir()
        .join("fixtures")
        .join(rel)
        .display()
        .to_string()
}

fn runtime() -> &'static Runtime {
    Runtime::init(&LibrarySearch {
        explicit: Some(ort_lib()),
        ..Default::default()
    })
    .unwrap()
}

fn eval(dir: &Path) -> Command {
    let mut cmd = Command::cargo_bin("sagan-eval").unwrap();
    cmd.current_dir(dir)
        .env("ORT_DYLIB_PATH", ort_lib())
        .env_remove("RUST_LOG");
    cmd
}

/// Runs sagan-eval in `dir` with `--json`, expecting success; returns the JSON report.
fn eval_json(dir: &Path, args: &[&str]) -> serde_json::Value {
    let json = dir.join("report.json");
    let out = eval(dir)
        .args(args)
        .arg("--json")
        .arg(&json)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{args:?} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("FID: "), "{stdout}");
    serde_json::from_str(&std::fs::read_to_string(json).unwrap()).unwrap()
}

/// A failure must be one `error: ...` line containing `needle`, a non-zero exit, no panic.
fn assert_clean_error(args: &[&str], needle: &str) {
    let dir = tempfile::tempdir().unwrap();
    let out = eval(dir.path()).args(args).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{args:?} succeeded");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(
        lines.len(),
        1,
        "{args:?}: expected one line, got:\n{stderr}"
    );
    assert!(lines[0].starts_with("error: "), "{args:?}: {}", lines[0]);
    assert!(
        lines[0].contains(needle),
        "{args:?}: '{needle}' not in: {}",
        lines[0]
    );
}

fn number(report: &serde_json::Value, key: &str) -> f64 {
    report[key]
        .as_f64()
        .unwrap_or_else(|| panic!("no number '{key}' in {report}"))
}

/// Accuracy of the classifier's logits on the first `n` built-in digits loaded at `shape`.
fn accuracy(channels: usize, size: usize, n: usize, resize: Resize) -> f64 {
    let options = FeatureNetOptions {
        resize,
        ..Default::default()
    };
    let path = Path::new(&fixture("mnist-classifier.onnx")).to_path_buf();
    let mut net = FeatureNet::load(runtime(), &path, &options).unwrap();
    let data = Dataset::load(&DataSource::Builtin, channels, size).unwrap();
    let indices: Vec<usize> = (0..n).collect();
    let mut images = Vec::new();
    data.fill_batch(&indices, &mut images);
    let out = net
        .run(&ImageBatch::new(&images, n, channels, size, size).unwrap())
        .unwrap();
    assert_eq!((out.n, out.dim, out.classes), (n, 128, 10));
    let logits = out.logits.unwrap();
    let correct = logits
        .chunks_exact(10)
        .zip(data.labels())
        .filter(|(row, &label)| {
            let best = row
                .iter()
                .enumerate()
                .max_by(|a, b| a.1.total_cmp(b.1))
                .map(|(i, _)| i);
            best == Some(label as usize)
        })
        .count();
    correct as f64 / n as f64
}

#[test]
fn classifier_recognises_digits_through_every_conversion() {
    // As trained: 1x28x28 in [-1, 1]. These are training digits, so near-perfect.
    let native = accuracy(1, 28, 1000, Resize::Bilinear);
    assert!(native > 0.97, "native accuracy {native}");
    // RGB goes through luma back to the same grey values.
    let rgb = accuracy(3, 28, 1000, Resize::Bilinear);
    assert!((rgb - native).abs() < 0.01, "rgb {rgb} vs {native}");
    // 14x14 digits upscaled to 28x28 lose detail but stay digits.
    for resize in [Resize::Bilinear, Resize::Nearest] {
        let small = accuracy(1, 14, 1000, resize);
        assert!(small > 0.6, "14x14 {resize:?} accuracy {small}");
    }
}

#[test]
fn summarise_matches_across_batch_sizes() {
    let path = Path::new(&fixture("mnist-classifier.onnx")).to_path_buf();
    let mut net = FeatureNet::load(runtime(), &path, &FeatureNetOptions::default()).unwrap();
    let data = Dataset::load(&DataSource::Builtin, 1, 28).unwrap();
    let mut run = |batch: usize| {
        summarise(&mut net, 250, batch, [1, 28, 28], |range, out| {
            data.fill_batch(&range.collect::<Vec<_>>(), out);
            Ok(())
        })
        .unwrap()
    };
    let (whole, pieces) = (run(250), run(64));
    assert_eq!(whole.stats.n, 250);
    assert_eq!(whole.logits.as_ref().map(Vec::len), Some(2500));
    for (a, b) in whole.stats.mean.iter().zip(&pieces.stats.mean) {
        assert!((a - b).abs() < 1e-5 * (1.0 + a.abs()), "{a} vs {b}");
    }
}

#[test]
fn fixed_batch_is_padded_and_input_range_mapped() {
    let load = |name: &str| {
        let path = PathBuf::from(fixture(name));
        FeatureNet::load(
            runtime(),
            &path,
            &FeatureNetOptions {
                features_output: Some("embedding".into()),
                ..Default::default()
            },
        )
        .unwrap()
    };
    let (mut plain, mut fixed) = (
        load("fid/embedding-net.onnx"),
        load("fid/embedding-net-batch4-range01.onnx"),
    );
    let data = Dataset::load(&DataSource::Builtin, 1, 28).unwrap();
    let mut images = Vec::new();
    data.fill_batch(&(0..10).collect::<Vec<_>>(), &mut images);
    // The [0, 1] network sees (x + 1) / 2: what the [-1, 1] one computes on those values.
    let halved: Vec<f32> = images.iter().map(|v| (v + 1.0) / 2.0).collect();
    let batch = |data| ImageBatch::new(data, 10, 1, 28, 28).unwrap();
    let want = plain.run(&batch(&halved)).unwrap();
    let got = fixed.run(&batch(&images)).unwrap();
    assert_eq!((got.n, got.dim, got.features.len()), (10, 8, 80));
    assert!(got.logits.is_none());
    for (a, b) in got.features.iter().zip(&want.features) {
        assert!((a - b).abs() < 1e-4, "{a} vs {b}");
    }
}

#[test]
fn real_halves_are_close_and_a_bad_generator_is_far() {
    let dir = tempfile::tempdir().unwrap();
    let base = ["--data", "builtin", "--count", "1000", "--batch", "250"];
    let halves = eval_json(dir.path(), &[&["--baseline"], &base[..]].concat());
    let real_fid = number(&halves, "fid");
    assert!(
        (0.0..15.0).contains(&real_fid),
        "FID of two real halves: {real_fid}"
    );
    assert!(number(&halves, "is_mean") > 8.0, "{halves}");
    assert_eq!(number(&halves, "n"), 1000.0);

    // The tiny generator makes 4x4 noise: real digits are loaded at 4x4 too, and both are
    // resized to the classifier's 28x28.
    let model = fixture("onnx/tiny-generator.onnx");
    let net = fixture("mnist-classifier.onnx");
    let args = [&["--model", &model, "--feature-net", &net], &base[..]].concat();
    let first = eval_json(dir.path(), &args);
    let fake_fid = number(&first, "fid");
    assert!(
        fake_fid > 5.0 * real_fid.max(1.0),
        "tiny generator {fake_fid} vs real halves {real_fid}"
    );
    assert!(first["is_mean"].is_number() && first["is_std"].is_number());
    assert_eq!(number(&first, "n_real"), 1000.0);

    // The second run reads the real statistics from the cache and gives the same numbers.
    let cache = dir.path().join(".sagan-cache");
    let files = std::fs::read_dir(&cache).unwrap().count();
    assert!(files >= 2, "{files} cache files");
    let second = eval_json(dir.path(), &args);
    assert_eq!(first, second);
    assert_eq!(std::fs::read_dir(&cache).unwrap().count(), files);
    let uncached = eval_json(dir.path(), &[&args[..], &["--no-cache"]].concat());
    assert_eq!(first["fid"], uncached["fid"]);

    // Another seed draws other latents.
    let other = eval_json(dir.path(), &[&args[..], &["--seed", "1"]].concat());
    assert_ne!(first["fid"], other["fid"]);
}

#[test]
fn other_output_names_and_no_logits() {
    let dir = tempfile::tempdir().unwrap();
    let net = fixture("fid/embedding-net.onnx");
    let args = [
        "--baseline",
        "--data",
        "builtin",
        "--count",
        "200",
        "--feature-net",
        &net,
        "--features-output",
        "embedding",
    ];
    let out = eval(dir.path()).args(args).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("IS: n/a"), "{stdout}");
    let report = eval_json(dir.path(), &args);
    assert!(report["is_mean"].is_null(), "{report}");
    assert!(number(&report, "fid") >= 0.0);
}

#[test]
fn bad_input_is_one_clean_error() {
    let tiny = fixture("onnx/tiny-generator.onnx");
    let embedding = fixture("fid/embedding-net.onnx");
    let classifier = fixture("mnist-classifier.onnx");
    let cases: &[(&[&str], &str)] = &[
        (
            &["--model", &tiny, "--data", "builtin", "--feature-net", "missing.onnx"],
            "missing.onnx: cannot read the feature network",
        ),
        (
            &["--baseline", "--data", "builtin", "--feature-net", &embedding],
            "no output 'features' (outputs: embedding): name the feature output with --features-output",
        ),
        (
            &["--baseline", "--data", "builtin", "--feature-net", &classifier, "--logits-output", "probs"],
            "no output 'probs'",
        ),
        (
            &["--baseline", "--data", "builtin", "--count", "0"],
            "--count must be at least 2",
        ),
        (
            &["--baseline", "--data", "builtin", "--batch", "0"],
            "--batch must be at least 1",
        ),
        (
            &["--baseline", "--data", "builtin", "--count", "40000"],
            "use --count 30000 or less",
        ),
        (
            &["--baseline", "--data", "no/such/dir"],
            "no/such/dir",
        ),
        (
            &["--baseline", "--data", "builtin", "--feature-net", &tiny],
            "input 'z' is float32 [?, 8], expected float32 [batch, C, H, W] images",
        ),
    ];
    for (args, needle) in cases {
        assert_clean_error(args, needle);
    }
}

#[test]
fn nearest_finds_a_sample_among_real_digits_and_draws_it_beside_itself() {
    // The reference set holds 40 real digits with the generator's own samples mixed in at
    // known places: each sample's nearest image must be itself, at distance 0.
    let model = PathBuf::from(fixture("onnx/tiny-generator.onnx"));
    let classifier = PathBuf::from(fixture("mnist-classifier.onnx"));
    let options = FeatureNetOptions::default();
    let mut net = FeatureNet::load(runtime(), &classifier, &options).unwrap();
    let mut generator = Generator::load(runtime(), &model, &LoadOptions::default()).unwrap();
    let (h, w) = generator.size();
    let data = Dataset::load(&DataSource::Builtin, 1, h).unwrap();
    let nearest = NearestOptions {
        samples: 3,
        k: 4,
        batch: 16,
        seed: 5,
    };
    let z = latents(nearest.seed, nearest.samples, generator.z_dim());
    let samples = generator
        .generate(&z, None, nearest.samples)
        .unwrap()
        .images;
    let size = h * w;
    let placed = [7, 20, 33];
    let fill = |range: std::ops::Range<usize>, out: &mut Vec<f32>| {
        for i in range {
            match placed.iter().position(|&p| p == i) {
                Some(s) => out.extend_from_slice(&samples[s * size..(s + 1) * size]),
                None => data.fill_batch(&[i], out),
            }
        }
        Ok(())
    };
    let (grid, neighbours) = nearest_grid(&mut generator, &mut net, 40, fill, &nearest).unwrap();
    for (s, row) in neighbours.iter().enumerate() {
        assert_eq!(row.len(), 4);
        assert_eq!(row[0], (placed[s], 0.0), "sample {s}: {row:?}");
        assert!(row.windows(2).all(|p| p[0].1 <= p[1].1), "{row:?}");
    }
    // Five tiles a row (the sample, then its neighbours), three rows; the first neighbour's
    // tile is the sample's.
    // A 2-pixel gap around and between tiles.
    let (pitch_w, pitch_h) = ((grid.width() - 2) / 5, (grid.height() - 2) / 3);
    assert_eq!((grid.width() - 2) % 5, 0, "{}", grid.width());
    assert_eq!((grid.height() - 2) % 3, 0, "{}", grid.height());
    let tile = |row: u32, col: u32| {
        let (x, y) = (2 + col * pitch_w, 2 + row * pitch_h);
        image::imageops::crop_imm(&grid, x, y, pitch_w - 2, pitch_h - 2).to_image()
    };
    for row in 0..3 {
        assert_eq!(tile(row, 0), tile(row, 1));
        assert_ne!(tile(row, 0), tile(row, 2));
    }
}

#[test]
fn nearest_writes_its_grid_and_refuses_bad_counts() {
    let dir = tempfile::tempdir().unwrap();
    let model = fixture("onnx/tiny-generator.onnx");
    let png = dir.path().join("nearest.png");
    let base = ["--model", &model, "--data", "builtin", "--count", "200"];
    let args = [
        &base[..],
        &["--nearest", "nearest.png", "--nearest-samples", "2"],
    ]
    .concat();
    let out = eval(dir.path()).args(&args).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("nearest: nearest.png (2 samples, each followed by its 8 nearest"),
        "{stdout}"
    );
    let grid = image::open(&png).unwrap();
    assert!(
        grid.width() > 4 * grid.height(),
        "{}x{}",
        grid.width(),
        grid.height()
    );
    assert_clean_error(
        &[&base[..], &["--nearest", "n.png", "--nearest-k", "0"]].concat(),
        "1..=60000 neighbours each",
    );
}
