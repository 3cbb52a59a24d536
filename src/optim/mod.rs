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

/// The `[optimizer]` section: `name` picks the optimiser, and the section holds that
/// optimiser's keys and no others (a key another optimiser reads is an error naming it).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "name", rename_all = "lowercase")]
pub enum OptimizerConfig {
    /// Adadelta (livermask: lr 1.0, ρ 0.95, ε 1e-7).
    Adadelta(AdadeltaConfig),
    /// Adam.
    Adam(AdamConfigKeys),
    /// SGD with (optionally Nesterov) momentum.
    Sgd(SgdConfigKeys),
    /// LARS: momentum SGD with a layer-wise trust ratio (You, Gitman & Ginsburg 2017).
    Lars(LarsConfig),
    /// LAMB: Adam with a layer-wise trust ratio (You et al. 2019).
    Lamb(LambConfig),
}

/// `name = "adadelta"`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdadeltaConfig {
    /// Base learning rate for one rank, before rank scaling (livermask: 1.0).
    pub lr: f64,
    /// Decay of the running averages ρ (livermask: 0.95).
    pub rho: f64,
    /// Added inside both square roots (livermask: 1e-7).
    pub epsilon: f64,
    /// L2 penalty added to the gradients (0 for none).
    pub weight_decay: f64,
}

/// `name = "adam"`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdamConfigKeys {
    /// Base learning rate for one rank, before rank scaling.
    pub lr: f64,
    /// β₁.
    pub beta1: f64,
    /// β₂.
    pub beta2: f64,
    /// ε (PyTorch's default is 1e-8).
    pub epsilon: f64,
    /// L2 penalty added to the gradients (0 for none).
    pub weight_decay: f64,
}

/// `name = "sgd"`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SgdConfigKeys {
    /// Base learning rate for one rank, before rank scaling.
    pub lr: f64,
    /// Momentum (0 for none).
    pub momentum: f64,
    /// Nesterov momentum.
    pub nesterov: bool,
    /// L2 penalty added to the gradients (0 for none).
    pub weight_decay: f64,
}

/// `name = "lars"`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LarsConfig {
    /// Base learning rate for one rank, before rank scaling.
    pub lr: f64,
    /// Momentum (0 for none).
    pub momentum: f64,
    /// L2 penalty added to the gradient before the trust ratio (0 for none).
    pub weight_decay: f64,
    /// Trust coefficient η of the ratio η‖w‖/(‖g‖+ε) (paper and apex: 0.001; optional).
    #[serde(default = "default_trust_coefficient")]
    pub trust_coefficient: f64,
    /// ε in the trust ratio's denominator.
    pub epsilon: f64,
    /// One-dimensional parameters (biases, BatchNorm γ/β) get trust 1 and no decay (optional,
    /// default `true`).
    #[serde(default = "default_exclude_1d")]
    pub exclude_1d: bool,
}

/// `name = "lamb"`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LambConfig {
    /// Base learning rate for one rank, before rank scaling.
    pub lr: f64,
    /// β₁.
    pub beta1: f64,
    /// β₂.
    pub beta2: f64,
    /// ε.
    pub epsilon: f64,
    /// Decay added to the Adam direction before the trust ratio (0 for none).
    pub weight_decay: f64,
    /// One-dimensional parameters (biases, BatchNorm γ/β) get trust 1 and no decay (optional,
    /// default `true`).
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
    /// The optimiser's name as in the config.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Adadelta(_) => "adadelta",
            Self::Adam(_) => "adam",
            Self::Sgd(_) => "sgd",
            Self::Lars(_) => "lars",
            Self::Lamb(_) => "lamb",
        }
    }

    /// The base learning rate.
    pub fn lr(&self) -> f64 {
        match self {
            Self::Adadelta(c) => c.lr,
            Self::Adam(c) => c.lr,
            Self::Sgd(c) => c.lr,
            Self::Lars(c) => c.lr,
            Self::Lamb(c) => c.lr,
        }
    }

    /// Sets the base learning rate (a command-line override).
    pub fn set_lr(&mut self, lr: f64) {
        match self {
            Self::Adadelta(c) => c.lr = lr,
            Self::Adam(c) => c.lr = lr,
            Self::Sgd(c) => c.lr = lr,
            Self::Lars(c) => c.lr = lr,
            Self::Lamb(c) => c.lr = lr,
        }
    }

    /// Checks the values; `source` names the config file.
    pub fn validate(&self, source: &str) -> Result<()> {
        let bad = |field: &str, message: String| Error::ConfigValue {
            source_name: source.to_string(),
            field: format!("optimizer.{field}"),
            message,
        };
        let positive = |field: &str, v: f64| {
            if v > 0.0 && v.is_finite() {
                Ok(())
            } else {
                Err(bad(field, format!("must be positive, got {v}")))
            }
        };
        let unit = |field: &str, v: f64| {
            if (0.0..1.0).contains(&v) {
                Ok(())
            } else {
                Err(bad(field, format!("must be in [0, 1), got {v}")))
            }
        };
        let decay = |v: f64| {
            if v >= 0.0 && v.is_finite() {
                Ok(())
            } else {
                Err(bad("weight_decay", format!("must be >= 0, got {v}")))
            }
        };
        positive("lr", self.lr())?;
        match self {
            Self::Adadelta(c) => {
                unit("rho", c.rho)?;
                positive("epsilon", c.epsilon)?;
                decay(c.weight_decay)
            }
            Self::Adam(c) => {
                unit("beta1", c.beta1)?;
                unit("beta2", c.beta2)?;
                positive("epsilon", c.epsilon)?;
                decay(c.weight_decay)
            }
            Self::Sgd(c) => {
                unit("momentum", c.momentum)?;
                if c.nesterov && c.momentum == 0.0 {
                    return Err(bad("nesterov", "needs optimizer.momentum > 0".into()));
                }
                decay(c.weight_decay)
            }
            Self::Lars(c) => {
                unit("momentum", c.momentum)?;
                positive("trust_coefficient", c.trust_coefficient)?;
                positive("epsilon", c.epsilon)?;
                decay(c.weight_decay)
            }
            Self::Lamb(c) => {
                unit("beta1", c.beta1)?;
                unit("beta2", c.beta2)?;
                positive("epsilon", c.epsilon)?;
                decay(c.weight_decay)
            }
        }
    }

    /// Builds the optimiser for a whole module.
    pub fn init(&self) -> ModuleOptimizer {
        let decay = |w: f64| (w > 0.0).then_some(WeightDecayConfig { penalty: w as f32 });
        match self {
            Self::Adadelta(c) => ModuleOptimizer::from(Adadelta {
                rho: c.rho,
                epsilon: c.epsilon,
                weight_decay: c.weight_decay,
            }),
            Self::Adam(c) => AdamConfig::new()
                .with_beta_1(c.beta1 as f32)
                .with_beta_2(c.beta2 as f32)
                .with_epsilon(c.epsilon as f32)
                .with_weight_decay(decay(c.weight_decay))
                .init(),
            Self::Sgd(c) => SgdConfig::new()
                .with_momentum((c.momentum > 0.0).then_some(MomentumConfig {
                    momentum: c.momentum,
                    dampening: 0.0,
                    nesterov: c.nesterov,
                }))
                .with_weight_decay(decay(c.weight_decay))
                .init(),
            Self::Lars(c) => ModuleOptimizer::from(Lars {
                momentum: c.momentum,
                weight_decay: c.weight_decay,
                trust_coefficient: c.trust_coefficient,
                epsilon: c.epsilon,
                exclude_1d: c.exclude_1d,
            }),
            Self::Lamb(c) => ModuleOptimizer::from(Lamb {
                beta1: c.beta1,
                beta2: c.beta2,
                epsilon: c.epsilon,
                weight_decay: c.weight_decay,
                exclude_1d: c.exclude_1d,
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

    /// The quick config with its `[optimizer]` section replaced by `section`.
    fn with_optimizer(section: &str) -> String {
        let start = QUICK_TOML.find("[optimizer]").unwrap_or(0);
        let end = QUICK_TOML.find("[schedule]").unwrap_or(QUICK_TOML.len());
        format!("{}{section}\n{}", &QUICK_TOML[..start], &QUICK_TOML[end..])
    }

    #[test]
    fn each_optimizer_reads_its_own_keys_only() {
        // Adadelta does not read Adam's β₁: a key of another optimiser is an error naming it.
        let text = with_optimizer(
            "[optimizer]\nname = \"adadelta\"\nlr = 1.0\nrho = 0.95\nepsilon = 1e-7\nweight_decay = 0.0\nbeta1 = 0.9\n",
        );
        let e = RunConfig::from_toml(&text, Path::new("a.toml"))
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("a.toml") && e.contains("beta1"), "{e}");
        // Without it, Adadelta's four keys are the whole section.
        let text = with_optimizer(
            "[optimizer]\nname = \"adadelta\"\nlr = 1.0\nrho = 0.95\nepsilon = 1e-7\nweight_decay = 0.0\n",
        );
        let c = RunConfig::from_toml(&text, Path::new("a.toml")).expect("adadelta");
        assert_eq!(c.optimizer.name(), "adadelta");
        assert!(c.validate("a.toml").is_ok());
    }

    #[test]
    fn lars_keys_with_defaults_parse_validate_and_build() {
        // trust_coefficient and exclude_1d may be left out (0.001 and true).
        let text = with_optimizer(
            "[optimizer]\nname = \"lars\"\nlr = 0.1\nmomentum = 0.9\nweight_decay = 1e-4\nepsilon = 1e-8\n",
        );
        let c = RunConfig::from_toml(&text, Path::new("l.toml")).expect("lars");
        let OptimizerConfig::Lars(l) = &c.optimizer else {
            panic!("not lars: {:?}", c.optimizer)
        };
        assert_eq!((l.trust_coefficient, l.exclude_1d), (0.001, true));
        assert!(c.validate("l.toml").is_ok());
        let again = c
            .to_toml()
            .and_then(|t| RunConfig::from_toml(&t, Path::new("l.toml")));
        assert_eq!(again.ok().as_ref(), Some(&c));
        let _ = c.optimizer.init();
        let text = with_optimizer(
            "[optimizer]\nname = \"lamb\"\nlr = 0.01\nbeta1 = 0.9\nbeta2 = 0.999\nepsilon = 1e-6\nweight_decay = 0.01\nexclude_1d = false\n",
        );
        let c = RunConfig::from_toml(&text, Path::new("l.toml")).expect("lamb");
        assert!(matches!(&c.optimizer, OptimizerConfig::Lamb(l) if !l.exclude_1d));
        let _ = c.optimizer.init();
    }

    #[test]
    fn lars_and_lamb_on_wgpu_match_flex() {
        // The trust ratios are tensor ops (no host read), so they must also run on burn wgpu.
        // Skipped without an adapter unless CI=true or CTSEG_REQUIRE_GPU=1 (as tests/gpu.rs).
        let gpu = match crate::backend::open(&crate::backend::DeviceRequest {
            kind: crate::backend::BackendKind::Gpu,
            threads: 0,
            adapter: None,
            gpu_conv: Default::default(),
            cooperative_matrices: true,
        }) {
            Ok(b) => b,
            Err(e) => {
                let ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
                let required = ci || std::env::var("CTSEG_REQUIRE_GPU").is_ok_and(|v| v == "1");
                assert!(
                    !required,
                    "CI or CTSEG_REQUIRE_GPU=1, but no GPU backend: {e}"
                );
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
        let mut l = LarsConfig {
            lr: 0.1,
            momentum: 0.9,
            weight_decay: 1e-4,
            trust_coefficient: 0.001,
            epsilon: 1e-8,
            exclude_1d: true,
        };
        let c = OptimizerConfig::Lars(l.clone());
        assert!(c.validate("x.toml").is_ok());
        for bad in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            l.trust_coefficient = bad;
            let e = OptimizerConfig::Lars(l.clone())
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
