//! sagan-train: trains a Self-Attention GAN and writes safetensors checkpoints.

use anyhow::{bail, Context, Result};
use clap::Parser;
use sagan::checkpoint::{self, Kind, RunDir};
use sagan::config::{preset_names, LossKind, ModelConfig, PresetTraining, TrainConfig};
use sagan::data::{DataSource, Dataset};
use sagan::eval::{builtin_feature_net, FeatureNet, FeatureNetOptions};
use sagan::infer::{LibrarySearch, Runtime};
use sagan::train::fid::FidMonitor;
use sagan::train::{cpu, Outcome, Schedule, Trainer};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

// Reuses freed training buffers without returning them to the OS (see cpu::keep_freed_memory).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Train a Self-Attention GAN (SAGAN) on the CPU with candle.
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

    /// Write a sample grid and attention maps every N steps (0: only at the end).
    #[arg(long, default_value_t = 100)]
    sample_every: usize,

    /// Write a checkpoint every N steps (0: only at the end or on Ctrl-C).
    #[arg(long, default_value_t = 100)]
    checkpoint_every: usize,

    /// Log metrics every N steps.
    #[arg(long, default_value_t = 10)]
    log_every: usize,

    /// Write no TensorBoard event files (events.out.tfevents.*; by default the metrics, sample
    /// grids and attention maps go there too).
    #[arg(long)]
    no_tensorboard: bool,

    /// Keep the newest N checkpoints.
    #[arg(long, default_value_t = 3)]
    keep_last: usize,

    /// Worker threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,

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

const DEFAULT_PRESET: &str = "sagan-mnist28";

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
    /// The training configuration for a fresh run: the preset's settings overridden by flags.
    fn fresh_config(&self, model: &ModelConfig) -> TrainConfig {
        let flags = PresetTraining {
            steps: self.steps,
            batch_size: self.batch_size,
            lr_d: self.lr_d,
            lr_g: self.lr_g,
            beta1: self.beta1,
            beta2: self.beta2,
            n_dis: self.n_dis,
            ema_decay: self.ema_decay,
        };
        let d = TrainConfig::with(&flags.over(&model.training));
        TrainConfig {
            loss: self.loss.map(Into::into).unwrap_or(d.loss),
            seed: self.seed.unwrap_or(d.seed),
            data: self.data.clone(),
            ..d
        }
    }

    /// Flags that would change what a resumed run computes.
    fn conflicts_with_resume(&self) -> Vec<&'static str> {
        let given = [
            ("--preset", self.preset.is_some()),
            ("--data", self.data.is_some()),
            ("--batch-size", self.batch_size.is_some()),
            ("--lr-d", self.lr_d.is_some()),
            ("--lr-g", self.lr_g.is_some()),
            ("--beta1", self.beta1.is_some()),
            ("--beta2", self.beta2.is_some()),
            ("--n-dis", self.n_dis.is_some()),
            ("--loss", self.loss.is_some()),
            ("--ema-decay", self.ema_decay.is_some()),
            ("--seed", self.seed.is_some()),
        ];
        given
            .into_iter()
            .filter(|(_, g)| *g)
            .map(|(name, _)| name)
            .collect()
    }
}

fn main() {
    let stderr_is_terminal = std::io::stderr().is_terminal();
    sagan::logging::init("info", true);
    match run(Args::parse(), stderr_is_terminal) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::exit(1);
        }
    }
}

fn run(args: Args, progress_bar: bool) -> Result<i32> {
    cpu::keep_freed_memory();
    let threads = cpu::configure(args.threads)?;
    let (model_cfg, cfg, run_dir, resuming) = match &args.resume {
        Some(dir) => {
            let conflicts = args.conflicts_with_resume();
            if !conflicts.is_empty() {
                bail!(
                    "{}: a resumed run keeps its stored settings; drop {}",
                    dir.display(),
                    conflicts.join(", ")
                );
            }
            let run = RunDir::new(dir);
            let step = run
                .latest_step()?
                .with_context(|| format!("{}: no checkpoint to resume from", dir.display()))?;
            let meta =
                checkpoint::read_metadata(&run.step_dir(step).join(Kind::Generator.file_name()))?;
            let mut cfg = meta.train;
            if let Some(steps) = args.steps {
                cfg.steps = steps;
            }
            if cfg.steps <= step {
                bail!(
                    "{}: already at step {step}; pass --steps above it to train on",
                    dir.display()
                );
            }
            (meta.model, cfg, run, true)
        }
        None => {
            let model_cfg = ModelConfig::resolve(args.preset.as_deref().unwrap_or(DEFAULT_PRESET))?;
            let cfg = args.fresh_config(&model_cfg);
            cfg.validate()?;
            let dir = args
                .out
                .clone()
                .unwrap_or_else(|| next_free_run_dir(&model_cfg.name));
            let run = RunDir::new(&dir);
            if run.latest_step()?.is_some() {
                bail!(
                    "{}: already holds checkpoints; continue it with --resume {0}, or pick another --out",
                    dir.display()
                );
            }
            (model_cfg, cfg, run, false)
        }
    };
    let source = match &cfg.data {
        Some(path) => DataSource::Path(path.clone()),
        None => DataSource::Builtin,
    };
    let dataset = Dataset::load(&source, model_cfg.channels, model_cfg.image_size)?;
    tracing::info!("data: {}", dataset.describe());
    let fid = match args.eval_every {
        0 => None,
        every => Some(fid_monitor(&args, &model_cfg, &dataset, every)?),
    };
    tracing::info!(
        "preset {} | {} steps, batch {}, lr D {} G {}, {:?} loss, {threads} threads | run dir {}",
        model_cfg.name,
        cfg.steps,
        cfg.batch_size,
        cfg.lr_d,
        cfg.lr_g,
        cfg.loss,
        run_dir.root().display()
    );
    let device = candle_core::Device::Cpu;
    let mut trainer = if resuming {
        Trainer::resume(model_cfg, cfg, dataset, run_dir.clone(), device)?
    } else {
        Trainer::new(model_cfg, cfg, dataset, run_dir.clone(), device)?
    };
    if resuming {
        tracing::info!("resuming from step {}", trainer.step());
    }
    if let Some(monitor) = fid {
        trainer.set_fid_monitor(monitor);
    }

    let stop = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&stop);
    ctrlc::set_handler(move || {
        if flag.swap(true, Ordering::SeqCst) {
            // A second Ctrl-C: the user does not want to wait for the checkpoint.
            std::process::exit(130);
        }
        eprintln!(
            "\ninterrupt: finishing the step and writing a checkpoint (Ctrl-C again to abort)"
        );
    })
    .context("installing the Ctrl-C handler")?;

    let schedule = Schedule {
        sample_every: args.sample_every,
        checkpoint_every: args.checkpoint_every,
        log_every: args.log_every.max(1),
        keep_last: args.keep_last.max(1),
        progress_bar,
        tensorboard: !args.no_tensorboard,
    };
    match trainer.run(&schedule, &stop)? {
        Outcome::Finished { step } => {
            tracing::info!("finished at step {step}: {}", run_dir.root().display());
            Ok(0)
        }
        Outcome::Interrupted { step } => {
            tracing::info!(
                "interrupted at step {step}; continue with: sagan-train --resume {}",
                run_dir.root().display()
            );
            Ok(130)
        }
    }
}

/// runs/PRESET, or the first runs/PRESET-N that does not exist yet.
fn next_free_run_dir(preset: &str) -> PathBuf {
    let base = Path::new("runs");
    std::iter::once(base.join(preset))
        .chain((2..).map(|i| base.join(format!("{preset}-{i}"))))
        .find(|p| !p.exists())
        .unwrap_or_else(|| base.join(preset))
}

/// The FID monitor: the feature network on ONNX Runtime's CPU provider and the real statistics.
fn fid_monitor(
    args: &Args,
    model: &ModelConfig,
    data: &Dataset,
    every: usize,
) -> Result<FidMonitor> {
    if args.eval_count < 2 {
        bail!("--eval-count must be at least 2 (FID needs a covariance)");
    }
    let runtime = Runtime::init(&LibrarySearch::from_process(args.ort_lib.clone(), false))?;
    let options = FeatureNetOptions::default();
    let net = match &args.feature_net {
        Some(path) => FeatureNet::load(runtime, path, &options)?,
        None => {
            let shape = [model.channels, model.image_size, model.image_size];
            builtin_feature_net(runtime, Some(shape), &options)
                .with_context(|| format!("--eval-every for preset {}", model.name))?
        }
    };
    let monitor = FidMonitor::new(net, data, args.eval_count, every)?;
    tracing::info!("FID every {every} steps on {} images", monitor.count());
    Ok(monitor)
}
