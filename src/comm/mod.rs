//! Communication between data-parallel ranks, behind the [`Communicator`] trait. Moves flat
//! buffers and knows nothing of burn.
//!
//! Every method is **collective**: all ranks call the same methods, in the same order, with
//! buffers of the same length. A rank that skips or reorders a call deadlocks the job (MPI cannot
//! detect it), which is why the training loop calls them only at fixed points: after the
//! initial build (broadcast), once per optimiser step (gradient allreduce), and around every
//! validation and checkpoint (metric sums, BN statistics, barrier).

use crate::error::Result;

/// A group of ranks that train one model together.
pub trait Communicator {
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
    /// In-place elementwise sum of small f64 vectors (metric sums and counts) across ranks.
    fn allreduce_sum_f64(&self, buf: &mut [f64]) -> Result<()>;
    /// Waits until every rank arrives.
    fn barrier(&self) -> Result<()>;
    /// Human-readable description (for logs).
    fn describe(&self) -> String;
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
