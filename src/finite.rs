//! Mixed precision's unscale and overflow check: gradients divided by the loss scale, and
//! whether every value is finite, decided on the bits. Where ctseg's WGSL kernels load, each
//! tensor is unscaled and checked in one pass (`shaders/unscale_check.wgsl`) and one word is
//! read back (WGSL may assume floats are finite, so a float test there could miss an Inf);
//! where kernels are compiled to SPIR-V, burn's `is_finite` decides (cubecl's SPIR-V declares
//! no fast-math modes, so the test is exact); elsewhere the host does.

use burn::tensor::Tensor;

use crate::error::{Error, Result};
use crate::tensor_util::data_to_f32;
use crate::wgsl::{
    Compiler, compiler, cube_device, f32_buffer, f32_tensor, gpu_err, grid_1d, launch, shader,
    u32_bytes,
};

const UNSCALE_CHECK: &str = shader!("unscale_check.wgsl");

/// `parts` multiplied by `1 / scale`, and whether every value of them is finite, before and
/// after (a finite gradient that the unscaling takes past f32's range counts as an overflow).
/// Where ctseg's WGSL kernels load: one launch per tensor and one word read back (a
/// concatenation takes a launch per tensor); elsewhere the scaled tensors are concatenated for
/// one check.
pub fn unscale(parts: Vec<Tensor<1>>, scale: f64) -> Result<(Vec<Tensor<1>>, bool)> {
    let inv = 1.0 / scale;
    let cube = parts.first().and_then(|t| cube_device(&t.device()));
    let buffers: Option<Vec<_>> = parts.iter().map(f32_buffer).collect();
    let (Some(cube), Some(buffers)) = (cube, buffers) else {
        // Elsewhere: each tensor scaled, and their concatenation checked once (no slicing
        // back: 36 fewer launches than a scaled concatenation split again, on SPIR-V).
        let scaled: Vec<Tensor<1>> = parts.into_iter().map(|t| t.mul_scalar(inv)).collect();
        if scaled.is_empty() {
            return Ok((scaled, true));
        }
        let finite = all_finite(Tensor::cat(scaled.clone(), 0))?;
        return Ok((scaled, finite));
    };
    let client = cube.client();
    let flag = client.create_from_slice(&u32_bytes(&[0]));
    let inv_bits = (inv as f32).to_bits();
    let mut out = Vec::with_capacity(parts.len());
    for (t, buf) in parts.into_iter().zip(&buffers) {
        let n = t.shape().num_elements();
        if n == 0 {
            out.push(t);
            continue;
        }
        let too_many = || Error::Invalid(format!("unscale: {n} values exceed the grid"));
        let (gx, gy) = grid_1d(n).ok_or_else(too_many)?;
        let len = u32::try_from(n).map_err(|_| too_many())?;
        let handle = client.empty(n * 4);
        launch(
            &client,
            (UNSCALE_CHECK, "unscale_check"),
            (gx, gy, 1),
            &[&buf.handle, &handle, &flag],
            &[len, gx, inv_bits],
        );
        out.push(f32_tensor(&cube, handle, [n]));
    }
    let bytes = client.read_one(flag).map_err(|e| gpu_err("unscale", e))?;
    Ok((out, bytes.get(..4) == Some(&[0, 0, 0, 0][..])))
}

/// Whether every value of `t` is finite (neither Inf nor NaN): where kernels are compiled to
/// SPIR-V by burn's `is_finite` (cubecl's SPIR-V declares no fast-math modes, so the test is
/// exact), elsewhere on the host. (On a device where ctseg's WGSL kernels load, [`unscale`]
/// checks in its own pass.)
pub fn all_finite(t: Tensor<1>) -> Result<bool> {
    if compiler(&t.device()) == Compiler::SpirV {
        let all = t.is_finite().all().int();
        let one = all
            .try_into_scalar::<i64>()
            .map_err(|e| gpu_err("finiteness check", e))?;
        return Ok(one == 1);
    }
    Ok(data_to_f32(crate::tensor_util::read(t)?)?
        .iter()
        .all(|v| v.is_finite()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::{Device, TensorData};

    #[test]
    fn on_the_cpu_the_host_decides() {
        let t = |v: Vec<f32>| {
            Tensor::<1>::from_data(TensorData::new(v.clone(), [v.len()]), &Device::flex())
        };
        assert!(all_finite(t(vec![0.0, f32::MAX, -1e-45])).unwrap_or(false));
        assert!(!all_finite(t(vec![0.0, f32::INFINITY])).unwrap_or(true));
        assert!(!all_finite(t(vec![f32::NAN, 1.0])).unwrap_or(true));
    }

    #[test]
    fn on_the_cpu_the_unscale_divides_and_checks_every_tensor() {
        let t = |v: &[f32]| {
            Tensor::<1>::from_data(TensorData::new(v.to_vec(), [v.len()]), &Device::flex())
        };
        let (out, finite) = unscale(vec![t(&[4.0, -2.0]), t(&[1.0])], 4.0).expect("unscale");
        assert!(finite);
        let out: Vec<Vec<f32>> = out
            .into_iter()
            .map(|t| crate::tensor_util::to_f32(t).expect("f32"))
            .collect();
        assert_eq!(out, vec![vec![1.0, -0.5], vec![0.25]]);
        let (_, finite) = unscale(vec![t(&[1.0]), t(&[f32::NAN])], 4.0).expect("unscale");
        assert!(!finite);
        // 3e38 is finite; divided by 0.5 it is not.
        let (_, finite) = unscale(vec![t(&[3.0e38])], 0.5).expect("unscale");
        assert!(!finite);
    }
}
