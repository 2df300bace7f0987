//! The `mailmux` binary: parse the command line, set up logging, run.

use std::process::ExitCode;

use clap::Parser;
use mailmux::cli::{self, Cli};

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    mailmux::logging::init(cli.log_format);
    cli::run(cli).await
}
