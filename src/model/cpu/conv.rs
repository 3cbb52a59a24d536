//! Convolutions for the CPU backend: 'same'-padded, stride-1, k×k (odd k) convolutions — forward,
//! weight, bias and input gradients — as tiled im2col + `gemm` products, registered with burn's
//! autodiff as one operation.
//!
//! Why: burn's generic convolution backward (which flex uses) computes the weight gradient as a
//! convolution of the input by the output gradient used as an H×W kernel, a matrix product with
//! k² = 9 output rows that wastes most of every AVX-512 vector, and the input gradient as a
//! transposed convolution with a col2im pass; together they were the largest item of a training
//! step's profile (docs/cpu-notes.md). Here, per image and per tile of whole output rows:
//! - forward: `Y[c_out, n] = W[c_out, c_in·k²] · col(X)[c_in·k², n] + b`;
//! - weight gradient: `dW += dY[c_out, n] · col(X)[c_in·k², n]ᵀ`, summed over runs of tiles
//!   whose split depends only on the shape, so a result depends neither on thread scheduling
//!   nor on the thread count;
//! - input gradient: the forward convolution of `dY` by the kernel with its channel axes swapped
//!   and its taps mirrored (exact for stride 1 and symmetric padding k/2);
//! - bias gradient: the sum of `dY` over batch and pixels.
//!
//! Every path is tested against a direct float64 evaluation of the definition and against burn's
//! own `conv2d` (tests below); the model-level parity with PyTorch is in tests/torch_parity.rs.

use std::cell::RefCell;

use burn::tensor::Tensor;
use burn_dispatch::backends::autodiff::NodeId;
use burn_dispatch::backends::autodiff::checkpoint::base::Checkpointer;
use burn_dispatch::backends::autodiff::checkpoint::strategy::NoCheckpointing;
use burn_dispatch::backends::autodiff::grads::Gradients;
use burn_dispatch::backends::autodiff::ops::{Backward, Ops, OpsKind};
use burn_dispatch::backends::flex::FlexTensor;
use burn_dispatch::backends::{Autodiff, Flex};
use rayon::prelude::*;

use super::{FlexOperands, f32_values, flex, flex_operand, flex_operands};

/// Shape of one convolution: input `[batch, c_in, h, w]`, kernel `[c_out, c_in, k, k]`, output
/// `[batch, c_out, h, w]` (padding k/2 on every side, stride 1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvShape {
    /// Images.
    pub batch: usize,
    /// Input channels.
    pub c_in: usize,
    /// Output channels.
    pub c_out: usize,
    /// Rows.
    pub h: usize,
    /// Columns.
    pub w: usize,
    /// Kernel size (odd).
    pub k: usize,
}

impl ConvShape {
    fn pad(&self) -> usize {
        self.k / 2
    }

    fn hw(&self) -> usize {
        self.h * self.w
    }

    /// Length of one im2col column: `c_in · k²`.
    fn kdim(&self) -> usize {
        self.c_in * self.k * self.k
    }

    /// The same convolution seen from its input gradient: channels swapped.
    pub(crate) fn swapped(&self) -> Self {
        Self {
            c_in: self.c_out,
            c_out: self.c_in,
            ..*self
        }
    }

    /// Output rows per tile: about [`TILE_COLS`] output pixels, whole rows.
    fn tile_rows(&self) -> usize {
        TILE_COLS.div_ceil(self.w).clamp(1, self.h)
    }

    /// The work items: (image, first row, rows), in a fixed order.
    fn tiles(&self) -> Vec<(usize, usize, usize)> {
        let rows = self.tile_rows();
        let mut t = Vec::new();
        for b in 0..self.batch {
            let mut r0 = 0;
            while r0 < self.h {
                let n = rows.min(self.h - r0);
                t.push((b, r0, n));
                r0 += n;
            }
        }
        t
    }
}

/// Target output pixels per tile (whole rows, so at least one row). Measured with
/// `cargo bench --bench conv` on livermask's layers at batch 4, 2 threads: of 128, 256, 512,
/// 1024, 2048, 8192 and whole images, 128–1024 were within the run-to-run noise of each other
/// and whole images were up to 1.7× slower at 240² (the im2col tile leaves the cache).
pub const TILE_COLS: usize = 256;

thread_local! {
    /// Per-thread im2col buffer, reused across tiles and calls (no allocation or page faults
    /// per tile).
    static COLS: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// A raw pointer that tasks writing disjoint parts of one buffer may share.
#[derive(Clone, Copy)]
struct SharedMut(*mut f32);
// SAFETY: every task writes a disjoint range through it (see the callers).
unsafe impl Send for SharedMut {}
unsafe impl Sync for SharedMut {}

/// Fills `col` (`[c_in·k², rows·w]`, row-major) with the receptive fields of output rows
/// `r0 .. r0+rows` of one image `x` (`[c_in, h, w]`); taps outside the image are zero.
fn im2col_rows(x: &[f32], s: &ConvShape, r0: usize, rows: usize, col: &mut [f32]) {
    let (h, w, k, p) = (s.h, s.w, s.k, s.pad());
    let n = rows * w;
    for ci in 0..s.c_in {
        let plane = &x[ci * h * w..(ci + 1) * h * w];
        for ky in 0..k {
            for kx in 0..k {
                let dst = &mut col[((ci * k + ky) * k + kx) * n..][..n];
                for rr in 0..rows {
                    let d = &mut dst[rr * w..(rr + 1) * w];
                    let y = (r0 + rr + ky) as isize - p as isize;
                    if y < 0 || y >= h as isize {
                        d.fill(0.0);
                        continue;
                    }
                    let src = &plane[y as usize * w..(y as usize + 1) * w];
                    // d[c] = src[c + shift]
                    let shift = kx as isize - p as isize;
                    if shift >= 0 {
                        let sh = (shift as usize).min(w);
                        d[..w - sh].copy_from_slice(&src[sh..]);
                        d[w - sh..].fill(0.0);
                    } else {
                        let sh = ((-shift) as usize).min(w);
                        d[..sh].fill(0.0);
                        d[sh..].copy_from_slice(&src[..w - sh]);
                    }
                }
            }
        }
    }
}

/// Runs `f` with this thread's im2col buffer of at least `len` values.
fn with_cols<R>(len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    COLS.with(|c| {
        let mut buf = c.borrow_mut();
        if buf.len() < len {
            buf.resize(len, 0.0);
        }
        f(&mut buf[..len])
    })
}

/// Calls `f(b, r0, rows, cols)` with `cols` the tile's im2col matrix as (pointer, row stride):
/// for k = 1 the input itself (no copy), otherwise this thread's filled buffer.
fn with_tile_cols<R>(
    x: &[f32],
    s: &ConvShape,
    (b, r0, rows): (usize, usize, usize),
    f: impl FnOnce(*const f32, isize) -> R,
) -> R {
    let img = &x[b * s.c_in * s.hw()..(b + 1) * s.c_in * s.hw()];
    if s.k == 1 {
        return f(img[r0 * s.w..].as_ptr(), s.hw() as isize);
    }
    let n = rows * s.w;
    with_cols(s.kdim() * n, |col| {
        im2col_rows(img, s, r0, rows, col);
        f(col.as_ptr(), n as isize)
    })
}

/// Forward convolution: `x` `[batch, c_in, h, w]`, `weight` `[c_out, c_in, k, k]`, optional
/// `bias` `[c_out]` → `[batch, c_out, h, w]`, all contiguous row-major f32.
pub fn forward(x: &[f32], weight: &[f32], bias: Option<&[f32]>, s: &ConvShape) -> Vec<f32> {
    forward_act(x, weight, bias, s, false)
}

/// [`forward`], followed by `max(0, ·)` when `relu` (applied per tile while it is in cache).
pub fn forward_act(
    x: &[f32],
    weight: &[f32],
    bias: Option<&[f32]>,
    s: &ConvShape,
    relu: bool,
) -> Vec<f32> {
    assert_eq!(x.len(), s.batch * s.c_in * s.hw(), "conv input size");
    assert_eq!(weight.len(), s.c_out * s.kdim(), "conv kernel size");
    let hw = s.hw();
    let mut y = vec![0.0f32; s.batch * s.c_out * hw];
    let out = SharedMut(y.as_mut_ptr());
    s.tiles().into_par_iter().for_each(|tile| {
        let (b, r0, rows) = tile;
        let n = rows * s.w;
        with_tile_cols(x, s, tile, |col, col_rs| {
            let dst = out;
            // SAFETY: the destination is rows r0..r0+rows of image b for every output channel,
            // a range no other tile touches; `col` holds kdim × n values with row stride
            // `col_rs`; `weight` is c_out × kdim row-major.
            unsafe {
                let d = dst.0.add(b * s.c_out * hw + r0 * s.w);
                gemm::gemm(
                    s.c_out,
                    n,
                    s.kdim(),
                    d,
                    1,
                    hw as isize,
                    false,
                    weight.as_ptr(),
                    1,
                    s.kdim() as isize,
                    col,
                    1,
                    col_rs,
                    0.0f32,
                    1.0f32,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                );
                for co in 0..s.c_out {
                    let row = std::slice::from_raw_parts_mut(d.add(co * hw), n);
                    let bv = bias.map_or(0.0, |b| b[co]);
                    match (bias.is_some(), relu) {
                        (true, true) => row.iter_mut().for_each(|v| *v = (*v + bv).max(0.0)),
                        (true, false) => row.iter_mut().for_each(|v| *v += bv),
                        (false, true) => row.iter_mut().for_each(|v| *v = v.max(0.0)),
                        (false, false) => {}
                    }
                }
            }
        });
    });
    y
}

/// Runs of tiles the weight gradient is summed in: up to 16 (enough work for 16 threads), and
/// no more than keep 16 M partial-sum values (64 MB) alive at once.
fn grad_runs(s: &ConvShape) -> usize {
    let per = (s.c_out * s.kdim()).max(1);
    16.min((16 << 20) / per).max(1)
}

/// Splits `tiles` into `groups` contiguous runs of nearly equal length.
fn split(tiles: &[(usize, usize, usize)], groups: usize) -> Vec<&[(usize, usize, usize)]> {
    let g = groups.clamp(1, tiles.len().max(1));
    let per = tiles.len().div_ceil(g).max(1);
    tiles.chunks(per).collect()
}

/// Weight and bias gradients: `x` `[batch, c_in, h, w]`, `dy` `[batch, c_out, h, w]` →
/// (`[c_out, c_in, k, k]`, `[c_out]`). The tiles are split into [`grad_runs`] contiguous runs,
/// a number that depends on the shape only; each run sums its tiles in order and the runs' sums
/// are added in order, so the result is the same for every thread count and schedule (the MPI
/// tests compare models trained with different thread counts bit for bit).
pub fn weight_bias_grad(x: &[f32], dy: &[f32], s: &ConvShape) -> (Vec<f32>, Vec<f32>) {
    assert_eq!(x.len(), s.batch * s.c_in * s.hw(), "conv input size");
    assert_eq!(
        dy.len(),
        s.batch * s.c_out * s.hw(),
        "conv output-gradient size"
    );
    let (hw, kd) = (s.hw(), s.kdim());
    let tiles = s.tiles();
    let runs = split(&tiles, grad_runs(s));
    // Too few runs to keep the threads busy (large kernels): each run's rows of dW are split
    // into row blocks, each summed over all of the run's tiles (im2col redone per block, cheap
    // next to c_out/blocks rows of products).
    let blocks = if runs.len() < 4 && s.c_out >= 64 {
        4
    } else {
        1
    };
    let block_rows = s.c_out.div_ceil(blocks);
    // With few output channels, dW is accumulated column-major: gemm then leaves the im2col
    // tile unpacked (it packs only the thin dY block), where a row-major dW makes it repack the
    // whole tile per call; measured with `cargo bench --bench conv` (see COL_MAJOR_MAX_COUT).
    let col_major = s.c_out <= COL_MAJOR_MAX_COUT;
    let partials: Vec<(Vec<f32>, Vec<f32>)> = runs
        .into_par_iter()
        .map(|run| {
            let mut db = vec![0.0f64; s.c_out];
            for &(b, r0, rows) in run {
                let g = &dy[b * s.c_out * hw..(b + 1) * s.c_out * hw];
                for (co, acc) in db.iter_mut().enumerate() {
                    *acc += g[co * hw + r0 * s.w..][..rows * s.w]
                        .iter()
                        .map(|&v| v as f64)
                        .sum::<f64>();
                }
            }
            let mut dw = vec![0.0f32; s.c_out * kd];
            let dst = SharedMut(dw.as_mut_ptr());
            let (d_rs, d_cs) = if col_major { (1, s.c_out) } else { (kd, 1) };
            (0..s.c_out.div_ceil(block_rows))
                .into_par_iter()
                .for_each(|blk| {
                    let co0 = blk * block_rows;
                    let m = block_rows.min(s.c_out - co0);
                    for &tile in run {
                        let (b, r0, rows) = tile;
                        let n = rows * s.w;
                        let g = &dy[(b * s.c_out + co0) * hw..];
                        // The whole wrapper (Send), not its raw-pointer field, into the closure.
                        let out = dst;
                        with_tile_cols(x, s, tile, |col, col_rs| {
                            // SAFETY: this block writes only rows co0..co0+m of dw (c_out ×
                            // kdim, row stride d_rs, column stride d_cs), which no other block
                            // touches; the lhs is m rows of n values (row stride hw) inside
                            // `dy`; the rhs is colᵀ: n × kdim with row stride 1 and column
                            // stride col_rs.
                            unsafe {
                                gemm::gemm(
                                    m,
                                    kd,
                                    n,
                                    out.0.add(co0 * d_rs),
                                    d_cs as isize,
                                    d_rs as isize,
                                    true,
                                    g[r0 * s.w..].as_ptr(),
                                    1,
                                    hw as isize,
                                    col,
                                    col_rs,
                                    1,
                                    1.0f32,
                                    1.0f32,
                                    false,
                                    false,
                                    false,
                                    gemm::Parallelism::None,
                                );
                            }
                        });
                    }
                });
            (dw, db.into_iter().map(|v| v as f32).collect())
        })
        .collect();
    let mut it = partials.into_iter();
    let (mut dw, mut db) = it
        .next()
        .unwrap_or_else(|| (vec![0.0; s.c_out * kd], vec![0.0; s.c_out]));
    for (pw, pb) in it {
        dw.iter_mut().zip(&pw).for_each(|(a, b)| *a += b);
        db.iter_mut().zip(&pb).for_each(|(a, b)| *a += b);
    }
    if col_major {
        let cm = dw;
        dw = vec![0.0f32; cm.len()];
        for (k, col) in cm.chunks(s.c_out).enumerate() {
            for (co, &v) in col.iter().enumerate() {
                dw[co * kd + k] = v;
            }
        }
    }
    (dw, db)
}

/// Largest output-channel count for which the weight gradient is accumulated column-major.
pub const COL_MAJOR_MAX_COUT: usize = 64;

/// Input gradient: `dy` `[batch, c_out, h, w]`, `weight` `[c_out, c_in, k, k]` →
/// `[batch, c_in, h, w]`, as the forward convolution of `dy` by `W'[ci, co, ky, kx] =
/// W[co, ci, k−1−ky, k−1−kx]`.
pub fn input_grad(dy: &[f32], weight: &[f32], s: &ConvShape) -> Vec<f32> {
    let k = s.k;
    let mut wt = vec![0.0f32; weight.len()];
    for co in 0..s.c_out {
        for ci in 0..s.c_in {
            for ky in 0..k {
                for kx in 0..k {
                    wt[((ci * s.c_out + co) * k + (k - 1 - ky)) * k + (k - 1 - kx)] =
                        weight[((co * s.c_in + ci) * k + ky) * k + kx];
                }
            }
        }
    }
    forward(dy, &wt, None, &s.swapped())
}

// ---------------------------------------------------------------------------------------------
// burn glue
// ---------------------------------------------------------------------------------------------

fn shape_of(x: &FlexTensor, w: &FlexTensor) -> ConvShape {
    let (xs, ws) = (x.layout().shape(), w.layout().shape());
    ConvShape {
        batch: xs[0],
        c_in: xs[1],
        c_out: ws[0],
        h: xs[2],
        w: xs[3],
        k: ws[2],
    }
}

/// A product's operand: its values, rounded to f16 with `f16_operands` (mixed precision's
/// numerics, the reference of the GPU kernels' `round_f16`).
fn operand(t: &FlexTensor, f16_operands: bool) -> std::borrow::Cow<'_, [f32]> {
    let v = f32_values(t);
    if f16_operands {
        std::borrow::Cow::Owned(crate::fp16::round_to_f16(&v))
    } else {
        v
    }
}

fn forward_flex(
    x: &FlexTensor,
    w: &FlexTensor,
    b: &FlexTensor,
    relu: bool,
    f16_operands: bool,
) -> FlexTensor {
    let s = shape_of(x, w);
    let y = forward_act(
        &operand(x, f16_operands),
        &operand(w, f16_operands),
        Some(&f32_values(b)),
        &s,
        relu,
    );
    flex(y, vec![s.batch, s.c_out, s.h, s.w])
}

#[derive(Debug)]
struct ConvBackward;

impl Backward<Flex, 3> for ConvBackward {
    /// Input and kernel nodes, the output when a ReLU followed the convolution, and whether
    /// the products' operands are rounded to f16.
    type State = (NodeId, NodeId, Option<FlexTensor>, bool);

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, ckpt: &mut Checkpointer) {
        let [node_x, node_w, node_b] = ops.parents;
        let dy = grads.consume::<Flex>(&ops.node);
        let (xs, ws, relu_out, f16_operands) = ops.state;
        let x = ckpt.retrieve_node_output::<FlexTensor>(xs);
        let w = ckpt.retrieve_node_output::<FlexTensor>(ws);
        let s = shape_of(&x, &w);
        let mut dyv = f32_values(&dy);
        if let Some(y) = relu_out {
            // Through the ReLU: the gradient passes where the output is positive.
            dyv = std::borrow::Cow::Owned(relu_masked(&dyv, &f32_values(&y)));
        }
        if f16_operands {
            dyv = std::borrow::Cow::Owned(crate::fp16::round_to_f16(&dyv));
        }
        if let Some(node) = node_x {
            let dx = input_grad(&dyv, &operand(&w, f16_operands), &s);
            grads.register::<Flex>(node.id, flex(dx, vec![s.batch, s.c_in, s.h, s.w]));
        }
        if node_w.is_some() || node_b.is_some() {
            let (dw, db) = weight_bias_grad(&operand(&x, f16_operands), &dyv, &s);
            if let Some(node) = node_w {
                grads.register::<Flex>(node.id, flex(dw, vec![s.c_out, s.c_in, s.k, s.k]));
            }
            if let Some(node) = node_b {
                grads.register::<Flex>(node.id, flex(db, vec![s.c_out]));
            }
        }
    }
}

/// `g` where `y > 0`, else 0 (PyTorch's ReLU gradient: zero at 0), in one pass.
fn relu_masked(g: &[f32], y: &[f32]) -> Vec<f32> {
    let mut out = vec![0.0f32; g.len()];
    out.par_chunks_mut(1 << 14)
        .zip(g.par_chunks(1 << 14).zip(y.par_chunks(1 << 14)))
        .for_each(|(o, (g, y))| {
            for ((o, &g), &y) in o.iter_mut().zip(g).zip(y) {
                *o = if y > 0.0 { g } else { 0.0 };
            }
        });
    out
}

/// A 'same'-padded, stride-1 convolution with bias, followed by a ReLU when `relu` (fused into
/// the convolution's tiles, and its gradient mask into the backward), as one autodiff
/// operation: `Some` when the tensors are f32 on the flex device (with or without autodiff) and
/// the kernel is square and odd; `None` otherwise (the portable path in [`crate::model::ops`]).
/// With `f16_operands`, every product's operands (forward and both gradients) are rounded to
/// f16 and accumulated in f32: mixed precision's numerics, the reference the GPU's
/// mixed-precision kernels are checked against (src/verify.rs).
///
/// # Shapes
/// - `x`: `[batch, c_in, h, w]`, `weight`: `[c_out, c_in, k, k]` (k odd), `bias`: `[c_out]`
///   → `[batch, c_out, h, w]`
pub fn conv2d_same(
    x: &Tensor<4>,
    weight: &Tensor<4>,
    bias: &Tensor<1>,
    relu: bool,
    f16_operands: bool,
) -> Option<Tensor<4>> {
    let [_, c_in, _, _] = x.dims();
    let [_, wc, kh, kw] = weight.dims();
    if wc != c_in || kh != kw || kh % 2 == 0 {
        return None;
    }
    match flex_operands([flex_operand(x), flex_operand(weight), flex_operand(bias)])? {
        FlexOperands::Autodiff([x, w, b]) => {
            let nodes = [x.node(), w.node(), b.node()];
            let out = match ConvBackward
                .prepare::<NoCheckpointing>(nodes)
                .compute_bound()
                .stateful()
            {
                OpsKind::Tracked(mut prep) => {
                    let xs = prep.checkpoint(&x);
                    let ws = prep.checkpoint(&w);
                    let (xp, wp, bp) = (x.primitive(), w.primitive(), b.primitive());
                    let y = forward_flex(xp, wp, bp, relu, f16_operands);
                    prep.finish((xs, ws, relu.then(|| y.clone()), f16_operands), y)
                }
                OpsKind::UnTracked(prep) => {
                    let (xp, wp, bp) = (x.primitive(), w.primitive(), b.primitive());
                    prep.finish(forward_flex(xp, wp, bp, relu, f16_operands))
                }
            };
            Some(Tensor::from_primitive::<Autodiff<Flex>>(out))
        }
        FlexOperands::Plain([x, w, b]) => Some(Tensor::from_primitive::<Flex>(forward_flex(
            &x,
            &w,
            &b,
            relu,
            f16_operands,
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::module::conv2d;
    use burn::tensor::ops::ConvOptions;
    use burn::tensor::{Device, TensorData};

    /// The definition, in float64: y[b,o,i,j] = bias[o] + Σ_{c,u,v} w[o,c,u,v]·x[b,c,i+u−p,j+v−p].
    fn direct(x: &[f32], w: &[f32], bias: &[f32], s: &ConvShape) -> Vec<f64> {
        let (h, wd, k, p) = (s.h as isize, s.w as isize, s.k, s.pad() as isize);
        let mut y = vec![0.0f64; s.batch * s.c_out * s.hw()];
        for b in 0..s.batch {
            for o in 0..s.c_out {
                for i in 0..h {
                    for j in 0..wd {
                        let mut acc = bias[o] as f64;
                        for c in 0..s.c_in {
                            for u in 0..k {
                                for v in 0..k {
                                    let (yy, xx) = (i + u as isize - p, j + v as isize - p);
                                    if yy < 0 || yy >= h || xx < 0 || xx >= wd {
                                        continue;
                                    }
                                    let xi = ((b * s.c_in + c) as isize * h + yy) * wd + xx;
                                    acc += w[((o * s.c_in + c) * k + u) * k + v] as f64
                                        * x[xi as usize] as f64;
                                }
                            }
                        }
                        y[((b * s.c_out + o) as isize * h + i) as usize * s.w + j as usize] = acc;
                    }
                }
            }
        }
        y
    }

    fn values(n: usize, salt: usize) -> Vec<f32> {
        (0..n)
            .map(|i| (((i * 7919 + salt * 104_729) % 193) as f32 / 193.0) - 0.5)
            .collect()
    }

    fn max_rel(a: &[f32], b: &[f64]) -> f64 {
        let scale = b.iter().fold(0.0f64, |m, v| m.max(v.abs())).max(1e-30);
        a.iter()
            .zip(b)
            .fold(0.0f64, |m, (p, q)| m.max((*p as f64 - q).abs()))
            / scale
    }

    /// Shapes that exercise whole-image and multi-tile paths, k = 1 and 3, and widths below k.
    fn shapes() -> Vec<ConvShape> {
        vec![
            // One tile, c_out ≥ 64: the weight gradient is split into row blocks (18, 18, 18, 16).
            ConvShape {
                batch: 1,
                c_in: 2,
                c_out: 70,
                h: 5,
                w: 5,
                k: 3,
            },
            ConvShape {
                batch: 2,
                c_in: 3,
                c_out: 5,
                h: 7,
                w: 6,
                k: 3,
            },
            ConvShape {
                batch: 3,
                c_in: 4,
                c_out: 2,
                h: 70,
                w: 40,
                k: 3,
            },
            ConvShape {
                batch: 2,
                c_in: 6,
                c_out: 3,
                h: 5,
                w: 9,
                k: 1,
            },
            ConvShape {
                batch: 1,
                c_in: 2,
                c_out: 3,
                h: 3,
                w: 1,
                k: 3,
            },
            ConvShape {
                batch: 1,
                c_in: 2,
                c_out: 2,
                h: 4,
                w: 4,
                k: 5,
            },
        ]
    }

    /// Forward, and all three gradients of L = Σ y·g for a fixed g, against the definition
    /// evaluated in float64 (gradients by the same definition: dL/dw[o,c,u,v] =
    /// Σ g[b,o,i,j]·x[b,c,i+u−p,j+v−p], dL/dx by the adjoint sum, dL/db[o] = Σ g[b,o,·,·]).
    #[test]
    fn kernels_match_the_definition_in_float64() {
        for s in shapes() {
            let (k, p) = (s.k, s.pad() as isize);
            let x = values(s.batch * s.c_in * s.hw(), 1);
            let w = values(s.c_out * s.kdim(), 2);
            let bias = values(s.c_out, 3);
            let g = values(s.batch * s.c_out * s.hw(), 4);
            let y = forward(&x, &w, Some(&bias), &s);
            let e = max_rel(&y, &direct(&x, &w, &bias, &s));
            assert!(e < 1e-6, "{s:?}: forward max rel error {e:e}");

            let (h, wd) = (s.h as isize, s.w as isize);
            let mut dw = vec![0.0f64; w.len()];
            let mut dx = vec![0.0f64; x.len()];
            let mut db = vec![0.0f64; s.c_out];
            for b in 0..s.batch {
                for o in 0..s.c_out {
                    for i in 0..h {
                        for j in 0..wd {
                            let gv = g
                                [((b * s.c_out + o) as isize * h + i) as usize * s.w + j as usize]
                                as f64;
                            db[o] += gv;
                            for c in 0..s.c_in {
                                for u in 0..k {
                                    for v in 0..k {
                                        let (yy, xx) = (i + u as isize - p, j + v as isize - p);
                                        if yy < 0 || yy >= h || xx < 0 || xx >= wd {
                                            continue;
                                        }
                                        let xi = (((b * s.c_in + c) as isize * h + yy) * wd + xx)
                                            as usize;
                                        let wi = ((o * s.c_in + c) * k + u) * k + v;
                                        dw[wi] += gv * x[xi] as f64;
                                        dx[xi] += gv * w[wi] as f64;
                                    }
                                }
                            }
                        }
                    }
                }
            }
            let (gw, gb) = weight_bias_grad(&x, &g, &s);
            let gx = input_grad(&g, &w, &s);
            for (name, got, want) in [("dW", &gw, &dw), ("db", &gb, &db), ("dX", &gx, &dx)] {
                let e = max_rel(got, want);
                assert!(e < 1e-5, "{s:?}: {name} max rel error {e:e}");
            }
        }
    }

    /// The results do not depend on the thread count: the MPI tests compare, bit for bit,
    /// models trained by ranks with different numbers of threads.
    #[test]
    fn results_do_not_depend_on_the_thread_count() {
        for s in shapes() {
            let x = values(s.batch * s.c_in * s.hw(), 9);
            let w = values(s.c_out * s.kdim(), 10);
            let g = values(s.batch * s.c_out * s.hw(), 11);
            let all = |threads: usize| {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .unwrap();
                pool.install(|| {
                    (
                        forward(&x, &w, None, &s),
                        weight_bias_grad(&x, &g, &s),
                        input_grad(&g, &w, &s),
                    )
                })
            };
            let one = all(1);
            for t in [2, 3, 5] {
                assert!(all(t) == one, "{s:?}: {t} threads differ from 1");
            }
        }
    }

    /// Through burn's autodiff on the CPU device: the output and the gradients of x, weight and
    /// bias equal those of burn's own `conv2d` (flex forward, burn's generic backward) to float
    /// rounding, with and without a fused ReLU (against burn's `relu`); without autodiff the
    /// forward equals too.
    #[test]
    fn autodiff_op_matches_burn_conv2d() {
        let s = ConvShape {
            batch: 2,
            c_in: 5,
            c_out: 4,
            h: 33,
            w: 40,
            k: 3,
        };
        let device = Device::flex().autodiff();
        let xv = values(s.batch * s.c_in * s.hw(), 5);
        let wv = values(s.c_out * s.kdim(), 6);
        let bv = values(s.c_out, 7);
        let gv = values(s.batch * s.c_out * s.hw(), 8);
        let run = |ours: bool, relu: bool| {
            let x = Tensor::<4>::from_data(
                TensorData::new(xv.clone(), [s.batch, s.c_in, s.h, s.w]),
                &device,
            )
            .require_grad();
            let w = Tensor::<4>::from_data(
                TensorData::new(wv.clone(), [s.c_out, s.c_in, 3, 3]),
                &device,
            )
            .require_grad();
            let b = Tensor::<1>::from_data(TensorData::new(bv.clone(), [s.c_out]), &device)
                .require_grad();
            let g = Tensor::<4>::from_data(
                TensorData::new(gv.clone(), [s.batch, s.c_out, s.h, s.w]),
                &device,
            );
            let y = if ours {
                conv2d_same(&x, &w, &b, relu, false)
                    .expect("the autodiff CPU device takes the cpuconv path")
            } else {
                let y = conv2d(
                    x.clone(),
                    w.clone(),
                    Some(b.clone()),
                    ConvOptions::new([1, 1], [1, 1], [1, 1], 1),
                );
                if relu {
                    burn::tensor::activation::relu(y)
                } else {
                    y
                }
            };
            let grads = (y.clone() * g).sum().backward();
            let v = |t: Tensor<4>| t.into_data().try_to_vec::<f32>().unwrap();
            (
                v(y.without_autodiff()),
                v(x.grad(&grads).unwrap()),
                v(w.grad(&grads).unwrap()),
                b.grad(&grads)
                    .unwrap()
                    .into_data()
                    .try_to_vec::<f32>()
                    .unwrap(),
            )
        };
        for relu in [true, false] {
            let (a, b) = (run(true, relu), run(false, relu));
            if relu {
                // Both signs occur, so the ReLU gradient mask matters.
                let zeros = a.0.iter().filter(|&&v| v == 0.0).count();
                assert!(zeros > a.0.len() / 10 && zeros < a.0.len() * 9 / 10);
            }
            for (name, p, q) in [
                ("y", &a.0, &b.0),
                ("dx", &a.1, &b.1),
                ("dw", &a.2, &b.2),
                ("db", &a.3, &b.3),
            ] {
                let q64: Vec<f64> = q.iter().map(|&v| v as f64).collect();
                let e = max_rel(p, &q64);
                assert!(
                    e < 1e-5,
                    "relu {relu}, {name}: max rel difference to burn {e:e}"
                );
            }
        }
        let a = run(true, false);
        // Plain (no autodiff) device.
        let plain = Device::flex();
        let x = Tensor::<4>::from_data(TensorData::new(xv, [s.batch, s.c_in, s.h, s.w]), &plain);
        let w = Tensor::<4>::from_data(TensorData::new(wv, [s.c_out, s.c_in, 3, 3]), &plain);
        let bias = Tensor::<1>::from_data(TensorData::new(bv, [s.c_out]), &plain);
        let y = conv2d_same(&x, &w, &bias, false, false)
            .expect("the plain CPU device takes the cpuconv path")
            .into_data()
            .try_to_vec::<f32>()
            .unwrap();
        assert_eq!(y, a.0, "plain and autodiff forward differ");
    }
}
