//! The run directory, owned here: its file names, the one [`Summary`] type, the metrics log
//! and its one lenient reader, the checkpoints and the lock that keeps two jobs out of one
//! directory. Every other module asks a [`RunDir`] for a path instead of spelling a name.
//!
//! | file | written by | read by |
//! |---|---|---|
//! | `config.resolved.toml` | `train` (rank 0) | `report`, `bench model` |
//! | `metrics.jsonl` | `train` (rank 0), one line per step and validation | `report`, `bench`, resume |
//! | `checkpoint.ctck` | `train` (rank 0): the last state, for resuming | `train --resume` |
//! | `best.ctck` | `train` (rank 0): the model of the best validation Dice | `predict`, `evaluate`, `export`, `validate` |
//! | `summary.json` | `train` (rank 0) at the end | `report`, `bench` |
//! | `.lock` | `train` (rank 0) while it runs | `train` (refuses a locked run) |

pub mod checkpoint;
pub mod lock;
pub mod metrics;
pub mod summary;

use std::path::{Path, PathBuf};

pub use checkpoint::{Checkpoint, CheckpointKind, CheckpointMeta, Provenance};
pub use lock::RunLock;
pub use metrics::{Metrics, MetricsLog, StepRecord, ValRecord};
pub use summary::Summary;

/// The resolved run config.
pub const CONFIG: &str = "config.resolved.toml";
/// The metrics log.
pub const METRICS: &str = "metrics.jsonl";
/// The last checkpoint (what `--resume` continues from).
pub const CHECKPOINT: &str = "checkpoint.ctck";
/// The checkpoint of the best validation liver Dice.
pub const BEST: &str = "best.ctck";
/// The final figures.
pub const SUMMARY: &str = "summary.json";
/// Held by the job training in the directory.
pub const LOCK: &str = ".lock";

/// A run directory (which need not exist yet).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunDir {
    root: PathBuf,
}

impl RunDir {
    /// The run directory at `root`.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// The run directory at `root`, refused, naming it, when it is no directory.
    pub fn existing(root: impl Into<PathBuf>) -> crate::error::Result<Self> {
        let run = Self::new(root);
        if !run.root.is_dir() {
            return Err(crate::error::Error::Argument(format!(
                "{}: not a run directory (it does not exist or is not a directory)",
                run.root.display()
            )));
        }
        Ok(run)
    }

    /// The finished run at `root`: refused, naming it, when it is no directory or holds no
    /// `summary.json` (a run writes that last, so a run still going or killed has none).
    pub fn finished(root: impl Into<PathBuf>) -> crate::error::Result<Self> {
        let run = Self::existing(root)?;
        if !run.summary().is_file() {
            return Err(crate::error::Error::Argument(format!(
                "{}: has no {SUMMARY}: expected a finished run (a run writes it when it ends)",
                run.root.display()
            )));
        }
        Ok(run)
    }

    /// The directory itself.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `config.resolved.toml`.
    pub fn config(&self) -> PathBuf {
        self.root.join(CONFIG)
    }

    /// `metrics.jsonl`.
    pub fn metrics(&self) -> PathBuf {
        self.root.join(METRICS)
    }

    /// The checkpoint of `kind`.
    pub fn checkpoint(&self, kind: CheckpointKind) -> PathBuf {
        self.root.join(match kind {
            CheckpointKind::Last => CHECKPOINT,
            CheckpointKind::Best => BEST,
        })
    }

    /// `summary.json`.
    pub fn summary(&self) -> PathBuf {
        self.root.join(SUMMARY)
    }

    /// `.lock`.
    pub fn lock(&self) -> PathBuf {
        self.root.join(LOCK)
    }

    /// Whether the directory holds (part of) a run: any of the files a run writes.
    pub fn holds_run(&self) -> bool {
        [CONFIG, METRICS, CHECKPOINT, BEST, SUMMARY]
            .iter()
            .any(|f| self.root.join(f).exists())
    }

    /// Whether a directory passed where a run is expected is one (has metrics or a summary).
    pub fn is_run(dir: &Path) -> bool {
        dir.join(METRICS).is_file() || dir.join(SUMMARY).is_file()
    }
}
