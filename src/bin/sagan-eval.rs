//! sagan-eval: how good are a generator's samples? FID against real images and the
//! Inception-style score, with a feature network run on ONNX Runtime.

use clap::{Parser, ValueEnum};
use sagan::data::DataSource;
use sagan::eval::session::{self, Request, EXAMPLES};
use sagan::eval::Resize;
use sagan::infer::cli::ProviderArgs;
use std::path::PathBuf;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum ResizeArg {
    Bilinear,
    Nearest,
}

/// Evaluates a generator exported to ONNX: FID against real images and Inception score.
#[derive(Debug, Parser)]
#[command(name = "sagan-eval", version, after_help = EXAMPLES)]
struct Args {
    /// The ONNX generator.
    #[arg(long, value_name = "PATH", required_unless_present = "baseline")]
    model: Option<PathBuf>,

    /// Compare two disjoint halves of the real data instead of a generator: the FID a perfect
    /// generator would get with this --count.
    #[arg(long, conflicts_with = "model")]
    baseline: bool,

    /// The real images: MNIST IDX files (a file or a folder), a folder of pictures, or
    /// `builtin` for the MNIST training set built into sagan.
    #[arg(long, value_name = "DIR|builtin")]
    data: String,

    /// The feature network (ONNX) [default: the built-in MNIST classifier, for greyscale digits].
    #[arg(long, value_name = "PATH")]
    feature_net: Option<PathBuf>,

    /// The feature network's output to compute the FID on [default: features].
    #[arg(long, value_name = "NAME")]
    features_output: Option<String>,

    /// The feature network's class logits, for the Inception score [default: logits, if any].
    #[arg(long, value_name = "NAME")]
    logits_output: Option<String>,

    /// How images are resized to the feature network's input.
    #[arg(long, value_enum, default_value_t = ResizeArg::Bilinear)]
    resize: ResizeArg,

    /// Generated images (and at most as many real ones).
    #[arg(long, default_value_t = 10_000, value_name = "N")]
    count: usize,

    /// Images per run of the generator and the feature network.
    #[arg(long, default_value_t = 100, value_name = "N")]
    batch: usize,

    /// Latent seed of the generated images (the same latents as sagan-infer --seed).
    #[arg(long, default_value_t = 0, value_name = "S")]
    seed: u64,

    /// Parts the Inception score is averaged over.
    #[arg(long, default_value_t = 10, value_name = "N")]
    splits: usize,

    #[command(flatten)]
    ort: ProviderArgs,

    /// Intra-op threads [default: ONNX Runtime's, one per core].
    #[arg(long, value_name = "N")]
    threads: Option<usize>,

    /// The z size, for a generator whose file does not say.
    #[arg(long, value_name = "N")]
    z_dim: Option<usize>,

    /// Where the real images' statistics are cached.
    #[arg(long, default_value = ".sagan-cache", value_name = "DIR")]
    cache_dir: PathBuf,

    /// Neither read nor write cached statistics.
    #[arg(long)]
    no_cache: bool,

    /// Also write the results as JSON to this file.
    #[arg(long, value_name = "PATH")]
    json: Option<PathBuf>,

    /// The memorisation check: also write a PNG whose rows are generated samples (first
    /// column) each followed by its nearest images of --data in the feature network's space.
    /// Near-twins in every row mean the generator copies its training data.
    #[arg(long, value_name = "PNG", requires = "model")]
    nearest: Option<PathBuf>,

    /// Samples (rows) of the --nearest grid.
    #[arg(long, default_value_t = 16, value_name = "N")]
    nearest_samples: usize,

    /// Nearest images per sample in the --nearest grid.
    #[arg(long, default_value_t = 8, value_name = "K")]
    nearest_k: usize,
}

impl Args {
    fn request(self) -> Request {
        Request {
            model: self.model,
            data: match self.data.as_str() {
                "builtin" => DataSource::Builtin,
                path => DataSource::Path(path.into()),
            },
            feature_net: self.feature_net,
            features_output: self.features_output,
            logits_output: self.logits_output,
            resize: match self.resize {
                ResizeArg::Bilinear => Resize::Bilinear,
                ResizeArg::Nearest => Resize::Nearest,
            },
            count: self.count,
            batch: self.batch,
            seed: self.seed,
            splits: self.splits,
            ort: self.ort,
            threads: self.threads,
            z_dim: self.z_dim,
            cache_dir: (!self.no_cache).then_some(self.cache_dir),
            json: self.json,
            nearest: self.nearest,
            nearest_samples: self.nearest_samples,
            nearest_k: self.nearest_k,
        }
    }
}

fn main() {
    let request = Args::parse().request();
    sagan::logging::init("warn", false);
    if let Err(e) = session::run(&request) {
        eprintln!("error: {:#}", anyhow::Error::from(e));
        std::process::exit(1);
    }
}
