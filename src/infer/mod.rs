//! Inference on real volumes: `predict` (a NIfTI CT in, a label mask on the input's grid out)
//! and `evaluate` (per-case and global figures for liver and tumour, LiTS conventions: Dice,
//! VOE, RVD, ASSD, HD95, precision and recall, the surface distances from [`surface`]).

pub mod overlay;
pub mod surface;

use std::collections::VecDeque;
use std::fs;
use std::path::{Path, PathBuf};

use burn::tensor::{Device, Tensor, TensorData};
use serde::Serialize;

use crate::backend::Backend;
use crate::config::RunConfig;
use crate::data::nifti::{self, Volume};
use crate::data::prepare::{self, Pair, Resize};
use crate::error::{Error, Result};
use crate::model::{DiceCounts, Mode, UNet};
use crate::tensor_util::to_f32;
use crate::train::Trained;
use crate::util::fs::write_atomic;
use surface::{Grid, StructureMetrics, structure_metrics};

/// How `predict` runs.
#[derive(Clone, Debug)]
pub struct PredictOptions {
    /// Slices per forward pass.
    pub batch_size: usize,
    /// Keep only the largest 6-connected liver component (and the tumour inside it).
    pub largest_component: bool,
}

/// A trained model ready for inference.
pub struct Predictor {
    /// The run's config (input size, intensity transform).
    pub cfg: RunConfig,
    /// How slices are resized to the model's input: as the training images were
    /// ([`Predictor::input_resize`]).
    pub resize: Resize,
    model: UNet,
    device: Device,
}

/// Nearest-neighbour resize of a `h_in × w_in` slice to `h_out × w_out` (pixel centres).
pub fn resize_nearest<T: Copy>(
    src: &[T],
    h_in: usize,
    w_in: usize,
    h_out: usize,
    w_out: usize,
) -> Vec<T> {
    // The readers refuse empty images; an empty axis here picks index 0 of nothing.
    let pick = |t: usize, n_in: usize, n_out: usize| {
        (((t as f64 + 0.5) * n_in as f64 / n_out as f64) as usize).min(n_in.saturating_sub(1))
    };
    let cols: Vec<usize> = (0..w_out).map(|c| pick(c, w_in, w_out)).collect();
    let mut out = Vec::with_capacity(h_out * w_out);
    for r in 0..h_out {
        let row = pick(r, h_in, h_out) * w_in;
        out.extend(cols.iter().map(|&c| src[row + c]));
    }
    out
}

impl Predictor {
    /// How a model trained from `trained` sees its inputs resized: as the run's training data
    /// was prepared (`prepare --resize`, recorded in the dataset and the checkpoint; nearest for
    /// phantoms and for checkpoints of older versions, which did not record it).
    pub fn input_resize(trained: &Trained) -> Resize {
        trained.ck.meta.provenance.resize
    }

    /// Refuses, naming the checkpoint, a trained run that cannot segment liver and tumour; free
    /// to call before a device is opened.
    pub fn check(trained: &Trained) -> Result<()> {
        let classes = trained.cfg.model.classes;
        if classes < 3 {
            return Err(Error::checkpoint(
                &trained.file,
                format!(
                    "model.classes = {classes}; predict and evaluate need background, liver and tumour (3 output channels)"
                ),
            ));
        }
        Ok(())
    }

    /// The model of the trained run `trained` on `be`'s device.
    pub fn new(trained: &Trained, be: &Backend) -> Result<Self> {
        Self::check(trained)?;
        Ok(Self {
            cfg: trained.cfg.clone(),
            resize: Self::input_resize(trained),
            model: trained.model(be, &be.device)?,
            device: be.device.clone(),
        })
    }

    /// Labels (0 background, 1 liver, 2 tumour) for every voxel of `vol`, in its voxel order:
    /// slices taken in the canonical axial layout training used, resized to the model's input
    /// size as the training images were ([`Predictor::resize`]; HU rounded to integers as in
    /// the shards), segmented in batches and resized back (nearest). Tumour where channel 2
    /// fires inside the liver (channel 1).
    pub fn predict(&self, vol: &Volume, opts: &PredictOptions) -> Result<Vec<u8>> {
        check_mask_writable(vol)?;
        let (axes, n) = nifti::canonical_axes(vol)?;
        let (cols, rows, nz) = (n[0], n[1], n[2]);
        let s = self.cfg.model.input_size;
        let px = s * s;
        let batch = opts.batch_size.max(1);
        let mut canonical = Vec::with_capacity(cols * rows * nz);
        // The network input of slice z: resized to the model's size, HU rounded to integers as
        // in the shards, intensity-transformed.
        let input_of = |z: usize| -> Vec<f32> {
            let slice = nifti::canonical_slice(&vol.data, vol.dims, axes, z);
            prepare::resize_image(&slice, rows, cols, s, self.resize)
                .into_iter()
                .map(|v| {
                    let hu = v.round().clamp(i16::MIN as f32, i16::MAX as f32) as i16;
                    self.cfg.data.transform(hu)
                })
                .collect()
        };
        // 2.5-D context as in training: slices z − k … z + k, the volume's edge slices repeated.
        let k = self.cfg.data.context_slices as i64;
        let channels = self.cfg.data.in_channels();
        let mut z0 = 0;
        while z0 < nz {
            let b = batch.min(nz - z0);
            let mut inputs = Vec::with_capacity(b * channels * px);
            for z in z0..z0 + b {
                for dz in -k..=k {
                    inputs.extend(input_of((z as i64 + dz).clamp(0, nz as i64 - 1) as usize));
                }
            }
            let x =
                Tensor::<4>::from_data(TensorData::new(inputs, [b, channels, s, s]), &self.device);
            let probs = to_f32(self.model.forward(x, Mode::Eval))?;
            // At least 3 ([`Predictor::new`]).
            let classes = self.cfg.model.classes;
            for k in 0..b {
                let p = |c: usize| &probs[(k * classes + c) * px..(k * classes + c + 1) * px];
                let (liver, tumour) = (p(1), p(2));
                let small: Vec<u8> = liver
                    .iter()
                    .zip(tumour)
                    .map(|(&l, &t)| match (l > 0.5, t > 0.5) {
                        (true, true) => 2,
                        (true, false) => 1,
                        _ => 0,
                    })
                    .collect();
                canonical.extend(resize_nearest(&small, s, s, rows, cols));
            }
            z0 += b;
        }
        let mut labels = nifti::from_canonical(&canonical, vol.dims, axes);
        if opts.largest_component {
            keep_largest_component(&mut labels, vol.dims);
        }
        Ok(labels)
    }
}

/// Zeroes every liver voxel (label ≥ 1) outside the largest 6-connected liver component.
pub fn keep_largest_component(labels: &mut [u8], dims: [usize; 3]) {
    let [nx, ny, nz] = dims;
    let mut comp = vec![0u32; labels.len()];
    let mut sizes = vec![0usize]; // component 0 = none
    let mut queue = VecDeque::new();
    for start in 0..labels.len() {
        if labels[start] == 0 || comp[start] != 0 {
            continue;
        }
        let id = sizes.len() as u32;
        let mut size = 0;
        comp[start] = id;
        queue.push_back(start);
        while let Some(v) = queue.pop_front() {
            size += 1;
            let (x, y, z) = (v % nx, v / nx % ny, v / (nx * ny));
            let mut visit = |w: usize| {
                if labels[w] != 0 && comp[w] == 0 {
                    comp[w] = id;
                    queue.push_back(w);
                }
            };
            if x > 0 {
                visit(v - 1);
            }
            if x + 1 < nx {
                visit(v + 1);
            }
            if y > 0 {
                visit(v - nx);
            }
            if y + 1 < ny {
                visit(v + nx);
            }
            if z > 0 {
                visit(v - nx * ny);
            }
            if z + 1 < nz {
                visit(v + nx * ny);
            }
        }
        sizes.push(size);
    }
    let Some(best) = (1..sizes.len()).max_by_key(|&c| sizes[c]) else {
        return;
    };
    for (l, &c) in labels.iter_mut().zip(&comp) {
        if c != 0 && c as usize != best {
            *l = 0;
        }
    }
}

/// Voxel counts of `pred` against `truth` for the structure `is(label)`; Dice and the LiTS
/// empty-structure convention come with [`DiceCounts`].
pub fn counts_of(truth: &[u8], pred: &[u8], is: impl Fn(u8) -> bool) -> DiceCounts {
    let mut c = DiceCounts::default();
    for (&t, &p) in truth.iter().zip(pred) {
        match (is(t), is(p)) {
            (true, true) => c.tp += 1,
            (false, true) => c.fp += 1,
            (true, false) => c.fn_ += 1,
            _ => {}
        }
    }
    c
}

/// One case of an evaluation.
#[derive(Clone, Debug, Serialize)]
pub struct CaseResult {
    /// The image's path under the input folder ([`case_name`]).
    pub case: String,
    /// Liver (label ≥ 1) Dice.
    pub dice_liver: f64,
    /// Tumour (label 2) Dice; 1 when neither truth nor prediction has tumour.
    pub dice_tumour: f64,
    /// True / predicted liver volume, mL.
    pub liver_ml_true: f64,
    /// Predicted liver volume, mL.
    pub liver_ml_pred: f64,
    /// Relative liver volume difference (pred − true) / true; null without true liver.
    pub liver_rvd: Option<f64>,
    /// True tumour volume, mL.
    pub tumour_ml_true: f64,
    /// Predicted tumour volume, mL.
    pub tumour_ml_pred: f64,
    /// Relative tumour volume difference; null without true tumour.
    pub tumour_rvd: Option<f64>,
    /// Voxel counts for liver.
    pub liver: DiceCounts,
    /// Voxel counts for tumour.
    pub tumour: DiceCounts,
    /// Liver's overlap and surface-distance metrics (LiTS).
    pub liver_metrics: StructureMetrics,
    /// Tumour's overlap and surface-distance metrics (LiTS).
    pub tumour_metrics: StructureMetrics,
}

/// The mean of one metric over the cases where it is defined (see [`surface`] for the cases
/// where it is not, e.g. a distance to an empty structure).
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct MeanMetric {
    /// The mean (`None` when no case defines it).
    pub mean: Option<f64>,
    /// Cases that define it.
    pub cases: usize,
    /// Cases that do not (left out of the mean).
    pub undefined: usize,
}

impl MeanMetric {
    fn of<'a>(values: impl Iterator<Item = Option<f64>> + 'a) -> Self {
        let (mut sum, mut cases, mut undefined) = (0.0, 0usize, 0usize);
        for v in values {
            match v {
                Some(v) => {
                    sum += v;
                    cases += 1;
                }
                None => undefined += 1,
            }
        }
        Self {
            mean: (cases > 0).then(|| sum / cases as f64),
            cases,
            undefined,
        }
    }
}

/// The per-case means of a structure's metrics.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct StructureMeans {
    /// Volume overlap error.
    pub voe: MeanMetric,
    /// Relative volume difference.
    pub rvd: MeanMetric,
    /// Average symmetric surface distance, mm.
    pub assd_mm: MeanMetric,
    /// 95th-percentile Hausdorff distance, mm.
    pub hd95_mm: MeanMetric,
    /// Maximum surface distance, mm.
    pub hd_mm: MeanMetric,
    /// Precision.
    pub precision: MeanMetric,
    /// Recall.
    pub recall: MeanMetric,
}

impl StructureMeans {
    fn of(cases: &[CaseResult], pick: impl Fn(&CaseResult) -> &StructureMetrics) -> Self {
        let m = |f: fn(&StructureMetrics) -> Option<f64>| {
            MeanMetric::of(cases.iter().map(|c| f(pick(c))))
        };
        Self {
            voe: m(|s| Some(s.voe)),
            rvd: m(|s| s.rvd),
            assd_mm: m(|s| s.assd_mm),
            hd95_mm: m(|s| s.hd95_mm),
            hd_mm: m(|s| s.hd_mm),
            precision: m(|s| s.precision),
            recall: m(|s| s.recall),
        }
    }
}

/// Dice from the counts summed over all cases (LiTS "Dice global"), and the per-case mean.
#[derive(Clone, Debug, Serialize)]
pub struct Global {
    /// Liver Dice over all voxels of all cases.
    pub dice_liver: f64,
    /// Tumour Dice over all voxels of all cases.
    pub dice_tumour: f64,
    /// Mean of the per-case liver Dice.
    pub mean_case_dice_liver: f64,
    /// Mean of the per-case tumour Dice.
    pub mean_case_dice_tumour: f64,
    /// Per-case means of the liver's other metrics.
    pub liver: StructureMeans,
    /// Per-case means of the tumour's other metrics.
    pub tumour: StructureMeans,
    /// Cases.
    pub cases: usize,
}

/// `evaluation.json`.
#[derive(Clone, Debug, Serialize)]
pub struct Evaluation {
    /// Run directory or checkpoint evaluated.
    pub checkpoint: String,
    /// Input folder.
    pub input: String,
    /// Global figures.
    pub global: Global,
    /// Per case.
    pub cases: Vec<CaseResult>,
}

/// Scores one predicted volume against its truth on `grid` (LiTS: liver is label ≥ 1, tumour
/// label 2); volumes in mL from `voxel_ml` ([`voxel_ml`] of the volume's affine).
pub fn score_case(
    case: &str,
    truth: &[u8],
    pred: &[u8],
    grid: &Grid,
    voxel_ml: f64,
) -> Result<CaseResult> {
    let metrics = |is: fn(u8) -> bool| {
        structure_metrics(truth, pred, grid, is)
            .map_err(|e| Error::Invalid(format!("scoring {case}: {e}")))
    };
    let liver_metrics = metrics(|l| l >= 1)?;
    let tumour_metrics = metrics(|l| l == 2)?;
    let liver = counts_of(truth, pred, |l| l >= 1);
    let tumour = counts_of(truth, pred, |l| l == 2);
    let (t, p) = (|c: &DiceCounts| c.tp + c.fn_, |c: &DiceCounts| c.tp + c.fp);
    Ok(CaseResult {
        case: case.to_string(),
        dice_liver: liver.dice(),
        dice_tumour: tumour.dice(),
        liver_ml_true: t(&liver) as f64 * voxel_ml,
        liver_ml_pred: p(&liver) as f64 * voxel_ml,
        liver_rvd: liver_metrics.rvd,
        tumour_ml_true: t(&tumour) as f64 * voxel_ml,
        tumour_ml_pred: p(&tumour) as f64 * voxel_ml,
        tumour_rvd: tumour_metrics.rvd,
        liver,
        tumour,
        liver_metrics,
        tumour_metrics,
    })
}

/// Masks are written as NIfTI-1, which holds at most [`nifti::MAX_DIM`] voxels per axis; a
/// longer volume (only a DICOM series can be one) is refused before it is predicted, not after.
fn check_mask_writable(vol: &Volume) -> Result<()> {
    if vol.dims.iter().any(|&d| d > nifti::MAX_DIM) {
        return Err(Error::dataset(
            &vol.path,
            format!(
                "{:?} voxels: its mask would be a NIfTI-1 volume, which holds at most {} per axis; split the series",
                vol.dims,
                nifti::MAX_DIM
            ),
        ));
    }
    Ok(())
}

/// Volume of one voxel in mL: |det| of the affine's 3×3 part, mm³ → mL.
pub fn voxel_ml(affine: &[[f64; 4]; 3]) -> f64 {
    let a = affine;
    let det = a[0][0] * (a[1][1] * a[2][2] - a[1][2] * a[2][1])
        - a[0][1] * (a[1][0] * a[2][2] - a[1][2] * a[2][0])
        + a[0][2] * (a[1][0] * a[2][1] - a[1][1] * a[2][0]);
    det.abs() / 1000.0
}

/// Summarises per-case results.
pub fn global(cases: &[CaseResult]) -> Global {
    let (mut l, mut t) = (DiceCounts::default(), DiceCounts::default());
    for c in cases {
        l.add(c.liver);
        t.add(c.tumour);
    }
    let n = cases.len().max(1) as f64;
    Global {
        dice_liver: l.dice(),
        dice_tumour: t.dice(),
        mean_case_dice_liver: cases.iter().map(|c| c.dice_liver).sum::<f64>() / n,
        mean_case_dice_tumour: cases.iter().map(|c| c.dice_tumour).sum::<f64>() / n,
        liver: StructureMeans::of(cases, |c| &c.liver_metrics),
        tumour: StructureMeans::of(cases, |c| &c.tumour_metrics),
        cases: cases.len(),
    }
}

/// The case's name in `evaluate`'s results: its image's path under the input folder (or the
/// case list's folder), so that two cases named `ct.nii.gz` in two folders stay apart.
pub fn case_name(input: &Path, pair: &Pair) -> String {
    let base = if input.is_dir() {
        Some(input)
    } else {
        input.parent()
    };
    base.and_then(|b| pair.image.strip_prefix(b).ok())
        .unwrap_or(&pair.image)
        .display()
        .to_string()
}

/// The mask file `evaluate --save-masks` writes for `pair`.
pub fn mask_path(out: &Path, pair: &Pair) -> PathBuf {
    let name = pair
        .image
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let stem = name.trim_end_matches(".gz").trim_end_matches(".nii");
    out.join(format!("{stem}-pred.nii.gz"))
}

/// Every file `evaluate` writes into `out` for `pairs` (for the output-safety check).
pub fn evaluation_outputs(
    out: &Path,
    pairs: &[Pair],
    save_masks: bool,
    overlays: bool,
) -> Vec<PathBuf> {
    let mut v = vec![out.join("evaluation.json"), out.join("evaluation.csv")];
    if save_masks {
        v.extend(pairs.iter().map(|p| mask_path(out, p)));
    }
    if overlays {
        v.extend(
            pairs
                .iter()
                .map(|p| overlay::path_beside(&mask_path(out, p))),
        );
    }
    v
}

/// What `evaluate` reads and writes.
pub struct EvaluateJob<'a> {
    /// The run directory or checkpoint evaluated (recorded in the output).
    pub checkpoint: &'a Path,
    /// The LiTS folder or CSV the cases came from (recorded in the output).
    pub input: &'a Path,
    /// Its (image, label) pairs.
    pub pairs: &'a [Pair],
    /// The output folder.
    pub out: &'a Path,
    /// How to predict.
    pub predict: PredictOptions,
    /// Also write each prediction as `<case>-pred.nii.gz`.
    pub save_masks: bool,
    /// Also draw each case as `<case>-pred-overlay.png` ([`overlay`]).
    pub overlays: bool,
}

/// Runs `evaluate`: every (image, label) pair of the job predicted and scored;
/// `evaluation.csv` and `evaluation.json` written atomically into its output folder (and each
/// prediction, with `save_masks`).
pub fn evaluate(
    predictor: &Predictor,
    job: &EvaluateJob,
    mut progress: impl FnMut(&CaseResult, usize, usize),
) -> Result<Evaluation> {
    let (pairs, out, opts, save_masks) = (job.pairs, job.out, &job.predict, job.save_masks);
    fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let mut cases = Vec::new();
    for (k, pair) in pairs.iter().enumerate() {
        let image = prepare::read_volume(&pair.image)?;
        // Surface distances need finite voxel sizes. Only a NIfTI pixdim can hold anything
        // else (nibabel loads a NaN there), and predicting needs only the affine, so only
        // `evaluate` refuses it, before any work on the case.
        if let Some(k) = (0..3).find(|&k| !image.spacing[k].is_finite()) {
            return Err(Error::dataset(
                &pair.image,
                format!(
                    "header field pixdim[{}] = {}; evaluate's surface distances need a finite voxel size (mm)",
                    k + 1,
                    image.spacing[k]
                ),
            ));
        }
        let label = nifti::read(&pair.label)?;
        prepare::check_same_grid(&image, &label)?;
        let truth = prepare::label_values(&label)?;
        drop(label);
        let pred = predictor.predict(&image, opts)?;
        let name = case_name(job.input, pair);
        // Scored before anything of the case is written, so a case that cannot be scored
        // leaves no mask behind.
        let grid = Grid {
            dims: image.dims,
            spacing: image.spacing,
        };
        let r = score_case(&name, &truth, &pred, &grid, voxel_ml(&image.affine))?;
        if save_masks {
            nifti::write_u8(&mask_path(out, pair), image.dims, &image.affine, &pred)?;
        }
        if job.overlays {
            let path = overlay::path_beside(&mask_path(out, pair));
            overlay::write(&path, &image, &pred, Some(&truth))?;
        }
        progress(&r, k + 1, pairs.len());
        cases.push(r);
    }
    let eval = Evaluation {
        checkpoint: job.checkpoint.display().to_string(),
        input: job.input.display().to_string(),
        global: global(&cases),
        cases,
    };
    let json = serde_json::to_string_pretty(&eval)
        .map_err(|e| Error::Invalid(format!("serialising the evaluation: {e}")))?;
    write_atomic(&out.join("evaluation.json"), json.as_bytes())?;
    let mut csv = String::from(
        "case,dice_liver,dice_tumour,liver_ml_true,liver_ml_pred,liver_rvd,tumour_ml_true,tumour_ml_pred,tumour_rvd",
    );
    for st in ["liver", "tumour"] {
        for m in ["voe", "assd_mm", "hd95_mm", "hd_mm", "precision", "recall"] {
            csv.push_str(&format!(",{st}_{m}"));
        }
    }
    csv.push('\n');
    let opt = |v: Option<f64>| v.map_or(String::new(), |v| format!("{v:.6}"));
    for c in &eval.cases {
        csv.push_str(&format!(
            "{},{:.6},{:.6},{:.3},{:.3},{},{:.3},{:.3},{}",
            crate::util::csv_field(&c.case),
            c.dice_liver,
            c.dice_tumour,
            c.liver_ml_true,
            c.liver_ml_pred,
            opt(c.liver_rvd),
            c.tumour_ml_true,
            c.tumour_ml_pred,
            opt(c.tumour_rvd)
        ));
        for m in [&c.liver_metrics, &c.tumour_metrics] {
            for v in [
                Some(m.voe),
                m.assd_mm,
                m.hd95_mm,
                m.hd_mm,
                m.precision,
                m.recall,
            ] {
                csv.push(',');
                csv.push_str(&opt(v));
            }
        }
        csv.push('\n');
    }
    write_atomic(&out.join("evaluation.csv"), csv.as_bytes())?;
    Ok(eval)
}

/// Output path check for `predict`: a `.nii` or `.nii.gz` file name.
pub fn check_output_name(path: &Path) -> Result<PathBuf> {
    let name = path.to_string_lossy().to_ascii_lowercase();
    if !(name.ends_with(".nii") || name.ends_with(".nii.gz")) {
        return Err(Error::Argument(format!(
            "--output {}: expected a .nii or .nii.gz file name",
            path.display()
        )));
    }
    Ok(path.to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dice_follows_lits_conventions() {
        // Closed form: truth {0,1,1,2,2,0}, prediction {0,1,2,2,0,1}.
        let truth = [0u8, 1, 1, 2, 2, 0];
        let pred = [0u8, 1, 2, 2, 0, 1];
        // 0.5 mL voxels (10 × 10 × 5 mm) in a 6 × 1 × 1 volume.
        let grid = |n: usize, spacing: [f64; 3]| Grid {
            dims: [n, 1, 1],
            spacing,
        };
        let r = score_case("c", &truth, &pred, &grid(6, [10.0, 10.0, 5.0]), 0.5).expect("score");
        // Liver (≥1): truth at 1..=4, pred at 1,2,3,5 → tp 3, fp 1, fn 1 → 6/8.
        assert_eq!(
            r.liver,
            DiceCounts {
                tp: 3,
                fp: 1,
                fn_: 1
            }
        );
        assert_eq!(r.dice_liver, 0.75);
        // Tumour (=2): truth at 3,4; pred at 2,3 → tp 1, fp 1, fn 1 → 2/4.
        assert_eq!(r.dice_tumour, 0.5);
        assert_eq!(r.liver_ml_true, 2.0);
        assert_eq!(r.liver_rvd, Some(0.0));
        // No tumour anywhere: Dice 1 (LiTS); tumour only predicted: 0, no RVD.
        let mm = [10.0, 10.0, 10.0];
        let none = score_case("n", &[0, 1, 1], &[0, 1, 0], &grid(3, mm), 1.0).expect("score");
        assert_eq!(none.dice_tumour, 1.0);
        let false_alarm =
            score_case("f", &[0, 1, 1], &[0, 2, 1], &grid(3, mm), 1.0).expect("score");
        assert_eq!(false_alarm.dice_tumour, 0.0);
        assert_eq!(false_alarm.tumour_rvd, None);
        // No tumour in truth and prediction: distances 0 (a perfect case); tumour only predicted:
        // undefined, counted apart from the mean.
        assert_eq!(none.tumour_metrics.assd_mm, Some(0.0));
        assert_eq!(false_alarm.tumour_metrics.assd_mm, None);
        let g2 = global(&[none.clone(), false_alarm.clone()]);
        assert_eq!(
            g2.tumour.assd_mm,
            MeanMetric {
                mean: Some(0.0),
                cases: 1,
                undefined: 1
            }
        );
        // Global Dice sums counts first: liver tp 3+1, fp 1+0, fn 1+1 → 8 / (8 + 1 + 2).
        let g = global(&[r, none]);
        assert_eq!(g.dice_liver, 2.0 * 4.0 / (2.0 * 4.0 + 1.0 + 2.0));
        assert_eq!(g.mean_case_dice_liver, (0.75 + 2.0 / 3.0) / 2.0);
    }

    #[test]
    fn largest_component_keeps_one_blob() {
        // 4×1×1 volume: two blobs, sizes 2 and 1.
        let mut l = vec![1u8, 2, 0, 1];
        keep_largest_component(&mut l, [4, 1, 1]);
        assert_eq!(l, vec![1, 2, 0, 0]);
        let mut e = vec![0u8; 8];
        keep_largest_component(&mut e, [2, 2, 2]);
        assert_eq!(e, vec![0; 8]);
    }

    #[test]
    fn resize_nearest_round_trips_integer_factors() {
        let src: Vec<u8> = (0..6).collect(); // 2×3
        let up = resize_nearest(&src, 2, 3, 4, 6);
        assert_eq!(&up[..6], &[0, 0, 1, 1, 2, 2]);
        assert_eq!(resize_nearest(&up, 4, 6, 2, 3), src);
    }

    #[test]
    fn a_volume_longer_than_nifti_holds_is_refused_before_prediction() {
        // 32,768 slices: one more than a NIfTI-1 dim field holds. The data is never read.
        let vol = Volume {
            path: "series".into(),
            dims: [512, 512, nifti::MAX_DIM + 1],
            spacing: [1.0; 3],
            affine: [
                [1.0, 0.0, 0.0, 0.0],
                [0.0, 1.0, 0.0, 0.0],
                [0.0, 0.0, 1.0, 0.0],
            ],
            data: Vec::new(),
            datatype: 4,
        };
        let e = check_mask_writable(&vol).expect_err("refused");
        assert!(matches!(e, Error::Dataset { .. }), "{e}");
        assert!(
            e.to_string().contains("series") && e.to_string().contains("32767"),
            "{e}"
        );
        let fits = Volume {
            dims: [512, 512, nifti::MAX_DIM],
            ..vol
        };
        assert!(check_mask_writable(&fits).is_ok());
    }

    #[test]
    fn voxel_volume_from_the_affine() {
        let a = [
            [-0.7, 0.0, 0.0, 1.0],
            [0.0, 0.7, 0.0, 2.0],
            [0.0, 0.0, 2.5, 3.0],
        ];
        assert!((voxel_ml(&a) - 0.7 * 0.7 * 2.5 / 1000.0).abs() < 1e-15);
    }
}
