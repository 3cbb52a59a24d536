//! `metrics.jsonl`: one JSON object per optimiser step (`kind: "step"`) and per validation
//! (`kind: "val"`), appended and flushed line by line so a crash loses at most the line being
//! written; and its one reader, lenient where a crash or an older version can leave something
//! (a torn last line, fields a record of an older version lacks, `null` for a non-finite
//! number) and strict where something else is wrong (an error names the file, the line and the
//! field).

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Deserializer, Serialize};

use crate::error::{Error, Result};
use crate::util::fs::write_atomic;

/// A number that reads `null` (how serde_json writes NaN and ±∞) as NaN.
pub(crate) fn nan_if_null<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
}

/// One optimiser step.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct StepRecord {
    /// Optimiser steps completed (1 after the first update).
    pub step: u64,
    /// Epoch of the step (1-based).
    pub epoch: u64,
    /// Seconds since the run started (continued across resumes).
    pub wall_s: f64,
    /// Training loss of the step's batch (mean over ranks).
    #[serde(deserialize_with = "nan_if_null")]
    pub loss: f64,
    /// Learning rate used for the step.
    pub lr: f64,
    /// Images per second of the step (global batch / step time).
    pub images_per_s: f64,
    /// Seconds the loop waited for the loader during the step (absent in old runs).
    pub data_wait_s: Option<f64>,
    /// Seconds of forward, loss and backward (device synchronised).
    pub compute_s: Option<f64>,
    /// Seconds copying the fused gradient buffer off the device (0 on one rank).
    pub copy_s: Option<f64>,
    /// Seconds of gradient communication the step waited for (exposed; 0 on one rank).
    pub comm_s: Option<f64>,
    /// Seconds the allreduces took in total, overlapped or not (0 on one rank).
    pub comm_total_s: Option<f64>,
    /// Mixed precision: the loss scale of the step's backward (absent in f32).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub loss_scale: Option<f64>,
    /// Mixed precision: the gradients were not finite on some rank, and the optimiser step was
    /// skipped (absent otherwise).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub skipped: bool,
}

/// One validation pass over the whole validation set.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ValRecord {
    /// Epoch (1-based) after which it ran.
    pub epoch: u64,
    /// Optimiser steps completed.
    pub step: u64,
    /// Seconds since the run started.
    pub wall_s: f64,
    /// Dice loss over the validation set.
    #[serde(deserialize_with = "nan_if_null")]
    pub val_loss: f64,
    /// Hard Dice of the liver channel from summed tp/fp/fn.
    #[serde(deserialize_with = "nan_if_null")]
    pub dice_liver: f64,
    /// Hard Dice of the tumour channel from summed tp/fp/fn.
    #[serde(deserialize_with = "nan_if_null")]
    pub dice_tumour: f64,
    /// Mean soft Dice per channel (what livermask logged).
    pub soft_dice: Vec<f64>,
    /// Validation slices.
    pub images: u64,
    /// Whether this validation made a new best checkpoint.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub best: bool,
}

/// A line of the log.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Record {
    /// An optimiser step.
    Step(StepRecord),
    /// A validation.
    Val(ValRecord),
}

/// Appends records to `metrics.jsonl`.
pub struct MetricsLog {
    path: PathBuf,
    file: Option<File>,
}

impl MetricsLog {
    /// Opens `path` (creating or appending). `enabled = false` (ranks other than 0) writes
    /// nothing.
    pub fn open(path: &Path, enabled: bool) -> Result<Self> {
        let file = if enabled {
            Some(
                OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .map_err(|e| Error::io(path, e))?,
            )
        } else {
            None
        };
        Ok(Self {
            path: path.to_path_buf(),
            file,
        })
    }

    /// Appends one record as a line.
    pub fn write(&mut self, record: Record) -> Result<()> {
        if let Some(f) = self.file.as_mut() {
            let mut line = serde_json::to_string(&record)
                .map_err(|e| Error::Invalid(format!("serialising a metrics record: {e}")))?;
            line.push('\n');
            f.write_all(line.as_bytes())
                .and_then(|_| f.flush())
                .map_err(|e| Error::io(&self.path, e))?;
        }
        Ok(())
    }
}

/// The records of a `metrics.jsonl`.
#[derive(Clone, Debug, Default)]
pub struct Metrics {
    /// Step records, in file order.
    pub steps: Vec<StepRecord>,
    /// Validation records, in file order.
    pub vals: Vec<ValRecord>,
    /// The last line was not valid JSON (a run killed while writing it) and was skipped.
    pub torn_last_line: bool,
}

/// One line of the file as read: its text and its record (`None`: another kind).
struct Line<'a> {
    text: &'a str,
    record: Option<Record>,
}

/// Parses the lines of `text` (from `path`); a torn last line is dropped and reported.
fn parse_lines<'a>(text: &'a str, path: &Path) -> Result<(Vec<Line<'a>>, bool)> {
    let lines: Vec<(usize, &str)> = text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .collect();
    let mut out = Vec::with_capacity(lines.len());
    let bad = |number: usize, message: String| {
        Error::malformed(path, format!("line {number}: {message}"))
    };
    for (k, &(i, line)) in lines.iter().enumerate() {
        let number = i + 1;
        let value: serde_json::Value = match serde_json::from_str(line) {
            Ok(v) => v,
            Err(_) if k + 1 == lines.len() => return Ok((out, true)),
            Err(e) => return Err(bad(number, format!("not valid JSON: {e}"))),
        };
        if !value.is_object() {
            return Err(bad(number, "expected a JSON object".into()));
        }
        let field = |e: serde_path_to_error::Error<serde_json::Error>| {
            bad(number, format!("field `{}`: {}", e.path(), e.inner()))
        };
        let record = match value.get("kind").and_then(|k| k.as_str()) {
            Some("step") => Some(Record::Step(
                serde_path_to_error::deserialize(&value).map_err(field)?,
            )),
            Some("val") => Some(Record::Val(
                serde_path_to_error::deserialize(&value).map_err(field)?,
            )),
            _ => None,
        };
        out.push(Line { text: line, record });
    }
    Ok((out, false))
}

/// Reads `metrics.jsonl`. A last line that is not valid JSON (torn by a crash) is skipped; an
/// invalid line elsewhere, or a record field of the wrong type, is an error naming the file,
/// the line and the field. Records of other kinds are ignored.
pub fn read(path: &Path) -> Result<Metrics> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    // A torn write may also cut a multi-byte character: read lossily, judge by JSON validity.
    let text = String::from_utf8_lossy(&bytes);
    let (lines, torn) = parse_lines(&text, path)?;
    let mut m = Metrics {
        torn_last_line: torn,
        ..Metrics::default()
    };
    for line in lines {
        match line.record {
            Some(Record::Step(s)) => m.steps.push(s),
            Some(Record::Val(v)) => m.vals.push(v),
            None => {}
        }
    }
    Ok(m)
}

/// Keeps only the records with `step <= last_step` (on resume, so that steps logged after the
/// checkpoint by the interrupted run are not duplicated), and drops a torn last line. Rewrites
/// the file atomically; a missing file is left missing.
pub fn truncate_after(path: &Path, last_step: u64) -> Result<()> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::io(path, e)),
    };
    let text = String::from_utf8_lossy(&bytes);
    let (lines, _) = parse_lines(&text, path)?;
    let mut kept = String::new();
    for line in lines {
        let step = match &line.record {
            Some(Record::Step(s)) => s.step,
            Some(Record::Val(v)) => v.step,
            None => continue,
        };
        if step <= last_step {
            kept.push_str(line.text);
            kept.push('\n');
        }
    }
    write_atomic(path, kept.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, text: &str) -> PathBuf {
        let p = dir.join(super::super::METRICS);
        std::fs::write(&p, text).expect("write test file");
        p
    }

    #[test]
    fn records_round_trip_with_their_kind() {
        let d = tempfile::tempdir().expect("tempdir");
        let p = d.path().join("m.jsonl");
        let mut log = MetricsLog::open(&p, true).expect("open");
        let step = StepRecord {
            step: 1,
            epoch: 1,
            wall_s: 0.5,
            loss: f64::NAN,
            compute_s: Some(0.25),
            ..StepRecord::default()
        };
        log.write(Record::Step(step.clone())).expect("step");
        log.write(Record::Val(ValRecord {
            step: 1,
            dice_liver: 0.9,
            ..ValRecord::default()
        }))
        .expect("val");
        let text = std::fs::read_to_string(&p).expect("read");
        assert!(text.starts_with("{\"kind\":\"step\""), "{text}");
        let m = read(&p).expect("read back");
        assert!(
            m.steps[0].loss.is_nan(),
            "NaN is written as null and read as NaN"
        );
        assert_eq!(m.steps[0].compute_s, Some(0.25));
        assert_eq!(m.vals[0].dice_liver, 0.9);
    }

    #[test]
    fn a_torn_last_line_is_skipped() {
        let d = tempfile::tempdir().expect("tempdir");
        let p = write(
            d.path(),
            concat!(
                r#"{"kind":"step","step":1,"epoch":1,"wall_s":1.0,"loss":-0.3,"lr":0.001,"images_per_s":8.0,"data_wait_s":0.0}"#,
                "\n",
                r#"{"kind":"val","epoch":1,"step":1,"wall_s":1.5,"val_loss":-0.4,"dice_liver":0.5,"dice_tumour":null,"soft_dice":[0.9,0.5,0.1],"images":4}"#,
                "\n",
                r#"{"kind":"step","step":2,"epoch":1,"wall_s":2.0,"lo"#,
            ),
        );
        let m = read(&p).expect("torn line tolerated");
        assert!(m.torn_last_line);
        assert_eq!(m.steps.len(), 1);
        assert_eq!(m.steps[0].loss, -0.3);
        assert_eq!(
            m.steps[0].compute_s, None,
            "older records lack the split times"
        );
        assert_eq!(m.vals.len(), 1);
        assert!(m.vals[0].dice_tumour.is_nan(), "null reads as NaN");
    }

    #[test]
    fn a_bad_middle_line_or_a_wrong_type_names_file_line_and_field() {
        let d = tempfile::tempdir().expect("tempdir");
        let p = write(
            d.path(),
            "{\"kind\":\"step\",\"step\":1,\"wall_s\":1.0}\n{oops\n{\"kind\":\"step\",\"step\":2,\"wall_s\":2.0}\n",
        );
        let e = read(&p).expect_err("a bad middle line").to_string();
        assert!(e.contains("metrics.jsonl") && e.contains("line 2"), "{e}");
        let p = write(
            d.path(),
            "{\"kind\":\"step\",\"step\":1,\"wall_s\":\"soon\"}\n{\"kind\":\"step\",\"step\":2,\"wall_s\":2.0}\n",
        );
        let e = read(&p).expect_err("wrong type").to_string();
        assert!(e.contains("line 1") && e.contains("`wall_s`"), "{e}");
    }

    #[test]
    fn truncation_keeps_what_the_checkpoint_covers() {
        let d = tempfile::tempdir().expect("tempdir");
        let p = write(
            d.path(),
            concat!(
                "{\"kind\":\"step\",\"step\":1,\"wall_s\":1.0}\n",
                "{\"kind\":\"val\",\"step\":1,\"wall_s\":1.1}\n",
                "{\"kind\":\"step\",\"step\":2,\"wall_s\":2.0}\n",
                "{\"kind\":\"step\",\"st"
            ),
        );
        truncate_after(&p, 1).expect("truncate");
        let m = read(&p).expect("read");
        assert_eq!(
            (m.steps.len(), m.vals.len(), m.torn_last_line),
            (1, 1, false)
        );
    }
}
