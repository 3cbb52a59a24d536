//! One data-parallel training step, written once and used by both the trainer and `bench step`
//! (so the benchmark times the step that trains): forward and loss of each micro-batch,
//! backward, the micro-batches' gradients averaged, gradients averaged across ranks, in mixed
//! precision the loss scaling's unscale and overflow check, the optimiser step, and only then
//! the loss read to the host (on a GPU, reading it earlier would stall the device before the
//! backward is even queued).

use std::time::Instant;

use burn::optim::GradientsParams;
use burn::tensor::{Device, Tensor, TensorData};

use super::exchange;
use super::flat::{self, Select, Slot};
use super::state::TrainState;
use crate::comm::Communicator;
use crate::config::RunConfig;
use crate::data::HostBatch;
use crate::error::{Error, Result};
use crate::model::{Mode, UNet};
use crate::tensor_util::data_to_f32;

/// Host batch → `(inputs, targets)` tensors on `device`.
pub fn batch_tensors(batch: &HostBatch, device: &Device) -> (Tensor<4>, Tensor<4>) {
    let s = batch.size;
    let x = Tensor::from_data(
        TensorData::new(batch.inputs.clone(), [batch.len, batch.channels, s, s]),
        device,
    );
    let y = Tensor::from_data(
        TensorData::new(batch.targets.clone(), [batch.len, batch.classes, s, s]),
        device,
    );
    (x, y)
}

/// Seconds spent in the parts of one step (device synchronised between them).
#[derive(Clone, Copy, Debug, Default)]
pub struct StepTimes {
    /// Forward, loss and backward of all micro-batches, and their gradients' mean.
    pub compute_s: f64,
    /// The part of `compute_s` the host spent issuing that work, before it waited for the
    /// device (on a GPU: near `compute_s` means the step is bound by the host's launches).
    pub issue_s: f64,
    /// Copying the fused gradient buffer off the device (0 on one rank).
    pub copy_s: f64,
    /// Gradient communication the step waited for (0 on one rank).
    pub comm_s: f64,
    /// The allreduces in total, overlapped or not (0 on one rank).
    pub comm_total_s: f64,
    /// The optimiser step and the loss read.
    pub apply_s: f64,
}

/// What one step gives back.
#[derive(Clone, Copy, Debug)]
pub struct StepOutcome {
    /// The loss of the step's images: the mean over micro-batches and ranks.
    pub loss: f64,
    /// Where the time went.
    pub times: StepTimes,
    /// In mixed precision, the loss scale the step's backward used, and whether its gradients
    /// were finite on every rank (else the optimiser step was skipped); `None` in f32.
    pub scaling: Option<(f64, bool)>,
}

/// The parts of a step, in the order they run, as a profile ([`StepProbe`]) sees them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Forward pass and loss of a micro-batch.
    Forward,
    /// Backward pass of a micro-batch.
    Backward,
    /// The micro-batches' gradients averaged (nothing with one micro-batch).
    MicroMean,
    /// Gradients averaged across ranks (nothing on one rank).
    Exchange,
    /// The optimiser step.
    Optimiser,
    /// The losses read to the host.
    LossRead,
}

impl Phase {
    /// The name used in tables and JSON.
    pub fn name(self) -> &'static str {
        match self {
            Phase::Forward => "forward",
            Phase::Backward => "backward",
            Phase::MicroMean => "micro_mean",
            Phase::Exchange => "exchange",
            Phase::Optimiser => "optimiser",
            Phase::LossRead => "loss_read",
        }
    }
}

/// Watches a step phase by phase (`bench step --profile`). With a probe the stepper waits for
/// the device at every phase boundary, so each phase's kernels run inside it: a profiled step is
/// slower than a plain one, and only its split is the measurement.
pub trait StepProbe {
    /// The host has issued the current phase's work and is about to wait for the device.
    fn issued(&self);
    /// The device has finished everything issued so far; `next` begins (`None`: the step is
    /// over).
    fn enter(&self, next: Option<Phase>);
}

/// What a step needs that does not change from step to step.
pub struct Stepper<'a> {
    cfg: &'a RunConfig,
    comm: &'a dyn Communicator,
    /// The compute device without autodiff (for synchronisation).
    device: Device,
    /// The same device with autodiff (where the model lives).
    ad: Device,
    slots: Vec<Slot>,
    probe: Option<&'a dyn StepProbe>,
}

impl<'a> Stepper<'a> {
    /// A stepper for `model`'s parameters on `device` (without autodiff).
    pub fn new(
        cfg: &'a RunConfig,
        model: &UNet,
        device: &Device,
        comm: &'a dyn Communicator,
    ) -> Self {
        Self {
            cfg,
            comm,
            device: device.clone(),
            ad: device.clone().autodiff(),
            slots: flat::layout(model, Select::Trainable),
            probe: None,
        }
    }

    /// This stepper, reporting its phases to `probe`.
    pub fn with_probe(mut self, probe: &'a dyn StepProbe) -> Self {
        self.probe = Some(probe);
        self
    }

    /// A phase boundary: with a probe, the device finishes the previous phase first.
    fn mark(&self, next: Option<Phase>, step: u64) -> Result<()> {
        if let Some(p) = self.probe {
            p.issued();
            self.sync(step + 1)?;
            p.enter(next);
        }
        Ok(())
    }

    /// The trainable parameter tensors, in visit order.
    pub fn slots(&self) -> &[Slot] {
        &self.slots
    }

    fn sync(&self, step: u64) -> Result<()> {
        self.device
            .sync()
            .map_err(|e| Error::Device(format!("device error during step {step}: {e:?}")))
    }

    /// Optimiser step number `step` (0-based) at learning rate `lr` on `micro`, this rank's
    /// micro-batches (`train.accumulate` of them). Collective: every rank calls it with the
    /// same `step`.
    pub fn step(
        &self,
        mut state: TrainState,
        micro: &[HostBatch],
        step: u64,
        lr: f64,
    ) -> Result<(TrainState, StepOutcome)> {
        let mut times = StepTimes::default();
        // 1. Forward, loss and backward per micro-batch; their mean gradient.
        let t = Instant::now();
        let accumulate = micro.len();
        let mut losses = Vec::with_capacity(accumulate);
        let mut grads = Vec::with_capacity(accumulate);
        for (k, batch) in micro.iter().enumerate() {
            self.mark(Some(Phase::Forward), step)?;
            let (x, y) = batch_tensors(batch, &self.ad);
            let mode = Mode::Train {
                seed: self.cfg.seed,
                step,
                stream: (self.comm.rank() * accumulate + k) as u64,
            };
            let t = &self.cfg.train;
            let loss = t.loss.loss(state.model.logits(x, mode), y, t.loss_smooth);
            self.mark(Some(Phase::Backward), step)?;
            let scaled = match &state.loss_scale {
                Some(s) => loss.clone().mul_scalar(s.scale),
                None => loss.clone(),
            };
            grads.push(GradientsParams::from_grads(scaled.backward(), &state.model));
            losses.push(loss);
        }
        self.mark(Some(Phase::MicroMean), step)?;
        let grads = self.mean_of_micro_batches(&state.model, grads)?;
        times.issue_s = t.elapsed().as_secs_f64();
        self.sync(step + 1)?;
        times.compute_s = t.elapsed().as_secs_f64();

        // 2. Gradients averaged across ranks.
        self.mark(Some(Phase::Exchange), step)?;
        let (grads, ex) = exchange::average(
            &state.model,
            grads,
            &self.slots,
            &self.ad,
            self.comm,
            &self.cfg.distributed,
        )?;
        (times.copy_s, times.comm_s, times.comm_total_s) = (ex.copy_s, ex.comm_s, ex.comm_total_s);

        // 3. Mixed precision: gradients unscaled, and the step skipped if any rank's were not
        // finite. Then the optimiser step and the loss read (which waits for the device).
        let t = Instant::now();
        self.mark(Some(Phase::Optimiser), step)?;
        let mut scaling = None;
        let grads = match state.loss_scale.as_mut() {
            None => Some(grads),
            Some(ls) => {
                let used = ls.scale;
                let (grads, finite) = self.unscale(&state.model, grads, used, step)?;
                let apply = ls.update(finite);
                scaling = Some((used, finite));
                apply.then_some(grads)
            }
        };
        if let Some(grads) = grads {
            state.model = state.optim.step(lr, state.model, grads);
        }
        self.mark(Some(Phase::LossRead), step)?;
        let mut local = 0.0;
        for loss in losses {
            local += data_to_f32(crate::tensor_util::read(loss)?)?
                .first()
                .copied()
                .map_or(f64::NAN, f64::from);
        }
        self.sync(step + 1)?;
        times.apply_s = t.elapsed().as_secs_f64();
        self.mark(None, step)?;

        // 4. The step's loss: the mean over this rank's micro-batches, then over ranks.
        let mut sum = [local / accumulate.max(1) as f64];
        self.comm.allreduce_sum_f64(&mut sum)?;
        let outcome = StepOutcome {
            loss: sum[0] / self.comm.size() as f64,
            times,
            scaling,
        };
        Ok((state, outcome))
    }

    /// Gradients of a loss multiplied by `scale`, divided by it on the device, and whether
    /// every value on every rank is finite (one value read to the host, one allreduce, as
    /// GradScaler's `found_inf` is shared by all ranks). Collective.
    fn unscale(
        &self,
        model: &UNet,
        grads: GradientsParams,
        scale: f64,
        step: u64,
    ) -> Result<(GradientsParams, bool)> {
        let (parts, finite) = crate::finite::unscale(flat::grad_parts(model, &grads)?, scale)?;
        // The tests' overflow fault: this rank's gradients of step `step + 1` count as not
        // finite (the test-hooks feature only).
        let injected = crate::faults::fires("overflow", self.comm.rank(), step + 1);
        let mut bad = [if finite && !injected { 0.0 } else { 1.0 }];
        self.comm.allreduce_sum_f64(&mut bad)?;
        Ok((flat::grads_from_parts(parts, &self.slots)?, bad[0] == 0.0))
    }

    /// The mean of the micro-batches' gradients (summed on the host in micro-batch order, then
    /// scaled by 1/K: for K = 2 exactly the bits a 2-rank allreduce average gives). One
    /// micro-batch passes through untouched.
    fn mean_of_micro_batches(
        &self,
        model: &UNet,
        mut micro: Vec<GradientsParams>,
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
        flat::unflatten_grads(&sum, &self.slots, &self.ad)
    }
}
