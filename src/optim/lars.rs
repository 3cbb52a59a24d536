//! LARS, layer-wise adaptive rate scaling (You, Gitman & Ginsburg 2017, "Large Batch Training
//! of Convolutional Networks"), as a burn [`Optimizer`] for large global batches. burn 0.22 has
//! none.
//!
//! Per parameter tensor (the norms are of the whole tensor: layer-wise), in the form of the
//! common implementations (SimCLR/BYOL's `LARSOptimizer`, with ε in the denominator as in
//! NVIDIA apex's LARC and torchlars):
//! ```text
//! g        ← g + λ·w                                   (λ: weight decay)
//! trust    ← η·‖w‖ / (‖g‖ + ε)   if ‖w‖ > 0 and ‖g‖ > 0, else 1
//! local_lr ← lr·trust
//! v        ← m·v + local_lr·g                          (m: momentum; v starts at 0)
//! w        ← w − v
//! ```
//! `‖g‖` is the norm of the decayed gradient. (apex and torchlars divide by `‖g_raw‖ + λ‖w‖ + ε`
//! instead, the paper's bound on it; the two agree when λ = 0.) Because `lr` enters the momentum
//! buffer, a schedule's change of `lr` acts on new gradients only.
//!
//! With [`Lars::exclude_1d`] (the default), one-dimensional parameters — biases and BatchNorm
//! γ/β — get neither the adaptation nor the decay (trust 1, λ = 0): plain momentum SGD
//! `v ← m·v + lr·g`, as the paper's practice and the implementations above.
//!
//! Everything runs as tensor ops on the parameter's device: the norms are one-element tensors
//! (`square().sum().sqrt()`), and the "else 1" is a `mask_where`, so a step reads nothing back
//! to the host (on wgpu it stays asynchronous).

use burn::optim::{LearningRate, Optimizer, RecordState, StateSink, StateSource};
use burn::tensor::{Device, FloatDType, Tensor};

/// LARS hyper-parameters.
#[derive(Clone, Debug)]
pub struct Lars {
    /// Momentum of the velocity buffer (m), 0 for none.
    pub momentum: f64,
    /// L2 penalty added to the gradient before the trust ratio (λ), 0 for none.
    pub weight_decay: f64,
    /// Trust coefficient η (the paper's and apex's default: 0.001).
    pub trust_coefficient: f64,
    /// Added to the gradient norm in the trust ratio's denominator (ε).
    pub epsilon: f64,
    /// Leave one-dimensional parameters (biases, BatchNorm γ/β) out of the adaptation and the
    /// weight decay: trust 1 and λ = 0 for them. Default `true`.
    pub exclude_1d: bool,
}

impl Default for Lars {
    fn default() -> Self {
        Self {
            momentum: 0.9,
            weight_decay: 0.0,
            trust_coefficient: 0.001,
            epsilon: 1e-8,
            exclude_1d: true,
        }
    }
}

/// Per-parameter state: the velocity buffer.
#[derive(Clone)]
pub struct LarsState<const D: usize> {
    /// v.
    pub momentum: Tensor<D>,
}

// As in `adadelta.rs`: burn's `#[derive(RecordState)]` only expands inside burn-optim, so the
// leaf is flattened by hand, under the name the derive would give it.
impl<const D: usize> RecordState for LarsState<D> {
    fn state_flatten(&self, prefix: &str, out: &mut StateSink) {
        out.push_tensor(prefix, "momentum", self.momentum.to_data());
    }

    fn state_unflatten(prefix: &str, src: &mut StateSource, device: &Device) -> Option<Self> {
        let momentum = Tensor::from_data(src.take_tensor(prefix, "momentum")?, device);
        Some(Self { momentum })
    }
}

/// ‖t‖₂ over the whole tensor, as a one-element tensor on its device.
pub(crate) fn l2_norm<const D: usize>(t: Tensor<D>) -> Tensor<1> {
    t.square().sum().sqrt()
}

/// `scale·w_norm / (u_norm + eps)` where both norms are > 0, else 1, computed on the device
/// without a host read (one-element tensors in and out). A NaN norm also gives 1.
pub(crate) fn trust_ratio(w_norm: Tensor<1>, u_norm: Tensor<1>, scale: f64, eps: f64) -> Tensor<1> {
    let valid = w_norm
        .clone()
        .greater_scalar(0.0)
        .bool_and(u_norm.clone().greater_scalar(0.0));
    // Keeps the masked-out branch free of 0/0 even when eps is 0.
    let tiny = w_norm
        .dtype()
        .finfo()
        .unwrap_or(FloatDType::F32.finfo())
        .min_positive;
    let ratio = w_norm.mul_scalar(scale) / u_norm.add_scalar(eps).clamp_min(tiny);
    ratio.ones_like().mask_where(valid, ratio)
}

impl Optimizer for Lars {
    type State<const D: usize> = LarsState<D>;

    fn step<const D: usize>(
        &self,
        lr: LearningRate,
        tensor: Tensor<D>,
        grad: Tensor<D>,
        state: Option<Self::State<D>>,
    ) -> (Tensor<D>, Option<Self::State<D>>) {
        let velocity = state.map(|s| s.momentum.mul_scalar(self.momentum));
        let step = if D == 1 && self.exclude_1d {
            grad.mul_scalar(lr)
        } else {
            let grad = if self.weight_decay != 0.0 {
                grad + tensor.clone().mul_scalar(self.weight_decay)
            } else {
                grad
            };
            let trust = trust_ratio(
                l2_norm(tensor.clone()),
                l2_norm(grad.clone()),
                self.trust_coefficient,
                self.epsilon,
            );
            grad * trust.mul_scalar(lr).unsqueeze::<D>()
        };
        let velocity = match velocity {
            Some(v) => v + step,
            None => step,
        };
        let tensor = tensor - velocity.clone();
        (tensor, Some(LarsState { momentum: velocity }))
    }

    fn to_device<const D: usize>(state: Self::State<D>, device: &Device) -> Self::State<D> {
        LarsState {
            momentum: state.momentum.to_device(device),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::optim::test_support::{assert_close, round_trips_through_bytes, run_three};
    use crate::tensor_util::to_f32;
    use burn::tensor::TensorData;

    // From `python3 tests/reference/lars_lamb.py` (NumPy, float64; inputs in that script and
    // in `test_support`): LARS with lr 0.5, momentum 0.9, weight decay 0.05, η 0.1, ε 1e-8,
    // the 3×4 weight and the 3-element bias after 3 steps.
    const LARS_W: [f64; 12] = [
        0.061164472572636804,
        0.42617110100084116,
        0.4530743380129857,
        0.13886852129113908,
        -0.26746041818254696,
        -0.45863073535853704,
        -0.30150602890904155,
        0.06757589306603266,
        0.35417800372497904,
        0.33570069098620564,
        0.032523870570839844,
        -0.3104246671776548,
    ];
    /// The bias with `exclude_1d` (trust 1, no decay: momentum SGD).
    const LARS_B_EXCLUDED: [f64; 3] = [
        -0.14526855047792198,
        -0.7246886842697858,
        0.014561341702938078,
    ];
    /// The bias without `exclude_1d` (adapted and decayed like the weight).
    const LARS_B_ADAPTED: [f64; 3] = [
        0.07181810521339682,
        -0.25446174137711464,
        0.045099131208068306,
    ];

    fn lars(exclude_1d: bool) -> Lars {
        Lars {
            momentum: 0.9,
            weight_decay: 0.05,
            trust_coefficient: 0.1,
            epsilon: 1e-8,
            exclude_1d,
        }
    }

    #[test]
    fn lars_matches_numpy_reference() {
        let (w, b) = run_three(&lars(true), 0.5);
        assert_close("LARS weight", &w, &LARS_W);
        assert_close("LARS bias (exclude_1d)", &b, &LARS_B_EXCLUDED);
        let (w, b) = run_three(&lars(false), 0.5);
        assert_close("LARS weight (exclude_1d = false)", &w, &LARS_W);
        assert_close("LARS bias (exclude_1d = false)", &b, &LARS_B_ADAPTED);
    }

    #[test]
    fn lars_zero_weight_gets_trust_one() {
        // A fresh zero-initialised tensor: ‖w‖ = 0, so trust 1 (not η·0 = 0, which would keep
        // it at zero for ever): w = −lr·g after one step, for a bias whether or not 1-D tensors
        // are excluded, and for a 2-D weight.
        let device = Device::flex();
        let g = vec![0.3f32, -0.4, 0.5];
        let want: Vec<f64> = g.iter().map(|v| -0.1 * f64::from(*v)).collect();
        for exclude_1d in [true, false] {
            let (w, state) = lars(exclude_1d).step(
                0.1,
                Tensor::<1>::zeros([3], &device),
                Tensor::from_data(TensorData::new(g.clone(), [3]), &device),
                None,
            );
            let w = to_f32(w).unwrap_or_default();
            assert_close(&format!("zero bias, exclude_1d {exclude_1d}"), &w, &want);
            assert!(state.is_some());
        }
        let (w, _) = lars(false).step(
            0.1,
            Tensor::<2>::zeros([1, 3], &device),
            Tensor::from_data(TensorData::new(g.clone(), [1, 3]), &device),
            None,
        );
        assert_close("zero 2-D weight", &to_f32(w).unwrap_or_default(), &want);
    }

    #[test]
    fn lars_state_round_trips_through_module_optimizer_bytes() {
        round_trips_through_bytes(|| burn::optim::ModuleOptimizer::from(lars(true)), 0.5);
    }
}
