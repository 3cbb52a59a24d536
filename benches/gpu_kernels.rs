//! `cargo bench --bench gpu_kernels`: ctseg's own GPU kernels against burn's on the GPU adapter
//! (lavapipe here; the H200 through scripts/gpu_device_check.sh), each as the model calls it:
//! - one 3×3 convolution + ReLU of the livermask U-Net (`model::ops::conv`) with burn's kernels
//!   (`--gpu-conv burn`, split into row chunks on loop-capped adapters) and with ctseg's
//!   (`--gpu-conv wgsl`, `model::gpu_conv`); on an adapter with cooperative matrices, a second
//!   line per case times mixed precision's convolution (f16 operands, f32 accumulation) in
//!   registers against on cooperative matrices;
//! - one training-mode batch normalisation + spatial dropout on the convolution's input: ctseg's
//!   kernels (`model::gpu_norm`, what the model runs on a wgpu device) against the same function
//!   written with burn's tensor operations (`model::ops::batch_norm_train_tensor_ops`).
//!
//! Each: the forward alone, and forward + backward as in a training step; the median of warm
//! repetitions with the device synchronised, the ratio of the two, and their agreement (the
//! largest relative L2 difference of the outputs and gradients).

use std::time::Instant;

use burn::tensor::{Tensor, TensorData};
use ctseg::backend::{self, Backend, BackendKind, DeviceRequest};
use ctseg::model::{DeviceCaps, GpuConv, gpu_norm, ops};
use ctseg::tensor_util::to_f32;
use ctseg::util::stats::spread;
use ctseg::verify::rel_l2;

/// The largest relative L2 difference between matching tensors of `a` and `b`; NaN if any is
/// (a kernel that left values out must not print as agreeing).
fn largest_difference(a: &[Vec<f32>], b: &[Vec<f32>]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| rel_l2(y, x))
        .fold(0.0, |m: f64, e| {
            if e.is_nan() || m.is_nan() {
                f64::NAN
            } else {
                m.max(e)
            }
        })
}

/// Median seconds of `f` over `reps` warm repetitions (one untimed first), and its last output.
fn time(
    be: &Backend,
    reps: usize,
    f: &dyn Fn() -> Vec<Tensor<4>>,
) -> Result<(f64, Vec<Vec<f32>>), String> {
    let mut times = Vec::new();
    let mut out = Vec::new();
    for i in 0..=reps {
        be.device.sync().map_err(|e| format!("{e:?}"))?;
        let t = Instant::now();
        let ys = f();
        be.device.sync().map_err(|e| format!("{e:?}"))?;
        if i > 0 {
            times.push(t.elapsed().as_secs_f64());
        }
        if i == reps {
            out = ys
                .into_iter()
                .map(|y| to_f32(y).map_err(|e| e.to_string()))
                .collect::<Result<_, _>>()?;
        }
    }
    Ok((spread(&times).median, out))
}

/// One case's tensors on the device (uploaded before any timing): input, kernel, bias and the
/// loss weights `r`; with `train`, on the autodiff device and tracked.
struct Operands {
    x: Tensor<4>,
    w: Tensor<4>,
    b: Tensor<1>,
    r: Tensor<4>,
}

fn operands(
    be: &Backend,
    train: bool,
    data: &(Vec<f32>, Vec<f32>, Vec<f32>),
    shape: [usize; 4],
    co: usize,
) -> Operands {
    let device = if train {
        be.device.clone().autodiff()
    } else {
        be.device.clone()
    };
    let yshape = [shape[0], co, shape[2], shape[3]];
    let o = Operands {
        x: Tensor::from_data(TensorData::new(data.0.clone(), shape), &device),
        w: Tensor::from_data(
            TensorData::new(data.1.clone(), [co, shape[1], 3, 3]),
            &device,
        ),
        b: Tensor::zeros([co], &device),
        r: Tensor::from_data(TensorData::new(data.2.clone(), yshape), &device),
    };
    if !train {
        return o;
    }
    Operands {
        x: o.x.require_grad(),
        w: o.w.require_grad(),
        b: o.b.require_grad(),
        r: o.r,
    }
}

/// The output of the convolution, or with `train` the input and weight gradients under the
/// loss `sum(y · r)`.
fn run(caps: DeviceCaps, train: bool, o: &Operands) -> Vec<Tensor<4>> {
    let y = ops::conv(o.x.clone(), o.w.clone(), o.b.clone(), true, &caps);
    if !train {
        return vec![y];
    }
    let grads = (y * o.r.clone()).sum().backward();
    [o.x.grad(&grads), o.w.grad(&grads)]
        .into_iter()
        .flatten()
        .collect()
}

/// Batch normalisation's ε in the model (Keras's default).
const EPSILON: f64 = 1e-3;

/// One batch normalisation's tensors: input, γ, β, the loss weights `r` and spatial-dropout
/// multipliers (every fifth plane dropped, the rest scaled by 1/(1 − 0.2)).
struct NormOperands {
    x: Tensor<4>,
    gamma: Tensor<1>,
    beta: Tensor<1>,
    r: Tensor<4>,
    mask: Vec<f32>,
}

fn norm_operands(
    be: &Backend,
    train: bool,
    x: &[f32],
    r: &[f32],
    shape: [usize; 4],
) -> NormOperands {
    let device = if train {
        be.device.clone().autodiff()
    } else {
        be.device.clone()
    };
    let c = shape[1];
    let param = |v: Vec<f32>| {
        let t = Tensor::<1>::from_data(TensorData::new(v, [c]), &device);
        if train { t.require_grad() } else { t }
    };
    let x = Tensor::from_data(TensorData::new(x.to_vec(), shape), &device);
    NormOperands {
        x: if train { x.require_grad() } else { x },
        gamma: param((0..c).map(|i| 0.5 + (i % 7) as f32 / 7.0).collect()),
        beta: param((0..c).map(|i| (i % 5) as f32 / 10.0 - 0.2).collect()),
        r: Tensor::from_data(TensorData::new(r.to_vec(), shape), &device),
        mask: (0..shape[0] * c)
            .map(|p| if p % 5 == 0 { 0.0 } else { 1.25 })
            .collect(),
    }
}

/// The normalised output, or with `train` the gradients of x, γ and β under `sum(y · r)`;
/// on ctseg's kernels (`fused`) or written with tensor operations.
fn run_norm(fused: bool, train: bool, o: &NormOperands) -> Vec<Tensor<4>> {
    let [b, c, _, _] = o.x.dims();
    let y = if fused {
        gpu_norm::batch_norm_train(&o.x, &o.gamma, &o.beta, EPSILON, Some(&o.mask))
            .expect("ctseg's batch-normalisation kernels cover this shape")
            .0
    } else {
        let (y, _, _) =
            ops::batch_norm_train_tensor_ops(o.x.clone(), o.gamma.clone(), o.beta.clone(), EPSILON);
        let device = o.x.device();
        y * Tensor::<4>::from_data(TensorData::new(o.mask.clone(), [b, c, 1, 1]), &device)
    };
    if !train {
        return vec![y];
    }
    let grads = (y * o.r.clone()).sum().backward();
    let per_channel = |t: Option<Tensor<1>>| t.map(|t| t.reshape([1, c, 1, 1]));
    [
        o.x.grad(&grads),
        per_channel(o.gamma.grad(&grads)),
        per_channel(o.beta.grad(&grads)),
    ]
    .into_iter()
    .flatten()
    .collect()
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let reps: usize = std::env::var("CTSEG_BENCH_REPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let be = backend::open(&DeviceRequest {
        kind: BackendKind::Gpu,
        threads: 0,
        adapter: None,
        gpu_conv: GpuConv::Burn,
        cooperative_matrices: true,
    })?;
    println!("{}", be.description);
    let caps = |gpu_conv| DeviceCaps {
        gpu_conv,
        ..be.caps
    };
    // livermask: width 32's first level and its third level, the bottleneck's input, and width
    // 64's first level, at batch 4; width 64's first level at the study's batch 30.
    let cases = [
        ([4, 32, 240, 240], 32),
        ([4, 64, 120, 120], 64),
        ([4, 256, 30, 30], 256),
        ([4, 64, 240, 240], 64),
        ([30, 64, 240, 240], 64),
    ];
    let only: Option<usize> = std::env::var("CTSEG_BENCH_CASES")
        .ok()
        .and_then(|v| v.parse().ok());
    for (shape, co) in cases.into_iter().take(only.unwrap_or(cases.len())) {
        let n: usize = shape.iter().product();
        let ny = n / shape[1] * co;
        let data = (
            (0..n)
                .map(|i| ((i * 7919) % 97) as f32 / 97.0 - 0.5)
                .collect::<Vec<f32>>(),
            (0..co * shape[1] * 9)
                .map(|i| ((i * 104729) % 89) as f32 / 890.0 - 0.05)
                .collect::<Vec<f32>>(),
            (0..ny)
                .map(|i| ((i * 31) % 17) as f32 / 17.0 - 0.5)
                .collect::<Vec<f32>>(),
        );
        let flop = 2.0 * (shape[0] * shape[2] * shape[3] * co * shape[1] * 9) as f64;
        for (train, what, flops) in [(false, "forward", flop), (true, "fwd+bwd", 3.0 * flop)] {
            let o = operands(&be, train, &data, shape, co);
            let (t_burn, y_burn) = time(&be, reps, &|| run(caps(GpuConv::Burn), train, &o))?;
            let (t_own, y_own) = time(&be, reps, &|| run(caps(GpuConv::Wgsl), train, &o))?;
            let err = largest_difference(&y_burn, &y_own);
            println!(
                "{shape:?} -> {co} {what}: burn {t_burn:.4} s ({:.1} GFLOP/s) | ctseg {t_own:.4} s ({:.1}) | burn / ctseg {:.2}x | rel. L2 diff {err:.1e}",
                flops / t_burn / 1e9,
                flops / t_own / 1e9,
                t_burn / t_own,
            );
            let Some(tile) = be.caps.coop else { continue };
            let mixed = |coop| DeviceCaps {
                gpu_conv: GpuConv::Wgsl,
                f16_operands: true,
                coop,
                ..be.caps
            };
            let (t_reg, y_reg) = time(&be, reps, &|| run(mixed(None), train, &o))?;
            let (t_coop, y_coop) = time(&be, reps, &|| run(mixed(Some(tile)), train, &o))?;
            let err = largest_difference(&y_reg, &y_coop);
            println!(
                "{shape:?} -> {co} {what} mixed: registers {t_reg:.4} s ({:.1} GFLOP/s) | {} {t_coop:.4} s ({:.1}) | registers / cooperative {:.2}x | rel. L2 diff {err:.1e}",
                flops / t_reg / 1e9,
                tile.describe(),
                flops / t_coop / 1e9,
                t_reg / t_coop,
            );
        }
        // Batch normalisation of the convolution's input, as the block before it does.
        let r: Vec<f32> = (0..n)
            .map(|i| ((i * 31) % 17) as f32 / 17.0 - 0.5)
            .collect();
        for (train, what) in [(false, "forward"), (true, "fwd+bwd")] {
            let o = norm_operands(&be, train, &data.0, &r, shape);
            let (t_ops, y_ops) = time(&be, reps, &|| run_norm(false, train, &o))?;
            let (t_own, y_own) = time(&be, reps, &|| run_norm(true, train, &o))?;
            let err = largest_difference(&y_ops, &y_own);
            println!(
                "{shape:?} batch norm + dropout {what}: tensor operations {t_ops:.4} s | ctseg {t_own:.4} s | tensor operations / ctseg {:.2}x | rel. L2 diff {err:.1e}",
                t_ops / t_own,
            );
        }
    }
    Ok(())
}
