//! Checkpoints: model weights and BN statistics, optimiser state, position in the run and the
//! config, in one checksummed file written atomically (temporary file, fsync, rename), so a
//! crash or a full disk never leaves a half-written checkpoint in place of the last good one.
//!
//! ```text
//! "CTSEGCK\0" | version u32 | 3 × (length u64, bytes): meta JSON, model burnpack, optimiser burnpack | CRC-32 u32
//! ```

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// File name of the checkpoint inside a run directory.
pub const FILE: &str = "checkpoint.ctck";
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

    /// Reads `path`, or `dir/checkpoint.ctck` when `path` is a run directory.
    pub fn load(path: &Path) -> Result<Self> {
        let file = resolve(path);
        let bytes = fs::read(&file).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                Error::checkpoint(&file, "not found (is this a ctseg run directory?)")
            } else {
                Error::io(&file, e)
            }
        })?;
        Self::from_bytes(&bytes, &file)
    }
}

/// `path` itself, or `path/checkpoint.ctck` for a directory.
pub fn resolve(path: &Path) -> PathBuf {
    if path.is_dir() {
        path.join(FILE)
    } else {
        path.to_path_buf()
    }
}

/// Writes `bytes` to `path` through a temporary sibling file and a rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "file".into());
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let result = (|| -> std::io::Result<()> {
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, path)?;
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    result.map_err(|e| {
        let _ = fs::remove_file(&tmp);
        Error::io(path, e)
    })
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
            },
            model: vec![1, 2, 3],
            optimizer: vec![4, 5],
        }
    }

    #[test]
    fn round_trip_and_corruption() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join(FILE);
        sample().save(&p).expect("save");
        let back = Checkpoint::load(dir.path()).expect("load");
        assert_eq!(back.meta, sample().meta);
        assert_eq!(back.model, vec![1, 2, 3]);
        let mut bytes = fs::read(&p).expect("read");
        let n = bytes.len();
        bytes[n - 6] ^= 0xff;
        let e = Checkpoint::from_bytes(&bytes, &p)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("checksum") && e.contains(FILE), "{e}");
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
        assert_eq!(names, vec![FILE.to_string()]);
    }
}
