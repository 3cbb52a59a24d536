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
//! In mixed precision the check runs twice: the same kernels with f16 rounding off, at f32's
//! limits (this is what catches a wrong kernel), and with it on, against the CPU computing with
//! the same f16 operands (its convolutions round them as the GPU kernels do) within that
//! computation's own noise on the transposed problem. The second limit is loose by nature:
//! summation-order differences flip single f16 roundings, and this ill-conditioned model
//! amplifies them to 1–10 % per gradient tensor (measured on lavapipe at 240², the CPU against
//! itself), where f32's noise is ~1e-4.

use burn::optim::GradientsParams;
use burn::tensor::{Device, Tensor, TensorData};

use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::model::{DeviceCaps, Mode, UNetConfig, dice_loss};
use crate::tensor_util::to_f32;
use crate::train::flat::{self, Select};

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
    if backend.caps.f16_operands {
        // The kernels mixed precision runs on (ctseg's), with f16 rounding off: f32's limits.
        let f32_caps = DeviceCaps {
            f16_operands: false,
            gpu_conv: crate::model::GpuConv::Wgsl,
            ..backend.caps
        };
        agree(model, backend, f32_caps)?;
    }
    agree(model, backend, backend.caps)
}

fn agree(model: &UNetConfig, backend: &Backend, caps: DeviceCaps) -> Result<Verdict> {
    let v = check_against_cpu(model, backend, caps)?;
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
            "{}: the GPU computes this model's gradients{} differently from the CPU reference (loss relative error {:.1e}; parameter tensor {k} off by {:.1e}, accepted {:.1e}: {TOLERANCE:.0e} or {NOISE_FACTOR}x the CPU's own rounding noise {:.1e}). Training there would silently go wrong: use --backend cpu, another --adapter, or --skip-gpu-check if you know better.\n{}",
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
            v.table()
        )));
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

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
