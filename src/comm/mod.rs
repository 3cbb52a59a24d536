//! Communication between data-parallel ranks, behind the [`Communicator`] trait. Moves flat
//! buffers and knows nothing of burn.
//!
//! Every method is **collective**: all ranks call the same methods, in the same order, with
//! buffers of the same length. A rank that skips or reorders a call deadlocks the job (MPI cannot
//! detect it), which is why the training loop calls them only at fixed points: after the
//! initial build (broadcast), once per optimiser step (gradient allreduce), and around every
//! validation and checkpoint (metric sums, BN statistics, barrier).

use crate::error::Result;

#[cfg(feature = "mpi")]
pub mod mpi;

thread_local! {
    /// How many [`catch_panic`] calls this thread is inside.
    static CATCHING: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Runs `f` and returns a panic in it as its message. While it runs, a panic on this thread
/// does not abort an MPI job ([`catching_panics`]; the MPI panic hook would otherwise end every
/// rank before the panic could be caught): for trying kernels an adapter may not build.
pub fn catch_panic<T>(f: impl FnOnce() -> T) -> std::result::Result<T, String> {
    CATCHING.with(|c| c.set(c.get() + 1));
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    CATCHING.with(|c| c.set(c.get() - 1));
    r.map_err(|panic| {
        panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a panic without a message".into())
    })
}

/// Whether this thread is inside [`catch_panic`].
pub fn catching_panics() -> bool {
    CATCHING.with(|c| c.get() > 0)
}

/// Whether this process was started by an MPI launcher (mpirun/mpiexec/srun), from the
/// environment variables the common launchers set; `CTSEG_MPI=1` forces MPI (a singleton).
/// A Slurm step of several tasks counts too, whatever its `--mpi` plugin: see
/// [`launcher_tasks`].
pub fn launched_by_mpi() -> bool {
    if std::env::var("CTSEG_MPI").is_ok_and(|v| v == "1") {
        return true;
    }
    launcher_tasks().is_some_and(|n| n > 1)
        || [
            "OMPI_COMM_WORLD_SIZE",
            "PMI_SIZE",
            "PMIX_RANK",
            "MPI_LOCALNRANKS",
        ]
        .iter()
        .any(|v| std::env::var_os(v).is_some())
}

/// The number of tasks a Slurm step started (`SLURM_STEP_NUM_TASKS`), if this process is one.
/// With `srun --mpi=none` (a cluster's default when `--mpi` is left out) the tasks cannot find
/// each other: each would train alone, so the communicator refuses that (see
/// [`check_world_matches_launcher`]).
pub fn launcher_tasks() -> Option<usize> {
    std::env::var("SLURM_STEP_NUM_TASKS")
        .ok()
        .and_then(|v| v.trim().parse().ok())
}

/// Fails when Slurm started more tasks than MPI sees ranks: the tasks were not wired together
/// (srun without a PMIx plugin), and each would train alone on the same run directory.
pub fn check_world_matches_launcher(world: usize) -> crate::Result<()> {
    match launcher_tasks() {
        Some(n) if n > 1 && world != n => Err(crate::Error::Argument(format!(
            "srun started {n} tasks but MPI sees {world} rank(s): the tasks are not connected; launch with `srun --mpi=pmix` (Debian's OpenMPI speaks PMIx only; `srun --mpi=list` shows the plugins)"
        ))),
        _ => Ok(()),
    }
}

/// A group of ranks that train one model together.
pub trait Communicator: Sync {
    /// This process's rank, `0..size()`.
    fn rank(&self) -> usize;
    /// Number of ranks.
    fn size(&self) -> usize;
    /// Rank within this node (selects the GPU adapter), `0..local_size()`.
    fn local_rank(&self) -> usize {
        self.rank()
    }
    /// Ranks on this node (sizes the CPU thread pool).
    fn local_size(&self) -> usize {
        self.size()
    }
    /// Replaces `buf` on every rank with rank `root`'s bytes (lengths may differ: every rank
    /// receives the root's length).
    fn broadcast_bytes(&self, buf: &mut Vec<u8>, root: usize) -> Result<()>;
    /// In-place elementwise sum of `buf` across ranks.
    fn allreduce_sum_f32(&self, buf: &mut [f32]) -> Result<()>;
    /// In-place elementwise sum of IEEE half-precision values (given as their bits), each
    /// reduction step adding in f32 and rounding back to half (fp16 gradient compression).
    fn allreduce_sum_f16(&self, buf: &mut [u16]) -> Result<()>;
    /// Whether a second thread may run collectives while this one does not call the
    /// communicator (MPI thread level `Serialized` or better). Enables overlapped exchange.
    fn concurrent_ok(&self) -> bool {
        true
    }
    /// In-place elementwise sum of small f64 vectors (metric sums and counts) across ranks.
    fn allreduce_sum_f64(&self, buf: &mut [f64]) -> Result<()>;
    /// Waits until every rank arrives.
    fn barrier(&self) -> Result<()>;
    /// Human-readable description (for logs).
    fn describe(&self) -> String;
    /// Ends the whole job (every rank) with exit status `code`. Not collective: any rank may
    /// call it, which is how a failing rank avoids leaving its peers waiting in a collective.
    fn abort(&self, code: i32) -> ! {
        std::process::exit(code)
    }
}

/// A single process: every collective is the identity. Needs no MPI.
#[derive(Clone, Copy, Debug, Default)]
pub struct Local;

impl Communicator for Local {
    fn rank(&self) -> usize {
        0
    }
    fn size(&self) -> usize {
        1
    }
    fn broadcast_bytes(&self, _buf: &mut Vec<u8>, _root: usize) -> Result<()> {
        Ok(())
    }
    fn allreduce_sum_f32(&self, _buf: &mut [f32]) -> Result<()> {
        Ok(())
    }
    fn allreduce_sum_f16(&self, _buf: &mut [u16]) -> Result<()> {
        Ok(())
    }
    fn allreduce_sum_f64(&self, _buf: &mut [f64]) -> Result<()> {
        Ok(())
    }
    fn barrier(&self) -> Result<()> {
        Ok(())
    }
    fn describe(&self) -> String {
        "single process".into()
    }
}

#[cfg(test)]
mod catch_tests {
    use super::*;

    #[test]
    fn a_caught_panic_is_its_message_and_the_thread_stops_catching_after() {
        assert_eq!(catch_panic(|| 3), Ok(3));
        let caught = catch_panic(|| {
            assert!(catching_panics());
            panic!("shader failed to build")
        });
        assert_eq!(caught, Err::<(), _>("shader failed to build".into()));
        assert!(!catching_panics());
    }
}
