//! The `ctseg` binary: parse, run, map errors to exit codes — nothing else.

mod cli;

use std::process::ExitCode;

/// Exit status of an error: 2 the user's input (config, arguments, data, checkpoint);
/// 3 training diverged; 1 the rest.
pub(crate) fn exit_code(e: &anyhow::Error) -> u8 {
    match e.downcast_ref::<ctseg::Error>() {
        Some(
            ctseg::Error::ConfigParse { .. }
            | ctseg::Error::ConfigValue { .. }
            | ctseg::Error::Dataset { .. }
            | ctseg::Error::Checkpoint { .. }
            | ctseg::Error::Argument(_),
        ) => 2,
        Some(ctseg::Error::Diverged { .. }) => 3,
        _ => 1,
    }
}

fn main() -> ExitCode {
    match cli::run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(exit_code(&e))
        }
    }
}
