//! `ctseg bench model`: an analytic performance model of data-parallel training. From one
//! measured run (compute time per image, gradient copy, optimiser time, parameter count) and a
//! network (link rate, latency, allreduce algorithm) it predicts step time, epoch time,
//! speedup and, given steps-to-target from the large-batch study, time-to-target for N ranks.
//!
//! ```text
//! step(N)  = b·K·t_img + t_other + [N > 1]·(t_copy + allreduce(N, S))
//! ring          allreduce(N, S) = 2(N−1)·α + 2(N−1)/N · S/B
//! rabenseifner  allreduce(N, S) = 2·⌈log2 N⌉·α + 2(N−1)/N · S/B
//! epoch(N) = ⌊slices / (b·K·N)⌋ · step(N)
//! ```
//! (b: batch per micro-batch, K: micro-batches per step, S: gradient bytes (halved with fp16),
//! B: link bytes/s, α: latency; both allreduces are bandwidth-optimal and differ in latency
//! terms only (Thakur, Rabenseifner & Gropp 2005).)

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Allreduce algorithm of the model.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Algorithm {
    /// Ring: reduce-scatter + allgather in N−1 steps each.
    Ring,
    /// Rabenseifner: recursive halving reduce-scatter + recursive doubling allgather.
    Rabenseifner,
}

/// The measured inputs of the model.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Measured {
    /// Forward + loss + backward seconds per image.
    pub compute_per_image_s: f64,
    /// Seconds per step besides compute and communication (optimiser, loader, bookkeeping).
    pub other_s: f64,
    /// Seconds copying gradients off the device and back per step (0 measured on 1 rank: then
    /// estimated from the gradient bytes at `copy_gbs`).
    pub copy_s: f64,
    /// Gradient bytes on the wire per step.
    pub grad_bytes: f64,
    /// Images per micro-batch.
    pub batch: usize,
    /// Micro-batches per step.
    pub accumulate: usize,
    /// Training slices in one epoch.
    pub train_slices: usize,
    /// Run directory the figures come from.
    pub source: String,
}

/// The network of the model.
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub struct Network {
    /// Link rate per node, Gbit/s.
    pub link_gbps: f64,
    /// Per-message latency, µs.
    pub latency_us: f64,
    /// Allreduce algorithm.
    pub algorithm: Algorithm,
}

/// One predicted rank count.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Prediction {
    /// Ranks.
    pub ranks: usize,
    /// Global batch.
    pub global_batch: usize,
    /// Compute per step, s.
    pub compute_s: f64,
    /// Allreduce per step, s.
    pub allreduce_s: f64,
    /// Step, s.
    pub step_s: f64,
    /// Steps per epoch (0: the global batch exceeds the data).
    pub steps_per_epoch: u64,
    /// Epoch, s.
    pub epoch_s: f64,
    /// Throughput of N ranks (images per second) / throughput of 1 (NaN when no full global
    /// batch fits in the data). Not from epoch times: an epoch drops its last incomplete global
    /// batch, so epochs at different rank counts hold different numbers of images.
    pub speedup: f64,
    /// Steps to the target at this global batch (interpolated from the study), if known.
    pub steps_to_target: Option<f64>,
    /// Time to the target, s, if known.
    pub time_to_target_s: Option<f64>,
}

/// Time of one allreduce of `bytes` over `n` ranks.
pub fn allreduce_s(net: &Network, n: usize, bytes: f64) -> f64 {
    if n <= 1 {
        return 0.0;
    }
    let nf = n as f64;
    let alpha = net.latency_us * 1e-6;
    let beta = 8.0 / (net.link_gbps * 1e9);
    let bandwidth = 2.0 * (nf - 1.0) / nf * bytes * beta;
    let latency = match net.algorithm {
        Algorithm::Ring => 2.0 * (nf - 1.0) * alpha,
        Algorithm::Rabenseifner => 2.0 * nf.log2().ceil() * alpha,
    };
    latency + bandwidth
}

/// Gradient copy rate used when the run had one rank (no copy measured), GB/s of fp32
/// gradients copied off the device into the fused buffer and back: 251 MB in 0.255 s
/// (0.177 s + 0.078 s) for livermask's gradients on the CPU backend of the 2-core build
/// machine (`cargo bench --bench allreduce`), i.e. ~1 GB/s.
pub const DEFAULT_COPY_GBS: f64 = 1.0;

/// The measured inputs from a run directory (its `summary.json`, `metrics.jsonl` and config).
/// `copy_gbs` estimates the gradient copy of a 1-rank run (see [`DEFAULT_COPY_GBS`]).
pub fn measured_from_run(run_dir: &Path, copy_gbs: f64) -> Result<Measured> {
    let run = crate::rundir::RunDir::finished(run_dir)?;
    let s = super::scaling::read_summary(run_dir)?;
    let per_step_images = s
        .batch_size
        .max(1)
        .checked_mul(s.accumulate.max(1))
        .and_then(|n| usize::try_from(n).ok())
        .ok_or_else(|| {
            Error::malformed(
                run.summary(),
                format!(
                    "batch_size {} × accumulate {} overflows; expected the images of one step on one rank",
                    s.batch_size, s.accumulate
                ),
            )
        })?;
    let [compute, copy, comm, _wait] = super::scaling::step_split(run_dir)?;
    if !(s.median_step_s.is_finite() && s.median_step_s > 0.0) {
        return Err(Error::malformed(
            run.summary(),
            format!(
                "median_step_s = {}: the run has no timed steps; run more steps",
                s.median_step_s
            ),
        ));
    }
    if !compute.is_finite() {
        return Err(Error::malformed(
            run.metrics(),
            "no step record has compute_s past the warm-up: expected the timed steps of the run \
             that wrote summary.json; run more steps",
        ));
    }
    // Only the wire format of the gradients is read from the run's config, leniently: runs of
    // older versions (other optimiser keys) still feed the model.
    let cfg_path = run.config();
    let text = std::fs::read_to_string(&cfg_path).map_err(|e| Error::io(&cfg_path, e))?;
    let value: toml::Value = toml::from_str(&text).map_err(|e| Error::ConfigParse {
        path: cfg_path.clone(),
        message: e.to_string(),
    })?;
    let fp16 = value
        .get("distributed")
        .and_then(|d| d.get("grad_compression"))
        .and_then(|c| c.as_str())
        == Some("fp16");
    let wire = if fp16 { 2.0 } else { 4.0 };
    // Other = step − compute − copy − exposed communication, from the medians.
    let other = if s.world_size > 1 {
        s.median_step_s - compute - copy - comm
    } else {
        s.median_step_s - compute
    };
    Ok(Measured {
        compute_per_image_s: compute / per_step_images as f64,
        other_s: other.max(0.0),
        copy_s: if s.world_size > 1 && copy.is_finite() {
            copy
        } else {
            2.0 * 4.0 * s.params as f64 / (copy_gbs * 1e9)
        },
        grad_bytes: wire * s.params as f64,
        batch: s.batch_size.max(1) as usize,
        accumulate: s.accumulate.max(1) as usize,
        train_slices: s.train_slices as usize,
        source: run_dir.display().to_string(),
    })
}

/// Steps to the target at `global_batch`, interpolated log-log between the study's measured
/// `(global batch, steps)` points; `None` outside their range (no extrapolation).
pub fn interpolate_steps(points: &[(f64, f64)], global_batch: f64) -> Option<f64> {
    let mut p: Vec<(f64, f64)> = points.to_vec();
    p.sort_by(|a, b| a.0.total_cmp(&b.0));
    if let Some(&(_, s)) = p.iter().find(|(b, _)| *b == global_batch) {
        return Some(s);
    }
    p.windows(2).find_map(|w| {
        let ((b0, s0), (b1, s1)) = (w[0], w[1]);
        (b0 < global_batch && global_batch < b1).then(|| {
            let t = (global_batch.ln() - b0.ln()) / (b1.ln() - b0.ln());
            (s0.ln() + t * (s1.ln() - s0.ln())).exp()
        })
    })
}

/// Predicts rank counts `ranks` on `net`.
pub fn predict(
    m: &Measured,
    net: &Network,
    ranks: &[usize],
    steps_to_target: &[(f64, f64)],
) -> Vec<Prediction> {
    // Saturating, as the products with the rank counts below: those come from the command
    // line and may be absurd.
    let per_step = m.batch.saturating_mul(m.accumulate);
    let step_at = |n: usize| {
        let compute = per_step as f64 * m.compute_per_image_s;
        let ar = allreduce_s(net, n, m.grad_bytes);
        let copy = if n > 1 { m.copy_s } else { 0.0 };
        (compute, ar, compute + m.other_s + copy + ar)
    };
    let epoch_at = |n: usize| {
        let spe = per_step
            .checked_mul(n)
            .filter(|&g| g > 0)
            .map_or(0, |g| m.train_slices / g) as u64;
        (spe, spe as f64 * step_at(n).2)
    };
    let throughput1 = per_step as f64 / step_at(1).2;
    ranks
        .iter()
        .map(|&n| {
            let (compute_s, allreduce_s, step_s) = step_at(n);
            let (steps_per_epoch, epoch_s) = epoch_at(n);
            let global_batch = per_step.saturating_mul(n);
            let steps = interpolate_steps(steps_to_target, global_batch as f64);
            Prediction {
                ranks: n,
                global_batch,
                compute_s,
                allreduce_s,
                step_s,
                steps_per_epoch,
                epoch_s,
                speedup: if steps_per_epoch > 0 {
                    global_batch as f64 / step_s / throughput1
                } else {
                    f64::NAN
                },
                steps_to_target: steps,
                time_to_target_s: steps.map(|s| s * step_s),
            }
        })
        .collect()
}

/// Parses `GLOBAL_BATCH=STEPS,…` (e.g. `30=400,960=60`).
pub fn parse_steps_to_target(text: &str) -> Result<Vec<(f64, f64)>> {
    let points = text
        .split(',')
        .filter(|p| !p.trim().is_empty())
        .map(|p| {
            let bad = || {
                Error::Argument(format!(
                    "--steps-to-target: `{p}` is not GLOBAL_BATCH=STEPS with positive finite numbers (e.g. 30=400,960=60)"
                ))
            };
            let (b, s) = p.split_once('=').ok_or_else(bad)?;
            let b: f64 = b.trim().parse().map_err(|_| bad())?;
            let s: f64 = s.trim().parse().map_err(|_| bad())?;
            let fine = |v: f64| v > 0.0 && v.is_finite();
            if fine(b) && fine(s) {
                Ok((b, s))
            } else {
                Err(bad())
            }
        })
        .collect::<Result<Vec<_>>>()?;
    if points.is_empty() {
        return Err(Error::Argument(
            "--steps-to-target: no GLOBAL_BATCH=STEPS point (e.g. 30=400,960=60)".into(),
        ));
    }
    // Interpolation needs one step count per global batch.
    for (i, (b, _)) in points.iter().enumerate() {
        if points[..i].iter().any(|(o, _)| o == b) {
            return Err(Error::Argument(format!(
                "--steps-to-target gives global batch {b} twice"
            )));
        }
    }
    Ok(points)
}

/// A measured run set against the model's prediction for it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Validation {
    /// Run directory.
    pub run_dir: String,
    /// Its ranks.
    pub ranks: usize,
    /// Measured median step, s.
    pub measured_step_s: f64,
    /// Predicted step from the base run's compute (the full model), s.
    pub predicted_step_s: f64,
    /// (predicted − measured) / measured.
    pub error: f64,
    /// Predicted step with this run's own measured compute (isolates the communication
    /// model from compute slow-downs such as ranks sharing cores), s.
    pub predicted_comm_only_step_s: f64,
    /// Its relative error.
    pub comm_only_error: f64,
    /// Measured median exposed communication, s.
    pub measured_comm_s: f64,
    /// Predicted allreduce, s.
    pub predicted_allreduce_s: f64,
}

/// Compares the model built from `base` with the measured runs in `dirs`.
pub fn validate(
    base: &Measured,
    net: &Network,
    dirs: &[&Path],
    copy_gbs: f64,
) -> Result<Vec<Validation>> {
    dirs.iter()
        .map(|d| {
            // First, so that a missing or unfinished run is refused by name (exit 2).
            let own = measured_from_run(d, copy_gbs)?;
            let s = super::scaling::read_summary(d)?;
            let n = s.world_size as usize;
            let predicted = predict(base, net, &[n], &[]);
            let p = predicted.first().map_or(f64::NAN, |p| p.step_s);
            let own_p = predict(&own, net, &[n], &[]);
            let op = own_p.first().map_or(f64::NAN, |p| p.step_s);
            let [_, _, comm, _] = super::scaling::step_split(d)?;
            Ok(Validation {
                run_dir: d.display().to_string(),
                ranks: n,
                measured_step_s: s.median_step_s,
                predicted_step_s: p,
                error: (p - s.median_step_s) / s.median_step_s,
                predicted_comm_only_step_s: op,
                comm_only_error: (op - s.median_step_s) / s.median_step_s,
                measured_comm_s: comm,
                predicted_allreduce_s: allreduce_s(net, n, base.grad_bytes),
            })
        })
        .collect()
}

/// The model's tables as Markdown: the measured inputs, the predictions per rank count and,
/// when runs were given to compare with, predicted against measured.
pub fn markdown(
    m: &Measured,
    net: &Network,
    preds: &[Prediction],
    checks: &[Validation],
) -> String {
    let mut md = format!(
        "# ctseg bench model\n\nMeasured in `{}`: {:.4} s compute per image, {:.3} s other per step, {:.3} s gradient copy, {:.1} MB of gradients on the wire, batch {} × {} micro-batch(es), {} training slices.\nNetwork: {} Gbit/s, {} µs latency, {:?} allreduce. Speedup is in throughput (images/s), not epoch time: an epoch drops its last incomplete global batch.\n\n| ranks | global batch | compute (s) | allreduce (s) | step (s) | steps/epoch | epoch (s) | speedup (img/s) | steps to target | time to target (s) |\n|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
        m.source,
        m.compute_per_image_s,
        m.other_s,
        m.copy_s,
        m.grad_bytes / 1e6,
        m.batch,
        m.accumulate,
        m.train_slices,
        net.link_gbps,
        net.latency_us,
        net.algorithm
    );
    for p in preds {
        let opt = |v: Option<f64>, digits: usize| {
            v.map_or("—".to_string(), |v| format!("{v:.digits$}"))
        };
        md.push_str(&format!(
            "| {} | {} | {:.3} | {:.3} | {:.3} | {} | {} | {} | {} | {} |\n",
            p.ranks,
            p.global_batch,
            p.compute_s,
            p.allreduce_s,
            p.step_s,
            p.steps_per_epoch,
            if p.steps_per_epoch > 0 {
                format!("{:.1}", p.epoch_s)
            } else {
                "batch > data".into()
            },
            if p.speedup.is_finite() {
                format!("{:.2}", p.speedup)
            } else {
                "—".into()
            },
            opt(p.steps_to_target, 0),
            opt(p.time_to_target_s, 1),
        ));
    }
    if !checks.is_empty() {
        md.push_str("\n## Predicted against measured\n\n| run | ranks | measured step (s) | predicted (s) | error | predicted with the run's own compute (s) | error | measured exposed comm (s) | predicted allreduce (s) |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|\n");
        for c in checks {
            md.push_str(&format!(
                "| {} | {} | {:.3} | {:.3} | {:+.1} % | {:.3} | {:+.1} % | {:.3} | {:.3} |\n",
                c.run_dir,
                c.ranks,
                c.measured_step_s,
                c.predicted_step_s,
                100.0 * c.error,
                c.predicted_comm_only_step_s,
                100.0 * c.comm_only_error,
                c.measured_comm_s,
                c.predicted_allreduce_s
            ));
        }
    }
    md
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(algorithm: Algorithm) -> Network {
        Network {
            link_gbps: 1.0,
            latency_us: 50.0,
            algorithm,
        }
    }

    #[test]
    fn allreduce_closed_forms() {
        // 125 MB over 4 ranks at 1 Gbit/s: bandwidth term 2·3/4 · 125e6 · 8e-9 = 1.5 s.
        // Ring latency 2·3·50 µs = 300 µs; Rabenseifner 2·log2(4)·50 µs = 200 µs.
        let s = 125e6;
        assert!((allreduce_s(&net(Algorithm::Ring), 4, s) - 1.5003).abs() < 1e-12);
        assert!((allreduce_s(&net(Algorithm::Rabenseifner), 4, s) - 1.5002).abs() < 1e-12);
        assert_eq!(allreduce_s(&net(Algorithm::Ring), 1, s), 0.0);
        // 1024 ranks: ring latency 2·1023·50 µs = 0.1023 s dominates small messages.
        let r = allreduce_s(&net(Algorithm::Ring), 1024, 0.0);
        assert!((r - 0.1023).abs() < 1e-12);
    }

    #[test]
    fn epoch_and_speedup() {
        let m = Measured {
            compute_per_image_s: 0.5,
            other_s: 0.1,
            copy_s: 0.2,
            grad_bytes: 125e6,
            batch: 2,
            accumulate: 1,
            train_slices: 1000,
            source: String::new(),
        };
        let p = predict(
            &m,
            &net(Algorithm::Ring),
            &[1, 2, 1000],
            &[(2.0, 100.0), (8.0, 25.0)],
        );
        // 1 rank: step 2·0.5 + 0.1 = 1.1 s; 500 steps → 550 s.
        assert!((p[0].step_s - 1.1).abs() < 1e-12);
        assert!((p[0].epoch_s - 550.0).abs() < 1e-9);
        // 2 ranks: 1.1 + 0.2 + (2·50 µs + 2·½·125e6·8e-9) = 1.1 + 0.2 + 1.0001 = 2.3001 s;
        // 250 steps → 575.025 s. Speedup in throughput: (4 images / 2.3001 s) / (2 / 1.1 s).
        assert!((p[1].step_s - 2.3001).abs() < 1e-9);
        assert!((p[1].epoch_s - 575.025).abs() < 1e-9);
        assert!((p[1].speedup - (4.0 / 2.3001) / (2.0 / 1.1)).abs() < 1e-9);
        // Steps to target: 100 at batch 2, 25 at batch 8 → log-log at batch 4: 50.
        assert!((p[1].steps_to_target.unwrap_or(0.0) - 50.0).abs() < 1e-9);
        // 1000 ranks × 2 images > 1000 slices: no step fits.
        assert_eq!(p[2].steps_per_epoch, 0);
        assert_eq!(p[2].steps_to_target, None);
    }

    #[test]
    fn absurd_rank_counts_predict_no_step_instead_of_panicking() {
        // `--max-ranks` near usize::MAX gave 2^61 ranks × 8 images, which wrapped to a global
        // batch of 0 and divided the training set by it.
        let m = Measured {
            compute_per_image_s: 0.5,
            other_s: 0.1,
            copy_s: 0.2,
            grad_bytes: 125e6,
            batch: 8,
            accumulate: 1,
            train_slices: 1000,
            source: String::new(),
        };
        let p = predict(&m, &net(Algorithm::Ring), &[1 << 61, 1 << 63], &[]);
        assert!(p.iter().all(|p| p.steps_per_epoch == 0), "{p:?}");
        assert!(p.iter().all(|p| p.global_batch == usize::MAX), "{p:?}");
    }

    #[test]
    fn a_summarys_overflowing_batch_is_refused_naming_the_file_and_fields() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(
            dir.path().join(crate::rundir::SUMMARY),
            "{\"batch_size\":4294967296,\"accumulate\":4294967296,\"median_step_s\":1.0}",
        )
        .expect("write summary");
        let e = measured_from_run(dir.path(), DEFAULT_COPY_GBS)
            .expect_err("overflowing batch")
            .to_string();
        assert!(
            e.contains("summary.json") && e.contains("batch_size 4294967296 × accumulate"),
            "{e}"
        );
    }

    #[test]
    fn a_run_without_a_summary_is_refused_as_unfinished() {
        let dir = tempfile::tempdir().expect("tempdir");
        let e = measured_from_run(dir.path(), DEFAULT_COPY_GBS).expect_err("no summary");
        assert!(matches!(e, Error::Argument(_)), "{e}");
        assert!(e.to_string().contains("has no summary.json"), "{e}");
    }

    #[test]
    fn a_summary_whose_metrics_hold_no_timed_step_names_the_metrics() {
        // summary.json has a median step, metrics.jsonl no step record: the file at fault is
        // the metrics log.
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(
            dir.path().join(crate::rundir::SUMMARY),
            "{\"batch_size\":4,\"median_step_s\":1.0}",
        )
        .expect("write summary");
        std::fs::write(dir.path().join(crate::rundir::METRICS), "").expect("write metrics");
        let e = measured_from_run(dir.path(), DEFAULT_COPY_GBS).expect_err("no compute_s");
        assert!(matches!(e, Error::Malformed { .. }), "{e}");
        assert!(
            e.to_string().contains("metrics.jsonl") && e.to_string().contains("compute_s"),
            "{e}"
        );
    }

    #[test]
    fn steps_to_target_parsing() {
        assert_eq!(
            parse_steps_to_target("30=400, 960=60").ok(),
            Some(vec![(30.0, 400.0), (960.0, 60.0)])
        );
        for bad in ["30", "x=1", "30=-1", "4=inf", "nan=4", "", " , ", "4=5,4=6"] {
            assert!(parse_steps_to_target(bad).is_err(), "{bad}");
        }
    }
}
