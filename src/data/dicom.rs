//! DICOM CT series (a folder of single-frame slices) as a [`Volume`]: one series only, slices
//! ordered by ImagePositionPatient along the slice normal, gaps, empty images and gantry tilt
//! refused, RescaleSlope/Intercept applied (HU), the voxel-to-world affine converted from
//! DICOM's LPS to NIfTI's RAS.

use std::path::{Path, PathBuf};

use dicom_dictionary_std::tags;
use dicom_object::{DefaultDicomObject, Tag};
use dicom_pixeldata::PixelDecoder;

use super::nifti::{self, Volume};
use crate::error::{Error, Result};

/// How far, in pixels, a slice may lie off the line through the first slice along the slice
/// normal before the series counts as tilted: a tenth of a pixel, above the rounding of
/// ImagePositionPatient (decimal strings of up to 16 characters) and below any real gantry tilt
/// over more than a few slices.
const TILT_TOLERANCE_PX: f64 = 0.1;

struct Slice {
    path: PathBuf,
    series: String,
    position: [f64; 3],
    orientation: [f64; 6],
    spacing: [f64; 2],
    rows: usize,
    cols: usize,
    thickness: Option<f64>,
    hu: Vec<f32>,
}

fn floats(
    obj: &DefaultDicomObject,
    path: &Path,
    tag: Tag,
    name: &str,
    n: usize,
) -> Result<Vec<f64>> {
    let e = obj
        .element(tag)
        .map_err(|_| Error::dataset(path, format!("no {name} {tag}; expected {n} numbers")))?;
    let v = e
        .to_multi_float64()
        .map_err(|err| Error::dataset(path, format!("{name} {tag}: {err}")))?;
    if v.len() != n || v.iter().any(|x| !x.is_finite()) {
        return Err(Error::dataset(
            path,
            format!("{name} {tag} = {v:?}; expected {n} finite numbers"),
        ));
    }
    Ok(v)
}

fn read_slice(path: &Path) -> Result<Slice> {
    let obj = dicom_object::open_file(path)
        .map_err(|e| Error::dataset(path, format!("not a readable DICOM file: {e}")))?;
    let series = obj
        .element(tags::SERIES_INSTANCE_UID)
        .ok()
        .and_then(|e| e.to_str().ok())
        .map(|s| s.trim_end_matches(['\0', ' ']).to_string())
        .unwrap_or_default();
    let frames = obj
        .element(tags::NUMBER_OF_FRAMES)
        .ok()
        .and_then(|e| e.to_int::<i64>().ok())
        .unwrap_or(1);
    if frames != 1 {
        return Err(Error::dataset(
            path,
            format!("NumberOfFrames = {frames}; expected single-frame CT slices"),
        ));
    }
    let p = floats(
        &obj,
        path,
        tags::IMAGE_POSITION_PATIENT,
        "ImagePositionPatient",
        3,
    )?;
    let o = floats(
        &obj,
        path,
        tags::IMAGE_ORIENTATION_PATIENT,
        "ImageOrientationPatient",
        6,
    )?;
    let s = floats(&obj, path, tags::PIXEL_SPACING, "PixelSpacing", 2)?;
    if s.iter().any(|&v| v <= 0.0) {
        return Err(Error::dataset(
            path,
            format!(
                "PixelSpacing {} = {s:?}; expected two positive numbers (mm)",
                tags::PIXEL_SPACING
            ),
        ));
    }
    // Checked before decoding: the resizers and the affine need at least one pixel.
    let dimension = |tag: Tag, name: &str| {
        obj.element(tag)
            .ok()
            .and_then(|e| e.to_int::<u32>().ok())
            .ok_or_else(|| {
                Error::dataset(
                    path,
                    format!("no {name} {tag}; expected a number of pixels"),
                )
            })
    };
    let (rows, cols) = (
        dimension(tags::ROWS, "Rows")?,
        dimension(tags::COLUMNS, "Columns")?,
    );
    if rows == 0 || cols == 0 {
        return Err(Error::dataset(
            path,
            format!(
                "Rows x Columns = {rows} x {cols}: an empty image; expected a CT slice of at least one pixel"
            ),
        ));
    }
    let thickness = obj
        .element(tags::SLICE_THICKNESS)
        .ok()
        .and_then(|e| e.to_float64().ok())
        .filter(|t| t.is_finite() && *t > 0.0);
    let decoded = obj
        .decode_pixel_data()
        .map_err(|e| Error::dataset(path, format!("pixel data: {e}")))?;
    if decoded.samples_per_pixel() != 1 {
        return Err(Error::dataset(
            path,
            format!(
                "SamplesPerPixel = {}; expected 1 (grey-level CT)",
                decoded.samples_per_pixel()
            ),
        ));
    }
    if (decoded.rows(), decoded.columns()) != (rows, cols) {
        return Err(Error::dataset(
            path,
            format!(
                "the pixel data decodes to {}x{} pixels, Rows x Columns say {rows}x{cols}",
                decoded.rows(),
                decoded.columns()
            ),
        ));
    }
    let (rows, cols) = (rows as usize, cols as usize);
    // Modality LUT applied: RescaleSlope · stored + RescaleIntercept = HU.
    let hu: Vec<f32> = decoded
        .to_vec()
        .map_err(|e| Error::dataset(path, format!("pixel data: {e}")))?;
    if hu.len() != rows * cols {
        return Err(Error::dataset(
            path,
            format!("{} pixels for {rows}x{cols}", hu.len()),
        ));
    }
    Ok(Slice {
        path: path.to_path_buf(),
        series,
        position: [p[0], p[1], p[2]],
        orientation: [o[0], o[1], o[2], o[3], o[4], o[5]],
        spacing: [s[0], s[1]],
        rows,
        cols,
        thickness,
        hu,
    })
}

fn cross(a: [f64; 3], b: [f64; 3]) -> [f64; 3] {
    [
        a[1] * b[2] - a[2] * b[1],
        a[2] * b[0] - a[0] * b[2],
        a[0] * b[1] - a[1] * b[0],
    ]
}

fn dot(a: [f64; 3], b: [f64; 3]) -> f64 {
    a[0] * b[0] + a[1] * b[1] + a[2] * b[2]
}

fn sub(a: [f64; 3], b: [f64; 3]) -> [f64; 3] {
    [a[0] - b[0], a[1] - b[1], a[2] - b[2]]
}

/// Reads the DICOM series in `dir` (every regular file but `DICOMDIR` and hidden files).
pub fn read_series(dir: &Path) -> Result<Volume> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.is_file()
                && p.file_name().is_some_and(|n| {
                    let n = n.to_string_lossy();
                    !n.starts_with('.') && n != "DICOMDIR"
                })
        })
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(Error::dataset(dir, "no DICOM files in this folder"));
    }
    let mut slices = files
        .iter()
        .map(|f| read_slice(f))
        .collect::<Result<Vec<_>>>()?;
    let first = &slices[0];
    for s in &slices[1..] {
        if s.series != first.series {
            return Err(Error::dataset(
                &s.path,
                format!(
                    "SeriesInstanceUID {:?} differs from {:?} in {}: mixed series in {}; put one series per folder",
                    s.series,
                    first.series,
                    first.path.display(),
                    dir.display()
                ),
            ));
        }
        if (s.rows, s.cols) != (first.rows, first.cols) {
            return Err(Error::dataset(
                &s.path,
                format!(
                    "{}x{} pixels, {} has {}x{}",
                    s.rows,
                    s.cols,
                    first.path.display(),
                    first.rows,
                    first.cols
                ),
            ));
        }
        let od = s
            .orientation
            .iter()
            .zip(&first.orientation)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max);
        let sd = (s.spacing[0] - first.spacing[0])
            .abs()
            .max((s.spacing[1] - first.spacing[1]).abs());
        if od > 1e-4 || sd > 1e-4 {
            return Err(Error::dataset(
                &s.path,
                format!(
                    "ImageOrientationPatient {:?} / PixelSpacing {:?} differ from {} ({:?} / {:?})",
                    s.orientation,
                    s.spacing,
                    first.path.display(),
                    first.orientation,
                    first.spacing
                ),
            ));
        }
    }
    let (o, thickness, pixel_spacing, rows, cols) = (
        first.orientation,
        first.thickness,
        first.spacing,
        first.rows,
        first.cols,
    );
    let row_cos = [o[0], o[1], o[2]];
    let col_cos = [o[3], o[4], o[5]];
    let unit = |v: [f64; 3]| (dot(v, v).sqrt() - 1.0).abs() <= 1e-2;
    if !unit(row_cos) || !unit(col_cos) || dot(row_cos, col_cos).abs() > 1e-2 {
        return Err(Error::dataset(
            &first.path,
            format!(
                "ImageOrientationPatient {} = {o:?}; expected two orthogonal unit vectors (the row and column directions)",
                tags::IMAGE_ORIENTATION_PATIENT
            ),
        ));
    }
    let normal = cross(row_cos, col_cos);
    let normal = normal.map(|v| v / dot(normal, normal).sqrt());
    slices.sort_by(|a, b| dot(a.position, normal).total_cmp(&dot(b.position, normal)));
    // Gantry tilt: the slices are planes along the normal, but their origins drift across it.
    let tilt_limit = TILT_TOLERANCE_PX * pixel_spacing[0].min(pixel_spacing[1]);
    let start = slices[0].position;
    for s in &slices[1..] {
        let d = sub(s.position, start);
        let along = dot(d, normal);
        let off = sub(d, normal.map(|v| v * along));
        let across = dot(off, off).sqrt();
        if across > tilt_limit {
            return Err(Error::dataset(
                &s.path,
                format!(
                    "ImagePositionPatient {:?} lies {across:.3} mm off the slice normal through {} ({start:?}) at {:.3} mm along it: a gantry tilt of {:.2} degrees (ctseg reads untilted series, within {TILT_TOLERANCE_PX} pixel); correct the tilt first, e.g. with dcm2niix (it writes a tilt-corrected NIfTI, which ctseg reads), or resample the series with SimpleITK's ResampleImageFilter",
                    s.position,
                    slices[0].path.display(),
                    along.abs(),
                    across.atan2(along.abs()).to_degrees()
                ),
            ));
        }
    }
    let along: Vec<f64> = slices.iter().map(|s| dot(s.position, normal)).collect();
    let gaps: Vec<f64> = along.windows(2).map(|w| w[1] - w[0]).collect();
    let spacing_z = if gaps.is_empty() {
        thickness.unwrap_or(1.0)
    } else {
        let mut sorted = gaps.clone();
        sorted.sort_by(f64::total_cmp);
        let median = sorted[sorted.len() / 2];
        for (k, &g) in gaps.iter().enumerate() {
            if g < 1e-3 {
                return Err(Error::dataset(
                    &slices[k + 1].path,
                    format!(
                        "same ImagePositionPatient as {}: a duplicated slice",
                        slices[k].path.display()
                    ),
                ));
            }
            if (g - median).abs() > 0.1 * median {
                let what = if g > 1.5 * median {
                    format!("{:.0} slice(s) missing", (g / median).round() - 1.0)
                } else {
                    "uneven slice spacing".to_string()
                };
                return Err(Error::dataset(
                    &slices[k + 1].path,
                    format!(
                        "{g:.3} mm from {} along the slice normal, the series spacing is {median:.3} mm: {what}",
                        slices[k].path.display()
                    ),
                ));
            }
        }
        (along[along.len() - 1] - along[0]) / gaps.len() as f64
    };
    // DICOM patient coordinates are LPS; NIfTI's world is RAS: negate x and y.
    let (dr, dc) = (pixel_spacing[0], pixel_spacing[1]);
    let lps_cols = [
        row_cos.map(|v| v * dc),
        col_cos.map(|v| v * dr),
        normal.map(|v| v * spacing_z),
    ];
    let origin = slices[0].position;
    let mut affine = [[0.0; 4]; 3];
    for (r, sign) in [-1.0, -1.0, 1.0].iter().enumerate() {
        for (c, col) in lps_cols.iter().enumerate() {
            affine[r][c] = sign * col[r];
        }
        affine[r][3] = sign * origin[r];
    }
    // Oblique slice planes (ImageOrientationPatient off the axes) are refused here.
    nifti::orientation(dir, &affine)?;
    let mut data = Vec::with_capacity(rows * cols * slices.len());
    for s in &slices {
        data.extend_from_slice(&s.hu);
    }
    Ok(Volume {
        path: dir.to_path_buf(),
        dims: [cols, rows, slices.len()],
        spacing: [dc, dr, spacing_z],
        affine,
        data,
        datatype: 16,
    })
}
