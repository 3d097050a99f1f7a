//! The device-generic path (candle's own ops, what a GPU runs) against the fused CPU kernels:
//! every preset, trained a few steps from the same seed both ways on the CPU, starts from the
//! same weights and gives the same losses and weights up to float rounding.
//!
//! The two paths sum in different orders (im2col + GEMM or Winograd against candle's direct
//! convolutions, fused reductions against chains of ops), so they agree to rounding, not to the
//! bit. Adam moves a weight by about a learning rate whatever its gradient's size, so where a
//! gradient is within rounding of zero the two paths may move it opposite ways: single weights
//! are only held to that (`ADAM_TRAVEL`); what training did to the whole model, the change of
//! all weights from their initial values, must agree to `UPDATE_RTOL`, and the same tensors must
//! change on both paths.
//!
//! sagan64 and dcgan64 train at a quarter of their widths and sagan128 at a sixteenth (same
//! layers, shapes and class count), so that the test takes seconds.

use super::*;
use crate::config::BUILTIN_PRESETS;
use crate::data::DataSource;
use crate::ops::{with_backend, Backend};

/// Generator steps (each with the preset's discriminator steps) per path.
const STEPS: usize = 2;
const BATCH: usize = 2;

/// Relative difference allowed between the two paths' losses and D outputs at every step.
const LOSS_RTOL: f32 = 1e-3;
/// Allowed |change(fused) - change(generic)| / |change(fused)| over all weights of G, D and the
/// EMA, each change from the (shared) initial weights.
const UPDATE_RTOL: f64 = 1e-3;
/// How far apart one value may end, in learning rates per Adam update: an update moves a weight
/// by at most about 1.4 learning rates with the presets' betas, either way.
const ADAM_TRAVEL: f32 = 3.0;

/// `preset` with every channel count from 64 up divided by `by`: sagan128's layers and
/// shapes at a width a test trains in seconds.
fn narrowed(preset: &str, by: usize) -> ModelConfig {
    let text = BUILTIN_PRESETS
        .iter()
        .find(|(name, _)| *name == preset)
        .map(|(_, text)| *text)
        .unwrap();
    let mut out = String::new();
    let mut rest = text;
    while let Some(at) = rest.find("out = ") {
        let (head, tail) = rest.split_at(at + "out = ".len());
        let digits = tail.chars().take_while(char::is_ascii_digit).count();
        let n: usize = tail[..digits].parse().unwrap();
        out.push_str(head);
        out.push_str(&(if n >= 64 { n / by } else { n }).to_string());
        rest = &tail[digits..];
    }
    out.push_str(rest);
    ModelConfig::from_toml(&out).unwrap()
}

/// A preset as the test trains it (see the module's note on widths).
fn model(name: &str) -> ModelConfig {
    match name {
        "sagan64" | "dcgan64" => narrowed(name, 4),
        "sagan128" => narrowed(name, 16),
        name => ModelConfig::resolve(name).unwrap(),
    }
}

/// What one path leaves: per-step statistics and every tensor of G, D and the EMA, before
/// and after training.
struct Outcome {
    stats: Vec<StepStats>,
    initial: Vec<(String, Vec<f32>)>,
    tensors: Vec<(String, Vec<f32>)>,
}

fn tensors(t: &Trainer) -> Vec<(String, Vec<f32>)> {
    let mut out = Vec::new();
    let ema = t.ema.as_ref().map(|e| ("ema", e.varmap()));
    for (net, vars) in [("g", &t.g_vars), ("d", &t.d_vars)].into_iter().chain(ema) {
        for (name, tensor) in checkpoint::varmap_tensors(vars) {
            let values = tensor.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            out.push((format!("{net}.{name}"), values));
        }
    }
    out
}

fn train(model: &ModelConfig, backend: Backend) -> Outcome {
    let cfg = TrainConfig {
        batch_size: BATCH,
        ..TrainConfig::with(&model.training)
    };
    let images = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/images-small");
    let data = Dataset::load(&DataSource::Path(images), model.channels, model.image_size).unwrap();
    // Never written to: the test saves no checkpoint.
    let dir = std::env::temp_dir().join(format!("sagan-parity-{}", std::process::id()));
    with_backend(backend, || {
        let mut t = Trainer::new(model.clone(), cfg, data, RunDir::new(dir), Device::Cpu).unwrap();
        let initial = tensors(&t);
        let stats = (0..STEPS).map(|_| t.train_step().unwrap()).collect();
        Outcome {
            stats,
            initial,
            tensors: tensors(&t),
        }
    })
}

fn compare(name: &str) {
    let model = model(name);
    let fused = train(&model, Backend::Fused);
    let generic = train(&model, Backend::Generic);
    assert!(
        fused.initial == generic.initial,
        "{name}: the two paths start from different weights"
    );
    for (step, (f, g)) in fused.stats.iter().zip(&generic.stats).enumerate() {
        let pairs = [
            ("d_loss", f.d_loss, g.d_loss),
            ("g_loss", f.g_loss, g.g_loss),
            ("d_real", f.d_real, g.d_real),
            ("d_fake", f.d_fake, g.d_fake),
        ];
        for (what, a, b) in pairs {
            let close = (a - b).abs() <= LOSS_RTOL * a.abs().max(b.abs()).max(1.0);
            assert!(
                close,
                "{name} step {}: {what} fused {a}, generic {b}",
                step + 1
            );
        }
    }
    let cfg = TrainConfig::with(&model.training);
    let updates = (STEPS * (cfg.n_dis + 1)) as f32;
    let bound = ADAM_TRAVEL * updates * cfg.lr_d.max(cfg.lr_g) as f32;
    let (mut apart, mut change) = (0f64, 0f64);
    let tensors = fused
        .tensors
        .iter()
        .zip(&generic.tensors)
        .zip(&fused.initial);
    for (((key, f), (key_g, g)), (_, initial)) in tensors {
        assert_eq!((key, f.len()), (key_g, g.len()), "{name}");
        // The same tensors trained (or updated as buffers) on both paths: a tensor that one path
        // leaves alone has no gradient or update there at all, which rounding cannot explain.
        // Except attention's key biases: they shift a whole row of energies, which the softmax
        // ignores, so their gradient is 0 in exact arithmetic: noise, or exactly 0, either path.
        let (f_moved, g_moved) = (f != initial, g != initial);
        if !key.ends_with("key.bias") {
            assert_eq!(
                f_moved, g_moved,
                "{name} {key}: changed by fused {f_moved}, by generic {g_moved}"
            );
        }
        for ((&a, &b), &w) in f.iter().zip(g).zip(initial) {
            assert!(
                (a - b).abs() <= bound,
                "{name} {key}: fused {a}, generic {b}"
            );
            apart += f64::from(a - b).powi(2);
            change += f64::from(a - w).powi(2);
        }
    }
    let rel = (apart / change).sqrt();
    assert!(
        rel <= UPDATE_RTOL,
        "{name}: the weights' changes differ by {rel:e} of their size between the paths"
    );
}

#[test]
fn sagan_mnist28_trains_the_same_through_candles_ops() {
    compare("sagan-mnist28");
}

#[test]
fn dcgan_mnist28_trains_the_same_through_candles_ops() {
    compare("dcgan-mnist28");
}

#[test]
fn sagan64_trains_the_same_through_candles_ops() {
    compare("sagan64");
}

#[test]
fn dcgan64_trains_the_same_through_candles_ops() {
    compare("dcgan64");
}

#[test]
fn sagan_cond_mnist32_trains_the_same_through_candles_ops() {
    assert!(model("sagan-cond-mnist32").num_classes > 0);
    compare("sagan-cond-mnist32");
}

#[test]
fn sagan128_trains_the_same_through_candles_ops() {
    compare("sagan128");
}

#[test]
fn every_preset_is_compared() {
    let names: Vec<&str> = BUILTIN_PRESETS.iter().map(|(name, _)| *name).collect();
    let source = include_str!("generic_parity.rs");
    for name in names {
        assert!(
            source.contains(&format!("compare(\"{name}\")")),
            "{name} is not compared"
        );
    }
}

#[test]
fn narrowing_keeps_sagan128s_layers_and_divides_its_widths() {
    let full = ModelConfig::resolve("sagan128").unwrap();
    let narrow = narrowed("sagan128", 16);
    assert_eq!(narrow.generator.layers.len(), full.generator.layers.len());
    assert_eq!(
        narrow.discriminator.layers.len(),
        full.discriminator.layers.len()
    );
    assert_eq!((narrow.num_classes, narrow.image_size), (1000, 128));
    let toml = toml::to_string(&narrow).unwrap();
    assert!(
        toml.contains("out = 64") && !toml.contains("out = 1024"),
        "{toml}"
    );
}
