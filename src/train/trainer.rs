//! The training loop. Each data-parallel step is visible in order: (1) build or restore the
//! model and optimiser and make every rank hold rank 0's copy; (2) per step: forward, loss,
//! backward, gradient averaging across ranks, optimiser step at the scheduled rate; (3) per
//! epoch: BN statistics averaged, distributed validation, checkpoint by rank 0.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use burn::module::Module;
use burn::optim::{GradientsParams, ModuleOptimizer};
use burn::store::ModuleRecord;
use burn::tensor::{Bytes, Device, Tensor, TensorData};
use serde::{Deserialize, Serialize};

use super::checkpoint::{self, Checkpoint, CheckpointMeta};
use super::exchange;
use super::flat::{self, Select};
use super::metrics::{self, MetricsLog, StepRecord, ValRecord};
use super::progress::Progress;
use crate::comm::Communicator;
use crate::config::RunConfig;
use crate::data::{Dataset, HostBatch, Loader, Sampler};
use crate::error::{Error, Result};
use crate::model::{DiceCounts, Mode, UNet, dice_loss, hard_counts, soft_dice};
use crate::optim::schedule::Schedule;
use crate::tensor_util::{data_to_f32, to_f32};

/// How to run a training job (everything that is not in the config).
#[derive(Clone, Debug)]
pub struct TrainOptions {
    /// Run directory (created; holds config, metrics, checkpoint, summary).
    pub out_dir: PathBuf,
    /// Dataset directory; phantoms are generated when `None`.
    pub data_dir: Option<PathBuf>,
    /// Continue from the checkpoint in `out_dir`.
    pub resume: bool,
    /// No progress output.
    pub quiet: bool,
    /// Compute device (without autodiff).
    pub device: Device,
    /// Description of the device, for logs.
    pub device_desc: String,
    /// Threads for host-side work (phantom generation).
    pub host_threads: usize,
    /// Convolution chunk limit of the device (see [`crate::backend::Backend::chunk_limit`]).
    pub chunk_limit: usize,
    /// `"cpu"` or `"gpu"` (kept in `summary.json` for reports).
    pub backend: String,
    /// A name for the run in reports (`summary.json`'s `label`; empty: the directory name).
    pub label: String,
}

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

/// `summary.json`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TrainSummary {
    /// Optimiser steps completed.
    pub steps: u64,
    /// Epochs completed (fractional when stopped by `max_steps`).
    pub epochs: f64,
    /// Ranks.
    pub world_size: usize,
    /// Global batch.
    pub global_batch: usize,
    /// Training wall time, seconds (including earlier segments of a resumed run).
    pub wall_s: f64,
    /// Mean images per second over the run's training steps.
    pub images_per_s: f64,
    /// Loss of the last step.
    pub final_loss: f64,
    /// Last validation.
    pub val_loss: f64,
    /// Last validation liver Dice.
    pub dice_liver: f64,
    /// Last validation tumour Dice.
    pub dice_tumour: f64,
    /// Trainable parameters.
    pub params: usize,
    /// Training / validation slices.
    pub train_slices: usize,
    /// Validation slices.
    pub val_slices: usize,
    /// Device description.
    pub device: String,
    /// Data origin.
    pub data: String,
    /// Seconds the loop waited on the loader in total.
    pub data_wait_s: f64,
    /// FNV-1a hash of every weight and BN statistic at the end (hex): equal on all ranks.
    pub weights_hash: String,
    /// How gradients were exchanged between ranks.
    #[serde(default)]
    pub grad_exchange: String,
    /// Optimiser steps per epoch.
    #[serde(default)]
    pub steps_per_epoch: u64,
    /// Median wall time of one optimiser step in this segment of the run (the first two steps
    /// are left out as warm-up when there are more than four), s.
    #[serde(default)]
    pub median_step_s: f64,
    /// `steps_per_epoch × median_step_s`: the epoch time without validation and checkpoints, s.
    #[serde(default)]
    pub epoch_time_s: f64,
    /// Median seconds of forward + loss + backward per step (all micro-batches).
    #[serde(default)]
    pub median_compute_s: f64,
    /// Largest peak resident memory (VmHWM) of any rank, MB.
    #[serde(default)]
    pub peak_rss_mb: f64,
    /// `"cpu"` or `"gpu"`.
    #[serde(default)]
    pub backend: String,
    /// Micro-batches per optimiser step on each rank.
    #[serde(default)]
    pub accumulate: usize,
    /// Images per micro-batch on each rank.
    #[serde(default)]
    pub batch_size: usize,
    /// Name of the run in reports.
    #[serde(default)]
    pub label: String,
}

/// Test hook: `CTSEG_FAULT_INJECT=panic:RANK:STEP` makes rank RANK panic after optimiser step
/// STEP, to test that a failing rank ends the whole MPI job (tests/mpi.rs).
fn inject_fault(rank: usize, step: u64) {
    if let Ok(spec) = std::env::var("CTSEG_FAULT_INJECT") {
        let parts: Vec<&str> = spec.split(':').collect();
        if let ["panic", r, s] = parts.as_slice()
            && r.parse() == Ok(rank)
            && s.parse() == Ok(step)
        {
            panic!("CTSEG_FAULT_INJECT: rank {rank} panics after step {step}");
        }
    }
}

/// The mean of the micro-batches' gradients (summed on the host in micro-batch order, then
/// scaled by 1/K: for K = 2 exactly the bits a 2-rank allreduce average gives). One
/// micro-batch passes through untouched.
fn accumulate_grads(
    model: &UNet,
    mut micro: Vec<GradientsParams>,
    slots: &[flat::Slot],
    device: &Device,
) -> Result<GradientsParams> {
    if micro.len() == 1 {
        return micro
            .pop()
            .ok_or_else(|| Error::Invalid("no micro-batch gradients".into()));
    }
    let inv = 1.0 / micro.len() as f32;
    let mut sum: Vec<f32> = Vec::new();
    for g in &micro {
        let v = flat::flatten_grads(model, g)?;
        if sum.is_empty() {
            sum = v;
        } else {
            sum.iter_mut().zip(v).for_each(|(s, x)| *s += x);
        }
    }
    sum.iter_mut().for_each(|v| *v *= inv);
    flat::unflatten_grads(&sum, slots, device)
}

/// Builds the model of `cfg` on `device`, with its initial weights and the device's
/// convolution chunk limit.
pub fn build_model(cfg: &RunConfig, device: &Device, chunk_limit: usize) -> UNet {
    cfg.model
        .init(cfg.seed, device)
        .with_chunk_limit(chunk_limit)
}

fn to_tensors(batch: &HostBatch, device: &Device) -> (Tensor<4>, Tensor<4>) {
    let s = batch.size;
    let x = Tensor::from_data(
        TensorData::new(batch.inputs.clone(), [batch.len, 1, s, s]),
        device,
    );
    let y = Tensor::from_data(
        TensorData::new(batch.targets.clone(), [batch.len, batch.classes, s, s]),
        device,
    );
    (x, y)
}

/// Forward pass and Dice loss of one batch: the loss value on the host (this read also
/// synchronises the device) and the loss tensor to differentiate.
pub fn forward_loss(
    model: &UNet,
    x: Tensor<4>,
    y: Tensor<4>,
    mode: Mode,
    smooth: f64,
) -> Result<(f64, Tensor<1>)> {
    let loss = dice_loss(model.forward(x, mode), y, smooth);
    let value = data_to_f32(loss.clone().into_data())?
        .first()
        .copied()
        .map_or(f64::NAN, f64::from);
    Ok((value, loss))
}

/// Host batch → `(inputs, targets)` tensors on `device`.
pub fn batch_tensors(batch: &HostBatch, device: &Device) -> (Tensor<4>, Tensor<4>) {
    to_tensors(batch, device)
}

fn record_error(what: &str, e: impl std::fmt::Display) -> Error {
    Error::Invalid(format!("{what}: {e}"))
}

fn model_bytes(model: &UNet) -> Result<Vec<u8>> {
    let bytes = model
        .clone()
        .into_record()
        .into_bytes()
        .map_err(|e| record_error("serialising the model", e))?;
    Ok(bytes.to_vec())
}

fn load_model_bytes(model: UNet, bytes: Vec<u8>, path: &Path) -> Result<UNet> {
    let record = ModuleRecord::from_bytes(Bytes::from_bytes_vec(bytes))
        .map_err(|e| Error::checkpoint(path, format!("model record: {e}")))?;
    model
        .try_load_record(record)
        .map_err(|e| Error::checkpoint(path, format!("model does not match the config: {e}")))
}

/// Makes every rank hold rank 0's model and optimiser state (weights, BN statistics, optimiser
/// state and their parameter ids), by broadcasting rank 0's serialised records.
fn sync_from_root(
    model: UNet,
    optim: ModuleOptimizer,
    cfg: &RunConfig,
    comm: &dyn Communicator,
) -> Result<(UNet, ModuleOptimizer)> {
    if comm.size() == 1 {
        return Ok((model, optim));
    }
    let mut m = if comm.rank() == 0 {
        model_bytes(&model)?
    } else {
        Vec::new()
    };
    comm.broadcast_bytes(&mut m, 0)?;
    let mut o = if comm.rank() == 0 {
        optim
            .into_bytes()
            .map_err(|e| record_error("serialising the optimiser", e))?
            .to_vec()
    } else {
        Vec::new()
    };
    comm.broadcast_bytes(&mut o, 0)?;
    let src = Path::new("<broadcast from rank 0>");
    let model = load_model_bytes(model, m, src)?;
    let optim = cfg
        .optimizer
        .init()
        .from_bytes(Bytes::from_bytes_vec(o))
        .map_err(|e| Error::checkpoint(src, format!("optimiser record: {e}")))?;
    Ok((model, optim))
}

/// Averages BN running statistics across ranks (before validation and checkpoints), so that
/// the evaluated and saved model is one consistent model.
fn average_buffers(model: UNet, comm: &dyn Communicator) -> Result<UNet> {
    if comm.size() == 1 {
        return Ok(model);
    }
    let mut buf = flat::flatten_values(&model, Select::Buffers)?;
    comm.allreduce_sum_f32(&mut buf)?;
    let inv = 1.0 / comm.size() as f32;
    buf.iter_mut().for_each(|v| *v *= inv);
    flat::assign_values(model, Select::Buffers, &buf)
}

/// Evaluates `model` on this rank's share of `indices` (every `size`-th slice from `rank`) and
/// sums the results over all ranks: every rank returns the exact global figures.
pub fn validate(
    model: &UNet,
    ds: &Arc<Dataset>,
    indices: &[usize],
    cfg: &RunConfig,
    device: &Device,
    comm: &dyn Communicator,
) -> Result<ValResult> {
    let model = model.valid();
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
    let mut loader = Loader::spawn(
        ds.clone(),
        cfg.data.clone(),
        classes,
        batches,
        cfg.data.prefetch,
    );
    // sums: [dice sum over images×channels, soft dice per channel ×C, (tp, fp, fn) ×C, images]
    let mut sums = vec![0.0f64; 1 + classes + 3 * classes + 1];
    while let Some(batch) = loader.next_batch() {
        let (x, y) = to_tensors(&batch, device);
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

/// The model saved in checkpoint `ck` (read from `path`), built from its run config `cfg`, on
/// `be`'s device.
pub fn load_trained(
    cfg: &RunConfig,
    ck: Checkpoint,
    path: &Path,
    be: &crate::backend::Backend,
) -> Result<UNet> {
    let model = build_model(cfg, &be.device, be.chunk_limit);
    load_model_bytes(model, ck.model, path)
}

/// Evaluates a checkpoint on its run's validation split (the split is recomputed from the
/// config's seed), distributed over `comm`.
pub fn validate_checkpoint(
    cfg: &RunConfig,
    ck: &Checkpoint,
    path: &Path,
    data_dir: Option<&Path>,
    be: &crate::backend::Backend,
    comm: &dyn Communicator,
) -> Result<ValResult> {
    let ds = load_dataset(cfg, data_dir, be_threads())?;
    let (_, val_idx) = ds.split(&cfg.data, cfg.seed)?;
    let model = build_model(cfg, &be.device, be.chunk_limit);
    let model = load_model_bytes(model, ck.model.clone(), path)?;
    validate(&model, &ds, &val_idx, cfg, &be.device, comm)
}

fn be_threads() -> usize {
    rayon::current_num_threads()
}

fn load_dataset(cfg: &RunConfig, data_dir: Option<&Path>, threads: usize) -> Result<Arc<Dataset>> {
    let ds = match data_dir {
        Some(dir) => Dataset::open(dir)?,
        None => Dataset::phantom(
            cfg.seed,
            cfg.data.phantom_volumes,
            cfg.data.phantom_slices,
            cfg.model.input_size,
            threads,
        ),
    };
    if ds.size != cfg.model.input_size {
        return Err(Error::dataset(
            data_dir.map(Path::to_path_buf).unwrap_or_default(),
            format!(
                "slices are {0}x{0} but model.input_size is {1}; prepare the data at size {1} or pass --size {0}",
                ds.size, cfg.model.input_size
            ),
        ));
    }
    Ok(Arc::new(ds))
}

/// Trains `cfg` as described by `opts`, on this rank of `comm`. Returns the run summary
/// (identical on all ranks).
pub fn train(
    cfg: &RunConfig,
    opts: &TrainOptions,
    comm: &dyn Communicator,
) -> Result<TrainSummary> {
    let rank0 = comm.rank() == 0;
    let world = comm.size();
    let run_dir = opts.out_dir.as_path();
    if rank0 {
        std::fs::create_dir_all(run_dir).map_err(|e| Error::io(run_dir, e))?;
        checkpoint::write_atomic(
            &run_dir.join("config.resolved.toml"),
            cfg.to_toml()?.as_bytes(),
        )?;
    }

    // Data: the split is by volume; this rank samples its share of the training slices.
    let ds = load_dataset(cfg, opts.data_dir.as_deref(), opts.host_threads)?;
    let (train_idx, val_idx) = ds.split(&cfg.data, cfg.seed)?;
    // With `accumulate = K`, rank r runs the micro-batches of K virtual ranks r·K … r·K+K−1 of a
    // world of ranks·K: the same images, dropout streams and learning-rate scaling as a run on
    // ranks·K processes, one micro-batch each.
    let accumulate = cfg.train.accumulate.max(1);
    let virtual_world = world * accumulate;
    let samplers: Vec<Sampler> = (0..accumulate)
        .map(|k| {
            Sampler::new(
                train_idx.clone(),
                cfg.train.batch_size,
                comm.rank() * accumulate + k,
                virtual_world,
                cfg.seed,
                cfg.data.sampling,
            )
        })
        .collect();
    let steps_per_epoch = samplers[0].steps_per_epoch() as u64;
    if steps_per_epoch == 0 {
        return Err(Error::Invalid(format!(
            "the training set has {} slices: not one full batch of {} per rank on {} rank(s) × {} micro-batch(es); lower train.batch_size or train.accumulate, or add data",
            train_idx.len(),
            cfg.train.batch_size,
            world,
            accumulate
        )));
    }
    let mut total_steps = cfg.train.epochs * steps_per_epoch;
    if cfg.train.max_steps > 0 {
        total_steps = total_steps.min(cfg.train.max_steps);
    }
    let schedule = Schedule::new(
        &cfg.schedule,
        cfg.optimizer.lr,
        virtual_world,
        steps_per_epoch,
        total_steps,
    );
    let global_batch = cfg.train.batch_size * virtual_world;

    // 1. Model and optimiser: fresh, or restored from the checkpoint; then rank 0's copy everywhere.
    let ad = opts.device.clone().autodiff();
    let mut model = build_model(cfg, &ad, opts.chunk_limit);
    let mut optim = cfg.optimizer.init();
    let (mut step, mut epoch, mut skip, mut wall_offset) = (0u64, 0u64, 0u64, 0.0f64);
    let mut progress_note = None;
    if opts.resume {
        let ck = Checkpoint::load(run_dir)?;
        let path = checkpoint::resolve(run_dir);
        model = load_model_bytes(model, ck.model, &path)?;
        optim = optim
            .from_bytes(Bytes::from_bytes_vec(ck.optimizer))
            .map_err(|e| Error::checkpoint(&path, format!("optimiser record: {e}")))?;
        step = ck.meta.step;
        wall_offset = ck.meta.wall_s;
        if ck.meta.world_size == world && ck.meta.global_batch == global_batch {
            epoch = ck.meta.epoch;
            skip = ck.meta.batch_in_epoch;
        } else {
            // Another rank count: same number of images seen, new per-rank sampling.
            let images = ck.meta.step * ck.meta.global_batch as u64;
            let s = images / global_batch as u64;
            epoch = s / steps_per_epoch;
            skip = s % steps_per_epoch;
            progress_note = Some(format!(
                "resuming a checkpoint written by {} rank(s) (global batch {}) on {world} (global batch {global_batch}): learning rate rescaled to {:.4} ({:?} scaling), sampler restarted at epoch {}, batch {} ({} images seen)",
                ck.meta.world_size,
                ck.meta.global_batch,
                schedule.target(),
                cfg.schedule.lr_scaling,
                epoch + 1,
                skip,
                images
            ));
        }
        if rank0 {
            metrics::truncate_after(run_dir, step)?;
        }
    }
    let (m, o) = sync_from_root(model, optim, cfg, comm)?;
    model = m;
    optim = o;
    let slots = flat::layout(&model, Select::Trainable);
    let params: usize = slots.iter().map(|s| s.len).sum();

    let exchange_desc = exchange::describe(&cfg.distributed, &slots, &ad, world);
    let mut log = MetricsLog::open(run_dir, rank0)?;
    let mut progress = Progress::new(
        opts.quiet || !rank0,
        total_steps,
        step,
        cfg.train.log_every_s,
    );
    if rank0 {
        progress.println(&format!(
            "ctseg train: {} | {} | {params} trainable parameters | {} train / {} val slices ({}) | {} steps/epoch, global batch {global_batch}",
            opts.device_desc,
            comm.describe(),
            train_idx.len(),
            val_idx.len(),
            ds.origin,
            steps_per_epoch,
        ));
        if let Some(note) = &progress_note {
            progress.println(note);
        }
        if world > 1 {
            progress.println(&format!("gradient exchange: {exchange_desc}"));
        }
        if opts.resume {
            progress.println(&format!(
                "resumed at step {step} (epoch {}, batch {skip})",
                epoch + 1
            ));
        }
    }

    let start = Instant::now();
    let wall = |start: &Instant| wall_offset + start.elapsed().as_secs_f64();
    let mut last_loss = f64::NAN;
    let mut last_val: Option<(u64, ValResult)> = None;
    let mut trained_images = 0u64;
    let mut train_time = 0.0f64;
    let mut data_wait = 0.0f64;
    let (mut step_times, mut compute_times) = (Vec::new(), Vec::new());

    // 2. Epochs of steps.
    while step < total_steps {
        let per_sampler: Vec<Vec<Vec<usize>>> =
            samplers.iter().map(|s| s.epoch_batches(epoch)).collect();
        let batches: Vec<Vec<usize>> = (skip as usize..steps_per_epoch as usize)
            .flat_map(|b| per_sampler.iter().filter_map(move |p| p.get(b).cloned()))
            .collect();
        let mut batch_in_epoch = skip;
        skip = 0;
        let mut loader = Loader::spawn(
            ds.clone(),
            cfg.data.clone(),
            cfg.model.classes,
            batches,
            cfg.data.prefetch,
        );
        let mut t_prev = Instant::now();
        let mut waited_prev = loader.waited();
        while step < total_steps {
            let lr = schedule.lr(step);
            let t_compute = Instant::now();
            let mut local_loss = 0.0;
            let mut micro = Vec::with_capacity(accumulate);
            for k in 0..accumulate {
                let Some(batch) = loader.next_batch() else {
                    break;
                };
                let (x, y) = to_tensors(&batch, &ad);
                let mode = Mode::Train {
                    seed: cfg.seed,
                    step,
                    stream: (comm.rank() * accumulate + k) as u64,
                };
                let (l, loss) = forward_loss(&model, x, y, mode, cfg.train.loss_smooth)?;
                local_loss += l;
                micro.push(GradientsParams::from_grads(loss.backward(), &model));
            }
            if micro.len() < accumulate {
                // The loader always yields whole steps of `accumulate` micro-batches.
                break;
            }
            let mut loss_sum = [local_loss / accumulate as f64];
            comm.allreduce_sum_f64(&mut loss_sum)?;
            let loss_value = loss_sum[0] / world as f64;
            if !loss_value.is_finite() {
                progress.finish();
                return Err(Error::Diverged {
                    what: "loss",
                    step: step + 1,
                    epoch: epoch + 1,
                    value: loss_value,
                    run_dir: run_dir.to_path_buf(),
                });
            }
            let grads = accumulate_grads(&model, micro, &slots, &ad)?;
            opts.device.sync().map_err(|e| {
                Error::Device(format!("device error during step {}: {e:?}", step + 1))
            })?;
            let compute_s = t_compute.elapsed().as_secs_f64();
            let (grads, exchange) =
                exchange::average(&model, grads, &slots, &ad, comm, &cfg.distributed)?;
            model = optim.step(lr, model, grads);
            step += 1;
            batch_in_epoch += 1;
            inject_fault(comm.rank(), step);

            // Wait for the step to finish before timing it.
            opts.device
                .sync()
                .map_err(|e| Error::Device(format!("device error during step {step}: {e:?}")))?;
            let dt = t_prev.elapsed().as_secs_f64();
            t_prev = Instant::now();
            let w = loader.waited();
            let wait_s = (w - waited_prev).as_secs_f64();
            waited_prev = w;
            data_wait += wait_s;
            trained_images += global_batch as u64;
            train_time += dt;
            step_times.push(dt);
            compute_times.push(compute_s);
            last_loss = loss_value;
            let ips = global_batch as f64 / dt.max(1e-9);
            log.write(&StepRecord {
                kind: "step".into(),
                step,
                epoch: epoch + 1,
                wall_s: wall(&start),
                loss: loss_value,
                lr,
                images_per_s: ips,
                data_wait_s: wait_s,
                compute_s,
                copy_s: exchange.copy_s,
                comm_s: exchange.comm_s,
                comm_total_s: exchange.comm_total_s,
            })?;
            progress.step(step, epoch + 1, loss_value, ips);
        }
        drop(loader);
        let epoch_done = batch_in_epoch >= steps_per_epoch;
        let finished = step >= total_steps;
        let (next_epoch, next_batch) = if epoch_done {
            (epoch + 1, 0)
        } else {
            (epoch, batch_in_epoch)
        };

        // 3. End of an epoch (or of the run): BN statistics, validation, checkpoint.
        let do_val = finished || (epoch_done && (epoch + 1) % cfg.train.val_every == 0);
        let do_ck = finished || (epoch_done && (epoch + 1) % cfg.train.checkpoint_every == 0);
        if do_val || do_ck {
            model = average_buffers(model, comm)?;
        }
        if do_val {
            let v = validate(&model, &ds, &val_idx, cfg, &opts.device, comm)?;
            // Every rank holds the same (reduced) value, so all stop together, and before the
            // checkpoint below could replace the last good one with this model.
            if !v.loss.is_finite() {
                progress.finish();
                return Err(Error::Diverged {
                    what: "validation loss",
                    step,
                    epoch: epoch + 1,
                    value: v.loss,
                    run_dir: run_dir.to_path_buf(),
                });
            }
            let rec = ValRecord {
                kind: "val".into(),
                epoch: epoch + 1,
                step,
                wall_s: wall(&start),
                val_loss: v.loss,
                dice_liver: v.dice(1),
                dice_tumour: v.dice(2),
                soft_dice: v.soft_dice.clone(),
                images: v.images,
            };
            log.write(&rec)?;
            progress.println(&format!(
                "epoch {} step {step}: val loss {:.4}  Dice liver {:.4}  tumour {:.4}",
                epoch + 1,
                v.loss,
                rec.dice_liver,
                rec.dice_tumour
            ));
            last_val = Some((step, v));
        }
        if do_ck && rank0 {
            let ck = Checkpoint {
                meta: CheckpointMeta {
                    step,
                    epoch: next_epoch,
                    batch_in_epoch: next_batch,
                    world_size: world,
                    global_batch,
                    wall_s: wall(&start),
                    config_toml: cfg.to_toml()?,
                    ctseg_version: env!("CARGO_PKG_VERSION").into(),
                },
                model: model_bytes(&model)?,
                optimizer: optim
                    .into_bytes()
                    .map_err(|e| record_error("serialising the optimiser", e))?
                    .to_vec(),
            };
            ck.save(&run_dir.join(checkpoint::FILE))?;
        }
        if do_ck {
            comm.barrier()?;
        }
        epoch = next_epoch;
    }
    progress.finish();

    // Every rank must end with the same model; say so (or not) in the log.
    let hash = flat::hash_f32(&flat::flatten_values(&model, Select::All)?);
    if world > 1 {
        // Exact in f64: the hash in four 16-bit pieces, summed over ranks.
        let pieces: Vec<f64> = (0..4)
            .map(|k| ((hash >> (16 * k)) & 0xffff) as f64)
            .collect();
        let mut sums = pieces.clone();
        comm.allreduce_sum_f64(&mut sums)?;
        let same = sums
            .iter()
            .zip(&pieces)
            .all(|(s, p)| *s == p * world as f64);
        // One write of the whole line: stderr is unbuffered, and `eprintln!` writes each
        // formatted piece separately, so the ranks' lines could interleave mid-line (seen in
        // tests/mpi.rs). A single write of under 4 KiB to a pipe is atomic.
        let line = format!(
            "rank {}/{world}: final weights hash {hash:016x}{}\n",
            comm.rank(),
            if same {
                " (identical on all ranks)"
            } else {
                " (RANKS DIFFER)"
            }
        );
        {
            use std::io::Write;
            let _ = std::io::stderr().write_all(line.as_bytes());
        }
        if !same {
            return Err(Error::Invalid(format!(
                "rank {}: the ranks ended with different weights (hash {hash:016x}); the run is not one model",
                comm.rank()
            )));
        }
    }
    let (val_loss, dice_liver, dice_tumour) = match &last_val {
        Some((_, v)) => (v.loss, v.dice(1), v.dice(2)),
        None => (f64::NAN, f64::NAN, f64::NAN),
    };
    // Every rank's peak memory, gathered by an allreduce of one slot per rank.
    let mut rss = vec![0.0f64; world];
    rss[comm.rank()] = crate::bench::peak_rss_mb();
    comm.allreduce_sum_f64(&mut rss)?;
    let median_step_s = crate::bench::warm_median(step_times).unwrap_or(f64::NAN);
    let summary = TrainSummary {
        steps: step,
        epochs: step as f64 / steps_per_epoch as f64,
        world_size: world,
        global_batch,
        wall_s: wall(&start),
        images_per_s: if train_time > 0.0 {
            trained_images as f64 / train_time
        } else {
            0.0
        },
        final_loss: last_loss,
        val_loss,
        dice_liver,
        dice_tumour,
        params,
        train_slices: train_idx.len(),
        val_slices: val_idx.len(),
        device: opts.device_desc.clone(),
        data: ds.origin.clone(),
        data_wait_s: data_wait,
        weights_hash: format!("{hash:016x}"),
        grad_exchange: exchange_desc,
        steps_per_epoch,
        median_step_s,
        epoch_time_s: median_step_s * steps_per_epoch as f64,
        median_compute_s: crate::bench::warm_median(compute_times).unwrap_or(f64::NAN),
        peak_rss_mb: rss.iter().copied().fold(0.0, f64::max),
        backend: opts.backend.clone(),
        accumulate,
        batch_size: cfg.train.batch_size,
        label: opts.label.clone(),
    };
    if rank0 {
        let text = serde_json::to_string_pretty(&summary)
            .map_err(|e| record_error("serialising the summary", e))?;
        checkpoint::write_atomic(&run_dir.join("summary.json"), text.as_bytes())?;
    }
    Ok(summary)
}
