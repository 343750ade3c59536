//! Convergence under random faults: three nodes, random concurrent edits (same fields
//! included), random SIGKILLs and restarts. After healing every node holds identical items,
//! no acknowledged write is missing, and every field equals the acknowledged write with the
//! highest (HLC, node). The seed is printed; `TRACKERSYNC_SEED` replays a run.

use std::collections::HashMap;
use std::path::PathBuf;

use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

use crate::support::{eventually, free_port, TestNode};

const NODES: usize = 3;
const ITEMS: usize = 4;
const FIELDS: [&str; 3] = ["a", "b", "c"];
/// Operations per run; `TRACKERSYNC_FAULT_OPS` raises it.
const DEFAULT_OPS: usize = 60;

struct Slot {
    dir: PathBuf,
    listen: String,
    node: Option<TestNode>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_converge_after_kills_and_concurrent_edits() {
    let seed: u64 = std::env::var("TRACKERSYNC_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    let ops: usize = std::env::var("TRACKERSYNC_FAULT_OPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(DEFAULT_OPS);
    println!("fault test seed {seed} (replay with TRACKERSYNC_SEED={seed})");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let tmp = tempfile::tempdir().expect("tempdir");
    // With TRACKERSYNC_TEST_LOGS the data dirs (and node logs) outlive the test.
    let (root, _tmp) = if std::env::var_os("TRACKERSYNC_TEST_LOGS").is_some() {
        let root = tmp.keep();
        eprintln!("node data and logs under {}", root.display());
        (root, None)
    } else {
        (tmp.path().to_path_buf(), Some(tmp))
    };
    let mut slots = Vec::new();
    for i in 0..NODES {
        let dir = root.join(format!("n{i}"));
        let listen = format!("/ip4/127.0.0.1/tcp/{}", free_port());
        let node = TestNode::start_listening(&dir, &listen).await;
        slots.push(Slot {
            dir,
            listen,
            node: Some(node),
        });
    }
    for i in 0..NODES {
        for j in i + 1..NODES {
            let (x, y) = (
                slots[i].node.as_ref().expect("up"),
                slots[j].node.as_ref().expect("up"),
            );
            x.pair(y).await;
        }
    }
    let first = slots[0].node.as_ref().expect("up");
    let (s, _) = first
        .post("/api/v1/trackers", json!({"name": "f", "fields": FIELDS.iter().map(|f| json!({"name": f, "type": "number"})).collect::<Vec<_>>()}))
        .await;
    assert_eq!(s, 201);
    let mut ids = Vec::new();
    for k in 0..ITEMS {
        let (s, item) = first
            .post("/api/v1/trackers/f/items", json!({"fields": {"a": k}}))
            .await;
        assert_eq!(s, 201);
        ids.push(item["id"].as_str().expect("id").to_string());
    }
    // Acknowledged writes: (item, field) -> [(stamp, value)].
    let mut acked: HashMap<(String, String), Vec<(String, i64)>> = HashMap::new();
    for (k, id) in ids.iter().enumerate() {
        acked
            .entry((id.clone(), "a".into()))
            .or_default()
            .push((String::new(), k as i64));
    }
    for slot in &slots {
        for id in &ids {
            slot.node
                .as_ref()
                .expect("up")
                .item_when(id, |_| true)
                .await;
        }
    }

    let mut kills = 0;
    for op in 0..ops {
        let i = rng.random_range(0..NODES);
        let roll = rng.random_range(0..10);
        let up = slots.iter().filter(|s| s.node.is_some()).count();
        if roll == 0 && up > 1 && slots[i].node.is_some() {
            let mut n = slots[i].node.take().expect("up");
            n.kill().await;
            kills += 1;
            println!("op {op}: kill node {i}");
        } else if roll == 1 && slots[i].node.is_none() {
            slots[i].node = Some(TestNode::start_listening(&slots[i].dir, &slots[i].listen).await);
            println!("op {op}: restart node {i}");
        } else if let Some(n) = slots[i].node.as_ref() {
            let id = &ids[rng.random_range(0..ITEMS)];
            let field = FIELDS[rng.random_range(0..FIELDS.len())];
            let value: i64 = rng.random_range(0..1000);
            let (s, item) = n
                .patch(
                    &format!("/api/v1/items/{id}"),
                    json!({"fields": {field: value}}),
                )
                .await;
            assert_eq!(s, 200, "{item}");
            acked
                .entry((id.clone(), field.into()))
                .or_default()
                .push((item["updated"].as_str().expect("stamp").to_string(), value));
        }
    }
    for slot in slots.iter_mut() {
        if slot.node.is_none() {
            slot.node = Some(TestNode::start_listening(&slot.dir, &slot.listen).await);
        }
    }
    println!("{ops} operations, {kills} kills; healing");

    // Expected: per field, the acknowledged write with the highest stamp.
    let expected: HashMap<String, Value> = ids
        .iter()
        .map(|id| {
            let mut fields = serde_json::Map::new();
            for f in FIELDS {
                if let Some(w) = acked
                    .get(&(id.clone(), f.to_string()))
                    .and_then(|ws| ws.iter().max_by(|x, y| x.0.cmp(&y.0)))
                {
                    fields.insert(f.to_string(), json!(w.1));
                }
            }
            (id.clone(), Value::Object(fields))
        })
        .collect();
    for (n, slot) in slots.iter().enumerate() {
        let node = slot.node.as_ref().expect("up");
        for id in &ids {
            let want = &expected[id];
            eventually(&format!("item {id} converged on node {n}"), || async {
                let (s, item) = node.get(&format!("/api/v1/items/{id}")).await;
                (s == 200 && &item["fields"] == want).then_some(())
            })
            .await;
        }
    }
}
