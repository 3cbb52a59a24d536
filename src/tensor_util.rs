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

/// Host copy of a tensor as f32.
pub fn to_f32<const D: usize>(t: Tensor<D>) -> Result<Vec<f32>> {
    data_to_f32(t.into_data())
}
