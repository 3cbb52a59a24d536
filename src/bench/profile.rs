//! `ctseg bench step --profile`: where a training step's time goes, phase by phase (forward,
//! backward, gradient exchange, optimiser, loss read) and, on the GPU, kernel by kernel. Each
//! phase's wall time is taken with the device synchronised at its boundaries, beside the host's
//! time to issue it; every kernel launch is counted and timed through cubecl's launch observer
//! (device timestamp queries where the adapter has them, host time around a blocking submit
//! where it does not, and the report says which). The step profiled is the trainer's own
//! ([`Stepper`]), so the profile and the timed step cannot drift apart.
//!
//! The observer sees every launch in the process, whichever thread issues it (in a test binary
//! a step's kernels were issued from another thread than the step's): profile with nothing else
//! running on the device, as `ctseg bench step --profile` does.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use burn_cubecl::cubecl::config::{TypeNameFormatLevel, type_name_format};
use burn_cubecl::cubecl::logging::{
    LaunchObservation, LaunchObserver, ProfileDuration, TimingMethod, TimingRequest,
};
use serde::Serialize;

use super::fixture;
use crate::backend::Backend;
use crate::comm::Communicator;
use crate::config::RunConfig;
use crate::error::Result;
use crate::train::{Phase, StepProbe, Stepper};

/// One phase of the profiled step, per step (means over the profiled steps).
#[derive(Clone, Debug, Serialize)]
pub struct PhaseRow {
    /// [`Phase::name`].
    pub phase: String,
    /// Seconds from the phase's start until the device finished its work.
    pub wall_s: f64,
    /// Seconds the host took to issue the phase's work (before waiting for the device).
    pub issue_s: f64,
    /// Kernel launches.
    pub launches: f64,
    /// Sum of the kernels' timed durations, s.
    pub kernel_s: f64,
}

/// One kernel in one phase, per step.
#[derive(Clone, Debug, Serialize)]
pub struct KernelRow {
    /// [`Phase::name`].
    pub phase: String,
    /// The kernel as cubecl names it (generics shortened).
    pub kernel: String,
    /// Launches per step.
    pub launches: f64,
    /// Timed seconds per step.
    pub total_s: f64,
    /// Mean seconds per launch.
    pub mean_s: f64,
}

/// The profile (one JSON line with `--json`).
#[derive(Clone, Debug, Serialize)]
pub struct StepProfile {
    /// `"profile"`.
    pub bench: String,
    /// Device description.
    pub device: String,
    /// Model width.
    pub width: usize,
    /// Input size.
    pub size: usize,
    /// Batch.
    pub batch: usize,
    /// Profiled steps (after one unprofiled warm-up step).
    pub steps: usize,
    /// Median wall time of a profiled step, s (slower than a plain step: the device is waited
    /// for at every phase boundary and, on the GPU, every kernel is bracketed by timestamps).
    pub profiled_step_s: f64,
    /// Kernel launches per step, all phases.
    pub launches_per_step: f64,
    /// Launches whose duration came from device timestamps.
    pub timed_on_device: usize,
    /// Launches whose duration is host time around a blocking submit (no timestamp queries).
    pub timed_on_host: usize,
    /// Launches without a duration (the measurement was refused or unreadable).
    pub untimed: usize,
    /// Phases in step order.
    pub phases: Vec<PhaseRow>,
    /// Kernels, by phase and then by time, largest first.
    pub kernels: Vec<KernelRow>,
}

/// A launch and, once read, its duration.
enum Timing {
    Waiting,
    Unread(ProfileDuration),
    Read(Option<f64>, TimingMethod),
}

struct Launch {
    phase: Phase,
    kernel: &'static str,
    timing: Timing,
}

/// What the observer and the probe record while a profiled step runs.
#[derive(Default)]
struct Record {
    /// The phase running now (`None` between steps).
    current: Option<Phase>,
    started: Option<Instant>,
    issued: Option<Instant>,
    /// (phase, wall s, issue s), one entry per phase run.
    spans: Vec<(Phase, f64, f64)>,
    launches: Vec<Launch>,
}

/// The launch observer and step probe in one.
#[derive(Default)]
struct Profiler {
    rec: Mutex<Record>,
}

impl Profiler {
    fn lock(&self) -> MutexGuard<'_, Record> {
        // A poisoned record only means a panic elsewhere; its figures are still the best there are.
        self.rec.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The launch `kernel` just issued that has no timing yet (timings arrive right after
    /// their launch, on the same thread).
    fn attach(&self, kernel: &'static str, timing: Timing) {
        let mut r = self.lock();
        if let Some(l) = r
            .launches
            .iter_mut()
            .rev()
            .find(|l| l.kernel == kernel && matches!(l.timing, Timing::Waiting))
        {
            l.timing = timing;
        }
    }
}

impl LaunchObserver for Profiler {
    fn launched(&self, kernel: &'static str) {
        let mut r = self.lock();
        if let Some(phase) = r.current {
            r.launches.push(Launch {
                phase,
                kernel,
                timing: Timing::Waiting,
            });
        }
    }

    fn timing(&self) -> TimingRequest {
        // Unread until the step is over, so the kernels still run back to back.
        TimingRequest::Deferred
    }

    fn profiled(&self, kernel: &'static str, profile: ProfileDuration) {
        self.attach(kernel, Timing::Unread(profile));
    }

    fn timed(
        &self,
        kernel: &'static str,
        duration: burn_cubecl::cubecl::logging::Duration,
        method: TimingMethod,
    ) {
        self.attach(kernel, Timing::Read(Some(duration.as_secs_f64()), method));
    }
}

impl StepProbe for Profiler {
    fn issued(&self) {
        self.lock().issued = Some(Instant::now());
    }

    fn enter(&self, next: Option<Phase>) {
        let now = Instant::now();
        let mut r = self.lock();
        if let (Some(phase), Some(start)) = (r.current, r.started) {
            let issued = r.issued.unwrap_or(now).max(start);
            let span = (
                phase,
                (now - start).as_secs_f64(),
                (issued - start).as_secs_f64(),
            );
            r.spans.push(span);
        }
        r.current = next;
        r.started = Some(now);
        r.issued = None;
    }
}

/// Profiles `steps` training steps of `cfg`'s model on the fixed phantom batch of
/// [`super::bench_step`], after one unprofiled warm-up step. Collective under MPI.
pub fn profile_step(
    cfg: &RunConfig,
    be: &Backend,
    steps: usize,
    comm: &dyn Communicator,
) -> Result<StepProfile> {
    // 1. The benchmark's batch and a fresh model; one warm-up step without the profiler.
    let (micro, mut state) = fixture(cfg, be);
    let lr = cfg.optimizer.lr();
    let plain = Stepper::new(cfg, &state.model, &be.device, comm);
    state = plain.step(state, &micro, 0, lr)?.0;

    // 2. The profiled steps: the observer sees every launch, the probe every phase boundary.
    let profiler = Arc::new(Profiler::default());
    let stepper = Stepper::new(cfg, &state.model, &be.device, comm).with_probe(profiler.as_ref());
    let mut walls = Vec::with_capacity(steps);
    {
        let _watching = LaunchObservation::new(profiler.clone());
        for step in 1..=steps.max(1) {
            comm.barrier()?;
            let t = Instant::now();
            state = stepper.step(state, &micro, step as u64, lr)?.0;
            walls.push(t.elapsed().as_secs_f64());
        }
    }

    // 3. The measurements read back (the device has finished: the last phase waited for it).
    let mut rec = std::mem::take(&mut *profiler.lock());
    for l in &mut rec.launches {
        if let Timing::Unread(p) = std::mem::replace(&mut l.timing, Timing::Waiting) {
            let method = p.timing_method();
            let secs = pollster::block_on(p.resolve()).map(|t| t.duration().as_secs_f64());
            l.timing = Timing::Read(secs, method);
        }
    }
    Ok(tabulate(cfg, be, &rec, &walls))
}

/// The figures of a profile, per step (means over the profiled steps).
fn tabulate(cfg: &RunConfig, be: &Backend, rec: &Record, walls: &[f64]) -> StepProfile {
    let n = walls.len().max(1) as f64;
    // 1. Phases: wall and issue time from the probe, launches and kernel time from the observer.
    let mut phases: BTreeMap<Phase, PhaseRow> = BTreeMap::new();
    let row = |p: Phase| PhaseRow {
        phase: p.name().into(),
        wall_s: 0.0,
        issue_s: 0.0,
        launches: 0.0,
        kernel_s: 0.0,
    };
    for &(p, wall, issue) in &rec.spans {
        let r = phases.entry(p).or_insert_with(|| row(p));
        r.wall_s += wall / n;
        r.issue_s += issue / n;
    }
    // 2. Kernels, and how each was timed.
    let mut kernels: BTreeMap<(Phase, String), (f64, f64)> = BTreeMap::new();
    let (mut device, mut host, mut untimed) = (0, 0, 0);
    for l in &rec.launches {
        let secs = match l.timing {
            Timing::Read(Some(s), TimingMethod::Device) => {
                device += 1;
                s
            }
            Timing::Read(Some(s), TimingMethod::System) => {
                host += 1;
                s
            }
            _ => {
                untimed += 1;
                0.0
            }
        };
        let name = type_name_format(l.kernel, TypeNameFormatLevel::Balanced);
        let k = kernels.entry((l.phase, name)).or_insert((0.0, 0.0));
        k.0 += 1.0;
        k.1 += secs;
        let r = phases.entry(l.phase).or_insert_with(|| row(l.phase));
        r.launches += 1.0 / n;
        r.kernel_s += secs / n;
    }
    // In step order (the map's), then by time, largest first.
    let mut kernels: Vec<(Phase, String, f64, f64)> = kernels
        .into_iter()
        .map(|((p, kernel), (count, total))| (p, kernel, count, total))
        .collect();
    kernels.sort_by(|a, b| a.0.cmp(&b.0).then(b.3.total_cmp(&a.3)));
    let kernels: Vec<KernelRow> = kernels
        .into_iter()
        .map(|(p, kernel, count, total)| KernelRow {
            phase: p.name().into(),
            kernel,
            launches: count / n,
            total_s: total / n,
            mean_s: total / count.max(1.0),
        })
        .collect();
    // 3. The profile.
    StepProfile {
        bench: "profile".into(),
        device: be.description.clone(),
        width: cfg.model.width,
        size: cfg.model.input_size,
        batch: cfg.train.batch_size,
        steps: walls.len(),
        profiled_step_s: crate::util::stats::spread(walls).median,
        launches_per_step: rec.launches.len() as f64 / n,
        timed_on_device: device,
        timed_on_host: host,
        untimed,
        phases: phases.into_values().collect(),
        kernels,
    }
}

impl StepProfile {
    /// A table for a terminal: the phases, then each phase's `top` kernels by time.
    pub fn render(&self, top: usize) -> String {
        let ms = |s: f64| s * 1e3;
        let launches = if self.launches_per_step > 0.0 {
            format!(
                "{:.0} kernel launches per step ({} timed by device timestamps, {} by host time, {} untimed)",
                self.launches_per_step, self.timed_on_device, self.timed_on_host, self.untimed
            )
        } else {
            // The CPU backend computes in the host's threads: there are no kernels to count.
            "no GPU kernel launches".to_string()
        };
        let mut out = format!(
            "profile ({}): width {} size {} batch {} | {} profiled steps, median {:.3} s each | {launches}\n",
            self.device, self.width, self.size, self.batch, self.steps, self.profiled_step_s,
        );
        out += &format!(
            "  {:<11} {:>10} {:>10} {:>9} {:>10} {:>10}\n",
            "phase", "wall ms", "issue ms", "launches", "kernel ms", "other ms"
        );
        let mut total = [0.0; 4];
        for p in &self.phases {
            out += &format!(
                "  {:<11} {:>10.2} {:>10.2} {:>9.0} {:>10.2} {:>10.2}\n",
                p.phase,
                ms(p.wall_s),
                ms(p.issue_s),
                p.launches,
                ms(p.kernel_s),
                ms(p.wall_s - p.kernel_s)
            );
            for (t, v) in total
                .iter_mut()
                .zip([p.wall_s, p.issue_s, p.launches, p.kernel_s])
            {
                *t += v;
            }
        }
        out += &format!(
            "  {:<11} {:>10.2} {:>10.2} {:>9.0} {:>10.2} {:>10.2}\n",
            "step",
            ms(total[0]),
            ms(total[1]),
            total[2],
            ms(total[3]),
            ms(total[0] - total[3])
        );
        for p in &self.phases {
            let rows: Vec<&KernelRow> = self
                .kernels
                .iter()
                .filter(|k| k.phase == p.phase)
                .take(top)
                .collect();
            if rows.is_empty() {
                continue;
            }
            out += &format!(
                "  {} kernels (top {} of {} by time): launches/step, ms/step, µs/launch\n",
                p.phase,
                rows.len(),
                self.kernels.iter().filter(|k| k.phase == p.phase).count()
            );
            for k in rows {
                // Generic matmul kernels have names of several hundred characters; the JSON
                // keeps them whole.
                let name: String = match k.kernel.char_indices().nth(100) {
                    Some((cut, _)) => format!("{}…", &k.kernel[..cut]),
                    None => k.kernel.clone(),
                };
                out += &format!(
                    "    {:>6.0} {:>9.3} {:>9.1}  {name}\n",
                    k.launches,
                    ms(k.total_s),
                    k.mean_s * 1e6,
                );
            }
        }
        out
    }
}
