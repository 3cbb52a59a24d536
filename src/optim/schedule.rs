//! Learning-rate schedules: rank scaling (linear | sqrt | none), Horovod-style linear warmup
//! per step over W epochs, then constant or polynomial decay.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// How the base learning rate grows with the number of data-parallel ranks N.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LrScaling {
    /// lr × N (Goyal et al.; livermask/Horovod).
    Linear,
    /// lr × √N.
    Sqrt,
    /// lr unchanged.
    None,
}

impl LrScaling {
    /// The factor for `world` ranks.
    pub fn factor(self, world: usize) -> f64 {
        match self {
            LrScaling::Linear => world as f64,
            LrScaling::Sqrt => (world as f64).sqrt(),
            LrScaling::None => 1.0,
        }
    }
}

/// What follows the warmup.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Decay {
    /// Constant at the scaled rate.
    None,
    /// `lr · (1 − t/T)^power`, down to `min_lr`, over the steps after the warmup.
    Poly,
}

/// The `[schedule]` section.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScheduleConfig {
    /// Scaling of `optimizer.lr` with the rank count.
    pub lr_scaling: LrScaling,
    /// Warmup length in epochs (fractional allowed); 0 for none.
    pub warmup_epochs: f64,
    /// Learning rate at step 0 of the warmup (Horovod: the unscaled base rate).
    pub warmup_start_lr: f64,
    /// `none` or `poly`.
    pub decay: Decay,
    /// Exponent of the polynomial decay.
    pub poly_power: f64,
    /// Floor of the decayed rate.
    pub min_lr: f64,
}

impl ScheduleConfig {
    /// Checks the values.
    pub fn validate(&self, source: &str) -> Result<()> {
        let bad = |field: &str, message: String| Error::ConfigValue {
            source_name: source.to_string(),
            field: format!("schedule.{field}"),
            message,
        };
        if !(self.warmup_epochs >= 0.0 && self.warmup_epochs.is_finite()) {
            return Err(bad(
                "warmup_epochs",
                format!("must be >= 0, got {}", self.warmup_epochs),
            ));
        }
        if !(self.warmup_start_lr >= 0.0 && self.warmup_start_lr.is_finite()) {
            return Err(bad(
                "warmup_start_lr",
                format!("must be >= 0, got {}", self.warmup_start_lr),
            ));
        }
        if !(self.poly_power > 0.0 && self.poly_power.is_finite()) {
            return Err(bad(
                "poly_power",
                format!("must be positive, got {}", self.poly_power),
            ));
        }
        if !(self.min_lr >= 0.0 && self.min_lr.is_finite()) {
            return Err(bad("min_lr", format!("must be >= 0, got {}", self.min_lr)));
        }
        Ok(())
    }
}

/// A resolved schedule: the learning rate of every optimiser step of a run.
#[derive(Clone, Debug)]
pub struct Schedule {
    target: f64,
    start: f64,
    warmup_steps: f64,
    decay: Decay,
    power: f64,
    min_lr: f64,
    total_steps: u64,
}

impl Schedule {
    /// `base_lr` per rank, `world` ranks, `steps_per_epoch` optimiser steps per epoch and
    /// `total_steps` in the run.
    pub fn new(
        cfg: &ScheduleConfig,
        base_lr: f64,
        world: usize,
        steps_per_epoch: u64,
        total_steps: u64,
    ) -> Self {
        Self {
            target: base_lr * cfg.lr_scaling.factor(world),
            start: cfg.warmup_start_lr,
            warmup_steps: cfg.warmup_epochs * steps_per_epoch as f64,
            decay: cfg.decay,
            power: cfg.poly_power,
            min_lr: cfg.min_lr,
            total_steps,
        }
    }

    /// The scaled rate reached after the warmup.
    pub fn target(&self) -> f64 {
        self.target
    }

    /// Learning rate of optimiser step `step` (0-based).
    pub fn lr(&self, step: u64) -> f64 {
        let s = step as f64;
        if s < self.warmup_steps {
            // Horovod's LearningRateWarmupCallback: linear in the fractional epoch, per step.
            return self.start + (self.target - self.start) * (s / self.warmup_steps);
        }
        match self.decay {
            Decay::None => self.target,
            Decay::Poly => {
                let span = (self.total_steps as f64 - self.warmup_steps).max(1.0);
                let t = ((s - self.warmup_steps) / span).clamp(0.0, 1.0);
                (self.target * (1.0 - t).powf(self.power)).max(self.min_lr)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(warmup: f64, decay: Decay) -> ScheduleConfig {
        ScheduleConfig {
            lr_scaling: LrScaling::Linear,
            warmup_epochs: warmup,
            warmup_start_lr: 1.0,
            decay,
            poly_power: 2.0,
            min_lr: 0.0,
        }
    }

    #[test]
    fn horovod_warmup_ramps_per_step_to_scaled_rate() {
        // livermask on 4 workers: lr 1.0 × 4, 5-epoch warmup from 1.0, 10 steps per epoch.
        let s = Schedule::new(&cfg(5.0, Decay::None), 1.0, 4, 10, 1000);
        assert_eq!(s.lr(0), 1.0);
        assert!((s.lr(25) - 2.5).abs() < 1e-12); // half-way: 1 + 3 × 0.5
        assert_eq!(s.lr(50), 4.0);
        assert_eq!(s.lr(999), 4.0);
    }

    #[test]
    fn poly_decay_closed_form() {
        // No warmup, power 2, 100 steps: lr(t) = 0.1 · (1 − t/100)².
        let s = Schedule::new(&cfg(0.0, Decay::Poly), 0.1, 1, 10, 100);
        assert!((s.lr(0) - 0.1).abs() < 1e-15);
        assert!((s.lr(50) - 0.025).abs() < 1e-15);
        assert_eq!(s.lr(100), 0.0);
    }

    #[test]
    fn scaling_factors() {
        assert_eq!(LrScaling::Linear.factor(8), 8.0);
        assert_eq!(LrScaling::Sqrt.factor(16), 4.0);
        assert_eq!(LrScaling::None.factor(32), 1.0);
    }
}
