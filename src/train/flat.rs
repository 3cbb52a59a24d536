//! Model state as flat f32 buffers, in module-visit order (never `ParamId` order: ids are random
//! per process): gradients for the allreduce, BN running statistics for cross-rank averaging,
//! and weight hashes for the "all ranks hold the same model" checks.

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::optim::GradientsParams;
use burn::tensor::{Device, Tensor, TensorData};

use crate::error::{Error, Result};
use crate::tensor_util::data_to_f32;

/// Which tensors of a module a walk selects.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Select {
    /// Trainable parameters (`require_grad`).
    Trainable,
    /// Non-trainable state (BN running mean/variance).
    Buffers,
    /// Both.
    All,
}

impl Select {
    fn wants(self, trainable: bool) -> bool {
        match self {
            Select::Trainable => trainable,
            Select::Buffers => !trainable,
            Select::All => true,
        }
    }
}

/// One selected tensor: its id, shape and element count.
#[derive(Clone, Debug)]
pub struct Slot {
    /// Parameter id (valid in this process only).
    pub id: ParamId,
    /// Shape.
    pub shape: Vec<usize>,
    /// Elements.
    pub len: usize,
}

struct Layout {
    select: Select,
    slots: Vec<Slot>,
}

impl ModuleVisitor for Layout {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        if self.select.wants(param.is_require_grad()) {
            let shape = param.shape().dims::<D>().to_vec();
            let len = shape.iter().product();
            self.slots.push(Slot {
                id: param.id,
                shape,
                len,
            });
        }
    }
}

/// The selected tensors of `module`, in visit order.
pub fn layout<M: Module>(module: &M, select: Select) -> Vec<Slot> {
    let mut l = Layout {
        select,
        slots: Vec::new(),
    };
    module.visit(&mut l);
    l.slots
}

struct Gather<'a> {
    select: Select,
    grads: Option<&'a GradientsParams>,
    parts: Vec<Tensor<1>>,
    missing: Option<ParamId>,
    /// Only the selected tensors with these indices (in visit order among the selected).
    range: Option<std::ops::Range<usize>>,
    index: usize,
}

impl ModuleVisitor for Gather<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        if !self.select.wants(param.is_require_grad()) {
            return;
        }
        let index = self.index;
        self.index += 1;
        if self.range.as_ref().is_some_and(|r| !r.contains(&index)) {
            return;
        }
        let t = match self.grads {
            Some(g) => match g.get::<D>(param.id) {
                Some(t) => t,
                None => {
                    self.missing.get_or_insert(param.id);
                    return;
                }
            },
            None => param.val(),
        };
        let n = t.shape().num_elements();
        self.parts.push(t.without_autodiff().reshape([n]));
    }
}

fn gather_host(parts: Vec<Tensor<1>>) -> Result<Vec<f32>> {
    match gather_device(parts) {
        // One concatenation on the device, one copy to the host.
        Some(t) => data_to_f32(crate::tensor_util::read(t)?),
        None => Ok(Vec::new()),
    }
}

fn gather_device(parts: Vec<Tensor<1>>) -> Option<Tensor<1>> {
    if parts.is_empty() {
        None
    } else {
        Some(Tensor::cat(parts, 0))
    }
}

/// Gradients of the trainable parameters, concatenated into one host buffer.
pub fn flatten_grads<M: Module>(module: &M, grads: &GradientsParams) -> Result<Vec<f32>> {
    flatten_grads_in(module, grads, None)
}

/// Gradients of the trainable parameters with indices in `range` (visit order), concatenated.
pub fn flatten_grads_range<M: Module>(
    module: &M,
    grads: &GradientsParams,
    range: std::ops::Range<usize>,
) -> Result<Vec<f32>> {
    flatten_grads_in(module, grads, Some(range))
}

/// Like [`flatten_grads_range`], but the concatenation stays on the device (`None` if empty).
pub fn flatten_grads_range_device<M: Module>(
    module: &M,
    grads: &GradientsParams,
    range: std::ops::Range<usize>,
) -> Result<Option<Tensor<1>>> {
    Ok(gather_device(gather_grads(module, grads, Some(range))?))
}

fn flatten_grads_in<M: Module>(
    module: &M,
    grads: &GradientsParams,
    range: Option<std::ops::Range<usize>>,
) -> Result<Vec<f32>> {
    gather_host(gather_grads(module, grads, range)?)
}

fn gather_grads<M: Module>(
    module: &M,
    grads: &GradientsParams,
    range: Option<std::ops::Range<usize>>,
) -> Result<Vec<Tensor<1>>> {
    let mut g = Gather {
        select: Select::Trainable,
        grads: Some(grads),
        parts: Vec::new(),
        missing: None,
        range,
        index: 0,
    };
    module.visit(&mut g);
    if let Some(id) = g.missing {
        return Err(Error::Invalid(format!(
            "no gradient for trainable parameter {id}: is it used in the forward pass?"
        )));
    }
    Ok(g.parts)
}

/// Values of the selected tensors, concatenated into one host buffer.
pub fn flatten_values<M: Module>(module: &M, select: Select) -> Result<Vec<f32>> {
    let mut g = Gather {
        select,
        grads: None,
        parts: Vec::new(),
        missing: None,
        range: None,
        index: 0,
    };
    module.visit(&mut g);
    gather_host(g.parts)
}

/// Gradients from one flat tensor already on the device (sliced there, no host copy).
pub fn unflatten_grads_tensor(flat: Tensor<1>, slots: &[Slot]) -> Result<GradientsParams> {
    let total: usize = slots.iter().map(|s| s.len).sum();
    let n = flat.shape().num_elements();
    if total != n {
        return Err(Error::Invalid(format!(
            "gradient buffer has {n} values, the model has {total}"
        )));
    }
    let mut o = 0;
    let parts = slots.iter().map(|s| {
        o += s.len;
        flat.clone().slice(o - s.len..o)
    });
    grads_from_parts(parts.collect(), slots)
}

/// The gradients of the trainable parameters, each flattened, in visit order (on the device).
pub fn grad_parts<M: Module>(module: &M, grads: &GradientsParams) -> Result<Vec<Tensor<1>>> {
    gather_grads(module, grads, None)
}

/// Gradients from one flat tensor per slot (as [`grad_parts`] gives them).
pub fn grads_from_parts(parts: Vec<Tensor<1>>, slots: &[Slot]) -> Result<GradientsParams> {
    if parts.len() != slots.len() {
        return Err(Error::Invalid(format!(
            "{} gradient tensors for {} parameters",
            parts.len(),
            slots.len()
        )));
    }
    let mut grads = GradientsParams::new();
    for (part, s) in parts.into_iter().zip(slots) {
        let n = part.shape().num_elements();
        if n != s.len {
            return Err(Error::Invalid(format!(
                "a gradient of {n} values for a parameter of {}",
                s.len
            )));
        }
        match s.shape.len() {
            1 => grads.register::<1>(s.id, part.reshape([s.shape[0]])),
            2 => grads.register::<2>(s.id, part.reshape([s.shape[0], s.shape[1]])),
            3 => grads.register::<3>(s.id, part.reshape([s.shape[0], s.shape[1], s.shape[2]])),
            4 => grads.register::<4>(
                s.id,
                part.reshape([s.shape[0], s.shape[1], s.shape[2], s.shape[3]]),
            ),
            r => return Err(Error::Invalid(format!("unsupported parameter rank {r}"))),
        }
    }
    Ok(grads)
}

/// Gradients rebuilt from a flat buffer laid out as `slots`, on `device`.
pub fn unflatten_grads(flat: &[f32], slots: &[Slot], device: &Device) -> Result<GradientsParams> {
    let total: usize = slots.iter().map(|s| s.len).sum();
    if total != flat.len() {
        return Err(Error::Invalid(format!(
            "gradient buffer has {} values, the model has {total}",
            flat.len()
        )));
    }
    let mut o = 0;
    let parts = slots.iter().map(|s| {
        o += s.len;
        Tensor::<1>::from_data(
            TensorData::new(flat[o - s.len..o].to_vec(), [s.len]),
            device,
        )
    });
    grads_from_parts(parts.collect(), slots)
}

struct Scatter<'a> {
    select: Select,
    flat: &'a [f32],
    offset: usize,
}

impl ModuleMapper for Scatter<'_> {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        if !self.select.wants(param.is_require_grad()) {
            return param;
        }
        let dims = param.shape().dims::<D>();
        let n: usize = dims.iter().product();
        let start = self.offset.min(self.flat.len());
        let end = (self.offset + n).min(self.flat.len());
        self.offset += n;
        if end - start != n {
            return param; // caught by the length check in `assign_values`
        }
        let values = self.flat[start..end].to_vec();
        param.map(|t| {
            let device = t.device();
            let require_grad = t.is_require_grad();
            let fresh = Tensor::<D>::from_data(TensorData::new(values, dims), &device);
            if require_grad {
                fresh.require_grad()
            } else {
                fresh
            }
        })
    }
}

/// Overwrites the selected tensors of `module` with values from a flat buffer (visit order).
pub fn assign_values<M: Module>(module: M, select: Select, flat: &[f32]) -> Result<M> {
    let expected: usize = layout(&module, select).iter().map(|s| s.len).sum();
    if expected != flat.len() {
        return Err(Error::Invalid(format!(
            "state buffer has {} values, the model expects {expected}",
            flat.len()
        )));
    }
    let mut s = Scatter {
        select,
        flat,
        offset: 0,
    };
    Ok(module.map(&mut s))
}

/// FNV-1a 64 hash of the bit patterns of a buffer: equal hashes on all ranks mean
/// bit-identical weights.
pub fn hash_f32(values: &[f32]) -> u64 {
    crate::util::fnv1a(values.iter().flat_map(|v| v.to_bits().to_le_bytes()))
}
