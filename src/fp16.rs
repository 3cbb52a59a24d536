//! fp16 gradient compression: IEEE binary16 packing (round to nearest, ties to even) on the host,
//! and for tensors on a wgpu device, on the device with the WGSL kernels in `shaders/`, so only
//! half the bytes cross the bus and the unpacked, averaged gradient never leaves the device.
//!
//! The host functions are the reference the kernels are tested against (bit for bit); they use
//! the `half` crate, itself pinned to numpy's conversion in the tests below.

use burn::tensor::{Device, Tensor};

use crate::error::{Error, Result};
use crate::wgsl::{cube_device, f32_buffer, f32_tensor, gpu_err, grid_1d, launch};

/// f32 → IEEE half bits (round to nearest even).
pub fn to_f16(values: &[f32]) -> Vec<u16> {
    values
        .iter()
        .map(|&v| half::f16::from_f32(v).to_bits())
        .collect()
}

/// IEEE half bits → f32.
pub fn from_f16(bits: &[u16]) -> Vec<f32> {
    bits.iter()
        .map(|&b| half::f16::from_bits(b).to_f32())
        .collect()
}

/// `values` rounded to the nearest f16 values (round to nearest even, Inf beyond f16's range),
/// as f32: the CPU reference of shaders/f16.wgsl's `round_f16`, which mixed precision's
/// convolution kernels apply to their operands.
pub fn round_to_f16(values: &[f32]) -> Vec<f32> {
    use rayon::prelude::*;
    values
        .par_iter()
        .map(|&v| half::f16::from_f32(v).to_f32())
        .collect()
}

const PACK_WGSL: &str = crate::wgsl::shader!("fp16_pack.wgsl");
const UNPACK_WGSL: &str = crate::wgsl::shader!("fp16_unpack.wgsl");

fn grid(words: usize) -> Result<(u32, u32)> {
    grid_1d(words).ok_or_else(|| {
        Error::Invalid(format!(
            "fp16 kernel: {words} words exceed the dispatch grid"
        ))
    })
}

/// Whether [`pack_on_device`] and [`unpack_on_device`] run on `device`.
pub fn device_kernels_apply(device: &Device) -> bool {
    cube_device(device).is_some()
}

/// Packs a flat f32 tensor on its wgpu device into IEEE half bits and copies only those to the
/// host. Bit-identical to [`to_f16`]. Errors if the tensor is not on a wgpu device.
pub fn pack_on_device(flat: Tensor<1>) -> Result<Vec<u16>> {
    let n = flat.shape().num_elements();
    if n == 0 {
        return Ok(Vec::new());
    }
    let t = f32_buffer(&flat).ok_or_else(|| {
        Error::Device(format!(
            "fp16 pack kernel: expected an f32 tensor on a wgpu device, got {:?} on {:?}",
            flat.dtype(),
            flat.device()
        ))
    })?;
    let words = n.div_ceil(2);
    let (gx, gy) = grid(words)?;
    let out = t.client.empty(words * 4);
    launch(
        &t.client,
        (PACK_WGSL, "fp16_pack"),
        (gx, gy, 1),
        &[&t.handle, &out],
        &[n as u32, gx],
    );
    let bytes = t
        .client
        .read_one(out)
        .map_err(|e| gpu_err("fp16 pack", e))?;
    let mut bits = Vec::with_capacity(2 * words);
    bits.extend(
        bytes
            .chunks_exact(2)
            .map(|b| u16::from_le_bytes([b[0], b[1]])),
    );
    bits.truncate(n);
    Ok(bits)
}

/// Uploads IEEE half bits to `device` (a wgpu device) and unpacks them there into an f32 tensor,
/// each value times `scale`. Bit-identical to `from_f16(bits)[i] * scale`.
pub fn unpack_on_device(bits: &[u16], scale: f32, device: &Device) -> Result<Tensor<1>> {
    let cube = cube_device(device).ok_or_else(|| {
        Error::Device(format!(
            "fp16 unpack kernel: {device:?} is not a wgpu device"
        ))
    })?;
    let n = bits.len();
    if n == 0 {
        return Ok(Tensor::<1>::empty([0], device));
    }
    let client = cube.client();
    let words = n.div_ceil(2);
    let (gx, gy) = grid(words)?;
    let mut packed = Vec::with_capacity(words * 4);
    for pair in bits.chunks(2) {
        packed.extend_from_slice(&pair[0].to_le_bytes());
        packed.extend_from_slice(&pair.get(1).copied().unwrap_or(0).to_le_bytes());
    }
    let input = client.create_from_slice(&packed);
    let out = client.empty(n * 4);
    launch(
        &client,
        (UNPACK_WGSL, "fp16_unpack"),
        (gx, gy, 1),
        &[&input, &out],
        &[n as u32, gx, scale.to_bits()],
    );
    Ok(f32_tensor(&cube, out, [n]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_round_trip_matches_numpy_half() {
        // Reference values from numpy: np.float16(x).view(np.uint16) for x in
        // [0.0, 1.0, -2.5, 65504.0, 1e-8, 0.1] → [0, 15360, 49408, 31743, 0, 11878].
        let x = [0.0f32, 1.0, -2.5, 65504.0, 1e-8, 0.1];
        assert_eq!(to_f16(&x), vec![0, 15360, 49408, 31743, 0, 11878]);
        let back = from_f16(&to_f16(&x));
        assert_eq!(&back[..4], &[0.0, 1.0, -2.5, 65504.0]);
        // 0.1 → 0.0999755859375 (nearest half).
        assert_eq!(back[5], 0.099_975_586);
    }

    #[test]
    fn grid_tiles_large_counts() {
        assert_eq!(grid(1).unwrap(), (1, 1));
        assert_eq!(grid(256 * 65_535).unwrap(), (65_535, 1));
        // 125.6 MB of fp32 gradients = 31.4 M values = 15.7 M words → 61,309 groups.
        assert_eq!(grid(15_695_747).unwrap(), (61_312, 1));
        assert_eq!(grid(256 * 65_535 + 1).unwrap(), (65_535, 2));
    }

    #[test]
    fn cpu_device_has_no_kernels() {
        assert!(!device_kernels_apply(&Device::flex()));
        assert!(!device_kernels_apply(&Device::flex().autodiff()));
    }
}
