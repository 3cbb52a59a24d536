//! livermask's soft Dice loss, the per-channel soft Dice it logged, and hard Dice counts
//! (true/false positives, false negatives) that are summed over a whole validation set before the
//! ratio is taken.
//!
//! All reductions go over one spatial axis at a time (W, then H), never over a flattened image:
//! long single-axis reductions are unreliable on loop-capped wgpu adapters (see
//! [`crate::model::ops::chunked_rows`]).

use burn::tensor::{Bool, Tensor};
use serde::{Deserialize, Serialize};

use crate::error::Result;

/// Per-image, per-channel soft Dice: `(2·Σ y·p + s) / (Σ y² + Σ p² + s)`, `[b, c]`.
///
/// A channel empty in both truth and prediction (denominator 0) scores 1 whatever `smooth` is,
/// so the loss is never NaN, also at the paper's `smooth = 0`.
pub fn soft_dice(pred: Tensor<4>, target: Tensor<4>, smooth: f64) -> Tensor<2> {
    let [b, c, _, _] = pred.dims();
    let spatial_sum = |t: Tensor<4>| -> Tensor<2> { t.sum_dim(3).sum_dim(2).reshape([b, c]) };
    let num = spatial_sum(target.clone() * pred.clone()).mul_scalar(2.0);
    let den = spatial_sum(target.clone() * target + pred.clone() * pred);
    let empty: Tensor<2, Bool> = den.clone().lower_equal_elem(0.0);
    let dice = (num.add_scalar(smooth)) / (den.clamp_min(f32::MIN_POSITIVE).add_scalar(smooth));
    dice.mask_fill(empty, 1.0)
}

/// livermask's loss: `−mean over images and channels` of [`soft_dice`]. Shape `[1]`.
pub fn dice_loss(pred: Tensor<4>, target: Tensor<4>, smooth: f64) -> Tensor<1> {
    soft_dice(pred, target, smooth).mean().neg()
}

/// Binary cross-entropy of the sigmoid of `logits` against `target` (0 or 1), the mean over
/// images, channels and pixels, written stably from the logits: `max(z, 0) − z·y + ln(1 +
/// e^{−|z|})` (no probability is ever 0 or 1 in it). Shape `[1]`.
pub fn bce_with_logits(logits: Tensor<4>, target: Tensor<4>) -> Tensor<1> {
    let softplus = logits.clone().abs().neg().exp().log1p();
    (logits.clone().clamp_min(0.0) - logits * target + softplus).mean()
}

/// The training loss (`train.loss`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LossKind {
    /// livermask's soft Dice loss ([`dice_loss`]).
    #[default]
    Dice,
    /// Soft Dice plus binary cross-entropy ([`bce_with_logits`]), as nnU-Net: the cross-entropy
    /// gives every pixel a gradient, also where Dice is flat (small structures such as tumours).
    DiceBce,
}

impl LossKind {
    /// The loss of `logits` (pre-sigmoid outputs) against `target`. Shape `[1]`.
    pub fn loss(self, logits: Tensor<4>, target: Tensor<4>, smooth: f64) -> Tensor<1> {
        let dice = dice_loss(
            burn::tensor::activation::sigmoid(logits.clone()),
            target.clone(),
            smooth,
        );
        match self {
            Self::Dice => dice,
            Self::DiceBce => dice + bce_with_logits(logits, target),
        }
    }
}

/// Hard-Dice counts for one channel, summed over images (and, by the caller, over batches and
/// ranks). Dice = 2·tp / (2·tp + fp + fn).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiceCounts {
    /// Pixels predicted and true.
    pub tp: u64,
    /// Pixels predicted but not true.
    pub fp: u64,
    /// Pixels true but not predicted.
    pub fn_: u64,
}

impl DiceCounts {
    /// Adds another set of counts.
    pub fn add(&mut self, other: DiceCounts) {
        self.tp += other.tp;
        self.fp += other.fp;
        self.fn_ += other.fn_;
    }

    /// Dice from the counts; 1 when both truth and prediction are empty (LiTS convention).
    pub fn dice(&self) -> f64 {
        let den = 2 * self.tp + self.fp + self.fn_;
        if den == 0 {
            1.0
        } else {
            2.0 * self.tp as f64 / den as f64
        }
    }
}

/// Per-channel hard-Dice counts of a batch at threshold 0.5. Returns one [`DiceCounts`] per
/// channel. Counts are reduced per image on the device (exact in f32: an image has < 2^24
/// pixels) and summed in u64 on the host.
pub fn hard_counts(pred: Tensor<4>, target: Tensor<4>) -> Result<Vec<DiceCounts>> {
    let [b, c, _, _] = pred.dims();
    let p = pred.greater_elem(0.5).float();
    let y = target.greater_elem(0.5).float();
    let per_image = |t: Tensor<4>| -> Tensor<2> { t.sum_dim(3).sum_dim(2).reshape([b, c]) };
    let tp = per_image(p.clone() * y.clone());
    let ps = per_image(p);
    let ys = per_image(y);
    let all = crate::tensor_util::read(Tensor::cat(vec![tp, ps, ys], 0))?;
    let values = crate::tensor_util::data_to_f32(all)?;
    let mut out = vec![DiceCounts::default(); c];
    for i in 0..b {
        for (ch, counts) in out.iter_mut().enumerate() {
            let tp = values[i * c + ch] as u64;
            let ps = values[(b + i) * c + ch] as u64;
            let ys = values[(2 * b + i) * c + ch] as u64;
            counts.add(DiceCounts {
                tp,
                fp: ps - tp,
                fn_: ys - tp,
            });
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {

    #[test]
    fn cross_entropy_from_logits_is_the_closed_form() {
        // BCE(z, y) = −y·ln σ(z) − (1 − y)·ln(1 − σ(z)): z = 0 → ln 2 either way; z = 2, y = 0 →
        // −ln(1 − σ(2)) = 2 + ln(1 + e^−2) = 2.126928; z = −30, y = 1 → 30 + ln(1 + e^−30) ≈ 30
        // (finite: no probability is rounded to 0). Mean of the four.
        let device = burn::tensor::Device::flex();
        let z = Tensor::<4>::from_data(
            burn::tensor::TensorData::new(vec![0.0f32, 0.0, 2.0, -30.0], [1, 1, 2, 2]),
            &device,
        );
        let y = Tensor::<4>::from_data(
            burn::tensor::TensorData::new(vec![1.0f32, 0.0, 0.0, 1.0], [1, 1, 2, 2]),
            &device,
        );
        let got = crate::tensor_util::to_f32(bce_with_logits(z, y)).expect("bce")[0] as f64;
        let ln2 = std::f64::consts::LN_2;
        let want =
            (ln2 + ln2 + (2.0 + (-2.0f64).exp().ln_1p()) + (30.0 + (-30.0f64).exp().ln_1p())) / 4.0;
        assert!((got - want).abs() < 1e-5, "{got} vs {want}");
    }

    use super::*;
    use burn::tensor::{Device, TensorData};

    fn t4(v: Vec<f32>, shape: [usize; 4]) -> Tensor<4> {
        Tensor::from_data(TensorData::new(v, shape), &Device::flex())
    }

    #[test]
    fn soft_dice_closed_form_and_empty_channels() {
        // One image, two channels of 2×2.
        // ch0: y = [1,1,0,0], p = [0.5,1,0.5,0]: 2·Σyp = 3, Σy² + Σp² = 2 + 1.5 → 3/3.5.
        // ch1: y = 0, p = 0: empty in both → 1 (smooth 0 would give 0/0).
        let p = t4(vec![0.5, 1.0, 0.5, 0.0, 0.0, 0.0, 0.0, 0.0], [1, 2, 2, 2]);
        let y = t4(vec![1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0], [1, 2, 2, 2]);
        let d =
            crate::tensor_util::to_f32(soft_dice(p.clone(), y.clone(), 0.0)).unwrap_or_default();
        assert!((d[0] - 3.0 / 3.5).abs() < 1e-6, "{d:?}");
        assert_eq!(d[1], 1.0);
        // With smoothing s = 1: (3 + 1) / (3.5 + 1).
        let d =
            crate::tensor_util::to_f32(soft_dice(p.clone(), y.clone(), 1.0)).unwrap_or_default();
        assert!((d[0] - 4.0 / 4.5).abs() < 1e-6, "{d:?}");
        let l = crate::tensor_util::to_f32(dice_loss(p, y, 0.0)).unwrap_or_default();
        assert!((l[0] + (3.0 / 3.5 + 1.0) / 2.0).abs() < 1e-6, "{l:?}");
    }

    #[test]
    fn hard_counts_sum_pixels_then_divide() {
        // Two images, one channel of 4 pixels, threshold 0.5.
        // image 0: pred [1,1,0,0] truth [1,0,1,0] → tp 1, fp 1, fn 1
        // image 1: pred [1,1,1,1] truth [1,1,1,0] → tp 3, fp 1, fn 0
        let p = t4(vec![0.9, 0.6, 0.4, 0.1, 0.7, 0.8, 0.9, 0.51], [2, 1, 2, 2]);
        let y = t4(vec![1.0, 0.0, 1.0, 0.0, 1.0, 1.0, 1.0, 0.0], [2, 1, 2, 2]);
        let c = hard_counts(p, y).unwrap_or_default();
        assert_eq!(
            c,
            vec![DiceCounts {
                tp: 4,
                fp: 2,
                fn_: 1
            }]
        );
        // Global Dice from summed counts: 8 / (8 + 2 + 1) — not the mean of 0.5 and 6/7.
        assert!((c[0].dice() - 8.0 / 11.0).abs() < 1e-12);
        assert_eq!(
            DiceCounts::default().dice(),
            1.0,
            "empty in truth and prediction"
        );
    }
}
