//! Pictures for people: sample grids, attention-map overlays and training curves, written as
//! PNG. Everything works on plain `f32` slices so the inference binary can use it without candle,
//! and text comes from a built-in bitmap font because the machines this runs on have no fonts.

use crate::{fsutil, Error, Result};
use image::{Rgb, RgbImage};
use std::path::{Path, PathBuf};

/// Gap between tiles, in pixels, and the colour that shows through it.
const GAP: u32 = 2;
const GAP_COLOR: Rgb<u8> = Rgb([32, 32, 32]);
/// Tiles smaller than this are upscaled in sample grids, so 28x28 samples aren't postage stamps.
const GRID_MIN_SIDE: usize = 64;
/// Attention tiles are larger than grid tiles: the query markers and heat maps need room.
const OVERLAY_MIN_SIDE: usize = 128;
/// Largest accepted image side; keeps every derived pixel dimension well inside `u32`.
const MAX_SIDE: usize = 1 << 14;

/// A borrowed batch of images, NCHW f32 in [-1, 1] (values outside are clamped), C = 1 or 3.
#[derive(Clone, Copy, Debug)]
pub struct ImageBatch<'a> {
    pub data: &'a [f32],
    pub n: usize,
    pub c: usize,
    pub h: usize,
    pub w: usize,
}

/// Errors about in-memory data have no file to name, so they say what the data was instead.
fn data_error(what: &str, msg: impl Into<String>) -> Error {
    Error::Image {
        path: PathBuf::from(format!("<{what}>")),
        msg: msg.into(),
    }
}

impl<'a> ImageBatch<'a> {
    /// Checks that the shape is one we can draw and that `data` holds exactly `n*c*h*w` values.
    pub fn new(data: &'a [f32], n: usize, c: usize, h: usize, w: usize) -> Result<Self> {
        let err = |msg: String| data_error("image batch", msg);
        if c != 1 && c != 3 {
            return Err(err(format!("expected 1 or 3 channels, got {c}")));
        }
        if n == 0 || h == 0 || w == 0 || h > MAX_SIDE || w > MAX_SIDE {
            return Err(err(format!(
                "invalid batch shape {n}x{c}x{h}x{w} (sides must be 1..={MAX_SIDE})"
            )));
        }
        let expected = n * c * h * w;
        if data.len() != expected {
            return Err(err(format!(
                "shape {n}x{c}x{h}x{w} needs {expected} values, got {}",
                data.len()
            )));
        }
        Ok(Self { data, n, c, h, w })
    }

    /// Image `i` of the batch as 8-bit RGB; greyscale is replicated to the three channels.
    ///
    /// Panics if `i >= n`, like slice indexing.
    pub fn image(&self, i: usize) -> RgbImage {
        let plane = self.h * self.w;
        let pixels = &self.data[i * self.c * plane..(i + 1) * self.c * plane];
        RgbImage::from_fn(self.w as u32, self.h as u32, |x, y| {
            let p = y as usize * self.w + x as usize;
            if self.c == 1 {
                let v = to_u8(pixels[p]);
                Rgb([v, v, v])
            } else {
                Rgb([
                    to_u8(pixels[p]),
                    to_u8(pixels[plane + p]),
                    to_u8(pixels[2 * plane + p]),
                ])
            }
        })
    }
}

/// Maps [-1, 1] to [0, 255]; NaN becomes black rather than poisoning the picture.
fn to_u8(v: f32) -> u8 {
    if v.is_nan() {
        return 0;
    }
    ((v.clamp(-1.0, 1.0) + 1.0) * 127.5).round() as u8
}

/// The smallest integer factor that makes the longer side at least `min_side` pixels.
fn upscale_factor(h: usize, w: usize, min_side: usize) -> u32 {
    min_side.div_ceil(h.max(w).max(1)).max(1) as u32
}

fn upscale_nearest(img: &RgbImage, scale: u32) -> RgbImage {
    RgbImage::from_fn(img.width() * scale, img.height() * scale, |x, y| {
        *img.get_pixel(x / scale, y / scale)
    })
}

/// Lays out equally sized tiles row by row with a `GAP` border around and between them.
fn compose(rows: &[Vec<RgbImage>], tile_w: u32, tile_h: u32) -> RgbImage {
    let ncols = rows.iter().map(Vec::len).max().unwrap_or(0) as u32;
    let width = ncols * (tile_w + GAP) + GAP;
    let height = rows.len() as u32 * (tile_h + GAP) + GAP;
    let mut canvas = RgbImage::from_pixel(width, height, GAP_COLOR);
    for (r, row) in rows.iter().enumerate() {
        for (c, tile) in row.iter().enumerate() {
            let x = GAP + c as u32 * (tile_w + GAP);
            let y = GAP + r as u32 * (tile_h + GAP);
            image::imageops::replace(&mut canvas, tile, x.into(), y.into());
        }
    }
    canvas
}

/// Tiles the batch into a grid with `ncols` columns and a 2px gap; tiny images (< 64 px) are
/// integer-upscaled (nearest) so the grid is pleasant to look at.
pub fn grid_image(batch: ImageBatch, ncols: usize) -> RgbImage {
    let ncols = ncols.clamp(1, batch.n);
    let scale = upscale_factor(batch.h, batch.w, GRID_MIN_SIDE);
    let tiles: Vec<RgbImage> = (0..batch.n)
        .map(|i| upscale_nearest(&batch.image(i), scale))
        .collect();
    let rows: Vec<Vec<RgbImage>> = tiles.chunks(ncols).map(<[RgbImage]>::to_vec).collect();
    compose(&rows, batch.w as u32 * scale, batch.h as u32 * scale)
}

/// `img` encoded as PNG, in memory; errors name `path`, the file it is meant for.
pub fn encode_png(path: &Path, img: &RgbImage) -> Result<Vec<u8>> {
    let mut bytes = std::io::Cursor::new(Vec::new());
    img.write_to(&mut bytes, image::ImageFormat::Png)
        .map_err(|e| Error::Image {
            path: path.to_path_buf(),
            msg: format!("encoding PNG: {e}"),
        })?;
    Ok(bytes.into_inner())
}

/// Writes any RgbImage as PNG atomically. The image is encoded in memory first, so an encoding
/// failure never touches the disk; errors name `path`, not the temporary file.
pub fn save_png(path: &Path, img: &RgbImage) -> Result<()> {
    let bytes = encode_png(path, img)?;
    fsutil::write_atomic_with(path, |tmp| {
        std::fs::write(tmp, &bytes).map_err(|e| Error::io(path, e))
    })
}

/// Writes `grid_image(batch, ncols)` as PNG, atomically.
pub fn save_grid(path: &Path, batch: ImageBatch, ncols: usize) -> Result<()> {
    save_png(path, &grid_image(batch, ncols))
}

// ---------------------------------------------------------------------------------------------
// Attention maps

/// Marker colours for query points: saturated hues that stay distinct from each other and from
/// the inferno heat colours (black-purple-orange-yellow) they are drawn on.
const QUERY_COLORS: [Rgb<u8>; 6] = [
    Rgb([0, 220, 255]),
    Rgb([60, 255, 60]),
    Rgb([255, 60, 255]),
    Rgb([90, 130, 255]),
    Rgb([255, 40, 40]),
    Rgb([0, 140, 90]),
];
/// How strongly the heat map covers the greyscale image (1 hides the image).
const HEAT_ALPHA: f32 = 0.65;

/// Matplotlib's inferno at eleven evenly spaced points: perceptually uniform and readable in
/// greyscale, so "hotter" always looks brighter.
const INFERNO: [[u8; 3]; 11] = [
    [0, 0, 4],
    [22, 11, 57],
    [66, 10, 104],
    [106, 23, 110],
    [147, 38, 103],
    [188, 55, 84],
    [221, 81, 58],
    [243, 120, 25],
    [252, 165, 10],
    [246, 215, 70],
    [252, 255, 164],
];

/// Inferno colour for `t` in [0, 1], linearly interpolated between the table entries.
fn inferno(t: f32) -> [f32; 3] {
    let pos = t.clamp(0.0, 1.0) * (INFERNO.len() - 1) as f32;
    let i = (pos.floor() as usize).min(INFERNO.len() - 2);
    let f = pos - i as f32;
    let (a, b) = (INFERNO[i], INFERNO[i + 1]);
    [0, 1, 2].map(|k| a[k] as f32 * (1.0 - f) + b[k] as f32 * f)
}

/// Rescales a map to [0, 1] by its own min and max; a flat map (or one with no finite value)
/// becomes all zeros rather than dividing by zero.
fn normalise(map: &[f32]) -> Vec<f32> {
    let finite = map.iter().copied().filter(|v| v.is_finite());
    let (lo, hi) = finite.fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), v| {
        (lo.min(v), hi.max(v))
    });
    let span = hi - lo;
    map.iter()
        .map(|&v| {
            if v.is_finite() && span > 0.0 {
                (v - lo) / span
            } else {
                0.0
            }
        })
        .collect()
}

/// Samples a `map_h` x `map_w` map at output pixel (x, y) of a `tw` x `th` tile, bilinearly,
/// with pixel centres aligned (like `align_corners = false`).
fn bilinear(map: &[f32], map_h: usize, map_w: usize, tw: u32, th: u32, x: u32, y: u32) -> f32 {
    let src = |p: u32, out: u32, len: usize| {
        let s = (p as f32 + 0.5) * len as f32 / out as f32 - 0.5;
        let s = s.clamp(0.0, (len - 1) as f32);
        let i0 = s.floor() as usize;
        (i0, (i0 + 1).min(len - 1), s - i0 as f32)
    };
    let (x0, x1, fx) = src(x, tw, map_w);
    let (y0, y1, fy) = src(y, th, map_h);
    let at = |yy: usize, xx: usize| map[yy * map_w + xx];
    let top = at(y0, x0) * (1.0 - fx) + at(y0, x1) * fx;
    let bottom = at(y1, x0) * (1.0 - fx) + at(y1, x1) * fx;
    top * (1.0 - fy) + bottom * fy
}

/// Centre of map cell (qy, qx) in tile pixels.
fn query_centre(q: (usize, usize), map_h: usize, map_w: usize, tw: u32, th: u32) -> (i64, i64) {
    let cx = (q.1 as f32 + 0.5) * tw as f32 / map_w as f32;
    let cy = (q.0 as f32 + 0.5) * th as f32 / map_h as f32;
    (cx as i64, cy as i64)
}

/// A filled square ringed in black then white, visible on both dark and bright backgrounds.
fn draw_marker(img: &mut RgbImage, (cx, cy): (i64, i64), radius: i64, color: Rgb<u8>) {
    let side = 2 * radius + 1;
    let white = Rgb([255, 255, 255]);
    fill_rect(
        img,
        cx - radius - 2,
        cy - radius - 2,
        side + 4,
        side + 4,
        white,
    );
    fill_rect(
        img,
        cx - radius - 1,
        cy - radius - 1,
        side + 2,
        side + 2,
        Rgb([0, 0, 0]),
    );
    fill_rect(img, cx - radius, cy - radius, side, side, color);
}

/// Where an attention map's queries and keys lie: (height, width) grids over the image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MapGrid {
    pub queries: (usize, usize),
    pub keys: (usize, usize),
}

impl MapGrid {
    /// The grids of a map over a square image with `queries` query and `keys` key positions
    /// (fewer keys than queries when keys were pooled).
    pub fn square(queries: usize, keys: usize) -> Self {
        let side = |n: usize| (n as f64).sqrt().round() as usize;
        Self {
            queries: (side(queries), side(queries)),
            keys: (side(keys), side(keys)),
        }
    }
}

/// Attention maps of a self-attention layer: `maps` is [n, Nq, Nk] row-major over the grids of
/// `grid`; row q (the query position q = y*width + x) is a softmax over the key positions.
///
/// The picture has one row per image: the image with the query points marked (a distinct colour
/// per query), then for each query its attention heat map (upsampled bilinearly to the image
/// size, inferno colours, normalised per map so even diffuse attention shows its shape) blended
/// over the greyscale image, with that query point marked. `queries` are (y, x) in query-grid
/// coordinates.
pub fn attention_overlay(
    images: ImageBatch,
    maps: &[f32],
    grid: MapGrid,
    queries: &[(usize, usize)],
) -> Result<RgbImage> {
    let err = |msg: String| data_error("attention maps", msg);
    let ((map_h, map_w), (key_h, key_w)) = (grid.queries, grid.keys);
    let (n_pos, n_keys) = (map_h * map_w, key_h * key_w);
    if n_pos == 0 || n_keys == 0 {
        return Err(err(format!("empty attention map {grid:?}")));
    }
    let expected = images.n * n_pos * n_keys;
    if maps.len() != expected {
        return Err(err(format!(
            "{} images with {map_h}x{map_w} queries over {key_h}x{key_w} keys need {expected} values, got {}",
            images.n,
            maps.len()
        )));
    }
    if let Some(q) = queries.iter().find(|q| q.0 >= map_h || q.1 >= map_w) {
        return Err(err(format!(
            "query {q:?} is outside the {map_h}x{map_w} map"
        )));
    }

    let scale = upscale_factor(images.h, images.w, OVERLAY_MIN_SIDE);
    let (tw, th) = (images.w as u32 * scale, images.h as u32 * scale);
    let radius = i64::from(tw.min(th) / 48).clamp(2, 6);
    let rows = (0..images.n)
        .map(|i| {
            let image = upscale_nearest(&images.image(i), scale);
            let mut marked = image.clone();
            for (k, &q) in queries.iter().enumerate() {
                let centre = query_centre(q, map_h, map_w, tw, th);
                draw_marker(
                    &mut marked,
                    centre,
                    radius,
                    QUERY_COLORS[k % QUERY_COLORS.len()],
                );
            }
            let mut row = vec![marked];
            for (k, &q) in queries.iter().enumerate() {
                let start = (i * n_pos + q.0 * map_w + q.1) * n_keys;
                let heat = normalise(&maps[start..start + n_keys]);
                let mut tile = RgbImage::from_fn(tw, th, |x, y| {
                    let [r, g, b] = image.get_pixel(x, y).0.map(f32::from);
                    let grey = 0.299 * r + 0.587 * g + 0.114 * b;
                    let hot = inferno(bilinear(&heat, key_h, key_w, tw, th, x, y));
                    Rgb(hot.map(|c| (HEAT_ALPHA * c + (1.0 - HEAT_ALPHA) * grey).round() as u8))
                });
                let centre = query_centre(q, map_h, map_w, tw, th);
                draw_marker(
                    &mut tile,
                    centre,
                    radius,
                    QUERY_COLORS[k % QUERY_COLORS.len()],
                );
                row.push(tile);
            }
            row
        })
        .collect::<Vec<_>>();
    Ok(compose(&rows, tw, th))
}

/// Picks `k` distinct query points spread over the map, deterministically: the centre, then
/// the quadrant centres, then ever finer regular lattices, then any position left, so a few
/// queries already cover the whole image.
pub fn default_queries(map_h: usize, map_w: usize, k: usize) -> Vec<(usize, usize)> {
    let k = k.min(map_h * map_w);
    // Cell centres of g x g lattices: g = 2 gives the quadrant centres.
    let lattices = (2..=map_h.max(map_w)).flat_map(move |g| {
        (0..g * g).map(move |i| {
            let (gy, gx) = (i / g, i % g);
            (
                (2 * gy + 1) * map_h / (2 * g),
                (2 * gx + 1) * map_w / (2 * g),
            )
        })
    });
    let everything = (0..map_h * map_w).map(|i| (i / map_w, i % map_w));
    let candidates = std::iter::once((map_h / 2, map_w / 2))
        .chain(lattices)
        .chain(everything);
    let mut out = Vec::with_capacity(k);
    for q in candidates {
        if out.len() == k {
            break;
        }
        if !out.contains(&q) {
            out.push(q);
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Line charts

/// One curve of a chart; points need not be sorted by x, and non-finite points break the line.
#[derive(Clone, Debug, Default)]
pub struct Series {
    pub label: String,
    pub points: Vec<(f64, f64)>,
}

/// One chart: a title, an x-axis label and the curves drawn on it.
#[derive(Clone, Debug, Default)]
pub struct Panel {
    pub title: String,
    pub x_label: String,
    pub series: Vec<Series>,
}

/// Matplotlib's tab10: distinct hues that read well on white.
const SERIES_COLORS: [Rgb<u8>; 10] = [
    Rgb([31, 119, 180]),
    Rgb([255, 127, 14]),
    Rgb([44, 160, 44]),
    Rgb([214, 39, 40]),
    Rgb([148, 103, 189]),
    Rgb([140, 86, 75]),
    Rgb([227, 119, 194]),
    Rgb([127, 127, 127]),
    Rgb([188, 189, 34]),
    Rgb([23, 190, 207]),
];
const BACKGROUND: Rgb<u8> = Rgb([255, 255, 255]);
const TEXT_COLOR: Rgb<u8> = Rgb([30, 30, 30]);
const FRAME_COLOR: Rgb<u8> = Rgb([70, 70, 70]);
const GRID_COLOR: Rgb<u8> = Rgb([228, 228, 228]);
const MUTED_TEXT: Rgb<u8> = Rgb([150, 150, 150]);
const LINE_WIDTH: f32 = 1.6;
/// A point with no neighbour to join is drawn as a dot this wide, so it isn't lost.
const DOT_WIDTH: f32 = 6.0;
const MARGIN: i64 = 10;

/// Renders panels stacked vertically into one `width` x `panels.len() * panel_height` image:
/// each with a frame, a title, x/y axes with a handful of "nice" tick values, a light grid, one
/// colour per series and a legend with the labels. With no panels the result is one blank panel,
/// so the caller always gets a valid, writable image.
pub fn plot_panels(panels: &[Panel], width: u32, panel_height: u32) -> RgbImage {
    let width = width.max(1);
    let panel_height = panel_height.max(1);
    let count = panels.len().max(1) as u32;
    let mut img = RgbImage::from_pixel(width, count * panel_height, BACKGROUND);
    // Text grows with the picture so it stays legible when the chart is viewed scaled down.
    let scale = if width >= 480 && panel_height >= 200 {
        2
    } else {
        1
    };
    for (i, panel) in panels.iter().enumerate() {
        let top = i as i64 * i64::from(panel_height);
        draw_panel(&mut img, panel, top, i64::from(panel_height), scale);
        if i > 0 {
            fill_rect(&mut img, 0, top, width.into(), 1, GRID_COLOR);
        }
    }
    img
}

/// A screen rectangle; `w` and `h` may be zero but are never negative.
#[derive(Clone, Copy, Debug)]
struct Rect {
    x: i64,
    y: i64,
    w: i64,
    h: i64,
}

/// The data interval shown along one axis and the tick values inside it.
struct Axis {
    lo: f64,
    hi: f64,
    step: f64,
    ticks: Vec<f64>,
}

impl Axis {
    /// Fits ticks `target` or so apart to `[lo, hi]`. A `loose` axis is widened to the enclosing
    /// ticks, so curves don't touch the frame; a tight one keeps the data range (steps on x).
    fn new(lo: f64, hi: f64, target: usize, loose: bool) -> Self {
        let step = nice_step((hi - lo) / target.max(1) as f64);
        let (lo, hi) = if loose {
            ((lo / step).floor() * step, (hi / step).ceil() * step)
        } else {
            (lo, hi)
        };
        let first = (lo / step - 1e-9).ceil();
        let ticks = (0..=target * 3)
            .map(|k| (first + k as f64) * step)
            .take_while(|&t| t <= hi + step * 1e-9)
            .collect();
        Self {
            lo,
            hi,
            step,
            ticks,
        }
    }

    /// Position of `v` along an axis of `len` pixels, measured from the low end.
    fn to_px(&self, v: f64, len: i64) -> f32 {
        ((v - self.lo) / (self.hi - self.lo) * (len - 1) as f64) as f32
    }

    fn labels(&self) -> Vec<String> {
        let magnitude = self.lo.abs().max(self.hi.abs());
        self.ticks
            .iter()
            .map(|&t| format_tick(t, self.step, magnitude))
            .collect()
    }
}

/// The 1, 2 or 5 times a power of ten closest to `raw`, so tick values are round numbers.
fn nice_step(raw: f64) -> f64 {
    if !(raw.is_finite() && raw > 0.0) {
        return 1.0;
    }
    let mag = 10f64.powf(raw.log10().floor());
    let norm = raw / mag;
    let nice = if norm < 1.5 {
        1.0
    } else if norm < 3.5 {
        2.0
    } else if norm < 7.5 {
        5.0
    } else {
        10.0
    };
    nice * mag
}

/// Formats a tick compactly: a k/M/G suffix for large values (20k, 1.5M), exponent notation for
/// tiny or enormous ones, and as many decimals as the tick step needs, the same for every tick.
fn format_tick(v: f64, step: f64, magnitude: f64) -> String {
    if v.abs() < step * 1e-6 {
        return "0".into();
    }
    if !(1e-3..1e15).contains(&magnitude) {
        return format!("{v:.1e}");
    }
    let (unit, suffix) = [(1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")]
        .into_iter()
        .find(|&(unit, _)| magnitude >= unit)
        .unwrap_or((1.0, ""));
    let decimals = (-((step / unit).log10() + 1e-9).floor()).clamp(0.0, 6.0) as usize;
    format!("{:.*}{suffix}", decimals, v / unit)
}

/// Smallest and largest finite value, widened when they coincide so the axis has a span.
fn finite_range(values: impl Iterator<Item = f64>) -> Option<(f64, f64)> {
    let (lo, hi) = values
        .filter(|v| v.is_finite())
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
            (lo.min(v), hi.max(v))
        });
    if lo > hi {
        return None;
    }
    if hi - lo <= hi.abs().max(lo.abs()) * 1e-9 {
        let pad = if lo == 0.0 { 1.0 } else { lo.abs() * 0.1 };
        return Some((lo - pad, hi + pad));
    }
    if !(hi - lo).is_finite() {
        // A span beyond f64 (e.g. -1e308..1e308) cannot be divided into ticks; halve both ends.
        return Some((lo / 2.0, hi / 2.0));
    }
    Some((lo, hi))
}

fn draw_panel(img: &mut RgbImage, panel: &Panel, top: i64, height: i64, scale: u32) {
    let width = i64::from(img.width());
    let char_h = i64::from(8 * scale);
    let points = || panel.series.iter().flat_map(|s| s.points.iter());
    let finite = || points().filter(|p| p.0.is_finite() && p.1.is_finite());
    let x_range = finite_range(finite().map(|p| p.0));
    let y_range = finite_range(finite().map(|p| p.1));
    let (x_lo, x_hi) = x_range.unwrap_or((0.0, 1.0));
    let (y_lo, y_hi) = y_range.unwrap_or((0.0, 1.0));

    // Header: title on the left, legend right-aligned on the same line when both fit.
    let legend_w = legend_width(panel, scale);
    let title_w = text_width(&panel.title, scale);
    let header_rows = if title_w + 24 + legend_w <= width - 2 * MARGIN {
        1
    } else {
        2
    };
    // Drawn twice, one pixel apart: a bold title without a second font.
    draw_text(img, MARGIN, top + MARGIN, &panel.title, scale, TEXT_COLOR);
    draw_text(
        img,
        MARGIN + 1,
        top + MARGIN,
        &panel.title,
        scale,
        TEXT_COLOR,
    );
    let legend_y = top + MARGIN + (header_rows - 1) * (char_h + 6);
    draw_legend(img, panel, width - MARGIN - legend_w, legend_y, scale);

    let plot_top = top + MARGIN + header_rows * (char_h + 6) + 6;
    let plot_bottom = top + height - MARGIN - (5 * char_h / 2 + 7);
    let y_target = ((plot_bottom - plot_top) / (char_h * 4)).clamp(2, 8) as usize;
    let y_axis = Axis::new(y_lo, y_hi, y_target, true);
    let y_labels = y_axis.labels();
    let label_w = y_labels
        .iter()
        .map(|l| text_width(l, scale))
        .max()
        .unwrap_or(0);
    let left = MARGIN + label_w + 8;
    let right = width - MARGIN - text_width("00.0k", scale) / 2;
    let area = Rect {
        x: left,
        y: plot_top,
        w: (right - left).max(0),
        h: (plot_bottom - plot_top).max(0),
    };
    if area.w < 8 || area.h < 8 {
        return; // Too small to hold a chart; the title and legend are all that fit.
    }
    let x_target = (area.w / (char_h * 7)).clamp(2, 10) as usize;
    let x_axis = Axis::new(x_lo, x_hi, x_target, false);

    // Grid, ticks and labels.
    for (t, label) in y_axis.ticks.iter().zip(&y_labels) {
        let y = area.y + area.h - 1 - y_axis.to_px(*t, area.h).round() as i64;
        fill_rect(img, area.x, y, area.w, 1, GRID_COLOR);
        fill_rect(img, area.x - 4, y, 4, 1, FRAME_COLOR);
        let lx = area.x - 7 - text_width(label, scale);
        draw_text(img, lx, y - char_h / 2 + 1, label, scale, TEXT_COLOR);
    }
    for (t, label) in x_axis.ticks.iter().zip(x_axis.labels()) {
        let x = area.x + x_axis.to_px(*t, area.w).round() as i64;
        fill_rect(img, x, area.y, 1, area.h, GRID_COLOR);
        fill_rect(img, x, area.y + area.h, 1, 4, FRAME_COLOR);
        let lx = x - text_width(&label, scale) / 2;
        // Low enough that the lowest y label, centred on the bottom edge, never touches it.
        draw_text(
            img,
            lx,
            area.y + area.h + char_h / 2 + 3,
            &label,
            scale,
            TEXT_COLOR,
        );
    }
    let x_label_w = text_width(&panel.x_label, scale);
    let x_label_y = area.y + area.h + char_h / 2 + 3 + char_h + 4;
    draw_text(
        img,
        area.x + (area.w - x_label_w) / 2,
        x_label_y,
        &panel.x_label,
        scale,
        TEXT_COLOR,
    );

    if x_range.is_none() {
        let msg = "no data";
        let (mx, my) = (
            area.x + (area.w - text_width(msg, scale)) / 2,
            area.y + (area.h - char_h) / 2,
        );
        draw_text(img, mx, my, msg, scale, MUTED_TEXT);
    }
    for (k, series) in panel.series.iter().enumerate() {
        let to_screen = |&(x, y): &(f64, f64)| {
            (
                area.x as f32 + x_axis.to_px(x, area.w) + 0.5,
                (area.y + area.h) as f32 - y_axis.to_px(y, area.h) - 0.5,
            )
        };
        draw_series(
            img,
            area,
            series,
            to_screen,
            SERIES_COLORS[k % SERIES_COLORS.len()],
        );
    }
    draw_frame(img, area);
}

/// Draws the finite runs of a series as polylines; a point alone between gaps becomes a dot.
fn draw_series(
    img: &mut RgbImage,
    clip: Rect,
    series: &Series,
    to_screen: impl Fn(&(f64, f64)) -> (f32, f32),
    color: Rgb<u8>,
) {
    let runs = series
        .points
        .split(|p| !(p.0.is_finite() && p.1.is_finite()));
    for run in runs.filter(|r| !r.is_empty()) {
        let screen: Vec<(f32, f32)> = run.iter().map(&to_screen).collect();
        if let [only] = screen[..] {
            draw_segment(img, clip, only, only, DOT_WIDTH, color);
        }
        for pair in screen.windows(2) {
            draw_segment(img, clip, pair[0], pair[1], LINE_WIDTH, color);
        }
    }
}

fn draw_frame(img: &mut RgbImage, r: Rect) {
    fill_rect(img, r.x - 1, r.y - 1, r.w + 2, 1, FRAME_COLOR);
    fill_rect(img, r.x - 1, r.y + r.h, r.w + 2, 1, FRAME_COLOR);
    fill_rect(img, r.x - 1, r.y - 1, 1, r.h + 2, FRAME_COLOR);
    fill_rect(img, r.x + r.w, r.y - 1, 1, r.h + 2, FRAME_COLOR);
}

/// Legend geometry: a short line in the series colour, the label, then a gap to the next entry.
const SWATCH_W: i64 = 18;
const LEGEND_GAP: i64 = 18;

fn legend_width(panel: &Panel, scale: u32) -> i64 {
    let entries = panel.series.iter();
    let w: i64 = entries
        .map(|s| SWATCH_W + 5 + text_width(&s.label, scale) + LEGEND_GAP)
        .sum();
    (w - LEGEND_GAP).max(0)
}

fn draw_legend(img: &mut RgbImage, panel: &Panel, mut x: i64, y: i64, scale: u32) {
    let char_h = i64::from(8 * scale);
    for (k, series) in panel.series.iter().enumerate() {
        let color = SERIES_COLORS[k % SERIES_COLORS.len()];
        fill_rect(img, x, y + char_h / 2 - 2, SWATCH_W, 3, color);
        x += SWATCH_W + 5;
        draw_text(img, x, y, &series.label, scale, TEXT_COLOR);
        x += text_width(&series.label, scale) + LEGEND_GAP;
    }
}

// ---------------------------------------------------------------------------------------------
// Raster primitives

fn fill_rect(img: &mut RgbImage, x: i64, y: i64, w: i64, h: i64, color: Rgb<u8>) {
    let x0 = x.clamp(0, img.width().into());
    let y0 = y.clamp(0, img.height().into());
    let x1 = (x + w).clamp(0, img.width().into());
    let y1 = (y + h).clamp(0, img.height().into());
    for py in y0..y1 {
        for px in x0..x1 {
            img.put_pixel(px as u32, py as u32, color);
        }
    }
}

/// Mixes `color` into pixel (x, y) with opacity `alpha`; the caller keeps (x, y) in bounds.
fn blend(img: &mut RgbImage, x: u32, y: u32, color: Rgb<u8>, alpha: f32) {
    let p = img.get_pixel_mut(x, y);
    for (dst, src) in p.0.iter_mut().zip(color.0) {
        *dst = (f32::from(*dst) * (1.0 - alpha) + f32::from(src) * alpha).round() as u8;
    }
}

/// An anti-aliased line of the given width, clipped to `clip`: each pixel is covered by how far
/// its centre lies from the segment, which also handles steep, short and zero-length segments.
fn draw_segment(
    img: &mut RgbImage,
    clip: Rect,
    a: (f32, f32),
    b: (f32, f32),
    width: f32,
    color: Rgb<u8>,
) {
    let half = width / 2.0;
    let reach = half + 1.0;
    let bounds = |lo: f32, hi: f32, start: i64, len: i64| {
        let first = ((lo - reach).floor() as i64).max(start);
        let last = ((hi + reach).ceil() as i64).min(start + len - 1);
        first..=last
    };
    let (dx, dy) = (b.0 - a.0, b.1 - a.1);
    let len2 = dx * dx + dy * dy;
    for py in bounds(a.1.min(b.1), a.1.max(b.1), clip.y, clip.h) {
        for px in bounds(a.0.min(b.0), a.0.max(b.0), clip.x, clip.w) {
            let (cx, cy) = (px as f32 + 0.5, py as f32 + 0.5);
            let t = if len2 > 0.0 {
                (((cx - a.0) * dx + (cy - a.1) * dy) / len2).clamp(0.0, 1.0)
            } else {
                0.0
            };
            let dist = ((cx - a.0 - t * dx).powi(2) + (cy - a.1 - t * dy).powi(2)).sqrt();
            let coverage = (half + 0.5 - dist).clamp(0.0, 1.0);
            if coverage > 0.0
                && px >= 0
                && py >= 0
                && (px as u32) < img.width()
                && (py as u32) < img.height()
            {
                blend(img, px as u32, py as u32, color, coverage);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Bitmap font

/// Glyph cell width: 5 pixel columns plus one of spacing. Cells are 8 rows high.
const CELL_W: i64 = 6;

/// Width in pixels of `text` drawn at `scale`, without trailing spacing.
fn text_width(text: &str, scale: u32) -> i64 {
    let n = text.chars().count() as i64;
    (n * CELL_W - 1).max(0) * i64::from(scale)
}

/// Draws `text` with its top-left corner at (x, y); pixels outside the image are dropped.
fn draw_text(img: &mut RgbImage, x: i64, y: i64, text: &str, scale: u32, color: Rgb<u8>) {
    let s = i64::from(scale);
    for (i, ch) in text.chars().enumerate() {
        let origin = x + i as i64 * CELL_W * s;
        for (col, bits) in glyph(ch).iter().enumerate() {
            for row in 0..8 {
                if bits >> row & 1 == 1 {
                    fill_rect(img, origin + col as i64 * s, y + row * s, s, s, color);
                }
            }
        }
    }
}

/// Column-major glyph bits (bit 0 is the top row, bit 7 the descender row of g, j, p, q, y);
/// characters outside printable ASCII draw '?'.
fn glyph(ch: char) -> [u8; 5] {
    let index = (ch as usize).wrapping_sub(0x20);
    FONT.get(index)
        .copied()
        .unwrap_or(FONT[usize::from(b'?' - 0x20)])
}

/// The classic 5x7 LCD font for printable ASCII (0x20..=0x7E), with real descenders.
const FONT: [[u8; 5]; 95] = [
    [0x00, 0x00, 0x00, 0x00, 0x00], // ' '
    [0x00, 0x00, 0x5F, 0x00, 0x00], // '!'
    [0x00, 0x07, 0x00, 0x07, 0x00], // '"'
    [0x14, 0x7F, 0x14, 0x7F, 0x14], // '#'
    [0x24, 0x2A, 0x7F, 0x2A, 0x12], // '$'
    [0x23, 0x13, 0x08, 0x64, 0x62], // '%'
    [0x36, 0x49, 0x55, 0x22, 0x50], // '&'
    [0x00, 0x05, 0x03, 0x00, 0x00], // '\''
    [0x00, 0x1C, 0x22, 0x41, 0x00], // '('
    [0x00, 0x41, 0x22, 0x1C, 0x00], // ')'
    [0x08, 0x2A, 0x1C, 0x2A, 0x08], // '*'
    [0x08, 0x08, 0x3E, 0x08, 0x08], // '+'
    [0x00, 0x50, 0x30, 0x00, 0x00], // ','
    [0x08, 0x08, 0x08, 0x08, 0x08], // '-'
    [0x00, 0x60, 0x60, 0x00, 0x00], // '.'
    [0x20, 0x10, 0x08, 0x04, 0x02], // '/'
    [0x3E, 0x51, 0x49, 0x45, 0x3E], // '0'
    [0x00, 0x42, 0x7F, 0x40, 0x00], // '1'
    [0x42, 0x61, 0x51, 0x49, 0x46], // '2'
    [0x21, 0x41, 0x45, 0x4B, 0x31], // '3'
    [0x18, 0x14, 0x12, 0x7F, 0x10], // '4'
    [0x27, 0x45, 0x45, 0x45, 0x39], // '5'
    [0x3C, 0x4A, 0x49, 0x49, 0x30], // '6'
    [0x01, 0x71, 0x09, 0x05, 0x03], // '7'
    [0x36, 0x49, 0x49, 0x49, 0x36], // '8'
    [0x06, 0x49, 0x49, 0x29, 0x1E], // '9'
    [0x00, 0x36, 0x36, 0x00, 0x00], // ':'
    [0x00, 0x56, 0x36, 0x00, 0x00], // ';'
    [0x08, 0x14, 0x22, 0x41, 0x00], // '<'
    [0x14, 0x14, 0x14, 0x14, 0x14], // '='
    [0x00, 0x41, 0x22, 0x14, 0x08], // '>'
    [0x02, 0x01, 0x51, 0x09, 0x06], // '?'
    [0x32, 0x49, 0x79, 0x41, 0x3E], // '@'
    [0x7E, 0x11, 0x11, 0x11, 0x7E], // 'A'
    [0x7F, 0x49, 0x49, 0x49, 0x36], // 'B'
    [0x3E, 0x41, 0x41, 0x41, 0x22], // 'C'
    [0x7F, 0x41, 0x41, 0x22, 0x1C], // 'D'
    [0x7F, 0x49, 0x49, 0x49, 0x41], // 'E'
    [0x7F, 0x09, 0x09, 0x01, 0x01], // 'F'
    [0x3E, 0x41, 0x41, 0x51, 0x32], // 'G'
    [0x7F, 0x08, 0x08, 0x08, 0x7F], // 'H'
    [0x00, 0x41, 0x7F, 0x41, 0x00], // 'I'
    [0x20, 0x40, 0x41, 0x3F, 0x01], // 'J'
    [0x7F, 0x08, 0x14, 0x22, 0x41], // 'K'
    [0x7F, 0x40, 0x40, 0x40, 0x40], // 'L'
    [0x7F, 0x02, 0x04, 0x02, 0x7F], // 'M'
    [0x7F, 0x04, 0x08, 0x10, 0x7F], // 'N'
    [0x3E, 0x41, 0x41, 0x41, 0x3E], // 'O'
    [0x7F, 0x09, 0x09, 0x09, 0x06], // 'P'
    [0x3E, 0x41, 0x51, 0x21, 0x5E], // 'Q'
    [0x7F, 0x09, 0x19, 0x29, 0x46], // 'R'
    [0x46, 0x49, 0x49, 0x49, 0x31], // 'S'
    [0x01, 0x01, 0x7F, 0x01, 0x01], // 'T'
    [0x3F, 0x40, 0x40, 0x40, 0x3F], // 'U'
    [0x1F, 0x20, 0x40, 0x20, 0x1F], // 'V'
    [0x7F, 0x20, 0x18, 0x20, 0x7F], // 'W'
    [0x63, 0x14, 0x08, 0x14, 0x63], // 'X'
    [0x03, 0x04, 0x78, 0x04, 0x03], // 'Y'
    [0x61, 0x51, 0x49, 0x45, 0x43], // 'Z'
    [0x00, 0x7F, 0x41, 0x41, 0x00], // '['
    [0x02, 0x04, 0x08, 0x10, 0x20], // '\\'
    [0x00, 0x41, 0x41, 0x7F, 0x00], // ']'
    [0x04, 0x02, 0x01, 0x02, 0x04], // '^'
    [0x40, 0x40, 0x40, 0x40, 0x40], // '_'
    [0x00, 0x01, 0x02, 0x04, 0x00], // '`'
    [0x20, 0x54, 0x54, 0x54, 0x78], // 'a'
    [0x7F, 0x48, 0x44, 0x44, 0x38], // 'b'
    [0x38, 0x44, 0x44, 0x44, 0x20], // 'c'
    [0x38, 0x44, 0x44, 0x48, 0x7F], // 'd'
    [0x38, 0x54, 0x54, 0x54, 0x18], // 'e'
    [0x08, 0x7E, 0x09, 0x01, 0x02], // 'f'
    [0x18, 0xA4, 0xA4, 0xA4, 0x7C], // 'g'
    [0x7F, 0x08, 0x04, 0x04, 0x78], // 'h'
    [0x00, 0x44, 0x7D, 0x40, 0x00], // 'i'
    [0x40, 0x80, 0x80, 0x7D, 0x00], // 'j'
    [0x7F, 0x10, 0x28, 0x44, 0x00], // 'k'
    [0x00, 0x41, 0x7F, 0x40, 0x00], // 'l'
    [0x7C, 0x04, 0x18, 0x04, 0x78], // 'm'
    [0x7C, 0x08, 0x04, 0x04, 0x78], // 'n'
    [0x38, 0x44, 0x44, 0x44, 0x38], // 'o'
    [0xFC, 0x24, 0x24, 0x24, 0x18], // 'p'
    [0x18, 0x24, 0x24, 0x24, 0xFC], // 'q'
    [0x7C, 0x08, 0x04, 0x04, 0x08], // 'r'
    [0x48, 0x54, 0x54, 0x54, 0x20], // 's'
    [0x04, 0x3F, 0x44, 0x40, 0x20], // 't'
    [0x3C, 0x40, 0x40, 0x20, 0x7C], // 'u'
    [0x1C, 0x20, 0x40, 0x20, 0x1C], // 'v'
    [0x3C, 0x40, 0x30, 0x40, 0x3C], // 'w'
    [0x44, 0x28, 0x10, 0x28, 0x44], // 'x'
    [0x1C, 0xA0, 0xA0, 0xA0, 0x7C], // 'y'
    [0x44, 0x64, 0x54, 0x4C, 0x44], // 'z'
    [0x00, 0x08, 0x36, 0x41, 0x00], // '{'
    [0x00, 0x00, 0x7F, 0x00, 0x00], // '|'
    [0x00, 0x41, 0x36, 0x08, 0x00], // '}'
    [0x08, 0x04, 0x08, 0x10, 0x08], // '~'
];

#[cfg(test)]
mod tests {
    use super::*;

    fn gan_panels() -> Vec<Panel> {
        let steps = 0..2000;
        let curve =
            |f: &dyn Fn(f64) -> f64| steps.clone().map(|s| (s as f64, f(s as f64))).collect();
        vec![
            Panel {
                title: "Losses".into(),
                x_label: "step".into(),
                series: vec![
                    Series {
                        label: "d_loss".into(),
                        points: curve(&|s| 1.4 * (-s / 400.0).exp() + 0.6 + 0.1 * (s * 0.37).sin()),
                    },
                    Series {
                        label: "g_loss".into(),
                        points: curve(&|s| 0.7 + s / 1500.0 + 0.2 * (s * 0.11).cos()),
                    },
                ],
            },
            Panel {
                title: "Attention gamma".into(),
                x_label: "step".into(),
                series: vec![Series {
                    label: "gamma".into(),
                    points: curve(&|s| -0.02 * (s / 300.0).tanh()),
                }],
            },
        ]
    }

    #[test]
    fn grid_has_expected_dimensions() {
        let data = vec![0.0; 10 * 28 * 28];
        let batch = ImageBatch::new(&data, 10, 1, 28, 28).unwrap();
        let grid = grid_image(batch, 5);
        // 28 px is upscaled 3x to 84 px; 5 columns, 2 rows, 2 px gaps around and between.
        assert_eq!(grid.dimensions(), (5 * 86 + 2, 2 * 86 + 2));
        // More columns than images: the grid is as wide as the batch.
        let grid = grid_image(batch, 50);
        assert_eq!(grid.dimensions(), (10 * 86 + 2, 86 + 2));
    }

    #[test]
    fn pixel_values_map_from_minus_one_to_one() {
        let data = [-1.0, 1.0, 0.0, -7.0, 7.0, f32::NAN];
        let batch = ImageBatch::new(&data, 1, 1, 1, 6).unwrap();
        let img = batch.image(0);
        let expected = [0, 255, 128, 0, 255, 0];
        for (x, v) in expected.into_iter().enumerate() {
            assert_eq!(img.get_pixel(x as u32, 0).0, [v, v, v], "pixel {x}");
        }
        // Colour: planes become channels.
        let data = [-1.0, 1.0, 1.0, -1.0, 0.0, 0.0];
        let batch = ImageBatch::new(&data, 1, 3, 1, 2).unwrap();
        let img = batch.image(0);
        assert_eq!(img.get_pixel(0, 0).0, [0, 255, 128]);
        assert_eq!(img.get_pixel(1, 0).0, [255, 0, 128]);
    }

    #[test]
    fn batch_rejects_wrong_length_and_channels() {
        let data = vec![0.0; 100];
        let err = ImageBatch::new(&data, 2, 1, 7, 7).unwrap_err().to_string();
        assert!(err.contains("98") && err.contains("100"), "{err}");
        assert!(ImageBatch::new(&data, 1, 4, 5, 5).is_err());
        assert!(ImageBatch::new(&data, 0, 1, 10, 10).is_err());
        assert!(ImageBatch::new(&data, 1, 1, 10, 10).is_ok());
    }

    #[test]
    fn one_hot_attention_is_hottest_at_the_key() {
        // Full attention (8x8 keys) and pooled attention (4x4 keys over the same 8x8 queries).
        for (keys, key) in [(8, (5, 6)), (4, (2, 3))] {
            let (h, w, map) = (32, 32, 8);
            let (n_pos, n_keys) = (map * map, keys * keys);
            let data = vec![0.0; h * w];
            let images = ImageBatch::new(&data, 1, 1, h, w).unwrap();
            let query = (1, 1);
            let mut maps = vec![0.0; n_pos * n_keys];
            maps[(query.0 * map + query.1) * n_keys + key.0 * keys + key.1] = 1.0;
            let grid = MapGrid::square(n_pos, n_keys);
            let img = attention_overlay(images, &maps, grid, &[query]).unwrap();
            let tile = 128; // 32 px upscaled 4x
            assert_eq!(img.dimensions(), (2 * (tile + GAP) + GAP, tile + GAP + GAP));
            // Inside the heat tile, find the pixel closest to the hottest colour.
            let hottest = inferno(1.0).map(|c| HEAT_ALPHA * c + (1.0 - HEAT_ALPHA) * 128.0);
            let x0 = 2 * GAP + tile;
            let (mut best, mut best_d) = ((0, 0), f32::INFINITY);
            for y in 0..tile {
                for x in 0..tile {
                    let p = img.get_pixel(x0 + x, GAP + y).0.map(f32::from);
                    let d: f32 = (0..3).map(|k| (p[k] - hottest[k]).powi(2)).sum();
                    if d < best_d {
                        (best, best_d) = ((x, y), d);
                    }
                }
            }
            let cell = tile / keys as u32;
            assert_eq!((best.1 / cell, best.0 / cell), (key.0 as u32, key.1 as u32));
            // Bilinear sampling peaks just short of 1 between pixel centres, so allow a small gap.
            assert!(best_d < 2500.0, "hottest pixel is off colour: {best_d}");
        }
    }

    #[test]
    fn attention_overlay_checks_shapes() {
        let data = vec![0.0; 16 * 16];
        let images = ImageBatch::new(&data, 1, 1, 16, 16).unwrap();
        let grid = MapGrid::square(16, 16);
        assert!(attention_overlay(images, &[0.0; 10], grid, &[]).is_err());
        let maps = vec![0.0; 256];
        assert!(attention_overlay(images, &maps, grid, &[(4, 0)]).is_err());
        assert!(attention_overlay(images, &maps, grid, &[(3, 3)]).is_ok());
        let pooled = MapGrid::square(16, 4);
        assert!(attention_overlay(images, &maps, pooled, &[(3, 3)]).is_err());
        assert!(attention_overlay(images, &maps[..64], pooled, &[(3, 3)]).is_ok());
    }

    #[test]
    fn default_queries_are_distinct_and_in_bounds() {
        assert_eq!(
            default_queries(8, 8, 5),
            [(4, 4), (2, 2), (2, 6), (6, 2), (6, 6)]
        );
        let all = default_queries(3, 5, 100);
        assert_eq!(all.len(), 15);
        for (i, q) in all.iter().enumerate() {
            assert!(q.0 < 3 && q.1 < 5);
            assert!(!all[..i].contains(q));
        }
        assert!(default_queries(0, 4, 3).is_empty());
        assert!(default_queries(4, 4, 0).is_empty());
    }

    #[test]
    fn plot_has_requested_size_and_draws_inside_the_frame() {
        let panels = gan_panels();
        let img = plot_panels(&panels, 800, 300);
        assert_eq!(img.dimensions(), (800, 600));
        // The middle of each panel's plot area holds curve or grid pixels, not only background.
        for top in [0, 300] {
            let inked = (top + 80..top + 220)
                .flat_map(|y| (150..750).map(move |x| (x, y)))
                .filter(|&(x, y)| *img.get_pixel(x, y) != BACKGROUND)
                .count();
            assert!(inked > 1000, "panel at {top}: {inked} inked pixels");
        }
        // Series colours appear.
        assert!(img.pixels().any(|p| *p == SERIES_COLORS[0]));
        assert!(img.pixels().any(|p| *p == SERIES_COLORS[1]));
    }

    #[test]
    fn plot_survives_degenerate_data() {
        let series = |points: Vec<(f64, f64)>| Series {
            label: "s".into(),
            points,
        };
        let panels = vec![
            Panel::default(),
            Panel {
                title: "odd".into(),
                x_label: "x".into(),
                series: vec![
                    series(vec![]),
                    series(vec![(3.0, 3.0)]),
                    series(vec![(0.0, 2.0), (1.0, 2.0), (2.0, 2.0)]),
                    series(vec![
                        (0.0, f64::NAN),
                        (f64::INFINITY, 1.0),
                        (5.0, -4.0),
                        (6.0, -1e9),
                    ]),
                ],
            },
            Panel {
                title: "huge".into(),
                x_label: "step".into(),
                series: vec![series(vec![(0.0, f64::MAX), (1e12, -f64::MAX)])],
            },
        ];
        for (w, h) in [(800, 300), (40, 30), (1, 1)] {
            let img = plot_panels(&panels, w, h);
            assert_eq!(img.dimensions(), (w, 3 * h));
        }
        assert_eq!(plot_panels(&[], 100, 50).dimensions(), (100, 50));
    }

    #[test]
    fn ticks_are_nice_and_compact() {
        let labels = |lo, hi, target, loose| Axis::new(lo, hi, target, loose).labels();
        assert_eq!(
            labels(0.0, 2000.0, 4, false),
            ["0", "0.5k", "1.0k", "1.5k", "2.0k"]
        );
        assert_eq!(
            labels(0.0, 20000.0, 4, false),
            ["0", "5k", "10k", "15k", "20k"]
        );
        assert_eq!(labels(0.0, 3.0e6, 3, false), ["0", "1M", "2M", "3M"]);
        assert_eq!(
            labels(-0.93, 0.12, 5, true),
            ["-1.0", "-0.8", "-0.6", "-0.4", "-0.2", "0", "0.2"]
        );
        assert_eq!(labels(0.0, 0.0004, 2, false), ["0", "2.0e-4", "4.0e-4"]);
        let axis = Axis::new(0.55, 1.45, 5, true);
        assert!(axis.lo <= 0.55 && axis.hi >= 1.45);
    }

    #[test]
    fn save_png_writes_decodable_file_and_no_temp() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("grid.png");
        let data: Vec<f32> = (0..4 * 3 * 8 * 8)
            .map(|i| (i % 17) as f32 / 8.0 - 1.0)
            .collect();
        let batch = ImageBatch::new(&data, 4, 3, 8, 8).unwrap();
        save_grid(&path, batch, 2).unwrap();
        let decoded = image::open(&path).unwrap().to_rgb8();
        assert_eq!(decoded, grid_image(batch, 2));
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["grid.png"]);
    }

    #[test]
    fn save_png_error_names_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("missing-dir").join("out.png");
        let err = save_png(&path, &RgbImage::new(4, 4))
            .unwrap_err()
            .to_string();
        assert!(err.contains(&path.display().to_string()), "{err}");
    }
}
