//! The CPU backend's kernels (burn flex), each registered with burn's autodiff as one
//! operation: 'same' convolutions on tiled im2col + gemm ([`conv`]), training-mode batch
//! normalisation fused with spatial dropout ([`norm`]), 2×2 max-pooling and the decoder's
//! upsample-and-concatenate ([`ops`]). Each entry point returns `None` for tensors that are not
//! f32 on the flex device; [`super::ops`] then takes the portable path. [`flex_operands`] is
//! the one place that tells the two apart.

pub mod conv;
pub mod norm;
pub mod ops;

use burn::tensor::{DType, Tensor, TensorData};
use burn_dispatch::backends::flex::FlexTensor;
use burn_dispatch::backends::{Autodiff, Flex};

/// burn-autodiff's tensor over flex (its type is only reachable through the backend trait).
pub(crate) type AutodiffTensor<B> =
    <Autodiff<B> as burn::backend::BackendTypes>::FloatTensorPrimitive;

/// The operands of a CPU kernel, all on one side of autodiff.
pub(crate) enum FlexOperands<const N: usize> {
    /// All on the flex device under autodiff (tracked or not): the autodiff primitives.
    Autodiff([AutodiffTensor<Flex>; N]),
    /// All on the plain flex device.
    Plain([FlexTensor; N]),
}

/// One tensor's flex primitive, if it is an f32 tensor on the flex device.
pub(crate) enum FlexOperand {
    /// Under autodiff.
    Autodiff(AutodiffTensor<Flex>),
    /// Without autodiff.
    Plain(FlexTensor),
}

/// `t`'s flex primitive (`None`: not f32, or not on the flex device). The clone is a reference
/// count increment; a failed conversion drops only the clone.
pub(crate) fn flex_operand<const D: usize>(t: &Tensor<D>) -> Option<FlexOperand> {
    if t.dtype() != DType::F32 {
        return None;
    }
    if let Ok(a) = t.clone().try_into_primitive::<Autodiff<Flex>>() {
        return Some(FlexOperand::Autodiff(a));
    }
    t.clone()
        .try_into_primitive::<Flex>()
        .ok()
        .map(FlexOperand::Plain)
}

/// The operands of a CPU kernel when they are all f32 on the flex device and on the same side
/// of autodiff; `None` otherwise (the portable path applies).
pub(crate) fn flex_operands<const N: usize>(
    operands: [Option<FlexOperand>; N],
) -> Option<FlexOperands<N>> {
    let all: [FlexOperand; N] = operands
        .into_iter()
        .collect::<Option<Vec<_>>>()?
        .try_into()
        .ok()?;
    if all.iter().all(|o| matches!(o, FlexOperand::Autodiff(_))) {
        let v: Vec<AutodiffTensor<Flex>> = all
            .into_iter()
            .filter_map(|o| match o {
                FlexOperand::Autodiff(a) => Some(a),
                FlexOperand::Plain(_) => None,
            })
            .collect();
        return v.try_into().ok().map(FlexOperands::Autodiff);
    }
    if all.iter().all(|o| matches!(o, FlexOperand::Plain(_))) {
        let v: Vec<FlexTensor> = all
            .into_iter()
            .filter_map(|o| match o {
                FlexOperand::Plain(p) => Some(p),
                FlexOperand::Autodiff(_) => None,
            })
            .collect();
        return v.try_into().ok().map(FlexOperands::Plain);
    }
    None
}

/// The f32 values of a flex tensor, borrowed when contiguous.
pub(crate) fn f32_values(t: &FlexTensor) -> std::borrow::Cow<'_, [f32]> {
    match t.as_slice::<f32>() {
        Some(v) => std::borrow::Cow::Borrowed(v),
        None => std::borrow::Cow::Owned(t.to_contiguous().as_slice::<f32>().map_or_else(
            // The caller checked the dtype; a contiguous copy of an f32 tensor is a slice.
            || unreachable!("contiguous f32 flex tensor without a slice"),
            <[f32]>::to_vec,
        )),
    }
}

/// A contiguous flex tensor owning `values`.
pub(crate) fn flex(values: Vec<f32>, shape: Vec<usize>) -> FlexTensor {
    FlexTensor::from_data(TensorData::new(values, shape))
}
