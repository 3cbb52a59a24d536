//! Contact sheets: a grid of slices rendered as a PNG (a soft-tissue window, label outlines
//! drawn over it), to look at phantoms, data and predictions before trusting them.

use std::path::Path;

use crate::error::{Error, Result};

/// Outline colours of one label layer: `[liver (label ≥ 1), tumour (label 2)]`.
pub type Colours = [[u8; 3]; 2];

/// Labels as drawn on a phantom or a dataset: liver green, tumour red.
pub const LABELS: Colours = [[40, 220, 60], [255, 40, 40]];
/// Ground truth in an overlay: liver green, tumour yellow.
pub const TRUTH: Colours = [[40, 220, 60], [255, 230, 40]];
/// A prediction in an overlay: liver magenta, tumour red.
pub const PREDICTION: Colours = [[230, 60, 230], [255, 40, 40]];

/// One slice of a contact sheet: HU values, row-major, and label layers to outline.
pub struct Tile<'a> {
    /// HU values, `width × height`, row-major.
    pub image: Vec<f32>,
    /// Columns.
    pub width: usize,
    /// Rows.
    pub height: usize,
    /// Label maps (same size) and their outline colours, drawn in order (later on top).
    pub layers: Vec<(&'a [u8], Colours)>,
}

/// Whether pixel `i` (row `y`, column `x`) of `lab` lies on the boundary of the region with
/// labels ≥ `level`.
fn edge(lab: &[u8], w: usize, h: usize, x: usize, y: usize, level: u8) -> bool {
    if lab[y * w + x] < level {
        return false;
    }
    [(0isize, 1isize), (0, -1), (1, 0), (-1, 0)]
        .iter()
        .any(|(dy, dx)| {
            let (yy, xx) = (y as isize + dy, x as isize + dx);
            yy < 0
                || xx < 0
                || yy >= h as isize
                || xx >= w as isize
                || lab[yy as usize * w + xx as usize] < level
        })
}

/// Renders `tiles` into a grid of `cols` columns (the image windowed to `window` HU, label
/// outlines on top) and writes a PNG atomically.
pub fn write_grid(path: &Path, tiles: &[Tile], cols: usize, window: [f64; 2]) -> Result<()> {
    if tiles.is_empty() {
        return Err(Error::Invalid("nothing to preview".into()));
    }
    let tw = tiles.iter().map(|t| t.width).max().unwrap_or(1);
    let th = tiles.iter().map(|t| t.height).max().unwrap_or(1);
    let cols = cols.clamp(1, tiles.len());
    let rows = tiles.len().div_ceil(cols);
    let (w, h) = (cols * (tw + 2), rows * (th + 2));
    let mut rgb = vec![0u8; w * h * 3];
    for (k, t) in tiles.iter().enumerate() {
        let (ox, oy) = ((k % cols) * (tw + 2) + 1, (k / cols) * (th + 2) + 1);
        for y in 0..t.height {
            for x in 0..t.width {
                let i = y * t.width + x;
                let v = ((t.image[i] as f64 - window[0]) / (window[1] - window[0])).clamp(0.0, 1.0);
                let g = (v * 255.0).round() as u8;
                let mut px = [g, g, g];
                for (lab, colours) in &t.layers {
                    for (level, colour) in [(1u8, colours[0]), (2u8, colours[1])] {
                        if edge(lab, t.width, t.height, x, y, level) {
                            px = colour;
                        }
                    }
                }
                let o = ((oy + y) * w + ox + x) * 3;
                rgb[o..o + 3].copy_from_slice(&px);
            }
        }
    }
    crate::util::fs::write_atomic_with(path, |f| {
        let mut enc = png::Encoder::new(std::io::BufWriter::new(f), w as u32, h as u32);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        let mut writer = enc.write_header().map_err(std::io::Error::other)?;
        writer
            .write_image_data(&rgb)
            .map_err(std::io::Error::other)?;
        writer.finish().map_err(std::io::Error::other)?;
        Ok(())
    })
}
