//! One sagan-eval invocation: loads the generator, the feature network and the real images,
//! then prints (and with `json` writes) the FID and Inception score of the generator, or for
//! the baseline those of one half of the real images against the other.

use super::cache::{self, CacheKey};
use super::features::{fingerprint, fingerprint_from};
use super::nearest::{nearest_grid, NearestOptions};
use super::{
    builtin_feature_net, evaluate, summarise, EvalOptions, EvalReport, FeatureNet,
    FeatureNetOptions, FeatureSummary, Resize, Statistics,
};
use crate::data::{DataSource, Dataset};
use crate::infer::cli::ProviderArgs;
use crate::infer::{Generator, InferError, InferResult, Runtime, TensorRtOptions};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::path::{Path, PathBuf};

/// sagan-eval's `--help` examples and notes.
pub const EXAMPLES: &str = "\
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

/// The real images are a fixed random subset, whatever the latent seed, so that their cached
/// statistics serve every evaluation.
const REAL_SUBSET_SEED: u64 = 0x5a6a_e7a1;

/// What the user asked for: sagan-eval's flags.
#[derive(Clone, Debug)]
pub struct Request {
    /// The generator; `None` compares two disjoint halves of the real images (the baseline).
    pub model: Option<PathBuf>,
    pub data: DataSource,
    /// The feature network; `None`: the built-in MNIST classifier.
    pub feature_net: Option<PathBuf>,
    pub features_output: Option<String>,
    pub logits_output: Option<String>,
    pub resize: Resize,
    /// Generated images (and at most as many real ones).
    pub count: usize,
    pub batch: usize,
    pub seed: u64,
    pub splits: usize,
    pub ort: ProviderArgs,
    pub threads: Option<usize>,
    pub z_dim: Option<usize>,
    /// Where the real statistics are cached; `None` neither reads nor writes them.
    pub cache_dir: Option<PathBuf>,
    /// Also write the results as JSON here.
    pub json: Option<PathBuf>,
    /// The memorisation check's grid: its PNG, samples (rows) and neighbours per sample.
    pub nearest: Option<PathBuf>,
    pub nearest_samples: usize,
    pub nearest_k: usize,
}

/// Everything the JSON report holds.
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

/// Evaluates as `request` asks and prints the results.
pub fn run(request: &Request) -> InferResult<()> {
    let r = request;
    if r.count < 2 {
        return invalid("--count must be at least 2 (FID needs a covariance)".into());
    }
    if r.batch == 0 {
        return invalid("--batch must be at least 1".into());
    }
    if r.splits == 0 || r.splits > r.count {
        return invalid(format!(
            "--splits must be between 1 and --count ({})",
            r.count
        ));
    }
    if r.threads == Some(0) {
        return invalid("--threads must be at least 1".into());
    }
    let tensorrt = TensorRtOptions {
        batch_profile: Some([1, r.batch, r.batch]),
        ..Default::default()
    };
    let options = r.ort.load_options(tensorrt, r.threads, r.z_dim);
    let runtime = Runtime::init(&r.ort.library_search())?;
    let mut generator = match &r.model {
        Some(path) => Some(Generator::load(runtime, path, &options)?),
        None => None,
    };
    let net_options = FeatureNetOptions {
        provider: options.provider,
        fallback_cpu: options.fallback_cpu,
        threads: r.threads,
        features_output: r.features_output.clone(),
        logits_output: r.logits_output.clone(),
        resize: r.resize,
    };
    let generator_shape = generator.as_ref().map(|g| {
        let (h, w) = g.size();
        [g.channels(), h, w]
    });
    let mut net = match &r.feature_net {
        Some(path) => FeatureNet::load(runtime, path, &net_options)?,
        None => builtin_feature_net(runtime, generator_shape, &net_options)?,
    };

    // The shape real images are loaded at: the generator's, or for the baseline the network's.
    let [c, h, w] = match generator_shape {
        Some(shape) => shape,
        None => match net.declared_input_shape() {
            [Some(c), Some(h), Some(w)] => [c, h, w],
            _ => {
                return invalid(format!(
                "--baseline needs a feature network with a fixed input shape; {} leaves it open",
                net.name().display()
            ))
            }
        },
    };
    if h != w {
        return invalid(format!(
            "images are {h}x{w}; sagan's data loader only makes square images"
        ));
    }
    let data = Dataset::load(&r.data, c, h)?;
    if data.len() < 2 {
        return invalid(format!("{}: at least 2 images are needed", data.describe()));
    }
    let mut order: Vec<usize> = (0..data.len()).collect();
    order.shuffle(&mut ChaCha8Rng::seed_from_u64(REAL_SUBSET_SEED));
    let real = Real {
        data: &data,
        batch: r.batch,
        shape: [c, h, w],
    };

    if let (Some(path), Some(generator)) = (&r.nearest, &mut generator) {
        let options = NearestOptions {
            samples: r.nearest_samples,
            k: r.nearest_k,
            batch: r.batch,
            seed: r.seed,
        };
        let fill = |range: std::ops::Range<usize>, out: &mut Vec<f32>| {
            data.fill_batch(&range.collect::<Vec<_>>(), out);
            Ok(())
        };
        let (grid, _) = nearest_grid(generator, &mut net, data.len(), fill, &options)?;
        crate::image_io::save_png(path, &grid)?;
        println!(
            "nearest: {} ({} samples, each followed by its {} nearest of {} images of --data)",
            path.display(),
            options.samples,
            options.k,
            data.len()
        );
    }
    let cache_dir = r.cache_dir.as_deref();
    let report = match &mut generator {
        Some(generator) => {
            let indices = &order[..r.count.min(data.len())];
            let real_stats = real.statistics(&mut net, indices, cache_dir)?;
            let options = EvalOptions {
                count: r.count,
                batch: r.batch,
                seed: r.seed,
                splits: r.splits,
            };
            evaluate(generator, &mut net, &real_stats, &options)?
        }
        None => {
            if 2 * r.count > data.len() {
                return invalid(format!(
                    "--baseline compares two halves of --count images each, but {} holds {}: use --count {} or less",
                    data.describe(),
                    data.len(),
                    data.len() / 2
                ));
            }
            let real_stats = real.statistics(&mut net, &order[..r.count], cache_dir)?;
            let other = real.summary(&mut net, &order[r.count..2 * r.count])?;
            EvalReport::new(&real_stats, &other, r.splits)?
        }
    };
    print_and_write(r, &report, &net, &data)
}

fn invalid<T>(msg: String) -> InferResult<T> {
    Err(InferError::Invalid(msg))
}

/// Prints the report and writes it as JSON when asked.
fn print_and_write(
    r: &Request,
    report: &EvalReport,
    net: &FeatureNet,
    data: &Dataset,
) -> InferResult<()> {
    let net_name = match net.kind() {
        Some(kind) => format!("{} ({kind})", net.name().display()),
        None => net.name().display().to_string(),
    };
    let what = match &r.model {
        Some(model) => format!(
            "{}: {} generated images (seed {})",
            model.display(),
            report.n,
            r.seed
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
        (Some(mean), Some(std)) => println!("IS: {mean:.4} +- {std:.4} ({} splits)", r.splits),
        _ => println!("IS: n/a (the feature network has no logits)"),
    }
    if let Some(accuracy) = report.class_accuracy {
        println!(
            "class accuracy: {:.2}% (images the feature network assigns to the class they were generated for)",
            100.0 * accuracy
        );
    }
    if let Some(path) = &r.json {
        let json = JsonReport {
            model: r.model.as_deref(),
            data: data.describe(),
            feature_net: net_name,
            seed: r.seed,
            splits: r.splits,
            report,
        };
        let text = serde_json::to_string_pretty(&json)
            .map_err(|e| InferError::Invalid(format!("encoding the JSON report: {e}")))?;
        crate::fsutil::write_atomic(path, text.as_bytes())?;
    }
    Ok(())
}

/// The real images, as the feature network sees them.
struct Real<'a> {
    data: &'a Dataset,
    batch: usize,
    /// (C, H, W) the images are loaded at.
    shape: [usize; 3],
}

impl Real<'_> {
    /// Features of the images at `indices`.
    fn summary(&self, net: &mut FeatureNet, indices: &[usize]) -> InferResult<FeatureSummary> {
        summarise(net, indices.len(), self.batch, self.shape, |range, out| {
            self.data.fill_batch(&indices[range], out);
            Ok(())
        })
    }

    /// The statistics of the images at `indices`, from the cache in `cache_dir` when it has
    /// them.
    fn statistics(
        &self,
        net: &mut FeatureNet,
        indices: &[usize],
        cache_dir: Option<&Path>,
    ) -> InferResult<Statistics> {
        let content = indices.iter().fold(fingerprint(b""), |h, &i| {
            fingerprint_from(h, self.data.image(i))
        });
        let key = CacheKey::new(
            net,
            &self.data.describe(),
            content,
            indices.len(),
            net.input_shape_for(self.shape),
        );
        cache::load_or_compute(cache_dir, &key, || Ok(self.summary(net, indices)?.stats))
    }
}
