//! `lockstep`: the command line of the lockstep inference cluster (see [`cli`]).

mod cli;

use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = cli::Cli::parse();
    let log_format = cli.log_format;
    cli::logging::init(log_format);
    match cli::run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            cli::logging::report_fatal(log_format, &e);
            std::process::ExitCode::FAILURE
        }
    }
}
