//! sagan-eval: how good are a generator's samples? FID against real images and the
//! Inception-style score, with a feature network run on ONNX Runtime.

use anyhow::{bail, Context, Result};
use clap::{Parser, ValueEnum};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use sagan::data::{DataSource, Dataset};
use sagan::eval::cache::{self, CacheKey};
use sagan::eval::features::fingerprint_from;
use sagan::eval::nearest::{nearest_grid, NearestOptions};
use sagan::eval::{
    builtin_feature_net, evaluate, summarise, EvalOptions, EvalReport, FeatureNet,
    FeatureNetOptions, FeatureSummary, Resize,
};
use sagan::infer::cli::ProviderArgs;
use sagan::infer::{Generator, LoadOptions, Runtime, TensorRtOptions};
use std::path::{Path, PathBuf};

/// The real images are a fixed random subset, whatever --seed says, so that their cached
/// statistics serve every evaluation.
const REAL_SUBSET_SEED: u64 = 0x5a6a_e7a1;

const EXAMPLES: &str = "\
Examples:
  # FID and IS of an MNIST generator against the built-in MNIST training set (built-in classifier)
  sagan-eval --model model.onnx --data builtin

  # against the full MNIST training set, 10000 samples in batches of 200, on the GPU
  sagan-eval --model model.onnx --data data/mnist --batch 200 --provider cuda

  # RGB 64x64 data need a feature network, e.g. an exported Inception-v3
  sagan-eval --model model.onnx --data images/ --feature-net inception-v3.onnx

  # the floor: FID between two disjoint halves of the real data, machine-readable
  sagan-eval --baseline --data builtin --count 3000 --json baseline.json

Real images are converted to the generator's shape, then both are converted to the feature
network's (resized, grey <-> RGB). The real statistics are cached in --cache-dir, keyed by the
images and the network. See the sagan::eval docs for exporting Inception-v3 to ONNX; FIDs are
only comparable when computed with the same network and the same --count.";

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

fn main() {
    let args = Args::parse();
    sagan::logging::init("warn", false);
    if let Err(e) = run(&args) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

/// Everything --json writes.
#[derive(serde::Serialize)]
struct JsonReport<'a> {
    model: Option<&'a Path>,
    data: String,
    feature_net: String,
    seed: u64,
    splits: usize,
    #[serde(flatten)]
    report: &'a EvalReport,
}

fn run(args: &Args) -> Result<()> {
    if args.count < 2 {
        bail!("--count must be at least 2 (FID needs a covariance)");
    }
    if args.batch == 0 {
        bail!("--batch must be at least 1");
    }
    if args.splits == 0 || args.splits > args.count {
        bail!("--splits must be between 1 and --count ({})", args.count);
    }
    if args.threads == Some(0) {
        bail!("--threads must be at least 1");
    }
    let provider = args.ort.provider(TensorRtOptions {
        batch_profile: Some([1, args.batch, args.batch]),
        ..Default::default()
    });
    let search = args.ort.library_search();
    let runtime = Runtime::init(&search)?;

    let mut generator = match &args.model {
        Some(path) => {
            let options = LoadOptions {
                provider: provider.clone(),
                fallback_cpu: args.ort.fallback_cpu(),
                threads: args.threads,
                z_dim: args.z_dim,
            };
            Some(Generator::load(runtime, path, &options)?)
        }
        None => None,
    };
    let net_options = FeatureNetOptions {
        provider,
        fallback_cpu: args.ort.fallback_cpu(),
        threads: args.threads,
        features_output: args.features_output.clone(),
        logits_output: args.logits_output.clone(),
        resize: match args.resize {
            ResizeArg::Bilinear => Resize::Bilinear,
            ResizeArg::Nearest => Resize::Nearest,
        },
    };
    let generator_shape = generator.as_ref().map(|g| {
        let (h, w) = g.size();
        [g.channels(), h, w]
    });
    let mut net = match &args.feature_net {
        Some(path) => FeatureNet::load(runtime, path, &net_options)?,
        None => builtin_feature_net(runtime, generator_shape, &net_options)?,
    };

    // The shape real images are loaded at: the generator's, or for --baseline the network's.
    let [c, h, w] = match generator_shape {
        Some(shape) => shape,
        None => match net.declared_input_shape() {
            [Some(c), Some(h), Some(w)] => [c, h, w],
            _ => bail!(
                "--baseline needs a feature network with a fixed input shape; {} leaves it open",
                net.name().display()
            ),
        },
    };
    if h != w {
        bail!("images are {h}x{w}; sagan's data loader only makes square images");
    }
    let source = match args.data.as_str() {
        "builtin" => DataSource::Builtin,
        path => DataSource::Path(PathBuf::from(path)),
    };
    let data = Dataset::load(&source, c, h)?;
    if data.len() < 2 {
        bail!("{}: at least 2 images are needed", data.describe());
    }
    let mut order: Vec<usize> = (0..data.len()).collect();
    order.shuffle(&mut ChaCha8Rng::seed_from_u64(REAL_SUBSET_SEED));

    let options = EvalOptions {
        count: args.count,
        batch: args.batch,
        seed: args.seed,
        splits: args.splits,
    };
    if let (Some(path), Some(generator)) = (&args.nearest, &mut generator) {
        let options = NearestOptions {
            samples: args.nearest_samples,
            k: args.nearest_k,
            batch: args.batch,
            seed: args.seed,
        };
        let fill = |range: std::ops::Range<usize>, out: &mut Vec<f32>| {
            data.fill_batch(&range.collect::<Vec<_>>(), out);
            Ok(())
        };
        let (grid, _) = nearest_grid(generator, &mut net, data.len(), fill, &options)?;
        sagan::image_io::save_png(path, &grid)?;
        println!(
            "nearest: {} ({} samples, each followed by its {} nearest of {} images of --data)",
            path.display(),
            options.samples,
            options.k,
            data.len()
        );
    }
    let report = match &mut generator {
        Some(generator) => {
            let real_count = args.count.min(data.len());
            let real = real_statistics(args, &mut net, &data, &order[..real_count], [c, h, w])?;
            evaluate(generator, &mut net, &real, &options)?
        }
        None => {
            if 2 * args.count > data.len() {
                bail!(
                    "--baseline compares two halves of --count images each, but {} holds {}: use --count {} or less",
                    data.describe(),
                    data.len(),
                    data.len() / 2
                );
            }
            let real = real_statistics(args, &mut net, &data, &order[..args.count], [c, h, w])?;
            let other = real_summary(
                &mut net,
                &data,
                &order[args.count..2 * args.count],
                args.batch,
                [c, h, w],
            )?;
            EvalReport::new(&real, &other, args.splits)?
        }
    };

    let net_name = match net.kind() {
        Some(kind) => format!("{} ({kind})", net.name().display()),
        None => net.name().display().to_string(),
    };
    let what = match &args.model {
        Some(model) => format!(
            "{}: {} generated images (seed {})",
            model.display(),
            report.n,
            args.seed
        ),
        None => format!("baseline: {} real images", report.n),
    };
    println!(
        "{what} vs {} real images of {}",
        report.n_real,
        data.describe()
    );
    println!("feature network: {net_name}, on {}", net.provider());
    println!("FID: {:.4}", report.fid);
    match (report.is_mean, report.is_std) {
        (Some(mean), Some(std)) => println!("IS: {mean:.4} +- {std:.4} ({} splits)", args.splits),
        _ => println!("IS: n/a (the feature network has no logits)"),
    }
    if let Some(accuracy) = report.class_accuracy {
        println!(
            "class accuracy: {:.2}% (images the feature network assigns to the class they were generated for)",
            100.0 * accuracy
        );
    }
    if let Some(path) = &args.json {
        let json = JsonReport {
            model: args.model.as_deref(),
            data: data.describe(),
            feature_net: net_name,
            seed: args.seed,
            splits: args.splits,
            report: &report,
        };
        let text = serde_json::to_string_pretty(&json).context("encoding the JSON report")?;
        sagan::fsutil::write_atomic(path, text.as_bytes())?;
    }
    Ok(())
}

/// Features of the dataset images at `indices`.
fn real_summary(
    net: &mut FeatureNet,
    data: &Dataset,
    indices: &[usize],
    batch: usize,
    shape: [usize; 3],
) -> Result<FeatureSummary> {
    Ok(summarise(
        net,
        indices.len(),
        batch,
        shape,
        |range, out| {
            data.fill_batch(&indices[range], out);
            Ok(())
        },
    )?)
}

/// The statistics of the dataset images at `indices`, from the cache when it has them.
fn real_statistics(
    args: &Args,
    net: &mut FeatureNet,
    data: &Dataset,
    indices: &[usize],
    shape: [usize; 3],
) -> Result<sagan::eval::Statistics> {
    let content = indices
        .iter()
        .fold(sagan::eval::features::fingerprint(b""), |h, &i| {
            fingerprint_from(h, data.image(i))
        });
    let key = CacheKey::new(
        net,
        &data.describe(),
        content,
        indices.len(),
        net.input_shape_for(shape),
    );
    if !args.no_cache {
        if let Some(stats) = cache::load(&args.cache_dir, &key) {
            tracing::info!(
                "real statistics from the cache in {}",
                args.cache_dir.display()
            );
            return Ok(stats);
        }
    }
    let stats = real_summary(net, data, indices, args.batch, shape)?.stats;
    if !args.no_cache {
        match cache::save(&args.cache_dir, &key, &stats) {
            Ok(path) => tracing::info!("cached the real statistics in {}", path.display()),
            Err(e) => tracing::warn!("could not cache the real statistics: {e}"),
        }
    }
    Ok(stats)
}
