//! A directory of .png/.jpg pictures; its first-level sub-folders name the classes.

use super::{convert_all, write_chw, Dataset, Shape, UNLABELLED};
use crate::{Error, Result};
use std::path::{Path, PathBuf};

/// Deeper than this is taken for a symbolic-link loop rather than a real layout.
const MAX_DEPTH: usize = 64;

/// Loads every picture under `root`, recursively.
///
/// Classes are the first-level sub-folders that hold pictures, sorted by name; pictures
/// directly in `root` form class 0 (the only class when there are no sub-folders). Names
/// starting with a dot are skipped, as they are system files (.DS_Store, macOS `._x.jpg`
/// resource forks, .git) rather than data.
pub(super) fn load(root: &Path, shape: Shape) -> Result<Dataset> {
    let mut root_files = Vec::new();
    let mut classes: Vec<(String, Vec<PathBuf>)> = Vec::new();
    for (path, is_dir) in sorted_entries(root)? {
        if is_dir {
            let mut files = Vec::new();
            collect_images(&path, 1, &mut files)?;
            if !files.is_empty() {
                let name = path
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                classes.push((name, files));
            }
        } else if is_image(&path) {
            root_files.push(path);
        }
    }
    if !root_files.is_empty() {
        classes.insert(0, (UNLABELLED.to_string(), root_files));
    }

    let files: Vec<(PathBuf, u32)> = (0u32..)
        .zip(&classes)
        .flat_map(|(id, (_, files))| files.iter().map(move |f| (f.clone(), id)))
        .collect();
    if files.is_empty() {
        return Err(Error::Dataset {
            path: root.to_path_buf(),
            msg: format!("no .png/.jpg images found under {}", root.display()),
        });
    }

    let pixels = convert_all(&files, shape, root, |(path, _), out| {
        write_chw(&decode(path)?, shape, out);
        Ok(())
    })?;

    Ok(Dataset {
        pixels,
        labels: files.iter().map(|&(_, id)| id).collect(),
        class_names: classes.into_iter().map(|(name, _)| name).collect(),
        channels: shape.channels,
        size: shape.size,
        origin: format!("image folder {}", root.display()),
    })
}

/// Decoded bytes a picture may hold per byte of its file. Neither format gets near it (deflate
/// peaks at 1032:1; a JPEG spends at least one bit per 8x8 block and component), so a header
/// declaring more is corrupt, and its buffer is refused before it is allocated.
const MAX_EXPANSION: u64 = 4096;
/// What any picture may take, however small its file.
const MIN_ALLOC: u64 = 16 << 20;

fn decode(path: &Path) -> Result<image::DynamicImage> {
    let len = std::fs::metadata(path)
        .map_err(|e| Error::io(path, e))?
        .len();
    let mut reader = image::ImageReader::open(path)
        .map_err(|e| Error::io(path, e))?
        // Trust the bytes over the extension: a .png that is really a JPEG still loads.
        .with_guessed_format()
        .map_err(|e| Error::io(path, e))?;
    let mut limits = image::Limits::default();
    limits.max_alloc = Some(len.saturating_mul(MAX_EXPANSION).max(MIN_ALLOC));
    reader.limits(limits);
    reader.decode().map_err(|e| Error::Image {
        path: path.to_path_buf(),
        msg: match e {
            image::ImageError::Limits(_) => format!(
                "cannot decode image: its header declares a picture larger than a {len}-byte file can hold"
            ),
            e => format!("cannot decode image: {e}"),
        },
    })
}

/// Appends the pictures under `dir`, recursively, in sorted order.
fn collect_images(dir: &Path, depth: usize, out: &mut Vec<PathBuf>) -> Result<()> {
    if depth > MAX_DEPTH {
        return Err(Error::Dataset {
            path: dir.to_path_buf(),
            msg: format!("nested more than {MAX_DEPTH} folders deep (a symbolic-link loop?)"),
        });
    }
    for (path, is_dir) in sorted_entries(dir)? {
        if is_dir {
            collect_images(&path, depth + 1, out)?;
        } else if is_image(&path) {
            out.push(path);
        }
    }
    Ok(())
}

/// The non-hidden entries of `dir` sorted by name, each with whether it is a directory
/// (following symbolic links, so a linked-in folder of pictures counts).
fn sorted_entries(dir: &Path) -> Result<Vec<(PathBuf, bool)>> {
    let mut entries = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let path = entry.map_err(|e| Error::io(dir, e))?.path();
        let hidden = path
            .file_name()
            .is_some_and(|n| n.as_encoded_bytes().starts_with(b"."));
        if !hidden {
            let is_dir = std::fs::metadata(&path)
                .map_err(|e| Error::io(&path, e))?
                .is_dir();
            entries.push((path, is_dir));
        }
    }
    entries.sort();
    Ok(entries)
}

fn is_image(path: &Path) -> bool {
    path.extension().and_then(|e| e.to_str()).is_some_and(|e| {
        ["png", "jpg", "jpeg"]
            .iter()
            .any(|x| e.eq_ignore_ascii_case(x))
    })
}

#[cfg(test)]
mod tests {
    use super::super::tests::fixture;
    use super::super::DataSource;
    use super::*;

    fn load_small(channels: usize, size: usize) -> Dataset {
        Dataset::load(&DataSource::Path(fixture("images-small")), channels, size).unwrap()
    }

    #[test]
    fn two_classes_gray_and_rgb() {
        for (channels, size) in [(1, 16), (3, 32)] {
            let ds = load_small(channels, size);
            assert_eq!(ds.len(), 7);
            assert_eq!((ds.channels(), ds.size()), (channels, size));
            assert_eq!(ds.class_names(), &["circles", "squares"]);
            assert_eq!(ds.num_classes(), 2);
            assert_eq!(ds.labels(), &[0, 0, 0, 1, 1, 1, 1]);
            let mut batch = Vec::new();
            ds.fill_batch(&(0..7).collect::<Vec<_>>(), &mut batch);
            assert_eq!(batch.len(), 7 * channels * size * size);
            assert!(batch.iter().all(|v| (-1.0..=1.0).contains(v)));
            let described = ds.describe();
            assert!(described.contains("7 images"), "{described}");
            assert!(described.contains("circles, squares"), "{described}");
        }
    }

    #[test]
    fn colours_land_in_the_right_planes() {
        let ds = load_small(3, 16);
        // squares/ sorted: alpha.png, gray-wide.jpg, green.png, white.jpeg.
        let green = ds.image(5);
        let plane = 16 * 16;
        let center = 8 * 16 + 8;
        let (r, g, b) = (
            green[center],
            green[plane + center],
            green[2 * plane + center],
        );
        assert!(g > 140 && r < 60 && b < 60, "rgb = {r},{g},{b}");

        // A grayscale picture becomes three equal planes.
        let gray = ds.image(0);
        assert_eq!(&gray[..plane], &gray[plane..2 * plane]);
        assert_eq!(&gray[..plane], &gray[2 * plane..]);
    }

    /// Found by fuzzing: a 105-byte PNG whose header claimed a picture of 2^30 pixels had
    /// image's default 512 MiB buffer allocated before the decoder found the data missing.
    #[test]
    fn a_header_declaring_more_pixels_than_the_file_holds_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut png = std::fs::read(fixture("images-small/squares/alpha.png")).unwrap();
        // IHDR: width at 16, height at 20, CRC of type and data at 29.
        png[16..20].copy_from_slice(&8000u32.to_be_bytes());
        png[20..24].copy_from_slice(&8000u32.to_be_bytes());
        let crc = {
            let mut crc = flate2::Crc::new();
            crc.update(&png[12..29]);
            crc.sum()
        };
        png[29..33].copy_from_slice(&crc.to_be_bytes());
        let path = dir.path().join("huge.png");
        std::fs::write(&path, &png).unwrap();
        let err = Dataset::load(&DataSource::Path(dir.path().to_path_buf()), 1, 8)
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with(&path.display().to_string())
                && err.contains(&format!(
                    "declares a picture larger than a {}-byte file can hold",
                    png.len()
                )),
            "{err}"
        );
    }

    #[test]
    fn root_pictures_form_one_class() {
        let dir = tempfile::tempdir().unwrap();
        for (name, side) in [("b.PNG", 10), ("a.jpeg", 20)] {
            let img = image::RgbImage::from_pixel(side, side / 2 + 1, image::Rgb([9, 99, 199]));
            let format = if name.ends_with("PNG") {
                image::ImageFormat::Png
            } else {
                image::ImageFormat::Jpeg
            };
            img.save_with_format(dir.path().join(name), format).unwrap();
        }
        std::fs::write(dir.path().join("notes.txt"), "not a picture").unwrap();
        std::fs::create_dir(dir.path().join("empty")).unwrap();
        let ds = Dataset::load(&DataSource::Path(dir.path().to_path_buf()), 1, 4).unwrap();
        assert_eq!(ds.len(), 2);
        assert_eq!(ds.num_classes(), 1);
        assert_eq!(ds.labels(), &[0, 0]);
        assert!(ds.describe().contains("unlabelled"), "{}", ds.describe());
    }
}
