//! ctseg's own 3×3 'same' convolution on a wgpu device, forward and gradients, registered with
//! burn's autodiff as one operation (as [`super::cpu::conv`] does on the CPU):
//! - forward (`shaders/conv3x3_forward.wgsl`): an implicit GEMM tiled through workgroup memory
//!   and registers, bias and ReLU fused;
//! - input gradient: the same kernel on the output gradient, gated by the ReLU's output and with
//!   the weights read swapped and mirrored in place (exact for stride 1 and padding 1);
//! - weight and bias gradients (`shaders/conv3x3_weight_grad.wgsl`): one GEMM with the bias as
//!   an extra column of ones, its long reduction over batch·pixels cut into slices whose count
//!   depends only on the shape (so results are deterministic), summed in slice order
//!   (`shaders/sum_slices.wgsl`).
//!
//! Every loop stays short on every adapter ([`MAX_LOOP`]), so loop-capped adapters (lavapipe)
//! need no row chunks. Which convolution the model uses is decided in [`super::ops::conv`] from
//! [`super::ops::GpuConv`].

use burn::tensor::{DType, Tensor};
use burn_cubecl::Cube;
use burn_cubecl::cubecl::server::Handle;
use burn_cubecl::tensor::CubeTensor;
use burn_dispatch::backends::Autodiff;
use burn_dispatch::backends::autodiff::NodeId;
use burn_dispatch::backends::autodiff::checkpoint::base::Checkpointer;
use burn_dispatch::backends::autodiff::checkpoint::strategy::NoCheckpointing;
use burn_dispatch::backends::autodiff::grads::Gradients;
use burn_dispatch::backends::autodiff::ops::{Backward, Ops, OpsKind};

use super::cpu::conv::ConvShape;
use crate::wgsl::{
    Fused, MAX_GROUPS, WORKGROUP, cube_device, f32_buffer, f32_fused, launch, resolve, shader,
};

const FORWARD: &str = shader!("gemm_tile.wgsl", "conv3x3_forward.wgsl");
const WEIGHT_GRAD: &str = shader!("gemm_tile.wgsl", "conv3x3_weight_grad.wgsl");
const SUM_SLICES: &str = shader!("sum_slices.wgsl");
/// The output tile of one workgroup in both GEMM kernels, rows and columns, as the shaders
/// declare; and their K (forward) or N (weight gradient) step.
const TILE: usize = 64;
const STEP: usize = 16;
/// The weight-gradient kernel's slices: enough workgroups to fill a large GPU.
const TARGET_WORKGROUPS: usize = 1024;
/// The most values one workgroup's loop walks (a weight-gradient slice's columns, the forward's
/// K = channels·9): 16,384 steps of 16, far below an adapter's loop cap (lavapipe: 65,535).
const MAX_LOOP: usize = 16_384 * STEP;

/// The forward kernel's flags (shaders/conv3x3_forward.wgsl).
const RELU: u32 = 1;
const BIAS: u32 = 2;
const GATE: u32 = 4;
const MIRRORED: u32 = 8;
const F16_OPERANDS: u32 = 16;

/// What the WGSL kernels need of the CPU's convolution shape (k = 3 here).
impl ConvShape {
    /// The shape of `x` convolved by `weight` with `bias`, when the kernels cover it: 3×3, the
    /// channels matching, and the forward, input-gradient and weight-gradient grids and indices
    /// within 32 bits and the dispatch limits.
    fn of(x: [usize; 4], weight: [usize; 4], bias: [usize; 1]) -> Option<Self> {
        let [batch, c_in, h, w] = x;
        let [c_out, wc, kh, kw] = weight;
        if wc != c_in || kh != 3 || kw != 3 || bias != [c_out] || batch * h * w == 0 {
            return None;
        }
        let s = Self {
            batch,
            c_in,
            c_out,
            h,
            w,
            k: 3,
        };
        let fits = |v: usize| u32::try_from(v).is_ok();
        let n_tiles = s.n().div_ceil(TILE);
        let (slice, slices) = s.slices();
        let ok = n_tiles <= MAX_GROUPS
            && c_in.max(c_out) * 9 <= MAX_LOOP
            && (c_in * 9 + 1).div_ceil(TILE) <= MAX_GROUPS
            && slices <= MAX_GROUPS
            && fits(s.n() * c_in.max(c_out))
            && fits(slices * c_out * (c_in * 9 + 1))
            && fits(s.n() + slice);
        ok.then_some(s)
    }

    /// GEMM columns: batch·pixels.
    fn n(&self) -> usize {
        self.batch * self.h * self.w
    }

    /// Columns per weight-gradient slice (a multiple of the kernel's step) and the slice count.
    fn slices(&self) -> (usize, usize) {
        let tiles = (self.c_in * 9 + 1).div_ceil(TILE) * self.c_out.div_ceil(TILE);
        let n = self.n();
        let wanted = TARGET_WORKGROUPS
            .div_ceil(tiles)
            .clamp(1, n.div_ceil(256).max(1))
            .max(n.div_ceil(MAX_LOOP));
        let slice = n.div_ceil(wanted).div_ceil(STEP) * STEP;
        (slice, n.div_ceil(slice))
    }

    /// The `info` prefix both GEMM kernels read.
    fn dims(&self) -> [u32; 5] {
        [self.batch, self.c_in, self.c_out, self.h, self.w].map(|v| v as u32)
    }
}

/// `act(conv3x3_same(x, weight) + bias)` with ctseg's kernels, or `None` where they do not
/// apply: tensors not f32 on a wgpu device (with or without autodiff, all alike), a kernel other
/// than 3×3, or shapes beyond the dispatch grid or 32-bit indexing. Under autodiff the
/// gradients are ctseg's kernels too. With `f16_operands`, every product's two operands
/// (forward and both gradients) are rounded to binary16 and accumulated in f32, as tensor
/// cores compute mixed precision; the buffers stay f32.
///
/// # Shapes
/// - `x`: `[batch, c_in, h, w]`, `weight`: `[c_out, c_in, 3, 3]`, `bias`: `[c_out]`
///   → `[batch, c_out, h, w]`
pub fn conv3x3(
    x: &Tensor<4>,
    weight: &Tensor<4>,
    bias: &Tensor<1>,
    relu: bool,
    f16_operands: bool,
) -> Option<Tensor<4>> {
    let precision = if f16_operands { F16_OPERANDS } else { 0 };
    let s = ConvShape::of(x.dims(), weight.dims(), bias.dims())?;
    if [x.dtype(), weight.dtype(), bias.dtype()]
        .iter()
        .any(|d| *d != DType::F32)
    {
        return None;
    }
    cube_device(&x.device())?;
    let ad = (
        x.clone().try_into_primitive::<Autodiff<Cube>>(),
        weight.clone().try_into_primitive::<Autodiff<Cube>>(),
        bias.clone().try_into_primitive::<Autodiff<Cube>>(),
    );
    if let (Ok(x), Ok(w), Ok(b)) = ad {
        let nodes = [x.node(), w.node(), b.node()];
        let out = match ConvBackward
            .prepare::<NoCheckpointing>(nodes)
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(mut prep) => {
                let xs = prep.checkpoint(&x);
                let ws = prep.checkpoint(&w);
                let operands = [x.primitive(), w.primitive(), b.primitive()];
                let y = forward(&s, operands, relu, precision);
                prep.finish((xs, ws, relu.then(|| y.clone()), s, precision), y)
            }
            OpsKind::UnTracked(prep) => {
                let operands = [x.primitive(), w.primitive(), b.primitive()];
                prep.finish(forward(&s, operands, relu, precision))
            }
        };
        return Some(Tensor::from_primitive::<Autodiff<Cube>>(out));
    }
    let (x, w, b) = (f32_buffer(x)?, f32_buffer(weight)?, f32_buffer(bias)?);
    let flags = BIAS | precision | if relu { RELU } else { 0 };
    let y = launch_conv(&s, &x, &w, &b, &x, flags);
    Some(Tensor::from_primitive::<Cube>(f32_fused(
        &x.device,
        y,
        &[s.batch, s.c_out, s.h, s.w],
    )))
}

/// The forward on fused primitives `[x, weight, bias]` (the autodiff path).
fn forward(s: &ConvShape, operands: [&Fused; 3], relu: bool, precision: u32) -> Fused {
    let [x, w, b] = operands.map(|t| resolve(t.clone()));
    let flags = BIAS | precision | if relu { RELU } else { 0 };
    let y = launch_conv(s, &x, &w, &b, &x, flags);
    f32_fused(&x.device, y, &[s.batch, s.c_out, s.h, s.w])
}

#[derive(Debug)]
struct ConvBackward;

impl Backward<Cube, 3> for ConvBackward {
    /// Input and kernel nodes, the output when a ReLU followed the convolution, the shape, and
    /// the operands' precision flag.
    type State = (NodeId, NodeId, Option<Fused>, ConvShape, u32);

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, ckpt: &mut Checkpointer) {
        let [node_x, node_w, node_b] = ops.parents;
        let dy = resolve(grads.consume::<Cube>(&ops.node));
        let (xs, ws, relu_out, s, precision) = ops.state;
        // The ReLU's gradient: dy counts where the output is positive (PyTorch: zero at 0).
        let gate = relu_out.map(resolve);
        let x = resolve(ckpt.retrieve_node_output::<Fused>(xs));
        let w = resolve(ckpt.retrieve_node_output::<Fused>(ws));
        let device = x.device.clone();
        if let Some(node) = node_x {
            let flags = MIRRORED | precision | if gate.is_some() { GATE } else { 0 };
            let dx = launch_conv(
                &s.swapped(),
                &dy,
                &w,
                &w,
                gate.as_ref().unwrap_or(&dy),
                flags,
            );
            grads.register::<Cube>(
                node.id,
                f32_fused(&device, dx, &[s.batch, s.c_in, s.h, s.w]),
            );
        }
        if node_w.is_some() || node_b.is_some() {
            let (dw, db) = launch_weight_grad(&s, &x, &dy, gate.as_ref(), precision != 0);
            if let Some(node) = node_w {
                grads.register::<Cube>(node.id, f32_fused(&device, dw, &[s.c_out, s.c_in, 3, 3]));
            }
            if let Some(node) = node_b {
                grads.register::<Cube>(node.id, f32_fused(&device, db, &[s.c_out]));
            }
        }
    }
}

/// shaders/conv3x3_forward.wgsl on contiguous f32 buffers: the output `[batch, c_out, h, w]`.
/// `bias` and `gate` are read only under their flags (any buffer otherwise).
fn launch_conv(
    s: &ConvShape,
    x: &CubeTensor,
    w: &CubeTensor,
    bias: &CubeTensor,
    gate: &CubeTensor,
    flags: u32,
) -> Handle {
    let y = x.client.empty(s.n() * s.c_out * 4);
    let [b, ci, co, h, wd] = s.dims();
    launch(
        &x.client,
        (FORWARD, "conv3x3_forward"),
        grid(s.n().div_ceil(TILE), s.c_out.div_ceil(TILE), 1),
        &[&x.handle, &w.handle, &bias.handle, &y, &gate.handle],
        &[b, ci, co, h, wd, flags],
    );
    y
}

/// shaders/conv3x3_weight_grad.wgsl and shaders/sum_slices.wgsl: the weight gradient
/// `[c_out, c_in, 3, 3]` and the bias gradient `[c_out]` for input `x` and output gradient
/// `dy`, gated by `gate > 0` when given, the operands rounded to f16 with `f16_operands`.
fn launch_weight_grad(
    s: &ConvShape,
    x: &CubeTensor,
    dy: &CubeTensor,
    gate: Option<&CubeTensor>,
    f16_operands: bool,
) -> (Handle, Handle) {
    let client = &x.client;
    let (slice, slices) = s.slices();
    let k = s.c_in * 9;
    let part = client.empty(slices * s.c_out * (k + 1) * 4);
    let [b, ci, co, h, wd] = s.dims();
    launch(
        &x.client,
        (WEIGHT_GRAD, "conv3x3_weight_grad"),
        grid((k + 1).div_ceil(TILE), s.c_out.div_ceil(TILE), slices),
        &[&x.handle, &dy.handle, &gate.unwrap_or(dy).handle, &part],
        &[
            b,
            ci,
            co,
            h,
            wd,
            slice as u32,
            u32::from(gate.is_some()) | (u32::from(f16_operands) << 1),
        ],
    );
    let dw = client.empty(s.c_out * k * 4);
    let db = client.empty(s.c_out * 4);
    let groups = (s.c_out * (k + 1)).div_ceil(WORKGROUP as usize);
    let gx = groups.min(MAX_GROUPS);
    launch(
        &x.client,
        (SUM_SLICES, "sum_slices"),
        grid(gx, groups.div_ceil(gx), 1),
        &[&part, &dw, &db],
        &[slices as u32, co, k as u32, gx as u32],
    );
    (dw, db)
}

/// A grid of workgroups ([`ConvShape::of`] keeps every dimension within the dispatch limit).
fn grid(x: usize, y: usize, z: usize) -> (u32, u32, u32) {
    (x as u32, y as u32, z as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weight_gradient_slices_cover_the_columns_in_short_loops() {
        // livermask's first level at batch 4 and 30, a deep level, and a tiny image.
        for (batch, c_in, c_out, hw) in [
            (4, 32, 32, 240),
            (30, 64, 64, 240),
            (4, 512, 1024, 15),
            (1, 1, 3, 5),
        ] {
            let s = ConvShape::of([batch, c_in, hw, hw], [c_out, c_in, 3, 3], [c_out])
                .expect("covered");
            let (slice, slices) = s.slices();
            assert_eq!(slice % STEP, 0);
            assert!(slice * slices >= s.n());
            assert!(slice / STEP <= 16_384, "{slice}");
        }
    }

    #[test]
    fn shapes_the_kernels_do_not_cover_are_refused() {
        assert!(ConvShape::of([1, 2, 8, 8], [3, 2, 1, 1], [3]).is_none());
        assert!(ConvShape::of([1, 2, 8, 8], [3, 4, 3, 3], [3]).is_none());
        assert!(ConvShape::of([1, 2, 8, 8], [3, 2, 3, 3], [4]).is_none());
        assert!(ConvShape::of([0, 2, 8, 8], [3, 2, 3, 3], [3]).is_none());
        // Beyond the dispatch grid: 2^26 tiles of pixels.
        assert!(ConvShape::of([65_536, 1, 256, 256], [1, 1, 3, 3], [1]).is_none());
        // Within the grid (65,504 tiles), output values at 2^32 (1,025 channels) but not below.
        assert!(ConvShape::of([1, 1, 2047, 2048], [1024, 1, 3, 3], [1024]).is_some());
        assert!(ConvShape::of([1, 1, 2047, 2048], [1025, 1, 3, 3], [1025]).is_none());
        // K = channels·9 up to 16,384 steps of 16 (262,144), not beyond.
        assert!(ConvShape::of([1, 29_127, 4, 4], [1, 29_127, 3, 3], [1]).is_some());
        assert!(ConvShape::of([1, 29_128, 4, 4], [1, 29_128, 3, 3], [1]).is_none());
    }
}
