//! Whether a flat f32 tensor holds only finite values (mixed precision's overflow check),
//! decided on the bits: on a wgpu device by `shaders/non_finite.wgsl` (one word read back; WGSL
//! may assume floats are finite, so a float test there could miss an Inf); where kernels are
//! compiled to SPIR-V, by burn's `is_finite` (cubecl's SPIR-V declares no fast-math modes, so
//! the test is exact); elsewhere on the host.

use burn::tensor::Tensor;

use crate::error::{Error, Result};
use crate::tensor_util::data_to_f32;
use crate::wgsl::{Compiler, compiler, f32_buffer, gpu_err, grid_1d, launch, shader, u32_bytes};

const NON_FINITE: &str = shader!("non_finite.wgsl");

/// Whether every value of `t` is finite (neither Inf nor NaN).
pub fn all_finite(t: Tensor<1>) -> Result<bool> {
    let n = t.shape().num_elements();
    if compiler(&t.device()) == Compiler::SpirV {
        let all = t.is_finite().all().int();
        let one = all
            .try_into_scalar::<i64>()
            .map_err(|e| gpu_err("finiteness check", e))?;
        return Ok(one == 1);
    }
    let Some(buf) = f32_buffer(&t) else {
        return Ok(data_to_f32(t.into_data())?.iter().all(|v| v.is_finite()));
    };
    if n == 0 {
        return Ok(true);
    }
    let too_many = || Error::Invalid(format!("finiteness check: {n} values exceed the grid"));
    let (gx, gy) = grid_1d(n).ok_or_else(too_many)?;
    let n = u32::try_from(n).map_err(|_| too_many())?;
    let client = &buf.client;
    let flag = client.create_from_slice(&u32_bytes(&[0]));
    launch(
        client,
        (NON_FINITE, "non_finite"),
        (gx, gy, 1),
        &[&buf.handle, &flag],
        &[n, gx],
    );
    let bytes = client
        .read_one(flag)
        .map_err(|e| gpu_err("finiteness check", e))?;
    Ok(bytes.get(..4) == Some(&[0, 0, 0, 0][..]))
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
}
