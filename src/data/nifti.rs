//! NIfTI-1 volumes (`.nii`, `.nii.gz`): reading with scaling and the voxel-to-world affine
//! (sform, else qform, else nibabel's base affine), reorientation to ctseg's canonical axial
//! layout, and writing label masks. Every error names the file and the header field or voxel at
//! fault.
//!
//! Written against the NIfTI-1 standard (nifti1.h) rather than on a crate so that errors can
//! say which field is wrong and so that nothing but the volume itself is held in memory. Sizes
//! in the header are untrusted: the data size is computed with checked arithmetic and held
//! against the file's length (`.nii`) before anything is allocated; a `.nii.gz` buffer grows
//! only with the bytes the stream actually delivers, so a header claiming a huge volume in a
//! small file fails as truncated instead of allocating what it claims.

use std::fs::File;
use std::io::{BufReader, Read, Write};
use std::path::{Path, PathBuf};

use flate2::read::MultiGzDecoder;

use crate::error::{Error, Result};

/// The largest volume ctseg reads, in voxels: 2³¹ (8 GiB as f32 in memory), eight times the
/// largest LiTS CT (512 × 512 × 987). A header asking for more is refused before anything is
/// allocated, with the size in the message.
pub const MAX_VOXELS: u64 = 1 << 31;

/// How far (the sine of the angle) a voxel axis may point away from its nearest world axis for
/// a volume to count as axis-aligned: 1e-3 (0.057°). Affines stored as float32 round at 1e-7,
/// real obliquity and gantry tilts are whole degrees; reading a volume within this tolerance as
/// axis-aligned moves a voxel 256 voxels from the origin by a quarter of a voxel at most.
pub const OBLIQUE_TOLERANCE: f64 = 1e-3;

/// How an oblique volume can be made readable (named in the errors that refuse one).
pub const RESAMPLE_HINT: &str = "resample it onto an axis-aligned grid first, e.g. with nibabel (`nibabel.processing.resample_to_output(nib.load(path))`) or SimpleITK (`ResampleImageFilter` with an identity direction); for a DICOM series with a gantry tilt, `dcm2niix` writes a tilt-corrected NIfTI";

/// Growth step of the voxel buffer of a compressed volume, whose size is only known once the
/// stream has delivered it.
const CHUNK: usize = 1 << 22;

/// A 3-D volume: `dims[0]` is the fastest-varying axis (NIfTI order, i then j then k).
#[derive(Clone, Debug)]
pub struct Volume {
    /// Where it was read from.
    pub path: PathBuf,
    /// Voxels along i, j, k.
    pub dims: [usize; 3],
    /// Voxel sizes (mm) along i, j, k.
    pub spacing: [f64; 3],
    /// Voxel index (i, j, k, 1) → world (x, y, z) in mm, RAS+ (NIfTI convention), row-major 3×4.
    pub affine: [[f64; 4]; 3],
    /// Scaled voxel values, i fastest.
    pub data: Vec<f32>,
    /// The NIfTI datatype code it was stored with.
    pub datatype: i16,
}

/// Voxels per axis a NIfTI-1 header holds (its `dim` fields are i16).
pub const MAX_DIM: usize = i16::MAX as usize;

fn err(path: &Path, msg: impl Into<String>) -> Error {
    Error::dataset(path, msg.into())
}

/// Element size in bytes of a supported NIfTI datatype, or an error naming the code.
fn datatype_size(path: &Path, code: i16) -> Result<usize> {
    Ok(match code {
        2 | 256 => 1,          // uint8, int8
        4 | 512 => 2,          // int16, uint16
        8 | 16 | 768 => 4,     // int32, float32, uint32
        64 | 1024 | 1280 => 8, // float64, int64, uint64
        other => {
            let name = match other {
                0 => "unknown",
                1 => "binary",
                32 => "complex64",
                128 => "RGB24",
                1536 => "float128",
                1792 => "complex128",
                2048 => "complex256",
                2304 => "RGBA32",
                _ => "not a NIfTI-1 code",
            };
            return Err(err(
                path,
                format!(
                    "header field datatype = {other} ({name}) is not supported; expected an integer or real type (2, 4, 8, 16, 64, 256, 512, 768, 1024, 1280)"
                ),
            ));
        }
    })
}

struct Header {
    big_endian: bool,
    ndim: usize,
    dims: [usize; 3],
    /// Bytes of voxel data the header describes (dims × element size, checked).
    data_bytes: u64,
    datatype: i16,
    pixdim: [f32; 8],
    vox_offset: u64,
    /// vox_offset as stored (for messages).
    vox_offset_field: f32,
    slope: f32,
    inter: f32,
    qform_code: i16,
    sform_code: i16,
    quatern: [f32; 3],
    qoffset: [f32; 3],
    srow: [[f32; 4]; 3],
}

fn parse_header(path: &Path, h: &[u8; 348]) -> Result<Header> {
    // 1. What kind of file: NIfTI-1, single file, and its byte order.
    let big_endian = byte_order(path, h)?;
    check_magic(path, h)?;
    let f = Fields { h, big_endian };
    // 2. The grid: a 3-D volume within MAX_VOXELS, of a known datatype.
    let (ndim, dims) = volume_dims(path, &f)?;
    let datatype = f.i16_at(70);
    let element = datatype_size(path, datatype)?;
    // Each dim is at most i16::MAX, so the product fits in u64; checked all the same.
    let voxels = dims
        .iter()
        .try_fold(1u64, |acc, &d| acc.checked_mul(d as u64))
        .filter(|&v| v <= MAX_VOXELS)
        .ok_or_else(|| {
            err(
                path,
                format!(
                    "header field dim = {:?}: {} voxels, more than the {MAX_VOXELS} ctseg reads (crop or resample the volume first)",
                    &f.dim()[1..=ndim],
                    dims.iter().map(|&d| d as f64).product::<f64>()
                ),
            )
        })?;
    // 3. Where the data starts.
    let vox_offset = f.f32_at(108);
    if !(vox_offset >= 348.0 && vox_offset.is_finite()) {
        return Err(err(
            path,
            format!("header field vox_offset = {vox_offset}; expected at least 348"),
        ));
    }
    // 4. The rest as stored: voxel sizes, scaling and the two orientations.
    Ok(Header {
        big_endian,
        ndim,
        dims,
        data_bytes: voxels * element as u64,
        datatype,
        pixdim: std::array::from_fn(|k| f.f32_at(76 + 4 * k)),
        // Finite and at least 348: the cast truncates a fraction and saturates beyond u64.
        vox_offset: vox_offset as u64,
        vox_offset_field: vox_offset,
        slope: f.f32_at(112),
        inter: f.f32_at(116),
        qform_code: f.i16_at(252),
        sform_code: f.i16_at(254),
        quatern: [f.f32_at(256), f.f32_at(260), f.f32_at(264)],
        qoffset: [f.f32_at(268), f.f32_at(272), f.f32_at(276)],
        srow: std::array::from_fn(|r| std::array::from_fn(|c| f.f32_at(280 + 16 * r + 4 * c))),
    })
}

/// A NIfTI-1 header's fields in its byte order.
struct Fields<'a> {
    h: &'a [u8; 348],
    big_endian: bool,
}

impl Fields<'_> {
    fn i16_at(&self, o: usize) -> i16 {
        let b = [self.h[o], self.h[o + 1]];
        if self.big_endian {
            i16::from_be_bytes(b)
        } else {
            i16::from_le_bytes(b)
        }
    }

    fn f32_at(&self, o: usize) -> f32 {
        let b = [self.h[o], self.h[o + 1], self.h[o + 2], self.h[o + 3]];
        if self.big_endian {
            f32::from_be_bytes(b)
        } else {
            f32::from_le_bytes(b)
        }
    }

    /// The `dim` field: dim[0] dimensions, then their sizes.
    fn dim(&self) -> [i16; 8] {
        std::array::from_fn(|k| self.i16_at(40 + 2 * k))
    }
}

/// The header's byte order, from sizeof_hdr (348 in one of them).
fn byte_order(path: &Path, h: &[u8; 348]) -> Result<bool> {
    let le = i32::from_le_bytes([h[0], h[1], h[2], h[3]]);
    let be = i32::from_be_bytes([h[0], h[1], h[2], h[3]]);
    match (le, be) {
        (348, _) => Ok(false),
        (_, 348) => Ok(true),
        _ if le == 540 || be == 540 => Err(err(
            path,
            "header field sizeof_hdr = 540: a NIfTI-2 file; only NIfTI-1 is supported",
        )),
        _ => Err(err(
            path,
            format!("header field sizeof_hdr = {le}; expected 348 (not a NIfTI-1 file?)"),
        )),
    }
}

/// The magic of a single-file NIfTI-1 ("n+1").
fn check_magic(path: &Path, h: &[u8; 348]) -> Result<()> {
    let magic = &h[344..348];
    if magic != b"n+1\0" && magic != b"ni1\0" {
        return Err(err(
            path,
            format!(
                "header field magic = {:?}; expected \"n+1\" (a NIfTI-1 file)",
                String::from_utf8_lossy(&magic[..3])
            ),
        ));
    }
    if magic == b"ni1\0" {
        return Err(err(
            path,
            "header field magic = \"ni1\": a header/image pair (.hdr/.img); convert it to a single .nii",
        ));
    }
    Ok(())
}

/// dim[0] and the volume's three sizes: 1 to 7 dimensions, each at least 1, none past the
/// third larger than 1 (one time point).
fn volume_dims(path: &Path, f: &Fields) -> Result<(usize, [usize; 3])> {
    let dim = f.dim();
    let ndim = dim[0];
    if !(1..=7).contains(&ndim) {
        return Err(err(
            path,
            format!("header field dim[0] = {ndim}; expected 1 to 7"),
        ));
    }
    let ndim = ndim as usize;
    for (k, &d) in dim.iter().enumerate().take(ndim + 1).skip(1) {
        if d < 1 {
            return Err(err(
                path,
                format!("header field dim[{k}] = {d}; expected at least 1"),
            ));
        }
    }
    if dim[4..=ndim.max(3)].iter().any(|&d| d > 1) {
        return Err(err(
            path,
            format!(
                "a {ndim}-D volume (header field dim = {:?}); expected a 3-D volume (one time point)",
                &dim[1..=ndim]
            ),
        ));
    }
    let size = |k: usize| if k <= ndim { dim[k] as usize } else { 1 };
    Ok((ndim, [size(1), size(2), size(3)]))
}

/// Voxel sizes as nibabel reads them: its header checks on loading set a pixdim[1..=3] of 0 to 1
/// and a negative one to its absolute value.
fn zooms(h: &Header) -> [f64; 3] {
    [1, 2, 3].map(|k| {
        let p = h.pixdim[k] as f64;
        if p == 0.0 { 1.0 } else { p.abs() }
    })
}

/// The voxel-to-world affine as nibabel computes it (`Nifti1Header.get_best_affine` after the
/// checks nibabel runs on loading, which set a form code outside 1..=5 to 0 and a qfac other
/// than −1 to 1): the sform if its code is set, else the qform if its code is set, else
/// nibabel's base affine (`get_base_affine`: the zooms on the diagonal with x negated, the
/// origin at the centre of the volume).
fn affine(h: &Header) -> [[f64; 4]; 3] {
    let coded = |code: i16| (1..=5).contains(&code);
    if coded(h.sform_code) {
        return h.srow.map(|r| r.map(|v| v as f64));
    }
    let z = zooms(h);
    if coded(h.qform_code) {
        let [b, c, d] = h.quatern.map(|v| v as f64);
        let a = (1.0 - (b * b + c * c + d * d)).max(0.0).sqrt();
        let r = [
            [
                a * a + b * b - c * c - d * d,
                2.0 * (b * c - a * d),
                2.0 * (b * d + a * c),
            ],
            [
                2.0 * (b * c + a * d),
                a * a + c * c - b * b - d * d,
                2.0 * (c * d - a * b),
            ],
            [
                2.0 * (b * d - a * c),
                2.0 * (c * d + a * b),
                a * a + d * d - c * c - b * b,
            ],
        ];
        let qfac = if h.pixdim[0] == -1.0 { -1.0 } else { 1.0 };
        let s = [z[0], z[1], qfac * z[2]];
        let mut out = [[0.0; 4]; 3];
        for i in 0..3 {
            for j in 0..3 {
                out[i][j] = r[i][j] * s[j];
            }
            out[i][3] = h.qoffset[i] as f64;
        }
        return out;
    }
    // nibabel's shape_zoom_affine: axes beyond dim[0] count as one voxel of 1 mm.
    let zoom = |k: usize| if k < h.ndim { z[k] } else { 1.0 };
    let diag = [-zoom(0), zoom(1), zoom(2)];
    let mut out = [[0.0; 4]; 3];
    for k in 0..3 {
        out[k][k] = diag[k];
        out[k][3] = -((h.dims[k] as f64 - 1.0) / 2.0) * diag[k];
    }
    out
}

fn is_gz(path: &Path) -> bool {
    path.to_string_lossy().to_ascii_lowercase().ends_with(".gz")
}

/// The file as a stream of NIfTI bytes (gunzipped if its name ends in `.gz`; every gzip member,
/// as bgzip writes several), and its length when that is the length of the NIfTI bytes.
fn open_stream(path: &Path) -> Result<(Box<dyn Read>, Option<u64>)> {
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    if is_gz(path) {
        let reader = MultiGzDecoder::new(BufReader::with_capacity(1 << 20, file));
        Ok((Box::new(reader), None))
    } else {
        let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
        Ok((Box::new(BufReader::with_capacity(1 << 20, file)), Some(len)))
    }
}

/// The error for a read of the `what` that failed after `got` bytes.
fn read_error(path: &Path, what: &str, got: u64, e: &std::io::Error) -> Error {
    let early =
        e.kind() == std::io::ErrorKind::UnexpectedEof || e.to_string().contains("incomplete");
    err(
        path,
        match (is_gz(path), early) {
            (true, true) => format!(
                "reading the {what}: the gzip stream ends early after {got} bytes (truncated file?)"
            ),
            (true, false) => format!("reading the {what}: not a valid gzip stream ({e})"),
            (false, _) => format!("reading the {what}: {e}"),
        },
    )
}

/// Reads into `buf[from..]` until it is full or the stream ends; returns the bytes read.
fn fill(path: &Path, r: &mut dyn Read, buf: &mut [u8], from: usize, what: &str) -> Result<usize> {
    let mut got = from;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(read_error(path, what, got as u64, &e)),
        }
    }
    Ok(got)
}

fn truncated(path: &Path, what: &str, got: u64, want: u64) -> Error {
    err(
        path,
        format!("ends after {got} of {want} bytes of the {what} (truncated file?)"),
    )
}

fn read_exact_named(path: &Path, r: &mut dyn Read, buf: &mut [u8], what: &str) -> Result<()> {
    let got = fill(path, r, buf, 0, what)?;
    if got < buf.len() {
        return Err(truncated(path, what, got as u64, buf.len() as u64));
    }
    Ok(())
}

/// Reads `n` bytes into a buffer that grows with what the stream delivers (doubling, never past
/// `n`), so that a header claiming more than a compressed file holds fails as truncated after
/// allocating about what the file held.
fn read_growing(path: &Path, r: &mut dyn Read, n: usize, what: &str) -> Result<Vec<u8>> {
    let mut buf = Vec::new();
    while buf.len() < n {
        let have = buf.len();
        let grow = have.max(CHUNK).min(n - have);
        buf.resize(have + grow, 0);
        let got = fill(path, r, &mut buf, have, what)?;
        if got < buf.len() {
            return Err(truncated(path, what, got as u64, n as u64));
        }
    }
    Ok(buf)
}

/// Skips `n` bytes without holding them.
fn skip(path: &Path, r: &mut dyn Read, n: u64, what: &str) -> Result<()> {
    let got = std::io::copy(&mut r.take(n), &mut std::io::sink())
        .map_err(|e| read_error(path, what, 0, &e))?;
    if got < n {
        return Err(truncated(path, what, got, n));
    }
    Ok(())
}

/// Reads the header only: dimensions, spacing, affine.
pub fn read_header(path: &Path) -> Result<Volume> {
    let (mut r, _) = open_stream(path)?;
    let mut hb = [0u8; 348];
    read_exact_named(path, r.as_mut(), &mut hb, "header")?;
    let h = parse_header(path, &hb)?;
    Ok(Volume {
        path: path.to_path_buf(),
        dims: h.dims,
        spacing: zooms(&h),
        affine: affine(&h),
        data: Vec::new(),
        datatype: h.datatype,
    })
}

/// Reads a 3-D NIfTI-1 volume and applies scl_slope / scl_inter (when the slope is finite and
/// non-zero, as nibabel does). Non-finite voxels and an oblique affine ([`orientation`]) are
/// errors naming the file. The data size the header gives is checked against the file's length
/// (`.nii`) before it is allocated; a `.nii.gz` is read to the end of its stream, so that its
/// gzip checksums are verified (bytes after the voxel data are ignored, as nibabel does).
pub fn read(path: &Path) -> Result<Volume> {
    let (mut r, file_len) = open_stream(path)?;
    let mut hb = [0u8; 348];
    read_exact_named(path, r.as_mut(), &mut hb, "header")?;
    let h = parse_header(path, &hb)?;
    let affine = affine(&h);
    orientation(path, &affine)?;
    if let Some(len) = file_len
        && h.vox_offset
            .checked_add(h.data_bytes)
            .is_none_or(|end| end > len)
    {
        return Err(err(
            path,
            format!(
                "header fields dim {:?} and datatype {} describe {} bytes of voxel data from vox_offset {}, but the file has {len} bytes (truncated file, or a corrupt header)",
                h.dims, h.datatype, h.data_bytes, h.vox_offset_field
            ),
        ));
    }
    let extensions = format!(
        "header extensions (up to vox_offset {})",
        h.vox_offset_field
    );
    skip(path, r.as_mut(), h.vox_offset - 348, &extensions)?;
    let n = usize::try_from(h.data_bytes)
        .map_err(|_| err(path, "the voxel data does not fit in memory"))?;
    let raw = if file_len.is_some() {
        let mut raw = vec![0u8; n];
        read_exact_named(path, r.as_mut(), &mut raw, "voxel data")?;
        raw
    } else {
        let raw = read_growing(path, r.as_mut(), n, "voxel data")?;
        // To the end of the stream, so that a corrupt member fails its gzip checksum.
        std::io::copy(&mut r, &mut std::io::sink())
            .map_err(|e| read_error(path, "end of the gzip stream", 0, &e))?;
        raw
    };
    let data = decode(&raw, h.datatype, h.big_endian);
    drop(raw);
    let (slope, inter) = if h.slope.is_finite() && h.slope != 0.0 {
        (h.slope, if h.inter.is_finite() { h.inter } else { 0.0 })
    } else {
        (1.0, 0.0)
    };
    let mut data = data;
    if slope != 1.0 || inter != 0.0 {
        for v in &mut data {
            *v = *v * slope + inter;
        }
    }
    if let Some(bad) = data.iter().position(|v| !v.is_finite()) {
        let (i, j, k) = (
            bad % h.dims[0],
            bad / h.dims[0] % h.dims[1],
            bad / (h.dims[0] * h.dims[1]),
        );
        return Err(err(
            path,
            format!(
                "voxel ({i}, {j}, {k}) is {}; expected finite values",
                data[bad]
            ),
        ));
    }
    Ok(Volume {
        path: path.to_path_buf(),
        dims: h.dims,
        spacing: zooms(&h),
        affine,
        data,
        datatype: h.datatype,
    })
}

fn decode(raw: &[u8], datatype: i16, big: bool) -> Vec<f32> {
    macro_rules! conv {
        ($t:ty, $n:expr) => {
            raw.chunks_exact($n)
                .map(|c| {
                    let mut b = [0u8; $n];
                    b.copy_from_slice(c);
                    (if big {
                        <$t>::from_be_bytes(b)
                    } else {
                        <$t>::from_le_bytes(b)
                    }) as f32
                })
                .collect()
        };
    }
    match datatype {
        2 => raw.iter().map(|&v| v as f32).collect(),
        256 => raw.iter().map(|&v| v as i8 as f32).collect(),
        4 => conv!(i16, 2),
        512 => conv!(u16, 2),
        8 => conv!(i32, 4),
        768 => conv!(u32, 4),
        16 => conv!(f32, 4),
        64 => conv!(f64, 8),
        1024 => conv!(i64, 8),
        1280 => conv!(u64, 8),
        _ => Vec::new(), // rejected by datatype_size before decoding
    }
}

/// Axis codes of an affine: for each voxel axis, the world axis (0 = x/R, 1 = y/A, 2 = z/S) it
/// runs along and the sign (+1: index increases towards R/A/S). Errors, naming the file and how
/// to resample it, if a voxel axis points more than [`OBLIQUE_TOLERANCE`] away from its world
/// axis (an oblique affine), or if the affine is degenerate.
pub fn orientation(path: &Path, affine: &[[f64; 4]; 3]) -> Result<[(usize, i8); 3]> {
    let mut out = [(0usize, 1i8); 3];
    let mut used = [false; 3];
    let mut norms = [0.0; 3];
    // Greedy on the largest normalised components, as nibabel's io_orientation does for
    // non-oblique affines.
    let mut cand: Vec<(f64, usize, usize)> = Vec::new();
    for vox in 0..3 {
        let column: Vec<f64> = affine.iter().map(|row| row[vox]).collect();
        let norm = column.iter().map(|v| v * v).sum::<f64>().sqrt();
        if norm == 0.0 || !norm.is_finite() {
            return Err(err(
                path,
                format!("affine column {vox} is zero or not finite: no orientation"),
            ));
        }
        norms[vox] = norm;
        for (w, v) in column.iter().enumerate() {
            cand.push(((v / norm).abs(), vox, w));
        }
    }
    cand.sort_by(|a, b| b.0.total_cmp(&a.0));
    let mut done = [false; 3];
    for (_, vox, w) in cand {
        if done[vox] || used[w] {
            continue;
        }
        done[vox] = true;
        used[w] = true;
        out[vox] = (w, if affine[w][vox] < 0.0 { -1 } else { 1 });
    }
    for (vox, &(w, _)) in out.iter().enumerate() {
        // The sine of the angle between the voxel axis and its world axis.
        let off = (0..3)
            .filter(|&r| r != w)
            .map(|r| (affine[r][vox] / norms[vox]).powi(2))
            .sum::<f64>()
            .sqrt();
        if off > OBLIQUE_TOLERANCE {
            return Err(err(
                path,
                format!(
                    "the affine is oblique: voxel axis {} points {:.3}° away from world axis {} (ctseg reads axis-aligned volumes, within {:.3}°); {RESAMPLE_HINT}",
                    ["i", "j", "k"][vox],
                    off.min(1.0).asin().to_degrees(),
                    ["x", "y", "z"][w],
                    OBLIQUE_TOLERANCE.asin().to_degrees()
                ),
            ));
        }
    }
    Ok(out)
}

/// A volume in ctseg's canonical axial layout: `data[z][row][col]` with columns running
/// towards the patient's left, rows towards posterior and z towards superior (radiological
/// display: the patient's right on the image's left, anterior at the top).
#[derive(Clone, Debug)]
pub struct Canonical {
    /// Columns, rows, slices.
    pub cols: usize,
    /// Rows per slice.
    pub rows: usize,
    /// Slices.
    pub slices: usize,
    /// Values, column fastest.
    pub data: Vec<f32>,
    /// For each canonical axis (col, row, z): the source voxel axis and whether it is flipped.
    pub axes: Axes,
}

/// For each canonical axis (col, row, z): the source voxel axis and whether it runs backwards.
pub type Axes = [(usize, bool); 3];

/// The canonical axes of `vol`: for (col, row, z), the source voxel axis and whether it runs
/// backwards; and the canonical sizes.
pub fn canonical_axes(vol: &Volume) -> Result<(Axes, [usize; 3])> {
    let o = orientation(&vol.path, &vol.affine)?;
    // Target: col → world x decreasing (towards L), row → y decreasing (towards P), z → S.
    let mut axes = [(0usize, false); 3];
    let want_sign = [-1i8, -1, 1];
    for (vox, &(w, sign)) in o.iter().enumerate() {
        axes[w] = (vox, sign != want_sign[w]);
    }
    let d = vol.dims;
    Ok((axes, [d[axes[0].0], d[axes[1].0], d[axes[2].0]]))
}

/// Canonical sizes (cols, rows, slices) of a volume of `dims`, and the source offset of
/// canonical index `i` along canonical axis `a` (offsets of the three axes add up).
fn canonical_index(dims: [usize; 3], axes: Axes) -> ([usize; 3], impl Fn(usize, usize) -> usize) {
    let n = [dims[axes[0].0], dims[axes[1].0], dims[axes[2].0]];
    let stride = [1usize, dims[0], dims[0] * dims[1]];
    let at = move |a: usize, i: usize| {
        let (src, flip) = axes[a];
        (if flip { n[a] - 1 - i } else { i }) * stride[src]
    };
    (n, at)
}

/// Canonical slice `z` of `data` (a volume of `dims`, i fastest), row-major `rows × cols`.
pub fn canonical_slice<T: Copy>(data: &[T], dims: [usize; 3], axes: Axes, z: usize) -> Vec<T> {
    let (n, at) = canonical_index(dims, axes);
    let base_z = at(2, z);
    let mut out = Vec::with_capacity(n[0] * n[1]);
    for r in 0..n[1] {
        let base = base_z + at(1, r);
        out.extend((0..n[0]).map(|c| data[base + at(0, c)]));
    }
    out
}

/// Reorients `vol` to the canonical axial layout (see [`Canonical`]).
pub fn to_canonical(vol: &Volume) -> Result<Canonical> {
    let (axes, n) = canonical_axes(vol)?;
    let mut data = Vec::with_capacity(vol.data.len());
    for z in 0..n[2] {
        data.extend(canonical_slice(&vol.data, vol.dims, axes, z));
    }
    Ok(Canonical {
        cols: n[0],
        rows: n[1],
        slices: n[2],
        data,
        axes,
    })
}

/// Inverse of the canonical layout: `values` (canonical order, column fastest) back into the
/// source voxel order (i fastest) of a volume of `dims` with canonical `axes`.
pub fn from_canonical<T: Copy + Default>(values: &[T], dims: [usize; 3], axes: Axes) -> Vec<T> {
    let (n, at) = canonical_index(dims, axes);
    let mut out = vec![T::default(); dims.iter().product()];
    let mut k = 0;
    for z in 0..n[2] {
        let bz = at(2, z);
        for r in 0..n[1] {
            let br = bz + at(1, r);
            for c in 0..n[0] {
                out[br + at(0, c)] = values[k];
                k += 1;
            }
        }
    }
    out
}

impl Canonical {
    /// Inverse of [`to_canonical`]: values in the source volume's voxel order (i fastest).
    pub fn to_source_order(&self, values: &[u8], dims: [usize; 3]) -> Vec<u8> {
        from_canonical(values, dims, self.axes)
    }
}

/// Writes a uint8 volume (a label mask) as NIfTI-1 (gzip-compressed if the name ends in `.gz`)
/// with `affine` as both sform and (for viewers that read only the pixdim) the pixdims of
/// its columns; atomically (temporary file, then rename).
pub fn write_u8(path: &Path, dims: [usize; 3], affine: &[[f64; 4]; 3], data: &[u8]) -> Result<()> {
    if data.len() != dims.iter().product::<usize>() {
        return Err(Error::Invalid(format!(
            "{}: {} values for a {dims:?} volume",
            path.display(),
            data.len()
        )));
    }
    if dims.iter().any(|&d| d == 0 || d > MAX_DIM) {
        return Err(Error::Invalid(format!(
            "{}: a NIfTI-1 volume has 1 to {MAX_DIM} voxels per axis, not {dims:?}",
            path.display(),
        )));
    }
    let mut h = [0u8; 352];
    h[0..4].copy_from_slice(&348i32.to_le_bytes());
    let dim: [i16; 8] = [
        3,
        dims[0] as i16,
        dims[1] as i16,
        dims[2] as i16,
        1,
        1,
        1,
        1,
    ];
    for (k, d) in dim.iter().enumerate() {
        h[40 + 2 * k..42 + 2 * k].copy_from_slice(&d.to_le_bytes());
    }
    h[70..72].copy_from_slice(&2i16.to_le_bytes()); // uint8
    h[72..74].copy_from_slice(&8i16.to_le_bytes()); // bitpix
    let col_norm = |j: usize| (0..3).map(|i| affine[i][j].powi(2)).sum::<f64>().sqrt();
    let pixdim: [f32; 8] = [
        1.0,
        col_norm(0) as f32,
        col_norm(1) as f32,
        col_norm(2) as f32,
        1.0,
        1.0,
        1.0,
        1.0,
    ];
    for (k, p) in pixdim.iter().enumerate() {
        h[76 + 4 * k..80 + 4 * k].copy_from_slice(&p.to_le_bytes());
    }
    h[108..112].copy_from_slice(&352f32.to_le_bytes()); // vox_offset
    h[112..116].copy_from_slice(&1f32.to_le_bytes()); // scl_slope
    h[123] = 10; // xyzt_units: mm, s
    h[254..256].copy_from_slice(&1i16.to_le_bytes()); // sform_code: scanner
    for (r, row) in affine.iter().enumerate() {
        for (c, v) in row.iter().enumerate() {
            h[280 + 16 * r + 4 * c..284 + 16 * r + 4 * c]
                .copy_from_slice(&(*v as f32).to_le_bytes());
        }
    }
    h[344..348].copy_from_slice(b"n+1\0");
    let gz = path.to_string_lossy().to_ascii_lowercase().ends_with(".gz");
    crate::util::fs::write_atomic_with(path, |f| {
        if gz {
            let mut w = flate2::write::GzEncoder::new(f, flate2::Compression::new(6));
            w.write_all(&h)?;
            w.write_all(data)?;
            w.finish()?;
        } else {
            let mut w = std::io::BufWriter::new(f);
            w.write_all(&h)?;
            w.write_all(data)?;
            w.flush()?;
        }
        Ok(())
    })
}
