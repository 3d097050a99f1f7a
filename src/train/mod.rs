//! The training loop: hinge-loss SAGAN with two time-scale Adam, EMA of G, checkpoints,
//! samples, attention maps and metrics in a run directory.

pub mod adam;
pub mod cpu;
pub mod device;
pub mod ema;
pub mod fid;
pub mod loss;
mod manifest;
pub mod memory;
pub mod metrics;
pub mod session;
pub mod tensorboard;

#[cfg(test)]
mod generic_parity;

use crate::checkpoint::{self, Kind, Metadata, RunDir};
use crate::config::{ModelConfig, TrainConfig};
use crate::data::Dataset;
use crate::image_io::{
    attention_overlay, default_queries, encode_png, grid_image, ImageBatch, MapGrid,
};
use crate::model::{self, Discriminator, Generator, LayerStack};
use crate::rng::{self, streams};
use crate::{Error, Result};
use adam::{Adam, AdamConfig};
use candle_core::{Device, Tensor};
use candle_nn::VarMap;
use ema::Ema;
use fid::FidMonitor;
use metrics::{MetricsLog, Record};
use rand::seq::SliceRandom;
use rand::Rng;
use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;
use tensorboard::{EventWriter, Png};

/// How often things are written; none of it changes what is computed. Stored in the run's
/// run.json: a resumed run keeps it unless flags change it.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Schedule {
    pub sample_every: usize,
    pub checkpoint_every: usize,
    pub log_every: usize,
    pub keep_last: usize,
    /// Draw a progress bar (else log plain lines).
    #[serde(skip)]
    pub progress_bar: bool,
    /// Write TensorBoard event files beside metrics.jsonl (chosen by each invocation).
    #[serde(skip)]
    pub tensorboard: bool,
}

impl Default for Schedule {
    fn default() -> Self {
        Self {
            sample_every: 100,
            checkpoint_every: 100,
            log_every: 10,
            keep_last: 3,
            progress_bar: false,
            tensorboard: true,
        }
    }
}

/// How a call to [`Trainer::run`] ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Finished { step: usize },
    Interrupted { step: usize },
}

/// Numbers from one generator step and the discriminator steps before it.
#[derive(Debug, Clone, Copy, Default)]
pub struct StepStats {
    pub d_loss: f32,
    pub g_loss: f32,
    pub d_real: f32,
    pub d_fake: f32,
}

/// Images shown in sample grids; the first few also get attention maps.
const SAMPLE_COUNT: usize = 64;
/// A class-conditional model's grid: one class per row, this many images per row, at most
/// `MAX_CLASS_ROWS` rows (classes spread evenly over the range).
const SAMPLES_PER_CLASS: usize = 8;
const MAX_CLASS_ROWS: usize = 10;
const ATTENTION_IMAGES: usize = 4;
/// Sample images generated per forward pass (the first chunk holds the attention images).
const SAMPLE_CHUNK: usize = 8;
const ATTENTION_QUERIES: usize = 4;

pub struct Trainer {
    model_cfg: ModelConfig,
    cfg: TrainConfig,
    device: Device,
    run: RunDir,
    dataset: Dataset,
    g_vars: VarMap,
    d_vars: VarMap,
    generator: Generator,
    discriminator: Discriminator,
    opt_g: Adam,
    opt_d: Adam,
    ema: Option<Ema>,
    /// Generator steps done.
    step: usize,
    fixed_z: Tensor,
    /// The class of each fixed latent (one class per grid row); None when unconditional.
    fixed_classes: Option<Tensor>,
    /// The data order of the current epoch, cached: (epoch, permutation).
    epoch_order: Option<(usize, Vec<usize>)>,
    fid: Option<FidMonitor>,
    /// Written into every checkpoint file (see [`Metadata::run_id`]).
    run_id: String,
}

impl Trainer {
    /// A fresh run, initialised from `cfg.seed`.
    pub fn new(
        model_cfg: ModelConfig,
        cfg: TrainConfig,
        dataset: Dataset,
        run: RunDir,
        device: Device,
    ) -> Result<Self> {
        cfg.validate()?;
        if dataset.len() < cfg.batch_size {
            return Err(Error::Config(format!(
                "the dataset has {} images, fewer than the batch size {}",
                dataset.len(),
                cfg.batch_size
            )));
        }
        if model_cfg.is_conditional() && dataset.num_classes() < 2 {
            return Err(Error::Config(format!(
                "preset {} is class-conditional ({} classes) but the training images carry no \
                 labels: use MNIST (with its labels file) or an image folder with one sub-folder per class",
                model_cfg.name, model_cfg.num_classes
            )));
        }
        if model_cfg.is_conditional() && dataset.num_classes() > model_cfg.num_classes {
            return Err(Error::Config(format!(
                "the training images have {} classes, preset {} only {}",
                dataset.num_classes(),
                model_cfg.name,
                model_cfg.num_classes
            )));
        }
        if (dataset.channels(), dataset.size()) != (model_cfg.channels, model_cfg.image_size) {
            return Err(Error::Config(format!(
                "the dataset was loaded as {}x{0}x{}, the preset needs {}x{2}x{}",
                dataset.channels(),
                dataset.size(),
                model_cfg.channels,
                model_cfg.image_size
            )));
        }
        let g_vars = VarMap::new();
        let d_vars = VarMap::new();
        let generator = Generator::new(
            rng::seeded_var_builder(&g_vars, rng::stream(cfg.seed, streams::INIT_G), &device),
            &model_cfg,
        )?;
        let discriminator = Discriminator::new(
            rng::seeded_var_builder(&d_vars, rng::stream(cfg.seed, streams::INIT_D), &device),
            &model_cfg,
        )?;
        let adam = |lr| AdamConfig {
            lr,
            beta1: cfg.beta1,
            beta2: cfg.beta2,
            eps: 1e-8,
        };
        let opt_g = Adam::new(&g_vars, adam(cfg.lr_g));
        let opt_d = Adam::new(&d_vars, adam(cfg.lr_d));
        let ema = match cfg.ema_decay {
            Some(decay) => Some(Ema::new(&g_vars, &model_cfg, decay, &device)?),
            None => None,
        };
        let (fixed_count, fixed_classes) = match model_cfg.num_classes {
            0 => (SAMPLE_COUNT, None),
            k => {
                let rows = k.min(MAX_CLASS_ROWS);
                let classes: Vec<u32> = (0..rows * SAMPLES_PER_CLASS)
                    .map(|i| ((i / SAMPLES_PER_CLASS) * k / rows) as u32)
                    .collect();
                let n = classes.len();
                (n, Some(Tensor::from_vec(classes, n, &device)?))
            }
        };
        let fixed_z = rng::normal_tensor(
            &mut rng::stream(cfg.seed, streams::FIXED_Z),
            fixed_count,
            model_cfg.z_dim,
            &device,
        )?;
        Ok(Self {
            model_cfg,
            cfg,
            device,
            run,
            dataset,
            g_vars,
            d_vars,
            generator,
            discriminator,
            opt_g,
            opt_d,
            ema,
            step: 0,
            fixed_z,
            fixed_classes,
            epoch_order: None,
            fid: None,
            // Identity, not training state: from the OS's entropy, not the run's seed, so two
            // runs of one seed still tell their files apart.
            run_id: format!("{:016x}", rand::random::<u64>()),
        })
    }

    /// Continues the run in `run` from its latest checkpoint. `cfg` must be the configuration
    /// stored there, except that `steps` may be raised.
    pub fn resume(
        model_cfg: ModelConfig,
        cfg: TrainConfig,
        dataset: Dataset,
        run: RunDir,
        device: Device,
    ) -> Result<Self> {
        let step = run.latest_step()?.ok_or_else(|| Error::Checkpoint {
            path: run.checkpoints(),
            msg: "no checkpoint to resume from".into(),
        })?;
        let mut trainer = Self::new(model_cfg, cfg, dataset, run, device)?;
        let dir = trainer.run.step_dir(step);
        // The generator's metadata must be this run's; checkpoint::check_siblings holds the
        // other files of the step to the same run id, step and preset.
        let generator_path = dir.join(Kind::Generator.file_name());
        let generator_meta = checkpoint::read_metadata(&generator_path)?;
        let mismatch = |path: &std::path::Path, what: &str| Error::Checkpoint {
            path: path.to_path_buf(),
            msg: format!("{what} differs from the run's"),
        };
        if generator_meta.model != trainer.model_cfg {
            return Err(mismatch(&generator_path, "its preset"));
        }
        if generator_meta.step != step {
            return Err(mismatch(&generator_path, "its step"));
        }
        checkpoint::check_siblings(&generator_path, &generator_meta)?;
        let run_id = generator_meta.run_id;
        let load = |kind: Kind| -> Result<_> {
            let path = dir.join(kind.file_name());
            let (tensors, meta) = checkpoint::load(&path, &trainer.device)?;
            if meta.kind != kind {
                return Err(mismatch(&path, "its kind"));
            }
            Ok((tensors, path))
        };
        let (tensors, path) = load(Kind::Generator)?;
        checkpoint::restore_varmap(&trainer.g_vars, &tensors, &path)?;
        let (tensors, path) = load(Kind::Discriminator)?;
        checkpoint::restore_varmap(&trainer.d_vars, &tensors, &path)?;
        if let Some(ema) = &trainer.ema {
            let (tensors, path) = load(Kind::GeneratorEma)?;
            checkpoint::restore_varmap(ema.varmap(), &tensors, &path)?;
        }
        let (tensors, path) = load(Kind::Optimizer)?;
        for (opt, prefix) in [(&mut trainer.opt_g, "g"), (&mut trainer.opt_d, "d")] {
            opt.load_state(&tensors, prefix)
                .map_err(|msg| Error::Checkpoint {
                    path: path.clone(),
                    msg,
                })?;
        }
        trainer.step = step;
        if let Some(id) = run_id {
            trainer.run_id = id;
        }
        Ok(trainer)
    }

    /// The identity written into this run's checkpoints.
    pub fn run_id(&self) -> &str {
        &self.run_id
    }

    pub fn step(&self) -> usize {
        self.step
    }

    /// Evaluates FID every `monitor.every()` steps, logs it and keeps the best checkpoint.
    pub fn set_fid_monitor(&mut self, monitor: FidMonitor) {
        self.fid = Some(monitor);
    }

    /// The FID of the sampling generator on the evaluation latents.
    fn evaluate_fid(&mut self) -> Result<Option<f64>> {
        let Some(mut monitor) = self.fid.take() else {
            return Ok(None);
        };
        let mut rng = rng::stream(self.cfg.seed, streams::EVAL_Z);
        // A conditional model is evaluated on every class in turn, so all are represented.
        let classes = (self.model_cfg.num_classes > 0).then(|| {
            let k = self.model_cfg.num_classes as u32;
            (0..monitor.count() as u32)
                .map(|i| i % k)
                .collect::<Vec<_>>()
        });
        let result = rng::normal_tensor(
            &mut rng,
            monitor.count(),
            self.model_cfg.z_dim,
            &self.device,
        )
        .and_then(|z| {
            let classes = classes
                .map(|c| Tensor::from_vec(c, monitor.count(), &self.device))
                .transpose()?;
            Ok((z, classes))
        })
        .map_err(Error::from)
        .and_then(|(z, classes)| monitor.fid(self.sampling_generator(), &z, classes.as_ref()));
        self.fid = Some(monitor);
        result.map(Some)
    }

    pub fn config(&self) -> &TrainConfig {
        &self.cfg
    }

    pub fn generator_vars(&self) -> &VarMap {
        &self.g_vars
    }

    pub fn discriminator_vars(&self) -> &VarMap {
        &self.d_vars
    }

    /// Indices of the `k`-th discriminator batch: epochs are seeded permutations, so the
    /// order depends only on the seed and k (a resumed run sees the same data).
    fn batch_indices(&mut self, k: usize) -> Vec<usize> {
        let b = self.cfg.batch_size;
        let per_epoch = self.dataset.len() / b;
        let (epoch, i) = (k / per_epoch, k % per_epoch);
        if self.epoch_order.as_ref().map(|(e, _)| *e) != Some(epoch) {
            let mut order: Vec<usize> = (0..self.dataset.len()).collect();
            order.shuffle(&mut rng::stream(
                self.cfg.seed,
                streams::SHUFFLE_BASE + epoch as u64,
            ));
            self.epoch_order = Some((epoch, order));
        }
        let order = self
            .epoch_order
            .as_ref()
            .map(|(_, o)| o.as_slice())
            .unwrap_or_default();
        order[i * b..(i + 1) * b].to_vec()
    }

    /// The `k`-th batch of real images and, for a conditional model, their labels.
    fn real_batch(&mut self, k: usize) -> Result<(Tensor, Option<Tensor>)> {
        let indices = self.batch_indices(k);
        let mut pixels = Vec::with_capacity(
            indices.len() * self.model_cfg.channels * self.model_cfg.image_size.pow(2),
        );
        self.dataset.fill_batch(&indices, &mut pixels);
        let s = self.model_cfg.image_size;
        let images = Tensor::from_vec(
            pixels,
            (indices.len(), self.model_cfg.channels, s, s),
            &self.device,
        )?;
        let labels = match self.model_cfg.is_conditional() {
            true => {
                let labels = self.dataset.labels();
                let classes: Vec<u32> = indices.iter().map(|&i| labels[i]).collect();
                Some(Tensor::from_vec(classes, indices.len(), &self.device)?)
            }
            false => None,
        };
        Ok((images, labels))
    }

    /// Latents for one batch and, for a conditional model, classes drawn uniformly after them
    /// from the same stream.
    fn latents(&self, stream: u64) -> Result<(Tensor, Option<Tensor>)> {
        let mut rng = rng::stream(self.cfg.seed, streams::STEP_Z_BASE + stream);
        let b = self.cfg.batch_size;
        let z = rng::normal_tensor(&mut rng, b, self.model_cfg.z_dim, &self.device)?;
        let classes = match self.model_cfg.num_classes {
            0 => None,
            k => {
                let classes: Vec<u32> = (0..b).map(|_| rng.random_range(0..k as u32)).collect();
                Some(Tensor::from_vec(classes, b, &self.device)?)
            }
        };
        Ok((z, classes))
    }

    /// One generator step, preceded by `n_dis` discriminator steps.
    pub fn train_step(&mut self) -> Result<StepStats> {
        let mut stats = StepStats::default();
        let n = self.cfg.n_dis as f32;
        for j in 0..self.cfg.n_dis {
            let d = self.discriminator_step(self.step * self.cfg.n_dis + j)?;
            stats.d_loss += d.d_loss / n;
            stats.d_real += d.d_real / n;
            stats.d_fake += d.d_fake / n;
        }
        stats.g_loss = self.generator_step()?;
        self.step += 1;
        if !(stats.d_loss.is_finite() && stats.g_loss.is_finite()) {
            return Err(self.diverged(format!("d_loss {}, g_loss {}", stats.d_loss, stats.g_loss)));
        }
        Ok(stats)
    }

    /// The `k`-th discriminator step (g_loss of the result is 0).
    fn discriminator_step(&mut self, k: usize) -> Result<StepStats> {
        let b = self.cfg.batch_size;
        let (real, real_classes) = self.real_batch(k)?;
        let (z, fake_classes) = self.latents(2 * k as u64)?;
        // G in training mode but without gradients: the D step must not reach G's weights,
        // and building G's backward graph would be wasted work.
        let fake = model::without_grad(|| self.generator.forward(&z, fake_classes.as_ref(), true))?;
        let classes = match (real_classes, fake_classes) {
            (Some(real), Some(fake)) => Some(Tensor::cat(&[real, fake], 0)?),
            _ => None,
        };
        // Real and fake in one batch: one spectral-norm power iteration per D step.
        let logits = self.discriminator.forward(
            &Tensor::cat(&[&real, &fake], 0)?,
            classes.as_ref(),
            true,
        )?;
        let (d_real, d_fake) = (logits.narrow(0, 0, b)?, logits.narrow(0, b, b)?);
        let d_loss = loss::discriminator_loss(self.cfg.loss, &d_real, &d_fake)?;
        self.opt_d.step(&d_loss.backward()?)?;
        Ok(StepStats {
            d_loss: d_loss.to_scalar::<f32>()?,
            g_loss: 0.0,
            d_real: d_real.mean_all()?.to_scalar::<f32>()?,
            d_fake: d_fake.mean_all()?.to_scalar::<f32>()?,
        })
    }

    /// One generator step; returns its loss.
    fn generator_step(&mut self) -> Result<f32> {
        let (z, classes) = self.latents(2 * self.step as u64 + 1)?;
        // D in evaluation mode: its spectral-norm vectors stay put and its parameters are
        // constants (ops::grad_mode::param), so the G step changes nothing of D and its backward
        // computes no D weight gradients.
        let fake = self.generator.forward(&z, classes.as_ref(), true)?;
        let logits = self.discriminator.forward(&fake, classes.as_ref(), false)?;
        let g_loss = loss::generator_loss(self.cfg.loss, &logits)?;
        self.opt_g.step(&g_loss.backward()?)?;
        if let Some(ema) = &self.ema {
            let trained: HashSet<&str> = self.opt_g.trained().collect();
            ema.update(&self.g_vars, &trained, self.step + 1)?;
        }
        Ok(g_loss.to_scalar::<f32>()?)
    }

    /// The generator samples are drawn from: the EMA one when there is one.
    pub fn sampling_generator(&self) -> &Generator {
        self.ema
            .as_ref()
            .map(Ema::generator)
            .unwrap_or(&self.generator)
    }

    /// Writes the fixed-z sample grid (a conditional model: one class per row) and attention
    /// maps of the current step; returns the grid's path and every picture as written.
    fn save_samples(&self) -> Result<(PathBuf, Vec<Png>)> {
        let n = self.fixed_z.dim(0)?;
        let (c, h, w) = (
            self.model_cfg.channels,
            self.model_cfg.image_size,
            self.model_cfg.image_size,
        );
        let mut pixels = Vec::with_capacity(n * c * h * w);
        let mut maps = Vec::new();
        // In chunks: candle keeps every intermediate of a forward alive until its output is
        // dropped, which at 128x128 would be gigabytes for the whole grid at once.
        for start in (0..n).step_by(SAMPLE_CHUNK) {
            let len = SAMPLE_CHUNK.min(n - start);
            let classes = self
                .fixed_classes
                .as_ref()
                .map(|c| c.narrow(0, start, len))
                .transpose()?;
            let (images, chunk_maps) = self.sampling_generator().forward_with_attention(
                &self.fixed_z.narrow(0, start, len)?,
                classes.as_ref(),
                false,
            )?;
            pixels.extend(images.flatten_all()?.to_vec1::<f32>()?);
            if start == 0 {
                maps = chunk_maps;
            }
        }
        let batch = ImageBatch::new(&pixels, n, c, h, w)?;
        let grid = self
            .run
            .samples()
            .join(format!("step-{:08}.png", self.step));
        let columns = match self.fixed_classes {
            Some(_) => SAMPLES_PER_CLASS,
            None => (n as f64).sqrt().ceil() as usize,
        };
        let mut pictures = vec![write_png(
            &grid,
            "samples".into(),
            &grid_image(batch, columns),
        )?];
        let shown = ATTENTION_IMAGES.min(n);
        let first = ImageBatch::new(&pixels[..shown * c * h * w], shown, c, h, w)?;
        let layers = attention_layer_indices(self.sampling_generator().stack());
        for (map, layer) in maps.iter().zip(layers) {
            let (_, queries, keys) = map.dims3()?;
            let grid = MapGrid::square(queries, keys);
            let values = map.narrow(0, 0, shown)?.flatten_all()?.to_vec1::<f32>()?;
            let points = default_queries(grid.queries.0, grid.queries.1, ATTENTION_QUERIES);
            let picture = attention_overlay(first, &values, grid, &points)?;
            let path = self
                .run
                .samples()
                .join(format!("attention-g{layer}-step-{:08}.png", self.step));
            pictures.push(write_png(&path, format!("attention/g{layer}"), &picture)?);
        }
        Ok((grid, pictures))
    }

    fn draw_curves(&self) -> Result<()> {
        metrics::save_curves(&metrics::read(&self.run.metrics())?, &self.run.curves())
    }

    /// The divergence error at the current step: what was not finite, and the checkpoint
    /// training can be taken up from (every written one holds finite values only).
    fn diverged(&self, what: String) -> Error {
        let last_good = match self.run.latest_step() {
            Ok(Some(step)) => format!(
                "the last checkpoint, all finite, is {}; train again with lower learning rates (--lr-d, --lr-g)",
                self.run.step_dir(step).display()
            ),
            _ => "no checkpoint was written; lower the learning rates (--lr-d, --lr-g) and train again"
                .to_string(),
        };
        Error::Diverged {
            step: self.step,
            what,
            last_good,
        }
    }

    /// The files of a checkpoint of the current state, refused if any value is not finite: a
    /// checkpoint on disk is always one training can go on from.
    fn checkpoint_files(&self) -> Result<Vec<checkpoint::CheckpointFile>> {
        let files = self.unchecked_checkpoint_files()?;
        for (meta, tensors) in &files {
            if let Some(name) = checkpoint::first_non_finite(tensors)? {
                return Err(self.diverged(format!(
                    "{} tensor '{name}' holds NaN or infinity; nothing written",
                    meta.kind.name()
                )));
            }
        }
        Ok(files)
    }

    fn unchecked_checkpoint_files(&self) -> Result<Vec<checkpoint::CheckpointFile>> {
        let meta = |kind| Metadata {
            kind,
            model: self.model_cfg.clone(),
            train: self.cfg.clone(),
            step: self.step,
            run_id: Some(self.run_id.clone()),
        };
        let mut files = vec![
            (
                meta(Kind::Generator),
                checkpoint::varmap_tensors(&self.g_vars),
            ),
            (
                meta(Kind::Discriminator),
                checkpoint::varmap_tensors(&self.d_vars),
            ),
        ];
        if let Some(ema) = &self.ema {
            files.push((
                meta(Kind::GeneratorEma),
                checkpoint::varmap_tensors(ema.varmap()),
            ));
        }
        let mut optimizer = self.opt_g.state("g")?;
        optimizer.extend(self.opt_d.state("d")?);
        files.push((meta(Kind::Optimizer), optimizer));
        Ok(files)
    }

    pub fn save_checkpoint(&self, keep_last: usize) -> Result<PathBuf> {
        self.run
            .write_checkpoint(self.step, &self.checkpoint_files()?, keep_last)
    }

    fn gammas(&self) -> Result<BTreeMap<String, f32>> {
        let named = |net: &str, stack: &LayerStack| -> Result<Vec<(String, f32)>> {
            Ok(stack
                .gammas()?
                .into_iter()
                .map(|(i, g)| (format!("{net}.layers.{i}"), g))
                .collect())
        };
        let mut gammas = named("g", self.generator.stack())?;
        gammas.extend(named("d", self.discriminator.stack())?);
        Ok(gammas.into_iter().collect())
    }

    /// Trains until `cfg.steps` or until `stop` is raised; either way the last state is
    /// checkpointed and the curves are drawn.
    pub fn run(&mut self, schedule: &Schedule, stop: &AtomicBool) -> Result<Outcome> {
        self.run.create()?;
        let metrics = MetricsLog::open(&self.run.metrics(), self.step)?;
        // Also with --no-tensorboard: events past the checkpoint would stay beside those a later
        // resume writes for the same steps.
        tensorboard::prune(self.run.root(), self.step)?;
        let mut events = schedule
            .tensorboard
            .then(|| EventWriter::create(self.run.root(), self.step))
            .transpose()?;
        if let Some(events) = &events {
            tracing::info!("TensorBoard events: {}", events.path().display());
        }
        let bar = progress_bar(self.cfg.steps, self.step, schedule.progress_bar);
        let started = Instant::now();
        let mut window = (Instant::now(), 0usize, StepStats::default());
        let every = |n: usize, step: usize| n > 0 && step.is_multiple_of(n);
        let mut interrupted = false;
        let mut best_fid = metrics::read(&self.run.metrics())?
            .iter()
            .filter_map(|r| r.fid)
            .fold(f64::INFINITY, f64::min);
        while self.step < self.cfg.steps {
            if stop.load(Ordering::SeqCst) {
                interrupted = true;
                break;
            }
            // On a pool worker, the kernels' parallel loops start inside the pool with this
            // thread working too, instead of each being queued from outside for workers to
            // wake up to.
            let stats = rayon::scope(|_| self.train_step())?;
            bar.inc(1);
            window.1 += 1;
            for (sum, x) in [
                (&mut window.2.d_loss, stats.d_loss),
                (&mut window.2.g_loss, stats.g_loss),
                (&mut window.2.d_real, stats.d_real),
                (&mut window.2.d_fake, stats.d_fake),
            ] {
                *sum += x;
            }
            let last = self.step == self.cfg.steps;
            let fid_due = self
                .fid
                .as_ref()
                .is_some_and(|m| every(m.every(), self.step) || last);
            let fid = if fid_due { self.evaluate_fid()? } else { None };
            if every(schedule.log_every, self.step) || last || fid.is_some() {
                let n = window.1 as f32;
                let secs = window.0.elapsed().as_secs_f32();
                let record = Record {
                    step: self.step,
                    d_loss: window.2.d_loss / n,
                    g_loss: window.2.g_loss / n,
                    d_real: window.2.d_real / n,
                    d_fake: window.2.d_fake / n,
                    gammas: self.gammas()?,
                    images_per_sec: n * self.cfg.batch_size as f32 / secs.max(1e-9),
                    elapsed_sec: started.elapsed().as_secs_f64(),
                    fid,
                };
                metrics.append(&record)?;
                if let Some(events) = &mut events {
                    events.scalars(record.step, &tensorboard::scalars(&record))?;
                }
                let line = format!(
                    "step {}/{} d_loss {:.3} g_loss {:.3} D(x) {:.2} D(G(z)) {:.2} {:.1} img/s",
                    record.step,
                    self.cfg.steps,
                    record.d_loss,
                    record.g_loss,
                    record.d_real,
                    record.d_fake,
                    record.images_per_sec
                );
                bar.set_message(format!(
                    "{:.1} img/s  d {:.3}  g {:.3}",
                    record.images_per_sec, record.d_loss, record.g_loss
                ));
                if bar.is_hidden() {
                    tracing::info!("{line}");
                }
                window = (Instant::now(), 0, StepStats::default());
            }
            if every(schedule.sample_every, self.step) || last {
                let (path, pictures) = self.save_samples()?;
                if let Some(events) = &mut events {
                    events.images(self.step, &pictures)?;
                }
                self.draw_curves()?;
                bar.suspend(|| tracing::info!("samples: {}", path.display()));
            }
            if let Some(fid) = fid {
                bar.suspend(|| tracing::info!("step {}: FID {fid:.3}", self.step));
                if fid < best_fid {
                    best_fid = fid;
                    let path = self.run.write_best(&self.checkpoint_files()?)?;
                    bar.suspend(|| tracing::info!("best FID so far: {}", path.display()));
                }
            }
            if every(schedule.checkpoint_every, self.step) || last {
                let path = self.save_checkpoint(schedule.keep_last)?;
                bar.suspend(|| tracing::info!("checkpoint: {}", path.display()));
            }
        }
        bar.finish_and_clear();
        if interrupted && self.run.latest_step()? != Some(self.step) {
            let path = self.save_checkpoint(schedule.keep_last)?;
            tracing::info!("checkpoint: {}", path.display());
        }
        if interrupted {
            self.draw_curves()?;
        }
        Ok(match interrupted {
            true => Outcome::Interrupted { step: self.step },
            false => Outcome::Finished { step: self.step },
        })
    }
}

/// Writes `image` as a PNG file (atomically) and returns it as an image summary named `tag`.
fn write_png(path: &Path, tag: String, image: &image::RgbImage) -> Result<Png> {
    let bytes = encode_png(path, image)?;
    crate::fsutil::write_atomic(path, &bytes)?;
    Ok(Png {
        tag,
        width: image.width(),
        height: image.height(),
        bytes,
    })
}

fn attention_layer_indices(stack: &LayerStack) -> Vec<usize> {
    stack
        .layers()
        .iter()
        .enumerate()
        .filter(|(_, l)| matches!(l, crate::model::Layer::Attention(_)))
        .map(|(i, _)| i)
        .collect()
}

fn progress_bar(total: usize, done: usize, visible: bool) -> indicatif::ProgressBar {
    if !visible {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(total as u64).with_position(done as u64);
    if let Ok(style) =
        indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} steps  {msg}  eta {eta}")
    {
        bar.set_style(style);
    }
    bar
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::DataSource;

    fn snapshot(varmap: &VarMap) -> Vec<(String, Vec<f32>)> {
        checkpoint::varmap_tensors(varmap)
            .into_iter()
            .map(|(name, t)| (name, t.flatten_all().unwrap().to_vec1::<f32>().unwrap()))
            .collect()
    }

    fn trainer() -> Trainer {
        let model = ModelConfig::resolve("sagan-mnist28").unwrap();
        let cfg = TrainConfig {
            batch_size: 4,
            ..TrainConfig::default()
        };
        let data = Dataset::load(&DataSource::Builtin, 1, 28).unwrap();
        let dir = std::env::temp_dir().join(format!("sagan-unit-{}", std::process::id()));
        Trainer::new(model, cfg, data, RunDir::new(dir), Device::Cpu).unwrap()
    }

    /// Buffers (batch-norm statistics, spectral-norm vectors) may move in a forward pass; the
    /// trained weights are what a step of the other network must leave alone.
    fn trained_weights(
        all: Vec<(String, Vec<f32>)>,
        trained: &HashSet<String>,
    ) -> Vec<(String, Vec<f32>)> {
        all.into_iter()
            .filter(|(name, _)| trained.contains(name))
            .collect()
    }

    #[test]
    fn the_d_step_leaves_g_weights_and_the_g_step_leaves_all_of_d() {
        let mut t = trainer();
        t.train_step().unwrap();
        let g_trained: HashSet<String> = t.opt_g.trained().map(String::from).collect();
        assert!(
            g_trained.contains("layers.0.conv.weight")
                && !g_trained.contains("layers.0.bn.running_mean")
        );

        let g_before = trained_weights(snapshot(&t.g_vars), &g_trained);
        let d_before = snapshot(&t.d_vars);
        t.discriminator_step(1).unwrap();
        assert_eq!(
            trained_weights(snapshot(&t.g_vars), &g_trained),
            g_before,
            "the D step changed G"
        );
        assert_ne!(snapshot(&t.d_vars), d_before, "the D step did not train D");

        let d_before = snapshot(&t.d_vars);
        let g_before = snapshot(&t.g_vars);
        t.generator_step().unwrap();
        assert_eq!(
            snapshot(&t.d_vars),
            d_before,
            "the G step changed D (weights or SN vectors)"
        );
        assert_ne!(snapshot(&t.g_vars), g_before, "the G step did not train G");
    }
}
