//! `--gpu-conv auto`: which 3×3 convolution kernels a run gets on a GPU, chosen at start-up by
//! timing the model's own layers, at the run's batch, on burn's kernels and on ctseg's.
//!
//! Which is faster depends on the adapter (on lavapipe burn's, docs/gpu-notes.md), so the
//! choice is measured where the run is, not assumed. It applies only where both paths can run
//! f32: in mixed precision every convolution is ctseg's anyway, and a `spirv` build cannot
//! load ctseg's WGSL kernels. What was timed is kept for later runs ([`super::conv_cache`]).

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::backend::{Backend, BackendKind};
use crate::comm::Communicator;
use crate::error::{Error, Result};
use crate::model::{GpuConv, UNetConfig, arch};
use crate::wgsl::{self, Compiler};

use super::conv_cache::{self, Kept};
use super::kernels::{ConvTimer, KernelCase};

/// Timed repetitions per layer and path (the median is kept, after one untimed).
const REPS: usize = 3;

/// How much faster ctseg's kernels must be to be chosen: burn's are the longer-tested path,
/// and a model on which the two are this close would otherwise switch paths between runs that
/// time anew (`predict` after `train`, any run after a rebuild) on the timing's noise.
pub const MARGIN: f64 = 0.9;

/// The most values one timed layer's input or output may hold (2 GiB in f32): the timing keeps
/// a layer's input, output and their gradients on the device and two such arrays on the host,
/// and `predict --batch-size` may be far larger than any volume it meets. livermask's widest
/// layer at width 64 fits 48 images (a training batch of 30 is timed whole).
pub const MAX_TIMED_VALUES: usize = 1 << 29;

/// What a run does with its convolutions: forward only (inference) or forward and both
/// gradients (training), on `batch` images.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvWorkload {
    /// Images per pass.
    pub batch: usize,
    /// Forward and gradients (`true`) or the forward alone.
    pub train: bool,
}

/// Where timings are kept across runs ([`super::conv_cache`]), and whether this run may decide
/// on one (`--gpu-conv auto`) or times anew and replaces it (`--gpu-conv retime`).
#[derive(Clone, Copy, Debug)]
pub struct KeptTimings<'a> {
    /// The directory.
    pub dir: &'a Path,
    /// Whether a kept timing is used.
    pub reuse: bool,
}

/// The measurement behind a choice.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ConvChoice {
    /// The path chosen ([`decide`]).
    pub chosen: GpuConv,
    /// Seconds of all the model's 3×3 convolutions on burn's kernels: each distinct layer's
    /// median times how often the model runs it, summed; under MPI the mean over the ranks.
    pub burn_s: f64,
    /// The same on ctseg's WGSL kernels (over the layers timed before they failed, where they
    /// failed while timed: see `fallback`).
    pub wgsl_s: f64,
    /// Distinct layer shapes timed.
    pub layers: usize,
    /// Ranks whose times were averaged (1 without MPI).
    pub ranks: usize,
    /// Images per timed pass: the run's batch, or fewer where its layers would exceed
    /// [`MAX_TIMED_VALUES`] ([`timed_batch`]).
    pub batch: usize,
    /// Why ctseg's kernels run nowhere although they may have been timed faster: they failed
    /// while timed or in the start-up check, on this rank or another ([`ConvChoice::fall_back`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fallback: Option<String>,
    /// Whether this rank's timing was read from an earlier run's or kept for later ones
    /// ([`super::conv_cache`]); `None` where nothing was kept (no cache directory given).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kept: Option<Kept>,
}

/// What one rank measured: the model's convolutions in seconds on each path (each distinct
/// layer's median times how often the model runs it, summed), and why ctseg's kernels failed
/// if they did (`wgsl_s` then covers the layers timed before).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Timing {
    /// On burn's kernels.
    pub burn_s: f64,
    /// On ctseg's WGSL kernels.
    pub wgsl_s: f64,
    /// Why ctseg's kernels cannot be used here: how they failed while timed, in one line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure: Option<String>,
}

impl ConvChoice {
    /// One line for the log and the backend's description.
    pub fn describe(&self) -> String {
        let over = if self.ranks > 1 {
            format!(", mean of {} ranks", self.ranks)
        } else {
            String::new()
        };
        let kept = match &self.kept {
            Some(k) => format!("; {}", k.describe()),
            None => String::new(),
        };
        let fallback = match &self.fallback {
            Some(why) => format!("; burn's, as {why}"),
            None => String::new(),
        };
        format!(
            "chosen by --gpu-conv auto: the model's convolutions took {:.4} s on burn's kernels and {:.4} s on ctseg's ({} layer shapes, batch {}{over}{kept}){fallback}",
            self.burn_s, self.wgsl_s, self.layers, self.batch
        )
    }

    /// The choice moved to burn's kernels because ctseg's failed (`why`).
    pub fn fall_back(self, why: String) -> Self {
        Self {
            chosen: GpuConv::Burn,
            fallback: Some(why),
            ..self
        }
    }
}

/// The path for totals of `burn_s` and `wgsl_s`: ctseg's where they take under [`MARGIN`] of
/// burn's time, else burn's.
pub fn decide(burn_s: f64, wgsl_s: f64) -> GpuConv {
    if wgsl_s < MARGIN * burn_s {
        GpuConv::Wgsl
    } else {
        GpuConv::Burn
    }
}

/// The batch to time `cases` at (each case's shape holding one image): `batch`, or the largest
/// smaller one (at least 1) at which no layer's input or output exceeds [`MAX_TIMED_VALUES`].
pub fn timed_batch(cases: &[(KernelCase, usize)], batch: usize) -> usize {
    let per_image = cases
        .iter()
        .map(|(c, _)| {
            let [_, c_in, h, w] = c.shape;
            c_in.max(c.c_out).saturating_mul(h).saturating_mul(w)
        })
        .max()
        .unwrap_or(1)
        .max(1);
    batch.min(MAX_TIMED_VALUES / per_image).max(1)
}

/// Whether `be` offers the choice: a GPU computing its convolutions in f32 with kernels
/// compiled from WGSL.
pub fn applies(be: &Backend) -> bool {
    be.kind == BackendKind::Gpu
        && !be.caps.f16_operands
        && wgsl::compiler(&be.device) == Compiler::Wgsl
}

/// The model's distinct 3×3 convolution layers at `batch`, each with how often it occurs.
pub fn layers(model: &UNetConfig, in_channels: usize, batch: usize) -> Vec<(KernelCase, usize)> {
    let stages = arch::stages(model, in_channels);
    let mut out: Vec<(KernelCase, usize)> = Vec::new();
    for b in arch::blocks(&stages) {
        let case = KernelCase::new([batch, b.c_in, b.side, b.side], b.c_out);
        match out.iter_mut().find(|(c, _)| *c == case) {
            Some((_, n)) => *n += 1,
            None => out.push((case, 1)),
        }
    }
    out
}

/// Times every layer of `model` on both paths and picks one for the whole model ([`decide`]).
/// Collective on a GPU: the ranks first agree that the choice applies on all of them (a
/// `spirv` build on adapters of two graphics APIs could differ), then average their times, so
/// that every rank runs the same kernels. `None` where the choice does not apply ([`applies`]):
/// the backend keeps the path it has.
///
/// With `kept` timings, one kept by an earlier run on the same adapter, build and workload is
/// used instead of timing again, where every rank has one and `kept.reuse` allows; a new
/// timing is kept there.
pub fn choose(
    be: &Backend,
    model: &UNetConfig,
    in_channels: usize,
    work: ConvWorkload,
    comm: &dyn Communicator,
    kept: Option<KeptTimings>,
) -> Result<Option<ConvChoice>> {
    if be.kind != BackendKind::Gpu {
        return Ok(None);
    }
    // 1. Whether every rank can run both paths.
    let ranks = comm.size();
    match ranks_where(comm, applies(be))? {
        0 => return Ok(None),
        n if n < ranks => {
            return Err(Error::Device(format!(
                "--gpu-conv auto: {n} of {ranks} ranks can run both convolution paths and the others cannot ({}); give --gpu-conv burn",
                be.description
            )));
        }
        _ => {}
    }
    // 2. The model's distinct layers at the batch that is timed.
    let batch = timed_batch(&layers(model, in_channels, 1), work.batch);
    let cases = layers(model, in_channels, batch);
    // 3. This rank's timing: an earlier run's where every rank kept one, else timed now.
    let key = match (kept, &be.adapter) {
        (Some(kept), Some(adapter)) => {
            conv_cache::Key::new(adapter, work.train, &cases).map(|k| (kept, k))
        }
        _ => None,
    };
    let earlier = key
        .as_ref()
        .filter(|(kept, _)| kept.reuse)
        .and_then(|(kept, k)| conv_cache::read(kept.dir, k));
    let kept_on = ranks_where(comm, earlier.is_some())?;
    let (timing, kept) = match earlier {
        Some((timing, file)) if kept_on == ranks => (timing, Some(Kept::Read { file })),
        _ => {
            // One layer's tensors at a time: both paths time it before the next is uploaded.
            let current: std::cell::RefCell<Option<(KernelCase, ConvTimer)>> = Default::default();
            let seconds = |case: &KernelCase, path| {
                let mut current = current.borrow_mut();
                if current.as_ref().is_some_and(|(c, _)| c != case) {
                    // The previous layer's tensors are freed before the next one's are uploaded.
                    *current = None;
                }
                let (_, timer) = current
                    .get_or_insert_with(|| (*case, ConvTimer::new(be, *case, work.train, REPS)));
                timer.seconds(path)
            };
            let timing = time_layers(&cases, seconds)?;
            let kept = key.map(|(kept, k)| conv_cache::write(kept.dir, &k, &timing));
            (timing, kept)
        }
    };
    // 4. One decision for all ranks.
    let c = agree(&timing, cases.len(), comm)?;
    Ok(Some(ConvChoice { batch, kept, ..c }))
}

/// Times each `(layer, count)` of `layers` on both paths with `seconds`, weighted by the
/// counts. ctseg's kernels are tried within [`crate::comm::catch_panic`], as the start-up check
/// tries any kernel: a kernel that fails on this adapter is recorded (`failure`) and not tried
/// on the next layers, so that the run can stay on burn's ([`agree`]).
pub fn time_layers<L>(
    layers: &[(L, usize)],
    seconds: impl Fn(&L, GpuConv) -> Result<f64>,
) -> Result<Timing> {
    let mut t = Timing {
        burn_s: 0.0,
        wgsl_s: 0.0,
        failure: None,
    };
    for (layer, count) in layers {
        t.burn_s += seconds(layer, GpuConv::Burn)? * *count as f64;
        if t.failure.is_none() {
            match crate::comm::catch_panic(|| seconds(layer, GpuConv::Wgsl)) {
                Ok(Ok(s)) => t.wgsl_s += s * *count as f64,
                Ok(Err(e)) => t.failure = Some(failed_while_timed(&e.to_string())),
                Err(panic) => t.failure = Some(failed_while_timed(&panic)),
            }
        }
    }
    Ok(t)
}

/// One decision on every rank's `timing` of the same `layers` layer shapes: the ranks' mean
/// totals decide ([`decide`]), and a failure of ctseg's kernels on any rank leaves every rank
/// on burn's with the reason. Collective; `batch` is left 0 and `kept` `None` for the caller.
pub fn agree(timing: &Timing, layers: usize, comm: &dyn Communicator) -> Result<ConvChoice> {
    let ranks = comm.size();
    let mut totals = [
        timing.burn_s,
        timing.wgsl_s,
        f64::from(u8::from(timing.failure.is_some())),
    ];
    comm.allreduce_sum_f64(&mut totals)?;
    let [burn_s, wgsl_s, failed] = totals;
    let (burn_s, wgsl_s) = (burn_s / ranks as f64, wgsl_s / ranks as f64);
    // The ranks' sums are the same numbers on every rank, but a decision that enters a
    // collective ([`apply_checked`]) must not rest on that: ctseg's only if every rank says so.
    let ctsegs = ranks_where(comm, decide(burn_s, wgsl_s) == GpuConv::Wgsl)?;
    let choice = ConvChoice {
        chosen: if ctsegs == ranks {
            GpuConv::Wgsl
        } else {
            GpuConv::Burn
        },
        burn_s,
        wgsl_s,
        layers,
        ranks,
        batch: 0,
        fallback: None,
        kept: None,
    };
    Ok(match (failed > 0.0, &timing.failure) {
        (false, _) => choice,
        (true, Some(why)) => choice.fall_back(why.clone()),
        (true, None) => {
            choice.fall_back("ctseg's kernels failed while timed on another rank".into())
        }
    })
}

/// `plain` on the kernels `choice` chose, with the start-up `check` run on them. Where ctseg's
/// were chosen and fail the check on any rank, every rank falls back to burn's, says why and
/// runs the check again: `--gpu-conv auto` never fails a run that burn's kernels would pass.
/// Collective where ctseg's were chosen.
pub fn apply_checked<V>(
    plain: Backend,
    choice: ConvChoice,
    comm: &dyn Communicator,
    check: impl Fn(&Backend) -> Result<V>,
) -> Result<(Backend, V)> {
    let chosen = plain.clone().with_conv_choice(choice.clone());
    if choice.chosen != GpuConv::Wgsl {
        return check(&chosen).map(|v| (chosen, v));
    }
    // ctseg's backward kernels may first run here (inference times the forward only).
    let checked = crate::comm::catch_panic(|| check(&chosen))
        .unwrap_or_else(|panic| Err(Error::Device(panic)));
    if ranks_where(comm, checked.is_err())? == 0 {
        return checked.map(|v| (chosen, v));
    }
    let why = match checked {
        // What failed, without the backend's description or the advice that open a refusal.
        Err(e) => {
            let text = e.to_string();
            let text = text
                .strip_prefix(&format!("{}: ", chosen.description))
                .unwrap_or(&text);
            let text = [". Training there would", ". Use "]
                .iter()
                .fold(text, |t, advice| t.split(advice).next().unwrap_or(t));
            match text.strip_prefix("the start-up check ") {
                // "could not run …": the check says what failed.
                Some(rest) => format!("ctseg's kernels: the start-up check {}", brief(rest)),
                None => format!("ctseg's kernels failed the start-up check: {}", brief(text)),
            }
        }
        Ok(_) => "ctseg's kernels failed the start-up check on another rank".into(),
    };
    let fallen = plain.with_conv_choice(choice.fall_back(why));
    let v = check(&fallen)?;
    Ok((fallen, v))
}

/// How many ranks say `yes`. Collective.
fn ranks_where(comm: &dyn Communicator, yes: bool) -> Result<usize> {
    let mut n = [f64::from(u8::from(yes))];
    comm.allreduce_sum_f64(&mut n)?;
    Ok(n[0] as usize)
}

/// The reason for a failure `text` of ctseg's kernels while timed.
fn failed_while_timed(text: &str) -> String {
    format!("ctseg's kernels failed while timed: {}", brief(text))
}

/// A failure's message as a reason in one line: its first line, at most 200 characters (a
/// driver's shader error can run to its source).
fn brief(text: &str) -> String {
    let line = text.lines().next().unwrap_or_default();
    match line.char_indices().nth(200) {
        Some((cut, _)) => format!("{}…", &line[..cut]),
        None => line.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::comm::Local;

    /// Depth 1, width 4, 16² (arch.rs's own test model).
    fn depth_one_width_four() -> UNetConfig {
        UNetConfig {
            width: 4,
            depth: 1,
            input_size: 16,
            classes: 3,
            upsampling: crate::model::Upsampling::Nearest,
            dropout: 0.0,
            norm: crate::model::Norm::Batch,
            bn_momentum: 0.9,
            bn_epsilon: 1e-3,
        }
    }

    #[test]
    fn ctsegs_kernels_are_chosen_only_when_clearly_faster() {
        // Burn's stay on a tie and within the margin; ctseg's win beyond it.
        assert_eq!(decide(1.0, 1.0), GpuConv::Burn);
        assert_eq!(decide(1.0, 0.95), GpuConv::Burn);
        assert_eq!(decide(1.0, 0.85), GpuConv::Wgsl);
        assert_eq!(decide(1.0, 2.0), GpuConv::Burn);
    }

    #[test]
    fn a_batch_whose_layers_would_not_fit_is_timed_smaller() {
        // livermask at width 64, 240²: its widest layer is the last decoder level's input,
        // cat(64, 128) = 192 channels at 240², 11,059,200 values an image, so 48 images fit in
        // 2^29 values (48.5).
        let model = UNetConfig {
            width: 64,
            depth: 4,
            input_size: 240,
            ..depth_one_width_four()
        };
        let one = layers(&model, 1, 1);
        assert_eq!(timed_batch(&one, 30), 30);
        assert_eq!(timed_batch(&one, 4096), 48);
        // A layer wider than the bound on its own is still timed, at one image.
        let huge = [(KernelCase::new([1, 1 << 15, 128, 256], 1 << 15), 1)];
        assert_eq!(timed_batch(&huge, 8), 1);
    }

    /// [`time_layers`], then [`agree`], on one process.
    fn decide_on_ranks<L>(
        layers: &[(L, usize)],
        seconds: impl Fn(&L, GpuConv) -> Result<f64>,
        comm: &dyn Communicator,
    ) -> Result<ConvChoice> {
        agree(&time_layers(layers, seconds)?, layers.len(), comm)
    }

    #[test]
    fn a_kept_failure_leaves_the_run_on_burns_with_its_reason() {
        // A timing read from an earlier run in which ctseg's kernels failed decides as it did
        // then, without timing them again.
        let kept = Timing {
            burn_s: 4.0,
            wgsl_s: 1.0,
            failure: Some("shader failed to build".into()),
        };
        let c = agree(&kept, 2, &Local).expect("agreed");
        assert_eq!(c.chosen, GpuConv::Burn);
        let why = c.fallback.expect("a reason");
        assert!(why.contains("shader failed to build"), "{why}");
    }

    #[test]
    fn a_failing_ctseg_kernel_leaves_the_run_on_burns_with_the_reason() {
        // The second layer's ctseg timing panics (as a kernel the adapter cannot build
        // would): the choice falls back, says why, and times nothing more of ctseg's.
        let layers = [(1usize, 1usize), (2, 3), (3, 1)];
        let calls = std::cell::Cell::new(0);
        let c = decide_on_ranks(
            &layers,
            |&l, path| {
                if path == GpuConv::Wgsl {
                    calls.set(calls.get() + 1);
                    assert!(l != 2, "shader failed to build");
                }
                Ok(1.0)
            },
            &Local,
        )
        .expect("falls back");
        assert_eq!(c.chosen, GpuConv::Burn);
        assert_eq!(calls.get(), 2);
        let why = c.fallback.clone().expect("a reason");
        assert!(why.contains("shader failed to build"), "{why}");
        assert!(c.describe().contains(&why));
        assert_eq!(c.burn_s, 5.0);
    }

    #[test]
    fn faster_ctseg_kernels_are_chosen_from_weighted_layer_times() {
        // burn 1 + 3·1 = 4 s, ctseg 1 + 3·0.5 = 2.5 s: ctseg's, under 0.9 × 4.
        let layers = [(1usize, 1usize), (2, 3)];
        let c = decide_on_ranks(
            &layers,
            |&l, path| {
                Ok(if path == GpuConv::Wgsl && l == 2 {
                    0.5
                } else {
                    1.0
                })
            },
            &Local,
        )
        .expect("timed");
        assert_eq!((c.chosen, c.burn_s, c.wgsl_s), (GpuConv::Wgsl, 4.0, 2.5));
        assert_eq!((c.ranks, c.fallback), (1, None));
    }

    /// A CPU backend to carry a choice in the tests of [`apply_checked`].
    fn cpu() -> Backend {
        crate::backend::open(&crate::backend::DeviceRequest {
            kind: BackendKind::Cpu,
            threads: 0,
            adapter: None,
            gpu_conv: GpuConv::Burn,
            cooperative_matrices: true,
        })
        .expect("cpu")
    }

    /// A measurement that chose `chosen`.
    fn measured(chosen: GpuConv) -> ConvChoice {
        ConvChoice {
            chosen,
            burn_s: 2.0,
            wgsl_s: 1.0,
            layers: 1,
            ranks: 1,
            batch: 1,
            fallback: None,
            kept: None,
        }
    }

    /// The start-up check as it refuses ctseg's kernels (src/verify.rs): the description, what
    /// differs, advice, then a table.
    fn refusing_ctsegs(b: &Backend) -> Result<u8> {
        if b.caps.gpu_conv == GpuConv::Wgsl {
            Err(Error::Device(format!(
                "{}: gradients differ. Training there would silently go wrong: use --backend cpu.\ntensor 3 | 0.5",
                b.description
            )))
        } else {
            Ok(7)
        }
    }

    #[test]
    fn ctsegs_kernels_failing_the_check_leave_the_run_on_burns() {
        let (be, v) = apply_checked(cpu(), measured(GpuConv::Wgsl), &Local, refusing_ctsegs)
            .expect("burn's pass");
        assert_eq!((be.caps.gpu_conv, v), (GpuConv::Burn, 7));
        let why = be.conv_choice.and_then(|c| c.fallback).expect("a reason");
        assert_eq!(
            why,
            "ctseg's kernels failed the start-up check: gradients differ"
        );
    }

    #[test]
    fn ctsegs_kernels_panicking_in_the_check_leave_the_run_on_burns() {
        let check = |b: &Backend| -> Result<u8> {
            assert!(b.caps.gpu_conv == GpuConv::Burn, "backward shader failed");
            Ok(7)
        };
        let (be, v) =
            apply_checked(cpu(), measured(GpuConv::Wgsl), &Local, check).expect("burn's pass");
        assert_eq!((be.caps.gpu_conv, v), (GpuConv::Burn, 7));
        let why = be.conv_choice.and_then(|c| c.fallback).expect("a reason");
        assert!(why.contains("backward shader failed"), "{why}");
    }

    #[test]
    fn ctsegs_kernels_passing_the_check_are_kept() {
        let (be, _) =
            apply_checked(cpu(), measured(GpuConv::Wgsl), &Local, |_| Ok(())).expect("passes");
        assert_eq!(be.caps.gpu_conv, GpuConv::Wgsl);
        assert_eq!(be.conv_choice, Some(measured(GpuConv::Wgsl)));
    }

    #[test]
    fn burns_kernels_failing_the_check_fail_the_run() {
        let refused = apply_checked(cpu(), measured(GpuConv::Burn), &Local, |_| {
            Err::<(), _>(Error::Device("gradients differ".into()))
        });
        assert!(refused.is_err());
    }

    #[test]
    fn the_cpu_offers_no_choice() {
        let cpu = cpu();
        assert!(!applies(&cpu));
        let model = depth_one_width_four();
        let work = ConvWorkload {
            batch: 1,
            train: true,
        };
        let none = choose(&cpu, &model, 1, work, &Local, None).expect("nothing to do");
        assert_eq!(none, None);
    }

    #[test]
    fn a_models_layers_are_its_blocks_counted_by_shape() {
        // Depth 1, width 4, 16², one input channel; the blocks as arch::stages lists them:
        // 1→4, 4→4 at 16²; 4→8, 8→8 at 8²; cat(4, 8) = 12→4, 4→4 at 16².
        let model = depth_one_width_four();
        let case = |shape, c_out| KernelCase::new(shape, c_out);
        assert_eq!(
            layers(&model, 1, 2),
            [
                (case([2, 1, 16, 16], 4), 1),
                (case([2, 4, 16, 16], 4), 2),
                (case([2, 4, 8, 8], 8), 1),
                (case([2, 8, 8, 8], 8), 1),
                (case([2, 12, 16, 16], 4), 1),
            ]
        );
    }
}
