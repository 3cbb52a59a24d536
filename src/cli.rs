//! Command-line interface: clap definitions (raw flags) and the commands they run.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};

use ctseg::backend::{self, BackendKind};
use ctseg::bench::{self, StepBenchOptions};
use ctseg::comm::{Communicator, Local};
use ctseg::config::{Overrides, RunConfig};
use ctseg::data::Dataset;
use ctseg::model::summarize;
use ctseg::train::{self, TrainOptions, checkpoint::Checkpoint};

/// ctseg: train CT segmentation U-Nets on a CPU or a GPU, alone or over MPI.
#[derive(Parser, Debug)]
#[command(name = "ctseg", version, about)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Train a model (default: the built-in quick config on phantoms, CPU, one process).
    Train(TrainArgs),
    /// Print a config's layer table, trainable parameters and forward GFLOP per image.
    Model(ModelArgs),
    /// Write a synthetic CT dataset (phantom slices in shards).
    Phantom(PhantomArgs),
    /// Benchmarks.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Plots and tables from run directories: speedup, loss and Dice against time, time to target.
    Report(ReportArgs),
    /// Turn CT volumes (LiTS-style NIfTI pairs: a folder or a CSV) into a training dataset.
    Prepare(PrepareArgs),
    /// Segment CT volumes with a trained model: NIfTI masks on the input's grid.
    Predict(PredictArgs),
    /// Segment a folder of labelled CT volumes and score them: per-case and global Dice.
    Evaluate(EvaluateArgs),
    /// Write a trained model as safetensors under the PyTorch peer model's tensor names.
    Export(ExportArgs),
    /// Evaluate a checkpoint on its run's validation split (distributed under mpirun).
    Validate(ValidateArgs),
    /// List the graphics adapters `--backend gpu` can use.
    Adapters,
}

#[derive(Args, Debug)]
struct ValidateArgs {
    /// Run directory or checkpoint file.
    #[arg(long)]
    checkpoint: PathBuf,
    /// Dataset directory the run trained on (default: the run's phantoms).
    #[arg(long)]
    data: Option<PathBuf>,
    #[command(flatten)]
    backend: BackendArgs,
    /// Print one JSON line.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug, Clone)]
struct BackendArgs {
    /// cpu (burn flex) or gpu (burn wgpu).
    #[arg(long, value_enum, default_value = "cpu")]
    backend: BackendKind,
    /// CPU threads (0: all cores).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// GPU adapter index (see `ctseg adapters`).
    #[arg(long)]
    adapter: Option<usize>,
    /// Skip the start-up check that the GPU computes the model's gradients like the CPU.
    #[arg(long)]
    skip_gpu_check: bool,
}

impl BackendArgs {
    /// One device per rank: the node's ranks share its cores (unless `--threads` says
    /// otherwise), or take adapter `local_rank % adapters` (unless `--adapter` says otherwise).
    fn for_rank(&self, comm: &dyn Communicator) -> Self {
        let mut a = self.clone();
        if a.threads == 0 && comm.local_size() > 1 {
            let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
            a.threads = (cores / comm.local_size()).max(1);
        }
        if a.backend == BackendKind::Gpu && a.adapter.is_none() && comm.size() > 1 {
            let n = backend::list_adapters().len().max(1);
            a.adapter = Some(comm.local_rank() % n);
        }
        a
    }

    /// Opens the backend; for the GPU, first checks it against the CPU on this model.
    fn open(&self, model: &ctseg::model::UNetConfig, quiet: bool) -> Result<backend::Backend> {
        let be = backend::open(self.backend, self.threads, self.adapter)?;
        if be.kind == BackendKind::Gpu && !self.skip_gpu_check {
            let v = ctseg::verify::require_gpu_agrees(model, &be)?;
            if !quiet {
                let worst = v.worst().map_or(0.0, |(_, t)| t.error);
                eprintln!(
                    "gpu check: loss and gradients of {} parameter tensors agree with the CPU (largest relative error {worst:.1e}, each within its limit)",
                    v.tensors.len()
                );
            }
        }
        Ok(be)
    }
}

#[derive(Args, Debug, Clone, Default)]
struct OverrideArgs {
    /// Epochs.
    #[arg(long)]
    epochs: Option<u64>,
    /// Images per step on each rank.
    #[arg(long)]
    batch_size: Option<usize>,
    /// Base learning rate (per rank, before rank scaling).
    #[arg(long)]
    lr: Option<f64>,
    /// Stop after this many optimiser steps (0: no limit).
    #[arg(long)]
    max_steps: Option<u64>,
    /// Seed of every random stream.
    #[arg(long)]
    seed: Option<u64>,
    /// Model width.
    #[arg(long)]
    width: Option<usize>,
    /// Input size (pixels).
    #[arg(long)]
    size: Option<usize>,
    /// Gradient compression on the wire (data-parallel runs).
    #[arg(long, value_enum)]
    grad_compression: Option<ctseg::train::exchange::Compression>,
    /// Validate on this fold of a dataset prepared with `--folds`, train on the others.
    #[arg(long)]
    fold: Option<usize>,
    /// Micro-batches per optimiser step on each rank (global batch = batch size × ranks × this).
    #[arg(long)]
    accumulate: Option<usize>,
}

impl OverrideArgs {
    fn to_overrides(&self) -> Overrides {
        Overrides {
            epochs: self.epochs,
            batch_size: self.batch_size,
            lr: self.lr,
            max_steps: self.max_steps,
            seed: self.seed,
            width: self.width,
            size: self.size,
            grad_compression: self.grad_compression,
            fold: self.fold,
            accumulate: self.accumulate,
        }
    }
}

#[derive(Args, Debug)]
struct TrainArgs {
    /// Run config (TOML); default: the built-in configs/quick.toml.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Dataset directory (from `ctseg phantom` or `ctseg prepare`); default: generate phantoms.
    #[arg(long)]
    data: Option<PathBuf>,
    /// Run directory; default: runs/<timestamp>.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Continue the run in this directory from its checkpoint.
    #[arg(long, conflicts_with_all = ["config", "out"])]
    resume: Option<PathBuf>,
    /// No progress output.
    #[arg(long)]
    quiet: bool,
    /// Name of the run in `ctseg report` (default: the run directory's name).
    #[arg(long, default_value = "")]
    label: String,
    #[command(flatten)]
    backend: BackendArgs,
    #[command(flatten)]
    overrides: OverrideArgs,
}

#[derive(Args, Debug)]
struct ModelArgs {
    /// Run config (TOML); default: the built-in quick config.
    #[arg(long)]
    config: Option<PathBuf>,
    #[command(flatten)]
    overrides: OverrideArgs,
}

#[derive(Args, Debug)]
struct InferArgs {
    /// Run directory or checkpoint file.
    #[arg(long)]
    checkpoint: PathBuf,
    /// Slices per forward pass.
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    /// Keep only the largest connected liver component (and the tumour inside it).
    #[arg(long)]
    largest_component: bool,
    #[command(flatten)]
    backend: BackendArgs,
}

impl InferArgs {
    fn options(&self) -> ctseg::infer::PredictOptions {
        ctseg::infer::PredictOptions {
            batch_size: self.batch_size,
            largest_component: self.largest_component,
        }
    }

    fn predictor(&self) -> Result<ctseg::infer::Predictor> {
        let ck = Checkpoint::load(&self.checkpoint)?;
        let path = train::checkpoint::resolve(&self.checkpoint);
        let cfg = RunConfig::from_toml(&ck.meta.config_toml, &path)?;
        let be = self.backend.open(&cfg.model, false)?;
        Ok(ctseg::infer::Predictor::new(cfg, ck, &path, &be)?)
    }
}

#[derive(Args, Debug)]
struct PredictArgs {
    #[command(flatten)]
    infer: InferArgs,
    /// A CT volume (.nii or .nii.gz), a folder of them, or a folder holding one DICOM series.
    #[arg(long)]
    input: PathBuf,
    /// Output mask (.nii.gz) for one input, or a folder for a folder of inputs.
    #[arg(long)]
    output: PathBuf,
}

#[derive(Args, Debug)]
struct EvaluateArgs {
    #[command(flatten)]
    infer: InferArgs,
    /// Labelled volumes: a LiTS-layout folder or a CSV of image,label rows.
    #[arg(long)]
    input: PathBuf,
    /// Output folder for evaluation.csv and evaluation.json.
    #[arg(long)]
    out: PathBuf,
    /// Also write each predicted mask into the output folder.
    #[arg(long)]
    save_masks: bool,
}

#[derive(Args, Debug)]
struct ExportArgs {
    /// Run directory or checkpoint file.
    #[arg(long)]
    checkpoint: PathBuf,
    /// Output file (.safetensors).
    #[arg(long)]
    out: PathBuf,
}

#[derive(Args, Debug)]
struct PrepareArgs {
    /// A folder of volume-N.nii[.gz] / segmentation-N.nii[.gz] (LiTS layout), or a CSV file of
    /// image,label rows (paths relative to the CSV).
    #[arg(long)]
    input: PathBuf,
    /// Output dataset directory (must not exist).
    #[arg(long)]
    out: PathBuf,
    /// Slice size after resizing.
    #[arg(long, default_value_t = 240)]
    size: usize,
    /// Cross-validation folds, assigned by volume (1: none).
    #[arg(long, default_value_t = 1)]
    folds: usize,
    /// Slices kept above and below the liver's z-range.
    #[arg(long, default_value_t = 0)]
    margin: usize,
    /// Image resizing (labels always take the nearest voxel).
    #[arg(long, value_enum, default_value_t = ctseg::data::prepare::Resize::Nearest)]
    resize: ctseg::data::prepare::Resize,
    /// Slices per shard file.
    #[arg(long, default_value_t = 256)]
    shard_slices: usize,
    /// Seed of the fold assignment.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// No per-volume progress lines.
    #[arg(long)]
    quiet: bool,
}

#[derive(Args, Debug)]
struct PhantomArgs {
    /// Number of slices.
    #[arg(long)]
    count: usize,
    /// Slice size in pixels.
    #[arg(long, default_value_t = 240)]
    size: usize,
    /// Output dataset directory (must not exist).
    #[arg(long)]
    out: PathBuf,
    /// Slices per phantom volume (patient).
    #[arg(long, default_value_t = 24)]
    slices_per_volume: usize,
    /// Seed.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Slices per shard file.
    #[arg(long, default_value_t = 256)]
    shard_slices: usize,
    /// Also write a contact sheet of (up to 24) slices to this PNG.
    #[arg(long)]
    preview: Option<PathBuf>,
    /// Threads for generation (0: all cores).
    #[arg(long, default_value_t = 0)]
    threads: usize,
}

#[derive(Subcommand, Debug)]
enum BenchCommand {
    /// Time training steps (forward, backward, optimiser) on a fixed batch.
    Step(Box<BenchStepArgs>),
    /// Allreduce time and bus bandwidth against message size (launch with mpirun).
    Allreduce(BenchAllreduceArgs),
    /// Train one config at several rank counts and backends; epoch time, speedup, step split.
    Scaling(Box<BenchScalingArgs>),
    /// Predict step time, epoch time, speedup and time-to-target for 1 … 1024 ranks.
    Model(Box<BenchModelArgs>),
}

#[derive(Args, Debug)]
struct BenchScalingArgs {
    /// Run config (TOML).
    #[arg(long)]
    config: PathBuf,
    /// Dataset directory; default: phantoms from the config.
    #[arg(long)]
    data: Option<PathBuf>,
    /// Rank counts of the CPU series.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4")]
    ranks: Vec<usize>,
    /// Backends (cpu, gpu).
    #[arg(long, value_delimiter = ',', default_value = "cpu")]
    backends: Vec<String>,
    /// Rank counts of the GPU runs.
    #[arg(long, value_delimiter = ',', default_value = "1")]
    gpu_ranks: Vec<usize>,
    /// Launcher template, `{n}` = ranks: e.g. 'mpirun -np {n} --hostfile hosts',
    /// 'srun -N {n} -n {n}', 'scripts/emulate_hosts.sh -k {n} -r 1gbit --'. Empty: only 1-rank
    /// runs, started directly.
    #[arg(long, default_value = "mpirun -np {n} --oversubscribe --bind-to none")]
    launcher: String,
    /// Output directory (one run directory per backend and rank count, scaling.json, scaling.md).
    #[arg(long)]
    out: PathBuf,
    /// Kill a run after this many seconds.
    #[arg(long, default_value_t = 3600.0)]
    timeout_s: f64,
    /// Also run this PyTorch peer script with the config's width, size and batch, and print its
    /// step time beside ctseg's 1-rank CPU step.
    #[arg(long)]
    peer: Option<PathBuf>,
    /// Python interpreter for the peer.
    #[arg(long, default_value = "python3")]
    python: String,
    /// Arguments passed on to every `ctseg train` (after `--`), e.g. `-- --max-steps 20 --threads 1`.
    #[arg(last = true)]
    train_args: Vec<String>,
}

#[derive(Args, Debug)]
struct BenchModelArgs {
    /// Run directory whose measured compute, copy and optimiser times feed the model.
    #[arg(long)]
    run: PathBuf,
    /// Link rate per node, Gbit/s.
    #[arg(long, default_value_t = 10.0)]
    link_gbps: f64,
    /// Per-message latency, µs.
    #[arg(long, default_value_t = 50.0)]
    latency_us: f64,
    /// Allreduce algorithm.
    #[arg(long, value_enum, default_value = "ring")]
    algorithm: ctseg::bench::model::Algorithm,
    /// Largest rank count (powers of two from 1).
    #[arg(long, default_value_t = 1024)]
    max_ranks: usize,
    /// Steps to the target at given global batches, from the large-batch study:
    /// GLOBAL_BATCH=STEPS,… (log-log interpolated, never extrapolated).
    #[arg(long)]
    steps_to_target: Option<String>,
    /// Gradient copy rate (device → fused buffer → device), GB/s, for a 1-rank `--run` (a
    /// multi-rank run's measured copy time is used as it is).
    #[arg(long, default_value_t = ctseg::bench::model::DEFAULT_COPY_GBS)]
    copy_gbs: f64,
    /// Measured runs to compare the model with (their rank counts are predicted).
    #[arg(long, num_args = 1..)]
    validate: Vec<PathBuf>,
    /// Write the tables (Markdown) and predictions (JSON) to this directory.
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(Args, Debug)]
struct ReportArgs {
    /// Run directories (from `ctseg train` or `ctseg bench scaling`); a directory holding
    /// run directories (e.g. a `bench scaling --out`) stands for all of them.
    #[arg(required = true)]
    runs: Vec<PathBuf>,
    /// Output directory (PNG, SVG, Markdown, CSV, index.html).
    #[arg(long)]
    out: PathBuf,
    /// Training-loss thresholds for the time-to-target table (the loss is −Dice: lower is better).
    #[arg(
        long,
        value_delimiter = ',',
        allow_hyphen_values = true,
        default_value = "-0.75,-0.76"
    )]
    loss_targets: Vec<f64>,
    /// Validation liver Dice target.
    #[arg(long, default_value_t = 0.9)]
    dice_target: f64,
    /// Title of the report.
    #[arg(long, default_value = "ctseg runs")]
    title: String,
}

#[derive(Args, Debug)]
struct BenchAllreduceArgs {
    /// Smallest message, bytes.
    #[arg(long, default_value_t = 1024)]
    min_bytes: usize,
    /// Largest message, bytes (sizes double).
    #[arg(long, default_value_t = 128 * 1024 * 1024)]
    max_bytes: usize,
    /// Link rate in Gbit/s: adds the ring-allreduce bound 2(p−1)/p·S/rate to each row.
    #[arg(long)]
    link_gbps: Option<f64>,
    /// Print JSON lines.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
struct BenchStepArgs {
    /// Run config (TOML); default: the built-in quick config.
    #[arg(long)]
    config: Option<PathBuf>,
    #[command(flatten)]
    backend: BackendArgs,
    #[command(flatten)]
    overrides: OverrideArgs,
    /// Untimed warm-up steps.
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    /// Timed steps.
    #[arg(long, default_value_t = 5)]
    steps: usize,
    /// Print one JSON line.
    #[arg(long)]
    json: bool,
    /// Also run this PyTorch peer script (e.g. ../shared/peer/livermask_torch.py) with the same
    /// shapes and thread count, and print the ratio.
    #[arg(long)]
    peer: Option<PathBuf>,
    /// Python interpreter for the peer.
    #[arg(long, default_value = "python3")]
    python: String,
    /// Device for the peer (`cpu`, or `cuda` beside `--backend gpu`).
    #[arg(long, default_value = "cpu")]
    peer_device: String,
}

/// Parses arguments and runs the command.
pub fn run() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Train(a) => cmd_train(a),
        Command::Model(a) => cmd_model(a),
        Command::Phantom(a) => cmd_phantom(a),
        Command::Prepare(a) => cmd_prepare(a),
        Command::Predict(a) => cmd_predict(a),
        Command::Evaluate(a) => cmd_evaluate(a),
        Command::Export(a) => cmd_export(a),
        Command::Bench(BenchCommand::Step(a)) => cmd_bench_step(*a),
        Command::Bench(BenchCommand::Scaling(a)) => cmd_bench_scaling(*a),
        Command::Bench(BenchCommand::Model(a)) => cmd_bench_model(*a),
        Command::Report(a) => cmd_report(a),
        Command::Bench(BenchCommand::Allreduce(a)) => {
            let comm = open_comm()?;
            let rows =
                bench::bench_allreduce(comm.as_ref(), a.min_bytes, a.max_bytes, a.link_gbps)?;
            if comm.rank() == 0 {
                for r in &rows {
                    if a.json {
                        println!("{}", serde_json::to_string(r)?);
                    } else {
                        println!(
                            "{} ranks {:>11} B: median {:>10.3} ms (min {:.3}) | algbw {:7.3} GB/s | busbw {:7.3} GB/s{}",
                            r.ranks,
                            r.bytes,
                            r.median_s * 1e3,
                            r.min_s * 1e3,
                            r.algbw_gbs,
                            r.busbw_gbs,
                            r.of_bound
                                .map(|f| format!(" | {:.0} % of the ring bound", 100.0 * f))
                                .unwrap_or_default()
                        );
                    }
                }
            }
            Ok(())
        }
        Command::Validate(a) => {
            let comm = open_comm()?;
            let result = validate_on(&a, comm.as_ref());
            if let Err(e) = &result
                && comm.size() > 1
            {
                eprintln!("error (rank {}): {e:#}", comm.rank());
                comm.abort(crate::exit_code(e).into());
            }
            result
        }
        Command::Adapters => {
            let adapters = backend::list_adapters();
            print!("{}", backend::describe_adapters(&adapters));
            Ok(())
        }
    }
}

fn load_config(path: Option<&Path>, o: &OverrideArgs) -> Result<RunConfig> {
    let mut cfg = RunConfig::load(path)?;
    cfg.apply(&o.to_overrides());
    let source = path.map_or_else(
        || "configs/quick.toml (built in)".to_string(),
        |p| p.display().to_string(),
    );
    cfg.validate(&source)?;
    Ok(cfg)
}

fn default_run_dir() -> PathBuf {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    PathBuf::from("runs").join(format!("run-{secs}"))
}

/// This process's communicator: MPI when an MPI launcher started it (and ctseg was built with
/// the `mpi` feature), else a single process.
fn open_comm() -> Result<Box<dyn Communicator>> {
    if ctseg::comm::launched_by_mpi() {
        #[cfg(feature = "mpi")]
        return Ok(Box::new(ctseg::comm::mpi::Mpi::init()?));
        #[cfg(not(feature = "mpi"))]
        anyhow::bail!(
            "started by an MPI launcher, but this ctseg was built without MPI: rebuild with `cargo build --release --features mpi`"
        );
    }
    Ok(Box::new(Local))
}

fn cmd_train(a: TrainArgs) -> Result<()> {
    let comm = open_comm()?;
    let result = train_on(&a, comm.as_ref());
    if let Err(e) = &result
        && comm.size() > 1
    {
        // Returning would leave the other ranks waiting in a collective: end the whole job.
        eprintln!("error (rank {}): {e:#}", comm.rank());
        comm.abort(crate::exit_code(e).into());
    }
    result
}

fn train_on(a: &TrainArgs, comm: &dyn Communicator) -> Result<()> {
    let (cfg, out_dir, resume) = match &a.resume {
        Some(dir) => {
            let ck = Checkpoint::load(dir)?;
            let mut cfg = RunConfig::from_toml(&ck.meta.config_toml, &dir.join("checkpoint.ctck"))?;
            cfg.apply(&a.overrides.to_overrides());
            cfg.validate(&dir.display().to_string())?;
            (cfg, dir.clone(), true)
        }
        None => (
            load_config(a.config.as_deref(), &a.overrides)?,
            a.out.clone().unwrap_or_else(default_run_dir),
            false,
        ),
    };
    // One device per rank: the node's ranks share its cores, or take one adapter each.
    let mut backend_args = a.backend.clone();
    if backend_args.threads == 0 && comm.local_size() > 1 {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        backend_args.threads = (cores / comm.local_size()).max(1);
    }
    if backend_args.backend == BackendKind::Gpu && backend_args.adapter.is_none() && comm.size() > 1
    {
        let n = backend::list_adapters().len().max(1);
        backend_args.adapter = Some(comm.local_rank() % n);
    }
    let quiet = a.quiet || comm.rank() != 0;
    let be = backend_args.open(&cfg.model, quiet)?;
    let opts = TrainOptions {
        out_dir: out_dir.clone(),
        data_dir: a.data.clone(),
        resume,
        quiet: a.quiet,
        device: be.device.clone(),
        device_desc: be.description.clone(),
        host_threads: rayon::current_num_threads(),
        chunk_limit: be.chunk_limit,
        backend: match backend_args.backend {
            BackendKind::Cpu => "cpu".into(),
            BackendKind::Gpu => "gpu".into(),
        },
        label: a.label.clone(),
    };
    let s = train::train(&cfg, &opts, comm)?;
    if comm.rank() == 0 {
        println!(
            "done: {} steps ({:.2} epochs) in {:.1} s, {:.2} img/s | val loss {:.4} | Dice liver {:.4} | Dice tumour {:.4} | run dir {}",
            s.steps,
            s.epochs,
            s.wall_s,
            s.images_per_s,
            s.val_loss,
            s.dice_liver,
            s.dice_tumour,
            out_dir.display()
        );
    }
    Ok(())
}

fn validate_on(a: &ValidateArgs, comm: &dyn Communicator) -> Result<()> {
    let ck = Checkpoint::load(&a.checkpoint)?;
    let path = train::checkpoint::resolve(&a.checkpoint);
    let cfg = RunConfig::from_toml(&ck.meta.config_toml, &path)?;
    let quiet = a.json || comm.rank() != 0;
    let be = a.backend.open(&cfg.model, quiet)?;
    let v = train::validate_checkpoint(&cfg, &ck, &path, a.data.as_deref(), &be, comm)?;
    if comm.rank() == 0 {
        if a.json {
            println!("{}", serde_json::to_string(&v)?);
        } else {
            println!(
                "{} validation slices ({} rank(s)): val loss {:.6} | Dice liver {:.6} | Dice tumour {:.6} | soft Dice {:?}",
                v.images,
                comm.size(),
                v.loss,
                v.dice(1),
                v.dice(2),
                v.soft_dice
            );
        }
    }
    Ok(())
}

fn cmd_model(a: ModelArgs) -> Result<()> {
    let cfg = load_config(a.config.as_deref(), &a.overrides)?;
    print!("{}", summarize(&cfg.model).render(&cfg.model));
    Ok(())
}

fn is_nifti_name(p: &Path) -> bool {
    let n = p.to_string_lossy().to_ascii_lowercase();
    n.ends_with(".nii") || n.ends_with(".nii.gz")
}

fn cmd_predict(a: PredictArgs) -> Result<()> {
    let niftis: Vec<PathBuf> = if a.input.is_dir() {
        let mut v: Vec<PathBuf> = std::fs::read_dir(&a.input)
            .map_err(|e| ctseg::error::Error::io(&a.input, e))?
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.is_file() && is_nifti_name(p))
            .collect();
        v.sort();
        v
    } else {
        Vec::new()
    };
    // A folder of NIfTI files gives a folder of masks; any other folder is one DICOM series.
    let jobs: Vec<(PathBuf, PathBuf)> = if !niftis.is_empty() {
        let inputs = niftis;
        std::fs::create_dir_all(&a.output).map_err(|e| ctseg::error::Error::io(&a.output, e))?;
        inputs
            .into_iter()
            .map(|p| {
                let name = p
                    .file_name()
                    .map_or(String::new(), |n| n.to_string_lossy().into_owned());
                let stem = name
                    .trim_end_matches(".gz")
                    .trim_end_matches(".nii")
                    .to_string();
                let out = a.output.join(format!("{stem}-pred.nii.gz"));
                (p, out)
            })
            .collect()
    } else {
        vec![(a.input.clone(), ctseg::infer::check_output_name(&a.output)?)]
    };
    let predictor = a.infer.predictor()?;
    let opts = a.infer.options();
    for (input, output) in jobs {
        let t = std::time::Instant::now();
        let vol = ctseg::data::prepare::read_volume(&input)?;
        let labels = predictor.predict(&vol, &opts)?;
        ctseg::data::nifti::write_u8(&output, vol.dims, &vol.affine, &labels)?;
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

fn cmd_export(a: ExportArgs) -> Result<()> {
    let ck = Checkpoint::load(&a.checkpoint)?;
    let path = train::checkpoint::resolve(&a.checkpoint);
    let cfg = RunConfig::from_toml(&ck.meta.config_toml, &path)?;
    ctseg::export::check_exportable(&cfg.model)?;
    let mut be = backend::open(BackendKind::Cpu, 0, None)?;
    // Trainable and non-trainable tensors are told apart by require-grad, which needs an
    // autodiff device.
    be.device = be.device.autodiff();
    let steps = ck.meta.step;
    let model = train::load_trained(&cfg, ck, &path, &be)?;
    let n = ctseg::export::export_safetensors(&model, &cfg, steps, &a.out)?;
    println!(
        "{} tensors -> {} | in PyTorch: LivermaskUNet({}, levels={}, classes={}).load_state_dict(safetensors.torch.load_file(...)); inputs: {}",
        n,
        a.out.display(),
        cfg.model.width,
        cfg.model.depth,
        cfg.model.classes,
        match cfg.data.intensity {
            ctseg::data::Intensity::Raw => "raw HU".to_string(),
            ctseg::data::Intensity::Window => format!(
                "HU windowed to [{}, {}] and scaled to [0, 1]",
                cfg.data.window[0], cfg.data.window[1]
            ),
        }
    );
    Ok(())
}

fn cmd_evaluate(a: EvaluateArgs) -> Result<()> {
    let predictor = a.infer.predictor()?;
    let eval = ctseg::infer::evaluate(
        &predictor,
        &a.infer.checkpoint,
        &a.input,
        &a.out,
        &a.infer.options(),
        a.save_masks,
        |c, k, n| {
            println!(
                "[{k}/{n}] {}: Dice liver {:.4}, tumour {:.4} | liver {:.1} mL (true {:.1})",
                c.case, c.dice_liver, c.dice_tumour, c.liver_ml_pred, c.liver_ml_true
            )
        },
    )?;
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

fn cmd_prepare(a: PrepareArgs) -> Result<()> {
    let opts = ctseg::data::prepare::PrepareOptions {
        input: a.input,
        out: a.out.clone(),
        size: a.size,
        folds: a.folds,
        margin: a.margin,
        resize: a.resize,
        per_shard: a.shard_slices,
        seed: a.seed,
        quiet: a.quiet,
    };
    let (m, summary) = ctseg::data::prepare::prepare(&opts)?;
    let mut counts = [0u64; 3];
    for v in &m.volumes {
        for (c, n) in counts.iter_mut().zip(v.label_counts) {
            *c += n;
        }
    }
    println!(
        "prepared {} volumes, {} slices of {}x{} in {:.1} s ({:.1} volumes/min) -> {} | pixels: background {}, liver {}, tumour {}{}",
        summary.volumes,
        summary.slices,
        m.height,
        m.width,
        summary.seconds,
        summary.volumes as f64 / summary.seconds.max(1e-9) * 60.0,
        a.out.display(),
        counts[0],
        counts[1],
        counts[2],
        if summary.skipped_no_liver.is_empty() {
            String::new()
        } else {
            format!(
                " | skipped (no liver): {}",
                summary.skipped_no_liver.join(", ")
            )
        }
    );
    Ok(())
}

fn cmd_phantom(a: PhantomArgs) -> Result<()> {
    anyhow::ensure!(a.count > 0, "--count must be at least 1");
    anyhow::ensure!(
        a.size >= 16,
        "--size must be at least 16 pixels, got {}",
        a.size
    );
    anyhow::ensure!(
        a.slices_per_volume > 0,
        "--slices-per-volume must be at least 1"
    );
    let threads = backend::init_cpu_threads(a.threads);
    let per = a.slices_per_volume;
    let volumes = a.count.div_ceil(per);
    let mut ds = Dataset::phantom(a.seed, volumes, per, a.size, threads);
    let keep = a.count * a.size * a.size;
    ds.images.truncate(keep);
    ds.labels.truncate(keep);
    ds.volume_ids.truncate(a.count);
    ds.slice_indices.truncate(a.count);
    let source = format!(
        "ctseg phantom --seed {} --count {} --size {} --slices-per-volume {}",
        a.seed, a.count, a.size, per
    );
    let m = ds.write(&a.out, a.shard_slices, &source)?;
    println!(
        "wrote {} slices of {}x{} from {} phantom volumes in {} shard(s) to {}",
        m.slices,
        m.height,
        m.width,
        m.volumes.len(),
        m.shards.len(),
        a.out.display()
    );
    if let Some(png) = &a.preview {
        let n = ds.len().min(24);
        let step = (ds.len() / n.max(1)).max(1);
        let tiles: Vec<(&[i16], &[u8], usize)> = (0..n)
            .map(|k| {
                let i = (k * step).min(ds.len() - 1);
                (ds.image(i), ds.label(i), ds.size)
            })
            .collect();
        ctseg::preview::write_grid(png, &tiles, 6, [-200.0, 300.0])
            .with_context(|| format!("writing the preview {}", png.display()))?;
        println!("preview: {}", png.display());
    }
    Ok(())
}

fn cmd_bench_scaling(a: BenchScalingArgs) -> Result<()> {
    use ctseg::bench::scaling;
    let cfg = load_config(Some(&a.config), &OverrideArgs::default())?;
    let o = scaling::ScalingOptions {
        exe: std::env::current_exe().context("locating the ctseg executable")?,
        config: a.config.clone(),
        data: a.data.clone(),
        ranks: a.ranks.clone(),
        gpu_ranks: a.gpu_ranks.clone(),
        backends: a.backends.clone(),
        launcher: a.launcher.clone(),
        out: a.out.clone(),
        train_args: a.train_args.clone(),
        timeout_s: a.timeout_s,
    };
    for b in &o.backends {
        if b != "cpu" && b != "gpu" {
            return Err(ctseg::error::Error::Argument(format!(
                "--backends: `{b}` is not cpu or gpu"
            ))
            .into());
        }
    }
    let rows = scaling::run_scaling(&o, |r| {
        eprintln!(
            "{} × {}: epoch {:.1} s ({} steps × {:.3} s), {:.2} img/s, compute {:.3} s, copy {:.3} s, exposed comm {:.3} s, peak RSS {:.0} MB, launch {:.1} s",
            r.backend,
            r.ranks,
            r.epoch_time_s,
            r.steps_per_epoch,
            r.median_step_s,
            r.images_per_s,
            r.compute_s,
            r.copy_s,
            r.comm_s,
            r.peak_rss_mb,
            r.launch_s
        );
    })?;
    let mut md = format!(
        "# ctseg bench scaling: {}\n\n{}",
        a.config.display(),
        scaling::table(&rows)
    );
    if let Some(script) = &a.peer {
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        let o = StepBenchOptions {
            warmup: 2,
            steps: 5,
        };
        let p = bench::run_peer(&a.python, script, threads, &cfg, &o, "cpu")?;
        if let Some(r) = rows.iter().find(|r| r.backend == "cpu" && r.ranks == 1) {
            md.push_str(&format!(
                "\nPyTorch {} peer ({}, {threads} threads, width {}, size {}, batch {}): median step {:.3} s; ctseg 1-rank CPU median step {:.3} s = {:.2}× the peer's.\n",
                p.torch,
                p.device,
                cfg.model.width,
                cfg.model.input_size,
                cfg.train.batch_size,
                p.median_step_s,
                r.median_step_s,
                r.median_step_s / p.median_step_s
            ));
        }
    }
    let path = a.out.join("scaling.md");
    train::checkpoint::write_atomic(&path, md.as_bytes())?;
    print!("{md}");
    println!("results: {}", a.out.join(scaling::RESULTS).display());
    Ok(())
}

fn cmd_bench_model(a: BenchModelArgs) -> Result<()> {
    use ctseg::bench::model;
    if !(a.link_gbps > 0.0 && a.latency_us >= 0.0 && a.copy_gbs > 0.0) {
        return Err(ctseg::error::Error::Argument(format!(
            "--link-gbps and --copy-gbs must be > 0 and --latency-us >= 0 (got {}, {} and {})",
            a.link_gbps, a.copy_gbs, a.latency_us
        ))
        .into());
    }
    let m = model::measured_from_run(&a.run, a.copy_gbs)?;
    let net = model::Network {
        link_gbps: a.link_gbps,
        latency_us: a.latency_us,
        algorithm: a.algorithm,
    };
    let targets = match &a.steps_to_target {
        Some(t) => model::parse_steps_to_target(t)?,
        None => Vec::new(),
    };
    let ranks: Vec<usize> = std::iter::successors(Some(1usize), |n| n.checked_mul(2))
        .take_while(|n| *n <= a.max_ranks.max(1))
        .collect();
    let preds = model::predict(&m, &net, &ranks, &targets);
    let mut md = format!(
        "# ctseg bench model\n\nMeasured in `{}`: {:.4} s compute per image, {:.3} s other per step, {:.3} s gradient copy, {:.1} MB of gradients on the wire, batch {} × {} micro-batch(es), {} training slices.\nNetwork: {} Gbit/s, {} µs latency, {:?} allreduce.\n\n| ranks | global batch | compute (s) | allreduce (s) | step (s) | steps/epoch | epoch (s) | speedup | steps to target | time to target (s) |\n|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
        m.source,
        m.compute_per_image_s,
        m.other_s,
        m.copy_s,
        m.grad_bytes / 1e6,
        m.batch,
        m.accumulate,
        m.train_slices,
        net.link_gbps,
        net.latency_us,
        net.algorithm
    );
    for p in &preds {
        let opt = |v: Option<f64>, scale: f64, digits: usize| {
            v.map_or("—".to_string(), |v| format!("{:.*}", digits, v * scale))
        };
        md.push_str(&format!(
            "| {} | {} | {:.3} | {:.3} | {:.3} | {} | {} | {} | {} | {} |\n",
            p.ranks,
            p.global_batch,
            p.compute_s,
            p.allreduce_s,
            p.step_s,
            p.steps_per_epoch,
            if p.steps_per_epoch > 0 {
                format!("{:.1}", p.epoch_s)
            } else {
                "batch > data".into()
            },
            if p.speedup.is_finite() {
                format!("{:.2}", p.speedup)
            } else {
                "—".into()
            },
            opt(p.steps_to_target, 1.0, 0),
            opt(p.time_to_target_s, 1.0, 1),
        ));
    }
    let dirs: Vec<&Path> = a.validate.iter().map(PathBuf::as_path).collect();
    let checks = model::validate(&m, &net, &dirs, a.copy_gbs)?;
    if !checks.is_empty() {
        md.push_str("\n## Predicted against measured\n\n| run | ranks | measured step (s) | predicted (s) | error | predicted with the run's own compute (s) | error | measured exposed comm (s) | predicted allreduce (s) |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|\n");
        for c in &checks {
            md.push_str(&format!(
                "| {} | {} | {:.3} | {:.3} | {:+.1} % | {:.3} | {:+.1} % | {:.3} | {:.3} |\n",
                c.run_dir,
                c.ranks,
                c.measured_step_s,
                c.predicted_step_s,
                100.0 * c.error,
                c.predicted_comm_only_step_s,
                100.0 * c.comm_only_error,
                c.measured_comm_s,
                c.predicted_allreduce_s
            ));
        }
    }
    print!("{md}");
    if let Some(out) = &a.out {
        std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
        train::checkpoint::write_atomic(&out.join("model.md"), md.as_bytes())?;
        let json = serde_json::json!({ "measured": m, "network": net, "predictions": preds, "validation": checks });
        train::checkpoint::write_atomic(
            &out.join("model.json"),
            serde_json::to_string_pretty(&json)?.as_bytes(),
        )?;
    }
    Ok(())
}

fn cmd_report(a: ReportArgs) -> Result<()> {
    // A directory without metrics.jsonl that holds run directories stands for them.
    let mut dirs = Vec::new();
    for d in &a.runs {
        if d.join("metrics.jsonl").exists() || d.join("summary.json").exists() {
            dirs.push(d.clone());
            continue;
        }
        let entries = std::fs::read_dir(d).with_context(|| format!("reading {}", d.display()))?;
        let mut inner: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.join("metrics.jsonl").exists())
            .collect();
        inner.sort();
        if inner.is_empty() {
            return Err(ctseg::error::Error::Argument(format!(
                "{}: neither a run directory (no metrics.jsonl or summary.json) nor a folder of them",
                d.display()
            ))
            .into());
        }
        dirs.extend(inner);
    }
    let out = ctseg::report::report(
        &dirs,
        &a.out,
        &ctseg::report::ReportOptions {
            loss_targets: a.loss_targets.clone(),
            dice_target: a.dice_target,
            title: a.title.clone(),
        },
    )?;
    println!(
        "report of {} run(s): {} ({} files)",
        out.runs,
        a.out.join("index.html").display(),
        out.files.len()
    );
    Ok(())
}

fn cmd_bench_step(a: BenchStepArgs) -> Result<()> {
    let comm = open_comm()?;
    let cfg = load_config(a.config.as_deref(), &a.overrides)?;
    let be = a
        .backend
        .for_rank(comm.as_ref())
        .open(&cfg.model, a.json || comm.rank() != 0)?;
    let o = StepBenchOptions {
        warmup: a.warmup,
        steps: a.steps.max(1),
    };
    let r = bench::bench_step(&cfg, &be, &o, comm.as_ref())?;
    if comm.rank() != 0 {
        return Ok(());
    }
    if a.json {
        println!("{}", serde_json::to_string(&r)?);
    } else {
        println!(
            "ctseg step ({}): width {} size {} batch {} | median {:.3} s (min {:.3}, max {:.3}, IQR {:.3}, {} steps) | {:.2} img/s | {:.1} GFLOP/s | peak RSS {:.0} MB | loss {:.4} -> {:.4}",
            r.device,
            r.width,
            r.size,
            r.batch,
            r.median_step_s,
            r.min_step_s,
            r.max_step_s,
            r.iqr_step_s,
            r.steps,
            r.images_per_s,
            r.gflops,
            r.peak_rss_mb,
            r.first_loss,
            r.last_loss
        );
        println!(
            "  per step (median): compute {:.3} s | gradient copy {:.3} s | communication {:.3} s of which exposed {:.3} s | optimiser {:.3} s | {} rank(s)",
            r.compute_s, r.copy_s, r.comm_total_s, r.comm_s, r.apply_s, r.ranks
        );
    }
    if let Some(script) = &a.peer {
        let threads = if a.backend.threads == 0 {
            rayon::current_num_threads()
        } else {
            a.backend.threads
        };
        let p = bench::run_peer(&a.python, script, threads, &cfg, &o, &a.peer_device)?;
        let ratio = r.median_step_s / p.median_step_s;
        if a.json {
            println!(
                "{}",
                serde_json::json!({
                    "bench": "peer", "peer": p, "ratio_ctseg_over_peer": ratio,
                    "rss_ratio_ctseg_over_peer": r.peak_rss_mb / p.peak_rss_mb,
                })
            );
        } else {
            println!(
                "pytorch {} ({}): median {:.3} s (min {:.3}) | {:.2} img/s | peak RSS {:.0} MB",
                p.torch, p.device, p.median_step_s, p.min_step_s, p.images_per_s, p.peak_rss_mb
            );
            println!(
                "ratio ctseg/pytorch step time: {ratio:.2}x (peak RSS {:.2}x)",
                r.peak_rss_mb / p.peak_rss_mb
            );
        }
    }
    Ok(())
}
