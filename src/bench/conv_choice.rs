//! `--gpu-conv auto`: which 3×3 convolution kernels a run gets on a GPU, chosen at start-up by
//! timing the model's own layers, at the run's batch, on burn's kernels and on ctseg's.
//!
//! Which is faster depends on the adapter (on lavapipe burn's, docs/gpu-notes.md), so the
//! choice is measured where the run is, not assumed. It applies only where both paths can run
//! f32: in mixed precision every convolution is ctseg's anyway, and a `spirv` build cannot
//! load ctseg's WGSL kernels.

use serde::{Deserialize, Serialize};

use crate::backend::{Backend, BackendKind};
use crate::comm::Communicator;
use crate::error::{Error, Result};
use crate::model::{GpuConv, UNetConfig, arch};
use crate::wgsl::{self, Compiler};

use super::kernels::{KernelCase, time_conv_paths};

/// Timed repetitions per layer and path (the median is kept, after one untimed).
const REPS: usize = 3;

/// How much faster ctseg's kernels must be to be chosen: burn's are the longer-tested path,
/// and a model on which the two are this close would otherwise switch paths between runs (a
/// resumed run, `predict` after `train`) on the timing's noise.
pub const MARGIN: f64 = 0.9;

/// The most values one timed layer's input or output may hold (2 GiB in f32): the timing keeps
/// a layer's input, output and their gradients on the device and two such arrays on the host,
/// and `predict --batch-size` may be far larger than any volume it meets. livermask's widest
/// layer at width 64 fits 48 images (a training batch of 30 is timed whole).
pub const MAX_TIMED_VALUES: usize = 1 << 29;

/// What a run does with its convolutions: forward only (inference) or forward and both
/// gradients (training), on `batch` images.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvWorkload {
    /// Images per pass.
    pub batch: usize,
    /// Forward and gradients (`true`) or the forward alone.
    pub train: bool,
}

/// The measurement behind a choice.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ConvChoice {
    /// The path chosen ([`decide`]).
    pub chosen: GpuConv,
    /// Seconds of all the model's 3×3 convolutions on burn's kernels: each distinct layer's
    /// median times how often the model runs it, summed; under MPI the mean over the ranks.
    pub burn_s: f64,
    /// The same on ctseg's WGSL kernels.
    pub wgsl_s: f64,
    /// Distinct layer shapes timed.
    pub layers: usize,
    /// Ranks whose times were averaged (1 without MPI).
    pub ranks: usize,
    /// Images per timed pass: the run's batch, or fewer where its layers would exceed
    /// [`MAX_TIMED_VALUES`] ([`timed_batch`]).
    pub batch: usize,
}

impl ConvChoice {
    /// One line for the log and the backend's description.
    pub fn describe(&self) -> String {
        let over = if self.ranks > 1 {
            format!(", mean of {} ranks", self.ranks)
        } else {
            String::new()
        };
        format!(
            "chosen by --gpu-conv auto: the model's convolutions took {:.4} s on burn's kernels and {:.4} s on ctseg's ({} layer shapes, batch {}{over})",
            self.burn_s, self.wgsl_s, self.layers, self.batch
        )
    }
}

/// The path for totals of `burn_s` and `wgsl_s`: ctseg's where they take under [`MARGIN`] of
/// burn's time, else burn's.
pub fn decide(burn_s: f64, wgsl_s: f64) -> GpuConv {
    if wgsl_s < MARGIN * burn_s {
        GpuConv::Wgsl
    } else {
        GpuConv::Burn
    }
}

/// Seconds of the whole model from per-layer times: each `(layer's seconds, how often the model
/// runs it)` weighted by its count.
pub fn model_seconds(layers: impl IntoIterator<Item = (f64, usize)>) -> f64 {
    layers.into_iter().map(|(s, n)| s * n as f64).sum()
}

/// The batch to time `cases` at (each case's shape holding one image): `batch`, or the largest
/// smaller one (at least 1) at which no layer's input or output exceeds [`MAX_TIMED_VALUES`].
pub fn timed_batch(cases: &[(KernelCase, usize)], batch: usize) -> usize {
    let per_image = cases
        .iter()
        .map(|(c, _)| {
            let [_, c_in, h, w] = c.shape;
            c_in.max(c.c_out).saturating_mul(h).saturating_mul(w)
        })
        .max()
        .unwrap_or(1)
        .max(1);
    batch.min(MAX_TIMED_VALUES / per_image).max(1)
}

/// Whether `be` offers the choice: a GPU computing its convolutions in f32 with kernels
/// compiled from WGSL.
pub fn applies(be: &Backend) -> bool {
    be.kind == BackendKind::Gpu
        && !be.caps.f16_operands
        && wgsl::compiler(&be.device) == Compiler::Wgsl
}

/// The model's distinct 3×3 convolution layers at `batch`, each with how often it occurs.
pub fn layers(model: &UNetConfig, in_channels: usize, batch: usize) -> Vec<(KernelCase, usize)> {
    let stages = arch::stages(model, in_channels);
    let mut out: Vec<(KernelCase, usize)> = Vec::new();
    for b in arch::blocks(&stages) {
        let case = KernelCase::new([batch, b.c_in, b.side, b.side], b.c_out);
        match out.iter_mut().find(|(c, _)| *c == case) {
            Some((_, n)) => *n += 1,
            None => out.push((case, 1)),
        }
    }
    out
}

/// Times every layer of `model` on both paths and picks one for the whole model ([`decide`]).
/// Collective on a GPU: the ranks first agree that the choice applies on all of them (a
/// `spirv` build on adapters of two graphics APIs could differ), then average their times, so
/// that every rank runs the same kernels. `None` where the choice does not apply ([`applies`]):
/// the backend keeps the path it has.
pub fn choose(
    be: &Backend,
    model: &UNetConfig,
    in_channels: usize,
    work: ConvWorkload,
    comm: &dyn Communicator,
) -> Result<Option<ConvChoice>> {
    if be.kind != BackendKind::Gpu {
        return Ok(None);
    }
    // 1. Whether every rank can run both paths.
    let mut applying = [f64::from(u8::from(applies(be)))];
    comm.allreduce_sum_f64(&mut applying)?;
    let ranks = comm.size();
    match applying[0] as usize {
        0 => return Ok(None),
        n if n < ranks => {
            return Err(Error::Device(format!(
                "--gpu-conv auto: {n} of {ranks} ranks can run both convolution paths and the others cannot ({}); give --gpu-conv burn",
                be.description
            )));
        }
        _ => {}
    }
    // 2. Each distinct layer on each path, weighted by how often the model runs it.
    let batch = timed_batch(&layers(model, in_channels, 1), work.batch);
    let cases = layers(model, in_channels, batch);
    let mut burn = Vec::with_capacity(cases.len());
    let mut own = Vec::with_capacity(cases.len());
    for (case, count) in &cases {
        let [b, o] = time_conv_paths(be, *case, work.train, REPS)?;
        burn.push((b, *count));
        own.push((o, *count));
    }
    // 3. One decision for all ranks, on their mean times.
    let mut totals = [model_seconds(burn), model_seconds(own)];
    comm.allreduce_sum_f64(&mut totals)?;
    let [burn_s, wgsl_s] = totals.map(|t| t / ranks as f64);
    Ok(Some(ConvChoice {
        chosen: decide(burn_s, wgsl_s),
        burn_s,
        wgsl_s,
        layers: cases.len(),
        ranks,
        batch,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Depth 1, width 4, 16² (arch.rs's own test model).
    fn depth_one_width_four() -> UNetConfig {
        UNetConfig {
            width: 4,
            depth: 1,
            input_size: 16,
            classes: 3,
            upsampling: crate::model::Upsampling::Nearest,
            dropout: 0.0,
            norm: crate::model::Norm::Batch,
            bn_momentum: 0.9,
            bn_epsilon: 1e-3,
        }
    }

    #[test]
    fn ctsegs_kernels_are_chosen_only_when_clearly_faster() {
        // Burn's stay on a tie and within the margin; ctseg's win beyond it.
        assert_eq!(decide(1.0, 1.0), GpuConv::Burn);
        assert_eq!(decide(1.0, 0.95), GpuConv::Burn);
        assert_eq!(decide(1.0, 0.85), GpuConv::Wgsl);
        assert_eq!(decide(1.0, 2.0), GpuConv::Burn);
    }

    #[test]
    fn a_layer_run_twice_counts_twice() {
        // 0.5 s once and 0.25 s four times: 0.5 + 1.0.
        assert_eq!(model_seconds([(0.5, 1), (0.25, 4)]), 1.5);
        // So a path slower on the one large layer but faster on a repeated small one can win.
        let burn = model_seconds([(1.0, 1), (0.3, 4)]);
        let own = model_seconds([(1.2, 1), (0.1, 4)]);
        assert_eq!(decide(burn, own), GpuConv::Wgsl);
    }

    #[test]
    fn a_batch_whose_layers_would_not_fit_is_timed_smaller() {
        // livermask at width 64, 240²: its widest layer is the last decoder level's input,
        // cat(64, 128) = 192 channels at 240², 11,059,200 values an image, so 48 images fit in
        // 2^29 values (48.5).
        let model = UNetConfig {
            width: 64,
            depth: 4,
            input_size: 240,
            ..depth_one_width_four()
        };
        let one = layers(&model, 1, 1);
        assert_eq!(timed_batch(&one, 30), 30);
        assert_eq!(timed_batch(&one, 4096), 48);
        // A layer wider than the bound on its own is still timed, at one image.
        let huge = [(KernelCase::new([1, 1 << 15, 128, 256], 1 << 15), 1)];
        assert_eq!(timed_batch(&huge, 8), 1);
    }

    #[test]
    fn the_cpu_offers_no_choice() {
        let cpu = crate::backend::open(&crate::backend::DeviceRequest {
            kind: BackendKind::Cpu,
            threads: 0,
            adapter: None,
            gpu_conv: GpuConv::Burn,
            cooperative_matrices: true,
        })
        .expect("cpu");
        assert!(!applies(&cpu));
        let model = depth_one_width_four();
        let work = ConvWorkload {
            batch: 1,
            train: true,
        };
        let none = choose(&cpu, &model, 1, work, &crate::comm::Local).expect("nothing to do");
        assert_eq!(none, None);
    }

    #[test]
    fn a_models_layers_are_its_blocks_counted_by_shape() {
        // Depth 1, width 4, 16², one input channel; the blocks as arch::stages lists them:
        // 1→4, 4→4 at 16²; 4→8, 8→8 at 8²; cat(4, 8) = 12→4, 4→4 at 16².
        let model = depth_one_width_four();
        let case = |shape, c_out| KernelCase::new(shape, c_out);
        assert_eq!(
            layers(&model, 1, 2),
            [
                (case([2, 1, 16, 16], 4), 1),
                (case([2, 4, 16, 16], 4), 2),
                (case([2, 4, 8, 8], 8), 1),
                (case([2, 8, 8, 8], 8), 1),
                (case([2, 12, 16, 16], 4), 1),
            ]
        );
    }
}
