//! Stopping on request: SIGTERM (a Slurm time limit or preemption, `kill`), SIGUSR1 (Slurm's
//! `--signal` early warning, and what `mpirun` forwards to every rank) and SIGINT (Ctrl-C)
//! set a flag that the training loop reads at each step boundary; the ranks agree on it with
//! one allreduce, so no rank stops alone, and the run is checkpointed at that exact step. A
//! second SIGINT (Ctrl-C twice) ends the process at once; the atomic checkpoint writer keeps
//! the previous checkpoint whole. A repeated SIGTERM does not: at a time limit Slurm sends each
//! task SIGTERM twice within a second (seen with Slurm 22.05), and the stop must still
//! checkpoint before `KillWait` ends in SIGKILL.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use signal_hook::consts::{SIGINT, SIGTERM, SIGUSR1};

use crate::error::{Error, Result};

/// Set when a stop was requested.
#[derive(Clone, Debug, Default)]
pub struct StopFlag(Arc<AtomicBool>);

impl StopFlag {
    /// Installs the handlers (once per process is enough; more calls add nothing harmful).
    pub fn install() -> Result<Self> {
        let flag = Arc::new(AtomicBool::new(false));
        let err = |e: std::io::Error| Error::Invalid(format!("installing signal handlers: {e}"));
        // Registered first, so it sees the flag before this SIGINT sets it: a second one exits
        // with the conventional status 128 + 2.
        signal_hook::flag::register_conditional_shutdown(SIGINT, 128 + SIGINT, flag.clone())
            .map_err(err)?;
        for sig in [SIGINT, SIGTERM, SIGUSR1] {
            signal_hook::flag::register(sig, flag.clone()).map_err(err)?;
        }
        Ok(Self(flag))
    }

    /// Whether a stop was requested on this rank.
    pub fn requested(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}
