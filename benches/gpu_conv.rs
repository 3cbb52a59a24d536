//! `cargo bench --bench gpu_conv`: the forward of one 3×3 convolution + ReLU of the livermask
//! U-Net on the GPU adapter (lavapipe here; the H200 through scripts/gpu_device_check.sh), three
//! ways: burn's `conv2d` as ctseg calls it today (`model::ops::conv`, split into row chunks on
//! loop-capped adapters), burn's `conv2d` in one call, and ctseg's own kernel
//! (`model::gpu_conv`, shaders/conv3x3_forward.wgsl). Median of warm repetitions with the device
//! synchronised, GFLOP/s, the ratio to today's path, and the kernel's agreement with it.

use std::time::Instant;

use burn::tensor::activation::relu;
use burn::tensor::module::conv2d;
use burn::tensor::ops::ConvOptions;
use burn::tensor::{Tensor, TensorData};
use ctseg::backend::{self, Backend, BackendKind, DeviceRequest};
use ctseg::model::gpu_conv::conv3x3_forward;
use ctseg::model::ops;
use ctseg::tensor_util::to_f32;
use ctseg::util::stats::spread;

/// Median seconds of `f` over `reps` warm repetitions (one untimed first), and its last output.
fn time(be: &Backend, reps: usize, f: &dyn Fn() -> Tensor<4>) -> Result<(f64, Vec<f32>), String> {
    let mut times = Vec::new();
    let mut out = Vec::new();
    for i in 0..=reps {
        be.device.sync().map_err(|e| format!("{e:?}"))?;
        let t = Instant::now();
        let y = f();
        be.device.sync().map_err(|e| format!("{e:?}"))?;
        if i > 0 {
            times.push(t.elapsed().as_secs_f64());
        }
        if i == reps {
            out = to_f32(y).map_err(|e| e.to_string())?;
        }
    }
    Ok((spread(&times).median, out))
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
    })?;
    println!("{}", be.description);
    // livermask at batch 4: width 32's first level, its third level and bottleneck input, and
    // width 64's first level.
    let cases = [
        ([4, 32, 240, 240], 32),
        ([4, 64, 120, 120], 64),
        ([4, 256, 30, 30], 256),
        ([4, 64, 240, 240], 64),
    ];
    for (shape, co) in cases {
        let n: usize = shape.iter().product();
        let xs: Vec<f32> = (0..n)
            .map(|i| ((i * 7919) % 97) as f32 / 97.0 - 0.5)
            .collect();
        let ws: Vec<f32> = (0..co * shape[1] * 9)
            .map(|i| ((i * 104729) % 89) as f32 / 890.0 - 0.05)
            .collect();
        let x = Tensor::<4>::from_data(TensorData::new(xs, shape), &be.device);
        let w = Tensor::<4>::from_data(TensorData::new(ws, [co, shape[1], 3, 3]), &be.device);
        let b = Tensor::<1>::zeros([co], &be.device);
        let caps = be.caps;
        let flop = 2.0 * (shape[0] * shape[2] * shape[3] * co * shape[1] * 9) as f64;
        let (t_today, y_today) = time(&be, reps, &|| {
            ops::conv(x.clone(), w.clone(), b.clone(), true, &caps)
        })?;
        let (t_one, _) = time(&be, reps, &|| {
            relu(conv2d(
                x.clone(),
                w.clone(),
                Some(b.clone()),
                ConvOptions::new([1, 1], [1, 1], [1, 1], 1),
            ))
        })?;
        let (t_own, y_own) = time(&be, reps, &|| {
            conv3x3_forward(&x, &w, &b, true).expect("the kernel applies on the adapter")
        })?;
        let err = ctseg::verify::rel_l2(&y_own, &y_today);
        println!(
            "{shape:?} -> {co}: ops::conv {:.4} s ({:.1} GFLOP/s) | burn conv2d one call {:.4} s ({:.1}) | ctseg kernel {:.4} s ({:.1}) | today / kernel {:.2}x | rel. L2 diff {err:.1e}",
            t_today,
            flop / t_today / 1e9,
            t_one,
            flop / t_one / 1e9,
            t_own,
            flop / t_own / 1e9,
            t_today / t_own,
        );
    }
    Ok(())
}
