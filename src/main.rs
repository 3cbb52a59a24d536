//! The `ctseg` binary: prepare the process, parse, run, map errors to exit codes — nothing else.

mod cli;

use std::process::ExitCode;

/// Exit status of an error: 2 the user's input (config, arguments, data, checkpoint);
/// 3 training diverged; 1 the rest. (4, a training job stopped by a signal after
/// checkpointing, is not an error: see [`cli::EXIT_STOPPED`].)
pub(crate) fn exit_code(e: &anyhow::Error) -> u8 {
    match e.downcast_ref::<ctseg::Error>() {
        Some(
            ctseg::Error::ConfigParse { .. }
            | ctseg::Error::ConfigValue { .. }
            | ctseg::Error::Dataset { .. }
            | ctseg::Error::Checkpoint { .. }
            | ctseg::Error::Malformed { .. }
            | ctseg::Error::Argument(_),
        ) => 2,
        Some(ctseg::Error::Diverged { .. }) => 3,
        _ => 1,
    }
}

fn main() -> ExitCode {
    // Before any thread exists: the clock of `summary.json`'s start-up time, and the
    // environment the graphics drivers read.
    ctseg::util::sys::process_seconds();
    ctseg::backend::prepare_process_environment();
    match cli::run() {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(exit_code(&e))
        }
    }
}
