//! sagan-train: trains a Self-Attention GAN and writes safetensors checkpoints.

use anyhow::Result;
use clap::Parser;
use sagan::config::{preset_names, LossKind, PresetTraining};
use sagan::train::device::DeviceRequest;
use sagan::train::session::{self, FidRequest, Request, ScheduleRequest};
use sagan::train::{cpu, Outcome};
use std::io::IsTerminal;
use std::path::PathBuf;

// Reuses freed training buffers without returning them to the OS (see cpu::keep_freed_memory).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Train a Self-Attention GAN (SAGAN) with candle, on the CPU or (--device cuda) a GPU.
///
/// With no arguments, trains the `sagan-mnist28` preset on the MNIST digits built into the
/// binary and writes a run directory under runs/: checkpoints (safetensors), a fixed-z sample
/// grid and attention maps every --sample-every steps, metrics.jsonl, curves.png (redrawn with
/// every sample grid) and TensorBoard event files (`tensorboard --logdir runs` shows them).
///
/// Examples:
///   sagan-train                                   # built-in default, about 5 minutes on 2 cores
///   sagan-train --steps 10000                     # the same, longer
///   sagan-train --preset sagan64 --data ~/celeba  # any folder of .png/.jpg, sub-folders = classes
///   sagan-train --resume runs/sagan-mnist28       # continue an interrupted run (Ctrl-C saves one)
///   sagan-train --preset sagan64 --data ~/celeba --device cuda  # on a GPU (a --features cuda build)
///
/// One trainer at a time holds a run directory. Checkpoints are written whole or not at all,
/// hold finite values only, and a resumed run continues bit for bit as if never stopped.
#[derive(Parser, Debug)]
#[command(
    name = "sagan-train",
    version,
    verbatim_doc_comment,
    allow_negative_numbers = true
)]
struct Args {
    /// Model preset: a built-in name or a .toml file (see models/).
    #[arg(long, value_parser = preset_value)]
    preset: Option<String>,

    /// Training images: an MNIST IDX file or directory (raw or .gz), or a folder of .png/.jpg
    /// (searched recursively; center-cropped and resized to the preset). Default: the MNIST
    /// training set built into the binary.
    #[arg(long)]
    data: Option<PathBuf>,

    /// Run directory. Default: runs/PRESET, or runs/PRESET-2, -3, ... if taken.
    #[arg(long)]
    out: Option<PathBuf>,

    /// Continue the run in this directory from its latest checkpoint, with its stored preset,
    /// data and hyperparameters (only --steps and the output schedule may change).
    #[arg(long, conflicts_with = "out")]
    resume: Option<PathBuf>,

    /// Generator steps in total (each after --n-dis discriminator steps) [default: the
    /// preset's, else 1000].
    #[arg(long)]
    steps: Option<usize>,

    /// Images per batch [default: the preset's, else 64].
    #[arg(long)]
    batch_size: Option<usize>,

    /// Discriminator learning rate [default: the preset's, else the paper's 4e-4].
    #[arg(long)]
    lr_d: Option<f64>,

    /// Generator learning rate [default: the preset's (sagan-mnist28: 4e-4), else the paper's
    /// 1e-4].
    #[arg(long)]
    lr_g: Option<f64>,

    /// Adam beta1 [default: the preset's, else 0].
    #[arg(long)]
    beta1: Option<f64>,

    /// Adam beta2 [default: the preset's, else 0.9].
    #[arg(long)]
    beta2: Option<f64>,

    /// Discriminator steps per generator step [default: the preset's, else 1].
    #[arg(long)]
    n_dis: Option<usize>,

    /// Adversarial loss.
    #[arg(long, value_enum)]
    loss: Option<LossArg>,

    /// Decay of the moving average of G's weights used for samples and export; 0 turns it off
    /// [default: the preset's, else 0.999].
    #[arg(long)]
    ema_decay: Option<f64>,

    /// Seed of initialisation, latents and data order: same seed, same run.
    #[arg(long)]
    seed: Option<u64>,

    /// Write a sample grid and attention maps every N steps (0: only at the end) [default: 100,
    /// or the resumed run's].
    #[arg(long)]
    sample_every: Option<usize>,

    /// Write a checkpoint every N steps (0: only at the end or on Ctrl-C) [default: 100, or
    /// the resumed run's].
    #[arg(long)]
    checkpoint_every: Option<usize>,

    /// Log metrics every N steps [default: 10, or the resumed run's].
    #[arg(long)]
    log_every: Option<usize>,

    /// Keep the newest N checkpoints [default: 3, or the resumed run's].
    #[arg(long)]
    keep_last: Option<usize>,

    /// Write no TensorBoard event files (events.out.tfevents.*, by default beside
    /// metrics.jsonl with the metrics, sample grids and attention maps). Applies to this
    /// invocation only.
    #[arg(long)]
    no_tensorboard: bool,

    /// Worker threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,

    /// Where to train: cpu, cuda (the first GPU) or cuda:N. CUDA needs a binary built with
    /// `--features cuda` (see docs/gpu-training.md); checkpoints are the same files either way,
    /// so a run may be resumed on another device.
    #[arg(long, default_value = "cpu", value_name = "DEVICE")]
    device: DeviceRequest,

    /// Compute FID every N steps (0: never), log it to metrics.jsonl and keep the best
    /// checkpoint in checkpoints/best. Needs ONNX Runtime (tools/install-onnxruntime.sh cpu).
    #[arg(long, default_value_t = 0)]
    eval_every: usize,

    /// Generated and real images per FID evaluation.
    #[arg(long, default_value_t = 2000)]
    eval_count: usize,

    /// ONNX feature network for FID (outputs `features`, see sagan-eval). Default: the built-in
    /// MNIST classifier, for greyscale presets.
    #[arg(long)]
    feature_net: Option<PathBuf>,

    /// The feature network's output to use [default: features].
    #[arg(long)]
    features_output: Option<String>,

    /// The ONNX Runtime library for FID (else $ORT_DYLIB_PATH, .onnxruntime/, the system).
    #[arg(long)]
    ort_lib: Option<PathBuf>,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum LossArg {
    Hinge,
    NonSaturating,
}

impl From<LossArg> for LossKind {
    fn from(arg: LossArg) -> Self {
        match arg {
            LossArg::Hinge => LossKind::Hinge,
            LossArg::NonSaturating => LossKind::NonSaturating,
        }
    }
}

fn preset_value(value: &str) -> std::result::Result<String, String> {
    if value.ends_with(".toml") || preset_names().contains(&value) {
        Ok(value.to_string())
    } else {
        Err(format!(
            "unknown preset (built-in: {}; or a .toml file)",
            preset_names().join(", ")
        ))
    }
}

impl Args {
    fn request(self, progress_bar: bool) -> Request {
        Request {
            preset: self.preset,
            data: self.data,
            out: self.out,
            resume: self.resume,
            training: PresetTraining {
                steps: self.steps,
                batch_size: self.batch_size,
                lr_d: self.lr_d,
                lr_g: self.lr_g,
                beta1: self.beta1,
                beta2: self.beta2,
                n_dis: self.n_dis,
                ema_decay: self.ema_decay,
            },
            loss: self.loss.map(Into::into),
            seed: self.seed,
            schedule: ScheduleRequest {
                sample_every: self.sample_every,
                checkpoint_every: self.checkpoint_every,
                log_every: self.log_every,
                keep_last: self.keep_last,
            },
            threads: self.threads,
            device: self.device,
            fid: FidRequest {
                every: self.eval_every,
                count: self.eval_count,
                feature_net: self.feature_net,
                features_output: self.features_output,
                ort_lib: self.ort_lib,
            },
            progress_bar,
            no_tensorboard: self.no_tensorboard,
        }
    }
}

fn main() {
    let progress_bar = std::io::stderr().is_terminal();
    sagan::logging::init("info", true);
    match run(Args::parse().request(progress_bar)) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::exit(1);
        }
    }
}

fn run(request: Request) -> Result<i32> {
    cpu::keep_freed_memory();
    let stop = session::stop_on_signals()?;
    Ok(match session::train(&request, &stop)? {
        (Outcome::Finished { step }, run) => {
            tracing::info!("finished at step {step}: {}", run.display());
            0
        }
        (Outcome::Interrupted { step }, run) => {
            tracing::info!(
                "interrupted at step {step}; continue with: sagan-train --resume {}",
                run.display()
            );
            130
        }
    })
}
