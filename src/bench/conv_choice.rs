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
use crate::error::Result;
use crate::model::{GpuConv, UNetConfig, arch};
use crate::wgsl::{self, Compiler};

use super::kernels::{KernelCase, time_conv_paths};

/// Timed repetitions per layer and path (the median is kept, after one untimed).
const REPS: usize = 3;

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
    /// The faster path (burn's on a tie: the longer-tested one).
    pub chosen: GpuConv,
    /// Seconds of all the model's 3×3 convolutions on burn's kernels (sum over layers of each
    /// distinct layer's median; summed over ranks under MPI).
    pub burn_s: f64,
    /// The same on ctseg's WGSL kernels.
    pub wgsl_s: f64,
    /// Distinct layer shapes timed.
    pub layers: usize,
}

impl ConvChoice {
    /// One line for the log and the backend's description.
    pub fn describe(&self) -> String {
        format!(
            "chosen by --gpu-conv auto: the model's convolutions took {:.4} s on burn's kernels and {:.4} s on ctseg's ({} layer shapes)",
            self.burn_s, self.wgsl_s, self.layers
        )
    }
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

/// Times every layer of `model` on both paths and picks the faster for the whole model. Under
/// MPI the ranks' times are summed, so that every rank picks the same path. `None` where the
/// choice does not apply ([`applies`]): the backend keeps the path it has.
pub fn choose(
    be: &Backend,
    model: &UNetConfig,
    in_channels: usize,
    work: ConvWorkload,
    comm: &dyn Communicator,
) -> Result<Option<ConvChoice>> {
    if !applies(be) {
        return Ok(None);
    }
    // 1. Each distinct layer on each path, weighted by how often the model runs it.
    let cases = layers(model, in_channels, work.batch);
    let mut totals = [0.0f64; 2];
    for (case, count) in &cases {
        let [burn, own] = time_conv_paths(be, *case, work.train, REPS)?;
        totals[0] += burn * *count as f64;
        totals[1] += own * *count as f64;
    }
    // 2. One decision for all ranks.
    comm.allreduce_sum_f64(&mut totals)?;
    let [burn_s, wgsl_s] = totals;
    Ok(Some(ConvChoice {
        chosen: if wgsl_s < burn_s {
            GpuConv::Wgsl
        } else {
            GpuConv::Burn
        },
        burn_s,
        wgsl_s,
        layers: cases.len(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

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
    }

    #[test]
    fn a_models_layers_are_its_blocks_counted_by_shape() {
        // Depth 1, width 4, 16², one input channel; the blocks as arch::stages lists them:
        // 1→4, 4→4 at 16²; 4→8, 8→8 at 8²; cat(4, 8) = 12→4, 4→4 at 16².
        let model = UNetConfig {
            width: 4,
            depth: 1,
            input_size: 16,
            classes: 3,
            upsampling: crate::model::Upsampling::Nearest,
            dropout: 0.5,
            norm: crate::model::Norm::Batch,
            bn_momentum: 0.9,
            bn_epsilon: 1e-3,
        };
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
