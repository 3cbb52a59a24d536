//! Training: the `[train]` config section, the state that training changes, the one training
//! step, the loop, validation, preemption and progress. The one place that wires model, data,
//! optimiser and communicator together; the run directory it writes is [`crate::rundir`]'s.

pub mod exchange;
pub mod flat;
pub mod precision;
pub mod progress;
pub mod scaler;
pub mod signals;
pub mod state;
pub mod step;
mod trainer;
pub mod validation;

use serde::{Deserialize, Serialize};

pub use state::{TrainState, Trained, build_model};
pub use step::{Phase, StepOutcome, StepProbe, StepTimes, Stepper, batch_tensors};
pub use trainer::{
    Start, TrainOptions, TrainOutcome, agree_across_ranks, check_provenance, load_dataset,
    provenance_of, train,
};
pub use validation::{ValResult, validate};

use crate::error::{Error, Result};

/// The `[train]` section.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    /// Epochs (passes over this rank's share of the training slices).
    pub epochs: u64,
    /// Images per micro-batch on each rank (per optimiser step when `accumulate` is 1).
    pub batch_size: usize,
    /// Micro-batches per optimiser step on each rank: their gradients are averaged before the
    /// step, the same arithmetic as `accumulate` times more ranks (without BatchNorm), so the
    /// global batch is `batch_size × ranks × accumulate`.
    #[serde(default = "one")]
    pub accumulate: usize,
    /// Stop after this many optimiser steps in total (0: no limit).
    pub max_steps: u64,
    /// Dice smoothing term (livermask: 0; never produces NaN).
    pub loss_smooth: f64,
    /// `dice` (livermask) or `dice_bce` (Dice plus binary cross-entropy). Optional, default
    /// `dice`.
    #[serde(default)]
    pub loss: crate::model::LossKind,
    /// Epochs between validations.
    pub val_every: u64,
    /// Epochs between checkpoints (one is always written at the end).
    pub checkpoint_every: u64,
    /// Seconds between plain progress lines when stderr is not a terminal.
    pub log_every_s: f64,
    /// `f32` or `mixed` (see [`precision::Precision`]). Optional, default `f32`.
    #[serde(default)]
    pub precision: precision::Precision,
}

fn one() -> usize {
    1
}

/// The largest per-rank micro-batch and micro-batch count a config may ask for: far above real
/// use (livermask: 4 × 1), low enough that an absurd value is refused instead of sizing an
/// allocation (`bench step` builds its batches without a training set to bound them).
pub const MAX_BATCH: usize = 4096;
/// See [`MAX_BATCH`].
pub const MAX_ACCUMULATE: usize = 65_536;

impl TrainConfig {
    /// Checks the values.
    pub fn validate(&self, source: &str) -> Result<()> {
        let bad = |field: &str, message: String| Error::ConfigValue {
            source_name: source.to_string(),
            field: format!("train.{field}"),
            message,
        };
        if self.epochs == 0 {
            return Err(bad("epochs", "must be at least 1".into()));
        }
        if !(1..=MAX_BATCH).contains(&self.batch_size) {
            return Err(bad(
                "batch_size",
                format!("must be 1 to {MAX_BATCH}, got {}", self.batch_size),
            ));
        }
        if !(1..=MAX_ACCUMULATE).contains(&self.accumulate) {
            return Err(bad(
                "accumulate",
                format!("must be 1 to {MAX_ACCUMULATE}, got {}", self.accumulate),
            ));
        }
        if !(self.loss_smooth >= 0.0 && self.loss_smooth.is_finite()) {
            return Err(bad(
                "loss_smooth",
                format!("must be >= 0, got {}", self.loss_smooth),
            ));
        }
        if self.val_every == 0 {
            return Err(bad("val_every", "must be at least 1".into()));
        }
        if self.checkpoint_every == 0 {
            return Err(bad("checkpoint_every", "must be at least 1".into()));
        }
        if !(self.log_every_s >= 0.0 && self.log_every_s.is_finite()) {
            return Err(bad(
                "log_every_s",
                format!("must be >= 0, got {}", self.log_every_s),
            ));
        }
        Ok(())
    }
}
