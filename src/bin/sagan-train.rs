//! sagan-train: trains a Self-Attention GAN and writes safetensors checkpoints.

use clap::Parser;
use sagan::config::{preset_arg, LossKind, PresetTraining};
use sagan::train::device::DeviceRequest;
use sagan::train::session::{self, FidRequest, Request, ScheduleRequest};
use sagan::train::{cpu, Outcome};
use std::io::IsTerminal;
use std::path::PathBuf;

// Reuses freed training buffers without returning them to the OS (see cpu::keep_freed_memory).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Train a Self-Attention GAN (SAGAN) on the CPU with candle.
#[derive(Parser, Debug)]
#[command(
    name = "sagan-train",
    version,
    long_about = session::ABOUT,
    verbatim_doc_comment,
    allow_negative_numbers = true
)]
struct Args {
    /// Model preset: a built-in name or a .toml file (see models/).
    #[arg(long, value_parser = preset_arg)]
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

    #[command(flatten)]
    schedule: ScheduleRequest,

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

    #[command(flatten)]
    fid: FidRequest,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum LossArg {
    Hinge,
    NonSaturating,
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
            loss: self.loss.map(|loss| match loss {
                LossArg::Hinge => LossKind::Hinge,
                LossArg::NonSaturating => LossKind::NonSaturating,
            }),
            seed: self.seed,
            schedule: self.schedule,
            threads: self.threads,
            device: self.device,
            fid: self.fid,
            progress_bar,
            no_tensorboard: self.no_tensorboard,
        }
    }
}

fn main() {
    let progress_bar = std::io::stderr().is_terminal();
    sagan::logging::init("info", true);
    let request = Args::parse().request(progress_bar);
    cpu::keep_freed_memory();
    match session::run(&request) {
        Ok(Outcome::Finished { .. }) => {}
        Ok(Outcome::Interrupted { .. }) => std::process::exit(130),
        Err(e) => {
            eprintln!("error: {:#}", anyhow::Error::from(e));
            std::process::exit(1);
        }
    }
}
