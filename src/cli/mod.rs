//! The command-line interface: [`args`] turns raw flags into validated values, [`commands`]
//! runs them. Everything here is the edge of the program (anyhow errors); the work is the
//! library's.

mod args;
mod commands;

use clap::Parser;

use args::{BenchCommand, Cli, Command};

/// Exit status of a training job stopped early by a signal (SIGTERM, SIGUSR1, SIGINT) after
/// writing its checkpoint: resume it with `ctseg train --resume RUN`. Neither 0 (the run is not
/// complete) nor a signal's status (a wrapper can tell a clean stop from a kill).
pub const EXIT_STOPPED: u8 = 4;

/// Parses the arguments and runs the command; the exit status on success.
pub fn run() -> anyhow::Result<u8> {
    let cli = Cli::parse();
    match cli.command {
        Command::Train(a) => commands::train::train(*a),
        Command::Validate(a) => commands::train::validate(a).map(|()| 0),
        Command::Model(a) => commands::report::model(a).map(|()| 0),
        Command::Phantom(a) => commands::data::phantom(a).map(|()| 0),
        Command::Prepare(a) => commands::data::prepare(a).map(|()| 0),
        Command::Predict(a) => commands::infer::predict(a).map(|()| 0),
        Command::Evaluate(a) => commands::infer::evaluate(a).map(|()| 0),
        Command::Export(a) => commands::infer::export(a).map(|()| 0),
        Command::Bench(BenchCommand::Step(a)) => commands::bench::step(*a).map(|()| 0),
        Command::Bench(BenchCommand::Allreduce(a)) => commands::bench::allreduce(a).map(|()| 0),
        Command::Bench(BenchCommand::Scaling(a)) => commands::bench::scaling(*a).map(|()| 0),
        Command::Bench(BenchCommand::Model(a)) => commands::bench::model(*a).map(|()| 0),
        Command::Bench(BenchCommand::Kernels(a)) => commands::bench::kernels(a).map(|()| 0),
        Command::Report(a) => commands::report::report(a).map(|()| 0),
        Command::Adapters => commands::report::adapters().map(|()| 0),
    }
}
