//! Training: the `[train]` config section, the loop, validation, checkpoints, metrics and
//! progress. The one place that wires model, data, optimiser and communicator together.

pub mod checkpoint;
pub mod exchange;
pub mod flat;
pub mod metrics;
pub mod progress;
mod trainer;

use serde::{Deserialize, Serialize};

pub use trainer::{
    TrainOptions, TrainSummary, ValResult, batch_tensors, build_model, forward_loss, load_trained,
    train, validate, validate_checkpoint,
};

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
    /// Epochs between validations.
    pub val_every: u64,
    /// Epochs between checkpoints (one is always written at the end).
    pub checkpoint_every: u64,
    /// Seconds between plain progress lines when stderr is not a terminal.
    pub log_every_s: f64,
}

fn one() -> usize {
    1
}

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
        if self.batch_size == 0 {
            return Err(bad("batch_size", "must be at least 1".into()));
        }
        if self.accumulate == 0 {
            return Err(bad("accumulate", "must be at least 1".into()));
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
