//! Training-mode batch normalisation on a wgpu device, followed by an optional spatial dropout,
//! registered with burn's autodiff as one operation (as [`super::cpu::norm`] does on the CPU):
//! three kernel launches forward and three backward, where the tensor-operation formula
//! ([`super::ops::batch_norm_train_tensor_ops`]) launches about 50 per layer (one axis at a
//! time, each with its own broadcasts; `bench step --profile` counts them, docs/gpu-notes.md).
//!
//! - forward: per-slice sums and squared deviations (`shaders/batch_norm_stats.wgsl`), the
//!   slices combined in order into each channel's mean, biased variance and normalising
//!   coefficients (`shaders/batch_norm_finish_forward.wgsl`), then the elementwise pass
//!   (`shaders/batch_norm_apply.wgsl`);
//! - backward: per-slice `Σ g` and `Σ g·(x − μ)` (`shaders/batch_norm_grad_sums.wgsl`), the
//!   parameter gradients and the input gradient's coefficients
//!   (`shaders/batch_norm_finish_backward.wgsl`), then the same elementwise pass on `dy`.
//!
//! The formulas are [`super::cpu::norm`]'s. Every reduction is cut into slices whose count
//! depends only on the shape, each walked in short loops (no adapter's loop cap is reached,
//! lavapipe's included) and summed in a fixed order, so results are deterministic.

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

use crate::wgsl::{
    Fused, MAX_GROUPS, WORKGROUP, cube_device, f32_buffer, f32_fused, grid_1d, launch, resolve,
    shader,
};

const STATS: (&str, &str) = (
    shader!("batch_norm_reduce.wgsl", "batch_norm_stats.wgsl"),
    "batch_norm_stats",
);
const GRAD_SUMS: (&str, &str) = (
    shader!("batch_norm_reduce.wgsl", "batch_norm_grad_sums.wgsl"),
    "batch_norm_grad_sums",
);
const FINISH_FORWARD: (&str, &str) = (
    shader!("batch_norm_finish_forward.wgsl"),
    "batch_norm_finish_forward",
);
const FINISH_BACKWARD: (&str, &str) = (
    shader!("batch_norm_finish_backward.wgsl"),
    "batch_norm_finish_backward",
);
const APPLY: (&str, &str) = (shader!("batch_norm_apply.wgsl"), "batch_norm_apply");

/// Workgroups the reductions aim for (slices × channels): enough to fill a large GPU.
const TARGET_WORKGROUPS: usize = 1024;
/// The fewest values per invocation in a slice that is worth its own workgroup.
const MIN_PER_INVOCATION: usize = 16;
/// The most values one invocation walks in a slice: far below an adapter's loop cap.
const MAX_PER_INVOCATION: usize = 16_384;
/// Coefficients per channel in the elementwise pass (shaders/batch_norm_apply.wgsl).
const COEFS: usize = 8;

/// The shape of one batch normalisation and how its reductions are sliced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NormShape {
    /// Images.
    pub batch: usize,
    /// Channels.
    pub c: usize,
    /// Rows.
    pub h: usize,
    /// Columns.
    pub w: usize,
    /// Values per slice of a channel's `batch·hw`.
    pub slice: usize,
    /// Slices per channel.
    pub slices: usize,
}

impl NormShape {
    /// The shape for `[batch, c, h, w]`, or `None` beyond what the kernels cover (an empty
    /// tensor, a grid dimension past [`MAX_GROUPS`], or indices past 32 bits).
    pub fn of([batch, c, h, w]: [usize; 4]) -> Option<Self> {
        let hw = h * w;
        let n = batch * hw;
        let total = n.checked_mul(c)?;
        if n == 0 || c == 0 || c > MAX_GROUPS || total > u32::MAX as usize {
            return None;
        }
        grid_1d(total)?;
        let lanes = WORKGROUP as usize;
        let wanted = (TARGET_WORKGROUPS / c).max(1);
        let slices = wanted
            .min(n.div_ceil(lanes * MIN_PER_INVOCATION))
            .max(n.div_ceil(lanes * MAX_PER_INVOCATION))
            .max(1);
        let slice = n.div_ceil(slices);
        let slices = n.div_ceil(slice);
        (slices <= MAX_GROUPS).then_some(Self {
            batch,
            c,
            h,
            w,
            slice,
            slices,
        })
    }

    fn dims(&self) -> [usize; 4] {
        [self.batch, self.c, self.h, self.w]
    }

    fn hw(&self) -> usize {
        self.h * self.w
    }

    fn values(&self) -> usize {
        self.batch * self.c * self.hw()
    }

    fn per_channel(&self) -> usize {
        self.batch * self.hw()
    }

    /// The reductions' grid, (slices, channels), and the start of their info,
    /// `[batch, c, hw, slice, slices]` (shaders/batch_norm_reduce.wgsl's users).
    fn reduction(&self) -> ((u32, u32, u32), [u32; 5]) {
        let [b, c, hw, slice, slices] =
            [self.batch, self.c, self.hw(), self.slice, self.slices].map(|v| v as u32);
        ((slices, c, 1), [b, c, hw, slice, slices])
    }

    /// The per-channel kernels' grid: one invocation per channel.
    fn per_channel_grid(&self) -> (u32, u32, u32) {
        ((self.c as u32).div_ceil(WORKGROUP), 1, 1)
    }
}

/// Training-mode batch normalisation followed by a spatial dropout given as its per-plane
/// multipliers (`[batch·c]`), with ctseg's kernels: `Some((y, mean, biased variance))` when
/// `x`, `gamma` and `beta` are f32 tensors on a wgpu device (with or without autodiff, all
/// alike) of a shape [`NormShape::of`] covers; `None` otherwise. The statistics (of `x`, before
/// the dropout) are `[c]` tensors on the device without autodiff.
pub fn batch_norm_train(
    x: &Tensor<4>,
    gamma: &Tensor<1>,
    beta: &Tensor<1>,
    eps: f64,
    mask: Option<&[f32]>,
) -> Option<(Tensor<4>, Tensor<1>, Tensor<1>)> {
    let dims = x.dims();
    let s = NormShape::of(dims)?;
    if gamma.dims() != [s.c]
        || beta.dims() != [s.c]
        || mask.is_some_and(|m| m.len() != s.batch * s.c)
        || [x.dtype(), gamma.dtype(), beta.dtype()]
            .iter()
            .any(|d| *d != DType::F32)
    {
        return None;
    }
    let cube = cube_device(&x.device())?;
    let mult = mask.map(|m| {
        let bytes: Vec<u8> = m.iter().flat_map(|v| v.to_le_bytes()).collect();
        cube.client().create_from_slice(&bytes)
    });
    let stat = |h: Handle| Tensor::<1>::from_primitive::<Cube>(f32_fused(&cube, h, &[s.c]));
    let ad = (
        x.clone().try_into_primitive::<Autodiff<Cube>>(),
        gamma.clone().try_into_primitive::<Autodiff<Cube>>(),
        beta.clone().try_into_primitive::<Autodiff<Cube>>(),
    );
    if let (Ok(x), Ok(g), Ok(b)) = ad {
        let nodes = [x.node(), g.node(), b.node()];
        let tensors = [x.primitive(), g.primitive(), b.primitive()].map(|t| resolve(t.clone()));
        let out = forward(&s, &tensors, mult.as_ref(), eps);
        let y = f32_fused(&cube, out.y, &dims);
        let y = match NormBackward
            .prepare::<NoCheckpointing>(nodes)
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(mut prep) => {
                let xs = prep.checkpoint(&x);
                let gs = prep.checkpoint(&g);
                let state = NormState {
                    x: xs,
                    gamma: gs,
                    coef: out.coef,
                    var: out.var.clone(),
                    mult,
                    shape: s,
                    eps,
                };
                prep.finish(state, y)
            }
            OpsKind::UnTracked(prep) => prep.finish(y),
        };
        return Some((
            Tensor::from_primitive::<Autodiff<Cube>>(y),
            stat(out.mean),
            stat(out.var),
        ));
    }
    let tensors = [f32_buffer(x)?, f32_buffer(gamma)?, f32_buffer(beta)?];
    let out = forward(&s, &tensors, mult.as_ref(), eps);
    Some((
        Tensor::from_primitive::<Cube>(f32_fused(&cube, out.y, &dims)),
        stat(out.mean),
        stat(out.var),
    ))
}

/// The forward's buffers: output, per-channel mean and biased variance, and the coefficients
/// of shaders/batch_norm_finish_forward.wgsl (which the backward reads the mean from).
struct ForwardOut {
    y: Handle,
    mean: Handle,
    var: Handle,
    coef: Handle,
}

/// The forward on contiguous f32 buffers `[x, gamma, beta]` and the optional multipliers.
fn forward(
    s: &NormShape,
    [x, gamma, beta]: &[CubeTensor; 3],
    mult: Option<&Handle>,
    eps: f64,
) -> ForwardOut {
    let client = &x.client;
    // 1. Each slice's mean (less the channel's first value) and squared deviations.
    let part = client.empty(s.c * s.slices * 2 * 4);
    let (grid, info) = s.reduction();
    launch(client, STATS, grid, &[&x.handle, &part], &info);
    // 2. The slices combined: statistics and coefficients.
    let mean = client.empty(s.c * 4);
    let var = client.empty(s.c * 4);
    let coef = client.empty(s.c * COEFS * 4);
    launch(
        client,
        FINISH_FORWARD,
        s.per_channel_grid(),
        &[
            &part,
            &x.handle,
            &gamma.handle,
            &beta.handle,
            &mean,
            &var,
            &coef,
        ],
        &[
            s.c as u32,
            s.slices as u32,
            s.slice as u32,
            s.per_channel() as u32,
            (eps as f32).to_bits(),
            s.hw() as u32,
        ],
    );
    // 3. The elementwise pass.
    let y = apply(s, x, x, mult, &coef);
    ForwardOut { y, mean, var, coef }
}

/// shaders/batch_norm_apply.wgsl: `mult·(a·(u − ou) + b) + e·(v − ov) + d` per value.
fn apply(
    s: &NormShape,
    u: &CubeTensor,
    v: &CubeTensor,
    mult: Option<&Handle>,
    coef: &Handle,
) -> Handle {
    let client = &u.client;
    let out = client.empty(s.values() * 4);
    // NormShape::of checked that the grid fits.
    let (gx, gy) = grid_1d(s.values()).unwrap_or((1, 1));
    launch(
        client,
        APPLY,
        (gx, gy, 1),
        &[&u.handle, &v.handle, mult.unwrap_or(coef), coef, &out],
        &[
            s.values() as u32,
            s.c as u32,
            s.hw() as u32,
            u32::from(mult.is_some()),
            gx,
        ],
    );
    out
}

/// What the backward keeps of the forward: the checkpointed input and γ, and buffers of
/// ctseg's kernels (held as handles, so no operation reuses them in place).
#[derive(Clone, Debug)]
struct NormState {
    x: NodeId,
    gamma: NodeId,
    /// The forward's coefficients (its centre and the mean's deviation from it).
    coef: Handle,
    /// The biased variance.
    var: Handle,
    /// The dropout's per-plane multipliers.
    mult: Option<Handle>,
    shape: NormShape,
    eps: f64,
}

#[derive(Debug)]
struct NormBackward;

impl Backward<Cube, 3> for NormBackward {
    type State = NormState;

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, ckpt: &mut Checkpointer) {
        let [node_x, node_g, node_b] = ops.parents;
        let dy = resolve(grads.consume::<Cube>(&ops.node));
        let st = ops.state;
        let s = st.shape;
        let x = resolve(ckpt.retrieve_node_output::<Fused>(st.x));
        let gamma = resolve(ckpt.retrieve_node_output::<Fused>(st.gamma));
        let (fwd, mult) = (&st.coef, st.mult.as_ref());
        let client = &x.client;
        let device = x.device.clone();
        // 1. Each slice's Σ g and Σ g·(x − x₀).
        let part = client.empty(s.c * s.slices * 2 * 4);
        let (grid, [b, c, hw, slice, slices]) = s.reduction();
        launch(
            client,
            GRAD_SUMS,
            grid,
            &[&x.handle, &dy.handle, mult.unwrap_or(fwd), fwd, &part],
            &[b, c, hw, slice, slices, u32::from(mult.is_some())],
        );
        // 2. The parameter gradients and the input gradient's coefficients.
        let coef = client.empty(s.c * COEFS * 4);
        let dgamma = client.empty(s.c * 4);
        let dbeta = client.empty(s.c * 4);
        launch(
            client,
            FINISH_BACKWARD,
            s.per_channel_grid(),
            &[&part, &gamma.handle, fwd, &st.var, &coef, &dgamma, &dbeta],
            &[
                c,
                s.slices as u32,
                s.per_channel() as u32,
                (st.eps as f32).to_bits(),
            ],
        );
        // 3. The input gradient.
        if let Some(node) = node_x {
            let dx = apply(&s, &dy, &x, mult, &coef);
            grads.register::<Cube>(node.id, f32_fused(&device, dx, &s.dims()));
        }
        if let Some(node) = node_g {
            grads.register::<Cube>(node.id, f32_fused(&device, dgamma, &[s.c]));
        }
        if let Some(node) = node_b {
            grads.register::<Cube>(node.id, f32_fused(&device, dbeta, &[s.c]));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slices_cover_each_channel_in_short_loops() {
        // livermask's first level at batch 4 and 30, its bottleneck, a tiny image, one huge
        // channel.
        for dims in [
            [4, 32, 240, 240],
            [30, 64, 240, 240],
            [4, 1024, 15, 15],
            [1, 3, 5, 5],
            [64, 1, 2048, 2048],
        ] {
            let s = NormShape::of(dims).expect("covered");
            let n = s.per_channel();
            assert!(s.slice * s.slices >= n, "{dims:?}");
            assert!(s.slice * (s.slices - 1) < n, "{dims:?}: an empty slice");
            assert!(s.slice.div_ceil(256) <= MAX_PER_INVOCATION, "{dims:?}");
            assert!(s.slices <= MAX_GROUPS, "{dims:?}");
        }
        // Few channels are cut into more slices than many.
        let few = NormShape::of([4, 4, 240, 240]).expect("covered");
        let many = NormShape::of([4, 256, 240, 240]).expect("covered");
        assert!(few.slices > many.slices, "{few:?} {many:?}");
    }

    #[test]
    fn shapes_the_kernels_do_not_cover_are_refused() {
        assert!(NormShape::of([0, 3, 8, 8]).is_none());
        assert!(NormShape::of([1, 0, 8, 8]).is_none());
        assert!(NormShape::of([1, 65_536, 1, 1]).is_none());
        // 2^32 values.
        assert!(NormShape::of([1, 1024, 2048, 2048]).is_none());
        assert!(NormShape::of([1, 1023, 2048, 2048]).is_some());
    }
}
