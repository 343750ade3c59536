//! Partitions and crashes (issue 7): real node processes, each in its own network namespace
//! on a bridge the test builds (veth pairs; CI runs as root). A seeded nemesis, during a
//! workload of creates and same-field edits on every node, isolates nodes and splits the
//! network (links down), heals it, and SIGKILLs and restarts nodes. After healing: every
//! acknowledged write is on every node, no value nobody wrote, identical items everywhere,
//! and every field equals the acknowledged write with the highest (HLC, node). The seed is
//! printed; `TRACKERSYNC_SEED` replays a run. Short tier: 3 nodes, 2,000 operations; the
//! long tier is `TRACKERSYNC_PARTITION_NODES=5 TRACKERSYNC_PARTITION_OPS=100000`.
//!
//! (`tc netem` is not in this kernel, so there is no packet loss or added latency here;
//! links go down and up instead.)

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

use crate::support::{eventually, TestNode};

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
}

impl Lab {
    fn new(nodes: usize) -> Lab {
        let id = std::process::id() % 100_000;
        let lab = Lab {
            tag: format!("{id}"),
            nodes,
            subnet: 2 * (id % 100) as u8 + 20,
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
            sh(&["ip", "netns", "exec", &ns, "ip", "link", "set", "lo", "up"]);
            sh(&[
                "ip",
                "netns",
                "exec",
                &ns,
                "ip",
                "addr",
                "add",
                &format!("{}/24", lab.ip(i)),
                "dev",
                &format!("{veth}p"),
            ]);
            sh(&[
                "ip",
                "netns",
                "exec",
                &ns,
                "ip",
                "link",
                "set",
                &format!("{veth}p"),
                "up",
            ]);
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
                "netns",
                "exec",
                &ns,
                "ip",
                "addr",
                "add",
                &format!("{}/24", lab.api_ip(i)),
                "dev",
                &mp,
            ]);
            sh(&["ip", "netns", "exec", &ns, "ip", "link", "set", &mp, "up"]);
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
    TestNode::start_wrapped(
        &["ip", "netns", "exec", &ns],
        dir,
        &format!("{}:0", lab.api_ip(i)),
        &format!("/ip4/{}/tcp/{PORT}", lab.ip(i)),
        &[],
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
    let nodes = env("TRACKERSYNC_PARTITION_NODES", 3);
    let ops = env("TRACKERSYNC_PARTITION_OPS", 2000);
    let seed: u64 = std::env::var("TRACKERSYNC_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    println!("partition test seed {seed} (replay with TRACKERSYNC_SEED={seed})");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let lab = Lab::new(nodes);
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

    // The workload and the nemesis.
    let mut items: Vec<String> = Vec::new();
    let mut acked: Vec<Write> = Vec::new();
    let mut down = vec![false; nodes];
    let mut faults: BTreeMap<&str, usize> = BTreeMap::new();
    for op in 0..ops {
        let i = rng.random_range(0..nodes);
        let roll = rng.random_range(0..1000);
        let up = slots.iter().filter(|s| s.node.is_some()).count();
        if roll < 8 && up > 1 && slots[i].node.is_some() {
            slots[i].node.take().expect("up").kill().await;
            *faults.entry("kill").or_default() += 1;
        } else if roll < 20 && slots[i].node.is_none() {
            slots[i].node = Some(start(&lab, i, &slots[i].dir).await);
            *faults.entry("restart").or_default() += 1;
        } else if roll < 30 && !down[i] {
            lab.link(i, false);
            down[i] = true;
            *faults.entry("isolate").or_default() += 1;
        } else if roll < 45 && down.iter().any(|d| *d) {
            for (k, d) in down.iter_mut().enumerate() {
                if *d {
                    lab.link(k, true);
                    *d = false;
                }
            }
            *faults.entry("heal").or_default() += 1;
        } else if let Some(n) = slots[i].node.as_ref() {
            if items.len() < 8 && (items.is_empty() || rng.random_bool(0.05)) {
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
                items.push(id);
            } else if !items.is_empty() {
                let id = &items[rng.random_range(0..items.len())];
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
            }
        }
    }
    // Heal everything.
    for (k, d) in down.iter().enumerate() {
        if *d {
            lab.link(k, true);
        }
    }
    for (i, slot) in slots.iter_mut().enumerate() {
        if slot.node.is_none() {
            slot.node = Some(start(&lab, i, &slot.dir).await);
        }
    }
    println!(
        "{ops} operations, {} acknowledged writes, faults {faults:?}; healing",
        acked.len()
    );
    assert!(acked.len() > ops / 4, "the workload wrote");

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
    let healed = Instant::now();
    for (n, slot) in slots.iter().enumerate() {
        let node = slot.node.as_ref().expect("up");
        for id in &items {
            let want = Value::Object(expected[id.as_str()].clone());
            let deadline = Instant::now() + crate::support::SYNC_TIMEOUT;
            loop {
                let (s, item) = node.get(&format!("/api/v1/items/{id}")).await;
                if s == 200 && item["fields"] == want {
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
            }
        }
    }
    println!("converged {:?} after healing", healed.elapsed());
    // Identical items everywhere, and every acknowledged write in every node's history.
    let reference: Vec<Value> = {
        let n = slots[0].node.as_ref().expect("up");
        let mut v = Vec::new();
        for id in &items {
            v.push(n.get(&format!("/api/v1/items/{id}")).await.1);
        }
        v
    };
    for (k, slot) in slots.iter().enumerate() {
        let n = slot.node.as_ref().expect("up");
        for (id, want) in items.iter().zip(&reference) {
            let (_, item) = n.get(&format!("/api/v1/items/{id}")).await;
            assert_eq!(&item, want, "item {id} differs on node {k}");
            let (_, history) = n.get(&format!("/api/v1/items/{id}/history")).await;
            for w in acked.iter().filter(|w| &w.item == id) {
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
}
