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
//! In mixed precision on an adapter with cooperative matrices, both GEMMs run their tile
//! products on them (`shaders/gemm_tile_coop.wgsl`: f16 operands, f32 accumulation, tensor
//! cores where the adapter has them) instead of in registers (`shaders/gemm_tile.wgsl`); the
//! staging, bias, ReLU and gate are the same kernel code either way.
//!
//! Every loop stays short on every adapter ([`MAX_LOOP`]), so loop-capped adapters (lavapipe)
//! need no row chunks. Which convolution the model uses is decided in [`super::ops::conv`] from
//! [`super::ops::GpuConv`] and [`super::ops::DeviceCaps`].

use std::sync::Mutex;

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

/// The GEMM kernels, after the header [`Tile::header`] writes (and, on cooperative matrices,
/// [`CoopTile::header`] before it).
const FORWARD: &str = shader!("gemm_tile.wgsl", "conv3x3_forward.wgsl");
const WEIGHT_GRAD: &str = shader!("gemm_tile.wgsl", "conv3x3_weight_grad.wgsl");
const FORWARD_COOP: &str = shader!("gemm_tile_coop.wgsl", "conv3x3_forward.wgsl");
const WEIGHT_GRAD_COOP: &str = shader!("gemm_tile_coop.wgsl", "conv3x3_weight_grad.wgsl");
const SUM_SLICES: &str = shader!("sum_slices.wgsl");
/// The kernels' K (forward) or N (weight gradient) step.
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

/// How the kernels multiply: f32 operands, operands rounded to f16 (mixed precision's numerics)
/// in registers, or f16 operands on the adapter's cooperative matrices. Accumulation is f32 in
/// all three.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Operands {
    /// f32 products (f32 runs).
    F32,
    /// f16 operands in registers (`shaders/gemm_tile.wgsl`).
    F16,
    /// f16 operands on cooperative matrices (`shaders/gemm_tile_coop.wgsl`).
    Coop(CoopTile),
}

impl Operands {
    /// The kernels' operand flag (16 in the forward's flags, 2 in the weight gradient's).
    fn f16(self) -> bool {
        self != Operands::F32
    }

    /// The tile for a GEMM of `m` rows with these operands, which would launch
    /// `workgroups(tile)` workgroups on `tile`.
    fn tile(self, m: usize, workgroups: impl Fn(Tile) -> usize) -> Tile {
        match self {
            Operands::Coop(t) => Tile::for_rows(m, t.shortest),
            Operands::F32 | Operands::F16 => {
                let large =
                    m > Tile::SQUARE.rows && workgroups(Tile::LARGE) >= LARGE_TILE_WORKGROUPS;
                if large {
                    Tile::LARGE
                } else {
                    Tile::for_rows(m, Tile::SHORT.rows)
                }
            }
        }
    }

    /// The forward and weight-gradient kernels with output `tile` (source, profile name).
    fn kernels(self, tile: Tile) -> [(&'static str, &'static str); 2] {
        let coop = match self {
            Operands::Coop(t) => Some(t),
            Operands::F32 | Operands::F16 => None,
        };
        let [f, w] = sources(coop, tile);
        match coop {
            None => [(f, "conv3x3_forward"), (w, "conv3x3_weight_grad")],
            Some(_) => [(f, "conv3x3_forward_coop"), (w, "conv3x3_weight_grad_coop")],
        }
    }
}

/// A workgroup's output tile in both GEMM kernels: `rows` × `cols`, `block` × `block` values
/// per invocation (256 of them). The GEMM's rows are the convolution's output channels (its
/// input channels for the input gradient), so a layer of 32 channels (livermask's first level
/// at width 32) would leave half of a 64-row tile empty: such GEMMs get a 32 × 128 tile. Tall
/// GEMMs get 128 × 128 tiles of 8 × 8 blocks, which load half as many staged values per product
/// as 4 × 4 blocks (on a GPU, workgroup-memory bandwidth bounds a 4 × 4 block), where that still
/// leaves enough workgroups to fill a large GPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Tile {
    rows: usize,
    cols: usize,
    block: usize,
}

/// Workgroups below which a GEMM keeps 64 × 64 tiles rather than 128 × 128 ones: two per
/// streaming multiprocessor of the largest GPUs (the H200 has 132).
const LARGE_TILE_WORKGROUPS: usize = 256;

impl Tile {
    const SHORT: Tile = Tile::new(32, 128, 4);
    const SQUARE: Tile = Tile::new(64, 64, 4);
    const LARGE: Tile = Tile::new(128, 128, 8);
    const SHAPES: [Tile; 3] = [Self::SHORT, Self::SQUARE, Self::LARGE];
    /// The tiles of 4,096 values shaders/gemm_tile_coop.wgsl covers, shortest first.
    const COOP_SHAPES: [Tile; 2] = [Self::SHORT, Self::SQUARE];

    const fn new(rows: usize, cols: usize, block: usize) -> Self {
        Self { rows, cols, block }
    }

    /// The shortest tile of 4,096 values that holds `m` rows (the 64-row one for more), never
    /// shorter than `shortest` rows.
    fn for_rows(m: usize, shortest: usize) -> Self {
        if m <= Self::SHORT.rows && shortest <= Self::SHORT.rows {
            Self::SHORT
        } else {
            Self::SQUARE
        }
    }

    /// The WGSL constants the GEMM kernels read (shaders/gemm_tile.wgsl).
    fn header(self) -> String {
        format!(
            "const TILE_ROWS: u32 = {}u;\nconst TILE_COLS: u32 = {}u;\nconst BLOCK: u32 = {}u;\n",
            self.rows, self.cols, self.block
        )
    }
}

/// The forward and weight-gradient sources for `tile`, on `coop`'s cooperative matrices or in
/// registers, written once per process and configuration (kernels are launched by
/// `&'static str`).
fn sources(coop: Option<CoopTile>, tile: Tile) -> [&'static str; 2] {
    type Known = Vec<((Option<CoopTile>, Tile), [&'static str; 2])>;
    static SOURCES: Mutex<Known> = Mutex::new(Vec::new());
    let mut known = SOURCES.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, s)) = known.iter().find(|(k, _)| *k == (coop, tile)) {
        return *s;
    }
    let mut header = coop.map_or(String::new(), CoopTile::header) + &tile.header();
    if crate::faults::wgsl_conv_broken() {
        header.insert_str(0, "not WGSL: injected by CTSEG_FAULT_INJECT\n");
    }
    let leak = |body: &str| -> &'static str { Box::leak((header.clone() + body).into()) };
    let s = match coop {
        None => [leak(FORWARD), leak(WEIGHT_GRAD)],
        Some(_) => [leak(FORWARD_COOP), leak(WEIGHT_GRAD_COOP)],
    };
    known.push(((coop, tile), s));
    s
}

/// The cooperative-matrix products the kernels use on an adapter (shaders/gemm_tile_coop.wgsl):
/// `size`×`size`×`size` with f16 operands and f32 accumulators, `per_subgroup` accumulators in
/// each subgroup (enough for the adapter's largest subgroups to cover an output tile), on tiles
/// of at least `shortest` rows (those whose workgroup memory the adapter has).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CoopTile {
    /// The matrices' side: 8 or 16.
    pub size: u32,
    /// Accumulators per subgroup.
    pub per_subgroup: u32,
    /// The shortest output tile (32 or 64 rows) that fits the adapter's workgroup memory.
    pub shortest: usize,
}

impl CoopTile {
    /// Workgroup memory the cooperative kernels declare for products of `size` on `tile`: the
    /// f16 A and B blocks (16 rows and columns of the tile), the f32 result tile (16 KiB) and a
    /// scratch block of `size` of its rows.
    fn workgroup_bytes(size: u32, tile: Tile) -> u32 {
        let (rows, cols) = (tile.rows as u32, tile.cols as u32);
        16 * (rows + cols) * 2 + (rows * cols + size * cols) * 4
    }

    /// The configuration for an adapter offering square f16 × f16 → f32 products of the sizes
    /// `f16_to_f32` (8 and 16 are those WGSL can name), f16 in shaders (`shader_f16`), subgroup
    /// ids (`subgroups`) with at most `max_subgroup` invocations per subgroup, and
    /// `workgroup_bytes` of workgroup memory: 16 where offered (a quarter of the products of
    /// 8) and a 64-row tile fits, else 8; `None` where anything is missing.
    pub fn choose(
        f16_to_f32: &[u32],
        shader_f16: bool,
        subgroups: bool,
        max_subgroup: u32,
        workgroup_bytes: u32,
    ) -> Option<Self> {
        if !shader_f16 || !subgroups || max_subgroup == 0 {
            return None;
        }
        let fits = |size: u32, tile: Tile| Self::workgroup_bytes(size, tile) <= workgroup_bytes;
        let size = [16, 8]
            .into_iter()
            .find(|s| f16_to_f32.contains(s) && fits(*s, Tile::SQUARE))?;
        let shortest = Tile::COOP_SHAPES.into_iter().find(|t| fits(size, *t))?.rows;
        let matrices = (Tile::SQUARE.rows * Tile::SQUARE.cols) as u32 / size.pow(2);
        let fewest_subgroups = (WORKGROUP / max_subgroup.min(WORKGROUP)).max(1);
        let per_subgroup = matrices.div_ceil(fewest_subgroups);
        // More accumulators than this would spill registers on any GPU.
        (per_subgroup <= 16).then_some(Self {
            size,
            per_subgroup,
            shortest,
        })
    }

    /// How logs and `ctseg adapters` name it.
    pub fn describe(self) -> String {
        let s = self.size;
        format!("cooperative matrices {s}x{s}x{s} f16->f32")
    }

    /// The WGSL that declares what shaders/gemm_tile_coop.wgsl expects of the adapter.
    fn header(self) -> String {
        let (s, acc) = (self.size, self.per_subgroup);
        format!(
            "enable f16;\nenable wgpu_cooperative_matrix;\n\
             alias CoopA = coop_mat{s}x{s}<f16, A>;\nalias CoopB = coop_mat{s}x{s}<f16, B>;\n\
             alias CoopC = coop_mat{s}x{s}<f32, C>;\nconst CT: u32 = {s}u;\nconst ACC: u32 = {acc}u;\n"
        )
    }
}

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
        // Every tile's grids within the dispatch limit; each may cut the weight gradient into
        // its own number of slices.
        let launchable = |tile| {
            let (slice, _) = s.slices(tile);
            let (f, w) = (s.forward_grid(tile), s.weight_grad_grid(tile));
            [f.0, f.1, w.0, w.1, w.2]
                .into_iter()
                .all(|g| g <= MAX_GROUPS)
                && fits(w.2 * c_out * (c_in * 9 + 1))
                && fits(s.n() + slice)
        };
        let ok = c_in.max(c_out) * 9 <= MAX_LOOP
            && Tile::SHAPES.into_iter().all(launchable)
            && fits(s.n() * c_in.max(c_out));
        ok.then_some(s)
    }

    /// GEMM columns: batch·pixels.
    fn n(&self) -> usize {
        self.batch * self.h * self.w
    }

    /// Columns per weight-gradient slice (a multiple of the kernel's step) and the slice count,
    /// on output `tile`.
    fn slices(&self, tile: Tile) -> (usize, usize) {
        let tiles = (self.c_in * 9 + 1).div_ceil(tile.cols) * self.c_out.div_ceil(tile.rows);
        let n = self.n();
        let wanted = TARGET_WORKGROUPS
            .div_ceil(tiles)
            .clamp(1, n.div_ceil(256).max(1))
            .max(n.div_ceil(MAX_LOOP));
        let slice = n.div_ceil(wanted).div_ceil(STEP) * STEP;
        (slice, n.div_ceil(slice))
    }

    /// The forward kernel's workgroups on `tile`: column tiles × row tiles.
    fn forward_grid(&self, tile: Tile) -> (usize, usize) {
        (self.n().div_ceil(tile.cols), self.c_out.div_ceil(tile.rows))
    }

    /// The weight-gradient kernel's workgroups on `tile`: K tiles × row tiles × slices.
    fn weight_grad_grid(&self, tile: Tile) -> (usize, usize, usize) {
        let k = self.c_in * 9 + 1;
        (
            k.div_ceil(tile.cols),
            self.c_out.div_ceil(tile.rows),
            self.slices(tile).1,
        )
    }

    /// The `info` prefix both GEMM kernels read.
    fn dims(&self) -> [u32; 5] {
        [self.batch, self.c_in, self.c_out, self.h, self.w].map(|v| v as u32)
    }
}

/// Whether [`conv3x3`] runs ctseg's kernels for f32 input `[batch, c_in, h, w]` = `shape` and
/// `c_out` outputs on `device`, decided without computing anything.
pub fn covers(device: &burn::tensor::Device, shape: [usize; 4], c_out: usize) -> bool {
    cube_device(device).is_some()
        && ConvShape::of(shape, [c_out, shape[1], 3, 3], [c_out]).is_some()
}

/// `act(conv3x3_same(x, weight) + bias)` with ctseg's kernels, or `None` where they do not
/// apply: tensors not f32 on a wgpu device (with or without autodiff, all alike), a kernel other
/// than 3×3, or shapes beyond the dispatch grid or 32-bit indexing. Under autodiff the
/// gradients are ctseg's kernels too. With f16 `operands`, every product's two operands
/// (forward and both gradients) are rounded to binary16 and accumulated in f32, as tensor
/// cores compute mixed precision (on the adapter's cooperative matrices with
/// [`Operands::Coop`]); the buffers stay f32.
///
/// # Shapes
/// - `x`: `[batch, c_in, h, w]`, `weight`: `[c_out, c_in, 3, 3]`, `bias`: `[c_out]`
///   → `[batch, c_out, h, w]`
pub fn conv3x3(
    x: &Tensor<4>,
    weight: &Tensor<4>,
    bias: &Tensor<1>,
    relu: bool,
    operands: Operands,
) -> Option<Tensor<4>> {
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
                let tensors = [x.primitive(), w.primitive(), b.primitive()];
                let y = forward(&s, tensors.map(|t| resolve(t.clone())), relu, operands);
                prep.finish((xs, ws, relu.then(|| y.clone()), s, operands), y)
            }
            OpsKind::UnTracked(prep) => {
                let tensors = [x.primitive(), w.primitive(), b.primitive()];
                prep.finish(forward(
                    &s,
                    tensors.map(|t| resolve(t.clone())),
                    relu,
                    operands,
                ))
            }
        };
        return Some(Tensor::from_primitive::<Autodiff<Cube>>(out));
    }
    let tensors = [f32_buffer(x)?, f32_buffer(weight)?, f32_buffer(bias)?];
    Some(Tensor::from_primitive::<Cube>(forward(
        &s, tensors, relu, operands,
    )))
}

/// The forward on contiguous f32 buffers `[x, weight, bias]`, as a fused primitive.
fn forward(s: &ConvShape, tensors: [CubeTensor; 3], relu: bool, operands: Operands) -> Fused {
    let [x, w, b] = tensors;
    let flags = BIAS | if relu { RELU } else { 0 };
    let y = launch_conv(s, &x, &w, &b, &x, flags, operands);
    f32_fused(&x.device, y, &[s.batch, s.c_out, s.h, s.w])
}

#[derive(Debug)]
struct ConvBackward;

impl Backward<Cube, 3> for ConvBackward {
    /// Input and kernel nodes, the output when a ReLU followed the convolution, the shape, and
    /// the operands.
    type State = (NodeId, NodeId, Option<Fused>, ConvShape, Operands);

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, ckpt: &mut Checkpointer) {
        let [node_x, node_w, node_b] = ops.parents;
        let dy = resolve(grads.consume::<Cube>(&ops.node));
        let (xs, ws, relu_out, s, operands) = ops.state;
        // The ReLU's gradient: dy counts where the output is positive (PyTorch: zero at 0).
        let gate = relu_out.map(resolve);
        let x = resolve(ckpt.retrieve_node_output::<Fused>(xs));
        let w = resolve(ckpt.retrieve_node_output::<Fused>(ws));
        let device = x.device.clone();
        if let Some(node) = node_x {
            let flags = MIRRORED | if gate.is_some() { GATE } else { 0 };
            let dx = launch_conv(
                &s.swapped(),
                &dy,
                &w,
                &w,
                gate.as_ref().unwrap_or(&dy),
                flags,
                operands,
            );
            grads.register::<Cube>(
                node.id,
                f32_fused(&device, dx, &[s.batch, s.c_in, s.h, s.w]),
            );
        }
        if node_w.is_some() || node_b.is_some() {
            let (dw, db) = launch_weight_grad(&s, &x, &dy, gate.as_ref(), operands);
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
    operands: Operands,
) -> Handle {
    let y = x.client.empty(s.n() * s.c_out * 4);
    let [b, ci, co, h, wd] = s.dims();
    let flags = flags | if operands.f16() { F16_OPERANDS } else { 0 };
    let tile = operands.tile(s.c_out, |t| {
        let (x, y) = s.forward_grid(t);
        x * y
    });
    let (gx, gy) = s.forward_grid(tile);
    launch(
        &x.client,
        operands.kernels(tile)[0],
        grid(gx, gy, 1),
        &[&x.handle, &w.handle, &bias.handle, &y, &gate.handle],
        &[b, ci, co, h, wd, flags],
    );
    y
}

/// shaders/conv3x3_weight_grad.wgsl and shaders/sum_slices.wgsl: the weight gradient
/// `[c_out, c_in, 3, 3]` and the bias gradient `[c_out]` for input `x` and output gradient
/// `dy`, gated by `gate > 0` when given, multiplied as `operands` says.
fn launch_weight_grad(
    s: &ConvShape,
    x: &CubeTensor,
    dy: &CubeTensor,
    gate: Option<&CubeTensor>,
    operands: Operands,
) -> (Handle, Handle) {
    let client = &x.client;
    let tile = operands.tile(s.c_out, |t| {
        let (x, y, z) = s.weight_grad_grid(t);
        x * y * z
    });
    let (slice, _) = s.slices(tile);
    let (gx, gy, slices) = s.weight_grad_grid(tile);
    let k = s.c_in * 9;
    let part = client.empty(slices * s.c_out * (k + 1) * 4);
    let [b, ci, co, h, wd] = s.dims();
    launch(
        &x.client,
        operands.kernels(tile)[1],
        grid(gx, gy, slices),
        &[&x.handle, &dy.handle, &gate.unwrap_or(dy).handle, &part],
        &[
            b,
            ci,
            co,
            h,
            wd,
            slice as u32,
            u32::from(gate.is_some()) | (u32::from(operands.f16()) << 1),
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
            for tile in Tile::SHAPES {
                let (slice, slices) = s.slices(tile);
                assert_eq!(slice % STEP, 0);
                assert!(slice * slices >= s.n());
                assert!(slice / STEP <= 16_384, "{slice}");
            }
        }
    }

    #[test]
    fn gemms_of_at_most_32_rows_get_32_row_tiles_where_memory_allows() {
        let few = |_| 1;
        for operands in [Operands::F32, Operands::F16] {
            assert_eq!(operands.tile(1, few), Tile::SHORT);
            assert_eq!(operands.tile(32, few), Tile::SHORT);
            assert_eq!(operands.tile(33, few), Tile::SQUARE);
            assert_eq!(operands.tile(1024, few), Tile::SQUARE);
        }
        for tile in Tile::SHAPES {
            // 256 invocations' blocks make the tile.
            assert_eq!(tile.rows * tile.cols, 256 * tile.block * tile.block);
        }
        // An adapter whose workgroup memory holds only the 64-row scratch block.
        let tall_only = CoopTile {
            size: 16,
            per_subgroup: 2,
            shortest: 64,
        };
        assert_eq!(Operands::Coop(tall_only).tile(16, few), Tile::SQUARE);
        let both = CoopTile {
            shortest: 32,
            ..tall_only
        };
        assert_eq!(Operands::Coop(both).tile(16, few), Tile::SHORT);
    }

    #[test]
    fn gemms_of_more_than_64_rows_get_128_row_tiles_when_those_fill_the_gpu() {
        let enough = |t: Tile| if t == Tile::LARGE { 256 } else { 4096 };
        let too_few = |t: Tile| if t == Tile::LARGE { 255 } else { 4096 };
        for operands in [Operands::F32, Operands::F16] {
            assert_eq!(operands.tile(65, enough), Tile::LARGE);
            assert_eq!(operands.tile(1024, enough), Tile::LARGE);
            assert_eq!(operands.tile(64, enough), Tile::SQUARE);
            assert_eq!(operands.tile(1024, too_few), Tile::SQUARE);
        }
        // Cooperative matrices cover tiles of 4,096 values only.
        let coop = Operands::Coop(CoopTile {
            size: 16,
            per_subgroup: 2,
            shortest: 32,
        });
        assert_eq!(coop.tile(1024, enough), Tile::SQUARE);
        // livermask at width 64, batch 30: the 128-channel level at 120² fills 128 x 128 tiles
        // in all three GEMMs; the bottleneck at 15², batch 4, launches too few of them.
        let s = ConvShape::of([30, 128, 120, 120], [128, 128, 3, 3], [128]).expect("covered");
        assert_eq!(s.forward_grid(Tile::LARGE), (3375, 1));
        assert_eq!(s.weight_grad_grid(Tile::LARGE), (10, 1, 103));
        let s = ConvShape::of([4, 512, 15, 15], [1024, 512, 3, 3], [1024]).expect("covered");
        assert_eq!(s.forward_grid(Tile::LARGE), (8, 8));
    }

    #[test]
    fn cooperative_tiles_cover_the_output_tile_on_each_adapter() {
        let coop = |sizes: &[u32], subgroup: u32, bytes: u32| {
            CoopTile::choose(sizes, true, true, subgroup, bytes)
        };
        // lavapipe (Mesa 26): 8x8x8 only, subgroups of 8: 32 subgroups for 64 matrices.
        let lavapipe = coop(&[8], 8, 65_536);
        assert_eq!(lavapipe.map(|t| (t.size, t.per_subgroup)), Some((8, 2)));
        // NVIDIA: 16 preferred; 8 subgroups of 32 for 16 matrices. AMD GCN: 4 of 64.
        assert_eq!(coop(&[8, 16], 32, 49_152).map(|t| t.per_subgroup), Some(2));
        assert_eq!(coop(&[16], 64, 65_536).map(|t| t.per_subgroup), Some(4));
        // 22 KiB of workgroup memory hold the scratch block for products of 8, not of 16.
        assert_eq!(coop(&[8, 16], 32, 22_528).map(|t| t.size), Some(8));
        // A 32 x 128 tile's scratch block of 16 rows needs 29 KiB (NVIDIA has 48); with 24 KiB
        // only 64-row tiles fit.
        assert_eq!(coop(&[16], 32, 49_152).map(|t| t.shortest), Some(32));
        assert_eq!(coop(&[16], 32, 29_696).map(|t| t.shortest), Some(32));
        assert_eq!(coop(&[16], 32, 24_576).map(|t| t.shortest), Some(64));
        // One subgroup of 128 for 64 matrices of 8 would need 32 accumulators each.
        assert_eq!(coop(&[8], 128, 65_536), None);
        // Too little workgroup memory, or no size WGSL names.
        assert_eq!(coop(&[16], 32, 16_384), None);
        assert_eq!(coop(&[32], 32, 49_152), None);
        // No f16 in shaders, or no subgroup ids.
        assert_eq!(CoopTile::choose(&[16], false, true, 32, 49_152), None);
        assert_eq!(CoopTile::choose(&[16], true, false, 32, 49_152), None);
    }

    #[test]
    fn convolution_kernels_compile_to_spirv_for_every_cooperative_shape() {
        // What wgpu does with a kernel on a Vulkan adapter (naga: parse, validate with the
        // adapter's capabilities, write SPIR-V), for the register kernels and for each
        // cooperative-matrix configuration CoopTile::choose can return, so the 16x16 shapes
        // (NVIDIA's) are compiled here too, not only lavapipe's 8x8.
        use naga::valid::{Capabilities, ValidationFlags, Validator};
        let caps = Capabilities::SHADER_FLOAT16
            | Capabilities::SUBGROUP
            | Capabilities::COOPERATIVE_MATRIX;
        let mut sources = vec![SUM_SLICES];
        for tile in Tile::SHAPES {
            sources.extend(super::sources(None, tile));
        }
        for tile in Tile::COOP_SHAPES {
            for (size, per_subgroup) in [(8, 2), (8, 16), (16, 1), (16, 2), (16, 4)] {
                let coop = CoopTile {
                    size,
                    per_subgroup,
                    shortest: tile.rows,
                };
                sources.extend(super::sources(Some(coop), tile));
            }
        }
        for source in sources {
            let name = [
                source.lines().find(|l| l.starts_with("alias CoopC")),
                source.lines().find(|l| l.starts_with("const TILE_ROWS")),
            ];
            let module = naga::front::wgsl::parse_str(source)
                .unwrap_or_else(|e| panic!("{name:?}: {}", e.emit_to_string(source)));
            let info = Validator::new(ValidationFlags::all(), caps)
                .validate(&module)
                .unwrap_or_else(|e| panic!("{name:?}: {}", e.emit_to_string(source)));
            let spv = naga::back::spv::write_vec(
                &module,
                &info,
                &naga::back::spv::Options::default(),
                None,
            )
            .unwrap_or_else(|e| panic!("{name:?}: {e}"));
            assert!(spv.len() > 100, "{name:?}");
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
