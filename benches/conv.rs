//! `cargo bench --bench conv`: one 3×3 convolution layer of the livermask U-Net, forward and
//! backward (input, weight and bias gradients), on the CPU backend, two ways: burn's `conv2d`
//! (flex: tiled im2col + gemm forward; its backward is burn's generic one: a transposed
//! convolution for the input gradient and, for the weight gradient, a convolution of the input by
//! the output gradient used as a 240×240 kernel), and ctseg's own operation
//! ([`ctseg::model::cpu::conv`]: tiled im2col + gemm for all three). Both run the same
//! arithmetic; the bench checks they agree and prints median times with spread and GFLOP/s
//! (history in docs/cpu-notes.md).

use std::time::Instant;

use burn::tensor::module::conv2d;
use burn::tensor::ops::ConvOptions;
use burn::tensor::{Device, Tensor, TensorData};
use ctseg::backend::{self, BackendKind, DeviceRequest};
use ctseg::model::cpu::conv::{self as cpuconv, ConvShape, conv2d_same};
use ctseg::tensor_util::to_f32;
use ctseg::util::stats::spread;

/// Step times, and the input and weight gradients of the last repetition.
type Timed = (Vec<f64>, Vec<Vec<f32>>);

fn run(
    device: &Device,
    shape: [usize; 4],
    co: usize,
    ours: bool,
    reps: usize,
) -> Result<Timed, Box<dyn std::error::Error>> {
    let ad = device.clone().autodiff();
    let n: usize = shape.iter().product();
    let xs: Vec<f32> = (0..n)
        .map(|i| ((i * 7919) % 97) as f32 / 97.0 - 0.5)
        .collect();
    let ws: Vec<f32> = (0..co * shape[1] * 9)
        .map(|i| ((i * 104729) % 89) as f32 / 890.0 - 0.05)
        .collect();
    let mut times = Vec::new();
    let mut last = Vec::new();
    for _ in 0..reps {
        let x = Tensor::<4>::from_data(TensorData::new(xs.clone(), shape), &ad).require_grad();
        let w = Tensor::<4>::from_data(TensorData::new(ws.clone(), [co, shape[1], 3, 3]), &ad)
            .require_grad();
        device.sync()?;
        let t = Instant::now();
        let b = Tensor::<1>::zeros([co], &ad).require_grad();
        let y = if ours {
            conv2d_same(&x, &w, &b, false, false).ok_or("not the CPU device")?
        } else {
            conv2d(
                x.clone(),
                w.clone(),
                Some(b.clone()),
                ConvOptions::new([1, 1], [1, 1], [1, 1], 1),
            )
        };
        let grads = (y.clone() * y.clone()).sum().backward();
        let gx = x.grad(&grads).ok_or("no x grad")?;
        let gw = w.grad(&grads).ok_or("no w grad")?;
        let (gx, gw) = (to_f32(gx)?, to_f32(gw)?);
        times.push(t.elapsed().as_secs_f64());
        last = vec![gx, gw];
    }
    Ok((times, last))
}

fn rel_l2(a: &[f32], b: &[f32]) -> f64 {
    let num: f64 = a.iter().zip(b).map(|(p, q)| ((p - q) as f64).powi(2)).sum();
    let den: f64 = a.iter().map(|p| (*p as f64).powi(2)).sum();
    (num / den.max(1e-300)).sqrt()
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let threads: usize = std::env::var("CTSEG_BENCH_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let be = backend::open(&DeviceRequest {
        kind: BackendKind::Cpu,
        threads,
        adapter: None,
        gpu_conv: Default::default(),
        cooperative_matrices: true,
    })?;
    // livermask at width 32 and 64, batch 4: the first level (240²) and the bottleneck (15²).
    let cases = [
        ([4, 32, 240, 240], 32),
        ([4, 64, 240, 240], 64),
        ([4, 256, 30, 30], 256),
        ([4, 512, 15, 15], 512),
    ];
    println!("{}", be.description);
    for (shape, co) in cases {
        let flop = 3.0 * 2.0 * (shape[0] * shape[2] * shape[3] * co * shape[1] * 9) as f64;
        let (t_burn, g_burn) = run(&be.device, shape, co, false, 4)?;
        let (t_cols, g_cols) = run(&be.device, shape, co, true, 4)?;
        let (sb, sc) = (spread(&t_burn[1..]), spread(&t_cols[1..]));
        println!(
            "{shape:?} -> {co}: burn conv2d {:.3} s [IQR {:.3}] {:.1} GFLOP/s | ctseg cpuconv {:.3} s [IQR {:.3}] {:.1} GFLOP/s | ratio {:.2} | rel. L2 diff x-grad {:.1e}, w-grad {:.1e}",
            sb.median,
            sb.iqr,
            flop / sb.median / 1e9,
            sc.median,
            sc.iqr,
            flop / sc.median / 1e9,
            sb.median / sc.median,
            rel_l2(&g_burn[0], &g_cols[0]),
            rel_l2(&g_burn[1], &g_cols[1]),
        );
        kernels_alone(shape, co);
    }
    Ok(())
}

/// The three cpuconv kernels on host slices, without burn around them: where the layer's time
/// goes, and GFLOP/s each (one product of 2·b·h·w·c_out·c_in·9 flop per kernel).
fn kernels_alone(shape: [usize; 4], co: usize) {
    let s = ConvShape {
        batch: shape[0],
        c_in: shape[1],
        c_out: co,
        h: shape[2],
        w: shape[3],
        k: 3,
    };
    let x: Vec<f32> = (0..shape.iter().product::<usize>())
        .map(|i| ((i % 97) as f32) / 97.0)
        .collect();
    let w: Vec<f32> = (0..co * shape[1] * 9)
        .map(|i| ((i % 89) as f32) / 890.0)
        .collect();
    let flop = 2.0 * (shape[0] * shape[2] * shape[3] * co * shape[1] * 9) as f64;
    let time = |f: &mut dyn FnMut()| {
        let t: Vec<f64> = (0..5)
            .map(|_| {
                let t = Instant::now();
                f();
                t.elapsed().as_secs_f64()
            })
            .collect();
        spread(&t[1..]).median
    };
    let mut y = Vec::new();
    let tf = time(&mut || y = cpuconv::forward(&x, &w, None, &s));
    let tx = time(&mut || drop(cpuconv::input_grad(&y, &w, &s)));
    let tw = time(&mut || drop(cpuconv::weight_bias_grad(&x, &y, &s)));
    println!(
        "    kernels alone: forward {:.3} s ({:.0} GFLOP/s), input grad {:.3} s ({:.0}), weight+bias grad {:.3} s ({:.0})",
        tf,
        flop / tf / 1e9,
        tx,
        flop / tx / 1e9,
        tw,
        flop / tw / 1e9
    );
}
