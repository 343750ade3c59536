//! Thin entry point: parse the command line, set up logging, run, map errors to exit codes.

use clap::Parser;
use tracing_subscriber::EnvFilter;

use trackersync::cli::{Cli, Command};

#[tokio::main]
async fn main() -> std::process::ExitCode {
    return_freed_memory_at_once();
    let cli = Cli::parse();
    // The node logs its work; client commands stay quiet unless RUST_LOG asks.
    let default = if matches!(cli.command, Command::Serve(_)) {
        "info"
    } else {
        "warn"
    };
    tracing_subscriber::fmt()
        .with_env_filter(log_filter(
            &std::env::var("RUST_LOG").unwrap_or_default(),
            default,
        ))
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

/// `mi_option_purge_delay` in mimalloc v3's `mi_option_e` (mimalloc.h).
const MI_OPTION_PURGE_DELAY: std::ffi::c_int = 15;

/// mimalloc v3 keeps freed pages for `purge_delay` (1 s), arenas ten times as long, before it
/// gives them back. Under a steady write load (documents loaded, merged and evicted all the
/// time) that kept 15-20 MiB more resident on a node whose heap was flat, and the RSS kept
/// creeping up; with no delay it follows the heap, at no throughput cost we could measure.
/// `MIMALLOC_PURGE_DELAY` in the environment still wins.
fn return_freed_memory_at_once() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: stores a value in mimalloc's option table; any thread may call it at any time.
        unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, 0) }
    }
}

/// `spec` from `RUST_LOG` (or `default` when empty or invalid), with Automerge held to
/// warnings unless it names Automerge itself. Automerge 0.12 instruments `load_changes` at INFO with the
/// document's whole change graph as a Debug field: under an `info` filter every received
/// change formatted the document's history (on the live path, 1.2 ms of B's 1.4 ms apply for
/// a document with a thousand changes).
fn log_filter(spec: &str, default: &str) -> EnvFilter {
    let filter = EnvFilter::try_new(spec)
        .ok()
        .filter(|_| !spec.trim().is_empty())
        .unwrap_or_else(|| EnvFilter::new(default));
    if spec.contains("automerge") {
        return filter;
    }
    filter.add_directive("automerge=warn".parse().expect("a valid directive"))
}

#[cfg(test)]
mod tests {
    /// Whether INFO events of Automerge's loader and of our network code pass
    /// `log_filter(spec, "info")`.
    fn info_passes(spec: &str) -> (bool, bool) {
        use tracing_subscriber::layer::SubscriberExt;
        let subscriber = tracing_subscriber::registry().with(super::log_filter(spec, "info"));
        tracing::subscriber::with_default(subscriber, || {
            (
                tracing::enabled!(target: "automerge::storage::load", tracing::Level::INFO),
                tracing::enabled!(target: "trackersync::net", tracing::Level::INFO),
            )
        })
    }

    #[test]
    fn automerge_stays_quiet_unless_named() {
        assert_eq!(info_passes(""), (false, true));
        assert_eq!(info_passes("debug"), (false, true));
        assert_eq!(info_passes("info,automerge=info"), (true, true));
    }

    /// The option index is right for the mimalloc this binary links (an upgrade that moved it
    /// would silently set some other option): its default is mimalloc v3's 1,000 ms, and it
    /// reads back what was set.
    #[test]
    fn the_purge_delay_option_is_the_one_we_set() {
        if std::env::var_os("MIMALLOC_PURGE_DELAY").is_some() {
            return;
        }
        // SAFETY: reads and writes mimalloc's option table.
        let before = unsafe { libmimalloc_sys::mi_option_get(super::MI_OPTION_PURGE_DELAY) };
        assert_eq!(before, 1000, "mimalloc's purge_delay default");
        super::return_freed_memory_at_once();
        let after = unsafe { libmimalloc_sys::mi_option_get(super::MI_OPTION_PURGE_DELAY) };
        assert_eq!(after, 0);
    }
}
