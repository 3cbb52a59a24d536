//! `summary.json`: the figures of a finished run (or of the last segment of a resumed one), in
//! one type that the trainer writes and `report` and `bench` read. Reading is lenient where
//! versions differ (a missing field takes its default, an unknown one is ignored, `null` reads
//! as NaN) and strict otherwise (a field of the wrong type is an error naming the file and the
//! field). A new field is one line here.

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::metrics::nan_if_null;
use crate::error::{Error, Result};
use crate::util::fs::write_atomic;

/// `summary.json`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Summary {
    /// Optimiser steps completed.
    pub steps: u64,
    /// Epochs completed (fractional when stopped by `max_steps`).
    #[serde(deserialize_with = "nan_if_null")]
    pub epochs: f64,
    /// Ranks.
    pub world_size: u64,
    /// Global batch.
    pub global_batch: u64,
    /// Training wall time, seconds (including earlier segments of a resumed run).
    #[serde(deserialize_with = "nan_if_null")]
    pub wall_s: f64,
    /// Seconds from the start of the process to the first training step of this segment
    /// (data, model, kernel compilation and autotuning).
    #[serde(deserialize_with = "nan_if_null")]
    pub startup_s: f64,
    /// Mean images per second over this segment's training steps.
    #[serde(deserialize_with = "nan_if_null")]
    pub images_per_s: f64,
    /// Loss of the last step.
    #[serde(deserialize_with = "nan_if_null")]
    pub final_loss: f64,
    /// Last validation loss.
    #[serde(deserialize_with = "nan_if_null")]
    pub val_loss: f64,
    /// Last validation liver Dice.
    #[serde(deserialize_with = "nan_if_null")]
    pub dice_liver: f64,
    /// Last validation tumour Dice.
    #[serde(deserialize_with = "nan_if_null")]
    pub dice_tumour: f64,
    /// Best validation liver Dice of the run (the model in `best.ctck`).
    #[serde(deserialize_with = "nan_if_null")]
    pub best_dice_liver: f64,
    /// Step of the best validation.
    pub best_step: u64,
    /// Trainable parameters.
    pub params: u64,
    /// Training slices.
    pub train_slices: u64,
    /// Validation slices.
    pub val_slices: u64,
    /// Device description.
    pub device: String,
    /// Data origin.
    pub data: String,
    /// Seconds the loop waited on the loader in total.
    #[serde(deserialize_with = "nan_if_null")]
    pub data_wait_s: f64,
    /// FNV-1a hash of every weight and BN statistic at the end (hex): equal on all ranks.
    pub weights_hash: String,
    /// How gradients were exchanged between ranks.
    pub grad_exchange: String,
    /// Optimiser steps per epoch.
    pub steps_per_epoch: u64,
    /// Median wall time of one optimiser step in this segment of the run (the first two steps
    /// are left out as warm-up when there are more than four), s.
    #[serde(deserialize_with = "nan_if_null")]
    pub median_step_s: f64,
    /// `steps_per_epoch × median_step_s`: the epoch time without validation and checkpoints, s.
    #[serde(deserialize_with = "nan_if_null")]
    pub epoch_time_s: f64,
    /// Median seconds of forward + loss + backward per step (all micro-batches).
    #[serde(deserialize_with = "nan_if_null")]
    pub median_compute_s: f64,
    /// Largest peak resident memory (VmHWM) of any rank, MB.
    #[serde(deserialize_with = "nan_if_null")]
    pub peak_rss_mb: f64,
    /// `"cpu"` or `"gpu"`.
    pub backend: String,
    /// Arithmetic of the step: `"f32"` or `"mixed"` (reports read it to keep runs of different
    /// arithmetic apart).
    pub precision: String,
    /// How the step computes in that precision.
    pub precision_note: String,
    /// The loss scale at the end (mixed precision; `None` in f32).
    pub loss_scale: Option<f64>,
    /// Steps skipped for non-finite gradients (mixed precision; never silently applied).
    pub skipped_steps: u64,
    /// How `--gpu-conv auto` chose the 3×3 convolutions' kernels, with the times it measured
    /// (absent where it did not choose: CPU, mixed precision, a path given by name).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gpu_conv: Option<crate::bench::conv_choice::ConvChoice>,
    /// Micro-batches per optimiser step on each rank.
    pub accumulate: u64,
    /// Images per micro-batch on each rank.
    pub batch_size: u64,
    /// Name of the run in reports.
    pub label: String,
}

impl Summary {
    /// Reads `path`: lenient across versions, strict on types (the error names the field).
    pub fn read(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let bad = |m: String| Error::malformed(path, m);
        let value: serde_json::Value =
            serde_json::from_slice(&bytes).map_err(|e| bad(format!("not valid JSON: {e}")))?;
        if !value.is_object() {
            return Err(bad("not a ctseg summary: expected a JSON object".into()));
        }
        serde_path_to_error::deserialize(&value)
            .map_err(|e| bad(format!("field `{}`: {}", e.path(), e.inner())))
    }

    /// Writes `path` atomically.
    pub fn write(&self, path: &Path) -> Result<()> {
        let text = serde_json::to_string_pretty(self)
            .map_err(|e| Error::Invalid(format!("serialising the summary: {e}")))?;
        write_atomic(path, text.as_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn older_and_newer_summaries_read_with_defaults() {
        let d = tempfile::tempdir().expect("tempdir");
        let p = d.path().join("summary.json");
        std::fs::write(
            &p,
            r#"{"world_size":1,"global_batch":8,"dice_tumour":null,"unknown_future_field":[1,2]}"#,
        )
        .expect("write");
        let s = Summary::read(&p).expect("lenient");
        assert_eq!((s.world_size, s.global_batch, s.steps), (1, 8, 0));
        assert!(s.dice_tumour.is_nan());
        assert_eq!(s.median_step_s, 0.0, "missing numbers read as 0");
    }

    #[test]
    fn a_wrong_type_names_the_file_and_the_field() {
        let d = tempfile::tempdir().expect("tempdir");
        let p = d.path().join("summary.json");
        std::fs::write(&p, "{\"world_size\": \"two\"}").expect("write");
        let e = Summary::read(&p).expect_err("wrong type").to_string();
        assert!(
            e.contains("summary.json") && e.contains("`world_size`"),
            "{e}"
        );
        std::fs::write(&p, "[1, 2]").expect("write");
        let e = Summary::read(&p).expect_err("not an object").to_string();
        assert!(e.contains("not a ctseg summary"), "{e}");
    }

    #[test]
    fn round_trip_keeps_nan_as_nan() {
        let d = tempfile::tempdir().expect("tempdir");
        let p = d.path().join("summary.json");
        let s = Summary {
            steps: 3,
            val_loss: f64::NAN,
            label: "x".into(),
            ..Summary::default()
        };
        s.write(&p).expect("write");
        let back = Summary::read(&p).expect("read");
        assert_eq!(back.steps, 3);
        assert!(back.val_loss.is_nan());
        assert_eq!(back.label, "x");
    }
}
