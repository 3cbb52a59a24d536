//! Overlays: the slices of a volume where the model (or the truth) has the most tumour and the
//! most liver, in the canonical axial view, the image in a soft-tissue window and the
//! segmentations outlined, so a user sees what the model does without opening a viewer.

use std::path::Path;

use crate::data::nifti::{self, Volume};
use crate::error::Result;
use crate::preview::{self, Tile};

/// Slices an overlay shows.
pub const SLICES: usize = 6;
/// The window it draws the CT in (HU): abdominal soft tissue.
pub const WINDOW: [f64; 2] = [-160.0, 240.0];

/// Writes a contact sheet of `vol` with the prediction `pred` (and, when given, the truth
/// `truth`; both label volumes on `vol`'s grid) to `path`: up to [`SLICES`] canonical axial
/// slices, half of them those with the most tumour and the rest those with the most liver (in
/// the prediction or the truth), in slice order. Truth is outlined green (liver) and yellow
/// (tumour), the prediction magenta (liver) and red (tumour).
pub fn write(path: &Path, vol: &Volume, pred: &[u8], truth: Option<&[u8]>) -> Result<()> {
    // 1. The slices to show.
    let (axes, n) = nifti::canonical_axes(vol)?;
    let nz = n[2];
    let slice = |labels: &[u8], z: usize| nifti::canonical_slice(labels, vol.dims, axes, z);
    let count = |z: usize, at_least: u8| {
        let mut c = slice(pred, z).iter().filter(|&&l| l >= at_least).count();
        if let Some(t) = truth {
            c += slice(t, z).iter().filter(|&&l| l >= at_least).count();
        }
        c
    };
    let by = |level: u8| {
        let mut zs: Vec<(usize, usize)> = (0..nz).map(|z| (count(z, level), z)).collect();
        zs.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
        zs.into_iter()
            .filter(|(c, _)| *c > 0)
            .map(|(_, z)| z)
            .collect::<Vec<_>>()
    };
    let mut chosen: Vec<usize> = by(2).into_iter().take(SLICES / 2).collect();
    for z in by(1).into_iter().chain(0..nz) {
        if chosen.len() >= SLICES.min(nz) {
            break;
        }
        if !chosen.contains(&z) {
            chosen.push(z);
        }
    }
    chosen.sort_unstable();
    // 2. The tiles.
    let pred_slices: Vec<Vec<u8>> = chosen.iter().map(|&z| slice(pred, z)).collect();
    let truth_slices: Vec<Vec<u8>> = match truth {
        Some(t) => chosen.iter().map(|&z| slice(t, z)).collect(),
        None => Vec::new(),
    };
    let tiles: Vec<Tile> = chosen
        .iter()
        .enumerate()
        .map(|(k, &z)| {
            let mut layers = Vec::new();
            if let Some(t) = truth_slices.get(k) {
                layers.push((t.as_slice(), preview::TRUTH));
            }
            layers.push((pred_slices[k].as_slice(), preview::PREDICTION));
            Tile {
                image: nifti::canonical_slice(&vol.data, vol.dims, axes, z),
                width: n[0],
                height: n[1],
                layers,
            }
        })
        .collect();
    preview::write_grid(path, &tiles, 3, WINDOW)
}

/// The overlay file written beside a mask `<stem>.nii.gz`: `<stem>-overlay.png`.
pub fn path_beside(mask: &Path) -> std::path::PathBuf {
    let name = mask
        .file_name()
        .map_or(String::new(), |n| n.to_string_lossy().into_owned());
    let stem = name.trim_end_matches(".gz").trim_end_matches(".nii");
    mask.with_file_name(format!("{stem}-overlay.png"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_overlay_shows_the_tumour_slices_first_and_is_a_png() {
        // A 4×4×10 volume with liver on slices 2..8 and tumour only on slice 5: the sheet shows
        // slice 5 among its six, and is a PNG of 3 × 2 tiles of 6 × 6 pixels (a 1-pixel border
        // around each 4 × 4 slice).
        let dims = [4usize, 4, 10];
        let mut pred = vec![0u8; 160];
        for z in 2..8 {
            for i in 0..16 {
                pred[z * 16 + i] = if z == 5 && i == 5 {
                    2
                } else if i % 4 > 0 {
                    1
                } else {
                    0
                };
            }
        }
        let vol = Volume {
            path: "v.nii".into(),
            dims,
            spacing: [1.0; 3],
            affine: [
                [-1.0, 0.0, 0.0, 0.0],
                [0.0, -1.0, 0.0, 0.0],
                [0.0, 0.0, 1.0, 0.0],
            ],
            data: (0..160).map(|i| i as f32).collect(),
            datatype: 16,
        };
        let d = tempfile::tempdir().expect("tmp");
        let p = d.path().join("o.png");
        write(&p, &vol, &pred, Some(&pred)).expect("overlay");
        let bytes = std::fs::read(&p).expect("png");
        assert_eq!(&bytes[1..4], b"PNG");
        let decoder = png::Decoder::new(std::io::Cursor::new(bytes));
        let reader = decoder.read_info().expect("png header");
        assert_eq!((reader.info().width, reader.info().height), (18, 12));
        assert_eq!(
            path_beside(Path::new("/x/ct-pred.nii.gz")),
            Path::new("/x/ct-pred-overlay.png")
        );
    }
}
