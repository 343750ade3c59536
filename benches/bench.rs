//! trackersync benchmarks. Prints one JSON line per figure. Build first:
//! `cargo build --release`, then `target/release/trackersync-bench local` (single node:
//! API write throughput, cold start, RSS, bytes on disk).
//!
//! Figures are measurements, not assertions: the machine is shared, so they vary by run.

mod workload;

#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use serde_json::{json, Value as Json};
use tokio::process::{Child, Command};

#[derive(Parser)]
#[command(about = "trackersync benchmarks (JSON lines on stdout)")]
struct Args {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Single node: acknowledged writes/s through the API, cold start and RSS by store size,
    /// bytes on disk per item.
    Local {
        /// Seconds per throughput measurement.
        #[arg(long, default_value_t = 5.0)]
        seconds: f64,
        /// Store sizes for cold start (comma-separated).
        #[arg(long, value_delimiter = ',', default_value = "100000,1000000")]
        items: Vec<u64>,
        /// Concurrent API clients (comma-separated).
        #[arg(long, value_delimiter = ',', default_value = "1,8")]
        clients: Vec<usize>,
    },
    /// In-process receive path: read a seeded store's change feed page by page and apply it
    /// to an empty store (no network), to profile what applying a peer's documents costs.
    Apply {
        #[arg(long, default_value_t = 20000)]
        items: u64,
        /// Keep the seeded source store here and reuse it on the next run (for profiling).
        #[arg(long)]
        source: Option<PathBuf>,
        /// Threads applying each page (the node uses 2).
        #[arg(long, default_value_t = 2)]
        threads: usize,
        /// Percent of the items changed for the catch-up that follows (a larger share gives
        /// a profiler more to see).
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=100))]
        changed_percent: u64,
        /// Close B (a clean stop) and open it again before the catch-up, as a node restarts:
        /// its caches are cold, as in `sync`'s catch-up after a restart.
        #[arg(long)]
        cold: bool,
    },
    /// Bundles: export N items on a running node, import them into a fresh one (both through
    /// the real CLI), then connect the pair after 1% changed and measure what sync moves.
    Bundle {
        #[arg(long, value_delimiter = ',', default_value = "100000")]
        items: Vec<u64>,
    },
    /// The issue-6 comparison: trackersync's sync and write benchmarks, then the peer
    /// harnesses (automerge-repo, PouchDB) on the same workload, back to back in this run;
    /// prints every figure and a table of ratios (trackersync time / peer time).
    Compare {
        /// Item counts (comma-separated).
        #[arg(long, value_delimiter = ',', default_value = "1000,10000,100000")]
        items: Vec<u64>,
        /// Peer systems: `am` (automerge-repo), `pouch` (PouchDB); empty for none.
        #[arg(long, default_value = "am,pouch")]
        systems: String,
        /// Wall-clock cap per peer run (seed and all scenarios), as the harness takes it.
        #[arg(long, default_value_t = 600)]
        cap_s: u64,
        /// The peer harnesses (default: ../shared/bench-peers next to this repository). They
        /// are copied to target/bench-peers and set up there on first use (npm registry).
        #[arg(long)]
        peers: Option<PathBuf>,
        /// Live edits timed on our side.
        #[arg(long, default_value_t = 1000)]
        live: usize,
        /// Seconds per API write throughput measurement.
        #[arg(long, default_value_t = 5.0)]
        seconds: f64,
    },
    /// Write the fuzz seed corpus (real wire messages and documents, plus mutations) to DIR.
    FuzzSeeds { dir: PathBuf },
    /// Two nodes over libp2p on loopback: initial sync, 1% catch-up after the receiver was
    /// offline, already-synced reconnect, live propagation latency.
    Sync {
        /// Item counts (comma-separated).
        #[arg(long, value_delimiter = ',', default_value = "10000,100000")]
        items: Vec<u64>,
        /// Live edits timed.
        #[arg(long, default_value_t = 1000)]
        live: usize,
        /// Times the catch-up after a restart is run (each a fresh 1% of the items); the
        /// medians are reported.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=100))]
        restarts: u64,
    },
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    match args.cmd {
        Cmd::Local {
            seconds,
            items,
            clients,
        } => local(seconds, &items, &clients).await,
        Cmd::FuzzSeeds { dir } => fuzz_seeds(&dir),
        Cmd::Apply {
            items,
            source,
            threads,
            changed_percent,
            cold,
        } => apply_bench(items, source, threads, changed_percent, cold).await,
        Cmd::Compare {
            items,
            systems,
            cap_s,
            peers,
            live,
            seconds,
        } => compare(&items, &systems, cap_s, peers, live, seconds).await,
        Cmd::Bundle { items } => {
            for n in items {
                bundle_bench(n).await?;
            }
            Ok(())
        }
        Cmd::Sync {
            items,
            live,
            restarts,
        } => {
            for n in items {
                sync_bench(n, live, restarts as usize).await?;
            }
            Ok(())
        }
    }
}

/// Every figure printed so far (the comparison reads ours back from here).
static EMITTED: std::sync::Mutex<Vec<Json>> = std::sync::Mutex::new(Vec::new());

fn emit(v: Json) {
    println!("{v}");
    EMITTED.lock().expect("emitted lock").push(v);
}

/// The `trackersync` binary next to this one (same target directory).
fn node_binary() -> Result<PathBuf> {
    let me = std::env::current_exe()?;
    let bin = me.with_file_name("trackersync");
    if !bin.exists() {
        bail!(
            "{} not found: run `cargo build --release` first",
            bin.display()
        );
    }
    Ok(bin)
}

struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Result<Scratch> {
        let p =
            std::env::temp_dir().join(format!("trackersync-bench-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p)?;
        Ok(Scratch(p))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub struct RunningNode {
    child: Child,
    pub base: String,
    pub token: String,
    pub http: reqwest::Client,
    /// Spawn to the API answering `/status`.
    pub started_in: Duration,
    /// Spawn to the API listening (its address file written).
    pub listening_in: Duration,
}

impl RunningNode {
    pub async fn start(dir: &Path, extra: &[&str]) -> Result<RunningNode> {
        let addr_file = dir.join("api-addr");
        let _ = std::fs::remove_file(&addr_file);
        // TRACKERSYNC_BENCH_LOGS=1 shows the nodes' logs (sync page traces) on stderr;
        // otherwise they go to a file beside the data directory, quoted if the node fails.
        let log_file = dir.with_extension("stderr");
        let stderr = match std::env::var_os("TRACKERSYNC_BENCH_LOGS") {
            Some(_) => Stdio::inherit(),
            None => Stdio::from(std::fs::File::create(&log_file)?),
        };
        let t0 = Instant::now();
        let mut child = Command::new(node_binary()?)
            .args(["serve", "--api", "127.0.0.1:0", "--no-mdns", "--data"])
            .arg(dir)
            .args(extra)
            .stdout(Stdio::null())
            .stderr(stderr)
            .kill_on_drop(true)
            .spawn()?;
        let addr = loop {
            if let Ok(s) = std::fs::read_to_string(&addr_file) {
                if !s.trim().is_empty() {
                    break s;
                }
            }
            if let Some(status) = child.try_wait()? {
                let log = std::fs::read_to_string(&log_file).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(5).collect();
                bail!(
                    "node exited ({status}) before its API came up: {}",
                    tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
                );
            }
            if t0.elapsed() > Duration::from_secs(120) {
                bail!("node did not start within 120 s");
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        };
        let listening_in = t0.elapsed();
        let token = std::fs::read_to_string(dir.join("api-token"))?
            .trim()
            .to_string();
        let http = reqwest::Client::builder()
            .no_proxy()
            .pool_max_idle_per_host(64)
            .build()?;
        let base = format!("http://{}", addr.trim());
        let status = http
            .get(format!("{base}/api/v1/status"))
            .bearer_auth(&token)
            .send()
            .await?;
        if !status.status().is_success() {
            bail!("status answered {}", status.status());
        }
        Ok(RunningNode {
            child,
            base,
            token,
            http,
            started_in: t0.elapsed(),
            listening_in,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id().unwrap_or(0)
    }

    /// (current RSS, peak RSS) in MiB from /proc.
    pub fn rss_mb(&self) -> (f64, f64) {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
        let field = |name: &str| {
            status
                .lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<f64>().ok())
                .map_or(0.0, |kb| kb / 1024.0)
        };
        (field("VmRSS:"), field("VmHWM:"))
    }

    /// The node's flush count, from /metrics.
    pub async fn flushes(&self) -> f64 {
        let Ok(res) = self.http.get(format!("{}/metrics", self.base)).send().await else {
            return 0.0;
        };
        let text = res.text().await.unwrap_or_default();
        text.lines()
            .find_map(|l| l.strip_prefix("trackersync_store_flushes "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0.0)
    }

    /// CPU seconds (user + system) the node process has used.
    pub fn cpu_s(&self) -> f64 {
        proc_cpu_s(self.pid())
    }

    /// Whether a pull from the first peer has reached the end of its feed.
    pub async fn caught_up(&self) -> Result<bool> {
        Ok(self
            .get("/peers")
            .await?
            .as_array()
            .and_then(|p| p.first())
            .is_some_and(|p| !p["last_sync"].is_null()))
    }

    pub async fn post(&self, path: &str, body: &Json) -> Result<Json> {
        let res = self
            .http
            .post(format!("{}/api/v1{path}", self.base))
            .bearer_auth(&self.token)
            .json(body)
            .send()
            .await?;
        if !res.status().is_success() {
            bail!("POST {path}: {}", res.status());
        }
        Ok(res.json().await?)
    }

    pub async fn delete(&self, path: &str) -> Result<()> {
        let res = self
            .http
            .delete(format!("{}/api/v1{path}", self.base))
            .bearer_auth(&self.token)
            .send()
            .await?;
        if !res.status().is_success() {
            bail!("DELETE {path}: {}", res.status());
        }
        Ok(())
    }

    pub async fn stop(mut self) {
        let _ = self.child.kill().await;
    }

    /// Graceful stop (SIGTERM): the node flushes and exits.
    pub async fn terminate(mut self) -> Result<()> {
        let status = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()
            .await?;
        if !status.success() {
            bail!("kill -TERM failed");
        }
        self.child.wait().await?;
        Ok(())
    }
}

/// CPU seconds (user + system) of a process, from /proc (clock ticks at 100 Hz).
fn proc_cpu_s(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let tick = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (tick(11) + tick(12)) / 100.0
}

fn dir_bytes(p: &Path) -> u64 {
    let mut total = 0;
    if let Ok(rd) = std::fs::read_dir(p) {
        for e in rd.flatten() {
            let Ok(md) = e.metadata() else { continue };
            total += if md.is_dir() {
                dir_bytes(&e.path())
            } else {
                md.len()
            };
        }
    }
    total
}

/// Run `clients` loops for `seconds`, each sending the request `make(i)` builds; count
/// acknowledged (2xx) answers.
async fn hammer(
    node: &RunningNode,
    clients: usize,
    seconds: f64,
    make: impl Fn(&reqwest::Client, &str, u64) -> reqwest::RequestBuilder + Send + Sync + 'static,
) -> Result<(u64, f64, Vec<String>)> {
    let make = Arc::new(make);
    let counter = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs_f64(seconds);
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let (http, base, token, make, counter) = (
            node.http.clone(),
            node.base.clone(),
            node.token.clone(),
            make.clone(),
            counter.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            let mut acked = 0u64;
            while Instant::now() < deadline {
                let i = counter.fetch_add(1, Ordering::Relaxed);
                let res = make(&http, &base, i).bearer_auth(&token).send().await?;
                if res.status().is_success() {
                    acked += 1;
                    let body: Json = res.json().await?;
                    if let Some(id) = body["id"].as_str() {
                        ids.push(id.to_string());
                    }
                }
            }
            anyhow::Ok((acked, ids))
        }));
    }
    let mut total = 0;
    let mut all_ids = Vec::new();
    for t in tasks {
        let (a, ids) = t.await??;
        total += a;
        all_ids.extend(ids);
    }
    Ok((total, t0.elapsed().as_secs_f64(), all_ids))
}

async fn local(seconds: f64, sizes: &[u64], clients: &[usize]) -> Result<()> {
    let scratch = Scratch::new("local")?;
    let node = RunningNode::start(&scratch.0.join("api"), &[]).await?;
    node.post("/trackers", &workload::tracker_body()).await?;
    let mut ids: Vec<String> = Vec::new();
    for &c in clients {
        let (cpu0, me0, fl0) = (
            node.cpu_s(),
            proc_cpu_s(std::process::id()),
            node.flushes().await,
        );
        let (acked, secs, new_ids) = hammer(&node, c, seconds, |http, base, i| {
            http.post(format!("{base}/api/v1/trackers/cases/items"))
                .json(&json!({"fields": workload::record(i)}))
        })
        .await?;
        ids.extend(new_ids);
        let (cpu1, me1, fl1) = (
            node.cpu_s(),
            proc_cpu_s(std::process::id()),
            node.flushes().await,
        );
        emit(
            json!({"bench": "api_create", "clients": c, "acked": acked, "seconds": secs, "per_s": acked as f64 / secs,
            "node_cpu_us_per_write": (cpu1 - cpu0) * 1e6 / acked as f64, "client_cpu_us_per_write": (me1 - me0) * 1e6 / acked as f64, "writes_per_flush": acked as f64 / (fl1 - fl0).max(1.0)}),
        );
        let targets = Arc::new(ids.clone());
        let (acked, secs, _) = hammer(&node, c, seconds, move |http, base, i| {
            let id = &targets[(i as usize * 7919) % targets.len()];
            http.patch(format!("{base}/api/v1/items/{id}"))
                .json(&json!({"fields": {"status": workload::STATUS[(i % 5) as usize]}}))
        })
        .await?;
        let (cpu2, me2, fl2) = (
            node.cpu_s(),
            proc_cpu_s(std::process::id()),
            node.flushes().await,
        );
        emit(
            json!({"bench": "api_edit", "clients": c, "acked": acked, "seconds": secs, "per_s": acked as f64 / secs,
            "node_cpu_us_per_write": (cpu2 - cpu1) * 1e6 / acked as f64, "client_cpu_us_per_write": (me2 - me1) * 1e6 / acked as f64, "writes_per_flush": acked as f64 / (fl2 - fl1).max(1.0)}),
        );
    }
    let (rss, peak) = node.rss_mb();
    emit(json!({"bench": "api_node_rss", "items": ids.len(), "rss_mb": rss, "peak_rss_mb": peak}));
    node.stop().await;

    for &n in sizes {
        let dir = scratch.0.join(format!("store-{n}"));
        let t0 = Instant::now();
        seed_store(&dir, n).await?;
        let seed_s = t0.elapsed().as_secs_f64();
        let bytes = dir_bytes(&dir.join("db"));
        emit(
            json!({"bench": "seed_store", "items": n, "seconds": seed_s, "per_s": n as f64 / seed_s,
            "disk_bytes": bytes, "disk_bytes_per_item": bytes as f64 / n as f64}),
        );
        // sled 0.34 writes its page-table snapshot only when it opens a store, replaying the
        // log written since the last open: the first start after the seeding process (which
        // closed the store without that checkpoint, as a crash would) pays for all of it; a
        // restart after a clean stop (SIGTERM: the node checkpoints as it closes) only for
        // what came since.
        for open in ["first_after_seeding", "restart_after_clean_stop"] {
            let node = RunningNode::start(&dir, &[]).await?;
            let (rss, peak) = node.rss_mb();
            let status: Json = node
                .http
                .get(format!("{}/api/v1/status", node.base))
                .bearer_auth(&node.token)
                .send()
                .await?
                .json()
                .await?;
            if status["items"].as_u64() != Some(n) {
                bail!("store of {n} reports {} items", status["items"]);
            }
            // A read of a cold item after start, as a user's first request would be.
            let t1 = Instant::now();
            let page: Json = node
                .http
                .get(format!(
                    "{}/api/v1/trackers/cases/items?limit=10",
                    node.base
                ))
                .bearer_auth(&node.token)
                .send()
                .await?
                .json()
                .await?;
            let first_read_ms = t1.elapsed().as_secs_f64() * 1000.0;
            if page["items"].as_array().map_or(0, Vec::len) != 10.min(n as usize) {
                bail!("listing a store of {n} returned {page}");
            }
            emit(
                json!({"bench": "cold_start", "items": n, "open": open, "start_s": node.started_in.as_secs_f64(), "rss_mb": rss, "peak_rss_mb": peak, "first_page_ms": first_read_ms}),
            );
            // A clean stop checkpoints the store, and rewrites it when its file holds
            // several times its live data (the seeding leaves it at about 2.4x: left alone).
            let disk_before = dir_bytes(&dir.join("db"));
            let t2 = Instant::now();
            node.terminate().await?;
            let disk_after = dir_bytes(&dir.join("db"));
            emit(
                json!({"bench": "clean_stop", "items": n, "after": open, "stop_s": t2.elapsed().as_secs_f64(),
                "disk_bytes_before": disk_before, "disk_bytes_after": disk_after, "disk_bytes_per_item": disk_after as f64 / n as f64}),
            );
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
    Ok(())
}

/// Fill a store with `n` workload records in-process, through the repo's normal durable write
/// path (several writers so group commit shares flushes).
async fn seed_store(dir: &Path, n: u64) -> Result<()> {
    use trackersync::config::{Identity, DIR_DB};
    use trackersync::hlc::SystemClock;
    use trackersync::repo::Repo;
    let identity = Identity::init(dir)?;
    let repo = Arc::new(Repo::open(
        &dir.join(DIR_DB),
        identity.node,
        Arc::new(SystemClock::default()),
        trackersync::hlc::DEFAULT_MAX_DRIFT_MS,
    )?);
    let body = workload::tracker_body();
    let fields = body["fields"]
        .as_array()
        .context("fields")?
        .iter()
        .map(|f| {
            let mut f = f.clone();
            f["label"] = f["name"].clone();
            f["required"] = json!(f["required"].as_bool().unwrap_or(false));
            f["options"] = f.get("options").cloned().unwrap_or(json!([]));
            serde_json::from_value::<trackersync::model::FieldDef>(f).context("field")
        })
        .collect::<Result<Vec<_>>>()?;
    repo.create_tracker("cases", fields, Default::default())?;
    const WRITERS: u64 = 16;
    let next = Arc::new(AtomicU64::new(0));
    let mut threads = Vec::new();
    for _ in 0..WRITERS {
        let (repo, next) = (repo.clone(), next.clone());
        threads.push(std::thread::spawn(move || -> Result<()> {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    return Ok(());
                }
                repo.create_item("cases", workload::record(i))?;
            }
        }));
    }
    for t in threads {
        t.join()
            .map_err(|_| anyhow::anyhow!("seeding thread panicked"))??;
    }
    repo.store().flush()?;
    Ok(())
}

async fn apply_bench(
    n: u64,
    source: Option<PathBuf>,
    threads: usize,
    changed_percent: u64,
    cold: bool,
) -> Result<()> {
    use trackersync::config::{Identity, DIR_DB};
    use trackersync::hlc::SystemClock;
    use trackersync::repo::Repo;
    let scratch = Scratch::new(&format!("apply-{n}"))?;
    let src = source.unwrap_or_else(|| scratch.0.join("a"));
    if !src.join(DIR_DB).exists() {
        let t0 = Instant::now();
        seed_store(&src, n).await?;
        eprintln!("seeded {n} items in {:?}", t0.elapsed());
    }
    let open = |dir: &Path| -> Result<Repo> {
        let identity = Identity::init(dir)?;
        Ok(Repo::open(
            &dir.join(DIR_DB),
            identity.node,
            Arc::new(SystemClock::default()),
            trackersync::hlc::DEFAULT_MAX_DRIFT_MS,
        )?)
    };
    let a = open(&src)?;
    let mut b = open(&scratch.0.join("b"))?;
    // Pages of A's feed after `since`, applied to B as a node applies a received page (its
    // items split between two threads).
    let transfer = |b: &Repo, since: u64, ids: &mut Vec<String>| -> Result<Transfer> {
        let mut t = Transfer {
            last: since,
            ..Transfer::default()
        };
        let cpu0 = proc_cpu_s(std::process::id());
        loop {
            let t0 = Instant::now();
            let (docs, last, more) = a.feed(since, t.last, 2000, 4 << 20, 0)?;
            t.serve += t0.elapsed();
            t.docs += docs.len();
            t.bytes += docs.iter().map(|d| d.data.len()).sum::<usize>();
            let t0 = Instant::now();
            let (trackers, items): (Vec<_>, Vec<_>) = docs
                .into_iter()
                .partition(|d| d.kind == trackersync::store::DocKind::Tracker);
            ids.extend(items.iter().map(|d| d.id.to_string()));
            b.apply_remote(trackers, 1)?;
            if threads > 1 {
                let mut items = items;
                let half = items.split_off(items.len() / 2);
                std::thread::scope(|s| -> Result<()> {
                    let h = s.spawn(move || b.apply_remote(half, 1));
                    b.apply_remote(items, 1)?;
                    h.join().map_err(|_| anyhow::anyhow!("panicked"))??;
                    Ok(())
                })?;
            } else {
                b.apply_remote(items, 1)?;
            }
            t.apply += t0.elapsed();
            t.last = last;
            if !more {
                t.cpu_s = proc_cpu_s(std::process::id()) - cpu0;
                return Ok(t);
            }
        }
    };
    let mut ids = Vec::new();
    let first = transfer(&b, 0, &mut ids)?;
    emit(
        json!({"bench": "apply", "n": n, "threads": threads, "docs": first.docs, "bytes": first.bytes, "serve_s": first.serve.as_secs_f64(),
        "apply_s": first.apply.as_secs_f64(), "apply_us_per_doc": first.apply.as_secs_f64() * 1e6 / first.docs as f64,
        "serve_us_per_doc": first.serve.as_secs_f64() * 1e6 / first.docs as f64,
        "cpu_us_per_doc": first.cpu_s * 1e6 / first.docs as f64}),
    );
    // Catch-up: 1 % of the items (`--changed-percent`) change on A (three fields each, as in
    // `sync`), and B, which holds them all (not decoded: received documents leave the cache),
    // merges the changes. With `--source` the source store keeps these edits.
    let step = usize::try_from(100 / changed_percent)?;
    let edited: Vec<&String> = ids.iter().step_by(step).collect();
    for id in &edited {
        let fields = catchup_fields(format!("updated ({id})"));
        a.update_item(id, fields.as_object().cloned().context("fields")?)?;
    }
    if cold {
        b.close()?;
        b = open(&scratch.0.join("b"))?;
    }
    let catch_up = transfer(&b, first.last, &mut Vec::new())?;
    emit(
        json!({"bench": "apply", "scenario": "catch_up", "n": n, "threads": threads, "cold": cold, "edited": edited.len(), "docs": catch_up.docs,
        "bytes": catch_up.bytes, "serve_s": catch_up.serve.as_secs_f64(), "apply_s": catch_up.apply.as_secs_f64(),
        "apply_us_per_doc": catch_up.apply.as_secs_f64() * 1e6 / catch_up.docs.max(1) as f64,
        "cpu_us_per_doc": catch_up.cpu_s * 1e6 / catch_up.docs.max(1) as f64}),
    );
    Ok(())
}

/// What one run of the feed from A to B in `apply_bench` moved.
#[derive(Default)]
struct Transfer {
    last: u64,
    docs: usize,
    bytes: usize,
    serve: Duration,
    apply: Duration,
    /// CPU seconds the whole process (sled's threads included) used meanwhile.
    cpu_s: f64,
}

const LISTEN: [&str; 2] = ["--listen", "/ip4/127.0.0.1/tcp/0"];

/// Poll every millisecond until `check` holds; fail after `limit`.
async fn until<F, Fut>(limit: Duration, what: &str, check: F) -> Result<Duration>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<bool>>,
{
    let t0 = Instant::now();
    loop {
        if check().await? {
            return Ok(t0.elapsed());
        }
        if t0.elapsed() > limit {
            bail!("{what}: not done after {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

async fn sync_bench(n: u64, live: usize, restarts: usize) -> Result<()> {
    let scratch = Scratch::new(&format!("sync-{n}"))?;
    let (a_dir, b_dir) = (scratch.0.join("a"), scratch.0.join("b"));
    let t0 = Instant::now();
    seed_store(&a_dir, n).await?;
    eprintln!("seeded {n} items in {:?}", t0.elapsed());
    let a = RunningNode::start(&a_dir, &LISTEN).await?;
    let mut b = RunningNode::start(&b_dir, &LISTEN).await?;
    let (a_addr, b_addr) = (a.p2p_addr().await?, b.p2p_addr().await?);
    let limit = Duration::from_secs(600);

    // 1. Initial sync: B (empty) gets all N once the pair is authorized.
    let bytes0 = a.metric("trackersync_sync_bytes_sent").await;
    let (cpu_a0, cpu_b0) = (a.cpu_s(), b.cpu_s());
    let t0 = Instant::now();
    a.post("/peers", &json!({"addr": b_addr})).await?;
    b.post("/peers", &json!({"addr": a_addr})).await?;
    // The items gauge from /metrics: cheap to poll (status also counts per-peer waiting work).
    until(limit, "initial sync", || async {
        Ok(b.metric("trackersync_items").await == n as f64)
    })
    .await?;
    let secs = t0.elapsed().as_secs_f64();
    let bytes = a.metric("trackersync_sync_bytes_sent").await - bytes0;
    emit(
        json!({"bench": "sync", "scenario": "initial_sync", "n": n, "seconds": secs, "items_per_s": n as f64 / secs,
        "bytes_a_to_b": bytes, "peak_rss_mb_a": a.rss_mb().1, "peak_rss_mb_b": b.rss_mb().1,
        "cpu_s_a": a.cpu_s() - cpu_a0, "cpu_s_b": b.cpu_s() - cpu_b0}),
    );

    // 2. Catch-up online: the link drops (A revokes B, which closes the connection at once),
    // 1% of items change on A (round 1: three fields each, as the peer harnesses do), the link
    // returns (A authorizes B again and dials it): until B has them all.
    let page_ids = all_ids(&a, n).await?;
    let b_id = b.get("/status").await?["peer_id"]
        .as_str()
        .context("peer id")?
        .to_string();
    a.delete(&format!("/peers/{b_id}")).await?;
    until(limit, "link down", || async {
        Ok(b.get("/peers").await?[0]["connected"] == false)
    })
    .await?;
    let (k, _) = edit_round(&a, &page_ids, n, 1).await?;
    // Done when B's checkpoint on A reaches A's last change: applied, durable and recorded
    // (B's own sequence number moves before that, and the next scenario stops B).
    let a_seq = a.metric("trackersync_change_seq").await;
    let a_sent0 = a.metric("trackersync_sync_bytes_sent").await;
    let t0 = Instant::now();
    a.post("/peers", &json!({"addr": b_addr})).await?;
    until(limit, "online catch-up", || checkpoint_reaches(&b, a_seq)).await?;
    let secs = t0.elapsed().as_secs_f64();
    emit(
        json!({"bench": "sync", "scenario": "catch_up_online", "n": n, "items": k, "seconds": secs,
        "items_per_s": k / secs, "bytes_a_to_b": a.metric("trackersync_sync_bytes_sent").await - a_sent0}),
    );

    // A forgot its checkpoint on B when it revoked B, so it is still reconciling with B by
    // range summaries (fetching from B the documents it changed, to learn B holds nothing
    // newer). Let that finish: it belongs to the re-pairing above, and left running it would
    // load B's documents during the next scenario's catch-up.
    until(limit, "A's reconciliation with B", || {
        checkpoint_reaches(&a, 0.0)
    })
    .await?;

    // 3. Catch-up after a restart: B exits (a clean stop, as the peer harnesses' B1 exits),
    // 1% of items change on A (rounds 2, 3, ...), then B restarts and catches up; `restarts`
    // times, each run printed, then the medians (one run on a shared machine is noisy).
    let mut runs: Vec<Json> = Vec::with_capacity(restarts);
    for round in 2..2 + restarts as u64 {
        b.terminate().await?;
        let (k, edit_bytes) = edit_round(&a, &page_ids, n, round).await?;
        // Done when B's checkpoint on A reaches A's last change. (Not B's own sequence
        // number: after a crash it resumes numbering past a gap, see `Store::open`.)
        let a_seq = a.metric("trackersync_change_seq").await;
        let a_sent0 = a.metric("trackersync_sync_bytes_sent").await;
        let a_payload0 = a.metric("trackersync_sync_payload_bytes_sent").await;
        let t0 = Instant::now();
        b = RunningNode::start(&b_dir, &LISTEN).await?;
        let spawn_to_api = t0.elapsed();
        until(limit, "catch-up", || checkpoint_reaches(&b, a_seq)).await?;
        let secs = t0.elapsed().as_secs_f64();
        let sent = a.metric("trackersync_sync_bytes_sent").await - a_sent0;
        // The same messages before compression (deflate protocol).
        let payload = a.metric("trackersync_sync_payload_bytes_sent").await - a_payload0;
        let b_in = b.metric("trackersync_sync_bytes_received").await;
        let b_out = b.metric("trackersync_sync_bytes_sent").await;
        let run = json!({"bench": "sync", "scenario": "catch_up_restart_run", "n": n, "round": round, "items": k, "seconds_from_spawn": secs,
            "seconds_after_api_up": secs - spawn_to_api.as_secs_f64(), "api_listening_s": b.listening_in.as_secs_f64(), "status_answered_s": b.started_in.as_secs_f64(), "bytes_a_to_b": sent, "payload_bytes_a_to_b": payload, "bytes_b_in": b_in, "bytes_b_out": b_out,
            "edit_json_bytes": edit_bytes, "peak_rss_mb_b": b.rss_mb().1});
        if restarts > 1 {
            emit(run.clone());
        }
        runs.push(run);
    }
    // The times are the runs' medians; bytes, items and RSS are the last run's.
    let mut summary = runs.last().cloned().context("no restart run")?;
    if let Some(fields) = summary.as_object_mut() {
        fields.remove("round");
    }
    summary["scenario"] = json!("catch_up_restart");
    summary["runs"] = json!(restarts);
    for key in [
        "seconds_from_spawn",
        "seconds_after_api_up",
        "api_listening_s",
        "status_answered_s",
    ] {
        let mut xs: Vec<f64> = runs.iter().filter_map(|r| r[key].as_f64()).collect();
        xs.sort_by(f64::total_cmp);
        summary[key] = json!(xs[xs.len() / 2]);
        if restarts > 1 {
            summary[format!("{key}_min")] = json!(xs[0]);
            summary[format!("{key}_max")] = json!(xs[xs.len() - 1]);
        }
    }
    emit(summary);

    // 4. Already synced: B restarts with nothing new; time until its first pull confirms.
    b.terminate().await?;
    let a_sent0 = a.metric("trackersync_sync_bytes_sent").await;
    let a_in0 = a.metric("trackersync_sync_bytes_received").await;
    let t0 = Instant::now();
    b = RunningNode::start(&b_dir, &LISTEN).await?;
    let spawn_to_api = t0.elapsed();
    let connected = until(limit, "reconnect", || async {
        Ok(b.get("/peers")
            .await?
            .as_array()
            .and_then(|p| p.first())
            .is_some_and(|p| p["connected"] == true))
    })
    .await?;
    let confirmed = until(limit, "already-synced confirmation", || b.caught_up()).await?;
    let bytes = (a.metric("trackersync_sync_bytes_sent").await - a_sent0)
        + (a.metric("trackersync_sync_bytes_received").await - a_in0);
    emit(
        json!({"bench": "sync", "scenario": "already_synced", "n": n, "seconds_from_spawn": t0.elapsed().as_secs_f64(),
        "api_up_s": spawn_to_api.as_secs_f64(), "api_listening_s": b.listening_in.as_secs_f64(), "connect_s": connected.as_secs_f64(), "confirm_after_connect_s": confirmed.as_secs_f64(),
        "bytes_both_ways": bytes}),
    );

    // 5. Live latency: single-field edits on A, observed through B's event stream.
    let target = page_ids[0].clone();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Instant>();
    let res = b
        .http
        .get(format!("{}/api/v1/events", b.base))
        .bearer_auth(&b.token)
        .send()
        .await?;
    let watch_id = target.clone();
    let reader = tokio::spawn(async move {
        use futures::StreamExt;
        let mut body = res.bytes_stream();
        let mut buf = String::new();
        while let Some(Ok(chunk)) = body.next().await {
            buf.push_str(&String::from_utf8_lossy(&chunk));
            while let Some(pos) = buf.find('\n') {
                let line: String = buf.drain(..=pos).collect();
                if line.starts_with("data:") && line.contains(&watch_id) {
                    let _ = tx.send(Instant::now());
                }
            }
        }
    });
    let mut lat = Vec::with_capacity(live);
    for j in 0..live {
        let t = Instant::now();
        let res = a
            .http
            .patch(format!("{}/api/v1/items/{target}", a.base))
            .bearer_auth(&a.token)
            .json(&json!({"fields": {"notes": format!("LIVE|{j}")}}))
            .send()
            .await?;
        if !res.status().is_success() {
            bail!("live edit failed: {}", res.status());
        }
        let seen = tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await?
            .context("event stream ended")?;
        lat.push(seen.duration_since(t).as_secs_f64() * 1000.0);
        // Drop duplicate events of this edit, if any.
        while rx.try_recv().is_ok() {}
    }
    reader.abort();
    lat.sort_by(f64::total_cmp);
    let pct = |p: f64| lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)];
    emit(
        json!({"bench": "sync", "scenario": "live_latency", "n": n, "edits": live, "p50_ms": pct(0.5), "p99_ms": pct(0.99), "max_ms": lat[lat.len() - 1]}),
    );
    // 6. First contact between nodes that already hold the same items: unpaired (checkpoints
    // forgotten) and paired again, they reconcile by range summaries.
    let (a_id, b_id) = (
        a.get("/status").await?["peer_id"].clone(),
        b.get("/status").await?["peer_id"].clone(),
    );
    for (node, other) in [(&a, &b_id), (&b, &a_id)] {
        let res = node
            .http
            .delete(format!(
                "{}/api/v1/peers/{}",
                node.base,
                other.as_str().unwrap_or("")
            ))
            .bearer_auth(&node.token)
            .send()
            .await?;
        if !res.status().is_success() {
            bail!("unpair failed: {}", res.status());
        }
    }
    let a_bytes0 = a.metric("trackersync_sync_bytes_sent").await
        + a.metric("trackersync_sync_bytes_received").await;
    let t0 = Instant::now();
    b.post("/peers", &json!({"addr": a_addr})).await?;
    a.post("/peers", &json!({"addr": b_addr})).await?;
    until(limit, "first-contact reconciliation", || b.caught_up()).await?;
    let secs = t0.elapsed().as_secs_f64();
    let bytes = a.metric("trackersync_sync_bytes_sent").await
        + a.metric("trackersync_sync_bytes_received").await
        - a_bytes0;
    emit(
        json!({"bench": "sync", "scenario": "first_contact_same_items", "n": n, "seconds": secs, "bytes_both_ways": bytes}),
    );
    a.stop().await;
    b.stop().await;
    Ok(())
}

/// Whether `node`'s checkpoint on its (only) peer's feed has reached `seq`.
async fn checkpoint_reaches(node: &RunningNode, seq: f64) -> Result<bool> {
    Ok(node
        .get("/peers")
        .await?
        .as_array()
        .and_then(|p| p.first())
        .and_then(|p| p["checkpoint"].as_f64())
        .is_some_and(|c| c >= seq))
}

/// The peer harnesses' 1% edit, round `round`: three fields of every edited record in one
/// request each. Returns (records edited, JSON bytes sent).
/// The fields one record's 1 % edit sets: status, a timestamp and `notes`.
fn catchup_fields(notes: String) -> Json {
    json!({"status": "closed", "notes": notes,
        "last_updated": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)})
}

async fn edit_round(a: &RunningNode, ids: &[String], n: u64, round: u64) -> Result<(f64, usize)> {
    let edited = workload::catchup_indices(n, round);
    let mut edit_bytes = 0usize;
    for &i in &edited {
        let body = json!({"fields": catchup_fields(format!("updated in round {round} (doc {i})"))});
        edit_bytes += body.to_string().len();
        let res = a
            .http
            .patch(format!("{}/api/v1/items/{}", a.base, ids[i as usize]))
            .bearer_auth(&a.token)
            .json(&body)
            .send()
            .await?;
        if !res.status().is_success() {
            bail!("edit failed: {}", res.status());
        }
    }
    Ok((edited.len() as f64, edit_bytes))
}

/// Run the real CLI against a data directory; its stdout as JSON.
async fn cli_json(dir: &Path, args: &[&str]) -> Result<Json> {
    let out = Command::new(node_binary()?)
        .arg("--data")
        .arg(dir)
        .args(args)
        .output()
        .await?;
    if !out.status.success() {
        bail!(
            "trackersync {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(serde_json::from_slice(&out.stdout)?)
}

async fn bundle_bench(n: u64) -> Result<()> {
    let scratch = Scratch::new(&format!("bundle-{n}"))?;
    let (a_dir, b_dir) = (scratch.0.join("a"), scratch.0.join("b"));
    let file = scratch.0.join("seed.tsb");
    seed_store(&a_dir, n).await?;
    let a = RunningNode::start(&a_dir, &LISTEN).await?;
    let t0 = Instant::now();
    let header = cli_json(
        &a_dir,
        &["export", file.to_str().context("path")?, "--json"],
    )
    .await?;
    let export_s = t0.elapsed().as_secs_f64();
    let size = std::fs::metadata(&file)?.len();
    emit(
        json!({"bench": "bundle", "scenario": "export", "n": n, "seconds": export_s, "items_per_s": n as f64 / export_s,
        "file_bytes": size, "bytes_per_item": size as f64 / n as f64, "items": header["item_docs"], "peak_rss_mb_a": a.rss_mb().1}),
    );

    // Seeding: a fresh node, started, imports the bundle.
    let b = RunningNode::start(&b_dir, &LISTEN).await?;
    let t0 = Instant::now();
    let summary = cli_json(
        &b_dir,
        &["import", file.to_str().context("path")?, "--json"],
    )
    .await?;
    let import_s = t0.elapsed().as_secs_f64();
    if summary["merged"].as_u64() != Some(n + 1) {
        bail!("import merged {} of {}", summary["merged"], n + 1);
    }
    emit(
        json!({"bench": "bundle", "scenario": "import", "n": n, "seconds": import_s, "items_per_s": n as f64 / import_s,
        "checkpoint": summary["checkpoint"], "peak_rss_mb_b": b.rss_mb().1}),
    );
    let t0 = Instant::now();
    let again = cli_json(
        &b_dir,
        &["import", file.to_str().context("path")?, "--json"],
    )
    .await?;
    emit(
        json!({"bench": "bundle", "scenario": "import_again", "n": n, "seconds": t0.elapsed().as_secs_f64(),
        "merged": again["merged"], "unchanged": again["unchanged"]}),
    );

    // Then 1% changes on A and the pair connects: sync moves only what changed after the export.
    let ids = all_ids(&a, n).await?;
    let edited = workload::catchup_indices(n, 1);
    for &i in &edited {
        let res = a
            .http
            .patch(format!("{}/api/v1/items/{}", a.base, ids[i as usize]))
            .bearer_auth(&a.token)
            .json(&json!({"fields": {"status": "closed"}}))
            .send()
            .await?;
        if !res.status().is_success() {
            bail!("edit failed: {}", res.status());
        }
    }
    let b_seq = b.metric("trackersync_change_seq").await;
    let a_sent0 = a.metric("trackersync_sync_bytes_sent").await;
    let t0 = Instant::now();
    let (a_addr, b_addr) = (a.p2p_addr().await?, b.p2p_addr().await?);
    a.post("/peers", &json!({"addr": b_addr})).await?;
    b.post("/peers", &json!({"addr": a_addr})).await?;
    let k = edited.len() as f64;
    until(Duration::from_secs(600), "sync after seeding", || async {
        Ok(b.metric("trackersync_change_seq").await >= b_seq + k)
    })
    .await?;
    let secs = t0.elapsed().as_secs_f64();
    emit(
        json!({"bench": "bundle", "scenario": "sync_after_seed", "n": n, "changed": k, "seconds": secs,
        "bytes_a_to_b": a.metric("trackersync_sync_bytes_sent").await - a_sent0,
        "bytes_a_to_b_per_changed_item": (a.metric("trackersync_sync_bytes_sent").await - a_sent0) / k}),
    );
    b.stop().await;
    a.stop().await;
    Ok(())
}

/// Item ids of the bench tracker, in creation order (= workload record order: seeding is
/// concurrent, so order by case_id).
async fn all_ids(node: &RunningNode, n: u64) -> Result<Vec<String>> {
    let mut ids = vec![String::new(); n as usize];
    let mut after: Option<String> = None;
    loop {
        let mut path = "/trackers/cases/items?limit=1000".to_string();
        if let Some(a) = &after {
            path.push_str(&format!("&after={a}"));
        }
        let page = node.get(&path).await?;
        for item in page["items"].as_array().into_iter().flatten() {
            let i: usize = item["fields"]["case_id"]
                .as_str()
                .and_then(|c| c.strip_prefix("CASE-"))
                .and_then(|c| c.parse().ok())
                .context("case_id")?;
            ids[i] = item["id"].as_str().context("id")?.to_string();
        }
        match page["next"].as_str() {
            Some(next) => after = Some(next.to_string()),
            None => return Ok(ids),
        }
    }
}

impl RunningNode {
    /// One figure from /metrics.
    pub async fn metric(&self, name: &str) -> f64 {
        let Ok(res) = self.http.get(format!("{}/metrics", self.base)).send().await else {
            return 0.0;
        };
        let text = res.text().await.unwrap_or_default();
        let prefix = format!("{name} ");
        text.lines()
            .find_map(|l| l.strip_prefix(prefix.as_str()))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0.0)
    }

    pub async fn get(&self, path: &str) -> Result<Json> {
        let res = self
            .http
            .get(format!("{}/api/v1{path}", self.base))
            .bearer_auth(&self.token)
            .send()
            .await?;
        Ok(res.json().await?)
    }

    /// `/ip4/127.0.0.1/tcp/<port>/p2p/<peer id>`.
    pub async fn p2p_addr(&self) -> Result<String> {
        for _ in 0..1000 {
            let s = self.get("/status").await?;
            if let Some(a) = s["listen_addrs"]
                .as_array()
                .and_then(|a| a.first())
                .and_then(Json::as_str)
            {
                return Ok(format!("{a}/p2p/{}", s["peer_id"].as_str().unwrap_or("")));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        bail!("node is not listening")
    }
}

/// Seeds for `fuzz/`: valid messages and documents from a real repo, and damaged copies.
fn fuzz_seeds(dir: &Path) -> Result<()> {
    use prost::Message;
    use trackersync::config::{Identity, DIR_DB};
    use trackersync::hlc::SystemClock;
    use trackersync::net::pb;
    use trackersync::repo::Repo;
    let scratch = Scratch::new("seeds")?;
    let identity = Identity::init(&scratch.0)?;
    let repo = Repo::open(
        &scratch.0.join(DIR_DB),
        identity.node,
        Arc::new(SystemClock::default()),
        trackersync::hlc::DEFAULT_MAX_DRIFT_MS,
    )?;
    let text = |n: &str| trackersync::model::FieldDef {
        name: n.into(),
        ty: trackersync::model::FieldType::Text,
        label: n.into(),
        required: false,
        options: vec![],
    };
    repo.create_tracker(
        "cases",
        vec![text("name"), text("notes")],
        Default::default(),
    )?;
    let item = repo.create_item(
        "cases",
        workload::record(1)
            .into_iter()
            .filter(|(k, _)| k == "name" || k == "notes")
            .collect(),
    )?;
    for i in 0..3 {
        let mut m = serde_json::Map::new();
        m.insert("notes".into(), json!(format!("edit {i}")));
        repo.update_item(&item.id.to_string(), m)?;
    }
    let (docs, last, _) = repo.feed(0, 0, 100, 1 << 20, 0)?;
    let wire_dir = dir.join("corpus/wire_decode");
    let doc_dir = dir.join("corpus/apply_document");
    std::fs::create_dir_all(&wire_dir)?;
    std::fs::create_dir_all(&doc_dir)?;
    let entries: Vec<pb::Entry> = docs
        .iter()
        .map(|d| pb::Entry {
            id: d.id.as_bytes().to_vec(),
            kind: if d.kind == trackersync::store::DocKind::Item {
                pb::DocKind::Item as i32
            } else {
                pb::DocKind::Tracker as i32
            },
            tracker: d.tracker.as_bytes().to_vec(),
            heads: d.heads.iter().map(|h| h.to_vec()).collect(),
            data: d.data.clone(),
            seq: d.seq,
        })
        .collect();
    let messages: Vec<Vec<u8>> = vec![
        pb::Request {
            version: 1,
            body: Some(pb::request::Body::Pull(pb::Pull {
                since: 3,
                incarnation: vec![7; 16],
                max_entries: 100,
                ..Default::default()
            })),
        }
        .encode_to_vec(),
        pb::Request {
            version: 1,
            body: Some(pb::request::Body::Notify(pb::Notify {
                seq: 9,
                ..Default::default()
            })),
        }
        .encode_to_vec(),
        pb::Request {
            version: 1,
            body: Some(pb::request::Body::Fetch(pb::Fetch {
                docs: vec![pb::Have {
                    id: item.id.as_bytes().to_vec(),
                    heads: vec![vec![1; 32]],
                }],
            })),
        }
        .encode_to_vec(),
        pb::Response {
            version: 1,
            body: Some(pb::response::Body::Pull(pb::PullReply {
                node: vec![1; 16],
                incarnation: vec![2; 16],
                last_seq: last,
                more: false,
                entries,
            })),
        }
        .encode_to_vec(),
        pb::Response {
            version: 1,
            body: Some(pb::response::Body::Refused(pb::Refused {
                reason: "no".into(),
            })),
        }
        .encode_to_vec(),
    ];
    let mut n = 0;
    let mut write = |d: &Path, bytes: &[u8]| -> Result<()> {
        n += 1;
        std::fs::write(d.join(format!("seed-{n:03}")), bytes)?;
        Ok(())
    };
    for m in &messages {
        write(&wire_dir, m)?;
        write(&wire_dir, &m[..m.len() / 2])?;
    }
    // Documents: kind byte (even = item, odd = tracker) + Automerge bytes, whole and damaged.
    let item_bytes = {
        let full = repo.fetch(item.id, &[])?.context("item")?;
        full.data
    };
    for d in &docs {
        let kind: u8 = if d.kind == trackersync::store::DocKind::Item {
            2
        } else {
            1
        };
        let mut bytes = vec![kind];
        bytes.extend_from_slice(&d.data);
        write(&doc_dir, &bytes)?;
        let mut truncated = bytes.clone();
        truncated.truncate(bytes.len() * 2 / 3);
        write(&doc_dir, &truncated)?;
        let mut flipped = bytes.clone();
        let mid = flipped.len() / 2;
        flipped[mid] ^= 0x5a;
        write(&doc_dir, &flipped)?;
    }
    let mut whole = vec![4u8];
    whole.extend_from_slice(&item_bytes);
    write(&doc_dir, &whole)?;
    println!("wrote {n} seeds under {}", dir.display());
    Ok(())
}

/// Copy the peer harnesses to `target/bench-peers` (their own directory may be read-only;
/// they are not modified), set them up there if needed, run them, and return their lines.
async fn run_peers(src: &Path, systems: &str, items: &[u64], cap_s: u64) -> Result<Vec<Json>> {
    let work = node_binary()?
        .parent()
        .and_then(Path::parent)
        .context("target directory")?
        .join("bench-peers");
    std::fs::create_dir_all(&work)?;
    for entry in
        std::fs::read_dir(src).with_context(|| format!("peer harnesses in {}", src.display()))?
    {
        let entry = entry?;
        if entry.file_type()?.is_file() {
            let to = work.join(entry.file_name());
            let _ = std::fs::remove_file(&to);
            std::fs::copy(entry.path(), &to)?;
            let mut perm = std::fs::metadata(&to)?.permissions();
            #[allow(clippy::permissions_set_readonly_false)]
            perm.set_readonly(false);
            std::fs::set_permissions(&to, perm)?;
        }
    }
    if !work.join("node_modules").exists() {
        eprintln!(
            "setting up the peer harnesses in {} (npm install)",
            work.display()
        );
        let ok = Command::new("bash")
            .arg(work.join("setup.sh"))
            .stdout(Stdio::inherit())
            .status()
            .await?
            .success();
        if !ok {
            bail!("the peer harnesses' setup.sh failed (it needs node >= 20 and the npm registry)");
        }
    }
    let out = std::env::temp_dir().join(format!("trackersync-compare-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let ns: Vec<String> = items.iter().map(u64::to_string).collect();
    // The harness prints its own table; ours follows. Its exit status is 1 when a run ended in
    // an error, which is a result to show, not a reason to stop.
    let _ = Command::new("bash")
        .arg(work.join("run.sh"))
        .args([
            "--systems",
            systems,
            "--n",
            &ns.join(","),
            "--reps",
            "1",
            "--cap-s",
        ])
        .arg(cap_s.to_string())
        .arg("--out")
        .arg(&out)
        .stdout(Stdio::inherit())
        .status()
        .await?;
    let text = std::fs::read_to_string(out.join("peers.jsonl")).unwrap_or_default();
    let lines = text
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let _ = std::fs::remove_dir_all(&out);
    Ok(lines)
}

async fn compare(
    items: &[u64],
    systems: &str,
    cap_s: u64,
    peers: Option<PathBuf>,
    live: usize,
    seconds: f64,
) -> Result<()> {
    let machine = json!({"bench": "machine", "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "loadavg": std::fs::read_to_string("/proc/loadavg").unwrap_or_default().trim(),
        "started": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)});
    emit(machine);
    for &n in items {
        sync_bench(n, live, 1).await?;
    }
    local(seconds, &[], &[1, 8]).await?;
    let src = peers
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/bench-peers"));
    let theirs = if systems.trim().is_empty() {
        Vec::new()
    } else {
        run_peers(&src, systems, items, cap_s).await?
    };
    let ours = EMITTED.lock().expect("emitted lock").clone();

    // (label, our scenario, our key, their scenario, their key)
    let rows: [(&str, &str, &str, &str, &str); 7] = [
        (
            "initial sync (s)",
            "initial_sync",
            "seconds",
            "initial_sync",
            "seconds",
        ),
        (
            "catch-up online, 1% (s)",
            "catch_up_online",
            "seconds",
            "catch_up_online",
            "seconds",
        ),
        (
            "catch-up after restart, 1% (s)",
            "catch_up_restart",
            "seconds_after_api_up",
            "catch_up_restart",
            "seconds",
        ),
        (
            "  the same from process spawn (s)",
            "catch_up_restart",
            "seconds_from_spawn",
            "catch_up_restart",
            "seconds_from_spawn",
        ),
        (
            "already-synced reconnect (s)",
            "already_synced",
            "seconds_from_spawn",
            "",
            "",
        ),
        (
            "live edit p50 (ms)",
            "live_latency",
            "p50_ms",
            "live_latency",
            "p50_ms",
        ),
        (
            "live edit p99 (ms)",
            "live_latency",
            "p99_ms",
            "live_latency",
            "p99_ms",
        ),
    ];
    let ours_at = |scenario: &str, key: &str, n: u64| {
        ours.iter()
            .find(|v| v["bench"] == "sync" && v["scenario"] == scenario && v["n"] == n)
            .and_then(|v| v[key].as_f64())
    };
    let theirs_at =
        |system: &str, scenario: &str, key: &str, n: u64| -> Option<Result<f64, String>> {
            if scenario.is_empty() {
                return None;
            }
            let v = theirs
                .iter()
                .find(|v| v["system"] == system && v["scenario"] == scenario && v["n"] == n)?;
            Some(match (v["status"].as_str(), v[key].as_f64()) {
                (Some("ok"), Some(x)) => Ok(x),
                (status, _) => Err(status.unwrap_or("missing").to_string()),
            })
        };
    let fmt = |x: f64| {
        if x >= 100.0 {
            format!("{x:.0}")
        } else if x >= 1.0 {
            format!("{x:.2}")
        } else {
            format!("{x:.3}")
        }
    };
    let mut table = vec![
        "| scenario | N | trackersync | automerge-repo | PouchDB | trackersync / automerge-repo | trackersync / PouchDB |".to_string(),
        "|---|---|---|---|---|---|---|".to_string(),
    ];
    for (label, our_s, our_k, their_s, their_k) in rows {
        for &n in items {
            let Some(us) = ours_at(our_s, our_k, n) else {
                continue;
            };
            let mut cells = vec![fmt(us)];
            let mut ratios = Vec::new();
            for system in ["automerge-repo", "pouchdb"] {
                match theirs_at(system, their_s, their_k, n) {
                    None => {
                        cells.push("–".into());
                        ratios.push("–".into());
                    }
                    Some(Ok(x)) => {
                        cells.push(fmt(x));
                        let r = us / x;
                        ratios.push(if r <= 1.0 {
                            format!("{r:.3} ({:.1}x faster)", 1.0 / r)
                        } else {
                            format!("{r:.3} ({r:.1}x slower)")
                        });
                        emit(
                            json!({"bench": "compare", "scenario": our_s, "figure": label.trim(), "n": n,
                            "trackersync": us, "peer": system, "peer_value": x, "ratio": r}),
                        );
                    }
                    Some(Err(status)) => {
                        cells.push(status.clone());
                        ratios.push(format!("peer {status}"));
                    }
                }
            }
            table.push(format!(
                "| {label} | {n} | {} | {} |",
                cells.join(" | "),
                ratios.join(" | ")
            ));
        }
    }
    for v in &ours {
        if v["bench"] == "api_create" || v["bench"] == "api_edit" {
            table.push(format!(
                "| durable API {} /s, {} client(s) | – | {:.0} | – | – | – | – |",
                if v["bench"] == "api_create" {
                    "creates"
                } else {
                    "edits"
                },
                v["clients"],
                v["per_s"].as_f64().unwrap_or(0.0)
            ));
        }
    }
    println!();
    for line in table {
        println!("{line}");
    }
    Ok(())
}
