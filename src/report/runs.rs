//! Reading one training run directory for the report: `summary.json` and `metrics.jsonl`
//! through [`crate::rundir`]'s lenient readers, the workload keys of `config.resolved.toml`,
//! and the figures the report derives from them when the summary lacks them (median step time,
//! steps per epoch, epoch time).

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::error::{Error, Result};
use crate::rundir::metrics::{self, Metrics, StepRecord as Step};
use crate::rundir::{RunDir, Summary};
use crate::util::stats::{WARMUP_MIN_STEPS, WARMUP_STEPS, median, warm_median};

/// What the report reads of `config.resolved.toml`: the workload, which decides which runs
/// belong to one scaling series.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub(crate) struct ConfigInfo {
    pub model: ModelInfo,
    pub train: TrainInfo,
}

/// `[model]` keys the report uses.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub(crate) struct ModelInfo {
    pub width: u64,
    pub depth: u64,
    pub input_size: u64,
}

/// `[train]` keys the report uses.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub(crate) struct TrainInfo {
    pub batch_size: u64,
    pub accumulate: u64,
}

/// A run directory, read and with its derived figures.
#[derive(Clone, Debug)]
pub(crate) struct Run {
    /// The directory as given.
    pub dir: PathBuf,
    /// `summary.label`, else the directory name (made unique by the caller).
    pub label: String,
    /// `summary.json` was present (the run finished).
    pub has_summary: bool,
    pub summary: Summary,
    pub metrics: Metrics,
    /// "cpu", "gpu" or "unknown".
    pub backend: String,
    /// The device description of the summary ("" when unknown).
    pub device: String,
    /// Ranks (0: unknown).
    pub ranks: u64,
    /// Images per optimiser step over all ranks (0: unknown).
    pub global_batch: u64,
    /// Micro-batches per optimiser step.
    pub accumulate: u64,
    /// Optimiser steps per epoch (0: unknown).
    pub steps_per_epoch: u64,
    /// Median seconds per optimiser step (0: unknown).
    pub median_step_s: f64,
    /// Seconds per epoch (0: unknown).
    pub epoch_time_s: f64,
    /// Training images per second (0: unknown).
    pub images_per_s: f64,
    /// Per-step medians of the split times (warm-up skipped); `None` where the metrics lack them.
    pub median_compute_s: Option<f64>,
    pub median_copy_s: Option<f64>,
    pub median_comm_s: Option<f64>,
    pub median_data_wait_s: Option<f64>,
    /// "width 16, 128², 8/rank, 576 slices": what a scaling series holds fixed ("" when
    /// unknown).
    pub workload: String,
}

/// Reads the run in `dir`. A directory with neither `summary.json` nor `metrics.jsonl` is an
/// error naming it.
pub(crate) fn load_run(dir: &Path) -> Result<Run> {
    let run = RunDir::existing(dir)?;
    let (summary_path, metrics_path, config_path) = (run.summary(), run.metrics(), run.config());
    let has_summary = summary_path.is_file();
    let has_metrics = metrics_path.is_file();
    if !has_summary && !has_metrics {
        return Err(Error::Argument(format!(
            "{}: not a run directory: it has neither {} nor {}",
            dir.display(),
            crate::rundir::SUMMARY,
            crate::rundir::METRICS
        )));
    }
    let summary = if has_summary {
        Summary::read(&summary_path)?
    } else {
        Summary::default()
    };
    let metrics = if has_metrics {
        metrics::read(&metrics_path)?
    } else {
        Metrics::default()
    };
    let config = if config_path.is_file() {
        Some(read_config(&config_path)?)
    } else {
        None
    };
    let label = if summary.label.trim().is_empty() {
        dir.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| dir.display().to_string())
    } else {
        summary.label.trim().to_string()
    };
    Ok(derive(dir, label, has_summary, summary, metrics, config))
}

/// Fills the derived figures: the summary's where it has them (non-zero), else from the
/// metrics and the config.
fn derive(
    dir: &Path,
    label: String,
    has_summary: bool,
    summary: Summary,
    metrics: Metrics,
    config: Option<ConfigInfo>,
) -> Run {
    let device = summary.device.trim().to_string();
    let backend = if !summary.backend.trim().is_empty() {
        summary.backend.trim().to_lowercase()
    } else {
        backend_of_device(&device).to_string()
    };
    let cfg_batch = config.as_ref().map_or(0, |c| c.train.batch_size);
    let accumulate = if summary.accumulate > 0 {
        summary.accumulate
    } else {
        config.as_ref().map_or(1, |c| c.train.accumulate.max(1))
    };
    let global_batch = if summary.global_batch > 0 {
        summary.global_batch
    } else {
        estimate_global_batch(&metrics.steps)
    };
    let ranks = if summary.world_size > 0 {
        summary.world_size
    } else {
        // Values from a damaged config may overflow: then the rank count is unknown.
        match cfg_batch.checked_mul(accumulate) {
            Some(per_rank) if per_rank > 0 && global_batch > 0 && global_batch % per_rank == 0 => {
                global_batch / per_rank
            }
            _ => 0,
        }
    };
    let median_step_s = if summary.median_step_s > 0.0 {
        summary.median_step_s
    } else {
        median_step_time(&metrics.steps).unwrap_or(0.0)
    };
    let steps_per_epoch = if summary.steps_per_epoch > 0 {
        summary.steps_per_epoch
    } else {
        derive_steps_per_epoch(&summary, &metrics.steps, global_batch)
    };
    let epoch_time_s = if summary.epoch_time_s > 0.0 {
        summary.epoch_time_s
    } else {
        steps_per_epoch as f64 * median_step_s
    };
    let images_per_s = if summary.images_per_s > 0.0 {
        summary.images_per_s
    } else if median_step_s > 0.0 {
        global_batch as f64 / median_step_s
    } else {
        0.0
    };
    let split = |f: fn(&Step) -> Option<f64>| warm_median(metrics.steps.iter().filter_map(f));
    // What a scaling series holds fixed: the model, the batch per rank and the training set.
    let mut parts = Vec::new();
    if let Some(c) = &config {
        parts.push(format!("width {}", c.model.width));
        parts.push(format!("{}²", c.model.input_size));
        parts.push(format!("{}/rank", c.train.batch_size));
        if accumulate > 1 {
            parts.push(format!("×{accumulate} accum."));
        }
    }
    if summary.train_slices > 0 {
        parts.push(format!("{} slices", summary.train_slices));
    }
    let workload = parts.join(", ");
    Run {
        dir: dir.to_path_buf(),
        label,
        has_summary,
        backend,
        device,
        ranks,
        global_batch,
        accumulate,
        steps_per_epoch,
        median_step_s,
        epoch_time_s,
        images_per_s,
        median_compute_s: split(|s| s.compute_s),
        median_copy_s: split(|s| s.copy_s),
        median_comm_s: split(|s| s.comm_s),
        median_data_wait_s: split(|s| s.data_wait_s),
        workload,
        summary,
        metrics,
    }
}

/// "gpu" when the device description names the wgpu backend, Vulkan or a GPU; "unknown" when
/// empty; else "cpu".
pub(crate) fn backend_of_device(device: &str) -> &'static str {
    let d = device.to_lowercase();
    if d.trim().is_empty() {
        "unknown"
    } else if d.contains("wgpu") || d.contains("vulkan") || d.contains("gpu") {
        "gpu"
    } else {
        "cpu"
    }
}

/// A short name for a device description, for legends and tables: the adapter name of a wgpu
/// device ("gpu (burn wgpu, adapter [0] NVIDIA H100, …)" → "NVIDIA H100"), the inside of
/// "cpu (…)", the description itself otherwise, "unknown device" when empty.
pub(crate) fn short_device(device: &str) -> String {
    let d = device.trim();
    if d.is_empty() {
        return "unknown device".into();
    }
    if let Some(inner) = d.strip_prefix("cpu (").and_then(|r| r.strip_suffix(')')) {
        return inner.to_string();
    }
    if let Some(i) = d.find("adapter [") {
        let rest = &d[i + "adapter [".len()..];
        if let Some(j) = rest.find("] ") {
            let name = &rest[j + 2..];
            // Up to the first comma outside parentheses.
            let mut depth = 0i32;
            for (k, c) in name.char_indices() {
                match c {
                    '(' => depth += 1,
                    ')' => depth -= 1,
                    ',' if depth <= 0 => return name[..k].trim().to_string(),
                    _ => {}
                }
            }
            return name.trim_end_matches(')').trim().to_string();
        }
    }
    d.to_string()
}

/// Median of the differences of consecutive step `wall_s`, without the first
/// [`WARMUP_STEPS`] steps when there are more than [`WARMUP_MIN_STEPS`].
pub(crate) fn median_step_time(steps: &[Step]) -> Option<f64> {
    let diffs: Vec<f64> = steps
        .windows(2)
        .map(|w| w[1].wall_s - w[0].wall_s)
        .collect();
    // diffs[i] is the time of step i + 2 (1-based): skipping the first 2 steps skips diffs[0]
    // (the second step) only, step 1 having no difference at all.
    let skip = if steps.len() > WARMUP_MIN_STEPS {
        WARMUP_STEPS - 1
    } else {
        0
    };
    median(
        diffs
            .into_iter()
            .skip(skip)
            .filter(|d| d.is_finite() && *d >= 0.0),
    )
}

/// Steps per epoch without `summary.steps_per_epoch`: the last step of epoch 1 when the run
/// got past it, else `train_slices / global_batch`, else `steps / epochs` (the summary's
/// fractional epochs are steps / steps per epoch), else the steps of epoch 1 seen so far.
fn derive_steps_per_epoch(summary: &Summary, steps: &[Step], global_batch: u64) -> u64 {
    let epoch1_max = steps
        .iter()
        .filter(|s| s.epoch == 1)
        .map(|s| s.step)
        .max()
        .unwrap_or(0);
    if steps.iter().any(|s| s.epoch >= 2) && epoch1_max > 0 {
        return epoch1_max;
    }
    if summary.train_slices > 0 && global_batch > 0 {
        let n = summary.train_slices / global_batch;
        if n > 0 {
            return n;
        }
    }
    if summary.steps > 0 && summary.epochs > 0.0 {
        let n = (summary.steps as f64 / summary.epochs).round();
        if n >= 1.0 {
            return n as u64;
        }
    }
    epoch1_max
}

/// Global batch of a run without a summary: each step logs `images_per_s` = global batch /
/// step time, so the median of `images_per_s × Δwall_s` recovers it (0 when it cannot).
fn estimate_global_batch(steps: &[Step]) -> u64 {
    let est = median(
        steps
            .windows(2)
            .map(|w| w[1].images_per_s * (w[1].wall_s - w[0].wall_s))
            .filter(|x| x.is_finite() && *x > 0.0),
    );
    est.map_or(0, |b| b.round().max(0.0) as u64)
}

/// Reads the keys the report uses from `config.resolved.toml` (others are ignored).
pub(crate) fn read_config(path: &Path) -> Result<ConfigInfo> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    toml::from_str(&text).map_err(|e| Error::ConfigParse {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) {
        std::fs::write(dir.join(name), text).expect("write test file");
    }

    #[test]
    fn report_derives_step_time_and_epoch_without_summary_fields() {
        let dir = tempfile::tempdir().expect("tempdir");
        // 6 steps, 3 per epoch; wall 10, 12, 13, 14, 15, 16: differences 2, 1, 1, 1, 1 (steps
        // 2..6). More than 4 steps: steps 1 and 2 are warm-up, so the median is over the
        // differences of steps 3..6 = 1 s. Epoch time = 3 × 1 s.
        let mut text = String::new();
        for (i, w) in [10.0, 12.0, 13.0, 14.0, 15.0, 16.0].iter().enumerate() {
            let step = i + 1;
            let epoch = if step <= 3 { 1 } else { 2 };
            text.push_str(&format!(
                "{{\"kind\":\"step\",\"step\":{step},\"epoch\":{epoch},\"wall_s\":{w},\"loss\":-0.5,\"images_per_s\":8.0}}\n"
            ));
        }
        write(dir.path(), "metrics.jsonl", &text);
        write(
            dir.path(),
            "summary.json",
            "{\"world_size\":1,\"global_batch\":8,\"device\":\"cpu (burn flex, 2 threads)\",\"unknown_future_field\":[1,2]}",
        );
        let run = load_run(dir.path()).expect("run");
        assert_eq!(run.median_step_s, 1.0);
        assert_eq!(run.steps_per_epoch, 3);
        assert_eq!(run.epoch_time_s, 3.0);
        assert_eq!(run.backend, "cpu");
        assert_eq!(
            run.label,
            dir.path()
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        );
    }

    #[test]
    fn a_damaged_configs_batch_leaves_the_rank_count_unknown() {
        // 2^32 × 2^32 wrapped to 0 in `global_batch % (batch × accumulate)`, a division by
        // zero that panicked `ctseg report`.
        let dir = tempfile::tempdir().expect("tempdir");
        write(
            dir.path(),
            "metrics.jsonl",
            "{\"kind\":\"step\",\"step\":1,\"epoch\":1,\"wall_s\":1.0,\"loss\":-0.5,\"images_per_s\":8.0}\n",
        );
        write(dir.path(), "summary.json", "{\"global_batch\":8}");
        write(
            dir.path(),
            "config.resolved.toml",
            "[train]\nbatch_size = 4294967296\naccumulate = 4294967296\n",
        );
        let run = load_run(dir.path()).expect("run");
        assert_eq!(run.ranks, 0);
    }

    #[test]
    fn report_device_names() {
        let gpu = "gpu (burn wgpu, adapter [0] llvmpipe (LLVM 15.0.6, 256 bits), CPU (software), Vulkan, loop-capped)";
        assert_eq!(backend_of_device(gpu), "gpu");
        assert_eq!(short_device(gpu), "llvmpipe (LLVM 15.0.6, 256 bits)");
        assert_eq!(backend_of_device("cpu (burn flex, 2 threads)"), "cpu");
        assert_eq!(backend_of_device(""), "unknown");
        assert_eq!(
            short_device("cpu (burn flex, 2 threads)"),
            "burn flex, 2 threads"
        );
    }
}
