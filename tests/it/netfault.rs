//! Network faults inside a test's own network namespaces, for the partition harness: packet
//! loss (iptables' `statistic` match) and added latency. This kernel has no `tc netem`, so
//! latency comes from an NFQUEUE: iptables hands every packet arriving on the node's link to
//! a queue, and a thread of this test, moved into that namespace, holds each packet for the
//! current delay before accepting it. Needs root and iptables (CI installs it).

use std::collections::VecDeque;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Run iptables inside namespace `ns`.
pub fn iptables(ns: &str, args: &[&str]) -> Result<(), String> {
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", ns, "iptables", "-w"])
        .args(args)
        .output()
        .map_err(|e| format!("cannot run iptables: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "iptables {} in {ns}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// Whether iptables is installed (CI installs it; the harness says so when it is missing).
pub fn available() -> bool {
    std::process::Command::new("iptables")
        .arg("-V")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Packet loss and latency on one node's link (`dev`, inside namespace `ns`).
pub struct LinkFaults {
    ns: String,
    dev: String,
    loss: Option<u32>,
    delay_ms: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<u64>>,
}

impl LinkFaults {
    /// Route the link's incoming packets through NFQUEUE `queue` (no delay until one is set).
    pub fn new(ns: &str, dev: &str, queue: u16) -> Result<LinkFaults, String> {
        let delay_ms = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = mpsc::channel();
        let thread = {
            let (ns, delay_ms, stop) = (ns.to_string(), delay_ms.clone(), stop.clone());
            std::thread::spawn(move || delayer(&ns, queue, &delay_ms, &stop, ready_tx))
        };
        ready_rx
            .recv_timeout(Duration::from_secs(10))
            .map_err(|_| "the delayer thread did not start".to_string())??;
        // --queue-bypass: if the delayer is gone, packets pass instead of being dropped.
        let q = queue.to_string();
        iptables(
            ns,
            &[
                "-A",
                "INPUT",
                "-i",
                dev,
                "-j",
                "NFQUEUE",
                "--queue-num",
                &q,
                "--queue-bypass",
            ],
        )?;
        Ok(LinkFaults {
            ns: ns.into(),
            dev: dev.into(),
            loss: None,
            delay_ms,
            stop,
            thread: Some(thread),
        })
    }

    /// Drop this percentage of incoming packets (None: none).
    pub fn set_loss(&mut self, percent: Option<u32>) -> Result<(), String> {
        let rule = |p: u32| {
            vec![
                "INPUT".to_string(),
                "-i".into(),
                self.dev.clone(),
                "-m".into(),
                "statistic".into(),
                "--mode".into(),
                "random".into(),
                "--probability".into(),
                format!("{:.2}", p as f64 / 100.0),
                "-j".into(),
                "DROP".into(),
            ]
        };
        if let Some(p) = self.loss.take() {
            let mut args = vec!["-D".to_string()];
            args.extend(rule(p));
            iptables(
                &self.ns,
                &args.iter().map(String::as_str).collect::<Vec<_>>(),
            )?;
        }
        if let Some(p) = percent {
            // Inserted first: a dropped packet never reaches the delay queue.
            let mut args = vec!["-I".to_string()];
            args.extend(rule(p));
            iptables(
                &self.ns,
                &args.iter().map(String::as_str).collect::<Vec<_>>(),
            )?;
            self.loss = Some(p);
        }
        Ok(())
    }

    /// Hold each incoming packet this long (0: pass at once).
    pub fn set_delay(&self, ms: u64) {
        self.delay_ms.store(ms, Ordering::Relaxed);
    }

    /// Stop the delayer; returns how many packets went through it.
    pub fn finish(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().map_or(0, |t| t.join().unwrap_or(0))
    }
}

impl Drop for LinkFaults {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The delay loop, on its own thread inside namespace `ns`; returns the packets it passed.
fn delayer(
    ns: &str,
    queue: u16,
    delay_ms: &AtomicU64,
    stop: &AtomicBool,
    ready: mpsc::Sender<Result<(), String>>,
) -> u64 {
    let setup = || -> Result<nfq::Queue, String> {
        let f = std::fs::File::open(format!("/run/netns/{ns}"))
            .map_err(|e| format!("open namespace {ns}: {e}"))?;
        // SAFETY: setns on a valid namespace fd moves only this thread.
        if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(format!("setns {ns}: {}", std::io::Error::last_os_error()));
        }
        let mut q = nfq::Queue::open().map_err(|e| format!("open NFQUEUE: {e}"))?;
        q.bind(queue)
            .map_err(|e| format!("bind NFQUEUE {queue}: {e}"))?;
        // Only the verdict matters: no payload copied back and forth.
        q.set_copy_range(queue, 0)
            .map_err(|e| format!("NFQUEUE copy range: {e}"))?;
        q.set_queue_max_len(queue, 8192)
            .map_err(|e| format!("NFQUEUE length: {e}"))?;
        q.set_fail_open(queue, true)
            .map_err(|e| format!("NFQUEUE fail open: {e}"))?;
        q.set_nonblocking(true);
        Ok(q)
    };
    let mut q = match setup() {
        Ok(q) => {
            let _ = ready.send(Ok(()));
            q
        }
        Err(e) => {
            let _ = ready.send(Err(e));
            return 0;
        }
    };
    let mut held: VecDeque<(Instant, nfq::Message)> = VecDeque::new();
    let mut passed = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let mut got = false;
        while let Ok(mut msg) = q.recv() {
            got = true;
            msg.set_verdict(nfq::Verdict::Accept);
            let due = Instant::now() + Duration::from_millis(delay_ms.load(Ordering::Relaxed));
            held.push_back((due, msg));
        }
        let now = Instant::now();
        while held.front().is_some_and(|(due, _)| *due <= now) {
            let (_, msg) = held.pop_front().expect("front");
            if q.verdict(msg).is_ok() {
                passed += 1;
            }
        }
        if !got {
            std::thread::sleep(Duration::from_micros(500));
        }
    }
    for (_, msg) in held {
        let _ = q.verdict(msg);
    }
    passed
}
