//! `ctseg predict`, `ctseg evaluate` and `ctseg export`: a trained run put to use. None of them
//! writes over one of its inputs ([`refuse_overwriting_inputs`]).

use std::path::{Path, PathBuf};

use anyhow::Result;

use ctseg::backend::{self, BackendKind, DeviceRequest};
use ctseg::bench::conv_choice::ConvWorkload;
use ctseg::comm::Local;
use ctseg::error::Error;
use ctseg::infer::{Predictor, overlay};
use ctseg::rundir::RunDir;
use ctseg::train::Trained;
use ctseg::train::precision::Precision;
use ctseg::util::fs::{refuse_overwriting_inputs, refuse_shared_outputs};

use super::open_backend;
use crate::cli::args::{EvaluateArgs, ExportArgs, ExportFormat, InferArgs, PredictArgs};

/// The trained run `a` points at, on its device (one process: inference is not distributed).
fn predictor(a: &InferArgs) -> Result<Predictor> {
    let trained = Trained::open(&a.checkpoint, a.checkpoint_kind)?;
    if let Some(note) = &trained.note {
        eprintln!("{note}");
    }
    Predictor::check(&trained)?;
    // Inference runs in f32 whatever the run trained in.
    let work = ConvWorkload {
        batch: a.batch_size,
        train: false,
    };
    let be = open_backend(
        &a.backend,
        &trained.cfg,
        Precision::F32,
        work,
        &Local,
        false,
    )?;
    let predictor = Predictor::new(&trained, &be)?;
    eprintln!(
        "model inputs resized to {0}x{0} by {1}, as the run's training images were",
        predictor.cfg.model.input_size,
        match predictor.resize {
            ctseg::data::prepare::Resize::Nearest => "nearest neighbour",
            ctseg::data::prepare::Resize::Area => "area (mean over the covered pixels)",
        }
    );
    Ok(predictor)
}

fn is_nifti_name(p: &Path) -> bool {
    let n = p.to_string_lossy().to_ascii_lowercase();
    n.ends_with(".nii") || n.ends_with(".nii.gz")
}

/// (input, output) pairs of `predict`: a folder of NIfTI files gives a folder of
/// `<stem>-pred.nii.gz`; a file, or a folder holding one DICOM series, gives one mask.
fn predict_jobs(input: &Path, output: &Path) -> Result<Vec<(PathBuf, PathBuf)>> {
    let niftis: Vec<PathBuf> = if input.is_dir() {
        let mut v: Vec<PathBuf> = std::fs::read_dir(input)
            .map_err(|e| Error::io(input, e))?
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.is_file() && is_nifti_name(p))
            .collect();
        v.sort();
        v
    } else {
        Vec::new()
    };
    if niftis.is_empty() {
        return Ok(vec![(
            input.to_path_buf(),
            ctseg::infer::check_output_name(output)?,
        )]);
    }
    Ok(niftis
        .into_iter()
        .map(|p| {
            let name = p
                .file_name()
                .map_or(String::new(), |n| n.to_string_lossy().into_owned());
            let stem = name.trim_end_matches(".gz").trim_end_matches(".nii");
            let out = output.join(format!("{stem}-pred.nii.gz"));
            (p, out)
        })
        .collect())
}

/// `ctseg predict`.
pub fn predict(a: PredictArgs) -> Result<()> {
    // 1. What to read and write; nothing written may be something read, or written twice.
    let jobs = predict_jobs(&a.input, &a.output)?;
    let inputs: Vec<&Path> = jobs.iter().map(|(i, _)| i.as_path()).collect();
    refuse_shared_outputs(
        "--output",
        jobs.iter().map(|(i, o)| (i.as_path(), o.as_path())),
    )?;
    for (_, out) in &jobs {
        refuse_overwriting_inputs("--output", out, &inputs)?;
        if a.overlay {
            refuse_overwriting_inputs("--overlay", &overlay::path_beside(out), &inputs)?;
        }
    }
    // 2. The model, before anything is written: a refused checkpoint leaves no output folder.
    let predictor = predictor(&a.infer)?;
    if jobs.len() > 1 || a.input.is_dir() && jobs[0].1 != a.output {
        std::fs::create_dir_all(&a.output).map_err(|e| Error::io(&a.output, e))?;
    }
    // 3. Each volume: read, segment, write the mask on its grid.
    let opts = a.infer.options();
    for (input, output) in jobs {
        let t = std::time::Instant::now();
        let vol = ctseg::data::prepare::read_volume(&input)?;
        let labels = predictor.predict(&vol, &opts)?;
        ctseg::data::nifti::write_u8(&output, vol.dims, &vol.affine, &labels)?;
        if a.overlay {
            overlay::write(&overlay::path_beside(&output), &vol, &labels, None)?;
        }
        let ml = ctseg::infer::voxel_ml(&vol.affine);
        let liver = labels.iter().filter(|&&l| l >= 1).count() as f64 * ml;
        let tumour = labels.iter().filter(|&&l| l == 2).count() as f64 * ml;
        println!(
            "{} -> {} | {}x{}x{} | liver {liver:.1} mL, tumour {tumour:.1} mL | {:.1} s",
            input.display(),
            output.display(),
            vol.dims[0],
            vol.dims[1],
            vol.dims[2],
            t.elapsed().as_secs_f64()
        );
    }
    Ok(())
}

/// `ctseg evaluate`.
pub fn evaluate(a: EvaluateArgs) -> Result<()> {
    // 1. The cases; no output may be one of them (or the case list), or another case's.
    let pairs = ctseg::data::prepare::find_pairs(&a.input)?;
    let mut inputs: Vec<&Path> = vec![a.input.as_path()];
    for p in &pairs {
        inputs.push(&p.image);
        inputs.push(&p.label);
    }
    for out in ctseg::infer::evaluation_outputs(&a.out, &pairs, a.save_masks, a.overlays) {
        refuse_overwriting_inputs("--out", &out, &inputs)?;
    }
    if a.save_masks || a.overlays {
        let masks: Vec<PathBuf> = pairs
            .iter()
            .map(|p| ctseg::infer::mask_path(&a.out, p))
            .collect();
        let images = pairs.iter().map(|p| p.image.as_path());
        refuse_shared_outputs("--out", images.zip(masks.iter().map(PathBuf::as_path)))?;
    }
    // 2. Predict and score every case.
    let predictor = predictor(&a.infer)?;
    let job = ctseg::infer::EvaluateJob {
        checkpoint: &a.infer.checkpoint,
        input: &a.input,
        pairs: &pairs,
        out: &a.out,
        predict: a.infer.options(),
        save_masks: a.save_masks,
        overlays: a.overlays,
    };
    let eval = ctseg::infer::evaluate(&predictor, &job, |c, k, n| {
        println!(
            "[{k}/{n}] {}: Dice liver {:.4}, tumour {:.4} | liver {:.1} mL (true {:.1})",
            c.case, c.dice_liver, c.dice_tumour, c.liver_ml_pred, c.liver_ml_true
        )
    })?;
    let g = &eval.global;
    println!(
        "{} cases: global Dice liver {:.4}, tumour {:.4} | mean per case: liver {:.4}, tumour {:.4} | {}",
        g.cases,
        g.dice_liver,
        g.dice_tumour,
        g.mean_case_dice_liver,
        g.mean_case_dice_tumour,
        a.out.join("evaluation.csv").display()
    );
    Ok(())
}

/// `ctseg export`.
pub fn export(a: ExportArgs) -> Result<()> {
    // 1. The run; the output may be none of its files.
    let trained = Trained::open(&a.checkpoint, a.checkpoint_kind)?;
    if let Some(note) = &trained.note {
        eprintln!("{note}");
    }
    let run = RunDir::new(&a.checkpoint);
    let run_files = [
        run.config(),
        run.metrics(),
        run.summary(),
        run.checkpoint(ctseg::rundir::CheckpointKind::Last),
        run.checkpoint(ctseg::rundir::CheckpointKind::Best),
    ];
    let mut inputs: Vec<&Path> = vec![trained.file.as_path()];
    inputs.extend(run_files.iter().map(PathBuf::as_path));
    refuse_overwriting_inputs("--out", &a.out, &inputs)?;
    let cfg = &trained.cfg;
    match a.format {
        ExportFormat::Safetensors => ctseg::export::check_exportable(cfg)?,
        ExportFormat::Onnx => ctseg::export::check_onnx_exportable(cfg)?,
    }
    // 2. The model, on the CPU's autodiff device: trainable and non-trainable tensors are told
    // apart by require-grad, which needs one.
    let be = backend::open(&DeviceRequest {
        kind: BackendKind::Cpu,
        threads: 0,
        adapter: None,
        gpu_conv: Default::default(),
        cooperative_matrices: true,
    })?;
    let steps = trained.ck.meta.step;
    let model = trained.model(&be, &be.device.clone().autodiff())?;
    let inputs = ctseg::export::intensity_text(cfg);
    match a.format {
        ExportFormat::Safetensors => {
            let n = ctseg::export::export_safetensors(&model, cfg, steps, &a.out)?;
            println!(
                "{} tensors -> {} | in PyTorch: LivermaskUNet({}, levels={}, classes={}).load_state_dict(safetensors.torch.load_file(...)); inputs: {inputs}",
                n,
                a.out.display(),
                cfg.model.width,
                cfg.model.depth,
                cfg.model.classes,
            );
        }
        ExportFormat::Onnx => {
            let bytes = ctseg::export::export_onnx(&model, cfg, steps, a.fold_batch_norm, &a.out)?;
            println!(
                "ONNX model ({:.1} MB, opset {}) -> {} | input `{}` [batch, {}, {s}, {s}] ({inputs}); output `{}` [batch, {}, {s}, {s}]",
                bytes as f64 / 1e6,
                ctseg::export::onnx::DEFAULT_OPSET,
                a.out.display(),
                ctseg::export::onnx::INPUT_NAME,
                cfg.data.in_channels(),
                ctseg::export::onnx::OUTPUT_NAME,
                cfg.model.classes,
                s = cfg.model.input_size,
            );
        }
    }
    Ok(())
}
