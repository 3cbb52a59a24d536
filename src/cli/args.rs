//! The command line as clap sees it: raw flags, grouped as the commands share them, and their
//! conversion into the library's validated values (a config with overrides, a device request,
//! predict options). The commands themselves are in [`super::commands`].

use std::path::{Path, PathBuf};

use clap::{Args, Parser, Subcommand};

use ctseg::backend::{BackendKind, DeviceRequest};
use ctseg::config::{Overrides, RunConfig};
use ctseg::error::Error;
use ctseg::model::GpuConv;
use ctseg::rundir::CheckpointKind;

/// Parser of a count flag that must lie in `LO..=HI`: clap refuses anything else (exit 2,
/// naming the flag) before the value sizes an allocation, a thread pool or a loop. The upper
/// limits are far above any real use and far below what would exhaust a node.
fn count<const LO: usize, const HI: usize>(s: &str) -> Result<usize, String> {
    let v: usize = s.trim().parse().map_err(|e| format!("{e}"))?;
    if (LO..=HI).contains(&v) {
        Ok(v)
    } else {
        Err(format!("expected {LO} to {HI}"))
    }
}

/// ctseg: train CT segmentation U-Nets on a CPU or a GPU, alone or over MPI.
#[derive(Parser, Debug)]
#[command(name = "ctseg", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Train a model (default: the built-in quick config on phantoms, CPU, one process).
    Train(Box<TrainArgs>),
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
    /// Segment a folder of labelled CT volumes and score them: per-case and global metrics.
    Evaluate(EvaluateArgs),
    /// Write a trained model for other tools: safetensors (PyTorch peer) or ONNX.
    Export(ExportArgs),
    /// Evaluate a checkpoint on its run's validation split (distributed under mpirun).
    Validate(ValidateArgs),
    /// List the graphics adapters `--backend gpu` can use.
    Adapters,
}

/// Which device, shared by every command that computes.
#[derive(Args, Debug, Clone)]
pub struct BackendArgs {
    /// cpu (burn flex) or gpu (burn wgpu).
    #[arg(long, value_enum, default_value = "cpu")]
    pub backend: BackendKind,
    /// CPU threads (0: all cores; under mpirun, the node's cores split between its ranks).
    #[arg(long, default_value_t = 0, value_parser = count::<0, 1024>)]
    pub threads: usize,
    /// GPU adapter index (see `ctseg adapters`).
    #[arg(long)]
    pub adapter: Option<usize>,
    /// The 3×3 convolutions' kernels on a GPU in f32: whichever runs the model's layers faster
    /// on this adapter, timed at start-up or by an earlier run of the same work (auto; retime:
    /// timed now); burn's; or ctseg's WGSL implicit GEMM (docs/gpu-notes.md compares them).
    #[arg(long, value_enum, default_value = "auto")]
    pub gpu_conv: GpuConvArg,
    /// Keep mixed precision's convolutions off the adapter's cooperative matrices (tensor
    /// cores), on ctseg's register kernels (`ctseg adapters` says which an adapter gets).
    #[arg(long)]
    pub no_cooperative_matrices: bool,
    /// Skip the start-up check that the GPU computes the model's gradients like the CPU.
    #[arg(long)]
    pub skip_gpu_check: bool,
}

/// `--gpu-conv`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum GpuConvArg {
    /// Timed at start-up on the model's own layers ([`ctseg::bench::conv_choice`]), or as an
    /// earlier run of the same work on this adapter timed them.
    Auto,
    /// As `auto`, timed now whatever an earlier run kept, replacing it.
    Retime,
    /// burn's kernels.
    Burn,
    /// ctseg's WGSL kernels.
    Wgsl,
}

impl BackendArgs {
    /// The device request these flags make.
    pub fn request(&self) -> DeviceRequest {
        DeviceRequest {
            kind: self.backend,
            threads: self.threads,
            adapter: self.adapter,
            gpu_conv: match self.gpu_conv {
                GpuConvArg::Wgsl => GpuConv::Wgsl,
                // `auto` opens on burn's and may switch once the model is known (open_backend).
                GpuConvArg::Auto | GpuConvArg::Retime | GpuConvArg::Burn => GpuConv::Burn,
            },
            cooperative_matrices: !self.no_cooperative_matrices,
        }
    }
}

/// Command-line overrides of a run config.
#[derive(Args, Debug, Clone, Default)]
pub struct OverrideArgs {
    /// Epochs.
    #[arg(long)]
    pub epochs: Option<u64>,
    /// Images per step on each rank.
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Base learning rate (per rank, before rank scaling).
    #[arg(long)]
    pub lr: Option<f64>,
    /// Stop after this many optimiser steps (0: no limit).
    #[arg(long)]
    pub max_steps: Option<u64>,
    /// Seed of every random stream.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Model width.
    #[arg(long)]
    pub width: Option<usize>,
    /// Input size (pixels).
    #[arg(long)]
    pub size: Option<usize>,
    /// Gradient compression on the wire (data-parallel runs).
    #[arg(long, value_enum)]
    pub grad_compression: Option<ctseg::train::exchange::Compression>,
    /// Validate on this fold of a dataset prepared with `--folds`, train on the others.
    #[arg(long)]
    pub fold: Option<usize>,
    /// Micro-batches per optimiser step on each rank (global batch = batch size × ranks × this).
    #[arg(long)]
    pub accumulate: Option<usize>,
    /// f32, or mixed: f16 convolution operands with f32 accumulation and dynamic loss scaling
    /// (on the adapter's cooperative matrices where it has them; `ctseg adapters` says which).
    #[arg(long, value_enum)]
    pub precision: Option<ctseg::train::precision::Precision>,
}

impl OverrideArgs {
    pub fn to_overrides(&self) -> Overrides {
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
            precision: self.precision,
        }
    }

    /// Refuses the overrides that would change a run's split or model when it is resumed: its
    /// validation volumes would become training volumes, or its checkpoint would not fit.
    pub fn check_resumable(&self) -> Result<(), Error> {
        let fixed: Vec<&str> = [
            ("--seed", self.seed.is_some()),
            ("--fold", self.fold.is_some()),
            ("--width", self.width.is_some()),
            ("--size", self.size.is_some()),
        ]
        .iter()
        .filter(|(_, given)| *given)
        .map(|(name, _)| *name)
        .collect();
        if fixed.is_empty() {
            Ok(())
        } else {
            Err(Error::Argument(format!(
                "--resume: {} would change the run's split or model; a resumed run keeps its own (start a new run with --out instead)",
                fixed.join(", ")
            )))
        }
    }
}

/// A config file (or the built-in quick config) with overrides applied and validated.
pub fn load_config(path: Option<&Path>, o: &OverrideArgs) -> anyhow::Result<RunConfig> {
    let mut cfg = RunConfig::load(path)?;
    cfg.apply(&o.to_overrides());
    let source = path.map_or_else(
        || "configs/quick.toml (built in)".to_string(),
        |p| p.display().to_string(),
    );
    cfg.validate(&source)?;
    Ok(cfg)
}

#[derive(Args, Debug)]
pub struct TrainArgs {
    /// Run config (TOML); default: the built-in configs/quick.toml.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Dataset directory (from `ctseg phantom` or `ctseg prepare`); default: generate phantoms
    /// (on `--resume`: the run's own dataset).
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Run directory; default: a new runs/<date>-<time>-<pid>[-<Slurm job>]-<random>.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Replace the run in `--out` (its config, metrics, checkpoints and summary) with a new one.
    #[arg(long, requires = "out")]
    pub overwrite: bool,
    /// Continue the run in this directory from its last checkpoint.
    #[arg(long, conflicts_with_all = ["config", "out", "overwrite"])]
    pub resume: Option<PathBuf>,
    /// No progress output.
    #[arg(long)]
    pub quiet: bool,
    /// Name of the run in `ctseg report` (default: the run directory's name).
    #[arg(long, default_value = "")]
    pub label: String,
    #[command(flatten)]
    pub backend: BackendArgs,
    #[command(flatten)]
    pub overrides: OverrideArgs,
}

#[derive(Args, Debug)]
pub struct ValidateArgs {
    /// Run directory or checkpoint file.
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// Which checkpoint of a run directory.
    #[arg(long, value_enum, default_value = "best")]
    pub checkpoint_kind: CheckpointKind,
    /// Dataset directory (default: the one the run trained on).
    #[arg(long)]
    pub data: Option<PathBuf>,
    #[command(flatten)]
    pub backend: BackendArgs,
    /// Print one JSON line.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct ModelArgs {
    /// Run config (TOML); default: the built-in quick config.
    #[arg(long)]
    pub config: Option<PathBuf>,
    #[command(flatten)]
    pub overrides: OverrideArgs,
}

/// A trained model to run: shared by `predict` and `evaluate`.
#[derive(Args, Debug)]
pub struct InferArgs {
    /// Run directory or checkpoint file.
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// Which checkpoint of a run directory.
    #[arg(long, value_enum, default_value = "best")]
    pub checkpoint_kind: CheckpointKind,
    /// Slices per forward pass.
    #[arg(long, default_value_t = 8, value_parser = count::<1, 4096>)]
    pub batch_size: usize,
    /// Keep only the largest connected liver component (and the tumour inside it).
    #[arg(long)]
    pub largest_component: bool,
    #[command(flatten)]
    pub backend: BackendArgs,
}

impl InferArgs {
    pub fn options(&self) -> ctseg::infer::PredictOptions {
        ctseg::infer::PredictOptions {
            batch_size: self.batch_size,
            largest_component: self.largest_component,
        }
    }
}

#[derive(Args, Debug)]
pub struct PredictArgs {
    #[command(flatten)]
    pub infer: InferArgs,
    /// A CT volume (.nii or .nii.gz), a folder of them, or a folder holding one DICOM series.
    #[arg(long)]
    pub input: PathBuf,
    /// Output mask (.nii.gz) for one input, or a folder for a folder of inputs. An existing
    /// mask is replaced (atomically); an input never is.
    #[arg(long)]
    pub output: PathBuf,
    /// Also draw the slices with the most tumour and liver, the prediction outlined, as
    /// `<mask>-overlay.png` beside each mask.
    #[arg(long)]
    pub overlay: bool,
}

#[derive(Args, Debug)]
pub struct EvaluateArgs {
    #[command(flatten)]
    pub infer: InferArgs,
    /// Labelled volumes: a LiTS-layout folder or a CSV of image,label rows.
    #[arg(long)]
    pub input: PathBuf,
    /// Output folder for evaluation.csv and evaluation.json (replaced if present).
    #[arg(long)]
    pub out: PathBuf,
    /// Also write each predicted mask into the output folder.
    #[arg(long)]
    pub save_masks: bool,
    /// Also draw each case's slices with the most tumour and liver, truth and prediction
    /// outlined, as `<case>-pred-overlay.png` in the output folder.
    #[arg(long)]
    pub overlays: bool,
}

/// What `export` writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ExportFormat {
    /// safetensors under the PyTorch peer's tensor names.
    Safetensors,
    /// An ONNX model (opset 17) for ONNX Runtime, TensorRT, MONAI Deploy.
    Onnx,
}

#[derive(Args, Debug)]
pub struct ExportArgs {
    /// Run directory or checkpoint file.
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// Which checkpoint of a run directory.
    #[arg(long, value_enum, default_value = "best")]
    pub checkpoint_kind: CheckpointKind,
    /// Output format.
    #[arg(long, value_enum, default_value = "safetensors")]
    pub format: ExportFormat,
    /// ONNX: write each BatchNorm as a precomputed Mul + Add instead of BatchNormalization.
    #[arg(long)]
    pub fold_batch_norm: bool,
    /// Output file (.safetensors or .onnx); an existing one is replaced (atomically).
    #[arg(long)]
    pub out: PathBuf,
}

#[derive(Args, Debug)]
pub struct PrepareArgs {
    /// A folder of volume-N.nii[.gz] / segmentation-N.nii[.gz] (LiTS layout), or a CSV file of
    /// image,label rows (paths relative to the CSV).
    #[arg(long)]
    pub input: PathBuf,
    /// Output dataset directory (must not exist).
    #[arg(long)]
    pub out: PathBuf,
    /// Slice size after resizing.
    #[arg(long, default_value_t = 240, value_parser = count::<1, 8192>)]
    pub size: usize,
    /// Cross-validation folds, assigned by volume (1: none).
    #[arg(long, default_value_t = 1)]
    pub folds: usize,
    /// Slices kept above and below the liver's z-range.
    #[arg(long, default_value_t = 0, value_parser = count::<0, 100_000>)]
    pub margin: usize,
    /// Image resizing (labels always take the nearest voxel).
    #[arg(long, value_enum, default_value_t = ctseg::data::prepare::Resize::Nearest)]
    pub resize: ctseg::data::prepare::Resize,
    /// Slices per shard file.
    #[arg(long, default_value_t = 256, value_parser = count::<1, 1_000_000>)]
    pub shard_slices: usize,
    /// Seed of the fold assignment.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// No per-volume progress lines.
    #[arg(long)]
    pub quiet: bool,
}

#[derive(Args, Debug)]
pub struct PhantomArgs {
    /// Number of slices.
    #[arg(long, value_parser = count::<1, 100_000>)]
    pub count: usize,
    /// Slice size in pixels.
    #[arg(long, default_value_t = 240, value_parser = count::<1, 8192>)]
    pub size: usize,
    /// Output dataset directory (must not exist).
    #[arg(long)]
    pub out: PathBuf,
    /// Slices per phantom volume (patient).
    #[arg(long, default_value_t = 24, value_parser = count::<1, 32767>)]
    pub slices_per_volume: usize,
    /// Seed.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Slices per shard file.
    #[arg(long, default_value_t = 256, value_parser = count::<1, 1_000_000>)]
    pub shard_slices: usize,
    /// Also write a contact sheet of (up to 24) slices to this PNG.
    #[arg(long)]
    pub preview: Option<PathBuf>,
    /// Threads for generation (0: all cores).
    #[arg(long, default_value_t = 0, value_parser = count::<0, 1024>)]
    pub threads: usize,
}

#[derive(Subcommand, Debug)]
pub enum BenchCommand {
    /// Time training steps (forward, backward, optimiser) on a fixed batch.
    Step(Box<BenchStepArgs>),
    /// Allreduce time and bus bandwidth against message size (launch with mpirun).
    Allreduce(BenchAllreduceArgs),
    /// Train one config at several rank counts and backends; epoch time, speedup, step split.
    Scaling(Box<BenchScalingArgs>),
    /// Predict step time, epoch time, speedup and time-to-target for 1 … 1024 ranks.
    Model(Box<BenchModelArgs>),
    /// ctseg's GPU kernels against burn's, one layer at a time: 3×3 convolution (f32, and mixed
    /// precision on cooperative matrices where the adapter has them) and batch normalisation.
    Kernels(BenchKernelsArgs),
}

#[derive(Args, Debug)]
pub struct BenchStepArgs {
    /// Run config (TOML); default: the built-in quick config.
    #[arg(long)]
    pub config: Option<PathBuf>,
    #[command(flatten)]
    pub backend: BackendArgs,
    #[command(flatten)]
    pub overrides: OverrideArgs,
    /// Untimed warm-up steps.
    #[arg(long, default_value_t = 2, value_parser = count::<0, 1_000_000>)]
    pub warmup: usize,
    /// Timed steps.
    #[arg(long, default_value_t = 5, value_parser = count::<1, 1_000_000>)]
    pub steps: usize,
    /// Print one JSON line.
    #[arg(long)]
    pub json: bool,
    /// Also run this PyTorch peer script (e.g. tests/reference/livermask_torch.py) with the
    /// same shapes and thread count, and print the ratio.
    #[arg(long)]
    pub peer: Option<PathBuf>,
    /// Python interpreter for the peer.
    #[arg(long, default_value = "python3")]
    pub python: String,
    /// Device for the peer (`cpu`, or `cuda` beside `--backend gpu`).
    #[arg(long, default_value = "cpu")]
    pub peer_device: String,
    /// The peer's precisions, each run in turn: `f32` (PyTorch's default, cuDNN in TF32 on
    /// CUDA) and/or `amp` (autocast + GradScaler).
    #[arg(long, value_enum, value_delimiter = ',', default_value = "f32")]
    pub peer_precision: Vec<ctseg::bench::PeerPrecision>,
    /// Then profile this many more steps: each phase's wall and host-issue time with the device
    /// synchronised between phases, and on the GPU every kernel launch counted and timed.
    #[arg(long, value_name = "STEPS", num_args = 0..=1, default_missing_value = "3", value_parser = count::<1, 10_000>)]
    pub profile: Option<usize>,
    /// Kernels listed per phase in the profile table (all are in the JSON).
    #[arg(long, default_value_t = 8)]
    pub profile_top: usize,
    /// Also write the profile as JSON to this file.
    #[arg(long, value_name = "FILE", requires = "profile")]
    pub profile_json: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct BenchKernelsArgs {
    /// GPU adapter index (see `ctseg adapters`).
    #[arg(long)]
    pub adapter: Option<usize>,
    /// Timed repetitions of each path (after one untimed).
    #[arg(long, default_value_t = 5, value_parser = count::<1, 10_000>)]
    pub reps: usize,
    /// Layers as B,C,H,W (a convolution C → C) or B,C,H,W,CO; repeatable. Default: livermask's
    /// (width 32 at 240², 120² and its bottleneck's input, width 64 at 240², batch 4; width 64 at
    /// 240² and 120² at the study's batch 30).
    #[arg(long = "case", value_name = "B,C,H,W[,CO]")]
    pub cases: Vec<ctseg::bench::kernels::KernelCase>,
    /// Only the first N default layers.
    #[arg(long, conflicts_with = "cases", value_parser = count::<1, 64>)]
    pub first: Option<usize>,
    /// Print JSON lines.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct BenchAllreduceArgs {
    /// Smallest message, bytes.
    #[arg(long, default_value_t = 1024, value_parser = count::<4, { 1 << 34 }>)]
    pub min_bytes: usize,
    /// Largest message, bytes (sizes double).
    #[arg(long, default_value_t = 128 * 1024 * 1024, value_parser = count::<4, { 1 << 34 }>)]
    pub max_bytes: usize,
    /// Link rate in Gbit/s: adds the ring-allreduce bound 2(p−1)/p·S/rate to each row.
    #[arg(long)]
    pub link_gbps: Option<f64>,
    /// Print JSON lines.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct BenchScalingArgs {
    /// Run config (TOML).
    #[arg(long)]
    pub config: PathBuf,
    /// Dataset directory; default: phantoms from the config.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Rank counts of the CPU series.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4")]
    pub ranks: Vec<usize>,
    /// Backends.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "cpu")]
    pub backends: Vec<BackendKind>,
    /// Rank counts of the GPU runs.
    #[arg(long, value_delimiter = ',', default_value = "1")]
    pub gpu_ranks: Vec<usize>,
    /// Launcher template, `{n}` = ranks: e.g. 'mpirun -np {n} --hostfile hosts',
    /// 'srun -n {n} --mpi=pmix', 'scripts/emulate_hosts.sh -k {n} -r 1gbit --'. Empty: only
    /// 1-rank runs, started directly.
    #[arg(long, default_value = "mpirun -np {n} --oversubscribe --bind-to none")]
    pub launcher: String,
    /// Output directory (one run directory per backend and rank count, scaling.json, scaling.md).
    #[arg(long)]
    pub out: PathBuf,
    /// Kill a run after this many seconds.
    #[arg(long, default_value_t = 3600.0)]
    pub timeout_s: f64,
    /// Also run this PyTorch peer script with the config's width, size and batch, and print its
    /// step time beside ctseg's 1-rank CPU step.
    #[arg(long)]
    pub peer: Option<PathBuf>,
    /// Python interpreter for the peer.
    #[arg(long, default_value = "python3")]
    pub python: String,
    /// Arguments passed on to every `ctseg train` (after `--`), e.g. `-- --max-steps 20 --threads 1`.
    #[arg(last = true)]
    pub train_args: Vec<String>,
}

#[derive(Args, Debug)]
pub struct BenchModelArgs {
    /// Run directory whose measured compute, copy and optimiser times feed the model.
    #[arg(long)]
    pub run: PathBuf,
    /// Link rate per node, Gbit/s.
    #[arg(long, default_value_t = 10.0)]
    pub link_gbps: f64,
    /// Per-message latency, µs.
    #[arg(long, default_value_t = 50.0)]
    pub latency_us: f64,
    /// Allreduce algorithm.
    #[arg(long, value_enum, default_value = "ring")]
    pub algorithm: ctseg::bench::model::Algorithm,
    /// Largest rank count (powers of two from 1).
    #[arg(long, default_value_t = 1024, value_parser = count::<1, { 1 << 20 }>)]
    pub max_ranks: usize,
    /// Steps to the target at given global batches, from the large-batch study:
    /// GLOBAL_BATCH=STEPS,… (log-log interpolated, never extrapolated).
    #[arg(long)]
    pub steps_to_target: Option<String>,
    /// Gradient copy rate (device → fused buffer → device), GB/s, for a 1-rank `--run` (a
    /// multi-rank run's measured copy time is used as it is).
    #[arg(long, default_value_t = ctseg::bench::model::DEFAULT_COPY_GBS)]
    pub copy_gbs: f64,
    /// Measured runs to compare the model with (their rank counts are predicted).
    #[arg(long, num_args = 1..)]
    pub validate: Vec<PathBuf>,
    /// Write the tables (Markdown) and predictions (JSON) to this directory.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct ReportArgs {
    /// Run directories (from `ctseg train` or `ctseg bench scaling`); a directory holding
    /// run directories (e.g. a `bench scaling --out`) stands for all of them.
    #[arg(required = true)]
    pub runs: Vec<PathBuf>,
    /// Output directory (PNG, SVG, Markdown, CSV, index.html; files of the same names replaced).
    #[arg(long)]
    pub out: PathBuf,
    /// Training-loss thresholds for the time-to-target table (the loss is −Dice: lower is better).
    #[arg(
        long,
        value_delimiter = ',',
        allow_hyphen_values = true,
        default_value = "-0.75,-0.76"
    )]
    pub loss_targets: Vec<f64>,
    /// Validation liver Dice target.
    #[arg(long, default_value_t = 0.9)]
    pub dice_target: f64,
    /// Title of the report.
    #[arg(long, default_value = "ctseg runs")]
    pub title: String,
}
