//! The `mailmux` binary: parse the command line, set up logging, run.

use std::process::ExitCode;

use clap::Parser;
use mailmux::cli::{self, Cli};

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    mailmux::logging::init(cli.log_format);
    match cli.runtime() {
        Ok(runtime) => runtime.block_on(cli::run(cli)),
        Err(e) => {
            eprintln!("mailmux: cannot start the async runtime: {e}");
            ExitCode::FAILURE
        }
    }
}
