//! `cargo bench --bench step`: the training-step benchmark of `ctseg bench step` on the quick
//! config (CPU, all cores), as a cargo bench: median, spread and images/s over warm steps.
//! Set `CTSEG_BENCH_BACKEND=gpu` for the GPU backend. For comparisons against PyTorch use
//! `ctseg bench step --peer …`, which runs the peer in the same invocation.

use ctseg::backend::{self, BackendKind, DeviceRequest};
use ctseg::bench::{StepBenchOptions, bench_step};
use ctseg::comm::Local;
use ctseg::config::RunConfig;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let kind = match std::env::var("CTSEG_BENCH_BACKEND").as_deref() {
        Ok("gpu") => BackendKind::Gpu,
        _ => BackendKind::Cpu,
    };
    let cfg = RunConfig::load(None)?;
    let be = backend::open(&DeviceRequest {
        kind,
        threads: 0,
        adapter: None,
        gpu_conv: Default::default(),
        cooperative_matrices: true,
    })?;
    let r = bench_step(
        &cfg,
        &be,
        &StepBenchOptions {
            warmup: 2,
            steps: 7,
        },
        &Local,
    )?;
    println!(
        "train step, quick config ({}): median {:.3} s  [min {:.3}, max {:.3}, IQR {:.3}]  {:.2} img/s  {:.1} GFLOP/s",
        r.device,
        r.median_step_s,
        r.min_step_s,
        r.max_step_s,
        r.iqr_step_s,
        r.images_per_s,
        r.gflops
    );
    Ok(())
}
