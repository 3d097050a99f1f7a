//! Training data: MNIST IDX files, folders of pictures, or the MNIST training set built into the
//! binary.
//!
//! Every source is decoded once, up front, into one `u8` NCHW buffer at the shape the model
//! wants, so an epoch only has to scale bytes to floats. A 60000-image 3x64x64 set is ~740 MB
//! as `u8`; as `f32` it would be four times that.

mod folder;
mod mnist;

use crate::{Error, Result};
use image::imageops::{self, FilterType};
use image::{DynamicImage, ImageBuffer, Pixel};
use std::path::{Path, PathBuf};

/// Where the training images come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DataSource {
    /// The 60000 MNIST training digits, embedded in the binary.
    Builtin,
    /// An IDX images file (raw or gzip), a directory holding `train-images-idx3-ubyte[.gz]`,
    /// or a directory of .png/.jpg pictures whose first-level sub-folders name the classes.
    Path(PathBuf),
}

/// Every image of a source, converted to `channels x size x size` and kept as bytes.
#[derive(Debug, Clone)]
pub struct Dataset {
    /// `len * channels * size * size` bytes, image after image, each in CHW order.
    pixels: Vec<u8>,
    labels: Vec<u32>,
    class_names: Vec<String>,
    channels: usize,
    size: usize,
    /// Where the images came from, for [`Dataset::describe`].
    origin: String,
}

/// The class name given to every image of a source without labels.
const UNLABELLED: &str = "all";

impl Dataset {
    /// Loads and converts every image to `channels` (1 or 3) x `size` x `size`.
    ///
    /// Non-square images are center-cropped to a square before resizing, so nothing is
    /// stretched. Colour becomes gray through luma, gray becomes colour by replication, and
    /// alpha is dropped.
    pub fn load(source: &DataSource, channels: usize, size: usize) -> Result<Dataset> {
        if channels != 1 && channels != 3 {
            return Err(Error::Config(format!(
                "images must have 1 or 3 channels, got {channels}"
            )));
        }
        if size == 0 || u32::try_from(size).is_err() {
            return Err(Error::Config(format!("invalid image size {size}")));
        }
        let shape = Shape { channels, size };
        match source {
            DataSource::Builtin => mnist::load_builtin(shape),
            DataSource::Path(path) => {
                let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
                if meta.is_file() {
                    return mnist::load_file(path, shape);
                }
                match mnist::find_images_file(path) {
                    Some(images) => mnist::load_file(&images, shape),
                    None => folder::load(path, shape),
                }
            }
        }
    }

    /// Number of images.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    pub fn channels(&self) -> usize {
        self.channels
    }

    /// Height and width of every image.
    pub fn size(&self) -> usize {
        self.size
    }

    /// The class of each image; 0 for every image when the source has no labels.
    pub fn labels(&self) -> &[u32] {
        &self.labels
    }

    /// Number of classes; 1 when the source has no labels.
    pub fn num_classes(&self) -> usize {
        self.class_names.len()
    }

    /// The name of each class id: the sub-folder name for image folders, the digit for MNIST.
    pub fn class_names(&self) -> &[String] {
        &self.class_names
    }

    /// The bytes of image `index`, `channels * size * size` of them in CHW order.
    ///
    /// # Panics
    /// If `index >= self.len()`.
    pub fn image(&self, index: usize) -> &[u8] {
        let n = self.image_len();
        &self.pixels[index * n..(index + 1) * n]
    }

    /// Appends the images at `indices` to `out` as f32 NCHW scaled to [-1, 1], the range of
    /// the generator's tanh output.
    ///
    /// # Panics
    /// If an index is `>= self.len()`.
    pub fn fill_batch(&self, indices: &[usize], out: &mut Vec<f32>) {
        out.reserve(indices.len() * self.image_len());
        for &index in indices {
            // 255 / 127.5 is exactly 2, so the bytes 0 and 255 map exactly to -1 and 1.
            out.extend(
                self.image(index)
                    .iter()
                    .map(|&v| f32::from(v) / 127.5 - 1.0),
            );
        }
    }

    /// One line for logs: where it came from, how many images, shape.
    pub fn describe(&self) -> String {
        let classes = match self.class_names.as_slice() {
            [_] => "unlabelled".to_string(),
            names if names.len() <= 10 => {
                format!("{} classes ({})", names.len(), names.join(", "))
            }
            names => format!("{} classes", names.len()),
        };
        format!(
            "{}: {} images, {classes}, {}x{}x{}",
            self.origin,
            self.len(),
            self.channels,
            self.size,
            self.size
        )
    }

    fn image_len(&self) -> usize {
        self.channels * self.size * self.size
    }
}

/// The shape every image of a dataset is converted to.
#[derive(Debug, Clone, Copy)]
struct Shape {
    channels: usize,
    size: usize,
}

impl Shape {
    fn image_len(self) -> usize {
        self.channels * self.size * self.size
    }
}

/// Center-crops `img` to a square, resizes it to `shape`, and writes it to `out` in CHW order.
fn write_chw(img: &DynamicImage, shape: Shape, out: &mut [u8]) {
    // `Dataset::load` checked that the size fits in u32.
    let size = shape.size as u32;
    let plane = shape.size * shape.size;
    if shape.channels == 1 || !img.color().has_color() {
        // Gray to RGB is replication, so resize one plane rather than three equal ones.
        let gray = square(&img.to_luma8(), size);
        for out in out.chunks_exact_mut(plane) {
            out.copy_from_slice(gray.as_raw());
        }
    } else {
        let rgb = square(&img.to_rgb8(), size);
        for (i, p) in rgb.pixels().enumerate() {
            for (c, &v) in p.0.iter().enumerate() {
                out[c * plane + i] = v;
            }
        }
    }
}

/// Crops the largest centered square out of `img` and resizes it to `size` x `size`.
///
/// Triangle (bilinear, widened when shrinking) never overshoots, unlike CatmullRom or
/// Lanczos3 whose ringing shows up around MNIST's hard stroke edges when upscaling.
fn square<P: Pixel + 'static>(
    img: &ImageBuffer<P, Vec<P::Subpixel>>,
    size: u32,
) -> ImageBuffer<P, Vec<P::Subpixel>> {
    let (w, h) = img.dimensions();
    let side = w.min(h);
    let crop = imageops::crop_imm(img, (w - side) / 2, (h - side) / 2, side, side);
    if side == size {
        crop.to_image()
    } else {
        imageops::resize(&*crop, size, size, FilterType::Triangle)
    }
}

/// Runs `convert` on every item, on all cores, each writing one `shape` image into its own
/// slice of the returned buffer. The first error, in item order, wins. A buffer larger than
/// the memory available is refused, naming `path`, rather than left to abort the process.
fn convert_all<T: Sync>(
    items: &[T],
    shape: Shape,
    path: &Path,
    convert: impl Fn(&T, &mut [u8]) -> Result<()> + Sync,
) -> Result<Vec<u8>> {
    let image_len = shape.image_len();
    let bytes = (items.len() as u64).saturating_mul(image_len as u64);
    check_memory(path, bytes, crate::sysmem::available(), || {
        format!(
            "{} images at {}x{}x{}",
            items.len(),
            shape.channels,
            shape.size,
            shape.size
        )
    })?;
    let mut pixels = vec![0u8; items.len() * image_len];
    if items.is_empty() || image_len == 0 {
        return Ok(pixels);
    }
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let per_thread = items.len().div_ceil(threads);
    let convert = &convert;
    std::thread::scope(|scope| {
        let handles: Vec<_> = items
            .chunks(per_thread)
            .zip(pixels.chunks_mut(per_thread * image_len))
            .map(|(items, out)| {
                scope.spawn(move || {
                    items
                        .iter()
                        .zip(out.chunks_mut(image_len))
                        .try_for_each(|(item, out)| convert(item, out))
                })
            })
            .collect();
        handles
            .into_iter()
            .try_for_each(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
    })?;
    Ok(pixels)
}

/// Refuses to hold `bytes` (of what `what` says) when more than `available` bytes of memory
/// are free: the allocation would abort the process instead of failing.
fn check_memory(
    path: &Path,
    bytes: u64,
    available: Option<f64>,
    what: impl FnOnce() -> String,
) -> Result<()> {
    const GIB: f64 = (1u64 << 30) as f64;
    match available {
        Some(available) if bytes as f64 > available => Err(Error::Dataset {
            path: path.to_path_buf(),
            msg: format!(
                "{} take {:.1} GiB, more than the {:.1} GiB of memory available",
                what(),
                bytes as f64 / GIB,
                available / GIB
            ),
        }),
        _ => Ok(()),
    }
}

/// The names of classes `0..n`, or the single unlabelled class.
fn numbered_classes(labels: Option<&[u32]>) -> Vec<String> {
    match labels {
        Some(labels) => {
            let n = labels.iter().max().map_or(0, |&m| m + 1);
            (0..n).map(|i| i.to_string()).collect()
        }
        None => vec![UNLABELLED.to_string()],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    pub(crate) fn fixture(rel: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("fixtures")
            .join(rel)
    }

    fn err_string(source: &DataSource) -> String {
        match Dataset::load(source, 1, 28) {
            Ok(_) => panic!("{source:?} loaded but should have failed"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn builtin_is_the_60000_labelled_training_digits() {
        let ds = Dataset::load(&DataSource::Builtin, 1, 28).unwrap();
        assert_eq!(ds.len(), 60000);
        assert_eq!((ds.channels(), ds.size()), (1, 28));
        assert_eq!(ds.num_classes(), 10);
        assert_eq!(ds.class_names()[3], "3");
        assert!(ds.labels().iter().all(|&l| l < 10));
        // The first MNIST training digit is a 5, the second a 0.
        assert_eq!(&ds.labels()[..2], &[5, 0]);
        assert!(ds
            .describe()
            .starts_with("built-in MNIST (60000 training digits)"));

        let mut batch = Vec::new();
        ds.fill_batch(&[0, 1, 59999], &mut batch);
        assert_eq!(batch.len(), 3 * 28 * 28);
        assert!(batch.iter().all(|v| (-1.0..=1.0).contains(v)));
        assert!(batch.contains(&-1.0), "MNIST background is 0 -> -1");
        assert!(batch.contains(&1.0), "MNIST strokes reach 255 -> 1");
    }

    #[test]
    fn builtin_converts_to_rgb_64() {
        let ds = Dataset::load(&DataSource::Builtin, 3, 64).unwrap();
        assert_eq!(ds.len(), 60000);
        let img = ds.image(0);
        assert_eq!(img.len(), 3 * 64 * 64);
        let plane = 64 * 64;
        assert_eq!(&img[..plane], &img[plane..2 * plane]);
        assert_eq!(&img[..plane], &img[2 * plane..]);
        assert!(img.iter().any(|&v| v > 200));
    }

    #[test]
    fn fill_batch_appends() {
        let ds = Dataset::load(&DataSource::Builtin, 1, 8).unwrap();
        let mut out = vec![7.0];
        ds.fill_batch(&[1, 2], &mut out);
        ds.fill_batch(&[3], &mut out);
        assert_eq!(out.len(), 1 + 3 * 64);
        assert_eq!(out[0], 7.0);
        let mut third = Vec::new();
        ds.fill_batch(&[3], &mut third);
        assert_eq!(out[1 + 2 * 64..], third[..]);
    }

    #[test]
    fn what_does_not_fit_in_memory_is_refused_naming_the_file() {
        let path = Path::new("/data/train-images-idx3-ubyte.gz");
        check_memory(path, 1 << 30, Some(2.0 * (1u64 << 30) as f64), String::new).unwrap();
        check_memory(path, u64::MAX, None, String::new).unwrap();
        let err = check_memory(path, 3 << 30, Some((1u64 << 30) as f64), || {
            "60000 images at 3x128x128".into()
        })
        .unwrap_err()
        .to_string();
        assert_eq!(
            err,
            "/data/train-images-idx3-ubyte.gz: 60000 images at 3x128x128 take 3.0 GiB, more than the 1.0 GiB of memory available"
        );
    }

    #[test]
    fn rejects_bad_shape() {
        for (c, s) in [(2, 28), (4, 28), (1, 0)] {
            let err = Dataset::load(&DataSource::Builtin, c, s).unwrap_err();
            assert!(matches!(err, Error::Config(_)), "{err}");
        }
    }

    #[test]
    fn missing_path_is_named() {
        let path = fixture("does-not-exist");
        let msg = err_string(&DataSource::Path(path));
        assert!(msg.contains("does-not-exist"), "{msg}");
    }

    #[test]
    fn no_images_is_an_error() {
        let msg = err_string(&DataSource::Path(fixture("no-images")));
        assert!(msg.contains("no .png/.jpg images found under"), "{msg}");
        assert!(msg.contains("no-images"), "{msg}");
    }

    #[test]
    fn corrupt_image_is_named() {
        let msg = err_string(&DataSource::Path(fixture("corrupt")));
        assert!(msg.contains("not-an-image.png"), "{msg}");
    }

    #[test]
    fn truncated_idx_is_named() {
        let path = fixture("corrupt/truncated-images-idx3-ubyte.gz");
        let msg = err_string(&DataSource::Path(path));
        assert!(msg.contains("truncated-images-idx3-ubyte.gz"), "{msg}");
        assert!(
            msg.contains("truncated: header says 100 images of 28x28 but file holds 3920 bytes"),
            "{msg}"
        );
    }
}
