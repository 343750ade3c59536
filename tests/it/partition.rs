//! Partitions and crashes (issue 7): real node processes, each in its own network namespace
//! on a bridge the test builds (veth pairs; CI runs as root), each with its own clock skew
//! (libfaketime, within the drift bound). A seeded nemesis, during a workload of creates and
//! same-field edits on every node, isolates nodes (link down), splits the network in two
//! (iptables drops), drops packets (iptables `statistic`), delays them (an NFQUEUE
//! delayer: `tc netem` is not in this kernel, see `netfault`), heals it all, and SIGKILLs
//! and restarts nodes. Needs root; uses iptables and faketime (`.ci/run` installs them when
//! missing; without them the run leaves their faults out and says so). After healing: every
//! acknowledged write is on every node, no value nobody wrote, identical items everywhere,
//! and every field equals the acknowledged write with the highest (HLC, node). The seed is
//! printed; `TRACKERSYNC_SEED` replays a run; each node's peak RSS over all its runs is
//! reported. Short tier: 3 nodes, 2,000 operations; the
//! long tier is `TRACKERSYNC_PARTITION_NODES=5 TRACKERSYNC_PARTITION_OPS=100000`, and the
//! soak `TRACKERSYNC_SOAK_SECS=1800` (steady load and partitions, no kills; each node's RSS,
//! descriptors and disk sampled every 10 s and reported with the RSS slope; the run fails if
//! descriptors grow by more than 64 or the RSS ends above twice its post-warm-up value plus
//! 64 MiB, a bound for leaks, not a proof of flatness; nodes run with `--cache-mb 32`, or
//! `TRACKERSYNC_SOAK_CACHE_MB`). The soak edits 500 items at a time and retires an item after
//! 50 acknowledged edits, creating another in its place (`TRACKERSYNC_SOAK_EDITS_PER_ITEM=K`
//! sets K; 0 edits the same 500 items for the whole run, so their documents keep growing).

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

use crate::netfault::LinkFaults;
use crate::support::{eventually, TestNode};

/// Acknowledged edits after which the soak retires an item and creates another in its place.
/// A tracker item (a case record, an incident) is edited a bounded number of times in its
/// life; an Automerge document keeps every edit, so items edited without end would make the
/// soak measure their histories' growth (some 800 changes per item in 30 minutes) rather than
/// a steady load. `TRACKERSYNC_SOAK_EDITS_PER_ITEM=0` runs that variant.
const SOAK_EDITS_PER_ITEM: usize = 50;

/// The iptables chain in each namespace that holds a bipartition's drop rules.
const PARTITION_CHAIN: &str = "TSPART";

/// libfaketime, as Debian's `faketime` package installs it (the multithreaded variant).
const FAKETIME_LIB: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1";

/// Clock skews given to nodes (libfaketime offsets), all within the default drift bound of
/// five minutes, so every change applies at once and the latest write must still win.
const SKEWS: [&str; 6] = ["+0s", "-90s", "-3s", "+2s", "+40s", "+150s"];

const FIELDS: [&str; 3] = ["a", "b", "c"];
const PORT: u16 = 4100;

fn sh(args: &[&str]) {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .expect("run command");
    assert!(
        out.status.success(),
        "{args:?} failed (this test needs root, as CI has): {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A bridge with one network namespace per node, torn down when dropped.
struct Lab {
    tag: String,
    nodes: usize,
    subnet: u8,
    /// Each node's clock offset (a libfaketime `FAKETIME` value).
    skew: Vec<&'static str>,
    /// Loss and latency on each node's link.
    faults: Vec<LinkFaults>,
}

impl Lab {
    fn new(nodes: usize, rng: &mut impl Rng) -> Lab {
        // Without iptables or libfaketime (CI installs both) the run goes on with the faults
        // it can still make, and says which it left out.
        let (iptables, faketime) = (
            crate::netfault::available(),
            std::path::Path::new(FAKETIME_LIB).exists(),
        );
        if !iptables {
            println!("iptables missing (apt-get install iptables): no packet loss, latency or bipartitions in this run");
        }
        if !faketime {
            println!("libfaketime missing (apt-get install faketime): no clock skew in this run");
        }
        let id = std::process::id() % 100_000;
        let mut lab = Lab {
            tag: format!("{id}"),
            nodes,
            subnet: 2 * (id % 100) as u8 + 20,
            // Node 0 keeps the true time; the others get a seeded skew each.
            skew: (0..nodes)
                .map(|i| {
                    if i == 0 || !faketime {
                        SKEWS[0]
                    } else {
                        SKEWS[rng.random_range(0..SKEWS.len())]
                    }
                })
                .collect(),
            faults: Vec::new(),
        };
        lab.teardown();
        sh(&["ip", "link", "add", &lab.bridge(), "type", "bridge"]);
        sh(&[
            "ip",
            "addr",
            "add",
            &format!("10.{}.0.1/24", lab.subnet),
            "dev",
            &lab.bridge(),
        ]);
        sh(&["ip", "link", "set", &lab.bridge(), "up"]);
        for i in 0..nodes {
            let (ns, veth) = (lab.ns(i), lab.veth(i));
            sh(&["ip", "netns", "add", &ns]);
            sh(&[
                "ip",
                "link",
                "add",
                &veth,
                "type",
                "veth",
                "peer",
                "name",
                &format!("{veth}p"),
            ]);
            sh(&["ip", "link", "set", &format!("{veth}p"), "netns", &ns]);
            sh(&["ip", "link", "set", &veth, "master", &lab.bridge()]);
            sh(&["ip", "link", "set", &veth, "up"]);
            sh(&["ip", "-n", &ns, "link", "set", "lo", "up"]);
            sh(&[
                "ip",
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{}/24", lab.ip(i)),
                "dev",
                &format!("{veth}p"),
            ]);
            sh(&["ip", "-n", &ns, "link", "set", &format!("{veth}p"), "up"]);
            // A management link of its own, for the test to reach the node's API while its
            // network link is down.
            let (m, mp) = (lab.mgmt(i), format!("{}p", lab.mgmt(i)));
            sh(&["ip", "link", "add", &m, "type", "veth", "peer", "name", &mp]);
            sh(&["ip", "link", "set", &mp, "netns", &ns]);
            sh(&[
                "ip",
                "addr",
                "add",
                &format!("10.{}.{i}.1/24", lab.subnet + 1),
                "dev",
                &m,
            ]);
            sh(&["ip", "link", "set", &m, "up"]);
            sh(&[
                "ip",
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{}/24", lab.api_ip(i)),
                "dev",
                &mp,
            ]);
            sh(&["ip", "-n", &ns, "link", "set", &mp, "up"]);
            if !iptables {
                continue;
            }
            // Bipartitions drop packets silently (a chain of their own, before the delay
            // queue): peers find out by timeouts, as across a real partition.
            crate::netfault::iptables(&ns, &["-N", PARTITION_CHAIN]).expect("iptables chain");
            crate::netfault::iptables(&ns, &["-A", "INPUT", "-j", PARTITION_CHAIN])
                .expect("iptables jump");
            let faults = LinkFaults::new(&ns, &format!("{veth}p"), i as u16)
                .unwrap_or_else(|e| panic!("network faults for node {i}: {e}"));
            lab.faults.push(faults);
        }
        lab
    }

    fn mgmt(&self, i: usize) -> String {
        format!("tsm{}n{i}", self.tag)
    }

    fn api_ip(&self, i: usize) -> String {
        format!("10.{}.{i}.2", self.subnet + 1)
    }

    fn bridge(&self) -> String {
        format!("tsb{}", self.tag)
    }

    fn ns(&self, i: usize) -> String {
        format!("ts{}n{i}", self.tag)
    }

    fn veth(&self, i: usize) -> String {
        format!("tsv{}n{i}", self.tag)
    }

    fn ip(&self, i: usize) -> String {
        format!("10.{}.0.{}", self.subnet, 10 + i)
    }

    /// Cut node `i` off (its link down) or bring it back.
    fn link(&self, i: usize, up: bool) {
        sh(&[
            "ip",
            "link",
            "set",
            &self.veth(i),
            if up { "up" } else { "down" },
        ]);
    }

    /// Split the network: nodes in `side` and the others drop each other's packets
    /// (iptables, in every namespace), or (`None`) join it again.
    fn split(&self, side: Option<&[usize]>) {
        for i in 0..self.nodes {
            crate::netfault::iptables(&self.ns(i), &["-F", PARTITION_CHAIN])
                .expect("flush the partition chain");
            let Some(side) = side else { continue };
            for j in (0..self.nodes).filter(|j| side.contains(&i) != side.contains(j)) {
                crate::netfault::iptables(
                    &self.ns(i),
                    &["-A", PARTITION_CHAIN, "-s", &self.ip(j), "-j", "DROP"],
                )
                .expect("partition rule");
            }
        }
    }

    fn teardown(&self) {
        for i in 0..self.nodes {
            let _ = Command::new("ip")
                .args(["netns", "del", &self.ns(i)])
                .output();
            let _ = Command::new("ip")
                .args(["link", "del", &self.veth(i)])
                .output();
            let _ = Command::new("ip")
                .args(["link", "del", &self.mgmt(i)])
                .output();
        }
        let _ = Command::new("ip")
            .args(["link", "del", &self.bridge()])
            .output();
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.teardown();
    }
}

struct Slot {
    dir: PathBuf,
    node: Option<TestNode>,
}

async fn start(lab: &Lab, i: usize, dir: &std::path::Path) -> TestNode {
    let ns = lab.ns(i);
    // Without libfaketime every skew is "+0s" and the variables are inert.
    let preload = if std::path::Path::new(FAKETIME_LIB).exists() {
        format!("LD_PRELOAD={FAKETIME_LIB}")
    } else {
        "TRACKERSYNC_NO_FAKETIME=1".into()
    };
    let faketime = format!("FAKETIME={}", lab.skew[i]);
    // The soak gives its nodes a small memory budget, so documents are evicted and read back
    // all along and what it samples after warm-up is not a cache still filling up.
    let cache = (env("TRACKERSYNC_SOAK_SECS", 0) > 0)
        .then(|| env("TRACKERSYNC_SOAK_CACHE_MB", 32).to_string());
    let extra: Vec<&str> = cache
        .as_deref()
        .map(|mb| vec!["--cache-mb", mb])
        .unwrap_or_default();
    TestNode::start_wrapped(
        &[
            "ip",
            "netns",
            "exec",
            &ns,
            "env",
            &preload,
            &faketime,
            // Instants (timeouts, backoff) stay true; only wall-clock time is skewed.
            "FAKETIME_DONT_FAKE_MONOTONIC=1",
        ],
        dir,
        &format!("{}:0", lab.api_ip(i)),
        &format!("/ip4/{}/tcp/{PORT}", lab.ip(i)),
        &extra,
    )
    .await
}

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

/// One acknowledged write.
struct Write {
    item: String,
    field: &'static str,
    value: i64,
    stamp: String,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitions_kills_and_concurrent_edits_converge_with_nothing_lost() {
    if !crate::support::is_root() {
        eprintln!("not run: this test needs root (CI runs as root)");
        return;
    }
    let nodes = env("TRACKERSYNC_PARTITION_NODES", 3);
    let ops = env("TRACKERSYNC_PARTITION_OPS", 2000);
    // Soak: run for this many seconds instead (steady load, partitions, no kills), sampling
    // each node's memory, descriptors and disk.
    let soak = env("TRACKERSYNC_SOAK_SECS", 0);
    let seed: u64 = std::env::var("TRACKERSYNC_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    println!("partition test seed {seed} (replay with TRACKERSYNC_SEED={seed})");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut lab = Lab::new(nodes, &mut rng);
    println!("clock skews {:?}", lab.skew);
    let tmp = tempfile::tempdir().expect("tempdir");
    // With TRACKERSYNC_TEST_LOGS the data dirs (and node logs) outlive the test.
    let root = if std::env::var_os("TRACKERSYNC_TEST_LOGS").is_some() {
        let root = tmp.path().to_path_buf();
        std::mem::forget(tmp);
        eprintln!("node data and logs under {}", root.display());
        root
    } else {
        tmp.path().to_path_buf()
    };
    let mut slots = Vec::new();
    for i in 0..nodes {
        let dir = root.join(format!("n{i}"));
        let node = start(&lab, i, &dir).await;
        slots.push(Slot {
            dir,
            node: Some(node),
        });
    }
    let addr = |i: usize, id: &str| format!("/ip4/{}/tcp/{PORT}/p2p/{id}", lab.ip(i));
    let mut ids = Vec::new();
    for s in &slots {
        ids.push(s.node.as_ref().expect("up").peer_id().await);
    }
    for (i, slot) in slots.iter().enumerate() {
        for (j, id) in ids.iter().enumerate() {
            if i != j {
                let (s, e) = slot
                    .node
                    .as_ref()
                    .expect("up")
                    .post("/api/v1/peers", json!({"addr": addr(j, id)}))
                    .await;
                assert_eq!(s, 201, "{e}");
            }
        }
    }
    let first = slots[0].node.as_ref().expect("up");
    let fields: Vec<Value> = FIELDS
        .iter()
        .map(|f| json!({"name": f, "type": "number"}))
        .collect();
    let (s, e) = first
        .post("/api/v1/trackers", json!({"name": "f", "fields": fields}))
        .await;
    assert_eq!(s, 201, "{e}");
    for s in &slots {
        let n = s.node.as_ref().expect("up");
        eventually("tracker everywhere", || async {
            (n.get("/api/v1/trackers/f").await.0 == 200).then_some(())
        })
        .await;
    }

    // The workload and the nemesis. `open` lists the items still edited (indices into
    // `items`); past TRACKERSYNC_SOAK_EDITS_PER_ITEM acknowledged edits (0: never) an item
    // leaves it and new items take its place, so documents stop growing. The soak's steady
    // load gives each item at most `SOAK_EDITS_PER_ITEM` edits, as in a tracker's use;
    // other runs edit their items without end.
    let mut items: Vec<String> = Vec::new();
    let mut open: Vec<usize> = Vec::new();
    let mut edits: Vec<usize> = Vec::new();
    let per_item = env(
        "TRACKERSYNC_SOAK_EDITS_PER_ITEM",
        if soak > 0 { SOAK_EDITS_PER_ITEM } else { 0 },
    );
    let mut acked: Vec<Write> = Vec::new();
    let mut down = vec![false; nodes];
    let mut split = false;
    let mut lossy = vec![false; nodes];
    let mut slow = vec![false; nodes];
    let mut faults: BTreeMap<&str, usize> = BTreeMap::new();
    let mut heal_times: Vec<std::time::Duration> = Vec::new();
    // Each node's peak RSS (KiB) over all its runs, read before every kill and at the end.
    let mut peak_kib = vec![0u64; nodes];
    *faults.entry("clock skew").or_default() = lab.skew.iter().filter(|s| **s != "+0s").count();
    let started = Instant::now();
    let mut samples: Vec<Vec<(f64, u64, usize, u64)>> = vec![Vec::new(); nodes];
    let mut next_sample = Instant::now();
    let mut op = 0;
    loop {
        if soak == 0 && op >= ops {
            break;
        }
        if soak > 0 {
            if started.elapsed().as_secs() as usize >= soak {
                break;
            }
            if Instant::now() >= next_sample {
                next_sample += std::time::Duration::from_secs(10);
                for (k, slot) in slots.iter().enumerate() {
                    if let Some(n) = slot.node.as_ref() {
                        samples[k].push(sample(n, &slot.dir, started));
                    }
                }
            }
        }
        op += 1;
        let i = rng.random_range(0..nodes);
        let roll = rng.random_range(0..1000);
        let up = slots.iter().filter(|s| s.node.is_some()).count();
        if soak == 0 && roll < 8 && up > 1 && slots[i].node.is_some() {
            let mut node = slots[i].node.take().expect("up");
            peak_kib[i] = peak_kib[i].max(peak_rss(&node));
            node.kill().await;
            *faults.entry("kill").or_default() += 1;
        } else if roll < 20 && slots[i].node.is_none() {
            slots[i].node = Some(start(&lab, i, &slots[i].dir).await);
            *faults.entry("restart").or_default() += 1;
        } else if roll < 30 && !down[i] {
            lab.link(i, false);
            down[i] = true;
            *faults.entry("isolate").or_default() += 1;
        } else if roll < 38 && !split && nodes > 2 && !lab.faults.is_empty() {
            // Two sides, each with at least one node, chosen from the seed.
            let mut side: Vec<usize> = (0..nodes).filter(|_| rng.random_bool(0.5)).collect();
            if side.is_empty() || side.len() == nodes {
                side = vec![i];
            }
            lab.split(Some(&side));
            split = true;
            *faults.entry("bipartition").or_default() += 1;
        } else if roll < 46 && !lossy[i] && !lab.faults.is_empty() {
            let loss = rng.random_range(5..40);
            lab.faults[i].set_loss(Some(loss)).expect("packet loss");
            lossy[i] = true;
            *faults.entry("packet loss").or_default() += 1;
        } else if roll < 54 && !slow[i] && !lab.faults.is_empty() {
            lab.faults[i].set_delay(rng.random_range(5..80));
            slow[i] = true;
            *faults.entry("latency").or_default() += 1;
        } else if roll < 69 && (split || down.iter().chain(&lossy).chain(&slow).any(|d| *d)) {
            heal(&mut lab, &mut down, &mut split, &mut lossy, &mut slow);
            *faults.entry("heal").or_default() += 1;
            // Outside the soak, the workload pauses until the running nodes agree again.
            if soak == 0 {
                heal_times.push(agree(&slots, &items, seed, op).await);
            }
        } else if let Some(n) = slots[i].node.as_ref() {
            let max_items = if soak > 0 { 500 } else { 8 };
            if open.len() < max_items && (open.is_empty() || rng.random_bool(0.05)) {
                let value = rng.random_range(0..1000);
                let (s, item) = n
                    .post("/api/v1/trackers/f/items", json!({"fields": {"a": value}}))
                    .await;
                if s == 404 {
                    continue; // this node has not received the tracker yet
                }
                assert_eq!(s, 201, "{item}");
                let id = item["id"].as_str().expect("id").to_string();
                acked.push(Write {
                    item: id.clone(),
                    field: "a",
                    value,
                    stamp: item["updated"].as_str().expect("stamp").into(),
                });
                open.push(items.len());
                edits.push(0);
                items.push(id);
            } else if !open.is_empty() {
                let at = rng.random_range(0..open.len());
                let k = open[at];
                let id = &items[k];
                let field = FIELDS[rng.random_range(0..FIELDS.len())];
                let value: i64 = rng.random_range(0..1000);
                let (s, item) = n
                    .patch(
                        &format!("/api/v1/items/{id}"),
                        json!({"fields": {field: value}}),
                    )
                    .await;
                if s == 404 {
                    continue; // created elsewhere, not here yet
                }
                assert_eq!(s, 200, "op {op}: {item}");
                acked.push(Write {
                    item: id.clone(),
                    field,
                    value,
                    stamp: item["updated"].as_str().expect("stamp").into(),
                });
                edits[k] += 1;
                if per_item > 0 && edits[k] >= per_item {
                    open.swap_remove(at);
                }
            }
        }
    }
    // Heal everything.
    heal(&mut lab, &mut down, &mut split, &mut lossy, &mut slow);
    for (i, slot) in slots.iter_mut().enumerate() {
        if slot.node.is_none() {
            slot.node = Some(start(&lab, i, &slot.dir).await);
        }
    }
    println!(
        "{op} operations, {} acknowledged writes, faults {faults:?}; healing",
        acked.len()
    );
    assert!(acked.len() > op / 4, "the workload wrote");
    if soak > 0 {
        soak_report(&samples);
    }

    // Expected per (item, field): the acknowledged write with the highest stamp (stamps are
    // strings that sort in (HLC, node) order).
    let mut expected: HashMap<&str, serde_json::Map<String, Value>> = HashMap::new();
    let mut best: HashMap<(&str, &str), &Write> = HashMap::new();
    for w in &acked {
        let e = best.entry((w.item.as_str(), w.field)).or_insert(w);
        if w.stamp > e.stamp {
            *e = w;
        }
    }
    for ((item, field), w) in &best {
        expected
            .entry(item)
            .or_default()
            .insert(field.to_string(), json!(w.value));
    }
    // Every item is read once on each node, in pages; one that does not match yet is then
    // asked for alone until it does. The reading is timed apart: with a soak's tens of
    // thousands of items it is seconds of the time to converge.
    let healed = Instant::now();
    let mut reading = std::time::Duration::ZERO;
    for (n, slot) in slots.iter().enumerate() {
        let node = slot.node.as_ref().expect("up");
        let deadline = Instant::now() + crate::support::SYNC_TIMEOUT;
        let read = Instant::now();
        let held = items_on(node).await;
        reading += read.elapsed();
        for id in &items {
            let want = Value::Object(expected[id.as_str()].clone());
            let mut item = held.get(id).cloned();
            loop {
                if item.as_ref().is_some_and(|item| item["fields"] == want) {
                    break;
                }
                if Instant::now() > deadline {
                    let mut views = Vec::new();
                    for (k, other) in slots.iter().enumerate() {
                        let o = other.node.as_ref().expect("up");
                        views.push(format!(
                            "node {k}: {} peers {}",
                            o.get(&format!("/api/v1/items/{id}")).await.1,
                            o.get("/api/v1/peers").await.1
                        ));
                    }
                    panic!(
                        "seed {seed}: item {id} did not converge on node {n}: want {want}\n{}",
                        views.join("\n")
                    );
                }
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                let (s, got) = node.get(&format!("/api/v1/items/{id}")).await;
                item = (s == 200).then_some(got);
            }
        }
    }
    println!(
        "converged {:?} after healing ({reading:?} of it reading every item once on each node)",
        healed.elapsed()
    );
    for (k, slot) in slots.iter().enumerate() {
        peak_kib[k] = peak_kib[k].max(peak_rss(slot.node.as_ref().expect("up")));
    }
    let peak_mib: Vec<u64> = peak_kib.iter().map(|k| k / 1024).collect();
    println!("peak RSS of each node over all its runs (MiB): {peak_mib:?}");
    assert!(
        peak_kib.iter().all(|k| *k > 0),
        "peak RSS read: {peak_kib:?}"
    );
    heal_times.sort();
    if let Some(max) = heal_times.last() {
        println!(
            "running nodes agreed after each of {} heals: p50 {:?}, max {max:?}",
            heal_times.len(),
            heal_times[heal_times.len() / 2]
        );
    }
    // Every node's incoming packets went through its delay queue (the latency fault's path).
    let queued: Vec<u64> = lab.faults.drain(..).map(LinkFaults::finish).collect();
    println!("packets through each node's delay queue: {queued:?}");
    assert!(
        queued.iter().all(|n| *n > 0),
        "the delay queues saw traffic: {queued:?}"
    );
    // Identical items everywhere, and every acknowledged write in every node's history.
    let reference: Vec<Value> = {
        let n = slots[0].node.as_ref().expect("up");
        let mut v = Vec::new();
        for id in &items {
            v.push(n.get(&format!("/api/v1/items/{id}")).await.1);
        }
        v
    };
    let mut acked_by_item: HashMap<&str, Vec<&Write>> = HashMap::new();
    for w in &acked {
        acked_by_item.entry(w.item.as_str()).or_default().push(w);
    }
    for (k, slot) in slots.iter().enumerate() {
        let n = slot.node.as_ref().expect("up");
        for (id, want) in items.iter().zip(&reference) {
            let (_, item) = n.get(&format!("/api/v1/items/{id}")).await;
            assert_eq!(&item, want, "item {id} differs on node {k}");
            let (_, history) = n.get(&format!("/api/v1/items/{id}/history")).await;
            for w in acked_by_item.get(id.as_str()).into_iter().flatten() {
                assert!(
                    history.as_array().is_some_and(|h| h
                        .iter()
                        .any(|e| e["hlc"] == w.stamp && e["fields"][w.field] == json!(w.value))),
                    "acknowledged {} = {} at {} missing from {id}'s history on node {k}",
                    w.field,
                    w.value,
                    w.stamp
                );
            }
        }
    }
    if soak > 0 {
        // A clean stop rewrites a store whose file has grown to several times its live data
        // (sled's log; see ARCHITECTURE.md, Disk). Then every item is still there.
        for (k, slot) in slots.iter_mut().enumerate() {
            let mut node = slot.node.take().expect("up");
            let before = dir_bytes(&slot.dir);
            let t0 = Instant::now();
            assert!(node.terminate().await.success(), "node {k} stops cleanly");
            println!(
                "soak node {k}: disk {} MB before a clean stop, {} MB after ({:?} to stop)",
                before / 1_000_000,
                dir_bytes(&slot.dir) / 1_000_000,
                t0.elapsed()
            );
            let node = start(&lab, k, &slot.dir).await;
            for (id, want) in items.iter().zip(&reference) {
                let (_, item) = node.get(&format!("/api/v1/items/{id}")).await;
                assert_eq!(&item, want, "item {id} after node {k}'s clean stop");
            }
        }
    }
}

/// Time until every running node holds the same items (the same JSON, or all without one),
/// polled every 20 ms; fails the run (with its seed) if that takes longer than the sync
/// timeout. Nodes killed and not yet restarted are left out: what only they hold has not
/// left them yet.
async fn agree(slots: &[Slot], items: &[String], seed: u64, op: usize) -> std::time::Duration {
    let started = Instant::now();
    loop {
        let mut views: Vec<Vec<Value>> = Vec::new();
        for n in slots.iter().filter_map(|s| s.node.as_ref()) {
            let held = items_on(n).await;
            views.push(
                items
                    .iter()
                    .map(|id| held.get(id).cloned().unwrap_or(Value::Null))
                    .collect(),
            );
        }
        if views.windows(2).all(|w| w[0] == w[1]) {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < crate::support::SYNC_TIMEOUT,
            "seed {seed}: the running nodes did not agree within {:?} of the heal at op {op}",
            crate::support::SYNC_TIMEOUT
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// Every item a node holds in the workload's tracker, deleted ones too, by id: read a page of
/// 1,000 at a time, so checking a soak's tens of thousands of items times the nodes' sync,
/// not a request per item. A node without the tracker yet holds none.
async fn items_on(n: &TestNode) -> HashMap<String, Value> {
    let mut held = HashMap::new();
    let mut path = "/api/v1/trackers/f/items?limit=1000&deleted=true".to_string();
    loop {
        let (s, page) = n.get(&path).await;
        if s != 200 {
            return held;
        }
        for item in page["items"].as_array().into_iter().flatten() {
            if let Some(id) = item["id"].as_str() {
                held.insert(id.to_string(), item.clone());
            }
        }
        match page["next"].as_str() {
            Some(next) => {
                path = format!("/api/v1/trackers/f/items?limit=1000&deleted=true&after={next}")
            }
            None => return held,
        }
    }
}

/// Links up, one network again, no loss, no added latency.
fn heal(lab: &mut Lab, down: &mut [bool], split: &mut bool, lossy: &mut [bool], slow: &mut [bool]) {
    for (k, d) in down.iter_mut().enumerate() {
        if std::mem::take(d) {
            lab.link(k, true);
        }
    }
    if std::mem::take(split) {
        lab.split(None);
    }

    for k in 0..lossy.len() {
        if std::mem::take(&mut lossy[k]) {
            lab.faults[k].set_loss(None).expect("stop packet loss");
        }
        if std::mem::take(&mut slow[k]) {
            lab.faults[k].set_delay(0);
        }
    }
}

/// A running node's peak RSS in KiB (its `VmHWM`).
fn peak_rss(n: &TestNode) -> u64 {
    crate::support::peak_rss_kib(n.child.id().expect("pid"))
}

/// (minutes since start, RSS KiB, open descriptors, bytes in the data directory) of a node.
fn sample(n: &TestNode, dir: &std::path::Path, started: Instant) -> (f64, u64, usize, u64) {
    let pid = n.child.id().expect("pid");
    let rss = crate::support::rss_kib(pid);
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0);
    (
        started.elapsed().as_secs_f64() / 60.0,
        rss,
        fds,
        dir_bytes(dir),
    )
}

/// Bytes of the files under `p`.
fn dir_bytes(p: &std::path::Path) -> u64 {
    std::fs::read_dir(p)
        .map(|d| {
            d.flatten()
                .map(|e| match e.metadata() {
                    Ok(m) if m.is_dir() => dir_bytes(&e.path()),
                    Ok(m) => m.len(),
                    Err(_) => 0,
                })
                .sum()
        })
        .unwrap_or(0)
}

/// Least-squares slope of RSS (MiB) over time (minutes) of `(minutes, RSS KiB, ..)` samples.
fn slope_of(samples: &[&(f64, u64, usize, u64)]) -> f64 {
    let n = samples.len() as f64;
    let mx = samples.iter().map(|x| x.0).sum::<f64>() / n;
    let my = samples.iter().map(|x| x.1 as f64 / 1024.0).sum::<f64>() / n;
    samples
        .iter()
        .map(|x| (x.0 - mx) * (x.1 as f64 / 1024.0 - my))
        .sum::<f64>()
        / samples
            .iter()
            .map(|x| (x.0 - mx).powi(2))
            .sum::<f64>()
            .max(1e-9)
}

/// Print each node's samples after warm-up (the first fifth) with the RSS slope, and check
/// that descriptors stay flat and memory does not keep growing.
fn soak_report(samples: &[Vec<(f64, u64, usize, u64)>]) {
    for (k, s) in samples.iter().enumerate() {
        let warm: Vec<_> = s.iter().skip(s.len() / 5).collect();
        if warm.len() < 3 {
            continue;
        }
        let slope = slope_of(&warm);
        let fds: Vec<usize> = warm.iter().map(|x| x.2).collect();
        let (lo, hi) = (
            *fds.iter().min().expect("samples"),
            *fds.iter().max().expect("samples"),
        );
        let first = warm.first().expect("samples");
        let last = warm.last().expect("samples");
        // The shape, not only the ends: RSS at each tenth of the run after warm-up, and the
        // slope over its second half (a cache still filling up shows there as a bend).
        let path: Vec<String> = (0..=10)
            .map(|k| {
                let x = warm[(k * (warm.len() - 1)) / 10];
                format!("{:.0}min {}", x.0, x.1 / 1024)
            })
            .collect();
        println!("soak node {k}: RSS MiB over time: {}", path.join(", "));
        println!(
            "soak node {k}: slope over the second half {:.2} MiB/min",
            slope_of(&warm[warm.len() / 2..])
        );
        println!(
            "soak node {k}: RSS {} -> {} MiB (slope {slope:.2} MiB/min), fds {lo}..{hi}, disk {} -> {} MB",
            first.1 / 1024,
            last.1 / 1024,
            first.3 / 1_000_000,
            last.3 / 1_000_000
        );
        assert!(
            hi - lo <= 64,
            "node {k}: open descriptors grew from {lo} to {hi}"
        );
        assert!(
            (last.1 as f64) < 2.0 * first.1 as f64 + 64.0 * 1024.0,
            "node {k}: memory grew from {} to {} KiB",
            first.1,
            last.1
        );
    }
}
