//! The precision a run trains in: what the config asks (`train.precision`), and how the log
//! and `summary.json` say it. Decided once, when a command opens its backend ([`apply`]); the
//! model's operations read it from [`DeviceCaps::f16_operands`], the step from
//! [`super::TrainState::loss_scale`].

use serde::{Deserialize, Serialize};

use crate::backend::{Backend, BackendKind};
use crate::model::cmma_conv;
use crate::wgsl::{self, Compiler};

#[cfg(doc)]
use crate::model::DeviceCaps;

/// `train.precision` / `--precision`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// Everything in f32.
    #[default]
    F32,
    /// The 3×3 convolutions' operands in f16, accumulated in f32; master weights, BN, loss and
    /// optimiser state in f32; dynamic loss scaling ([`super::scaler`]). Every backend computes
    /// these numerics (the CPU's kernels round operands too: they are the GPU's reference); on
    /// an adapter with cooperative matrices, the products run on them (tensor cores).
    Mixed,
}

impl Precision {
    /// The name in configs and logs.
    pub fn name(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::Mixed => "mixed",
        }
    }
}

/// The precision a backend computes in (`summary.json`'s `precision` and `precision_note`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PrecisionUsed {
    /// f32 or mixed.
    pub precision: Precision,
    /// How, for the log and the summary.
    pub note: String,
}

impl Default for PrecisionUsed {
    fn default() -> Self {
        Self {
            precision: Precision::F32,
            note: "f32 throughout".into(),
        }
    }
}

/// `backend`, computing in `precision` from now on: its capabilities say so to the model's
/// operations, its `precision` and description to the log and summary. Where kernels are
/// compiled to SPIR-V and cubecl finds no f16 cooperative matrices, mixed precision has no
/// kernels to run on: the run computes in f32 and its note says why.
pub fn apply(precision: Precision, mut backend: Backend) -> Backend {
    let spirv = wgsl::compiler(&backend.device) == Compiler::SpirV;
    let shapes = cmma_conv::f16_shapes(&backend.device);
    if precision == Precision::Mixed && spirv && shapes.is_empty() {
        backend.caps.f16_operands = false;
        backend.precision = PrecisionUsed {
            precision: Precision::F32,
            note: "f32 throughout: mixed precision was asked, but where kernels are compiled to SPIR-V it runs only on cooperative matrices, and cubecl found none for f16 x f16 -> f32 on this adapter (docs/gpu-notes.md)".into(),
        };
        backend
            .description
            .push_str(" in f32 (no f16 cooperative matrices for mixed precision)");
        return backend;
    }
    backend.caps.f16_operands = precision == Precision::Mixed;
    backend.precision = match precision {
        Precision::F32 => PrecisionUsed::default(),
        Precision::Mixed => {
            let kernels = match (backend.kind, backend.caps.coop) {
                (BackendKind::Gpu, _) if spirv => {
                    let sizes: Vec<String> = shapes
                        .iter()
                        .map(|[m, n, k]| format!("{m}x{n}x{k}"))
                        .collect();
                    format!(
                        "cubek's implicit-GEMM kernels on cooperative matrices {} (SPIR-V)",
                        sizes.join(", ")
                    )
                }
                (BackendKind::Gpu, Some(tile)) => {
                    format!("ctseg's WGSL kernels on {}", tile.describe())
                }
                (BackendKind::Gpu, None) => "ctseg's WGSL kernels in registers".into(),
                (BackendKind::Cpu, _) => "the CPU's convolution kernels".into(),
            };
            backend.description.push_str(&format!(
                " in mixed precision (3x3 convolutions with f16 operands on {kernels})"
            ));
            let speed = if spirv {
                "the operands are copied to f16, channels last, before each convolution"
            } else if backend.caps.coop.is_some() {
                "the operands are converted to f16 as they are staged (tensors stay f32 in memory)"
            } else {
                "without cooperative matrices this has mixed precision's numerics, not its speed"
            };
            PrecisionUsed {
                precision,
                note: format!(
                    "3x3 convolution operands rounded to f16 and accumulated in f32 by {kernels}, dynamic loss scaling; {speed} (docs/gpu-notes.md)"
                ),
            }
        }
    };
    backend
}
