//! `ctseg train` and `ctseg validate`.

use std::path::{Path, PathBuf};

use anyhow::Result;

use ctseg::bench::conv_choice::ConvWorkload;
use ctseg::comm::Communicator;
use ctseg::config::RunConfig;
use ctseg::rundir::{Checkpoint, CheckpointKind, RunDir};
use ctseg::train::precision::Precision;
use ctseg::train::{Start, TrainOptions, TrainOutcome, Trained};

use super::{open_backend, with_comm};
use crate::cli::EXIT_STOPPED;
use crate::cli::args::{TrainArgs, ValidateArgs, load_config};

/// `ctseg train`: a new run, or `--resume` of one; the exit status (4 when stopped early).
pub fn train(a: TrainArgs) -> Result<u8> {
    with_comm(|comm| {
        // 1. The config, the run directory and how the run starts.
        let (cfg, run_dir, start) = match &a.resume {
            Some(dir) => {
                a.overrides.check_resumable()?;
                let file = RunDir::new(dir).checkpoint(CheckpointKind::Last);
                let ck = Checkpoint::load(&file)?;
                let mut cfg = RunConfig::from_toml(&ck.meta.config_toml, &file)?;
                ctseg::train::state::check_model_fits(&cfg, &ck.model, &file)?;
                cfg.apply(&a.overrides.to_overrides());
                cfg.validate(&dir.display().to_string())?;
                (cfg, dir.clone(), Start::Resume(Box::new(ck)))
            }
            None => {
                let cfg = load_config(a.config.as_deref(), &a.overrides)?;
                let dir = match &a.out {
                    Some(d) => d.clone(),
                    None => default_run_dir(comm)?,
                };
                let start = if a.overwrite {
                    Start::Overwrite
                } else {
                    Start::Fresh
                };
                (cfg, dir, start)
            }
        };
        // 2. This rank's device.
        let quiet = a.quiet || comm.rank() != 0;
        let work = ConvWorkload {
            batch: cfg.train.batch_size,
            train: true,
        };
        let backend = open_backend(&a.backend, &cfg, cfg.train.precision, work, comm, quiet)?;
        // 3. Training.
        let opts = TrainOptions {
            run_dir: run_dir.clone(),
            data_dir: a.data.clone(),
            start,
            quiet: a.quiet,
            backend,
            host_threads: rayon::current_num_threads(),
            label: a.label.clone(),
        };
        let outcome = ctseg::train::train(&cfg, opts, comm)?;
        // 4. What happened.
        Ok(report_outcome(&outcome, &run_dir, comm.rank() == 0))
    })
}

/// Prints how training ended (rank 0) and returns the exit status.
fn report_outcome(outcome: &TrainOutcome, run_dir: &Path, rank0: bool) -> u8 {
    let dir = run_dir.display();
    match outcome {
        TrainOutcome::Finished(s) => {
            if rank0 {
                println!(
                    "done: {} steps ({:.2} epochs) in {:.1} s, {:.2} img/s | val loss {:.4} | Dice liver {:.4} | Dice tumour {:.4} | best liver Dice {:.4} (step {}) | run dir {dir}",
                    s.steps,
                    s.epochs,
                    s.wall_s,
                    s.images_per_s,
                    s.val_loss,
                    s.dice_liver,
                    s.dice_tumour,
                    s.best_dice_liver,
                    s.best_step,
                );
            }
            0
        }
        TrainOutcome::Stopped { step } => {
            if rank0 {
                eprintln!(
                    "stopped on a signal after step {step}: checkpoint written; continue with `ctseg train --resume {dir}` (exit status {EXIT_STOPPED})"
                );
            }
            EXIT_STOPPED
        }
        TrainOutcome::AlreadyFinished { step } => {
            if rank0 {
                println!(
                    "{dir}: the run already ran all its {step} steps; nothing to do (raise --epochs or --max-steps to train longer)"
                );
            }
            0
        }
    }
}

/// A new run directory name that no other job takes: date and time, process id, the Slurm job
/// (and array task) when there is one, and random bits. Rank 0 picks it; every rank gets its
/// choice. Collective.
fn default_run_dir(comm: &dyn Communicator) -> Result<PathBuf> {
    let mut name = if comm.rank() == 0 {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let secs = now.as_secs();
        let (days, rem) = (secs / 86_400, secs % 86_400);
        let (y, m, d) = civil_from_days(days as i64);
        let slurm = match (
            std::env::var("SLURM_JOB_ID"),
            std::env::var("SLURM_ARRAY_TASK_ID"),
        ) {
            (Ok(j), Ok(t)) => format!("-slurm{j}_{t}"),
            (Ok(j), Err(_)) => format!("-slurm{j}"),
            _ => String::new(),
        };
        let random = ctseg::util::fnv1a(
            now.as_nanos()
                .to_le_bytes()
                .into_iter()
                .chain(std::process::id().to_le_bytes()),
        ) & 0xffff;
        format!(
            "runs/{y:04}{m:02}{d:02}-{:02}{:02}{:02}-{}{slurm}-{random:04x}",
            rem / 3600,
            rem / 60 % 60,
            rem % 60,
            std::process::id()
        )
        .into_bytes()
    } else {
        Vec::new()
    };
    comm.broadcast_bytes(&mut name, 0)?;
    Ok(PathBuf::from(String::from_utf8_lossy(&name).into_owned()))
}

/// The (year, month, day) of a day count since 1970-01-01 (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// `ctseg validate`: a checkpoint on its run's validation split, distributed under mpirun.
pub fn validate(a: ValidateArgs) -> Result<()> {
    with_comm(|comm| {
        // 1. The run, its data (checked against what it trained on) and this rank's device.
        let trained = Trained::open(&a.checkpoint, a.checkpoint_kind)?;
        let rank0 = comm.rank() == 0;
        if let (Some(note), true) = (&trained.note, rank0) {
            eprintln!("{note}");
        }
        let quiet = a.json || !rank0;
        // Validation runs in f32 whatever the run trained in.
        let work = ConvWorkload {
            batch: trained.cfg.train.batch_size,
            train: false,
        };
        let be = open_backend(&a.backend, &trained.cfg, Precision::F32, work, comm, quiet)?;
        let cfg = &trained.cfg;
        let recorded = &trained.ck.meta.provenance;
        let data_dir = a
            .data
            .clone()
            .or_else(|| (!recorded.data_dir.is_empty()).then(|| recorded.data_dir.clone().into()));
        let ds = ctseg::train::load_dataset(cfg, data_dir.as_deref(), be_threads())?;
        let now = ctseg::train::provenance_of(cfg, &ds, data_dir.as_deref());
        ctseg::train::check_provenance(&now, recorded, &trained.file)?;
        ctseg::train::agree_across_ranks(cfg, &now, comm)?;
        // 2. Validation.
        let (_, val_idx) = ds.split(&cfg.data, cfg.seed)?;
        let model = trained.model(&be, &be.device)?;
        let v = ctseg::train::validate(
            &model,
            &std::sync::Arc::new(ds),
            &val_idx,
            cfg,
            &be.device,
            comm,
        )?;
        // 3. The figures (rank 0).
        if rank0 {
            if a.json {
                println!("{}", serde_json::to_string(&v)?);
            } else {
                println!(
                    "{} validation slices on {} ({}, {}): val loss {:.6} | Dice liver {:.6} | Dice tumour {:.6} | soft Dice {:?}",
                    v.images,
                    comm.describe(),
                    be.description,
                    trained.file.display(),
                    v.loss,
                    v.dice(1),
                    v.dice(2),
                    v.soft_dice
                );
            }
        }
        Ok(())
    })
}

fn be_threads() -> usize {
    rayon::current_num_threads()
}

#[cfg(test)]
mod tests {
    use super::civil_from_days;

    #[test]
    fn civil_dates() {
        // 1970-01-01 is day 0; 2000-03-01 is day 11,017; 2026-11-30 is day 20,787.
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(11_017), (2000, 3, 1));
        assert_eq!(civil_from_days(20_787), (2026, 11, 30));
    }
}
