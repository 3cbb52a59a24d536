//! Hand-written WGSL kernels (`shaders/`) on burn's wgpu device: the kernel wrapper cubecl
//! launches, the tensors' buffers in and out of burn's fusion layer. Used by the fp16 gradient
//! compression ([`crate::fp16`]), the 3×3 convolution ([`crate::model::gpu_conv`]) and batch
//! normalisation ([`crate::model::gpu_norm`]).

use burn::tensor::{DType, Device, Shape, Tensor};
use burn_cubecl::cubecl::ir::{UIntKind, metadata::Info};
use burn_cubecl::cubecl::prelude::*;
use burn_cubecl::cubecl::{CubeKernel, PrecompiledSource};
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::{Cube, CubeBackend};
use burn_dispatch::DispatchDevice;
use burn_fusion::NoOp;
use burn_fusion::custom::{OperationIr, OperationOutput, StreamId};

use crate::error::Error;

/// A kernel's WGSL source: `shaders/f16.wgsl` (the binary16 conversions every kernel may use),
/// then each of `shaders/<name>…` in order (shared pieces first, the kernel last). Kernels on
/// cooperative matrices put the adapter's `enable` header before it
/// ([`crate::model::gpu_conv`]).
macro_rules! shader {
    ($($name:literal),+) => {
        concat!(
            include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/shaders/f16.wgsl")),
            $(include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/shaders/", $name))),+
        )
    };
}
pub(crate) use shader;

/// A precompiled WGSL kernel with entry point `main` and a 1-D workgroup of [`WORKGROUP`]
/// invocations (the size every source in `shaders/` declares).
struct WgslKernel {
    source: &'static str,
    name: &'static str,
}

impl KernelMetadata for WgslKernel {
    /// The shader's own name in profiles (`bench step --profile`), not this wrapper's.
    fn name(&self) -> &'static str {
        self.name
    }

    fn id(&self) -> KernelId {
        KernelId::new::<Self>().info((self.name, crc32fast::hash(self.source.as_bytes())))
    }

    fn address_type(&self) -> ElemType {
        ElemType::UInt(UIntKind::U32)
    }
}

impl CubeKernel for WgslKernel {
    fn define(&self) -> KernelDefinition {
        let settings = KernelSettings::new(
            CubeDim::new_1d(WORKGROUP).0,
            ExecutionMode::Checked,
            AddressType::U32,
        );
        KernelDefinition {
            body: Scope::root(settings.clone()),
            settings,
            info: Info::default(),
        }
    }

    fn source(&self) -> Option<PrecompiledSource> {
        Some(PrecompiledSource {
            source: self.source.to_string(),
            entrypoint_name: "main".to_string(),
            lang: "wgsl",
        })
    }
}

/// The wgpu device under `device` (with or without autodiff) where ctseg's WGSL kernels can
/// load, `None` for other devices and for a wgpu device whose kernels cubecl compiles to SPIR-V
/// (it refuses precompiled WGSL there): every caller then takes its portable path.
pub(crate) fn cube_device(device: &Device) -> Option<burn_cubecl::CubeDevice> {
    any_cube_device(device).filter(|d| compiler_of(d) == Compiler::Wgsl)
}

/// The wgpu device under `device` (with or without autodiff), whatever its kernel compiler.
pub(crate) fn any_cube_device(device: &Device) -> Option<burn_cubecl::CubeDevice> {
    let device = device.clone().without_autodiff();
    #[allow(unreachable_patterns)]
    match device.as_dispatch() {
        DispatchDevice::Cube(d) => Some(d.clone()),
        _ => None,
    }
}

/// What cubecl compiles a wgpu device's kernels to.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Compiler {
    /// WGSL, which wgpu translates for the driver (every build; ctseg's kernels load here).
    #[default]
    Wgsl,
    /// SPIR-V from cubecl's own compiler (a `spirv` build on a Vulkan adapter): cooperative
    /// matrices for cubecl's kernels, no precompiled WGSL.
    SpirV,
}

/// Whether this binary was built with the `spirv` feature (Vulkan adapters compile to SPIR-V).
pub const SPIRV_BUILD: bool = cfg!(feature = "spirv");

/// `cube`'s kernel compiler. Without the `spirv` feature it is WGSL, decided without asking
/// cubecl (every WGSL kernel launch passes here).
pub(crate) fn compiler_of(cube: &burn_cubecl::CubeDevice) -> Compiler {
    // cubecl-wgpu names the runtime `wgpu<spirv>` when it compiles to SPIR-V.
    if SPIRV_BUILD && cube.client().name().contains("spirv") {
        Compiler::SpirV
    } else {
        Compiler::Wgsl
    }
}

/// The kernel compiler of `device` (WGSL for devices that are not wgpu's: nothing to choose).
pub fn compiler(device: &Device) -> Compiler {
    any_cube_device(device).map_or(Compiler::Wgsl, |d| compiler_of(&d))
}

/// burn's tensor primitive on the wgpu device without autodiff (the fusion layer's).
pub(crate) type Fused = <Cube as burn::backend::BackendTypes>::FloatTensorPrimitive;

/// The contiguous f32 buffer behind a tensor on the wgpu device without autodiff (queued
/// operations that produce it run first), for ctseg's WGSL kernels; `None` for any other tensor
/// and where those kernels cannot load ([`cube_device`]).
pub(crate) fn f32_buffer<const D: usize>(t: &Tensor<D>) -> Option<CubeTensor> {
    cube_device(&t.device())?;
    let fused = t.clone().try_into_primitive::<Cube>().ok()?;
    (fused.dtype == DType::F32).then(|| resolve(fused))
}

/// The contiguous buffer behind a fused primitive (queued operations that produce it run
/// first), whatever its element type: the caller knows it.
pub(crate) fn resolve(fused: Fused) -> CubeTensor {
    let client = fused.client.clone();
    into_contiguous(client.resolve_tensor_float::<CubeBackend>(fused))
}

/// A contiguous f32 buffer written by a kernel, handed to the fusion layer the way burn's own
/// `float_from_data` does (an init operation that registers the handle), so later (fused)
/// operations see an ordinary tensor.
pub(crate) fn f32_tensor<const D: usize>(
    cube: &burn_cubecl::CubeDevice,
    buffer: burn_cubecl::cubecl::server::Handle,
    shape: [usize; D],
) -> Tensor<D> {
    Tensor::<D>::from_primitive::<Cube>(f32_fused(cube, buffer, &shape))
}

/// [`f32_tensor`]'s primitive.
pub(crate) fn f32_fused(
    cube: &burn_cubecl::CubeDevice,
    buffer: burn_cubecl::cubecl::server::Handle,
    shape: &[usize],
) -> Fused {
    let shape = Shape::from(shape.to_vec());
    let tensor = CubeTensor::new_contiguous(
        cube.client(),
        cube.clone(),
        shape.clone(),
        buffer,
        DType::F32,
    );
    let fclient = burn_fusion::get_client::<CubeBackend>(cube);
    let handle = <CubeBackend as burn_ir::BackendIr>::float_tensor_handle(tensor);
    let desc = burn_ir::InitOperationIr::create(shape, DType::F32, || {
        fclient.register_tensor_handle(handle)
    });
    fclient
        .register(
            StreamId::current(),
            OperationIr::Init(desc),
            NoOp::<CubeBackend>::new(),
        )
        .output()
}

/// Invocations per workgroup of every kernel in `shaders/` (`@workgroup_size(256, 1, 1)`).
pub(crate) const WORKGROUP: u32 = 256;
/// The largest workgroup count in one grid dimension that every adapter accepts.
pub(crate) const MAX_GROUPS: usize = 65_535;

/// The 2-D grid of workgroups that covers `items` invocations, one per item (a kernel folds it
/// back with its `workgroups in x` info value); `None` beyond the grid.
pub(crate) fn grid_1d(items: usize) -> Option<(u32, u32)> {
    let groups = items.div_ceil(WORKGROUP as usize).max(1);
    let x = groups.min(MAX_GROUPS);
    let y = groups.div_ceil(x);
    (y <= MAX_GROUPS).then_some((x as u32, y as u32))
}

/// Launches the WGSL kernel `name` (source `source`, [`WORKGROUP`] invocations per workgroup) on
/// a `grid` of workgroups with `buffers` bound in order, then an `info` buffer holding `info`
/// (the layout every kernel in `shaders/` uses).
pub(crate) fn launch(
    client: &burn_cubecl::cubecl::client::Client,
    (source, name): (&'static str, &'static str),
    grid: (u32, u32, u32),
    buffers: &[&burn_cubecl::cubecl::server::Handle],
    info: &[u32],
) {
    let info = client.create_from_slice(&u32_bytes(info));
    let mut bindings: Vec<_> = buffers.iter().map(|h| (*h).clone().binding()).collect();
    bindings.push(info.binding());
    client.launch(
        Box::new(WgslKernel { source, name }),
        CubeCount::Static(grid.0, grid.1, grid.2),
        burn_cubecl::cubecl::server::KernelArguments::new().with_buffers(bindings),
    );
}

/// Little-endian bytes of `values` (a kernel's `info` buffer).
pub(crate) fn u32_bytes(values: &[u32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// A device error from kernel `what`.
pub(crate) fn gpu_err(what: &str, e: impl std::fmt::Debug) -> Error {
    Error::Device(format!("{what} kernel: {e:?}"))
}
