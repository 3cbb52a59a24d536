//! The model's operations, each deciding its implementation in this one place (as candle's
//! `CustomOp` dispatches CPU/CUDA/Metal in one): the CPU kernels of [`super::cpu`] when the
//! tensors are f32 on the flex device; ctseg's WGSL kernels on a wgpu device where they apply
//! ([`gpu_conv`], [`gpu_norm`]); in mixed precision where kernels are compiled to SPIR-V,
//! cubek's cooperative-matrix convolutions ([`cmma_conv`]); otherwise burn's operations (the
//! portable path), split into exact pieces on adapters that cap shader loops. The layers call
//! these unconditionally; a backend's own kernels (GPU convolutions, f16 operands) plug in here.

use burn::tensor::activation::relu;
use burn::tensor::module::{conv_transpose2d, conv2d, max_pool2d};
use burn::tensor::ops::{ConvOptions, ConvTransposeOptions, MaxPoolOptions};
use burn::tensor::{Tensor, TensorData};

use super::cmma_conv;
use super::cpu;
use super::gpu_conv::{self, CoopTile, Operands};
use super::gpu_norm;

/// Which 3×3 convolution kernels the model uses on a wgpu adapter.
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    serde::Serialize,
    serde::Deserialize,
    clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum GpuConv {
    /// burn's (direct convolution forward, im2col or direct gradients; split into row chunks
    /// on loop-capped adapters). The library's default; the command line's, `--gpu-conv auto`,
    /// times both for the model (`crate::bench::conv_choice`).
    #[default]
    Burn,
    /// ctseg's WGSL implicit-GEMM kernels for the forward and all three gradients
    /// ([`gpu_conv`]), with bias and ReLU fused, on every adapter without chunks.
    Wgsl,
}

impl GpuConv {
    /// How logs and `ctseg adapters` name it.
    pub fn describe(self) -> &'static str {
        match self {
            GpuConv::Burn => "burn's convolution kernels",
            GpuConv::Wgsl => "ctseg's WGSL implicit-GEMM convolution kernels",
        }
    }
}

/// What the model's operations must know about the device they run on, decided once when the
/// backend is opened ([`crate::backend::open`]) and carried by the model.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DeviceCaps {
    /// Iterations after which the adapter stops a shader loop (Mesa's lavapipe: 65,535);
    /// `None`: loops run to completion (CPUs, real GPUs).
    pub shader_loop_cap: Option<usize>,
    /// The 3×3 convolutions' kernels on a wgpu adapter (ignored on the CPU, whose own kernels
    /// always apply).
    pub gpu_conv: GpuConv,
    /// Mixed precision: the 3×3 convolutions' operands rounded to f16, accumulated in f32 (on
    /// a wgpu adapter, through ctseg's kernels whatever `gpu_conv` says: burn's would
    /// accumulate f16 operands in f16; where kernels are compiled to SPIR-V, cubek's
    /// ([`cmma_conv`]); on the CPU, its own kernels, as the GPU check's reference).
    pub f16_operands: bool,
    /// The adapter's cooperative matrices as ctseg's kernels use them (`None`: none, switched
    /// off, or not on a wgpu adapter). Mixed precision's convolutions run on them where
    /// present; f32 never does (Vulkan has no TF32, and the kernels use f16 operands only).
    pub coop: Option<CoopTile>,
}

impl DeviceCaps {
    /// The largest batch·rows·width one convolution may cover on this adapter, `None` for no
    /// limit. burn's weight-gradient kernel for a 3×3 convolution loops over batch·rows·width
    /// values three times per value (measured on lavapipe: wrong beyond ~21,800 = 65,535 / 3),
    /// so the chunk leaves room for a kernel that loops once per tap: cap / 9, rounded down to
    /// a multiple of 1024 (7,168 on lavapipe).
    pub fn conv_chunk(&self) -> Option<usize> {
        self.shader_loop_cap
            .map(|cap| ((cap / 9) / 1024 * 1024).max(1024))
    }

    /// How a k×k convolution's products are computed on this device: mixed precision rounds
    /// the 3×3 convolutions' operands to f16 (the 1×1 output layer stays f32), on the adapter's
    /// cooperative matrices where it has them.
    pub fn conv_operands(&self, k: usize) -> Operands {
        match (self.f16_operands && k == 3, self.coop) {
            (false, _) => Operands::F32,
            (true, None) => Operands::F16,
            (true, Some(tile)) => Operands::Coop(tile),
        }
    }
}

/// A 'same'-padded, stride-1 k×k convolution with bias (k odd), followed by a ReLU when `relu`.
///
/// # Shapes
/// - `x`: `[batch, c_in, h, w]`, `weight`: `[c_out, c_in, k, k]`, `bias`: `[c_out]`
///   → `[batch, c_out, h, w]`
pub fn conv(
    x: Tensor<4>,
    weight: Tensor<4>,
    bias: Tensor<1>,
    apply_relu: bool,
    caps: &DeviceCaps,
) -> Tensor<4> {
    let [_, _, k, _] = weight.dims();
    let operands = caps.conv_operands(k);
    let f16 = operands != Operands::F32;
    if let Some(y) = cpu::conv::conv2d_same(&x, &weight, &bias, apply_relu, f16) {
        return y;
    }
    // ctseg's GPU kernels cover f16 operands (burn's would accumulate them in f16).
    if (caps.gpu_conv == GpuConv::Wgsl || f16)
        && let Some(y) = gpu_conv::conv3x3(&x, &weight, &bias, apply_relu, operands)
    {
        return y;
    }
    // Where kernels are compiled to SPIR-V (no WGSL kernels there), cubek's on cooperative
    // matrices.
    if f16 && let Some(y) = cmma_conv::conv3x3(&x, &weight) {
        let [_, c_out, _, _] = y.dims();
        let y = y + bias.reshape([1, c_out, 1, 1]);
        return if apply_relu { relu(y) } else { y };
    }
    let pad = k / 2;
    let y = chunked_rows(x, caps.conv_chunk(), pad, |x, pad_h| {
        conv2d(
            x,
            weight.clone(),
            Some(bias.clone()),
            ConvOptions::new([1, 1], [pad_h, pad], [1, 1], 1),
        )
    });
    if apply_relu { relu(y) } else { y }
}

/// A ×2 transposed convolution (kernel 2, stride 2) with bias.
///
/// # Shapes
/// - `x`: `[batch, c_in, h, w]`, `weight`: `[c_in, c_out, 2, 2]` → `[batch, c_out, 2h, 2w]`
pub fn conv_transpose2(
    x: Tensor<4>,
    weight: Tensor<4>,
    bias: Tensor<1>,
    caps: &DeviceCaps,
) -> Tensor<4> {
    // Output rows 2r, 2r+1 depend on input row r only: row chunks need no halo.
    chunked_rows(x, caps.conv_chunk(), 0, |x, _| {
        conv_transpose2d(
            x,
            weight.clone(),
            Some(bias.clone()),
            ConvTransposeOptions::new([2, 2], [0, 0], [0, 0], [1, 1], 1),
        )
    })
}

/// Training-mode batch normalisation with batch statistics, followed by a spatial dropout
/// given as its per-plane multipliers (`[batch·c]`; see [`super::layers::dropout_mask`]):
/// the output and the per-channel mean and biased variance as `[c]` tensors without autodiff.
pub fn batch_norm_train(
    x: Tensor<4>,
    gamma: Tensor<1>,
    beta: Tensor<1>,
    epsilon: f64,
    mask: Option<Vec<f32>>,
) -> (Tensor<4>, Tensor<1>, Tensor<1>) {
    if let Some(fused) = cpu::norm::batch_norm_train(&x, &gamma, &beta, epsilon, mask.clone()) {
        return fused;
    }
    if let Some(fused) = gpu_norm::batch_norm_train(&x, &gamma, &beta, epsilon, mask.as_deref()) {
        return fused;
    }
    let [b, c, _, _] = x.dims();
    let device = x.device();
    let (y, mean, var) = batch_norm_train_tensor_ops(x, gamma, beta, epsilon);
    let y = match mask {
        Some(mask) => y * Tensor::<4>::from_data(TensorData::new(mask, [b, c, 1, 1]), &device),
        None => y,
    };
    (y, mean, var)
}

/// Per-channel mean over batch, height and width, reduced one axis at a time (no reduction is
/// longer than the largest dimension, which loop-capped adapters need). `[b, c, h, w]` →
/// `[1, c, 1, 1]`.
pub fn channel_mean(x: Tensor<4>) -> Tensor<4> {
    x.mean_dim(3).mean_dim(2).mean_dim(0)
}

/// The batch-statistics normalisation written with tensor operations (the portable path; on
/// the CPU [`cpu::norm`] and on a wgpu device [`gpu_norm`] compute the same in one fused
/// operation each, the first tested against this, the second against the first):
/// the output, and the per-channel mean and biased variance as `[c]` tensors without autodiff.
///
/// burn's fused `batch_norm` returned wrong statistics on wgpu/lavapipe at realistic shapes, and
/// long single-axis reductions are unreliable there, so the statistics are reduced one axis at
/// a time (W, then H, then batch) and per-channel values are expanded explicitly: the backward
/// of `expand` reduces one axis at a time, where an implicit broadcast reduces
/// batch·height·width in one go.
pub fn batch_norm_train_tensor_ops(
    x: Tensor<4>,
    gamma: Tensor<1>,
    beta: Tensor<1>,
    epsilon: f64,
) -> (Tensor<4>, Tensor<1>, Tensor<1>) {
    let [b, c, h, w] = x.dims();
    let full = [b, c, h, w];
    let mean = channel_mean(x.clone());
    let centered = x - mean.clone().expand(full);
    let var = channel_mean(centered.clone().square());
    let inv_std = var.clone().add_scalar(epsilon).sqrt().recip();
    let y = centered * inv_std.expand(full);
    let out =
        y * gamma.reshape([1, c, 1, 1]).expand(full) + beta.reshape([1, c, 1, 1]).expand(full);
    let mean1 = mean.detach().reshape([c]).without_autodiff();
    let var1 = var.detach().reshape([c]).without_autodiff();
    (out, mean1, var1)
}

/// 2×2, stride-2 max-pooling.
///
/// # Shapes
/// - `x`: `[b, c, h, w]` → `[b, c, h/2, w/2]`
pub fn max_pool2(x: Tensor<4>) -> Tensor<4> {
    match cpu::ops::max_pool2_cpu(&x) {
        Some(y) => y,
        None => max_pool2d(x, MaxPoolOptions::new([2, 2])),
    }
}

/// The decoder's join: `cat([skip, nearest×2(low)], channels)`.
///
/// # Shapes
/// - `skip`: `[b, c1, h, w]`, `low`: `[b, c2, h/2, w/2]` → `[b, c1 + c2, h, w]`
pub fn upsample_cat(skip: Tensor<4>, low: Tensor<4>) -> Tensor<4> {
    match cpu::ops::upsample_cat_cpu(&skip, &low) {
        Some(y) => y,
        None => Tensor::cat(vec![skip, upsample_nearest2(low)], 1),
    }
}

/// Nearest-neighbour ×2 upsampling (Keras `UpSampling2D`), written as reshape → expand →
/// reshape. Its backward sums each 2×2 block with two short reductions.
///
/// Not burn's `interpolate`: on an NVIDIA H200 through Vulkan (driver 580.159), the gradients
/// of everything upstream of a 120² → 240² nearest upsampling came out 20–100 % wrong while
/// the same model at 64² was exact (tests/gpu.rs, `unet_loss_and_gradients_match_cpu_at_240`);
/// burn's nearest-interpolate backward kernel is the one operation on that path this form avoids.
///
/// # Shapes
/// - `x`: `[b, c, h, w]` → `[b, c, 2h, 2w]`
pub fn upsample_nearest2(x: Tensor<4>) -> Tensor<4> {
    let [b, c, h, w] = x.dims();
    x.reshape([b, c, h, 1, w, 1])
        .expand([b, c, h, 2, w, 2])
        .reshape([b, c, 2 * h, 2 * w])
}

/// Applies `f` to `x` in pieces so that no call covers more than `limit` values of
/// batch·rows·width (`None`: one call).
///
/// Why: Mesa's lavapipe (the software Vulkan adapter CI uses) stops every shader loop after
/// 65,535 iterations, and burn's kernels for a convolution's weight and bias gradients loop over
/// batch·height·width (230,400 at livermask's batch 4 × 240²), so on such an adapter those
/// gradients come out silently wrong. Splitting the convolution keeps every contraction short;
/// the gradients of the pieces add up to the exact gradient.
///
/// `halo` is the kernel's half-width: `f(x, pad_h)` receives rows with `halo` extra rows of
/// context on each side (zeros at the image border) and must pad rows by `pad_h`.
pub fn chunked_rows(
    x: Tensor<4>,
    limit: Option<usize>,
    halo: usize,
    f: impl Fn(Tensor<4>, usize) -> Tensor<4>,
) -> Tensor<4> {
    let [b, c, h, w] = x.dims();
    let limit = match limit {
        Some(l) if b * h * w > l => l,
        _ => return f(x, halo),
    };
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;
    use burn::tensor::Device;

    #[test]
    fn lavapipe_cap_gives_the_measured_chunk() {
        let caps = DeviceCaps {
            shader_loop_cap: Some(65_535),
            ..DeviceCaps::default()
        };
        assert_eq!(caps.conv_chunk(), Some(7_168));
        assert_eq!(DeviceCaps::default().conv_chunk(), None);
    }

    #[test]
    fn upsampling_equals_burn_nearest_interpolate() {
        use burn::tensor::module::interpolate;
        use burn::tensor::ops::{InterpolateMode, InterpolateOptions};
        let device = Device::flex();
        let mut r = Rng::new(11);
        let v: Vec<f32> = (0..2 * 4 * 36).map(|_| r.normal() as f32).collect();
        let x = Tensor::<4>::from_data(TensorData::new(v, [2, 4, 6, 6]), &device);
        let a = crate::tensor_util::to_f32(upsample_nearest2(x.clone())).unwrap_or_default();
        let opts = InterpolateOptions::new(InterpolateMode::Nearest).with_scale_factor([2.0, 2.0]);
        let b = crate::tensor_util::to_f32(interpolate(x, opts)).unwrap_or_default();
        assert_eq!(a.len(), 2 * 4 * 144);
        assert_eq!(a, b);
    }

    /// Output, weight and input gradients of burn's `conv2d` through [`chunked_rows`] with
    /// `limit`, on the CPU device (where the chunking arithmetic is the same as on an adapter).
    fn conv_grads(
        limit: Option<usize>,
        kernel: usize,
        x: &[f32],
        shape: [usize; 4],
    ) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let device = Device::flex().autodiff();
        let mut r = Rng::new(4);
        let c_out = 5;
        let wv: Vec<f32> = (0..c_out * shape[1] * kernel * kernel)
            .map(|_| r.normal() as f32)
            .collect();
        let w = Tensor::<4>::from_data(
            TensorData::new(wv, [c_out, shape[1], kernel, kernel]),
            &device,
        )
        .require_grad();
        let bias = Tensor::<1>::zeros([c_out], &device).require_grad();
        let x = Tensor::<4>::from_data(TensorData::new(x.to_vec(), shape), &device).require_grad();
        let pad = kernel / 2;
        let y = chunked_rows(x.clone(), limit, pad, |x, pad_h| {
            conv2d(
                x,
                w.clone(),
                Some(bias.clone()),
                ConvOptions::new([1, 1], [pad_h, pad], [1, 1], 1),
            )
        });
        let out = crate::tensor_util::to_f32(y.clone()).unwrap_or_default();
        // A loss that weights every output differently, so misplaced rows would show.
        let n = out.len();
        let wts: Vec<f32> = (0..n).map(|i| ((i * 7919) % 13) as f32 - 6.0).collect();
        let wts = Tensor::<4>::from_data(TensorData::new(wts, y.dims()), &device);
        let grads = (y * wts).sum().backward();
        let gw = crate::tensor_util::to_f32(w.grad(&grads).expect("w grad")).unwrap_or_default();
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
                let (o1, w1, x1) = conv_grads(None, kernel, &x, shape);
                let (o2, w2, x2) = conv_grads(Some(limit), kernel, &x, shape);
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
