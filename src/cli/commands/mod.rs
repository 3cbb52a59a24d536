//! The commands, one module per group: training and validation, inference and export, data
//! preparation, benchmarks, reports. What they share is here: the communicator with its
//! abort-on-error rule, and opening a checked backend.

pub mod bench;
pub mod data;
pub mod infer;
pub mod report;
pub mod train;

use anyhow::Result;

use ctseg::backend::{self, Backend, BackendKind};
use ctseg::bench::conv_choice::{self, ConvWorkload};
use ctseg::comm::{Communicator, Local};
use ctseg::config::RunConfig;
use ctseg::train::precision::Precision;

use super::args::{BackendArgs, GpuConvArg};

/// Runs `f` on this process's communicator: MPI when an MPI launcher started it (and ctseg was
/// built with the `mpi` feature), else a single process. Every command that opens a
/// communicator goes through here: when `f` fails on one rank of several, that rank ends the
/// whole job (`MPI_Abort`) with the error's exit status, so no rank is left waiting in a
/// collective for a peer that returned.
pub fn with_comm<T>(f: impl FnOnce(&dyn Communicator) -> Result<T>) -> Result<T> {
    let comm = open_comm()?;
    let result = f(comm.as_ref());
    if let Err(e) = &result
        && comm.size() > 1
    {
        eprintln!("error (rank {}): {e:#}", comm.rank());
        comm.abort(crate::exit_code(e).into());
    }
    result
}

fn open_comm() -> Result<Box<dyn Communicator>> {
    if ctseg::comm::launched_by_mpi() {
        #[cfg(feature = "mpi")]
        return Ok(Box::new(ctseg::comm::mpi::Mpi::init()?));
        #[cfg(not(feature = "mpi"))]
        anyhow::bail!(
            "started by an MPI launcher, but this ctseg was built without MPI: rebuild with `cargo build --release --features mpi`"
        );
    }
    Ok(Box::new(Local))
}

/// Opens this rank's share of the backend `args` ask for ([`backend::DeviceRequest::for_rank`])
/// and, for a GPU, picks its convolution kernels for `cfg`'s model and `work` (`--gpu-conv
/// auto`), then checks that it computes the model's gradients like the CPU in the `precision`
/// the command will compute in.
pub fn open_backend(
    args: &BackendArgs,
    cfg: &RunConfig,
    precision: Precision,
    work: ConvWorkload,
    comm: &dyn Communicator,
    quiet: bool,
) -> Result<Backend> {
    // 1. The device, in the precision asked (or the one it can do).
    let be = backend::open(&args.request().for_rank(comm))?;
    let be = ctseg::train::precision::apply(precision, be);
    // 2. `--gpu-conv auto`: the convolution kernels that run this model faster here (as an
    // earlier run on this adapter measured them, where one did).
    let choice = match args.gpu_conv {
        GpuConvArg::Auto | GpuConvArg::Retime => {
            let dir = backend::kernel_cache_dir().join("conv-choice");
            let kept = conv_choice::KeptTimings {
                dir: &dir,
                reuse: args.gpu_conv == GpuConvArg::Auto,
            };
            let model = &cfg.model;
            conv_choice::choose(&be, model, cfg.data.in_channels(), work, comm, Some(kept))?
        }
        _ => None,
    };
    // 3. The start-up check, on the kernels the run will use (auto falls back to burn's where
    // ctseg's fail it).
    let check = |b: &Backend| -> ctseg::error::Result<Option<ctseg::verify::Verdict>> {
        if b.kind == BackendKind::Gpu && !args.skip_gpu_check {
            ctseg::verify::require_gpu_agrees(&cfg.model, b).map(Some)
        } else {
            Ok(None)
        }
    };
    let (be, verdict) = match choice {
        Some(c) => conv_choice::apply_checked(be, c, comm, check)?,
        None => {
            let v = check(&be)?;
            (be, v)
        }
    };
    if let (Some(v), false) = (verdict, quiet) {
        let worst = v.worst().map_or(0.0, |(_, t)| t.error);
        eprintln!(
            "gpu check: loss and gradients of {} parameter tensors agree with the CPU (largest relative error {worst:.1e}, each within its limit)",
            v.tensors.len()
        );
    }
    Ok(be)
}
