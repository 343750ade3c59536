//! Helpers so a new test is a few lines: start a real node process on a temporary data
//! directory, call its API, run CLI commands against it.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use serde_json::Value as Json;
use tokio::process::{Child, Command};

pub const BIN: &str = env!("CARGO_BIN_EXE_trackersync");
/// How long a node may take to start before a test fails.
const START_TIMEOUT: Duration = Duration::from_secs(20);

pub struct TestNode {
    pub dir: PathBuf,
    pub child: Child,
    pub base: String,
    pub token: String,
    pub http: reqwest::Client,
    _tmp: Option<tempfile::TempDir>,
}

impl TestNode {
    pub async fn start() -> TestNode {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("node");
        let mut n = TestNode::start_in(&dir).await;
        n._tmp = Some(tmp);
        n
    }

    /// Start a node on `dir` (kept by the caller across restarts).
    pub async fn start_in(dir: &Path) -> TestNode {
        TestNode::start_listening(dir, "/ip4/127.0.0.1/tcp/0").await
    }

    /// Start a node on `dir` listening on `listen` (a fixed port survives restarts).
    pub async fn start_listening(dir: &Path, listen: &str) -> TestNode {
        TestNode::start_with(dir, listen, &[]).await
    }

    /// A node in a fresh directory with extra `serve` arguments.
    pub async fn start_args(extra: &[&str]) -> TestNode {
        let tmp = tempfile::tempdir().expect("tempdir");
        let mut n =
            TestNode::start_with(&tmp.path().join("node"), "/ip4/127.0.0.1/tcp/0", extra).await;
        n._tmp = Some(tmp);
        n
    }

    pub async fn start_with(dir: &Path, listen: &str, extra: &[&str]) -> TestNode {
        TestNode::start_wrapped(&[], dir, "127.0.0.1:0", listen, extra).await
    }

    /// Start `trackersync serve` behind `wrapper` (e.g. `ip netns exec NS`), with its API on
    /// `api`.
    pub async fn start_wrapped(
        wrapper: &[&str],
        dir: &Path,
        api: &str,
        listen: &str,
        extra: &[&str],
    ) -> TestNode {
        let addr_file = dir.join("api-addr");
        // A node killed with SIGKILL leaves its api-addr behind; wait for the new one.
        let _ = std::fs::remove_file(&addr_file);
        let mut cmd = match wrapper.split_first() {
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args).arg(BIN);
                c
            }
            None => Command::new(BIN),
        };
        let child = cmd
            .args([
                "serve",
                "--api",
                api,
                "--no-mdns",
                "--listen",
                listen,
                "--data",
            ])
            .arg(dir)
            .args(extra)
            .stdout(Stdio::null())
            .stderr(node_stderr(dir))
            .kill_on_drop(true)
            .spawn()
            .expect("spawn trackersync serve");
        let addr = wait_for_file(&addr_file, START_TIMEOUT).await;
        let token = std::fs::read_to_string(dir.join("api-token")).expect("api-token");
        TestNode {
            dir: dir.to_path_buf(),
            child,
            base: format!("http://{}", addr.trim()),
            token: token.trim().to_string(),
            http: reqwest::Client::builder()
                .no_proxy()
                .build()
                .expect("client"),
            _tmp: None,
        }
    }

    pub async fn kill(&mut self) {
        self.child.kill().await.expect("kill node");
    }

    /// Stop the node as a service manager would (SIGTERM) and wait for it to exit.
    pub async fn terminate(&mut self) -> std::process::ExitStatus {
        let pid = self.child.id().expect("node is running") as libc::pid_t;
        // SAFETY: sends a signal to our own child process; no memory is involved.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0, "SIGTERM");
        tokio::time::timeout(Duration::from_secs(30), self.child.wait())
            .await
            .expect("node exits within 30 s of SIGTERM")
            .expect("wait for node")
    }

    pub async fn request(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Json>,
    ) -> (u16, Json) {
        let mut req = self
            .http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(&self.token);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let res = req.send().await.expect("request reaches the node");
        let status = res.status().as_u16();
        let text = res.text().await.expect("body");
        (
            status,
            serde_json::from_str(&text).unwrap_or(Json::String(text)),
        )
    }

    pub async fn get(&self, path: &str) -> (u16, Json) {
        self.request(reqwest::Method::GET, path, None).await
    }

    pub async fn post(&self, path: &str, body: Json) -> (u16, Json) {
        self.request(reqwest::Method::POST, path, Some(body)).await
    }

    pub async fn patch(&self, path: &str, body: Json) -> (u16, Json) {
        self.request(reqwest::Method::PATCH, path, Some(body)).await
    }

    /// Run a CLI command against this node's data directory.
    pub async fn cli(&self, args: &[&str]) -> CliOutput {
        run_cli(&self.dir, args).await
    }

    pub async fn cases_tracker(&self) -> Json {
        let (s, t) = self
            .post(
                "/api/v1/trackers",
                serde_json::json!({"name": "cases", "fields": [
                    {"name": "name", "type": "text", "required": true},
                    {"name": "age", "type": "number"},
                    {"name": "status", "type": "choice", "options": ["open", "closed"]},
                ]}),
            )
            .await;
        assert_eq!(s, 201, "{t}");
        t
    }
}

impl TestNode {
    /// This node's libp2p address, `/ip4/127.0.0.1/tcp/<port>/p2p/<peer id>`.
    pub async fn p2p_addr(&self) -> String {
        let status = eventually("listen address", || async {
            let (_, s) = self.get("/api/v1/status").await;
            s["listen_addrs"]
                .as_array()
                .is_some_and(|a| !a.is_empty())
                .then_some(s)
        })
        .await;
        format!(
            "{}/p2p/{}",
            status["listen_addrs"][0].as_str().expect("addr"),
            status["peer_id"].as_str().expect("peer id")
        )
    }

    pub async fn peer_id(&self) -> String {
        let (_, s) = self.get("/api/v1/status").await;
        s["peer_id"].as_str().expect("peer id").to_string()
    }

    /// A counter or gauge from `/metrics` (0 when absent).
    pub async fn metric(&self, name: &str) -> f64 {
        let text = self
            .http
            .get(format!("{}/metrics", self.base))
            .send()
            .await
            .expect("metrics")
            .text()
            .await
            .expect("metrics text");
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0.0)
    }

    /// Revoke each other, both ways.
    pub async fn unpair(&self, other: &TestNode) {
        for (x, y) in [(self, other), (other, self)] {
            let id = y.peer_id().await;
            let (s, e) = x
                .request(
                    reqwest::Method::DELETE,
                    &format!("/api/v1/peers/{id}"),
                    None,
                )
                .await;
            assert_eq!(s, 200, "{e}");
        }
    }

    /// Authorize each other, both ways, by address.
    pub async fn pair(&self, other: &TestNode) {
        let (s, e) = self
            .post(
                "/api/v1/peers",
                serde_json::json!({"addr": other.p2p_addr().await}),
            )
            .await;
        assert_eq!(s, 201, "{e}");
        let (s, e) = other
            .post(
                "/api/v1/peers",
                serde_json::json!({"addr": self.p2p_addr().await}),
            )
            .await;
        assert_eq!(s, 201, "{e}");
    }

    /// Median time for an item created here to be readable on `other` (5 items; polled every
    /// 2 ms). A figure to print, not to assert on: the machine is shared.
    pub async fn latency_to(&self, other: &TestNode, what: &str) -> Duration {
        let mut times = Vec::new();
        for k in 0..5 {
            let started = tokio::time::Instant::now();
            let (s, item) = self
                .post(
                    "/api/v1/trackers/cases/items",
                    serde_json::json!({"fields": {"name": format!("probe {what} {k}")}}),
                )
                .await;
            assert_eq!(s, 201, "{item}");
            let path = format!("/api/v1/items/{}", item["id"].as_str().expect("id"));
            while other.get(&path).await.0 != 200 {
                assert!(
                    started.elapsed() < SYNC_TIMEOUT,
                    "timed out waiting for a probe item {what}"
                );
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            times.push(started.elapsed());
        }
        times.sort();
        times[times.len() / 2]
    }

    /// The item as this node sees it, once `pred` holds (or fail after the timeout).
    pub async fn item_when(&self, id: &str, pred: impl Fn(&Json) -> bool) -> Json {
        eventually(&format!("item {id} on {}", self.base), || async {
            let (s, item) = self.get(&format!("/api/v1/items/{id}")).await;
            (s == 200 && pred(&item)).then_some(item)
        })
        .await
    }
}

/// A TCP port that was free a moment ago (for nodes that must keep their address).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

/// Where a test node's log goes: nowhere, unless TRACKERSYNC_TEST_LOGS is set.
/// TRACKERSYNC_TEST_LOGS=1 keeps each node's log in its data dir (node.log);
/// TRACKERSYNC_TEST_LOGS=DIR puts it in DIR instead (for data dirs on a tmpfs the test fills
/// up, or removed when the test ends).
pub fn node_stderr(dir: &Path) -> Stdio {
    let Some(v) = std::env::var_os("TRACKERSYNC_TEST_LOGS") else {
        return Stdio::null();
    };
    let file = match Path::new(&v) {
        p if p.is_dir() => p.join(format!("{}.log", dir.to_string_lossy().replace('/', "_"))),
        _ => {
            let _ = std::fs::create_dir_all(dir);
            dir.join("node.log")
        }
    };
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(file)
        .map(Stdio::from)
        .unwrap_or_else(|_| Stdio::null())
}

/// How long a change may take to reach another node before a test fails.
pub const SYNC_TIMEOUT: Duration = Duration::from_secs(30);

/// Poll `check` until it yields a value; fail after [`SYNC_TIMEOUT`].
pub async fn eventually<T, F, Fut>(what: &str, check: F) -> T
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + SYNC_TIMEOUT;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub struct CliOutput {
    pub ok: bool,
    pub stdout: String,
    pub stderr: String,
}

impl CliOutput {
    pub fn json(&self) -> Json {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.stdout))
    }
}

pub async fn run_cli(dir: &Path, args: &[&str]) -> CliOutput {
    let out = Command::new(BIN)
        .arg("--data")
        .arg(dir)
        .args(args)
        .output()
        .await
        .expect("run trackersync");
    CliOutput {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Wait until `path` exists with content, polling (a file has no event to wait on).
pub async fn wait_for_file(path: &Path, timeout: Duration) -> String {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Ok(s) = std::fs::read_to_string(path) {
            if !s.trim().is_empty() {
                return s;
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} did not appear within {timeout:?}",
            path.display()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Whether this process runs as root. The tests that mount a tmpfs or build network
/// namespaces need it; CI runs as root, so they always run there. Elsewhere they say so on
/// stderr and stop before doing anything.
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|v| v.split_whitespace().nth(1).map(|e| e == "0"))
        })
        .unwrap_or(false)
}

/// Resident memory of a process in KiB (`VmRSS`), 0 if it is gone.
pub fn rss_kib(pid: u32) -> u64 {
    status_kib(pid, "VmRSS:")
}

/// Peak resident memory of a process in KiB (`VmHWM`, the high-water mark), 0 if it is gone.
pub fn peak_rss_kib(pid: u32) -> u64 {
    status_kib(pid, "VmHWM:")
}

fn status_kib(pid: u32, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// The memory cap the flood and hostile-peer tests hold a node to, in KiB:
/// `TRACKERSYNC_MEMORY_CAP_MIB` (default 512 MiB).
pub fn memory_cap_kib() -> u64 {
    std::env::var("TRACKERSYNC_MEMORY_CAP_MIB")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(512)
        * 1024
}

/// Assert that a node's peak memory (since it started) stayed under the configured cap.
pub fn assert_under_memory_cap(pid: u32, when: &str) {
    let (peak, cap) = (peak_rss_kib(pid), memory_cap_kib());
    assert!(peak > 0, "the node's memory could not be read {when}");
    println!(
        "node peak RSS {} MiB {when} (cap {} MiB)",
        peak / 1024,
        cap / 1024
    );
    assert!(
        peak < cap,
        "node peak RSS {peak} KiB {when}, over the {cap} KiB cap"
    );
}

/// A libp2p swarm of our own that speaks only the plain sync protocol with the node's codec:
/// a peer from before the deflate protocol, or an intruder.
pub fn plain_sync_swarm(
) -> libp2p::Swarm<libp2p::request_response::Behaviour<trackersync::net::wire::Codec>> {
    use libp2p::request_response::{self, ProtocolSupport};
    use trackersync::net::wire;
    libp2p::SwarmBuilder::with_new_identity()
        .with_tokio()
        .with_tcp(
            libp2p::tcp::Config::default(),
            libp2p::noise::Config::new,
            libp2p::yamux::Config::default,
        )
        .expect("tcp")
        .with_behaviour(|_| {
            request_response::Behaviour::with_codec(
                wire::Codec,
                [(wire::PROTOCOL, ProtocolSupport::Full)],
                request_response::Config::default(),
            )
        })
        .expect("behaviour")
        .build()
}

/// A pull of a node's whole feed (a page of at most 100 entries), as a peer's first pull.
pub fn pull_from_start() -> trackersync::net::pb::Request {
    use trackersync::net::{pb, wire};
    pb::Request {
        version: wire::VERSION,
        body: Some(pb::request::Body::Pull(pb::Pull {
            since: 0,
            max_entries: 100,
            ..Default::default()
        })),
    }
}
