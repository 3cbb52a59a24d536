//! DICOM CT series (a folder of single-frame slices) as a [`Volume`]: one series only, slices
//! ordered by ImagePositionPatient along the slice normal, gaps, empty images and gantry tilt
//! refused, RescaleSlope/Intercept applied (HU), the voxel-to-world affine converted from
//! DICOM's LPS to NIfTI's RAS. Every element length in a file is held against the file's size
//! before the parser allocates it.

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

/// How deep sequences may nest in a slice (CT headers nest three or four levels); deeper
/// nesting is refused before the parser, which builds nested objects recursively, sees it.
const MAX_NESTING: usize = 32;

/// How element headers are encoded in a data set.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Syntax {
    ImplicitLe,
    ExplicitLe,
    ExplicitBe,
}

/// A cursor over a DICOM file's bytes that reads element and item headers.
struct Walk<'a> {
    b: &'a [u8],
    pos: usize,
}

/// An element or item header: tag, VR (explicit syntaxes), length (`None`: undefined).
struct Header {
    tag: (u16, u16),
    vr: Option<[u8; 2]>,
    len: Option<usize>,
}

impl Walk<'_> {
    fn u16(&mut self, big: bool) -> Option<u16> {
        let v = self.b.get(self.pos..self.pos + 2)?;
        self.pos += 2;
        Some(if big {
            u16::from_be_bytes([v[0], v[1]])
        } else {
            u16::from_le_bytes([v[0], v[1]])
        })
    }

    fn u32(&mut self, big: bool) -> Option<u32> {
        let v = self.b.get(self.pos..self.pos + 4)?;
        self.pos += 4;
        let a = [v[0], v[1], v[2], v[3]];
        Some(if big {
            u32::from_be_bytes(a)
        } else {
            u32::from_le_bytes(a)
        })
    }

    /// The next header as the parser decodes it (dicom-encoding's explicit and implicit
    /// decoders): items and delimiters (group FFFE) carry no VR; explicit VRs of the 16-bit
    /// length form are those of PS3.5 table 7.1-2, all others have a 32-bit length.
    fn header(&mut self, syntax: Syntax) -> Option<Header> {
        let big = syntax == Syntax::ExplicitBe;
        let tag = (self.u16(big)?, self.u16(big)?);
        let undefined = |l: u32| (l != u32::MAX).then_some(l as usize);
        if tag.0 == 0xfffe || syntax == Syntax::ImplicitLe {
            let len = self.u32(big)?;
            return Some(Header {
                tag,
                vr: None,
                len: undefined(len),
            });
        }
        let vr = self.b.get(self.pos..self.pos + 2)?;
        let vr = [vr[0], vr[1]];
        self.pos += 2;
        let short = matches!(
            &vr,
            b"AE"
                | b"AS"
                | b"AT"
                | b"CS"
                | b"DA"
                | b"DS"
                | b"DT"
                | b"FL"
                | b"FD"
                | b"IS"
                | b"LO"
                | b"LT"
                | b"PN"
                | b"SH"
                | b"SL"
                | b"SS"
                | b"ST"
                | b"TM"
                | b"UI"
                | b"UL"
                | b"US"
        );
        let len = if short {
            self.u16(big)? as u32
        } else {
            self.pos += 2;
            self.u32(big)?
        };
        Some(Header {
            tag,
            vr: Some(vr),
            len: undefined(len),
        })
    }
}

/// Checks, before the DICOM parser sees `bytes` (read from `path`), that every element and item
/// length in them fits in what is left of the file, and that sequences nest at most
/// [`MAX_NESTING`] deep. The parser (dicom-object) reserves a buffer of each stated length (up
/// to 4 GiB) before reading the value, so a few corrupt bytes could make it allocate gigabytes;
/// here they are refused with the offset and the tag. Walks the file the way the parser does:
/// the file meta group in explicit VR little endian (as long as its group length says), then
/// the data set in its transfer syntax. What the parser refuses anyway (no "DICM", a deflated
/// data set) is left to it.
fn check_lengths(path: &Path, bytes: &[u8]) -> Result<()> {
    let start = if bytes.get(128..132) == Some(b"DICM") {
        132
    } else if bytes.starts_with(b"DICM") {
        4
    } else {
        return Ok(());
    };
    let too_long = |offset: usize, tag: (u16, u16), len: usize| {
        Error::dataset(
            path,
            format!(
                "element ({:04X},{:04X}) at byte {offset} says its value is {len} bytes long, but the file has {} bytes after it: a truncated or corrupt file",
                tag.0,
                tag.1,
                bytes.len().saturating_sub(offset)
            ),
        )
    };
    let mut w = Walk {
        b: bytes,
        pos: start,
    };
    // The file meta group: its length element first, then elements while it lasts.
    let Some(h) = w.header(Syntax::ExplicitLe) else {
        return Ok(());
    };
    let Some(group_length) = (h.tag == (2, 0) && h.len == Some(4))
        .then(|| w.u32(false))
        .flatten()
    else {
        return Ok(());
    };
    let mut syntax = Syntax::ExplicitLe;
    let mut read = 0u32;
    while read < group_length {
        let at = w.pos;
        let Some(h) = w.header(Syntax::ExplicitLe) else {
            return Ok(());
        };
        let Some(len) = h.len else { return Ok(()) };
        if len > bytes.len() - w.pos {
            return Err(too_long(at, h.tag, len));
        }
        if h.tag == (2, 0x10) {
            let uid = String::from_utf8_lossy(&bytes[w.pos..w.pos + len]);
            match uid.trim_end_matches(|c: char| c.is_whitespace() || c == '\0') {
                "1.2.840.10008.1.2" => syntax = Syntax::ImplicitLe,
                "1.2.840.10008.1.2.2" => syntax = Syntax::ExplicitBe,
                "1.2.840.10008.1.2.1.99" => return Ok(()), // deflated: not readable here
                _ => syntax = Syntax::ExplicitLe,
            }
        }
        w.pos += len;
        read = read.saturating_add((w.pos - at) as u32);
    }
    // The data set: a stack of open sequences (items expected) and items (elements expected),
    // each with its end when its length is defined.
    #[derive(PartialEq)]
    enum Open {
        Sequence,
        Fragments,
        Item,
    }
    let mut stack: Vec<(Open, Option<usize>)> = Vec::new();
    loop {
        while stack
            .last()
            .is_some_and(|(_, end)| end.is_some_and(|e| w.pos >= e))
        {
            stack.pop();
        }
        if stack.len() > MAX_NESTING {
            return Err(Error::dataset(
                path,
                format!(
                    "sequences nested more than {MAX_NESTING} deep at byte {}: a corrupt file",
                    w.pos
                ),
            ));
        }
        let at = w.pos;
        let in_sequence = stack.last().is_some_and(|(o, _)| *o != Open::Item);
        let Some(h) = w.header(syntax) else {
            return Ok(()); // the end of the file, where the parser stops too
        };
        let end = match h.len {
            Some(len) if len > bytes.len() - w.pos => return Err(too_long(at, h.tag, len)),
            Some(len) => Some(w.pos + len),
            None => None,
        };
        match (in_sequence, h.tag) {
            (true, (0xfffe, 0xe000)) => {
                if stack.last().is_some_and(|(o, _)| *o == Open::Fragments) {
                    let Some(end) = end else { return Ok(()) };
                    w.pos = end; // a pixel data fragment
                } else {
                    stack.push((Open::Item, end));
                }
            }
            (true, (0xfffe, 0xe0dd)) | (false, (0xfffe, 0xe00d)) => {
                stack.pop();
            }
            (true, _) => return Ok(()), // the parser refuses anything else here
            (false, tag) => {
                let sequence = match h.vr {
                    Some(vr) => &vr == b"SQ",
                    None => {
                        use dicom_core::dictionary::{DataDictionary, DataDictionaryEntry};
                        tag != (0x7fe0, 0x10)
                            && dicom_dictionary_std::StandardDataDictionary
                                .by_tag(Tag(tag.0, tag.1))
                                .is_some_and(|e| e.vr().relaxed() == dicom_core::VR::SQ)
                    }
                };
                match (sequence, end) {
                    (true, _) => stack.push((Open::Sequence, end)),
                    (false, None) if tag == (0x7fe0, 0x10) => stack.push((Open::Fragments, None)),
                    (false, None) => stack.push((Open::Sequence, None)),
                    (false, Some(end)) => w.pos = end,
                }
            }
        }
    }
}

fn read_slice(path: &Path) -> Result<Slice> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    check_lengths(path, &bytes)?;
    let start = if bytes.get(128..132) == Some(b"DICM") {
        128
    } else {
        0
    };
    let obj = dicom_object::OpenFileOptions::new()
        .read_preamble(dicom_object::file::ReadPreamble::Never)
        .from_reader(&bytes[start..])
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
    // The pixel module's numbers, checked before decoding: the decoder asserts on some of
    // them (BitsStored of 0 or above 32) instead of returning an error.
    let number = |tag: Tag| obj.element(tag).ok().and_then(|e| e.to_int::<i64>().ok());
    let samples = number(tags::SAMPLES_PER_PIXEL);
    let allocated = number(tags::BITS_ALLOCATED);
    let stored = number(tags::BITS_STORED);
    let high = number(tags::HIGH_BIT);
    let representation = number(tags::PIXEL_REPRESENTATION);
    let pixel_error = |name: &str, tag: Tag, v: i64, expected: &str| {
        Error::dataset(path, format!("{name} {tag} = {v}; expected {expected}"))
    };
    if let Some(v) = samples.filter(|&v| v != 1) {
        return Err(pixel_error(
            "SamplesPerPixel",
            tags::SAMPLES_PER_PIXEL,
            v,
            "1 (grey-level CT)",
        ));
    }
    let Some(allocated) = allocated else {
        return Err(Error::dataset(
            path,
            format!(
                "no BitsAllocated {}; expected 8, 16 or 32",
                tags::BITS_ALLOCATED
            ),
        ));
    };
    if ![8, 16, 32].contains(&allocated) {
        return Err(pixel_error(
            "BitsAllocated",
            tags::BITS_ALLOCATED,
            allocated,
            "8, 16 or 32",
        ));
    }
    if let Some(v) = stored.filter(|&v| !(1..=allocated).contains(&v)) {
        return Err(pixel_error(
            "BitsStored",
            tags::BITS_STORED,
            v,
            &format!("1 to BitsAllocated ({allocated})"),
        ));
    }
    if let Some(v) = high.filter(|&v| !(0..allocated).contains(&v)) {
        return Err(pixel_error(
            "HighBit",
            tags::HIGH_BIT,
            v,
            &format!("0 to BitsAllocated - 1 ({})", allocated - 1),
        ));
    }
    if let Some(v) = representation.filter(|&v| v != 0 && v != 1) {
        return Err(pixel_error(
            "PixelRepresentation",
            tags::PIXEL_REPRESENTATION,
            v,
            "0 (unsigned) or 1 (signed)",
        ));
    }
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
    if let Some(bad) = hu.iter().position(|v| !v.is_finite()) {
        return Err(Error::dataset(
            path,
            format!(
                "pixel (row {}, column {}) is {} HU after RescaleSlope/RescaleIntercept; expected finite values",
                bad / cols,
                bad % cols,
                hu[bad]
            ),
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
