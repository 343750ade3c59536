//! Thin entry point: parse the command line, set up logging, run, map errors to exit codes.

use clap::Parser;
use tracing_subscriber::EnvFilter;

use trackersync::cli::{Cli, Command};

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    // The node logs its work; client commands stay quiet unless RUST_LOG asks.
    let default = if matches!(cli.command, Command::Serve(_)) {
        "info"
    } else {
        "warn"
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default)),
        )
        .with_writer(std::io::stderr)
        .init();
    match trackersync::cli::run(cli).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

// Automerge allocates and frees many short-lived column buffers; glibc's per-thread arenas
// turned that into page faults (40% of write-path time in the kernel). mimalloc reuses pages.
// Built without transparent huge pages (Cargo.toml: no_thp), so its RSS follows the heap.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;
