//! Sample quality: the Frechet distance between the feature statistics of real and generated
//! images (FID when the features are Inception-v3's) and the Inception-style score of the
//! generated images' class predictions.
//!
//! - [`features`] loads the feature network (ONNX, on the same runtime and providers as the
//!   generators) and converts images to its input shape and range.
//! - [`frechet`] accumulates mean and covariance and computes the Frechet distance.
//! - [`score`] computes the Inception score from logits.
//! - [`cache`] keeps the real images' statistics between runs.
//! - [`nearest`] finds the real images nearest to generated ones (the memorisation check).
//! - [`session`] is one sagan-eval invocation: real images from sagan's data loader.
//!
//! Nothing here cares where the real images come from: [`summarise`] asks a closure for them
//! batch by batch (sagan-eval feeds it from sagan's data loader).
//!
//! # Feature networks
//!
//! sagan ships `fixtures/mnist-classifier.onnx` (a small MNIST MLP, 128-d features, 10 logits;
//! see `fixtures/mnist-classifier.md`) for 1x28x28 digits. Its numbers are only comparable with
//! other numbers from the same network. For anything else, or for FIDs comparable with the
//! literature's, export an Inception-v3 to ONNX. With torchvision (the ImageNet weights'
//! `transform_input` step is what maps [-1, 1] to the range the ported Google weights expect,
//! so sagan's [-1, 1] images can go in directly once it is switched off):
//!
//! ```python
//! import onnx, torch, torchvision
//!
//! class InceptionFeatures(torch.nn.Module):
//!     def __init__(self):
//!         super().__init__()
//!         net = torchvision.models.inception_v3(weights="IMAGENET1K_V1").eval()
//!         net.transform_input = False  # inputs are already in [-1, 1]
//!         self.fc, net.fc = net.fc, torch.nn.Identity()
//!         self.net = net
//!
//!     def forward(self, image):  # [batch, 3, 299, 299] in [-1, 1]
//!         features = self.net(image)  # pool3: [batch, 2048]
//!         return features, self.fc(features)  # logits: [batch, 1000]
//!
//! torch.onnx.export(
//!     InceptionFeatures().eval(), torch.zeros(1, 3, 299, 299), "inception-v3.onnx",
//!     input_names=["image"], output_names=["features", "logits"],
//!     dynamic_axes={n: {0: "batch"} for n in ("image", "features", "logits")},
//!     opset_version=17, dynamo=False)
//! model = onnx.load("inception-v3.onnx")
//! onnx.helper.set_model_props(model, {"sagan.feature_net": "torchvision-inception-v3",
//!                                     "sagan.input_range": "-1,1"})
//! onnx.save(model, "inception-v3.onnx")
//! ```
//!
//! then `sagan-eval --model g.onnx --data DIR --feature-net inception-v3.onnx`: images are
//! resized to 299x299 (bilinear; `--resize nearest`) and grey ones replicated to RGB. A network
//! that wants another input range (ImageNet mean/std, [0, 1], ...) either does that scaling in
//! its graph or declares `sagan.input_range` = "lo,hi" for the linear map from [-1, 1].
//! Other output names are chosen with `--features-output` / `--logits-output`; a
//! `[batch, D, 1, 1]` output (pytorch-fid's `InceptionV3`, whose TF-ported weights give the FID
//! papers report, returns pool3 that way) is flattened. A network without logits gives no
//! Inception score.

pub mod cache;
pub mod features;
pub mod frechet;
pub mod nearest;
pub mod score;
pub mod session;

pub use features::{FeatureNet, FeatureNetOptions, Features, Resize};
pub use frechet::{frechet_distance, Statistics, StatsAccumulator};
pub use score::{inception_score, InceptionScore};

use crate::image_io::ImageBatch;
use crate::infer::{latents, Generator, InferError, InferResult};
use std::ops::Range;

/// How many generated images, in which batches, from which latent seed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EvalOptions {
    pub count: usize,
    pub batch: usize,
    pub seed: u64,
    /// Parts the Inception score is averaged over (the reference uses 10).
    pub splits: usize,
}

impl Default for EvalOptions {
    fn default() -> Self {
        Self {
            count: 10_000,
            batch: 100,
            seed: 0,
            splits: 10,
        }
    }
}

/// The MNIST classifier shipped as the default feature network for 1x28x28 data
/// (fixtures/mnist-classifier.md), built into the binaries.
pub const MNIST_CLASSIFIER: &[u8] = include_bytes!("../../fixtures/mnist-classifier.onnx");
pub const MNIST_CLASSIFIER_NAME: &str = "<built-in mnist-classifier.onnx>";

/// The built-in MNIST classifier as the feature network for greyscale images of `shape`
/// (other sizes than 28x28, e.g. 32x32 digits, are resized to its input); for any other
/// images an error that names the way out. `None`: the shape is not known yet.
pub fn builtin_feature_net(
    runtime: &crate::infer::Runtime,
    shape: Option<[usize; 3]>,
    options: &FeatureNetOptions,
) -> InferResult<FeatureNet> {
    match shape {
        Some([1, ..]) | None => FeatureNet::from_bytes(
            runtime,
            std::path::Path::new(MNIST_CLASSIFIER_NAME),
            MNIST_CLASSIFIER,
            options,
        ),
        Some([c, h, w]) => Err(InferError::Invalid(format!(
            "the built-in feature network (an MNIST classifier) fits greyscale digits only and \
             these images are {c}x{h}x{w}: pass --feature-net NET.onnx (e.g. an Inception-v3 \
             export, see the sagan::eval docs)"
        ))),
    }
}

/// What the feature network made of a set of images.
#[derive(Clone, Debug)]
pub struct FeatureSummary {
    pub stats: Statistics,
    /// `[n, classes]` row-major, when the network has logits.
    pub logits: Option<Vec<f32>>,
    pub classes: usize,
}

impl FeatureSummary {
    /// The Inception score of the images, when the network has logits.
    pub fn inception_score(&self, splits: usize) -> InferResult<Option<InceptionScore>> {
        self.logits
            .as_ref()
            .map(|logits| inception_score(logits, self.classes, splits))
            .transpose()
    }
}

/// The result of an evaluation.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct EvalReport {
    /// Images evaluated.
    pub n: usize,
    /// Real images the reference statistics were computed from.
    pub n_real: usize,
    pub fid: f64,
    /// Inception score (mean and standard deviation over the splits); `None` without logits.
    pub is_mean: Option<f64>,
    pub is_std: Option<f64>,
    /// For a class-conditional generator evaluated with a classifier over the same classes:
    /// the fraction of images the classifier assigns to the class they were generated for.
    pub class_accuracy: Option<f64>,
}

impl EvalReport {
    /// Compares `images` with the real statistics.
    pub fn new(real: &Statistics, images: &FeatureSummary, splits: usize) -> InferResult<Self> {
        let score = images.inception_score(splits)?;
        Ok(Self {
            n: images.stats.n,
            n_real: real.n,
            fid: frechet_distance(real, &images.stats)?,
            is_mean: score.map(|s| s.mean),
            is_std: score.map(|s| s.std),
            class_accuracy: None,
        })
    }
}

/// The class image `i` of a conditional evaluation is generated for: every class in turn, so
/// all are represented equally.
pub fn requested_class(i: usize, num_classes: usize) -> i64 {
    (i % num_classes) as i64
}

/// The fraction of images whose logits' argmax is [`requested_class`]; `None` unless the
/// network has logits over exactly `num_classes` classes.
pub fn class_accuracy(images: &FeatureSummary, num_classes: usize) -> Option<f64> {
    let logits = images.logits.as_ref()?;
    if num_classes == 0 || images.classes != num_classes {
        return None;
    }
    let rows = logits.chunks(num_classes);
    let n = rows.len();
    let hits = rows
        .enumerate()
        .filter(|(i, row)| {
            let best = row
                .iter()
                .enumerate()
                .max_by(|a, b| a.1.total_cmp(b.1))
                .map(|(k, _)| k as i64);
            best == Some(requested_class(*i, num_classes))
        })
        .count();
    Some(hits as f64 / n.max(1) as f64)
}

/// Runs `count` images through `net`, `batch` at a time, and summarises the features.
///
/// `fill(range, out)` appends images `range` (NCHW f32 in [-1, 1], `shape` = (C, H, W) each)
/// to `out`; they can come from a dataset, a file or a generator.
pub fn summarise(
    net: &mut FeatureNet,
    count: usize,
    batch: usize,
    [c, h, w]: [usize; 3],
    fill: impl FnMut(Range<usize>, &mut Vec<f32>) -> InferResult<()>,
) -> InferResult<FeatureSummary> {
    if count < 2 || batch == 0 {
        return Err(InferError::Invalid(format!(
            "evaluation needs at least 2 images and a batch size of at least 1 (got {count} images, batch {batch})"
        )));
    }
    let mut acc: Option<StatsAccumulator> = None;
    let mut logits: Option<Vec<f32>> = None;
    let mut classes = 0;
    for_each_batch(net, count, batch, [c, h, w], fill, |out| {
        let acc = acc.get_or_insert_with(|| StatsAccumulator::new(out.dim));
        acc.add(&out.features)?;
        if let Some(batch_logits) = out.logits {
            classes = out.classes;
            logits.get_or_insert_with(Vec::new).extend(batch_logits);
        }
        Ok(())
    })?;
    let acc = acc.ok_or_else(|| InferError::Invalid("no images were evaluated".into()))?;
    Ok(FeatureSummary {
        stats: acc.finish()?,
        logits,
        classes,
    })
}

/// Runs `count` images through `net`, `batch` at a time (`fill(range, out)` appends images
/// `range`, NCHW f32 in [-1, 1] of `shape` each), and hands each batch's output to `each`.
pub(crate) fn for_each_batch(
    net: &mut FeatureNet,
    count: usize,
    batch: usize,
    [c, h, w]: [usize; 3],
    mut fill: impl FnMut(Range<usize>, &mut Vec<f32>) -> InferResult<()>,
    mut each: impl FnMut(Features) -> InferResult<()>,
) -> InferResult<()> {
    let mut images = Vec::new();
    for start in (0..count).step_by(batch.max(1)) {
        let range = start..count.min(start + batch.max(1));
        let k = range.len();
        images.clear();
        fill(range, &mut images)?;
        let view = ImageBatch::new(&images, k, c, h, w)
            .map_err(|e| InferError::Invalid(format!("images {start}..{}: {e}", start + k)))?;
        each(net.run(&view)?)?;
    }
    Ok(())
}

/// Summarises `options.count` images of `generator`, drawn from the latents of
/// `options.seed` (the same ones `sagan-infer --seed` uses).
pub fn summarise_generator(
    generator: &mut Generator,
    net: &mut FeatureNet,
    options: &EvalOptions,
) -> InferResult<FeatureSummary> {
    let z_dim = generator.z_dim();
    let z = latents(options.seed, options.count, z_dim);
    let (h, w) = generator.size();
    let shape = [generator.channels(), h, w];
    let k = generator.num_classes();
    summarise(net, options.count, options.batch, shape, |range, out| {
        let classes: Option<Vec<i64>> =
            (k > 0).then(|| range.clone().map(|i| requested_class(i, k)).collect());
        let generated = generator.generate(
            &z[range.start * z_dim..range.end * z_dim],
            classes.as_deref(),
            range.len(),
        )?;
        out.extend(generated.images);
        Ok(())
    })
}

/// FID of `generator` against the real statistics, and its Inception score.
pub fn evaluate(
    generator: &mut Generator,
    net: &mut FeatureNet,
    real: &Statistics,
    options: &EvalOptions,
) -> InferResult<EvalReport> {
    let generated = summarise_generator(generator, net, options)?;
    let mut report = EvalReport::new(real, &generated, options.splits)?;
    report.class_accuracy = class_accuracy(&generated, generator.num_classes());
    Ok(report)
}
