//! One sagan-train invocation: a fresh run or a resumed one, set up from the flags, the preset
//! and what the run directory stores, then trained under the run directory's lock.

use super::device::DeviceRequest;
use super::fid::FidMonitor;
use super::manifest::Manifest;
use super::{cpu, memory, Outcome, Schedule, Trainer};
use crate::checkpoint::{self, Kind, RunDir};
use crate::config::{LossKind, ModelConfig, PresetTraining, TrainConfig};
use crate::data::{DataSource, Dataset};
use crate::eval::{builtin_feature_net, FeatureNet, FeatureNetOptions};
use crate::infer::{LibrarySearch, Runtime};
use crate::{Error, Result};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

pub const DEFAULT_PRESET: &str = "sagan-mnist28";

/// sagan-train's `--help` description, examples and guarantees.
pub const ABOUT: &str = "\
Train a Self-Attention GAN (SAGAN) with candle, on the CPU or (--device cuda) a GPU.

With no arguments, trains the `sagan-mnist28` preset on the MNIST digits built into the
binary and writes a run directory under runs/: checkpoints (safetensors), a fixed-z sample
grid and attention maps every --sample-every steps, metrics.jsonl, curves.png (redrawn with
every sample grid) and TensorBoard event files (`tensorboard --logdir runs` shows them).

Examples:
  sagan-train                                   # built-in default, about 5 minutes on 2 cores
  sagan-train --steps 10000                     # the same, longer
  sagan-train --preset sagan64 --data ~/celeba  # any folder of .png/.jpg, sub-folders = classes
  sagan-train --resume runs/sagan-mnist28       # continue an interrupted run (Ctrl-C saves one)
  sagan-train --preset sagan64 --data ~/celeba --device cuda  # on a GPU (a --features cuda build)

One trainer at a time holds a run directory. Checkpoints are written whole or not at all,
hold finite values only, and a resumed run continues bit for bit as if never stopped.";

/// What the user asked for; `None` means "not given" (the preset's or the run's value).
#[derive(Debug, Clone, Default)]
pub struct Request {
    pub preset: Option<String>,
    pub data: Option<PathBuf>,
    pub out: Option<PathBuf>,
    pub resume: Option<PathBuf>,
    /// Hyperparameters given as flags; they override the preset's.
    pub training: PresetTraining,
    pub loss: Option<LossKind>,
    pub seed: Option<u64>,
    pub schedule: ScheduleRequest,
    pub threads: Option<usize>,
    /// Where to train; a resumed run may move to another device.
    pub device: DeviceRequest,
    pub fid: FidRequest,
    pub progress_bar: bool,
    /// Write no TensorBoard event files in this invocation.
    pub no_tensorboard: bool,
}

/// Output schedule flags: a fresh run takes the defaults for those not given, a resumed run its
/// own stored schedule. `#[command(flatten)]` into sagan-train's arguments.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct ScheduleRequest {
    /// Write a sample grid and attention maps every N steps (0: only at the end) [default: 100,
    /// or the resumed run's].
    #[arg(long)]
    pub sample_every: Option<usize>,

    /// Write a checkpoint every N steps (0: only at the end or on Ctrl-C) [default: 100, or
    /// the resumed run's].
    #[arg(long)]
    pub checkpoint_every: Option<usize>,

    /// Log metrics every N steps [default: 10, or the resumed run's].
    #[arg(long)]
    pub log_every: Option<usize>,

    /// Keep the newest N checkpoints [default: 3, or the resumed run's].
    #[arg(long)]
    pub keep_last: Option<usize>,
}

impl ScheduleRequest {
    fn over(&self, base: &Schedule, progress_bar: bool, tensorboard: bool) -> Result<Schedule> {
        let schedule = Schedule {
            sample_every: self.sample_every.unwrap_or(base.sample_every),
            checkpoint_every: self.checkpoint_every.unwrap_or(base.checkpoint_every),
            log_every: self.log_every.unwrap_or(base.log_every),
            keep_last: self.keep_last.unwrap_or(base.keep_last),
            progress_bar,
            tensorboard,
        };
        for (flag, value) in [
            ("--log-every", schedule.log_every),
            ("--keep-last", schedule.keep_last),
        ] {
            if value == 0 {
                return Err(Error::Config(format!("{flag} must be at least 1")));
            }
        }
        Ok(schedule)
    }
}

/// FID during training: `#[command(flatten)]` into sagan-train's arguments.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct FidRequest {
    /// Compute FID every N steps (0: never), log it to metrics.jsonl and keep the best
    /// checkpoint in checkpoints/best. Needs ONNX Runtime (tools/install-onnxruntime.sh cpu).
    #[arg(long = "eval-every", value_name = "EVAL_EVERY", default_value_t = 0)]
    pub every: usize,

    /// Generated and real images per FID evaluation.
    #[arg(long = "eval-count", value_name = "EVAL_COUNT", default_value_t = 2000)]
    pub count: usize,

    /// ONNX feature network for FID (outputs `features`, see sagan-eval). Default: the built-in
    /// MNIST classifier, for greyscale presets.
    #[arg(long)]
    pub feature_net: Option<PathBuf>,

    /// The feature network's output to use [default: features].
    #[arg(long)]
    pub features_output: Option<String>,

    /// The ONNX Runtime library for FID (else $ORT_DYLIB_PATH, .onnxruntime/, the system).
    #[arg(long)]
    pub ort_lib: Option<PathBuf>,
}

impl Request {
    /// Flags that would change what a resumed run computes.
    fn conflicts_with_resume(&self) -> Vec<&'static str> {
        let t = &self.training;
        [
            ("--preset", self.preset.is_some()),
            ("--data", self.data.is_some()),
            ("--batch-size", t.batch_size.is_some()),
            ("--lr-d", t.lr_d.is_some()),
            ("--lr-g", t.lr_g.is_some()),
            ("--beta1", t.beta1.is_some()),
            ("--beta2", t.beta2.is_some()),
            ("--n-dis", t.n_dis.is_some()),
            ("--loss", self.loss.is_some()),
            ("--ema-decay", t.ema_decay.is_some()),
            ("--seed", self.seed.is_some()),
        ]
        .into_iter()
        .filter(|(_, given)| *given)
        .map(|(name, _)| name)
        .collect()
    }

    /// The training configuration of a fresh run: the preset's settings overridden by flags.
    fn fresh_config(&self, model: &ModelConfig) -> TrainConfig {
        let d = TrainConfig::with(&self.training.over(&model.training));
        TrainConfig {
            loss: self.loss.unwrap_or(d.loss),
            seed: self.seed.unwrap_or(d.seed),
            data: self.data.clone(),
            ..d
        }
    }
}

/// Trains as `request` asks until done or interrupted by a signal (see [`stop_on_signals`]),
/// and logs how it ended.
pub fn run(request: &Request) -> Result<Outcome> {
    let stop = stop_on_signals()?;
    let (outcome, run) = train(request, &stop)?;
    match outcome {
        Outcome::Finished { step } => {
            tracing::info!("finished at step {step}: {}", run.display())
        }
        Outcome::Interrupted { step } => tracing::info!(
            "interrupted at step {step}; continue with: sagan-train --resume {}",
            run.display()
        ),
    }
    Ok(outcome)
}

/// Everything a session trains with, once settled.
struct Plan {
    model: ModelConfig,
    cfg: TrainConfig,
    run: RunDir,
    schedule: Schedule,
    /// The run's stored identity when resuming.
    resume_from: Option<Manifest>,
}

/// Trains as `request` asks until done or until `stop` is raised. Returns how it ended and the
/// run directory.
pub fn train(request: &Request, stop: &AtomicBool) -> Result<(Outcome, PathBuf)> {
    let threads = cpu::configure(request.threads)?;
    // Before the run directory is touched: a device that cannot be had changes nothing.
    let device = request.device.open()?;
    let (plan, _lock) = plan(request)?;
    let Plan {
        model,
        cfg,
        run,
        schedule,
        resume_from,
    } = plan;
    // The estimate is of host memory; on a GPU the activations live in the GPU's.
    if device.is_cpu() {
        memory::check_fits(&model, cfg.batch_size)?;
    }
    let source = match &cfg.data {
        Some(path) => DataSource::Path(path.clone()),
        None => DataSource::Builtin,
    };
    let dataset = Dataset::load(&source, model.channels, model.image_size)?;
    tracing::info!("data: {}", dataset.describe());
    let fid = match request.fid.every {
        0 => None,
        every => Some(fid_monitor(&request.fid, &model, &dataset, every)?),
    };
    tracing::info!(
        "preset {} | {} steps, batch {}, lr D {} G {}, {:?} loss, {} | run dir {}",
        model.name,
        cfg.steps,
        cfg.batch_size,
        cfg.lr_d,
        cfg.lr_g,
        cfg.loss,
        match request.device {
            DeviceRequest::Cpu => format!("{threads} threads"),
            gpu => gpu.to_string(),
        },
        run.root().display()
    );
    let mut trainer = match &resume_from {
        Some(_) => Trainer::resume(model.clone(), cfg, dataset, run.clone(), device)?,
        None => Trainer::new(model.clone(), cfg, dataset, run.clone(), device)?,
    };
    if resume_from.is_some() {
        tracing::info!("resuming from step {}", trainer.step());
    }
    Manifest {
        run_id: trainer.run_id().to_string(),
        preset: model.name.clone(),
        schedule: schedule.clone(),
    }
    .write(&run)?;
    if let Some(monitor) = fid {
        trainer.set_fid_monitor(monitor);
    }
    let outcome = trainer.run(&schedule, stop)?;
    Ok((outcome, run.root().to_path_buf()))
}

/// Settles the configuration and takes the run directory's lock. A resumed run's stored
/// checkpoint must belong to it (its run id and preset in run.json).
fn plan(request: &Request) -> Result<(Plan, checkpoint::RunLock)> {
    let Some(dir) = &request.resume else {
        let model = ModelConfig::resolve(request.preset.as_deref().unwrap_or(DEFAULT_PRESET))?;
        let cfg = request.fresh_config(&model);
        cfg.validate()?;
        let schedule = request.schedule.over(
            &Schedule::default(),
            request.progress_bar,
            !request.no_tensorboard,
        )?;
        let dir = request
            .out
            .clone()
            .unwrap_or_else(|| next_free_run_dir(&model.name));
        let run = RunDir::new(&dir);
        if run.latest_step()?.is_some() {
            return Err(Error::WouldOverwrite {
                path: dir,
                msg: "already holds checkpoints; continue it with --resume, or pick another --out"
                    .into(),
            });
        }
        let lock = run.lock()?;
        run.remove_stale_temporaries(&lock)?;
        let plan = Plan {
            model,
            cfg,
            run,
            schedule,
            resume_from: None,
        };
        return Ok((plan, lock));
    };
    let conflicts = request.conflicts_with_resume();
    if !conflicts.is_empty() {
        return Err(Error::Config(format!(
            "{}: a resumed run keeps its stored settings; drop {}",
            dir.display(),
            conflicts.join(", ")
        )));
    }
    let run = RunDir::new(dir);
    if !dir.is_dir() {
        return Err(Error::io(
            dir,
            std::io::Error::new(std::io::ErrorKind::NotFound, "no such run directory"),
        ));
    }
    let lock = run.lock()?;
    let removed = run.remove_stale_temporaries(&lock)?;
    if removed > 0 {
        tracing::info!("removed {removed} files of an interrupted write");
    }
    let step = run.latest_step()?.ok_or_else(|| Error::Checkpoint {
        path: dir.clone(),
        msg: "no checkpoint to resume from".into(),
    })?;
    let generator = run.step_dir(step).join(Kind::Generator.file_name());
    let meta = checkpoint::read_metadata(&generator)?;
    // Runs of older versions have no run.json: their checkpoints are taken as they are.
    let manifest = Manifest::read(&run)?.unwrap_or_else(|| Manifest {
        run_id: meta.run_id.clone().unwrap_or_default(),
        preset: meta.model.name.clone(),
        schedule: Schedule::default(),
    });
    let stored_id = meta.run_id.clone().unwrap_or_default();
    if stored_id != manifest.run_id || meta.model.name != manifest.preset {
        return Err(Error::Checkpoint {
            path: run.step_dir(step),
            msg: format!(
                "was written by another run (preset {}, run id {}; this run: preset {}, run id {}, see {}); move it out to resume from the run's own checkpoints",
                meta.model.name,
                if stored_id.is_empty() { "none" } else { &stored_id },
                manifest.preset,
                manifest.run_id,
                Manifest::path(&run).display()
            ),
        });
    }
    let mut cfg = meta.train;
    if let Some(steps) = request.training.steps {
        cfg.steps = steps;
    }
    if cfg.steps <= step {
        return Err(Error::Config(format!(
            "{}: already at step {step}; pass --steps above it to train on",
            dir.display()
        )));
    }
    let schedule = request.schedule.over(
        &manifest.schedule,
        request.progress_bar,
        !request.no_tensorboard,
    )?;
    let plan = Plan {
        model: meta.model,
        cfg,
        run,
        schedule,
        resume_from: Some(manifest),
    };
    Ok((plan, lock))
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
    request: &FidRequest,
    model: &ModelConfig,
    data: &Dataset,
    every: usize,
) -> Result<FidMonitor> {
    if request.count < 2 {
        return Err(Error::Config(
            "--eval-count must be at least 2 (FID needs a covariance)".into(),
        ));
    }
    let runtime = Runtime::init(&LibrarySearch::from_process(request.ort_lib.clone(), false))?;
    let options = FeatureNetOptions {
        features_output: request.features_output.clone(),
        ..FeatureNetOptions::default()
    };
    let net = match &request.feature_net {
        Some(path) => FeatureNet::load(runtime, path, &options)?,
        None => {
            let shape = [model.channels, model.image_size, model.image_size];
            builtin_feature_net(runtime, Some(shape), &options).map_err(|e| {
                Error::Config(format!("--eval-every for preset {}: {e}", model.name))
            })?
        }
    };
    let monitor = FidMonitor::new(net, data, request.count, every)?;
    tracing::info!("FID every {every} steps on {} images", monitor.count());
    Ok(monitor)
}

/// A flag raised by Ctrl-C, SIGTERM (what `kill`, systemd and container runtimes send) or
/// SIGHUP: training finishes its step and writes a checkpoint. A second signal exits at once.
pub fn stop_on_signals() -> Result<std::sync::Arc<AtomicBool>> {
    use std::sync::atomic::Ordering;
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let flag = std::sync::Arc::clone(&stop);
    ctrlc::set_handler(move || {
        if flag.swap(true, Ordering::SeqCst) {
            std::process::exit(130);
        }
        eprintln!("\ninterrupt: finishing the step and writing a checkpoint (again to abort)");
    })
    .map_err(|e| Error::Runtime(format!("installing the interrupt handler: {e}")))?;
    Ok(stop)
}
