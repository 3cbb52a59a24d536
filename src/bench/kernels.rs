//! `ctseg bench kernels`: ctseg's own GPU kernels against burn's on one adapter, one layer at a
//! time and each as the model calls it, so that a user (and the device script,
//! scripts/gpu_device_check.sh) sees which path is faster there:
//! - one 3×3 convolution + ReLU ([`ops::conv`]) on burn's kernels (`--gpu-conv burn`, split into
//!   row chunks on loop-capped adapters) against ctseg's (`--gpu-conv wgsl`,
//!   [`crate::model::gpu_conv`]); on an adapter with cooperative matrices, also mixed
//!   precision's convolution (f16 operands, f32 accumulation) in registers against on them;
//! - one training-mode batch normalisation + spatial dropout: the tensor-operation formula
//!   ([`ops::batch_norm_train_tensor_ops`]) against ctseg's kernels ([`gpu_norm`]).
//!
//! In a `spirv` build (kernels compiled to SPIR-V, where ctseg's WGSL kernels cannot load), the
//! one comparison is mixed precision's convolution: burn's f32 kernels against cubek's on the
//! driver's cooperative matrices ([`cmma_conv`]). Its time beside the default build's
//! cooperative-matrix row, layer by layer, is the route decision of docs/gpu-notes.md.
//!
//! Each for the forward alone and forward + backward as in a training step: the median of warm
//! repetitions with the device synchronised, the ratio of the two in the same invocation, and
//! their agreement (the largest relative L2 difference of the outputs and gradients).

use std::time::Instant;

use burn::tensor::{Device, Tensor, TensorData};
use serde::Serialize;

use crate::backend::{Backend, BackendKind};
use crate::error::{Error, Result};
use crate::model::gpu_conv::CoopTile;
use crate::model::{DeviceCaps, GpuConv, cmma_conv, gpu_norm, ops};
use crate::tensor_util::to_f32;
use crate::util::stats::spread;
use crate::verify::largest_difference;
use crate::wgsl::{self, Compiler};

/// One layer: its input `[batch, c_in, h, w]` and the convolution's output channels.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct KernelCase {
    /// `[batch, c_in, h, w]`.
    pub shape: [usize; 4],
    /// Output channels of the convolution.
    pub c_out: usize,
}

impl std::str::FromStr for KernelCase {
    type Err = String;

    /// `B,C,H,W` (a convolution C → C) or `B,C,H,W,CO`.
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let v: Vec<usize> = s
            .split(',')
            .map(|p| p.trim().parse::<usize>())
            .collect::<std::result::Result<_, _>>()
            .map_err(|e| format!("`{s}`: {e} (expected B,C,H,W or B,C,H,W,CO)"))?;
        let (shape, c_out) = match v[..] {
            [b, c, h, w] => ([b, c, h, w], c),
            [b, c, h, w, co] => ([b, c, h, w], co),
            _ => {
                return Err(format!(
                    "`{s}`: expected 4 or 5 sizes (B,C,H,W or B,C,H,W,CO)"
                ));
            }
        };
        if shape.contains(&0) || c_out == 0 {
            return Err(format!("`{s}`: every size must be at least 1"));
        }
        // Input, output and weights must each be allocatable (and indexable by the kernels).
        let [b, c, h, w] = shape;
        let elements = |dims: &[usize]| dims.iter().try_fold(1usize, |n, &d| n.checked_mul(d));
        let largest = [
            elements(&[b, c, h, w]),
            elements(&[b, c_out, h, w]),
            elements(&[c_out, c, 9]),
        ];
        if largest
            .iter()
            .any(|n| n.is_none_or(|n| n > crate::config::MAX_VALUES))
        {
            return Err(format!(
                "`{s}`: a tensor of this case holds more than {} values",
                crate::config::MAX_VALUES
            ));
        }
        Ok(Self { shape, c_out })
    }
}

impl std::fmt::Display for KernelCase {
    /// As `--case` takes it: `B,C,H,W,CO`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let [b, c, h, w] = self.shape;
        write!(f, "{b},{c},{h},{w},{}", self.c_out)
    }
}

/// The livermask U-Net's layers the default run measures: width 32's first level and its third
/// level, the bottleneck's input, and width 64's first level, at batch 4; width 64's first and
/// second levels at the study's batch 30 (the second on ctseg's 128 × 128 tiles).
pub const LIVERMASK_CASES: [KernelCase; 6] = [
    KernelCase::new([4, 32, 240, 240], 32),
    KernelCase::new([4, 64, 120, 120], 64),
    KernelCase::new([4, 256, 30, 30], 256),
    KernelCase::new([4, 64, 240, 240], 64),
    KernelCase::new([30, 64, 240, 240], 64),
    KernelCase::new([30, 128, 120, 120], 128),
];

impl KernelCase {
    /// The layer with input `shape` and `c_out` output channels.
    pub const fn new(shape: [usize; 4], c_out: usize) -> Self {
        Self { shape, c_out }
    }
}

/// What to measure.
#[derive(Clone, Debug)]
pub struct KernelBenchOptions {
    /// Timed repetitions of each (after one untimed).
    pub reps: usize,
    /// The layers.
    pub cases: Vec<KernelCase>,
}

/// One comparison (one JSON line with `--json`).
#[derive(Clone, Debug, Serialize)]
pub struct KernelRow {
    /// `"kernels"`.
    pub bench: &'static str,
    /// `conv3x3+relu`, `conv3x3+relu mixed` or `batch_norm+dropout`.
    pub op: &'static str,
    /// The layer.
    pub case: KernelCase,
    /// `forward` or `fwd+bwd`.
    pub pass: &'static str,
    /// The path compared against (burn's kernels, or mixed precision's register kernels).
    pub baseline: String,
    /// Its median seconds.
    pub baseline_s: f64,
    /// ctseg's path.
    pub candidate: String,
    /// Its median seconds.
    pub candidate_s: f64,
    /// `baseline_s / candidate_s`: above 1, ctseg's path is faster.
    pub speedup: f64,
    /// Convolutions: the floating-point operations of the pass (2 per multiply-add; the
    /// backward counted as twice the forward), for the rates below.
    pub flop: Option<f64>,
    /// The largest relative L2 difference between the two paths' outputs and gradients: the
    /// same sums in another order, but for burn's f32 against cubek's f16 operands (a `spirv`
    /// build), where it is f16's rounding.
    pub rel_l2: f64,
}

impl KernelRow {
    /// One line of the table.
    pub fn render(&self) -> String {
        let rate = |s: f64| match self.flop {
            Some(f) => format!(" ({:.1} GFLOP/s)", f / s / 1e9),
            None => String::new(),
        };
        format!(
            "{:?} -> {} {} {}: {} {:.4} s{} | {} {:.4} s{} | speedup {:.2}x | rel. L2 diff {:.1e}",
            self.case.shape,
            self.case.c_out,
            self.op,
            self.pass,
            self.baseline,
            self.baseline_s,
            rate(self.baseline_s),
            self.candidate,
            self.candidate_s,
            rate(self.candidate_s),
            self.speedup,
            self.rel_l2,
        )
    }
}

/// Batch normalisation's ε in the model (Keras's default).
const EPSILON: f64 = 1e-3;

/// Which comparisons a backend offers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Route {
    /// Kernels compiled from WGSL: burn's against ctseg's, in f32 and mixed precision.
    Wgsl,
    /// Kernels compiled to SPIR-V (a `spirv` build): burn's f32 convolution against cubek's
    /// on these f16 × f16 → f32 cooperative-matrix shapes.
    SpirV(Vec<[u32; 3]>),
}

/// The comparisons `be` offers, or why it offers none: not a GPU, or a `spirv` build on an
/// adapter without f16 cooperative matrices (burn's kernels only: nothing to compare).
pub fn route(be: &Backend) -> Result<Route> {
    if be.kind != BackendKind::Gpu {
        return Err(Error::Argument(
            "bench kernels compares GPU kernels: use it with a GPU adapter (`ctseg adapters`)"
                .into(),
        ));
    }
    if wgsl::compiler(&be.device) == Compiler::Wgsl {
        return Ok(Route::Wgsl);
    }
    let shapes = cmma_conv::f16_shapes(&be.device);
    if shapes.is_empty() {
        return Err(Error::Argument(
            "bench kernels: in this `spirv` build every kernel is burn's (ctseg's WGSL kernels cannot load), and the adapter lists no f16 cooperative matrices for cubek: nothing to compare; run the default build".into(),
        ));
    }
    Ok(Route::SpirV(shapes))
}

/// Runs every comparison of `o` that `route` (of `be`: [`route`]) offers, calling `emit` with
/// each row as it is measured.
pub fn bench_kernels(
    be: &Backend,
    route: &Route,
    o: &KernelBenchOptions,
    mut emit: impl FnMut(&KernelRow),
) -> Result<Vec<KernelRow>> {
    let mut rows = Vec::new();
    let mut push = |row: KernelRow| {
        emit(&row);
        rows.push(row);
    };
    for case in &o.cases {
        let data = CaseData::new(*case);
        for train in [false, true] {
            // 1. The convolution, on the paths the route offers.
            let conv = Conv::new(be, o.reps, &data, train);
            let pass = conv.pass;
            match route {
                Route::Wgsl => conv.wgsl_rows()?.into_iter().for_each(&mut push),
                Route::SpirV(shapes) => push(conv.spirv_row(shapes)?),
            }
            // 2. Batch normalisation of the convolution's input, as the block before it does
            // (ctseg's kernels only load where kernels are WGSL).
            if *route == Route::Wgsl {
                let operands = NormOperands::new(&be.device, train, &data);
                let formula = time(be, o.reps, &|| operands.run(false))?;
                let own = time(be, o.reps, &|| operands.run(true))?;
                let (base, cand) = (("tensor operations", formula), ("ctseg", own));
                push(row("batch_norm+dropout", *case, pass, base, cand, None));
            }
        }
    }
    Ok(rows)
}

/// One pass of one layer's convolution, timed on each path.
struct Conv<'a> {
    be: &'a Backend,
    reps: usize,
    operands: ConvOperands,
    pass: &'static str,
    flop: f64,
}

impl<'a> Conv<'a> {
    /// `data`'s layer on `be`: its forward, or with `train` its forward and both gradients.
    fn new(be: &'a Backend, reps: usize, data: &CaseData, train: bool) -> Self {
        Self {
            be,
            reps,
            operands: ConvOperands::new(&be.device, train, data),
            pass: if train { "fwd+bwd" } else { "forward" },
            flop: data.forward_flop() * if train { 3.0 } else { 1.0 },
        }
    }

    /// The device's caps with these choices of its paths (the rest as the backend found them).
    fn caps(&self, gpu_conv: GpuConv, f16_operands: bool, coop: Option<CoopTile>) -> DeviceCaps {
        DeviceCaps {
            gpu_conv,
            f16_operands,
            coop,
            ..self.be.caps
        }
    }

    /// The median seconds and outputs of the convolution on these paths.
    fn time(&self, gpu_conv: GpuConv, f16_operands: bool, coop: Option<CoopTile>) -> Result<Timed> {
        let caps = self.caps(gpu_conv, f16_operands, coop);
        time(self.be, self.reps, &|| self.operands.run(caps))
    }

    /// The median seconds of the convolution in f32 on `gpu_conv`. An error where its kernels
    /// failed on the device: the device waits without complaint for kernels that did not
    /// build (cubecl skips them and marks their outputs), so one value of each output is read
    /// back, where such a failure shows.
    fn seconds(&self, gpu_conv: GpuConv) -> Result<f64> {
        let caps = self.caps(gpu_conv, false, None);
        let (median, outputs) = median_seconds(self.be, self.reps, &|| self.operands.run(caps))?;
        for y in outputs {
            to_f32(y.slice([0..1, 0..1, 0..1, 0..1]))?;
        }
        Ok(median)
    }

    /// The row comparing `baseline` with `candidate`.
    fn row(
        &self,
        op: &'static str,
        baseline: (&str, Timed),
        candidate: (&str, Timed),
    ) -> KernelRow {
        let case = self.operands.case;
        row(op, case, self.pass, baseline, candidate, Some(self.flop))
    }

    /// Kernels from WGSL: f32 on burn's kernels against ctseg's; with cooperative matrices,
    /// mixed precision in registers against on them.
    fn wgsl_rows(&self) -> Result<Vec<KernelRow>> {
        let burn = self.time(GpuConv::Burn, false, None)?;
        let own = self.time(GpuConv::Wgsl, false, None)?;
        let mut rows = vec![self.row("conv3x3+relu", ("burn", burn), ("ctseg wgsl", own))];
        if let Some(tile) = self.be.caps.coop {
            let registers = self.time(GpuConv::Wgsl, true, None)?;
            let coop = self.time(GpuConv::Wgsl, true, Some(tile))?;
            let (base, cand) = (("registers", registers), (tile.describe(), coop));
            let cand = (cand.0.as_str(), cand.1);
            rows.push(self.row("conv3x3+relu mixed", base, cand));
        }
        Ok(rows)
    }

    /// Kernels compiled to SPIR-V: mixed precision's convolution, burn's f32 kernels against
    /// cubek's on the cooperative-matrix `shapes`. A decline is an error: the candidate would
    /// have timed burn's fallback.
    fn spirv_row(&self, shapes: &[[u32; 3]]) -> Result<KernelRow> {
        let burn = self.time(GpuConv::Burn, false, None)?;
        let declined = cmma_conv::declined();
        let cubek = self.time(GpuConv::Burn, true, None)?;
        if cmma_conv::declined() != declined {
            return Err(Error::Device(format!(
                "bench kernels: cubek declined the layer {:?}, which then ran on burn's kernels",
                self.operands.case
            )));
        }
        let shapes: Vec<String> = shapes
            .iter()
            .map(|[m, n, k]| format!("{m}x{n}x{k}"))
            .collect();
        let name = format!("cubek cooperative matrices {} f16->f32", shapes.join(", "));
        Ok(self.row("conv3x3+relu mixed", ("burn f32", burn), (&name, cubek)))
    }
}

/// One convolution + ReLU layer's tensors on a device, to time in f32 on either path: its
/// forward, or with `train` its forward and both gradients ([`super::conv_choice`]).
pub struct ConvTimer<'a>(Conv<'a>);

impl<'a> ConvTimer<'a> {
    /// `case` on `be`, uploaded now; each timing is the median of `reps` after one untimed.
    pub fn new(be: &'a Backend, case: KernelCase, train: bool, reps: usize) -> Self {
        Self(Conv::new(be, reps, &CaseData::new(case), train))
    }

    /// The median seconds on `gpu_conv`'s kernels.
    pub fn seconds(&self, gpu_conv: GpuConv) -> Result<f64> {
        self.0.seconds(gpu_conv)
    }
}

/// A path's median seconds and its last outputs.
type Timed = (f64, Vec<Vec<f32>>);

/// The row comparing `baseline` with `candidate`.
fn row(
    op: &'static str,
    case: KernelCase,
    pass: &'static str,
    (baseline, (baseline_s, base_out)): (&str, Timed),
    (candidate, (candidate_s, cand_out)): (&str, Timed),
    flop: Option<f64>,
) -> KernelRow {
    KernelRow {
        bench: "kernels",
        op,
        case,
        pass,
        baseline: baseline.into(),
        baseline_s,
        candidate: candidate.into(),
        candidate_s,
        speedup: baseline_s / candidate_s,
        flop,
        rel_l2: largest_difference(&base_out, &cand_out),
    }
}

/// Median seconds of `f` over `reps` warm repetitions (one untimed first), and its last output.
fn time(be: &Backend, reps: usize, f: &dyn Fn() -> Vec<Tensor<4>>) -> Result<Timed> {
    let (median, out) = median_seconds(be, reps, f)?;
    let out = out.into_iter().map(to_f32).collect::<Result<_>>()?;
    Ok((median, out))
}

/// The median seconds of `f` over `reps` runs after one untimed, the device waited for around
/// each, and the last run's outputs (still on the device).
fn median_seconds(
    be: &Backend,
    reps: usize,
    f: &dyn Fn() -> Vec<Tensor<4>>,
) -> Result<(f64, Vec<Tensor<4>>)> {
    let sync = || {
        be.device
            .sync()
            .map_err(|e| Error::Device(format!("bench kernels: {e:?}")))
    };
    let mut times = Vec::new();
    let mut out = Vec::new();
    for i in 0..=reps.max(1) {
        sync()?;
        let t = Instant::now();
        let ys = f();
        sync()?;
        if i > 0 {
            times.push(t.elapsed().as_secs_f64());
        }
        out = ys;
    }
    Ok((spread(&times).median, out))
}

/// `n` fixed values in [-0.5, 0.5), the same in every run.
fn pattern(n: usize, step: usize, period: usize) -> Vec<f32> {
    (0..n)
        .map(|i| ((i * step) % period) as f32 / period as f32 - 0.5)
        .collect()
}

/// A case's values on the host: input, kernel, and the loss weights of the convolution's
/// output (`sum(y · r)` gives every output its own gradient; the normalisation makes its own,
/// [`NormOperands::new`]).
struct CaseData {
    case: KernelCase,
    x: Vec<f32>,
    w: Vec<f32>,
    r_conv: Vec<f32>,
}

impl CaseData {
    /// [`pattern`]s (the kernel's scaled to [-0.05, 0.05)).
    fn new(case: KernelCase) -> Self {
        let [b, c, h, w] = case.shape;
        Self {
            case,
            x: pattern(b * c * h * w, 7919, 97),
            w: pattern(case.c_out * c * 9, 104_729, 89)
                .into_iter()
                .map(|v| v / 10.0)
                .collect(),
            r_conv: pattern(b * case.c_out * h * w, 31, 17),
        }
    }

    /// 2 per multiply-add of the forward convolution.
    fn forward_flop(&self) -> f64 {
        let [b, c, h, w] = self.case.shape;
        2.0 * (b * h * w * self.case.c_out * c * 9) as f64
    }
}

/// `device`, or with `train` its autodiff device.
fn on(device: &Device, train: bool) -> Device {
    if train {
        device.clone().autodiff()
    } else {
        device.clone()
    }
}

/// With `train`, `t` tracked for gradients.
fn tracked<const D: usize>(t: Tensor<D>, train: bool) -> Tensor<D> {
    if train { t.require_grad() } else { t }
}

/// One convolution's tensors on the device (uploaded before any timing).
struct ConvOperands {
    case: KernelCase,
    x: Tensor<4>,
    w: Tensor<4>,
    b: Tensor<1>,
    r: Tensor<4>,
    train: bool,
}

impl ConvOperands {
    fn new(device: &Device, train: bool, d: &CaseData) -> Self {
        let device = on(device, train);
        let [b, c, h, w] = d.case.shape;
        let co = d.case.c_out;
        let x = Tensor::from_data(TensorData::new(d.x.clone(), [b, c, h, w]), &device);
        let k = Tensor::from_data(TensorData::new(d.w.clone(), [co, c, 3, 3]), &device);
        Self {
            case: d.case,
            x: tracked(x, train),
            w: tracked(k, train),
            b: tracked(Tensor::zeros([co], &device), train),
            r: Tensor::from_data(TensorData::new(d.r_conv.clone(), [b, co, h, w]), &device),
            train,
        }
    }

    /// The output of the convolution + ReLU, or with `train` the input and weight gradients
    /// under the loss `sum(y · r)`.
    fn run(&self, caps: DeviceCaps) -> Vec<Tensor<4>> {
        let y = ops::conv(self.x.clone(), self.w.clone(), self.b.clone(), true, &caps);
        if !self.train {
            return vec![y];
        }
        let grads = (y * self.r.clone()).sum().backward();
        [self.x.grad(&grads), self.w.grad(&grads)]
            .into_iter()
            .flatten()
            .collect()
    }
}

/// One batch normalisation's tensors: input, γ, β, the loss weights and spatial-dropout
/// multipliers (every fifth plane dropped, the rest scaled by 1/(1 − 0.2)).
struct NormOperands {
    x: Tensor<4>,
    gamma: Tensor<1>,
    beta: Tensor<1>,
    r: Tensor<4>,
    mask: Vec<f32>,
    train: bool,
}

impl NormOperands {
    fn new(device: &Device, train: bool, d: &CaseData) -> Self {
        let device = on(device, train);
        let shape = d.case.shape;
        let c = shape[1];
        let param =
            |v: Vec<f32>| tracked(Tensor::from_data(TensorData::new(v, [c]), &device), train);
        let x = Tensor::from_data(TensorData::new(d.x.clone(), shape), &device);
        Self {
            x: tracked(x, train),
            gamma: param((0..c).map(|i| 0.5 + (i % 7) as f32 / 7.0).collect()),
            beta: param((0..c).map(|i| (i % 5) as f32 / 10.0 - 0.2).collect()),
            r: Tensor::from_data(TensorData::new(pattern(d.x.len(), 31, 17), shape), &device),
            mask: (0..shape[0] * c)
                .map(|p| if p % 5 == 0 { 0.0 } else { 1.25 })
                .collect(),
            train,
        }
    }

    /// The normalised output, or with `train` the gradients of x, γ and β under `sum(y · r)`;
    /// on ctseg's kernels (`fused`) or written with tensor operations. An empty list where
    /// ctseg's kernels do not cover the shape (the row's difference is then infinite).
    fn run(&self, fused: bool) -> Vec<Tensor<4>> {
        let [b, c, _, _] = self.x.dims();
        let (x, g, be) = (&self.x, &self.gamma, &self.beta);
        let y = if fused {
            match gpu_norm::batch_norm_train(x, g, be, EPSILON, Some(&self.mask)) {
                Some((y, _, _)) => y,
                None => return Vec::new(),
            }
        } else {
            let (y, _, _) =
                ops::batch_norm_train_tensor_ops(x.clone(), g.clone(), be.clone(), EPSILON);
            let mask = TensorData::new(self.mask.clone(), [b, c, 1, 1]);
            y * Tensor::<4>::from_data(mask, &x.device())
        };
        if !self.train {
            return vec![y];
        }
        let grads = (y * self.r.clone()).sum().backward();
        let per_channel = |t: Option<Tensor<1>>| t.map(|t| t.reshape([1, c, 1, 1]));
        [
            x.grad(&grads),
            per_channel(g.grad(&grads)),
            per_channel(be.grad(&grads)),
        ]
        .into_iter()
        .flatten()
        .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cases_parse_with_and_without_output_channels() {
        let same: KernelCase = "4,32,240,240".parse().expect("four sizes");
        assert_eq!(same.shape, [4, 32, 240, 240]);
        assert_eq!(same.c_out, 32);
        let other: KernelCase = "1, 3, 16, 16, 8".parse().expect("five sizes");
        assert_eq!((other.shape, other.c_out), ([1, 3, 16, 16], 8));
    }

    #[test]
    fn a_case_prints_as_the_five_sizes_it_parses_from() {
        let c: KernelCase = "4,32,240,240".parse().expect("four sizes");
        assert_eq!(c.to_string(), "4,32,240,240,32");
        assert_eq!(c.to_string().parse::<KernelCase>(), Ok(c));
    }

    #[test]
    fn malformed_cases_are_refused_with_the_expected_form() {
        for bad in [
            "4,32,240",
            "4,32,240,240,1,1",
            "4,x,240,240",
            "4,0,240,240",
            "",
        ] {
            let e = bad.parse::<KernelCase>().expect_err(bad);
            assert!(
                e.contains("B,C,H,W") || e.contains("at least 1"),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn a_case_too_large_to_allocate_is_refused() {
        // 2^64 − 1 batches used to overflow a capacity and panic; 2^32 × 4 × 8 × 8 to abort.
        for bad in [
            "18446744073709551615,1,1,1",
            "4294967296,4,8,8",
            "1,4,8,8,4294967296",
        ] {
            let e = bad.parse::<KernelCase>().expect_err(bad);
            assert!(e.contains("more than 4294967296 values"), "{bad}: {e}");
        }
    }
}
