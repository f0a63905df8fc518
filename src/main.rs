//! The `courier` binary: a thin edge over the library. It parses the command
//! line, sets up logging, and calls into `courier::cli`. Exit codes: 0 on
//! success, 1 on a runtime failure, 2 on bad usage or configuration.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = courier::cli::Cli::parse();
    courier::cli::init_tracing(cli.log_json, cli.default_log_level());
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(courier::cli::run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            eprintln!("error: {:#}", failure.error);
            ExitCode::from(failure.exit_code)
        }
    }
}
