//! Compute backends: `cpu` = burn's flex backend on a rayon pool sized by `--threads`;
//! `gpu` = burn's wgpu backend on a chosen adapter. Both are compiled in. Here too: which
//! device each rank of a job takes, and what the model's operations must know about it
//! ([`DeviceCaps`]).

use std::fmt::Write;

use burn::tensor::{Device, DeviceKind};
use serde::{Deserialize, Serialize};

use crate::bench::conv_choice::ConvChoice;
use crate::comm::Communicator;
use crate::error::{Error, Result};
use crate::model::gpu_conv::CoopTile;
use crate::model::{DeviceCaps, GpuConv};
use crate::train::precision::PrecisionUsed;
use crate::wgsl::Compiler;

/// Which backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// burn flex: multi-threaded CPU.
    Cpu,
    /// burn wgpu: Vulkan/Metal/DX12 compute shaders (WGSL).
    Gpu,
}

impl BackendKind {
    /// `"cpu"` or `"gpu"` (as in `summary.json`).
    pub fn name(self) -> &'static str {
        match self {
            Self::Cpu => "cpu",
            Self::Gpu => "gpu",
        }
    }
}

/// What a rank asks for: the backend, its CPU threads (0: all cores) and its adapter.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceRequest {
    /// Which backend.
    pub kind: BackendKind,
    /// CPU threads (0: all cores, or this rank's share of them under MPI).
    pub threads: usize,
    /// GPU adapter index (`None`: the first hardware adapter, or under MPI one per local rank).
    pub adapter: Option<usize>,
    /// The 3×3 convolutions' kernels on a GPU.
    pub gpu_conv: GpuConv,
    /// Whether mixed precision may run on the adapter's cooperative matrices (where it has
    /// them); `false` keeps it on the register kernels.
    pub cooperative_matrices: bool,
}

impl DeviceRequest {
    /// This rank's share of the node: ranks on one node split its cores (unless `threads` is
    /// given) and take adapter `local_rank % adapters` (unless `adapter` is given).
    pub fn for_rank(&self, comm: &dyn Communicator) -> Self {
        let mut r = self.clone();
        if r.threads == 0 && comm.local_size() > 1 {
            let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
            r.threads = (cores / comm.local_size()).max(1);
        }
        if r.kind == BackendKind::Gpu && r.adapter.is_none() && comm.size() > 1 {
            let n = list_adapters().len().max(1);
            r.adapter = Some(comm.local_rank() % n);
        }
        r
    }
}

/// One graphics adapter as the GPU backend sees it.
#[derive(Clone, Debug)]
pub struct Adapter {
    /// Index for `--adapter`.
    pub index: usize,
    /// Adapter name.
    pub name: String,
    /// Driver name and version.
    pub driver: String,
    /// Discrete / integrated / virtual / CPU (software) / other.
    pub device_type: String,
    /// Graphics API.
    pub backend: String,
    /// What the adapter offers the kernels (f16 arithmetic, timestamps, cooperative matrices).
    pub caps: AdapterCaps,
    kind: DeviceKind,
}

/// The adapter features that decide a GPU kernel path, as wgpu reports them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AdapterCaps {
    /// f16 arithmetic in shaders (`SHADER_F16`).
    pub shader_f16: bool,
    /// Timestamp queries (`TIMESTAMP_QUERY`): `bench step --profile` times kernels on the device.
    pub timestamp_query: bool,
    /// Cooperative-matrix (tensor-core) shapes wgpu exposes (`EXPERIMENTAL_COOPERATIVE_MATRIX`),
    /// as `MxNxK A/B-type->accumulator-type`; empty when it exposes none.
    pub cooperative_matrix: Vec<String>,
    /// The cooperative matrices ctseg's convolution kernels use in mixed precision, if any fit.
    pub coop: Option<CoopTile>,
}

impl AdapterCaps {
    fn of(adapter: &wgpu::Adapter) -> Self {
        let f = adapter.features();
        let shapes = if f.contains(wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX) {
            adapter.cooperative_matrix_properties()
        } else {
            Vec::new()
        };
        let cooperative_matrix = shapes
            .iter()
            .map(|p| {
                format!(
                    "{}x{}x{} {:?}->{:?}",
                    p.m_size, p.n_size, p.k_size, p.ab_type, p.cr_type
                )
            })
            .collect();
        use wgpu::CooperativeScalarType as Scalar;
        let square_f16_to_f32: Vec<u32> = shapes
            .iter()
            .filter(|p| p.m_size == p.n_size && p.n_size == p.k_size)
            .filter(|p| p.ab_type == Scalar::F16 && p.cr_type == Scalar::F32)
            .map(|p| p.m_size)
            .collect();
        let shader_f16 = f.contains(wgpu::Features::SHADER_F16);
        let coop = CoopTile::choose(
            &square_f16_to_f32,
            shader_f16,
            f.contains(wgpu::Features::SUBGROUP),
            adapter.get_info().subgroup_max_size,
            adapter.limits().max_compute_workgroup_storage_size,
        );
        Self {
            shader_f16,
            timestamp_query: f.contains(wgpu::Features::TIMESTAMP_QUERY),
            cooperative_matrix,
            coop,
        }
    }

    /// The kernel paths `--gpu-conv` and `--precision` choose between on this adapter.
    pub fn paths(&self) -> String {
        let mixed = match self.coop {
            Some(t) => format!("f16 operands on {}, f32 accumulation", t.describe()),
            None => {
                "f16 operands, f32 accumulation in registers (no cooperative matrices they can use)"
                    .into()
            }
        };
        format!(
            "convolutions in f32: burn's kernels or ctseg's, whichever runs the model faster, timed at start-up (--gpu-conv auto, the default), or as --gpu-conv burn|wgsl says; --precision mixed: ctseg's kernels with {mixed}"
        )
    }

    /// [`Self::paths`] in a `spirv` build on a Vulkan adapter, where cubecl compiles every
    /// kernel to SPIR-V.
    pub fn spirv_paths() -> &'static str {
        "this build (feature `spirv`) compiles its kernels to SPIR-V: convolutions are burn's (--gpu-conv wgsl is refused); --precision mixed: cubek's implicit-GEMM kernels with f16 operands on the cooperative matrices cubecl finds, f32 accumulation (f32 throughout where it finds none)"
    }

    /// One line for `ctseg adapters`.
    pub fn describe(&self) -> String {
        let yes = |b: bool| if b { "yes" } else { "no" };
        let coop = if self.cooperative_matrix.is_empty() {
            "none".to_string()
        } else {
            self.cooperative_matrix.join(", ")
        };
        format!(
            "f16 shaders {}, timestamp queries {}, cooperative matrices: {coop}",
            yes(self.shader_f16),
            yes(self.timestamp_query)
        )
    }
}

/// A private `XDG_RUNTIME_DIR` for Mesa (which warns without a usable one), when the variable
/// is unset or not a directory: a fresh directory created with mode 0700 (never an existing
/// one another user could have prepared). Returns the directory to set, or `None` to keep the
/// environment as it is. The caller ([`prepare_process_environment`]) sets it.
fn private_xdg_runtime_dir() -> Option<std::path::PathBuf> {
    let ok = std::env::var_os("XDG_RUNTIME_DIR")
        .map(std::path::PathBuf::from)
        .is_some_and(|p| p.is_dir());
    if ok {
        return None;
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        for k in 0..16u32 {
            let dir = std::env::temp_dir().join(format!("ctseg-xdg-{}-{k}", std::process::id()));
            // `create` (not `create_all`) fails on an existing path: the directory is ours.
            if std::fs::DirBuilder::new().mode(0o700).create(&dir).is_ok() {
                return Some(dir);
            }
        }
        None
    }
    #[cfg(not(unix))]
    None
}

/// Prepares the process environment for the graphics drivers. Must be called first thing in
/// `main`, before any thread exists (MPI and rayon start threads; `set_var` with other threads
/// running is a data race).
pub fn prepare_process_environment() {
    if let Some(dir) = private_xdg_runtime_dir() {
        // SAFETY: `main` calls this before it starts any thread.
        unsafe { std::env::set_var("XDG_RUNTIME_DIR", &dir) };
    }
    configure_kernel_cache();
}

/// Where GPU kernels and autotune results are kept across runs and clones:
/// `$CTSEG_CACHE_DIR`, else `$XDG_CACHE_HOME/ctseg`, else `~/.cache/ctseg` (cubecl's database
/// goes under `cubecl/` there). Deleting the directory only costs a re-tune.
pub fn kernel_cache_dir() -> std::path::PathBuf {
    let env = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(std::path::PathBuf::from)
    };
    env("CTSEG_CACHE_DIR")
        .or_else(|| env("XDG_CACHE_HOME").map(|d| d.join("ctseg")))
        .or_else(|| env("HOME").map(|h| h.join(".cache").join("ctseg")))
        .unwrap_or_else(|| std::env::temp_dir().join("ctseg-cache"))
}

/// Points cubecl's persistent caches (autotune results, compiled kernels) at
/// [`kernel_cache_dir`] instead of its default, the `target/` directory of the nearest Cargo
/// project (one per clone: every fresh clone re-tuned on lavapipe for minutes). A `cubecl.toml`
/// that names another place, or the `CUBECL_*` variables, still win. Takes effect only before
/// the first GPU device is created; later calls do nothing.
pub fn configure_kernel_cache() {
    use burn_cubecl::cubecl::config::cache::CacheConfig;
    use burn_cubecl::cubecl::config::{CubeClRuntimeConfig, RuntimeConfig};
    let mut cfg = CubeClRuntimeConfig::from_current_dir().override_from_env();
    if matches!(cfg.environment.path, CacheConfig::Target) {
        cfg.environment.path = CacheConfig::Directory(kernel_cache_dir().join("cubecl"));
    }
    let _ = CubeClRuntimeConfig::try_set(cfg);
}

/// The adapters the GPU backend would use: those of the first graphics API (Vulkan, then GL;
/// only those `WGPU_BACKEND` names, when set) that offers a hardware adapter, or failing that
/// the first offering any (e.g. lavapipe).
pub fn list_adapters() -> Vec<Adapter> {
    let mut software: Option<Vec<(wgpu::AdapterInfo, AdapterCaps)>> = None;
    let mut chosen: Option<Vec<(wgpu::AdapterInfo, AdapterCaps)>> = None;
    // wgpu's own variable, e.g. WGPU_BACKEND=vulkan, narrows the graphics APIs searched.
    let wanted = wgpu::Backends::from_env().unwrap_or(wgpu::Backends::all());
    for api in [wgpu::Backend::Vulkan, wgpu::Backend::Gl] {
        if !wanted.contains(api.into()) {
            continue;
        }
        let instance = wgpu::Instance::new(wgpu::InstanceDescriptor {
            backends: api.into(),
            ..wgpu::InstanceDescriptor::new_without_display_handle()
        });
        let infos: Vec<(wgpu::AdapterInfo, AdapterCaps)> =
            pollster::block_on(instance.enumerate_adapters(api.into()))
                .iter()
                .map(|a| (a.get_info(), AdapterCaps::of(a)))
                .collect();
        if infos
            .iter()
            .any(|(a, _)| a.device_type != wgpu::DeviceType::Cpu)
        {
            chosen = Some(infos);
            break;
        }
        if software.is_none() && !infos.is_empty() {
            software = Some(infos);
        }
    }
    let infos = chosen.or(software).unwrap_or_default();
    let mut counters = [0usize; 4];
    infos
        .into_iter()
        .enumerate()
        .map(|(index, (info, caps))| {
            let (ty, kind) = match info.device_type {
                wgpu::DeviceType::DiscreteGpu => ("discrete GPU", {
                    counters[0] += 1;
                    DeviceKind::DiscreteGpu(counters[0] - 1)
                }),
                wgpu::DeviceType::IntegratedGpu => ("integrated GPU", {
                    counters[1] += 1;
                    DeviceKind::IntegratedGpu(counters[1] - 1)
                }),
                wgpu::DeviceType::VirtualGpu => ("virtual GPU", {
                    counters[2] += 1;
                    DeviceKind::VirtualGpu(counters[2] - 1)
                }),
                wgpu::DeviceType::Cpu => ("CPU (software)", DeviceKind::Cpu),
                wgpu::DeviceType::Other => ("other", {
                    counters[3] += 1;
                    DeviceKind::DefaultDevice
                }),
            };
            Adapter {
                index,
                name: info.name.clone(),
                driver: format!("{} {}", info.driver, info.driver_info)
                    .trim()
                    .to_string(),
                device_type: ty.into(),
                backend: format!("{:?}", info.backend),
                caps,
                kind,
            }
        })
        .collect()
}

/// A readable list of adapters.
pub fn describe_adapters(adapters: &[Adapter]) -> String {
    let mut s = String::new();
    if adapters.is_empty() {
        s.push_str("  (none)\n");
    }
    for a in adapters {
        let _ = writeln!(
            s,
            "  [{}] {} ({}, {}, driver {})\n      {}\n      {}",
            a.index,
            a.name,
            a.device_type,
            a.backend,
            a.driver,
            a.caps.describe(),
            if crate::wgsl::SPIRV_BUILD && a.backend == "Vulkan" {
                AdapterCaps::spirv_paths().to_string()
            } else {
                a.caps.paths()
            }
        );
    }
    s
}

const GPU_HELP: &str = "To get an adapter: install your GPU's Vulkan driver (NVIDIA: the proprietary driver; AMD/Intel: Mesa's `mesa-vulkan-drivers`) and the loader `libvulkan1`; on a machine without a GPU, Mesa's lavapipe (`apt install mesa-vulkan-drivers libvulkan1`) gives a slow software adapter. `vulkaninfo --summary` shows what Vulkan sees.";

/// A ready compute device and its description.
#[derive(Clone, Debug)]
pub struct Backend {
    /// The device (without autodiff).
    pub device: Device,
    /// Human-readable description.
    pub description: String,
    /// Which backend.
    pub kind: BackendKind,
    /// What the model's operations must know about the device.
    pub caps: DeviceCaps,
    /// The precision it computes in (f32 unless [`crate::train::precision::apply`] says
    /// otherwise; `caps.f16_operands` follows it).
    pub precision: PrecisionUsed,
    /// How `--gpu-conv auto` chose `caps.gpu_conv` (`None`: it did not choose).
    pub conv_choice: Option<ConvChoice>,
    /// The adapter as wgpu names it (name, driver and version, type, graphics API); `None` on
    /// the CPU. Keys what is measured on it and kept across runs ([`crate::bench::conv_cache`]).
    pub adapter: Option<String>,
}

impl Backend {
    /// The backend with its 3×3 convolutions on the kernels `choice` chose, its measurement
    /// added to the description beside the kernels it names.
    pub fn with_conv_choice(mut self, choice: ConvChoice) -> Self {
        let old = conv_description(&self.caps);
        self.caps.gpu_conv = choice.chosen;
        let new = format!("{}, {}", conv_description(&self.caps), choice.describe());
        // open_gpu wrote `old` into the description; should a later change move it, the
        // choice is still said, at the end.
        if self.description.contains(&old) {
            self.description = self.description.replacen(&old, &new, 1);
        } else {
            self.description.push_str(&format!(" ({new})"));
        }
        self.conv_choice = Some(choice);
        self
    }
}

/// The shader-loop cap of Mesa's lavapipe (Mesa 22.3, measured): loops stop after 65,535
/// iterations.
pub const LAVAPIPE_LOOP_CAP: usize = 65_535;

/// Whether `device` completes long shader loops: sums two rows of 200,001 ones (an odd length,
/// so the reduction reads one value per loop iteration) and checks the result. Mesa's lavapipe
/// stops loops after 65,535 iterations and returns 65,535-ish here.
pub fn long_loops_work(device: &Device) -> bool {
    let n = 200_001usize;
    let t = burn::tensor::Tensor::<2>::ones([2, n], device);
    let sums = crate::tensor_util::read(t.sum_dim(1))
        .ok()
        .and_then(|d| d.try_to_vec::<f32>().ok())
        .unwrap_or_default();
    sums.len() == 2 && sums.iter().all(|&s| s == n as f32)
}

/// Sizes the global rayon pool (used by flex). Only the first call in a process takes effect.
pub fn init_cpu_threads(threads: usize) -> usize {
    let n = if threads == 0 {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    } else {
        threads
    };
    let _ = rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .build_global();
    rayon::current_num_threads()
}

/// Opens the backend of `req`: `threads` sizes the CPU pool (0: all cores); `adapter` picks a
/// GPU adapter by index (`None`: the first hardware adapter, else the first software one).
pub fn open(req: &DeviceRequest) -> Result<Backend> {
    match req.kind {
        BackendKind::Cpu => Ok(open_cpu(req.threads)),
        BackendKind::Gpu => open_gpu(req),
    }
}

fn open_cpu(threads: usize) -> Backend {
    let n = init_cpu_threads(threads);
    Backend {
        device: Device::flex(),
        description: format!(
            "cpu (burn flex, {n} thread{})",
            if n == 1 { "" } else { "s" }
        ),
        kind: BackendKind::Cpu,
        caps: DeviceCaps::default(),
        precision: PrecisionUsed::default(),
        conv_choice: None,
        adapter: None,
    }
}

fn open_gpu(req: &DeviceRequest) -> Result<Backend> {
    // 1. The adapter: the one asked for, else the first hardware one, else a software one.
    configure_kernel_cache();
    let adapters = list_adapters();
    let chosen = choose_adapter(&adapters, req.adapter)?;
    // 2. The device, brought up now, so that a broken driver fails here with the list.
    let device = Device::wgpu(chosen.kind.clone());
    let probe = crate::comm::catch_panic(|| {
        let t = burn::tensor::Tensor::<1>::from_floats([1.0, 2.0], &device);
        t.sum().into_data()
    });
    if !matches!(probe, Ok(d) if d.try_to_vec::<f32>().ok() == Some(vec![3.0])) {
        return Err(Error::Device(format!(
            "--backend gpu: adapter [{}] {} could not run a test kernel. Adapters found:\n{}{GPU_HELP}",
            chosen.index,
            chosen.name,
            describe_adapters(&adapters)
        )));
    }
    // 3. Which kernel paths it gets. ctseg's WGSL kernels (its convolutions, its
    //    cooperative-matrix tiles) load only where cubecl compiles kernels to WGSL.
    let spirv = crate::wgsl::compiler(&device) == Compiler::SpirV;
    if spirv && req.gpu_conv == GpuConv::Wgsl {
        return Err(Error::Argument(format!(
            "--gpu-conv wgsl: adapter [{}] {}: this build (feature `spirv`) compiles kernels to SPIR-V, where ctseg's WGSL kernels cannot load; use --gpu-conv burn, or a build without `spirv`",
            chosen.index, chosen.name
        )));
    }
    let caps = DeviceCaps {
        shader_loop_cap: (!long_loops_work(&device)).then_some(LAVAPIPE_LOOP_CAP),
        gpu_conv: req.gpu_conv,
        f16_operands: false,
        coop: chosen
            .caps
            .coop
            .filter(|_| req.cooperative_matrices && !spirv),
    };
    // 4. Its description for the log and the summary.
    let compiled = if spirv {
        ", kernels compiled to SPIR-V by cubecl"
    } else {
        ""
    };
    Ok(Backend {
        description: format!(
            "gpu (burn wgpu, adapter [{}] {}, {}, {}{compiled}{})",
            chosen.index,
            chosen.name,
            chosen.device_type,
            chosen.backend,
            conv_description(&caps)
        ),
        device,
        kind: BackendKind::Gpu,
        caps,
        precision: PrecisionUsed::default(),
        conv_choice: None,
        adapter: Some(format!(
            "{} | {} | {} | {}",
            chosen.name, chosen.driver, chosen.device_type, chosen.backend
        )),
    })
}

/// The part of a GPU backend's description that says how its convolutions run.
fn conv_description(caps: &DeviceCaps) -> String {
    let capped = match (caps.shader_loop_cap, caps.gpu_conv) {
        (Some(_), GpuConv::Burn) => ", loop-capped: convolutions split into exact chunks",
        (Some(_), GpuConv::Wgsl) => ", loop-capped",
        (None, _) => "",
    };
    format!("{capped}; {}", caps.gpu_conv.describe())
}

/// Adapter `index` of `adapters`, or without one the first hardware adapter, else the first.
fn choose_adapter(adapters: &[Adapter], index: Option<usize>) -> Result<&Adapter> {
    let Some(first) = adapters.first() else {
        return Err(Error::Device(format!(
            "--backend gpu: no graphics adapter found (Vulkan and OpenGL were asked).\n{GPU_HELP}"
        )));
    };
    match index {
        Some(i) => adapters.get(i).ok_or_else(|| {
            Error::Argument(format!(
                "--adapter {i}: there are {} adapter(s):\n{}",
                adapters.len(),
                describe_adapters(adapters)
            ))
        }),
        None => Ok(adapters
            .iter()
            .find(|a| a.device_type != "CPU (software)")
            .unwrap_or(first)),
    }
}
