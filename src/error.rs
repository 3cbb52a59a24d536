//! The library's error type: every failure a user can cause names the file, the field and what
//! was expected.

use std::path::PathBuf;

/// Errors raised by the ctseg library.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file involved.
        path: PathBuf,
        /// The underlying I/O error.
        #[source]
        source: std::io::Error,
    },

    /// A config file is not valid TOML or has unknown keys or wrong types.
    #[error("config {path}: {message}")]
    ConfigParse {
        /// The config file.
        path: PathBuf,
        /// What the parser said, including the key.
        message: String,
    },

    /// A config value is out of range.
    #[error("config {source_name}: `{field}` {message}")]
    ConfigValue {
        /// The config file (or "built-in quick config" / "command line").
        source_name: String,
        /// The dotted key, e.g. `train.batch_size`.
        field: String,
        /// What was expected.
        message: String,
    },

    /// A dataset file is malformed.
    #[error("dataset file {path}: {message}")]
    Dataset {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },

    /// A checkpoint is missing, corrupt or incompatible.
    #[error("checkpoint {path}: {message}")]
    Checkpoint {
        /// The checkpoint file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },

    /// The training or validation loss became NaN or infinite.
    #[error(
        "training diverged: the {what} is {value} at step {step} (epoch {epoch}); the last good checkpoint is kept in {run_dir}"
    )]
    Diverged {
        /// Which loss: the training loss, or the validation loss at an epoch's end.
        what: &'static str,
        /// The optimiser step at which the loss was not finite.
        step: u64,
        /// The epoch of that step.
        epoch: u64,
        /// The non-finite value.
        value: f64,
        /// The run directory holding the last good checkpoint.
        run_dir: PathBuf,
    },

    /// A file other than a config, dataset file or checkpoint is malformed: a run directory's
    /// `summary.json` or `metrics.jsonl` given to `report`, `bench model` or `--resume`.
    #[error("{path}: {message}")]
    Malformed {
        /// The file.
        path: PathBuf,
        /// What is wrong with it, naming the field.
        message: String,
    },

    /// No usable compute device.
    #[error("{0}")]
    Device(String),

    /// A command-line argument the user gave is wrong (named in the message).
    #[error("{0}")]
    Argument(String),

    /// Anything else, with an explanation: a failed peer or launch, an internal
    /// inconsistency. Input the user gave has one of the variants above.
    #[error("{0}")]
    Invalid(String),
}

impl Error {
    /// Wraps an I/O error with the path it concerns.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }

    /// A dataset error for `path`.
    pub fn dataset(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Self::Dataset {
            path: path.into(),
            message: message.into(),
        }
    }

    /// A malformed-file error for `path`.
    pub fn malformed(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Self::Malformed {
            path: path.into(),
            message: message.into(),
        }
    }

    /// A checkpoint error for `path`.
    pub fn checkpoint(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Self::Checkpoint {
            path: path.into(),
            message: message.into(),
        }
    }
}

/// Result with the library's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
