//! `metrics.jsonl`: one JSON object per optimiser step (`kind: "step"`) and per validation
//! (`kind: "val"`), appended and flushed line by line so a crash loses at most the line being
//! written.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// File name inside a run directory.
pub const FILE: &str = "metrics.jsonl";

/// One optimiser step.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StepRecord {
    /// Always `"step"`.
    pub kind: String,
    /// Optimiser steps completed (1 after the first update).
    pub step: u64,
    /// Epoch of the step (1-based).
    pub epoch: u64,
    /// Seconds since the run started (continued across resumes).
    pub wall_s: f64,
    /// Training loss of the step's batch (mean over ranks).
    pub loss: f64,
    /// Learning rate used for the step.
    pub lr: f64,
    /// Images per second of the step (global batch / step time).
    pub images_per_s: f64,
    /// Seconds the loop waited for the loader during the step.
    pub data_wait_s: f64,
    /// Seconds of forward, loss and backward (device synchronised).
    pub compute_s: f64,
    /// Seconds copying the fused gradient buffer off the device (0 on one rank).
    pub copy_s: f64,
    /// Seconds of gradient communication the step waited for (exposed; 0 on one rank).
    pub comm_s: f64,
    /// Seconds the allreduces took in total, overlapped or not (0 on one rank).
    pub comm_total_s: f64,
}

/// One validation pass over the whole validation set.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ValRecord {
    /// Always `"val"`.
    pub kind: String,
    /// Epoch (1-based) after which it ran.
    pub epoch: u64,
    /// Optimiser steps completed.
    pub step: u64,
    /// Seconds since the run started.
    pub wall_s: f64,
    /// Dice loss over the validation set.
    pub val_loss: f64,
    /// Hard Dice of the liver channel from summed tp/fp/fn.
    pub dice_liver: f64,
    /// Hard Dice of the tumour channel from summed tp/fp/fn.
    pub dice_tumour: f64,
    /// Mean soft Dice per channel (what livermask logged).
    pub soft_dice: Vec<f64>,
    /// Validation slices.
    pub images: u64,
}

/// Appends records to `metrics.jsonl`.
pub struct MetricsLog {
    path: PathBuf,
    file: Option<File>,
}

impl MetricsLog {
    /// Opens (creating or appending). `enabled = false` (ranks other than 0) writes nothing.
    pub fn open(dir: &Path, enabled: bool) -> Result<Self> {
        let path = dir.join(FILE);
        let file = if enabled {
            Some(
                OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&path)
                    .map_err(|e| Error::io(&path, e))?,
            )
        } else {
            None
        };
        Ok(Self { path, file })
    }

    /// Appends one record as a line.
    pub fn write<T: Serialize>(&mut self, record: &T) -> Result<()> {
        if let Some(f) = self.file.as_mut() {
            let mut line = serde_json::to_string(record)
                .map_err(|e| Error::Invalid(format!("serialising a metrics record: {e}")))?;
            line.push('\n');
            f.write_all(line.as_bytes())
                .and_then(|_| f.flush())
                .map_err(|e| Error::io(&self.path, e))?;
        }
        Ok(())
    }
}

/// Keeps only the records with `step <= last_step` (used on resume, so that steps logged after
/// the checkpoint by the interrupted run are not duplicated). Rewrites the file atomically.
pub fn truncate_after(dir: &Path, last_step: u64) -> Result<()> {
    let path = dir.join(FILE);
    let Ok(f) = File::open(&path) else {
        return Ok(());
    };
    let mut kept = String::new();
    for line in BufReader::new(f).lines() {
        let line = line.map_err(|e| Error::io(&path, e))?;
        let v: serde_json::Value = match serde_json::from_str(&line) {
            Ok(v) => v,
            Err(_) => continue, // a torn last line from a crash
        };
        if v.get("step")
            .and_then(|s| s.as_u64())
            .is_some_and(|s| s <= last_step)
        {
            kept.push_str(&line);
            kept.push('\n');
        }
    }
    super::checkpoint::write_atomic(&path, kept.as_bytes())
}

/// Reads all records of a `metrics.jsonl` as JSON values.
pub fn read_all(path: &Path) -> Result<Vec<serde_json::Value>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .enumerate()
        .map(|(i, l)| {
            serde_json::from_str(l)
                .map_err(|e| Error::Invalid(format!("{}: line {}: {e}", path.display(), i + 1)))
        })
        .collect()
}
