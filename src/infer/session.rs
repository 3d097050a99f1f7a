//! One sagan-infer invocation: checks the request, loads the generator, then writes its samples
//! batch by batch (or times it). As the command's output, it prints what it loaded and the
//! first PNG's time to stderr, and what it wrote (or measured) to stdout.

use super::bench::LatencySummary;
use super::cli::{ProviderArgs, TensorRtArgs};
use super::latent::check_truncation;
use super::sampling::{prepare_out_dir, Latents, Outputs, Plan, SampleWriter};
use super::{Generator, InferError, InferResult, Interpolation, LoadOptions, Provider, Runtime};
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// sagan-infer's `--help` examples and notes.
pub const EXAMPLES: &str = "\
Examples:
  # 64 samples from seed 0 as one grid PNG in samples/, on the CPU
  sagan-infer --model model.onnx

  # on the GPU (needs the GPU runtime: tools/install-onnxruntime.sh gpu)
  sagan-infer --model model.onnx --provider cuda

  # try the GPU, run on the CPU with a warning if it cannot be used
  sagan-infer --provider cuda --fallback cpu

  # check the GPU's numbers: max |difference| against the CPU provider on the same latents
  sagan-infer --provider cuda --compare-cpu --count 16

  # TensorRT, fp16, engines cached across runs, tuned for batches of 1 to 64
  sagan-infer --provider tensorrt --trt-fp16 --trt-cache .trt-cache --trt-batch 1,64,64

  # 16 sharper but less varied samples, each also as its own PNG
  sagan-infer --count 16 --truncation 0.7 --png-each --out out/

  # walk through the latents of seeds 5, 6, 7, 8 in 10 steps per segment (one grid row each)
  sagan-infer --seed 5 --count 4 --interpolate 10

  # latency and throughput, batches of 32, 4 threads
  sagan-infer --bench --batch 32 --threads 4

  # a class-conditional model (e.g. sagan-cond-mnist32): one class per grid row by default;
  # 10 rows of 8 for the ten digits, or every image a 7
  sagan-infer --model digits.onnx --count 80 --columns 8
  sagan-infer --model digits.onnx --class 7

  # a generator from elsewhere: one float input [batch, z], one [batch, C, H, W] output
  sagan-infer --model other.onnx --z-dim 128

Latents are the same as sagan-train's sample grids: `--seed S` reproduces the grid of the
training run with seed S. Attention overlays are written when the model was exported with
--attention-maps. ONNX Runtime is looked for in: --ort-lib, $ORT_DYLIB_PATH,
./.onnxruntime/{cpu,gpu}/lib, the repository's .onnxruntime (for `cargo run`), then the system.
The GPU providers' CUDA, cuDNN and TensorRT libraries are loaded from --cuda-libs, the GPU
install, a Python environment's NVIDIA wheels, then the system (docs/gpu.md).";

/// Warm-up runs before a benchmark's timed runs (first runs allocate, and TensorRT builds its
/// engine).
const WARMUP: usize = 3;

/// What the user asked for: sagan-infer's flags, `None` where not given.
#[derive(Clone, Debug)]
pub struct Request {
    pub model: PathBuf,
    pub ort: ProviderArgs,
    pub tensorrt: TensorRtArgs,
    pub z_dim: Option<usize>,
    /// Images, or with `interpolate` keyframe seeds.
    pub count: Option<usize>,
    pub columns: Option<usize>,
    /// The classes rows take in turn (conditional models); empty: row r gets class r.
    pub classes: Vec<i64>,
    pub batch: Option<usize>,
    pub seed: u64,
    pub truncation: Option<f32>,
    /// Images per interpolation segment.
    pub interpolate: Option<usize>,
    pub interp_mode: Interpolation,
    pub out: PathBuf,
    pub grid: bool,
    pub png_each: bool,
    pub attention: bool,
    /// Time `bench_runs` runs of one batch instead of writing.
    pub bench: bool,
    pub bench_runs: usize,
    pub compare_cpu: bool,
    pub threads: Option<usize>,
    /// When the process started: the first PNG's time is reported from it.
    pub started: Instant,
}

/// Samples, writes or times as `request` asks.
pub fn run(request: &Request) -> InferResult<()> {
    let plan = plan(request)?;
    let batch = request.batch.unwrap_or(plan.images().min(64));
    if batch == 0 {
        return invalid("--batch must be at least 1");
    }
    if request.threads == Some(0) {
        return invalid("--threads must be at least 1");
    }
    if let Some(t) = request.truncation {
        check_truncation(t)?;
    }
    if request.bench && request.compare_cpu {
        return invalid("--compare-cpu does not apply to --bench");
    }
    if !request.bench {
        if !request.grid && !request.png_each {
            return invalid("--no-grid without --png-each would write nothing");
        }
        prepare_out_dir(&request.out)?;
    }
    let tensorrt = request.tensorrt.options(request.ort.provider, batch)?;
    let options = request
        .ort
        .load_options(tensorrt, request.threads, request.z_dim);
    let runtime = Runtime::init(&request.ort.library_search())?;
    let mut generator = Generator::load(runtime, &request.model, &options)?;
    eprintln!("{}", describe(&generator, runtime));

    let num_classes = generator.num_classes();
    check_classes(&request.classes, num_classes).map_err(|msg| InferError::Model {
        path: request.model.clone(),
        msg,
    })?;
    let classes_of = |start: usize, m: usize| -> Option<Vec<i64>> {
        (num_classes > 0).then(|| {
            (start..start + m)
                .map(|i| plan.class_of(i, &request.classes, num_classes))
                .collect()
        })
    };
    let mut latents = Latents::new(plan, request.seed, generator.z_dim(), request.truncation)?;
    if request.bench {
        let z = latents.take(batch)?;
        return bench(
            &mut generator,
            &z,
            classes_of(0, batch).as_deref(),
            batch,
            request,
        );
    }

    let mut writer = SampleWriter::new(
        Outputs {
            dir: request.out.clone(),
            stem: plan.stem(request.seed),
            columns: plan.columns(),
            grid: request.grid,
            png_each: request.png_each,
            attention: request.attention,
        },
        request.started,
    );
    let n = plan.images();
    let mut cpu = match request.compare_cpu {
        true => {
            let cpu_options = LoadOptions {
                provider: Provider::Cpu,
                fallback_cpu: false,
                ..options
            };
            Some(Generator::load(runtime, &request.model, &cpu_options)?)
        }
        false => None,
    };
    let mut max_diff = 0f32;
    for first in (0..n).step_by(batch) {
        let m = batch.min(n - first);
        let z = latents.take(m)?;
        let classes = classes_of(first, m);
        let images = generator.generate(&z, classes.as_deref(), m)?;
        if let Some(cpu) = &mut cpu {
            let reference = cpu.generate(&z, classes.as_deref(), m)?;
            let Some(diff) = images.max_abs_diff(&reference) else {
                return Err(InferError::Model {
                    path: request.model.clone(),
                    msg: "the CPU provider's images have another shape".into(),
                });
            };
            max_diff = max_diff.max(diff);
        }
        writer.push(images)?;
    }
    if cpu.is_some() {
        println!(
            "max |diff| against the CPU provider: {max_diff:.3e} ({n} images on {})",
            generator.provider()
        );
    }
    let written = writer.finish()?;
    for line in &written.lines {
        println!("{line}");
    }
    if let Some(t) = written.first_png {
        eprintln!(
            "first PNG written {:.1} ms after start",
            t.as_secs_f64() * 1e3
        );
    }
    Ok(())
}

fn invalid<T>(msg: &str) -> InferResult<T> {
    Err(InferError::Invalid(msg.into()))
}

/// Which images to draw, in grid order.
fn plan(request: &Request) -> InferResult<Plan> {
    let Some(steps) = request.interpolate else {
        let count = request.count.unwrap_or(64);
        if count == 0 {
            return invalid("--count must be at least 1");
        }
        let columns = request
            .columns
            .unwrap_or((count as f64).sqrt().ceil() as usize);
        if columns == 0 {
            return invalid("--columns must be at least 1");
        }
        return Ok(Plan::Samples { count, columns });
    };
    if steps < 2 {
        return Err(InferError::Invalid(format!(
            "--interpolate needs at least 2 steps (both ends), got {steps}"
        )));
    }
    if request.columns.is_some() {
        return invalid("--columns does not apply to --interpolate (one row per segment)");
    }
    let keyframes = request.count.unwrap_or(8);
    if keyframes < 2 {
        return Err(InferError::Invalid(format!(
            "--interpolate needs --count >= 2 keyframe seeds, got {keyframes}"
        )));
    }
    Ok(Plan::Interpolation {
        keyframes,
        steps,
        mode: request.interp_mode,
    })
}

/// The --class values must exist in a model with `num_classes` classes (and only a conditional
/// model takes them).
fn check_classes(classes: &[i64], num_classes: usize) -> Result<(), String> {
    if num_classes == 0 && !classes.is_empty() {
        return Err("the model is unconditional: --class does not apply".into());
    }
    match classes
        .iter()
        .find(|&&c| c < 0 || c as usize >= num_classes)
    {
        Some(bad) => Err(format!(
            "--class {bad} is out of range: the model has {num_classes} classes (0..{num_classes})"
        )),
        None => Ok(()),
    }
}

/// One line on what was loaded: the model, where it came from, its shapes, the provider and
/// the runtime.
fn describe(g: &Generator, runtime: &Runtime) -> String {
    let meta = g.metadata();
    let origin = match (&meta.preset, meta.step) {
        (Some(preset), Some(step)) => format!("sagan export '{preset}' at step {step}"),
        (Some(preset), None) => format!("sagan export '{preset}'"),
        _ if meta.is_sagan_export() => "sagan export".to_string(),
        _ => "plain generator".to_string(),
    };
    let (h, w) = g.size();
    let attention = match g.attention_grids() {
        [] => String::new(),
        grids => {
            let maps: Vec<String> = grids
                .iter()
                .map(|g| match (g.queries, g.keys) {
                    ((qh, qw), keys) if keys == (qh, qw) => format!("{qh}x{qw}"),
                    ((qh, qw), (kh, kw)) => format!("{qh}x{qw} (keys {kh}x{kw})"),
                })
                .collect();
            format!(", attention maps {}", maps.join(" "))
        }
    };
    let classes = match g.num_classes() {
        0 => String::new(),
        k => format!(", {k} classes"),
    };
    format!(
        "{}: {origin}, z {}{classes}, image {}x{h}x{w}{attention}; provider {}; ONNX Runtime {}",
        g.path().display(),
        g.z_dim(),
        g.channels(),
        g.provider(),
        runtime.library().display()
    )
}

/// Warm-up runs, then timed runs of one batch; prints the latency percentiles and images/s.
fn bench(
    generator: &mut Generator,
    z: &[f32],
    classes: Option<&[i64]>,
    batch: usize,
    request: &Request,
) -> InferResult<()> {
    if request.bench_runs == 0 {
        return invalid("--bench-runs must be at least 1");
    }
    for _ in 0..WARMUP {
        generator
            .generate(z, classes, batch)
            .map_err(|e| InferError::During {
                doing: "warm-up run",
                error: Box::new(e),
            })?;
    }
    let mut samples = Vec::with_capacity(request.bench_runs);
    for _ in 0..request.bench_runs {
        let t = Instant::now();
        generator.generate(z, classes, batch)?;
        samples.push(t.elapsed());
    }
    let Some(s) = LatencySummary::new(&samples, batch) else {
        return invalid("no timed runs");
    };
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let threads = request
        .threads
        .map_or("default".to_string(), |t| t.to_string());
    println!(
        "bench: {} on {}, {WARMUP} warm-up runs, threads {threads}",
        generator.path().display(),
        generator.provider()
    );
    println!(
        "{:>6} {:>6} {:>9} {:>9} {:>9} {:>11}",
        "batch", "runs", "p50 ms", "p90 ms", "p99 ms", "images/s"
    );
    println!(
        "{:>6} {:>6} {:>9.3} {:>9.3} {:>9.3} {:>11.1}",
        s.batch,
        s.runs,
        ms(s.p50),
        ms(s.p90),
        ms(s.p99),
        s.images_per_s
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Flags {
        #[command(flatten)]
        ort: ProviderArgs,
    }

    fn request() -> Request {
        Request {
            model: "model.onnx".into(),
            ort: Flags::parse_from(["test"]).ort,
            tensorrt: TensorRtArgs::default(),
            z_dim: None,
            count: None,
            columns: None,
            classes: Vec::new(),
            batch: None,
            seed: 0,
            truncation: None,
            interpolate: None,
            interp_mode: Interpolation::Spherical,
            out: "samples".into(),
            grid: true,
            png_each: false,
            attention: true,
            bench: false,
            bench_runs: 50,
            compare_cpu: false,
            threads: None,
            started: Instant::now(),
        }
    }

    #[test]
    fn plans_default_to_a_square_grid_of_64_or_8_keyframes() {
        let samples = plan(&request()).unwrap();
        assert_eq!(
            samples,
            Plan::Samples {
                count: 64,
                columns: 8
            }
        );
        let ten = plan(&Request {
            count: Some(10),
            ..request()
        })
        .unwrap();
        assert_eq!(ten.columns(), 4);
        let walk = plan(&Request {
            interpolate: Some(5),
            ..request()
        })
        .unwrap();
        assert_eq!((walk.images(), walk.columns()), (35, 5));
    }

    #[test]
    fn plans_refuse_what_draws_nothing_or_contradicts() {
        let cases = [
            (
                Request {
                    count: Some(0),
                    ..request()
                },
                "--count must be at least 1",
            ),
            (
                Request {
                    columns: Some(0),
                    ..request()
                },
                "--columns must be at least 1",
            ),
            (
                Request {
                    interpolate: Some(1),
                    ..request()
                },
                "at least 2 steps",
            ),
            (
                Request {
                    interpolate: Some(3),
                    columns: Some(2),
                    ..request()
                },
                "--columns does not apply",
            ),
            (
                Request {
                    interpolate: Some(3),
                    count: Some(1),
                    ..request()
                },
                "--count >= 2 keyframe seeds, got 1",
            ),
        ];
        for (r, needle) in cases {
            let err = plan(&r).unwrap_err().to_string();
            assert!(err.contains(needle), "{err}");
        }
    }

    #[test]
    fn classes_must_exist_in_the_model() {
        assert_eq!(check_classes(&[], 0), Ok(()));
        assert_eq!(check_classes(&[0, 9], 10), Ok(()));
        assert!(check_classes(&[1], 0)
            .unwrap_err()
            .contains("unconditional"));
        for bad in [10, -1] {
            let err = check_classes(&[3, bad], 10).unwrap_err();
            assert!(
                err.contains(&format!("--class {bad} is out of range")),
                "{err}"
            );
        }
    }
}
