//! ctseg's own 3×3 convolution on a wgpu device (`shaders/conv3x3_forward.wgsl`): an implicit
//! GEMM tiled through workgroup memory and registers, with the bias and ReLU fused, whose loops
//! stay short on every adapter (no row chunks on lavapipe). The forward only, for tensors
//! without autodiff (validation, inference); training keeps burn's convolution until the
//! gradient kernels exist.

use burn::tensor::Tensor;
use burn_cubecl::cubecl::prelude::*;
use burn_cubecl::cubecl::server::KernelArguments;

use crate::wgsl::{WgslKernel, cube_device, f32_buffer, f32_tensor, u32_bytes};

const SOURCE: &str = include_str!("../../shaders/conv3x3_forward.wgsl");
/// The output tile of one workgroup, rows (output channels) and columns (pixels), as the shader
/// declares.
const TILE: usize = 64;

/// `act(conv3x3_same(x, weight) + bias)` with the kernel, or `None` where it does not apply:
/// tensors not f32 on a wgpu device without autodiff, a kernel other than 3×3, or shapes beyond
/// the dispatch grid or 32-bit indexing.
///
/// # Shapes
/// - `x`: `[batch, c_in, h, w]`, `weight`: `[c_out, c_in, 3, 3]`, `bias`: `[c_out]`
///   → `[batch, c_out, h, w]`
pub fn conv3x3_forward(
    x: &Tensor<4>,
    weight: &Tensor<4>,
    bias: &Tensor<1>,
    relu: bool,
) -> Option<Tensor<4>> {
    // 1. Shapes the kernel covers.
    let [b, ci, h, w] = x.dims();
    let [co, wc, kh, kw] = weight.dims();
    if wc != ci || kh != 3 || kw != 3 || bias.dims() != [co] {
        return None;
    }
    let (gx, gy) = ((b * h * w).div_ceil(TILE), co.div_ceil(TILE));
    let fits = |v: usize| u32::try_from(v).is_ok();
    if gx > 65_535 || gy > 65_535 || !fits(b * co * h * w) || !fits(b * ci * h * w) {
        return None;
    }
    // 2. The operands' buffers on the device (None off wgpu or under autodiff).
    let cube = cube_device(&x.device())?;
    let (xb, wb, bb) = (f32_buffer(x)?, f32_buffer(weight)?, f32_buffer(bias)?);
    // 3. The launch, and its output handed back to burn.
    let client = cube.client();
    let out = client.empty(b * co * h * w * 4);
    let dims = [b, ci, co, h, w, usize::from(relu), gx].map(|v| v as u32);
    let info = client.create_from_slice(&u32_bytes(&dims));
    client.launch(
        Box::new(WgslKernel {
            source: SOURCE,
            name: "conv3x3_forward",
            workgroup: 256,
        }),
        CubeCount::Static(gx as u32, gy as u32, 1),
        KernelArguments::new().with_buffers(vec![
            xb.handle.clone().binding(),
            wb.handle.clone().binding(),
            bb.handle.clone().binding(),
            out.clone().binding(),
            info.binding(),
        ]),
    );
    Some(f32_tensor(&cube, out, [b, co, h, w]))
}
