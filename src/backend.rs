//! Compute backends: `cpu` = burn's flex backend on a rayon pool sized by `--threads`;
//! `gpu` = burn's wgpu backend on a chosen adapter. Both are compiled in.

use std::fmt::Write;

use burn::tensor::{Device, DeviceKind};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Which backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// burn flex: multi-threaded CPU.
    Cpu,
    /// burn wgpu: Vulkan/Metal/DX12 compute shaders (WGSL).
    Gpu,
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
    kind: DeviceKind,
}

/// Points `XDG_RUNTIME_DIR` at a private directory when it is unset or unusable (Mesa prints
/// warnings otherwise).
fn ensure_xdg_runtime_dir() {
    let ok = std::env::var_os("XDG_RUNTIME_DIR")
        .map(std::path::PathBuf::from)
        .is_some_and(|p| p.is_dir());
    if !ok {
        let dir = std::env::temp_dir().join(format!("ctseg-xdg-{}", std::process::id()));
        if std::fs::create_dir_all(&dir).is_ok() {
            #[cfg(unix)]
            {
                use std::os::unix::fs::PermissionsExt;
                let _ = std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700));
            }
            // SAFETY: called before any other thread of ours reads the environment (backend
            // selection happens first thing in the process).
            unsafe { std::env::set_var("XDG_RUNTIME_DIR", &dir) };
        }
    }
}

/// The adapters the GPU backend would use: those of the first graphics API (Vulkan, then GL)
/// that offers a hardware adapter, or failing that the first offering any (e.g. lavapipe).
pub fn list_adapters() -> Vec<Adapter> {
    ensure_xdg_runtime_dir();
    let mut software: Option<Vec<wgpu::AdapterInfo>> = None;
    let mut chosen: Option<Vec<wgpu::AdapterInfo>> = None;
    for api in [wgpu::Backend::Vulkan, wgpu::Backend::Gl] {
        let instance = wgpu::Instance::new(wgpu::InstanceDescriptor {
            backends: api.into(),
            ..wgpu::InstanceDescriptor::new_without_display_handle()
        });
        let infos: Vec<wgpu::AdapterInfo> =
            pollster::block_on(instance.enumerate_adapters(api.into()))
                .iter()
                .map(wgpu::Adapter::get_info)
                .collect();
        if infos.iter().any(|a| a.device_type != wgpu::DeviceType::Cpu) {
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
        .map(|(index, info)| {
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
            "  [{}] {} ({}, {}, driver {})",
            a.index, a.name, a.device_type, a.backend, a.driver
        );
    }
    s
}

const GPU_HELP: &str = "To get an adapter: install your GPU's Vulkan driver (NVIDIA: the proprietary driver; AMD/Intel: Mesa's `mesa-vulkan-drivers`) and the loader `libvulkan1`; on a machine without a GPU, Mesa's lavapipe (`apt install mesa-vulkan-drivers libvulkan1`) gives a slow software adapter. `vulkaninfo --summary` shows what Vulkan sees.";

/// A ready compute device and its description.
pub struct Backend {
    /// The device (without autodiff).
    pub device: Device,
    /// Human-readable description.
    pub description: String,
    /// Which backend.
    pub kind: BackendKind,
    /// Convolution chunk limit for adapters that cap shader loops (0: none); see
    /// [`crate::model::layers::chunked_rows`].
    pub chunk_limit: usize,
}

/// Chunk limit used on adapters that fail [`long_loops_work`]. Measured on lavapipe (Mesa 22.3):
/// burn's weight-gradient kernel for a 3×3 convolution breaks once the contraction exceeds
/// ~21,800 values (65,535 / 3: its loop runs three times per value), so the limit leaves room
/// for a kernel that loops once per tap: 65,535 / 9 ≈ 7,281, rounded down.
pub const LOOP_CAPPED_CHUNK: usize = 7_168;

/// Whether `device` completes long shader loops: sums two rows of 200,001 ones (an odd length,
/// so the reduction reads one value per loop iteration) and checks the result. Mesa's lavapipe
/// stops loops after 65,535 iterations and returns 65,535-ish here.
pub fn long_loops_work(device: &Device) -> bool {
    let n = 200_001usize;
    let t = burn::tensor::Tensor::<2>::ones([2, n], device);
    let sums = t
        .sum_dim(1)
        .into_data()
        .try_to_vec::<f32>()
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

/// Opens the backend. `threads` sizes the CPU pool (0: all cores); `adapter` picks a GPU
/// adapter by index (`None`: the first hardware adapter, else the first software one).
pub fn open(kind: BackendKind, threads: usize, adapter: Option<usize>) -> Result<Backend> {
    match kind {
        BackendKind::Cpu => {
            let n = init_cpu_threads(threads);
            Ok(Backend {
                device: Device::flex(),
                description: format!(
                    "cpu (burn flex, {n} thread{})",
                    if n == 1 { "" } else { "s" }
                ),
                kind,
                chunk_limit: 0,
            })
        }
        BackendKind::Gpu => {
            let adapters = list_adapters();
            if adapters.is_empty() {
                return Err(Error::Device(format!(
                    "--backend gpu: no graphics adapter found (Vulkan and OpenGL were asked).\n{GPU_HELP}"
                )));
            }
            let chosen = match adapter {
                Some(i) => adapters.get(i).ok_or_else(|| {
                    Error::Device(format!(
                        "--adapter {i}: there are {} adapter(s):\n{}",
                        adapters.len(),
                        describe_adapters(&adapters)
                    ))
                })?,
                None => adapters
                    .iter()
                    .find(|a| a.device_type != "CPU (software)")
                    .unwrap_or(&adapters[0]),
            };
            let device = Device::wgpu(chosen.kind.clone());
            // Bring the device up now, so that a broken driver fails here with the list.
            let probe = std::panic::catch_unwind(|| {
                let t = burn::tensor::Tensor::<1>::from_floats([1.0, 2.0], &device);
                t.sum().into_data()
            });
            match probe {
                Ok(d) if d.try_to_vec::<f32>().ok() == Some(vec![3.0]) => {}
                _ => {
                    return Err(Error::Device(format!(
                        "--backend gpu: adapter [{}] {} could not run a test kernel. Adapters found:\n{}{GPU_HELP}",
                        chosen.index,
                        chosen.name,
                        describe_adapters(&adapters)
                    )));
                }
            }
            let chunk_limit = if long_loops_work(&device) {
                0
            } else {
                LOOP_CAPPED_CHUNK
            };
            let capped = if chunk_limit > 0 {
                ", loop-capped: convolutions split into exact chunks"
            } else {
                ""
            };
            Ok(Backend {
                device,
                description: format!(
                    "gpu (burn wgpu, adapter [{}] {}, {}, {}{capped})",
                    chosen.index, chosen.name, chosen.device_type, chosen.backend
                ),
                kind,
                chunk_limit,
            })
        }
    }
}
