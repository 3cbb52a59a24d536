//! The training loop, top-down: [`train`] reads as its numbered steps, each a function or a
//! method of [`Trainer`] below. Per step: forward, loss, backward, gradient averaging across
//! ranks, optimiser step ([`super::step`]); per epoch: BN statistics averaged, distributed
//! validation, best and last checkpoints by rank 0.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use super::exchange;
use super::flat::{self, Select};
use super::progress::Progress;
use super::signals::StopFlag;
use super::state::TrainState;
use super::step::Stepper;
use super::validation::{ValResult, validate};
use crate::backend::Backend;
use crate::comm::Communicator;
use crate::config::RunConfig;
use crate::data::{BatchMaker, Dataset, HostBatch, Loader, Sampler};
use crate::error::{Error, Result};
use crate::optim::schedule::Schedule;
use crate::rundir::metrics::{self, Record};
use crate::rundir::{
    Checkpoint, CheckpointKind, CheckpointMeta, MetricsLog, Provenance, RunDir, RunLock,
    StepRecord, Summary, ValRecord,
};
use crate::util::{stats, sys};

/// How a training job starts.
pub enum Start {
    /// A new run in a directory that holds none.
    Fresh,
    /// A new run in place of the run in the directory (its files are removed first).
    Overwrite,
    /// Continue the run from this checkpoint, the directory's last.
    Resume(Box<Checkpoint>),
}

/// How to run a training job (everything that is not in the config).
pub struct TrainOptions {
    /// Run directory (created; holds config, metrics, checkpoints, summary).
    pub run_dir: PathBuf,
    /// Dataset directory; phantoms when `None` (on resume: the run's own data).
    pub data_dir: Option<PathBuf>,
    /// Fresh, overwrite or resume.
    pub start: Start,
    /// No progress output.
    pub quiet: bool,
    /// The compute backend of this rank.
    pub backend: Backend,
    /// Threads for host-side work (phantom generation).
    pub host_threads: usize,
    /// A name for the run in reports (`summary.json`'s `label`; empty: the directory name).
    pub label: String,
}

/// How a training job ended.
#[derive(Debug)]
pub enum TrainOutcome {
    /// All steps ran; the summary (identical on all ranks) was written.
    Finished(Box<Summary>),
    /// A signal asked to stop: every rank stopped after `step` and rank 0 checkpointed there.
    Stopped {
        /// Optimiser steps completed.
        step: u64,
    },
    /// `--resume` of a run that had already run all its steps: nothing was done or written.
    AlreadyFinished {
        /// Steps of the run.
        step: u64,
    },
}

/// Trains `cfg` as `opts` says, on this rank of `comm`.
pub fn train(cfg: &RunConfig, opts: TrainOptions, comm: &dyn Communicator) -> Result<TrainOutcome> {
    // 1. Data, split, sampling and schedule; on resume, the run's own data, checked.
    let resume = match &opts.start {
        Start::Resume(ck) => Some(ck.as_ref()),
        _ => None,
    };
    // A resumed run that another job is using is refused before anything is decided about it
    // (rank 0 holds the lock from here; a fresh directory is only created, and locked, in 3).
    let held = match (resume, comm.rank() == 0) {
        (Some(_), true) => Some(RunLock::acquire(&opts.run_dir)?),
        _ => None,
    };
    let data_dir = data_dir_of(opts.data_dir.as_deref(), resume);
    let plan = Plan::new(cfg, data_dir.as_deref(), opts.host_threads, comm)?;
    if let Some(ck) = resume {
        check_provenance(&plan.provenance, &ck.meta.provenance, &opts.run_dir)?;
        if ck.meta.step >= plan.total_steps {
            return Ok(TrainOutcome::AlreadyFinished { step: ck.meta.step });
        }
    }
    // 2. Every rank must hold the same config, data and ctseg as rank 0.
    agree_across_ranks(cfg, &plan.provenance, comm)?;
    // 3. The run directory (rank 0): refuse a run it would overwrite, lock, write the config.
    let run = RunDir::new(&opts.run_dir);
    let _lock = prepare_run_dir(cfg, &opts, &run, comm.rank() == 0, held)?;
    // 4. Model and optimiser, fresh or restored, then rank 0's copy on every rank.
    let ad = opts.backend.device.clone().autodiff();
    let fresh = TrainState::fresh(cfg, &ad, opts.backend.caps);
    let (state, pos, note) = match resume {
        Some(ck) => restore(cfg, fresh, ck, &plan, &run)?,
        None => (fresh, Position::default(), None),
    };
    let mut state = state.broadcast_from_root(cfg, comm)?;
    let mut t = Trainer::new(cfg, &opts, comm, run, plan, pos, &state)?;
    t.banner(note.as_deref());
    // 5. Epochs: their steps, then BN statistics, validation and checkpoints.
    while !t.done() {
        state = t.run_epoch(state)?;
        state = t.end_of_epoch(state)?;
    }
    t.progress.finish();
    if t.stopped {
        return Ok(TrainOutcome::Stopped { step: t.pos.step });
    }
    // 6. One model on every rank, and the summary.
    t.finish(&state)
        .map(|s| TrainOutcome::Finished(Box::new(s)))
}

/// The data directory of a run: the one given, else on resume the run's own (recorded in its
/// checkpoint), else none (phantoms).
fn data_dir_of(given: Option<&Path>, resume: Option<&Checkpoint>) -> Option<PathBuf> {
    given.map(Path::to_path_buf).or_else(|| {
        resume
            .map(|ck| ck.meta.provenance.data_dir.clone())
            .filter(|d| !d.is_empty())
            .map(PathBuf::from)
    })
}

/// Refuses to continue a run on other data or another split than it started with.
pub fn check_provenance(now: &Provenance, then: &Provenance, run: &Path) -> Result<()> {
    if then.data_hash.is_empty() {
        return Ok(()); // a checkpoint of an older version records nothing to check
    }
    let name = |p: &Provenance| {
        if p.data_dir.is_empty() {
            "phantoms".to_string()
        } else {
            p.data_dir.clone()
        }
    };
    if now.data_hash != then.data_hash {
        return Err(Error::Argument(format!(
            "{}: the run trained on {} (manifest {}), but the data given is {} (manifest {}); pass the run's own --data",
            run.display(),
            name(then),
            then.data_hash,
            name(now),
            now.data_hash
        )));
    }
    if now.fold != then.fold || now.split_seed != then.split_seed {
        return Err(Error::Argument(format!(
            "{}: the run was split with fold {:?} and seed {}, not fold {:?} and seed {}: its validation volumes would become training volumes",
            run.display(),
            then.fold,
            then.split_seed,
            now.fold,
            now.split_seed
        )));
    }
    Ok(())
}

/// Checks that every rank holds rank 0's ctseg version, config and data: rank 0 broadcasts its
/// fingerprint and a rank that differs fails, naming itself and both values (the caller's abort
/// wrapper then ends the job). Collective.
pub fn agree_across_ranks(
    cfg: &RunConfig,
    provenance: &Provenance,
    comm: &dyn Communicator,
) -> Result<()> {
    if comm.size() == 1 {
        return Ok(());
    }
    let config = cfg.to_toml()?;
    let mine = format!(
        "ctseg {} | config {:016x} | data {} {}",
        env!("CARGO_PKG_VERSION"),
        crate::util::fnv1a(config.bytes()),
        provenance.data_dir,
        provenance.data_hash
    );
    let mut root = mine.clone().into_bytes();
    comm.broadcast_bytes(&mut root, 0)?;
    let root = String::from_utf8_lossy(&root);
    if root != mine {
        return Err(Error::Argument(format!(
            "rank {} differs from rank 0: rank 0 has [{root}], rank {} has [{mine}] (a stale copy of --data, another config or another ctseg on this node?)",
            comm.rank(),
            comm.rank()
        )));
    }
    Ok(())
}

/// Rank 0 readies the run directory and locks it (or keeps the lock it `held` already): a
/// fresh run refuses a directory that holds a run (unless it overwrites it), a resumed run drops
/// the metrics its checkpoint does not cover. Other ranks only read the directory.
fn prepare_run_dir(
    cfg: &RunConfig,
    opts: &TrainOptions,
    run: &RunDir,
    rank0: bool,
    held: Option<RunLock>,
) -> Result<Option<RunLock>> {
    if !rank0 {
        return Ok(None);
    }
    let root = run.root();
    std::fs::create_dir_all(root).map_err(|e| Error::io(root, e))?;
    let lock = match held {
        Some(lock) => lock,
        None => RunLock::acquire(root)?,
    };
    match &opts.start {
        Start::Fresh if run.holds_run() => {
            return Err(Error::Argument(format!(
                "{}: already holds a run; continue it with `ctseg train --resume {0}`, replace it with --overwrite, or choose another --out",
                root.display()
            )));
        }
        Start::Overwrite => {
            for f in [
                run.config(),
                run.metrics(),
                run.checkpoint(CheckpointKind::Last),
                run.checkpoint(CheckpointKind::Best),
                run.summary(),
            ] {
                match std::fs::remove_file(&f) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                        return Err(Error::io(&f, e));
                    }
                    _ => {}
                }
            }
        }
        Start::Resume(ck) => metrics::truncate_after(&run.metrics(), ck.meta.step)?,
        Start::Fresh => {}
    }
    crate::util::fs::write_atomic(&run.config(), cfg.to_toml()?.as_bytes())?;
    Ok(Some(lock))
}

/// What the run is made of: the data and its split, the samplers, the step counts, the
/// schedule.
struct Plan {
    ds: Arc<Dataset>,
    train_idx: Vec<usize>,
    val_idx: Vec<usize>,
    /// One sampler per micro-batch stream of this rank (`train.accumulate` of them).
    samplers: Vec<Sampler>,
    accumulate: usize,
    steps_per_epoch: u64,
    total_steps: u64,
    schedule: Schedule,
    global_batch: usize,
    provenance: Provenance,
}

/// The dataset a run trains on: `data_dir`, or the config's phantoms.
pub fn load_dataset(cfg: &RunConfig, data_dir: Option<&Path>, threads: usize) -> Result<Dataset> {
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
    Ok(ds)
}

/// Where a dataset came from and how `cfg` splits it.
pub fn provenance_of(cfg: &RunConfig, ds: &Dataset, data_dir: Option<&Path>) -> Provenance {
    Provenance {
        data_dir: data_dir
            .map(|d| crate::util::fs::resolve(d).display().to_string())
            .unwrap_or_default(),
        data_hash: ds.fingerprint.clone(),
        fold: cfg.data.fold,
        split_seed: cfg.seed,
        resize: ds.resize,
    }
}

impl Plan {
    fn new(
        cfg: &RunConfig,
        data_dir: Option<&Path>,
        threads: usize,
        comm: &dyn Communicator,
    ) -> Result<Self> {
        let (rank, world) = (comm.rank(), comm.size());
        let ds = load_dataset(cfg, data_dir, threads)?;
        let provenance = provenance_of(cfg, &ds, data_dir);
        let (train_idx, val_idx) = ds.split(&cfg.data, cfg.seed)?;
        // With `accumulate = K`, rank r runs the micro-batches of K virtual ranks r·K … r·K+K−1
        // of a world of ranks·K: the same images, dropout streams and learning-rate scaling as
        // a run on ranks·K processes, one micro-batch each.
        let accumulate = cfg.train.accumulate.max(1);
        let virtual_world = world.saturating_mul(accumulate);
        // More micro-batch streams than training slices would train some streams on padding
        // alone (a sharded epoch repeats slices to fill every stream): refused, and before a
        // sampler per stream is built, so an absurd `accumulate` is not allocated.
        if virtual_world > train_idx.len() {
            return Err(Error::Argument(format!(
                "the training set has {} slices: fewer than the {world} rank(s) × {accumulate} micro-batch stream(s), which would leave streams with no slice of their own; lower train.accumulate or the rank count, or add data",
                train_idx.len(),
            )));
        }
        let with_tumour: Arc<[usize]> = if cfg.data.oversample_tumour > 0.0 {
            train_idx
                .iter()
                .copied()
                .filter(|&i| ds.has_label(i, 2))
                .collect()
        } else {
            Arc::from([])
        };
        let pool: Arc<[usize]> = train_idx.as_slice().into();
        let samplers: Vec<Sampler> = (0..accumulate)
            .map(|k| {
                Sampler::new(
                    pool.clone(),
                    cfg.train.batch_size,
                    rank * accumulate + k,
                    virtual_world,
                    cfg.seed,
                    cfg.data.sampling,
                )
                .with_oversampling(with_tumour.clone(), cfg.data.oversample_tumour)
            })
            .collect();
        let steps_per_epoch = samplers[0].steps_per_epoch() as u64;
        if steps_per_epoch == 0 {
            return Err(Error::Argument(format!(
                "the training set has {} slices: not one full batch of {} per rank on {world} rank(s) × {accumulate} micro-batch(es); lower train.batch_size or train.accumulate, or add data",
                train_idx.len(),
                cfg.train.batch_size,
            )));
        }
        // An absurd `train.epochs` saturates (train until `max_steps`) instead of wrapping.
        let mut total_steps = cfg.train.epochs.saturating_mul(steps_per_epoch);
        if cfg.train.max_steps > 0 {
            total_steps = total_steps.min(cfg.train.max_steps);
        }
        let schedule = Schedule::new(
            &cfg.schedule,
            cfg.optimizer.lr(),
            virtual_world,
            steps_per_epoch,
            total_steps,
        );
        Ok(Self {
            ds: Arc::new(ds),
            train_idx,
            val_idx,
            samplers,
            accumulate,
            steps_per_epoch,
            total_steps,
            schedule,
            global_batch: cfg.train.batch_size.saturating_mul(virtual_world),
            provenance,
        })
    }

    /// This rank's batches of `epoch` from batch `skip` on, the micro-batches of each step in
    /// stream order.
    fn epoch_batches(&self, epoch: u64, skip: u64) -> Vec<Vec<usize>> {
        let per_sampler: Vec<Vec<Vec<usize>>> = self
            .samplers
            .iter()
            .map(|s| s.epoch_batches(epoch))
            .collect();
        (skip as usize..self.steps_per_epoch as usize)
            .flat_map(|b| per_sampler.iter().filter_map(move |p| p.get(b).cloned()))
            .collect()
    }
}

/// Where the run stands.
#[derive(Clone, Copy, Debug, Default)]
struct Position {
    /// Optimiser steps completed.
    step: u64,
    /// The epoch (0-based) the next step belongs to.
    epoch: u64,
    /// Batches of that epoch already consumed.
    batch_in_epoch: u64,
    /// Training seconds of earlier segments of the run.
    wall_offset: f64,
    /// The best validation liver Dice so far.
    best_dice: Option<f64>,
    /// The step of that validation.
    best_step: u64,
}

/// The state and position of checkpoint `ck`; its position is recomputed from the images seen
/// when the rank count or the batch changed.
fn restore(
    cfg: &RunConfig,
    fresh: TrainState,
    ck: &Checkpoint,
    plan: &Plan,
    run: &RunDir,
) -> Result<(TrainState, Position, Option<String>)> {
    let source = run.checkpoint(CheckpointKind::Last);
    let mut state = fresh.load_bytes(cfg, (ck.model.clone(), ck.optimizer.clone()), &source)?;
    let m = &ck.meta;
    // The scale where the run left it; a run resumed in mixed precision from an f32 checkpoint
    // starts from the initial scale.
    if let (Some(scale), Some(saved)) = (state.loss_scale.as_mut(), m.loss_scale) {
        *scale = saved;
    }
    let mut pos = Position {
        step: m.step,
        epoch: m.epoch,
        batch_in_epoch: m.batch_in_epoch,
        wall_offset: m.wall_s,
        best_dice: m.best_dice_liver,
        best_step: m.best_step,
    };
    let world = plan.global_batch / (cfg.train.batch_size * plan.accumulate);
    let mut note = None;
    if m.world_size != world || m.global_batch != plan.global_batch {
        // Another rank count: the same number of images seen, new per-rank sampling.
        let images = m.step * m.global_batch as u64;
        let s = images / plan.global_batch as u64;
        pos.epoch = s / plan.steps_per_epoch;
        pos.batch_in_epoch = s % plan.steps_per_epoch;
        note = Some(format!(
            "resuming a checkpoint written by {} rank(s) (global batch {}) on {world} (global batch {}): learning rate rescaled to {:.4} ({:?} scaling), sampler restarted at epoch {}, batch {} ({images} images seen)",
            m.world_size,
            m.global_batch,
            plan.global_batch,
            plan.schedule.target(),
            cfg.schedule.lr_scaling,
            pos.epoch + 1,
            pos.batch_in_epoch,
        ));
    }
    Ok((state, pos, note))
}

/// What the steps of this segment of the run add up to.
#[derive(Default)]
struct Tally {
    last_loss: f64,
    last_val: Option<ValResult>,
    trained_images: u64,
    train_time: f64,
    data_wait: f64,
    step_times: Vec<f64>,
    compute_times: Vec<f64>,
    /// Seconds from the process start to the end of the first step of this segment.
    first_step_end: Option<f64>,
}

/// The loop's state between steps: everything fixed for the run, and where it stands.
struct Trainer<'a> {
    cfg: &'a RunConfig,
    opts: &'a TrainOptions,
    comm: &'a dyn Communicator,
    run: RunDir,
    plan: Plan,
    stepper: Stepper<'a>,
    exchange_desc: String,
    params: usize,
    log: MetricsLog,
    progress: Progress,
    stop: StopFlag,
    start: Instant,
    pos: Position,
    tally: Tally,
    /// A stop was agreed; the loop ends after checkpointing.
    stopped: bool,
}

impl<'a> Trainer<'a> {
    fn new(
        cfg: &'a RunConfig,
        opts: &'a TrainOptions,
        comm: &'a dyn Communicator,
        run: RunDir,
        plan: Plan,
        pos: Position,
        state: &TrainState,
    ) -> Result<Self> {
        let rank0 = comm.rank() == 0;
        let stepper = Stepper::new(cfg, &state.model, &opts.backend.device, comm);
        let params = stepper.slots().iter().map(|s| s.len).sum();
        let ad = opts.backend.device.clone().autodiff();
        let exchange_desc = exchange::describe(&cfg.distributed, stepper.slots(), &ad, comm.size());
        let log = MetricsLog::open(&run.metrics(), rank0)?;
        let progress = Progress::new(
            opts.quiet || !rank0,
            plan.total_steps,
            pos.step,
            cfg.train.log_every_s,
        );
        Ok(Self {
            cfg,
            opts,
            comm,
            run,
            plan,
            stepper,
            exchange_desc,
            params,
            log,
            progress,
            stop: StopFlag::install()?,
            start: Instant::now(),
            pos,
            tally: Tally {
                last_loss: f64::NAN,
                ..Tally::default()
            },
            stopped: false,
        })
    }

    /// Training seconds of the whole run so far.
    fn wall(&self) -> f64 {
        self.pos.wall_offset + self.start.elapsed().as_secs_f64()
    }

    fn done(&self) -> bool {
        self.stopped || self.pos.step >= self.plan.total_steps
    }

    /// The start-up lines (rank 0).
    fn banner(&self, note: Option<&str>) {
        if self.comm.rank() != 0 {
            return;
        }
        let p = &self.plan;
        self.progress.println(&format!(
            "ctseg train: {} | {} | {} trainable parameters | {} train / {} val slices ({}) | {} steps/epoch, global batch {}",
            self.opts.backend.description,
            self.comm.describe(),
            self.params,
            p.train_idx.len(),
            p.val_idx.len(),
            p.ds.origin,
            p.steps_per_epoch,
            p.global_batch,
        ));
        if let Some(note) = note {
            self.progress.println(note);
        }
        let pr = &self.opts.backend.precision;
        self.progress
            .println(&format!("precision: {} ({})", pr.precision.name(), pr.note));
        if self.comm.size() > 1 {
            self.progress
                .println(&format!("gradient exchange: {}", self.exchange_desc));
        }
        if matches!(self.opts.start, Start::Resume(_)) {
            self.progress.println(&format!(
                "resumed at step {} (epoch {}, batch {})",
                self.pos.step,
                self.pos.epoch + 1,
                self.pos.batch_in_epoch
            ));
        }
    }

    /// The rest of the current epoch (or up to the last step, or a stop), step by step.
    fn run_epoch(&mut self, mut state: TrainState) -> Result<TrainState> {
        let accumulate = self.plan.accumulate;
        let batches = self
            .plan
            .epoch_batches(self.pos.epoch, self.pos.batch_in_epoch);
        let maker = BatchMaker {
            ds: self.plan.ds.clone(),
            data: self.cfg.data.clone(),
            classes: self.cfg.model.classes,
            augment: Some((self.cfg.augment.clone(), self.cfg.seed)),
        };
        let (rank, epoch) = (self.comm.rank(), self.pos.epoch);
        let mut built = 0u64;
        let mut loader = Loader::spawn(batches, self.cfg.data.prefetch, move |idx| {
            built += 1;
            crate::faults::inject("loader", rank, built);
            maker.make(idx, epoch)
        })?;
        let mut t_prev = Instant::now();
        let mut waited_prev = loader.waited();
        while self.pos.step < self.plan.total_steps
            && self.pos.batch_in_epoch < self.plan.steps_per_epoch
        {
            // 1. This rank's micro-batches.
            let mut micro: Vec<HostBatch> = Vec::with_capacity(accumulate);
            for _ in 0..accumulate {
                match loader.next_batch()? {
                    Some(b) => micro.push(b),
                    None => {
                        return Err(Error::Invalid(format!(
                            "the data loader ran out of batches at step {} of epoch {}",
                            self.pos.step + 1,
                            self.pos.epoch + 1
                        )));
                    }
                }
            }
            // 2. The step.
            let step = self.pos.step;
            let lr = self.plan.schedule.lr(step);
            let (s, outcome) = self.stepper.step(state, &micro, step, lr)?;
            state = s;
            self.pos.step += 1;
            self.pos.batch_in_epoch += 1;
            crate::faults::inject("step", rank, self.pos.step);
            if !outcome.loss.is_finite() {
                self.progress.finish();
                return Err(self.diverged("loss", outcome.loss));
            }
            // 3. Its record.
            let dt = t_prev.elapsed().as_secs_f64();
            t_prev = Instant::now();
            let w = loader.waited();
            let wait_s = (w - waited_prev).as_secs_f64();
            waited_prev = w;
            self.record_step(&outcome, lr, dt, wait_s)?;
            // 4. A stop requested on any rank stops every rank here.
            if self.stop_agreed()? {
                self.stopped = true;
                break;
            }
        }
        Ok(state)
    }

    /// Whether any rank was asked to stop. Collective (one small allreduce per step).
    fn stop_agreed(&self) -> Result<bool> {
        let mut flag = [if self.stop.requested() { 1.0 } else { 0.0 }];
        self.comm.allreduce_sum_f64(&mut flag)?;
        Ok(flag[0] > 0.0)
    }

    fn record_step(
        &mut self,
        outcome: &super::step::StepOutcome,
        lr: f64,
        dt: f64,
        wait_s: f64,
    ) -> Result<()> {
        let t = &mut self.tally;
        t.data_wait += wait_s;
        t.trained_images += self.plan.global_batch as u64;
        t.train_time += dt;
        t.step_times.push(dt);
        t.compute_times.push(outcome.times.compute_s);
        t.last_loss = outcome.loss;
        if t.first_step_end.is_none() {
            t.first_step_end = Some(sys::process_seconds());
        }
        let ips = self.plan.global_batch as f64 / dt.max(1e-9);
        let times = outcome.times;
        let wall = self.wall();
        self.log.write(Record::Step(StepRecord {
            step: self.pos.step,
            epoch: self.pos.epoch + 1,
            wall_s: wall,
            loss: outcome.loss,
            lr,
            images_per_s: ips,
            data_wait_s: Some(wait_s),
            compute_s: Some(times.compute_s),
            copy_s: Some(times.copy_s),
            comm_s: Some(times.comm_s),
            comm_total_s: Some(times.comm_total_s),
            loss_scale: outcome.scaling.map(|(scale, _)| scale),
            skipped: matches!(outcome.scaling, Some((_, false))),
        }))?;
        if let Some((scale, false)) = outcome.scaling {
            self.progress.println(&format!(
                "step {}: gradients not finite at loss scale {scale}: optimiser step skipped, scale halved",
                self.pos.step
            ));
        }
        self.progress
            .step(self.pos.step, self.pos.epoch + 1, outcome.loss, ips);
        Ok(())
    }

    fn diverged(&self, what: &'static str, value: f64) -> Error {
        Error::Diverged {
            what,
            step: self.pos.step,
            epoch: self.pos.epoch + 1,
            value,
            run_dir: self.run.root().to_path_buf(),
        }
    }

    /// After an epoch (or the last step, or a stop): BN statistics averaged across ranks,
    /// validation, the best and the last checkpoint.
    fn end_of_epoch(&mut self, mut state: TrainState) -> Result<TrainState> {
        let epoch_done = self.pos.batch_in_epoch >= self.plan.steps_per_epoch;
        let finished = self.pos.step >= self.plan.total_steps;
        let epoch_no = self.pos.epoch + 1;
        let due = |every: u64| finished || (epoch_done && epoch_no.is_multiple_of(every));
        let do_val = !self.stopped && due(self.cfg.train.val_every);
        let do_ck = self.stopped || due(self.cfg.train.checkpoint_every);
        if epoch_done {
            self.pos.epoch += 1;
            self.pos.batch_in_epoch = 0;
        }
        if !(do_val || do_ck) {
            return Ok(state);
        }
        state.model = average_buffers(state.model, self.comm)?;
        let mut val_dice = None;
        if do_val {
            let v = validate(
                &state.model,
                &self.plan.ds,
                &self.plan.val_idx,
                self.cfg,
                &self.opts.backend.device,
                self.comm,
            )?;
            // Every rank holds the same (reduced) value, so all stop together, and before a
            // checkpoint could replace the last good one with this model.
            if !v.loss.is_finite() {
                self.progress.finish();
                return Err(self.diverged("validation loss", v.loss));
            }
            val_dice = Some(v.dice(1));
            let best = self.pos.best_dice.is_none_or(|b| v.dice(1) > b);
            if best {
                self.pos.best_dice = Some(v.dice(1));
                self.pos.best_step = self.pos.step;
            }
            self.record_validation(&v, epoch_no, best)?;
            if best {
                self.save(&state, CheckpointKind::Best, val_dice)?;
            }
            self.tally.last_val = Some(v);
        } else {
            // No validation vouches for these weights: never checkpoint non-finite ones.
            let values = flat::flatten_values(&state.model, Select::All)?;
            if let Some(bad) = values.iter().find(|v| !v.is_finite()) {
                self.progress.finish();
                return Err(self.diverged("a model weight", f64::from(*bad)));
            }
        }
        if do_ck {
            self.save(&state, CheckpointKind::Last, val_dice)?;
        }
        self.comm.barrier()?;
        Ok(state)
    }

    fn record_validation(&mut self, v: &ValResult, epoch: u64, best: bool) -> Result<()> {
        let rec = ValRecord {
            epoch,
            step: self.pos.step,
            wall_s: self.wall(),
            val_loss: v.loss,
            dice_liver: v.dice(1),
            dice_tumour: v.dice(2),
            soft_dice: v.soft_dice.clone(),
            images: v.images,
            best,
        };
        self.progress.println(&format!(
            "epoch {epoch} step {}: val loss {:.4}  Dice liver {:.4}  tumour {:.4}{}",
            self.pos.step,
            v.loss,
            rec.dice_liver,
            rec.dice_tumour,
            if best { "  (best so far)" } else { "" }
        ));
        self.log.write(Record::Val(rec))
    }

    /// Rank 0 writes the `kind` checkpoint of `state` at the current position.
    fn save(&self, state: &TrainState, kind: CheckpointKind, val_dice: Option<f64>) -> Result<()> {
        if self.comm.rank() != 0 {
            return Ok(());
        }
        let (model, optimizer) = state.to_bytes()?;
        let ck = Checkpoint {
            meta: CheckpointMeta {
                step: self.pos.step,
                epoch: self.pos.epoch,
                batch_in_epoch: self.pos.batch_in_epoch,
                world_size: self.comm.size(),
                global_batch: self.plan.global_batch,
                wall_s: self.wall(),
                config_toml: self.cfg.to_toml()?,
                ctseg_version: env!("CARGO_PKG_VERSION").into(),
                provenance: self.plan.provenance.clone(),
                val_dice_liver: val_dice,
                best_dice_liver: self.pos.best_dice,
                best_step: self.pos.best_step,
                loss_scale: state.loss_scale,
            },
            model,
            optimizer,
        };
        ck.save(&self.run.checkpoint(kind))
    }

    /// Checks that every rank ends with the same model, and builds and writes the summary.
    fn finish(&self, state: &TrainState) -> Result<Summary> {
        let world = self.comm.size();
        let hash = flat::hash_f32(&flat::flatten_values(&state.model, Select::All)?);
        if world > 1 {
            same_model_everywhere(hash, self.comm)?;
        }
        let val = self.tally.last_val.as_ref();
        // Every rank's peak memory, gathered by an allreduce of one slot per rank.
        let mut rss = vec![0.0f64; world];
        rss[self.comm.rank()] = sys::peak_rss_mb();
        self.comm.allreduce_sum_f64(&mut rss)?;
        let t = &self.tally;
        let median_step_s = stats::warm_median(t.step_times.iter().copied()).unwrap_or(f64::NAN);
        let p = &self.plan;
        let summary = Summary {
            steps: self.pos.step,
            epochs: self.pos.step as f64 / p.steps_per_epoch as f64,
            world_size: world as u64,
            global_batch: p.global_batch as u64,
            wall_s: self.wall(),
            // Everything before the first step, and what the first step took beyond a normal one
            // (kernel compilation, autotuning, allocator warm-up).
            startup_s: t.first_step_end.map_or(f64::NAN, |e| e - median_step_s),
            images_per_s: if t.train_time > 0.0 {
                t.trained_images as f64 / t.train_time
            } else {
                0.0
            },
            final_loss: t.last_loss,
            val_loss: val.map_or(f64::NAN, |v| v.loss),
            dice_liver: val.map_or(f64::NAN, |v| v.dice(1)),
            dice_tumour: val.map_or(f64::NAN, |v| v.dice(2)),
            best_dice_liver: self.pos.best_dice.unwrap_or(f64::NAN),
            best_step: self.pos.best_step,
            params: self.params as u64,
            train_slices: p.train_idx.len() as u64,
            val_slices: p.val_idx.len() as u64,
            device: self.opts.backend.description.clone(),
            data: p.ds.origin.clone(),
            data_wait_s: t.data_wait,
            weights_hash: format!("{hash:016x}"),
            grad_exchange: self.exchange_desc.clone(),
            steps_per_epoch: p.steps_per_epoch,
            median_step_s,
            epoch_time_s: median_step_s * p.steps_per_epoch as f64,
            median_compute_s: stats::warm_median(t.compute_times.iter().copied())
                .unwrap_or(f64::NAN),
            peak_rss_mb: rss.iter().copied().fold(0.0, f64::max),
            backend: self.opts.backend.kind.name().into(),
            precision: self.opts.backend.precision.precision.name().into(),
            precision_note: self.opts.backend.precision.note.clone(),
            loss_scale: state.loss_scale.map(|s| s.scale),
            skipped_steps: state.loss_scale.map_or(0, |s| s.skipped),
            gpu_conv: self.opts.backend.conv_choice.clone(),
            accumulate: p.accumulate as u64,
            batch_size: self.cfg.train.batch_size as u64,
            label: self.opts.label.clone(),
        };
        if self.comm.rank() == 0 {
            summary.write(&self.run.summary())?;
        }
        Ok(summary)
    }
}

/// Averages BN running statistics across ranks (before validation and checkpoints), so that
/// the evaluated and saved model is one consistent model. Collective.
fn average_buffers(
    model: crate::model::UNet,
    comm: &dyn Communicator,
) -> Result<crate::model::UNet> {
    if comm.size() == 1 {
        return Ok(model);
    }
    let mut buf = flat::flatten_values(&model, Select::Buffers)?;
    comm.allreduce_sum_f32(&mut buf)?;
    let inv = 1.0 / comm.size() as f32;
    buf.iter_mut().for_each(|v| *v *= inv);
    flat::assign_values(model, Select::Buffers, &buf)
}

/// Checks that every rank ended with the weights hash `hash`, and says so on stderr. Collective.
fn same_model_everywhere(hash: u64, comm: &dyn Communicator) -> Result<()> {
    let world = comm.size();
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
    // One write of the whole line: stderr is unbuffered and `eprintln!` writes each formatted
    // piece separately, so ranks' lines could interleave mid-line. A single write of under
    // 4 KiB to a pipe is atomic.
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
    Ok(())
}
