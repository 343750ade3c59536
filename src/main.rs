//! Thin entry point: parse the command line, set up logging, run, map errors to exit codes.

use clap::Parser;
use tracing_subscriber::EnvFilter;

use trackersync::cli::{Cli, Command};

/// Threads in tokio's blocking pool, where Automerge and sled run (tokio's default is 512).
/// Each thread that allocates keeps its own mimalloc heap: partly used pages of every size it
/// allocated. Documents keep growing (every edit adds history), so those pages never fill
/// again and the RSS creeps up while the live heap stays nearly flat. Two nodes under six
/// clients' edits of 500 items (460 edits/s, 32 MiB cache), RSS after 5 minutes: about 11
/// blocking threads (the default's working set) 144 / 134 MiB, 8 threads 101 / 104, 4 threads
/// 89 / 91, at the same edits per second; API writes per second at 1 and 8 clients were the
/// same with 4, 8 and 512 (`trackersync-bench local`). Two 30-minute soaks side by side (same
/// seed) with 4 and with 2 threads ended at RSS 106-112 and 94-98 MiB, rising 0.93-1.05 and
/// 0.73-0.83 MiB/min; writes per second, initial sync and catch-up did not move.
const BLOCKING_THREADS: usize = 2;

fn main() -> std::process::ExitCode {
    return_freed_memory_at_once();
    match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .max_blocking_threads(BLOCKING_THREADS)
        // Kept, not ended after tokio's 10 s idle: a new thread starts a new allocator heap
        // and an ended one leaves its partly used pages behind.
        .thread_keep_alive(std::time::Duration::from_secs(24 * 3600))
        .build()
    {
        Ok(runtime) => runtime.block_on(run()),
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run() -> std::process::ExitCode {
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
