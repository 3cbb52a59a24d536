//! The MPI communicator (cargo feature `mpi`): rank and size from `MPI_COMM_WORLD`, node-local
//! rank from a shared-memory split, in-place allreduce through the C `MPI_IN_PLACE`, and a panic
//! hook that calls `MPI_Abort` so that a failing rank brings the whole job down.
//!
//! Why the hook: a rank that panics unwinds into `MPI_Finalize` while its peers wait in an
//! allreduce for ever (measured with OpenMPI 4.1; tests/mpi.rs checks it). `MPI_Abort` makes `mpirun` kill every rank and exit
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
    f16_sum: ffi::MPI_Op,
}

// SAFETY: the communicator handles are plain MPI handles. The training code lets a second
// thread run collectives only when `concurrent_ok` says the library allows it (thread level
// Serialized or Multiple) and the first thread makes no MPI call meanwhile.
unsafe impl Sync for Mpi {}

impl Drop for Mpi {
    fn drop(&mut self) {
        // Before the universe (and MPI_Finalize) is dropped.
        // SAFETY: the op was created by MPI_Op_create in `init` and is freed once.
        unsafe {
            ffi::MPI_Op_free(&mut self.f16_sum);
        }
    }
}

/// `MPI_User_function` summing IEEE half values: in f32, rounded back to half.
unsafe extern "C" fn f16_sum(
    invec: *mut c_void,
    inoutvec: *mut c_void,
    len: *mut c_int,
    _datatype: *mut ffi::MPI_Datatype,
) {
    // SAFETY: MPI passes two buffers of `*len` elements of the datatype we reduce with
    // (uint16), `inoutvec` writable.
    let (a, b) = unsafe {
        let n = *len as usize;
        (
            std::slice::from_raw_parts(invec as *const u16, n),
            std::slice::from_raw_parts_mut(inoutvec as *mut u16, n),
        )
    };
    for (x, y) in a.iter().zip(b.iter_mut()) {
        let s = half::f16::from_bits(*x).to_f32() + half::f16::from_bits(*y).to_f32();
        *y = half::f16::from_f32(s).to_bits();
    }
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
        super::check_world_matches_launcher(world.size() as usize)?;
        let local = world.split_shared(world.rank());
        let (local_rank, local_size) = (local.rank() as usize, local.size() as usize);
        HOOK.call_once(|| {
            let previous = std::panic::take_hook();
            std::panic::set_hook(Box::new(move |info| {
                previous(info);
                if super::catching_panics() {
                    return;
                }
                eprintln!("ctseg: a rank panicked; aborting the MPI job");
                // SAFETY: MPI is initialised (the hook is installed after init) and MPI_Abort
                // may be called from any thread.
                unsafe {
                    ffi::MPI_Abort(ffi::RSMPI_COMM_WORLD, 70);
                }
            }));
        });
        let mut f16_sum_op: ffi::MPI_Op = unsafe { std::mem::zeroed() };
        // SAFETY: registers a commutative user function; the handle is freed in Drop.
        check(
            unsafe { ffi::MPI_Op_create(Some(f16_sum), 1, &mut f16_sum_op) },
            "MPI_Op_create",
        )?;
        Ok(Self {
            _universe: universe,
            world,
            local_rank,
            local_size,
            threading,
            f16_sum: f16_sum_op,
        })
    }

    /// The thread level the library granted.
    pub fn threading(&self) -> mpi::Threading {
        self.threading
    }

    /// In-place sum-allreduce of `len` elements of `datatype` at `ptr` with `op`.
    ///
    /// # Safety
    /// `ptr` must point to `len` valid, exclusively borrowed elements of `datatype`, and `len`
    /// must fit a C int; MPI_IN_PLACE makes the buffer both send and receive buffer.
    unsafe fn allreduce_in_place(
        &self,
        ptr: *mut c_void,
        len: usize,
        datatype: ffi::MPI_Datatype,
        op: ffi::MPI_Op,
        what: &str,
    ) -> Result<()> {
        // SAFETY: guaranteed by the caller (see above).
        let code = unsafe {
            ffi::MPI_Allreduce(
                ctseg_mpi_in_place(),
                ptr,
                len as c_int,
                datatype,
                op,
                self.world.as_raw(),
            )
        };
        check(code, what)
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
            // SAFETY: `chunk` is a valid, exclusively borrowed buffer of f32 (MPI_FLOAT).
            unsafe {
                self.allreduce_in_place(
                    chunk.as_mut_ptr().cast(),
                    chunk.len(),
                    ffi::RSMPI_FLOAT,
                    ffi::RSMPI_SUM,
                    "MPI_Allreduce(f32)",
                )?;
            }
        }
        Ok(())
    }

    fn allreduce_sum_f16(&self, buf: &mut [u16]) -> Result<()> {
        for chunk in buf.chunks_mut(1 << 28) {
            // SAFETY: `chunk` is a valid, exclusively borrowed buffer of half bits (uint16_t),
            // summed by the half-precision operation.
            unsafe {
                self.allreduce_in_place(
                    chunk.as_mut_ptr().cast(),
                    chunk.len(),
                    ffi::RSMPI_UINT16_T,
                    self.f16_sum,
                    "MPI_Allreduce(f16)",
                )?;
            }
        }
        Ok(())
    }

    fn concurrent_ok(&self) -> bool {
        matches!(
            self.threading,
            mpi::Threading::Serialized | mpi::Threading::Multiple
        )
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
