//! sagan-infer: samples from a generator exported by sagan-export, on ONNX Runtime. No candle:
//! the binary only needs `libonnxruntime` (see `tools/install-onnxruntime.sh`).

use clap::{Parser, ValueEnum};
use sagan::infer::cli::{ProviderArgs, TensorRtArgs};
use sagan::infer::session::{self, Request, EXAMPLES};
use sagan::infer::Interpolation;
use std::path::PathBuf;
use std::time::Instant;

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

    #[command(flatten)]
    tensorrt: TensorRtArgs,

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

impl Args {
    fn request(self, started: Instant) -> Request {
        Request {
            model: self.model,
            ort: self.ort,
            tensorrt: self.tensorrt,
            z_dim: self.z_dim,
            count: self.count,
            columns: self.columns,
            classes: self.class,
            batch: self.batch,
            seed: self.seed,
            truncation: self.truncation,
            interpolate: self.interpolate,
            interp_mode: match self.interp_mode {
                InterpArg::Slerp => Interpolation::Spherical,
                InterpArg::Lerp => Interpolation::Linear,
            },
            out: self.out,
            grid: !self.no_grid,
            png_each: self.png_each,
            attention: !self.no_attention,
            bench: self.bench,
            bench_runs: self.bench_runs,
            compare_cpu: self.compare_cpu,
            threads: self.threads,
            started,
        }
    }
}

fn main() {
    let started = Instant::now();
    let request = Args::parse().request(started);
    sagan::logging::init("warn", false);
    if let Err(e) = session::run(&request) {
        eprintln!("error: {:#}", anyhow::Error::from(e));
        std::process::exit(1);
    }
}
