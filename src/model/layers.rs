//! The U-Net's building layers: 3×3/1×1 convolutions, batch normalisation written with plain
//! tensor ops, spatial dropout with host-drawn masks, and the BN → dropout → conv → ReLU block.
//!
//! Weights are drawn on the host from [`crate::rng::Rng`] so the same seed gives the same model
//! on every backend (the CPU/GPU parity tests rely on it).

use burn::module::{Module, Param, RunningState};
use burn::tensor::module::{conv_transpose2d, conv2d};
use burn::tensor::ops::{ConvOptions, ConvTransposeOptions};
use burn::tensor::{Device, Tensor, TensorData};

use super::cpuconv::{conv2d_same, conv2d_same_relu};
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
    /// Largest batch·rows·width one convolution call may cover (0: no limit). See
    /// [`chunked_rows`].
    pub chunk_limit: usize,
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
            chunk_limit: 0,
        }
    }

    /// # Shapes
    /// - `x`: `[batch, c_in, h, w]` → `[batch, c_out, h, w]`
    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let pad = self.kernel / 2;
        let (weight, bias) = (self.weight.val(), self.bias.val());
        if self.chunk_limit == 0 {
            return conv2d_same(x, weight, bias);
        }
        chunked_rows(x, self.chunk_limit, pad, |x, pad_h| {
            conv2d(
                x,
                weight.clone(),
                Some(bias.clone()),
                ConvOptions::new([1, 1], [pad_h, pad], [1, 1], 1),
            )
        })
    }

    /// `relu(self.forward(x))`; on the CPU backend the ReLU is fused into the convolution.
    pub fn forward_relu(&self, x: Tensor<4>) -> Tensor<4> {
        if self.chunk_limit == 0 {
            return conv2d_same_relu(x, self.weight.val(), self.bias.val());
        }
        burn::tensor::activation::relu(self.forward(x))
    }

    /// Number of trainable values.
    pub fn num_trainable(&self) -> usize {
        let [o, i, kh, kw] = self.weight.shape().dims();
        o * i * kh * kw + o
    }
}

/// A ×2 transposed convolution (kernel 2, stride 2) for the `transposed` upsampling option.
#[derive(Module, Debug)]
pub struct UpConv {
    /// Kernel, `[c_in, c_out, 2, 2]` (PyTorch `ConvTranspose2d` layout).
    pub weight: Param<Tensor<4>>,
    /// Bias, `[c_out]`.
    pub bias: Param<Tensor<1>>,
    /// Largest batch·rows·width one call may cover (0: no limit).
    pub chunk_limit: usize,
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
            chunk_limit: 0,
        }
    }

    /// # Shapes
    /// - `x`: `[batch, c_in, h, w]` → `[batch, c_out, 2h, 2w]`
    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let (weight, bias) = (self.weight.val(), self.bias.val());
        // Output rows 2r, 2r+1 depend on input row r only: row chunks need no halo.
        chunked_rows(x, self.chunk_limit, 0, |x, _| {
            conv_transpose2d(
                x,
                weight.clone(),
                Some(bias.clone()),
                ConvTransposeOptions::new([2, 2], [0, 0], [0, 0], [1, 1], 1),
            )
        })
    }
}

/// Applies `f` to `x` in pieces so that no call covers more than `limit` values of
/// batch·rows·width (`limit` 0: one call).
///
/// Why: Mesa's lavapipe (the software Vulkan adapter CI uses) stops every shader loop after
/// 65,535 iterations, and burn's kernels for a convolution's weight and bias gradients loop over
/// batch·height·width (230,400 at livermask's batch 4 × 240²), so on such an adapter those
/// gradients come out silently wrong. Splitting the convolution keeps every contraction short; the
/// gradients of the pieces add up to the exact gradient. Only adapters that fail the start-up
/// check in [`crate::backend`] get a limit; CPUs and real GPUs run one call.
///
/// `halo` is the kernel's half-width: `f(x, pad_h)` receives rows with `halo` extra rows of
/// context on each side (zeros at the image border) and must pad rows by `pad_h`.
pub fn chunked_rows(
    x: Tensor<4>,
    limit: usize,
    halo: usize,
    f: impl Fn(Tensor<4>, usize) -> Tensor<4>,
) -> Tensor<4> {
    let [b, c, h, w] = x.dims();
    if limit == 0 || b * h * w <= limit {
        return f(x, halo);
    }
    if h * w <= limit {
        let per = (limit / (h * w)).max(1);
        let parts = (0..b)
            .step_by(per)
            .map(|s| f(x.clone().narrow(0, s, per.min(b - s)), halo))
            .collect();
        return Tensor::cat(parts, 0);
    }
    let rows = (limit / w).max(1);
    let device = x.device();
    let mut images = Vec::with_capacity(b);
    for i in 0..b {
        let img = x.clone().narrow(0, i, 1);
        let padded = if halo > 0 {
            let z = Tensor::<4>::zeros([1, c, halo, w], &device);
            Tensor::cat(vec![z.clone(), img, z], 2)
        } else {
            img
        };
        let parts = (0..h)
            .step_by(rows)
            .map(|r0| {
                let n = rows.min(h - r0);
                f(padded.clone().narrow(2, r0, n + 2 * halo), 0)
            })
            .collect();
        images.push(Tensor::cat(parts, 2));
    }
    Tensor::cat(images, 0)
}

/// Batch normalisation over `[batch, channels, h, w]`, composed from plain tensor ops.
///
/// burn's fused `batch_norm_train` returned wrong statistics on wgpu/lavapipe at realistic
/// shapes (DESIGN.md §2), and long single-axis reductions are unreliable there, so the
/// statistics are reduced one axis at a time (W, then H, then batch): no reduction is longer
/// than the largest of those dimensions.
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

    /// Mean over batch, height and width, reduced one axis at a time. `[b, c, h, w]` → `[1, c, 1, 1]`.
    pub fn channel_mean(x: Tensor<4>) -> Tensor<4> {
        x.mean_dim(3).mean_dim(2).mean_dim(0)
    }

    /// Normalises with batch statistics and updates the running statistics.
    ///
    /// # Shapes
    /// - `x`: `[batch, c, h, w]` → same
    pub fn forward_train(&self, x: Tensor<4>) -> Tensor<4> {
        self.forward_train_dropout(x, None)
    }

    /// [`forward_train`](Self::forward_train) followed by a spatial dropout with these
    /// per-plane multipliers ([`dropout_mask`], `[batch·c]`): one fused pass on the CPU, the
    /// tensor-operation formula times the mask elsewhere.
    pub fn forward_train_dropout(&self, x: Tensor<4>, mask: Option<Vec<f32>>) -> Tensor<4> {
        let [b, c, h, w] = x.dims();
        let device = x.device();
        let (out, mean1, var1) = match super::cpunorm::batch_norm_train(
            &x,
            &self.gamma.val(),
            &self.beta.val(),
            self.epsilon,
            mask.clone(),
        ) {
            Some(fused) => fused,
            None => {
                let (y, m, v) = self.forward_train_tensor_ops(x);
                let y = match mask {
                    Some(mask) => {
                        y * Tensor::<4>::from_data(TensorData::new(mask, [b, c, 1, 1]), &device)
                    }
                    None => y,
                };
                (y, m, v)
            }
        };
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

    /// The batch-statistics normalisation written with tensor operations (the GPU path; on the
    /// CPU [`super::cpunorm`] computes the same in one fused operation): the output, and the
    /// per-channel mean and biased variance as `[c]` tensors without autodiff.
    pub(crate) fn forward_train_tensor_ops(
        &self,
        x: Tensor<4>,
    ) -> (Tensor<4>, Tensor<1>, Tensor<1>) {
        let [b, c, h, w] = x.dims();
        // Per-channel values are expanded explicitly: the backward of `expand` reduces one axis
        // at a time, where an implicit broadcast reduces batch·height·width in one go (see
        // `chunked_rows` for why long reductions are avoided).
        let full = [b, c, h, w];
        let mean = Self::channel_mean(x.clone());
        let centered = x - mean.clone().expand(full);
        let var = Self::channel_mean(centered.clone().square());
        let inv_std = var.clone().add_scalar(self.epsilon).sqrt().recip();
        let y = centered * inv_std.expand(full);
        let out = y * self.gamma.val().reshape([1, c, 1, 1]).expand(full)
            + self.beta.val().reshape([1, c, 1, 1]).expand(full);
        let mean1 = mean.detach().reshape([c]).without_autodiff();
        let var1 = var.detach().reshape([c]).without_autodiff();
        (out, mean1, var1)
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
    pub fn forward(&self, x: Tensor<4>, mode: Mode) -> Tensor<4> {
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
        self.conv.forward_relu(x)
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

    fn conv_grads(
        limit: usize,
        kernel: usize,
        x: &[f32],
        shape: [usize; 4],
    ) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let device = Device::flex().autodiff();
        let mut init = ParamInit::new(4);
        let mut conv = Conv::new(shape[1], 5, kernel, &mut init, &device);
        conv.chunk_limit = limit;
        let x = Tensor::<4>::from_data(TensorData::new(x.to_vec(), shape), &device).require_grad();
        let y = conv.forward(x.clone());
        let out = crate::tensor_util::to_f32(y.clone()).unwrap_or_default();
        // A loss that weights every output differently, so misplaced rows would show.
        let n = out.len();
        let wts: Vec<f32> = (0..n).map(|i| ((i * 7919) % 13) as f32 - 6.0).collect();
        let wts = Tensor::<4>::from_data(TensorData::new(wts, y.dims()), &device);
        let grads = (y * wts).sum().backward();
        let gw = crate::tensor_util::to_f32(conv.weight.val().grad(&grads).expect("w grad"))
            .unwrap_or_default();
        let gx = crate::tensor_util::to_f32(x.grad(&grads).expect("x grad")).unwrap_or_default();
        (out, gw, gx)
    }

    #[test]
    fn chunked_convolution_equals_one_call() {
        // Batch and row chunks (limit 40 < h·w = 7·9): outputs, weight and input gradients must
        // equal the unsplit convolution's (up to f32 summation order).
        let shape = [3, 2, 7, 9];
        let mut r = Rng::new(8);
        let x: Vec<f32> = (0..shape.iter().product::<usize>())
            .map(|_| r.normal() as f32)
            .collect();
        for kernel in [3, 1] {
            for limit in [40, 100, 9] {
                let (o1, w1, x1) = conv_grads(0, kernel, &x, shape);
                let (o2, w2, x2) = conv_grads(limit, kernel, &x, shape);
                for (name, a, b) in [
                    ("output", &o1, &o2),
                    ("weight grad", &w1, &w2),
                    ("input grad", &x1, &x2),
                ] {
                    assert_eq!(a.len(), b.len(), "{name}");
                    let err = a
                        .iter()
                        .zip(b.iter())
                        .map(|(p, q)| (p - q).abs())
                        .fold(0.0f32, f32::max);
                    assert!(
                        err < 1e-4,
                        "kernel {kernel} limit {limit}: {name} differs by {err}"
                    );
                }
            }
        }
    }
}
