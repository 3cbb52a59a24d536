//! LAMB, layer-wise adaptive moments (You et al. 2019, "Large Batch Optimization for Deep
//! Learning: Training BERT in 76 minutes", Algorithm 2 with bias correction, φ = identity), as a
//! burn [`Optimizer`] for large global batches.
//!
//! Per parameter tensor (norms over the whole tensor: layer-wise), at step t = 1, 2, …:
//! ```text
//! m     ← β₁·m + (1−β₁)·g
//! v     ← β₂·v + (1−β₂)·g²
//! m̂     = m / (1−β₁ᵗ),   v̂ = v / (1−β₂ᵗ)
//! r     = m̂ / (√v̂ + ε) + λ·w                         (λ: weight decay)
//! trust = ‖w‖ / ‖r‖   if ‖w‖ > 0 and ‖r‖ > 0, else 1
//! w     ← w − lr·trust·r
//! ```
//! With [`Lamb::exclude_1d`] (the default), one-dimensional parameters — biases and BatchNorm
//! γ/β — get trust 1 and no decay: a plain Adam step.
//!
//! burn 0.22 has a `burn::optim::Lamb`, but without the 1-D exclusion; with `exclude_1d = false`
//! this one computes the same (a unit test checks it). The step count t is kept in the state as
//! an integer scalar, as burn's Adam and LAMB keep their `time`, so checkpoints restore it. The
//! norms and the "else 1" are tensor ops (`mask_where`) on the parameter's device: a step reads
//! nothing back to the host.

use burn::optim::{LearningRate, Optimizer, RecordState, StateSink, StateSource};
use burn::tensor::{Device, Tensor};

use super::lars::{l2_norm, trust_ratio};

/// LAMB hyper-parameters.
#[derive(Clone, Debug)]
pub struct Lamb {
    /// Decay of the first moment (β₁).
    pub beta1: f64,
    /// Decay of the second moment (β₂).
    pub beta2: f64,
    /// Added to √v̂ (ε).
    pub epsilon: f64,
    /// Decay added to the Adam direction before the trust ratio (λ), 0 for none.
    pub weight_decay: f64,
    /// Leave one-dimensional parameters (biases, BatchNorm γ/β) out of the adaptation and the
    /// weight decay: trust 1 and λ = 0 for them. Default `true`.
    pub exclude_1d: bool,
}

impl Default for Lamb {
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            epsilon: 1e-6,
            weight_decay: 0.0,
            exclude_1d: true,
        }
    }
}

/// Per-parameter state, under the leaf names of burn's `LambState`.
#[derive(Clone)]
pub struct LambState<const D: usize> {
    /// Steps taken (t), 1 after the first.
    pub time: usize,
    /// m.
    pub moment_1: Tensor<D>,
    /// v.
    pub moment_2: Tensor<D>,
}

// As in `adadelta.rs`: burn's `#[derive(RecordState)]` only expands inside burn-optim, so the
// leaves are flattened by hand, as the derive does it (`time` as an integer scalar).
impl<const D: usize> RecordState for LambState<D> {
    fn state_flatten(&self, prefix: &str, out: &mut StateSink) {
        out.push_scalar(prefix, "time", self.time.into());
        out.push_tensor(prefix, "moment_1", self.moment_1.to_data());
        out.push_tensor(prefix, "moment_2", self.moment_2.to_data());
    }

    fn state_unflatten(prefix: &str, src: &mut StateSource, device: &Device) -> Option<Self> {
        let time = usize::try_from(src.take_scalar(prefix, "time")?).ok()?;
        let moment_1 = Tensor::from_data(src.take_tensor(prefix, "moment_1")?, device);
        let moment_2 = Tensor::from_data(src.take_tensor(prefix, "moment_2")?, device);
        Some(Self {
            time,
            moment_1,
            moment_2,
        })
    }
}

impl Optimizer for Lamb {
    type State<const D: usize> = LambState<D>;

    fn step<const D: usize>(
        &self,
        lr: LearningRate,
        tensor: Tensor<D>,
        grad: Tensor<D>,
        state: Option<Self::State<D>>,
    ) -> (Tensor<D>, Option<Self::State<D>>) {
        let (b1, b2) = (self.beta1, self.beta2);
        let g2 = grad.clone().square().mul_scalar(1.0 - b2);
        let g1 = grad.mul_scalar(1.0 - b1);
        let state = match state {
            Some(s) => LambState {
                time: s.time.saturating_add(1),
                moment_1: s.moment_1.mul_scalar(b1) + g1,
                moment_2: s.moment_2.mul_scalar(b2) + g2,
            },
            None => LambState {
                time: 1,
                moment_1: g1,
                moment_2: g2,
            },
        };
        // β^t underflows to 0 long before t leaves i32.
        let t = i32::try_from(state.time).unwrap_or(i32::MAX);
        let m_hat = state.moment_1.clone().div_scalar(1.0 - b1.powi(t));
        let v_hat = state.moment_2.clone().div_scalar(1.0 - b2.powi(t));
        let r = m_hat / v_hat.sqrt().add_scalar(self.epsilon);
        let tensor = if D == 1 && self.exclude_1d {
            tensor - r.mul_scalar(lr)
        } else {
            let r = if self.weight_decay != 0.0 {
                r + tensor.clone().mul_scalar(self.weight_decay)
            } else {
                r
            };
            let trust = trust_ratio(l2_norm(tensor.clone()), l2_norm(r.clone()), 1.0, 0.0);
            tensor - r * trust.mul_scalar(lr).unsqueeze::<D>()
        };
        (tensor, Some(state))
    }

    fn to_device<const D: usize>(state: Self::State<D>, device: &Device) -> Self::State<D> {
        LambState {
            time: state.time,
            moment_1: state.moment_1.to_device(device),
            moment_2: state.moment_2.to_device(device),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::optim::test_support::{assert_close, round_trips_through_bytes, run_three};
    use crate::tensor_util::to_f32;
    use burn::optim::LambConfig;
    use burn::tensor::TensorData;

    // From `python3 tests/reference/lars_lamb.py` (NumPy, float64; inputs in that script and
    // in `test_support`): LAMB with lr 0.05, β₁ 0.9, β₂ 0.999, ε 1e-6, weight decay 0.01, the
    // 3×4 weight and the 3-element bias after 3 steps.
    const LAMB_W: [f64; 12] = [
        0.09457541068010834,
        0.4366986768783672,
        0.4448964127174959,
        0.129566709087096,
        -0.29745230988727156,
        -0.4722539058939518,
        -0.2795591900015222,
        0.0967961550020995,
        0.40643562947387424,
        0.3743141216673529,
        0.03401927558794049,
        -0.33534325137080623,
    ];
    /// The bias with `exclude_1d` (trust 1, no decay: Adam).
    const LAMB_B_EXCLUDED: [f64; 3] = [
        -0.042944174513458305,
        -0.3490606356738114,
        -0.013804750334648353,
    ];
    /// The bias without `exclude_1d` (adapted and decayed like the weight).
    const LAMB_B_ADAPTED: [f64; 3] = [
        0.07811623068312352,
        -0.2228101974023516,
        0.04134383275149173,
    ];

    fn lamb(exclude_1d: bool) -> Lamb {
        Lamb {
            beta1: 0.9,
            beta2: 0.999,
            epsilon: 1e-6,
            weight_decay: 0.01,
            exclude_1d,
        }
    }

    #[test]
    fn lamb_matches_numpy_reference() {
        let (w, b) = run_three(&lamb(true), 0.05);
        assert_close("LAMB weight", &w, &LAMB_W);
        assert_close("LAMB bias (exclude_1d)", &b, &LAMB_B_EXCLUDED);
        let (w, b) = run_three(&lamb(false), 0.05);
        assert_close("LAMB weight (exclude_1d = false)", &w, &LAMB_W);
        assert_close("LAMB bias (exclude_1d = false)", &b, &LAMB_B_ADAPTED);
    }

    #[test]
    fn lamb_without_exclusion_matches_burns_lamb() {
        let burns = LambConfig::new()
            .with_beta_1(0.9)
            .with_beta_2(0.999)
            .with_epsilon(1e-6)
            .with_weight_decay(0.01)
            .build();
        let (w, b) = run_three(&burns, 0.05);
        let to64 = |v: Vec<f32>| v.into_iter().map(f64::from).collect::<Vec<_>>();
        let (ours_w, ours_b) = run_three(&lamb(false), 0.05);
        assert_close("weight vs burn::optim::Lamb", &ours_w, &to64(w));
        assert_close("bias vs burn::optim::Lamb", &ours_b, &to64(b));
    }

    #[test]
    fn lamb_zero_weight_gets_trust_one() {
        // ‖w‖ = 0: trust 1 (not 0/‖r‖ = 0, which would keep the tensor at zero for ever). The
        // first step's r is g/(|g| + ε), so w = −lr·g/(|g| + ε), excluded as 1-D or not.
        let device = Device::flex();
        let g = vec![0.3f32, -0.4, 0.5];
        let want: Vec<f64> = g
            .iter()
            .map(|v| {
                let v = f64::from(*v);
                -0.05 * v / (v.abs() + 1e-6)
            })
            .collect();
        for exclude_1d in [true, false] {
            let (w, state) = lamb(exclude_1d).step(
                0.05,
                Tensor::<1>::zeros([3], &device),
                Tensor::from_data(TensorData::new(g.clone(), [3]), &device),
                None,
            );
            let w = to_f32(w).unwrap_or_default();
            assert_close(&format!("zero bias, exclude_1d {exclude_1d}"), &w, &want);
            assert_eq!(state.map(|s| s.time), Some(1));
        }
        let (w, _) = lamb(false).step(
            0.05,
            Tensor::<2>::zeros([1, 3], &device),
            Tensor::from_data(TensorData::new(g.clone(), [1, 3]), &device),
            None,
        );
        assert_close("zero 2-D weight", &to_f32(w).unwrap_or_default(), &want);
    }

    #[test]
    fn lamb_state_round_trips_through_module_optimizer_bytes() {
        round_trips_through_bytes(|| burn::optim::ModuleOptimizer::from(lamb(true)), 0.05);
    }
}
