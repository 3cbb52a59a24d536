//! Start-up check that a GPU adapter computes this run's model like the CPU reference does:
//! the loss and every parameter's gradient of a narrow copy of the model (same depth, input
//! size, upsampling and normalisation; width 2, batch 2) on the GPU against burn flex.
//!
//! Why: GPU drivers and burn's kernels have computed silently wrong gradients at realistic
//! shapes (lavapipe's loop cap; an NVIDIA Vulkan run at 240²; see tests/gpu.rs). Training on
//! such an adapter would waste hours and report a wrong comparison, so `--backend gpu` refuses
//! to start unless the adapter agrees with the CPU within [`TOLERANCE`].

use burn::optim::GradientsParams;
use burn::tensor::{Device, Tensor, TensorData};

use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::model::{Mode, UNetConfig, dice_loss};
use crate::tensor_util::to_f32;
use crate::train::flat::{self, Select};

/// Largest accepted relative L2 error of one parameter tensor's gradient (GPU vs CPU). Exact
/// adapters measured ≤ 2.3e-4 (f32 sums of 10⁵ terms in another order); broken ones ≥ 6e-2.
pub const TOLERANCE: f64 = 1e-3;

/// Outcome of a check.
#[derive(Clone, Debug)]
pub struct Verdict {
    /// Relative error of the loss.
    pub loss_err: f64,
    /// Worst relative gradient error, and the parameter tensor (visit order) it belongs to.
    pub worst: (f64, usize),
    /// Parameter tensors compared.
    pub tensors: usize,
}

fn loss_and_grads(
    cfg: &UNetConfig,
    device: &Device,
    chunk_limit: usize,
) -> Result<(f64, Vec<Vec<f32>>)> {
    let ad = device.clone().autodiff();
    let model = cfg.init(7, &ad).with_chunk_limit(chunk_limit);
    let (b, n, c) = (2, cfg.input_size, cfg.classes);
    // A smooth image with structure at every scale, and labels that overlap it partly.
    let x: Vec<f32> = (0..b * n * n)
        .map(|j| (0.5 + 0.3 * (j as f64 * 0.013).sin() + 0.2 * (j as f64 * 0.0007).cos()) as f32)
        .collect();
    let y: Vec<f32> = (0..b * c * n * n)
        .map(|j| if (j / 7) % 3 == 0 { 1.0 } else { 0.0 })
        .collect();
    let x = Tensor::<4>::from_data(TensorData::new(x, [b, 1, n, n]), &ad);
    let y = Tensor::<4>::from_data(TensorData::new(y, [b, c, n, n]), &ad);
    let mode = Mode::Train {
        seed: 7,
        step: 0,
        stream: 0,
    };
    let loss = dice_loss(model.forward(x, mode), y, 0.0);
    let value = to_f32(loss.clone())?.first().copied().unwrap_or(f32::NAN) as f64;
    let grads = GradientsParams::from_grads(loss.backward(), &model);
    let flat_grads = flat::flatten_grads(&model, &grads)?;
    let mut per_tensor = Vec::new();
    let mut o = 0;
    for s in flat::layout(&model, Select::Trainable) {
        per_tensor.push(flat_grads[o..o + s.len].to_vec());
        o += s.len;
    }
    Ok((value, per_tensor))
}

/// Compares `backend` against burn flex on a narrow copy of `model`.
pub fn check_against_cpu(model: &UNetConfig, backend: &Backend) -> Result<Verdict> {
    let mut cfg = model.clone();
    cfg.width = 2;
    cfg.dropout = 0.0;
    let (lc, gc) = loss_and_grads(&cfg, &Device::flex(), 0)?;
    let (lg, gg) = loss_and_grads(&cfg, &backend.device, backend.chunk_limit)?;
    let rel = |a: &[f32], b: &[f32]| -> f64 {
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
    };
    let mut worst = (0.0f64, 0usize);
    for (k, (a, b)) in gc.iter().zip(&gg).enumerate() {
        let e = rel(a, b);
        if e.is_nan() || e > worst.0 {
            worst = (e, k);
        }
    }
    Ok(Verdict {
        loss_err: ((lc - lg) / lc).abs(),
        worst,
        tensors: gc.len(),
    })
}

/// Runs the check and turns a disagreement into an error that says what to do.
pub fn require_gpu_agrees(model: &UNetConfig, backend: &Backend) -> Result<Verdict> {
    let v = check_against_cpu(model, backend)?;
    if !(v.loss_err <= TOLERANCE && v.worst.0 <= TOLERANCE) {
        return Err(Error::Device(format!(
            "{}: the GPU computes this model's gradients differently from the CPU reference (loss relative error {:.1e}, parameter tensor {} off by {:.1e}; tolerance {TOLERANCE:.0e}). Training there would silently go wrong: use --backend cpu, another --adapter, or --skip-gpu-check if you know better.",
            backend.description, v.loss_err, v.worst.1, v.worst.0
        )));
    }
    Ok(v)
}
