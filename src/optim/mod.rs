//! Optimisers (Adadelta, Adam, SGD with momentum) and learning-rate schedules, built from the
//! `[optimizer]` and `[schedule]` sections of a run config.

pub mod adadelta;
pub mod schedule;

use burn::optim::decay::WeightDecayConfig;
use burn::optim::momentum::MomentumConfig;
use burn::optim::{AdamConfig, ModuleOptimizer, SgdConfig};
use serde::{Deserialize, Serialize};

pub use adadelta::Adadelta;
pub use schedule::{LrScaling, ScheduleConfig};

use crate::error::{Error, Result};

/// Which optimiser.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OptimizerKind {
    /// Adadelta (livermask).
    Adadelta,
    /// Adam.
    Adam,
    /// SGD with (optionally Nesterov) momentum.
    Sgd,
}

/// The `[optimizer]` section.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OptimizerConfig {
    /// `adadelta`, `adam` or `sgd`.
    pub name: OptimizerKind,
    /// Base learning rate for one rank, before rank scaling (livermask: 1.0 for Adadelta).
    pub lr: f64,
    /// Adadelta ρ (livermask: 0.95).
    pub rho: f64,
    /// Adadelta ε and Adam ε (livermask: 1e-7; PyTorch's Adam default is 1e-8).
    pub epsilon: f64,
    /// Adam β₁.
    pub beta1: f64,
    /// Adam β₂.
    pub beta2: f64,
    /// SGD momentum (0 for plain SGD).
    pub momentum: f64,
    /// SGD Nesterov momentum.
    pub nesterov: bool,
    /// L2 penalty added to the gradients (0 for none).
    pub weight_decay: f64,
}

impl OptimizerConfig {
    /// Checks the values; `source` names the config file.
    pub fn validate(&self, source: &str) -> Result<()> {
        let bad = |field: &str, message: String| Error::ConfigValue {
            source_name: source.to_string(),
            field: format!("optimizer.{field}"),
            message,
        };
        if !(self.lr > 0.0 && self.lr.is_finite()) {
            return Err(bad("lr", format!("must be positive, got {}", self.lr)));
        }
        if !(0.0..1.0).contains(&self.rho) {
            return Err(bad("rho", format!("must be in [0, 1), got {}", self.rho)));
        }
        if !(self.epsilon > 0.0 && self.epsilon.is_finite()) {
            return Err(bad(
                "epsilon",
                format!("must be positive, got {}", self.epsilon),
            ));
        }
        for (name, v) in [
            ("beta1", self.beta1),
            ("beta2", self.beta2),
            ("momentum", self.momentum),
        ] {
            if !(0.0..1.0).contains(&v) {
                return Err(bad(name, format!("must be in [0, 1), got {v}")));
            }
        }
        if !(self.weight_decay >= 0.0 && self.weight_decay.is_finite()) {
            return Err(bad(
                "weight_decay",
                format!("must be >= 0, got {}", self.weight_decay),
            ));
        }
        if self.nesterov && self.momentum == 0.0 {
            return Err(bad("nesterov", "needs optimizer.momentum > 0".into()));
        }
        Ok(())
    }

    /// Builds the optimiser for a whole module.
    pub fn init(&self) -> ModuleOptimizer {
        let decay = (self.weight_decay > 0.0).then_some(WeightDecayConfig {
            penalty: self.weight_decay as f32,
        });
        match self.name {
            OptimizerKind::Adadelta => ModuleOptimizer::from(Adadelta {
                rho: self.rho,
                epsilon: self.epsilon,
                weight_decay: self.weight_decay,
            }),
            OptimizerKind::Adam => AdamConfig::new()
                .with_beta_1(self.beta1 as f32)
                .with_beta_2(self.beta2 as f32)
                .with_epsilon(self.epsilon as f32)
                .with_weight_decay(decay)
                .init(),
            OptimizerKind::Sgd => SgdConfig::new()
                .with_momentum((self.momentum > 0.0).then_some(MomentumConfig {
                    momentum: self.momentum,
                    dampening: 0.0,
                    nesterov: self.nesterov,
                }))
                .with_weight_decay(decay)
                .init(),
        }
    }
}
