//! `ctseg prepare`: real CT volumes (LiTS-style NIfTI pairs, a folder or a CSV manifest) into a
//! slice-shard dataset — canonical axial orientation, grid checks, the liver's z-range plus a
//! margin, resizing, k folds by volume — written into a temporary directory renamed at the end.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use super::dataset::{MANIFEST, Manifest, ShardEntry, VolumeEntry};
use super::nifti::{self, Volume};
use super::shard::ShardData;
use crate::error::{Error, Result};
use crate::rng::Rng;
use crate::util::fs::create_dir_atomic;

/// How images are resized to the training size (labels always take the nearest voxel).
/// Recorded in the dataset's manifest and the run's provenance, so that inference resizes its
/// inputs the way the training images were.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Resize {
    /// Nearest neighbour (the study's choice).
    #[default]
    Nearest,
    /// Mean over the source pixels each target pixel covers (anti-aliased downsampling).
    Area,
}

/// What `prepare` does.
#[derive(Clone, Debug)]
pub struct PrepareOptions {
    /// A LiTS-layout folder, or a CSV file of `image,label` rows.
    pub input: PathBuf,
    /// Output dataset directory (must not exist).
    pub out: PathBuf,
    /// Slice size after resizing (square).
    pub size: usize,
    /// Number of cross-validation folds (1: none).
    pub folds: usize,
    /// Slices kept above and below the liver's z-range.
    pub margin: usize,
    /// Image resizing.
    pub resize: Resize,
    /// Slices per shard file.
    pub per_shard: usize,
    /// Seed of the fold assignment.
    pub seed: u64,
    /// No per-volume progress lines.
    pub quiet: bool,
}

/// One (image, label) pair to prepare.
#[derive(Clone, Debug, PartialEq)]
pub struct Pair {
    /// CT volume.
    pub image: PathBuf,
    /// Label volume (0 background, 1 liver, 2 tumour).
    pub label: PathBuf,
}

/// What was prepared.
#[derive(Clone, Debug, Serialize)]
pub struct PrepareSummary {
    /// Volumes written.
    pub volumes: usize,
    /// Volumes skipped because their label has no liver.
    pub skipped_no_liver: Vec<String>,
    /// Slices written.
    pub slices: usize,
    /// Seconds.
    pub seconds: f64,
}

fn is_nifti(name: &str) -> bool {
    let n = name.to_ascii_lowercase();
    n.ends_with(".nii") || n.ends_with(".nii.gz")
}

/// The number N in `prefix-N.nii[.gz]`.
fn lits_number(name: &str, prefix: &str) -> Option<u64> {
    let rest = name.strip_prefix(prefix)?;
    let digits: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
    let tail = &rest[digits.len()..];
    if digits.is_empty() || !is_nifti(tail) || !(tail == ".nii" || tail == ".nii.gz") {
        return None;
    }
    digits.parse().ok()
}

/// The (image, label) pairs of `input`: a folder with LiTS names (`volume-N.nii[.gz]` and
/// `segmentation-N.nii[.gz]`, possibly in sub-folders one level down), or a CSV file whose rows
/// are `image,label` (a header row naming the columns is allowed; relative paths are relative
/// to the CSV's folder).
pub fn find_pairs(input: &Path) -> Result<Vec<Pair>> {
    let meta = fs::metadata(input).map_err(|e| Error::io(input, e))?;
    if meta.is_file() {
        return read_csv(input);
    }
    let mut images: BTreeMap<u64, PathBuf> = BTreeMap::new();
    let mut labels: BTreeMap<u64, PathBuf> = BTreeMap::new();
    let mut dirs = vec![input.to_path_buf()];
    if let Ok(rd) = fs::read_dir(input) {
        for e in rd.flatten() {
            if e.path().is_dir() {
                dirs.push(e.path());
            }
        }
    }
    for dir in dirs {
        let rd = fs::read_dir(&dir).map_err(|e| Error::io(&dir, e))?;
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let (map, n, what) = if let Some(n) = lits_number(&name, "volume-") {
                (&mut images, n, "volume")
            } else if let Some(n) = lits_number(&name, "segmentation-") {
                (&mut labels, n, "segmentation")
            } else {
                continue;
            };
            if let Some(prev) = map.insert(n, e.path()) {
                return Err(Error::dataset(
                    e.path(),
                    format!("{what} {n} appears twice (also {})", prev.display()),
                ));
            }
        }
    }
    if images.is_empty() {
        return Err(Error::dataset(
            input,
            "no volume-N.nii or volume-N.nii.gz files (LiTS layout); pass a folder of them or a CSV of image,label pairs",
        ));
    }
    let mut pairs = Vec::new();
    for (n, image) in images {
        let label = labels.remove(&n).ok_or_else(|| {
            Error::dataset(&image, format!("no segmentation-{n}.nii[.gz] next to it"))
        })?;
        pairs.push(Pair { image, label });
    }
    if let Some((n, label)) = labels.into_iter().next() {
        return Err(Error::dataset(
            &label,
            format!("no volume-{n}.nii[.gz] for this segmentation"),
        ));
    }
    Ok(pairs)
}

fn read_csv(path: &Path) -> Result<Vec<Pair>> {
    let text = fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let base = path.parent().unwrap_or(Path::new("."));
    let mut pairs = Vec::new();
    // Each image once: a volume listed twice would become two volumes of the dataset, which
    // the split by volume or fold could put on both sides (training and validation).
    let mut images: BTreeMap<FileKey, usize> = BTreeMap::new();
    for (k, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let fields: Vec<&str> = line
            .split(',')
            .map(|f| f.trim().trim_matches('"'))
            .collect();
        if fields.len() < 2 {
            return Err(Error::dataset(
                path,
                format!(
                    "line {}: expected two columns image,label, got {line:?}",
                    k + 1
                ),
            ));
        }
        let resolve = |f: &str| {
            let p = PathBuf::from(f);
            if p.is_absolute() { p } else { base.join(p) }
        };
        let (image, label) = (resolve(fields[0]), resolve(fields[1]));
        if pairs.is_empty()
            && !image.exists()
            && !label.exists()
            && !is_nifti(fields[0])
            && !is_nifti(fields[1])
        {
            continue; // a header row
        }
        for (p, what) in [(&image, "image"), (&label, "label")] {
            if !p.exists() {
                return Err(Error::dataset(
                    path,
                    format!("line {}: {what} {} does not exist", k + 1, p.display()),
                ));
            }
        }
        if let Some(first) = images.insert(FileKey::of(&image), k + 1) {
            return Err(Error::dataset(
                path,
                format!(
                    "line {}: image {} is the image of line {first} too (the same file, after resolving paths); list each volume once, or its slices could land in training and validation",
                    k + 1,
                    image.display()
                ),
            ));
        }
        pairs.push(Pair { image, label });
    }
    if pairs.is_empty() {
        return Err(Error::dataset(path, "no image,label rows"));
    }
    Ok(pairs)
}

/// What makes two paths the same file: the resolved path (symlinks, `.` and `..`), and on Unix
/// the device and inode (hard links).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum FileKey {
    Inode(u64, u64),
    Path(PathBuf),
}

impl FileKey {
    fn of(p: &Path) -> Self {
        #[cfg(unix)]
        {
            use std::os::unix::fs::MetadataExt;
            if let Ok(m) = fs::metadata(p) {
                return Self::Inode(m.dev(), m.ino());
            }
        }
        Self::Path(crate::util::fs::resolve(p))
    }
}

/// Reads an image volume: a NIfTI file, or a folder holding one DICOM series.
pub fn read_volume(path: &Path) -> Result<Volume> {
    if path.is_dir() {
        return super::dicom::read_series(path);
    }
    nifti::read(path)
}

/// Checks that the label shares the image's grid: same dimensions and affines equal within
/// 1e-3·(1 + |value|) per element.
pub fn check_same_grid(image: &Volume, label: &Volume) -> Result<()> {
    if image.dims != label.dims {
        return Err(Error::dataset(
            &label.path,
            format!(
                "dims {:?} differ from the image {} with dims {:?}",
                label.dims,
                image.path.display(),
                image.dims
            ),
        ));
    }
    for r in 0..3 {
        for c in 0..4 {
            let (a, b) = (image.affine[r][c], label.affine[r][c]);
            if (a - b).abs() > 1e-3 * (1.0 + a.abs()) {
                return Err(Error::dataset(
                    &label.path,
                    format!(
                        "affine[{r}][{c}] = {b} differs from {a} in the image {}: image and label are not on the same grid",
                        image.path.display()
                    ),
                ));
            }
        }
    }
    Ok(())
}

/// Label voxels as u8, or an error naming the first voxel that is not 0, 1 or 2.
pub fn label_values(label: &Volume) -> Result<Vec<u8>> {
    let d = label.dims;
    label
        .data
        .iter()
        .enumerate()
        .map(|(k, &v)| {
            if v == 0.0 || v == 1.0 || v == 2.0 {
                Ok(v as u8)
            } else {
                Err(Error::dataset(
                    &label.path,
                    format!(
                        "voxel ({}, {}, {}) has label {v}; expected 0 (background), 1 (liver) or 2 (tumour)",
                        k % d[0],
                        k / d[0] % d[1],
                        k / (d[0] * d[1])
                    ),
                ))
            }
        })
        .collect()
}

/// Source index of target pixel `t` of `n_out` along an axis of `n_in` (nearest, centres).
/// The readers refuse empty images, so `n_in` is at least 1.
fn nearest(t: usize, n_in: usize, n_out: usize) -> usize {
    (((t as f64 + 0.5) * n_in as f64 / n_out as f64) as usize).min(n_in.saturating_sub(1))
}

/// Mean of `src` over rows `r0..r1` and columns `c0..c1` (the area resize's reducer).
pub type AreaFn<'a, T> = &'a dyn Fn(&[T], usize, usize, usize, usize) -> T;

/// Resizes one `rows × cols` slice to `size × size`: nearest, or with `area` over the source
/// pixels each target pixel covers.
pub fn resize_slice<T: Copy>(
    src: &[T],
    rows: usize,
    cols: usize,
    size: usize,
    area: Option<AreaFn<'_, T>>,
) -> Vec<T> {
    let mut out = Vec::with_capacity(size * size);
    for r in 0..size {
        for c in 0..size {
            match area {
                Some(f) => {
                    let r0 = r * rows / size;
                    let r1 = ((r + 1) * rows).div_ceil(size).max(r0 + 1).min(rows);
                    let c0 = c * cols / size;
                    let c1 = ((c + 1) * cols).div_ceil(size).max(c0 + 1).min(cols);
                    out.push(f(src, r0, r1, c0, c1));
                }
                None => out.push(src[nearest(r, rows, size) * cols + nearest(c, cols, size)]),
            }
        }
    }
    out
}

/// Resizes one `rows × cols` image slice to `size × size` the way `mode` says: the one resize
/// of images that `prepare` and inference share.
pub fn resize_image(src: &[f32], rows: usize, cols: usize, size: usize, mode: Resize) -> Vec<f32> {
    match mode {
        Resize::Nearest => resize_slice(src, rows, cols, size, None),
        Resize::Area => {
            let mean = move |src: &[f32], r0: usize, r1: usize, c0: usize, c1: usize| {
                let mut sum = 0.0f64;
                for r in r0..r1 {
                    for c in c0..c1 {
                        sum += src[r * cols + c] as f64;
                    }
                }
                (sum / ((r1 - r0) * (c1 - c0)) as f64) as f32
            };
            resize_slice(src, rows, cols, size, Some(&mean))
        }
    }
}

fn hu_i16(v: f32) -> i16 {
    v.round().clamp(i16::MIN as f32, i16::MAX as f32) as i16
}

/// The kept slice range of a canonical label volume: the liver's z-range ± `margin`, or `None`
/// if there is no liver.
pub fn liver_range(
    label: &[u8],
    slice_px: usize,
    slices: usize,
    margin: usize,
) -> Option<(usize, usize)> {
    let has = |z: usize| {
        label[z * slice_px..(z + 1) * slice_px]
            .iter()
            .any(|&l| l >= 1)
    };
    let lo = (0..slices).find(|&z| has(z))?;
    let hi = (0..slices).rev().find(|&z| has(z))?;
    Some((
        lo.saturating_sub(margin),
        hi.saturating_add(margin).min(slices - 1),
    ))
}

/// Runs `prepare`.
pub fn prepare(opts: &PrepareOptions) -> Result<(Manifest, PrepareSummary)> {
    let start = Instant::now();
    if opts.size == 0 || opts.folds == 0 || opts.per_shard == 0 {
        return Err(Error::Argument(
            "prepare: --size, --folds and --shard-slices must be at least 1".into(),
        ));
    }
    let pairs = find_pairs(&opts.input)?;
    create_dir_atomic(&opts.out, |tmp| prepare_into(opts, &pairs, tmp, start))
}

struct ShardSink<'a> {
    dir: &'a Path,
    size: usize,
    per_shard: usize,
    current: ShardData,
    shards: Vec<ShardEntry>,
}

impl ShardSink<'_> {
    fn push(&mut self, volume: u32, slice: u32, image: &[i16], label: &[u8]) -> Result<()> {
        self.current.push(volume, slice, image, label);
        if self.current.len() >= self.per_shard {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<()> {
        if self.current.is_empty() {
            return Ok(());
        }
        let file = format!("shard-{:05}.ctshard", self.shards.len());
        self.current.write(&self.dir.join(&file))?;
        self.shards.push(ShardEntry {
            file,
            slices: self.current.len(),
        });
        self.current = ShardData::new(self.size, self.size);
        Ok(())
    }
}

fn prepare_into(
    opts: &PrepareOptions,
    pairs: &[Pair],
    dir: &Path,
    start: Instant,
) -> Result<(Manifest, PrepareSummary)> {
    // 1. Every pair's liver slices into the shards; volumes without liver are skipped.
    let mut sink = ShardSink {
        dir,
        size: opts.size,
        per_shard: opts.per_shard,
        current: ShardData::new(opts.size, opts.size),
        shards: Vec::new(),
    };
    let mut volumes = Vec::new();
    let mut skipped = Vec::new();
    for (k, pair) in pairs.iter().enumerate() {
        let progress = format!("[{}/{}]", k + 1, pairs.len());
        let id = volumes.len() as u32;
        match prepare_volume(opts, pair, id, &mut sink, &progress)? {
            Prepared::Kept(entry) => volumes.push(entry),
            Prepared::NoLiver(name) => skipped.push(name),
        }
    }
    sink.flush()?;
    if volumes.is_empty() {
        return Err(Error::dataset(
            &opts.input,
            "no volume has any liver voxel (label 1 or 2); nothing to train on",
        ));
    }
    // 2. Folds by patient, when asked for.
    assign_folds(opts, &mut volumes)?;
    // 3. The manifest.
    let slices = volumes.iter().map(|v| v.slices).sum();
    let manifest = Manifest {
        format: "ctseg-dataset".into(),
        version: 1,
        height: opts.size,
        width: opts.size,
        slices,
        shards: sink.shards,
        volumes,
        source: format!(
            "prepare {} (size {}, margin {}, resize {:?}, folds {})",
            opts.input.display(),
            opts.size,
            opts.margin,
            opts.resize,
            opts.folds
        ),
        resize: opts.resize,
    };
    let mpath = dir.join(MANIFEST);
    let text = serde_json::to_string_pretty(&manifest)
        .map_err(|e| Error::Invalid(format!("serialising the manifest: {e}")))?;
    fs::write(&mpath, text).map_err(|e| Error::io(&mpath, e))?;
    let summary = PrepareSummary {
        volumes: manifest.volumes.len(),
        skipped_no_liver: skipped,
        slices,
        seconds: start.elapsed().as_secs_f64(),
    };
    Ok((manifest, summary))
}

/// What became of one image/label pair.
enum Prepared {
    /// Its liver slices are in the shards.
    Kept(VolumeEntry),
    /// The volume (its name) has no liver: skipped, not an error.
    NoLiver(String),
}

/// Reads one image/label pair and pushes its liver slices (with `opts.margin` slices each side),
/// in the canonical layout and resized, into `sink` as volume `id`.
fn prepare_volume(
    opts: &PrepareOptions,
    pair: &Pair,
    id: u32,
    sink: &mut ShardSink,
    progress: &str,
) -> Result<Prepared> {
    let t = Instant::now();
    let s = opts.size;
    // 1. Both files, on one grid, with valid labels.
    let image = read_volume(&pair.image)?;
    let label = nifti::read(&pair.label)?;
    check_same_grid(&image, &label)?;
    let lab = label_values(&label)?;
    // 2. The labels in the canonical layout whole (to find the liver's z-range); the image
    //    only slice by slice, for the slices kept.
    let (axes, n3) = nifti::canonical_axes(&image)?;
    let (cols, rows, nz) = (n3[0], n3[1], n3[2]);
    let mut cl = Vec::with_capacity(lab.len());
    for z in 0..nz {
        cl.extend(nifti::canonical_slice(&lab, label.dims, axes, z));
    }
    drop(lab);
    drop(label);
    let px = rows * cols;
    let name = pair
        .image
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let Some((lo, hi)) = liver_range(&cl, px, nz, opts.margin) else {
        if !opts.quiet {
            eprintln!(
                "{progress} {name}: no liver in {}, skipped",
                pair.label.display()
            );
        }
        return Ok(Prepared::NoLiver(name));
    };
    // 3. The kept slices, resized, into the shards.
    let mut counts = [0u64; 3];
    for z in lo..=hi {
        let img = nifti::canonical_slice(&image.data, image.dims, axes, z);
        let img_r = resize_image(&img, rows, cols, s, opts.resize);
        let lab_r = resize_slice(&cl[z * px..(z + 1) * px], rows, cols, s, None);
        for &l in &lab_r {
            counts[l as usize] += 1;
        }
        let hu: Vec<i16> = img_r.into_iter().map(hu_i16).collect();
        sink.push(id, (z - lo) as u32, &hu, &lab_r)?;
    }
    let n = hi - lo + 1;
    if !opts.quiet {
        eprintln!(
            "{progress} {name}: {}x{}x{} voxels ({:.2}x{:.2}x{:.2} mm) -> {n} slices (z {lo}..={hi}) at {s}x{s}, {:.1} s",
            image.dims[0],
            image.dims[1],
            image.dims[2],
            image.spacing[0],
            image.spacing[1],
            image.spacing[2],
            t.elapsed().as_secs_f64()
        );
    }
    Ok(Prepared::Kept(VolumeEntry {
        id,
        name,
        slices: n,
        label_counts: counts,
        fold: None,
    }))
}

/// With `--folds K` (K > 1), puts the volumes into K folds by a shuffle of `opts.seed`, so that
/// cross-validation splits by patient.
fn assign_folds(opts: &PrepareOptions, volumes: &mut [VolumeEntry]) -> Result<()> {
    if opts.folds <= 1 {
        return Ok(());
    }
    if opts.folds > volumes.len() {
        return Err(Error::Argument(format!(
            "prepare: --folds {} but only {} volumes with liver",
            opts.folds,
            volumes.len()
        )));
    }
    let mut order: Vec<usize> = (0..volumes.len()).collect();
    Rng::new(opts.seed).shuffle(&mut order);
    for (pos, &v) in order.iter().enumerate() {
        volumes[v].fold = Some(pos % opts.folds);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn area_resizing_averages_what_nearest_picks_from() {
        // A 4 × 4 ramp 0..16 to 2 × 2: area takes the mean of each 2 × 2 block (by hand:
        // (0+1+4+5)/4 = 2.5, (2+3+6+7)/4 = 4.5, 10.5, 12.5); nearest takes the pixel at
        // source centre (2t + 1): rows/columns 1 and 3.
        let src: Vec<f32> = (0..16).map(|v| v as f32).collect();
        assert_eq!(
            resize_image(&src, 4, 4, 2, Resize::Area),
            vec![2.5, 4.5, 10.5, 12.5]
        );
        assert_eq!(
            resize_image(&src, 4, 4, 2, Resize::Nearest),
            vec![5.0, 7.0, 13.0, 15.0]
        );
    }
}
