//! Optimisers (Adadelta, Adam, SGD with momentum, and LARS and LAMB for large global batches)
//! and learning-rate schedules, built from the `[optimizer]` and `[schedule]` sections of a run
//! config.

pub mod adadelta;
pub mod lamb;
pub mod lars;
pub mod schedule;

use burn::optim::decay::WeightDecayConfig;
use burn::optim::momentum::MomentumConfig;
use burn::optim::{AdamConfig, ModuleOptimizer, SgdConfig};
use serde::{Deserialize, Serialize};

pub use adadelta::Adadelta;
pub use lamb::Lamb;
pub use lars::Lars;
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
    /// LARS: momentum SGD with a layer-wise trust ratio (You, Gitman & Ginsburg 2017).
    Lars,
    /// LAMB: Adam with a layer-wise trust ratio (You et al. 2019).
    Lamb,
}

/// The `[optimizer]` section.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OptimizerConfig {
    /// `adadelta`, `adam`, `sgd`, `lars` or `lamb`.
    pub name: OptimizerKind,
    /// Base learning rate for one rank, before rank scaling (livermask: 1.0 for Adadelta).
    pub lr: f64,
    /// Adadelta ρ (livermask: 0.95).
    pub rho: f64,
    /// Adadelta, Adam and LAMB ε, and LARS's ε in the trust ratio's denominator (livermask:
    /// 1e-7; PyTorch's Adam default is 1e-8).
    pub epsilon: f64,
    /// Adam and LAMB β₁.
    pub beta1: f64,
    /// Adam and LAMB β₂.
    pub beta2: f64,
    /// SGD and LARS momentum (0 for none).
    pub momentum: f64,
    /// SGD Nesterov momentum (SGD only).
    pub nesterov: bool,
    /// L2 penalty (0 for none): added to the gradients (Adadelta, Adam, SGD, LARS), or to
    /// LAMB's Adam direction before its trust ratio.
    pub weight_decay: f64,
    /// LARS trust coefficient η (paper and apex: 0.001). LARS only; absent from older configs,
    /// which then get the default.
    #[serde(default = "default_trust_coefficient")]
    pub trust_coefficient: f64,
    /// LARS and LAMB: leave one-dimensional parameters (biases, BatchNorm γ/β) out of the
    /// layer-wise adaptation and the weight decay (trust ratio 1, no decay). Default `true`.
    #[serde(default = "default_exclude_1d")]
    pub exclude_1d: bool,
}

fn default_trust_coefficient() -> f64 {
    0.001
}

fn default_exclude_1d() -> bool {
    true
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
        if !(self.trust_coefficient > 0.0 && self.trust_coefficient.is_finite()) {
            return Err(bad(
                "trust_coefficient",
                format!("must be positive, got {}", self.trust_coefficient),
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
            OptimizerKind::Lars => ModuleOptimizer::from(Lars {
                momentum: self.momentum,
                weight_decay: self.weight_decay,
                trust_coefficient: self.trust_coefficient,
                epsilon: self.epsilon,
                exclude_1d: self.exclude_1d,
            }),
            OptimizerKind::Lamb => ModuleOptimizer::from(Lamb {
                beta1: self.beta1,
                beta2: self.beta2,
                epsilon: self.epsilon,
                weight_decay: self.weight_decay,
                exclude_1d: self.exclude_1d,
            }),
        }
    }
}

/// Shared by the LARS and LAMB tests: the inputs of `tests/reference/lars_lamb.py` and a
/// checkpoint round trip.
#[cfg(test)]
pub(crate) mod test_support {
    use burn::module::{Module, Param};
    use burn::optim::{GradientsParams, Optimizer};
    use burn::tensor::{Bytes, Device, Tensor, TensorData};

    use super::ModuleOptimizer;
    use crate::tensor_util::to_f32;

    /// `|got − want| ≤ 1e-6·|want| + 1e-7` element-wise (f32 against the float64 reference).
    pub fn assert_close(what: &str, got: &[f32], want: &[f64]) {
        assert_eq!(got.len(), want.len(), "{what}: length");
        for (k, (g, w)) in got.iter().zip(want).enumerate() {
            let err = (f64::from(*g) - w).abs();
            assert!(
                err <= 1e-6 * w.abs() + 1e-7,
                "{what}[{k}]: ctseg {g} vs reference {w} (|diff| {err:e})"
            );
        }
    }

    // The script's inputs, rounded to f32 there as here.
    fn w0() -> Vec<f32> {
        (0..12)
            .map(|j| (0.5 * (0.9 * f64::from(j) + 0.3).sin()) as f32)
            .collect()
    }
    fn b0() -> Vec<f32> {
        vec![0.1, -0.2, 0.05]
    }
    fn gw(t: u32) -> Vec<f32> {
        (0..12)
            .map(|j| {
                (0.3 * (0.7 * f64::from(j) + 1.1 * f64::from(t)).cos() + 0.05 * f64::from(t)) as f32
            })
            .collect()
    }
    fn gb(t: u32) -> Vec<f32> {
        (0..3)
            .map(|j| (0.2 * (1.3 * f64::from(j) + 0.4 * f64::from(t) + 0.2).sin()) as f32)
            .collect()
    }

    /// The script's three steps on its 3×4 weight and 3-element bias: the final (weight, bias).
    pub fn run_three<O: Optimizer>(opt: &O, lr: f64) -> (Vec<f32>, Vec<f32>) {
        run_three_on(opt, lr, &Device::flex())
    }

    /// [`run_three`] on `device`.
    pub fn run_three_on<O: Optimizer>(opt: &O, lr: f64, device: &Device) -> (Vec<f32>, Vec<f32>) {
        let device = device.clone();
        let mut w = Tensor::<2>::from_data(TensorData::new(w0(), [3, 4]), &device);
        let mut b = Tensor::<1>::from_data(TensorData::new(b0(), [3]), &device);
        let (mut sw, mut sb) = (None, None);
        for t in 0..3 {
            let g = Tensor::<2>::from_data(TensorData::new(gw(t), [3, 4]), &device);
            (w, sw) = opt.step(lr, w, g, sw);
            let g = Tensor::<1>::from_data(TensorData::new(gb(t), [3]), &device);
            (b, sb) = opt.step(lr, b, g, sb);
        }
        (to_f32(w).unwrap_or_default(), to_f32(b).unwrap_or_default())
    }

    #[derive(Module, Debug)]
    struct Layer {
        w: Param<Tensor<2>>,
        b: Param<Tensor<1>>,
    }

    impl Layer {
        /// Gradients of Σ(w − 1)² + Σ(b + 0.5)²·3, which depend on the current values.
        fn grads(&self) -> GradientsParams {
            let loss = (self.w.val().sub_scalar(1.0).square().sum()
                + self.b.val().add_scalar(0.5).square().sum().mul_scalar(3.0))
            .sum();
            GradientsParams::from_grads(loss.backward(), self)
        }

        fn values(&self) -> Vec<f32> {
            let mut v = to_f32(self.w.val()).unwrap_or_default();
            v.extend(to_f32(self.b.val()).unwrap_or_default());
            v
        }
    }

    /// Three steps, then the state through `into_bytes` / `from_bytes` as the trainer's
    /// checkpoints do: the restored optimiser's next step equals the original's, and differs
    /// from a fresh optimiser's (so the state, step count included, matters and was restored).
    pub fn round_trips_through_bytes(make: impl Fn() -> ModuleOptimizer, lr: f64) {
        let device = Device::flex().autodiff();
        let mut layer = Layer {
            w: Param::from_tensor(Tensor::from_data(TensorData::new(w0(), [3, 4]), &device)),
            b: Param::from_tensor(Tensor::from_data(TensorData::new(b0(), [3]), &device)),
        };
        let mut original = make();
        for _ in 0..3 {
            let g = layer.grads();
            layer = original.step(lr, layer, g);
        }
        let bytes = original.into_bytes().map(|b| b.to_vec());
        assert!(bytes.is_ok(), "serialising: {:?}", bytes.err());
        let restored = make().from_bytes(Bytes::from_bytes_vec(bytes.unwrap_or_default()));
        assert!(restored.is_ok(), "loading: {:?}", restored.err());
        let Ok(mut restored) = restored else { return };

        let expected = original.step(lr, layer.clone(), layer.grads()).values();
        let actual = restored.step(lr, layer.clone(), layer.grads()).values();
        let fresh = make().step(lr, layer.clone(), layer.grads()).values();
        assert_eq!(expected.len(), 15);
        for (k, (e, a)) in expected.iter().zip(&actual).enumerate() {
            assert!((e - a).abs() <= 1e-7, "[{k}]: original {e} vs restored {a}");
        }
        let moved = expected
            .iter()
            .zip(&fresh)
            .any(|(e, f)| (e - f).abs() > 1e-4);
        assert!(
            moved,
            "a fresh optimiser steps the same: no state to restore?"
        );
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::config::{QUICK_TOML, RunConfig};
    use crate::optim::test_support::{assert_close, run_three_on};
    use burn::tensor::Device;

    fn without_new_keys(text: &str) -> String {
        text.lines()
            .filter(|l| !l.starts_with("trust_coefficient") && !l.starts_with("exclude_1d"))
            .collect::<Vec<_>>()
            .join("\n")
    }

    #[test]
    fn configs_without_lars_keys_load_with_defaults() {
        // Config files and checkpoints (which store the resolved TOML) from before LARS/LAMB.
        let old = without_new_keys(QUICK_TOML);
        assert!(
            !old.lines()
                .any(|l| l.starts_with("trust_coefficient") || l.starts_with("exclude_1d"))
        );
        let c = RunConfig::from_toml(&old, Path::new("old.toml"));
        assert!(c.is_ok(), "{:?}", c.err());
        if let Ok(c) = c {
            assert_eq!(c.optimizer.trust_coefficient, 0.001);
            assert!(c.optimizer.exclude_1d);
            assert!(c.validate("old.toml").is_ok());
        }
    }

    #[test]
    fn lars_and_lamb_parse_validate_and_build() {
        for (name, kind) in [("lars", OptimizerKind::Lars), ("lamb", OptimizerKind::Lamb)] {
            let text = QUICK_TOML
                .replace("name = \"adam\"", &format!("name = \"{name}\""))
                .replace("exclude_1d = true", "exclude_1d = false")
                .replace("trust_coefficient = 0.001", "trust_coefficient = 0.02");
            let c = RunConfig::from_toml(&text, Path::new("l.toml"));
            assert!(c.is_ok(), "{name}: {:?}", c.err());
            let Ok(c) = c else { continue };
            assert_eq!(c.optimizer.name, kind);
            assert!(!c.optimizer.exclude_1d);
            assert_eq!(c.optimizer.trust_coefficient, 0.02);
            assert!(c.validate("l.toml").is_ok());
            let again = c
                .to_toml()
                .and_then(|t| RunConfig::from_toml(&t, Path::new("l.toml")));
            assert_eq!(again.ok().as_ref(), Some(&c));
            let _ = c.optimizer.init();
        }
    }

    #[test]
    fn lars_and_lamb_on_wgpu_match_flex() {
        // The trust ratios are tensor ops (no host read), so they must also run on burn wgpu.
        // Skipped without an adapter unless CTSEG_REQUIRE_GPU=1 (as tests/gpu.rs).
        let gpu = match crate::backend::open(&crate::backend::DeviceRequest {
            kind: crate::backend::BackendKind::Gpu,
            threads: 0,
            adapter: None,
        }) {
            Ok(b) => b,
            Err(e) => {
                let required = std::env::var("CTSEG_REQUIRE_GPU").is_ok_and(|v| v == "1");
                assert!(!required, "CTSEG_REQUIRE_GPU=1 but no GPU backend: {e}");
                eprintln!("skipped: no GPU adapter ({e})");
                return;
            }
        };
        let lars = Lars {
            weight_decay: 0.05,
            trust_coefficient: 0.1,
            exclude_1d: false,
            ..Lars::default()
        };
        let lamb = Lamb {
            weight_decay: 0.01,
            exclude_1d: false,
            ..Lamb::default()
        };
        let flex = Device::flex();
        let both = [
            (
                "lars",
                run_three_on(&lars, 0.5, &flex),
                run_three_on(&lars, 0.5, &gpu.device),
            ),
            (
                "lamb",
                run_three_on(&lamb, 0.05, &flex),
                run_three_on(&lamb, 0.05, &gpu.device),
            ),
        ];
        for (name, (cw, cb), (gw, gb)) in both {
            let cpu: Vec<f64> = cw.iter().chain(&cb).map(|v| f64::from(*v)).collect();
            let on_gpu: Vec<f32> = gw.into_iter().chain(gb).collect();
            assert_close(
                &format!("{name} on {} vs flex", gpu.description),
                &on_gpu,
                &cpu,
            );
        }
    }

    #[test]
    fn bad_trust_coefficient_names_the_field() {
        let mut c = OptimizerConfig {
            name: OptimizerKind::Lars,
            lr: 0.1,
            rho: 0.95,
            epsilon: 1e-8,
            beta1: 0.9,
            beta2: 0.999,
            momentum: 0.9,
            nesterov: false,
            weight_decay: 1e-4,
            trust_coefficient: 0.001,
            exclude_1d: true,
        };
        assert!(c.validate("x.toml").is_ok());
        for bad in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            c.trust_coefficient = bad;
            let e = c
                .validate("x.toml")
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(
                e.contains("optimizer.trust_coefficient") && e.contains("x.toml"),
                "{bad}: {e}"
            );
        }
    }
}
