//! sagan-infer: samples from a generator exported by sagan-export, on ONNX Runtime. No candle:
//! the binary only needs `libonnxruntime` (see `tools/install-onnxruntime.sh`).

use anyhow::{bail, Context, Result};
use clap::{Parser, ValueEnum};
use sagan::infer::bench::LatencySummary;
use sagan::infer::cli::{ProviderArg, ProviderArgs};
use sagan::infer::latent::check_truncation;
use sagan::infer::sampling::{prepare_out_dir, Latents, Outputs, Plan, SampleWriter};
use sagan::infer::{Generator, Interpolation, LoadOptions, Provider, Runtime, TensorRtOptions};
use std::path::PathBuf;
use std::time::{Duration, Instant};

const EXAMPLES: &str = "\
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

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum InterpArg {
    /// Great-circle interpolation: keeps latent norms typical (the usual choice).
    Slerp,
    /// Straight line between latents.
    Lerp,
}

/// Samples images from a SAGAN generator exported to ONNX by sagan-export.
#[derive(Debug, Parser)]
#[command(name = "sagan-infer", version, after_help = EXAMPLES)]
struct Args {
    /// The ONNX generator.
    #[arg(long, default_value = "model.onnx", value_name = "PATH")]
    model: PathBuf,

    #[command(flatten)]
    ort: ProviderArgs,

    /// TensorRT: keep built engines and timing caches in DIR (first run builds, later runs load).
    #[arg(long, value_name = "DIR")]
    trt_cache: Option<PathBuf>,

    /// TensorRT: allow fp16 kernels.
    #[arg(long)]
    trt_fp16: bool,

    /// TensorRT: batch sizes of the optimisation profile [default: 1,BATCH,BATCH].
    #[arg(long, value_name = "MIN,OPT,MAX", value_parser = parse_batch_profile)]
    trt_batch: Option<[usize; 3]>,

    /// The z size, for a generator whose file does not say (no sagan metadata, symbolic shape).
    #[arg(long, value_name = "N")]
    z_dim: Option<usize>,

    /// Number of images [default: 64]; with --interpolate, the number of keyframe seeds
    /// [default: 8].
    #[arg(long, value_name = "N")]
    count: Option<usize>,

    /// Images per grid row [default: the square root of the count; with --interpolate, the steps].
    #[arg(long, value_name = "N")]
    columns: Option<usize>,

    /// Class-conditional models: the class of every image, or a comma-separated list taken
    /// row by row (row r gets the (r mod len)-th) [default: row r gets class r].
    #[arg(
        long,
        value_name = "K[,K...]",
        value_delimiter = ',',
        allow_negative_numbers = true
    )]
    class: Vec<i64>,

    /// Images per run of the model [default: min(count, 64)].
    #[arg(long, value_name = "N")]
    batch: Option<usize>,

    /// Latent seed: the same seed gives the same images (and sagan-train's grid for that seed).
    #[arg(long, default_value_t = 0, value_name = "S")]
    seed: u64,

    /// Truncation trick: redraw every latent value with |z| > T (T > 0; smaller is sharper and
    /// less varied).
    #[arg(long, value_name = "T", allow_negative_numbers = true)]
    truncation: Option<f32>,

    /// Interpolate between the latents of seeds S, S+1, ..., S+count-1: N images per segment
    /// (both ends included), one grid row per segment.
    #[arg(long, value_name = "N")]
    interpolate: Option<usize>,

    /// How --interpolate moves between latents.
    #[arg(long, value_enum, default_value_t = InterpArg::Slerp)]
    interp_mode: InterpArg,

    /// Output folder.
    #[arg(long, default_value = "samples", value_name = "DIR")]
    out: PathBuf,

    /// Write one grid PNG of all images (the default).
    #[arg(long, overrides_with = "no_grid")]
    grid: bool,

    /// Do not write the grid PNG.
    #[arg(long, overrides_with = "grid")]
    no_grid: bool,

    /// Also write every image as its own PNG, at the model's resolution.
    #[arg(long)]
    png_each: bool,

    /// Do not write attention overlays even if the model has attention outputs.
    #[arg(long)]
    no_attention: bool,

    /// Measure instead of writing: warm-up runs, then latency percentiles and images/s.
    #[arg(long)]
    bench: bool,

    /// Also run the same latents on the CPU provider and print the largest |difference| between
    /// the two sets of images (checks a GPU provider's numbers).
    #[arg(long)]
    compare_cpu: bool,

    /// Timed runs for --bench.
    #[arg(long, default_value_t = 50, value_name = "N")]
    bench_runs: usize,

    /// Intra-op threads [default: ONNX Runtime's, one per core].
    #[arg(long, value_name = "N")]
    threads: Option<usize>,
}

fn parse_batch_profile(s: &str) -> std::result::Result<[usize; 3], String> {
    let parts: Vec<usize> = s
        .split(',')
        .map(|p| p.trim().parse::<usize>())
        .collect::<std::result::Result<_, _>>()
        .map_err(|_| format!("'{s}' is not MIN,OPT,MAX (three positive integers)"))?;
    match parts[..] {
        [min, opt, max] if min >= 1 && min <= opt && opt <= max => Ok([min, opt, max]),
        _ => Err(format!(
            "'{s}' is not MIN,OPT,MAX with 1 <= MIN <= OPT <= MAX"
        )),
    }
}

/// Images to draw, in grid order.
fn main() {
    let start = Instant::now();
    let args = Args::parse();
    sagan::logging::init("warn", false);
    if let Err(e) = run(&args, start) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run(args: &Args, start: Instant) -> Result<()> {
    let plan = plan(args)?;
    let batch = args.batch.unwrap_or(plan.images().min(64));
    if batch == 0 {
        bail!("--batch must be at least 1");
    }
    if args.threads == Some(0) {
        bail!("--threads must be at least 1");
    }
    if let Some(t) = args.truncation {
        check_truncation(t)?;
    }
    let grid = !args.no_grid;
    if args.bench && args.compare_cpu {
        bail!("--compare-cpu does not apply to --bench");
    }
    if !args.bench {
        if !grid && !args.png_each {
            bail!("--no-grid without --png-each would write nothing");
        }
        prepare_out_dir(&args.out)?;
    }
    let provider = provider(args, batch)?;

    let search = args.ort.library_search();
    let runtime = Runtime::init(&search)?;
    let options = LoadOptions {
        provider,
        fallback_cpu: args.ort.fallback_cpu(),
        threads: args.threads,
        z_dim: args.z_dim,
    };
    let mut generator = Generator::load(runtime, &args.model, &options)?;
    eprintln!("{}", describe(&generator, runtime));

    let num_classes = generator.num_classes();
    check_classes(args, num_classes).with_context(|| args.model.display().to_string())?;
    let classes_of = |start: usize, m: usize| -> Option<Vec<i64>> {
        (num_classes > 0).then(|| {
            (start..start + m)
                .map(|i| plan.class_of(i, &args.class, num_classes))
                .collect()
        })
    };
    let mut latents = Latents::new(plan, args.seed, generator.z_dim(), args.truncation)?;
    if args.bench {
        let z = latents.take(batch)?;
        return bench(
            &mut generator,
            &z,
            classes_of(0, batch).as_deref(),
            batch,
            args,
        );
    }

    let mut writer = SampleWriter::new(
        Outputs {
            dir: args.out.clone(),
            stem: plan.stem(args.seed),
            columns: plan.columns(),
            grid,
            png_each: args.png_each,
            attention: !args.no_attention,
        },
        start,
    );
    let n = plan.images();
    let mut cpu = match args.compare_cpu {
        true => {
            let cpu_options = LoadOptions {
                provider: Provider::Cpu,
                fallback_cpu: false,
                ..options
            };
            Some(Generator::load(runtime, &args.model, &cpu_options)?)
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
                bail!(
                    "{}: the CPU provider's images have another shape",
                    args.model.display()
                );
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

fn plan(args: &Args) -> Result<Plan> {
    match args.interpolate {
        None => {
            let count = args.count.unwrap_or(64);
            if count == 0 {
                bail!("--count must be at least 1");
            }
            let columns = args
                .columns
                .unwrap_or((count as f64).sqrt().ceil() as usize);
            if columns == 0 {
                bail!("--columns must be at least 1");
            }
            Ok(Plan::Samples { count, columns })
        }
        Some(steps) => {
            if steps < 2 {
                bail!("--interpolate needs at least 2 steps (both ends), got {steps}");
            }
            if args.columns.is_some() {
                bail!("--columns does not apply to --interpolate (one row per segment)");
            }
            let keyframes = args.count.unwrap_or(8);
            if keyframes < 2 {
                bail!("--interpolate needs --count >= 2 keyframe seeds, got {keyframes}");
            }
            let mode = match args.interp_mode {
                InterpArg::Slerp => Interpolation::Spherical,
                InterpArg::Lerp => Interpolation::Linear,
            };
            Ok(Plan::Interpolation {
                keyframes,
                steps,
                mode,
            })
        }
    }
}

/// The class of every image of the plan for a model with `num_classes` classes (None for an
/// unconditional one): --class row by row, else row r gets class r.
/// The --class values must exist in the model (and only a conditional model takes them).
fn check_classes(args: &Args, num_classes: usize) -> Result<()> {
    if num_classes == 0 && !args.class.is_empty() {
        bail!("the model is unconditional: --class does not apply");
    }
    if let Some(bad) = args
        .class
        .iter()
        .find(|&&c| c < 0 || c as usize >= num_classes)
    {
        bail!(
            "--class {bad} is out of range: the model has {num_classes} classes (0..{num_classes})"
        );
    }
    Ok(())
}

fn provider(args: &Args, batch: usize) -> Result<Provider> {
    let trt_flags = args.trt_cache.is_some() || args.trt_fp16 || args.trt_batch.is_some();
    if trt_flags && args.ort.provider != ProviderArg::Tensorrt {
        bail!("--trt-cache, --trt-fp16 and --trt-batch need --provider tensorrt");
    }
    Ok(args.ort.provider(TensorRtOptions {
        cache_dir: args.trt_cache.clone(),
        fp16: args.trt_fp16,
        batch_profile: Some(args.trt_batch.unwrap_or([1, batch, batch])),
        ..Default::default()
    }))
}

/// Creates the output folder and proves it writable before any model work is done.
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

/// Warm-up (first runs allocate, and TensorRT builds its engine), then timed runs of one batch.
fn bench(
    generator: &mut Generator,
    z: &[f32],
    classes: Option<&[i64]>,
    batch: usize,
    args: &Args,
) -> Result<()> {
    const WARMUP: usize = 3;
    if args.bench_runs == 0 {
        bail!("--bench-runs must be at least 1");
    }
    for _ in 0..WARMUP {
        generator
            .generate(z, classes, batch)
            .context("warm-up run")?;
    }
    let mut samples = Vec::with_capacity(args.bench_runs);
    for _ in 0..args.bench_runs {
        let t = Instant::now();
        generator.generate(z, classes, batch)?;
        samples.push(t.elapsed());
    }
    let Some(s) = LatencySummary::new(&samples, batch) else {
        bail!("no timed runs");
    };
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let threads = args
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
