//! Mixed precision's 3×3 convolutions where cubecl compiles the kernels to SPIR-V (a `spirv`
//! build on a Vulkan adapter, where ctseg's WGSL kernels cannot load): cubek's implicit-GEMM
//! convolutions on the driver's cooperative matrices (tensor cores), forward and both
//! gradients, on f16 copies of the operands, accumulated and returned in f32, registered with
//! burn's autodiff as one operation (as [`super::gpu_conv`] is). Bias and ReLU stay burn's
//! tensor operations ([`super::ops::conv`]).
//!
//! cubek is launched here rather than through burn's `conv2d` on f16 tensors for two reasons:
//! burn returns its operands' element type (f16 results, where the CPU reference and ctseg's
//! WGSL kernels keep f32), and burn autotunes each shape over dozens of kernels (minutes per
//! shape on lavapipe). One strategy is used everywhere: cubek's synchronous, cyclic-loading
//! implicit GEMM on cooperative matrices, the one burn's `ImplicitGemm` strategy picks.
//!
//! Where cubek declines a shape (a setup error: no cooperative matrices for f16 × f16 → f32,
//! or a shape its tiles cannot cover), the forward returns `None` (the caller falls back to
//! burn's f32 convolution) and a gradient is computed by burn's direct kernels on the same f16
//! values widened to f32; [`declined`] counts both, so the start-up check can insist on none.

use std::sync::atomic::{AtomicUsize, Ordering};

use burn::tensor::ops::ConvOptions;
use burn::tensor::{DType, Shape, Tensor};
use burn_cubecl::Cube;
use burn_cubecl::cubecl::ir::{ElemType, FloatKind};
use burn_cubecl::kernel::conv::{ConvStrategy, conv_data_backward, conv_weight_backward};
use burn_cubecl::kernel::{cast, into_contiguous};
use burn_cubecl::ops::numeric::empty_device_dtype;
use burn_cubecl::ops::{permute_nchw_to_nhwc, permute_nhwc_to_nchw};
use burn_cubecl::tensor::CubeTensor;
use burn_dispatch::backends::Autodiff;
use burn_dispatch::backends::autodiff::checkpoint::base::Checkpointer;
use burn_dispatch::backends::autodiff::checkpoint::strategy::NoCheckpointing;
use burn_dispatch::backends::autodiff::grads::Gradients;
use burn_dispatch::backends::autodiff::ops::{Backward, Ops, OpsKind};
use cubek::convolution::components::ConvSetupError;
use cubek::convolution::{
    AcceleratedTileKind, ConvAlgorithm, ConvolutionArgs, ConvolutionInputs, Strategy, launch_ref,
};
use cubek::matmul::definition::{MatmulElems, MatmulGlobalElems};
use cubek::std::InputBinding;

use crate::wgsl::{Compiler, Fused, any_cube_device, compiler, compiler_of, f32_fused, resolve};

/// Convolutions or gradients cubek declined since the process started.
static DECLINED: AtomicUsize = AtomicUsize::new(0);

/// How many convolutions or gradients cubek has declined so far in this process (each then ran
/// on burn's f32 kernels).
pub fn declined() -> usize {
    DECLINED.load(Ordering::Relaxed)
}

/// The cooperative-matrix shapes `m×n×k` the device offers cubecl for f16 × f16 → f32 (empty
/// where kernels are not compiled to SPIR-V, or the driver lists none): what the convolutions
/// here run on.
pub fn f16_shapes(device: &burn::tensor::Device) -> Vec<[u32; 3]> {
    let Some(cube) = any_cube_device(device).filter(|c| compiler_of(c) == Compiler::SpirV) else {
        return Vec::new();
    };
    let (f16, f32) = (
        ElemType::Float(FloatKind::F16),
        ElemType::Float(FloatKind::F32),
    );
    cube.client()
        .properties()
        .features
        .matmul
        .cmma
        .iter()
        .filter(|c| c.a_type == f16 && c.b_type == f16 && c.cd_type == f32)
        .map(|c| [c.m, c.n, c.k])
        .collect()
}

/// `conv3x3_same(x, weight)` (no bias) on cubek's cooperative-matrix kernels with f16
/// operands and f32 results, or `None` where they do not apply: tensors not f32 on a wgpu
/// device compiled to SPIR-V, a kernel other than 3×3, or a shape cubek declines. Under
/// autodiff the input and weight gradients are cubek's too, on f16 copies of the output
/// gradient.
///
/// # Shapes
/// - `x`: `[batch, c_in, h, w]`, `weight`: `[c_out, c_in, 3, 3]` → `[batch, c_out, h, w]`
pub fn conv3x3(x: &Tensor<4>, weight: &Tensor<4>) -> Option<Tensor<4>> {
    let [_, c_in, _, _] = x.dims();
    let [_, w_in, kh, kw] = weight.dims();
    if (kh, kw) != (3, 3) || w_in != c_in || x.dtype() != DType::F32 {
        return None;
    }
    if weight.dtype() != DType::F32 || compiler(&x.device()) != Compiler::SpirV {
        return None;
    }
    let ad = (
        x.clone().try_into_primitive::<Autodiff<Cube>>(),
        weight.clone().try_into_primitive::<Autodiff<Cube>>(),
    );
    if let (Ok(x), Ok(w)) = ad {
        let nodes = [x.node(), w.node()];
        let (y, state) = declining(forward(
            resolve(x.primitive().clone()),
            resolve(w.primitive().clone()),
        ))?;
        let out = match CmmaBackward
            .prepare::<NoCheckpointing>(nodes)
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => prep.finish(state, y),
            OpsKind::UnTracked(prep) => prep.finish(y),
        };
        return Some(Tensor::from_primitive::<Autodiff<Cube>>(out));
    }
    let x = x.clone().try_into_primitive::<Cube>().ok()?;
    let w = weight.clone().try_into_primitive::<Cube>().ok()?;
    let (y, _) = declining(forward(resolve(x), resolve(w)))?;
    Some(Tensor::from_primitive::<Cube>(y))
}

/// `Some` of a successful launch; a declined one counts and is `None`.
fn declining<T>(r: Result<T, ConvSetupError>) -> Option<T> {
    if r.is_err() {
        DECLINED.fetch_add(1, Ordering::Relaxed);
    }
    r.ok()
}

/// What the backward keeps: the operands' f16 copies, channels last, as the forward read them.
#[derive(Clone, Debug)]
struct State {
    x16: CubeTensor,
    w16: CubeTensor,
}

/// The forward on contiguous f32 `x` and `w` (NCHW): the f32 output as a fused primitive, and
/// the f16 operands for the backward.
fn forward(x: CubeTensor, w: CubeTensor) -> Result<(Fused, State), ConvSetupError> {
    let (x16, w16) = (f16_nhwc(x), f16_nhwc(w));
    let [b, h, wd, _] = dims(&x16);
    let [c_out, ..] = dims(&w16);
    let y = gemm(Product::Forward, &x16, &w16, [b, h, wd, c_out])?;
    Ok((nchw_fused(permute_nhwc_to_nchw(y)), State { x16, w16 }))
}

#[derive(Debug)]
struct CmmaBackward;

impl Backward<Cube, 2> for CmmaBackward {
    type State = State;

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_x, node_w] = ops.parents;
        let dy16 = f16_nhwc(resolve(grads.consume::<Cube>(&ops.node)));
        let State { x16, w16 } = ops.state;
        let [b, h, wd, c_in] = dims(&x16);
        let [c_out, ..] = dims(&w16);
        if let Some(node) = node_x {
            let dx = or_direct(
                gemm(Product::InputGrad, &dy16, &w16, [b, h, wd, c_in]),
                || {
                    let shape = Shape::from(vec![b, c_in, h, wd]);
                    conv_data_backward(widened(&dy16), widened(&w16), shape, options(), DIRECT)
                },
                "input",
            );
            grads.register::<Cube>(node.id, dx);
        }
        if let Some(node) = node_w {
            let dw = or_direct(
                gemm(Product::WeightGrad, &x16, &dy16, [c_out, 3, 3, c_in]),
                || {
                    let shape = Shape::from(vec![c_out, c_in, 3, 3]);
                    conv_weight_backward(widened(&x16), widened(&dy16), shape, options(), DIRECT)
                },
                "weight",
            );
            grads.register::<Cube>(node.id, dw);
        }
    }
}

/// burn's fallback for a gradient cubek declines.
const DIRECT: ConvStrategy = ConvStrategy::Direct;

/// A gradient from cubek (channels last), or where it declined, from burn's `direct` kernels
/// (NCHW), counted in [`declined`]; as an NCHW fused primitive. `which` names the gradient.
fn or_direct(
    cubek: Result<CubeTensor, ConvSetupError>,
    direct: impl FnOnce() -> Result<CubeTensor, ConvSetupError>,
    which: &str,
) -> Fused {
    match cubek {
        Ok(g) => nchw_fused(permute_nhwc_to_nchw(g)),
        Err(_) => {
            DECLINED.fetch_add(1, Ordering::Relaxed);
            nchw_fused(direct().unwrap_or_else(|e| {
                panic!("3x3 convolution {which} gradient: burn's direct kernel failed: {e:?}")
            }))
        }
    }
}

/// The three products of a convolution's forward and backward, as cubek names them.
#[derive(Clone, Copy)]
enum Product {
    /// `y = conv(x, w)`: operands `x`, `w`.
    Forward,
    /// `dx`: operands `dy`, `w`.
    InputGrad,
    /// `dw`: operands `x`, `dy`.
    WeightGrad,
}

/// One of cubek's implicit-GEMM convolutions ('same' 3×3, stride 1) on f16 channels-last
/// operands `a` and `b`, accumulated in f32 on cooperative matrices: the f32 result, channels
/// last, of shape `out` (`[b, h, w, c]`, or `[c_out, 3, 3, c_in]` for the weight gradient).
fn gemm(
    product: Product,
    a: &CubeTensor,
    b: &CubeTensor,
    out: [usize; 4],
) -> Result<CubeTensor, ConvSetupError> {
    if forced_decline(product) {
        return Err(ConvSetupError::Unknown);
    }
    let client = a.client.clone();
    let result = empty_device_dtype(
        client.clone(),
        a.device.clone(),
        Shape::from(out.to_vec()),
        DType::F32,
    );
    let f16 = ElemType::Float(FloatKind::F16);
    let operand = |t: &CubeTensor| InputBinding::new(t.clone().binding(), f16);
    let written = result.clone().binding();
    let inputs = match product {
        Product::Forward => ConvolutionInputs::Forward {
            input: operand(a),
            weight: operand(b),
            bias: None,
            out: written,
        },
        Product::InputGrad => ConvolutionInputs::BackwardData {
            out_grad: operand(a),
            weights: operand(b),
            in_grad: written,
        },
        Product::WeightGrad => ConvolutionInputs::BackwardWeight {
            input: operand(a),
            out_grad: operand(b),
            weight_grad: written,
        },
    };
    // f16 operands and an f32 result: cubek then stages and accumulates in f32.
    let elems = MatmulElems::from_globals(&MatmulGlobalElems {
        lhs: f16,
        rhs: f16,
        out: ElemType::Float(FloatKind::F32),
    });
    let strategy = Strategy::Inferred {
        algorithm: ConvAlgorithm::SimpleSyncCyclic,
        tile_kind: AcceleratedTileKind::Cmma,
    };
    let args = ConvolutionArgs {
        stride: [1, 1],
        padding: [1, 1],
        dilation: [1, 1],
    };
    launch_ref::<2>(&strategy, &client, inputs, args, elems)?;
    Ok(result)
}

// The tests' forced declines (`test-hooks` builds only): cubek declines nothing on the adapters
// here, and the fallbacks must still be tested. Per thread, so parallel tests do not meet.
#[cfg(feature = "test-hooks")]
thread_local! {
    static FORCED: std::cell::Cell<(bool, bool)> = const { std::cell::Cell::new((false, false)) };
}

/// Makes this thread's convolutions decline as cubek does for a shape it cannot cover: the
/// forward (`forward`: the whole convolution then runs on burn's f32 kernels) and/or the two
/// gradients (`gradients`: burn's direct kernels on the widened f16 values). `test-hooks`
/// builds only.
#[cfg(feature = "test-hooks")]
pub fn force_declines(forward: bool, gradients: bool) {
    FORCED.with(|f| f.set((forward, gradients)));
}

#[cfg(feature = "test-hooks")]
fn forced_decline(product: Product) -> bool {
    let (forward, gradients) = FORCED.with(std::cell::Cell::get);
    if matches!(product, Product::Forward) {
        forward
    } else {
        gradients
    }
}

#[cfg(not(feature = "test-hooks"))]
#[inline(always)]
fn forced_decline(_: Product) -> bool {
    false
}

/// A 'same' 3×3 convolution's options for burn's fallback kernels.
fn options() -> ConvOptions<2> {
    ConvOptions::new([1, 1], [1, 1], [1, 1], 1)
}

/// An f32 NCHW tensor's f16 copy, contiguous channels last (what cubek reads fastest).
fn f16_nhwc(t: CubeTensor) -> CubeTensor {
    into_contiguous(permute_nchw_to_nhwc(cast(t, DType::F16)))
}

/// A channels-last f16 operand's values in f32, NCHW (for burn's fallback kernels).
fn widened(t: &CubeTensor) -> CubeTensor {
    into_contiguous(permute_nhwc_to_nchw(cast(t.clone(), DType::F32)))
}

/// An f32 tensor in any layout as a contiguous fused primitive.
fn nchw_fused(t: CubeTensor) -> Fused {
    let t = into_contiguous(t);
    let shape = dims(&t);
    f32_fused(&t.device, t.handle, &shape)
}

/// A rank-4 tensor's dimensions.
fn dims(t: &CubeTensor) -> [usize; 4] {
    let s = t.meta.shape();
    [s[0], s[1], s[2], s[3]]
}
