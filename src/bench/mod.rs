//! Benchmarks. Here `ctseg bench step` (the time of one training step: forward, loss, backward,
//! optimiser step) over warm steps, with its spread, images/s, achieved GFLOP/s and peak memory;
//! optionally the PyTorch peer run with the same shapes in the same invocation, reported as a
//! ratio; and `bench allreduce`. The step's phase and kernel profile is in [`profile`]. Rank-count series are in [`scaling`], the performance model in [`model`], ctseg's GPU kernels against burn's in [`kernels`], `--gpu-conv auto`'s choice between them in [`conv_choice`] (kept across runs by [`conv_cache`]).

pub mod conv_cache;
pub mod conv_choice;
pub mod kernels;
pub mod model;
pub mod profile;
pub mod scaling;

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::backend::Backend;
use crate::config::RunConfig;
use crate::data::{Dataset, HostBatch, make_batch};
use crate::error::{Error, Result};
use crate::train::{Stepper, TrainState};
use crate::util::stats::quantile;
use crate::util::sys::peak_rss_mb;

/// What to measure.
#[derive(Clone, Debug)]
pub struct StepBenchOptions {
    /// Untimed steps first (kernel compilation, allocator warm-up).
    pub warmup: usize,
    /// Timed steps.
    pub steps: usize,
}

/// Result of a step benchmark (one JSON line with `--json`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StepBench {
    /// `"ctseg"`.
    pub bench: String,
    /// Device description.
    pub device: String,
    /// Model width.
    pub width: usize,
    /// Input size.
    pub size: usize,
    /// Batch.
    pub batch: usize,
    /// Trainable parameters.
    pub params: usize,
    /// Timed steps.
    pub steps: usize,
    /// Median step time, s.
    pub median_step_s: f64,
    /// Fastest step, s.
    pub min_step_s: f64,
    /// Slowest step, s.
    pub max_step_s: f64,
    /// Interquartile range of step times, s.
    pub iqr_step_s: f64,
    /// Images per second at the median.
    pub images_per_s: f64,
    /// Forward+backward GFLOP per step (3 × forward, see `ctseg model`).
    pub gflop_per_step: f64,
    /// Achieved GFLOP/s at the median.
    pub gflops: f64,
    /// Loss of the first and last step (same batch: it should fall).
    pub first_loss: f64,
    /// Loss of the last step.
    pub last_loss: f64,
    /// Peak resident memory of this process, MB (VmHWM).
    pub peak_rss_mb: f64,
    /// Ranks (data-parallel: each rank runs `batch` images and the gradients are averaged).
    pub ranks: usize,
    /// Median seconds of forward + loss + backward.
    pub compute_s: f64,
    /// Median seconds the host spent issuing the forward + loss + backward, before waiting for
    /// the device (`#[serde(default)]`: older result files lack it).
    #[serde(default)]
    pub issue_s: f64,
    /// Median seconds copying the fused gradient buffer off the device (0 on one rank).
    pub copy_s: f64,
    /// Median seconds of exposed gradient communication (0 on one rank).
    pub comm_s: f64,
    /// Median seconds of the allreduces themselves, overlapped or not.
    pub comm_total_s: f64,
    /// Median seconds of the optimiser step.
    pub apply_s: f64,
}

/// The benchmarks' step inputs: `train.accumulate` micro-batches of one fixed batch from one
/// phantom volume, and a fresh model and optimiser on `be`'s device (in its precision).
fn fixture(cfg: &RunConfig, be: &Backend) -> (Vec<HostBatch>, TrainState) {
    let b = cfg.train.batch_size;
    let ds = Dataset::phantom(cfg.seed, 1, b, cfg.model.input_size, 1);
    let idx: Vec<usize> = (0..b).collect();
    let batch = make_batch(&ds, &cfg.data, cfg.model.classes, &idx);
    let micro = vec![batch; cfg.train.accumulate.max(1)];
    let state = TrainState::fresh(cfg, &be.device.clone().autodiff(), be.caps);
    (micro, state)
}

/// Times training steps of `cfg`'s model on one fixed phantom batch (`train.accumulate`
/// micro-batches of it per step), through the trainer's own [`Stepper`]. Collective under MPI:
/// every rank times its own batch and the gradient exchange.
pub fn bench_step(
    cfg: &RunConfig,
    be: &Backend,
    o: &StepBenchOptions,
    comm: &dyn crate::comm::Communicator,
) -> Result<StepBench> {
    // 1. The fixed batch, the model and the stepper.
    let b = cfg.train.batch_size;
    let size = cfg.model.input_size;
    let (micro, mut state) = fixture(cfg, be);
    let stepper = Stepper::new(cfg, &state.model, &be.device, comm);
    let sync = || {
        be.device
            .sync()
            .map_err(|e| Error::Device(format!("{e:?}")))
    };
    // 2. Warm-up and timed steps, all ranks starting each step together.
    let mut times = Vec::with_capacity(o.steps);
    let mut parts: [Vec<f64>; 6] = Default::default();
    let mut losses = Vec::new();
    for step in 0..o.warmup + o.steps {
        sync()?;
        comm.barrier()?;
        let t = Instant::now();
        let (s, out) = stepper.step(state, &micro, step as u64, cfg.optimizer.lr())?;
        state = s;
        let dt = t.elapsed().as_secs_f64();
        crate::faults::inject("bench", comm.rank(), step as u64);
        losses.push(out.loss);
        if step >= o.warmup {
            times.push(dt);
            let x = out.times;
            for (v, x) in parts.iter_mut().zip([
                x.compute_s,
                x.copy_s,
                x.comm_s,
                x.apply_s,
                x.comm_total_s,
                x.issue_s,
            ]) {
                v.push(x);
            }
        }
    }
    // 3. Medians and spread.
    let median_of = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        quantile(v, 0.5)
    };
    let [
        mut pc,
        mut pcopy,
        mut pcomm,
        mut papply,
        mut ptotal,
        mut pissue,
    ] = parts;
    let spread = crate::util::stats::spread(&times);
    let summary = crate::model::summarize_with_inputs(&cfg.model, cfg.data.in_channels());
    let images = b * cfg.train.accumulate.max(1);
    let gflop = summary.train_flops() * images as f64 / 1e9;
    Ok(StepBench {
        bench: "ctseg".into(),
        device: be.description.clone(),
        width: cfg.model.width,
        size,
        batch: b,
        params: summary.params(),
        steps: times.len(),
        median_step_s: spread.median,
        min_step_s: spread.min,
        max_step_s: spread.max,
        iqr_step_s: spread.iqr,
        images_per_s: (images * comm.size()) as f64 / spread.median,
        gflop_per_step: gflop,
        gflops: gflop / spread.median,
        first_loss: losses.first().copied().unwrap_or(f64::NAN),
        last_loss: losses.last().copied().unwrap_or(f64::NAN),
        peak_rss_mb: peak_rss_mb(),
        ranks: comm.size(),
        compute_s: median_of(&mut pc),
        issue_s: median_of(&mut pissue),
        copy_s: median_of(&mut pcopy),
        comm_s: median_of(&mut pcomm),
        comm_total_s: median_of(&mut ptotal),
        apply_s: median_of(&mut papply),
    })
}

impl StepBench {
    /// Two lines for a terminal: the step time with its spread, throughput and memory; the
    /// median split of the step.
    pub fn render(&self) -> String {
        format!(
            "ctseg step ({}): width {} size {} batch {} | median {:.3} s (min {:.3}, max {:.3}, IQR {:.3}, {} steps) | {:.2} img/s | {:.1} GFLOP/s | peak RSS {:.0} MB | loss {:.4} -> {:.4}\n  per step (median): compute {:.3} s (host issuing it {:.3} s) | gradient copy {:.3} s | communication {:.3} s of which exposed {:.3} s | optimiser {:.3} s | {} rank(s)",
            self.device,
            self.width,
            self.size,
            self.batch,
            self.median_step_s,
            self.min_step_s,
            self.max_step_s,
            self.iqr_step_s,
            self.steps,
            self.images_per_s,
            self.gflops,
            self.peak_rss_mb,
            self.first_loss,
            self.last_loss,
            self.compute_s,
            self.issue_s,
            self.copy_s,
            self.comm_total_s,
            self.comm_s,
            self.apply_s,
            self.ranks
        )
    }
}

/// What the PyTorch peer script printed.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PeerResult {
    /// Median step, s.
    pub median_step_s: f64,
    /// Fastest step, s.
    pub min_step_s: f64,
    /// Images/s.
    pub images_per_s: f64,
    /// Peak RSS, MB.
    #[serde(default)]
    pub peak_rss_mb: f64,
    /// Torch version.
    #[serde(default)]
    pub torch: String,
    /// Device.
    #[serde(default)]
    pub device: String,
    /// `f32` (PyTorch's default) or `amp` (autocast + GradScaler).
    #[serde(default = "f32_name")]
    pub precision: String,
    /// `torch.backends.cudnn.allow_tf32`: whether cuDNN convolutions ran in TF32 on CUDA.
    #[serde(default)]
    pub cudnn_allow_tf32: Option<bool>,
    /// The autocast dtype under `amp` (float16 on CUDA, bfloat16 on the CPU).
    #[serde(default)]
    pub amp_dtype: Option<String>,
    /// The GradScaler's scale after the last step, under `amp`.
    #[serde(default)]
    pub loss_scale: Option<f64>,
    /// Steps the GradScaler skipped (non-finite gradients), under `amp`.
    #[serde(default)]
    pub skipped_steps: u64,
}

fn f32_name() -> String {
    "f32".into()
}

/// The precision the PyTorch peer trains in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum PeerPrecision {
    /// PyTorch's default: f32 tensors (cuDNN convolutions in TF32 on CUDA, as PyTorch defaults).
    F32,
    /// Automatic mixed precision: `torch.autocast` and a `GradScaler`.
    Amp,
}

impl PeerPrecision {
    /// The peer script's `--precision` value.
    pub fn name(self) -> &'static str {
        match self {
            PeerPrecision::F32 => "f32",
            PeerPrecision::Amp => "amp",
        }
    }
}

/// Runs `python3 SCRIPT` (the livermask PyTorch peer) with `cfg`'s width, input size, batch
/// and dropout on `device` (`cpu` or `cuda`) in `precision` and parses its JSON line.
pub fn run_peer(
    python: &str,
    script: &Path,
    threads: usize,
    cfg: &RunConfig,
    o: &StepBenchOptions,
    device: &str,
    precision: PeerPrecision,
) -> Result<PeerResult> {
    let out = Command::new(python)
        .arg(script)
        .args(["--threads", &threads.to_string()])
        .args(["--width", &cfg.model.width.to_string()])
        .args(["--size", &cfg.model.input_size.to_string()])
        .args(["--batch", &cfg.train.batch_size.to_string()])
        .args(["--warmup", &o.warmup.to_string()])
        .args(["--steps", &o.steps.to_string()])
        .args(["--dropout", &cfg.model.dropout.to_string()])
        .args(["--device", device])
        .args(["--precision", precision.name()])
        .output()
        .map_err(|e| Error::io(script, e))?;
    if !out.status.success() {
        return Err(Error::Invalid(format!(
            "peer {} failed ({}): {}",
            script.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .rev()
        .find(|l| l.trim_start().starts_with('{'))
        .ok_or_else(|| Error::Invalid(format!("peer {} printed no JSON line", script.display())))?;
    serde_json::from_str(line).map_err(|e| {
        Error::Invalid(format!(
            "peer {}: unreadable JSON ({e}): {line}",
            script.display()
        ))
    })
}

/// One message size of the allreduce benchmark.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AllreduceRow {
    /// `"allreduce"`.
    pub bench: String,
    /// Ranks.
    pub ranks: usize,
    /// Message size in bytes (f32 values × 4).
    pub bytes: usize,
    /// Timed repetitions.
    pub iters: usize,
    /// Median time of one allreduce, s.
    pub median_s: f64,
    /// Fastest, s.
    pub min_s: f64,
    /// Algorithm bandwidth: bytes / median time, GB/s.
    pub algbw_gbs: f64,
    /// Bus bandwidth: algbw × 2(p−1)/p (what each link carries in a ring), GB/s.
    pub busbw_gbs: f64,
    /// Ring bound from the link rate, if given: 2(p−1)/p · bytes / rate, s.
    pub bound_s: Option<f64>,
    /// bound / median: the fraction of the link's limit reached.
    pub of_bound: Option<f64>,
}

impl AllreduceRow {
    /// One line for a terminal.
    pub fn render(&self) -> String {
        format!(
            "{} ranks {:>11} B: median {:>10.3} ms (min {:.3}) | algbw {:7.3} GB/s | busbw {:7.3} GB/s{}",
            self.ranks,
            self.bytes,
            self.median_s * 1e3,
            self.min_s * 1e3,
            self.algbw_gbs,
            self.busbw_gbs,
            self.of_bound
                .map(|f| format!(" | {:.0} % of the ring bound", 100.0 * f))
                .unwrap_or_default()
        )
    }
}

/// Times in-place sum-allreduces of f32 buffers from `min_bytes` to `max_bytes` (×2 steps).
/// Collective: every rank must call it with the same arguments. `link_gbps` (Gbit/s) adds the
/// ring allreduce bound to each row.
pub fn bench_allreduce(
    comm: &dyn crate::comm::Communicator,
    min_bytes: usize,
    max_bytes: usize,
    link_gbps: Option<f64>,
) -> Result<Vec<AllreduceRow>> {
    let p = comm.size();
    let factor = if p > 1 {
        2.0 * (p - 1) as f64 / p as f64
    } else {
        0.0
    };
    let mut rows = Vec::new();
    let mut bytes = min_bytes.max(4);
    while bytes <= max_bytes {
        let n = bytes / 4;
        let mut buf = vec![1.0f32; n];
        // Fixed counts (never time-based: every rank must run the same number of collectives).
        let iters = (64 * 1024 * 1024 / bytes).clamp(3, 200);
        for _ in 0..2 {
            comm.allreduce_sum_f32(&mut buf)?;
        }
        let mut times = Vec::with_capacity(iters);
        for _ in 0..iters {
            comm.barrier()?;
            let t = Instant::now();
            comm.allreduce_sum_f32(&mut buf)?;
            times.push(t.elapsed().as_secs_f64());
        }
        // A barrier precedes every repetition, so all ranks time the same collective; rank 0's
        // figures are reported.
        times.sort_by(f64::total_cmp);
        let median = quantile(&times, 0.5);
        let algbw = bytes as f64 / median / 1e9;
        let bound = link_gbps.map(|g| factor * bytes as f64 / (g * 1e9 / 8.0));
        rows.push(AllreduceRow {
            bench: "allreduce".into(),
            ranks: p,
            bytes,
            iters,
            median_s: median,
            min_s: times.first().copied().unwrap_or(f64::NAN),
            algbw_gbs: algbw,
            busbw_gbs: algbw * factor,
            bound_s: bound,
            of_bound: bound.map(|b| b / median),
        });
        bytes *= 2;
    }
    Ok(rows)
}
