//! A dataset of labelled axial slices: a directory of shards plus a `dataset.json` manifest, or
//! phantoms generated in memory; the `[data]` config section; the split by volume id.

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::phantom;
use super::prepare::Resize;
use super::shard::ShardData;
use crate::error::{Error, Result};
use crate::rng::{Rng, keys};

/// Manifest file name inside a dataset directory.
pub const MANIFEST: &str = "dataset.json";

/// How HU values become network inputs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Intensity {
    /// Raw HU as f32 (livermask: the first BatchNorm normalises).
    Raw,
    /// Clip to `window = [lo, hi]` and map linearly to [0, 1].
    Window,
}

/// Data-parallel sampling.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Sampling {
    /// Each rank takes every N-th index of one shared permutation per epoch.
    Sharded,
    /// Every rank samples from the whole set (livermask/Horovod as the study ran it).
    Independent,
}

/// The `[data]` section.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    /// `raw` or `window`.
    pub intensity: Intensity,
    /// `[lo, hi]` HU for `intensity = "window"`.
    pub window: [f64; 2],
    /// Fraction of volumes (patients) held out for validation.
    pub val_fraction: f64,
    /// Phantom volumes generated when no `--data` is given.
    pub phantom_volumes: usize,
    /// Slices per phantom volume.
    pub phantom_slices: usize,
    /// Batches prepared ahead by the loader thread.
    pub prefetch: usize,
    /// `sharded` or `independent`.
    pub sampling: Sampling,
    /// Cross-validation fold held out for validation (a dataset prepared with `--folds`);
    /// unset: `val_fraction` of the volumes. Usually given as `ctseg train --fold i`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fold: Option<usize>,
    /// 2.5-D context: the network also sees the `context_slices` slices above and below, as
    /// extra input channels (2k + 1 in all; edge slices repeated). Optional, default 0.
    #[serde(default)]
    pub context_slices: usize,
    /// Class-balanced sampling: the share of every training batch drawn from slices with
    /// tumour (label 2), as nnU-Net oversamples foreground. Optional, default 0 (off).
    #[serde(default)]
    pub oversample_tumour: f64,
}

impl DataConfig {
    /// Checks the values.
    pub fn validate(&self, source: &str) -> Result<()> {
        let bad = |field: &str, message: String| Error::ConfigValue {
            source_name: source.to_string(),
            field: format!("data.{field}"),
            message,
        };
        if self.intensity == Intensity::Window
            && self.window[1].partial_cmp(&self.window[0]) != Some(std::cmp::Ordering::Greater)
        {
            return Err(bad(
                "window",
                format!("must be [lo, hi] with lo < hi, got {:?}", self.window),
            ));
        }
        if !(self.val_fraction > 0.0 && self.val_fraction < 1.0) {
            return Err(bad(
                "val_fraction",
                format!("must be in (0, 1), got {}", self.val_fraction),
            ));
        }
        if self.phantom_volumes < 2 {
            return Err(bad(
                "phantom_volumes",
                format!(
                    "must be at least 2 (one for training, one for validation), got {}",
                    self.phantom_volumes
                ),
            ));
        }
        if self.phantom_slices == 0 {
            return Err(bad("phantom_slices", "must be at least 1".into()));
        }
        if self.prefetch == 0 {
            return Err(bad("prefetch", "must be at least 1".into()));
        }
        if !(0.0..=1.0).contains(&self.oversample_tumour) {
            return Err(bad(
                "oversample_tumour",
                format!("must be in [0, 1], got {}", self.oversample_tumour),
            ));
        }
        if self.context_slices > MAX_CONTEXT_SLICES {
            return Err(bad(
                "context_slices",
                format!(
                    "must be at most {MAX_CONTEXT_SLICES}, got {}",
                    self.context_slices
                ),
            ));
        }
        Ok(())
    }

    /// Input channels of the network: the slice and its context on both sides.
    pub fn in_channels(&self) -> usize {
        1 + 2 * self.context_slices
    }

    /// The input values of air, water and one HU under this intensity transform (what the
    /// augmentation fills and scales with).
    pub fn input_scale(&self) -> super::augment::InputScale {
        match self.intensity {
            Intensity::Raw => super::augment::InputScale::raw(),
            Intensity::Window => super::augment::InputScale::window(self.window[0], self.window[1]),
        }
    }

    /// Maps one HU value to a network input.
    pub fn transform(&self, hu: i16) -> f32 {
        match self.intensity {
            Intensity::Raw => hu as f32,
            Intensity::Window => {
                let [lo, hi] = self.window;
                (((hu as f64).clamp(lo, hi) - lo) / (hi - lo)) as f32
            }
        }
    }
}

/// One shard as listed in the manifest.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ShardEntry {
    /// File name relative to the dataset directory.
    pub file: String,
    /// Slices in it.
    pub slices: usize,
}

/// One volume as listed in the manifest.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VolumeEntry {
    /// Volume id (as stored per slice in the shards).
    pub id: u32,
    /// Human-readable origin (a file name, or `phantom-<id>`).
    pub name: String,
    /// Slices of this volume in the dataset.
    pub slices: usize,
    /// Pixels per label value 0, 1, 2.
    pub label_counts: [u64; 3],
    /// Cross-validation fold, when the dataset was prepared with folds.
    pub fold: Option<usize>,
}

/// `dataset.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Always `"ctseg-dataset"`.
    pub format: String,
    /// Manifest version (1).
    pub version: u32,
    /// Slice height.
    pub height: usize,
    /// Slice width.
    pub width: usize,
    /// Total slices.
    pub slices: usize,
    /// Shards in order.
    pub shards: Vec<ShardEntry>,
    /// Volumes.
    pub volumes: Vec<VolumeEntry>,
    /// Where the data came from.
    pub source: String,
    /// How `prepare` resized the images (absent from older datasets, which were resized by
    /// nearest neighbour; phantoms are generated at their size and say `nearest`).
    #[serde(default)]
    pub resize: Resize,
}

/// The most context slices on each side (`data.context_slices`).
pub const MAX_CONTEXT_SLICES: usize = 8;

/// Labelled slices in memory.
#[derive(Clone, Debug)]
pub struct Dataset {
    /// Where it came from (a directory or a phantom description).
    pub origin: String,
    /// FNV-1a of the manifest (a directory) or of the phantom parameters (hex): two copies of
    /// a dataset with equal fingerprints hold the same slices, volumes and folds.
    pub fingerprint: String,
    /// Slice height = width.
    pub size: usize,
    /// `len · size²` HU values.
    pub images: Vec<i16>,
    /// `len · size²` labels.
    pub labels: Vec<u8>,
    /// Volume id per slice.
    pub volume_ids: Vec<u32>,
    /// Slice index within its volume.
    pub slice_indices: Vec<u32>,
    /// Names per volume id (for the manifest).
    pub volume_names: BTreeMap<u32, String>,
    /// Cross-validation fold per volume id (datasets prepared with folds).
    pub folds: BTreeMap<u32, usize>,
    /// (volume id, slice index) → slice, built on first use by [`Dataset::context`].
    pub positions: std::sync::OnceLock<std::collections::HashMap<(u32, u32), usize>>,
    /// How the images were resized when the dataset was prepared (inference resizes its
    /// inputs the same way).
    pub resize: Resize,
}

impl Dataset {
    /// Number of slices.
    pub fn len(&self) -> usize {
        self.volume_ids.len()
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.volume_ids.is_empty()
    }

    /// Pixels per slice.
    pub fn pixels(&self) -> usize {
        self.size * self.size
    }

    /// HU values of slice `i`.
    pub fn image(&self, i: usize) -> &[i16] {
        let p = self.pixels();
        &self.images[i * p..(i + 1) * p]
    }

    /// Labels of slice `i`.
    pub fn label(&self, i: usize) -> &[u8] {
        let p = self.pixels();
        &self.labels[i * p..(i + 1) * p]
    }

    /// Slice `i` with its `k` neighbours on each side, as dataset indices from z − k to z + k
    /// (z = its index in its volume). A neighbour the dataset lacks (beyond the volume's first or
    /// last slice kept) repeats the nearest slice it has on that side: edge slices repeated.
    pub fn context(&self, i: usize, k: usize) -> Vec<usize> {
        if k == 0 {
            return vec![i];
        }
        let at = self.positions.get_or_init(|| {
            self.volume_ids
                .iter()
                .zip(&self.slice_indices)
                .enumerate()
                .map(|(i, (&v, &z))| ((v, z), i))
                .collect()
        });
        let (v, z) = (self.volume_ids[i], self.slice_indices[i]);
        let side = |dir: i64| {
            let mut out = Vec::with_capacity(k);
            let mut last = i;
            for j in 1..=k as i64 {
                let zz = i64::from(z) + dir * j;
                if let Ok(zz) = u32::try_from(zz)
                    && let Some(&n) = at.get(&(v, zz))
                {
                    last = n;
                }
                out.push(last);
            }
            out
        };
        let mut below = side(-1);
        below.reverse();
        below.push(i);
        below.extend(side(1));
        below
    }

    /// Whether slice `i` holds label `l`.
    pub fn has_label(&self, i: usize, l: u8) -> bool {
        self.label(i).contains(&l)
    }

    /// Keeps the first `n` slices (and the volumes they belong to).
    pub fn truncate(&mut self, n: usize) {
        let n = n.min(self.len());
        let px = self.pixels();
        self.images.truncate(n * px);
        self.labels.truncate(n * px);
        self.volume_ids.truncate(n);
        self.slice_indices.truncate(n);
        let kept: std::collections::BTreeSet<u32> = self.volume_ids.iter().copied().collect();
        self.volume_names.retain(|v, _| kept.contains(v));
        self.folds.retain(|v, _| kept.contains(v));
        self.positions = Default::default();
    }

    /// Generates `volumes × slices` phantom slices of `size²` with `threads` worker threads.
    pub fn phantom(seed: u64, volumes: usize, slices: usize, size: usize, threads: usize) -> Self {
        let total = volumes * slices;
        let px = size * size;
        let mut images = vec![0i16; total * px];
        let mut labels = vec![0u8; total * px];
        let threads = threads.clamp(1, total.max(1));
        let per = total.div_ceil(threads);
        std::thread::scope(|s| {
            for (t, (img_chunk, lab_chunk)) in images
                .chunks_mut(per * px)
                .zip(labels.chunks_mut(per * px))
                .enumerate()
            {
                s.spawn(move || {
                    for (k, (img, lab)) in img_chunk
                        .chunks_mut(px)
                        .zip(lab_chunk.chunks_mut(px))
                        .enumerate()
                    {
                        let idx = t * per + k;
                        let (v, sl) = (idx / slices, idx % slices);
                        let g = phantom::generate(seed, v as u64, sl as u64, slices as u64, size);
                        img.copy_from_slice(&g.hu);
                        lab.copy_from_slice(&g.label);
                    }
                });
            }
        });
        let volume_ids = (0..total).map(|i| (i / slices) as u32).collect();
        let slice_indices = (0..total).map(|i| (i % slices) as u32).collect();
        let volume_names = (0..volumes as u32)
            .map(|v| (v, format!("phantom-{v}")))
            .collect();
        let origin =
            format!("phantom(seed {seed}, {volumes} volumes x {slices} slices, {size}x{size})");
        Self {
            fingerprint: format!("{:016x}", crate::util::fnv1a(origin.bytes())),
            origin,
            size,
            images,
            labels,
            volume_ids,
            slice_indices,
            volume_names,
            folds: BTreeMap::new(),
            positions: Default::default(),
            resize: Resize::Nearest,
        }
    }

    /// Reads a dataset directory, verifying every shard's checksum and the manifest's counts.
    pub fn open(dir: &Path) -> Result<Self> {
        // 1. The manifest, checked before it names anything to read.
        let mpath = dir.join(MANIFEST);
        let (m, text) = read_manifest(&mpath, dir)?;
        m.check(&mpath, dir)?;
        let mut ds = Self {
            origin: dir.display().to_string(),
            fingerprint: format!("{:016x}", crate::util::fnv1a(text.bytes())),
            size: m.height,
            images: Vec::new(),
            labels: Vec::new(),
            volume_ids: Vec::new(),
            slice_indices: Vec::new(),
            volume_names: m.volumes.iter().map(|v| (v.id, v.name.clone())).collect(),
            folds: m
                .volumes
                .iter()
                .filter_map(|v| v.fold.map(|f| (v.id, f)))
                .collect(),
            positions: Default::default(),
            resize: m.resize,
        };
        // 2. Every shard, as the manifest describes it.
        for entry in &m.shards {
            ds.append_shard(&dir.join(&entry.file), entry, &m)?;
        }
        // 3. The totals.
        if ds.len() != m.slices {
            return Err(Error::dataset(
                &mpath,
                format!("lists {} slices, the shards hold {}", m.slices, ds.len()),
            ));
        }
        if ds.is_empty() {
            return Err(Error::dataset(&mpath, "the dataset holds no slices"));
        }
        Ok(ds)
    }

    /// Reads the shard at `path` (checksummed) and appends its slices, after checking them
    /// against the manifest `m` and its `entry`.
    fn append_shard(&mut self, path: &Path, entry: &ShardEntry, m: &Manifest) -> Result<()> {
        let shard = ShardData::read(path)?;
        if shard.height != m.height || shard.width != m.width {
            return Err(Error::dataset(
                path,
                format!(
                    "slices are {}x{}, the manifest says {}x{}",
                    shard.height, shard.width, m.height, m.width
                ),
            ));
        }
        if shard.len() != entry.slices {
            return Err(Error::dataset(
                path,
                format!(
                    "holds {} slices, the manifest says {}",
                    shard.len(),
                    entry.slices
                ),
            ));
        }
        if let Some(bad) = shard.labels.iter().find(|&&l| l > 2) {
            return Err(Error::dataset(
                path,
                format!("label value {bad} outside {{0, 1, 2}}"),
            ));
        }
        self.images.extend_from_slice(&shard.images);
        self.labels.extend_from_slice(&shard.labels);
        self.volume_ids.extend_from_slice(&shard.volume_ids);
        self.slice_indices.extend_from_slice(&shard.slice_indices);
        Ok(())
    }

    /// Writes shards of at most `per_shard` slices and the manifest into `dir`, atomically: all
    /// files go to a temporary sibling directory that is renamed to `dir` at the end. `dir` must
    /// not exist yet.
    pub fn write(&self, dir: &Path, per_shard: usize, source: &str) -> Result<Manifest> {
        crate::util::fs::create_dir_atomic(dir, |tmp| {
            self.write_into(tmp, per_shard.max(1), source)
        })
    }

    fn write_into(&self, dir: &Path, per_shard: usize, source: &str) -> Result<Manifest> {
        let px = self.pixels();
        let mut shards = Vec::new();
        let mut start = 0;
        while start < self.len() {
            let end = (start + per_shard).min(self.len());
            let mut s = ShardData::new(self.size, self.size);
            for i in start..end {
                s.push(
                    self.volume_ids[i],
                    self.slice_indices[i],
                    self.image(i),
                    self.label(i),
                );
            }
            let file = format!("shard-{:05}.ctshard", shards.len());
            s.write(&dir.join(&file))?;
            shards.push(ShardEntry {
                file,
                slices: end - start,
            });
            start = end;
        }
        let mut volumes: BTreeMap<u32, VolumeEntry> = BTreeMap::new();
        for i in 0..self.len() {
            let id = self.volume_ids[i];
            let e = volumes.entry(id).or_insert_with(|| VolumeEntry {
                id,
                name: self
                    .volume_names
                    .get(&id)
                    .cloned()
                    .unwrap_or_else(|| format!("volume-{id}")),
                slices: 0,
                label_counts: [0; 3],
                fold: self.folds.get(&id).copied(),
            });
            e.slices += 1;
            for &l in &self.labels[i * px..(i + 1) * px] {
                e.label_counts[(l as usize).min(2)] += 1;
            }
        }
        let m = Manifest {
            format: "ctseg-dataset".into(),
            version: 1,
            height: self.size,
            width: self.size,
            slices: self.len(),
            shards,
            volumes: volumes.into_values().collect(),
            source: source.into(),
            resize: self.resize,
        };
        let mpath = dir.join(MANIFEST);
        let text = serde_json::to_string_pretty(&m)
            .map_err(|e| Error::Invalid(format!("serialising the manifest: {e}")))?;
        fs::write(&mpath, text).map_err(|e| Error::io(&mpath, e))?;
        Ok(m)
    }

    /// The (train, validation) split the config asks for: by fold if `data.fold` is set, else
    /// [`Dataset::split_by_volume`].
    pub fn split(&self, cfg: &DataConfig, seed: u64) -> Result<(Vec<usize>, Vec<usize>)> {
        match cfg.fold {
            Some(f) => self.split_by_fold(f),
            None => self.split_by_volume(cfg.val_fraction, seed),
        }
    }

    /// Validation = the volumes of fold `fold`, training = all other volumes.
    pub fn split_by_fold(&self, fold: usize) -> Result<(Vec<usize>, Vec<usize>)> {
        let k = self.folds.values().max().map_or(0, |m| m.saturating_add(1));
        if k == 0 {
            return Err(Error::Argument(format!(
                "dataset {} has no folds: prepare it with `ctseg prepare --folds K` to use --fold",
                self.origin
            )));
        }
        if fold >= k {
            return Err(Error::Argument(format!(
                "--fold {fold}: dataset {} has folds 0..{}",
                self.origin,
                k - 1
            )));
        }
        let (mut train, mut valid) = (Vec::new(), Vec::new());
        for (i, v) in self.volume_ids.iter().enumerate() {
            match self.folds.get(v) {
                Some(&f) if f == fold => valid.push(i),
                Some(_) => train.push(i),
                None => {
                    return Err(Error::Argument(format!(
                        "dataset {}: volume {v} has no fold",
                        self.origin
                    )));
                }
            }
        }
        if train.is_empty() {
            return Err(Error::Argument(format!(
                "--fold {fold}: no training volumes left in {}",
                self.origin
            )));
        }
        Ok((train, valid))
    }

    /// Splits slice indices into (train, validation) by volume: `ceil(fraction · volumes)`
    /// volumes (at least one, and at most all but one) chosen by a seeded shuffle go to
    /// validation. No volume contributes slices to both sides.
    pub fn split_by_volume(
        &self,
        val_fraction: f64,
        seed: u64,
    ) -> Result<(Vec<usize>, Vec<usize>)> {
        let mut ids: Vec<u32> = self.volume_ids.clone();
        ids.sort_unstable();
        ids.dedup();
        if ids.len() < 2 {
            return Err(Error::Argument(format!(
                "dataset {} has {} volume(s); a split by volume needs at least 2",
                self.origin,
                ids.len()
            )));
        }
        let mut rng = Rng::stream(seed, &[keys::SPLIT]);
        rng.shuffle(&mut ids);
        let n_val = ((val_fraction * ids.len() as f64).ceil() as usize).clamp(1, ids.len() - 1);
        let val: std::collections::BTreeSet<u32> = ids[..n_val].iter().copied().collect();
        let (mut train, mut valid) = (Vec::new(), Vec::new());
        for (i, v) in self.volume_ids.iter().enumerate() {
            if val.contains(v) {
                valid.push(i)
            } else {
                train.push(i)
            }
        }
        Ok((train, valid))
    }
}

/// The manifest at `mpath` of the dataset `dir`, and its text (the dataset's fingerprint).
fn read_manifest(mpath: &Path, dir: &Path) -> Result<(Manifest, String)> {
    let text = fs::read_to_string(mpath).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            Error::dataset(
                mpath,
                format!(
                    "not found: {} is not a ctseg dataset (make one with `ctseg phantom` or `ctseg prepare`)",
                    dir.display()
                ),
            )
        } else {
            Error::io(mpath, e)
        }
    })?;
    let m: Manifest = serde_json::from_str(&text)
        .map_err(|e| Error::dataset(mpath, format!("invalid manifest: {e}")))?;
    Ok((m, text))
}

impl Manifest {
    /// The manifest is untrusted too: its format, square slices, the shards it names (plain
    /// file names in the dataset directory, each once, so that a small manifest cannot make it
    /// read one shard over and over) and its folds (below the number of volumes, as `prepare`
    /// assigns them).
    fn check(&self, mpath: &Path, dir: &Path) -> Result<()> {
        if self.format != "ctseg-dataset" || self.version != 1 {
            return Err(Error::dataset(
                mpath,
                format!(
                    "format {:?} version {}, expected \"ctseg-dataset\" version 1",
                    self.format, self.version
                ),
            ));
        }
        if self.height != self.width {
            return Err(Error::dataset(
                mpath,
                format!("slices must be square, got {}x{}", self.height, self.width),
            ));
        }
        let mut seen = std::collections::BTreeSet::new();
        for entry in &self.shards {
            let plain = Path::new(&entry.file)
                .file_name()
                .is_some_and(|n| n == std::ffi::OsStr::new(&entry.file));
            if !plain || !seen.insert(entry.file.as_str()) {
                return Err(Error::dataset(
                    mpath,
                    format!(
                        "shard {:?} is {}; expected each shard once, as a file name in {}",
                        entry.file,
                        if plain {
                            "listed twice"
                        } else {
                            "not a plain file name"
                        },
                        dir.display()
                    ),
                ));
            }
        }
        let volumes = self.volumes.len();
        if let Some(v) = self
            .volumes
            .iter()
            .find(|v| v.fold.is_some_and(|f| f >= volumes))
        {
            return Err(Error::dataset(
                mpath,
                format!(
                    "volume {} is in fold {:?}, but there are {volumes} volumes (folds 0..{volumes})",
                    v.id, v.fold
                ),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_never_shares_a_volume() {
        let ds = Dataset::phantom(3, 10, 4, 32, 2);
        let (tr, va) = ds.split_by_volume(0.2, 1).unwrap_or_default();
        assert_eq!(tr.len() + va.len(), 40);
        assert_eq!(va.len(), 8);
        let tv: std::collections::BTreeSet<u32> = tr.iter().map(|&i| ds.volume_ids[i]).collect();
        assert!(va.iter().all(|&i| !tv.contains(&ds.volume_ids[i])));
    }

    #[test]
    fn write_then_open_round_trips() {
        let ds = Dataset::phantom(3, 3, 2, 32, 1);
        let dir = tempfile::tempdir().expect("tempdir");
        let out = dir.path().join("d");
        let m = ds.write(&out, 4, "test").expect("write");
        assert_eq!(m.shards.len(), 2);
        let back = Dataset::open(&out).expect("open");
        assert_eq!(back.images, ds.images);
        assert_eq!(back.labels, ds.labels);
        assert_eq!(back.volume_ids, ds.volume_ids);
        assert!(ds.write(&out, 4, "test").is_err(), "refuses to overwrite");
    }

    #[test]
    fn manifests_without_a_resize_mode_read_as_nearest() {
        // What `prepare` and `phantom` wrote before the mode was recorded.
        let old = r#"{"format":"ctseg-dataset","version":1,"height":32,"width":32,"slices":0,"shards":[],"volumes":[],"source":"prepare x (resize Area)"}"#;
        let m: Manifest = serde_json::from_str(old).expect("old manifest");
        assert_eq!(m.resize, Resize::Nearest);
    }

    #[test]
    fn window_maps_to_unit_interval() {
        let cfg = DataConfig {
            intensity: Intensity::Window,
            window: [-100.0, 300.0],
            val_fraction: 0.1,
            phantom_volumes: 2,
            phantom_slices: 1,
            prefetch: 1,
            sampling: Sampling::Sharded,
            fold: None,
            context_slices: 0,
            oversample_tumour: 0.0,
        };
        assert_eq!(cfg.transform(-1000), 0.0);
        assert_eq!(cfg.transform(100), 0.5);
        assert_eq!(cfg.transform(2000), 1.0);
    }
}
