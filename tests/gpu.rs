//! The GPU backend (burn wgpu) against the CPU backend (burn flex) at realistic shapes.
//!
//! CI runs these on Mesa's lavapipe, a software Vulkan adapter that stops every shader loop
//! after 65,535 iterations. burn's long reductions (BatchNorm statistics over batch·H·W, conv
//! weight and bias gradients) then come out silently wrong, which is how burn's fused
//! `batch_norm_train` returned a zero mean for some channels at [4, 32, 240, 240] before this
//! project started. ctseg detects the cap at start-up (`backend::long_loops_work`) and splits
//! convolutions into chunks; its BatchNorm reduces one axis at a time. These tests would catch
//! any of that regressing.
//!
//! Without a Vulkan/GL adapter the tests print why and pass, unless `CI=true` or
//! `CTSEG_REQUIRE_GPU=1` (`.ci/run` and `scripts/test` set them), in which case a missing adapter
//! fails them.
//!
//! A `spirv` build has no WGSL kernels: tests/spirv.rs covers it instead.
#![cfg(not(feature = "spirv"))]

mod common;

use burn::optim::GradientsParams;
use burn::tensor::{Device, Tensor, TensorData};
use ctseg::backend::{self, Backend};
use ctseg::model::gpu_conv::Operands;
use ctseg::model::layers::BatchNorm;
use ctseg::model::{DeviceCaps, GpuConv, Mode, Norm, UNetConfig, Upsampling, dice_loss};
use ctseg::rng::Rng;
use ctseg::tensor_util::to_f32;
use ctseg::train::flat::{self, Select};
use ctseg::verify;

fn gpu() -> Option<Backend> {
    match backend::open(&common::gpu_request()) {
        Ok(b) => Some(b),
        Err(e) => {
            // In CI (`.ci/run` sets CI=true, `scripts/test` CTSEG_REQUIRE_GPU=1) a GPU test runs
            // or fails, never skips.
            if common::gpu_required() {
                panic!("CI or CTSEG_REQUIRE_GPU=1, but the GPU backend does not open: {e}");
            }
            eprintln!("skipped: no GPU adapter ({e})");
            None
        }
    }
}

/// [`gpu`] on an adapter with cooperative matrices, for test `name`: this process's adapter if it
/// has them; otherwise the test runs again on scripts/lavapipe_coop.sh's lavapipe
/// ([`common::cooperative_matrices_here`]) and this is `None`.
fn coop_gpu(name: &str) -> Option<Backend> {
    let be = gpu()?;
    common::cooperative_matrices_here(name, be.caps.coop.is_some()).then_some(be)
}

/// Whether this process's GPU adapter has cooperative matrices ctseg's kernels use.
fn coop_here() -> bool {
    gpu().is_some_and(|be| be.caps.coop.is_some())
}

fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    verify::rel_l2(a, b)
}

#[test]
fn long_loop_cap_is_detected_consistently() {
    let Some(be) = gpu() else { return };
    // A long row sum either works, or the adapter is flagged and convolutions get chunked.
    let works = backend::long_loops_work(&be.device);
    assert_eq!(
        be.caps.shader_loop_cap.is_none(),
        works,
        "{}",
        be.description
    );
    eprintln!(
        "{}: long loops {}",
        be.description,
        if works { "work" } else { "are capped" }
    );
}

#[test]
fn batch_norm_statistics_match_cpu_at_realistic_shape() {
    let Some(be) = gpu() else { return };
    // [4, 32, 240, 240]: each channel's statistics reduce 230,400 values — the shape at which
    // burn's fused batch_norm_train returned wrong statistics on lavapipe.
    let shape = [4, 32, 240, 240];
    let n: usize = shape.iter().product();
    let mut r = Rng::new(21);
    let x: Vec<f32> = (0..n)
        .map(|i| (((i / (240 * 240)) % 32) as f64 + 5.0 * r.normal()) as f32)
        .collect();
    let run = |device: &Device| {
        let bn = BatchNorm::new(32, 0.9, 1e-3, device);
        let y = bn.forward_train(Tensor::from_data(TensorData::new(x.clone(), shape), device));
        let y = to_f32(y).expect("y");
        let m = to_f32(bn.running_mean.value()).expect("mean");
        let v = to_f32(bn.running_var.value()).expect("var");
        (y, m, v)
    };
    let (yc, mc, vc) = run(&Device::flex().autodiff());
    let (yg, mg, vg) = run(&be.device.clone().autodiff());
    // f32 sums of 230,400 values in different orders: relative 1e-5 is ~100 ulp of slack.
    assert!(
        rel_err(&mc, &mg) < 1e-5,
        "running mean: cpu {mc:?} gpu {mg:?}"
    );
    assert!(
        rel_err(&vc, &vg) < 1e-5,
        "running var: cpu {vc:?} gpu {vg:?}"
    );
    assert!(rel_err(&yc, &yg) < 1e-5, "normalised output differs");
}

/// Training-mode batch normalisation + spatial dropout of `x` `[b, c, h, w]` (channel ch's
/// values around `centre` + 3·(ch mod 11), spread 5) on `device` with every fifth plane dropped: the output, the
/// mean, the biased variance, and the gradients of x, γ and β under `sum(y · r)`. On the CPU
/// device through ctseg's CPU kernel (`model::cpu::norm`, pinned there to burn's autodiff of
/// the tensor-operation formula); on a wgpu device through ctseg's kernels
/// (`model::gpu_norm`), which must cover the shape.
fn norm_and_grads(device: &Device, shape: [usize; 4], centre: f64) -> [Vec<f32>; 6] {
    use ctseg::model::{cpu, gpu_norm};
    let [b, c, h, w] = shape;
    let mut rng = Rng::new(5);
    let x: Vec<f32> = (0..b * c * h * w)
        .map(|i| (centre + 3.0 * (((i / (h * w)) % c) % 11) as f64 + 5.0 * rng.normal()) as f32)
        .collect();
    let r: Vec<f32> = (0..x.len()).map(|_| rng.normal() as f32).collect();
    let mask: Vec<f32> = (0..b * c)
        .map(|p| if p % 5 == 0 { 0.0 } else { 1.25 })
        .collect();
    let ad = device.clone().autodiff();
    let x = Tensor::<4>::from_data(TensorData::new(x, shape), &ad).require_grad();
    let param = |v: Vec<f32>| Tensor::<1>::from_data(TensorData::new(v, [c]), &ad).require_grad();
    let gamma = param((0..c).map(|i| 0.5 + (i % 7) as f32 / 7.0).collect());
    let beta = param((0..c).map(|i| (i % 5) as f32 / 10.0 - 0.2).collect());
    let (y, mean, var) = if *device == Device::flex() {
        cpu::norm::batch_norm_train(&x, &gamma, &beta, 1e-3, Some(mask))
    } else {
        gpu_norm::batch_norm_train(&x, &gamma, &beta, 1e-3, Some(&mask))
    }
    .expect("ctseg's kernels cover the shape");
    let r = Tensor::<4>::from_data(TensorData::new(r, shape), &ad);
    let grads = (y.clone() * r).sum().backward();
    let v1 = |t: Option<Tensor<1>>| to_f32(t.expect("gradient")).expect("values");
    [
        to_f32(y.without_autodiff()).expect("y"),
        to_f32(mean).expect("mean"),
        to_f32(var).expect("var"),
        to_f32(x.grad(&grads).expect("dx")).expect("dx"),
        v1(gamma.grad(&grads)),
        v1(beta.grad(&grads)),
    ]
}

#[test]
fn own_batch_norm_and_its_gradients_match_the_cpu() {
    let Some(be) = gpu() else { return };
    // Shapes: one slice with a partial workgroup; ten slices, the last one partial; livermask's
    // first level at batch 4 (230,400 values per channel, 32 slices: the shape at which burn's
    // fused batch_norm_train failed on lavapipe); a deep level with more channels than a
    // workgroup has invocations; and means a thousand times the spread.
    for (shape, centre) in [
        ([3, 5, 9, 11], 0.0),
        ([4, 3, 100, 100], 0.0),
        ([4, 32, 240, 240], 0.0),
        ([2, 300, 6, 6], 0.0),
        ([4, 3, 100, 100], 5000.0),
    ] {
        let cpu = norm_and_grads(&Device::flex(), shape, centre);
        let gpu = norm_and_grads(&be.device, shape, centre);
        for (name, c, g) in [
            "output",
            "mean",
            "variance",
            "input grad",
            "γ grad",
            "β grad",
        ]
        .iter()
        .zip(&cpu)
        .zip(&gpu)
        .map(|((n, c), g)| (n, c, g))
        {
            // The CPU sums in float64, the GPU in f32 trees of slices; the largest difference
            // measured on lavapipe (Mesa 22 and 26) was 2.2e-7 (livermask's shape, γ grad).
            let err = rel_err(c, g);
            eprintln!("{shape:?} around {centre}: {name} relative error {err:.1e}");
            assert!(
                err < 2e-6,
                "{shape:?} around {centre}: {name} relative error {err:e}"
            );
        }
    }
}

fn grads_of(
    be_device: &Device,
    caps: DeviceCaps,
    cfg: &UNetConfig,
    b: usize,
) -> (f32, Vec<f32>, Vec<usize>) {
    let ad = be_device.clone().autodiff();
    let model = cfg.init(3, &ad).with_caps(caps);
    let n = cfg.input_size;
    let x: Vec<f32> = (0..b * n * n)
        .map(|j| ((j as f64 * 0.013).sin() * 0.5 + 0.5) as f32)
        .collect();
    let y: Vec<f32> = (0..b * 3 * n * n)
        .map(|j| if (j / 7) % 3 == 0 { 1.0 } else { 0.0 })
        .collect();
    let x = Tensor::<4>::from_data(TensorData::new(x, [b, 1, n, n]), &ad);
    let y = Tensor::<4>::from_data(TensorData::new(y, [b, 3, n, n]), &ad);
    let loss = dice_loss(
        model.forward(
            x,
            Mode::Train {
                seed: 1,
                step: 0,
                stream: 0,
            },
        ),
        y,
        0.0,
    );
    let lv = to_f32(loss.clone()).expect("loss")[0];
    let grads = GradientsParams::from_grads(loss.backward(), &model);
    let g = flat::flatten_grads(&model, &grads).expect("grads");
    let lens = flat::layout(&model, Select::Trainable)
        .iter()
        .map(|s| s.len)
        .collect();
    (lv, g, lens)
}

/// livermask's resolution and depth 2, width 4: the top level's contractions at batch 4 cover
/// 230,400 values (beyond lavapipe's loop cap), and lavapipe runs it in seconds.
fn narrow_unet_240() -> UNetConfig {
    UNetConfig {
        width: 4,
        depth: 2,
        input_size: 240,
        classes: 3,
        upsampling: Upsampling::Nearest,
        dropout: 0.0,
        norm: Norm::Batch,
        bn_momentum: 0.9,
        bn_epsilon: 1e-3,
    }
}

#[test]
fn unet_loss_and_gradients_match_cpu_at_240() {
    let Some(be) = gpu() else { return };
    let cfg = narrow_unet_240();
    // Per parameter tensor, the relative L2 error of the GPU gradient against the CPU's, next
    // to the CPU's own f32 noise (the transposed problem; see `verify`). Measured on lavapipe with
    // chunking: at most 2.2e-4; without chunking most tensors were off by 50–250 %.
    let v = verify::compare(&cfg, &be.device, be.caps, 4).expect("compare");
    eprintln!("{}\n{}", be.description, v.table());
    assert!(v.passes(), "{}\n{}", be.description, v.table());
    if be.caps.shader_loop_cap.is_some() {
        // The check has teeth: on a loop-capped adapter the unchunked convolutions' gradients
        // are wrong, and the comparison must say so.
        let broken = verify::compare(&cfg, &be.device, DeviceCaps::default(), 4).expect("compare");
        eprintln!("unchunked:\n{}", broken.table());
        assert!(
            !broken.passes(),
            "unchunked gradients passed:\n{}",
            broken.table()
        );
    }
}

#[test]
fn transposed_upsampling_and_no_norm_match_cpu() {
    let Some(be) = gpu() else { return };
    let cfg = UNetConfig {
        width: 4,
        depth: 2,
        input_size: 96,
        classes: 3,
        upsampling: Upsampling::Transposed,
        dropout: 0.0,
        norm: Norm::None,
        bn_momentum: 0.9,
        bn_epsilon: 1e-3,
    };
    let (lc, gc, _) = grads_of(&Device::flex(), DeviceCaps::default(), &cfg, 4);
    let (lg, gg, _) = grads_of(&be.device, be.caps, &cfg, 4);
    assert!(((lc - lg) / lc).abs() < 1e-5, "loss cpu {lc} gpu {lg}");
    assert!(rel_err(&gc, &gg) < 1e-3, "gradients differ");
}

/// The losses of `steps` steps of the trainer's own step (ctseg::train::Stepper) from a fresh
/// model of `cfg` on `be`'s device, all on `batch`, optionally watched by `probe`.
fn step_losses(
    be: &Backend,
    cfg: &ctseg::config::RunConfig,
    batch: &ctseg::data::HostBatch,
    steps: u64,
    probe: Option<&dyn ctseg::train::StepProbe>,
) -> Vec<f64> {
    let ad = be.device.clone().autodiff();
    let mut state = ctseg::train::TrainState::fresh(cfg, &ad, be.caps);
    let stepper = ctseg::train::Stepper::new(cfg, &state.model, &be.device, &ctseg::comm::Local);
    let stepper = match probe {
        Some(p) => stepper.with_probe(p),
        None => stepper,
    };
    let mut losses = Vec::new();
    for step in 0..steps {
        let (s, out) = stepper
            .step(state, std::slice::from_ref(batch), step, 1e-2)
            .expect("step");
        state = s;
        losses.push(out.loss);
    }
    losses
}

/// The built-in config at width 4 and `size`², and one batch of its first `images` phantom
/// slices.
fn tiny_batch(size: usize, images: usize) -> (ctseg::config::RunConfig, ctseg::data::HostBatch) {
    let mut cfg = ctseg::config::RunConfig::load(None).expect("quick config");
    cfg.model.width = 4;
    cfg.model.input_size = size;
    let ds = ctseg::data::Dataset::phantom(cfg.seed, 1, images, size, 1);
    let idx: Vec<usize> = (0..images).collect();
    let batch = ctseg::data::make_batch(&ds, &cfg.data, 3, &idx);
    (cfg, batch)
}

#[test]
fn gpu_training_reduces_the_loss() {
    let Some(be) = gpu() else { return };
    // The trainer's own step on the adapter, 8 steps on one batch.
    let (cfg, batch) = tiny_batch(64, 4);
    let losses = step_losses(&be, &cfg, &batch, 8, None);
    assert!(
        losses[7] < losses[0] - 0.05,
        "loss did not fall on {}: {losses:?}",
        be.description
    );
}

/// f32 values that exercise every branch of the fp16 packing: zeros, normals, ties at several
/// exponents, the overflow edge (65504 is the largest half, 65520 rounds to Inf), the subnormal
/// range and its rounding ties, values below half the smallest subnormal, f32 subnormals,
/// Inf and NaN — plus random bit patterns.
fn fp16_probe_values() -> Vec<f32> {
    let mut v = vec![
        0.0f32,
        -0.0,
        1.0,
        -2.5,
        0.1,
        65504.0,
        65519.99,
        65520.0,
        -65520.0,
        1e30,
        f32::INFINITY,
        f32::NEG_INFINITY,
        6.103_515_6e-5, // smallest normal half, 2^-14
        6.097_555e-5,   // just below it: largest subnormal region
        5.960_464_5e-8, // smallest subnormal half, 2^-24
        2.980_232_2e-8, // 2^-25: a tie between 0 and 2^-24, rounds to even (0)
        2.980_233e-8,   // just above the tie: rounds up
        8.940_697e-8,   // 1.5·2^-24: a tie, rounds to even (2·2^-24)
        1e-10,
        1e-40, // f32 subnormal
        -1e-45,
        1.000_488_3, // 1 + 2^-11: a tie between 1 and 1 + 2^-10, rounds to even (1)
        1.001_464_8, // 1 + 3·2^-11: a tie, rounds up to 1 + 2^-9
    ];
    let mut rng = ctseg::rng::Rng::new(7);
    for _ in 0..20_000 {
        let bits = (rng.next_u64() >> 32) as u32;
        let x = f32::from_bits(bits);
        if !x.is_nan() {
            v.push(x);
        }
    }
    for _ in 0..20_000 {
        v.push((rng.normal() * 1e-3) as f32);
    }
    v.push(0.75); // odd length: the last word holds one value
    v
}

#[test]
fn fp16_pack_kernel_matches_the_cpu_reference_bit_for_bit() {
    let Some(be) = gpu() else { return };
    let mut x = fp16_probe_values();
    // Two NaNs with payloads: the kernel keeps them quiet with the top mantissa bits, like the
    // `half` crate.
    x.push(f32::from_bits(0x7fc0_0001));
    x.push(f32::from_bits(0xff80_2000));
    let t = Tensor::<1>::from_data(TensorData::new(x.clone(), [x.len()]), &be.device);
    let gpu_bits = ctseg::fp16::pack_on_device(t).expect("pack kernel runs");
    let cpu_bits = ctseg::fp16::to_f16(&x);
    assert_eq!(gpu_bits.len(), cpu_bits.len());
    let bad: Vec<_> = x
        .iter()
        .zip(gpu_bits.iter().zip(&cpu_bits))
        .filter(|(_, (g, c))| g != c)
        .take(5)
        .map(|(v, (g, c))| format!("{v:e} ({:#010x}): gpu {g:#06x} cpu {c:#06x}", v.to_bits()))
        .collect();
    assert!(bad.is_empty(), "pack kernel differs: {bad:?}");
}

#[test]
fn fp16_unpack_kernel_matches_the_cpu_reference_bit_for_bit() {
    let Some(be) = gpu() else { return };
    // Every finite half bit pattern (NaNs excluded: a shader may quiet them), odd count.
    let bits: Vec<u16> = (0..=u16::MAX)
        .filter(|&b| (b >> 10) & 0x1f != 0x1f || b & 0x3ff == 0)
        .skip(1)
        .collect();
    assert_eq!(bits.len() % 2, 1);
    for scale in [1.0f32, 0.5, 0.25, 1.0 / 3.0] {
        let t = ctseg::fp16::unpack_on_device(&bits, scale, &be.device).expect("unpack runs");
        let gpu = to_f32(t).unwrap();
        let cpu: Vec<f32> = ctseg::fp16::from_f16(&bits)
            .into_iter()
            .map(|v| v * scale)
            .collect();
        let bad: Vec<_> = bits
            .iter()
            .zip(gpu.iter().zip(&cpu))
            .filter(|(_, (g, c))| g.to_bits() != c.to_bits())
            .take(5)
            .map(|(b, (g, c))| format!("{b:#06x} x {scale}: gpu {g:e} cpu {c:e}"))
            .collect();
        assert!(bad.is_empty(), "unpack kernel differs: {bad:?}");
    }
    // The device tensor behaves like any other: arithmetic on it goes through burn's fusion.
    let t = ctseg::fp16::unpack_on_device(&[0x3c00, 0x4000, 0xc200], 1.0, &be.device).unwrap();
    assert_eq!(to_f32(t * 2.0).unwrap(), vec![2.0, 4.0, -6.0]);
}

/// The profile of `steps` steps of a tiny U-Net on the default adapter, from the binary in its
/// own process: the launch observer sees every launch of its process, so the other tests of this
/// file must not share it. The built-in config, shrunk, so that no file is needed
/// (scripts/gpu_device_check.sh runs these tests on another machine).
fn tiny_gpu_profile(steps: usize, extra: &[&str]) -> serde_json::Value {
    let args = tiny_profile_args(steps, extra);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    only_profile(&common::ok(common::ctseg(&args)))
}

/// The arguments of [`tiny_gpu_profile`].
fn tiny_profile_args(steps: usize, extra: &[&str]) -> Vec<String> {
    let steps = steps.to_string();
    let mut args = vec![
        "bench",
        "step",
        "--backend",
        "gpu",
        "--width",
        "4",
        "--size",
        "32",
        "--batch-size",
        "2",
        "--warmup",
        "1",
        "--steps",
        "1",
        "--profile",
        &steps,
        "--json",
    ];
    args.extend_from_slice(extra);
    args.into_iter().map(String::from).collect()
}

/// The one profile `bench step --json` printed in `out`.
fn only_profile(out: &str) -> serde_json::Value {
    let mut profiles = common::bench_lines(out, "profile");
    assert_eq!(profiles.len(), 1, "{out}");
    profiles.remove(0)
}

/// Launches of `kernel` in `phase` of profile `p`, over its profiled steps.
fn launches(p: &serde_json::Value, phase: &str, kernel: &str) -> f64 {
    p["kernels"]
        .as_array()
        .expect("kernels")
        .iter()
        .filter(|k| k["phase"] == phase && k["kernel"] == kernel)
        .map(|k| k["launches"].as_f64().unwrap_or(f64::NAN))
        .sum()
}

#[test]
fn step_profile_attributes_every_kernel_launch_to_a_phase_and_times_it() {
    if gpu().is_none() {
        return;
    }
    let p = &tiny_gpu_profile(2, &[]);
    let f = |v: &serde_json::Value| v.as_f64().unwrap_or(f64::NAN);
    let phases = p["phases"].as_array().expect("phases");
    let phase = |name: &str| {
        phases
            .iter()
            .find(|r| r["phase"] == name)
            .unwrap_or_else(|| panic!("no {name} phase in {p}"))
    };
    // Forward, backward and the optimiser each launch kernels on a GPU; with one micro-batch
    // and one rank, the micro-batch mean and the exchange launch none.
    for name in ["forward", "backward", "optimiser"] {
        assert!(f(&phase(name)["launches"]) >= 1.0, "{name}: {p}");
    }
    for name in ["micro_mean", "exchange"] {
        assert_eq!(f(&phase(name)["launches"]), 0.0, "{name}: {p}");
    }
    // Every launch was timed, and the kernel rows add up to the phases' launch counts.
    let per_step = f(&p["launches_per_step"]);
    assert_eq!(p["untimed"], 0, "{p}");
    assert_eq!(
        f(&p["timed_on_device"]) + f(&p["timed_on_host"]),
        per_step * f(&p["steps"])
    );
    let by_kernel: f64 = p["kernels"]
        .as_array()
        .expect("kernels")
        .iter()
        .map(|k| f(&k["launches"]))
        .sum();
    let by_phase: f64 = phases.iter().map(|r| f(&r["launches"])).sum();
    assert!((by_kernel - per_step).abs() < 1e-9, "{p}");
    assert!((by_phase - per_step).abs() < 1e-9, "{p}");
    // The phases run one after another with the device waited for in between, so the kernels
    // counted in a phase ran inside its wall time (a kernel counted in the wrong phase, or timed
    // twice, would break this).
    for r in phases {
        assert!(f(&r["kernel_s"]) <= f(&r["wall_s"]) * 1.05 + 1e-4, "{r}");
    }
}

#[test]
fn batch_norm_runs_on_own_kernels_in_the_training_step() {
    if gpu().is_none() {
        return;
    }
    // Every batch normalisation of the trainer's step is ctseg's three launches forward and
    // three backward (model::gpu_norm), on every adapter (its loops are short), in place of
    // about 50 launches of tensor operations each.
    // (ctseg's convolutions too, whose launches are one per layer on every adapter.)
    let p = &tiny_gpu_profile(1, &["--gpu-conv", "wgsl"]);
    let launches = |phase: &str, kernel: &str| launches(p, phase, kernel);
    let norms = launches("forward", "batch_norm_stats");
    // Width 4, the built-in config's depth: a normalisation before every 3×3 convolution.
    assert!(norms >= 6.0, "{p}");
    assert_eq!(norms, launches("forward", "conv3x3_forward"), "{p}");
    for (phase, kernel) in [
        ("forward", "batch_norm_finish_forward"),
        ("forward", "batch_norm_apply"),
        ("backward", "batch_norm_grad_sums"),
        ("backward", "batch_norm_finish_backward"),
    ] {
        assert_eq!(launches(phase, kernel), norms, "{kernel}: {p}");
    }
    // The first normalisation's input is the image: it needs no input gradient.
    assert_eq!(launches("backward", "batch_norm_apply"), norms - 1.0, "{p}");
}

#[test]
fn profiling_a_step_changes_its_losses_only_by_rounding() {
    let Some(be) = gpu() else { return };
    // The probe only waits for the device between phases; the operations are the same. The
    // losses still differ by rounding after the first step (measured on lavapipe: identical,
    // then 4.8e-7 and 1.5e-6 relative apart), most likely because burn's fusion groups the
    // queued operations differently when they are flushed at every boundary.
    let (cfg, batch) = tiny_batch(32, 2);
    struct Quiet;
    impl ctseg::train::StepProbe for Quiet {
        fn issued(&self) {}
        fn enter(&self, _: Option<ctseg::train::Phase>) {}
    }
    // A first pass lets burn's autotuner settle (while it tunes, a result may come from any
    // candidate kernel); the compared passes then run the same kernels.
    let _ = step_losses(&be, &cfg, &batch, 3, None);
    let plain = step_losses(&be, &cfg, &batch, 3, None);
    let probed = step_losses(&be, &cfg, &batch, 3, Some(&Quiet));
    assert_eq!(plain[0], probed[0]);
    for (a, b) in plain.iter().zip(&probed) {
        assert!(((a - b) / a).abs() < 1e-5, "{plain:?} vs {probed:?}");
    }
}

#[test]
fn adapters_report_timestamp_queries_as_the_profiler_finds_them() {
    if gpu().is_none() {
        return;
    }
    // `ctseg adapters` reads the adapter's features from wgpu; cubecl, independently, times
    // kernels with timestamp queries exactly when the adapter has them. The default adapter is
    // the first listed.
    let listed = common::ok(common::ctseg(&["adapters"]));
    let caps = listed
        .lines()
        .skip_while(|l| !l.trim_start().starts_with("[0]"))
        .nth(1)
        .unwrap_or_else(|| panic!("no capabilities line under [0]:\n{listed}"));
    let timestamps = if caps.contains("timestamp queries yes") {
        true
    } else if caps.contains("timestamp queries no") {
        false
    } else {
        panic!("no timestamp-query capability in: {caps}")
    };
    let p = &tiny_gpu_profile(1, &[]);
    let on_device = p["timed_on_device"].as_u64().expect("timed_on_device");
    let on_host = p["timed_on_host"].as_u64().expect("timed_on_host");
    assert!(on_device + on_host > 0, "{p}");
    if timestamps {
        assert_eq!(on_host, 0, "{caps}: {p}");
    } else {
        assert_eq!(on_device, 0, "{caps}: {p}");
    }
}

/// ctseg's 3×3 convolution kernel against burn's `conv2d` (+ ReLU) on the CPU, at `shape` with
/// `c_out` outputs: the relative L2 error.
fn own_conv_error(be: &Backend, shape: [usize; 4], c_out: usize, relu: bool) -> f64 {
    use burn::tensor::module::conv2d;
    use burn::tensor::ops::ConvOptions;
    let mut r = Rng::new(5);
    let mut values = |n: usize| (0..n).map(|_| r.normal() as f32).collect::<Vec<f32>>();
    let xs = values(shape.iter().product());
    let ws = values(c_out * shape[1] * 9);
    let bs = values(c_out);
    let tensors = |d: &Device| {
        (
            Tensor::<4>::from_data(TensorData::new(xs.clone(), shape), d),
            Tensor::<4>::from_data(TensorData::new(ws.clone(), [c_out, shape[1], 3, 3]), d),
            Tensor::<1>::from_data(TensorData::new(bs.clone(), [c_out]), d),
        )
    };
    let (x, w, b) = tensors(&Device::flex());
    let y = conv2d(x, w, Some(b), ConvOptions::new([1, 1], [1, 1], [1, 1], 1));
    let y = if relu {
        burn::tensor::activation::relu(y)
    } else {
        y
    };
    let (x, w, b) = tensors(&be.device);
    let own = ctseg::model::gpu_conv::conv3x3(&x, &w, &b, relu, Operands::F32)
        .expect("the kernel applies to f32 tensors on the adapter");
    rel_err(&to_f32(y).expect("cpu"), &to_f32(own).expect("gpu"))
}

#[test]
fn own_3x3_convolution_matches_burns_on_the_cpu() {
    let Some(be) = gpu() else { return };
    // Shapes with partial tiles in every direction (c_out 5 and 70 against tiles of 64, odd
    // image sides, a K of 9 against steps of 16), one input channel as the first layer has, and
    // a livermask-sized layer beyond lavapipe's loop cap for burn's own kernels.
    for (shape, c_out, relu) in [
        ([2, 3, 17, 19], 5, false),
        ([2, 3, 17, 19], 5, true),
        ([1, 1, 32, 32], 4, true),
        ([2, 16, 24, 24], 70, true),
        ([4, 8, 120, 120], 16, true),
    ] {
        let err = own_conv_error(&be, shape, c_out, relu);
        assert!(
            err < 1e-5,
            "{shape:?} → {c_out}, relu {relu}: relative error {err}"
        );
    }
}

/// [`verify::conv_and_grads`]; on the GPU with `--gpu-conv wgsl` or f16 operands, first
/// asserting that ctseg's kernels apply, so the comparison is of them (not of a fallback).
fn conv_and_grads(
    device: &Device,
    caps: DeviceCaps,
    shape: [usize; 4],
    c_out: usize,
    relu: bool,
    rounded: bool,
) -> [Vec<f32>; 4] {
    if (caps.gpu_conv == GpuConv::Wgsl || caps.f16_operands) && *device != Device::flex() {
        assert!(
            ctseg::model::gpu_conv::covers(device, shape, c_out),
            "{shape:?} → {c_out}"
        );
    }
    verify::conv_and_grads(device, caps, shape, c_out, relu, rounded).expect("convolution")
}

#[test]
fn own_3x3_convolution_gradients_match_the_cpu() {
    let Some(be) = gpu() else { return };
    let own = DeviceCaps {
        gpu_conv: GpuConv::Wgsl,
        ..be.caps
    };
    // Reference: the model's convolution on the CPU device, i.e. ctseg's CPU kernels (tested
    // against a float64 evaluation of the definition and against burn's conv2d in
    // src/model/cpu/conv.rs). Shapes: partial tiles in
    // every direction, one input channel, a weight-gradient reduction cut into many slices
    // (57,600 columns), a deep layer with few pixels and more channels than a tile, images
    // smaller than one staged step of 16 columns (which then spans several images and, at
    // width 1, 16 rows), a full 32-row tile (the input gradient's 32 channels) beside a
    // 64-row one with one row used past 32 (33 output channels), and partial 128 x 128 tiles of
    // 8 x 8 blocks in all three GEMMs (65 and 66 channels, 32,761 pixels: 256 column tiles, the
    // fewest that get them).
    for (shape, c_out, relu) in [
        ([2, 3, 17, 19], 5, false),
        ([2, 3, 17, 19], 5, true),
        ([1, 1, 32, 32], 4, true),
        ([2, 16, 24, 24], 70, true),
        ([4, 8, 120, 120], 16, true),
        ([2, 96, 6, 6], 80, false),
        ([5, 4, 3, 2], 7, true),
        ([3, 2, 7, 1], 3, false),
        ([2, 32, 9, 11], 33, true),
        ([1, 65, 181, 181], 66, true),
    ] {
        let cpu = conv_and_grads(
            &Device::flex(),
            DeviceCaps::default(),
            shape,
            c_out,
            relu,
            false,
        );
        let gpu = conv_and_grads(&be.device, own, shape, c_out, relu, false);
        for (name, c, g) in ["output", "input grad", "weight grad", "bias grad"]
            .iter()
            .zip(&cpu)
            .zip(&gpu)
            .map(|((n, c), g)| (n, c, g))
        {
            let err = rel_err(c, g);
            assert!(
                err < 1e-5,
                "{shape:?} → {c_out}, relu {relu}: {name} relative error {err}"
            );
        }
    }
}

#[test]
fn f16_operands_are_rounded_in_every_product_and_accumulated_in_f32() {
    let Some(be) = gpu() else { return };
    // In registers (shaders/gemm_tile.wgsl), whatever the adapter offers.
    let registers = DeviceCaps {
        f16_operands: true,
        coop: None,
        ..be.caps
    };
    assert_eq!(registers.conv_operands(3), Operands::F16);
    f16_products_equal_f32_products_of_rounded_operands(&be, registers);
}

#[test]
fn cooperative_matrices_compute_f16_products_accumulated_in_f32() {
    let Some(be) = coop_gpu("cooperative_matrices_compute_f16_products_accumulated_in_f32") else {
        return;
    };
    // The same numerics on the adapter's cooperative matrices (shaders/gemm_tile_coop.wgsl).
    let coop = DeviceCaps {
        f16_operands: true,
        ..be.caps
    };
    assert!(
        matches!(coop.conv_operands(3), Operands::Coop(_)),
        "{}",
        be.description
    );
    f16_products_equal_f32_products_of_rounded_operands(&be, coop);
}

#[test]
fn cooperative_matrices_agree_with_the_register_kernels_to_summation_order() {
    let Some(be) =
        coop_gpu("cooperative_matrices_agree_with_the_register_kernels_to_summation_order")
    else {
        return;
    };
    // The start-up check's step 2 (src/verify.rs): the same f16 operands, the same exact
    // products, only the f32 summation order differs, so the two agree to verify::REORDERED.
    let coop = DeviceCaps {
        f16_operands: true,
        ..be.caps
    };
    let registers = DeviceCaps { coop: None, ..coop };
    let diff = verify::conv_difference(&be.device, coop, registers).expect("compare");
    eprintln!("cooperative matrices against registers: {diff:.1e}");
    assert!(diff <= verify::REORDERED, "{diff}");
    // And the check can fail: against f32 operands, f16's rounding shows (2^-11 relative).
    let f32_operands = DeviceCaps {
        f16_operands: false,
        gpu_conv: GpuConv::Wgsl,
        ..registers
    };
    let off = verify::conv_difference(&be.device, coop, f32_operands).expect("compare");
    assert!(off > 10.0 * verify::REORDERED, "{off}");
}

/// The model's convolution on `be` with `mixed` (f16 operands) against the CPU's f32
/// convolution of operands rounded beforehand, forward and the three gradients.
fn f16_products_equal_f32_products_of_rounded_operands(be: &Backend, mixed: DeviceCaps) {
    // A product of two f16 values is exact in f32, so the kernels on f16 operands must equal an
    // f32 convolution of operands rounded to f16 beforehand (here: ctseg's CPU kernels, pinned
    // to a float64 evaluation and to burn's conv2d in src/model/cpu/conv.rs; rounding by
    // ctseg::fp16, itself bit-exact with numpy's float16 in src/fp16.rs's tests), up to the
    // f32 summation order, in the output and in all three gradients (whose operands include
    // the output gradient). And they must differ from the unrounded convolution by about f16's
    // relative precision (2^-11), or no rounding happened. Shapes: partial tiles, a tile's
    // worth of output channels and more, and more input channels than one reduction step.
    for (shape, c_out, relu) in [
        ([2, 1, 32, 32], 2, true),
        ([2, 3, 17, 19], 5, true),
        ([2, 16, 24, 24], 70, false),
        ([4, 8, 120, 120], 16, true),
        ([2, 96, 6, 6], 80, false),
    ] {
        let gpu = conv_and_grads(&be.device, mixed, shape, c_out, relu, false);
        let flex = Device::flex();
        let reference = conv_and_grads(&flex, DeviceCaps::default(), shape, c_out, relu, true);
        let unrounded = conv_and_grads(&flex, DeviceCaps::default(), shape, c_out, relu, false);
        for (i, name) in ["output", "input grad", "weight grad", "bias grad"]
            .iter()
            .enumerate()
        {
            let err = rel_err(&reference[i], &gpu[i]);
            let off = rel_err(&unrounded[i], &gpu[i]);
            eprintln!(
                "{shape:?} → {c_out} {name}: vs rounded operands {err:.1e}, vs f32 {off:.1e}"
            );
            assert!(
                err < 1e-5,
                "{shape:?} → {c_out}: {name} relative error {err}"
            );
            // The bias gradient is a sum of rounded output gradients whose rounding errors
            // largely cancel, so only the others must show the rounding.
            if *name != "bias grad" {
                assert!(
                    off > 2e-5,
                    "{shape:?} → {c_out}: {name} was not rounded ({off})"
                );
            }
        }
    }
}

#[test]
fn unet_with_own_convolutions_matches_cpu_at_240() {
    let Some(be) = gpu() else { return };
    // As unet_loss_and_gradients_match_cpu_at_240, every 3×3 convolution on ctseg's kernels:
    // no row chunks on a loop-capped adapter, since no kernel loop nears the cap.
    let cfg = narrow_unet_240();
    let caps = DeviceCaps {
        gpu_conv: GpuConv::Wgsl,
        ..be.caps
    };
    let v = verify::compare(&cfg, &be.device, caps, 4).expect("compare");
    eprintln!("{}\n{}", be.description, v.table());
    assert!(v.passes(), "{}\n{}", be.description, v.table());
}

#[test]
fn own_convolutions_replace_burns_in_the_training_step() {
    if gpu().is_none() {
        return;
    }
    // With --gpu-conv wgsl every 3×3 convolution of the trainer's step runs on ctseg's kernels,
    // forward and gradients; burn's convolution kernels remain only for the 1×1 output layer
    // (one forward, and in the backward its input gradient and weight gradient).
    let p = &tiny_gpu_profile(1, &["--gpu-conv", "wgsl"]);
    let launches = |phase: &str, kernel: &str| launches(p, phase, kernel);
    let convs = launches("forward", "conv3x3_forward");
    // Width 4, depth of the built-in config: two 3×3 convolutions per level and bottleneck.
    assert!(convs >= 6.0, "{p}");
    assert_eq!(launches("backward", "conv3x3_weight_grad"), convs, "{p}");
    assert_eq!(launches("backward", "sum_slices"), convs, "{p}");
    // Input gradients too: every block normalises before its convolution (the first block the
    // image), so every convolution's input depends on trainable parameters.
    assert_eq!(launches("backward", "conv3x3_forward"), convs, "{p}");
    assert_eq!(launches("forward", "DirectConv2dKernel"), 1.0, "{p}");
    let burn_backward = launches("backward", "DirectConv2dKernel")
        + launches("backward", "ConvTranspose2dDirectNhwcKernel");
    assert_eq!(burn_backward, 2.0, "{p}");
}

/// `ctseg train` on the tiny config on the GPU into `run` for `steps` steps, with `extra`
/// arguments and `env` variables, for `--gpu-conv`'s tests.
fn train_tiny_on_gpu(
    run: &std::path::Path,
    steps: &str,
    extra: &[&str],
    env: &[(&str, &str)],
) -> std::process::Output {
    let mut args = vec![
        "train",
        "--config",
        common::TINY,
        "--backend",
        "gpu",
        "--max-steps",
        steps,
        "--out",
        common::s(run),
    ];
    args.extend_from_slice(extra);
    common::ctseg_env(&args, env)
}

/// A U-Net of 32² at batch 2 and the training workload, for `--gpu-conv auto`'s tests.
fn small_conv_workload() -> (UNetConfig, ctseg::bench::conv_choice::ConvWorkload) {
    let model = UNetConfig {
        input_size: 32,
        ..narrow_unet_240()
    };
    let work = ctseg::bench::conv_choice::ConvWorkload {
        batch: 2,
        train: true,
    };
    (model, work)
}

#[test]
fn auto_times_every_layer_on_both_paths_and_decides_by_the_rule() {
    let Some(be) = gpu() else { return };
    use ctseg::bench::conv_choice;
    // Which path wins depends on the adapter (on lavapipe burn's, docs/gpu-notes.md): this
    // checks what was timed and that the rule (`decide`, unit-tested) made the choice.
    let (model, work) = small_conv_workload();
    let c = conv_choice::choose(&be, &model, 1, work, &ctseg::comm::Local, None)
        .expect("timed")
        .expect("an f32 WGSL backend offers the choice");
    assert_eq!(c.layers, conv_choice::layers(&model, 1, 2).len());
    assert_eq!((c.ranks, c.batch), (1, 2));
    assert!(c.burn_s > 0.0 && c.wgsl_s > 0.0, "{c:?}");
    assert_eq!(c.chosen, conv_choice::decide(c.burn_s, c.wgsl_s), "{c:?}");
}

#[test]
fn a_second_choice_on_the_same_adapter_reads_the_first_ones_timing() {
    let Some(be) = gpu() else { return };
    use ctseg::bench::conv_cache::Kept;
    use ctseg::bench::conv_choice;
    // The first choice times and keeps its totals; the second, on the same adapter, build and
    // workload, decides on the kept totals without timing (the same numbers, within the last
    // bit that serde_json's default float parser may round differently; which keys differ is
    // conv_cache's unit tests').
    let (model, work) = small_conv_workload();
    let d = tempfile::tempdir().expect("tmp");
    let kept = conv_choice::KeptTimings {
        dir: d.path(),
        reuse: true,
    };
    let choose = |work| {
        conv_choice::choose(&be, &model, 1, work, &ctseg::comm::Local, Some(kept))
            .expect("chosen")
            .expect("an f32 WGSL backend offers the choice")
    };
    let first = choose(work);
    let Some(Kept::Written { file }) = first.kept.clone() else {
        panic!("not kept: {first:?}")
    };
    let second = choose(work);
    assert_eq!(second.kept, Some(Kept::Read { file: file.clone() }));
    assert_eq!(second.chosen, first.chosen);
    for (kept, timed) in [(second.burn_s, first.burn_s), (second.wgsl_s, first.wgsl_s)] {
        assert!(
            (kept - timed).abs() <= 4.0 * f64::EPSILON * timed,
            "{second:?} {first:?}"
        );
    }
    assert!(
        second.describe().contains("timed by an earlier run"),
        "{second:?}"
    );
}

#[test]
fn retiming_replaces_the_kept_timing() {
    let Some(be) = gpu() else { return };
    use ctseg::bench::conv_cache::Kept;
    use ctseg::bench::conv_choice::{self, KeptTimings};
    // `--gpu-conv retime`: a timing is kept, yet the next choice times again and writes the
    // same file.
    let (model, work) = small_conv_workload();
    let d = tempfile::tempdir().expect("tmp");
    let choose = |reuse| {
        let kept = KeptTimings {
            dir: d.path(),
            reuse,
        };
        conv_choice::choose(&be, &model, 1, work, &ctseg::comm::Local, Some(kept))
            .expect("chosen")
            .and_then(|c| c.kept)
            .expect("kept")
    };
    let first = choose(true);
    let file = first.file().expect("written").to_path_buf();
    assert_eq!(choose(false), Kept::Written { file });
}

#[test]
// CTSEG_FAULT_INJECT acts only in builds with the `test-hooks` feature (src/faults.rs).
#[cfg(feature = "test-hooks")]
fn ctsegs_kernels_that_the_driver_cannot_build_leave_auto_on_burns() {
    if gpu().is_none() {
        return;
    }
    // CTSEG_FAULT_INJECT gives ctseg's convolution kernels a source the adapter's WGSL
    // compiler rejects, as a driver that cannot build them would. cubecl then skips their
    // launches and the device waits without complaint; the timing must still see the failure,
    // keep the run on burn's kernels with the reason, and burn's must then train on the same
    // device. `retime`: a timing kept by an earlier run would spare the kernels the trial.
    let d = tempfile::tempdir().expect("tmp");
    let run = d.path().join("run");
    let broken = [("CTSEG_FAULT_INJECT", "wgsl-conv:0:0")];
    let t = common::ok(train_tiny_on_gpu(
        &run,
        "2",
        &["--gpu-conv", "retime"],
        &broken,
    ));
    assert!(!t.contains("panicked"), "{t}");
    let sm = common::summary(&run);
    let c = sm.gpu_conv.expect("timed");
    assert_eq!(c.chosen, GpuConv::Burn, "{}", sm.device);
    let why = c.fallback.expect("a reason");
    assert!(why.contains("failed while timed"), "{why}");
    assert!(
        why.contains("reading a tensor back from the device"),
        "{why}"
    );
    let losses = common::losses(&run);
    assert_eq!(losses.len(), 2, "{losses:?}");
    assert!(losses.iter().all(|l| l.is_finite()), "{losses:?}");
}

#[test]
// CTSEG_FAULT_INJECT acts only in builds with the `test-hooks` feature (src/faults.rs).
#[cfg(feature = "test-hooks")]
fn ctsegs_kernels_that_the_driver_cannot_build_fail_gpu_conv_wgsl_at_start_up() {
    if gpu().is_none() {
        return;
    }
    // Asked for by name, kernels that cannot run fail the start-up check with what to do
    // instead, before the run directory is made.
    let d = tempfile::tempdir().expect("tmp");
    let run = d.path().join("run");
    let broken = [("CTSEG_FAULT_INJECT", "wgsl-conv:0:0")];
    let out = train_tiny_on_gpu(&run, "1", &["--gpu-conv", "wgsl"], &broken);
    common::fails_with(out, 1, &["start-up check could not run", "--gpu-conv burn"]);
    assert!(!run.exists());
}

#[test]
fn a_backend_switched_by_the_choice_runs_and_names_the_chosen_kernels() {
    let Some(be) = gpu() else { return };
    // Whatever was measured, the backend then carries the chosen path and says why; a
    // loop-capped adapter's note about burn's chunks goes with burn's kernels.
    for chosen in [GpuConv::Wgsl, GpuConv::Burn] {
        let c = ctseg::bench::conv_choice::ConvChoice {
            chosen,
            burn_s: 2.0,
            wgsl_s: 1.0,
            layers: 3,
            ranks: 1,
            batch: 2,
            fallback: None,
            kept: None,
        };
        let switched = be.clone().with_conv_choice(c.clone());
        let d = &switched.description;
        assert_eq!(switched.caps.gpu_conv, chosen);
        assert_eq!(switched.conv_choice.as_ref(), Some(&c));
        assert!(d.contains(&c.describe()), "{d}");
        assert!(d.contains(chosen.describe()), "{d}");
        assert_eq!(
            d.contains(GpuConv::Burn.describe()),
            chosen == GpuConv::Burn,
            "{d}"
        );
        let chunked = d.contains("split into exact chunks");
        assert_eq!(
            chunked,
            be.caps.shader_loop_cap.is_some() && chosen == GpuConv::Burn,
            "{d}"
        );
    }
}

#[test]
fn mixed_precision_leaves_nothing_to_choose() {
    let Some(be) = gpu() else { return };
    // Mixed precision runs every 3×3 convolution on ctseg's kernels whatever --gpu-conv says.
    let (model, work) = small_conv_workload();
    let mixed = ctseg::train::precision::apply(ctseg::train::precision::Precision::Mixed, be);
    let none =
        ctseg::bench::conv_choice::choose(&mixed, &model, 1, work, &ctseg::comm::Local, None)
            .expect("nothing to time");
    assert_eq!(none, None);
}

#[test]
fn a_training_run_records_how_its_convolution_kernels_were_chosen() {
    if gpu().is_none() {
        return;
    }
    // `--gpu-conv auto` (the default) records its measurement in summary.json and the device
    // line; a path given by name is used as given, without one.
    let d = tempfile::tempdir().expect("tmp");
    for (conv, recorded) in [("auto", true), ("burn", false)] {
        let run = d.path().join(conv);
        common::ok(train_tiny_on_gpu(&run, "1", &["--gpu-conv", conv], &[]));
        let sm = common::summary(&run);
        assert_eq!(sm.gpu_conv.is_some(), recorded, "{conv}: {}", sm.device);
        assert_eq!(
            sm.device.contains("chosen by --gpu-conv auto"),
            recorded,
            "{}",
            sm.device
        );
        if let Some(c) = sm.gpu_conv {
            assert!(sm.device.contains(c.chosen.describe()), "{}", sm.device);
        }
    }
}

#[test]
fn a_second_training_run_decides_on_the_timing_the_first_kept() {
    if gpu().is_none() {
        return;
    }
    // The kernel cache directory is the environment's: the first run reads or writes the
    // timing there, the second must read that file.
    let d = tempfile::tempdir().expect("tmp");
    let train = |name: &str| {
        let run = d.path().join(name);
        common::ok(train_tiny_on_gpu(&run, "1", &[], &[]));
        common::summary(&run)
    };
    let first = train("first").gpu_conv.and_then(|c| c.kept).expect("kept");
    let file = first.file().expect("read or written").to_path_buf();
    let second = train("second");
    let kept = second.gpu_conv.and_then(|c| c.kept);
    assert_eq!(
        kept,
        Some(ctseg::bench::conv_cache::Kept::Read { file }),
        "{}",
        second.device
    );
    assert!(
        second.device.contains("timed by an earlier run"),
        "{}",
        second.device
    );
}

#[test]
fn mixed_precision_unscales_each_gradient_tensor_in_one_launch() {
    if gpu().is_none() {
        return;
    }
    // The unscale and overflow check of a mixed step on ctseg's kernels: one launch of
    // shaders/unscale_check.wgsl per gradient tensor and one word read back, and no
    // concatenation (a launch per tensor to build) for a separate check.
    let p = &tiny_gpu_profile(1, &["--precision", "mixed", "--skip-gpu-check"]);
    let mut model = ctseg::config::RunConfig::load(None)
        .expect("built-in config")
        .model;
    model.width = 4; // as tiny_profile_args
    let trained = model.init(1, &Device::flex().autodiff());
    let tensors = flat::layout(&trained, Select::Trainable).len();
    assert!(tensors >= 20, "{tensors}");
    assert_eq!(
        launches(p, "optimiser", "unscale_check"),
        tensors as f64,
        "{p}"
    );
    assert_eq!(launches(p, "optimiser", "SliceAssignKernel"), 0.0, "{p}");
}

#[test]
fn mixed_precision_runs_every_3x3_convolution_on_cooperative_matrices() {
    // The trainer's step in mixed precision on an adapter with cooperative matrices: every 3×3
    // convolution, forward and both gradients, on the cooperative-matrix kernels, none left on
    // the register ones (counts as in own_convolutions_replace_burns_in_the_training_step).
    let args = tiny_profile_args(1, &["--precision", "mixed"]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let Some(out) = common::ctseg_with_cooperative_matrices(&args, coop_here()) else {
        return;
    };
    let p = &only_profile(&common::ok(out));
    let launches = |phase: &str, kernel: &str| launches(p, phase, kernel);
    let convs = launches("forward", "conv3x3_forward_coop");
    assert!(convs >= 6.0, "{p}");
    assert_eq!(launches("backward", "conv3x3_forward_coop"), convs, "{p}");
    assert_eq!(
        launches("backward", "conv3x3_weight_grad_coop"),
        convs,
        "{p}"
    );
    let registers = launches("forward", "conv3x3_forward")
        + launches("backward", "conv3x3_forward")
        + launches("backward", "conv3x3_weight_grad");
    assert_eq!(registers, 0.0, "{p}");
}

#[test]
fn no_cooperative_matrices_keeps_mixed_precision_in_registers() {
    // The opt-out on an adapter that has them: every 3×3 convolution on the register kernels.
    let args = tiny_profile_args(1, &["--precision", "mixed", "--no-cooperative-matrices"]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let Some(out) = common::ctseg_with_cooperative_matrices(&args, coop_here()) else {
        return;
    };
    let p = &only_profile(&common::ok(out));
    let launches = |phase: &str, kernel: &str| launches(p, phase, kernel);
    let convs = launches("forward", "conv3x3_forward");
    assert!(convs >= 6.0, "{p}");
    assert_eq!(launches("backward", "conv3x3_weight_grad"), convs, "{p}");
    let coop = launches("forward", "conv3x3_forward_coop")
        + launches("backward", "conv3x3_forward_coop")
        + launches("backward", "conv3x3_weight_grad_coop");
    assert_eq!(coop, 0.0, "{p}");
}

#[test]
fn mixed_precision_training_names_its_cooperative_matrices() {
    // A short mixed-precision run on an adapter with cooperative matrices passes its start-up
    // check (src/verify.rs, on those kernels) and says in its log and summary what it ran on;
    // `ctseg adapters` says the same beforehand.
    let here = coop_here();
    let Some(adapters) = common::ctseg_with_cooperative_matrices(&["adapters"], here) else {
        return;
    };
    let adapters = common::ok(adapters);
    assert!(
        adapters.contains(
            "--precision mixed: ctseg's kernels with f16 operands on cooperative matrices"
        ),
        "{adapters}"
    );
    let d = tempfile::tempdir().expect("tmp");
    let run = d.path().join("run");
    let args = [
        "train",
        "--config",
        common::TINY,
        "--backend",
        "gpu",
        "--precision",
        "mixed",
        "--max-steps",
        "3",
        "--out",
        common::s(&run),
    ];
    let out = common::ctseg_with_cooperative_matrices(&args, here).expect("the adapter above");
    let out = common::ok(out);
    assert!(
        out.contains("f16 operands on ctseg's WGSL kernels on cooperative matrices"),
        "{out}"
    );
    let sm = common::summary(&run);
    assert_eq!(sm.precision, "mixed");
    assert!(
        sm.precision_note.contains("cooperative matrices"),
        "{}",
        sm.precision_note
    );
    assert_eq!(sm.skipped_steps, 0);
}

/// A fresh mixed-precision train state of a tiny U-Net on `be`, its stepper's inputs and the
/// state's weights hash.
fn mixed_state(
    be: &Backend,
) -> (
    ctseg::config::RunConfig,
    ctseg::data::HostBatch,
    ctseg::train::TrainState,
) {
    let (mut cfg, batch) = tiny_batch(32, 2);
    cfg.train.precision = ctseg::train::precision::Precision::Mixed;
    let be = ctseg::train::precision::apply(cfg.train.precision, be.clone());
    assert!(be.caps.f16_operands);
    let state = ctseg::train::TrainState::fresh(&cfg, &be.device.clone().autodiff(), be.caps);
    (cfg, batch, state)
}

fn weights_hash(state: &ctseg::train::TrainState) -> u64 {
    flat::hash_f32(&flat::flatten_values(&state.model, Select::Trainable).expect("weights"))
}

/// One trainer step of a fresh mixed-precision state (its loss scale set to `scale` when
/// given): the weights hash before, the state after, and the step's outcome.
fn one_mixed_step(
    be: &Backend,
    scale: Option<f64>,
) -> (u64, ctseg::train::TrainState, ctseg::train::StepOutcome) {
    let (cfg, batch, mut state) = mixed_state(be);
    if let Some(scale) = scale {
        state.loss_scale = Some(ctseg::train::scaler::LossScale {
            scale,
            ..Default::default()
        });
    }
    let before = weights_hash(&state);
    let stepper = ctseg::train::Stepper::new(&cfg, &state.model, &be.device, &ctseg::comm::Local);
    let (state, out) = stepper
        .step(state, std::slice::from_ref(&batch), 0, 1e-2)
        .expect("step");
    (before, state, out)
}

#[test]
fn mixed_precision_steps_apply_finite_gradients_at_the_initial_scale() {
    let Some(be) = gpu() else { return };
    let (before, state, out) = one_mixed_step(&be, None);
    // GradScaler's initial scale 2^16 suits this model: the step applies and counts one
    // finite step towards the next doubling.
    assert_eq!(out.scaling, Some((65_536.0, true)));
    let ls = state
        .loss_scale
        .expect("mixed precision keeps a loss scale");
    assert_eq!((ls.scale, ls.growth_tracker, ls.skipped), (65_536.0, 1, 0));
    assert_ne!(
        weights_hash(&state),
        before,
        "the optimiser step was not applied"
    );
    assert!(out.loss.is_finite());
}

#[test]
fn a_mixed_precision_step_whose_gradients_overflow_is_skipped() {
    let Some(be) = gpu() else { return };
    // A scale that makes the scaled loss's gradients overflow f16 (and f32) operands.
    let (before, state, out) = one_mixed_step(&be, Some(1e38));
    assert_eq!(out.scaling, Some((1e38, false)));
    let ls = state.loss_scale.expect("loss scale");
    assert_eq!((ls.scale, ls.growth_tracker, ls.skipped), (5e37, 0, 1));
    // Nothing applied: the weights are bit for bit the same, and the loss is still reported.
    assert_eq!(weights_hash(&state), before);
    assert!(out.loss.is_finite());
}

#[test]
fn mixed_precision_training_keeps_its_loss_scale_across_a_resume() {
    if gpu().is_none() {
        return;
    }
    let d = tempfile::tempdir().expect("tmp");
    let run = d.path().join("run");
    let out = common::ok(common::ctseg(&[
        "train",
        "--config",
        common::TINY,
        "--backend",
        "gpu",
        "--precision",
        "mixed",
        "--max-steps",
        "3",
        "--out",
        common::s(&run),
    ]));
    assert!(
        out.contains("precision: mixed (3x3 convolution operands rounded to f16"),
        "{out}"
    );
    let sm = common::summary(&run);
    assert_eq!(sm.precision, "mixed");
    assert_eq!((sm.loss_scale, sm.skipped_steps), (Some(65_536.0), 0));
    let last = || {
        let file = ctseg::rundir::RunDir::new(&run).checkpoint(ctseg::rundir::CheckpointKind::Last);
        let ck = ctseg::rundir::Checkpoint::load(&file).expect("checkpoint");
        ck.meta
            .loss_scale
            .expect("a mixed-precision checkpoint holds its loss scale")
    };
    assert_eq!((last().scale, last().growth_tracker), (65_536.0, 3));
    // Resumed, the scaler counts on from 3 finite steps (GradScaler's state restored), not 0.
    common::ok(common::ctseg(&[
        "train",
        "--resume",
        common::s(&run),
        "--backend",
        "gpu",
        "--max-steps",
        "5",
        "--quiet",
    ]));
    assert_eq!((last().scale, last().growth_tracker), (65_536.0, 5));
}

#[test]
fn mixed_precision_matches_the_cpus_mixed_precision_at_240() {
    let Some(be) = gpu() else { return };
    let registers = DeviceCaps {
        f16_operands: true,
        coop: None,
        ..be.caps
    };
    unet_in_mixed_precision_matches_the_cpus_at_240(&be, registers);
}

#[test]
fn mixed_precision_on_cooperative_matrices_matches_the_cpus_at_240() {
    let Some(be) = coop_gpu("mixed_precision_on_cooperative_matrices_matches_the_cpus_at_240")
    else {
        return;
    };
    let coop = DeviceCaps {
        f16_operands: true,
        ..be.caps
    };
    assert!(matches!(coop.conv_operands(3), Operands::Coop(_)));
    unet_in_mixed_precision_matches_the_cpus_at_240(&be, coop);
}

/// The second half of a mixed-precision run's start-up check (src/verify.rs) with `mixed`: the
/// GPU with f16 operands against the CPU with the same f16 operands, within that computation's
/// own noise on the transposed problem. Shape as unet_loss_and_gradients_match_cpu_at_240.
fn unet_in_mixed_precision_matches_the_cpus_at_240(be: &Backend, mixed: DeviceCaps) {
    let cfg = narrow_unet_240();
    let v = verify::compare(&cfg, &be.device, mixed, 4).expect("compare");
    eprintln!("{}\n{}", be.description, v.table());
    assert!(v.passes(), "{}\n{}", be.description, v.table());
    // Against the CPU in f32 the same gradients fail: f16 operands move them by far more than
    // f32's noise, so the mixed check must compare like with like (and the f32 check of the
    // same kernels, which require_gpu_agrees also runs, is the one with tight limits).
    let flex = Device::flex();
    let f32_caps = DeviceCaps::default();
    let (l32, g32) = verify::loss_and_grads(&cfg, &flex, f32_caps, 4, false).expect("f32");
    let (_, g32t) = verify::loss_and_grads(&cfg, &flex, f32_caps, 4, true).expect("f32 t");
    let (lg, gg) = verify::loss_and_grads(&cfg, &be.device, mixed, 4, false).expect("mixed");
    let against_f32 = verify::verdict(l32, lg, &g32, &gg, &g32t);
    eprintln!("mixed GPU against f32 CPU:\n{}", against_f32.table());
    assert!(!against_f32.passes(), "{}", against_f32.table());
}

#[test]
fn the_unscale_matches_the_host_and_sees_every_overflow_on_the_device() {
    let Some(be) = gpu() else { return };
    // One launch of shaders/unscale_check.wgsl per tensor, one flag for all of them.
    common::assert_unscale_is_exact(&be.device);
}

#[test]
fn bench_kernels_times_every_path_of_a_layer_and_the_paths_agree() {
    // `ctseg bench kernels` on one small layer (3 → 7 channels, partial tiles in every
    // direction) on an adapter with cooperative matrices: f32 convolution on burn's kernels
    // against ctseg's, mixed precision's in registers against on the matrices, and batch
    // normalisation by tensor operations against ctseg's kernels, each forward and forward +
    // backward. Each pair computes the same formula in another order (mixed precision on the
    // same f16 operands), so they agree within verify::REORDERED.
    let Some(rows) = common::small_layer_kernel_rows(coop_here()) else {
        return;
    };
    let found: Vec<(String, String)> = rows
        .iter()
        .map(|r| {
            (
                r["op"].as_str().unwrap_or("?").into(),
                r["pass"].as_str().unwrap_or("?").into(),
            )
        })
        .collect();
    let mut expected = Vec::new();
    for op in ["conv3x3+relu", "conv3x3+relu mixed", "batch_norm+dropout"] {
        for pass in ["forward", "fwd+bwd"] {
            expected.push((op.to_string(), pass.to_string()));
        }
    }
    let mut sorted = found.clone();
    sorted.sort();
    expected.sort();
    assert_eq!(sorted, expected, "{rows:?}");
    for r in &rows {
        assert_eq!(r["case"]["shape"], serde_json::json!([2, 3, 12, 10]), "{r}");
        assert_eq!(r["case"]["c_out"], 7, "{r}");
        let diff = r["rel_l2"].as_f64().expect("a finite difference");
        assert!(diff <= verify::REORDERED, "{r}");
        for t in ["baseline_s", "candidate_s", "speedup"] {
            assert!(r[t].as_f64().is_some_and(|v| v > 0.0), "{t}: {r}");
        }
    }
    let mixed = rows.iter().find(|r| r["op"] == "conv3x3+relu mixed");
    let candidate = mixed
        .map(|r| r["candidate"].to_string())
        .unwrap_or_default();
    assert!(candidate.contains("cooperative matrices"), "{candidate}");
    // 2 × 2·12·10·7·3·9 per forward, three times that forward + backward.
    let conv = |pass: &str| {
        rows.iter()
            .find(|r| r["op"] == "conv3x3+relu" && r["pass"] == pass)
            .and_then(|r| r["flop"].as_f64())
    };
    assert_eq!(conv("forward"), Some(90_720.0));
    assert_eq!(conv("fwd+bwd"), Some(272_160.0));
}
