//! Checkpoints: model weights and BN statistics, optimiser state, position in the run, the
//! config and where the data came from, in one checksummed file written atomically (temporary
//! file, fsync, rename), so a crash, a full disk or a second signal never leaves a half-written
//! checkpoint in place of the last good one.
//!
//! ```text
//! "CTSEGCK\0" | version u32 | 3 × (length u64, bytes): meta JSON, model burnpack, optimiser burnpack | CRC-32 u32
//! ```

use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::util::fs::write_atomic;

/// Which checkpoint of a run a command reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum CheckpointKind {
    /// `best.ctck`: the model of the best validation liver Dice (the last checkpoint when the
    /// run has not validated yet).
    Best,
    /// `checkpoint.ctck`: the last state (what `train --resume` continues from).
    Last,
}

/// Where a run's data came from and how it was split: checked, not trusted, when a run is
/// resumed or validated, so that validation volumes never become training volumes.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Provenance {
    /// The dataset directory, resolved (empty: phantoms generated from the config).
    pub data_dir: String,
    /// FNV-1a hash (hex) of the dataset's manifest, or of the phantom parameters.
    pub data_hash: String,
    /// The validation fold (`None`: split by `data.val_fraction`).
    pub fold: Option<usize>,
    /// The seed of the split.
    pub split_seed: u64,
    /// How the training images were resized (`prepare --resize`; absent from checkpoints of
    /// older versions: nearest). Inference resizes its inputs the same way.
    #[serde(default)]
    pub resize: crate::data::prepare::Resize,
}

const MAGIC: &[u8; 8] = b"CTSEGCK\0";
const VERSION: u32 = 1;

/// Where the run stands.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CheckpointMeta {
    /// Optimiser steps completed.
    pub step: u64,
    /// Epoch (0-based) the next step belongs to.
    pub epoch: u64,
    /// Batches of that epoch already consumed.
    pub batch_in_epoch: u64,
    /// Ranks that wrote it.
    pub world_size: usize,
    /// Global batch (per-rank batch × ranks) at the time.
    pub global_batch: usize,
    /// Wall-clock seconds of training so far (for the time axis of a resumed run).
    pub wall_s: f64,
    /// The resolved run config, as TOML.
    pub config_toml: String,
    /// ctseg version that wrote it.
    pub ctseg_version: String,
    /// The data and split the run trains on (absent from checkpoints of older versions).
    #[serde(default)]
    pub provenance: Provenance,
    /// Validation liver Dice of this checkpoint's model (`None`: not validated).
    #[serde(default)]
    pub val_dice_liver: Option<f64>,
    /// The best validation liver Dice of the run so far (kept across resumes).
    #[serde(default)]
    pub best_dice_liver: Option<f64>,
    /// The step of that validation.
    #[serde(default)]
    pub best_step: u64,
    /// The loss scale of a mixed-precision run (`None`: f32).
    #[serde(default)]
    pub loss_scale: Option<crate::train::scaler::LossScale>,
}

/// A checkpoint in memory.
#[derive(Clone, Debug)]
pub struct Checkpoint {
    /// Position and config.
    pub meta: CheckpointMeta,
    /// `ModuleRecord` burnpack bytes of the model.
    pub model: Vec<u8>,
    /// `ModuleOptimizer` burnpack bytes.
    pub optimizer: Vec<u8>,
}

impl Checkpoint {
    /// Serialises with the trailing CRC.
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let meta = serde_json::to_vec(&self.meta)
            .map_err(|e| Error::Invalid(format!("serialising checkpoint metadata: {e}")))?;
        let mut b = Vec::with_capacity(meta.len() + self.model.len() + self.optimizer.len() + 64);
        b.extend_from_slice(MAGIC);
        b.extend_from_slice(&VERSION.to_le_bytes());
        for part in [&meta, &self.model, &self.optimizer] {
            b.extend_from_slice(&(part.len() as u64).to_le_bytes());
            b.extend_from_slice(part);
        }
        let crc = crc32fast::hash(&b);
        b.extend_from_slice(&crc.to_le_bytes());
        Ok(b)
    }

    /// Parses bytes read from `path`.
    pub fn from_bytes(bytes: &[u8], path: &Path) -> Result<Self> {
        let err = |m: &str| Error::checkpoint(path, m.to_string());
        if bytes.len() < 12 + 24 + 4 || &bytes[..8] != MAGIC {
            return Err(err("not a ctseg checkpoint (bad magic or too short)"));
        }
        let body = &bytes[..bytes.len() - 4];
        let mut crc = [0u8; 4];
        crc.copy_from_slice(&bytes[bytes.len() - 4..]);
        if crc32fast::hash(body) != u32::from_le_bytes(crc) {
            return Err(err("checksum mismatch: the file is corrupt or truncated"));
        }
        let mut v = [0u8; 4];
        v.copy_from_slice(&bytes[8..12]);
        let version = u32::from_le_bytes(v);
        if version != VERSION {
            return Err(Error::checkpoint(
                path,
                format!("version {version}, this ctseg reads version {VERSION}"),
            ));
        }
        let mut o = 12;
        let mut parts = Vec::with_capacity(3);
        for _ in 0..3 {
            if o + 8 > body.len() {
                return Err(err("truncated section header"));
            }
            let mut l = [0u8; 8];
            l.copy_from_slice(&body[o..o + 8]);
            let len = u64::from_le_bytes(l) as usize;
            o += 8;
            if o.checked_add(len).is_none_or(|end| end > body.len()) {
                return Err(err("section runs past the end of the file"));
            }
            parts.push(body[o..o + len].to_vec());
            o += len;
        }
        let optimizer = parts.pop().unwrap_or_default();
        let model = parts.pop().unwrap_or_default();
        let meta_bytes = parts.pop().unwrap_or_default();
        let meta: CheckpointMeta = serde_json::from_slice(&meta_bytes)
            .map_err(|e| Error::checkpoint(path, format!("metadata: {e}")))?;
        Ok(Self {
            meta,
            model,
            optimizer,
        })
    }

    /// Writes to `path` atomically: a temporary file in the same directory, fsync, rename.
    pub fn save(&self, path: &Path) -> Result<()> {
        let bytes = self.to_bytes()?;
        write_atomic(path, &bytes)
    }

    /// Reads the checkpoint file `file`.
    pub fn load(file: &Path) -> Result<Self> {
        let bytes = fs::read(file).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                Error::checkpoint(file, "not found (is this a ctseg run directory?)")
            } else {
                Error::io(file, e)
            }
        })?;
        Self::from_bytes(&bytes, file)
    }

    /// Reads the checkpoint a command was pointed at: `path` itself when it is a file, else
    /// the run directory's checkpoint of `kind` ([`locate`]). Returns it with the file read
    /// and, when the best checkpoint was asked for but the run has none yet, a note saying that
    /// the last one was used.
    pub fn open(path: &Path, kind: CheckpointKind) -> Result<(Self, PathBuf, Option<String>)> {
        let (file, note) = locate(path, kind);
        Ok((Self::load(&file)?, file, note))
    }
}

/// The checkpoint file for `path`: `path` itself when it is not a directory, else the run
/// directory's `kind` checkpoint; `best.ctck` falls back to `checkpoint.ctck` (with a note)
/// for runs that have not validated yet and runs of older versions.
pub fn locate(path: &Path, kind: CheckpointKind) -> (PathBuf, Option<String>) {
    if !path.is_dir() {
        return (path.to_path_buf(), None);
    }
    let run = super::RunDir::new(path);
    let want = run.checkpoint(kind);
    if kind == CheckpointKind::Best && !want.exists() {
        let last = run.checkpoint(CheckpointKind::Last);
        if last.exists() {
            let note = format!(
                "{}: no {} (the run has not validated yet): using the last checkpoint",
                path.display(),
                super::BEST
            );
            return (last, Some(note));
        }
    }
    (want, None)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Checkpoint {
        Checkpoint {
            meta: CheckpointMeta {
                step: 12,
                epoch: 1,
                batch_in_epoch: 3,
                world_size: 1,
                global_batch: 8,
                wall_s: 4.5,
                config_toml: "seed = 1".into(),
                ctseg_version: "0".into(),
                provenance: Provenance::default(),
                val_dice_liver: Some(0.5),
                best_dice_liver: Some(0.5),
                best_step: 12,
                loss_scale: None,
            },
            model: vec![1, 2, 3],
            optimizer: vec![4, 5],
        }
    }

    #[test]
    fn round_trip_and_corruption() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join(super::super::CHECKPOINT);
        sample().save(&p).expect("save");
        let (back, _, note) = Checkpoint::open(dir.path(), CheckpointKind::Last).expect("load");
        assert!(note.is_none());
        assert_eq!(back.meta, sample().meta);
        assert_eq!(back.model, vec![1, 2, 3]);
        let mut bytes = fs::read(&p).expect("read");
        let n = bytes.len();
        bytes[n - 6] ^= 0xff;
        let e = Checkpoint::from_bytes(&bytes, &p)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            e.contains("checksum") && e.contains("checkpoint.ctck"),
            "{e}"
        );
        let e = Checkpoint::from_bytes(&bytes[..30], &p)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("checkpoint"), "{e}");
        // No temporary file is left behind.
        let names: Vec<String> = fs::read_dir(dir.path())
            .expect("ls")
            .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
            .collect();
        assert_eq!(names, vec!["checkpoint.ctck".to_string()]);
    }

    #[test]
    fn best_falls_back_to_last_with_a_note() {
        let dir = tempfile::tempdir().expect("tempdir");
        sample()
            .save(&dir.path().join(super::super::CHECKPOINT))
            .expect("save");
        let (file, note) = locate(dir.path(), CheckpointKind::Best);
        assert!(file.ends_with("checkpoint.ctck"));
        assert!(note.is_some_and(|n| n.contains("best.ctck")));
        sample()
            .save(&dir.path().join(super::super::BEST))
            .expect("save");
        let (file, note) = locate(dir.path(), CheckpointKind::Best);
        assert!(file.ends_with("best.ctck") && note.is_none());
    }

    #[test]
    fn metadata_of_older_versions_reads_with_defaults() {
        // A meta JSON as version 0.1 wrote it before provenance and best Dice existed.
        let old = r#"{"step":3,"epoch":1,"batch_in_epoch":0,"world_size":1,"global_batch":8,"wall_s":1.0,"config_toml":"","ctseg_version":"0.1.0"}"#;
        let m: CheckpointMeta = serde_json::from_str(old).expect("old meta");
        assert_eq!(m.provenance, Provenance::default());
        assert_eq!(m.best_dice_liver, None);
        // Inference on such a checkpoint resizes as all data was resized then: nearest.
        assert_eq!(m.provenance.resize, crate::data::prepare::Resize::Nearest);
    }
}
