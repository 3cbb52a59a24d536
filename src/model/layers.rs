//! The U-Net's building layers: 3×3/1×1 convolutions, batch normalisation, spatial dropout
//! with host-drawn masks, and the BN → dropout → conv → ReLU block. Their arithmetic is
//! [`super::ops`]'s, which picks the implementation for the device.
//!
//! Weights are drawn on the host from [`crate::rng::Rng`] so the same seed gives the same model
//! on every backend (the CPU/GPU parity tests rely on it).

use burn::module::{Module, Param, RunningState};
use burn::tensor::{Device, Tensor, TensorData};

use super::ops::{self, DeviceCaps};
use crate::rng::{Rng, keys};

/// Hands out independent initialisation streams, one per parameter tensor, in construction order.
pub struct ParamInit {
    seed: u64,
    next: u64,
}

impl ParamInit {
    /// A fresh initialiser for a model built from `seed`.
    pub fn new(seed: u64) -> Self {
        Self { seed, next: 0 }
    }

    fn stream(&mut self) -> Rng {
        self.next += 1;
        Rng::stream(self.seed, &[keys::INIT, self.next])
    }

    /// Keras `glorot_uniform`: U(−l, l) with l = sqrt(6 / (fan_in + fan_out)), where the fans
    /// count the receptive field (`k·k·c_in`, `k·k·c_out`).
    pub fn glorot_uniform(&mut self, shape: [usize; 4], fan_in: usize, fan_out: usize) -> Vec<f32> {
        let limit = (6.0 / (fan_in + fan_out) as f64).sqrt();
        let mut rng = self.stream();
        let n: usize = shape.iter().product();
        (0..n).map(|_| rng.range(-limit, limit) as f32).collect()
    }
}

fn param4(values: Vec<f32>, shape: [usize; 4], device: &Device) -> Param<Tensor<4>> {
    Param::from_tensor(Tensor::from_data(TensorData::new(values, shape), device))
}

fn param1(value: f32, n: usize, device: &Device) -> Param<Tensor<1>> {
    Param::from_tensor(Tensor::from_data(
        TensorData::new(vec![value; n], [n]),
        device,
    ))
}

/// A 2-D convolution with bias, 'same' padding and stride 1 (kernel 3 or 1).
#[derive(Module, Debug)]
pub struct Conv {
    /// Kernel, `[c_out, c_in, k, k]` (PyTorch layout).
    pub weight: Param<Tensor<4>>,
    /// Bias, `[c_out]`.
    pub bias: Param<Tensor<1>>,
    /// Kernel size.
    pub kernel: usize,
}

impl Conv {
    /// Glorot-uniform kernel, zero bias (Keras `Conv2D` defaults).
    pub fn new(
        c_in: usize,
        c_out: usize,
        kernel: usize,
        init: &mut ParamInit,
        device: &Device,
    ) -> Self {
        let shape = [c_out, c_in, kernel, kernel];
        let rf = kernel * kernel;
        let w = init.glorot_uniform(shape, c_in * rf, c_out * rf);
        Self {
            weight: param4(w, shape, device),
            bias: param1(0.0, c_out, device),
            kernel,
        }
    }

    /// The convolution, followed by a ReLU when `relu`.
    ///
    /// # Shapes
    /// - `x`: `[batch, c_in, h, w]` → `[batch, c_out, h, w]`
    pub fn forward(&self, x: Tensor<4>, relu: bool, caps: &DeviceCaps) -> Tensor<4> {
        ops::conv(x, self.weight.val(), self.bias.val(), relu, caps)
    }
}

/// A ×2 transposed convolution (kernel 2, stride 2) for the `transposed` upsampling option.
#[derive(Module, Debug)]
pub struct UpConv {
    /// Kernel, `[c_in, c_out, 2, 2]` (PyTorch `ConvTranspose2d` layout).
    pub weight: Param<Tensor<4>>,
    /// Bias, `[c_out]`.
    pub bias: Param<Tensor<1>>,
}

impl UpConv {
    /// Glorot-uniform kernel, zero bias (Keras `Conv2DTranspose` defaults).
    pub fn new(c_in: usize, c_out: usize, init: &mut ParamInit, device: &Device) -> Self {
        let shape = [c_in, c_out, 2, 2];
        // Keras computes the fans of a transposed kernel (2, 2, c_out, c_in) as
        // fan_in = 4·c_out and fan_out = 4·c_in; the sum is what matters for the limit.
        let w = init.glorot_uniform(shape, 4 * c_out, 4 * c_in);
        Self {
            weight: param4(w, shape, device),
            bias: param1(0.0, c_out, device),
        }
    }

    /// # Shapes
    /// - `x`: `[batch, c_in, h, w]` → `[batch, c_out, 2h, 2w]`
    pub fn forward(&self, x: Tensor<4>, caps: &DeviceCaps) -> Tensor<4> {
        ops::conv_transpose2(x, self.weight.val(), self.bias.val(), caps)
    }
}

/// Batch normalisation over `[batch, channels, h, w]` ([`ops::batch_norm_train`] computes it).
///
/// Conventions follow Keras (and PyTorch): normalisation with the biased batch variance;
/// running variance updated with the unbiased one; `momentum` is Keras's (the fraction of the
/// running value kept, 0.99), i.e. PyTorch's `1 − momentum`.
#[derive(Module, Debug)]
pub struct BatchNorm {
    /// Scale γ, `[channels]`.
    pub gamma: Param<Tensor<1>>,
    /// Shift β, `[channels]`.
    pub beta: Param<Tensor<1>>,
    /// Running mean, `[channels]`.
    pub running_mean: RunningState<Tensor<1>>,
    /// Running (unbiased) variance, `[channels]`.
    pub running_var: RunningState<Tensor<1>>,
    /// Fraction of the running statistics kept at each update (Keras convention).
    pub momentum: f64,
    /// Added to the variance before the square root.
    pub epsilon: f64,
}

impl BatchNorm {
    /// γ = 1, β = 0, running mean 0, running variance 1 (Keras defaults).
    pub fn new(channels: usize, momentum: f64, epsilon: f64, device: &Device) -> Self {
        Self {
            gamma: param1(1.0, channels, device),
            beta: param1(0.0, channels, device),
            running_mean: RunningState::new(Tensor::zeros([channels], device)),
            running_var: RunningState::new(Tensor::ones([channels], device)),
            momentum,
            epsilon,
        }
    }

    /// Normalises with batch statistics and updates the running statistics.
    ///
    /// # Shapes
    /// - `x`: `[batch, c, h, w]` → same
    pub fn forward_train(&self, x: Tensor<4>) -> Tensor<4> {
        self.forward_train_dropout(x, None)
    }

    /// [`forward_train`](Self::forward_train) followed by a spatial dropout with these
    /// per-plane multipliers ([`dropout_mask`], `[batch·c]`).
    pub fn forward_train_dropout(&self, x: Tensor<4>, mask: Option<Vec<f32>>) -> Tensor<4> {
        let [b, c, h, w] = x.dims();
        let (out, mean1, var1) =
            ops::batch_norm_train(x, self.gamma.val(), self.beta.val(), self.epsilon, mask);
        let n = (b * h * w) as f64;
        let unbiased = if n > 1.0 { n / (n - 1.0) } else { 1.0 };
        let keep = self.momentum;
        let var1 = var1.mul_scalar(unbiased);
        let rm = self.running_mean.value_sync().without_autodiff();
        let rv = self.running_var.value_sync().without_autodiff();
        self.running_mean
            .update(rm.mul_scalar(keep) + mean1.mul_scalar(1.0 - keep));
        self.running_var
            .update(rv.mul_scalar(keep) + var1.mul_scalar(1.0 - keep));
        // Commit now, so that visitors (checkpoints, cross-rank averaging) see this step's value.
        let _ = self.running_mean.value_sync();
        let _ = self.running_var.value_sync();
        debug_assert_eq!(out.dims(), [b, c, h, w]);
        out
    }

    /// Normalises with the running statistics (inference).
    pub fn forward_eval(&self, x: Tensor<4>) -> Tensor<4> {
        let [_, c, _, _] = x.dims();
        let device = x.device();
        let mean = self
            .running_mean
            .value()
            .to_device(&device)
            .reshape([1, c, 1, 1]);
        let var = self
            .running_var
            .value()
            .to_device(&device)
            .reshape([1, c, 1, 1]);
        let scale =
            var.add_scalar(self.epsilon).sqrt().recip() * self.gamma.val().reshape([1, c, 1, 1]);
        (x - mean) * scale + self.beta.val().reshape([1, c, 1, 1])
    }
}

/// Inverted spatial dropout (Keras `SpatialDropout2D`): whole feature maps are zeroed with
/// probability `p` and the rest scaled by `1 / (1 − p)`. Masks are drawn on the host from the
/// stream `[DROPOUT, step, layer]`, so a resumed run draws exactly the masks it would have.
pub fn spatial_dropout(x: Tensor<4>, p: f64, seed: u64, step: u64, layer: u64) -> Tensor<4> {
    if p <= 0.0 {
        return x;
    }
    let [b, c, _, _] = x.dims();
    let mask = dropout_mask(b * c, p, seed, step, layer);
    let mask = Tensor::<4>::from_data(TensorData::new(mask, [b, c, 1, 1]), &x.device());
    x * mask
}

/// The multipliers of [`spatial_dropout`] for `planes` = batch × channels feature maps: 0 with
/// probability `p`, else `1 / (1 − p)`.
pub fn dropout_mask(planes: usize, p: f64, seed: u64, step: u64, layer: u64) -> Vec<f32> {
    let mut rng = Rng::stream(seed, &[keys::DROPOUT, step, layer]);
    let scale = (1.0 / (1.0 - p)) as f32;
    (0..planes)
        .map(|_| if rng.bernoulli(p) { 0.0 } else { scale })
        .collect()
}

/// How a forward pass runs: training (batch statistics, dropout) or evaluation.
#[derive(Clone, Copy, Debug)]
pub enum Mode {
    /// Training step `step` of a run seeded with `seed` (selects the dropout masks).
    Train {
        /// Run seed.
        seed: u64,
        /// Optimiser step (global across ranks), selects the dropout masks.
        step: u64,
        /// Distinguishes ranks or micro-batches that share a step.
        stream: u64,
    },
    /// Inference: running statistics, no dropout.
    Eval,
}

/// livermask's `addConvBNSequential`: BatchNorm → [SpatialDropout2D] → Conv3×3 → ReLU.
#[derive(Module, Debug)]
pub struct Block {
    /// Normalisation before the convolution (absent with `norm = "none"`).
    pub norm: Option<BatchNorm>,
    /// The 3×3 convolution.
    pub conv: Conv,
    /// Spatial dropout probability (decoder blocks only).
    pub dropout: f64,
    /// Index of this block among all blocks: selects its dropout mask stream.
    pub index: usize,
}

impl Block {
    /// # Shapes
    /// - `x`: `[batch, c_in, h, w]` → `[batch, c_out, h, w]`
    pub fn forward(&self, x: Tensor<4>, mode: Mode, caps: &DeviceCaps) -> Tensor<4> {
        let dropout = match mode {
            Mode::Train { seed, step, stream } if self.dropout > 0.0 => {
                Some((seed, step, (stream << 16) | self.index as u64))
            }
            _ => None,
        };
        let x = match (&self.norm, mode, dropout) {
            // BN and dropout in one pass where the backend allows it.
            (Some(bn), Mode::Train { .. }, Some((seed, step, layer))) => {
                let [b, c, _, _] = x.dims();
                bn.forward_train_dropout(
                    x,
                    Some(dropout_mask(b * c, self.dropout, seed, step, layer)),
                )
            }
            (Some(bn), Mode::Train { .. }, None) => bn.forward_train(x),
            (Some(bn), Mode::Eval, _) => bn.forward_eval(x),
            (None, _, Some((seed, step, layer))) => {
                spatial_dropout(x, self.dropout, seed, step, layer)
            }
            (None, _, None) => x,
        };
        self.conv.forward(x, true, caps)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Closed form in f64 on the host: per channel mean and biased variance over (b, h, w).
    fn reference(
        x: &[f32],
        b: usize,
        c: usize,
        hw: usize,
        eps: f64,
    ) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
        let mut mean = vec![0.0; c];
        let mut var = vec![0.0; c];
        for ch in 0..c {
            let vals: Vec<f64> = (0..b)
                .flat_map(|i| {
                    x[(i * c + ch) * hw..(i * c + ch + 1) * hw]
                        .iter()
                        .map(|&v| v as f64)
                })
                .collect();
            let n = vals.len() as f64;
            mean[ch] = vals.iter().sum::<f64>() / n;
            var[ch] = vals.iter().map(|v| (v - mean[ch]).powi(2)).sum::<f64>() / n;
        }
        let mut y = vec![0.0; x.len()];
        for i in 0..b {
            for ch in 0..c {
                for k in 0..hw {
                    let o = (i * c + ch) * hw + k;
                    y[o] = (x[o] as f64 - mean[ch]) / (var[ch] + eps).sqrt();
                }
            }
        }
        (y, mean, var)
    }

    #[test]
    fn batch_norm_train_and_running_stats_match_closed_form() {
        let device = Device::flex().autodiff();
        let (b, c, h, w) = (3, 2, 5, 7);
        let mut r = Rng::new(5);
        let x: Vec<f32> = (0..b * c * h * w)
            .map(|i| (10.0 * (i % 2) as f64 + 3.0 * r.normal()) as f32)
            .collect();
        let bn = BatchNorm::new(c, 0.9, 1e-3, &device);
        let out = bn.forward_train(Tensor::from_data(
            TensorData::new(x.clone(), [b, c, h, w]),
            &device,
        ));
        let got = crate::tensor_util::to_f32(out).unwrap_or_default();
        let (want, mean, var) = reference(&x, b, c, h * w, 1e-3);
        for (g, w) in got.iter().zip(&want) {
            assert!((*g as f64 - w).abs() < 1e-4, "{g} vs {w}");
        }
        // Running statistics after one update with keep 0.9: 0.9·init + 0.1·batch, variance unbiased.
        let n = (b * h * w) as f64;
        let rm = crate::tensor_util::to_f32(bn.running_mean.value()).unwrap_or_default();
        let rv = crate::tensor_util::to_f32(bn.running_var.value()).unwrap_or_default();
        for ch in 0..c {
            assert!(
                (rm[ch] as f64 - 0.1 * mean[ch]).abs() < 1e-4,
                "running mean"
            );
            assert!(
                (rv[ch] as f64 - (0.9 + 0.1 * var[ch] * n / (n - 1.0))).abs() < 1e-4,
                "running var"
            );
        }
        // Evaluation uses the running statistics.
        let e = bn.forward_eval(Tensor::from_data(
            TensorData::new(x.clone(), [b, c, h, w]),
            &device.clone().without_autodiff(),
        ));
        let e = crate::tensor_util::to_f32(e).unwrap_or_default();
        for (k, v) in e.iter().enumerate() {
            let ch = (k / (h * w)) % c;
            let want = (x[k] as f64 - rm[ch] as f64) / (rv[ch] as f64 + 1e-3).sqrt();
            assert!((*v as f64 - want).abs() < 1e-4, "eval {v} vs {want}");
        }
    }

    #[test]
    fn spatial_dropout_zeroes_whole_maps_and_rescales() {
        let device = Device::flex();
        let x = Tensor::<4>::ones([4, 8, 3, 3], &device);
        let y = crate::tensor_util::to_f32(spatial_dropout(x, 0.5, 1, 2, 3)).unwrap_or_default();
        let mut zeros = 0;
        for map in y.chunks(9) {
            assert!(
                map.iter().all(|&v| v == map[0]),
                "a map is dropped or kept as a whole"
            );
            assert!(
                map[0] == 0.0 || map[0] == 2.0,
                "kept maps scaled by 1/(1-p)"
            );
            zeros += (map[0] == 0.0) as usize;
        }
        assert!(zeros > 4 && zeros < 28, "{zeros} of 32 maps dropped");
        let again = crate::tensor_util::to_f32(spatial_dropout(
            Tensor::<4>::ones([4, 8, 3, 3], &device),
            0.5,
            1,
            2,
            3,
        ))
        .unwrap_or_default();
        assert_eq!(y, again, "same (seed, step, layer) → same mask");
    }
}
