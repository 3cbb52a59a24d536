//! Start-up check that a GPU adapter computes this run's model like the CPU reference does:
//! the loss and every parameter's gradient of a narrow copy of the model (same depth, input
//! size, upsampling and normalisation; width 2, batch 2) on the GPU against burn flex.
//!
//! Why: GPU drivers and burn's kernels have computed silently wrong gradients at realistic
//! shapes (lavapipe's loop cap; an NVIDIA Vulkan run at 240²; see docs/gpu-notes.md). Training
//! on such an adapter would waste hours and report a wrong comparison, so `--backend gpu`
//! refuses to start unless every gradient agrees with the CPU's within the CPU's own f32
//! rounding noise (see [`NOISE_FACTOR`]).
//!
//! In mixed precision the check runs in steps:
//! 1. ctseg's convolution kernels with f16 rounding off, at f32's limits (this is what catches
//!    a wrong kernel);
//! 2. on an adapter with cooperative matrices, their convolutions (forward and the three
//!    gradients, a few layer shapes) against the register kernels on the same f16 operands:
//!    both sum the same exact products in f32, so they must agree to f32 summation order
//!    ([`REORDERED`]); this is what catches a wrong cooperative-matrix kernel;
//! 3. the model with f16 operands on the register kernels, against the CPU computing with the
//!    same f16 operands (its convolutions round them as the GPU kernels do) within that
//!    computation's own noise on the transposed problem. This limit is loose by nature:
//!    summation-order differences flip single f16 roundings, and this ill-conditioned model
//!    amplifies them to 1–10 % per gradient tensor (measured on lavapipe at 240², the CPU
//!    against itself), up to 67 % on the 2-element tensors of the width-2 copy, where f32's
//!    noise is ~1e-4. Step 2 makes the cooperative matrices' own order one more such
//!    difference, so they are checked there, tightly, and not here.
//!
//! Where kernels are compiled to SPIR-V (no WGSL kernels; mixed precision runs on cubek's
//! cooperative-matrix convolutions, [`crate::model::cmma_conv`]), step 1 checks burn's f32
//! kernels, step 2 cubek's convolutions against the CPU's on the same f16 operands
//! ([`cmma_difference`]: the same exact products summed in another f32 order, [`REORDERED`]),
//! and step 3 is as above.

use burn::optim::GradientsParams;
use burn::tensor::{Device, Tensor, TensorData};

use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::model::{DeviceCaps, Mode, UNetConfig, dice_loss, gpu_conv};
use crate::tensor_util::to_f32;
use crate::train::flat::{self, Select};
use crate::wgsl::{Compiler, compiler};

/// Accepted relative L2 error of one parameter tensor's gradient (GPU vs CPU) where f32
/// rounding is harmless. Exact adapters measured ≤ 3e-4 on well-conditioned models.
pub const TOLERANCE: f64 = 1e-3;

/// How far beyond the CPU's own f32 rounding noise a tensor may be. The livermask U-Net's
/// gradients at 240² and depth 4 are badly conditioned in f32: PyTorch's f32 gradients differ
/// from its f64 ones by 1–2.7 % per tensor (median 0.3–0.7 %), so a fixed tolerance rejects
/// every exact implementation (it refused an NVIDIA H200 whose gradients were within 2.4 % of
/// burn flex). The noise is measured per run: the CPU computes the same gradients a second time
/// on the transposed problem (images transposed, conv kernels transposed, gradients transposed
/// back; mathematically identical — 1e-11 apart in f64 — but every spatial sum runs in another
/// order). A tensor passes if its GPU error is within
/// `max(TOLERANCE, NOISE_FACTOR × max(its noise, the median noise))`. Against f64 truth, f32
/// errors measured up to 11.7× that floor (PyTorch, 9 configurations); broken kernels were off
/// by 50–250 %.
pub const NOISE_FACTOR: f64 = 20.0;

/// Accepted relative L2 difference between two kernels that sum the same exact products (f16
/// operands, whose products f32 holds exactly) in another f32 order: cooperative matrices
/// against registers. Measured ≤ 4e-7 on lavapipe (tests/gpu.rs, against the CPU).
pub const REORDERED: f64 = 1e-5;

/// One parameter tensor's comparison.
#[derive(Clone, Copy, Debug)]
pub struct TensorCheck {
    /// Elements.
    pub len: usize,
    /// Relative L2 error, GPU vs CPU.
    pub error: f64,
    /// Relative L2 difference of the CPU against itself on the transposed problem.
    pub noise: f64,
    /// The noise floor used: the larger of `noise` and the median noise over all tensors.
    pub floor: f64,
}

impl TensorCheck {
    /// The accepted error for this tensor.
    pub fn limit(&self) -> f64 {
        TOLERANCE.max(NOISE_FACTOR * self.floor)
    }

    /// Whether the GPU agrees (NaN never does).
    pub fn passes(&self) -> bool {
        self.error <= self.limit()
    }
}

/// Outcome of a check.
#[derive(Clone, Debug)]
pub struct Verdict {
    /// Relative error of the loss.
    pub loss_err: f64,
    /// Per parameter tensor (visit order).
    pub tensors: Vec<TensorCheck>,
}

impl Verdict {
    /// The tensor furthest beyond its limit (ratio error / limit) and its index.
    pub fn worst(&self) -> Option<(usize, TensorCheck)> {
        let ratio = |t: &TensorCheck| {
            let r = t.error / t.limit();
            if r.is_nan() { f64::INFINITY } else { r }
        };
        self.tensors
            .iter()
            .copied()
            .enumerate()
            .max_by(|a, b| ratio(&a.1).total_cmp(&ratio(&b.1)))
    }

    /// Whether the loss and every tensor agree.
    pub fn passes(&self) -> bool {
        self.loss_err <= TOLERANCE && self.tensors.iter().all(TensorCheck::passes)
    }

    /// A per-tensor table (for logs and test failures).
    pub fn table(&self) -> String {
        let mut out = format!("loss relative error {:.2e}\n", self.loss_err);
        out.push_str("tensor  elements  error     f32-noise  limit     ok\n");
        for (k, t) in self.tensors.iter().enumerate() {
            out.push_str(&format!(
                "{k:>6}  {:>8}  {:>8.2e}  {:>9.2e}  {:>8.2e}  {}\n",
                t.len,
                t.error,
                t.noise,
                t.limit(),
                if t.passes() { "yes" } else { "NO" }
            ));
        }
        out
    }
}

/// `values` of a tensor of `shape` with its last two axes swapped.
pub fn transpose_last2(values: &[f32], shape: &[usize]) -> Vec<f32> {
    let (h, w) = match shape {
        [.., h, w] => (*h, *w),
        _ => return values.to_vec(),
    };
    let mut out = vec![0.0; values.len()];
    for (src, dst) in values.chunks(h * w).zip(out.chunks_mut(h * w)) {
        for i in 0..h {
            for j in 0..w {
                dst[j * h + i] = src[i * w + j];
            }
        }
    }
    out
}

/// Output, input, weight and bias gradients of `act(conv3x3(x, w) + b)` under the loss
/// `sum(y · r)` (r: fixed pseudo-random weights, so misplaced values show), on `device` with
/// `caps` through the model's convolution ([`crate::model::ops::conv`]). With `rounded`, x, w
/// and r (hence the output gradient) are first rounded to the nearest f16 values; b is not
/// (it is added to the f32 accumulator, never a product's operand).
///
/// # Shapes
/// - `shape`: x's `[batch, c_in, h, w]`; the convolution has `c_out` outputs.
pub fn conv_and_grads(
    device: &Device,
    caps: DeviceCaps,
    shape: [usize; 4],
    c_out: usize,
    relu: bool,
    rounded: bool,
) -> Result<[Vec<f32>; 4]> {
    let ad = device.clone().autodiff();
    let mut r = crate::rng::Rng::new(9);
    let mut values = |n: usize, operand: bool| {
        let v: Vec<f32> = (0..n).map(|_| r.normal() as f32).collect();
        if rounded && operand {
            crate::fp16::from_f16(&crate::fp16::to_f16(&v))
        } else {
            v
        }
    };
    let x = Tensor::<4>::from_data(
        TensorData::new(values(shape.iter().product(), true), shape),
        &ad,
    )
    .require_grad();
    let wshape = [c_out, shape[1], 3, 3];
    let w = Tensor::<4>::from_data(
        TensorData::new(values(c_out * shape[1] * 9, true), wshape),
        &ad,
    )
    .require_grad();
    let b =
        Tensor::<1>::from_data(TensorData::new(values(c_out, false), [c_out]), &ad).require_grad();
    let yshape = [shape[0], c_out, shape[2], shape[3]];
    let rs = Tensor::<4>::from_data(
        TensorData::new(values(yshape.iter().product(), true), yshape),
        &ad,
    );
    let y = crate::model::ops::conv(x.clone(), w.clone(), b.clone(), relu, &caps);
    let grads = (y.clone() * rs).sum().backward();
    let missing = |what: &str| Error::Device(format!("the convolution check got no {what}"));
    Ok([
        to_f32(y)?,
        to_f32(x.grad(&grads).ok_or_else(|| missing("input gradient"))?)?,
        to_f32(w.grad(&grads).ok_or_else(|| missing("weight gradient"))?)?,
        to_f32(b.grad(&grads).ok_or_else(|| missing("bias gradient"))?)?,
    ])
}

/// The convolutions the kernel checks compare: input shape, outputs, ReLU. Partial tiles, one
/// input channel, more channels than a tile.
const CHECKED_SHAPES: [([usize; 4], usize, bool); 3] = [
    ([2, 1, 20, 20], 2, true),
    ([2, 16, 12, 12], 70, false),
    ([1, 96, 6, 6], 80, true),
];

/// The largest relative L2 difference, over [`CHECKED_SHAPES`] and the output and three
/// gradients, between the 3×3 convolutions of `a` and of `b` on `device`: the same operands, the
/// same f16 rounding.
pub fn conv_difference(device: &Device, a: DeviceCaps, b: DeviceCaps) -> Result<f64> {
    let mut worst: f64 = 0.0;
    for (shape, c_out, relu) in CHECKED_SHAPES {
        // On ctseg's kernels, or two fallbacks could agree.
        let ours = |c: DeviceCaps| {
            c.gpu_conv == crate::model::GpuConv::Wgsl
                || c.conv_operands(3) != gpu_conv::Operands::F32
        };
        if !(ours(a) && ours(b) && gpu_conv::covers(device, shape, c_out)) {
            return Err(Error::Device(format!(
                "the convolution check needs ctseg's kernels on this device ({shape:?} -> {c_out})"
            )));
        }
        let ya = conv_and_grads(device, a, shape, c_out, relu, false)?;
        let yb = conv_and_grads(device, b, shape, c_out, relu, false)?;
        worst = worst.max(largest_difference(&ya, &yb));
    }
    Ok(worst)
}

/// The largest relative L2 difference between matching tensors of `a` and `b` (the output and
/// gradients of one convolution, [`conv_and_grads`]); infinite if any is NaN or if their
/// counts differ (a path that left values out must not read as agreeing).
pub fn largest_difference(a: &[Vec<f32>], b: &[Vec<f32>]) -> f64 {
    if a.len() != b.len() {
        return f64::INFINITY;
    }
    a.iter()
        .zip(b)
        .map(|(p, q)| rel_l2(p, q))
        .map(|e| if e.is_nan() { f64::INFINITY } else { e })
        .fold(0.0, f64::max)
}

/// The largest relative L2 difference, over [`CHECKED_SHAPES`] and the output and three
/// gradients, between the 3×3 convolutions on `device` with `caps` (mixed precision,
/// kernels compiled to SPIR-V: cubek's on cooperative matrices) and the CPU's, on operands
/// already rounded to f16: both sum the same exact products in f32. An error if cubek declined
/// any of them (they would not have been checked).
pub fn cmma_difference(device: &Device, caps: DeviceCaps) -> Result<f64> {
    let cpu = DeviceCaps {
        f16_operands: true,
        ..DeviceCaps::default()
    };
    let mut worst: f64 = 0.0;
    for (shape, c_out, relu) in CHECKED_SHAPES {
        let declined = crate::model::cmma_conv::declined();
        let gpu = conv_and_grads(device, caps, shape, c_out, relu, true)?;
        if crate::model::cmma_conv::declined() != declined {
            return Err(Error::Device(format!(
                "cubek's cooperative-matrix convolutions declined the shape {shape:?} -> {c_out}"
            )));
        }
        let reference = conv_and_grads(&Device::flex(), cpu, shape, c_out, relu, true)?;
        worst = worst.max(largest_difference(&reference, &gpu));
    }
    Ok(worst)
}

/// Loss and per-tensor gradients of `cfg` (dropout off) on `device` for a fixed batch of `b`
/// synthetic images; with `transposed`, of the transposed problem, gradients transposed back.
pub fn loss_and_grads(
    cfg: &UNetConfig,
    device: &Device,
    caps: DeviceCaps,
    b: usize,
    transposed: bool,
) -> Result<(f64, Vec<Vec<f32>>)> {
    let mut cfg = cfg.clone();
    cfg.dropout = 0.0;
    let ad = device.clone().autodiff();
    let mut model = cfg.init(7, &ad).with_caps(caps);
    let slots = flat::layout(&model, Select::Trainable);
    if transposed {
        let values = flat::flatten_values(&model, Select::Trainable)?;
        let mut t = Vec::with_capacity(values.len());
        let mut o = 0;
        for s in &slots {
            let v = &values[o..o + s.len];
            if s.shape.len() == 4 {
                t.extend(transpose_last2(v, &s.shape));
            } else {
                t.extend_from_slice(v);
            }
            o += s.len;
        }
        model = flat::assign_values(model, Select::Trainable, &t)?;
    }
    let (n, c) = (cfg.input_size, cfg.classes);
    // A smooth image with structure at every scale (different per image), and labels that
    // overlap it partly.
    let mut x: Vec<f32> = (0..b * n * n)
        .map(|j| (0.5 + 0.3 * (j as f64 * 0.013).sin() + 0.2 * (j as f64 * 0.0007).cos()) as f32)
        .collect();
    let mut y: Vec<f32> = (0..b * c * n * n)
        .map(|j| if (j / 7) % 3 == 0 { 1.0 } else { 0.0 })
        .collect();
    if transposed {
        x = transpose_last2(&x, &[b, 1, n, n]);
        y = transpose_last2(&y, &[b, c, n, n]);
    }
    let x = Tensor::<4>::from_data(TensorData::new(x, [b, 1, n, n]), &ad);
    let y = Tensor::<4>::from_data(TensorData::new(y, [b, c, n, n]), &ad);
    let mode = Mode::Train {
        seed: 7,
        step: 0,
        stream: 0,
    };
    let loss = dice_loss(model.forward(x, mode), y, 0.0);
    let value = to_f32(loss.clone())?.first().copied().unwrap_or(f32::NAN) as f64;
    // In mixed precision, as training does: the loss scaled before the backward (else the
    // output gradients underflow f16), the gradients unscaled (a power of two: exact in f32).
    let scale = if caps.f16_operands {
        crate::train::scaler::INIT_SCALE
    } else {
        1.0
    };
    let grads = GradientsParams::from_grads(loss.mul_scalar(scale).backward(), &model);
    let mut flat_grads = flat::flatten_grads(&model, &grads)?;
    flat_grads.iter_mut().for_each(|g| *g /= scale as f32);
    let mut per_tensor = Vec::new();
    let mut o = 0;
    for s in &slots {
        let g = &flat_grads[o..o + s.len];
        per_tensor.push(if transposed && s.shape.len() == 4 {
            // The transposed run's kernel gradient is [.., kw, kh]: swap back.
            let mut t_shape = s.shape.clone();
            t_shape.swap(2, 3);
            transpose_last2(g, &t_shape)
        } else {
            g.to_vec()
        });
        o += s.len;
    }
    Ok((value, per_tensor))
}

/// Relative L2 difference of `b` from `a` (0 when both are zero).
pub fn rel_l2(a: &[f32], b: &[f32]) -> f64 {
    let num: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| ((x - y) as f64).powi(2))
        .sum::<f64>()
        .sqrt();
    let den: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    if den == 0.0 && num == 0.0 {
        0.0
    } else {
        num / den.max(1e-30)
    }
}

/// Compares the model `cfg` (dropout switched off) on `device` against burn flex, batch `b`, in
/// the precision of `caps` (the CPU rounds convolution operands to f16 where `caps` do).
pub fn compare(cfg: &UNetConfig, device: &Device, caps: DeviceCaps, b: usize) -> Result<Verdict> {
    let cpu = DeviceCaps {
        f16_operands: caps.f16_operands,
        ..DeviceCaps::default()
    };
    let (lc, gc) = loss_and_grads(cfg, &Device::flex(), cpu, b, false)?;
    let (_, gr) = loss_and_grads(cfg, &Device::flex(), cpu, b, true)?;
    let (lg, gg) = loss_and_grads(cfg, device, caps, b, false)?;
    Ok(verdict(lc, lg, &gc, &gg, &gr))
}

/// Builds the per-tensor comparison of `test` against `reference`, with the noise floor taken
/// from `reference_transposed` (see [`NOISE_FACTOR`]).
pub fn verdict(
    loss_ref: f64,
    loss_test: f64,
    reference: &[Vec<f32>],
    test: &[Vec<f32>],
    reference_transposed: &[Vec<f32>],
) -> Verdict {
    let noise: Vec<f64> = reference
        .iter()
        .zip(reference_transposed)
        .map(|(c, r)| rel_l2(c, r))
        .collect();
    let mut sorted = noise.clone();
    sorted.sort_by(f64::total_cmp);
    let median = sorted.get(sorted.len() / 2).copied().unwrap_or(0.0);
    let tensors = reference
        .iter()
        .zip(test)
        .zip(&noise)
        .map(|((c, g), &nz)| TensorCheck {
            len: c.len(),
            error: rel_l2(c, g),
            noise: nz,
            floor: nz.max(median),
        })
        .collect();
    Verdict {
        loss_err: ((loss_ref - loss_test) / loss_ref).abs(),
        tensors,
    }
}

/// Compares `backend` with `caps` against burn flex on a narrow copy of `model` (width 2,
/// batch 2).
pub fn check_against_cpu(
    model: &UNetConfig,
    backend: &Backend,
    caps: DeviceCaps,
) -> Result<Verdict> {
    let mut cfg = model.clone();
    cfg.width = 2;
    cfg.dropout = 0.0;
    compare(&cfg, &backend.device, caps, 2)
}

/// Runs the check of `backend` as it will compute (twice in mixed precision: ctseg's kernels in
/// f32, then with f16 operands) and turns a disagreement into an error that says what to do.
/// The verdict is the last check's.
pub fn require_gpu_agrees(model: &UNetConfig, backend: &Backend) -> Result<Verdict> {
    if !backend.caps.f16_operands {
        return agree(model, backend, backend.caps);
    }
    if compiler(&backend.device) == Compiler::SpirV {
        return require_cmma_agrees(model, backend);
    }
    // 1. The kernels mixed precision runs on (ctseg's), with f16 rounding off: f32's limits.
    let f32_caps = DeviceCaps {
        f16_operands: false,
        gpu_conv: crate::model::GpuConv::Wgsl,
        ..backend.caps
    };
    agree(model, backend, f32_caps)?;
    // 2. Cooperative matrices, where the run uses them, against the register kernels.
    let registers = DeviceCaps {
        coop: None,
        ..backend.caps
    };
    if let Some(tile) = backend.caps.coop {
        require_reordered(
            backend,
            || conv_difference(&backend.device, backend.caps, registers),
            &format!("its {}", tile.describe()),
            "ctseg's register kernels",
            "--no-cooperative-matrices (mixed precision on ctseg's register kernels), ",
        )?;
    }
    // 3. The model with f16 operands against the CPU's, within that computation's noise.
    agree(model, backend, registers)
}

/// [`require_gpu_agrees`] in mixed precision where kernels are compiled to SPIR-V.
fn require_cmma_agrees(model: &UNetConfig, backend: &Backend) -> Result<Verdict> {
    // 1. burn's kernels in f32, at f32's limits.
    let f32_caps = DeviceCaps {
        f16_operands: false,
        ..backend.caps
    };
    agree(model, backend, f32_caps)?;
    // 2. cubek's cooperative-matrix convolutions against the CPU's on the same f16 operands.
    require_reordered(
        backend,
        || cmma_difference(&backend.device, backend.caps),
        "cubek's cooperative-matrix convolutions",
        "the CPU",
        "",
    )?;
    // 3. The model with f16 operands against the CPU's, within that computation's noise.
    agree(model, backend, backend.caps)
}

/// Step 2 of the mixed-precision check: `difference`, a comparison of the run's convolution
/// kernels (`kernels`) with `reference` on the same f16 operands, must find only another f32
/// summation order ([`REORDERED`]). A driver that cannot build the kernels panics in wgpu: that
/// too becomes an error that says what to do (`advice`, then the choices every refusal offers).
fn require_reordered(
    backend: &Backend,
    difference: impl FnOnce() -> Result<f64> + std::panic::UnwindSafe,
    kernels: &str,
    reference: &str,
    advice: &str,
) -> Result<()> {
    let diff = crate::comm::catch_panic(difference)
        .unwrap_or_else(|_| Err(Error::Device(format!("{kernels} failed on this adapter"))));
    let refuse = |why: String| {
        Error::Device(format!(
            "{}: {why}. Use {advice}--precision f32, another --adapter, or --skip-gpu-check if you know better.",
            backend.description
        ))
    };
    match diff {
        Err(e) => Err(refuse(e.to_string())),
        Ok(d) if d > REORDERED => Err(refuse(format!(
            "{kernels} compute 3x3 convolutions on f16 operands differently from {reference} on the same operands (relative error {d:.1e}, accepted {REORDERED:.0e}: the same exact products summed in another order)"
        ))),
        Ok(_) => Ok(()),
    }
}

/// The first of a refusal's choices, for a check of `caps` on `backend`: where the refused
/// kernels were f16 operands or ctseg's, f32 in a mixed-precision run (whose convolutions
/// `--gpu-conv` does not choose) and burn's in an f32 run; nothing where they were burn's in
/// f32, which every other choice runs too.
fn first_advice(backend: &Backend, caps: DeviceCaps) -> &'static str {
    let ctsegs = caps.gpu_conv == crate::model::GpuConv::Wgsl;
    match (backend.caps.f16_operands, caps.f16_operands || ctsegs) {
        (_, false) => "",
        (true, true) => "--precision f32, ",
        (false, true) => "--gpu-conv burn (these were ctseg's convolution kernels), ",
    }
}

fn agree(model: &UNetConfig, backend: &Backend, caps: DeviceCaps) -> Result<Verdict> {
    // A kernel that fails on the device (one the driver cannot build) fails the check too,
    // with the same choices as a wrong result.
    let v = check_against_cpu(model, backend, caps).map_err(|e| match e {
        Error::Device(why) => Error::Device(format!(
            "{}: the start-up check could not run this model on the GPU ({why}). Use {}--backend cpu or another --adapter.",
            backend.description,
            first_advice(backend, caps)
        )),
        e => e,
    })?;
    if !v.passes() {
        let (k, t) = v.worst().unwrap_or((
            0,
            TensorCheck {
                len: 0,
                error: f64::NAN,
                noise: 0.0,
                floor: 0.0,
            },
        ));
        return Err(Error::Device(format!(
            "{}: the GPU computes this model's gradients{} differently from the CPU reference (loss relative error {:.1e}; parameter tensor {k} off by {:.1e}, accepted {:.1e}: {TOLERANCE:.0e} or {NOISE_FACTOR}x the CPU's own rounding noise {:.1e}). Training there would silently go wrong: use {}--backend cpu, another --adapter, or --skip-gpu-check if you know better.\n{}",
            backend.description,
            if caps.f16_operands {
                " with f16 operands (mixed precision)"
            } else {
                ""
            },
            v.loss_err,
            t.error,
            t.limit(),
            t.floor,
            first_advice(backend, caps),
            v.table()
        )));
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refusal_first_offers_what_replaces_the_refused_kernels() {
        let cpu = crate::backend::open(&crate::backend::DeviceRequest {
            kind: crate::backend::BackendKind::Cpu,
            threads: 0,
            adapter: None,
            gpu_conv: crate::model::GpuConv::Burn,
            cooperative_matrices: true,
        })
        .expect("cpu");
        let ctsegs = DeviceCaps {
            gpu_conv: crate::model::GpuConv::Wgsl,
            ..cpu.caps
        };
        // f32 on ctseg's kernels: burn's; on burn's: nothing to switch.
        assert!(first_advice(&cpu, ctsegs).starts_with("--gpu-conv burn"));
        assert_eq!(first_advice(&cpu, cpu.caps), "");
        // A mixed-precision run refused on ctseg's kernels: `--gpu-conv` does not choose its
        // convolutions, only f32 changes them.
        let mixed = Backend {
            caps: DeviceCaps {
                f16_operands: true,
                ..cpu.caps
            },
            ..cpu.clone()
        };
        assert_eq!(first_advice(&mixed, ctsegs), "--precision f32, ");
        // The `spirv` build's mixed check, step 1: burn's kernels in f32, what f32 would run.
        assert_eq!(first_advice(&mixed, cpu.caps), "");
    }

    #[test]
    fn paths_that_leave_values_out_do_not_agree() {
        let a = vec![vec![1.0, 2.0]];
        assert_eq!(largest_difference(&a, &a), 0.0);
        assert!(largest_difference(&a, &[]).is_infinite());
        assert!(largest_difference(&a, &[vec![1.0, f32::NAN]]).is_infinite());
    }

    #[test]
    fn transpose_last2_swaps_the_last_axes() {
        // [2, 2, 3] → [2, 3, 2]: numpy.arange(12).reshape(2, 2, 3).swapaxes(1, 2).ravel().
        let v: Vec<f32> = (0..12).map(|x| x as f32).collect();
        let t = transpose_last2(&v, &[2, 2, 3]);
        let want = [0., 3., 1., 4., 2., 5., 6., 9., 7., 10., 8., 11.];
        assert_eq!(t, want);
        assert_eq!(transpose_last2(&t, &[2, 3, 2]), v);
    }
}
