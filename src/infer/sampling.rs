//! What sagan-infer samples and writes, one batch at a time: latents are drawn and images
//! written batch by batch, so memory is bounded by the batch (plus the grid's images), whatever
//! the count.

use super::latent::{interpolate, Interpolation, LatentStream};
use super::{Generated, InferError, InferResult};
use crate::image_io::{self, ImageBatch};
use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The most images a grid shows: beyond it a grid is a poster nobody looks at whole, and
/// holding them would make memory grow with the count.
pub const GRID_LIMIT: usize = 1024;
/// Images given attention overlays.
const ATTENTION_SHOWN: usize = 8;

/// Which images to generate.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Plan {
    /// `count` samples of consecutive latents, `columns` per grid row.
    Samples { count: usize, columns: usize },
    /// A walk through the latents of `keyframes` consecutive seeds, `steps` images per segment
    /// (one grid row each).
    Interpolation {
        keyframes: usize,
        steps: usize,
        mode: Interpolation,
    },
}

impl Plan {
    pub fn images(&self) -> usize {
        match *self {
            Plan::Samples { count, .. } => count,
            Plan::Interpolation {
                keyframes, steps, ..
            } => (keyframes - 1) * steps,
        }
    }

    pub fn columns(&self) -> usize {
        match *self {
            Plan::Samples { columns, .. } => columns,
            Plan::Interpolation { steps, .. } => steps,
        }
    }

    /// The file name stem of the outputs for `seed`.
    pub fn stem(&self, seed: u64) -> String {
        match self {
            Plan::Samples { .. } => format!("seed{seed}"),
            Plan::Interpolation { .. } => format!("interp-seed{seed}"),
        }
    }

    /// The class of image `i` when rows take `classes` in turn (all classes when empty).
    pub fn class_of(&self, i: usize, classes: &[i64], num_classes: usize) -> i64 {
        let row = i / self.columns();
        match classes {
            [] => (row % num_classes.max(1)) as i64,
            list => list[row % list.len()],
        }
    }
}

/// The plan's latents, batch after batch.
pub struct Latents {
    plan: Plan,
    seed: u64,
    z_dim: usize,
    truncation: Option<f32>,
    samples: LatentStream,
    /// Interpolation: latents of the segments computed but not yet taken, and the next segment.
    pending: VecDeque<f32>,
    segment: usize,
}

impl Latents {
    pub fn new(plan: Plan, seed: u64, z_dim: usize, truncation: Option<f32>) -> InferResult<Self> {
        Ok(Self {
            plan,
            seed,
            z_dim,
            truncation,
            samples: LatentStream::new(seed, z_dim, truncation)?,
            pending: VecDeque::new(),
            segment: 0,
        })
    }

    fn keyframe(&self, k: usize) -> InferResult<Vec<f32>> {
        let seed = self.seed.wrapping_add(k as u64);
        Ok(LatentStream::new(seed, self.z_dim, self.truncation)?.take(1))
    }

    /// The next `n` latents, row-major `[n, z_dim]`.
    pub fn take(&mut self, n: usize) -> InferResult<Vec<f32>> {
        let Plan::Interpolation { steps, mode, .. } = self.plan else {
            return Ok(self.samples.take(n));
        };
        while self.pending.len() < n * self.z_dim {
            let (a, b) = (
                self.keyframe(self.segment)?,
                self.keyframe(self.segment + 1)?,
            );
            self.pending.extend(interpolate(&a, &b, steps, mode));
            self.segment += 1;
        }
        Ok(self.pending.drain(..n * self.z_dim).collect())
    }
}

/// What [`SampleWriter::finish`] wrote.
#[derive(Debug, Default)]
pub struct Written {
    /// One line per output, for the user.
    pub lines: Vec<String>,
    /// When the first PNG was on disk.
    pub first_png: Option<Duration>,
}

/// Where and what to write.
#[derive(Debug, Clone)]
pub struct Outputs {
    pub dir: PathBuf,
    pub stem: String,
    pub columns: usize,
    pub grid: bool,
    pub png_each: bool,
    pub attention: bool,
}

/// Writes each batch as it comes (one PNG per image) and keeps only what the grid and the
/// attention overlays need.
pub struct SampleWriter {
    outputs: Outputs,
    started: Instant,
    written: usize,
    kept: Option<Generated>,
    first_png: Option<Duration>,
}

impl SampleWriter {
    pub fn new(outputs: Outputs, started: Instant) -> Self {
        Self {
            outputs,
            started,
            written: 0,
            kept: None,
            first_png: None,
        }
    }

    fn image_path(&self, i: usize) -> PathBuf {
        self.outputs
            .dir
            .join(format!("{}-{i:04}.png", self.outputs.stem))
    }

    fn keep_limit(&self) -> usize {
        match (self.outputs.grid, self.outputs.attention) {
            (true, _) => GRID_LIMIT,
            (false, true) => ATTENTION_SHOWN,
            (false, false) => 0,
        }
    }

    pub fn push(&mut self, batch: Generated) -> crate::Result<()> {
        let (c, h, w) = (batch.channels, batch.height, batch.width);
        if self.outputs.png_each {
            let images = ImageBatch::new(&batch.images, batch.n, c, h, w)?;
            for i in 0..batch.n {
                image_io::save_png(&self.image_path(self.written + i), &images.image(i))?;
                self.first_png.get_or_insert_with(|| self.started.elapsed());
            }
        }
        self.written += batch.n;
        let kept = self.kept.as_ref().map_or(0, |k| k.n);
        let room = self.keep_limit().saturating_sub(kept).min(batch.n);
        if room > 0 {
            let head = first(batch, room);
            match &mut self.kept {
                None => self.kept = Some(head),
                Some(kept) => kept.append(head),
            }
        }
        Ok(())
    }

    /// Writes the grid and the attention overlays.
    pub fn finish(mut self) -> crate::Result<Written> {
        let n = self.written;
        let mut lines = Vec::new();
        if self.outputs.png_each && n > 0 {
            lines.push(format!(
                "wrote {n} images: {} ... {}",
                self.image_path(0).display(),
                self.image_path(n - 1).display()
            ));
        }
        let Some(kept) = self.kept.take() else {
            return Ok(Written {
                lines,
                first_png: self.first_png,
            });
        };
        let (c, h, w) = (kept.channels, kept.height, kept.width);
        let stem = &self.outputs.stem;
        if self.outputs.grid {
            let path = self.outputs.dir.join(format!("{stem}-grid.png"));
            let images = ImageBatch::new(&kept.images, kept.n, c, h, w)?;
            image_io::save_grid(&path, images, self.outputs.columns)?;
            self.first_png.get_or_insert_with(|| self.started.elapsed());
            let shown = match kept.n < n {
                true => format!("the first {} of {n} images", kept.n),
                false => format!("{n} images"),
            };
            lines.push(format!(
                "wrote {} ({shown} of {h}x{w}, {} per row)",
                path.display(),
                self.outputs.columns.min(kept.n)
            ));
        }
        if self.outputs.attention {
            let shown = kept.n.min(ATTENTION_SHOWN);
            let subset = ImageBatch::new(&kept.images[..shown * c * h * w], shown, c, h, w)?;
            for (k, maps) in kept.attention.iter().enumerate() {
                let (side, _) = maps.grid.queries;
                let queries = image_io::default_queries(side, side, 4);
                let overlay = image_io::attention_overlay(
                    subset,
                    &maps.maps[..shown * maps.per_image()],
                    maps.grid,
                    &queries,
                )?;
                let path = self.outputs.dir.join(format!("{stem}-attention{k}.png"));
                image_io::save_png(&path, &overlay)?;
                self.first_png.get_or_insert_with(|| self.started.elapsed());
                lines.push(format!(
                    "wrote {} ({}: {side}x{side} map, {} queries, first {shown} images)",
                    path.display(),
                    maps.name,
                    queries.len()
                ));
            }
        }
        Ok(Written {
            lines,
            first_png: self.first_png,
        })
    }
}

/// The first `k` images of a batch, with their attention maps.
fn first(mut batch: Generated, k: usize) -> Generated {
    let plane = batch.channels * batch.height * batch.width;
    batch.images.truncate(k * plane);
    for maps in &mut batch.attention {
        let per_image = maps.per_image();
        maps.maps.truncate(k * per_image);
    }
    batch.n = k;
    batch
}

/// Creates `dir` and checks that files can be written in it, before any work.
pub fn prepare_out_dir(dir: &Path) -> InferResult<()> {
    let not_writable = |e: std::io::Error| {
        InferError::Invalid(format!(
            "{}: output folder is not writable: {e}",
            dir.display()
        ))
    };
    std::fs::create_dir_all(dir).map_err(not_writable)?;
    let probe = dir.join(format!(".sagan-infer-probe{}", std::process::id()));
    std::fs::write(&probe, b"").map_err(not_writable)?;
    std::fs::remove_file(&probe).map_err(not_writable)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::infer::latents;

    #[test]
    fn interpolation_latents_taken_in_batches_match_the_whole_walk() {
        let plan = Plan::Interpolation {
            keyframes: 4,
            steps: 5,
            mode: Interpolation::Spherical,
        };
        let z_dim = 8;
        let keys: Vec<Vec<f32>> = (0..4).map(|k| latents(10 + k, 1, z_dim)).collect();
        let whole: Vec<f32> = keys
            .windows(2)
            .flat_map(|p| interpolate(&p[0], &p[1], 5, Interpolation::Spherical))
            .collect();
        let mut stream = Latents::new(plan, 10, z_dim, None).unwrap();
        let batched: Vec<f32> = [4, 4, 4, 3]
            .iter()
            .flat_map(|&n| stream.take(n).unwrap())
            .collect();
        assert_eq!(batched, whole);
    }
}
