//! Distributed validation: each rank evaluates every `size`-th validation slice, and the sums
//! are reduced so that every rank holds the exact global figures (soft Dice per channel, hard
//! Dice of liver and tumour from voxel counts summed over the whole validation set).

use std::sync::Arc;

use burn::module::Module;
use burn::tensor::Device;
use serde::{Deserialize, Serialize};

use super::step::batch_tensors;
use crate::comm::Communicator;
use crate::config::RunConfig;
use crate::data::{Dataset, Loader, make_batch};
use crate::error::Result;
use crate::model::{DeviceCaps, DiceCounts, Mode, UNet, hard_counts, soft_dice};
use crate::tensor_util::to_f32;

/// Validation results (global over all ranks).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ValResult {
    /// Dice loss over the validation set.
    pub loss: f64,
    /// Mean soft Dice per channel.
    pub soft_dice: Vec<f64>,
    /// Summed hard-Dice counts per channel.
    pub counts: Vec<DiceCounts>,
    /// Images evaluated.
    pub images: u64,
}

impl ValResult {
    /// Hard Dice of channel `c` (1 when absent from truth and prediction; NaN if no such channel).
    pub fn dice(&self, c: usize) -> f64 {
        self.counts.get(c).map_or(f64::NAN, DiceCounts::dice)
    }
}

/// Evaluates `model` on this rank's share of `indices` (every `size`-th slice from `rank`) and
/// sums the results over all ranks: every rank returns the exact global figures. Collective.
pub fn validate(
    model: &UNet,
    ds: &Arc<Dataset>,
    indices: &[usize],
    cfg: &RunConfig,
    device: &Device,
    comm: &dyn Communicator,
) -> Result<ValResult> {
    // Evaluation is in f32 whatever the run trains in, as `ctseg validate`, `evaluate` and
    // `predict` are: the best checkpoint is chosen by the figures a user will get.
    let caps = DeviceCaps {
        f16_operands: false,
        ..model.caps
    };
    let model = model.valid().with_caps(caps);
    let classes = cfg.model.classes;
    let mine: Vec<usize> = indices
        .iter()
        .copied()
        .skip(comm.rank())
        .step_by(comm.size())
        .collect();
    let batches: Vec<Vec<usize>> = mine
        .chunks(cfg.train.batch_size)
        .map(<[usize]>::to_vec)
        .collect();
    let (ds2, data) = (ds.clone(), cfg.data.clone());
    let mut loader = Loader::spawn(batches, cfg.data.prefetch, move |idx| {
        make_batch(&ds2, &data, classes, idx)
    })?;
    // sums: [dice sum over images×channels, soft dice per channel ×C, (tp, fp, fn) ×C, images]
    let mut sums = vec![0.0f64; 1 + classes + 3 * classes + 1];
    // A loader failure is returned at once: the caller's abort wrapper ends every rank.
    while let Some(batch) = loader.next_batch()? {
        let (x, y) = batch_tensors(&batch, device);
        let pred = model.forward(x, Mode::Eval);
        let dice = to_f32(soft_dice(pred.clone(), y.clone(), cfg.train.loss_smooth))?;
        for (k, d) in dice.iter().enumerate() {
            sums[0] += *d as f64;
            sums[1 + k % classes] += *d as f64;
        }
        for (c, cnt) in hard_counts(pred, y)?.iter().enumerate() {
            let o = 1 + classes + 3 * c;
            sums[o] += cnt.tp as f64;
            sums[o + 1] += cnt.fp as f64;
            sums[o + 2] += cnt.fn_ as f64;
        }
        sums[1 + 4 * classes] += batch.len as f64;
    }
    comm.allreduce_sum_f64(&mut sums)?;
    let images = sums[1 + 4 * classes];
    let n = images.max(1.0);
    Ok(ValResult {
        loss: -sums[0] / (n * classes as f64),
        soft_dice: (0..classes).map(|c| sums[1 + c] / n).collect(),
        counts: (0..classes)
            .map(|c| {
                let o = 1 + classes + 3 * c;
                DiceCounts {
                    tp: sums[o] as u64,
                    fp: sums[o + 1] as u64,
                    fn_: sums[o + 2] as u64,
                }
            })
            .collect(),
        images: images as u64,
    })
}
