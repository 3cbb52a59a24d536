//! Adadelta (Zeiler 2012) as a burn [`Optimizer`]: the optimiser livermask trained with
//! (Keras `Adadelta(lr=1.0, rho=0.95, epsilon=1e-7)`). burn 0.22 has none.
//!
//! Per parameter, exactly as `torch.optim.Adadelta` (and Keras 2) compute it:
//! ```text
//! v  ← ρ·v + (1−ρ)·g²
//! Δ  ← sqrt(u + ε) / sqrt(v + ε) · g
//! u  ← ρ·u + (1−ρ)·Δ²
//! θ  ← θ − lr·(Δ + λ·θ)      (λ: optional L2 weight decay, added to g first as PyTorch does)
//! ```

use burn::optim::{LearningRate, Optimizer, RecordState, StateSink, StateSource};
use burn::tensor::{Device, Tensor};

/// Adadelta hyper-parameters.
#[derive(Clone, Debug)]
pub struct Adadelta {
    /// Decay of the running averages (ρ).
    pub rho: f64,
    /// Added inside both square roots (ε).
    pub epsilon: f64,
    /// L2 penalty added to the gradient (λ), 0 for none.
    pub weight_decay: f64,
}

/// Per-parameter state: running averages of squared gradients and squared updates.
#[derive(Clone)]
pub struct AdadeltaState<const D: usize> {
    /// E[g²].
    pub square_avg: Tensor<D>,
    /// E[Δ²].
    pub acc_delta: Tensor<D>,
}

// burn's `#[derive(RecordState)]` only expands inside burn-optim, so the two leaves are
// flattened by hand, under the names the derive would give them.
impl<const D: usize> RecordState for AdadeltaState<D> {
    fn state_flatten(&self, prefix: &str, out: &mut StateSink) {
        out.push_tensor(prefix, "square_avg", self.square_avg.to_data());
        out.push_tensor(prefix, "acc_delta", self.acc_delta.to_data());
    }

    fn state_unflatten(prefix: &str, src: &mut StateSource, device: &Device) -> Option<Self> {
        let square_avg = Tensor::from_data(src.take_tensor(prefix, "square_avg")?, device);
        let acc_delta = Tensor::from_data(src.take_tensor(prefix, "acc_delta")?, device);
        Some(Self {
            square_avg,
            acc_delta,
        })
    }
}

impl Optimizer for Adadelta {
    type State<const D: usize> = AdadeltaState<D>;

    fn step<const D: usize>(
        &self,
        lr: LearningRate,
        tensor: Tensor<D>,
        grad: Tensor<D>,
        state: Option<Self::State<D>>,
    ) -> (Tensor<D>, Option<Self::State<D>>) {
        let grad = if self.weight_decay != 0.0 {
            grad + tensor.clone().mul_scalar(self.weight_decay)
        } else {
            grad
        };
        let (square_avg, acc_delta) = match state {
            Some(s) => (s.square_avg, s.acc_delta),
            None => (grad.zeros_like(), grad.zeros_like()),
        };
        let rho = self.rho;
        let square_avg = square_avg.mul_scalar(rho) + grad.clone().square().mul_scalar(1.0 - rho);
        let std = square_avg.clone().add_scalar(self.epsilon).sqrt();
        let delta = acc_delta.clone().add_scalar(self.epsilon).sqrt() / std * grad;
        let acc_delta = acc_delta.mul_scalar(rho) + delta.clone().square().mul_scalar(1.0 - rho);
        let tensor = tensor - delta.mul_scalar(lr);
        (
            tensor,
            Some(AdadeltaState {
                square_avg,
                acc_delta,
            }),
        )
    }

    fn to_device<const D: usize>(state: Self::State<D>, device: &Device) -> Self::State<D> {
        AdadeltaState {
            square_avg: state.square_avg.to_device(device),
            acc_delta: state.acc_delta.to_device(device),
        }
    }
}
