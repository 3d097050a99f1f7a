//! The exported graph against the training graph: ONNX Runtime (through sagan-infer's library
//! and binary) on sagan-export's files, compared with candle's generator in evaluation mode.
#![cfg(all(feature = "train", feature = "infer"))]

mod common;

use common::{ort_lib, train_one_step};

use assert_cmd::Command;
use sagan::checkpoint;
use sagan::infer::runtime::{LibrarySearch, Runtime};
use sagan::infer::{Generator as OrtGenerator, LoadOptions};
use std::path::Path;

fn bin(name: &str) -> Command {
    let mut cmd = common::bin(name);
    cmd.env("ORT_DYLIB_PATH", ort_lib());
    cmd
}

/// The EMA generator of a one-step run with every attention gamma set to 0.8, so that the
/// attention path weighs in the comparison (after one step gamma is still ~1e-4), and the
/// class tables of conditional batch norms perturbed, so that every class differs.
fn generator_with_strong_attention(run: &Path, dst: &Path) {
    let src = run.join("checkpoints/step-00000001/generator_ema.safetensors");
    let (tensors, meta) = checkpoint::load(&src, &candle_core::Device::Cpu).unwrap();
    let mut tensors: Vec<(String, candle_core::Tensor)> = tensors.into_iter().collect();
    for (name, tensor) in tensors.iter_mut() {
        if name.ends_with(".gamma") {
            *tensor = candle_core::Tensor::new(&[0.8f32], &candle_core::Device::Cpu).unwrap();
        }
        if name.contains(".norm") && (name.ends_with(".gain") || name.ends_with(".bias")) {
            let n = tensor.elem_count();
            let noise = sagan::rng::normal_vec(&mut sagan::rng::stream(7, n as u64), n);
            let noise =
                candle_core::Tensor::from_vec(noise, tensor.shape(), &candle_core::Device::Cpu)
                    .unwrap();
            *tensor = (&*tensor + (noise * 0.3).unwrap()).unwrap();
        }
    }
    checkpoint::save(dst, &tensors, &meta).unwrap();
}

#[test]
fn onnx_runtime_reproduces_candle_within_1e5_for_every_preset() {
    let runtime = Runtime::init(&LibrarySearch::from_process(Some(ort_lib()), false)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    for preset in [
        "sagan-mnist28",
        "dcgan-mnist28",
        "sagan64",
        "dcgan64",
        "sagan-cond-mnist32",
        "sagan128",
    ] {
        let run = dir.path().join(preset);
        train_one_step(&run, preset, &["--sample-every", "0"]);
        let checkpoint_file = dir.path().join(format!("{preset}.safetensors"));
        generator_with_strong_attention(&run, &checkpoint_file);
        let onnx = dir.path().join(format!("{preset}.onnx"));
        bin("sagan-export")
            .arg(&onnx)
            .arg("--checkpoint")
            .arg(&checkpoint_file)
            .arg("--attention-maps")
            .assert()
            .success();

        let loaded =
            sagan::export::load_generator(&checkpoint_file, &candle_core::Device::Cpu).unwrap();
        let z_dim = loaded.meta.model.z_dim;
        let z = sagan::infer::latent::latents(11, 5, z_dim);
        let z_tensor =
            candle_core::Tensor::from_vec(z.clone(), (5, z_dim), &candle_core::Device::Cpu)
                .unwrap();
        // Conditional presets: five different classes, the first and last among them.
        let num_classes = loaded.meta.model.num_classes;
        let classes: Option<Vec<i64>> =
            (num_classes > 0).then(|| (0..5).map(|i| (i * (num_classes - 1) / 4) as i64).collect());
        let class_tensor = classes.as_ref().map(|c| {
            let c: Vec<u32> = c.iter().map(|&k| k as u32).collect();
            candle_core::Tensor::from_vec(c, 5, &candle_core::Device::Cpu).unwrap()
        });
        let (image, maps) = loaded
            .generator
            .forward_with_attention(&z_tensor, class_tensor.as_ref(), false)
            .unwrap();

        let mut session = OrtGenerator::load(runtime, &onnx, &LoadOptions::default()).unwrap();
        let generated = session.generate(&z, classes.as_deref(), 5).unwrap();
        let max_diff = |a: &[f32], b: &candle_core::Tensor| {
            let b = b.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert_eq!(a.len(), b.len());
            a.iter()
                .zip(&b)
                .map(|(x, y)| (x - y).abs())
                .fold(0f32, f32::max)
        };
        let image_diff = max_diff(&generated.images, &image);
        assert!(
            image_diff <= 1e-5,
            "{preset}: image max abs diff {image_diff}"
        );
        assert_eq!(generated.attention.len(), maps.len(), "{preset}");
        for (ort_map, candle_map) in generated.attention.iter().zip(&maps) {
            let diff = max_diff(&ort_map.maps, candle_map);
            assert!(
                diff <= 1e-5,
                "{preset}: {} max abs diff {diff}",
                ort_map.name
            );
        }
        println!("{preset}: image {image_diff:.2e}");
        if num_classes > 0 {
            // The class input is not ignored: another class gives another image.
            let other: Vec<i64> = classes
                .iter()
                .flatten()
                .map(|k| (k + 1) % num_classes as i64)
                .collect();
            let moved = session.generate(&z, Some(&other), 5).unwrap();
            let change = generated
                .images
                .iter()
                .zip(&moved.images)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(
                change > 1e-3,
                "{preset}: the class input changes nothing ({change})"
            );
        }
    }
}

#[test]
fn the_same_seed_gives_the_same_pixels_through_sagan_infer_as_through_sagan_train() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    train_one_step(
        &run,
        "sagan-mnist28",
        &["--seed", "5", "--sample-every", "1"],
    );
    let onnx = dir.path().join("g.onnx");
    bin("sagan-export")
        .arg(&onnx)
        .arg("--checkpoint")
        .arg(&run)
        .assert()
        .success();
    let out = dir.path().join("samples");
    bin("sagan-infer")
        .arg("--model")
        .arg(&onnx)
        .args(["--seed", "5", "--count", "64", "--out"])
        .arg(&out)
        .assert()
        .success();
    let trained = image::open(run.join("samples/step-00000001.png"))
        .unwrap()
        .to_rgb8();
    let served = image::open(out.join("seed5-grid.png")).unwrap().to_rgb8();
    assert_eq!(trained.dimensions(), served.dimensions());
    // Batch norm is folded into the convolution for export, so values can differ in the last
    // float bits; a pixel may then round to the neighbouring level, never further.
    let (mut differing, mut worst) = (0usize, 0u8);
    for (a, b) in trained.pixels().zip(served.pixels()) {
        for c in 0..3 {
            let d = a[c].abs_diff(b[c]);
            worst = worst.max(d);
            differing += (d > 0) as usize;
        }
    }
    let total = trained.width() as usize * trained.height() as usize * 3;
    assert!(worst <= 1, "a pixel differs by {worst} levels");
    assert!(
        differing * 1000 <= total,
        "{differing} of {total} values differ"
    );
}
