//! MNIST's IDX files: a big-endian header (magic number, counts, dimensions) followed by one
//! byte per pixel or label, often gzip-compressed.

use super::{check_memory, convert_all, numbered_classes, write_chw, Dataset, Shape};
use crate::{Error, Result};
use flate2::read::MultiGzDecoder;
use image::{DynamicImage, GrayImage};
use std::io::Read;
use std::path::{Path, PathBuf};

/// Unsigned bytes, three dimensions (count, rows, columns).
const IMAGES_MAGIC: u32 = 0x0000_0803;
/// Unsigned bytes, one dimension (count).
const LABELS_MAGIC: u32 = 0x0000_0801;

/// The 60000 digits of the MNIST training set, so that training works without a download (see
/// fixtures/mnist/README.md).
static BUILTIN_IMAGES: &[u8] = include_bytes!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/fixtures/mnist/train-images-idx3-ubyte.gz"
));
static BUILTIN_LABELS: &[u8] = include_bytes!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/fixtures/mnist/train-labels-idx1-ubyte.gz"
));

/// The names a directory's MNIST training images go by, in order of preference.
const IMAGES_NAMES: [&str; 2] = ["train-images-idx3-ubyte", "train-images-idx3-ubyte.gz"];

pub(super) fn load_builtin(shape: Shape) -> Result<Dataset> {
    // Only seen if the embedded files were broken at build time.
    let path = Path::new("<built-in MNIST>");
    let images = gunzip(BUILTIN_IMAGES, path)?;
    let images = Images::parse(&images, path)?;
    let labels = parse_labels(&gunzip(BUILTIN_LABELS, path)?, path, images.count)?;
    let origin = format!("built-in MNIST ({} training digits)", images.count);
    build(&images, Some(labels), shape, path, origin)
}

/// The MNIST training images file in `dir`, if it has one.
pub(super) fn find_images_file(dir: &Path) -> Option<PathBuf> {
    IMAGES_NAMES
        .iter()
        .map(|name| dir.join(name))
        .find(|p| p.is_file())
}

/// Loads an IDX images file and, when one lies beside it, its labels file.
pub(super) fn load_file(path: &Path, shape: Shape) -> Result<Dataset> {
    let bytes = read_idx(path)?;
    let images = Images::parse(&bytes, path)?;
    let (labels, origin) = match labels_file(path) {
        Some(labels_path) => {
            let labels = parse_labels(&read_idx(&labels_path)?, &labels_path, images.count)?;
            let origin = format!(
                "MNIST IDX {} (labels {})",
                path.display(),
                labels_path.display()
            );
            (Some(labels), origin)
        }
        None => (None, format!("MNIST IDX {} (no labels)", path.display())),
    };
    build(&images, labels, shape, path, origin)
}

fn build(
    images: &Images,
    labels: Option<Vec<u32>>,
    shape: Shape,
    path: &Path,
    origin: String,
) -> Result<Dataset> {
    let (rows, cols) = (images.rows, images.cols);
    let pixels = if shape.channels == 1 && rows == shape.size && cols == shape.size {
        images.pixels.to_vec()
    } else {
        let digits: Vec<&[u8]> = images.pixels.chunks_exact(rows * cols).collect();
        convert_all(&digits, shape, path, |digit, out| {
            // Both dimensions came out of u32 header fields.
            let gray = GrayImage::from_raw(cols as u32, rows as u32, digit.to_vec())
                .ok_or_else(|| Error::Config(format!("bad MNIST digit shape {rows}x{cols}")))?;
            write_chw(&DynamicImage::ImageLuma8(gray), shape, out);
            Ok(())
        })?
    };
    let class_names = numbered_classes(labels.as_deref());
    Ok(Dataset {
        pixels,
        labels: labels.unwrap_or_else(|| vec![0; images.count]),
        class_names,
        channels: shape.channels,
        size: shape.size,
        origin,
    })
}

/// `train-labels-idx1-ubyte[.gz]` beside `train-images-idx3-ubyte[.gz]` (and likewise for
/// any name with `images-idx3` in it), raw or gzip.
fn labels_file(images: &Path) -> Option<PathBuf> {
    let name = images.file_name()?.to_str()?;
    let stem = name.strip_suffix(".gz").unwrap_or(name);
    let labels = stem.replace("images-idx3", "labels-idx1");
    if labels == stem {
        return None;
    }
    [labels.clone(), format!("{labels}.gz")]
        .into_iter()
        .map(|n| images.with_file_name(n))
        .find(|p| p.is_file())
}

/// Reads a file, gunzipping it when it starts with the gzip magic bytes (whatever its name).
fn read_idx(path: &Path) -> Result<Vec<u8>> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    if bytes.starts_with(&[0x1f, 0x8b]) {
        gunzip(&bytes, path)
    } else {
        Ok(bytes)
    }
}

/// Decompresses an IDX file no further than its header says it reaches, plus one byte so that
/// data past the end is still noticed: a stream that expands to more than the header declares
/// (it is corrupt, or a gzip bomb) is refused without being held in memory.
fn gunzip(bytes: &[u8], path: &Path) -> Result<Vec<u8>> {
    let corrupt =
        |e: std::io::Error| dataset_error(path, format!("corrupt or truncated gzip data: {e}"));
    let mut decoder = MultiGzDecoder::new(bytes);
    let mut out = Vec::new();
    (&mut decoder)
        .take(16)
        .read_to_end(&mut out)
        .map_err(corrupt)?;
    let declared = declared_len(&out);
    // Its size is not known until it is decompressed: refuse what could not be held anyway.
    if let Some(n) = declared {
        check_memory(path, n, crate::sysmem::available(), || {
            "the sizes its header declares".into()
        })?;
    }
    let limit = declared.map_or(0, |n| n.saturating_add(1));
    (&mut decoder)
        .take(limit.saturating_sub(out.len() as u64))
        .read_to_end(&mut out)
        .map_err(corrupt)?;
    Ok(out)
}

/// The length of the whole file (header included) that an IDX images or labels header
/// declares; `None` when `header` is not one.
fn declared_len(header: &[u8]) -> Option<u64> {
    let field = |i: usize| {
        let b = header.get(4 * i..4 * i + 4)?;
        Some(u64::from(u32::from_be_bytes([b[0], b[1], b[2], b[3]])))
    };
    match u32::try_from(field(0)?).ok()? {
        IMAGES_MAGIC => Some(
            field(1)?
                .saturating_mul(field(2)?)
                .saturating_mul(field(3)?)
                .saturating_add(16),
        ),
        LABELS_MAGIC => Some(field(1)? + 8),
        _ => None,
    }
}

fn dataset_error(path: &Path, msg: String) -> Error {
    Error::Dataset {
        path: path.to_path_buf(),
        msg,
    }
}

fn be_u32(bytes: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
}

/// The validated contents of an IDX images file.
struct Images<'a> {
    count: usize,
    rows: usize,
    cols: usize,
    /// `count * rows * cols` bytes.
    pixels: &'a [u8],
}

impl<'a> Images<'a> {
    fn parse(bytes: &'a [u8], path: &Path) -> Result<Self> {
        let err = |msg: String| dataset_error(path, msg);
        let short = || {
            err(format!(
                "not an IDX images file: {} bytes is shorter than the 16-byte header",
                bytes.len()
            ))
        };
        match (bytes.len() >= 4).then(|| be_u32(bytes, 0)) {
            Some(IMAGES_MAGIC) if bytes.len() >= 16 => {}
            Some(IMAGES_MAGIC) | None => return Err(short()),
            Some(LABELS_MAGIC) => {
                return Err(err(format!(
                    "this is an IDX labels file, not images (magic number 0x{LABELS_MAGIC:08x})"
                )))
            }
            Some(magic) => {
                return Err(err(format!(
                "not an IDX images file: magic number 0x{magic:08x}, expected 0x{IMAGES_MAGIC:08x}"
            )))
            }
        }
        let [count, rows, cols] = [4, 8, 12].map(|at| be_u32(bytes, at) as usize);
        if count == 0 || rows == 0 || cols == 0 {
            return Err(err(format!(
                "header says {count} images of {rows}x{cols}: there is nothing to load"
            )));
        }
        let expected = count
            .checked_mul(rows)
            .and_then(|n| n.checked_mul(cols))
            .ok_or_else(|| {
                err(format!(
                    "header says {count} images of {rows}x{cols}: too large"
                ))
            })?;
        let pixels = &bytes[16..];
        if pixels.len() < expected {
            return Err(err(format!(
                "truncated: header says {count} images of {rows}x{cols} but file holds {} bytes of pixel data ({expected} expected)",
                pixels.len()
            )));
        }
        if pixels.len() > expected {
            // A gzip stream is only read one byte past the declared size: say "more".
            return Err(err(format!(
                "corrupt: header says {count} images of {rows}x{cols} ({expected} bytes) but the file holds more pixel data"
            )));
        }
        Ok(Images {
            count,
            rows,
            cols,
            pixels,
        })
    }
}

/// Checks an IDX labels file against the `count` images it labels.
fn parse_labels(bytes: &[u8], path: &Path, count: usize) -> Result<Vec<u32>> {
    let err = |msg: String| dataset_error(path, msg);
    if bytes.len() < 8 {
        return Err(err(format!(
            "not an IDX labels file: {} bytes is shorter than the 8-byte header",
            bytes.len()
        )));
    }
    let magic = be_u32(bytes, 0);
    if magic != LABELS_MAGIC {
        return Err(err(format!(
            "not an IDX labels file: magic number 0x{magic:08x}, expected 0x{LABELS_MAGIC:08x}"
        )));
    }
    let n = be_u32(bytes, 4) as usize;
    if n != count {
        return Err(err(format!(
            "header says {n} labels but the images file holds {count} images"
        )));
    }
    let labels = &bytes[8..];
    if labels.len() < n {
        return Err(err(format!(
            "truncated: header says {n} labels but file holds {} bytes of labels",
            labels.len()
        )));
    }
    if labels.len() > n {
        return Err(err(format!(
            "corrupt: header says {n} labels but the file holds more"
        )));
    }
    Ok(labels.iter().map(|&l| u32::from(l)).collect())
}

#[cfg(test)]
mod tests {
    use super::super::DataSource;
    use super::*;
    use flate2::{write::GzEncoder, Compression};
    use std::io::Write;

    fn idx_images(count: u32, rows: u32, cols: u32, pixels: &[u8]) -> Vec<u8> {
        let mut bytes = Vec::new();
        for v in [IMAGES_MAGIC, count, rows, cols] {
            bytes.extend_from_slice(&v.to_be_bytes());
        }
        bytes.extend_from_slice(pixels);
        bytes
    }

    fn idx_labels(labels: &[u8]) -> Vec<u8> {
        let mut bytes = Vec::new();
        for v in [LABELS_MAGIC, labels.len() as u32] {
            bytes.extend_from_slice(&v.to_be_bytes());
        }
        bytes.extend_from_slice(labels);
        bytes
    }

    fn gz(bytes: &[u8]) -> Vec<u8> {
        let mut enc = GzEncoder::new(Vec::new(), Compression::best());
        enc.write_all(bytes).unwrap();
        enc.finish().unwrap()
    }

    /// Three 2x2 images: image i holds the bytes 4i..4i+4, times 20.
    fn tiny_pixels() -> Vec<u8> {
        (0..12u8).map(|v| v * 20).collect()
    }

    fn load_err(path: &Path) -> String {
        match Dataset::load(&DataSource::Path(path.to_path_buf()), 1, 2) {
            Ok(_) => panic!("{} loaded but should have failed", path.display()),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn idx_round_trip_raw_and_gz() {
        let pixels = tiny_pixels();
        for compress in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            let (images, labels) = (idx_images(3, 2, 2, &pixels), idx_labels(&[7, 0, 3]));
            let suffix = if compress { ".gz" } else { "" };
            let images_path = dir.path().join(format!("train-images-idx3-ubyte{suffix}"));
            let labels_path = dir.path().join(format!("train-labels-idx1-ubyte{suffix}"));
            let (images, labels) = if compress {
                (gz(&images), gz(&labels))
            } else {
                (images, labels)
            };
            std::fs::write(&images_path, images).unwrap();
            std::fs::write(&labels_path, labels).unwrap();

            // Through the directory and through the file itself.
            for source in [dir.path().to_path_buf(), images_path.clone()] {
                let ds = Dataset::load(&DataSource::Path(source), 1, 2).unwrap();
                assert_eq!(ds.len(), 3);
                assert_eq!((ds.channels(), ds.size()), (1, 2));
                assert_eq!(ds.labels(), &[7, 0, 3]);
                assert_eq!(ds.num_classes(), 8);
                for i in 0..3 {
                    assert_eq!(ds.image(i), &pixels[4 * i..4 * i + 4]);
                }
                let described = ds.describe();
                assert!(described.contains("train-images-idx3-ubyte"), "{described}");
                assert!(described.contains("3 images"), "{described}");
            }
        }
    }

    #[test]
    fn idx_without_labels_is_one_class() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("train-images-idx3-ubyte.gz");
        std::fs::write(&path, gz(&idx_images(3, 2, 2, &tiny_pixels()))).unwrap();
        let ds = Dataset::load(&DataSource::Path(dir.path().to_path_buf()), 1, 2).unwrap();
        assert_eq!(ds.labels(), &[0, 0, 0]);
        assert_eq!(ds.num_classes(), 1);
        assert!(ds.describe().contains("no labels"), "{}", ds.describe());
    }

    #[test]
    fn idx_is_resized_and_replicated() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("train-images-idx3-ubyte");
        // One 4x6 image, non-square: the center 4x4 is kept.
        let mut pixels = vec![0u8; 24];
        for row in 0..4 {
            pixels[row * 6 + 1..row * 6 + 5].fill(255);
        }
        std::fs::write(&path, idx_images(1, 4, 6, &pixels)).unwrap();
        let ds = Dataset::load(&DataSource::Path(path), 3, 8).unwrap();
        assert_eq!(ds.image(0).len(), 3 * 8 * 8);
        assert!(ds.image(0).iter().all(|&v| v == 255), "{:?}", ds.image(0));
    }

    #[test]
    fn idx_errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let cases: [(&str, Vec<u8>, &str); 6] = [
            (
                "short-images-idx3-ubyte",
                idx_images(3, 2, 2, &tiny_pixels()[..10]),
                "truncated: header says 3 images of 2x2 but file holds 10 bytes of pixel data",
            ),
            (
                "long-images-idx3-ubyte",
                idx_images(3, 2, 2, &[0; 13]),
                "corrupt: header says 3 images of 2x2 (12 bytes) but the file holds more pixel data",
            ),
            (
                "magic-images-idx3-ubyte",
                b"GIF89a, certainly not an IDX file".to_vec(),
                "not an IDX images file: magic number 0x47494638",
            ),
            (
                "labels-idx1-ubyte",
                idx_labels(&[1, 2]),
                "this is an IDX labels file",
            ),
            (
                "tiny-images-idx3-ubyte",
                vec![0, 0, 8],
                "shorter than the 16-byte header",
            ),
            (
                "cut-images-idx3-ubyte.gz",
                gz(&idx_images(3, 2, 2, &tiny_pixels()))[..20].to_vec(),
                "corrupt or truncated gzip data",
            ),
        ];
        for (name, bytes, expected) in cases {
            let path = dir.path().join(name);
            std::fs::write(&path, bytes).unwrap();
            let msg = load_err(&path);
            assert!(msg.contains(name), "{msg}");
            assert!(msg.contains(expected), "{msg}");
        }
    }

    /// Found by fuzzing: a gzip IDX file whose stream went on past what its header declares
    /// (300 MiB of zeros in a second gzip member) was decompressed whole into memory before
    /// the sizes were compared.
    #[test]
    fn gzip_data_past_the_declared_size_is_not_decompressed() {
        let mut file = gz(&idx_images(3, 2, 2, &tiny_pixels()));
        // A second member: 64 MiB of zeros, compressed to a few dozen kilobytes.
        file.extend(gz(&vec![0u8; 64 << 20]));
        let bytes = gunzip(&file, Path::new("x.gz")).unwrap();
        assert_eq!(bytes.len(), 16 + 12 + 1, "read past the declared size");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bomb-images-idx3-ubyte.gz");
        std::fs::write(&path, &file).unwrap();
        let msg = load_err(&path);
        assert!(
            msg.contains("bomb-images-idx3-ubyte.gz")
                && msg.contains(
                    "corrupt: header says 3 images of 2x2 (12 bytes) but the file holds more pixel data"
                ),
            "{msg}"
        );
        // A labels file is bounded by its own header.
        let labels = gz(&[idx_labels(&[1; 100]), vec![0; 1000]].concat());
        assert_eq!(
            gunzip(&labels, Path::new("y.gz")).unwrap().len(),
            8 + 100 + 1
        );
    }

    #[test]
    fn mismatched_labels_name_the_labels_file() {
        let dir = tempfile::tempdir().unwrap();
        let images = dir.path().join("train-images-idx3-ubyte");
        std::fs::write(&images, idx_images(3, 2, 2, &tiny_pixels())).unwrap();
        let labels = dir.path().join("train-labels-idx1-ubyte.gz");
        std::fs::write(&labels, gz(&idx_labels(&[1, 2]))).unwrap();
        let msg = load_err(dir.path());
        assert!(msg.contains("train-labels-idx1-ubyte.gz"), "{msg}");
        assert!(
            msg.contains("header says 2 labels but the images file holds 3"),
            "{msg}"
        );

        let mut cut = idx_labels(&[1, 2, 3]);
        cut.pop();
        std::fs::write(&labels, gz(&cut)).unwrap();
        let msg = load_err(dir.path());
        assert!(
            msg.contains("truncated: header says 3 labels but file holds 2"),
            "{msg}"
        );
    }
}
