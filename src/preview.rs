//! Contact sheets: a grid of slices rendered as a PNG (soft-tissue window, label outlines in
//! green for liver and red for tumour), to look at phantoms and data before trusting them.

use std::fs::File;
use std::io::BufWriter;
use std::path::Path;

use crate::error::{Error, Result};

/// Renders `tiles` (HU image, labels, side) into a grid of `cols` columns and writes a PNG.
pub fn write_grid(
    path: &Path,
    tiles: &[(&[i16], &[u8], usize)],
    cols: usize,
    window: [f64; 2],
) -> Result<()> {
    if tiles.is_empty() {
        return Err(Error::Invalid("nothing to preview".into()));
    }
    let side = tiles.iter().map(|t| t.2).max().unwrap_or(1);
    let cols = cols.clamp(1, tiles.len());
    let rows = tiles.len().div_ceil(cols);
    let (w, h) = (cols * (side + 2), rows * (side + 2));
    let mut rgb = vec![0u8; w * h * 3];
    for (k, (img, lab, n)) in tiles.iter().enumerate() {
        let (ox, oy) = ((k % cols) * (side + 2) + 1, (k / cols) * (side + 2) + 1);
        for y in 0..*n {
            for x in 0..*n {
                let i = y * n + x;
                let v = ((img[i] as f64 - window[0]) / (window[1] - window[0])).clamp(0.0, 1.0);
                let g = (v * 255.0).round() as u8;
                let mut px = [g, g, g];
                let l = lab[i];
                let edge = l > 0
                    && [(0isize, 1isize), (0, -1), (1, 0), (-1, 0)]
                        .iter()
                        .any(|(dy, dx)| {
                            let (yy, xx) = (y as isize + dy, x as isize + dx);
                            yy < 0
                                || xx < 0
                                || yy >= *n as isize
                                || xx >= *n as isize
                                || lab[yy as usize * n + xx as usize] < l
                        });
                if edge {
                    px = if l >= 2 { [255, 40, 40] } else { [40, 220, 60] };
                }
                let o = ((oy + y) * w + ox + x) * 3;
                rgb[o..o + 3].copy_from_slice(&px);
            }
        }
    }
    let f = File::create(path).map_err(|e| Error::io(path, e))?;
    let mut enc = png::Encoder::new(BufWriter::new(f), w as u32, h as u32);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    let mut writer = enc
        .write_header()
        .map_err(|e| Error::io(path, std::io::Error::other(e)))?;
    writer
        .write_image_data(&rgb)
        .map_err(|e| Error::io(path, std::io::Error::other(e)))
}
