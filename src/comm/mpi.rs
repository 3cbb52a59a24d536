//! The MPI communicator (cargo feature `mpi`): rank and size from `MPI_COMM_WORLD`, node-local
//! rank from a shared-memory split, in-place allreduce through the C `MPI_IN_PLACE`, and a panic
//! hook that calls `MPI_Abort` so that a failing rank brings the whole job down.
//!
//! Why the hook: a rank that panics unwinds into `MPI_Finalize` while its peers wait in an
//! allreduce for ever (DESIGN.md §2). `MPI_Abort` makes `mpirun` kill every rank and exit
//! non-zero within seconds. The binary also aborts when a rank returns an error
//! ([`Mpi::abort`]), for the same reason.

use std::ffi::{c_int, c_void};
use std::sync::Once;

use mpi::collective::{CommunicatorCollectives, Root};
use mpi::ffi;
use mpi::topology::{Communicator as _, SimpleCommunicator};
use mpi::traits::AsRaw;

use super::Communicator;
use crate::error::{Error, Result};

unsafe extern "C" {
    /// `MPI_IN_PLACE` as the MPI library defines it (compiled from `src/comm/mpi_shim.c`).
    fn ctseg_mpi_in_place() -> *mut c_void;
}

/// A job launched with `mpirun` (or a singleton without it).
pub struct Mpi {
    _universe: mpi::environment::Universe,
    world: SimpleCommunicator,
    local_rank: usize,
    local_size: usize,
    threading: mpi::Threading,
}

static HOOK: Once = Once::new();

fn check(code: c_int, what: &str) -> Result<()> {
    if code == 0 {
        Ok(())
    } else {
        Err(Error::Invalid(format!("MPI error {code} in {what}")))
    }
}

impl Mpi {
    /// Initialises MPI (thread level `Multiple` where the library has it: the gradient
    /// allreduce runs on a communication thread) and installs the abort-on-panic hook.
    pub fn init() -> Result<Self> {
        let (universe, threading) = mpi::initialize_with_threading(mpi::Threading::Multiple)
            .ok_or_else(|| Error::Invalid("MPI was already initialised in this process".into()))?;
        let world = universe.world();
        let local = world.split_shared(world.rank());
        let (local_rank, local_size) = (local.rank() as usize, local.size() as usize);
        HOOK.call_once(|| {
            let previous = std::panic::take_hook();
            std::panic::set_hook(Box::new(move |info| {
                previous(info);
                eprintln!("ctseg: a rank panicked; aborting the MPI job");
                // SAFETY: MPI is initialised (the hook is installed after init) and MPI_Abort
                // may be called from any thread.
                unsafe {
                    ffi::MPI_Abort(ffi::RSMPI_COMM_WORLD, 70);
                }
            }));
        });
        Ok(Self {
            _universe: universe,
            world,
            local_rank,
            local_size,
            threading,
        })
    }

    /// The thread level the library granted.
    pub fn threading(&self) -> mpi::Threading {
        self.threading
    }
}

impl Communicator for Mpi {
    fn rank(&self) -> usize {
        self.world.rank() as usize
    }

    fn size(&self) -> usize {
        self.world.size() as usize
    }

    fn local_rank(&self) -> usize {
        self.local_rank
    }

    fn local_size(&self) -> usize {
        self.local_size
    }

    fn broadcast_bytes(&self, buf: &mut Vec<u8>, root: usize) -> Result<()> {
        let root = self.world.process_at_rank(root as i32);
        let mut len = buf.len() as u64;
        root.broadcast_into(&mut len);
        buf.resize(len as usize, 0);
        // MPI counts are c_int: send in chunks of at most 1 GiB.
        for chunk in buf.chunks_mut(1 << 30) {
            root.broadcast_into(chunk);
        }
        Ok(())
    }

    fn allreduce_sum_f32(&self, buf: &mut [f32]) -> Result<()> {
        for chunk in buf.chunks_mut(1 << 28) {
            // SAFETY: `chunk` is a valid, exclusively borrowed f32 buffer of `len` elements;
            // MPI_IN_PLACE makes it both send and receive buffer.
            let code = unsafe {
                ffi::MPI_Allreduce(
                    ctseg_mpi_in_place(),
                    chunk.as_mut_ptr().cast(),
                    chunk.len() as c_int,
                    ffi::RSMPI_FLOAT,
                    ffi::RSMPI_SUM,
                    self.world.as_raw(),
                )
            };
            check(code, "MPI_Allreduce(f32)")?;
        }
        Ok(())
    }

    fn allreduce_sum_f64(&self, buf: &mut [f64]) -> Result<()> {
        let send = buf.to_vec();
        self.world
            .all_reduce_into(&send[..], buf, mpi::collective::SystemOperation::sum());
        Ok(())
    }

    fn barrier(&self) -> Result<()> {
        self.world.barrier();
        Ok(())
    }

    fn abort(&self, code: i32) -> ! {
        self.world.abort(code)
    }

    fn describe(&self) -> String {
        format!(
            "MPI rank {} of {} ({} on this node)",
            self.rank(),
            self.size(),
            self.local_size
        )
    }
}
