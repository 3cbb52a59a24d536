//! The `ctseg` binary: parse, run, map errors to exit codes — nothing else.

mod cli;

use std::process::ExitCode;

fn main() -> ExitCode {
    match cli::run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            // 2: the user's input (config, arguments, data); 3: training diverged; 1: the rest.
            let code = match e.downcast_ref::<ctseg::Error>() {
                Some(
                    ctseg::Error::ConfigParse { .. }
                    | ctseg::Error::ConfigValue { .. }
                    | ctseg::Error::Dataset { .. }
                    | ctseg::Error::Checkpoint { .. },
                ) => 2,
                Some(ctseg::Error::Diverged { .. }) => 3,
                _ => 1,
            };
            ExitCode::from(code)
        }
    }
}
