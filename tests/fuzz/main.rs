//! Fuzzing on stable Rust: every loader of sagan gets thousands of seeded, mutated copies of
//! valid inputs (the fixtures, the built-in presets, a checkpoint written here), byte by byte
//! and structurally (truncated, bit-flipped, spliced, duplicated, with huge declared sizes).
//! Every case must end in a load or in a one-line error naming the file: no panic, no huge
//! allocation (harness.rs counts them), no abort, no hang (a watchdog names the case).
//!
//! A failing case prints its seed and number: `SAGAN_FUZZ_SEED=S SAGAN_FUZZ_CASE=N cargo test
//! --release --test fuzz` replays it alone. `SAGAN_FUZZ_SCALE=10` runs ten times the cases.
//! The ONNX loaders need ONNX Runtime: `ORT_DYLIB_PATH`, or the CPU install that
//! `tools/install-onnxruntime.sh cpu` makes in `.onnxruntime/cpu`.
#![cfg(all(feature = "train", feature = "infer"))]

#[path = "../common/mod.rs"]
mod common;
mod harness;
mod models;
mod mutate;
mod onnx;

use flate2::read::GzDecoder;
use harness::{Fuzz, Outcome};
use rand::seq::IndexedRandom;
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use sagan::data::{DataSource, Dataset};
use std::io::Read;
use std::path::{Path, PathBuf};

#[global_allocator]
static ALLOC: harness::GuardedAlloc = harness::GuardedAlloc;

pub fn fixture(rel: &str) -> PathBuf {
    common::manifest_dir().join("fixtures").join(rel)
}

pub fn read(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Writes a case's file. The old one is removed first: overwriting a file in place makes
/// ext4 flush it to disk on close, which would make the disk, not the loader, set the pace.
pub fn write(path: &Path, bytes: &[u8]) {
    let _ = std::fs::remove_file(path);
    std::fs::write(path, bytes).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
}

/// The loader's result as the fuzz harness judges it.
pub fn outcome<T, E: std::fmt::Display>(result: Result<T, E>, path: &Path) -> Outcome {
    Outcome {
        result: result.map(|_| ()).map_err(|e| e.to_string()),
        path: path.to_path_buf(),
    }
}

/// The parts, one after the other, as one gzip member.
pub fn gzip_parts<'a>(parts: impl IntoIterator<Item = &'a [u8]>) -> Vec<u8> {
    use flate2::{write::GzEncoder, Compression};
    use std::io::Write;
    let mut enc = GzEncoder::new(Vec::new(), Compression::fast());
    for part in parts {
        enc.write_all(part).expect("gzip in memory");
    }
    enc.finish().expect("gzip in memory")
}

pub fn gzip(bytes: &[u8]) -> Vec<u8> {
    gzip_parts([bytes])
}

/// A gzip member holding 300 MiB of zeros, compressed a megabyte at a time (one 300 MiB
/// buffer would itself count as a huge allocation).
fn zeros_member() -> Vec<u8> {
    let megabyte = vec![0u8; 1 << 20];
    gzip_parts(std::iter::repeat_n(megabyte.as_slice(), 300))
}

/// Digits in the small IDX files fuzzed (the shipped ones hold 60000).
const DIGITS: usize = 8;

/// The first `DIGITS` images (or labels) of the shipped MNIST file, as a valid IDX file.
fn small_idx(name: &str, header: usize, per_item: usize) -> Vec<u8> {
    let mut bytes = vec![0u8; header + DIGITS * per_item];
    GzDecoder::new(read(&fixture(&format!("mnist/{name}"))).as_slice())
        .read_exact(&mut bytes)
        .expect("the shipped MNIST fixture");
    bytes[4..8].copy_from_slice(&(DIGITS as u32).to_be_bytes());
    bytes
}

/// Sets a size in an IDX header (images: count, rows, columns; labels: count) to a boundary
/// value, leaving the data as it is: the loader must not believe it.
fn idx_header(rng: &mut ChaCha8Rng, data: &mut [u8]) -> String {
    let sizes = if data.starts_with(&[0, 0, 8, 1]) {
        1
    } else {
        3
    };
    let fields = sizes.min((data.len().min(16) / 4).saturating_sub(1));
    if fields == 0 {
        return "header too short to edit".into();
    }
    let field = rng.random_range(0..fields);
    let v = match rng.random_range(0..3) {
        0 => mutate::interesting(rng) as u32,
        1 => 1_000_000_000,
        _ => rng.random(),
    };
    let at = 4 + 4 * field;
    data[at..at + 4].copy_from_slice(&v.to_be_bytes());
    format!("header field {field} = {v}")
}

/// MNIST IDX images and labels, raw and gzip, as a directory or as the images file.
fn fuzz_idx(gz: bool) -> harness::Report {
    let images = small_idx("train-images-idx3-ubyte.gz", 16, 28 * 28);
    let labels = small_idx("train-labels-idx1-ubyte.gz", 8, 1);
    // Appended to a gzip file, a member of 300 MiB of zeros: an IDX file whose header says 8
    // digits must not be decompressed past them.
    let zeros = gz.then(zeros_member);
    let dir = tempfile::tempdir().expect("temp dir");
    let suffix = if gz { ".gz" } else { "" };
    let images_path = dir.path().join(format!("train-images-idx3-ubyte{suffix}"));
    let labels_path = dir.path().join(format!("train-labels-idx1-ubyte{suffix}"));
    Fuzz {
        name: if gz { "mnist-idx-gz" } else { "mnist-idx-raw" },
        slot: usize::from(gz),
        cases: if gz { 4000 } else { 10000 },
    }
    .run(|rng| {
        let mut files = [images.clone(), labels.clone()];
        // Which file the mutation hits (sometimes both), and how.
        let targets: &[usize] = match rng.random_range(0..5) {
            0..=2 => &[0],
            3 => &[1],
            _ => &[0, 1],
        };
        let mut what = Vec::new();
        for &t in targets {
            let donor = files[1 - t].clone();
            let file = &mut files[t];
            what.push(match rng.random_range(0..10) {
                0..=2 => idx_header(rng, file),
                _ => mutate::bytes(rng, file, &donor),
            });
        }
        if let Some(zeros) = &zeros {
            if rng.random_bool(0.1) {
                // Valid files, but the images go on past what their header declares: the
                // loader must stop reading there. (Past a header that declares as much, the
                // data is the dataset's, and its size what the user asked for.)
                files = [gzip(&images), gzip(&labels)];
                files[0].extend_from_slice(zeros);
                what = vec!["300 MiB of zeros appended in a gzip member".into()];
            } else {
                for (t, file) in files.iter_mut().enumerate() {
                    *file = gzip(file);
                    if rng.random_bool(0.3) {
                        // The compressed stream itself corrupted.
                        what.push(format!("gz {t}: {}", mutate::bytes(rng, file, zeros)));
                    }
                }
            }
        }
        write(&images_path, &files[0]);
        write(&labels_path, &files[1]);
        let source = if rng.random_bool(0.5) {
            dir.path().to_path_buf()
        } else {
            images_path.clone()
        };
        let (channels, size) = *[(1, 28), (1, 8), (3, 16)].choose(rng).unwrap_or(&(1, 28));
        let result = Dataset::load(&DataSource::Path(source), channels, size);
        // The error must name whichever of the two files it is about.
        let path = match &result {
            Err(e) if e.to_string().contains(&*labels_path.to_string_lossy()) => &labels_path,
            _ => &images_path,
        };
        (what.join("; "), outcome(result, path))
    })
}

#[test]
fn mnist_idx_raw() {
    fuzz_idx(false).assert_clean();
}

#[test]
fn mnist_idx_gz() {
    fuzz_idx(true).assert_clean();
}

/// CRC-32 of a PNG chunk's type and data, so that an edited header still passes its check and
/// the decoder gets as far as believing the sizes.
fn png_crc(bytes: &[u8]) -> u32 {
    let mut crc = flate2::Crc::new();
    crc.update(bytes);
    crc.sum()
}

/// Sets a PNG's width or height (IHDR) or a JPEG's (SOF) to a boundary value.
fn image_dimensions(rng: &mut ChaCha8Rng, data: &mut [u8]) -> String {
    let v = match rng.random_range(0..3) {
        0 => mutate::interesting(rng),
        1 => 1 << rng.random_range(10..31),
        _ => rng.random_range(0..=65535),
    };
    if data.starts_with(b"\x89PNG") && data.len() >= 33 {
        // Signature (8), length (4), "IHDR" (4), width (4), height (4), ..., CRC at 29.
        let at = if rng.random_bool(0.5) { 16 } else { 20 };
        data[at..at + 4].copy_from_slice(&(v as u32).to_be_bytes());
        let crc = png_crc(&data[12..29]);
        data[29..33].copy_from_slice(&crc.to_be_bytes());
        return format!(
            "PNG {} = {}",
            if at == 16 { "width" } else { "height" },
            v as u32
        );
    }
    // JPEG: the start-of-frame marker (FFC0..FFC2) holds height then width after 3 bytes.
    let sof = data
        .windows(2)
        .position(|w| w[0] == 0xff && (0xc0..=0xc2).contains(&w[1]));
    match sof {
        Some(at) if at + 9 <= data.len() => {
            let field = at + if rng.random_bool(0.5) { 5 } else { 7 };
            data[field..field + 2].copy_from_slice(&(v as u16).to_be_bytes());
            format!("JPEG SOF dimension at {field} = {}", v as u16)
        }
        _ => "no dimensions to edit".into(),
    }
}

/// Folders of PNG and JPEG pictures: each case one mutated picture of the fixtures, sometimes
/// beside a valid one.
#[test]
fn image_folders() {
    let sources: Vec<(String, Vec<u8>)> = ["circles", "squares"]
        .iter()
        .flat_map(|class| {
            let dir = fixture(&format!("images-small/{class}"));
            let mut names: Vec<PathBuf> = std::fs::read_dir(&dir)
                .expect("fixture folder")
                .map(|e| e.expect("fixture entry").path())
                .collect();
            names.sort();
            names
        })
        .map(|p| {
            let ext = p
                .extension()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned();
            (ext, read(&p))
        })
        .collect();
    let root = tempfile::tempdir().expect("temp dir");
    let dir = root.path().to_path_buf();
    let class = dir.join("class");
    std::fs::create_dir(&class).expect("class folder");
    Fuzz {
        name: "image-folder",
        slot: 2,
        cases: 5000,
    }
    .run(|rng| {
        // The pictures of the case before go, so that they do not pile up.
        for entry in std::fs::read_dir(&class).expect("class folder") {
            let _ = std::fs::remove_file(entry.expect("class entry").path());
        }
        let (ext, base) = sources.choose(rng).expect("fixtures");
        let (_, donor) = sources.choose(rng).expect("fixtures");
        let mut data = base.clone();
        let what = match rng.random_range(0..4) {
            0 => image_dimensions(rng, &mut data),
            _ => mutate::bytes(rng, &mut data, donor),
        };
        // The extension says one format while the bytes may be the other.
        let ext = if rng.random_bool(0.1) {
            "png"
        } else {
            ext.as_str()
        };
        let path = class.join(format!("mutated.{ext}"));
        write(&path, &data);
        if rng.random_bool(0.3) {
            let (ext, valid) = sources.choose(rng).expect("fixtures");
            write(&class.join(format!("valid.{ext}")), valid);
        }
        let (channels, size) = *[(1, 8), (3, 16), (1, 28)].choose(rng).unwrap_or(&(1, 8));
        let result = Dataset::load(&DataSource::Path(dir.clone()), channels, size);
        (what, outcome(result, &path))
    })
    .assert_clean();
}
