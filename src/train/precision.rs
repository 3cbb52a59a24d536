//! The precision a run trains in: what the config asks (`train.precision`), what the backend
//! gives, and how the log and `summary.json` say it. Decided once per run here; the model's
//! operations read the outcome from [`DeviceCaps::f16_operands`], the step from
//! [`super::TrainState::loss_scale`].

use serde::{Deserialize, Serialize};

use crate::backend::{Backend, BackendKind};
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
    /// these numerics (the CPU's kernels round operands too: they are the GPU's reference), none
    /// yet with f16 storage or tensor cores.
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

/// What a run asked for and what it got (`summary.json`'s `precision`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PrecisionUsed {
    /// `train.precision`.
    pub requested: Precision,
    /// What the step computes in.
    pub used: Precision,
    /// How, or why not (for the log and the summary).
    pub note: String,
}

/// The precision `requested` gets on `backend`, and the device capabilities the model is built
/// with for it.
pub fn resolve(requested: Precision, backend: &Backend) -> (DeviceCaps, PrecisionUsed) {
    let mut caps = backend.caps;
    let (used, note) = match (requested, backend.kind) {
        (Precision::F32, _) => (Precision::F32, "f32 throughout".to_string()),
        (Precision::Mixed, kind) => {
            caps.f16_operands = true;
            let kernels = match kind {
                BackendKind::Gpu => "ctseg's WGSL kernels",
                BackendKind::Cpu => "the CPU's convolution kernels",
            };
            (
                Precision::Mixed,
                format!(
                    "3x3 convolution operands rounded to f16 and accumulated in f32 by {kernels}, dynamic loss scaling; buffers stay f32 and no tensor-core kernel exists yet, so this has mixed precision's numerics, not its speed (docs/gpu-notes.md)"
                ),
            )
        }
    };
    (
        caps,
        PrecisionUsed {
            requested,
            used,
            note,
        },
    )
}
