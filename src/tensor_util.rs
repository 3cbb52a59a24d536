//! Small conversions between burn tensors and host vectors, with errors instead of panics.

use burn::tensor::{DType, Tensor, TensorData};

use crate::error::{Error, Result};

/// Host copy of tensor data as f32 (converting from other float types if needed).
pub fn data_to_f32(data: TensorData) -> Result<Vec<f32>> {
    let data = if data.dtype() == DType::F32 {
        data
    } else {
        data.convert::<f32>()
    };
    data.try_into_vec::<f32>()
        .map_err(|e| Error::Invalid(format!("reading a tensor back to the host: {e:?}")))
}

/// A tensor's data on the host. A failure on the device (a kernel that did not build or run,
/// whose outputs cubecl marks as never written) is an error here, not a panic, so that a
/// caller trying a kernel path can fall back ([`crate::bench::conv_choice`]).
pub fn read<const D: usize>(t: Tensor<D>) -> Result<TensorData> {
    t.try_into_data().map_err(|e| {
        // cubecl's reasons nest as "…\nCaused by:\n  …"; the chain in one line, without the
        // list of skipped kernels that follows it.
        let text = e.to_string().replace("\nCaused by:\n  ", ": ");
        let first = text.lines().next().unwrap_or_default();
        Error::Device(format!("reading a tensor back from the device: {first}"))
    })
}

/// Host copy of a tensor as f32.
pub fn to_f32<const D: usize>(t: Tensor<D>) -> Result<Vec<f32>> {
    data_to_f32(read(t)?)
}
