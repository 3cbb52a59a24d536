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

/// The `N` numbers of a multi-valued decimal element, each finite.
fn floats<const N: usize>(
    obj: &DefaultDicomObject,
    path: &Path,
    tag: Tag,
    name: &str,
) -> Result<[f64; N]> {
    let e = obj
        .element(tag)
        .map_err(|_| Error::dataset(path, format!("no {name} {tag}; expected {N} numbers")))?;
    let v = e
        .to_multi_float64()
        .map_err(|err| Error::dataset(path, format!("{name} {tag}: {err}")))?;
    if v.len() != N || v.iter().any(|x| !x.is_finite()) {
        return Err(Error::dataset(
            path,
            format!("{name} {tag} = {v:?}; expected {N} finite numbers"),
        ));
    }
    Ok(std::array::from_fn(|i| v[i]))
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

/// Why a walk refuses a file before the parser sees it.
enum Corrupt {
    /// The element at byte `at` states a value longer than the rest of the file.
    TooLong {
        at: usize,
        tag: (u16, u16),
        len: usize,
    },
    /// Sequences nest deeper than [`MAX_NESTING`] at byte `at`.
    TooDeep { at: usize },
}

impl Corrupt {
    fn error(self, path: &Path, file_len: usize) -> Error {
        let message = match self {
            Corrupt::TooLong { at, tag, len } => format!(
                "element ({:04X},{:04X}) at byte {at} says its value is {len} bytes long, but the file has {} bytes after it: a truncated or corrupt file",
                tag.0,
                tag.1,
                file_len.saturating_sub(at)
            ),
            Corrupt::TooDeep { at } => {
                format!(
                    "sequences nested more than {MAX_NESTING} deep at byte {at}: a corrupt file"
                )
            }
        };
        Error::dataset(path, message)
    }
}

/// What the data set walk expects next inside an open element.
#[derive(PartialEq)]
enum Open {
    Sequence,
    Fragments,
    Item,
}

impl Walk<'_> {
    /// The file meta group (explicit VR little endian, as long as its group length says): the
    /// data set's transfer syntax, or `None` where the file is left to the parser to judge.
    fn meta_group(&mut self) -> std::result::Result<Option<Syntax>, Corrupt> {
        let Some(h) = self.header(Syntax::ExplicitLe) else {
            return Ok(None);
        };
        let Some(group_length) = (h.tag == (2, 0) && h.len == Some(4))
            .then(|| self.u32(false))
            .flatten()
        else {
            return Ok(None);
        };
        let mut syntax = Syntax::ExplicitLe;
        let mut read = 0u32;
        while read < group_length {
            let at = self.pos;
            let Some(h) = self.header(Syntax::ExplicitLe) else {
                return Ok(None);
            };
            let Some(len) = h.len else { return Ok(None) };
            if len > self.b.len() - self.pos {
                return Err(Corrupt::TooLong {
                    at,
                    tag: h.tag,
                    len,
                });
            }
            if h.tag == (2, 0x10) {
                let uid = String::from_utf8_lossy(&self.b[self.pos..self.pos + len]);
                syntax = match uid.trim_end_matches(|c: char| c.is_whitespace() || c == '\0') {
                    "1.2.840.10008.1.2" => Syntax::ImplicitLe,
                    "1.2.840.10008.1.2.2" => Syntax::ExplicitBe,
                    "1.2.840.10008.1.2.1.99" => return Ok(None), // deflated: not readable here
                    _ => Syntax::ExplicitLe,
                };
            }
            self.pos += len;
            read = read.saturating_add((self.pos - at) as u32);
        }
        Ok(Some(syntax))
    }

    /// The data set in `syntax`, to the end of the file (where the parser stops too) or to what
    /// the parser refuses anyway: a stack of open sequences (items expected) and items (elements
    /// expected), each with its end where its length is defined.
    fn data_set(&mut self, syntax: Syntax) -> std::result::Result<(), Corrupt> {
        let mut stack: Vec<(Open, Option<usize>)> = Vec::new();
        loop {
            while stack
                .last()
                .is_some_and(|(_, end)| end.is_some_and(|e| self.pos >= e))
            {
                stack.pop();
            }
            if stack.len() > MAX_NESTING {
                return Err(Corrupt::TooDeep { at: self.pos });
            }
            let at = self.pos;
            let in_sequence = stack.last().is_some_and(|(o, _)| *o != Open::Item);
            let Some(h) = self.header(syntax) else {
                return Ok(());
            };
            let end = match h.len {
                Some(len) if len > self.b.len() - self.pos => {
                    return Err(Corrupt::TooLong {
                        at,
                        tag: h.tag,
                        len,
                    });
                }
                Some(len) => Some(self.pos + len),
                None => None,
            };
            match (in_sequence, h.tag) {
                (true, (0xfffe, 0xe000)) => {
                    if stack.last().is_some_and(|(o, _)| *o == Open::Fragments) {
                        let Some(end) = end else { return Ok(()) };
                        self.pos = end; // a pixel data fragment
                    } else {
                        stack.push((Open::Item, end));
                    }
                }
                (true, (0xfffe, 0xe0dd)) | (false, (0xfffe, 0xe00d)) => {
                    stack.pop();
                }
                (true, _) => return Ok(()), // the parser refuses anything else here
                (false, tag) => match (is_sequence(tag, h.vr), end) {
                    (true, _) => stack.push((Open::Sequence, end)),
                    (false, None) if tag == PIXEL_DATA => stack.push((Open::Fragments, None)),
                    (false, None) => stack.push((Open::Sequence, None)),
                    (false, Some(end)) => self.pos = end,
                },
            }
        }
    }
}

/// The Pixel Data element's tag.
const PIXEL_DATA: (u16, u16) = (0x7fe0, 0x10);

/// Whether an element holds a sequence: by its VR, or in implicit VR by the dictionary.
fn is_sequence(tag: (u16, u16), vr: Option<[u8; 2]>) -> bool {
    use dicom_core::dictionary::{DataDictionary, DataDictionaryEntry};
    match vr {
        Some(vr) => &vr == b"SQ",
        None => {
            tag != PIXEL_DATA
                && dicom_dictionary_std::StandardDataDictionary
                    .by_tag(Tag(tag.0, tag.1))
                    .is_some_and(|e| e.vr().relaxed() == dicom_core::VR::SQ)
        }
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
    let mut w = Walk {
        b: bytes,
        pos: start,
    };
    let walked = match w.meta_group() {
        Ok(Some(syntax)) => w.data_set(syntax),
        Ok(None) => Ok(()),
        Err(corrupt) => Err(corrupt),
    };
    walked.map_err(|corrupt| corrupt.error(path, bytes.len()))
}

fn read_slice(path: &Path) -> Result<Slice> {
    // 1. The file, every stated length checked before the parser allocates it.
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
    // 2. Its series, and a single frame.
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
    // 3. Where it lies.
    let position = floats(
        &obj,
        path,
        tags::IMAGE_POSITION_PATIENT,
        "ImagePositionPatient",
    )?;
    let orientation = floats(
        &obj,
        path,
        tags::IMAGE_ORIENTATION_PATIENT,
        "ImageOrientationPatient",
    )?;
    let spacing: [f64; 2] = floats(&obj, path, tags::PIXEL_SPACING, "PixelSpacing")?;
    if spacing.iter().any(|&v| v <= 0.0) {
        return Err(Error::dataset(
            path,
            format!(
                "PixelSpacing {} = {spacing:?}; expected two positive numbers (mm)",
                tags::PIXEL_SPACING
            ),
        ));
    }
    // 4. Its size, checked before decoding: the resizers and the affine need a pixel.
    let (rows, cols) = dimensions(&obj, path)?;
    let thickness = obj
        .element(tags::SLICE_THICKNESS)
        .ok()
        .and_then(|e| e.to_float64().ok())
        .filter(|t| t.is_finite() && *t > 0.0);
    // 5. The pixel module's numbers, checked before decoding: the decoder asserts on some of
    // them (BitsStored of 0 or above 32) instead of returning an error.
    check_pixel_module(&obj, path)?;
    // 6. The pixels, in HU.
    let hu = decode_hu(&obj, path, rows, cols)?;
    Ok(Slice {
        path: path.to_path_buf(),
        series,
        position,
        orientation,
        spacing,
        rows,
        cols,
        thickness,
        hu,
    })
}

/// Rows and Columns, each at least 1.
fn dimensions(obj: &DefaultDicomObject, path: &Path) -> Result<(usize, usize)> {
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
    Ok((rows as usize, cols as usize))
}

/// SamplesPerPixel, BitsAllocated, BitsStored, HighBit and PixelRepresentation within what a
/// grey-level CT image can have.
fn check_pixel_module(obj: &DefaultDicomObject, path: &Path) -> Result<()> {
    let number = |tag: Tag| obj.element(tag).ok().and_then(|e| e.to_int::<i64>().ok());
    let refuse = |name: &str, tag: Tag, v: i64, expected: &str| {
        Err(Error::dataset(
            path,
            format!("{name} {tag} = {v}; expected {expected}"),
        ))
    };
    if let Some(v) = number(tags::SAMPLES_PER_PIXEL).filter(|&v| v != 1) {
        return refuse(
            "SamplesPerPixel",
            tags::SAMPLES_PER_PIXEL,
            v,
            "1 (grey-level CT)",
        );
    }
    let Some(allocated) = number(tags::BITS_ALLOCATED) else {
        return Err(Error::dataset(
            path,
            format!(
                "no BitsAllocated {}; expected 8, 16 or 32",
                tags::BITS_ALLOCATED
            ),
        ));
    };
    if ![8, 16, 32].contains(&allocated) {
        return refuse(
            "BitsAllocated",
            tags::BITS_ALLOCATED,
            allocated,
            "8, 16 or 32",
        );
    }
    if let Some(v) = number(tags::BITS_STORED).filter(|&v| !(1..=allocated).contains(&v)) {
        let expected = format!("1 to BitsAllocated ({allocated})");
        return refuse("BitsStored", tags::BITS_STORED, v, &expected);
    }
    if let Some(v) = number(tags::HIGH_BIT).filter(|&v| !(0..allocated).contains(&v)) {
        let expected = format!("0 to BitsAllocated - 1 ({})", allocated - 1);
        return refuse("HighBit", tags::HIGH_BIT, v, &expected);
    }
    if let Some(v) = number(tags::PIXEL_REPRESENTATION).filter(|&v| v != 0 && v != 1) {
        return refuse(
            "PixelRepresentation",
            tags::PIXEL_REPRESENTATION,
            v,
            "0 (unsigned) or 1 (signed)",
        );
    }
    Ok(())
}

/// The decoded pixels with the modality LUT applied (RescaleSlope · stored +
/// RescaleIntercept = HU): `rows` × `cols` finite values.
fn decode_hu(obj: &DefaultDicomObject, path: &Path, rows: usize, cols: usize) -> Result<Vec<f32>> {
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
    let decoded_size = (decoded.rows() as usize, decoded.columns() as usize);
    if decoded_size != (rows, cols) {
        return Err(Error::dataset(
            path,
            format!(
                "the pixel data decodes to {}x{} pixels, Rows x Columns say {rows}x{cols}",
                decoded_size.0, decoded_size.1
            ),
        ));
    }
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
    Ok(hu)
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
    // 1. Every slice, read and checked on its own.
    let mut slices = series_files(dir)?
        .iter()
        .map(|f| read_slice(f))
        .collect::<Result<Vec<_>>>()?;
    // 2. One series, one image size, one orientation and pixel spacing; the first file's.
    check_alike(&slices, dir)?;
    let grid = Grid::of(&slices[0])?;
    // 3. The slices in order along the normal, untilted, evenly spaced, none missing.
    slices.sort_by(|a, b| dot(a.position, grid.normal).total_cmp(&dot(b.position, grid.normal)));
    check_untilted(&slices, &grid)?;
    let spacing_z = slice_spacing(&slices, &grid)?;
    // 4. The voxel-to-world affine; oblique slice planes (orientation off the axes) are refused.
    let affine = grid.ras_affine(slices[0].position, spacing_z);
    nifti::orientation(dir, &affine)?;
    // 5. The volume, slice after slice.
    let mut data = Vec::with_capacity(grid.rows * grid.cols * slices.len());
    for s in &slices {
        data.extend_from_slice(&s.hu);
    }
    Ok(Volume {
        path: dir.to_path_buf(),
        dims: [grid.cols, grid.rows, slices.len()],
        spacing: [grid.pixel_spacing[1], grid.pixel_spacing[0], spacing_z],
        affine,
        data,
        datatype: 16,
    })
}

/// The series' files in name order: every regular file but `DICOMDIR` and hidden ones.
fn series_files(dir: &Path) -> Result<Vec<PathBuf>> {
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
    Ok(files)
}

/// Every slice of the same series as the first, with its image size, orientation and pixel
/// spacing.
fn check_alike(slices: &[Slice], dir: &Path) -> Result<()> {
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
    Ok(())
}

/// The in-plane geometry of a series, as its first file states it.
struct Grid {
    /// Direction cosines of a row (along the columns) and of a column (along the rows), LPS.
    row_cos: [f64; 3],
    col_cos: [f64; 3],
    /// Their unit cross product: the direction the slices are stacked in.
    normal: [f64; 3],
    /// PixelSpacing: between rows, then between columns (mm).
    pixel_spacing: [f64; 2],
    thickness: Option<f64>,
    rows: usize,
    cols: usize,
}

impl Grid {
    fn of(first: &Slice) -> Result<Grid> {
        let o = first.orientation;
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
        Ok(Grid {
            row_cos,
            col_cos,
            normal: normal.map(|v| v / dot(normal, normal).sqrt()),
            pixel_spacing: first.spacing,
            thickness: first.thickness,
            rows: first.rows,
            cols: first.cols,
        })
    }

    /// The voxel-to-world affine of a volume whose first slice lies at `origin` (LPS) and whose
    /// slices are `spacing_z` apart, in NIfTI's RAS: DICOM's x and y negated.
    fn ras_affine(&self, origin: [f64; 3], spacing_z: f64) -> [[f64; 4]; 3] {
        let (dr, dc) = (self.pixel_spacing[0], self.pixel_spacing[1]);
        let lps_cols = [
            self.row_cos.map(|v| v * dc),
            self.col_cos.map(|v| v * dr),
            self.normal.map(|v| v * spacing_z),
        ];
        let mut affine = [[0.0; 4]; 3];
        for (r, sign) in [-1.0, -1.0, 1.0].iter().enumerate() {
            for (c, col) in lps_cols.iter().enumerate() {
                affine[r][c] = sign * col[r];
            }
            affine[r][3] = sign * origin[r];
        }
        affine
    }
}

/// Gantry tilt: the slices are planes along the normal, but their origins drift across it.
fn check_untilted(slices: &[Slice], grid: &Grid) -> Result<()> {
    let tilt_limit = TILT_TOLERANCE_PX * grid.pixel_spacing[0].min(grid.pixel_spacing[1]);
    let start = slices[0].position;
    for s in &slices[1..] {
        let d = sub(s.position, start);
        let along = dot(d, grid.normal);
        let off = sub(d, grid.normal.map(|v| v * along));
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
    Ok(())
}

/// The distance between slices along the normal (SliceThickness, else 1 mm, for one slice):
/// duplicated slices, missing slices and uneven spacing are refused.
fn slice_spacing(slices: &[Slice], grid: &Grid) -> Result<f64> {
    let along: Vec<f64> = slices
        .iter()
        .map(|s| dot(s.position, grid.normal))
        .collect();
    let gaps: Vec<f64> = along.windows(2).map(|w| w[1] - w[0]).collect();
    if gaps.is_empty() {
        return Ok(grid.thickness.unwrap_or(1.0));
    }
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
    Ok((along[along.len() - 1] - along[0]) / gaps.len() as f64)
}
